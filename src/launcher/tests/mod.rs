//! Unit tests of the launcher over the fake task runtime and the shared rig: the rig and the
//! lifecycle here; confinement, durability and queries (exec, history) in their own files.

mod confinement;
mod durability;
mod queries;
mod shares;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::Receiver;

use super::request::{Principal, SpecError};
use super::spec::LaunchSpec;
use super::store::TaskState;
use super::*;
use crate::cache::Origin;
use crate::clock::SystemClock;
use crate::identity::fake::FakeUsers;
use crate::puller::PullerSettings;
use crate::runtime::fake_task::{FakeTaskRuntime, Script};

const IMG: &str = "127.0.0.1:5000/app:1";
const ROOT: Principal = Principal {
    uid: 0,
    gid: 0,
    admin: true,
};
const ALICE: Principal = Principal {
    uid: 1000,
    gid: 1000,
    admin: false,
};
const BOB: Principal = Principal {
    uid: 1001,
    gid: 1001,
    admin: false,
};

struct Rig {
    base: crate::testing::Rig,
    tasks: Arc<FakeTaskRuntime>,
    launcher: Arc<Launcher>,
}

impl std::ops::Deref for Rig {
    type Target = crate::testing::Rig;
    fn deref(&self) -> &Self::Target {
        &self.base
    }
}

fn launcher_over(base: &crate::testing::Rig, tasks: Arc<FakeTaskRuntime>) -> Arc<Launcher> {
    launcher_with(base, tasks, |_| {})
}

fn launcher_with(
    base: &crate::testing::Rig,
    tasks: Arc<FakeTaskRuntime>,
    adjust: impl FnOnce(&mut LauncherSettings),
) -> Arc<Launcher> {
    // Pod cgroups go into a directory standing in for a cgroup v1 file system.
    let cgroups = base.dir.path().join("cgroup");
    std::fs::create_dir_all(cgroups.join("pids")).unwrap();
    let mut settings = LauncherSettings {
        stop_grace: Duration::from_secs(1),
        allow_user_launch: true,
        cgroup_root: super::pod_cgroup::CgroupRoot(cgroups),
        ..LauncherSettings::with_log_dir(base.dir.path().join("logs"))
    };
    adjust(&mut settings);
    Launcher::new(
        Parts {
            runtime: tasks,
            puller: base.puller.clone(),
            cache: base.cache.clone(),
            metrics: base.metrics.clone(),
            store: base.store.clone(),
            clock: Arc::new(SystemClock),
            users: Arc::new(FakeUsers::standard()),
            mounts: Arc::new(super::mounts::fake::CheckOnly::default()),
            background: base.background.clone(),
        },
        settings,
    )
    .unwrap()
}

fn rig() -> Rig {
    rig_with(|_| {})
}

fn rig_with(adjust: impl FnOnce(&mut LauncherSettings)) -> Rig {
    let base = crate::testing::Rig::on_system_clock(PullerSettings {
        max_concurrent_pulls: 2,
        retries: 0,
        ..crate::testing::puller_settings()
    });
    base.rt.offer(IMG, "sha256:img1", "sha256:d1", 10);
    let tasks = Arc::new(FakeTaskRuntime::default());
    let launcher = launcher_with(&base, tasks.clone(), adjust);
    Rig {
        base,
        tasks,
        launcher,
    }
}

/// Launches `s` as root in a daemon that "crashes" once `until` sees an event: the launcher runs
/// on a runtime of its own, so that shutting that runtime down stops its tasks mid-flight, as
/// `kill -9` would.
async fn launch_then_crash(r: &Rig, s: LaunchSpec, until: fn(&Event) -> bool) -> TaskRecord {
    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let l1 = r.launcher.clone();
    let (task, mut rx) = first
        .spawn(async move { l1.launch(ROOT, s).await.unwrap() })
        .await
        .unwrap();
    while let Some(e) = rx.recv().await {
        if until(&e.event) {
            break;
        }
    }
    first.shutdown_background();
    task
}

/// How many times the runtime was asked for `op`.
fn calls(r: &Rig, op: &str) -> usize {
    r.tasks
        .calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| **c == op)
        .count()
}

