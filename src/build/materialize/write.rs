//! Writing a build's rows: a table replaced whole, the partitions of a partition_overwrite model
//! replaced (in chunks of partitions read one after the other, one commit), an append, with the
//! build state committed atomically with the data, and a build undone when its unique guard fails
//! after the write. It must not choose what to read (mod.rs and increment.rs do).

use super::*;

/// Parquet settings of model files: delta-rs's (Snappy), with row groups of at most 32k rows.
/// A partitioned write keeps one open file per partition; each holds its current row group
/// encoded in memory, so smaller row groups keep a many-partition write's memory flat. The
/// builds' delta-rs writes and MERGEs take them too: with delta-rs's default row group (1 M
/// rows) a MERGE held each partition file it rewrote whole in memory until the end.
pub(crate) fn writer_properties() -> parquet::file::properties::WriterProperties {
    parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .set_max_row_group_row_count(Some(32 * 1024))
        // As in bronze: high-cardinality columns fall back to plain encoding early.
        .set_dictionary_page_size_limit(8 * 1024)
        .build()
}

/// The queries of a chunked build, run one after the other as one single-partition relation
/// (delta-rs writes it in one commit); only one chunk executes, and holds memory, at a time.
pub(super) fn in_sequence(ctx: &SessionContext, chunks: Vec<DataFrame>) -> Result<DataFrame> {
    let schema: arrow::datatypes::SchemaRef = Arc::new(chunks[0].schema().as_arrow().clone());
    let table = datafusion::catalog::streaming::StreamingTable::try_new(
        schema.clone(),
        vec![Arc::new(Sequence { schema, chunks })],
    )?;
    Ok(ctx.read_table(Arc::new(table))?)
}

pub(super) struct Sequence {
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

impl Materializer<'_> {
    /// A delta-rs write that executes `df` in this session and streams its batches into the
    /// model's Parquet files.
    pub(super) fn write_plan(
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

    /// A full build's write: the table replaced whole, in one commit. A partitioned table that
    /// keeps its schema and partitioning (or is new) is written by lake/files.rs, with a few
    /// partition files open at a time, counted in the pool; otherwise by delta-rs's write
    /// (which keeps every partition's file open to the end, and rewrites the table's metadata).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn write_full(
        &self,
        m: &Model,
        t: &TableRef,
        target: DeltaTable,
        df: DataFrame,
        partition_cols: Vec<String>,
        config: HashMap<String, Option<String>>,
        state: &ModelState,
    ) -> Result<DeltaTable> {
        if let Some(schema) = self.bounded_write_schema(&target, &df, &partition_cols) {
            let table_config: HashMap<String, Option<String>> = match target.snapshot() {
                Ok(s) => s
                    .metadata()
                    .configuration()
                    .iter()
                    .map(|(k, v)| (k.clone(), Some(v.clone())))
                    .collect(),
                Err(_) => config.clone(),
            };
            let (num_indexed, stats_cols) =
                deltalake::operations::get_num_idx_cols_and_stats_columns(None, table_config);
            let writer = deltalake::datafile::writer::WriterConfig::new(
                schema.clone(),
                partition_cols.clone(),
                Some(writer_properties()),
                Some(deltalake::table::config::DEFAULT_TARGET_FILE_SIZE),
                None,
                num_indexed,
                stats_cols,
            );
            // On a cluster the rows come back on one stream in whatever order the plan left
            // them (a dedupe's: by key, every partition in every batch), which would send
            // nearly all of them through the writer's late-row sort on this machine. Sorted by
            // the partition columns on the executors instead, they arrive one partition after
            // another.
            let df = if self.catalog.is_clustered() {
                let order = partition_cols
                    .iter()
                    .map(|c| ident(c).sort(true, false))
                    .collect();
                df.sort(order).map_err(|e| sql_error(m, e))?
            } else {
                df
            };
            let plan = df
                .create_physical_plan()
                .await
                .map_err(|e| sql_error(m, e))?;
            tracing::debug!(
                model = %m.name,
                plan = %datafusion::physical_plan::displayable(plan.as_ref()).indent(true),
                "physical plan of a partitioned write"
            );
            let (adds, written) = crate::lake::files::write_partitioned(
                &t.to_string(),
                plan,
                self.ctx.task_ctx(),
                target.log_store().object_store(None),
                writer,
                schema.clone(),
                partition_cols.clone(),
            )
            .await
            .map_err(|e| match e {
                Error::Engine(e) => sql_error(m, e),
                e => e,
            })?;
            tracing::debug!(
                model = %m.name,
                files = adds.len(),
                rows = written.rows,
                closed_early = written.closed_early,
                late_rows = written.late_rows,
                peak_open = written.peak_open,
                "partitioned write"
            );
            return crate::lake::commit::commit_overwrite(
                target,
                t,
                &schema,
                partition_cols,
                config,
                adds,
                written.rows,
                self.commit_metadata(m, state),
                m.config.description.as_deref(),
            )
            .await;
        }
        let mut w = self
            .write_plan(target, df)
            .with_save_mode(SaveMode::Overwrite)
            .with_schema_mode(SchemaMode::Overwrite)
            .with_partition_columns(partition_cols)
            .with_configuration(config)
            .with_table_name(t.to_string());
        if let Some(d) = &m.config.description {
            w = w.with_description(d.clone());
        }
        w.with_commit_properties(self.props(m, state))
            .await
            .map_err(|e| Error::delta(t.to_string(), e))
    }

