//! What one caller can make the puller hold or grow: pull slots (each user's share), a slot
//! held by a registry that never answers (the resolve timeout), metric series by registry.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::super::*;
use super::{req, rig, settings, APP, ID1, ID2};
use crate::policy::PullPolicy;
use crate::testing::Rig;

/// Waits (up to 10 s) until `ok` holds for the pulls in flight.
async fn until_pulls(r: &Rig, what: &str, ok: impl Fn(&[InFlight]) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !ok(&r.puller.pulls()) {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn queued(pulls: &[InFlight]) -> usize {
    pulls
        .iter()
        .filter(|p| p.progress.phase == Phase::Queued)
        .count()
}

#[tokio::test]
async fn a_users_pulls_beyond_its_share_wait_outside_the_nodes_line() {
    let r = Arc::new(rig(PullerSettings {
        max_concurrent_pulls: 3,
        max_pulls_per_user: 2,
        resolve_timeout: Duration::from_secs(3600),
        pull_timeout: Duration::from_secs(3600),
        ..settings()
    }));
    // Four images of a registry that never answers, asked for by one user.
    let hung: Vec<String> = (1..=4).map(|n| format!("127.0.0.1:6000/x:{n}")).collect();
    for h in &hung {
        r.reg.silent.lock().unwrap().insert(h.clone());
    }
    for h in &hung {
        let (r, h) = (Arc::clone(&r), h.clone());
        tokio::spawn(async move {
            r.puller
                .ensure_for(req(&h, None), SlotOwner::User(1000))
                .await
        });
    }
    until_pulls(&r, "four pulls, two of them waiting", |p| {
        p.len() == 4 && queued(p) == 2
    })
    .await;
    let waiting: Vec<_> = r.puller.pulls();
    assert!(waiting
        .iter()
        .filter(|p| p.progress.phase == Phase::Queued)
        .all(|p| p.progress.queue_position == 0));
    assert_eq!(r.puller.queued(), 0, "nothing waits in the node's line");

    // Another user's pull and the node's go through the free slot at once.
    r.rt.offer(APP, ID1, "sha256:d1", 10);
    let other = "127.0.0.1:5000/other:1";
    r.rt.offer(other, ID2, "sha256:d2", 10);
    let theirs = tokio::time::timeout(
        Duration::from_secs(5),
        r.puller.ensure_for(req(other, None), SlotOwner::User(1001)),
    )
    .await
    .expect("not held behind another user's pulls");
    assert_eq!(theirs.unwrap().action, Action::Pulled);
    let node = tokio::time::timeout(Duration::from_secs(5), r.puller.ensure(req(APP, None)))
        .await
        .expect("not held behind a user's pulls");
    assert_eq!(node.unwrap().action, Action::Pulled);
    assert_eq!(r.puller.pulls().len(), 4);

    // The node's work joins one of the waiting pulls: it leaves the user's line for the node's
    // free slot.
    let waiting_image = waiting
        .iter()
        .find(|p| p.progress.phase == Phase::Queued)
        .unwrap()
        .progress
        .image
        .clone();
    let joined = Arc::clone(&r);
    tokio::spawn(async move { joined.puller.ensure(req(&waiting_image, None)).await });
    until_pulls(&r, "one waiting pull carried by the node", |p| {
        p.len() == 4 && queued(p) == 1
    })
    .await;
}

#[tokio::test]
async fn a_joiner_with_a_free_share_carries_a_waiting_pull() {
    let r = Arc::new(rig(PullerSettings {
        max_concurrent_pulls: 3,
        max_pulls_per_user: 1,
        resolve_timeout: Duration::from_secs(3600),
        pull_timeout: Duration::from_secs(3600),
        ..settings()
    }));
    let hung = ["127.0.0.1:6000/x:1", "127.0.0.1:6000/x:2"];
    for h in hung {
        r.reg.silent.lock().unwrap().insert(h.to_owned());
        let r = Arc::clone(&r);
        tokio::spawn(async move {
            r.puller
                .ensure_for(req(h, None), SlotOwner::User(1000))
                .await
        });
    }
    until_pulls(&r, "one running, one waiting", |p| {
        p.len() == 2 && queued(p) == 1
    })
    .await;
    let waiting = r
        .puller
        .pulls()
        .into_iter()
        .find(|p| p.progress.phase == Phase::Queued)
        .unwrap()
        .progress
        .image;
    // A second user wants the same image: its own free share carries the pull.
    let r2 = Arc::clone(&r);
    tokio::spawn(async move {
        r2.puller
            .ensure_for(req(&waiting, None), SlotOwner::User(1001))
            .await
    });
    until_pulls(&r, "both running", |p| p.len() == 2 && queued(p) == 0).await;
}

#[tokio::test]
async fn the_node_joining_a_users_pull_gives_the_user_its_share_back() {
    let r = Arc::new(rig(PullerSettings {
        max_concurrent_pulls: 3,
        max_pulls_per_user: 1,
        resolve_timeout: Duration::from_secs(3600),
        pull_timeout: Duration::from_secs(3600),
        ..settings()
    }));
    let hung = ["127.0.0.1:6000/x:1", "127.0.0.1:6000/x:2"];
    for h in hung {
        r.reg.silent.lock().unwrap().insert(h.to_owned());
    }
    let first = Arc::clone(&r);
    tokio::spawn(async move {
        first
            .puller
            .ensure_for(req(hung[0], None), SlotOwner::User(1000))
            .await
    });
    until_pulls(&r, "the user's pull running", |p| {
        p.len() == 1 && queued(p) == 0
    })
    .await;
    // Root asks for the same image: the pull is the node's now.
    let root = Arc::clone(&r);
    tokio::spawn(async move { root.puller.ensure(req(hung[0], None)).await });
    until_pulls(&r, "root joined", |p| {
        p.len() == 1 && p[0].progress.requesters == 2
    })
    .await;
    // So the user's next pull takes the share at once.
    let second = Arc::clone(&r);
    tokio::spawn(async move {
        second
            .puller
            .ensure_for(req(hung[1], None), SlotOwner::User(1000))
            .await
    });
    until_pulls(&r, "both running", |p| p.len() == 2 && queued(p) == 0).await;
}

#[tokio::test]
async fn a_registry_that_never_answers_fails_the_pull_at_the_resolve_timeout() {
    let r = rig(PullerSettings {
        resolve_timeout: Duration::from_millis(300),
        pull_timeout: Duration::from_secs(3600),
        ..settings()
    });
    r.rt.offer(APP, ID1, "sha256:d1", 10);
    r.reg.silent.lock().unwrap().insert(APP.into());
    let e = tokio::time::timeout(Duration::from_secs(10), r.puller.ensure(req(APP, None)))
        .await
        .expect("ends at the resolve timeout")
        .unwrap_err();
    assert!(matches!(e, PullError::Unresolved { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!("pull of image {APP} failed: 127.0.0.1:5000 sent no manifest within 300ms (ImageCache.PullResolveTimeout)")
    );
    assert_eq!(
        r.rt.pulls.load(Ordering::SeqCst),
        0,
        "the runtime was not asked"
    );
    assert_eq!(
        r.metrics.counter(
            "cimage_pull_failures_total",
            &[("registry", "127.0.0.1:5000"), ("reason", "unresolved")]
        ),
        1
    );
}

#[tokio::test]
async fn a_runtime_pull_that_downloads_nothing_fails_at_the_resolve_timeout_unretried() {
    let r = rig(PullerSettings {
        resolve_timeout: Duration::from_millis(300),
        stall_timeout: Duration::from_secs(3600),
        pull_timeout: Duration::from_secs(3600),
        ..settings()
    });
    r.rt.offer(APP, ID1, "sha256:d1", 1000);
    r.reg.sizes.lock().unwrap().insert(APP.into(), 1000);
    // The runtime reports bytes, but its pull never starts a download.
    *r.rt.ingests.lock().unwrap() = Some(vec![]);
    *r.rt.pull_delay.lock().unwrap() = Duration::from_secs(3600);
    let e = tokio::time::timeout(Duration::from_secs(10), r.puller.ensure(req(APP, None)))
        .await
        .expect("ends at the resolve timeout")
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("127.0.0.1:5000 sent no layer bytes within 300ms"),
        "{e}"
    );
    assert_eq!(r.rt.pulls.load(Ordering::SeqCst), 1, "not retried");
}

#[tokio::test]
async fn without_a_readable_manifest_or_bytes_a_pull_must_end_within_the_resolve_timeout() {
    let r = rig(PullerSettings {
        resolve_timeout: Duration::from_millis(300),
        pull_timeout: Duration::from_secs(3600),
        ..settings()
    });
    // No manifest (the fake registry knows no size) and a runtime without byte reports.
    r.rt.offer(APP, ID1, "sha256:d1", 10);
    *r.rt.pull_delay.lock().unwrap() = Duration::from_secs(3600);
    let e = tokio::time::timeout(Duration::from_secs(10), r.puller.ensure(req(APP, None)))
        .await
        .expect("ends at the resolve timeout")
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("sent no readable manifest and no image within 300ms"),
        "{e}"
    );
    // With its manifest read, the same slow pull is the runtime's business: it finishes.
    r.reg.sizes.lock().unwrap().insert(APP.into(), 10);
    *r.rt.pull_delay.lock().unwrap() = Duration::from_millis(900);
    let ok = r.puller.ensure(req(APP, None)).await.unwrap();
    assert_eq!(ok.action, Action::Pulled);
}

#[tokio::test]
async fn a_pull_whose_layers_download_is_not_cut_by_the_resolve_timeout() {
    let r = rig(PullerSettings {
        resolve_timeout: Duration::from_millis(300),
        stall_timeout: Duration::from_secs(2),
        ..settings()
    });
    const SIZE: u64 = 1000;
    let layer = format!("sha256:{SIZE:064x}");
    r.rt.offer(APP, ID1, "sha256:d1", SIZE);
    r.reg.sizes.lock().unwrap().insert(APP.into(), SIZE);
    *r.rt.ingests.lock().unwrap() = Some(vec![]);
    *r.rt.pull_delay.lock().unwrap() = Duration::from_millis(1500);
    let rt = Arc::clone(&r.rt);
    let feeder = tokio::spawn(async move {
        for offset in [100, 400, 800] {
            tokio::time::sleep(Duration::from_millis(100)).await;
            *rt.ingests.lock().unwrap() = Some(vec![crate::runtime::Ingest {
                digest: layer.clone(),
                offset,
                total: SIZE,
            }]);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let ok = r.puller.ensure(req(APP, None)).await.unwrap();
    feeder.await.unwrap();
    assert_eq!(ok.action, Action::Pulled);
}

/// The series of the metrics page that carry a `registry` label.
fn registry_series(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| !l.starts_with('#') && l.contains("registry=\""))
        .map(|l| l.rsplit_once(' ').map_or(l, |(s, _)| s).to_owned())
        .collect()
}

#[tokio::test]
async fn pulls_naming_unknown_registries_add_no_series_beyond_other() {
    let r = rig(settings());
    r.rt.offer(APP, ID1, "sha256:d1", 10);
    r.puller
        .ensure(req(APP, Some(PullPolicy::IfNotPresent)))
        .await
        .unwrap();
    // One pull from an unknown host that succeeds, one that fails: `other` has its series.
    let first = "127.0.0.1:6000/x:1";
    r.rt.offer(first, ID1, "sha256:d1", 10);
    r.puller.ensure(req(first, None)).await.unwrap();
    let _ = r.puller.ensure(req("127.0.0.1:6001/x:1", None)).await;
    let before = registry_series(&r.metrics.render());
    assert!(
        before
            .iter()
            .any(|s| s.contains("registry=\"127.0.0.1:5000\"")),
        "a configured registry keeps its name: {before:?}"
    );
    for n in 2..32 {
        let image = format!("127.0.0.1:{}/x:1", 6000 + n);
        r.rt.offer(&image, ID1, "sha256:d1", 10);
        r.puller.ensure(req(&image, None)).await.unwrap();
        let _ = r
            .puller
            .ensure(req(&format!("127.0.0.1:{}/gone:1", 6000 + n), None))
            .await;
    }
    let after = registry_series(&r.metrics.render());
    let added: Vec<&String> = after.difference(&before).collect();
    assert!(added.is_empty(), "{} new series: {added:?}", added.len());
    assert!(
        after
            .iter()
            .filter(|s| !s.contains("registry=\"127.0.0.1:5000\""))
            .all(|s| s.contains("registry=\"other\"")),
        "{after:?}"
    );
}
