//! One source's ingest: its new landing files in commit chunks, each hashed and classified
//! against the ledger and the source's file policies, parsed in units, committed to bronze and the
//! quarantine with one Delta txn per file, recorded in the ledger last, then checked for
//! anomalies. It must not list the landing root (mod.rs does).

use super::*;

/// One source's ingest: its landing files in commit chunks, each hashed, classified against
/// the ledger, parsed and committed to bronze, quarantine and the ledger.
pub(super) struct SourceRun<'r> {
    pub(super) src: &'r Source,
    pub(super) catalog: &'r Catalog,
    pub(super) landing: &'r Storage,
    pub(super) batch_id: &'r str,
    pub(super) ingested_at: i64,
    pub(super) cfg: &'r crate::project::config::IngestSection,
    pub(super) progress: Option<&'r SharedProgress>,
    /// Path → every content hash the ledger has for it.
    pub(super) rewritten: HashMap<String, Vec<String>>,
    /// The ledger's latest entry per path.
    pub(super) by_path: HashMap<String, LedgerEntry>,
    /// Content hash → the path it was ingested from.
    pub(super) by_sha: HashMap<String, String>,
    pub(super) report: SourceReport,
    /// Files refused as a whole (the others are ingested).
    pub(super) rejected: Vec<Error>,
}

/// A landing file read, hashed and classified as one to ingest.
pub(super) struct Candidate {
    pub(super) rel: String,
    pub(super) meta: ObjectMeta,
    pub(super) sha: String,
    pub(super) size: u64,
    /// Its bytes, when they fitted in the memory budget (else read again to parse).
    pub(super) data: Option<bytes::Bytes>,
    /// Its share of the memory budget while `data` is held (released when parsed).
    pub(super) permit: Option<tokio::sync::OwnedSemaphorePermit>,
    pub(super) replaces: bool,
    /// The Delta `txn` app id that marks this content as committed to a table.
    pub(super) app_id: String,
}

/// A candidate parsed and (for the streamed ones) written.
pub(super) struct Done {
    pub(super) c: Candidate,
    pub(super) rows: u64,
    pub(super) rejects: u64,
}

/// What the ledger says of a landing file just hashed.
pub(super) enum Verdict {
    /// Nothing to ingest: record this ledger entry (same content as before, a duplicate or
    /// a skipped change).
    Record(LedgerEntry),
    /// Refused as a whole (a changed file under `on_changed_file = "error"`).
    Refused,
    /// Ingest it; `replaces`: its rows replace those of its earlier version.
    Ingest { replaces: bool },
}

/// One chunk of a source's landing files on its way to its commits.
pub(super) struct ChunkWork {
    pub(super) stamp: Stamp,
    pub(super) qt: TableRef,
    pub(super) bt: TableRef,
    pub(super) q_table: deltalake::DeltaTable,
    pub(super) b_table: deltalake::DeltaTable,
    /// The labels of the chunk's commits.
    pub(super) meta: Vec<(String, serde_json::Value)>,
    /// Ledger entries of the files not ingested (known, duplicate, skipped), then of the
    /// ingested ones.
    pub(super) ledger: Vec<LedgerEntry>,
    /// The app id of every file to ingest.
    pub(super) ids: Vec<String>,
    pub(super) bytes: u64,
    /// Files that replace an earlier version of themselves, ingested one by one.
    pub(super) replacing: Vec<Candidate>,
    /// App ids bronze (or the quarantine) already holds, from an interrupted run.
    pub(super) b_done: Vec<String>,
    pub(super) q_done: Vec<String>,
    /// The streamed units in flight.
    pub(super) units: Units,
    pub(super) done: Vec<Done>,
    pub(super) stats: BatchStats,
}

