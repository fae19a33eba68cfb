//! Environments at the table level: an environment is a lake of its own (under
//! `[environments] root`, default `<lake>/_envs/<name>`) whose tables start as shallow clones of
//! another lake's current versions. A clone is one Delta commit (version 0) with the source's
//! protocol and metadata and an `add` per live file that names the source's file by absolute
//! URL: no data is copied. This file clones a table, promotes one back, finds the files a lake
//! references in another, and keeps the environment's registry (`_silt/env.json`). It must not
//! know models or the command line (ops/env.rs decides what to clone, build or promote).

use std::collections::{BTreeMap, HashMap, HashSet};

use deltalake::DeltaTable;
use deltalake::kernel::Action;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::protocol::{DeltaOperation, SaveMode};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::error::{Error, Result};
use crate::lake::catalog::TableRef;
use crate::lake::meta::runs::ModelState;
use crate::lake::storage::{Storage, absolute_url, same_path};

/// The name the project's own lake goes by in `--from` and `--to`.
pub const PROD: &str = "prod";

/// An environment's registry, at `_silt/env.json` under its root.
const REGISTRY: &str = "_silt/env.json";

/// What an environment was made from and the baseline of each cloned table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EnvRecord {
    pub name: String,
    /// The environment it was cloned from (`prod` for the project's lake).
    pub from: String,
    /// The root URL of that lake.
    pub from_root: String,
    /// Microseconds since the epoch, UTC.
    pub created_at: i64,
    /// Per table (`layer.name`): the source version it mirrors and its own version then.
    pub tables: BTreeMap<String, Baseline>,
}

/// A table of an environment at the point it last matched its source: right after the clone
/// (its version 0) or after a promotion.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Baseline {
    pub source_version: u64,
    pub env_version: u64,
}

/// Whether `name` can name an environment: lower-case letters, digits, `-` and `_`, not `prod`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if !ok {
        return Err(Error::Usage(format!(
            "'{name}' is not an environment name: use lower-case letters, digits, '-' and '_' (e.g. dev, ci-42)"
        )));
    }
    if name == PROD {
        return Err(Error::Usage(
            "'prod' is the project's own lake: name the environment something else".into(),
        ));
    }
    Ok(())
}

/// The root of environment `name` under the environments' root.
pub fn env_url(envs_root: &Url, name: &str) -> Url {
    let mut u = envs_root.clone();
    let p = format!("{}/{name}/", u.path().trim_end_matches('/'));
    u.set_path(&p);
    u
}

/// The registry of the environment at `lake`, None when `lake` is not one.
pub async fn read_record(lake: &Storage) -> Result<Option<EnvRecord>> {
    let p = lake.path(REGISTRY);
    if !lake.exists(&p).await? {
        return Ok(None);
    }
    let data = lake.get(&p).await?;
    Ok(Some(serde_json::from_slice(&data)?))
}

pub async fn write_record(lake: &Storage, rec: &EnvRecord) -> Result<()> {
    let data = serde_json::to_vec_pretty(rec)?;
    lake.put(&lake.path(REGISTRY), data.into()).await
}

/// The names of the environments under `envs` that have a registry.
pub async fn list_names(envs: &Storage) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for d in envs.list_dirs("").await? {
        if envs.exists(&envs.path(&format!("{d}/{REGISTRY}"))).await? {
            out.push(d);
        }
    }
    Ok(out)
}

/// What a clone wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Cloned {
    pub table: String,
    pub source_version: u64,
    pub files: u64,
    pub bytes: u64,
}

