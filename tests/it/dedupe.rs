//! The latest row per key (`row_number() … = 1`) through silt's streaming first-of-key pass:
//! the same rows as DataFusion's window, within a small memory pool, and only where the shape
//! allows it.

use std::sync::Arc;

use datafusion::arrow::array::{Int32Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::datasource::MemTable;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_plan::{ExecutionPlan, collect, displayable};
use datafusion::prelude::{SessionConfig, SessionContext};
use silt::lake::dedupe::{DuplicatedKeysRule, FirstOfKeyRule};

/// orderkey, linenumber, customer, qty, ts, seq.
type Columns = (
    Vec<i64>,
    Vec<i32>,
    Vec<Option<String>>,
    Vec<i64>,
    Vec<i64>,
    Vec<i64>,
);

/// Line items with a composite key, re-delivered: about a fifth of the keys come two or three
/// times with later `ts`, a few as exact copies (same `ts` and `seq`), some customer names null.
fn deliveries(rows: usize, batches: usize) -> Vec<Vec<RecordBatch>> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("orderkey", DataType::Int64, false),
        Field::new("linenumber", DataType::Int32, false),
        Field::new("customer", DataType::Utf8, true),
        Field::new("qty", DataType::Int64, false),
        Field::new("ts", DataType::Int64, false),
        Field::new("seq", DataType::Int64, false),
    ]));
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut cols: Columns = Default::default();
    let mut seq = 0;
    while cols.0.len() < rows {
        let order = (next() % (rows as u64 / 3)) as i64;
        let line = (next() % 7) as i32 + 1;
        let copies = match next() % 10 {
            0 | 1 => 2,
            2 => 3,
            _ => 1,
        };
        let exact = next() % 20 == 0;
        let group = seq + 1;
        for c in 0..copies {
            seq += 1;
            cols.0.push(order);
            cols.1.push(line);
            cols.2
                .push((order % 11 != 0).then(|| format!("Customer#{:09}", order % 1000)));
            cols.3.push((next() % 50) as i64 + c);
            cols.4.push(if exact {
                1_000
            } else {
                (next() % 1_000_000) as i64
            });
            cols.5.push(if exact { group } else { seq });
            if exact {
                // An exact re-delivery: every column the same as the copy before.
                let q = cols.3[cols.3.len() - 1 - c as usize];
                *cols.3.last_mut().unwrap() = q;
            }
        }
    }
    let per = cols.0.len().div_ceil(batches);
    (0..batches)
        .map(|b| {
            let r = (b * per)..((b + 1) * per).min(cols.0.len());
            vec![
                RecordBatch::try_new(
                    schema.clone(),
                    vec![
                        Arc::new(Int64Array::from(cols.0[r.clone()].to_vec())),
                        Arc::new(Int32Array::from(cols.1[r.clone()].to_vec())),
                        Arc::new(StringArray::from(cols.2[r.clone()].to_vec())),
                        Arc::new(Int64Array::from(cols.3[r.clone()].to_vec())),
                        Arc::new(Int64Array::from(cols.4[r.clone()].to_vec())),
                        Arc::new(Int64Array::from(cols.5[r].to_vec())),
                    ],
                )
                .unwrap(),
            ]
        })
        .collect()
}

/// Which of silt's rewrites a test session carries.
#[derive(Clone, Copy, PartialEq)]
enum Rules {
    /// DataFusion's plan: the window over every row.
    Window,
    /// Only the physical first-of-key pass.
    FirstOfKey,
    /// Both, as silt's sessions have them.
    Silt,
}

fn session(rules: Rules, pool_bytes: Option<usize>, data: &[Vec<RecordBatch>]) -> SessionContext {
    session_with(rules, pool_bytes, data, FirstOfKeyRule::default())
}

fn session_with(
    rules: Rules,
    pool_bytes: Option<usize>,
    data: &[Vec<RecordBatch>],
    rule: FirstOfKeyRule,
) -> SessionContext {
    let mut config = SessionConfig::new()
        .with_target_partitions(2)
        .with_batch_size(4096);
    // What a sort sets aside for merging its spill files (10 MiB by default) must fit the pool.
    config.options_mut().execution.sort_spill_reservation_bytes = 1 << 20;
    let mut runtime = RuntimeEnvBuilder::new();
    if let Some(bytes) = pool_bytes {
        runtime = runtime.with_memory_pool(Arc::new(FairSpillPool::new(bytes)));
    }
    let mut state = SessionStateBuilder::new()
        .with_default_features()
        .with_config(config)
        .with_runtime_env(runtime.build_arc().unwrap());
    if rules == Rules::Silt {
        state = state.with_optimizer_rule(Arc::new(DuplicatedKeysRule));
    }
    if rules != Rules::Window {
        state = state.with_physical_optimizer_rule(Arc::new(rule));
    }
    let ctx = SessionContext::new_with_state(state.build());
    let schema = data[0][0].schema();
    ctx.register_table(
        "t",
        Arc::new(MemTable::try_new(schema, data.to_vec()).unwrap()),
    )
    .unwrap();
    ctx
}

