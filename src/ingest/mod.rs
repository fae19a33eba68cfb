//! `silt ingest`: landing files to bronze Delta tables, exactly once (DESIGN.md §4.1).
//!
//! For each source: list the landing files its glob matches, drop those the ledger has seen,
//! parse the rest against the contract, then commit in this order — quarantine rows, bronze
//! rows, ledger entries. Each data commit carries one Delta `txn` app id per file, so a re-run
//! after a crash at any point skips what already landed and finishes the rest. This module must
//! not build object stores or talk SQL; parsing lives in csv.rs / json.rs.

mod csv;
mod json;
pub mod ledger;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    ArrayRef, AsArray, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Date32Type, Field, Schema, TimeUnit, TimestampMicrosecondType};
use futures::StreamExt;
use object_store::ObjectMeta;
use sha2::{Digest, Sha256};

use crate::catalog::{Catalog, TableRef};
use crate::commit::{AppendOptions, append_to, committed_app_ids};
use crate::config::{ChangedFilePolicy, DuplicateFilePolicy, Format, Granularity, Project, Source};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::storage::Storage;
use ledger::LedgerEntry;

/// What parsing one landing file produced.
#[derive(Debug, Default)]
pub struct ParsedFile {
    /// Good rows, contract columns only.
    pub batch: Option<RecordBatch>,
    /// Source line of each good row.
    pub lines: Vec<i64>,
    pub rejects: Vec<Reject>,
    pub warnings: Vec<String>,
}

/// A row refused by the contract.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    pub line: u64,
    pub column: Option<String>,
    pub reason: String,
    /// The raw record; invalid UTF-8 bytes are written as `\xNN`, and `\` as `\\`.
    pub raw: String,
}

/// Raw bytes as text without losing any: valid UTF-8 passes (with `\` doubled), invalid bytes
/// become `\xNN`.
pub fn escape_raw(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        out.push_str(&chunk.valid().replace('\\', "\\\\"));
        for x in chunk.invalid() {
            out.push_str(&format!("\\x{x:02X}"));
        }
    }
    out
}

/// Parse one landing file's bytes for `src` (public for `silt source new`'s self-check and tests).
pub fn parse_file(data: &[u8], file: &str, src: &Source) -> Result<ParsedFile> {
    let decoded;
    let data = if src.parse.encoding.eq_ignore_ascii_case("utf-8")
        || src.parse.encoding.eq_ignore_ascii_case("utf8")
    {
        data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data)
    } else {
        let enc =
            encoding_rs::Encoding::for_label(src.parse.encoding.as_bytes()).ok_or_else(|| {
                Error::config(
                    &src.file,
                    format!("unknown encoding '{}'", src.parse.encoding),
                )
            })?;
        let (text, _, _) = enc.decode(data);
        decoded = text.into_owned().into_bytes();
        &decoded[..]
    };
    match src.format {
        Format::Csv => csv::parse(data, file, src),
        Format::Ndjson | Format::JsonArray | Format::Json => json::parse(data, file, src),
    }
}

/// Counts for one source in one ingest.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SourceReport {
    pub source: String,
    pub files_listed: usize,
    pub files_ingested: usize,
    pub files_already_ingested: usize,
    pub files_duplicate: usize,
    pub files_changed: usize,
    pub files_empty: usize,
    pub files_rejected: usize,
    pub rows: u64,
    pub quarantined: u64,
    pub bytes: u64,
    pub bronze_version: Option<u64>,
    pub warnings: Vec<String>,
    pub anomalies: Vec<crate::profile::Anomaly>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct IngestReport {
    pub batch_id: String,
    pub sources: Vec<SourceReport>,
    pub elapsed_ms: u64,
    /// Files refused as a whole; they stay out of the ledger and are retried next time.
    #[serde(skip)]
    pub rejected: Vec<Error>,
}

impl IngestReport {
    /// Sources whose error-severity anomaly checks failed in this ingest.
    pub fn failed_sources(&self) -> Vec<String> {
        self.sources
            .iter()
            .filter(|s| s.anomalies.iter().any(|a| a.status == "fail"))
            .map(|s| s.source.clone())
            .collect()
    }
}

/// Builder for one ingest run.
pub struct IngestBuilder<'a> {
    project: &'a Project,
    catalog: Catalog,
    landing: Storage,
    sources: Vec<String>,
    progress: Option<indicatif::ProgressBar>,
}

