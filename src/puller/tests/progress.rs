//! A pull's progress, its queue place and stall detection.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::super::*;
use super::{req, rig, settings, APP, ID1, ID2};
use crate::policy::PullPolicy;
use crate::testing::Rig;

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
        r.metrics.counter(
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
    let m = r.metrics;
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
    assert_eq!(r.metrics.gauge("cimage_pulls_queued", &[]), 1.0);
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
    assert_eq!(r.metrics.gauge("cimage_pulls_in_flight", &[]), 0.0);
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
