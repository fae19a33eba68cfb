//! A plan rewrite that lets DataFusion's own single-distinct rewrite apply to gold-style
//! aggregates: `count(distinct x)` beside `sum`/`min`/`max` is computed as a group by
//! (keys, x) and then by keys (DataFusion's `SingleDistinctToGroupBy`), instead of a distinct
//! set per group. DataFusion 55 skips that rewrite as soon as an aggregate carries an alias,
//! and type coercion aliases one whenever it rewrites an argument (`sum(price * (1 -
//! discount))` on decimals becomes `sum(price * (Decimal128(1) - discount)) AS "sum(price *
//! Int64(1) - discount)"`). This rule moves those names to a projection above the aggregate,
//! so the next optimizer pass finds plain aggregates. It must not change what a query returns
//! (the projection restores every output name and qualifier), nor touch any other shape.

use std::sync::Arc;

use datafusion::common::Result as DfResult;
use datafusion::common::tree_node::Transformed;
use datafusion::logical_expr::expr::AggregateFunctionParams;
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan, Projection};
use datafusion::optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule};

/// Moves the aliases of an aggregate that DataFusion's single-distinct rewrite would take,
/// but for them, to a projection above it.
#[derive(Debug, Default)]
pub struct UnaliasDistinctAggregatesRule;

impl OptimizerRule for UnaliasDistinctAggregatesRule {
    fn name(&self) -> &str {
        "UnaliasDistinctAggregates"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::TopDown)
    }

    fn supports_rewrite(&self) -> bool {
        true
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> DfResult<Transformed<LogicalPlan>> {
        let LogicalPlan::Aggregate(agg) = &plan else {
            return Ok(Transformed::no(plan));
        };
        let aliased = agg
            .aggr_expr
            .iter()
            .any(|e| matches!(e, Expr::Alias(a) if matches!(*a.expr, Expr::AggregateFunction(_))));
        let grouping_set = matches!(agg.group_expr.first(), Some(Expr::GroupingSet(_)));
        if !aliased || grouping_set || !single_distinct(&agg.aggr_expr) {
            return Ok(Transformed::no(plan));
        }
        let plain: Vec<Expr> = agg
            .aggr_expr
            .iter()
            .map(|e| match e {
                Expr::Alias(a) => (*a.expr).clone(),
                e => e.clone(),
            })
            .collect();
        // Two aggregates that differ only in their aliases would share one name once
        // unaliased: the plan is then left as it is rather than failing.
        let Ok(unaliased) = Aggregate::try_new(agg.input.clone(), agg.group_expr.clone(), plain)
        else {
            return Ok(Transformed::no(plan));
        };
        // The same columns, renamed back to what the aliased aggregate produced.
        let names: Vec<Expr> = unaliased
            .schema
            .columns()
            .into_iter()
            .zip(agg.schema.iter())
            .map(|(c, (qualifier, field))| {
                Expr::Column(c).alias_qualified(qualifier.cloned(), field.name())
            })
            .collect();
        let projection = Projection::try_new(names, Arc::new(LogicalPlan::Aggregate(unaliased)))?;
        Ok(Transformed::yes(LogicalPlan::Projection(projection)))
    }
}

/// The shape DataFusion's `SingleDistinctToGroupBy` takes, looking through aliases: every
/// aggregate a plain call (no filter, no order), the distinct ones all over the same
/// arguments, the others `sum`, `min` or `max`.
fn single_distinct(aggr_expr: &[Expr]) -> bool {
    let mut distinct_args: Option<&Vec<Expr>> = None;
    for e in aggr_expr {
        let e = match e {
            Expr::Alias(a) => a.expr.as_ref(),
            e => e,
        };
        let Expr::AggregateFunction(f) = e else {
            return false;
        };
        let AggregateFunctionParams {
            distinct,
            args,
            filter,
            order_by,
            ..
        } = &f.params;
        if filter.is_some() || !order_by.is_empty() {
            return false;
        }
        if *distinct {
            match distinct_args {
                Some(a) if a != args => return false,
                _ => distinct_args = Some(args),
            }
        } else if !matches!(f.func.name().to_lowercase().as_str(), "sum" | "min" | "max") {
            return false;
        }
    }
    distinct_args.is_some_and(|a| a.len() == 1)
}
