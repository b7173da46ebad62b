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
/// A job's tasks: `JOB\x1fTASK` → task id, so that a job's steps are found without reading
/// other jobs' (job ids never hold the separator).
const JOB_TASKS: JsonTable<String> = JsonTable::new("job_tasks");
/// Tasks not yet cleaned up (running, or finished with their container still to remove): id →
/// job, so that `ps`, cleanups and recovery read the live work, not the history.
const LIVE: JsonTable<String> = JsonTable::new("live_tasks");
/// Jobs not yet ended: id → its uid, so that `jobs` and recovery read the live jobs only.
const LIVE_JOBS: JsonTable<u32> = JsonTable::new("live_jobs");
/// Finished, cleaned-up tasks by when they finished: `FINISHED(20 digits)\x1fTASK` → task id,
/// so that pruning reads the oldest history first, a batch at a time, not all of it.
const DONE: JsonTable<String> = JsonTable::new("done_tasks");
/// The version of the indexes above; an index file from before them is migrated at open.
const INDEX_META: &str = "task_indexes";
/// What [`INDEX_META`] says once every index above is built.
const INDEX_VERSION: &str = "3";

/// A finished task's key in [`DONE`].
fn done_key(task: &TaskRecord) -> String {
    format!(
        "{:020}\x1f{}",
        task.finished.unwrap_or(task.created).max(0),
        task.id
    )
}

/// Keeps a job's live entry in step with its record (in the record's transaction).
fn index_job(w: &crate::store::Write<'_>, job: &JobRecord) -> Result<(), StoreError> {
    if job.ended.is_some() {
        w.remove(LIVE_JOBS, &job.id)?;
    } else {
        w.put(LIVE_JOBS, &job.id, &job.uid)?;
    }
    Ok(())
}

fn job_task_key(job: &str, task: &str) -> String {
    format!("{job}\x1f{task}")
}

/// Saves a task with its index entries (in the caller's transaction); a finished entry under
/// an earlier finishing time goes.
fn save_task(w: &crate::store::Write<'_>, task: &TaskRecord) -> Result<(), StoreError> {
    // Only a finished save can move a finished entry (the saves of a running step read
    // nothing more).
    if task.cleaned && task.state.is_final() {
        if let Some(old) = w.get(TASKS, &task.id)? {
            if old.cleaned && old.state.is_final() && done_key(&old) != done_key(task) {
                w.remove(DONE, &done_key(&old))?;
            }
        }
    }
    w.put(TASKS, &task.id, task)?;
    index_task(w, task)
}

