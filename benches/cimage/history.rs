//! What a long history costs: launch-to-exit through gRPC `Launch` with an empty history and
//! with 100,000 finished tasks in the store (seeded directly through the store while cimaged is
//! stopped, not by running 100,000 containers); the start-up until recovery is done; the
//! daemon's resident memory with that history.

use std::time::{Duration, Instant};

use cimage::launcher::store::{TaskRecord, TaskState, TaskStore};

use crate::rig::*;

/// Finished tasks seeded into the history.
const HISTORY: usize = 100_000;
/// Launches measured each way (the first of each is not counted).
const RUNS: usize = 30;

/// One gRPC `Launch` of `true` as uid 65534, to its cleanup.
async fn launch(daemon: &Daemon, image: &str) -> Duration {
    let mut launcher = cimage::api::launcher_client(&daemon.socket);
    crate::launch::grpc_launch(&mut launcher, image).await
}

/// A finished step of some past job.
pub(crate) fn past(i: usize, image: &str) -> TaskRecord {
    TaskRecord {
        id: format!("hist{i:09}"),
        job: format!("hist-job-{}", i / 8),
        step: (i % 8) as u32,
        uid: 1000 + (i % 50) as u32,
        image: image.to_owned(),
        image_id: Some(format!("sha256:{:064x}", i % 97)),
        container_id: Some(format!("{:064x}", i)),
        state: TaskState::Exited,
        exit_code: Some((i % 3) as i32),
        signal: None,
        failure: None,
        log_path: format!("/nonexistent/hist-job-{}/step-{}.log", i / 8, i % 8).into(),
        created: 1_700_000_000_000 + i as i64,
        started: Some(1_700_000_000_100 + i as i64),
        finished: Some(1_700_000_001_000 + i as i64),
        timeout_ms: None,
        cleaned: true,
    }
}

pub(crate) async fn history(cri: &str, registry: &str) {
    // Two daemons side by side, one with an empty history and one with HISTORY past tasks;
    // pruning is pushed past the run (the seeded history is older than any Keep).
    let extra = "History:\n  Keep: 100000d\n  MaxTasks: 1000000";
    let empty_daemon = Daemon::start_with(cri, registry, extra);
    let mut daemon = Daemon::start_with(cri, registry, extra);
    let image = format!("{registry}/busybox:1");
    launch(&daemon, &image).await;

    daemon.stop();
    let store = cimage::store::Store::open(&daemon.index_path()).expect("the bench daemon's index");
    let tasks = TaskStore::open(&store).unwrap();
    let t = Instant::now();
    for chunk in (0..HISTORY).collect::<Vec<_>>().chunks(10_000) {
        let batch: Vec<TaskRecord> = chunk.iter().map(|&i| past(i, &image)).collect();
        tasks.put_tasks(&batch).unwrap();
    }
    let seeded = t.elapsed();
    drop(tasks);
    drop(store);

    let recovered = daemon.occurrences("launcher recovered its tasks");
    let t = Instant::now();
    daemon.respawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    while daemon.occurrences("launcher recovered its tasks") == recovered {
        assert!(Instant::now() < deadline, "the daemon never recovered");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let startup = t.elapsed();
    // Warm both, then alternate which goes first.
    launch(&empty_daemon, &image).await;
    launch(&daemon, &image).await;
    let (mut empty, mut full) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        if i % 2 == 0 {
            empty.push(launch(&empty_daemon, &image).await);
            full.push(launch(&daemon, &image).await);
        } else {
            full.push(launch(&daemon, &image).await);
            empty.push(launch(&empty_daemon, &image).await);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_empty, rss_full) = (empty_daemon.rss_kib(), daemon.rss_kib());

    let (e50, f50) = (percentile(&mut empty, 0.5), percentile(&mut full, 0.5));
    row(
        "launch-to-exit p50 with 100,000 past tasks (vs none)",
        format!("{:.1} ms", ms(f50)),
        format!("{:.1} ms", ms(e50)),
        format!("{:+.2} ms", ms(f50) - ms(e50)),
        "+<= 1 ms",
    );
    row(
        "  start-up to recovery done, 100,000 past tasks",
        format!("{:.0} ms", ms(startup)),
        "-".into(),
        "-".into(),
        "",
    );
    row(
        "  resident memory, 100,000 past tasks (vs none)",
        format!("{:.1} MiB", rss_full as f64 / 1024.0),
        format!("{:.1} MiB", rss_empty as f64 / 1024.0),
        "-".into(),
        "<= 50 MiB",
    );
    eprintln!("bench: seeded {HISTORY} tasks in {seeded:?}");
}
