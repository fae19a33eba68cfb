//! Project configuration: `silt.toml` and the per-source contracts in `sql/bronze/*.toml`,
//! with `SILT_*` environment overrides. It reads only project files (std::fs is fine here);
//! it must not touch lake or landing data, and it must not build object stores (storage.rs does).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use url::Url;

use crate::error::{Error, Result};
use crate::project::contract::{Column, ColumnType};

pub const PROJECT_FILE: &str = "silt.toml";

/// `silt.toml`.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ProjectFile {
    #[serde(default)]
    pub project: ProjectSection,
    #[serde(default)]
    pub lake: RootSection,
    #[serde(default)]
    pub landing: RootSection,
    #[serde(default)]
    pub ingest: IngestSection,
    #[serde(default)]
    pub gcs: GcsSection,
    #[serde(default)]
    pub gdpr: GdprSection,
    #[serde(default)]
    pub engine: EngineSection,
    /// BigQuery export target (`silt export bigquery`).
    #[serde(default)]
    pub bigquery: Option<BigQuerySection>,
    /// Values for `{{ var('name') }}` in models.
    #[serde(default)]
    pub vars: BTreeMap<String, toml::Value>,
    /// Where environments (`silt env create`, `--env`) live.
    #[serde(default)]
    pub environments: RootSection,
    /// Alerts: failed runs, failed or warning tests, freshness breaches, completed erasures.
    #[serde(default)]
    pub notify: NotifySection,
}

/// `[notify]`: where alerts go. Each event POSTs a JSON summary to `webhook` (its `text` is
/// what Slack shows) and/or runs `command` with the summary on stdin. A notification that
/// fails is logged and never fails the command that raised it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySection {
    pub webhook: Option<String>,
    /// A shell command (`sh -c`); the summary's JSON on its stdin, `SILT_EVENT` set.
    pub command: Option<String>,
    /// Events to send: run_failed, test_failed, test_warned, freshness, erasure (default: all).
    #[serde(default = "all_events")]
    pub on: Vec<String>,
    /// Seconds a webhook call or command may take.
    #[serde(default = "default_notify_timeout")]
    pub timeout_secs: u64,
}

impl Default for NotifySection {
    fn default() -> Self {
        NotifySection {
            webhook: None,
            command: None,
            on: all_events(),
            timeout_secs: default_notify_timeout(),
        }
    }
}

/// Every event `[notify]` knows.
pub const NOTIFY_EVENTS: [&str; 5] = [
    "run_failed",
    "test_failed",
    "test_warned",
    "freshness",
    "erasure",
];

fn all_events() -> Vec<String> {
    NOTIFY_EVENTS.iter().map(|e| e.to_string()).collect()
}

