//! Steps under the scheduler's limits: CPU quota and memory limit through CRI, a memory limit
//! passed reported as out of memory, the job's pod under a cgroup parent, the node's process
//! limit on the pod (a fork bomb stops there), and the CLI habits of docker and Slurm users
//! (`run IMAGE CMD`, `-v SRC:DST`, `--env-file`).

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
fn memory_sizes_are_binary_as_docker_slurm_and_kubernetes_write_them() {
    let d = Daemon::start("");
    let img = d
        .testbed
        .push_new(
            "memory-units",
            &[
                Layer::busybox(),
                Layer(vec![("bin/hog".into(), hog(), 0o755)]),
            ],
        )
        .reference;
    let limit_of = |memory: &str| {
        let out = d.cli(&[
            "run",
            "--memory",
            memory,
            &img,
            "--",
            "cat",
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        ]);
        assert!(out.status.success(), "--memory {memory}: {}", stderr(&out));
        stdout(&out).trim().to_owned()
    };
    // docker's -m 32m: 32 MiB in the step's cgroup.
    assert_eq!(limit_of("32m"), "33554432");
    // Slurm's --mem=32M, Kubernetes' 32Mi, the IEC spelling and bytes: the same.
    for same in ["32M", "32Mi", "32MiB", "33554432"] {
        assert_eq!(limit_of(same), "33554432", "{same}");
    }
    assert_eq!(limit_of("4G"), "4294967296", "4G is 4 GiB");
    // And 32m is a limit: 64 MiB in it is out of memory.
    let out = d.cli(&["run", "--memory", "32m", &img, "--", "/bin/hog"]);
    assert_eq!(out.status.code(), Some(137), "{}", stderr(&out));
    assert!(stderr(&out).contains("OutOfMemory"), "{}", stderr(&out));
    // A decimal unit is ambiguous for memory: refused as a usage error, before anything runs.
    let out = d.cli(&["run", "--memory", "32MB", &img, "--", "true"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("could mean powers of 1000"),
        "{}",
        stderr(&out)
    );
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
    // With `{uid}` in the allowed parent, a user places a job under their own and never under
    // another user's (nor one whose uid merely starts with theirs).
    let top = format!("/cimage-t-{:08x}", rand::random::<u32>());
    let v = Daemon::start(&format!(
        "SocketGroup: nogroup\nLauncher.AllowUserLaunch: true\nLauncher.AllowedCgroupParents: [\"{top}/user_{{uid}}\"]"
    ));
    let own = format!("{top}/user_65534/job_1");
    let out = v.cli_as(
        Some((65534, 65534)),
        &["run", "--cgroup-parent", &own, &img, "--", "true"],
    );
    assert!(out.status.success(), "{}\n{}", stderr(&out), v.log());
    for other in [
        format!("{top}/user_1000/job_2"),
        format!("{top}/user_655340/job_3"),
    ] {
        let out = v.cli_as(
            Some((65534, 65534)),
            &["run", "--cgroup-parent", &other, &img, "--", "true"],
        );
        assert_eq!(out.status.code(), Some(125), "{other}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("AllowedCgroupParents"),
            "{}",
            stderr(&out)
        );
    }
    for ctl in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        for d in [own.as_str(), &format!("{top}/user_65534"), &top] {
            let _ = std::fs::remove_dir(ctl.path().join(d.trim_start_matches('/')));
        }
    }
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

/// Starts `sleep 300` as a step of `who` and waits until it runs; returns its task id.
fn running_step(d: &Daemon, who: Option<(u32, u32)>, img: &str) -> String {
    let out = d.cli_as(who, &["run", "-d", img, "--", "sleep", "300"]);
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
            return task;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never running: {tasks}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn exec_runs_a_command_in_a_running_step_as_its_user_for_its_owner_only() {
    let d = Daemon::start("SocketGroup: nogroup\nLauncher.AllowUserLaunch: true");
    let img = busybox(&d.testbed);
    let nobody = Some((65534, 65534));
    let task = running_step(&d, nobody, &img);
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

#[test]
fn exec_attached_passes_input_and_its_end_and_gives_a_terminal() {
    let mut d = Daemon::start("SocketGroup: nogroup\nLauncher.AllowUserLaunch: true");
    let img = busybox(&d.testbed);
    let nobody = Some((65534, 65534));
    let task = running_step(&d, nobody, &img);
    // -i: input reaches the command and so does its end (cat returns), stderr stays apart.
    let script = "cat; echo err >&2; id -u; exit 4";
    let out = d.cli_as_stdin(
        nobody,
        &["exec", "-i", &task, "--", "sh", "-c", script],
        "hello\nworld\n",
    );
    assert_eq!(out.status.code(), Some(4), "{}\n{}", stderr(&out), d.log());
    assert_eq!(stdout(&out), "hello\nworld\n65534\n");
    assert_eq!(stderr(&out), "err\n");
    // A command the image does not have: one line saying so, 125.
    let out = d.cli_as_stdin(nobody, &["exec", "-i", &task, "--", "/no/such"], "");
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(stderr(&out).contains("/no/such"), "{}", stderr(&out));
    // Another user: refused before anything runs.
    let out = d.cli_as_stdin(Some((65533, 65534)), &["exec", "-i", &task, "--", "id"], "");
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains(&format!("no task {task}")),
        "{}",
        stderr(&out)
    );
    // -it on a terminal made here: the command gets a terminal of the caller's size, follows
    // a resize, and its exit code comes back.
    let mut term = Pty::open(33, 101);
    let mut child = term.spawn(
        env!("CARGO_BIN_EXE_cimage"),
        &["exec", "-it", &task, "--", "sh"],
        &d.socket(),
        nobody,
    );
    term.write(b"busybox tty; busybox stty size; id -u\n");
    let seen = term.read_until(|s| s.contains("33 101") && s.contains("65534"), |_| {});
    assert!(seen.contains("/dev/pts/"), "{seen}");
    term.resize(40, 120);
    term.read_until(
        |s| s.contains("40 120"),
        |t| {
            kill_winch(&child);
            t.write(b"busybox stty size\n");
        },
    );
    term.write(b"exit 3\n");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(3), "{}", term.read_rest());
    // A session left open does not hold the daemon at shutdown.
    let open = std::process::Command::new(env!("CARGO_BIN_EXE_cimage"))
        .args(["exec", "-i", &task, "--", "cat"])
        .env("CIMAGE_SOCKET", d.socket())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let mut daemon = d.child.take().unwrap();
    let t = std::time::Instant::now();
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    daemon.wait().unwrap();
    assert!(
        t.elapsed() < std::time::Duration::from_secs(15),
        "the daemon took {:?} to stop with a session open",
        t.elapsed()
    );
    let open = open.wait_with_output().unwrap();
    assert_eq!(
        open.status.code(),
        Some(125),
        "{:?}: {}",
        open.status,
        stderr(&open)
    );
    d.spawn();
    let _ = d.cli(&["cancel", &task]);
}

/// Tells a client its terminal changed size (as the kernel does for the foreground group).
fn kill_winch(child: &std::process::Child) {
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGWINCH) };
}

