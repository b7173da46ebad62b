//! Unit tests of expectations over the shared rig (fake runtime and registry, a manual clock;
//! the dispatcher's pass is driven by hand).

use std::sync::atomic::Ordering;

use super::source::{Planned, QueueView};
use super::*;
use crate::cache::{EvictionSettings, Origin};
use crate::clock::ManualClock;
use crate::puller::PullerSettings;
use crate::runtime::ImageRuntime;

const T0: i64 = 1_800_000_000_000;
const A: &str = "127.0.0.1:5000/a:1";
const B: &str = "127.0.0.1:5000/b:1";
const ID_A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const ID_B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const ROOT: Asker = Asker {
    uid: 0,
    admin: true,
};
const ALICE: Asker = Asker {
    uid: 1500,
    admin: false,
};

struct Rig {
    base: crate::testing::Rig,
    clock: Arc<ManualClock>,
    x: Arc<Expector>,
}

impl std::ops::Deref for Rig {
    type Target = crate::testing::Rig;
    fn deref(&self) -> &Self::Target {
        &self.base
    }
}

fn settings() -> ExpectSettings {
    ExpectSettings {
        grace: Duration::from_secs(3600),
        max_per_user: 2,
        concurrency: 1,
        ..Default::default()
    }
}

fn rig_with(eviction: Option<EvictionSettings>) -> Rig {
    let clock = Arc::new(ManualClock::new(T0));
    let base = crate::testing::Rig::with(
        PullerSettings {
            retries: 0,
            ..crate::testing::puller_settings()
        },
        clock.clone(),
        |c| match eviction {
            Some(e) => c.with_eviction(e),
            None => c,
        },
    );
    let x = expector(&base, &clock);
    base.rt.offer(A, ID_A, "sha256:da", 100);
    base.rt.offer(B, ID_B, "sha256:db", 100);
    Rig { base, clock, x }
}

fn expector(base: &crate::testing::Rig, clock: &Arc<ManualClock>) -> Arc<Expector> {
    Expector::new(
        base.puller.clone(),
        base.cache.clone(),
        base.metrics.clone(),
        &base.store,
        clock.clone(),
        settings(),
        None,
        base.background.clone(),
    )
    .unwrap()
}

fn rig() -> Rig {
    rig_with(None)
}

fn req(image: &str, in_ms: i64, job: Option<&str>) -> ExpectRequest {
    ExpectRequest {
        image: image.into(),
        deadline_ms: T0 + in_ms,
        job: job.map(str::to_owned),
        credentials: None,
    }
}

