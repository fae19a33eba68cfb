//! Building one model: decide between skip, full rebuild and incremental work from the state
//! recorded in the target's last silt commit (here), find what to read (increment.rs,
//! recompute.rs), check it (guard.rs) and write it by the model's materialization (write.rs for
//! table, partition_overwrite and append; merge.rs for incremental; snapshot.rs for SCD2). It
//! returns metrics; it must not decide build order (pipeline.rs does) nor render templates
//! itself (models.rs does).

mod guard;
mod increment;
mod merge;
mod merge_files;
mod recompute;
mod snapshot;
mod write;

use guard::check_contract;
use increment::{FullBuild, Increment, Recompute, in_partitions};
use merge::merge_metrics;
/// The Parquet settings of model files (an erasure rewrites them alike).
pub(crate) use write::writer_properties as model_writer_properties;

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
    /// Upstream changes already worked out in this run (see [`Materializer::changes_of`]),
    /// shared by the builds of a run that run side by side.
    pub changes: Arc<ChangeCache>,
    /// Build a model whose SQL or config changed since its last build in full, not
    /// incrementally: in an environment, where the change is what one wants to see.
    pub rebuild_changed: bool,
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

/// Count the files (and for a build that is not a MERGE, the rows) a build added and removed.
fn count_files(metrics: &mut ModelMetrics, before: &FileMap, after: &FileMap, merged: bool) {
    for (p, (size, rows, _)) in after {
        if !before.contains_key(p) {
            metrics.counts.files_added += 1;
            metrics.counts.bytes_added += size;
            metrics.added_files.push(p.clone());
            if !merged {
                metrics.counts.rows_inserted += rows;
            }
        }
    }
    for (p, (size, _, _)) in before {
        if !after.contains_key(p) {
            metrics.counts.files_removed += 1;
            metrics.counts.bytes_removed += size;
        }
    }
}

