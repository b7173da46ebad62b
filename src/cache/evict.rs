//! Eviction planning: which images go, and why. A pure function over the index records, so the
//! rules are exact and testable; [`super::Cache::gc`] carries a plan out.
//!
//! Images count by [`ImageRecord::counted_size`]: the runtime's size, or what their blobs were
//! measured to hold when less.
//!
//! Rules, in order:
//! 1. never an image that is pinned, in use by a running step, the runtime's sandbox image, or
//!    younger than `MinAge` (since cimage first saw it);
//! 2. images unused for `MaxUnusedAge` go regardless of pressure;
//! 3. while the indexed images (plus an incoming pull) exceed `MaxBytes`, the least recently used
//!    go;
//! 4. when the image filesystem (plus an incoming pull) is above `HighPercent`, the least recently
//!    used go until it is at or below `LowPercent`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ImageRecord;
use crate::config;

/// Eviction settings (the `ImageCache.Eviction` section).
#[derive(Debug, Clone, PartialEq)]
pub struct EvictionSettings {
    /// Filesystem usage (percent) above which eviction starts.
    pub high_percent: f64,
    /// Filesystem usage (percent) eviction brings it down to.
    pub low_percent: f64,
    /// Bound on the total size of indexed images.
    pub max_bytes: Option<u64>,
    /// Images younger than this are never evicted.
    pub min_age: Duration,
    /// Images unused this long are evicted regardless of pressure.
    pub max_unused_age: Option<Duration>,
    /// Filesystem to watch instead of the one the runtime reports for images.
    pub path: Option<PathBuf>,
}

impl Default for EvictionSettings {
    fn default() -> Self {
        Self {
            high_percent: config::DEFAULT_HIGH_PERCENT,
            low_percent: config::DEFAULT_LOW_PERCENT,
            max_bytes: None,
            min_age: config::DEFAULT_MIN_AGE,
            max_unused_age: None,
            path: None,
        }
    }
}

/// Why an image was evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvictionReason {
    /// Unused for `MaxUnusedAge`.
    Unused,
    /// The indexed images exceeded `MaxBytes`.
    MaxBytes,
    /// The image filesystem passed `HighPercent`.
    DiskPressure,
}

impl EvictionReason {
    /// The name used in records, metrics and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            EvictionReason::Unused => "unused",
            EvictionReason::MaxBytes => "max_bytes",
            EvictionReason::DiskPressure => "disk_pressure",
        }
    }
}

/// Size and usage of a filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    /// Bytes used plus bytes that may still be written (df's size for its Use%; blocks
    /// reserved for root are left out).
    pub total: u64,
    /// Used bytes.
    pub used: u64,
}

impl FsUsage {
    /// Usage in percent.
    pub fn percent(&self, used: u64) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            used as f64 * 100.0 / self.total as f64
        }
    }
}

/// What a gc would do.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Images to evict, in order, with the reason.
    pub evict: Vec<(ImageRecord, EvictionReason)>,
    /// Images that may not be evicted, with why.
    pub protected: Vec<(ImageRecord, String)>,
    /// Set when the targets cannot be met without touching protected images.
    pub shortfall: Option<String>,
}

/// When an image was last of use: its last use, or when it was first seen if never used.
fn recency(r: &ImageRecord) -> i64 {
    if r.last_used > 0 {
        r.last_used
    } else {
        r.first_seen
    }
}

/// What pulls in flight add, as each rule counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Incoming {
    /// Bytes added to the indexed images' total (`MaxBytes`).
    pub index: u64,
    /// Bytes still to land on the image filesystem (`HighPercent`): bytes that have arrived
    /// are in its usage already.
    pub disk: u64,
}

/// Plans an eviction. `protect` names why an image may not go (pinned, in use, sandbox);
/// `incoming` is the size of a pull to make room for (0 for a plain gc).
pub fn plan(
    images: &[ImageRecord],
    protect: impl Fn(&ImageRecord) -> Option<String>,
    now_ms: i64,
    fs: Option<FsUsage>,
    s: &EvictionSettings,
    incoming: u64,
) -> Plan {
    let incoming = Incoming {
        index: incoming,
        disk: incoming,
    };
    plan_with(images, protect, now_ms, fs, s, incoming)
}

