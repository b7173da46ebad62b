//! Long work is visible: pull progress with bytes from containerd, the pulls in flight and in
//! line, stall detection, and the metrics that count them, against the real testbed with a
//! pacing proxy in front of its registry.

mod common;

use std::time::{Duration, Instant};

use cimage::api::pb;
use common::images::Layer;
use common::proxy::Proxy;
use common::*;
use futures::StreamExt;

#[test]
fn a_slow_pull_shows_growing_bytes_and_waits_in_line_visibly() {
    let tb = Testbed::get();
    // 64 MiB through a 16 MB/s link: about four seconds of downloading.
    let big = tb.push_new("progress-big", &[Layer::busybox(), Layer::random(64 << 20)]);
    let small = tb.push_new("progress-small", &[Layer::busybox()]);
    let proxy = Proxy::start(&tb, &tb.registry, 16_000_000);
    let port = free_port();
    let d = Daemon::start(&format!(
        "MaxConcurrentPulls: 1\nMetricsAddr: 127.0.0.1:{port}\n{}",
        proxied_registries(&tb, &proxy.addr)
    ));
    let big_ref = format!("{}/{}:1", proxy.addr, big.repo);
    let small_ref = format!("{}/{}:1", proxy.addr, small.repo);

    // The big pull, followed over the API.
    let socket = d.socket();
    let image = big_ref.clone();
    let follower = std::thread::spawn(move || {
        block_on(async move {
            let mut c = cimage::api::client(&socket);
            let mut stream = c
                .pull_stream(pb::PullRequest {
                    image,
                    policy: pb::PullPolicy::IfNotPresent as i32,
                    credentials: None,
                })
                .await
                .unwrap()
                .into_inner();
            let mut seen = Vec::new();
            let mut done = None;
            while let Some(ev) = stream.next().await {
                match ev.unwrap().event {
                    Some(pb::pull_event::Event::Progress(p)) => seen.push(p),
                    Some(pb::pull_event::Event::Done(r)) => done = Some(r),
                    None => {}
                }
            }
            (seen, done)
        })
    });

    // While it downloads, `cimage pulls` lists it; a second pull waits in line behind it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let out = d.cli(&["pulls", "-o", "json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let pulls: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if let Some(p) = pulls
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["image"] == big_ref.as_str() && p["phase"] == "downloading")
        {
            break p.clone();
        }
        assert!(Instant::now() < deadline, "the pull never showed: {pulls}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(listed["requesters"], 1, "{listed}");
    let (socket, small_image) = (d.socket(), small_ref.clone());
    let queued_pull = std::thread::spawn(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cimage"))
            .args(["--socket", socket.to_str().unwrap(), "pull", &small_image])
            .output()
            .unwrap();
        (out.status.success(), stderr(&out))
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let (table, queued) = loop {
        let out = d.cli(&["pulls", "-o", "json"]);
        let pulls: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if let Some(p) = pulls
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["image"] == small_ref.as_str() && p["phase"] == "queued")
        {
            break (stdout(&d.cli(&["pulls"])), p.clone());
        }
        assert!(Instant::now() < deadline, "the queued pull never showed");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(queued["phase"], "queued", "{queued}");
    assert_eq!(queued["queue_position"], 1, "{queued}");
    assert!(
        table.contains("queued #1") && table.contains(&small_ref) && table.contains(&big_ref),
        "{table}"
    );
    let page = scrape(port);
    assert_eq!(series(&page, "cimage_pulls_in_flight"), 2.0, "{page}");
    assert_eq!(series(&page, "cimage_pulls_queued"), 1.0, "{page}");

    let (seen, done) = follower.join().unwrap();
    let done = done.expect("the stream ends with the result");
    assert_eq!(done.action, "pulled");
    let downloading: Vec<u64> = seen
        .iter()
        .filter(|p| p.phase == "downloading" && p.bytes_known)
        .map(|p| p.done_bytes)
        .collect();
    let rising = downloading.windows(2).filter(|w| w[1] > w[0]).count();
    assert!(
        rising >= 3,
        "at least three reports of growing bytes: {downloading:?}"
    );
    let last = seen.last().unwrap();
    assert_eq!(last.phase, "done");
    assert_eq!(
        (last.done_bytes, last.total_bytes),
        (big.layer_bytes, big.layer_bytes),
        "the bytes end at the manifest's layer total"
    );
    assert!(seen
        .iter()
        .all(|p| p.total_bytes == big.layer_bytes || p.total_bytes == 0));
    let (ok, err) = queued_pull.join().unwrap();
    assert!(ok, "{err}");
    // Not a terminal: one line per phase change on stderr, no carriage returns.
    assert!(
        err.contains(&format!("pull {small_ref}: queued (#1)")) && !err.contains('\r'),
        "{err}"
    );

    let page = scrape(port);
    let reg = format!("registry=\"{}\"", proxy.addr);
    assert_eq!(
        series(
            &page,
            &format!("cimage_runtime_pulls_total{{{reg},result=\"pulled\"}}")
        ),
        2.0,
        "{page}"
    );
    assert!(series(&page, &format!("cimage_pulled_bytes_total{{{reg}}}")) >= big.size as f64);
    assert_eq!(
        series(
            &page,
            &format!("cimage_pull_duration_seconds_count{{{reg}}}")
        ),
        2.0
    );
    assert_eq!(
        series(
            &page,
            "cimage_requests_total{policy=\"IfNotPresent\",result=\"pulled\"}"
        ),
        2.0
    );
    assert_eq!(series(&page, "cimage_pulls_in_flight"), 0.0);
    assert_eq!(series(&page, "cimage_pulls_queued"), 0.0);
    assert_eq!(
        series(
            &page,
            &format!(
                "cimage_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    assert!(series(&page, "cimage_last_reconcile_timestamp_seconds") > 1.7e9);
}

#[test]
fn a_registry_that_stops_sending_mid_blob_fails_the_pull_at_the_stall_timeout() {
    let tb = Testbed::get();
    let img = tb.push_new("stall", &[Layer::random(8 << 20)]);
    let proxy = Proxy::start(&tb, &tb.registry, 4_000_000);
    let port = free_port();
    let d = Daemon::start(&format!(
        "PullStallTimeout: 3s\nPullRetries: 0\nMetricsAddr: 127.0.0.1:{port}\n{}",
        proxied_registries(&tb, &proxy.addr)
    ));
    // The manifest and config go through; the layer stops after its first MiB.
    proxy.stall_after(1 << 20);
    let reference = format!("{}/{}:1", proxy.addr, img.repo);
    let t = Instant::now();
    let out = d.cli(&["pull", &reference]);
    let took = t.elapsed();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("no progress for 3s from {}", proxy.addr)),
        "{err}"
    );
    assert!(
        took < Duration::from_secs(3 + 5),
        "failed after {took:?}, not at the stall timeout"
    );
    let log = d.log();
    assert!(
        log.contains("pull started") && log.contains("pull stalled") && log.contains("pull failed"),
        "{log}"
    );
    let page = scrape(port);
    assert_eq!(
        series(
            &page,
            &format!(
                "cimage_pull_failures_total{{registry=\"{}\",reason=\"stalled\"}}",
                proxy.addr
            )
        ),
        1.0,
        "{page}"
    );
}

#[test]
fn a_metrics_address_in_use_stops_cimaged_at_start() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let tb = Testbed::get();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "CraneBaseDir: {base}\nContainer:\n  Enabled: true\n  RuntimeEndpoint: {cri}\nImageCache:\n  Socket: {base}/s.sock\n  StateDir: state/\n  NodeKeyFile: {base}/node.key\n  MetricsAddr: 127.0.0.1:{port}\n  ImageService:\n    Enabled: false\n",
            base = dir.path().display(),
            cri = tb.cri.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cimaged"))
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ImageCache.MetricsAddr") && err.contains(&port.to_string()),
        "{err}"
    );
}
