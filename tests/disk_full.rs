//! A full StateDir: requests that need a write fail with an error naming the database file,
//! reads go on, nothing in the index is lost, and writes work again once there is room, without
//! a restart (redb refuses everything after an I/O error, so cimaged reopens it in-process).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A small tmpfs mounted over a directory for the test; unmounted when dropped.
struct SmallFs {
    at: PathBuf,
}

impl SmallFs {
    fn mount(at: &Path, size: &str) -> Self {
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount: {}", stderr(&out));
        SmallFs { at: at.to_owned() }
    }

    /// Fills the filesystem; returns the filler file.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.at.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn image_ids(d: &Daemon) -> Vec<String> {
    let out = d.cli(&["images", "-q"]);
    assert!(out.status.success(), "images: {}", stderr(&out));
    let mut ids: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    ids.sort();
    ids
}

/// `cimage prewarm add NAME` with 100 long image references.
fn schedule(d: &Daemon, name: &str) -> std::process::Output {
    let mut args: Vec<String> = ["prewarm", "add", name, "--cron", "0 3 * * *"]
        .map(String::from)
        .to_vec();
    for k in 0..100 {
        args.push("--image".into());
        args.push(format!("127.0.0.1:5999/{}-{name}-{k}:1", "pad".repeat(25)));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    d.cli(&args)
}

#[test]
fn a_full_state_dir_fails_writes_clearly_keeps_reads_and_recovers_without_a_restart() {
    let mut d = Daemon::start("");
    let img = busybox(&d.testbed);
    assert!(d.cli(&["pull", &img]).status.success());
    let before = image_ids(&d);

    // The daemon's state moved onto a 8 MiB filesystem.
    let mut child = d.child.take().unwrap();
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    let state = d.dir.path().join("state");
    let saved = tempfile::tempdir().unwrap();
    copy_dir(&state, saved.path());
    let fs = SmallFs::mount(&state, "8m");
    copy_dir(saved.path(), &state);
    d.spawn();
    assert_eq!(image_ids(&d), before);

    let filler = fs.fill();
    // Requests that record something (pre-warm schedules of 100 images, about 10 KiB each)
    // until the database needs room it cannot get: refused, naming the file and the cause.
    let mut refused = None;
    for i in 0..300 {
        let out = schedule(&d, &format!("big{i}"));
        if !out.status.success() {
            refused = Some(out);
            break;
        }
    }
    let out = refused.expect("every write succeeded on a full disk");
    let err = stderr(&out);
    assert!(
        err.contains(&state.join("index.redb").display().to_string())
            && err.contains("No space left on device"),
        "{err}"
    );
    // Reads go on.
    assert_eq!(image_ids(&d), before);
    let out = d.cli(&["status"]);
    assert!(out.status.success(), "status: {}", stderr(&out));
    assert!(d.cli(&["prewarm", "ls"]).status.success());

    // Room again: writes work, without a restart.
    std::fs::remove_file(&filler).unwrap();
    let out = schedule(&d, "after");
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    assert!(d.cli(&["pull", &img]).status.success());
    assert!(d.log().contains("state database reopened"), "{}", d.log());
    assert_eq!(image_ids(&d), before);

    // And the file is sound: a new daemon over it reads the same index.
    d.kill9();
    d.spawn();
    assert_eq!(image_ids(&d), before);
    let mut child = d.child.take().unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    drop(fs);
}
