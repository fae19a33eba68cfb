//! `_silt.erasures`, the GDPR audit log: one row per step of each erasure request, with an HMAC
//! of each subject id (never the id), the tables and versions it touched, and the range of
//! versions a purge made unreadable; and the question time travel asks of it: which request
//! purged this version. It must not erase anything (erasure.rs does) nor hold raw ids.

use std::collections::BTreeMap;

use arrow::datatypes::{DataType, FieldRef};
use serde::{Deserialize, Serialize};

use super::{MetaTable, column, nullable, utc_micros};
use crate::error::{Error, Result};
use crate::lake::catalog::{Catalog, TableRef};
use crate::lake::storage::Storage;

/// Where an erasure request is: started, one of its steps done, or completed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, strum::Display)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum AuditStatus {
    /// The request is recorded; nothing is erased yet.
    #[default]
    Started,
    /// Landing files were rewritten or deleted.
    Landing,
    /// A table's rows were deleted in place (a new version).
    Rewrite,
    /// A model was rebuilt without the subjects.
    Rebuild,
    /// A table's older files holding the subjects were deleted.
    Purge,
    /// Every step is done.
    Completed,
}

/// A step of an erasure request, as its report and the audit log name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, strum::Display)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Step {
    Landing,
    Rewrite,
    Rebuild,
    Purge,
}

impl From<Step> for AuditStatus {
    fn from(s: Step) -> Self {
        match s {
            Step::Landing => AuditStatus::Landing,
            Step::Rewrite => AuditStatus::Rewrite,
            Step::Rebuild => AuditStatus::Rebuild,
            Step::Purge => AuditStatus::Purge,
        }
    }
}

/// An audit row, one step of an erasure request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AuditRow {
    pub request_id: String,
    pub status: AuditStatus,
    /// HMACs of the subject ids, comma-separated (never the ids).
    #[serde(rename = "subject_hmacs")]
    pub subjects: String,
    pub reason: Option<String>,
    #[serde(rename = "table_name")]
    pub table: Option<String>,
    pub rows_deleted: i64,
    pub files_rewritten: i64,
    pub files_purged: i64,
    #[serde(rename = "version_written")]
    pub version: Option<i64>,
    pub unreadable_from: Option<i64>,
    pub unreadable_to: Option<i64>,
    pub detail: Option<String>,
    /// Microseconds since the epoch, UTC.
    pub at: i64,
    /// Per `subject_via` source, HMACs of the keys its rows reach subjects through (JSON).
    /// Written since subject_via exists: older audit tables lack it.
    #[serde(default)]
    pub key_hmacs: Option<String>,
}

impl MetaTable for AuditRow {
    const NAME: &'static str = "erasures";
    const OPERATION: &'static str = "erasure.audit";
    const DESCRIPTION: &'static str =
        "silt forget audit: one row per request step; subjects as HMAC-SHA256 only";

    fn fields() -> Vec<FieldRef> {
        vec![
            column("request_id", DataType::Utf8),
            column("status", DataType::Utf8),
            column("subject_hmacs", DataType::Utf8),
            nullable("reason", DataType::Utf8),
            nullable("table_name", DataType::Utf8),
            column("rows_deleted", DataType::Int64),
            column("files_rewritten", DataType::Int64),
            column("files_purged", DataType::Int64),
            nullable("version_written", DataType::Int64),
            nullable("unreadable_from", DataType::Int64),
            nullable("unreadable_to", DataType::Int64),
            nullable("detail", DataType::Utf8),
            column("at", utc_micros()),
            nullable("key_hmacs", DataType::Utf8),
        ]
    }
}

/// `_silt.erasures`, the audit log.
pub fn table() -> TableRef {
    AuditRow::table()
}

/// Append rows to the audit log in one commit.
pub async fn audit(lake: &Storage, rows: &[AuditRow]) -> Result<()> {
    super::append(lake, rows, &[]).await
}

/// An audit row as erasure reads it back: the unreadable range as a pair, the derived keys'
/// HMACs decoded.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub request_id: String,
    pub status: AuditStatus,
    pub subject_hmacs: String,
    pub table: Option<String>,
    pub unreadable: Option<(u64, u64)>,
    pub at: i64,
    /// Per `subject_via` source, HMACs of the derived keys (the `started` row).
    pub key_hmacs: BTreeMap<String, Vec<String>>,
}

/// Every audit row, oldest first.
pub async fn audit_entries(catalog: &Catalog) -> Result<Vec<AuditEntry>> {
    let mut out: Vec<AuditEntry> = super::read::<AuditRow>(catalog)
        .await?
        .into_iter()
        .map(|r| AuditEntry {
            key_hmacs: r
                .key_hmacs
                .as_deref()
                .and_then(|k| serde_json::from_str(k).ok())
                .unwrap_or_default(),
            unreadable: r
                .unreadable_from
                .zip(r.unreadable_to)
                .map(|(a, b)| (a as u64, b as u64)),
            request_id: r.request_id,
            status: r.status,
            subject_hmacs: r.subjects,
            table: r.table,
            at: r.at,
        })
        .collect();
    out.sort_by_key(|e| e.at);
    Ok(out)
}

/// The erasure request that made `version` of `t` unreadable, if one did.
pub async fn purged_by(catalog: &Catalog, t: &TableRef, version: u64) -> Result<Option<Error>> {
    let name = t.to_string();
    for e in audit_entries(catalog).await? {
        if e.table.as_deref() == Some(name.as_str())
            && let Some((from, to)) = e.unreadable
            && (from..=to).contains(&version)
        {
            let when = chrono::DateTime::from_timestamp_micros(e.at)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default();
            return Ok(Some(Error::Usage(format!(
                "version {version} of {name} is no longer readable: GDPR erasure request {} purged the files it referenced at {when} (versions {from} to {to} are gone; version {} and later are readable)",
                e.request_id,
                to + 1
            ))));
        }
    }
    Ok(None)
}