impl<'a> IngestBuilder<'a> {
    pub fn new(project: &'a Project, catalog: Catalog, landing: Storage) -> Self {
        IngestBuilder {
            project,
            catalog,
            landing,
            sources: Vec::new(),
            progress: None,
        }
    }

    /// Restrict to these sources (all when empty).
    pub fn with_sources(mut self, names: Vec<String>) -> Self {
        self.sources = names;
        self
    }

    /// A progress bar to advance by landing bytes read.
    pub fn with_progress(mut self, pb: indicatif::ProgressBar) -> Self {
        self.progress = Some(pb);
        self
    }

    pub async fn execute(self) -> Result<IngestReport> {
        let started = Instant::now();
        let batch_id = uuid::Uuid::now_v7().to_string();
        let ingested_at = chrono::Utc::now().timestamp_micros();
        let mut report = IngestReport {
            batch_id: batch_id.clone(),
            ..Default::default()
        };
        let sources = self.project.select_sources(&self.sources)?;
        let all = self.landing.list("").await?;
        for src in sources {
            let mut sr = SourceReport {
                source: src.name.clone(),
                ..Default::default()
            };
            let files: Vec<ObjectMeta> = all
                .iter()
                .filter(|m| {
                    self.landing
                        .relative(&m.location)
                        .is_some_and(|rel| src.glob.is_match(&rel))
                })
                .cloned()
                .collect();
            sr.files_listed = files.len();
            let mut run = SourceRun {
                src,
                catalog: &self.catalog,
                landing: &self.landing,
                batch_id: &batch_id,
                ingested_at,
                cfg: &self.project.file.ingest,
                progress: self.progress.as_ref(),
                rewritten: HashMap::new(),
            };
            run.ingest(files, &mut sr, &mut report.rejected).await?;
            report.sources.push(sr);
        }
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }
}

struct SourceRun<'r> {
    src: &'r Source,
    catalog: &'r Catalog,
    landing: &'r Storage,
    batch_id: &'r str,
    ingested_at: i64,
    cfg: &'r crate::config::IngestSection,
    progress: Option<&'r indicatif::ProgressBar>,
    /// Path → every content hash the ledger has for it.
    rewritten: HashMap<String, Vec<String>>,
}

/// A landing file read and classified.
struct Candidate {
    rel: String,
    meta: ObjectMeta,
    sha: String,
    data: bytes::Bytes,
    replaces: bool,
}

