//! SQL models: discovery in `sql/silver` and `sql/gold`, their `{{ config(...) }}`, rendering with
//! minijinja (`ref`, `source`, `this`, `is_incremental`, `var`), the dag their references form,
//! and `--select` selectors. This is the only module that renders templates. It must not run SQL
//! or write tables (materialize.rs and pipeline.rs do).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error as JinjaError, ErrorKind, UndefinedBehavior};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::lake::catalog::{Layer, TableRef};
use crate::project::config::Project;

/// How a model is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Materialized {
    Table,
    Incremental,
    PartitionOverwrite,
    Append,
    Snapshot,
}

impl Materialized {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "table" => Self::Table,
            "incremental" => Self::Incremental,
            "partition_overwrite" => Self::PartitionOverwrite,
            "append" => Self::Append,
            "snapshot" => Self::Snapshot,
            _ => return None,
        })
    }
}

/// How a snapshot model tells that a row changed.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, strum::Display, strum::EnumString,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum SnapshotStrategy {
    /// Any of `check_cols` differs.
    #[default]
    Check,
    /// A newer `updated_at`.
    Timestamp,
}

/// What an incremental build does when the model's output gains columns.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, strum::Display, strum::EnumString,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum OnSchemaChange {
    /// The build fails, naming the new columns.
    #[default]
    Fail,
    /// The target table gains the columns (older rows hold NULL).
    AppendNewColumns,
}

/// A model's `{{ config(...) }}`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelConfig {
    pub materialized: Materialized,
    pub unique_key: Vec<String>,
    pub partition_by: Option<String>,
    /// Incremental: also re-read upstream rows whose `lookback_column` is within this many days of
    /// the latest value already in the target.
    pub lookback_days: Option<i64>,
    pub lookback_column: Option<String>,
    /// Incremental: recompute the output rows of every value of this column that changed
    /// upstream (from whole upstream rows filtered to those values), instead of merging rows
    /// computed from new upstream rows only. For models whose rows for a value depend only on
    /// upstream rows carrying that value (`group by client_id`, `partition by client_id`).
    pub recompute_by: Option<String>,
    /// Snapshot: `check` (compare `check_cols`) or `timestamp` (a new `updated_at` is a change).
    pub strategy: SnapshotStrategy,
    pub check_cols: Vec<String>,
    pub updated_at: Option<String>,
    pub description: Option<String>,
    /// Column tests run right after the model is built.
    pub tests: Vec<crate::build::quality::TestSpec>,
    /// Declared output columns and types: a mismatch fails the build before any write.
    pub contract: Option<BTreeMap<String, String>>,
    /// Incremental models: `fail` (default) or `append_new_columns` when the output gains columns.
    pub on_schema_change: OnSchemaChange,
    /// Columns of this model holding personal data (besides those named PII by sources): no
    /// statistics are kept on them.
    pub pii: Vec<String>,
    /// The output column holding a data subject's id when its name differs from the sources'
    /// subject key (`silt forget` erases the model's rows by it).
    pub subject_key: Option<String>,
    /// Columns replaced in the output: `hash` (HMAC-SHA256 hex with the `[gdpr]` key, stable
    /// and joinable) or `mask` (first character kept). Raw PII then stops at this model.
    pub pseudonymize: BTreeMap<String, Pseudonym>,
    /// Column descriptions (`columns={'ltv_total': 'Net fees…'}`), published with exports.
    pub columns: BTreeMap<String, String>,
    /// Singular tests: `config(severity='warn')`.
    pub severity: crate::build::quality::Severity,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            materialized: Materialized::Table,
            unique_key: vec![],
            partition_by: None,
            lookback_days: None,
            lookback_column: None,
            recompute_by: None,
            strategy: SnapshotStrategy::Check,
            check_cols: vec![],
            updated_at: None,
            description: None,
            tests: vec![],
            contract: None,
            on_schema_change: OnSchemaChange::Fail,
            pii: vec![],
            subject_key: None,
            pseudonymize: BTreeMap::new(),
            columns: BTreeMap::new(),
            severity: crate::build::quality::Severity::Error,
        }
    }
}

pub use crate::project::config::Pseudonym;

/// One model file.
#[derive(Debug, Clone, Serialize)]
pub struct Model {
    pub name: String,
    pub layer: Layer,
    /// Project-relative path, for messages.
    pub file: String,
    #[serde(skip)]
    pub template: String,
    pub config: ModelConfig,
    /// Models this one `ref`s.
    pub refs: BTreeSet<String>,
    /// Sources this one reads.
    pub sources: BTreeSet<String>,
}

impl Model {
    pub fn table(&self) -> TableRef {
        TableRef::new(self.layer, self.name.clone())
    }
}

