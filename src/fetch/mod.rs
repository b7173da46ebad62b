//! cimage's own fetch of an image's big layer blobs into the runtime's content store, several
//! HTTP range requests per blob, before and while the runtime's `PullImage` runs: containerd
//! fetches each layer over one connection, cimage over `ConnectionsPerPull`.
//!
//! For one pull ([`Fetcher::start`]): a lease is made (it holds what is written until the
//! pull has returned, and expires by itself after the pull's deadline should cimaged die), a
//! writer is opened on each big layer under containerd's own ref for it, bottom layer first,
//! and only then may `PullImage` start: the runtime's fetch of such a layer waits on the ref's
//! lock and then finds the blob committed, so the runtime unpacks layer 1 while cimage still
//! fetches layer 2. Segments are fetched ahead into buffers bounded by `MaxBufferPerPull` and
//! written in order (`blob.rs`). A blob cimage cannot fetch is left to the runtime (its writer
//! aborted); one whose bytes do not match its digest twice fails the pull.

mod blob;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config;
use crate::credentials::Credentials;
use crate::reference::ImageRef;
use crate::registry::{Blob, BlobSource, ImageManifest};
use crate::runtime::{layer_ref, BlobTarget, BlobWriter, ContentStore};

/// When cimage fetches blobs itself (`ImageCache.ParallelFetch.Enabled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FetchMode {
    /// Where the runtime answers containerd's content and leases API.
    #[default]
    Auto,
    /// As `Auto`, and a runtime without that API is reported at each pull.
    On,
    /// Never: the runtime fetches everything.
    Off,
}

/// How cimage fetches big blobs (`ImageCache.ParallelFetch`).
#[derive(Debug, Clone)]
pub struct FetchSettings {
    /// When it fetches at all.
    pub mode: FetchMode,
    /// HTTP connections one pull's fetch uses at most.
    pub connections_per_pull: usize,
    /// HTTP connections all fetches from one registry use at most.
    pub connections_per_registry: usize,
    /// Bytes per range request, at most (smaller when the buffer asks for it).
    pub segment_size: u64,
    /// Blobs smaller than this are left to the runtime.
    pub min_blob_size: u64,
    /// Bytes one pull's fetch holds in memory at most (fetched, not yet written).
    pub max_buffer_per_pull: u64,
    /// A range whose bytes stop this long is fetched again (`PullStallTimeout`).
    pub stall_timeout: Duration,
    /// How often one range is tried again before its blob is left to the runtime.
    pub segment_retries: u32,
    /// First wait before a range is tried again; doubled each time.
    pub backoff: Duration,
    /// Names this daemon's leases ([`OWNER_LABEL`]; letters and digits): a daemon that starts
    /// deletes the leases its earlier self left, never another daemon's on the same runtime.
    pub owner: String,
}

impl Default for FetchSettings {
    fn default() -> Self {
        Self {
            mode: FetchMode::Auto,
            connections_per_pull: config::DEFAULT_FETCH_CONNECTIONS_PER_PULL,
            connections_per_registry: config::DEFAULT_FETCH_CONNECTIONS_PER_REGISTRY,
            segment_size: config::DEFAULT_FETCH_SEGMENT_SIZE,
            min_blob_size: config::DEFAULT_FETCH_MIN_BLOB_SIZE,
            max_buffer_per_pull: config::DEFAULT_FETCH_MAX_BUFFER_PER_PULL,
            stall_timeout: config::DEFAULT_PULL_STALL_TIMEOUT,
            segment_retries: 3,
            backoff: Duration::from_millis(500),
            owner: "cimaged".into(),
        }
    }
}

impl FetchSettings {
    /// The bytes of one range request: `SegmentSize`, or less so that every connection of a
    /// pull can hold one within `MaxBufferPerPull` (with the defaults, 8 MiB: all 8
    /// connections stay busy), never under 1 MiB.
    pub fn segment(&self) -> u64 {
        let share = self.max_buffer_per_pull / self.connections_per_pull.max(1) as u64;
        self.segment_size.min(share).max(1 << 20)
    }
}

impl Shared {
    /// An empty segment buffer for `len` bytes: one written already when there is one.
    fn segment_buffer(&self, len: usize) -> bytes::BytesMut {
        let mut b = self.spare.lock().unwrap().pop().unwrap_or_default();
        b.clear();
        b.reserve(len);
        b
    }

    /// Takes back a segment's bytes once written, when nothing else holds them.
    fn written(&self, bytes: bytes::Bytes) {
        if let Ok(b) = bytes.try_into_mut() {
            self.spare.lock().unwrap().push(b);
        }
    }
}

/// The label that marks cimage's leases (its value: the image).
pub const LEASE_LABEL: &str = "cimage.io/fetch";
/// The label that names the daemon that made a lease ([`FetchSettings::owner`]).
pub const OWNER_LABEL: &str = "cimage.io/fetch-owner";

