//! Table upkeep: `silt optimize` (compaction, optionally Z-ordered) and `silt vacuum` (delete
//! files no version within the retention period needs), both through delta-rs operations, each
//! returning metrics. It must not change table content (optimize rewrites files with the same
//! rows) nor decide which tables exist (catalog.rs does).

use std::num::NonZeroU64;

use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::optimize::OptimizeType;
use serde::Serialize;

use crate::catalog::{Catalog, TableRef};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize)]
pub struct OptimizeReport {
    pub table: String,
    pub version: Option<u64>,
    pub files_added: u64,
    pub files_removed: u64,
    pub partitions_optimized: u64,
}

/// Compact `t`'s small files (bin-packing to `target_size`), or Z-order them by `zorder`.
pub async fn optimize(
    catalog: &Catalog,
    t: &TableRef,
    zorder: &[String],
    target_size: Option<u64>,
) -> Result<OptimizeReport> {
    let table = catalog
        .open(t)
        .await?
        .ok_or_else(|| Error::Usage(format!("{t} does not exist")))?;
    let mut b = table
        .optimize()
        .with_commit_properties(CommitProperties::default().with_metadata([(
            "silt.operation".to_string(),
            serde_json::Value::from("optimize"),
        )]));
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
    pub files_deleted: Vec<String>,
}

/// Delete the files of `t` that no version newer than `retain_hours` ago references. Versions
/// older than that can no longer be read.
pub async fn vacuum(
    catalog: &Catalog,
    t: &TableRef,
    retain_hours: u64,
    dry_run: bool,
) -> Result<VacuumReport> {
    let table = catalog
        .open(t)
        .await?
        .ok_or_else(|| Error::Usage(format!("{t} does not exist")))?;
    let (_, m) = table
        .vacuum()
        .with_retention_period(chrono::Duration::hours(retain_hours as i64))
        .with_enforce_retention_duration(false)
        .with_dry_run(dry_run)
        .await
        .map_err(|e| Error::delta(t.to_string(), e))?;
    Ok(VacuumReport {
        table: t.to_string(),
        dry_run,
        files_deleted: m.files_deleted,
    })
}
