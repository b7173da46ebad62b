//! Room made for what a pull really brings: a manifest's claimed sizes hold room only for the
//! node's work and only when they fit without evicting anything; otherwise room is made as the
//! bytes arrive, and nothing the registry says (manifest or `Content-Length`) evicts anything. A
//! blob counts once and not at all when held, and the index counts what a pulled image's blobs
//! hold.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::super::*;
use super::{req, settings};
use crate::cache::EvictionSettings;
use crate::clock::ManualClock;
use crate::registry::{Blob, ImageManifest};
use crate::runtime::Ingest;
use crate::testing::Rig;

const LIAR: &str = "127.0.0.1:5000/liar:1";
const LIAR_ID: &str = "sha256:9999999999999999999999999999999999999999999999999999999999999999";
const LAYER: &str = "sha256:1111111111111111111111111111111111111111111111111111111111110000";
const CONFIG: &str = "sha256:2222222222222222222222222222222222222222222222222222222222220000";
/// What the liar's manifest claims for its layer.
const CLAIMED: u64 = 9_000_000;
/// What its layer really is.
const REAL: u64 = 1_000;
/// Each victim's size.
const VICTIM: u64 = 1_000;

/// A rig whose index holds eight unprotected victims of [`VICTIM`] bytes, under a `MaxBytes`
/// that leaves `headroom` bytes; the runtime reports bytes.
async fn rig_with_victims(headroom: u64) -> (Rig, Vec<String>) {
    let r = Rig::with(settings(), Arc::new(ManualClock::new(1)), |c| {
        c.with_eviction(EvictionSettings {
            high_percent: 100.0,
            low_percent: 100.0,
            max_bytes: Some(8 * VICTIM + headroom),
            min_age: Duration::ZERO,
            ..Default::default()
        })
    });
    let mut victims = Vec::new();
    for n in 0..8u64 {
        let image = format!("127.0.0.1:5000/victim{n}:1");
        let id = format!("sha256:{:064x}", 0xa000 + n);
        r.rt.offer(&image, &id, &format!("sha256:{:064x}", 0xb000 + n), VICTIM);
        r.puller.ensure(req(&image, None)).await.unwrap();
        victims.push(id);
    }
    *r.rt.ingests.lock().unwrap() = Some(vec![]);
    // The liar: one layer claimed at 9 MB; the runtime reports the image at the claimed sum.
    r.reg.manifests.lock().unwrap().insert(
        LIAR.into(),
        ImageManifest {
            config: Blob {
                digest: CONFIG.into(),
                size: 0,
            },
            layers: vec![Blob {
                digest: LAYER.into(),
                size: CLAIMED,
            }],
        },
    );
    r.rt.offer(LIAR, LIAR_ID, "sha256:d9", CLAIMED);
    (r, victims)
}

/// Victims still in the runtime.
fn kept(r: &Rig, victims: &[String]) -> usize {
    let images = r.rt.images.lock().unwrap();
    victims
        .iter()
        .filter(|v| images.iter().any(|i| &i.id == *v))
        .count()
}

/// Plays the runtime downloading the liar's layer: `arrived` bytes in steps, then committed
/// at its real size.
fn feed(r: &Rig, arrived: u64) -> tokio::task::JoinHandle<()> {
    let rt = Arc::clone(&r.rt);
    *rt.pull_delay.lock().unwrap() = Duration::from_millis(1200);
    tokio::spawn(async move {
        for step in 1..=4 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            *rt.ingests.lock().unwrap() = Some(vec![Ingest {
                digest: LAYER.into(),
                offset: arrived * step / 4,
                total: CLAIMED,
            }]);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        rt.blob_sizes
            .lock()
            .unwrap()
            .insert(LAYER.into(), arrived.max(REAL));
        rt.blobs.lock().unwrap().push(LAYER.into());
        *rt.ingests.lock().unwrap() = Some(vec![]);
    })
}

#[tokio::test]
async fn a_users_pull_makes_room_only_for_the_bytes_that_arrive() {
    let (r, victims) = rig_with_victims(2 * REAL).await;
    let feeder = feed(&r, REAL);
    let ok = r
        .puller
        .ensure_for(req(LIAR, None), SlotOwner::User(1000))
        .await
        .unwrap();
    feeder.await.unwrap();
    assert_eq!(ok.action, Action::Pulled);
    assert_eq!(kept(&r, &victims), 8, "nothing evicted for a claim");
    assert_eq!(
        r.reg.blob_heads.load(Ordering::SeqCst),
        0,
        "a claim is not asked about"
    );
    // The index counts what its blob holds, not the claimed sum: a pass evicts nothing.
    assert_eq!(ok.record.size, CLAIMED);
    assert_eq!(ok.record.counted_size(), REAL);
    let report = r.cache.gc(false).await.unwrap();
    assert!(report.plan.evict.is_empty(), "{:?}", report.plan);
    assert_eq!(r.cache.arrived_bytes(), 0, "the room went with the pull");
}

