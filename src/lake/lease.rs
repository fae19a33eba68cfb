//! The lake's run lease: one silt process at a time runs a command that rewrites
//! the lake's tables. The lease is a sequence of small JSON objects under `_silt/lease/`, each
//! created with a put that fails when the object already exists, the one conditional write every
//! object_store backend offers (local disk has no compare-and-swap on an existing object). The
//! newest entry decides: the lease is held while it names a holder that has neither released it
//! nor let it expire (the holder renews it every third of its time to live); a holder on this
//! host whose process is gone frees it at once. Two processes that both find it free race to
//! create the same next entry and exactly one wins. This file must not decide which commands
//! take the lease (the CLI and watch do) and must not touch tables.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lake::storage::Storage;

/// Where the lease entries live, under the lake root.
pub const DIR: &str = "_silt/lease";

/// How long to wait for a held lease before giving up, and how long an entry lives unrenewed.
#[derive(Debug, Clone, Copy)]
pub struct LeaseOptions {
    pub wait: Duration,
    pub ttl: Duration,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        LeaseOptions {
            wait: Duration::from_secs(60),
            ttl: Duration::from_secs(60),
        }
    }
}

impl LeaseOptions {
    /// The defaults, with `SILT_LEASE_WAIT` / `SILT_LEASE_TTL` (seconds) when set.
    pub fn from_env() -> Result<LeaseOptions> {
        let secs = |name: &str, default: Duration| -> Result<Duration> {
            match std::env::var(name) {
                Ok(v) => v
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| {
                        Error::Usage(format!(
                            "{name}='{v}' is not a number of seconds (e.g. {name}=60)"
                        ))
                    }),
                Err(_) => Ok(default),
            }
        };
        let d = LeaseOptions::default();
        let ttl = secs("SILT_LEASE_TTL", d.ttl)?;
        if ttl < Duration::from_secs(1) {
            return Err(Error::Usage(
                "SILT_LEASE_TTL must be at least 1 second".into(),
            ));
        }
        Ok(LeaseOptions {
            wait: secs("SILT_LEASE_WAIT", d.wait)?,
            ttl,
        })
    }
}

/// One entry of the lease's sequence: who holds it (or released it) and until when.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Holder {
    /// A fresh id per acquisition.
    pub id: String,
    /// The command line's verb, e.g. `run` or `forget`.
    pub command: String,
    pub pid: u32,
    pub host: String,
    pub acquired_at: DateTime<Utc>,
    /// The holder renews before this; after it the lease is free.
    pub expires_at: DateTime<Utc>,
    #[serde(default)]
    pub released: bool,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`silt {}` (pid {} on host {}) since {}",
            self.command,
            self.pid,
            self.host,
            self.acquired_at.format("%Y-%m-%d %H:%M:%S UTC")
        )
    }
}

/// What the newest entry says.
enum State {
    Free,
    Held(Holder),
}

