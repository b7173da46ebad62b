//! Unit tests of the pre-warmer over the shared rig.

use super::*;
use crate::clock::SystemClock;
use crate::puller::PullerSettings;

struct Rig {
    base: crate::testing::Rig,
    pw: Arc<Prewarmer>,
}

impl std::ops::Deref for Rig {
    type Target = crate::testing::Rig;
    fn deref(&self) -> &Self::Target {
        &self.base
    }
}

fn rig() -> Rig {
    let base = crate::testing::Rig::on_system_clock(PullerSettings {
        max_concurrent_pulls: 4,
        retries: 0,
        ..crate::testing::puller_settings()
    });
    let pw = Prewarmer::new(
        base.puller.clone(),
        base.cache.clone(),
        base.metrics.clone(),
        &base.store,
        Arc::new(SystemClock),
        base.background.clone(),
    )
    .unwrap();
    Rig { base, pw }
}

fn offer(r: &Rig, image: &str, id: &str, digest: &str) {
    r.rt.offer(image, id, digest, 100);
    r.reg.set(image, digest);
}

fn spec(name: &str, images: &[&str], top: Option<usize>) -> ScheduleSpec {
    ScheduleSpec {
        name: name.into(),
        cron: "0 3 * * *".into(),
        time_zone: None,
        images: images.iter().map(|s| s.to_string()).collect(),
        top,
        jitter_ms: 0,
        concurrency: 2,
        catch_up: false,
        from_config: false,
    }
}

#[tokio::test]
async fn a_run_pulls_refreshes_and_records() {
    let r = rig();
    offer(&r, "127.0.0.1:5000/a:1", "sha256:a1", "sha256:da1");
    offer(&r, "127.0.0.1:5000/b:1", "sha256:b1", "sha256:db1");
    r.pw.add(spec(
        "s",
        &[
            "127.0.0.1:5000/a:1",
            "127.0.0.1:5000/b:1",
            "127.0.0.1:5000/gone:1",
        ],
        None,
    ))
    .await
    .unwrap();
    let run = r.pw.run_now("s", None).await.unwrap();
    let outcomes: Vec<(&str, &str)> = run
        .images
        .iter()
        .map(|i| (i.image.as_str(), i.outcome.as_str()))
        .collect();
    assert!(outcomes.contains(&("127.0.0.1:5000/a:1", "pulled")));
    assert!(outcomes.contains(&("127.0.0.1:5000/gone:1", "failed")));
    assert_eq!(run.outcome, RunOutcome::Partial);
    // The tag of a moves: the next run refreshes it; b is current.
    offer(&r, "127.0.0.1:5000/a:1", "sha256:a2", "sha256:da2");
    let run = r.pw.run_now("s", None).await.unwrap();
    let a = run
        .images
        .iter()
        .find(|i| i.image.ends_with("/a:1"))
        .unwrap();
    let b = run
        .images
        .iter()
        .find(|i| i.image.ends_with("/b:1"))
        .unwrap();
    assert_eq!(
        (a.outcome.as_str(), b.outcome.as_str()),
        ("refreshed", "cached")
    );
    assert_eq!(r.pw.history("s").await.unwrap().len(), 2);
}

#[tokio::test]
async fn top_picks_the_most_used_and_prewarming_does_not_count_as_use() {
    let r = rig();
    for (img, uses) in [("a", 3), ("b", 2), ("c", 1)] {
        let image = format!("127.0.0.1:5000/{img}:1");
        offer(
            &r,
            &image,
            &format!("sha256:{img}"),
            &format!("sha256:d{img}"),
        );
        for _ in 0..uses {
            r.puller
                .ensure(EnsureRequest {
                    image: image.clone(),
                    policy: None,
                    credentials: None,
                    origin: Origin::Job,
                    requester: None,
                    progress: None,
                })
                .await
                .unwrap();
        }
    }
    r.pw.add(spec("top", &[], Some(2))).await.unwrap();
    for _ in 0..5 {
        r.pw.run_now("top", None).await.unwrap();
    }
    let run = r.pw.run_now("top", None).await.unwrap();
    let mut names: Vec<&str> = run.images.iter().map(|i| i.image.as_str()).collect();
    names.sort();
    assert_eq!(names, ["127.0.0.1:5000/a:1", "127.0.0.1:5000/b:1"]);
    let top = r.pw.top(3).await.unwrap();
    assert_eq!(
        top.iter().map(|r| r.record.use_count).collect::<Vec<_>>(),
        [3, 2, 1]
    );

    // Popularity outlives presence: removed, the two keep their ranks, marked absent, and the
    // schedule brings them back with their history.
    for img in ["a", "b"] {
        r.cache
            .remove_image(&format!("127.0.0.1:5000/{img}:1"))
            .await
            .unwrap();
    }
    let top = r.pw.top(3).await.unwrap();
    let seen: Vec<(&str, bool, u64)> = top
        .iter()
        .map(|t| (t.record.names[0].as_str(), t.present, t.record.use_count))
        .collect();
    assert_eq!(
        seen,
        [
            ("127.0.0.1:5000/a:1", false, 3),
            ("127.0.0.1:5000/b:1", false, 2),
            ("127.0.0.1:5000/c:1", true, 1)
        ]
    );
    let run = r.pw.run_now("top", None).await.unwrap();
    assert!(
        run.images.iter().all(|i| i.outcome.as_str() == "pulled"),
        "{:?}",
        run.images
    );
    let top = r.pw.top(3).await.unwrap();
    assert!(top.iter().all(|t| t.present));
    assert_eq!(
        top.iter().map(|r| r.record.use_count).collect::<Vec<_>>(),
        [3, 2, 1]
    );
}

