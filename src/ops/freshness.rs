//! `silt freshness`: the age of each source's newest data (a date column's maximum, or when the
//! newest landing file arrived) against its `[freshness]` thresholds. It must not write tables.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::lake::catalog::TableRef;
use crate::lake::sql_text::ident as q;

/// `silt freshness`: the age of each source's newest data against its thresholds.
#[derive(Debug, Clone, Serialize)]
pub struct Freshness {
    pub source: String,
    /// The column measured, or `arrival` (when the newest landing file was ingested).
    pub measured: String,
    pub latest: Option<String>,
    pub age_hours: Option<f64>,
    /// The age for people: `3d 4h`, `5h 12m`, `42m`.
    pub age: Option<String>,
    /// The thresholds, as configured.
    pub warn_after: Option<String>,
    pub error_after: Option<String>,
    pub status: FreshnessStatus,
}

/// How a source's newest data fares against its thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, strum::Display)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum FreshnessStatus {
    Ok,
    /// Older than `warn_after`.
    Warn,
    /// Older than `error_after` (exit 1).
    Error,
    /// Nothing to measure yet.
    NoData,
}

/// A duration for people, in its two largest units: `3d 4h`, `5h 12m`, `42m 5s`, `7s`.
pub fn human_age(d: chrono::Duration) -> String {
    let s = d.num_seconds();
    let sign = if s < 0 { "-" } else { "" };
    let s = s.unsigned_abs();
    let (days, hours, mins, secs) = (s / 86400, s % 86400 / 3600, s % 3600 / 60, s % 60);
    let text = if days > 0 {
        format!("{days}d {hours}h")
    } else if hours > 0 {
        format!("{hours}h {mins}m")
    } else if mins > 0 {
        format!("{mins}m {secs}s")
    } else {
        format!("{secs}s")
    };
    format!("{sign}{text}")
}

/// "2 days", "12 hours", "30 minutes", "1 week".
pub fn parse_duration(s: &str) -> std::result::Result<chrono::Duration, String> {
    let mut it = s.split_whitespace();
    let (Some(n), Some(unit), None) = (it.next(), it.next(), it.next()) else {
        return Err(format!(
            "'{s}' is not a duration: write e.g. \"2 days\" or \"12 hours\""
        ));
    };
    let n: i64 = n
        .parse()
        .map_err(|_| format!("'{s}': '{n}' is not a whole number"))?;
    Ok(match unit.trim_end_matches('s') {
        "minute" => chrono::Duration::minutes(n),
        "hour" => chrono::Duration::hours(n),
        "day" => chrono::Duration::days(n),
        "week" => chrono::Duration::weeks(n),
        u => {
            return Err(format!(
                "'{s}': unit '{u}' is not minutes, hours, days or weeks"
            ));
        }
    })
}

pub async fn freshness(
    silt: &crate::lake::Silt,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<Freshness>> {
    use arrow::array::Array;
    let ctx = silt.catalog.session().await?;
    let mut out = Vec::new();
    for src in silt.project.sources.values() {
        let Some(spec) = &src.freshness else { continue };
        let dur = |v: &Option<String>, key: &str| {
            v.as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(|m| Error::config(&src.file, format!("freshness.{key}: {m}")))
        };
        let warn = dur(&spec.warn_after, "warn_after")?;
        let error = dur(&spec.error_after, "error_after")?;
        let (measured, sql) = match &spec.column {
            Some(c) => (
                c.clone(),
                format!(
                    "select cast(max({}) as varchar) from bronze.{}",
                    q(c),
                    src.name
                ),
            ),
            None => (
                "arrival".to_string(),
                format!(
                    "select cast(max(ingested_at) as varchar) from _silt.ledger where source = '{}'",
                    src.name
                ),
            ),
        };
        let latest: Option<String> = if silt
            .catalog
            .open(&TableRef::bronze(&src.name))
            .await?
            .is_some()
        {
            let b = ctx
                .sql(&sql)
                .await
                .map_err(Error::from_datafusion)?
                .collect()
                .await?;
            b.first().and_then(|b| {
                let c =
                    arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).ok()?;
                let c = c
                    .as_any()
                    .downcast_ref::<arrow::array::StringArray>()?
                    .clone();
                (!c.is_empty() && !c.is_null(0)).then(|| c.value(0).to_string())
            })
        } else {
            None
        };
        let age = latest
            .as_deref()
            .and_then(crate::lake::time_travel::parse_instant)
            .map(|t| now - t);
        let status = match age {
            None => FreshnessStatus::NoData,
            Some(a) if error.is_some_and(|e| a > e) => FreshnessStatus::Error,
            Some(a) if warn.is_some_and(|w| a > w) => FreshnessStatus::Warn,
            Some(_) => FreshnessStatus::Ok,
        };
        out.push(Freshness {
            source: src.name.clone(),
            measured,
            latest,
            age_hours: age.map(|a| (a.num_minutes() as f64 / 6.0).round() / 10.0),
            age: age.map(human_age),
            warn_after: spec.warn_after.clone(),
            error_after: spec.error_after.clone(),
            status,
        });
    }
    Ok(out)
}
