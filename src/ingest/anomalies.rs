//! Ingest-time anomaly checks: each batch's statistics (rows, null rates, distinct counts by
//! HyperLogLog, dates present), gathered file by file while parsing in memory that does not
//! grow with the data, compared with the trailing batches of `_silt/batch_stats` (volume,
//! null-rate and distinct-count drift, date gaps), and recorded there. It must not parse files
//! (the parsers hand it their slices) nor decide what a failed check stops (pipeline.rs does).

use std::collections::BTreeMap;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::DataType;
use serde::Serialize;

use crate::error::Result;
use crate::lake::catalog::Catalog;
use crate::lake::meta::batch_stats::{self, ColumnStatsRow};
use crate::project::config::{AnomalySpec, Severity};

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

/// An ingest-time check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, strum::Display)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Check {
    /// The batch's row count against the trailing batches'.
    Volume,
    /// A column's share of NULLs.
    NullRate,
    /// A column's distinct values.
    Distinct,
    /// Days missing in the batch's date column.
    Gap,
}

/// How much an anomaly matters, from the source's `[anomalies] severity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, strum::Display)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum AnomalyStatus {
    /// Reported.
    Warn,
    /// Fails the source's batch: what reads it is not built (exit 1).
    Fail,
}

/// A finding of the ingest-time checks.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Anomaly {
    pub source: String,
    pub check: Check,
    pub column: Option<String>,
    pub status: AnomalyStatus,
    pub message: String,
}

/// One batch's statistics as kept for later comparisons.
struct PastBatch {
    rows: u64,
    /// column → (null rate, distinct)
    columns: BTreeMap<String, (f64, u64)>,
}

/// The last `window` batches of `source`, oldest first.
async fn history(catalog: &Catalog, source: &str, window: usize) -> Result<Vec<PastBatch>> {
    let mut by_batch: BTreeMap<(i64, String), PastBatch> = BTreeMap::new();
    for r in batch_stats::read(catalog, source).await? {
        let e = by_batch.entry((r.at, r.batch_id)).or_insert(PastBatch {
            rows: r.rows,
            columns: BTreeMap::new(),
        });
        if !r.column.is_empty() {
            e.columns.insert(r.column, (r.null_rate, r.distinct));
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
        Severity::Error => AnomalyStatus::Fail,
        Severity::Warn => AnomalyStatus::Warn,
    };
    let mut out = Vec::new();
    let mut push = |check: Check, column: Option<String>, message: String| {
        out.push(Anomaly {
            source: source.into(),
            check,
            column,
            status,
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
                Check::Volume,
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
                    Check::NullRate,
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
                    Check::Distinct,
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
            .flat_map(|w| (w[0] + 1..w[1]).map(crate::project::contract::format_date))
            .collect();
        if !missing.is_empty() {
            let shown = missing
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            push(
                Check::Gap,
                Some(dc.clone()),
                format!(
                    "{} day(s) with no data between {} and {}: {shown}",
                    missing.len(),
                    crate::project::contract::format_date(days[0]),
                    crate::project::contract::format_date(*days.last().unwrap())
                ),
            );
        }
    }
    record(catalog, source, batch_id, rows, &profiles).await?;
    Ok(out)
}

/// Keep one batch's statistics for the checks of later batches.
async fn record(
    catalog: &Catalog,
    source: &str,
    batch_id: &str,
    rows: u64,
    profiles: &[ColumnProfile],
) -> Result<()> {
    let at = chrono::Utc::now().timestamp_micros();
    let row = |column: String, null_rate: f64, distinct: u64| ColumnStatsRow {
        source: source.to_string(),
        batch_id: batch_id.to_string(),
        at,
        rows,
        column,
        null_rate,
        distinct,
    };
    let mut out: Vec<ColumnStatsRow> = profiles
        .iter()
        .map(|p| {
            let null_rate = if p.rows > 0 {
                p.nulls as f64 / p.rows as f64
            } else {
                0.0
            };
            row(p.column.clone(), null_rate, p.distinct)
        })
        .collect();
    if out.is_empty() {
        out.push(row(String::new(), 0.0, 0));
    }
    batch_stats::record(catalog.lake(), batch_id, &out).await
}
