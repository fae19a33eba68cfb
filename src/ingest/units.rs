//! Units: consecutive landing files parsed, encoded into Parquet and uploaded on the blocking
//! pool while later files are still being hashed, at most one unit per core, joined in order. A
//! unit only writes files; the chunk commits them (an aborted unit leaves files no commit refers
//! to). It must not commit.

use super::*;

/// What every unit of one chunk writes with.
pub(super) struct WriterSetup {
    pub(super) config: deltalake::datafile::writer::WriterConfig,
    pub(super) store: deltalake::logstore::ObjectStoreRef,
    /// The table's partition column (silt partitions bronze by at most one).
    pub(super) partition_column: Option<String>,
}

/// The units of a chunk in flight, joined in the order they started. Dropped early (the
/// chunk failed), it aborts them: they have only written files no commit refers to.
#[derive(Default)]
pub(super) struct Units(Vec<tokio::task::JoinHandle<Result<UnitResult>>>);

/// What every unit of a chunk shares, besides the writer.
pub(super) struct UnitStarter {
    pub(super) stamp: Stamp,
    pub(super) landing: Storage,
    pub(super) progress: Option<SharedProgress>,
    pub(super) want_stats: bool,
    /// One per core: a unit waits for one before reading its files.
    pub(super) permits: Arc<tokio::sync::Semaphore>,
}

impl Units {
    /// Start the unit being filled, if it holds a file, and leave it empty (`size`: its bytes;
    /// `b_done`: the files bronze already holds, from an interrupted run).
    pub(super) fn start(
        &mut self,
        s: &UnitStarter,
        w: Option<&WriterSetup>,
        b_done: &[String],
        unit: &mut Vec<Candidate>,
        size: &mut u64,
    ) {
        if unit.is_empty() {
            return;
        }
        let unit = std::mem::take(unit);
        *size = 0;
        let w = w.expect("the writer is set up before the first unit");
        let job = UnitJob {
            stamp: s.stamp.clone(),
            landing: s.landing.clone(),
            store: w.store.clone(),
            config: w.config.clone(),
            b_done: b_done.to_vec(),
            want_stats: s.want_stats,
            progress: s.progress.clone(),
            partition_column: w.partition_column.clone(),
        };
        let permits = s.permits.clone();
        self.0.push(tokio::spawn(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .map_err(|e| Error::task("ingest task", e))?;
            job.run(unit).await
        }));
    }

    pub(super) async fn join(mut self) -> Vec<Result<UnitResult>> {
        let mut out = Vec::new();
        for h in std::mem::take(&mut self.0) {
            out.push(
                h.await
                    .unwrap_or_else(|e| Err(Error::task("ingest task", e))),
            );
        }
        out
    }
}

