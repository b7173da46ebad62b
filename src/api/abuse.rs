//! What the sockets refuse, counted and told without letting the telling become the flood.
//!
//! A connection over its uid's cap, a peer that cannot be identified, an HTTP/2 connection the
//! server ended for the peer's protocol errors or floods (of resets, among others), a request over its
//! uid's budget of unfinished bytes or one that did not arrive whole in time: each is counted in
//! `cimage_connections_refused_total{reason}` or `cimage_requests_refused_total{reason}` (the
//! reasons are the fixed names of [`Refusal`]), and logged at most once per uid a minute, with
//! how many of each kind happened since that uid's last line. A user reconnecting in a loop
//! therefore costs the log one line a minute, whatever the rate.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use crate::metrics::Metrics;

/// At most one line per uid this often.
pub const REPORT_EVERY: Duration = Duration::from_secs(60);

/// What was refused, and why. Each is one label value of a counter: a bounded set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// A connection beyond the uid's `MaxConnectionsPerUser` / `MaxConnectionsPerAdmin`.
    OverConnectionCap,
    /// A connection whose peer credentials could not be read.
    UnidentifiedPeer,
    /// A connection to the root-only CRI image socket from another uid.
    NotRoot,
    /// A connection the HTTP/2 server ended for a flood (`ENHANCE_YOUR_CALM`): streams reset
    /// before they were served, in a loop, or endless CONTINUATION or empty frames.
    Flood,
    /// A connection the HTTP/2 server ended for another protocol error of the peer.
    ProtocolError,
    /// A request that would have taken its uid's unfinished request bytes past the budget.
    OverBudget,
    /// A request that had not arrived whole within `RequestReadTimeout`.
    ReadTimeout,
    /// A call whose answer carries a step's output, beyond the uid's open ones.
    TooManyAnswers,
}

