//! Time travel: `VERSION AS OF n` / `TIMESTAMP AS OF '…'` inside SQL (queries and
//! models), `silt history`, `silt restore`, `silt diff`, and `--as-of-run`, which pins every
//! table to the version a run left. SQL with a version clause is parsed here, each versioned
//! table is registered as a provider at that version, and the rewritten statement is planned by
//! DataFusion. It must not write data tables except through `restore`.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use datafusion::prelude::{DataFrame, SessionContext};
use serde::Serialize;
use sqlparser::ast::{
    Expr, ObjectName, ObjectNamePart, TableFactor, TableVersion, Value, VisitMut, VisitorMut,
};
use sqlparser::dialect::{Dialect, GenericDialect};

use crate::error::{Error, Result};
use crate::lake::catalog::{Catalog, TableRef};

/// DataFusion's generic dialect, plus Delta's `VERSION AS OF` / `TIMESTAMP AS OF`.
#[derive(Debug)]
struct TimeTravelDialect(GenericDialect);

impl Dialect for TimeTravelDialect {
    fn is_identifier_start(&self, ch: char) -> bool {
        self.0.is_identifier_start(ch)
    }
    fn is_identifier_part(&self, ch: char) -> bool {
        self.0.is_identifier_part(ch)
    }
    fn is_delimited_identifier_start(&self, ch: char) -> bool {
        self.0.is_delimited_identifier_start(ch)
    }
    fn supports_table_versioning(&self) -> bool {
        true
    }
    fn supports_group_by_expr(&self) -> bool {
        self.0.supports_group_by_expr()
    }
    fn supports_filter_during_aggregation(&self) -> bool {
        self.0.supports_filter_during_aggregation()
    }
    fn supports_window_function_null_treatment_arg(&self) -> bool {
        self.0.supports_window_function_null_treatment_arg()
    }
    fn supports_dictionary_syntax(&self) -> bool {
        self.0.supports_dictionary_syntax()
    }
}

/// A table at a point in time.
#[derive(Debug, Clone, PartialEq)]
pub enum AsOf {
    Version(u64),
    Timestamp(chrono::DateTime<chrono::Utc>),
}

struct Collect {
    found: Vec<(TableRef, AsOf, String)>,
    error: Option<Error>,
}

