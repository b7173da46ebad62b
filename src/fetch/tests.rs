//! Unit tests of the fetch over a scripted blob source and the in-memory content store: order,
//! bounded buffers, segment retries, stalls, digest mismatches, hosts that ignore ranges, and
//! the fallbacks to the runtime's own fetch.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::*;
use crate::registry::{BlobBody, OpenBlob, RangeReader, RegistryError, RegistryErrorKind};
use crate::runtime::content::fake::FakeStore;
use crate::runtime::RuntimeError;

const MIB: u64 = 1 << 20;

/// A registry in memory: blobs by digest, answered in chunks of 256 KiB, with faults.
#[derive(Default)]
struct Script {
    blobs: HashMap<String, Vec<u8>>,
    /// Answer every range with the whole blob (200).
    ignore_ranges: AtomicBool,
    /// Ranges (by start offset) whose next read fails after half its bytes, once each.
    break_once: Mutex<Vec<u64>>,
    /// Ranges (by start offset) whose next read stops sending, once each.
    stall_once: Mutex<Vec<u64>>,
    /// How many more times each blob is served with one byte flipped.
    corrupt: Mutex<HashMap<String, u32>>,
    /// Blobs the registry does not have.
    missing: Mutex<Vec<String>>,
    /// Bytes served per blob.
    served: Mutex<BTreeMap<String, u64>>,
    /// Reads per (blob, start).
    reads: Mutex<BTreeMap<(String, u64), u32>>,
    /// Reads open now, and the most at once.
    open_now: AtomicUsize,
    open_max: AtomicUsize,
    /// When set: bytes served in all, compared with `limit` at each chunk.
    total_served: AtomicU64,
}

#[derive(Clone)]
struct Source(Arc<Script>);

struct Reader {
    script: Arc<Script>,
    digest: String,
}

fn err(kind: RegistryErrorKind, what: &'static str) -> RegistryError {
    RegistryError {
        registry: "reg.test".into(),
        image: "reg.test/app:1".into(),
        kind,
        what,
        detail: String::new(),
        retry_after: None,
    }
}

