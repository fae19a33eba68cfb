//! Object stores for the lake and landing roots (`file://`, `gs://`), and Delta tables opened
//! on them. This is the only module that builds an `ObjectStore` or a `DeltaTable` handle;
//! everything else asks it. It must not know table names or layers (catalog.rs does).

use std::sync::{Arc, Once};

use bytes::Bytes;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};
use url::Url;

use crate::config::Project;
use crate::error::{Error, Result};

/// One root (lake or landing): an object store at the bucket / filesystem root, plus the
/// URL and path prefix under it.
#[derive(Debug, Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    root_url: Url,
    prefix: Path,
}

/// Credentials and endpoints for cloud roots, taken from the project config and env.
#[derive(Debug, Clone, Default)]
pub struct CloudOptions {
    pub gcs_service_account_key: Option<String>,
}

impl CloudOptions {
    pub fn from_project(p: &Project) -> Self {
        CloudOptions {
            gcs_service_account_key: std::env::var("GOOGLE_APPLICATION_CREDENTIALS")
                .ok()
                .filter(|s| !s.is_empty())
                .or_else(|| p.file.gcs.service_account_key.clone()),
        }
    }
}

static REGISTER: Once = Once::new();

fn register_handlers() {
    REGISTER.call_once(|| {
        deltalake::gcp::register_handlers(None);
    });
}

impl Storage {
    /// Build the store for a root URL. `gs://` needs explicit credentials: silt never lets the
    /// client fall back to a cloud metadata server.
    pub fn new(root: &Url, opts: &CloudOptions) -> Result<Storage> {
        register_handlers();
        let mut root_url = root.clone();
        if !root_url.path().ends_with('/') {
            let p = format!("{}/", root_url.path());
            root_url.set_path(&p);
        }
        let (store, prefix): (Arc<dyn ObjectStore>, Path) = match root.scheme() {
            "file" => {
                let path = root
                    .to_file_path()
                    .map_err(|_| Error::Usage(format!("'{root}' is not a local path")))?;
                std::fs::create_dir_all(&path).map_err(|e| {
                    Error::Runtime(format!("cannot create directory {}: {e}", path.display()))
                })?;
                let prefix = Path::from_filesystem_path(&path)
                    .map_err(|e| Error::storage(root.as_str(), e.into()))?;
                (
                    Arc::new(object_store::local::LocalFileSystem::new()),
                    prefix,
                )
            }
            "memory" => (
                Arc::new(object_store::memory::InMemory::new()),
                Path::from(root.path()),
            ),
            "gs" => {
                let bucket = root
                    .host_str()
                    .ok_or_else(|| Error::Usage(format!("'{root}' names no bucket")))?;
                let key = opts.gcs_service_account_key.as_deref().ok_or_else(|| {
                    Error::Usage(format!(
                        "no credentials for {root}: set GOOGLE_APPLICATION_CREDENTIALS to a service-account JSON key, or gcs.service_account_key in silt.toml"
                    ))
                })?;
                let store = object_store::gcp::GoogleCloudStorageBuilder::new()
                    .with_bucket_name(bucket)
                    .with_service_account_path(key)
                    .build()
                    .map_err(|e| Error::storage(root.as_str(), e))?;
                (Arc::new(store), Path::from(root.path()))
            }
            s => {
                return Err(Error::Usage(format!(
                    "unsupported URL scheme '{s}' in {root}"
                )));
            }
        };
        Ok(Storage {
            store,
            root_url,
            prefix,
        })
    }

    pub fn url(&self) -> &Url {
        &self.root_url
    }

    /// The object path of `rel` (a '/'-separated path relative to this root).
    pub fn path(&self, rel: &str) -> Path {
        let mut p = self.prefix.clone();
        for part in rel.split('/').filter(|s| !s.is_empty()) {
            p = p.clone().join(part);
        }
        p
    }