/// Clone `t` of `src` (at the version `table` is loaded at) into `dst` as its version 0: the
/// source's protocol and metadata, one add per live file naming it by absolute URL, and in the
/// commit info where it came from and `state` (the model's build state in the environment's
/// terms, so an unchanged model is up to date there).
pub async fn clone_table(
    src: &Storage,
    table: &DeltaTable,
    dst: &Storage,
    t: &TableRef,
    state: Option<ModelState>,
) -> Result<Cloned> {
    let err = |e: deltalake::DeltaTableError| Error::delta(t.to_string(), e);
    let version = table
        .version()
        .ok_or_else(|| Error::Internal(format!("{t} has no version to clone")))?;
    let snap = table.snapshot().map_err(err)?;
    let source_root = src.url_of(&t.rel_path());
    let mut adds = Vec::new();
    let mut bytes = 0u64;
    for f in snap.log_data().iter() {
        #[allow(deprecated)]
        let mut add = f.add_action();
        if add.deletion_vector.is_some() {
            return Err(Error::Usage(format!(
                "{t} has deletion vectors, which a shallow clone does not carry: run `silt optimize {t}` first"
            )));
        }
        add.path = absolute(&source_root, &add.path);
        add.data_change = false;
        bytes += add.size.max(0) as u64;
        adds.push(Action::Add(add));
    }
    let files = adds.len() as u64;
    let mut actions = vec![
        Action::Protocol(snap.protocol().clone()),
        Action::Metadata(snap.metadata().clone()),
    ];
    actions.extend(adds);
    let mut meta: HashMap<String, serde_json::Value> = HashMap::new();
    meta.insert("silt.operation".into(), "clone".into());
    meta.insert(
        "silt.clone".into(),
        serde_json::json!({"source": source_root.as_str(), "sourceVersion": version, "isShallow": true}),
    );
    meta.insert(
        "operationMetrics".into(),
        serde_json::json!({"numCopiedFiles": 0, "numClonedFiles": files, "clonedBytes": bytes}),
    );
    if let Some(s) = state {
        meta.insert("silt.state".into(), serde_json::to_value(s)?);
    }
    let target = dst.delta_table(&t.rel_path()).await?;
    if target.version().is_some() {
        return Err(Error::Usage(format!(
            "{t} already exists in {}: drop the environment first",
            dst.url()
        )));
    }
    CommitBuilder::from(CommitProperties::default().with_max_retries(0))
        .with_actions(actions)
        .with_app_metadata(meta)
        .build(
            None,
            target.log_store(),
            DeltaOperation::Create {
                mode: SaveMode::ErrorIfExists,
                location: dst.url_of(&t.rel_path()),
                protocol: snap.protocol().clone(),
                metadata: snap.metadata().clone(),
            },
        )
        .await
        .map_err(err)?;
    Ok(Cloned {
        table: t.to_string(),
        source_version: version,
        files,
        bytes,
    })
}

/// `path` (as a log names a file of the table at `root`) as an absolute URL.
fn absolute(root: &Url, path: &str) -> String {
    if absolute_url(path).is_some() {
        return path.to_string();
    }
    // Concatenated, not joined: the relative path is the object's name as stored (partition
    // directories already percent-encoded once), and must reach the URL unchanged.
    format!("{}/{}", root.as_str().trim_end_matches('/'), path)
}

/// The part of an absolute file URL (as a log names it) after the table directory `rel`:
/// the file's path relative to its table, as stored (`slot=T%201%3A00/part-….parquet`).
fn relative_in_table(url: &str, rel: &str) -> String {
    let marker = format!("/{rel}/");
    match url.rfind(&marker) {
        Some(i) => url[i + marker.len()..].to_string(),
        None => url.rsplit('/').next().unwrap_or_default().to_string(),
    }
}

/// Every data file the log of `t` in `lake` names by absolute URL, live or in any commit still
/// in the log, in [`same_path`] form: the files of other lakes it depends on.
pub async fn foreign_files(lake: &Storage, t: &TableRef) -> Result<HashSet<String>> {
    let mut out = HashSet::new();
    let log = format!("{}/_delta_log", t.rel_path());
    for o in lake.list(&log).await? {
        let name = o.location.filename().unwrap_or_default().to_string();
        if name.ends_with(".json") {
            let data = lake.get(&o.location).await?;
            for line in data.split(|b| *b == b'\n') {
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
                    continue;
                };
                for kind in ["add", "remove"] {
                    if let Some(p) = v[kind]["path"].as_str()
                        && absolute_url(p).is_some()
                    {
                        out.insert(same_path(p));
                    }
                }
            }
        }
    }
    // A checkpoint replaces older commits: its live adds count too.
    let table = lake.delta_table(&t.rel_path()).await?;
    if table.version().is_some()
        && let Ok(snap) = table.snapshot()
    {
        for f in snap.log_data().iter() {
            let p = f.path().to_string();
            if absolute_url(&p).is_some() {
                out.insert(same_path(&p));
            }
        }
    }
    Ok(out)
}