/// What `ref`, `source` and `this` render to in one rendering.
#[derive(Debug, Clone, Default)]
pub struct RenderContext {
    pub incremental: bool,
    /// Override per upstream table name (`bronze.fees`) → SQL relation text.
    pub relations: BTreeMap<String, String>,
}

/// All models of a project, in dag order.
#[derive(Debug, Clone)]
pub struct Dag {
    pub models: BTreeMap<String, Model>,
    /// Topological order (upstream first), ties broken by layer then name.
    pub order: Vec<String>,
    /// Singular tests of `sql/tests/*.sql`.
    pub singular: Vec<SingularTest>,
    vars: BTreeMap<String, toml::Value>,
    /// The project's source names (a relationships test may name `bronze.<source>`).
    sources: BTreeSet<String>,
}

/// A `sql/tests/<name>.sql` query returning failing rows.
#[derive(Debug, Clone, Serialize)]
pub struct SingularTest {
    pub name: String,
    pub file: String,
    #[serde(skip)]
    pub sql: String,
    pub refs: BTreeSet<String>,
    pub sources: BTreeSet<String>,
    pub severity: crate::build::quality::Severity,
}

#[derive(Default)]
struct Captured {
    config: Option<Result<ModelConfig, String>>,
    refs: BTreeSet<String>,
    sources: BTreeSet<String>,
}

/// How many line breaks the `{{ config(…) }}` call of a template spans: it renders as that many
/// line breaks, so the rendered SQL keeps the file's line numbers after it (a SQL error then
/// points at the right line of the file).
fn config_newlines(template: &str) -> usize {
    let mut from = 0;
    while let Some(i) = template[from..].find("{{") {
        let start = from + i;
        let rest =
            template[start + 2..].trim_start_matches(|c: char| c.is_whitespace() || c == '-');
        if rest.starts_with("config(") || rest.starts_with("config (") {
            let end = template[start..]
                .find("}}")
                .map_or(template.len(), |e| start + e);
            return template[start..end].matches('\n').count();
        }
        from = start + 2;
    }
    0
}

#[allow(clippy::too_many_arguments)]
fn env_for(
    this: String,
    ctx: RenderContext,
    captured: Arc<Mutex<Captured>>,
    known_models: Arc<BTreeMap<String, Layer>>,
    known_sources: Arc<BTreeSet<String>>,
    vars: Arc<BTreeMap<String, toml::Value>>,
    config_lines: usize,
) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    let c = captured.clone();
    env.add_function(
        "config",
        move |kwargs: Kwargs| -> std::result::Result<String, JinjaError> {
            let cfg = parse_config(&kwargs);
            c.lock().unwrap().config = Some(cfg);
            Ok("\n".repeat(config_lines))
        },
    );
    let c = captured.clone();
    let rel = ctx.relations.clone();
    env.add_function(
        "ref",
        move |name: String| -> std::result::Result<String, JinjaError> {
            let Some(layer) = known_models.get(&name) else {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!("ref('{name}'): no model named '{name}' in sql/silver or sql/gold"),
                ));
            };
            c.lock().unwrap().refs.insert(name.clone());
            let t = TableRef::new(*layer, name).to_string();
            Ok(rel.get(&t).cloned().unwrap_or(t))
        },
    );
    let c = captured.clone();
    let rel = ctx.relations.clone();
    env.add_function(
        "source",
        move |name: String| -> std::result::Result<String, JinjaError> {
            if !known_sources.contains(&name) {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!("source('{name}'): no source named '{name}' in sql/bronze"),
                ));
            }
            c.lock().unwrap().sources.insert(name.clone());
            let t = TableRef::bronze(&name).to_string();
            Ok(rel.get(&t).cloned().unwrap_or(t))
        },
    );
    let incremental = ctx.incremental;
    env.add_function("is_incremental", move || incremental);
    env.add_function(
        "var",
        move |name: String, default: Option<Value>| -> std::result::Result<Value, JinjaError> {
            match vars.get(&name) {
                Some(v) => Ok(Value::from_serialize(v)),
                None => default.ok_or_else(|| {
                    JinjaError::new(
                        ErrorKind::InvalidOperation,
                        format!(
                            "var('{name}') is not set in [vars] of silt.toml and has no default"
                        ),
                    )
                }),
            }
        },
    );
    env.add_global("this", Value::from(this));
    env
}

