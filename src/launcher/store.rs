//! Durable job and task state, in the same redb file as the image index: one write transaction
//! per change, so after a `kill -9` the daemon knows which pods and containers are its own and
//! which tasks to re-attach.

use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::cache::IndexError;
use crate::runtime::PodSpec;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");

/// A job: one pod sandbox shared by its steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Job id.
    pub id: String,
    /// Owner uid.
    pub uid: u32,
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
    /// Could not be run (see failure).
    Failed,
}

impl TaskState {
    /// Whether the task has finished.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Exited | TaskState::Cancelled | TaskState::TimedOut | TaskState::Failed
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

/// The job and task tables.
#[derive(Clone)]
pub struct TaskStore {
    db: Arc<Database>,
}

fn err(context: &str, e: impl Into<redb::Error>) -> IndexError {
    IndexError {
        context: context.to_owned(),
        source: Box::new(e.into()),
    }
}

impl TaskStore {
    /// Opens (creating) the tables in `db`.
    pub fn open(db: Arc<Database>) -> Result<Self, IndexError> {
        let tx = db
            .begin_write()
            .map_err(|e| err("opening task tables", e))?;
        tx.open_table(JOBS).map_err(|e| err("opening jobs", e))?;
        tx.open_table(TASKS).map_err(|e| err("opening tasks", e))?;
        tx.commit().map_err(|e| err("opening task tables", e))?;
        Ok(Self { db })
    }

    fn put<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), IndexError> {
        let context = format!("saving {key}");
        let bytes = serde_json::to_vec(value).expect("records always serialise");
        let tx = self.db.begin_write().map_err(|e| err(&context, e))?;
        {
            let mut t = tx.open_table(table).map_err(|e| err(&context, e))?;
            t.insert(key, bytes.as_slice())
                .map_err(|e| err(&context, e))?;
        }
        tx.commit().map_err(|e| err(&context, e))
    }

    fn get<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, IndexError> {
        let context = format!("reading {key}");
        let tx = self.db.begin_read().map_err(|e| err(&context, e))?;
        let t = tx.open_table(table).map_err(|e| err(&context, e))?;
        let v = t.get(key).map_err(|e| err(&context, e))?;
        v.map(|v| {
            serde_json::from_slice(v.value()).map_err(|e| IndexError {
                context,
                source: Box::new(e),
            })
        })
        .transpose()
    }

    fn all<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, IndexError> {
        let tx = self.db.begin_read().map_err(|e| err("listing", e))?;
        let t = tx.open_table(table).map_err(|e| err("listing", e))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(|e| err("listing", e))? {
            let (k, v) = entry.map_err(|e| err("listing", e))?;
            out.push(serde_json::from_slice(v.value()).map_err(|e| IndexError {
                context: format!("decoding {}", k.value()),
                source: Box::new(e),
            })?);
        }
        Ok(out)
    }

    /// Saves a task and, if given, its job, in one transaction.
    pub fn put_task_and_job(
        &self,
        task: &TaskRecord,
        job: Option<&JobRecord>,
    ) -> Result<(), IndexError> {
        let context = format!("saving {}", task.id);
        let tx = self.db.begin_write().map_err(|e| err(&context, e))?;
        {
            let mut t = tx.open_table(TASKS).map_err(|e| err(&context, e))?;
            let bytes = serde_json::to_vec(task).expect("records always serialise");
            t.insert(task.id.as_str(), bytes.as_slice())
                .map_err(|e| err(&context, e))?;
            if let Some(job) = job {
                let mut j = tx.open_table(JOBS).map_err(|e| err(&context, e))?;
                let bytes = serde_json::to_vec(job).expect("records always serialise");
                j.insert(job.id.as_str(), bytes.as_slice())
                    .map_err(|e| err(&context, e))?;
            }
        }
        tx.commit().map_err(|e| err(&context, e))
    }

    /// Saves a job.
    pub fn put_job(&self, job: &JobRecord) -> Result<(), IndexError> {
        self.put(JOBS, &job.id, job)
    }
    /// A job by id.
    pub fn job(&self, id: &str) -> Result<Option<JobRecord>, IndexError> {
        self.get(JOBS, id)
    }
    /// Every job.
    pub fn jobs(&self) -> Result<Vec<JobRecord>, IndexError> {
        self.all(JOBS)
    }
    /// Saves a task.
    pub fn put_task(&self, task: &TaskRecord) -> Result<(), IndexError> {
        self.put(TASKS, &task.id, task)
    }
    /// A task by id.
    pub fn task(&self, id: &str) -> Result<Option<TaskRecord>, IndexError> {
        self.get(TASKS, id)
    }
    /// Every task.
    pub fn tasks(&self) -> Result<Vec<TaskRecord>, IndexError> {
        self.all(TASKS)
    }
}
