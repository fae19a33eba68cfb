//! The cheap "latest row per key": `row_number() over (partition by K order by O) … where
//! rn = 1` planned so that it costs a grouped count, not a sort of every row.
//!
//! DataFusion runs that pattern as a sort on (K, O) of the whole input and a window operator
//! with one window partition per key; with about as many keys as rows both grow faster than
//! the data. Two rules, registered on every session the catalog opens:
//! - [`DuplicatedKeysRule`] (logical): a grouped count over K finds the keys that occur more than
//!   once; every other row passes through an anti join with `rn = 1`, and only the duplicated
//!   rows go to the window. The physical half keeps those few keys on the joins' build side
//!   (DataFusion's join selection would hash the whole input there) and computes them once
//!   for both joins ([`SharedOnceExec`]); then, where the shape allows, replaces the count
//!   and both joins with a split by a bitmap of key hashes (`lake/duplicate_hashes.rs`),
//!   whose memory does not grow with the number of keys.
//! - [`FirstOfKeyRule`] (physical): a window whose input arrives sorted on (K, O) and whose only
//!   use is `rn = 1` becomes [`FirstOfKeyExec`], which keeps the first row of each run of equal
//!   keys (the key carried across batches) instead of building window partitions.
//!
//! The sort, the count and the joins are DataFusion's own: they spill and stay within the
//! session's memory pool; the bitmap is reserved in it. This module must not change results: the rules fire only for that one
//! `row_number` over plain key columns under a filter that keeps exactly rank 1 (`= 1`, `<= 1`,
//! `< 2`), NULL keys match NULL keys as they share a window partition, and ties in O are broken
//! as the sort leaves them, as the window would. Any other shape is left alone.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, BooleanArray, RecordBatch, UInt64Array};
use datafusion::arrow::compute::{cast, filter_record_batch};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::row::{OwnedRow, RowConverter, SortField};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode, TreeNodeRecursion};
use datafusion::common::{Result as DfResult, ScalarValue};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::Operator;
use datafusion::logical_expr::{Expr, Filter, LogicalPlan, Projection, lit};
use datafusion::optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule};
use datafusion::physical_expr::expressions::{BinaryExpr, Column, Literal};
use datafusion::physical_expr::window::StandardWindowExpr;
use datafusion::physical_expr::{OrderingRequirements, PhysicalExpr};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::distribution_requirements::InputDistributionRequirements;
use datafusion::physical_plan::execution_plan::replace_children_if_necessary;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::windows::{BoundedWindowAggExec, WindowUDFExpr};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, InputOrderMode, PlanProperties,
    SendableRecordBatchStream,
};
use datafusion::physical_plan::{ExecutionPlanProperties, Partitioning};
use futures::{StreamExt, TryStreamExt};

use crate::lake::duplicate_hashes::DuplicateFilterExec;

/// The rule, appended after DataFusion's own physical optimizers (so sorts and repartitions are
/// already in place and it only has to look at `FilterExec → BoundedWindowAggExec`).
#[derive(Debug, Default)]
pub struct FirstOfKeyRule {
    /// The most bits of [`DuplicateFilterExec`]'s bitmap; None: its own limit.
    max_bitmap_bits: Option<u64>,
}

impl FirstOfKeyRule {
    /// The rule with a smaller bitmap for the duplicated keys than it would choose (more keys
    /// share a bit and go the exact way): for tests of that path.
    pub fn with_max_bitmap_bits(bits: u64) -> Self {
        FirstOfKeyRule {
            max_bitmap_bits: Some(bits),
        }
    }
}