#[tokio::test]
async fn a_users_pull_evicts_no_more_than_it_brings() {
    // 3,500 bytes really arrive where 1,500 are free: two victims (2,000 bytes) make room.
    let (r, victims) = rig_with_victims(1_500).await;
    let feeder = feed(&r, 3_500);
    let ok = r
        .puller
        .ensure_for(req(LIAR, None), SlotOwner::User(1000))
        .await
        .unwrap();
    feeder.await.unwrap();
    assert_eq!(ok.action, Action::Pulled);
    let evicted = 8 - kept(&r, &victims);
    assert!((1..=2).contains(&evicted), "{evicted} victims evicted");
}

/// Makes the liar's layer claim `claimed` bytes (manifest and runtime alike).
fn claim(r: &Rig, claimed: u64) {
    r.reg
        .manifests
        .lock()
        .unwrap()
        .get_mut(LIAR)
        .unwrap()
        .layers[0]
        .size = claimed;
    r.rt.offer(LIAR, LIAR_ID, "sha256:d9", claimed);
}

#[tokio::test]
async fn a_nodes_pull_that_does_not_fit_as_claimed_makes_room_as_its_bytes_arrive() {
    let (r, victims) = rig_with_victims(2 * REAL).await;
    // A claim that would need six victims gone (it could fit only by evicting them); the
    // registry's HEAD says the same: neither is believed.
    let claimed = 8 * VICTIM;
    claim(&r, claimed);
    r.reg
        .blob_lengths
        .lock()
        .unwrap()
        .insert(LAYER.into(), claimed);
    let feeder = feed(&r, REAL);
    let ok = r.puller.ensure(req(LIAR, None)).await.unwrap();
    feeder.await.unwrap();
    assert_eq!(ok.action, Action::Pulled);
    assert_eq!(kept(&r, &victims), 8, "nothing evicted for a claim");
    assert_eq!(r.reg.blob_heads.load(Ordering::SeqCst), 0);
    assert_eq!(r.cache.arrived_bytes(), 0, "the room went with the pull");
}

#[tokio::test]
async fn a_nodes_pull_evicts_no_more_than_it_brings() {
    // 3,500 bytes really arrive where 1,500 are free: two victims (2,000 bytes) make room.
    let (r, victims) = rig_with_victims(1_500).await;
    claim(&r, 8 * VICTIM);
    let feeder = feed(&r, 3_500);
    let ok = r.puller.ensure(req(LIAR, None)).await.unwrap();
    feeder.await.unwrap();
    assert_eq!(ok.action, Action::Pulled);
    let evicted = 8 - kept(&r, &victims);
    assert!((1..=2).contains(&evicted), "{evicted} victims evicted");
}

#[tokio::test]
async fn a_nodes_pull_whose_claim_could_never_fit_fails_and_evicts_nothing() {
    // 9 MB claimed where evicting every victim frees 8,000 bytes.
    let (r, victims) = rig_with_victims(2 * REAL).await;
    let e = r.puller.ensure(req(LIAR, None)).await;
    assert!(matches!(e, Err(PullError::NoRoom { .. })), "{e:?}");
    assert_eq!(kept(&r, &victims), 8);
}

#[tokio::test]
async fn a_blob_counts_once_and_not_at_all_when_the_runtime_holds_it() {
    let (r, victims) = rig_with_victims(2 * REAL).await;
    // The layer listed nine times, truthfully sized, and the node holds it already: it adds
    // nothing to the disk, and counts once against MaxBytes.
    r.reg.manifests.lock().unwrap().insert(
        LIAR.into(),
        ImageManifest {
            config: Blob {
                digest: CONFIG.into(),
                size: 0,
            },
            layers: vec![
                Blob {
                    digest: LAYER.into(),
                    size: REAL,
                };
                9
            ],
        },
    );
    r.rt.blobs.lock().unwrap().push(LAYER.into());
    r.rt.blob_sizes.lock().unwrap().insert(LAYER.into(), REAL);
    r.rt.offer(LIAR, LIAR_ID, "sha256:d9", 9 * REAL);
    let ok = r.puller.ensure(req(LIAR, None)).await.unwrap();
    assert_eq!(kept(&r, &victims), 8, "nothing to make room for");
    assert_eq!(
        r.reg.blob_heads.load(Ordering::SeqCst),
        0,
        "it fits as the runtime vouches for it: nothing asked of the registry"
    );
    assert_eq!(ok.record.counted_size(), REAL, "the layer once");
}