fn spec(job: Option<&str>) -> LaunchSpec {
    LaunchSpec {
        job: job.map(str::to_owned),
        image: IMG.into(),
        command: vec!["true".into()],
        ..Default::default()
    }
}

async fn events(mut rx: Receiver<TaskEvent>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(e) = rx.recv().await {
        let done = e.event == Event::CleanedUp;
        out.push(e.event);
        if done {
            break;
        }
    }
    out
}

/// The lifecycle events' names (pull progress, which comes as the pull moves, left out).
fn names(evs: &[Event]) -> Vec<&'static str> {
    evs.iter()
        .filter(|e| !matches!(e, Event::ImagePulling(_)))
        .map(|e| match e {
            Event::ImagePulling(_) => "ImagePulling",
            Event::Accepted { .. } => "Accepted",
            Event::SandboxReady { .. } => "SandboxReady",
            Event::ImageReady { .. } => "ImageReady",
            Event::ContainerCreated { .. } => "ContainerCreated",
            Event::Started => "Started",
            Event::Output(_) => "Output",
            Event::Exited { .. } => "Exited",
            Event::CleanedUp => "CleanedUp",
            Event::Failed { .. } => "Failed",
        })
        .collect()
}

/// Waits (polling the store) until task `id` is in state `want`.
async fn wait_for_state(l: &Launcher, id: &str, want: TaskState) {
    for _ in 0..500 {
        if l.task(ROOT, id).await.unwrap().state == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("task {id} never reached {want:?}");
}

#[tokio::test]
async fn one_off_task_runs_through_every_stage_and_leaves_nothing() {
    let r = rig();
    *r.tasks.script.lock().unwrap() = Some(Script {
        runs_for: Duration::from_millis(20),
        exit_code: 3,
    });
    let (task, rx) = r.launcher.launch(ROOT, spec(None)).await.unwrap();
    let evs = events(rx).await;
    assert_eq!(
        names(&evs),
        [
            "Accepted",
            "SandboxReady",
            "ImageReady",
            "ContainerCreated",
            "Started",
            "Exited",
            "CleanedUp"
        ]
    );
    assert!(evs.contains(&Event::Exited {
        exit_code: 3,
        signal: None,
        reason: ExitReason::Exited
    }));
    assert_eq!((r.tasks.pod_count(), r.tasks.container_count()), (0, 0));
    let t = r.launcher.task(ROOT, &task.id).await.unwrap();
    assert_eq!(
        (t.state, t.exit_code, t.cleaned),
        (TaskState::Exited, Some(3), true)
    );
    assert_eq!(
        r.metrics
            .counter("cimage_tasks_total", &[("state", "exited")]),
        1
    );
    let img = r.cache.list().await.unwrap().first().cloned().unwrap();
    assert_eq!(
        (img.use_count, img.origin),
        (1, Origin::Job),
        "a launch is a use of its image"
    );
    assert!(!r.cache.is_in_use(&img.id), "released after the task");
}

#[tokio::test]
async fn an_image_missing_at_container_creation_is_checked_again() {
    let r = rig();
    r.tasks.fail_once.lock().unwrap().insert(
        "CreateContainer",
        crate::runtime::RuntimeError {
            op: "CreateContainer",
            kind: crate::runtime::RuntimeErrorKind::NotFound,
            message: "failed to get image: not found".into(),
        },
    );
    let (task, rx) = r.launcher.launch(ROOT, spec(None)).await.unwrap();
    let evs = events(rx).await;
    assert!(
        evs.contains(&Event::Exited {
            exit_code: 0,
            signal: None,
            reason: ExitReason::Exited
        }),
        "{evs:?}"
    );
    let creates = r
        .tasks
        .calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| **c == "CreateContainer")
        .count();
    assert_eq!(creates, 2, "retried once after re-checking the image");
    assert!(r
        .launcher
        .task(ROOT, &task.id)
        .await
        .unwrap()
        .failure
        .is_none());
}