/// What [`promote_table`] did.
#[derive(Debug, Clone, Serialize)]
pub struct Promoted {
    pub table: String,
    pub from_version: u64,
    pub version: u64,
    pub files_copied: u64,
    pub bytes_copied: u64,
    pub files_referenced: u64,
}

/// The files `env_table` (of `env`, table `t`) would bring into `target` (of `prod`): each live
/// file as (where it is, where it goes in the target relative to its table, size); a file
/// already under the target table's root goes nowhere.
#[allow(clippy::type_complexity)]
pub fn promotion_files(
    env: &Storage,
    env_table: &DeltaTable,
    prod: &Storage,
    t: &TableRef,
    target_live: &HashSet<String>,
) -> Result<
    Vec<(
        (Storage, object_store::path::Path),
        Option<String>,
        deltalake::kernel::Add,
    )>,
> {
    let snap = env_table
        .snapshot()
        .map_err(|e| Error::delta(t.to_string(), e))?;
    let target_root = prod.url_of(&t.rel_path());
    let target_prefix = format!("{}/", target_root.as_str().trim_end_matches('/'));
    let mut out = Vec::new();
    for f in snap.log_data().iter() {
        #[allow(deprecated)]
        let add = f.add_action();
        let path = add.path.clone();
        let from = env.locate(&t.rel_path(), &path)?;
        if absolute_url(&path).is_none() {
            // The environment's own file: copied under the target's table, same name.
            out.push((from, Some(path), add));
        } else if let Some(rel) = path.strip_prefix(&target_prefix) {
            // Already the target's own file (an unchanged file of the clone).
            let rel = rel.to_string();
            out.push((from, None, with_path(add, rel)));
        } else if target_live.contains(&same_path(&path)) {
            // A file the target names by the same URL (a clone of a clone): still shared.
            out.push((from, None, add));
        } else {
            // Another lake's file the target does not name: copied like the env's own.
            let rel = relative_in_table(&path, &t.rel_path());
            out.push((from, Some(rel), add));
        }
    }
    Ok(out)
}

fn with_path(mut add: deltalake::kernel::Add, path: String) -> deltalake::kernel::Add {
    add.path = path;
    add
}

/// A promotion's files, copied where they go and ready to commit.
#[derive(Debug, Clone)]
pub struct Staged {
    pub adds: Vec<deltalake::kernel::Add>,
    pub files_copied: u64,
    pub bytes_copied: u64,
    pub files_referenced: u64,
}

/// What [`stage`] would copy and reference, copying nothing.
pub fn plan_stage(
    env: &Storage,
    env_table: &DeltaTable,
    prod: &Storage,
    t: &TableRef,
    target_live: &HashSet<String>,
) -> Result<Staged> {
    let mut s = Staged {
        adds: Vec::new(),
        files_copied: 0,
        bytes_copied: 0,
        files_referenced: 0,
    };
    for (_, to, add) in promotion_files(env, env_table, prod, t, target_live)? {
        match to {
            Some(rel) => {
                s.files_copied += 1;
                s.bytes_copied += add.size.max(0) as u64;
                s.adds.push(with_path(add, rel));
            }
            None => {
                s.files_referenced += 1;
                s.adds.push(add);
            }
        }
    }
    Ok(s)
}

/// Copy the environment's own files of `t` under the target's table (a dropped environment
/// takes its files with it); the target's own files are referenced as they are.
pub async fn stage(
    env: &Storage,
    env_table: &DeltaTable,
    prod: &Storage,
    t: &TableRef,
    target_live: &HashSet<String>,
) -> Result<Staged> {
    for ((store, from), to, _) in promotion_files(env, env_table, prod, t, target_live)? {
        if let Some(rel) = to {
            let dest = prod.file_path(&t.rel_path(), &rel);
            if !prod.exists(&dest).await? {
                prod.copy_from(&store, &from, &dest).await?;
            }
        }
    }
    plan_stage(env, env_table, prod, t, target_live)
}

