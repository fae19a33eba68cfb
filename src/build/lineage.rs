//! Column lineage, read from DataFusion's optimized logical plans: for every model, each output
//! column → the upstream columns it is computed from and how (copied, transformed, aggregated,
//! or used only as a filter, join or grouping key), and the PII-flow check built on it. Models
//! are planned against empty tables of the schemas their upstream would have (sources from their
//! contracts, models from the plans before them), so lineage needs no lake and reads no data.
//! It must not build models nor read their data (`lake/meta/lineage.rs` keeps the stored rows).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{MemorySchemaProvider, SchemaProvider};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema, TableReference};
use datafusion::datasource::empty::EmptyTable;
use datafusion::logical_expr::utils::grouping_set_to_exprlist;
use datafusion::logical_expr::{Aggregate, Distinct, Expr, LogicalPlan};
use datafusion::prelude::{SessionConfig, SessionContext};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::build::models::{Dag, Materialized, Model, RenderContext};
use crate::error::{Error, Result};
use crate::lake::catalog::{Layer, TableRef};
use crate::project::config::{Project, Pseudonym};

/// How an output column uses an upstream column.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    strum::Display,
    strum::EnumString,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Kind {
    /// The value as it was (renamed at most).
    Copied,
    /// Computed from it row by row (an expression, a cast, a CASE, a pseudonym).
    Transformed,
    /// Computed from it over many rows (an aggregate or a window function).
    Aggregated,
    /// Not in the value: it decides which rows there are (a filter, join or grouping key).
    Filter,
}

/// One upstream column of an output column.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Dep {
    /// `layer.name`
    pub table: String,
    pub column: String,
    pub kind: Kind,
}

impl Dep {
    pub fn id(&self) -> String {
        format!("{}.{}", self.table, self.column)
    }
}

/// An output column of a model, or a column of a source's bronze table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnLineage {
    pub name: String,
    pub data_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Declared PII (a source's `pii`, a model's `config(pii=…)`).
    pub pii: bool,
    /// `hash`, `mask` (the model's `pseudonymize`) or `digest` (an SCD2 row hash).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pseudonymized: Option<String>,
    /// Direct upstream columns (one model hop), data first, then filter and key columns.
    pub deps: Vec<Dep>,
    /// Identifies how the column is computed (expressions, inputs, row set): a change to the
    /// model's SQL that changes this column changes its signature.
    pub sig: String,
    /// A source column: the field of the landing files it is read from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub landing_field: Option<String>,
}

/// The columns of one table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableLineage {
    /// `layer.name`
    pub table: String,
    /// `source` or the model's materialization.
    pub kind: String,
    /// Project-relative file declaring it.
    pub file: String,
    /// A source's landing glob.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub landing: Option<String>,
    pub columns: Vec<ColumnLineage>,
    /// Set when the model could not be planned (its build reports the same error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The lineage of a whole project, tables in dag order (sources first).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Lineage {
    pub tables: Vec<TableLineage>,
}

/// A model column computed from PII that is neither pseudonymized nor declared PII.
#[derive(Debug, Clone, Serialize)]
pub struct PiiLeak {
    pub table: String,
    pub column: String,
    pub file: String,
    /// `gold.x.y`, `silver.z.w`, …, `bronze.clients.email`: the column back to the source.
    pub path: Vec<String>,
}

impl PiiLeak {
    pub fn path_text(&self) -> String {
        self.path.join(" ← ")
    }

    /// The message a build fails with.
    pub fn message(&self) -> String {
        format!(
            "column '{}' carries personal data unprotected: {}; pseudonymize it (pseudonymize={{'{}': 'hash'}}) or declare it PII (pii=['{}']) in the model's config",
            self.column,
            self.path_text(),
            self.column,
            self.column
        )
    }
}

impl Lineage {
    pub fn table(&self, t: &str) -> Option<&TableLineage> {
        self.tables.iter().find(|x| x.table == t)
    }

    pub fn column(&self, id: &str) -> Option<(&TableLineage, &ColumnLineage)> {
        let (t, c) = split_id(id)?;
        let table = self.table(t)?;
        table
            .columns
            .iter()
            .find(|x| x.name == c)
            .map(|c| (table, c))
    }

