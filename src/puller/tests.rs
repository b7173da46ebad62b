//! Unit tests of the puller over the shared rig.

use super::*;
use crate::clock::ManualClock;
use crate::runtime::RuntimeErrorKind;
use std::sync::atomic::Ordering;

const APP: &str = "127.0.0.1:5000/app:1";
const ID1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const ID2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

use crate::testing::Rig;

fn rig(settings: PullerSettings) -> Rig {
    Rig::with(settings, Arc::new(ManualClock::new(1)), |c| c)
}

fn settings() -> PullerSettings {
    crate::testing::puller_settings()
}

fn req(image: &str, policy: Option<PullPolicy>) -> EnsureRequest {
    EnsureRequest {
        image: image.into(),
        policy,
        credentials: None,
        origin: Origin::Pull,
        requester: None,
        progress: None,
    }
}

#[tokio::test]
async fn each_policy_row() {
    let r = rig(settings());
    r.rt.offer(APP, ID1, "sha256:d1", 10);
    r.reg.set(APP, "sha256:d1");

    // Never, absent: error, nothing contacted.
    let e = r
        .puller
        .ensure(req(APP, Some(PullPolicy::Never)))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("image {APP} is not present and pull policy is Never")
    );
    assert_eq!(r.rt.pulls.load(Ordering::SeqCst), 0);
    assert_eq!(r.reg.resolves.load(Ordering::SeqCst), 0);

    // IfNotPresent, absent: pull.
    let ok = r
        .puller
        .ensure(req(APP, Some(PullPolicy::IfNotPresent)))
        .await
        .unwrap();
    assert_eq!(
        (ok.action, ok.digest.as_deref()),
        (Action::Pulled, Some("sha256:d1"))
    );

    // IfNotPresent and Never, present: cached, registry untouched.
    for p in [PullPolicy::IfNotPresent, PullPolicy::Never] {
        let ok = r.puller.ensure(req(APP, Some(p))).await.unwrap();
        assert_eq!(ok.action, Action::Cached);
    }
    assert_eq!(r.reg.resolves.load(Ordering::SeqCst), 0);

    // Always, present, digest unchanged: one resolve, no pull.
    let ok = r
        .puller
        .ensure(req(APP, Some(PullPolicy::Always)))
        .await
        .unwrap();
    assert_eq!(ok.action, Action::Cached);
    assert_eq!(r.rt.pulls.load(Ordering::SeqCst), 1);
    assert_eq!(r.reg.resolves.load(Ordering::SeqCst), 1);

    // Always, tag moved: pull.
    r.rt.offer(APP, ID2, "sha256:d2", 10);
    r.reg.set(APP, "sha256:d2");
    let ok = r
        .puller
        .ensure(req(APP, Some(PullPolicy::Always)))
        .await
        .unwrap();
    assert_eq!((ok.action, ok.record.id.as_str()), (Action::Pulled, ID2));

    // Use counts accumulate per request.
    assert_eq!(ok.record.use_count, 1);
    let old = r
        .cache
        .list()
        .await
        .unwrap()
        .iter()
        .find(|i| i.id == ID1)
        .cloned()
        .unwrap();
    assert_eq!(old.use_count, 4);
}

