//! Table names and where they live in the lake, the list of tables that exist,
//! and the DataFusion catalog that lets SQL name them (`bronze.fees`, `quarantine.fees`,
//! `_silt.ledger`). Tables are opened lazily, on first reference. It must not write tables.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::prelude::{SessionConfig, SessionContext};
use deltalake::DeltaTable;

use crate::error::{Error, Result};
use crate::lake::storage::Storage;

/// The schema of a session's scratch relations: upstream increments, tables at a version, the
/// rows a build wrote. Never a table of the lake.
pub const NEW_SCHEMA: &str = "__silt";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    Bronze,
    Silver,
    Gold,
    Quarantine,
    /// silt's own bookkeeping: ledger, runs, erasures, exports.
    Silt,
}

impl Layer {
    pub const ALL: [Layer; 5] = [
        Layer::Bronze,
        Layer::Silver,
        Layer::Gold,
        Layer::Quarantine,
        Layer::Silt,
    ];

    pub fn schema_name(self) -> &'static str {
        match self {
            Layer::Bronze => "bronze",
            Layer::Silver => "silver",
            Layer::Gold => "gold",
            Layer::Quarantine => "quarantine",
            Layer::Silt => "_silt",
        }
    }

    /// Directory under the lake root holding this layer's tables.
    pub fn dir(self) -> &'static str {
        match self {
            Layer::Bronze => "bronze",
            Layer::Silver => "silver",
            Layer::Gold => "gold",
            Layer::Quarantine => "_silt/quarantine",
            Layer::Silt => "_silt",
        }
    }

    pub fn parse(s: &str) -> Option<Layer> {
        Layer::ALL.into_iter().find(|l| l.schema_name() == s)
    }
}

/// A table of the lake, `layer.name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableRef {
    pub layer: Layer,
    pub name: String,
}

impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.layer.schema_name(), self.name)
    }
}

impl TableRef {
    pub fn new(layer: Layer, name: impl Into<String>) -> Self {
        TableRef {
            layer,
            name: name.into(),
        }
    }

    pub fn bronze(name: &str) -> Self {
        Self::new(Layer::Bronze, name)
    }
    pub fn quarantine(name: &str) -> Self {
        Self::new(Layer::Quarantine, name)
    }

    /// Parse `layer.name`.
    pub fn parse(s: &str) -> Result<TableRef> {
        let (l, n) = s.split_once('.').ok_or_else(|| {
            Error::Usage(format!(
                "'{s}' is not a table name: write layer.name, e.g. bronze.fees"
            ))
        })?;
        let layer = Layer::parse(l).ok_or_else(|| {
            Error::Usage(format!(
                "'{l}' is not a layer: use bronze, silver, gold, quarantine or _silt"
            ))
        })?;
        if n.is_empty() || n.contains('/') || n.contains('.') {
            return Err(Error::Usage(format!("'{s}' is not a table name")));
        }
        Ok(TableRef::new(layer, n))
    }

    /// `Err` for silt's bookkeeping tables (`_silt.*`: ledger, run log, erasure audit,
    /// exports): `verb` (restore, optimize, vacuum) would rewrite their history, and the
    /// exactly-once ledger or the GDPR audit with it.
    pub fn writable_by_user(&self, verb: &str) -> Result<()> {
        if self.layer == Layer::Silt {
            return Err(Error::Usage(format!(
                "{self} is silt's own bookkeeping: `silt {verb}` does not touch it (a restored ledger would ingest files twice, a restored audit would lose GDPR records)"
            )));
        }
        Ok(())
    }

    /// Path of the table relative to the lake root.
    pub fn rel_path(&self) -> String {
        format!("{}/{}", self.layer.dir(), self.name)
    }
}