/// Runs the dispatcher's pass and waits for the pulls it started to end.
async fn settle(r: &Rig) {
    r.x.tick().await.unwrap();
    for _ in 0..500 {
        if r.x.live.lock().unwrap().pulling.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("pulls did not end");
}

fn state_of(r: &Rig, image: &str) -> Expectation {
    r.x.list(ROOT)
        .into_iter()
        .find(|e| e.image == image)
        .unwrap_or_else(|| panic!("no expectation of {image}"))
}

#[tokio::test]
async fn an_expected_image_is_pulled_and_held_from_eviction() {
    let r = rig();
    let e = r.x.expect(req(A, 60_000, Some("42")), ROOT).await.unwrap();
    assert_eq!(e.state, State::Waiting);
    settle(&r).await;
    let e = state_of(&r, A);
    assert_eq!(e.state, State::Ready);
    assert_eq!(e.image_id.as_deref(), Some(ID_A));
    assert_eq!(e.ready_ms, Some(T0));
    assert!(r.cache.is_expected(ID_A));
    assert_eq!(r.rt.pulls.load(Ordering::SeqCst), 1);
    // Cancelled: the hold goes with it.
    r.x.cancel(CancelTarget::Job("42".into()), ROOT)
        .await
        .unwrap();
    assert!(!r.cache.is_expected(ID_A));
    assert!(r.x.list(ROOT).is_empty());
}

#[tokio::test]
async fn the_earliest_deadline_is_pulled_first() {
    let r = rig();
    *r.rt.pull_delay.lock().unwrap() = Duration::from_millis(20);
    r.x.expect(req(B, 120_000, None), ROOT).await.unwrap();
    r.x.expect(req(A, 60_000, None), ROOT).await.unwrap();
    // One slot: the pass starts A (earlier), B waits.
    r.x.tick().await.unwrap();
    assert_eq!(state_of(&r, B).state, State::Waiting);
    assert!(matches!(
        state_of(&r, A).state,
        State::Queued | State::Pulling
    ));
    settle(&r).await;
    assert_eq!(state_of(&r, A).state, State::Ready);
    settle(&r).await;
    assert_eq!(state_of(&r, B).state, State::Ready);
    let (a, b) = (state_of(&r, A), state_of(&r, B));
    assert!(a.ready_ms <= b.ready_ms);
}

#[tokio::test]
async fn a_user_expects_for_themselves_only_within_their_cap() {
    let r = rig();
    r.x.expect(req(A, 60_000, None), ALICE).await.unwrap();
    r.x.expect(req(B, 60_000, None), ALICE).await.unwrap();
    // The same one again moves it; a third is refused.
    r.x.expect(req(A, 90_000, None), ALICE).await.unwrap();
    let e =
        r.x.expect(req("127.0.0.1:5000/c:1", 60_000, None), ALICE)
            .await
            .unwrap_err();
    assert!(matches!(e, ExpectError::TooMany { max: 2, .. }), "{e}");
    // Root's are not theirs to see or cancel, and the answer does not say it exists.
    r.x.expect(req(A, 60_000, Some("7")), ROOT).await.unwrap();
    assert_eq!(r.x.list(ALICE).len(), 2);
    let e =
        r.x.cancel(CancelTarget::Job("7".into()), ALICE)
            .await
            .unwrap_err();
    assert_eq!(e.to_string(), "no expectation of job 7 to cancel");
    assert_eq!(r.x.list(ROOT).len(), 3);
}

#[tokio::test]
async fn bad_requests_are_refused_with_what_is_wrong() {
    let r = rig();
    let e = r.x.expect(req("UPPER/Case", 60_000, None), ROOT).await;
    assert!(matches!(e, Err(ExpectError::Reference(_))));
    let e = r.x.expect(req(A, -1, None), ROOT).await.unwrap_err();
    assert!(e.to_string().contains("in the past"), "{e}");
    let e =
        r.x.expect(req(A, 31 * 86_400_000, None), ROOT)
            .await
            .unwrap_err();
    assert!(e.to_string().contains("30 days"), "{e}");
    let e = r.x.expect(req(A, 1, Some("a b")), ROOT).await.unwrap_err();
    assert!(e.to_string().contains("spaces"), "{e}");
    assert!(r.x.list(ROOT).is_empty(), "nothing was kept");
}

#[tokio::test]
async fn late_once_past_the_deadline_and_gone_after_the_grace() {
    let r = rig();
    r.rt.available.lock().unwrap().remove(A); // the registry does not have it (yet)
    r.x.expect(req(A, 1_000, None), ROOT).await.unwrap();
    settle(&r).await;
    assert_eq!(state_of(&r, A).state, State::Failed);
    r.clock.advance(2_000);
    r.x.tick().await.unwrap();
    let e = state_of(&r, A);
    assert!(e.late);
    assert_eq!(r.metrics.counter("cimage_expect_late_total", &[]), 1);
    r.x.tick().await.unwrap();
    assert_eq!(
        r.metrics.counter("cimage_expect_late_total", &[]),
        1,
        "counted once"
    );
    r.clock.advance(3_600_000);
    r.x.tick().await.unwrap();
    assert!(r.x.list(ROOT).is_empty());
}

#[tokio::test]
async fn a_failed_pull_is_tried_again_while_the_deadline_is_ahead() {
    let r = rig();
    r.rt.available.lock().unwrap().remove(A);
    r.x.expect(req(A, 3_600_000, None), ROOT).await.unwrap();
    settle(&r).await;
    let e = state_of(&r, A);
    assert_eq!(e.state, State::Failed);
    assert!(
        e.reason.as_deref().unwrap_or("").contains("not found"),
        "{e:?}"
    );
    r.rt.offer(A, ID_A, "sha256:da", 100);
    settle(&r).await;
    assert_eq!(
        state_of(&r, A).state,
        State::Failed,
        "not before retry_after"
    );
    r.clock.advance(300_001);
    settle(&r).await;
    assert_eq!(state_of(&r, A).state, State::Ready);
}

#[tokio::test]
async fn the_jobs_first_request_says_whether_it_found_the_image_ready() {
    let r = rig();
    r.x.start();
    r.x.expect(req(A, 60_000, Some("1")), ROOT).await.unwrap();
    settle(&r).await;
    r.clock.advance(45_000);
    // The job asks (a CRI ImageStatus hit counts a use without a pull).
    let img = r.rt.image_status(A).await.unwrap().unwrap();
    r.cache.record_use(img, Origin::Cri).await.unwrap();
    let mut e = state_of(&r, A);
    for _ in 0..200 {
        if e.first_request.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        e = state_of(&r, A);
    }
    assert_eq!(
        e.first_request,
        Some(FirstRequest {
            at_ms: T0 + 45_000,
            found_ready: true
        })
    );
    assert_eq!(e.lead_ms(), Some(45_000));
    assert!(!e.late);
    r.background.begin_shutdown();
}

#[tokio::test]
async fn expectations_and_their_holds_survive_a_restart_without_their_credentials() {
    let r = rig();
    r.x.expect(req(A, 60_000, None), ROOT).await.unwrap();
    settle(&r).await;
    let mut with = req(B, 60_000, None);
    with.credentials = Some(crate::credentials::Credentials {
        username: "u".into(),
        password: "p".into(),
        kind: Default::default(),
    });
    r.x.expect(with, ROOT).await.unwrap();
    drop(r.x.live.lock().unwrap().holds.drain());
    assert!(!r.cache.is_expected(ID_A));
    // A new expector over the same store: A is held again, B cannot be pulled.
    let again = expector(&r.base, &r.clock);
    assert!(r.cache.is_expected(ID_A));
    again.tick().await.unwrap();
    let b = again.list(ROOT).into_iter().find(|e| e.image == B).unwrap();
    assert_eq!(b.state, State::Failed);
    assert!(b.reason.unwrap().contains("credentials are not kept"));
    assert_eq!(r.rt.pulls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn what_does_not_fit_beside_earlier_expectations_waits_for_room() {
    let r = rig_with(Some(EvictionSettings {
        high_percent: 100.0,
        low_percent: 100.0,
        max_bytes: Some(150),
        min_age: Duration::ZERO,
        ..Default::default()
    }));
    r.reg.sizes.lock().unwrap().insert(A.into(), 100);
    r.reg.sizes.lock().unwrap().insert(B.into(), 100);
    r.x.expect(req(A, 60_000, None), ROOT).await.unwrap();
    r.x.expect(req(B, 120_000, None), ROOT).await.unwrap();
    settle(&r).await;
    settle(&r).await;
    assert_eq!(state_of(&r, A).state, State::Ready);
    let b = state_of(&r, B);
    assert_eq!(b.state, State::NoRoom, "{b:?}");
    assert!(
        r.rt.image_status(A).await.unwrap().is_some(),
        "A was not evicted"
    );
}

#[tokio::test]
async fn a_queue_sources_jobs_are_followed_until_they_leave_the_queue() {
    let r = rig();
    let plan = |start: i64| QueueView {
        planned: vec![Planned {
            job: "100".into(),
            image: "127.0.0.1:5000/a:1".into(),
            start_ms: T0 + start,
            uid: Some(1000),
        }],
        ..Default::default()
    };
    r.x.follow(Source::Slurm, plan(600_000)).await.unwrap();
    let e = state_of(&r, A);
    assert_eq!(
        (e.source, e.owner, e.job.as_deref()),
        (Source::Slurm, 0, Some("100"))
    );
    assert_eq!(e.deadline_ms, T0 + 600_000);
    // Its pull counts against the job's user's share (the image is the user's choice).
    assert_eq!(e.job_uid, Some(1000));
    // The plan moves: the same expectation moves.
    r.x.follow(Source::Slurm, plan(300_000)).await.unwrap();
    assert_eq!(r.x.list(ROOT).len(), 1);
    assert_eq!(state_of(&r, A).deadline_ms, T0 + 300_000);
    // The job runs here: kept (past its grace too) until it ends.
    let running = QueueView {
        running: vec![("100".into(), Some(T0 + 310_000))],
        knows_running: true,
        ..Default::default()
    };
    r.x.follow(Source::Slurm, running.clone()).await.unwrap();
    r.clock.advance(5 * 3_600_000);
    r.x.tick().await.unwrap();
    let e = state_of(&r, A);
    assert!(e.running);
    assert_eq!(e.job_start_ms, Some(T0 + 310_000));
    // An expectation of the API is not the source's to end.
    r.x.expect(req(B, 5 * 3_600_000 + 60_000, None), ROOT)
        .await
        .unwrap();
    r.x.follow(Source::Slurm, QueueView::default())
        .await
        .unwrap();
    let left: Vec<String> = r.x.list(ROOT).into_iter().map(|e| e.image).collect();
    assert_eq!(left, vec![B.to_string()]);
}