impl PhysicalOptimizerRule for FirstOfKeyRule {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        config: &ConfigOptions,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let plan = plan
            .transform_down(|node| {
                Ok(match rewrite(&node) {
                    Some(new) => Transformed::yes(new),
                    None => Transformed::no(node),
                })
            })
            .data()?;
        let plan = share_duplicated_keys(keys_on_the_build_side(plan)?)?;
        let plan = unshuffled_input(plan, config)?;
        hashed_duplicates(plan, config, self.max_bitmap_bits)
    }

    fn name(&self) -> &str {
        "FirstOfKey"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// `input`'s columns at `indices`, under their own names: an operator's folded-in projection
/// as a node of its own.
fn columns_of(
    input: Arc<dyn ExecutionPlan>,
    indices: &[usize],
) -> DfResult<Arc<dyn ExecutionPlan>> {
    let schema = input.schema();
    let exprs: Vec<(Arc<dyn PhysicalExpr>, String)> = indices
        .iter()
        .map(|&i| {
            let name = schema.field(i).name().clone();
            (
                Arc::new(Column::new(&name, i)) as Arc<dyn PhysicalExpr>,
                name,
            )
        })
        .collect();
    Ok(Arc::new(ProjectionExec::try_new(exprs, input)?))
}

/// `FilterExec(rn = 1) → [ProjectionExec] → BoundedWindowAggExec(row_number() partition by K
/// order by O) → input` becomes `[ProjectionExec] → FirstOfKeyExec(K) → input`; None for any
/// other shape. (DataFusion's projection pushdown puts a projection between filter and window,
/// or into the filter.)
fn rewrite(plan: &Arc<dyn ExecutionPlan>) -> Option<Arc<dyn ExecutionPlan>> {
    let filter = plan.downcast_ref::<FilterExec>()?;
    let mut rn_index = keeps_only_rank_one(filter.predicate())?;
    let projection = filter.input().downcast_ref::<ProjectionExec>();
    let window_plan = match projection {
        Some(p) => {
            // The filtered column must be the window's output passed through unchanged.
            let expr = &p.expr().get(rn_index)?.expr;
            rn_index = expr.downcast_ref::<Column>()?.index();
            p.input()
        }
        None => filter.input(),
    };
    let window = window_plan.downcast_ref::<BoundedWindowAggExec>()?;
    if window.input_order_mode != InputOrderMode::Sorted || window.window_expr().len() != 1 {
        return None;
    }
    if rn_index != window.input().schema().fields().len() {
        return None;
    }
    let expr = &window.window_expr()[0];
    let standard = expr.as_any().downcast_ref::<StandardWindowExpr>()?;
    let udf = standard
        .get_standard_func_expr()
        .as_any()
        .downcast_ref::<WindowUDFExpr>()?;
    if udf.fun().name() != "row_number" || expr.partition_by().is_empty() {
        return None;
    }
    let first: Arc<dyn ExecutionPlan> = Arc::new(FirstOfKeyExec {
        input: Arc::clone(window.input()),
        keys: expr.partition_by().to_vec(),
        schema: window.schema(),
        // The window's: the same columns, and every row kept is one the window emits.
        properties: Arc::clone(window.properties()),
        ordering: window.required_input_ordering(),
        distribution: window.input_distribution_requirements(),
    });
    let unfiltered = match projection {
        Some(_) => replace_children_if_necessary(Arc::clone(filter.input()), vec![first]).ok()?,
        None => first,
    };
    // A projection folded into the filter becomes a projection of its own.
    match filter.projection() {
        None => Some(unfiltered),
        Some(indices) => columns_of(unfiltered, indices).ok(),
    }
}

/// The column index when the predicate keeps exactly rank 1: `c = 1`, `c <= 1`, `c < 2`, or the
/// same with the literal first.
fn keeps_only_rank_one(predicate: &Arc<dyn PhysicalExpr>) -> Option<usize> {
    let binary = predicate.downcast_ref::<BinaryExpr>()?;
    let (column, literal, op) = match (
        binary.left().downcast_ref::<Column>(),
        binary.right().downcast_ref::<Literal>(),
    ) {
        (Some(c), Some(l)) => (c, l, *binary.op()),
        _ => {
            let l = binary.left().downcast_ref::<Literal>()?;
            let c = binary.right().downcast_ref::<Column>()?;
            (c, l, binary.op().swap()?)
        }
    };
    only_rank_one(op, literal.value()).then_some(column.index())
}

/// `rank <op> value` keeps exactly rank 1: `= 1`, `<= 1` or `< 2` (the op as if the rank
/// stood on the left).
fn only_rank_one(op: Operator, value: &ScalarValue) -> bool {
    let n = match value.cast_to(&datafusion::arrow::datatypes::DataType::Int64) {
        Ok(ScalarValue::Int64(Some(n))) => n,
        _ => return false,
    };
    matches!(
        (op, n),
        (Operator::Eq, 1) | (Operator::LtEq, 1) | (Operator::Lt, 2)
    )
}

/// Keeps the first row of every run of equal keys in each input partition, and appends the
/// rank column (always 1).
#[derive(Debug)]
pub struct FirstOfKeyExec {
    input: Arc<dyn ExecutionPlan>,
    keys: Vec<Arc<dyn PhysicalExpr>>,
    /// The window's output: its input columns and then the rank.
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
    ordering: Vec<Option<OrderingRequirements>>,
    distribution: InputDistributionRequirements,
}

impl DisplayAs for FirstOfKeyExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let keys: Vec<String> = self.keys.iter().map(|k| k.to_string()).collect();
        write!(f, "FirstOfKeyExec: keys=[{}]", keys.join(", "))
    }
}

impl ExecutionPlan for FirstOfKeyExec {
    fn name(&self) -> &str {
        "FirstOfKeyExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        for k in &self.keys {
            if f(k)? == TreeNodeRecursion::Stop {
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    }

    fn required_input_ordering(&self) -> Vec<Option<OrderingRequirements>> {
        self.ordering.clone()
    }

    fn input_distribution_requirements(&self) -> InputDistributionRequirements {
        self.distribution.clone()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return datafusion::common::internal_err!("FirstOfKeyExec takes one child");
        }
        Ok(Arc::new(FirstOfKeyExec {
            input: children.swap_remove(0),
            keys: self.keys.clone(),
            schema: Arc::clone(&self.schema),
            properties: Arc::clone(&self.properties),
            ordering: self.ordering.clone(),
            distribution: self.distribution.clone(),
        }))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let mut state = FirstOfKey {
            keys: self.keys.clone(),
            schema: Arc::clone(&self.schema),
            converter: None,
            last: None,
        };
        let out = input.filter_map(move |batch| {
            let result = batch.and_then(|b| state.keep_firsts(&b));
            futures::future::ready(match result {
                Ok(b) if b.num_rows() == 0 => None,
                other => Some(other),
            })
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            out,
        )))
    }
}

/// One partition's state: the key of the last row seen.
struct FirstOfKey {
    keys: Vec<Arc<dyn PhysicalExpr>>,
    schema: SchemaRef,
    converter: Option<RowConverter>,
    last: Option<OwnedRow>,
}

