//! The in-place steps of an erasure: each file of a table holding a subject rewritten without
//! its rows (a new table version), file by file in tasks, and the models rebuilt or rewritten in
//! place after their upstream. It must not delete older files (purge.rs does).

use super::*;

pub(super) fn decode_parquet(data: Bytes, what: &str) -> Result<Vec<RecordBatch>> {
    decode_parquet_for(data, what, None)
}

/// Decode a Parquet file; with `cols`, only those of them the file has (none of them: nothing
/// to match, no rows).
pub(super) fn decode_parquet_for(
    data: Bytes,
    what: &str,
    cols: Option<&[String]>,
) -> Result<Vec<RecordBatch>> {
    let err = |source: parquet::errors::ParquetError| Error::Parquet {
        what: format!("{what}: cannot read Parquet"),
        source,
    };
    let mut builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(data)
        .map_err(err)?;
    if let Some(cols) = cols {
        let present: Vec<&str> = cols
            .iter()
            .map(String::as_str)
            .filter(|c| builder.schema().field_with_name(c).is_ok())
            .collect();
        if present.is_empty() {
            return Ok(Vec::new());
        }
        let mask = parquet::arrow::ProjectionMask::columns(builder.parquet_schema(), present);
        builder = builder.with_projection(mask);
    }
    let reader = builder.build().map_err(err)?;
    reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Parquet {
            what: format!("{what}: cannot read Parquet"),
            source: e.into(),
        })
}

/// How many files an in-place erasure scans or rewrites at once: one per core of the 2-core
/// machine it is measured on, each holding one batch.
pub(super) const FILES_AT_ONCE: usize = 2;

/// Each job in its own tokio task, `FILES_AT_ONCE` at a time; the results in the jobs' order.
pub(super) async fn each_in_a_task<T, F>(
    jobs: impl Iterator<Item = F>,
    what: &str,
) -> Vec<Result<T>>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T>> + Send + 'static,
{
    in_tasks(jobs, what).collect().await
}

/// Like [`each_in_a_task`], as a stream: a result is handed over as soon as it and the ones
/// before it are done, so at most `FILES_AT_ONCE` jobs (and what they hold) are in flight.
pub(super) fn in_tasks<'w, T, F>(
    jobs: impl Iterator<Item = F> + 'w,
    what: &'w str,
) -> impl futures::Stream<Item = Result<T>> + 'w
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T>> + Send + 'static,
{
    in_tasks_ahead(jobs, what, FILES_AT_ONCE)
}

/// [`in_tasks`] with `ahead` jobs in flight: more than the cores when the consumer does slow
/// work of its own between results (the tasks go on while it writes).
pub(super) fn in_tasks_ahead<'w, T, F>(
    jobs: impl Iterator<Item = F> + 'w,
    what: &'w str,
    ahead: usize,
) -> impl futures::Stream<Item = Result<T>> + 'w
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T>> + Send + 'static,
{
    futures::stream::iter(
        jobs.map(
            move |job| async move { tokio::spawn(job).await.map_err(|e| Error::task(what, e))? },
        ),
    )
    .buffered(ahead.max(1))
}

/// One data file of an in-place erasure: its rows without the subjects' go to new files.
pub(super) struct FileRewrite {
    pub(super) table: DeltaTable,
    pub(super) ctx: SessionContext,
    pub(super) path: String,
    pub(super) needles: Arc<Needles>,
    pub(super) how: Matcher,
    pub(super) target: Arc<Schema>,
    pub(super) writer_config: deltalake::datafile::writer::WriterConfig,
    pub(super) t: TableRef,
    pub(super) lake: crate::lake::storage::Storage,
    pub(super) partition_columns: Arc<Vec<String>>,
}

