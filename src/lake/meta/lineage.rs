//! `_silt.lineage`: each table's column lineage as it was when a run planned it, one row per
//! table each time its lineage changed, so `silt lineage --run ID` and `--changed` can look at
//! an older state. It must not compute or interpret lineage (build/lineage.rs does: rows hold
//! its JSON).

use std::collections::BTreeMap;

use arrow::datatypes::{DataType, FieldRef};
use serde::{Deserialize, Serialize};

use super::{MetaTable, column, utc_micros};
use crate::error::Result;
use crate::lake::catalog::Catalog;

/// One table's lineage at one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineageRow {
    /// `layer.name`
    pub table_name: String,
    /// The hash of `lineage` ([`Lineage::model_hash`]).
    pub hash: String,
    /// The run that first planned this lineage.
    pub run_id: String,
    /// Microseconds since the epoch, UTC.
    pub at: i64,
    /// The table's [`TableLineage`], as JSON.
    pub lineage: String,
}

impl MetaTable for LineageRow {
    const NAME: &'static str = "lineage";
    const OPERATION: &'static str = "lineage";
    const DESCRIPTION: &'static str =
        "silt column lineage: each table's lineage whenever a run found it changed";

    fn fields() -> Vec<FieldRef> {
        vec![
            column("table_name", DataType::Utf8),
            column("hash", DataType::Utf8),
            column("run_id", DataType::Utf8),
            column("at", utc_micros()),
            column("lineage", DataType::Utf8),
        ]
    }
}

/// Per table, the newest row not after `at` (microseconds; `None`: the newest).
pub async fn as_of(catalog: &Catalog, at: Option<i64>) -> Result<Vec<LineageRow>> {
    let rows = super::read::<LineageRow>(catalog).await?;
    Ok(newest(
        rows.into_iter().filter(|r| at.is_none_or(|a| r.at <= a)),
    ))
}

/// Per table, the newest of `rows`.
fn newest(rows: impl Iterator<Item = LineageRow>) -> Vec<LineageRow> {
    let mut latest: BTreeMap<String, LineageRow> = BTreeMap::new();
    for r in rows {
        match latest.get(&r.table_name) {
            Some(x) if x.at > r.at => {}
            _ => {
                latest.insert(r.table_name.clone(), r);
            }
        }
    }
    latest.into_values().collect()
}

/// The rows as run `run_id` (started at `started_at`, microseconds) left them: per table, the
/// newest not after the rows that run stored, or, when it stored none, not after its start.
pub async fn as_of_run(
    catalog: &Catalog,
    run_id: &str,
    started_at: i64,
) -> Result<Vec<LineageRow>> {
    let rows = super::read::<LineageRow>(catalog).await?;
    let cutoff = rows
        .iter()
        .filter(|r| r.run_id == run_id)
        .map(|r| r.at)
        .max()
        .unwrap_or(started_at);
    Ok(newest(rows.into_iter().filter(|r| r.at <= cutoff)))
}

/// Store `(table, hash, lineage JSON)` for the tables whose hash differs from the newest
/// stored, labelled with the run. Returns how many were stored.
pub async fn record(
    catalog: &Catalog,
    run_id: &str,
    tables: Vec<(String, String, String)>,
) -> Result<usize> {
    let last: BTreeMap<String, String> = as_of(catalog, None)
        .await?
        .into_iter()
        .map(|r| (r.table_name, r.hash))
        .collect();
    let at = chrono::Utc::now().timestamp_micros();
    let rows: Vec<LineageRow> = tables
        .into_iter()
        .filter(|(t, h, _)| last.get(t) != Some(h))
        .map(|(table_name, hash, lineage)| LineageRow {
            table_name,
            hash,
            run_id: run_id.to_string(),
            at,
            lineage,
        })
        .collect();
    super::append(catalog.lake(), &rows, &[("silt.run_id", run_id)]).await?;
    Ok(rows.len())
}
