//! Nothing in an image or a request changes which `/etc/group` runc reads a step's groups from.
//! runc resolves every mount target through the image's symlinks, and containerd 1.6 mounts
//! deeper paths later and creates an image's own `VOLUME`s: so an image with `/a/b -> /` and
//! `VOLUME /a/b/etc`, or a user's mount onto `/a/b/etc`, would cover cimaged's `/etc/group`
//! with one that maps a host group to gid 0. Run against the testbed's real containerd and runc
//! (whose CRI config keeps containerd's default: image volumes are created).

mod common;

use common::images::{push_with_volumes, Layer};
use common::*;

/// The test user (uid 999 on the testbed) and the host groups it has besides its own.
const USER: &str = "cimage-test";

fn user_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = std::process::Command::new("id")
            .args([flag, USER])
            .output()
            .unwrap();
        stdout(&out).trim().parse().unwrap()
    };
    (id("-u"), id("-g"))
}

/// An `/etc/group` that turns the host group `users` (100) into root's group: runc looks a
/// supplementary gid up by name or number and takes the gid of the first line that matches.
const HOSTILE_GROUP: &[u8] = b"100:x:0:\nroot:x:0:\n";

/// busybox, a symlink `a/b -> /`, and the hostile `/etc/group` in a layer on top.
fn hostile_layers() -> Vec<Layer> {
    vec![
        Layer::busybox(),
        Layer(vec![
            Layer::symlink("a/b", "/"),
            ("etc/group".into(), HOSTILE_GROUP.to_vec(), 0o644),
        ]),
    ]
}

fn push_volumes(d: &Daemon, prefix: &str, layers: &[Layer], volumes: &[&str]) -> String {
    let repo = Testbed::unique_repo(prefix);
    block_on(push_with_volumes(
        &d.testbed.registry,
        &repo,
        layers,
        &["sh"],
        volumes,
    ))
    .reference
}

fn job_id(prefix: &str) -> String {
    format!("{prefix}-{:06x}", rand::random::<u32>() & 0xffffff)
}

/// The `Groups:` line of a step's `/proc/self/status`, if it printed one.
fn groups_line(text: &str) -> Option<&str> {
    text.lines().find(|l| l.starts_with("Groups:"))
}

