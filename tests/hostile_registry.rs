//! A local user's own registry against the node, with the real containerd: pulls of hosts the
//! configuration does not name add no metric series beyond `other`.

mod common;

use std::collections::BTreeSet;

use common::images::Layer;
use common::*;

/// The series of a metrics page that carry a `registry` label.
fn registry_series(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| !l.starts_with('#') && l.contains("registry=\""))
        .filter_map(|l| l.rsplit_once(' ').map(|(s, _)| s.to_owned()))
        .collect()
}

/// A loopback address nothing listens on (connections are refused at once).
fn closed_address() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    addr
}

#[test]
fn pulls_naming_unknown_registries_add_no_metric_series_beyond_other() {
    let tb = Testbed::get();
    let port = free_port();
    let d = Daemon::start(&format!(
        "SocketGroup: nogroup\nPullRetries: 0\nMetricsAddr: 127.0.0.1:{port}"
    ));
    let nobody = Some((65534, 65534));
    // The configured registry keeps its name; the first unknown hosts make `other`'s series.
    let known = tb.push_new("labels", &[Layer::random(1024)]);
    d.pull_json(&known.reference, None);
    for _ in 0..2 {
        let out = d.cli_as(nobody, &["pull", &format!("{}/x:1", closed_address())]);
        assert!(!out.status.success());
    }
    let before = registry_series(&scrape(port));
    assert!(
        before
            .iter()
            .any(|s| s.contains(&format!("registry=\"{}\"", tb.registry))),
        "{before:?}"
    );
    // A user names 20 more hosts.
    for _ in 0..20 {
        let out = d.cli_as(nobody, &["pull", &format!("{}/x:1", closed_address())]);
        assert!(!out.status.success());
    }
    let after = registry_series(&scrape(port));
    let added: Vec<&String> = after.difference(&before).collect();
    assert!(
        added.is_empty(),
        "{} new series ({} before): {added:?}",
        added.len(),
        before.len()
    );
    assert!(
        after
            .iter()
            .filter(|s| !s.contains(&format!("registry=\"{}\"", tb.registry)))
            .all(|s| s.contains("registry=\"other\"")),
        "{after:?}"
    );
}
