//! Prometheus metrics, kept in memory and rendered in the text exposition format. The domain
//! modules count into [`Metrics`]; the daemon serves [`Metrics::render`] on
//! `ImageCache.MetricsAddr` (off by default).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the pull duration histogram's buckets.
pub const PULL_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 600.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; PULL_BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct Inner {
    counters: BTreeMap<(&'static str, String), u64>,
    gauges: BTreeMap<&'static str, f64>,
    pull_duration: Histogram,
}

/// The daemon's metrics.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// Every metric: name, type, whether its series carry labels, help text. An unlabelled counter
/// starts at zero; a labelled one has no series until first counted.
const HELP: &[(&str, &str, bool, &str)] = &[
    (
        "cimage_pulls_total",
        "counter",
        true,
        "Image requests by pull policy and outcome (pulled, cached, failed).",
    ),
    (
        "cimage_pull_duration_seconds",
        "histogram",
        false,
        "Time to make an image ready, per request.",
    ),
    (
        "cimage_stale_served_total",
        "counter",
        false,
        "Always requests served from the cached copy unchecked while the registry was unreachable (OnRegistryUnavailable: UseCached).",
    ),
    (
        "cimage_cache_hits_total",
        "counter",
        false,
        "Requests answered from the runtime's copy without PullImage.",
    ),
    (
        "cimage_pulled_bytes_total",
        "counter",
        false,
        "Bytes of images pulled (the runtime's image sizes).",
    ),
    (
        "cimage_evictions_total",
        "counter",
        true,
        "Images evicted, by reason.",
    ),
    (
        "cimage_prewarm_runs_total",
        "counter",
        true,
        "Pre-warm runs by outcome (ok, partial, failed, skipped).",
    ),
    (
        "cimage_tasks_total",
        "counter",
        true,
        "Job steps finished, by final state.",
    ),
    ("cimage_images", "gauge", false, "Images in the index."),
    (
        "cimage_image_bytes",
        "gauge",
        false,
        "Total size of the images in the index.",
    ),
];

/// The label part of a series, `k="v",…`, values escaped.
fn series(labels: &[(&str, &str)]) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Escapes a label value for the exposition format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Adds `by` to a counter with the given labels (`k="v",…` pairs).
    pub fn add(&self, name: &'static str, labels: &[(&str, &str)], by: u64) {
        *self
            .inner
            .lock()
            .unwrap()
            .counters
            .entry((name, series(labels)))
            .or_insert(0) += by;
    }

    /// Adds one to a counter.
    pub fn inc(&self, name: &'static str, labels: &[(&str, &str)]) {
        self.add(name, labels, 1);
    }

    /// Sets a gauge.
    pub fn set(&self, name: &'static str, value: f64) {
        self.inner.lock().unwrap().gauges.insert(name, value);
    }

    /// Records one pull duration.
    pub fn observe_pull(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let mut inner = self.inner.lock().unwrap();
        let h = &mut inner.pull_duration;
        for (i, bound) in PULL_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// The current value of a counter (for tests and status).
    pub fn counter(&self, name: &'static str, labels: &[(&str, &str)]) -> u64 {
        self.inner
            .lock()
            .unwrap()
            .counters
            .get(&(name, series(labels)))
            .copied()
            .unwrap_or(0)
    }

    /// Everything in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let inner = self.inner.lock().unwrap();
        let mut out = String::new();
        for (name, kind, labelled, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            match *kind {
                "counter" => {
                    let mut any = false;
                    for ((n, labels), v) in inner.counters.iter().filter(|((n, _), _)| n == name) {
                        any = true;
                        if labels.is_empty() {
                            let _ = writeln!(out, "{n} {v}");
                        } else {
                            let _ = writeln!(out, "{n}{{{labels}}} {v}");
                        }
                    }
                    if !any && !labelled {
                        let _ = writeln!(out, "{name} 0");
                    }
                }
                "gauge" => {
                    let v = inner.gauges.get(name).copied().unwrap_or(0.0);
                    let _ = writeln!(out, "{name} {v}");
                }
                _ => {
                    let h = &inner.pull_duration;
                    for (i, bound) in PULL_BUCKETS.iter().enumerate() {
                        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", h.counts[i]);
                    }
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
                    let _ = writeln!(out, "{name}_sum {}", h.sum);
                    let _ = writeln!(out, "{name}_count {}", h.count);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_the_histogram() {
        let m = Metrics::default();
        m.inc(
            "cimage_pulls_total",
            &[("policy", "Always"), ("outcome", "cached")],
        );
        m.inc(
            "cimage_pulls_total",
            &[("policy", "Always"), ("outcome", "cached")],
        );
        m.add("cimage_pulled_bytes_total", &[], 1024);
        m.set("cimage_images", 3.0);
        m.observe_pull(Duration::from_millis(30));
        let text = m.render();
        assert!(
            text.contains("cimage_pulls_total{policy=\"Always\",outcome=\"cached\"} 2"),
            "{text}"
        );
        assert!(text.contains("cimage_pulled_bytes_total 1024"));
        assert!(text.contains("cimage_cache_hits_total 0"));
        assert!(text.contains("cimage_images 3"));
        assert!(text.contains("cimage_pull_duration_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.contains("cimage_pull_duration_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("cimage_pull_duration_seconds_count 1"));
        assert_eq!(
            m.counter(
                "cimage_pulls_total",
                &[("policy", "Always"), ("outcome", "cached")]
            ),
            2
        );
    }
}
