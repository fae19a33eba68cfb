//! Rewriting a Delta table's data files without some of their rows, file by file: decoding a
//! file's Parquet (all or some columns), running such jobs in tokio tasks a few at a time, and
//! [`FileRewrite`], which streams one file's rows into new files of the table's own encoding,
//! leaving out the rows a [`DropRows`] selects. An erasure drops a subject's rows this way, and
//! an incremental MERGE the rows its staged rows replace. It must not decide which files or rows
//! to drop (its callers do) nor commit (they commit the new files with the old ones' removes).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{BooleanArray, RecordBatch};
use arrow::datatypes::Schema;
use bytes::Bytes;
use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
use deltalake::datafile::writer::{DeltaWriter, WriterConfig};
use futures::StreamExt;
use parquet::file::properties::WriterProperties;

use crate::error::{Error, Result};
use crate::lake::catalog::TableRef;
use crate::lake::storage::Storage;

pub fn decode_parquet(data: Bytes, what: &str) -> Result<Vec<RecordBatch>> {
    decode_parquet_for(data, what, None)
}

/// Decode a Parquet file; with `cols`, only those of them the file has (none of them: nothing
/// to match, no rows).
pub fn decode_parquet_for(
    data: Bytes,
    what: &str,
    cols: Option<&[String]>,
) -> Result<Vec<RecordBatch>> {
    let err = |source: parquet::errors::ParquetError| Error::Parquet {
        what: format!("{what}: cannot read Parquet"),
        source,
    };
    let mut builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(data)
        .map_err(err)?;
    if let Some(cols) = cols {
        let present: Vec<&str> = cols
            .iter()
            .map(String::as_str)
            .filter(|c| builder.schema().field_with_name(c).is_ok())
            .collect();
        if present.is_empty() {
            return Ok(Vec::new());
        }
        let mask = parquet::arrow::ProjectionMask::columns(builder.parquet_schema(), present);
        builder = builder.with_projection(mask);
    }
    let reader = builder.build().map_err(err)?;
    reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Parquet {
            what: format!("{what}: cannot read Parquet"),
            source: e.into(),
        })
}

/// How many files a rewrite scans or rewrites at once: one per core (at least two, at most
/// eight: each holds a batch outside the engine's pool).
pub fn files_at_once() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}

/// Each job in its own tokio task, [`files_at_once`] at a time; the results in the jobs' order.
///
/// A new job starts as soon as any running one is done, not when the oldest is: files differ
/// in size, and waiting for the oldest left a core idle behind every large file (an erasure's
/// steps ran at about 1.5 of 2 cores).
pub async fn each_in_a_task<T, F>(jobs: impl Iterator<Item = F>, what: &str) -> Vec<Result<T>>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T>> + Send + 'static,
{
    let mut done: Vec<(usize, Result<T>)> =
        futures::stream::iter(jobs.enumerate().map(move |(i, job)| async move {
            let r = tokio::spawn(job).await.map_err(|e| Error::task(what, e));
            (i, r.and_then(|r| r))
        }))
        .buffer_unordered(files_at_once())
        .collect()
        .await;
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// Like [`each_in_a_task`], as a stream: a result is handed over as soon as it and the ones
/// before it are done, so at most [`files_at_once`] jobs (and what they hold) are in flight.
pub fn in_tasks<'w, T, F>(
    jobs: impl Iterator<Item = F> + 'w,
    what: &'w str,
) -> impl futures::Stream<Item = Result<T>> + 'w
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T>> + Send + 'static,
{
    in_tasks_ahead(jobs, what, files_at_once())
}

/// [`in_tasks`] with `ahead` jobs in flight: more than the cores when the consumer does slow
/// work of its own between results (the tasks go on while it writes).
pub fn in_tasks_ahead<'w, T, F>(
    jobs: impl Iterator<Item = F> + 'w,
    what: &'w str,
    ahead: usize,
) -> impl futures::Stream<Item = Result<T>> + 'w
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T>> + Send + 'static,
{
    futures::stream::iter(
        jobs.map(
            move |job| async move { tokio::spawn(job).await.map_err(|e| Error::task(what, e))? },
        ),
    )
    .buffered(ahead.max(1))
}

/// Which rows of a batch (read with every column, partition columns included) a rewrite leaves
/// out: `true` drops the row.
pub type DropRows = Arc<dyn Fn(&RecordBatch) -> Result<BooleanArray> + Send + Sync>;

