//! The ingest ledger, `_silt.ledger`: one row per landing file silt has seen (ingested, empty,
//! duplicate or skipped), keyed by path and content hash. It is written last in each ingest
//! step, so a file is in the ledger only once its rows are in bronze and quarantine.
//! It must not parse files or write bronze.

use std::sync::Arc;

use arrow::array::{
    Array, AsArray, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, TimeUnit, TimestampMicrosecondType};

use crate::error::Result;
use crate::lake::catalog::{Catalog, TableRef};
use crate::lake::commit::append_record;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LedgerEntry {
    pub source: String,
    pub path: String,
    pub size: i64,
    pub e_tag: Option<String>,
    pub sha256: String,
    /// ingested | empty | duplicate | skipped
    pub status: String,
    pub rows: i64,
    pub quarantined: i64,
    pub batch_id: String,
    pub ingested_at: i64,
    pub detail: Option<String>,
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("path", DataType::Utf8, false),
        Field::new("size", DataType::Int64, false),
        Field::new("e_tag", DataType::Utf8, true),
        Field::new("sha256", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("rows", DataType::Int64, false),
        Field::new("quarantined", DataType::Int64, false),
        Field::new("batch_id", DataType::Utf8, false),
        Field::new(
            "ingested_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("detail", DataType::Utf8, true),
    ]))
}

/// All ledger entries of `source`, oldest first.
pub async fn read(catalog: &Catalog, source: &str) -> Result<Vec<LedgerEntry>> {
    let mut out = Vec::new();
    for b in catalog.read_small(&TableRef::ledger()).await? {
        // Cast rather than downcast: the engine may hand strings back as Utf8View.
        let s = |name: &str| {
            b.column_by_name(name)
                .and_then(|c| arrow::compute::cast(c, &DataType::Utf8).ok())
                .map(|c| c.as_string::<i32>().clone())
        };
        let i = |name: &str| {
            b.column_by_name(name)
                .and_then(|c| arrow::compute::cast(c, &DataType::Int64).ok())
                .map(|c| c.as_primitive::<Int64Type>().clone())
        };
        let (
            Some(src),
            Some(path),
            Some(size),
            Some(etag),
            Some(sha),
            Some(status),
            Some(rows),
            Some(q),
            Some(batch),
            Some(detail),
        ) = (
            s("source"),
            s("path"),
            i("size"),
            s("e_tag"),
            s("sha256"),
            s("status"),
            i("rows"),
            i("quarantined"),
            s("batch_id"),
            s("detail"),
        )
        else {
            continue;
        };
        let at = b
            .column_by_name("ingested_at")
            .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>().cloned());
        for r in 0..b.num_rows() {
            if src.value(r) != source {
                continue;
            }
            out.push(LedgerEntry {
                source: src.value(r).to_string(),
                path: path.value(r).to_string(),
                size: size.value(r),
                e_tag: (!etag.is_null(r)).then(|| etag.value(r).to_string()),
                sha256: sha.value(r).to_string(),
                status: status.value(r).to_string(),
                rows: rows.value(r),
                quarantined: q.value(r),
                batch_id: batch.value(r).to_string(),
                ingested_at: at.as_ref().map(|a| a.value(r)).unwrap_or(0),
                detail: (!detail.is_null(r)).then(|| detail.value(r).to_string()),
            });
        }
    }
    out.sort_by_key(|e| e.ingested_at);
    Ok(out)
}

/// Record `entries` in one commit.
pub async fn record(catalog: &Catalog, entries: &[LedgerEntry], batch_id: &str) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let col_s = |f: &dyn Fn(&LedgerEntry) -> String| -> Arc<dyn Array> {
        Arc::new(StringArray::from_iter_values(entries.iter().map(f)))
    };
    let col_o = |f: &dyn Fn(&LedgerEntry) -> Option<String>| -> Arc<dyn Array> {
        Arc::new(StringArray::from_iter(entries.iter().map(f)))
    };
    let col_i = |f: &dyn Fn(&LedgerEntry) -> i64| -> Arc<dyn Array> {
        Arc::new(Int64Array::from_iter_values(entries.iter().map(f)))
    };
    let batch = RecordBatch::try_new(
        schema(),
        vec![
            col_s(&|e| e.source.clone()),
            col_s(&|e| e.path.clone()),
            col_i(&|e| e.size),
            col_o(&|e| e.e_tag.clone()),
            col_s(&|e| e.sha256.clone()),
            col_s(&|e| e.status.clone()),
            col_i(&|e| e.rows),
            col_i(&|e| e.quarantined),
            col_s(&|e| e.batch_id.clone()),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(entries.iter().map(|e| e.ingested_at))
                    .with_timezone("UTC"),
            ),
            col_o(&|e| e.detail.clone()),
        ],
    )?;
    append_record(
        catalog.lake(),
        &TableRef::ledger(),
        batch,
        &[
            ("silt.operation", "ingest.ledger"),
            ("silt.batch_id", batch_id),
        ],
        "silt ingest ledger: one row per landing file seen",
    )
    .await?;
    Ok(())
}
