//! A Delta table version read as a plain Parquet scan: the snapshot's active files (paths,
//! sizes, partition values, row counts) resolved once, on the client, into a DataFusion
//! `DataSourceExec` over exactly those files. Such a scan is serialized by DataFusion's own
//! protobuf, so a cluster executor can run it with no Delta code and no log replay
//! (decision 0024). It is exact for the tables silt writes (no deletion vectors, no column
//! mapping) and refuses any other. It must not write, and must not be used where delta-rs's
//! own scan is needed (MERGE targets, erasure rewrites: they keep `table_provider()`).

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, FieldRef, Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::stats::Precision;
use datafusion::common::{ScalarValue, Statistics};
use datafusion::datasource::TableType;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use deltalake::DeltaTable;

use crate::error::{Error, Result};
use crate::lake::storage::Storage;

/// One active data file of the snapshot.
#[derive(Debug, Clone)]
struct DataFile {
    /// The store it is on: the lake's, or (an environment's clone) another bucket's.
    store_url: ObjectStoreUrl,
    path: object_store::path::Path,
    size: u64,
    rows: Option<u64>,
    /// In the order of [`SnapshotScan::partition_fields`].
    partition_values: Vec<ScalarValue>,
}

/// A Delta table version as a plain Parquet table provider.
#[derive(Debug)]
pub struct SnapshotScan {
    store_url: ObjectStoreUrl,
    /// The table's columns in Delta order (as delta-rs's provider shows them).
    schema: SchemaRef,
    /// The Parquet files' columns: the table's, less the partition columns.
    file_schema: SchemaRef,
    partition_fields: Vec<FieldRef>,
    files: Vec<DataFile>,
}

impl SnapshotScan {
    /// The active files of `table` (at the version it is loaded at), or only those whose
    /// snapshot path (`LogicalFileView::path`) is in `selection`.
    pub async fn try_new(
        lake: &Storage,
        rel: &str,
        table: &DeltaTable,
        selection: Option<&HashSet<String>>,
    ) -> Result<SnapshotScan> {
        let name = rel.to_string();
        let snapshot = table.snapshot().map_err(|e| Error::delta(&name, e))?;
        let protocol = snapshot.protocol();
        let features: Vec<String> = protocol
            .reader_features()
            .map(|f| f.iter().map(|f| f.to_string()).collect())
            .unwrap_or_default();
        if !features.is_empty()
            || snapshot
                .metadata()
                .configuration()
                .get("delta.columnMapping.mode")
                .is_some_and(|m| m != "none")
        {
            return Err(Error::Usage(format!(
                "{name} uses Delta reader features ({}) that a cluster scan cannot represent: build it without --cluster",
                if features.is_empty() {
                    "column mapping".to_string()
                } else {
                    features.join(", ")
                }
            )));
        }
        // delta-rs's provider decides the column types DataFusion sees; this scan shows the same.
        let provider = table
            .table_provider()
            .await
            .map_err(|e| Error::Engine(DataFusionError::External(Box::new(e))))?;
        let partition_columns = snapshot.metadata().partition_columns().to_vec();
        // … except that partition columns hold plain values, not delta-rs's dictionary
        // encoding of them: batches that cross the cluster's shuffles come back plain.
        let schema: SchemaRef = Arc::new(Schema::new_with_metadata(
            provider
                .schema()
                .fields()
                .iter()
                .map(|f| match f.data_type() {
                    DataType::Dictionary(_, value) if partition_columns.contains(f.name()) => {
                        Arc::new(f.as_ref().clone().with_data_type(value.as_ref().clone()))
                    }
                    _ => Arc::clone(f),
                })
                .collect::<Vec<_>>(),
            provider.schema().metadata().clone(),
        ));
        let partition_fields: Vec<FieldRef> = partition_columns
            .iter()
            .map(|c| {
                schema
                    .field_with_name(c)
                    .map(|f| Arc::new(f.clone()))
                    .map_err(|e| Error::Internal(format!("{name}: partition column {c}: {e}")))
            })
            .collect::<Result<_>>()?;
        let file_schema = Arc::new(Schema::new(
            schema
                .fields()
                .iter()
                .filter(|f| !partition_columns.contains(f.name()))
                .cloned()
                .collect::<Vec<_>>(),
        ));
        let mut files = Vec::new();
        for f in snapshot.log_data().iter() {
            let path = f.path().to_string();
            if selection.is_some_and(|s| !s.contains(&path)) {
                continue;
            }
            let values = f.partition_values_map();
            let partition_values = partition_fields
                .iter()
                .map(|field| match values.get(field.name()).cloned().flatten() {
                    None => ScalarValue::try_from(field.data_type()),
                    Some(v) => ScalarValue::try_from_string(v, field.data_type()),
                })
                .collect::<DfResult<Vec<_>>>()?;
            let (store, object) = lake.locate(rel, &path)?;
            files.push(DataFile {
                store_url: ObjectStoreUrl::parse(store.store_url().as_str())?,
                path: object,
                size: f.size().max(0) as u64,
                rows: f.num_records().map(|n| n as u64),
                partition_values,
            });
        }
        let store_url = ObjectStoreUrl::parse(lake.store_url().as_str())?;
        Ok(SnapshotScan {
            store_url,
            schema,
            file_schema,
            partition_fields,
            files,
        })
    }

