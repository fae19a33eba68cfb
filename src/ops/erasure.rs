//! GDPR erasure, `silt forget`: find a data subject's rows in every layer, delete them where they
//! live (landing files, quarantine, bronze, history-keeping models), rebuild what was derived from
//! them (only the touched partitions of partition_overwrite models), then purge every data file
//! that still holds them and the log versions that point at those files, with an audit row per
//! step in `_silt/erasures` that carries an HMAC of each subject id, never the id. `--verify`
//! scans every object under both roots. It must not build object stores (storage.rs does) nor
//! render templates (models.rs does); model rebuilds go through materialize.rs.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use aho_corasick::AhoCorasick;
use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type, Schema};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use bytes::Bytes;
use datafusion::prelude::SessionContext;
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
use crate::lake::storage::same_path;
use crate::project::config::{ErasurePolicy, Format, Source};

/// The entry of the `started` audit row's `key_hmacs` that holds the subjects' PII values as
/// HMACs (the others are per `subject_via` source).
const PII_HMACS: &str = "*pii";

/// What one set of subjects looks like in unstructured text: their ids and the string values
/// of the sources' PII columns on their rows. PII values are searched only in columns (and
/// fields) that carry PII; ids only where no key field can be read.
#[derive(Debug, Clone, Default)]
pub struct Needles {
    pub ids: BTreeSet<String>,
    /// String values of the sources' PII columns on the subjects' rows.
    pub pii: BTreeSet<String>,
    /// HMACs of PII values an earlier run of the request recorded (`--verify` after the
    /// records they came from are gone): a whole cell or field is matched by its HMAC.
    pub pii_hmacs: HashSet<String>,
    pub hmac_key: Option<String>,
    /// Every id and PII value in one automaton, built on the first search (the sets above
    /// are complete by then and do not change).
    matcher: OnceLock<Option<Matcher2>>,
}

/// One Aho-Corasick automaton over all needles: a text is scanned once, not once per needle
/// (a forget of 100 clients has a few hundred needles).
#[derive(Debug, Clone)]
struct Matcher2 {
    ac: Option<AhoCorasick>,
    /// How many of the automaton's patterns (the first ones) are ids; the rest are PII values.
    ids: usize,
}

