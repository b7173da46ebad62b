//! Hostile input through the raw API, past the CLI's own checks: it is refused with a short,
//! one-line error, and nothing of it reaches the log as a line of its own.

mod common;

use cimage::api::pb;
use common::*;

fn pull_raw(d: &Daemon, image: &str) -> tonic::Status {
    block_on(async {
        cimage::api::client(&d.socket())
            .pull(pb::PullRequest {
                image: image.to_owned(),
                policy: pb::PullPolicy::IfNotPresent as i32,
                credentials: None,
            })
            .await
            .expect_err("a hostile reference must be refused")
    })
}

#[test]
fn control_characters_and_huge_references_are_refused_shortly_and_forge_no_log_line() {
    let d = Daemon::start("");
    let forged = "FORGED-cimage-log-line";
    for image in [
        format!(
            "{}/app:1\n2026-01-01T00:00:00Z  INFO {forged}",
            d.testbed.registry
        ),
        format!("{}/app:1\r{forged}", d.testbed.registry),
        format!("{}/app\0:1", d.testbed.registry),
    ] {
        let s = pull_raw(&d, &image);
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{image:?}");
        assert!(
            !s.message().contains('\n') && !s.message().contains('\r'),
            "{s:?}"
        );
    }
    let huge = format!("{}/{}:1", d.testbed.registry, "a".repeat(100 * 1024));
    let s = pull_raw(&d, &huge);
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    assert!(s.message().len() < 300, "{} characters", s.message().len());
    let log = d.log();
    assert!(
        !log.lines()
            .any(|l| l.contains(forged) && !l.contains("app:1")),
        "a forged line in the log:\n{log}"
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_client_that_stops_reading_a_steps_output_does_not_grow_the_daemon() {
    // Room in the step's log for all of its 400 MB (the default keeps 2 x 100 MiB).
    let d = Daemon::start("Launcher.MaxLogSize: 1GiB");
    let pid = d.child.as_ref().unwrap().id();
    let img = busybox(&d.testbed);
    // Warm the image and the paths first, then take the idle footprint.
    assert!(run(&d, &["--image", &img], &["true"]).status.success());
    let idle = rss_kib(pid);
    let line = "x".repeat(1023);
    let script = format!("/bin/busybox yes {line} | /bin/busybox head -c 400000000");
    let stalled = block_on(async {
        let mut launcher = cimage::api::launcher_client(&d.socket());
        let stream = launcher
            .launch(pb::LaunchRequest {
                image: img.clone(),
                command: vec!["sh".into(), "-c".into(), script],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // Hold the stream without reading until the step has finished.
        for _ in 0..1200 {
            let ps: serde_json::Value =
                serde_json::from_slice(&d.cli(&["ps", "-o", "json"]).stdout).unwrap();
            if ps.as_array().is_some_and(|a| a.is_empty()) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let peak = rss_kib(pid);
        drop(stream);
        peak
    });
    assert!(
        stalled < idle + 64 * 1024,
        "daemon RSS went from {idle} KiB to {stalled} KiB"
    );
    // The output is all in the log.
    let ps: serde_json::Value =
        serde_json::from_slice(&d.cli(&["ps", "-a", "-o", "json"]).stdout).unwrap();
    let task = ps.as_array().unwrap()[0]["id"].as_str().unwrap().to_owned();
    let logs = d.cli(&["logs", &task]);
    assert_eq!(logs.stdout.len(), 400_000_000);
}

/// Forks a child that, as uid 65534, opens `n` connections to `socket` and holds them until it
/// is killed; returns its pid once they are open.
fn hold_connections_as_nobody(socket: &std::path::Path, n: usize) -> libc::pid_t {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(socket.as_os_str().as_bytes()).unwrap();
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (i, b) in path.as_bytes().iter().enumerate() {
        addr.sun_path[i] = *b as libc::c_char;
    }
    let mut ready = [0i32; 2];
    assert_eq!(unsafe { libc::pipe(ready.as_mut_ptr()) }, 0);
    // SAFETY: the child makes only system calls on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        unsafe {
            let lim = libc::rlimit {
                rlim_cur: (n + 64) as libc::rlim_t,
                rlim_max: (n + 64) as libc::rlim_t,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::setgroups(0, std::ptr::null());
            libc::setresgid(65534, 65534, 65534);
            libc::setresuid(65534, 65534, 65534);
            let mut opened: u32 = 0;
            for _ in 0..n {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                if fd >= 0
                    && libc::connect(
                        fd,
                        &addr as *const _ as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                    ) == 0
                {
                    opened += 1;
                }
            }
            libc::write(ready[1], &opened as *const u32 as *const libc::c_void, 4);
            loop {
                libc::pause();
            }
        }
    }
    let mut opened: u32 = 0;
    unsafe { libc::read(ready[0], &mut opened as *mut u32 as *mut libc::c_void, 4) };
    assert!(opened > 0, "the child opened no connection");
    pid
}

#[test]
fn status_answers_while_another_uid_holds_ten_thousand_connections() {
    let d = Daemon::start("SocketGroup: nogroup");
    let child = hold_connections_as_nobody(&d.socket(), 10_000);
    let started = std::time::Instant::now();
    let mut status = std::process::Command::new(env!("CARGO_BIN_EXE_cimage"))
        .args(["--socket"])
        .arg(d.socket())
        .args(["status", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ok = loop {
        if let Some(s) = status.try_wait().unwrap() {
            break s.success();
        }
        if started.elapsed() > std::time::Duration::from_secs(20) {
            let _ = status.kill();
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    unsafe {
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
    assert!(ok, "cimage status did not answer within 20 s");
}
