//! The schema contract of a landing source: column types, their Arrow mapping, and the
//! checks that turn one raw value (a CSV field or a JSON value) into a typed value or a
//! reason it is refused. It must not do I/O or decide what happens to a refused row.

use std::fmt;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, TimeUnit};
use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};

/// A contract column.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    /// Field name in the landing file.
    pub source: String,
    pub ty: ColumnType,
    pub nullable: bool,
    pub description: Option<String>,
}

/// The types a contract can declare. Timestamps are UTC microseconds; decimals are exact.
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnType {
    String,
    Int32,
    Int64,
    Float64,
    Bool,
    Date,
    Timestamp,
    Decimal(u8, i8),
    Struct(Vec<Column>),
    List(Box<ColumnType>),
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColumnType::String => write!(f, "string"),
            ColumnType::Int32 => write!(f, "int32"),
            ColumnType::Int64 => write!(f, "int64"),
            ColumnType::Float64 => write!(f, "float64"),
            ColumnType::Bool => write!(f, "bool"),
            ColumnType::Date => write!(f, "date"),
            ColumnType::Timestamp => write!(f, "timestamp"),
            ColumnType::Decimal(p, s) => write!(f, "decimal({p},{s})"),
            ColumnType::Struct(cols) => {
                write!(f, "struct<")?;
                for (i, c) in cols.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{}: {}", c.name, c.ty)?;
                    if !c.nullable {
                        write!(f, " not null")?;
                    }
                }
                write!(f, ">")
            }
            ColumnType::List(t) => write!(f, "list<{t}>"),
        }
    }
}

impl ColumnType {
    /// Parse `string`, `int64`, `decimal(12,2)`, `struct<a: string, b: date not null>`, `list<string>`.
    pub fn parse(s: &str) -> Result<ColumnType, String> {
        let mut p = TypeParser {
            s: s.as_bytes(),
            i: 0,
        };
        let t = p.ty()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("unexpected '{}' after the type", &s[p.i..]));
        }
        Ok(t)
    }

    pub fn to_arrow(&self) -> DataType {
        match self {
            ColumnType::String => DataType::Utf8,
            ColumnType::Int32 => DataType::Int32,
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Float64 => DataType::Float64,
            ColumnType::Bool => DataType::Boolean,
            ColumnType::Date => DataType::Date32,
            ColumnType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            ColumnType::Decimal(p, s) => DataType::Decimal128(*p, *s),
            ColumnType::Struct(cols) => DataType::Struct(Fields::from(
                cols.iter().map(|c| c.to_arrow_field()).collect::<Vec<_>>(),
            )),
            ColumnType::List(t) => {
                DataType::List(Arc::new(Field::new("element", t.to_arrow(), true)))
            }
        }
    }

    pub fn is_scalar(&self) -> bool {
        !matches!(self, ColumnType::Struct(_) | ColumnType::List(_))
    }
}

impl Column {
    pub fn to_arrow_field(&self) -> Field {
        Field::new(&self.name, self.ty.to_arrow(), self.nullable)
    }
}

struct TypeParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl TypeParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn word(&mut self) -> String {
        self.ws();
        let start = self.i;
        while self.i < self.s.len()
            && (self.s[self.i].is_ascii_alphanumeric() || self.s[self.i] == b'_')
        {
            self.i += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.i]).to_lowercase()
    }
    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected '{}'", c as char))
        }
    }
    fn number(&mut self) -> Result<i64, String> {
        let w = self.word();
        w.parse()
            .map_err(|_| format!("expected a number, found '{w}'"))
    }
    fn ty(&mut self) -> Result<ColumnType, String> {
        let w = self.word();
        Ok(match w.as_str() {
            "string" | "str" | "text" | "varchar" | "utf8" => ColumnType::String,
            "int" | "int32" | "integer" => ColumnType::Int32,
            "int64" | "bigint" | "long" => ColumnType::Int64,
            "float" | "float64" | "double" => ColumnType::Float64,
            "bool" | "boolean" => ColumnType::Bool,
            "date" => ColumnType::Date,
            "timestamp" => ColumnType::Timestamp,
            "decimal" | "numeric" => {
                self.expect(b'(')?;
                let p = self.number()?;
                self.expect(b',')?;
                let s = self.number()?;
                self.expect(b')')?;
                if !(1..=38).contains(&p) || s < 0 || s > p {
                    return Err(format!(
                        "decimal({p},{s}) needs 1 <= precision <= 38 and 0 <= scale <= precision"
                    ));
                }
                ColumnType::Decimal(p as u8, s as i8)
            }
            "list" | "array" => {
                self.expect(b'<')?;
                let t = self.ty()?;
                self.expect(b'>')?;
                ColumnType::List(Box::new(t))
            }
            "struct" => {
                self.expect(b'<')?;
                let mut cols = Vec::new();
                loop {
                    let name = self.word();
                    if name.is_empty() {
                        return Err("expected a field name in struct<…>".into());
                    }
                    self.expect(b':')?;
                    let ty = self.ty()?;
                    let save = self.i;
                    let mut nullable = true;
                    if self.word() == "not" {
                        if self.word() != "null" {
                            return Err("expected 'not null'".into());
                        }
                        nullable = false;
                    } else {
                        self.i = save;
                    }
                    cols.push(Column {
                        source: name.clone(),
                        name,
                        ty,
                        nullable,
                        description: None,
                    });
                    if self.eat(b'>') {
                        break;
                    }
                    self.expect(b',')?;
                }
                ColumnType::Struct(cols)
            }
            "" => return Err("expected a type".into()),
            other => {
                return Err(format!(
                    "unknown type '{other}': use string, int32, int64, float64, bool, date, timestamp, decimal(p,s), struct<…> or list<…>"
                ));
            }
        })
    }
}

