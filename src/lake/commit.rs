//! Appending Arrow batches to a Delta table as one commit (or committing data files that ingest's
//! parser tasks already wrote), carrying silt's commit metadata and the idempotency tokens (Delta
//! `txn` actions) that make re-runs safe. It must not decide what
//! to write (ingest and materialize do) nor build stores (storage.rs does).

use std::collections::HashMap;
use std::num::NonZeroU64;

use arrow::record_batch::RecordBatch;
use deltalake::DeltaTable;
use deltalake::kernel::Transaction;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::write::WriteBuilder;
use deltalake::protocol::SaveMode;

use crate::error::{Error, Result};
use crate::lake::catalog::TableRef;
use crate::lake::storage::Storage;

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

/// Commits between two checkpoints of the tables silt creates (Delta's default is 100). Every
/// command loads the tables it touches by replaying the log from the last checkpoint, and the
/// ingest ledger and model tables gain a commit per run: a short interval keeps that replay, and
/// so a run with nothing new, small however long the lake has lived.
pub const CHECKPOINT_INTERVAL: &str = "10";

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

/// Append one batch of silt's own bookkeeping (`_silt/*`: ledger, runs, batch statistics,
/// erasures, exports) with its `silt.*` commit metadata and, for a new table, its description.
pub async fn append_record(
    lake: &Storage,
    t: &TableRef,
    batch: RecordBatch,
    metadata: &[(&str, &str)],
    description: &str,
) -> Result<CommitOutcome> {
    append(
        lake,
        t,
        vec![batch],
        AppendOptions {
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
                .collect(),
            description: Some(description.into()),
            ..Default::default()
        },
    )
    .await
}

pub async fn append_to(
    table: DeltaTable,
    t: &TableRef,
    batches: Vec<RecordBatch>,
    opts: AppendOptions,
) -> Result<(CommitOutcome, DeltaTable)> {
    let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
    let mut table = table;
    if table.version().is_none() {
        // Create the table without retries: when another writer created it first, delta-rs
        // would retry this commit on top of theirs without checking its txn ids (the reloaded
        // snapshot already holds them), so two ingests of one file would both land it.
        let w = builder(table.clone().write(batches.clone()), true, t, &opts)
            .with_commit_properties(commit_properties(&opts).with_max_retries(0));
        match w.await {
            Ok(created) => {
                return Ok((
                    CommitOutcome {
                        version: created.version().unwrap_or(0),
                        rows,
                    },
                    created,
                ));
            }
            Err(e) => lost_creation(&mut table, t, &opts.app_ids, e).await?,
        }
    }
    let w = builder(table.write(batches), false, t, &opts);
    let table = w.await.map_err(|e| Error::delta(t.to_string(), e))?;
    Ok((
        CommitOutcome {
            version: table.version().unwrap_or(0),
            rows,
        },
        table,
    ))
}

/// Our commit creating `table` failed with `e`. If someone else created it meanwhile, load
/// theirs so the caller appends to it, unless it already holds one of our files (two ingests
/// of the same file into a new table; the conflict checker cannot see that, since their
/// creation is then our read snapshot). Otherwise the creation failed for its own reason.
async fn lost_creation(
    table: &mut DeltaTable,
    t: &TableRef,
    app_ids: &[String],
    e: deltalake::DeltaTableError,
) -> Result<()> {
    table
        .load()
        .await
        .map_err(|e| Error::delta(t.to_string(), e))?;
    if table.version().is_none() {
        return Err(Error::delta(t.to_string(), e));
    }
    if !committed_app_ids(table, app_ids).await?.is_empty() {
        return Err(Error::concurrent_step(&t.to_string()));
    }
    Ok(())
}

/// The commit metadata and txn ids of an append, retried up to 15 times on conflicts.
fn commit_properties(opts: &AppendOptions) -> CommitProperties {
    CommitProperties::default()
        .with_metadata(opts.metadata.clone())
        .with_application_transactions(
            opts.app_ids
                .iter()
                .map(|id| Transaction::new(id, 1))
                .collect(),
        )
        .with_max_retries(15)
}

