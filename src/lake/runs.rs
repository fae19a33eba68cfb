//! `_silt/runs`: one row per model per run with its metrics and the table version it left
//!. Written once at the end of a run that built or failed something; a run that
//! found everything up to date writes nothing. It must not build models.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
    UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

use crate::error::Result;
use crate::lake::catalog::{Catalog, TableRef};
use crate::lake::commit::append_record;
use serde::{Deserialize, Serialize};

pub fn table() -> TableRef {
    TableRef::new(crate::lake::catalog::Layer::Silt, "runs")
}

/// What building one model did (one row of `_silt/runs`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModelMetrics {
    pub model: String,
    pub table: String,
    pub materialized: String,
    /// built | up_to_date | failed | skipped
    pub status: String,
    /// full | incremental | none
    pub mode: String,
    pub rows_inserted: u64,
    pub rows_updated: u64,
    pub rows_deleted: u64,
    pub rows_copied: u64,
    pub files_scanned: u64,
    pub files_skipped: u64,
    pub files_added: u64,
    pub files_removed: u64,
    pub bytes_added: u64,
    pub bytes_removed: u64,
    pub ms: u64,
    /// Tests: rows the test query returned.
    pub failing_rows: u64,
    pub version: Option<u64>,
    pub upstream: BTreeMap<String, u64>,
    /// Partitions written (partition_overwrite) or merged into (incremental).
    pub partitions: Vec<String>,
    /// Queries the build ran: 1, or one per chunk of partitions (a partition_overwrite build
    /// over more upstream rows than one chunk holds); 0 when nothing was built.
    pub chunks: u64,
    pub message: Option<String>,
    /// What the user should know about this build (why an incremental model was built in full).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The hash of the SQL and config it was built with (with `upstream`, its build state).
    #[serde(skip)]
    pub sql_hash: String,
    /// The data files this build added (for tests scoped to the rows it wrote).
    #[serde(skip)]
    pub added_files: Vec<String>,
}

/// Recorded in every model commit, atomically with the data: what the model was built from.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ModelState {
    pub upstream: BTreeMap<String, u64>,
    pub sql_hash: String,
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
        // Added later (nullable: older rows lack them).
        Field::new("command", DataType::Utf8, true),
        Field::new("seq", DataType::UInt32, true),
        Field::new("severity", DataType::Utf8, true),
        Field::new("failing_rows", DataType::UInt64, true),
    ]);
    Arc::new(Schema::new(f))
}

/// One row of the run log, as [`record`] takes it: a model's metrics, or a test's result
/// (`materialized = "test"`, with its severity and failing rows).
#[derive(Debug, Clone, Default)]
pub struct RunRow {
    pub metrics: ModelMetrics,
    pub severity: Option<String>,
}

