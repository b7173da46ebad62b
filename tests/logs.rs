//! A step's log is bounded: rotated past `Launcher.MaxLogSize` into at most `MaxLogFiles`
//! files, read back across them by `cimage logs` (and `-f`), and the log directory as a whole
//! kept under `MaxLogDirSize` by removing the logs of the steps that finished first. Against
//! the testbed's real containerd (CRI `ReopenContainerLog`).

mod common;

use common::*;

/// Waits until `cimage ps -a` shows `task` in a final state; returns it.
fn wait_until_finished(d: &Daemon, task: &str) -> String {
    for _ in 0..2400 {
        let ps: serde_json::Value =
            serde_json::from_slice(&d.cli(&["ps", "-a", "-o", "json"]).stdout).unwrap();
        let state = ps
            .as_array()
            .and_then(|a| a.iter().find(|t| t["id"] == task))
            .and_then(|t| t["state"].as_str().map(str::to_owned))
            .unwrap_or_default();
        if !matches!(state.as_str(), "" | "pending" | "created" | "running") {
            return state;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("task {task} never finished");
}

/// Starts `cmd` detached as root in job `job`; returns the task id.
fn detached(d: &Daemon, job: &str, cmd: &str) -> String {
    let img = busybox(&d.testbed);
    let out = d.cli(&[
        "run", "--detach", "--job", job, "--image", &img, "--", "sh", "-c", cmd,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().to_owned()
}

/// The files of the job's log directory: (name, bytes).
fn job_logs(d: &Daemon, job: &str) -> Vec<(String, u64)> {
    let dir = d.dir.path().join("supervisor/containers").join(job);
    let mut out: Vec<(String, u64)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| {
            let len = e.metadata().unwrap().len();
            (e.file_name().to_string_lossy().into_owned(), len)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_step_that_writes_without_end_keeps_at_most_its_share_of_log() {
    let d = Daemon::start("Launcher.MaxLogSize: 1MiB\nLauncher.MaxLogFiles: 2");
    let job = format!("loud-{:06x}", rand::random::<u32>() & 0xffffff);
    // About 3,000,000 log lines (some 150 MB in the runtime's format), then a last word.
    let task = detached(
        &d,
        &job,
        "busybox yes AAAAAAAAAAAAAAAA | head -n 3000000; echo last-word",
    );
    assert_eq!(wait_until_finished(&d, &task), "exited");
    let files = job_logs(&d, &job);
    let total: u64 = files.iter().map(|(_, n)| n).sum();
    println!("log files after 3,000,000 lines: {files:?}");
    assert!(files.len() <= 2, "{files:?}");
    assert!(
        files
            .iter()
            .any(|(n, _)| n.ends_with(".log.1") || n.contains(".log.")),
        "rotated at least once: {files:?}"
    );
    // What is kept is the share, not the 150 MB written (the size is measured every few
    // tenths of a second, so the files may pass 1 MiB by what was written meanwhile).
    assert!(total < 75_000_000, "{total} bytes kept: {files:?}");
    // The end of the output is there, read across the files.
    let out = d.cli(&["logs", &task, "--tail", "1"]);
    if stdout(&out) != "last-word\n" {
        // What the files end with, to tell a lost end of output from a misread one.
        let dir = d.dir.path().join("supervisor/containers").join(&job);
        for (name, _) in &files {
            let b = std::fs::read(dir.join(name)).unwrap_or_default();
            let from = b.len().saturating_sub(300);
            eprintln!(
                "end of {name}: ...{:?}",
                String::from_utf8_lossy(&b[from..])
            );
        }
        let log = d.log();
        let rotations: Vec<&str> = log.lines().filter(|l| l.contains("log")).collect();
        eprintln!("the daemon on logs:\n{}", rotations.join("\n"));
    }
    assert_eq!(stdout(&out), "last-word\n", "{}", stderr(&out));
    assert!(d.cli(&["end-job", &job]).status.success());
}

#[test]
fn logs_and_logs_f_read_every_line_across_the_rotated_files() {
    let d = Daemon::start("Launcher.MaxLogSize: 64KiB\nLauncher.MaxLogFiles: 1000");
    let job = format!("seq-{:06x}", rand::random::<u32>() & 0xffffff);
    // 100,000 numbered lines in 20 bursts, so that rotations fall while it writes.
    let task = detached(
        &d,
        &job,
        "for b in $(seq 0 19); do seq $((b*5000+1)) $((b*5000+5000)); sleep 0.2; done",
    );
    let follow = d.cli(&["logs", "-f", &task]);
    assert!(follow.status.success(), "{}", stderr(&follow));
    assert_eq!(wait_until_finished(&d, &task), "exited");
    let want: String = (1..=100_000).map(|i| format!("{i}\n")).collect();
    let followed = stdout(&follow);
    assert!(
        followed == want,
        "logs -f lost or reordered lines ({} bytes of {})",
        followed.len(),
        want.len()
    );
    let files = job_logs(&d, &job);
    assert!(files.len() > 5, "rotated while it wrote: {files:?}");
    let whole = stdout(&d.cli(&["logs", &task]));
    assert!(
        whole == want,
        "logs lost or reordered lines ({} bytes of {})",
        whole.len(),
        want.len()
    );
    let tail = stdout(&d.cli(&["logs", &task, "--tail", "3"]));
    assert_eq!(tail, "99998\n99999\n100000\n");
    assert!(d.cli(&["end-job", &job]).status.success());
}

#[test]
fn the_log_directory_sheds_the_logs_of_the_steps_that_finished_first() {
    let d = Daemon::start("Launcher.MaxLogDirSize: 2MiB");
    let job = format!("many-{:06x}", rand::random::<u32>() & 0xffffff);
    // Each step writes some 1.2 MB of log.
    let write = "seq 1 27000";
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let t = detached(&d, &job, write);
        assert_eq!(wait_until_finished(&d, &t), "exited");
        tasks.push(t);
    }
    // A running step's log is never removed, however full the directory.
    let running = detached(&d, &job, "seq 1 27000; sleep 300");
    let has_log = |t: &str| job_logs(&d, &job).iter().any(|(n, _)| n.contains(t));
    let said = || d.log().contains("Launcher.MaxLogDirSize");
    for _ in 0..1200 {
        if !has_log(&tasks[0]) && !has_log(&tasks[1]) && said() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let files = job_logs(&d, &job);
    if has_log(&tasks[0]) || has_log(&tasks[1]) {
        // Which logs stayed, and what they hold, for the failure below.
        let dir = d.dir.path().join("supervisor/containers").join(&job);
        for (name, _) in &files {
            let b = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
            eprintln!(
                "{name}: first {:?} last {:?} lines {}",
                b.lines().next(),
                b.lines().last(),
                b.lines().count()
            );
        }
        eprintln!("tasks {tasks:?} running {running}\n{}", d.log());
    }
    assert!(!has_log(&tasks[0]) && !has_log(&tasks[1]), "{files:?}");
    assert!(has_log(&running), "{files:?}");
    // What finished steps keep is within the bound.
    let finished: u64 = files
        .iter()
        .filter(|(n, _)| !n.contains(&running))
        .map(|(_, b)| b)
        .sum();
    assert!(finished <= 2 << 20, "{finished}: {files:?}");
    assert!(said(), "{}", d.log());
    assert!(d.cli(&["end-job", &job]).status.success());
}
