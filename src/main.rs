//! The `silt` binary: parse the command line, call the library, print, and exit with the codes
//! of ARCHITECTURE.md (0 ok, 1 data tests failed, 2 usage/config, 3 runtime/storage). It must stay
//! thin: no pipeline logic here.

mod cli;

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use cli::{BuildArgs, Cli, Command, DagFormat, ExportTarget, Format, SourceCommand};
use silt::render::{OutputFormat, render, simple_table};
use silt::{Error, Silt};

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of stdout goes away (`silt … | head`).
    // SAFETY: restoring the default SIGPIPE disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    // A forget never logs what it erases: delta-rs traces file statistics (ids) at debug
    // level, so its dependencies stay silent at every verbosity, SILT_LOG included.
    let forget = matches!(cli.command, Command::Forget { .. });
    let filter = match (cli.verbose, forget) {
        // silt's own steps; dependencies (delta-rs, delta-kernel, DataFusion) only from -vvv:
        // their errors reach the user as silt's errors, once.
        (0, _) => "off,silt=warn",
        (1, _) => "off,silt=info",
        (2, _) | (_, true) => "off,silt=debug",
        _ => "debug,silt=trace",
    };
    let env_filter = match std::env::var("SILT_LOG") {
        Ok(_) if !forget => tracing_subscriber::EnvFilter::try_from_env("SILT_LOG")
            .unwrap_or_else(|_| filter.into()),
        _ => filter.into(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        .init();
    // At least two workers, so the lease's renewal runs beside a busy one on a 1-core machine.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(ref e) if let Some(ExitWith(code)) = e.downcast_ref::<ExitWith>() => {
            ExitCode::from(*code)
        }
        Err(e) => {
            let code = e
                .downcast_ref::<Error>()
                .map(|e| e.exit_code())
                .unwrap_or(3);
            let text = describe(&e);
            eprintln!("error: {text}");
            if let Some(h) = silt::error::memory_hint(&text) {
                eprintln!("  {h}");
            }
            ExitCode::from(code as u8)
        }
    }
}

/// An error and the causes its text does not already say, each once (a library error's text
/// usually includes its source's, and anyhow's `{:#}` would repeat it).
fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

/// An exit code chosen by a command after it printed its own report (failed data tests,
/// findings): main exits with it and prints nothing more. Returned instead of exiting on the
/// spot, so the lake's lease is released first.
#[derive(Debug)]
struct ExitWith(u8);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

/// The commands that rewrite the lake's tables, which take its run lease, by
/// the verb the lease names. `ingest` does not: it only appends, and each landing file's Delta
/// `txn` id makes a second process's commit of the same file fail (ARCHITECTURE.md). `watch`
/// takes the lease per cycle (watch.rs), so it never keeps other commands out while it waits.
fn lease_verb(c: &Command) -> Option<&'static str> {
    match c {
        Command::Run(_) => Some("run"),
        Command::Build(_) => Some("build"),
        Command::Restore { .. } => Some("restore"),
        Command::Export { .. } => Some("export"),
        Command::Optimize { .. } => Some("optimize"),
        Command::Vacuum { dry_run: false, .. } => Some("vacuum"),
        Command::Forget { verify: false, .. } => Some("forget"),
        _ => None,
    }
}

