//! What a user runs on a lake besides building it: GDPR erasure and its verification, export
//! to BigQuery, maintenance (optimize, vacuum), profiling, freshness, scaffolding new projects
//! and sources, read-only queries, watching the landing root, column lineage queries and the
//! docs site, and the cluster roles. Each operation uses the
//! layers below; none is used by them.

pub mod docs;
pub mod env;
pub mod erasure;
pub mod export;
pub mod freshness;
pub mod lineage;
pub mod maintenance;
pub mod notify;
pub mod profile;
pub mod query;
pub mod roles;
pub mod scaffold;
pub mod watch;
