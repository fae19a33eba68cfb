//! `silt ingest`: landing files to bronze Delta tables, exactly once.
//!
//! For each source: list the landing files its glob matches, drop those the ledger has seen,
//! then parse the rest against the contract on every core, each parser task writing its good
//! rows straight into bronze Parquet files (delta-rs `DeltaWriter`), so memory holds files in
//! flight, never a table. Commit order — bronze files, quarantine rows, ledger entries. Each data
//! commit carries one Delta `txn` app id per file, so a re-run after a crash at any point skips
//! what already landed and finishes the rest. This module must not build object stores, commit
//! (commit.rs does) or talk SQL; parsing lives in csv.rs / json.rs.

pub mod anomalies;
pub mod parse;

pub use parse::{
    ParsedFile, Reject, SLICE_ROWS, Slice, escape_raw, parse_file, parse_file_in_slices,
};

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

use crate::error::{Error, Result};
use crate::lake::catalog::{Catalog, TableRef};
use crate::lake::commit::{AppendOptions, append_to, commit_files, committed_app_ids};
use crate::lake::failpoint;
use crate::lake::meta::ledger::{self, FileStatus, LedgerEntry};
use crate::lake::storage::Storage;
use crate::progress::SharedProgress;
use crate::project::config::{
    ChangedFilePolicy, DuplicateFilePolicy, Granularity, Project, Source,
};
use crate::project::contract::ColumnType;
use anomalies::BatchStats;
use std::num::NonZeroU64;

/// What parsing one landing file produced.
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
    pub anomalies: Vec<anomalies::Anomaly>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct IngestReport {
    pub batch_id: String,
    pub sources: Vec<SourceReport>,
    pub elapsed_ms: u64,
    /// Landing entries that could not be read or were refused (a symlink loop, a link out of
    /// the landing root, a name the store cannot hold), or a missing landing root: skipped,
    /// the other files ingested.
    pub warnings: Vec<String>,
    /// Files refused as a whole; they stay out of the ledger and are retried next time.
    #[serde(skip)]
    pub rejected: Vec<Error>,
}

impl IngestReport {
    /// Sources whose error-severity anomaly checks failed in this ingest.
    pub fn failed_sources(&self) -> Vec<String> {
        self.sources
            .iter()
            .filter(|s| {
                s.anomalies
                    .iter()
                    .any(|a| a.status == anomalies::AnomalyStatus::Fail)
            })
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
    progress: Option<SharedProgress>,
}

impl crate::lake::Silt {
    /// `silt ingest`: a builder over this project's sources and landing root.
    pub fn ingest(&self) -> IngestBuilder<'_> {
        IngestBuilder::new(&self.project, self.catalog.clone(), self.landing.clone())
    }
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

    /// A progress listener, advanced by the landing bytes read.
    pub fn with_progress(mut self, pb: SharedProgress) -> Self {
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
        let (all, skipped) = self.landing.list_landing().await?;
        report.warnings = skipped;
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
                by_path: HashMap::new(),
                by_sha: HashMap::new(),
                report: sr,
                rejected: Vec::new(),
            };
            run.ingest(files).await?;
            report.rejected.extend(run.rejected);
            report.sources.push(run.report);
        }
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }
}

/// One source's ingest: its landing files in commit chunks, each hashed, classified against
/// the ledger, parsed and committed to bronze, quarantine and the ledger.
struct SourceRun<'r> {
    src: &'r Source,
    catalog: &'r Catalog,
    landing: &'r Storage,
    batch_id: &'r str,
    ingested_at: i64,
    cfg: &'r crate::project::config::IngestSection,
    progress: Option<&'r SharedProgress>,
    /// Path → every content hash the ledger has for it.
    rewritten: HashMap<String, Vec<String>>,
    /// The ledger's latest entry per path.
    by_path: HashMap<String, LedgerEntry>,
    /// Content hash → the path it was ingested from.
    by_sha: HashMap<String, String>,
    report: SourceReport,
    /// Files refused as a whole (the others are ingested).
    rejected: Vec<Error>,
}

/// A landing file read, hashed and classified as one to ingest.
struct Candidate {
    rel: String,
    meta: ObjectMeta,
    sha: String,
    size: u64,
    /// Its bytes, when they fitted in the memory budget (else read again to parse).
    data: Option<bytes::Bytes>,
    /// Its share of the memory budget while `data` is held (released when parsed).
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    replaces: bool,
    /// The Delta `txn` app id that marks this content as committed to a table.
    app_id: String,
}

/// A candidate parsed and (for the streamed ones) written.
struct Done {
    c: Candidate,
    rows: u64,
    rejects: u64,
}

/// What the ledger says of a landing file just hashed.
enum Verdict {
    /// Nothing to ingest: record this ledger entry (same content as before, a duplicate or
    /// a skipped change).
    Record(LedgerEntry),
    /// Refused as a whole (a changed file under `on_changed_file = "error"`).
    Refused,
    /// Ingest it; `replaces`: its rows replace those of its earlier version.
    Ingest { replaces: bool },
}

/// One chunk of a source's landing files on its way to its commits.
struct ChunkWork {
    stamp: Stamp,
    qt: TableRef,
    bt: TableRef,
    q_table: deltalake::DeltaTable,
    b_table: deltalake::DeltaTable,
    /// The labels of the chunk's commits.
    meta: Vec<(String, serde_json::Value)>,
    /// Ledger entries of the files not ingested (known, duplicate, skipped), then of the
    /// ingested ones.
    ledger: Vec<LedgerEntry>,
    /// The app id of every file to ingest.
    ids: Vec<String>,
    bytes: u64,
    /// Files that replace an earlier version of themselves, ingested one by one.
    replacing: Vec<Candidate>,
    /// App ids bronze (or the quarantine) already holds, from an interrupted run.
    b_done: Vec<String>,
    q_done: Vec<String>,
    /// The streamed units in flight.
    units: Units,
    done: Vec<Done>,
    stats: BatchStats,
}