impl FirstOfKey {
    fn keep_firsts(&mut self, batch: &RecordBatch) -> DfResult<RecordBatch> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(RecordBatch::new_empty(Arc::clone(&self.schema)));
        }
        let keys: Vec<ArrayRef> = self
            .keys
            .iter()
            .map(|k| k.evaluate(batch).and_then(|v| v.into_array(n)))
            .collect::<DfResult<_>>()?;
        if self.converter.is_none() {
            let fields = keys
                .iter()
                .map(|a| SortField::new(a.data_type().clone()))
                .collect();
            self.converter = Some(RowConverter::new(fields)?);
        }
        let converter = self.converter.as_ref().expect("set above");
        let rows = converter.convert_columns(&keys)?;
        let first_is_new = self
            .last
            .as_ref()
            .is_none_or(|last| last.row() != rows.row(0));
        let mask: BooleanArray = (0..n)
            .map(|i| {
                Some(if i == 0 {
                    first_is_new
                } else {
                    rows.row(i) != rows.row(i - 1)
                })
            })
            .collect();
        self.last = Some(rows.row(n - 1).owned());
        let kept = filter_record_batch(batch, &mask)?;
        let rank_type = self.schema.field(batch.num_columns()).data_type();
        let rank = cast(&UInt64Array::from_value(1, kept.num_rows()), rank_type)?;
        let mut columns = kept.columns().to_vec();
        columns.push(rank);
        Ok(RecordBatch::try_new(Arc::clone(&self.schema), columns)?)
    }
}

/// The logical half: under a filter that keeps `rn = 1`, a `row_number() over (partition by K
/// …)` window runs only on the rows whose key occurs more than once. A grouped count over the
/// key columns finds those keys; the rest pass with `rn = 1` and are never sorted:
///
/// ```text
/// Window(rn, input)  =  Union( AntiJoin(input, dup) + [1 as rn],
///                              Window(rn, SemiJoin(input, dup)) )
/// dup = Aggregate(input, group by K, count(*) > 1)
/// ```
///
/// The two are the same rows for any input (a key's window partition is independent of the
/// others, and a key seen once is always rank 1); NULL keys match NULL keys, as they share a
/// window partition. Mostly unique keys are the case it is for: a re-delivery dedupe where a
/// sort of every (wide) row was the cost. The window over the duplicated rows still goes
/// through [`FirstOfKeyRule`].
#[derive(Debug, Default)]
pub struct DuplicatedKeysRule;

/// Names the join side of the duplicated keys, so the rule never rewrites its own output.
const DUPLICATED: &str = "__silt_duplicated_keys";
/// The key columns of that side.
const KEY_PREFIX: &str = "__silt_key_";

impl OptimizerRule for DuplicatedKeysRule {
    fn name(&self) -> &str {
        "DuplicatedKeysOnly"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::TopDown)
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> DfResult<Transformed<LogicalPlan>> {
        let LogicalPlan::Filter(filter) = &plan else {
            return Ok(Transformed::no(plan));
        };
        let Some(rank) = keeps_rank_one(&filter.predicate) else {
            return Ok(Transformed::no(plan));
        };
        // The window right below the filter, or below a projection passing the rank through.
        let (window, projection) = match filter.input.as_ref() {
            LogicalPlan::Window(w) => (w, None),
            LogicalPlan::Projection(p) => match p.input.as_ref() {
                LogicalPlan::Window(w) if passes_through(&p.expr, &rank) => (w, Some(p)),
                _ => return Ok(Transformed::no(plan)),
            },
            _ => return Ok(Transformed::no(plan)),
        };
        let Some(split) = split_window(window)? else {
            return Ok(Transformed::no(plan));
        };
        let below = match projection {
            None => split,
            Some(p) => {
                LogicalPlan::Projection(Projection::try_new(p.expr.clone(), Arc::new(split))?)
            }
        };
        let rewritten =
            LogicalPlan::Filter(Filter::try_new(filter.predicate.clone(), Arc::new(below))?);
        Ok(Transformed::yes(rewritten))
    }
}

/// The column a logical predicate keeps at rank 1 (`c = 1`, `c <= 1`, `c < 2`, flipped too).
fn keeps_rank_one(predicate: &Expr) -> Option<datafusion::common::Column> {
    let Expr::BinaryExpr(b) = predicate else {
        return None;
    };
    let (column, value, op) = match (b.left.as_ref(), b.right.as_ref()) {
        (Expr::Column(c), Expr::Literal(v, _)) => (c, v, b.op),
        (Expr::Literal(v, _), Expr::Column(c)) => (c, v, b.op.swap()?),
        _ => return None,
    };
    only_rank_one(op, value).then(|| column.clone())
}

/// Whether a projection outputs `column` as a window column unchanged.
fn passes_through(exprs: &[Expr], column: &datafusion::common::Column) -> bool {
    exprs.iter().any(|e| match e {
        Expr::Column(c) => c == column,
        Expr::Alias(a) => a.name == column.name && matches!(a.expr.as_ref(), Expr::Column(_)),
        _ => false,
    })
}

