//! Appending Arrow batches to a Delta table as one commit, carrying silt's commit metadata and
//! the idempotency tokens (Delta `txn` actions) that make re-runs safe. It must not decide what
//! to write (ingest and materialize do) nor build stores (storage.rs does).

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::datasource::provider_as_source;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::LogicalPlanBuilder;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use deltalake::DeltaTable;
use deltalake::kernel::Transaction;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::write::WriteBuilder;
use deltalake::protocol::SaveMode;
use futures::StreamExt;

use crate::catalog::TableRef;
use crate::error::{Error, Result};
use crate::storage::Storage;

/// How to create the table if it does not exist yet, and what to stamp on the commit.
#[derive(Debug, Clone, Default)]
pub struct AppendOptions {
    pub partition_columns: Vec<String>,
    /// Columns that get min/max statistics; None = Delta's default (first 32).
    pub stats_columns: Option<Vec<String>>,
    /// Idempotency tokens: app ids that this commit records (version 1).
    pub app_ids: Vec<String>,
    /// `silt.*` commit metadata (operation, batch id, run id…).
    pub metadata: Vec<(String, serde_json::Value)>,
    pub target_file_size: Option<u64>,
    pub description: Option<String>,
    /// Replace the rows whose `_source_file` equals this path instead of appending.
    pub replace_source_file: Option<String>,
}

/// What one append wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CommitOutcome {
    pub version: u64,
    pub rows: u64,
}

/// The app ids among `ids` that the table has already committed.
pub async fn committed_app_ids(table: &DeltaTable, ids: &[String]) -> Result<Vec<String>> {
    let Ok(state) = table.snapshot() else {
        return Ok(Vec::new());
    };
    let log_store = table.log_store();
    let mut out = Vec::new();
    for id in ids {
        if state
            .transaction_version(log_store.as_ref(), id)
            .await
            .map_err(|e| Error::delta(table.table_url().as_str(), e))?
            .is_some()
        {
            out.push(id.clone());
        }
    }
    Ok(out)
}

/// Append `batches` to `t` in one commit, creating the table on first write.
pub async fn append(
    lake: &Storage,
    t: &TableRef,
    batches: Vec<RecordBatch>,
    opts: AppendOptions,
) -> Result<CommitOutcome> {
    let table = lake.delta_table(&t.rel_path()).await?;
    Ok(append_to(table, t, batches, opts).await?.0)
}

pub async fn append_to(
    table: DeltaTable,
    t: &TableRef,
    batches: Vec<RecordBatch>,
    opts: AppendOptions,
) -> Result<(CommitOutcome, DeltaTable)> {
    let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
    let is_new = table.version().is_none();
    let w = builder(table.write(batches), is_new, t, &opts);
    let table = w.await.map_err(|e| Error::delta(t.to_string(), e))?;
    Ok((
        CommitOutcome {
            version: table.version().unwrap_or(0),
            rows,
        },
        table,
    ))
}

/// Sender side of [`append_stream`]: an `Err` sent here fails the write (nothing commits).
pub type BatchSender = tokio::sync::mpsc::Sender<datafusion::error::Result<RecordBatch>>;

/// Like [`append_to`], for batches that arrive on a channel while they are being produced:
/// delta-rs encodes and uploads them as they come (files roll at the target size), so memory
/// holds only the batches in flight, never the whole commit. The commit happens once the
/// sender is dropped; `rows` in the outcome is 0 (the producer counts).
pub async fn append_stream(
    table: DeltaTable,
    t: &TableRef,
    schema: SchemaRef,
    rx: tokio::sync::mpsc::Receiver<datafusion::error::Result<RecordBatch>>,
    opts: AppendOptions,
) -> Result<(CommitOutcome, DeltaTable)> {
    let source = StreamingTable::try_new(
        schema.clone(),
        vec![Arc::new(ChannelPartition {
            schema,
            rx: Mutex::new(Some(rx)),
        })],
    )?;
    let plan = LogicalPlanBuilder::scan("silt_input", provider_as_source(Arc::new(source)), None)?
        .build()?;
    let is_new = table.version().is_none();
    let w = builder(
        table.write(Vec::new()).with_input_plan(plan),
        is_new,
        t,
        &opts,
    );
    let table = w.await.map_err(|e| Error::delta(t.to_string(), e))?;
    Ok((
        CommitOutcome {
            version: table.version().unwrap_or(0),
            rows: 0,
        },
        table,
    ))
}

/// One DataFusion partition reading a channel; it can be executed once.
struct ChannelPartition {
    schema: SchemaRef,
    rx: Mutex<Option<tokio::sync::mpsc::Receiver<datafusion::error::Result<RecordBatch>>>>,
}

impl std::fmt::Debug for ChannelPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChannelPartition")
    }
}

impl PartitionStream for ChannelPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let rx = self.rx.lock().ok().and_then(|mut g| g.take());
        let stream = match rx {
            Some(rx) => {
                futures::stream::unfold(
                    rx,
                    |mut rx| async move { rx.recv().await.map(|b| (b, rx)) },
                )
                .boxed()
            }
            None => futures::stream::once(async {
                Err(datafusion::error::DataFusionError::Internal(
                    "a streamed append can be executed once".into(),
                ))
            })
            .boxed(),
        };
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }
}

/// The write options every append shares: save mode, schema merge, commit properties, file
/// size, and for a new table its partitioning, statistics columns and description.
fn builder(w: WriteBuilder, is_new: bool, t: &TableRef, opts: &AppendOptions) -> WriteBuilder {
    let mut props = CommitProperties::default()
        .with_metadata(opts.metadata.clone())
        .with_application_transactions(
            opts.app_ids
                .iter()
                .map(|id| Transaction::new(id, 1))
                .collect(),
        );
    props = props.with_max_retries(15);
    let w = match &opts.replace_source_file {
        Some(path) => {
            use datafusion::prelude::{col, lit};
            w.with_save_mode(SaveMode::Overwrite)
                .with_replace_where(col("_source_file").eq(lit(path.clone())))
        }
        None => w.with_save_mode(SaveMode::Append),
    };
    let mut w = w
        .with_schema_mode(deltalake::operations::write::SchemaMode::Merge)
        .with_commit_properties(props)
        .with_target_file_size(opts.target_file_size.and_then(NonZeroU64::new));
    if is_new {
        w = w
            .with_partition_columns(opts.partition_columns.clone())
            .with_table_name(t.to_string());
        let mut config: HashMap<String, Option<String>> = HashMap::new();
        if let Some(cols) = &opts.stats_columns {
            config.insert(
                "delta.dataSkippingStatsColumns".into(),
                Some(cols.join(",")),
            );
        }
        config.insert("delta.appendOnly".into(), Some("false".into()));
        w = w.with_configuration(config);
        if let Some(d) = &opts.description {
            w = w.with_description(d.clone());
        }
    }
    w
}
