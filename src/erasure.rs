//! GDPR erasure, `silt forget`: find a data subject's rows in every layer, delete them where they
//! live (landing files, quarantine, bronze, history-keeping models), rebuild what was derived from
//! them (only the touched partitions of partition_overwrite models), then purge every data file
//! that still holds them and the log versions that point at those files, with an audit row per
//! step in `_silt/erasures` that carries an HMAC of each subject id, never the id. `--verify`
//! scans every object under both roots. It must not build object stores (storage.rs does) nor
//! render templates (models.rs does); model rebuilds go through materialize.rs.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use aho_corasick::AhoCorasick;
use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, TimeUnit};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use bytes::Bytes;
use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
use deltalake::delta_datafusion::FileSelection;
use deltalake::kernel::Action;
use deltalake::kernel::transaction::CommitBuilder;
use deltalake::protocol::DeltaOperation;
use futures::StreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::Silt;
use crate::catalog::{Layer, TableRef};
use crate::commit::append_record;
use crate::config::{ErasurePolicy, Format, Source};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::ingest::ledger::{self, LedgerEntry};
use crate::materialize::{Materializer, ModelMetrics, ModelState, last_state};
use crate::models::{Dag, Materialized};
use crate::pseudonym::hmac_hex;

/// `_silt.erasures`, the audit log.
pub fn table() -> TableRef {
    TableRef::new(Layer::Silt, "erasures")
}

/// What one set of subjects looks like in the data.
#[derive(Debug, Clone, Default)]
pub struct Needles {
    pub ids: BTreeSet<String>,
    /// String values of the sources' PII columns on the subjects' rows.
    pub pii: BTreeSet<String>,
    /// The subject key columns the sources declare (`client_id`).
    pub keys: BTreeSet<String>,
    /// Every id and PII value in one automaton, built on the first `find_in` (the sets above
    /// are complete by then and do not change).
    matcher: OnceLock<Option<Matcher>>,
}

/// One Aho-Corasick automaton over all needles: a text is scanned once, not once per needle
/// (a forget of 100 clients has a few hundred needles, checked against every cell of tables
/// without the key column and every landing file).
#[derive(Debug, Clone)]
struct Matcher {
    ac: Option<AhoCorasick>,
    /// How many of the automaton's patterns (the first ones) are ids; the rest are PII values.
    ids: usize,
}

impl Needles {
    /// Which kind of needle `text` holds, if any: a whole-word occurrence (`C0042` is not in
    /// `C00421`). A subject key wins over a PII value.
    pub fn find_in(&self, text: &str) -> Option<&'static str> {
        let m = self
            .matcher
            .get_or_init(|| {
                let ids: Vec<&str> = self
                    .ids
                    .iter()
                    .map(String::as_str)
                    .filter(|s| !s.is_empty())
                    .collect();
                let pii = self
                    .pii
                    .iter()
                    .map(String::as_str)
                    .filter(|s| !s.is_empty());
                let n = ids.len();
                let all: Vec<&str> = ids.into_iter().chain(pii).collect();
                if all.is_empty() {
                    return None;
                }
                // Standard match semantics: overlapping matches are all reported, so a needle
                // that is part of a longer word does not hide another that stands alone. An
                // automaton too large to build falls back to one search per needle.
                Some(Matcher {
                    ac: AhoCorasick::new(&all)
                        .map_err(|e| tracing::warn!("erasure needles: no automaton ({e})"))
                        .ok(),
                    ids: n,
                })
            })
            .as_ref()?;
        let Some(ac) = &m.ac else {
            return self.find_in_each(text);
        };
        let hb = text.as_bytes();
        let mut pii = false;
        for hit in ac.find_overlapping_iter(text) {
            if stands_alone(hb, hit.start(), hit.end()) {
                if hit.pattern().as_usize() < m.ids {
                    return Some("subject key");
                }
                pii = true;
            }
        }
        pii.then_some("PII value")
    }

    /// `find_in` by one search per needle: the fallback when the automaton cannot be built,
    /// and the reference it is tested against.
    pub fn find_in_each(&self, text: &str) -> Option<&'static str> {
        if self.ids.iter().any(|n| contains_token(text, n)) {
            return Some("subject key");
        }
        self.pii
            .iter()
            .any(|n| contains_token(text, n))
            .then_some("PII value")
    }
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The occurrence `hay[s..e]` is not part of a longer word: a word character at either end of
/// it has no word character beside it.
fn stands_alone(hay: &[u8], s: usize, e: usize) -> bool {
    let before = s == 0 || !is_word(hay[s]) || !is_word(hay[s - 1]);
    let after = e == hay.len() || !is_word(hay[e - 1]) || !is_word(hay[e]);
    before && after
}

/// `needle` occurs in `hay` not as part of a longer word (`C0042` is not in `C00421`): the
/// search `Needles::find_in` falls back to without an automaton.
fn contains_token(hay: &str, needle: &str) -> bool {
    if needle.is_empty() {
        return false;
    }
    // Every occurrence, overlapping ones too: the next search starts one character on.
    let step = needle.chars().next().map(|c| c.len_utf8()).unwrap_or(1);
    let mut start = 0;
    while let Some(i) = hay.get(start..).and_then(|h| h.find(needle)) {
        let s = start + i;
        if stands_alone(hay.as_bytes(), s, s + needle.len()) {
            return true;
        }
        start = s + step;
    }
    false
}

/// A column's cells as text, for the types that can hold an id or a PII value.
fn cells(a: &ArrayRef) -> Option<Vec<Option<String>>> {
    match a.data_type() {
        DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Utf8View
        | DataType::Dictionary(_, _)
        | DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt32
        | DataType::UInt64 => {
            let c = arrow::compute::cast(a, &DataType::Utf8).ok()?;
            let s = c.as_string::<i32>();
            Some(
                (0..s.len())
                    .map(|i| (!s.is_null(i)).then(|| s.value(i).to_string()))
                    .collect(),
            )
        }
        DataType::Struct(_)
        | DataType::List(_)
        | DataType::LargeList(_)
        | DataType::Map(_, _)
        | DataType::Binary
        | DataType::LargeBinary => {
            let f = ArrayFormatter::try_new(a.as_ref(), &FormatOptions::default()).ok()?;
            Some(
                (0..a.len())
                    .map(|i| (!a.is_null(i)).then(|| f.value(i).to_string()))
                    .collect(),
            )
        }
        _ => None,
    }
}

