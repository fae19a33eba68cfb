//! `_silt.batch_stats`: per ingest batch and source, each column's null rate and distinct count
//! (one row per column; a batch without columns keeps one row with an empty column name), the
//! history the ingest anomaly checks compare a new batch with. It must not judge batches
//! (ingest/anomalies.rs does).

use arrow::datatypes::{DataType, FieldRef};
use serde::{Deserialize, Serialize};

use super::{MetaTable, column, utc_micros};
use crate::error::Result;
use crate::lake::catalog::Catalog;
use crate::lake::storage::Storage;

/// One column of one batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnStatsRow {
    pub source: String,
    pub batch_id: String,
    /// Microseconds since the epoch, UTC.
    pub at: i64,
    /// The batch's good rows.
    pub rows: u64,
    #[serde(rename = "column_name")]
    pub column: String,
    pub null_rate: f64,
    #[serde(rename = "distinct_count")]
    pub distinct: u64,
}

impl MetaTable for ColumnStatsRow {
    const NAME: &'static str = "batch_stats";
    const OPERATION: &'static str = "ingest.stats";
    const DESCRIPTION: &'static str = "per-batch column statistics for the ingest anomaly checks";

    fn fields() -> Vec<FieldRef> {
        vec![
            column("source", DataType::Utf8),
            column("batch_id", DataType::Utf8),
            column("at", utc_micros()),
            column("rows", DataType::UInt64),
            column("column_name", DataType::Utf8),
            column("null_rate", DataType::Float64),
            column("distinct_count", DataType::UInt64),
        ]
    }
}

/// Every row of `source`, in the table's order.
pub async fn read(catalog: &Catalog, source: &str) -> Result<Vec<ColumnStatsRow>> {
    Ok(super::read::<ColumnStatsRow>(catalog)
        .await?
        .into_iter()
        .filter(|r| r.source == source)
        .collect())
}

/// Record one batch's rows in one commit.
pub async fn record(lake: &Storage, batch_id: &str, rows: &[ColumnStatsRow]) -> Result<()> {
    super::append(lake, rows, &[("silt.batch_id", batch_id)]).await
}
