//! The fleet on one machine: N node stacks warm one image at the same moment through a site
//! mirror, the upstream registry far away behind the link shaper. Run it with `scripts/fleet`
//! (outside CI, like the soak; loopback only, bounded in time). It prints, for each case, the
//! time until the last node holds the image, per-node p50/p99, the bytes the upstream served per
//! blob, the mirror's peak concurrent connections, and Prometheus's answer to the fleet
//! readiness query over time, with the big layer fetched by the runtime (`ParallelFetch` off)
//! and by cimage's own range requests (on: they go through the mirror too, and must not
//! multiply what the upstream serves); and writes the numbers to target/fleet/report.json for the
//! 1,000-node model (scripts/fleet-model).
//!
//! Environment: CIMAGE_FLEET_NODES (8), CIMAGE_FLEET_LAYER_MIB (256), CIMAGE_FLEET_DELAY_MS (20,
//! one way), CIMAGE_FLEET_RATE_MBPS (8, per connection), CIMAGE_FLEET_LINK_MBPS (64, in all),
//! CIMAGE_FLEET_JITTER_S (20, for the jittered case), CIMAGE_BENCH_ROOTFS (a root filesystem
//! tar: the Debian-with-python case), CIMAGE_FLEET_ONLY (comma-separated case names),
//! CIMAGE_FLEET_KEEP=1 (keep the logs and state after the run).

#[path = "../../tests/common/images.rs"]
#[allow(dead_code)]
mod images;
#[path = "../../tests/common/nginx_mirror.rs"]
#[allow(dead_code)]
mod nginx_mirror;
#[path = "../../tests/common/shaper.rs"]
#[allow(dead_code)]
mod shaper;
mod world;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use images::{push, Layer};
use nginx_mirror::{blob_responses, blob_size, NginxMirror};
use serde_json::json;
use shaper::{Shape, Shaper};
use world::{connections_to, Node, Prometheus, Registry, Via};

/// A free loopback port (the mirror and the nodes' metrics take one each).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| {
            eprintln!("fleet: {name}={v:?} is not a whole number");
            std::process::exit(2)
        }),
        Err(_) => default,
    }
}

fn want(case: &str) -> bool {
    match std::env::var("CIMAGE_FLEET_ONLY") {
        Ok(l) if !l.is_empty() => l.split(',').any(|c| c.trim() == case),
        _ => true,
    }
}

/// One case's outcome.
struct Outcome {
    case: String,
    via: Via,
    /// Whether cimage fetched the big layer itself in ranges (`ParallelFetch`).
    ranges: bool,
    nodes: usize,
    /// Seconds from the fire to each node holding the image, sorted.
    ready_s: Vec<f64>,
    /// Seconds from the fire to each node holding the image's biggest blob (fetched, before
    /// unpacking), sorted.
    fetched_s: Vec<f64>,
    /// One node's cold pull of an image of the same kind through the mirror.
    one_node_s: f64,
    /// Bytes the upstream served per blob, and each blob's size.
    upstream: Vec<(String, u64, u64)>,
    mirror_peak_connections: usize,
    /// (seconds since the fire, nodes ready per Prometheus).
    prometheus: Vec<(f64, f64)>,
    image_bytes: u64,
}

/// The root filesystem `tar` as a blob no cache has seen: the same archive with 512 random bytes
/// after its end-of-archive blocks (tar readers stop before them; the digest covers them, and
/// containerd reads them into the layer's diff ID as `push` computed it).
fn unique_tar(tar: &[u8]) -> Vec<u8> {
    let mut t = tar.to_vec();
    t.extend((0..512).map(|_| rand::random::<u8>()));
    t
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// The moment of the next whole minute, and how long until it.
fn next_minute() -> (SystemTime, Duration) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let at = UNIX_EPOCH + Duration::from_secs((secs / 60 + 1) * 60);
    (at, at.duration_since(now).unwrap())
}

