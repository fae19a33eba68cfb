//! JSON landing files (newline-delimited, or one top-level array) to Arrow slices of good rows
//! plus rejected records with reasons. Nested objects become structs and arrays lists, per the
//! contract. A truncated document keeps every complete record and quarantines the rest.
//! It must not do I/O or write tables.

use std::sync::Arc;

use arrow::datatypes::{Field, Schema};
use serde_json::Value;

use super::{Input, ParsedFile, Parser, Reject, Sink, Slice, escape_raw};
use crate::error::{Error, InputLocation, Result};
use crate::project::config::{Format, Source, UnexpectedColumnPolicy};
use crate::project::contract::{TemporalFormats, check_json};

/// One record's place in the file; its value is parsed when it is checked (so a file's records
/// are never all held as JSON trees at once), `Err` when the splitter already found it broken.
struct RawRecord<'a> {
    line: u64,
    raw: &'a [u8],
    value: std::result::Result<(), String>,
}

/// The JSON parser: one file (already UTF-8 where an encoding is declared, BOM removed), handing good
/// rows to `sink` every `slice_rows` rows. Under `on_unexpected_column = "reject_file"` any
/// record can refuse the whole file, so the slices are held back until the last record.
pub struct Json;

impl Parser for Json {
    fn parse(&self, input: &Input, sink: &mut Sink) -> Result<ParsedFile> {
        let (data, file, src) = (input.data, input.file, input.source);
        let mut out = ParsedFile::default();
        let first = data.iter().position(|b| !b.is_ascii_whitespace());
        let Some(first) = first else {
            out.warnings
                .push(format!("{file}: empty file, nothing to ingest"));
            return Ok(out);
        };
        let is_array = data[first] == b'[';
        check_shape(data, first, is_array, file, src)?;
        let records = if is_array {
            split_array(data, first, &mut out)
        } else {
            split_lines(data)
        };
        let mut checker = RecordChecker {
            src,
            file,
            fmts: TemporalFormats {
                date: src.parse.date_formats.clone(),
                timestamp: src.parse.timestamp_formats.clone(),
            },
            ignored_warned: false,
        };
        let mut good: Vec<Value> = Vec::new();
        let mut good_lines: Vec<i64> = Vec::new();
        let hold = src.on_unexpected_column == UnexpectedColumnPolicy::RejectFile;
        let mut held: Vec<Slice> = Vec::new();
        let mut emitted = false;
        let schema = Arc::new(Schema::new(
            src.columns
                .iter()
                .map(|c| c.to_arrow_field())
                .collect::<Vec<Field>>(),
        ));
        let mut decoder = arrow::json::ReaderBuilder::new(schema.clone())
            .with_batch_size(input.slice_rows)
            .build_decoder()?;
        let mut to_arrow = |good: &mut Vec<Value>, lines: &mut Vec<i64>| -> Result<()> {
            decoder.serialize(good).map_err(|e| {
                Error::Internal(format!(
                    "{file}: building Arrow data from checked records failed: {e}"
                ))
            })?;
            good.clear();
            let batch = decoder
                .flush()?
                .unwrap_or_else(|| arrow::record_batch::RecordBatch::new_empty(schema.clone()));
            let slice = Slice {
                batch,
                lines: std::mem::take(lines),
            };
            if hold {
                held.push(slice)
            } else {
                sink(slice)?
            }
            Ok(())
        };
        for rec in records {
            match checker.check(&rec, &mut out.warnings)? {
                Err((column, reason)) => out.rejects.push(Reject {
                    line: rec.line,
                    column,
                    reason,
                    raw: escape_raw(rec.raw),
                }),
                Ok(normalized) => {
                    good.push(Value::Object(normalized));
                    good_lines.push(rec.line as i64);
                    if good.len() >= input.slice_rows {
                        to_arrow(&mut good, &mut good_lines)?;
                        emitted = true;
                    }
                }
            }
        }
        // The rest; a file whose records were all refused still yields its one (empty) slice.
        if !good.is_empty() || !emitted {
            to_arrow(&mut good, &mut good_lines)?;
        }
        for slice in held {
            sink(slice)?;
        }
        Ok(out)
    }
}

