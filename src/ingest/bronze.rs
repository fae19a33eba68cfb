//! Landing rows as bronze and quarantine rows: the stamp every row of a batch carries (source
//! file and line, batch id, time), bronze's schema and partition column, the quarantine's, and
//! the Parquet settings of both. It must not read landing files nor commit.

use super::*;

/// What the parser tasks need to turn a landing file into table rows: the source, and the
/// batch id and time stamped on every row.
#[derive(Clone)]
pub(super) struct Stamp {
    pub(super) src: Arc<Source>,
    pub(super) batch_id: Arc<str>,
    pub(super) ingested_at: i64,
}

/// One landing file turned into table rows.
pub(super) struct Parsed {
    /// Bronze rows (contract columns, the partition column, the metadata columns) when they
    /// were kept ([`Stamp::parse`]); empty when they went to a sink.
    pub(super) bronze: Vec<RecordBatch>,
    pub(super) quarantine: Option<RecordBatch>,
    pub(super) rows: u64,
    pub(super) rejects: u64,
    pub(super) warnings: Vec<String>,
    /// Statistics for the anomaly checks (only when the source declares them).
    pub(super) stats: Option<BatchStats>,
}

impl Stamp {
    /// The whole file's bronze rows in memory (the rare replace path).
    pub(super) fn parse(&self, data: &[u8], rel: &str) -> Result<Parsed> {
        let mut bronze = Vec::new();
        let mut p = self.parse_with(data, rel, self.src.anomaly.is_some(), &mut |b| {
            bronze.push(b);
            Ok(())
        })?;
        p.bronze = bronze;
        Ok(p)
    }

    /// Parse a file slice by slice, handing each slice's bronze rows to `sink` (slices without
    /// rows are not handed on). Statistics are merged across slices.
    pub(super) fn parse_with(
        &self,
        data: &[u8],
        rel: &str,
        want_stats: bool,
        sink: &mut dyn FnMut(RecordBatch) -> Result<()>,
    ) -> Result<Parsed> {
        let t0 = Instant::now();
        let date_column = self
            .src
            .anomaly
            .as_ref()
            .and_then(|a| a.date_column.as_deref());
        let mut rows = 0u64;
        let mut stats: Option<BatchStats> = None;
        let p = parse_file_in_slices(data, rel, &self.src, SLICE_ROWS, &mut |s: Slice| {
            let n = s.batch.num_rows();
            if n == 0 {
                return Ok(());
            }
            rows += n as u64;
            if want_stats {
                let st = BatchStats::of(&s.batch, date_column)?;
                match &mut stats {
                    Some(all) => all.merge(st),
                    None => stats = Some(st),
                }
            }
            sink(self.bronze_batch(&s.batch, &s.lines, rel)?)
        })?;
        let quarantine = (!p.rejects.is_empty())
            .then(|| self.quarantine_batch(&p.rejects, rel))
            .transpose()?;
        tracing::debug!(
            file = rel,
            rows,
            ms = t0.elapsed().as_millis() as u64,
            "parsed"
        );
        Ok(Parsed {
            bronze: Vec::new(),
            quarantine,
            rows,
            rejects: p.rejects.len() as u64,
            warnings: p.warnings,
            stats,
        })
    }

    /// The schema of [`Stamp::bronze_batch`]'s output.
    pub(super) fn bronze_schema(&self) -> Arc<Schema> {
        bronze_schema_of(&self.src)
    }

