//! Durable job and task state, in the same redb file as the image index: one write transaction
//! per change, so after a `kill -9` the daemon knows which pods and containers are its own and
//! which tasks to re-attach.

use serde::{Deserialize, Serialize};

use crate::runtime::PodSpec;
use crate::store::{JsonTable, Store, StoreError};

const JOBS: JsonTable<JobRecord> = JsonTable::new("jobs");
const TASKS: JsonTable<TaskRecord> = JsonTable::new("tasks");
/// Durable intents (`task:ID` to cancel a task, `job:ID` to end a job) → when they were asked
/// (Unix ms). Kept apart from the records, which the code driving a task rewrites whole, so that
/// no save of a task can undo an acknowledged cancel.
const INTENTS: JsonTable<i64> = JsonTable::new("intents");

/// The intent key of a task's cancel.
pub fn cancel_key(task: &str) -> String {
    format!("task:{task}")
}

/// The intent key of a job's end.
pub fn end_key(job: &str) -> String {
    format!("job:{job}")
}

/// A job: one pod sandbox shared by its steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Job id.
    pub id: String,
    /// The uid its steps run as.
    pub uid: u32,
    /// The uid that created it (records from before this field: root).
    #[serde(default)]
    pub creator: u32,
    /// A one-off job ends with its only step.
    pub one_off: bool,
    /// The sandbox's configuration (needed again for every container created in it).
    pub pod: PodSpec,
    /// The running sandbox, if any.
    pub sandbox_id: Option<String>,
    /// Created (Unix ms).
    pub created: i64,
    /// Ended (Unix ms), once its pod is torn down for good.
    pub ended: Option<i64>,
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Accepted; sandbox and image being made ready.
    Pending,
    /// Container created, not yet started.
    Created,
    /// Running.
    Running,
    /// Ran and exited (see exit code).
    Exited,
    /// Stopped on request.
    Cancelled,
    /// Stopped at its time limit.
    TimedOut,
    /// Killed by the kernel for passing its memory limit (the runtime's `OOMKilled`).
    OutOfMemory,
    /// Could not be run (see failure).
    Failed,
}

impl TaskState {
    /// Whether the task has finished.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Exited
                | TaskState::Cancelled
                | TaskState::TimedOut
                | TaskState::OutOfMemory
                | TaskState::Failed
        )
    }

    /// The name shown by the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Created => "created",
            TaskState::Running => "running",
            TaskState::Exited => "exited",
            TaskState::Cancelled => "cancelled",
            TaskState::TimedOut => "timed_out",
            TaskState::OutOfMemory => "out_of_memory",
            TaskState::Failed => "failed",
        }
    }
}

/// One step of a job run in a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Task id.
    pub id: String,
    /// Its job.
    pub job: String,
    /// Step number in the job.
    pub step: u32,
    /// Owner uid (the uid it runs as).
    pub uid: u32,
    /// Normalised image reference.
    pub image: String,
    /// Runtime image id, once ready.
    pub image_id: Option<String>,
    /// Container id, once created.
    pub container_id: Option<String>,
    /// State.
    pub state: TaskState,
    /// Exit code, once exited.
    pub exit_code: Option<i32>,
    /// Signal that ended it, when the exit code says so (128+N).
    pub signal: Option<i32>,
    /// Why it failed: the stage and the message.
    pub failure: Option<(String, String)>,
    /// The step's log file.
    pub log_path: std::path::PathBuf,
    /// Created (Unix ms).
    pub created: i64,
    /// Started (Unix ms).
    pub started: Option<i64>,
    /// Finished (Unix ms).
    pub finished: Option<i64>,
    /// Time limit (ms).
    pub timeout_ms: Option<u64>,
    /// Container (and, for one-off jobs, pod) removed.
    pub cleaned: bool,
}

/// The job and task tables of the daemon's store.
#[derive(Clone)]
pub struct TaskStore {
    store: Store,
}

impl TaskStore {
    /// The tables in `store` (created if missing).
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        store.ensure_tables(&[JOBS])?;
        store.ensure_tables(&[TASKS])?;
        store.ensure_tables(&[INTENTS])?;
        Ok(Self {
            store: store.clone(),
        })
    }

    /// Saves a task and, if given, its job, in one transaction.
    pub fn put_task_and_job(
        &self,
        task: &TaskRecord,
        job: Option<&JobRecord>,
    ) -> Result<(), StoreError> {
        self.store.write(&format!("saving task {}", task.id), |w| {
            w.put(TASKS, &task.id, task)?;
            if task.cleaned {
                // Carried out: the cancel is no longer an intent.
                w.remove(INTENTS, &cancel_key(&task.id))?;
            }
            if let Some(job) = job {
                w.put(JOBS, &job.id, job)?;
                if job.ended.is_some() {
                    w.remove(INTENTS, &end_key(&job.id))?;
                }
            }
            Ok(())
        })
    }

    /// Saves a job (an ended job's end intent goes with it, in the same transaction).
    pub fn put_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        self.store.write(&format!("saving job {}", job.id), |w| {
            w.put(JOBS, &job.id, job)?;
            if job.ended.is_some() {
                w.remove(INTENTS, &end_key(&job.id))?;
            }
            Ok(())
        })
    }

    /// Records intents (see [`cancel_key`], [`end_key`]) durably, in one transaction.
    pub fn put_intents(&self, keys: &[String], now: i64) -> Result<(), StoreError> {
        self.store.write("saving intents", |w| {
            for k in keys {
                w.put(INTENTS, k, &now)?;
            }
            Ok(())
        })
    }

    /// Every intent not yet carried out.
    pub fn intents(&self) -> Result<Vec<String>, StoreError> {
        self.store.read("listing intents", |r| {
            Ok(r.all(INTENTS)?.into_iter().map(|(k, _)| k).collect())
        })
    }
    /// A job by id.
    pub fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        self.store.get(JOBS, id)
    }
    /// Every job.
    pub fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.store.all(JOBS)
    }
    /// Saves a task.
    pub fn put_task(&self, task: &TaskRecord) -> Result<(), StoreError> {
        self.store.put(TASKS, &task.id, task)
    }
    /// A task by id.
    pub fn task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.store.get(TASKS, id)
    }
    /// Every task.
    pub fn tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        self.store.all(TASKS)
    }
}
