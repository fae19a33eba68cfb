//! `_silt.erasures`, the GDPR audit log: one row per step of each erasure request, with an HMAC
//! of each subject id (never the id), the tables and versions it touched, and the range of
//! versions a purge made unreadable; and the question time travel asks of it: which request
//! purged this version. It must not erase anything (erasure.rs does) nor hold raw ids.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, TimeUnit};

use crate::error::{Error, Result};
use crate::lake::catalog::{Layer, TableRef};
use crate::lake::commit::append_record;

/// `_silt.erasures`, the audit log.
pub fn table() -> TableRef {
    TableRef::new(Layer::Silt, "erasures")
}

/// An audit row.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuditRow {
    pub(crate) request_id: String,
    pub(crate) status: String,
    pub(crate) subjects: String,
    pub(crate) reason: Option<String>,
    pub(crate) table: Option<String>,
    pub(crate) rows_deleted: i64,
    pub(crate) files_rewritten: i64,
    pub(crate) files_purged: i64,
    pub(crate) version: Option<i64>,
    pub(crate) unreadable_from: Option<i64>,
    pub(crate) unreadable_to: Option<i64>,
    pub(crate) detail: Option<String>,
    /// Per `subject_via` source, HMACs of the keys its rows reach subjects through (JSON).
    pub(crate) key_hmacs: Option<String>,
    pub(crate) at: i64,
}

fn audit_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("request_id", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("subject_hmacs", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, true),
        Field::new("table_name", DataType::Utf8, true),
        Field::new("rows_deleted", DataType::Int64, false),
        Field::new("files_rewritten", DataType::Int64, false),
        Field::new("files_purged", DataType::Int64, false),
        Field::new("version_written", DataType::Int64, true),
        Field::new("unreadable_from", DataType::Int64, true),
        Field::new("unreadable_to", DataType::Int64, true),
        Field::new("detail", DataType::Utf8, true),
        Field::new(
            "at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("key_hmacs", DataType::Utf8, true),
    ]))
}

pub(crate) async fn audit(lake: &crate::lake::storage::Storage, rows: &[AuditRow]) -> Result<()> {
    let s = |f: &dyn Fn(&AuditRow) -> Option<String>| -> ArrayRef {
        Arc::new(StringArray::from_iter(rows.iter().map(f)))
    };
    let i = |f: &dyn Fn(&AuditRow) -> Option<i64>| -> ArrayRef {
        Arc::new(Int64Array::from_iter(rows.iter().map(f)))
    };
    let batch = RecordBatch::try_new(
        audit_schema(),
        vec![
            s(&|r| Some(r.request_id.clone())),
            s(&|r| Some(r.status.clone())),
            s(&|r| Some(r.subjects.clone())),
            s(&|r| r.reason.clone()),
            s(&|r| r.table.clone()),
            i(&|r| Some(r.rows_deleted)),
            i(&|r| Some(r.files_rewritten)),
            i(&|r| Some(r.files_purged)),
            i(&|r| r.version),
            i(&|r| r.unreadable_from),
            i(&|r| r.unreadable_to),
            s(&|r| r.detail.clone()),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.at))
                    .with_timezone("UTC"),
            ),
            s(&|r| r.key_hmacs.clone()),
        ],
    )?;
    append_record(
        lake,
        &table(),
        batch,
        &[("silt.operation", "erasure.audit")],
        "silt forget audit: one row per request step; subjects as HMAC-SHA256 only",
    )
    .await?;
    Ok(())
}

/// Audit rows as (request, status, subjects, table, unreadable range, at).
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub request_id: String,
    pub status: String,
    pub subject_hmacs: String,
    pub table: Option<String>,
    pub unreadable: Option<(u64, u64)>,
    pub at: i64,
    /// Per `subject_via` source, HMACs of the derived keys (the `started` row).
    pub key_hmacs: BTreeMap<String, Vec<String>>,
}

pub async fn audit_entries(
    silt_catalog: &crate::lake::catalog::Catalog,
) -> Result<Vec<AuditEntry>> {
    let mut out = Vec::new();
    for b in silt_catalog.read_small(&table()).await? {
        let s = |n: &str| {
            b.column_by_name(n)
                .and_then(|c| arrow::compute::cast(c, &DataType::Utf8).ok())
                .map(|c| c.as_string::<i32>().clone())
        };
        let i = |n: &str| {
            b.column_by_name(n)
                .and_then(|c| arrow::compute::cast(c, &DataType::Int64).ok())
                .map(|c| c.as_primitive::<Int64Type>().clone())
        };
        let (Some(req), Some(st), Some(subj), Some(tab), Some(uf), Some(ut), Some(at)) = (
            s("request_id"),
            s("status"),
            s("subject_hmacs"),
            s("table_name"),
            i("unreadable_from"),
            i("unreadable_to"),
            i("at"),
        ) else {
            continue;
        };
        // Written since subject_via exists: older audit tables lack it.
        let kh = s("key_hmacs");
        for r in 0..b.num_rows() {
            out.push(AuditEntry {
                key_hmacs: kh
                    .as_ref()
                    .filter(|c| c.is_valid(r))
                    .and_then(|c| serde_json::from_str(c.value(r)).ok())
                    .unwrap_or_default(),
                request_id: req.value(r).to_string(),
                status: st.value(r).to_string(),
                subject_hmacs: subj.value(r).to_string(),
                table: (!tab.is_null(r)).then(|| tab.value(r).to_string()),
                unreadable: (!uf.is_null(r) && !ut.is_null(r))
                    .then(|| (uf.value(r) as u64, ut.value(r) as u64)),
                at: at.value(r),
            });
        }
    }
    out.sort_by_key(|e| e.at);
    Ok(out)
}

/// The erasure request that made `version` of `t` unreadable, if one did.
pub async fn purged_by(
    catalog: &crate::lake::catalog::Catalog,
    t: &TableRef,
    version: u64,
) -> Result<Option<Error>> {
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
