//! Column statistics computed with polars: `silt profile`, and the ingest-time
//! anomaly checks (volume, null-rate and distinct-count drift, date gaps) against the previous
//! batches recorded in `_silt/batch_stats`. Arrow data reaches polars through the Arrow C data
//! interface (no copy, no second parser). This is the only module that touches polars; it must
//! not parse landing files or write data tables.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
    UInt64Array,
};
use arrow::datatypes::{DataType, Field, Float64Type, Schema, TimeUnit, UInt64Type};
use polars::prelude::{PlSmallStr, Series};
use polars_ops::series::SeriesMethods;
use serde::Serialize;

use crate::catalog::{Catalog, Layer, TableRef};
use crate::config::AnomalySpec;
use crate::error::{Error, Result};
use crate::quality::Severity;

/// Statistics of one column.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ColumnProfile {
    pub column: String,
    pub data_type: String,
    pub rows: u64,
    pub nulls: u64,
    pub distinct: u64,
    pub min: Option<String>,
    pub max: Option<String>,
    pub mean: Option<f64>,
    /// The most frequent values with their counts, most frequent first (ties by value).
    pub top: Vec<(String, u64)>,
    /// A PII column: min, max and top values are masked (first character kept).
    #[serde(default)]
    pub masked: bool,
}

/// Mask the values of the PII columns among `cols` (min, max, top values; counts stay).
fn mask_pii(
    mut cols: Vec<ColumnProfile>,
    pii: &std::collections::BTreeSet<String>,
) -> Vec<ColumnProfile> {
    let m = |v: &mut Option<String>| {
        if let Some(x) = v {
            *x = crate::pseudonym::mask(x);
        }
    };
    for c in cols.iter_mut().filter(|c| pii.contains(&c.column)) {
        m(&mut c.min);
        m(&mut c.max);
        for (v, _) in c.top.iter_mut() {
            *v = crate::pseudonym::mask(v);
        }
        c.masked = true;
    }
    cols
}

/// Hand an arrow-rs array to polars through the C data interface.
fn to_series(name: &str, array: &ArrayRef) -> Result<Series> {
    let err = |e: String| Error::Runtime(format!("handing column '{name}' to polars: {e}"));
    // Views are what polars uses for strings; plain Utf8 imports too, but normalise Utf8View
    // and dictionary inputs to forms both sides know.
    let array: ArrayRef = match array.data_type() {
        DataType::Dictionary(_, v) => {
            arrow::compute::cast(array, v).map_err(|e| err(e.to_string()))?
        }
        _ => array.clone(),
    };
    let (ffi_array, ffi_schema) =
        arrow::ffi::to_ffi(&array.to_data()).map_err(|e| err(e.to_string()))?;
    // SAFETY: both structs are the C data interface's ArrowArray / ArrowSchema (#[repr(C)],
    // identical layout); ownership of the release callbacks moves to polars, which calls them.
    unsafe {
        let schema_ptr = &ffi_schema as *const arrow::ffi::FFI_ArrowSchema
            as *const polars_arrow::ffi::ArrowSchema;
        let field =
            polars_arrow::ffi::import_field_from_c(&*schema_ptr).map_err(|e| err(e.to_string()))?;
        let pl_array: polars_arrow::ffi::ArrowArray = std::mem::transmute(ffi_array);
        let arr = polars_arrow::ffi::import_array_from_c(pl_array, field.dtype().clone())
            .map_err(|e| err(e.to_string()))?;
        Series::from_arrow(PlSmallStr::from(name), arr).map_err(|e| err(e.to_string()))
    }
}

