//! `silt init` (a new project skeleton) and `silt source new` (a contract inferred from a sample
//! landing file, written for review). It reads the sample through storage.rs like any landing
//! data and writes only project files; it must not write the lake.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::project::config::{PROJECT_FILE, is_identifier};
use crate::project::contract::{parse_date, parse_decimal, parse_timestamp};

const DATE_FORMATS: [&str; 4] = ["%Y-%m-%d", "%d/%m/%Y", "%m/%d/%Y", "%Y/%m/%d"];
const TS_FORMATS: [&str; 2] = ["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"];
/// Words of a column name that mark it as personal data (the name split at `_`).
const PII_WORDS: [&str; 20] = [
    "email",
    "phone",
    "mobile",
    "telephone",
    "nino",
    "ssn",
    "birth",
    "birthdate",
    "dob",
    "address",
    "street",
    "postcode",
    "zipcode",
    "iban",
    "passport",
    "surname",
    "firstname",
    "lastname",
    "fullname",
    "forename",
];
/// `<word>_name` (or `<word>name`) of a person; a bare `name` may name anything (an airport, a
/// part), so it is only pointed out.
const PERSON_WORDS: [&str; 10] = [
    "first", "last", "full", "given", "family", "customer", "client", "person", "contact", "user",
];
/// At most this much of a sample is read to infer a contract.
const SAMPLE_BYTES: usize = 64 << 20;
/// Values with up to this many decimal places (amounts, rates) are decimals; more are floats.
const DECIMAL_PLACES: usize = 4;
/// The scale an inferred decimal gets: room for more places than the sample shows (a value
/// with more places than the scale is refused, never rounded), and still BigQuery NUMERIC.
const DECIMAL_SCALE: u8 = 9;

/// Whether a column name marks personal data.
fn is_pii_name(name: &str) -> bool {
    let n = name.to_lowercase();
    let words: Vec<&str> = n
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    words.iter().any(|w| PII_WORDS.contains(w))
        || words
            .windows(2)
            .any(|p| p[1] == "name" && PERSON_WORDS.contains(&p[0]))
        || PERSON_WORDS
            .iter()
            .any(|p| words.contains(&format!("{p}name").as_str()))
}

