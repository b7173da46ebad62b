//! cimage's benchmark: cimage measured side by side with the raw runtime in one run, against the
//! testbed's real containerd and registry. Run it with `scripts/bench` (which starts a private
//! testbed); it prints one table of ratios.
//!
//! - cold pull via cimage vs raw CRI `PullImage` (4 × 16 MiB layers; 100 small layers)
//! - a cold pull followed with byte progress (`PullStream`) vs one through a daemon that reads no
//!   bytes (`PullByteProgress: false`); warm `PullStream` vs `Pull`
//! - warm `IfNotPresent` through cimage's gRPC API (p50/p99), beside raw CRI `ImageStatus`
//! - `Always` with an unchanged digest vs one registry HEAD
//! - 50 concurrent requests for one cold image: `PullImage` calls and wall time vs one pull
//! - launch-to-exit of a trivial task on a warm image: `cimage run` (the CLI process) and the gRPC
//!   `Launch` stream vs the raw CRI sequence (RunPodSandbox, CreateContainer, StartContainer,
//!   ContainerStatus polling, RemoveContainer, StopPodSandbox, RemovePodSandbox), 30 runs each
//! - cimage's parallel range fetch vs containerd's own `PullImage` through the link shaper at
//!   three shapes, for one 512 MiB layer, 8 x 64 MiB layers and the Debian image; bytes over
//!   the link, resident memory, a timeline of one pull (`fetch.rs`)
//! - cimaged's CRI image endpoint vs containerd's: cold `PullImage`, `ImageStatus` p50/p99, 20
//!   concurrent `PullImage`s of one cold image
//! - a pending job's image wait at its start, with and without the Slurm queue source (the
//!   testbed's one-node Slurm; a 256 MiB image behind an 8 MB/s link)
//! - launch-to-exit with 100,000 finished tasks in the store vs none, start-up to recovery and
//!   resident memory with them
//! - a pre-warm run of 20 synthetic images at concurrency 2 vs the same pulls issued by raw CRI at
//!   concurrency 2, and `IfNotPresent` checks of a cached image during the run vs idle

mod cri;
mod expect;
mod fetch;
mod history;
#[path = "../../tests/common/images.rs"]
#[allow(dead_code)]
mod images;
mod launch;
mod prewarm;
mod progress;
mod rig;
mod scale;
#[path = "../../tests/common/shaper.rs"]
#[allow(dead_code)]
mod shaper;
mod soak;

use std::path::Path;
use std::time::Instant;

use cimage::api::pb;
use images::{push, Layer};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::ImageStatusRequest;
use launch::LAUNCHES;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use rig::*;

/// Whether a section runs: all by default, or those listed in `CIMAGE_BENCH_ONLY`
/// (comma-separated: cold, progress, warm, always, herd, fetch, cri, launch, expect, history,
/// prewarm, scale;
/// and soak, which runs only when listed).
fn want(section: &str) -> bool {
    match std::env::var("CIMAGE_BENCH_ONLY") {
        Ok(list) if !list.is_empty() => list.split(',').any(|s| s.trim() == section),
        _ => section != "soak",
    }
}

#[tokio::main]
async fn main() {
    let env = env_file();
    let mut rootfs = rootfs_tar();
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
    if want("progress") {
        eprintln!("bench: the cost of following a pull ...");
        let quiet = Daemon::start_with(&cri_path, &registry, "PullByteProgress: false");
        progress::progress(&daemon, &quiet, &mut b, &big.reference).await;
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
    if want("fetch") {
        eprintln!("bench: parallel range fetch against containerd's own pull ...");
        fetch::fetch(&cri_path, &registry, &run, rootfs.as_ref()).await;
    }
    if want("cri") {
        eprintln!("bench: the CRI image endpoint ...");
        let cold = push(
            &registry,
            &format!("bench-cri-{run}"),
            "1",
            &(0..4).map(|_| Layer::random(16 << 20)).collect::<Vec<_>>(),
            &["sh"],
        )
        .await;
        let herd = push(
            &registry,
            &format!("bench-cri-herd-{run}"),
            "1",
            &(0..4).map(|_| Layer::random(16 << 20)).collect::<Vec<_>>(),
            &["sh"],
        )
        .await;
        cri::endpoint(&daemon, &mut b, &cold.reference, &herd.reference).await;
        for image in [&cold.reference, &herd.reference] {
            b.remove(image).await;
        }
        // A realistic image, when scripts/bench could build one (mmdebstrap).
        if let Some((tar, files)) = rootfs.take() {
            eprintln!(
                "bench: pushing the {} MB root filesystem ...",
                tar.len() >> 20
            );
            let real = push(
                &registry,
                &format!("bench-debian-{run}"),
                "1",
                &[Layer::tarball(tar)],
                &["python3"],
            )
            .await;
            let label = format!(
                "CRI endpoint: cold PullImage, Debian+python3 ({} MB, {files} files)",
                real.size >> 20
            );
            cri::realistic(&daemon, &mut b, &real.reference, &label).await;
        }
    }
    if want("launch") {
        eprintln!("bench: launch-to-exit, {LAUNCHES} runs each ...");
        let (mut raw, mut grpc, mut cli) = launch::launches(&daemon, &cri_path, &registry).await;
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
    if want("expect") {
        eprintln!("bench: a job's image wait with and without the Slurm queue source ...");
        expect::expect(&cri_path, &registry, &env).await;
    }
    if want("history") {
        eprintln!("bench: launches with a long history ...");
        history::history(&cri_path, &registry).await;
    }
    if want("prewarm") {
        eprintln!("bench: pre-warm of 20 images at concurrency 2 ...");
        prewarm::prewarm(&daemon, &mut b, &registry, &run).await;
    }
    println!("{}", "-".repeat(100));
    println!(
        "cimaged peak RSS: {:.1} MiB",
        daemon.peak_rss_kib() as f64 / 1024.0
    );

    if want("soak") {
        soak::soak(&cri_path, &registry).await;
    }
    if want("scale") {
        eprintln!("bench: 10,000 images and 100,000 past tasks ...");
        scale::scale(&cri_path, &registry, &run).await;
    }

    for image in [&big.reference, &many.reference, &herd.reference] {
        b.remove(image).await;
    }
}
