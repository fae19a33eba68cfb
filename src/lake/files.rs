//! Writing a query's rows into a partitioned Delta table's data files with a bounded number of
//! open files. delta-rs's writer keeps one open file per partition value until the very end of a
//! write, each holding its encoded row group and its upload buffer (measured 6 MiB per open
//! partition: 460 MiB for an 80-month table of 6 M rows), so a partitioned write's memory grew
//! with the partition count and was invisible to the memory pool. Here each input stream keeps
//! at most a few partitions open, each counted in the session's pool: when a new partition
//! needs a file, the least recently written one is finished. Rows that come later for a
//! partition this stream finished, and the rows of a batch spread over more partitions than
//! files may be open, go through one spilling sort on the partition columns and are written one
//! partition at a time at the end (Spark's `maxConcurrentOutputFileWriters` fallback). A
//! partition gets at most one file per stream plus one for such rows, and the write's memory is
//! bounded by the open-file limit, whatever the number of partitions. (Routing each partition
//! to one stream, as delta-rs does, halved the files but cost 12% more time: a hash and a copy
//! of every row.)
//!
//! It returns the files' add actions; it must not commit (lake/commit.rs does) nor decide what
//! to write.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, RecordBatch, UInt32Array};
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::execution::TaskContext;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::physical_expr::{LexOrdering, PhysicalSortExpr};
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};
use deltalake::datafile::writer::{DeltaWriter, WriterConfig};
use deltalake::kernel::Add;
use deltalake::logstore::ObjectStoreRef;
use futures::StreamExt;
use indexmap::IndexMap;
use tokio::sync::mpsc;

use crate::error::{Error, Result};

/// What one open partition file holds, counted against the pool when it opens: its row group
/// being encoded, the encoder's buffer and the upload buffer (measured about 6 MiB per file on
/// a 16-column table with 32k-row groups; rounded up).
pub const OPEN_FILE_BYTES: usize = 8 << 20;

/// Open partition files per input stream at most (fewer when a quarter of the pool cannot
/// hold them).
pub const MAX_OPEN_PER_STREAM: usize = 16;

const LATE_WRITER_STOPPED: &str = "the writer of late partition rows stopped";

/// What a bounded partitioned write did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FilesWritten {
    pub rows: u64,
    /// Files finished early to open another partition's file.
    pub closed_early: u64,
    /// Rows that came for a finished partition and were written after a sort.
    pub late_rows: u64,
    /// The most files open at once in one stream.
    pub peak_open: usize,
}

