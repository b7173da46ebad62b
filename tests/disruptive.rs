//! Tests that stop or restart parts of the shared testbed (the registry, containerd). They run
//! one at a time, and always put the testbed back.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::images::{push, Layer};
use common::*;

static SERIAL: Mutex<()> = Mutex::new(());

/// Starts the registry again when dropped, even if the test failed.
struct RegistryBack<'a>(&'a Testbed);
impl Drop for RegistryBack<'_> {
    fn drop(&mut self) {
        self.0.script(&["start-registry"]);
    }
}

#[test]
fn registry_down_cached_images_still_serve_and_always_fails_clearly() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = Daemon::start("");
    let tb = d.testbed.clone();
    let pushed = tb.push_new("regdown", &[Layer::random(1024)]);
    assert_eq!(d.pull_json(&pushed.reference, None)["action"], "pulled");

    tb.script(&["stop-registry"]);
    let _back = RegistryBack(&tb);
    for policy in ["IfNotPresent", "Never"] {
        assert_eq!(
            d.pull_json(&pushed.reference, Some(policy))["action"],
            "cached",
            "{policy}"
        );
    }
    let out = d.cli(&["pull", &pushed.reference, "--policy", "Always"]);
    assert_eq!(out.status.code(), Some(4), "unavailable: try again");
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&pushed.reference) && err.contains("unreachable"),
        "{err}"
    );
    assert!(err.contains(&tb.registry), "names the registry: {err}");

    // A node that prefers running jobs to checking tags serves its copy, marked stale; an
    // image it does not have still fails.
    let lenient = Daemon::start("OnRegistryUnavailable: UseCached");
    let j = lenient.pull_json(&pushed.reference, Some("Always"));
    assert_eq!(
        (j["action"].as_str(), j["stale"].as_bool()),
        (Some("cached"), Some(true)),
        "{j}"
    );
    assert!(lenient.log().contains("serving the cached copy unchecked"));
    let absent = format!("{}/never-pushed-{}:1", tb.registry, rand::random::<u32>());
    let out = lenient.cli(&["pull", &absent, "--policy", "Always"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
}

#[test]
fn next_pull_works_after_containerd_restarts() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = Daemon::start("");
    let tb = d.testbed.clone();
    let a = tb.push_new("restart", &[Layer::random(1024)]);
    let repo = a.repo.clone();
    assert_eq!(d.pull_json(&a.reference, None)["action"], "pulled");

    tb.script(&["restart-containerd"]);

    let b = block_on(push(
        &tb.registry,
        &repo,
        "2",
        &[Layer::random(1024)],
        &["sh"],
    ));
    assert_eq!(d.pull_json(&b.reference, None)["action"], "pulled");
    assert_eq!(d.pull_json(&a.reference, Some("Never"))["action"], "cached");
    assert!(ctr_images(&tb).contains(&b.reference));
}

/// Pins every image the daemon indexes: the eviction tests must only ever evict their own.
fn pin_all(d: &Daemon, ids: &[String]) {
    for id in ids {
        let out = d.cli(&["pin", id]);
        assert!(out.status.success(), "pin {id}: {}", stderr(&out));
    }
}

fn eviction_config(max_bytes: u64, min_age: &str) -> String {
    format!("Eviction:\n  MaxBytes: {max_bytes}\n  MinAge: {min_age}\n  HighPercent: 100\n  LowPercent: 100\n")
}

fn in_runtime(tb: &Testbed, image: &str) -> bool {
    ctr_images(tb).iter().any(|i| i == image)
}

