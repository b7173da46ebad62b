//! What callers ask of running and past work: commands run in a step, and the pruning of
//! history.

use std::time::Duration;

use super::*;
use crate::clock::Clock;
use crate::runtime::{ExecAttach, ExecEvent, ExecInput};

#[tokio::test]
async fn exec_runs_in_a_running_step_for_its_owner_and_root_only() {
    let r = rig();
    *r.tasks.script.lock().unwrap() = Some(Script {
        runs_for: Duration::from_secs(30),
        exit_code: 0,
    });
    let (task, rx) = r.launcher.launch(ROOT, spec(None)).await.unwrap();
    let waiter = tokio::spawn(events(rx));
    wait_for_state(&r.launcher, &task.id, TaskState::Running).await;
    let cmd = vec!["id".to_owned(), "-u".to_owned()];
    let t = Duration::from_secs(5);
    let (out, cut) = r
        .launcher
        .exec(ROOT, &task.id, cmd.clone(), t)
        .await
        .unwrap();
    assert_eq!(
        (out.stdout.as_slice(), out.exit_code, cut),
        (&b"id -u\n"[..], 0, false)
    );
    // An admin who does not own the step may see it, not run commands in it.
    let admin = Principal {
        uid: 1002,
        gid: 1002,
        admin: true,
    };
    let e = r
        .launcher
        .exec(admin, &task.id, cmd.clone(), t)
        .await
        .unwrap_err();
    assert!(matches!(e, LaunchError::Spec(SpecError::Denied(_))), "{e}");
    // Another user does not even see it.
    let e = r
        .launcher
        .exec(ALICE, &task.id, cmd.clone(), t)
        .await
        .unwrap_err();
    assert!(matches!(e, LaunchError::NotFound { .. }), "{e}");
    // Bad input changes nothing.
    for (c, limit) in [(vec![], t), (cmd.clone(), Duration::ZERO)] {
        let e = r.launcher.exec(ROOT, &task.id, c, limit).await.unwrap_err();
        assert!(matches!(e, LaunchError::Spec(SpecError::Invalid(_))), "{e}");
    }
    // Attached: the same rules, and the session relays both ways.
    let attach = ExecAttach {
        tty: true,
        stdin: true,
    };
    let (mut s, _slot) = r
        .launcher
        .exec_attach(ROOT, &task.id, vec!["cat".into()], attach)
        .await
        .unwrap();
    s.input
        .send(ExecInput::Stdin(b"hi".to_vec()))
        .await
        .unwrap();
    s.input.send(ExecInput::CloseStdin).await.unwrap();
    assert_eq!(
        s.output.recv().await,
        Some(ExecEvent::Stdout(b"hi".to_vec()))
    );
    assert_eq!(s.output.recv().await, Some(ExecEvent::Exited(0)));
    // A uid holds at most MAX_EXEC_SESSIONS attached commands at once (one is held above).
    let mut held = Vec::new();
    for _ in 1..MAX_EXEC_SESSIONS {
        held.push(
            r.launcher
                .exec_attach(ROOT, &task.id, cmd.clone(), attach)
                .await
                .unwrap(),
        );
    }
    let e = r
        .launcher
        .exec_attach(ROOT, &task.id, cmd.clone(), attach)
        .await
        .unwrap_err();
    assert!(matches!(e, LaunchError::Spec(SpecError::Denied(_))), "{e}");
    held.pop();
    assert!(r
        .launcher
        .exec_attach(ROOT, &task.id, cmd.clone(), attach)
        .await
        .is_ok());
    drop(held);
    let e = r
        .launcher
        .exec_attach(admin, &task.id, cmd.clone(), attach)
        .await
        .unwrap_err();
    assert!(matches!(e, LaunchError::Spec(SpecError::Denied(_))), "{e}");
    let e = r
        .launcher
        .exec_attach(ROOT, &task.id, vec![], attach)
        .await
        .unwrap_err();
    assert!(matches!(e, LaunchError::Spec(SpecError::Invalid(_))), "{e}");
    r.launcher.cancel(ROOT, &task.id).await.unwrap();
    waiter.await.unwrap();
    let e = r
        .launcher
        .exec(ROOT, &task.id, cmd.clone(), t)
        .await
        .unwrap_err();
    assert!(
        matches!(e, LaunchError::Conflict { .. }),
        "not running: {e}"
    );
    let e = r
        .launcher
        .exec_attach(ROOT, &task.id, cmd, attach)
        .await
        .unwrap_err();
    assert!(matches!(e, LaunchError::Conflict { .. }), "{e}");
}

