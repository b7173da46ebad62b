//! Confinement: privileges, host groups, who may launch and join, devices, launch shares.

use std::time::Duration;

use super::*;

#[tokio::test]
async fn a_user_step_runs_with_no_privileges_and_exactly_its_host_groups() {
    let r = rig();
    let (_, rx) = r.launcher.launch(ALICE, spec(None)).await.unwrap();
    events(rx).await;
    let (_, rx) = r.launcher.launch(ROOT, spec(None)).await.unwrap();
    events(rx).await;
    let created = r.tasks.created.lock().unwrap().clone();
    let alice = &created[0];
    assert_eq!(
        (alice.run_as_user, alice.run_as_group),
        (Some(1000), Some(1000))
    );
    assert_eq!(alice.supplemental_groups, vec![27]);
    assert!(alice.no_new_privileges && alice.drop_all_capabilities);
    // The image's account of users and groups is covered by the host's, read-only.
    let etc: Vec<(&str, bool)> = alice
        .mounts
        .iter()
        .map(|m| (m.container_path.as_str(), m.readonly))
        .collect();
    assert_eq!(etc, [("/etc/passwd", true), ("/etc/group", true)]);
    let root = &created[1];
    assert_eq!(root.run_as_user, Some(0));
    assert!(!root.no_new_privileges && !root.drop_all_capabilities);
    assert!(
        root.mounts.is_empty(),
        "a root step keeps the image's files"
    );
}

#[tokio::test]
async fn groups_added_by_the_image_refuse_the_step_and_leave_nothing() {
    let r = rig();
    r.tasks.image_groups.lock().unwrap().push(6);
    let (task, rx) = r.launcher.launch(ALICE, spec(None)).await.unwrap();
    let evs = events(rx).await;
    assert!(
        evs.iter().any(|e| matches!(e, Event::Failed { stage: Stage::Create, message } if message.contains("adds groups [6]"))),
        "{evs:?}"
    );
    assert!(!evs.contains(&Event::Started));
    assert_eq!((r.tasks.pod_count(), r.tasks.container_count()), (0, 0));
    assert_eq!(
        r.launcher.task(ROOT, &task.id).await.unwrap().state,
        TaskState::Failed
    );
}

#[tokio::test]
async fn an_image_whose_etc_group_is_a_symlink_runs_no_step_as_a_user() {
    let r = rig();
    *r.tasks.etc.lock().unwrap() = Some(crate::runtime::EtcCheck::Redirected(
        "/etc/group is a symlink to /dev/shm/group".into(),
    ));
    let (_, rx) = r.launcher.launch(ALICE, spec(None)).await.unwrap();
    let evs = events(rx).await;
    assert!(
        evs.iter().any(|e| matches!(e, Event::Failed { stage: Stage::Create, message } if message.contains("/dev/shm/group"))),
        "{evs:?}"
    );
    assert!(!evs.contains(&Event::Started));
    assert_eq!((r.tasks.pod_count(), r.tasks.container_count()), (0, 0));
    // Root, which no group file can raise, still runs it.
    let (_, rx) = r.launcher.launch(ROOT, spec(None)).await.unwrap();
    assert!(events(rx).await.contains(&Event::Started));
}

#[tokio::test]
async fn users_launch_only_where_the_node_allows_it() {
    let r = rig_with(|s| s.allow_user_launch = false);
    let e = r.launcher.launch(ALICE, spec(None)).await.unwrap_err();
    assert!(e.to_string().contains("AllowUserLaunch"), "{e}");
    let (_, rx) = r.launcher.launch(ROOT, spec(None)).await.unwrap();
    events(rx).await;
    assert_eq!(calls(&r, "RunPodSandbox"), 1);
}