/// Run the command, holding the lake's lease around it when it writes.
async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    if matches!(cli.command, Command::Ingest(_)) {
        // Ingests run side by side (Delta txn ids keep them exactly once), never beside a
        // forget, which rewrites landing files.
        let silt = Silt::open(&cli.project)?;
        let opts = silt::lease::LeaseOptions::from_env()?;
        let claim = silt::lease::claim_ingest(&silt.lake, opts, |h| {
            eprintln!(
                "silt: waiting for {h} to finish erasing (up to {} s; SILT_LEASE_WAIT sets it)",
                opts.wait.as_secs()
            )
        })
        .await?;
        let result = execute(cli).await;
        let released = claim.release().await;
        result?;
        released?;
        return Ok(());
    }
    let Some(verb) = lease_verb(&cli.command) else {
        return execute(cli).await;
    };
    let silt = Silt::open(&cli.project)?;
    let opts = silt::lease::LeaseOptions::from_env()?;
    let lease = silt::lease::acquire(&silt.lake, verb, opts, |h| {
        eprintln!(
            "silt: waiting for the lake's lease, held by {h} (up to {} s; SILT_LEASE_WAIT sets it)",
            opts.wait.as_secs()
        )
    })
    .await?;
    let ready = if verb == "forget" {
        silt::lease::wait_for_ingests(&silt.lake, opts, |h| {
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
        Ok(()) => execute(cli).await,
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

async fn execute(cli: Cli) -> anyhow::Result<()> {
    let json = cli.json;
    match cli.command {
        Command::Init { dir } => {
            let written = silt::scaffold::init(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&written)?);
            } else {
                for w in written {
                    println!("created {}", dir.join(w).display());
                }
                println!(
                    "\nnext: cd {} && silt ingest && silt query \"select * from bronze.example\"",
                    dir.display()
                );
            }
        }
        Command::Ingest(args) => {
            let silt = Silt::open(&cli.project)?;
            ingest(&silt, args.sources, json).await?;
        }
        Command::Run(args) => {
            let silt = Silt::open(&cli.project)?;
            build(&silt, args, true, json).await?;
        }
        Command::Build(args) => {
            let silt = Silt::open(&cli.project)?;
            build(&silt, args, false, json).await?;
        }
        Command::Watch {
            debounce_ms,
            poll_seconds,
        } => {
            let silt = Silt::open(&cli.project)?;
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let s2 = stop.clone();
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("silt: stopping after the current step (Ctrl-C)");
                    s2.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            });
            eprintln!(
                "silt: watching {} (debounce {debounce_ms} ms, poll every {poll_seconds} s); Ctrl-C stops",
                silt.landing.url()
            );
            let opts = silt::watch::WatchOptions {
                debounce: std::time::Duration::from_millis(debounce_ms),
                poll_interval: std::time::Duration::from_secs(poll_seconds),
            };
            silt::watch::watch(&silt, opts, stop, |changed, report| match report {
                Ok(r) => {
                    let built: Vec<String> = r
                        .models
                        .iter()
                        .filter(|m| m.status == "built")
                        .map(|m| format!("{} ({})", m.table, m.mode))
                        .collect();
                    let (files, rows) = r.ingest.as_ref().map(|i| i.sources.iter().fold((0, 0), |a, s| (a.0 + s.files_ingested, a.1 + s.rows))).unwrap_or((0, 0));
                    if json {
                        println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    }
                    eprintln!(
                        "silt: {} change(s): ingested {files} file(s), {rows} row(s); built {} model(s){}{} in {} ms",
                        changed.len(),
                        built.len(),
                        if built.is_empty() { "" } else { ": " },
                        built.join(", "),
                        r.elapsed_ms
                    );
                    for m in &r.models {
                        for w in &m.warnings {
                            eprintln!("warning: {}: {w}", m.model);
                        }
                    }
                    for t in r.tests.iter().filter(|t| t.status != "pass") {
                        eprintln!(
                            "{} {} on {}: {} failing row(s)",
                            t.status.to_uppercase(),
                            t.name,
                            t.subject,
                            t.failing_rows
                        );
                    }
                    for (name, e) in &r.errors {
                        print_error(name, e);
                    }
                }
                Err(e) => eprintln!("error: {e}"),
            })
            .await?;
            eprintln!("silt: stopped");
        }
        Command::Test { select } => {
            let silt = Silt::open(&cli.project)?;
            let report = silt::pipeline::test(&silt, &select).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            print_tests(&report, json)?;
            for (name, e) in &report.errors {
                print_error(name, e);
            }
            let code = report.exit_code();
            if code != 0 {
                return Err(ExitWith(code as u8).into());
            }
        }
        Command::Freshness => {
            let silt = Silt::open(&cli.project)?;
            let rows = silt::freshness::freshness(&silt, chrono::Utc::now()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!(
                    "no source declares [freshness], so there is nothing to check. Add it to a source's \
                     sql/bronze/<source>.toml, e.g.:\n\n[freshness]\ncolumn = \"<date or timestamp column>\"  \
                     # omit to measure when the newest landing file arrived\nwarn_after = \"2 days\"\nerror_after = \"7 days\""
                );
            } else {
                let table = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.source.clone(),
                            r.measured.clone(),
                            r.latest.clone().unwrap_or_else(|| "-".into()),
                            r.age.clone().unwrap_or_else(|| "-".into()),
                            r.warn_after.clone().unwrap_or_else(|| "-".into()),
                            r.error_after.clone().unwrap_or_else(|| "-".into()),
                            r.status.clone(),
                        ]
                    })
                    .collect();
                write_stdout(&simple_table(
                    &[
                        "source",
                        "measured",
                        "latest",
                        "age",
                        "warn after",
                        "error after",
                        "status",
                    ],
                    table,
                ))?;
            }
            if rows.iter().any(|r| r.status == "error") {
                return Err(ExitWith(1).into());
            }
        }
        Command::Profile { target, top } => {
            let silt = Silt::open(&cli.project)?;
            let cols = silt::profile::profile_target(&silt, &target, top).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&cols)?);
            } else {
                let rows = cols
                    .iter()
                    .map(|c| {
                        vec![
                            c.column.clone(),
                            c.data_type.clone(),
                            c.rows.to_string(),
                            c.nulls.to_string(),
                            c.distinct.to_string(),
                            c.min.clone().unwrap_or_default(),
                            c.max.clone().unwrap_or_default(),
                            c.mean.map(|m| format!("{m:.4}")).unwrap_or_default(),
                            c.top
                                .iter()
                                .map(|(v, n)| format!("{v} ({n})"))
                                .collect::<Vec<_>>()
                                .join(", "),
                        ]
                    })
                    .collect();
                write_stdout(&simple_table(
                    &[
                        "column",
                        "type",
                        "rows",
                        "nulls",
                        "distinct",
                        "min",
                        "max",
                        "mean",
                        "top values",
                    ],
                    rows,
                ))?;
            }
        }
        Command::Dag { format } => {
            let silt = Silt::open(&cli.project)?;
            let dag = silt::models::Dag::load(&silt.project)?;
            let f = if json {
                "json"
            } else {
                match format {
                    DagFormat::Text => "text",
                    DagFormat::Mermaid => "mermaid",
                    DagFormat::Dot => "dot",
                    DagFormat::Json => "json",
                }
            };
            write_stdout(&silt::models::render_dag(&dag, f)?)?;
        }
        Command::Runs { limit, run } => {
            let silt = Silt::open(&cli.project)?;
            let batches = match &run {
                Some(id) => silt::runs::detail(&silt.catalog, id).await?,
                None => silt::runs::list(&silt.catalog, limit).await?,
            };
            if !json && batches.iter().all(|b| b.num_rows() == 0) && run.is_none() {
                println!("no run recorded yet: `silt run` builds the pipeline and records it");
                return Ok(());
            }
            write_stdout(&render(
                &batches,
                if json {
                    OutputFormat::Json
                } else {
                    OutputFormat::Table
                },
            )?)?;
        }
        Command::Query {
            sql,
            format,
            as_of_run,
        } => {
            let silt = Silt::open(&cli.project)?;
            let pins = match &as_of_run {
                Some(id) => silt::query::run_versions(&silt.catalog, id).await?,
                None => Default::default(),
            };
            let batches = silt::query::run_pinned(&silt.catalog, &sql, pins).await?;
            let format = if json {
                OutputFormat::Json
            } else {
                match format {
                    Format::Table => OutputFormat::Table,
                    Format::Csv => OutputFormat::Csv,
                    Format::Json => OutputFormat::Json,
                }
            };
            write_stdout(&render(&batches, format)?)?;
        }
        Command::History { table } => {
            let silt = Silt::open(&cli.project)?;
            let t = silt::catalog::TableRef::parse(&table)?;
            let h = silt::time_travel::history(&silt.catalog, &t).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&h)?);
            } else {
                let rows = h
                    .iter()
                    .map(|e| {
                        vec![
                            e.version.to_string(),
                            e.timestamp.clone().unwrap_or_default(),
                            e.operation.clone().unwrap_or_default(),
                            e.silt_operation.clone().unwrap_or_default(),
                            e.run.clone().unwrap_or_default(),
                            e.metrics
                                .iter()
                                .filter(|(_, v)| !v.is_null())
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect::<Vec<_>>()
                                .join(" "),
                        ]
                    })
                    .collect();
                write_stdout(&simple_table(
                    &[
                        "version",
                        "time",
                        "operation",
                        "silt",
                        "run / batch",
                        "metrics",
                    ],
                    rows,
                ))?;
            }
        }
        Command::Restore {
            table,
            version,
            timestamp,
        } => {
            let silt = Silt::open(&cli.project)?;
            let t = silt::catalog::TableRef::parse(&table)?;
            let as_of = match (version, timestamp) {
                (Some(v), _) => silt::time_travel::AsOf::Version(v),
                (None, Some(ts)) => silt::time_travel::AsOf::Timestamp(
                    silt::time_travel::parse_instant(&ts).ok_or_else(|| {
                        Error::Usage(format!("--timestamp '{ts}' is not an RFC 3339 time"))
                    })?,
                ),
                (None, None) => {
                    return Err(Error::Usage("give --version or --timestamp".into()).into());
                }
            };
            let v = silt::time_travel::restore(&silt.catalog, &t, &as_of).await?;
            println!("{t} restored as version {v}");
        }
        Command::Export {
            target: ExportTarget::Bigquery { select },
        } => {
            let silt = Silt::open(&cli.project)?;
            export(&silt, &select, json).await?;
        }
        Command::Optimize {
            table,
            zorder,
            target_size,
        } => {
            let silt = Silt::open(&cli.project)?;
            let t = silt::catalog::TableRef::parse(&table)?;
            let r = silt::maintenance::optimize(&silt.catalog, &t, &zorder, target_size).await?;
            if json {
                write_stdout(&format!("{}\n", serde_json::to_string_pretty(&r)?))?;
            } else {
                println!(
                    "{}: {} file(s) compacted into {} in {} partition(s); version {}",
                    r.table,
                    r.files_removed,
                    r.files_added,
                    r.partitions_optimized,
                    r.version.map(|v| v.to_string()).unwrap_or_default()
                );
            }
        }
        Command::Vacuum {
            table,
            retain_hours,
            force,
            dry_run,
        } => {
            let silt = Silt::open(&cli.project)?;
            let tables = match table {
                Some(t) => vec![silt::catalog::TableRef::parse(&t)?],
                // Every data table; silt's bookkeeping keeps its history.
                None => silt
                    .catalog
                    .list()
                    .await?
                    .into_iter()
                    .filter(|t| t.layer != silt::catalog::Layer::Silt)
                    .collect(),
            };
            let mut reports = Vec::new();
            for t in tables {
                reports.push(
                    silt::maintenance::vacuum(&silt.catalog, &t, retain_hours, dry_run, force)
                        .await?,
                );
            }
            if json {
                write_stdout(&format!("{}\n", serde_json::to_string_pretty(&reports)?))?;
            } else {
                for r in &reports {
                    println!(
                        "{}: {} file(s) {}",
                        r.table,
                        r.files_deleted.len(),
                        if r.dry_run {
                            "would be deleted"
                        } else {
                            "deleted"
                        }
                    );
                    if r.dry_run {
                        for f in &r.files_deleted {
                            println!("  {f}");
                        }
                    }
                }
            }
        }
        Command::Forget {
            ids,
            file,
            reason,
            verify,
        } => {
            let silt = Silt::open(&cli.project)?;
            let mut ids = ids;
            if let Some(f) = file {
                let text = std::fs::read_to_string(&f)
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
            if verify {
                let r = silt::erasure::verify(&silt, &ids).await?;
                if json {
                    write_stdout(&format!("{}\n", serde_json::to_string_pretty(&r)?))?;
                } else {
                    let rows = r
                        .findings
                        .iter()
                        .map(|f| {
                            vec![
                                f.location.clone(),
                                f.kind.clone(),
                                f.column.clone().unwrap_or_default(),
                            ]
                        })
                        .collect();
                    if !r.findings.is_empty() {
                        write_stdout(&simple_table(&["location", "found", "column"], rows))?;
                    }
                    println!(
                        "scanned {} object(s) ({} Parquet file(s) decoded): {} finding(s)",
                        r.objects_scanned,
                        r.parquet_files,
                        r.findings.len()
                    );
                    for u in &r.unreadable {
                        eprintln!("warning: not scanned: {u}");
                    }
                }
                if !r.findings.is_empty() {
                    return Err(ExitWith(1).into());
                }
                return Ok(());
            }
            let r = silt::erasure::ForgetBuilder::new(&silt, ids)
                .with_reason(reason)
                .execute()
                .await?;
            if json {
                write_stdout(&format!("{}\n", serde_json::to_string_pretty(&r)?))?;
            } else {
                let rows = r
                    .steps
                    .iter()
                    .filter(|s| {
                        s.rows_deleted > 0
                            || s.version.is_some()
                            || !s.files_purged.is_empty()
                            || !s.files_rewritten.is_empty()
                    })
                    .map(|s| {
                        vec![
                            s.table.clone(),
                            s.action.clone(),
                            s.rows_deleted.to_string(),
                            format!("{}/{}", s.files_rewritten.len(), s.files_scanned),
                            s.files_added.to_string(),
                            s.files_purged.len().to_string(),
                            s.version.map(|v| v.to_string()).unwrap_or_default(),
                            s.unreadable
                                .map(|(a, b)| format!("{a}..={b}"))
                                .unwrap_or_default(),
                            s.partitions.join(","),
                        ]
                    })
                    .collect();
                write_stdout(&simple_table(
                    &[
                        "table",
                        "action",
                        "rows-",
                        "rewritten",
                        "files+",
                        "purged",
                        "version",
                        "unreadable",
                        "partitions",
                    ],
                    rows,
                ))?;
                println!(
                    "erasure request {}{}: {} row(s) deleted, {} file(s) purged in {} ms",
                    r.request_id,
                    if r.resumed { " (resumed)" } else { "" },
                    r.rows_deleted,
                    r.files_purged,
                    r.elapsed_ms
                );
                if !r.matched {
                    println!(
                        "no record of any table or landing file belongs to the given id(s) (matched by subject key, never as text): nothing was changed; the request is audited as a no-op"
                    );
                }
            }
            for w in r
                .warnings
                .iter()
                .chain(r.steps.iter().flat_map(|s| s.warnings.iter()))
            {
                eprintln!("warning: {w}");
            }
            export_after(&silt, json).await?;
        }
        Command::Diff {
            table,
            from,
            to,
            key,
        } => {
            let silt = Silt::open(&cli.project)?;
            let t = silt::catalog::TableRef::parse(&table)?;
            let key = if key.is_empty() {
                default_key(&silt, &t)
            } else {
                key
            };
            let to = match to {
                Some(v) => v,
                None => silt
                    .catalog
                    .open(&t)
                    .await?
                    .and_then(|x| x.version())
                    .ok_or_else(|| Error::Usage(format!("{t} does not exist")))?,
            };
            let d = silt::time_travel::diff(
                &silt.catalog,
                &t,
                &silt::time_travel::AsOf::Version(from),
                &silt::time_travel::AsOf::Version(to),
                &key,
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                println!(
                    "{t}: version {from} → {to}: {} added, {} removed, {} changed (key: {})",
                    d.added.len(),
                    d.removed.len(),
                    d.changed.len(),
                    if d.key.is_empty() {
                        "whole row".into()
                    } else {
                        d.key.join(", ")
                    }
                );
                for r in &d.added {
                    println!("+ {}", serde_json::Value::Object(r.clone()));
                }
                for r in &d.removed {
                    println!("- {}", serde_json::Value::Object(r.clone()));
                }
                for (a, b) in &d.changed {
                    let fields: Vec<String> = b
                        .iter()
                        .filter(|(k, v)| a.get(*k) != Some(*v))
                        .map(|(k, v)| {
                            format!("{k}: {} → {v}", a.get(k).cloned().unwrap_or_default())
                        })
                        .collect();
                    let k: Vec<String> = d
                        .key
                        .iter()
                        .map(|c| format!("{c}={}", b.get(c).cloned().unwrap_or_default()))
                        .collect();
                    println!("~ {} {}", k.join(" "), fields.join(", "));
                }
            }
        }
        Command::Tables => {
            let silt = Silt::open(&cli.project)?;
            let tables = silt.catalog.describe_all().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tables)?);
            } else {
                let rows = tables
                    .iter()
                    .map(|t| {
                        vec![
                            t.table.clone(),
                            t.version.to_string(),
                            t.rows.to_string(),
                            t.files.to_string(),
                            t.bytes.to_string(),
                            t.partition_by.join(", "),
                        ]
                    })
                    .collect();
                write_stdout(&simple_table(
                    &["table", "version", "rows", "files", "bytes", "partition_by"],
                    rows,
                ))?;
            }
        }
        Command::Source {
            command: SourceCommand::New { name, from, force },
        } => {
            let silt = Silt::open(&cli.project)?;
            let r = silt::scaffold::source_new(&silt, &name, &from, force).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("wrote {} (glob {})", r.path, r.glob);
                println!(
                    "the sample parses under it: {} row(s) ok, {} quarantined",
                    r.rows_ok, r.rows_quarantined
                );
                if let Some(n) = r.note {
                    println!("note: {n}");
                }
                println!("review the contract, then run: silt ingest --source {name}");
            }
        }
    }
    Ok(())
}

