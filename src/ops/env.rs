//! `silt env`: environments as zero-copy clones of another lake (create, list, drop), promotion
//! of an environment's changed model tables back to the lake it came from, the files live
//! environments still reference (so a vacuum keeps them), and the environments a forget or a
//! verify must also reach. Cloning and committing one table are lake/env.rs's; this file
//! decides which tables and in what order. It must not build object stores (storage.rs does)
//! nor print.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::build::materialize::last_state;
use crate::build::models::Dag;
use crate::error::{Error, Result};
use crate::lake::Silt;
use crate::lake::catalog::{Layer, TableRef};
use crate::lake::env::{self as lake_env, Baseline, EnvRecord, PROD};
use crate::lake::meta::runs::ModelState;
use crate::lake::storage::{CloudOptions, Storage};

/// The storage of the environments' root of `silt`'s project.
fn envs_storage(silt: &Silt) -> Result<Storage> {
    Storage::existing(
        &silt.project.envs_url,
        &CloudOptions::from_project(&silt.project),
    )
}

/// `silt` opened in environment `name` (`prod`: the project's lake), checked to exist.
pub async fn open(silt: &Silt, name: &str) -> Result<Silt> {
    silt.sibling(name).await
}

/// The name of the lake `silt` works in.
pub fn name_of(silt: &Silt) -> &str {
    silt.env.as_deref().unwrap_or(PROD)
}

#[derive(Debug, Clone, Serialize)]
pub struct CreateReport {
    pub env: String,
    pub from: String,
    pub root: String,
    pub tables: Vec<lake_env::Cloned>,
    /// Data files the environment references in its source (none is copied).
    pub files_referenced: u64,
    pub bytes_referenced: u64,
    pub files_copied: u64,
    pub elapsed_ms: u64,
}

/// `silt env create NAME --from SOURCE`: every table of `source` (the project's lake or an
/// environment) cloned at its current version into the new environment, with the build state
/// of each model in the environment's terms (an unchanged model is up to date there). The
/// registry is written last: an environment that failed half-way is removed, never left.
pub async fn create(source: &Silt, name: &str) -> Result<CreateReport> {
    let started = std::time::Instant::now();
    lake_env::check_name(name)?;
    source.check_env().await?;
    let cloud = CloudOptions::from_project(&source.project);
    let root = lake_env::env_url(&source.project.envs_url, name);
    for (what, url) in [
        ("the lake root", source.lake.url()),
        ("the environment root", &root),
    ] {
        let spelled = percent_encoding::percent_decode_str(url.path()).decode_utf8_lossy();
        let trimmed = spelled.trim_matches('/');
        // Spelled alike in a URL, in a Delta log and as an object name (object_store encodes
        // `~ [ ] | ^ *` and the like in names).
        let as_object = object_store::path::Path::from(trimmed);
        if spelled != url.path() || as_object.as_ref() != trimmed {
            return Err(Error::config(
                "silt.toml",
                format!(
                    "{what} {spelled} has characters a URL or an object name encodes (a space, '%', '~', …): a clone names its source's files by absolute URL, which delta-rs reads without decoding; use a root path without them ([lake] root, [environments] root)"
                ),
            ));
        }
    }
    let dst = Storage::new(&root, &cloud)?;
    if lake_env::read_record(&dst).await?.is_some() {
        return Err(Error::Usage(format!(
            "environment '{name}' exists already (at {root}): drop it first (`silt env drop {name}`) or pick another name"
        )));
    }
    if !dst.list("").await?.is_empty() {
        return Err(Error::Usage(format!(
            "{root} is not empty and holds no environment: remove it or pick another name"
        )));
    }
    let result = clone_all(source, &dst, name).await;
    match result {
        Ok(mut r) => {
            r.elapsed_ms = started.elapsed().as_millis() as u64;
            Ok(r)
        }
        Err(e) => {
            // Nothing half-made stays: the environment's own root goes.
            for o in dst.list("").await.unwrap_or_default() {
                let _ = dst.delete(&o.location).await;
            }
            dst.remove_empty_root();
            Err(e)
        }
    }
}

