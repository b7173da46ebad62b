//! Expectations as they are kept: one record each, in the daemon's store, so that an expected
//! image is still expected (and still kept from eviction) after a restart. Credentials are never
//! part of a record: only whether some were given.

use serde::{Deserialize, Serialize};

use crate::store::{JsonTable, Store, StoreError};

const EXPECTATIONS: JsonTable<Expectation> = JsonTable::new("expectations");

/// Who said the image is coming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `cimage expect` (the API).
    Api,
    /// The Slurm queue source.
    Slurm,
    /// A site's command (`Queue.Source: command`).
    Command,
}

impl Source {
    /// The name used in the API, the CLI and the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Slurm => "slurm",
            Self::Command => "command",
        }
    }
}

/// Where an expectation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Not started: earlier deadlines go first.
    Waiting,
    /// Not started: the image filesystem cannot hold it beside the images expected earlier.
    NoRoom,
    /// Its pull waits for a slot.
    Queued,
    /// Its pull is under way.
    Pulling,
    /// The image is on the node.
    Ready,
    /// Its pull failed (see the reason); tried again later while the deadline is ahead.
    Failed,
}

impl State {
    /// The name used in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::NoRoom => "no_room",
            Self::Queued => "queued",
            Self::Pulling => "pulling",
            Self::Ready => "ready",
            Self::Failed => "failed",
        }
    }

    /// Every state, for gauges that show zero too.
    pub const ALL: [State; 6] = [
        Self::Waiting,
        Self::NoRoom,
        Self::Queued,
        Self::Pulling,
        Self::Ready,
        Self::Failed,
    ];
}

/// The first request for an expected image by anyone but the expectation itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirstRequest {
    /// When (Unix ms).
    pub at_ms: i64,
    /// It found the image on the node (no pull to wait for).
    pub found_ready: bool,
}

/// One image expected on this node by a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expectation {
    /// Its key: one expectation per (job, image, owner).
    pub key: String,
    /// The normalised image reference.
    pub image: String,
    /// The job it is for, if known.
    pub job: Option<String>,
    /// When the image must be ready (Unix ms): the job's expected start.
    pub deadline_ms: i64,
    /// Who said so.
    pub source: Source,
    /// The uid it belongs to (0 for the queue sources).
    pub owner: u32,
    /// Said by root or the admin group: its pull is the node's work, not under the owner's
    /// share of the pull slots (`MaxPullsPerUser`).
    #[serde(default)]
    pub by_admin: bool,
    /// For a queue source's expectation, the uid its job runs as: its pull counts against that
    /// user's share of the pull slots (the image is the user's choice).
    #[serde(default)]
    pub job_uid: Option<u32>,
    /// Credentials were given with it (kept in memory only, never here).
    pub credentialed: bool,
    /// When it was first made (Unix ms).
    pub created_ms: i64,
    /// Where it is.
    pub state: State,
    /// Why it failed or waits for room.
    pub reason: Option<String>,
    /// When the image became ready (Unix ms).
    pub ready_ms: Option<i64>,
    /// The image's id once ready.
    pub image_id: Option<String>,
    /// Its deadline passed before it was ready, or its job asked before it was (counted once).
    pub late: bool,
    /// When its job started, if the source says (Unix ms).
    pub job_start_ms: Option<i64>,
    /// Its job runs on this node now (a queue source saw it): it stays until the job ends.
    pub running: bool,
    /// The first request for the image after the expectation was made.
    pub first_request: Option<FirstRequest>,
    /// A failed or roomless pull is not tried again before this (Unix ms).
    pub retry_at_ms: Option<i64>,
}

impl Expectation {
    /// The state as shown: `late` for one not ready whose deadline has passed.
    pub fn shown_state(&self, now_ms: i64) -> &'static str {
        match self.state {
            State::Ready | State::Failed => self.state.as_str(),
            _ if now_ms > self.deadline_ms => "late",
            s => s.as_str(),
        }
    }

    /// Ready ahead of its job by this much (Unix ms difference: the job's start, or else its
    /// first request, minus the time the image was ready); negative when it was late.
    pub fn lead_ms(&self) -> Option<i64> {
        let ready = self.ready_ms?;
        let start = self.job_start_ms.or(self.first_request.map(|f| f.at_ms))?;
        Some(start - ready)
    }
}

/// The expectations table of the daemon's store.
#[derive(Clone)]
pub struct ExpectStore {
    store: Store,
}

impl ExpectStore {
    /// The table in `store` (created if missing).
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        store.ensure_tables(&[EXPECTATIONS])?;
        Ok(Self {
            store: store.clone(),
        })
    }

    /// Saves one expectation (new or changed).
    pub fn put(&self, e: &Expectation) -> Result<(), StoreError> {
        self.store.put(EXPECTATIONS, &e.key, e)
    }

    /// One expectation by key.
    pub fn get(&self, key: &str) -> Result<Option<Expectation>, StoreError> {
        self.store.get(EXPECTATIONS, key)
    }

    /// Removes these expectations in one transaction.
    pub fn remove(&self, keys: &[String]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.store.write("removing expectations", |w| {
            for k in keys {
                w.remove(EXPECTATIONS, k)?;
            }
            Ok(())
        })
    }

    /// Every expectation, by key.
    pub fn all(&self) -> Result<Vec<Expectation>, StoreError> {
        self.store.all(EXPECTATIONS)
    }
}