async fn ingest(silt: &Silt, sources: Vec<String>, json: bool) -> anyhow::Result<()> {
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} ingest {bytes} read ({binary_bytes_per_sec}) {msg}",
        )
        .context("progress template")?,
    );
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    let report = silt
        .ingest()
        .with_sources(sources)
        .with_progress(pb.clone())
        .execute()
        .await;
    pb.finish_and_clear();
    let report = report?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        for s in &report.sources {
            for w in &s.warnings {
                eprintln!("warning: {}: {w}", s.source);
            }
        }
        let rows = report
            .sources
            .iter()
            .map(|s| {
                vec![
                    s.source.clone(),
                    s.files_listed.to_string(),
                    s.files_ingested.to_string(),
                    s.files_already_ingested.to_string(),
                    s.files_duplicate.to_string(),
                    s.files_changed.to_string(),
                    s.files_rejected.to_string(),
                    s.rows.to_string(),
                    s.quarantined.to_string(),
                    s.bronze_version
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        write_stdout(&simple_table(
            &[
                "source",
                "files",
                "new",
                "seen",
                "duplicate",
                "changed",
                "rejected",
                "rows",
                "quarantined",
                "bronze version",
            ],
            rows,
        ))?;
        println!("batch {} in {} ms", report.batch_id, report.elapsed_ms);
        for a in report.sources.iter().flat_map(|s| s.anomalies.iter()) {
            eprintln!(
                "anomaly ({}): {}: {}{}: {}",
                a.status,
                a.source,
                a.check,
                a.column
                    .as_ref()
                    .map(|c| format!(" on {c}"))
                    .unwrap_or_default(),
                a.message
            );
        }
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

async fn build(silt: &Silt, args: BuildArgs, ingest: bool, json: bool) -> anyhow::Result<()> {
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {bar:30} {pos}/{len} {msg} ({elapsed})")
            .context("progress template")?,
    );
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    // A line per model as it finishes (dbt prints one per node): stderr, above the bar.
    let bar = pb.clone();
    let opts = silt::pipeline::RunOptions {
        select: args.select,
        full_refresh: args.full_refresh,
        ingest,
        no_models: false,
        on_model: Some(Box::new(move |m, i, of| {
            let line = model_line(i, of, m);
            bar.suspend(|| eprintln!("{line}"));
        })),
    };
    let report = silt::pipeline::run(silt, opts, Some(pb.clone())).await;
    pb.finish_and_clear();
    let report = report?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        if let Some(r) = &report.ingest {
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            for s in &r.sources {
                for w in &s.warnings {
                    eprintln!("warning: {}: {w}", s.source);
                }
            }
            let (files, rows, q) = r.sources.iter().fold((0, 0, 0), |a, s| {
                (a.0 + s.files_ingested, a.1 + s.rows, a.2 + s.quarantined)
            });
            println!("ingest: {files} new file(s), {rows} row(s) to bronze, {q} to quarantine");
        }
        let rows = report
            .models
            .iter()
            .map(|m| {
                vec![
                    m.table.clone(),
                    m.status.clone(),
                    m.mode.clone(),
                    m.rows_inserted.to_string(),
                    m.rows_updated.to_string(),
                    m.rows_deleted.to_string(),
                    m.rows_copied.to_string(),
                    format!("{}/{}", m.files_scanned, m.files_scanned + m.files_skipped),
                    m.files_added.to_string(),
                    m.files_removed.to_string(),
                    m.bytes_added.to_string(),
                    m.ms.to_string(),
                ]
            })
            .collect();
        write_stdout(&simple_table(
            &[
                "model", "status", "mode", "inserted", "updated", "deleted", "copied", "scanned",
                "files+", "files-", "bytes+", "ms",
            ],
            rows,
        ))?;
        println!("run {} in {} ms", report.run_id, report.elapsed_ms);
        if let Some(i) = &report.ingest {
            for a in i.sources.iter().flat_map(|s| s.anomalies.iter()) {
                eprintln!(
                    "anomaly ({}): {}: {}{}: {}",
                    a.status,
                    a.source,
                    a.check,
                    a.column
                        .as_ref()
                        .map(|c| format!(" on {c}"))
                        .unwrap_or_default(),
                    a.message
                );
            }
        }
    }
    for m in &report.models {
        for w in &m.warnings {
            eprintln!("warning: {}: {w}", m.model);
        }
    }
    print_tests(&report, json)?;
    for (name, e) in &report.errors {
        print_error(name, e);
    }
    let code = report.exit_code();
    if code != 0 {
        return Err(ExitWith(code as u8).into());
    }
    export_after(silt, json).await
}

/// `  3/8 silver.stg_fees  incremental  built: +1204 ~0 -0 row(s) in 0.21 s`.
fn model_line(i: u64, of: usize, m: &silt::materialize::ModelMetrics) -> String {
    let what = match m.status.as_str() {
        "built" => format!(
            "built: +{} ~{} -{} row(s)",
            m.rows_inserted, m.rows_updated, m.rows_deleted
        ),
        "up_to_date" => "up to date".to_string(),
        "failed" => "FAILED".to_string(),
        "skipped" => format!("skipped ({})", m.message.clone().unwrap_or_default()),
        other => other.to_string(),
    };
    format!(
        "{i:>3}/{of} {:<34} {:<11} {what} in {:.2} s",
        m.table,
        m.mode,
        m.ms as f64 / 1000.0
    )
}

/// `[bigquery] export_after_run`: publish what changed once a run or an erasure succeeded.
async fn export_after(silt: &Silt, json: bool) -> anyhow::Result<()> {
    if silt
        .project
        .file
        .bigquery
        .as_ref()
        .is_some_and(|b| b.export_after_run)
    {
        if json {
            silt::export::bigquery(silt, &[]).await?;
        } else {
            export(silt, &[], false).await?;
        }
    }
    Ok(())
}

/// The key `silt diff` uses by default: a model's unique_key, a source's primary_key.
async fn export(silt: &Silt, select: &[String], json: bool) -> anyhow::Result<()> {
    let r = silt::export::bigquery(silt, select).await?;
    if json {
        write_stdout(&format!("{}\n", serde_json::to_string_pretty(&r)?))?;
        return Ok(());
    }
    let rows = r
        .tables
        .iter()
        .map(|t| {
            vec![
                t.model.clone(),
                t.target.clone(),
                t.mode.clone(),
                format!(
                    "{}→{}",
                    t.from_version
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "-".into()),
                    t.version
                ),
                t.partitions.join(","),
                t.rows_sent.to_string(),
                t.bytes_sent.to_string(),
                t.jobs.join(","),
                t.ms.to_string(),
            ]
        })
        .collect();
    write_stdout(&simple_table(
        &[
            "model",
            "target",
            "mode",
            "versions",
            "partitions",
            "rows",
            "bytes",
            "jobs",
            "ms",
        ],
        rows,
    ))?;
    println!("exported in {} ms", r.elapsed_ms);
    Ok(())
}

