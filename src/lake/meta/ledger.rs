//! The ingest ledger, `_silt.ledger`: one row per landing file silt has seen (ingested, empty,
//! duplicate, skipped, or rewritten by an erasure), keyed by path and content hash. Ingest
//! writes it last in each step, so a file is in the ledger only once its rows are in bronze and
//! quarantine. It must not parse files or write bronze.

use std::collections::HashMap;

use arrow::datatypes::{DataType, FieldRef};
use serde::{Deserialize, Serialize};

use super::{MetaTable, column, nullable, utc_micros};
use crate::error::Result;
use crate::lake::catalog::Catalog;
use crate::lake::storage::Storage;

/// What became of a landing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::Display)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum FileStatus {
    /// Its rows are in bronze and quarantine.
    Ingested,
    /// It held no row.
    Empty,
    /// The same content as another file already ingested.
    Duplicate,
    /// Changed since it was ingested, and the source's policy skips changed files.
    Skipped,
    /// An erasure rewrote it without a subject's records.
    Rewritten,
    /// An erasure deleted it (every record was a subject's).
    Erased,
}

impl FileStatus {
    /// Whether the file's rows are in bronze (so a later ingest of the same content adds none).
    pub fn landed(self) -> bool {
        matches!(self, FileStatus::Ingested | FileStatus::Empty)
    }
}

/// One landing file as the ledger records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub source: String,
    pub path: String,
    pub size: i64,
    pub e_tag: Option<String>,
    pub sha256: String,
    pub status: FileStatus,
    pub rows: i64,
    pub quarantined: i64,
    pub batch_id: String,
    /// Microseconds since the epoch, UTC.
    pub ingested_at: i64,
    pub detail: Option<String>,
}

impl MetaTable for LedgerEntry {
    const NAME: &'static str = "ledger";
    const OPERATION: &'static str = "ingest.ledger";
    const DESCRIPTION: &'static str = "silt ingest ledger: one row per landing file seen";

    fn fields() -> Vec<FieldRef> {
        vec![
            column("source", DataType::Utf8),
            column("path", DataType::Utf8),
            column("size", DataType::Int64),
            nullable("e_tag", DataType::Utf8),
            column("sha256", DataType::Utf8),
            column("status", DataType::Utf8),
            column("rows", DataType::Int64),
            column("quarantined", DataType::Int64),
            column("batch_id", DataType::Utf8),
            column("ingested_at", utc_micros()),
            nullable("detail", DataType::Utf8),
        ]
    }
}

/// All ledger entries of `source`, oldest first.
pub async fn read(catalog: &Catalog, source: &str) -> Result<Vec<LedgerEntry>> {
    Ok(read_all(catalog).await?.remove(source).unwrap_or_default())
}

/// Every source's ledger entries, oldest first: one read of the table for a whole ingest.
pub async fn read_all(catalog: &Catalog) -> Result<HashMap<String, Vec<LedgerEntry>>> {
    let mut out: HashMap<String, Vec<LedgerEntry>> = HashMap::new();
    for e in super::read::<LedgerEntry>(catalog).await? {
        out.entry(e.source.clone()).or_default().push(e);
    }
    for entries in out.values_mut() {
        entries.sort_by_key(|e| e.ingested_at);
    }
    Ok(out)
}

/// Record `entries` in one commit.
pub async fn record(lake: &Storage, entries: &[LedgerEntry], batch_id: &str) -> Result<()> {
    super::append(lake, entries, &[("silt.batch_id", batch_id)]).await
}