impl FileRewrite {
    /// The new files' add actions and the rows left out.
    pub(super) async fn run(self) -> Result<(Vec<deltalake::kernel::Add>, u64)> {
        let Self {
            table,
            ctx,
            path,
            needles,
            how,
            target,
            writer_config,
            t,
            lake,
            partition_columns,
        } = self;
        let provider: Arc<dyn datafusion::catalog::TableProvider> =
            if crate::lake::storage::absolute_url(&path).is_some() {
                // A clone's reference to another table's file: silt's own scan reads it
                // (delta-rs selects only files under the table's root).
                let one: HashSet<String> = [path.clone()].into_iter().collect();
                Arc::new(
                    crate::lake::snapshot_scan::SnapshotScan::try_new(
                        &lake,
                        &t.rel_path(),
                        &table,
                        Some(&one),
                    )
                    .await?,
                )
            } else {
                table
                    .table_provider()
                    .with_session(Arc::new(ctx.state()))
                    .with_file_selection(crate::lake::storage::select_files([path]))
                    .await
                    .map_err(Error::from_datafusion)?
            };
        let mut stream = ctx.read_table(provider)?.execute_stream().await?;
        let mut writer = deltalake::datafile::writer::DeltaWriter::new(
            table.log_store().object_store(None),
            writer_config,
        );
        let mut deleted = 0;
        while let Some(b) = stream.next().await {
            let b = b?;
            let mask = how.mask(&b, &needles);
            deleted += mask.true_count() as u64;
            let keep = arrow::compute::not(&mask)?;
            let kept = arrow::compute::filter_record_batch(&b, &keep)?;
            if kept.num_rows() == 0 {
                continue;
            }
            let cols = target
                .fields()
                .iter()
                .map(|f| {
                    let c = kept.column_by_name(f.name()).ok_or_else(|| {
                        Error::Internal(format!("{t}: column {} missing on read", f.name()))
                    })?;
                    Ok(arrow::compute::cast(c, f.data_type())?)
                })
                .collect::<Result<Vec<_>>>()?;
            let kept = RecordBatch::try_new(target.clone(), cols)?;
            // One file's rows share its partition: written straight to it, without delta-rs
            // sorting and copying every batch to split it by partition values.
            let written = if partition_columns.is_empty() {
                writer.write(&kept).await
            } else {
                let values = crate::lake::files::partition_values(&kept, &partition_columns)?;
                writer.write_partition(kept, &values).await
            };
            written.map_err(|e| Error::delta(t.to_string(), e))?;
        }
        let adds = writer
            .close()
            .await
            .map_err(|e| Error::delta(t.to_string(), e))?;
        Ok((adds, deleted))
    }
}

