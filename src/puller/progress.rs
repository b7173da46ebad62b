//! What a pull is doing, as its requesters and operators see it: the phase (queued with its
//! place, resolving, downloading, unpacking, done or failed) and, where the runtime reports
//! them, the bytes of each layer.
//!
//! Each pull in flight owns one [`PullProgress`] behind a `watch` channel; every requester that
//! joined the pull reads the same value. Bytes come from the runtime's downloads (containerd's
//! ingests): an ingest shows a layer's bytes while it is fetched and disappears when the layer
//! is committed, so a layer seen and then gone, or already held by the runtime, counts whole.
//! For the big layers cimage fetches itself in ranges ([`crate::fetch`]), its own counts of
//! the bytes written are taken too (exact, per layer, whether or not the runtime lists them).
//! Once every layer is committed the runtime is unpacking, which shows no bytes.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use crate::registry::ImageManifest;
use crate::runtime::Ingest;

/// Where a pull is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for a pull slot (`MaxConcurrentPulls` or the registry's own limit).
    Queued,
    /// Reading the image's manifest (its layers and their sizes) from the registry.
    Resolving,
    /// The runtime is fetching layers.
    Downloading,
    /// Every layer is in; the runtime is unpacking them into snapshots.
    Unpacking,
    /// The image is ready.
    Done,
    /// The pull failed.
    Failed,
}

impl Phase {
    /// `queued`, `resolving`, `downloading`, `unpacking`, `done` or `failed` (the wire form).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Resolving => "resolving",
            Phase::Downloading => "downloading",
            Phase::Unpacking => "unpacking",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }

    /// Done or failed: nothing follows.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One layer's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerProgress {
    /// `sha256:…`.
    pub digest: String,
    /// Bytes in so far.
    pub done: u64,
    /// The layer's size from the manifest.
    pub total: u64,
}

/// A snapshot of one pull in flight.
#[derive(Debug, Clone, PartialEq)]
pub struct PullProgress {
    /// The normalised reference being pulled.
    pub image: String,
    /// Its registry host.
    pub registry: String,
    /// Where the pull is.
    pub phase: Phase,
    /// Place in the queue (1 = next), while queued; 0 otherwise.
    pub queue_position: u32,
    /// Layer bytes in so far.
    pub done_bytes: u64,
    /// The layers' bytes from the manifest; 0 while unknown.
    pub total_bytes: u64,
    /// Each layer, bottom first (empty while the manifest is unknown).
    pub layers: Vec<LayerProgress>,
    /// Whether the runtime reports bytes at all (containerd does, CRI-O does not).
    pub bytes_known: bool,
    /// Recent download rate, bytes per second.
    pub rate: f64,
    /// Requests waiting on this pull.
    pub requesters: u32,
    /// The attempt under way (1 for the first; retries count up).
    pub attempt: u32,
    /// When the pull began (queueing included).
    pub started: SystemTime,
    /// The error, once failed.
    pub error: Option<String>,
}

impl PullProgress {
    /// A pull of `image` from `registry` that has just begun.
    pub fn new(image: &str, registry: &str) -> Self {
        Self {
            image: image.to_owned(),
            registry: registry.to_owned(),
            phase: Phase::Resolving,
            queue_position: 0,
            done_bytes: 0,
            total_bytes: 0,
            layers: Vec::new(),
            bytes_known: false,
            rate: 0.0,
            requesters: 0,
            attempt: 1,
            started: SystemTime::now(),
            error: None,
        }
    }

    /// Seconds to go at the current rate, when both are known.
    pub fn eta(&self) -> Option<Duration> {
        let left = self.total_bytes.checked_sub(self.done_bytes)?;
        (self.phase == Phase::Downloading && self.rate > 1.0 && self.total_bytes > 0)
            .then(|| Duration::from_secs_f64(left as f64 / self.rate))
    }
}

/// One layer as the tracker follows it.
#[derive(Debug, Clone)]
struct Layer {
    digest: String,
    total: u64,
    done: u64,
    /// Seen as an ingest in the current attempt (an ingest of a cancelled attempt may vanish
    /// without being committed, and the next attempt resumes it).
    seen: bool,
    /// In the runtime's content store: whole.
    committed: bool,
    /// The most bytes of it seen downloaded (what really arrived, whatever its claimed size).
    fetched: u64,
}

/// Follows a pull's layers through the runtime's ingests.
#[derive(Debug, Default)]
pub(super) struct Tracker {
    layers: Vec<Layer>,
    /// Ingests of the last look, by digest (for a pull whose manifest is unknown).
    loose: HashMap<String, (u64, u64)>,
    rate: f64,
    last: Option<(Instant, u64)>,
    /// One of the layers was seen downloading, or arrived, in the current attempt.
    moved: bool,
}

