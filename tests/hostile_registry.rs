//! A local user's own registry against the node, with the real containerd: a registry that
//! accepts connections and never answers holds none of the other callers' pulls, manifests
//! that lie about their sizes evict nothing they do not bring, and pulls of hosts the
//! configuration does not name add no metric series beyond `other`.

mod common;

use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::images::Layer;
use common::*;

/// The tests of this file one at a time: one of them evicts, and must see only its images go.
static SERIAL: Mutex<()> = Mutex::new(());

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
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
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
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
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

/// Has the runtime pull `image` itself (raw CRI, no cimaged).
fn runtime_pull(tb: &Testbed, image: &str) {
    use k8s_cri::v1 as cri;
    block_on(async {
        let mut c =
            cri::image_service_client::ImageServiceClient::new(cimage::cri::unix_channel(&tb.cri));
        c.pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.to_owned(),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: None,
        })
        .await
        .unwrap_or_else(|e| panic!("pulling {image}: {e}"));
    })
}

/// Hand-made manifests in the testbed's plain registry, as a user may push them.
struct Forger {
    registry: String,
    http: reqwest::Client,
}

impl Forger {
    fn url(&self, path: &str) -> String {
        format!("http://{}/v2/{path}", self.registry)
    }

    async fn get_json(&self, path: &str) -> serde_json::Value {
        let accept = "application/vnd.oci.image.manifest.v1+json, \
                      application/vnd.docker.distribution.manifest.v2+json";
        let res = self
            .http
            .get(self.url(path))
            .header("Accept", accept)
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "GET {path}: {}", res.status());
        serde_json::from_slice(&res.bytes().await.unwrap()).unwrap()
    }

    /// Uploads `data` as a blob of `repo`; returns its digest.
    async fn put_blob(&self, repo: &str, data: &[u8]) -> String {
        use sha2::Digest;
        let digest = format!("sha256:{:x}", sha2::Sha256::digest(data));
        let res = self
            .http
            .post(self.url(&format!("{repo}/blobs/uploads/")))
            .send()
            .await
            .unwrap();
        let location = res.headers()["location"].to_str().unwrap().to_owned();
        let location = match location.starts_with("http") {
            true => location,
            false => format!("http://{}{location}", self.registry),
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let res = self
            .http
            .put(format!("{location}{sep}digest={digest}"))
            .header("Content-Type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "blob upload: {}", res.status());
        digest
    }

    /// Mounts blob `digest` of repository `from` into `repo`.
    async fn mount(&self, repo: &str, digest: &str, from: &str) {
        let res = self
            .http
            .post(self.url(&format!("{repo}/blobs/uploads/?mount={digest}&from={from}")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 201, "mounting {digest}");
    }

    /// Pushes `manifest` as `repo:1`; returns the reference.
    async fn put_manifest(&self, repo: &str, manifest: &serde_json::Value) -> String {
        let res = self
            .http
            .put(self.url(&format!("{repo}/manifests/1")))
            .header("Content-Type", manifest["mediaType"].as_str().unwrap())
            .body(serde_json::to_vec(manifest).unwrap())
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "manifest: {}", res.status());
        format!("{}/{repo}:1", self.registry)
    }

    /// Three images over the testbed's busybox that claim about 9 MB each: its layer listed
    /// nine times; its layer claimed at 9 MB; a fresh 1 MiB blob (not a layer the runtime could
    /// unpack) claimed at 9 MB. Returns the references, in that order.
    async fn liars(&self, prefix: &str) -> [String; 3] {
        let base = self.get_json("busybox/manifests/1").await;
        let config = self
            .get_json(&format!(
                "busybox/blobs/{}",
                base["config"]["digest"].as_str().unwrap()
            ))
            .await;
        let layer = base["layers"][0].clone();
        let layer_digest = layer["digest"].as_str().unwrap().to_owned();
        let mut out = Vec::new();
        for kind in ["dup", "lie-held", "lie-cold"] {
            let repo = Testbed::unique_repo(&format!("{prefix}-{kind}"));
            let mut m = base.clone();
            let mut c = config.clone();
            match kind {
                "dup" => {
                    self.mount(&repo, &layer_digest, "busybox").await;
                    m["layers"] = serde_json::Value::Array(vec![layer.clone(); 9]);
                    let id = c["rootfs"]["diff_ids"][0].clone();
                    c["rootfs"]["diff_ids"] = serde_json::Value::Array(vec![id; 9]);
                }
                "lie-held" => {
                    self.mount(&repo, &layer_digest, "busybox").await;
                    m["layers"][0]["size"] = 9_000_000.into();
                }
                _ => {
                    let mut fresh = vec![0u8; 1 << 20];
                    rand::fill(&mut fresh[..]);
                    let digest = self.put_blob(&repo, &fresh).await;
                    m["layers"][0]["digest"] = digest.clone().into();
                    m["layers"][0]["size"] = 9_000_000.into();
                    // A layer of its own (no snapshot the runtime could reuse instead).
                    c["rootfs"]["diff_ids"] = serde_json::json!([digest]);
                }
            }
            let config_bytes = serde_json::to_vec(&c).unwrap();
            m["config"]["digest"] = self.put_blob(&repo, &config_bytes).await.into();
            m["config"]["size"] = config_bytes.len().into();
            out.push(self.put_manifest(&repo, &m).await);
        }
        out.try_into().unwrap()
    }
}

#[test]
fn manifests_that_lie_about_sizes_evict_nothing_they_do_not_bring() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tb = Testbed::get();
    let forger = Forger {
        registry: tb.registry.clone(),
        http: reqwest::Client::new(),
    };
    let (users, roots) = block_on(async {
        (
            forger.liars("liar-user").await,
            forger.liars("liar-root").await,
        )
    });
    // Eight images another user pulled, 1 MiB each, that nothing protects.
    let victims: Vec<_> = (0..8)
        .map(|n| tb.push_new(&format!("victim{n}"), &[Layer::random(1 << 20)]))
        .collect();
    // The node holds busybox's layer (the liars reuse it).
    runtime_pull(&tb, &busybox(&tb));
    let (existing, ids) = runtime_images(&tb);
    let victims_size: u64 = victims.iter().map(|v| v.size + 4096).sum();
    // Room for what exists, the victims, and 6 MiB more: about what the six liars really hold
    // (busybox's 1 MB layer counts once per image that lists it, as for any image).
    let d = Daemon::start(&format!(
        "SocketGroup: nogroup\nEviction:\n  MaxBytes: {}\n  MinAge: 0s\n  HighPercent: 100\n  LowPercent: 100",
        existing + victims_size + (6 << 20)
    ));
    for id in &ids {
        let out = d.cli(&["pin", id]);
        assert!(out.status.success(), "pin {id}: {}", stderr(&out));
    }
    for v in &victims {
        d.pull_json(&v.reference, None);
    }
    let all_there = |after: &str| {
        let held = ctr_images(&tb);
        let gone: Vec<&str> = victims
            .iter()
            .map(|v| v.reference.as_str())
            .filter(|r| !held.iter().any(|h| h == r))
            .collect();
        assert!(
            gone.is_empty(),
            "after {after}: {} of 8 victims evicted: {gone:?}\n{}",
            gone.len(),
            d.log()
        );
    };
    // A user, then root, pull the three liars: two land (their blobs are held), the fresh
    // blob is refused by the runtime for its size, and nothing is evicted for any of them.
    for (who, refs) in [(Some((65534, 65534)), &users), (None, &roots)] {
        for (n, r) in refs.iter().enumerate() {
            let out = d.cli_as(who, &["pull", r]);
            let err = stderr(&out);
            assert_eq!(out.status.success(), n < 2, "{r}: {err}");
            assert!(!err.contains("no room"), "{err}");
            all_there(r);
        }
    }
    // The index counts what the landed liars hold, not what they claim: an eviction pass
    // finds nothing to do.
    let out = d.cli(&["gc"]);
    assert!(out.status.success(), "{}", stderr(&out));
    all_there("gc");
    assert!(!d.log().contains("image evicted"), "{}", d.log());
}