impl SourceRun<'_> {
    /// Ingest `files`, of which `entries` is what the ledger knows (this source's entries).
    pub(super) async fn ingest(
        &mut self,
        files: Vec<ObjectMeta>,
        entries: Vec<LedgerEntry>,
    ) -> Result<()> {
        // Contents a GDPR erasure rewrote: the old one stays "already ingested" until the new
        // one lands (the ledger learns of the rewrite first).
        let mut known: HashMap<String, Vec<String>> = HashMap::new();
        for e in &entries {
            known
                .entry(e.path.clone())
                .or_default()
                .push(e.sha256.clone());
        }
        self.rewritten = known;
        for e in entries {
            if e.status.landed() {
                self.by_sha
                    .entry(e.sha256.clone())
                    .or_insert_with(|| e.path.clone());
            }
            self.by_path.insert(e.path.clone(), e);
        }
        // Files whose path, size and etag the ledger already holds are not even read.
        let mut todo = Vec::new();
        for m in files {
            let rel = self.landing.relative(&m.location).unwrap_or_default();
            match self.by_path.get(&rel) {
                Some(e) if e.size == m.size as i64 && e.e_tag == m.e_tag => {
                    self.report.files_already_ingested += 1;
                }
                _ => todo.push((rel, m)),
            }
        }
        // Commit in chunks bounded by file count and bytes.
        let mut chunk: Vec<(String, ObjectMeta)> = Vec::new();
        let mut chunk_bytes = 0u64;
        for (rel, m) in todo {
            if !chunk.is_empty()
                && (chunk.len() >= self.cfg.batch_files.max(1)
                    || chunk_bytes + m.size > self.cfg.batch_bytes)
            {
                self.chunk(std::mem::take(&mut chunk)).await?;
                chunk_bytes = 0;
            }
            chunk_bytes += m.size;
            chunk.push((rel, m));
        }
        if !chunk.is_empty() {
            self.chunk(chunk).await?;
        }
        Ok(())
    }

    /// Ingest one chunk: hash and classify its files while the units parse and upload the
    /// ones to ingest, swap the rows of changed files that replace theirs, commit bronze, the
    /// quarantine and the ledger, then check the batch for anomalies.
    pub(super) async fn chunk(&mut self, chunk: Vec<(String, ObjectMeta)>) -> Result<()> {
        let phase = Instant::now();
        let mut w = self.open_chunk().await?;
        self.hash_and_stream(chunk, &mut w).await?;
        if w.ids.is_empty() && w.ledger.is_empty() {
            return Ok(());
        }
        tracing::info!(
            source = %self.src.name,
            files = w.ids.len(),
            bytes = w.bytes,
            ms = phase.elapsed().as_millis() as u64,
            "hashed and classified"
        );
        w.q_done = committed_app_ids(&w.q_table, &w.ids).await?;
        let replacing_ids: Vec<String> = w.replacing.iter().map(|c| c.app_id.clone()).collect();
        w.b_done
            .extend(committed_app_ids(&w.b_table, &replacing_ids).await?);
        self.replace_files(&mut w).await?;
        failpoint::hit("ingest.before_bronze");
        self.commit_streamed(&mut w, phase).await?;
        self.record_ledger(&mut w).await?;
        failpoint::hit("ingest.after_ledger");
        tracing::info!(source = %self.src.name, ms = phase.elapsed().as_millis() as u64, "quarantine and ledger committed");
        // Anomaly checks on this batch's good rows (statistics gathered while parsing),
        // against the previous batches.
        if let Some(spec) = &self.src.anomaly
            && w.stats.rows > 0
        {
            let found =
                anomalies::check_batch(self.catalog, &self.src.name, spec, self.batch_id, &w.stats)
                    .await?;
            self.report.anomalies.extend(found);
        }
        Ok(())
    }

    /// The chunk's tables and commit labels.
    pub(super) async fn open_chunk(&self) -> Result<ChunkWork> {
        let meta = vec![
            (
                "silt.operation".to_string(),
                serde_json::Value::from("ingest"),
            ),
            (
                "silt.batch_id".to_string(),
                serde_json::Value::from(self.batch_id),
            ),
            (
                "silt.source".to_string(),
                serde_json::Value::from(self.src.name.as_str()),
            ),
        ];
        let qt = TableRef::quarantine(&self.src.name);
        let bt = TableRef::bronze(&self.src.name);
        Ok(ChunkWork {
            stamp: Stamp {
                src: Arc::new(self.src.clone()),
                batch_id: Arc::from(self.batch_id),
                ingested_at: self.ingested_at,
            },
            q_table: self.catalog.lake().delta_table(&qt.rel_path()).await?,
            b_table: self.catalog.lake().delta_table(&bt.rel_path()).await?,
            qt,
            bt,
            meta,
            ledger: Vec::new(),
            ids: Vec::new(),
            bytes: 0,
            replacing: Vec::new(),
            b_done: Vec::new(),
            q_done: Vec::new(),
            units: Units::default(),
            done: Vec::new(),
            stats: BatchStats::default(),
        })
    }

    /// How a commit to bronze or to the quarantine (`to`) is written: `ids`, the Delta `txn`
    /// app ids of its landing files; `replace`, the landing file whose earlier rows it replaces.
    pub(super) fn append_opts(
        &self,
        to: &TableRef,
        ids: Vec<String>,
        replace: Option<String>,
        meta: &[(String, serde_json::Value)],
    ) -> AppendOptions {
        let quarantine = to.layer == crate::lake::catalog::Layer::Quarantine;
        let stats = if quarantine {
            [
                "_source_file",
                "_source_line",
                "column_name",
                "_batch_id",
                "_ingested_at",
            ]
            .map(String::from)
            .to_vec()
        } else {
            self.stats_columns()
        };
        AppendOptions {
            partition_columns: match quarantine {
                true => vec![],
                false => self.src.partition.iter().map(|p| p.column_name()).collect(),
            },
            stats_columns: Some(stats),
            app_ids: ids,
            metadata: meta.to_vec(),
            target_file_size: Some(self.cfg.target_file_size),
            description: match quarantine {
                true => Some(format!(
                    "rows of source '{}' refused by its contract",
                    self.src.name
                )),
                false => self.src.description.clone(),
            },
            replace_source_file: replace,
        }
    }

    /// Hash every file of the chunk (a few at a time, on the blocking pool) and classify it
    /// against the ledger; start parsing the ones to ingest in units as they fill.
    ///
    /// The bytes of a file to ingest stay in memory until its parser is done with them,
    /// within `memory_bytes`: when the budget is spent, hashing waits for the parsers (so no
    /// file is read and hashed twice); only a file larger than the whole budget, or one that
    /// replaces an earlier version, is read again when parsed. Hashing, parsing and encoding
    /// overlap: a unit of consecutive files starts on the parser pool as soon as it is full.
    /// At most one unit per core runs at a time; units are small enough that memory does not
    /// follow the data and the last one does not leave a core idle for long (about 8 per
    /// core), large enough to coalesce small files.
    pub(super) async fn hash_and_stream(
        &mut self,
        chunk: Vec<(String, ObjectMeta)>,
        w: &mut ChunkWork,
    ) -> Result<()> {
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let total: u64 = chunk.iter().map(|(_, m)| m.size).sum();
        let unit_bytes = (total / (8 * workers as u64)).clamp(4 << 20, 16 << 20);
        let starter = UnitStarter {
            stamp: w.stamp.clone(),
            landing: self.landing.clone(),
            progress: self.progress.cloned(),
            want_stats: self.src.anomaly.is_some(),
            permits: Arc::new(tokio::sync::Semaphore::new(workers)),
        };
        let schema = w.stamp.bronze_schema();
        // Set up on the first file to stream (the table's schema evolves first if the contract
        // changed): the writer configuration, the store and the partition column.
        let mut writing: Option<WriterSetup> = None;
        let mut unit: Vec<Candidate> = Vec::new();
        let mut unit_size = 0u64;
        let landing = self.landing.clone();
        let mut hashed = futures::stream::iter(chunk)
            .map(|(rel, m)| {
                let landing = landing.clone();
                async move {
                    let data = landing.get(&m.location).await?;
                    let (data, sha) = sha256(data).await?;
                    Ok::<_, Error>((rel, m, data, sha))
                }
            })
            .buffered(4);
        // The budget in KiB permits; a kept file holds its permits until its parser ends.
        let budget_kib = (self.cfg.memory_bytes / 1024).clamp(1, u32::MAX as u64) as u32;
        let memory = Arc::new(tokio::sync::Semaphore::new(budget_kib as usize));
        while let Some(f) = hashed.next().await {
            let (rel, meta, data, sha) = f?;
            let size = data.len() as u64;
            let replaces = match self.classify(&rel, &meta, &sha) {
                Verdict::Ingest { replaces } => replaces,
                verdict => {
                    if let Some(p) = &self.progress {
                        p.advance(size);
                    }
                    if let Verdict::Record(e) = verdict {
                        w.ledger.push(e);
                    }
                    continue;
                }
            };
            self.by_sha
                .entry(sha.clone())
                .or_insert_with(|| rel.clone());
            let key = hex::encode(Sha256::digest(
                format!("{}\0{}\0{}", self.src.name, rel, sha).as_bytes(),
            ));
            let mut c = Candidate {
                app_id: format!("silt.ingest.{}", &key[..32]),
                rel,
                meta,
                sha,
                size,
                data: None,
                permit: None,
                replaces,
            };
            w.ids.push(c.app_id.clone());
            w.bytes += c.size;
            if c.replaces && w.b_table.version().is_some() {
                // Parsed after every unit has started: it must not hold the budget (read again).
                w.replacing.push(c);
                continue;
            }
            let kib = size.div_ceil(1024).max(1);
            if kib <= budget_kib as u64 {
                let kib = kib as u32;
                let permit = match memory.clone().try_acquire_many_owned(kib) {
                    Ok(p) => p,
                    Err(_) => {
                        // The budget is spent: the files held wait in units, so start the one
                        // being filled (it could otherwise wait for this very file), then wait.
                        w.units.start(
                            &starter,
                            writing.as_ref(),
                            &w.b_done,
                            &mut unit,
                            &mut unit_size,
                        );
                        memory
                            .clone()
                            .acquire_many_owned(kib)
                            .await
                            .map_err(|e| Error::task("ingest task", e))?
                    }
                };
                c.data = Some(data);
                c.permit = Some(permit);
            }
            if writing.is_none() {
                if w.b_table.version().is_some() && !same_columns(&w.b_table, &schema) {
                    // The contract changed: evolve the table's schema first (a commit with no data).
                    let (_, t) = append_to(
                        w.b_table.clone(),
                        &w.bt,
                        vec![RecordBatch::new_empty(schema.clone())],
                        self.append_opts(&w.bt, Vec::new(), None, &w.meta),
                    )
                    .await?;
                    w.b_table = t;
                }
                writing = Some(self.writer_setup(&w.b_table, &schema));
            }
            w.b_done
                .extend(committed_app_ids(&w.b_table, std::slice::from_ref(&c.app_id)).await?);
            unit_size += c.size;
            unit.push(c);
            if unit_size >= unit_bytes {
                w.units.start(
                    &starter,
                    writing.as_ref(),
                    &w.b_done,
                    &mut unit,
                    &mut unit_size,
                );
            }
        }
        w.units.start(
            &starter,
            writing.as_ref(),
            &w.b_done,
            &mut unit,
            &mut unit_size,
        );
        Ok(())
    }

    /// What to do with the landing file `rel` whose content hashes to `sha`, by what the
    /// ledger knows of it and the source's file policies.
    pub(super) fn classify(&mut self, rel: &str, meta: &ObjectMeta, sha: &str) -> Verdict {
        let entry = |status: FileStatus, detail: Option<String>| LedgerEntry {
            source: self.src.name.clone(),
            path: rel.to_string(),
            size: meta.size as i64,
            e_tag: meta.e_tag.clone(),
            sha256: sha.to_string(),
            status,
            rows: 0,
            quarantined: 0,
            batch_id: self.batch_id.to_string(),
            ingested_at: self.ingested_at,
            detail,
        };
        let sr = &mut self.report;
        let previous = self.by_path.get(rel);
        if let Some(prev) = previous
            && (prev.sha256 == sha
                || (prev.status == FileStatus::Rewritten
                    && self
                        .rewritten
                        .get(rel)
                        .is_some_and(|v| v.iter().any(|h| h == sha))))
        {
            // Same content, new etag (touched or copied again): remember the new etag.
            sr.files_already_ingested += 1;
            let mut e = entry(prev.status, prev.detail.clone());
            e.rows = prev.rows;
            e.quarantined = prev.quarantined;
            return Verdict::Record(e);
        }
        if let Some(other) = self.by_sha.get(sha)
            && self.src.on_duplicate_file == DuplicateFilePolicy::Skip
        {
            sr.files_duplicate += 1;
            sr.warnings.push(format!(
                "{rel}: same content as {other}, already ingested; skipped (on_duplicate_file = \"skip\")"
            ));
            return Verdict::Record(entry(
                FileStatus::Duplicate,
                Some(format!("same content as {other}")),
            ));
        }
        let Some(prev) = previous else {
            return Verdict::Ingest { replaces: false };
        };
        sr.files_changed += 1;
        match self.src.on_changed_file {
            ChangedFilePolicy::Skip => {
                sr.warnings.push(format!(
                    "{rel}: content changed since it was ingested (batch {}); skipped (on_changed_file = \"skip\")",
                    prev.batch_id
                ));
                Verdict::Record(entry(
                    FileStatus::Skipped,
                    Some(format!("changed; previous sha256 {}", prev.sha256)),
                ))
            }
            ChangedFilePolicy::Error => {
                sr.files_rejected += 1;
                self.rejected.push(Error::Input {
                    location: crate::error::InputLocation {
                        file: rel.to_string(),
                        line: 1,
                        column: None,
                    },
                    message: format!(
                        "the file changed since it was ingested in batch {}",
                        prev.batch_id
                    ),
                    fix: format!(
                        "deliver corrections under a new file name, or set on_changed_file = \"ingest\", \"replace\" or \"skip\" in {}",
                        self.src.file
                    ),
                });
                Verdict::Refused
            }
            ChangedFilePolicy::Ingest => {
                sr.warnings.push(format!(
                    "{rel}: content changed since it was ingested (batch {}); ingesting it as a new file",
                    prev.batch_id
                ));
                Verdict::Ingest { replaces: false }
            }
            ChangedFilePolicy::Replace => {
                sr.warnings.push(format!(
                    "{rel}: content changed since it was ingested (batch {}); replacing its rows",
                    prev.batch_id
                ));
                Verdict::Ingest { replaces: true }
            }
        }
    }

    /// Files that replace an earlier version of themselves: one at a time, each its own
    /// commit per table that swaps that file's rows (rare; held in memory). The streamed
    /// units keep running meanwhile; they only write files.
    pub(super) async fn replace_files(&mut self, w: &mut ChunkWork) -> Result<()> {
        for c in std::mem::take(&mut w.replacing) {
            let data = read_candidate(self.landing, &c).await?;
            let st = w.stamp.clone();
            let rel = c.rel.clone();
            let parsed = tokio::task::spawn_blocking(move || st.parse(&data, &rel))
                .await
                .unwrap_or_else(|e| Err(Error::task("parser task", e)));
            if let Some(p) = &self.progress {
                p.advance(c.size);
            }
            let p = match parsed {
                Err(e @ (Error::Input { .. } | Error::Config { .. })) => {
                    self.report.files_rejected += 1;
                    self.by_sha.remove(&c.sha);
                    self.rejected.push(e);
                    continue;
                }
                Err(e) => return Err(e),
                Ok(p) => p,
            };
            if !w.q_done.contains(&c.app_id) {
                let q = p
                    .quarantine
                    .clone()
                    .unwrap_or_else(|| RecordBatch::new_empty(quarantine_schema()));
                let replace = w.q_table.version().is_some().then(|| c.rel.clone());
                if replace.is_some() || q.num_rows() > 0 {
                    let opts = self.append_opts(&w.qt, vec![c.app_id.clone()], replace, &w.meta);
                    w.q_table = append_to(w.q_table.clone(), &w.qt, vec![q], opts).await?.1;
                }
            }
            if !w.b_done.contains(&c.app_id) {
                let mut b = p.bronze;
                if b.is_empty() {
                    b.push(w.stamp.bronze_batch(
                        &RecordBatch::new_empty(self.contract_schema()),
                        &[],
                        &c.rel,
                    )?);
                }
                let opts =
                    self.append_opts(&w.bt, vec![c.app_id.clone()], Some(c.rel.clone()), &w.meta);
                let (_, t) = append_to(w.b_table.clone(), &w.bt, b, opts).await?;
                self.report.bronze_version = t.version();
                w.b_table = t;
            }
            self.report.warnings.extend(p.warnings);
            if let Some(s) = p.stats {
                w.stats.merge(s);
            }
            w.done.push(Done {
                rows: p.rows,
                rejects: p.rejects,
                c,
            });
        }
        Ok(())
    }

    /// The streamed units: each parsed and encoded its files into Parquet files uploaded as
    /// they filled; one commit adds them all to bronze with one Delta `txn` per file, then one
    /// commit adds their refused rows (with their raw records) to the quarantine.
    pub(super) async fn commit_streamed(
        &mut self,
        w: &mut ChunkWork,
        phase: Instant,
    ) -> Result<()> {
        let mut adds: Vec<deltalake::kernel::Add> = Vec::new();
        let mut quarantine: Vec<(String, RecordBatch)> = Vec::new();
        let mut stream_ids: Vec<String> = Vec::new();
        for r in std::mem::take(&mut w.units).join().await {
            let r = r?;
            adds.extend(r.adds);
            if let Some(s) = r.stats {
                w.stats.merge(s);
            }
            for f in r.files {
                let p = match f.outcome {
                    Err(e) => {
                        self.report.files_rejected += 1;
                        self.by_sha.remove(&f.c.sha);
                        self.rejected.push(e);
                        continue;
                    }
                    Ok(p) => p,
                };
                self.report.warnings.extend(p.warnings);
                if p.rows > 0 && !w.b_done.contains(&f.c.app_id) {
                    stream_ids.push(f.c.app_id.clone());
                }
                if let Some(q) = p.quarantine
                    && !w.q_done.contains(&f.c.app_id)
                {
                    quarantine.push((f.c.app_id.clone(), q));
                }
                w.done.push(Done {
                    rows: p.rows,
                    rejects: p.rejects,
                    c: f.c,
                });
            }
        }
        tracing::info!(
            source = %self.src.name,
            files = adds.len(),
            ms = phase.elapsed().as_millis() as u64,
            "parsed, encoded and uploaded"
        );
        w.meta
            .push(("silt.files".into(), serde_json::Value::from(w.done.len())));
        if !adds.is_empty() {
            let t = commit_files(
                w.b_table.clone(),
                &w.bt,
                &w.stamp.bronze_schema(),
                adds,
                stream_ids,
                &self.append_opts(&w.bt, Vec::new(), None, &w.meta),
            )
            .await?;
            self.report.bronze_version = t.version();
        }
        failpoint::hit("ingest.after_bronze");
        tracing::info!(source = %self.src.name, ms = phase.elapsed().as_millis() as u64, "bronze committed");
        if !quarantine.is_empty() {
            let ids = quarantine.iter().map(|(id, _)| id.clone()).collect();
            let batches = quarantine.into_iter().map(|(_, b)| b).collect();
            let opts = self.append_opts(&w.qt, ids, None, &w.meta);
            append_to(w.q_table.clone(), &w.qt, batches, opts).await?;
        }
        failpoint::hit("ingest.after_quarantine");
        Ok(())
    }

    /// The ledger: every file of the chunk, in one commit, last (a file is in the ledger only
    /// once its rows are in bronze and the quarantine).
    pub(super) async fn record_ledger(&mut self, w: &mut ChunkWork) -> Result<()> {
        for d in &w.done {
            let sr = &mut self.report;
            sr.files_ingested += 1;
            sr.rows += d.rows;
            sr.quarantined += d.rejects;
            sr.bytes += d.c.size;
            let empty = d.rows == 0 && d.rejects == 0;
            if empty {
                sr.files_empty += 1;
            }
            let e = LedgerEntry {
                source: self.src.name.clone(),
                path: d.c.rel.clone(),
                size: d.c.meta.size as i64,
                e_tag: d.c.meta.e_tag.clone(),
                sha256: d.c.sha.clone(),
                status: if empty {
                    FileStatus::Empty
                } else {
                    FileStatus::Ingested
                },
                rows: d.rows as i64,
                quarantined: d.rejects as i64,
                batch_id: self.batch_id.to_string(),
                ingested_at: self.ingested_at,
                detail: d
                    .c
                    .replaces
                    .then(|| "replaced the rows of the earlier version".to_string()),
            };
            self.by_path.insert(e.path.clone(), e.clone());
            w.ledger.push(e);
        }
        ledger::record(self.catalog.lake(), &w.ledger, self.batch_id).await
    }

    pub(super) fn contract_schema(&self) -> Arc<Schema> {
        Arc::new(Schema::new(
            self.src
                .columns
                .iter()
                .map(|c| c.to_arrow_field())
                .collect::<Vec<_>>(),
        ))
    }

    /// The writer every unit of a chunk uses, for the table as it is now (its schema and
    /// partition columns; the contract's when the table does not exist yet).
    pub(super) fn writer_setup(
        &self,
        b_table: &deltalake::DeltaTable,
        schema: &Arc<Schema>,
    ) -> WriterSetup {
        let (table_schema, partition_columns) = match b_table.snapshot() {
            Ok(s) => (
                s.snapshot().arrow_schema(),
                s.metadata().partition_columns().to_vec(),
            ),
            Err(_) => (
                schema.clone(),
                self.src.partition.iter().map(|p| p.column_name()).collect(),
            ),
        };
        let mut config: HashMap<String, Option<String>> = HashMap::new();
        config.insert(
            "delta.dataSkippingStatsColumns".into(),
            Some(self.stats_columns().join(",")),
        );
        let partition_column = match partition_columns.as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        };
        let (num_indexed, stats_cols) =
            deltalake::operations::get_num_idx_cols_and_stats_columns(None, config);
        WriterSetup {
            config: deltalake::datafile::writer::WriterConfig::new(
                table_schema,
                partition_columns,
                Some(writer_properties(self.src)),
                NonZeroU64::new(self.cfg.target_file_size),
                Some(32 * 1024),
                num_indexed,
                stats_cols,
            ),
            store: b_table.log_store().object_store(None),
            partition_column,
        }
    }

    /// Columns with min/max statistics: every column but the declared PII and the column that
    /// leads to a subject (its subject key or subject_via column): an erased id must not
    /// survive in the statistics of a log entry or a checkpoint.
    pub(super) fn stats_columns(&self) -> Vec<String> {
        let subject = self.src.subject_key.as_ref().or(self
            .src
            .subject_via
            .as_ref()
            .map(|v| &v.column));
        let mut cols: Vec<String> = self
            .src
            .columns
            .iter()
            .filter(|c| !self.src.pii.contains(&c.name) && subject != Some(&c.name))
            .map(|c| c.name.clone())
            .collect();
        cols.extend(
            ["_source_file", "_source_line", "_ingested_at", "_batch_id"].map(String::from),
        );
        cols
    }
}

/// The hex SHA-256 of a landing file's bytes, computed on the blocking pool.
pub(super) async fn sha256(data: bytes::Bytes) -> Result<(bytes::Bytes, String)> {
    tokio::task::spawn_blocking(move || {
        let sha = hex::encode(Sha256::digest(&data));
        (data, sha)
    })
    .await
    .map_err(|e| Error::task("hashing task", e))
}
