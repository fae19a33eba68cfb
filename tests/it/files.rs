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