    /// The path of `p` relative to this root, or None if it lies outside.
    pub fn relative(&self, p: &Path) -> Option<String> {
        let parts: Vec<_> = p
            .prefix_match(&self.prefix)?
            .map(|x| x.as_ref().to_string())
            .collect();
        Some(parts.join("/"))
    }

    /// The URL of `rel`.
    pub fn url_of(&self, rel: &str) -> Url {
        let mut u = self.root_url.clone();
        let rel = rel.trim_matches('/');
        let p = format!("{}{}", u.path(), rel);
        u.set_path(&p);
        u
    }

    /// Every object under `rel`, recursively.
    pub async fn list(&self, rel: &str) -> Result<Vec<ObjectMeta>> {
        let prefix = self.path(rel);
        let mut out: Vec<ObjectMeta> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| Error::storage(self.url_of(rel).as_str(), e))?;
        out.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(out)
    }

    /// Immediate sub-directories of `rel`.
    pub async fn list_dirs(&self, rel: &str) -> Result<Vec<String>> {
        let prefix = self.path(rel);
        let res = self
            .store
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(|e| Error::storage(self.url_of(rel).as_str(), e))?;
        let mut dirs: Vec<String> = res
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(|s| s.to_string()))
            .collect();
        dirs.sort();
        Ok(dirs)
    }

    pub async fn get(&self, p: &Path) -> Result<Bytes> {
        let r = self
            .store
            .get(p)
            .await
            .map_err(|e| Error::storage(p.as_ref(), e))?;
        r.bytes().await.map_err(|e| Error::storage(p.as_ref(), e))
    }

    pub async fn put(&self, p: &Path, data: Bytes) -> Result<()> {
        self.store
            .put(p, PutPayload::from(data))
            .await
            .map_err(|e| Error::storage(p.as_ref(), e))?;
        Ok(())
    }

    /// Delete one object; a missing object is not an error (deletes are retried after crashes).
    pub async fn delete(&self, p: &Path) -> Result<()> {
        match self.store.delete(p).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::storage(p.as_ref(), e)),
        }
    }

    pub async fn exists(&self, p: &Path) -> Result<bool> {
        match self.store.head(p).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Error::storage(p.as_ref(), e)),
        }
    }

    /// A handle on the Delta table at `rel`, loaded at its latest version when it exists
    /// (`table.version()` is None when it does not yet).
    pub async fn delta_table(&self, rel: &str) -> Result<DeltaTable> {
        let url = self.url_of(rel);
        let mut table = self
            .delta_builder(&url)?
            .build()
            .map_err(|e| Error::delta(rel, e))?;
        if !self.list_dirs(rel).await?.iter().any(|d| d == "_delta_log") {
            return Ok(table);
        }
        match table.load().await {
            Ok(()) | Err(DeltaTableError::NotATable(_)) => Ok(table),
            Err(e) => Err(Error::delta(rel, e)),
        }
    }

    /// A handle on the Delta table at `rel` as of `version`.
    pub async fn delta_table_at(&self, rel: &str, version: u64) -> Result<DeltaTable> {
        let url = self.url_of(rel);
        let mut table = self
            .delta_builder(&url)?
            .build()
            .map_err(|e| Error::delta(rel, e))?;
        table
            .load_version(version)
            .await
            .map_err(|e| Error::delta(rel, e))?;
        Ok(table)
    }

    fn delta_builder(&self, url: &Url) -> Result<DeltaTableBuilder> {
        let mut table_url = url.clone();
        if !table_url.path().ends_with('/') {
            let p = format!("{}/", table_url.path());
            table_url.set_path(&p);
        }
        let mut store_root = self.root_url.clone();
        store_root.set_path("/");
        Ok(DeltaTableBuilder::from_url(table_url)
            .map_err(|e| Error::delta(url.as_str(), e))?
            .with_storage_backend(self.store.clone(), store_root))
    }
}
