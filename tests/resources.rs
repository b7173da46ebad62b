//! Steps under the scheduler's limits: CPU quota and memory limit through CRI, a memory limit
//! passed reported as out of memory, the job's pod under a cgroup parent, and the CLI habits of
//! docker and Slurm users (`run IMAGE CMD`, `-v SRC:DST`, `--env-file`).

mod common;

use common::images::Layer;
use common::*;

/// A static program that takes 64 MiB of memory and touches every page.
const HOG_C: &str = r#"
#include <stdlib.h>
#include <stdio.h>
int main(void) {
    size_t n = 64u << 20, sum = 0;
    volatile char *p = malloc(n);
    if (!p) return 3;
    for (size_t i = 0; i < n; i += 4096) p[i] = 1;
    for (size_t i = 0; i < n; i += 4096) sum += p[i];
    printf("touched %zu pages\n", sum);
    return 0;
}
"#;

fn hog() -> Vec<u8> {
    static_c(HOG_C)
}

#[test]
fn a_step_past_its_memory_limit_is_reported_out_of_memory() {
    let d = Daemon::start("");
    let img = d
        .testbed
        .push_new(
            "oom",
            &[
                Layer::busybox(),
                Layer(vec![("bin/hog".into(), hog(), 0o755)]),
            ],
        )
        .reference;
    // Within the limit it runs to its end.
    let out = d.cli(&["run", "--memory", "256MiB", &img, "--", "/bin/hog"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("touched"));
    // Past it: killed and reported as out of memory.
    let out = d.cli(&[
        "run", "--events", "--memory", "32MiB", &img, "--", "/bin/hog",
    ]);
    assert_eq!(out.status.code(), Some(137), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("OutOfMemory") && err.contains("memory limit"),
        "{err}"
    );
    let ps = d.cli(&["ps", "-a", "-o", "json"]);
    let tasks: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
    assert!(
        tasks
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["state"] == "out_of_memory"),
        "{tasks}"
    );
    // Below what a container needs: refused before anything is created.
    let out = d.cli(&["run", "--memory", "1MiB", &img, "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("6 MiB"), "{}", stderr(&out));
}

#[test]
fn cpu_quota_and_the_cgroup_parent_reach_the_step() {
    let d = Daemon::start("");
    let img = busybox(&d.testbed);
    let parent = format!("/cimage-test-{:06x}", rand::random::<u32>() & 0xffffff);
    let out = d.cli(&[
        "run",
        "--cpus",
        "0.5",
        "--cgroup-parent",
        &parent,
        &img,
        "--",
        "sh",
        "-c",
        "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us; cat /proc/self/cgroup",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("50000"), "{text}");
    assert_eq!(lines.next(), Some("100000"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains(":memory:") && l.contains(&format!("{parent}/"))),
        "the pod is under {parent}: {text}"
    );
    // The empty parents runc made are the test's to remove.
    for ctl in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let _ = std::fs::remove_dir(ctl.path().join(parent.trim_start_matches('/')));
    }
    // A user may not place a job outside the allowed parents.
    let u = Daemon::start(
        "SocketGroup: nogroup\nLauncher.AllowUserLaunch: true\nLauncher.AllowedCgroupParents: [/crane]",
    );
    let out = u.cli_as(
        Some((65534, 65534)),
        &["run", "--cgroup-parent", "/elsewhere", &img, "--", "true"],
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("AllowedCgroupParents"),
        "{}",
        stderr(&out)
    );
    let out = u.cli(&["run", "--cpus", "0", &img, "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
}

#[test]
fn run_takes_the_image_first_and_volumes_and_env_files_as_docker_does() {
    let d = Daemon::start("");
    let img = busybox(&d.testbed);
    let scratch = d.dir.path().join("scratch");
    std::fs::write(scratch.join("hello"), "from the host\n").unwrap();
    let env_file = d.dir.path().join("env");
    std::fs::write(&env_file, "# a comment\n\nGREETING=hi\nOTHER=x\n").unwrap();
    let vol = format!("{}:/data:ro", scratch.display());
    let out = d.cli(&[
        "run",
        "-v",
        &vol,
        "--env-file",
        env_file.to_str().unwrap(),
        "-e",
        "OTHER=y",
        "--name",
        "greeter",
        "--rm",
        &img,
        "sh",
        "-c",
        "echo $GREETING $OTHER; cat /data/hello",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hi y\nfrom the host\n");
    let out = d.cli(&["run", &img, "--", "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.cli(&["run", "--time", "1:30:00", &img, "--", "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn exec_runs_a_command_in_a_running_step_as_its_user_for_its_owner_only() {
    let d = Daemon::start("SocketGroup: nogroup\nLauncher.AllowUserLaunch: true");
    let img = busybox(&d.testbed);
    let nobody = Some((65534, 65534));
    let out = d.cli_as(nobody, &["run", "-d", &img, "--", "sleep", "300"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let task = stdout(&out).trim().to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let ps = d.cli(&["ps", "-o", "json"]);
        let tasks: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
        if tasks
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == task.as_str() && t["state"] == "running")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never running: {tasks}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // As the step's user, for its owner and for root.
    for who in [nobody, None] {
        let out = d.cli_as(who, &["exec", &task, "--", "id", "-u"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), "65534\n");
    }
    // The command's own exit code and output streams.
    let out = d.cli_as(
        nobody,
        &[
            "exec",
            &task,
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 7",
        ],
    );
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(
        (stdout(&out).as_str(), stderr(&out).as_str()),
        ("out\n", "err\n")
    );
    // Another user: refused, as if the task did not exist.
    let out = d.cli_as(Some((65533, 65534)), &["exec", &task, "--", "id"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains(&format!("no task {task}")),
        "{}",
        stderr(&out)
    );
    let _ = d.cli(&["cancel", &task]);
}