/// The writer settings of files rewritten into `snapshot`'s table: its columns, partitioning
/// and statistics settings, encoded with `props` (the table's own encoding).
pub fn writer_config(
    snapshot: &deltalake::kernel::EagerSnapshot,
    target: Arc<Schema>,
    props: Option<WriterProperties>,
) -> WriterConfig {
    let mut config: HashMap<String, Option<String>> = snapshot
        .metadata()
        .configuration()
        .iter()
        .map(|(k, v)| (k.clone(), Some(v.clone())))
        .collect();
    config.retain(|k, _| k.starts_with("delta.dataSkipping"));
    let (num_indexed, stats_cols) =
        deltalake::operations::get_num_idx_cols_and_stats_columns(None, config);
    WriterConfig::new(
        target,
        snapshot.metadata().partition_columns().to_vec(),
        props,
        None,
        None,
        num_indexed,
        stats_cols,
    )
}

/// A session that reads data files for a rewrite: strings as the files store them (no view
/// types to cast back before writing).
pub fn reading_session(lake: &Storage) -> Result<SessionContext> {
    let mut session = datafusion::prelude::SessionConfig::new();
    session
        .options_mut()
        .execution
        .parquet
        .schema_force_view_types = false;
    Ok(SessionContext::new_with_config_rt(
        session,
        datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
            .with_object_store_registry(lake.registry())
            .build_arc()?,
    ))
}

/// One data file rewritten: its rows but the dropped ones go to new files.
pub struct FileRewrite {
    pub table: DeltaTable,
    pub ctx: SessionContext,
    pub path: String,
    pub drop: DropRows,
    pub target: Arc<Schema>,
    pub writer_config: WriterConfig,
    pub t: TableRef,
    pub lake: Storage,
    pub partition_columns: Arc<Vec<String>>,
}

/// What a [`FileRewrite`] wrote.
#[derive(Debug, Default)]
pub struct Rewritten {
    pub adds: Vec<deltalake::kernel::Add>,
    pub dropped: u64,
    pub kept: u64,
}

impl FileRewrite {
    /// The new files' add actions, the rows left out and the rows kept. Memory holds one batch
    /// and the file being encoded.
    pub async fn run(self) -> Result<Rewritten> {
        let Self {
            table,
            ctx,
            path,
            drop,
            target,
            writer_config,
            t,
            lake,
            partition_columns,
        } = self;
        let provider: Arc<dyn datafusion::catalog::TableProvider> =
            if crate::lake::storage::absolute_url(&path).is_some() {
                // A clone's reference to another table's file: silt's own scan reads it
                // (delta-rs selects only files under the table's root).
                let one: HashSet<String> = [path.clone()].into_iter().collect();
                Arc::new(
                    crate::lake::snapshot_scan::SnapshotScan::try_new(
                        &lake,
                        &t.rel_path(),
                        &table,
                        Some(&one),
                    )
                    .await?,
                )
            } else {
                table
                    .table_provider()
                    .with_session(Arc::new(ctx.state()))
                    .with_file_selection(crate::lake::storage::select_files([path]))
                    .await
                    .map_err(Error::from_datafusion)?
            };
        let mut stream = ctx.read_table(provider)?.execute_stream().await?;
        let mut writer = DeltaWriter::new(table.log_store().object_store(None), writer_config);
        let mut out = Rewritten::default();
        while let Some(b) = stream.next().await {
            let b = b?;
            let mask = drop(&b)?;
            out.dropped += mask.true_count() as u64;
            let keep = arrow::compute::not(&mask)?;
            let kept = arrow::compute::filter_record_batch(&b, &keep)?;
            if kept.num_rows() == 0 {
                continue;
            }
            out.kept += kept.num_rows() as u64;
            let cols = target
                .fields()
                .iter()
                .map(|f| {
                    let c = kept.column_by_name(f.name()).ok_or_else(|| {
                        Error::Internal(format!("{t}: column {} missing on read", f.name()))
                    })?;
                    Ok(arrow::compute::cast(c, f.data_type())?)
                })
                .collect::<Result<Vec<_>>>()?;
            let kept = RecordBatch::try_new(target.clone(), cols)?;
            // One file's rows share its partition: written straight to it, without delta-rs
            // sorting and copying every batch to split it by partition values.
            let written = if partition_columns.is_empty() {
                writer.write(&kept).await
            } else {
                let values = crate::lake::files::partition_values(&kept, &partition_columns)?;
                writer.write_partition(kept, &values).await
            };
            written.map_err(|e| Error::delta(t.to_string(), e))?;
        }
        out.adds = writer
            .close()
            .await
            .map_err(|e| Error::delta(t.to_string(), e))?;
        Ok(out)
    }
}