    /// The files whose partition values can satisfy `filters` (those of them that name only
    /// partition columns); every file when there are none.
    fn prune(&self, filters: &[Expr], session: &dyn Session) -> Vec<&DataFile> {
        // A filter this cannot evaluate prunes nothing; DataFusion still applies it above.
        self.try_prune(filters, session)
            .unwrap_or_else(|_| self.files.iter().collect())
    }

    fn try_prune(&self, filters: &[Expr], session: &dyn Session) -> DfResult<Vec<&DataFile>> {
        let names: HashSet<&str> = self
            .partition_fields
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        let on_partitions: Vec<Expr> = filters
            .iter()
            .filter(|e| {
                let cols = e.column_refs();
                !cols.is_empty() && cols.iter().all(|c| names.contains(c.name.as_str()))
            })
            .cloned()
            .collect();
        let Some(predicate) = conjunction(on_partitions) else {
            return Ok(self.files.iter().collect());
        };
        if self.files.is_empty() {
            return Ok(Vec::new());
        }
        let schema = Arc::new(Schema::new(self.partition_fields.clone()));
        let columns: Vec<ArrayRef> = (0..self.partition_fields.len())
            .map(|i| {
                ScalarValue::iter_to_array(self.files.iter().map(|f| f.partition_values[i].clone()))
            })
            .collect::<DfResult<_>>()?;
        let batch = RecordBatch::try_new(Arc::clone(&schema), columns)?;
        let df_schema = datafusion::common::DFSchema::try_from(schema.as_ref().clone())?;
        let physical = session.create_physical_expr(predicate, &df_schema)?;
        let mask = physical.evaluate(&batch)?.into_array(batch.num_rows())?;
        let mask = mask
            .as_any()
            .downcast_ref::<BooleanArray>()
            .ok_or_else(|| DataFusionError::Internal("partition filter is not boolean".into()))?;
        Ok(self
            .files
            .iter()
            .enumerate()
            .filter(|(i, _)| mask.is_valid(*i) && mask.value(*i))
            .map(|(_, f)| f)
            .collect())
    }
}