fn literal(e: &Expr) -> Option<String> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => Some(n.clone()),
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => Some(s.clone()),
            _ => None,
        },
        Expr::Cast { expr, .. } => literal(expr),
        Expr::TypedString(t) => match &t.value.value {
            Value::SingleQuotedString(s) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

pub fn parse_instant(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .ok()
        .or_else(|| {
            chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
                .ok()
                .map(|t| t.and_utc())
        })
        .or_else(|| {
            chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                .ok()
                .map(|t| t.and_utc())
        })
        .or_else(|| {
            chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map(|t| t.and_utc())
        })
}

impl VisitorMut for Collect {
    type Break = ();
    fn pre_visit_table_factor(&mut self, tf: &mut TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table { name, version, .. } = tf
            && let Some(v) = version.take()
        {
            let text = name
                .0
                .iter()
                .map(|p| match p {
                    ObjectNamePart::Identifier(i) => i.value.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(".");
            let t = match TableRef::parse(&text) {
                Ok(t) => t,
                Err(e) => {
                    self.error = Some(e);
                    return ControlFlow::Break(());
                }
            };
            let as_of = match &v {
                TableVersion::VersionAsOf(e) => literal(e)
                    .and_then(|s| s.parse::<u64>().ok())
                    .map(AsOf::Version),
                TableVersion::TimestampAsOf(e) | TableVersion::ForSystemTimeAsOf(e) => literal(e)
                    .and_then(|s| parse_instant(&s))
                    .map(AsOf::Timestamp),
                _ => None,
            };
            let Some(as_of) = as_of else {
                self.error = Some(Error::Sql(format!(
                    "{text} {v}: write VERSION AS OF <number> or TIMESTAMP AS OF '<RFC 3339 time>'"
                )));
                return ControlFlow::Break(());
            };
            let alias = format!(
                "tt_{}_{}_{}",
                t.layer.schema_name().trim_start_matches('_'),
                t.name,
                self.found.len()
            );
            *name = ObjectName::from(vec![
                sqlparser::ast::Ident::new(crate::lake::catalog::NEW_SCHEMA),
                sqlparser::ast::Ident::new(alias.clone()),
            ]);
            self.found.push((t, as_of, alias));
        }
        ControlFlow::Continue(())
    }
}

/// Open a table at a point in time; a clear error when the version does not exist or a GDPR
/// erasure purged it.
pub async fn open_as_of(
    catalog: &Catalog,
    t: &TableRef,
    as_of: &AsOf,
) -> Result<deltalake::DeltaTable> {
    let version = match as_of {
        AsOf::Version(v) => *v,
        AsOf::Timestamp(ts) => {
            let commits = commit_infos(catalog, t).await?;
            if commits.is_empty() {
                return Err(Error::Usage(format!("{t} does not exist")));
            }
            let ms = ts.timestamp_millis();
            let Some((v, _)) = commits
                .iter()
                .filter(|(_, info)| {
                    info.get("timestamp")
                        .and_then(|x| x.as_i64())
                        .is_some_and(|c| c <= ms)
                })
                .max_by_key(|(v, _)| *v)
            else {
                return Err(Error::Usage(format!(
                    "{t} did not exist yet at {}",
                    ts.to_rfc3339()
                )));
            };
            // The next version is missing from the log: the time falls in purged history.
            let latest = commits.iter().map(|c| c.0).max().unwrap_or(0);
            if *v < latest && !commits.iter().any(|c| c.0 == v + 1) {
                *v + 1
            } else {
                *v
            }
        }
    };
    if let Some(e) = crate::lake::meta::erasures::purged_by(catalog, t, version).await? {
        return Err(e);
    }
    check_version(catalog, t, version).await
}

/// A version that cannot be read is a usage error that says which versions can: one past the
/// latest, one whose commit is no longer in the log, or one whose data files a later vacuum
/// deleted.
async fn check_version(
    catalog: &Catalog,
    t: &TableRef,
    version: u64,
) -> Result<deltalake::DeltaTable> {
    let lake = catalog.lake();
    let mut commits: Vec<(u64, object_store::path::Path)> = Vec::new();
    for o in lake.list(&format!("{}/_delta_log", t.rel_path())).await? {
        let Some(name) = o.location.filename() else {
            continue;
        };
        if let Some(v) = name
            .strip_suffix(".json")
            .and_then(|v| v.parse::<u64>().ok())
        {
            commits.push((v, o.location.clone()));
        }
    }
    commits.sort_by_key(|c| c.0);
    let (Some(first), Some(latest)) = (commits.first(), commits.last()) else {
        return Err(Error::Usage(format!("{t} does not exist")));
    };
    let (first, latest) = (first.0, latest.0);
    if version > latest {
        return Err(Error::Usage(format!(
            "{t} has no version {version}: its versions are {first} to {latest} (see `silt history {t}`)"
        )));
    }
    if version < first && catalog.open(t).await?.is_some() {
        // Older commits were cleaned from the log; a checkpoint may still hold the version.
        if lake.delta_table_at(&t.rel_path(), version).await.is_err() {
            return Err(Error::Usage(format!(
                "version {version} of {t} is no longer in its log: the readable versions are {first} to {latest}"
            )));
        }
    }
    // A vacuum may have deleted files the version needs: one listing says, and only then are
    // the commits after it read for the vacuum's date.
    let then = lake.delta_table_at(&t.rel_path(), version).await?;
    let needed: Vec<String> = then
        .snapshot()
        .map_err(|e| Error::delta(t.to_string(), e))?
        .log_data()
        .iter()
        .map(|f| f.path().to_string())
        .collect();
    let gone = lake
        .count_missing(&t.rel_path(), needed.iter().map(String::as_str))
        .await?;
    if gone == 0 {
        return Ok(then);
    }
    let mut vacuumed: Option<i64> = None;
    for (_, loc) in commits.iter().filter(|c| c.0 > version) {
        let data = lake.get(loc).await?;
        let info = data
            .split(|b| *b == b'\n')
            .filter_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
            .find_map(|a| a.get("commitInfo").cloned());
        if let Some(info) = info
            && info
                .get("operation")
                .and_then(|o| o.as_str())
                .is_some_and(|o| o.starts_with("VACUUM"))
        {
            vacuumed = info.get("timestamp").and_then(|x| x.as_i64());
            break;
        }
    }
    let when = vacuumed
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| "an unknown date".into());
    Err(Error::Usage(format!(
        "version {version} of {t} is no longer readable: a vacuum on {when} deleted {gone} of its {} data file(s); read a version written after the vacuum's retention period (the latest is {latest}; see `silt history {t}`)",
        needed.len()
    )))
}

/// The commit info of every version whose commit file is in the log, oldest first (versions a
/// GDPR erasure purged are missing).
/// The latest version of `t` from its log's listing alone (the newest commit file), without
/// loading the table; None when it has no commit.
pub async fn latest_version(catalog: &Catalog, t: &TableRef) -> Result<Option<u64>> {
    Ok(latest_commit_file(catalog, t).await?.map(|(v, _)| v))
}

/// The latest version of `t` and its commit info, reading that one commit file.
pub async fn latest_commit(
    catalog: &Catalog,
    t: &TableRef,
) -> Result<Option<(u64, serde_json::Map<String, serde_json::Value>)>> {
    let Some((v, path)) = latest_commit_file(catalog, t).await? else {
        return Ok(None);
    };
    let data = catalog.lake().get(&path).await?;
    let info = commit_info(&data);
    Ok(Some((v, info)))
}

/// The commit info of one JSON commit file (empty when it has none).
fn commit_info(data: &[u8]) -> serde_json::Map<String, serde_json::Value> {
    data.split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
        .find_map(|a| match a.get("commitInfo") {
            Some(serde_json::Value::Object(m)) => Some(m.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

async fn latest_commit_file(
    catalog: &Catalog,
    t: &TableRef,
) -> Result<Option<(u64, object_store::path::Path)>> {
    let mut latest: Option<(u64, object_store::path::Path)> = None;
    for o in catalog
        .lake()
        .list(&format!("{}/_delta_log", t.rel_path()))
        .await?
    {
        let Some(v) = o
            .location
            .filename()
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|v| v.parse::<u64>().ok())
        else {
            continue;
        };
        if latest.as_ref().is_none_or(|l| v > l.0) {
            latest = Some((v, o.location.clone()));
        }
    }
    Ok(latest)
}

pub async fn commit_infos(
    catalog: &Catalog,
    t: &TableRef,
) -> Result<Vec<(u64, serde_json::Map<String, serde_json::Value>)>> {
    let lake = catalog.lake();
    let mut out = Vec::new();
    for o in lake.list(&format!("{}/_delta_log", t.rel_path())).await? {
        let Some(name) = o.location.filename() else {
            continue;
        };
        let Some(v) = name
            .strip_suffix(".json")
            .and_then(|v| v.parse::<u64>().ok())
        else {
            continue;
        };
        let data = lake.get(&o.location).await?;
        out.push((v, commit_info(&data)));
    }
    out.sort_by_key(|c| c.0);
    Ok(out)
}

/// Plan `sql`, resolving version clauses first. The session must have the `__silt` schema.
/// A table that does not exist is named as the user wrote it, with the closest one that does.
pub async fn sql(ctx: &SessionContext, catalog: &Catalog, sql: &str) -> Result<DataFrame> {
    match plan_sql(ctx, catalog, sql).await {
        Err(Error::Sql(msg)) => Err(Error::Sql(explain_missing(catalog, msg).await)),
        other => other,
    }
}

/// DataFusion's `table 'datafusion.silver.dim_airline' not found`, as the user wrote the name,
/// with a suggestion.
async fn explain_missing(catalog: &Catalog, msg: String) -> String {
    let Some(i) = msg.find("table '") else {
        return msg;
    };
    let rest = &msg[i + 7..];
    let Some(j) = rest.find("' not found") else {
        return msg;
    };
    let full = &rest[..j];
    let name = full.strip_prefix("datafusion.").unwrap_or(full);
    let name = name.strip_prefix("public.").unwrap_or(name);
    let tables: Vec<String> = catalog
        .list()
        .await
        .unwrap_or_default()
        .iter()
        .map(|t| t.to_string())
        .collect();
    // A bare name is most likely a table of some layer with that name.
    let hint = tables
        .iter()
        .find(|t| !name.contains('.') && t.split_once('.').is_some_and(|(_, n)| n == name))
        .cloned()
        .or_else(|| crate::lake::catalog::closest(name, tables.iter().cloned()));
    format!(
        "table '{name}' not found{}: tables are named layer.name (bronze.*, silver.*, gold.*, quarantine.*, _silt.*; `silt tables` lists them)",
        hint.map(|h| format!(" (did you mean '{h}'?)"))
            .unwrap_or_default()
    )
}

/// SQL in silt only reads: a statement whose plan writes (INSERT, UPDATE, DELETE, COPY), defines
/// (CREATE, DROP, external tables) or sets anything is refused before it runs. Tables are
/// written by `silt ingest` and `silt build`, with their ledger, contracts and lease.
fn read_only(plan: &datafusion::logical_expr::LogicalPlan) -> Result<()> {
    datafusion::execution::context::SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(plan)
        .map_err(|e| {
            Error::Usage(format!(
                "SQL in silt only reads ({}): tables are written by `silt ingest` and `silt build`, and results leave silt through `silt query --format csv|json` or `silt export`",
                e.strip_backtrace().trim_start_matches("Error during planning: ")
            ))
        })
}

async fn plan_sql(ctx: &SessionContext, catalog: &Catalog, sql: &str) -> Result<DataFrame> {
    let upper = sql.to_ascii_uppercase();
    if !upper.contains(" AS OF") {
        let plan = ctx
            .state()
            .create_logical_plan(sql)
            .await
            .map_err(Error::from_datafusion)?;
        read_only(&plan)?;
        return ctx
            .execute_logical_plan(plan)
            .await
            .map_err(Error::from_datafusion);
    }
    let mut stmts =
        sqlparser::parser::Parser::parse_sql(&TimeTravelDialect(GenericDialect {}), sql)
            .map_err(|e| Error::Sql(e.to_string()))?;
    if stmts.len() != 1 {
        return Err(Error::Sql("one statement at a time".into()));
    }
    let mut stmt = stmts.remove(0);
    let mut c = Collect {
        found: vec![],
        error: None,
    };
    let _ = stmt.visit(&mut c);
    if let Some(e) = c.error {
        return Err(e);
    }
    let schema = ensure_schema(ctx)?;
    for (t, as_of, alias) in &c.found {
        let table = open_as_of(catalog, t, as_of).await?;
        let provider = table
            .table_provider()
            .await
            .map_err(Error::from_datafusion)?;
        let _ = schema.deregister_table(alias);
        schema.register_table(alias.clone(), provider)?;
    }
    let plan = ctx
        .state()
        .statement_to_plan(datafusion::sql::parser::Statement::Statement(Box::new(
            stmt,
        )))
        .await
        .map_err(Error::from_datafusion)?;
    read_only(&plan)?;
    ctx.execute_logical_plan(plan)
        .await
        .map_err(Error::from_datafusion)
}

fn ensure_schema(
    ctx: &SessionContext,
) -> Result<std::sync::Arc<dyn datafusion::catalog::SchemaProvider>> {
    let cat = ctx
        .catalog("datafusion")
        .ok_or_else(|| Error::Internal("no default catalog".into()))?;
    if let Some(s) = cat.schema(crate::lake::catalog::NEW_SCHEMA) {
        return Ok(s);
    }
    let s: std::sync::Arc<dyn datafusion::catalog::SchemaProvider> =
        std::sync::Arc::new(datafusion::catalog::MemorySchemaProvider::new());
    cat.register_schema(crate::lake::catalog::NEW_SCHEMA, s.clone())?;
    Ok(s)
}

/// One version of a table, for `silt history`.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryEntry {
    pub version: u64,
    pub timestamp: Option<String>,
    pub operation: Option<String>,
    pub silt_operation: Option<String>,
    /// The silt run or ingest batch that wrote it.
    pub run: Option<String>,
    pub metrics: BTreeMap<String, serde_json::Value>,
}

pub async fn history(catalog: &Catalog, t: &TableRef) -> Result<Vec<HistoryEntry>> {
    if catalog.open(t).await?.is_none() {
        return Err(Error::Usage(format!("{t} does not exist")));
    }
    // Newest first.
    let mut out = Vec::new();
    for (version, info) in commit_infos(catalog, t).await?.into_iter().rev() {
        let s = |k: &str| info.get(k).and_then(|v| v.as_str()).map(String::from);
        let mut metrics = BTreeMap::new();
        if let Some(serde_json::Value::Object(m)) = info.get("operationMetrics") {
            metrics.extend(m.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        out.push(HistoryEntry {
            version,
            timestamp: info
                .get("timestamp")
                .and_then(|x| x.as_i64())
                .and_then(chrono::DateTime::from_timestamp_millis)
                .map(|t| t.to_rfc3339()),
            operation: s("operation"),
            silt_operation: s("silt.operation"),
            run: s("silt.run_id").or_else(|| s("silt.batch_id")),
            metrics,
        });
    }
    Ok(out)
}

/// `silt restore`: a new version whose content is that of an older one. A model table also
/// gets back the build state it had then, so the next run re-applies newer upstream data.
pub async fn restore(catalog: &Catalog, t: &TableRef, as_of: &AsOf) -> Result<u64> {
    t.writable_by_user("restore")?;
    let table = catalog
        .open(t)
        .await?
        .ok_or_else(|| Error::Usage(format!("{t} does not exist")))?;
    let target_version = open_as_of(catalog, t, as_of).await?.version().unwrap_or(0);
    // The newest model state at or before the restored version.
    let state = commit_infos(catalog, t)
        .await?
        .into_iter()
        .rev()
        .filter(|(v, _)| *v <= target_version)
        .find_map(|(_, info)| info.get("silt.state").cloned());
    let mut meta = vec![
        (
            "silt.operation".to_string(),
            serde_json::Value::from("restore"),
        ),
        (
            "silt.restored_version".to_string(),
            serde_json::Value::from(target_version),
        ),
    ];
    if let Some(st) = state {
        meta.push(("silt.state".to_string(), st));
    }
    let (table, _metrics) = table
        .restore()
        .with_version_to_restore(target_version)
        .with_commit_properties(
            deltalake::kernel::transaction::CommitProperties::default().with_metadata(meta),
        )
        .await
        .map_err(|e| Error::delta(t.to_string(), e))?;
    Ok(table.version().unwrap_or(0))
}

/// What changed in a table between two versions.
#[derive(Debug, Clone, Serialize)]
pub struct Diff {
    pub key: Vec<String>,
    pub added: Vec<serde_json::Map<String, serde_json::Value>>,
    pub removed: Vec<serde_json::Map<String, serde_json::Value>>,
    /// Rows whose key is in both versions with other values: (before, after).
    pub changed: Vec<(
        serde_json::Map<String, serde_json::Value>,
        serde_json::Map<String, serde_json::Value>,
    )>,
    pub rows_before: u64,
    pub rows_after: u64,
    /// Per column: null counts, and sums of numeric columns, before and after.
    pub summary: Vec<ColumnSummary>,
}

/// One column's summary statistics on both sides of a diff.
#[derive(Debug, Clone, Serialize)]
pub struct ColumnSummary {
    pub column: String,
    pub nulls_before: u64,
    pub nulls_after: u64,
    pub sum_before: Option<f64>,
    pub sum_after: Option<f64>,
}

async fn rows(
    ctx: &SessionContext,
    sql: &str,
) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let batches = ctx
        .sql(sql)
        .await
        .map_err(Error::from_datafusion)?
        .collect()
        .await?;
    let text = crate::render::render(&batches, crate::render::OutputFormat::Json)?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    Ok(v.as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| r.as_object().cloned())
        .collect())
}

/// `silt diff`: rows added, removed and changed between `from` and `to`, by `key` when given.
pub async fn diff(
    catalog: &Catalog,
    t: &TableRef,
    from: &AsOf,
    to: &AsOf,
    key: &[String],
) -> Result<Diff> {
    let a = open_as_of(catalog, t, from).await?;
    let b = open_as_of(catalog, t, to).await?;
    diff_tables(catalog.lake(), &a, &b, key).await
}

/// Rows added, removed and changed from table `a` to table `b` (two versions of one table,
/// or one table in two environments), by `key` when given, with row counts and per-column
/// summaries.
pub async fn diff_tables(
    lake: &crate::lake::storage::Storage,
    a: &deltalake::DeltaTable,
    b: &deltalake::DeltaTable,
    key: &[String],
) -> Result<Diff> {
    let ctx = SessionContext::new_with_config_rt(
        datafusion::prelude::SessionConfig::new(),
        datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
            .with_object_store_registry(lake.registry())
            .build_arc()?,
    );
    ctx.register_table(
        "a",
        a.table_provider().await.map_err(Error::from_datafusion)?,
    )?;
    ctx.register_table(
        "b",
        b.table_provider().await.map_err(Error::from_datafusion)?,
    )?;
    let cols: Vec<String> = ctx
        .table("b")
        .await?
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let list = cols
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let only_b = format!("select {list} from b except select {list} from a");
    let only_a = format!("select {list} from a except select {list} from b");
    let numeric: Vec<bool> = ctx
        .table("b")
        .await?
        .schema()
        .fields()
        .iter()
        .map(|f| f.data_type().is_numeric())
        .collect();
    let mut summary = Vec::new();
    let mut counts = (0u64, 0u64);
    for (side, alias) in [("a", 0), ("b", 1)] {
        let mut exprs = vec!["count(*) as n".to_string()];
        for (i, c) in cols.iter().enumerate() {
            exprs.push(format!("count(*) - count(\"{c}\") as \"n{i}\""));
            if numeric[i] {
                exprs.push(format!("cast(sum(\"{c}\") as double) as \"s{i}\""));
            }
        }
        let r = rows(&ctx, &format!("select {} from {side}", exprs.join(", "))).await?;
        let r = r.into_iter().next().unwrap_or_default();
        let n = r.get("n").and_then(|v| v.as_u64()).unwrap_or(0);
        if alias == 0 {
            counts.0 = n;
        } else {
            counts.1 = n;
        }
        for (i, c) in cols.iter().enumerate() {
            if alias == 0 {
                summary.push(ColumnSummary {
                    column: c.clone(),
                    nulls_before: 0,
                    nulls_after: 0,
                    sum_before: None,
                    sum_after: None,
                });
            }
            let nulls = r
                .get(&format!("n{i}"))
                .and_then(|v| v.as_u64())
                .unwrap_or(0);
            let sum = r.get(&format!("s{i}")).and_then(|v| v.as_f64());
            let s = &mut summary[i];
            if alias == 0 {
                s.nulls_before = nulls;
                s.sum_before = sum;
            } else {
                s.nulls_after = nulls;
                s.sum_after = sum;
            }
        }
    }
    if key.is_empty() {
        return Ok(Diff {
            key: vec![],
            added: rows(&ctx, &only_b).await?,
            removed: rows(&ctx, &only_a).await?,
            changed: vec![],
            rows_before: counts.0,
            rows_after: counts.1,
            summary,
        });
    }
    let kq = key
        .iter()
        .map(|k| format!("\"{k}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let new_rows = rows(&ctx, &format!("select * from ({only_b}) order by {kq}")).await?;
    let old_rows = rows(&ctx, &format!("select * from ({only_a}) order by {kq}")).await?;
    let k = |r: &serde_json::Map<String, serde_json::Value>| {
        key.iter()
            .map(|c| r.get(c).cloned().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };
    let old_by_key: BTreeMap<Vec<String>, serde_json::Map<String, serde_json::Value>> =
        old_rows.iter().map(|r| (k(r), r.clone())).collect();
    let new_by_key: BTreeMap<Vec<String>, serde_json::Map<String, serde_json::Value>> =
        new_rows.iter().map(|r| (k(r), r.clone())).collect();
    let mut d = Diff {
        key: key.to_vec(),
        added: vec![],
        removed: vec![],
        changed: vec![],
        rows_before: counts.0,
        rows_after: counts.1,
        summary,
    };
    for (kk, r) in &new_by_key {
        match old_by_key.get(kk) {
            Some(o) => d.changed.push((o.clone(), r.clone())),
            None => d.added.push(r.clone()),
        }
    }
    for (kk, r) in &old_by_key {
        if !new_by_key.contains_key(kk) {
            d.removed.push(r.clone());
        }
    }
    Ok(d)
}