#[tokio::test]
async fn pruning_removes_finished_tasks_and_their_logs_and_keeps_running_jobs() {
    let r = rig_with(|s| {
        s.history = super::history::HistorySettings {
            keep: Duration::ZERO,
            ..Default::default()
        }
    });
    *r.tasks.script.lock().unwrap() = Some(Script {
        runs_for: Duration::from_millis(10),
        exit_code: 0,
    });
    let (done, rx) = r.launcher.launch(ROOT, spec(None)).await.unwrap();
    events(rx).await;
    std::fs::write(&done.log_path, "output\n").unwrap();
    *r.tasks.script.lock().unwrap() = Some(Script {
        runs_for: Duration::from_secs(30),
        exit_code: 0,
    });
    let (running, rx) = r.launcher.launch(ROOT, spec(Some("stay"))).await.unwrap();
    let waiter = tokio::spawn(events(rx));
    wait_for_state(&r.launcher, &running.id, TaskState::Running).await;
    // History keeps nothing: what finished before now goes, once the clock has moved past
    // the task's end and its one-off job's.
    let finished = r
        .launcher
        .task(ROOT, &done.id)
        .await
        .unwrap()
        .finished
        .unwrap();
    let jobs = r.launcher.jobs(ROOT, true).await.unwrap();
    let ended = jobs.iter().filter_map(|(j, _)| j.ended).max().unwrap();
    while SystemClock.now_ms() <= finished.max(ended) {
        tokio::task::yield_now().await;
    }
    let report = r.launcher.prune_history().await.unwrap();
    assert_eq!((report.tasks, report.jobs, report.logs), (1, 1, 1));
    assert!(!done.log_path.exists());
    assert!(
        !done.log_path.parent().unwrap().exists(),
        "the one-off job's directory went"
    );
    assert!(matches!(
        r.launcher.task(ROOT, &done.id).await,
        Err(LaunchError::NotFound { .. })
    ));
    assert_eq!(
        r.launcher.task(ROOT, &running.id).await.unwrap().state,
        TaskState::Running
    );
    assert_eq!(
        r.metrics
            .counter("cimage_history_pruned_total", &[("kind", "task")]),
        1
    );
    // What status shows comes from the launcher, not from the metrics.
    let h = r.launcher.history().await.unwrap();
    assert_eq!((h.recorded, h.live, h.pruned_since_start), (1, 1, 1));
    r.launcher.cancel(ROOT, &running.id).await.unwrap();
    waiter.await.unwrap();
}

#[tokio::test]
async fn a_running_steps_log_is_rotated_past_its_size_and_keeps_its_share_of_files() {
    let r = rig_with(|s| {
        s.logs.max_size = 4096;
        s.logs.max_files = 2;
    });
    *r.tasks.script.lock().unwrap() = Some(Script {
        runs_for: Duration::from_secs(3600),
        exit_code: 0,
    });
    let (task, rx) = r.launcher.launch(ROOT, spec(Some("loud"))).await.unwrap();
    let waiter = tokio::spawn(events(rx));
    wait_for_state(&r.launcher, &task.id, TaskState::Running).await;
    let line = "2026-11-27T17:04:03.1Z stdout F AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n";
    let rotated = |n: u64| {
        let mut p = task.log_path.clone().into_os_string();
        p.push(format!(".{n}"));
        std::path::PathBuf::from(p)
    };
    // The fake runtime writes nothing: the test writes as the runtime would, into whatever
    // file is at the log path, and waits for the launcher to rotate it.
    for n in 1..=3u64 {
        std::fs::write(&task.log_path, line.repeat(200)).unwrap();
        while !rotated(n).exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!task.log_path.exists(), "renamed, not copied");
    }
    assert_eq!(calls(&r, "ReopenContainerLog"), 3);
    // At most MaxLogFiles: the one written (none now) and the newest rotated one.
    assert!(!rotated(1).exists() && !rotated(2).exists());
    // The whole log reads across its files: the last rotated one here.
    let mut rx = r.launcher.logs(ROOT, &task.id, false, None).await.unwrap();
    let mut lines = 0;
    while rx.recv().await.is_some() {
        lines += 1;
    }
    assert_eq!(lines, 200);
    r.launcher.cancel(ROOT, &task.id).await.unwrap();
    waiter.await.unwrap();
}
