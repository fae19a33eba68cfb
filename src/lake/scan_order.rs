//! Scans of a Hive-partitioned table (a Delta table partitioned by a column: `month=1998-06/…`)
//! read their files partition after partition ([`PartitionOrderRule`]). A Delta log lists
//! files in commit order, and every ingest commit adds files to many partitions, so a scan in
//! log order delivered months interleaved. DataFusion's scan streams take files from one
//! shared queue in the listed order, so the order is the whole story: in path order, a
//! partitioned write downstream (a silver model partitioned like its bronze source) sees one
//! partition at a time and closes each file once, instead of cycling through every month with
//! a few files open and sorting the rows that came too late.
//!
//! Only the order of whole files (or of the byte ranges DataFusion already cut) changes: no
//! file is split or dropped, and every file keeps its partition values and statistics, so no
//! query result can change. It must not touch a scan that declares an output ordering (its
//! files' order is part of that promise), keeps files in their group (`preserve_order`), or
//! declares a partitioning by file group.

use std::sync::Arc;

use datafusion::common::Result as DfResult;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfig};
use datafusion::datasource::source::DataSourceExec;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::{ExecutionPlan, Partitioning};

/// Appended after DataFusion's physical optimizers (file groups are cut by then).
#[derive(Debug, Default)]
pub struct PartitionOrderRule;

impl PhysicalOptimizerRule for PartitionOrderRule {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            Ok(match in_partition_order(&node) {
                Some(new) => Transformed::yes(new),
                None => Transformed::no(node),
            })
        })
        .data()
    }

    fn name(&self) -> &str {
        "PartitionOrder"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// The scan with its files in path order, cut into as many groups of about equal bytes as it
/// had; None when it is not a file scan of a Hive-partitioned layout, declares an ordering, or
/// is in order already.
fn in_partition_order(node: &Arc<dyn ExecutionPlan>) -> Option<Arc<dyn ExecutionPlan>> {
    let scan = node.downcast_ref::<DataSourceExec>()?;
    let config = scan.data_source().downcast_ref::<FileScanConfig>()?;
    // A declared partitioning (hash or range by file group) or order is a promise about which
    // files each group holds: left as it is.
    let declared = config
        .output_partitioning
        .as_ref()
        .is_some_and(|p| !matches!(p, Partitioning::UnknownPartitioning(_)));
    if !config.output_ordering.is_empty()
        || config.preserve_order
        || declared
        || config.file_groups.is_empty()
    {
        return None;
    }
    let mut files: Vec<_> = config
        .file_groups
        .iter()
        .flat_map(FileGroup::iter)
        .cloned()
        .collect();
    let hive = files.iter().any(|f| {
        let path = f.object_meta.location.as_ref();
        path.rsplit_once('/')
            .is_some_and(|(dir, _)| dir.split('/').any(|s| s.contains('=')))
    });
    let key = |f: &datafusion::datasource::listing::PartitionedFile| {
        (
            f.object_meta.location.to_string(),
            f.range.as_ref().map_or(0, |r| r.start),
        )
    };
    if !hive || files.windows(2).all(|w| key(&w[0]) <= key(&w[1])) {
        return None;
    }
    files.sort_by_key(key);
    let bytes = |f: &datafusion::datasource::listing::PartitionedFile| {
        f.range
            .as_ref()
            .map_or(f.object_meta.size, |r| (r.end - r.start).max(0) as u64)
            .max(1)
    };
    let n = config.file_groups.len();
    let total: u64 = files.iter().map(bytes).sum();
    let mut groups: Vec<Vec<_>> = vec![Vec::new(); n];
    let mut done = 0u64;
    for f in files {
        // The group whose share of the bytes this file starts in.
        let g = ((u128::from(done) * n as u128) / u128::from(total.max(1))) as usize;
        done += bytes(&f);
        groups[g.min(n - 1)].push(f);
    }
    let mut new = config.clone();
    new.file_groups = groups.into_iter().map(FileGroup::new).collect();
    Some(DataSourceExec::from_data_source(new) as Arc<dyn ExecutionPlan>)
}
