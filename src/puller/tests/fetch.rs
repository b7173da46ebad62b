//! The puller with cimage's own range fetch (`ImageCache.ParallelFetch`) wired in, over the
//! in-memory content store and a blob source in memory: the big layer is committed before the
//! runtime's pull starts, its bytes show in the pull's progress from cimage's own counts while
//! the runtime lists nothing, the lease is gone afterwards, and a blob corrupt twice fails the
//! pull naming the host and the digest.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::*;
use crate::credentials::Credentials;
use crate::fetch::{FetchSettings, Fetcher};
use crate::reference::ImageRef;
use crate::registry::{
    Blob, BlobBody, BlobSource, ImageManifest, OpenBlob, RangeReader, RegistryError,
};
use crate::runtime::content::fake::FakeStore;
use crate::testing::Rig;

const MIB: u64 = 1 << 20;

/// One blob in memory, served in 64 KiB chunks a few milliseconds apart (so that a pull's
/// progress can be looked at mid-fetch), every byte flipped at its middle when `corrupt`.
struct Memory {
    data: Vec<u8>,
    corrupt: bool,
}

impl Memory {
    fn body(&self, range: Range<u64>) -> BlobBody {
        let mut bytes = self.data[range.start as usize..range.end as usize].to_vec();
        let middle = self.data.len() as u64 / 2;
        if self.corrupt && range.contains(&middle) {
            bytes[(middle - range.start) as usize] ^= 0xff;
        }
        let chunks: Vec<Bytes> = bytes.chunks(64 << 10).map(Bytes::copy_from_slice).collect();
        let stream = futures::stream::unfold(chunks.into_iter(), |mut it| async move {
            let c = it.next()?;
            tokio::time::sleep(Duration::from_millis(10)).await;
            Some((Ok(c), it))
        });
        BlobBody {
            whole: false,
            chunks: Box::pin(stream),
        }
    }
}

#[derive(Clone)]
struct Source(Arc<Memory>);

#[async_trait]
impl BlobSource for Source {
    async fn open(
        &self,
        _image: &ImageRef,
        _blob: &Blob,
        _credentials: Option<&Credentials>,
        first: Range<u64>,
    ) -> Result<OpenBlob, RegistryError> {
        Ok(OpenBlob {
            reader: Arc::new(self.clone()),
            first: self.0.body(first),
        })
    }
}

#[async_trait]
impl RangeReader for Source {
    fn host(&self) -> &str {
        "127.0.0.1:5000"
    }
    async fn read(&self, range: Range<u64>) -> Result<BlobBody, RegistryError> {
        Ok(self.0.body(range))
    }
}

/// A rig whose puller fetches layers of 1 MiB and more itself, from a 3 MiB blob in memory
/// (every read of it corrupt when `corrupt`) into the returned store; APP's manifest names that
/// layer and a small one.
fn rig_fetching(corrupt: bool) -> (Rig, Arc<Puller>, Blob, FakeStore) {
    let store = FakeStore::default();
    let source = Source(Arc::new(Memory {
        data: blob(3 * MIB),
        corrupt,
    }));
    let r = rig(settings());
    let big = Blob {
        digest: format!("sha256:{:x}", Sha256::digest(&source.0.data)),
        size: source.0.data.len() as u64,
    };
    let small = Blob {
        digest: format!("sha256:{:064x}", 7),
        size: 1024,
    };
    r.reg.manifests.lock().unwrap().insert(
        APP.into(),
        ImageManifest {
            config: Blob {
                digest: format!("sha256:{:064x}", 0),
                size: 0,
            },
            layers: vec![big.clone(), small],
        },
    );
    r.rt.offer(APP, ID1, "sha256:d1", 3 * MIB);
    // The runtime reports bytes, but lists no download of the big layer: what the pull
    // shows of it comes from cimage's own counts.
    *r.rt.ingests.lock().unwrap() = Some(vec![]);
    let fetch = FetchSettings {
        min_blob_size: MIB,
        segment_size: MIB,
        max_buffer_per_pull: 2 * MIB,
        connections_per_pull: 2,
        backoff: Duration::from_millis(1),
        ..FetchSettings::default()
    };
    let fetcher = Arc::new(Fetcher::new(
        Arc::new(store.clone()),
        Arc::new(source),
        fetch,
    ));
    // Looks at the pull's bytes every 50 ms (a quarter of the stall timeout).
    let looks = PullerSettings {
        stall_timeout: Duration::from_millis(200),
        ..settings()
    };
    let puller = Arc::new(
        Puller::new(
            r.rt.clone(),
            r.reg.clone(),
            r.cache.clone(),
            Arc::clone(&r.metrics),
            looks,
            r.background.clone(),
        )
        .with_fetcher(fetcher),
    );
    (r, puller, big, store)
}

fn blob(size: u64) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

#[tokio::test]
async fn the_big_layer_is_in_before_the_runtime_pulls_and_its_bytes_show() {
    let (r, puller, big, store) = rig_fetching(false);
    let seen_at_pull: Arc<Mutex<Vec<String>>> = Arc::default();
    {
        let (store, seen) = (store.clone(), Arc::clone(&seen_at_pull));
        *r.rt.on_pull.lock().unwrap() = Some(Box::new(move |_| {
            *seen.lock().unwrap() = store.state.lock().unwrap().committed.clone();
        }));
    }
    let mut midway = Vec::new();
    let ok = puller
        .ensure_watched(req(APP, None), |p| {
            if let Some(l) = p.layers.iter().find(|l| l.digest == big.digest) {
                if l.done > 0 && l.done < l.total {
                    midway.push(l.done);
                }
            }
        })
        .await
        .unwrap();
    assert_eq!(ok.action, Action::Pulled);
    assert_eq!(r.rt.pulls.load(Ordering::SeqCst), 1);
    assert_eq!(
        *seen_at_pull.lock().unwrap(),
        vec![big.digest.clone()],
        "the runtime's pull starts once cimage's big layer is committed"
    );
    assert!(
        !midway.is_empty(),
        "the big layer's bytes show in the progress while cimage fetches it"
    );
    let s = store.state.lock().unwrap();
    assert_eq!(s.blobs[&big.digest].len() as u64, big.size);
    assert!(
        s.leases.is_empty(),
        "the fetch's lease is gone: {:?}",
        s.leases
    );
    assert!(s.open.is_empty(), "no writer left open");
}

#[tokio::test]
async fn a_blob_corrupt_twice_fails_the_pull_naming_host_and_digest() {
    let (r, puller, big, store) = rig_fetching(true);
    // The runtime's own pull (of a layer cimage gave up) takes a while: the fetch's verdict
    // comes first.
    *r.rt.pull_delay.lock().unwrap() = Duration::from_secs(3);
    let e = puller.ensure(req(APP, None)).await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, PullError::Corrupt { .. }), "{msg}");
    assert!(
        msg.contains("127.0.0.1:5000") && msg.contains(&big.digest),
        "{msg}"
    );
    let s = store.state.lock().unwrap();
    assert!(
        !s.blobs.contains_key(&big.digest),
        "nothing corrupt committed"
    );
    assert!(
        s.leases.is_empty(),
        "the fetch's lease is gone: {:?}",
        s.leases
    );
    assert!(s.open.is_empty(), "no writer left open");
}
