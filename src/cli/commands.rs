//! One function per `silt` command: open the project, take the lake's lease when the command
//! rewrites tables, call the library, print its report (printers.rs). It must not hold pipeline
//! logic, SQL or table layouts (the library does) nor turn errors into exit codes (main.rs).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use silt::lake::catalog::{Layer, TableRef};
use silt::lake::time_travel::AsOf;
use silt::render::{OutputFormat, render};
use silt::{Error, Silt};

use super::ExitWith;
use super::args::*;
use super::printers::{self, emit, write_stdout};
use super::progress::Bar;

/// Run the command of `cli`, holding the lake's lease around it when it writes.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.json;
    match cli.command {
        Command::Init(a) => return init(&a, json),
        Command::Scheduler(a) => return scheduler(a).await,
        Command::Executor(a) => return executor(a).await,
        _ => {}
    }
    if let Command::Env(a) = cli.command {
        let mut silt = Silt::open(&cli.project)?;
        if let Some(c) = &cli.cluster {
            silt = silt.with_cluster(c)?;
        }
        return env(&silt, a.command, json).await;
    }
    let mut silt = Silt::open_in(&cli.project, cli.env.as_deref())?;
    if let Some(c) = &cli.cluster {
        silt = silt.with_cluster(c)?;
    }
    silt.check_env().await?;
    if matches!(cli.command, Command::Ingest(_)) {
        return with_ingest_claim(&silt, execute(&silt, cli.command, json)).await;
    }
    match lease_verb(&cli.command) {
        Some(verb) => with_lease(&silt, verb, execute(&silt, cli.command, json)).await,
        None => execute(&silt, cli.command, json).await,
    }
}

/// The commands that rewrite the lake's tables, which take its run lease, by the verb the
/// lease names. `ingest` takes a claim instead (it runs beside other ingests, never beside a
/// forget); `watch` takes the lease per cycle, so it never keeps other commands out while it
/// waits.
fn lease_verb(c: &Command) -> Option<&'static str> {
    match c {
        Command::Run(_) => Some("run"),
        Command::Build(_) => Some("build"),
        Command::Restore(_) => Some("restore"),
        Command::Export(_) => Some("export"),
        Command::Optimize(_) => Some("optimize"),
        Command::Vacuum(a) if !a.dry_run => Some("vacuum"),
        Command::Forget(a) if !a.verify => Some("forget"),
        _ => None,
    }
}

/// Run `work` under an ingest claim on the landing files (ingests run side by side; Delta txn
/// ids keep each file exactly once), after any forget that rewrites them.
async fn with_ingest_claim(
    silt: &Silt,
    work: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let opts = silt::lake::lease::LeaseOptions::from_env()?;
    let claim = silt::lake::lease::claim_ingest(&silt.lake, opts, |h| {
        eprintln!(
            "silt: waiting for {h} to finish erasing (up to {} s; SILT_LEASE_WAIT sets it)",
            opts.wait.as_secs()
        )
    })
    .await?;
    let result = work.await;
    let released = claim.release().await;
    result?;
    released?;
    Ok(())
}

/// Run `work` holding the lake's lease as `verb`; a forget also waits for running ingests.
async fn with_lease(
    silt: &Silt,
    verb: &'static str,
    work: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let opts = silt::lake::lease::LeaseOptions::from_env()?;
    let lease = silt::lake::lease::acquire(&silt.lake, verb, opts, |h| {
        eprintln!(
            "silt: waiting for the lake's lease, held by {h} (up to {} s; SILT_LEASE_WAIT sets it)",
            opts.wait.as_secs()
        )
    })
    .await?;
    let ready = if verb == "forget" {
        silt::lake::lease::wait_for_ingests(&silt.lake, opts, |h| {
            eprintln!(
                "silt: waiting for {h} to finish ingesting (up to {} s)",
                opts.wait.as_secs()
            )
        })
        .await
    } else {
        Ok(())
    };
    let result = match ready {
        Ok(()) => work.await,
        Err(e) => Err(e.into()),
    };
    if lease.lost() {
        eprintln!(
            "warning: this process stalled past its lease's time to live and another process took \
             the lease over; each commit is still whole (Delta's optimistic concurrency)"
        );
    }
    let released = lease.release().await;
    result?;
    released?;
    Ok(())
}