impl SourceRun<'_> {
    async fn ingest(
        &mut self,
        files: Vec<ObjectMeta>,
        sr: &mut SourceReport,
        rejected: &mut Vec<Error>,
    ) -> Result<()> {
        let entries = ledger::read(self.catalog, &self.src.name).await?;
        let mut by_path: HashMap<String, LedgerEntry> = HashMap::new();
        let mut by_sha: HashMap<String, String> = HashMap::new();
        // Contents a GDPR erasure rewrote: the old one stays "already ingested" until the new
        // one lands (the ledger learns of the rewrite first).
        let mut known: HashMap<String, Vec<String>> = HashMap::new();
        for e in &entries {
            known
                .entry(e.path.clone())
                .or_default()
                .push(e.sha256.clone());
        }
        self.rewritten = known;
        for e in entries {
            if e.status == "ingested" || e.status == "empty" {
                by_sha
                    .entry(e.sha256.clone())
                    .or_insert_with(|| e.path.clone());
            }
            by_path.insert(e.path.clone(), e);
        }
        // Files whose path, size and etag the ledger already holds are not even read.
        let mut todo = Vec::new();
        for m in files {
            let rel = self.landing.relative(&m.location).unwrap_or_default();
            match by_path.get(&rel) {
                Some(e) if e.size == m.size as i64 && e.e_tag == m.e_tag => {
                    sr.files_already_ingested += 1;
                }
                _ => todo.push((rel, m)),
            }
        }
        // Commit in chunks bounded by file count and bytes.
        let mut chunk: Vec<(String, ObjectMeta)> = Vec::new();
        let mut chunk_bytes = 0u64;
        for (rel, m) in todo {
            if !chunk.is_empty()
                && (chunk.len() >= self.cfg.batch_files.max(1)
                    || chunk_bytes + m.size > self.cfg.batch_bytes)
            {
                self.chunk(
                    std::mem::take(&mut chunk),
                    &mut by_path,
                    &mut by_sha,
                    sr,
                    rejected,
                )
                .await?;
                chunk_bytes = 0;
            }
            chunk_bytes += m.size;
            chunk.push((rel, m));
        }
        if !chunk.is_empty() {
            self.chunk(chunk, &mut by_path, &mut by_sha, sr, rejected)
                .await?;
        }
        Ok(())
    }

    async fn chunk(
        &mut self,
        chunk: Vec<(String, ObjectMeta)>,
        by_path: &mut HashMap<String, LedgerEntry>,
        by_sha: &mut HashMap<String, String>,
        sr: &mut SourceReport,
        rejected: &mut Vec<Error>,
    ) -> Result<()> {
        let landing = self.landing.clone();
        let progress = self.progress.cloned();
        let fetched: Vec<Result<(String, ObjectMeta, bytes::Bytes)>> = futures::stream::iter(chunk)
            .map(|(rel, m)| {
                let landing = landing.clone();
                let progress = progress.clone();
                async move {
                    let data = landing.get(&m.location).await?;
                    if let Some(p) = &progress {
                        p.inc(data.len() as u64);
                    }
                    Ok((rel, m, data))
                }
            })
            .buffered(8)
            .collect()
            .await;
        let mut ledger_entries: Vec<LedgerEntry> = Vec::new();
        let mut candidates: Vec<Candidate> = Vec::new();
        for f in fetched {
            let (rel, meta, data) = f?;
            let sha = hex::encode(Sha256::digest(&data));
            let entry = |status: &str, detail: Option<String>| LedgerEntry {
                source: self.src.name.clone(),
                path: rel.clone(),
                size: meta.size as i64,
                e_tag: meta.e_tag.clone(),
                sha256: sha.clone(),
                status: status.into(),
                rows: 0,
                quarantined: 0,
                batch_id: self.batch_id.to_string(),
                ingested_at: self.ingested_at,
                detail,
            };
            let previous = by_path.get(&rel).cloned();
            if let Some(prev) = &previous
                && (prev.sha256 == sha
                    || (prev.status == "rewritten"
                        && self.rewritten.get(&rel).is_some_and(|v| v.contains(&sha))))
            {
                // Same content, new etag (touched or copied again): remember the new etag.
                sr.files_already_ingested += 1;
                let mut e = entry(&prev.status, prev.detail.clone());
                e.rows = prev.rows;
                e.quarantined = prev.quarantined;
                ledger_entries.push(e);
                continue;
            }
            if let Some(other) = by_sha.get(&sha)
                && self.src.on_duplicate_file == DuplicateFilePolicy::Skip
            {
                sr.files_duplicate += 1;
                sr.warnings.push(format!(
                    "{rel}: same content as {other}, already ingested; skipped (on_duplicate_file = \"skip\")"
                ));
                ledger_entries.push(entry("duplicate", Some(format!("same content as {other}"))));
                continue;
            }
            let mut replaces = false;
            if let Some(prev) = &previous {
                sr.files_changed += 1;
                match self.src.on_changed_file {
                    ChangedFilePolicy::Skip => {
                        sr.warnings.push(format!(
                            "{rel}: content changed since it was ingested (batch {}); skipped (on_changed_file = \"skip\")",
                            prev.batch_id
                        ));
                        ledger_entries.push(entry("skipped", Some(format!("changed; previous sha256 {}", prev.sha256))));
                        continue;
                    }
                    ChangedFilePolicy::Error => {
                        sr.files_rejected += 1;
                        rejected.push(Error::Input {
                            location: crate::error::InputLocation { file: rel.clone(), line: 1, column: None },
                            message: format!("the file changed since it was ingested in batch {}", prev.batch_id),
                            fix: format!(
                                "deliver corrections under a new file name, or set on_changed_file = \"ingest\", \"replace\" or \"skip\" in {}",
                                self.src.file
                            ),
                        });
                        continue;
                    }
                    ChangedFilePolicy::Ingest => sr.warnings.push(format!(
                        "{rel}: content changed since it was ingested (batch {}); ingesting it as a new file",
                        prev.batch_id
                    )),
                    ChangedFilePolicy::Replace => {
                        sr.warnings.push(format!(
                            "{rel}: content changed since it was ingested (batch {}); replacing its rows",
                            prev.batch_id
                        ));
                        replaces = true;
                    }
                }
            }
            by_sha.entry(sha.clone()).or_insert_with(|| rel.clone());
            candidates.push(Candidate {
                rel,
                meta,
                sha,
                data,
                replaces,
            });
        }

        // Parse in parallel on the blocking pool.
        let src = Arc::new(self.src.clone());
        let parsed: Vec<(Candidate, Result<ParsedFile>)> = futures::stream::iter(candidates)
            .map(|c| {
                let src = src.clone();
                async move {
                    let data = c.data.clone();
                    let rel = c.rel.clone();
                    let r = tokio::task::spawn_blocking(move || parse_file(&data, &rel, &src))
                        .await
                        .unwrap_or_else(|e| {
                            Err(Error::Runtime(format!("parser task failed: {e}")))
                        });
                    (c, r)
                }
            })
            .buffered(
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2),
            )
            .collect()
            .await;

        struct Ready {
            c: Candidate,
            app_id: String,
            bronze: Option<RecordBatch>,
            quarantine: Option<RecordBatch>,
            rows: u64,
            rejects: u64,
        }
        let mut ready: Vec<Ready> = Vec::new();
        for (c, r) in parsed {
            match r {
                Err(e @ (Error::Input { .. } | Error::Config { .. })) => {
                    sr.files_rejected += 1;
                    by_sha.remove(&c.sha);
                    rejected.push(e);
                }
                Err(e) => return Err(e),
                Ok(p) => {
                    sr.warnings.extend(p.warnings.iter().cloned());
                    let rows = p.lines.len() as u64;
                    let rejects = p.rejects.len() as u64;
                    let bronze = match &p.batch {
                        Some(b) if b.num_rows() > 0 => {
                            Some(self.bronze_batch(b, &p.lines, &c.rel)?)
                        }
                        _ => None,
                    };
                    let quarantine = (!p.rejects.is_empty())
                        .then(|| self.quarantine_batch(&p.rejects, &c.rel))
                        .transpose()?;
                    let key = hex::encode(Sha256::digest(
                        format!("{}\0{}\0{}", self.src.name, c.rel, c.sha).as_bytes(),
                    ));
                    ready.push(Ready {
                        app_id: format!("silt.ingest.{}", &key[..32]),
                        c,
                        bronze,
                        quarantine,
                        rows,
                        rejects,
                    });
                }
            }
        }
        if ready.is_empty() && ledger_entries.is_empty() {
            return Ok(());
        }

        let mut meta = vec![
            (
                "silt.operation".to_string(),
                serde_json::Value::from("ingest"),
            ),
            (
                "silt.batch_id".to_string(),
                serde_json::Value::from(self.batch_id),
            ),
            (
                "silt.source".to_string(),
                serde_json::Value::from(self.src.name.as_str()),
            ),
        ];
        // 1. Quarantine.
        let qt = TableRef::quarantine(&self.src.name);
        let mut q_table = self.catalog.lake().delta_table(&qt.rel_path()).await?;
        let q_ids: Vec<String> = ready
            .iter()
            .filter(|r| r.quarantine.is_some())
            .map(|r| r.app_id.clone())
            .collect();
        let q_done = committed_app_ids(&q_table, &q_ids).await?;
        let q_opts = |ids: Vec<String>, replace: Option<String>| AppendOptions {
            partition_columns: vec![],
            stats_columns: Some(
                [
                    "_source_file",
                    "_source_line",
                    "column_name",
                    "_batch_id",
                    "_ingested_at",
                ]
                .map(String::from)
                .to_vec(),
            ),
            app_ids: ids,
            metadata: meta.clone(),
            target_file_size: Some(self.cfg.target_file_size),
            description: Some(format!(
                "rows of source '{}' refused by its contract",
                self.src.name
            )),
            replace_source_file: replace,
        };
        // A replacement is its own commit: it swaps that file's earlier rows for the new ones.
        let q_replace_now = q_table.version().is_some();
        for r in ready
            .iter()
            .filter(|r| r.c.replaces && q_replace_now && !q_done.contains(&r.app_id))
        {
            let batches = vec![
                r.quarantine
                    .clone()
                    .unwrap_or_else(|| RecordBatch::new_empty(quarantine_schema())),
            ];
            q_table = append_to(
                q_table,
                &qt,
                batches,
                q_opts(vec![r.app_id.clone()], Some(r.c.rel.clone())),
            )
            .await?
            .1;
        }
        let todo: Vec<&Ready> = ready
            .iter()
            .filter(|r| {
                !(r.c.replaces && q_replace_now)
                    && r.quarantine.is_some()
                    && !q_done.contains(&r.app_id)
            })
            .collect();
        if !todo.is_empty() {
            let batches = todo.iter().filter_map(|r| r.quarantine.clone()).collect();
            let ids = todo.iter().map(|r| r.app_id.clone()).collect();
            append_to(q_table, &qt, batches, q_opts(ids, None)).await?;
        }
        failpoint::hit("ingest.after_quarantine");

        // 2. Bronze.
        let bt = TableRef::bronze(&self.src.name);
        let mut b_table = self.catalog.lake().delta_table(&bt.rel_path()).await?;
        let b_ids: Vec<String> = ready.iter().map(|r| r.app_id.clone()).collect();
        let b_done = committed_app_ids(&b_table, &b_ids).await?;
        meta.push(("silt.files".into(), serde_json::Value::from(ready.len())));
        let b_opts = |ids: Vec<String>, replace: Option<String>| AppendOptions {
            partition_columns: self.src.partition.iter().map(|p| p.column_name()).collect(),
            stats_columns: Some(self.stats_columns()),
            app_ids: ids,
            metadata: meta.clone(),
            target_file_size: Some(self.cfg.target_file_size),
            description: self.src.description.clone(),
            replace_source_file: replace,
        };
        failpoint::hit("ingest.before_bronze");
        let b_replace_now = b_table.version().is_some();
        for r in ready
            .iter()
            .filter(|r| r.c.replaces && b_replace_now && !b_done.contains(&r.app_id))
        {
            let batch = match &r.bronze {
                Some(b) => b.clone(),
                None => self.bronze_batch(
                    &RecordBatch::new_empty(self.contract_schema()),
                    &[],
                    &r.c.rel,
                )?,
            };
            let (_, t) = append_to(
                b_table,
                &bt,
                vec![batch],
                b_opts(vec![r.app_id.clone()], Some(r.c.rel.clone())),
            )
            .await?;
            sr.bronze_version = t.version();
            b_table = t;
        }
        let todo: Vec<&Ready> = ready
            .iter()
            .filter(|r| {
                !(r.c.replaces && b_replace_now)
                    && r.bronze.is_some()
                    && !b_done.contains(&r.app_id)
            })
            .collect();
        if !todo.is_empty() {
            let batches = todo.iter().filter_map(|r| r.bronze.clone()).collect();
            let ids = todo.iter().map(|r| r.app_id.clone()).collect();
            let (_, t) = append_to(b_table, &bt, batches, b_opts(ids, None)).await?;
            sr.bronze_version = t.version();
        }
        failpoint::hit("ingest.after_bronze");

        // 3. Ledger.
        for r in &ready {
            sr.files_ingested += 1;
            sr.rows += r.rows;
            sr.quarantined += r.rejects;
            sr.bytes += r.c.data.len() as u64;
            if r.rows == 0 && r.rejects == 0 {
                sr.files_empty += 1;
            }
            let e = LedgerEntry {
                source: self.src.name.clone(),
                path: r.c.rel.clone(),
                size: r.c.meta.size as i64,
                e_tag: r.c.meta.e_tag.clone(),
                sha256: r.c.sha.clone(),
                status: if r.rows == 0 && r.rejects == 0 {
                    "empty"
                } else {
                    "ingested"
                }
                .into(),
                rows: r.rows as i64,
                quarantined: r.rejects as i64,
                batch_id: self.batch_id.to_string(),
                ingested_at: self.ingested_at,
                detail: r
                    .c
                    .replaces
                    .then(|| "replaced the rows of the earlier version".to_string()),
            };
            by_path.insert(e.path.clone(), e.clone());
            ledger_entries.push(e);
        }
        ledger::record(self.catalog, &ledger_entries, self.batch_id).await?;
        failpoint::hit("ingest.after_ledger");
        // Anomaly checks (polars) on this batch's good rows, against the previous batches.
        if let Some(spec) = &self.src.anomaly {
            let n = self.src.columns.len();
            let batches: Vec<RecordBatch> = ready
                .iter()
                .filter_map(|r| r.bronze.as_ref())
                .map(|b| b.project(&(0..n).collect::<Vec<_>>()))
                .collect::<std::result::Result<_, _>>()?;
            if !batches.is_empty() {
                let found = crate::profile::check_batch(
                    self.catalog,
                    &self.src.name,
                    spec,
                    self.batch_id,
                    &batches,
                )
                .await?;
                sr.anomalies.extend(found);
            }
        }
        Ok(())
    }

    fn contract_schema(&self) -> Arc<Schema> {
        Arc::new(Schema::new(
            self.src
                .columns
                .iter()
                .map(|c| c.to_arrow_field())
                .collect::<Vec<_>>(),
        ))
    }

    /// Columns with min/max statistics: every column but the declared PII (DESIGN.md §4.4).
    fn stats_columns(&self) -> Vec<String> {
        let mut cols: Vec<String> = self
            .src
            .columns
            .iter()
            .filter(|c| !self.src.pii.contains(&c.name))
            .map(|c| c.name.clone())
            .collect();
        cols.extend(
            ["_source_file", "_source_line", "_ingested_at", "_batch_id"].map(String::from),
        );
        cols
    }

    /// Contract columns, the derived partition column if any, then the metadata columns.
    fn bronze_batch(&self, b: &RecordBatch, lines: &[i64], rel: &str) -> Result<RecordBatch> {
        let n = b.num_rows();
        let mut fields: Vec<Field> = b
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        let mut cols: Vec<ArrayRef> = b.columns().to_vec();
        if let Some(p) = &self.src.partition
            && let Some(g) = p.granularity
        {
            let idx = b.schema().index_of(&p.source_column)?;
            let arr = b.column(idx);
            let fmt = match g {
                Granularity::Year => "%Y",
                Granularity::Month => "%Y-%m",
                Granularity::Day => "%Y-%m-%d",
            };
            let values: StringArray = match arr.data_type() {
                DataType::Date32 => arr
                    .as_primitive::<Date32Type>()
                    .iter()
                    .map(|d| {
                        d.map(|d| crate::contract::format_date(d)).and_then(|s| {
                            chrono::NaiveDate::parse_from_str(&s, "%Y-%m-%d")
                                .ok()
                                .map(|d| d.format(fmt).to_string())
                        })
                    })
                    .collect(),
                _ => arr
                    .as_primitive::<TimestampMicrosecondType>()
                    .iter()
                    .map(|t| {
                        t.and_then(chrono::DateTime::from_timestamp_micros)
                            .map(|t| t.format(fmt).to_string())
                    })
                    .collect(),
            };
            fields.push(Field::new(p.column_name(), DataType::Utf8, true));
            cols.push(Arc::new(values));
        }
        fields.extend(metadata_fields());
        cols.push(Arc::new(StringArray::from_iter_values(
            std::iter::repeat_n(rel, n),
        )));
        cols.push(Arc::new(Int64Array::from(lines.to_vec())));
        cols.push(Arc::new(
            TimestampMicrosecondArray::from_iter_values(std::iter::repeat_n(self.ingested_at, n))
                .with_timezone("UTC"),
        ));
        cols.push(Arc::new(StringArray::from_iter_values(
            std::iter::repeat_n(self.batch_id, n),
        )));
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
    }

    fn quarantine_batch(&self, rejects: &[Reject], rel: &str) -> Result<RecordBatch> {
        let n = rejects.len();
        Ok(RecordBatch::try_new(
            quarantine_schema(),
            vec![
                Arc::new(StringArray::from_iter_values(std::iter::repeat_n(rel, n))),
                Arc::new(Int64Array::from_iter_values(
                    rejects.iter().map(|r| r.line as i64),
                )),
                Arc::new(StringArray::from_iter(
                    rejects.iter().map(|r| r.column.clone()),
                )),
                Arc::new(StringArray::from_iter_values(
                    rejects.iter().map(|r| r.reason.clone()),
                )),
                Arc::new(StringArray::from_iter_values(
                    rejects.iter().map(|r| r.raw.clone()),
                )),
                Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                    self.batch_id,
                    n,
                ))),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(std::iter::repeat_n(
                        self.ingested_at,
                        n,
                    ))
                    .with_timezone("UTC"),
                ),
            ],
        )?)
    }
}

fn metadata_fields() -> Vec<Field> {
    vec![
        Field::new("_source_file", DataType::Utf8, false),
        Field::new("_source_line", DataType::Int64, false),
        Field::new(
            "_ingested_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("_batch_id", DataType::Utf8, false),
    ]
}

/// `quarantine.<source>`: the raw record, where it was, and why it was refused.
pub fn quarantine_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("_source_file", DataType::Utf8, false),
        Field::new("_source_line", DataType::Int64, false),
        Field::new("column_name", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, false),
        Field::new("raw_record", DataType::Utf8, false),
        Field::new("_batch_id", DataType::Utf8, false),
        Field::new(
            "_ingested_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ]))
}
