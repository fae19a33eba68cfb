//! What an incremental build reads: per upstream table, the rows of the files added since the
//! last build (without those of removed files that came back), with lookback context, or the
//! partitions whose files changed; and why a build runs in full when it cannot tell. It must not
//! write tables.

use super::*;

/// Why an incremental build runs in full instead; `warn`: the user should be told (a version
/// it needs was vacuumed or purged), not just a choice of the cheaper way.
pub(super) struct FullBuild {
    pub(super) why: String,
    pub(super) warn: bool,
}

impl FullBuild {
    pub(super) fn info(why: String) -> Self {
        FullBuild { why, warn: false }
    }
    pub(super) fn warn(why: String) -> Self {
        FullBuild { why, warn: true }
    }
}

/// A `recompute_by` build: the column, and the relation of its values to recompute.
pub(super) struct Recompute {
    pub(super) column: String,
    pub(super) keys: String,
    /// How many values are recomputed, and the target's rows before the build.
    pub(super) values: u64,
    pub(super) target_rows: u64,
}

/// What an incremental build reads, or that (and why) it runs in full.
pub(super) struct Increment {
    pub(super) incremental: bool,
    /// Upstream table → the relation of its rows to read (new rows, or the partitions to redo).
    pub(super) relations: BTreeMap<String, String>,
    /// partition_overwrite: the partition values that changed upstream.
    pub(super) touched: BTreeSet<String>,
    pub(super) recompute: Option<Recompute>,
    /// Why it runs in full, when there is more to say than "first build".
    pub(super) fallback: Option<FullBuild>,
    /// Tables registered in the scratch schema for this build, dropped after it.
    pub(super) registered: Vec<String>,
}

impl Increment {
    /// A full build.
    pub(super) fn full(why: Option<FullBuild>) -> Self {
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
pub(super) fn partition_columns(t: &DeltaTable) -> Vec<String> {
    t.snapshot()
        .map(|s| s.metadata().partition_columns().to_vec())
        .unwrap_or_default()
}

/// Upstream `u` filtered to the partitions of `column` with these values: the relation an
/// incremental partition_overwrite build, or one chunk of a chunked build, reads.
pub(super) fn in_partitions<'v>(
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

impl Materializer<'_> {
    /// What an incremental build of `m` reads, from what changed upstream since `prev`; or
    /// why it runs in full instead.
    pub(super) async fn increment(
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
    pub(super) async fn upstream_change(
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
                let p = self.catalog.files_scan(ut, Vec::<String>::new()).await?;
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
        let p = self
            .catalog
            .files_scan(ut, added.iter().map(|s| s.to_string()))
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
    pub(super) async fn with_lookback(
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
        let cp = self.catalog.files_scan(ut, old).await?;
        let ctx_name = format!("{name}__context");
        self.new_schema()?.register_table(ctx_name.clone(), cp)?;
        inc.registered.push(ctx_name.clone());
        Ok(format!(
            "(select * from {rel} union all select * from {NEW_SCHEMA}.{ctx_name} where {c} >= cast('{start}' as date) - interval '{days} days')",
            c = q(lcol)
        ))
    }
}
