//! Table upkeep: `silt optimize` (compaction, optionally Z-ordered) and `silt vacuum` (delete
//! files no version within the retention period needs), both through delta-rs operations, each
//! returning metrics, and the Parquet settings silt writes each table's files with (which an
//! optimize and an erasure's rewrites keep). It must not change table content (optimize
//! rewrites files with the same rows) nor decide which tables exist (catalog.rs does).

use std::collections::HashSet;
use std::num::NonZeroU64;

use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::optimize::OptimizeType;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::lake::catalog::{Catalog, Layer, TableRef};
use crate::lake::storage::same_path;
use crate::project::config::{Project, Source};

#[derive(Debug, Clone, Serialize)]
pub struct OptimizeReport {
    pub table: String,
    pub version: Option<u64>,
    pub files_added: u64,
    pub files_removed: u64,
    pub partitions_optimized: u64,
}

/// The Parquet settings silt writes `t`'s files with, so that files rewritten later (an
/// optimize, an erasure) are encoded as the ones they replace: a bronze table as ingest writes
/// it (LZ4, its key encodings), a model as builds write it (Snappy, 32k-row groups). `table` is
/// the table's schema. None (the delta-rs operation's own settings) for silt's own tables and
/// quarantine, for a bronze table whose source is no longer in the project, and for one whose
/// key columns no longer have the contract's types (a contract changed since the last ingest:
/// a key encoding chosen for the new type cannot write the old one).
pub(crate) fn own_writer_properties(
    project: &Project,
    t: &TableRef,
    table: &arrow::datatypes::Schema,
) -> Option<parquet::file::properties::WriterProperties> {
    match t.layer {
        Layer::Bronze => project
            .sources
            .get(&t.name)
            .and_then(|src| bronze_properties(src, table)),
        Layer::Silver | Layer::Gold => Some(crate::build::materialize::model_writer_properties()),
        Layer::Quarantine | Layer::Silt => None,
    }
}

/// Ingest's Parquet settings for a source's bronze files, while its key columns still have
/// the contract's types.
fn bronze_properties(
    src: &Source,
    table: &arrow::datatypes::Schema,
) -> Option<parquet::file::properties::WriterProperties> {
    let contract = crate::ingest::bronze_schema_of(src);
    let same = src.primary_key.iter().all(|k| {
        match (contract.field_with_name(k), table.field_with_name(k)) {
            (Ok(a), Ok(b)) => a.data_type() == b.data_type(),
            _ => false,
        }
    });
    same.then(|| crate::ingest::writer_properties(src))
}

