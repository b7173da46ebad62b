//! The fleet's question, answered per node: `cimage_image_ready{image}` is 1 when this node
//! holds the image and 0 when not, for each image an admin named — pinned, expected (by root,
//! an admin or the scheduler's queue) or listed in a pre-warm schedule. Bounded by what admins
//! name, not by every image ever seen, nor by what users expect for themselves; with it,
//! "which nodes lack image X" is one PromQL query (`cimage_image_ready{image="X"} == 0`).
//!
//! `/metrics` is readable by anyone who reaches its address, so an image that needs
//! credentials (pulled or expected with them) never appears: its name is the private-image
//! rule's to show.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cache::Cache;
use crate::expect::{Asker, Expector};
use crate::metrics::Metrics;
use crate::prewarm::Prewarmer;

/// Series kept at most (the first, by name, when admins name more).
pub const MAX_SERIES: usize = 1000;

/// Sets `cimage_image_ready` from the images named now and what the index holds.
pub async fn refresh(metrics: &Metrics, cache: &Cache, prewarm: &Prewarmer, expector: &Expector) {
    let Ok(records) = cache.list().await else {
        // The index cannot be read: keep the last answer rather than say "not ready".
        return;
    };
    let mut named: BTreeMap<String, f64> = BTreeMap::new();
    for r in records.iter().filter(|r| r.pinned && !r.credentialed) {
        named.insert(
            r.names.first().cloned().unwrap_or_else(|| r.id.clone()),
            1.0,
        );
    }
    let root = Asker {
        uid: 0,
        admin: true,
    };
    let mut wanted: Vec<String> = expector
        .list(root)
        .into_iter()
        .filter(|e| e.by_admin && !e.credentialed)
        .map(|e| e.image)
        .collect();
    if let Ok(schedules) = prewarm.list().await {
        wanted.extend(schedules.into_iter().flat_map(|s| s.spec.images));
    }
    for image in wanted {
        let held = records.iter().any(|r| r.names.contains(&image));
        named.entry(image).or_insert(if held { 1.0 } else { 0.0 });
    }
    let series: Vec<(String, f64)> = named.into_iter().take(MAX_SERIES).collect();
    metrics.set_family("cimage_image_ready", "image", &series);
}

/// Refreshes the readiness every `every` until shutdown.
pub async fn keep_fresh(
    metrics: Arc<Metrics>,
    cache: Arc<Cache>,
    prewarm: Arc<Prewarmer>,
    expector: Arc<Expector>,
    every: std::time::Duration,
    background: crate::background::Background,
) {
    loop {
        refresh(&metrics, &cache, &prewarm, &expector).await;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = background.shutting_down() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::expect::{ExpectRequest, ExpectSettings};
    use crate::prewarm::ScheduleSpec;

    const HELD: &str = "127.0.0.1:5000/held:1";
    const MISSING: &str = "127.0.0.1:5000/missing:1";
    const EXPECTED: &str = "127.0.0.1:5000/expected:1";
    const USERS: &str = "127.0.0.1:5000/users-own:1";
    const PRIVATE: &str = "127.0.0.1:5000/secret/project-x:1";
    const PINNED: &str = "127.0.0.1:5000/pinned:1";

    #[tokio::test]
    async fn the_images_admins_named_are_ready_or_not_and_no_others_appear() {
        let r = crate::testing::Rig::on_system_clock(crate::testing::puller_settings());
        for (i, image) in [HELD, PINNED, "127.0.0.1:5000/unnamed:1"]
            .iter()
            .enumerate()
        {
            r.rt.offer(image, &format!("sha256:{i:064}"), "sha256:d", 10);
            r.puller
                .ensure(crate::puller::EnsureRequest {
                    image: image.to_string(),
                    policy: None,
                    credentials: None,
                    origin: crate::cache::Origin::Pull,
                    requester: None,
                    progress: None,
                })
                .await
                .unwrap();
        }
        r.cache.set_pinned(PINNED, true).await.unwrap();
        let prewarm = Prewarmer::new(
            r.puller.clone(),
            r.cache.clone(),
            r.metrics.clone(),
            &r.store,
            Arc::new(SystemClock),
            r.background.clone(),
        )
        .unwrap();
        prewarm
            .add(ScheduleSpec {
                name: "nightly".into(),
                cron: "0 3 * * *".into(),
                time_zone: None,
                images: vec![HELD.into(), MISSING.into()],
                top: None,
                jitter_ms: 0,
                concurrency: 2,
                catch_up: false,
                from_config: false,
            })
            .await
            .unwrap();
        let expector = Expector::new(
            r.puller.clone(),
            r.cache.clone(),
            r.metrics.clone(),
            &r.store,
            Arc::new(SystemClock),
            ExpectSettings::default(),
            None,
            r.background.clone(),
        )
        .unwrap();
        let root = Asker {
            uid: 0,
            admin: true,
        };
        expector
            .expect(
                ExpectRequest {
                    image: EXPECTED.into(),
                    deadline_ms: chrono::Utc::now().timestamp_millis() + 3_600_000,
                    job: None,
                    credentials: None,
                },
                root,
            )
            .await
            .unwrap();
        // A user's own expectation, and one that needs credentials (root's): no series.
        let ours = |image: &str, credentials| ExpectRequest {
            image: image.into(),
            deadline_ms: chrono::Utc::now().timestamp_millis() + 3_600_000,
            job: None,
            credentials,
        };
        let user = Asker {
            uid: 1000,
            admin: false,
        };
        expector.expect(ours(USERS, None), user).await.unwrap();
        let secret = crate::credentials::Credentials {
            username: "u".into(),
            password: "p".into(),
            kind: Default::default(),
        };
        expector
            .expect(ours(PRIVATE, Some(secret)), root)
            .await
            .unwrap();
        refresh(&r.metrics, &r.cache, &prewarm, &expector).await;
        let page = r.metrics.render();
        assert!(!page.contains(USERS), "{page}");
        assert!(!page.contains(PRIVATE), "{page}");
        let ready = |image: &str| r.metrics.gauge("cimage_image_ready", &[("image", image)]);
        assert_eq!(ready(HELD), 1.0);
        assert_eq!(ready(PINNED), 1.0);
        assert_eq!(ready(MISSING), 0.0);
        assert_eq!(ready(EXPECTED), 0.0);
        assert!(
            page.contains(&format!("cimage_image_ready{{image=\"{MISSING}\"}} 0")),
            "{page}"
        );
        assert!(
            !page.contains("unnamed"),
            "an image nobody named has no series:\n{page}"
        );
        // Named no more: its series is gone.
        prewarm.remove("nightly").await.unwrap();
        refresh(&r.metrics, &r.cache, &prewarm, &expector).await;
        assert!(!r.metrics.render().contains(MISSING));
    }
}