impl Drop for Units {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// One unit of consecutive landing files for one parser task: parse each, write its good rows
/// through a delta-rs `DeltaWriter` (Parquet files roll at the target size and upload as they
/// fill), keep its refused rows for the quarantine commit.
pub(super) struct UnitJob {
    pub(super) stamp: Stamp,
    pub(super) landing: Storage,
    pub(super) store: deltalake::logstore::ObjectStoreRef,
    pub(super) config: deltalake::datafile::writer::WriterConfig,
    /// Files whose rows an earlier, interrupted ingest already committed to bronze.
    pub(super) b_done: Vec<String>,
    pub(super) want_stats: bool,
    pub(super) progress: Option<SharedProgress>,
    /// The table's partition column (silt partitions bronze by at most one).
    pub(super) partition_column: Option<String>,
}

pub(super) struct UnitFile {
    pub(super) c: Candidate,
    /// Err: the file is refused as a whole (stays out of the ledger).
    pub(super) outcome: Result<Parsed>,
}

pub(super) struct UnitResult {
    pub(super) adds: Vec<deltalake::kernel::Add>,
    pub(super) files: Vec<UnitFile>,
    pub(super) stats: Option<BatchStats>,
}

impl UnitJob {
    pub(super) async fn run(self, unit: Vec<Candidate>) -> Result<UnitResult> {
        let mut writer =
            deltalake::datafile::writer::DeltaWriter::new(self.store.clone(), self.config.clone());
        let mut files = Vec::new();
        let mut stats: Option<BatchStats> = None;
        let mut failed: Option<Error> = None;
        for mut c in unit {
            let data = match read_candidate(&self.landing, &c).await {
                Ok(d) => d,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            c.data = None; // the parser's copy is the last one
            let permit = c.permit.take(); // released once the parser drops its copy

            // The parser hands slices over a short channel while this task encodes the ones
            // before: a file is never whole in memory, and parsing overlaps encoding.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<RecordBatch>(2);
            let st = self.stamp.clone();
            let rel = c.rel.clone();
            let want = self.want_stats;
            let parser = tokio::task::spawn_blocking(move || {
                let parsed = st.parse_with(&data, &rel, want, &mut |b| {
                    tx.blocking_send(b)
                        .map_err(|_| Error::task("the bronze writer", "it stopped"))
                });
                drop(data);
                drop(permit);
                parsed
            });
            // Rows an earlier, interrupted ingest already committed are parsed (for the ledger
            // and the quarantine) but not written again.
            let write = !self.b_done.contains(&c.app_id);
            let mut slices = 0usize;
            let mut write_failed = None;
            while let Some(b) = rx.recv().await {
                slices += 1;
                if write
                    && let Err(e) =
                        write_bronze(&mut writer, self.partition_column.as_deref(), b).await
                {
                    write_failed = Some(Error::delta(format!("bronze.{}", self.stamp.src.name), e));
                    break;
                }
            }
            drop(rx); // a parser still sending stops
            let parsed = parser
                .await
                .unwrap_or_else(|e| Err(Error::task("parser task", e)));
            if let Some(e) = write_failed {
                failed = Some(e);
                break;
            }
            if let Some(p) = &self.progress {
                p.advance(c.size);
            }
            let mut parsed = match parsed {
                // Refused as a whole: parsers refuse before their first slice, so the writer
                // holds none of its rows.
                Err(e @ (Error::Input { .. } | Error::Config { .. })) if slices == 0 => {
                    files.push(UnitFile { c, outcome: Err(e) });
                    continue;
                }
                // Refused after rows went to the writer (a parser broke its promise): fail
                // the unit, so nothing of it is committed.
                Err(e) => {
                    failed = Some(e);
                    break;
                }
                Ok(p) => p,
            };
            if let Some(s) = parsed.stats.take() {
                match &mut stats {
                    Some(all) => all.merge(s),
                    None => stats = Some(s),
                }
            }
            files.push(UnitFile {
                c,
                outcome: Ok(parsed),
            });
        }
        if let Some(e) = failed {
            let _ = writer.abort().await;
            return Err(e);
        }
        let adds = writer
            .close()
            .await
            .map_err(|e| Error::delta(format!("bronze.{}", self.stamp.src.name), e))?;
        Ok(UnitResult { adds, files, stats })
    }
}

/// Hand a file's good rows to the writer. Rows of a landing file nearly always share one
/// partition value; then the batch goes straight to that partition's writer, skipping the
/// general split (a sort and a copy of every column).
pub(super) async fn write_bronze(
    writer: &mut deltalake::datafile::writer::DeltaWriter,
    partition_column: Option<&str>,
    batch: RecordBatch,
) -> deltalake::DeltaResult<()> {
    use arrow::array::Array;
    if let Some(name) = partition_column
        && let Ok(i) = batch.schema().index_of(name)
        && let Some(values) = batch.column(i).as_string_opt::<i32>()
        && !values.is_empty()
    {
        let one = if values.null_count() == values.len() {
            true
        } else if values.null_count() == 0 {
            let first = values.value(0);
            values.iter().all(|v| v == Some(first))
        } else {
            false
        };
        if one {
            use deltalake::kernel::scalars::ScalarExt;
            let value = ScalarExt::from_array(values, 0).ok_or_else(|| {
                deltalake::DeltaTableError::generic("partition value not readable as a scalar")
            })?;
            let key = indexmap::IndexMap::from([(name.to_string(), value)]);
            return writer.write_partition(batch, &key).await;
        }
    }
    writer.write(&batch).await
}

/// A candidate's bytes: kept from hashing, or read again (and checked against its hash).
pub(super) async fn read_candidate(landing: &Storage, c: &Candidate) -> Result<bytes::Bytes> {
    if let Some(d) = &c.data {
        return Ok(d.clone());
    }
    let data = landing.get(&c.meta.location).await?;
    let (data, sha) = sha256(data).await?;
    if sha != c.sha {
        return Err(Error::Input {
            location: crate::error::InputLocation {
                file: c.rel.clone(),
                line: 1,
                column: None,
            },
            message: "the file changed while it was being ingested".into(),
            fix: "deliver landing files complete (write then rename), then run ingest again".into(),
        });
    }
    Ok(data)
}
