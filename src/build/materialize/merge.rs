//! The incremental MERGE: the increment's rows the target does not hold yet are upserted by
//! unique key, a key that moved partition is deleted from its old one, and the rows a recompute
//! no longer yields are deleted; or, when that would rewrite most of an unpartitioned table, the
//! table is written again. It must not decide whether a build is incremental (mod.rs does).

use super::*;

/// A MERGE's increment (the rows to write), and the rows to delete with it.
pub(super) const MERGE_SRC: &str = "__silt_src";

pub(super) const MERGE_STALE: &str = "__silt_stale";

/// The target's current partition (and recompute columns) of each key of the increment.
pub(super) const MERGE_OLD: &str = "__silt_old";

/// The increment's row numbers, while [`Materializer::not_yet_held`] compares it with the target.
const ROW: &str = "__silt_row";
const FOUND: &str = "__silt_found";
const PLACED: &str = "__silt_placed";

/// The increment's rows that change the target, and of those, the ones whose key the target
/// does not hold in the row's own partition (`None`: not known, look every key up).
pub(super) struct NotYetHeld {
    pub(super) changed: Vec<RecordBatch>,
    pub(super) unplaced: Option<RecordBatch>,
}

/// `batch` with row numbers in a last column [`ROW`].
fn with_row_index(batch: RecordBatch) -> Result<RecordBatch> {
    let n = batch.num_rows() as u64;
    let mut fields: Vec<arrow::datatypes::FieldRef> =
        batch.schema().fields().iter().cloned().collect();
    fields.push(Arc::new(arrow::datatypes::Field::new(
        ROW,
        DataType::UInt64,
        false,
    )));
    let mut columns = batch.columns().to_vec();
    columns.push(Arc::new(arrow::array::UInt64Array::from_iter_values(0..n)));
    Ok(RecordBatch::try_new(
        Arc::new(arrow::datatypes::Schema::new(fields)),
        columns,
    )?)
}

/// `batches` without the bookkeeping columns ([`ROW`], [`PLACED`]).
fn without_row_index(batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
    batches
        .into_iter()
        .map(|b| {
            let keep: Vec<usize> = (0..b.num_columns())
                .filter(|&i| ![ROW, PLACED].contains(&b.schema().field(i).name().as_str()))
                .collect();
            Ok(b.project(&keep)?)
        })
        .collect()
}

/// The placed pass's rows split into changed and unplaced rows; `None` when a row came out
/// twice (the target holds its key twice).
fn split_placed(rows: Vec<RecordBatch>) -> Result<Option<NotYetHeld>> {
    let mut seen = std::collections::HashSet::new();
    let mut unplaced = Vec::new();
    for b in &rows {
        let (Ok(r), Ok(pl)) = (b.schema().index_of(ROW), b.schema().index_of(PLACED)) else {
            return Ok(None);
        };
        let r = b
            .column(r)
            .as_any()
            .downcast_ref::<arrow::array::UInt64Array>();
        let pl = b
            .column(pl)
            .as_any()
            .downcast_ref::<arrow::array::BooleanArray>();
        let (Some(r), Some(pl)) = (r, pl) else {
            return Ok(None);
        };
        if pl.null_count() > 0 || !r.values().iter().all(|&i| seen.insert(i)) {
            return Ok(None);
        }
        let not_placed = arrow::compute::not(pl)?;
        unplaced.push(arrow::compute::filter_record_batch(b, &not_placed)?);
    }
    let unplaced = without_row_index(unplaced)?;
    let Some(first) = unplaced.first() else {
        return Ok(None);
    };
    Ok(Some(NotYetHeld {
        unplaced: Some(arrow::compute::concat_batches(&first.schema(), &unplaced)?),
        changed: without_row_index(rows)?,
    }))
}

/// The increment's rows whose old partition is looked up (the others keep theirs).
const MERGE_LOOKUP: &str = "__silt_lookup";

/// The column of [`MERGE_OLD`] holding the target's current value of `c`.
pub(super) fn old_of(c: &str) -> String {
    format!("__silt_old_{}", c.replace('"', ""))
}

