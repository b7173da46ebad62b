//! Job steps are confined: a step has the rights of its host user and nothing more. Run against
//! the testbed's real containerd and runc, with images built here that try what a hostile user
//! would: a setuid-root binary, an /etc/group that adds the user to `disk`, devices and job ids
//! that are not theirs.

mod common;

use common::images::Layer;
use common::*;

/// A static probe that prints the identity and privileges it ends up with.
const PROBE_C: &str = r#"
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(void) {
    char line[256];
    FILE *f = fopen("/proc/self/status", "r");
    printf("euid=%d\n", (int)geteuid());
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "CapEff:", 7) || !strncmp(line, "NoNewPrivs:", 11) ||
            !strncmp(line, "Seccomp:", 8))
            fputs(line, stdout);
    return 0;
}
"#;

/// Builds the probe (static, so the image needs no C library).
fn probe() -> Vec<u8> {
    static_c(PROBE_C)
}

/// busybox with the files of `extra` on top.
fn image_with(d: &Daemon, prefix: &str, extra: Vec<(String, Vec<u8>, u32)>) -> String {
    d.testbed
        .push_new(prefix, &[Layer::busybox(), Layer(extra)])
        .reference
}

fn job_id(prefix: &str) -> String {
    format!("{prefix}-{:06x}", rand::random::<u32>() & 0xffffff)
}