/// Why a pull must fail because of cimage's fetch.
#[derive(Debug, Clone, thiserror::Error)]
#[error("registry {registry}: blob {digest} of {image} does not match its digest (fetched twice); the registry or a proxy on the way serves corrupt data")]
pub struct FetchError {
    /// The host that served the blob.
    pub registry: String,
    /// The image pulled.
    pub image: String,
    /// The blob's digest.
    pub digest: String,
}

/// Fetches big blobs into the runtime's content store; one per daemon.
pub struct Fetcher {
    store: Arc<dyn ContentStore>,
    source: Arc<dyn BlobSource>,
    settings: FetchSettings,
    /// Connections per registry host, shared by all pulls.
    per_registry: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// What the fetch of one pull shares between its blobs.
struct Shared {
    source: Arc<dyn BlobSource>,
    settings: FetchSettings,
    image: ImageRef,
    credentials: Option<Credentials>,
    /// This pull's connections.
    connections: Arc<Semaphore>,
    /// Its registry's connections.
    registry: Arc<Semaphore>,
    /// Bytes fetched and not yet written, in bytes.
    buffer: Arc<Semaphore>,
    /// Segment buffers already written, kept for the next segments of the pull: a buffer of
    /// megabytes made afresh for each segment costs a page fault per page (about a fifth of
    /// the fetch's CPU, measured). There are never more of them than segments fetched at
    /// once, so what they hold stays within `MaxBufferPerPull`.
    spare: Mutex<Vec<bytes::BytesMut>>,
    stop: CancellationToken,
}

impl Fetcher {
    /// A fetcher writing into `store` what it reads from `source`.
    pub fn new(
        store: Arc<dyn ContentStore>,
        source: Arc<dyn BlobSource>,
        settings: FetchSettings,
    ) -> Self {
        Self {
            store,
            source,
            settings,
            per_registry: Mutex::new(HashMap::new()),
        }
    }

    /// Starts fetching the big layers of `image` (as `manifest` names them) with
    /// `credentials`, under a lease that expires after `hold_for`; `None` when there is
    /// nothing to fetch here (no big layer, fetch off, a runtime without the content API, or
    /// every big blob held or being written already). Returns once the writers are open: the
    /// runtime's pull may start then.
    pub async fn start(
        &self,
        image: &ImageRef,
        credentials: Option<&Credentials>,
        manifest: &ImageManifest,
        hold_for: Duration,
    ) -> Option<Fetch> {
        if self.settings.mode == FetchMode::Off {
            return None;
        }
        let mut seen = std::collections::HashSet::new();
        let big: Vec<Blob> = manifest
            .layers
            .iter()
            .filter(|b| b.size >= self.settings.min_blob_size.max(1))
            .filter(|b| seen.insert(b.digest.clone()))
            .cloned()
            .collect();
        if big.is_empty() {
            return None;
        }
        if !self.store.available().await {
            match self.settings.mode {
                FetchMode::On => {
                    warn!(image = %image, "ImageCache.ParallelFetch is on, but the runtime does not answer containerd's content API: the runtime fetches every layer itself")
                }
                _ => debug!(image = %image, "the runtime has no content API: plain PullImage"),
            }
            return None;
        }
        let lease = format!("cimage-fetch-{:016x}", rand::random::<u64>());
        let labels = [
            (LEASE_LABEL, image.to_string()),
            (OWNER_LABEL, self.settings.owner.clone()),
        ];
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if let Err(e) = self
            .store
            .create_lease(&lease, SystemTime::now() + hold_for, &labels)
            .await
        {
            warn!(image = %image, "cannot make a lease for cimage's fetch, the runtime fetches every layer itself: {e}");
            return None;
        }
        let mut writers: Vec<(Blob, Box<dyn BlobWriter>)> = Vec::new();
        for b in big {
            let target = BlobTarget {
                r#ref: layer_ref(&b.digest),
                digest: b.digest.clone(),
                size: b.size,
            };
            match self.store.open_writer(&lease, &target).await {
                Ok(Some(w)) => writers.push((b, w)),
                Ok(None) => debug!(digest = %b.digest, "held or being written already"),
                Err(e) => {
                    warn!(image = %image, digest = %b.digest, "cannot write into the runtime's content store, the runtime fetches this layer itself: {e}");
                }
            }
        }
        if writers.is_empty() {
            self.drop_lease(&lease).await;
            return None;
        }
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            source: Arc::clone(&self.source),
            settings: self.settings.clone(),
            image: image.clone(),
            credentials: credentials.cloned(),
            connections: Arc::new(Semaphore::new(self.settings.connections_per_pull.max(1))),
            registry: self.registry_slots(image.registry()),
            buffer: Arc::new(Semaphore::new(
                self.settings
                    .max_buffer_per_pull
                    .max(self.settings.segment()) as usize,
            )),
            stop: stop.clone(),
            spare: Mutex::new(Vec::new()),
        });
        let fetched: Vec<(String, Arc<AtomicU64>)> = writers
            .iter()
            .map(|(b, _)| (b.digest.clone(), Arc::new(AtomicU64::new(0))))
            .collect();
        let counters = fetched.iter().map(|(_, c)| Arc::clone(c)).collect();
        info!(image = %image, blobs = writers.len(), connections = self.settings.connections_per_pull, segment = self.settings.segment(), "fetching the big layers in ranges");
        let (fatal_tx, fatal) = watch::channel(None);
        let (first_tx, first_in) = watch::channel(false);
        let task = tokio::spawn(blob::run_all(shared, writers, counters, fatal_tx, first_tx));
        Some(Fetch {
            lease,
            store: Arc::clone(&self.store),
            stop,
            task: Some(task),
            fatal,
            first_in,
            fetched: FetchCounts(fetched),
        })
    }

    async fn drop_lease(&self, lease: &str) {
        if let Err(e) = self.store.delete_lease(lease).await {
            warn!(
                lease,
                "cannot delete cimage's lease (it expires by itself): {e}"
            );
        }
    }

    /// Deletes the leases this daemon's earlier self left in the runtime (killed mid-fetch):
    /// at start-up, before any pull. Other daemons' leases on the same runtime stay.
    pub async fn clean_leftovers(&self) {
        if self.settings.mode == FetchMode::Off || !self.store.available().await {
            return;
        }
        match self
            .store
            .leases_labelled(OWNER_LABEL, &self.settings.owner)
            .await
        {
            Ok(ids) => {
                for id in ids {
                    info!(lease = %id, "deleting a lease an earlier cimaged left behind");
                    self.drop_lease(&id).await;
                }
            }
            Err(e) => warn!("cannot list cimage's leases in the runtime: {e}"),
        }
    }

    fn registry_slots(&self, registry: &str) -> Arc<Semaphore> {
        let mut m = self.per_registry.lock().unwrap();
        Arc::clone(m.entry(registry.to_owned()).or_insert_with(|| {
            Arc::new(Semaphore::new(
                self.settings.connections_per_registry.max(1),
            ))
        }))
    }
}