/// `Window(row_number() partition by K order by O)` as the union above, with the window's
/// exact schema; None when the window is not that one function over plain key columns.
fn split_window(window: &datafusion::logical_expr::Window) -> DfResult<Option<LogicalPlan>> {
    use datafusion::logical_expr::{JoinType, LogicalPlanBuilder, WindowFunctionDefinition};
    if window.window_expr.len() != 1 {
        return Ok(None);
    }
    let Expr::WindowFunction(f) = window.window_expr[0].clone().unalias() else {
        return Ok(None);
    };
    let named_row_number =
        matches!(&f.fun, WindowFunctionDefinition::WindowUDF(u) if u.name() == "row_number");
    let p = &f.params;
    if !named_row_number || !p.args.is_empty() || p.filter.is_some() || p.partition_by.is_empty() {
        return Ok(None);
    }
    let keys: Vec<datafusion::common::Column> = match p
        .partition_by
        .iter()
        .map(|e| match e {
            Expr::Column(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
    {
        Some(k) => k,
        None => return Ok(None),
    };
    // The rule's own output: the window over the duplicated rows only.
    if let LogicalPlan::Join(j) = window.input.as_ref()
        && matches!(j.left.as_ref(), LogicalPlan::SubqueryAlias(a) if a.alias.table() == DUPLICATED)
    {
        return Ok(None);
    }
    let input = window.input.as_ref().clone();
    let key_names: Vec<String> = (0..keys.len())
        .map(|i| format!("{KEY_PREFIX}{i}"))
        .collect();
    let duplicated = LogicalPlanBuilder::from(input.clone())
        .aggregate(
            keys.iter().cloned().map(Expr::Column),
            vec![datafusion::functions_aggregate::expr_fn::count(lit(1)).alias("__silt_n")],
        )?
        .filter(datafusion::prelude::col("__silt_n").gt(lit(1i64)))?
        .project(
            keys.iter()
                .zip(&key_names)
                .map(|(k, n)| Expr::Column(k.clone()).alias(n)),
        )?
        .alias(DUPLICATED)?
        .build()?;
    // The duplicated keys on the left: without statistics DataFusion builds its hash table
    // on the left side, and that table must hold the few duplicated keys, not the input.
    let on = || {
        (
            key_names
                .iter()
                .map(|n| datafusion::common::Column::new(Some(DUPLICATED), n))
                .collect::<Vec<_>>(),
            keys.clone(),
        )
    };
    let null_keys_match = datafusion::common::NullEquality::NullEqualsNull;
    let rank_field = window.schema.field(window.schema.fields().len() - 1);
    let rank_one = ScalarValue::UInt64(Some(1)).cast_to(rank_field.data_type())?;
    let input_columns: Vec<Expr> = input
        .schema()
        .columns()
        .into_iter()
        .map(Expr::Column)
        .collect();
    let once = LogicalPlanBuilder::from(duplicated.clone())
        .join_detailed(
            input.clone(),
            JoinType::RightAnti,
            on(),
            None,
            null_keys_match,
        )?
        .project(
            input_columns
                .into_iter()
                .chain([lit(rank_one).alias(rank_field.name())]),
        )?
        .build()?;
    let more_than_once = LogicalPlanBuilder::from(duplicated)
        .join_detailed(input, JoinType::RightSemi, on(), None, null_keys_match)?
        .window(window.window_expr.clone())?
        .build()?;
    let union = LogicalPlanBuilder::from(once)
        .union(more_than_once)?
        .build()?;
    // Back to the window's schema, qualifiers included (the plan above refers to them).
    let exprs: Vec<Expr> = union
        .schema()
        .columns()
        .into_iter()
        .zip(window.schema.iter())
        .map(|(c, (q, f))| Expr::Column(c).alias_qualified(q.cloned(), f.name()))
        .collect();
    Ok(Some(
        LogicalPlanBuilder::from(union).project(exprs)?.build()?,
    ))
}

/// Whether a plan yields the duplicated keys of [`DuplicatedKeysRule`] (its columns are named
/// for them), as planned or wrapped in [`SharedOnceExec`].
fn yields_duplicated_keys(p: &Arc<dyn ExecutionPlan>) -> bool {
    p.schema()
        .fields()
        .iter()
        .next()
        .is_some_and(|f| f.name().starts_with(KEY_PREFIX))
}

/// Whether a plan is the duplicated-keys side of [`DuplicatedKeysRule`]'s joins, as planned.
fn is_duplicated_keys(p: &Arc<dyn ExecutionPlan>) -> bool {
    p.downcast_ref::<ProjectionExec>().is_some() && yields_duplicated_keys(p)
}

/// DataFusion's join selection weighs the sides by statistics: a Delta scan has row counts,
/// the grouped count has none, so it moves the input to the build side and would hold every
/// input row in a hash table that cannot spill. The duplicated keys go back to the build side.
fn keys_on_the_build_side(plan: Arc<dyn ExecutionPlan>) -> DfResult<Arc<dyn ExecutionPlan>> {
    use datafusion::common::JoinType;
    use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
    plan.transform_up(|node| {
        let Some(join) = node.downcast_ref::<HashJoinExec>() else {
            return Ok(Transformed::no(node));
        };
        let swapped = match join.join_type() {
            JoinType::LeftAnti => JoinType::RightAnti,
            JoinType::LeftSemi => JoinType::RightSemi,
            _ => return Ok(Transformed::no(node)),
        };
        // Only a partitioned join (both sides hashed on the key, so swapping keeps the output
        // partitioned by it). A collect-left join means the statistics found the input small
        // enough to hold whole.
        if *join.partition_mode() != PartitionMode::Partitioned
            || !is_duplicated_keys(join.right())
            || join.filter().is_some()
            || join.projection.is_some()
        {
            return Ok(Transformed::no(node));
        }
        let on = join
            .on()
            .iter()
            .map(|(l, r)| (Arc::clone(r), Arc::clone(l)))
            .collect();
        let new = HashJoinExec::try_new(
            Arc::clone(join.right()),
            Arc::clone(join.left()),
            on,
            None,
            &swapped,
            None,
            *join.partition_mode(),
            join.null_equality(),
            false,
        )?;
        Ok(Transformed::yes(Arc::new(new) as Arc<dyn ExecutionPlan>))
    })
    .data()
}

/// The joins of [`DuplicatedKeysRule`] hash both sides on the key, so every input row (all its
/// columns) went through a repartition twice: once for the anti join, once for the semi join
/// ahead of its filter. The duplicated keys are few, so both joins take them whole instead
/// (`CollectLeft`, one hash table shared by the partitions) and read the input as it is
/// scanned; only the semi join's output, the duplicated rows, is hashed on the key for the
/// sort and [`FirstOfKeyExec`]. The anti join's rows then arrive in scan order (a month
/// after another for a month-partitioned bronze table), which a partitioned write keeps fewer
/// files open for. The plan is kept only if DataFusion's sanity check still holds, i.e. no
/// operator above relied on the rows being hashed on the key (a grouping by it, say).
fn unshuffled_input(
    plan: Arc<dyn ExecutionPlan>,
    config: &ConfigOptions,
) -> DfResult<Arc<dyn ExecutionPlan>> {
    let (rewritten, changed) = match without_key_shuffles(Arc::clone(&plan)) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "duplicated keys: the input stays hashed on the key");
            return Ok(plan);
        }
    };
    if !changed {
        return Ok(plan);
    }
    match datafusion::physical_optimizer::sanity_checker::SanityCheckPlan::new()
        .optimize(Arc::clone(&rewritten), config)
    {
        Ok(_) => Ok(rewritten),
        Err(e) => {
            tracing::debug!(error = %e, "duplicated keys: the input stays hashed on the key");
            Ok(plan)
        }
    }
}

