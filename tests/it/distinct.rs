//! `count(distinct x)` beside sums whose arguments type coercion rewrote: silt's rule lets
//! DataFusion compute it as two group-bys, with the same rows and names as without the rule,
//! and leaves the shapes that rewrite does not take alone.

use std::sync::Arc;

use datafusion::arrow::array::{Decimal128Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::datasource::MemTable;
use datafusion::execution::SessionStateBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use silt::lake::distinct::UnaliasDistinctAggregatesRule;

/// Order lines: a customer (some NULL), an order id repeated over its lines (some NULL), a
/// decimal price and discount.
fn lines() -> MemTable {
    let schema = Arc::new(Schema::new(vec![
        Field::new("customer", DataType::Utf8, true),
        Field::new("order_id", DataType::Int64, true),
        Field::new("price", DataType::Decimal128(12, 2), true),
        Field::new("discount", DataType::Decimal128(12, 2), true),
    ]));
    let n = 5_000i64;
    let batch = |from: i64, to: i64| {
        let rows = from..to;
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter(
                    rows.clone()
                        .map(|i| (i % 41 != 0).then(|| format!("c{}", (i / 3) % 97))),
                )),
                Arc::new(Int64Array::from_iter(
                    rows.clone().map(|i| (i % 53 != 0).then_some(i / 4)),
                )),
                Arc::new(
                    Decimal128Array::from_iter(
                        rows.clone()
                            .map(|i| (i % 29 != 0).then_some((1000 + i * 7 % 9000) as i128)),
                    )
                    .with_precision_and_scale(12, 2)
                    .unwrap(),
                ),
                Arc::new(
                    Decimal128Array::from_iter(rows.map(|i| Some((i % 11) as i128)))
                        .with_precision_and_scale(12, 2)
                        .unwrap(),
                ),
            ],
        )
        .unwrap()
    };
    MemTable::try_new(
        schema.clone(),
        vec![vec![batch(0, n / 2)], vec![batch(n / 2, n)]],
    )
    .unwrap()
}

fn session(with_rule: bool) -> SessionContext {
    let config = SessionConfig::new().with_target_partitions(2);
    let mut state = SessionStateBuilder::new()
        .with_config(config)
        .with_default_features();
    if with_rule {
        state = state.with_optimizer_rule(Arc::new(UnaliasDistinctAggregatesRule));
    }
    let ctx = SessionContext::new_with_state(state.build());
    ctx.register_table("lines", Arc::new(lines())).unwrap();
    ctx
}

/// The query's rows (sorted) with their column names, and its optimized logical plan.
async fn run(ctx: &SessionContext, sql: &str) -> (String, String) {
    let df = ctx.sql(sql).await.unwrap();
    let plan = df
        .clone()
        .into_optimized_plan()
        .unwrap()
        .display_indent()
        .to_string();
    let sorted = df
        .sort_by(vec![datafusion::prelude::col("customer")])
        .unwrap();
    let rows = pretty_format_batches(&sorted.collect().await.unwrap())
        .unwrap()
        .to_string();
    (rows, plan)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_distinct_beside_coerced_sums_runs_as_two_group_bys_with_the_same_rows() {
    let (plain, with_rule) = (session(false), session(true));
    // `1 - discount` is coerced (the literal becomes a decimal), which aliases the sum.
    let taken = [
        "select customer, count(distinct order_id) as orders, \
         sum(price * (1 - discount)) as revenue, min(price), max(discount * 2) \
         from lines group by customer",
        "select customer, count(distinct order_id), sum(price * (1 - discount)) \
         from lines where price > 20 group by customer",
    ];
    for sql in taken {
        let (want, before) = run(&plain, sql).await;
        let (got, after) = run(&with_rule, sql).await;
        // A distinct set per group before; after, an inner group by on the distinct column
        // (the output keeps its name, so only the Aggregate lines tell).
        let distinct_aggregate = |plan: &str| {
            plan.lines()
                .any(|l| l.trim_start().starts_with("Aggregate:") && l.contains("count(DISTINCT"))
        };
        assert!(distinct_aggregate(&before), "{before}");
        assert!(!distinct_aggregate(&after), "{sql}:\n{after}");
        assert!(after.contains("AS alias1]]"), "{sql}:\n{after}");
        assert_eq!(got, want, "{sql}");
    }
    // Shapes DataFusion's rewrite does not take stay as they were (and return the same rows).
    let left = [
        "select customer, count(distinct order_id), avg(price * (1 - discount)) \
         from lines group by customer",
        "select customer, count(distinct order_id), count(distinct price) \
         from lines group by customer",
    ];
    for sql in left {
        let (want, before) = run(&plain, sql).await;
        let (got, after) = run(&with_rule, sql).await;
        assert_eq!(after, before, "{sql}");
        assert_eq!(got, want, "{sql}");
    }
}

/// Rows already hashed on one of a grouping's keys are grouped where they are, on an engine of
/// two partitions (a 2-core machine) too: the `count(distinct)` per customer over rows hashed on
/// the order is one aggregate per partition, not a partial one, a repartition of every group
/// and a final one (DataFusion's default does that below four partitions). Same rows as
/// DataFusion's plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grouping_on_rows_hashed_by_one_of_its_keys_is_not_repartitioned_on_two_cores() {
    use silt::lake::catalog::Catalog;
    use silt::lake::storage::{CloudOptions, Storage};
    use silt::project::config::EngineSection;
    let dir = tempfile::tempdir().unwrap();
    let lake = Storage::new(
        &url::Url::from_directory_path(dir.path()).unwrap(),
        &CloudOptions::default(),
    )
    .unwrap();
    let engine = EngineSection {
        target_partitions: 2,
        ..Default::default()
    };
    let silt = Catalog::new(lake)
        .with_engine(engine)
        .session()
        .await
        .unwrap();
    silt.register_table("lines", Arc::new(lines())).unwrap();
    let plain = session(true);
    // Per order (hashed on it), then per customer with its orders counted.
    let sql = "select customer, count(distinct order_id) as orders, sum(total) as revenue \
               from (select order_id, max(customer) as customer, sum(price) as total \
                     from lines group by order_id) o \
               group by customer";
    let physical = |ctx: SessionContext| async move {
        let plan = crate::support::physical_plan(&ctx, sql).await;
        datafusion::physical_plan::displayable(plan.as_ref())
            .indent(false)
            .to_string()
    };
    let (ours, theirs) = (physical(silt.clone()).await, physical(plain.clone()).await);
    let in_place = |p: &str| {
        p.lines()
            .any(|l| l.contains("mode=SinglePartitioned") && l.contains("order_id"))
    };
    assert!(in_place(&ours), "{ours}");
    assert!(!in_place(&theirs), "{theirs}");
    let (want, _) = run(&plain, sql).await;
    let (got, _) = run(&silt, sql).await;
    assert_eq!(got, want);
    assert!(got.lines().count() > 50, "{got}");
}