/// Create a project in `dir`: silt.toml, sql/ folders, an example source, model and landing file.
pub fn init(dir: &Path) -> Result<Vec<String>> {
    if dir.join(PROJECT_FILE).exists() {
        return Err(Error::Usage(format!(
            "{} already holds a silt project ({PROJECT_FILE} exists)",
            dir.display()
        )));
    }
    let name = dir
        .file_name()
        .and_then(|s| s.to_str())
        .map(|s| s.to_lowercase().replace(['-', ' '], "_"))
        .unwrap_or_else(|| "my_project".into());
    let files: Vec<(&str, String)> = vec![
        (PROJECT_FILE, format!(
r#"# silt project. Every value can be overridden by an environment variable SILT_<SECTION>_<KEY>;
# SILT_LAKE and SILT_LANDING override the two roots.
[project]
name = "{name}"

[lake]
# Where bronze/silver/gold Delta tables live: a path (relative to this file) or a URL
# such as gs://bucket/prefix.
root = "lake"

[landing]
# Where CSV and JSON files arrive. Each source in sql/bronze/ matches files under it by glob.
root = "landing"

[ingest]
# Files and bytes committed together per table.
batch_files = 256
batch_bytes = 536870912

[gdpr]
# `silt forget` and config(pseudonymize=…) need an HMAC key. Set SILT_GDPR_HMAC_KEY rather than
# writing it here.
# hmac_key = "…"

# Environments (`silt env create dev`, then `--env dev` on any command) are zero-copy clones of
# the lake, kept under <lake>/_envs unless this names another root on the same store.
# [environments]
# root = "gs://bucket/envs"

# Alerts on failed runs, failed or warning tests, freshness breaches and completed erasures.
# [notify]
# webhook = "https://hooks.slack.com/services/…"   # POSTs JSON with a `text` field
# command = "logger -t silt"                        # the JSON on stdin, SILT_EVENT set
"#)),
        ("sql/bronze/example.toml", r#"# A landing source: one bronze table, bronze.example. Edit the contract to fit your data,
# or write a new one from a sample file: silt source new <name> --from <file>.
description = "Example orders"
glob = "example/*.csv"          # relative to the landing root
format = "csv"                  # csv | ndjson | json_array | json
primary_key = ["order_id"]
partition_by = "order_date:month"
subject_key = "customer_id"     # the data subject for GDPR erasure
pii = ["customer_email"]        # no min/max statistics are kept for these
on_unexpected_column = "quarantine"  # reject_file | ignore | quarantine
on_changed_file = "ingest"      # ingest | replace | skip | error
on_duplicate_file = "skip"      # skip | ingest

[parse]
delimiter = ","
null_values = ["", "NULL"]
date_formats = ["%Y-%m-%d"]

[[columns]]
name = "order_id"
type = "int64"
nullable = false

[[columns]]
name = "customer_id"
type = "string"
nullable = false

[[columns]]
name = "customer_email"
type = "string"

[[columns]]
name = "order_date"
type = "date"
nullable = false

[[columns]]
name = "amount"
type = "decimal(12,2)"
nullable = false
"#.to_string()),
        ("sql/silver/example_orders.sql", "{{ config(materialized='table') }}\n\nselect order_id, customer_id, order_date, amount\nfrom {{ source('example') }}\n".to_string()),
        ("sql/gold/.gitkeep", String::new()),
        ("sql/tests/.gitkeep", String::new()),
        ("landing/example/orders_2026_01.csv", "order_id,customer_id,customer_email,order_date,amount\n1,c1,ada@example.com,2026-01-03,120.00\n2,c2,bob@example.com,2026-01-05,80.50\n3,c1,ada@example.com,2026-01-09,-20.00\n".to_string()),
        ("lake/README.md", "# lake/\n\nThe default local lake root: silt writes its Delta tables here (bronze/, silver/, gold/, _silt/).\nIts contents are not tracked by git. Point `SILT_LAKE` (or `[lake] root`) elsewhere to use another\nlocation, such as `gs://bucket/prefix`.\n".to_string()),
        // `silt docs` writes its site under target/ by default.
        (".gitignore", "/lake/*\n!/lake/README.md\n/target/\n".to_string()),
    ];
    let mut written = Vec::new();
    for (rel, content) in files {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io("create", parent, e))?;
        }
        std::fs::write(&p, content).map_err(|e| Error::io("write", &p, e))?;
        written.push(rel.to_string());
    }
    Ok(written)
}

/// An inferred column.
#[derive(Debug, Clone, PartialEq)]
enum Inferred {
    Unknown,
    Bool,
    Int,
    Decimal(u8),
    Float,
    Date(&'static str),
    Timestamp,
    String,
    Struct(BTreeMap<String, (Inferred, bool)>),
    List(Box<Inferred>),
}

impl Inferred {
    fn type_text(&self) -> String {
        match self {
            Inferred::Unknown | Inferred::String => "string".into(),
            Inferred::Bool => "bool".into(),
            Inferred::Int => "int64".into(),
            Inferred::Decimal(_) => format!("decimal(38,{DECIMAL_SCALE})"),
            Inferred::Float => "float64".into(),
            Inferred::Date(_) => "date".into(),
            Inferred::Timestamp => "timestamp".into(),
            Inferred::Struct(f) => format!(
                "struct<{}>",
                f.iter()
                    .map(|(k, (t, nullable))| format!(
                        "{k}: {}{}",
                        t.type_text(),
                        if *nullable { "" } else { " not null" }
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Inferred::List(t) => format!("list<{}>", t.type_text()),
        }
    }
}

/// Narrowest type for a text value.
fn infer_text(s: &str) -> Inferred {
    let lower = s.to_ascii_lowercase();
    if lower == "true" || lower == "false" {
        return Inferred::Bool;
    }
    if s.parse::<i64>().is_ok() && !(s.len() > 1 && s.starts_with('0')) {
        return Inferred::Int;
    }
    if let Some((_, frac)) = s.split_once('.')
        && frac.len() <= DECIMAL_PLACES
        && parse_decimal(s, 38, frac.len() as i8).is_ok()
    {
        return Inferred::Decimal(frac.len() as u8);
    }
    // More places (a measurement, a coordinate) or an exponent: a float, which later values
    // with any number of places fit.
    if s.parse::<f64>().is_ok_and(|f| f.is_finite())
        && s.chars().any(|c| c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'))
    {
        return Inferred::Float;
    }
    for f in DATE_FORMATS {
        if parse_date(s, &[f.to_string()]).is_some() {
            return Inferred::Date(f);
        }
    }
    if parse_timestamp(s, &TS_FORMATS.map(String::from)).is_some() {
        return Inferred::Timestamp;
    }
    Inferred::String
}

fn merge(a: Inferred, b: Inferred) -> Inferred {
    use Inferred::*;
    match (a, b) {
        (Unknown, x) | (x, Unknown) => x,
        (a, b) if a == b => a,
        (Int, Decimal(s)) | (Decimal(s), Int) => Decimal(s),
        (Decimal(x), Decimal(y)) => Decimal(x.max(y)),
        (Int | Decimal(_) | Float, Int | Decimal(_) | Float) => Float,
        (Date(_), Date(_)) => String,
        (Struct(mut x), Struct(y)) => {
            let keys: Vec<std::string::String> = x.keys().chain(y.keys()).cloned().collect();
            let mut out = BTreeMap::new();
            for k in keys {
                let l = x.remove(&k);
                let r = y.get(&k).cloned();
                let nullable = l.as_ref().is_none_or(|v| v.1) || r.as_ref().is_none_or(|v| v.1);
                let t = merge(
                    l.map(|v| v.0).unwrap_or(Unknown),
                    r.map(|v| v.0).unwrap_or(Unknown),
                );
                out.insert(k, (t, nullable));
            }
            Struct(out)
        }
        (List(x), List(y)) => List(Box::new(merge(*x, *y))),
        _ => String,
    }
}

fn infer_json(v: &Value) -> Option<Inferred> {
    Some(match v {
        Value::Null => return None,
        Value::Bool(_) => Inferred::Bool,
        Value::Number(n) => {
            if n.is_i64() || n.is_u64() {
                Inferred::Int
            } else {
                infer_text(&n.to_string())
            }
        }
        Value::String(s) => match infer_text(s) {
            t @ (Inferred::Date(_) | Inferred::Timestamp) => t,
            _ => Inferred::String,
        },
        Value::Array(items) => Inferred::List(Box::new(
            items
                .iter()
                .filter_map(infer_json)
                .fold(Inferred::Unknown, merge),
        )),
        Value::Object(m) => Inferred::Struct(
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        (infer_json(v).unwrap_or(Inferred::Unknown), v.is_null()),
                    )
                })
                .collect(),
        ),
    })
}

/// One column of the inferred contract.
#[derive(Debug, Clone)]
pub struct InferredColumn {
    pub name: String,
    /// The field name in the file, when `name` had to be cleaned into an identifier.
    pub source: String,
    pub ty: String,
    pub nullable: bool,
    pub unique: bool,
    date_format: Option<&'static str>,
    months: usize,
    /// Decimal places the sample showed (decimal columns).
    scale: u8,
}

/// A contract inferred from a sample file.
#[derive(Debug, Clone)]
pub struct InferredSource {
    pub format: String,
    pub delimiter: char,
    pub encoding: String,
    pub columns: Vec<InferredColumn>,
    pub rows: usize,
    /// CSV fields with spaces around them were seen (so `trim` is worth a thought).
    pub spaced: bool,
    /// Only the first `SAMPLE_BYTES` of the file were read.
    pub truncated: bool,
}

/// The keys of a JSON object in the order the file has them (serde_json's map sorts them).
struct Keys(Vec<String>);

impl<'de> serde::Deserialize<'de> for Keys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Keys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Keys, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    m.next_value::<serde::de::IgnoredAny>()?;
                    out.push(k);
                }
                Ok(Keys(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The keys of a JSON record's text, in file order (none when it is not an object).
fn keys_in_order(text: &str) -> Vec<String> {
    serde_json::from_str::<Keys>(text)
        .map(|k| k.0)
        .unwrap_or_default()
}

/// Infer a contract from a sample file's bytes. `ext` is the file's extension.
pub fn infer(data: &[u8], file: &str, ext: &str) -> Result<InferredSource> {
    let data = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);
    // A bounded sample: the whole file up to SAMPLE_BYTES, cut at a line end.
    let truncated = data.len() > SAMPLE_BYTES;
    let data = if truncated {
        let cut = data[..SAMPLE_BYTES]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(SAMPLE_BYTES, |i| i + 1);
        &data[..cut]
    } else {
        data
    };
    let (text, encoding) = match std::str::from_utf8(data) {
        Ok(t) => (t.to_string(), "utf-8".to_string()),
        Err(_) => {
            let (t, _, _) = encoding_rs::WINDOWS_1252.decode(data);
            (t.into_owned(), "windows-1252".to_string())
        }
    };
    if text.trim().is_empty() {
        return Err(Error::Input {
            location: crate::error::InputLocation {
                file: file.into(),
                line: 1,
                column: None,
            },
            message: "the file is empty: there is nothing to infer a contract from".into(),
            fix: "pass a sample file that holds a header and some rows".into(),
        });
    }
    let first = text.trim_start().as_bytes()[0];
    let json = matches!(ext, "json" | "ndjson" | "jsonl") || first == b'{' || first == b'[';
    let mut inferred = if json {
        infer_json_records(&text, first == b'[')
    } else {
        infer_csv(&text, file)?
    };
    inferred.encoding = encoding;
    inferred.truncated = truncated;
    Ok(inferred)
}

/// The records of a JSON sample (one array, or one object per line; every complete element
/// of a truncated array), each with its keys in the order it names them.
fn json_records(text: &str, array: bool) -> (Vec<Value>, Vec<Vec<String>>) {
    let mut recs = Vec::new();
    let mut key_order: Vec<Vec<String>> = Vec::new();
    if !array {
        for l in text.lines() {
            if let Ok(v) = serde_json::from_str::<Value>(l.trim()) {
                key_order.push(keys_in_order(l.trim()));
                recs.push(v);
            }
        }
        return (recs, key_order);
    }
    let body = text.trim_start();
    let mut pos = 1;
    loop {
        let rest = body[pos..].trim_start_matches(|c: char| c.is_whitespace() || c == ',');
        pos = body.len() - rest.len();
        if rest.is_empty() || rest.starts_with(']') {
            break;
        }
        let mut s = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        match s.next() {
            Some(Ok(v)) => {
                let end = s.byte_offset();
                key_order.push(keys_in_order(&rest[..end]));
                pos += end;
                recs.push(v);
            }
            _ => break,
        }
    }
    (recs, key_order)
}

/// The contract of a JSON sample: its columns in the order the file names them (first seen
/// first), each typed by all its values.
fn infer_json_records(text: &str, array: bool) -> InferredSource {
    let (records, key_order) = json_records(text, array);
    let objects: Vec<&serde_json::Map<String, Value>> =
        records.iter().filter_map(|r| r.as_object()).collect();
    let mut order: Vec<String> = Vec::new();
    for k in key_order.into_iter().flatten() {
        if !order.contains(&k) {
            order.push(k);
        }
    }
    let columns = order
        .iter()
        .map(|k| {
            let vals: Vec<&Value> = objects
                .iter()
                .map(|o| o.get(k).unwrap_or(&Value::Null))
                .collect();
            let ty = vals
                .iter()
                .filter_map(|v| infer_json(v))
                .fold(Inferred::Unknown, merge);
            let nullable = vals.iter().any(|v| v.is_null());
            let texts: Vec<String> = vals
                .iter()
                .filter(|v| !v.is_null())
                .map(|v| v.to_string())
                .collect();
            column(k, ty, nullable, &texts)
        })
        .collect();
    InferredSource {
        format: if array { "json_array" } else { "ndjson" }.into(),
        delimiter: ',',
        encoding: String::new(),
        columns,
        rows: objects.len(),
        spaced: false,
        truncated: false,
    }
}

/// The contract of a CSV sample: the delimiter is the candidate seen most in the header line;
/// fields are read as they are (silt keeps spaces in strings unless `trim` is set), and types
/// inferred from the trimmed text, as ingest reads typed columns.
fn infer_csv(text: &str, file: &str) -> Result<InferredSource> {
    let header_line = text.lines().next().unwrap_or_default();
    let delimiter = [',', ';', '\t', '|']
        .into_iter()
        .max_by_key(|d| header_line.matches(*d).count())
        .unwrap_or(',');
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delimiter as u8)
        .flexible(true)
        .from_reader(text.as_bytes());
    let headers: Vec<String> = rdr
        .headers()
        .map_err(|e| Error::Usage(format!("{file}: cannot read the CSV header: {e}")))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let mut values: Vec<Vec<String>> = vec![Vec::new(); headers.len()];
    let mut nulls = vec![false; headers.len()];
    let mut rows = 0;
    let mut spaced = false;
    for rec in rdr.records().flatten() {
        if rec.len() != headers.len() {
            continue;
        }
        rows += 1;
        for (i, f) in rec.iter().enumerate() {
            let t = f.trim();
            spaced |= !t.is_empty() && t.len() != f.len();
            if f.is_empty() || f == "NULL" || f == "null" {
                nulls[i] = true;
            } else {
                values[i].push(t.to_string());
            }
        }
    }
    let columns = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let ty = values[i]
                .iter()
                .map(|v| infer_text(v))
                .fold(Inferred::Unknown, merge);
            column(h, ty, nulls[i] || values[i].is_empty(), &values[i])
        })
        .collect();
    Ok(InferredSource {
        format: "csv".into(),
        delimiter,
        encoding: String::new(),
        columns,
        rows,
        spaced,
        truncated: false,
    })
}