/// [`plan`], with what pulls in flight add counted apart for each rule.
pub fn plan_with(
    images: &[ImageRecord],
    protect: impl Fn(&ImageRecord) -> Option<String>,
    now_ms: i64,
    fs: Option<FsUsage>,
    s: &EvictionSettings,
    incoming: Incoming,
) -> Plan {
    let mut out = Plan::default();
    let mut eligible: Vec<&ImageRecord> = Vec::new();
    for r in images {
        let age = Duration::from_millis((now_ms - r.first_seen).max(0) as u64);
        let why = protect(r).or_else(|| {
            (age < s.min_age).then(|| {
                format!(
                    "younger than MinAge ({})",
                    crate::units::format_duration(s.min_age)
                )
            })
        });
        match why {
            Some(w) => out.protected.push((r.clone(), w)),
            None => eligible.push(r),
        }
    }
    eligible.sort_by_key(|r| (recency(r), r.id.clone()));
    let mut next = 0;
    let mut take = |out: &mut Plan, reason| -> Option<u64> {
        while next < eligible.len() {
            let r = eligible[next];
            next += 1;
            if out.evict.iter().any(|(e, _)| e.id == r.id) {
                continue;
            }
            out.evict.push((r.clone(), reason));
            return Some(r.counted_size());
        }
        None
    };
    let mut freed: u64 = 0;
    if let Some(max_unused) = s.max_unused_age {
        for r in &eligible {
            let idle = Duration::from_millis((now_ms - recency(r)).max(0) as u64);
            if idle >= max_unused {
                out.evict.push(((*r).clone(), EvictionReason::Unused));
                freed += r.counted_size();
            }
        }
    }
    if let Some(max) = s.max_bytes {
        let total: u64 = images.iter().map(|r| r.counted_size()).sum::<u64>() + incoming.index;
        while total.saturating_sub(freed) > max {
            match take(&mut out, EvictionReason::MaxBytes) {
                Some(n) => freed += n,
                None => {
                    out.shortfall = Some(format!(
                        "cached images need {} bytes but MaxBytes is {max}, and the rest is pinned, in use or younger than MinAge",
                        total.saturating_sub(freed)
                    ));
                    break;
                }
            }
        }
    }
    if let Some(fs) = fs {
        let used = |freed: u64| (fs.used + incoming.disk).saturating_sub(freed);
        if fs.percent(used(freed)) > s.high_percent {
            let target = (fs.total as f64 * s.low_percent / 100.0) as u64;
            while used(freed) > target {
                match take(&mut out, EvictionReason::DiskPressure) {
                    Some(n) => freed += n,
                    None => {
                        if fs.percent(used(freed)) > s.high_percent {
                            out.shortfall = Some(format!(
                                "the image filesystem would be {:.1}% full (HighPercent {}), and the remaining images are pinned, in use or younger than MinAge",
                                fs.percent(used(freed)),
                                s.high_percent
                            ));
                        }
                        break;
                    }
                }
            }
        }
    }
    out
}

