//! cimage's benchmark: cimage measured side by side with the raw runtime in one run, against the
//! testbed's real containerd and registry. Run it with `scripts/bench` (which starts a private
//! testbed); it prints one table of ratios.
//!
//! - cold pull via cimage vs raw CRI `PullImage` (4 × 16 MiB layers; 100 small layers)
//! - warm `IfNotPresent` through cimage's gRPC API (p50/p99), beside raw CRI `ImageStatus`
//! - `Always` with an unchanged digest vs one registry HEAD
//! - 50 concurrent requests for one cold image: `PullImage` calls and wall time vs one pull
//! - launch-to-exit of a trivial task on a warm image: `cimage run` (the CLI process) and the gRPC
//!   `Launch` stream vs the raw CRI sequence (RunPodSandbox, CreateContainer, StartContainer,
//!   ContainerStatus polling, RemoveContainer, StopPodSandbox, RemovePodSandbox), 30 runs each
//! - a pre-warm run of 20 synthetic images at concurrency 2 vs the same pulls issued by raw CRI at
//!   concurrency 2, and `IfNotPresent` checks of a cached image during the run vs idle

#[path = "../tests/common/images.rs"]
#[allow(dead_code)]
mod images;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cimage::api::pb;
use images::{push, Layer};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, ImageStatusRequest, PullImageRequest, RemoveImageRequest};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use tonic::transport::Channel;

const REPS: usize = 5;

/// Whether a section runs: all by default, or those listed in `CIMAGE_BENCH_ONLY`
/// (comma-separated: cold, warm, always, herd, launch, prewarm).
fn want(section: &str) -> bool {
    match std::env::var("CIMAGE_BENCH_ONLY") {
        Ok(list) if !list.is_empty() => list.split(',').any(|s| s.trim() == section),
        _ => true,
    }
}
const LAUNCHES: usize = 30;

fn env_file() -> std::collections::HashMap<String, String> {
    let dir = std::env::var("CIMAGE_TESTBED_DIR").unwrap_or_else(|_| "/tmp/cimage-testbed".into());
    let text = std::fs::read_to_string(Path::new(&dir).join("env"))
        .expect("the benchmark needs the testbed: run scripts/bench (or scripts/testbed up)");
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.into(),
        ..Default::default()
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[idx]
}

struct Daemon {
    child: Child,
    log: PathBuf,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(cri: &str, registry: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cimaged.sock");
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "CraneBaseDir: {}\nContainer:\n  Enabled: true\n  RuntimeEndpoint: {cri}\nImageCache:\n  Socket: {}\n  MaxConcurrentPulls: 3\n  Registries:\n    \"{registry}\":\n      Insecure: true\n",
                dir.path().display(),
                socket.display()
            ),
        )
        .unwrap();
        let log = dir.path().join("cimaged.log");
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cimaged"))
            .arg("--config")
            .arg(&config)
            .env("CIMAGE_LOG", "warn,cimage::puller=debug")
            .stderr(f)
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Daemon {
            child,
            log,
            socket,
            _dir: dir,
        }
    }

    fn pull_calls(&self, image: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("calling PullImage") && l.contains(image))
            .count()
    }

    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

struct Bench {
    cri: ImageServiceClient<Channel>,
    api: pb::image_cache_client::ImageCacheClient<Channel>,
}

impl Bench {
    async fn remove(&mut self, image: &str) {
        let _ = self
            .cri
            .remove_image(RemoveImageRequest { image: spec(image) })
            .await;
    }

    async fn raw_pull(&mut self, image: &str) -> Duration {
        let t = Instant::now();
        self.cri
            .pull_image(PullImageRequest {
                image: spec(image),
                auth: None,
                sandbox_config: None,
            })
            .await
            .expect("raw PullImage");
        t.elapsed()
    }

    async fn cimage_pull(&mut self, image: &str, policy: pb::PullPolicy) -> (Duration, String) {
        let t = Instant::now();
        let r = self
            .api
            .pull(pb::PullRequest {
                image: image.into(),
                policy: policy as i32,
                credentials: None,
            })
            .await
            .expect("cimage Pull")
            .into_inner();
        (t.elapsed(), r.action)
    }