/// The query's rows in a fixed order, as text, and its physical plan.
async fn run(ctx: &SessionContext, sql: &str) -> (String, Arc<dyn ExecutionPlan>) {
    let plan = crate::support::physical_plan(ctx, sql).await;
    let batches = collect(plan.clone(), ctx.task_ctx())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    // Put in order outside the session under test (its pool is for the query alone).
    let ordered = SessionContext::new().read_batches(batches).unwrap();
    let every_column = ordered
        .schema()
        .fields()
        .iter()
        .map(|f| datafusion::prelude::col(f.name()))
        .collect();
    let sorted = ordered
        .sort_by(every_column)
        .unwrap()
        .collect()
        .await
        .unwrap();
    (pretty_format_batches(&sorted).unwrap().to_string(), plan)
}

/// Equal texts, or the first line where they differ.
fn same(got: &str, expected: &str, what: &str) {
    if got != expected {
        let (i, (g, e)) = got
            .lines()
            .zip(expected.lines())
            .enumerate()
            .find(|(_, (g, e))| g != e)
            .unwrap_or((0, ("(length differs)", "")));
        let (ng, ne) = (got.lines().count(), expected.lines().count());
        panic!("{what}: line {i} is\n{g}\nnot\n{e}\n({ng} lines, expected {ne})");
    }
}

fn latest(filter: &str) -> String {
    format!(
        "select * from (select *, row_number() over (partition by orderkey, linenumber \
         order by ts desc, seq desc) as rn from t) where {filter}"
    )
}

fn plan_text(plan: &Arc<dyn ExecutionPlan>) -> String {
    displayable(plan.as_ref()).indent(false).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_of_key_keeps_exactly_the_rows_the_window_keeps() {
    let data = deliveries(60_000, 6);
    let window = session(Rules::Window, None, &data);
    let fast = session(Rules::Silt, None, &data);
    for filter in ["rn = 1", "1 = rn", "rn <= 1", "rn < 2"] {
        let (expected, plan) = run(&window, &latest(filter)).await;
        assert!(!plan_text(&plan).contains("FirstOfKeyExec"));
        let (got, plan) = run(&fast, &latest(filter)).await;
        let text = plan_text(&plan);
        // Keys seen once pass straight through; only the others are sorted, then cut to the
        // first. The split is a bitmap of key hashes: no grouped count of every key, no join.
        assert_eq!(
            (
                text.matches("DuplicateFilterExec: unique").count(),
                text.matches("DuplicateFilterExec: duplicated").count()
            ),
            (1, 1),
            "{filter}: {text}"
        );
        assert!(text.contains("FirstOfKeyExec"), "{filter}: {text}");
        assert!(
            !text.contains("HashJoinExec") && !text.contains("AggregateExec"),
            "{filter}: {text}"
        );
        assert!(!text.contains("BoundedWindowAggExec"), "{filter}: {text}");
        same(&got, &expected, filter);
        let kept = got.lines().count() - 4;
        assert!(kept > 10_000 && kept < 60_000, "{filter}: {kept} rows kept");
    }
    // Only some columns kept: DataFusion puts a projection between the filter and the window.
    let narrow = "select orderkey, linenumber, qty, seq from (select *, row_number() over \
                  (partition by orderkey, linenumber order by ts desc, seq desc) as rn from t) where rn = 1";
    let (expected, _) = run(&window, narrow).await;
    let (got, plan) = run(&fast, narrow).await;
    assert!(
        plan_text(&plan).contains("FirstOfKeyExec"),
        "{}",
        plan_text(&plan)
    );
    same(&got, &expected, narrow);
    // A nullable key: rows without one share a window partition, so one of them is kept.
    let nullable = "select * from (select *, row_number() over (partition by customer \
                    order by ts desc, seq desc) as rn from t) where rn = 1";
    let (expected, _) = run(&window, nullable).await;
    let (got, plan) = run(&fast, nullable).await;
    assert!(
        plan_text(&plan).contains("DuplicateFilterExec: unique"),
        "{}",
        plan_text(&plan)
    );
    same(&got, &expected, nullable);
    let without_customer = got
        .lines()
        .filter(|l| l.split('|').nth(3).is_some_and(|c| c.trim().is_empty()))
        .count();
    assert_eq!(without_customer, 1, "rows without a customer kept");
    // The rank column is the window's: usable above the filter, with its type.
    let sql = format!(
        "select sum(rn) as n, count(*) as c, arrow_typeof(min(rn)) as t from ({})",
        latest("rn = 1")
    );
    assert_eq!(
        run_scalar(&fast, &sql).await,
        run_scalar(&window, &sql).await
    );
    // Shapes it must leave to the window: another rank, another function, two windows.
    for sql in [
        latest("rn = 2"),
        latest("rn <= 2"),
        "select * from (select *, rank() over (partition by orderkey order by ts desc) as rn from t) where rn = 1".to_string(),
        "select * from (select *, row_number() over (partition by orderkey order by ts desc, seq desc) as rn, \
         sum(qty) over (partition by orderkey) as total from t) where rn = 1"
            .to_string(),
    ] {
        let (expected, _) = run(&window, &sql).await;
        let (got, plan) = run(&fast, &sql).await;
        let text = plan_text(&plan);
        assert!(
            !text.contains("FirstOfKeyExec")
                && !text.contains("Anti, on")
                && !text.contains("DuplicateFilterExec"),
            "{sql}: {text}"
        );
        same(&got, &expected, &sql);
    }
}

/// Where the plan above the dedupe joins on the key and counts on its rows being hashed by it
/// (a partitioned join that reuses the union's hashing), the input is hashed as before. With
/// the rewrite kept there, the join's sides would not be partitioned alike and the query
/// would fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_on_the_key_above_the_dedupe_still_finds_every_match() {
    let data = deliveries(60_000, 6);
    let window = session(Rules::Window, None, &data);
    let fast = session(Rules::Silt, None, &data);
    let sql = format!(
        "select d.orderkey, d.linenumber, d.seq, a.qty as again \
         from ({}) d join t a on a.orderkey = d.orderkey and a.linenumber = d.linenumber",
        latest("rn = 1")
    );
    for ctx in [&window, &fast] {
        for knob in [
            "hash_join_single_partition_threshold",
            "hash_join_single_partition_threshold_rows",
        ] {
            ctx.sql(&format!("set datafusion.optimizer.{knob} = 0"))
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
        }
    }
    let (expected, _) = run(&window, &sql).await;
    let (got, plan) = run(&fast, &sql).await;
    let text = plan_text(&plan);
    assert!(
        text.contains("FirstOfKeyExec") && text.contains("Anti, on"),
        "{text}"
    );
    assert!(
        text.contains("mode=Partitioned, join_type=Inner")
            && !text.contains("mode=CollectLeft, join_type=RightAnti"),
        "{text}"
    );
    same(&got, &expected, &sql);
    // Every delivered row finds its key's latest row, once.
    let delivered: usize = data.iter().flatten().map(|b| b.num_rows()).sum();
    assert_eq!(got.lines().count() - 4, delivered);
}

