//! Runs job steps in containers through CRI:
//! pod sandbox → image (through the puller) → container → start → wait → exit code → cleanup.
//!
//! A **job** owns one pod sandbox (host network; PID and IPC namespaces shared by its steps); a
//! **step** is a container in it, and a job may run several, one after another or at once. A job
//! launched without an id is a one-off that ends with its step.
//!
//! What is saved in the redb file, and when: a task's record when it is accepted (a launch
//! whose record cannot be saved is refused), when its container runs, and when it ends, each
//! time before the event that reports it; the stages between (sandbox, image, container
//! created) are not saved, and a save that fails after acceptance is logged and the step goes
//! on. A job is saved once its pod exists; a cancel or a job's end is saved before it is
//! acknowledged. Pods and containers carry labels naming this daemon instance, the job and the
//! task, so that after a crash [`Launcher::recover`] re-attaches the steps still running,
//! records those that stopped before their container ran, and removes whatever no job claims.
//!
//! Exit is detected by polling `ContainerStatus` (containerd 1.6 does not implement
//! `GetContainerEvents`): every 5 ms for the first second, then more slowly.

mod accept;
mod access;
mod cleanup;
mod confine;
pub mod devices;
mod etc_files;
mod events;
pub mod history;
mod landing;
mod lifecycle;
pub mod limits;
mod locks;
mod log_budget;
pub mod log_files;
pub mod logs;
pub mod mounts;
pub mod pod_cgroup;
mod queries;
mod readback;
mod recovery;
pub mod request;
pub mod run_as;
pub mod spec;
pub mod store;
#[cfg(test)]
mod tests;
mod wait;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::background::Background;
use crate::cache::Cache;
use crate::clock::Clock;
use crate::identity::{IdentityError, Users};
use crate::puller::Puller;
use crate::runtime::{RuntimeError, TaskRuntime};
use crate::store::{Store, StoreError};
pub use events::{Event, EventSink, ExitReason, Stage, TaskEvent, EVENT_BUFFER};
use locks::JobLocks;
use mounts::{MountError, MountStager};
pub use queries::{SessionSlot, MAX_EXEC_SESSIONS};
use request::{Principal, SpecError};
use store::{JobRecord, TaskRecord, TaskStore};
pub use wait::signal_of;

/// Label marking pods and containers that cimage created.
pub const LABEL_MANAGED: &str = "io.cimage.managed";
/// Label naming the daemon instance that owns a pod or container.
pub const LABEL_INSTANCE: &str = "io.cimage.instance";
/// Label naming the job.
pub const LABEL_JOB: &str = "io.cimage.job";
/// Label naming the task (containers only).
pub const LABEL_TASK: &str = "io.cimage.task";
/// Label with the step's name, when it was given one (containers only).
pub const LABEL_NAME: &str = "io.cimage.name";
/// Label naming the owner uid.
pub const LABEL_UID: &str = "io.cimage.uid";

/// The launcher's settings.
#[derive(Debug, Clone)]
pub struct LauncherSettings {
    /// Host prefixes mounts must lie under.
    pub allowed_mount_prefixes: Vec<PathBuf>,
    /// SIGTERM-to-SIGKILL grace on cancel and time limit.
    pub stop_grace: Duration,
    /// Directory of job log directories.
    pub log_dir: PathBuf,
    /// Device paths, globs and CDI names steps may have (`ImageCache.Launcher.AllowedDevices`).
    pub allowed_devices: Vec<String>,
    /// Whether callers that are neither root nor in the admin group may launch
    /// (`ImageCache.Launcher.AllowUserLaunch`).
    pub allow_user_launch: bool,
    /// Launches one such caller may have in flight (`ImageCache.Launcher.MaxLaunchesPerUser`).
    pub max_launches_per_user: usize,
    /// Cgroup parents any launching caller may use (`ImageCache.Launcher.AllowedCgroupParents`).
    pub allowed_cgroup_parents: Vec<String>,
    /// How much task and job history is kept (`ImageCache.History`).
    pub history: history::HistorySettings,
    /// How much log a step and the node keep (`ImageCache.Launcher.MaxLog*`).
    pub logs: log_files::LogLimits,
    /// Processes a job's pod may hold, all its steps together (`ImageCache.Launcher.PidsLimit`;
    /// 0: no limit of cimage's).
    pub pids_limit: u64,
    /// Where the cgroup file systems are (`/sys/fs/cgroup`), for the pods' cgroups.
    pub cgroup_root: pod_cgroup::CgroupRoot,
}

/// A caller's place among its launches in flight, taken before a launch is checked and given
/// back unless the launch is accepted (then the task holds it until it leaves the live set).
struct Reservation {
    map: Arc<Mutex<HashMap<String, u32>>>,
    key: Option<String>,
}

