//! Parsing one landing file into good rows and quarantined rejects: one [`Parser`] per format,
//! CSV (csv.rs, over the raw records of csv_records.rs) and JSON (json.rs), behind one entry
//! point that decodes the text first. It must not do I/O nor write tables.

pub mod csv;
pub mod csv_records;
pub mod json;

use arrow::array::RecordBatch;

use crate::error::{Error, Result};
use crate::project::config::{Format, Source};

/// One landing file's text (UTF-8, without BOM), as a parser reads it.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub data: &'a [u8],
    /// The file's name in messages and reject rows.
    pub file: &'a str,
    pub source: &'a Source,
    /// Hand good rows on in slices of at most this many rows (at least 1).
    pub slice_rows: usize,
}

/// A parser of one landing file format: good rows go to `sink` in slices, in file order;
/// rejects, warnings and a refusal of the whole file come back. A refusal (`Error::Input`)
/// always comes before the first slice.
pub trait Parser: Sync {
    fn parse(&self, input: &Input, sink: &mut Sink) -> Result<ParsedFile>;
}

/// Where a parser hands its slices of good rows.
pub type Sink<'s> = dyn FnMut(Slice) -> Result<()> + 's;

/// The parser of a source's format.
pub fn parser_for(format: Format) -> &'static dyn Parser {
    match format {
        Format::Csv => &csv::Csv,
        Format::Ndjson | Format::JsonArray | Format::Json => &json::Json,
    }
}

#[derive(Debug, Default)]
pub struct ParsedFile {
    /// Good rows, contract columns only (None: the file is empty). Left None by
    /// [`parse_file_in_slices`], which hands the rows on as they are parsed.
    pub batch: Option<RecordBatch>,
    /// Source line of each good row (empty from [`parse_file_in_slices`]).
    pub lines: Vec<i64>,
    pub rejects: Vec<Reject>,
    pub warnings: Vec<String>,
}

/// Good rows are handed on in slices of at most this many rows, so a landing file of any size
/// is parsed and encoded in bounded memory (DataFusion's default batch size).
pub const SLICE_ROWS: usize = 8192;

/// A slice of a landing file's good rows: contract columns, and the source line of each row.
#[derive(Debug)]
pub struct Slice {
    pub batch: RecordBatch,
    pub lines: Vec<i64>,
}

/// A row refused by the contract.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    pub line: u64,
    pub column: Option<String>,
    pub reason: String,
    /// The raw record; invalid UTF-8 bytes are written as `\xNN`, and `\` as `\\`.
    pub raw: String,
}

/// Raw bytes as text without losing any: valid UTF-8 passes (with `\` doubled), invalid bytes
/// become `\xNN`.
pub fn escape_raw(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        out.push_str(&chunk.valid().replace('\\', "\\\\"));
        for x in chunk.invalid() {
            out.push_str(&format!("\\x{x:02X}"));
        }
    }
    out
}

/// Parse one landing file's bytes for `src` into one batch (public for `silt source new`'s
/// self-check, `silt profile` and tests).
pub fn parse_file(data: &[u8], file: &str, src: &Source) -> Result<ParsedFile> {
    let mut slices: Vec<Slice> = Vec::new();
    let mut out = parse_file_in_slices(data, file, src, SLICE_ROWS, &mut |s| {
        slices.push(s);
        Ok(())
    })?;
    if !slices.is_empty() {
        let schema = slices[0].batch.schema();
        out.batch = Some(arrow::compute::concat_batches(
            &schema,
            slices.iter().map(|s| &s.batch),
        )?);
        out.lines = slices.into_iter().flat_map(|s| s.lines).collect();
    }
    Ok(out)
}

/// Parse one landing file's bytes for `src`, handing its good rows to `sink` in slices of at
/// most `slice_rows` rows, in file order. A file with a usable header but no good row yields
/// one empty slice; an empty file none. A refusal of the whole file (`Error::Input`) always
/// comes before the first slice, so a caller never holds rows of a refused file.
pub fn parse_file_in_slices(
    data: &[u8],
    file: &str,
    src: &Source,
    slice_rows: usize,
    sink: &mut dyn FnMut(Slice) -> Result<()>,
) -> Result<ParsedFile> {
    let decoded;
    let data = if src.parse.encoding.eq_ignore_ascii_case("utf-8")
        || src.parse.encoding.eq_ignore_ascii_case("utf8")
    {
        data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data)
    } else {
        let enc =
            encoding_rs::Encoding::for_label(src.parse.encoding.as_bytes()).ok_or_else(|| {
                Error::config(
                    &src.file,
                    format!("unknown encoding '{}'", src.parse.encoding),
                )
            })?;
        let (text, _, _) = enc.decode(data);
        decoded = text.into_owned().into_bytes();
        &decoded[..]
    };
    let input = Input {
        data,
        file,
        source: src,
        slice_rows: slice_rows.max(1),
    };
    parser_for(src.format).parse(&input, sink)
}
