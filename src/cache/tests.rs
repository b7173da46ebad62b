//! Unit tests of the cache over the fake runtime.
use super::*;
use crate::clock::ManualClock;
use crate::runtime::fake::FakeRuntime;

const ID: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

async fn setup() -> (tempfile::TempDir, Arc<FakeRuntime>, Cache) {
    let dir = tempfile::tempdir().unwrap();
    let rt = Arc::new(FakeRuntime::default());
    rt.offer("127.0.0.1:5000/app:1", ID, "sha256:d1", 100);
    rt.pull_image("127.0.0.1:5000/app:1", None).await.unwrap();
    let idx = Index::open(&Store::open(&dir.path().join("i.redb")).unwrap()).unwrap();
    let cache = Cache::new(idx, rt.clone(), Arc::new(ManualClock::new(1000)));
    (dir, rt, cache)
}

#[tokio::test]
async fn find_by_name_id_and_prefix() {
    let (_d, _rt, cache) = setup().await;
    for key in ["127.0.0.1:5000/app:1", ID, "aaaaaaaaaaaa"] {
        let (rt, rec) = cache.find_and_adopt(key).await.unwrap();
        assert_eq!((rt.id.as_str(), rec.origin), (ID, Origin::Runtime), "{key}");
    }
    assert!(matches!(
        cache.find_and_adopt("127.0.0.1:5000/app:2").await,
        Err(CacheError::NotFound { .. })
    ));
    assert!(matches!(
        cache.find_and_adopt("Bad Ref").await,
        Err(CacheError::InvalidReference(_))
    ));
}

#[tokio::test]
async fn remove_takes_it_out_of_runtime_and_index() {
    let (_d, rt, cache) = setup().await;
    cache
        .set_pinned("127.0.0.1:5000/app:1", true)
        .await
        .unwrap();
    let rec = cache.remove_image("127.0.0.1:5000/app:1").await.unwrap();
    assert!(rec.pinned);
    assert!(rt.images.lock().unwrap().is_empty());
    assert!(cache.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn images_of_containers_made_by_others_are_never_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Arc::new(FakeRuntime::default());
    const OTHER: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    rt.offer("127.0.0.1:5000/app:1", ID, "sha256:d1", 100);
    rt.offer("127.0.0.1:5000/other:1", OTHER, "sha256:d2", 100);
    for r in ["127.0.0.1:5000/app:1", "127.0.0.1:5000/other:1"] {
        rt.pull_image(r, None).await.unwrap();
    }
    let idx = Index::open(&Store::open(&dir.path().join("i.redb")).unwrap()).unwrap();
    let cache = Cache::new(idx, rt.clone(), Arc::new(ManualClock::new(1000))).with_eviction(
        EvictionSettings {
            max_bytes: Some(1),
            min_age: std::time::Duration::ZERO,
            path: Some(dir.path().to_owned()),
            ..Default::default()
        },
    );
    // A container kubelet made from `app`, known to the runtime only.
    rt.container_images.lock().unwrap().push(ID.to_owned());
    // While the runtime cannot list its containers, nothing goes.
    rt.containers_unknown
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let report = cache.gc(false).await.unwrap();
    assert!(report.plan.evict.is_empty(), "{:?}", report.plan);
    rt.containers_unknown
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let report = cache.gc(false).await.unwrap();
    let gone: Vec<&str> = report
        .plan
        .evict
        .iter()
        .map(|(r, _)| r.id.as_str())
        .collect();
    assert_eq!(gone, [OTHER]);
    let kept = report
        .plan
        .protected
        .iter()
        .find(|(r, _)| r.id == ID)
        .unwrap();
    assert!(kept.1.contains("container"), "{}", kept.1);
    assert_eq!(rt.images.lock().unwrap().len(), 1);
    // Counted with its bytes, and the disk's use as df sees it kept as a gauge.
    let m = &cache.metrics;
    assert_eq!(m.counter("cimage_evicted_bytes_total", &[]), 100);
    assert_eq!(
        m.counter("cimage_evictions_total", &[("reason", "max_bytes")]),
        1
    );
    let ratio = m.gauge("cimage_image_fs_used_ratio", &[]);
    assert!(ratio > 0.0 && ratio <= 1.0, "{ratio}");
}

#[tokio::test]
async fn room_given_to_pulls_in_flight_counts_until_they_end() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Arc::new(FakeRuntime::default());
    let idx = Index::open(&Store::open(&dir.path().join("i.redb")).unwrap()).unwrap();
    let cache =
        Cache::new(idx, rt, Arc::new(ManualClock::new(1000))).with_eviction(EvictionSettings {
            max_bytes: Some(150),
            // The disk's own watermarks are not what this is about.
            high_percent: 100.0,
            low_percent: 100.0,
            path: Some(dir.path().to_owned()),
            ..Default::default()
        });
    // Two cold pulls of 100 bytes at once under MaxBytes 150: the first gets room, the
    // second must not find the same room free.
    let first = cache.make_room(100).await.unwrap();
    let second = cache.make_room(100).await;
    assert!(
        matches!(second, Err(CacheError::NoRoom { bytes: 100, .. })),
        "{second:?}"
    );
    assert_eq!(cache.reserved_bytes(), 100);
    // Once the first pull ends its room is released.
    drop(first);
    assert_eq!(cache.reserved_bytes(), 0);
    let third = cache.make_room(100).await.unwrap();
    assert_eq!(third.bytes(), 100);
}

#[tokio::test]
async fn reconcile_adopts_and_forgets() {
    let (_d, rt, cache) = setup().await;
    let r = cache.reconcile().await.unwrap();
    assert_eq!(r.added, 1);
    assert_eq!(cache.last_reconcile(), 1000);
    rt.images.lock().unwrap().clear();
    assert_eq!(cache.reconcile().await.unwrap().removed, 1);
}

#[tokio::test]
async fn an_in_use_mark_lasts_as_long_as_its_guards() {
    let (_d, _rt, cache) = setup().await;
    let first = cache.mark_in_use(ID);
    let second = cache.mark_in_use(ID);
    assert_eq!(first.id(), ID);
    drop(first);
    assert!(cache.is_in_use(ID), "the second step still uses it");
    drop(second);
    assert!(!cache.is_in_use(ID));
}

#[tokio::test]
async fn the_cache_prunes_its_own_old_eviction_records() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Arc::new(FakeRuntime::default());
    let store = Store::open(&dir.path().join("i.redb")).unwrap();
    let idx = Index::open(&store).unwrap();
    let rec = idx
        .record_use(
            &RuntimeImage {
                id: ID.into(),
                repo_tags: vec!["127.0.0.1:5000/app:1".into()],
                repo_digests: vec![],
                size: 1,
                pinned: false,
            },
            Origin::Pull,
            1_000,
        )
        .unwrap();
    idx.record_eviction(&rec, EvictionReason::Unused, 1_000)
        .unwrap();
    let clock = Arc::new(ManualClock::new(1_000 + 3_600_000));
    let cache = Cache::new(idx, rt, clock.clone())
        .with_evictions_kept_for(std::time::Duration::from_secs(7_200));
    // Within the keep: it stays.
    cache.gc_reconciled().await.unwrap();
    assert_eq!(cache.evictions().await.unwrap().len(), 1);
    clock.advance(7_200_000);
    cache.gc_reconciled().await.unwrap();
    assert!(cache.evictions().await.unwrap().is_empty());
    assert_eq!(
        cache
            .metrics
            .counter("cimage_history_pruned_total", &[("kind", "eviction")]),
        1
    );
}
