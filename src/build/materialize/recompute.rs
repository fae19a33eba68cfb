//! What changed upstream, row by row, for builds that read changes rather than files: the
//! values of a `recompute_by` column whose rows changed since the last build (diffing two versions
//! of a table, shared across the models of a run), and the rows of removed files that added files
//! hold again. It must not write tables.

use super::*;

impl Materializer<'_> {
    /// The relations of a `recompute_by` build of `m`: the values of `column` that changed in
    /// any upstream since the versions in `prev`, registered as one relation (its name is
    /// returned), and each upstream that has the column filtered to them. `None` means a full
    /// rebuild: an upstream without the column changed (any of the model's rows may depend on
    /// it), a version read last time is gone, or the values cover most of the target anyway
    /// (recomputing them would hold most of the table in memory).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn recompute_plan(
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
    pub(super) async fn changes_of(
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
        let a = self.catalog.files_scan(ut, added).await?;
        let r = self.catalog.files_scan(&then, removed.clone()).await?;
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
    pub(super) async fn missing_files(
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
    pub(super) async fn without_removed(
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
        let p = self.catalog.files_scan(then, removed).await?;
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

    /// The columns of `m` that models reading it recompute by (`recompute_by`).
    pub(super) fn recompute_consumers(&self, m: &Model, cols: &[String]) -> Vec<String> {
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
    pub(super) async fn changed_values(
        &self,
        m: &Model,
        consumers: &[String],
        src: &str,
        stale: Option<&str>,
        old: &str,
        old_of: &(dyn Fn(&str) -> String + Sync),
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
}