impl Needles {
    /// Whether `text` holds an id and whether it holds a PII value, each as a whole word
    /// (`C0042` is not in `C00421`).
    fn scan(&self, text: &str) -> (bool, bool) {
        let Some(m) = self
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
                Some(Matcher2 {
                    ac: AhoCorasick::new(&all)
                        .map_err(|e| tracing::warn!("erasure needles: no automaton ({e})"))
                        .ok(),
                    ids: n,
                })
            })
            .as_ref()
        else {
            return (false, false);
        };
        let Some(ac) = &m.ac else {
            return (
                self.ids.iter().any(|n| contains_token(text, n)),
                self.pii.iter().any(|n| contains_token(text, n)),
            );
        };
        let hb = text.as_bytes();
        let (mut id, mut pii) = (false, false);
        for hit in ac.find_overlapping_iter(text) {
            if stands_alone(hb, hit.start(), hit.end()) {
                if hit.pattern().as_usize() < m.ids {
                    id = true;
                } else {
                    pii = true;
                }
                if id && pii {
                    break;
                }
            }
        }
        (id, pii)
    }

    /// Which kind of needle `text` holds, if any, as a whole word. A subject key wins over a
    /// PII value.
    pub fn find_in(&self, text: &str) -> Option<&'static str> {
        match self.scan(text) {
            (true, _) => Some("subject key"),
            (false, true) => Some("PII value"),
            _ => None,
        }
    }

    /// Whether `text` (a cell of a PII column) holds a PII value of the subjects.
    pub fn find_pii(&self, text: &str) -> bool {
        (!self.pii.is_empty() && self.scan(text).1)
            || (!self.pii_hmacs.is_empty()
                && self.hmac_key.as_ref().is_some_and(|k| {
                    let t = text.trim();
                    !t.is_empty() && self.pii_hmacs.contains(&hmac_hex(k, t))
                }))
    }

    /// Whether there is any PII to look for.
    fn has_pii(&self) -> bool {
        !self.pii.is_empty() || !self.pii_hmacs.is_empty()
    }

    /// The PII values as HMACs, for the audit.
    fn pii_hmac_list(&self, key: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .pii
            .iter()
            .map(|v| hmac_hex(key, v))
            .chain(self.pii_hmacs.iter().cloned())
            .collect();
        out.sort();
        out.dedup();
        out
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

/// The values of one key column that belong to the request's subjects: the ids themselves for
/// a subject key, the keys of the subjects' parent rows for a `subject_via` column. An integer
/// column is matched as integers (`42`, never the text `42` inside `420` or in another column),
/// a text column as text.
#[derive(Debug, Default)]
pub struct KeySet {
    text: HashSet<String>,
    ints: HashSet<i64>,
    /// HMACs (under the `[gdpr]` key) of values an earlier run of this request derived: the rows
    /// they came from may be purged by now, so they are matched by their HMAC.
    hmacs: HashSet<String>,
    hmac_key: Option<String>,
    /// Whole-word search of the values in unstructured text (unparseable raw records).
    tokens: OnceLock<Option<AhoCorasick>>,
}

impl KeySet {
    pub fn insert(&mut self, v: &str) {
        let v = v.trim();
        if v.is_empty() {
            return;
        }
        if let Ok(i) = v.parse::<i64>() {
            self.ints.insert(i);
        }
        self.text.insert(v.to_string());
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty() && self.hmacs.is_empty()
    }

    pub fn len(&self) -> usize {
        self.text.len()
    }

    fn has_hmac(&self, v: &str) -> bool {
        match &self.hmac_key {
            Some(k) if !self.hmacs.is_empty() => self.hmacs.contains(&hmac_hex(k, v)),
            _ => false,
        }
    }

    /// A field's text, read as the key column's contract type: an integer column's field as
    /// an integer (`007` is 7), a text column's as the text itself.
    pub fn matches_field(&self, v: &str, integer: bool) -> bool {
        let v = v.trim();
        if v.is_empty() {
            return false;
        }
        if integer {
            return v.parse::<i64>().is_ok_and(|i| self.matches_int(i));
        }
        self.text.contains(v) || self.has_hmac(v)
    }

    pub fn matches_int(&self, i: i64) -> bool {
        self.ints.contains(&i) || self.has_hmac(&i.to_string())
    }

    /// For each cell of `a`: `None` when it holds no key (NULL or blank), else whether the key
    /// is one of the set's. Integer columns compare as integers, as do whole numbers in float
    /// and decimal columns; text columns compare as text.
    pub fn mask(&self, a: &ArrayRef) -> Vec<Option<bool>> {
        let n = a.len();
        match a.data_type() {
            DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::UInt64 => match arrow::compute::cast(a, &DataType::Int64) {
                Ok(c) => {
                    let c = c.as_primitive::<Int64Type>();
                    (0..n)
                        .map(|i| c.is_valid(i).then(|| self.matches_int(c.value(i))))
                        .collect()
                }
                Err(_) => vec![None; n],
            },
            DataType::Float16
            | DataType::Float32
            | DataType::Float64
            | DataType::Decimal32(_, _)
            | DataType::Decimal64(_, _)
            | DataType::Decimal128(_, _)
            | DataType::Decimal256(_, _) => match arrow::compute::cast(a, &DataType::Float64) {
                Ok(c) => {
                    let c = c.as_primitive::<arrow::datatypes::Float64Type>();
                    (0..n)
                        .map(|i| {
                            c.is_valid(i).then(|| {
                                let x = c.value(i);
                                x.fract() == 0.0 && x.abs() < 9.0e15 && self.matches_int(x as i64)
                            })
                        })
                        .collect()
                }
                Err(_) => vec![None; n],
            },
            _ => match arrow::compute::cast(a, &DataType::Utf8) {
                Ok(c) => {
                    let c = c.as_string::<i32>();
                    (0..n)
                        .map(|i| {
                            let v = if c.is_valid(i) { c.value(i).trim() } else { "" };
                            (!v.is_empty()).then(|| self.text.contains(v) || self.has_hmac(v))
                        })
                        .collect()
                }
                Err(_) => vec![None; n],
            },
        }
    }

    /// A value of the set standing alone (not part of a longer word) in unstructured text: how
    /// a raw record that cannot be parsed into fields is judged, and the cheap look at a whole
    /// landing file before it is parsed. An integer key also matches as a run of digits with
    /// leading zeros (`007`).
    pub fn find_in(&self, text: &str) -> bool {
        let ac = self.tokens.get_or_init(|| {
            let all: Vec<&str> = self.text.iter().map(String::as_str).collect();
            if all.is_empty() {
                return None;
            }
            AhoCorasick::new(&all)
                .map_err(|e| tracing::warn!("erasure keys: no automaton ({e})"))
                .ok()
        });
        let by_text = match ac {
            Some(ac) => {
                let hb = text.as_bytes();
                ac.find_overlapping_iter(text)
                    .any(|h| stands_alone(hb, h.start(), h.end()))
            }
            None => self.text.iter().any(|n| contains_token(text, n)),
        };
        by_text || (!self.ints.is_empty() && self.find_int_token(text))
    }

    /// A run of digits standing alone whose integer is in the set.
    fn find_int_token(&self, text: &str) -> bool {
        let b = text.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if !b[i].is_ascii_digit() {
                i += 1;
                continue;
            }
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            let neg = start > 0 && b[start - 1] == b'-';
            let from = if neg { start - 1 } else { start };
            if stands_alone(b, from.max(start), i)
                && text[from..i]
                    .parse::<i64>()
                    .is_ok_and(|v| self.ints.contains(&v))
            {
                return true;
            }
        }
        false
    }

    /// The values as HMACs, for the audit (so a resumed request or `--verify` can still match
    /// them after the rows they came from are purged).
    fn hmacs(&self, key: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .text
            .iter()
            .map(|v| hmac_hex(key, v))
            .chain(self.hmacs.iter().cloned())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// How the rows of one table are told to belong to a subject: by its key columns (any of them
/// holding a value of its set), and, on rows whose key columns are all NULL (or a table with
/// none), by a PII value in one of its PII columns. No other column is ever looked at.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub keys: Vec<(String, Arc<KeySet>)>,
    pub pii: Vec<String>,
}

impl Scope {
    fn is_keyed(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The columns a match needs.
    fn columns(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| k.0.clone())
            .chain(self.pii.iter().cloned())
            .collect()
    }

    fn mask(&self, b: &RecordBatch, pii: &Needles) -> Vec<bool> {
        let n = b.num_rows();
        let mut hit = vec![false; n];
        let mut keyless = vec![true; n];
        for (c, set) in &self.keys {
            let Some(a) = b.column_by_name(c) else {
                continue;
            };
            for (i, m) in set.mask(a).into_iter().enumerate() {
                hit[i] |= m == Some(true);
                keyless[i] &= m.is_none();
            }
        }
        if !pii.has_pii() {
            return hit;
        }
        for c in &self.pii {
            let Some(cs) = b.column_by_name(c).and_then(cells) else {
                continue;
            };
            for (i, v) in cs.into_iter().enumerate() {
                if !hit[i] && keyless[i] && v.is_some_and(|v| pii.find_pii(&v)) {
                    hit[i] = true;
                }
            }
        }
        hit
    }
}

/// The quarantine of a source: raw records, told apart by parsing them as the source's format
/// and reading the key field ([`Records`]).
#[derive(Debug, Clone)]
struct RawScope {
    src: Source,
    keys: Arc<KeySet>,
    /// The header of each CSV landing file (`_source_file` → fields), read by the landing step.
    headers: HashMap<String, Vec<String>>,
    /// For a row whose landing file is gone: the header most of the source's files have, else
    /// the contract's columns in order.
    fallback: Vec<String>,
}

/// How one table's rows are matched.
#[derive(Debug, Clone)]
enum Matcher {
    Columns(Arc<Scope>),
    Raw(Arc<RawScope>),
}

impl Matcher {
    /// The columns to decode for a match.
    fn columns(&self) -> Vec<String> {
        match self {
            Matcher::Columns(s) => s.columns(),
            Matcher::Raw(_) => vec!["_source_file".into(), "raw_record".into()],
        }
    }

    fn mask(&self, b: &RecordBatch, pii: &Needles) -> BooleanArray {
        BooleanArray::from(match self {
            Matcher::Columns(s) => s.mask(b, pii),
            Matcher::Raw(r) => {
                let (Some(files), Some(raw)) = (
                    b.column_by_name("_source_file"),
                    b.column_by_name("raw_record"),
                ) else {
                    return BooleanArray::from(vec![false; b.num_rows()]);
                };
                let (files, raw) = (
                    arrow::compute::cast(files, &DataType::Utf8),
                    arrow::compute::cast(raw, &DataType::Utf8),
                );
                let (Ok(files), Ok(raw)) = (files, raw) else {
                    return BooleanArray::from(vec![false; b.num_rows()]);
                };
                let (files, raw) = (files.as_string::<i32>(), raw.as_string::<i32>());
                let rec = Records::new(&r.src, &r.keys, pii);
                (0..b.num_rows())
                    .map(|i| {
                        raw.is_valid(i) && {
                            let header = files
                                .is_valid(i)
                                .then(|| r.headers.get(files.value(i)))
                                .flatten()
                                .unwrap_or(&r.fallback);
                            rec.raw(raw.value(i), Some(header))
                        }
                    })
                    .collect()
            }
        })
    }
}

/// How the records of one source (in landing files and raw in its quarantine) are told to
/// belong to a subject: by the key field (the subject key or the subject_via column, as the
/// landing files name it) holding a value of the set; a record without a key value by a PII
/// value in one of its PII fields; a record that cannot be parsed into fields by a key value
/// or a PII value standing alone in its text.
struct Records<'a> {
    src: &'a Source,
    keys: &'a KeySet,
    pii: &'a Needles,
    key_field: Option<String>,
    /// The key column is an integer column (its fields compare as integers).
    key_int: bool,
    pii_fields: Vec<String>,
}

impl<'a> Records<'a> {
    fn new(src: &'a Source, keys: &'a KeySet, pii: &'a Needles) -> Self {
        let file_name = |c: &str| {
            src.columns
                .iter()
                .find(|x| x.name == c)
                .map(|x| x.source.clone())
        };
        let key = src
            .subject_key
            .clone()
            .or_else(|| src.subject_via.as_ref().map(|v| v.column.clone()));
        let key_int = key.as_deref().is_some_and(|k| {
            src.columns.iter().any(|c| {
                c.name == k
                    && matches!(
                        c.ty,
                        crate::project::contract::ColumnType::Int32
                            | crate::project::contract::ColumnType::Int64
                    )
            })
        });
        Records {
            src,
            keys,
            pii,
            key_field: key.as_deref().and_then(file_name),
            key_int,
            pii_fields: src.pii.iter().filter_map(|p| file_name(p)).collect(),
        }
    }

    /// Unparseable text: a key value or a PII value standing alone in it.
    fn text(&self, text: &str) -> bool {
        self.keys.find_in(text) || self.pii.find_pii(text)
    }

    /// Where a field sits in a CSV record: by the file's header, or (no header) by the
    /// contract's order.
    fn csv_index(&self, name: &str, header: Option<&[String]>) -> Option<usize> {
        match header {
            Some(h) => h.iter().position(|f| f == name),
            None if !self.src.parse.header => {
                self.src.columns.iter().position(|c| c.source == name)
            }
            None => None,
        }
    }

