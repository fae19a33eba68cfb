//! Splits CSV bytes into records and fields, with the csv crate's reading rules for the options
//! a source can set (delimiter, quote; records end at `\n`, `\r` or `\r\n`; a doubled quote inside
//! quotes is one quote; blank lines are skipped), and each record's line and raw bytes.
//! Fields borrow from the input unless a doubled quote has to be undone, so the common record
//! costs one pass over its bytes and no copy. It must not interpret field values: that is
//! `csv.rs`. A test in `tests/it/ingest.rs` reads random inputs with both readers and wants
//! the same records.

/// One field of the current record: a range of the input, or of the record's scratch buffer
/// (a quoted field with a doubled quote, or text after the closing quote).
#[derive(Clone, Copy)]
enum Span {
    Input(usize, usize),
    Scratch(usize, usize),
}

/// A reader over CSV bytes; `next_record` fills its fields.
pub struct Records<'a> {
    data: &'a [u8],
    delimiter: u8,
    quote: u8,
    pos: usize,
    /// 1 + the newlines before `pos`.
    line: u64,
    fields: Vec<Span>,
    scratch: Vec<u8>,
    /// Bytes that end an unquoted field: the delimiter, `\r` and `\n`.
    stops: [bool; 256],
    /// At most this many line breaks inside one quoted field, and the quote must close before
    /// the end of the input; `None`: the csv crate's rule (a quote runs on to the end).
    quote_limit: Option<u64>,
}

/// Where the record just read sits in the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordPos {
    /// The line its first byte is on (1-based).
    pub line: u64,
    /// Its bytes, from its first byte to its last before the line ending.
    pub start: usize,
    pub end: usize,
    /// Under a quote limit: why the record is refused (a quote that does not close in time).
    /// Its bytes are then its first line only, and reading goes on at the next line.
    pub broken: Option<String>,
}

