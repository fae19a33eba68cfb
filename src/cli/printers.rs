//! How each report of the library reads on stdout: one [`Render`] per report, as a table for
//! people or as JSON for machines. Warnings and failures for people go to stderr from here too
//! (`warn_*`, `print_*`). It must not call the library nor decide exit codes.

use std::io::Write;

use serde::Serialize;
use silt::Error;
use silt::build::materialize::{ModelMetrics, ModelStatus};
use silt::build::pipeline::RunReport;
use silt::build::quality::TestStatus;
use silt::ingest::{IngestReport, anomalies::Anomaly};
use silt::lake::time_travel::{Diff, HistoryEntry};
use silt::ops::erasure::{ForgetReport, VerifyReport};
use silt::ops::export::ExportReport;
use silt::ops::freshness::Freshness;
use silt::ops::maintenance::{OptimizeReport, VacuumReport};
use silt::ops::profile::ColumnProfile;
use silt::render::simple_table;

/// A report that prints as a table (or lines) for people and as JSON for machines.
pub trait Render: Serialize {
    /// The report as a person reads it on stdout, ending in a newline.
    fn text(&self) -> String;
}

/// Print `report` on stdout: pretty JSON with `--json`, its text otherwise.
pub fn emit<R: Render + ?Sized>(report: &R, json: bool) -> anyhow::Result<()> {
    if json {
        write_stdout(&format!("{}\n", serde_json::to_string_pretty(report)?))
    } else {
        write_stdout(&report.text())
    }
}

/// Write to stdout; a reader that went away (`silt … | head`) is not an error.
pub fn write_stdout(s: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

fn or_dash(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".into())
}

impl Render for IngestReport {
    fn text(&self) -> String {
        let rows = self
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
                    or_dash(s.bronze_version.map(|v| v.to_string())),
                ]
            })
            .collect();
        let header = [
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
        ];
        format!(
            "{}batch {} in {} ms\n",
            simple_table(&header, rows),
            self.batch_id,
            self.elapsed_ms
        )
    }
}

/// An ingest's warnings, on stderr.
pub fn warn_ingest(r: &IngestReport) {
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    for s in &r.sources {
        for w in &s.warnings {
            eprintln!("warning: {}: {w}", s.source);
        }
    }
}

/// An ingest's anomalies, on stderr.
pub fn warn_anomalies(r: &IngestReport) {
    for a in r.sources.iter().flat_map(|s| s.anomalies.iter()) {
        eprintln!("{}", anomaly_line(a));
    }
}

fn anomaly_line(a: &Anomaly) -> String {
    format!(
        "anomaly ({}): {}: {}{}: {}",
        a.status,
        a.source,
        a.check,
        a.column
            .as_ref()
            .map(|c| format!(" on {c}"))
            .unwrap_or_default(),
        a.message
    )
}

impl Render for RunReport {
    fn text(&self) -> String {
        let mut out = String::new();
        if let Some(r) = &self.ingest {
            let (files, rows, q) = r.sources.iter().fold((0, 0, 0), |a, s| {
                (a.0 + s.files_ingested, a.1 + s.rows, a.2 + s.quarantined)
            });
            out.push_str(&format!(
                "ingest: {files} new file(s), {rows} row(s) to bronze, {q} to quarantine\n"
            ));
        }
        let rows = self
            .models
            .iter()
            .map(|m| {
                vec![
                    m.table.clone(),
                    m.status.to_string(),
                    m.mode.to_string(),
                    m.counts.rows_inserted.to_string(),
                    m.counts.rows_updated.to_string(),
                    m.counts.rows_deleted.to_string(),
                    m.counts.rows_copied.to_string(),
                    format!(
                        "{}/{}",
                        m.counts.files_scanned,
                        m.counts.files_scanned + m.counts.files_skipped
                    ),
                    m.counts.files_added.to_string(),
                    m.counts.files_removed.to_string(),
                    m.counts.bytes_added.to_string(),
                    m.ms.to_string(),
                ]
            })
            .collect();
        out.push_str(&simple_table(
            &[
                "model", "status", "mode", "inserted", "updated", "deleted", "copied", "scanned",
                "files+", "files-", "bytes+", "ms",
            ],
            rows,
        ));
        out.push_str(&format!("run {} in {} ms\n", self.run_id, self.elapsed_ms));
        out
    }
}