/// A typed scalar value, the result of checking one raw field.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar<'a> {
    Null,
    /// Borrowed from the field being parsed: no copy until it reaches an Arrow builder.
    String(&'a str),
    Int32(i32),
    Int64(i64),
    Float64(f64),
    Bool(bool),
    /// Days since 1970-01-01.
    Date(i32),
    /// Microseconds since the epoch, UTC.
    Timestamp(i64),
    /// Unscaled value at the column's scale.
    Decimal(i128),
}

/// Formats used to read dates and timestamps.
#[derive(Debug, Clone)]
pub struct TemporalFormats {
    pub date: Vec<String>,
    pub timestamp: Vec<String>,
}

pub const UNIX_EPOCH_DAYS_FROM_CE: i32 = 719_163;

pub fn parse_date(s: &str, formats: &[String]) -> Option<i32> {
    use chrono::Datelike;
    any_date(s, formats)
        .filter(|d| READABLE_YEARS.contains(&d.year()))
        .map(|d| d.num_days_from_ce() - UNIX_EPOCH_DAYS_FROM_CE)
}

/// The years every Delta reader can read (Spark, delta-rs, DuckDB and Python's `datetime`
/// stop at 0001 and 9999); dates and timestamps outside them are refused, so a partition value
/// like `+99999-01` can never reach a table.
pub const READABLE_YEARS: std::ops::RangeInclusive<i32> = 1..=9999;

/// A date in one of `formats`, whatever its year.
fn any_date(s: &str, formats: &[String]) -> Option<NaiveDate> {
    formats.iter().find_map(|f| {
        if f == "%Y-%m-%d" {
            // The common case without chrono's format interpreter (ingest's hot loop).
            iso_date(s)
        } else {
            NaiveDate::parse_from_str(s, f).ok()
        }
    })
}

/// `YYYY-MM-DD` exactly as chrono's `%Y-%m-%d` accepts it when the year has four digits;
/// anything else goes to chrono.
fn iso_date(s: &str) -> Option<NaiveDate> {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        b[r].iter().try_fold(0u32, |acc, c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    if b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && let (Some(y), Some(m), Some(d)) = (digits(0..4), digits(5..7), digits(8..10))
    {
        return NaiveDate::from_ymd_opt(y as i32, m, d);
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()
}

pub fn parse_timestamp(s: &str, formats: &[String]) -> Option<i64> {
    use chrono::Datelike;
    any_timestamp(s, formats)
        .filter(|t| READABLE_YEARS.contains(&t.year()))
        .map(|t| t.timestamp_micros())
}

/// A timestamp in RFC 3339 or one of `formats`, whatever its year.
fn any_timestamp(s: &str, formats: &[String]) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for f in formats {
        if let Ok(t) = DateTime::parse_from_str(s, f) {
            return Some(t.with_timezone(&Utc));
        }
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Some(Utc.from_utc_datetime(&t));
        }
    }
    None
}

/// Why `raw` is not a date or timestamp of the column: outside the readable years, or not one
/// in the formats.
fn temporal_reason(raw: &str, what: &str, formats: &[String], in_format: bool) -> String {
    if in_format {
        format!(
            "'{raw}' is a {what} outside the years 0001-9999 that every Delta reader can read; correct it at the source"
        )
    } else {
        format!(
            "'{raw}' is not a {what} in the format(s) {}",
            formats.join(", ")
        )
    }
}