async fn execute(silt: &Silt, command: Command, json: bool) -> anyhow::Result<()> {
    match command {
        Command::Init(a) => init(&a, json),
        Command::Env(a) => env(silt, a.command, json).await,
        Command::Scheduler(a) => scheduler(a).await,
        Command::Executor(a) => executor(a).await,
        Command::Ingest(a) => ingest(silt, a.sources, json).await,
        Command::Run(a) => build(silt, a, true, json).await,
        Command::Build(a) => build(silt, a, false, json).await,
        Command::Watch(a) => watch(silt, a, json).await,
        Command::Test(a) => test(silt, a, json).await,
        Command::Freshness => freshness(silt, json).await,
        Command::Profile(a) => {
            let cols = silt::ops::profile::profile_target(silt, &a.target, a.top).await?;
            emit(cols.as_slice(), json)
        }
        Command::Dag(a) => dag(silt, a, json),
        Command::Lineage(a) => lineage(silt, a, json).await,
        Command::Docs(a) => {
            let out = if a.out.is_absolute() {
                a.out
            } else {
                silt.project.dir.join(a.out)
            };
            let r = silt::ops::docs::generate(silt, &out).await?;
            if json {
                write_stdout(&format!("{}\n", serde_json::to_string_pretty(&r)?))
            } else {
                write_stdout(&format!(
                    "wrote {} tables to {}\nopen {}\n",
                    r.tables,
                    r.out.display(),
                    r.index.display()
                ))
            }
        }
        Command::Runs(a) => runs(silt, a, json).await,
        Command::Query(a) => query(silt, a, json).await,
        Command::History(a) => {
            let t = TableRef::parse(&a.table)?;
            let h = silt::lake::time_travel::history(&silt.catalog, &t).await?;
            emit(h.as_slice(), json)
        }
        Command::Restore(a) => restore(silt, a).await,
        Command::Export(ExportArgs {
            target: ExportTarget::Bigquery { select },
        }) => export(silt, &select, json).await,
        Command::Optimize(a) => {
            let t = TableRef::parse(&a.table)?;
            let r = silt::ops::maintenance::optimize(
                &silt.catalog,
                &silt.project,
                &t,
                &a.zorder,
                a.target_size,
            )
            .await?;
            emit(&r, json)
        }
        Command::Vacuum(a) => vacuum(silt, a, json).await,
        Command::Forget(a) if a.verify => verify(silt, a, json).await,
        Command::Forget(a) => forget(silt, a, json).await,
        Command::Diff(a) => diff(silt, a, json).await,
        Command::Tables => emit(silt.catalog.describe_all().await?.as_slice(), json),
        Command::Source(SourceArgs {
            command: SourceCommand::New { name, from, force },
        }) => {
            let report = silt::ops::scaffold::source_new(silt, &name, &from, force).await?;
            emit(
                &printers::SourceNewView {
                    name,
                    report: &report,
                },
                json,
            )
        }
    }
}

fn init(a: &InitArgs, json: bool) -> anyhow::Result<()> {
    let written = silt::ops::scaffold::init(&a.dir)?;
    if json {
        write_stdout(&format!("{}\n", serde_json::to_string_pretty(&written)?))?;
        return Ok(());
    }
    let mut out = String::new();
    for w in written {
        out.push_str(&format!("created {}\n", a.dir.join(w).display()));
    }
    out.push_str(&format!(
        "\nnext: cd {} && silt ingest && silt query \"select * from bronze.example\"\n",
        a.dir.display()
    ));
    write_stdout(&out)?;
    Ok(())
}

async fn ingest(silt: &Silt, sources: Vec<String>, json: bool) -> anyhow::Result<()> {
    let bar = Bar::bytes()?;
    let report = silt
        .ingest()
        .with_sources(sources)
        .with_progress(Arc::new(bar.clone()))
        .execute()
        .await;
    bar.finish();
    let report = report?;
    if !json {
        printers::warn_ingest(&report);
    }
    emit(&report, json)?;
    if !json {
        printers::warn_anomalies(&report);
    }
    let anomalies_failed = !report.failed_sources().is_empty();
    if !report.rejected.is_empty() {
        return Err(Error::Rejected(report.rejected).into());
    }
    if anomalies_failed {
        return Err(ExitWith(1).into());
    }
    Ok(())
}