/// A held lease. Renewed in the background until [`Lease::release`]; a process that ends
/// without releasing leaves an entry that expires (or, on this host, is freed once the process
/// is gone).
pub struct Lease {
    lake: Storage,
    holder: Holder,
    seq: Arc<AtomicU64>,
    lost: Arc<AtomicBool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

/// Take the lake's lease for `command`, waiting up to `opts.wait` while another process holds
/// it; `on_wait` is told the holder once, when waiting starts.
pub async fn acquire(
    lake: &Storage,
    command: &str,
    opts: LeaseOptions,
    mut on_wait: impl FnMut(&Holder),
) -> Result<Lease> {
    let mut waiting = Waiting::new(opts);
    loop {
        let (latest, state) = newest(lake).await?;
        match state {
            State::Free => {
                let now = Utc::now();
                let holder = Holder {
                    id: uuid::Uuid::new_v4().to_string(),
                    command: command.to_string(),
                    pid: std::process::id(),
                    host: hostname(),
                    acquired_at: now,
                    expires_at: now + ttl(opts),
                    released: false,
                };
                let seq = latest.map_or(1, |s| s + 1);
                if create(lake, seq, &holder).await? {
                    tracing::debug!(seq, "lease acquired");
                    prune(lake, seq).await;
                    return Ok(Lease::start(lake.clone(), holder, seq, opts));
                }
                // Another process created that entry first: look again.
            }
            State::Held(h) => {
                if waiting.over() {
                    return Err(Error::Busy(format!(
                        "the lake at {} is in use: {h} holds its lease, renewed until {}. \
                         Wait for it to finish and run again, or wait longer with \
                         SILT_LEASE_WAIT=<seconds> (now {} s). If that process is gone, its \
                         lease expires by itself at that time.",
                        lake.url(),
                        h.expires_at.format("%H:%M:%S UTC"),
                        opts.wait.as_secs()
                    )));
                }
                waiting.wait(&h, &mut on_wait).await;
            }
        }
    }
}

impl Lease {
    fn start(lake: Storage, holder: Holder, seq: u64, opts: LeaseOptions) -> Lease {
        HELD_HERE.fetch_add(1, Ordering::SeqCst);
        let seq = Arc::new(AtomicU64::new(seq));
        let lost = Arc::new(AtomicBool::new(false));
        let (stop, renewer) = {
            let (lake, seq, lost) = (lake.clone(), seq.clone(), lost.clone());
            renewal(opts, holder.clone(), move |holder| {
                let (lake, seq, lost) = (lake.clone(), seq.clone(), lost.clone());
                async move {
                    let next = seq.load(Ordering::SeqCst) + 1;
                    match create(&lake, next, &holder).await {
                        Ok(true) => seq.store(next, Ordering::SeqCst),
                        Ok(false) => {
                            tracing::error!(
                                "the lake's lease was taken over by another process (this one \
                                 did not renew it in time); Delta's optimistic concurrency still \
                                 keeps every commit whole"
                            );
                            lost.store(true, Ordering::SeqCst);
                            return false;
                        }
                        // A failed renewal is tried again at the next tick; the entry still
                        // has two thirds of its time to live.
                        Err(e) => tracing::warn!("cannot renew the lake's lease: {e}"),
                    }
                    true
                }
            })
        };
        Lease {
            lake,
            holder,
            seq,
            lost,
            stop: Some(stop),
            renewer: Some(renewer),
        }
    }