    /// The Arrow schema a bounded partitioned write gives `df`'s rows: the table's own when it
    /// exists and keeps its schema and partition columns, the schema delta-rs would create
    /// otherwise; None when the table is unpartitioned or changes shape.
    fn bounded_write_schema(
        &self,
        target: &DeltaTable,
        df: &DataFrame,
        partition_cols: &[String],
    ) -> Option<arrow::datatypes::SchemaRef> {
        use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
        if partition_cols.is_empty() {
            return None;
        }
        let arrow =
            deltalake::kernel::normalize_for_delta(&Arc::new(df.schema().as_arrow().clone()));
        let kernel: deltalake::kernel::StructType = arrow.as_ref().try_into_kernel().ok()?;
        if target.version().is_none() {
            // commit_overwrite creates protocol 1/2: a column needing a table feature (a
            // timestamp without time zone, nested types) goes through delta-rs's write.
            use arrow::datatypes::DataType as D;
            let plain = arrow.fields().iter().all(|f| {
                !matches!(
                    f.data_type(),
                    D::Timestamp(_, None)
                        | D::Struct(_)
                        | D::List(_)
                        | D::LargeList(_)
                        | D::Map(..)
                )
            });
            return plain.then_some(arrow);
        }
        let snapshot = target.snapshot().ok()?;
        // Same columns in the same order (StructType equality ignores the order, and the rows
        // are matched to the table's columns by position).
        let same_order = snapshot
            .schema()
            .fields()
            .map(|f| f.name())
            .eq(kernel.fields().map(|f| f.name()));
        let same = same_order
            && snapshot.schema().as_ref() == &kernel
            && snapshot.metadata().partition_columns() == partition_cols
            && snapshot.protocol().min_writer_version() <= 2;
        same.then(|| snapshot.snapshot().arrow_schema())
    }

    /// A commit with no data that records the model's new build state (nothing changed, but the
    /// upstream versions it has seen moved on).
    pub(super) async fn record_state(
        &self,
        m: &Model,
        t: &TableRef,
        target: DeltaTable,
        state: &ModelState,
    ) -> Result<DeltaTable> {
        use deltalake::protocol::DeltaOperation;
        // No actions but the commit info carrying the state (delta-rs's write refuses an
        // empty input).
        crate::lake::commit::commit_actions(
            target,
            t,
            Vec::new(),
            self.props(m, state),
            DeltaOperation::Write {
                mode: SaveMode::Append,
                partition_by: None,
                predicate: None,
            },
        )
        .await
    }

    /// A new model table's configuration: `delta.dataSkippingStatsColumns`, every column but
    /// the PII ones, and silt's checkpoint interval.
    pub(super) fn stats_config(
        &self,
        m: &Model,
        cols: &[String],
    ) -> HashMap<String, Option<String>> {
        let keep: Vec<&String> = cols
            .iter()
            .filter(|c| {
                !self.pii.contains(*c)
                    && !m.config.pii.contains(*c)
                    && m.config.subject_key.as_ref() != Some(*c)
            })
            .collect();
        let mut m = HashMap::new();
        m.insert(
            "delta.checkpointInterval".to_string(),
            Some(crate::lake::commit::CHECKPOINT_INTERVAL.to_string()),
        );
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

    pub(super) fn props(&self, m: &Model, state: &ModelState) -> CommitProperties {
        CommitProperties::default().with_metadata(self.commit_metadata(m, state))
    }

    /// The `silt.*` metadata of a build's commit: operation, model, run and build state.
    pub(super) fn commit_metadata(
        &self,
        m: &Model,
        state: &ModelState,
    ) -> Vec<(String, serde_json::Value)> {
        vec![
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
        ]
    }

    /// The model's SQL rendered with `relations` and planned in the session (pseudonymized
    /// columns replaced in the SQL itself, so every materialization, and a snapshot's re-plan,
    /// sees only the pseudonyms). SQL errors name the model file.
    pub(super) async fn plan(
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
    pub(super) fn partition_chunks(
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
    pub(super) async fn write(
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
            let config = self.stats_config(m, &schema_cols);
            let table = self
                .write_full(m, t, target, df, partition_cols, config, state)
                .await?;
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
    pub(super) async fn roll_back(
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
}