/// `silt run` (with `ingest`) and `silt build`.
async fn build(silt: &Silt, args: BuildArgs, ingest: bool, json: bool) -> anyhow::Result<()> {
    let bar = Bar::models()?;
    // A line per model as it finishes (dbt prints one per node): stderr, above the bar.
    let lines = bar.clone();
    let opts = silt::build::pipeline::RunOptions {
        select: args.select,
        full_refresh: args.full_refresh,
        ingest,
        no_models: false,
        on_model: Some(Box::new(move |m, i, of| {
            lines.println(&printers::model_line(i, of, m))
        })),
        progress: Some(Arc::new(bar.clone())),
    };
    let report = silt::build::pipeline::run(silt, opts).await;
    bar.finish();
    let command = if ingest { "run" } else { "build" };
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            notify(
                silt,
                &[silt::ops::notify::failure_event(command, &e.to_string())],
            )
            .await;
            return Err(e.into());
        }
    };
    notify(silt, &silt::ops::notify::run_events(command, &report)).await;
    if !json && let Some(r) = &report.ingest {
        printers::warn_ingest(r);
    }
    emit(&report, json)?;
    if !json && let Some(r) = &report.ingest {
        printers::warn_anomalies(r);
    }
    printers::warn_models(&report);
    printers::print_tests(&report, json)?;
    printers::print_errors(&report.errors);
    let code = report.exit_code();
    if code != 0 {
        return Err(ExitWith(code as u8).into());
    }
    export_after(silt, json).await
}

async fn watch(silt: &Silt, a: WatchArgs, json: bool) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let on_signal = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("silt: stopping after the current step (Ctrl-C)");
            on_signal.store(true, Ordering::SeqCst);
        }
    });
    eprintln!(
        "silt: watching {} (debounce {} ms, poll every {} s); Ctrl-C stops",
        silt.landing.url(),
        a.debounce_ms,
        a.poll_seconds
    );
    let opts = silt::ops::watch::WatchOptions {
        debounce: Duration::from_millis(a.debounce_ms),
        poll_interval: Duration::from_secs(a.poll_seconds),
    };
    // Each cycle's alerts go out beside the next wait (a watch runs unattended).
    let notifier = silt.clone();
    silt::ops::watch::watch(silt, opts, stop, move |changed, report| {
        let events = match &report {
            Ok(r) => silt::ops::notify::run_events("watch", r),
            Err(e) => vec![silt::ops::notify::failure_event("watch", &e.to_string())],
        };
        match report {
            Ok(r) => printers::watch_cycle(changed.len(), &r, json),
            Err(e) => eprintln!("error: {e}"),
        }
        if !events.is_empty() {
            let s = notifier.clone();
            tokio::spawn(async move { notify(&s, &events).await });
        }
    })
    .await?;
    eprintln!("silt: stopped");
    Ok(())
}

