//! Prometheus metrics, kept in memory and rendered in the text exposition format. The domain
//! modules count into [`Metrics`]; the daemon serves [`Metrics::render`] on
//! `ImageCache.MetricsAddr` (off by default).
//!
//! Every metric is declared once in [`CATALOG`] with its type and help; a name that is not
//! there is never rendered (a unit test checks that every name counted in the code is
//! declared).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Upper bounds (seconds) of every duration histogram's buckets.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 600.0,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; DURATION_BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// A series: metric name and its rendered labels.
type Series = (&'static str, String);

#[derive(Default)]
struct Inner {
    counters: BTreeMap<Series, u64>,
    gauges: BTreeMap<Series, f64>,
    histograms: BTreeMap<Series, Histogram>,
}

/// The daemon's metrics.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// What kind of metric a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Durations in [`DURATION_BUCKETS`].
    Histogram,
}

/// Every metric: name, kind, whether its series carry labels, help text. An unlabelled counter
/// or gauge starts at zero; a labelled one has no series until first counted.
pub const CATALOG: &[(&str, Kind, bool, &str)] = &[
    (
        "cimage_build_info",
        Kind::Gauge,
        true,
        "Always 1; the version label says which cimaged runs.",
    ),
    (
        "cimage_requests_total",
        Kind::Counter,
        true,
        "Image requests (pull, launch, pre-warm, CRI endpoint) by pull policy and result (pulled, cached, failed).",
    ),
    (
        "cimage_pulls_total",
        Kind::Counter,
        true,
        "Deprecated: the same count as cimage_requests_total, with label outcome; removed in the next release.",
    ),
    (
        "cimage_request_duration_seconds",
        Kind::Histogram,
        true,
        "Time to make an image ready, per request, by result.",
    ),
    (
        "cimage_runtime_pulls_total",
        Kind::Counter,
        true,
        "Real pulls through the runtime's PullImage, by registry and result (pulled, failed); requests that joined one count once.",
    ),
    (
        "cimage_pull_duration_seconds",
        Kind::Histogram,
        true,
        "Time of real runtime pulls (queueing, room-making and retries included), by registry.",
    ),
    (
        "cimage_pull_retries_total",
        Kind::Counter,
        true,
        "Retries of a registry check or a runtime pull, by registry and the reason of the failure retried (stalled, transient, unreachable, ...).",
    ),
    (
        "cimage_pull_failures_total",
        Kind::Counter,
        true,
        "Real pulls that failed, and requests whose registry check failed, by registry and reason.",
    ),
    (
        "cimage_pulls_in_flight",
        Kind::Gauge,
        false,
        "Real pulls under way (queued ones included).",
    ),
    (
        "cimage_pulls_queued",
        Kind::Gauge,
        false,
        "Real pulls waiting for a slot (ImageCache.MaxConcurrentPulls or a registry's limit).",
    ),
    (
        "cimage_pulled_bytes_total",
        Kind::Counter,
        true,
        "Bytes of images pulled through the runtime (the runtime's image sizes), by registry.",
    ),
    (
        "cimage_stale_served_total",
        Kind::Counter,
        false,
        "Always requests served from the cached copy unchecked while the registry was unreachable (OnRegistryUnavailable: UseCached).",
    ),
    (
        "cimage_cache_hits_total",
        Kind::Counter,
        false,
        "Requests answered from the runtime's copy without PullImage.",
    ),
    (
        "cimage_evictions_total",
        Kind::Counter,
        true,
        "Images evicted, by reason.",
    ),
    (
        "cimage_evicted_bytes_total",
        Kind::Counter,
        false,
        "Bytes of the images evicted.",
    ),
    (
        "cimage_prewarm_runs_total",
        Kind::Counter,
        true,
        "Pre-warm runs by outcome (ok, partial, failed, skipped).",
    ),
    (
        "cimage_image_ready",
        Kind::Gauge,
        true,
        "1 when the node holds the image, 0 when not, for each image an admin named: pinned, expected, or listed in a pre-warm schedule.",
    ),
    (
        "cimage_image_fs_high_watermark_ratio",
        Kind::Gauge,
        false,
        "ImageCache.Eviction.HighPercent as a ratio (what cimage_image_fs_used_ratio is kept under).",
    ),
    (
        "cimage_expected_images",
        Kind::Gauge,
        true,
        "Expectations (images announced for jobs on this node) by state: waiting, no_room, queued, pulling, ready, late, failed.",
    ),
    (
        "cimage_expect_lead_seconds",
        Kind::Histogram,
        false,
        "How long before its job's start (or first request) an expected image was ready.",
    ),
    (
        "cimage_expect_late_total",
        Kind::Counter,
        false,
        "Expected images not ready by their deadline, or asked for by their job before they were.",
    ),
    (
        "cimage_queue_source_up",
        Kind::Gauge,
        false,
        "1 when the last look at the scheduler's queue (ImageCache.Queue) worked, 0 when it failed.",
    ),
    (
        "cimage_tasks_total",
        Kind::Counter,
        true,
        "Job steps finished, by final state.",
    ),
    (
        "cimage_history_pruned_total",
        Kind::Counter,
        true,
        "Records removed from history (ImageCache.History), by kind (task, job, eviction, \
         prewarm_run).",
    ),
    (
        "cimage_launch_duration_seconds",
        Kind::Histogram,
        true,
        "Time of each stage of a step's launch (sandbox, image, create, start), by stage.",
    ),
    ("cimage_images", Kind::Gauge, false, "Images in the index."),
    (
        "cimage_image_bytes",
        Kind::Gauge,
        false,
        "Total size of the images in the index.",
    ),
    (
        "cimage_last_reconcile_timestamp_seconds",
        Kind::Gauge,
        false,
        "Unix time of the last successful reconciliation of the index with the runtime (0: none yet).",
    ),
    (
        "cimage_connections_refused_total",
        Kind::Counter,
        true,
        "Connections refused or ended by cimaged, by reason (over_connection_cap, \
         unidentified_peer, not_root, flood, protocol_error).",
    ),
    (
        "cimage_requests_refused_total",
        Kind::Counter,
        true,
        "API requests ended before they arrived whole, by reason (over_budget: the uid's \
         unfinished requests would hold more than its budget; read_timeout).",
    ),
    (
        "cimage_image_fs_used_ratio",
        Kind::Gauge,
        false,
        "Used share of the image filesystem as df counts it: used / (used + available).",
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

/// `name{labels}` or `name` alone.
fn with_labels(name: &str, labels: &str) -> String {
    if labels.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{labels}}}")
    }
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

    /// Sets an unlabelled gauge.
    pub fn set(&self, name: &'static str, value: f64) {
        self.set_labelled(name, &[], value);
    }

    /// Sets a gauge's series.
    pub fn set_labelled(&self, name: &'static str, labels: &[(&str, &str)], value: f64) {
        self.inner
            .lock()
            .unwrap()
            .gauges
            .insert((name, series(labels)), value);
    }

    /// Replaces every series of a labelled gauge with `series` (label value, value): a series
    /// not given is gone from the page, so a family that follows a changing set of things
    /// (images an admin named) holds only the current ones.
    pub fn set_family(&self, name: &'static str, label: &str, series_values: &[(String, f64)]) {
        let mut inner = self.inner.lock().unwrap();
        inner.gauges.retain(|(n, _), _| *n != name);
        for (v, value) in series_values {
            inner
                .gauges
                .insert((name, series(&[(label, v.as_str())])), *value);
        }
    }

    /// Moves an unlabelled gauge by `by` (up or down).
    pub fn gauge_add(&self, name: &'static str, by: f64) {
        *self
            .inner
            .lock()
            .unwrap()
            .gauges
            .entry((name, String::new()))
            .or_insert(0.0) += by;
    }

    /// Records one duration (seconds) in a histogram's series.
    pub fn observe(&self, name: &'static str, labels: &[(&str, &str)], secs: f64) {
        let mut inner = self.inner.lock().unwrap();
        let h = inner.histograms.entry((name, series(labels))).or_default();
        for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
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

    /// The current value of a gauge's series (0 when never set).
    pub fn gauge(&self, name: &'static str, labels: &[(&str, &str)]) -> f64 {
        self.inner
            .lock()
            .unwrap()
            .gauges
            .get(&(name, series(labels)))
            .copied()
            .unwrap_or(0.0)
    }

    /// Everything in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let inner = self.inner.lock().unwrap();
        let mut out = String::new();
        for (name, kind, labelled, help) in CATALOG {
            let kind_name = match kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind_name}");
            match kind {
                Kind::Counter => {
                    let mut any = false;
                    for ((_, labels), v) in inner.counters.iter().filter(|((n, _), _)| n == name) {
                        any = true;
                        let _ = writeln!(out, "{} {v}", with_labels(name, labels));
                    }
                    if !any && !labelled {
                        let _ = writeln!(out, "{name} 0");
                    }
                }
                Kind::Gauge => {
                    let mut any = false;
                    for ((_, labels), v) in inner.gauges.iter().filter(|((n, _), _)| n == name) {
                        any = true;
                        let _ = writeln!(out, "{} {v}", with_labels(name, labels));
                    }
                    if !any && !labelled {
                        let _ = writeln!(out, "{name} 0");
                    }
                }
                Kind::Histogram => {
                    for ((_, labels), h) in inner.histograms.iter().filter(|((n, _), _)| n == name)
                    {
                        let sep = if labels.is_empty() { "" } else { "," };
                        for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
                            let _ = writeln!(
                                out,
                                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}",
                                h.counts[i]
                            );
                        }
                        let _ =
                            writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
                        let _ = writeln!(
                            out,
                            "{} {}",
                            with_labels(&format!("{name}_sum"), labels),
                            h.sum
                        );
                        let _ = writeln!(
                            out,
                            "{} {}",
                            with_labels(&format!("{name}_count"), labels),
                            h.count
                        );
                    }
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
    fn renders_counters_gauges_and_histograms() {
        let m = Metrics::default();
        m.inc(
            "cimage_requests_total",
            &[("policy", "Always"), ("result", "cached")],
        );
        m.inc(
            "cimage_requests_total",
            &[("policy", "Always"), ("result", "cached")],
        );
        m.add("cimage_pulled_bytes_total", &[("registry", "r:5000")], 1024);
        m.set("cimage_images", 3.0);
        m.gauge_add("cimage_pulls_in_flight", 1.0);
        m.gauge_add("cimage_pulls_in_flight", 1.0);
        m.gauge_add("cimage_pulls_in_flight", -1.0);
        m.set_labelled("cimage_build_info", &[("version", "1.2.3")], 1.0);
        m.observe(
            "cimage_pull_duration_seconds",
            &[("registry", "r:5000")],
            0.03,
        );
        let text = m.render();
        assert!(
            text.contains("cimage_requests_total{policy=\"Always\",result=\"cached\"} 2"),
            "{text}"
        );
        assert!(text.contains("cimage_pulled_bytes_total{registry=\"r:5000\"} 1024"));
        assert!(text.contains("cimage_cache_hits_total 0"));
        assert!(text.contains("cimage_images 3"));
        assert!(text.contains("cimage_pulls_in_flight 1"));
        assert!(text.contains("cimage_pulls_queued 0"));
        assert!(text.contains("cimage_build_info{version=\"1.2.3\"} 1"));
        assert!(text
            .contains("cimage_pull_duration_seconds_bucket{registry=\"r:5000\",le=\"0.025\"} 0"));
        assert!(
            text.contains("cimage_pull_duration_seconds_bucket{registry=\"r:5000\",le=\"0.05\"} 1")
        );
        assert!(text.contains("cimage_pull_duration_seconds_count{registry=\"r:5000\"} 1"));
        assert_eq!(
            m.counter(
                "cimage_requests_total",
                &[("policy", "Always"), ("result", "cached")]
            ),
            2
        );
    }

    /// Every `"cimage_…"` name the sources count into is declared in the catalog (else it
    /// would never be rendered).
    #[test]
    fn every_metric_counted_is_declared() {
        let mut missing = Vec::new();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                if p.extension().is_none_or(|x| x != "rs") || p.ends_with("metrics.rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&p).unwrap();
                for piece in text.split('"').skip(1).step_by(2) {
                    let is_name = piece.starts_with("cimage_")
                        && piece.chars().all(|c| c.is_ascii_lowercase() || c == '_');
                    if is_name && !CATALOG.iter().any(|(n, ..)| *n == piece) {
                        missing.push(format!("{piece} in {}", p.display()));
                    }
                }
            }
        }
        assert!(missing.is_empty(), "undeclared metrics: {missing:?}");
    }
}