/// Parse a decimal literal into its unscaled value at `scale`, refusing values that would lose
/// digits or overflow the precision.
pub fn parse_decimal(s: &str, precision: u8, scale: i8) -> Result<i128, String> {
    // One pass over the bytes (ingest's hot loop): digits accumulate as they are read, with
    // wrapping arithmetic, since a value too wide is refused below before it is used.
    let t = s.trim();
    let b = t.as_bytes();
    let (neg, mut i) = match b.first() {
        Some(b'-') => (true, 1),
        Some(b'+') => (false, 1),
        _ => (false, 0),
    };
    let scale = scale as usize;
    let mut v: i128 = 0;
    let (mut int_len, mut int_digits) = (0usize, 0usize); // all digits; without leading zeros
    while let Some(&c) = b.get(i).filter(|c| c.is_ascii_digit()) {
        int_len += 1;
        if int_digits > 0 || c != b'0' {
            int_digits += 1;
            v = v.wrapping_mul(10).wrapping_add(i128::from(c - b'0'));
        }
        i += 1;
    }
    let (mut frac_len, mut frac_kept, mut beyond_scale) = (0usize, 0usize, false);
    if b.get(i) == Some(&b'.') {
        i += 1;
        while let Some(&c) = b.get(i).filter(|c| c.is_ascii_digit()) {
            if frac_len < scale {
                v = v.wrapping_mul(10).wrapping_add(i128::from(c - b'0'));
                frac_kept += 1;
            } else if c != b'0' {
                beyond_scale = true;
            }
            frac_len += 1;
            i += 1;
        }
    }
    if i != b.len() || (int_len == 0 && frac_len == 0) {
        return Err(format!(
            "'{s}' is not a decimal number (use digits with an optional '.' and sign, no thousands separators)"
        ));
    }
    if beyond_scale {
        return Err(format!("'{s}' has more than {scale} decimal places"));
    }
    if int_digits + scale > precision as usize {
        return Err(format!("'{s}' does not fit decimal({precision},{scale})"));
    }
    for _ in frac_kept..scale {
        v *= 10;
    }
    Ok(if neg { -v } else { v })
}

/// Check one CSV field (already known not to be a null token) against a scalar type.
pub fn parse_scalar<'a>(
    raw: &'a str,
    ty: &ColumnType,
    fmts: &TemporalFormats,
) -> Result<Scalar<'a>, String> {
    match ty {
        ColumnType::String => Ok(Scalar::String(raw)),
        ColumnType::Int32 => raw
            .parse::<i32>()
            .map(Scalar::Int32)
            .map_err(|_| format!("'{raw}' is not a 32-bit integer")),
        ColumnType::Int64 => raw
            .parse::<i64>()
            .map(Scalar::Int64)
            .map_err(|_| format!("'{raw}' is not an integer")),
        ColumnType::Float64 => match raw.parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(Scalar::Float64(v)),
            _ => Err(format!("'{raw}' is not a number")),
        },
        ColumnType::Bool => match raw.to_ascii_lowercase().as_str() {
            "true" | "t" | "yes" | "y" | "1" => Ok(Scalar::Bool(true)),
            "false" | "f" | "no" | "n" | "0" => Ok(Scalar::Bool(false)),
            _ => Err(format!("'{raw}' is not a boolean (true/false)")),
        },
        ColumnType::Date => parse_date(raw, &fmts.date)
            .map(Scalar::Date)
            .ok_or_else(|| {
                temporal_reason(raw, "date", &fmts.date, any_date(raw, &fmts.date).is_some())
            }),
        ColumnType::Timestamp => parse_timestamp(raw, &fmts.timestamp)
            .map(Scalar::Timestamp)
            .ok_or_else(|| {
                let mut f = vec!["RFC 3339".to_string()];
                f.extend(fmts.timestamp.iter().cloned());
                temporal_reason(
                    raw,
                    "timestamp",
                    &f,
                    any_timestamp(raw, &fmts.timestamp).is_some(),
                )
            }),
        ColumnType::Decimal(p, s) => parse_decimal(raw, *p, *s).map(Scalar::Decimal),
        ColumnType::Struct(_) | ColumnType::List(_) => Err(format!(
            "a CSV field cannot hold a {ty} value: declare the column as a string"
        )),
    }
}

