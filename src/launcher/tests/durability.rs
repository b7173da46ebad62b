//! Durable intent across a crash: cancels carried out, interrupted steps recorded where they
//! stopped.

use std::time::Duration;

use super::*;

#[tokio::test]
async fn a_cancel_is_durable_before_it_is_acknowledged_and_carried_out_after_a_crash() {
    let r = rig();
    *r.tasks.script.lock().unwrap() = Some(Script {
        runs_for: Duration::from_secs(30),
        exit_code: 0,
    });
    let task = launch_then_crash(&r, spec(Some("durable")), |e| *e == Event::Started).await;
    // The cancel was acknowledged, and the daemon died before stopping the container.
    let store = super::store::TaskStore::open(&r.store).unwrap();
    store
        .put_intents(&[super::store::cancel_key(&task.id)], 1)
        .unwrap();
    assert_eq!(r.tasks.container_count(), 1);
    let again = launcher_over(&r, r.tasks.clone());
    again.recover().await.unwrap();
    for _ in 0..400 {
        if again.task(ROOT, &task.id).await.unwrap().cleaned {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = again.task(ROOT, &task.id).await.unwrap();
    assert_eq!((t.state, t.cleaned), (TaskState::Cancelled, true));
    assert!(
        store.intents().unwrap().is_empty(),
        "carried out, forgotten"
    );

    // And cancel() itself saves the intent before it answers.
    *r.tasks.script.lock().unwrap() = Some(Script {
        runs_for: Duration::from_secs(30),
        exit_code: 0,
    });
    let (t2, rx) = again.launch(ROOT, spec(None)).await.unwrap();
    let waiter = tokio::spawn(events(rx));
    wait_for_state(&again, &t2.id, TaskState::Running).await;
    again.cancel(ROOT, &t2.id).await.unwrap();
    assert!(store
        .intents()
        .unwrap()
        .contains(&super::store::cancel_key(&t2.id)));
    waiter.await.unwrap();
    assert!(store.intents().unwrap().is_empty());
}

#[tokio::test]
async fn a_step_interrupted_before_its_container_ran_is_recorded_where_it_stopped() {
    let r = rig();
    // Stuck making the image ready: the pull never finishes before the "crash".
    *r.rt.pull_delay.lock().unwrap() = Duration::from_secs(30);
    let mut s = spec(Some("stuck"));
    s.image = "127.0.0.1:5000/slow:1".into();
    r.rt.offer(&s.image, "sha256:slow", "sha256:ds", 10);
    let task = launch_then_crash(&r, s, |e| matches!(e, Event::SandboxReady { .. })).await;
    let again = launcher_over(&r, r.tasks.clone());
    again.recover().await.unwrap();
    let t = again.task(ROOT, &task.id).await.unwrap();
    let (stage, message) = t.failure.unwrap();
    assert_eq!(stage, "ImageReady", "{message}");
    assert!(message.contains("interrupted"), "{message}");
}

#[tokio::test]
async fn a_caller_that_goes_away_mid_launch_does_not_stop_it_half_way() {
    let r = rig();
    let stager = Arc::new(super::super::mounts::fake::CheckOnly::default());
    let launcher = Launcher::new(
        Parts {
            runtime: r.tasks.clone(),
            puller: r.puller.clone(),
            cache: r.cache.clone(),
            metrics: r.metrics.clone(),
            store: r.store.clone(),
            clock: Arc::new(SystemClock),
            users: Arc::new(FakeUsers::standard()),
            mounts: stager.clone(),
            background: r.background.clone(),
        },
        LauncherSettings {
            allow_user_launch: true,
            pids_limit: 0,
            ..LauncherSettings::with_log_dir(r.dir.path().join("logs"))
        },
    )
    .unwrap();
    // The request future is dropped after its first poll, while the launch is under way.
    let gone = tokio::time::timeout(Duration::ZERO, launcher.launch(ALICE, spec(None))).await;
    assert!(gone.is_err(), "dropped before it answered");
    let mut tasks = Vec::new();
    for _ in 0..500 {
        tasks = launcher.tasks(ROOT, true).await.unwrap();
        if tasks.iter().any(|t| t.state.is_final() && t.cleaned) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(tasks.len(), 1, "the launch went through: {tasks:?}");
    assert_eq!(tasks[0].state, TaskState::Exited);
    let files = stager.identity_files.lock().unwrap().clone();
    assert_eq!(files.len(), 1);
    assert!(files[0].2.contains(":x:27:alice"), "{}", files[0].2);
    assert_eq!(
        *stager.released.lock().unwrap(),
        [tasks[0].id.clone()],
        "what was staged for it was released"
    );
}