fn default_notify_timeout() -> u64 {
    10
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ProjectSection {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RootSection {
    /// A URL (`file:///…`, `gs://bucket/prefix`) or a path relative to the project directory.
    pub root: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSection {
    /// Landing files committed together in one Delta commit per table.
    #[serde(default = "default_batch_files")]
    pub batch_files: usize,
    /// Upper bound on landing bytes committed together in one commit.
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: u64,
    /// Landing bytes kept in memory between hashing and parsing; beyond it files are read
    /// again when parsed. Ingest's memory does not grow with the data beyond this.
    #[serde(default = "default_memory_bytes")]
    pub memory_bytes: u64,
    /// Target size of the Parquet files written to bronze.
    #[serde(default = "default_target_file_size")]
    pub target_file_size: u64,
}

impl Default for IngestSection {
    fn default() -> Self {
        IngestSection {
            batch_files: default_batch_files(),
            batch_bytes: default_batch_bytes(),
            memory_bytes: default_memory_bytes(),
            target_file_size: default_target_file_size(),
        }
    }
}

fn default_batch_files() -> usize {
    256
}
fn default_batch_bytes() -> u64 {
    512 * 1024 * 1024
}
fn default_memory_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_target_file_size() -> u64 {
    128 * 1024 * 1024
}

/// Google Cloud Storage credentials; only read when a root is `gs://`.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GcsSection {
    /// Path to a service-account JSON key. GOOGLE_APPLICATION_CREDENTIALS wins over it.
    pub service_account_key: Option<String>,
    /// Seconds before one GCS request is abandoned and retried (default 60).
    pub timeout_secs: Option<u64>,
}

/// Where `silt export bigquery` publishes gold tables.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BigQuerySection {
    pub project: String,
    pub dataset: String,
    /// Dataset location when silt creates it (e.g. `EU`).
    pub location: Option<String>,
    /// API root, e.g. `http://127.0.0.1:9050` for an emulator (default: the real API).
    pub endpoint: Option<String>,
    /// A service-account JSON key; else GOOGLE_APPLICATION_CREDENTIALS, else ADC. An emulator on
    /// loopback needs none.
    pub credentials: Option<String>,
    /// Model name → BigQuery table name (default: the model name).
    #[serde(default)]
    pub tables: BTreeMap<String, String>,
    /// Models to export (default: every gold model).
    #[serde(default)]
    pub models: Vec<String>,
    /// Export at the end of `silt run` and `silt forget`.
    #[serde(default)]
    pub export_after_run: bool,
}

/// DataFusion session settings for every query and model build.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSection {
    /// Memory that sorts, aggregates and joins may hold before they spill to disk (MiB); left
    /// out, a sixteenth of the machine's memory ([`EngineSection::memory_limit_bytes`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_mb: Option<u64>,
    /// Parallel partitions per query; 0 = one per core.
    #[serde(default)]
    pub target_partitions: usize,
    /// Rows per Arrow batch inside the engine.
    #[serde(default = "default_engine_batch_size")]
    pub batch_size: usize,
    /// A Ballista scheduler (`df://host:port`) that runs model builds, tests and queries;
    /// left out, everything runs in this process. `SILT_CLUSTER` or `--cluster` set it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Models built side by side when none reads another (as dbt's `threads`); 0 = one for
    /// every two cores, at most four ([`EngineSection::model_threads`]).
    #[serde(default)]
    pub threads: usize,
}

impl Default for EngineSection {
    fn default() -> Self {
        EngineSection {
            memory_limit_mb: None,
            target_partitions: 0,
            batch_size: default_engine_batch_size(),
            cluster: None,
            threads: 0,
        }
    }
}

/// The smallest and largest pools silt sizes by itself.
const MIN_POOL: u64 = 256 << 20;
const MAX_POOL: u64 = 4 << 30;

impl EngineSection {
    /// How many independent models a run builds at once: `threads` when set, else one for
    /// every two cores, at most four. Each build already runs its query on every core
    /// (`target_partitions`); builds side by side fill what one leaves idle (its commits and
    /// listings, the tail of its writes), which on two cores measured as nothing (the
    /// line-item gold stage 3.7–3.9 s either way) for 20% more memory. They share one memory
    /// pool, so more of them do not raise its bound.
    pub fn model_threads(&self) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        (std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            / 2)
        .clamp(1, 4)
    }

    /// The engine's memory pool in bytes: `memory_limit_mb` when set, else a sixteenth of the
    /// memory this process may use (the machine's, or a container's cgroup limit when lower),
    /// between 256 MiB and 4 GiB. A sixteenth: what the pool does not count (scan buffers,
    /// delta-rs's writers outside the bounded partitioned write, the allocator's slack) comes
    /// on top, and the pool is what keeps a build's memory from growing with the data. The
    /// line-item silver build at 24 M rows peaked at 2.2 GB with a quarter of 24 GiB, at
    /// 1.2 GB with a sixteenth (1.5 GiB), equally fast; with 768 MiB it took 16% longer.
    pub fn memory_limit_bytes(&self) -> usize {
        if let Some(mb) = self.memory_limit_mb {
            return (mb.max(16) << 20) as usize;
        }
        match usable_memory() {
            Some(total) => (total / 16).clamp(MIN_POOL, MAX_POOL) as usize,
            None => MIN_POOL as usize,
        }
    }
}

/// Bytes of memory this process may use: physical memory, capped by a cgroup limit.
pub fn usable_memory() -> Option<u64> {
    // SAFETY: sysconf only reads system constants.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let physical = (pages > 0 && size > 0).then(|| pages as u64 * size as u64)?;
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|f| std::fs::read_to_string(f).ok())
    .filter_map(|t| t.trim().parse::<u64>().ok())
    .min();
    Some(cgroup.map_or(physical, |c| c.min(physical)))
}
fn default_engine_batch_size() -> usize {
    8192
}