/// Usage of the filesystem holding `path`.
pub fn fs_usage(path: &std::path::Path) -> std::io::Result<FsUsage> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path contains a NUL byte"))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and st a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    let total = st.f_blocks as u64 * frsize;
    let avail = st.f_bavail as u64 * frsize;
    let free = st.f_bfree as u64 * frsize;
    // As df's Use%: used over what is used plus what may still be written, so blocks reserved
    // for root count on neither side.
    let used = total.saturating_sub(free);
    Ok(FsUsage {
        total: used + avail,
        used,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Origin;

    const MIN: i64 = 60_000;

    fn rec(id: &str, size: u64, first_seen: i64, last_used: i64, pinned: bool) -> ImageRecord {
        ImageRecord {
            id: id.into(),
            names: vec![format!("r/{id}:1")],
            digests: vec![],
            size,
            first_seen,
            last_used,
            use_count: u64::from(last_used > 0),
            pinned,
            origin: Origin::Pull,
            popularity: 0.0,
            popularity_at: 0,
            credentialed: false,
            fingerprints: vec![],
            granted_uids: vec![],
            measured_size: None,
        }
    }

    fn pins(r: &ImageRecord) -> Option<String> {
        r.pinned.then(|| "pinned".to_string())
    }

    fn ids(p: &Plan) -> Vec<(&str, EvictionReason)> {
        p.evict
            .iter()
            .map(|(r, why)| (r.id.as_str(), *why))
            .collect()
    }

    fn settings() -> EvictionSettings {
        EvictionSettings {
            min_age: Duration::from_secs(120),
            ..Default::default()
        }
    }

    #[test]
    fn max_bytes_evicts_least_recently_used_first_and_spares_pins_and_the_young() {
        let now = 100 * MIN;
        let images = [
            rec("old-used", 10, 0, 50 * MIN, false),
            rec("never-used", 10, 10 * MIN, 0, false),
            rec("pinned", 10, 0, 1, true),
            rec("recent", 10, 0, 90 * MIN, false),
            rec("young", 10, now - MIN, 0, false),
        ];
        let mut s = settings();
        s.max_bytes = Some(30);
        let p = plan(&images, pins, now, None, &s, 0);
        assert_eq!(
            ids(&p),
            [
                ("never-used", EvictionReason::MaxBytes),
                ("old-used", EvictionReason::MaxBytes)
            ]
        );
        assert!(p.shortfall.is_none());
        assert_eq!(p.protected.len(), 2);

        // An incoming pull of 5 bytes needs one more: "recent" goes too.
        let p = plan(&images, pins, now, None, &s, 5);
        assert_eq!(p.evict.len(), 3);
        assert!(p.shortfall.is_none());

        // Needing more than the unprotected images hold is a shortfall that names why.
        let p = plan(&images, pins, now, None, &s, 100);
        assert!(p
            .shortfall
            .unwrap()
            .contains("pinned, in use or younger than MinAge"));
    }

    #[test]
    fn unused_images_go_regardless_of_pressure() {
        let now = 100 * MIN;
        let images = [
            rec("idle", 10, 0, 10 * MIN, false),
            rec("busy", 10, 0, 99 * MIN, false),
        ];
        let mut s = settings();
        s.max_unused_age = Some(Duration::from_secs(3600));
        assert_eq!(
            ids(&plan(&images, pins, now, None, &s, 0)),
            [("idle", EvictionReason::Unused)]
        );
        s.max_unused_age = None;
        assert!(plan(&images, pins, now, None, &s, 0).evict.is_empty());
    }

    #[test]
    fn disk_pressure_evicts_down_to_the_low_mark() {
        let now = 100 * MIN;
        let images = [
            rec("a", 40, 0, MIN, false),
            rec("b", 40, 0, 2 * MIN, false),
            rec("c", 40, 0, 3 * MIN, false),
        ];
        let s = settings();
        // 900 of 1000 used: above 85%, down to 800 needs 100 freed → a, b, c (40 each) → 3 images.
        let fs = FsUsage {
            total: 1000,
            used: 900,
        };
        let p = plan(&images, pins, now, Some(fs), &s, 0);
        assert_eq!(
            ids(&p).iter().map(|x| x.0).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert!(p
            .evict
            .iter()
            .all(|(_, w)| *w == EvictionReason::DiskPressure));
        // 840 used: below the high mark, nothing to do — unless a pull of 20 would cross it.
        let fs = FsUsage {
            total: 1000,
            used: 840,
        };
        assert!(plan(&images, pins, now, Some(fs), &s, 0).evict.is_empty());
        assert_eq!(plan(&images, pins, now, Some(fs), &s, 20).evict.len(), 2);
    }

    #[test]
    fn reads_a_real_filesystem_as_df_does() {
        let u = fs_usage(std::path::Path::new("/")).unwrap();
        assert!(u.total > 0 && u.used <= u.total);
        // df's Use% for the same filesystem, rounded up as df rounds.
        let out = std::process::Command::new("df")
            .args(["--output=pcent", "/"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let df: f64 = text
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .trim_end_matches('%')
            .parse()
            .unwrap();
        assert!(
            (u.percent(u.used).ceil() - df).abs() <= 1.0,
            "{u:?} vs df {df}%"
        );
    }
}
