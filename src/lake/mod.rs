//! The lake: where tables live and how they change. Storage roots (local, gs://), the catalog
//! of Delta tables, commits, the lease, time travel, and silt's own bookkeeping tables under
//! `_silt`; and [`Silt`], an opened project with its roots and catalog, the handle the layers
//! above take. It must not know models, sources' parsing or GDPR rules.

pub mod catalog;
pub mod cluster;
pub mod codec;
pub mod commit;
pub mod dedupe;
pub mod distinct;
pub mod failpoint;
pub mod files;
pub mod lease;
pub mod meta;
pub mod snapshot_scan;
pub mod sql_text;
pub mod storage;
pub mod time_travel;

use std::path::Path;

use crate::error::Result;

/// An opened project: its config, its two roots and the lake's catalog.
#[derive(Debug, Clone)]
pub struct Silt {
    pub project: crate::project::config::Project,
    pub lake: storage::Storage,
    pub landing: storage::Storage,
    pub catalog: catalog::Catalog,
}

impl Silt {
    /// Open the project in `dir` (silt.toml, sql/bronze/*.toml) with `SILT_*` overrides.
    pub fn open(dir: &Path) -> Result<Silt> {
        let project = crate::project::config::Project::load(dir)?;
        let cloud = storage::CloudOptions::from_project(&project);
        let lake = storage::Storage::new(&project.lake_url, &cloud)?;
        let landing = storage::Storage::existing(&project.landing_url, &cloud)?;
        if let Some(c) = &project.file.engine.cluster {
            cluster::Cluster::parse(c)?;
        }
        Ok(Silt {
            catalog: catalog::Catalog::new(lake.clone()).with_engine(project.file.engine.clone()),
            project,
            lake,
            landing,
        })
    }

    /// Run on the cluster at `url` (`df://host:port`, as `--cluster` gives it), whatever
    /// silt.toml says.
    pub fn with_cluster(mut self, url: &str) -> Result<Silt> {
        let c = cluster::Cluster::parse(url)?;
        self.project.file.engine.cluster = Some(c.url);
        self.catalog = self.catalog.with_engine(self.project.file.engine.clone());
        Ok(self)
    }
}