    fn csv(&self, rec: &csv::ByteRecord, header: Option<&[String]>) -> bool {
        let field = |i: usize| rec.get(i).map(|f| String::from_utf8_lossy(f).into_owned());
        let key_idx = self
            .key_field
            .as_deref()
            .and_then(|k| self.csv_index(k, header));
        if let Some(v) = key_idx.and_then(field)
            && !v.trim().is_empty()
        {
            return self.keys.matches_field(&v, self.key_int);
        }
        let pii_idx: Vec<usize> = self
            .pii_fields
            .iter()
            .filter_map(|p| self.csv_index(p, header))
            .collect();
        if header.is_none() && self.src.parse.header {
            // The file's header is unknown (a quarantined row of a file no longer in the
            // landing root): no field can be told apart, so the record's text is searched.
            let text: Vec<String> = rec
                .iter()
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .collect();
            return self.text(&text.join(","));
        }
        pii_idx
            .into_iter()
            .filter_map(field)
            .any(|v| self.pii.find_pii(&v))
    }

    fn json(&self, v: &serde_json::Value) -> bool {
        let Some(obj) = v.as_object() else {
            return self.text(&v.to_string());
        };
        match self.key_field.as_deref().and_then(|k| obj.get(k)) {
            Some(serde_json::Value::Number(x)) => {
                return match x.as_i64() {
                    Some(i) => self.keys.matches_int(i),
                    None => self.keys.matches_field(&x.to_string(), self.key_int),
                };
            }
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => {
                return self.keys.matches_field(s, self.key_int);
            }
            Some(serde_json::Value::Null) | Some(serde_json::Value::String(_)) | None => {}
            Some(other) => return self.text(&other.to_string()),
        }
        self.pii_fields
            .iter()
            .filter_map(|p| obj.get(p))
            .any(|v| match v {
                serde_json::Value::String(s) => self.pii.find_pii(s),
                serde_json::Value::Null => false,
                other => self.pii.find_pii(&other.to_string()),
            })
    }

    /// The PII field values (4 characters or more) of a record that belongs to a subject by
    /// its key field; nothing for another record.
    fn pii_of_csv(&self, rec: &csv::ByteRecord, header: Option<&[String]>) -> Vec<String> {
        let field = |i: usize| {
            rec.get(i)
                .map(|f| String::from_utf8_lossy(f).trim().to_string())
        };
        let key = self
            .key_field
            .as_deref()
            .and_then(|k| self.csv_index(k, header))
            .and_then(field);
        if !key.is_some_and(|k| self.keys.matches_field(&k, self.key_int)) {
            return Vec::new();
        }
        self.pii_fields
            .iter()
            .filter_map(|p| self.csv_index(p, header))
            .filter_map(field)
            .filter(|v| v.chars().count() >= 4)
            .collect()
    }

    fn pii_of_json(&self, v: &serde_json::Value) -> Vec<String> {
        let Some(obj) = v.as_object() else {
            return Vec::new();
        };
        let keyed = match self.key_field.as_deref().and_then(|k| obj.get(k)) {
            Some(serde_json::Value::Number(x)) => {
                x.as_i64().is_some_and(|i| self.keys.matches_int(i))
            }
            Some(serde_json::Value::String(s)) => self.keys.matches_field(s, self.key_int),
            _ => false,
        };
        if !keyed {
            return Vec::new();
        }
        self.pii_fields
            .iter()
            .filter_map(|p| obj.get(p).and_then(|v| v.as_str()))
            .map(|v| v.trim().to_string())
            .filter(|v| v.chars().count() >= 4)
            .collect()
    }

    /// The PII values of a subject's raw record (quarantine), or of each subject record of a
    /// landing file.
    fn pii_of_raw(&self, raw: &str, header: Option<&[String]>) -> Vec<String> {
        match self.src.format {
            Format::Csv => self
                .one_csv_record(raw)
                .map(|rec| self.pii_of_csv(&rec, header))
                .unwrap_or_default(),
            _ => serde_json::from_str::<serde_json::Value>(raw)
                .map(|v| self.pii_of_json(&v))
                .unwrap_or_default(),
        }
    }

