//! Building silver and gold: the model dag and its templates, the pipeline that runs it, data
//! tests, pseudonymised columns, and how each materialization writes its table. It must not
//! ingest landing files itself (ingest/ does) nor erase subjects (ops/erasure does).

pub mod lineage;
pub mod materialize;
pub mod models;
pub mod pipeline;
pub mod pseudonym;
pub mod quality;