impl<'a> Records<'a> {
    pub fn new(data: &'a [u8], delimiter: u8, quote: u8) -> Records<'a> {
        let mut stops = [false; 256];
        stops[delimiter as usize] = true;
        stops[b'\r' as usize] = true;
        stops[b'\n' as usize] = true;
        Records {
            data,
            delimiter,
            quote,
            pos: 0,
            line: 1,
            fields: Vec::new(),
            scratch: Vec::new(),
            stops,
            quote_limit: None,
        }
    }

    /// A quoted field may span at most `lines` line breaks and must close before the end of
    /// the input; a record breaking either rule is returned as `broken`, one line long, so an
    /// unterminated quote never swallows the records after it.
    pub fn with_quote_limit(mut self, lines: u64) -> Self {
        self.quote_limit = Some(lines);
        self
    }

    /// The record starting at `start` on `line` refused as its first line only; reading goes
    /// on at the next line.
    fn broken(&mut self, start: usize, line: u64, why: String) -> Option<RecordPos> {
        let data = self.data;
        let eol = memchr::memchr(b'\n', &data[start..]).map_or(data.len(), |i| start + i);
        let end = if eol > start && data[eol - 1] == b'\r' {
            eol - 1
        } else {
            eol
        };
        self.pos = eol;
        self.line = line;
        self.fields.clear();
        self.scratch.clear();
        self.fields.push(Span::Input(start, end));
        Some(RecordPos {
            line,
            start,
            end,
            broken: Some(why),
        })
    }

    /// Read the next record; `None` at the end of the input.
    pub fn next_record(&mut self) -> Option<RecordPos> {
        let data = self.data;
        let n = data.len();
        // Line endings between records, and blank lines.
        while self.pos < n && (data[self.pos] == b'\n' || data[self.pos] == b'\r') {
            if data[self.pos] == b'\n' {
                self.line += 1;
            }
            self.pos += 1;
        }
        if self.pos >= n {
            return None;
        }
        let start = self.pos;
        let line = self.line;
        self.fields.clear();
        self.scratch.clear();
        loop {
            // One field starting at `pos`.
            let mut pos = self.pos;
            if pos < n && data[pos] == self.quote {
                pos += 1;
                let mut seg = pos; // the quoted text not yet taken
                let mut owned: Option<usize> = None; // scratch start, once copying
                let span;
                let opened = self.line;
                loop {
                    let Some(k) = memchr::memchr(self.quote, &data[pos..]) else {
                        if self.quote_limit.is_some() {
                            return self.broken(
                                start,
                                line,
                                format!(
                                    "a quote opened on line {opened} is never closed: the record is refused and reading goes on at the next line; close the quote (a quote inside a field is written twice)"
                                ),
                            );
                        }
                        // The input ends inside the quotes: the field is the rest.
                        self.line += newlines(&data[pos..]);
                        span = self.take(owned, seg, n);
                        pos = n;
                        break;
                    };
                    let q = pos + k;
                    self.line += newlines(&data[pos..q]);
                    if let Some(limit) = self.quote_limit
                        && self.line - opened > limit
                    {
                        return self.broken(
                            start,
                            line,
                            format!(
                                "a quote opened on line {opened} runs on past {limit} line break(s) (parse.max_quoted_lines): the record is refused and reading goes on at the next line; close the quote, or raise the limit if a field really spans more lines"
                            ),
                        );
                    }
                    if q + 1 < n && data[q + 1] == self.quote {
                        // A doubled quote: keep one, go on inside the quotes.
                        owned.get_or_insert(self.scratch.len());
                        self.scratch.extend_from_slice(&data[seg..=q]);
                        pos = q + 2;
                        seg = pos;
                        continue;
                    }
                    pos = q + 1;
                    if pos < n && !self.stops[data[pos] as usize] {
                        // Text after the closing quote belongs to the field, as written.
                        let s = *owned.get_or_insert(self.scratch.len());
                        self.scratch.extend_from_slice(&data[seg..q]);
                        let mut j = pos;
                        while j < n && !self.stops[data[j] as usize] {
                            j += 1;
                        }
                        self.scratch.extend_from_slice(&data[pos..j]);
                        span = Span::Scratch(s, self.scratch.len());
                        pos = j;
                    } else {
                        span = self.take(owned, seg, q);
                    }
                    break;
                }
                self.fields.push(span);
            } else {
                let mut j = pos;
                while j < n && !self.stops[data[j] as usize] {
                    j += 1;
                }
                self.fields.push(Span::Input(pos, j));
                pos = j;
            }
            if pos < n && data[pos] == self.delimiter {
                self.pos = pos + 1;
                if self.pos >= n {
                    // A delimiter at the very end: one more, empty field.
                    self.fields.push(Span::Input(n, n));
                    return Some(RecordPos {
                        line,
                        start,
                        end: n,
                        broken: None,
                    });
                }
                continue;
            }
            // A line ending or the end of the input ends the record.
            self.pos = pos;
            return Some(RecordPos {
                line,
                start,
                end: pos,
                broken: None,
            });
        }
    }

    /// The quoted text `seg..end`, appended to what is already in scratch (if copying).
    fn take(&mut self, owned: Option<usize>, seg: usize, end: usize) -> Span {
        match owned {
            None => Span::Input(seg, end),
            Some(s) => {
                self.scratch.extend_from_slice(&self.data[seg..end]);
                Span::Scratch(s, self.scratch.len())
            }
        }
    }

    /// Fields of the record just read.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&[u8]> {
        self.fields.get(i).map(|s| match *s {
            Span::Input(a, b) => &self.data[a..b],
            Span::Scratch(a, b) => &self.scratch[a..b],
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        (0..self.fields.len()).filter_map(|i| self.get(i))
    }
}

/// Newlines in a quoted field's text. Most quoted fields are a few words: a plain count
/// (vectorised by the compiler) beats setting up memchr's search for each one.
fn newlines(b: &[u8]) -> u64 {
    if b.len() < 64 {
        b.iter().filter(|&&c| c == b'\n').count() as u64
    } else {
        memchr::memchr_iter(b'\n', b).count() as u64
    }
}