#[tokio::test]
async fn job_locks_last_only_while_their_jobs_are_worked_on() {
    let r = rig();
    // One-off steps: each makes a job of its own (run-…), which ends with it.
    for _ in 0..5 {
        let (_, rx) = r.launcher.launch(ROOT, spec(None)).await.unwrap();
        events(rx).await;
    }
    // A job that goes on, and one that is ended.
    *r.tasks.script.lock().unwrap() = Some(Script {
        runs_for: Duration::from_secs(30),
        exit_code: 0,
    });
    let (running, rx) = r.launcher.launch(ROOT, spec(Some("stays"))).await.unwrap();
    let waiter = tokio::spawn(events(rx));
    wait_for_state(&r.launcher, &running.id, TaskState::Running).await;
    let (ended, rx) = r.launcher.launch(ROOT, spec(Some("ends"))).await.unwrap();
    let ending = tokio::spawn(events(rx));
    wait_for_state(&r.launcher, &ended.id, TaskState::Running).await;
    r.launcher.end_job(ROOT, "ends").await.unwrap();
    ending.await.unwrap();
    assert_eq!(r.launcher.job_locks.len(), 0, "no lock is held");
    r.launcher.cancel(ROOT, &running.id).await.unwrap();
    waiter.await.unwrap();
    assert_eq!(r.launcher.job_locks.len(), 0);
}

#[tokio::test]
async fn signal_deaths_are_reported_as_signals() {
    let r = rig();
    *r.tasks.script.lock().unwrap() = Some(Script {
        runs_for: Duration::ZERO,
        exit_code: 137,
    });
    let (_, rx) = r.launcher.launch(ROOT, spec(None)).await.unwrap();
    let evs = events(rx).await;
    assert!(evs.contains(&Event::Exited {
        exit_code: 137,
        signal: Some(9),
        reason: ExitReason::Exited
    }));
}

#[tokio::test]
async fn image_failure_leaves_no_pod() {
    let r = rig();
    let mut s = spec(None);
    s.image = "127.0.0.1:5000/missing:1".into();
    let (task, rx) = r.launcher.launch(ROOT, s).await.unwrap();
    let evs = events(rx).await;
    assert_eq!(
        names(&evs),
        ["Accepted", "SandboxReady", "Failed", "CleanedUp"]
    );
    assert!(evs.iter().any(
        |e| matches!(e, Event::Failed { stage: Stage::Image, message } if message.contains("missing:1"))
    ));
    assert!(
        evs.iter().any(
            |e| matches!(e, Event::ImagePulling(p) if p.phase == crate::puller::Phase::Failed)
        ),
        "the pull's failure is shown as it happens: {evs:?}"
    );
    assert_eq!(r.tasks.pod_count(), 0);
    let t = r.launcher.task(ROOT, &task.id).await.unwrap();
    assert_eq!(t.failure.unwrap().0, "ImageReady");

    // Also for a named job whose first step fails: the next step gets a fresh pod.
    let mut s = spec(Some("j1"));
    s.image = "127.0.0.1:5000/missing:1".into();
    let (_, rx) = r.launcher.launch(ROOT, s).await.unwrap();
    events(rx).await;
    assert_eq!(r.tasks.pod_count(), 0);
}

#[tokio::test]
async fn failures_at_create_and_start_still_clean_up() {
    for op in ["CreateContainer", "StartContainer", "RunPodSandbox"] {
        let r = rig();
        r.tasks.failing.lock().unwrap().insert(op, "boom".into());
        let (_, rx) = r.launcher.launch(ROOT, spec(None)).await.unwrap();
        let evs = events(rx).await;
        assert!(
            evs.iter()
                .any(|e| matches!(e, Event::Failed { message, .. } if message.contains("boom"))),
            "{op}: {evs:?}"
        );
        assert_eq!(
            (r.tasks.pod_count(), r.tasks.container_count()),
            (0, 0),
            "{op}"
        );
    }
}