#[tokio::test]
async fn a_job_cannot_be_squatted_and_a_failed_first_step_leaves_no_claim() {
    let r = rig();
    *r.tasks.script.lock().unwrap() = Some(Script {
        runs_for: Duration::from_secs(30),
        exit_code: 0,
    });
    // Bob asks for the id a scheduler would use: he gets it in his own space.
    let (bobs, _rx) = r
        .launcher
        .launch(BOB, spec(Some("slurm-44")))
        .await
        .unwrap();
    assert_eq!(bobs.job, "u1001.slurm-44");
    wait_for_state(&r.launcher, &bobs.id, TaskState::Running).await;
    // The scheduler's step for Alice under that id is in a job of its own.
    *r.tasks.script.lock().unwrap() = None;
    let mut for_alice = spec(Some("slurm-44"));
    for_alice.user = Some("1000".parse().unwrap());
    let (sched, rx) = r.launcher.launch(ROOT, for_alice).await.unwrap();
    assert_eq!((sched.job.as_str(), sched.uid), ("slurm-44", 1000));
    assert!(events(rx).await.contains(&Event::Started));
    // Root may still put a step for Alice into Bob's job only as Bob's: no pod is shared.
    let mut into_bobs = spec(Some("u1001.slurm-44"));
    into_bobs.user = Some("1000".parse().unwrap());
    let e = r.launcher.launch(ROOT, into_bobs).await.unwrap_err();
    assert!(e.to_string().contains("runs its steps as uid 1001"), "{e}");
    // Alice cannot even name Bob's job: hers is another, and naming his in full is too.
    let (alices, rx) = r
        .launcher
        .launch(ALICE, spec(Some("u1001.slurm-44")))
        .await
        .unwrap();
    assert_eq!(alices.job, "u1000.u1001.slurm-44");
    events(rx).await;
    // A job root made for Bob in Alice's space is not hers to join: the same answer as for no
    // job at all, and not a word about whose it is.
    let mut planted = spec(Some("u1000.planted"));
    planted.user = Some("1001".parse().unwrap());
    *r.tasks.script.lock().unwrap() = Some(Script {
        runs_for: Duration::from_secs(30),
        exit_code: 0,
    });
    let (p, _rx) = r.launcher.launch(ROOT, planted).await.unwrap();
    wait_for_state(&r.launcher, &p.id, TaskState::Running).await;
    let joined = r.launcher.launch(ALICE, spec(Some("planted"))).await;
    let ended = r.launcher.end_job(ALICE, "nothing-here").await;
    let (joined, ended) = (
        joined.unwrap_err().to_string(),
        ended.unwrap_err().to_string(),
    );
    assert_eq!(joined, "no job u1000.planted");
    assert_eq!(ended, "no job u1000.nothing-here");
    assert!(!joined.contains("1001"));
    r.launcher.cancel(ROOT, &p.id).await.unwrap();
    r.launcher.cancel(BOB, &bobs.id).await.unwrap();

    // A first step that fails leaves the id free.
    let mut broken = spec(Some("j9"));
    broken.image = "127.0.0.1:5000/missing:1".into();
    let (_, rx) = r.launcher.launch(ALICE, broken).await.unwrap();
    events(rx).await;
    *r.tasks.script.lock().unwrap() = None;
    let (_, rx) = r.launcher.launch(BOB, spec(Some("j9"))).await.unwrap();
    let evs = events(rx).await;
    assert!(evs.contains(&Event::Started), "{evs:?}");
}

#[tokio::test]
async fn two_launches_racing_for_a_new_job_id_give_it_to_the_first_user_only() {
    // Both launches found the id free; the pods are made in order, and the second user's step
    // must not land in the first one's pod. (Users name jobs in spaces of their own; a race
    // for one id is between steps root launches, or a user's and root's in the user's space.)
    let r = rig();
    let users = FakeUsers::standard();
    let validated = |who: Principal, job: &str| {
        let id = run_as::resolve_identity(who, None, &users).unwrap();
        spec::validate(&spec(Some(job)), who, id, &spec::Rules::default()).unwrap()
    };
    // Root's step for Bob, in Alice's space, comes first.
    let mut for_bob = validated(ROOT, "u1000.slurm-45");
    for_bob.identity = validated(BOB, "x").identity;
    let (job, _) = r.launcher.ensure_sandbox(&for_bob).await.unwrap();
    assert_eq!(job.uid, 1001);
    let e = r
        .launcher
        .ensure_sandbox(&validated(ALICE, "slurm-45"))
        .await
        .unwrap_err();
    assert!(matches!(e, SandboxError::Denied(_)), "{e}");
    assert_eq!(e.to_string(), "no job u1000.slurm-45");
    assert_eq!(r.tasks.pod_count(), 1, "no second pod, no shared pod");
    let mut root_for_alice = validated(ROOT, "u1000.slurm-45");
    root_for_alice.identity = validated(ALICE, "x").identity;
    let e = r
        .launcher
        .ensure_sandbox(&root_for_alice)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("runs its steps as uid 1001"), "{e}");
}

