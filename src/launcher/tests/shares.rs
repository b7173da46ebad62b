//! What a user's steps hold of the node's pull slots: their pulls count against that user's
//! share, as the user's own `cimage pull` would.

use std::sync::Arc;
use std::time::Duration;

use super::*;

#[tokio::test]
async fn a_users_launches_pull_under_the_users_share_of_the_slots() {
    let base = crate::testing::Rig::on_system_clock(PullerSettings {
        max_concurrent_pulls: 3,
        max_pulls_per_user: 2,
        retries: 0,
        resolve_timeout: Duration::from_secs(3600),
        pull_timeout: Duration::from_secs(3600),
        ..crate::testing::puller_settings()
    });
    base.rt.offer(IMG, "sha256:img1", "sha256:d1", 10);
    let tasks = Arc::new(FakeTaskRuntime::default());
    let launcher = launcher_over(&base, tasks);
    // Three steps of one user, each with an image of a registry that never answers.
    let mut held = Vec::new();
    for n in 1..=3 {
        let image = format!("127.0.0.1:6000/hung:{n}");
        base.reg.silent.lock().unwrap().insert(image.clone());
        let s = LaunchSpec {
            image,
            ..spec(None)
        };
        held.push(launcher.launch(ALICE, s).await.unwrap());
    }
    pulls_when(
        &base,
        "two pulls under way and one waiting for the user's share",
        |n, waiting| n == 3 && waiting == 1,
    )
    .await;
    assert_eq!(base.puller.queued(), 0, "nothing waits in the node's line");
    // Root's step takes the node's free slot at once.
    let (_, rx) = launcher.launch(ROOT, spec(None)).await.unwrap();
    let evs = tokio::time::timeout(Duration::from_secs(5), events(rx))
        .await
        .expect("root's step was held behind a user's pulls");
    assert_eq!(evs.last(), Some(&Event::CleanedUp));
    assert!(names(&evs).contains(&"Exited"), "{:?}", names(&evs));
    // A step root launches as that user, of another image that never comes, waits for the
    // user's share too: the node's free slot stays free.
    let image = "127.0.0.1:6000/hung:4".to_owned();
    base.reg.silent.lock().unwrap().insert(image.clone());
    let as_alice = LaunchSpec {
        image,
        user: Some("1000".parse().unwrap()),
        ..spec(None)
    };
    held.push(launcher.launch(ROOT, as_alice).await.unwrap());
    let (pulls, waiting) = pulls_when(&base, "four pulls", |n, _| n == 4).await;
    assert_eq!(waiting, 2, "{pulls:?}");
    assert_eq!(base.puller.queued(), 0, "nothing waits in the node's line");
    for (task, _) in held {
        launcher.cancel(ROOT, &task.id).await.ok();
    }
}

/// The pulls in flight, and how many of them wait in the queue, once `ready(pulls, waiting)`
/// holds (up to 10 s; else the test fails naming `what`).
async fn pulls_when(
    base: &crate::testing::Rig,
    what: &str,
    ready: impl Fn(usize, usize) -> bool,
) -> (Vec<crate::puller::InFlight>, usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pulls = base.puller.pulls();
        let waiting = pulls
            .iter()
            .filter(|p| p.progress.phase == crate::puller::Phase::Queued)
            .count();
        if ready(pulls.len(), waiting) {
            return (pulls, waiting);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {what}: {pulls:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