/// A polars value as text, formatting temporal values here (polars' own datetime display needs
/// its `timezones` feature).
fn any_text(v: &polars::prelude::AnyValue) -> String {
    use polars::prelude::{AnyValue as A, TimeUnit as U};
    let ts = |x: i64, u: &U| {
        let micros = match u {
            U::Nanoseconds => x / 1000,
            U::Microseconds => x,
            U::Milliseconds => x * 1000,
        };
        chrono::DateTime::<chrono::Utc>::from_timestamp_micros(micros)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
            .unwrap_or_default()
    };
    match v {
        A::String(s) => s.to_string(),
        A::StringOwned(s) => s.to_string(),
        A::Date(d) => crate::contract::format_date(*d),
        A::Datetime(x, u, _) => ts(*x, u),
        A::DatetimeOwned(x, u, _) => ts(*x, u),
        other => other.to_string(),
    }
}

fn scalar_text(s: polars::prelude::Scalar) -> Option<String> {
    let v = s.into_value();
    (!v.is_null()).then(|| any_text(&v))
}

/// Profile the columns of `batches` (all of one schema). A panic inside polars becomes an error.
pub fn profile(batches: &[RecordBatch], top_n: usize) -> Result<Vec<ColumnProfile>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        profile_inner(batches, top_n)
    }))
    .unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(Error::Runtime(format!(
            "polars could not profile this data: {msg}"
        )))
    })
}

fn profile_inner(batches: &[RecordBatch], top_n: usize) -> Result<Vec<ColumnProfile>> {
    let Some(first) = batches.first() else {
        return Ok(Vec::new());
    };
    let schema = first.schema();
    let mut out = Vec::new();
    for (i, f) in schema.fields().iter().enumerate() {
        let parts: Vec<ArrayRef> = batches.iter().map(|b| b.column(i).clone()).collect();
        let refs: Vec<&dyn Array> = parts.iter().map(|a| a.as_ref()).collect();
        let col = arrow::compute::concat(&refs)?;
        let s = to_series(f.name(), &col)?;
        let rows = s.len() as u64;
        let nulls = s.null_count() as u64;
        let nested = matches!(
            f.data_type(),
            DataType::Struct(_) | DataType::List(_) | DataType::LargeList(_)
        );
        let distinct = if nested {
            0
        } else {
            s.n_unique().map_err(|e| Error::Runtime(e.to_string()))? as u64 - u64::from(nulls > 0)
        };
        let (min, max) = if nested {
            (None, None)
        } else {
            (
                s.min_reduce().ok().and_then(scalar_text),
                s.max_reduce().ok().and_then(scalar_text),
            )
        };
        let mean = if f.data_type().is_numeric() {
            s.mean()
        } else {
            None
        };
        let mut top = Vec::new();
        if !nested && top_n > 0 {
            let nn = s.drop_nulls();
            if !nn.is_empty() {
                let vc = nn
                    .value_counts(true, false, PlSmallStr::from("__n"), false)
                    .map_err(|e| Error::Runtime(e.to_string()))?;
                let vals = vc
                    .column(f.name().as_str())
                    .map_err(|e| Error::Runtime(e.to_string()))?
                    .as_materialized_series()
                    .clone();
                let cnts = vc
                    .column("__n")
                    .map_err(|e| Error::Runtime(e.to_string()))?
                    .as_materialized_series()
                    .clone();
                let mut pairs: Vec<(String, u64)> = (0..vc.height())
                    .map(|r| {
                        let v = vals.get(r).map(|v| any_text(&v)).unwrap_or_default();
                        let c = cnts
                            .get(r)
                            .ok()
                            .and_then(|c| c.extract::<u64>())
                            .unwrap_or(0);
                        (v, c)
                    })
                    .collect();
                pairs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                pairs.truncate(top_n);
                top = pairs;
            }
        }
        out.push(ColumnProfile {
            column: f.name().clone(),
            data_type: f.data_type().to_string(),
            rows,
            nulls,
            distinct,
            min,
            max,
            mean,
            top,
            masked: false,
        });
    }
    Ok(out)
}