impl Reservation {
    /// Hands the place over to the accepted task.
    fn accept(mut self, task: &str) {
        if let Some(key) = self.key.take() {
            let mut map = self.map.lock().unwrap();
            if let Some(uid) = map.remove(&key) {
                map.insert(task.to_owned(), uid);
            }
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(key) = &self.key {
            self.map.lock().unwrap().remove(key);
        }
    }
}

impl LauncherSettings {
    /// Settings with these log directory and defaults otherwise: no mounts, no devices, the
    /// config's default grace ([`crate::config::DEFAULT_STOP_GRACE_PERIOD`]), launch share
    /// and log limits, launches by root and the admin group only.
    pub fn with_log_dir(log_dir: PathBuf) -> Self {
        Self {
            allowed_mount_prefixes: Vec::new(),
            stop_grace: crate::config::DEFAULT_STOP_GRACE_PERIOD,
            log_dir,
            allowed_devices: Vec::new(),
            allow_user_launch: false,
            max_launches_per_user: crate::config::DEFAULT_MAX_LAUNCHES_PER_USER,
            allowed_cgroup_parents: Vec::new(),
            history: history::HistorySettings::default(),
            logs: log_files::LogLimits::default(),
            pids_limit: crate::config::DEFAULT_PIDS_LIMIT,
            cgroup_root: pod_cgroup::CgroupRoot::default(),
        }
    }
}

/// What a launcher works with: the systems it drives and the daemon's shared parts.
pub struct Parts {
    /// The CRI RuntimeService.
    pub runtime: Arc<dyn TaskRuntime>,
    /// Makes images ready.
    pub puller: Arc<Puller>,
    /// The image cache (in-use marks).
    pub cache: Arc<Cache>,
    /// Where the launcher counts (tasks, launch stages, history pruned).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Where jobs and tasks are kept.
    pub store: Store,
    /// Timestamps.
    pub clock: Arc<dyn Clock>,
    /// The host's user database (steps run as host users with their host groups).
    pub users: Arc<dyn Users>,
    /// Stages host mounts (the path mounted is the path checked).
    pub mounts: Arc<dyn MountStager>,
    /// Tracked tasks and the shutdown token.
    pub background: Background,
}

/// Why a launcher call failed, by kind: the caller's request (malformed, not allowed), the
/// node (its user database, staging a mount, the runtime, the durable state) or cimaged itself.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The request is malformed or not allowed; nothing was created.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The host's user database did not answer (a directory service behind NSS is down): the
    /// request may be fine; nothing was created.
    #[error("{0}; try again once the node's user database answers")]
    IdentityUnavailable(#[from] IdentityError),
    /// A mount source could not be staged on the host (an I/O error of the node, not a refusal
    /// of the path); nothing was created.
    #[error(transparent)]
    Staging(MountError),
    /// A part of cimaged failed on its own (a task of it panicked or was cut short).
    #[error("{what} failed inside cimaged: {message}; the daemon's log may say more")]
    Internal {
        /// What was being done, e.g. `the user lookup`.
        what: &'static str,
        /// What went wrong.
        message: String,
    },
    /// No such task or job (for this caller: others' work looks absent to non-admins).
    #[error("no {kind} {id}")]
    NotFound {
        /// `task` or `job`.
        kind: &'static str,
        /// The id asked for.
        id: String,
    },
    /// The request conflicts with the current state of a task or job.
    #[error("{what} {id} {why}")]
    Conflict {
        /// `task`, `job` or `step`.
        what: &'static str,
        /// Which one.
        id: String,
        /// What is in the way, e.g. `has already finished (exited)`.
        why: String,
    },
    /// The durable state failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The runtime could not be asked.
    #[error("cannot {op}: {source}")]
    Runtime {
        /// What was being done, e.g. `list this daemon's pods`.
        op: &'static str,
        /// The runtime's error.
        source: RuntimeError,
    },
}

/// Why a job's pod sandbox could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The job's log directory could not be created.
    #[error("cannot create log directory {}: {source}", path.display())]
    LogDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The runtime refused the sandbox.
    #[error("cannot create the pod sandbox: {0}")]
    Runtime(#[from] RuntimeError),
    /// The job record could not be read or saved.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another launch took the job id first, for a user this step may not join.
    #[error(transparent)]
    Denied(SpecError),
    /// The pod's cgroup with its process limit could not be made.
    #[error(
        "cannot make the pod's cgroup {path} with its process limit: {source}; the node needs \
         a writable pids cgroup (or ImageCache.Launcher.PidsLimit: 0 to run without one)"
    )]
    PodCgroup {
        /// The cgroup.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// What [`Launcher::recover`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Running tasks re-attached.
    pub reattached: usize,
    /// Tasks found finished or lost while the daemon was down, and finished off.
    pub finished: usize,
    /// Pods removed because no job of ours claims them.
    pub orphan_pods: usize,
    /// Containers removed because no task of ours claims them.
    pub orphan_containers: usize,
}