/// `node` with [`collect_keys`] applied bottom-up, and whether anything changed. (By hand, not
/// `transform_up`: a union DataFusion planned as an `InterleaveExec` of inputs hashed alike
/// must become a plain `UnionExec` once one input is not, and rebuilding it with new children
/// fails first.)
fn without_key_shuffles(node: Arc<dyn ExecutionPlan>) -> DfResult<(Arc<dyn ExecutionPlan>, bool)> {
    use datafusion::physical_plan::union::{InterleaveExec, UnionExec, can_interleave};
    let mut changed = false;
    let mut children = Vec::new();
    for child in node.children() {
        let (c, ch) = without_key_shuffles(Arc::clone(child))?;
        changed |= ch;
        children.push(c);
    }
    let node = if !changed {
        node
    } else if node.downcast_ref::<InterleaveExec>().is_some() && !can_interleave(children.iter()) {
        UnionExec::try_new(children)?
    } else {
        replace_children_if_necessary(node, children)?
    };
    Ok(match collect_keys(&node)? {
        Some(new) => (new, true),
        None => (node, changed),
    })
}

/// A partitioned anti or semi join of the duplicated keys (left) against the input hashed on
/// the key (right) as a collect-left join over the unhashed input; the semi join's output is
/// hashed and sorted as its input was. None for any other node.
fn collect_keys(node: &Arc<dyn ExecutionPlan>) -> DfResult<Option<Arc<dyn ExecutionPlan>>> {
    use datafusion::common::JoinType;
    use datafusion::physical_expr::expressions::DynamicFilterPhysicalExpr;
    use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
    use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
    use datafusion::physical_plan::repartition::RepartitionExec;
    use datafusion::physical_plan::sorts::sort::SortExec;
    let Some(join) = node.downcast_ref::<HashJoinExec>() else {
        return Ok(None);
    };
    let semi = match join.join_type() {
        JoinType::RightAnti => false,
        JoinType::RightSemi => true,
        _ => return Ok(None),
    };
    if *join.partition_mode() != PartitionMode::Partitioned
        || !yields_duplicated_keys(join.left())
        || join.filter().is_some()
        || (semi && join.projection.is_some())
    {
        return Ok(None);
    }
    // The probe side: [sort →] [dynamic filter →] repartition on the key → input.
    let mut probe = Arc::clone(join.right());
    let sort = match probe.downcast_ref::<SortExec>() {
        Some(s) if s.fetch().is_none() && s.preserve_partitioning() => {
            let expr = s.expr().clone();
            probe = Arc::clone(s.input());
            Some(expr)
        }
        Some(_) => return Ok(None),
        None => None,
    };
    if let Some(f) = probe.downcast_ref::<FilterExec>()
        && f.projection().is_none()
        && f.predicate()
            .downcast_ref::<DynamicFilterPhysicalExpr>()
            .is_some()
    {
        // The join itself drops the rows this filter would (its bounds are the join's).
        probe = Arc::clone(f.input());
    }
    let Some(repartition) = probe.downcast_ref::<RepartitionExec>() else {
        return Ok(None);
    };
    if !matches!(repartition.partitioning(), Partitioning::Hash(..))
        || repartition.preserve_order()
        || (sort.is_some() && !semi)
    {
        return Ok(None);
    }
    let partitioning = repartition.partitioning().clone();
    let input = Arc::clone(repartition.input());
    let joined: Arc<dyn ExecutionPlan> = Arc::new(HashJoinExec::try_new(
        Arc::new(CoalescePartitionsExec::new(Arc::clone(join.left()))),
        input,
        join.on().to_vec(),
        None,
        join.join_type(),
        join.projection.as_ref().map(|p| p.to_vec()),
        PartitionMode::CollectLeft,
        join.null_equality(),
        false,
    )?);
    if !semi {
        return Ok(Some(joined));
    }
    let hashed: Arc<dyn ExecutionPlan> = Arc::new(RepartitionExec::try_new(joined, partitioning)?);
    Ok(Some(match sort {
        Some(expr) => Arc::new(SortExec::new(expr, hashed).with_preserve_partitioning(true)),
        None => hashed,
    }))
}