/// Compact `t`'s small files (bin-packing to `target_size`), or Z-order them by `zorder`. The
/// new files are written with the table's own Parquet settings: delta-rs's optimize would
/// write ZSTD, and a model's files in row groups of a million rows instead of 32k, each held
/// whole in memory while it is written.
pub async fn optimize(
    catalog: &Catalog,
    project: &Project,
    t: &TableRef,
    zorder: &[String],
    target_size: Option<u64>,
) -> Result<OptimizeReport> {
    t.writable_by_user("optimize")?;
    let table = catalog
        .open(t)
        .await?
        .ok_or_else(|| Error::Usage(format!("{t} does not exist")))?;
    // An environment's clone: delta-rs rewrites only files under the table's root.
    let state = crate::build::materialize::last_state(&table).await?;
    let (table, _) = crate::lake::env::localize(catalog.lake(), table, t, state.as_ref()).await?;
    let schema = table
        .snapshot()
        .map_err(|e| Error::delta(t.to_string(), e))?
        .snapshot()
        .arrow_schema();
    if !zorder.is_empty() {
        let partitions = table
            .snapshot()
            .map(|s| s.metadata().partition_columns().to_vec())
            .unwrap_or_default();
        for c in zorder {
            if schema.field_with_name(c).is_err() || partitions.contains(c) {
                let cols: Vec<String> = schema
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .filter(|f| !partitions.contains(f))
                    .collect();
                return Err(Error::Usage(format!(
                    "--zorder '{c}' is not a column of {t} to order by{}: its columns are {}",
                    if partitions.contains(c) {
                        " (it is the partition column)"
                    } else {
                        ""
                    },
                    cols.join(", ")
                )));
            }
        }
    }
    let mut b = table
        .optimize()
        .with_commit_properties(CommitProperties::default().with_metadata([(
            "silt.operation".to_string(),
            serde_json::Value::from("optimize"),
        )]));
    if let Some(props) = own_writer_properties(project, t, &schema) {
        b = b.with_writer_properties(props);
    }
    if !zorder.is_empty() {
        b = b.with_type(OptimizeType::ZOrder(zorder.to_vec()));
    }
    if let Some(size) = target_size.and_then(NonZeroU64::new) {
        b = b.with_target_size(size);
    }
    let (table, m) = b.await.map_err(|e| Error::delta(t.to_string(), e))?;
    Ok(OptimizeReport {
        table: t.to_string(),
        version: table.version(),
        files_added: m.num_files_added,
        files_removed: m.num_files_removed,
        partitions_optimized: m.partitions_optimized,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct VacuumReport {
    pub table: String,
    pub dry_run: bool,
    /// The files deleted (or, in a dry run, that would be): only files that existed. Files a
    /// GDPR erasure already purged are still tombstones in the log; they are not counted.
    pub files_deleted: Vec<String>,
    /// Files a vacuum would have deleted that a live environment still references: kept.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kept_for_envs: Vec<String>,
}

/// Delta's default retention (`delta.deletedFileRetentionDuration`): 7 days.
pub const DEFAULT_RETAIN_HOURS: u64 = 168;

/// Delete the files of `t` that no version newer than `retain_hours` ago references. Versions
/// older than that can no longer be read, and an incremental build whose last read version
/// is older rebuilds in full; so a period below Delta's default 7 days needs `force`.
///
/// `referenced`: the files (absolute URLs in [`same_path`] form) that environments cloned from
/// this lake still name; they are kept. A table that itself names other lakes' files (an
/// environment's clone) never deletes those: only files under its own root go.
pub async fn vacuum(
    catalog: &Catalog,
    t: &TableRef,
    retain_hours: u64,
    dry_run: bool,
    force: bool,
    referenced: &HashSet<String>,
) -> Result<VacuumReport> {
    t.writable_by_user("vacuum")?;
    if retain_hours < DEFAULT_RETAIN_HOURS && !force && !dry_run {
        return Err(Error::Usage(format!(
            "--retain-hours {retain_hours} is below Delta's default retention of {DEFAULT_RETAIN_HOURS} hours: versions younger than a week become unreadable (time travel, `silt diff`, and incremental builds that last read them rebuild in full). Add --force to do it anyway, or --dry-run to see the files"
        )));
    }
    let table = catalog
        .open(t)
        .await?
        .ok_or_else(|| Error::Usage(format!("{t} does not exist")))?;
    // The files that exist now: delta-rs reports every expired tombstone as deleted, files
    // already gone included.
    let rel = t.rel_path();
    let present = catalog.lake().names_under(&rel).await?;
    let prefix = format!(
        "{}/",
        same_path(catalog.lake().url_of(&rel).as_str()).trim_end_matches('/')
    );
    let keep: HashSet<String> = referenced
        .iter()
        .filter_map(|r| r.strip_prefix(&prefix).map(String::from))
        .collect();
    let foreign = !crate::lake::env::foreign_files(catalog.lake(), t)
        .await?
        .is_empty();
    // delta-rs deletes what its plan names; with files to keep, or foreign files in the log,
    // silt takes its plan (a dry run) and deletes the table's own files itself.
    let own = !keep.is_empty() || foreign;
    let (_, m) = table
        .vacuum()
        .with_retention_period(chrono::Duration::hours(retain_hours as i64))
        .with_enforce_retention_duration(false)
        .with_dry_run(dry_run || own)
        .await
        .map_err(|e| Error::delta(t.to_string(), e))?;
    let mut files_deleted: Vec<String> = m
        .files_deleted
        .into_iter()
        .map(|f| {
            // delta-rs names them under the table (dry run: as URLs or absolute paths).
            let f = f.trim_start_matches('/').to_string();
            match f.find(&format!("{rel}/")) {
                Some(i) => f[i + rel.len() + 1..].to_string(),
                None => f,
            }
        })
        .filter(|f| present.contains(&same_path(f)))
        .collect();
    let mut kept_for_envs = Vec::new();
    if own {
        let (kept, gone): (Vec<String>, Vec<String>) = files_deleted
            .into_iter()
            .partition(|f| keep.contains(&same_path(f)));
        kept_for_envs = kept;
        files_deleted = gone;
        if !dry_run {
            for f in &files_deleted {
                catalog
                    .lake()
                    .delete(&catalog.lake().file_path(&rel, f))
                    .await?;
            }
        }
    }
    files_deleted.sort();
    kept_for_envs.sort();
    Ok(VacuumReport {
        table: t.to_string(),
        dry_run,
        files_deleted,
        kept_for_envs,
    })
}