/// `  3/8 silver.stg_fees  incremental  built: +1204 ~0 -0 row(s) in 0.21 s`.
pub fn model_line(i: u64, of: usize, m: &ModelMetrics) -> String {
    let what = match m.status {
        ModelStatus::Built => format!(
            "built: +{} ~{} -{} row(s)",
            m.counts.rows_inserted, m.counts.rows_updated, m.counts.rows_deleted
        ),
        ModelStatus::UpToDate => "up to date".to_string(),
        ModelStatus::Failed => "FAILED".to_string(),
        ModelStatus::Skipped => format!("skipped ({})", m.message.clone().unwrap_or_default()),
    };
    format!(
        "{i:>3}/{of} {:<34} {:<11} {what} in {:.2} s",
        m.table,
        m.mode,
        m.ms as f64 / 1000.0
    )
}

/// Test results: a table of every test on stdout (people only), the failures with their
/// first failing rows on stderr.
pub fn print_tests(report: &RunReport, json: bool) -> anyhow::Result<()> {
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
                    t.status.to_string().to_uppercase(),
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
    for t in report.tests.iter().filter(|t| t.status != TestStatus::Pass) {
        eprintln!(
            "{} {} on {}: {} failing row(s); the first:\n{}",
            t.status.to_string().to_uppercase(),
            t.name,
            t.subject,
            t.failing_rows,
            t.sample
        );
    }
    Ok(())
}

/// The warnings of a run's models and its errors, on stderr.
pub fn warn_models(report: &RunReport) {
    for m in &report.models {
        for w in &m.warnings {
            eprintln!("warning: {}: {w}", m.model);
        }
    }
}

/// The errors of a report (a model, a test), each with what to change when the text says it.
pub fn print_errors(errors: &[(String, Error)]) {
    for (name, e) in errors {
        eprintln!("error: {name}: {e}");
        if let Some(h) = e.hint() {
            eprintln!("  {h}");
        }
    }
}

/// One cycle of `silt watch`, on stderr (and its report as one JSON line with `--json`).
pub fn watch_cycle(changed: usize, r: &RunReport, json: bool) {
    let built: Vec<String> = r
        .models
        .iter()
        .filter(|m| m.status == ModelStatus::Built)
        .map(|m| format!("{} ({})", m.table, m.mode))
        .collect();
    let (files, rows) = r
        .ingest
        .as_ref()
        .map(|i| {
            i.sources
                .iter()
                .fold((0, 0), |a, s| (a.0 + s.files_ingested, a.1 + s.rows))
        })
        .unwrap_or((0, 0));
    if json {
        let _ = write_stdout(&format!(
            "{}\n",
            serde_json::to_string(r).unwrap_or_default()
        ));
    }
    eprintln!(
        "silt: {changed} change(s): ingested {files} file(s), {rows} row(s); built {} model(s){}{} in {} ms",
        built.len(),
        if built.is_empty() { "" } else { ": " },
        built.join(", "),
        r.elapsed_ms
    );
    warn_models(r);
    for t in r.tests.iter().filter(|t| t.status != TestStatus::Pass) {
        eprintln!(
            "{} {} on {}: {} failing row(s)",
            t.status.to_string().to_uppercase(),
            t.name,
            t.subject,
            t.failing_rows
        );
    }
    print_errors(&r.errors);
}

impl Render for [Freshness] {
    fn text(&self) -> String {
        if self.is_empty() {
            return "no source declares [freshness], so there is nothing to check. Add it to a source's \
                    sql/bronze/<source>.toml, e.g.:\n\n[freshness]\ncolumn = \"<date or timestamp column>\"  \
                    # omit to measure when the newest landing file arrived\nwarn_after = \"2 days\"\nerror_after = \"7 days\"\n"
                .to_string();
        }
        let rows = self
            .iter()
            .map(|r| {
                vec![
                    r.source.clone(),
                    r.measured.clone(),
                    or_dash(r.latest.clone()),
                    or_dash(r.age.clone()),
                    or_dash(r.warn_after.clone()),
                    or_dash(r.error_after.clone()),
                    r.status.to_string(),
                ]
            })
            .collect();
        simple_table(
            &[
                "source",
                "measured",
                "latest",
                "age",
                "warn after",
                "error after",
                "status",
            ],
            rows,
        )
    }
}

impl Render for [ColumnProfile] {
    fn text(&self) -> String {
        let rows = self
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
        simple_table(
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
        )
    }
}