/// GDPR erasure and pseudonymization settings.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GdprSection {
    /// Key of the HMAC-SHA256 that stands for a subject id in the erasure audit and for
    /// pseudonymized PII columns. Set it with `SILT_GDPR_HMAC_KEY` rather than in the file.
    pub hmac_key: Option<String>,
}

/// What `silt forget` does with a landing file that holds a subject's records.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ErasurePolicy {
    /// Write the file again without the subject's records (the other records stay byte for byte
    /// in CSV and NDJSON).
    #[default]
    Rewrite,
    /// Delete the whole file from the landing root.
    Remove,
}

/// What to do with a column a file has but the contract does not declare.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnexpectedColumnPolicy {
    /// The whole file is refused with an error naming the column; nothing of it is ingested.
    RejectFile,
    /// The column is dropped (a warning says so).
    Ignore,
    /// Rows carrying a value in the column go to quarantine.
    #[default]
    Quarantine,
}

/// What to do when a file at an already-ingested path has different content.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ChangedFilePolicy {
    /// Ingest it as a new file (its rows are appended), and say so.
    #[default]
    Ingest,
    /// Replace the rows the earlier version of the file produced, atomically.
    Replace,
    /// Leave it, and say so.
    Skip,
    /// Refuse it with an error (exit 2) until the user decides.
    Error,
}

/// What to do with a file whose content equals a file already ingested under another path.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DuplicateFilePolicy {
    #[default]
    Skip,
    Ingest,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Csv,
    /// One JSON object per line.
    Ndjson,
    /// One top-level JSON array of objects.
    JsonArray,
    /// Either of the two JSON forms, told apart by the first byte.
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ParseOptions {
    #[serde(default = "default_delimiter")]
    pub delimiter: char,
    #[serde(default = "default_quote")]
    pub quote: char,
    #[serde(default = "default_true")]
    pub header: bool,
    /// Field values read as NULL (CSV), compared after trimming.
    #[serde(default = "default_null_values")]
    pub null_values: Vec<String>,
    /// chrono formats tried in order for `date` columns.
    #[serde(default = "default_date_formats")]
    pub date_formats: Vec<String>,
    /// chrono formats tried in order for `timestamp` columns (RFC 3339 is always accepted).
    #[serde(default)]
    pub timestamp_formats: Vec<String>,
    /// `utf-8` (invalid bytes quarantine the row) or any WHATWG label such as `windows-1252`.
    #[serde(default = "default_encoding")]
    pub encoding: String,
    /// Trim spaces around unquoted CSV fields. Off by default: fields are kept as they are
    /// (a leading space can be data, as in TPC-H comments).
    #[serde(default)]
    pub trim: bool,
    /// The line breaks one quoted CSV field may span. A quote that runs past them, or to the
    /// end of the file, refuses its record (one line) and reading goes on at the next line,
    /// instead of swallowing the records after it.
    #[serde(default = "default_max_quoted_lines")]
    pub max_quoted_lines: u64,
}

impl Default for ParseOptions {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

fn default_delimiter() -> char {
    ','
}
fn default_quote() -> char {
    '"'
}
fn default_true() -> bool {
    true
}
fn default_null_values() -> Vec<String> {
    vec!["".into(), "NULL".into(), "null".into()]
}
fn default_date_formats() -> Vec<String> {
    vec!["%Y-%m-%d".into()]
}
fn default_max_quoted_lines() -> u64 {
    100
}
fn default_encoding() -> String {
    "utf-8".into()
}

/// `partition_by = "region"` or `partition_by = "fee_date:month"` (a derived `fee_date_month`
/// column, `YYYY-MM`), also `:day` and `:year`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionSpec {
    pub source_column: String,
    pub granularity: Option<Granularity>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Year,
    Month,
    Day,
}

