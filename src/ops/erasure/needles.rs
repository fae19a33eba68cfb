//! What an erasure looks for and how it matches: the subjects' keys (typed: a numeric id never
//! matches inside another number), their PII values and HMACs (as words, never as substrings),
//! and per table the columns that carry them ([`Scope`], [`Matcher`]). It must not read or write
//! the lake.

use super::*;

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
    pub(super) matcher: OnceLock<Option<Matcher2>>,
}

/// One Aho-Corasick automaton over all needles: a text is scanned once, not once per needle
/// (a forget of 100 clients has a few hundred needles).
#[derive(Debug, Clone)]
pub(super) struct Matcher2 {
    pub(super) ac: Option<AhoCorasick>,
    /// How many of the automaton's patterns (the first ones) are ids; the rest are PII values.
    pub(super) ids: usize,
}

impl Needles {
    /// Whether `text` holds an id and whether it holds a PII value, each as a whole word
    /// (`C0042` is not in `C00421`).
    pub(super) fn scan(&self, text: &str) -> (bool, bool) {
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
    pub(super) fn has_pii(&self) -> bool {
        !self.pii.is_empty() || !self.pii_hmacs.is_empty()
    }

    /// The PII values as HMACs, for the audit.
    pub(super) fn pii_hmac_list(&self, key: &str) -> Vec<String> {
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

pub(super) fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The occurrence `hay[s..e]` is not part of a longer word: a word character at either end of
/// it has no word character beside it.
pub(super) fn stands_alone(hay: &[u8], s: usize, e: usize) -> bool {
    let before = s == 0 || !is_word(hay[s]) || !is_word(hay[s - 1]);
    let after = e == hay.len() || !is_word(hay[e - 1]) || !is_word(hay[e]);
    before && after
}

/// `needle` occurs in `hay` not as part of a longer word (`C0042` is not in `C00421`): the
/// search `Needles::find_in` falls back to without an automaton.
pub(super) fn contains_token(hay: &str, needle: &str) -> bool {
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
pub(super) fn cells(a: &ArrayRef) -> Option<Vec<Option<String>>> {
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
    pub(super) text: HashSet<String>,
    /// Hashed with foldhash (DataFusion's default), not SipHash: every key cell of every file
    /// an erasure reads is looked up here.
    pub(super) ints: datafusion::common::HashSet<i64>,
    /// HMACs (under the `[gdpr]` key) of values an earlier run of this request derived: the rows
    /// they came from may be purged by now, so they are matched by their HMAC.
    pub(super) hmacs: HashSet<String>,
    pub(super) hmac_key: Option<String>,
    /// Whole-word search of the values in unstructured text (unparseable raw records).
    pub(super) tokens: OnceLock<Option<AhoCorasick>>,
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

    pub(super) fn has_hmac(&self, v: &str) -> bool {
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
        self.ints.contains(&i) || (!self.hmacs.is_empty() && self.has_hmac(&i.to_string()))
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
    pub(super) fn find_int_token(&self, text: &str) -> bool {
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
    pub(super) fn hmacs(&self, key: &str) -> Vec<String> {
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
    pub(super) fn is_keyed(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The columns a match needs.
    pub(super) fn columns(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| k.0.clone())
            .chain(self.pii.iter().cloned())
            .collect()
    }

    pub(super) fn mask(&self, b: &RecordBatch, pii: &Needles) -> Vec<bool> {
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
pub(super) struct RawScope {
    pub(super) src: Source,
    pub(super) keys: Arc<KeySet>,
    /// The header of each CSV landing file (`_source_file` → fields), read by the landing step.
    pub(super) headers: HashMap<String, Vec<String>>,
    /// For a row whose landing file is gone: the header most of the source's files have, else
    /// the contract's columns in order.
    pub(super) fallback: Vec<String>,
}

/// How one table's rows are matched.
#[derive(Debug, Clone)]
pub(super) enum Matcher {
    Columns(Arc<Scope>),
    Raw(Arc<RawScope>),
}

impl Matcher {
    /// The columns to decode for a match.
    pub(super) fn columns(&self) -> Vec<String> {
        match self {
            Matcher::Columns(s) => s.columns(),
            Matcher::Raw(_) => vec!["_source_file".into(), "raw_record".into()],
        }
    }

    pub(super) fn mask(&self, b: &RecordBatch, pii: &Needles) -> BooleanArray {
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
