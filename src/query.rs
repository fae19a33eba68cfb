//! `silt query`: SQL over every table of the lake through DataFusion. It must not write tables
//! and must not format output (render.rs does).

use arrow::record_batch::RecordBatch;

use crate::catalog::Catalog;
use crate::error::{Error, Result};

/// Run one SQL statement and collect its result.
pub async fn run(catalog: &Catalog, sql: &str) -> Result<Vec<RecordBatch>> {
    let ctx = catalog.session().await?;
    let df = ctx.sql(sql).await.map_err(Error::from_datafusion)?;
    df.collect().await.map_err(Error::from_datafusion)
}