/// Closes an open read when its body is dropped.
struct Open(Arc<Script>);
impl Drop for Open {
    fn drop(&mut self) {
        self.0.open_now.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Reader {
    fn serve(&self, range: Range<u64>) -> Result<BlobBody, RegistryError> {
        let s = &self.script;
        if s.missing.lock().unwrap().contains(&self.digest) {
            return Err(err(RegistryErrorKind::NotFound, "blob unknown"));
        }
        let mut data = s.blobs[&self.digest].clone();
        let whole = s.ignore_ranges.load(Ordering::SeqCst);
        let range = if whole { 0..data.len() as u64 } else { range };
        {
            let mut c = s.corrupt.lock().unwrap();
            if let Some(n) = c.get_mut(&self.digest).filter(|n| **n > 0) {
                if range.contains(&(data.len() as u64 / 2)) {
                    *n -= 1;
                    data[s.blobs[&self.digest].len() / 2] ^= 0xff;
                }
            }
        }
        *s.reads
            .lock()
            .unwrap()
            .entry((self.digest.clone(), range.start))
            .or_default() += 1;
        let broken = take(&s.break_once, range.start);
        let stalled = take(&s.stall_once, range.start);
        let bytes = data[range.start as usize..range.end as usize].to_vec();
        let now = s.open_now.fetch_add(1, Ordering::SeqCst) + 1;
        s.open_max.fetch_max(now, Ordering::SeqCst);
        let open = Open(Arc::clone(s));
        let script = Arc::clone(s);
        let digest = self.digest.clone();
        let half = bytes.len() / 2;
        let chunks: Vec<Bytes> = bytes
            .chunks(256 << 10)
            .map(Bytes::copy_from_slice)
            .collect();
        let stream = async_stream(chunks, half, broken, stalled, script, digest, open);
        Ok(BlobBody {
            whole,
            chunks: Box::pin(stream),
        })
    }
}

fn take(list: &Mutex<Vec<u64>>, at: u64) -> bool {
    let mut l = list.lock().unwrap();
    match l.iter().position(|x| *x == at) {
        Some(i) => {
            l.remove(i);
            true
        }
        None => false,
    }
}

fn async_stream(
    chunks: Vec<Bytes>,
    half: usize,
    broken: bool,
    stalled: bool,
    script: Arc<Script>,
    digest: String,
    open: Open,
) -> impl futures::Stream<Item = Result<Bytes, RegistryError>> + Send {
    futures::stream::unfold(
        (chunks.into_iter(), 0usize, open, false),
        move |(mut it, sent, open, done)| {
            let (script, digest) = (Arc::clone(&script), digest.clone());
            async move {
                if done {
                    return None;
                }
                if (broken || stalled) && sent >= half {
                    if stalled {
                        std::future::pending::<()>().await;
                    }
                    let e = err(RegistryErrorKind::Unreachable, "connection reset");
                    return Some((Err(e), (it, sent, open, true)));
                }
                let c = it.next()?;
                tokio::task::yield_now().await;
                *script.served.lock().unwrap().entry(digest).or_default() += c.len() as u64;
                script
                    .total_served
                    .fetch_add(c.len() as u64, Ordering::SeqCst);
                let n = sent + c.len();
                Some((Ok(c), (it, n, open, false)))
            }
        },
    )
}

#[async_trait]
impl RangeReader for Reader {
    fn host(&self) -> &str {
        "mirror.test"
    }
    async fn read(&self, range: Range<u64>) -> Result<BlobBody, RegistryError> {
        self.serve(range)
    }
}

#[async_trait]
impl BlobSource for Source {
    async fn open(
        &self,
        _image: &ImageRef,
        blob: &Blob,
        _credentials: Option<&Credentials>,
        first: Range<u64>,
    ) -> Result<OpenBlob, RegistryError> {
        let reader = Reader {
            script: Arc::clone(&self.0),
            digest: blob.digest.clone(),
        };
        let first = reader.serve(first)?;
        Ok(OpenBlob {
            reader: Arc::new(reader),
            first,
        })
    }
}

fn blob_of(seed: u8, size: u64) -> (Blob, Vec<u8>) {
    let data: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let digest = format!("sha256:{:x}", Sha256::digest(&data));
    (Blob { digest, size }, data)
}

struct Bench {
    store: FakeStore,
    script: Arc<Script>,
    manifest: ImageManifest,
    fetcher: Fetcher,
}

fn settings() -> FetchSettings {
    FetchSettings {
        connections_per_pull: 4,
        connections_per_registry: 16,
        segment_size: 2 * MIB,
        min_blob_size: 4 * MIB,
        max_buffer_per_pull: 8 * MIB,
        stall_timeout: Duration::from_secs(10),
        ..FetchSettings::default()
    }
}

/// Layers of these sizes (and a small config), behind a fake registry and store.
fn bench(sizes: &[u64], settings: FetchSettings) -> Bench {
    let mut script = Script::default();
    let mut layers = Vec::new();
    for (i, s) in sizes.iter().enumerate() {
        let (b, data) = blob_of(i as u8, *s);
        script.blobs.insert(b.digest.clone(), data);
        layers.push(b);
    }
    let script = Arc::new(script);
    let store = FakeStore::default();
    let manifest = ImageManifest {
        config: Blob {
            digest: "sha256:c".into(),
            size: 10,
        },
        layers,
    };
    let fetcher = Fetcher::new(
        Arc::new(store.clone()),
        Arc::new(Source(Arc::clone(&script))),
        settings,
    );
    Bench {
        store,
        script,
        manifest,
        fetcher,
    }
}

fn image() -> ImageRef {
    ImageRef::parse("reg.test/app:1").unwrap()
}

impl Bench {
    async fn start(&self) -> Option<Fetch> {
        self.fetcher
            .start(&image(), None, &self.manifest, Duration::from_secs(600))
            .await
    }

    /// Waits until the fetch has no blob left open (committed or aborted).
    async fn settled(&self) {
        loop {
            if self.store.state.lock().unwrap().open.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn committed(&self, i: usize) -> bool {
        let d = &self.manifest.layers[i].digest;
        self.store.state.lock().unwrap().blobs.get(d) == self.script.blobs.get(d)
    }

    fn served(&self, i: usize) -> u64 {
        let d = &self.manifest.layers[i].digest;
        self.script
            .served
            .lock()
            .unwrap()
            .get(d)
            .copied()
            .unwrap_or(0)
    }
}

#[tokio::test]
async fn big_layers_are_fetched_in_order_each_byte_once_and_small_ones_left_alone() {
    let b = bench(&[9 * MIB, MIB, 6 * MIB + 3], settings());
    let f = b.start().await.expect("big layers to fetch");
    let mut first = f.first_in();
    first.wait_for(|v| *v).await.unwrap();
    assert!(
        b.committed(0),
        "the runtime's pull may start once the first is in"
    );
    b.settled().await;
    let lease = f.lease.clone();
    f.finish().await;
    assert!(b.committed(0) && b.committed(2));
    assert!(
        !b.committed(1),
        "a layer under MinBlobSize is the runtime's"
    );
    assert_eq!(
        (b.served(0), b.served(1), b.served(2)),
        (9 * MIB, 0, 6 * MIB + 3)
    );
    let s = b.store.state.lock().unwrap();
    let refs: Vec<String> = [0, 2]
        .iter()
        .map(|i| layer_ref(&b.manifest.layers[*i].digest))
        .collect();
    assert_eq!(s.opened, refs, "writers opened bottom layer first");
    assert_eq!(s.committed[0], b.manifest.layers[0].digest);
    assert!(
        !s.leases.contains_key(&lease),
        "the lease is gone once done"
    );
    assert!(b.script.open_max.load(Ordering::SeqCst) <= 4);
    assert!(
        b.script.open_max.load(Ordering::SeqCst) > 1,
        "several connections per pull"
    );
}

/// A content store whose writes wait while the gate is shut.
#[derive(Clone)]
struct Gated {
    inner: FakeStore,
    gate: Arc<tokio::sync::Semaphore>,
}

struct GatedWriter {
    inner: Box<dyn BlobWriter>,
    gate: Arc<tokio::sync::Semaphore>,
}

#[async_trait]
impl BlobWriter for GatedWriter {
    async fn write(&mut self, data: Bytes) -> Result<(), RuntimeError> {
        let _pass = self.gate.acquire().await.unwrap();
        self.inner.write(data).await
    }
    fn acknowledged(&self) -> u64 {
        self.inner.acknowledged()
    }
    async fn restart(&mut self) -> Result<(), RuntimeError> {
        self.inner.restart().await
    }
    async fn commit(&mut self) -> Result<(), RuntimeError> {
        self.inner.commit().await
    }
    async fn abort(&mut self) -> Result<(), RuntimeError> {
        self.inner.abort().await
    }
}

#[async_trait]
impl ContentStore for Gated {
    async fn available(&self) -> bool {
        self.inner.available().await
    }
    async fn create_lease(
        &self,
        id: &str,
        expires: SystemTime,
        labels: &[(&str, &str)],
    ) -> Result<(), RuntimeError> {
        self.inner.create_lease(id, expires, labels).await
    }
    async fn delete_lease(&self, id: &str) -> Result<(), RuntimeError> {
        self.inner.delete_lease(id).await
    }
    async fn leases_labelled(&self, key: &str, value: &str) -> Result<Vec<String>, RuntimeError> {
        self.inner.leases_labelled(key, value).await
    }
    async fn open_writer(
        &self,
        lease: &str,
        target: &BlobTarget,
    ) -> Result<Option<Box<dyn BlobWriter>>, RuntimeError> {
        Ok(self.inner.open_writer(lease, target).await?.map(|inner| {
            Box::new(GatedWriter {
                inner,
                gate: Arc::clone(&self.gate),
            }) as Box<dyn BlobWriter>
        }))
    }
}

#[tokio::test(start_paused = true)]
async fn what_is_fetched_ahead_of_a_slow_store_stays_within_the_buffer() {
    let b = bench(&[40 * MIB], settings());
    let gated = Gated {
        inner: b.store.clone(),
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let fetcher = Fetcher::new(
        Arc::new(gated.clone()),
        Arc::new(Source(Arc::clone(&b.script))),
        settings(),
    );
    let f = fetcher
        .start(&image(), None, &b.manifest, Duration::from_secs(600))
        .await
        .unwrap();
    // Nothing is written while the gate is shut: the fetch runs ahead until its buffer is full.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let ahead = b.script.total_served.load(Ordering::SeqCst);
    assert_eq!(ahead, 8 * MIB, "fetched ahead: the whole buffer, no more");
    gated.gate.add_permits(1 << 20);
    b.settled().await;
    f.finish().await;
    assert!(b.committed(0));
    assert_eq!(b.served(0), 40 * MIB);
}

#[tokio::test(start_paused = true)]
async fn a_segment_that_breaks_off_or_stalls_is_fetched_again_alone() {
    let b = bench(&[10 * MIB], settings());
    b.script.break_once.lock().unwrap().push(4 * MIB);
    b.script.stall_once.lock().unwrap().push(6 * MIB);
    let f = b.start().await.unwrap();
    b.settled().await;
    f.finish().await;
    assert!(b.committed(0));
    let d = b.manifest.layers[0].digest.clone();
    let reads = b.script.reads.lock().unwrap().clone();
    assert_eq!(reads[&(d.clone(), 4 * MIB)], 2);
    assert_eq!(reads[&(d.clone(), 6 * MIB)], 2);
    assert_eq!(reads[&(d.clone(), 0)], 1);
    assert_eq!(reads[&(d, 8 * MIB)], 1);
    // The two segments' first halves came twice; everything else once.
    assert_eq!(b.served(0), 10 * MIB + 2 * MIB);
}

#[tokio::test(start_paused = true)]
async fn a_blob_that_does_not_match_its_digest_is_fetched_once_more() {
    let b = bench(&[8 * MIB], settings());
    b.script
        .corrupt
        .lock()
        .unwrap()
        .insert(b.manifest.layers[0].digest.clone(), 1);
    let mut f = b.start().await.unwrap();
    b.settled().await;
    assert!(b.committed(0));
    assert_eq!(b.served(0), 16 * MIB);
    let s = b.store.state.lock().unwrap().restarts.clone();
    assert_eq!(
        s.values().sum::<u32>(),
        1,
        "started over once under the same lock"
    );
    let failed = tokio::time::timeout(Duration::from_secs(1), f.failed()).await;
    assert!(
        failed.is_err(),
        "a blob fetched again fine does not fail the pull"
    );
    f.finish().await;
}

#[tokio::test(start_paused = true)]
async fn a_blob_that_does_not_match_twice_fails_the_pull_naming_registry_and_digest() {
    let b = bench(&[8 * MIB], settings());
    let d = b.manifest.layers[0].digest.clone();
    b.script.corrupt.lock().unwrap().insert(d.clone(), 2);
    let mut f = b.start().await.unwrap();
    let e = f.failed().await;
    assert_eq!(e.digest, d);
    assert_eq!(e.registry, "mirror.test", "the host that served it");
    let line = e.to_string();
    assert!(line.contains(&d) && line.contains("mirror.test"), "{line}");
    f.finish().await;
    let s = b.store.state.lock().unwrap();
    assert!(s.blobs.is_empty());
    assert_eq!(
        s.aborted,
        vec![layer_ref(&d)],
        "nothing left to block the next pull"
    );
}

#[tokio::test]
async fn a_registry_that_ignores_ranges_gets_one_stream_per_blob() {
    let b = bench(&[9 * MIB], settings());
    b.script.ignore_ranges.store(true, Ordering::SeqCst);
    let f = b.start().await.unwrap();
    b.settled().await;
    f.finish().await;
    assert!(b.committed(0));
    assert_eq!(b.served(0), 9 * MIB);
    assert_eq!(b.script.reads.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_blob_the_registry_refuses_is_left_to_the_runtime() {
    let b = bench(&[9 * MIB, 9 * MIB], settings());
    let d0 = b.manifest.layers[0].digest.clone();
    b.script.missing.lock().unwrap().push(d0.clone());
    let mut f = b.start().await.unwrap();
    b.settled().await;
    assert!(!b.committed(0) && b.committed(1));
    assert!(
        *f.first_in().borrow(),
        "a first blob left to the runtime lets its pull start"
    );
    assert_eq!(b.store.state.lock().unwrap().aborted, vec![layer_ref(&d0)]);
    let failed = tokio::time::timeout(Duration::from_millis(200), f.failed()).await;
    assert!(failed.is_err(), "a fallback, never a failed pull");
    f.finish().await;
}

#[tokio::test]
async fn nothing_is_fetched_without_the_content_api_or_when_off() {
    let b = bench(&[9 * MIB], settings());
    b.store.refused.store(true, Ordering::SeqCst);
    assert!(b.start().await.is_none());
    let b = bench(
        &[9 * MIB],
        FetchSettings {
            mode: FetchMode::Off,
            ..settings()
        },
    );
    assert!(b.start().await.is_none());
    assert!(b.store.state.lock().unwrap().leases.is_empty());
}

#[tokio::test]
async fn a_blob_held_already_is_not_fetched_and_a_dropped_fetch_lets_its_lease_go() {
    let b = bench(&[9 * MIB, 9 * MIB], settings());
    let d0 = b.manifest.layers[0].digest.clone();
    b.store
        .state
        .lock()
        .unwrap()
        .blobs
        .insert(d0.clone(), b.script.blobs[&d0].clone());
    let gate_store = b.store.clone();
    let f = b.start().await.unwrap();
    assert_eq!(gate_store.state.lock().unwrap().opened.len(), 1);
    drop(f);
    loop {
        if gate_store.state.lock().unwrap().leases.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(b.served(0), 0);
}

#[tokio::test]
async fn only_this_daemons_leftover_leases_are_deleted() {
    let b = bench(&[9 * MIB], settings());
    let lease = |owner: &str| {
        vec![
            (LEASE_LABEL.to_owned(), "x".to_owned()),
            (OWNER_LABEL.to_owned(), owner.to_owned()),
        ]
    };
    {
        let mut s = b.store.state.lock().unwrap();
        s.leases.insert("cimage-fetch-old".into(), lease("cimaged"));
        s.leases.insert("another-cimaged".into(), lease("other"));
    }
    b.store
        .state
        .lock()
        .unwrap()
        .leases
        .insert("someone-else".into(), vec![]);
    b.fetcher.clean_leftovers().await;
    let s = b.store.state.lock().unwrap();
    assert_eq!(
        s.leases.keys().collect::<Vec<_>>(),
        vec!["another-cimaged", "someone-else"]
    );
}

#[test]
fn segments_cover_the_blob_and_shrink_to_fit_the_buffer() {
    use super::blob::segments;
    assert_eq!(segments(10, 4), vec![0..4, 4..8, 8..10]);
    assert_eq!(segments(8, 4), vec![0..4, 4..8]);
    assert_eq!(FetchSettings::default().segment(), 8 * MIB);
    let s = FetchSettings {
        max_buffer_per_pull: 256 * MIB,
        ..FetchSettings::default()
    };
    assert_eq!(s.segment(), 16 * MIB);
}
