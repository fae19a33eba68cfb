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
pub mod duplicate_hashes;
pub mod env;
pub mod failpoint;
pub mod files;
pub mod lease;
pub mod memory;
pub mod meta;
pub mod rewrite;
pub mod scan_order;
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
    /// The environment this handle works in (`--env`); None for the project's own lake.
    pub env: Option<String>,
}

impl Silt {
    /// Open the project in `dir` (silt.toml, sql/bronze/*.toml) with `SILT_*` overrides.
    pub fn open(dir: &Path) -> Result<Silt> {
        Self::open_in(dir, None)
    }

    /// Open the project in `dir` working in environment `env` (its lake is the environment's
    /// root; `prod` or None is the project's own lake). Whether the environment exists is
    /// [`Silt::check_env`]'s to say.
    pub fn open_in(dir: &Path, env: Option<&str>) -> Result<Silt> {
        let mut project = crate::project::config::Project::load(dir)?;
        let env = env
            .map(str::trim)
            .filter(|e| !e.is_empty() && *e != env::PROD)
            .map(String::from);
        if let Some(name) = &env {
            env::check_name(name)?;
            project.lake_url = env::env_url(&project.envs_url, name);
            // An environment never publishes into production's warehouse dataset: its
            // exports go to `<dataset>_<env>` (as dbt targets do with schemas).
            if let Some(bq) = project.file.bigquery.as_mut() {
                bq.dataset = format!("{}_{}", bq.dataset, name.replace('-', "_"));
            }
        }
        let cloud = storage::CloudOptions::from_project(&project);
        // An environment's root is made by `silt env create`, never by opening it.
        let lake = if env.is_some() {
            storage::Storage::existing(&project.lake_url, &cloud)?
        } else {
            storage::Storage::new(&project.lake_url, &cloud)?
        };
        let landing = storage::Storage::existing(&project.landing_url, &cloud)?;
        if let Some(c) = &project.file.engine.cluster {
            cluster::Cluster::parse(c)?;
        }
        Ok(Silt {
            catalog: catalog::Catalog::new(lake.clone()).with_engine(project.file.engine.clone()),
            project,
            lake,
            landing,
            env,
        })
    }

    /// The same project opened in environment `name` (`prod`: the project's own lake), with
    /// this handle's engine (a `--cluster` given on the command line, say); an error
    /// when that environment does not exist.
    pub async fn sibling(&self, name: &str) -> Result<Silt> {
        Ok(self.sibling_with_record(name).await?.0)
    }

    /// [`Silt::sibling`] and that environment's registry (None for the project's lake), read
    /// once.
    pub async fn sibling_with_record(&self, name: &str) -> Result<(Silt, Option<env::EnvRecord>)> {
        let mut other = Silt::open_in(&self.project.dir, Some(name))?;
        other.project.file.engine = self.project.file.engine.clone();
        other.catalog = other.catalog.with_engine(self.project.file.engine.clone());
        let record = other.check_env().await?;
        Ok((other, record))
    }

    /// The environment's registry; an error naming how to create it when the environment
    /// does not exist. None for the project's own lake.
    pub async fn check_env(&self) -> Result<Option<env::EnvRecord>> {
        let Some(name) = &self.env else {
            return Ok(None);
        };
        match env::read_record(&self.lake).await? {
            Some(r) => Ok(Some(r)),
            None => Err(crate::error::Error::Usage(format!(
                "there is no environment '{name}' (at {}): create it with `silt env create {name}`, or list them with `silt env list`",
                self.lake.url()
            ))),
        }
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