impl Render for [HistoryEntry] {
    fn text(&self) -> String {
        let rows = self
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
        simple_table(
            &[
                "version",
                "time",
                "operation",
                "silt",
                "run / batch",
                "metrics",
            ],
            rows,
        )
    }
}

impl Render for OptimizeReport {
    fn text(&self) -> String {
        format!(
            "{}: {} file(s) compacted into {} in {} partition(s); version {}\n",
            self.table,
            self.files_removed,
            self.files_added,
            self.partitions_optimized,
            self.version.map(|v| v.to_string()).unwrap_or_default()
        )
    }
}

impl Render for [VacuumReport] {
    fn text(&self) -> String {
        let mut out = String::new();
        for r in self {
            let verb = if r.dry_run {
                "would be deleted"
            } else {
                "deleted"
            };
            out.push_str(&format!(
                "{}: {} file(s) {verb}{}\n",
                r.table,
                r.files_deleted.len(),
                if r.kept_for_envs.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", {} kept (live environments reference them)",
                        r.kept_for_envs.len()
                    )
                }
            ));
            if r.dry_run {
                for f in &r.files_deleted {
                    out.push_str(&format!("  {f}\n"));
                }
            }
        }
        out
    }
}

impl Render for VerifyReport {
    fn text(&self) -> String {
        let mut out = String::new();
        if !self.findings.is_empty() {
            let rows = self
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
            out.push_str(&simple_table(&["location", "found", "column"], rows));
        }
        out.push_str(&format!(
            "scanned {} object(s) ({} Parquet file(s) decoded): {} finding(s)\n",
            self.objects_scanned,
            self.parquet_files,
            self.findings.len()
        ));
        out
    }
}

impl Render for ForgetReport {
    fn text(&self) -> String {
        let rows = self
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
                    s.action.to_string(),
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
        let mut out = simple_table(
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
        );
        out.push_str(&format!(
            "erasure request {}{}: {} row(s) deleted, {} file(s) purged in {} ms\n",
            self.request_id,
            if self.resumed { " (resumed)" } else { "" },
            self.rows_deleted,
            self.files_purged,
            self.elapsed_ms
        ));
        if !self.matched {
            out.push_str(
                "no record of any table or landing file belongs to the given id(s) (matched by subject key, never as text): nothing was changed; the request is audited as a no-op\n",
            );
        }
        out
    }
}

/// A diff with the table and versions it compares (its JSON is the diff's alone).
pub struct DiffView<'a> {
    pub table: String,
    /// What the sides are: "version 3", "prod".
    pub from: String,
    pub to: String,
    pub diff: &'a Diff,
}

impl Serialize for DiffView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.diff.serialize(s)
    }
}

impl Render for DiffView<'_> {
    fn text(&self) -> String {
        let d = self.diff;
        let mut out = format!(
            "{}: {} → {}: {} added, {} removed, {} changed (key: {}); rows {} → {}\n",
            self.table,
            self.from,
            self.to,
            d.added.len(),
            d.removed.len(),
            d.changed.len(),
            if d.key.is_empty() {
                "whole row".into()
            } else {
                d.key.join(", ")
            },
            d.rows_before,
            d.rows_after,
        );
        for c in &d.summary {
            let sums = c.sum_before != c.sum_after;
            if sums || c.nulls_before != c.nulls_after {
                let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v}"));
                out.push_str(&format!(
                    "  {}: sum {} → {}, nulls {} → {}\n",
                    c.column,
                    fmt(c.sum_before),
                    fmt(c.sum_after),
                    c.nulls_before,
                    c.nulls_after
                ));
            }
        }
        for r in &d.added {
            out.push_str(&format!("+ {}\n", serde_json::Value::Object(r.clone())));
        }
        for r in &d.removed {
            out.push_str(&format!("- {}\n", serde_json::Value::Object(r.clone())));
        }
        for (a, b) in &d.changed {
            let fields: Vec<String> = b
                .iter()
                .filter(|(k, v)| a.get(*k) != Some(*v))
                .map(|(k, v)| format!("{k}: {} → {v}", a.get(k).cloned().unwrap_or_default()))
                .collect();
            let k: Vec<String> = d
                .key
                .iter()
                .map(|c| format!("{c}={}", b.get(c).cloned().unwrap_or_default()))
                .collect();
            out.push_str(&format!("~ {} {}\n", k.join(" "), fields.join(", ")));
        }
        out
    }
}

