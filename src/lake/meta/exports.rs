//! `_silt.exports`: the Delta version each model was last exported at, per warehouse target,
//! one row per table per export. The next export sends only what changed since. It must not
//! talk to a warehouse (ops/export does).

use std::collections::HashMap;

use arrow::datatypes::{DataType, FieldRef};
use serde::{Deserialize, Serialize};

use super::{MetaTable, column, utc_micros};
use crate::error::Result;
use crate::lake::catalog::{Catalog, TableRef};
use crate::lake::storage::Storage;

/// One table of one export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportRow {
    pub model: String,
    /// The warehouse table (`project.dataset.table`).
    pub target: String,
    /// up_to_date | full | partitions | created
    pub mode: String,
    pub version: i64,
    /// Partitions sent, comma-separated.
    pub partitions: String,
    pub rows_sent: i64,
    /// Warehouse job ids, comma-separated.
    pub jobs: String,
    /// Microseconds since the epoch, UTC.
    pub at: i64,
}

impl MetaTable for ExportRow {
    const NAME: &'static str = "exports";
    const OPERATION: &'static str = "export.bigquery";
    const DESCRIPTION: &'static str =
        "silt export: the Delta version each table was last exported at";

    fn fields() -> Vec<FieldRef> {
        vec![
            column("model", DataType::Utf8),
            column("target", DataType::Utf8),
            column("mode", DataType::Utf8),
            column("version", DataType::Int64),
            column("partitions", DataType::Utf8),
            column("rows_sent", DataType::Int64),
            column("jobs", DataType::Utf8),
            column("at", utc_micros()),
        ]
    }
}

/// `_silt.exports`.
pub fn table() -> TableRef {
    ExportRow::table()
}

/// The last exported version per (model, target).
pub async fn last_versions(catalog: &Catalog) -> Result<HashMap<(String, String), u64>> {
    let mut out: HashMap<(String, String), u64> = HashMap::new();
    for r in super::read::<ExportRow>(catalog).await? {
        let v = r.version.max(0) as u64;
        let e = out.entry((r.model, r.target)).or_insert(v);
        *e = (*e).max(v);
    }
    Ok(out)
}

/// Record one export's tables in one commit.
pub async fn record(lake: &Storage, rows: &[ExportRow]) -> Result<()> {
    super::append(lake, rows, &[]).await
}
