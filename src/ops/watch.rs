//! `silt watch`: watch the landing root and, when files land, run ingest plus the models that
//! read the affected sources. File events wake it on local disk (notify); `gs://` roots are
//! polled. Changes are debounced; Ctrl-C stops it between runs, never mid-commit. It must not
//! ingest or build itself (pipeline.rs does).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::build::models::Dag;
use crate::build::pipeline::{RunOptions, RunReport};
use crate::error::{Error, Result};
use crate::lake::Silt;

#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub debounce: Duration,
    pub poll_interval: Duration,
}

/// Landing files by path: (size, etag).
type Listing = BTreeMap<String, (u64, Option<String>)>;

async fn listing(silt: &Silt) -> Result<Listing> {
    Ok(silt
        .landing
        .list_landing()
        .await?
        .0
        .into_iter()
        .filter_map(|m| {
            silt.landing
                .relative(&m.location)
                .map(|r| (r, (m.size, m.e_tag)))
        })
        .collect())
}

/// Watch until Ctrl-C (or `stop` is set). `on_run` sees each run's report.
pub async fn watch(
    silt: &Silt,
    opts: WatchOptions,
    stop: Arc<AtomicBool>,
    mut on_run: impl FnMut(&[String], Result<RunReport>),
) -> Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    // Local roots get file events; every root is also polled.
    let _watcher = if silt.landing.url().scheme() == "file" {
        use notify::Watcher;
        let path = silt
            .landing
            .url()
            .to_file_path()
            .map_err(|_| Error::Usage("landing root is not a local path".into()))?;
        let tx = tx.clone();
        let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok_and(|e| !e.kind.is_access()) {
                let _ = tx.send(());
            }
        })
        .map_err(|e| Error::io("watch", &path, e))?;
        w.watch(&path, notify::RecursiveMode::Recursive)
            .map_err(|e| Error::io("watch", &path, e))?;
        Some(w)
    } else {
        None
    };
    let mut seen = listing(silt).await?;
    // Files already there but not yet ingested are picked up by a first run.
    let mut pending_first = true;
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        if !pending_first {
            tokio::select! {
                _ = rx.recv() => {}
                _ = tokio::time::sleep(opts.poll_interval) => {}
                _ = wait_stop(stop.clone()) => return Ok(()),
            }
            // Debounce: wait until the landing root is quiet.
            loop {
                tokio::select! {
                    r = rx.recv() => { if r.is_none() { break; } }
                    _ = tokio::time::sleep(opts.debounce) => break,
                }
            }
        }
        let now = listing(silt).await?;
        let changed: Vec<String> = now
            .iter()
            .filter(|(k, v)| seen.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .collect();
        seen = now;
        if changed.is_empty() && !pending_first {
            continue;
        }
        pending_first = false;
        // The sources whose globs match, and the models downstream of them.
        let sources: BTreeSet<String> = silt
            .project
            .sources
            .values()
            .filter(|s| changed.iter().any(|c| s.glob.is_match(c)) || changed.is_empty())
            .map(|s| s.name.clone())
            .collect();
        if sources.is_empty() {
            continue;
        }
        let dag = Dag::load(&silt.project)?;
        let mut select: BTreeSet<String> = BTreeSet::new();
        for s in &sources {
            select.extend(dag.reading_source(s));
        }
        let opts = RunOptions {
            no_models: select.is_empty(),
            select: select.into_iter().collect(),
            full_refresh: false,
            ingest: true,
            ..Default::default()
        };
        // The lake's lease is held per cycle, so other commands (a forget, a restore) run
        // between cycles; a cycle that cannot get it reports why and the next one tries again.
        let lease_opts = crate::lake::lease::LeaseOptions::from_env()?;
        let report = match crate::lake::lease::acquire(&silt.lake, "watch", lease_opts, |h| {
            tracing::warn!("waiting for the lake's lease, held by {h}")
        })
        .await
        {
            Ok(lease) => {
                let r = crate::build::pipeline::run(silt, opts).await;
                let released = lease.release().await;
                match (r, released) {
                    (Ok(r), Ok(())) => Ok(r),
                    (Err(e), _) | (Ok(_), Err(e)) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        on_run(&changed, report);
    }
}

async fn wait_stop(stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