/// How rows of one table are matched: by the subject key column, or by any text cell.
#[derive(Debug, Clone)]
enum Match {
    Key(String),
    Text,
}

fn how_for(schema: &Schema, n: &Needles) -> Match {
    n.keys
        .iter()
        .find(|k| schema.field_with_name(k).is_ok())
        .map(|k| Match::Key(k.clone()))
        .unwrap_or(Match::Text)
}

/// Which rows of `b` belong to a subject.
fn row_mask(b: &RecordBatch, n: &Needles, how: &Match) -> BooleanArray {
    let mut hit = vec![false; b.num_rows()];
    match how {
        Match::Key(k) => {
            // The hot path of every erasure scan: compare the key cells in place.
            if let Some(c) = b
                .column_by_name(k)
                .and_then(|c| arrow::compute::cast(c, &DataType::Utf8).ok())
            {
                let s = c.as_string::<i32>();
                for (i, h) in hit.iter_mut().enumerate() {
                    *h = !s.is_null(i) && n.ids.contains(s.value(i).trim());
                }
            }
        }
        Match::Text => {
            for col in b.columns() {
                if let Some(c) = cells(col) {
                    for (i, v) in c.into_iter().enumerate() {
                        if !hit[i] && v.is_some_and(|v| n.find_in(&v).is_some()) {
                            hit[i] = true;
                        }
                    }
                }
            }
        }
    }
    BooleanArray::from(hit)
}

fn decode_parquet(data: Bytes, what: &str) -> Result<Vec<RecordBatch>> {
    decode_parquet_for(data, what, None)
}

/// Decode a Parquet file; with `n`, only the subject key column when the file has one (every
/// match by key needs nothing else), else every column.
fn decode_parquet_for(data: Bytes, what: &str, n: Option<&Needles>) -> Result<Vec<RecordBatch>> {
    let err = |e: parquet::errors::ParquetError| {
        Error::Runtime(format!("{what}: cannot read Parquet: {e}"))
    };
    let mut builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(data)
        .map_err(err)?;
    if let Some(n) = n
        && let Some(k) = n
            .keys
            .iter()
            .find(|k| builder.schema().field_with_name(k).is_ok())
    {
        let mask = parquet::arrow::ProjectionMask::columns(builder.parquet_schema(), [k.as_str()]);
        builder = builder.with_projection(mask);
    }
    let reader = builder.build().map_err(err)?;
    reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Runtime(format!("{what}: cannot read Parquet: {e}")))
}

/// What forget did to one table or landing source.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableErasure {
    pub table: String,
    /// rewrite | rebuild | purge | landing
    pub action: String,
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
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ForgetReport {
    pub request_id: String,
    pub resumed: bool,
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

/// The sources that carry subjects.
fn subject_sources(silt: &Silt) -> Vec<&Source> {
    silt.project
        .sources
        .values()
        .filter(|s| s.subject_key.is_some())
        .collect()
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

/// The ids plus the string PII values on their rows, from every file (live or retained) of the
/// bronze tables of subject-carrying sources: what is still anywhere is found.
pub async fn needles(silt: &Silt, ids: &[String]) -> Result<Needles> {
    let mut n = Needles {
        ids: ids
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        ..Default::default()
    };
    for s in subject_sources(silt) {
        n.keys.insert(s.subject_key.clone().unwrap_or_default());
    }
    for s in subject_sources(silt) {
        let key = s.subject_key.clone().unwrap_or_default();
        if s.pii.is_empty() {
            continue;
        }
        for (inner, loc) in data_files(silt, &TableRef::bronze(&s.name)).await? {
            for b in decode_parquet(silt.lake.get(&loc).await?, &inner)? {
                let mask = row_mask(&b, &n, &Match::Key(key.clone()));
                if mask.true_count() == 0 {
                    continue;
                }
                let b = arrow::compute::filter_record_batch(&b, &mask)?;
                for p in &s.pii {
                    let Some(c) = b.column_by_name(p) else {
                        continue;
                    };
                    if !matches!(
                        c.data_type(),
                        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
                    ) {
                        continue;
                    }
                    for v in cells(c).unwrap_or_default().into_iter().flatten() {
                        let v = v.trim().to_string();
                        if v.chars().count() >= 4 {
                            n.pii.insert(v);
                        }
                    }
                }
            }
        }
    }
    Ok(n)
}

/// An audit row.
#[derive(Debug, Clone, Default)]
struct AuditRow {
    request_id: String,
    status: String,
    subjects: String,
    reason: Option<String>,
    table: Option<String>,
    rows_deleted: i64,
    files_rewritten: i64,
    files_purged: i64,
    version: Option<i64>,
    unreadable_from: Option<i64>,
    unreadable_to: Option<i64>,
    detail: Option<String>,
    at: i64,
}

fn audit_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("request_id", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("subject_hmacs", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, true),
        Field::new("table_name", DataType::Utf8, true),
        Field::new("rows_deleted", DataType::Int64, false),
        Field::new("files_rewritten", DataType::Int64, false),
        Field::new("files_purged", DataType::Int64, false),
        Field::new("version_written", DataType::Int64, true),
        Field::new("unreadable_from", DataType::Int64, true),
        Field::new("unreadable_to", DataType::Int64, true),
        Field::new("detail", DataType::Utf8, true),
        Field::new(
            "at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ]))
}

async fn audit(silt: &Silt, rows: &[AuditRow]) -> Result<()> {
    let s = |f: &dyn Fn(&AuditRow) -> Option<String>| -> ArrayRef {
        Arc::new(StringArray::from_iter(rows.iter().map(f)))
    };
    let i = |f: &dyn Fn(&AuditRow) -> Option<i64>| -> ArrayRef {
        Arc::new(Int64Array::from_iter(rows.iter().map(f)))
    };
    let batch = RecordBatch::try_new(
        audit_schema(),
        vec![
            s(&|r| Some(r.request_id.clone())),
            s(&|r| Some(r.status.clone())),
            s(&|r| Some(r.subjects.clone())),
            s(&|r| r.reason.clone()),
            s(&|r| r.table.clone()),
            i(&|r| Some(r.rows_deleted)),
            i(&|r| Some(r.files_rewritten)),
            i(&|r| Some(r.files_purged)),
            i(&|r| r.version),
            i(&|r| r.unreadable_from),
            i(&|r| r.unreadable_to),
            s(&|r| r.detail.clone()),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.at))
                    .with_timezone("UTC"),
            ),
        ],
    )?;
    append_record(
        &silt.lake,
        &table(),
        batch,
        &[("silt.operation", "erasure.audit")],
        "silt forget audit: one row per request step; subjects as HMAC-SHA256 only",
    )
    .await?;
    Ok(())
}

