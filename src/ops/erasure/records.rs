//! Landing records of a source, read as the source is parsed: whether a CSV record, a JSON
//! line or a JSON array element belongs to a subject, the PII it carries, and a landing file
//! rewritten without the subjects' records (every other byte kept). It must not write files.

use super::*;

/// How the records of one source (in landing files and raw in its quarantine) are told to
/// belong to a subject: by the key field (the subject key or the subject_via column, as the
/// landing files name it) holding a value of the set; a record without a key value by a PII
/// value in one of its PII fields; a record that cannot be parsed into fields by a key value
/// or a PII value standing alone in its text.
pub(super) struct Records<'a> {
    pub(super) src: &'a Source,
    pub(super) keys: &'a KeySet,
    pub(super) pii: &'a Needles,
    pub(super) key_field: Option<String>,
    /// The key column is an integer column (its fields compare as integers).
    pub(super) key_int: bool,
    pub(super) pii_fields: Vec<String>,
}

/// A CSV record's fields, however it was split: the csv crate's record (quarantined raw
/// rows) or ingest's splitter positioned on a record (landing files, no copy of the fields).
pub(super) trait CsvRecord {
    fn field(&self, i: usize) -> Option<&[u8]>;
    fn fields(&self) -> Vec<&[u8]>;
}

impl CsvRecord for csv::ByteRecord {
    fn field(&self, i: usize) -> Option<&[u8]> {
        self.get(i)
    }
    fn fields(&self) -> Vec<&[u8]> {
        self.iter().collect()
    }
}

impl CsvRecord for crate::ingest::parse::csv_records::Records<'_> {
    fn field(&self, i: usize) -> Option<&[u8]> {
        self.get(i)
    }
    fn fields(&self) -> Vec<&[u8]> {
        self.iter().collect()
    }
}

/// Where a CSV file's key field and PII fields are (by its header, or the contract's order).
pub(super) struct CsvFields {
    key: Option<usize>,
    pii: Vec<usize>,
    /// The file should have a header but it is not known: fields cannot be told apart.
    header_unknown: bool,
}

impl<'a> Records<'a> {
    pub(super) fn new(src: &'a Source, keys: &'a KeySet, pii: &'a Needles) -> Self {
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
    pub(super) fn text(&self, text: &str) -> bool {
        self.keys.find_in(text) || self.pii.find_pii(text)
    }

    /// Where a field sits in a CSV record: by the file's header, or (no header) by the
    /// contract's order.
    pub(super) fn csv_index(&self, name: &str, header: Option<&[String]>) -> Option<usize> {
        match header {
            Some(h) => h.iter().position(|f| f == name),
            None if !self.src.parse.header => {
                self.src.columns.iter().position(|c| c.source == name)
            }
            None => None,
        }
    }

    /// Where the key and PII fields sit in the records of a file with this header (worked out
    /// once per file, not per record).
    pub(super) fn csv_fields(&self, header: Option<&[String]>) -> CsvFields {
        CsvFields {
            key: self
                .key_field
                .as_deref()
                .and_then(|k| self.csv_index(k, header)),
            pii: self
                .pii_fields
                .iter()
                .filter_map(|p| self.csv_index(p, header))
                .collect(),
            header_unknown: header.is_none() && self.src.parse.header,
        }
    }

    pub(super) fn csv(&self, rec: &csv::ByteRecord, header: Option<&[String]>) -> bool {
        self.csv_at(rec, &self.csv_fields(header))
    }

    /// Whether a CSV record belongs to a subject, its fields located by [`Records::csv_fields`].
    pub(super) fn csv_at(&self, rec: &impl CsvRecord, at: &CsvFields) -> bool {
        // Borrowed, not copied, when the field is valid UTF-8 (nearly always).
        let field = |i: usize| rec.field(i).map(String::from_utf8_lossy);
        if let Some(v) = at.key.and_then(field)
            && !v.trim().is_empty()
        {
            return self.keys.matches_field(&v, self.key_int);
        }
        if at.header_unknown {
            // The file's header is unknown (a quarantined row of a file no longer in the
            // landing root): no field can be told apart, so the record's text is searched.
            let text: Vec<String> = rec
                .fields()
                .into_iter()
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .collect();
            return self.text(&text.join(","));
        }
        at.pii
            .iter()
            .filter_map(|&i| field(i))
            .any(|v| self.pii.find_pii(&v))
    }

    pub(super) fn json(&self, v: &serde_json::Value) -> bool {
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
    pub(super) fn pii_of_csv(
        &self,
        rec: &csv::ByteRecord,
        header: Option<&[String]>,
    ) -> Vec<String> {
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

    pub(super) fn pii_of_json(&self, v: &serde_json::Value) -> Vec<String> {
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
    pub(super) fn pii_of_raw(&self, raw: &str, header: Option<&[String]>) -> Vec<String> {
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

    pub(super) fn pii_of_file(&self, data: &[u8]) -> Vec<String> {
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
    pub(super) fn one_csv_record(&self, raw: &str) -> Option<csv::ByteRecord> {
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
    pub(super) fn raw(&self, raw: &str, header: Option<&[String]>) -> bool {
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

/// A landing file without the subjects' records, and how many it dropped; `None` when it
/// holds none. A JSON file in whose text no key value or PII value stands alone is not parsed
/// (parsing JSON costs many times that search), unless some keys or PII values are known only
/// as HMACs (no text search finds those: every record is judged); a CSV file is always split
/// straight away (the split costs about what the search does, and the search would be wasted
/// on a file with a hit).
pub(super) fn without_subjects(data: &[u8], rec: &Records) -> Option<(Vec<u8>, u64)> {
    if rec.src.format != Format::Csv && rec.keys.hmacs.is_empty() && rec.pii.pii_hmacs.is_empty() {
        let text = String::from_utf8_lossy(data);
        if !rec.keys.find_in(&text) && !rec.pii.find_pii(&text) {
            return None;
        }
    }
    let (bytes, dropped) = match rec.src.format {
        Format::Csv => drop_csv_records(data, rec),
        Format::Ndjson => drop_ndjson_lines(data, rec),
        Format::JsonArray | Format::Json => drop_json_elements(data, rec)?,
    };
    (dropped > 0).then_some((bytes, dropped))
}

/// The header of a CSV landing file (its first record's fields, BOM and spaces trimmed).
pub(super) fn csv_header(data: &[u8], src: &Source) -> Option<Vec<String>> {
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
pub(super) fn header_fields(rec: &csv::ByteRecord) -> Vec<String> {
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
pub(super) fn drop_csv_records(data: &[u8], rec_test: &Records) -> (Vec<u8>, u64) {
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
    let mut fields = rec_test.csv_fields(None);
    let mut first = src.parse.header;
    let mut cursor = 0usize;
    let mut dropped = 0;
    while let Some(at) = split.next_record() {
        if first {
            first = false;
            let rec: csv::ByteRecord = split.iter().collect();
            fields = rec_test.csv_fields(Some(&header_fields(&rec)));
            continue;
        }
        let hit = match &at.broken {
            Some(_) => rec_test.text(&String::from_utf8_lossy(&data[at.start..at.end])),
            None => rec_test.csv_at(&split, &fields),
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

pub(super) fn drop_ndjson_lines(data: &[u8], rec: &Records) -> (Vec<u8>, u64) {
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
pub(super) fn drop_json_elements(data: &[u8], rec: &Records) -> Option<(Vec<u8>, u64)> {
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
