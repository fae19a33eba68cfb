//! CSV landing files to Arrow slices of good rows plus rejected rows with reasons.
//! Handles header mapping, delimiter, quote, null tokens, BOM, CRLF, quoted commas and newlines,
//! invalid UTF-8 and ragged rows. It must not do I/O or write tables.

use std::sync::Arc;

use arrow::array::NullBufferBuilder;
use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Decimal128Array, Float64Array, Int32Array, Int64Array,
    StringArray, TimestampMicrosecondArray,
};
use arrow::buffer::{BooleanBuffer, OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;

use super::csv_records::Records;
use super::{Input, ParsedFile, Parser, Reject, Sink, Slice, escape_raw};
use crate::error::{Error, InputLocation, Result};
use crate::project::config::{Source, UnexpectedColumnPolicy};
use crate::project::contract::{ColumnType, Scalar, TemporalFormats, parse_scalar};

/// One contract column's values in the slice being built. A row's fields go straight into
/// their columns as they are parsed; a refused row is taken back by `truncate`, so no row of
/// scalars is held in between and nothing of a refused row reaches a slice.
struct ColumnBuf {
    field: Arc<Field>,
    nulls: NullBufferBuilder,
    values: Values,
}

enum Values {
    Str {
        offsets: Vec<i32>,
        data: Vec<u8>,
    },
    /// Int32 and Date (days since the epoch).
    I32(Vec<i32>),
    /// Int64 and Timestamp (microseconds, UTC).
    I64(Vec<i64>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    Dec(Vec<i128>),
}

impl ColumnBuf {
    fn new(field: Arc<Field>, ty: &ColumnType, cap: usize, bytes: usize) -> ColumnBuf {
        let values = match ty {
            ColumnType::String => {
                let mut offsets = Vec::with_capacity(cap + 1);
                offsets.push(0);
                Values::Str {
                    offsets,
                    data: Vec::with_capacity(bytes),
                }
            }
            ColumnType::Int32 | ColumnType::Date => Values::I32(Vec::with_capacity(cap)),
            ColumnType::Int64 | ColumnType::Timestamp => Values::I64(Vec::with_capacity(cap)),
            ColumnType::Float64 => Values::F64(Vec::with_capacity(cap)),
            ColumnType::Bool => Values::Bool(Vec::with_capacity(cap)),
            ColumnType::Decimal(..) => Values::Dec(Vec::with_capacity(cap)),
            ColumnType::Struct(_) | ColumnType::List(_) => {
                unreachable!("nested CSV columns are refused before building")
            }
        };
        ColumnBuf {
            field,
            nulls: NullBufferBuilder::new(cap),
            values,
        }
    }

    fn push_str(&mut self, v: &str) {
        if let Values::Str { offsets, data } = &mut self.values {
            data.extend_from_slice(v.as_bytes());
            offsets.push(data.len() as i32);
            self.nulls.append_non_null();
        }
    }

    fn push(&mut self, v: Scalar<'_>) {
        match (&mut self.values, v) {
            (Values::Str { .. }, Scalar::String(s)) => return self.push_str(s),
            (Values::I32(b), Scalar::Int32(x) | Scalar::Date(x)) => b.push(x),
            (Values::I64(b), Scalar::Int64(x) | Scalar::Timestamp(x)) => b.push(x),
            (Values::F64(b), Scalar::Float64(x)) => b.push(x),
            (Values::Bool(b), Scalar::Bool(x)) => b.push(x),
            (Values::Dec(b), Scalar::Decimal(x)) => b.push(x),
            _ => return self.push_null(),
        }
        self.nulls.append_non_null();
    }

    fn push_null(&mut self) {
        match &mut self.values {
            Values::Str { offsets, data } => offsets.push(data.len() as i32),
            Values::I32(b) => b.push(0),
            Values::I64(b) => b.push(0),
            Values::F64(b) => b.push(0.0),
            Values::Bool(b) => b.push(false),
            Values::Dec(b) => b.push(0),
        }
        self.nulls.append_null();
    }

    /// Keep the first `rows` values (take back a refused row).
    fn truncate(&mut self, rows: usize) {
        match &mut self.values {
            Values::Str { offsets, data } => {
                offsets.truncate(rows + 1);
                data.truncate(offsets[rows] as usize);
            }
            Values::I32(b) => b.truncate(rows),
            Values::I64(b) => b.truncate(rows),
            Values::F64(b) => b.truncate(rows),
            Values::Bool(b) => b.truncate(rows),
            Values::Dec(b) => b.truncate(rows),
        }
        self.nulls.truncate(rows);
    }

    /// String bytes held (offsets are 32-bit: a slice is cut before they could overflow).
    fn bytes(&self) -> usize {
        match &self.values {
            Values::Str { data, .. } => data.len(),
            _ => 0,
        }
    }

    fn finish(self) -> Result<ArrayRef> {
        let nulls = { self.nulls }.finish();
        let ty = self.field.data_type().clone();
        Ok(match self.values {
            Values::Str { offsets, data } => {
                let offsets = OffsetBuffer::new(ScalarBuffer::from(offsets));
                // Checked again as a whole (cheap next to parsing): no unchecked construction.
                Arc::new(StringArray::try_new(offsets, data.into(), nulls)?)
            }
            Values::I32(v) => match ty {
                DataType::Date32 => Arc::new(Date32Array::new(v.into(), nulls)),
                _ => Arc::new(Int32Array::new(v.into(), nulls)),
            },
            Values::I64(v) => match ty {
                DataType::Timestamp(..) => {
                    Arc::new(TimestampMicrosecondArray::new(v.into(), nulls).with_data_type(ty))
                }
                _ => Arc::new(Int64Array::new(v.into(), nulls)),
            },
            Values::F64(v) => Arc::new(Float64Array::new(v.into(), nulls)),
            Values::Bool(v) => Arc::new(BooleanArray::new(BooleanBuffer::from(v), nulls)),
            Values::Dec(v) => Arc::new(Decimal128Array::new(v.into(), nulls).with_data_type(ty)),
        })
    }
}

/// A slice is handed on at `slice_rows` rows, or earlier once a string column holds this many
/// bytes (Arrow's 32-bit offsets).
const SLICE_STRING_BYTES: usize = 1 << 30;

/// The CSV parser: one file (already decoded to UTF-8 where an encoding is declared, BOM removed),
/// handing good rows to `sink` every `slice_rows` rows. Only the header can refuse the file,
/// so every refusal comes before the first slice.
pub struct Csv;

impl Parser for Csv {
    fn parse(&self, input: &Input, sink: &mut Sink) -> Result<ParsedFile> {
        let (data, src) = (input.data, input.source);
        let file = input.file;
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
        // Fields are trimmed below, only when they need it.
        let mut record = Records::new(data, p.delimiter as u8, p.quote as u8)
            .with_quote_limit(p.max_quoted_lines);
        let Some(header) = Header::read(&mut record, file, src, &mut out)? else {
            out.warnings
                .push(format!("{file}: empty file, nothing to ingest"));
            return Ok(out);
        };
        let row = RowReader {
            src,
            header: &header,
            fmts: TemporalFormats {
                date: p.date_formats.clone(),
                timestamp: p.timestamp_formats.clone(),
            },
            // A field longer than every null token cannot be one.
            null_max: p.null_values.iter().map(|n| n.len()).max().unwrap_or(0),
        };
        let n_cols = src.columns.len();

        let (cap, str_bytes) = slice_capacity(data, input.slice_rows, n_cols);
        let schema = Arc::new(Schema::new(
            src.columns
                .iter()
                .map(|c| c.to_arrow_field())
                .collect::<Vec<Field>>(),
        ));
        let new_columns = || -> Vec<ColumnBuf> {
            src.columns
                .iter()
                .zip(schema.fields())
                .map(|(c, f)| ColumnBuf::new(f.clone(), &c.ty, cap, str_bytes))
                .collect()
        };
        // Contract columns the file lacks (nullable, warned above): NULL in every row.
        let absent: Vec<usize> = (0..n_cols)
            .filter(|ci| !header.field_map.contains(&Some(*ci)))
            .collect();
        let mut columns = new_columns();
        let mut emitted = false;
        let mut emit = |columns: Vec<ColumnBuf>, lines: &mut Vec<i64>| -> Result<()> {
            let arrays = columns
                .into_iter()
                .map(ColumnBuf::finish)
                .collect::<Result<Vec<ArrayRef>>>()?;
            let batch = RecordBatch::try_new(schema.clone(), arrays)?;
            sink(Slice {
                batch,
                lines: std::mem::replace(lines, Vec::with_capacity(cap)),
            })
        };
        out.lines.reserve(cap);
        let mut errors: Vec<(String, String)> = Vec::new();
        while let Some(at) = record.next_record() {
            let raw_bytes = &data[at.start..at.end];
            let line = at.line;
            if let Some(reason) = at.broken {
                out.rejects.push(Reject {
                    line,
                    column: None,
                    reason,
                    raw: escape_raw(trim_newline(raw_bytes)),
                });
                continue;
            }
            if record.len() == 1
                && record
                    .get(0)
                    .is_some_and(|f| f.is_empty() || (p.trim && f.trim_ascii().is_empty()))
            {
                continue; // a blank line
            }
            errors.clear();
            let kept = out.lines.len();
            // One check for the whole record: an all-ASCII record needs no per-field UTF-8 check.
            row.read(&record, raw_bytes.is_ascii(), &mut columns, &mut errors);
            if errors.is_empty() {
                for ci in &absent {
                    columns[*ci].push_null();
                }
                out.lines.push(line as i64);
                if out.lines.len() >= input.slice_rows
                    || columns.iter().any(|c| c.bytes() >= SLICE_STRING_BYTES)
                {
                    emit(
                        std::mem::replace(&mut columns, new_columns()),
                        &mut out.lines,
                    )?;
                    emitted = true;
                }
            } else {
                for c in &mut columns {
                    c.truncate(kept);
                }
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
        }
        // The rest; a file whose rows were all refused still yields its one (empty) slice.
        if !out.lines.is_empty() || !emitted {
            emit(columns, &mut out.lines)?;
        }
        out.lines = Vec::new();
        Ok(out)
    }
}

/// How many rows, and string bytes per column, a slice's builders are sized for up front.
///
/// From the file's average row (newlines of its first MiB; a whole-file count cost a pass over
/// every byte), so they rarely grow by doubling and copying: a string column gets 1.5× an
/// average column's share of a slice's bytes (a wider one grows once). A slice's buffers are
/// freed once it is encoded, and the next slice's come back from the allocator's heap.
fn slice_capacity(data: &[u8], slice_rows: usize, n_cols: usize) -> (usize, usize) {
    let sample = &data[..data.len().min(1 << 20)];
    let sample_rows = memchr::memchr_iter(b'\n', sample).count() + 1;
    let rows_hint = (data.len() / (sample.len() / sample_rows).max(1)).max(1);
    let cap = rows_hint.min(slice_rows);
    (cap, data.len() / rows_hint * cap / n_cols.max(1) * 3 / 2)
}

/// How a file's fields map to the contract's columns.
struct Header {
    /// Field index → the contract column it holds (None: a column not in the contract).
    field_map: Vec<Option<usize>>,
    /// The fields not in the contract: index and name.
    unexpected: Vec<(usize, String)>,
    /// How many fields a row has.
    len: usize,
    names: Vec<String>,
}

impl Header {
    /// Read the file's header (when it has one; else the contract's columns in order) and
    /// hold it against the contract, with the source's policy for columns it does not
    /// declare. None: the file holds nothing.
    fn read(
        record: &mut Records<'_>,
        file: &str,
        src: &Source,
        out: &mut ParsedFile,
    ) -> Result<Option<Header>> {
        let n_cols = src.columns.len();
        let mut h = Header {
            field_map: Vec::new(),
            unexpected: Vec::new(),
            len: n_cols,
            names: Vec::new(),
        };
        if src.parse.header {
            if record.next_record().is_none() {
                return Ok(None);
            }
            h.len = record.len();
            for (i, field) in record.iter().enumerate() {
                let name = String::from_utf8_lossy(field).trim().to_string();
                h.names.push(name.clone());
                match src.columns.iter().position(|c| c.source == name) {
                    Some(ci) if h.field_map.contains(&Some(ci)) => {
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
                    Some(ci) => h.field_map.push(Some(ci)),
                    None => {
                        h.field_map.push(None);
                        h.unexpected.push((i, name));
                    }
                }
            }
        } else {
            h.field_map = (0..n_cols).map(Some).collect();
            h.names = src.columns.iter().map(|c| c.source.clone()).collect();
        }
        h.check(file, src, out)?;
        if h.len == 0 {
            h.len = h.field_map.len();
        }
        Ok(Some(h))
    }

    /// Apply the source's policy to the columns it does not declare, and refuse a file that
    /// lacks a required one (warn of a missing nullable one).
    fn check(&self, file: &str, src: &Source, out: &mut ParsedFile) -> Result<()> {
        for (_, name) in &self.unexpected {
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
            if self.field_map.contains(&Some(ci)) {
                continue;
            }
            if c.nullable {
                out.warnings.push(format!(
                    "{file}: the file has no column '{}'; it is NULL for every row",
                    c.source
                ));
                continue;
            }
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
        Ok(())
    }
}

/// Reads one record's fields into the column buffers, by the header and the contract.
struct RowReader<'a> {
    src: &'a Source,
    header: &'a Header,
    fmts: TemporalFormats,
    /// The longest null token: a longer field is not one.
    null_max: usize,
}

impl RowReader<'_> {
    /// Push the record's values into `columns`; what is wrong with it goes to `errors` as
    /// (column, reason). `ascii`: the record is all ASCII (no field needs a UTF-8 check).
    #[inline]
    fn read(
        &self,
        record: &Records<'_>,
        ascii: bool,
        columns: &mut [ColumnBuf],
        errors: &mut Vec<(String, String)>,
    ) {
        let (src, p) = (self.src, &self.src.parse);
        if record.len() != self.header.len {
            errors.push(self.field_count_error(record.len()));
            return;
        }
        for (fi, field) in record.iter().enumerate() {
            let Some(Some(ci)) = self.header.field_map.get(fi).copied() else {
                if !field.is_empty()
                    && src.on_unexpected_column == UnexpectedColumnPolicy::Quarantine
                {
                    let name = self
                        .header
                        .unexpected
                        .iter()
                        .find(|(i, _)| *i == fi)
                        .map(|(_, n)| n.clone())
                        .unwrap_or_default();
                    errors.push((
                        name.clone(),
                        format!(
                            "unexpected column '{name}' holds a value; it is not in the contract"
                        ),
                    ));
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
                // Spaces around a number, a date or a flag are not data: typed columns read
                // through them; strings keep them unless `trim` is set.
                Ok(t) if matches!(col.ty, ColumnType::String) => t,
                Ok(t) => t.trim_matches(|c: char| c.is_ascii_whitespace()),
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
            if text.len() <= self.null_max && p.null_values.iter().any(|n| n == text) {
                if !col.nullable {
                    errors.push((
                        col.name.clone(),
                        format!("column '{}' is required (not null) but empty", col.name),
                    ));
                }
                columns[ci].push_null();
                continue;
            }
            let buf = &mut columns[ci];
            if let ColumnType::String = col.ty {
                buf.push_str(text);
                continue;
            }
            match parse_scalar(text, &col.ty, &self.fmts) {
                Ok(v) => buf.push(v),
                Err(m) => errors.push((col.name.clone(), format!("column '{}': {m}", col.name))),
            }
        }
    }

    /// Why a record with `n` fields does not fit the header.
    fn field_count_error(&self, n: usize) -> (String, String) {
        let h = self.header;
        let (column, what) = if n > h.len {
            let c = h.names.last().cloned().unwrap_or_default();
            (
                c.clone(),
                format!("{} value(s) after the last column '{c}'", n - h.len),
            )
        } else {
            let c = h.names.get(n).cloned().unwrap_or_default();
            (c.clone(), format!("no value from column '{c}' on"))
        };
        (
            column,
            format!(
                "the row has {n} fields but the header has {} ({what}): a field holds an unquoted '{}' or the row is cut short; quote the field or fix the row",
                h.len, self.src.parse.delimiter
            ),
        )
    }
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
