//! What the index stores about an image ([`ImageRecord`]), how it came ([`Origin`]), one use to
//! record ([`Use`]), one eviction ([`EvictionRecord`]) and the decay of popularity. Below both
//! the index and the memory of images that left the node (`gone`), which each build on it.

use serde::{Deserialize, Serialize};

use super::evict::EvictionReason;
use crate::runtime::RuntimeImage;

/// How an image came to be on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Pulled for a job's task.
    Job,
    /// Pulled on request (`cimage pull`).
    Pull,
    /// Pulled by a pre-warm schedule.
    Prewarm,
    /// Found in the runtime, pulled by someone else.
    Runtime,
    /// Asked for through cimaged's CRI image endpoint (Craned, kubelet, crictl).
    Cri,
    /// Pulled because a job was expected to need it (`cimage expect`, a queue source).
    Expected,
}

impl Origin {
    /// The lower-case name used in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Job => "job",
            Origin::Pull => "pull",
            Origin::Prewarm => "prewarm",
            Origin::Runtime => "runtime",
            Origin::Cri => "cri",
            Origin::Expected => "expected",
        }
    }
}

/// What the index knows about one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The runtime's image id.
    pub id: String,
    /// Tags (from the runtime).
    pub names: Vec<String>,
    /// Manifest digest references (from the runtime).
    pub digests: Vec<String>,
    /// Size in bytes (from the runtime).
    pub size: u64,
    /// When cimage first saw it (Unix ms).
    pub first_seen: i64,
    /// When a request last used it (Unix ms; 0 if never).
    pub last_used: i64,
    /// How many requests used it.
    pub use_count: u64,
    /// Pinned images are never evicted.
    pub pinned: bool,
    /// How it came to be here.
    pub origin: Origin,
    /// Decayed use count as of `popularity_at` (see [`ImageRecord::popularity_now`]).
    #[serde(default)]
    pub popularity: f64,
    /// When `popularity` was last brought up to date (Unix ms).
    #[serde(default)]
    pub popularity_at: i64,
    /// First pulled with credentials: served only to requests that prove access.
    #[serde(default)]
    pub credentialed: bool,
    /// Salted fingerprints of the credentials that pulled it or were confirmed by its registry.
    #[serde(default)]
    pub fingerprints: Vec<String>,
    /// Callers (uids) that proved access to a credentialed image: only they, root and the admin
    /// group see its names.
    #[serde(default)]
    pub granted_uids: Vec<u32>,
    /// What the image's blobs really hold, each once, as measured when cimage pulled it (the
    /// runtime's own size is the sum its manifest claims, which a manifest that lists a layer
    /// many times, or lies about a blob the node already had, inflates).
    #[serde(default)]
    pub measured_size: Option<u64>,
}

/// At most this many uids are kept per image (the newest).
pub const MAX_GRANTED_UIDS: usize = 256;

impl ImageRecord {
    /// The size eviction counts: the runtime's, or what was measured when less.
    pub fn counted_size(&self) -> u64 {
        self.measured_size.map_or(self.size, |m| m.min(self.size))
    }

    /// Whether `uid` may see this image's names: it is public, or `uid` proved access to it.
    pub fn visible_to(&self, uid: u32) -> bool {
        !self.credentialed || self.granted_uids.contains(&uid)
    }
}

/// At most this many credential fingerprints are kept per image (the newest).
pub const MAX_FINGERPRINTS: usize = 64;

/// One use to record.
#[derive(Debug, Clone)]
pub struct Use {
    /// The image as the runtime reports it.
    pub image: RuntimeImage,
    /// What it was for.
    pub origin: Origin,
    /// The request's credential fingerprint, if it had credentials.
    pub fingerprint: Option<String>,
    /// The request pulled the image (rather than using the runtime's copy).
    pub pulled: bool,
    /// The registry confirmed the request's credentials can read it.
    pub verified: bool,
    /// The caller's uid, when the use comes from an API caller.
    pub requester: Option<u32>,
    /// What the image's blobs really hold, measured by the pull that brought it.
    pub measured: Option<u64>,
}

/// One eviction, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvictionRecord {
    /// When (Unix ms).
    pub time: i64,
    /// The image's id.
    pub id: String,
    /// Its names.
    pub names: Vec<String>,
    /// Its size.
    pub size: u64,
    /// Why it went.
    pub reason: EvictionReason,
}

/// `value` decayed from `at` to `now` with the given half-life.
pub fn decay(value: f64, at: i64, now: i64, half_life_ms: i64) -> f64 {
    if half_life_ms <= 0 || now <= at {
        return value;
    }
    value * 0.5f64.powf((now - at) as f64 / half_life_ms as f64)
}

impl ImageRecord {
    /// A record for an image first seen `now`, with no uses yet.
    pub(super) fn fresh(img: &RuntimeImage, origin: Origin, now: i64) -> Self {
        Self {
            id: img.id.clone(),
            names: img.repo_tags.clone(),
            digests: img.repo_digests.clone(),
            size: img.size,
            first_seen: now,
            last_used: 0,
            use_count: 0,
            pinned: false,
            origin,
            popularity: 0.0,
            popularity_at: now,
            credentialed: false,
            fingerprints: Vec::new(),
            granted_uids: Vec::new(),
            measured_size: None,
        }
    }

    /// The decayed use count now, for ranking the most popular images.
    pub fn popularity_now(&self, now: i64, half_life_ms: i64) -> f64 {
        decay(self.popularity, self.popularity_at, now, half_life_ms)
    }

    /// Takes the runtime's names, digests and size (what the runtime knows better).
    pub(super) fn refresh_from(&mut self, img: &RuntimeImage) {
        self.names = img.repo_tags.clone();
        self.digests = img.repo_digests.clone();
        self.size = img.size;
    }
}