async fn test(silt: &Silt, a: TestArgs, json: bool) -> anyhow::Result<()> {
    let report = silt::build::pipeline::test(silt, &a.select).await?;
    notify(silt, &silt::ops::notify::run_events("test", &report)).await;
    if json {
        write_stdout(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
    }
    printers::print_tests(&report, json)?;
    printers::print_errors(&report.errors);
    let code = report.exit_code();
    if code != 0 {
        return Err(ExitWith(code as u8).into());
    }
    Ok(())
}

async fn freshness(silt: &Silt, json: bool) -> anyhow::Result<()> {
    let rows = silt::ops::freshness::freshness(silt, chrono::Utc::now()).await?;
    notify(silt, &silt::ops::notify::freshness_events(&rows)).await;
    emit(rows.as_slice(), json)?;
    if rows
        .iter()
        .any(|r| r.status == silt::ops::freshness::FreshnessStatus::Error)
    {
        return Err(ExitWith(1).into());
    }
    Ok(())
}

fn dag(silt: &Silt, a: DagArgs, json: bool) -> anyhow::Result<()> {
    let dag = silt::build::models::Dag::load(&silt.project)?;
    let format = if json {
        "json"
    } else {
        match a.format {
            DagFormat::Text => "text",
            DagFormat::Mermaid => "mermaid",
            DagFormat::Dot => "dot",
            DagFormat::Json => "json",
        }
    };
    write_stdout(&silt::build::models::render_dag(&dag, format)?)
}

async fn lineage(silt: &Silt, a: LineageArgs, json: bool) -> anyhow::Result<()> {
    use silt::ops::lineage as l;
    if a.changed {
        let c = l::changed(silt).await?;
        return if json {
            write_stdout(&format!("{}\n", serde_json::to_string_pretty(&c)?))
        } else {
            write_stdout(&l::render_changes(&c))
        };
    }
    let lineage = l::load(silt, a.run.as_deref()).await?;
    let target = a.target.unwrap_or_default();
    let trees: Vec<l::Tree> = l::targets(&lineage, &target)?
        .iter()
        .map(|id| {
            if a.downstream {
                l::downstream(&lineage, id)
            } else {
                l::upstream(&lineage, id)
            }
        })
        .collect();
    if json {
        let v = if trees.len() == 1 {
            serde_json::to_value(&trees[0])?
        } else {
            serde_json::to_value(&trees)?
        };
        write_stdout(&format!("{}\n", serde_json::to_string_pretty(&v)?))
    } else {
        write_stdout(
            &trees
                .iter()
                .map(l::render_tree)
                .collect::<Vec<_>>()
                .join("\n"),
        )
    }
}

async fn runs(silt: &Silt, a: RunsArgs, json: bool) -> anyhow::Result<()> {
    let batches = match &a.run {
        Some(id) => silt::lake::meta::runs::detail(&silt.catalog, id).await?,
        None => silt::lake::meta::runs::list(&silt.catalog, a.limit).await?,
    };
    if !json && batches.iter().all(|b| b.num_rows() == 0) && a.run.is_none() {
        write_stdout("no run recorded yet: `silt run` builds the pipeline and records it\n")?;
        return Ok(());
    }
    let format = if json {
        OutputFormat::Json
    } else {
        OutputFormat::Table
    };
    write_stdout(&render(&batches, format)?)
}

async fn query(silt: &Silt, a: QueryArgs, json: bool) -> anyhow::Result<()> {
    let pins = match &a.as_of_run {
        Some(id) => silt::ops::query::run_versions(&silt.catalog, id).await?,
        None => Default::default(),
    };
    let batches = silt::ops::query::run_pinned(&silt.catalog, &a.sql, pins).await?;
    let format = match (json, a.format) {
        (true, _) | (_, Format::Json) => OutputFormat::Json,
        (_, Format::Table) => OutputFormat::Table,
        (_, Format::Csv) => OutputFormat::Csv,
    };
    write_stdout(&render(&batches, format)?)
}

async fn restore(silt: &Silt, a: RestoreArgs) -> anyhow::Result<()> {
    let t = TableRef::parse(&a.table)?;
    let as_of = match (a.version, a.timestamp) {
        (Some(v), _) => AsOf::Version(v),
        (None, Some(ts)) => {
            AsOf::Timestamp(silt::lake::time_travel::parse_instant(&ts).ok_or_else(|| {
                Error::Usage(format!("--timestamp '{ts}' is not an RFC 3339 time"))
            })?)
        }
        (None, None) => return Err(Error::Usage("give --version or --timestamp".into()).into()),
    };
    let v = silt::lake::time_travel::restore(&silt.catalog, &t, &as_of).await?;
    write_stdout(&format!("{t} restored as version {v}\n"))?;
    Ok(())
}

async fn vacuum(silt: &Silt, a: VacuumArgs, json: bool) -> anyhow::Result<()> {
    let tables = match a.table {
        Some(t) => vec![TableRef::parse(&t)?],
        // Every data table; silt's bookkeeping keeps its history.
        None => silt
            .catalog
            .list()
            .await?
            .into_iter()
            .filter(|t| t.layer != Layer::Silt)
            .collect(),
    };
    // Files that environments cloned from this lake still name are kept.
    let referenced = silt::ops::env::referenced_by_envs(silt).await?;
    let mut reports = Vec::new();
    for t in tables {
        reports.push(
            silt::ops::maintenance::vacuum(
                &silt.catalog,
                &t,
                a.retain_hours,
                a.dry_run,
                a.force,
                &referenced,
            )
            .await?,
        );
    }
    emit(reports.as_slice(), json)
}

/// The subject ids of a forget: on the command line and in `--file` (one per line, `#`
/// comments).
fn subject_ids(a: &ForgetArgs) -> anyhow::Result<Vec<String>> {
    let mut ids = a.ids.clone();
    if let Some(f) = &a.file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| Error::Usage(format!("cannot read {}: {e}", f.display())))?;
        ids.extend(
            text.lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty() && !l.starts_with('#')),
        );
    }
    if ids.is_empty() {
        return Err(Error::Usage("give subject ids or --file ids.txt".into()).into());
    }
    Ok(ids)
}

