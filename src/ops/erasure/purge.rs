//! The purge step of an erasure: every file, live or retained, that still holds a subject is
//! deleted, and the log entries that point at them (or whose statistics name a subject), so no
//! older version can bring the data back; the versions made unreadable are audited. It must not
//! rewrite live data (tables.rs does).

use super::*;

/// Whether a log file (a JSON commit or a Parquet checkpoint) references one of `doomed` or
/// carries a subject in a file's statistics (a key column's min or max, a PII value).
pub(super) fn log_mentions(
    name: &str,
    data: Bytes,
    doomed: &HashSet<&str>,
    how: &Matcher,
    n: &Needles,
) -> Result<bool> {
    if name.ends_with(".json") {
        for line in data.split(|b| *b == b'\n') {
            let Ok(a) = serde_json::from_slice::<serde_json::Value>(line) else {
                continue;
            };
            for kind in ["add", "remove"] {
                let Some(f) = a.get(kind) else { continue };
                if f.get("path")
                    .and_then(|p| p.as_str())
                    .map(same_path)
                    .is_some_and(|p| {
                        doomed.contains(p.as_str()) || doomed.iter().any(|d| p.ends_with(d))
                    })
                {
                    return Ok(true);
                }
                if let Some(stats) = f.get("stats").and_then(|s| s.as_str())
                    && let Ok(stats) = serde_json::from_str::<serde_json::Value>(stats)
                    && stats_mention(&stats, how, n)
                {
                    return Ok(true);
                }
            }
        }
        return Ok(false);
    }
    if name.ends_with(".parquet") {
        for b in decode_parquet(data, name)? {
            for c in b.columns() {
                if let Some(cs) = cells(c)
                    && cs
                        .iter()
                        .flatten()
                        .map(|s| same_path(s))
                        .any(|s| doomed.iter().any(|d| s.contains(d)))
                {
                    return Ok(true);
                }
            }
            // A checkpoint's add and remove actions carry their files' statistics as JSON.
            for kind in ["add", "remove"] {
                let Some(stats) = b
                    .column_by_name(kind)
                    .and_then(|c| c.as_struct_opt())
                    .and_then(|s| s.column_by_name("stats"))
                    .and_then(|c| arrow::compute::cast(c, &DataType::Utf8).ok())
                else {
                    continue;
                };
                let stats = stats.as_string::<i32>();
                for i in 0..stats.len() {
                    if stats.is_valid(i)
                        && let Ok(v) = serde_json::from_str::<serde_json::Value>(stats.value(i))
                        && stats_mention(&v, how, n)
                    {
                        return Ok(true);
                    }
                }
            }
        }
    }
    Ok(false)
}

/// A file's statistics show a subject: a key column's min or max is a key of the set, or a PII
/// column's min or max holds a PII value.
pub(super) fn stats_mention(stats: &serde_json::Value, how: &Matcher, n: &Needles) -> bool {
    let Matcher::Columns(scope) = how else {
        return false;
    };
    ["minValues", "maxValues"].iter().any(|side| {
        let Some(values) = stats.get(*side) else {
            return false;
        };
        scope.keys.iter().any(|(c, set)| match values.get(c) {
            Some(serde_json::Value::Number(x)) => x.as_i64().is_some_and(|i| set.matches_int(i)),
            Some(serde_json::Value::String(s)) => set.matches_field(s, false),
            _ => false,
        }) || scope.pii.iter().any(|c| match values.get(c) {
            Some(serde_json::Value::String(s)) => n.find_pii(s),
            _ => false,
        })
    })
}

/// When every commit of `t` after `version` is a GDPR erasure, the current version (a model that
/// had read `version` has seen everything but erasures it also applies).
pub(super) async fn erasure_caught_up(
    silt: &Silt,
    t: &TableRef,
    version: u64,
) -> Result<Option<u64>> {
    let table = silt.lake.delta_table(&t.rel_path()).await?;
    let Some(now) = table.version() else {
        return Ok(None);
    };
    if now <= version {
        return Ok(None);
    }
    for v in version + 1..=now {
        let p = silt
            .lake
            .path(&format!("{}/_delta_log/{v:020}.json", t.rel_path()));
        let Ok(data) = silt.lake.get(&p).await else {
            return Ok(None);
        };
        let is_erasure = data
            .split(|b| *b == b'\n')
            .filter_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
            .any(|a| a["commitInfo"]["silt.operation"] == "erasure");
        if !is_erasure {
            return Ok(None);
        }
    }
    Ok(Some(now))
}