/// Audit rows as (request, status, subjects, table, unreadable range, at).
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub request_id: String,
    pub status: String,
    pub subject_hmacs: String,
    pub table: Option<String>,
    pub unreadable: Option<(u64, u64)>,
    pub at: i64,
}

pub async fn audit_entries(silt_catalog: &crate::catalog::Catalog) -> Result<Vec<AuditEntry>> {
    let mut out = Vec::new();
    for b in silt_catalog.read_small(&table()).await? {
        let s = |n: &str| {
            b.column_by_name(n)
                .and_then(|c| arrow::compute::cast(c, &DataType::Utf8).ok())
                .map(|c| c.as_string::<i32>().clone())
        };
        let i = |n: &str| {
            b.column_by_name(n)
                .and_then(|c| arrow::compute::cast(c, &DataType::Int64).ok())
                .map(|c| c.as_primitive::<Int64Type>().clone())
        };
        let (Some(req), Some(st), Some(subj), Some(tab), Some(uf), Some(ut), Some(at)) = (
            s("request_id"),
            s("status"),
            s("subject_hmacs"),
            s("table_name"),
            i("unreadable_from"),
            i("unreadable_to"),
            i("at"),
        ) else {
            continue;
        };
        for r in 0..b.num_rows() {
            out.push(AuditEntry {
                request_id: req.value(r).to_string(),
                status: st.value(r).to_string(),
                subject_hmacs: subj.value(r).to_string(),
                table: (!tab.is_null(r)).then(|| tab.value(r).to_string()),
                unreadable: (!uf.is_null(r) && !ut.is_null(r))
                    .then(|| (uf.value(r) as u64, ut.value(r) as u64)),
                at: at.value(r),
            });
        }
    }
    out.sort_by_key(|e| e.at);
    Ok(out)
}

/// The erasure request that made `version` of `t` unreadable, if one did.
pub async fn purged_by(
    catalog: &crate::catalog::Catalog,
    t: &TableRef,
    version: u64,
) -> Result<Option<Error>> {
    let name = t.to_string();
    for e in audit_entries(catalog).await? {
        if e.table.as_deref() == Some(name.as_str())
            && let Some((from, to)) = e.unreadable
            && (from..=to).contains(&version)
        {
            let when = chrono::DateTime::from_timestamp_micros(e.at)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default();
            return Ok(Some(Error::Usage(format!(
                "version {version} of {name} is no longer readable: GDPR erasure request {} purged the files it referenced at {when} (versions {from} to {to} are gone; version {} and later are readable)",
                e.request_id,
                to + 1
            ))));
        }
    }
    Ok(None)
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
        // Resume an interrupted request for the same subjects, or start one.
        let entries = audit_entries(&silt.catalog).await?;
        let done: HashSet<&str> = entries
            .iter()
            .filter(|e| e.status == "completed")
            .map(|e| e.request_id.as_str())
            .collect();
        let pending = entries.iter().find(|e| {
            e.status == "started"
                && e.subject_hmacs == subjects
                && !done.contains(e.request_id.as_str())
        });
        let mut report = ForgetReport {
            subjects: hmacs.clone(),
            ..Default::default()
        };
        let row = |request_id: &str, status: &str| AuditRow {
            request_id: request_id.to_string(),
            status: status.into(),
            subjects: subjects.clone(),
            reason: self.reason.clone(),
            at: chrono::Utc::now().timestamp_micros(),
            ..Default::default()
        };
        match pending {
            Some(p) => {
                report.request_id = p.request_id.clone();
                report.resumed = true;
            }
            None => {
                report.request_id = uuid::Uuid::now_v7().to_string();
                audit(silt, &[row(&report.request_id, "started")]).await?;
            }
        }
        let n = Arc::new(needles(silt, &self.ids).await?);
        failpoint::hit("forget.started");
        let mut run = Run {
            silt,
            n: n.clone(),
            request: report.request_id.clone(),
            subjects: subjects.clone(),
            steps: Vec::new(),
            seen: HashMap::new(),
        };
        // 1. Landing files (PII values are still in bronze to find them by).
        for s in subject_sources(silt) {
            run.landing(s).await?;
        }
        // 2. Quarantine and bronze, in place.
        for s in silt.project.sources.values() {
            run.rewrite(&TableRef::quarantine(&s.name), None).await?;
            failpoint::hit("forget.table");
        }
        for s in silt.project.sources.values() {
            run.rewrite(&TableRef::bronze(&s.name), None).await?;
            failpoint::hit("forget.table");
        }
        // 3. Models in dag order: history-keeping ones with the key in place (their build state
        //    follows upstream erasures); everything downstream of a subject table is rebuilt the
        //    normal way, so partition_overwrite models redo only the partitions that changed.
        run.models(&dag, &key).await?;
        // 4. Purge every file still holding a subject and the log versions that point at them.
        let mut tables: Vec<TableRef> = Vec::new();
        for s in silt.project.sources.values() {
            tables.push(TableRef::quarantine(&s.name));
            tables.push(TableRef::bronze(&s.name));
        }
        for name in &dag.order {
            tables.push(dag.models[name].table());
        }
        for t in tables {
            run.purge(&t).await?;
        }
        failpoint::hit("forget.before_complete");
        report.steps = run.steps;
        report.rows_deleted = report
            .steps
            .iter()
            .filter(|s| s.action != "rebuild")
            .map(|s| s.rows_deleted)
            .sum();
        report.files_purged = report
            .steps
            .iter()
            .map(|s| s.files_purged.len() as u64)
            .sum();
        let mut done_row = row(&report.request_id, "completed");
        done_row.rows_deleted = report.rows_deleted as i64;
        done_row.files_purged = report.files_purged as i64;
        done_row.files_rewritten = report
            .steps
            .iter()
            .map(|s| s.files_rewritten.len() as i64)
            .sum();
        done_row.detail = Some(format!(
            "{} step(s){}",
            report.steps.len(),
            if report.resumed { "; resumed" } else { "" }
        ));
        audit(silt, &[done_row]).await?;
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }
}