/// Write every partition of `plan` (whose columns are `table_schema`'s, in order; types are
/// cast to the table's) into data files of a table partitioned by `partition_columns`, with at
/// most [`MAX_OPEN_PER_STREAM`] files open per stream. The files are uploaded but not
/// committed: on error they are orphans that vacuum removes.
pub async fn write_partitioned(
    table: &str,
    plan: Arc<dyn ExecutionPlan>,
    task: Arc<TaskContext>,
    store: ObjectStoreRef,
    config: WriterConfig,
    table_schema: SchemaRef,
    partition_columns: Vec<String>,
) -> Result<(Vec<Add>, FilesWritten)> {
    // Late rows: one sort on the partition columns, fed while the streams run (it spills under
    // the session's pool), written one partition at a time once every stream is done.
    let (late_tx, late_rx) = mpsc::channel::<RecordBatch>(2);
    let late = {
        let sort_keys = partition_columns
            .iter()
            .map(|c| {
                Ok(PhysicalSortExpr::new_default(
                    datafusion::physical_expr::expressions::col(c, &table_schema)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let ordering = LexOrdering::new(sort_keys).ok_or_else(|| {
            Error::Internal("a partitioned write without partition columns".into())
        })?;
        let input = StreamingTableExec::try_new(
            table_schema.clone(),
            vec![Arc::new(Channel {
                schema: table_schema.clone(),
                rx: Mutex::new(Some(late_rx)),
            }) as Arc<dyn PartitionStream>],
            None,
            Vec::<LexOrdering>::new(),
            false,
            None,
        )?;
        let sort = SortExec::new(ordering, Arc::new(input));
        let sorted = sort.execute(0, task.clone())?;
        let (store, config, cols) = (store.clone(), config.clone(), partition_columns.clone());
        tokio::spawn(write_sorted(table.to_string(), sorted, store, config, cols))
    };

    let streams = datafusion::physical_plan::execute_stream_partitioned(plan, task.clone())?;
    // The open files may take a quarter of the pool (the query's sorts and joins need the
    // rest): that share decides how many files each stream keeps open, and what each counts.
    let share = match task.memory_pool().memory_limit() {
        datafusion::execution::memory_pool::MemoryLimit::Finite(b) => b / 4,
        _ => MAX_OPEN_PER_STREAM * OPEN_FILE_BYTES * streams.len().max(1),
    };
    let per_stream = share / streams.len().max(1);
    let max_open = (per_stream / OPEN_FILE_BYTES).clamp(1, MAX_OPEN_PER_STREAM);
    let file_bytes = OPEN_FILE_BYTES.min(per_stream);
    let mut drains = tokio::task::JoinSet::new();
    for stream in streams {
        let drain = Drain {
            table: table.to_string(),
            store: store.clone(),
            config: config.clone(),
            table_schema: table_schema.clone(),
            partition_columns: partition_columns.clone(),
            reservation: MemoryConsumer::new("partitioned write files")
                .register(task.memory_pool()),
            late: late_tx.clone(),
            max_open,
            file_bytes,
            open: HashMap::new(),
            finished: HashSet::new(),
            tick: 0,
            closing: tokio::task::JoinSet::new(),
            adds: Vec::new(),
            stats: FilesWritten::default(),
        };
        drains.spawn(drain.run(decoupled(stream)));
    }
    drop(late_tx);
    let mut adds = Vec::new();
    let mut stats = FilesWritten::default();
    let mut failed: Option<Error> = None;
    while let Some(done) = drains.join_next().await {
        match done {
            Ok(Ok((a, s))) => {
                adds.extend(a);
                stats.rows += s.rows;
                stats.closed_early += s.closed_early;
                stats.late_rows += s.late_rows;
                stats.peak_open = stats.peak_open.max(s.peak_open);
            }
            Ok(Err(e)) => {
                failed.get_or_insert(e);
                drains.abort_all();
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                failed.get_or_insert(Error::task("partitioned write", e));
                drains.abort_all();
            }
        }
    }
    if let Some(e) = failed {
        // A stream that lost the late-rows writer reports why that writer stopped.
        if matches!(&e, Error::Internal(m) if m == LATE_WRITER_STOPPED) {
            if let Ok(Err(late_error)) = late.await {
                return Err(late_error);
            }
        } else {
            late.abort();
        }
        return Err(e);
    }
    let (late_adds, late_rows) = late
        .await
        .map_err(|e| Error::task("partitioned write of late rows", e))??;
    adds.extend(late_adds);
    stats.rows += late_rows;
    Ok((adds, stats))
}

/// `stream` run by a task of its own, two batches ahead of its reader: the query computes the
/// next batches while the writer encodes the last ones (as delta-rs's write does). The task
/// stops when the reader goes away.
fn decoupled(mut stream: SendableRecordBatchStream) -> SendableRecordBatchStream {
    let schema = stream.schema();
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        while let Some(b) = stream.next().await {
            if tx.send(b).await.is_err() {
                break;
            }
        }
    });
    let batches = futures::stream::unfold(rx, |mut rx| async move {
        let b = rx.recv().await?;
        Some((b, rx))
    });
    Box::pin(RecordBatchStreamAdapter::new(schema, batches))
}

/// One input stream's writer: its open partition files, least recently written first out.
struct Drain {
    table: String,
    store: ObjectStoreRef,
    config: WriterConfig,
    table_schema: SchemaRef,
    partition_columns: Vec<String>,
    reservation: MemoryReservation,
    late: mpsc::Sender<RecordBatch>,
    /// Files open at once at most, and the bytes each counts in the pool.
    max_open: usize,
    file_bytes: usize,
    /// Partition key → its writer and the tick it last wrote.
    open: HashMap<String, (DeltaWriter, u64)>,
    /// Partitions whose file this stream finished: their later rows are late.
    finished: HashSet<String>,
    tick: u64,
    /// Files being finished in the background.
    closing: tokio::task::JoinSet<deltalake::DeltaResult<Vec<Add>>>,
    adds: Vec<Add>,
    stats: FilesWritten,
}

impl Drain {
    async fn run(
        mut self,
        mut stream: SendableRecordBatchStream,
    ) -> Result<(Vec<Add>, FilesWritten)> {
        let outcome = async {
            while let Some(batch) = stream.next().await {
                let batch = conform(&batch?, &self.table_schema)?;
                self.stats.rows += batch.num_rows() as u64;
                let groups = split(&batch, &self.partition_columns)?;
                // A batch spread over more partitions than files may be open is not clustered
                // (a dedupe's resolved keys, a shuffled input): its rows for partitions
                // without an open file wait for the sort, rather than finishing files that
                // clustered batches are filling.
                let scattered = groups.len() > self.max_open;
                for g in groups {
                    if scattered && !self.open.contains_key(&g.key) {
                        self.send_late(g.rows).await?;
                    } else {
                        self.write(g).await?;
                    }
                }
            }
            Ok::<(), Error>(())
        }
        .await;
        if let Err(e) = outcome {
            for (_, (w, _)) in self.open.drain() {
                let _ = w.abort().await;
            }
            self.closing.abort_all();
            return Err(e);
        }
        for (_, (w, _)) in std::mem::take(&mut self.open) {
            self.closing.spawn(w.close());
        }
        while let Some(done) = self.closing.join_next().await {
            self.adds.extend(self.closed(done)?);
        }
        self.reservation.free();
        tracing::debug!(table = %self.table, stats = ?self.stats, "partitioned write stream");
        Ok((self.adds, self.stats))
    }

    /// The add actions of a file finished in the background.
    fn closed(
        &self,
        done: std::result::Result<deltalake::DeltaResult<Vec<Add>>, tokio::task::JoinError>,
    ) -> Result<Vec<Add>> {
        done.map_err(|e| Error::task("finishing a partition file", e))?
            .map_err(|e| Error::delta(self.table.clone(), e))
    }

    /// Rows written after the streams, sorted, one partition at a time.
    async fn send_late(&mut self, rows: RecordBatch) -> Result<()> {
        self.stats.late_rows += rows.num_rows() as u64;
        self.stats.rows -= rows.num_rows() as u64;
        self.late
            .send(rows)
            .await
            .map_err(|_| Error::Internal(LATE_WRITER_STOPPED.into()))
    }

    async fn write(&mut self, g: Group) -> Result<()> {
        let Group { key, rows } = g;
        let values = partition_values(&rows, &self.partition_columns)?;
        self.tick += 1;
        if let Some((w, last)) = self.open.get_mut(&key) {
            *last = self.tick;
            return w
                .write_partition(rows, &values)
                .await
                .map_err(|e| Error::delta(self.table.clone(), e));
        }
        if self.finished.contains(&key) {
            return self.send_late(rows).await;
        }
        // Room for one more file: under the per-stream limit and in the pool; else the least
        // recently written file is finished first (at least one stays possible).
        while !self.open.is_empty()
            && (self.open.len() >= self.max_open
                || self.reservation.try_grow(self.file_bytes).is_err())
        {
            let lru = self
                .open
                .iter()
                .min_by_key(|(_, (_, last))| *last)
                .map(|(k, _)| k.clone())
                .unwrap_or_default();
            if let Some((w, _)) = self.open.remove(&lru) {
                // Finished in the background (its last row group encoded and uploaded), at
                // most two at a time, so the stream goes on.
                if self.closing.len() >= 2
                    && let Some(done) = self.closing.join_next().await
                {
                    let adds = self.closed(done)?;
                    self.adds.extend(adds);
                }
                self.closing.spawn(w.close());
                self.reservation
                    .shrink(self.file_bytes.min(self.reservation.size()));
                self.finished.insert(lru);
                self.stats.closed_early += 1;
            }
        }
        if self.open.is_empty() && self.reservation.size() == 0 {
            // One open file is always allowed (counted when the pool has room).
            let _ = self.reservation.try_grow(self.file_bytes);
        }
        let mut w = DeltaWriter::new(self.store.clone(), self.config.clone());
        if let Err(e) = w.write_partition(rows, &values).await {
            let _ = w.abort().await;
            return Err(Error::delta(self.table.clone(), e));
        }
        self.open.insert(key, (w, self.tick));
        self.stats.peak_open = self.stats.peak_open.max(self.open.len());
        Ok(())
    }
}

/// The late rows, sorted on the partition columns: one file open at a time.
async fn write_sorted(
    table: String,
    mut sorted: SendableRecordBatchStream,
    store: ObjectStoreRef,
    config: WriterConfig,
    partition_columns: Vec<String>,
) -> Result<(Vec<Add>, u64)> {
    let err = |e| Error::delta(table.clone(), e);
    let joined =
        |done: std::result::Result<deltalake::DeltaResult<Vec<Add>>, tokio::task::JoinError>| {
            done.map_err(|e| Error::task("finishing a partition file", e))?
                .map_err(err)
        };
    let mut adds = Vec::new();
    let mut rows = 0u64;
    let mut current: Option<(String, DeltaWriter)> = None;
    // Finished files upload in the background, two at a time.
    let mut closing = tokio::task::JoinSet::new();
    while let Some(batch) = sorted.next().await {
        let batch = batch?;
        for Group { key, rows: part } in split(&batch, &partition_columns)? {
            let values = partition_values(&part, &partition_columns)?;
            rows += part.num_rows() as u64;
            if current.as_ref().is_none_or(|(k, _)| *k != key) {
                if let Some((_, w)) = current.take() {
                    if closing.len() >= 2
                        && let Some(done) = closing.join_next().await
                    {
                        adds.extend(joined(done)?);
                    }
                    closing.spawn(w.close());
                }
                current = Some((key, DeltaWriter::new(store.clone(), config.clone())));
            }
            if let Some((_, w)) = current.as_mut() {
                w.write_partition(part, &values).await.map_err(err)?;
            }
        }
    }
    if let Some((_, w)) = current {
        closing.spawn(w.close());
    }
    while let Some(done) = closing.join_next().await {
        adds.extend(joined(done)?);
    }
    Ok((adds, rows))
}

/// `batch` with the table's column types (a query may produce string views or other types the
/// table stores differently); columns are matched by position.
pub fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch.clone());
    }
    let cols = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| {
            if c.data_type() == f.data_type() {
                Ok(c.clone())
            } else {
                Ok(arrow::compute::cast(c, f.data_type())?)
            }
        })
        .collect::<Result<Vec<ArrayRef>>>()?;
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