#[tokio::test]
async fn devices_come_only_from_the_allow_list_and_cdi_needs_a_runtime_with_cdi() {
    let r = rig_with(|s| s.allowed_devices = vec!["/dev/null".into(), "nvidia.com/gpu=*".into()]);
    let mut s = spec(None);
    s.devices = vec!["/dev/null".into()];
    let (_, rx) = r.launcher.launch(ALICE, s).await.unwrap();
    events(rx).await;
    assert_eq!(r.tasks.created.lock().unwrap()[0].devices.len(), 1);
    for (d, want) in [
        ("/dev/zero", "AllowedDevices"),
        ("/dev", "not a character or block device"),
        ("nvidia.com/gpu=0", "does not support CDI"),
    ] {
        let mut s = spec(None);
        s.devices = vec![d.into()];
        let e = r.launcher.launch(ALICE, s).await.unwrap_err();
        assert!(e.to_string().contains(want), "{d}: {e}");
    }
    assert_eq!(
        r.tasks.created.lock().unwrap().len(),
        1,
        "nothing more was created"
    );
}

#[tokio::test]
async fn a_user_has_at_most_its_share_of_launches_in_flight() {
    let r = rig_with(|s| s.max_launches_per_user = 1);
    *r.tasks.script.lock().unwrap() = Some(Script {
        runs_for: Duration::from_secs(30),
        exit_code: 0,
    });
    let (first, _rx) = r.launcher.launch(ALICE, spec(None)).await.unwrap();
    let e = r.launcher.launch(ALICE, spec(None)).await.unwrap_err();
    assert!(e.to_string().contains("MaxLaunchesPerUser"), "{e}");
    // Others, and root, are not held back by Alice's share.
    let (b, _rxb) = r.launcher.launch(BOB, spec(None)).await.unwrap();
    let (c, _rxc) = r.launcher.launch(ROOT, spec(None)).await.unwrap();
    // A refused launch gave its reservation back; a finished one its place.
    r.launcher.cancel(ALICE, &first.id).await.unwrap();
    let mut again = None;
    for _ in 0..400 {
        if let Ok(x) = r.launcher.launch(ALICE, spec(None)).await {
            again = Some(x);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (again, _rx2) = again.expect("Alice's place comes back once her task has ended");
    for t in [&b.id, &c.id, &again.id] {
        r.launcher.cancel(ROOT, t).await.unwrap();
    }
}

#[tokio::test]
async fn an_image_with_volumes_runs_no_step_as_a_user_unless_the_runtime_ignores_them() {
    let r = rig();
    *r.tasks.image_volumes.lock().unwrap() = Some(vec!["/a/b/etc".into()]);
    for creates in [Some(true), None] {
        *r.tasks.creates_volumes.lock().unwrap() = creates;
        let (_, rx) = r.launcher.launch(ALICE, spec(None)).await.unwrap();
        let evs = events(rx).await;
        assert!(
            evs.iter().any(
                |e| matches!(e, Event::Failed { stage: Stage::Create, message }
                if message.contains("declares volumes [/a/b/etc]"))
            ),
            "{creates:?}: {evs:?}"
        );
        assert_eq!(calls(&r, "CreateContainer"), 0, "refused before creation");
    }
    // Root's step may have its image's volumes.
    let (_, rx) = r.launcher.launch(ROOT, spec(None)).await.unwrap();
    assert!(events(rx).await.contains(&Event::Started));
    // A runtime that ignores them runs the user's step, without the volume.
    *r.tasks.creates_volumes.lock().unwrap() = Some(false);
    let (_, rx) = r.launcher.launch(ALICE, spec(None)).await.unwrap();
    assert!(events(rx).await.contains(&Event::Started));
}

#[tokio::test]
async fn a_mount_that_lands_on_etc_through_the_images_symlinks_refuses_the_step() {
    let r = rig();
    // The image makes the runtime's /dev land on /etc (`/dev -> /etc`).
    r.tasks
        .landings
        .lock()
        .unwrap()
        .insert("/dev".into(), "/etc".into());
    let (_, rx) = r.launcher.launch(ALICE, spec(None)).await.unwrap();
    let evs = events(rx).await;
    assert!(
        evs.iter().any(
            |e| matches!(e, Event::Failed { stage: Stage::Create, message }
            if message.contains("mount target /dev lands on /etc"))
        ),
        "{evs:?}"
    );
    assert!(!evs.contains(&Event::Started));
    assert_eq!((r.tasks.pod_count(), r.tasks.container_count()), (0, 0));
    // Root has no identity files to protect: its step runs.
    let (_, rx) = r.launcher.launch(ROOT, spec(None)).await.unwrap();
    assert!(events(rx).await.contains(&Event::Started));
}

#[tokio::test]
async fn a_process_with_other_groups_on_the_host_is_killed_and_reported() {
    let r = rig();
    *r.tasks.script.lock().unwrap() = Some(Script {
        runs_for: Duration::from_secs(3600),
        exit_code: 0,
    });
    // Whatever the checks before the start missed: the process has gid 0 on the host.
    *r.tasks.host_groups.lock().unwrap() = Some(vec![0, 27]);
    let (task, rx) = r.launcher.launch(ALICE, spec(None)).await.unwrap();
    let evs = events(rx).await;
    assert!(
        evs.iter().any(
            |e| matches!(e, Event::Failed { stage: Stage::Start, message }
            if message.contains("groups [0, 27]") && message.contains("killed"))
        ),
        "{evs:?}"
    );
    assert!(!evs.contains(&Event::Started));
    assert_eq!(calls(&r, "StopContainer"), 1);
    assert_eq!(r.tasks.container_count(), 0);
    assert_eq!(
        r.launcher.task(ROOT, &task.id).await.unwrap().state,
        TaskState::Failed
    );
    // The same groups it was given: it runs (the check is no bar to a right step).
    *r.tasks.host_groups.lock().unwrap() = Some(vec![27, 1000]);
    *r.tasks.script.lock().unwrap() = None;
    let (_, rx) = r.launcher.launch(ALICE, spec(None)).await.unwrap();
    assert!(events(rx).await.contains(&Event::Started));
}

#[tokio::test]
async fn a_jobs_pod_lives_in_a_cgroup_of_cimages_with_the_process_limit() {
    let r = rig_with(|s| s.pids_limit = 64);
    *r.tasks.script.lock().unwrap() = Some(Script {
        runs_for: Duration::from_secs(3600),
        exit_code: 0,
    });
    let mut s = spec(Some("bounded"));
    s.cgroup_parent = Some("/crane/job_7".into());
    let (task, rx) = r.launcher.launch(ROOT, s).await.unwrap();
    let waiter = tokio::spawn(events(rx));
    wait_for_state(&r.launcher, &task.id, TaskState::Running).await;
    let jobs = r.launcher.jobs(ROOT, false).await.unwrap();
    let pod = &jobs.iter().find(|(j, _)| j.id == "bounded").unwrap().0.pod;
    let cgroup = pod.pod_cgroup.clone().unwrap();
    assert_eq!(cgroup, format!("/crane/job_7/cimage-{}", pod.uid));
    let pids_max = r
        .dir
        .path()
        .join("cgroup/pids")
        .join(&cgroup[1..])
        .join("pids.max");
    assert_eq!(std::fs::read_to_string(&pids_max).unwrap(), "64");
    // The job's end takes the cgroup with its pod (a cgroup's files go with its directory:
    // the stand-in's file is taken out first).
    std::fs::remove_file(&pids_max).unwrap();
    r.launcher.end_job(ROOT, "bounded").await.unwrap();
    waiter.await.unwrap();
    assert!(!pids_max.parent().unwrap().exists());
    // A systemd slice parent is the slice's to limit: no cgroup of cimage's.
    let mut s = spec(Some("sliced"));
    s.cgroup_parent = Some("crane-job_8.slice".into());
    let (task, rx) = r.launcher.launch(ROOT, s).await.unwrap();
    let waiter = tokio::spawn(events(rx));
    wait_for_state(&r.launcher, &task.id, TaskState::Running).await;
    let jobs = r.launcher.jobs(ROOT, false).await.unwrap();
    let (job, _) = jobs.iter().find(|(j, _)| j.id == "sliced").unwrap();
    assert_eq!(job.pod.pod_cgroup, None);
    r.launcher.end_job(ROOT, "sliced").await.unwrap();
    waiter.await.unwrap();
}