/// Statistics of an ingest batch's good rows, gathered file by file while parsing, in memory
/// that does not grow with the data: rows and nulls exactly, distinct values with a
/// HyperLogLog sketch (2^14 registers, about 0.8% standard error), and the days present in
/// the anomaly date column (for the gap check).
#[derive(Debug, Clone, Default)]
pub struct BatchStats {
    pub rows: u64,
    columns: Vec<ColumnStats>,
    days: std::collections::BTreeSet<i32>,
}

#[derive(Debug, Clone)]
struct ColumnStats {
    name: String,
    data_type: String,
    nulls: u64,
    /// None for nested columns (no distinct count).
    sketch: Option<Vec<u8>>,
}

const HLL_BITS: u32 = 14;

impl BatchStats {
    /// Statistics of one batch; `date_column` feeds the gap check.
    pub fn of(batch: &RecordBatch, date_column: Option<&str>) -> Result<BatchStats> {
        use datafusion::common::hash_utils::{HLL_RANDOM_STATE, create_hashes};
        let mut out = BatchStats {
            rows: batch.num_rows() as u64,
            ..Default::default()
        };
        let mut hashes = vec![0u64; batch.num_rows()];
        for (f, c) in batch.schema().fields().iter().zip(batch.columns()) {
            let nested = matches!(
                f.data_type(),
                DataType::Struct(_) | DataType::List(_) | DataType::LargeList(_)
            );
            let sketch = if nested {
                None
            } else {
                let mut reg = vec![0u8; 1 << HLL_BITS];
                create_hashes([c], &HLL_RANDOM_STATE, &mut hashes)?;
                let mut add = |h: u64| {
                    let idx = (h >> (64 - HLL_BITS)) as usize;
                    let rank = ((h << HLL_BITS) | (1 << (HLL_BITS - 1))).leading_zeros() as u8 + 1;
                    reg[idx] = reg[idx].max(rank);
                };
                match c.logical_nulls() {
                    None => hashes.iter().for_each(|h| add(*h)),
                    Some(nulls) => nulls.valid_indices().for_each(|i| add(hashes[i])),
                }
                Some(reg)
            };
            out.columns.push(ColumnStats {
                name: f.name().clone(),
                data_type: f.data_type().to_string(),
                nulls: c.null_count() as u64,
                sketch,
            });
        }
        if let Some(dc) = date_column
            && let Some(c) = batch
                .column_by_name(dc)
                .and_then(|c| arrow::compute::cast(c, &DataType::Date32).ok())
        {
            // Rows of a landing file mostly come in date order: a day goes into the set once
            // per run of equal days, not once per row.
            let mut last = None;
            for d in c
                .as_primitive::<arrow::datatypes::Date32Type>()
                .iter()
                .flatten()
            {
                if last != Some(d) {
                    out.days.insert(d);
                    last = Some(d);
                }
            }
        }
        Ok(out)
    }

    /// Fold another file's statistics into these.
    pub fn merge(&mut self, other: BatchStats) {
        if self.columns.is_empty() {
            self.columns = other.columns;
        } else {
            for (a, b) in self.columns.iter_mut().zip(other.columns) {
                a.nulls += b.nulls;
                if let (Some(x), Some(y)) = (&mut a.sketch, &b.sketch) {
                    for (r, s) in x.iter_mut().zip(y) {
                        *r = (*r).max(*s);
                    }
                }
            }
        }
        self.rows += other.rows;
        self.days.extend(other.days);
    }

    fn profiles(&self) -> Vec<ColumnProfile> {
        self.columns
            .iter()
            .map(|c| ColumnProfile {
                column: c.name.clone(),
                data_type: c.data_type.clone(),
                rows: self.rows,
                nulls: c.nulls,
                distinct: c.sketch.as_deref().map(hll_estimate).unwrap_or(0),
                min: None,
                max: None,
                mean: None,
                top: Vec::new(),
                masked: false,
            })
            .collect()
    }
}

