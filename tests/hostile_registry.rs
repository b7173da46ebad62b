//! A local user's own registry against the node, with the real containerd: a registry that
//! accepts connections and never answers holds none of the other callers' pulls, and pulls of
//! hosts the configuration does not name add no metric series beyond `other`.

mod common;

use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::images::Layer;
use common::*;

/// A server on loopback that accepts every connection and never sends a byte (until dropped).
struct Silent {
    addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Silent {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut held: Vec<TcpStream> = Vec::new();
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => held.push(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `cimage ARGS` as `uid:gid`, started and left running.
fn spawn_cli(d: &Daemon, (uid, gid): (u32, u32), args: &[&str]) -> Child {
    use std::os::unix::process::CommandExt;
    Command::new(env!("CARGO_BIN_EXE_cimage"))
        .args(args)
        .env("CIMAGE_SOCKET", d.socket())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .uid(uid)
        .gid(gid)
        .spawn()
        .expect("running cimage")
}

/// The pulls in flight (`cimage pulls -o json` as root) of images under `prefix`.
fn pulls_of(d: &Daemon, prefix: &str) -> Vec<serde_json::Value> {
    let out = d.cli(&["pulls", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .filter(|p| p["image"].as_str().is_some_and(|i| i.starts_with(prefix)))
        .cloned()
        .collect()
}

#[test]
fn a_users_registry_that_never_answers_holds_no_one_elses_pulls() {
    let tb = Testbed::get();
    let silent = Silent::start();
    // The defaults of every other limit; a deadline short enough to end a test.
    let d = Daemon::start("SocketGroup: nogroup\nPullTimeout: 90s");
    let user = (65534, 65534);
    // A user starts four pulls from its registry (four images: four pulls).
    let mut hung: Vec<Child> = (1..=4)
        .map(|n| spawn_cli(&d, user, &["pull", &format!("{}/x:{n}", silent.addr)]))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while pulls_of(&d, &silent.addr).len() < 4 {
        assert!(Instant::now() < deadline, "the four pulls never showed up");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Another user's pull and root's are served while all four still hang.
    let theirs = tb.push_new("fair-other", &[Layer::random(1 << 20)]);
    let roots = tb.push_new("fair-root", &[Layer::random(1 << 20)]);
    let t = Instant::now();
    let out = d.cli_as(Some((65533, 65534)), &["pull", &theirs.reference]);
    assert!(out.status.success(), "{}", stderr(&out));
    eprintln!("another user's pull of 1 MiB: {:?}", t.elapsed());
    let t = Instant::now();
    d.pull_json(&roots.reference, None);
    eprintln!("root's pull of 1 MiB: {:?}", t.elapsed());
    let hanging = pulls_of(&d, &silent.addr);
    assert_eq!(hanging.len(), 4, "nobody waited for them: {hanging:?}");
    // The user holds two of the node's slots; its other two pulls wait for its own share.
    let in_line: Vec<&serde_json::Value> =
        hanging.iter().filter(|p| p["phase"] == "queued").collect();
    assert_eq!(in_line.len(), 2, "{hanging:?}");
    assert!(
        in_line.iter().all(|p| p["queue_position"] == 0),
        "{hanging:?}"
    );

    // The two that hold slots fail once nothing came for PullResolveTimeout, naming the
    // registry and the key, long before PullTimeout.
    let mut ended = Vec::new();
    while ended.len() < 2 {
        for c in hung.iter_mut() {
            if c.try_wait().unwrap().is_some() && !ended.contains(&c.id()) {
                ended.push(c.id());
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for c in hung.iter_mut() {
        if !ended.contains(&c.id()) {
            let _ = c.kill();
        }
    }
    for c in hung {
        let id = c.id();
        let out = c.wait_with_output().unwrap();
        if !ended.contains(&id) {
            continue;
        }
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains(&silent.addr) && err.contains("ImageCache.PullResolveTimeout"),
            "{err}"
        );
    }
    assert!(
        d.log().contains("ImageCache.PullResolveTimeout"),
        "{}",
        d.log()
    );
}

/// The series of a metrics page that carry a `registry` label.
fn registry_series(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| !l.starts_with('#') && l.contains("registry=\""))
        .filter_map(|l| l.rsplit_once(' ').map(|(s, _)| s.to_owned()))
        .collect()
}

/// A loopback address nothing listens on (connections are refused at once).
fn closed_address() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    addr
}

#[test]
fn pulls_naming_unknown_registries_add_no_metric_series_beyond_other() {
    let tb = Testbed::get();
    let port = free_port();
    let d = Daemon::start(&format!(
        "SocketGroup: nogroup\nPullRetries: 0\nMetricsAddr: 127.0.0.1:{port}"
    ));
    let nobody = Some((65534, 65534));
    // The configured registry keeps its name; the first unknown hosts make `other`'s series.
    let known = tb.push_new("labels", &[Layer::random(1024)]);
    d.pull_json(&known.reference, None);
    for _ in 0..2 {
        let out = d.cli_as(nobody, &["pull", &format!("{}/x:1", closed_address())]);
        assert!(!out.status.success());
    }
    let before = registry_series(&scrape(port));
    assert!(
        before
            .iter()
            .any(|s| s.contains(&format!("registry=\"{}\"", tb.registry))),
        "{before:?}"
    );
    // A user names 20 more hosts.
    for _ in 0..20 {
        let out = d.cli_as(nobody, &["pull", &format!("{}/x:1", closed_address())]);
        assert!(!out.status.success());
    }
    let after = registry_series(&scrape(port));
    let added: Vec<&String> = after.difference(&before).collect();
    assert!(
        added.is_empty(),
        "{} new series ({} before): {added:?}",
        added.len(),
        before.len()
    );
    assert!(
        after
            .iter()
            .filter(|s| !s.contains(&format!("registry=\"{}\"", tb.registry)))
            .all(|s| s.contains("registry=\"other\"")),
        "{after:?}"
    );
}
