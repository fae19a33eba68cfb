//! A partitioned write with a bounded number of open files (lake/files.rs): every row lands
//! once, in its partition, in one commit, whatever order the partitions come in, with a few
//! files open per stream (a quarter of the pool); rows that cannot use an open file go through
//! the spilling sort and are written one partition at a time.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::datasource::MemTable;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use silt::lake::catalog::{Layer, TableRef};
use silt::lake::files::{FilesWritten, MAX_OPEN_PER_STREAM, write_partitioned};
use silt::lake::storage::{CloudOptions, Storage};

const PARTITIONS: i64 = 40;

fn session(pool_mb: usize) -> SessionContext {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(FairSpillPool::new(pool_mb << 20)))
        .build_arc()
        .unwrap();
    let config = SessionConfig::new()
        .with_target_partitions(2)
        .with_batch_size(1024);
    SessionContext::new_with_state(
        SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            .build(),
    )
}

/// How the partition values come.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Order {
    /// Every batch holds every partition (a shuffled input).
    RoundRobin,
    /// Each batch holds two neighbouring months, the months advance batch by batch (a scan of
    /// files that each span a few months).
    Drifting,
    /// One month per batch, in order (a month-ordered scan).
    Clustered,
}

/// `rows` rows in two input partitions of 1,000-row batches, `month` in the given order.
fn input(rows: i64, order: Order) -> MemTable {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("note", DataType::Utf8, true),
        Field::new("month", DataType::Utf8, true),
    ]));
    let month = move |i: i64| {
        let m = match order {
            Order::RoundRobin => i % PARTITIONS,
            Order::Drifting => (i / 1000 + i % 2).min(PARTITIONS - 1),
            Order::Clustered => i * PARTITIONS / rows,
        };
        // One partition value is null: it is a partition of its own.
        (m != 7).then(|| format!("2024-{m:02}"))
    };
    let batch = |from: i64, to: i64| {
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(from..to)),
                Arc::new(StringArray::from_iter(
                    (from..to).map(|i| (i % 5 != 0).then(|| format!("note {i}"))),
                )),
                Arc::new(StringArray::from_iter((from..to).map(month))),
            ],
        )
        .unwrap()
    };
    let half = rows / 2;
    let part = |from: i64, to: i64| {
        (from..to)
            .step_by(1000)
            .map(|s| batch(s, (s + 1000).min(to)))
            .collect::<Vec<_>>()
    };
    MemTable::try_new(schema.clone(), vec![part(0, half), part(half, rows)]).unwrap()
}

/// Write `input` to a new table through the bounded writer and commit it; the table, what the
/// writer reports, and its files per partition directory.
async fn write(
    ctx: &SessionContext,
    input: MemTable,
    dir: &std::path::Path,
) -> (deltalake::DeltaTable, FilesWritten, BTreeMap<String, usize>) {
    let lake = Storage::new(
        &url::Url::from_directory_path(dir).unwrap(),
        &CloudOptions::default(),
    )
    .unwrap();
    let t = TableRef::new(Layer::Silver, "events");
    let table = lake.delta_table("silver/events").await.unwrap();
    assert!(table.version().is_none());
    let df = ctx.read_table(Arc::new(input)).unwrap();
    let schema = deltalake::kernel::normalize_for_delta(&Arc::new(df.schema().as_arrow().clone()));
    let cols = vec!["month".to_string()];
    let (indexed, stats) =
        deltalake::operations::get_num_idx_cols_and_stats_columns(None, Default::default());
    let config = deltalake::datafile::writer::WriterConfig::new(
        schema.clone(),
        cols.clone(),
        None,
        None,
        None,
        indexed,
        stats,
    );
    let plan = df.create_physical_plan().await.unwrap();
    assert_eq!(plan.properties().partitioning.partition_count(), 2);
    let (adds, written) = write_partitioned(
        "silver.events",
        plan,
        ctx.task_ctx(),
        table.log_store().object_store(None),
        config,
        schema.clone(),
        cols.clone(),
    )
    .await
    .unwrap();
    let table = silt::lake::commit::commit_overwrite(
        table,
        &t,
        &schema,
        cols,
        Default::default(),
        adds,
        written.rows,
        vec![("silt.operation".into(), "test".into())],
        None,
    )
    .await
    .unwrap();
    let mut per_partition = BTreeMap::new();
    for f in table.snapshot().unwrap().log_data().iter() {
        let path = f.path().to_string();
        let dir = path
            .rsplit_once('/')
            .map(|(d, _)| d.to_string())
            .unwrap_or_default();
        *per_partition.entry(dir).or_insert(0) += 1;
    }
    (table, written, per_partition)
}

async fn rows_of(ctx: &SessionContext, table: &deltalake::DeltaTable) -> String {
    ctx.register_table("events", table.table_provider().await.unwrap())
        .unwrap();
    let b = ctx
        .sql("select id, note, month from events order by id")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    ctx.deregister_table("events").unwrap();
    pretty_format_batches(&b).unwrap().to_string()
}