#[test]
fn a_setuid_root_binary_in_the_image_raises_nothing() {
    let d = Daemon::start("");
    let img = image_with(&d, "suid", vec![("bin/probe".into(), probe(), 0o4755)]);
    let out = run(&d, &["--image", &img, "--user", "nobody"], &["/bin/probe"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("euid=65534"), "{text}");
    assert!(text.contains("CapEff:\t0000000000000000"), "{text}");
    assert!(text.contains("NoNewPrivs:\t1"), "{text}");
    assert!(
        text.contains("Seccomp:\t2"),
        "runtime default seccomp: {text}"
    );
}

#[test]
fn a_step_as_root_cannot_reach_the_kernels_settings() {
    let d = Daemon::start("");
    let img = busybox(&d.testbed);
    let out = run(
        &d,
        &["--image", &img],
        &["sh", "-c", "awk '{ print $5, $6 }' /proc/self/mountinfo"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let mounted = |path: &str| {
        text.lines()
            .rev()
            .find(|l| l.split(' ').next() == Some(path))
            .map(|l| l.split(' ').nth(1).unwrap_or("").to_owned())
    };
    // What this kernel has of kubelet's default paths must be covered inside.
    let exists = |p: &&&str| std::path::Path::new(p).exists();
    for path in cimage::cri::READONLY_PATHS.iter().filter(exists) {
        let options = mounted(path).unwrap_or_else(|| panic!("{path} not remounted: {text}"));
        assert!(options.split(',').any(|o| o == "ro"), "{path}: {options}");
    }
    let masked: Vec<&&str> = cimage::cri::MASKED_PATHS.iter().filter(exists).collect();
    assert!(!masked.is_empty());
    for path in masked {
        assert!(mounted(path).is_some(), "{path} not masked: {text}");
    }
}

#[test]
fn groups_from_the_images_etc_group_refuse_the_step_and_leave_nothing() {
    let d = Daemon::start("");
    let img = image_with(
        &d,
        "groups",
        vec![
            (
                "etc/passwd".into(),
                b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n".to_vec(),
                0o644,
            ),
            (
                "etc/group".into(),
                b"root:x:0:\ndisk:x:6:nobody\nshadow:x:42:nobody\n".to_vec(),
                0o644,
            ),
        ],
    );
    let job = job_id("groups");
    let out = run(
        &d,
        &["--image", &img, "--user", "nobody", "--job", &job],
        &["id", "-G"],
    );
    assert_eq!(out.status.code(), Some(125), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("adds groups [6, 42]"), "{err}");
    assert!(job_pods(&d, &job).is_empty(), "no pod left behind");
}

#[test]
fn a_step_has_exactly_its_host_users_groups() {
    let d = Daemon::start("");
    let img = busybox(&d.testbed);
    let out = run(
        &d,
        &["--image", &img, "--user", "cimage-test"],
        &["id", "-G"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut inside: Vec<u32> = stdout(&out)
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect();
    inside.sort_unstable();
    let host = host_groups("cimage-test");
    assert!(
        host.len() >= 3,
        "the test user has supplementary groups: {host:?}"
    );
    assert_eq!(inside, host);
    let out = run(
        &d,
        &["--image", &img, "--user", "no-such-user-cimage"],
        &["true"],
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("does not exist on this node"),
        "{}",
        stderr(&out)
    );
}

/// The host groups of `user`, sorted.
fn host_groups(user: &str) -> Vec<u32> {
    let host = std::process::Command::new("id")
        .args(["-G", user])
        .output()
        .unwrap();
    let mut host: Vec<u32> = stdout(&host)
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect();
    host.sort_unstable();
    host
}

#[test]
fn an_etc_group_that_renames_gids_changes_no_group_of_the_step() {
    // runc looks supplementary gids up by name or number: a line named "100" with gid 6 would
    // turn the host group users (100) into disk (6). The image's file is never read.
    let d = Daemon::start("");
    let img = image_with(
        &d,
        "renames",
        vec![(
            "etc/group".into(),
            b"100:x:6:\n44:x:42:\nroot:x:0:\n".to_vec(),
            0o644,
        )],
    );
    let host = host_groups("cimage-test");
    assert!(host.contains(&100) && host.contains(&44), "{host:?}");
    let out = run(
        &d,
        &["--image", &img, "--user", "cimage-test"],
        &[
            "sh",
            "-c",
            "id -G; cat /etc/group; awk '$5 == \"/etc/group\" { print $6 }' /proc/self/mountinfo",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    let mut inside: Vec<u32> = lines
        .next()
        .unwrap()
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect();
    inside.sort_unstable();
    assert_eq!(inside, host, "{text}");
    assert!(text.contains("users:x:100:cimage-test"), "{text}");
    assert!(!text.contains("100:x:6"), "{text}");
    let options = text.lines().last().unwrap();
    assert!(
        options.split(',').any(|o| o == "ro"),
        "mounted read-only: {text}"
    );
}

#[test]
fn an_image_whose_etc_group_is_a_symlink_runs_no_step_as_a_user() {
    // The link would send cimage's /etc/group into the pod's /dev/shm, where the job's own
    // file then covers it, and runc would read that.
    let d = Daemon::start("");
    let img = image_with(&d, "grouplink", vec![]);
    let linked = d
        .testbed
        .push_new(
            "grouplink",
            &[
                Layer::busybox(),
                Layer(vec![(
                    "etc/group".into(),
                    b"/dev/shm/group".to_vec(),
                    0o120777,
                )]),
            ],
        )
        .reference;
    let job = job_id("grouplink");
    let out = run(
        &d,
        &["--image", &linked, "--user", "cimage-test", "--job", &job],
        &["id", "-G"],
    );
    assert_eq!(out.status.code(), Some(125), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("/etc/group is a symlink to /dev/shm/group"),
        "{err}"
    );
    assert!(job_pods(&d, &job).is_empty(), "nothing left");
    // The same step from a plain image runs.
    let out = run(&d, &["--image", &img, "--user", "cimage-test"], &["true"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn only_allowed_device_nodes_reach_a_step() {
    let d = Daemon::start("Launcher.AllowedDevices: [/dev/null, \"nvidia.com/gpu=*\"]");
    let img = busybox(&d.testbed);
    for (device, want) in [
        ("/dev/zero", "AllowedDevices"),
        ("/dev", "not a character or block device"),
        ("nvidia.com/gpu=0", "does not support CDI"),
    ] {
        let job = job_id("dev");
        let out = run(
            &d,
            &["--image", &img, "--job", &job, "--device", device],
            &["true"],
        );
        assert_eq!(out.status.code(), Some(125), "{device}");
        assert!(stderr(&out).contains(want), "{device}: {}", stderr(&out));
        assert!(job_pods(&d, &job).is_empty(), "{device}: nothing created");
    }
    let out = run(
        &d,
        &["--image", &img, "--user", "nobody", "--device", "/dev/null"],
        &["sh", "-c", "echo x > /dev/null && echo ok"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "ok\n");
}

#[test]
fn users_launch_only_when_the_node_allows_it_and_cannot_squat_a_job() {
    let nobody = Some((65534, 65534));
    let d = Daemon::start("SocketGroup: nogroup");
    let img = busybox(&d.testbed);
    let out = d.cli_as(nobody, &["run", "--image", &img, "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("AllowUserLaunch"), "{}", stderr(&out));
    drop(d);

    let d = Daemon::start("SocketGroup: nogroup\nLauncher.AllowUserLaunch: true");
    let job = job_id("slurm");
    // The user asks for the id the scheduler will use next: the job is the user's, in a space
    // of its own.
    let out = d.cli_as(
        nobody,
        &[
            "run", "--detach", "--job", &job, "--image", &img, "--", "sleep", "300",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).trim().is_empty());
    wait_for_running(&d, stdout(&out).trim());
    let users = format!("u65534.{job}");
    assert_eq!(job_pods(&d, &users).len(), 1);
    // The scheduler's step for another user under that id runs, in a pod of its own.
    let out = run(
        &d,
        &["--job", &job, "--image", &img, "--user", "daemon"],
        &["true"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(job_pods(&d, &job).len(), 1);
    // The user's end-job of that id ends the user's job, not the scheduler's.
    assert!(d.cli_as(nobody, &["end-job", &job]).status.success());
    assert!(job_pods(&d, &users).is_empty());
    assert_eq!(
        job_pods(&d, &job).len(),
        1,
        "the scheduler's job is not the user's to end"
    );
    assert!(d.cli(&["end-job", &job]).status.success());
    assert!(job_pods(&d, &job).is_empty());
}

#[test]
fn job_ids_cannot_be_squatted_probed_or_listed() {
    let nobody = Some((65534, 65534));
    let d = Daemon::start("SocketGroup: nogroup\nLauncher.AllowUserLaunch: true");
    let img = busybox(&d.testbed);
    let job = job_id("slurm");
    // The scheduler's job exists; the user's probe of it and of an id nobody has get one
    // answer (naming the user's own space), and the user's own job of that id is another.
    let out = run(
        &d,
        &["--detach", "--job", &job, "--image", &img],
        &["sleep", "300"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for_running(&d, stdout(&out).trim());
    let probe = |id: &str| {
        let out = d.cli_as(nobody, &["end-job", id]);
        assert!(!out.status.success());
        stderr(&out)
    };
    let none = format!("{job}-none");
    assert_eq!(
        probe(&job).replace(&job, "ID"),
        probe(&none).replace(&none, "ID")
    );
    assert!(
        probe(&job).contains(&format!("no job u65534.{job}")),
        "{}",
        probe(&job)
    );
    let out = d.cli_as(
        nobody,
        &["run", "--job", &job, "--image", &img, "--", "true"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(job_pods(&d, &job).len(), 1, "the scheduler's pod alone");
    // Nobody else lists the job and task ids in the log directory.
    let logs = d.dir.path().join("supervisor/containers");
    let mode = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&logs), 0o711, "{}", logs.display());
    assert_eq!(mode(&logs.join(&job)), 0o700);
    let ls = {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("ls")
            .arg(&logs)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    assert!(!ls.status.success(), "listed: {}", stdout(&ls));
    assert!(d.cli(&["end-job", &job]).status.success());
    // The user's own job of that id is the user's to end, and its pod goes with it.
    let out = d.cli_as(nobody, &["end-job", &job]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(job_pods(&d, &format!("u65534.{job}")).is_empty());
}

/// A directory under the daemon's allowed mount prefix, owned by `uid` with `mode`.
fn scratch_dir(d: &Daemon, name: &str, uid: u32, mode: u32) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = d.dir.path().join("scratch").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(uid), Some(uid)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
    dir
}

#[test]
fn swapping_a_mount_source_for_a_symlink_after_the_launch_never_mounts_the_target() {
    let nobody = Some((65534, 65534));
    let d = Daemon::start("SocketGroup: nogroup\nLauncher.AllowUserLaunch: true");
    let img = busybox(&d.testbed);
    let base = scratch_dir(&d, "swap", 65534, 0o755);
    for i in 0..20 {
        let src = base.join(format!("d{i}"));
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("marker"), "checked").unwrap();
        let m = format!("{}:/data:ro", src.display());
        let out = d.cli_as(
            nobody,
            &[
                "run",
                "--detach",
                "--image",
                &img,
                "--mount",
                &m,
                "--",
                "sh",
                "-c",
                "sleep 0.3; ls /data",
            ],
        );
        assert!(out.status.success(), "{i}: {}", stderr(&out));
        let task = stdout(&out).trim().to_owned();
        // Even runs swap as soon as the launch is accepted, odd ones once the container exists
        // and runs: the checked directory becomes a link to /etc.
        if i % 2 == 1 {
            wait_for_running(&d, &task);
        }
        std::fs::rename(&src, base.join(format!("d{i}.real"))).unwrap();
        std::os::unix::fs::symlink("/etc", &src).unwrap();
        let mut listing = String::new();
        for _ in 0..200 {
            let logs = d.cli_as(nobody, &["logs", &task]);
            listing = stdout(&logs);
            if listing.contains("marker") || listing.contains("passwd") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(listing.contains("marker"), "{i}: {listing}");
        assert!(
            !listing.contains("passwd"),
            "{i}: the link target was mounted: {listing}"
        );
    }
    wait_until_idle(&d);
}

/// Waits until a task's container runs.
fn wait_for_running(d: &Daemon, task: &str) {
    for _ in 0..400 {
        let ps: serde_json::Value =
            serde_json::from_slice(&d.cli(&["ps", "-a", "-o", "json"]).stdout).unwrap();
        let state = ps
            .as_array()
            .and_then(|a| a.iter().find(|t| t["id"] == task))
            .map(|t| t["state"].as_str().unwrap_or("").to_owned());
        if state.as_deref() == Some("running") {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("task {task} never ran");
}

/// Waits until the daemon runs no task (so that none outlives the test).
fn wait_until_idle(d: &Daemon) {
    for _ in 0..400 {
        let ps: serde_json::Value =
            serde_json::from_slice(&d.cli(&["ps", "-o", "json"]).stdout).unwrap();
        if ps.as_array().is_some_and(|a| a.is_empty()) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("tasks still running");
}

#[test]
fn a_mount_source_is_checked_with_the_step_users_own_permissions() {
    let nobody = Some((65534, 65534));
    let d = Daemon::start("SocketGroup: nogroup\nLauncher.AllowUserLaunch: true");
    let img = busybox(&d.testbed);
    // Another user's private directory holding a world-readable file.
    let private = scratch_dir(&d, "private", 1, 0o700);
    std::fs::write(private.join("secret.txt"), "not yours").unwrap();
    let m = format!("{}:/s:ro", private.join("secret.txt").display());
    let out = d.cli_as(
        nobody,
        &["run", "--image", &img, "--mount", &m, "--", "cat", "/s"],
    );
    assert_eq!(out.status.code(), Some(125), "{}", stdout(&out));
    assert!(stderr(&out).contains("not searchable"), "{}", stderr(&out));
    // Readable but not writable: read-only works, read-write is refused.
    let shared = scratch_dir(&d, "shared", 1, 0o755);
    std::fs::write(shared.join("f"), "readable").unwrap();
    let ro = format!("{}:/s:ro", shared.display());
    let out = d.cli_as(
        nobody,
        &["run", "--image", &img, "--mount", &ro, "--", "cat", "/s/f"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "readable");
    let rw = format!("{}:/s", shared.display());
    let out = d.cli_as(
        nobody,
        &["run", "--image", &img, "--mount", &rw, "--", "true"],
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("may not write it"),
        "{}",
        stderr(&out)
    );
    // Her own directory is writable through a read-write mount, and a read-only mount of it
    // is read-only inside.
    let own = scratch_dir(&d, "own", 65534, 0o755);
    let (rw, ro) = (
        format!("{}:/w", own.display()),
        format!("{}:/r:ro", own.display()),
    );
    let out = d.cli_as(
        nobody,
        &[
            "run",
            "--image",
            &img,
            "--mount",
            &rw,
            "--mount",
            &ro,
            "--",
            "sh",
            "-c",
            "echo hi > /w/made && cat /r/made && (echo no > /r/other 2>/dev/null || echo refused) \
             && awk '$5 == \"/w\" || $5 == \"/r\" { print $5, $6 }' /proc/self/mountinfo",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("hi\nrefused\n"), "{text}");
    // Neither honours a setuid bit or a device node; /r is read-only.
    for line in text.lines().skip(2) {
        let options: Vec<&str> = line.split(' ').nth(1).unwrap().split(',').collect();
        assert!(
            options.contains(&"nosuid") && options.contains(&"nodev"),
            "{line}"
        );
        assert_eq!(options.contains(&"ro"), line.starts_with("/r "), "{line}");
    }
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(!own.join("other").exists());
    // Root, for whom the same private file is reachable, gets it.
    let out = run(&d, &["--image", &img, "--mount", &m], &["cat", "/s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "not yours");
}