impl Refusal {
    const ALL: [Refusal; 8] = [
        Refusal::OverConnectionCap,
        Refusal::UnidentifiedPeer,
        Refusal::NotRoot,
        Refusal::Flood,
        Refusal::ProtocolError,
        Refusal::OverBudget,
        Refusal::ReadTimeout,
        Refusal::TooManyAnswers,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::OverConnectionCap => "over_connection_cap",
            Refusal::UnidentifiedPeer => "unidentified_peer",
            Refusal::NotRoot => "not_root",
            Refusal::Flood => "flood",
            Refusal::ProtocolError => "protocol_error",
            Refusal::OverBudget => "over_budget",
            Refusal::ReadTimeout => "read_timeout",
            Refusal::TooManyAnswers => "too_many_answers",
        }
    }

    /// The counter it is counted in: connections or requests.
    fn counter(self) -> &'static str {
        match self {
            Refusal::OverBudget | Refusal::ReadTimeout | Refusal::TooManyAnswers => {
                "cimage_requests_refused_total"
            }
            _ => "cimage_connections_refused_total",
        }
    }

    fn index(self) -> usize {
        Refusal::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// One uid's refusals since its last line.
#[derive(Default)]
struct Tally {
    counts: [u64; Refusal::ALL.len()],
    last_line: Option<Instant>,
}

impl Tally {
    fn any(&self) -> bool {
        self.counts.iter().any(|n| *n > 0)
    }

    /// `flood 312, over_budget 2`, and the counts cleared.
    fn take_summary(&mut self) -> String {
        let mut out = String::new();
        for (r, n) in Refusal::ALL.iter().zip(self.counts.iter_mut()) {
            if *n > 0 {
                let sep = if out.is_empty() { "" } else { ", " };
                let _ = write!(out, "{sep}{} {n}", r.label());
                *n = 0;
            }
        }
        out
    }
}

/// Counts refusals and logs them per uid at most once every [`REPORT_EVERY`]. Cheap to clone.
#[derive(Clone)]
pub struct AbuseLog {
    metrics: Arc<Metrics>,
    /// Which socket this is, for the log line (`API`, `CRI image`).
    socket: &'static str,
    tallies: Arc<Mutex<HashMap<u32, Tally>>>,
}

impl AbuseLog {
    /// A log for the socket called `socket` in its lines, counting into `metrics`.
    pub fn new(socket: &'static str, metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            socket,
            tallies: Default::default(),
        }
    }

    /// Counts one refusal of `uid` (`None`: the peer could not be identified; counted under
    /// `u32::MAX`), and logs it now if that uid had no line in the last [`REPORT_EVERY`].
    pub fn note(&self, uid: Option<u32>, what: Refusal) {
        self.metrics
            .inc(what.counter(), &[("reason", what.label())]);
        let uid = uid.unwrap_or(u32::MAX);
        let now = Instant::now();
        let line = {
            let mut tallies = self.tallies.lock().unwrap();
            let t = tallies.entry(uid).or_default();
            t.counts[what.index()] += 1;
            let due = t.last_line.is_none_or(|at| now - at >= REPORT_EVERY);
            due.then(|| {
                t.last_line = Some(now);
                t.take_summary()
            })
        };
        if let Some(summary) = line {
            self.warn(uid, &summary);
        }
    }

    /// Logs what each uid has had refused since its last line, for uids whose last line is at
    /// least [`REPORT_EVERY`] old, and forgets uids with nothing new for that long. The serving
    /// loop calls this every [`REPORT_EVERY`], so a burst's tail is told within two minutes.
    pub fn flush(&self) {
        let now = Instant::now();
        let mut lines = Vec::new();
        self.tallies.lock().unwrap().retain(|uid, t| {
            let due = t.last_line.is_none_or(|at| now - at >= REPORT_EVERY);
            if !due {
                return true;
            }
            if !t.any() {
                return false;
            }
            t.last_line = Some(now);
            lines.push((*uid, t.take_summary()));
            true
        });
        for (uid, summary) in lines {
            self.warn(uid, &summary);
        }
    }

    fn warn(&self, uid: u32, summary: &str) {
        let uid = (uid != u32::MAX).then_some(uid);
        warn!(
            socket = self.socket,
            uid,
            refused = summary,
            "refused misbehaving connections or requests (one line per uid a minute at most; \
             every one counted in cimage_connections_refused_total and \
             cimage_requests_refused_total)"
        );
    }

    /// Uids with a tally kept (for tests: the map stays bounded by the uids of the last minute).
    pub fn uids_tracked(&self) -> usize {
        self.tallies.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(log: &AbuseLog, uid: u32, what: Refusal) -> u64 {
        log.tallies.lock().unwrap()[&uid].counts[what.index()]
    }

    fn last_line(log: &AbuseLog, uid: u32) -> Option<Instant> {
        log.tallies.lock().unwrap()[&uid].last_line
    }

    #[tokio::test(start_paused = true)]
    async fn a_uid_gets_one_line_a_minute_and_every_refusal_is_counted() {
        let metrics = Arc::new(Metrics::default());
        let log = AbuseLog::new("API", metrics.clone());
        log.note(Some(1000), Refusal::Flood);
        let first = last_line(&log, 1000).unwrap();
        for _ in 0..10_000 {
            log.note(Some(1000), Refusal::Flood);
        }
        log.note(Some(1000), Refusal::OverBudget);
        // No second line within the minute, the counts kept for it.
        assert_eq!(last_line(&log, 1000), Some(first));
        assert_eq!(count(&log, 1000, Refusal::Flood), 10_000);
        assert_eq!(count(&log, 1000, Refusal::OverBudget), 1);
        assert_eq!(
            metrics.counter("cimage_connections_refused_total", &[("reason", "flood")]),
            10_001
        );
        assert_eq!(
            metrics.counter(
                "cimage_requests_refused_total",
                &[("reason", "over_budget")]
            ),
            1
        );
        // Flushing early tells nothing; a minute on, the tail is told and the counts cleared.
        log.flush();
        assert_eq!(last_line(&log, 1000), Some(first));
        tokio::time::advance(REPORT_EVERY).await;
        log.flush();
        assert!(last_line(&log, 1000).unwrap() > first);
        assert_eq!(count(&log, 1000, Refusal::Flood), 0);
        assert_eq!(count(&log, 1000, Refusal::OverBudget), 0);
        // Another minute with nothing new: the uid is forgotten.
        tokio::time::advance(REPORT_EVERY).await;
        log.flush();
        assert_eq!(log.uids_tracked(), 0);
    }

    #[test]
    fn the_summary_names_each_kind_with_its_count() {
        let mut t = Tally::default();
        t.counts[Refusal::Flood.index()] = 312;
        t.counts[Refusal::OverBudget.index()] = 2;
        assert_eq!(t.take_summary(), "flood 312, over_budget 2");
        assert!(!t.any());
        let labels: std::collections::HashSet<_> = Refusal::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Refusal::ALL.len());
    }
}