/// Make `t` of `prod` hold what `env_table` holds (its files staged by [`stage`]), in one
/// commit on top of `expected` (the version the environment was cloned from or last promoted
/// to). The commit info says it was a promotion from `env_name` and carries `state` (the
/// model's build state in the target's terms).
pub async fn promote_table(
    staged: Staged,
    env_table: &DeltaTable,
    prod: &Storage,
    t: &TableRef,
    expected: Option<u64>,
    env_name: &str,
    state: Option<ModelState>,
) -> Result<Promoted> {
    let err = |e: deltalake::DeltaTableError| Error::delta(t.to_string(), e);
    let target = prod.delta_table(&t.rel_path()).await?;
    if target.version() != expected {
        return Err(moved(t, expected, target.version()));
    }
    let env_snap = env_table.snapshot().map_err(err)?;
    let Staged {
        adds,
        files_copied,
        bytes_copied,
        files_referenced,
    } = staged;
    // A file the target already has under the same name (one the clone kept, one a localize
    // copied from it, one an earlier promotion copied) stays: neither removed nor added again
    // (a commit removing and adding one path would lose it).
    let incoming: HashSet<String> = adds.iter().map(|a| same_path(&a.path)).collect();
    let mut kept: HashSet<String> = HashSet::new();
    let mut actions: Vec<Action> = Vec::new();
    let snapshot = match target.version() {
        Some(_) => {
            let s = target.snapshot().map_err(err)?.clone();
            for f in s.log_data().iter() {
                let p = same_path(f.path().as_ref());
                if incoming.contains(&p) {
                    kept.insert(p);
                } else {
                    actions.push(Action::Remove(f.remove_action(true)));
                }
            }
            // The environment's table may need a newer protocol; one that would take a
            // version or feature away from the target is refused.
            if s.protocol() != env_snap.protocol() {
                let (pr, pw) = protocol_versions(s.protocol());
                let (er, ew) = protocol_versions(env_snap.protocol());
                let features = |p: &deltalake::kernel::Protocol| -> HashSet<String> {
                    let v = serde_json::to_value(p).unwrap_or_default();
                    ["readerFeatures", "writerFeatures"]
                        .iter()
                        .flat_map(|k| v[*k].as_array().cloned().unwrap_or_default())
                        .filter_map(|f| f.as_str().map(String::from))
                        .collect()
                };
                if er < pr
                    || ew < pw
                    || !features(s.protocol()).is_subset(&features(env_snap.protocol()))
                {
                    return Err(Error::Usage(format!(
                        "{t}: its Delta protocol in the environment does not include the target's (reader {er} / writer {ew} against {pr} / {pw}): rebuild the model in the target instead"
                    )));
                }
                actions.push(Action::Protocol(env_snap.protocol().clone()));
            }
            if s.metadata().schema_string() != env_snap.metadata().schema_string()
                || s.metadata().partition_columns() != env_snap.metadata().partition_columns()
                || s.metadata().configuration() != env_snap.metadata().configuration()
            {
                actions.push(Action::Metadata(env_snap.metadata().clone()));
            }
            Some(s)
        }
        None => {
            actions.push(Action::Protocol(env_snap.protocol().clone()));
            actions.push(Action::Metadata(env_snap.metadata().clone()));
            None
        }
    };
    let partition_columns = env_snap.metadata().partition_columns().to_vec();
    actions.extend(
        adds.into_iter()
            .filter(|a| !kept.contains(&same_path(&a.path)))
            .map(Action::Add),
    );
    let mut meta: HashMap<String, serde_json::Value> = HashMap::new();
    meta.insert("silt.operation".into(), "promote".into());
    meta.insert(
        "silt.promote".into(),
        serde_json::json!({"env": env_name, "envVersion": env_table.version()}),
    );
    if let Some(s) = state {
        meta.insert("silt.state".into(), serde_json::to_value(s)?);
    }
    let done = CommitBuilder::from(CommitProperties::default().with_max_retries(0))
        .with_actions(actions)
        .with_app_metadata(meta)
        .build(
            snapshot
                .as_ref()
                .map(|s| s as &dyn deltalake::kernel::transaction::TableReference),
            target.log_store(),
            DeltaOperation::Write {
                mode: SaveMode::Overwrite,
                partition_by: (!partition_columns.is_empty()).then_some(partition_columns),
                predicate: Some(format!("promote from environment {env_name}")),
            },
        )
        .await
        .map_err(err)?;
    Ok(Promoted {
        table: t.to_string(),
        from_version: expected.unwrap_or(0),
        version: done.version(),
        files_copied,
        bytes_copied,
        files_referenced,
    })
}

