//! The cheap "latest row per key": a physical-plan rule that replaces
//! `row_number() over (partition by K order by O) … where rn = 1` with a streaming pass.
//!
//! DataFusion runs that pattern as a sort on (K, O) followed by a window operator that keeps one
//! window partition per key; with about as many keys as rows the window, not the sort, is most of
//! the cost and it grows faster than the data. Once the input is sorted on (K, O) the first row of
//! each run of equal keys *is* the row with `rn = 1`, so [`FirstOfKeyExec`] keeps exactly those
//! rows by comparing each key with the one before it (carried across batches), and emits the
//! `rn` column as the constant 1 so the plan above sees the same schema. The sort under it is
//! DataFusion's own: it spills and stays within the session's memory pool. Nothing is held here
//! but the last key of the batch before.
//!
//! This module must not change results: it fires only when the window holds that one
//! `row_number`, the input arrives sorted on the partition keys (`InputOrderMode::Sorted`), and
//! the filter keeps exactly `rn = 1` (or `rn <= 1`, `rn < 2`). Any other shape is left alone.

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
use futures::StreamExt;

/// The rule, appended after DataFusion's own physical optimizers (so sorts and repartitions are
/// already in place and it only has to look at `FilterExec → BoundedWindowAggExec`).
#[derive(Debug, Default)]
pub struct FirstOfKeyRule;

impl PhysicalOptimizerRule for FirstOfKeyRule {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        plan.transform_down(|node| {
            Ok(match rewrite(&node) {
                Some(new) => Transformed::yes(new),
                None => Transformed::no(node),
            })
        })
        .data()
    }

    fn name(&self) -> &str {
        "FirstOfKey"
    }

    fn schema_check(&self) -> bool {
        true
    }
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
        Some(indices) => {
            let schema = unfiltered.schema();
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
            Some(Arc::new(ProjectionExec::try_new(exprs, unfiltered).ok()?))
        }
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
    let n = match literal
        .value()
        .cast_to(&datafusion::arrow::datatypes::DataType::Int64)
    {
        Ok(ScalarValue::Int64(Some(n))) => n,
        _ => return None,
    };
    let only_one = matches!(
        (op, n),
        (Operator::Eq, 1) | (Operator::LtEq, 1) | (Operator::Lt, 2)
    );
    only_one.then_some(column.index())
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