#[tokio::test]
async fn a_mount_the_node_cannot_stage_is_its_failure_not_a_bad_request() {
    let r = rig();
    let stager = Arc::new(super::mounts::fake::CheckOnly::default());
    *stager.host_failure.lock().unwrap() = Some("Input/output error (os error 5)".into());
    let launcher = Launcher::new(
        Parts {
            runtime: r.tasks.clone(),
            puller: r.puller.clone(),
            cache: r.cache.clone(),
            metrics: r.metrics.clone(),
            store: r.store.clone(),
            clock: Arc::new(SystemClock),
            users: Arc::new(FakeUsers::standard()),
            mounts: stager,
            background: r.background.clone(),
        },
        LauncherSettings {
            allowed_mount_prefixes: vec!["/tmp".into()],
            pids_limit: 0,
            ..LauncherSettings::with_log_dir(r.dir.path().join("logs"))
        },
    )
    .unwrap();
    let mut s = spec(None);
    s.mounts = vec!["/tmp/data:/data".parse().unwrap()];
    let e = launcher.launch(ROOT, s).await.unwrap_err();
    assert!(matches!(e, LaunchError::Staging(_)), "{e}");
    assert!(e.to_string().contains("/tmp/data"), "{e}");
    assert!(launcher.tasks(ROOT, true).await.unwrap().is_empty());
    assert_eq!(calls(&r, "RunPodSandbox"), 0, "nothing was created");
}

#[tokio::test(start_paused = true)]
async fn cancel_and_time_limit_stop_the_container() {
    let r = rig();
    *r.tasks.script.lock().unwrap() = Some(Script {
        runs_for: Duration::from_secs(30),
        exit_code: 0,
    });
    let (task, rx) = r.launcher.launch(ROOT, spec(None)).await.unwrap();
    let waiter = tokio::spawn(events(rx));
    // Cancelled once it runs: a cancel before the start would end it without an exit.
    wait_for_state(&r.launcher, &task.id, TaskState::Running).await;
    r.launcher.cancel(ROOT, &task.id).await.unwrap();
    let evs = waiter.await.unwrap();
    assert!(
        evs.contains(&Event::Exited {
            exit_code: 143,
            signal: Some(15),
            reason: ExitReason::Cancelled
        }),
        "{evs:?}"
    );
    assert_eq!(
        r.launcher.task(ROOT, &task.id).await.unwrap().state,
        TaskState::Cancelled
    );

    let mut s = spec(None);
    s.timeout = Some(Duration::from_millis(50));
    let (task, rx) = r.launcher.launch(ROOT, s).await.unwrap();
    let evs = events(rx).await;
    assert!(
        evs.iter()
            .any(|e| matches!(e, Event::Exited { reason, .. } if *reason == ExitReason::ExceededTimeLimit)),
        "{evs:?}"
    );
    assert_eq!(
        r.launcher.task(ROOT, &task.id).await.unwrap().state,
        TaskState::TimedOut
    );
    assert_eq!(r.tasks.pod_count(), 0);
}

#[tokio::test]
async fn steps_of_a_job_share_one_pod_until_the_job_ends() {
    let r = rig();
    *r.tasks.script.lock().unwrap() = Some(Script {
        runs_for: Duration::from_millis(100),
        exit_code: 0,
    });
    let (a, rxa) = r.launcher.launch(ALICE, spec(Some("job7"))).await.unwrap();
    let (b, rxb) = r.launcher.launch(ALICE, spec(Some("job7"))).await.unwrap();
    assert_eq!((a.step, b.step), (0, 1));
    let (ea, eb) = tokio::join!(events(rxa), events(rxb));
    let sandbox = |evs: &[Event]| {
        evs.iter().find_map(|e| match e {
            Event::SandboxReady { sandbox_id } => Some(sandbox_id.clone()),
            _ => None,
        })
    };
    assert_eq!(sandbox(&ea), sandbox(&eb));
    assert_eq!(r.tasks.pod_count(), 1, "the pod outlives the steps");
    assert_eq!(calls(&r, "RunPodSandbox"), 1);
    // Bob may not add steps to, see, or end Alice's job: whatever he names, his job ids are
    // his own (`u1001.…`), and Alice's is `u1000.job7`.
    assert_eq!(a.job, "u1000.job7");
    assert!(matches!(
        r.launcher.end_job(BOB, "job7").await,
        Err(LaunchError::NotFound { .. })
    ));
    assert!(r.launcher.end_job(BOB, "u1000.job7").await.is_err());
    assert!(r.launcher.task(BOB, &a.id).await.is_err());
    assert!(r.launcher.tasks(BOB, true).await.unwrap().is_empty());
    let (bobs, rx) = r
        .launcher
        .launch(BOB, spec(Some("u1000.job7")))
        .await
        .unwrap();
    assert_eq!(bobs.job, "u1001.u1000.job7");
    assert_ne!(sandbox(&events(rx).await), sandbox(&ea), "not Alice's pod");
    assert_eq!(r.tasks.pod_count(), 2);
    assert_eq!(r.launcher.tasks(ALICE, true).await.unwrap().len(), 2);
    r.launcher.end_job(ALICE, "job7").await.unwrap();
    r.launcher.end_job(BOB, "u1000.job7").await.unwrap();
    assert_eq!(r.tasks.pod_count(), 0);
}