fn default_key(silt: &Silt, t: &silt::catalog::TableRef) -> Vec<String> {
    use silt::catalog::Layer;
    match t.layer {
        Layer::Bronze => silt
            .project
            .sources
            .get(&t.name)
            .map(|s| s.primary_key.clone())
            .unwrap_or_default(),
        Layer::Silver | Layer::Gold => silt::models::Dag::load(&silt.project)
            .ok()
            .and_then(|d| {
                d.models.get(&t.name).map(|m| {
                    let mut k = m.config.unique_key.clone();
                    // An SCD2 history holds several rows per key: one per valid_from.
                    if m.config.materialized == silt::models::Materialized::Snapshot {
                        k.push("valid_from".into());
                    }
                    k
                })
            })
            .unwrap_or_default(),
        _ => vec![],
    }
}

/// Test results: a line per test on stdout, failing rows of failures on stderr.
fn print_tests(report: &silt::pipeline::RunReport, json: bool) -> anyhow::Result<()> {
    if report.tests.is_empty() {
        return Ok(());
    }
    if !json {
        let rows = report
            .tests
            .iter()
            .map(|t| {
                vec![
                    t.name.clone(),
                    t.subject.clone(),
                    t.status.to_uppercase(),
                    t.failing_rows.to_string(),
                    t.ms.to_string(),
                ]
            })
            .collect();
        write_stdout(&simple_table(
            &["test", "on", "status", "failing rows", "ms"],
            rows,
        ))?;
    }
    for t in report.tests.iter().filter(|t| t.status != "pass") {
        eprintln!(
            "{} {} on {}: {} failing row(s); the first:\n{}",
            t.status.to_uppercase(),
            t.name,
            t.subject,
            t.failing_rows,
            t.sample
        );
    }
    Ok(())
}

fn write_stdout(s: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// One error of a report (a model, a test), with what to change when the text says it.
fn print_error(name: &str, e: &Error) {
    eprintln!("error: {name}: {e}");
    if let Some(h) = silt::error::memory_hint(&e.to_string()) {
        eprintln!("  {h}");
    }
}