impl PartitionSpec {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let (col, gran) = match s.split_once(':') {
            Some((c, g)) => (c.trim(), Some(g.trim())),
            None => (s.trim(), None),
        };
        let granularity = match gran {
            None => None,
            Some("year") => Some(Granularity::Year),
            Some("month") => Some(Granularity::Month),
            Some("day") => Some(Granularity::Day),
            Some(g) => {
                return Err(format!(
                    "unknown partition granularity '{g}': use year, month or day"
                ));
            }
        };
        if col.is_empty() {
            return Err("partition_by names no column".into());
        }
        Ok(PartitionSpec {
            source_column: col.to_string(),
            granularity,
        })
    }

    /// Name of the Delta partition column.
    pub fn column_name(&self) -> String {
        match self.granularity {
            None => self.source_column.clone(),
            Some(Granularity::Year) => format!("{}_year", self.source_column),
            Some(Granularity::Month) => format!("{}_month", self.source_column),
            Some(Granularity::Day) => format!("{}_day", self.source_column),
        }
    }
}

/// One `sql/bronze/<source>.toml`, as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    #[serde(default)]
    pub description: Option<String>,
    /// Glob relative to the landing root, e.g. `fees/*.csv`.
    pub glob: String,
    pub format: Format,
    #[serde(default)]
    pub primary_key: Vec<String>,
    #[serde(default)]
    pub partition_by: Option<String>,
    #[serde(default)]
    pub subject_key: Option<String>,
    /// How rows without the subject key reach a subject: through a key of another source
    /// (`{ column = "l_orderkey", table = "orders", key = "o_orderkey" }`).
    #[serde(default)]
    pub subject_via: Option<SubjectVia>,
    /// `false` declares that the source holds no data of the subjects, although a column of it
    /// looks like a key that leads to one (silt forget then leaves it alone).
    #[serde(default)]
    pub holds_subjects: Option<bool>,
    #[serde(default)]
    pub pii: Vec<String>,
    #[serde(default)]
    pub on_unexpected_column: UnexpectedColumnPolicy,
    #[serde(default)]
    pub on_changed_file: ChangedFilePolicy,
    #[serde(default)]
    pub on_duplicate_file: DuplicateFilePolicy,
    /// `silt forget`: rewrite the landing files holding a subject, or remove them.
    #[serde(default)]
    pub on_erasure: ErasurePolicy,
    #[serde(default)]
    pub parse: ParseOptions,
    pub columns: Vec<ColumnFile>,
    /// Column tests on bronze.<source> (see quality.rs).
    #[serde(default)]
    pub tests: Vec<TestSpec>,
    #[serde(default)]
    pub freshness: Option<FreshnessSpec>,
    #[serde(default)]
    pub anomaly: Option<AnomalySpec>,
}

/// `subject_via = { column = "l_orderkey", table = "orders", key = "o_orderkey" }`: a row
/// belongs to a subject when its `column` holds the `key` of a row of source `table` that
/// belongs to one (through that source's own subject_key or subject_via).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SubjectVia {
    pub column: String,
    pub table: String,
    pub key: String,
}

impl SubjectVia {
    /// The parent source's name (`orders` or `bronze.orders`).
    pub fn parent(&self) -> &str {
        self.table.strip_prefix("bronze.").unwrap_or(&self.table)
    }
}

/// How much a failing data test matters: `error` stops what reads the tested table (exit 1),
/// `warn` is reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, strum::Display)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Severity {
    #[default]
    Error,
    Warn,
}

/// A column test as declared (on a source in `sql/bronze/*.toml`, on a model in its config);
/// `quality.rs` compiles it to SQL.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TestSpec {
    /// not_null | unique | accepted_values | relationships | expression
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<serde_json::Value>,
    /// relationships: the other model (`clients`) or table (`silver.clients`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// relationships: the column in `to` (default: the same name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expression: Option<String>,
    #[serde(default, rename = "where", skip_serializing_if = "Option::is_none")]
    pub where_: Option<String>,
    #[serde(default)]
    pub severity: Severity,
}

/// How a pseudonymized column is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pseudonym {
    Hash,
    Mask,
}

/// `[freshness]`: how old the newest data of a source may be.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FreshnessSpec {
    /// A date or timestamp column; without it, the arrival time of the newest landing file.
    #[serde(default)]
    pub column: Option<String>,
    /// e.g. "2 days", "12 hours".
    #[serde(default)]
    pub warn_after: Option<String>,
    #[serde(default)]
    pub error_after: Option<String>,
}

