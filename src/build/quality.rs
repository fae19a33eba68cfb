//! Data tests: column tests declared in a model's `config(tests=[…])` or a
//! source's `[[tests]]` (not_null, unique, accepted_values, relationships, expression, each with
//! a severity and an optional `where`), and singular tests in `sql/tests/*.sql` that return the
//! failing rows (the dbt convention). This module turns them into SQL and runs them; it must not
//! build models or decide what a failure stops (pipeline.rs does).

use std::time::Instant;

use datafusion::prelude::SessionContext;
use datafusion::scalar::ScalarValue;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::lake::catalog::TableRef;

pub use crate::project::config::{Severity, TestSpec};

/// What a test found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, strum::Display, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum TestStatus {
    /// No failing row.
    Pass,
    /// Failing rows, and the test's severity is `warn`.
    Warn,
    /// Failing rows, and the test's severity is `error`.
    Fail,
}

/// Which rows a test reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, strum::Display, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum TestScope {
    /// The whole table.
    Table,
    /// Only the rows (for `unique`, the keys) the build just wrote.
    Written,
}

impl TestStatus {
    /// The status as `silt test --json` and `_silt.runs` write it.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl TestScope {
    /// The scope as `silt test --json` and `_silt.runs` write it.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// A test ready to run: SQL returning the failing rows.
#[derive(Debug, Clone, Serialize)]
pub struct DataTest {
    pub name: String,
    /// The table tested (column tests) or the file (singular tests).
    pub subject: String,
    pub kind: String,
    pub severity: Severity,
    pub scope: TestScope,
    #[serde(skip)]
    pub sql: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TestResult {
    pub name: String,
    pub subject: String,
    pub kind: String,
    pub severity: Severity,
    pub status: TestStatus,
    pub scope: TestScope,
    pub failing_rows: u64,
    /// The first failing rows, as an aligned table.
    pub sample: String,
    pub ms: u64,
    /// The version of the tested table, and the build state (upstream versions) it was built
    /// from, when it is a model: a run knows which builds were tested.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table_version: Option<u64>,
    #[serde(skip)]
    pub built_from: std::collections::BTreeMap<String, u64>,
}

use crate::lake::sql_text::{ident as q, literal as quoted};

fn lit(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => quoted(s),
        other => other.to_string(),
    }
}

/// The rows an incremental build just wrote, as the scope of its model's column tests: the
/// relation holding them, and for the first column of each `unique` test the smallest and the
/// largest value they hold, as SQL literals. A duplicate of a written key lies within those
/// bounds, so the test reads only the part of the table between them: when keys grow with
/// time, as ids usually do, the scan skips every file whose statistics lie outside.
#[derive(Debug, Clone)]
pub struct WrittenScope {
    pub relation: String,
    pub ranges: std::collections::BTreeMap<String, (String, String)>,
}

impl WrittenScope {
    /// The scope of `relation` for these tests. Bounds it cannot read (a failed query, a type
    /// without a literal here, no non-NULL value) are left out: that test reads the whole table.
    pub async fn new(ctx: &SessionContext, relation: String, specs: &[TestSpec]) -> Self {
        let cols: std::collections::BTreeSet<String> = specs
            .iter()
            .filter(|s| s.kind == "unique")
            .filter_map(|s| s.columns.first().or(s.column.as_ref()).cloned())
            .collect();
        let mut ranges = std::collections::BTreeMap::new();
        if !cols.is_empty() {
            let sql = format!(
                "select {} from {relation}",
                cols.iter()
                    .map(|c| format!("min({qc}), max({qc})", qc = q(c)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let bounds = async { ctx.sql(&sql).await?.collect().await }.await;
            match bounds {
                Ok(b) => {
                    if let Some(b) = b.iter().find(|b| b.num_rows() > 0) {
                        for (i, c) in cols.iter().enumerate() {
                            let lo = ScalarValue::try_from_array(b.column(2 * i), 0).ok();
                            let hi = ScalarValue::try_from_array(b.column(2 * i + 1), 0).ok();
                            if let (Some(lo), Some(hi)) = (
                                lo.as_ref().and_then(sql_literal),
                                hi.as_ref().and_then(sql_literal),
                            ) {
                                ranges.insert(c.clone(), (lo, hi));
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(
                    "{relation}: reading the written key range failed ({e}); unique tests read the whole table"
                ),
            }
        }
        WrittenScope { relation, ranges }
    }
}

/// A value as an SQL literal, for the types keys usually have (strings, integers, dates).
fn sql_literal(v: &ScalarValue) -> Option<String> {
    match v {
        ScalarValue::Utf8(Some(s))
        | ScalarValue::Utf8View(Some(s))
        | ScalarValue::LargeUtf8(Some(s)) => Some(quoted(s)),
        ScalarValue::Int8(Some(_))
        | ScalarValue::Int16(Some(_))
        | ScalarValue::Int32(Some(_))
        | ScalarValue::Int64(Some(_))
        | ScalarValue::UInt8(Some(_))
        | ScalarValue::UInt16(Some(_))
        | ScalarValue::UInt32(Some(_))
        | ScalarValue::UInt64(Some(_)) => Some(v.to_string()),
        ScalarValue::Date32(Some(d)) => {
            let day = crate::project::contract::format_date(*d);
            (!day.is_empty()).then(|| format!("date '{day}'"))
        }
        _ => None,
    }
}

/// Compile a column test on `table` into SQL. `resolve` turns a `to` into a table.
pub fn compile(
    spec: &TestSpec,
    table: &TableRef,
    file: &str,
    resolve: &dyn Fn(&str) -> Result<TableRef>,
) -> Result<DataTest> {
    compile_scoped(spec, table, file, None, resolve)
}

/// Like [`compile`]; with `written` (the rows a build just wrote), the row tests (not_null,
/// accepted_values, relationships, expression) read only those rows, and `unique` counts, in
/// the table between the written bounds of its first column, only the keys those rows hold.
/// Rows the build did not touch passed when they were written, so the verdict is the same at
/// a fraction of the cost.
pub fn compile_scoped(
    spec: &TestSpec,
    table: &TableRef,
    file: &str,
    written: Option<&WrittenScope>,
    resolve: &dyn Fn(&str) -> Result<TableRef>,
) -> Result<DataTest> {
    let whole = table.to_string();
    let rows: &str = written.map_or(&whole, |w| w.relation.as_str());
    let err = |m: String| Error::config(file, format!("test {}: {m}", spec.kind));
    let col = || {
        spec.column
            .clone()
            .ok_or_else(|| err("needs column".into()))
    };
    let and_where = spec
        .where_
        .as_ref()
        .map(|w| format!(" and ({w})"))
        .unwrap_or_default();
    let (sql, label) = match spec.kind.as_str() {
        "not_null" => {
            let c = col()?;
            (
                format!("select * from {rows} where {} is null{and_where}", q(&c)),
                c,
            )
        }
        "unique" => {
            let cols = if spec.columns.is_empty() {
                vec![col()?]
            } else {
                spec.columns.clone()
            };
            (unique_sql(spec, table, &cols, written), cols.join("_"))
        }
        "accepted_values" => {
            let c = col()?;
            if spec.values.is_empty() {
                return Err(err("needs values".into()));
            }
            let vals = spec.values.iter().map(lit).collect::<Vec<_>>().join(", ");
            (
                format!(
                    "select * from {rows} where {qc} is not null and {qc} not in ({vals}){and_where}",
                    qc = q(&c)
                ),
                c,
            )
        }
        "relationships" => {
            let c = col()?;
            let to = spec
                .to
                .as_deref()
                .ok_or_else(|| err("needs to (a model or table)".into()))?;
            let parent = resolve(to)?;
            let f = spec.field.clone().unwrap_or_else(|| c.clone());
            (
                format!(
                    "select c.* from {rows} c left join (select distinct {qf} as __k from {parent}) p on c.{qc} = p.__k \
                     where c.{qc} is not null and p.__k is null{}",
                    spec.where_
                        .as_ref()
                        .map(|w| format!(" and ({w})"))
                        .unwrap_or_default(),
                    qf = q(&f),
                    qc = q(&c)
                ),
                format!("{c}_to_{}", parent.name),
            )
        }
        "expression" => {
            let e = spec
                .expression
                .clone()
                .ok_or_else(|| err("needs expression".into()))?;
            (
                format!("select * from {rows} where not ({e}){and_where}"),
                "expression".into(),
            )
        }
        other => {
            return Err(err(format!(
                "unknown test type '{other}': use not_null, unique, accepted_values, relationships or expression"
            )));
        }
    };
    let name = spec.name.clone().unwrap_or_else(|| {
        let label: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!("{}_{}_{}", spec.kind, table.name, label)
    });
    Ok(DataTest {
        name,
        subject: table.to_string(),
        kind: spec.kind.clone(),
        severity: spec.severity,
        scope: if written.is_some() {
            TestScope::Written
        } else {
            TestScope::Table
        },
        sql,
    })
}

/// The SQL of a `unique` test on `cols`: key values held by more than one row. Scoped to the
/// rows a build wrote, it counts their keys across the whole table, reading only the table
/// between the written bounds of the first column, and its NULLs (a NULL key counts as a value,
/// as in the whole-table test).
fn unique_sql(
    spec: &TestSpec,
    table: &TableRef,
    cols: &[String],
    written: Option<&WrittenScope>,
) -> String {
    let where_only = spec
        .where_
        .as_ref()
        .map(|w| format!(" where ({w})"))
        .unwrap_or_default();
    let list = cols.iter().map(|c| q(c)).collect::<Vec<_>>().join(", ");
    let Some(w) = written else {
        return format!(
            "select {list}, count(*) as n_rows from {table}{where_only} group by {list} having count(*) > 1"
        );
    };
    let bounded = w.ranges.get(&cols[0]).map(|(lo, hi)| {
        format!(
            "({c} between {lo} and {hi} or {c} is null)",
            c = q(&cols[0])
        )
    });
    let filter = bounded
        .into_iter()
        .chain(spec.where_.as_ref().map(|x| format!("({x})")))
        .collect::<Vec<_>>();
    let table_where = if filter.is_empty() {
        String::new()
    } else {
        format!(" where {}", filter.join(" and "))
    };
    let on = cols
        .iter()
        .map(|c| format!("(t.{c} is not distinct from n.{c})", c = q(c)))
        .collect::<Vec<_>>()
        .join(" and ");
    let t_list = cols
        .iter()
        .map(|c| format!("t.{}", q(c)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "select {t_list}, count(*) as n_rows from (select {list} from {table}{table_where}) t \
         join (select distinct {list} from {wr}{where_only}) n on {on} \
         group by {t_list} having count(*) > 1",
        wr = w.relation
    )
}

/// Run one test: count the failing rows and keep the first few.
pub async fn run(ctx: &SessionContext, t: &DataTest) -> Result<TestResult> {
    let started = Instant::now();
    let df = ctx
        .sql(&format!("select * from ({}) __failing", t.sql))
        .await
        .map_err(|e| match Error::from_datafusion(e) {
            Error::Sql(m) => Error::config(&t.subject, format!("test {}: {m}", t.name)),
            other => other,
        })?;
    let n = df.clone().count().await? as u64;
    let sample = if n > 0 {
        crate::render::table(&df.limit(0, Some(5))?.collect().await?)
    } else {
        String::new()
    };
    let status = match (n, t.severity) {
        (0, _) => TestStatus::Pass,
        (_, Severity::Error) => TestStatus::Fail,
        (_, Severity::Warn) => TestStatus::Warn,
    };
    Ok(TestResult {
        name: t.name.clone(),
        subject: t.subject.clone(),
        kind: t.kind.clone(),
        severity: t.severity,
        status,
        scope: t.scope,
        failing_rows: n,
        sample,
        ms: started.elapsed().as_millis() as u64,
        table_version: None,
        built_from: Default::default(),
    })
}