impl SourceRun<'_> {
    async fn ingest(&mut self, files: Vec<ObjectMeta>) -> Result<()> {
        let entries = ledger::read(self.catalog, &self.src.name).await?;
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
            if e.status.landed() {
                self.by_sha
                    .entry(e.sha256.clone())
                    .or_insert_with(|| e.path.clone());
            }
            self.by_path.insert(e.path.clone(), e);
        }
        // Files whose path, size and etag the ledger already holds are not even read.
        let mut todo = Vec::new();
        for m in files {
            let rel = self.landing.relative(&m.location).unwrap_or_default();
            match self.by_path.get(&rel) {
                Some(e) if e.size == m.size as i64 && e.e_tag == m.e_tag => {
                    self.report.files_already_ingested += 1;
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
                self.chunk(std::mem::take(&mut chunk)).await?;
                chunk_bytes = 0;
            }
            chunk_bytes += m.size;
            chunk.push((rel, m));
        }
        if !chunk.is_empty() {
            self.chunk(chunk).await?;
        }
        Ok(())
    }

    /// Ingest one chunk: hash and classify its files while the units parse and upload the
    /// ones to ingest, swap the rows of changed files that replace theirs, commit bronze, the
    /// quarantine and the ledger, then check the batch for anomalies.
    async fn chunk(&mut self, chunk: Vec<(String, ObjectMeta)>) -> Result<()> {
        let phase = Instant::now();
        let mut w = self.open_chunk().await?;
        self.hash_and_stream(chunk, &mut w).await?;
        if w.ids.is_empty() && w.ledger.is_empty() {
            return Ok(());
        }
        tracing::info!(
            source = %self.src.name,
            files = w.ids.len(),
            bytes = w.bytes,
            ms = phase.elapsed().as_millis() as u64,
            "hashed and classified"
        );
        w.q_done = committed_app_ids(&w.q_table, &w.ids).await?;
        let replacing_ids: Vec<String> = w.replacing.iter().map(|c| c.app_id.clone()).collect();
        w.b_done
            .extend(committed_app_ids(&w.b_table, &replacing_ids).await?);
        self.replace_files(&mut w).await?;
        failpoint::hit("ingest.before_bronze");
        self.commit_streamed(&mut w, phase).await?;
        self.record_ledger(&mut w).await?;
        failpoint::hit("ingest.after_ledger");
        tracing::info!(source = %self.src.name, ms = phase.elapsed().as_millis() as u64, "quarantine and ledger committed");
        // Anomaly checks on this batch's good rows (statistics gathered while parsing),
        // against the previous batches.
        if let Some(spec) = &self.src.anomaly
            && w.stats.rows > 0
        {
            let found =
                anomalies::check_batch(self.catalog, &self.src.name, spec, self.batch_id, &w.stats)
                    .await?;
            self.report.anomalies.extend(found);
        }
        Ok(())
    }

    /// The chunk's tables and commit labels.
    async fn open_chunk(&self) -> Result<ChunkWork> {
        let meta = vec![
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
        let qt = TableRef::quarantine(&self.src.name);
        let bt = TableRef::bronze(&self.src.name);
        Ok(ChunkWork {
            stamp: Stamp {
                src: Arc::new(self.src.clone()),
                batch_id: Arc::from(self.batch_id),
                ingested_at: self.ingested_at,
            },
            q_table: self.catalog.lake().delta_table(&qt.rel_path()).await?,
            b_table: self.catalog.lake().delta_table(&bt.rel_path()).await?,
            qt,
            bt,
            meta,
            ledger: Vec::new(),
            ids: Vec::new(),
            bytes: 0,
            replacing: Vec::new(),
            b_done: Vec::new(),
            q_done: Vec::new(),
            units: Units::default(),
            done: Vec::new(),
            stats: BatchStats::default(),
        })
    }

    /// How the quarantine's commits are written.
    fn quarantine_opts(
        &self,
        ids: Vec<String>,
        replace: Option<String>,
        meta: &[(String, serde_json::Value)],
    ) -> AppendOptions {
        AppendOptions {
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
            metadata: meta.to_vec(),
            target_file_size: Some(self.cfg.target_file_size),
            description: Some(format!(
                "rows of source '{}' refused by its contract",
                self.src.name
            )),
            replace_source_file: replace,
        }
    }

    /// How bronze's commits are written.
    fn bronze_opts(
        &self,
        ids: Vec<String>,
        replace: Option<String>,
        meta: &[(String, serde_json::Value)],
    ) -> AppendOptions {
        AppendOptions {
            partition_columns: self.src.partition.iter().map(|p| p.column_name()).collect(),
            stats_columns: Some(self.stats_columns()),
            app_ids: ids,
            metadata: meta.to_vec(),
            target_file_size: Some(self.cfg.target_file_size),
            description: self.src.description.clone(),
            replace_source_file: replace,
        }
    }

    /// Hash every file of the chunk (a few at a time, on the blocking pool) and classify it
    /// against the ledger; start parsing the ones to ingest in units as they fill.
    ///
    /// The bytes of a file to ingest stay in memory until its parser is done with them,
    /// within `memory_bytes`: when the budget is spent, hashing waits for the parsers (so no
    /// file is read and hashed twice); only a file larger than the whole budget, or one that
    /// replaces an earlier version, is read again when parsed. Hashing, parsing and encoding
    /// overlap: a unit of consecutive files starts on the parser pool as soon as it is full.
    /// At most one unit per core runs at a time; units are small enough that memory does not
    /// follow the data and the last one does not leave a core idle for long (about 8 per
    /// core), large enough to coalesce small files.
    async fn hash_and_stream(
        &mut self,
        chunk: Vec<(String, ObjectMeta)>,
        w: &mut ChunkWork,
    ) -> Result<()> {
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let total: u64 = chunk.iter().map(|(_, m)| m.size).sum();
        let unit_bytes = (total / (8 * workers as u64)).clamp(4 << 20, 16 << 20);
        let starter = UnitStarter {
            stamp: w.stamp.clone(),
            landing: self.landing.clone(),
            progress: self.progress.cloned(),
            want_stats: self.src.anomaly.is_some(),
            permits: Arc::new(tokio::sync::Semaphore::new(workers)),
        };
        let schema = w.stamp.bronze_schema();
        // Set up on the first file to stream (the table's schema evolves first if the contract
        // changed): the writer configuration, the store and the partition column.
        let mut writing: Option<WriterSetup> = None;
        let mut unit: Vec<Candidate> = Vec::new();
        let mut unit_size = 0u64;
        let landing = self.landing.clone();
        let mut hashed = futures::stream::iter(chunk)
            .map(|(rel, m)| {
                let landing = landing.clone();
                async move {
                    let data = landing.get(&m.location).await?;
                    let (data, sha) = sha256(data).await?;
                    Ok::<_, Error>((rel, m, data, sha))
                }
            })
            .buffered(4);
        // The budget in KiB permits; a kept file holds its permits until its parser ends.
        let budget_kib = (self.cfg.memory_bytes / 1024).clamp(1, u32::MAX as u64) as u32;
        let memory = Arc::new(tokio::sync::Semaphore::new(budget_kib as usize));
        while let Some(f) = hashed.next().await {
            let (rel, meta, data, sha) = f?;
            let size = data.len() as u64;
            let replaces = match self.classify(&rel, &meta, &sha) {
                Verdict::Ingest { replaces } => replaces,
                verdict => {
                    if let Some(p) = &self.progress {
                        p.advance(size);
                    }
                    if let Verdict::Record(e) = verdict {
                        w.ledger.push(e);
                    }
                    continue;
                }
            };
            self.by_sha
                .entry(sha.clone())
                .or_insert_with(|| rel.clone());
            let key = hex::encode(Sha256::digest(
                format!("{}\0{}\0{}", self.src.name, rel, sha).as_bytes(),
            ));
            let mut c = Candidate {
                app_id: format!("silt.ingest.{}", &key[..32]),
                rel,
                meta,
                sha,
                size,
                data: None,
                permit: None,
                replaces,
            };
            w.ids.push(c.app_id.clone());
            w.bytes += c.size;
            if c.replaces && w.b_table.version().is_some() {
                // Parsed after every unit has started: it must not hold the budget (read again).
                w.replacing.push(c);
                continue;
            }
            let kib = size.div_ceil(1024).max(1);
            if kib <= budget_kib as u64 {
                let kib = kib as u32;
                let permit = match memory.clone().try_acquire_many_owned(kib) {
                    Ok(p) => p,
                    Err(_) => {
                        // The budget is spent: the files held wait in units, so start the one
                        // being filled (it could otherwise wait for this very file), then wait.
                        w.units.start(
                            &starter,
                            writing.as_ref(),
                            &w.b_done,
                            &mut unit,
                            &mut unit_size,
                        );
                        memory
                            .clone()
                            .acquire_many_owned(kib)
                            .await
                            .map_err(|e| Error::task("ingest task", e))?
                    }
                };
                c.data = Some(data);
                c.permit = Some(permit);
            }
            if writing.is_none() {
                if w.b_table.version().is_some() && !same_columns(&w.b_table, &schema) {
                    // The contract changed: evolve the table's schema first (a commit with no data).
                    let (_, t) = append_to(
                        w.b_table.clone(),
                        &w.bt,
                        vec![RecordBatch::new_empty(schema.clone())],
                        self.bronze_opts(Vec::new(), None, &w.meta),
                    )
                    .await?;
                    w.b_table = t;
                }
                writing = Some(self.writer_setup(&w.b_table, &schema));
            }
            w.b_done
                .extend(committed_app_ids(&w.b_table, std::slice::from_ref(&c.app_id)).await?);
            unit_size += c.size;
            unit.push(c);
            if unit_size >= unit_bytes {
                w.units.start(
                    &starter,
                    writing.as_ref(),
                    &w.b_done,
                    &mut unit,
                    &mut unit_size,
                );
            }
        }
        w.units.start(
            &starter,
            writing.as_ref(),
            &w.b_done,
            &mut unit,
            &mut unit_size,
        );
        Ok(())
    }

    /// What to do with the landing file `rel` whose content hashes to `sha`, by what the
    /// ledger knows of it and the source's file policies.
    fn classify(&mut self, rel: &str, meta: &ObjectMeta, sha: &str) -> Verdict {
        let entry = |status: FileStatus, detail: Option<String>| LedgerEntry {
            source: self.src.name.clone(),
            path: rel.to_string(),
            size: meta.size as i64,
            e_tag: meta.e_tag.clone(),
            sha256: sha.to_string(),
            status,
            rows: 0,
            quarantined: 0,
            batch_id: self.batch_id.to_string(),
            ingested_at: self.ingested_at,
            detail,
        };
        let sr = &mut self.report;
        let previous = self.by_path.get(rel);
        if let Some(prev) = previous
            && (prev.sha256 == sha
                || (prev.status == FileStatus::Rewritten
                    && self
                        .rewritten
                        .get(rel)
                        .is_some_and(|v| v.iter().any(|h| h == sha))))
        {
            // Same content, new etag (touched or copied again): remember the new etag.
            sr.files_already_ingested += 1;
            let mut e = entry(prev.status, prev.detail.clone());
            e.rows = prev.rows;
            e.quarantined = prev.quarantined;
            return Verdict::Record(e);
        }
        if let Some(other) = self.by_sha.get(sha)
            && self.src.on_duplicate_file == DuplicateFilePolicy::Skip
        {
            sr.files_duplicate += 1;
            sr.warnings.push(format!(
                "{rel}: same content as {other}, already ingested; skipped (on_duplicate_file = \"skip\")"
            ));
            return Verdict::Record(entry(
                FileStatus::Duplicate,
                Some(format!("same content as {other}")),
            ));
        }
        let Some(prev) = previous else {
            return Verdict::Ingest { replaces: false };
        };
        sr.files_changed += 1;
        match self.src.on_changed_file {
            ChangedFilePolicy::Skip => {
                sr.warnings.push(format!(
                    "{rel}: content changed since it was ingested (batch {}); skipped (on_changed_file = \"skip\")",
                    prev.batch_id
                ));
                Verdict::Record(entry(
                    FileStatus::Skipped,
                    Some(format!("changed; previous sha256 {}", prev.sha256)),
                ))
            }
            ChangedFilePolicy::Error => {
                sr.files_rejected += 1;
                self.rejected.push(Error::Input {
                    location: crate::error::InputLocation {
                        file: rel.to_string(),
                        line: 1,
                        column: None,
                    },
                    message: format!(
                        "the file changed since it was ingested in batch {}",
                        prev.batch_id
                    ),
                    fix: format!(
                        "deliver corrections under a new file name, or set on_changed_file = \"ingest\", \"replace\" or \"skip\" in {}",
                        self.src.file
                    ),
                });
                Verdict::Refused
            }
            ChangedFilePolicy::Ingest => {
                sr.warnings.push(format!(
                    "{rel}: content changed since it was ingested (batch {}); ingesting it as a new file",
                    prev.batch_id
                ));
                Verdict::Ingest { replaces: false }
            }
            ChangedFilePolicy::Replace => {
                sr.warnings.push(format!(
                    "{rel}: content changed since it was ingested (batch {}); replacing its rows",
                    prev.batch_id
                ));
                Verdict::Ingest { replaces: true }
            }
        }
    }

    /// Files that replace an earlier version of themselves: one at a time, each its own
    /// commit per table that swaps that file's rows (rare; held in memory). The streamed
    /// units keep running meanwhile; they only write files.
    async fn replace_files(&mut self, w: &mut ChunkWork) -> Result<()> {
        for c in std::mem::take(&mut w.replacing) {
            let data = read_candidate(self.landing, &c).await?;
            let st = w.stamp.clone();
            let rel = c.rel.clone();
            let parsed = tokio::task::spawn_blocking(move || st.parse(&data, &rel))
                .await
                .unwrap_or_else(|e| Err(Error::task("parser task", e)));
            if let Some(p) = &self.progress {
                p.advance(c.size);
            }
            let p = match parsed {
                Err(e @ (Error::Input { .. } | Error::Config { .. })) => {
                    self.report.files_rejected += 1;
                    self.by_sha.remove(&c.sha);
                    self.rejected.push(e);
                    continue;
                }
                Err(e) => return Err(e),
                Ok(p) => p,
            };
            if !w.q_done.contains(&c.app_id) {
                let q = p
                    .quarantine
                    .clone()
                    .unwrap_or_else(|| RecordBatch::new_empty(quarantine_schema()));
                let replace = w.q_table.version().is_some().then(|| c.rel.clone());
                if replace.is_some() || q.num_rows() > 0 {
                    let opts = self.quarantine_opts(vec![c.app_id.clone()], replace, &w.meta);
                    w.q_table = append_to(w.q_table.clone(), &w.qt, vec![q], opts).await?.1;
                }
            }
            if !w.b_done.contains(&c.app_id) {
                let mut b = p.bronze;
                if b.is_empty() {
                    b.push(w.stamp.bronze_batch(
                        &RecordBatch::new_empty(self.contract_schema()),
                        &[],
                        &c.rel,
                    )?);
                }
                let opts = self.bronze_opts(vec![c.app_id.clone()], Some(c.rel.clone()), &w.meta);
                let (_, t) = append_to(w.b_table.clone(), &w.bt, b, opts).await?;
                self.report.bronze_version = t.version();
                w.b_table = t;
            }
            self.report.warnings.extend(p.warnings);
            if let Some(s) = p.stats {
                w.stats.merge(s);
            }
            w.done.push(Done {
                rows: p.rows,
                rejects: p.rejects,
                c,
            });
        }
        Ok(())
    }

    /// The streamed units: each parsed and encoded its files into Parquet files uploaded as
    /// they filled; one commit adds them all to bronze with one Delta `txn` per file, then one
    /// commit adds their refused rows (with their raw records) to the quarantine.
    async fn commit_streamed(&mut self, w: &mut ChunkWork, phase: Instant) -> Result<()> {
        let mut adds: Vec<deltalake::kernel::Add> = Vec::new();
        let mut quarantine: Vec<(String, RecordBatch)> = Vec::new();
        let mut stream_ids: Vec<String> = Vec::new();
        for r in std::mem::take(&mut w.units).join().await {
            let r = r?;
            adds.extend(r.adds);
            if let Some(s) = r.stats {
                w.stats.merge(s);
            }
            for f in r.files {
                let p = match f.outcome {
                    Err(e) => {
                        self.report.files_rejected += 1;
                        self.by_sha.remove(&f.c.sha);
                        self.rejected.push(e);
                        continue;
                    }
                    Ok(p) => p,
                };
                self.report.warnings.extend(p.warnings);
                if p.rows > 0 && !w.b_done.contains(&f.c.app_id) {
                    stream_ids.push(f.c.app_id.clone());
                }
                if let Some(q) = p.quarantine
                    && !w.q_done.contains(&f.c.app_id)
                {
                    quarantine.push((f.c.app_id.clone(), q));
                }
                w.done.push(Done {
                    rows: p.rows,
                    rejects: p.rejects,
                    c: f.c,
                });
            }
        }
        tracing::info!(
            source = %self.src.name,
            files = adds.len(),
            ms = phase.elapsed().as_millis() as u64,
            "parsed, encoded and uploaded"
        );
        w.meta
            .push(("silt.files".into(), serde_json::Value::from(w.done.len())));
        if !adds.is_empty() {
            let t = commit_files(
                w.b_table.clone(),
                &w.bt,
                &w.stamp.bronze_schema(),
                adds,
                stream_ids,
                &self.bronze_opts(Vec::new(), None, &w.meta),
            )
            .await?;
            self.report.bronze_version = t.version();
        }
        failpoint::hit("ingest.after_bronze");
        tracing::info!(source = %self.src.name, ms = phase.elapsed().as_millis() as u64, "bronze committed");
        if !quarantine.is_empty() {
            let ids = quarantine.iter().map(|(id, _)| id.clone()).collect();
            let batches = quarantine.into_iter().map(|(_, b)| b).collect();
            let opts = self.quarantine_opts(ids, None, &w.meta);
            append_to(w.q_table.clone(), &w.qt, batches, opts).await?;
        }
        failpoint::hit("ingest.after_quarantine");
        Ok(())
    }

    /// The ledger: every file of the chunk, in one commit, last (a file is in the ledger only
    /// once its rows are in bronze and the quarantine).
    async fn record_ledger(&mut self, w: &mut ChunkWork) -> Result<()> {
        for d in &w.done {
            let sr = &mut self.report;
            sr.files_ingested += 1;
            sr.rows += d.rows;
            sr.quarantined += d.rejects;
            sr.bytes += d.c.size;
            let empty = d.rows == 0 && d.rejects == 0;
            if empty {
                sr.files_empty += 1;
            }
            let e = LedgerEntry {
                source: self.src.name.clone(),
                path: d.c.rel.clone(),
                size: d.c.meta.size as i64,
                e_tag: d.c.meta.e_tag.clone(),
                sha256: d.c.sha.clone(),
                status: if empty {
                    FileStatus::Empty
                } else {
                    FileStatus::Ingested
                },
                rows: d.rows as i64,
                quarantined: d.rejects as i64,
                batch_id: self.batch_id.to_string(),
                ingested_at: self.ingested_at,
                detail: d
                    .c
                    .replaces
                    .then(|| "replaced the rows of the earlier version".to_string()),
            };
            self.by_path.insert(e.path.clone(), e.clone());
            w.ledger.push(e);
        }
        ledger::record(self.catalog.lake(), &w.ledger, self.batch_id).await
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

    /// The writer every unit of a chunk uses, for the table as it is now (its schema and
    /// partition columns; the contract's when the table does not exist yet).
    fn writer_setup(&self, b_table: &deltalake::DeltaTable, schema: &Arc<Schema>) -> WriterSetup {
        let (table_schema, partition_columns) = match b_table.snapshot() {
            Ok(s) => (
                s.snapshot().arrow_schema(),
                s.metadata().partition_columns().to_vec(),
            ),
            Err(_) => (
                schema.clone(),
                self.src.partition.iter().map(|p| p.column_name()).collect(),
            ),
        };
        let mut config: HashMap<String, Option<String>> = HashMap::new();
        config.insert(
            "delta.dataSkippingStatsColumns".into(),
            Some(self.stats_columns().join(",")),
        );
        let partition_column = match partition_columns.as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        };
        let (num_indexed, stats_cols) =
            deltalake::operations::get_num_idx_cols_and_stats_columns(None, config);
        WriterSetup {
            config: deltalake::datafile::writer::WriterConfig::new(
                table_schema,
                partition_columns,
                Some(writer_properties(self.src)),
                NonZeroU64::new(self.cfg.target_file_size),
                Some(32 * 1024),
                num_indexed,
                stats_cols,
            ),
            store: b_table.log_store().object_store(None),
            partition_column,
        }
    }

    /// Columns with min/max statistics: every column but the declared PII and the column that
    /// leads to a subject (its subject key or subject_via column): an erased id must not
    /// survive in the statistics of a log entry or a checkpoint.
    fn stats_columns(&self) -> Vec<String> {
        let subject = self.src.subject_key.as_ref().or(self
            .src
            .subject_via
            .as_ref()
            .map(|v| &v.column));
        let mut cols: Vec<String> = self
            .src
            .columns
            .iter()
            .filter(|c| !self.src.pii.contains(&c.name) && subject != Some(&c.name))
            .map(|c| c.name.clone())
            .collect();
        cols.extend(
            ["_source_file", "_source_line", "_ingested_at", "_batch_id"].map(String::from),
        );
        cols
    }
}

