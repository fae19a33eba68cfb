//! CSV landing files to Arrow slices of good rows plus rejected rows with reasons.
//! Handles header mapping, delimiter, quote, null tokens, BOM, CRLF, quoted commas and newlines,
//! invalid UTF-8 and ragged rows. It must not do I/O or write tables.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Decimal128Builder, Float64Builder, Int32Builder,
    Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{Field, Schema};
use arrow::record_batch::RecordBatch;

use super::{ParsedFile, Reject, Slice, escape_raw};
use crate::config::{Source, UnexpectedColumnPolicy};
use crate::contract::{ColumnType, Scalar, TemporalFormats, parse_scalar};
use crate::error::{Error, InputLocation, Result};

enum ColBuilder {
    Str(StringBuilder),
    I32(Int32Builder),
    I64(Int64Builder),
    F64(Float64Builder),
    Bool(BooleanBuilder),
    Date(Date32Builder),
    Ts(TimestampMicrosecondBuilder),
    Dec(Decimal128Builder),
}

impl ColBuilder {
    fn new(ty: &ColumnType, cap: usize, bytes: usize) -> ColBuilder {
        match ty {
            ColumnType::String => ColBuilder::Str(StringBuilder::with_capacity(cap, bytes)),
            ColumnType::Int32 => ColBuilder::I32(Int32Builder::with_capacity(cap)),
            ColumnType::Int64 => ColBuilder::I64(Int64Builder::with_capacity(cap)),
            ColumnType::Float64 => ColBuilder::F64(Float64Builder::with_capacity(cap)),
            ColumnType::Bool => ColBuilder::Bool(BooleanBuilder::with_capacity(cap)),
            ColumnType::Date => ColBuilder::Date(Date32Builder::with_capacity(cap)),
            ColumnType::Timestamp => {
                ColBuilder::Ts(TimestampMicrosecondBuilder::with_capacity(cap).with_timezone("UTC"))
            }
            ColumnType::Decimal(p, s) => ColBuilder::Dec(
                Decimal128Builder::with_capacity(cap)
                    .with_precision_and_scale(*p, *s)
                    .expect("precision checked by the contract"),
            ),
            ColumnType::Struct(_) | ColumnType::List(_) => {
                unreachable!("nested CSV columns are refused before building")
            }
        }
    }

    fn push(&mut self, v: Scalar<'_>) {
        match (self, v) {
            (ColBuilder::Str(b), Scalar::String(s)) => b.append_value(s),
            (ColBuilder::I32(b), Scalar::Int32(x)) => b.append_value(x),
            (ColBuilder::I64(b), Scalar::Int64(x)) => b.append_value(x),
            (ColBuilder::F64(b), Scalar::Float64(x)) => b.append_value(x),
            (ColBuilder::Bool(b), Scalar::Bool(x)) => b.append_value(x),
            (ColBuilder::Date(b), Scalar::Date(x)) => b.append_value(x),
            (ColBuilder::Ts(b), Scalar::Timestamp(x)) => b.append_value(x),
            (ColBuilder::Dec(b), Scalar::Decimal(x)) => b.append_value(x),
            (b, _) => b.push_null(),
        }
    }

    fn push_null(&mut self) {
        match self {
            ColBuilder::Str(b) => b.append_null(),
            ColBuilder::I32(b) => b.append_null(),
            ColBuilder::I64(b) => b.append_null(),
            ColBuilder::F64(b) => b.append_null(),
            ColBuilder::Bool(b) => b.append_null(),
            ColBuilder::Date(b) => b.append_null(),
            ColBuilder::Ts(b) => b.append_null(),
            ColBuilder::Dec(b) => b.append_null(),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            ColBuilder::Str(b) => Arc::new(b.finish()),
            ColBuilder::I32(b) => Arc::new(b.finish()),
            ColBuilder::I64(b) => Arc::new(b.finish()),
            ColBuilder::F64(b) => Arc::new(b.finish()),
            ColBuilder::Bool(b) => Arc::new(b.finish()),
            ColBuilder::Date(b) => Arc::new(b.finish()),
            ColBuilder::Ts(b) => Arc::new(b.finish()),
            ColBuilder::Dec(b) => Arc::new(b.finish()),
        }
    }
}

