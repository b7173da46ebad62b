//! cimaged's CRI image endpoint against containerd's own, side by side: `ImageStatus` latency,
//! a cold `PullImage`, and a herd of `PullImage`s for one cold image.

use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{AuthConfig, ImageStatusRequest, PullImageRequest};
use tonic::transport::Channel;

use crate::rig::*;

/// `PullImage` as Craned sends it.
async fn pull(c: &mut ImageServiceClient<Channel>, image: &str) -> Duration {
    let t = Instant::now();
    c.pull_image(PullImageRequest {
        image: spec(image),
        auth: Some(AuthConfig::default()),
        sandbox_config: None,
    })
    .await
    .expect("PullImage");
    t.elapsed()
}

async fn status(c: &mut ImageServiceClient<Channel>, image: &str) -> Duration {
    let t = Instant::now();
    let r = c
        .image_status(ImageStatusRequest {
            image: spec(image),
            verbose: false,
        })
        .await
        .expect("ImageStatus");
    assert!(r.get_ref().image.is_some());
    t.elapsed()
}

/// The CRI endpoint rows: `warm` is a present image, `cold` and `herd` images to pull.
pub(crate) async fn endpoint(daemon: &Daemon, b: &mut Bench, cold: &str, herd: &str) {
    let mut ours = ImageServiceClient::new(cimage::cri::unix_channel(&daemon.cri_socket));
    let raw = b.cri.clone();
    let mut raw = raw;

    // Cold PullImage, alternating which goes first.
    let (mut via, mut direct) = (Vec::new(), Vec::new());
    for rep in 0..REPS {
        for first_raw in [rep % 2 == 0, rep % 2 != 0] {
            b.remove(cold).await;
            match first_raw {
                true => direct.push(pull(&mut raw, cold).await),
                false => via.push(pull(&mut ours, cold).await),
            }
        }
    }
    let (v, r) = (percentile(&mut via, 0.5), percentile(&mut direct, 0.5));
    row(
        "CRI endpoint: cold PullImage, 4 x 16 MiB",
        format!("{:.1} ms", ms(v)),
        format!("{:.1} ms", ms(r)),
        format!("{:.3}x", ms(v) / ms(r)),
        "<= 1.03x",
    );

    // ImageStatus of a present image.
    let (mut via, mut direct) = (Vec::new(), Vec::new());
    for _ in 0..1000 {
        direct.push(status(&mut raw, cold).await);
        via.push(status(&mut ours, cold).await);
    }
    for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
        let (v, r) = (percentile(&mut via, p), percentile(&mut direct, p));
        row(
            &format!("CRI endpoint: ImageStatus {label}"),
            format!("{:.3} ms", ms(v)),
            format!("{:.3} ms", ms(r)),
            format!("{:+.3} ms", ms(v) - ms(r)),
            if p == 0.5 { "+<= 0.3 ms at p50" } else { "" },
        );
    }

    // The herd: 20 connections (Craned opens one per step) ask for one cold image.
    b.remove(herd).await;
    let one = pull(&mut raw, herd).await;
    b.remove(herd).await;
    let before = daemon.pull_calls(herd);
    let t = Instant::now();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let mut c = ImageServiceClient::new(cimage::cri::unix_channel(&daemon.cri_socket));
            let image = herd.to_owned();
            tokio::spawn(async move { pull(&mut c, &image).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let wall = t.elapsed();
    let calls = daemon.pull_calls(herd) - before;
    row(
        "CRI endpoint: 20 concurrent PullImage",
        format!("{:.1} ms", ms(wall)),
        format!("{:.1} ms", ms(one)),
        format!("{:.3}x", ms(wall) / ms(one)),
        "<= 1.05x",
    );
    row(
        "  runtime PullImage calls for those 20",
        format!("{calls}"),
        "-".into(),
        "-".into(),
        "= 1",
    );
}

/// Cold `PullImage` of a realistic image (a Debian root filesystem with python3) through the
/// endpoint and directly, alternating.
pub(crate) async fn realistic(daemon: &Daemon, b: &mut Bench, image: &str, label: &str) {
    let mut ours = ImageServiceClient::new(cimage::cri::unix_channel(&daemon.cri_socket));
    let mut raw = b.cri.clone();
    let (mut via, mut direct) = (Vec::new(), Vec::new());
    for rep in 0..3 {
        for first_raw in [rep % 2 == 0, rep % 2 != 0] {
            b.remove(image).await;
            match first_raw {
                true => direct.push(pull(&mut raw, image).await),
                false => via.push(pull(&mut ours, image).await),
            }
        }
    }
    let (v, r) = (percentile(&mut via, 0.5), percentile(&mut direct, 0.5));
    row(
        label,
        format!("{:.1} ms", ms(v)),
        format!("{:.1} ms", ms(r)),
        format!("{:.3}x", ms(v) / ms(r)),
        "<= 1.03x",
    );
    b.remove(image).await;
}