/// A pseudo-terminal made by the test, for a client that needs a terminal.
struct Pty {
    master: std::fs::File,
    slave: Option<std::fs::File>,
    seen: String,
}

impl Pty {
    fn open(rows: u16, cols: u16) -> Self {
        use std::os::fd::FromRawFd;
        let (mut m, mut s) = (0, 0);
        // SAFETY: openpty fills two descriptors we then own.
        let rc = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        let pty = unsafe {
            Self {
                master: std::fs::File::from_raw_fd(m),
                slave: Some(std::fs::File::from_raw_fd(s)),
                seen: String::new(),
            }
        };
        pty.resize(rows, cols);
        pty
    }

    fn resize(&self, rows: u16, cols: u16) {
        use std::os::fd::AsRawFd;
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads the winsize we pass.
        assert_eq!(
            unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
            0
        );
    }

    /// Runs `program` with the terminal as its standard input, output and error.
    fn spawn(
        &mut self,
        program: &str,
        args: &[&str],
        socket: &std::path::Path,
        ids: Option<(u32, u32)>,
    ) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let slave = self.slave.take().expect("one client per terminal");
        let mut cmd = std::process::Command::new(program);
        cmd.args(args)
            .env("CIMAGE_SOCKET", socket)
            .stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave);
        if let Some((uid, gid)) = ids {
            cmd.uid(uid).gid(gid);
        }
        cmd.spawn().expect("running cimage")
    }

    fn write(&mut self, data: &[u8]) {
        use std::io::Write;
        self.master.write_all(data).unwrap();
    }

    /// Reads what the terminal shows for up to `wait`, adding it to `seen`; false once the
    /// terminal has no client left.
    fn read_for(&mut self, wait: std::time::Duration) -> bool {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let end = std::time::Instant::now() + wait;
        let mut buf = [0u8; 4096];
        while std::time::Instant::now() < end {
            let mut fds = libc::pollfd {
                fd: self.master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polling one descriptor we own.
            if unsafe { libc::poll(&mut fds, 1, 100) } <= 0 {
                continue;
            }
            match self.master.read(&mut buf) {
                Ok(n) if n > 0 => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                _ => return false,
            }
        }
        true
    }

    /// Reads until what the terminal showed satisfies `done`, calling `again` every second
    /// meanwhile (30 s at most); returns all it showed.
    fn read_until(
        &mut self,
        done: impl Fn(&str) -> bool,
        mut again: impl FnMut(&mut Self),
    ) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !done(&self.seen) {
            assert!(
                std::time::Instant::now() < deadline,
                "the terminal never showed what was expected: {:?}",
                self.seen
            );
            again(self);
            if !self.read_for(std::time::Duration::from_secs(1)) {
                break;
            }
        }
        self.seen.clone()
    }

    /// Whatever is left to read (for a failure message).
    fn read_rest(&mut self) -> String {
        self.read_for(std::time::Duration::from_secs(1));
        self.seen.clone()
    }
}

#[test]
fn a_fork_bomb_stops_at_the_pods_process_limit() {
    let d = Daemon::start("Launcher.PidsLimit: 64");
    let img = busybox(&d.testbed);
    // A subshell forks sleepers until the kernel refuses (and ends there); the step itself
    // then reads, with builtins only, how many processes its cgroup holds and where it is.
    let bomb = "(for i in $(seq 1 200); do sleep 300 & done) 2>/dev/null; \
                read n < /sys/fs/cgroup/pids/pids.current; echo current=$n; \
                while read l; do case $l in *:pids:*) echo $l;; esac; done < /proc/self/cgroup";
    let out = d.cli(&["run", "--user", "cimage-test", &img, "--", "sh", "-c", bomb]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let current: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix("current="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    println!("processes in the step's cgroup after the bomb: {current}");
    // The pod's sandbox holds one of the 64; the bomb took (nearly) all the rest.
    assert!(current <= 63, "{current} processes: {text}");
    assert!(current >= 32, "the bomb ran: {text}");
    assert!(
        text.lines().any(|l| l.contains(":pids:/cimage-")),
        "the step is in the pod cgroup cimage made: {text}"
    );
}