fn parse_config(kw: &Kwargs) -> std::result::Result<ModelConfig, String> {
    let mut c = ModelConfig::default();
    let s = |k: &str| -> std::result::Result<Option<String>, String> {
        kw.get::<Option<String>>(k)
            .map_err(|e| format!("config({k}=…): {e}"))
    };
    let list = |k: &str| -> std::result::Result<Vec<String>, String> {
        let v: Option<Value> = kw.get(k).map_err(|e| format!("config({k}=…): {e}"))?;
        let Some(v) = v else { return Ok(vec![]) };
        if let Some(s) = v.as_str() {
            return Ok(vec![s.to_string()]);
        }
        let it = v
            .try_iter()
            .map_err(|_| format!("config({k}=…) takes a string or a list of strings"))?;
        it.map(|x| {
            x.as_str()
                .map(String::from)
                .ok_or_else(|| format!("config({k}=…) takes a string or a list of strings"))
        })
        .collect()
    };
    if let Some(m) = s("materialized")? {
        c.materialized = Materialized::parse(&m).ok_or_else(|| {
            format!("materialized='{m}' is not one of table, incremental, partition_overwrite, append, snapshot")
        })?;
    }
    c.unique_key = list("unique_key")?;
    c.partition_by = s("partition_by")?;
    c.lookback_days = kw
        .get::<Option<i64>>("lookback_days")
        .map_err(|e| format!("config(lookback_days=…): {e}"))?;
    c.lookback_column = s("lookback_column")?;
    c.recompute_by = s("recompute_by")?;
    if let Some(st) = s("strategy")? {
        c.strategy = st
            .parse()
            .map_err(|_| format!("strategy='{st}' is not check or timestamp"))?;
    }
    c.check_cols = list("check_cols")?;
    c.pii = list("pii")?;
    c.subject_key = s("subject_key")?;
    c.updated_at = s("updated_at")?;
    c.description = s("description")?;
    let json = |k: &str| -> std::result::Result<Option<serde_json::Value>, String> {
        let v: Option<Value> = kw.get(k).map_err(|e| format!("config({k}=…): {e}"))?;
        v.map(|v| serde_json::to_value(&v).map_err(|e| format!("config({k}=…): {e}")))
            .transpose()
    };
    if let Some(t) = json("tests")? {
        c.tests = serde_json::from_value(t).map_err(|e| {
            format!("config(tests=…): {e}; write tests=[{{'type': 'not_null', 'column': 'id'}}, …]")
        })?;
    }
    if let Some(t) = json("contract")? {
        c.contract = Some(serde_json::from_value(t).map_err(|e| {
            format!("config(contract=…): {e}; write contract={{'column': 'type', …}}")
        })?);
    }
    if let Some(t) = json("pseudonymize")? {
        c.pseudonymize = serde_json::from_value(t).map_err(|e| {
            format!("config(pseudonymize=…): {e}; write pseudonymize={{'email': 'hash', 'full_name': 'mask'}}")
        })?;
    }
    if let Some(t) = json("columns")? {
        c.columns = serde_json::from_value(t).map_err(|e| {
            format!("config(columns=…): {e}; write columns={{'column': 'description', …}}")
        })?;
    }
    if let Some(o) = s("on_schema_change")? {
        c.on_schema_change = o
            .parse()
            .map_err(|_| format!("on_schema_change='{o}' is not fail or append_new_columns"))?;
    }
    if let Some(sv) = s("severity")? {
        c.severity = match sv.as_str() {
            "error" => crate::build::quality::Severity::Error,
            "warn" => crate::build::quality::Severity::Warn,
            o => return Err(format!("severity='{o}' is not error or warn")),
        };
    }
    let _ = kw.get::<Option<Value>>("tags");
    kw.assert_all_used().map_err(|e| format!("config: {e}"))?;
    match c.materialized {
        Materialized::Incremental if c.unique_key.is_empty() => {
            return Err("materialized='incremental' needs unique_key".into());
        }
        Materialized::PartitionOverwrite if c.partition_by.is_none() => {
            return Err("materialized='partition_overwrite' needs partition_by".into());
        }
        Materialized::Snapshot => {
            if c.unique_key.is_empty() {
                return Err("materialized='snapshot' needs unique_key".into());
            }
            match c.strategy {
                SnapshotStrategy::Check if c.check_cols.is_empty() => {
                    return Err("strategy='check' needs check_cols".into());
                }
                SnapshotStrategy::Timestamp if c.updated_at.is_none() => {
                    return Err("strategy='timestamp' needs updated_at".into());
                }
                _ => {}
            }
        }
        _ => {}
    }
    if c.lookback_days.is_some() != c.lookback_column.is_some() {
        return Err("lookback_days and lookback_column go together".into());
    }
    if c.recompute_by.is_some() {
        if c.materialized != Materialized::Incremental {
            return Err("recompute_by goes with materialized='incremental'".into());
        }
        if c.lookback_days.is_some() {
            return Err(
                "recompute_by reads every upstream row of the values it recomputes: lookback_days is not needed (remove it)"
                    .into(),
            );
        }
    }
    Ok(c)
}