/// What the parser tasks need to turn a landing file into table rows: the source, and the
/// batch id and time stamped on every row.
#[derive(Clone)]
struct Stamp {
    src: Arc<Source>,
    batch_id: Arc<str>,
    ingested_at: i64,
}

/// One landing file turned into table rows.
struct Parsed {
    /// Bronze rows (contract columns, the partition column, the metadata columns) when they
    /// were kept ([`Stamp::parse`]); empty when they went to a sink.
    bronze: Vec<RecordBatch>,
    quarantine: Option<RecordBatch>,
    rows: u64,
    rejects: u64,
    warnings: Vec<String>,
    /// Statistics for the anomaly checks (only when the source declares them).
    stats: Option<BatchStats>,
}

impl Stamp {
    /// The whole file's bronze rows in memory (the rare replace path).
    fn parse(&self, data: &[u8], rel: &str) -> Result<Parsed> {
        let mut bronze = Vec::new();
        let mut p = self.parse_with(data, rel, self.src.anomaly.is_some(), &mut |b| {
            bronze.push(b);
            Ok(())
        })?;
        p.bronze = bronze;
        Ok(p)
    }

    /// Parse a file slice by slice, handing each slice's bronze rows to `sink` (slices without
    /// rows are not handed on). Statistics are merged across slices.
    fn parse_with(
        &self,
        data: &[u8],
        rel: &str,
        want_stats: bool,
        sink: &mut dyn FnMut(RecordBatch) -> Result<()>,
    ) -> Result<Parsed> {
        let t0 = Instant::now();
        let date_column = self
            .src
            .anomaly
            .as_ref()
            .and_then(|a| a.date_column.as_deref());
        let mut rows = 0u64;
        let mut stats: Option<BatchStats> = None;
        let p = parse_file_in_slices(data, rel, &self.src, SLICE_ROWS, &mut |s: Slice| {
            let n = s.batch.num_rows();
            if n == 0 {
                return Ok(());
            }
            rows += n as u64;
            if want_stats {
                let st = BatchStats::of(&s.batch, date_column)?;
                match &mut stats {
                    Some(all) => all.merge(st),
                    None => stats = Some(st),
                }
            }
            sink(self.bronze_batch(&s.batch, &s.lines, rel)?)
        })?;
        let quarantine = (!p.rejects.is_empty())
            .then(|| self.quarantine_batch(&p.rejects, rel))
            .transpose()?;
        tracing::debug!(
            file = rel,
            rows,
            ms = t0.elapsed().as_millis() as u64,
            "parsed"
        );
        Ok(Parsed {
            bronze: Vec::new(),
            quarantine,
            rows,
            rejects: p.rejects.len() as u64,
            warnings: p.warnings,
            stats,
        })
    }