    /// Contract columns, the derived partition column if any, then the metadata columns.
    pub(super) fn bronze_batch(
        &self,
        b: &RecordBatch,
        lines: &[i64],
        rel: &str,
    ) -> Result<RecordBatch> {
        let n = b.num_rows();
        let mut fields: Vec<Field> = b
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        let mut cols: Vec<ArrayRef> = b.columns().to_vec();
        if let Some(p) = &self.src.partition
            && let Some(g) = p.granularity
        {
            let idx = b.schema().index_of(&p.source_column)?;
            let arr = b.column(idx);
            // Rows of a file mostly share a partition: a value is formatted only when a row's
            // day falls outside the period of the row before (an integer range check per row).
            let mut period: Option<(i32, i32, String)> = None; // [first day, end day), text
            let mut values = arrow::array::StringBuilder::with_capacity(n, n * 8);
            let mut push = |day: Option<i32>| {
                let Some(day) = day else {
                    values.append_null();
                    return;
                };
                if !period
                    .as_ref()
                    .is_some_and(|(lo, hi, _)| (*lo..*hi).contains(&day))
                {
                    period = partition_period(day, g);
                }
                match &period {
                    Some((_, _, text)) => values.append_value(text),
                    None => values.append_null(), // outside chrono's calendar
                }
            };
            match arr.data_type() {
                DataType::Date32 => arr.as_primitive::<Date32Type>().iter().for_each(&mut push),
                _ => {
                    const DAY_MICROS: i64 = 86_400_000_000;
                    for t in arr.as_primitive::<TimestampMicrosecondType>().iter() {
                        push(t.and_then(|t| i32::try_from(t.div_euclid(DAY_MICROS)).ok()))
                    }
                }
            }
            let values = values.finish();
            fields.push(Field::new(p.column_name(), DataType::Utf8, true));
            cols.push(Arc::new(values));
        }
        fields.extend(metadata_fields());
        cols.push(Arc::new(repeated(rel, n)));
        cols.push(Arc::new(Int64Array::from(lines.to_vec())));
        cols.push(Arc::new(
            TimestampMicrosecondArray::from_value(self.ingested_at, n).with_timezone("UTC"),
        ));
        cols.push(Arc::new(repeated(&self.batch_id, n)));
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
    }

    pub(super) fn quarantine_batch(&self, rejects: &[Reject], rel: &str) -> Result<RecordBatch> {
        let n = rejects.len();
        Ok(RecordBatch::try_new(
            quarantine_schema(),
            vec![
                Arc::new(StringArray::from_iter_values(std::iter::repeat_n(rel, n))),
                Arc::new(Int64Array::from_iter_values(
                    rejects.iter().map(|r| r.line as i64),
                )),
                Arc::new(StringArray::from_iter(
                    rejects.iter().map(|r| r.column.clone()),
                )),
                Arc::new(StringArray::from_iter_values(
                    rejects.iter().map(|r| r.reason.clone()),
                )),
                Arc::new(StringArray::from_iter_values(
                    rejects.iter().map(|r| r.raw.clone()),
                )),
                Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                    &*self.batch_id,
                    n,
                ))),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(std::iter::repeat_n(
                        self.ingested_at,
                        n,
                    ))
                    .with_timezone("UTC"),
                ),
            ],
        )?)
    }
}

/// The partition period holding `day` (days since the epoch): its first day, the day after
/// its last, and its partition value (`YYYY`, `YYYY-MM` or `YYYY-MM-DD`).
pub(super) fn partition_period(day: i32, g: Granularity) -> Option<(i32, i32, String)> {
    use chrono::{Datelike, NaiveDate};
    let epoch = crate::project::contract::UNIX_EPOCH_DAYS_FROM_CE;
    let d = NaiveDate::from_num_days_from_ce_opt(day.checked_add(epoch)?)?;
    let (first, next, text) = match g {
        Granularity::Year => (
            NaiveDate::from_ymd_opt(d.year(), 1, 1)?,
            NaiveDate::from_ymd_opt(d.year() + 1, 1, 1),
            format!("{:04}", d.year()),
        ),
        Granularity::Month => (
            NaiveDate::from_ymd_opt(d.year(), d.month(), 1)?,
            if d.month() == 12 {
                NaiveDate::from_ymd_opt(d.year() + 1, 1, 1)
            } else {
                NaiveDate::from_ymd_opt(d.year(), d.month() + 1, 1)
            },
            format!("{:04}-{:02}", d.year(), d.month()),
        ),
        Granularity::Day => (
            d,
            d.succ_opt(),
            format!("{:04}-{:02}-{:02}", d.year(), d.month(), d.day()),
        ),
    };
    let lo = first.num_days_from_ce() - epoch;
    // The last day chrono knows ends a period of its own.
    let hi = next.map_or(lo + 1, |n| n.num_days_from_ce() - epoch);
    Some((lo, hi, text))
}