async fn verify(silt: &Silt, a: ForgetArgs, json: bool) -> anyhow::Result<()> {
    let ids = subject_ids(&a)?;
    let mut r = silt::ops::erasure::verify(silt, &ids).await?;
    // Every environment cloned from this lake is scanned too.
    for env in silt::ops::env::descendants(silt).await? {
        let name = silt::ops::env::name_of(&env).to_string();
        let e = silt::ops::erasure::verify(&env, &ids).await?;
        r.objects_scanned += e.objects_scanned;
        r.parquet_files += e.parquet_files;
        r.findings.extend(e.findings.into_iter().map(|mut f| {
            f.location = format!("env {name}: {}", f.location);
            f
        }));
        r.unreadable.extend(e.unreadable);
    }
    r.unreadable.sort();
    r.unreadable.dedup();
    emit(&r, json)?;
    if !json {
        for u in &r.unreadable {
            eprintln!("warning: not scanned: {u}");
        }
    }
    if !r.findings.is_empty() {
        return Err(ExitWith(1).into());
    }
    Ok(())
}

async fn forget(silt: &Silt, a: ForgetArgs, json: bool) -> anyhow::Result<()> {
    let ids = subject_ids(&a)?;
    // Environments cloned from this lake first (children before parents), each under its own
    // lease: they still read the files this lake's forget purges.
    let mut envs = silt::ops::env::descendants(silt).await?;
    envs.reverse();
    for env in &envs {
        let (ids, reason) = (ids.clone(), a.reason.clone());
        let name = silt::ops::env::name_of(env).to_string();
        with_lease(env, "forget", async {
            let r = silt::ops::erasure::ForgetBuilder::new(env, ids)
                .with_reason(reason)
                .execute()
                .await?;
            if !json {
                eprintln!(
                    "silt: environment {name}: {} row(s) deleted, {} file(s) purged",
                    r.rows_deleted, r.files_purged
                );
            }
            notify(env, &[silt::ops::notify::erasure_event(&name, &r)]).await;
            Ok(())
        })
        .await?;
    }
    let r = silt::ops::erasure::ForgetBuilder::new(silt, ids)
        .with_reason(a.reason)
        .execute()
        .await?;
    notify(
        silt,
        &[silt::ops::notify::erasure_event(
            silt::ops::env::name_of(silt),
            &r,
        )],
    )
    .await;
    emit(&r, json)?;
    for w in r
        .warnings
        .iter()
        .chain(r.steps.iter().flat_map(|s| s.warnings.iter()))
    {
        eprintln!("warning: {w}");
    }
    export_after(silt, json).await
}

async fn diff(silt: &Silt, a: DiffArgs, json: bool) -> anyhow::Result<()> {
    let t = TableRef::parse(&a.table)?;
    let key = if a.key.is_empty() {
        silt::build::models::row_key(&silt.project, &t)
    } else {
        a.key
    };
    if let Some(other) = &a.against {
        // The table here against the same table in another environment (or prod).
        let there = silt::ops::env::open(silt, other).await?;
        let open = |s: &Silt| {
            let (s, t) = (s.clone(), t.clone());
            async move {
                s.catalog.open(&t).await?.ok_or_else(|| {
                    Error::Usage(format!(
                        "{t} does not exist in '{}'",
                        silt::ops::env::name_of(&s)
                    ))
                })
            }
        };
        let (a_t, b_t) = (open(&there).await?, open(silt).await?);
        let d = silt::lake::time_travel::diff_tables(&silt.lake, &a_t, &b_t, &key).await?;
        let view = printers::DiffView {
            table: t.to_string(),
            from: other.clone(),
            to: silt::ops::env::name_of(silt).to_string(),
            diff: &d,
        };
        return emit(&view, json);
    }
    let Some(from) = a.from else {
        return Err(Error::Usage(
            "give --from VERSION (two versions of the table) or --against ENV (the table in another environment)".into(),
        )
        .into());
    };
    let to = match a.to {
        Some(v) => v,
        None => silt
            .catalog
            .open(&t)
            .await?
            .and_then(|x| x.version())
            .ok_or_else(|| Error::Usage(format!("{t} does not exist")))?,
    };
    let d = silt::lake::time_travel::diff(
        &silt.catalog,
        &t,
        &AsOf::Version(from),
        &AsOf::Version(to),
        &key,
    )
    .await?;
    let view = printers::DiffView {
        table: t.to_string(),
        from: format!("version {from}"),
        to: format!("version {to}"),
        diff: &d,
    };
    emit(&view, json)
}