/// The selector of models whose SQL or config changed (`state:modified`).
pub const STATE_MODIFIED: &str = "state:modified";

impl Dag {
    /// Discover and parse every model of the project.
    pub fn load(project: &Project) -> Result<Dag> {
        let mut files: Vec<(Layer, PathBuf)> = Vec::new();
        for layer in [Layer::Silver, Layer::Gold] {
            let dir = project.dir.join("sql").join(layer.schema_name());
            files.extend(sql_files(&dir).into_iter().map(|p| (layer, p)));
        }
        let mut known: BTreeMap<String, Layer> = BTreeMap::new();
        let mut seen_file: BTreeMap<String, String> = BTreeMap::new();
        for (layer, p) in &files {
            let name = file_stem(p);
            let rel = rel_path(&project.dir, p);
            if !crate::project::config::is_identifier(&name) {
                return Err(Error::config(
                    rel,
                    "model file names must be lower-case identifiers (letters, digits, '_')",
                ));
            }
            if let Some(other) = seen_file.insert(name.clone(), rel.clone()) {
                return Err(Error::config(
                    rel,
                    format!("a model named '{name}' already exists in {other}"),
                ));
            }
            known.insert(name, *layer);
        }
        let names = Names {
            models: Arc::new(known),
            sources: Arc::new(project.sources.keys().cloned().collect::<BTreeSet<_>>()),
            vars: Arc::new(project.file.vars.clone()),
        };
        let mut models = BTreeMap::new();
        for (layer, p) in files {
            let m = names.model(project, layer, &p)?;
            models.insert(m.name.clone(), m);
        }
        let order = topo_order(&models)?;
        let mut singular = Vec::new();
        for p in sql_files(&project.dir.join("sql").join("tests")) {
            singular.push(names.singular_test(project, &p)?);
        }
        let dag = Dag {
            models,
            order,
            singular,
            vars: project.file.vars.clone(),
            sources: project.sources.keys().cloned().collect(),
        };
        dag.check_tests(project)?;
        dag.check_partitions(project)?;
        Ok(dag)
    }

    /// Render a model's SQL for execution.
    pub fn render(&self, m: &Model, ctx: RenderContext) -> Result<String> {
        let known = Arc::new(
            self.models
                .iter()
                .map(|(k, v)| (k.clone(), v.layer))
                .collect(),
        );
        let sources = Arc::new(m.sources.clone());
        let cap = Arc::new(Mutex::new(Captured::default()));
        let env = env_for(
            m.table().to_string(),
            ctx,
            cap,
            known,
            sources,
            Arc::new(self.vars.clone()),
            config_newlines(&m.template),
        );
        env.render_str(&m.template, ())
            .map_err(|e| Error::config(&m.file, jinja_message(&e)))
    }

    /// A SQL error of model `m`, whose rendered SQL was `rendered`, as a configuration error
    /// naming the model file's line and column (DataFusion counts in the rendered SQL).
    pub fn locate(&self, m: &Model, rendered: &str, e: Error) -> Error {
        let Error::Sql(msg) = e else {
            return e;
        };
        match sql_position(&msg).and_then(|(line, col)| {
            map_position(&m.template, rendered, line, col).map(|(l, c)| (line, col, l, c))
        }) {
            Some((line, col, l, c)) => {
                let msg = msg.replace(
                    &format!("Line: {line}, Column: {col}"),
                    &format!("line {l}, column {c} of {}", m.file),
                );
                Error::config(format!("{}:{l}:{c}", m.file), msg)
            }
            None => Error::config(&m.file, msg),
        }
    }

    /// Models selected by `--select` terms: `name`, `name+` (and downstream), `+name` (and
    /// upstream), `silver` / `gold` (a layer). Empty = all. Returned in dag order.
    pub fn select(&self, terms: &[String]) -> Result<Vec<String>> {
        self.select_with_state(terms, None)
    }

    /// Whether `terms` use `state:modified` (which needs [`Dag::select_with_state`]'s set).
    pub fn uses_state(terms: &[String]) -> bool {
        terms
            .iter()
            .flat_map(|t| t.split(','))
            .any(|t| t.trim().trim_matches('+') == STATE_MODIFIED)
    }