#[test]
fn an_image_volume_through_a_symlink_onto_etc_never_reaches_the_step() {
    // The scheduler's path: root launches a step as a host user, default config.
    let d = Daemon::start("");
    let img = push_volumes(&d, "volume-etc", &hostile_layers(), &["/a/b/etc"]);
    assert!(host_groups(USER).contains(&100));
    let job = job_id("volume-etc");
    let out = run(
        &d,
        &["--image", &img, "--user", USER, "--job", &job],
        &["sh", "-c", "id; grep -E '^(Groups|Gid):' /proc/self/status"],
    );
    let text = stdout(&out);
    assert!(
        groups_line(&text).is_none(),
        "the step ran: {text}{}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(125), "{text}");
    let err = stderr(&out);
    assert!(err.contains("declares volumes [/a/b/etc]"), "{err}");
    assert!(err.contains("ignore_image_defined_volumes"), "{err}");
    assert!(job_pods(&d, &job).is_empty(), "nothing left behind");
    // Root's own step from the same image is not a user's: it runs.
    let out = run(&d, &["--image", &img], &["true"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_benign_image_volume_refuses_a_step_as_a_user_and_says_why() {
    let d = Daemon::start("");
    let img = push_volumes(&d, "volume-data", &[Layer::busybox()], &["/data"]);
    let out = run(&d, &["--image", &img, "--user", USER], &["true"]);
    assert_eq!(out.status.code(), Some(125), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("declares volumes [/data]")
            && err.contains("ignore_image_defined_volumes = true"),
        "{err}"
    );
    // As root, the volume is created and the step runs.
    let out = run(
        &d,
        &["--image", &img],
        &["sh", "-c", "test -d /data && echo ok"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "ok\n");
}

/// A directory of the test user under the daemon's allowed mount prefix, holding `group`.
fn users_dir_with_group(d: &Daemon, name: &str, group: &[u8]) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let (uid, gid) = user_ids();
    let dir = d.dir.path().join("scratch").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("group"), group).unwrap();
    for p in [&dir, &dir.join("group")] {
        std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn a_users_mount_through_an_image_symlink_onto_etc_is_refused() {
    let (uid, gid) = user_ids();
    let d = Daemon::start(&format!(
        "SocketGroup: {gid}\nLauncher.AllowUserLaunch: true"
    ));
    let img = d
        .testbed
        .push_new(
            "mount-etc",
            &[Layer::busybox(), Layer(vec![Layer::symlink("a/b", "/")])],
        )
        .reference;
    let dir = users_dir_with_group(&d, "etc", HOSTILE_GROUP);
    let mount = format!("{}:/a/b/etc:ro", dir.display());
    let job = job_id("mount-etc");
    let out = d.cli_as(
        Some((uid, gid)),
        &[
            "run",
            "--image",
            &img,
            "--job",
            &job,
            "--mount",
            &mount,
            "--",
            "sh",
            "-c",
            "grep -E '^(Groups|Gid):' /proc/self/status",
        ],
    );
    let text = stdout(&out);
    assert!(groups_line(&text).is_none(), "the step ran: {text}");
    assert_eq!(out.status.code(), Some(125), "{text}");
    let err = stderr(&out);
    assert!(err.contains("mount target /a/b/etc lands on /etc"), "{err}");
    assert!(job_pods(&d, &job).is_empty(), "nothing left behind");
    // The same mount where the image has no symlink runs, with the user's host groups.
    let plain = busybox(&d.testbed);
    let out = d.cli_as(
        Some((uid, gid)),
        &[
            "run",
            "--image",
            &plain,
            "--mount",
            &mount,
            "--",
            "sh",
            "-c",
            "grep '^Groups:' /proc/self/status",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut inside: Vec<u32> = stdout(&out)
        .trim_start_matches("Groups:")
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect();
    inside.push(gid);
    inside.sort_unstable();
    inside.dedup();
    assert_eq!(inside, host_groups(USER));
}

#[test]
fn a_mount_through_the_pods_dev_shm_is_refused() {
    // The pod's /dev/shm is the job's to write: an earlier step leaves a symlink `e -> /etc`
    // there, and an image's `s/h -> /dev/shm` makes a later mount onto /s/h/e land on /etc.
    let d = Daemon::start("");
    let (uid, gid) = user_ids();
    let _ = (uid, gid);
    let job = job_id("shm");
    let plain = busybox(&d.testbed);
    let out = run(
        &d,
        &["--image", &plain, "--user", USER, "--job", &job],
        &["busybox", "ln", "-s", "/etc", "/dev/shm/e"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let img = d
        .testbed
        .push_new(
            "shm",
            &[
                Layer::busybox(),
                Layer(vec![Layer::symlink("s/h", "/dev/shm")]),
            ],
        )
        .reference;
    let dir = users_dir_with_group(&d, "shm", HOSTILE_GROUP);
    let mount = format!("{}:/s/h/e:ro", dir.display());
    let out = run(
        &d,
        &[
            "--image", &img, "--user", USER, "--job", &job, "--mount", &mount,
        ],
        &["sh", "-c", "grep -E '^(Groups|Gid):' /proc/self/status"],
    );
    let text = stdout(&out);
    assert!(groups_line(&text).is_none(), "the step ran: {text}");
    assert_eq!(out.status.code(), Some(125), "{text}");
    let err = stderr(&out);
    assert!(err.contains("mount target /s/h/e"), "{err}");
    assert!(err.contains("/dev/shm"), "{err}");
    assert!(d.cli(&["end-job", &job]).status.success());
}

#[test]
fn a_mount_under_etc_that_the_image_links_to_etc_group_is_refused() {
    // /etc/x is a fine target as text; the image makes it a symlink to /etc/group.
    let d = Daemon::start("");
    let img = d
        .testbed
        .push_new(
            "etc-x",
            &[
                Layer::busybox(),
                Layer(vec![Layer::symlink("etc/x", "group")]),
            ],
        )
        .reference;
    let dir = users_dir_with_group(&d, "etc-x", HOSTILE_GROUP);
    let mount = format!("{}:/etc/x:ro", dir.join("group").display());
    let out = run(
        &d,
        &["--image", &img, "--user", USER, "--mount", &mount],
        &["sh", "-c", "grep -E '^(Groups|Gid):' /proc/self/status"],
    );
    let text = stdout(&out);
    assert!(groups_line(&text).is_none(), "the step ran: {text}");
    assert_eq!(out.status.code(), Some(125), "{text}");
    let err = stderr(&out);
    assert!(
        err.contains("mount target /etc/x lands on /etc/group"),
        "{err}"
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
fn the_host_side_check_reads_a_user_steps_process() {
    // The second line of defence: after the start, the process's groups as the host sees
    // them. Here it must find the process (its pid from the runtime, its cgroup naming the
    // container) and agree with the step's host groups.
    let d = Daemon::start("");
    let img = busybox(&d.testbed);
    let out = run(
        &d,
        &["--detach", "--image", &img, "--user", USER],
        &["sleep", "300"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let task = stdout(&out).trim().to_owned();
    wait_for_state(&d, &task, "running");
    let log = d.log();
    assert!(
        log.contains("the step's process has its host credentials and groups"),
        "{log}"
    );
    assert!(d.cli(&["cancel", &task]).status.success());
    wait_for_state(&d, &task, "cancelled");
}

/// Waits until `cimage ps -a` shows `task` in `state`.
fn wait_for_state(d: &Daemon, task: &str, state: &str) {
    for _ in 0..600 {
        let ps: serde_json::Value =
            serde_json::from_slice(&d.cli(&["ps", "-a", "-o", "json"]).stdout).unwrap();
        let now = ps
            .as_array()
            .and_then(|a| a.iter().find(|t| t["id"] == task))
            .and_then(|t| t["state"].as_str().map(str::to_owned));
        if now.as_deref() == Some(state) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("task {task} never reached {state}");
}

#[test]
fn the_runtimes_own_mounts_are_checked_where_they_land_too() {
    // No request at all: the image alone sends the runtime's tmpfs /dev onto /etc, or the
    // runtime's /etc/hosts onto /etc/group.
    let d = Daemon::start("");
    for (name, link, to, landed) in [
        ("dev-etc", "dev", "/etc", "mount target /dev lands on /etc"),
        (
            "hosts-group",
            "etc/hosts",
            "group",
            "mount target /etc/hosts lands on /etc/group",
        ),
    ] {
        let img = d
            .testbed
            .push_new(
                name,
                &[Layer::busybox(), Layer(vec![Layer::symlink(link, to)])],
            )
            .reference;
        let out = run(
            &d,
            &["--image", &img, "--user", USER],
            &["sh", "-c", "grep -E '^(Groups|Gid):' /proc/self/status"],
        );
        let text = stdout(&out);
        assert!(groups_line(&text).is_none(), "{name}: the step ran: {text}");
        assert_eq!(out.status.code(), Some(125), "{name}: {text}");
        let err = stderr(&out);
        assert!(err.contains(landed), "{name}: {err}");
    }
}
