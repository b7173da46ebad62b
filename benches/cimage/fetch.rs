//! cimage's parallel range fetch (`ImageCache.ParallelFetch`) against containerd's own
//! `PullImage`, side by side in one run, alternating, cold each time on both sides, through the
//! link shaper at three shapes: (a) none, (b) 20 ms one way, 8 MB/s per connection, 64 MB/s in
//! all, (c) 20 ms one way, 40 MB/s per connection, 48 MB/s in all; for one 512 MiB layer,
//! 8 × 64 MiB layers and the Debian-with-python image (when `CIMAGE_BENCH_ROOTFS` is there).
//! Also: the bytes that crossed the link per pull against the image's layer bytes, cimaged's
//! resident memory during the 512 MiB pulls against idle, and a timeline of one pull (when each
//! blob was committed and each layer unpacked, from containerd's content and snapshots).

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cimage::api::pb;
use k8s_cri::v1::image_service_client::ImageServiceClient;

use crate::images::{push, Layer, Pushed};
use crate::rig::{ms, percentile, row, Bench, Daemon};
use crate::shaper::{Shape, Shaper};

/// Cold pulls per side and row (`CIMAGE_BENCH_FETCH_REPS`, default 3: a raw 512 MiB pull at
/// 8 MB/s takes a minute).
fn reps() -> usize {
    std::env::var("CIMAGE_BENCH_FETCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// `ctr -n k8s.io ARGS` on the testbed's containerd, its output's lines.
fn ctr(cri: &str, args: &[&str]) -> Vec<String> {
    let out = Command::new("ctr")
        .args(["--address", cri, "-n", "k8s.io"])
        .args(args)
        .output()
        .expect("running ctr");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// CPU seconds (user + system) a process has used so far, from `/proc/PID/stat`; 0 when it
/// is not there.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command (which may hold spaces) start after its closing ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are the 14th and 15th fields: 12th and 13th after the command.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The processes whose CPU a pull costs: cimaged, containerd, and the rest of the path
/// (docker-registry and this process, which runs the link shaper).
struct Cpu {
    cimaged: u32,
    containerd: u32,
    registry: u32,
}

/// CPU seconds one pull cost each of [`Cpu`]'s processes.
#[derive(Clone, Copy, Default)]
struct CpuUse {
    cimaged: f64,
    containerd: f64,
    path: f64,
}

impl Cpu {
    fn now(&self) -> CpuUse {
        CpuUse {
            cimaged: cpu_seconds(self.cimaged),
            containerd: cpu_seconds(self.containerd),
            path: cpu_seconds(self.registry) + cpu_seconds(std::process::id()),
        }
    }

    fn since(&self, before: CpuUse) -> CpuUse {
        let now = self.now();
        CpuUse {
            cimaged: now.cimaged - before.cimaged,
            containerd: now.containerd - before.containerd,
            path: now.path - before.path,
        }
    }
}

/// The median of each field over pulls.
fn median_cpu(v: &[CpuUse]) -> CpuUse {
    let mid = |f: fn(&CpuUse) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(|a, b| a.partial_cmp(b).unwrap());
        x.get(x.len() / 2).copied().unwrap_or(0.0)
    };
    CpuUse {
        cimaged: mid(|c| c.cimaged),
        containerd: mid(|c| c.containerd),
        path: mid(|c| c.path),
    }
}

/// One side's median over its cold pulls.
struct Side {
    time: Duration,
    bytes: u64,
    cpu: CpuUse,
}

/// Median cold pull through cimage and through raw CRI, alternating which goes first, with
/// the median bytes that crossed the link and the CPU each pull cost.
async fn cold(
    b: &mut Bench,
    shaper: &Shaper,
    image: &str,
    d: &Daemon,
    cpu: &Cpu,
    rss_peak: &mut u64,
) -> (Side, Side) {
    let (mut raw, mut via, mut raw_bytes, mut via_bytes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut raw_cpu, mut via_cpu) = (Vec::new(), Vec::new());
    for rep in 0..reps() {
        for first_raw in [rep % 2 == 0, rep % 2 != 0] {
            b.remove(image).await;
            let before = shaper.bytes_down();
            let cpu_before = cpu.now();
            if first_raw {
                raw.push(b.raw_pull(image).await);
                raw_bytes.push(shaper.bytes_down() - before);
                raw_cpu.push(cpu.since(cpu_before));
            } else {
                let watch = RssWatch::start(d);
                let (t, action) = b.cimage_pull(image, pb::PullPolicy::IfNotPresent).await;
                via_cpu.push(cpu.since(cpu_before));
                *rss_peak = (*rss_peak).max(watch.stop());
                assert_eq!(action, "pulled", "cold pull must pull");
                via.push(t);
                via_bytes.push(shaper.bytes_down() - before);
            }
        }
    }
    b.remove(image).await;
    via_bytes.sort();
    raw_bytes.sort();
    (
        Side {
            time: percentile(&mut via, 0.5),
            bytes: via_bytes[via_bytes.len() / 2],
            cpu: median_cpu(&via_cpu),
        },
        Side {
            time: percentile(&mut raw, 0.5),
            bytes: raw_bytes[raw_bytes.len() / 2],
            cpu: median_cpu(&raw_cpu),
        },
    )
}

/// Samples a daemon's resident memory every 20 ms while a pull runs.
struct RssWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssWatch {
    fn start(d: &Daemon) -> Self {
        let pid = d.child.id();
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !s.load(Ordering::SeqCst) {
                peak = peak.max(rss_of(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        RssWatch { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// One cold pull through cimage of `image`, with when each of its blobs was committed and
/// when the runtime's snapshots (unpacked layers) grew, from the pull's start.
async fn timeline(b: &mut Bench, cri: &str, image: &str, layers: &[String]) {
    b.remove(image).await;
    let layers: Vec<String> = layers.to_vec();
    let snapshots_before = ctr(cri, &["snapshots", "ls"]).len();
    let stop = Arc::new(AtomicBool::new(false));
    let (s, cri_path, want) = (Arc::clone(&stop), cri.to_owned(), layers.clone());
    let watcher = std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut events = Vec::new();
        let mut committed = vec![false; want.len()];
        let mut unpacked = 0;
        while !s.load(Ordering::SeqCst) {
            let content = ctr(&cri_path, &["content", "ls", "-q"]);
            for (i, d) in want.iter().enumerate() {
                if !committed[i] && content.iter().any(|c| c == d) {
                    committed[i] = true;
                    events.push((t0.elapsed(), format!("layer {} committed", i + 1)));
                }
            }
            let snaps = ctr(&cri_path, &["snapshots", "ls"])
                .len()
                .saturating_sub(snapshots_before);
            while unpacked < snaps.min(want.len()) {
                unpacked += 1;
                events.push((t0.elapsed(), format!("layer {unpacked} unpacked")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        events
    });
    let (t, _) = b.cimage_pull(image, pb::PullPolicy::IfNotPresent).await;
    stop.store(true, Ordering::SeqCst);
    let events = watcher.join().unwrap();
    println!(
        "  timeline of one cimage pull (8 x 64 MiB, shape b; containerd's content and snapshots looked at every 100 ms):"
    );
    for (at, what) in events {
        println!("    {:>7.1} s  {what}", at.as_secs_f64());
    }
    println!("    {:>7.1} s  the pull returned", t.as_secs_f64());
    b.remove(image).await;
}

/// The section: every shape, every image, both sides.
pub(crate) async fn fetch(cri: &str, registry: &str, run: &str, rootfs: Option<&(Vec<u8>, usize)>) {
    let dir = std::env::var("CIMAGE_TESTBED_DIR").unwrap_or_else(|_| "/tmp/cimage-testbed".into());
    eprintln!("bench: fetch: pushing 1 x 512 MiB and 8 x 64 MiB ...");
    let one = push(
        registry,
        &format!("bench-fetch-512-{run}"),
        "1",
        &[Layer::random(512 << 20)],
        &["sh"],
    )
    .await;
    let eight = push(
        registry,
        &format!("bench-fetch-8x64-{run}"),
        "1",
        &(0..8).map(|_| Layer::random(64 << 20)).collect::<Vec<_>>(),
        &["sh"],
    )
    .await;
    let debian = match rootfs {
        Some((tar, _)) => Some(
            push(
                registry,
                &format!("bench-fetch-debian-{run}"),
                "1",
                &[Layer::tarball(tar.clone())],
                &["python3"],
            )
            .await,
        ),
        None => None,
    };
    let shaper = Shaper::start(registry, Shape::none()).plain_http_for_containerd(Path::new(&dir));
    let d = Daemon::start(cri, &shaper.addr);
    let mut b = Bench {
        cri: ImageServiceClient::new(cimage::cri::unix_channel(Path::new(cri))),
        api: cimage::api::client(&d.socket),
    };
    let at = |p: &Pushed| p.reference.replacen(registry, &shaper.addr, 1);
    let mut images = vec![("1 x 512 MiB", at(&one), one.layer_bytes, true)];
    images.push(("8 x 64 MiB", at(&eight), eight.layer_bytes, false));
    if let Some(p) = &debian {
        images.push(("Debian+python3", at(p), p.layer_bytes, false));
    }
    let shapes = [
        ("a", Shape::none(), ""),
        (
            "b",
            Shape::far(Duration::from_millis(20), 8_000_000, 64_000_000),
            "",
        ),
        (
            "c",
            Shape::far(Duration::from_millis(20), 40_000_000, 48_000_000),
            "<= 1.0x",
        ),
    ];
    let pid_in = |name: &str| -> u32 {
        std::fs::read_to_string(Path::new(&dir).join(format!("{name}.pid")))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0)
    };
    let cpu = Cpu {
        cimaged: d.child.id(),
        containerd: pid_in("containerd"),
        registry: pid_in("registry"),
    };
    let idle = d.rss_kib();
    let mut peak_512 = 0;
    // `CIMAGE_BENCH_FETCH_SHAPES` picks shapes (default `abc`).
    let only = std::env::var("CIMAGE_BENCH_FETCH_SHAPES").unwrap_or_else(|_| "abc".into());
    for (shape, s, target) in shapes.iter().filter(|(n, _, _)| only.contains(n)) {
        shaper.reshape(*s);
        for (label, image, layer_bytes, is_512) in &images {
            eprintln!("bench: fetch: shape {shape}, {label} ...");
            let mut peak = 0;
            let (via_side, raw_side) = cold(&mut b, &shaper, image, &d, &cpu, &mut peak).await;
            let (via, via_b, raw, raw_b) =
                (via_side.time, via_side.bytes, raw_side.time, raw_side.bytes);
            if *is_512 {
                peak_512 = peak_512.max(peak);
            }
            let target = match (*shape, *label) {
                ("b", "1 x 512 MiB") => "<= 0.35x",
                ("b", "8 x 64 MiB") => "<= 0.6x",
                _ => target,
            };
            row(
                &format!("fetch ({shape}) cold pull, {label}"),
                format!("{:.0} ms", ms(via)),
                format!("{:.0} ms", ms(raw)),
                format!("{:.3}x", ms(via) / ms(raw)),
                target,
            );
            row(
                "  bytes over the link / layer bytes",
                format!("{:.4}", via_b as f64 / *layer_bytes as f64),
                format!("{:.4}", raw_b as f64 / *layer_bytes as f64),
                "-".into(),
                "1 each",
            );
            let (v, r) = (via_side.cpu, raw_side.cpu);
            row(
                "  CPU s per pull: cimaged / containerd / registry+shaper",
                format!("{:.1} / {:.1} / {:.1}", v.cimaged, v.containerd, v.path),
                format!("- / {:.1} / {:.1}", r.containerd, r.path),
                format!(
                    "{:.2}x",
                    (v.cimaged + v.containerd + v.path) / (r.containerd + r.path).max(0.001)
                ),
                "-",
            );
        }
    }
    row(
        "fetch: cimaged RSS during 512 MiB pulls",
        format!("{:.1} MiB", peak_512 as f64 / 1024.0),
        format!("{:.1} MiB idle", idle as f64 / 1024.0),
        format!("+{:.1}", (peak_512.saturating_sub(idle)) as f64 / 1024.0),
        "<= idle + 96 MiB",
    );
    shaper.reshape(shapes[1].1);
    timeline(&mut b, cri, &at(&eight), &eight.blobs[..8]).await;
}