/// The write options every append shares: save mode, schema merge, commit properties, file
/// size, and for a new table its partitioning, statistics columns and description.
fn builder(w: WriteBuilder, is_new: bool, t: &TableRef, opts: &AppendOptions) -> WriteBuilder {
    let props = commit_properties(opts);
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
        config.insert(
            "delta.checkpointInterval".into(),
            Some(CHECKPOINT_INTERVAL.into()),
        );
        w = w.with_configuration(config);
        if let Some(d) = &opts.description {
            w = w.with_description(d.clone());
        }
    }
    w
}

/// Commit data files written elsewhere (ingest's parser tasks) with one `txn` per app id: a
/// plain append, or the table's creation when it does not exist yet (version 0 then carries the
/// protocol and metadata; a concurrent creator turns ours into an append).
pub async fn commit_files(
    table: deltalake::DeltaTable,
    t: &TableRef,
    schema: &arrow::datatypes::Schema,
    adds: Vec<deltalake::kernel::Add>,
    app_ids: Vec<String>,
    opts: &AppendOptions,
) -> Result<deltalake::DeltaTable> {
    use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
    use deltalake::kernel::{Action, Transaction};
    use deltalake::protocol::{DeltaOperation, SaveMode};
    let mut actions: Vec<Action> = adds.into_iter().map(Action::Add).collect();
    actions.extend(
        app_ids
            .iter()
            .map(|id| Action::Txn(Transaction::new(id, 1))),
    );
    let props = || {
        CommitProperties::default()
            .with_metadata(opts.metadata.clone())
            .with_max_retries(15)
    };
    let err = |e: deltalake::DeltaTableError| Error::delta(t.to_string(), e);
    let mut table = table;
    let operation = DeltaOperation::Write {
        mode: SaveMode::Append,
        partition_by: (!opts.partition_columns.is_empty()).then(|| opts.partition_columns.clone()),
        predicate: None,
    };
    if table.version().is_none() {
        // Version 0 is this write with the table's protocol and metadata (what delta-rs's
        // own write does for a new table: reader 1 / writer 2, no features).
        use deltalake::kernel::MetadataExt;
        use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
        let kernel: deltalake::kernel::StructType = schema
            .try_into_kernel()
            .map_err(|e| err(deltalake::DeltaTableError::from(e)))?;
        let mut config: HashMap<String, String> = HashMap::new();
        if let Some(cols) = &opts.stats_columns {
            config.insert("delta.dataSkippingStatsColumns".into(), cols.join(","));
        }
        config.insert("delta.appendOnly".into(), "false".into());
        config.insert(
            "delta.checkpointInterval".into(),
            CHECKPOINT_INTERVAL.into(),
        );
        let mut metadata =
            deltalake::kernel::new_metadata(&kernel, opts.partition_columns.clone(), config)
                .and_then(|m| m.with_name(t.to_string()))
                .map_err(|e| err(e.into()))?;
        if let Some(d) = &opts.description {
            metadata = metadata
                .with_description(d.clone())
                .map_err(|e| err(e.into()))?;
        }
        let protocol: deltalake::kernel::Protocol = serde_json::from_value(
            serde_json::json!({"minReaderVersion": 1, "minWriterVersion": 2}),
        )
        .map_err(|e| err(e.into()))?;
        let mut first = vec![Action::Protocol(protocol), Action::Metadata(metadata)];
        first.extend(actions.iter().cloned());
        // No retries: when another writer created version 0 first, delta-rs would retry this
        // commit on top of it without checking its txn ids (the new snapshot already holds
        // them), so two ingests of one file into a new table would both land it.
        let created = CommitBuilder::from(props().with_max_retries(0))
            .with_actions(first)
            .build(None, table.log_store(), operation.clone())
            .await;
        match created {
            Ok(done) => {
                table
                    .update_incremental(Some(done.version()))
                    .await
                    .map_err(err)?;
                return Ok(table);
            }
            Err(e) => lost_creation(&mut table, t, &app_ids, e).await?,
        }
    }
    commit_actions(table, t, actions, props(), operation).await
}