    /// Every column that lists `id` among its direct upstream columns, with the kind.
    pub fn readers_of(&self, id: &str) -> Vec<(String, Kind)> {
        let mut out = Vec::new();
        for t in &self.tables {
            for c in &t.columns {
                if let Some(d) = c.deps.iter().find(|d| d.id() == id) {
                    out.push((format!("{}.{}", t.table, c.name), d.kind));
                }
            }
        }
        out
    }

    /// Model columns computed (not only filtered) from PII that reach the output raw.
    pub fn pii_leaks(&self) -> Vec<PiiLeak> {
        // Raw PII column → the path back to the source column it carries.
        let mut raw: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut leaks = Vec::new();
        for t in &self.tables {
            for c in &t.columns {
                let id = format!("{}.{}", t.table, c.name);
                if t.kind == "source" {
                    if c.pii {
                        raw.insert(id.clone(), vec![id]);
                    }
                    continue;
                }
                if c.pseudonymized.is_some() {
                    continue;
                }
                let from = c
                    .deps
                    .iter()
                    .filter(|d| d.kind != Kind::Filter)
                    .find_map(|d| raw.get(&d.id()));
                match from {
                    Some(p) => {
                        let mut path = vec![id.clone()];
                        path.extend(p.iter().cloned());
                        if c.pii {
                            raw.insert(id, path);
                        } else {
                            leaks.push(PiiLeak {
                                table: t.table.clone(),
                                column: c.name.clone(),
                                file: t.file.clone(),
                                path,
                            });
                        }
                    }
                    None if c.pii => {
                        raw.insert(id.clone(), vec![id]);
                    }
                    None => {}
                }
            }
        }
        leaks
    }

    /// A hash of everything the lineage says (for "has it changed since it was stored").
    pub fn model_hash(t: &TableLineage) -> String {
        short_hash(&serde_json::to_string(t).unwrap_or_default())
    }
}

/// `layer.table.column` → (`layer.table`, `column`).
pub fn split_id(id: &str) -> Option<(&str, &str)> {
    let first = id.find('.')?;
    let second = id[first + 1..].find('.')? + first + 1;
    Some((&id[..second], &id[second + 1..]))
}

fn short_hash(s: &str) -> String {
    hex::encode(&Sha256::digest(s.as_bytes())[..8])
}

fn h(parts: &[&str]) -> String {
    short_hash(&parts.join("\u{1}"))
}

/// The column set of one plan node's output.
#[derive(Debug, Clone, Default)]
struct Col {
    deps: BTreeMap<(String, String), Kind>,
    sig: String,
}

#[derive(Debug, Clone, Default)]
struct Node {
    cols: Vec<Col>,
    /// Upstream columns that decide which rows there are.
    rows: BTreeSet<(String, String)>,
    rows_sig: String,
}

struct Input<'a> {
    schema: &'a DFSchema,
    node: &'a Node,
}

fn merge(into: &mut BTreeMap<(String, String), Kind>, id: &(String, String), k: Kind) {
    into.entry(id.clone())
        .and_modify(|x| *x = (*x).max(k))
        .or_insert(k);
}