#[test]
fn eviction_by_max_bytes_keeps_pins_in_use_and_young_images() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tb = Testbed::get();
    let mk = |n: &str| {
        let repo = Testbed::unique_repo(&format!("ev{n}"));
        block_on(push(
            &tb.registry,
            &repo,
            "1",
            &[Layer::busybox(), Layer::random(256 << 10)],
            &["sh"],
        ))
    };
    let (a, b, c) = (mk("a"), mk("b"), mk("c"));
    let each = a.size.max(b.size).max(c.size) + 4096;
    // The first pod pulls the sandbox image; have it in place before measuring what exists.
    block_on(async {
        use k8s_cri::v1 as cri;
        let mut c =
            cri::image_service_client::ImageServiceClient::new(cimage::cri::unix_channel(&tb.cri));
        let image = Some(cri::ImageSpec {
            image: format!("{}/pause:1", tb.registry),
            ..Default::default()
        });
        c.pull_image(cri::PullImageRequest {
            image,
            auth: None,
            sandbox_config: None,
        })
        .await
        .expect("pulling the sandbox image");
    });
    let (existing, ids) = runtime_images(&tb);
    // Room for what exists plus two and a half test images.
    let d = Daemon::start(&eviction_config(existing + 2 * each + each / 2, "0s"));
    pin_all(&d, &ids);

    // A is used by a running step; B is pulled after it, so A is the least recently used.
    d.pull_json(&a.reference, None);
    let out = d.cli(&[
        "run",
        "--detach",
        "--image",
        &a.reference,
        "--",
        "sleep",
        "300",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let task = stdout(&out).trim().to_owned();
    std::thread::sleep(Duration::from_millis(500));
    d.pull_json(&b.reference, None);
    // C does not fit: the LRU image A is in use, so B goes.
    d.pull_json(&c.reference, None);
    assert!(in_runtime(&tb, &a.reference), "in-use image kept");
    assert!(
        !in_runtime(&tb, &b.reference),
        "least recently used free image evicted"
    );
    assert!(in_runtime(&tb, &c.reference));
    assert!(d.log().contains("image evicted"), "{}", d.log());

    // With A still in use and C pinned, nothing may go: a pull that does not fit fails clearly
    // and changes nothing.
    assert!(d.cli(&["pin", &c.reference]).status.success());
    let out = d.cli(&["pull", &b.reference]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&b.reference)
            && err.contains("no room")
            && err.contains("pinned, in use or younger than MinAge"),
        "{err}"
    );
    assert!(
        in_runtime(&tb, &a.reference)
            && in_runtime(&tb, &c.reference)
            && !in_runtime(&tb, &b.reference)
    );

    assert!(d.cli(&["cancel", &task]).status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let ps: serde_json::Value =
            serde_json::from_slice(&d.cli(&["ps", "-a", "-o", "json"]).stdout).unwrap();
        if ps
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == task.as_str() && t["cleaned_up"] == true)
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "task not cleaned up");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(d);

    // A second daemon that sees everything as young (MinAge 1h) evicts nothing, even over its
    // limit, and says why.
    let (existing, ids) = runtime_images(&tb);
    let young = Daemon::start(&eviction_config(existing - each, "1h"));
    let out = young.cli(&["gc", "--dry-run", "-o", "json"]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["evicted"], serde_json::json!([]), "{plan}");
    assert!(
        plan["shortfall"]
            .as_str()
            .unwrap()
            .contains("younger than MinAge"),
        "{plan}"
    );
    drop(young);

    // A third, with MinAge 3s: once the images age, a dry run names the victim and changes
    // nothing; the real gc then evicts it, with the reason recorded.
    let old = Daemon::start(&eviction_config(existing - each, "3s"));
    let keep: Vec<String> = ids
        .iter()
        .filter(|id| {
            let i = old.cli(&["inspect", id, "-o", "json"]);
            let v: serde_json::Value = serde_json::from_slice(&i.stdout).unwrap_or_default();
            !v["names"]
                .as_array()
                .map(|n| n.iter().any(|x| x == a.reference.as_str()))
                .unwrap_or(false)
        })
        .cloned()
        .collect();
    pin_all(&old, &keep);
    std::thread::sleep(Duration::from_secs(4));
    let out = old.cli(&["gc", "--dry-run"]);
    assert!(
        stdout(&out).contains(&format!("would evict {}", a.reference))
            && stdout(&out).contains("max_bytes"),
        "{}",
        stdout(&out)
    );
    assert!(in_runtime(&tb, &a.reference), "dry run changed nothing");
    let out = old.cli(&["gc"]);
    assert!(
        stdout(&out).contains(&format!("evicted {}", a.reference)),
        "{}",
        stdout(&out)
    );
    assert!(!in_runtime(&tb, &a.reference));
}