/// `t.k = s.k AND …` over the unique key.
pub(super) fn key_eq(keys: &[String]) -> String {
    keys.iter()
        .map(|k| format!("t.{c} = s.{c}", c = q(k)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// on_schema_change: whether the target gains columns (`in_target` says which it has); an
/// error naming them when the model does not allow it.
pub(super) fn new_columns_allowed(
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
pub(super) fn staged_sql(m: &Model, cols: &[String], stale: bool) -> (String, String) {
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
pub(super) const KEY_RANGE: &str = "__silt_in_range";

pub(super) fn merge_metrics(
    metrics: &mut ModelMetrics,
    mm: &deltalake::operations::merge::MergeMetrics,
) {
    metrics.counts.rows_inserted = mm.num_target_rows_inserted as u64;
    metrics.counts.rows_updated = mm.num_target_rows_updated as u64;
    metrics.counts.rows_deleted = mm.num_target_rows_deleted as u64;
    metrics.counts.rows_copied = mm.num_target_rows_copied as u64;
    metrics.counts.files_scanned = mm.num_target_files_scanned as u64;
    metrics.counts.files_skipped = mm.num_target_files_skipped_during_scan as u64;
}

impl Materializer<'_> {
    /// The table written again as its rows whose key is neither recomputed (`__silt_src`, the
    /// changed rows) nor stale (`__silt_stale`), followed by the changed rows: one streamed
    /// overwrite. Metrics count the changed rows that replace a row (updated), the others
    /// (inserted) and the stale rows (deleted).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn rewrite_recomputed(
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
        metrics.counts.rows_updated = updated;
        metrics.counts.rows_inserted = changed_rows.saturating_sub(updated);
        metrics.counts.rows_deleted = stale_rows as u64;
        metrics.message = Some(format!(
            "{} value(s) of {} recomputed; the table was rewritten in one pass",
            rc.values, rc.column
        ));
        Ok(table)
    }

    /// Incremental MERGE on unique_key, run file by file (merge_files.rs; delta-rs's MERGE
    /// where that does not apply). With partition_by, a key matches within its partition
    /// (`t.p = s.p`), so only the files of the staged rows' partitions are read, and a row
    /// whose partition changed is deleted from its old partition in the same commit.
    /// With `recompute`, the increment is every output row of the recomputed values, and
    /// target rows of those values that it no longer holds are deleted in the same commit.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn merge(
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
        // Keys that keep their partition need no lookup of their old one; only when nothing
        // downstream recomputes from this table's old values (those need every key's).
        let consumers = self.recompute_consumers(m, &cols);
        let placed = consumers.is_empty() && m.config.partition_by.is_some();
        let _ = self.ctx.deregister_table(MERGE_SRC);
        self.ctx.register_batch(
            MERGE_SRC,
            with_row_index(arrow::compute::concat_batches(
                &batches[0].schema(),
                &batches,
            )?)?,
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
        let NotYetHeld { changed, unplaced } = self
            .not_yet_held(
                m,
                t,
                &target,
                &cols,
                &target_cols,
                |c| target_schema.field(c).is_some(),
                placed,
            )
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
        let _ = self.ctx.deregister_table(MERGE_OLD);
        self.register_old(m, t, &consumers, unplaced).await?;
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
        let (staged_sql, mut predicate) = staged_sql(m, &cols, stale_rows > 0);
        let staged = self
            .ctx
            .sql(&staged_sql)
            .await
            .map_err(|e| sql_error(m, e))?;
        let staged = staged.collect().await?;
        if let Some(p) = &m.config.partition_by
            && staged.iter().any(|b| {
                b.column_by_name(p)
                    .is_some_and(|c| c.logical_null_count() > 0)
            })
        {
            // Rows of the NULL partition (to write, or to delete from it): `=` would never
            // match them, and each would be inserted again beside its old version. delta-rs
            // still prunes the target's files by the source's partition values.
            let null_safe = |k: &String| {
                if k == p {
                    format!("t.{c} is not distinct from s.{c}", c = q(k))
                } else {
                    format!("t.{c} = s.{c}", c = q(k))
                }
            };
            let keys = &m.config.unique_key;
            let mut on: Vec<String> = keys.iter().map(null_safe).collect();
            if !keys.contains(p) {
                on.push(null_safe(p));
            }
            predicate = on.join(" AND ");
        }
        tracing::debug!(model = %m.name, ms = phase.elapsed().as_millis() as u64, "merge: staged");
        for name in [MERGE_SRC, MERGE_STALE, MERGE_OLD] {
            let _ = self.ctx.deregister_table(name);
        }
        let changes = changes.map_err(|e| self.changed_values_error(m, &consumers, e))?;
        let (table, mm) = match super::merge_files::own_merge_blocker(&target, m, &cols, evolve) {
            None => {
                self.merge_files(m, t, target, staged, &predicate, state)
                    .await?
            }
            Some(why) => {
                tracing::debug!(model = %m.name, why, "merge: delta-rs's MERGE");
                let staged = self.ctx.read_batches(staged)?;
                self.run_merge(m, t, target, staged, predicate, evolve, &cols, state)
                    .await?
            }
        };
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
    /// With `placed` (partition_by, a unique key), the same pass also tells which changed rows
    /// replace a key held in their own partition: only the others (new keys, moved keys) need
    /// [`Materializer::register_old`]'s lookup over the table.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn not_yet_held(
        &self,
        m: &Model,
        t: &TableRef,
        target: &DeltaTable,
        cols: &[String],
        target_cols: &str,
        in_target: impl Fn(&str) -> bool,
        placed: bool,
    ) -> Result<NotYetHeld> {
        // The increment's partitions as literals: a subquery would not prune the target's files.
        let existing = match &m.config.partition_by {
            Some(p) if in_target(p.as_str()) => {
                let pq = q(p);
                let parts = self
                    .collect(
                        m,
                        &format!("select distinct cast({pq} as varchar) from {MERGE_SRC}"),
                    )
                    .await?;
                let mut list = Vec::new();
                let mut null = false;
                for b in &parts {
                    let c = arrow::compute::cast(b.column(0), &DataType::Utf8)?;
                    let c = c.as_any().downcast_ref::<arrow::array::StringArray>();
                    for v in c.into_iter().flatten() {
                        match v {
                            Some(v) => list.push(literal(v)),
                            None => null = true,
                        }
                    }
                }
                // The NULL partition too, when the increment has rows for it.
                let mut wheres = Vec::new();
                if !list.is_empty() {
                    wheres.push(partition_in(p, string_column(target, p), &list.join(", ")));
                }
                if null {
                    wheres.push(format!("{pq} is null"));
                }
                if wheres.is_empty() {
                    format!("select {target_cols} from {t} where false")
                } else {
                    format!(
                        "select {target_cols} from {t} where {}",
                        wheres.join(" or ")
                    )
                }
            }
            _ => format!("select {target_cols} from {t}"),
        };
        // A join rather than EXCEPT: the increment's rows are unique by key (checked above), so
        // EXCEPT's deduplication of every row, a hash aggregate over all columns, buys nothing.
        let keys = &m.config.unique_key;
        let same = |c: &String| format!("(s.{c} is not distinct from e.{c})", c = q(c));
        let all_same = cols.iter().map(same).collect::<Vec<_>>().join(" and ");
        if !keys.is_empty() && keys.iter().all(|k| cols.contains(k)) {
            // One left join hashed on the key alone (only `is not distinct from` in its ON
            // clause: DataFusion makes those the hash keys); the other columns are compared
            // above the join, on rows of equal keys. A row is held when every column equals
            // (NULL matching NULL) its key's target row, placed when that row lies in the
            // row's own partition. The target holds each key once (MERGEs upsert by key, full
            // builds are checked for it), so a row finds at most one; `__silt_row` checks it,
            // and a second find falls back to the anti join on every column below.
            let placed_by = m
                .config
                .partition_by
                .as_ref()
                .filter(|p| placed && cols.contains(p) && in_target(p.as_str()));
            let placed_expr = match placed_by {
                Some(p) => format!("(e.{FOUND} is not null and {})", same(p)),
                None => "false".to_string(),
            };
            let on = keys.iter().map(same).collect::<Vec<_>>().join(" and ");
            let df = self
                .ctx
                .sql(&format!(
                    "select s.*, {placed_expr} as {PLACED} \
                     from {MERGE_SRC} s left join (select *, true as {FOUND} from ({existing}) x) e on {on} \
                     where e.{FOUND} is null or not ({all_same})"
                ))
                .await
                .map_err(|e| sql_error(m, e))?;
            let rows = collect_nonempty(df).await?;
            if let Some(held) = split_placed(rows)? {
                return Ok(NotYetHeld {
                    unplaced: held.unplaced.filter(|_| placed_by.is_some()),
                    changed: held.changed,
                });
            }
            tracing::warn!(model = %m.name, "{t} holds a key twice in the rows read; comparing every column instead");
        }
        let df = self
            .ctx
            .sql(&format!(
                "select s.* from {MERGE_SRC} s left anti join ({existing}) e on {all_same}"
            ))
            .await
            .map_err(|e| sql_error(m, e))?;
        Ok(NotYetHeld {
            changed: without_row_index(collect_nonempty(df).await?)?,
            unplaced: None,
        })
    }

    /// Recompute: the target rows of the recomputed values whose key the new result lacks,
    /// registered as [`MERGE_STALE`] (to delete); how many there are.
    pub(super) async fn register_stale(
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
    /// is needed. With `only`, the keys of those rows alone are looked up (the others are
    /// known to keep their partition).
    pub(super) async fn register_old(
        &self,
        m: &Model,
        t: &TableRef,
        consumers: &[String],
        only: Option<RecordBatch>,
    ) -> Result<()> {
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
        let _ = self.ctx.deregister_table(MERGE_LOOKUP);
        let (src, in_range) = match only {
            None => (MERGE_SRC, self.in_key_range(m, t, MERGE_SRC).await?),
            Some(rows) => {
                let none = rows.num_rows() == 0;
                self.ctx.register_batch(MERGE_LOOKUP, rows)?;
                let in_range = if none {
                    format!("(select * from {t} where false)")
                } else {
                    self.in_key_range(m, t, MERGE_LOOKUP).await?
                };
                (MERGE_LOOKUP, in_range)
            }
        };
        let old = async {
            let df = self
                .ctx
                .sql(&format!(
                    "select {picked} from {src} s join {in_range} t on {}",
                    key_eq(keys)
                ))
                .await?;
            collect_nonempty(df).await
        }
        .await
        .map_err(|e| sql_error(m, e));
        let _ = self.ctx.deregister_table(KEY_RANGE);
        let _ = self.ctx.deregister_table(MERGE_LOOKUP);
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
    pub(super) fn changed_values_error(&self, m: &Model, consumers: &[String], e: Error) -> Error {
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
    pub(super) async fn run_merge(
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
            .with_writer_properties(model_writer_properties())
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
    pub(super) async fn in_key_range(&self, m: &Model, t: &TableRef, src: &str) -> Result<String> {
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
}