fn resolve<'a>(c: &Column, inputs: &'a [Input<'a>]) -> Option<&'a Col> {
    for i in inputs {
        if let Some(idx) = i.schema.maybe_index_of_column(c) {
            return i.node.cols.get(idx);
        }
    }
    // An unqualified reference to a qualified column.
    for i in inputs {
        if let Some((idx, _)) = i
            .schema
            .iter()
            .enumerate()
            .find(|(_, (_, f))| f.name() == &c.name)
        {
            return i.node.cols.get(idx);
        }
    }
    None
}

/// Copied for a (renamed) column, aggregated for anything with an aggregate or window
/// function, transformed otherwise.
fn expr_kind(e: &Expr) -> Kind {
    let mut inner = e;
    while let Expr::Alias(a) = inner {
        inner = &a.expr;
    }
    if matches!(inner, Expr::Column(_)) {
        return Kind::Copied;
    }
    let windowed = inner
        .exists(|x| {
            Ok(matches!(
                x,
                Expr::AggregateFunction(_) | Expr::WindowFunction(_)
            ))
        })
        .unwrap_or(false);
    if windowed {
        Kind::Aggregated
    } else {
        Kind::Transformed
    }
}

/// The subquery plans inside an expression.
fn subqueries(e: &Expr) -> Vec<Arc<LogicalPlan>> {
    let mut out = Vec::new();
    let _ = e.apply(|x| {
        match x {
            Expr::ScalarSubquery(s) => out.push(s.subquery.clone()),
            Expr::Exists(s) => out.push(s.subquery.subquery.clone()),
            Expr::InSubquery(s) => out.push(s.subquery.subquery.clone()),
            _ => {}
        }
        Ok(TreeNodeRecursion::Continue)
    });
    out
}

/// The expression with each column replaced by its signature, as text.
fn canonical(e: &Expr, inputs: &[Input]) -> String {
    e.clone()
        .transform_up(|x| {
            Ok(match x {
                Expr::Column(c) => {
                    let sig = resolve(&c, inputs)
                        .map(|col| col.sig.clone())
                        .unwrap_or_else(|| c.name.clone());
                    Transformed::yes(Expr::Column(Column::new_unqualified(format!("#{sig}"))))
                }
                other => Transformed::no(other),
            })
        })
        .map(|t| t.data.to_string())
        .unwrap_or_else(|_| e.to_string())
}

fn table_id(t: &TableReference) -> String {
    match t.schema() {
        Some(s) => format!("{s}.{}", t.table()),
        None => t.table().to_string(),
    }
}

struct Walker;

impl Walker {
    fn expr_col(&self, e: &Expr, inputs: &[Input]) -> Result<Col> {
        let kind = expr_kind(e);
        let mut deps = BTreeMap::new();
        for c in e.column_refs() {
            if let Some(col) = resolve(c, inputs) {
                for (id, k) in &col.deps {
                    merge(&mut deps, id, (*k).max(kind));
                }
            }
        }
        let mut sub_sigs = Vec::new();
        for sq in subqueries(e) {
            let n = self.node(&sq)?;
            for c in &n.cols {
                for id in c.deps.keys() {
                    merge(&mut deps, id, Kind::Transformed.max(kind));
                }
                sub_sigs.push(c.sig.clone());
            }
            sub_sigs.push(n.rows_sig.clone());
        }
        Ok(Col {
            deps,
            sig: h(&["expr", &canonical(e, inputs), &sub_sigs.join(",")]),
        })
    }

    /// The upstream columns behind the columns an expression reads (and its subqueries').
    fn row_deps(&self, e: &Expr, inputs: &[Input]) -> Result<BTreeSet<(String, String)>> {
        let mut out = BTreeSet::new();
        for c in e.column_refs() {
            if let Some(col) = resolve(c, inputs) {
                out.extend(col.deps.keys().cloned());
            }
        }
        for sq in subqueries(e) {
            let n = self.node(&sq)?;
            for c in &n.cols {
                out.extend(c.deps.keys().cloned());
            }
            out.extend(n.rows);
        }
        Ok(out)
    }

    fn exprs_sig(&self, es: &[&Expr], inputs: &[Input]) -> String {
        es.iter()
            .map(|e| canonical(e, inputs))
            .collect::<Vec<_>>()
            .join(";")
    }

    /// Output columns that are input columns, found by (qualified) name; a column no input
    /// has is computed from every input column.
    fn by_name(&self, out: &DFSchema, inputs: &[Input]) -> Vec<Col> {
        out.iter()
            .map(|(q, f)| {
                let c = Column::new(q.cloned(), f.name());
                match resolve(&c, inputs) {
                    Some(col) => col.clone(),
                    None => {
                        let mut deps = BTreeMap::new();
                        let mut sigs = vec![f.name().to_string()];
                        for i in inputs {
                            for col in &i.node.cols {
                                for id in col.deps.keys() {
                                    merge(&mut deps, id, Kind::Transformed);
                                }
                                sigs.push(col.sig.clone());
                            }
                        }
                        Col {
                            deps,
                            sig: h(&sigs.iter().map(String::as_str).collect::<Vec<_>>()),
                        }
                    }
                }
            })
            .collect()
    }

    fn node(&self, plan: &LogicalPlan) -> Result<Node> {
        Ok(match plan {
            LogicalPlan::TableScan(s) => {
                let table = table_id(&s.table_name);
                let cols = s
                    .projected_schema
                    .fields()
                    .iter()
                    .map(|f| Col {
                        deps: BTreeMap::from([((table.clone(), f.name().clone()), Kind::Copied)]),
                        sig: h(&["scan", &table, f.name()]),
                    })
                    .collect();
                let mut rows = BTreeSet::new();
                for e in &s.filters {
                    for c in e.column_refs() {
                        rows.insert((table.clone(), c.name.clone()));
                    }
                }
                let filters: Vec<String> = s.filters.iter().map(|e| e.to_string()).collect();
                let fetch = s.fetch.map(|f| f.to_string()).unwrap_or_default();
                Node {
                    cols,
                    rows,
                    rows_sig: h(&["scan", &table, &filters.join(";"), &fetch]),
                }
            }
            LogicalPlan::Projection(p) => {
                let inp = self.node(&p.input)?;
                let inputs = [Input {
                    schema: p.input.schema(),
                    node: &inp,
                }];
                let mut rows = inp.rows.clone();
                let mut cols = Vec::with_capacity(p.expr.len());
                for e in &p.expr {
                    cols.push(self.expr_col(e, &inputs)?);
                    for sq in subqueries(e) {
                        rows.extend(self.node(&sq)?.rows);
                    }
                }
                Node {
                    cols,
                    rows,
                    rows_sig: inp.rows_sig.clone(),
                }
            }
            LogicalPlan::Filter(f) => {
                let inp = self.node(&f.input)?;
                let inputs = [Input {
                    schema: f.input.schema(),
                    node: &inp,
                }];
                let mut rows = inp.rows.clone();
                rows.extend(self.row_deps(&f.predicate, &inputs)?);
                let sig = h(&["filter", &canonical(&f.predicate, &inputs), &inp.rows_sig]);
                Node {
                    cols: inp.cols.clone(),
                    rows,
                    rows_sig: sig,
                }
            }
            LogicalPlan::Window(w) => {
                let inp = self.node(&w.input)?;
                let inputs = [Input {
                    schema: w.input.schema(),
                    node: &inp,
                }];
                let mut cols = inp.cols.clone();
                for e in &w.window_expr {
                    cols.push(self.expr_col(e, &inputs)?);
                }
                Node {
                    cols,
                    rows: inp.rows.clone(),
                    rows_sig: inp.rows_sig.clone(),
                }
            }
            LogicalPlan::Aggregate(a) => self.aggregate(a)?,
            LogicalPlan::Join(j) => {
                let l = self.node(&j.left)?;
                let r = self.node(&j.right)?;
                let inputs = [
                    Input {
                        schema: j.left.schema(),
                        node: &l,
                    },
                    Input {
                        schema: j.right.schema(),
                        node: &r,
                    },
                ];
                let mut rows: BTreeSet<_> = l.rows.union(&r.rows).cloned().collect();
                let mut on = Vec::new();
                for (a, b) in &j.on {
                    rows.extend(self.row_deps(a, &inputs)?);
                    rows.extend(self.row_deps(b, &inputs)?);
                    on.push(format!(
                        "{}={}",
                        canonical(a, &inputs),
                        canonical(b, &inputs)
                    ));
                }
                if let Some(f) = &j.filter {
                    rows.extend(self.row_deps(f, &inputs)?);
                    on.push(canonical(f, &inputs));
                }
                let cols = self.by_name(&j.schema, &inputs);
                Node {
                    cols,
                    rows,
                    rows_sig: h(&[
                        "join",
                        &j.join_type.to_string(),
                        &on.join(";"),
                        &l.rows_sig,
                        &r.rows_sig,
                    ]),
                }
            }
            LogicalPlan::Union(u) => {
                let nodes = u
                    .inputs
                    .iter()
                    .map(|i| self.node(i))
                    .collect::<Result<Vec<_>>>()?;
                let n = u.schema.fields().len();
                let mut cols = vec![Col::default(); n];
                let mut rows = BTreeSet::new();
                for (i, col) in cols.iter_mut().enumerate() {
                    let mut sigs = vec!["union".to_string()];
                    for node in &nodes {
                        if let Some(c) = node.cols.get(i) {
                            for (id, k) in &c.deps {
                                merge(&mut col.deps, id, *k);
                            }
                            sigs.push(c.sig.clone());
                        }
                    }
                    col.sig = h(&sigs.iter().map(String::as_str).collect::<Vec<_>>());
                }
                let mut sigs = vec!["union"];
                for node in &nodes {
                    rows.extend(node.rows.iter().cloned());
                    sigs.push(&node.rows_sig);
                }
                Node {
                    cols,
                    rows,
                    rows_sig: h(&sigs),
                }
            }
            LogicalPlan::SubqueryAlias(s) => self.node(&s.input)?,
            LogicalPlan::Subquery(s) => self.node(&s.subquery)?,
            LogicalPlan::Repartition(r) => self.node(&r.input)?,
            LogicalPlan::Sort(s) => {
                let inp = self.node(&s.input)?;
                match s.fetch {
                    // ORDER BY … LIMIT n: the order decides which rows there are.
                    Some(fetch) => {
                        let inputs = [Input {
                            schema: s.input.schema(),
                            node: &inp,
                        }];
                        let mut rows = inp.rows.clone();
                        let mut es = Vec::new();
                        for e in &s.expr {
                            rows.extend(self.row_deps(&e.expr, &inputs)?);
                            es.push(format!("{} {}", canonical(&e.expr, &inputs), e.asc));
                        }
                        Node {
                            cols: inp.cols.clone(),
                            rows,
                            rows_sig: h(&[
                                "topk",
                                &es.join(";"),
                                &fetch.to_string(),
                                &inp.rows_sig,
                            ]),
                        }
                    }
                    None => inp,
                }
            }
            LogicalPlan::Limit(l) => {
                let inp = self.node(&l.input)?;
                let sig = h(&[
                    "limit",
                    &format!("{:?}", l.skip),
                    &format!("{:?}", l.fetch),
                    &inp.rows_sig,
                ]);
                Node {
                    rows_sig: sig,
                    ..inp
                }
            }
            LogicalPlan::Distinct(Distinct::All(i)) => {
                let inp = self.node(i)?;
                let sig = h(&["distinct", &inp.rows_sig]);
                Node {
                    rows_sig: sig,
                    ..inp
                }
            }
            LogicalPlan::Distinct(Distinct::On(d)) => {
                let inp = self.node(&d.input)?;
                let inputs = [Input {
                    schema: d.input.schema(),
                    node: &inp,
                }];
                let mut rows = inp.rows.clone();
                for e in &d.on_expr {
                    rows.extend(self.row_deps(e, &inputs)?);
                }
                let cols = d
                    .select_expr
                    .iter()
                    .map(|e| self.expr_col(e, &inputs))
                    .collect::<Result<Vec<_>>>()?;
                let on: Vec<&Expr> = d.on_expr.iter().collect();
                Node {
                    cols,
                    rows,
                    rows_sig: h(&["distinct on", &self.exprs_sig(&on, &inputs), &inp.rows_sig]),
                }
            }
            LogicalPlan::EmptyRelation(_) | LogicalPlan::Values(_) => Node {
                cols: plan
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| Col {
                        deps: BTreeMap::new(),
                        sig: h(&["const", f.name()]),
                    })
                    .collect(),
                rows: BTreeSet::new(),
                rows_sig: h(&["const", &plan.display().to_string()]),
            },
            other => {
                // Unnest, recursive queries, extensions: columns kept by name, the others
                // computed from every input column.
                let nodes = other
                    .inputs()
                    .into_iter()
                    .map(|i| Ok((i.schema().as_ref(), self.node(i)?)))
                    .collect::<Result<Vec<_>>>()?;
                let inputs: Vec<Input> = nodes
                    .iter()
                    .map(|(s, n)| Input { schema: s, node: n })
                    .collect();
                let mut rows = BTreeSet::new();
                let mut sigs = vec![other.display().to_string()];
                for (_, n) in &nodes {
                    rows.extend(n.rows.iter().cloned());
                    sigs.push(n.rows_sig.clone());
                }
                for e in other.expressions() {
                    rows.extend(self.row_deps(&e, &inputs)?);
                }
                Node {
                    cols: self.by_name(other.schema(), &inputs),
                    rows,
                    rows_sig: h(&sigs.iter().map(String::as_str).collect::<Vec<_>>()),
                }
            }
        })
    }

    fn aggregate(&self, a: &Aggregate) -> Result<Node> {
        let inp = self.node(&a.input)?;
        let inputs = [Input {
            schema: a.input.schema(),
            node: &inp,
        }];
        let groups = grouping_set_to_exprlist(&a.group_expr)
            .map_err(|e| Error::Internal(format!("lineage: {e}")))?;
        let mut rows = inp.rows.clone();
        for g in &groups {
            rows.extend(self.row_deps(g, &inputs)?);
        }
        let mut exprs = groups.iter().copied();
        let mut aggrs = a.aggr_expr.iter();
        let mut cols = Vec::with_capacity(a.schema.fields().len());
        for f in a.schema.fields() {
            if f.name() == Aggregate::INTERNAL_GROUPING_ID {
                cols.push(Col {
                    deps: BTreeMap::new(),
                    sig: h(&["grouping id"]),
                });
                continue;
            }
            let e = match exprs.next() {
                Some(e) => e,
                None => match aggrs.next() {
                    Some(e) => e,
                    None => break,
                },
            };
            cols.push(self.expr_col(e, &inputs)?);
        }
        let sig = h(&[
            "aggregate",
            &self.exprs_sig(&groups, &inputs),
            &inp.rows_sig,
        ]);
        Ok(Node {
            cols,
            rows,
            rows_sig: sig,
        })
    }
}