/// `[anomaly]`: checks of each ingest batch against the previous ones (computed with polars).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AnomalySpec {
    /// A batch with more than `volume_ratio` × (or less than 1/`volume_ratio` of) the trailing
    /// mean row count is an anomaly.
    #[serde(default = "default_volume_ratio")]
    pub volume_ratio: f64,
    /// …or more than `volume_z` standard deviations away from it.
    #[serde(default = "default_volume_z")]
    pub volume_z: f64,
    /// Previous batches needed before volume and drift checks speak.
    #[serde(default = "default_min_batches")]
    pub min_batches: usize,
    /// How many previous batches make the trailing statistics.
    #[serde(default = "default_window")]
    pub window: usize,
    /// Largest allowed change of a column's null rate (0.2 = 20 points).
    #[serde(default = "default_null_drift")]
    pub null_rate_drift: f64,
    /// Largest allowed ratio between a column's distinct count and its trailing mean.
    #[serde(default = "default_volume_ratio")]
    pub distinct_ratio: f64,
    /// A date column for the gap check: days with no data inside the batch's date range.
    #[serde(default)]
    pub date_column: Option<String>,
    /// warn (report) or error (exit 1, and `silt run` skips the models reading the source).
    #[serde(default = "default_warn")]
    pub severity: Severity,
}