/// `[bigquery] export_after_run`: publish what changed once a run or an erasure succeeded.
async fn export_after(silt: &Silt, json: bool) -> anyhow::Result<()> {
    let after_run = silt
        .project
        .file
        .bigquery
        .as_ref()
        .is_some_and(|b| b.export_after_run);
    if !after_run {
        return Ok(());
    }
    if json {
        silt::ops::export::bigquery(silt, &[]).await?;
        return Ok(());
    }
    export(silt, &[], false).await
}

async fn export(silt: &Silt, select: &[String], json: bool) -> anyhow::Result<()> {
    let r = silt::ops::export::bigquery(silt, select).await?;
    emit(&r, json)
}

/// `silt scheduler`: a cluster scheduler until stopped.
async fn scheduler(a: SchedulerArgs) -> anyhow::Result<()> {
    silt::ops::roles::run_scheduler(silt::ops::roles::SchedulerOptions {
        bind: a.bind,
        executor_timeout_secs: a.executor_timeout_secs,
    })
    .await?;
    Ok(())
}

/// `silt executor`: a cluster executor until stopped.
async fn executor(a: ExecutorArgs) -> anyhow::Result<()> {
    let engine = silt::project::config::EngineSection {
        memory_limit_mb: a.memory_limit_mb,
        ..Default::default()
    };
    silt::ops::roles::run_executor(silt::ops::roles::ExecutorOptions {
        scheduler: silt::lake::cluster::Cluster::parse(&a.scheduler)?,
        bind: a.bind,
        concurrent_tasks: a
            .concurrent_tasks
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
        work_dir: a.work_dir,
        memory_pool_bytes: engine.memory_limit_bytes() as u64,
        heartbeat_secs: a.heartbeat_secs,
    })
    .await?;
    Ok(())
}

/// Send `events` per `[notify]`; a notification that fails is a warning on stderr.
async fn notify(silt: &Silt, events: &[silt::ops::notify::Event]) {
    for p in silt::ops::notify::send(silt, events).await {
        eprintln!("warning: {p}");
    }
}

/// `silt env …`. `silt` is the project's own lake.
async fn env(silt: &Silt, c: EnvCommand, json: bool) -> anyhow::Result<()> {
    use silt::ops::env as e;
    match c {
        EnvCommand::Create { name, from } => {
            let source = e::open(silt, &from).await?;
            // Under the source's lease, and the project lake's (a forget holds it while it
            // erases every environment): no forget or vacuum purges a file while it is
            // cloned, and no environment appears in the middle of a forget.
            let work = async {
                let r = e::create(&source, &name).await?;
                emit(&r, json)
            };
            if source.env.is_some() {
                with_lease(silt, "clone", with_lease(&source, "clone", work)).await
            } else {
                with_lease(&source, "clone", work).await
            }
        }
        EnvCommand::List => emit(e::list(silt).await?.as_slice(), json),
        EnvCommand::Drop { name } => {
            let r = e::drop(silt, &name).await?;
            emit(&r, json)
        }
        EnvCommand::Promote { name, to, dry_run } => {
            let env = e::open(silt, &name).await?;
            let target = e::open(silt, &to).await?;
            if dry_run {
                return emit(&e::promote(&env, &target, true).await?, json);
            }
            let work = async {
                let r = e::promote(&env, &target, false).await?;
                emit(&r, json)
            };
            with_lease(&target, "promote", with_lease(&env, "promote", work)).await
        }
        EnvCommand::Localize { name, table } => {
            let env = e::open(silt, &name).await?;
            let t = match table {
                Some(t) => Some(TableRef::parse(&t)?),
                None => None,
            };
            let work = async {
                let r = e::localize(&env, t.as_ref()).await?;
                emit(&r, json)
            };
            with_lease(&env, "localize", work).await
        }
    }
}