#[test]
fn an_image_of_a_container_made_directly_through_cri_survives_eviction() {
    use cimage::runtime::{ContainerSpec, PodSpec, TaskRuntime};
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tb = Testbed::get();
    let theirs = tb.push_new("evcri", &[Layer::busybox(), Layer::random(64 << 10)]);
    let mine = tb.push_new("evcri-free", &[Layer::random(64 << 10)]);
    // Kubelet (here: a CRI client of containerd, not cimaged) makes a pod and a container from
    // `theirs`; the container is created, never started.
    // One runtime for the CRI client: its channel lives on it.
    let tokio = tokio::runtime::Runtime::new().unwrap();
    let rt = tokio
        .block_on(async { cimage::cri::CriTaskRuntime::new(&tb.cri, Duration::from_secs(60)) });
    let pod = PodSpec {
        name: format!("other-{}", rand::random::<u32>()),
        uid: format!("{:016x}", rand::random::<u64>()),
        namespace: "someone-else".into(),
        hostname: String::new(),
        log_directory: std::env::temp_dir(),
        labels: Default::default(),
        cgroup_parent: None,
        pod_cgroup: None,
    };
    let d = Daemon::start("");
    for r in [&theirs.reference, &mine.reference] {
        assert_eq!(d.pull_json(r, None)["action"], "pulled");
    }
    let id = d.pull_json(&theirs.reference, None)["image_id"]
        .as_str()
        .unwrap()
        .to_owned();
    drop(d);
    let pod_id = tokio.block_on(rt.run_pod(&pod)).unwrap();
    let created = tokio.block_on(rt.create_container(
        &pod_id,
        &pod,
        &ContainerSpec {
            name: "app".into(),
            image: id.clone(),
            command: vec!["sleep".into(), "60".into()],
            ..Default::default()
        },
    ));
    let cleanup = || {
        let _ = tokio.block_on(rt.stop_pod(&pod_id));
        let _ = tokio.block_on(rt.remove_pod(&pod_id));
    };
    if let Err(e) = created {
        cleanup();
        panic!("creating the container: {e}");
    }
    // A daemon over a tiny MaxBytes, with every other image pinned, may evict only these two
    // once they are older than MinAge (its index sees them first at its start).
    let d = Daemon::start(&eviction_config(1, "3s"));
    let (_, ids) = runtime_images(&tb);
    let others: Vec<String> = ids.into_iter().filter(|i| *i != id).collect();
    let free_id = d.pull_json(&mine.reference, None)["image_id"]
        .as_str()
        .unwrap()
        .to_owned();
    pin_all(
        &d,
        &others
            .iter()
            .filter(|i| **i != free_id)
            .cloned()
            .collect::<Vec<_>>(),
    );
    std::thread::sleep(Duration::from_secs(4));
    let out = d.cli(&["gc"]);
    cleanup();
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains(&format!("evicted {}", mine.reference)),
        "{text}"
    );
    assert!(
        !text.contains(&format!("evicted {}", theirs.reference)),
        "{text}"
    );
    assert!(in_runtime(&tb, &theirs.reference), "kept for the container");
}

/// Whether a failed command said why in one line of its own (progress lines aside).
fn clear_failure(what: &str, out: &std::process::Output) {
    if out.status.success() {
        return;
    }
    let err = stderr(out);
    let said: Vec<&str> = err.lines().filter(|l| l.starts_with("cimage: ")).collect();
    assert_eq!(said.len(), 1, "{what} failed without one clear line: {err}");
    eprintln!("{what} failed: {}", said[0]);
}

