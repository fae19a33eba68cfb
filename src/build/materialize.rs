//! Building one model: decide between skip, full rebuild and incremental work from the state
//! recorded in the target's last silt commit, render the SQL with the right relations, run it in
//! DataFusion and write the result by the model's materialization (table, incremental MERGE,
//! partition_overwrite, append, snapshot/SCD2). It returns metrics; it must not decide build
//! order (pipeline.rs does) nor render templates itself (models.rs does).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::DataType;
use datafusion::catalog::MemorySchemaProvider;
use datafusion::common::ScalarValue;
use datafusion::prelude::{DataFrame, SessionContext, cast, col, ident, lit};
use deltalake::DeltaTable;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::write::SchemaMode;
use deltalake::protocol::SaveMode;
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use crate::build::models::{Dag, Materialized, Model, OnSchemaChange, RenderContext};
use crate::error::{Error, Result};
use crate::lake::catalog::{Catalog, TableRef};
use crate::lake::sql_text::{ident as q, literal, partition_in};

pub use crate::lake::catalog::NEW_SCHEMA;
pub use crate::lake::meta::runs::{BuildMode, ModelMetrics, ModelState, ModelStatus};

/// A MERGE's increment (the rows to write), and the rows to delete with it.
const MERGE_SRC: &str = "__silt_src";
const MERGE_STALE: &str = "__silt_stale";
/// The target's current partition (and recompute columns) of each key of the increment.
const MERGE_OLD: &str = "__silt_old";

/// The column of [`MERGE_OLD`] holding the target's current value of `c`.
fn old_of(c: &str) -> String {
    format!("__silt_old_{}", c.replace('"', ""))
}