/// How many bytes of rewritten landing files wait for one ledger commit (a commit per file made
/// the landing step of an S=1 forget mostly ledger writes).
const LANDING_GROUP_BYTES: usize = 32 << 20;

/// A landing file's location, its path relative to the landing root, and its rewrite.
type LandingFile = (object_store::path::Path, String, Option<(Vec<u8>, u64)>);

/// Landing files rewritten (`Some`: new content, records dropped) or to delete (`None`), with
/// their ledger entries, not yet landed.
#[derive(Default)]
struct LandingGroup {
    files: Vec<LandingFile>,
    entries: Vec<LedgerEntry>,
    bytes: usize,
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
}

/// Files of one table the rewrite judged with the same needles and match as the purge.
#[derive(Default)]
struct SeenFiles {
    hit: HashSet<String>,
    clean: HashSet<String>,
}

impl Run<'_> {
    async fn step_audit(&self, s: &TableErasure) -> Result<()> {
        audit(
            self.silt,
            &[AuditRow {
                request_id: self.request.clone(),
                status: s.action.clone(),
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

    /// Rewrite (or remove) the landing files of `src` that hold a subject.
    async fn landing(&mut self, src: &Source) -> Result<()> {
        let landing = &self.silt.landing;
        let key = src.subject_key.clone().unwrap_or_default();
        let mut step = TableErasure {
            table: format!("landing:{}", src.name),
            action: "landing".into(),
            ..Default::default()
        };
        let entries = ledger::read(&self.silt.catalog, &src.name).await?;
        let mut latest: HashMap<String, LedgerEntry> = HashMap::new();
        for e in entries {
            latest.insert(e.path.clone(), e);
        }
        let batch_id = format!("erasure-{}", self.request);
        let mut group = LandingGroup::default();
        let mut files = Vec::new();
        for m in landing.list("").await? {
            let Some(rel) = landing.relative(&m.location) else {
                continue;
            };
            if src.glob.is_match(&rel) {
                files.push((m.location, rel));
            }
        }
        step.files_scanned = files.len() as u64;
        // Each file is read, searched and rewritten in its own task, two at a time; the
        // results come back in listing order, so the ledger groups are as before.
        let shared = Arc::new((src.clone(), key));
        let jobs = files.into_iter().map(|(location, rel)| {
            let (landing, n, shared) = (landing.clone(), self.n.clone(), shared.clone());
            async move {
                let (src, key) = (&shared.0, shared.1.as_str());
                let data = landing.get(&location).await?;
                if n.find_in(&String::from_utf8_lossy(&data)).is_none() {
                    return Ok(None);
                }
                let rewritten = match src.on_erasure {
                    ErasurePolicy::Remove => None,
                    ErasurePolicy::Rewrite => match src.format {
                        Format::Csv => Some(drop_csv_records(&data, src, key, &n)),
                        Format::Ndjson => Some(drop_ndjson_lines(&data, key, &n)),
                        Format::JsonArray | Format::Json => drop_json_elements(&data, key, &n),
                    },
                };
                let sha = rewritten
                    .as_ref()
                    .map(|(bytes, _)| hex::encode(Sha256::digest(bytes)));
                Ok(Some((location, rel, rewritten, sha)))
            }
        });
        let mut found = Box::pin(in_tasks(jobs, "landing erasure"));
        while let Some(r) = found.next().await {
            let Some((location, rel, rewritten, sha)) = r? else {
                continue;
            };
            let now = chrono::Utc::now().timestamp_micros();
            let entry = latest.get(&rel).map(|prev| match &rewritten {
                Some((bytes, dropped)) => LedgerEntry {
                    source: src.name.clone(),
                    path: rel.clone(),
                    size: bytes.len() as i64,
                    e_tag: None,
                    sha256: sha.clone().unwrap_or_default(),
                    status: "rewritten".into(),
                    rows: prev.rows,
                    quarantined: prev.quarantined,
                    batch_id: batch_id.clone(),
                    ingested_at: now,
                    detail: Some(format!(
                        "GDPR erasure {}: {dropped} record(s) removed",
                        self.request
                    )),
                },
                None => LedgerEntry {
                    status: "erased".into(),
                    batch_id: batch_id.clone(),
                    ingested_at: now,
                    detail: Some(format!("GDPR erasure {}: file removed", self.request)),
                    ..prev.clone()
                },
            });
            group.bytes += rewritten.as_ref().map_or(0, |r| r.0.len());
            group.entries.extend(entry);
            group.files.push((location, rel, rewritten));
            if group.bytes >= LANDING_GROUP_BYTES {
                self.land(std::mem::take(&mut group), &batch_id, &mut step)
                    .await?;
            }
        }
        self.land(group, &batch_id, &mut step).await?;
        if !step.files_rewritten.is_empty() || !step.files_purged.is_empty() {
            self.step_audit(&step).await?;
        }
        self.steps.push(step);
        Ok(())
    }

    /// Land one group of landing rewrites: ledger first, in one commit for the group (the new
    /// content is known as ingested before it lands, and the old one stays known, so a crash
    /// in between never re-ingests a file), then each file's new content or its deletion.
    async fn land(
        &self,
        group: LandingGroup,
        batch_id: &str,
        step: &mut TableErasure,
    ) -> Result<()> {
        let landing = &self.silt.landing;
        if group.files.is_empty() {
            return Ok(());
        }
        ledger::record(&self.silt.catalog, &group.entries, batch_id).await?;
        failpoint::hit("forget.landing_ledger");
        for (location, rel, rewritten) in group.files {
            match rewritten {
                Some((bytes, dropped)) => {
                    landing.put(&location, Bytes::from(bytes)).await?;
                    step.rows_deleted += dropped;
                    step.files_rewritten.push(rel);
                }
                None => {
                    landing.delete(&location).await?;
                    step.files_purged.push(rel);
                }
            }
        }
        Ok(())
    }

    /// Delete the subjects' rows from `t` in one commit that rewrites only the files holding them.
    /// `state`: the model's new build state, when `t` is a model table.
    async fn rewrite(
        &mut self,
        t: &TableRef,
        state: Option<(&str, ModelState)>,
    ) -> Result<Option<u64>> {
        let lake = &self.silt.lake;
        let table = lake.delta_table(&t.rel_path()).await?;
        let Some(version) = table.version() else {
            return Ok(None);
        };
        let snap = table
            .snapshot()
            .map_err(|e| Error::delta(t.to_string(), e))?;
        let schema: Schema = snap.snapshot().arrow_schema().as_ref().clone();
        let how = how_for(&schema, &self.n);
        if matches!(how, Match::Text) && t.layer != Layer::Quarantine {
            // Without the key column a table is rebuilt (models) or left to verify.
            return Ok(None);
        }
        let mut step = TableErasure {
            table: t.to_string(),
            action: "rewrite".into(),
            ..Default::default()
        };
        let files: Vec<_> = snap
            .log_data()
            .iter()
            .map(|f| (f.path().to_string(), f.remove_action(true)))
            .collect();
        // The scan decodes the key column of every file, `FILES_AT_ONCE` files at a time.
        let needles = self.n.clone();
        step.files_scanned = files.len() as u64;
        let scans = files.iter().map(|(path, _)| {
            let loc = lake.path(&format!("{}/{}", t.rel_path(), path));
            let (lake, path, n, how) = (lake.clone(), path.clone(), needles.clone(), how.clone());
            async move {
                let mut hits = 0;
                for b in decode_parquet_for(lake.get(&loc).await?, &path, Some(&n))? {
                    hits += row_mask(&b, &n, &how).true_count();
                }
                Ok(hits)
            }
        });
        let counts = each_in_a_task(scans, "erasure scan").await;
        let mut hits = Vec::new();
        let mut seen = SeenFiles::default();
        for ((path, remove), n) in files.into_iter().zip(counts) {
            if n? > 0 {
                hits.push((path, remove));
            } else {
                seen.clean.insert(path);
            }
        }
        if hits.is_empty() {
            self.seen.insert(t.to_string(), seen);
            // Nothing to delete; a model still records that its upstream moved on.
            if let Some((model, st)) = state
                && last_state(&table).await?.as_ref() != Some(&st)
            {
                let v = self.commit(&table, t, vec![], 0, Some((model, st))).await?;
                step.version = Some(v);
                self.steps.push(step);
                return Ok(Some(v));
            }
            return Ok(None);
        }
        // Read the whole rows of each such file (partition columns included) and write the
        // others to a new file, one file at a time: memory holds one batch, not the table.
        let target = Arc::new(schema);
        let snapshot = snap.snapshot().clone();
        let mut config: HashMap<String, Option<String>> = snapshot
            .metadata()
            .configuration()
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        config.retain(|k, _| k.starts_with("delta.dataSkipping"));
        let (num_indexed, stats_cols) =
            deltalake::operations::get_num_idx_cols_and_stats_columns(None, config);
        let writer_config = deltalake::datafile::writer::WriterConfig::new(
            target.clone(),
            snapshot.metadata().partition_columns().to_vec(),
            None,
            None,
            None,
            num_indexed,
            stats_cols,
        );
        let ctx = SessionContext::new();
        // Each file in its own task: one batch per file in memory, both cores busy.
        let jobs = hits.iter().map(|(path, _)| {
            FileRewrite {
                table: table.clone(),
                ctx: ctx.clone(),
                path: path.clone(),
                needles: needles.clone(),
                how: how.clone(),
                target: target.clone(),
                writer_config: writer_config.clone(),
                t: t.clone(),
            }
            .run()
        });
        let written = each_in_a_task(jobs, "erasure rewrite").await;
        let mut adds = Vec::new();
        for w in written {
            let (a, deleted) = w?;
            adds.extend(a);
            step.rows_deleted += deleted;
        }
        step.files_added = adds.len() as u64;
        step.files_rewritten = hits.iter().map(|h| h.0.clone()).collect();
        seen.hit.extend(step.files_rewritten.iter().cloned());
        seen.clean.extend(adds.iter().map(|a| a.path.clone()));
        let mut actions: Vec<Action> = hits.into_iter().map(|h| Action::Remove(h.1)).collect();
        actions.extend(adds.into_iter().map(Action::Add));
        let v = self
            .commit(&table, t, actions, step.rows_deleted, state)
            .await?;
        self.seen.insert(t.to_string(), seen);
        let _ = version;
        step.version = Some(v);
        self.step_audit(&step).await?;
        self.steps.push(step);
        Ok(Some(v))
    }

    async fn commit(
        &self,
        table: &DeltaTable,
        t: &TableRef,
        actions: Vec<Action>,
        rows: u64,
        state: Option<(&str, ModelState)>,
    ) -> Result<u64> {
        let removed = actions
            .iter()
            .filter(|a| matches!(a, Action::Remove(_)))
            .count();
        let added = actions
            .iter()
            .filter(|a| matches!(a, Action::Add(_)))
            .count();
        let mut meta: HashMap<String, serde_json::Value> = HashMap::new();
        meta.insert("silt.operation".into(), "erasure".into());
        meta.insert("silt.erasure.request".into(), self.request.clone().into());
        meta.insert(
            "operationMetrics".into(),
            serde_json::json!({
                "numDeletedRows": rows,
                "numRemovedFiles": removed,
                "numAddedFiles": added,
            }),
        );
        if let Some((model, st)) = state {
            meta.insert("silt.model".into(), model.into());
            meta.insert(
                "silt.run_id".into(),
                format!("erasure-{}", self.request).into(),
            );
            meta.insert(
                "silt.state".into(),
                serde_json::to_value(st).unwrap_or_default(),
            );
        }
        let snap = table
            .snapshot()
            .map_err(|e| Error::delta(t.to_string(), e))?;
        let done = CommitBuilder::default()
            .with_actions(actions)
            .with_app_metadata(meta)
            .build(
                Some(snap),
                table.log_store(),
                DeltaOperation::Delete {
                    // The predicate names the request, never a subject.
                    predicate: Some(format!("GDPR erasure {}", self.request)),
                },
            )
            .await
            .map_err(|e| Error::delta(t.to_string(), e))?;
        Ok(done.version() as u64)
    }

    /// Models in dag order.
    async fn models(&mut self, dag: &Dag, key: &str) -> Result<()> {
        let silt = self.silt;
        let subject_sources: BTreeSet<String> = subject_sources(silt)
            .iter()
            .map(|s| s.name.clone())
            .collect();
        // Models that read a subject table, directly or through other models.
        let mut affected: BTreeSet<String> = BTreeSet::new();
        for name in &dag.order {
            let m = &dag.models[name];
            if m.sources.iter().any(|s| subject_sources.contains(s))
                || m.refs.iter().any(|r| affected.contains(r))
            {
                affected.insert(name.clone());
            }
        }
        let pii: BTreeSet<String> = silt.project.pii_columns();
        let ctx = silt.catalog.session().await?;
        let run_id = format!("erasure-{}", self.request);
        let mk = |full_refresh: bool| Materializer {
            catalog: &silt.catalog,
            dag,
            ctx: &ctx,
            run_id: &run_id,
            full_refresh,
            pii: &pii,
            hmac_key: Some(key),
            changes: Default::default(),
        };
        let mut rebuilt: Vec<ModelMetrics> = Vec::new();
        for name in &dag.order {
            if !affected.contains(name) {
                continue;
            }
            let m = &dag.models[name];
            let t = m.table();
            let table = silt.lake.delta_table(&t.rel_path()).await?;
            if table.version().is_none() {
                continue;
            }
            let schema: Schema = table
                .snapshot()
                .map_err(|e| Error::delta(t.to_string(), e))?
                .snapshot()
                .arrow_schema()
                .as_ref()
                .clone();
            let keyed = matches!(how_for(&schema, &self.n), Match::Key(_));
            let keeps_history = matches!(
                m.config.materialized,
                Materialized::Incremental | Materialized::Snapshot | Materialized::Append
            );
            if keyed && keeps_history {
                let state = match last_state(&table).await? {
                    Some(mut st) => {
                        for (u, v) in st.upstream.iter_mut() {
                            if let Ok(ut) = TableRef::parse(u)
                                && let Some(now) = erasure_caught_up(silt, &ut, *v).await?
                            {
                                *v = now;
                            }
                        }
                        Some(st)
                    }
                    None => None,
                };
                self.rewrite(&t, state.map(|s| (name.as_str(), s))).await?;
                failpoint::hit("forget.table");
            } else {
                // Rebuilt from upstream (which no longer holds the subjects). History-keeping
                // models without the key carry the subjects inside aggregates: from scratch.
                let mat = mk(keeps_history);
                let mm = mat.build(m).await?;
                if mm.status != "up_to_date" {
                    let step = TableErasure {
                        table: t.to_string(),
                        action: "rebuild".into(),
                        rows_deleted: mm.rows_deleted,
                        files_added: mm.files_added,
                        version: mm.version,
                        partitions: mm.partitions.clone(),
                        ..Default::default()
                    };
                    self.step_audit(&step).await?;
                    self.steps.push(step);
                    rebuilt.push(mm);
                }
                failpoint::hit("forget.table");
            }
        }
        Ok(())
    }

    /// Delete every data file of `t` that still holds a subject (none is live any more), after
    /// a checkpoint and after the log versions that reference them are gone.
    async fn purge(&mut self, t: &TableRef) -> Result<()> {
        let lake = &self.silt.lake;
        let table = lake.delta_table(&t.rel_path()).await?;
        let Some(current) = table.version() else {
            return Ok(());
        };
        let live: HashSet<String> = table
            .snapshot()
            .map_err(|e| Error::delta(t.to_string(), e))?
            .log_data()
            .iter()
            .map(|f| f.path().to_string())
            .collect();
        let mut step = TableErasure {
            table: t.to_string(),
            action: "purge".into(),
            ..Default::default()
        };
        let seen = self.seen.remove(&t.to_string()).unwrap_or_default();
        let mut doomed = Vec::new();
        for (inner, loc) in data_files(self.silt, t).await? {
            if seen.hit.contains(&inner) && !live.contains(&inner) {
                doomed.push((inner, loc));
                continue;
            }
            if seen.clean.contains(&inner) {
                continue;
            }
            step.files_scanned += 1;
            let mut hit = false;
            for b in decode_parquet_for(lake.get(&loc).await?, &inner, Some(&self.n))? {
                let how = how_for(&b.schema(), &self.n);
                if row_mask(&b, &self.n, &how).true_count() > 0 {
                    hit = true;
                    break;
                }
            }
            if !hit {
                continue;
            }
            if live.contains(&inner) {
                step.warnings.push(format!(
                    "{t}: live file {inner} still holds a subject (the table has no subject key column); rebuild or fix the model"
                ));
                continue;
            }
            doomed.push((inner, loc));
        }
        if doomed.is_empty() {
            if !step.warnings.is_empty() {
                self.steps.push(step);
            }
            return Ok(());
        }
        // The log versions that reference a doomed file (or show a subject) go, down from the
        // first one; a checkpoint at the current version keeps the table readable.
        let log_rel = format!("{}/_delta_log", t.rel_path());
        let doomed_names: Vec<&str> = doomed.iter().map(|d| d.0.as_str()).collect();
        let mut first: Option<u64> = None;
        let mut log_files: Vec<(u64, object_store::path::Path)> = Vec::new();
        for o in lake.list(&log_rel).await? {
            let Some(name) = o.location.filename().map(String::from) else {
                continue;
            };
            let Some(v) = name.split('.').next().and_then(|v| v.parse::<u64>().ok()) else {
                continue;
            };
            if v >= current {
                continue;
            }
            let data = lake.get(&o.location).await?;
            let mentions = if name.ends_with(".json") {
                let text = String::from_utf8_lossy(&data);
                doomed_names.iter().any(|d| text.contains(d)) || self.n.find_in(&text).is_some()
            } else if name.ends_with(".parquet") {
                let mut found = false;
                for b in decode_parquet(data, &name)? {
                    for c in b.columns() {
                        if let Some(cs) = cells(c)
                            && cs.iter().flatten().any(|s| {
                                doomed_names.iter().any(|d| s.contains(d))
                                    || self.n.find_in(s).is_some()
                            })
                        {
                            found = true;
                        }
                    }
                }
                found
            } else {
                false
            };
            if mentions {
                first = Some(first.map_or(v, |f| f.min(v)));
            }
            log_files.push((v, o.location));
        }
        if let Some(from) = first {
            step.unreadable = Some((from, current - 1));
        }
        step.files_purged = doomed.iter().map(|d| d.0.clone()).collect();
        step.version = Some(current);
        // Audit first: a crash after it still leaves the reason for the missing versions.
        self.step_audit(&step).await?;
        deltalake::checkpoints::create_checkpoint(&table, None)
            .await
            .map_err(|e| Error::delta(t.to_string(), e))?;
        failpoint::hit("forget.purge");
        if let Some(from) = first {
            for (v, loc) in &log_files {
                if *v >= from {
                    lake.delete(loc).await?;
                }
            }
        }
        for (_, loc) in &doomed {
            lake.delete(loc).await?;
        }
        self.steps.push(step);
        Ok(())
    }
}

/// How many files an in-place erasure scans or rewrites at once: one per core of the 2-core
/// machine it is measured on, each holding one batch.
const FILES_AT_ONCE: usize = 2;

/// Each job in its own tokio task, `FILES_AT_ONCE` at a time; the results in the jobs' order.
async fn each_in_a_task<T, F>(jobs: impl Iterator<Item = F>, what: &str) -> Vec<Result<T>>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T>> + Send + 'static,
{
    in_tasks(jobs, what).collect().await
}

/// Like [`each_in_a_task`], as a stream: a result is handed over as soon as it and the ones
/// before it are done, so at most `FILES_AT_ONCE` jobs (and what they hold) are in flight.
fn in_tasks<'w, T, F>(
    jobs: impl Iterator<Item = F> + 'w,
    what: &'w str,
) -> impl futures::Stream<Item = Result<T>> + 'w
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T>> + Send + 'static,
{
    futures::stream::iter(jobs.map(move |job| async move {
        tokio::spawn(job)
            .await
            .map_err(|e| Error::Runtime(format!("{what}: {e}")))?
    }))
    .buffered(FILES_AT_ONCE)
}

/// One data file of an in-place erasure: its rows without the subjects' go to new files.
struct FileRewrite {
    table: DeltaTable,
    ctx: SessionContext,
    path: String,
    needles: Arc<Needles>,
    how: Match,
    target: Arc<Schema>,
    writer_config: deltalake::datafile::writer::WriterConfig,
    t: TableRef,
}

impl FileRewrite {
    /// The new files' add actions and the rows left out.
    async fn run(self) -> Result<(Vec<deltalake::kernel::Add>, u64)> {
        let Self {
            table,
            ctx,
            path,
            needles,
            how,
            target,
            writer_config,
            t,
        } = self;
        let provider = table
            .table_provider()
            .with_file_selection(FileSelection::from_file_paths([path]))
            .await
            .map_err(Error::from_datafusion)?;
        let mut stream = ctx.read_table(provider)?.execute_stream().await?;
        let mut writer = deltalake::datafile::writer::DeltaWriter::new(
            table.log_store().object_store(None),
            writer_config,
        );
        let mut deleted = 0;
        while let Some(b) = stream.next().await {
            let b = b?;
            let mask = row_mask(&b, &needles, &how);
            deleted += mask.true_count() as u64;
            let keep = arrow::compute::not(&mask)?;
            let kept = arrow::compute::filter_record_batch(&b, &keep)?;
            if kept.num_rows() == 0 {
                continue;
            }
            let cols = target
                .fields()
                .iter()
                .map(|f| {
                    let c = kept.column_by_name(f.name()).ok_or_else(|| {
                        Error::Runtime(format!("{t}: column {} missing on read", f.name()))
                    })?;
                    Ok(arrow::compute::cast(c, f.data_type())?)
                })
                .collect::<Result<Vec<_>>>()?;
            let kept = RecordBatch::try_new(target.clone(), cols)?;
            writer
                .write(&kept)
                .await
                .map_err(|e| Error::delta(t.to_string(), e))?;
        }
        let adds = writer
            .close()
            .await
            .map_err(|e| Error::delta(t.to_string(), e))?;
        Ok((adds, deleted))
    }
}

/// When every commit of `t` after `version` is a GDPR erasure, the current version (a model that
/// had read `version` has seen everything but erasures it also applies).
async fn erasure_caught_up(silt: &Silt, t: &TableRef, version: u64) -> Result<Option<u64>> {
    let table = silt.lake.delta_table(&t.rel_path()).await?;
    let Some(now) = table.version() else {
        return Ok(None);
    };
    if now <= version {
        return Ok(None);
    }
    for v in version + 1..=now {
        let p = silt
            .lake
            .path(&format!("{}/_delta_log/{v:020}.json", t.rel_path()));
        let Ok(data) = silt.lake.get(&p).await else {
            return Ok(None);
        };
        let is_erasure = data
            .split(|b| *b == b'\n')
            .filter_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
            .any(|a| a["commitInfo"]["silt.operation"] == "erasure");
        if !is_erasure {
            return Ok(None);
        }
    }
    Ok(Some(now))
}

/// CSV: drop the records whose subject key field is a subject (or, where that field cannot be
/// found, whose bytes hold one); every other byte stays as it was.
fn drop_csv_records(data: &[u8], src: &Source, key: &str, n: &Needles) -> (Vec<u8>, u64) {
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(src.parse.delimiter as u8)
        .quote(src.parse.quote as u8)
        .has_headers(false)
        .flexible(true)
        .from_reader(data);
    let mut out = Vec::with_capacity(data.len());
    let mut key_idx: Option<usize> = None;
    let mut first = src.parse.header;
    let mut rec = csv::ByteRecord::new();
    let mut start = 0usize;
    let mut dropped = 0;
    loop {
        match rdr.read_byte_record(&mut rec) {
            Ok(true) => {}
            Ok(false) => break,
            Err(_) => {
                // Unparseable rest: judge it line by line.
                let (rest, d) = drop_lines(&data[start..], n);
                out.extend_from_slice(&rest);
                dropped += d;
                return (out, dropped);
            }
        }
        let end = rdr.position().byte() as usize;
        let bytes = &data[start..end.min(data.len())];
        if first {
            first = false;
            key_idx = rec.iter().position(|f| {
                let f = String::from_utf8_lossy(f);
                f.trim_start_matches('\u{feff}').trim() == key
            });
            out.extend_from_slice(bytes);
        } else {
            let by_key = key_idx
                .and_then(|i| rec.get(i))
                .map(|f| n.ids.contains(String::from_utf8_lossy(f).trim()));
            let hit = match by_key {
                Some(true) => true,
                Some(false) => false,
                None => n.find_in(&String::from_utf8_lossy(bytes)).is_some(),
            };
            if hit {
                dropped += 1;
            } else {
                out.extend_from_slice(bytes);
            }
        }
        start = end;
    }
    out.extend_from_slice(&data[start.min(data.len())..]);
    (out, dropped)
}

/// Lines (terminators kept) without the ones that hold a subject.
fn drop_lines(data: &[u8], n: &Needles) -> (Vec<u8>, u64) {
    let mut out = Vec::with_capacity(data.len());
    let mut dropped = 0;
    for line in data.split_inclusive(|b| *b == b'\n') {
        if n.find_in(&String::from_utf8_lossy(line)).is_some() {
            dropped += 1;
        } else {
            out.extend_from_slice(line);
        }
    }
    (out, dropped)
}

fn value_is_subject(v: &serde_json::Value, key: &str, n: &Needles) -> bool {
    match v.get(key) {
        Some(serde_json::Value::String(s)) => n.ids.contains(s.trim()),
        Some(serde_json::Value::Number(x)) => n.ids.contains(&x.to_string()),
        _ => n.find_in(&v.to_string()).is_some(),
    }
}

fn drop_ndjson_lines(data: &[u8], key: &str, n: &Needles) -> (Vec<u8>, u64) {
    let mut out = Vec::with_capacity(data.len());
    let mut dropped = 0;
    for line in data.split_inclusive(|b| *b == b'\n') {
        let hit = match serde_json::from_slice::<serde_json::Value>(line) {
            Ok(v) => value_is_subject(&v, key, n),
            Err(_) => n.find_in(&String::from_utf8_lossy(line)).is_some(),
        };
        if hit {
            dropped += 1;
        } else {
            out.extend_from_slice(line);
        }
    }
    (out, dropped)
}

/// A JSON array without the subjects' elements. The kept elements stay byte for byte; a truncated
/// document keeps its complete elements and its incomplete tail (unless the tail holds a subject).
fn drop_json_elements(data: &[u8], key: &str, n: &Needles) -> Option<(Vec<u8>, u64)> {
    let (bom, body) = match data.strip_prefix(b"\xef\xbb\xbf") {
        Some(b) => (&data[..3], b),
        None => (&data[..0], data),
    };
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'[' {
        return Some(drop_ndjson_lines(data, key, n));
    }
    // Split the top level of the array into element byte ranges.
    let mut elems: Vec<&[u8]> = Vec::new();
    let (mut depth, mut in_str, mut esc) = (0i32, false, false);
    let mut start = open + 1;
    let mut closed = false;
    for (i, &b) in body.iter().enumerate().skip(open + 1) {
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' if depth > 0 => depth -= 1,
            b',' if depth == 0 => {
                elems.push(&body[start..i]);
                start = i + 1;
            }
            b']' => {
                elems.push(&body[start..i]);
                closed = true;
                start = i + 1;
                break;
            }
            _ => {}
        }
    }
    let tail: &[u8] = if closed { &[] } else { &body[start..] };
    let trim = |e: &[u8]| -> Vec<u8> {
        let s = e
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(e.len());
        let t = e
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(s, |p| p + 1);
        e[s..t.max(s)].to_vec()
    };
    let mut kept: Vec<Vec<u8>> = Vec::new();
    let mut dropped = 0u64;
    for e in elems {
        let e = trim(e);
        if e.is_empty() {
            continue;
        }
        let hit = match serde_json::from_slice::<serde_json::Value>(&e) {
            Ok(v) => value_is_subject(&v, key, n),
            Err(_) => n.find_in(&String::from_utf8_lossy(&e)).is_some(),
        };
        if hit {
            dropped += 1;
        } else {
            kept.push(e);
        }
    }
    let mut out = Vec::with_capacity(data.len());
    out.extend_from_slice(bom);
    out.extend_from_slice(&body[..open]);
    out.extend_from_slice(b"[\n  ");
    out.extend_from_slice(&kept.join(&b",\n  "[..]));
    if closed {
        out.extend_from_slice(b"\n]");
        out.extend_from_slice(&body[start..]);
    } else {
        let t = trim(tail);
        if !t.is_empty() && n.find_in(&String::from_utf8_lossy(&t)).is_some() {
            dropped += 1;
        } else if !t.is_empty() {
            out.extend_from_slice(b",\n  ");
            out.extend_from_slice(&t);
            out.push(b'\n');
        }
    }
    Some((out, dropped))
}

/// `silt forget --verify`: every object under the lake and landing roots.
pub async fn verify(silt: &Silt, ids: &[String]) -> Result<VerifyReport> {
    let n = needles(silt, ids).await?;
    let mut report = VerifyReport::default();
    for (storage, root) in [(&silt.lake, "lake"), (&silt.landing, "landing")] {
        for o in storage.list("").await? {
            report.objects_scanned += 1;
            let rel = storage.relative(&o.location).unwrap_or_default();
            let data = storage.get(&o.location).await?;
            let location = format!("{root}:{rel}");
            if root == "lake" && rel.ends_with(".parquet") {
                report.parquet_files += 1;
                let batches = match decode_parquet(data.clone(), &rel) {
                    Ok(b) => b,
                    Err(_) => {
                        if let Some(kind) = n.find_in(&String::from_utf8_lossy(&data)) {
                            report.findings.push(Finding {
                                location,
                                kind: kind.into(),
                                column: None,
                            });
                        }
                        continue;
                    }
                };
                let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
                let ids_only = Needles {
                    ids: n.ids.clone(),
                    ..Default::default()
                };
                for b in batches {
                    // A PII value on a row that belongs to another subject (two clients share a
                    // name) is not a finding; the subject's own id always is.
                    let other: Vec<bool> = match how_for(&b.schema(), &n) {
                        Match::Key(k) => cells(b.column_by_name(&k).expect("key column"))
                            .unwrap_or_default()
                            .into_iter()
                            .map(|v| v.is_some_and(|v| !n.ids.contains(v.trim())))
                            .collect(),
                        Match::Text => vec![false; b.num_rows()],
                    };
                    for (f, c) in b.schema().fields().iter().zip(b.columns()) {
                        for (i, v) in cells(c).unwrap_or_default().into_iter().enumerate() {
                            let Some(v) = v else { continue };
                            let needles = if other.get(i).copied().unwrap_or(false) {
                                &ids_only
                            } else {
                                &n
                            };
                            if let Some(kind) = needles.find_in(&v) {
                                seen.insert((kind.to_string(), f.name().clone()));
                            }
                        }
                    }
                }
                for (kind, column) in seen {
                    report.findings.push(Finding {
                        location: location.clone(),
                        kind,
                        column: Some(column),
                    });
                }
            } else if let Some(kind) = n.find_in(&String::from_utf8_lossy(&data)) {
                report.findings.push(Finding {
                    location,
                    kind: kind.into(),
                    column: None,
                });
            }
        }
    }
    Ok(report)
}