    /// The schema of [`Stamp::bronze_batch`]'s output.
    fn bronze_schema(&self) -> Arc<Schema> {
        let mut fields: Vec<Field> = self
            .src
            .columns
            .iter()
            .map(|c| c.to_arrow_field())
            .collect();
        if let Some(p) = &self.src.partition
            && p.granularity.is_some()
        {
            fields.push(Field::new(p.column_name(), DataType::Utf8, true));
        }
        fields.extend(metadata_fields());
        Arc::new(Schema::new(fields))
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
            // Rows of a file mostly share a partition: a value is formatted only when a row's
            // day falls outside the period of the row before (an integer range check per row).
            let mut period: Option<(i32, i32, String)> = None; // [first day, end day), text
            let mut values = arrow::array::StringBuilder::with_capacity(n, n * 8);
            let mut push = |day: Option<i32>| {
                let Some(day) = day else {
                    values.append_null();
                    return;
                };
                if !period
                    .as_ref()
                    .is_some_and(|(lo, hi, _)| (*lo..*hi).contains(&day))
                {
                    period = partition_period(day, g);
                }
                match &period {
                    Some((_, _, text)) => values.append_value(text),
                    None => values.append_null(), // outside chrono's calendar
                }
            };
            match arr.data_type() {
                DataType::Date32 => arr.as_primitive::<Date32Type>().iter().for_each(&mut push),
                _ => {
                    const DAY_MICROS: i64 = 86_400_000_000;
                    for t in arr.as_primitive::<TimestampMicrosecondType>().iter() {
                        push(t.and_then(|t| i32::try_from(t.div_euclid(DAY_MICROS)).ok()))
                    }
                }
            }
            let values = values.finish();
            fields.push(Field::new(p.column_name(), DataType::Utf8, true));
            cols.push(Arc::new(values));
        }
        fields.extend(metadata_fields());
        cols.push(Arc::new(repeated(rel, n)));
        cols.push(Arc::new(Int64Array::from(lines.to_vec())));
        cols.push(Arc::new(
            TimestampMicrosecondArray::from_value(self.ingested_at, n).with_timezone("UTC"),
        ));
        cols.push(Arc::new(repeated(&self.batch_id, n)));
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
                    &*self.batch_id,
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

/// What every unit of one chunk writes with.
struct WriterSetup {
    config: deltalake::datafile::writer::WriterConfig,
    store: deltalake::logstore::ObjectStoreRef,
    /// The table's partition column (silt partitions bronze by at most one).
    partition_column: Option<String>,
}

/// The units of a chunk in flight, joined in the order they started. Dropped early (the
/// chunk failed), it aborts them: they have only written files no commit refers to.
#[derive(Default)]
struct Units(Vec<tokio::task::JoinHandle<Result<UnitResult>>>);

/// What every unit of a chunk shares, besides the writer.
struct UnitStarter {
    stamp: Stamp,
    landing: Storage,
    progress: Option<SharedProgress>,
    want_stats: bool,
    /// One per core: a unit waits for one before reading its files.
    permits: Arc<tokio::sync::Semaphore>,
}

impl Units {
    /// Start the unit being filled, if it holds a file, and leave it empty (`size`: its bytes;
    /// `b_done`: the files bronze already holds, from an interrupted run).
    fn start(
        &mut self,
        s: &UnitStarter,
        w: Option<&WriterSetup>,
        b_done: &[String],
        unit: &mut Vec<Candidate>,
        size: &mut u64,
    ) {
        if unit.is_empty() {
            return;
        }
        let unit = std::mem::take(unit);
        *size = 0;
        let w = w.expect("the writer is set up before the first unit");
        let job = UnitJob {
            stamp: s.stamp.clone(),
            landing: s.landing.clone(),
            store: w.store.clone(),
            config: w.config.clone(),
            b_done: b_done.to_vec(),
            want_stats: s.want_stats,
            progress: s.progress.clone(),
            partition_column: w.partition_column.clone(),
        };
        let permits = s.permits.clone();
        self.0.push(tokio::spawn(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .map_err(|e| Error::task("ingest task", e))?;
            job.run(unit).await
        }));
    }

