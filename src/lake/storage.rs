//! Object stores for the lake and landing roots (`file://`, `gs://`), and Delta tables opened
//! on them. This is the only module that builds an `ObjectStore` or a `DeltaTable` handle;
//! everything else asks it. It must not know table names or layers (catalog.rs does).

use std::sync::{Arc, Once};

use bytes::Bytes;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};
use url::Url;

use crate::error::{Error, Result};
use crate::project::config::Project;

/// A data file's path in one spelling, whether it comes from a Delta log (percent-encoded
/// partition values, `ts=2024-01-01%2000%3A00`), from a listing (object_store's own encoding)
/// or from a reader: percent-decoded until nothing changes.
pub fn same_path(p: &str) -> String {
    let mut cur = p.to_string();
    loop {
        let next = percent_encoding::percent_decode_str(&cur)
            .decode_utf8_lossy()
            .into_owned();
        if next == cur {
            return cur;
        }
        cur = next;
    }
}

/// `path` as an absolute URL when a Delta log names a file by one (`file:///…`, `gs://…`):
/// a shallow clone's reference to another table's file. None for a table-relative path.
pub fn absolute_url(path: &str) -> Option<Url> {
    if !path.contains("://") {
        return None;
    }
    Url::parse(path).ok().filter(|u| u.scheme().len() > 1)
}

/// A selection of a Delta table's data files by the paths its snapshot reports
/// (`LogicalFileView::path`, decoded once), spelled as delta-rs compares them: in
/// object_store's encoding, as the log's add actions are (a partition value with a space, a
/// colon or a slash is encoded there).
pub fn select_files<S: AsRef<str>>(
    paths: impl IntoIterator<Item = S>,
) -> deltalake::delta_datafusion::FileSelection {
    deltalake::delta_datafusion::FileSelection::from_file_paths(
        paths
            .into_iter()
            .map(|p| String::from(Path::from(p.as_ref()))),
    )
}

/// One root (lake or landing): an object store at the bucket / filesystem root, plus the
/// URL and path prefix under it.
#[derive(Debug, Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    root_url: Url,
    prefix: Path,
    /// The credentials it was built with: stores of other buckets (an environment's clone
    /// naming another bucket's files) are built with the same.
    opts: CloudOptions,
}

/// Credentials and endpoints for cloud roots, taken from the project config and env.
#[derive(Debug, Clone, Default)]
pub struct CloudOptions {
    pub gcs_service_account_key: Option<String>,
    /// Per-request timeout (`gcs.timeout_secs`); a timed-out request is retried with backoff.
    pub gcs_timeout_secs: Option<u64>,
}

impl CloudOptions {
    pub fn from_project(p: &Project) -> Self {
        CloudOptions {
            gcs_service_account_key: std::env::var("GOOGLE_APPLICATION_CREDENTIALS")
                .ok()
                .filter(|s| !s.is_empty())
                .or_else(|| p.file.gcs.service_account_key.clone()),
            gcs_timeout_secs: p.file.gcs.timeout_secs,
        }
    }
}

static REGISTER: Once = Once::new();

fn register_handlers() {
    REGISTER.call_once(|| {
        deltalake::gcp::register_handlers(None);
    });
}

/// Application Default Credentials written by `gcloud auth application-default login`.
fn adc_file() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("CLOUDSDK_CONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".config/gcloud"))
        })?;
    let f = dir.join("application_default_credentials.json");
    f.is_file().then_some(f)
}