impl Run<'_> {
    /// Delete the subjects' rows from `t` in one commit that rewrites only the files holding them.
    /// `state`: the model's new build state, when `t` is a model table.
    pub(super) async fn rewrite(
        &mut self,
        t: &TableRef,
        how: &Matcher,
        state: Option<(&str, ModelState)>,
    ) -> Result<Option<u64>> {
        let lake = &self.silt.lake;
        let table = lake.delta_table(&t.rel_path()).await?;
        let Some(version) = table.version() else {
            return Ok(None);
        };
        let snap = table
            .snapshot()
            .map_err(|e| Error::delta(t.to_string(), e))?;
        let schema: Schema = snap.snapshot().arrow_schema().as_ref().clone();
        let mut step = TableErasure::new(t.to_string(), Step::Rewrite);
        let files: Vec<_> = snap
            .log_data()
            .iter()
            .map(|f| (f.path().to_string(), f.remove_action(true)))
            .collect();
        // The scan decodes the matched columns of every file, `FILES_AT_ONCE` files at a time.
        let needles = self.n.clone();
        let cols = Arc::new(how.columns());
        step.files_scanned = files.len() as u64;
        let scans = files.iter().map(|(path, _)| {
            let rel = t.rel_path();
            let (lake, path, n, how, cols) = (
                lake.clone(),
                path.clone(),
                needles.clone(),
                how.clone(),
                cols.clone(),
            );
            async move {
                let mut hits = 0;
                for b in decode_parquet_for(lake.get_file(&rel, &path).await?, &path, Some(&cols))?
                {
                    hits += how.mask(&b, &n).true_count();
                }
                Ok(hits)
            }
        });
        let counts = each_in_a_task(scans, "erasure scan").await;
        let mut hits = Vec::new();
        let mut seen = SeenFiles::default();
        for ((path, remove), n) in files.into_iter().zip(counts) {
            if n? > 0 {
                hits.push((path, remove));
            } else {
                seen.clean.insert(same_path(&path));
            }
        }
        if hits.is_empty() {
            self.seen.insert(t.to_string(), seen);
            // Nothing to delete; a model still records that its upstream moved on.
            if let Some((model, st)) = state
                && last_state(&table).await?.as_ref() != Some(&st)
            {
                let v = self.commit(&table, t, vec![], 0, Some((model, st))).await?;
                step.version = Some(v);
                self.push_step(step);
                return Ok(Some(v));
            }
            return Ok(None);
        }
        // Read the whole rows of each such file (partition columns included) and write the
        // others to a new file, one file at a time: memory holds one batch, not the table.
        let target = Arc::new(schema);
        let snapshot = snap.snapshot().clone();
        let mut config: HashMap<String, Option<String>> = snapshot
            .metadata()
            .configuration()
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        config.retain(|k, _| k.starts_with("delta.dataSkipping"));
        let (num_indexed, stats_cols) =
            deltalake::operations::get_num_idx_cols_and_stats_columns(None, config);
        // The rewritten files are encoded as the table's own writer encodes them (bronze: LZ4
        // and its encodings; models: Snappy, 32k-row groups), not with delta-rs's defaults.
        let props = crate::ops::maintenance::own_writer_properties(&self.silt.project, t, &target);
        let partition_columns = Arc::new(snapshot.metadata().partition_columns().to_vec());
        let writer_config = deltalake::datafile::writer::WriterConfig::new(
            target.clone(),
            partition_columns.to_vec(),
            props,
            None,
            None,
            num_indexed,
            stats_cols,
        );
        // Strings read as the files store them (no view types to cast back before writing).
        let mut session = datafusion::prelude::SessionConfig::new();
        session
            .options_mut()
            .execution
            .parquet
            .schema_force_view_types = false;
        let ctx = SessionContext::new_with_config_rt(
            session,
            datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
                .with_object_store_registry(lake.registry())
                .build_arc()?,
        );
        // Each file in its own task: one batch per file in memory, both cores busy.
        let jobs = hits.iter().map(|(path, _)| {
            FileRewrite {
                table: table.clone(),
                ctx: ctx.clone(),
                path: path.clone(),
                needles: needles.clone(),
                how: how.clone(),
                target: target.clone(),
                writer_config: writer_config.clone(),
                t: t.clone(),
                lake: lake.clone(),
                partition_columns: partition_columns.clone(),
            }
            .run()
        });
        let written = each_in_a_task(jobs, "erasure rewrite").await;
        let mut adds = Vec::new();
        for w in written {
            let (a, deleted) = w?;
            adds.extend(a);
            step.rows_deleted += deleted;
        }
        step.files_added = adds.len() as u64;
        step.files_rewritten = hits.iter().map(|h| h.0.clone()).collect();
        seen.hit
            .extend(step.files_rewritten.iter().map(|p| same_path(p)));
        seen.clean.extend(adds.iter().map(|a| same_path(&a.path)));
        let mut actions: Vec<Action> = hits.into_iter().map(|h| Action::Remove(h.1)).collect();
        actions.extend(adds.into_iter().map(Action::Add));
        let v = self
            .commit(&table, t, actions, step.rows_deleted, state)
            .await?;
        self.seen.insert(t.to_string(), seen);
        let _ = version;
        step.version = Some(v);
        self.step_audit(&step).await?;
        self.push_step(step);
        Ok(Some(v))
    }

    pub(super) async fn commit(
        &self,
        table: &DeltaTable,
        t: &TableRef,
        actions: Vec<Action>,
        rows: u64,
        state: Option<(&str, ModelState)>,
    ) -> Result<u64> {
        let removed = actions
            .iter()
            .filter(|a| matches!(a, Action::Remove(_)))
            .count();
        let added = actions
            .iter()
            .filter(|a| matches!(a, Action::Add(_)))
            .count();
        let mut meta: HashMap<String, serde_json::Value> = HashMap::new();
        meta.insert("silt.operation".into(), "erasure".into());
        meta.insert("silt.erasure.request".into(), self.request.clone().into());
        meta.insert(
            "operationMetrics".into(),
            serde_json::json!({
                "numDeletedRows": rows,
                "numRemovedFiles": removed,
                "numAddedFiles": added,
            }),
        );
        if let Some((model, st)) = state {
            meta.insert("silt.model".into(), model.into());
            meta.insert(
                "silt.run_id".into(),
                format!("erasure-{}", self.request).into(),
            );
            meta.insert(
                "silt.state".into(),
                serde_json::to_value(st).unwrap_or_default(),
            );
        }
        let snap = table
            .snapshot()
            .map_err(|e| Error::delta(t.to_string(), e))?;
        let done = CommitBuilder::default()
            .with_actions(actions)
            .with_app_metadata(meta)
            .build(
                Some(snap),
                table.log_store(),
                DeltaOperation::Delete {
                    // The predicate names the request, never a subject.
                    predicate: Some(format!("GDPR erasure {}", self.request)),
                },
            )
            .await
            .map_err(|e| Error::delta(t.to_string(), e))?;
        Ok(done.version() as u64)
    }

    /// The models of the plan, in dag order.
    /// Returns what each model step did, for the run log.
    pub(super) async fn models(
        &mut self,
        dag: &Dag,
        plan: &Plan,
        key: &str,
    ) -> Result<Vec<ModelMetrics>> {
        let silt = self.silt;
        let pii: BTreeSet<String> = silt.project.no_stats_columns();
        let ctx = silt.catalog.session().await?;
        let run_id = format!("erasure-{}", self.request);
        let mk = |full_refresh: bool| Materializer {
            catalog: &silt.catalog,
            dag,
            ctx: &ctx,
            run_id: &run_id,
            full_refresh,
            pii: &pii,
            hmac_key: Some(key),
            changes: Default::default(),
            rebuild_changed: false,
        };
        let mut rebuilt: Vec<ModelMetrics> = Vec::new();
        for (name, scope) in &plan.models {
            let m = &dag.models[name];
            let t = m.table();
            let table = silt.lake.delta_table(&t.rel_path()).await?;
            if table.version().is_none() {
                continue;
            }
            let keyed = scope.is_keyed();
            let keeps_history = matches!(
                m.config.materialized,
                Materialized::Incremental | Materialized::Snapshot | Materialized::Append
            );
            if keyed && keeps_history {
                let state = match last_state(&table).await? {
                    Some(mut st) => {
                        for (u, v) in st.upstream.iter_mut() {
                            if let Ok(ut) = TableRef::parse(u)
                                && let Some(now) = erasure_caught_up(silt, &ut, *v).await?
                            {
                                *v = now;
                            }
                        }
                        Some(st)
                    }
                    None => None,
                };
                let how = Matcher::Columns(scope.clone());
                let started = Instant::now();
                if let Some(v) = self
                    .rewrite(&t, &how, state.map(|s| (name.as_str(), s)))
                    .await?
                    && let Some(step) = self.steps.last().filter(|s| s.table == t.to_string())
                {
                    rebuilt.push(ModelMetrics {
                        model: name.clone(),
                        table: t.to_string(),
                        materialized: "erasure".into(),
                        status: ModelStatus::Built,
                        mode: BuildMode::InPlace,
                        counts: crate::lake::meta::runs::BuildCounts {
                            rows_deleted: step.rows_deleted,
                            files_added: step.files_added,
                            files_removed: step.files_rewritten.len() as u64,
                            ..Default::default()
                        },
                        version: Some(v),
                        ms: started.elapsed().as_millis() as u64,
                        ..Default::default()
                    });
                }
                failpoint::hit("forget.table");
            } else {
                // Rebuilt from upstream (which no longer holds the subjects). History-keeping
                // models without the key carry the subjects inside aggregates: from scratch.
                let mat = mk(keeps_history);
                let fresh = TableErasure::new(t.to_string(), Step::Rebuild);
                let mm = mat.build(m).await?;
                if mm.status != ModelStatus::UpToDate {
                    let step = TableErasure {
                        rows_deleted: mm.counts.rows_deleted,
                        files_added: mm.counts.files_added,
                        version: mm.version,
                        partitions: mm.partitions.clone(),
                        ..fresh
                    };
                    self.step_audit(&step).await?;
                    self.push_step(step);
                    rebuilt.push(mm);
                }
                failpoint::hit("forget.table");
            }
        }
        Ok(rebuilt)
    }
}