    /// As [`Dag::select`], and `state:modified` (with `+` before or after as for a name):
    /// the models in `modified`, those whose SQL or config changed against the lake they are
    /// compared with.
    pub fn select_with_state(
        &self,
        terms: &[String],
        modified: Option<&BTreeSet<String>>,
    ) -> Result<Vec<String>> {
        if terms.is_empty() {
            return Ok(self.order.clone());
        }
        let mut chosen = BTreeSet::new();
        for t in terms {
            for term in t.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                if let Some(layer) = Layer::parse(term) {
                    chosen.extend(
                        self.models
                            .values()
                            .filter(|m| m.layer == layer)
                            .map(|m| m.name.clone()),
                    );
                    continue;
                }
                let up = term.starts_with('+');
                let down = term.ends_with('+');
                let name = term.trim_matches('+');
                if name == STATE_MODIFIED {
                    let Some(set) = modified else {
                        return Err(Error::Usage(format!(
                            "--select '{term}' is not available here: use it with silt build or silt run"
                        )));
                    };
                    for n in set {
                        chosen.insert(n.clone());
                        if up {
                            chosen.extend(self.upstream(n));
                        }
                        if down {
                            chosen.extend(self.downstream(n));
                        }
                    }
                    continue;
                }
                if !self.models.contains_key(name) {
                    return Err(Error::Usage(format!(
                        "--select '{term}': no model named '{name}' (models: {})",
                        self.order.join(", ")
                    )));
                }
                chosen.insert(name.to_string());
                if up {
                    chosen.extend(self.upstream(name));
                }
                if down {
                    chosen.extend(self.downstream(name));
                }
            }
        }
        Ok(self
            .order
            .iter()
            .filter(|n| chosen.contains(*n))
            .cloned()
            .collect())
    }

    /// A `to` of a relationships test: a model name or a `layer.table` name of a model or a
    /// source.
    pub fn resolve(&self, to: &str) -> Result<TableRef> {
        if to.contains('.') {
            let t = TableRef::parse(to)?;
            let known = match t.layer {
                Layer::Silver | Layer::Gold => {
                    self.models.get(&t.name).is_some_and(|m| m.layer == t.layer)
                }
                Layer::Bronze => self.sources.contains(&t.name),
                Layer::Quarantine | Layer::Silt => true,
            };
            if !known {
                return Err(Error::Usage(format!(
                    "'{to}' is not a table of this project{}",
                    self.closest(to)
                        .map(|c| format!(" (did you mean '{c}'?)"))
                        .unwrap_or_default()
                )));
            }
            return Ok(t);
        }
        if let Some(m) = self.models.get(to) {
            return Ok(m.table());
        }
        if self.sources.contains(to) {
            return Err(Error::Usage(format!(
                "'{to}' is a source, not a model: write 'bronze.{to}'"
            )));
        }
        Err(Error::Usage(format!(
            "'{to}' is not a model: name a model, or a table as layer.name{}",
            self.closest(to)
                .map(|c| format!(" (did you mean '{c}'?)"))
                .unwrap_or_default()
        )))
    }

    /// The model or source table whose name is closest to `name` (a typo's likely meaning).
    fn closest(&self, name: &str) -> Option<String> {
        let candidates = self
            .models
            .values()
            .flat_map(|m| [m.name.clone(), m.table().to_string()])
            .chain(
                self.sources
                    .iter()
                    .flat_map(|s| [s.clone(), format!("bronze.{s}")]),
            );
        crate::lake::catalog::closest(name, candidates)
    }

    /// No model is partitioned by a PII column or a column leading to a subject: partition
    /// values live in file paths and the Delta log, where an erasure cannot rewrite them.
    fn check_partitions(&self, project: &Project) -> Result<()> {
        let pii = project.pii_columns();
        let keys: BTreeSet<&String> = project
            .sources
            .values()
            .flat_map(|s| {
                s.subject_key
                    .iter()
                    .chain(s.subject_via.iter().map(|v| &v.column))
            })
            .collect();
        for m in self.models.values() {
            let Some(p) = &m.config.partition_by else {
                continue;
            };
            if pii.contains(p)
                || m.config.pii.contains(p)
                || keys.contains(p)
                || m.config.subject_key.as_ref() == Some(p)
            {
                return Err(Error::config(
                    &m.file,
                    format!(
                        "partition_by='{p}': a table must not be partitioned by a PII column or a subject key (erased values would survive in file paths and the Delta log); partition by a date or another column"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Compile every column test of every model and source and every relationships target, so
    /// a test that cannot run is a configuration error when the project loads, before anything
    /// builds (and not a run that stops halfway and leaves later tests unchecked).
    fn check_tests(&self, project: &Project) -> Result<()> {
        for m in self.order.iter().map(|n| &self.models[n]) {
            self.model_tests(m)?;
        }
        for src in project.sources.values() {
            for spec in &src.tests {
                crate::build::quality::compile(
                    spec,
                    &TableRef::bronze(&src.name),
                    &src.file,
                    &|to| {
                        self.resolve(to)
                            .map_err(|e| Error::config(&src.file, e.to_string()))
                    },
                )?;
            }
        }
        Ok(())
    }

    /// The column tests of a model, compiled.
    pub fn model_tests(&self, m: &Model) -> Result<Vec<crate::build::quality::DataTest>> {
        self.model_tests_of(m, None)
    }

    /// The model's column tests; with `written` (the relation of the rows an incremental build
    /// wrote), row tests check only those rows and `unique` only their keys.
    pub fn model_tests_of(
        &self,
        m: &Model,
        written: Option<&crate::build::quality::WrittenScope>,
    ) -> Result<Vec<crate::build::quality::DataTest>> {
        m.config
            .tests
            .iter()
            .map(|spec| {
                crate::build::quality::compile_scoped(spec, &m.table(), &m.file, written, &|to| {
                    self.resolve(to)
                        .map_err(|e| Error::config(&m.file, e.to_string()))
                })
            })
            .collect()
    }

    /// The singular tests, compiled.
    pub fn singular_tests(&self) -> Vec<(crate::build::quality::DataTest, &SingularTest)> {
        self.singular
            .iter()
            .map(|t| {
                (
                    crate::build::quality::DataTest {
                        name: t.name.clone(),
                        subject: t.file.clone(),
                        kind: "singular".into(),
                        severity: t.severity,
                        scope: crate::build::quality::TestScope::Table,
                        sql: t.sql.clone(),
                    },
                    t,
                )
            })
            .collect()
    }

    /// Every model `name` depends on, transitively.
    pub fn upstream(&self, name: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut stack = vec![name.to_string()];
        while let Some(n) = stack.pop() {
            for r in &self.models[&n].refs {
                if out.insert(r.clone()) {
                    stack.push(r.clone());
                }
            }
        }
        out
    }

    /// Every model that depends on `name`, transitively.
    pub fn downstream(&self, name: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut stack = vec![name.to_string()];
        while let Some(n) = stack.pop() {
            for m in self.models.values() {
                if m.refs.contains(&n) && out.insert(m.name.clone()) {
                    stack.push(m.name.clone());
                }
            }
        }
        out
    }

    /// Models reading source `s`, directly or through other models.
    pub fn reading_source(&self, s: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for m in self.models.values().filter(|m| m.sources.contains(s)) {
            out.insert(m.name.clone());
            out.extend(self.downstream(&m.name));
        }
        out
    }
}

fn topo_order(models: &BTreeMap<String, Model>) -> Result<Vec<String>> {
    let mut order = Vec::new();
    let mut state: BTreeMap<&str, u8> = BTreeMap::new(); // 1 visiting, 2 done
    fn visit<'a>(
        n: &'a str,
        models: &'a BTreeMap<String, Model>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        match state.get(n) {
            Some(2) => return Ok(()),
            Some(1) => {
                let start = path.iter().position(|p| *p == n).unwrap_or(0);
                let mut cycle: Vec<&str> = path[start..].to_vec();
                cycle.push(n);
                let files: Vec<String> = cycle.iter().map(|c| models[*c].file.clone()).collect();
                return Err(Error::config(
                    &models[n].file,
                    format!(
                        "the models form a cycle: {} ({})",
                        cycle.join(" -> "),
                        files.join(", ")
                    ),
                ));
            }
            _ => {}
        }
        state.insert(n, 1);
        path.push(n);
        for r in &models[n].refs {
            visit(r, models, state, path, order)?;
        }
        path.pop();
        state.insert(n, 2);
        order.push(n.to_string());
        Ok(())
    }
    // Silver before gold, then by name, for a stable order.
    let mut names: Vec<&Model> = models.values().collect();
    names.sort_by_key(|m| (m.layer, m.name.clone()));
    for m in names {
        visit(&m.name, models, &mut state, &mut Vec::new(), &mut order)?;
    }
    Ok(order)
}

/// `Line: 6, Column: 12` in a SQL parser's message.
fn sql_position(msg: &str) -> Option<(usize, usize)> {
    let i = msg.rfind("Line: ")?;
    let rest = &msg[i + 6..];
    let (line, rest) = rest.split_once(", Column: ")?;
    let col: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    Some((line.trim().parse().ok()?, col.parse().ok()?))
}

/// The literal text of a template line: what is left when `{{ … }}`, `{% … %}` and `{# … #}`
/// are cut out, in pieces.
fn literal_pieces(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = line;
    loop {
        let next = ["{{", "{%", "{#"]
            .iter()
            .filter_map(|o| rest.find(o).map(|i| (i, *o)))
            .min_by_key(|x| x.0);
        let Some((i, open)) = next else {
            out.push(rest);
            break;
        };
        out.push(&rest[..i]);
        let close = match open {
            "{{" => "}}",
            "{%" => "%}",
            _ => "#}",
        };
        match rest[i..].find(close) {
            Some(j) => rest = &rest[i + j + 2..],
            None => break,
        }
    }
    out.into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

/// Whether rendered line `r` can come from template line `t`: its literal pieces, in order.
fn line_matches(t: &str, r: &str) -> bool {
    let pieces = literal_pieces(t);
    if pieces.is_empty() {
        return false;
    }
    let mut at = 0;
    for p in pieces {
        match r[at..].find(p) {
            Some(i) => at += i + p.len(),
            None => return false,
        }
    }
    true
}

/// The file line and column of rendered line `line`, column `col`: the same line when it came
/// from there (the config block renders as its own line breaks), else the nearest template
/// line it can come from; the column moves with the token under it.
fn map_position(template: &str, rendered: &str, line: usize, col: usize) -> Option<(usize, usize)> {
    let r = rendered.lines().nth(line.checked_sub(1)?)?;
    let tl: Vec<&str> = template.lines().collect();
    let l = if tl
        .get(line - 1)
        .is_some_and(|t| *t == r || line_matches(t, r))
    {
        line
    } else {
        (0..tl.len())
            .filter(|i| line_matches(tl[*i], r))
            .min_by_key(|i| (*i + 1).abs_diff(line))?
            + 1
    };
    let t = tl[l - 1];
    if t == r {
        return Some((l, col));
    }
    let token: String = r
        .chars()
        .skip(col.saturating_sub(1))
        .take_while(|c| !c.is_whitespace())
        .collect();
    let c = (!token.is_empty())
        .then(|| t.find(&token))
        .flatten()
        .map_or(col, |i| t[..i].chars().count() + 1);
    Some((l, c))
}

fn rel_path(dir: &Path, p: &Path) -> String {
    p.strip_prefix(dir).unwrap_or(p).display().to_string()
}

fn jinja_message(e: &JinjaError) -> String {
    let mut m = match e.line() {
        Some(l) => format!("line {l}: {}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(d) = e.detail() {
        m.push_str(": ");
        m.push_str(d);
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        m.push_str(&format!(" ({s})"));
        src = s.source();
    }
    m
}

/// The columns that identify a row of `t` (what `silt diff` keys by when not told): a model's
/// unique_key (with `valid_from` for an SCD2 history, which holds one row per key and
/// version), a source's primary_key; none for other tables or a dag that does not load.
pub fn row_key(project: &Project, t: &TableRef) -> Vec<String> {
    match t.layer {
        Layer::Bronze => project
            .sources
            .get(&t.name)
            .map(|s| s.primary_key.clone())
            .unwrap_or_default(),
        Layer::Silver | Layer::Gold => Dag::load(project)
            .ok()
            .and_then(|d| {
                d.models.get(&t.name).map(|m| {
                    let mut k = m.config.unique_key.clone();
                    if m.config.materialized == Materialized::Snapshot {
                        k.push("valid_from".into());
                    }
                    k
                })
            })
            .unwrap_or_default(),
        _ => vec![],
    }
}

/// The dag as text: a tree per root, or mermaid / dot / json.
pub fn render_dag(dag: &Dag, format: &str) -> Result<String> {
    let mut out = String::new();
    match format {
        "mermaid" => {
            out.push_str("graph LR\n");
            for m in dag.order.iter().map(|n| &dag.models[n]) {
                for s in &m.sources {
                    out.push_str(&format!("  bronze.{s} --> {}\n", m.table()));
                }
                for r in &m.refs {
                    out.push_str(&format!("  {} --> {}\n", dag.models[r].table(), m.table()));
                }
            }
        }
        "dot" => {
            out.push_str("digraph silt {\n  rankdir=LR;\n");
            for m in dag.order.iter().map(|n| &dag.models[n]) {
                out.push_str(&format!("  \"{}\";\n", m.table()));
                for s in &m.sources {
                    out.push_str(&format!("  \"bronze.{s}\" -> \"{}\";\n", m.table()));
                }
                for r in &m.refs {
                    out.push_str(&format!(
                        "  \"{}\" -> \"{}\";\n",
                        dag.models[r].table(),
                        m.table()
                    ));
                }
            }
            out.push_str("}\n");
        }
        "json" => {
            let v: Vec<&Model> = dag.order.iter().map(|n| &dag.models[n]).collect();
            out = serde_json::to_string_pretty(&v)?;
            out.push('\n');
        }
        _ => {
            // A tree from each source down through the models reading it.
            let mut sources: BTreeSet<&String> = BTreeSet::new();
            for m in dag.models.values() {
                sources.extend(m.sources.iter());
            }
            // `├─` for a node with siblings after it, `└─` for the last; the lines below a
            // node carry `│` while siblings follow.
            fn walk(dag: &Dag, name: &str, prefix: &str, last: bool, out: &mut String) {
                let m = &dag.models[name];
                out.push_str(&format!(
                    "{prefix}{} {} [{}]\n",
                    if last { "└─" } else { "├─" },
                    m.table(),
                    serde_json::to_value(m.config.materialized)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default()
                ));
                let kids: Vec<&String> = dag
                    .order
                    .iter()
                    .filter(|d| dag.models[*d].refs.contains(name))
                    .collect();
                let below = format!("{prefix}{}", if last { "   " } else { "│  " });
                for (i, d) in kids.iter().enumerate() {
                    walk(dag, d, &below, i + 1 == kids.len(), out);
                }
            }
            for s in sources {
                out.push_str(&format!("bronze.{s}\n"));
                let roots: Vec<&String> = dag
                    .order
                    .iter()
                    .filter(|n| dag.models[*n].sources.contains(s))
                    .collect();
                for (i, m) in roots.iter().enumerate() {
                    walk(dag, m, "", i + 1 == roots.len(), &mut out);
                }
            }
        }
    }
    Ok(out)
}

/// The `.sql` files of a folder, sorted (none when it does not exist).
fn sql_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut ps: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    ps.sort();
    ps
}

fn file_stem(p: &Path) -> String {
    p.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string()
}

/// What a template may name: the models (by layer), the sources and the project's vars.
struct Names {
    models: Arc<BTreeMap<String, Layer>>,
    sources: Arc<BTreeSet<String>>,
    vars: Arc<BTreeMap<String, toml::Value>>,
}

impl Names {
    /// Render `template` (named `this`), capturing its config, refs and sources.
    fn render(
        &self,
        this: String,
        ctx: RenderContext,
        template: &str,
        rel: &str,
    ) -> Result<(String, Captured)> {
        let cap = Arc::new(Mutex::new(Captured::default()));
        let env = env_for(
            this,
            ctx,
            cap.clone(),
            self.models.clone(),
            self.sources.clone(),
            self.vars.clone(),
            config_newlines(template),
        );
        let sql = env
            .render_str(template, ())
            .map_err(|e| Error::config(rel, jinja_message(&e)))?;
        let captured = std::mem::take(&mut *cap.lock().unwrap());
        Ok((sql, captured))
    }

    /// The model in file `p` of `layer`: its template rendered both ways, so refs inside
    /// `{% if is_incremental() %}` count too.
    fn model(&self, project: &Project, layer: Layer, p: &Path) -> Result<Model> {
        let name = file_stem(p);
        let rel = rel_path(&project.dir, p);
        let template =
            std::fs::read_to_string(p).map_err(|e| Error::config(&rel, e.to_string()))?;
        let mut config = None;
        let mut refs = BTreeSet::new();
        let mut srcs = BTreeSet::new();
        for incremental in [false, true] {
            let this = TableRef::new(layer, name.clone()).to_string();
            let ctx = RenderContext {
                incremental,
                ..Default::default()
            };
            let (_, mut c) = self.render(this, ctx, &template, &rel)?;
            if config.is_none() {
                config = c.config.take();
            }
            refs.extend(std::mem::take(&mut c.refs));
            srcs.extend(std::mem::take(&mut c.sources));
        }
        let config = match config {
            None => ModelConfig::default(),
            Some(Ok(c)) => c,
            Some(Err(m)) => return Err(Error::config(&rel, m)),
        };
        if refs.contains(&name) {
            return Err(Error::config(
                &rel,
                format!("model '{name}' refs itself: use {{{{ this }}}} for the model's own table"),
            ));
        }
        Ok(Model {
            name,
            layer,
            file: rel,
            template,
            config,
            refs,
            sources: srcs,
        })
    }

    /// The singular test in file `p` (sql/tests/): its SQL, what it reads, its severity.
    fn singular_test(&self, project: &Project, p: &Path) -> Result<SingularTest> {
        let rel = rel_path(&project.dir, p);
        let name = file_stem(p);
        let template =
            std::fs::read_to_string(p).map_err(|e| Error::config(&rel, e.to_string()))?;
        let (sql, mut c) = self.render(
            format!("test.{name}"),
            RenderContext::default(),
            &template,
            &rel,
        )?;
        let severity = match c.config.take() {
            Some(Ok(cfg)) => cfg.severity,
            Some(Err(m)) => return Err(Error::config(&rel, m)),
            None => crate::build::quality::Severity::Error,
        };
        Ok(SingularTest {
            name,
            file: rel,
            sql: sql.trim().trim_end_matches(';').to_string(),
            refs: std::mem::take(&mut c.refs),
            sources: std::mem::take(&mut c.sources),
            severity,
        })
    }
}