/// Runs job steps in containers.
pub struct Launcher {
    rt: Arc<dyn TaskRuntime>,
    users: Arc<dyn Users>,
    mounts: Arc<dyn MountStager>,
    puller: Arc<Puller>,
    cache: Arc<Cache>,
    metrics: Arc<crate::metrics::Metrics>,
    /// The image each live task uses, kept from eviction until its cleanup drops the guard.
    images_in_use: Mutex<HashMap<String, crate::cache::InUse>>,
    store: TaskStore,
    clock: Arc<dyn Clock>,
    settings: LauncherSettings,
    instance: String,
    /// Tasks this daemon is driving, with the token that cancels each.
    live: Mutex<HashMap<String, CancellationToken>>,
    /// Notified whenever a task leaves `live` (for `end_job`'s wait).
    live_changed: tokio::sync::Notify,
    /// Launches in flight by callers that are neither root nor admins: key (task id, or a
    /// reservation while the launch is being accepted) → the caller's uid.
    launched_by: Arc<Mutex<HashMap<String, u32>>>,
    /// One lock per job being worked on.
    job_locks: JobLocks,
    /// Attached commands (`exec -i/-t`) by uid.
    exec_sessions: Arc<Mutex<HashMap<u32, usize>>>,
    /// Task records pruned since this daemon started (for `status`).
    tasks_pruned: std::sync::atomic::AtomicU64,
    background: Background,
}

fn send(tx: Option<&EventSink>, task: &str, now: i64, event: Event) {
    if let Some(sink) = tx {
        sink.send(task, now, event);
    }
}

impl Launcher {
    /// A launcher over `parts.runtime`, with images made ready by the puller and its jobs and
    /// tasks kept in the store. Steps are driven by tracked tasks of `parts.background`; when
    /// shutdown begins, running steps are left running (the next start re-attaches them).
    pub fn new(parts: Parts, settings: LauncherSettings) -> Result<Arc<Self>, StoreError> {
        let instance = parts.store.instance().to_owned();
        let store = TaskStore::open(&parts.store)?;
        Ok(Arc::new(Self {
            rt: parts.runtime,
            users: parts.users,
            mounts: parts.mounts,
            puller: parts.puller,
            cache: parts.cache,
            metrics: parts.metrics,
            images_in_use: Mutex::new(HashMap::new()),
            store,
            clock: parts.clock,
            settings,
            instance,
            live: Mutex::new(HashMap::new()),
            live_changed: tokio::sync::Notify::new(),
            launched_by: Default::default(),
            job_locks: JobLocks::default(),
            exec_sessions: Default::default(),
            tasks_pruned: Default::default(),
            background: parts.background,
        }))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&TaskStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        Store::off_thread(self.store.clone(), f).await
    }

    /// Saves a task's record once it is under way; a failure is logged and the step goes on
    /// (its container is what counts, and the next start reconciles the record with it).
    async fn save_task(&self, task: &TaskRecord) {
        let t = task.clone();
        if let Err(e) = self.blocking(move |s| s.put_task(&t)).await {
            warn!(task = %task.id, "cannot save task state: {e}");
        }
    }

    async fn save_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        let j = job.clone();
        self.blocking(move |s| s.put_job(&j)).await
    }

    /// Reserves a place among `who`'s launches in flight, or refuses when it has its share
    /// (root and admins are not counted).
    fn reserve_launch(&self, who: Principal) -> Result<Reservation, SpecError> {
        let map = Arc::clone(&self.launched_by);
        if who.admin {
            return Ok(Reservation { map, key: None });
        }
        let mut m = map.lock().unwrap();
        let n = m.values().filter(|u| **u == who.uid).count();
        if n >= self.settings.max_launches_per_user {
            return Err(SpecError::Denied(format!(
                "uid {} has {n} launches in flight, its limit \
                 (ImageCache.Launcher.MaxLaunchesPerUser); wait for one to end",
                who.uid
            )));
        }
        let key = format!("reserved-{:016x}", rand::random::<u64>());
        m.insert(key.clone(), who.uid);
        drop(m);
        Ok(Reservation {
            map,
            key: Some(key),
        })
    }

    /// Takes a task off the live set and wakes whoever waits for that.
    fn forget_live(&self, task: &str) {
        self.live.lock().unwrap().remove(task);
        self.launched_by.lock().unwrap().remove(task);
        self.live_changed.notify_waiters();
    }

    fn base_labels(&self, job: &str, uid: u32) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_INSTANCE.to_owned(), self.instance.clone()),
            (LABEL_JOB.to_owned(), job.to_owned()),
            (LABEL_UID.to_owned(), uid.to_string()),
        ])
    }

    fn ours(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_INSTANCE.to_owned(), self.instance.clone()),
        ])
    }

    fn visible(who: Principal, uid: u32) -> bool {
        who.admin || who.uid == uid
    }
}