/// Keeps a task's index entries in step with its record (in the record's transaction).
fn index_task(w: &crate::store::Write<'_>, task: &TaskRecord) -> Result<(), StoreError> {
    w.put(JOB_TASKS, &job_task_key(&task.job, &task.id), &task.id)?;
    if task.cleaned {
        w.remove(LIVE, &task.id)?;
    } else {
        w.put(LIVE, &task.id, &task.job)?;
    }
    if task.cleaned && task.state.is_final() {
        w.put(DONE, &done_key(task), &task.id)?;
    }
    Ok(())
}

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
        store.ensure_tables(&[JOB_TASKS, LIVE])?;
        store.ensure_tables(&[LIVE_JOBS])?;
        store.ensure_tables(&[DONE])?;
        // An index file from before the per-job, live and finished indexes: built in one
        // transaction, so a crash leaves the old file (migrated again at the next start) or
        // the new one.
        store.write("indexing tasks by job", |w| {
            if w.meta(INDEX_META)?.as_deref() == Some(INDEX_VERSION) {
                return Ok(());
            }
            for (_, t) in w.all(TASKS)? {
                index_task(w, &t)?;
            }
            for (_, j) in w.all(JOBS)? {
                index_job(w, &j)?;
            }
            w.set_meta(INDEX_META, INDEX_VERSION)
        })?;
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
            save_task(w, task)?;
            if task.cleaned {
                // Carried out: the cancel is no longer an intent.
                w.remove(INTENTS, &cancel_key(&task.id))?;
            }
            if let Some(job) = job {
                w.put(JOBS, &job.id, job)?;
                index_job(w, job)?;
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
            index_job(w, job)?;
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
    /// Every job kept.
    pub fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.store.all(JOBS)
    }
    /// The jobs not yet ended, read through the live index.
    pub fn live_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.store.read("listing live jobs", |r| {
            let mut out = Vec::new();
            for (id, _) in r.all(LIVE_JOBS)? {
                out.extend(r.get(JOBS, &id)?);
            }
            Ok(out)
        })
    }
    /// Saves a task (and its index entries, in the same transaction).
    pub fn put_task(&self, task: &TaskRecord) -> Result<(), StoreError> {
        self.store
            .write(&format!("saving task {}", task.id), |w| save_task(w, task))
    }

    /// Saves many tasks (and their index entries) in one transaction: an import, or a test's
    /// or benchmark's history.
    pub fn put_tasks(&self, tasks: &[TaskRecord]) -> Result<(), StoreError> {
        self.store
            .write(&format!("saving {} tasks", tasks.len()), |w| {
                for t in tasks {
                    save_task(w, t)?;
                }
                Ok(())
            })
    }

    /// The tasks of one job, read through the per-job index.
    pub fn job_tasks(&self, job: &str) -> Result<Vec<TaskRecord>, StoreError> {
        self.store
            .read(&format!("listing the tasks of job {job}"), |r| {
                let mut out = Vec::new();
                for (_, id) in r.with_prefix(JOB_TASKS, &format!("{job}\x1f"))? {
                    out.extend(r.get(TASKS, &id)?);
                }
                Ok(out)
            })
    }

    /// The tasks not yet cleaned up (every unfinished one among them).
    pub fn live_tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        self.store.read("listing live tasks", |r| {
            let mut out = Vec::new();
            for (id, _) in r.all(LIVE)? {
                out.extend(r.get(TASKS, &id)?);
            }
            Ok(out)
        })
    }

    /// How many task records there are, and how many of them are live.
    pub fn counts(&self) -> Result<(u64, u64), StoreError> {
        self.store
            .read("counting tasks", |r| Ok((r.len(TASKS)?, r.len(LIVE)?)))
    }

    /// Removes finished tasks from history, with their index entries, and the ended jobs none
    /// of whose tasks remain, in one transaction; returns the log files of the tasks removed
    /// and how many jobs went.
    pub fn prune(
        &self,
        tasks: &[TaskRecord],
        jobs: &[String],
    ) -> Result<(Vec<std::path::PathBuf>, usize), StoreError> {
        self.store.write("pruning history", |w| {
            let mut logs = Vec::new();
            let mut jobs_removed = 0;
            for t in tasks {
                // Only what is still finished now (a record may have changed since it was read).
                let cur = match w.get(TASKS, &t.id)? {
                    Some(cur) if cur.state.is_final() && cur.cleaned => cur,
                    _ => continue,
                };
                w.remove(TASKS, &t.id)?;
                w.remove(DONE, &done_key(&cur))?;
                w.remove(JOB_TASKS, &job_task_key(&t.job, &t.id))?;
                w.remove(LIVE, &t.id)?;
                w.remove(INTENTS, &cancel_key(&t.id))?;
                logs.push(t.log_path.clone());
            }
            for j in jobs {
                let ended = w.get(JOBS, j)?.is_some_and(|job| job.ended.is_some());
                if ended
                    && w.keys_with_prefix(JOB_TASKS, &format!("{j}\x1f"))?
                        .is_empty()
                {
                    w.remove(JOBS, j)?;
                    w.remove(LIVE_JOBS, j)?;
                    w.remove(INTENTS, &end_key(j))?;
                    jobs_removed += 1;
                }
            }
            Ok((logs, jobs_removed))
        })
    }
    /// Up to `n` finished, cleaned-up tasks, oldest finished first (read through the finished
    /// index: a bounded read however long the history).
    pub fn oldest_done(&self, n: usize) -> Result<Vec<TaskRecord>, StoreError> {
        self.store.read("listing the oldest finished tasks", |r| {
            let mut out = Vec::new();
            for (_, id) in r.first(DONE, n)? {
                out.extend(r.get(TASKS, &id)?);
            }
            Ok(out)
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, job: &str, state: TaskState) -> TaskRecord {
        TaskRecord {
            id: id.into(),
            job: job.into(),
            step: 0,
            uid: 0,
            image: "r/x:1".into(),
            image_id: None,
            container_id: None,
            state,
            exit_code: None,
            signal: None,
            failure: None,
            log_path: "/logs/x".into(),
            created: 1,
            started: None,
            finished: None,
            timeout_ms: None,
            cleaned: state.is_final(),
        }
    }

    #[test]
    fn an_index_file_from_before_the_task_indexes_is_migrated_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("i.redb")).unwrap();
        // The file as an earlier release left it: tasks without their indexes.
        store
            .write("an old file", |w| {
                w.put(TASKS, "t1", &task("t1", "a", TaskState::Running))?;
                w.put(TASKS, "t2", &task("t2", "b", TaskState::Exited))?;
                w.put(TASKS, "t3", &task("t3", "a", TaskState::Exited))
            })
            .unwrap();
        let s = TaskStore::open(&store).unwrap();
        let ids = |v: Vec<TaskRecord>| v.into_iter().map(|t| t.id).collect::<Vec<_>>();
        assert_eq!(ids(s.job_tasks("a").unwrap()), ["t1", "t3"]);
        assert_eq!(ids(s.live_tasks().unwrap()), ["t1"]);
        assert_eq!(s.counts().unwrap(), (3, 1));
        assert_eq!(ids(s.oldest_done(10).unwrap()), ["t2", "t3"]);
        // A task that finishes leaves the live index in the same transaction.
        let mut t1 = task("t1", "a", TaskState::Exited);
        t1.cleaned = true;
        s.put_task(&t1).unwrap();
        assert!(s.live_tasks().unwrap().is_empty());
        // Finished later than the others: last in finishing order.
        t1.finished = Some(50);
        s.put_task(&t1).unwrap();
        assert_eq!(ids(s.oldest_done(10).unwrap()), ["t2", "t3", "t1"]);
        assert_eq!(ids(s.oldest_done(1).unwrap()), ["t2"]);
        // Pruning takes the records and their index entries.
        let (logs, _) = s.prune(&[t1], &["a".into()]).unwrap();
        assert_eq!(logs.len(), 1);
        assert_eq!(ids(s.job_tasks("a").unwrap()), ["t3"]);
        assert_eq!(ids(s.oldest_done(10).unwrap()), ["t2", "t3"]);
        // Opening again does not index twice.
        let s = TaskStore::open(&store).unwrap();
        assert_eq!(s.counts().unwrap(), (2, 0));
    }

    #[test]
    fn live_jobs_are_read_through_their_index_and_leave_it_when_ended() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("i.redb")).unwrap();
        let job = |id: &str, ended: Option<i64>| JobRecord {
            id: id.into(),
            uid: 0,
            creator: 0,
            one_off: false,
            pod: crate::runtime::PodSpec {
                name: id.into(),
                uid: id.into(),
                namespace: "cimage".into(),
                hostname: String::new(),
                log_directory: "/logs".into(),
                labels: Default::default(),
                cgroup_parent: None,
                pod_cgroup: None,
            },
            sandbox_id: None,
            created: 1,
            ended,
        };
        // An older file: jobs without the live index.
        store
            .write("an old file", |w| {
                w.put(JOBS, "a", &job("a", None))?;
                w.put(JOBS, "b", &job("b", Some(5)))
            })
            .unwrap();
        let s = TaskStore::open(&store).unwrap();
        let ids = |v: Vec<JobRecord>| v.into_iter().map(|j| j.id).collect::<Vec<_>>();
        assert_eq!(ids(s.live_jobs().unwrap()), ["a"]);
        s.put_job(&job("c", None)).unwrap();
        s.put_job(&job("a", Some(9))).unwrap();
        assert_eq!(ids(s.live_jobs().unwrap()), ["c"]);
        assert_eq!(s.jobs().unwrap().len(), 3);
    }
}