#[test]
fn containerd_restarting_during_a_pull_and_a_step_is_ridden_out() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tb = Testbed::get();
    let img = tb.push_new("restart-mid", &[Layer::busybox(), Layer::random(8 << 20)]);
    // 8 MiB at 2 MB/s: the pull is under way when containerd goes.
    let proxy = common::proxy::Proxy::start(&tb, &tb.registry, 2_000_000);
    let d = Daemon::start(&proxied_registries(&tb, &proxy.addr));
    let reference = format!("{}/{}:1", proxy.addr, img.repo);
    let bb = busybox(&tb);
    assert!(d.cli(&["pull", &bb]).status.success());

    let (socket, r) = (d.socket(), reference.clone());
    let pull = std::thread::spawn(move || cli_at(&socket, &["pull", &r]));
    let (socket, b) = (d.socket(), bb.clone());
    let step = std::thread::spawn(move || {
        cli_at(
            &socket,
            &["run", &b, "--", "sh", "-c", "sleep 3; echo done"],
        )
    });
    // Reconciliations (gc --dry-run reconciles first) asked all through the restart.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (socket, halt) = (d.socket(), stop.clone());
    let reconciling = std::thread::spawn(move || {
        let mut outs = Vec::new();
        while !halt.load(std::sync::atomic::Ordering::SeqCst) {
            outs.push(cli_at(&socket, &["gc", "--dry-run"]));
            std::thread::sleep(Duration::from_millis(100));
        }
        outs
    });
    std::thread::sleep(Duration::from_millis(1500));
    tb.script(&["restart-containerd"]);
    let (pull, step) = (pull.join().unwrap(), step.join().unwrap());
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let reconciles = reconciling.join().unwrap();
    // Both ride the restart out: the pull waits for the runtime (up to 30 s) without spending
    // its retries, and the step is followed through the outage.
    assert!(pull.status.success(), "{}\n{}", stderr(&pull), d.log());
    assert!(step.status.success(), "{}\n{}", stderr(&step), d.log());
    assert!(
        d.log().contains("the runtime is not answering"),
        "{}",
        d.log()
    );
    for out in &reconciles {
        clear_failure("a reconciliation", out);
    }
    assert!(d.cli(&["gc", "--dry-run"]).status.success(), "{}", d.log());
    // (Its output is not checked: what a step prints while containerd is down or starting is
    // containerd's to lose, and it does: seen here, "start" or "done" missing from the log.)
    // The next ones work, without restarting cimaged.
    let out = d.cli(&["pull", &reference, "--policy", "Always"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let out = d.cli(&["run", &bb, "--", "true"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    assert!(ctr_images(&tb).contains(&reference));
    // Nothing of this daemon's is left in the runtime once its steps are done.
    let instance = d.instance();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !cri_pods(&tb, &[("io.cimage.instance", &instance)]).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "pods left: {:?}\n{}",
            cri_pods(&tb, &[("io.cimage.instance", &instance)]),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs the CLI against the daemon at `socket` as root.
fn cli_at(socket: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cimage"))
        .args(args)
        .env("CIMAGE_SOCKET", socket)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn a_runtime_socket_missing_at_start_is_reported_then_found() {
    let mut d = Daemon::start("");
    let tb = d.testbed.clone();
    let img = busybox(&tb);
    let mut child = d.child.take().unwrap();
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    // The runtime socket named in the configuration does not exist yet.
    let later = tempfile::tempdir().unwrap();
    let link = later.path().join("containerd.sock");
    let config = std::fs::read_to_string(d.config_path()).unwrap();
    let cri = tb.cri.display().to_string();
    std::fs::write(
        d.config_path(),
        config.replace(
            &format!("RuntimeEndpoint: {cri}"),
            &format!("RuntimeEndpoint: {}", link.display()),
        ),
    )
    .unwrap();
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(d.log_path())
        .unwrap();
    d.child = Some(
        std::process::Command::new(env!("CARGO_BIN_EXE_cimaged"))
            .arg("--config")
            .arg(d.config_path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let _ = std::fs::remove_file(d.socket());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !d.socket().exists() {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Up, and saying the runtime is not there.
    let out = d.cli(&["status"]);
    assert!(!out.status.success(), "healthy without a runtime");
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(said.contains(&link.display().to_string()), "{said}");
    // The runtime appears: healthy again and serving, without a restart.
    std::os::unix::fs::symlink(&tb.cri, &link).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !d.cli(&["status"]).status.success() {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = d.cli(&["pull", &img]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
}

#[test]
fn containerd_restarting_mid_range_fetch_leaves_no_lease_or_ingest_and_the_pull_ends() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tb = Testbed::get();
    let img = tb.push_new(
        "restart-fetch",
        &[Layer::busybox(), Layer::random(48 << 20)],
    );
    let big = img.blobs[1].clone();
    // 48 MiB at 8 MB/s: cimage's range fetch is under way when containerd goes.
    let proxy = common::proxy::Proxy::start(&tb, &tb.registry, 8_000_000);
    let d = Daemon::start(&proxied_registries(&tb, &proxy.addr));
    let reference = format!("{}/{}:1", proxy.addr, img.repo);
    let (socket, r) = (d.socket(), reference.clone());
    let pull = std::thread::spawn(move || cli_at(&socket, &["pull", &r]));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !ctr_k8s(&tb, &["content", "active"]).contains(&big) {
        assert!(
            std::time::Instant::now() < deadline,
            "cimage's ingest of the big layer never showed\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // cimage's lease for this pull: its label names the image.
    let ours = |tb: &Testbed| {
        ctr_k8s(tb, &["leases", "ls"])
            .lines()
            .any(|l| l.contains("cimage.io/fetch=") && l.contains(&img.repo))
    };
    assert!(ours(&tb), "{}", ctr_k8s(&tb, &["leases", "ls"]));
    tb.script(&["restart-containerd"]);
    let pull = pull.join().unwrap();
    // The blob cimage could not finish is the runtime's to fetch; the pull ends well.
    assert!(pull.status.success(), "{}\n{}", stderr(&pull), d.log());
    assert!(ctr_images(&tb).contains(&reference));
    assert!(!ours(&tb), "{}", ctr_k8s(&tb, &["leases", "ls"]));
    assert!(
        !ctr_k8s(&tb, &["content", "active"]).contains(&big),
        "{}",
        ctr_k8s(&tb, &["content", "active"])
    );
    // And the next cold pull of it works as usual.
    assert!(d.cli(&["rm", &reference]).status.success());
    let out = d.cli(&["pull", &reference]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let out = d.cli(&["run", &reference, "--", "/bin/busybox", "true"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let _ = d.cli(&["rm", &reference]);
}
