//! What following a pull costs: cold pulls through a daemon that reads the runtime's download
//! bytes twice a second and streams them to the client (`PullStream`), against a daemon with
//! `PullByteProgress: false` answering the plain `Pull`, alternating, on one image; and warm
//! `IfNotPresent` requests through `PullStream` against `Pull`.

use std::time::{Duration, Instant};

use cimage::api::pb;
use futures::StreamExt;
use tonic::transport::Channel;

use crate::rig::*;

type Api = pb::image_cache_client::ImageCacheClient<Channel>;

fn request(image: &str) -> pb::PullRequest {
    pb::PullRequest {
        image: image.into(),
        policy: pb::PullPolicy::IfNotPresent as i32,
        credentials: None,
    }
}

/// One pull through `PullStream`, reading every report; the time and how many reports came.
async fn streamed(api: &mut Api, image: &str) -> (Duration, usize, String) {
    let t = Instant::now();
    let mut s = api
        .pull_stream(request(image))
        .await
        .expect("PullStream")
        .into_inner();
    let (mut reports, mut action) = (0, String::new());
    while let Some(ev) = s.next().await {
        match ev.expect("PullStream event").event {
            Some(pb::pull_event::Event::Progress(_)) => reports += 1,
            Some(pb::pull_event::Event::Done(r)) => action = r.action,
            None => {}
        }
    }
    (t.elapsed(), reports, action)
}

/// One plain `Pull`.
async fn plain(api: &mut Api, image: &str) -> (Duration, String) {
    let t = Instant::now();
    let r = api.pull(request(image)).await.expect("Pull").into_inner();
    (t.elapsed(), r.action)
}

pub(crate) async fn progress(with: &Daemon, without: &Daemon, b: &mut Bench, image: &str) {
    let mut on = cimage::api::client(&with.socket);
    let mut off = cimage::api::client(&without.socket);
    let (mut followed, mut unfollowed, mut reports) = (Vec::new(), Vec::new(), 0);
    for rep in 0..REPS {
        for first_on in [rep % 2 == 0, rep % 2 != 0] {
            b.remove(image).await;
            if first_on {
                let (d, n, action) = streamed(&mut on, image).await;
                assert_eq!(action, "pulled");
                followed.push(d);
                reports += n;
            } else {
                let (d, action) = plain(&mut off, image).await;
                assert_eq!(action, "pulled");
                unfollowed.push(d);
            }
        }
    }
    let (f, u) = (
        percentile(&mut followed, 0.5),
        percentile(&mut unfollowed, 0.5),
    );
    row(
        "cold pull with byte progress (vs without)",
        format!("{:.1} ms", ms(f)),
        format!("{:.1} ms", ms(u)),
        format!("{:.3}x", ms(f) / ms(u)),
        "<= 1.02x",
    );
    row(
        "  progress reports per cold pull",
        format!("{:.1}", reports as f64 / REPS as f64),
        "-".into(),
        "-".into(),
        "",
    );
    let (mut s, mut p) = (Vec::new(), Vec::new());
    for _ in 0..500 {
        let (d, _, action) = streamed(&mut on, image).await;
        assert_eq!(action, "cached");
        s.push(d);
        let (d, action) = plain(&mut on, image).await;
        assert_eq!(action, "cached");
        p.push(d);
    }
    let (s50, p50) = (percentile(&mut s, 0.5), percentile(&mut p, 0.5));
    row(
        "warm IfNotPresent p50, PullStream (vs Pull)",
        format!("{:.2} ms", ms(s50)),
        format!("{:.2} ms", ms(p50)),
        format!("{:.2}x", ms(s50) / ms(p50)),
        "",
    );
    b.remove(image).await;
}
