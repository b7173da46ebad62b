//! Registries that misbehave, through a fault proxy in front of the testbed registry: server
//! errors, rate limits, connections closed or stalled mid-body, corrupt blobs, an oversized
//! manifest, a redirect loop, a slow link. Each case ends either retried and pulled (the
//! attempts in the log and the metrics) or failed with one line naming the registry and the
//! fault; in every case the index agrees with the runtime about the image, and once the fault is
//! gone the same pull succeeds.

mod common;

use std::time::{Duration, Instant};

use common::images::{Layer, Pushed};
use common::proxy::{Fault, Proxy};
use common::*;

/// A testbed image behind a fresh proxy, and a daemon that pulls through it.
struct Case {
    tb: Testbed,
    img: Pushed,
    proxy: Proxy,
    d: Daemon,
    port: u16,
    /// The image as pulled through the proxy.
    reference: String,
}

impl Case {
    fn new(prefix: &str, extra: &str) -> Self {
        let tb = Testbed::get();
        let img = tb.push_new(prefix, &[Layer::busybox(), Layer::random(256 << 10)]);
        let proxy = Proxy::start(&tb, &tb.registry, 0);
        let port = free_port();
        let d = Daemon::start(&format!(
            "MetricsAddr: 127.0.0.1:{port}\n{extra}\n{}",
            proxied_registries(&tb, &proxy.addr)
        ));
        let reference = format!("{}/{}:1", proxy.addr, img.repo);
        Case {
            tb,
            img,
            proxy,
            d,
            port,
            reference,
        }
    }

    /// The path piece of the image's own layer blob (the busybox layer below it is shared
    /// with other images, so the runtime may not fetch it).
    fn layer(&self) -> String {
        format!("/blobs/{}", self.img.blobs[1])
    }

    fn pull(&self, policy: &str) -> std::process::Output {
        self.d.cli(&["pull", &self.reference, "--policy", policy])
    }

    /// Whether cimage's index and the runtime agree about the image.
    fn assert_index_agrees(&self) {
        let out = self.d.cli(&["images", "-o", "json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let indexed = listed.as_array().unwrap().iter().any(|i| {
            i["names"]
                .as_array()
                .is_some_and(|n| n.iter().any(|n| n == self.reference.as_str()))
        });
        let held = ctr_images(&self.tb).contains(&self.reference);
        assert_eq!(indexed, held, "index {indexed}, runtime {held}: {listed}");
    }

    /// After the fault: heals the proxy and checks that the same pull now succeeds and that
    /// the index holds it.
    fn heals(&self) {
        self.proxy.heal();
        let out = self.pull("Always");
        assert!(
            out.status.success(),
            "after the fault: {}\n{}",
            stderr(&out),
            self.d.log()
        );
        self.assert_index_agrees();
        assert!(ctr_images(&self.tb).contains(&self.reference));
    }

    fn retries(&self) -> f64 {
        let page = scrape(self.port);
        page.lines()
            .filter(|l| {
                l.starts_with("cimage_pull_retries_total{")
                    && l.contains(&format!("registry=\"{}\"", self.proxy.addr))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The last line of a failed pull's error output, which must name the registry.
    fn failure(&self, out: &std::process::Output) -> String {
        assert!(!out.status.success(), "the pull succeeded");
        let err = stderr(out);
        let line = err.trim().lines().last().unwrap_or_default().to_owned();
        assert!(
            line.contains(&self.proxy.addr),
            "the error does not name the registry: {err}"
        );
        line
    }
}

#[test]
fn server_errors_on_blobs_are_retried_until_the_registry_answers() {
    let c = Case::new("fault-5xx", "");
    // The layer, twice: containerd fetches a blob a second time itself before it gives up,
    // so this is one failed attempt, retried by cimage.
    c.proxy.fault(
        &c.layer(),
        Fault::Status {
            code: 503,
            retry_after: None,
        },
        2,
    );
    let out = c.pull("IfNotPresent");
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.d.log());
    assert_eq!(c.proxy.hits(&c.layer()), 2);
    assert_eq!(c.retries(), 1.0, "{}", scrape(c.port));
    assert_eq!(c.d.log().matches("pull failed, retrying").count(), 1);
    c.assert_index_agrees();
    c.heals();
}

#[test]
fn server_errors_on_cimages_own_manifest_check_are_retried() {
    let c = Case::new("fault-head", "");
    assert!(c.pull("IfNotPresent").status.success());
    // Present: Always asks the registry (a HEAD by cimage) whether the tag moved.
    c.proxy.fault(
        "/manifests/",
        Fault::Status {
            code: 500,
            retry_after: None,
        },
        2,
    );
    let out = c.pull("Always");
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.d.log());
    assert_eq!(c.proxy.hits("/manifests/"), 2);
    assert!(
        c.d.log().contains("resolve failed, retrying"),
        "{}",
        c.d.log()
    );
    assert_eq!(c.retries(), 2.0);
    c.assert_index_agrees();
    c.heals();
}

#[test]
fn a_rate_limit_is_waited_out_as_its_retry_after_says() {
    let c = Case::new("fault-429", "");
    assert!(c.pull("IfNotPresent").status.success());
    c.proxy.fault(
        "/manifests/",
        Fault::Status {
            code: 429,
            retry_after: Some(2),
        },
        1,
    );
    let t = Instant::now();
    let out = c.pull("Always");
    let took = t.elapsed();
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.d.log());
    assert!(
        took >= Duration::from_secs(2),
        "retried after {took:?}, before the registry's Retry-After of 2s"
    );
    assert!(c.d.log().contains("Retry-After"), "{}", c.d.log());
    c.assert_index_agrees();
    c.heals();
}

