//! Unit tests of the puller over the shared rig.

use super::*;
use crate::clock::ManualClock;
use crate::runtime::{RuntimeError, RuntimeErrorKind};
use std::sync::atomic::Ordering;

pub(super) const APP: &str = "127.0.0.1:5000/app:1";
pub(super) const ID1: &str =
    "sha256:1111111111111111111111111111111111111111111111111111111111111111";
pub(super) const ID2: &str =
    "sha256:2222222222222222222222222222222222222222222222222222222222222222";

use crate::testing::Rig;

pub(super) fn rig(settings: PullerSettings) -> Rig {
    Rig::with(settings, Arc::new(ManualClock::new(1)), |c| c)
}

pub(super) fn settings() -> PullerSettings {
    crate::testing::puller_settings()
}

pub(super) fn req(image: &str, policy: Option<PullPolicy>) -> EnsureRequest {
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
                assert!(r.metrics.render().contains("cimage_stale_served_total 1"));
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

mod bounds;
mod credentials;
mod fetch;
mod progress;
mod room;