async fn clone_all(source: &Silt, dst: &Storage, name: &str) -> Result<CreateReport> {
    let tables = source.catalog.list().await?;
    let mut opened = Vec::new();
    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    for t in tables {
        let table = source.lake.delta_table(&t.rel_path()).await?;
        if let Some(v) = table.version() {
            versions.insert(t.to_string(), v);
            opened.push((t, table));
        }
    }
    let mut report = CreateReport {
        env: name.to_string(),
        from: name_of(source).to_string(),
        root: dst.url().to_string(),
        tables: Vec::new(),
        files_referenced: 0,
        bytes_referenced: 0,
        files_copied: 0,
        elapsed_ms: 0,
    };
    let mut record = EnvRecord {
        name: name.to_string(),
        from: name_of(source).to_string(),
        from_root: source.lake.url().to_string(),
        created_at: chrono::Utc::now().timestamp_micros(),
        tables: BTreeMap::new(),
    };
    for (t, table) in &opened {
        // A model's build state, its upstream versions translated: an upstream the model had
        // read at its current version is the clone's version 0, any other can never match.
        let state = if matches!(t.layer, Layer::Silver | Layer::Gold) {
            last_state(table).await?.map(|s| ModelState {
                upstream: s
                    .upstream
                    .iter()
                    .map(|(u, v)| {
                        let now = versions.get(u).copied();
                        (u.clone(), if now == Some(*v) { 0 } else { u64::MAX })
                    })
                    .collect(),
                sql_hash: s.sql_hash,
            })
        } else {
            None
        };
        let c = lake_env::clone_table(&source.lake, table, dst, t, state).await?;
        report.files_referenced += c.files;
        report.bytes_referenced += c.bytes;
        record.tables.insert(
            t.to_string(),
            Baseline {
                source_version: c.source_version,
                env_version: 0,
            },
        );
        report.tables.push(c);
    }
    lake_env::write_record(dst, &record).await?;
    Ok(report)
}

/// One environment as `silt env list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EnvSummary {
    pub name: String,
    pub from: String,
    pub created_at: String,
    pub root: String,
    pub tables: usize,
    /// Tables whose version moved past their baseline (built, rewritten) in the environment.
    pub changed: Vec<String>,
}

/// `silt env list`.
pub async fn list(silt: &Silt) -> Result<Vec<EnvSummary>> {
    let envs = envs_storage(silt)?;
    let mut out = Vec::new();
    for name in lake_env::list_names(&envs).await? {
        let (env, Some(rec)) = silt.sibling_with_record(&name).await? else {
            continue;
        };
        let changed = changed_tables(&env, &rec)
            .await?
            .into_iter()
            .filter(|(t, _, _)| t.layer != Layer::Silt)
            .map(|(t, _, _)| t.to_string())
            .collect();
        out.push(EnvSummary {
            name: name.clone(),
            from: rec.from.clone(),
            created_at: chrono::DateTime::from_timestamp_micros(rec.created_at)
                .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default(),
            root: env.lake.url().to_string(),
            tables: rec.tables.len(),
            changed,
        });
    }
    Ok(out)
}

/// The tables of `env` whose version moved past their baseline, or that it made itself:
/// (table, its version now, its baseline).
async fn changed_tables(
    env: &Silt,
    rec: &EnvRecord,
) -> Result<Vec<(TableRef, u64, Option<Baseline>)>> {
    let mut out = Vec::new();
    for t in env.catalog.list().await? {
        let Some(v) = crate::lake::time_travel::latest_version(&env.catalog, &t).await? else {
            continue;
        };
        let base = rec.tables.get(&t.to_string()).copied();
        let moved = match base {
            None => true,
            Some(b) if v > b.env_version => {
                // Copies of cloned files, and GDPR erasures (which the source received too),
                // change nothing the environment would promote.
                !lake_env::only_operations(
                    &env.lake,
                    &t,
                    b.env_version + 1,
                    v,
                    &["localize", "erasure"],
                )
                .await?
            }
            Some(_) => false,
        };
        if moved {
            out.push((t, v, base));
        }
    }
    Ok(out)
}