/// The collect-left joins of [`unshuffled_input`] as [`DuplicateFilterExec`]s: instead of a
/// grouped count holding every distinct key (and growing with the table) and two hash joins
/// probing it, one pass sets a bit per key hash and records the hashes seen again, and each
/// side filters the rows by those hashes (`lake/duplicate_hashes.rs`). A few keys seen once
/// share a bit with another and go the exact way; the rows kept are the same. The plan is
/// kept only if DataFusion's sanity check holds; any other shape is left as it is.
fn hashed_duplicates(
    plan: Arc<dyn ExecutionPlan>,
    config: &ConfigOptions,
    max_bits: Option<u64>,
) -> DfResult<Arc<dyn ExecutionPlan>> {
    use std::collections::HashMap;
    let text = |p: &Arc<dyn ExecutionPlan>| {
        datafusion::physical_plan::displayable(p.as_ref())
            .indent(true)
            .to_string()
    };
    // Both sides of a dedupe must split by the same count, or a key seen once that shares a
    // bit would pass both sides or neither: only a pair (one anti, one semi join over the same
    // keys, both of the shape handled) is rewritten, and nothing when any join over the
    // duplicated keys is of another shape.
    let mut pairs: HashMap<String, (usize, usize)> = HashMap::new();
    let mut other_shape = false;
    plan.apply(|node| {
        if joins_duplicated_keys(node) {
            match hashed_join_parts(node) {
                Some((_, _, keys_plan, duplicated, _)) if counted_input(&keys_plan).is_some() => {
                    let e = pairs.entry(text(&keys_plan)).or_default();
                    if duplicated { e.1 += 1 } else { e.0 += 1 }
                }
                _ => other_shape = true,
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if other_shape || pairs.is_empty() || pairs.values().any(|&n| n != (1, 1)) {
        return Ok(plan);
    }
    // One count per pair, shared by its two sides.
    let mut counts: HashMap<String, Arc<DuplicateFilterExec>> = HashMap::new();
    let rewritten = Arc::clone(&plan)
        .transform_up(|node| {
            let Some((input, keys, keys_plan, duplicated, projection)) = hashed_join_parts(&node)
            else {
                return Ok(Transformed::no(node));
            };
            let text = text(&keys_plan);
            let filter = match counts.get(&text) {
                Some(other) => {
                    let mut f = DuplicateFilterExec::try_new(
                        input,
                        Arc::clone(other.counted()),
                        keys,
                        other.counted_keys().to_vec(),
                        duplicated,
                        max_bits,
                    )?;
                    f.share_count(other);
                    f
                }
                None => {
                    let Some((counted, counted_keys)) = counted_input(&keys_plan) else {
                        return Ok(Transformed::no(node));
                    };
                    DuplicateFilterExec::try_new(
                        input,
                        counted,
                        keys,
                        counted_keys,
                        duplicated,
                        max_bits,
                    )?
                }
            };
            let filter = Arc::new(filter);
            counts.entry(text).or_insert_with(|| Arc::clone(&filter));
            let out: Arc<dyn ExecutionPlan> = match projection {
                None => filter,
                Some(columns) => columns_of(filter, &columns)?,
            };
            Ok(Transformed::yes(out))
        })
        .data();
    let rewritten = match rewritten {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "duplicated keys: the joins stay");
            return Ok(plan);
        }
    };
    if counts.is_empty() {
        return Ok(plan);
    }
    match datafusion::physical_optimizer::sanity_checker::SanityCheckPlan::new()
        .optimize(Arc::clone(&rewritten), config)
    {
        Ok(_) => Ok(rewritten),
        Err(e) => {
            tracing::debug!(error = %e, "duplicated keys: the joins stay");
            Ok(plan)
        }
    }
}

/// Whether `node` is a hash join with the duplicated keys of [`DuplicatedKeysRule`] on either
/// side (under a coalesce, a repartition or [`SharedOnceExec`]), in whatever mode.
fn joins_duplicated_keys(node: &Arc<dyn ExecutionPlan>) -> bool {
    use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
    use datafusion::physical_plan::joins::HashJoinExec;
    use datafusion::physical_plan::repartition::RepartitionExec;
    let Some(join) = node.downcast_ref::<HashJoinExec>() else {
        return false;
    };
    [join.left(), join.right()].into_iter().any(|side| {
        let mut p = side;
        loop {
            if let Some(c) = p.downcast_ref::<CoalescePartitionsExec>() {
                p = c.input();
            } else if let Some(r) = p.downcast_ref::<RepartitionExec>() {
                p = r.input();
            } else if let Some(s) = p.downcast_ref::<SharedOnceExec>() {
                p = &s.input;
            } else {
                return is_duplicated_keys(p);
            }
        }
    })
}

/// A collect-left anti or semi join of the duplicated keys against the input, on plain key
/// columns: the input, its key columns in the order of the keys, the keys' plan, whether it
/// keeps the duplicated rows, and the join's output columns. None for any other node.
#[allow(clippy::type_complexity)]
fn hashed_join_parts(
    node: &Arc<dyn ExecutionPlan>,
) -> Option<(
    Arc<dyn ExecutionPlan>,
    Vec<usize>,
    Arc<dyn ExecutionPlan>,
    bool,
    Option<Vec<usize>>,
)> {
    use datafusion::common::JoinType;
    use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
    use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
    let join = node.downcast_ref::<HashJoinExec>()?;
    let duplicated = match join.join_type() {
        JoinType::RightAnti => false,
        JoinType::RightSemi => true,
        _ => return None,
    };
    if *join.partition_mode() != PartitionMode::CollectLeft
        || join.filter().is_some()
        || node.fetch().is_some()
        || join.null_equality() != datafusion::common::NullEquality::NullEqualsNull
    {
        return None;
    }
    let mut keys_plan = join
        .left()
        .downcast_ref::<CoalescePartitionsExec>()?
        .input();
    if let Some(shared) = keys_plan.downcast_ref::<SharedOnceExec>() {
        keys_plan = &shared.input;
    }
    if !is_duplicated_keys(keys_plan) {
        return None;
    }
    // The i-th pair joins the i-th duplicated key column with a plain column of the input.
    let mut keys = Vec::new();
    for (i, (l, r)) in join.on().iter().enumerate() {
        if l.downcast_ref::<Column>()?.index() != i {
            return None;
        }
        keys.push(r.downcast_ref::<Column>()?.index());
    }
    Some((
        Arc::clone(join.right()),
        keys,
        Arc::clone(keys_plan),
        duplicated,
        join.projection.as_ref().map(|p| p.to_vec()),
    ))
}

/// Under the duplicated keys' plan (projection → filter on the count → aggregate →
/// [repartition] → partial aggregate → rows), the rows counted and their key columns, in the
/// order of the duplicated key columns. None for any other shape.
fn counted_input(
    keys_plan: &Arc<dyn ExecutionPlan>,
) -> Option<(Arc<dyn ExecutionPlan>, Vec<usize>)> {
    use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
    use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
    use datafusion::physical_plan::repartition::RepartitionExec;
    let projection = keys_plan.downcast_ref::<ProjectionExec>()?;
    // Key column i is the filter's column i, which is the count's group column i.
    for (i, e) in projection.expr().iter().enumerate() {
        if e.expr.downcast_ref::<Column>()?.index() != i {
            return None;
        }
    }
    let filter = projection.input().downcast_ref::<FilterExec>()?;
    if let Some(p) = filter.projection()
        && !p.iter().enumerate().all(|(i, &c)| i == c)
    {
        return None;
    }
    let mut node = filter.input();
    loop {
        if let Some(agg) = node.downcast_ref::<AggregateExec>() {
            if !agg.group_expr().is_single() || agg.aggr_expr().len() != 1 {
                return None;
            }
            match agg.mode() {
                AggregateMode::Partial
                | AggregateMode::Single
                | AggregateMode::SinglePartitioned => {
                    let keys = agg
                        .group_expr()
                        .expr()
                        .iter()
                        .map(|(e, _)| e.downcast_ref::<Column>().map(|c| c.index()))
                        .collect::<Option<Vec<_>>>()?;
                    if keys.len() != projection.expr().len() {
                        return None;
                    }
                    return Some((Arc::clone(agg.input()), keys));
                }
                _ => node = agg.input(),
            }
        } else if let Some(r) = node.downcast_ref::<RepartitionExec>() {
            node = r.input();
        } else if let Some(c) = node.downcast_ref::<CoalescePartitionsExec>() {
            node = c.input();
        } else {
            return None;
        }
    }
}

/// The duplicated keys of [`DuplicatedKeysRule`] feed both branches of its union, and DataFusion
/// plans a subtree per use: two grouped counts over every key. Identical `__silt_key_*`
/// subtrees are wrapped in [`SharedOnceExec`] over one cache, so the count runs once and the
/// second join reads its result.
fn share_duplicated_keys(plan: Arc<dyn ExecutionPlan>) -> DfResult<Arc<dyn ExecutionPlan>> {
    use std::collections::HashMap;
    let text = |p: &Arc<dyn ExecutionPlan>| {
        datafusion::physical_plan::displayable(p.as_ref())
            .indent(true)
            .to_string()
    };
    let mut uses: HashMap<String, usize> = HashMap::new();
    plan.apply(|node| {
        if is_duplicated_keys(node) {
            *uses.entry(text(node)).or_default() += 1;
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if uses.values().all(|&n| n < 2) {
        return Ok(plan);
    }
    let mut caches: HashMap<String, Arc<SharedCache>> = HashMap::new();
    plan.transform_up(|node| {
        if !is_duplicated_keys(&node) {
            return Ok(Transformed::no(node));
        }
        let key = text(&node);
        if uses.get(&key).copied().unwrap_or(0) < 2 {
            return Ok(Transformed::no(node));
        }
        let partitions = node.output_partitioning().partition_count();
        let cache = caches
            .entry(key)
            .or_insert_with(|| {
                Arc::new(SharedCache {
                    partitions: (0..partitions)
                        .map(|_| tokio::sync::OnceCell::new())
                        .collect(),
                })
            })
            .clone();
        Ok(Transformed::yes(Arc::new(SharedOnceExec {
            properties: Arc::clone(node.properties()),
            input: node,
            cache,
        }) as Arc<dyn ExecutionPlan>))
    })
    .data()
}

/// Each partition's batches, computed by whichever consumer asks first.
#[derive(Debug)]
struct SharedCache {
    partitions: Vec<tokio::sync::OnceCell<Vec<RecordBatch>>>,
}

/// Runs its input once per partition for every plan node that shares its cache; the batches
/// are small (the keys seen more than once) and held until the plan is dropped.
#[derive(Debug)]
pub struct SharedOnceExec {
    input: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
    cache: Arc<SharedCache>,
}

impl DisplayAs for SharedOnceExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "SharedOnceExec")
    }
}

impl ExecutionPlan for SharedOnceExec {
    fn name(&self) -> &str {
        "SharedOnceExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return datafusion::common::internal_err!("SharedOnceExec takes one child");
        }
        // A new input is a new computation: it gets a cache of its own.
        Ok(Arc::new(SharedOnceExec::new(children.swap_remove(0))))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let (input, cache, schema) = (
            Arc::clone(&self.input),
            Arc::clone(&self.cache),
            self.schema(),
        );
        let batches = futures::stream::once(async move {
            let cell = cache.partitions.get(partition).ok_or_else(|| {
                datafusion::error::DataFusionError::Internal(format!(
                    "SharedOnceExec has no partition {partition}"
                ))
            })?;
            let batches = cell
                .get_or_try_init(|| async {
                    let stream = input.execute(partition, context)?;
                    datafusion::physical_plan::common::collect(stream).await
                })
                .await?;
            Ok::<_, datafusion::error::DataFusionError>(futures::stream::iter(
                batches.clone().into_iter().map(Ok),
            ))
        })
        .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, batches)))
    }
}