/// The rows of `batch` grouped by their partition values, groups in first-seen order (so a
/// sorted batch yields its runs in order). The key is only for grouping: delta-rs derives the
/// partition values of each file from the rows themselves.
pub fn split(batch: &RecordBatch, partition_columns: &[String]) -> Result<Vec<Group>> {
    let texts = partition_columns
        .iter()
        .map(|c| {
            let a = batch.column_by_name(c).ok_or_else(|| {
                Error::Internal(format!("partition column {c} missing from the rows"))
            })?;
            Ok(arrow::compute::cast(a, &DataType::Utf8)?)
        })
        .collect::<Result<Vec<ArrayRef>>>()?;
    let texts: Vec<&arrow::array::StringArray> = texts
        .iter()
        .map(|a| arrow::array::AsArray::as_string::<i32>(a.as_ref()))
        .collect();
    let n = batch.num_rows();
    if n == 0 {
        return Ok(Vec::new());
    }
    let values = |i: usize| -> Vec<Option<&str>> {
        texts
            .iter()
            .map(|t| (!t.is_null(i)).then(|| t.value(i)))
            .collect()
    };
    let same = |i: usize, j: usize| {
        texts
            .iter()
            .all(|t| t.is_null(i) == t.is_null(j) && (t.is_null(i) || t.value(i) == t.value(j)))
    };
    // Groups in first-seen order; runs of equal rows skip the lookup.
    let mut groups: Vec<(Vec<Option<&str>>, Vec<u32>)> = vec![(values(0), vec![0])];
    let mut index: HashMap<Vec<Option<&str>>, usize> = HashMap::from([(values(0), 0)]);
    let mut current = 0usize;
    for i in 1..n {
        if !same(i, i - 1) {
            let v = values(i);
            current = match index.get(&v) {
                Some(g) => *g,
                None => {
                    groups.push((v.clone(), Vec::new()));
                    index.insert(v, groups.len() - 1);
                    groups.len() - 1
                }
            };
        }
        groups[current].1.push(i as u32);
    }
    let key = |v: &[Option<&str>]| {
        v.iter()
            .map(|x| match x {
                Some(s) => s.to_string(),
                None => "\u{0}".to_string(),
            })
            .collect::<Vec<_>>()
            .join("\u{1}")
    };
    if groups.len() == 1 {
        // The common case: one partition per batch (input clustered by partition).
        return Ok(vec![Group {
            key: key(&groups[0].0),
            rows: batch.clone(),
        }]);
    }
    groups
        .into_iter()
        .map(|(v, rows)| {
            let idx = UInt32Array::from(rows);
            Ok(Group {
                key: key(&v),
                rows: arrow::compute::take_record_batch(batch, &idx)?,
            })
        })
        .collect()
}