impl Run<'_> {
    /// Delete every data file of `t` that still holds a subject (none is live any more), after
    /// a checkpoint and after the log versions that reference them are gone.
    pub(super) async fn purge(&mut self, t: &TableRef, how: &Matcher) -> Result<()> {
        let lake = &self.silt.lake;
        let table = lake.delta_table(&t.rel_path()).await?;
        let Some(current) = table.version() else {
            return Ok(());
        };
        let live: HashSet<String> = table
            .snapshot()
            .map_err(|e| Error::delta(t.to_string(), e))?
            .log_data()
            .iter()
            .map(|f| same_path(f.path().as_ref()))
            .collect();
        let mut step = TableErasure::new(t.to_string(), Step::Purge);
        let seen = self.seen.remove(&t.to_string()).unwrap_or_default();
        let cols = how.columns();
        if cols.is_empty() {
            // Neither a key nor a PII column: nothing of a subject can be in it.
            return Ok(());
        }
        let mut doomed = Vec::new();
        let mut live_hits = Vec::new();
        for (inner, loc) in data_files(self.silt, t).await? {
            // Listed and logged paths compared in one spelling.
            let inner = same_path(&inner);
            if seen.hit.contains(&inner) && !live.contains(&inner) {
                doomed.push((inner, loc));
                continue;
            }
            if seen.clean.contains(&inner) {
                continue;
            }
            step.files_scanned += 1;
            let mut hit = false;
            for b in decode_parquet_for(lake.get(&loc).await?, &inner, Some(&cols))? {
                if how.mask(&b, &self.n).true_count() > 0 {
                    hit = true;
                    break;
                }
            }
            if !hit {
                continue;
            }
            if live.contains(&inner) {
                live_hits.push(inner);
                continue;
            }
            doomed.push((inner, loc));
        }
        if !live_hits.is_empty() {
            // A table without a key column that a rebuild did not clear (it reads the PII from
            // somewhere no erasure reaches): said once, with what to do.
            step.warnings.push(format!(
                "{t}: {} live file(s) still hold a PII value of a subject in column(s) {} and the table has no subject key column: give the model config(subject_key='…') or pseudonymize the column",
                live_hits.len(),
                match how {
                    Matcher::Columns(s) => s.pii.join(", "),
                    Matcher::Raw(_) => "raw_record".into(),
                }
            ));
        }
        if doomed.is_empty() {
            if !step.warnings.is_empty() {
                self.push_step(step);
            }
            return Ok(());
        }
        // The log versions that reference a doomed file (or whose file statistics show a
        // subject's key) go, down from the first one; a checkpoint at the current version
        // keeps the table readable.
        let log_rel = format!("{}/_delta_log", t.rel_path());
        let doomed_names: HashSet<&str> = doomed.iter().map(|d| d.0.as_str()).collect();
        let mut first: Option<u64> = None;
        let mut log_files: Vec<(u64, object_store::path::Path)> = Vec::new();
        for o in lake.list(&log_rel).await? {
            let Some(name) = o.location.filename().map(String::from) else {
                continue;
            };
            let Some(v) = name.split('.').next().and_then(|v| v.parse::<u64>().ok()) else {
                continue;
            };
            if v >= current {
                continue;
            }
            let data = lake.get(&o.location).await?;
            if log_mentions(&name, data, &doomed_names, how, &self.n)? {
                first = Some(first.map_or(v, |f| f.min(v)));
            }
            log_files.push((v, o.location));
        }
        if let Some(from) = first {
            step.unreadable = Some((from, current - 1));
        }
        step.files_purged = doomed.iter().map(|d| d.0.clone()).collect();
        step.version = Some(current);
        // Audit first: a crash after it still leaves the reason for the missing versions.
        self.step_audit(&step).await?;
        deltalake::checkpoints::create_checkpoint(&table, None)
            .await
            .map_err(|e| Error::delta(t.to_string(), e))?;
        failpoint::hit("forget.purge");
        if let Some(from) = first {
            for (v, loc) in &log_files {
                if *v >= from {
                    lake.delete(loc).await?;
                }
            }
        }
        for (_, loc) in &doomed {
            lake.delete(loc).await?;
        }
        self.push_step(step);
        Ok(())
    }
}
