//! What one caller can make the puller hold or grow: metric series by registry.

use std::collections::BTreeSet;

use super::{req, rig, settings, APP, ID1};
use crate::policy::PullPolicy;

/// The series of the metrics page that carry a `registry` label.
fn registry_series(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| !l.starts_with('#') && l.contains("registry=\""))
        .map(|l| l.rsplit_once(' ').map_or(l, |(s, _)| s).to_owned())
        .collect()
}

#[tokio::test]
async fn pulls_naming_unknown_registries_add_no_series_beyond_other() {
    let r = rig(settings());
    r.rt.offer(APP, ID1, "sha256:d1", 10);
    r.puller
        .ensure(req(APP, Some(PullPolicy::IfNotPresent)))
        .await
        .unwrap();
    // One pull from an unknown host that succeeds, one that fails: `other` has its series.
    let first = "127.0.0.1:6000/x:1";
    r.rt.offer(first, ID1, "sha256:d1", 10);
    r.puller.ensure(req(first, None)).await.unwrap();
    let _ = r.puller.ensure(req("127.0.0.1:6001/x:1", None)).await;
    let before = registry_series(&r.metrics.render());
    assert!(
        before
            .iter()
            .any(|s| s.contains("registry=\"127.0.0.1:5000\"")),
        "a configured registry keeps its name: {before:?}"
    );
    for n in 2..32 {
        let image = format!("127.0.0.1:{}/x:1", 6000 + n);
        r.rt.offer(&image, ID1, "sha256:d1", 10);
        r.puller.ensure(req(&image, None)).await.unwrap();
        let _ = r
            .puller
            .ensure(req(&format!("127.0.0.1:{}/gone:1", 6000 + n), None))
            .await;
    }
    let after = registry_series(&r.metrics.render());
    let added: Vec<&String> = after.difference(&before).collect();
    assert!(added.is_empty(), "{} new series: {added:?}", added.len());
    assert!(
        after
            .iter()
            .filter(|s| !s.contains("registry=\"127.0.0.1:5000\""))
            .all(|s| s.contains("registry=\"other\"")),
        "{after:?}"
    );
}