/// The HyperLogLog estimate, with linear counting for small cardinalities.
fn hll_estimate(reg: &[u8]) -> u64 {
    let m = reg.len() as f64;
    let zeros = reg.iter().filter(|r| **r == 0).count();
    let sum: f64 = reg.iter().map(|r| 2f64.powi(-i32::from(*r))).sum();
    let alpha = 0.7213 / (1.0 + 1.079 / m);
    let e = alpha * m * m / sum;
    if e <= 2.5 * m && zeros > 0 {
        (m * (m / zeros as f64).ln()).round() as u64
    } else {
        e.round() as u64
    }
}

/// A finding of the ingest-time checks.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Anomaly {
    pub source: String,
    /// volume | null_rate | distinct | gap
    pub check: String,
    pub column: Option<String>,
    /// warn | fail
    pub status: String,
    pub message: String,
}

fn stats_table() -> TableRef {
    TableRef::new(Layer::Silt, "batch_stats")
}

/// One batch's statistics as kept for later comparisons.
struct PastBatch {
    rows: u64,
    /// column → (null rate, distinct)
    columns: BTreeMap<String, (f64, u64)>,
}

async fn history(catalog: &Catalog, source: &str, window: usize) -> Result<Vec<PastBatch>> {
    let mut by_batch: BTreeMap<(i64, String), PastBatch> = BTreeMap::new();
    for b in catalog.read_small(&stats_table()).await? {
        let s = |n: &str| {
            b.column_by_name(n)
                .and_then(|c| arrow::compute::cast(c, &DataType::Utf8).ok())
        };
        let (Some(src), Some(batch), Some(col)) = (s("source"), s("batch_id"), s("column_name"))
        else {
            continue;
        };
        let (src, batch, col) = (
            src.as_string::<i32>(),
            batch.as_string::<i32>(),
            col.as_string::<i32>(),
        );
        let Some(rows) = b
            .column_by_name("rows")
            .and_then(|c| arrow::compute::cast(c, &DataType::UInt64).ok())
        else {
            continue;
        };
        let rows = rows.as_primitive::<UInt64Type>();
        let Some(nr) = b
            .column_by_name("null_rate")
            .and_then(|c| arrow::compute::cast(c, &DataType::Float64).ok())
        else {
            continue;
        };
        let nr = nr.as_primitive::<Float64Type>();
        let Some(d) = b
            .column_by_name("distinct_count")
            .and_then(|c| arrow::compute::cast(c, &DataType::UInt64).ok())
        else {
            continue;
        };
        let d = d.as_primitive::<UInt64Type>();
        let Some(at) = b
            .column_by_name("at")
            .and_then(|c| arrow::compute::cast(c, &DataType::Int64).ok())
        else {
            continue;
        };
        let at = at.as_primitive::<arrow::datatypes::Int64Type>();
        for r in 0..b.num_rows() {
            if src.value(r) != source {
                continue;
            }
            let e = by_batch
                .entry((at.value(r), batch.value(r).to_string()))
                .or_insert(PastBatch {
                    rows: rows.value(r),
                    columns: BTreeMap::new(),
                });
            if !col.is_null(r) && !col.value(r).is_empty() {
                e.columns
                    .insert(col.value(r).to_string(), (nr.value(r), d.value(r)));
            }
        }
    }
    let all: Vec<PastBatch> = by_batch.into_values().collect();
    let skip = all.len().saturating_sub(window);
    Ok(all.into_iter().skip(skip).collect())
}

