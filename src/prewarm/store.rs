//! Schedules and their run history, in the same redb file as the index: schedules added over
//! the API survive restarts, and the last fire time makes catch-up exact.

use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::schedule::ScheduleSpec;
use crate::cache::IndexError;

const SCHEDULES: TableDefinition<&str, &[u8]> = TableDefinition::new("prewarm_schedules");
const RUNS: TableDefinition<&str, &[u8]> = TableDefinition::new("prewarm_runs");

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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageResult {
    /// Normalised reference.
    pub image: String,
    /// `pulled` (was absent), `refreshed` (the tag had moved), `cached`, or `failed`.
    pub outcome: String,
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
    /// `ok`, `partial`, `failed`, `skipped` (a previous run was still going) or `running`.
    pub outcome: String,
    /// Per image.
    pub images: Vec<ImageResult>,
}

/// The schedule and run tables.
#[derive(Clone)]
pub struct PrewarmStore {
    db: Arc<Database>,
}

fn err(context: &str, e: impl Into<redb::Error>) -> IndexError {
    IndexError {
        context: context.to_owned(),
        source: Box::new(e.into()),
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, IndexError> {
    serde_json::from_slice(bytes).map_err(|e| IndexError {
        context: format!("decoding {key}"),
        source: Box::new(e),
    })
}

/// Keys of a schedule's runs (`NAME\0STARTED`), oldest first.
fn run_keys(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    schedule: &str,
    context: &str,
) -> Result<Vec<String>, IndexError> {
    let prefix = format!("{schedule}\u{0}");
    Ok(t.range(prefix.as_str()..)
        .map_err(|e| err(context, e))?
        .filter_map(|r| r.ok())
        .map(|(k, _)| k.value().to_owned())
        .take_while(|k| k.starts_with(&prefix))
        .collect())
}

impl PrewarmStore {
    /// Opens (creating) the tables in `db`.
    pub fn open(db: Arc<Database>) -> Result<Self, IndexError> {
        let tx = db
            .begin_write()
            .map_err(|e| err("opening prewarm tables", e))?;
        tx.open_table(SCHEDULES)
            .map_err(|e| err("opening schedules", e))?;
        tx.open_table(RUNS).map_err(|e| err("opening runs", e))?;
        tx.commit().map_err(|e| err("opening prewarm tables", e))?;
        Ok(Self { db })
    }

    /// Saves a schedule.
    pub fn put(&self, s: &StoredSchedule) -> Result<(), IndexError> {
        let context = format!("saving schedule {}", s.spec.name);
        let bytes = serde_json::to_vec(s).expect("schedules always serialise");
        let tx = self.db.begin_write().map_err(|e| err(&context, e))?;
        {
            let mut t = tx.open_table(SCHEDULES).map_err(|e| err(&context, e))?;
            t.insert(s.spec.name.as_str(), bytes.as_slice())
                .map_err(|e| err(&context, e))?;
        }
        tx.commit().map_err(|e| err(&context, e))
    }

    /// Removes a schedule and its history in one transaction; false if it did not exist.
    pub fn remove(&self, name: &str) -> Result<bool, IndexError> {
        let context = format!("removing schedule {name}");
        let tx = self.db.begin_write().map_err(|e| err(&context, e))?;
        let existed = {
            let mut t = tx.open_table(SCHEDULES).map_err(|e| err(&context, e))?;
            let existed = t.remove(name).map_err(|e| err(&context, e))?.is_some();
            let mut runs = tx.open_table(RUNS).map_err(|e| err(&context, e))?;
            for k in run_keys(&runs, name, &context)? {
                runs.remove(k.as_str()).map_err(|e| err(&context, e))?;
            }
            existed
        };
        tx.commit().map_err(|e| err(&context, e))?;
        Ok(existed)
    }

    /// Every schedule, by name.
    pub fn all(&self) -> Result<Vec<StoredSchedule>, IndexError> {
        let tx = self
            .db
            .begin_read()
            .map_err(|e| err("listing schedules", e))?;
        let t = tx
            .open_table(SCHEDULES)
            .map_err(|e| err("listing schedules", e))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(|e| err("listing schedules", e))? {
            let (k, v) = entry.map_err(|e| err("listing schedules", e))?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Saves a run (new or updated), keeping the newest [`HISTORY_LIMIT`] of its schedule.
    pub fn put_run(&self, run: &RunRecord) -> Result<(), IndexError> {
        let context = format!("saving a run of {}", run.schedule);
        let key = format!("{}\u{0}{:020}", run.schedule, run.started);
        let bytes = serde_json::to_vec(run).expect("runs always serialise");
        let tx = self.db.begin_write().map_err(|e| err(&context, e))?;
        {
            let mut t = tx.open_table(RUNS).map_err(|e| err(&context, e))?;
            t.insert(key.as_str(), bytes.as_slice())
                .map_err(|e| err(&context, e))?;
            let keys = run_keys(&t, &run.schedule, &context)?;
            for old in keys.iter().take(keys.len().saturating_sub(HISTORY_LIMIT)) {
                t.remove(old.as_str()).map_err(|e| err(&context, e))?;
            }
        }
        tx.commit().map_err(|e| err(&context, e))
    }

    /// A schedule's runs, oldest first.
    pub fn runs(&self, name: &str) -> Result<Vec<RunRecord>, IndexError> {
        let tx = self.db.begin_read().map_err(|e| err("listing runs", e))?;
        let t = tx.open_table(RUNS).map_err(|e| err("listing runs", e))?;
        let prefix = format!("{name}\u{0}");
        let mut out = Vec::new();
        for entry in t
            .range(prefix.as_str()..)
            .map_err(|e| err("listing runs", e))?
        {
            let (k, v) = entry.map_err(|e| err("listing runs", e))?;
            if !k.value().starts_with(&prefix) {
                break;
            }
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }
}