    /// Median cold pull through cimage and through raw CRI, alternating which goes first.
    async fn cold(&mut self, image: &str) -> (Duration, Duration) {
        let (mut raw, mut via) = (Vec::new(), Vec::new());
        for rep in 0..REPS {
            for first_raw in [rep % 2 == 0, rep % 2 != 0] {
                self.remove(image).await;
                if first_raw {
                    raw.push(self.raw_pull(image).await);
                } else {
                    let (d, action) = self.cimage_pull(image, pb::PullPolicy::IfNotPresent).await;
                    assert_eq!(action, "pulled", "cold pull must pull");
                    via.push(d);
                }
            }
        }
        (percentile(&mut via, 0.5), percentile(&mut raw, 0.5))
    }
}

fn row(name: &str, cimage: String, raw: String, ratio: String, target: &str) {
    println!("{name:<44} {cimage:>16} {raw:>16} {ratio:>8}  {target}");
}

#[tokio::main]
async fn main() {
    let env = env_file();
    let registry = env["CIMAGE_TESTBED_REGISTRY"].clone();
    let cri_path = env["CIMAGE_TESTBED_CRI"].clone();
    let run = format!("{:06x}", rand::random::<u32>() & 0xffffff);

    eprintln!("bench: pushing synthetic images to {registry} ...");
    let big_layers: Vec<Layer> = (0..4).map(|_| Layer::random(16 << 20)).collect();
    let big = push(
        &registry,
        &format!("bench-big-{run}"),
        "1",
        &big_layers,
        &["sh"],
    )
    .await;
    let many_layers: Vec<Layer> = (0..100).map(|_| Layer::random(8 << 10)).collect();
    let many = push(
        &registry,
        &format!("bench-many-{run}"),
        "1",
        &many_layers,
        &["sh"],
    )
    .await;
    let herd_layers: Vec<Layer> = (0..4).map(|_| Layer::random(16 << 20)).collect();
    let herd = push(
        &registry,
        &format!("bench-herd-{run}"),
        "1",
        &herd_layers,
        &["sh"],
    )
    .await;

    let daemon = Daemon::start(&cri_path, &registry);
    let mut b = Bench {
        cri: ImageServiceClient::new(cimage::cri::unix_channel(Path::new(&cri_path))),
        api: cimage::api::client(&daemon.socket),
    };

    println!();
    println!("cimage benchmark: containerd CRI at {cri_path}, docker-registry at {registry}");
    println!("cold pulls: median of {REPS} each, cimage and raw alternating; latencies from the client's side");
    println!();
    row(
        "measurement",
        "cimage".into(),
        "raw runtime".into(),
        "ratio".into(),
        "target",
    );
    println!("{}", "-".repeat(100));

    if want("cold") {
        eprintln!("bench: cold pulls ...");
        for (label, image) in [
            ("cold pull, 4 x 16 MiB layers", &big.reference),
            ("cold pull, 100 x 8 KiB layers", &many.reference),
        ] {
            let (via, raw) = b.cold(image).await;
            row(
                label,
                format!("{:.1} ms", ms(via)),
                format!("{:.1} ms", ms(raw)),
                format!("{:.3}x", ms(via) / ms(raw)),
                "<= 1.05x",
            );
        }
    }
    let image = big.reference.clone();
    if want("warm") {
        eprintln!("bench: warm IfNotPresent ...");
        b.cimage_pull(&image, pb::PullPolicy::IfNotPresent).await;
        let (mut warm, mut status) = (Vec::new(), Vec::new());
        for _ in 0..1000 {
            let t = Instant::now();
            b.cri
                .image_status(ImageStatusRequest {
                    image: spec(&image),
                    verbose: false,
                })
                .await
                .unwrap();
            status.push(t.elapsed());
            let (d, action) = b.cimage_pull(&image, pb::PullPolicy::IfNotPresent).await;
            assert_eq!(action, "cached");
            warm.push(d);
        }
        let (w50, w99) = (percentile(&mut warm, 0.5), percentile(&mut warm, 0.99));
        let (s50, s99) = (percentile(&mut status, 0.5), percentile(&mut status, 0.99));
        row(
            "warm IfNotPresent p50 (raw: ImageStatus)",
            format!("{:.2} ms", ms(w50)),
            format!("{:.2} ms", ms(s50)),
            format!("{:.2}x", ms(w50) / ms(s50)),
            "",
        );
        row(
            "warm IfNotPresent p99 (raw: ImageStatus)",
            format!("{:.2} ms", ms(w99)),
            format!("{:.2} ms", ms(s99)),
            format!("{:.2}x", ms(w99) / ms(s99)),
            "p99 <= 5 ms",
        );
    }
    if want("always") {
        eprintln!("bench: Always with unchanged digest ...");
        b.cimage_pull(&image, pb::PullPolicy::IfNotPresent).await;
        let oci = oci_client::Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..Default::default()
        });
        let reference: oci_client::Reference = image.parse().unwrap();
        let (mut always, mut head) = (Vec::new(), Vec::new());
        for _ in 0..200 {
            let t = Instant::now();
            oci.fetch_manifest_digest(&reference, &RegistryAuth::Anonymous)
                .await
                .unwrap();
            head.push(t.elapsed());
            let (d, action) = b.cimage_pull(&image, pb::PullPolicy::Always).await;
            assert_eq!(action, "cached");
            always.push(d);
        }
        let (a50, h50) = (percentile(&mut always, 0.5), percentile(&mut head, 0.5));
        row(
            "Always, digest unchanged p50 (raw: one HEAD)",
            format!("{:.2} ms", ms(a50)),
            format!("{:.2} ms", ms(h50)),
            format!("{:.2}x", ms(a50) / ms(h50)),
            "no PullImage",
        );
    }
    if want("herd") {
        eprintln!("bench: 50 concurrent requests for one cold image ...");
        b.remove(&herd.reference).await;
        let one = b.raw_pull(&herd.reference).await;
        b.remove(&herd.reference).await;
        let before = daemon.pull_calls(&herd.reference);
        let t = Instant::now();
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let mut api = b.api.clone();
                let image = herd.reference.clone();
                tokio::spawn(async move {
                    api.pull(pb::PullRequest {
                        image,
                        policy: pb::PullPolicy::IfNotPresent as i32,
                        credentials: None,
                    })
                    .await
                    .expect("herd pull")
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let wall = t.elapsed();
        let calls = daemon.pull_calls(&herd.reference) - before;
        row(
            "50 concurrent requests, one cold image",
            format!("{:.1} ms", ms(wall)),
            format!("{:.1} ms", ms(one)),
            format!("{:.3}x", ms(wall) / ms(one)),
            "<= 1.1x",
        );
        row(
            "  PullImage calls for those 50 requests",
            format!("{calls}"),
            "-".into(),
            "-".into(),
            "= 1",
        );
    }
    if want("launch") {
        eprintln!("bench: launch-to-exit, {LAUNCHES} runs each ...");
        let (mut raw, mut grpc, mut cli) = launches(&daemon, &cri_path, &registry).await;
        for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
            let r = percentile(&mut raw, p);
            let g = percentile(&mut grpc, p);
            let c = percentile(&mut cli, p);
            row(
                &format!("launch-to-exit {label}, gRPC Launch"),
                format!("{:.1} ms", ms(g)),
                format!("{:.1} ms", ms(r)),
                format!("{:+.1} ms", ms(g) - ms(r)),
                if p == 0.5 { "+<= 10 ms at p50" } else { "" },
            );
            row(
                &format!("launch-to-exit {label}, cimage run (CLI)"),
                format!("{:.1} ms", ms(c)),
                format!("{:.1} ms", ms(r)),
                format!("{:+.1} ms", ms(c) - ms(r)),
                "",
            );
        }
    }
    if want("prewarm") {
        eprintln!("bench: pre-warm of 20 images at concurrency 2 ...");
        prewarm(&daemon, &mut b, &registry, &run).await;
    }
    println!("{}", "-".repeat(100));
    println!(
        "cimaged peak RSS: {:.1} MiB",
        daemon.peak_rss_kib() as f64 / 1024.0
    );

    for image in [&big.reference, &many.reference, &herd.reference] {
        b.remove(image).await;
    }
}