/// The rows each side of the split passed (its output_rows), by side.
fn split_rows(plan: &Arc<dyn ExecutionPlan>) -> (usize, usize) {
    let (mut unique, mut duplicated) = (0, 0);
    let mut stack = vec![plan.clone()];
    while let Some(p) = stack.pop() {
        if let Some(f) = p.downcast_ref::<silt::lake::duplicate_hashes::DuplicateFilterExec>() {
            let n = p.metrics().and_then(|m| m.output_rows()).unwrap_or(0);
            if f.duplicated() {
                duplicated += n;
            } else {
                unique += n;
            }
        }
        stack.extend(p.children().into_iter().cloned());
    }
    (unique, duplicated)
}

/// The split is by key hash in a bitmap: keys seen once that share a bit with another key go
/// the exact way too. With a bitmap far too small for the keys most of them do, and the rows
/// kept are still the window's; every row goes to exactly one side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_share_a_hash_bit_go_the_exact_way_and_keep_the_same_rows() {
    let data = deliveries(120_000, 6);
    let window = session(Rules::Window, None, &data);
    let (expected, _) = run(&window, &latest("rn = 1")).await;
    let rows: usize = data.iter().flatten().map(|b| b.num_rows()).sum();
    let repeated: usize = run_scalar(
        &window,
        "select sum(c) as n from (select count(*) as c from t group by orderkey, linenumber \
         having count(*) > 1)",
    )
    .await
    .lines()
    .nth(3)
    .and_then(|l| {
        l.trim_matches(|c: char| c == '|' || c.is_whitespace())
            .parse()
            .ok()
    })
    .expect("a count");
    assert!(repeated > 1_000 && repeated < rows, "{repeated} of {rows}");
    let mut seen = Vec::new();
    // 2^16 bits for ~100 k keys: nearly every key shares a bit; 2^20: a tenth or so; silt's
    // own size: a few percent.
    for bits in [Some(1u64 << 16), Some(1 << 20), None] {
        let rule = bits.map_or_else(
            FirstOfKeyRule::default,
            FirstOfKeyRule::with_max_bitmap_bits,
        );
        let ctx = session_with(Rules::Silt, None, &data, rule);
        let (got, plan) = run(&ctx, &latest("rn = 1")).await;
        same(&got, &expected, &format!("rn = 1 with {bits:?} bits"));
        let (unique, duplicated) = split_rows(&plan);
        assert_eq!(
            unique + duplicated,
            rows,
            "{bits:?} bits: a row lost or doubled"
        );
        assert!(
            duplicated >= repeated,
            "{bits:?} bits: {duplicated} < {repeated}"
        );
        seen.push(duplicated);
    }
    // Fewer bits, more keys the exact way; the smallest bitmap sends a good part of the keys
    // seen once there.
    assert!(seen[0] > seen[1] && seen[1] > seen[2], "{seen:?}");
    assert!(
        seen[0] - repeated > (rows - repeated) / 4,
        "{seen:?}, {repeated} of {rows}"
    );
}