/// Everything the fleet runs; dropped in this order (the directory they live in last).
struct Fleet {
    prometheus: Prometheus,
    nodes: Vec<Node>,
    nginx: NginxMirror,
    proxy: Registry,
    shaper: Shaper,
    upstream: Registry,
    _dir: tempfile::TempDir,
}

/// A pushed image with the size of each of its blobs.
struct Image {
    pushed: images::Pushed,
    sizes: BTreeMap<String, u64>,
}

impl Fleet {
    /// The `ImageCache` lines every node shares (a site's one config file) for pulls through
    /// `via`, with cimage's own range fetch on or off.
    fn pull_config(&self, via: Via, ranges: bool) -> String {
        let up = &self.shaper.addr;
        let mut c = format!(
            "  Eviction:\n    Enabled: false\n  ParallelFetch:\n    Enabled: {ranges}\n  Registries:\n    \"{up}\":\n      Insecure: true\n"
        );
        if let Some(m) = &self.mirror_addr(via) {
            c.push_str(&format!(
                "      Mirrors: [\"{m}\"]\n    \"{m}\":\n      Insecure: true\n"
            ));
        }
        c
    }

    /// [`Fleet::pull_config`] with one pre-warm schedule firing every minute.
    fn shared_config(&self, via: Via, ranges: bool, image: &str, jitter_s: u64) -> String {
        let mut c = self.pull_config(via, ranges);
        c.push_str(&format!(
            "  Prewarm:\n    Schedules:\n      - Name: fleet\n        Cron: \"* * * * *\"\n        Images: [\"{image}\"]\n        Jitter: {jitter_s}s\n"
        ));
        c
    }

    fn mirror_addr(&self, via: Via) -> Option<String> {
        match via {
            Via::Nginx => Some(self.nginx.addr.clone()),
            Via::RegistryProxy => Some(self.proxy.addr.clone()),
            Via::Upstream => None,
        }
    }

    fn mirror_port(&self, via: Via) -> Option<u16> {
        self.mirror_addr(via)
            .and_then(|a| a.rsplit(':').next().and_then(|p| p.parse().ok()))
    }

    /// Pushes a fresh image (new random layers, so no cache has seen it) to the upstream.
    fn fresh_image(&self, name: &str, layers: &[Layer]) -> Image {
        let repo = format!("fleet-{name}-{:08x}", rand::random::<u32>());
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut p = rt.block_on(push(&self.upstream.addr, &repo, "1", layers, &["sh"]));
        let sizes = p
            .blobs
            .iter()
            .map(|d| (d.clone(), blob_size(&self.upstream.addr, &repo, d)))
            .collect();
        // Nodes name it at the far address.
        p.reference = format!("{}/{repo}:1", self.shaper.addr);
        Image { pushed: p, sizes }
    }

