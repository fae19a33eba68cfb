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
mod bronze;
pub mod parse;
mod source;
mod units;

/// The Parquet settings of a source's bronze files (an erasure rewrites them alike).
pub(crate) use bronze::writer_properties;
use bronze::{Parsed, Stamp, same_columns};
pub use bronze::{bronze_schema_of, quarantine_schema};
use source::{Candidate, SourceRun, sha256};
use units::{UnitStarter, Units, WriterSetup, read_candidate};

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
        // The ledger is read once for every source (each read replays its log).
        let mut ledger = if sources.is_empty() {
            HashMap::new()
        } else {
            ledger::read_all(&self.catalog).await?
        };
        for src in sources {
            let entries = ledger.remove(&src.name).unwrap_or_default();
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
            run.ingest(files, entries).await?;
            report.rejected.extend(run.rejected);
            report.sources.push(run.report);
        }
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }
}
