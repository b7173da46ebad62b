//! Schedules and their run history, in the same redb file as the index: schedules added over
//! the API survive restarts, and the last fire time makes catch-up exact.

use serde::{Deserialize, Serialize};

use super::schedule::ScheduleSpec;
use crate::store::{JsonTable, Store, StoreError};

const SCHEDULES: JsonTable<StoredSchedule> = JsonTable::new("prewarm_schedules");
const RUNS: JsonTable<RunRecord> = JsonTable::new("prewarm_runs");

/// Runs kept per schedule.
pub const HISTORY_LIMIT: usize = 100;

/// A schedule with its bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSchedule {
    /// The schedule.
    pub spec: ScheduleSpec,
    /// When it was added (Unix ms).
    pub created: i64,
    /// The scheduled time of the last fire handled (run or skipped), Unix ms.
    pub last_fire: Option<i64>,
}

/// How one image fared in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageOutcome {
    /// It was absent and was pulled.
    Pulled,
    /// Its tag had moved and the new image was pulled.
    Refreshed,
    /// It was present and current.
    Cached,
    /// It could not be made ready (see the error).
    Failed,
}

impl ImageOutcome {
    /// The name used in the API, the CLI and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pulled => "pulled",
            Self::Refreshed => "refreshed",
            Self::Cached => "cached",
            Self::Failed => "failed",
        }
    }
}

/// How a run ended (or that it has not yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    /// Still going.
    Running,
    /// Every image is ready.
    Ok,
    /// Some images failed.
    Partial,
    /// Every image failed.
    Failed,
    /// Not run: the previous run of the schedule was still going.
    Skipped,
    /// Cut short by a shutdown or a crash of the daemon.
    Interrupted,
}

impl RunOutcome {
    /// The name used in the API, the CLI and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Ok => "ok",
            Self::Partial => "partial",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
            Self::Interrupted => "interrupted",
        }
    }
}

/// How one image fared in a run, with its numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageResult {
    /// Normalised reference.
    pub image: String,
    /// What happened to it.
    pub outcome: ImageOutcome,
    /// Why it failed.
    pub error: Option<String>,
    /// Bytes pulled (the image's size for pulled and refreshed, 0 otherwise).
    pub bytes: u64,
    /// Time taken.
    pub seconds: f64,
}

/// One run of a schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Schedule name.
    pub schedule: String,
    /// `cron`, `manual` or `catch_up`.
    pub trigger: String,
    /// The fire time it served (cron and catch-up runs), Unix ms.
    pub scheduled_for: Option<i64>,
    /// Started (after the jitter), Unix ms.
    pub started: i64,
    /// Finished, Unix ms.
    pub finished: Option<i64>,
    /// The random delay applied before starting.
    pub jitter_ms: u64,
    /// How it ended.
    pub outcome: RunOutcome,
    /// Per image.
    pub images: Vec<ImageResult>,
}

/// The schedule and run tables of the daemon's store.
#[derive(Clone)]
pub struct PrewarmStore {
    store: Store,
}

/// The key prefix of a schedule's runs (`NAME\0STARTED`, so they sort oldest first).
fn run_prefix(schedule: &str) -> String {
    format!("{schedule}\u{0}")
}

impl PrewarmStore {
    /// The tables in `store` (created if missing).
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        store.ensure_tables(&[SCHEDULES])?;
        store.ensure_tables(&[RUNS])?;
        Ok(Self {
            store: store.clone(),
        })
    }

    /// Saves a schedule.
    pub fn put(&self, s: &StoredSchedule) -> Result<(), StoreError> {
        self.store.put(SCHEDULES, &s.spec.name, s)
    }

    /// Removes a schedule and its history in one transaction; false if it did not exist.
    pub fn remove(&self, name: &str) -> Result<bool, StoreError> {
        self.store.write(&format!("removing schedule {name}"), |w| {
            let existed = w.remove(SCHEDULES, name)?;
            for k in w.keys_with_prefix(RUNS, &run_prefix(name))? {
                w.remove(RUNS, &k)?;
            }
            Ok(existed)
        })
    }

    /// Every schedule, by name.
    pub fn all(&self) -> Result<Vec<StoredSchedule>, StoreError> {
        self.store.all(SCHEDULES)
    }

    /// Saves a run (new or updated), keeping the newest [`HISTORY_LIMIT`] of its schedule.
    pub fn put_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        let prefix = run_prefix(&run.schedule);
        let key = format!("{prefix}{:020}", run.started);
        self.store
            .write(&format!("saving a run of {}", run.schedule), |w| {
                w.put(RUNS, &key, run)?;
                let keys = w.keys_with_prefix(RUNS, &prefix)?;
                for old in keys.iter().take(keys.len().saturating_sub(HISTORY_LIMIT)) {
                    w.remove(RUNS, old)?;
                }
                Ok(())
            })
    }

    /// Marks every run still recorded as running as interrupted (finished at `now`), in one
    /// transaction; returns how many. Called at start-up, when no run can be going on.
    pub fn interrupt_running(&self, now: i64) -> Result<usize, StoreError> {
        self.store.write("marking interrupted pre-warm runs", |w| {
            let mut n = 0;
            for (key, mut run) in w.all(RUNS)? {
                if run.outcome == RunOutcome::Running {
                    run.outcome = RunOutcome::Interrupted;
                    run.finished = Some(now);
                    w.put(RUNS, &key, &run)?;
                    n += 1;
                }
            }
            Ok(n)
        })
    }

    /// Removes up to `limit` finished runs that ended before `before` (Unix ms), in one
    /// transaction; returns how many went. (Each schedule also keeps at most
    /// [`HISTORY_LIMIT`] runs, so this reads a bounded table.)
    pub fn prune_runs(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        self.store.write("pruning pre-warm runs", |w| {
            let old: Vec<String> = w
                .all(RUNS)?
                .into_iter()
                .filter(|(_, r)| r.outcome != RunOutcome::Running)
                .filter(|(_, r)| r.finished.unwrap_or(r.started) < before)
                .map(|(k, _)| k)
                .take(limit)
                .collect();
            for k in &old {
                w.remove(RUNS, k)?;
            }
            Ok(old.len())
        })
    }

    /// A schedule's runs, oldest first.
    pub fn runs(&self, name: &str) -> Result<Vec<RunRecord>, StoreError> {
        self.store.read(&format!("listing runs of {name}"), |r| {
            Ok(r.with_prefix(RUNS, &run_prefix(name))?
                .into_iter()
                .map(|(_, v)| v)
                .collect())
        })
    }
}