/// Parse one CSV file (already decoded to UTF-8 where an encoding is declared, BOM removed),
/// handing good rows to `sink` every `slice_rows` rows. Only the header can refuse the file,
/// so every refusal comes before the first slice.
pub fn parse(
    data: &[u8],
    file: &str,
    src: &Source,
    slice_rows: usize,
    sink: &mut dyn FnMut(Slice) -> Result<()>,
) -> Result<ParsedFile> {
    let mut out = ParsedFile::default();
    if data.iter().all(|b| b.is_ascii_whitespace()) {
        out.warnings
            .push(format!("{file}: empty file, nothing to ingest"));
        return Ok(out);
    }
    for c in &src.columns {
        if !c.ty.is_scalar() {
            return Err(Error::config(
                &src.file,
                format!(
                    "column '{}' is {}: a CSV field cannot hold nested values; declare it as a string",
                    c.name, c.ty
                ),
            ));
        }
    }
    let p = &src.parse;
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(p.delimiter as u8)
        .quote(p.quote as u8)
        .has_headers(false)
        .flexible(true)
        // Fields are trimmed below, only when they need it (the csv crate's trim rewrites
        // every record).
        .trim(csv::Trim::None)
        .from_reader(data);
    let fmts = TemporalFormats {
        date: p.date_formats.clone(),
        timestamp: p.timestamp_formats.clone(),
    };
    let mut record = csv::ByteRecord::new();

    // Map file fields to contract columns.
    let n_cols = src.columns.len();
    // field index -> Some(contract column index) | None (unexpected)
    let mut field_map: Vec<Option<usize>> = Vec::new();
    let mut unexpected: Vec<(usize, String)> = Vec::new();
    let mut header_len;
    let mut header_names: Vec<String> = Vec::new();
    if p.header {
        let more = rdr
            .read_byte_record(&mut record)
            .map_err(|e| csv_error(file, &e))?;
        if !more {
            out.warnings
                .push(format!("{file}: empty file, nothing to ingest"));
            return Ok(out);
        }
        header_len = record.len();
        for (i, h) in record.iter().enumerate() {
            let name = String::from_utf8_lossy(h).trim().to_string();
            header_names.push(name.clone());
            match src.columns.iter().position(|c| c.source == name) {
                Some(ci) => {
                    if field_map.contains(&Some(ci)) {
                        return Err(Error::Input {
                            location: InputLocation {
                                file: file.into(),
                                line: 1,
                                column: Some(name.clone()),
                            },
                            message: format!("the header names column '{name}' twice"),
                            fix: "remove or rename the second column in the file".into(),
                        });
                    }
                    field_map.push(Some(ci))
                }
                None => {
                    field_map.push(None);
                    unexpected.push((i, name));
                }
            }
        }
    } else {
        header_len = n_cols;
        field_map = (0..n_cols).map(Some).collect();
        header_names = src.columns.iter().map(|c| c.source.clone()).collect();
    }
    for (_, name) in &unexpected {
        match src.on_unexpected_column {
            UnexpectedColumnPolicy::RejectFile => {
                return Err(Error::Input {
                    location: InputLocation { file: file.into(), line: 1, column: Some(name.clone()) },
                    message: format!("column '{name}' is not in the contract of source '{}'", src.name),
                    fix: format!(
                        "declare it in {} ([[columns]] name = \"{name}\"), or set on_unexpected_column = \"ignore\" or \"quarantine\"",
                        src.file
                    ),
                });
            }
            UnexpectedColumnPolicy::Ignore => out
                .warnings
                .push(format!("{file}: column '{name}' is not in the contract; ignored")),
            UnexpectedColumnPolicy::Quarantine => out.warnings.push(format!(
                "{file}: column '{name}' is not in the contract; rows with a value in it are quarantined"
            )),
        }
    }
    for (ci, c) in src.columns.iter().enumerate() {
        if !field_map.contains(&Some(ci)) {
            if c.nullable {
                out.warnings.push(format!(
                    "{file}: the file has no column '{}'; it is NULL for every row",
                    c.source
                ));
            } else {
                return Err(Error::Input {
                    location: InputLocation {
                        file: file.into(),
                        line: 1,
                        column: Some(c.source.clone()),
                    },
                    message: format!(
                        "the header lacks column '{}', which the contract requires (not null)",
                        c.source
                    ),
                    fix: format!(
                        "add the column to the file, map it with source = \"<header name>\", or declare it nullable in {}",
                        src.file
                    ),
                });
            }
        }
    }
    if header_len == 0 {
        header_len = field_map.len();
    }

    // Each slice's builders are sized up front from the file's average row (one pass over the
    // newlines), so they rarely grow by doubling and copying: a string column gets 1.5× an
    // average column's share of a slice's bytes (a wider one grows once). A slice's buffers
    // are freed once it is encoded, and the next slice's come back from the allocator's heap.
    let rows_hint = data.iter().filter(|b| **b == b'\n').count() + 1;
    let cap = rows_hint.min(slice_rows);
    let str_bytes = data.len() / rows_hint * cap / n_cols.max(1) * 3 / 2;
    let schema = Arc::new(Schema::new(
        src.columns
            .iter()
            .map(|c| c.to_arrow_field())
            .collect::<Vec<Field>>(),
    ));
    let new_builders = || -> Vec<ColBuilder> {
        src.columns
            .iter()
            .map(|c| ColBuilder::new(&c.ty, cap, str_bytes))
            .collect()
    };
    let mut builders = new_builders();
    let mut emitted = false;
    let mut emit = |builders: &mut Vec<ColBuilder>, lines: &mut Vec<i64>| -> Result<()> {
        let arrays: Vec<ArrayRef> = builders.iter_mut().map(|b| b.finish()).collect();
        let batch = RecordBatch::try_new(schema.clone(), arrays)?;
        sink(Slice {
            batch,
            lines: std::mem::replace(lines, Vec::with_capacity(cap)),
        })
    };
    out.lines.reserve(cap);
    // A field longer than every null token cannot be one.
    let null_max = p.null_values.iter().map(|n| n.len()).max().unwrap_or(0);
    // The row of scalars is reused from record to record (see `recycle`).
    let mut row_buf: Vec<Scalar> = Vec::with_capacity(n_cols);
    let mut errors: Vec<(String, String)> = Vec::new();
    let mut start = rdr.position().clone();
    loop {
        let more = match rdr.read_byte_record(&mut record) {
            Ok(m) => m,
            Err(e) => {
                // Only I/O-level errors reach here with flexible(true); keep the rest as one reject.
                let rest = &data[start.byte() as usize..];
                out.rejects.push(Reject {
                    line: start.line(),
                    column: None,
                    reason: format!("unreadable CSV from here on: {e}"),
                    raw: escape_raw(rest),
                });
                break;
            }
        };
        if !more {
            break;
        }
        let end = rdr.position().clone();
        let raw_bytes = &data[start.byte() as usize..(end.byte() as usize).min(data.len())];
        // The reader's position can sit before the previous record's line ending (CRLF) or
        // before blank lines: count the newlines ahead of the record's first byte.
        let line = start.line()
            + raw_bytes
                .iter()
                .take_while(|b| **b == b'\n' || **b == b'\r')
                .filter(|b| **b == b'\n')
                .count() as u64;
        start = end;
        if record.len() == 1
            && record
                .get(0)
                .is_some_and(|f| f.is_empty() || (p.trim && f.trim_ascii().is_empty()))
        {
            continue; // a blank line
        }
        errors.clear();
        // Borrows the record's fields (the record is reused, so the vector is recycled).
        let mut row: Vec<Scalar> = recycle(std::mem::take(&mut row_buf));
        row.resize(n_cols, Scalar::Null);
        // One check for the whole record: an all-ASCII record needs no per-field UTF-8 check.
        let ascii = record.as_slice().is_ascii();
        if record.len() != header_len {
            let (column, what) = if record.len() > header_len {
                let c = header_names.last().cloned().unwrap_or_default();
                (
                    c.clone(),
                    format!(
                        "{} value(s) after the last column '{c}'",
                        record.len() - header_len
                    ),
                )
            } else {
                let c = header_names.get(record.len()).cloned().unwrap_or_default();
                (c.clone(), format!("no value from column '{c}' on"))
            };
            errors.push((
                column,
                format!(
                    "the row has {} fields but the header has {header_len} ({what}): a field holds an unquoted '{}' or the row is cut short; quote the field or fix the row",
                    record.len(),
                    p.delimiter
                ),
            ));
        } else {
            for (fi, field) in record.iter().enumerate() {
                let Some(Some(ci)) = field_map.get(fi).copied() else {
                    if !field.is_empty()
                        && src.on_unexpected_column == UnexpectedColumnPolicy::Quarantine
                    {
                        let name = unexpected
                            .iter()
                            .find(|(i, _)| *i == fi)
                            .map(|(_, n)| n.clone())
                            .unwrap_or_default();
                        errors.push((name.clone(), format!("unexpected column '{name}' holds a value; it is not in the contract")));
                    }
                    continue;
                };
                let col = &src.columns[ci];
                let field = if p.trim { field.trim_ascii() } else { field };
                let text = match if ascii {
                    // SAFETY: ASCII bytes are valid UTF-8.
                    Ok(unsafe { std::str::from_utf8_unchecked(field) })
                } else {
                    std::str::from_utf8(field)
                } {
                    Ok(t) => t,
                    Err(e) => {
                        errors.push((
                            col.name.clone(),
                            format!(
                                "column '{}' holds invalid UTF-8 (byte 0x{:02X} at offset {}); if the file is not UTF-8, set parse.encoding (e.g. \"windows-1252\")",
                                col.name,
                                field[e.valid_up_to()],
                                e.valid_up_to()
                            ),
                        ));
                        continue;
                    }
                };
                if text.len() <= null_max && p.null_values.iter().any(|n| n == text) {
                    if !col.nullable {
                        errors.push((
                            col.name.clone(),
                            format!("column '{}' is required (not null) but empty", col.name),
                        ));
                    }
                    continue;
                }
                match parse_scalar(text, &col.ty, &fmts) {
                    Ok(v) => row[ci] = v,
                    Err(m) => {
                        errors.push((col.name.clone(), format!("column '{}': {m}", col.name)))
                    }
                }
            }
        }
        if errors.is_empty() {
            for (b, v) in builders.iter_mut().zip(row.drain(..)) {
                b.push(v);
            }
            out.lines.push(line as i64);
            if out.lines.len() >= slice_rows {
                emit(&mut builders, &mut out.lines)?;
                emitted = true;
                builders = new_builders();
            }
        } else {
            let column = errors
                .iter()
                .map(|(c, _)| c.clone())
                .find(|c| !c.is_empty());
            let reason = errors
                .iter()
                .map(|(_, r)| r.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            out.rejects.push(Reject {
                line,
                column,
                reason,
                raw: escape_raw(trim_newline(raw_bytes)),
            });
        }
        row_buf = recycle(row);
    }
    // The rest; a file whose rows were all refused still yields its one (empty) slice.
    if !out.lines.is_empty() || !emitted {
        emit(&mut builders, &mut out.lines)?;
    }
    out.lines = Vec::new();
    Ok(out)
}

/// An empty vector with `v`'s allocation, free of `v`'s borrow (in-place collect reuses the
/// buffer: same element type, no element survives).
fn recycle<'b>(mut v: Vec<Scalar<'_>>) -> Vec<Scalar<'b>> {
    v.clear();
    v.into_iter().map(|_| Scalar::Null).collect()
}

fn trim_newline(b: &[u8]) -> &[u8] {
    let mut start = 0;
    while start < b.len() && (b[start] == b'\n' || b[start] == b'\r') {
        start += 1;
    }
    let b = &b[start..];
    let mut end = b.len();
    while end > 0 && (b[end - 1] == b'\n' || b[end - 1] == b'\r') {
        end -= 1;
    }
    &b[..end]
}

fn csv_error(file: &str, e: &csv::Error) -> Error {
    let line = e.position().map(|p| p.line()).unwrap_or(1);
    Error::Input {
        location: InputLocation {
            file: file.into(),
            line,
            column: None,
        },
        message: format!("cannot read the CSV: {e}"),
        fix: "check the delimiter, quote and encoding in the source's [parse] options".into(),
    }
}