/// The environments cloned from the lake of `silt`, and from those, children after their
/// parents.
pub async fn descendants(silt: &Silt) -> Result<Vec<Silt>> {
    let envs = envs_storage(silt)?;
    let names = lake_env::list_names(&envs).await?;
    let mut records = Vec::new();
    for n in &names {
        if let (env, Some(r)) = silt.sibling_with_record(n).await? {
            records.push((env, r));
        }
    }
    let mut out: Vec<Silt> = Vec::new();
    let mut frontier: Vec<String> = vec![name_of(silt).to_string()];
    while let Some(parent) = frontier.pop() {
        for (env, r) in &records {
            if r.from == parent && !out.iter().any(|o| o.env == env.env) {
                frontier.push(r.name.clone());
                out.push(env.clone());
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct DropReport {
    pub env: String,
    pub objects_deleted: u64,
    pub bytes_deleted: u64,
}

/// `silt env drop NAME`: delete everything under the environment's root (its own files; what
/// it referenced elsewhere stays). Refused while another environment was cloned from it.
pub async fn drop(silt: &Silt, name: &str) -> Result<DropReport> {
    lake_env::check_name(name)?;
    let env = open(silt, name).await?;
    let children: Vec<String> = descendants(&env)
        .await?
        .iter()
        .filter_map(|e| e.env.clone())
        .collect();
    if !children.is_empty() {
        return Err(Error::Usage(format!(
            "environment '{name}' is the source of {}: drop {} first",
            children.join(", "),
            if children.len() == 1 { "it" } else { "them" }
        )));
    }
    let mut r = DropReport {
        env: name.to_string(),
        objects_deleted: 0,
        bytes_deleted: 0,
    };
    // The registry first: a drop cut short leaves no half-environment that looks whole.
    let objects = env.lake.list("").await?;
    env.lake.delete(&env.lake.path("_silt/env.json")).await?;
    for o in objects {
        env.lake.delete(&o.location).await?;
        r.objects_deleted += 1;
        r.bytes_deleted += o.size;
    }
    env.lake.remove_empty_root();
    Ok(r)
}

/// What a promotion did or (dry run) would do to one table.
#[derive(Debug, Clone, Serialize)]
pub struct PromoteItem {
    pub table: String,
    pub env_version: u64,
    /// The target's version now (None: the table is new there).
    pub target_version: Option<u64>,
    /// The target's version after the promotion (None in a dry run).
    pub new_version: Option<u64>,
    pub files_copied: u64,
    pub bytes_copied: u64,
    pub files_referenced: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PromoteReport {
    pub env: String,
    pub to: String,
    pub dry_run: bool,
    pub tables: Vec<PromoteItem>,
    /// Tables the environment changed that promotion does not carry (bronze, quarantine,
    /// silt's own): their data stays the environment's.
    pub not_promoted: Vec<String>,
    pub elapsed_ms: u64,
}

/// `silt env promote NAME --to TARGET`: the environment's changed model tables become the
/// target's next versions, one commit per table in dag order, only if no target table moved
/// since the environment last saw it (else an error naming every table that moved, and
/// nothing is written). The environment's own files are copied under the target's tables
/// first; files it still shares with the target are referenced. The target's history records
/// each as a promotion from the environment.
pub async fn promote(env: &Silt, target: &Silt, dry_run: bool) -> Result<PromoteReport> {
    let started = std::time::Instant::now();
    let Some(mut rec) = env.check_env().await? else {
        return Err(Error::Usage(
            "give the environment to promote (`silt env promote NAME --to prod`)".into(),
        ));
    };
    let to = name_of(target).to_string();
    if rec.from != to {
        return Err(Error::Usage(format!(
            "environment '{}' was cloned from '{}', not '{to}': promote it to {}",
            rec.name, rec.from, rec.from
        )));
    }
    let dag = Dag::load(&env.project)?;
    let order: HashMap<String, usize> = dag
        .order
        .iter()
        .enumerate()
        .map(|(i, n)| (dag.models[n].table().to_string(), i))
        .collect();
    let mut report = PromoteReport {
        env: rec.name.clone(),
        to: to.clone(),
        dry_run,
        tables: Vec::new(),
        not_promoted: Vec::new(),
        elapsed_ms: 0,
    };
    let mut todo = Vec::new();
    let mut moved = Vec::new();
    for (t, v, base) in changed_tables(env, &rec).await? {
        if !matches!(t.layer, Layer::Silver | Layer::Gold) || !order.contains_key(&t.to_string()) {
            report.not_promoted.push(t.to_string());
            continue;
        }
        let expected = base.map(|b| b.source_version);
        let now = crate::lake::time_travel::latest_version(&target.catalog, &t).await?;
        // Moved only by GDPR erasures, which reached this environment first: not a conflict.
        let erased_only = match (expected, now) {
            (Some(e), Some(n)) if n > e => {
                lake_env::only_operations(&target.lake, &t, e + 1, n, &["erasure"]).await?
            }
            _ => false,
        };
        if now != expected && !erased_only {
            moved.push(lake_env::moved(&t, expected, now).to_string());
            continue;
        }
        todo.push((t, v, now));
    }
    if !moved.is_empty() {
        return Err(Error::Usage(format!(
            "nothing promoted: {} moved in '{to}' since '{}' was cloned or last promoted: {}. Rebuild the environment from '{to}' (`silt env drop {1}` then `silt env create {1} --from {to}`), or rebuild there",
            if moved.len() == 1 {
                "a table"
            } else {
                "tables"
            },
            rec.name,
            moved.join("; ")
        )));
    }
    todo.sort_by_key(|(t, _, _)| order[&t.to_string()]);
    // Every file staged (copied) before any commit: a copy that fails promotes nothing.
    let mut staged = Vec::new();
    for (t, v, expected) in &todo {
        let env_table = env.lake.delta_table(&t.rel_path()).await?;
        let target_table = target.lake.delta_table(&t.rel_path()).await?;
        let target_live: HashSet<String> = match target_table.version() {
            Some(_) => target_table
                .snapshot()
                .map_err(|e| Error::delta(t.to_string(), e))?
                .log_data()
                .iter()
                .map(|f| crate::lake::storage::same_path(f.path().as_ref()))
                .collect(),
            None => HashSet::new(),
        };
        let s = if dry_run {
            lake_env::plan_stage(&env.lake, &env_table, &target.lake, t, &target_live)?
        } else {
            lake_env::stage(&env.lake, &env_table, &target.lake, t, &target_live).await?
        };
        report.tables.push(PromoteItem {
            table: t.to_string(),
            env_version: *v,
            target_version: *expected,
            new_version: None,
            files_copied: s.files_copied,
            bytes_copied: s.bytes_copied,
            files_referenced: s.files_referenced,
        });
        staged.push((t.clone(), env_table, s, *expected));
    }
    if dry_run {
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        return Ok(report);
    }
    // Commits in dag order; each model's build state in the target's terms.
    let env_versions: BTreeMap<String, u64> =
        todo.iter().map(|(t, v, _)| (t.to_string(), *v)).collect();
    let mut new_versions: BTreeMap<String, u64> = BTreeMap::new();
    for (i, (t, env_table, s, expected)) in staged.into_iter().enumerate() {
        let state = last_state(&env_table).await?.map(|st| ModelState {
            upstream: st
                .upstream
                .iter()
                .map(|(u, v)| {
                    let promoted = (env_versions.get(u) == Some(v))
                        .then(|| new_versions.get(u).copied())
                        .flatten();
                    let unchanged = rec
                        .tables
                        .get(u)
                        .filter(|b| b.env_version == *v)
                        .map(|b| b.source_version);
                    (u.clone(), promoted.or(unchanged).unwrap_or(u64::MAX))
                })
                .collect(),
            sql_hash: st.sql_hash,
        });
        let p =
            lake_env::promote_table(s, &env_table, &target.lake, &t, expected, &rec.name, state)
                .await?;
        new_versions.insert(t.to_string(), p.version);
        report.tables[i].new_version = Some(p.version);
        rec.tables.insert(
            t.to_string(),
            Baseline {
                source_version: p.version,
                env_version: env_versions[&t.to_string()],
            },
        );
        // The registry follows each commit: a promotion cut short is resumed, not repeated.
        lake_env::write_record(&env.lake, &rec).await?;
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// The data files of `t` in `silt`'s lake that live environments cloned from it still name
/// (as [`crate::lake::storage::same_path`] of their absolute URLs): a vacuum keeps them.
pub async fn referenced_by_envs(silt: &Silt) -> Result<HashSet<String>> {
    let mut out = HashSet::new();
    for env in descendants(silt).await? {
        for t in env.catalog.list().await? {
            out.extend(lake_env::foreign_files(&env.lake, &t).await?);
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct LocalizeReport {
    pub env: String,
    /// Per table: files copied into the environment.
    pub tables: Vec<(String, u64)>,
    pub files_copied: u64,
}

/// `silt env localize NAME [TABLE]`: copy the files the environment's tables (or one) name
/// in another lake into the environment, for readers that cannot follow a shallow clone's
/// absolute paths (DuckDB's delta extension, pyarrow datasets). Each table's rows stay.
pub async fn localize(env: &Silt, only: Option<&TableRef>) -> Result<LocalizeReport> {
    if env.check_env().await?.is_none() {
        return Err(Error::Usage(
            "the project's own lake holds no clones: give --env NAME".into(),
        ));
    }
    let tables = match only {
        Some(t) => vec![t.clone()],
        None => env.catalog.list().await?,
    };
    let mut r = LocalizeReport {
        env: name_of(env).to_string(),
        tables: Vec::new(),
        files_copied: 0,
    };
    for t in tables {
        let table = env.lake.delta_table(&t.rel_path()).await?;
        if table.version().is_none() {
            return Err(Error::Usage(format!("{t} does not exist in '{}'", r.env)));
        }
        let state = last_state(&table).await?;
        let (_, n) = lake_env::localize(&env.lake, table, &t, state.as_ref()).await?;
        r.files_copied += n;
        r.tables.push((t.to_string(), n));
    }
    Ok(r)
}