/// The fetch of one pull, running: ended by [`Fetch::finish`] once the runtime's pull has
/// returned (or, if dropped, in the background).
pub struct Fetch {
    lease: String,
    store: Arc<dyn ContentStore>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    fatal: watch::Receiver<Option<FetchError>>,
    first_in: watch::Receiver<bool>,
    fetched: FetchCounts,
}

/// cimage's own byte counts of the blobs one pull's fetch writes (exact, per blob, as written
/// into the runtime's store): a handle that reads them while the fetch runs.
#[derive(Debug, Clone, Default)]
pub struct FetchCounts(Vec<(String, Arc<AtomicU64>)>);

impl FetchCounts {
    /// The bytes written so far of each blob cimage fetches, by digest.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        self.0
            .iter()
            .map(|(d, n)| (d.clone(), n.load(std::sync::atomic::Ordering::Relaxed)))
            .collect()
    }
}

impl Fetch {
    /// Resolves when a blob has failed in a way that must fail the pull (its bytes did not
    /// match its digest twice); pends otherwise.
    pub async fn failed(&mut self) -> FetchError {
        loop {
            if let Some(e) = self.fatal.borrow_and_update().clone() {
                return e;
            }
            if self.fatal.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Turns `true` once the first blob cimage fetches is committed, or left to the runtime:
    /// the runtime's pull may start then and find it at once.
    pub fn first_in(&self) -> watch::Receiver<bool> {
        self.first_in.clone()
    }

    /// cimage's byte counts of the blobs it fetches, as a handle that outlives a borrow of the
    /// fetch (the pull's progress reads it while the runtime's pull runs).
    pub fn counts(&self) -> FetchCounts {
        self.fetched.clone()
    }

    /// Stops what is left (a blob not yet committed is aborted: nothing blocks the next
    /// pull), waits for it, and deletes the lease.
    pub async fn finish(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        if let Err(e) = self.store.delete_lease(&self.lease).await {
            warn!(lease = %self.lease, "cannot delete cimage's lease (it expires by itself): {e}");
        }
    }
}

impl Drop for Fetch {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else { return };
        self.stop.cancel();
        let (store, lease) = (Arc::clone(&self.store), self.lease.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = task.await;
                if let Err(e) = store.delete_lease(&lease).await {
                    warn!(%lease, "cannot delete cimage's lease (it expires by itself): {e}");
                }
            });
        }
    }
}