/// Parquet settings of bronze files: LZ4 (raw; faster to write and read than Snappy, and
/// smaller here; bronze is read by silt's models, silver and gold stay Snappy for other
/// readers), dictionaries except on columns that are unique by design (the primary key, the
/// line number), where a dictionary only costs hashing. Those two are delta-encoded instead:
/// line numbers rise by one, and ids share long prefixes, so a few bits per value replace
/// plain 8-byte integers and whole strings, at the same CPU (docs/decisions/0002).
pub(crate) fn writer_properties(src: &Source) -> parquet::file::properties::WriterProperties {
    use parquet::basic::Encoding;
    let mut b = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::LZ4_RAW)
        // A column whose dictionary outgrows 8 KiB (ids, amounts, comments: most values
        // distinct) falls back to plain encoding early instead of interning values into a
        // 1 MiB dictionary: less CPU, and smaller files. Categories (currencies, adviser ids,
        // ship modes, the days of a month) stay dictionary-encoded (docs/decisions/0002).
        .set_dictionary_page_size_limit(8 * 1024)
        .set_column_dictionary_enabled("_source_line".into(), false)
        .set_column_encoding("_source_line".into(), Encoding::DELTA_BINARY_PACKED);
    if let [pk] = src.primary_key.as_slice() {
        b = b.set_column_dictionary_enabled(pk.as_str().into(), false);
        let encoding = match src.columns.iter().find(|c| &c.name == pk).map(|c| &c.ty) {
            Some(ColumnType::String) => Some(Encoding::DELTA_BYTE_ARRAY),
            Some(ColumnType::Int32 | ColumnType::Int64) => Some(Encoding::DELTA_BINARY_PACKED),
            _ => None, // plain
        };
        if let Some(e) = encoding {
            b = b.set_column_encoding(pk.as_str().into(), e);
        }
    }
    b.build()
}

/// Whether `table` already has exactly these columns with these types.
pub(super) fn same_columns(table: &deltalake::DeltaTable, schema: &Schema) -> bool {
    let Ok(s) = table.snapshot() else {
        return false;
    };
    let have = s.snapshot().arrow_schema();
    have.fields().len() == schema.fields().len()
        && schema.fields().iter().all(|f| {
            have.field_with_name(f.name())
                .is_ok_and(|h| h.data_type() == f.data_type())
        })
}

/// `n` copies of `value`, its buffers sized exactly once.
pub(super) fn repeated(value: &str, n: usize) -> StringArray {
    let len = value.len();
    let offsets = arrow::buffer::OffsetBuffer::from_repeated_length(len, n);
    StringArray::new(offsets, value.repeat(n).into_bytes().into(), None)
}

/// A source's bronze table schema: its contract columns, the derived partition column if any,
/// then the metadata columns.
pub fn bronze_schema_of(src: &crate::project::config::Source) -> Arc<Schema> {
    let mut fields: Vec<Field> = src.columns.iter().map(|c| c.to_arrow_field()).collect();
    if let Some(p) = &src.partition
        && p.granularity.is_some()
    {
        fields.push(Field::new(p.column_name(), DataType::Utf8, true));
    }
    fields.extend(metadata_fields());
    Arc::new(Schema::new(fields))
}

pub(super) fn metadata_fields() -> Vec<Field> {
    vec![
        Field::new("_source_file", DataType::Utf8, false),
        Field::new("_source_line", DataType::Int64, false),
        Field::new(
            "_ingested_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("_batch_id", DataType::Utf8, false),
    ]
}

/// `quarantine.<source>`: the raw record, where it was, and why it was refused.
pub fn quarantine_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("_source_file", DataType::Utf8, false),
        Field::new("_source_line", DataType::Int64, false),
        Field::new("column_name", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, false),
        Field::new("raw_record", DataType::Utf8, false),
        Field::new("_batch_id", DataType::Utf8, false),
        Field::new(
            "_ingested_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ]))
}
