//! Pre-warm schedules: what they say, their validation, and when they fire.

use std::str::FromStr;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use croner::parser::CronParser;
use croner::Cron;
use serde::{Deserialize, Serialize};

use crate::reference::ImageRef;

/// A schedule as written in the config or sent over the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleSpec {
    /// Unique name.
    pub name: String,
    /// Crontab expression: 5 fields, or 6 with seconds first.
    pub cron: String,
    /// IANA time zone (None: UTC).
    pub time_zone: Option<String>,
    /// Images to keep warm (normalised).
    pub images: Vec<String>,
    /// Also the N most popular images.
    pub top: Option<usize>,
    /// Random delay up to this many ms before a fired run starts.
    pub jitter_ms: u64,
    /// Images pulled at once.
    pub concurrency: usize,
    /// Run once after a start if a fire was missed while down.
    pub catch_up: bool,
    /// Defined in the config file (then only the config file changes it).
    pub from_config: bool,
}

/// Why a schedule is not usable; the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("schedule {name:?}: {message}")]
pub struct ScheduleError {
    /// The schedule's name.
    pub name: String,
    /// What is wrong.
    pub message: String,
}

/// A validated schedule, ready to compute fire times.
#[derive(Debug, Clone)]
pub struct Parsed {
    cron: Cron,
    tz: chrono_tz::Tz,
}

impl ScheduleSpec {
    /// Validates the schedule and normalises its image references.
    pub fn parse(&mut self) -> Result<Parsed, ScheduleError> {
        let err = |message: String| ScheduleError {
            name: self.name.clone(),
            message,
        };
        crate::names::check("schedule name", &self.name).map_err(|e| err(e.to_string()))?;
        let cron = CronParser::builder()
            .build()
            .parse(&self.cron)
            .map_err(|e| {
                err(format!(
                    "cron expression {:?} is not valid: {e} (expected 5 fields: minute hour day-of-month month day-of-week, e.g. \"0 3 * * *\"; or 6 with seconds first)",
                    self.cron
                ))
            })?;
        let tz = match self.time_zone.as_deref() {
            None | Some("") => chrono_tz::UTC,
            Some(z) => chrono_tz::Tz::from_str(z).map_err(|_| {
                err(format!(
                    "time zone {z:?} is not an IANA zone name (e.g. UTC, Europe/Berlin, Asia/Shanghai)"
                ))
            })?,
        };
        let mut images = Vec::new();
        for i in &self.images {
            images.push(
                ImageRef::parse(i)
                    .map_err(|e| err(e.to_string()))?
                    .to_string(),
            );
        }
        self.images = images;
        if self.images.is_empty() && self.top.unwrap_or(0) == 0 {
            return Err(err("a schedule needs Images, Top or both".into()));
        }
        if self.concurrency == 0 {
            return Err(err("concurrency must be at least 1".into()));
        }
        Ok(Parsed { cron, tz })
    }
}

impl Parsed {
    /// The first fire strictly after `after_ms` (Unix ms).
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        let t = self.tz.timestamp_millis_opt(after_ms).single()?;
        self.cron
            .find_next_occurrence(&t, false)
            .ok()
            .map(|n| n.with_timezone(&Utc).timestamp_millis())
    }

    /// The last fire at or before `at_ms`.
    pub fn last_at_or_before(&self, at_ms: i64) -> Option<i64> {
        let t = self.tz.timestamp_millis_opt(at_ms).single()?;
        self.cron
            .find_previous_occurrence(&t, true)
            .ok()
            .map(|n| n.with_timezone(&Utc).timestamp_millis())
    }
}

/// Jitter as a duration.
pub fn jitter(spec: &ScheduleSpec) -> Duration {
    Duration::from_millis(spec.jitter_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cron: &str, tz: Option<&str>) -> ScheduleSpec {
        ScheduleSpec {
            name: "nightly".into(),
            cron: cron.into(),
            time_zone: tz.map(str::to_owned),
            images: vec!["busybox:1".into()],
            top: None,
            jitter_ms: 0,
            concurrency: crate::config::DEFAULT_PREWARM_CONCURRENCY,
            catch_up: false,
            from_config: false,
        }
    }

    fn ms(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn fires_at_the_right_times_in_its_zone() {
        let mut s = spec("0 3 * * *", Some("Europe/Berlin"));
        let p = s.parse().unwrap();
        assert_eq!(s.images, vec!["docker.io/library/busybox:1".to_string()]);
        // 03:00 in Berlin (CET, UTC+1) is 02:00 UTC.
        assert_eq!(
            p.next_after(ms("2026-11-27T12:00:00Z")),
            Some(ms("2026-11-28T02:00:00Z"))
        );
        assert_eq!(
            p.last_at_or_before(ms("2026-11-28T02:00:00Z")),
            Some(ms("2026-11-28T02:00:00Z"))
        );
        // Standard crontab numbering: 0 is Sunday.
        let p = spec("0 0 * * 0", None).parse().unwrap();
        assert_eq!(
            p.next_after(ms("2026-11-27T12:00:00Z")),
            Some(ms("2026-11-29T00:00:00Z"))
        );
        // A seconds field for short periods.
        let p = spec("*/5 * * * * *", None).parse().unwrap();
        assert_eq!(
            p.next_after(ms("2026-11-27T12:00:01Z")),
            Some(ms("2026-11-27T12:00:05Z"))
        );
    }

    #[test]
    fn bad_input_is_refused_with_what_is_wrong() {
        let e = spec("61 * * * *", None).parse().unwrap_err();
        assert!(
            e.to_string()
                .contains("cron expression \"61 * * * *\" is not valid"),
            "{e}"
        );
        let e = spec("every night", None).parse().unwrap_err();
        assert!(e.to_string().contains("5 fields"), "{e}");
        let e = spec("0 3 * * *", Some("Mars/Olympus")).parse().unwrap_err();
        assert!(e.to_string().contains("IANA"), "{e}");
        let mut s = spec("0 3 * * *", None);
        s.images.clear();
        assert!(s
            .parse()
            .unwrap_err()
            .to_string()
            .contains("Images, Top or both"));
        s.top = Some(3);
        assert!(s.parse().is_ok());
        let mut s = spec("0 3 * * *", None);
        s.images = vec!["Bad Ref".into()];
        assert!(s
            .parse()
            .unwrap_err()
            .to_string()
            .contains("invalid image reference"));
    }
}
