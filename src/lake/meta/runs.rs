//! `_silt.runs`: one row per model and per test of each run, with its metrics and the table
//! version it left, and every table's version as the run left it (`silt query --as-of-run`).
//! Written once at the end of a run that built, failed or tested something; a run that found
//! everything up to date writes nothing. Also the types a build reports in ([`ModelMetrics`],
//! [`ModelState`]) and the marker of a build whose tests ran. It must not build models.

use std::collections::BTreeMap;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, FieldRef};
use serde::{Deserialize, Serialize};

use super::{MetaTable, column, nullable, utc_micros};
use crate::error::Result;
use crate::lake::catalog::{Catalog, TableRef};
use crate::lake::storage::Storage;

/// `_silt.runs`.
pub fn table() -> TableRef {
    RunRecord::table()
}

/// What a run did with a model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, strum::Display)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum ModelStatus {
    /// Written: a new version of its table.
    Built,
    /// Its upstream versions and SQL are those of its last build: nothing to do.
    #[default]
    UpToDate,
    /// Its build failed; its table is as it was.
    Failed,
    /// Not built: an upstream failed or its source's tests did.
    Skipped,
}

/// How a build computed its rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, strum::Display)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum BuildMode {
    /// From all upstream rows.
    Full,
    /// From the upstream rows that changed since its last build.
    Incremental,
    /// Changed where it stands (an erasure deleting a subject's rows from a history).
    #[serde(rename = "in place")]
    #[strum(serialize = "in place")]
    InPlace,
    /// Not built.
    #[default]
    None,
}

/// What a build wrote: rows (a MERGE's own counts, or the rows of the files it added), and
/// files and bytes added, removed and scanned.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BuildCounts {
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
}

/// What building one model did (a row of `_silt.runs`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModelMetrics {
    pub model: String,
    pub table: String,
    pub materialized: String,
    pub status: ModelStatus,
    pub mode: BuildMode,
    #[serde(flatten)]
    pub counts: BuildCounts,
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

/// One row of the run log: a model's build, a test's result (`materialized = "test"`, with
/// its severity and failing rows) or the run's ingest (`model = "ingest"`). [`record`] fills
/// in the run's id, start, command, order and the lake's versions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: String,
    /// Microseconds since the epoch, UTC.
    pub started_at: i64,
    pub model: String,
    pub table_name: String,
    pub materialized: String,
    /// A model's [`ModelStatus`], or a test's pass | warn | fail.
    pub status: String,
    /// A model's [`BuildMode`], or a test's scope (table | written).
    pub mode: String,
    #[serde(flatten)]
    pub counts: BuildCounts,
    pub ms: u64,
    pub ingested_rows: u64,
    pub quarantined_rows: u64,
    pub version: Option<i64>,
    /// The upstream versions it was built from (JSON).
    pub upstream_versions: String,
    /// Comma-separated.
    pub partitions: String,
    pub message: Option<String>,
    /// Every table's version as the run left it (JSON).
    pub lake_versions: String,
    pub ok: bool,
    // Added later (nullable: older rows lack them).
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub seq: Option<u32>,
    #[serde(default)]
    pub severity: Option<String>,
    #[serde(default)]
    pub failing_rows: Option<u64>,
}

impl MetaTable for RunRecord {
    const NAME: &'static str = "runs";
    const OPERATION: &'static str = "run";
    const DESCRIPTION: &'static str = "silt run log: one row per model per run";

    fn fields() -> Vec<FieldRef> {
        let mut f = vec![
            column("run_id", DataType::Utf8),
            column("started_at", utc_micros()),
            column("model", DataType::Utf8),
            column("table_name", DataType::Utf8),
            column("materialized", DataType::Utf8),
            column("status", DataType::Utf8),
            column("mode", DataType::Utf8),
        ];
        f.extend(
            [
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
            ]
            .map(|c| column(c, DataType::UInt64)),
        );
        f.extend([
            nullable("version", DataType::Int64),
            column("upstream_versions", DataType::Utf8),
            column("partitions", DataType::Utf8),
            nullable("message", DataType::Utf8),
            column("lake_versions", DataType::Utf8),
            column("ok", DataType::Boolean),
            nullable("command", DataType::Utf8),
            nullable("seq", DataType::UInt32),
            nullable("severity", DataType::Utf8),
            nullable("failing_rows", DataType::UInt64),
        ]);
        f
    }
}

impl From<&ModelMetrics> for RunRecord {
    fn from(m: &ModelMetrics) -> Self {
        RunRecord {
            model: m.model.clone(),
            table_name: m.table.clone(),
            materialized: m.materialized.clone(),
            status: m.status.to_string(),
            mode: m.mode.to_string(),
            counts: m.counts.clone(),
            ms: m.ms,
            version: m.version.map(|v| v as i64),
            upstream_versions: serde_json::to_string(&m.upstream).unwrap_or_default(),
            partitions: m.partitions.join(","),
            message: m.message.clone(),
            ok: m.status != ModelStatus::Failed,
            ..Default::default()
        }
    }
}

/// Record a run's rows, in the order they ran, in one commit. `command`: run, build, test or
/// forget.
pub async fn record(
    catalog: &Catalog,
    run_id: &str,
    command: &str,
    started_at: i64,
    mut rows: Vec<RunRecord>,
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    // Every table's version as the run leaves it: `silt query --as-of-run` reads this.
    let mut versions = BTreeMap::new();
    for t in catalog.list().await? {
        if t == table() {
            continue;
        }
        if let Some(tb) = catalog.open(&t).await? {
            versions.insert(t.to_string(), tb.version().unwrap_or(0));
        }
    }
    let lake_versions = serde_json::to_string(&versions).unwrap_or_default();
    for (seq, r) in rows.iter_mut().enumerate() {
        r.run_id = run_id.to_string();
        r.started_at = started_at;
        r.lake_versions = lake_versions.clone();
        r.command = Some(command.to_string());
        r.seq = Some(seq as u32);
    }
    super::append(catalog.lake(), &rows, &[("silt.run_id", run_id)]).await
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
pub async fn last_tested(lake: &Storage, t: &TableRef) -> Result<Option<ModelState>> {
    let p = lake.path(&tested_path(t));
    if !lake.exists(&p).await? {
        return Ok(None);
    }
    Ok(serde_json::from_slice(&lake.get(&p).await?).ok())
}

/// Record that the tests of `t`'s build with `state` ran (whatever they found).
pub async fn mark_tested(lake: &Storage, t: &TableRef, state: &ModelState) -> Result<()> {
    let body = serde_json::to_vec(state).unwrap_or_default();
    lake.put(&lake.path(&tested_path(t)), body.into()).await
}