impl Render for [silt::lake::catalog::TableInfo] {
    fn text(&self) -> String {
        let rows = self
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
        simple_table(
            &["table", "version", "rows", "files", "bytes", "partition_by"],
            rows,
        )
    }
}

/// What `silt source new NAME` wrote (its JSON is the report's alone).
pub struct SourceNewView<'a> {
    pub name: String,
    pub report: &'a silt::ops::scaffold::SourceNewReport,
}

impl Serialize for SourceNewView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.report.serialize(s)
    }
}

impl Render for SourceNewView<'_> {
    fn text(&self) -> String {
        let r = self.report;
        let mut out = format!(
            "wrote {} (glob {})\nthe sample parses under it: {} row(s) ok, {} quarantined\n",
            r.path, r.glob, r.rows_ok, r.rows_quarantined
        );
        if let Some(n) = &r.note {
            out.push_str(&format!("note: {n}\n"));
        }
        out.push_str(&format!(
            "review the contract, then run: silt ingest --source {}\n",
            self.name
        ));
        out
    }
}

impl Render for ExportReport {
    fn text(&self) -> String {
        let rows = self
            .tables
            .iter()
            .map(|t| {
                vec![
                    t.model.clone(),
                    t.target.clone(),
                    t.mode.to_string(),
                    format!(
                        "{}→{}",
                        or_dash(t.from_version.map(|v| v.to_string())),
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
        let mut out = simple_table(
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
        );
        out.push_str(&format!("exported in {} ms\n", self.elapsed_ms));
        out
    }
}

impl Render for silt::ops::env::CreateReport {
    fn text(&self) -> String {
        format!(
            "created environment {} from {} at {}: {} tables cloned, {} data files ({} bytes) referenced, {} copied ({} ms)\n",
            self.env,
            self.from,
            self.root,
            self.tables.len(),
            self.files_referenced,
            self.bytes_referenced,
            self.files_copied,
            self.elapsed_ms
        )
    }
}

impl Render for [silt::ops::env::EnvSummary] {
    fn text(&self) -> String {
        if self.is_empty() {
            return "no environments (create one with `silt env create NAME`)\n".into();
        }
        let rows = self
            .iter()
            .map(|e| {
                vec![
                    e.name.clone(),
                    e.from.clone(),
                    e.created_at.clone(),
                    e.tables.to_string(),
                    if e.changed.is_empty() {
                        "-".into()
                    } else {
                        e.changed.join(", ")
                    },
                ]
            })
            .collect::<Vec<_>>();
        simple_table(&["env", "from", "created", "tables", "changed"], rows)
    }
}

impl Render for silt::ops::env::DropReport {
    fn text(&self) -> String {
        format!(
            "dropped environment {}: {} objects ({} bytes) deleted\n",
            self.env, self.objects_deleted, self.bytes_deleted
        )
    }
}

impl Render for silt::ops::env::PromoteReport {
    fn text(&self) -> String {
        let mut out = format!(
            "{} {} → {}: {} table(s)\n",
            if self.dry_run {
                "would promote"
            } else {
                "promoted"
            },
            self.env,
            self.to,
            self.tables.len()
        );
        for t in &self.tables {
            out.push_str(&format!(
                "  {}: {} → {} ({} files copied, {} bytes; {} referenced)\n",
                t.table,
                t.target_version
                    .map_or("new".to_string(), |v| format!("version {v}")),
                t.new_version
                    .map_or(format!("env version {}", t.env_version), |v| format!(
                        "version {v}"
                    )),
                t.files_copied,
                t.bytes_copied,
                t.files_referenced
            ));
        }
        let not: Vec<&String> = self
            .not_promoted
            .iter()
            .filter(|t| !t.starts_with("_silt."))
            .collect();
        if !not.is_empty() {
            out.push_str(&format!(
                "  not promoted (the environment's own data): {}\n",
                not.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        out
    }
}

impl Render for silt::ops::env::LocalizeReport {
    fn text(&self) -> String {
        let mut out = format!(
            "environment {}: {} file(s) copied in\n",
            self.env, self.files_copied
        );
        for (t, n) in self.tables.iter().filter(|(_, n)| *n > 0) {
            out.push_str(&format!("  {t}: {n}\n"));
        }
        out
    }
}