/// The GCS client for `bucket`: a service-account key (GOOGLE_APPLICATION_CREDENTIALS or
/// `gcs.service_account_key`), else ADC; with none, a clear error at once (object_store would
/// otherwise ask the metadata server). Plain http only for a loopback `gcs_base_url` (emulators).
fn gcs(
    root: &Url,
    bucket: &str,
    opts: &CloudOptions,
) -> Result<object_store::gcp::GoogleCloudStorage> {
    use object_store::{BackoffConfig, ClientOptions, RetryConfig};
    let mut b = object_store::gcp::GoogleCloudStorageBuilder::new().with_bucket_name(bucket);
    let mut client = ClientOptions::new()
        .with_timeout(std::time::Duration::from_secs(
            opts.gcs_timeout_secs.unwrap_or(60),
        ))
        .with_connect_timeout(std::time::Duration::from_secs(5));
    match (&opts.gcs_service_account_key, adc_file()) {
        (Some(key), _) => {
            let text = std::fs::read_to_string(key).map_err(|e| {
                Error::Usage(format!(
                    "cannot read the GCS service-account key {key}: {e}"
                ))
            })?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                Error::Usage(format!("{key} is not a service-account JSON key: {e}"))
            })?;
            if let Some(base) = json.get("gcs_base_url").and_then(|v| v.as_str())
                && let Ok(u) = Url::parse(base)
                && u.scheme() == "http"
                && matches!(
                    u.host_str(),
                    Some("127.0.0.1") | Some("localhost") | Some("[::1]")
                )
            {
                client = client.with_allow_http(true);
            }
            b = b.with_service_account_path(key);
        }
        (None, Some(adc)) => {
            b = b.with_application_credentials(adc.display().to_string());
        }
        (None, None) => {
            return Err(Error::Usage(format!(
                "no credentials for {root}: set GOOGLE_APPLICATION_CREDENTIALS to a service-account JSON key, gcs.service_account_key in silt.toml, or run `gcloud auth application-default login` (silt never asks a metadata server)"
            )));
        }
    }
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: std::time::Duration::from_millis(50),
            max_backoff: std::time::Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: 10,
        retry_timeout: std::time::Duration::from_secs(180),
    };
    b.with_client_options(client)
        .with_retry(retry)
        .build()
        .map_err(|e| Error::storage(root.as_str(), e))
}

/// A store that resolves ambiguous writes. object_store retries 5xx answers, and timeouts of
/// idempotent requests, itself; a conditional PUT (a Delta commit: `PutMode::Create`) that times
/// out may or may not have landed, so object_store gives up. This layer reads the object back: our
/// bytes there = it landed; absent = send it again; other bytes = someone else won
/// (`AlreadyExists`, which Delta resolves as a commit conflict). Deletes (idempotent) are retried.
#[derive(Debug)]
struct Resolving {
    inner: Arc<dyn ObjectStore>,
}

impl std::fmt::Display for Resolving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Resolving({})", self.inner)
    }
}

const RESOLVE_ATTEMPTS: u32 = 6;

fn transient(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::Generic { .. })
}

async fn pause(attempt: u32) {
    tokio::time::sleep(std::time::Duration::from_millis(100 << attempt.min(6))).await;
}