#[test]
fn server_errors_that_last_fail_with_one_line_naming_the_registry() {
    let c = Case::new("fault-down", "PullRetries: 1");
    c.proxy.fault(
        "/v2/",
        Fault::Status {
            code: 503,
            retry_after: None,
        },
        0,
    );
    let out = c.pull("IfNotPresent");
    let line = c.failure(&out);
    assert!(line.contains("503"), "{line}");
    c.assert_index_agrees();
    c.heals();
}

#[test]
fn a_connection_closed_mid_blob_is_resumed() {
    let c = Case::new("fault-close", "");
    c.proxy.fault(&c.layer(), Fault::CloseAfter(64 << 10), 1);
    let out = c.pull("IfNotPresent");
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.d.log());
    assert_eq!(c.proxy.hits(&c.layer()), 1);
    // containerd fetches the rest itself, within the same attempt.
    let fetches = c
        .proxy
        .requests()
        .iter()
        .filter(|r| r.ends_with(&c.layer()))
        .count();
    assert!(fetches >= 2, "{:?}", c.proxy.requests());
    assert_eq!(c.retries(), 0.0);
    c.assert_index_agrees();
    c.heals();
}

#[test]
fn a_blob_that_stalls_is_cancelled_and_retried() {
    let c = Case::new("fault-stall", "PullStallTimeout: 2s");
    c.proxy.fault(&c.layer(), Fault::StallAfter(64 << 10), 1);
    let out = c.pull("IfNotPresent");
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.d.log());
    assert!(c.d.log().contains("pull stalled"), "{}", c.d.log());
    assert!(c.retries() >= 1.0);
    c.assert_index_agrees();
    c.heals();
}

#[test]
fn a_corrupt_blob_is_refused_and_retried() {
    let c = Case::new("fault-corrupt", "");
    c.proxy.fault(&c.layer(), Fault::Corrupt, 1);
    let out = c.pull("IfNotPresent");
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.d.log());
    assert_eq!(c.proxy.hits(&c.layer()), 1);
    assert!(c.retries() >= 1.0, "{}", c.d.log());
    c.assert_index_agrees();
    c.heals();
}

#[test]
fn a_blob_that_is_always_corrupt_fails_naming_the_digest() {
    let c = Case::new("fault-corrupt-always", "PullRetries: 1");
    c.proxy.fault(&c.layer(), Fault::Corrupt, 0);
    let out = c.pull("IfNotPresent");
    let line = c.failure(&out);
    assert!(line.contains("digest"), "{line}");
    c.assert_index_agrees();
    c.heals();
}

#[test]
fn an_oversized_manifest_is_refused_without_reading_it() {
    let c = Case::new("fault-huge", "");
    assert!(c.pull("IfNotPresent").status.success());
    c.proxy.fault("/manifests/", Fault::Oversized(100 << 20), 0);
    let out = c.pull("Always");
    let line = c.failure(&out);
    assert!(line.contains("manifest"), "{line}");
    // Refused from its announced size: far less than 100 MiB crossed the proxy.
    assert!(c.proxy.sent() < 20 << 20, "{} bytes sent", c.proxy.sent());
    c.assert_index_agrees();
    c.heals();
}

#[test]
fn a_redirect_loop_fails_with_one_line() {
    let c = Case::new("fault-redirect", "PullRetries: 0");
    c.proxy.fault("/blobs/", Fault::RedirectLoop, 0);
    let out = c.pull("IfNotPresent");
    let line = c.failure(&out);
    assert!(line.contains("redirect"), "{line}");
    c.assert_index_agrees();
    c.heals();
}

#[test]
fn a_slow_registry_is_only_slow() {
    let c = Case::new("fault-slow", "");
    c.proxy
        .fault("/manifests/", Fault::Delay(Duration::from_secs(1)), 0);
    c.proxy.fault(&c.layer(), Fault::Throttle(256 << 10), 0);
    let t = Instant::now();
    let out = c.pull("IfNotPresent");
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.d.log());
    assert!(t.elapsed() >= Duration::from_secs(1));
    assert_eq!(c.retries(), 0.0);
    c.assert_index_agrees();
    c.heals();
}

#[test]
fn a_registry_whose_every_connection_stalls_fails_each_attempt_at_the_stall_timeout() {
    let tb = Testbed::get();
    let img = tb.push_new("fault-stall-every", &[Layer::random(8 << 20)]);
    let proxy = Proxy::start(&tb, &tb.registry, 0);
    let d = Daemon::start(&format!(
        "PullStallTimeout: 5s\nPullTimeout: 5m\nPullRetries: 2\n{}",
        proxied_registries(&tb, &proxy.addr)
    ));
    // Every connection, the runtime's resumed fetches included, hangs after about 3 MB: no
    // attempt ever gets the layer whole, and each later one starts where the last stopped.
    proxy.stall_each_connection_after(3_000_000);
    let reference = format!("{}/{}:1", proxy.addr, img.repo);
    let out = d.cli(&["pull", &reference]);
    assert!(!out.status.success(), "the pull succeeded");
    let err = stderr(&out);
    let line = err.trim().lines().last().unwrap_or_default();
    assert!(
        line.contains(&format!("no progress for 5s from {}", proxy.addr))
            && line.contains("PullStallTimeout"),
        "{err}\n{}",
        d.log()
    );
    let log = d.log();
    assert_eq!(
        log.matches("pull stalled").count(),
        3,
        "every attempt (1 + PullRetries) ends as stalled: {log}"
    );
}