/// The rows of one partition of a batch.
pub struct Group {
    /// Groups equal partition values (not a path: delta-rs spells those).
    pub key: String,
    pub rows: RecordBatch,
}

/// The partition values of a group's rows (its first row's), typed as the table's columns, as
/// the file's add action records them (generic: delta-rs does not export its scalar type).
pub(crate) fn partition_values<S: deltalake::kernel::scalars::ScalarExt>(
    batch: &RecordBatch,
    partition_columns: &[String],
) -> Result<IndexMap<String, S>> {
    partition_columns
        .iter()
        .map(|c| {
            let a = batch.column_by_name(c).ok_or_else(|| {
                Error::Internal(format!("partition column {c} missing from the rows"))
            })?;
            let v = S::from_array(a.as_ref(), 0).ok_or_else(|| {
                Error::Internal(format!(
                    "partition column {c}: value not readable as a scalar"
                ))
            })?;
            Ok((c.clone(), v))
        })
        .collect()
}

/// A stream fed through a channel, executed once (the sort's input).
struct Channel {
    schema: SchemaRef,
    rx: Mutex<Option<mpsc::Receiver<RecordBatch>>>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LateRows")
    }
}

impl PartitionStream for Channel {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let rx = self.rx.lock().ok().and_then(|mut r| r.take());
        let stream = futures::stream::unfold(rx, |rx| async move {
            let mut rx = rx?;
            let b = rx.recv().await?;
            Some((Ok(b), Some(rx)))
        });
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }
}
