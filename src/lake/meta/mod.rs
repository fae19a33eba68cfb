//! silt's own bookkeeping tables under `_silt`: the ingest ledger, the run log, batch
//! statistics, the GDPR audit log and the export log. Each is a Delta table of one row type,
//! declared once by [`MetaTable`] (name, columns, commit labels); [`append`] and [`read`] turn
//! rows into Arrow and back (serde_arrow), so no table hand-writes its encoders. It must not
//! decide what the rows mean: the modules that own each table do.

pub mod batch_stats;
pub mod erasures;
pub mod exports;
pub mod ledger;
pub mod lineage;
pub mod runs;

use arrow::datatypes::{DataType, Field, FieldRef, TimeUnit};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::lake::catalog::{Catalog, Layer, TableRef};
use crate::lake::commit::append_record;
use crate::lake::storage::Storage;

/// A bookkeeping table: its rows are values of this type, one field per column (serde names
/// are column names; a column added later is an `Option` with `#[serde(default)]`, so older
/// tables still read).
pub trait MetaTable: Serialize + DeserializeOwned {
    /// The table's name under `_silt`.
    const NAME: &'static str;
    /// The `silt.operation` of its commits, as `silt history` shows it.
    const OPERATION: &'static str;
    /// The Delta table's description.
    const DESCRIPTION: &'static str;
    /// Its columns, in order. They must stay as they are: lakes already hold the table.
    fn fields() -> Vec<FieldRef>;

    /// The table.
    fn table() -> TableRef {
        TableRef::new(Layer::Silt, Self::NAME)
    }
}

/// Append `rows` to `T`'s table in one commit, labelled with `T::OPERATION` and `labels`
/// (`silt.run_id`, …). Nothing is written for no rows.
pub async fn append<T: MetaTable>(
    lake: &Storage,
    rows: &[T],
    labels: &[(&str, &str)],
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let batch =
        serde_arrow::to_record_batch(&T::fields(), &rows).map_err(|e| encode(T::NAME, e))?;
    let mut meta = vec![("silt.operation", T::OPERATION)];
    meta.extend_from_slice(labels);
    append_record(lake, &T::table(), batch, &meta, T::DESCRIPTION).await?;
    Ok(())
}

/// Every row of `T`'s table (none when it does not exist yet), in the table's order.
pub async fn read<T: MetaTable>(catalog: &Catalog) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for b in catalog.read_small(&T::table()).await? {
        let rows: Vec<T> = serde_arrow::from_record_batch(&b).map_err(|e| encode(T::NAME, e))?;
        out.extend(rows);
    }
    Ok(out)
}

fn encode(table: &str, e: serde_arrow::Error) -> Error {
    Error::Internal(format!("_silt.{table}: {e}"))
}

/// A non-null column.
pub(crate) fn column(name: &str, data_type: DataType) -> FieldRef {
    Field::new(name, data_type, false).into()
}

/// A nullable column.
pub(crate) fn nullable(name: &str, data_type: DataType) -> FieldRef {
    Field::new(name, data_type, true).into()
}

/// A UTC timestamp in microseconds, as every bookkeeping table keeps its times.
pub(crate) fn utc_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}