    fn pii_of_file(&self, data: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        match self.src.format {
            Format::Csv => {
                let mut rdr = csv::ReaderBuilder::new()
                    .delimiter(self.src.parse.delimiter as u8)
                    .quote(self.src.parse.quote as u8)
                    .has_headers(false)
                    .flexible(true)
                    .from_reader(data);
                let mut rec = csv::ByteRecord::new();
                let mut header: Option<Vec<String>> = None;
                while let Ok(true) = rdr.read_byte_record(&mut rec) {
                    if header.is_none() && self.src.parse.header {
                        header = Some(header_fields(&rec));
                        continue;
                    }
                    out.extend(self.pii_of_csv(&rec, header.as_deref()));
                }
            }
            Format::Ndjson => {
                for line in data.split(|b| *b == b'\n') {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) {
                        out.extend(self.pii_of_json(&v));
                    }
                }
            }
            Format::JsonArray | Format::Json => {
                let body = data.strip_prefix(b"\xef\xbb\xbf").unwrap_or(data);
                match serde_json::from_slice::<serde_json::Value>(body) {
                    Ok(serde_json::Value::Array(items)) => {
                        for v in &items {
                            out.extend(self.pii_of_json(v));
                        }
                    }
                    // A truncated document: its lines one by one, as NDJSON would be.
                    _ => {
                        for line in body.split(|b| *b == b'\n') {
                            let line = String::from_utf8_lossy(line);
                            let t = line.trim().trim_start_matches('[').trim_end_matches(',');
                            if let Ok(v) = serde_json::from_str::<serde_json::Value>(t) {
                                out.extend(self.pii_of_json(&v));
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// A raw CSV record (as the quarantine keeps it) split into fields by the source's options.
    fn one_csv_record(&self, raw: &str) -> Option<csv::ByteRecord> {
        let mut rdr = csv::ReaderBuilder::new()
            .delimiter(self.src.parse.delimiter as u8)
            .quote(self.src.parse.quote as u8)
            .has_headers(false)
            .flexible(true)
            .from_reader(raw.as_bytes());
        let mut rec = csv::ByteRecord::new();
        matches!(rdr.read_byte_record(&mut rec), Ok(true)).then_some(rec)
    }

    /// One raw record as the quarantine keeps it.
    fn raw(&self, raw: &str, header: Option<&[String]>) -> bool {
        match self.src.format {
            Format::Csv => match self.one_csv_record(raw) {
                Some(rec) => self.csv(&rec, header),
                None => self.text(raw),
            },
            _ => match serde_json::from_str::<serde_json::Value>(raw) {
                Ok(v) => self.json(&v),
                Err(_) => self.text(raw),
            },
        }
    }
}

fn decode_parquet(data: Bytes, what: &str) -> Result<Vec<RecordBatch>> {
    decode_parquet_for(data, what, None)
}

/// Decode a Parquet file; with `cols`, only those of them the file has (none of them: nothing
/// to match, no rows).
fn decode_parquet_for(
    data: Bytes,
    what: &str,
    cols: Option<&[String]>,
) -> Result<Vec<RecordBatch>> {
    let err = |source: parquet::errors::ParquetError| Error::Parquet {
        what: format!("{what}: cannot read Parquet"),
        source,
    };
    let mut builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(data)
        .map_err(err)?;
    if let Some(cols) = cols {
        let present: Vec<&str> = cols
            .iter()
            .map(String::as_str)
            .filter(|c| builder.schema().field_with_name(c).is_ok())
            .collect();
        if present.is_empty() {
            return Ok(Vec::new());
        }
        let mask = parquet::arrow::ProjectionMask::columns(builder.parquet_schema(), present);
        builder = builder.with_projection(mask);
    }
    let reader = builder.build().map_err(err)?;
    reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Parquet {
            what: format!("{what}: cannot read Parquet"),
            source: e.into(),
        })
}

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

/// Which tables an erasure reaches, and how it matches rows in each. A table is in scope only
/// through a declared key: a source's `subject_key`, a source's `subject_via` (the keys of its
/// parent's subject rows), a model column named like a key of an upstream in scope, or a
/// model's `config(subject_key=…)`. Models reading a table in scope without such a column are
/// rebuilt; no other table is read.
#[derive(Debug, Default)]
pub struct Plan {
    /// In-scope sources, parents before the sources that reach subjects through them.
    pub sources: Vec<String>,
    source_scopes: HashMap<String, Arc<Scope>>,
    /// Models reading a table in scope (directly or through other models) or declaring a
    /// subject key, in dag order, with their key columns (empty: rebuilt, not erased in place).
    pub models: Vec<(String, Arc<Scope>)>,
    /// The subjects' PII values (and the ids, for unstructured text).
    pub needles: Arc<Needles>,
    /// Values derived through `subject_via`, per source, as HMACs for the audit.
    derived_hmacs: BTreeMap<String, Vec<String>>,
    /// The subjects' PII values as HMACs, for the audit.
    pii_hmacs: Vec<String>,
    /// Sources that declare PII but no path to a subject (not searched).
    pub warnings: Vec<String>,
    source_defs: HashMap<String, Source>,
}

impl Plan {
    /// Resolve the scope of an erasure of `ids`: validate that every source holding subject
    /// data declares how (a configuration error before anything is rewritten), derive the
    /// `subject_via` keys and read the subjects' PII values from bronze (live and retained
    /// files), and find the models that carry the keys. `stored`: per source, HMACs of derived
    /// keys an earlier run of the same request recorded.
    pub async fn resolve(
        silt: &Silt,
        dag: &Dag,
        ids: &[String],
        hmac_key: &str,
        stored: &BTreeMap<String, Vec<String>>,
    ) -> Result<Plan> {
        let project = &silt.project;
        check_paths(project)?;
        let mut plan = Plan {
            source_defs: project.sources.clone().into_iter().collect(),
            ..Default::default()
        };
        let mut id_set = KeySet {
            hmac_key: Some(hmac_key.to_string()),
            ..Default::default()
        };
        for i in ids {
            id_set.insert(i);
        }
        let id_set = Arc::new(id_set);
        plan.scope_sources(silt, &id_set, hmac_key, stored).await?;
        let mut needles = Needles {
            ids: id_set.text.iter().cloned().collect(),
            pii_hmacs: stored
                .get(PII_HMACS)
                .into_iter()
                .flatten()
                .cloned()
                .collect(),
            hmac_key: Some(hmac_key.to_string()),
            ..Default::default()
        };
        plan.pii_from_bronze(silt, &mut needles).await?;
        plan.pii_not_in_bronze(silt, &mut needles).await?;
        plan.pii_hmacs = needles.pii_hmac_list(hmac_key);
        plan.needles = Arc::new(needles);
        plan.scope_models(silt, dag, &id_set).await?;
        for s in project.sources.values() {
            if !plan.source_scopes.contains_key(&s.name)
                && s.holds_subjects.is_none()
                && !s.pii.is_empty()
            {
                plan.warnings.push(format!(
                    "bronze.{}: declares PII columns ({}) but no subject_key or subject_via, so silt forget does not search it (declare holds_subjects = false in {} to say it holds no subject's data)",
                    s.name,
                    s.pii.join(", "),
                    s.file
                ));
            }
        }
        Ok(plan)
    }

    /// The sources in scope, parents before their `subject_via` children, each with the key
    /// it matches subjects by: its subject key (the ids), or the keys of the parent's rows of
    /// the subjects (derived from bronze, plus `stored` ones of an earlier run).
    async fn scope_sources(
        &mut self,
        silt: &Silt,
        id_set: &Arc<KeySet>,
        hmac_key: &str,
        stored: &BTreeMap<String, Vec<String>>,
    ) -> Result<()> {
        let mut order: Vec<&Source> = Vec::new();
        let mut pending: Vec<&Source> = silt
            .project
            .sources
            .values()
            .filter(|s| s.subject_key.is_some() || s.subject_via.is_some())
            .collect();
        while !pending.is_empty() {
            let before = pending.len();
            pending.retain(|s| {
                let ready = match &s.subject_via {
                    None => true,
                    Some(v) => order.iter().any(|o| o.name == v.parent()),
                };
                if ready {
                    order.push(s);
                }
                !ready
            });
            if pending.len() == before {
                break; // check_paths has ruled cycles out
            }
        }
        for s in &order {
            let keys = match (&s.subject_key, &s.subject_via) {
                (Some(k), _) => (k.clone(), id_set.clone()),
                (None, Some(v)) => {
                    let parent = &self.source_scopes[v.parent()];
                    let mut set =
                        derive(silt, &TableRef::bronze(v.parent()), parent, &v.key).await?;
                    set.hmac_key = Some(hmac_key.to_string());
                    set.hmacs
                        .extend(stored.get(&s.name).into_iter().flatten().cloned());
                    let set = Arc::new(set);
                    self.derived_hmacs
                        .insert(s.name.clone(), set.hmacs(hmac_key));
                    (v.column.clone(), set)
                }
                (None, None) => continue,
            };
            let scope = Arc::new(Scope {
                keys: vec![keys],
                pii: s.pii.clone(),
            });
            self.sources.push(s.name.clone());
            self.source_scopes.insert(s.name.clone(), scope);
        }
        Ok(())
    }

    /// The subjects' PII values, from every file (live or retained) of the sources in scope:
    /// what is still anywhere is found.
    async fn pii_from_bronze(&self, silt: &Silt, needles: &mut Needles) -> Result<()> {
        for name in &self.sources {
            let src = &silt.project.sources[name];
            if src.pii.is_empty() {
                continue;
            }
            let key_only = Scope {
                keys: self.source_scopes[name].keys.clone(),
                pii: vec![],
            };
            let t = TableRef::bronze(name);
            let cols: Vec<String> = key_only
                .columns()
                .into_iter()
                .chain(src.pii.clone())
                .collect();
            for (inner, loc) in data_files(silt, &t).await? {
                for b in decode_parquet_for(silt.lake.get(&loc).await?, &inner, Some(&cols))? {
                    let mask = BooleanArray::from(key_only.mask(&b, &Needles::default()));
                    if mask.true_count() == 0 {
                        continue;
                    }
                    let b = arrow::compute::filter_record_batch(&b, &mask)?;
                    for p in &src.pii {
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
                                needles.pii.insert(v);
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The subjects' PII values from their records that never reached bronze: quarantined
    /// ones, and landing files not ingested yet (a quarantined twin without the id still
    /// carries the name and email).
    async fn pii_not_in_bronze(&self, silt: &Silt, needles: &mut Needles) -> Result<()> {
        let listed = silt.landing.list_landing().await?.0;
        for name in &self.sources {
            let src = &silt.project.sources[name];
            if src.pii.is_empty() {
                continue;
            }
            let keys = self.keys_of(name).expect("a source in scope has keys");
            let rec = Records::new(src, &keys, needles);
            let mut found: Vec<String> = Vec::new();
            let fallback: Vec<String> = src.columns.iter().map(|c| c.source.clone()).collect();
            let q = TableRef::quarantine(name);
            let cols = ["raw_record".to_string()];
            for (inner, loc) in data_files(silt, &q).await? {
                for b in decode_parquet_for(silt.lake.get(&loc).await?, &inner, Some(&cols))? {
                    let Some(raw) = b
                        .column_by_name("raw_record")
                        .and_then(|c| arrow::compute::cast(c, &DataType::Utf8).ok())
                    else {
                        continue;
                    };
                    let raw = raw.as_string::<i32>();
                    for i in 0..raw.len() {
                        if raw.is_valid(i) {
                            found.extend(rec.pii_of_raw(raw.value(i), Some(&fallback)));
                        }
                    }
                }
            }
            for m in &listed {
                if silt
                    .landing
                    .relative(&m.location)
                    .is_some_and(|rel| src.glob.is_match(&rel))
                {
                    let data = silt.landing.get(&m.location).await?;
                    if keys.hmacs.is_empty() && !keys.find_in(&String::from_utf8_lossy(&data)) {
                        continue;
                    }
                    found.extend(rec.pii_of_file(&data));
                }
            }
            needles.pii.extend(found);
        }
        Ok(())
    }

    /// Models, in dag order, with the key columns they carry from upstream tables in scope:
    /// a source's key, and the key its subject_via children reach subjects through (a model
    /// of orders that keeps o_orderkey but not the customer key still holds the subjects'
    /// orders), and its own subject_key.
    async fn scope_models(&mut self, silt: &Silt, dag: &Dag, id_set: &Arc<KeySet>) -> Result<()> {
        let project = &silt.project;
        let mut inherited: HashMap<String, Vec<(String, Arc<KeySet>)>> = self
            .source_scopes
            .iter()
            .map(|(n, sc)| (n.clone(), sc.keys.clone()))
            .collect();
        for name in &self.sources {
            if let Some(v) = &project.sources[name].subject_via
                && let Some(set) = self.keys_of(name)
            {
                inherited
                    .entry(v.parent().to_string())
                    .or_default()
                    .push((v.key.clone(), set));
            }
        }
        let project_pii = project.pii_columns();
        let mut model_keys: HashMap<String, Vec<(String, Arc<KeySet>)>> = HashMap::new();
        for name in &dag.order {
            let m = &dag.models[name];
            let mut upstream: Vec<(String, Arc<KeySet>)> = Vec::new();
            let mut reached = false;
            for s in &m.sources {
                if let Some(keys) = inherited.get(s) {
                    reached = true;
                    upstream.extend(keys.iter().cloned());
                }
            }
            for r in &m.refs {
                if let Some(k) = model_keys.get(r) {
                    reached = true;
                    upstream.extend(k.iter().cloned());
                }
            }
            if let Some(k) = &m.config.subject_key {
                reached = true;
                upstream.push((k.clone(), id_set.clone()));
            }
            if !reached {
                continue;
            }
            let schema = match silt.lake.delta_table(&m.table().rel_path()).await? {
                t if t.version().is_some() => Some(
                    t.snapshot()
                        .map_err(|e| Error::delta(m.table().to_string(), e))?
                        .snapshot()
                        .arrow_schema(),
                ),
                _ => None,
            };
            let has = |c: &str| {
                schema
                    .as_ref()
                    .is_some_and(|s| s.field_with_name(c).is_ok())
            };
            let mut keys: Vec<(String, Arc<KeySet>)> = Vec::new();
            for (c, set) in upstream {
                if has(&c) && !keys.iter().any(|(k, s)| *k == c && Arc::ptr_eq(s, &set)) {
                    keys.push((c, set));
                }
            }
            let pii: Vec<String> = project_pii
                .iter()
                .chain(m.config.pii.iter())
                .filter(|c| has(c) && !m.config.pseudonymize.contains_key(*c))
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            model_keys.insert(name.clone(), keys.clone());
            self.models
                .push((name.clone(), Arc::new(Scope { keys, pii })));
        }
        Ok(())
    }

    /// How rows of `t` are matched, when `t` is in scope.
    fn matcher(&self, t: &TableRef, headers: &HashMap<String, Vec<String>>) -> Option<Matcher> {
        match t.layer {
            Layer::Bronze => self
                .source_scopes
                .get(&t.name)
                .map(|s| Matcher::Columns(s.clone())),
            Layer::Quarantine => {
                let scope = self.source_scopes.get(&t.name)?;
                let src = self.source(t)?.clone();
                let mut counts: HashMap<&Vec<String>, usize> = HashMap::new();
                for h in headers.values() {
                    *counts.entry(h).or_default() += 1;
                }
                let fallback = counts
                    .into_iter()
                    .max_by_key(|(h, n)| (*n, (*h).clone()))
                    .map(|(h, _)| h.clone())
                    .unwrap_or_else(|| src.columns.iter().map(|c| c.source.clone()).collect());
                Some(Matcher::Raw(Arc::new(RawScope {
                    src,
                    keys: scope.keys.first()?.1.clone(),
                    headers: headers.clone(),
                    fallback,
                })))
            }
            Layer::Silver | Layer::Gold => self
                .models
                .iter()
                .find(|(n, _)| *n == t.name)
                .map(|(_, s)| Matcher::Columns(s.clone())),
            Layer::Silt => None,
        }
    }

    fn source(&self, t: &TableRef) -> Option<&Source> {
        self.source_defs.get(&t.name)
    }

    /// The key set of an in-scope source's records.
    fn keys_of(&self, source: &str) -> Option<Arc<KeySet>> {
        self.source_scopes
            .get(source)
            .and_then(|s| s.keys.first())
            .map(|k| k.1.clone())
    }
}

/// The values of column `key` on the rows of `t` (every data file, live or retained) that
/// belong to a subject by `scope`: the keys a `subject_via` child reaches subjects through.
async fn derive(silt: &Silt, t: &TableRef, scope: &Scope, key: &str) -> Result<KeySet> {
    let mut set = KeySet::default();
    let cols: Vec<String> = scope
        .keys
        .iter()
        .map(|k| k.0.clone())
        .chain([key.to_string()])
        .collect();
    let key_only = Scope {
        keys: scope.keys.clone(),
        pii: vec![],
    };
    for (inner, loc) in data_files(silt, t).await? {
        for b in decode_parquet_for(silt.lake.get(&loc).await?, &inner, Some(&cols))? {
            let Some(values) = b.column_by_name(key) else {
                continue;
            };
            let mask = key_only.mask(&b, &Needles::default());
            if !mask.iter().any(|m| *m) {
                continue;
            }
            let values = arrow::compute::cast(values, &DataType::Utf8)?;
            let values = values.as_string::<i32>();
            for (i, m) in mask.into_iter().enumerate() {
                if m && values.is_valid(i) {
                    set.insert(values.value(i));
                }
            }
        }
    }
    Ok(set)
}

/// Every source that holds subject data declares how it reaches a subject: a configuration
/// error (before anything is rewritten) when a source without `subject_key`/`subject_via`
/// has a column named like a subject key of another source, a column named like the primary
/// key of a source in scope, or a relationships test to one.
fn check_paths(project: &crate::project::config::Project) -> Result<()> {
    let in_scope: Vec<&Source> = project
        .sources
        .values()
        .filter(|s| s.subject_key.is_some() || s.subject_via.is_some())
        .collect();
    let mut problems = Vec::new();
    for s in project.sources.values() {
        if s.subject_key.is_some() || s.subject_via.is_some() || s.holds_subjects == Some(false) {
            continue;
        }
        let has = |c: &str| s.columns.iter().any(|x| x.name == c);
        // A column of the source's own primary key is its own identity (`id` in two sources
        // says nothing), not a reference to another source's key.
        let refers = |c: &str| has(c) && !s.primary_key.iter().any(|k| k == c);
        let mut fix: Option<String> = None;
        for p in &in_scope {
            if let Some(k) = &p.subject_key
                && has(k)
            {
                fix = Some(format!(
                    "column '{k}' is the subject key of source '{}': add subject_key = \"{k}\"",
                    p.name
                ));
                break;
            }
            if let [pk] = p.primary_key.as_slice()
                && refers(pk)
            {
                fix = Some(format!(
                    "column '{pk}' is the key of source '{}', whose rows belong to subjects: add subject_via = {{ column = \"{pk}\", table = \"{}\", key = \"{pk}\" }}",
                    p.name, p.name
                ));
                break;
            }
        }
        if fix.is_none() {
            for t in s.tests.iter().filter(|t| t.kind == "relationships") {
                let (Some(col), Some(to)) = (&t.column, &t.to) else {
                    continue;
                };
                let to = to.strip_prefix("bronze.").unwrap_or(to);
                if let Some(p) = in_scope.iter().find(|p| p.name == to) {
                    let key = t.field.clone().unwrap_or_else(|| col.clone());
                    fix = Some(format!(
                        "its relationships test leads '{col}' to source '{}', whose rows belong to subjects: add subject_via = {{ column = \"{col}\", table = \"{}\", key = \"{key}\" }}",
                        p.name, p.name
                    ));
                    break;
                }
            }
        }
        if let Some(f) = fix {
            problems.push(format!(
                "{}: source '{}' holds data of the subjects but declares no path to them; {f} (or holds_subjects = false if its rows belong to no subject)",
                s.file, s.name
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(Error::config(
        "sql/bronze",
        format!(
            "silt forget cannot reach every table holding the subjects' data; nothing was changed:\n  {}",
            problems.join("\n  ")
        ),
    ))
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

/// How many bytes of rewritten landing files wait for one ledger commit (a commit per file
/// would make the landing step mostly ledger writes).
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

    /// Rewrite (or remove) the landing files of `src` that hold a subject's records (by the
    /// key field, `keys` holding the values that belong to the subjects).
    async fn landing(
        &mut self,
        src: &Source,
        keys: Arc<KeySet>,
        listed: &[object_store::ObjectMeta],
    ) -> Result<()> {
        let landing = &self.silt.landing;
        let mut step = TableErasure::new(format!("landing:{}", src.name), Step::Landing);
        let entries = ledger::read(&self.silt.catalog, &src.name).await?;
        let mut latest: HashMap<String, LedgerEntry> = HashMap::new();
        for e in entries {
            latest.insert(e.path.clone(), e);
        }
        let batch_id = format!("erasure-{}", self.request);
        let mut group = LandingGroup::default();
        let mut files = Vec::new();
        for m in listed {
            let Some(rel) = landing.relative(&m.location) else {
                continue;
            };
            if src.glob.is_match(&rel) {
                files.push((m.location.clone(), rel));
            }
        }
        step.files_scanned = files.len() as u64;
        // Each file is read, searched and rewritten in its own task, two at a time; the
        // results come back in listing order, so the ledger groups are as before.
        let shared = Arc::new(src.clone());
        let headers: Arc<std::sync::Mutex<HashMap<String, Vec<String>>>> = Default::default();
        let jobs = files.into_iter().map(|(location, rel)| {
            let (landing, n, shared, keys, headers) = (
                landing.clone(),
                self.n.clone(),
                shared.clone(),
                keys.clone(),
                headers.clone(),
            );
            async move {
                let src = &*shared;
                let data = landing.get(&location).await?;
                if src.format == Format::Csv
                    && src.parse.header
                    && let Some(h) = csv_header(&data, src)
                {
                    headers.lock().unwrap().insert(rel.clone(), h);
                }
                let rec = Records::new(src, &keys, &n);
                let Some((bytes, dropped)) = without_subjects(&data, &rec) else {
                    return Ok(None);
                };
                let rewritten = match src.on_erasure {
                    ErasurePolicy::Remove => None,
                    ErasurePolicy::Rewrite => Some((bytes, dropped)),
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
                    status: FileStatus::Rewritten,
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
                    status: FileStatus::Erased,
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
        drop(found);
        self.land(group, &batch_id, &mut step).await?;
        let headers = std::mem::take(&mut *headers.lock().unwrap());
        self.headers.insert(src.name.clone(), headers);
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
        ledger::record(&self.silt.lake, &group.entries, batch_id).await?;
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
        how: &Matcher,
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
        let mut step = TableErasure::new(t.to_string(), Step::Rewrite);
        let files: Vec<_> = snap
            .log_data()
            .iter()
            .map(|f| (f.path().to_string(), f.remove_action(true)))
            .collect();
        // The scan decodes the matched columns of every file, `FILES_AT_ONCE` files at a time.
        let needles = self.n.clone();
        let cols = Arc::new(how.columns());
        step.files_scanned = files.len() as u64;
        let scans = files.iter().map(|(path, _)| {
            let loc = lake.file_path(&t.rel_path(), path);
            let (lake, path, n, how, cols) = (
                lake.clone(),
                path.clone(),
                needles.clone(),
                how.clone(),
                cols.clone(),
            );
            async move {
                let mut hits = 0;
                for b in decode_parquet_for(lake.get(&loc).await?, &path, Some(&cols))? {
                    hits += how.mask(&b, &n).true_count();
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
                seen.clean.insert(same_path(&path));
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
        seen.hit
            .extend(step.files_rewritten.iter().map(|p| same_path(p)));
        seen.clean.extend(adds.iter().map(|a| same_path(&a.path)));
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

    /// The models of the plan, in dag order.
    /// Returns what each model step did, for the run log.
    async fn models(&mut self, dag: &Dag, plan: &Plan, key: &str) -> Result<Vec<ModelMetrics>> {
        let silt = self.silt;
        let pii: BTreeSet<String> = silt.project.no_stats_columns();
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
        for (name, scope) in &plan.models {
            let m = &dag.models[name];
            let t = m.table();
            let table = silt.lake.delta_table(&t.rel_path()).await?;
            if table.version().is_none() {
                continue;
            }
            let keyed = scope.is_keyed();
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
                let how = Matcher::Columns(scope.clone());
                let started = Instant::now();
                if let Some(v) = self
                    .rewrite(&t, &how, state.map(|s| (name.as_str(), s)))
                    .await?
                    && let Some(step) = self.steps.last().filter(|s| s.table == t.to_string())
                {
                    rebuilt.push(ModelMetrics {
                        model: name.clone(),
                        table: t.to_string(),
                        materialized: "erasure".into(),
                        status: ModelStatus::Built,
                        mode: BuildMode::InPlace,
                        rows_deleted: step.rows_deleted,
                        files_added: step.files_added,
                        files_removed: step.files_rewritten.len() as u64,
                        version: Some(v),
                        ms: started.elapsed().as_millis() as u64,
                        ..Default::default()
                    });
                }
                failpoint::hit("forget.table");
            } else {
                // Rebuilt from upstream (which no longer holds the subjects). History-keeping
                // models without the key carry the subjects inside aggregates: from scratch.
                let mat = mk(keeps_history);
                let mm = mat.build(m).await?;
                if mm.status != ModelStatus::UpToDate {
                    let step = TableErasure {
                        rows_deleted: mm.rows_deleted,
                        files_added: mm.files_added,
                        version: mm.version,
                        partitions: mm.partitions.clone(),
                        ..TableErasure::new(t.to_string(), Step::Rebuild)
                    };
                    self.step_audit(&step).await?;
                    self.steps.push(step);
                    rebuilt.push(mm);
                }
                failpoint::hit("forget.table");
            }
        }
        Ok(rebuilt)
    }

    /// Delete every data file of `t` that still holds a subject (none is live any more), after
    /// a checkpoint and after the log versions that reference them are gone.
    async fn purge(&mut self, t: &TableRef, how: &Matcher) -> Result<()> {
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
            .map(|f| same_path(f.path().as_ref()))
            .collect();
        let mut step = TableErasure::new(t.to_string(), Step::Purge);
        let seen = self.seen.remove(&t.to_string()).unwrap_or_default();
        let cols = how.columns();
        if cols.is_empty() {
            // Neither a key nor a PII column: nothing of a subject can be in it.
            return Ok(());
        }
        let mut doomed = Vec::new();
        let mut live_hits = Vec::new();
        for (inner, loc) in data_files(self.silt, t).await? {
            // Listed and logged paths compared in one spelling.
            let inner = same_path(&inner);
            if seen.hit.contains(&inner) && !live.contains(&inner) {
                doomed.push((inner, loc));
                continue;
            }
            if seen.clean.contains(&inner) {
                continue;
            }
            step.files_scanned += 1;
            let mut hit = false;
            for b in decode_parquet_for(lake.get(&loc).await?, &inner, Some(&cols))? {
                if how.mask(&b, &self.n).true_count() > 0 {
                    hit = true;
                    break;
                }
            }
            if !hit {
                continue;
            }
            if live.contains(&inner) {
                live_hits.push(inner);
                continue;
            }
            doomed.push((inner, loc));
        }
        if !live_hits.is_empty() {
            // A table without a key column that a rebuild did not clear (it reads the PII from
            // somewhere no erasure reaches): said once, with what to do.
            step.warnings.push(format!(
                "{t}: {} live file(s) still hold a PII value of a subject in column(s) {} and the table has no subject key column: give the model config(subject_key='…') or pseudonymize the column",
                live_hits.len(),
                match how {
                    Matcher::Columns(s) => s.pii.join(", "),
                    Matcher::Raw(_) => "raw_record".into(),
                }
            ));
        }
        if doomed.is_empty() {
            if !step.warnings.is_empty() {
                self.steps.push(step);
            }
            return Ok(());
        }
        // The log versions that reference a doomed file (or whose file statistics show a
        // subject's key) go, down from the first one; a checkpoint at the current version
        // keeps the table readable.
        let log_rel = format!("{}/_delta_log", t.rel_path());
        let doomed_names: HashSet<&str> = doomed.iter().map(|d| d.0.as_str()).collect();
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
            if log_mentions(&name, data, &doomed_names, how, &self.n)? {
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
    futures::stream::iter(
        jobs.map(
            move |job| async move { tokio::spawn(job).await.map_err(|e| Error::task(what, e))? },
        ),
    )
    .buffered(FILES_AT_ONCE)
}

/// One data file of an in-place erasure: its rows without the subjects' go to new files.
struct FileRewrite {
    table: DeltaTable,
    ctx: SessionContext,
    path: String,
    needles: Arc<Needles>,
    how: Matcher,
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
            .with_file_selection(crate::lake::storage::select_files([path]))
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
            let mask = how.mask(&b, &needles);
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
                        Error::Internal(format!("{t}: column {} missing on read", f.name()))
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

/// Whether a log file (a JSON commit or a Parquet checkpoint) references one of `doomed` or
/// carries a subject in a file's statistics (a key column's min or max, a PII value).
fn log_mentions(
    name: &str,
    data: Bytes,
    doomed: &HashSet<&str>,
    how: &Matcher,
    n: &Needles,
) -> Result<bool> {
    if name.ends_with(".json") {
        for line in data.split(|b| *b == b'\n') {
            let Ok(a) = serde_json::from_slice::<serde_json::Value>(line) else {
                continue;
            };
            for kind in ["add", "remove"] {
                let Some(f) = a.get(kind) else { continue };
                if f.get("path")
                    .and_then(|p| p.as_str())
                    .map(same_path)
                    .is_some_and(|p| {
                        doomed.contains(p.as_str()) || doomed.iter().any(|d| p.ends_with(d))
                    })
                {
                    return Ok(true);
                }
                if let Some(stats) = f.get("stats").and_then(|s| s.as_str())
                    && let Ok(stats) = serde_json::from_str::<serde_json::Value>(stats)
                    && stats_mention(&stats, how, n)
                {
                    return Ok(true);
                }
            }
        }
        return Ok(false);
    }
    if name.ends_with(".parquet") {
        for b in decode_parquet(data, name)? {
            for c in b.columns() {
                if let Some(cs) = cells(c)
                    && cs
                        .iter()
                        .flatten()
                        .map(|s| same_path(s))
                        .any(|s| doomed.iter().any(|d| s.contains(d)))
                {
                    return Ok(true);
                }
            }
            // A checkpoint's add and remove actions carry their files' statistics as JSON.
            for kind in ["add", "remove"] {
                let Some(stats) = b
                    .column_by_name(kind)
                    .and_then(|c| c.as_struct_opt())
                    .and_then(|s| s.column_by_name("stats"))
                    .and_then(|c| arrow::compute::cast(c, &DataType::Utf8).ok())
                else {
                    continue;
                };
                let stats = stats.as_string::<i32>();
                for i in 0..stats.len() {
                    if stats.is_valid(i)
                        && let Ok(v) = serde_json::from_str::<serde_json::Value>(stats.value(i))
                        && stats_mention(&v, how, n)
                    {
                        return Ok(true);
                    }
                }
            }
        }
    }
    Ok(false)
}

/// A file's statistics show a subject: a key column's min or max is a key of the set, or a PII
/// column's min or max holds a PII value.
fn stats_mention(stats: &serde_json::Value, how: &Matcher, n: &Needles) -> bool {
    let Matcher::Columns(scope) = how else {
        return false;
    };
    ["minValues", "maxValues"].iter().any(|side| {
        let Some(values) = stats.get(*side) else {
            return false;
        };
        scope.keys.iter().any(|(c, set)| match values.get(c) {
            Some(serde_json::Value::Number(x)) => x.as_i64().is_some_and(|i| set.matches_int(i)),
            Some(serde_json::Value::String(s)) => set.matches_field(s, false),
            _ => false,
        }) || scope.pii.iter().any(|c| match values.get(c) {
            Some(serde_json::Value::String(s)) => n.find_pii(s),
            _ => false,
        })
    })
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

/// A landing file without the subjects' records, and how many it dropped; `None` when it
/// holds none. A file in whose text no key value or PII value stands alone is not parsed.
fn without_subjects(data: &[u8], rec: &Records) -> Option<(Vec<u8>, u64)> {
    let text = String::from_utf8_lossy(data);
    if rec.keys.hmacs.is_empty() && !rec.keys.find_in(&text) && !rec.pii.find_pii(&text) {
        return None;
    }
    let (bytes, dropped) = match rec.src.format {
        Format::Csv => drop_csv_records(data, rec),
        Format::Ndjson => drop_ndjson_lines(data, rec),
        Format::JsonArray | Format::Json => drop_json_elements(data, rec)?,
    };
    (dropped > 0).then_some((bytes, dropped))
}

/// The header of a CSV landing file (its first record's fields, BOM and spaces trimmed).
fn csv_header(data: &[u8], src: &Source) -> Option<Vec<String>> {
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(src.parse.delimiter as u8)
        .quote(src.parse.quote as u8)
        .has_headers(false)
        .flexible(true)
        .from_reader(data);
    let mut rec = csv::ByteRecord::new();
    match rdr.read_byte_record(&mut rec) {
        Ok(true) => Some(header_fields(&rec)),
        _ => None,
    }
}

/// A CSV header record's field names, BOM and spaces trimmed.
fn header_fields(rec: &csv::ByteRecord) -> Vec<String> {
    rec.iter()
        .map(|f| {
            String::from_utf8_lossy(f)
                .trim_start_matches('\u{feff}')
                .trim()
                .to_string()
        })
        .collect()
}

/// CSV: drop the subjects' records ([`Records::csv`]); every other byte stays as it was.
fn drop_csv_records(data: &[u8], rec_test: &Records) -> (Vec<u8>, u64) {
    // Ingest's own splitter, with its quote limit: the records are the ones ingest saw (an
    // unterminated quote refuses one line, it does not swallow the records after it).
    let src = rec_test.src;
    let mut split = crate::ingest::parse::csv_records::Records::new(
        data,
        src.parse.delimiter as u8,
        src.parse.quote as u8,
    )
    .with_quote_limit(src.parse.max_quoted_lines);
    let mut out = Vec::with_capacity(data.len());
    let mut header: Option<Vec<String>> = None;
    let mut first = src.parse.header;
    let mut cursor = 0usize;
    let mut dropped = 0;
    let mut rec = csv::ByteRecord::new();
    while let Some(at) = split.next_record() {
        rec.clear();
        for f in split.iter() {
            rec.push_field(f);
        }
        if first {
            first = false;
            header = Some(header_fields(&rec));
            continue;
        }
        let hit = match &at.broken {
            Some(_) => rec_test.text(&String::from_utf8_lossy(&data[at.start..at.end])),
            None => rec_test.csv(&rec, header.as_deref()),
        };
        if hit {
            // Everything before the record stays; the record and its line ending go.
            out.extend_from_slice(&data[cursor..at.start]);
            let mut end = at.end;
            if data.get(end) == Some(&b'\r') {
                end += 1;
            }
            if data.get(end) == Some(&b'\n') {
                end += 1;
            }
            cursor = end;
            dropped += 1;
        }
    }
    out.extend_from_slice(&data[cursor.min(data.len())..]);
    (out, dropped)
}

fn drop_ndjson_lines(data: &[u8], rec: &Records) -> (Vec<u8>, u64) {
    let mut out = Vec::with_capacity(data.len());
    let mut dropped = 0;
    for line in data.split_inclusive(|b| *b == b'\n') {
        let hit = match serde_json::from_slice::<serde_json::Value>(line) {
            Ok(v) => rec.json(&v),
            Err(_) => {
                let text = String::from_utf8_lossy(line);
                !text.trim().is_empty() && rec.text(&text)
            }
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
fn drop_json_elements(data: &[u8], rec: &Records) -> Option<(Vec<u8>, u64)> {
    let (bom, body) = match data.strip_prefix(b"\xef\xbb\xbf") {
        Some(b) => (&data[..3], b),
        None => (&data[..0], data),
    };
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'[' {
        return Some(drop_ndjson_lines(data, rec));
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
            Ok(v) => rec.json(&v),
            Err(_) => rec.text(&String::from_utf8_lossy(&e)),
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
        if !t.is_empty() && rec.text(&String::from_utf8_lossy(&t)) {
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
    let key = key_of(silt)?;
    let dag = Dag::load(&silt.project)?;
    // The keys that subject_via sources reached the subjects through, as an erasure of them
    // recorded (the parent rows they came from are gone by now).
    let wanted: HashSet<String> = ids.iter().map(|i| hmac_hex(&key, i.trim())).collect();
    let mut stored: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in audit_entries(&silt.catalog).await? {
        if e.subject_hmacs.split(',').any(|h| wanted.contains(h)) {
            for (src, hs) in e.key_hmacs {
                stored.entry(src).or_default().extend(hs);
            }
        }
    }
    let plan = Plan::resolve(silt, &dag, ids, &key, &stored).await?;
    let mut report = VerifyReport::default();
    let headers = verify_landing(silt, &plan, &mut report).await?;
    // The lake: every data file and log entry of the tables in scope, live or retained.
    let mut tables: Vec<TableRef> = plan
        .models
        .iter()
        .map(|(name, _)| dag.models[name].table())
        .collect();
    for name in &plan.sources {
        tables.push(TableRef::bronze(name));
        tables.push(TableRef::quarantine(name));
    }
    for t in tables {
        let none = HashMap::new();
        let Some(how) = plan.matcher(&t, headers.get(&t.name).unwrap_or(&none)) else {
            continue;
        };
        if how.columns().is_empty() {
            continue;
        }
        verify_table(silt, &t, &how, &plan.needles, &mut report).await?;
    }
    Ok(report)
}

/// Scan the landing files of the sources in scope for records an erasure would drop; the CSV
/// headers read on the way (per source, per file), which the quarantine's raw records are
/// read by.
async fn verify_landing(
    silt: &Silt,
    plan: &Plan,
    report: &mut VerifyReport,
) -> Result<HashMap<String, HashMap<String, Vec<String>>>> {
    let mut headers: HashMap<String, HashMap<String, Vec<String>>> = HashMap::new();
    let (landing, skipped) = silt.landing.list_landing().await?;
    report.unreadable = skipped;
    for name in &plan.sources {
        let src = &silt.project.sources[name];
        let keys = plan.keys_of(name).expect("a source in scope has keys");
        let rec = Records::new(src, &keys, &plan.needles);
        for o in &landing {
            let Some(rel) = silt.landing.relative(&o.location) else {
                continue;
            };
            if !src.glob.is_match(&rel) {
                continue;
            }
            report.objects_scanned += 1;
            let data = silt.landing.get(&o.location).await?;
            if src.format == Format::Csv
                && src.parse.header
                && let Some(h) = csv_header(&data, src)
            {
                headers
                    .entry(name.clone())
                    .or_default()
                    .insert(rel.clone(), h);
            }
            if let Some((_, dropped)) = without_subjects(&data, &rec) {
                report.findings.push(Finding {
                    location: format!("landing:{rel}"),
                    kind: format!("{dropped} subject record(s)"),
                    column: None,
                });
            }
        }
    }
    Ok(headers)
}

/// Scan every object under table `t` (data files live or retained, log entries): a subject's
/// key or PII value in a data file, or in a log entry's file statistics, is a finding.
async fn verify_table(
    silt: &Silt,
    t: &TableRef,
    how: &Matcher,
    n: &Needles,
    report: &mut VerifyReport,
) -> Result<()> {
    let no_doomed = HashSet::new();
    let rel = t.rel_path();
    for o in silt.lake.list(&rel).await? {
        let Some(full) = silt.lake.relative(&o.location) else {
            continue;
        };
        let Some(inner) = full.strip_prefix(&format!("{rel}/")) else {
            continue;
        };
        let location = format!("lake:{full}");
        report.objects_scanned += 1;
        let data = silt.lake.get(&o.location).await?;
        if let Some(log) = inner.strip_prefix("_delta_log/") {
            if log_mentions(log, data, &no_doomed, how, n)? {
                report.findings.push(Finding {
                    location,
                    kind: "file statistics".into(),
                    column: None,
                });
            }
            continue;
        }
        if !inner.ends_with(".parquet") {
            continue;
        }
        report.parquet_files += 1;
        let batches = match decode_parquet(data.clone(), &full) {
            Ok(b) => b,
            Err(e) => {
                report.findings.push(Finding {
                    location,
                    kind: format!("unreadable Parquet ({e})"),
                    column: None,
                });
                continue;
            }
        };
        let mut seen: BTreeSet<(String, Option<String>)> = BTreeSet::new();
        for b in batches {
            seen.extend(findings_in(&b, how, n));
        }
        for (kind, column) in seen {
            report.findings.push(Finding {
                location: location.clone(),
                kind,
                column,
            });
        }
    }
    Ok(())
}

/// What of the subjects one batch of a data file holds: (what, column).
fn findings_in(b: &RecordBatch, how: &Matcher, n: &Needles) -> BTreeSet<(String, Option<String>)> {
    let mut seen = BTreeSet::new();
    match how {
        Matcher::Columns(scope) => {
            for (c, set) in &scope.keys {
                if let Some(a) = b.column_by_name(c)
                    && set.mask(a).into_iter().any(|m| m == Some(true))
                {
                    seen.insert(("subject key".into(), Some(c.clone())));
                }
            }
            // PII on rows keyed to nobody (a row of another subject that shares a name is not
            // a finding).
            let pii_only = Scope {
                keys: scope.keys.clone(),
                pii: vec![],
            };
            let keyed = pii_only.mask(b, n);
            for c in &scope.pii {
                let one = Scope {
                    keys: scope.keys.clone(),
                    pii: vec![c.clone()],
                };
                if one.mask(b, n).into_iter().zip(&keyed).any(|(m, k)| m && !k) {
                    seen.insert(("PII value".into(), Some(c.clone())));
                }
            }
        }
        Matcher::Raw(_) => {
            if how.mask(b, n).true_count() > 0 {
                seen.insert(("subject record".into(), Some("raw_record".into())));
            }
        }
    }
    seen
}