    async fn join(mut self) -> Vec<Result<UnitResult>> {
        let mut out = Vec::new();
        for h in std::mem::take(&mut self.0) {
            out.push(
                h.await
                    .unwrap_or_else(|e| Err(Error::task("ingest task", e))),
            );
        }
        out
    }
}

impl Drop for Units {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// One unit of consecutive landing files for one parser task: parse each, write its good rows
/// through a delta-rs `DeltaWriter` (Parquet files roll at the target size and upload as they
/// fill), keep its refused rows for the quarantine commit.
struct UnitJob {
    stamp: Stamp,
    landing: Storage,
    store: deltalake::logstore::ObjectStoreRef,
    config: deltalake::datafile::writer::WriterConfig,
    /// Files whose rows an earlier, interrupted ingest already committed to bronze.
    b_done: Vec<String>,
    want_stats: bool,
    progress: Option<SharedProgress>,
    /// The table's partition column (silt partitions bronze by at most one).
    partition_column: Option<String>,
}

struct UnitFile {
    c: Candidate,
    /// Err: the file is refused as a whole (stays out of the ledger).
    outcome: Result<Parsed>,
}

struct UnitResult {
    adds: Vec<deltalake::kernel::Add>,
    files: Vec<UnitFile>,
    stats: Option<BatchStats>,
}

impl UnitJob {
    async fn run(self, unit: Vec<Candidate>) -> Result<UnitResult> {
        let mut writer =
            deltalake::datafile::writer::DeltaWriter::new(self.store.clone(), self.config.clone());
        let mut files = Vec::new();
        let mut stats: Option<BatchStats> = None;
        let mut failed: Option<Error> = None;
        for mut c in unit {
            let data = match read_candidate(&self.landing, &c).await {
                Ok(d) => d,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            c.data = None; // the parser's copy is the last one
            let permit = c.permit.take(); // released once the parser drops its copy

            // The parser hands slices over a short channel while this task encodes the ones
            // before: a file is never whole in memory, and parsing overlaps encoding.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<RecordBatch>(2);
            let st = self.stamp.clone();
            let rel = c.rel.clone();
            let want = self.want_stats;
            let parser = tokio::task::spawn_blocking(move || {
                let parsed = st.parse_with(&data, &rel, want, &mut |b| {
                    tx.blocking_send(b)
                        .map_err(|_| Error::task("the bronze writer", "it stopped"))
                });
                drop(data);
                drop(permit);
                parsed
            });
            // Rows an earlier, interrupted ingest already committed are parsed (for the ledger
            // and the quarantine) but not written again.
            let write = !self.b_done.contains(&c.app_id);
            let mut slices = 0usize;
            let mut write_failed = None;
            while let Some(b) = rx.recv().await {
                slices += 1;
                if write
                    && let Err(e) =
                        write_bronze(&mut writer, self.partition_column.as_deref(), b).await
                {
                    write_failed = Some(Error::delta(format!("bronze.{}", self.stamp.src.name), e));
                    break;
                }
            }
            drop(rx); // a parser still sending stops
            let parsed = parser
                .await
                .unwrap_or_else(|e| Err(Error::task("parser task", e)));
            if let Some(e) = write_failed {
                failed = Some(e);
                break;
            }
            if let Some(p) = &self.progress {
                p.advance(c.size);
            }
            let mut parsed = match parsed {
                // Refused as a whole: parsers refuse before their first slice, so the writer
                // holds none of its rows.
                Err(e @ (Error::Input { .. } | Error::Config { .. })) if slices == 0 => {
                    files.push(UnitFile { c, outcome: Err(e) });
                    continue;
                }
                // Refused after rows went to the writer (a parser broke its promise): fail
                // the unit, so nothing of it is committed.
                Err(e) => {
                    failed = Some(e);
                    break;
                }
                Ok(p) => p,
            };
            if let Some(s) = parsed.stats.take() {
                match &mut stats {
                    Some(all) => all.merge(s),
                    None => stats = Some(s),
                }
            }
            files.push(UnitFile {
                c,
                outcome: Ok(parsed),
            });
        }
        if let Some(e) = failed {
            let _ = writer.abort().await;
            return Err(e);
        }
        let adds = writer
            .close()
            .await
            .map_err(|e| Error::delta(format!("bronze.{}", self.stamp.src.name), e))?;
        Ok(UnitResult { adds, files, stats })
    }
}

/// Hand a file's good rows to the writer. Rows of a landing file nearly always share one
/// partition value; then the batch goes straight to that partition's writer, skipping the
/// general split (a sort and a copy of every column).
async fn write_bronze(
    writer: &mut deltalake::datafile::writer::DeltaWriter,
    partition_column: Option<&str>,
    batch: RecordBatch,
) -> deltalake::DeltaResult<()> {
    use arrow::array::Array;
    if let Some(name) = partition_column
        && let Ok(i) = batch.schema().index_of(name)
        && let Some(values) = batch.column(i).as_string_opt::<i32>()
        && !values.is_empty()
    {
        let one = if values.null_count() == values.len() {
            true
        } else if values.null_count() == 0 {
            let first = values.value(0);
            values.iter().all(|v| v == Some(first))
        } else {
            false
        };
        if one {
            use deltalake::kernel::scalars::ScalarExt;
            let value = ScalarExt::from_array(values, 0).ok_or_else(|| {
                deltalake::DeltaTableError::generic("partition value not readable as a scalar")
            })?;
            let key = indexmap::IndexMap::from([(name.to_string(), value)]);
            return writer.write_partition(batch, &key).await;
        }
    }
    writer.write(&batch).await
}

/// The partition period holding `day` (days since the epoch): its first day, the day after
/// its last, and its partition value (`YYYY`, `YYYY-MM` or `YYYY-MM-DD`).
fn partition_period(day: i32, g: Granularity) -> Option<(i32, i32, String)> {
    use chrono::{Datelike, NaiveDate};
    let epoch = crate::project::contract::UNIX_EPOCH_DAYS_FROM_CE;
    let d = NaiveDate::from_num_days_from_ce_opt(day.checked_add(epoch)?)?;
    let (first, next, text) = match g {
        Granularity::Year => (
            NaiveDate::from_ymd_opt(d.year(), 1, 1)?,
            NaiveDate::from_ymd_opt(d.year() + 1, 1, 1),
            format!("{:04}", d.year()),
        ),
        Granularity::Month => (
            NaiveDate::from_ymd_opt(d.year(), d.month(), 1)?,
            if d.month() == 12 {
                NaiveDate::from_ymd_opt(d.year() + 1, 1, 1)
            } else {
                NaiveDate::from_ymd_opt(d.year(), d.month() + 1, 1)
            },
            format!("{:04}-{:02}", d.year(), d.month()),
        ),
        Granularity::Day => (
            d,
            d.succ_opt(),
            format!("{:04}-{:02}-{:02}", d.year(), d.month(), d.day()),
        ),
    };
    let lo = first.num_days_from_ce() - epoch;
    // The last day chrono knows ends a period of its own.
    let hi = next.map_or(lo + 1, |n| n.num_days_from_ce() - epoch);
    Some((lo, hi, text))
}

/// The hex SHA-256 of a landing file's bytes, computed on the blocking pool.
async fn sha256(data: bytes::Bytes) -> Result<(bytes::Bytes, String)> {
    tokio::task::spawn_blocking(move || {
        let sha = hex::encode(Sha256::digest(&data));
        (data, sha)
    })
    .await
    .map_err(|e| Error::task("hashing task", e))
}

/// A candidate's bytes: kept from hashing, or read again (and checked against its hash).
async fn read_candidate(landing: &Storage, c: &Candidate) -> Result<bytes::Bytes> {
    if let Some(d) = &c.data {
        return Ok(d.clone());
    }
    let data = landing.get(&c.meta.location).await?;
    let (data, sha) = sha256(data).await?;
    if sha != c.sha {
        return Err(Error::Input {
            location: crate::error::InputLocation {
                file: c.rel.clone(),
                line: 1,
                column: None,
            },
            message: "the file changed while it was being ingested".into(),
            fix: "deliver landing files complete (write then rename), then run ingest again".into(),
        });
    }
    Ok(data)
}

/// Parquet settings of bronze files: LZ4 (raw; faster to write and read than Snappy, and
/// smaller here; bronze is read by silt's models, silver and gold stay Snappy for other
/// readers), dictionaries except on columns that are unique by design (the primary key, the
/// line number), where a dictionary only costs hashing. Those two are delta-encoded instead:
/// line numbers rise by one, and ids share long prefixes, so a few bits per value replace
/// plain 8-byte integers and whole strings, at the same CPU (docs/decisions/0002).
fn writer_properties(src: &Source) -> parquet::file::properties::WriterProperties {
    use parquet::basic::Encoding;
    let mut b = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::LZ4_RAW)
        // A column whose dictionary outgrows 64 KiB (ids, amounts: most values distinct) falls
        // back to plain encoding early instead of interning every value into a 1 MiB
        // dictionary: less CPU, and smaller files. Categories (currencies, notes, adviser
        // ids) stay dictionary-encoded.
        .set_dictionary_page_size_limit(64 * 1024)
        .set_column_dictionary_enabled("_source_line".into(), false)
        .set_column_encoding("_source_line".into(), Encoding::DELTA_BINARY_PACKED);
    if let [pk] = src.primary_key.as_slice() {
        b = b.set_column_dictionary_enabled(pk.as_str().into(), false);
        let encoding = match src.columns.iter().find(|c| &c.name == pk).map(|c| &c.ty) {
            Some(ColumnType::String) => Some(Encoding::DELTA_BYTE_ARRAY),
            Some(ColumnType::Int32 | ColumnType::Int64) => Some(Encoding::DELTA_BINARY_PACKED),
            _ => None, // plain
        };
        if let Some(e) = encoding {
            b = b.set_column_encoding(pk.as_str().into(), e);
        }
    }
    b.build()
}

/// Whether `table` already has exactly these columns with these types.
fn same_columns(table: &deltalake::DeltaTable, schema: &Schema) -> bool {
    let Ok(s) = table.snapshot() else {
        return false;
    };
    let have = s.snapshot().arrow_schema();
    have.fields().len() == schema.fields().len()
        && schema.fields().iter().all(|f| {
            have.field_with_name(f.name())
                .is_ok_and(|h| h.data_type() == f.data_type())
        })
}

/// `n` copies of `value`, its buffers sized exactly once.
fn repeated(value: &str, n: usize) -> StringArray {
    let len = value.len();
    let offsets = arrow::buffer::OffsetBuffer::from_repeated_length(len, n);
    StringArray::new(offsets, value.repeat(n).into_bytes().into(), None)
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