/// The candidate closest to `name` (Jaro-Winkler similarity of at least 0.8), for "did you
/// mean …?" hints on mistyped table and model names.
pub fn closest(name: &str, candidates: impl IntoIterator<Item = String>) -> Option<String> {
    candidates
        .into_iter()
        .filter(|c| c != name)
        .map(|c| (strsim::jaro_winkler(name, &c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// The lake's tables, for listing and for SQL.
#[derive(Debug, Clone)]
pub struct Catalog {
    lake: Storage,
    engine: crate::project::config::EngineSection,
}

impl Catalog {
    pub fn new(lake: Storage) -> Self {
        Catalog {
            lake,
            engine: Default::default(),
        }
    }

    /// Use these DataFusion settings for every session.
    pub fn with_engine(mut self, engine: crate::project::config::EngineSection) -> Self {
        self.engine = engine;
        self
    }

    pub fn lake(&self) -> &Storage {
        &self.lake
    }

    /// The engine settings every session of this catalog gets.
    pub fn engine(&self) -> &crate::project::config::EngineSection {
        &self.engine
    }

    /// A scan of some data files (`LogicalFileView::path`s) of `table` at the version it is
    /// loaded at: delta-rs's own scan, or on a cluster the plain Parquet scan executors run.
    pub async fn files_scan<S: AsRef<str>>(
        &self,
        table: &DeltaTable,
        files: impl IntoIterator<Item = S>,
    ) -> Result<Arc<dyn TableProvider>> {
        let files: Vec<String> = files.into_iter().map(|f| f.as_ref().to_string()).collect();
        // delta-rs selects only files under the table's own root; an environment's clone
        // names its source's files by absolute URL, which silt's own scan reads.
        let cloned = files
            .iter()
            .any(|f| crate::lake::storage::absolute_url(f).is_some());
        if self.engine.cluster.is_some() || cloned {
            let url = table.table_url().to_string();
            let rel = url
                .strip_prefix(self.lake.url().as_str())
                .map(|r| r.trim_matches('/').to_string())
                .ok_or_else(|| Error::Internal(format!("{url} is not under the lake root")))?;
            let selection: std::collections::HashSet<String> = files.into_iter().collect();
            let scan = crate::lake::snapshot_scan::SnapshotScan::try_new(
                &self.lake,
                &rel,
                table,
                Some(&selection),
            )
            .await?;
            return Ok(Arc::new(scan));
        }
        Ok(table
            .table_provider()
            .with_file_selection(crate::lake::storage::select_files(files))
            .await?)
    }

    /// Whether sessions run on a cluster (`[engine] cluster`), from the configuration alone.
    pub fn is_clustered(&self) -> bool {
        self.engine
            .cluster
            .as_deref()
            .is_some_and(|u| !u.is_empty())
    }

    /// The cluster sessions run on (`[engine] cluster`), checked to be reachable; None to
    /// run here.
    pub async fn cluster(&self) -> Result<Option<crate::lake::cluster::Cluster>> {
        let Some(url) = self.engine.cluster.as_deref().filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        let c = crate::lake::cluster::Cluster::parse(url)?;
        c.check_reachable().await?;
        Ok(Some(c))
    }

    /// Every table that exists (has a Delta log), by layer then name.
    pub async fn list(&self) -> Result<Vec<TableRef>> {
        let mut out = Vec::new();
        for layer in Layer::ALL {
            for name in self.lake.list_dirs(layer.dir()).await? {
                if layer == Layer::Silt && name == "quarantine" {
                    continue;
                }
                let t = TableRef::new(layer, name);
                if self
                    .lake
                    .list_dirs(&t.rel_path())
                    .await?
                    .iter()
                    .any(|d| d == "_delta_log")
                {
                    out.push(t);
                }
            }
        }
        Ok(out)
    }

    /// Open a table at its latest version; None when it does not exist.
    pub async fn open(&self, t: &TableRef) -> Result<Option<DeltaTable>> {
        let table = self.lake.delta_table(&t.rel_path()).await?;
        Ok(table.version().is_some().then_some(table))
    }

    /// A DataFusion session in which every layer is a schema and every table a lazily opened
    /// Delta table provider.
    pub async fn session(&self) -> Result<SessionContext> {
        self.session_pinned(BTreeMap::new()).await
    }

    /// A session in which the tables named in `pins` (`layer.name`) are read at those versions.
    pub async fn session_pinned(&self, pins: BTreeMap<String, u64>) -> Result<SessionContext> {
        let mut config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema("datafusion", "public")
            .with_batch_size(self.engine.batch_size.max(1));
        if self.engine.target_partitions > 0 {
            config = config.with_target_partitions(self.engine.target_partitions);
        }
        // Rows already hashed on some of a grouping's keys (a join's output on the order key,
        // grouped by customer and order for a `count(distinct)`) are aggregated where they
        // are. DataFusion repartitions them anyway below 4 partitions, for parallelism that
        // fewer cores cannot give; at most the engine's own partition count keeps it from that.
        let partitions = config.target_partitions().clamp(1, 4);
        config.options_mut().optimizer.subset_repartition_threshold = partitions;
        // Sorts, aggregates and joins hold at most this much before spilling to disk (the OS
        // temp dir), so a model's memory does not grow with its input.
        // A fair pool: every spilling operator (sorts, aggregates) keeps half its share and
        // may borrow what the others leave idle; the rest (merges, hash join build sides)
        // draws from what is left (`lake/memory.rs`).
        let pool = crate::lake::memory::SharePool::new(self.engine.memory_limit_bytes());
        // Any bucket an environment's clone names is read with the lake's credentials.
        let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(pool))
            .with_object_store_registry(self.lake.registry())
            .build_arc()?;
        let cluster = self.cluster().await?;
        if cluster.is_some() {
            // Ballista's settings for plans it splits into stages: no dynamic filters (they do
            // not cross a stage boundary), scalar subqueries as joins, broadcast thresholds.
            // Hash joins stay: silt's plans keep the small side on the build side (0020), the
            // executors' pools bound it, and a sort-merge join sorts every row of a dedupe's
            // input (the S=1 line-item silver build: 271 s against 9 s locally).
            use ballista_core::extension::SessionConfigExt;
            // Result messages may exceed gRPC's 16 MiB default (a 17 MB Flight message failed
            // a line-item build): the limit applies to the client's fetches and, carried with
            // the job's settings, to the executors' shuffle reads.
            config = config
                .upgrade_for_ballista()
                .set_bool("datafusion.optimizer.prefer_hash_join", true)
                .set_usize("ballista.client.grpc_max_message_size", 256 << 20);
        }
        // Scans of the cluster's plain Parquet form that stay here, and silt's own scans of an
        // environment's cloned files, read the lake directly.
        runtime.register_object_store(&self.lake.store_url(), self.lake.object_store());
        // delta-rs's planner too: model writes hand it plans of this session.
        let mut state = datafusion::execution::SessionStateBuilder::new()
            .with_default_features()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_query_planner(deltalake::delta_datafusion::planner::DeltaPlanner::new())
            // A partitioned table's files read partition after partition, not in log order.
            .with_physical_optimizer_rule(Arc::new(crate::lake::scan_order::PartitionOrderRule))
            // `row_number() … = 1` (the latest row per key) as a streaming pass over the sort.
            .with_physical_optimizer_rule(Arc::new(crate::lake::dedupe::FirstOfKeyRule::default()))
            // `count(distinct x)` beside sums as two group-bys, also when coercion aliased a sum.
            .with_optimizer_rule(Arc::new(
                crate::lake::distinct::UnaliasDistinctAggregatesRule,
            ));
        if cluster.is_none() {
            // … and only over the rows whose key occurs more than once. Not on a cluster: its
            // joins against the shared set of duplicated keys let repeated keys through when
            // Ballista split them into stages (S=4 line items); the sort and the first-of-key
            // pass alone are partitioned by key, so they stay exact across executors.
            state = state.with_optimizer_rule(Arc::new(crate::lake::dedupe::DuplicatedKeysRule));
        }
        if let Some(c) = &cluster {
            // Last of all: what can travel goes to the cluster as it was planned here.
            state = state.with_physical_optimizer_rule(Arc::new(
                crate::lake::cluster::ClusterRule::new(c.clone()),
            ));
        }
        let mut state = state.build();
        if cluster.is_some() {
            // … and its logical rewrites (NOT IN as a plan that distributes).
            let rules = ballista_core::optimizer::with_ballista_optimizer_rules(state.optimizers());
            state = datafusion::execution::SessionStateBuilder::new_from_existing(state)
                .with_optimizer_rules(rules)
                .build();
        }
        let ctx = SessionContext::new_with_state(state);
        let tables = self.list().await?;
        let catalog = ctx
            .catalog("datafusion")
            .ok_or_else(|| Error::Internal("DataFusion has no default catalog".into()))?;
        for layer in Layer::ALL {
            let names: BTreeMap<String, TableRef> = tables
                .iter()
                .filter(|t| t.layer == layer)
                .map(|t| (t.name.clone(), t.clone()))
                .collect();
            let provider = LayerSchema {
                pins: pins.clone(),
                layer: Some(layer),
                lake: self.lake.clone(),
                tables: names,
                // silt's bookkeeping stays on delta-rs's scan: small, and read here.
                plain_parquet: cluster.is_some() && layer != Layer::Silt,
            };
            catalog.register_schema(layer.schema_name(), Arc::new(provider))?;
        }
        Ok(ctx)
    }
}

/// A session for one build among others running side by side: `ctx`'s engine (settings, plan
/// rules, the one memory pool) and its lake schemas, but a default schema and a scratch
/// schema ([`NEW_SCHEMA`]) of its own, so the relations a build registers there (its MERGE
/// source, an upstream's increment) are not another build's.
pub fn scratch_session(ctx: &SessionContext) -> Result<SessionContext> {
    use datafusion::catalog::{
        CatalogProvider, CatalogProviderList, MemoryCatalogProvider, MemoryCatalogProviderList,
        MemorySchemaProvider,
    };
    let state = ctx.state();
    let default = state.config().options().catalog.default_catalog.clone();
    let default_schema = state.config().options().catalog.default_schema.clone();
    let shared = ctx
        .catalog(&default)
        .ok_or_else(|| Error::Internal("DataFusion has no default catalog".into()))?;
    let own = MemoryCatalogProvider::new();
    for name in shared.schema_names() {
        if name == default_schema || name == NEW_SCHEMA {
            continue;
        }
        if let Some(schema) = shared.schema(&name) {
            own.register_schema(&name, schema)?;
        }
    }
    own.register_schema(&default_schema, Arc::new(MemorySchemaProvider::new()))?;
    let list = MemoryCatalogProviderList::new();
    list.register_catalog(default, Arc::new(own));
    let state = datafusion::execution::SessionStateBuilder::new_from_existing(state)
        .with_catalog_list(Arc::new(list))
        .build();
    Ok(SessionContext::new_with_state(state))
}

#[derive(Debug)]
struct LayerSchema {
    pins: BTreeMap<String, u64>,
    layer: Option<Layer>,
    lake: Storage,
    tables: BTreeMap<String, TableRef>,
    /// Tables as plain Parquet scans (`lake/snapshot_scan.rs`), which a cluster can run.
    plain_parquet: bool,
}

#[async_trait]
impl SchemaProvider for LayerSchema {
    fn table_names(&self) -> Vec<String> {
        self.tables.keys().cloned().collect()
    }

    async fn table(&self, name: &str) -> datafusion::error::Result<Option<Arc<dyn TableProvider>>> {
        // Open on demand: a table created after this session started (an upstream model built
        // earlier in the same run) must be visible too.
        let t = match self.tables.get(name) {
            Some(t) => t.clone(),
            None => {
                let Some(layer) = self.layer else {
                    return Ok(None);
                };
                TableRef::new(layer, name)
            }
        };
        let opened = match self.pins.get(&t.to_string()) {
            Some(v) => self.lake.delta_table_at(&t.rel_path(), *v).await,
            None => self.lake.delta_table(&t.rel_path()).await,
        };
        let table =
            opened.map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
        if table.version().is_none() {
            return Ok(None);
        }
        if self.plain_parquet {
            let scan = crate::lake::snapshot_scan::SnapshotScan::try_new(
                &self.lake,
                &t.rel_path(),
                &table,
                None,
            )
            .await
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
            return Ok(Some(Arc::new(scan)));
        }
        let provider = table
            .table_provider()
            .await
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
        Ok(Some(provider))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.tables.contains_key(name)
    }

    fn register_table(
        &self,
        _name: String,
        _table: Arc<dyn TableProvider>,
    ) -> datafusion::error::Result<Option<Arc<dyn TableProvider>>> {
        Err(datafusion::error::DataFusionError::Plan(
            "tables of the lake are written by silt build / ingest, not by SQL DDL".into(),
        ))
    }
}

impl Catalog {
    /// Run one statement of silt's own over the lake's tables (its bookkeeping queries), in a
    /// session of this catalog; a result without rows still carries its columns.
    pub async fn sql(&self, sql: &str) -> Result<Vec<arrow::record_batch::RecordBatch>> {
        let ctx = self.session().await?;
        let df = ctx.sql(sql).await.map_err(Error::from_datafusion)?;
        let schema = Arc::new(df.schema().as_arrow().clone());
        let mut batches = df.collect().await.map_err(Error::from_datafusion)?;
        if batches.is_empty() {
            batches.push(arrow::record_batch::RecordBatch::new_empty(schema));
        }
        Ok(batches)
    }

    /// Read a whole (small) table: silt's bookkeeping tables only; data tables stream.
    pub async fn read_small(&self, t: &TableRef) -> Result<Vec<arrow::record_batch::RecordBatch>> {
        let Some(table) = self.open(t).await? else {
            return Ok(Vec::new());
        };
        // An environment's clone of a bookkeeping table may name another bucket's files.
        let ctx = SessionContext::new_with_config_rt(
            SessionConfig::new(),
            datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
                .with_object_store_registry(self.lake.registry())
                .build_arc()?,
        );
        let provider = table.table_provider().await?;
        let df = ctx.read_table(provider)?;
        Ok(df.collect().await?)
    }
}

/// One line of `silt tables`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableInfo {
    pub table: String,
    pub version: u64,
    pub rows: u64,
    pub files: u64,
    pub bytes: u64,
    pub partition_by: Vec<String>,
}

impl Catalog {
    /// Version, rows, files, bytes and partitioning of every table, from the Delta log alone.
    pub async fn describe_all(&self) -> Result<Vec<TableInfo>> {
        let mut out = Vec::new();
        for t in self.list().await? {
            let Some(table) = self.open(&t).await? else {
                continue;
            };
            let state = table
                .snapshot()
                .map_err(|e| Error::delta(t.to_string(), e))?;
            let (mut rows, mut files, mut bytes) = (0u64, 0u64, 0u64);
            for f in state.log_data().iter() {
                files += 1;
                bytes += f.size().max(0) as u64;
                rows += f.num_records().unwrap_or(0) as u64;
            }
            out.push(TableInfo {
                table: t.to_string(),
                version: state.version(),
                rows,
                files,
                bytes,
                partition_by: state.metadata().partition_columns().to_vec(),
            });
        }
        Ok(out)
    }
}