#[tokio::test]
async fn overlapping_runs_are_skipped_and_recorded() {
    let r = rig();
    offer(&r, "127.0.0.1:5000/slow:1", "sha256:s", "sha256:ds");
    *r.rt.pull_delay.lock().unwrap() = Duration::from_millis(200);
    r.pw.add(spec("slow", &["127.0.0.1:5000/slow:1"], None))
        .await
        .unwrap();
    let pw = r.pw.clone();
    let first = tokio::spawn(async move { pw.run_now("slow", None).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let st = r.pw.blocking(|s| s.all()).await.unwrap().pop().unwrap();
    let skipped =
        r.pw.run(st.spec, "cron", Some(1), Duration::ZERO, None)
            .await;
    assert_eq!(skipped.outcome, RunOutcome::Skipped);
    assert!(matches!(
        r.pw.run_now("slow", None).await,
        Err(PrewarmError::Conflict(_))
    ));
    assert_eq!(first.await.unwrap().unwrap().outcome, RunOutcome::Ok);
    let outcomes: Vec<RunOutcome> =
        r.pw.history("slow")
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.outcome)
            .collect();
    assert!(
        outcomes.contains(&RunOutcome::Skipped) && outcomes.contains(&RunOutcome::Ok),
        "{outcomes:?}"
    );
}

#[tokio::test]
async fn config_schedules_are_owned_by_the_config() {
    let r = rig();
    r.pw.sync_config(vec![spec("cfg", &["127.0.0.1:5000/a:1"], None)])
        .await
        .unwrap();
    assert!(matches!(
        r.pw.remove("cfg").await,
        Err(PrewarmError::Conflict(_))
    ));
    assert!(matches!(
        r.pw.add(spec("cfg", &["x:1"], None)).await,
        Err(PrewarmError::Conflict(_))
    ));
    r.pw.sync_config(vec![]).await.unwrap();
    assert!(r.pw.list().await.unwrap().is_empty());
    assert!(matches!(
        r.pw.remove("nope").await,
        Err(PrewarmError::NotFound(_))
    ));
}

#[tokio::test]
async fn runs_cut_short_are_marked_interrupted_at_the_next_start() {
    let r = rig();
    r.pw.add(spec("nightly", &["127.0.0.1:5000/a:1"], None))
        .await
        .unwrap();
    let store = PrewarmStore::open(&r.store).unwrap();
    let run = RunRecord {
        schedule: "nightly".into(),
        trigger: "cron".into(),
        scheduled_for: None,
        started: 5,
        finished: None,
        jitter_ms: 0,
        outcome: RunOutcome::Running,
        images: vec![],
    };
    store.put_run(&run).unwrap();
    // As a new daemon over the same store would be after a crash.
    Prewarmer::new(
        r.puller.clone(),
        r.cache.clone(),
        r.metrics.clone(),
        &r.store,
        Arc::new(SystemClock),
        r.background.clone(),
    )
    .unwrap();
    let runs = r.pw.history("nightly").await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].outcome, RunOutcome::Interrupted);
    assert!(runs[0].finished.is_some());
}

#[tokio::test]
async fn runs_past_the_history_cutoff_are_pruned_running_ones_stay() {
    let r = rig();
    let store = PrewarmStore::open(&r.store).unwrap();
    let run = |schedule: &str, started: i64, outcome: RunOutcome| RunRecord {
        schedule: schedule.into(),
        trigger: "cron".into(),
        scheduled_for: None,
        started,
        finished: (outcome != RunOutcome::Running).then_some(started + 10),
        jitter_ms: 0,
        outcome,
        images: vec![],
    };
    for (s, t, o) in [
        ("a", 100, RunOutcome::Ok),
        ("a", 5_000, RunOutcome::Ok),
        ("b", 200, RunOutcome::Failed),
        ("b", 300, RunOutcome::Running),
    ] {
        store.put_run(&run(s, t, o)).unwrap();
    }
    assert_eq!(r.pw.prune_runs(1_000).await.unwrap(), 2);
    assert_eq!(r.pw.prune_runs(1_000).await.unwrap(), 0);
    let left = |s: &str| {
        store
            .runs(s)
            .unwrap()
            .iter()
            .map(|r| r.started)
            .collect::<Vec<_>>()
    };
    assert_eq!((left("a"), left("b")), (vec![5_000], vec![300]));
}
