//! GDPR erasure, `silt forget`: find a data subject's rows in every layer, delete them where they
//! live (landing files, quarantine, bronze, history-keeping models), rebuild what was derived from
//! them (only the touched partitions of partition_overwrite models), then purge every data file
//! that still holds them and the log versions that point at those files, with an audit row per
//! step in `_silt/erasures` that carries an HMAC of each subject id, never the id. `--verify`
//! scans every object under both roots. It must not build object stores (storage.rs does) nor
//! render templates (models.rs does); model rebuilds go through materialize.rs.

mod landing;
mod needles;
mod plan;
mod purge;
mod records;
mod tables;
mod verify;

use crate::lake::rewrite::{
    self, decode_parquet, decode_parquet_for, each_in_a_task, in_tasks_ahead,
};
pub use needles::{KeySet, Needles, Scope};
use needles::{Matcher, RawScope, cells};
pub use plan::Plan;
use purge::{erasure_caught_up, log_mentions};
use records::{Records, csv_header, without_subjects};
pub use verify::verify;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use aho_corasick::AhoCorasick;
use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type, Schema};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use bytes::Bytes;
use deltalake::DeltaTable;
use deltalake::kernel::Action;
use deltalake::kernel::transaction::CommitBuilder;
use deltalake::protocol::DeltaOperation;
use futures::StreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::build::materialize::{
    BuildMode, Materializer, ModelMetrics, ModelState, ModelStatus, last_state,
};
use crate::build::models::{Dag, Materialized};
use crate::build::pseudonym::hmac_hex;
use crate::error::{Error, Result};
use crate::lake::Silt;
use crate::lake::catalog::{Layer, TableRef};
use crate::lake::failpoint;
use crate::lake::meta::erasures::{AuditRow, AuditStatus, Step, audit, audit_entries};
use crate::lake::meta::ledger::{self, FileStatus, LedgerEntry};
use crate::lake::meta::runs::RunRecord;
use crate::lake::storage::{Storage, same_path};
use crate::project::config::{ErasurePolicy, Format, Source};

/// The entry of the `started` audit row's `key_hmacs` that holds the subjects' PII values as
/// HMACs (the others are per `subject_via` source).
const PII_HMACS: &str = "*pii";

/// What forget did to one table or landing source.
#[derive(Debug, Clone, Serialize)]
pub struct TableErasure {
    pub table: String,
    pub action: Step,
    pub rows_deleted: u64,
    pub files_scanned: u64,
    pub files_rewritten: Vec<String>,
    pub files_added: u64,
    pub version: Option<u64>,
    pub files_purged: Vec<String>,
    /// Versions no longer readable: `[from, to]`.
    pub unreadable: Option<(u64, u64)>,
    pub partitions: Vec<String>,
    pub warnings: Vec<String>,
    /// Wall time of the step.
    pub elapsed_ms: u64,
    #[serde(skip)]
    started: Instant,
}