/// The lineage of every source and model of the project (sources first, models in dag order).
/// A model that cannot be planned gets an `error` and no columns; the build reports it.
pub async fn compute(project: &Project, dag: &Dag) -> Result<Lineage> {
    let config = SessionConfig::new()
        .with_information_schema(false)
        .with_default_catalog_and_schema("datafusion", "public")
        .with_target_partitions(1);
    let state = datafusion::execution::SessionStateBuilder::new()
        .with_default_features()
        .with_config(config)
        .with_optimizer_rule(Arc::new(
            crate::lake::distinct::UnaliasDistinctAggregatesRule,
        ))
        .build();
    let ctx = SessionContext::new_with_state(state);
    // The pseudonym functions exist in build sessions; a model may call them itself.
    crate::build::pseudonym::register_for_planning(&ctx);
    let catalog = ctx
        .catalog("datafusion")
        .ok_or_else(|| Error::Internal("DataFusion has no default catalog".into()))?;
    let mut schemas: BTreeMap<Layer, Arc<MemorySchemaProvider>> = BTreeMap::new();
    for layer in [Layer::Bronze, Layer::Quarantine, Layer::Silver, Layer::Gold] {
        let s = Arc::new(MemorySchemaProvider::new());
        catalog.register_schema(layer.schema_name(), s.clone())?;
        schemas.insert(layer, s);
    }
    let mut out = Lineage::default();
    for src in project.sources.values() {
        let schema = crate::ingest::bronze_schema_of(src);
        schemas[&Layer::Bronze]
            .register_table(src.name.clone(), Arc::new(EmptyTable::new(schema.clone())))?;
        schemas[&Layer::Quarantine].register_table(
            src.name.clone(),
            Arc::new(EmptyTable::new(crate::ingest::quarantine_schema())),
        )?;
        let t = TableRef::bronze(&src.name).to_string();
        let columns = schema
            .fields()
            .iter()
            .map(|f| {
                let decl = src.columns.iter().find(|c| &c.name == f.name());
                let landing_field = match decl {
                    Some(c) => Some(c.source.clone()),
                    None => src
                        .partition
                        .as_ref()
                        .filter(|p| p.column_name() == *f.name())
                        .map(|p| format!("{} (its period)", p.source_column)),
                };
                ColumnLineage {
                    name: f.name().clone(),
                    data_type: f.data_type().to_string(),
                    description: decl.and_then(|c| c.description.clone()),
                    pii: src.pii.contains(f.name()),
                    pseudonymized: None,
                    deps: match &src.partition {
                        Some(p) if p.column_name() == *f.name() => vec![Dep {
                            table: t.clone(),
                            column: p.source_column.clone(),
                            kind: Kind::Transformed,
                        }],
                        _ => vec![],
                    },
                    sig: h(&["source", &t, f.name(), &f.data_type().to_string()]),
                    landing_field,
                }
            })
            .collect();
        out.tables.push(TableLineage {
            table: t,
            kind: "source".into(),
            file: src.file.clone(),
            landing: Some(src.glob_text.clone()),
            columns,
            error: None,
        });
    }
    for name in &dag.order {
        let m = &dag.models[name];
        let (table, schema) = match model(&ctx, dag, m).await {
            Ok(x) => x,
            Err(e) => {
                out.tables.push(TableLineage {
                    table: m.table().to_string(),
                    kind: crate::build::materialize::materialized_name(m),
                    file: m.file.clone(),
                    landing: None,
                    columns: vec![],
                    error: Some(e.to_string()),
                });
                continue;
            }
        };
        schemas[&m.layer].register_table(m.name.clone(), Arc::new(EmptyTable::new(schema)))?;
        out.tables.push(table);
    }
    Ok(out)
}