async fn run_scalar(ctx: &SessionContext, sql: &str) -> String {
    let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    pretty_format_batches(&batches).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_of_key_spills_its_sort_and_stays_within_a_small_pool() {
    let data = deliveries(300_000, 12);
    let window = session(Rules::Window, None, &data);
    let (expected, _) = run(&window, &latest("rn = 1")).await;
    // With the count first, only the duplicated rows are sorted; in 64 MiB the aggregates,
    // joins and that sort all fit beside each other.
    let silt = session(Rules::Silt, Some(64 << 20), &data);
    let (got, _) = run(&silt, &latest("rn = 1")).await;
    same(&got, &expected, "rn = 1 in 64 MiB");
    // The first-of-key pass alone sorts every row: in 16 MiB the sort has to spill.
    let small = session(Rules::FirstOfKey, Some(16 << 20), &data);
    let (got, plan) = run(&small, &latest("rn = 1")).await;
    same(&got, &expected, "rn = 1 in 16 MiB");
    let mut spills = 0;
    let mut stack = vec![plan.clone()];
    while let Some(p) = stack.pop() {
        if p.name() == "SortExec" {
            spills += p.metrics().and_then(|m| m.spill_count()).unwrap_or(0);
        }
        stack.extend(p.children().into_iter().cloned());
    }
    assert!(
        spills > 0,
        "the sort under the first-of-key pass did not spill:\n{}",
        plan_text(&plan)
    );
}

/// Through the CLI, on Delta tables (no row counts for the planner to weigh the join sides by):
/// a dedupe model over 240 k wide rows builds in a 32 MiB pool, where the window over every row
/// runs out of memory and so would a hash join holding the input; to the rows the window keeps.
#[test]
fn a_dedupe_model_over_a_delta_table_builds_in_a_small_pool() {
    use crate::support::datasets::{project, write};
    let p = project(&[
        (
            "sql/bronze/events.toml",
            "glob = \"events/*.csv\"\nformat = \"csv\"\nprimary_key = [\"account\", \"seq\"]\n\n\
             [[columns]]\nname = \"account\"\ntype = \"int64\"\nnullable = false\n\n\
             [[columns]]\nname = \"seq\"\ntype = \"int32\"\nnullable = false\n\n\
             [[columns]]\nname = \"payload\"\ntype = \"string\"\n",
        ),
        (
            "sql/silver/latest_events.sql",
            "{{ config(materialized='table') }}\n\
             select account, seq, payload from (\n\
               select *, row_number() over (partition by account, seq \
               order by _source_file desc, _source_line desc) as rn\n\
               from {{ source('events') }}) d\n\
             where rn = 1\n",
        ),
    ]);
    // Two files; the second re-delivers every 50th key with a new payload.
    let padding = "x".repeat(120);
    let mut first = String::from("account,seq,payload\n");
    let mut second = String::from("account,seq,payload\n");
    for i in 0..240_000i64 {
        first.push_str(&format!("{},{},first {i} {padding}\n", i / 4, i % 4));
        if i % 50 == 0 {
            second.push_str(&format!("{},{},second {i}\n", i / 4, i % 4));
        }
    }
    write(&p.landing(), "events/a.csv", &first);
    write(&p.landing(), "events/b.csv", &second);
    p.ok(&["ingest"]);
    p.ok_with_env(&["build"], &[("SILT_ENGINE_MEMORY_LIMIT_MB", "32")]);
    assert_eq!(
        p.count("select count(*) from silver.latest_events"),
        240_000
    );
    assert_eq!(
        p.count("select count(*) from silver.latest_events where payload like 'second %'"),
        4_800
    );
}