/// A column name made into a lower-case identifier (`Fee ID` -> `fee_id`).
fn identifier(name: &str) -> String {
    let mut s: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    s = s.trim_matches('_').to_string();
    if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        s = format!("c_{s}");
    }
    s
}

fn column(name: &str, ty: Inferred, nullable: bool, texts: &[String]) -> InferredColumn {
    let unique = {
        let mut s: Vec<&String> = texts.iter().collect();
        s.sort();
        s.dedup();
        s.len() == texts.len() && !texts.is_empty()
    };
    let date_format = match ty {
        Inferred::Date(f) => Some(f),
        _ => None,
    };
    let scale = match ty {
        Inferred::Decimal(s) => s,
        _ => 0,
    };
    let months = match ty {
        Inferred::Date(f) => {
            let mut m: Vec<String> = texts
                .iter()
                .filter_map(|t| chrono::NaiveDate::parse_from_str(t.trim_matches('"'), f).ok())
                .map(|d| d.format("%Y-%m").to_string())
                .collect();
            m.sort();
            m.dedup();
            m.len()
        }
        _ => 0,
    };
    InferredColumn {
        name: identifier(name),
        source: name.to_string(),
        ty: ty.type_text(),
        nullable,
        unique,
        date_format,
        months,
        scale,
    }
}

