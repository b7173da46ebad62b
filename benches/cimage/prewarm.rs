//! A pre-warm run against the same pulls made by raw CRI, and warm checks during it.

use std::time::{Duration, Instant};

use cimage::api::pb;
use k8s_cri::v1::{ImageStatusRequest, PullImageRequest};

use super::images::{push, Layer};
use super::rig::*;

/// A pre-warm run of 20 fresh images at concurrency 2 vs the same 20 pulls by raw CRI at
/// concurrency 2 (two workers taking images off one list), with `IfNotPresent` checks of a cached
/// image measured while the pre-warm runs and while idle.
pub(crate) async fn prewarm(daemon: &Daemon, b: &mut Bench, registry: &str, run: &str) {
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