/// Check a JSON value against a column type, returning the value normalised into the form the
/// Arrow JSON decoder reads (dates as `YYYY-MM-DD`, timestamps as RFC 3339 UTC, decimals as
/// strings). `path` names the field for messages (`address.postcode`). `unexpected` collects
/// nested keys the contract does not declare.
pub fn check_json(
    v: &serde_json::Value,
    col: &Column,
    path: &str,
    fmts: &TemporalFormats,
    unexpected: &mut Vec<String>,
) -> Result<serde_json::Value, (String, String)> {
    use serde_json::Value as J;
    let fail = |m: String| Err((path.to_string(), m));
    if v.is_null() {
        if col.nullable {
            return Ok(J::Null);
        }
        return fail(format!("'{path}' is null but the contract says not null"));
    }
    let scalar_text = |v: &J| -> Option<String> {
        match v {
            J::String(s) => Some(s.clone()),
            J::Number(n) => Some(n.to_string()),
            J::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    };
    match &col.ty {
        ColumnType::Struct(fields) => {
            let J::Object(map) = v else {
                return fail(format!(
                    "'{path}' should be an object ({}), found {}",
                    col.ty,
                    kind(v)
                ));
            };
            let mut out = serde_json::Map::with_capacity(fields.len());
            for f in fields {
                let sub = format!("{path}.{}", f.name);
                let fv = map.get(&f.source).unwrap_or(&J::Null);
                if !map.contains_key(&f.source) && !f.nullable {
                    return Err((sub.clone(), format!("required field '{sub}' is missing")));
                }
                out.insert(f.name.clone(), check_json(fv, f, &sub, fmts, unexpected)?);
            }
            for k in map.keys() {
                if !fields.iter().any(|f| &f.source == k) {
                    unexpected.push(format!("{path}.{k}"));
                }
            }
            Ok(J::Object(out))
        }
        ColumnType::List(inner) => {
            let J::Array(items) = v else {
                return fail(format!(
                    "'{path}' should be an array ({}), found {}",
                    col.ty,
                    kind(v)
                ));
            };
            let elem = Column {
                name: "element".into(),
                source: "element".into(),
                ty: (**inner).clone(),
                nullable: true,
                description: None,
            };
            let mut out = Vec::with_capacity(items.len());
            for (i, it) in items.iter().enumerate() {
                out.push(check_json(
                    it,
                    &elem,
                    &format!("{path}[{i}]"),
                    fmts,
                    unexpected,
                )?);
            }
            Ok(J::Array(out))
        }
        ty => {
            let Some(text) = scalar_text(v) else {
                return fail(format!("'{path}' should be a {ty}, found {}", kind(v)));
            };
            if matches!(
                ty,
                ColumnType::Int32
                    | ColumnType::Int64
                    | ColumnType::Float64
                    | ColumnType::Decimal(..)
                    | ColumnType::Date
                    | ColumnType::Timestamp
            ) && matches!(v, J::Bool(_))
            {
                return fail(format!("'{path}' should be a {ty}, found a boolean"));
            }
            let s = parse_scalar(&text, ty, fmts)
                .map_err(|m| (path.to_string(), format!("field '{path}': {m}")))?;
            Ok(scalar_to_json(&s, ty))
        }
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn scalar_to_json(s: &Scalar, ty: &ColumnType) -> serde_json::Value {
    use serde_json::Value as J;
    match s {
        Scalar::Null => J::Null,
        Scalar::String(v) => J::String(v.to_string()),
        Scalar::Int32(v) => J::from(*v),
        Scalar::Int64(v) => J::from(*v),
        Scalar::Float64(v) => J::from(*v),
        Scalar::Bool(v) => J::Bool(*v),
        Scalar::Date(d) => J::String(format_date(*d)),
        Scalar::Timestamp(us) => J::String(
            DateTime::<Utc>::from_timestamp_micros(*us)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
                .unwrap_or_default(),
        ),
        Scalar::Decimal(v) => {
            let scale = match ty {
                ColumnType::Decimal(_, s) => *s as u32,
                _ => 0,
            };
            J::String(format_decimal(*v, scale))
        }
    }
}

pub fn format_date(days: i32) -> String {
    NaiveDate::from_num_days_from_ce_opt(days + UNIX_EPOCH_DAYS_FROM_CE)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

pub fn format_decimal(v: i128, scale: u32) -> String {
    if scale == 0 {
        return v.to_string();
    }
    let neg = v < 0;
    let digits = v.unsigned_abs().to_string();
    let s = scale as usize;
    let padded = if digits.len() <= s {
        format!("{}{}", "0".repeat(s - digits.len() + 1), digits)
    } else {
        digits
    };
    let (i, f) = padded.split_at(padded.len() - s);
    format!("{}{i}.{f}", if neg { "-" } else { "" })
}
