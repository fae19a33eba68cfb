//! The in-place steps of an erasure: each file of a table holding a subject rewritten without
//! its rows (a new table version), file by file in tasks, and the models rebuilt or rewritten in
//! place after their upstream. It must not delete older files (purge.rs does).

use super::*;

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
        // Each file in its own task, `files_at_once()` at a time: the matched columns decoded,
        // and a file holding a subject rewritten right away (its bytes are still in the page
        // cache, and no core waits for the slowest scan before the rewrites start). The
        // rewrite reads the whole rows (partition columns included) and writes the others to
        // a new file: memory holds one batch per task, not the table. The rewritten files are
        // encoded as the table's own writer encodes them (bronze: LZ4 and its encodings;
        // models: Snappy, 32k-row groups), not with delta-rs's defaults.
        let needles = self.n.clone();
        let cols = Arc::new(how.columns());
        step.files_scanned = files.len() as u64;
        let target = Arc::new(schema);
        let snapshot = snap.snapshot().clone();
        let props = crate::ops::maintenance::own_writer_properties(&self.silt.project, t, &target);
        let partition_columns = Arc::new(snapshot.metadata().partition_columns().to_vec());
        let writer_config = rewrite::writer_config(&snapshot, target.clone(), props);
        let ctx = rewrite::reading_session(lake)?;
        let drop: rewrite::DropRows = {
            let (how, needles) = (how.clone(), needles.clone());
            Arc::new(move |b: &RecordBatch| Ok(how.mask(b, &needles)))
        };
        let jobs = files.iter().map(|(path, _)| {
            let rel = t.rel_path();
            let (n, how, cols) = (needles.clone(), how.clone(), cols.clone());
            let job = rewrite::FileRewrite {
                table: table.clone(),
                ctx: ctx.clone(),
                path: path.clone(),
                drop: drop.clone(),
                target: target.clone(),
                writer_config: writer_config.clone(),
                t: t.clone(),
                lake: lake.clone(),
                partition_columns: partition_columns.clone(),
            };
            async move {
                let mut hits = 0;
                for b in decode_parquet_for(
                    job.lake.get_file(&rel, &job.path).await?,
                    &job.path,
                    Some(&cols),
                )? {
                    hits += how.mask(&b, &n).true_count();
                }
                if hits == 0 {
                    return Ok(None);
                }
                job.run().await.map(Some)
            }
        });
        let outcomes = each_in_a_task(jobs, "erasure rewrite").await;
        let mut hits = Vec::new();
        let mut adds = Vec::new();
        let mut seen = SeenFiles::default();
        for ((path, remove), outcome) in files.into_iter().zip(outcomes) {
            match outcome? {
                Some(w) => {
                    adds.extend(w.adds);
                    step.rows_deleted += w.dropped;
                    hits.push((path, remove));
                }
                None => {
                    seen.clean.insert(same_path(&path));
                }
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