fn default_volume_ratio() -> f64 {
    5.0
}
fn default_volume_z() -> f64 {
    4.0
}
fn default_min_batches() -> usize {
    3
}
fn default_window() -> usize {
    20
}
fn default_null_drift() -> f64 {
    0.2
}
fn default_warn() -> Severity {
    Severity::Warn
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnFile {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
    #[serde(default = "default_true")]
    pub nullable: bool,
    /// Name of the field in the landing file when it differs from `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A validated source: the contract every landing file of it must meet.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    /// Project-relative path of the toml, for messages.
    pub file: String,
    pub description: Option<String>,
    pub glob: globset::GlobMatcher,
    pub glob_text: String,
    pub format: Format,
    pub primary_key: Vec<String>,
    pub partition: Option<PartitionSpec>,
    pub subject_key: Option<String>,
    pub subject_via: Option<SubjectVia>,
    pub holds_subjects: Option<bool>,
    pub pii: Vec<String>,
    pub on_unexpected_column: UnexpectedColumnPolicy,
    pub on_changed_file: ChangedFilePolicy,
    pub on_duplicate_file: DuplicateFilePolicy,
    pub on_erasure: ErasurePolicy,
    pub parse: ParseOptions,
    pub columns: Vec<Column>,
    pub tests: Vec<TestSpec>,
    pub freshness: Option<FreshnessSpec>,
    pub anomaly: Option<AnomalySpec>,
}

impl Source {
    pub fn from_file(name: &str, file: &str, sf: SourceFile) -> Result<Source> {
        let err = |m: String| Error::config(file, m);
        if !is_identifier(name) {
            return Err(err(format!(
                "source name '{name}' must be lower-case letters, digits and '_', starting with a letter"
            )));
        }
        let glob = globset::GlobBuilder::new(&sf.glob)
            .literal_separator(true)
            .build()
            .map_err(|e| err(format!("glob '{}': {e}", sf.glob)))?
            .compile_matcher();
        let mut columns = Vec::with_capacity(sf.columns.len());
        for c in &sf.columns {
            let ty = ColumnType::parse(&c.ty)
                .map_err(|e| err(format!("column '{}': type '{}': {e}", c.name, c.ty)))?;
            if c.name.starts_with('_') {
                return Err(err(format!(
                    "column '{}': names starting with '_' are reserved for silt's metadata columns",
                    c.name
                )));
            }
            if columns.iter().any(|x: &Column| x.name == c.name) {
                return Err(err(format!("column '{}' is declared twice", c.name)));
            }
            columns.push(Column {
                name: c.name.clone(),
                source: c.source.clone().unwrap_or_else(|| c.name.clone()),
                ty,
                nullable: c.nullable,
                description: c.description.clone(),
            });
        }
        if columns.is_empty() {
            return Err(err("the contract declares no columns ([[columns]])".into()));
        }
        let has = |n: &str| columns.iter().any(|c| c.name == n);
        for k in &sf.primary_key {
            if !has(k) {
                return Err(err(format!(
                    "primary_key column '{k}' is not a declared column"
                )));
            }
        }
        for p in &sf.pii {
            if !has(p) {
                return Err(err(format!("pii column '{p}' is not a declared column")));
            }
        }
        if let Some(s) = &sf.subject_key
            && !has(s)
        {
            return Err(err(format!("subject_key '{s}' is not a declared column")));
        }
        if let Some(v) = &sf.subject_via {
            if sf.subject_key.is_some() {
                return Err(err(
                    "subject_key and subject_via exclude each other: a source reaches its subjects one way".into(),
                ));
            }
            if !has(&v.column) {
                return Err(err(format!(
                    "subject_via.column '{}' is not a declared column",
                    v.column
                )));
            }
        }
        if sf.holds_subjects == Some(false)
            && (sf.subject_key.is_some() || sf.subject_via.is_some())
        {
            return Err(err(
                "holds_subjects = false contradicts subject_key / subject_via: remove one".into(),
            ));
        }
        let partition = match &sf.partition_by {
            None => None,
            Some(p) => {
                let spec =
                    PartitionSpec::parse(p).map_err(|e| err(format!("partition_by: {e}")))?;
                let col = columns
                    .iter()
                    .find(|c| c.name == spec.source_column)
                    .ok_or_else(|| {
                        err(format!(
                            "partition_by column '{}' is not a declared column",
                            spec.source_column
                        ))
                    })?;
                if spec.granularity.is_some()
                    && !matches!(col.ty, ColumnType::Date | ColumnType::Timestamp)
                {
                    return Err(err(format!(
                        "partition_by '{p}': a granularity needs a date or timestamp column, '{}' is {}",
                        col.name, col.ty
                    )));
                }
                // Erased values must not survive in partition paths.
                if sf.pii.contains(&spec.source_column)
                    || sf.subject_key.as_deref() == Some(spec.source_column.as_str())
                {
                    return Err(err(format!(
                        "partition_by '{p}': a table must not be partitioned by a PII column or the subject key (erased values would survive in file paths)"
                    )));
                }
                Some(spec)
            }
        };
        if sf.parse.delimiter.len_utf8() != 1 || sf.parse.quote.len_utf8() != 1 {
            return Err(err(
                "parse.delimiter and parse.quote must be single-byte characters".into(),
            ));
        }
        if encoding_rs::Encoding::for_label(sf.parse.encoding.as_bytes()).is_none() {
            return Err(err(format!(
                "parse.encoding '{}' is not a known encoding label",
                sf.parse.encoding
            )));
        }
        Ok(Source {
            name: name.to_string(),
            file: file.to_string(),
            description: sf.description,
            glob,
            glob_text: sf.glob,
            format: sf.format,
            primary_key: sf.primary_key,
            partition,
            subject_key: sf.subject_key,
            subject_via: sf.subject_via,
            holds_subjects: sf.holds_subjects,
            pii: sf.pii,
            on_unexpected_column: sf.on_unexpected_column,
            on_changed_file: sf.on_changed_file,
            on_duplicate_file: sf.on_duplicate_file,
            on_erasure: sf.on_erasure,
            parse: sf.parse,
            columns,
            tests: sf.tests,
            freshness: sf.freshness,
            anomaly: sf.anomaly,
        })
    }
}

pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// A loaded project: resolved roots plus all sources.
#[derive(Debug, Clone)]
pub struct Project {
    pub dir: PathBuf,
    pub file: ProjectFile,
    pub lake_url: Url,
    pub landing_url: Url,
    /// Where environments live: `[environments] root`, or `_envs/` under the lake root.
    pub envs_url: Url,
    pub sources: BTreeMap<String, Source>,
}

impl Project {
    /// Load `dir/silt.toml` and `dir/sql/bronze/*.toml`, applying `SILT_*` overrides from `env`.
    pub fn load(dir: &Path) -> Result<Project> {
        Self::load_with_env(dir, &|k| std::env::var(k).ok())
    }

    pub fn load_with_env(dir: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Project> {
        let path = dir.join(PROJECT_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::config(
                path.display().to_string(),
                format!("cannot read the project file ({e}); run `silt init` to create a project, or pass --project <dir>"),
            )
        })?;
        let mut value: toml::Table = toml::from_str(&text)
            .map_err(|e| Error::config(path.display().to_string(), e.to_string()))?;
        if value.is_empty() {
            return Err(Error::config(
                path.display().to_string(),
                "the project file is empty: declare at least [project] name (and [lake] / [landing] root), or run `silt init` for a commented one",
            ));
        }
        apply_env_overrides(&mut value, env);
        let file: ProjectFile = value.try_into().map_err(|e: toml::de::Error| {
            Error::config(path.display().to_string(), e.to_string())
        })?;
        let dir = std::path::absolute(dir)
            .map_err(|e| Error::config(dir.display().to_string(), e.to_string()))?;
        let lake_url = resolve_root(&dir, file.lake.root.as_deref().unwrap_or("lake"))
            .map_err(|m| Error::config(PROJECT_FILE, format!("lake.root: {m}")))?;
        let landing_url = resolve_root(&dir, file.landing.root.as_deref().unwrap_or("landing"))
            .map_err(|m| Error::config(PROJECT_FILE, format!("landing.root: {m}")))?;
        let envs_url = match file.environments.root.as_deref() {
            Some(r) => resolve_root(&dir, r)
                .map_err(|m| Error::config(PROJECT_FILE, format!("environments.root: {m}")))?,
            None => {
                let mut u = lake_url.clone();
                let p = format!("{}/_envs/", u.path().trim_end_matches('/'));
                u.set_path(&p);
                u
            }
        };
        for e in &file.notify.on {
            if !NOTIFY_EVENTS.contains(&e.as_str()) {
                return Err(Error::config(
                    path.display().to_string(),
                    format!(
                        "[notify] on: unknown event '{e}': use {}",
                        NOTIFY_EVENTS.join(", ")
                    ),
                ));
            }
        }
        if let Some(mb) = file.engine.memory_limit_mb
            && mb < 16
        {
            return Err(Error::config(
                path.display().to_string(),
                format!(
                    "[engine] memory_limit_mb = {mb} leaves the engine no memory: give at least 16 (MiB), or leave it out for a sixteenth of the machine's memory"
                ),
            ));
        }
        let sources = load_sources(&dir)?;
        check_subject_paths(&sources)?;
        Ok(Project {
            dir,
            file,
            lake_url,
            landing_url,
            envs_url,
            sources,
        })
    }

    /// Columns that lead to a data subject: every source's subject key and subject_via column.
    pub fn subject_columns(&self) -> std::collections::BTreeSet<String> {
        self.sources
            .values()
            .flat_map(|s| {
                s.subject_key
                    .iter()
                    .cloned()
                    .chain(s.subject_via.iter().map(|v| v.column.clone()))
            })
            .collect()
    }

    /// Columns no table keeps min/max statistics on: the PII columns and the subject columns
    /// (an erased id must not survive in the statistics of a log entry or checkpoint).
    pub fn no_stats_columns(&self) -> std::collections::BTreeSet<String> {
        let mut c = self.pii_columns();
        c.extend(self.subject_columns());
        c
    }

    /// Every column some source declares PII.
    pub fn pii_columns(&self) -> std::collections::BTreeSet<String> {
        self.sources
            .values()
            .flat_map(|s| s.pii.iter().cloned())
            .collect()
    }

    pub fn select_sources(&self, names: &[String]) -> Result<Vec<&Source>> {
        if names.is_empty() {
            return Ok(self.sources.values().collect());
        }
        names
            .iter()
            .map(|n| {
                self.sources.get(n).ok_or_else(|| {
                    Error::Usage(format!(
                        "no source '{n}': the project declares {}",
                        self.sources.keys().cloned().collect::<Vec<_>>().join(", ")
                    ))
                })
            })
            .collect()
    }
}

fn load_sources(dir: &Path) -> Result<BTreeMap<String, Source>> {
    let bronze = dir.join("sql").join("bronze");
    let mut sources = BTreeMap::new();
    let entries = match std::fs::read_dir(&bronze) {
        Ok(e) => e,
        Err(_) => return Ok(sources),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    for p in paths {
        let rel = p.strip_prefix(dir).unwrap_or(&p).display().to_string();
        let name = p
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let text = std::fs::read_to_string(&p).map_err(|e| Error::config(&rel, e.to_string()))?;
        let sf: SourceFile =
            toml::from_str(&text).map_err(|e| Error::config(&rel, e.to_string()))?;
        sources.insert(name.clone(), Source::from_file(&name, &rel, sf)?);
    }
    Ok(sources)
}

/// Every `subject_via` names a declared source and column, and leads to a subject_key without
/// going round in a circle.
fn check_subject_paths(sources: &BTreeMap<String, Source>) -> Result<()> {
    for s in sources.values() {
        let Some(via) = &s.subject_via else { continue };
        let mut seen = vec![s.name.clone()];
        let mut cur = (s, via);
        loop {
            let (child, v) = cur;
            let err = |m: String| Error::config(&child.file, format!("subject_via: {m}"));
            let Some(parent) = sources.get(v.parent()) else {
                return Err(err(format!(
                    "table '{}' is not a source (sources: {})",
                    v.table,
                    sources.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            };
            if !parent.columns.iter().any(|c| c.name == v.key) {
                return Err(err(format!(
                    "key '{}' is not a column of source '{}'",
                    v.key, parent.name
                )));
            }
            if seen.contains(&parent.name) {
                seen.push(parent.name.clone());
                return Err(err(format!(
                    "the sources lead back to themselves: {}",
                    seen.join(" -> ")
                )));
            }
            seen.push(parent.name.clone());
            match (&parent.subject_key, &parent.subject_via) {
                (Some(_), _) => break,
                (None, Some(pv)) => cur = (parent, pv),
                (None, None) => {
                    return Err(err(format!(
                        "source '{}' has neither subject_key nor subject_via, so '{}' leads to no subject: declare how '{}' reaches one",
                        parent.name, s.name, parent.name
                    )));
                }
            }
        }
    }
    Ok(())
}

/// `SILT_<SECTION>_<KEY>` overrides `[section] key`; `SILT_LAKE` and `SILT_LANDING` are short
/// for `SILT_LAKE_ROOT` and `SILT_LANDING_ROOT`. Values parse as TOML when they can (numbers,
/// booleans), else they are strings.
fn apply_env_overrides(value: &mut toml::Table, env: &dyn Fn(&str) -> Option<String>) {
    let sections: &[(&str, &[&str])] = &[
        ("project", &["name"]),
        ("lake", &["root"]),
        ("landing", &["root"]),
        (
            "ingest",
            &[
                "batch_files",
                "batch_bytes",
                "memory_bytes",
                "target_file_size",
            ],
        ),
        ("gcs", &["service_account_key", "timeout_secs"]),
        ("gdpr", &["hmac_key"]),
        ("environments", &["root"]),
        ("notify", &["webhook", "command", "timeout_secs"]),
        (
            "engine",
            &[
                "memory_limit_mb",
                "target_partitions",
                "batch_size",
                "cluster",
                "threads",
            ],
        ),
        (
            "bigquery",
            &[
                "project",
                "dataset",
                "location",
                "endpoint",
                "credentials",
                "export_after_run",
            ],
        ),
    ];
    for (section, keys) in sections {
        for key in *keys {
            let var = format!("SILT_{}_{}", section.to_uppercase(), key.to_uppercase());
            let mut v = env(&var);
            if v.is_none() && *key == "root" {
                v = env(&format!("SILT_{}", section.to_uppercase()));
            }
            if v.is_none() && *key == "cluster" {
                v = env("SILT_CLUSTER");
            }
            let Some(v) = v else { continue };
            let parsed = format!("x = {v}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("x"))
                .unwrap_or(toml::Value::String(v));
            let table = value
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()));
            if let toml::Value::Table(t) = table {
                t.insert(key.to_string(), parsed);
            }
        }
    }
}

/// A root given as a URL stays one; a path becomes a `file://` URL, relative to the project.
pub fn resolve_root(project_dir: &Path, root: &str) -> std::result::Result<Url, String> {
    if root.contains("://") {
        let mut url = Url::parse(root).map_err(|e| format!("'{root}' is not a valid URL: {e}"))?;
        match url.scheme() {
            "file" | "gs" | "memory" => {}
            s => {
                return Err(format!(
                    "unsupported scheme '{s}' in '{root}': use file:// or gs://"
                ));
            }
        }
        if !url.path().ends_with('/') {
            let p = format!("{}/", url.path());
            url.set_path(&p);
        }
        return Ok(url);
    }
    let p = Path::new(root);
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        project_dir.join(p)
    };
    let abs = normalize_path(&abs);
    Url::from_directory_path(&abs)
        .map_err(|_| format!("'{}' is not a usable directory path", abs.display()))
}

fn normalize_path(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}