/// One model's lineage and the schema of the table it writes.
async fn model(ctx: &SessionContext, dag: &Dag, m: &Model) -> Result<(TableLineage, SchemaRef)> {
    let sql = dag.render(
        m,
        RenderContext {
            incremental: false,
            relations: BTreeMap::new(),
        },
    )?;
    let df = ctx
        .sql(&sql)
        .await
        .map_err(|e| dag.locate(m, &sql, Error::Sql(e.to_string())))?;
    let plan = df
        .into_optimized_plan()
        .map_err(|e| dag.locate(m, &sql, Error::Sql(e.to_string())))?;
    let root = Walker.node(&plan)?;
    let cfg = &m.config;
    let mut fields: Vec<Field> = Vec::new();
    let mut cols: Vec<(String, Col)> = Vec::new();
    for ((_, f), col) in plan.schema().iter().zip(root.cols.iter()) {
        let mut col = col.clone();
        let mut field = f.as_ref().clone();
        if let Some(p) = cfg.pseudonymize.get(f.name()) {
            for k in col.deps.values_mut() {
                *k = (*k).max(Kind::Transformed);
            }
            col.sig = h(&[&col.sig, &format!("{p:?}")]);
            field = Field::new(f.name(), DataType::Utf8, true);
        }
        fields.push(field);
        cols.push((f.name().clone(), col));
    }
    let mut digests: BTreeSet<String> = BTreeSet::new();
    if cfg.materialized == Materialized::Snapshot {
        // The history's columns (materialize/snapshot.rs): a digest of the tracked columns,
        // the version's validity from updated_at, per key.
        let of = |names: &[String], kind: Kind| -> Col {
            let mut deps = BTreeMap::new();
            let mut sigs = Vec::new();
            for (n, c) in &cols {
                if names.contains(n) {
                    for (id, k) in &c.deps {
                        merge(&mut deps, id, (*k).max(kind));
                    }
                    sigs.push(c.sig.clone());
                }
            }
            Col {
                deps,
                sig: h(&sigs.iter().map(String::as_str).collect::<Vec<_>>()),
            }
        };
        let tracked: Vec<String> = if cfg.check_cols.is_empty() {
            cols.iter()
                .map(|(n, _)| n.clone())
                .filter(|c| {
                    !cfg.unique_key.contains(c)
                        && Some(c) != cfg.updated_at.as_ref()
                        && !c.starts_with('_')
                })
                .collect()
        } else {
            cfg.check_cols.clone()
        };
        let updated: Vec<String> = cfg.updated_at.iter().cloned().collect();
        let mut keyed = updated.clone();
        keyed.extend(cfg.unique_key.iter().cloned());
        let vt_type = cfg
            .updated_at
            .as_ref()
            .and_then(|u| fields.iter().find(|f| f.name() == u))
            .map(|f| f.data_type().clone())
            .unwrap_or(DataType::Timestamp(
                TimeUnit::Microsecond,
                Some("UTC".into()),
            ));
        let extra = [
            ("_scd_hash", of(&tracked, Kind::Transformed), DataType::Utf8),
            ("valid_from", of(&updated, Kind::Copied), vt_type.clone()),
            ("valid_to", of(&keyed, Kind::Aggregated), vt_type),
            (
                "is_current",
                of(&keyed, Kind::Aggregated),
                DataType::Boolean,
            ),
        ];
        for (n, c, t) in extra {
            fields.push(Field::new(n, t, true));
            cols.push((n.to_string(), c));
        }
        digests.insert("_scd_hash".into());
    }
    let table = m.table().to_string();
    let columns = cols
        .into_iter()
        .zip(fields.iter())
        .map(|((name, col), f)| {
            let mut deps: Vec<Dep> = col
                .deps
                .iter()
                .map(|((t, c), k)| Dep {
                    table: t.clone(),
                    column: c.clone(),
                    kind: *k,
                })
                .collect();
            for (t, c) in &root.rows {
                if !col.deps.contains_key(&(t.clone(), c.clone())) {
                    deps.push(Dep {
                        table: t.clone(),
                        column: c.clone(),
                        kind: Kind::Filter,
                    });
                }
            }
            let pseudonymized = match cfg.pseudonymize.get(&name) {
                Some(Pseudonym::Hash) => Some("hash".to_string()),
                Some(Pseudonym::Mask) => Some("mask".to_string()),
                None if digests.contains(&name) => Some("digest".to_string()),
                None => None,
            };
            ColumnLineage {
                pii: cfg.pii.contains(&name),
                description: cfg.columns.get(&name).cloned(),
                data_type: f.data_type().to_string(),
                sig: h(&[&col.sig, &root.rows_sig]),
                name,
                pseudonymized,
                deps,
                landing_field: None,
            }
        })
        .collect();
    Ok((
        TableLineage {
            table,
            kind: crate::build::materialize::materialized_name(m),
            file: m.file.clone(),
            landing: None,
            columns,
            error: None,
        },
        Arc::new(Schema::new(fields)),
    ))
}