/// Record a run's rows, in the order they ran (plus ingest totals on a pseudo-model row
/// `ingest`). `command`: run, build, test or forget.
pub async fn record(
    catalog: &Catalog,
    run_id: &str,
    command: &str,
    started_at: i64,
    rows: &[RunRow],
    ingested: (u64, u64),
) -> Result<()> {
    let severities: Vec<Option<String>> = rows.iter().map(|r| r.severity.clone()).collect();
    let rows: Vec<ModelMetrics> = rows.iter().map(|r| r.metrics.clone()).collect();
    let rows = rows.as_slice();
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
    cols.push(Arc::new(StringArray::from_iter_values(
        std::iter::repeat_n(command, n),
    )));
    cols.push(Arc::new(arrow::array::UInt32Array::from_iter_values(
        0..n as u32,
    )));
    cols.push(Arc::new(StringArray::from_iter(severities)));
    cols.push(Arc::new(UInt64Array::from_iter(
        rows.iter()
            .map(|m| (m.materialized == "test").then_some(m.failing_rows)),
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

/// `silt runs`: the last `limit` runs, one line each, newest first: when, what, how it ended,
/// what it built and tested, and the first error.
pub async fn list(catalog: &Catalog, limit: usize) -> Result<Vec<RecordBatch>> {
    if catalog.open(&table()).await?.is_none() {
        return Ok(Vec::new());
    }
    let cols = columns(catalog).await?;
    let command = if cols.contains("command") {
        "max(coalesce(command, ''))"
    } else {
        "''"
    };
    let sql = format!(
        "select run_id, min(started_at) as started_at, {command} as command, \
         case when bool_or(status = 'failed') then 'failed' \
              when bool_or(status = 'fail') then 'tests failed' \
              when bool_or(status = 'warn') then 'ok (warnings)' else 'ok' end as status, \
         sum(case when materialized not in ('test', 'ingest') and status = 'built' then 1 else 0 end) as built, \
         sum(case when status = 'failed' then 1 else 0 end) as failed, \
         sum(case when status = 'skipped' then 1 else 0 end) as skipped, \
         sum(case when materialized = 'test' then 1 else 0 end) as tests, \
         sum(case when materialized = 'test' and status in ('fail', 'warn') then 1 else 0 end) as tests_failing, \
         sum(case when materialized <> 'test' then rows_inserted + rows_updated + rows_deleted else 0 end) as rows_written, \
         sum(case when materialized <> 'test' then ms else 0 end) as ms, \
         max(case when status = 'failed' then model || ': ' || coalesce(message, '') end) as error \
         from _silt.runs group by run_id order by started_at desc limit {limit}"
    );
    catalog.sql(&sql).await
}

/// `silt runs --run <id>`: every row of one run in the order it ran, tests with their
/// severity and failing rows, failed models with their error.
pub async fn detail(catalog: &Catalog, run_id: &str) -> Result<Vec<RecordBatch>> {
    if catalog.open(&table()).await?.is_none() {
        return Err(crate::error::Error::Usage(
            "no run has been recorded yet".into(),
        ));
    }
    let cols = columns(catalog).await?;
    let opt = |c: &str, alias: &str| {
        if cols.contains(c) {
            format!("{c} as {alias}")
        } else {
            format!("null as {alias}")
        }
    };
    let id = crate::lake::sql_text::literal(run_id);
    let order = if cols.contains("seq") {
        "seq, model"
    } else {
        "model"
    };
    let sql = format!(
        "select model, materialized as kind, status, \
         mode, {sev}, {fail}, \
         rows_inserted as ins, rows_updated as upd, rows_deleted as del, \
         files_added as files_added, files_removed as files_removed, ms, version, message \
         from _silt.runs where run_id = {id} order by {order}",
        sev = opt("severity", "severity"),
        fail = opt("failing_rows", "failing_rows"),
    );
    let b = catalog.sql(&sql).await?;
    if b.iter().all(|b| b.num_rows() == 0) {
        return Err(crate::error::Error::Usage(format!(
            "no run '{run_id}' in _silt.runs (see `silt runs`)"
        )));
    }
    Ok(b)
}

async fn columns(catalog: &Catalog) -> Result<std::collections::BTreeSet<String>> {
    let Some(t) = catalog.open(&table()).await? else {
        return Ok(Default::default());
    };
    Ok(t.snapshot()
        .map_err(|e| crate::error::Error::delta(table().to_string(), e))?
        .snapshot()
        .arrow_schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect())
}

/// Where the build state of a model's last tested build is kept: one small object per model
/// (read once per run for each up-to-date model with tests; a run log scan would grow with
/// history).
fn tested_path(t: &TableRef) -> String {
    format!("_silt/tested/{t}.json")
}

/// The build state of `t`'s last build whose tests ran, if any.
pub async fn last_tested(
    lake: &crate::lake::storage::Storage,
    t: &TableRef,
) -> Result<Option<ModelState>> {
    let p = lake.path(&tested_path(t));
    if !lake.exists(&p).await? {
        return Ok(None);
    }
    Ok(serde_json::from_slice(&lake.get(&p).await?).ok())
}

/// Record that the tests of `t`'s build with `state` ran (whatever they found).
pub async fn mark_tested(
    lake: &crate::lake::storage::Storage,
    t: &TableRef,
    state: &ModelState,
) -> Result<()> {
    let body = serde_json::to_vec(state).unwrap_or_default();
    lake.put(&lake.path(&tested_path(t)), body.into()).await
}