/// The partitions (values of `pcol`) a MERGE wrote to or removed files from, sorted; a NULL
/// partition is left out, as a partition_overwrite build's list leaves it out.
fn merged_partitions(before: &FileMap, after: &FileMap, pcol: &str) -> Vec<String> {
    let added = after.iter().filter(|(p, _)| !before.contains_key(*p));
    let removed = before.iter().filter(|(p, _)| !after.contains_key(*p));
    let values: BTreeSet<String> = added
        .chain(removed)
        .filter_map(|(_, (_, _, values))| values.get(pcol).cloned().flatten())
        .collect();
    values.into_iter().collect()
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

/// The hash of a model's template and config, as its build state records it.
pub fn sql_hash(m: &Model) -> String {
    hex::encode(Sha256::digest(
        format!(
            "{}\0{}",
            m.template,
            serde_json::to_string(&m.config).unwrap_or_default()
        )
        .as_bytes(),
    ))
}

/// The model's materialization as the run log spells it.
pub(crate) fn materialized_name(m: &Model) -> String {
    serde_json::to_value(m.config.materialized)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// The silt state of the target's latest model commit.
pub async fn last_state(t: &DeltaTable) -> Result<Option<ModelState>> {
    if t.version().is_none() {
        return Ok(None);
    }
    // Newest first, read lazily: the state is almost always in the latest commit, so this
    // stops after the first few reads instead of reading fifty commits.
    let mut infos = t.history(Some(50));
    while let Some(i) = infos
        .try_next()
        .await
        .map_err(|e| Error::delta(t.table_url().as_str(), e))?
    {
        if let Some(v) = i.info.get("silt.state") {
            return Ok(serde_json::from_value(v.clone()).ok());
        }
    }
    Ok(None)
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
        let sql_hash = sql_hash(m);
        Ok(Current {
            target,
            state,
            ups,
            up_tables,
            new_state: ModelState { upstream, sql_hash },
        })
    }

    /// The up-to-date check from the Delta logs alone, without loading a table: the target's
    /// latest commit carries the state its build recorded, and each upstream's latest version
    /// is the newest commit file in its log. Some((version, state)) when `m` is up to date;
    /// None when it may not be (the full check in [`Materializer::states`] decides then, e.g.
    /// when the latest commit is an optimize that carries no state).
    async fn up_to_date_from_logs(&self, m: &Model) -> Result<Option<(u64, ModelState)>> {
        use crate::lake::time_travel::{latest_commit, latest_version};
        if self.full_refresh {
            return Ok(None);
        }
        let Some((version, info)) = latest_commit(self.catalog, &m.table()).await? else {
            return Ok(None);
        };
        let Some(state) = info
            .get("silt.state")
            .and_then(|s| serde_json::from_value::<ModelState>(s.clone()).ok())
        else {
            return Ok(None);
        };
        if state.sql_hash != sql_hash(m) {
            return Ok(None);
        }
        let mut ups: Vec<TableRef> = m.sources.iter().map(|s| TableRef::bronze(s)).collect();
        ups.extend(m.refs.iter().map(|r| self.dag.models[r].table()));
        if ups.len() != state.upstream.len() {
            return Ok(None);
        }
        for u in &ups {
            let now = latest_version(self.catalog, u).await?;
            if now.is_none() || state.upstream.get(&u.to_string()) != now.as_ref() {
                return Ok(None);
            }
        }
        Ok(Some((version, state)))
    }

    /// Whether [`Materializer::build`] would find `m` up to date (its upstream versions and
    /// SQL are those of its last build). An upstream that does not exist yet counts as not.
    pub async fn up_to_date(&self, m: &Model) -> Result<bool> {
        if self.full_refresh {
            return Ok(false);
        }
        if self.up_to_date_from_logs(m).await?.is_some() {
            return Ok(true);
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
        if let Some((version, state)) = self.up_to_date_from_logs(m).await? {
            return Ok(ModelMetrics {
                model: m.name.clone(),
                table: t.to_string(),
                materialized: materialized_name(m),
                upstream: state.upstream,
                sql_hash: state.sql_hash,
                status: ModelStatus::UpToDate,
                mode: BuildMode::None,
                version: Some(version),
                ms: started.elapsed().as_millis() as u64,
                ..Default::default()
            });
        }
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
            materialized: materialized_name(m),
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
        // to old rows, and on_schema_change governs new columns. In an environment a changed
        // model is built in full: its new logic over every row is what the environment is for.
        let changed_sql = state
            .as_ref()
            .is_some_and(|s| s.sql_hash != new_state.sql_hash);
        let rebuild = self.rebuild_changed && changed_sql;
        if rebuild {
            metrics.message =
                Some("its SQL or config changed in this environment: built in full".to_string());
        }
        let prev = state.filter(|_| !self.full_refresh && !rebuild);
        let mut before = if target.version().is_some() {
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
        // An environment's clone names its source's files; delta-rs rewrites only files under
        // the table's root, so a write that rewrites files in place copies them in first.
        let rewrites_in_place = incremental
            || matches!(
                m.config.materialized,
                Materialized::PartitionOverwrite | Materialized::Snapshot
            );
        let target = if rewrites_in_place {
            let (table, copied) =
                crate::lake::env::localize(self.catalog.lake(), target, &t, prev.as_ref()).await?;
            if copied > 0 {
                tracing::info!(model = %m.name, files = copied, "cloned files copied into the environment before an in-place write");
                before = files_of(&table)?;
            }
            table
        } else {
            target
        };
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
        let after = files_of(&target)?;
        count_files(&mut metrics, &before, &after, merged);
        metrics.partitions = std::mem::take(&mut inc.touched).into_iter().collect();
        if merged && let Some(pcol) = m.config.partition_by.as_deref() {
            metrics.partitions = merged_partitions(&before, &after, pcol);
        }
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
        let p = self
            .catalog
            .files_scan(&table, metrics.added_files.iter().cloned())
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