/// The text of `sql/bronze/<name>.toml` for an inferred source.
pub fn render_source(name: &str, glob: &str, inf: &InferredSource, sample: &str) -> Result<String> {
    if !is_identifier(name) {
        return Err(Error::Usage(format!(
            "'{name}' is not a valid source name: use lower-case letters, digits and '_', starting with a letter"
        )));
    }
    let toml_str = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut o = String::new();
    o.push_str(&format!(
        "# Inferred by `silt source new` from {sample} ({} rows{}). Review every line.\n",
        inf.rows,
        if inf.truncated {
            format!(", the first {} MiB", SAMPLE_BYTES >> 20)
        } else {
            ", the whole file".into()
        }
    ));
    o.push_str(&format!(
        "description = {}\n",
        toml_str(&format!("{name} (inferred from {sample})"))
    ));
    o.push_str(&format!("glob = {}\n", toml_str(glob)));
    o.push_str(&format!("format = \"{}\"\n", inf.format));
    let pk = key_lines(&mut o, inf);
    parse_lines(&mut o, inf);
    column_lines(&mut o, inf, pk);
    Ok(o)
}

/// The lines that name the source's keys, partitioning, data subject and PII (each guessed
/// from the sample, with why); the primary key chosen.
fn key_lines<'i>(o: &mut String, inf: &'i InferredSource) -> Option<&'i InferredColumn> {
    let toml_str = |s: &str| toml::Value::String(s.to_string()).to_string();
    let pii: Vec<&InferredColumn> = inf
        .columns
        .iter()
        .filter(|c| is_pii_name(&c.name))
        .collect();
    // A key: a column unique and never empty in the sample; id-like names first.
    let keys: Vec<&InferredColumn> = inf
        .columns
        .iter()
        .filter(|c| {
            c.unique && !c.nullable && !c.ty.starts_with("struct") && !c.ty.starts_with("list")
        })
        .collect();
    let rank = |c: &InferredColumn| {
        let n = c.name.as_str();
        if n == "id" || n.ends_with("_id") {
            0
        } else if n.ends_with("key") || n.ends_with("_code") || n.ends_with("_no") {
            1
        } else {
            2
        }
    };
    let pk = keys.iter().min_by_key(|c| rank(c)).copied();
    match pk {
        Some(c) => {
            let others: Vec<String> = keys
                .iter()
                .filter(|k| k.name != c.name)
                .map(|k| k.name.clone())
                .collect();
            o.push_str(&format!(
                "primary_key = [{}]  # unique and never empty in the sample{}\n",
                toml_str(&c.name),
                if others.is_empty() {
                    String::new()
                } else {
                    format!("; also unique: {}", others.join(", "))
                }
            ));
        }
        None => o.push_str(
            "primary_key = []  # no single column was unique and never empty in the sample: name the key columns\n",
        ),
    }
    let part = inf
        .columns
        .iter()
        .filter(|c| c.date_format.is_some() && !pii.iter().any(|p| p.name == c.name))
        .max_by_key(|c| c.months);
    match part {
        Some(c) => o.push_str(&format!(
            "partition_by = {}  # suggested: {} month(s) in the sample\n",
            toml_str(&format!("{}:month", c.name)),
            c.months
        )),
        None => o.push_str("# partition_by = \"<date column>:month\"  # no date column found\n"),
    }
    let subject = inf.columns.iter().find(|c| {
        [
            "client_id",
            "customer_id",
            "user_id",
            "person_id",
            "subject_id",
        ]
        .contains(&c.name.as_str())
    });
    match subject {
        Some(c) => o.push_str(&format!(
            "subject_key = {}  # the data subject for GDPR erasure\n",
            toml_str(&c.name)
        )),
        None => o.push_str(
            "# subject_key = \"<column identifying the person>\"  # or subject_via = { column = \"…\", table = \"<source>\", key = \"…\" }\n",
        ),
    }
    o.push_str(&format!(
        "pii = [{}]  # guessed from column names: no statistics are kept for these\n",
        pii.iter()
            .map(|c| toml_str(&c.name))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    for c in inf
        .columns
        .iter()
        .filter(|c| c.name == "name" || c.name.ends_with("_name"))
    {
        if !is_pii_name(&c.name) {
            o.push_str(&format!(
                "# '{}' may name a person: add it to pii if it does\n",
                c.name
            ));
        }
    }
    pk
}

/// The file policies and the `[parse]` options the inference relied on.
fn parse_lines(o: &mut String, inf: &InferredSource) {
    let toml_str = |s: &str| toml::Value::String(s.to_string()).to_string();
    o.push_str("on_unexpected_column = \"quarantine\"\non_changed_file = \"ingest\"\non_duplicate_file = \"skip\"\n\n");
    o.push_str("# How the sample was read: every option the inference relied on.\n[parse]\n");
    if inf.format == "csv" {
        o.push_str(&format!(
            "delimiter = {}\nquote = '\"'\nheader = true\n",
            toml_str(&inf.delimiter.to_string())
        ));
        o.push_str("null_values = [\"\", \"NULL\", \"null\"]\n");
        if inf.spaced {
            o.push_str("trim = false  # some fields have spaces around them: kept in strings (numbers and dates read through them); true drops them\n");
        } else {
            o.push_str("trim = false  # fields are kept as they are\n");
        }
    }
    if inf.encoding != "utf-8" {
        o.push_str(&format!(
            "encoding = \"{}\"  # the sample is not valid UTF-8\n",
            inf.encoding
        ));
    }
    let mut fmts: Vec<&str> = inf.columns.iter().filter_map(|c| c.date_format).collect();
    fmts.dedup();
    if fmts.is_empty() {
        fmts.push("%Y-%m-%d");
    }
    o.push_str(&format!(
        "date_formats = [{}]\n",
        fmts.iter()
            .map(|f| toml_str(f))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    if inf.columns.iter().any(|c| c.ty == "timestamp") {
        o.push_str(&format!(
            "timestamp_formats = [{}]\n",
            TS_FORMATS
                .iter()
                .map(|f| toml_str(f))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
}

/// One `[[columns]]` table per column (the key not nullable), with what the sample showed.
fn column_lines(o: &mut String, inf: &InferredSource, pk: Option<&InferredColumn>) {
    let toml_str = |s: &str| toml::Value::String(s.to_string()).to_string();
    for c in &inf.columns {
        let is_key = pk.is_some_and(|k| k.name == c.name);
        let note = if is_key {
            String::new()
        } else if c.ty.starts_with("decimal") {
            format!(
                "  # at most {} decimal place(s) in the sample; scale {DECIMAL_SCALE} leaves room (more places are refused, never rounded)",
                c.scale
            )
        } else if !c.nullable {
            "  # never empty in the sample: set false to require a value".into()
        } else {
            String::new()
        };
        o.push_str(&format!(
            "\n[[columns]]\nname = {}\ntype = {}\nnullable = {}{note}\n",
            toml_str(&c.name),
            toml_str(&c.ty),
            !is_key,
        ));
        if c.source != c.name {
            o.push_str(&format!("source = {}\n", toml_str(&c.source)));
        }
    }
}

/// What `silt source new` wrote and how the sample fares under it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceNewReport {
    pub path: String,
    pub glob: String,
    pub rows_ok: usize,
    pub rows_quarantined: usize,
    pub note: Option<String>,
}

/// Infer `sql/bronze/<name>.toml` from the sample at `from` (a path or URL), write it, and parse
/// the sample under it as a check.
pub async fn source_new(
    silt: &crate::lake::Silt,
    name: &str,
    from: &str,
    force: bool,
) -> Result<SourceNewReport> {
    let dest = silt
        .project
        .dir
        .join("sql")
        .join("bronze")
        .join(format!("{name}.toml"));
    if dest.exists() && !force {
        return Err(Error::Usage(format!(
            "{} exists: pass --force to overwrite it",
            dest.display()
        )));
    }
    let url = if from.contains("://") {
        url::Url::parse(from).map_err(|e| Error::Usage(format!("--from '{from}': {e}")))?
    } else {
        let p =
            std::path::absolute(from).map_err(|e| Error::Usage(format!("--from '{from}': {e}")))?;
        url::Url::from_file_path(&p)
            .map_err(|_| Error::Usage(format!("--from '{from}' is not a usable path")))?
    };
    let file_name = url
        .path_segments()
        .and_then(|mut s| s.next_back())
        .unwrap_or_default()
        .to_string();
    let mut dir_url = url.clone();
    dir_url
        .path_segments_mut()
        .map_err(|_| Error::Usage(format!("--from '{from}' is not a file")))?
        .pop()
        .push("");
    let cloud = crate::lake::storage::CloudOptions::from_project(&silt.project);
    let dir_store = crate::lake::storage::Storage::new(&dir_url, &cloud)?;
    let data = dir_store.get(&dir_store.path(&file_name)).await?;
    let ext = file_name
        .rsplit_once('.')
        .map(|(_, e)| e.to_lowercase())
        .unwrap_or_default();
    let inf = infer(&data, from, &ext)?;
    // The glob: the sample's folder under the landing root, or <name>/ when it lies elsewhere.
    let landing = silt.landing.url().as_str();
    let (glob, note) = match dir_url.as_str().strip_prefix(landing) {
        Some(rel) => (format!("{rel}*.{ext}"), None),
        None => (
            format!("{name}/*.{ext}"),
            Some(format!(
                "the sample is outside the landing root; put files for this source under {landing}{name}/"
            )),
        ),
    };
    let text = render_source(name, &glob, &inf, &file_name)?;
    let sf: crate::project::config::SourceFile = toml::from_str(&text)
        .map_err(|e| Error::Internal(format!("inferred contract does not parse (a bug): {e}")))?;
    let src =
        crate::project::config::Source::from_file(name, &format!("sql/bronze/{name}.toml"), sf)?;
    let parsed = crate::ingest::parse_file(&data, &file_name, &src)?;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io("create", parent, e))?;
    }
    std::fs::write(&dest, text).map_err(|e| Error::io("write", &dest, e))?;
    Ok(SourceNewReport {
        path: dest
            .strip_prefix(&silt.project.dir)
            .unwrap_or(&dest)
            .display()
            .to_string(),
        glob,
        rows_ok: parsed.lines.len(),
        rows_quarantined: parsed.rejects.len(),
        note,
    })
}