impl TableErasure {
    /// A step on `table` that has done nothing yet.
    fn new(table: String, action: Step) -> TableErasure {
        TableErasure {
            table,
            action,
            rows_deleted: 0,
            files_scanned: 0,
            files_rewritten: Vec::new(),
            files_added: 0,
            version: None,
            files_purged: Vec::new(),
            unreadable: None,
            partitions: Vec::new(),
            warnings: Vec::new(),
            elapsed_ms: 0,
            started: Instant::now(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ForgetReport {
    pub request_id: String,
    pub resumed: bool,
    /// Sources declaring PII that forget did not search (no path to a subject), and landing
    /// entries it could not read.
    pub warnings: Vec<String>,
    /// Whether any record matched a subject; false: nothing changed (audited as a no-op).
    pub matched: bool,
    pub subjects: Vec<String>,
    pub steps: Vec<TableErasure>,
    pub rows_deleted: u64,
    pub files_purged: u64,
    pub elapsed_ms: u64,
}

/// One finding of `--verify`.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub location: String,
    pub kind: String,
    pub column: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub objects_scanned: u64,
    pub parquet_files: u64,
    pub findings: Vec<Finding>,
    /// Landing entries that could not be read (not scanned: they may hold a subject).
    pub unreadable: Vec<String>,
}

fn key_of(silt: &Silt) -> Result<String> {
    match silt.project.file.gdpr.hmac_key.as_deref() {
        Some(k) if !k.is_empty() => Ok(k.to_string()),
        _ => Err(Error::config(
            "silt.toml",
            "silt forget needs an HMAC key for the audit log: set [gdpr] hmac_key or SILT_GDPR_HMAC_KEY",
        )),
    }
}

/// Every parquet data file under a table, live or retained, as (path in table, object path).
async fn data_files(silt: &Silt, t: &TableRef) -> Result<Vec<(String, object_store::path::Path)>> {
    let rel = t.rel_path();
    let mut out = Vec::new();
    for o in silt.lake.list(&rel).await? {
        let Some(full) = silt.lake.relative(&o.location) else {
            continue;
        };
        let Some(inner) = full.strip_prefix(&format!("{rel}/")) else {
            continue;
        };
        if inner.starts_with("_delta_log/") || !inner.ends_with(".parquet") {
            continue;
        }
        out.push((inner.to_string(), o.location));
    }
    Ok(out)
}

/// `silt forget`.
pub struct ForgetBuilder<'a> {
    silt: &'a Silt,
    ids: Vec<String>,
    reason: Option<String>,
}

impl<'a> ForgetBuilder<'a> {
    pub fn new(silt: &'a Silt, ids: Vec<String>) -> Self {
        ForgetBuilder {
            silt,
            ids,
            reason: None,
        }
    }

    pub fn with_reason(mut self, reason: Option<String>) -> Self {
        self.reason = reason;
        self
    }

    pub async fn execute(self) -> Result<ForgetReport> {
        let started = Instant::now();
        let silt = self.silt;
        let key = key_of(silt)?;
        if self.ids.iter().all(|i| i.trim().is_empty()) {
            return Err(Error::Usage(
                "give at least one subject id (or --file ids.txt)".into(),
            ));
        }
        let dag = Dag::load(&silt.project)?;
        let mut hmacs: Vec<String> = self.ids.iter().map(|i| hmac_hex(&key, i.trim())).collect();
        hmacs.sort();
        hmacs.dedup();
        let subjects = hmacs.join(",");
        let (plan, mut report) = self.start(&dag, &key, hmacs, &subjects).await?;
        failpoint::hit("forget.started");
        let mut run = Run {
            silt,
            n: plan.needles.clone(),
            request: report.request_id.clone(),
            subjects: subjects.clone(),
            steps: Vec::new(),
            seen: HashMap::new(),
            headers: HashMap::new(),
        };
        run.erase(&dag, &plan, &key, &mut report).await?;
        failpoint::hit("forget.before_complete");
        report.steps = run.steps;
        report.rows_deleted = report
            .steps
            .iter()
            .filter(|s| s.action != Step::Rebuild)
            .map(|s| s.rows_deleted)
            .sum();
        report.files_purged = report
            .steps
            .iter()
            .map(|s| s.files_purged.len() as u64)
            .sum();
        report.matched = report.rows_deleted > 0 || report.files_purged > 0;
        let mut done_row = self.audit_row(&report.request_id, AuditStatus::Completed, &subjects);
        done_row.rows_deleted = report.rows_deleted as i64;
        done_row.files_purged = report.files_purged as i64;
        done_row.files_rewritten = report
            .steps
            .iter()
            .map(|s| s.files_rewritten.len() as i64)
            .sum();
        done_row.detail = Some(format!(
            "{} step(s){}{}",
            report.steps.len(),
            if report.resumed { "; resumed" } else { "" },
            if report.matched {
                ""
            } else {
                "; no-op: no record matched the subjects"
            }
        ));
        audit(&silt.lake, &[done_row]).await?;
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// An audit row of this request.
    fn audit_row(&self, request_id: &str, status: AuditStatus, subjects: &str) -> AuditRow {
        AuditRow {
            request_id: request_id.to_string(),
            status,
            subjects: subjects.to_string(),
            reason: self.reason.clone(),
            at: chrono::Utc::now().timestamp_micros(),
            ..Default::default()
        }
    }

    /// Resume an interrupted request for the same subjects, or start one (audited as
    /// started, with the HMACs of the keys and PII values it will look for). The scope comes
    /// first: a source holding subject data without a declared path stops the request before
    /// anything is written.
    async fn start(
        &self,
        dag: &Dag,
        key: &str,
        hmacs: Vec<String>,
        subjects: &str,
    ) -> Result<(Plan, ForgetReport)> {
        let silt = self.silt;
        let entries = audit_entries(&silt.catalog).await?;
        let done: HashSet<&str> = entries
            .iter()
            .filter(|e| e.status == AuditStatus::Completed)
            .map(|e| e.request_id.as_str())
            .collect();
        let pending = entries.iter().find(|e| {
            e.status == AuditStatus::Started
                && e.subject_hmacs == subjects
                && !done.contains(e.request_id.as_str())
        });
        let stored = pending.map(|p| p.key_hmacs.clone()).unwrap_or_default();
        let plan = Plan::resolve(silt, dag, &self.ids, key, &stored).await?;
        let mut report = ForgetReport {
            subjects: hmacs,
            warnings: plan.warnings.clone(),
            ..Default::default()
        };
        match pending {
            Some(p) => {
                report.request_id = p.request_id.clone();
                report.resumed = true;
            }
            None => {
                report.request_id = uuid::Uuid::now_v7().to_string();
                let mut started =
                    self.audit_row(&report.request_id, AuditStatus::Started, subjects);
                let mut recorded = plan.derived_hmacs.clone();
                if !plan.pii_hmacs.is_empty() {
                    recorded.insert(PII_HMACS.into(), plan.pii_hmacs.clone());
                }
                if !recorded.is_empty() {
                    started.key_hmacs = serde_json::to_string(&recorded).ok();
                }
                audit(&silt.lake, &[started]).await?;
            }
        }
        Ok((plan, report))
    }
}

impl Run<'_> {
    /// The erasure's steps, in order: landing files, the sources' quarantine and bronze in
    /// place, the models, then the purge of every older file still holding a subject.
    async fn erase(
        &mut self,
        dag: &Dag,
        plan: &Plan,
        key: &str,
        report: &mut ForgetReport,
    ) -> Result<()> {
        let silt = self.silt;
        // 1. Landing files of the sources in scope (PII values are still in bronze to find
        //    them by).
        let (listed, skipped) = silt.landing.list_landing().await?;
        report.warnings.extend(skipped);
        for name in &plan.sources {
            let src = &silt.project.sources[name];
            let keys = plan.keys_of(name).expect("a source in scope has keys");
            self.landing(src, keys, &listed).await?;
        }
        // 2. Quarantine and bronze of the sources in scope, in place.
        for name in &plan.sources {
            let t = TableRef::quarantine(name);
            if let Some(m) = plan.matcher(&t, self.headers.get(name).unwrap_or(&HashMap::new())) {
                self.rewrite(&t, &m, None).await?;
            }
            failpoint::hit("forget.table");
        }
        for name in &plan.sources {
            let t = TableRef::bronze(name);
            if let Some(m) = plan.matcher(&t, &HashMap::new()) {
                self.rewrite(&t, &m, None).await?;
            }
            failpoint::hit("forget.table");
        }
        // 3. Models in dag order: history-keeping ones with a key column in place (their build
        //    state follows upstream erasures); every other model reading a table in scope is
        //    rebuilt the normal way, so partition_overwrite models redo only the partitions
        //    that changed.
        let started_at = chrono::Utc::now().timestamp_micros();
        let rebuilt = self.models(dag, plan, key).await?;
        // The model steps appear in `silt runs` as a run of their own.
        if !rebuilt.is_empty() {
            let rows = rebuilt.iter().map(RunRecord::from).collect();
            crate::lake::meta::runs::record(
                &silt.catalog,
                &format!("erasure-{}", report.request_id),
                "forget",
                started_at,
                rows,
            )
            .await?;
        }
        // 4. Purge every file still holding a subject and the log versions that point at them:
        //    models first, then the sources, children before the parents their keys are
        //    derived from (a resumed request still finds the children's rows).
        let mut tables: Vec<TableRef> = Vec::new();
        for (name, _) in plan.models.iter().rev() {
            tables.push(dag.models[name].table());
        }
        for name in plan.sources.iter().rev() {
            tables.push(TableRef::quarantine(name));
            tables.push(TableRef::bronze(name));
        }
        for t in tables {
            let headers = self.headers.get(&t.name).cloned().unwrap_or_default();
            if let Some(m) = plan.matcher(&t, &headers) {
                self.purge(&t, &m).await?;
            }
        }
        Ok(())
    }
}

struct Run<'a> {
    silt: &'a Silt,
    /// Shared with the tasks that scan and rewrite files: one automaton per request.
    n: Arc<Needles>,
    request: String,
    subjects: String,
    steps: Vec<TableErasure>,
    /// Per table, what this request's in-place rewrite already knows of its files: the ones it
    /// found holding a subject (and removed), and the ones it found or wrote without any. The
    /// purge dooms the first and skips the second instead of decoding them again; files the
    /// rewrite never saw (older versions, a resumed request) are scanned.
    seen: HashMap<String, SeenFiles>,
    /// Per source, the header of each CSV landing file (its quarantine's raw records are read
    /// by it).
    headers: HashMap<String, HashMap<String, Vec<String>>>,
}

/// Files of one table the rewrite judged with the same needles and match as the purge.
#[derive(Default)]
struct SeenFiles {
    hit: HashSet<String>,
    clean: HashSet<String>,
}

impl Run<'_> {
    /// Record a finished step (its wall time measured from its creation).
    fn push_step(&mut self, mut step: TableErasure) {
        step.elapsed_ms = step.started.elapsed().as_millis() as u64;
        self.steps.push(step);
    }

    async fn step_audit(&self, s: &TableErasure) -> Result<()> {
        audit(
            &self.silt.lake,
            &[AuditRow {
                request_id: self.request.clone(),
                status: s.action.into(),
                subjects: self.subjects.clone(),
                table: Some(s.table.clone()),
                rows_deleted: s.rows_deleted as i64,
                files_rewritten: s.files_rewritten.len() as i64,
                files_purged: s.files_purged.len() as i64,
                version: s.version.map(|v| v as i64),
                unreadable_from: s.unreadable.map(|u| u.0 as i64),
                unreadable_to: s.unreadable.map(|u| u.1 as i64),
                detail: (!s.partitions.is_empty())
                    .then(|| format!("partitions {}", s.partitions.join(","))),
                at: chrono::Utc::now().timestamp_micros(),
                ..Default::default()
            }],
        )
        .await
    }
}