/// The error for a target that is not at the version an environment last saw.
pub fn moved(t: &TableRef, expected: Option<u64>, now: Option<u64>) -> Error {
    let say = |v: Option<u64>| v.map_or("absent".to_string(), |v| format!("version {v}"));
    Error::Usage(format!(
        "{t} moved since the environment saw it ({} then, {} now)",
        say(expected),
        say(now)
    ))
}

/// Copy every file of `t` that its log names by absolute URL (an environment's clone of
/// another lake's file) under the table's own root, and commit the swap (`dataChange =
/// false`, the latest build state carried over): the rows stay, the files become the
/// environment's. delta-rs's MERGE and partition replace rewrite only files under a table's
/// root, so a table is localized before its first such write. Returns the table as committed
/// and the number of files copied (0: nothing to do, no commit).
pub async fn localize(
    lake: &Storage,
    table: DeltaTable,
    t: &TableRef,
    state: Option<&ModelState>,
) -> Result<(DeltaTable, u64)> {
    let err = |e: deltalake::DeltaTableError| Error::delta(t.to_string(), e);
    if table.version().is_none() {
        return Ok((table, 0));
    }
    let snap = table.snapshot().map_err(err)?.clone();
    let mut actions = Vec::new();
    let mut copied = 0u64;
    for f in snap.log_data().iter() {
        #[allow(deprecated)]
        let add = f.add_action();
        if absolute_url(&add.path).is_none() {
            continue;
        }
        let rel = relative_in_table(&add.path, &t.rel_path());
        let (store, from) = lake.locate(&t.rel_path(), &add.path)?;
        let dest = lake.file_path(&t.rel_path(), &rel);
        if !lake.exists(&dest).await? {
            lake.copy_from(&store, &from, &dest).await?;
        }
        actions.push(Action::Remove(f.remove_action(false)));
        let mut local = add;
        local.path = rel;
        local.data_change = false;
        actions.push(Action::Add(local));
        copied += 1;
    }
    if copied == 0 {
        return Ok((table, 0));
    }
    let mut meta: HashMap<String, serde_json::Value> = HashMap::new();
    meta.insert("silt.operation".into(), "localize".into());
    if let Some(s) = state {
        meta.insert("silt.state".into(), serde_json::to_value(s)?);
    }
    let partition_columns = snap.metadata().partition_columns().to_vec();
    let table = crate::lake::commit::commit_actions(
        table,
        t,
        actions,
        CommitProperties::default().with_metadata(meta),
        DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: (!partition_columns.is_empty()).then_some(partition_columns),
            predicate: Some("copy cloned files into the environment".into()),
        },
    )
    .await?;
    Ok((table, copied))
}

/// A protocol's (minReaderVersion, minWriterVersion).
fn protocol_versions(p: &deltalake::kernel::Protocol) -> (i64, i64) {
    let v = serde_json::to_value(p).unwrap_or_default();
    (
        v["minReaderVersion"].as_i64().unwrap_or(1),
        v["minWriterVersion"].as_i64().unwrap_or(2),
    )
}

/// Whether every commit of `t` from version `from` to `to` is one of `operations` (its
/// `silt.operation`): `localize` (files copied in, rows unchanged), `erasure` (a GDPR forget,
/// which reaches every environment first).
pub async fn only_operations(
    lake: &Storage,
    t: &TableRef,
    from: u64,
    to: u64,
    operations: &[&str],
) -> Result<bool> {
    for v in from..=to {
        let p = lake.path(&format!("{}/_delta_log/{v:020}.json", t.rel_path()));
        let Ok(data) = lake.get(&p).await else {
            return Ok(false);
        };
        let ours = data
            .split(|b| *b == b'\n')
            .filter_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
            .any(|a| {
                let info = &a["commitInfo"];
                info["silt.operation"]
                    .as_str()
                    .is_some_and(|o| operations.contains(&o))
                    // A model an erasure rebuilt is a build of the erasure's run (it may
                    // also have read upstream rows that came before the erasure; the
                    // promoted state then names an older upstream, and the next run
                    // builds it again).
                    || (operations.contains(&"erasure")
                        && info["silt.run_id"]
                            .as_str()
                            .is_some_and(|r| r.starts_with("erasure-")))
            });
        if !ours {
            return Ok(false);
        }
    }
    Ok(true)
}
