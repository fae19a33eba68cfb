//! `silt query`: SQL over every table of the lake through DataFusion, with `VERSION AS OF` /
//! `TIMESTAMP AS OF` (time_travel.rs) and `--as-of-run`. It must not write tables and must not
//! format output (render.rs does).

use std::collections::BTreeMap;

use arrow::record_batch::RecordBatch;

use crate::error::{Error, Result};
use crate::lake::catalog::Catalog;

/// Run one SQL statement and collect its result.
pub async fn run(catalog: &Catalog, sql: &str) -> Result<Vec<RecordBatch>> {
    run_pinned(catalog, sql, BTreeMap::new()).await
}

/// Run one SQL statement with tables pinned to versions (`layer.name` → version).
pub async fn run_pinned(
    catalog: &Catalog,
    sql: &str,
    pins: BTreeMap<String, u64>,
) -> Result<Vec<RecordBatch>> {
    for (t, v) in &pins {
        if let Ok(t) = crate::lake::catalog::TableRef::parse(t)
            && let Some(e) = crate::lake::meta::erasures::purged_by(catalog, &t, *v).await?
        {
            return Err(e);
        }
    }
    let ctx = catalog.session_pinned(pins).await?;
    let df = crate::lake::time_travel::sql(&ctx, catalog, sql).await?;
    // A result without rows still carries its columns (an empty table prints its header).
    let schema = std::sync::Arc::new(df.schema().as_arrow().clone());
    let mut batches = df.collect().await.map_err(Error::from_datafusion)?;
    if batches.is_empty() {
        batches.push(RecordBatch::new_empty(schema));
    }
    Ok(batches)
}

/// The table versions a run left (`silt query --as-of-run`).
pub async fn run_versions(catalog: &Catalog, run_id: &str) -> Result<BTreeMap<String, u64>> {
    let id = crate::lake::sql_text::literal(run_id);
    let batches = run(
        catalog,
        &format!("select lake_versions from _silt.runs where run_id = {id} limit 1"),
    )
    .await?;
    let text = crate::render::render(&batches, crate::render::OutputFormat::Json)?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let s = v
        .get(0)
        .and_then(|r| r.get("lake_versions"))
        .and_then(|s| s.as_str())
        .ok_or_else(|| {
            Error::Usage(format!("no run '{run_id}' in _silt.runs (see `silt runs`)"))
        })?;
    serde_json::from_str(s)
        .map_err(|e| Error::Internal(format!("run {run_id}: bad lake_versions: {e}")))
}