#[tokio::test]
async fn by_default_latest_is_served_from_the_cache_without_a_registry_request() {
    let r = rig(settings());
    let latest = "127.0.0.1:5000/app:latest";
    r.rt.offer(latest, ID1, "sha256:d1", 10);
    r.reg.set(latest, "sha256:d1");
    let first = r.puller.ensure(req(latest, None)).await.unwrap();
    assert_eq!(first.action, Action::Pulled);
    let again = r.puller.ensure(req(latest, None)).await.unwrap();
    assert_eq!(
        (again.action, again.policy),
        (Action::Cached, PullPolicy::IfNotPresent)
    );
    assert_eq!(r.reg.resolves.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn by_tag_default_policy_for_latest_checks_the_registry() {
    let r = rig(PullerSettings {
        default_policy: crate::policy::DefaultPolicy::ByTag,
        ..settings()
    });
    let latest = "127.0.0.1:5000/app:latest";
    r.rt.offer(latest, ID1, "sha256:d1", 10);
    r.reg.set(latest, "sha256:d1");
    assert_eq!(
        r.puller
            .ensure(req("127.0.0.1:5000/app", None))
            .await
            .unwrap()
            .action,
        Action::Pulled
    );
    let ok = r
        .puller
        .ensure(req("127.0.0.1:5000/app", None))
        .await
        .unwrap();
    assert_eq!((ok.action, ok.policy), (Action::Cached, PullPolicy::Always));
    assert_eq!(r.reg.resolves.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn digest_reference_is_never_re_pulled() {
    let r = rig(settings());
    let d = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let by_digest = format!("127.0.0.1:5000/app@{d}");
    r.rt.offer(&by_digest, ID1, d, 10);
    r.puller
        .ensure(req(&by_digest, Some(PullPolicy::Always)))
        .await
        .unwrap();
    let ok = r
        .puller
        .ensure(req(&by_digest, Some(PullPolicy::Always)))
        .await
        .unwrap();
    assert_eq!(ok.action, Action::Cached);
    assert_eq!(r.rt.pulls.load(Ordering::SeqCst), 1);
    assert_eq!(r.reg.resolves.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn concurrent_requests_share_one_pull() {
    let r = rig(settings());
    r.rt.offer(APP, ID1, "sha256:d1", 10);
    *r.rt.pull_delay.lock().unwrap() = Duration::from_millis(50);
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let p = r.puller.clone();
            tokio::spawn(async move { p.ensure(req(APP, Some(PullPolicy::IfNotPresent))).await })
        })
        .collect();
    for h in handles {
        h.await.unwrap().unwrap();
    }
    assert_eq!(r.rt.pulls.load(Ordering::SeqCst), 1);
    let rec = &r.cache.list().await.unwrap()[0];
    assert_eq!(rec.use_count, 20);
}

#[tokio::test]
async fn room_is_made_once_per_shared_pull() {
    let r = Rig::with(settings(), Arc::new(ManualClock::new(1)), |c| {
        c.with_eviction(crate::cache::EvictionSettings {
            high_percent: 100.0,
            low_percent: 100.0,
            max_bytes: Some(1 << 30),
            ..Default::default()
        })
    });
    let (rt, reg, puller) = (r.rt.clone(), r.reg.clone(), r.puller.clone());
    rt.offer(APP, ID1, "sha256:d1", 10);
    reg.sizes.lock().unwrap().insert(APP.into(), 10);
    *rt.pull_delay.lock().unwrap() = Duration::from_millis(50);
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let p = puller.clone();
            tokio::spawn(async move { p.ensure(req(APP, Some(PullPolicy::IfNotPresent))).await })
        })
        .collect();
    for h in handles {
        h.await.unwrap().unwrap();
    }
    assert_eq!(rt.pulls.load(Ordering::SeqCst), 1);
    assert_eq!(
        reg.size_checks.load(Ordering::SeqCst),
        1,
        "one size check for one pull"
    );
}

#[tokio::test]
async fn global_limit_bounds_parallel_pulls() {
    let mut s = settings();
    s.max_concurrent_pulls = 2;
    let r = rig(s);
    *r.rt.pull_delay.lock().unwrap() = Duration::from_millis(30);
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let image = format!("127.0.0.1:5000/app{i}:1");
            r.rt.offer(&image, &format!("sha256:{i:064}"), "sha256:d", 1);
            let p = r.puller.clone();
            tokio::spawn(async move { p.ensure(req(&image, None)).await })
        })
        .collect();
    for h in handles {
        h.await.unwrap().unwrap();
    }
    assert_eq!(r.rt.pulls.load(Ordering::SeqCst), 6);
    assert_eq!(r.rt.max_parallel.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn transient_failures_are_retried_permanent_ones_are_not() {
    let r = rig(settings());
    r.rt.offer(APP, ID1, "sha256:d1", 10);
    let transient = RuntimeError {
        op: "PullImage",
        kind: RuntimeErrorKind::Transient,
        message: "connection refused".into(),
    };
    r.rt.pull_failures
        .lock()
        .unwrap()
        .extend([transient.clone(), transient]);
    r.puller.ensure(req(APP, None)).await.unwrap();
    assert_eq!(r.rt.pulls.load(Ordering::SeqCst), 3);

    let e = r
        .puller
        .ensure(req("127.0.0.1:5000/nope:1", None))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("nope:1") && e.to_string().contains("not found"),
        "{e}"
    );
    assert_eq!(
        r.rt.pulls.load(Ordering::SeqCst),
        4,
        "not found is not retried"
    );
}

#[tokio::test]
async fn deadline_is_enforced() {
    let mut s = settings();
    s.pull_timeout = Duration::from_millis(50);
    let r = rig(s);
    r.rt.offer(APP, ID1, "sha256:d1", 10);
    *r.rt.pull_delay.lock().unwrap() = Duration::from_secs(5);
    let e = r.puller.ensure(req(APP, None)).await.unwrap_err();
    assert!(matches!(e, PullError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("50ms"), "{e}");
}

#[tokio::test]
async fn always_fails_clearly_when_registry_is_down_but_others_serve_the_cache() {
    let r = rig(settings());
    r.rt.offer(APP, ID1, "sha256:d1", 10);
    r.puller.ensure(req(APP, None)).await.unwrap();
    r.reg.down.store(true, Ordering::SeqCst);
    for p in [PullPolicy::IfNotPresent, PullPolicy::Never] {
        assert_eq!(
            r.puller.ensure(req(APP, Some(p))).await.unwrap().action,
            Action::Cached
        );
    }
    let e = r
        .puller
        .ensure(req(APP, Some(PullPolicy::Always)))
        .await
        .unwrap_err();
    assert!(matches!(e, PullError::Registry { .. }));
    assert!(
        e.to_string().contains("unreachable") && e.to_string().contains(APP),
        "{e}"
    );
}

#[tokio::test]
async fn presence_is_trusted_for_the_ttl_only() {
    let clock = Arc::new(ManualClock::new(1_000));
    let r = Rig::with(settings(), clock.clone(), |c| {
        c.with_presence_ttl(Duration::from_secs(10))
    });
    let (rt, cache, puller) = (r.rt.clone(), r.cache.clone(), r.puller.clone());
    rt.offer(APP, ID1, "sha256:d1", 10);
    puller.ensure(req(APP, None)).await.unwrap();
    // Removed behind cimage's back: within the TTL the confirmation stands ...
    rt.images.lock().unwrap().clear();
    assert_eq!(
        puller.ensure(req(APP, None)).await.unwrap().action,
        Action::Cached
    );
    // ... after it, the runtime is asked again and the image is pulled.
    clock.advance(10_001);
    assert_eq!(
        puller.ensure(req(APP, None)).await.unwrap().action,
        Action::Pulled
    );
    // Removing through cimage forgets at once.
    cache.remove_image(APP).await.unwrap();
    assert_eq!(
        puller
            .ensure(req(APP, Some(PullPolicy::IfNotPresent)))
            .await
            .unwrap()
            .action,
        Action::Pulled
    );
    assert_eq!(rt.pulls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn malformed_reference_contacts_nothing() {
    let r = rig(settings());
    let e = r.puller.ensure(req("Not A Ref", None)).await.unwrap_err();
    assert!(matches!(e, PullError::InvalidReference(_)));
    assert_eq!(r.rt.pulls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_private_image_is_visible_only_to_callers_who_proved_access() {
    let r = rig(settings());
    r.rt.offer(APP, ID1, "sha256:d1", 10);
    r.reg.set(APP, "sha256:d1");
    let alice = crate::credentials::Credentials {
        username: "alice".into(),
        password: "pw".into(),
        kind: crate::credentials::SecretKind::Password,
    };
    let mut pull = req(APP, None);
    pull.credentials = Some(alice.clone());
    pull.requester = Some(1000);
    let rec = r.puller.ensure(pull).await.unwrap().record;
    assert!(rec.credentialed);
    assert!(rec.visible_to(1000) && !rec.visible_to(1001));
    // Bob proves access with credentials the registry accepts: from then on he sees it too.
    let mut bob = req(APP, Some(PullPolicy::IfNotPresent));
    bob.credentials = Some(crate::credentials::Credentials {
        username: "bob".into(),
        password: "pw2".into(),
        kind: crate::credentials::SecretKind::Password,
    });
    bob.requester = Some(1001);
    let rec = r.puller.ensure(bob).await.unwrap().record;
    assert!(rec.visible_to(1001));
}

#[tokio::test]
async fn an_image_id_names_a_local_image_and_is_never_pulled() {
    let r = rig(settings());
    r.rt.offer(APP, ID1, "sha256:d1", 10);
    r.puller.ensure(req(APP, None)).await.unwrap();
    let (pulls, resolves) = (
        r.rt.pulls.load(Ordering::SeqCst),
        r.reg.resolves.load(Ordering::SeqCst),
    );
    for by in [ID1, &ID1["sha256:".len().."sha256:".len() + 12]] {
        let ok = r
            .puller
            .ensure(req(by, Some(PullPolicy::Always)))
            .await
            .unwrap();
        assert_eq!(
            (ok.action, ok.record.id.as_str()),
            (Action::Cached, ID1),
            "{by}"
        );
    }
    let e = r.puller.ensure(req(ID2, None)).await.unwrap_err();
    assert!(matches!(e, PullError::LocalAbsent { .. }), "{e}");
    assert!(e.to_string().contains("never pulled"), "{e}");
    assert_eq!(r.rt.pulls.load(Ordering::SeqCst), pulls, "no PullImage");
    assert_eq!(
        r.reg.resolves.load(Ordering::SeqCst),
        resolves,
        "no registry request"
    );
}

#[tokio::test]
async fn an_identity_token_is_left_to_the_runtime_to_exchange() {
    let r = rig(settings());
    r.rt.offer(APP, ID1, "sha256:d1", 10);
    r.reg.set(APP, "sha256:d1");
    r.puller.ensure(req(APP, None)).await.unwrap();
    let (pulls, resolves) = (
        r.rt.pulls.load(Ordering::SeqCst),
        r.reg.resolves.load(Ordering::SeqCst),
    );
    // Always with a refresh token: no HEAD of cimage's own, the runtime's pull decides.
    let mut with_token = req(APP, Some(PullPolicy::Always));
    with_token.credentials = Some(crate::credentials::Credentials {
        username: "<token>".into(),
        password: "refresh".into(),
        kind: crate::credentials::SecretKind::IdentityToken,
    });
    let ok = r.puller.ensure(with_token).await.unwrap();
    assert_eq!(ok.action, Action::Pulled);
    assert_eq!(r.rt.pulls.load(Ordering::SeqCst), pulls + 1);
    assert_eq!(r.reg.resolves.load(Ordering::SeqCst), resolves);
}

#[tokio::test]
async fn with_use_cached_an_unreachable_registry_serves_the_copy_marked_stale() {
    for use_cached in [false, true] {
        let r = rig(PullerSettings {
            use_cached_when_registry_down: use_cached,
            ..settings()
        });
        r.rt.offer(APP, ID1, "sha256:d1", 10);
        r.reg.set(APP, "sha256:d1");
        r.puller.ensure(req(APP, None)).await.unwrap();
        r.reg.down.store(true, Ordering::SeqCst);
        let got = r.puller.ensure(req(APP, Some(PullPolicy::Always))).await;
        match use_cached {
            false => assert!(matches!(got, Err(PullError::Registry { .. })), "{got:?}"),
            true => {
                let ok = got.unwrap();
                assert!(ok.stale && ok.action == Action::Cached);
                assert!(r
                    .cache
                    .metrics()
                    .render()
                    .contains("cimage_stale_served_total 1"));
            }
        }
    }
}

#[tokio::test]
async fn a_hung_pull_ends_at_the_pull_timeout_and_frees_its_slot() {
    let r = rig(PullerSettings {
        pull_timeout: Duration::from_millis(200),
        max_concurrent_pulls: 1,
        ..settings()
    });
    r.rt.offer(APP, ID1, "sha256:d1", 10);
    *r.rt.pull_delay.lock().unwrap() = Duration::from_secs(3600);
    let e = r.puller.ensure(req(APP, None)).await.unwrap_err();
    assert!(matches!(e, PullError::Timeout { .. }), "{e}");
    // The registry is back to normal: the next request pulls at once instead of joining the
    // hung pull or waiting for its slot.
    *r.rt.pull_delay.lock().unwrap() = Duration::ZERO;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ok = tokio::time::timeout(Duration::from_secs(5), r.puller.ensure(req(APP, None)))
        .await
        .expect("not stuck behind the hung pull")
        .unwrap();
    assert_eq!(ok.action, Action::Pulled);
}

/// A layer digest as the fake registry names the one layer of an image of `size` bytes.
fn layer(size: u64) -> String {
    format!("sha256:{size:064x}")
}

fn ingest(size: u64, offset: u64) -> crate::runtime::Ingest {
    crate::runtime::Ingest {
        digest: layer(size),
        offset,
        total: size,
    }
}

/// Runs `ensure` with a progress sink; returns the result and every progress seen.
async fn ensure_watched(r: &Rig, image: &str) -> (Result<Ensured, PullError>, Vec<PullProgress>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut q = req(image, Some(PullPolicy::IfNotPresent));
    q.progress = Some(tx);
    let result = r.puller.ensure(q).await;
    let mut seen = Vec::new();
    while let Ok(p) = rx.try_recv() {
        seen.push(p);
    }
    (result, seen)
}

#[tokio::test]
async fn a_pull_reports_its_phases_and_growing_bytes_ending_at_the_total() {
    let r = rig(PullerSettings {
        stall_timeout: Duration::from_secs(2),
        ..settings()
    });
    const SIZE: u64 = 1000;
    r.rt.offer(APP, ID1, "sha256:d1", SIZE);
    r.reg.sizes.lock().unwrap().insert(APP.into(), SIZE);
    *r.rt.ingests.lock().unwrap() = Some(vec![]);
    *r.rt.pull_delay.lock().unwrap() = Duration::from_millis(1500);
    let rt = Arc::clone(&r.rt);
    let feeder = tokio::spawn(async move {
        for offset in [100, 400, 800] {
            tokio::time::sleep(Duration::from_millis(300)).await;
            *rt.ingests.lock().unwrap() = Some(vec![ingest(SIZE, offset)]);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Committed: the ingest is gone and the blob is held.
        rt.blobs.lock().unwrap().push(layer(SIZE));
        *rt.ingests.lock().unwrap() = Some(vec![]);
    });
    let (result, seen) = ensure_watched(&r, APP).await;
    feeder.await.unwrap();
    assert_eq!(result.unwrap().action, Action::Pulled);
    let phases: Vec<Phase> = seen.iter().map(|p| p.phase).collect();
    assert!(phases.contains(&Phase::Downloading), "{phases:?}");
    assert_eq!(phases.last(), Some(&Phase::Done), "{phases:?}");
    let bytes: Vec<u64> = seen
        .iter()
        .filter(|p| p.phase == Phase::Downloading)
        .map(|p| p.done_bytes)
        .collect();
    assert!(
        bytes.windows(2).all(|w| w[0] <= w[1]) && bytes.iter().any(|b| *b > 0 && *b < SIZE),
        "bytes grow: {bytes:?}"
    );
    let last = seen.last().unwrap();
    assert_eq!((last.done_bytes, last.total_bytes), (SIZE, SIZE));
    assert!(last.bytes_known);
    assert_eq!(
        r.cache.metrics().counter(
            "cimage_runtime_pulls_total",
            &[("registry", "127.0.0.1:5000"), ("result", "pulled")]
        ),
        1
    );
}

#[tokio::test]
async fn a_pull_whose_bytes_stop_is_cancelled_retried_and_fails_naming_the_registry() {
    let r = rig(PullerSettings {
        stall_timeout: Duration::from_millis(400),
        retries: 1,
        backoff: Duration::from_millis(10),
        ..settings()
    });
    r.rt.offer(APP, ID1, "sha256:d1", 1000);
    r.reg.sizes.lock().unwrap().insert(APP.into(), 1000);
    // Stuck at 10 bytes for good.
    *r.rt.ingests.lock().unwrap() = Some(vec![ingest(1000, 10)]);
    *r.rt.pull_delay.lock().unwrap() = Duration::from_secs(60);
    let t = std::time::Instant::now();
    let (result, seen) = ensure_watched(&r, APP).await;
    let e = result.unwrap_err();
    assert!(matches!(e, PullError::Stalled { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("no progress for 400ms from 127.0.0.1:5000"),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(r.rt.pulls.load(Ordering::SeqCst), 2, "retried once");
    assert!(seen.iter().any(|p| p.attempt == 2));
    assert_eq!(seen.last().unwrap().phase, Phase::Failed);
    let m = r.cache.metrics();
    assert_eq!(
        m.counter(
            "cimage_pull_retries_total",
            &[("registry", "127.0.0.1:5000"), ("reason", "stalled")]
        ),
        1
    );
    assert_eq!(
        m.counter(
            "cimage_pull_failures_total",
            &[("registry", "127.0.0.1:5000"), ("reason", "stalled")]
        ),
        1
    );
}

#[tokio::test]
async fn unpacking_after_the_last_layer_is_never_a_stall() {
    let r = rig(PullerSettings {
        stall_timeout: Duration::from_millis(200),
        retries: 0,
        ..settings()
    });
    r.rt.offer(APP, ID1, "sha256:d1", 1000);
    r.reg.sizes.lock().unwrap().insert(APP.into(), 1000);
    // The layer is held already: nothing to fetch, the runtime only unpacks (slowly).
    *r.rt.ingests.lock().unwrap() = Some(vec![]);
    r.rt.blobs.lock().unwrap().push(layer(1000));
    *r.rt.pull_delay.lock().unwrap() = Duration::from_millis(1200);
    let (result, seen) = ensure_watched(&r, APP).await;
    assert_eq!(result.unwrap().action, Action::Pulled);
    assert!(seen.iter().any(|p| p.phase == Phase::Unpacking), "{seen:?}");
}

#[tokio::test]
async fn without_bytes_from_the_runtime_only_phases_move_and_nothing_stalls() {
    let r = rig(PullerSettings {
        stall_timeout: Duration::from_millis(100),
        retries: 0,
        ..settings()
    });
    r.rt.offer(APP, ID1, "sha256:d1", 1000);
    *r.rt.pull_delay.lock().unwrap() = Duration::from_millis(600);
    let (result, seen) = ensure_watched(&r, APP).await;
    assert_eq!(result.unwrap().action, Action::Pulled);
    assert!(seen.iter().all(|p| !p.bytes_known));
    assert_eq!(seen.last().unwrap().phase, Phase::Done);
}

#[tokio::test]
async fn a_pull_behind_the_limit_waits_visibly_in_line() {
    let r = rig(PullerSettings {
        max_concurrent_pulls: 1,
        ..settings()
    });
    let other = "127.0.0.1:5000/other:1";
    r.rt.offer(APP, ID1, "sha256:d1", 10);
    r.rt.offer(other, ID2, "sha256:d2", 10);
    *r.rt.pull_delay.lock().unwrap() = Duration::from_millis(600);
    let first = {
        let p = Arc::clone(&r.puller);
        tokio::spawn(async move { p.ensure(req(APP, Some(PullPolicy::IfNotPresent))).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = {
        let p = Arc::clone(&r.puller);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut q = req(other, Some(PullPolicy::IfNotPresent));
        q.progress = Some(tx);
        (tokio::spawn(async move { p.ensure(q).await }), rx)
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let pulls = r.puller.pulls();
    assert_eq!(pulls.len(), 2, "{pulls:?}");
    assert_eq!(pulls[1].progress.phase, Phase::Queued);
    assert_eq!(pulls[1].progress.queue_position, 1);
    assert_eq!(pulls[1].progress.requesters, 1);
    assert_eq!(r.puller.queued(), 1);
    assert_eq!(r.cache.metrics().gauge("cimage_pulls_queued", &[]), 1.0);
    first.await.unwrap().unwrap();
    let (task, mut rx) = second;
    task.await.unwrap().unwrap();
    let mut phases = Vec::new();
    while let Ok(p) = rx.try_recv() {
        phases.push((p.phase, p.queue_position));
    }
    let queued = phases.iter().position(|p| *p == (Phase::Queued, 1));
    let downloading = phases.iter().position(|p| p.0 == Phase::Downloading);
    assert!(queued.is_some() && queued < downloading, "{phases:?}");
    assert_eq!(phases.last().map(|p| p.0), Some(Phase::Done));
    assert!(r.puller.pulls().is_empty());
    assert_eq!(r.cache.metrics().gauge("cimage_pulls_in_flight", &[]), 0.0);
}

#[tokio::test]
async fn a_retry_that_never_moves_its_bytes_is_stalled_too() {
    let r = rig(PullerSettings {
        stall_timeout: Duration::from_millis(400),
        retries: 1,
        backoff: Duration::from_millis(10),
        // Far beyond two stalls: a second attempt that is never found stalled ends here.
        pull_timeout: Duration::from_secs(5),
        ..settings()
    });
    r.rt.offer(APP, ID1, "sha256:d1", 1000);
    r.reg.sizes.lock().unwrap().insert(APP.into(), 1000);
    // The first attempt stops at 10 bytes. As containerd does with a cancelled pull, the
    // ingest then leaves the list; the second attempt resumes it at the same offset, where it
    // stays.
    *r.rt.ingests.lock().unwrap() = Some(vec![ingest(1000, 10)]);
    *r.rt.pull_delay.lock().unwrap() = Duration::from_secs(60);
    let rt = Arc::clone(&r.rt);
    let feeder = tokio::spawn(async move {
        while rt.pulls.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        *rt.ingests.lock().unwrap() = Some(vec![]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        *rt.ingests.lock().unwrap() = Some(vec![ingest(1000, 10)]);
    });
    let (result, seen) = ensure_watched(&r, APP).await;
    feeder.await.unwrap();
    let e = result.unwrap_err();
    assert!(matches!(e, PullError::Stalled { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("no progress for 400ms from 127.0.0.1:5000"),
        "{e}"
    );
    assert_eq!(r.rt.pulls.load(Ordering::SeqCst), 2);
    assert!(seen.iter().any(|p| p.attempt == 2));
}
