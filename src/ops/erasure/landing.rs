//! The landing step of an erasure: every landing file of a source in scope rewritten without
//! the subjects' records (or deleted when nothing else is left), the ledger told first so the
//! rewrite is never taken for new content, and told the new files' etags after, so the next
//! ingest does not read them again. It must not touch lake tables other than the ledger.

use super::*;

/// How many bytes of rewritten landing files wait for one ledger commit (a commit per file
/// would make the landing step mostly ledger writes).
pub(super) const LANDING_GROUP_BYTES: usize = 32 << 20;

/// A landed group: each file's path and the records it dropped (`None`: the file was removed),
/// and the ledger entries that give the rewritten files their new etags (recorded with the
/// next group's, or after the last group).
struct Landed {
    files: Vec<(String, Option<u64>)>,
    tagged: Vec<LedgerEntry>,
}

/// A landing task's outcome.
async fn joined<T>(h: tokio::task::JoinHandle<Result<T>>) -> Result<T> {
    h.await.map_err(|e| Error::task("landing erasure", e))?
}

/// A landing file's location, its path relative to the landing root, and its rewrite.
pub(super) type LandingFile = (object_store::path::Path, String, Option<(Vec<u8>, u64)>);

/// Landing files rewritten (`Some`: new content, records dropped) or to delete (`None`), with
/// their ledger entries, not yet landed.
#[derive(Default)]
pub(super) struct LandingGroup {
    pub(super) files: Vec<LandingFile>,
    pub(super) entries: Vec<LedgerEntry>,
    pub(super) bytes: usize,
}