/// Launch-to-exit of `true` on a warm busybox image: raw CRI sequence, cimage's gRPC `Launch`,
/// and the `cimage run` CLI, interleaved so that drift hits all three alike. The raw sequence goes
/// through cimage's CRI adapter, whose calls map one to one onto CRI requests, with the same pod
/// and container shape and the same 5 ms status polling.
async fn launches(
    daemon: &Daemon,
    cri_path: &str,
    registry: &str,
) -> (Vec<Duration>, Vec<Duration>, Vec<Duration>) {
    use cimage::runtime::{ContainerSpec, ContainerState, PodSpec, TaskRuntime};
    use futures::StreamExt;
    let image = format!("{registry}/busybox:1");
    let rt = cimage::cri::CriTaskRuntime::new(Path::new(cri_path), Duration::from_secs(30));
    let mut api = cimage::api::client(&daemon.socket);
    api.pull(pb::PullRequest {
        image: image.clone(),
        policy: pb::PullPolicy::IfNotPresent as i32,
        credentials: None,
    })
    .await
    .unwrap();
    let image_id = api
        .inspect_image(pb::InspectImageRequest {
            image: image.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let logs = tempfile::tempdir().unwrap();
    let mut launcher = cimage::api::launcher_client(&daemon.socket);
    let (mut raw, mut grpc, mut cli) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..=LAUNCHES {
        let t = Instant::now();
        let pod = PodSpec {
            name: format!("bench-raw-{i}"),
            uid: format!("{:016x}", rand::random::<u64>()),
            namespace: "bench".into(),
            hostname: String::new(),
            log_directory: logs.path().to_owned(),
            labels: Default::default(),
        };
        let sid = rt.run_pod(&pod).await.unwrap();
        let spec = ContainerSpec {
            name: "step".into(),
            image: image_id.clone(),
            command: vec!["true".into()],
            log_path: format!("raw-{i}.log"),
            ..Default::default()
        };
        let cid = rt.create_container(&sid, &pod, &spec).await.unwrap();
        rt.start_container(&cid).await.unwrap();
        while rt.container_status(&cid).await.unwrap().unwrap().state != ContainerState::Exited {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        rt.remove_container(&cid).await.unwrap();
        rt.stop_pod(&sid).await.unwrap();
        rt.remove_pod(&sid).await.unwrap();
        let d_raw = t.elapsed();

        let t = Instant::now();
        let mut stream = launcher
            .launch(pb::LaunchRequest {
                image: image.clone(),
                policy: pb::PullPolicy::IfNotPresent as i32,
                command: vec!["true".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        while let Some(ev) = stream.next().await {
            if let Some(pb::task_event::Event::CleanedUp(_)) = ev.unwrap().event {
                break;
            }
        }
        let d_grpc = t.elapsed();

        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_cimage"))
            .args(["run", "--image", &image, "--", "true"])
            .env("CIMAGE_SOCKET", &daemon.socket)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let d_cli = t.elapsed();
        // The first round warms every path and is not counted.
        if i > 0 {
            raw.push(d_raw);
            grpc.push(d_grpc);
            cli.push(d_cli);
        }
    }
    (raw, grpc, cli)
}

/// A pre-warm run of 20 fresh images at concurrency 2 vs the same 20 pulls by raw CRI at
/// concurrency 2 (two workers taking images off one list), with `IfNotPresent` checks of a cached
/// image measured while the pre-warm runs and while idle.
async fn prewarm(daemon: &Daemon, b: &mut Bench, registry: &str, run: &str) {
    use futures::StreamExt;
    const N: usize = 20;
    let mut raw_set = Vec::new();
    let mut warm_set = Vec::new();
    for i in 0..N {
        let layers = vec![Layer::random(2 << 20), Layer::random(2 << 20)];
        raw_set.push(
            push(
                registry,
                &format!("bench-pw-raw-{run}-{i}"),
                "1",
                &layers,
                &["sh"],
            )
            .await
            .reference,
        );
        let layers = vec![Layer::random(2 << 20), Layer::random(2 << 20)];
        warm_set.push(
            push(
                registry,
                &format!("bench-pw-{run}-{i}"),
                "1",
                &layers,
                &["sh"],
            )
            .await
            .reference,
        );
    }
    let probe = format!("{registry}/busybox:1");
    b.cimage_pull(&probe, pb::PullPolicy::IfNotPresent).await;

    // Raw CRI: two workers pulling from one queue.
    let queue = std::sync::Arc::new(std::sync::Mutex::new(raw_set.clone()));
    let t = Instant::now();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let q = queue.clone();
            let mut cri = b.cri.clone();
            tokio::spawn(async move {
                loop {
                    let next = q.lock().unwrap().pop();
                    let Some(image) = next else { break };
                    cri.pull_image(PullImageRequest {
                        image: spec(&image),
                        auth: None,
                        sandbox_config: None,
                    })
                    .await
                    .expect("raw PullImage");
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let raw = t.elapsed();

    // Idle latency of IfNotPresent on a cached image, and of the raw ImageStatus beneath it.
    let (mut idle, mut idle_raw) = (Vec::new(), Vec::new());
    for _ in 0..300 {
        idle.push(b.cimage_pull(&probe, pb::PullPolicy::IfNotPresent).await.0);
        let t = Instant::now();
        b.cri
            .image_status(ImageStatusRequest {
                image: spec(&probe),
                verbose: false,
            })
            .await
            .unwrap();
        idle_raw.push(t.elapsed());
    }

    let mut m = cimage::api::maintenance_client(&daemon.socket);
    m.add_schedule(pb::Schedule {
        name: "bench".into(),
        cron: "0 3 1 1 *".into(),
        images: warm_set.clone(),
        concurrency: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let t = Instant::now();
    let mut stream = m
        .run_schedule(pb::ScheduleRef {
            name: "bench".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut api = b.api.clone();
    let mut raw_cri = b.cri.clone();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let finished = done.clone();
    let probing = tokio::spawn(async move {
        let (mut busy, mut busy_raw) = (Vec::new(), Vec::new());
        while !finished.load(std::sync::atomic::Ordering::SeqCst) {
            let t = Instant::now();
            api.pull(pb::PullRequest {
                image: probe.clone(),
                policy: pb::PullPolicy::IfNotPresent as i32,
                credentials: None,
            })
            .await
            .unwrap();
            busy.push(t.elapsed());
            let t = Instant::now();
            raw_cri
                .image_status(ImageStatusRequest {
                    image: spec(&probe),
                    verbose: false,
                })
                .await
                .unwrap();
            busy_raw.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (busy, busy_raw)
    });
    let mut pulled = 0;
    while let Some(p) = stream.next().await {
        if let Some(pb::run_progress::Progress::Done(r)) = p.unwrap().progress {
            assert_eq!(r.outcome, "ok", "pre-warm run: {:?}", r.images);
            pulled = r.images.iter().filter(|i| i.outcome == "pulled").count();
        }
    }
    let warm = t.elapsed();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut busy, mut busy_raw) = probing.await.unwrap();
    assert_eq!(pulled, N);
    row(
        "pre-warm 20 x 4 MiB images, concurrency 2",
        format!("{:.0} ms", ms(warm)),
        format!("{:.0} ms", ms(raw)),
        format!("{:.3}x", ms(warm) / ms(raw)),
        "<= 1.2x",
    );
    if !busy.is_empty() {
        let (i99, b99) = (percentile(&mut idle, 0.99), percentile(&mut busy, 0.99));
        row(
            "IfNotPresent p99 during pre-warm (vs idle)",
            format!("{:.2} ms", ms(b99)),
            format!("{:.2} ms", ms(i99)),
            format!("{:.2}x", ms(b99) / ms(i99)),
            "<= 2x idle",
        );
        let (ri99, rb99) = (
            percentile(&mut idle_raw, 0.99),
            percentile(&mut busy_raw, 0.99),
        );
        row(
            "  raw ImageStatus p99 during pre-warm (vs idle)",
            format!("{:.2} ms", ms(rb99)),
            format!("{:.2} ms", ms(ri99)),
            format!("{:.2}x", ms(rb99) / ms(ri99)),
            "the runtime's own",
        );
        let (b50, r50) = (percentile(&mut busy, 0.5), percentile(&mut busy_raw, 0.5));
        row(
            "  p50 during pre-warm: IfNotPresent vs ImageStatus",
            format!("{:.2} ms", ms(b50)),
            format!("{:.2} ms", ms(r50)),
            format!("{:+.2} ms", ms(b50) - ms(r50)),
            "",
        );
    }
    for image in raw_set.iter().chain(warm_set.iter()) {
        b.remove(image).await;
    }
}