async fn expected(ctx: &SessionContext, input: MemTable) -> String {
    let b = ctx
        .read_table(Arc::new(input))
        .unwrap()
        .sort(vec![datafusion::prelude::col("id").sort(true, false)])
        .unwrap()
        .collect()
        .await
        .unwrap();
    pretty_format_batches(&b).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_in_any_order_are_written_with_a_few_files_open_and_every_row_once() {
    let rows = 40_000;
    // A quarter of the pool for open files: 256 MiB over two streams is 4 files of 8 MiB per
    // stream; 24 MiB is one file per stream.
    for (order, pool_mb, max_open) in [
        (Order::RoundRobin, 256, 4),
        (Order::Drifting, 256, 4),
        (Order::Clustered, 24, 1),
        (Order::RoundRobin, 24, 1),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let ctx = session(pool_mb);
        let (table, written, files) = write(&ctx, input(rows, order), dir.path()).await;
        let case = format!("{order:?} in {pool_mb} MiB: {written:?} {files:?}");
        assert_eq!(table.version(), Some(0), "{case}");
        assert_eq!(written.rows, rows as u64, "{case}");
        assert_eq!(
            rows_of(&ctx, &table).await,
            expected(&ctx, input(rows, order)).await,
            "{case}"
        );
        // Every partition, the null one included, and nothing else.
        assert_eq!(files.len(), PARTITIONS as usize, "{case}");
        assert!(
            files
                .keys()
                .any(|d| d.contains("__HIVE_DEFAULT_PARTITION__")),
            "{case}"
        );
        assert!(written.peak_open <= max_open, "{case}");
        assert!(max_open <= MAX_OPEN_PER_STREAM);
        match order {
            // Scattered batches open no file: all rows go through the sort, one file each.
            Order::RoundRobin => {
                assert_eq!(written.late_rows, rows as u64, "{case}");
                assert_eq!(written.closed_early, 0, "{case}");
                assert!(files.values().all(|n| *n == 1), "{case}");
            }
            // A month's file is finished when newer months need room, and no row comes late:
            // one file per partition and stream (the month at the streams' border has two).
            Order::Drifting | Order::Clustered => {
                assert_eq!(written.late_rows, 0, "{case}");
                assert!(written.closed_early >= 20, "{case}");
                assert!(files.values().all(|n| *n <= 2), "{case}");
                assert!(files.values().filter(|n| **n == 1).count() >= 30, "{case}");
            }
        }
    }
}

/// A Delta table partitioned by month, written in eight commits that each span every month
/// (as ingest commits do): its log lists the months eight times over. silt's sessions read it
/// partition after partition, so each scan stream sees the months in order, and a partitioned
/// write downstream never has to come back to a month. DataFusion's plan alone does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_of_a_partitioned_table_reads_one_partition_after_another() {
    use deltalake::protocol::SaveMode;
    use futures::TryStreamExt;
    let dir = tempfile::tempdir().unwrap();
    let url = url::Url::from_directory_path(dir.path()).unwrap();
    let mut table = deltalake::DeltaTable::try_from_url(url).await.unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("month", DataType::Utf8, false),
    ]));
    let months = 30;
    for commit in 0..8i64 {
        let ids: Vec<i64> = (0..months * 50).map(|i| commit * 10_000 + i).collect();
        let month: Vec<String> = ids
            .iter()
            .map(|i| format!("2001-{:02}", 1 + (i % months) / 3 + (i % 3) * 10))
            .collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(ids)),
                Arc::new(StringArray::from(month)),
            ],
        )
        .unwrap();
        table = table
            .write(vec![batch])
            .with_partition_columns(["month"])
            .with_save_mode(SaveMode::Append)
            .await
            .unwrap();
    }
    // Per output partition, the months in the order the scan delivers them.
    async fn months_per_stream(
        ordered: bool,
        table: &deltalake::DeltaTable,
    ) -> (Vec<Vec<String>>, String) {
        let config = SessionConfig::new()
            .with_target_partitions(2)
            .with_batch_size(64);
        let mut state = SessionStateBuilder::new()
            .with_config(config)
            .with_default_features();
        if ordered {
            state = state
                .with_physical_optimizer_rule(Arc::new(silt::lake::scan_order::PartitionOrderRule));
        }
        let ctx = SessionContext::new_with_state(state.build());
        ctx.register_table("t", table.table_provider().await.unwrap())
            .unwrap();
        let plan = crate::support::physical_plan(&ctx, "select month, id from t").await;
        let mut streams = Vec::new();
        let mut all = Vec::new();
        for p in 0..plan.properties().partitioning.partition_count() {
            let batches: Vec<RecordBatch> = plan
                .execute(p, ctx.task_ctx())
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            let mut seq: Vec<String> = Vec::new();
            for b in &batches {
                let m = b.column(0).as_any().downcast_ref::<StringArray>();
                let m = match m {
                    Some(m) => m.iter().map(|v| v.unwrap().to_string()).collect::<Vec<_>>(),
                    None => datafusion::arrow::compute::cast(b.column(0), &DataType::Utf8)
                        .unwrap()
                        .as_any()
                        .downcast_ref::<StringArray>()
                        .unwrap()
                        .iter()
                        .map(|v| v.unwrap().to_string())
                        .collect(),
                };
                seq.extend(m);
            }
            all.extend(batches);
            streams.push(seq);
        }
        let ordered_rows = SessionContext::new()
            .read_batches(all)
            .unwrap()
            .sort_by(vec![datafusion::prelude::col("id")])
            .unwrap()
            .collect()
            .await
            .unwrap();
        (
            streams,
            pretty_format_batches(&ordered_rows).unwrap().to_string(),
        )
    }
    let in_order = |s: &[String]| s.windows(2).all(|w| w[0] <= w[1]);
    let (log_order, expected) = months_per_stream(false, &table).await;
    let (partition_order, got) = months_per_stream(true, &table).await;
    assert_eq!(got, expected, "the same rows either way");
    assert_eq!(
        partition_order.iter().map(Vec::len).sum::<usize>(),
        8 * months as usize * 50
    );
    assert!(
        log_order.iter().any(|s| !in_order(s)),
        "in log order a stream comes back to months it has left"
    );
    for (i, s) in partition_order.iter().enumerate() {
        assert!(in_order(s), "stream {i} comes back to a month");
    }
    assert!(
        partition_order.iter().all(|s| !s.is_empty()),
        "both streams read"
    );
}