    /// The entry this process wrote when it took the lease.
    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// True once another process has taken the lease over (this one stalled past its TTL).
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Stop renewing and free the lease for the next process.
    pub async fn release(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(r) = self.renewer.take() {
            let _ = r.await;
        }
        if self.lost() {
            return Ok(());
        }
        let mut entry = self.holder.clone();
        entry.released = true;
        entry.expires_at = Utc::now();
        let next = self.seq.load(Ordering::SeqCst) + 1;
        if create(&self.lake, next, &entry).await? {
            prune(&self.lake, next).await;
        }
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Dropped without release (an error path that returned early): stop renewing, so the
        // entry expires; on this host the next process frees it at once when this one is gone.
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
        HELD_HERE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Where running ingests keep their claims, next to the lease's entries.
const CLAIMS: &str = "_silt/lease/ingest";

/// A running ingest's claim on the landing files. Ingests do not exclude each other (Delta
/// `txn` ids keep each landing file's rows exactly once), but `silt forget` rewrites landing
/// files: an ingest never runs while a forget holds the lease, and a forget waits for the
/// ingests that started before it. A claim is renewed like the lease and ends when dropped
/// without release (a killed ingest's claim is free at once on its host, after its time to
/// live elsewhere).
pub struct Claim {
    lake: Storage,
    path: object_store::path::Path,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

/// Claim the landing files for an ingest: the claim is made first, then the lease is read, so
/// an ingest and a forget starting at once always see each other (the ingest then steps back
/// and waits, up to `opts.wait`).
pub async fn claim_ingest(
    lake: &Storage,
    opts: LeaseOptions,
    mut on_wait: impl FnMut(&Holder),
) -> Result<Claim> {
    let mut waiting = Waiting::new(opts);
    loop {
        let now = Utc::now();
        let holder = Holder {
            id: uuid::Uuid::new_v4().to_string(),
            command: "ingest".into(),
            pid: std::process::id(),
            host: hostname(),
            acquired_at: now,
            expires_at: now + ttl(opts),
            released: false,
        };
        let path = lake.path(&format!("{CLAIMS}/{}.json", holder.id));
        let body = serde_json::to_vec(&holder)?;
        lake.put(&path, body.into()).await?;
        match newest(lake).await?.1 {
            State::Held(h) if h.command == "forget" => {
                lake.delete(&path).await?;
                if waiting.over() {
                    return Err(Error::Busy(format!(
                        "{h} is erasing data subjects from the lake at {}, landing files included: ingest waits for it. Run ingest again when it is done, or wait longer with SILT_LEASE_WAIT=<seconds> (now {} s).",
                        lake.url(),
                        opts.wait.as_secs()
                    )));
                }
                waiting.wait(&h, &mut on_wait).await;
            }
            _ => {
                HELD_HERE.fetch_add(1, Ordering::SeqCst);
                let (stop, renewer) = {
                    let (lake, path) = (lake.clone(), path.clone());
                    renewal(opts, holder.clone(), move |holder| {
                        let (lake, path) = (lake.clone(), path.clone());
                        async move {
                            if let Ok(body) = serde_json::to_vec(&holder)
                                && let Err(e) = lake.put(&path, body.into()).await
                            {
                                tracing::warn!("cannot renew the ingest's claim: {e}");
                            }
                            true
                        }
                    })
                };
                return Ok(Claim {
                    lake: lake.clone(),
                    path,
                    stop: Some(stop),
                    renewer: Some(renewer),
                });
            }
        }
    }
}

impl Claim {
    /// Stop renewing and remove the claim.
    pub async fn release(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(r) = self.renewer.take() {
            let _ = r.await;
        }
        self.lake.delete(&self.path).await
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
        HELD_HERE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// For `silt forget`, once it holds the lease: wait (up to `opts.wait`) until no ingest that
/// claimed the landing files before it is still running; `on_wait` is told one of them once.
pub async fn wait_for_ingests(
    lake: &Storage,
    opts: LeaseOptions,
    mut on_wait: impl FnMut(&Holder),
) -> Result<()> {
    let mut waiting = Waiting::new(opts);
    loop {
        let mut live: Option<Holder> = None;
        for m in lake.list(CLAIMS).await? {
            let Ok(bytes) = lake.get(&m.location).await else {
                continue; // released between the listing and the read
            };
            let Ok(h) = serde_json::from_slice::<Holder>(&bytes) else {
                continue;
            };
            if !h.released && h.expires_at > Utc::now() && !gone(&h) {
                live = Some(h);
                break;
            }
        }
        let Some(h) = live else {
            return Ok(());
        };
        if waiting.over() {
            return Err(Error::Busy(format!(
                "{h} is ingesting into the lake at {}; forget rewrites landing files and waits for it. Run forget again when it is done, or wait longer with SILT_LEASE_WAIT=<seconds> (now {} s).",
                lake.url(),
                opts.wait.as_secs()
            )));
        }
        waiting.wait(&h, &mut on_wait).await;
    }
}

/// Waiting for another process, with backoff up to a deadline: `on_wait` is told whom once.
struct Waiting {
    deadline: tokio::time::Instant,
    pause: Duration,
    told: bool,
}

impl Waiting {
    fn new(opts: LeaseOptions) -> Self {
        Waiting {
            deadline: tokio::time::Instant::now() + opts.wait,
            pause: Duration::from_millis(100),
            told: false,
        }
    }

    fn over(&self) -> bool {
        tokio::time::Instant::now() >= self.deadline
    }

    async fn wait(&mut self, h: &Holder, on_wait: &mut impl FnMut(&Holder)) {
        if !self.told {
            on_wait(h);
            self.told = true;
        }
        let left = self.deadline - tokio::time::Instant::now();
        tokio::time::sleep(self.pause.min(left)).await;
        self.pause = (self.pause * 2).min(Duration::from_secs(2));
    }
}

fn ttl(opts: LeaseOptions) -> chrono::Duration {
    chrono::Duration::from_std(opts.ttl).unwrap_or(chrono::Duration::seconds(60))
}

fn entry_path(lake: &Storage, seq: u64) -> object_store::path::Path {
    lake.path(&format!("{DIR}/{seq:020}.json"))
}

/// The sequence number of an entry's object, if it is one.
fn seq_of(lake: &Storage, m: &object_store::ObjectMeta) -> Option<u64> {
    let name = lake.relative(&m.location)?;
    let file = name.strip_prefix(DIR)?.trim_start_matches('/');
    file.strip_suffix(".json")?.parse().ok()
}

/// The newest entry's number and what it says.
async fn newest(lake: &Storage) -> Result<(Option<u64>, State)> {
    let Some((seq, m)) = lake
        .list(DIR)
        .await?
        .into_iter()
        .filter_map(|m| seq_of(lake, &m).map(|s| (s, m)))
        .max_by_key(|(s, _)| *s)
    else {
        return Ok((None, State::Free));
    };
    let bytes = match lake.get(&m.location).await {
        Ok(b) => b,
        // Pruned between the listing and the read: only older entries are pruned, so a newer
        // one exists; look again.
        Err(Error::Storage {
            source: object_store::Error::NotFound { .. },
            ..
        }) => return Box::pin(newest(lake)).await,
        Err(e) => return Err(e),
    };
    let h: Holder = serde_json::from_slice(&bytes).map_err(|e| {
        Error::Lease(format!(
            "the lease entry {} is not readable ({e}); delete the folder {} if no silt process is running",
            lake.url_of(&format!("{DIR}/{seq:020}.json")),
            lake.url_of(DIR)
        ))
    })?;
    let state = if h.released || h.expires_at <= Utc::now() || gone(&h) {
        State::Free
    } else {
        State::Held(h)
    };
    Ok((Some(seq), state))
}

/// Create entry `seq`; false when it already exists (another process wrote it first).
async fn create(lake: &Storage, seq: u64, h: &Holder) -> Result<bool> {
    let body = serde_json::to_vec(h)?;
    lake.put_if_absent(&entry_path(lake, seq), body.into())
        .await
}

/// Delete entries older than `keep` that are ten minutes old or more. Only older entries go
/// (the newest decides), and only old ones: a process that read the listing before they went
/// and creates its next entry later than that would otherwise recreate a deleted number.
async fn prune(lake: &Storage, keep: u64) {
    let Ok(all) = lake.list(DIR).await else {
        return;
    };
    let cutoff = Utc::now() - chrono::Duration::minutes(10);
    for m in all {
        if seq_of(lake, &m).is_some_and(|s| s < keep) && m.last_modified < cutoff {
            let _ = lake.delete(&m.location).await;
        }
    }
}

/// Leases this process holds now.
static HELD_HERE: AtomicU64 = AtomicU64::new(0);

/// True when the holder ran on this host and its process no longer exists, or is this process
/// and holds no lease any more (an earlier command of it ended without releasing).
fn gone(h: &Holder) -> bool {
    if h.host != hostname() {
        return false;
    }
    if h.pid == std::process::id() {
        return HELD_HERE.load(Ordering::SeqCst) == 0;
    }
    let Ok(pid) = libc::pid_t::try_from(h.pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let r = unsafe { libc::kill(pid, 0) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // truncates, and we stop at the first NUL.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Renew an entry every third of its time to live until told to stop (or until `renew` says
/// false): `renew` writes `holder` with its new expiry. Only the sleep is interruptible: a
/// renewal in flight always completes, so a release never races an entry of its own.
fn renewal<F, Fut>(
    opts: LeaseOptions,
    mut holder: Holder,
    mut renew: F,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
)
where
    F: FnMut(Holder) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let renewer = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(opts.ttl / 3) => {}
                _ = &mut stopped => return,
            }
            holder.expires_at = Utc::now() + ttl(opts);
            if !renew(holder.clone()).await {
                return;
            }
        }
    });
    (stop, renewer)
}