impl Run<'_> {
    /// Rewrite (or remove) the landing files of `src` that hold a subject's records (by the
    /// key field, `keys` holding the values that belong to the subjects).
    pub(super) async fn landing(
        &mut self,
        src: &Source,
        keys: Arc<KeySet>,
        listed: &[object_store::ObjectMeta],
    ) -> Result<()> {
        let landing = &self.silt.landing;
        let mut step = TableErasure::new(format!("landing:{}", src.name), Step::Landing);
        let entries = ledger::read(&self.silt.catalog, &src.name).await?;
        let mut latest: HashMap<String, LedgerEntry> = HashMap::new();
        for e in entries {
            latest.insert(e.path.clone(), e);
        }
        let batch_id = format!("erasure-{}", self.request);
        let mut group = LandingGroup::default();
        let mut files = Vec::new();
        for m in listed {
            let Some(rel) = landing.relative(&m.location) else {
                continue;
            };
            if src.glob.is_match(&rel) {
                files.push((m.location.clone(), rel));
            }
        }
        step.files_scanned = files.len() as u64;
        // Each file is read, searched and rewritten in its own task; the results come back in
        // listing order, so the ledger groups are as before.
        let shared = Arc::new(src.clone());
        let headers: Arc<std::sync::Mutex<HashMap<String, Vec<String>>>> = Default::default();
        let jobs = files.into_iter().map(|(location, rel)| {
            let (landing, n, shared, keys, headers) = (
                landing.clone(),
                self.n.clone(),
                shared.clone(),
                keys.clone(),
                headers.clone(),
            );
            async move {
                let src = &*shared;
                let data = landing.get(&location).await?;
                if src.format == Format::Csv
                    && src.parse.header
                    && let Some(h) = csv_header(&data, src)
                {
                    headers.lock().unwrap().insert(rel.clone(), h);
                }
                let rec = Records::new(src, &keys, &n);
                let Some((bytes, dropped)) = without_subjects(&data, &rec) else {
                    return Ok(None);
                };
                let rewritten = match src.on_erasure {
                    ErasurePolicy::Remove => None,
                    ErasurePolicy::Rewrite => Some((bytes, dropped)),
                };
                let sha = rewritten
                    .as_ref()
                    .map(|(bytes, _)| hex::encode(Sha256::digest(bytes)));
                Ok(Some((location, rel, rewritten, sha)))
            }
        });
        // Twice as many files in flight as cores: the searches go on while a group lands
        // (ledger commit, then the files).
        let mut found = Box::pin(in_tasks_ahead(
            jobs,
            "landing erasure",
            2 * rewrite::files_at_once(),
        ));
        let mut landing_now: Option<tokio::task::JoinHandle<Result<Landed>>> = None;
        let mut tags: Vec<LedgerEntry> = Vec::new();
        // A failed search stops the step, but only after the group in flight has landed (or
        // failed): no write of this step outlives it.
        let mut failed: Option<Error> = None;
        while let Some(r) = found.next().await {
            let searched = match r {
                Ok(s) => s,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            let Some((location, rel, rewritten, sha)) = searched else {
                continue;
            };
            let now = chrono::Utc::now().timestamp_micros();
            let entry = latest.get(&rel).map(|prev| match &rewritten {
                Some((bytes, dropped)) => LedgerEntry {
                    source: src.name.clone(),
                    path: rel.clone(),
                    size: bytes.len() as i64,
                    e_tag: None,
                    sha256: sha.clone().unwrap_or_default(),
                    status: FileStatus::Rewritten,
                    rows: prev.rows,
                    quarantined: prev.quarantined,
                    batch_id: batch_id.clone(),
                    ingested_at: now,
                    detail: Some(format!(
                        "GDPR erasure {}: {dropped} record(s) removed",
                        self.request
                    )),
                },
                None => LedgerEntry {
                    status: FileStatus::Erased,
                    batch_id: batch_id.clone(),
                    ingested_at: now,
                    detail: Some(format!("GDPR erasure {}: file removed", self.request)),
                    ..prev.clone()
                },
            });
            group.bytes += rewritten.as_ref().map_or(0, |r| r.0.len());
            group.entries.extend(entry);
            group.files.push((location, rel, rewritten));
            if group.bytes >= LANDING_GROUP_BYTES {
                // One group lands (in its own task) while the next one is searched; groups
                // land one after the other, each ledger commit after the files before it.
                if let Some(before) = landing_now.take() {
                    tags = landed(&mut step, joined(before).await?);
                }
                landing_now = Some(tokio::spawn(land(
                    landing.clone(),
                    self.silt.lake.clone(),
                    self.silt.env.is_some(),
                    std::mem::take(&mut group),
                    std::mem::take(&mut tags),
                    batch_id.clone(),
                )));
            }
        }
        drop(found);
        if let Some(before) = landing_now.take() {
            let done = joined(before).await;
            if let Some(e) = failed {
                return Err(e);
            }
            tags = landed(&mut step, done?);
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let last = land(
            landing.clone(),
            self.silt.lake.clone(),
            self.silt.env.is_some(),
            group,
            std::mem::take(&mut tags),
            batch_id.clone(),
        )
        .await?;
        let tagged = landed(&mut step, last);
        if !tagged.is_empty() {
            ledger::record(&self.silt.lake, &tagged, &batch_id).await?;
        }
        let headers = std::mem::take(&mut *headers.lock().unwrap());
        self.headers.insert(src.name.clone(), headers);
        if !step.files_rewritten.is_empty() || !step.files_purged.is_empty() {
            self.step_audit(&step).await?;
        }
        self.push_step(step);
        Ok(())
    }
}

/// Land one group of landing rewrites: ledger first, in one commit for the group (the new
/// content is known as ingested before it lands, and the old one stays known, so a crash in
/// between never re-ingests a file), with the etags of the group before (`carried`, its files
/// all written), then each file's new content or its deletion. Owned arguments: it runs in a
/// task of its own while the next group is searched.
async fn land(
    landing: Storage,
    lake: Storage,
    in_env: bool,
    group: LandingGroup,
    carried: Vec<LedgerEntry>,
    batch_id: String,
) -> Result<Landed> {
    let mut entries = group.entries;
    entries.extend(carried);
    if !entries.is_empty() {
        ledger::record(&lake, &entries, &batch_id).await?;
    }
    let group_entries = &entries;
    if group.files.is_empty() {
        return Ok(Landed {
            files: Vec::new(),
            tagged: Vec::new(),
        });
    }
    failpoint::hit("forget.landing_ledger");
    if in_env {
        // An environment shares the project's landing files: its ledger learns their erased
        // content (the same bytes the project's own forget, which runs after it, writes), and
        // the files are the project's to rewrite.
        return Ok(Landed {
            files: group
                .files
                .into_iter()
                .map(|(_, rel, rewritten)| (rel, rewritten.map(|(_, dropped)| dropped)))
                .collect(),
            tagged: Vec::new(),
        });
    }
    // The group's files land side by side (each put or delete is independent once the ledger
    // knows them); reported in the group's order.
    let writes = group.files.into_iter().map(|(location, rel, rewritten)| {
        let landing = landing.clone();
        async move {
            match rewritten {
                Some((bytes, dropped)) => {
                    let e_tag = landing.put_e_tag(&location, Bytes::from(bytes)).await?;
                    Ok::<_, Error>((rel, Some(dropped), e_tag))
                }
                None => {
                    landing.delete(&location).await?;
                    Ok((rel, None, None))
                }
            }
        }
    });
    let written: Vec<(String, Option<u64>, Option<String>)> = futures::stream::iter(writes)
        .buffered(2 * rewrite::files_at_once())
        .collect::<Vec<Result<_>>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    // The new files' etags, recorded with the next group: the next ingest then knows them by
    // path, size and etag without reading them again. (A crash before that costs that read.)
    let tags: HashMap<&str, &str> = written
        .iter()
        .filter_map(|(rel, _, tag)| Some((rel.as_str(), tag.as_deref()?)))
        .collect();
    let tagged: Vec<LedgerEntry> = group_entries
        .iter()
        .filter(|e| e.status == FileStatus::Rewritten && e.e_tag.is_none())
        .filter_map(|e| {
            Some(LedgerEntry {
                e_tag: Some(tags.get(e.path.as_str())?.to_string()),
                ingested_at: e.ingested_at + 1,
                ..e.clone()
            })
        })
        .collect();
    Ok(Landed {
        files: written
            .into_iter()
            .map(|(rel, dropped, _)| (rel, dropped))
            .collect(),
        tagged,
    })
}

/// Count what a landed group did in the step; its etag entries, still to record.
fn landed(step: &mut TableErasure, group: Landed) -> Vec<LedgerEntry> {
    for (rel, dropped) in group.files {
        match dropped {
            Some(n) => {
                step.rows_deleted += n;
                step.files_rewritten.push(rel);
            }
            None => step.files_purged.push(rel),
        }
    }
    group.tagged
}