impl FirstOfKeyExec {
    /// When every key is a plain column, the keys (name, index) and the rank column's name:
    /// what a cluster codec sends besides the input. None for any other key.
    pub(crate) fn parts(&self) -> Option<(Vec<(String, usize)>, String)> {
        let keys = self
            .keys
            .iter()
            .map(|k| {
                k.downcast_ref::<Column>()
                    .map(|c| (c.name().to_string(), c.index()))
            })
            .collect::<Option<Vec<_>>>()?;
        let rank = self.schema.fields().last()?.name().clone();
        Some((keys, rank))
    }

    /// The node rebuilt from [`FirstOfKeyExec::parts`] on the far side of the wire: the
    /// plan around it is already optimized, so it only needs to run, not to be re-planned.
    pub(crate) fn from_parts(
        input: Arc<dyn ExecutionPlan>,
        keys: Vec<(String, usize)>,
        rank: String,
    ) -> DfResult<Self> {
        use datafusion::arrow::datatypes::{DataType, Field, Schema};
        use datafusion::physical_expr::{Distribution, EquivalenceProperties};
        let keys: Vec<Arc<dyn PhysicalExpr>> = keys
            .into_iter()
            .map(|(n, i)| Arc::new(Column::new(&n, i)) as Arc<dyn PhysicalExpr>)
            .collect();
        let mut fields = input.schema().fields().to_vec();
        fields.push(Arc::new(Field::new(rank, DataType::UInt64, false)));
        let schema: SchemaRef = Arc::new(Schema::new_with_metadata(
            fields,
            input.schema().metadata().clone(),
        ));
        let eq = match input.output_ordering() {
            Some(o) => EquivalenceProperties::new_with_orderings(Arc::clone(&schema), [o.clone()]),
            None => EquivalenceProperties::new(Arc::clone(&schema)),
        };
        let properties = Arc::new(PlanProperties::new(
            eq,
            input.output_partitioning().clone(),
            input.pipeline_behavior(),
            input.boundedness(),
        ));
        Ok(FirstOfKeyExec {
            distribution: InputDistributionRequirements::new(vec![Distribution::KeyPartitioned(
                keys.clone(),
            )]),
            ordering: vec![None],
            input,
            keys,
            schema,
            properties,
        })
    }
}

impl SharedOnceExec {
    /// A node of its own over `input`, with a cache of its own (a decoded plan, a new input).
    pub(crate) fn new(input: Arc<dyn ExecutionPlan>) -> Self {
        let partitions = input.output_partitioning().partition_count();
        SharedOnceExec {
            properties: Arc::clone(input.properties()),
            input,
            cache: Arc::new(SharedCache {
                partitions: (0..partitions)
                    .map(|_| tokio::sync::OnceCell::new())
                    .collect(),
            }),
        }
    }
}