#[async_trait]
impl TableProvider for SnapshotScan {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // Filters on partition columns prune files; DataFusion still applies every filter.
        Ok(filters
            .iter()
            .map(|_| TableProviderFilterPushDown::Inexact)
            .collect())
    }

    async fn scan(
        &self,
        session: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let files = self.prune(filters, session);
        let table_schema = TableSchema::builder(Arc::clone(&self.file_schema))
            .with_table_partition_cols(self.partition_fields.clone())
            .build();
        // Column i of the table is column `order[i]` of (file columns, partition columns).
        let scan_schema = table_schema.table_schema().clone();
        let order: Vec<usize> = self
            .schema
            .fields()
            .iter()
            .map(|f| scan_schema.index_of(f.name()))
            .collect::<std::result::Result<_, _>>()?;
        let indices: Vec<usize> = match projection {
            Some(p) => p.iter().map(|&i| order[i]).collect(),
            None => order,
        };
        let mut source = ParquetSource::new(table_schema);
        if let Some(predicate) = conjunction(filters.iter().cloned()) {
            let df_schema = datafusion::common::DFSchema::try_from(scan_schema.as_ref().clone())?;
            if let Ok(p) = session.create_physical_expr(predicate, &df_schema) {
                source = source.with_predicate(p);
            }
        }
        // One scan per store the files are on (an environment's clone may name another
        // bucket's files), unioned.
        let mut stores: Vec<ObjectStoreUrl> = files.iter().map(|f| f.store_url.clone()).collect();
        stores.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        stores.dedup();
        if stores.is_empty() {
            stores.push(self.store_url.clone());
        }
        let mut scans = Vec::new();
        for store in stores {
            let mine: Vec<&DataFile> = files
                .iter()
                .copied()
                .filter(|f| f.store_url == store)
                .collect();
            scans.push(self.scan_files(
                session,
                store,
                mine,
                &source,
                &scan_schema,
                &indices,
                limit,
            )?);
        }
        datafusion::physical_plan::union::UnionExec::try_new(scans)
    }
}

impl SnapshotScan {
    /// A `DataSourceExec` over `files`, all on `store`.
    #[allow(clippy::too_many_arguments)]
    fn scan_files(
        &self,
        session: &dyn Session,
        store: ObjectStoreUrl,
        files: Vec<&DataFile>,
        source: &ParquetSource,
        scan_schema: &SchemaRef,
        indices: &[usize],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        // Files spread over the session's partitions, largest first onto the lightest group.
        let groups_wanted = session.config().target_partitions().max(1);
        let mut sorted = files.clone();
        sorted.sort_by_key(|f| std::cmp::Reverse(f.size));
        let mut groups: Vec<(u64, Vec<PartitionedFile>)> = (0..groups_wanted
            .min(sorted.len().max(1)))
            .map(|_| (0, Vec::new()))
            .collect();
        for f in sorted {
            let g = groups
                .iter_mut()
                .min_by_key(|(bytes, _)| *bytes)
                .expect("at least one group");
            g.0 += f.size;
            // From the object's path as it is (`PartitionedFile::new` would parse the name
            // again and encode the `%` of an encoded partition directory).
            g.1.push(
                PartitionedFile::new_from_meta(object_store::ObjectMeta {
                    location: f.path.clone(),
                    last_modified: chrono::DateTime::<chrono::Utc>::UNIX_EPOCH,
                    size: f.size,
                    e_tag: None,
                    version: None,
                })
                .with_partition_values(f.partition_values.clone()),
            );
        }
        let file_groups: Vec<FileGroup> = groups
            .into_iter()
            .filter(|(_, g)| !g.is_empty())
            .map(|(_, g)| FileGroup::new(g))
            .collect();
        let rows: Option<u64> = files.iter().map(|f| f.rows).sum();
        let bytes: u64 = files.iter().map(|f| f.size).sum();
        let mut statistics = Statistics::new_unknown(scan_schema);
        statistics.num_rows = match rows {
            Some(n) => Precision::Exact(n as usize),
            None => Precision::Absent,
        };
        statistics.total_byte_size = Precision::Inexact(bytes as usize);
        let config = FileScanConfigBuilder::new(store, Arc::new(source.clone()))
            .with_file_groups(file_groups)
            .with_statistics(statistics)
            .with_limit(limit)
            .with_projection_indices(Some(indices.to_vec()))?
            .build();
        Ok(DataSourceExec::from_data_source(config))
    }
}
