//! Alerts (`[notify]` in silt.toml): the events a command raised (a failed run, failed or
//! warning tests, a freshness breach, a completed erasure) as JSON summaries, POSTed to a
//! webhook (its `text` is what Slack shows) and/or given to a command on stdin. A notification
//! that fails is reported back as a warning: it must never fail the command that raised it.
//! It must not carry subject ids or PII values (an erasure's summary counts, never names).

use std::io::Write;
use std::time::Duration;

use serde::Serialize;

use crate::build::pipeline::RunReport;
use crate::build::quality::TestStatus;
use crate::lake::Silt;
use crate::ops::erasure::ForgetReport;
use crate::ops::freshness::{Freshness, FreshnessStatus};

/// One event: what `[notify] on` names it, a line for people and the details for machines.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub event: String,
    pub text: String,
    pub details: serde_json::Value,
}

/// The events of a finished run or build or test: failed tests, warning tests, and failed
/// models (as a failed run).
pub fn run_events(command: &str, r: &RunReport) -> Vec<Event> {
    let mut out = Vec::new();
    let failed: Vec<&crate::build::materialize::ModelMetrics> = r
        .models
        .iter()
        .filter(|m| m.status == crate::lake::meta::runs::ModelStatus::Failed)
        .collect();
    if !failed.is_empty() || !r.errors.is_empty() {
        out.push(Event {
            event: "run_failed".into(),
            text: format!(
                "silt {command} {}: {} model(s) failed{}",
                r.run_id,
                failed.len(),
                failed
                    .iter()
                    .map(|m| format!(" {}: {}", m.table, m.message.clone().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(";")
            ),
            details: serde_json::json!({
                "run_id": r.run_id,
                "failed_models": failed.iter().map(|m| &m.table).collect::<Vec<_>>(),
                "errors": r.errors.iter().map(|(m, e)| format!("{m}: {e}")).collect::<Vec<_>>(),
            }),
        });
    }
    for (status, event, word) in [
        (TestStatus::Fail, "test_failed", "failed"),
        (TestStatus::Warn, "test_warned", "warned"),
    ] {
        let tests: Vec<_> = r.tests.iter().filter(|t| t.status == status).collect();
        if tests.is_empty() {
            continue;
        }
        out.push(Event {
            event: event.into(),
            text: format!(
                "silt {command} {}: {} test(s) {word}: {}",
                r.run_id,
                tests.len(),
                tests
                    .iter()
                    .map(|t| format!("{} ({} rows)", t.name, t.failing_rows))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            details: serde_json::json!({
                "run_id": r.run_id,
                "tests": tests.iter().map(|t| serde_json::json!({
                    "name": t.name, "subject": t.subject, "failing_rows": t.failing_rows,
                })).collect::<Vec<_>>(),
            }),
        });
    }
    out
}

/// A command that stopped with an error (a run that could not start or finish).
pub fn failure_event(command: &str, error: &str) -> Event {
    Event {
        event: "run_failed".into(),
        text: format!("silt {command} failed: {error}"),
        details: serde_json::json!({ "command": command, "error": error }),
    }
}

/// Sources past a freshness threshold.
pub fn freshness_events(rows: &[Freshness]) -> Vec<Event> {
    let late: Vec<&Freshness> = rows
        .iter()
        .filter(|r| matches!(r.status, FreshnessStatus::Warn | FreshnessStatus::Error))
        .collect();
    if late.is_empty() {
        return Vec::new();
    }
    vec![Event {
        event: "freshness".into(),
        text: format!(
            "silt freshness: {} source(s) late: {}",
            late.len(),
            late.iter()
                .map(|r| format!(
                    "{} ({:?}, {} old)",
                    r.source,
                    r.status,
                    r.age.clone().unwrap_or_else(|| "no data".into())
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        details: serde_json::to_value(&late).unwrap_or_default(),
    }]
}

/// A completed erasure: its request id and counts, never a subject.
pub fn erasure_event(env: &str, r: &ForgetReport) -> Event {
    Event {
        event: "erasure".into(),
        text: format!(
            "silt forget {} ({env}): {} subject(s), {} row(s) deleted, {} file(s) purged",
            r.request_id,
            r.subjects.len(),
            r.rows_deleted,
            r.files_purged
        ),
        details: serde_json::json!({
            "request_id": r.request_id,
            "env": env,
            "subjects": r.subjects.len(),
            "rows_deleted": r.rows_deleted,
            "files_purged": r.files_purged,
            "steps": r.steps.len(),
        }),
    }
}

/// Send each event `[notify] on` asks for, to the webhook and the command. Returns what
/// failed, one line each, for the caller to log; nothing here fails.
pub async fn send(silt: &Silt, events: &[Event]) -> Vec<String> {
    let n = &silt.project.file.notify;
    let mut problems = Vec::new();
    if n.webhook.is_none() && n.command.is_none() {
        return problems;
    }
    let timeout = Duration::from_secs(n.timeout_secs.max(1));
    for e in events.iter().filter(|e| n.on.contains(&e.event)) {
        let body = serde_json::json!({
            "text": e.text,
            "event": e.event,
            "project": silt.project.file.project.name,
            "env": silt.env.as_deref().unwrap_or(crate::lake::env::PROD),
            "at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "details": e.details,
        });
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        if let Some(url) = &n.webhook
            && let Err(m) = post(url, bytes.clone(), timeout).await
        {
            problems.push(format!("notify {}: webhook {url}: {m}", e.event));
        }
        if let Some(cmd) = &n.command {
            let (cmd, event, data) = (cmd.clone(), e.event.clone(), bytes.clone());
            let r = tokio::task::spawn_blocking(move || command(&cmd, &event, &data, timeout))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            if let Err(m) = r {
                problems.push(format!("notify {}: command: {m}", e.event));
            }
        }
    }
    for p in &problems {
        tracing::warn!("{p}");
    }
    problems
}

async fn post(url: &str, body: Vec<u8>, timeout: Duration) -> std::result::Result<(), String> {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| e.to_string())?;
    let r = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("answered {}", r.status()));
    }
    Ok(())
}

/// Run `cmd` with `sh -c`, the summary on stdin and `SILT_EVENT` set; killed after `timeout`.
fn command(
    cmd: &str,
    event: &str,
    data: &[u8],
    timeout: Duration,
) -> std::result::Result<(), String> {
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("SILT_EVENT", event)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        // Its own process group: a timeout stops the command and whatever it started.
        .process_group(0)
        .spawn()
        .map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        // Written aside: a command that does not read its stdin neither blocks this nor fails.
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
    }
    let started = std::time::Instant::now();
    loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(s) if s.success() => return Ok(()),
            Some(s) => return Err(format!("exited with {s}")),
            None if started.elapsed() > timeout => {
                // SAFETY: signals the process group this function started (its id is the
                // child's pid); no memory is touched.
                unsafe {
                    libc::kill(-(child.id() as i32), libc::SIGKILL);
                }
                let _ = child.wait();
                return Err(format!("did not finish within {} s", timeout.as_secs()));
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
