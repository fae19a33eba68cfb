//! `_silt/runs`: one row per model per run with its metrics and the table version it left
//! (DESIGN.md §3). Written once at the end of a run that built or failed something; a run that
//! found everything up to date writes nothing. It must not build models.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
    UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

use crate::catalog::{Catalog, TableRef};
use crate::commit::append_record;
use crate::error::Result;
use crate::materialize::ModelMetrics;

pub fn table() -> TableRef {
    TableRef::new(crate::catalog::Layer::Silt, "runs")
}

const U64_COLS: [&str; 13] = [
    "rows_inserted",
    "rows_updated",
    "rows_deleted",
    "rows_copied",
    "files_scanned",
    "files_skipped",
    "files_added",
    "files_removed",
    "bytes_added",
    "bytes_removed",
    "ms",
    "ingested_rows",
    "quarantined_rows",
];

fn schema() -> Arc<Schema> {
    let mut f = vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new(
            "started_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("model", DataType::Utf8, false),
        Field::new("table_name", DataType::Utf8, false),
        Field::new("materialized", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("mode", DataType::Utf8, false),
    ];
    f.extend(
        U64_COLS
            .iter()
            .map(|c| Field::new(*c, DataType::UInt64, false)),
    );
    f.extend([
        Field::new("version", DataType::Int64, true),
        Field::new("upstream_versions", DataType::Utf8, false),
        Field::new("partitions", DataType::Utf8, false),
        Field::new("message", DataType::Utf8, true),
        Field::new("lake_versions", DataType::Utf8, false),
        Field::new("ok", DataType::Boolean, false),
    ]);
    Arc::new(Schema::new(f))
}

/// Record a run's model metrics (plus ingest totals on a pseudo-model row `ingest`).
pub async fn record(
    catalog: &Catalog,
    run_id: &str,
    started_at: i64,
    rows: &[ModelMetrics],
    ingested: (u64, u64),
) -> Result<()> {
    // Every table's version as the run leaves it: `silt query --as-of-run` reads this.
    let mut versions = std::collections::BTreeMap::new();
    for t in catalog.list().await? {
        if t == table() {
            continue;
        }
        if let Some(tb) = catalog.open(&t).await? {
            versions.insert(t.to_string(), tb.version().unwrap_or(0));
        }
    }
    let lake_versions = serde_json::to_string(&versions).unwrap_or_default();
    let lake_versions = lake_versions.as_str();
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let s = |f: &dyn Fn(&ModelMetrics) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            run_id, n,
        ))),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(std::iter::repeat_n(started_at, n))
                .with_timezone("UTC"),
        ),
        s(&|m| m.model.clone()),
        s(&|m| m.table.clone()),
        s(&|m| m.materialized.clone()),
        s(&|m| m.status.clone()),
        s(&|m| m.mode.clone()),
    ];
    let get = |m: &ModelMetrics, c: &str| -> u64 {
        match c {
            "rows_inserted" => m.rows_inserted,
            "rows_updated" => m.rows_updated,
            "rows_deleted" => m.rows_deleted,
            "rows_copied" => m.rows_copied,
            "files_scanned" => m.files_scanned,
            "files_skipped" => m.files_skipped,
            "files_added" => m.files_added,
            "files_removed" => m.files_removed,
            "bytes_added" => m.bytes_added,
            "bytes_removed" => m.bytes_removed,
            "ms" => m.ms,
            "failing_rows" => m.failing_rows,
            "ingested_rows" if m.model == "ingest" => ingested.0,
            "quarantined_rows" if m.model == "ingest" => ingested.1,
            _ => 0,
        }
    };
    for c in U64_COLS {
        cols.push(Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|m| get(m, c)),
        )));
    }
    cols.push(Arc::new(Int64Array::from_iter(
        rows.iter().map(|m| m.version.map(|v| v as i64)),
    )));
    cols.push(s(&|m| {
        serde_json::to_string(&m.upstream).unwrap_or_default()
    }));
    cols.push(s(&|m| m.partitions.join(",")));
    cols.push(Arc::new(StringArray::from_iter(
        rows.iter().map(|m| m.message.clone()),
    )));
    cols.push(Arc::new(StringArray::from_iter_values(
        std::iter::repeat_n(lake_versions, n),
    )));
    cols.push(Arc::new(BooleanArray::from_iter(
        rows.iter()
            .map(|m| Some(m.status != "failed" && m.status != "fail")),
    )));
    let batch = RecordBatch::try_new(schema(), cols)?;
    append_record(
        catalog.lake(),
        &table(),
        batch,
        &[("silt.operation", "run"), ("silt.run_id", run_id)],
        "silt run log: one row per model per run",
    )
    .await?;
    Ok(())
}