/// Refuse a file whose shape (one array, or one object per line) is not the declared format.
fn check_shape(data: &[u8], first: usize, is_array: bool, file: &str, src: &Source) -> Result<()> {
    let (message, format) = match (src.format, is_array) {
        (Format::JsonArray, false) => ("expected a top-level JSON array ('[')", "ndjson"),
        (Format::Ndjson, true) => (
            "expected one JSON object per line, found a top-level array",
            "json_array",
        ),
        _ => return Ok(()),
    };
    Err(Error::Input {
        location: InputLocation {
            file: file.into(),
            line: line_of(data, first),
            column: None,
        },
        message: message.into(),
        fix: format!(
            "set format = \"{format}\" (or \"json\" to detect) in {}",
            src.file
        ),
    })
}

/// A record's values by contract column, or why it is refused (the column, when one is to
/// blame).
type Checked = std::result::Result<serde_json::Map<String, Value>, (Option<String>, String)>;

/// Checks records against the contract, one at a time.
struct RecordChecker<'a> {
    src: &'a Source,
    file: &'a str,
    fmts: TemporalFormats,
    /// Fields the contract ignores are warned of once per file.
    ignored_warned: bool,
}

impl RecordChecker<'_> {
    /// Parse `rec` and check it; `Err`: the source refuses the whole file for it (a field
    /// not in the contract under `on_unexpected_column = "reject_file"`).
    fn check(&mut self, rec: &RawRecord<'_>, warnings: &mut Vec<String>) -> Result<Checked> {
        let value = rec.value.clone().and_then(|()| {
            serde_json::from_slice::<Record>(rec.raw)
                .map(|r| r.0)
                .map_err(|e| format!("invalid JSON at column {}: {e}", e.column()))
        });
        let obj = match value {
            Ok(Value::Object(m)) => m,
            Ok(other) => {
                return Ok(Err((
                    None,
                    format!("expected a JSON object, found {}", kind(&other)),
                )));
            }
            Err(reason) => return Ok(Err((None, reason))),
        };
        let src = self.src;
        let mut unexpected: Vec<String> = obj
            .keys()
            .filter(|k| !src.columns.iter().any(|c| &c.source == *k))
            .cloned()
            .collect();
        let mut normalized = serde_json::Map::with_capacity(src.columns.len());
        for c in &src.columns {
            let v = obj.get(&c.source);
            if v.is_none() && !c.nullable {
                return Ok(Err((
                    Some(c.name.clone()),
                    format!("required field '{}' is missing", c.source),
                )));
            }
            match check_json(
                v.unwrap_or(&Value::Null),
                c,
                &c.name,
                &self.fmts,
                &mut unexpected,
            ) {
                Ok(nv) => {
                    normalized.insert(c.name.clone(), nv);
                }
                Err((column, reason)) => return Ok(Err((Some(column), reason))),
            }
        }
        if unexpected.is_empty() {
            return Ok(Ok(normalized));
        }
        match src.on_unexpected_column {
            UnexpectedColumnPolicy::RejectFile => Err(Error::Input {
                location: InputLocation {
                    file: self.file.into(),
                    line: rec.line,
                    column: Some(unexpected[0].clone()),
                },
                message: format!(
                    "field '{}' is not in the contract of source '{}'",
                    unexpected[0], src.name
                ),
                fix: format!(
                    "declare it in {}, or set on_unexpected_column = \"ignore\" or \"quarantine\"",
                    src.file
                ),
            }),
            UnexpectedColumnPolicy::Quarantine => Ok(Err((
                Some(unexpected[0].clone()),
                format!(
                    "unexpected field(s) {} not in the contract",
                    unexpected
                        .iter()
                        .map(|u| format!("'{u}'"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ))),
            UnexpectedColumnPolicy::Ignore => {
                if !self.ignored_warned {
                    warnings.push(format!(
                        "{}: field(s) {} not in the contract; ignored",
                        self.file,
                        unexpected.join(", ")
                    ));
                    self.ignored_warned = true;
                }
                Ok(Ok(normalized))
            }
        }
    }
}

/// A record parsed as a JSON value whose top-level object may not name a field twice (which
/// of two values a reader keeps differs between readers: the record is refused instead).
struct Record(Value);

impl<'de> serde::Deserialize<'de> for Record {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::{Error as _, MapAccess, SeqAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Record;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Record, A::Error> {
                let mut out = serde_json::Map::new();
                while let Some(k) = m.next_key::<String>()? {
                    let v: Value = m.next_value()?;
                    if out.contains_key(&k) {
                        return Err(A::Error::custom(format!(
                            "field '{k}' appears twice in the record"
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(Record(Value::Object(out)))
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> std::result::Result<Record, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = s.next_element::<Value>()? {
                    out.push(v);
                }
                Ok(Record(Value::Array(out)))
            }
            fn visit_bool<E>(self, b: bool) -> std::result::Result<Record, E> {
                Ok(Record(Value::Bool(b)))
            }
            fn visit_i64<E>(self, n: i64) -> std::result::Result<Record, E> {
                Ok(Record(Value::from(n)))
            }
            fn visit_u64<E>(self, n: u64) -> std::result::Result<Record, E> {
                Ok(Record(Value::from(n)))
            }
            fn visit_f64<E>(self, n: f64) -> std::result::Result<Record, E> {
                Ok(Record(Value::from(n)))
            }
            fn visit_str<E>(self, s: &str) -> std::result::Result<Record, E> {
                Ok(Record(Value::from(s)))
            }
            fn visit_unit<E>(self) -> std::result::Result<Record, E> {
                Ok(Record(Value::Null))
            }
        }
        d.deserialize_any(V)
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn line_of(data: &[u8], pos: usize) -> u64 {
    1 + data[..pos].iter().filter(|&&b| b == b'\n').count() as u64
}

fn split_lines(data: &[u8]) -> Vec<RawRecord<'_>> {
    let mut out = Vec::new();
    for (i, raw) in data.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        out.push(RawRecord {
            line: i as u64 + 1,
            raw,
            value: Ok(()),
        });
    }
    out
}

/// Walk the elements of a top-level array. On a syntax error the rest of the document becomes
/// one rejected record: nothing is dropped silently.
fn split_array<'a>(data: &'a [u8], open: usize, out: &mut ParsedFile) -> Vec<RawRecord<'a>> {
    let mut recs = Vec::new();
    let mut pos = open + 1;
    let mut line = line_of(data, open);
    let mut counted_to = open;
    let skip_ws = |pos: &mut usize| {
        while *pos < data.len() && data[*pos].is_ascii_whitespace() {
            *pos += 1;
        }
    };
    let mut expect_element = true;
    loop {
        skip_ws(&mut pos);
        line += data[counted_to..pos]
            .iter()
            .filter(|&&b| b == b'\n')
            .count() as u64;
        counted_to = pos;
        if pos >= data.len() {
            recs.push(RawRecord {
                line,
                raw: &data[pos.min(data.len())..],
                value: Err("truncated JSON document: the top-level array is not closed (no ']'); the file was probably cut short in transfer — re-deliver it".into()),
            });
            return recs;
        }
        match data[pos] {
            b']' => {
                if expect_element && !recs.is_empty() {
                    out.warnings
                        .push("trailing ',' before the closing ']'".into());
                }
                let mut end = pos + 1;
                skip_ws(&mut end);
                if end < data.len() {
                    out.warnings.push(format!(
                        "ignored {} trailing byte(s) after the closing ']'",
                        data.len() - end
                    ));
                }
                return recs;
            }
            b',' if !expect_element => {
                pos += 1;
                expect_element = true;
                continue;
            }
            _ if expect_element => {}
            other => {
                recs.push(RawRecord {
                    line,
                    raw: &data[pos..],
                    value: Err(format!(
                        "malformed JSON array: expected ',' or ']' but found '{}'; the rest of the document could not be read",
                        other as char
                    )),
                });
                return recs;
            }
        }
        // Only find where the element ends here; it is parsed when it is checked.
        let mut stream =
            serde_json::Deserializer::from_slice(&data[pos..]).into_iter::<serde::de::IgnoredAny>();
        match stream.next() {
            Some(Ok(_)) => {
                let end = pos + stream.byte_offset();
                recs.push(RawRecord {
                    line,
                    raw: &data[pos..end],
                    value: Ok(()),
                });
                pos = end;
                expect_element = false;
            }
            Some(Err(e)) => {
                let (l, c) = (line + e.line() as u64 - 1, e.column());
                let what = if e.is_eof() {
                    "truncated JSON document: it ends inside a record; the file was probably cut short in transfer — re-deliver it"
                } else {
                    "malformed JSON: the rest of the document could not be read"
                };
                recs.push(RawRecord {
                    line,
                    raw: &data[pos..],
                    value: Err(format!("{what} (error at line {l}, column {c}: {e})")),
                });
                return recs;
            }
            None => {
                recs.push(RawRecord {
                    line,
                    raw: &data[pos..],
                    value: Err("truncated JSON document: the top-level array is not closed".into()),
                });
                return recs;
            }
        }
    }
}
