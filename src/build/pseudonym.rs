//! Pseudonyms for personal data: the keyed HMAC-SHA256 that stands for a subject id in the
//! erasure audit, and the `hash` / `mask` replacements a model's `pseudonymize` config applies to
//! its output columns, so raw PII stops at that model. It must not read or write tables.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, StringArray};
use arrow::datatypes::DataType;
use datafusion::logical_expr::{ColumnarValue, ScalarUDF, Volatility, create_udf};
use datafusion::prelude::SessionContext;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};
use std::collections::BTreeMap;

use crate::project::config::Pseudonym;

/// HMAC-SHA256 of `value` under `key`, as lowercase hex.
pub fn hmac_hex(key: &str, value: &str) -> String {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(value.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The first character, then one `*` per further character.
pub fn mask(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for (i, c) in value.chars().enumerate() {
        out.push(if i == 0 { c } else { '*' });
    }
    out
}

fn udf(name: &str, f: impl Fn(&str) -> String + Send + Sync + 'static) -> ScalarUDF {
    let f = Arc::new(f);
    create_udf(
        name,
        vec![DataType::Utf8],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(move |args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let s = arrays[0]
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| {
                    datafusion::error::DataFusionError::Internal("expected Utf8".into())
                })?;
            let out: StringArray = s.iter().map(|v| v.map(|v| f(v))).collect();
            Ok(ColumnarValue::Array(Arc::new(out) as ArrayRef))
        }),
    )
}

/// Register `silt_hmac` (under `key`) and `silt_mask` in `ctx`.
fn register_with_key(ctx: &SessionContext, key: String) {
    ctx.register_udf(udf("silt_hmac", move |v| hmac_hex(&key, v)));
    ctx.register_udf(udf("silt_mask", mask));
}

/// The pseudonym functions for a session that only plans (lineage): no key is needed to plan.
pub fn register_for_planning(ctx: &SessionContext) {
    register_with_key(ctx, String::new());
}

/// The model's SQL wrapped in a projection that replaces its `pseudonymize` columns; the
/// `silt_hmac` / `silt_mask` functions are registered in `ctx`.
pub fn wrap_sql(
    pseudonymize: &BTreeMap<String, Pseudonym>,
    file: &str,
    sql: &str,
    columns: &[String],
    key: Option<&str>,
    ctx: &SessionContext,
) -> Result<String> {
    let needs_key = pseudonymize.values().any(|p| *p == Pseudonym::Hash);
    let key = match key {
        Some(k) if !k.is_empty() => k.to_string(),
        _ if needs_key => {
            return Err(Error::config(
                file,
                "pseudonymize=… with 'hash' needs a key: set [gdpr] hmac_key in silt.toml or SILT_GDPR_HMAC_KEY",
            ));
        }
        _ => String::new(),
    };
    for c in pseudonymize.keys() {
        if !columns.contains(c) {
            return Err(Error::config(
                file,
                format!("pseudonymize names column '{c}', which the model does not output"),
            ));
        }
    }
    register_with_key(ctx, key);
    let q = crate::lake::sql_text::ident;
    let select: Vec<String> = columns
        .iter()
        .map(|c| match pseudonymize.get(c) {
            Some(Pseudonym::Hash) => format!("silt_hmac(cast({} as varchar)) as {}", q(c), q(c)),
            Some(Pseudonym::Mask) => format!("silt_mask(cast({} as varchar)) as {}", q(c), q(c)),
            None => q(c),
        })
        .collect();
    Ok(format!(
        "select {} from (\n{}\n) as __silt_pseudonymized",
        select.join(", "),
        sql.trim().trim_end_matches(';')
    ))
}