/// Check one ingest batch of `source` (the statistics of its good rows, gathered file by file
/// while parsing) against the previous batches, then record its statistics.
pub async fn check_batch(
    catalog: &Catalog,
    source: &str,
    spec: &AnomalySpec,
    batch_id: &str,
    stats: &BatchStats,
) -> Result<Vec<Anomaly>> {
    let profiles = stats.profiles();
    let rows = stats.rows;
    let prev = history(catalog, source, spec.window).await?;
    let status = match spec.severity {
        Severity::Error => "fail",
        Severity::Warn => "warn",
    };
    let mut out = Vec::new();
    let mut push = |check: &str, column: Option<String>, message: String| {
        out.push(Anomaly {
            source: source.into(),
            check: check.into(),
            column,
            status: status.into(),
            message,
        });
    };
    if prev.len() >= spec.min_batches {
        let n = prev.len() as f64;
        let mean = prev.iter().map(|p| p.rows as f64).sum::<f64>() / n;
        let sd = (prev
            .iter()
            .map(|p| (p.rows as f64 - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        let r = rows as f64;
        let z = if sd > 0.0 { (r - mean).abs() / sd } else { 0.0 };
        if mean > 0.0
            && (r > mean * spec.volume_ratio || r < mean / spec.volume_ratio || z > spec.volume_z)
        {
            push(
                "volume",
                None,
                format!(
                    "{rows} rows against a trailing mean of {mean:.1} (sd {sd:.1}) over {} batches",
                    prev.len()
                ),
            );
        }
        for p in &profiles {
            let rate = if p.rows > 0 {
                p.nulls as f64 / p.rows as f64
            } else {
                0.0
            };
            let hist: Vec<(f64, u64)> = prev
                .iter()
                .filter_map(|b| b.columns.get(&p.column).copied())
                .collect();
            if hist.is_empty() {
                continue;
            }
            let m_rate = hist.iter().map(|h| h.0).sum::<f64>() / hist.len() as f64;
            if (rate - m_rate).abs() > spec.null_rate_drift {
                push(
                    "null_rate",
                    Some(p.column.clone()),
                    format!(
                        "null rate {:.1}% against a trailing {:.1}%",
                        rate * 100.0,
                        m_rate * 100.0
                    ),
                );
            }
            let m_d = hist.iter().map(|h| h.1 as f64).sum::<f64>() / hist.len() as f64;
            let d = p.distinct as f64;
            if m_d >= 1.0 && (d > m_d * spec.distinct_ratio || d < m_d / spec.distinct_ratio) {
                push(
                    "distinct",
                    Some(p.column.clone()),
                    format!(
                        "{} distinct values against a trailing mean of {m_d:.1}",
                        p.distinct
                    ),
                );
            }
        }
    }
    if let Some(dc) = &spec.date_column {
        let days: Vec<i32> = stats.days.iter().copied().collect();
        let missing: Vec<String> = days
            .windows(2)
            .flat_map(|w| (w[0] + 1..w[1]).map(crate::contract::format_date))
            .collect();
        if !missing.is_empty() {
            let shown = missing
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            push(
                "gap",
                Some(dc.clone()),
                format!(
                    "{} day(s) with no data between {} and {}: {shown}",
                    missing.len(),
                    crate::contract::format_date(days[0]),
                    crate::contract::format_date(*days.last().unwrap())
                ),
            );
        }
    }
    record(catalog, source, batch_id, rows, &profiles).await?;
    Ok(out)
}

async fn record(
    catalog: &Catalog,
    source: &str,
    batch_id: &str,
    rows: u64,
    profiles: &[ColumnProfile],
) -> Result<()> {
    let n = profiles.len().max(1);
    let names: Vec<String> = if profiles.is_empty() {
        vec![String::new()]
    } else {
        profiles.iter().map(|p| p.column.clone()).collect()
    };
    let at = chrono::Utc::now().timestamp_micros();
    let schema = Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("batch_id", DataType::Utf8, false),
        Field::new(
            "at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("rows", DataType::UInt64, false),
        Field::new("column_name", DataType::Utf8, false),
        Field::new("null_rate", DataType::Float64, false),
        Field::new("distinct_count", DataType::UInt64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                source, n,
            ))),
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                batch_id, n,
            ))),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(std::iter::repeat_n(at, n))
                    .with_timezone("UTC"),
            ),
            Arc::new(UInt64Array::from_iter_values(std::iter::repeat_n(rows, n))),
            Arc::new(StringArray::from_iter_values(names)),
            Arc::new(Float64Array::from_iter_values((0..n).map(|i| {
                profiles
                    .get(i)
                    .map(|p| {
                        if p.rows > 0 {
                            p.nulls as f64 / p.rows as f64
                        } else {
                            0.0
                        }
                    })
                    .unwrap_or(0.0)
            }))),
            Arc::new(UInt64Array::from_iter_values(
                (0..n).map(|i| profiles.get(i).map(|p| p.distinct).unwrap_or(0)),
            )),
        ],
    )?;
    crate::commit::append_record(
        catalog.lake(),
        &stats_table(),
        batch,
        &[
            ("silt.operation", "ingest.stats"),
            ("silt.batch_id", batch_id),
        ],
        "per-batch column statistics for the ingest anomaly checks",
    )
    .await?;
    Ok(())
}