#[async_trait::async_trait]
impl ObjectStore for Resolving {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        let mut attempt = 0;
        loop {
            let err = match self
                .inner
                .put_opts(location, payload.clone(), opts.clone())
                .await
            {
                Err(e) if transient(&e) && attempt < RESOLVE_ATTEMPTS => e,
                r => return r,
            };
            attempt += 1;
            tracing::info!("{location}: write failed ({err}); checking whether it landed");
            pause(attempt).await;
            match self.inner.get(location).await {
                Ok(r) => {
                    let meta = r.meta.clone();
                    let got = match r.bytes().await {
                        Ok(b) => b,
                        Err(_) => continue,
                    };
                    let sent: Vec<u8> = payload.iter().flat_map(|b| b.iter().copied()).collect();
                    if got.as_ref() == sent.as_slice() {
                        return Ok(object_store::PutResult {
                            e_tag: meta.e_tag,
                            version: meta.version,
                        });
                    }
                    if matches!(opts.mode, object_store::PutMode::Create) {
                        return Err(object_store::Error::AlreadyExists {
                            path: location.to_string(),
                            source: Box::new(err),
                        });
                    }
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(_) => {}
            }
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<'static, object_store::Result<Path>>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<Path>> {
        use futures::StreamExt;
        let inner = self.inner.clone();
        locations
            .then(move |p| {
                let inner = inner.clone();
                async move {
                    let p = p?;
                    let mut attempt = 0;
                    loop {
                        match inner.delete(&p).await {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => return Ok(p),
                            Err(e) if transient(&e) && attempt < RESOLVE_ATTEMPTS => {
                                attempt += 1;
                                pause(attempt).await;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
            })
            .boxed()
    }

    fn list(
        &self,
        prefix: Option<&Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> futures::stream::BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

impl Storage {
    /// Build the store for a root URL. `gs://` needs explicit credentials: silt never lets the
    /// client fall back to a cloud metadata server.
    /// A store at `root`; a local root is created when missing.
    pub fn new(root: &Url, opts: &CloudOptions) -> Result<Storage> {
        Self::open(root, opts, true)
    }

    /// A store at a root that is only read and rewritten in place (the landing root): a missing
    /// local root is not created, so it can be reported ([`Storage::list_landing`]).
    pub fn existing(root: &Url, opts: &CloudOptions) -> Result<Storage> {
        Self::open(root, opts, false)
    }

    fn open(root: &Url, opts: &CloudOptions, create: bool) -> Result<Storage> {
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
                if create {
                    std::fs::create_dir_all(&path)
                        .map_err(|e| Error::io("create directory", &path, e))?;
                }
                let prefix = if path.exists() {
                    Path::from_filesystem_path(&path)
                } else {
                    Path::from_absolute_path(&path)
                }
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
                (
                    Arc::new(Resolving {
                        inner: Arc::new(gcs(root, bucket, opts)?),
                    }),
                    Path::from(root.path()),
                )
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
            opts: opts.clone(),
        })
    }

    /// The URL DataFusion knows this root's object store by (`file:///`, `gs://bucket`):
    /// object paths (`path`, `file_path`) are relative to that store.
    pub fn store_url(&self) -> Url {
        let mut u = self.root_url.clone();
        u.set_path("/");
        u.set_query(None);
        u.set_fragment(None);
        u
    }

    /// The object store under [`Storage::store_url`], for a DataFusion runtime to read from.
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.store)
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

    /// The object of a data file of the table at `rel`, by the path its snapshot reports
    /// (`LogicalFileView::path`): that path is the object's name as stored, so its parts are
    /// taken as they are, not encoded again (a partition value with a space or a colon is
    /// stored percent-encoded once).
    pub fn file_path(&self, rel: &str, path: &str) -> Path {
        let mut p = self.path(rel);
        for part in path.split('/').filter(|s| !s.is_empty()) {
            p = match object_store::path::PathPart::parse(part) {
                Ok(part) => p.clone().join(part),
                Err(_) => p.clone().join(part),
            };
        }
        p
    }

    /// The object of a data file of the table at `rel` as its log names it: a path relative
    /// to the table, or an absolute URL (a shallow clone's reference to another table's file,
    /// on this store's bucket or filesystem).
    pub fn data_file(&self, rel: &str, path: &str) -> Path {
        match absolute_url(path) {
            Some(u) => self
                .object_of(&u)
                .unwrap_or_else(|| self.file_path(rel, path)),
            None => self.file_path(rel, path),
        }
    }

    /// The object at `url` when it lies on this store (same scheme and bucket). The URL's
    /// path is the object's name as stored, not decoded (as delta-rs reads a clone's
    /// absolute paths: a partition directory `slot=T%201%3A00` is named so on disk).
    pub fn object_of(&self, url: &Url) -> Option<Path> {
        if url.scheme() != self.root_url.scheme() || url.host_str() != self.root_url.host_str() {
            return None;
        }
        Path::parse(url.path()).ok()
    }

    /// Where a data file of the table at `rel` is, as its log names it: on this store, or (an
    /// absolute URL on another bucket) on that bucket's store, built with this one's
    /// credentials.
    pub fn locate(&self, rel: &str, path: &str) -> Result<(Storage, Path)> {
        if let Some(u) = absolute_url(path)
            && self.object_of(&u).is_none()
        {
            let other = self.store_of(&u)?;
            let p = Path::parse(u.path()).map_err(|e| Error::storage(u.as_str(), e.into()))?;
            return Ok((other, p));
        }
        Ok((self.clone(), self.data_file(rel, path)))
    }

    /// The store at the bucket (or filesystem) root of `url`, with this store's credentials;
    /// one per bucket per process.
    pub fn store_of(&self, url: &Url) -> Result<Storage> {
        shared_store(url, &self.opts)
    }

    /// The content of a data file of the table at `rel` (see [`Storage::locate`]).
    pub async fn get_file(&self, rel: &str, path: &str) -> Result<Bytes> {
        let (s, p) = self.locate(rel, path)?;
        s.get(&p).await
    }

    /// Copy `from` of `src` (this store or another) to `to` on this store.
    pub async fn copy_from(&self, src: &Storage, from: &Path, to: &Path) -> Result<()> {
        if src.store_url() == self.store_url() {
            return self.copy(from, to).await;
        }
        let data = src.get(from).await?;
        self.put(to, data).await
    }

    /// An object store registry for a DataFusion runtime: this store, and any other bucket's
    /// built on first use with the same credentials (never a metadata server).
    pub fn registry(&self) -> Arc<LakeStores> {
        let r = LakeStores::new(self.opts.clone());
        datafusion::execution::object_store::ObjectStoreRegistry::register_store(
            &r,
            &self.store_url(),
            self.object_store(),
        );
        Arc::new(r)
    }

    /// Copy one object on this store (server-side where the backend can).
    pub async fn copy(&self, from: &Path, to: &Path) -> Result<()> {
        self.store
            .copy(from, to)
            .await
            .map_err(|e| Error::storage(from.as_ref(), e))
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

    /// The paths of every object under `rel`, relative to it, in [`same_path`] form.
    pub async fn names_under(&self, rel: &str) -> Result<std::collections::HashSet<String>> {
        let prefix = format!("{rel}/");
        Ok(self
            .list(rel)
            .await?
            .into_iter()
            .filter_map(|o| self.relative(&o.location))
            .filter_map(|p| p.strip_prefix(&prefix).map(same_path))
            .collect())
    }

    /// How many of `paths` (relative to `rel`, as a Delta log names them) no longer exist, by
    /// one listing.
    pub async fn count_missing<'p>(
        &self,
        rel: &str,
        paths: impl IntoIterator<Item = &'p str>,
    ) -> Result<usize> {
        let present = self.names_under(rel).await?;
        let mut missing = 0;
        for p in paths {
            if absolute_url(p).is_some() {
                // An environment's clone of another table's file: asked for by name.
                let (store, object) = self.locate(rel, p)?;
                if !store.exists(&object).await? {
                    missing += 1;
                }
            } else if !present.contains(&same_path(p)) {
                missing += 1;
            }
        }
        Ok(missing)
    }

    /// Every landing file under the root, and what could not be listed or is refused, said
    /// once each: an entry the store cannot list (a symlink loop, a name with a line break)
    /// and, on local disk, a link that resolves outside the root are skipped, so one bad
    /// entry never stops the others. A local root that does not exist is said too.
    pub async fn list_landing(&self) -> Result<(Vec<ObjectMeta>, Vec<String>)> {
        let mut files = Vec::new();
        let mut skipped = Vec::new();
        let local_root = (self.root_url.scheme() == "file")
            .then(|| self.root_url.to_file_path().ok())
            .flatten();
        if let Some(root) = &local_root
            && !root.is_dir()
        {
            skipped.push(format!(
                "the landing root {} does not exist: nothing to read (create it, or set [landing] root / SILT_LANDING)",
                root.display()
            ));
            return Ok((files, skipped));
        }
        let mut stream = self.store.list(Some(&self.prefix));
        while let Some(item) = stream.next().await {
            match item {
                Ok(m) => files.push(m),
                Err(e) => skipped.push(format!(
                    "an entry under the landing root cannot be read and is skipped: {e}"
                )),
            }
        }
        if let Some(root) = local_root
            && let Ok(canonical_root) = std::fs::canonicalize(&root)
        {
            // Links are followed by the store: one that leaves the root would let ingest read,
            // and forget rewrite, a file outside the project's roots.
            files.retain(|m| {
                let Some(rel) = self.relative(&m.location) else {
                    return true;
                };
                // The object's name on disk: as listed, or percent-decoded.
                let resolved = [rel.clone(), same_path(&rel)].into_iter().find_map(|r| {
                    std::fs::canonicalize(r.split('/').fold(root.clone(), |p, part| p.join(part)))
                        .ok()
                });
                match resolved.ok_or(()) {
                    Ok(target) if target.starts_with(&canonical_root) => true,
                    Ok(target) => {
                        skipped.push(format!(
                            "{rel} links outside the landing root (to {}): not followed",
                            target.display()
                        ));
                        false
                    }
                    Err(_) => true,
                }
            });
        }
        files.sort_by(|a, b| a.location.cmp(&b.location));
        Ok((files, skipped))
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
        self.put_e_tag(p, data).await?;
        Ok(())
    }

    /// Write `p`; the object's new etag, when the store gives one.
    pub async fn put_e_tag(&self, p: &Path, data: Bytes) -> Result<Option<String>> {
        let r = self
            .store
            .put(p, PutPayload::from(data))
            .await
            .map_err(|e| Error::storage(p.as_ref(), e))?;
        Ok(r.e_tag)
    }

    /// Create `p` only if no object is there: false when one already is. Every backend does
    /// this atomically (local disk by a hard link, GCS by `ifGenerationMatch=0`).
    pub async fn put_if_absent(&self, p: &Path, data: Bytes) -> Result<bool> {
        let opts = object_store::PutOptions {
            mode: object_store::PutMode::Create,
            ..Default::default()
        };
        match self.store.put_opts(p, PutPayload::from(data), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(Error::storage(p.as_ref(), e)),
        }
    }

    /// After every object under this root was deleted: a local root's directories go too (an
    /// object store has none). Best effort.
    pub fn remove_empty_root(&self) {
        if self.root_url.scheme() == "file"
            && let Ok(p) = self.root_url.to_file_path()
        {
            let _ = std::fs::remove_dir_all(p);
        }
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

/// The store at the bucket (or filesystem) root of `url` built with `opts`, once per process
/// for each bucket and credentials (sessions and scans of other buckets share it).
fn shared_store(url: &Url, opts: &CloudOptions) -> Result<Storage> {
    static STORES: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, Storage>>,
    > = std::sync::OnceLock::new();
    let key = format!(
        "{}://{}|{:?}|{:?}",
        url.scheme(),
        url.host_str().unwrap_or(""),
        opts.gcs_service_account_key,
        opts.gcs_timeout_secs
    );
    let cache = STORES.get_or_init(Default::default);
    if let Some(s) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(s.clone());
    }
    let mut root = url.clone();
    root.set_path("/");
    root.set_query(None);
    root.set_fragment(None);
    let s = Storage::existing(&root, opts)?;
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, s.clone());
    Ok(s)
}

/// The object stores a cluster executor reads from, built on first use by the same rules as
/// the client's ([`Storage`]): `file://`, and `gs://` only with explicit credentials
/// (`GOOGLE_APPLICATION_CREDENTIALS` or Application Default Credentials), never a metadata
/// server.
#[derive(Debug, Default)]
pub struct LakeStores {
    opts: CloudOptions,
    stores: std::sync::RwLock<std::collections::HashMap<String, Arc<dyn ObjectStore>>>,
}

impl LakeStores {
    /// Stores built with these credentials.
    pub fn new(opts: CloudOptions) -> Self {
        LakeStores {
            opts,
            stores: Default::default(),
        }
    }

    /// Credentials from this process's environment.
    pub fn from_env() -> Self {
        LakeStores {
            opts: CloudOptions {
                gcs_service_account_key: std::env::var("GOOGLE_APPLICATION_CREDENTIALS")
                    .ok()
                    .filter(|s| !s.is_empty()),
                gcs_timeout_secs: None,
            },
            stores: Default::default(),
        }
    }

    fn key(url: &Url) -> String {
        format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""))
    }
}

impl datafusion::execution::object_store::ObjectStoreRegistry for LakeStores {
    fn register_store(
        &self,
        url: &Url,
        store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        self.stores
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(Self::key(url), store)
    }

    fn get_store(&self, url: &Url) -> datafusion::error::Result<Arc<dyn ObjectStore>> {
        let key = Self::key(url);
        if let Some(s) = self
            .stores
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(Arc::clone(s));
        }
        let store = shared_store(url, &self.opts)
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?
            .object_store();
        self.stores
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, Arc::clone(&store));
        Ok(store)
    }
}
