//! silt's one integration test binary: every module here runs the real `silt`
//! binary or the library on temp dirs. One binary, because each extra one re-links datafusion
//! and deltalake.

mod architecture;
mod bigquery;
mod cluster;
mod contract;
mod dedupe;
mod distinct;
mod environments;
mod erasure;
mod files;
mod gcs;
mod hardening;
mod ingest;
mod lease;
mod lineage;
mod maintenance;
mod memory;
mod models;
mod outside;
mod quality;
mod scaffold;
mod support;
mod time_travel;
mod usability;