#[tokio::test]
async fn recovery_reattaches_running_tasks_and_sweeps_orphans() {
    let r = rig();
    *r.tasks.script.lock().unwrap() = Some(Script {
        runs_for: Duration::from_millis(300),
        exit_code: 7,
    });
    let task = launch_then_crash(&r, spec(None), |e| *e == Event::Started).await;
    let mut ours = r.launcher.ours();
    ours.insert(LABEL_JOB.into(), "ghost".into());
    r.tasks.add_pod(ours);
    let foreign = r.tasks.add_pod(BTreeMap::from([
        (LABEL_MANAGED.to_string(), "true".to_string()),
        (LABEL_INSTANCE.to_string(), "someone-else".to_string()),
    ]));
    let again = launcher_over(&r, r.tasks.clone());
    let report = again.recover().await.unwrap();
    assert_eq!(
        (report.reattached, report.orphan_pods),
        (1, 1),
        "{report:?}"
    );
    for _ in 0..200 {
        if again.task(ROOT, &task.id).await.unwrap().cleaned {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t = again.task(ROOT, &task.id).await.unwrap();
    assert_eq!((t.state, t.exit_code), (TaskState::Exited, Some(7)));
    let left = r.tasks.list_pods(&BTreeMap::new()).await.unwrap();
    assert_eq!(
        left.iter().map(|p| p.id.clone()).collect::<Vec<_>>(),
        vec![foreign]
    );
}

#[tokio::test]
async fn shutdown_leaves_running_steps_running_and_ends_their_streams() {
    let r = rig();
    *r.tasks.script.lock().unwrap() = Some(Script {
        runs_for: Duration::from_secs(30),
        exit_code: 0,
    });
    let (task, rx) = r.launcher.launch(ROOT, spec(Some("long"))).await.unwrap();
    let waiter = tokio::spawn(events(rx));
    wait_for_state(&r.launcher, &task.id, TaskState::Running).await;
    r.background.begin_shutdown();
    assert_eq!(
        r.background.wait(Duration::from_secs(5)).await,
        0,
        "every tracked task ends promptly"
    );
    let evs = tokio::time::timeout(Duration::from_secs(1), waiter)
        .await
        .expect("the event stream ends")
        .unwrap();
    assert!(!evs.iter().any(|e| matches!(e, Event::Exited { .. })));
    // The step is the user's: still running, recorded as running, for the next start.
    assert_eq!(r.tasks.container_count(), 1);
    let t = r.launcher.task(ROOT, &task.id).await.unwrap();
    assert_eq!((t.state, t.cleaned), (TaskState::Running, false));
}

#[tokio::test(start_paused = true)]
async fn a_runtime_restarting_under_a_running_step_does_not_lose_it() {
    let r = rig();
    *r.tasks.script.lock().unwrap() = Some(Script {
        runs_for: Duration::from_millis(3000),
        exit_code: 0,
    });
    let (task, rx) = r.launcher.launch(ROOT, spec(None)).await.unwrap();
    let waiter = tokio::spawn(events(rx));
    wait_for_state(&r.launcher, &task.id, TaskState::Running).await;
    // The runtime goes away for a while (longer than 50 polls) and comes back.
    r.tasks
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    r.tasks
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    waiter.await.unwrap();
    let t = r.launcher.task(ROOT, &task.id).await.unwrap();
    assert_eq!(
        (t.state, t.exit_code),
        (TaskState::Exited, Some(0)),
        "{t:?}"
    );
}