    /// One node pulls `image` cold through `via` (the reference for the fleet's times).
    fn one_node(&mut self, via: Via, ranges: bool, image: &str) -> f64 {
        let mirror = self.mirror_addr(via);
        let shared = self.pull_config(via, ranges);
        let n = &mut self.nodes[0];
        n.route(&self.shaper.addr, mirror.as_deref());
        n.run_cimaged(&shared);
        let t = Instant::now();
        let out = n.cli(&["pull", image]);
        assert!(
            out.status.success(),
            "fleet: one node's pull failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = t.elapsed().as_secs_f64();
        n.cli(&["rm", image]);
        s
    }

    /// Every node warms `p` through `via` from one schedule firing at the same minute.
    fn warm(
        &mut self,
        case: &str,
        via: Via,
        ranges: bool,
        image: &Image,
        jitter_s: u64,
        one_node_s: f64,
    ) -> Outcome {
        let p = &image.pushed;
        let biggest = image
            .sizes
            .iter()
            .max_by_key(|(_, s)| **s)
            .map(|(d, _)| d.clone())
            .unwrap_or_default();
        let mirror = self.mirror_addr(via);
        let shared = self.shared_config(via, ranges, &p.reference, jitter_s);
        for n in &mut self.nodes {
            n.route(&self.shaper.addr, mirror.as_deref());
            n.run_cimaged(&shared);
        }
        let mark = std::fs::metadata(&self.upstream.log)
            .map(|m| m.len())
            .unwrap_or(0);
        let (at, wait) = next_minute();
        eprintln!(
            "fleet: {case}: {} nodes, {} via {}, {}; the schedule fires in {} s",
            self.nodes.len(),
            p.reference,
            via.name(),
            fetcher(ranges),
            wait.as_secs()
        );
        std::thread::sleep(wait);
        let fired = Instant::now() - at.elapsed().unwrap_or_default();
        let mut ready: BTreeMap<usize, f64> = BTreeMap::new();
        let mut fetched: BTreeMap<usize, f64> = BTreeMap::new();
        let mut peak = 0;
        let mut prom = Vec::new();
        let mut last_query = Instant::now() - Duration::from_secs(10);
        let port = self.mirror_port(via);
        let bound = Duration::from_secs(1800);
        while ready.len() < self.nodes.len() {
            assert!(
                fired.elapsed() < bound,
                "fleet: {case}: not every node was warm within {} s",
                bound.as_secs()
            );
            for (i, n) in self.nodes.iter().enumerate() {
                if !fetched.contains_key(&i) && n.has_blob(&biggest) {
                    fetched.insert(i, fired.elapsed().as_secs_f64());
                }
                if !ready.contains_key(&i) && n.holds(&p.reference) {
                    let t = fired.elapsed().as_secs_f64();
                    fetched.entry(i).or_insert(t);
                    ready.insert(i, t);
                }
            }
            if let Some(port) = port {
                peak = peak.max(connections_to(port));
            }
            if last_query.elapsed() >= Duration::from_secs(2) {
                last_query = Instant::now();
                let q = format!("sum(cimage_image_ready{{image=\"{}\"}})", p.reference);
                if let Some(v) = self.prometheus.value(&q) {
                    prom.push((fired.elapsed().as_secs_f64(), v));
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Prometheus's last word, once it has scraped the end.
        std::thread::sleep(Duration::from_secs(3));
        let q = format!("sum(cimage_image_ready{{image=\"{}\"}})", p.reference);
        if let Some(v) = self.prometheus.value(&q) {
            prom.push((fired.elapsed().as_secs_f64(), v));
        }
        // Let the upstream's log catch up with its last answers.
        std::thread::sleep(Duration::from_millis(500));
        let sizes = &image.sizes;
        let upstream = p
            .blobs
            .iter()
            .map(|d| {
                let served: u64 = blob_responses(&self.upstream.log, mark, d)
                    .iter()
                    .map(|(_, b)| b)
                    .sum();
                (d.clone(), served, sizes.get(d).copied().unwrap_or(0))
            })
            .collect();
        for n in &self.nodes {
            n.cli(&["rm", &p.reference]);
        }
        let sorted = |m: BTreeMap<usize, f64>| {
            let mut v: Vec<f64> = m.into_values().collect();
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v
        };
        Outcome {
            case: case.to_owned(),
            via,
            ranges,
            nodes: self.nodes.len(),
            ready_s: sorted(ready),
            fetched_s: sorted(fetched),
            one_node_s,
            upstream,
            mirror_peak_connections: peak,
            prometheus: prom,
            image_bytes: p.size,
        }
    }
}

/// Who fetches the big layer: cimage in ranges, or the runtime.
fn fetcher(ranges: bool) -> &'static str {
    if ranges {
        "cimage ranges"
    } else {
        "runtime"
    }
}

fn report(o: &Outcome) {
    let last = o.ready_s.last().copied().unwrap_or(f64::NAN);
    let fetched = o.fetched_s.last().copied().unwrap_or(f64::NAN);
    println!(
        "{:<34} {:<30} {:<13} {:>5} {:>8.1} s {:>7.1} s {:>7.1} s {:>6.2}x {:>8.1} s {:>6.2}x {:>6}",
        o.case,
        o.via.name(),
        fetcher(o.ranges),
        o.nodes,
        last,
        pct(&o.ready_s, 0.5),
        pct(&o.ready_s, 0.99),
        last / o.one_node_s,
        fetched,
        fetched / o.one_node_s,
        o.mirror_peak_connections
    );
    for (d, served, size) in &o.upstream {
        if *size > 1 << 20 {
            println!(
                "    upstream served blob {}…: {:.2}x its size ({} of {} bytes)",
                &d[..19],
                *served as f64 / *size as f64,
                served,
                size
            );
        }
    }
    let timeline: Vec<String> = o
        .prometheus
        .iter()
        .map(|(t, v)| format!("{t:.0}s:{v}"))
        .collect();
    println!(
        "    Prometheus, nodes ready over time: {}",
        timeline.join(" ")
    );
}

fn main() {
    let nodes = env_num("CIMAGE_FLEET_NODES", 8) as usize;
    let layer_mib = env_num("CIMAGE_FLEET_LAYER_MIB", 256) as usize;
    let shape = Shape::far(
        Duration::from_millis(env_num("CIMAGE_FLEET_DELAY_MS", 20)),
        env_num("CIMAGE_FLEET_RATE_MBPS", 8) * 1_000_000,
        env_num("CIMAGE_FLEET_LINK_MBPS", 64) * 1_000_000,
    );
    let jitter = env_num("CIMAGE_FLEET_JITTER_S", 20);
    if !(1..=32).contains(&nodes) {
        eprintln!("fleet: CIMAGE_FLEET_NODES must be 1 to 32");
        std::process::exit(2);
    }
    let dir = tempfile::Builder::new()
        .prefix("cimage-fleet-")
        .tempdir_in("/var/tmp")
        .unwrap();
    // nginx's workers (an unprivileged user) reach the mirror's cache under it.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    eprintln!(
        "fleet: starting the upstream, the mirrors, {nodes} node stacks and Prometheus in {}",
        dir.path().display()
    );
    let upstream = Registry::start(dir.path(), "upstream", None);
    let shaper = Shaper::start(&upstream.addr, shape);
    let cache = dir.path().join("nginx");
    std::fs::create_dir_all(&cache).unwrap();
    let nginx = NginxMirror::start(&cache, &format!("http://{}", shaper.addr));
    let proxy = Registry::start(
        dir.path(),
        "proxy-mirror",
        Some(&format!("http://{}", shaper.addr)),
    );
    let node_list: Vec<Node> = (0..nodes).map(|i| Node::start(dir.path(), i)).collect();
    let prometheus = Prometheus::start(dir.path(), &node_list);
    let mut f = Fleet {
        prometheus,
        nodes: node_list,
        nginx,
        proxy,
        shaper,
        upstream,
        _dir: dir,
    };

    let big = || vec![Layer::random(layer_mib << 20)];
    let mut outcomes = Vec::new();
    // One node's cold pull through the nginx mirror, by each fetcher, measured once each.
    let mut one_node: BTreeMap<bool, f64> = BTreeMap::new();
    let cases: Vec<(&str, Via, u64, bool)> = vec![
        ("nginx", Via::Nginx, 0, false),
        ("nginx-jitter", Via::Nginx, jitter, false),
        ("registry-proxy", Via::RegistryProxy, 0, false),
        ("upstream", Via::Upstream, 0, false),
        ("nginx-ranges", Via::Nginx, 0, true),
        ("registry-proxy-ranges", Via::RegistryProxy, 0, true),
        ("upstream-ranges", Via::Upstream, 0, true),
    ];
    for (name, via, j, ranges) in cases {
        if !want(name) {
            continue;
        }
        let one_node_s = match one_node.get(&ranges) {
            Some(s) => *s,
            None => {
                let one = f.fresh_image("one", &big());
                let s = f.one_node(Via::Nginx, ranges, &one.pushed.reference);
                eprintln!(
                    "fleet: one node's cold pull through the nginx mirror, {}: {s:.1} s",
                    fetcher(ranges)
                );
                one_node.insert(ranges, s);
                s
            }
        };
        let p = f.fresh_image(name, &big());
        outcomes.push(f.warm(
            &format!("{name} ({layer_mib} MiB layer)"),
            via,
            ranges,
            &p,
            j,
            one_node_s,
        ));
    }
    if let Ok(path) = std::env::var("CIMAGE_BENCH_ROOTFS") {
        let tar = std::fs::read(&path).unwrap_or_else(|e| {
            eprintln!("fleet: CIMAGE_BENCH_ROOTFS={path}: {e}");
            std::process::exit(2)
        });
        for (name, ranges) in [("debian", false), ("debian-ranges", true)] {
            if !want(name) {
                continue;
            }
            let one = f.fresh_image("debian-one", &[Layer::tarball(unique_tar(&tar))]);
            let one_s = f.one_node(Via::Nginx, ranges, &one.pushed.reference);
            let p = f.fresh_image(name, &[Layer::tarball(unique_tar(&tar))]);
            outcomes.push(f.warm(
                &format!("{name} (Debian + python3)"),
                Via::Nginx,
                ranges,
                &p,
                0,
                one_s,
            ));
        }
    }

    println!();
    println!(
        "fleet: {nodes} nodes; upstream behind {} ms one way, {} MB/s per connection, {} MB/s in all",
        shape.delay.as_millis(),
        shape.per_connection.unwrap_or(0) / 1_000_000,
        shape.total.unwrap_or(0) / 1_000_000
    );
    for (ranges, s) in &one_node {
        println!(
            "one node's cold pull through the nginx mirror, {}: {s:.1} s",
            fetcher(*ranges)
        );
    }
    println!();
    println!(
        "{:<34} {:<30} {:<13} {:>5} {:>10} {:>9} {:>9} {:>7} {:>10} {:>7} {:>6}",
        "case",
        "via",
        "fetched by",
        "nodes",
        "last warm",
        "p50",
        "p99",
        "/one",
        "fetched",
        "/one",
        "peak"
    );
    for o in &outcomes {
        report(o);
    }
    println!("(/one: over one node's cold pull of the same image through the mirror by the same");
    println!(" fetcher; fetched by: cimage's own range fetch (ParallelFetch) or the runtime's; fetched: the");
    println!(
        " last node's biggest blob in its content store, before unpacking; peak: the mirror's"
    );
    println!(" most connections at once)");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fleet");
    std::fs::create_dir_all(&out).unwrap();
    let json = json!({
        "nodes": nodes,
        "shape": {"delay_ms": shape.delay.as_millis() as u64, "per_connection_bytes_per_s": shape.per_connection, "total_bytes_per_s": shape.total},
        "one_node_seconds": one_node.get(&false).or(one_node.get(&true)),
        "one_node_seconds_ranges": one_node.get(&true),
        "cases": outcomes.iter().map(|o| json!({
            "case": o.case,
            "via": o.via.name(),
            "parallel_fetch": o.ranges,
            "image_bytes": o.image_bytes,
            "ready_seconds": o.ready_s,
            "fetched_seconds": o.fetched_s,
            "one_node_seconds": o.one_node_s,
            "upstream": o.upstream.iter().map(|(d, s, z)| json!({"blob": d, "served_bytes": s, "size_bytes": z})).collect::<Vec<_>>(),
            "mirror_peak_connections": o.mirror_peak_connections,
            "prometheus_ready": o.prometheus,
        })).collect::<Vec<_>>(),
    });
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!();
    println!("numbers: {}", out.join("report.json").display());
    if std::env::var("CIMAGE_FLEET_KEEP").is_ok_and(|v| v == "1") {
        let kept = std::mem::replace(&mut f._dir, tempfile::tempdir().unwrap()).keep();
        eprintln!("fleet: logs and state kept in {}", kept.display());
    }
}