/// A table replaced whole by data files written elsewhere (lake/files.rs), as one commit: every
/// current file removed and `adds` added, with `props`' metadata and delta-rs's write metrics.
/// A new table gets version 0 with its protocol and metadata (`schema`, `partition_columns`,
/// `configuration`, its name). Conflicts are retried by delta-rs's commit as for its own write.
/// The caller has checked that an existing table keeps its schema
/// and partitioning (a change goes through delta-rs's write, which rewrites the metadata).
#[allow(clippy::too_many_arguments)]
pub async fn commit_overwrite(
    table: DeltaTable,
    t: &TableRef,
    schema: &arrow::datatypes::Schema,
    partition_columns: Vec<String>,
    configuration: HashMap<String, Option<String>>,
    adds: Vec<deltalake::kernel::Add>,
    rows: u64,
    metadata: Vec<(String, serde_json::Value)>,
    description: Option<&str>,
) -> Result<DeltaTable> {
    use deltalake::kernel::Action;
    use deltalake::protocol::DeltaOperation;
    let err = |e: deltalake::DeltaTableError| Error::delta(t.to_string(), e);
    let mut actions: Vec<Action> = Vec::new();
    let snapshot = match table.version() {
        Some(_) => Some(table.snapshot().map_err(err)?.clone()),
        None => None,
    };
    let removed = match &snapshot {
        Some(s) => {
            let removes: Vec<Action> = s
                .log_data()
                .iter()
                .map(|f| Action::Remove(f.remove_action(true)))
                .collect();
            let n = removes.len();
            actions.extend(removes);
            n
        }
        None => {
            use deltalake::kernel::MetadataExt;
            use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
            let kernel: deltalake::kernel::StructType = schema
                .try_into_kernel()
                .map_err(|e| err(deltalake::DeltaTableError::from(e)))?;
            let config: HashMap<String, String> = configuration
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k, v)))
                .collect();
            let mut metadata =
                deltalake::kernel::new_metadata(&kernel, partition_columns.clone(), config)
                    .and_then(|m| m.with_name(t.to_string()))
                    .map_err(|e| err(e.into()))?;
            if let Some(d) = description {
                metadata = metadata
                    .with_description(d.to_string())
                    .map_err(|e| err(e.into()))?;
            }
            let protocol: deltalake::kernel::Protocol = serde_json::from_value(
                serde_json::json!({"minReaderVersion": 1, "minWriterVersion": 2}),
            )
            .map_err(|e| err(e.into()))?;
            actions.push(Action::Protocol(protocol));
            actions.push(Action::Metadata(metadata));
            0
        }
    };
    let added = adds.len();
    actions.extend(adds.into_iter().map(Action::Add));
    let operation = DeltaOperation::Write {
        mode: SaveMode::Overwrite,
        partition_by: (!partition_columns.is_empty()).then_some(partition_columns),
        predicate: None,
    };
    let mut metadata = metadata;
    metadata.push((
        "operationMetrics".to_string(),
        serde_json::json!({
            "num_added_files": added,
            "num_removed_files": removed,
            "num_added_rows": rows,
        }),
    ));
    commit_actions(
        table,
        t,
        actions,
        CommitProperties::default().with_metadata(metadata),
        operation,
    )
    .await
}

/// Commit `actions` to `table` on top of its current version (the table's creation when it has
/// none) with `props` (commit info, retries), and bring the handle to the version written.
pub async fn commit_actions(
    table: DeltaTable,
    t: &TableRef,
    actions: Vec<deltalake::kernel::Action>,
    props: CommitProperties,
    operation: deltalake::protocol::DeltaOperation,
) -> Result<DeltaTable> {
    let err = |e: deltalake::DeltaTableError| Error::delta(t.to_string(), e);
    let snapshot = match table.version() {
        Some(_) => Some(table.snapshot().map_err(err)?.clone()),
        None => None,
    };
    let done = deltalake::kernel::transaction::CommitBuilder::from(props)
        .with_actions(actions)
        .build(
            snapshot
                .as_ref()
                .map(|s| s as &dyn deltalake::kernel::transaction::TableReference),
            table.log_store(),
            operation,
        )
        .await
        .map_err(err)?;
    let mut table = table;
    table
        .update_incremental(Some(done.version()))
        .await
        .map_err(err)?;
    Ok(table)
}
