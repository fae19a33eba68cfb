//! `silt profile`: column statistics of a table or a landing file, computed with polars (PII
//! columns masked). Arrow data reaches polars through the Arrow C data interface (no copy, no
//! second parser). This is the only module that touches polars; it must not write tables.

use arrow::array::{Array, ArrayRef, RecordBatch};
use arrow::datatypes::DataType;
use polars::prelude::{PlSmallStr, Series};
use polars_ops::series::SeriesMethods;

use crate::error::{Error, Result};
use crate::lake::catalog::TableRef;

pub use crate::ingest::anomalies::ColumnProfile;

/// Mask the values of the PII columns among `cols` (min, max, top values; counts stay).
fn mask_pii(
    mut cols: Vec<ColumnProfile>,
    pii: &std::collections::BTreeSet<String>,
) -> Vec<ColumnProfile> {
    let m = |v: &mut Option<String>| {
        if let Some(x) = v {
            *x = crate::build::pseudonym::mask(x);
        }
    };
    for c in cols.iter_mut().filter(|c| pii.contains(&c.column)) {
        m(&mut c.min);
        m(&mut c.max);
        for (v, _) in c.top.iter_mut() {
            *v = crate::build::pseudonym::mask(v);
        }
        c.masked = true;
    }
    cols
}

/// Hand an arrow-rs array to polars through the C data interface.
fn to_series(name: &str, array: &ArrayRef) -> Result<Series> {
    let err = |e: String| Error::Profile(format!("handing column '{name}' to polars: {e}"));
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
        A::Date(d) => crate::project::contract::format_date(*d),
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
        Err(Error::Profile(format!(
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
            s.n_unique().map_err(|e| Error::Profile(e.to_string()))? as u64 - u64::from(nulls > 0)
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
                    .map_err(|e| Error::Profile(e.to_string()))?;
                let vals = vc
                    .column(f.name().as_str())
                    .map_err(|e| Error::Profile(e.to_string()))?
                    .as_materialized_series()
                    .clone();
                let cnts = vc
                    .column("__n")
                    .map_err(|e| Error::Profile(e.to_string()))?
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

/// `silt profile <table | landing file>`.
pub async fn profile_target(
    silt: &crate::lake::Silt,
    target: &str,
    top: usize,
) -> Result<Vec<ColumnProfile>> {
    if let Ok(t) = TableRef::parse(target)
        && silt.catalog.open(&t).await?.is_some()
    {
        let batches = crate::ops::query::run(&silt.catalog, &format!("select * from {t}")).await?;
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
fn pii_of(silt: &crate::lake::Silt, t: &TableRef) -> std::collections::BTreeSet<String> {
    use crate::lake::catalog::Layer;
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
            if let Ok(dag) = crate::build::models::Dag::load(&silt.project)
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