impl Tracker {
    /// A tracker for the layers of `manifest` (or of whatever the runtime fetches, when it is
    /// unknown).
    pub(super) fn new(manifest: Option<&ImageManifest>) -> Self {
        let layers = manifest
            .map(|m| {
                m.layers
                    .iter()
                    .map(|b| Layer {
                        digest: b.digest.clone(),
                        total: b.size,
                        done: 0,
                        seen: false,
                        committed: false,
                        fetched: 0,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            layers,
            ..Self::default()
        }
    }

    /// Layers neither committed nor being fetched right now (to ask the runtime whether it
    /// holds them already).
    pub(super) fn unaccounted(&self, ingests: &[Ingest]) -> Vec<String> {
        self.layers
            .iter()
            .filter(|l| !l.committed && !ingests.iter().any(|i| i.digest == l.digest))
            .map(|l| l.digest.clone())
            .collect()
    }

    /// Marks a layer the runtime holds as whole.
    pub(super) fn committed(&mut self, digest: &str) {
        for l in self.layers.iter_mut().filter(|l| l.digest == digest) {
            self.moved |= !l.committed;
            l.committed = true;
            l.done = l.total;
        }
    }

    /// A new attempt of the pull begins: a layer seen fetched by an earlier attempt and not
    /// known to be committed is no longer taken as committed when its ingest is gone (the
    /// runtime drops a cancelled pull's ingests from its list and resumes them later).
    pub(super) fn begin_attempt(&mut self) {
        for l in self.layers.iter_mut().filter(|l| !l.committed) {
            l.seen = false;
        }
        self.moved = false;
    }

    /// The runtime is under way with this attempt: one of the layers downloaded or arrived
    /// in it, or every layer is in already (what is left is the runtime's own unpacking).
    /// Never while the layers are unknown.
    pub(super) fn under_way(&self) -> bool {
        self.moved || self.all_committed()
    }

    /// Takes in cimage's own byte counts of the blobs it fetches itself (exact, as written into
    /// the runtime's store; see [`crate::fetch`]), after a look at the runtime's ingests: a
    /// layer not yet committed counts at least those bytes, and they move the pull.
    fn own(&mut self, counts: &[(String, u64)]) {
        for (digest, n) in counts {
            for l in self
                .layers
                .iter_mut()
                .filter(|l| &l.digest == digest && !l.committed)
            {
                let n = (*n).min(l.total);
                if n > l.done {
                    l.done = n;
                    l.fetched = l.fetched.max(n);
                    self.moved = true;
                }
            }
        }
    }

    /// Takes in one look at the runtime's ingests and cimage's own counts of the blobs it
    /// fetches itself ([`Tracker::own`]; empty when it fetches none).
    pub(super) fn update(&mut self, ingests: &[Ingest], own: &[(String, u64)], now: Instant) {
        for l in self.layers.iter_mut() {
            match ingests.iter().find(|i| i.digest == l.digest) {
                // Fetched again: whatever made it look committed, it is not.
                Some(i) => {
                    l.seen = true;
                    self.moved = true;
                    l.committed = false;
                    l.done = i.offset.min(l.total);
                    l.fetched = l.fetched.max(l.done);
                }
                // Seen in this attempt, now gone: committed.
                None if l.seen && !l.committed => {
                    l.committed = true;
                    l.done = l.total;
                }
                None => {}
            }
        }
        if self.layers.is_empty() {
            for i in ingests {
                self.loose.insert(i.digest.clone(), (i.offset, i.total));
            }
        }
        self.own(own);
        let done = self.done();
        if let Some((t, before)) = self.last {
            let dt = now.duration_since(t).as_secs_f64();
            if dt > 0.0 {
                let now_rate = done.saturating_sub(before) as f64 / dt;
                // A short memory: the rate follows a change within a few looks.
                self.rate = if self.rate == 0.0 {
                    now_rate
                } else {
                    0.5 * self.rate + 0.5 * now_rate
                };
            }
        }
        self.last = Some((now, done));
    }

    /// Bytes seen downloading for the layers, each at the most seen (a layer the runtime held
    /// already, or one that came and went between two looks, counts nothing): what has
    /// really arrived, whatever the manifest claims.
    pub(super) fn fetched(&self) -> u64 {
        self.layers.iter().map(|l| l.fetched).sum()
    }

    /// Layer bytes in so far.
    pub(super) fn done(&self) -> u64 {
        if self.layers.is_empty() {
            return self.loose.values().map(|(o, _)| o).sum();
        }
        self.layers.iter().map(|l| l.done).sum()
    }

    /// Whether the manifest's layers are known.
    pub(super) fn has_layers(&self) -> bool {
        !self.layers.is_empty()
    }

    /// Every layer is committed (the runtime unpacks now); false while the layers are unknown.
    pub(super) fn all_committed(&self) -> bool {
        !self.layers.is_empty() && self.layers.iter().all(|l| l.committed)
    }

    /// Writes the tracker's view into `p`.
    pub(super) fn fill(&self, p: &mut PullProgress) {
        p.done_bytes = self.done();
        p.rate = self.rate;
        if self.layers.is_empty() {
            p.total_bytes = self.loose.values().map(|(_, t)| t).sum();
        } else {
            p.total_bytes = self.layers.iter().map(|l| l.total).sum();
            p.layers = self
                .layers
                .iter()
                .map(|l| LayerProgress {
                    digest: l.digest.clone(),
                    done: l.done,
                    total: l.total,
                })
                .collect();
        }
        if self.all_committed() && p.phase == Phase::Downloading {
            p.phase = Phase::Unpacking;
            p.rate = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Blob;

    fn manifest() -> ImageManifest {
        ImageManifest {
            config: Blob {
                digest: "sha256:c".into(),
                size: 5,
            },
            layers: vec![
                Blob {
                    digest: "sha256:a".into(),
                    size: 100,
                },
                Blob {
                    digest: "sha256:b".into(),
                    size: 50,
                },
            ],
        }
    }

    fn ingest(d: &str, offset: u64, total: u64) -> Ingest {
        Ingest {
            digest: d.into(),
            offset,
            total,
        }
    }

    #[test]
    fn layers_count_while_fetched_and_whole_once_committed() {
        let mut t = Tracker::new(Some(&manifest()));
        let mut p = PullProgress::new("r/x:1", "r");
        p.phase = Phase::Downloading;
        let t0 = Instant::now();
        t.update(&[ingest("sha256:a", 40, 100)], &[], t0);
        t.fill(&mut p);
        assert_eq!((p.done_bytes, p.total_bytes), (40, 150));
        // `a` is gone (committed), `b` held already.
        t.update(&[], &[], t0 + Duration::from_secs(1));
        assert_eq!(t.unaccounted(&[]), vec!["sha256:b".to_owned()]);
        t.committed("sha256:b");
        t.fill(&mut p);
        assert_eq!(p.done_bytes, 150);
        assert_eq!(p.phase, Phase::Unpacking, "all layers in: unpacking");
        assert!(t.all_committed());
    }

    #[test]
    fn the_rate_follows_the_bytes() {
        let mut t = Tracker::new(Some(&manifest()));
        let t0 = Instant::now();
        t.update(&[ingest("sha256:a", 0, 100)], &[], t0);
        t.update(
            &[ingest("sha256:a", 50, 100)],
            &[],
            t0 + Duration::from_secs(1),
        );
        let mut p = PullProgress::new("r/x:1", "r");
        p.phase = Phase::Downloading;
        t.fill(&mut p);
        assert_eq!(p.rate, 50.0);
        assert_eq!(p.eta(), Some(Duration::from_secs(2)));
    }

    #[test]
    fn without_a_manifest_the_ingests_are_the_totals() {
        let mut t = Tracker::new(None);
        t.update(&[ingest("sha256:z", 7, 70)], &[], Instant::now());
        let mut p = PullProgress::new("r/x:1", "r");
        t.fill(&mut p);
        assert_eq!((p.done_bytes, p.total_bytes), (7, 70));
        assert!(!t.all_committed());
    }

    #[test]
    fn own_counts_move_a_layer_the_runtime_does_not_list() {
        let mut t = Tracker::new(Some(&manifest()));
        t.begin_attempt();
        let t0 = Instant::now();
        // cimage writes layer a itself; the runtime's list shows only layer b.
        t.update(
            &[ingest("sha256:b", 10, 50)],
            &[("sha256:a".into(), 60)],
            t0,
        );
        assert_eq!(t.done(), 70);
        assert!(t.under_way(), "cimage's bytes show the registry answers");
        // The runtime's view of a, lagging behind cimage's count, does not take bytes back.
        t.update(
            &[ingest("sha256:a", 30, 100), ingest("sha256:b", 20, 50)],
            &[("sha256:a".into(), 80)],
            t0 + Duration::from_secs(1),
        );
        assert_eq!(t.done(), 100);
        assert!((t.rate - 30.0).abs() < 1e-9, "rate {}", t.rate);
        // A count past the layer's size (it cannot be) is held to the size; a committed layer
        // stays whole.
        t.committed("sha256:b");
        t.update(
            &[],
            &[("sha256:a".into(), 500), ("sha256:b".into(), 1)],
            t0 + Duration::from_secs(2),
        );
        assert_eq!(t.done(), 150);
    }
}
