//! The launcher against the real containerd (CRI), runc and registry of the testbed, through the
//! real cimaged and `cimage run`.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn task_json(d: &Daemon, id: &str) -> serde_json::Value {
    let out = d.cli(&["ps", "-a", "-o", "json"]);
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ps -o json");
    all.as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("task {id} not in ps -a"))
}

fn wait_state(d: &Daemon, id: &str, states: &[&str], within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let t = task_json(d, id);
        if states.iter().any(|s| t["state"] == *s) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "task {id} did not reach {states:?}: {t}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the task's container (and a one-off job's pod) has been removed.
fn wait_cleaned(d: &Daemon, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while task_json(d, id)["cleaned_up"] != true {
        assert!(
            Instant::now() < deadline,
            "not cleaned up: {}",
            task_json(d, id)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn exit_codes_and_signals_become_the_cli_exit_status() {
    let d = Daemon::start("");
    let img = busybox(&d.testbed);
    for (cmd, code) in [("exit 0", 0), ("exit 3", 3), ("kill -9 $$", 137)] {
        let out = run(&d, &["--image", &img], &["sh", "-c", cmd]);
        assert_eq!(out.status.code(), Some(code), "{cmd}: {}", stderr(&out));
    }
    let out = d.cli(&["ps", "-a", "-o", "json"]);
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let killed = all
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["exit_code"] == 137)
        .expect("killed task listed");
    assert_eq!(killed["signal"], 9);
    for key in ["id", "job", "step", "image", "state", "exit_code"] {
        assert!(killed.get(key).is_some(), "ps -o json lacks {key}");
    }
    assert_eq!(killed["state"], "exited");
}

#[test]
fn output_env_workdir_and_user_reach_the_container_and_the_log() {
    let d = Daemon::start("");
    let img = busybox(&d.testbed);
    let out = run(
        &d,
        &[
            "--image",
            &img,
            "--env",
            "GREETING=hello there",
            "--workdir",
            "/tmp",
            "--user",
            "daemon:5678",
        ],
        &[
            "sh",
            "-c",
            "echo \"$GREETING\"; pwd; id -u; id -g; echo to-stderr >&2",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello there\n/tmp\n1\n5678\n");
    assert!(stderr(&out).contains("to-stderr"), "{}", stderr(&out));

    let ps: serde_json::Value =
        serde_json::from_slice(&d.cli(&["ps", "-a", "-o", "json"]).stdout).unwrap();
    let task = &ps.as_array().unwrap()[0];
    let id = task["id"].as_str().unwrap();
    let logs = d.cli(&["logs", id]);
    assert_eq!(stdout(&logs), "hello there\n/tmp\n1\n5678\n");
    assert!(stderr(&logs).contains("to-stderr"));
    let file = std::fs::read_to_string(task["log_path"].as_str().unwrap()).unwrap();
    assert!(
        file.contains(" stdout F hello there") && file.contains(" stderr F to-stderr"),
        "{file}"
    );
}

#[test]
fn mounts_inside_the_allowed_prefixes_work_and_others_are_refused_before_anything_exists() {
    let d = Daemon::start("");
    let img = busybox(&d.testbed);
    let scratch = d.dir.path().join("scratch");
    std::fs::write(scratch.join("input.txt"), "from the host\n").unwrap();
    let mount = format!("{}:/data:ro", scratch.display());
    let out = run(
        &d,
        &["--image", &img, "--mount", &mount],
        &["cat", "/data/input.txt"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "from the host\n");

    let instance = d.instance();
    let before = cri_pods(&d.testbed, &[("io.cimage.instance", &instance)]);
    let outside = d.dir.path().join("secret");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, scratch.join("escape")).unwrap();
    for (src, why) in [
        (outside.clone(), "outside the allowed prefixes"),
        (scratch.join("escape"), "symbolic link"),
        (scratch.join("../secret"), ". or .."),
        (scratch.join("missing"), "does not exist"),
        (std::path::PathBuf::from("scratch/input"), "absolute"),
    ] {
        let m = format!("{}:/data", src.display());
        let out = run(
            &d,
            &["--job", "refused", "--image", &img, "--mount", &m],
            &["true"],
        );
        assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(why), "{}: {err}", src.display());
    }
    assert_eq!(
        cri_pods(&d.testbed, &[("io.cimage.instance", &instance)]),
        before
    );
    let ps: serde_json::Value =
        serde_json::from_slice(&d.cli(&["ps", "-a", "-o", "json"]).stdout).unwrap();
    assert!(
        ps.as_array().unwrap().iter().all(|t| t["job"] != "refused"),
        "refused launches leave no task"
    );
}

#[test]
fn cancel_stops_a_sleep_within_the_grace_period() {
    let d = Daemon::start("");
    let img = busybox(&d.testbed);
    let out = run(&d, &["--detach", "--image", &img], &["sleep", "300"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_owned();
    wait_state(&d, &id, &["running"], Duration::from_secs(20));
    let t0 = Instant::now();
    let out = d.cli(&["cancel", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let t = wait_state(&d, &id, &["cancelled"], Duration::from_secs(10));
    assert!(
        t0.elapsed() < Duration::from_secs(3 + 2),
        "took {:?} (grace 3s)",
        t0.elapsed()
    );
    assert!(t["exit_code"] == 143 || t["exit_code"] == 137, "{t}");
    wait_cleaned(&d, &id);
    assert!(job_pods(&d, t["job"].as_str().unwrap()).is_empty());
}

#[test]
fn a_time_limit_fires() {
    let d = Daemon::start("");
    let img = busybox(&d.testbed);
    let t0 = Instant::now();
    let out = run(&d, &["--image", &img, "--timeout", "1s"], &["sleep", "300"]);
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("exceeded its time limit"),
        "{}",
        stderr(&out)
    );
    assert!(t0.elapsed() < Duration::from_secs(20));
    let ps: serde_json::Value =
        serde_json::from_slice(&d.cli(&["ps", "-a", "-o", "json"]).stdout).unwrap();
    assert_eq!(ps[0]["state"], "timed_out");
}

#[test]
fn steps_of_one_job_share_the_pod_and_see_each_others_processes() {
    let d = Daemon::start("");
    let img = busybox(&d.testbed);
    let job = format!("job-{:06x}", rand::random::<u32>() & 0xffffff);
    let out = run(
        &d,
        &["--detach", "--job", &job, "--image", &img],
        &["sleep", "4321"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let first = stdout(&out).trim().to_owned();
    wait_state(&d, &first, &["running"], Duration::from_secs(20));
    let out = run(&d, &["--job", &job, "--image", &img], &["ps"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("sleep 4321"),
        "the second step sees the first's process:\n{}",
        stdout(&out)
    );
    assert_eq!(job_pods(&d, &job).len(), 1, "one pod for the job");
    let jobs: serde_json::Value =
        serde_json::from_slice(&d.cli(&["jobs", "-o", "json"]).stdout).unwrap();
    let j = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == job.as_str())
        .unwrap();
    assert_eq!(
        (j["tasks"].as_array().unwrap().len(), j["running"].as_u64()),
        (2, Some(1))
    );

    let out = d.cli(&["end-job", &job]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(task_json(&d, &first)["state"], "cancelled");
    assert!(job_pods(&d, &job).is_empty());
}

#[test]
fn an_image_that_cannot_be_pulled_fails_at_image_ready_and_leaves_no_pod() {
    let d = Daemon::start("");
    let job = format!("nopull-{:06x}", rand::random::<u32>() & 0xffffff);
    let missing = format!("{}/does-not-exist:1", d.testbed.registry);
    let out = run(&d, &["--job", &job, "--image", &missing], &["true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert!(
        err.contains("failed at ImageReady") && err.contains("does-not-exist:1"),
        "{err}"
    );
    assert!(job_pods(&d, &job).is_empty(), "no pod left behind");
}

#[test]
fn non_root_launches_only_as_itself_and_sees_only_its_tasks() {
    let d = Daemon::start("SocketGroup: nogroup\nLauncher.AllowUserLaunch: true");
    let img = busybox(&d.testbed);
    let nobody = Some((65534, 65534));
    let out = d.cli_as(nobody, &["run", "--image", &img, "--user", "0", "--", "id"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("may only launch as itself"),
        "{}",
        stderr(&out)
    );
    let out = d.cli_as(nobody, &["run", "--image", &img, "--", "id", "-u"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "65534\n");
    // Root's task is invisible to nobody, and nobody cannot cancel it.
    let out = run(&d, &["--detach", "--image", &img], &["sleep", "300"]);
    let root_task = stdout(&out).trim().to_owned();
    let ps: serde_json::Value =
        serde_json::from_slice(&d.cli_as(nobody, &["ps", "-a", "-o", "json"]).stdout).unwrap();
    assert!(
        ps.as_array().unwrap().iter().all(|t| t["uid"] == 65534),
        "{ps}"
    );
    let out = d.cli_as(nobody, &["cancel", &root_task]);
    assert!(
        !out.status.success() && stderr(&out).contains("no task"),
        "{}",
        stderr(&out)
    );
    assert!(d.cli(&["cancel", &root_task]).status.success());
    wait_state(&d, &root_task, &["cancelled"], Duration::from_secs(10));
}

#[test]
fn graceful_shutdown_finishes_cleanups_in_flight() {
    let mut d = Daemon::start("");
    let img = busybox(&d.testbed);
    let out = run(&d, &["--detach", "--image", &img], &["sleep", "300"]);
    let id = stdout(&out).trim().to_owned();
    wait_state(&d, &id, &["running"], Duration::from_secs(20));
    let job = task_json(&d, &id)["job"].as_str().unwrap().to_owned();
    assert!(d.cli(&["cancel", &id]).status.success());
    wait_state(&d, &id, &["cancelled"], Duration::from_secs(10));
    // SIGTERM right away: the daemon must not leave the one-off job's pod behind.
    let mut child = d.child.take().unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    let instance_pods = cri_pods(&d.testbed, &[("io.cimage.job", &job)]);
    assert!(
        instance_pods.is_empty(),
        "pod of {job} left: {instance_pods:?}"
    );
}

#[test]
fn after_kill_9_a_running_task_is_reattached_and_unknown_pods_are_removed() {
    let mut d = Daemon::start("");
    let img = busybox(&d.testbed);
    let out = run(
        &d,
        &["--detach", "--image", &img],
        &["sh", "-c", "sleep 3; echo done; exit 42"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_owned();
    wait_state(&d, &id, &["running"], Duration::from_secs(20));
    let instance = d.instance();
    d.kill9();

    // 10,000 finished steps of past jobs in the history (seeded through the store while the
    // daemon is down): recovery reads the live tasks, and still finds the running one.
    {
        use cimage::launcher::store::{TaskRecord, TaskState, TaskStore};
        let store = cimage::store::Store::open(&d.dir.path().join("state/index.redb")).unwrap();
        let past: Vec<TaskRecord> = (0..10_000)
            .map(|i| TaskRecord {
                id: format!("past{i:08}"),
                job: format!("past-job-{}", i / 10),
                step: i % 10,
                uid: 0,
                image: img.clone(),
                image_id: None,
                container_id: None,
                state: TaskState::Exited,
                exit_code: Some(0),
                signal: None,
                failure: None,
                log_path: d.dir.path().join("none.log"),
                created: 1,
                started: Some(1),
                finished: Some(2),
                timeout_ms: None,
                cleaned: true,
            })
            .collect();
        TaskStore::open(&store).unwrap().put_tasks(&past).unwrap();
    }

    // A pod of ours whose job the daemon never heard of, as a crash mid-launch would leave.
    let ghost = block_on(async {
        use k8s_cri::v1 as cri;
        let mut c = cri::runtime_service_client::RuntimeServiceClient::new(
            cimage::cri::unix_channel(&d.testbed.cri),
        );
        let labels = [
            ("io.cimage.managed", "true"),
            ("io.cimage.instance", instance.as_str()),
            ("io.cimage.job", "ghost"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "ghost".into(),
                uid: format!("{:x}", rand::random::<u64>()),
                namespace: "cimage".into(),
                attempt: 0,
            }),
            labels,
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        c.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id
    });
    assert!(ctr_containers(&d.testbed).contains(&ghost));

    d.spawn();
    let t = wait_state(&d, &id, &["exited"], Duration::from_secs(30));
    assert_eq!(t["exit_code"], 42, "{t}");
    assert_eq!(stdout(&d.cli(&["logs", &id])), "done\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while ctr_containers(&d.testbed).contains(&ghost) {
        assert!(
            Instant::now() < deadline,
            "orphan pod {ghost} was not removed:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_cleaned(&d, &id);
    assert!(cri_pods(&d.testbed, &[("io.cimage.instance", &instance)]).is_empty());
    assert!(d.log().contains("re-attaching"), "{}", d.log());
}

#[test]
fn time_limits_take_slurms_forms_and_nonsense_is_refused_before_anything_runs() {
    let d = Daemon::start("");
    let img = busybox(&d.testbed);
    for (flag, limit) in [
        ("--timeout", "1:30:00"),
        ("--time", "2-00"),
        ("--time", "UNLIMITED"),
    ] {
        let out = run(&d, &["--image", &img, flag, limit], &["true"]);
        assert!(out.status.success(), "{flag} {limit}: {}", stderr(&out));
    }
    for (limit, why) in [
        ("18446744073709552s", "longer than a year"),
        ("0", "UNLIMITED for none"),
        ("1:2:3:4", "not MINUTES"),
    ] {
        let out = run(&d, &["--image", &img, "--timeout", limit], &["true"]);
        assert_eq!(out.status.code(), Some(2), "{limit}: a usage error");
        assert!(stderr(&out).contains(why), "{limit}: {}", stderr(&out));
    }
    // A limit in Slurm's minutes form is a limit: 1:00 is one minute, so `sleep 2` finishes.
    let out = run(&d, &["--image", &img, "--time", "1:00"], &["sleep", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_cancel_acknowledged_before_a_kill_9_is_carried_out_after_the_restart() {
    let mut d = Daemon::start("");
    let img = busybox(&d.testbed);
    // Ignores SIGTERM: the stop takes the whole grace period (3 s here).
    let out = run(
        &d,
        &["--detach", "--image", &img],
        &["sh", "-c", "trap '' TERM; while true; do sleep 1; done"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_owned();
    wait_state(&d, &id, &["running"], Duration::from_secs(20));
    assert!(d.cli(&["cancel", &id]).status.success());
    d.kill9();
    d.spawn();
    let t = wait_state(
        &d,
        &id,
        &["cancelled", "exited", "failed"],
        Duration::from_secs(30),
    );
    assert_eq!(t["state"], "cancelled", "{t}");
}

#[test]
fn run_by_image_id_uses_the_local_image_without_any_registry_request() {
    let d = Daemon::start("");
    let img = busybox(&d.testbed);
    assert!(d.cli(&["pull", &img]).status.success());
    let out = d.cli(&["inspect", &img, "-o", "json"]);
    let id = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mark = d.testbed.registry_log_mark();
    for by in [
        id.clone(),
        id["sha256:".len().."sha256:".len() + 12].to_owned(),
    ] {
        let out = run(
            &d,
            &["--image", &by, "--policy", "Always"],
            &["echo", "by-id"],
        );
        assert!(out.status.success(), "{by}: {}", stderr(&out));
        assert_eq!(stdout(&out), "by-id\n");
    }
    assert!(
        d.testbed
            .registry_requests_since(mark, "busybox")
            .is_empty(),
        "no registry request for a run by id"
    );
    let absent = format!("sha256:{}", "0".repeat(64));
    let out = run(&d, &["--image", &absent], &["true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("never pulled"), "{}", stderr(&out));
}

#[test]
fn the_cli_says_so_when_cimaged_goes_away_while_a_step_runs() {
    let mut d = Daemon::start("");
    let img = busybox(&d.testbed);
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_cimage"))
        .args(["run", "--image", &img, "--", "sleep", "300"])
        .env("CIMAGE_SOCKET", d.socket())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        let ps: serde_json::Value =
            serde_json::from_slice(&d.cli(&["ps", "-o", "json"]).stdout).unwrap();
        if let Some(t) = ps.as_array().and_then(|a| a.first()) {
            if t["state"] == "running" {
                break t["id"].as_str().unwrap().to_owned();
            }
        }
        assert!(Instant::now() < deadline, "the step never ran");
        std::thread::sleep(Duration::from_millis(50));
    };
    d.kill9();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&id) && err.contains("may still be running"),
        "{err}"
    );
    // Back, the daemon re-attaches the step; then it is cancelled and nothing is left.
    d.spawn();
    wait_state(&d, &id, &["running"], Duration::from_secs(20));
    assert!(d.cli(&["cancel", &id]).status.success());
    wait_state(&d, &id, &["cancelled"], Duration::from_secs(20));
}