/// The PII check of a build: the first leak as a configuration error naming the path.
pub fn check_pii(lineage: &Lineage) -> Result<()> {
    match lineage.pii_leaks().into_iter().next() {
        Some(l) => Err(Error::config(&l.file, l.message())),
        None => Ok(()),
    }
}

/// Store the tables whose lineage changed since the newest stored (`_silt.lineage`).
pub async fn store(
    catalog: &crate::lake::catalog::Catalog,
    run_id: &str,
    lineage: &Lineage,
) -> Result<usize> {
    let rows = lineage
        .tables
        .iter()
        .filter(|t| t.error.is_none())
        .map(|t| {
            (
                t.table.clone(),
                Lineage::model_hash(t),
                serde_json::to_string(t).unwrap_or_default(),
            )
        })
        .collect();
    crate::lake::meta::lineage::record(catalog, run_id, rows).await
}

/// The lineage stored as of `at` (microseconds; `None`: the newest), sources first.
pub async fn stored(catalog: &crate::lake::catalog::Catalog, at: Option<i64>) -> Result<Lineage> {
    from_rows(crate::lake::meta::lineage::as_of(catalog, at).await?)
}

/// The lineage as run `run_id` (started at `started_at`) left it, sources first.
pub async fn stored_at_run(
    catalog: &crate::lake::catalog::Catalog,
    run_id: &str,
    started_at: i64,
) -> Result<Lineage> {
    from_rows(crate::lake::meta::lineage::as_of_run(catalog, run_id, started_at).await?)
}

fn from_rows(rows: Vec<crate::lake::meta::lineage::LineageRow>) -> Result<Lineage> {
    let mut tables: Vec<TableLineage> = rows
        .into_iter()
        .map(|r| {
            serde_json::from_str(&r.lineage)
                .map_err(|e| Error::Internal(format!("_silt.lineage {}: {e}", r.table_name)))
        })
        .collect::<Result<_>>()?;
    tables.sort_by_key(|t| {
        (
            match t.table.split('.').next() {
                Some("bronze") => 0,
                Some("silver") => 1,
                _ => 2,
            },
            t.table.clone(),
        )
    });
    Ok(Lineage { tables })
}