/// `t.k = s.k AND …` over the unique key.
fn key_eq(keys: &[String]) -> String {
    keys.iter()
        .map(|k| format!("t.{c} = s.{c}", c = q(k)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// on_schema_change: whether the target gains columns (`in_target` says which it has); an
/// error naming them when the model does not allow it.
fn new_columns_allowed(
    m: &Model,
    t: &TableRef,
    cols: &[String],
    in_target: impl Fn(&str) -> bool,
) -> Result<bool> {
    let new_cols: Vec<&String> = cols.iter().filter(|c| !in_target(c.as_str())).collect();
    if new_cols.is_empty() {
        return Ok(false);
    }
    if m.config.on_schema_change == OnSchemaChange::AppendNewColumns {
        return Ok(true);
    }
    Err(Error::config(
        &m.file,
        format!(
            "the model's output gained column(s) {} that {t} does not have; set on_schema_change='append_new_columns' in its config, or rebuild with --full-refresh",
            new_cols
                .iter()
                .map(|c| format!("'{c}'"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// The rows a MERGE applies, tagged `upsert` or `delete` in `__silt_op`, and its predicate.
/// With partition_by, a key whose partition changed is deleted from its old partition (the
/// predicate matches by partition too, so files of other partitions are not read).
fn staged_sql(m: &Model, cols: &[String], stale: bool) -> (String, String) {
    let keys = &m.config.unique_key;
    let stale_union = if stale {
        format!(" union all select *, 'delete' as __silt_op from {MERGE_STALE}")
    } else {
        String::new()
    };
    let key_eq = key_eq(keys);
    let Some(p) = &m.config.partition_by else {
        return (
            format!("select s.*, 'upsert' as __silt_op from {MERGE_SRC} s{stale_union}"),
            key_eq,
        );
    };
    let select_old = cols
        .iter()
        .map(|c| {
            if c == p {
                format!("o.{} as {}", q(&old_of(c)), q(c))
            } else {
                format!("s.{}", q(c))
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let key_old = keys
        .iter()
        .map(|k| format!("o.{c} = s.{c}", c = q(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    (
        format!(
            "select s.*, 'upsert' as __silt_op from {MERGE_SRC} s              union all              select distinct {select_old}, 'delete' as __silt_op from {MERGE_SRC} s join {MERGE_OLD} o on {key_old}              where o.{po} is distinct from s.{pq}{stale_union}",
            pq = q(p),
            po = q(&old_of(p))
        ),
        format!("{key_eq} AND t.{pq} = s.{pq}", pq = q(p)),
    )
}

/// A MERGE's target restricted to the key range of its increment ([`Materializer::in_key_range`]).
const KEY_RANGE: &str = "__silt_in_range";

pub struct Materializer<'a> {
    pub catalog: &'a Catalog,
    pub dag: &'a Dag,
    pub ctx: &'a SessionContext,
    pub run_id: &'a str,
    pub full_refresh: bool,
    /// Column names declared PII by any source, and the sources' subject columns: model
    /// tables keep no statistics on them, so erased values cannot survive in the Delta log.
    pub pii: &'a BTreeSet<String>,
    /// `[gdpr] hmac_key`, for `pseudonymize` columns.
    pub hmac_key: Option<&'a str>,
    /// Upstream changes already worked out in this run (see [`Materializer::changes_of`]).
    pub changes: ChangeCache,
}

/// The values of a column on the rows that differ between two versions of a table, by
/// (table, from, to, column): models of one run that read the same upstream change share one
/// diff.
pub type ChangeCache = std::sync::Mutex<
    HashMap<(String, u64, u64, String), Arc<dyn datafusion::catalog::TableProvider>>,
>;

/// What [`Materializer::states`] finds.
struct Current {
    target: DeltaTable,
    state: Option<ModelState>,
    ups: Vec<TableRef>,
    up_tables: BTreeMap<String, DeltaTable>,
    new_state: ModelState,
}

/// Why an incremental build runs in full instead; `warn`: the user should be told (a version
/// it needs was vacuumed or purged), not just a choice of the cheaper way.
struct FullBuild {
    why: String,
    warn: bool,
}

impl FullBuild {
    fn info(why: String) -> Self {
        FullBuild { why, warn: false }
    }
    fn warn(why: String) -> Self {
        FullBuild { why, warn: true }
    }
}

/// A `recompute_by` build: the column, and the relation of its values to recompute.
struct Recompute {
    column: String,
    keys: String,
    /// How many values are recomputed, and the target's rows before the build.
    values: u64,
    target_rows: u64,
}

/// What an incremental build reads, or that (and why) it runs in full.
struct Increment {
    incremental: bool,
    /// Upstream table → the relation of its rows to read (new rows, or the partitions to redo).
    relations: BTreeMap<String, String>,
    /// partition_overwrite: the partition values that changed upstream.
    touched: BTreeSet<String>,
    recompute: Option<Recompute>,
    /// Why it runs in full, when there is more to say than "first build".
    fallback: Option<FullBuild>,
    /// Tables registered in the scratch schema for this build, dropped after it.
    registered: Vec<String>,
}

impl Increment {
    /// A full build.
    fn full(why: Option<FullBuild>) -> Self {
        Increment {
            incremental: false,
            relations: BTreeMap::new(),
            touched: BTreeSet::new(),
            recompute: None,
            fallback: why,
            registered: Vec::new(),
        }
    }
}

/// The partition columns of a table.
fn partition_columns(t: &DeltaTable) -> Vec<String> {
    t.snapshot()
        .map(|s| s.metadata().partition_columns().to_vec())
        .unwrap_or_default()
}

/// Count the files (and for a build that is not a MERGE, the rows) a build added and removed.
fn count_files(metrics: &mut ModelMetrics, before: &FileMap, after: &FileMap, merged: bool) {
    for (p, (size, rows, _)) in after {
        if !before.contains_key(p) {
            metrics.files_added += 1;
            metrics.bytes_added += size;
            metrics.added_files.push(p.clone());
            if !merged {
                metrics.rows_inserted += rows;
            }
        }
    }
    for (p, (size, _, _)) in before {
        if !after.contains_key(p) {
            metrics.files_removed += 1;
            metrics.bytes_removed += size;
        }
    }
}

/// Active files of a table: path → (size, rows, partition values).
type FileMap = HashMap<String, (u64, u64, HashMap<String, Option<String>>)>;

fn files_of(t: &DeltaTable) -> Result<FileMap> {
    if t.version().is_none() {
        return Ok(FileMap::new());
    }
    let state = t
        .snapshot()
        .map_err(|e| Error::delta(t.table_url().as_str(), e))?;
    Ok(state
        .log_data()
        .iter()
        .map(|f| {
            (
                f.path().to_string(),
                (
                    f.size().max(0) as u64,
                    f.num_records().unwrap_or(0) as u64,
                    f.partition_values_map(),
                ),
            )
        })
        .collect())
}

/// Parquet settings of model files: delta-rs's (Snappy), with row groups of at most 32k rows.
/// A partitioned write keeps one open file per partition; each holds its current row group
/// encoded in memory, so smaller row groups keep a many-partition write's memory flat.
fn writer_properties() -> parquet::file::properties::WriterProperties {
    parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .set_max_row_group_row_count(Some(32 * 1024))
        // As in bronze: high-cardinality columns fall back to plain encoding early.
        .set_dictionary_page_size_limit(64 * 1024)
        .build()
}

/// The silt state of the target's latest model commit.
pub async fn last_state(t: &DeltaTable) -> Result<Option<ModelState>> {
    if t.version().is_none() {
        return Ok(None);
    }
    let infos: Vec<_> = t
        .history(Some(50))
        .try_collect()
        .await
        .map_err(|e| Error::delta(t.table_url().as_str(), e))?;
    for i in infos {
        if let Some(v) = i.info.get("silt.state") {
            return Ok(serde_json::from_value(v.clone()).ok());
        }
    }
    Ok(None)
}

/// Upstream `u` filtered to the partitions of `column` with these values: the relation an
/// incremental partition_overwrite build, or one chunk of a chunked build, reads.
fn in_partitions<'v>(
    u: &str,
    column: &str,
    is_string: bool,
    values: impl IntoIterator<Item = &'v String>,
) -> String {
    let list = values
        .into_iter()
        .map(|v| literal(v))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "(select * from {u} where {})",
        partition_in(column, is_string, &list)
    )
}

/// The output column names of a planned query.
fn columns_of(df: &DataFrame) -> Vec<String> {
    df.schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect()
}

/// Whether `column` of `t` is a string column (see [`partition_in`]).
fn string_column(t: &DeltaTable, column: &str) -> bool {
    t.snapshot()
        .ok()
        .and_then(|s| {
            s.schema()
                .field(column)
                .map(|f| f.data_type() == &deltalake::kernel::DataType::STRING)
        })
        .unwrap_or(false)
}

fn sql_error(m: &Model, e: datafusion::error::DataFusionError) -> Error {
    match Error::from_datafusion(e) {
        Error::Sql(msg) => Error::config(&m.file, msg),
        other => other,
    }
}

impl Materializer<'_> {
    fn new_schema(&self) -> Result<Arc<dyn datafusion::catalog::SchemaProvider>> {
        let cat = self
            .ctx
            .catalog("datafusion")
            .ok_or_else(|| Error::Internal("no default catalog".into()))?;
        if let Some(s) = cat.schema(NEW_SCHEMA) {
            return Ok(s);
        }
        let s: Arc<dyn datafusion::catalog::SchemaProvider> = Arc::new(MemorySchemaProvider::new());
        cat.register_schema(NEW_SCHEMA, s.clone())?;
        Ok(s)
    }

    /// The model's target, the state its last build recorded, its upstream tables at their
    /// current versions and the state a build now would record.
    async fn states(&self, m: &Model) -> Result<Current> {
        let lake = self.catalog.lake();
        let target = lake.delta_table(&m.table().rel_path()).await?;
        let state = last_state(&target).await?;
        let mut ups: Vec<TableRef> = m.sources.iter().map(|s| TableRef::bronze(s)).collect();
        ups.extend(m.refs.iter().map(|r| self.dag.models[r].table()));
        let mut up_tables: BTreeMap<String, DeltaTable> = BTreeMap::new();
        let mut upstream = BTreeMap::new();
        for u in &ups {
            let ut = lake.delta_table(&u.rel_path()).await?;
            let Some(v) = ut.version() else {
                return Err(Error::MissingUpstream {
                    model: m.file.clone(),
                    upstream: u.to_string(),
                });
            };
            upstream.insert(u.to_string(), v);
            up_tables.insert(u.to_string(), ut);
        }
        let sql_hash = hex::encode(Sha256::digest(
            format!(
                "{}\0{}",
                m.template,
                serde_json::to_string(&m.config).unwrap_or_default()
            )
            .as_bytes(),
        ));
        Ok(Current {
            target,
            state,
            ups,
            up_tables,
            new_state: ModelState { upstream, sql_hash },
        })
    }

    /// Whether [`Materializer::build`] would find `m` up to date (its upstream versions and
    /// SQL are those of its last build). An upstream that does not exist yet counts as not.
    pub async fn up_to_date(&self, m: &Model) -> Result<bool> {
        if self.full_refresh {
            return Ok(false);
        }
        match self.states(m).await {
            Ok(c) => Ok(c.state.as_ref() == Some(&c.new_state)),
            Err(Error::MissingUpstream { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Build `m`. SQL and config errors come back as `Error::Config` naming the model file.
    pub async fn build(&self, m: &Model) -> Result<ModelMetrics> {
        let started = Instant::now();
        let t = m.table();
        let Current {
            target,
            state,
            ups,
            up_tables,
            new_state,
        } = self.states(m).await?;
        let mut metrics = ModelMetrics {
            model: m.name.clone(),
            table: t.to_string(),
            materialized: serde_json::to_value(m.config.materialized)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            upstream: new_state.upstream.clone(),
            sql_hash: new_state.sql_hash.clone(),
            ..Default::default()
        };
        if !self.full_refresh && state.as_ref() == Some(&new_state) {
            metrics.status = ModelStatus::UpToDate;
            metrics.mode = BuildMode::None;
            metrics.version = target.version();
            metrics.ms = started.elapsed().as_millis() as u64;
            return Ok(metrics);
        }
        // A changed model keeps building incrementally (as in dbt): `--full-refresh` applies new logic
        // to old rows, and on_schema_change governs new columns.
        let prev = state.filter(|_| !self.full_refresh);
        let before = if target.version().is_some() {
            files_of(&target)?
        } else {
            FileMap::new()
        };
        let mut inc = match &prev {
            Some(prev) if m.config.materialized != Materialized::Table => {
                let target_rows: u64 = before.values().map(|f| f.1).sum();
                self.increment(m, prev, &ups, &up_tables, target_rows)
                    .await?
            }
            _ => Increment::full(None),
        };
        if !inc.incremental {
            inc.relations.clear();
            inc.touched.clear();
            inc.recompute = None;
        }
        let incremental = inc.incremental;
        let chunks = if m.config.materialized == Materialized::PartitionOverwrite {
            self.partition_chunks(
                m,
                &up_tables,
                &inc.relations,
                incremental.then_some(&inc.touched),
            )?
        } else {
            None
        };
        let relations = chunks.unwrap_or_else(|| vec![std::mem::take(&mut inc.relations)]);
        metrics.chunks = relations.len() as u64;
        tracing::debug!(model = %m.name, ms = started.elapsed().as_millis() as u64, "planned");
        let result = self
            .write(
                m,
                &t,
                target,
                incremental,
                relations,
                &inc.touched,
                inc.recompute.as_ref(),
                &new_state,
                &mut metrics,
            )
            .await;
        let new_schema = self.new_schema()?;
        for name in &inc.registered {
            let _ = new_schema.deregister_table(name);
        }
        let target = result?;
        // Rows written: from the new files, except where a MERGE reported its own counts.
        let merged = incremental
            && matches!(
                m.config.materialized,
                Materialized::Incremental | Materialized::Snapshot
            );
        count_files(&mut metrics, &before, &files_of(&target)?, merged);
        metrics.partitions = std::mem::take(&mut inc.touched).into_iter().collect();
        if let Some(f) = inc.fallback.filter(|_| !incremental) {
            tracing::info!(model = %m.name, "{}", f.why);
            metrics.message = Some(f.why.clone());
            if f.warn {
                metrics.warnings.push(f.why);
            }
        }
        metrics.status = ModelStatus::Built;
        metrics.mode = if incremental {
            BuildMode::Incremental
        } else {
            BuildMode::Full
        };
        metrics.version = target.version();
        metrics.ms = started.elapsed().as_millis() as u64;
        Ok(metrics)
    }

    /// What an incremental build of `m` reads, from what changed upstream since `prev`; or
    /// why it runs in full instead.
    async fn increment(
        &self,
        m: &Model,
        prev: &ModelState,
        ups: &[TableRef],
        up_tables: &BTreeMap<String, DeltaTable>,
        target_rows: u64,
    ) -> Result<Increment> {
        let mut inc = Increment::full(None);
        inc.incremental = true;
        if let Some(column) = &m.config.recompute_by {
            match self
                .recompute_plan(
                    m,
                    column,
                    ups,
                    up_tables,
                    prev,
                    target_rows,
                    &mut inc.registered,
                )
                .await?
            {
                Ok((rels, keys, values)) => {
                    inc.relations = rels;
                    inc.recompute = Some(Recompute {
                        column: column.clone(),
                        keys,
                        values,
                        target_rows,
                    });
                }
                Err(why) => {
                    inc.incremental = false;
                    inc.fallback = Some(why);
                }
            }
            return Ok(inc);
        }
        for u in ups {
            let Some(pv) = prev.upstream.get(&u.to_string()).copied() else {
                inc.incremental = false;
                break;
            };
            if !self
                .upstream_change(m, u, &up_tables[&u.to_string()], pv, &mut inc)
                .await?
            {
                inc.incremental = false;
                break;
            }
        }
        if m.config.materialized == Materialized::PartitionOverwrite && inc.incremental {
            if inc.touched.is_empty() {
                inc.incremental = false;
            } else {
                let pcol = m.config.partition_by.clone().unwrap_or_default();
                for u in ups {
                    let ut = &up_tables[&u.to_string()];
                    if partition_columns(ut).contains(&pcol) {
                        let string = string_column(ut, &pcol);
                        inc.relations.insert(
                            u.to_string(),
                            in_partitions(&u.to_string(), &pcol, string, &inc.touched),
                        );
                    }
                }
            }
        }
        Ok(inc)
    }

    /// What changed in upstream `u` since version `pv`, added to `inc`: the relation of its new
    /// rows, or (partition_overwrite) the partition values its changed files hold. False: the
    /// change cannot be read incrementally (why, in `inc.fallback` when the user should know).
    async fn upstream_change(
        &self,
        m: &Model,
        u: &TableRef,
        ut: &DeltaTable,
        pv: u64,
        inc: &mut Increment,
    ) -> Result<bool> {
        let key = u.to_string();
        let new_schema = self.new_schema()?;
        if Some(pv) == ut.version() {
            if m.config.materialized != Materialized::PartitionOverwrite {
                // Nothing new upstream: an empty selection.
                let p = ut
                    .table_provider()
                    .with_file_selection(crate::lake::storage::select_files(Vec::<String>::new()))
                    .await?;
                let name = format!("{}__{}", u.layer.schema_name(), u.name);
                new_schema.register_table(name.clone(), p)?;
                inc.registered.push(name.clone());
                inc.relations.insert(key, format!("{NEW_SCHEMA}.{name}"));
            }
            return Ok(true);
        }
        // The version last read may be gone (an erasure purged it): rebuild in full.
        let then = match self.catalog.lake().delta_table_at(&u.rel_path(), pv).await {
            Ok(t) => t,
            Err(e) => {
                inc.fallback = Some(FullBuild::warn(format!(
                    "upstream {u} version {pv}, which the last build read, is not readable ({e}); built in full"
                )));
                return Ok(false);
            }
        };
        let (now_files, then_files) = (files_of(ut)?, files_of(&then)?);
        let added: Vec<&String> = now_files
            .keys()
            .filter(|p| !then_files.contains_key(*p))
            .collect();
        let removed: Vec<&String> = then_files
            .keys()
            .filter(|p| !now_files.contains_key(*p))
            .collect();
        if m.config.materialized == Materialized::PartitionOverwrite {
            let pcol = m.config.partition_by.clone().unwrap_or_default();
            if !partition_columns(ut).contains(&pcol) {
                return Ok(false); // cannot tell which partitions changed
            }
            for p in added
                .iter()
                .map(|p| &now_files[*p])
                .chain(removed.iter().map(|p| &then_files[*p]))
            {
                if let Some(Some(v)) = p.2.get(&pcol) {
                    inc.touched.insert(v.clone());
                }
            }
            return Ok(true);
        }
        let p = ut
            .table_provider()
            .with_file_selection(crate::lake::storage::select_files(
                added.iter().map(|s| s.to_string()),
            ))
            .await?;
        let name = format!("{}__{}", u.layer.schema_name(), u.name);
        new_schema.register_table(name.clone(), p)?;
        inc.registered.push(name.clone());
        let mut rel = format!("{NEW_SCHEMA}.{name}");
        // Files were removed too (a compaction, an erasure, a replaced file): the rows they
        // held and the added files hold again are not new.
        if !removed.is_empty() {
            match self
                .without_removed(u, ut, &then, &removed, &then_files, &rel, &name)
                .await?
            {
                Ok((r, n)) => {
                    rel = r;
                    inc.registered.push(n);
                }
                Err(why) => {
                    inc.fallback = Some(why);
                    return Ok(false);
                }
            }
        }
        let old: Vec<String> = now_files
            .keys()
            .filter(|p| !added.contains(p))
            .cloned()
            .collect();
        let rel = self.with_lookback(m, ut, rel, &name, old, inc).await?;
        inc.relations.insert(key, rel);
        Ok(true)
    }

    /// Lookback: the upstream rows dated up to N days before the earliest new row come along
    /// with the new rows `rel`, as context for the model's window functions. Context rows come
    /// from the files that are not new (`old`), so a plain UNION ALL holds no row twice (a
    /// UNION would deduplicate every row through a wide hash aggregate).
    async fn with_lookback(
        &self,
        m: &Model,
        ut: &DeltaTable,
        rel: String,
        name: &str,
        old: Vec<String>,
        inc: &mut Increment,
    ) -> Result<String> {
        let (Some(days), Some(lcol)) = (m.config.lookback_days, &m.config.lookback_column) else {
            return Ok(rel);
        };
        let has_col = ut
            .snapshot()
            .map(|s| s.schema().field(lcol).is_some())
            .unwrap_or(false);
        if !has_col {
            return Ok(rel);
        }
        let Some(start) = self
            .scalar(&format!(
                "select cast(min({}) as varchar) from {rel}",
                q(lcol)
            ))
            .await?
        else {
            return Ok(rel);
        };
        let cp = ut
            .table_provider()
            .with_file_selection(crate::lake::storage::select_files(old))
            .await?;
        let ctx_name = format!("{name}__context");
        self.new_schema()?.register_table(ctx_name.clone(), cp)?;
        inc.registered.push(ctx_name.clone());
        Ok(format!(
            "(select * from {rel} union all select * from {NEW_SCHEMA}.{ctx_name} where {c} >= cast('{start}' as date) - interval '{days} days')",
            c = q(lcol)
        ))
    }

    /// Register the files an incremental build of `m` wrote as one relation, for tests that
    /// check only those rows (`silt run`); `None` when the build was not incremental. Drop it
    /// with [`Materializer::forget_written`].
    pub async fn register_written(
        &self,
        m: &Model,
        metrics: &ModelMetrics,
    ) -> Result<Option<String>> {
        if metrics.mode != BuildMode::Incremental || metrics.status != ModelStatus::Built {
            return Ok(None);
        }
        let t = m.table();
        let table = self.catalog.lake().delta_table(&t.rel_path()).await?;
        if table.version() != metrics.version {
            return Ok(None); // written to since: test the whole table
        }
        let p = table
            .table_provider()
            .with_file_selection(crate::lake::storage::select_files(
                metrics.added_files.iter().cloned(),
            ))
            .await?;
        let name = format!("{}__{}__written", t.layer.schema_name(), t.name);
        let schema = self.new_schema()?;
        let _ = schema.deregister_table(&name);
        schema.register_table(name.clone(), p)?;
        Ok(Some(format!("{NEW_SCHEMA}.{name}")))
    }

    pub fn forget_written(&self, relation: &str) {
        if let (Ok(s), Some(name)) = (
            self.new_schema(),
            relation.strip_prefix(&format!("{NEW_SCHEMA}.")),
        ) {
            let _ = s.deregister_table(name);
        }
    }

    /// The relations of a `recompute_by` build of `m`: the values of `column` that changed in
    /// any upstream since the versions in `prev`, registered as one relation (its name is
    /// returned), and each upstream that has the column filtered to them. `None` means a full
    /// rebuild: an upstream without the column changed (any of the model's rows may depend on
    /// it), a version read last time is gone, or the values cover most of the target anyway
    /// (recomputing them would hold most of the table in memory).
    #[allow(clippy::too_many_arguments)]
    async fn recompute_plan(
        &self,
        m: &Model,
        column: &str,
        ups: &[TableRef],
        up_tables: &BTreeMap<String, DeltaTable>,
        prev: &ModelState,
        target_rows: u64,
        registered: &mut Vec<String>,
    ) -> Result<std::result::Result<(BTreeMap<String, String>, String, u64), FullBuild>> {
        let new_schema = self.new_schema()?;
        let mut relations = BTreeMap::new();
        let mut changed_parts = Vec::new();
        for u in ups {
            let key = u.to_string();
            let ut = &up_tables[&key];
            let has_col = ut
                .snapshot()
                .map(|s| s.schema().field(column).is_some())
                .unwrap_or(false);
            let Some(pv) = prev.upstream.get(&key).copied() else {
                return Ok(Err(FullBuild::info(format!(
                    "{u} is a new upstream; built in full"
                ))));
            };
            let now = ut.version().unwrap_or(pv);
            if pv != now {
                if !has_col {
                    return Ok(Err(FullBuild::info(format!(
                        "{u} changed and has no column '{column}' (any row may depend on it); built in full"
                    ))));
                }
                let changes = match self.changes_of(u, ut, pv, column).await? {
                    Ok(c) => c,
                    Err(why) => return Ok(Err(why)),
                };
                let name = format!("{}__{}__{}__changes", m.name, u.layer.schema_name(), u.name);
                new_schema.register_table(name.clone(), changes)?;
                registered.push(name.clone());
                changed_parts.push(format!(
                    "select {c} from {NEW_SCHEMA}.{name}",
                    c = q(column)
                ));
            }
            if has_col {
                relations.insert(key, String::new()); // filled in below, once keys exist
            }
        }
        let keys_name = format!("{}__recompute", m.name);
        let keys = if changed_parts.is_empty() {
            Vec::new()
        } else {
            let sql = format!(
                "select distinct {c} from ({}) k where {c} is not null",
                changed_parts.join(" union all "),
                c = q(column)
            );
            self.collect(m, &sql).await?
        };
        let n: u64 = keys.iter().map(|b| b.num_rows() as u64).sum();
        if n * 2 > target_rows.max(1) && n > 0 {
            return Ok(Err(FullBuild::info(format!(
                "{n} values of '{column}' changed upstream, against {target_rows} rows in the table; built in full"
            ))));
        }
        tracing::debug!(model = %m.name, values = n, "recompute: values changed upstream");
        let provider: Arc<dyn datafusion::catalog::TableProvider> = match keys.first() {
            Some(b) => Arc::new(datafusion::datasource::MemTable::try_new(
                b.schema(),
                vec![keys.clone()],
            )?),
            None => {
                // Nothing changed in an upstream carrying the column: an empty set of values,
                // typed like the first such upstream's column.
                let dt = ups
                    .iter()
                    .find_map(|u| {
                        up_tables[&u.to_string()].snapshot().ok().and_then(|s| {
                            s.snapshot()
                                .arrow_schema()
                                .field_with_name(column)
                                .ok()
                                .map(|f| f.data_type().clone())
                        })
                    })
                    .unwrap_or(DataType::Utf8);
                let schema = Arc::new(arrow::datatypes::Schema::new(vec![
                    arrow::datatypes::Field::new(column, dt, true),
                ]));
                Arc::new(datafusion::datasource::MemTable::try_new(
                    schema,
                    vec![vec![]],
                )?)
            }
        };
        new_schema.register_table(keys_name.clone(), provider)?;
        registered.push(keys_name.clone());
        let keys_rel = format!("{NEW_SCHEMA}.{keys_name}");
        for (u, rel) in relations.iter_mut() {
            *rel = format!(
                "(select * from {u} where {c} in (select {c} from {keys_rel}))",
                c = q(column)
            );
        }
        Ok(Ok((relations, keys_rel, n)))
    }

    /// The distinct values of `column` on the rows of `u` that differ between version `from`
    /// and `ut`'s version: rows of the files added since that are not in the files removed
    /// since, and the other way round (a copy-on-write rewrite copies unchanged rows; they
    /// cancel out). `None` when that cannot be told: version `from` is no longer readable
    /// (purged by an erasure), or the change is too large to compare within the engine's memory
    /// limit (the anti joins hold one side). Cached for the run, so models recomputing by the
    /// same column share one diff.
    async fn changes_of(
        &self,
        u: &TableRef,
        ut: &DeltaTable,
        from: u64,
        column: &str,
    ) -> Result<std::result::Result<Arc<dyn datafusion::catalog::TableProvider>, FullBuild>> {
        let to = ut.version().unwrap_or(from);
        let cache_key = (u.to_string(), from, to, column.to_string());
        if let Some(p) = self.changes.lock().unwrap().get(&cache_key) {
            return Ok(Ok(p.clone()));
        }
        let then = match self
            .catalog
            .lake()
            .delta_table_at(&u.rel_path(), from)
            .await
        {
            Ok(t) => t,
            Err(e) => {
                return Ok(Err(FullBuild::warn(format!(
                    "upstream {u} version {from}, which the last build read, is not readable ({e}); built in full"
                ))));
            }
        };
        let (now_files, then_files) = (files_of(ut)?, files_of(&then)?);
        let added: Vec<String> = now_files
            .keys()
            .filter(|p| !then_files.contains_key(*p))
            .cloned()
            .collect();
        let removed: Vec<String> = then_files
            .keys()
            .filter(|p| !now_files.contains_key(*p))
            .cloned()
            .collect();
        if let Some(why) = self.missing_files(u, from, &removed).await? {
            return Ok(Err(why));
        }
        let a = ut
            .table_provider()
            .with_file_selection(crate::lake::storage::select_files(added))
            .await?;
        let r = then
            .table_provider()
            .with_file_selection(crate::lake::storage::select_files(removed.clone()))
            .await?;
        let schema = self.new_schema()?;
        let side = |s: &str| format!("{}__{}__{from}_{to}__{s}", u.layer.schema_name(), u.name);
        let (an, rn) = (side("added"), side("removed"));
        schema.register_table(an.clone(), a.clone())?;
        schema.register_table(rn.clone(), r.clone())?;
        let cols_of = |p: &Arc<dyn datafusion::catalog::TableProvider>| -> Vec<String> {
            p.schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect()
        };
        let (ca, cr) = (cols_of(&a), cols_of(&r));
        let nested = a
            .schema()
            .fields()
            .iter()
            .any(|f| f.data_type().is_nested());
        let c = q(column);
        let rows = if removed.is_empty() {
            // Only appends: the new files are the change.
            format!("select {c} from {NEW_SCHEMA}.{an}")
        } else if ca == cr && !nested {
            let same = ca
                .iter()
                .map(|c| format!("(x.{c} is not distinct from y.{c})", c = q(c)))
                .collect::<Vec<_>>()
                .join(" and ");
            format!(
                "select x.{c} from {NEW_SCHEMA}.{an} x left anti join {NEW_SCHEMA}.{rn} y on {same} \
                 union all select x.{c} from {NEW_SCHEMA}.{rn} x left anti join {NEW_SCHEMA}.{an} y on {same}"
            )
        } else {
            // Another schema, or columns that cannot be compared: every row of both sides
            // counts as changed (more to recompute, never less).
            format!("select {c} from {NEW_SCHEMA}.{an} union all select {c} from {NEW_SCHEMA}.{rn}")
        };
        let sql = format!("select distinct {c} from ({rows}) k where {c} is not null");
        let batches = match self.ctx.sql(&sql).await {
            Ok(df) => df.collect().await,
            Err(e) => Err(e),
        };
        let _ = schema.deregister_table(&an);
        let _ = schema.deregister_table(&rn);
        let batches = match batches {
            Ok(b) => b,
            Err(e)
                if matches!(
                    e.find_root(),
                    datafusion::error::DataFusionError::ResourcesExhausted(_)
                ) =>
            {
                return Ok(Err(FullBuild::info(format!(
                    "the change of {u} since version {from} is too large to compare in memory ({e}); built in full"
                ))));
            }
            Err(e) => return Err(e.into()),
        };
        let schema = match batches.first() {
            Some(b) => b.schema(),
            None => Arc::new(arrow::datatypes::Schema::new(vec![
                a.schema().field_with_name(column)?.clone(),
            ])),
        };
        let provider: Arc<dyn datafusion::catalog::TableProvider> = Arc::new(
            datafusion::datasource::MemTable::try_new(schema, vec![batches])?,
        );
        self.changes
            .lock()
            .unwrap()
            .insert(cache_key, provider.clone());
        Ok(Ok(provider))
    }

    /// A full build's reason when a file of `paths` (files of version `from` of `u` that the
    /// current version no longer has) is gone: a vacuum deleted what that version needs.
    async fn missing_files(
        &self,
        u: &TableRef,
        from: u64,
        paths: &[String],
    ) -> Result<Option<FullBuild>> {
        if paths.is_empty() {
            return Ok(None);
        }
        let gone = self
            .catalog
            .lake()
            .count_missing(&u.rel_path(), paths.iter().map(String::as_str))
            .await?;
        Ok((gone > 0).then(|| {
            FullBuild::warn(format!(
                "{gone} file(s) of upstream {u} version {from}, which the last build read, were deleted (by a vacuum, or a GDPR purge); built in full (vacuum only files older than the time between two builds)"
            ))
        }))
    }

    /// The relation `rel` (the files added to `u` since version `then`) without the rows that
    /// `removed` (files of `then` the current version no longer has) held: a compaction or an
    /// erasure writes old rows into new files, and they are not new. Bronze rows are compared
    /// by where they came from (batch, file, line: unique per row), other tables by every
    /// column both versions have (so a new row equal in every column to a rewritten old one
    /// counts as old; a model's rows are unique by its key, so this needs the same key with the
    /// same values). Returns the relation and the name it registered, or why a full build is
    /// needed.
    #[allow(clippy::too_many_arguments)]
    async fn without_removed(
        &self,
        u: &TableRef,
        ut: &DeltaTable,
        then: &DeltaTable,
        removed: &[&String],
        then_files: &FileMap,
        rel: &str,
        name: &str,
    ) -> Result<std::result::Result<(String, String), FullBuild>> {
        let removed: Vec<String> = removed.iter().map(|s| s.to_string()).collect();
        let from = then.version().unwrap_or(0);
        if let Some(why) = self.missing_files(u, from, &removed).await? {
            return Ok(Err(why));
        }
        let schema_of = |t: &DeltaTable| {
            t.snapshot()
                .map(|s| s.snapshot().arrow_schema())
                .map_err(|e| Error::delta(u.to_string(), e))
        };
        let (schema, old_schema) = (schema_of(ut)?, schema_of(then)?);
        let origin = ["_batch_id", "_source_file", "_source_line"];
        // The columns both versions have (a column added since is NULL in the old rows).
        let cols: Vec<String> = if u.layer == crate::lake::catalog::Layer::Bronze
            && origin
                .iter()
                .all(|c| schema.field_with_name(c).is_ok() && old_schema.field_with_name(c).is_ok())
        {
            origin.iter().map(|c| c.to_string()).collect()
        } else {
            schema
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .filter(|c| old_schema.field_with_name(c).is_ok())
                .collect()
        };
        if cols.iter().any(|c| {
            schema
                .field_with_name(c)
                .is_ok_and(|f| f.data_type().is_nested())
        }) {
            return Ok(Err(FullBuild::info(format!(
                "upstream {u} rewrote files since version {from} and has nested columns to compare rows by; built in full"
            ))));
        }
        // The side held in memory is the removed rows' compared columns (a file without a row
        // count is counted by its size).
        let rows: u64 = removed
            .iter()
            .filter_map(|p| then_files.get(p))
            .map(|f| if f.1 > 0 { f.1 } else { f.0 / 16 })
            .sum();
        let budget = match self.ctx.runtime_env().memory_pool.memory_limit() {
            datafusion::execution::memory_pool::MemoryLimit::Finite(b) => {
                b as u64 / (32 * cols.len() as u64).max(64)
            }
            _ => u64::MAX,
        };
        if rows > budget {
            return Ok(Err(FullBuild::info(format!(
                "upstream {u} rewrote {} file(s) ({rows} rows) since version {from} (a compaction or an erasure): more than the engine's memory can compare; built in full",
                removed.len()
            ))));
        }
        let p = then
            .table_provider()
            .with_file_selection(crate::lake::storage::select_files(removed))
            .await?;
        let gone = format!("{name}__removed");
        self.new_schema()?.register_table(gone.clone(), p)?;
        let same = cols
            .iter()
            .map(|c| format!("(a.{c} is not distinct from r.{c})", c = q(c)))
            .collect::<Vec<_>>()
            .join(" and ");
        Ok(Ok((
            format!("(select a.* from {rel} a left anti join {NEW_SCHEMA}.{gone} r on {same})"),
            gone,
        )))
    }

    /// A delta-rs write that executes `df` in this session and streams its batches into the
    /// model's Parquet files.
    fn write_plan(
        &self,
        target: DeltaTable,
        df: DataFrame,
    ) -> deltalake::operations::write::WriteBuilder {
        target
            .write(Vec::new())
            .with_input_plan(df.into_unoptimized_plan())
            .with_session_state(Arc::new(self.ctx.state()))
            .with_writer_properties(writer_properties())
    }

    /// Every row of a query of `m`'s build (SQL errors name the model file).
    async fn collect(&self, m: &Model, sql: &str) -> Result<Vec<RecordBatch>> {
        let df = self.ctx.sql(sql).await.map_err(|e| sql_error(m, e))?;
        Ok(df.collect().await?)
    }

    /// The first value of a one-row query, as text.
    async fn scalar(&self, sql: &str) -> Result<Option<String>> {
        let df = self.ctx.sql(sql).await?;
        let b = df.collect().await?;
        Ok(b.first().and_then(|b| {
            let c = arrow::compute::cast(b.column(0), &DataType::Utf8).ok()?;
            let s = c.as_any().downcast_ref::<arrow::array::StringArray>()?;
            (!s.is_empty() && !s.is_null(0)).then(|| s.value(0).to_string())
        }))
    }

    /// A commit with no data that records the model's new build state (nothing changed, but the
    /// upstream versions it has seen moved on).
    async fn record_state(
        &self,
        m: &Model,
        t: &TableRef,
        target: DeltaTable,
        state: &ModelState,
    ) -> Result<DeltaTable> {
        use deltalake::kernel::transaction::CommitBuilder;
        use deltalake::protocol::DeltaOperation;
        let err = |e: deltalake::DeltaTableError| Error::delta(t.to_string(), e);
        let mut target = target;
        let snapshot = target.snapshot().map_err(err)?.clone();
        // No actions but the commit info carrying the state (delta-rs's write refuses an
        // empty input).
        let done = CommitBuilder::from(self.props(m, state))
            .with_actions(Vec::new())
            .build(
                Some(&snapshot),
                target.log_store(),
                DeltaOperation::Write {
                    mode: SaveMode::Append,
                    partition_by: None,
                    predicate: None,
                },
            )
            .await
            .map_err(err)?;
        target
            .update_incremental(Some(done.version()))
            .await
            .map_err(err)?;
        Ok(target)
    }

    /// `delta.dataSkippingStatsColumns`: every column but the PII ones.
    fn stats_config(&self, m: &Model, cols: &[String]) -> HashMap<String, Option<String>> {
        let keep: Vec<&String> = cols
            .iter()
            .filter(|c| {
                !self.pii.contains(*c)
                    && !m.config.pii.contains(*c)
                    && m.config.subject_key.as_ref() != Some(*c)
            })
            .collect();
        let mut m = HashMap::new();
        if keep.len() < cols.len() {
            m.insert(
                "delta.dataSkippingStatsColumns".to_string(),
                Some(
                    keep.iter()
                        .map(|c| c.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
            );
        }
        m
    }

    fn props(&self, m: &Model, state: &ModelState) -> CommitProperties {
        CommitProperties::default().with_metadata([
            (
                "silt.operation".to_string(),
                serde_json::Value::from("build"),
            ),
            (
                "silt.model".to_string(),
                serde_json::Value::from(m.name.as_str()),
            ),
            (
                "silt.run_id".to_string(),
                serde_json::Value::from(self.run_id),
            ),
            (
                "silt.state".to_string(),
                serde_json::to_value(state).unwrap_or_default(),
            ),
        ])
    }

    /// The model's SQL rendered with `relations` and planned in the session (pseudonymized
    /// columns replaced in the SQL itself, so every materialization, and a snapshot's re-plan,
    /// sees only the pseudonyms). SQL errors name the model file.
    async fn plan(
        &self,
        m: &Model,
        incremental: bool,
        relations: BTreeMap<String, String>,
    ) -> Result<(String, DataFrame)> {
        let sql = self.dag.render(
            m,
            RenderContext {
                incremental,
                relations,
            },
        )?;
        let named = |e| match e {
            Error::Sql(msg) => Error::config(&m.file, msg),
            other => other,
        };
        let df = crate::lake::time_travel::sql(self.ctx, self.catalog, &sql)
            .await
            .map_err(|e| self.dag.locate(m, &sql, e))?;
        if m.config.pseudonymize.is_empty() {
            return Ok((sql, df));
        }
        let cols = columns_of(&df);
        let wrapped = crate::build::pseudonym::wrap_sql(
            &m.config.pseudonymize,
            &m.file,
            &sql,
            &cols,
            self.hmac_key,
            self.ctx,
        )?;
        let df = crate::lake::time_travel::sql(self.ctx, self.catalog, &wrapped)
            .await
            .map_err(named)?;
        Ok((wrapped, df))
    }

    /// The relations of a partition_overwrite build that runs once per chunk of partitions:
    /// each upstream partitioned by the model's `partition_by` column filtered to the chunk's
    /// values (and `base`, the relations of the whole build, otherwise). The partitions are
    /// those of `only` (an incremental build's touched set) or all the upstream holds. A chunk
    /// has at most one upstream row per 2 KiB of the session's memory pool (131,072 rows at
    /// 256 MiB), so a model with about as many groups as rows (fct_monthly_revenue: one per
    /// client, adviser and month) holds one chunk's groups instead of spilling all of them.
    /// `None` when one query will do:
    /// no upstream is partitioned by that column, the rows fit one chunk, or a file has a NULL
    /// partition value (`IN` would leave its rows out).
    fn partition_chunks(
        &self,
        m: &Model,
        up_tables: &BTreeMap<String, DeltaTable>,
        base: &BTreeMap<String, String>,
        only: Option<&BTreeSet<String>>,
    ) -> Result<Option<Vec<BTreeMap<String, String>>>> {
        let Some(pcol) = &m.config.partition_by else {
            return Ok(None);
        };
        let limit = match self.ctx.runtime_env().memory_pool.memory_limit() {
            datafusion::execution::memory_pool::MemoryLimit::Finite(bytes) => (bytes >> 11) as u64,
            _ => return Ok(None),
        };
        let mut rows: BTreeMap<String, u64> = BTreeMap::new();
        let mut partitioned = Vec::new();
        for (u, ut) in up_tables {
            let parts = ut
                .snapshot()
                .map(|s| s.metadata().partition_columns().to_vec())
                .unwrap_or_default();
            if !parts.contains(pcol) {
                continue;
            }
            partitioned.push((u, string_column(ut, pcol)));
            for (_, n, values) in files_of(ut)?.into_values() {
                match values.get(pcol) {
                    Some(Some(v)) if only.is_none_or(|o| o.contains(v)) => {
                        *rows.entry(v.clone()).or_default() += n
                    }
                    Some(Some(_)) => {}
                    _ => return Ok(None),
                }
            }
        }
        if partitioned.is_empty() || rows.values().sum::<u64>() <= limit {
            return Ok(None);
        }
        let mut chunks: Vec<Vec<&String>> = vec![Vec::new()];
        let mut held = 0;
        for (v, n) in &rows {
            let last = chunks.last_mut().expect("one chunk at least");
            if !last.is_empty() && held + n > limit {
                chunks.push(vec![v]);
                held = *n;
            } else {
                last.push(v);
                held += n;
            }
        }
        Ok(Some(
            chunks
                .into_iter()
                .map(|values| {
                    let mut rels = base.clone();
                    for (u, string) in &partitioned {
                        rels.insert(
                            u.to_string(),
                            in_partitions(u, pcol, *string, values.iter().copied()),
                        );
                    }
                    rels
                })
                .collect(),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    async fn write(
        &self,
        m: &Model,
        t: &TableRef,
        target: DeltaTable,
        incremental: bool,
        relations: Vec<BTreeMap<String, String>>,
        touched: &BTreeSet<String>,
        recompute: Option<&Recompute>,
        state: &ModelState,
        metrics: &mut ModelMetrics,
    ) -> Result<DeltaTable> {
        let cfg = &m.config;
        let previous = target.version();
        let partition_cols: Vec<String> = cfg.partition_by.iter().cloned().collect();
        // Plan first (every chunk): a SQL error writes nothing.
        let mut planned = Vec::with_capacity(relations.len());
        for rels in relations {
            planned.push(self.plan(m, incremental, rels).await?);
        }
        let (sql, df) = if planned.len() == 1 {
            planned.remove(0)
        } else {
            let sql = planned[0].0.clone();
            (
                sql,
                in_sequence(self.ctx, planned.into_iter().map(|p| p.1).collect())?,
            )
        };
        if let Some(contract) = &cfg.contract {
            check_contract(m, df.schema().as_arrow(), contract)?;
        }
        if let Some(c) = &cfg.partition_by
            && df.schema().field_with_unqualified_name(c).is_err()
        {
            return Err(Error::config(
                &m.file,
                format!(
                    "partition_by='{c}': the model's output has no column '{c}'; its columns are {}",
                    columns_of(&df).join(", ")
                ),
            ));
        }
        if let Some(c) = &cfg.recompute_by
            && df.schema().field_with_unqualified_name(c).is_err()
        {
            return Err(Error::config(
                &m.file,
                format!(
                    "recompute_by='{c}': the model's output has no column '{c}'; select it, or name an output column"
                ),
            ));
        }
        // An increment is small by design: run the model's query once, then check and merge its
        // result (instead of running it for the check and again for the MERGE).
        let df = if incremental && cfg.materialized == Materialized::Incremental {
            let t0 = Instant::now();
            let batches = collect_nonempty(df).await.map_err(|e| sql_error(m, e))?;
            tracing::debug!(model = %m.name, ms = t0.elapsed().as_millis() as u64, "increment computed");
            self.ctx.read_batches(batches)?
        } else {
            df
        };
        // An increment is checked before it is merged. A full build is checked after its
        // write, on the key columns of what it wrote (checking first would run the whole
        // model twice), and rolled back if it is not unique.
        if incremental
            && matches!(
                cfg.materialized,
                Materialized::Incremental | Materialized::Snapshot
            )
        {
            self.check_unique(m, &df, incremental).await?;
        }
        if !incremental {
            let df = if cfg.materialized == Materialized::Snapshot {
                self.scd2_full(m, &sql).await?
            } else {
                df
            };
            // Streamed: delta-rs executes the plan and writes files as batches come, so the
            // table is never held in memory (sorts and aggregates spill under the session's
            // memory limit).
            let schema_cols = columns_of(&df);
            let table = self
                .write_plan(target, df)
                .with_save_mode(SaveMode::Overwrite)
                .with_schema_mode(SchemaMode::Overwrite)
                .with_partition_columns(partition_cols)
                .with_configuration(self.stats_config(m, &schema_cols))
                .with_table_name(t.to_string())
                .with_commit_properties(self.props(m, state))
                .await
                .map_err(|e| Error::delta(t.to_string(), e))?;
            if cfg.materialized == Materialized::Incremental {
                let written = self.ctx.read_table(table.table_provider().await?)?;
                if let Err(e) = self.check_unique(m, &written, false).await {
                    return Err(self.roll_back(m, t, table, previous, e).await);
                }
            }
            return Ok(table);
        }
        match cfg.materialized {
            Materialized::Append => {
                let table = self
                    .write_plan(target, df)
                    .with_save_mode(SaveMode::Append)
                    .with_commit_properties(self.props(m, state))
                    .await
                    .map_err(|e| Error::delta(t.to_string(), e))?;
                Ok(table)
            }
            Materialized::PartitionOverwrite => {
                let pcol = cfg.partition_by.clone().unwrap_or_default();
                let is_utf8 = df
                    .schema()
                    .field_with_unqualified_name(&pcol)
                    .map(|f| f.data_type() == &DataType::Utf8)
                    .unwrap_or(true);
                let pc = if is_utf8 {
                    col(pcol.as_str())
                } else {
                    cast(col(pcol.as_str()), DataType::Utf8)
                };
                let pred = pc.in_list(touched.iter().map(|v| lit(v.clone())).collect(), false);
                let table = self
                    .write_plan(target, df)
                    .with_save_mode(SaveMode::Overwrite)
                    .with_replace_where(pred)
                    .with_commit_properties(self.props(m, state))
                    .await
                    .map_err(|e| Error::delta(t.to_string(), e))?;
                Ok(table)
            }
            Materialized::Incremental => {
                self.merge(m, t, target, df, recompute, state, metrics)
                    .await
            }
            Materialized::Snapshot => self.scd2_merge(m, t, target, &sql, state, metrics).await,
            Materialized::Table => unreachable!("tables are always rebuilt"),
        }
    }

    /// Undo a full build whose output broke its unique_key: the table goes back to the
    /// version before it (with that version's build state, so the next run builds again), or,
    /// if the build created the table, loses its rows and its build state. Returns `why`, told
    /// what was undone.
    async fn roll_back(
        &self,
        m: &Model,
        t: &TableRef,
        table: DeltaTable,
        previous: Option<u64>,
        why: Error,
    ) -> Error {
        let undone = match previous {
            Some(v) => crate::lake::time_travel::restore(
                self.catalog,
                t,
                &crate::lake::time_travel::AsOf::Version(v),
            )
            .await
            .map(|_| format!("{t} is back at version {v}")),
            None => {
                let invalid = ModelState {
                    upstream: BTreeMap::new(),
                    sql_hash: "rolled back".into(),
                };
                table
                    .delete()
                    .with_commit_properties(self.props(m, &invalid))
                    .await
                    .map(|_| format!("{t} holds no rows"))
                    .map_err(|e| Error::delta(t.to_string(), e))
            }
        };
        match (why, undone) {
            (Error::Config { file, message }, Ok(what)) => Error::Config {
                file,
                message: format!("{message}\nThe build was rolled back: {what}."),
            },
            (why, Ok(_)) => why,
            (why, Err(e)) => Error::Rollback {
                error: Box::new(why),
                rollback: Box::new(e),
            },
        }
    }

    /// The table written again as its rows whose key is neither recomputed (`__silt_src`, the
    /// changed rows) nor stale (`__silt_stale`), followed by the changed rows: one streamed
    /// overwrite. Metrics count the changed rows that replace a row (updated), the others
    /// (inserted) and the stale rows (deleted).
    #[allow(clippy::too_many_arguments)]
    async fn rewrite_recomputed(
        &self,
        m: &Model,
        t: &TableRef,
        target: DeltaTable,
        rc: &Recompute,
        cols: &[String],
        target_cols: &str,
        stale_rows: usize,
        state: &ModelState,
        metrics: &mut ModelMetrics,
    ) -> Result<DeltaTable> {
        let keys = &m.config.unique_key;
        let klist = keys.iter().map(|k| q(k)).collect::<Vec<_>>().join(", ");
        let same = keys
            .iter()
            .map(|k| format!("(t.{c} is not distinct from x.{c})", c = q(k)))
            .collect::<Vec<_>>()
            .join(" and ");
        let replaced = keys
            .iter()
            .map(|k| format!("t.{c} = s.{c}", c = q(k)))
            .collect::<Vec<_>>()
            .join(" and ");
        let changed_rows: u64 = self
            .scalar("select count(*) from __silt_src")
            .await?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let updated: u64 = self
            .scalar(&format!(
                "select count(*) from __silt_src s join (select {klist} from {t}) t on {replaced}"
            ))
            .await?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let gone = if stale_rows > 0 {
            format!(" union all select {klist} from __silt_stale")
        } else {
            String::new()
        };
        let list = cols.iter().map(|c| q(c)).collect::<Vec<_>>().join(", ");
        let sql = format!(
            "select {target_cols} from (select t.* from {t} t left anti join \
             (select {klist} from __silt_src{gone}) x on {same}) kept \
             union all select {list} from __silt_src"
        );
        let df = self.ctx.sql(&sql).await.map_err(|e| sql_error(m, e))?;
        let table = self
            .write_plan(target, df)
            .with_save_mode(SaveMode::Overwrite)
            .with_configuration(self.stats_config(m, cols))
            .with_commit_properties(self.props(m, state))
            .await
            .map_err(|e| Error::delta(t.to_string(), e))?;
        metrics.rows_updated = updated;
        metrics.rows_inserted = changed_rows.saturating_sub(updated);
        metrics.rows_deleted = stale_rows as u64;
        metrics.message = Some(format!(
            "{} value(s) of {} recomputed; the table was rewritten in one pass",
            rc.values, rc.column
        ));
        Ok(table)
    }

    async fn check_unique(&self, m: &Model, df: &DataFrame, incremental: bool) -> Result<()> {
        // A snapshot's full build may carry several versions per key; only its increments and
        // incremental models must be unique.
        if m.config.materialized == Materialized::Snapshot && !incremental {
            return Ok(());
        }
        let keys = m
            .config
            .unique_key
            .iter()
            .map(|k| q(k))
            .collect::<Vec<_>>()
            .join(", ");
        let name = "__silt_check";
        let _ = self.ctx.deregister_table(name);
        self.ctx.register_table(name, df.clone().into_view())?;
        let dup = self
            .ctx
            .sql(&format!("select {keys}, count(*) as n from {name} group by {keys} having count(*) > 1 limit 5"))
            .await
            .map_err(|e| sql_error(m, e))?
            .collect()
            .await
            .map_err(|e| sql_error(m, e));
        let _ = self.ctx.deregister_table(name);
        let dup = dup?;
        let n: usize = dup.iter().map(|b| b.num_rows()).sum();
        if n > 0 {
            // A key leading to a data subject is not written into a message: messages go to the
            // run log, which an erasure does not rewrite.
            let personal = m.config.unique_key.iter().any(|k| {
                self.pii.contains(k)
                    || m.config.pii.contains(k)
                    || m.config.subject_key.as_ref() == Some(k)
            });
            let shown = if personal {
                format!(
                    "{n}{} key value(s) repeat (not shown: the key leads to a data subject; list them with `silt query` on the model's upstream)",
                    if n >= 5 { "+" } else { "" }
                )
            } else {
                format!("duplicates:\n{}", crate::render::table(&dup))
            };
            return Err(Error::config(
                &m.file,
                format!(
                    "unique_key ({}) is not unique in the model's output; {shown}",
                    m.config.unique_key.join(", "),
                ),
            ));
        }
        Ok(())
    }

    /// Incremental MERGE on unique_key. With partition_by, the join carries the partition
    /// column (`t.p = s.p`) so delta-rs prunes target files to the source's partitions, and a
    /// row whose partition changed is deleted from its old partition in the same commit.
    /// With `recompute`, the increment is every output row of the recomputed values, and
    /// target rows of those values that it no longer holds are deleted in the same commit.
    #[allow(clippy::too_many_arguments)]
    async fn merge(
        &self,
        m: &Model,
        t: &TableRef,
        target: DeltaTable,
        df: DataFrame,
        recompute: Option<&Recompute>,
        state: &ModelState,
        metrics: &mut ModelMetrics,
    ) -> Result<DeltaTable> {
        let phase = Instant::now();
        let batches = collect_nonempty(df).await.map_err(|e| sql_error(m, e))?;
        tracing::debug!(model = %m.name, ms = phase.elapsed().as_millis() as u64, "merge: increment");
        if recompute.is_none() && batches.iter().all(|b| b.num_rows() == 0) {
            // Nothing new: still record the state so the next run is a no-op.
            return self.record_state(m, t, target, state).await;
        }
        let cols: Vec<String> = batches[0]
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let target_schema = target
            .snapshot()
            .map_err(|e| Error::delta(t.to_string(), e))?
            .schema();
        let evolve = new_columns_allowed(m, t, &cols, |c| target_schema.field(c).is_some())?;
        let _ = self.ctx.deregister_table(MERGE_SRC);
        self.ctx.register_batch(
            MERGE_SRC,
            arrow::compute::concat_batches(&batches[0].schema(), &batches)?,
        )?;
        // The target's columns in the increment's order (NULL for the ones it gains).
        let target_cols = cols
            .iter()
            .map(|c| {
                if target_schema.field(c.as_str()).is_some() {
                    q(c)
                } else {
                    format!("null as {}", q(c))
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let changed = self
            .not_yet_held(m, t, &target, &cols, &target_cols, |c| {
                target_schema.field(c).is_some()
            })
            .await?;
        let _ = self.ctx.deregister_table(MERGE_STALE);
        let stale_rows = match recompute {
            Some(rc) => self.register_stale(m, t, rc, &target_cols).await?,
            None => 0,
        };
        let _ = self.ctx.deregister_table(MERGE_SRC);
        let changed_rows: usize = changed.iter().map(|b| b.num_rows()).sum();
        tracing::debug!(model = %m.name, ms = phase.elapsed().as_millis() as u64, stale = stale_rows, changed = changed_rows, "merge: changed rows");
        if changed_rows == 0 && stale_rows == 0 {
            return self.record_state(m, t, target, state).await;
        }
        self.ctx.register_batch(
            MERGE_SRC,
            arrow::compute::concat_batches(&changed[0].schema(), &changed)?,
        )?;
        // Rows to replace spread over the whole of an unpartitioned table (one in twenty rows
        // or more): every file holds one, so a MERGE would rewrite them all after a join with
        // the whole table. Writing the table again — the rows of other keys, then the new
        // ones — is the same rewrite in one streamed pass.
        if let Some(rc) = recompute
            && m.config.partition_by.is_none()
            && !evolve
            && (changed_rows + stale_rows) as u64 * 20 >= rc.target_rows
        {
            let result = self
                .rewrite_recomputed(
                    m,
                    t,
                    target,
                    rc,
                    &cols,
                    &target_cols,
                    stale_rows,
                    state,
                    metrics,
                )
                .await;
            let _ = self.ctx.deregister_table(MERGE_SRC);
            let _ = self.ctx.deregister_table(MERGE_STALE);
            return result;
        }
        // The target's current version of each changed key, read in one pass over the table:
        // its partition (a move leaves it) and the columns downstream `recompute_by` models
        // recompute by (the values this MERGE changes, published below).
        let from_version = target.version();
        let consumers = self.recompute_consumers(m, &cols);
        let _ = self.ctx.deregister_table(MERGE_OLD);
        self.register_old(m, t, &consumers).await?;
        let changes = self
            .changed_values(
                m,
                &consumers,
                MERGE_SRC,
                (stale_rows > 0).then_some(MERGE_STALE),
                MERGE_OLD,
                &old_of,
            )
            .await;
        let (staged_sql, predicate) = staged_sql(m, &cols, stale_rows > 0);
        let staged = self
            .ctx
            .sql(&staged_sql)
            .await
            .map_err(|e| sql_error(m, e))?;
        let staged = self.ctx.read_batches(staged.collect().await?)?;
        tracing::debug!(model = %m.name, ms = phase.elapsed().as_millis() as u64, "merge: staged");
        for name in [MERGE_SRC, MERGE_STALE, MERGE_OLD] {
            let _ = self.ctx.deregister_table(name);
        }
        let changes = changes.map_err(|e| self.changed_values_error(m, &consumers, e))?;
        let (table, mm) = self
            .run_merge(m, t, target, staged, predicate, evolve, &cols, state)
            .await?;
        tracing::debug!(
            model = %m.name,
            ms = phase.elapsed().as_millis() as u64,
            scan_ms = mm.scan_time_ms,
            rewrite_ms = mm.rewrite_time_ms,
            "merge: committed"
        );
        merge_metrics(metrics, &mm);
        if let (Some(from), Some(to)) = (from_version, table.version()) {
            let mut cache = self.changes.lock().unwrap();
            for (c, provider) in changes {
                cache.insert((t.to_string(), from, to, c), provider);
            }
        }
        if let Some(rc) = recompute {
            metrics.message = Some(format!(
                "{} value(s) of {} recomputed; merged",
                rc.values, rc.column
            ));
        }
        Ok(table)
    }

    /// The increment's rows that the target does not already hold exactly (lookback context
    /// and re-deliveries are dropped), so the MERGE rewrites only files that really change.
    /// With partition_by, only the increment's partitions of the target are read for this.
    async fn not_yet_held(
        &self,
        m: &Model,
        t: &TableRef,
        target: &DeltaTable,
        cols: &[String],
        target_cols: &str,
        in_target: impl Fn(&str) -> bool,
    ) -> Result<Vec<RecordBatch>> {
        // The increment's partitions as literals: a subquery would not prune the target's files.
        let existing = match &m.config.partition_by {
            Some(p) if in_target(p.as_str()) => {
                let pq = q(p);
                let parts = self.collect(m, &format!(
                        "select distinct cast({pq} as varchar) from {MERGE_SRC} where {pq} is not null"
                    )).await?;
                let mut list = Vec::new();
                for b in &parts {
                    let c = arrow::compute::cast(b.column(0), &DataType::Utf8)?;
                    let c = c.as_any().downcast_ref::<arrow::array::StringArray>();
                    for v in c.into_iter().flatten().flatten() {
                        list.push(literal(v));
                    }
                }
                if list.is_empty() {
                    format!("select {target_cols} from {t} where false")
                } else {
                    format!(
                        "select {target_cols} from {t} where {}",
                        partition_in(p, string_column(target, p), &list.join(", "))
                    )
                }
            }
            _ => format!("select {target_cols} from {t}"),
        };
        // An anti join on every column (NULL matching NULL) rather than EXCEPT: the increment's
        // rows are unique by key (checked above), so EXCEPT's deduplication of every row, a
        // hash aggregate over all columns, buys nothing.
        let same = cols
            .iter()
            .map(|c| format!("(s.{c} is not distinct from e.{c})", c = q(c)))
            .collect::<Vec<_>>()
            .join(" and ");
        self.collect(
            m,
            &format!("select s.* from {MERGE_SRC} s left anti join ({existing}) e on {same}"),
        )
        .await
    }

    /// Recompute: the target rows of the recomputed values whose key the new result lacks,
    /// registered as [`MERGE_STALE`] (to delete); how many there are.
    async fn register_stale(
        &self,
        m: &Model,
        t: &TableRef,
        rc: &Recompute,
        target_cols: &str,
    ) -> Result<usize> {
        let key_same = m
            .config
            .unique_key
            .iter()
            .map(|k| format!("(t.{c} is not distinct from s.{c})", c = q(k)))
            .collect::<Vec<_>>()
            .join(" and ");
        let stale = self.collect(m, &format!(
                "select {target_cols} from (select t.* from {t} t left anti join {MERGE_SRC} s on {key_same} \
                 where t.{c} in (select {c} from {keys_rel})) x",
                c = q(&rc.column),
                keys_rel = rc.keys
            )).await?;
        let rows = stale.iter().map(|b| b.num_rows()).sum::<usize>();
        if rows > 0 {
            self.ctx.register_batch(
                MERGE_STALE,
                arrow::compute::concat_batches(&stale[0].schema(), &stale)?,
            )?;
        }
        Ok(rows)
    }

    /// The target's current partition and `consumers` columns of each key of the increment,
    /// registered as [`MERGE_OLD`] (their columns named by [`old_of`]); nothing when neither
    /// is needed.
    async fn register_old(&self, m: &Model, t: &TableRef, consumers: &[String]) -> Result<()> {
        let keys = &m.config.unique_key;
        let old_cols: Vec<String> = m
            .config
            .partition_by
            .iter()
            .chain(consumers.iter().filter(|c| !keys.contains(c)))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if old_cols.is_empty() {
            return Ok(());
        }
        let picked = keys
            .iter()
            .map(|k| format!("s.{c} as {c}", c = q(k)))
            .chain(
                old_cols
                    .iter()
                    .map(|c| format!("t.{} as {}", q(c), q(&old_of(c)))),
            )
            .collect::<Vec<_>>()
            .join(", ");
        let in_range = self.in_key_range(m, t, MERGE_SRC).await?;
        let old = async {
            let df = self
                .ctx
                .sql(&format!(
                    "select {picked} from {MERGE_SRC} s join {in_range} t on {}",
                    key_eq(keys)
                ))
                .await?;
            collect_nonempty(df).await
        }
        .await
        .map_err(|e| sql_error(m, e));
        let _ = self.ctx.deregister_table(KEY_RANGE);
        let old = old?;
        self.ctx.register_table(
            MERGE_OLD,
            Arc::new(datafusion::datasource::MemTable::try_new(
                old[0].schema(),
                vec![old],
            )?),
        )?;
        Ok(())
    }

    /// Named for what it serves: finding the changed values runs in the upstream's build, for
    /// the models downstream that recompute by these columns.
    fn changed_values_error(&self, m: &Model, consumers: &[String], e: Error) -> Error {
        let readers: Vec<String> = self
            .dag
            .models
            .values()
            .filter(|d| d.refs.contains(&m.name) && d.config.recompute_by.is_some())
            .map(|d| {
                format!(
                    "{} (recompute_by='{}')",
                    d.name,
                    d.config.recompute_by.clone().unwrap_or_default()
                )
            })
            .collect();
        Error::Context {
            what: format!(
                "finding the values of {} that this MERGE changed, for {}",
                consumers.join(", "),
                readers.join(", ")
            ),
            source: Box::new(e),
        }
    }

    /// The Delta MERGE of the staged rows: `upsert` rows update or insert by key, `delete`
    /// rows delete (a key that moved partition, a stale recomputed row).
    #[allow(clippy::too_many_arguments)]
    async fn run_merge(
        &self,
        m: &Model,
        t: &TableRef,
        target: DeltaTable,
        staged: DataFrame,
        predicate: String,
        evolve: bool,
        cols: &[String],
        state: &ModelState,
    ) -> Result<(DeltaTable, deltalake::operations::merge::MergeMetrics)> {
        target
            .merge(staged, predicate)
            .with_merge_schema(evolve)
            .with_source_alias("s")
            .with_target_alias("t")
            .with_commit_properties(self.props(m, state))
            .when_matched_delete(|d| d.predicate("s.__silt_op = 'delete'"))
            .and_then(|b| {
                b.when_matched_update(|mut u| {
                    u = u.predicate("s.__silt_op = 'upsert'");
                    for c in cols {
                        u = u.update(c.as_str(), format!("s.{}", q(c)));
                    }
                    u
                })
            })
            .and_then(|b| {
                b.when_not_matched_insert(|mut i| {
                    i = i.predicate("s.__silt_op = 'upsert'");
                    for c in cols {
                        i = i.set(c.as_str(), format!("s.{}", q(c)));
                    }
                    i
                })
            })
            .map_err(|e| Error::delta(t.to_string(), e))?
            .await
            .map_err(|e| Error::delta(t.to_string(), e))
    }

    /// The relation to join with `src` to find the target rows of its keys: `t` restricted to
    /// the rows whose first unique_key column lies between the smallest and the largest value
    /// in `src`, registered as [`KEY_RANGE`] (or `t` itself when `src` has no such value). Only
    /// those rows can match, and the bounds are literals: when keys grow with time, as ids
    /// usually do, the scan skips every file whose statistics lie outside (a batch touching
    /// the last 2 of 36 months reads about 2 months of the table, not 36).
    async fn in_key_range(&self, m: &Model, t: &TableRef, src: &str) -> Result<String> {
        let Some(k) = m.config.unique_key.first() else {
            return Ok(t.to_string());
        };
        let b = self
            .collect(
                m,
                &format!("select min({c}), max({c}) from {src}", c = q(k)),
            )
            .await?;
        let Some(b) = b.iter().find(|b| b.num_rows() > 0) else {
            return Ok(t.to_string());
        };
        let lo = ScalarValue::try_from_array(b.column(0), 0)?;
        let hi = ScalarValue::try_from_array(b.column(1), 0)?;
        if lo.is_null() || hi.is_null() {
            return Ok(t.to_string());
        }
        let df = self
            .ctx
            .table(t.to_string())
            .await?
            .filter(ident(k).between(lit(lo), lit(hi)))?;
        let _ = self.ctx.deregister_table(KEY_RANGE);
        self.ctx.register_table(KEY_RANGE, df.into_view())?;
        Ok(KEY_RANGE.to_string())
    }

    /// The columns of `m` that models reading it recompute by (`recompute_by`).
    fn recompute_consumers(&self, m: &Model, cols: &[String]) -> Vec<String> {
        let mut out = BTreeSet::new();
        for d in self.dag.models.values() {
            if d.refs.contains(&m.name)
                && let Some(c) = &d.config.recompute_by
                && cols.contains(c)
            {
                out.insert(c.clone());
            }
        }
        out.into_iter().collect()
    }

    /// For each consumer column, the distinct values on the rows a MERGE changes: the rows it
    /// writes (`src`), the rows it deletes (`stale`) and the current versions of the keys it
    /// replaces (`old`, the column's old value; a key column's old value is its new one). These
    /// are the rows that differ between the table's versions before and after the MERGE, what
    /// [`Materializer::changes_of`] would find by comparing the files; downstream builds of this
    /// run take them from the cache instead.
    async fn changed_values(
        &self,
        m: &Model,
        consumers: &[String],
        src: &str,
        stale: Option<&str>,
        old: &str,
        old_of: &dyn Fn(&str) -> String,
    ) -> Result<Vec<(String, Arc<dyn datafusion::catalog::TableProvider>)>> {
        let mut out = Vec::new();
        for c in consumers {
            let qc = q(c);
            let mut parts = vec![format!("select {qc} as v from {src}")];
            if let Some(st) = stale {
                parts.push(format!("select {qc} as v from {st}"));
            }
            if !m.config.unique_key.contains(c) {
                parts.push(format!("select {} as v from {old}", q(&old_of(c))));
            }
            let df = self
                .ctx
                .sql(&format!(
                    "select distinct v as {qc} from ({}) k where v is not null",
                    parts.join(" union all ")
                ))
                .await
                .map_err(|e| sql_error(m, e))?;
            // The batches' own schema: a partition column is read as a dictionary, which the
            // plan's schema does not say.
            let batches = collect_nonempty(df).await?;
            out.push((
                c.clone(),
                Arc::new(datafusion::datasource::MemTable::try_new(
                    batches[0].schema(),
                    vec![batches],
                )?) as Arc<dyn datafusion::catalog::TableProvider>,
            ));
        }
        Ok(out)
    }

    fn scd2_parts(&self, m: &Model, df_cols: &[String]) -> (String, String, String) {
        let cfg = &m.config;
        let keys = cfg
            .unique_key
            .iter()
            .map(|k| q(k))
            .collect::<Vec<_>>()
            .join(", ");
        let hash_cols: Vec<&String> = if cfg.check_cols.is_empty() {
            df_cols
                .iter()
                .filter(|c| {
                    !cfg.unique_key.contains(c)
                        && Some(*c) != cfg.updated_at.as_ref()
                        && !c.starts_with('_')
                })
                .collect()
        } else {
            cfg.check_cols.iter().collect()
        };
        let hash = format!(
            "md5(concat_ws('|', {}))",
            hash_cols
                .iter()
                .map(|c| format!("coalesce(cast({} as varchar), '\\u0000')", q(c)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let vt = match (&cfg.updated_at, cfg.strategy) {
            (Some(u), _) => q(u),
            (None, _) => format!(
                "arrow_cast('{}', 'Timestamp(Microsecond, Some(\"UTC\"))')",
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            ),
        };
        (keys, hash, vt)
    }

    async fn model_columns(&self, m: &Model, sql: &str) -> Result<Vec<String>> {
        let df = self.ctx.sql(sql).await.map_err(|e| sql_error(m, e))?;
        Ok(columns_of(&df))
    }

    /// SCD2 from scratch: every distinct version of each key, in time order.
    async fn scd2_full(&self, m: &Model, sql: &str) -> Result<DataFrame> {
        let cols = self.model_columns(m, sql).await?;
        let (keys, hash, vt) = self.scd2_parts(m, &cols);
        let c = cols.iter().map(|c| q(c)).collect::<Vec<_>>().join(", ");
        // One ordered pass over (key, time) instead of windows partitioned by key: DataFusion
        // keeps state per window partition, and a history has about one partition per row.
        // A row's neighbour in that order belongs to the same key when every key column
        // matches (NULL-safe). (Splitting the order into buckets of keys would run two windows'
        // sorts in one pool: docs/decisions/0018.)
        let w = format!("over (order by {keys}, __vt)");
        let key_cols = &m.config.unique_key;
        let prev_keys = key_cols
            .iter()
            .enumerate()
            .map(|(i, k)| format!("lag({}) {w} as __pk{i}", q(k)))
            .collect::<Vec<_>>()
            .join(", ");
        let next_keys = key_cols
            .iter()
            .enumerate()
            .map(|(i, k)| format!("lead({}) {w} as __nk{i}", q(k)))
            .collect::<Vec<_>>()
            .join(", ");
        let same = |p: &str| {
            key_cols
                .iter()
                .enumerate()
                .map(|(i, k)| format!("({p}{i} is not distinct from {})", q(k)))
                .collect::<Vec<_>>()
                .join(" and ")
        };
        let (same_prev, same_next) = (same("__pk"), same("__nk"));
        let full = format!(
            "with src as ({sql}), \
             h as (select *, {vt} as __vt, {hash} as _scd_hash from src), \
             o as (select *, lag(_scd_hash) {w} as __prev, {prev_keys} from h), \
             k as (select * from o where not ({same_prev}) or __prev is null or __prev <> _scd_hash), \
             n as (select *, lead(__vt) {w} as __next, {next_keys} from k), \
             v as (select *, case when {same_next} then __next end as __valid_to from n) \
             select {c}, _scd_hash, __vt as valid_from, __valid_to as valid_to, \
               __valid_to is null as is_current \
             from v"
        );
        self.ctx.sql(&full).await.map_err(|e| sql_error(m, e))
    }

    /// SCD2 increment: close the current version of changed keys and insert their new versions,
    /// in one MERGE on (key, valid_from).
    async fn scd2_merge(
        &self,
        m: &Model,
        t: &TableRef,
        target: DeltaTable,
        sql: &str,
        state: &ModelState,
        metrics: &mut ModelMetrics,
    ) -> Result<DeltaTable> {
        let cols = self.model_columns(m, sql).await?;
        let (keys, hash, vt) = self.scd2_parts(m, &cols);
        let c = cols.iter().map(|c| q(c)).collect::<Vec<_>>().join(", ");
        let key_join = m
            .config
            .unique_key
            .iter()
            .map(|k| format!("t.{c} = nk.{c}", c = q(k)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let staged_sql = format!(
            "with n as (select *, {vt} as __vt, {hash} as _scd_hash from ({sql}) src), \
             nk as (select distinct {keys} from n), \
             cur as (select t.* from {t} t join nk on {key_join} where t.is_current), \
             seq as (select {c}, _scd_hash, valid_from as __vt, 0 as __new from cur \
                     union all select {c}, _scd_hash, __vt, 1 as __new from n), \
             o as (select *, lag(_scd_hash) over (partition by {keys} order by __vt, __new) as __prev from seq), \
             k as (select * from o where __new = 0 or __prev is null or __prev <> _scd_hash), \
             f as (select *, lead(__vt) over (partition by {keys} order by __vt, __new) as __next from k) \
             select {c}, _scd_hash, __vt as valid_from, __next as valid_to, __next is null as is_current \
             from f where __new = 1 or __next is not null"
        );
        let staged = self
            .ctx
            .sql(&staged_sql)
            .await
            .map_err(|e| sql_error(m, e))?;
        let batches = staged.collect().await?;
        if batches.iter().all(|b| b.num_rows() == 0) {
            return self.record_state(m, t, target, state).await;
        }
        let staged = self.ctx.read_batches(batches)?;
        let mut all_cols = cols.clone();
        all_cols.extend(["_scd_hash", "valid_from", "valid_to", "is_current"].map(String::from));
        let key_eq = m
            .config
            .unique_key
            .iter()
            .map(|k| format!("t.{c} = s.{c}", c = q(k)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let (table, mm) = target
            .merge(staged, format!("{key_eq} AND t.valid_from = s.valid_from"))
            .with_source_alias("s")
            .with_target_alias("t")
            .with_commit_properties(self.props(m, state))
            .when_matched_update(|u| {
                u.update("valid_to", "s.valid_to")
                    .update("is_current", "s.is_current")
            })
            .and_then(|b| {
                b.when_not_matched_insert(|mut i| {
                    for c in &all_cols {
                        i = i.set(c.as_str(), format!("s.{}", q(c)));
                    }
                    i
                })
            })
            .map_err(|e| Error::delta(t.to_string(), e))?
            .await
            .map_err(|e| Error::delta(t.to_string(), e))?;
        merge_metrics(metrics, &mm);
        Ok(table)
    }
}

/// The queries of a chunked build, run one after the other as one single-partition relation
/// (delta-rs writes it in one commit); only one chunk executes, and holds memory, at a time.
fn in_sequence(ctx: &SessionContext, chunks: Vec<DataFrame>) -> Result<DataFrame> {
    let schema: arrow::datatypes::SchemaRef = Arc::new(chunks[0].schema().as_arrow().clone());
    let table = datafusion::catalog::streaming::StreamingTable::try_new(
        schema.clone(),
        vec![Arc::new(Sequence { schema, chunks })],
    )?;
    Ok(ctx.read_table(Arc::new(table))?)
}

struct Sequence {
    schema: arrow::datatypes::SchemaRef,
    chunks: Vec<DataFrame>,
}

impl std::fmt::Debug for Sequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sequence({} chunks)", self.chunks.len())
    }
}

impl datafusion::physical_plan::streaming::PartitionStream for Sequence {
    fn schema(&self) -> &arrow::datatypes::SchemaRef {
        &self.schema
    }

    fn execute(
        &self,
        _ctx: Arc<datafusion::execution::TaskContext>,
    ) -> datafusion::execution::SendableRecordBatchStream {
        let n = self.chunks.len();
        let batches = futures::stream::iter(self.chunks.clone().into_iter().enumerate())
            .then(move |(i, df)| {
                tracing::debug!(
                    chunk = i + 1,
                    of = n,
                    pool_reserved = df.task_ctx().memory_pool().reserved(),
                    "chunk"
                );
                df.execute_stream()
            })
            .try_flatten();
        Box::pin(
            datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
                self.schema.clone(),
                batches,
            ),
        )
    }
}

/// Collect a result; an empty result still carries its schema as one empty batch.
async fn collect_nonempty(
    df: DataFrame,
) -> std::result::Result<Vec<RecordBatch>, datafusion::error::DataFusionError> {
    let schema = Arc::new(df.schema().as_arrow().clone());
    let mut b = df.collect().await?;
    b.retain(|b| b.num_rows() > 0);
    if b.is_empty() {
        b.push(RecordBatch::new_empty(schema));
    }
    Ok(b)
}

fn merge_metrics(metrics: &mut ModelMetrics, mm: &deltalake::operations::merge::MergeMetrics) {
    metrics.rows_inserted = mm.num_target_rows_inserted as u64;
    metrics.rows_updated = mm.num_target_rows_updated as u64;
    metrics.rows_deleted = mm.num_target_rows_deleted as u64;
    metrics.rows_copied = mm.num_target_rows_copied as u64;
    metrics.files_scanned = mm.num_target_files_scanned as u64;
    metrics.files_skipped = mm.num_target_files_skipped_during_scan as u64;
}

/// Arrow types that are the same for a contract (string encodings, timezone spellings).
fn same_type(a: &DataType, b: &DataType) -> bool {
    use DataType::*;
    match (a, b) {
        (Utf8 | Utf8View | LargeUtf8, Utf8 | Utf8View | LargeUtf8) => true,
        (Timestamp(u1, z1), Timestamp(u2, z2)) => {
            let utc = |z: &Option<Arc<str>>| {
                z.as_deref()
                    .is_some_and(|z| matches!(z, "UTC" | "+00:00" | "Z"))
            };
            u1 == u2 && (z1 == z2 || (utc(z1) && utc(z2)))
        }
        (List(x) | LargeList(x) | ListView(x), List(y) | LargeList(y) | ListView(y)) => {
            same_type(x.data_type(), y.data_type())
        }
        (Struct(x), Struct(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|(f, g)| f.name() == g.name() && same_type(f.data_type(), g.data_type()))
        }
        _ => a == b,
    }
}

/// The model's output against its declared contract: same columns, same types.
fn check_contract(
    m: &Model,
    schema: &arrow::datatypes::Schema,
    contract: &BTreeMap<String, String>,
) -> Result<()> {
    let mut problems = Vec::new();
    for (name, ty) in contract {
        let want = crate::project::contract::ColumnType::parse(ty)
            .map_err(|e| Error::config(&m.file, format!("contract: column '{name}': {e}")))?;
        match schema.field_with_name(name) {
            Err(_) => problems.push(format!("column '{name}' ({ty}) is missing from the output")),
            Ok(f) if !same_type(f.data_type(), &want.to_arrow()) => problems.push(format!(
                "column '{name}' is {} but the contract says {ty}",
                f.data_type()
            )),
            Ok(_) => {}
        }
    }
    for f in schema.fields() {
        if !contract.contains_key(f.name()) {
            problems.push(format!(
                "column '{}' ({}) is not in the contract",
                f.name(),
                f.data_type()
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(Error::config(
        &m.file,
        format!(
            "the output breaks the model's contract; nothing was written:\n  {}",
            problems.join("\n  ")
        ),
    ))
}