/// `silt profile <table | landing file>`.
pub async fn profile_target(
    silt: &crate::Silt,
    target: &str,
    top: usize,
) -> Result<Vec<ColumnProfile>> {
    if let Ok(t) = TableRef::parse(target)
        && silt.catalog.open(&t).await?.is_some()
    {
        let batches = crate::query::run(&silt.catalog, &format!("select * from {t}")).await?;
        let pii = pii_of(silt, &t);
        return Ok(mask_pii(profile(&batches, top)?, &pii));
    }
    // A landing file: a path relative to the landing root, or a path/URL under it.
    let landing = silt.landing.url().as_str().to_string();
    let url = if target.contains("://") {
        url::Url::parse(target).map_err(|e| Error::Usage(format!("'{target}': {e}")))?
    } else if std::path::Path::new(target).exists() {
        let p =
            std::path::absolute(target).map_err(|e| Error::Usage(format!("'{target}': {e}")))?;
        url::Url::from_file_path(&p)
            .map_err(|_| Error::Usage(format!("'{target}' is not a usable path")))?
    } else {
        silt.landing.url_of(target)
    };
    let rel = url.as_str().strip_prefix(&landing).map(String::from).ok_or_else(|| {
        Error::Usage(format!("'{target}' is neither a table (layer.name) nor a file under the landing root {landing}"))
    })?;
    let src = silt.project.sources.values().find(|s| s.glob.is_match(&rel)).ok_or_else(|| {
        Error::Usage(format!("no source's glob matches '{rel}': declare one with `silt source new <name> --from {target}`"))
    })?;
    let data = silt.landing.get(&silt.landing.path(&rel)).await?;
    let parsed = crate::ingest::parse_file(&data, &rel, src)?;
    let batch = parsed
        .batch
        .ok_or_else(|| Error::Usage(format!("'{rel}' holds no rows")))?;
    Ok(mask_pii(
        profile(&[batch], top)?,
        &src.pii.iter().cloned().collect(),
    ))
}

/// The columns of `t` that hold raw personal data, as the configuration says: a source's
/// `pii` (its quarantine's raw records too), a model's columns named PII by a source or by its
/// own `config(pii=…)`, unless the model pseudonymizes them.
fn pii_of(silt: &crate::Silt, t: &TableRef) -> std::collections::BTreeSet<String> {
    use crate::catalog::Layer;
    match t.layer {
        Layer::Bronze => silt
            .project
            .sources
            .get(&t.name)
            .map(|s| s.pii.iter().cloned().collect())
            .unwrap_or_default(),
        Layer::Quarantine => silt
            .project
            .sources
            .get(&t.name)
            .filter(|s| !s.pii.is_empty())
            .map(|_| ["raw_record".to_string()].into_iter().collect())
            .unwrap_or_default(),
        Layer::Silver | Layer::Gold => {
            let mut pii = silt.project.pii_columns();
            if let Ok(dag) = crate::models::Dag::load(&silt.project)
                && let Some(m) = dag.models.get(&t.name)
            {
                pii.extend(m.config.pii.iter().cloned());
                pii.retain(|c| !m.config.pseudonymize.contains_key(c));
            }
            pii
        }
        Layer::Silt => Default::default(),
    }
}
