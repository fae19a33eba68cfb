//! silt: a local-first lakehouse. Landing CSV/JSON files become bronze Delta tables (ingest),
//! and every table can be queried with SQL. This file wires the modules together and opens a
//! project; it must not hold logic of its own beyond that. See ARCHITECTURE.md for the codemap.

pub mod audit;
pub mod catalog;
pub mod commit;
pub mod config;
pub mod contract;
pub mod erasure;
pub mod error;
pub mod export;
pub mod failpoint;
pub mod freshness;
pub mod ingest;
pub mod lease;
pub mod maintenance;
pub mod materialize;
pub mod models;
pub mod pipeline;
pub mod profile;
pub mod progress;
pub mod pseudonym;
pub mod quality;
pub mod query;
pub mod render;
pub mod runs;
pub mod scaffold;
pub mod sql_text;
pub mod storage;
pub mod time_travel;
pub mod watch;

use std::path::Path;

pub use error::{Error, Result};

/// An opened project: its config, its two roots and the lake's catalog.
#[derive(Debug, Clone)]
pub struct Silt {
    pub project: config::Project,
    pub lake: storage::Storage,
    pub landing: storage::Storage,
    pub catalog: catalog::Catalog,
}

impl Silt {
    /// Open the project in `dir` (silt.toml, sql/bronze/*.toml) with `SILT_*` overrides.
    pub fn open(dir: &Path) -> Result<Silt> {
        let project = config::Project::load(dir)?;
        let cloud = storage::CloudOptions::from_project(&project);
        let lake = storage::Storage::new(&project.lake_url, &cloud)?;
        let landing = storage::Storage::existing(&project.landing_url, &cloud)?;
        Ok(Silt {
            catalog: catalog::Catalog::new(lake.clone()).with_engine(project.file.engine.clone()),
            project,
            lake,
            landing,
        })
    }

    /// `silt ingest`.
    pub fn ingest(&self) -> ingest::IngestBuilder<'_> {
        ingest::IngestBuilder::new(&self.project, self.catalog.clone(), self.landing.clone())
    }
}
