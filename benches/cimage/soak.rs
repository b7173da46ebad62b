//! A soak: many clients at once for minutes, each on a connection of its own, mixing warm
//! pulls, `ListImages`, `Status` and small launches. Reported: requests served and failed per
//! call, p50/p99 per call, the daemon's resident memory and open descriptors at the start and
//! the end, and whether the index still equals the runtime's image list afterwards. Not part
//! of the default sections: `scripts/soak` runs it (`CIMAGE_SOAK_CLIENTS`, default 1000;
//! `CIMAGE_SOAK_SECONDS`, default 600).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cimage::api::pb;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::ListImagesRequest;

use crate::rig::*;

/// Launches in flight at once over all clients (containerd on a small node runs a few a
/// second); a client whose turn it is to launch while they are taken asks for status instead.
const LAUNCHES_AT_ONCE: usize = 4;
/// Pause of each client between its calls.
const THINK: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

type Tallies = Arc<Mutex<BTreeMap<&'static str, Tally>>>;

fn note(t: &Tallies, call: &'static str, took: Duration, err: Option<String>) {
    let mut m = t.lock().unwrap();
    let e = m.entry(call).or_default();
    match err {
        None => e.latencies.push(took),
        Some(msg) => {
            e.errors += 1;
            e.first_error.get_or_insert(msg);
        }
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fds(daemon: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", daemon.child.id()))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A call's outcome as the tally keeps it.
fn ok<T>(r: Result<T, tonic::Status>) -> Result<(), String> {
    r.map(|_| ()).map_err(|e| e.to_string())
}

/// One client: its own connection, calls until `end`.
async fn client(
    socket: std::path::PathBuf,
    image: String,
    end: Instant,
    seed: u64,
    launches: Arc<tokio::sync::Semaphore>,
    tallies: Tallies,
) {
    let channel = cimage::cri::unix_channel(&socket);
    let mut images = pb::image_cache_client::ImageCacheClient::new(channel.clone());
    let mut launcher = pb::launcher_client::LauncherClient::new(channel);
    let mut n = seed;
    while Instant::now() < end {
        n = n
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let pick = (n >> 33) % 100;
        let t = Instant::now();
        // Half warm pulls, a fifth listings, the rest status, and a launch now and then when
        // one of the few launch places is free (status otherwise).
        let permit = (pick >= 98)
            .then(|| launches.clone().try_acquire_owned().ok())
            .flatten();
        let (call, result) = match pick {
            0..=49 => (
                "Pull (warm, IfNotPresent)",
                ok(images
                    .pull(pb::PullRequest {
                        image: image.clone(),
                        policy: pb::PullPolicy::IfNotPresent as i32,
                        credentials: None,
                    })
                    .await),
            ),
            50..=69 => (
                "ListImages",
                ok(images.list_images(pb::ListImagesRequest::default()).await),
            ),
            _ if permit.is_some() => (
                "Launch (true, to cleanup)",
                crate::launch::launch_true(&mut launcher, &image).await,
            ),
            _ => (
                "Status",
                ok(images.status(pb::StatusRequest::default()).await),
            ),
        };
        drop(permit);
        note(&tallies, call, t.elapsed(), result.err());
        tokio::time::sleep(THINK).await;
    }
}

pub(crate) async fn soak(cri: &str, registry: &str) {
    let clients = env_or("CIMAGE_SOAK_CLIENTS", 1000) as usize;
    let seconds = env_or("CIMAGE_SOAK_SECONDS", 600);
    let extra = format!(
        "MaxConnectionsPerAdmin: {}\nLauncher:\n  MaxLaunchesPerUser: 64",
        clients + 64
    );
    let daemon = Daemon::start_with(cri, registry, &extra);
    let image = format!("{registry}/busybox:1");
    // Warm: the image present, one launch done.
    let mut c = cimage::api::client(&daemon.socket);
    c.pull(pb::PullRequest {
        image: image.clone(),
        policy: pb::PullPolicy::IfNotPresent as i32,
        credentials: None,
    })
    .await
    .expect("warming pull");
    let mut l = cimage::api::launcher_client(&daemon.socket);
    crate::launch::grpc_launch(&mut l, &image).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss0, fds0) = (daemon.rss_kib(), fds(&daemon));

    // Two rounds with a pause between: memory that grows round after round is a leak, memory
    // that comes back to the same peak is a bound.
    let rounds = 2;
    eprintln!("bench: soak, {clients} clients for {seconds} s in {rounds} rounds ...");
    let tallies: Tallies = Default::default();
    let launches = Arc::new(tokio::sync::Semaphore::new(LAUNCHES_AT_ONCE));
    let mut peaks = Vec::new();
    let mut idles = Vec::new();
    for round in 0..rounds {
        let end = Instant::now() + Duration::from_secs(seconds / rounds);
        let mut tasks = Vec::with_capacity(clients);
        for i in 0..clients {
            tasks.push(tokio::spawn(client(
                daemon.socket.clone(),
                image.clone(),
                end,
                (round * clients as u64 + i as u64) + 1,
                launches.clone(),
                tallies.clone(),
            )));
        }
        let (mut peak_rss, mut peak_fds) = (0, 0);
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_secs(1)).await;
            peak_rss = peak_rss.max(daemon.rss_kib());
            peak_fds = peak_fds.max(fds(&daemon));
        }
        for t in tasks {
            let _ = t.await;
        }
        // Idle again: connections closed, memory handed back (cimaged trims every 10 s).
        tokio::time::sleep(Duration::from_secs(15)).await;
        peaks.push((peak_rss, peak_fds));
        idles.push((daemon.rss_kib(), fds(&daemon)));
    }

    // The index against the runtime.
    let ours: std::collections::BTreeSet<String> = cimage::api::client(&daemon.socket)
        .list_images(pb::ListImagesRequest::default())
        .await
        .expect("ListImages")
        .into_inner()
        .images
        .into_iter()
        .map(|i| i.id)
        .collect();
    let runtime = ImageServiceClient::new(cimage::cri::unix_channel(std::path::Path::new(cri)))
        .max_decoding_message_size(64 << 20)
        .list_images(ListImagesRequest::default())
        .await
        .expect("the runtime's ListImages")
        .into_inner()
        .images;
    let theirs: std::collections::BTreeSet<String> = runtime.iter().map(|i| i.id.clone()).collect();
    // Images the runtime got by itself (the pod sandbox image, pulled by containerd for the
    // first pod) reach the index at the next reconciliation; everything cimage did is there.
    let only_runtime: Vec<String> = runtime
        .iter()
        .filter(|i| !ours.contains(&i.id))
        .map(|i| i.repo_tags.join(","))
        .collect();
    let only_index = ours.difference(&theirs).count();

    println!(
        "soak: {clients} clients, {seconds} s in {rounds} rounds, each client on its own \
         connection, {THINK:?} between calls"
    );
    println!(
        "{:<28} {:>10} {:>8} {:>10} {:>10}",
        "call", "served", "errors", "p50", "p99"
    );
    let mut total_errors = 0;
    for (call, t) in tallies.lock().unwrap().iter_mut() {
        total_errors += t.errors;
        let served = t.latencies.len();
        let (p50, p99) = if served > 0 {
            (
                percentile(&mut t.latencies, 0.5),
                percentile(&mut t.latencies, 0.99),
            )
        } else {
            (Duration::ZERO, Duration::ZERO)
        };
        println!(
            "{call:<28} {served:>10} {:>8} {:>8.2} ms {:>8.2} ms",
            t.errors,
            ms(p50),
            ms(p99)
        );
        if let Some(e) = &t.first_error {
            println!("  first error: {e}");
        }
    }
    println!(
        "daemon resident memory: {:.1} MiB at the start; per round, peak then idle: {}",
        rss0 as f64 / 1024.0,
        peaks
            .iter()
            .zip(&idles)
            .map(|((p, _), (i, _))| format!(
                "{:.1} / {:.1} MiB",
                *p as f64 / 1024.0,
                *i as f64 / 1024.0
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "daemon open descriptors: {fds0} at the start; per round, peak then idle: {}",
        peaks
            .iter()
            .zip(&idles)
            .map(|((_, p), (_, i))| format!("{p} / {i}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "index against the runtime afterwards: {} indexed, {} in the runtime; in the index only: \
         {only_index}; in the runtime only: {only_runtime:?}",
        ours.len(),
        theirs.len()
    );
    // After one reconciliation pass (what the periodic loop does), they must be equal.
    cimage::api::maintenance_client(&daemon.socket)
        .gc(pb::GcRequest { dry_run: true })
        .await
        .expect("gc --dry-run (reconciles first)");
    let reconciled: std::collections::BTreeSet<String> = cimage::api::client(&daemon.socket)
        .list_images(pb::ListImagesRequest::default())
        .await
        .expect("ListImages")
        .into_inner()
        .images
        .into_iter()
        .map(|i| i.id)
        .collect();
    println!(
        "index equals the runtime after a reconciliation pass: {}",
        if reconciled == theirs { "yes" } else { "NO" }
    );
    println!("errors in all: {total_errors}");
}
