//! Runs job steps in containers through CRI:
//! pod sandbox → image (through the puller) → container → start → wait → exit code → cleanup.
//!
//! A **job** owns one pod sandbox (host network; PID and IPC namespaces shared by its steps); a
//! **step** is a container in it, and a job may run several, one after another or at once. A job
//! launched without an id is a one-off that ends with its step. Every state change is saved in
//! the redb file before it is reported, and pods and containers carry labels naming this daemon
//! instance, the job and the task, so that after a crash [`Launcher::recover`] re-attaches the
//! steps still running and removes whatever no job claims.
//!
//! Exit is detected by polling `ContainerStatus` (containerd 1.6 does not implement
//! `GetContainerEvents`): every 5 ms for the first second, then more slowly.

pub mod logs;
pub mod spec;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cache::{Cache, Origin};
use crate::clock::Clock;
use crate::puller::{Action, EnsureRequest, Puller};
use crate::runtime::{ContainerSpec, ContainerState, PodSpec, TaskRuntime};
use crate::store::{Store, StoreError};
use logs::{Chunk, Tail};
use spec::{LaunchSpec, Principal, SpecError, Validated};
use store::{JobRecord, TaskRecord, TaskState, TaskStore};

/// Label marking pods and containers that cimage created.
pub const LABEL_MANAGED: &str = "io.cimage.managed";
/// Label naming the daemon instance that owns a pod or container.
pub const LABEL_INSTANCE: &str = "io.cimage.instance";
/// Label naming the job.
pub const LABEL_JOB: &str = "io.cimage.job";
/// Label naming the task (containers only).
pub const LABEL_TASK: &str = "io.cimage.task";
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
}

/// The stage a task failed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Creating the pod sandbox.
    Sandbox,
    /// Making the image ready.
    Image,
    /// Creating the container.
    Create,
    /// Starting the container.
    Start,
    /// Waiting for the exit.
    Wait,
}

impl Stage {
    /// The name used in events and records.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Sandbox => "SandboxReady",
            Stage::Image => "ImageReady",
            Stage::Create => "ContainerCreated",
            Stage::Start => "Started",
            Stage::Wait => "Exited",
        }
    }
}

/// A lifecycle event of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The launch was accepted; the task has an id.
    Accepted {
        /// Job id.
        job: String,
        /// Step number.
        step: u32,
    },
    /// The job's pod sandbox exists.
    SandboxReady {
        /// Sandbox id.
        sandbox_id: String,
    },
    /// The image is in the runtime.
    ImageReady {
        /// Normalised reference.
        image: String,
        /// Whether it was pulled or cached.
        action: Action,
    },
    /// The container exists.
    ContainerCreated {
        /// Container id.
        container_id: String,
    },
    /// The container runs.
    Started,
    /// Output of the task.
    Output(Chunk),
    /// The task ended.
    Exited {
        /// Exit code (128+N when killed by signal N).
        exit_code: i32,
        /// The signal, when the exit code says one ended it.
        signal: Option<i32>,
        /// `exited`, `cancelled` or `ExceededTimeLimit`.
        reason: String,
    },
    /// The container (and for one-off jobs the pod) is gone.
    CleanedUp,
    /// The task could not be run.
    Failed {
        /// Where it failed.
        stage: Stage,
        /// Why.
        message: String,
    },
}

/// An event with its task and time.
#[derive(Debug, Clone)]
pub struct TaskEvent {
    /// Task id.
    pub task_id: String,
    /// Unix ms.
    pub time_ms: i64,
    /// What happened.
    pub event: Event,
}

/// Why a launcher call failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The request is malformed or not allowed; nothing was created.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// No such task or job (for this caller).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// The durable state failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The runtime could not be asked.
    #[error("{0}")]
    Runtime(String),
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
    puller: Arc<Puller>,
    cache: Arc<Cache>,
    store: TaskStore,
    clock: Arc<dyn Clock>,
    settings: LauncherSettings,
    instance: String,
    live: Mutex<HashMap<String, CancellationToken>>,
    job_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn send(tx: Option<&UnboundedSender<TaskEvent>>, task: &str, now: i64, event: Event) {
    if let Some(tx) = tx {
        let _ = tx.send(TaskEvent {
            task_id: task.to_owned(),
            time_ms: now,
            event,
        });
    }
}

/// The signal behind an exit code, as runtimes report a signal death as 128+N.
pub fn signal_of(exit_code: i32) -> Option<i32> {
    (129..=128 + 64)
        .contains(&exit_code)
        .then(|| exit_code - 128)
}

fn poll_interval(waited: Duration) -> Duration {
    if waited < Duration::from_secs(1) {
        Duration::from_millis(5)
    } else if waited < Duration::from_secs(10) {
        Duration::from_millis(25)
    } else {
        Duration::from_millis(100)
    }
}

impl Launcher {
    /// A launcher over the runtime, with images made ready by `puller` and its jobs and tasks
    /// kept in `store`.
    pub fn new(
        rt: Arc<dyn TaskRuntime>,
        puller: Arc<Puller>,
        cache: Arc<Cache>,
        store: &Store,
        clock: Arc<dyn Clock>,
        settings: LauncherSettings,
    ) -> Result<Arc<Self>, StoreError> {
        let instance = store.instance().to_owned();
        let store = TaskStore::open(store)?;
        Ok(Arc::new(Self {
            rt,
            puller,
            cache,
            store,
            clock,
            settings,
            instance,
            live: Mutex::new(HashMap::new()),
            job_locks: Mutex::new(HashMap::new()),
        }))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&TaskStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        Store::off_thread(self.store.clone(), f).await
    }

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

    fn job_lock(&self, job: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.job_locks
            .lock()
            .unwrap()
            .entry(job.to_owned())
            .or_default()
            .clone()
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

    /// Accepts a step: validates it (nothing is created if that fails), records it, and runs it
    /// in the background. The receiver gets its lifecycle events and output; dropping it does not
    /// stop the task.
    pub async fn launch(
        self: &Arc<Self>,
        who: Principal,
        spec: LaunchSpec,
    ) -> Result<(TaskRecord, UnboundedReceiver<TaskEvent>), LaunchError> {
        let v = spec::validate(&spec, who, &self.settings.allowed_mount_prefixes)?;
        let lock = self.job_lock(&v.job);
        let guard = lock.lock().await;
        let job_id = v.job.clone();
        let (existing, tasks) = self
            .blocking(move |s| Ok((s.job(&job_id)?, s.tasks()?)))
            .await?;
        if let Some(j) = &existing {
            if j.uid != v.run_as.0 && !who.admin {
                return Err(SpecError::Denied(format!(
                    "job {} belongs to uid {}; uid {} cannot add steps to it",
                    j.id, j.uid, who.uid
                ))
                .into());
            }
        }
        let job_tasks: Vec<&TaskRecord> = tasks.iter().filter(|t| t.job == v.job).collect();
        let step = match spec.step {
            Some(n) => n,
            None => job_tasks.iter().map(|t| t.step + 1).max().unwrap_or(0),
        };
        if job_tasks
            .iter()
            .any(|t| t.step == step && !t.state.is_final())
        {
            return Err(LaunchError::Conflict(format!(
                "step {step} of job {} is already running",
                v.job
            )));
        }
        let id = format!("{:012x}", rand::random::<u64>() >> 16);
        let task = TaskRecord {
            log_path: self
                .settings
                .log_dir
                .join(&v.job)
                .join(format!("{step}-{id}.log")),
            id,
            job: v.job.clone(),
            step,
            uid: v.run_as.0,
            image: v.image.to_string(),
            image_id: None,
            container_id: None,
            state: TaskState::Pending,
            exit_code: None,
            signal: None,
            failure: None,
            created: self.clock.now_ms(),
            started: None,
            finished: None,
            timeout_ms: spec.timeout.map(|t| t.as_millis() as u64),
            cleaned: false,
        };
        let t = task.clone();
        self.blocking(move |s| s.put_task(&t)).await?;
        drop(guard);
        let cancel = CancellationToken::new();
        self.live
            .lock()
            .unwrap()
            .insert(task.id.clone(), cancel.clone());
        let (tx, rx) = unbounded_channel();
        info!(task = %task.id, job = %task.job, step, image = %task.image, uid = task.uid, "task accepted");
        tokio::spawn(Arc::clone(self).run(task.clone(), v, spec, tx, cancel));
        Ok((task, rx))
    }

    async fn run(
        self: Arc<Self>,
        mut task: TaskRecord,
        v: Validated,
        spec: LaunchSpec,
        tx: UnboundedSender<TaskEvent>,
        cancel: CancellationToken,
    ) {
        let tx = Some(&tx);
        send(
            tx,
            &task.id,
            self.clock.now_ms(),
            Event::Accepted {
                job: task.job.clone(),
                step: task.step,
            },
        );

        let (job, sandbox_id) = match self.ensure_sandbox(&v).await {
            Ok(x) => x,
            Err(e) => return self.fail(task, Stage::Sandbox, e, tx).await,
        };
        send(
            tx,
            &task.id,
            self.clock.now_ms(),
            Event::SandboxReady {
                sandbox_id: sandbox_id.clone(),
            },
        );

        let ensure = self.puller.ensure(EnsureRequest {
            image: task.image.clone(),
            policy: spec.policy,
            credentials: spec.credentials.clone(),
            origin: Origin::Job,
        });
        let ensured = tokio::select! {
            r = ensure => r,
            _ = cancel.cancelled() => {
                return self.fail_as(task, TaskState::Cancelled, Stage::Image, "cancelled before the container started".into(), tx).await;
            }
        };
        let ensured = match ensured {
            Ok(e) => e,
            Err(e) => return self.fail(task, Stage::Image, e.to_string(), tx).await,
        };
        self.cache.mark_in_use(&ensured.record.id);
        task.image_id = Some(ensured.record.id.clone());
        send(
            tx,
            &task.id,
            self.clock.now_ms(),
            Event::ImageReady {
                image: task.image.clone(),
                action: ensured.action,
            },
        );

        let mut labels = self.base_labels(&task.job, task.uid);
        labels.insert(LABEL_TASK.to_owned(), task.id.clone());
        let container = ContainerSpec {
            name: format!("step-{}-{}", task.step, task.id),
            // The image id, not the tag: what was checked is what runs.
            image: ensured.record.id.clone(),
            command: spec.command.clone(),
            env: spec.env.clone(),
            working_dir: spec.workdir.clone(),
            mounts: v.mounts.clone(),
            devices: v.devices.clone(),
            cdi_devices: v.cdi_devices.clone(),
            labels,
            log_path: task
                .log_path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            run_as_user: Some(v.run_as.0),
            run_as_group: Some(v.run_as.1),
            readonly_rootfs: spec.readonly_rootfs,
        };
        let mut created = self
            .rt
            .create_container(&sandbox_id, &job.pod, &container)
            .await;
        if matches!(&created, Err(e) if e.kind == crate::runtime::RuntimeErrorKind::NotFound) {
            // The image was reported present from a recent confirmation but is gone (removed
            // behind cimage's back): ask the runtime again, pull if needed, and retry once.
            warn!(task = %task.id, image = %task.image, "image missing at container creation; re-checking");
            self.cache.forget(&ensured.record.id);
            self.cache.release_in_use(&ensured.record.id);
            task.image_id = None;
            match self
                .puller
                .ensure(EnsureRequest {
                    image: task.image.clone(),
                    policy: spec.policy,
                    credentials: spec.credentials.clone(),
                    origin: Origin::Job,
                })
                .await
            {
                Ok(again) => {
                    self.cache.mark_in_use(&again.record.id);
                    task.image_id = Some(again.record.id.clone());
                    let mut retry_spec = container.clone();
                    retry_spec.image = again.record.id.clone();
                    created = self
                        .rt
                        .create_container(&sandbox_id, &job.pod, &retry_spec)
                        .await;
                }
                Err(e) => return self.fail(task, Stage::Image, e.to_string(), tx).await,
            }
        }
        let cid = match created {
            Ok(id) => id,
            Err(e) => return self.fail(task, Stage::Create, e.to_string(), tx).await,
        };
        // Not saved yet: if cimaged dies before the start is recorded, the container carries no
        // claim and the orphan sweep removes it, and the task is finished off as interrupted.
        task.container_id = Some(cid.clone());
        task.state = TaskState::Created;
        send(
            tx,
            &task.id,
            self.clock.now_ms(),
            Event::ContainerCreated {
                container_id: cid.clone(),
            },
        );

        if cancel.is_cancelled() {
            return self
                .fail_as(
                    task,
                    TaskState::Cancelled,
                    Stage::Start,
                    "cancelled before the container started".into(),
                    tx,
                )
                .await;
        }
        if let Err(e) = self.rt.start_container(&cid).await {
            return self.fail(task, Stage::Start, e.to_string(), tx).await;
        }
        task.state = TaskState::Running;
        task.started = Some(self.clock.now_ms());
        self.save_task(&task).await;
        send(tx, &task.id, self.clock.now_ms(), Event::Started);
        self.wait_and_finish(task, tx, cancel).await;
    }

    /// Creates the job's pod sandbox unless it has one.
    async fn ensure_sandbox(&self, v: &Validated) -> Result<(JobRecord, String), String> {
        let lock = self.job_lock(&v.job);
        let _g = lock.lock().await;
        let id = v.job.clone();
        let existing = self
            .blocking(move |s| s.job(&id))
            .await
            .map_err(|e| e.to_string())?;
        let mut job = match existing {
            Some(j) if j.ended.is_none() => j,
            _ => JobRecord {
                id: v.job.clone(),
                uid: v.run_as.0,
                one_off: v.one_off,
                pod: PodSpec {
                    name: format!("cimage-{}", v.job),
                    uid: format!("{:016x}", rand::random::<u64>()),
                    namespace: "cimage".into(),
                    hostname: String::new(),
                    log_directory: self.settings.log_dir.join(&v.job),
                    labels: self.base_labels(&v.job, v.run_as.0),
                },
                sandbox_id: None,
                created: self.clock.now_ms(),
                ended: None,
            },
        };
        if let Some(sid) = &job.sandbox_id {
            return Ok((job.clone(), sid.clone()));
        }
        std::fs::create_dir_all(&job.pod.log_directory).map_err(|e| {
            format!(
                "cannot create log directory {}: {e}",
                job.pod.log_directory.display()
            )
        })?;
        // The job is saved once the pod exists: a pod created just before a crash carries no
        // claim, and the orphan sweep removes it.
        let sid = self.rt.run_pod(&job.pod).await.map_err(|e| e.to_string())?;
        job.sandbox_id = Some(sid.clone());
        self.save_job(&job).await.map_err(|e| e.to_string())?;
        Ok((job, sid))
    }

    async fn fail(
        &self,
        task: TaskRecord,
        stage: Stage,
        message: String,
        tx: Option<&UnboundedSender<TaskEvent>>,
    ) {
        self.fail_as(task, TaskState::Failed, stage, message, tx)
            .await
    }

    async fn fail_as(
        &self,
        mut task: TaskRecord,
        state: TaskState,
        stage: Stage,
        message: String,
        tx: Option<&UnboundedSender<TaskEvent>>,
    ) {
        warn!(task = %task.id, stage = stage.as_str(), "task failed: {message}");
        task.state = state;
        task.failure = Some((stage.as_str().to_owned(), message.clone()));
        task.finished = Some(self.clock.now_ms());
        self.save_task(&task).await;
        send(
            tx,
            &task.id,
            self.clock.now_ms(),
            Event::Failed { stage, message },
        );
        self.cleanup(task, tx).await;
    }

    /// Waits for the container to exit (stopping it on cancel or at the time limit), records
    /// the exit, and cleans up. Also used for tasks re-attached after a restart.
    async fn wait_and_finish(
        &self,
        mut task: TaskRecord,
        tx: Option<&UnboundedSender<TaskEvent>>,
        cancel: CancellationToken,
    ) {
        let cid = task
            .container_id
            .clone()
            .expect("a running task has a container");
        let deadline = task.timeout_ms.map(|limit| {
            let elapsed =
                (self.clock.now_ms() - task.started.unwrap_or(task.created)).max(0) as u64;
            tokio::time::Instant::now() + Duration::from_millis(limit.saturating_sub(elapsed))
        });
        let mut tail = Tail::default();
        let mut stopped_as: Option<TaskState> = None;
        let mut errors = 0;
        let waiting = Instant::now();
        let outcome = loop {
            for chunk in tail.read(&task.log_path) {
                send(tx, &task.id, self.clock.now_ms(), Event::Output(chunk));
            }
            match self.rt.container_status(&cid).await {
                Ok(Some(st)) if st.state == ContainerState::Exited => break Ok(st),
                Ok(Some(_)) => errors = 0,
                Ok(None) => break Err(format!("container {cid} disappeared from the runtime")),
                Err(e) => {
                    errors += 1;
                    if errors >= 50 {
                        break Err(format!("lost track of container {cid}: {e}"));
                    }
                }
            }
            let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
            tokio::select! {
                _ = tokio::time::sleep(poll_interval(waiting.elapsed())) => {}
                _ = cancel.cancelled(), if stopped_as.is_none() => {
                    stopped_as = Some(TaskState::Cancelled);
                    info!(task = %task.id, "cancelling: stopping the container");
                    self.stop(&cid).await;
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() && stopped_as.is_none() => {
                    stopped_as = Some(TaskState::TimedOut);
                    info!(task = %task.id, "time limit reached: stopping the container");
                    self.stop(&cid).await;
                }
            }
        };
        for chunk in tail.read(&task.log_path) {
            send(tx, &task.id, self.clock.now_ms(), Event::Output(chunk));
        }
        task.finished = Some(self.clock.now_ms());
        match outcome {
            Ok(st) => {
                task.exit_code = Some(st.exit_code);
                task.signal = signal_of(st.exit_code);
                task.state = stopped_as.unwrap_or(TaskState::Exited);
                let reason = match task.state {
                    TaskState::Cancelled => "cancelled",
                    TaskState::TimedOut => "ExceededTimeLimit",
                    _ => "exited",
                };
                info!(task = %task.id, exit_code = st.exit_code, reason, "task finished");
                self.save_task(&task).await;
                send(
                    tx,
                    &task.id,
                    self.clock.now_ms(),
                    Event::Exited {
                        exit_code: st.exit_code,
                        signal: task.signal,
                        reason: reason.to_owned(),
                    },
                );
                self.cleanup(task, tx).await;
            }
            Err(message) => {
                // Another waiter (a re-attach racing a slow shutdown) may have finished the task
                // and removed the container; its record stands.
                let id = task.id.clone();
                if let Ok(Some(t)) = self.blocking(move |s| s.task(&id)).await {
                    if t.state.is_final() {
                        self.live.lock().unwrap().remove(&task.id);
                        return;
                    }
                }
                self.fail(task, Stage::Wait, message, tx).await
            }
        }
    }

    async fn stop(&self, cid: &str) {
        if let Err(e) = self.rt.stop_container(cid, self.settings.stop_grace).await {
            warn!(container = cid, "stopping failed: {e}");
        }
    }

    /// Removes the container, releases the image, and tears the pod down when the job ends with
    /// this task (a one-off job), or when the pod was made for a step that never got a container
    /// and no other step of the job is running. Safe to run again after a crash.
    async fn cleanup(&self, mut task: TaskRecord, tx: Option<&UnboundedSender<TaskEvent>>) {
        if let Some(cid) = &task.container_id {
            if let Err(e) = self.rt.remove_container(cid).await {
                warn!(task = %task.id, "removing container {cid} failed: {e}");
            }
        }
        if let Some(img) = &task.image_id {
            self.cache.release_in_use(img);
        }
        task.cleaned = true;
        self.cache
            .metrics()
            .inc("cimage_tasks_total", &[("state", task.state.as_str())]);
        let job_id = task.job.clone();
        let lock = self.job_lock(&job_id);
        {
            let _g = lock.lock().await;
            let (job, tasks) = match self
                .blocking(move |s| Ok((s.job(&job_id)?, s.tasks()?)))
                .await
            {
                Ok(x) => x,
                Err(e) => {
                    warn!("cannot read job state during cleanup: {e}");
                    (None, vec![])
                }
            };
            let mut ended_job = None;
            if let Some(mut job) = job {
                let others_live = tasks
                    .iter()
                    .any(|t| t.job == job.id && t.id != task.id && !t.state.is_final());
                let never_ran = task.container_id.is_none();
                if job.ended.is_none() && (job.one_off || (never_ran && !others_live)) {
                    self.teardown_pod(&mut job).await;
                    if job.one_off {
                        job.ended = Some(self.clock.now_ms());
                    }
                    ended_job = Some(job);
                }
            }
            // The job's new state and the task's cleaned mark commit together.
            let t = task.clone();
            if let Err(e) = self
                .blocking(move |s| s.put_task_and_job(&t, ended_job.as_ref()))
                .await
            {
                warn!(task = %task.id, "cannot save cleanup: {e}");
            }
        }
        self.live.lock().unwrap().remove(&task.id);
        send(tx, &task.id, self.clock.now_ms(), Event::CleanedUp);
    }

    async fn teardown_pod(&self, job: &mut JobRecord) {
        if let Some(sid) = job.sandbox_id.take() {
            if let Err(e) = self.rt.stop_pod(&sid).await {
                warn!(job = %job.id, "stopping pod {sid} failed: {e}");
            }
            if let Err(e) = self.rt.remove_pod(&sid).await {
                warn!(job = %job.id, "removing pod {sid} failed: {e}");
                // Keep the id so the next sweep tries again.
                job.sandbox_id = Some(sid);
            }
        }
    }

    fn visible(who: Principal, uid: u32) -> bool {
        who.admin || who.uid == uid
    }

    /// A task, if `who` may see it (others' tasks look absent to non-admins).
    pub async fn task(&self, who: Principal, id: &str) -> Result<TaskRecord, LaunchError> {
        let key = id.to_owned();
        match self.blocking(move |s| s.task(&key)).await? {
            Some(t) if Self::visible(who, t.uid) => Ok(t),
            _ => Err(LaunchError::NotFound(format!("no task {id}"))),
        }
    }

    /// Tasks `who` may see: running ones, or all with `all`. Newest first.
    pub async fn tasks(&self, who: Principal, all: bool) -> Result<Vec<TaskRecord>, LaunchError> {
        let mut tasks: Vec<TaskRecord> = self
            .blocking(|s| s.tasks())
            .await?
            .into_iter()
            .filter(|t| Self::visible(who, t.uid) && (all || !t.state.is_final()))
            .collect();
        tasks.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
        Ok(tasks)
    }

    /// Jobs `who` may see, with their tasks.
    pub async fn jobs(
        &self,
        who: Principal,
    ) -> Result<Vec<(JobRecord, Vec<TaskRecord>)>, LaunchError> {
        let (jobs, tasks) = self.blocking(|s| Ok((s.jobs()?, s.tasks()?))).await?;
        let mut out: Vec<_> = jobs
            .into_iter()
            .filter(|j| Self::visible(who, j.uid))
            .map(|j| {
                let ts = tasks.iter().filter(|t| t.job == j.id).cloned().collect();
                (j, ts)
            })
            .collect();
        out.sort_by_key(|j| std::cmp::Reverse(j.0.created));
        Ok(out)
    }

    /// Cancels a task: the container gets SIGTERM, then SIGKILL after the grace period.
    pub async fn cancel(&self, who: Principal, id: &str) -> Result<TaskRecord, LaunchError> {
        let task = self.task(who, id).await?;
        if task.state.is_final() {
            return Err(LaunchError::Conflict(format!(
                "task {id} has already finished ({})",
                task.state.as_str()
            )));
        }
        match self.live.lock().unwrap().get(id) {
            Some(token) => token.cancel(),
            None => {
                return Err(LaunchError::Conflict(format!(
                    "task {id} is not being run by this daemon"
                )))
            }
        }
        Ok(task)
    }

    /// Ends a job: cancels its running steps, waits for them (up to the grace period and a
    /// margin), and removes its pod.
    pub async fn end_job(&self, who: Principal, id: &str) -> Result<JobRecord, LaunchError> {
        let key = id.to_owned();
        let (job, tasks) = self
            .blocking(move |s| Ok((s.job(&key)?, s.tasks()?)))
            .await?;
        let job = match job {
            Some(j) if Self::visible(who, j.uid) => j,
            _ => return Err(LaunchError::NotFound(format!("no job {id}"))),
        };
        let running: Vec<String> = tasks
            .iter()
            .filter(|t| t.job == job.id && !t.state.is_final())
            .map(|t| t.id.clone())
            .collect();
        for t in &running {
            if let Some(token) = self.live.lock().unwrap().get(t) {
                token.cancel();
            }
        }
        let deadline = Instant::now() + self.settings.stop_grace + Duration::from_secs(5);
        while Instant::now() < deadline
            && running
                .iter()
                .any(|t| self.live.lock().unwrap().contains_key(t))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let lock = self.job_lock(&job.id);
        let _g = lock.lock().await;
        let key = id.to_owned();
        let mut job = self.blocking(move |s| s.job(&key)).await?.unwrap_or(job);
        self.teardown_pod(&mut job).await;
        job.ended = Some(self.clock.now_ms());
        self.save_job(&job).await?;
        info!(job = %job.id, "job ended");
        Ok(job)
    }

    /// A task's output so far; with `follow`, keeps sending until the task has finished.
    pub async fn logs(
        self: &Arc<Self>,
        who: Principal,
        id: &str,
        follow: bool,
    ) -> Result<UnboundedReceiver<Chunk>, LaunchError> {
        let task = self.task(who, id).await?;
        let (tx, rx) = unbounded_channel();
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tail = Tail::default();
            loop {
                for c in tail.read(&task.log_path) {
                    if tx.send(c).is_err() {
                        return;
                    }
                }
                if !follow {
                    return;
                }
                let key = task.id.clone();
                let done = match me.blocking(move |s| s.task(&key)).await {
                    Ok(Some(t)) => t.state.is_final(),
                    _ => true,
                };
                if done {
                    for c in tail.read(&task.log_path) {
                        let _ = tx.send(c);
                    }
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(rx)
    }

    /// Before the daemon exits: waits (up to `limit`) for tasks that have finished but are still
    /// being cleaned up. Tasks still running are left running; the next start re-attaches them.
    pub async fn drain(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let live: Vec<String> = self.live.lock().unwrap().keys().cloned().collect();
            let busy = match self.blocking(|s| s.tasks()).await {
                Ok(tasks) => tasks
                    .iter()
                    .any(|t| live.contains(&t.id) && !t.cleaned && t.state != TaskState::Running),
                Err(_) => false,
            };
            if !busy {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        warn!("shutting down with task cleanups still in progress; the next start finishes them");
    }

    /// After a (re)start: re-attaches running tasks, finishes those that ended or were lost while
    /// the daemon was down, and removes pods and containers of this instance that no job or task
    /// claims.
    pub async fn recover(self: &Arc<Self>) -> Result<RecoveryReport, LaunchError> {
        let mut report = RecoveryReport::default();
        let (_, tasks) = self.blocking(|s| Ok((s.jobs()?, s.tasks()?))).await?;
        // Ask the runtime everything first: if it cannot answer, nothing is decided and the
        // caller retries later (a task must not be declared lost because containerd was down).
        let rt_err = |e: crate::runtime::RuntimeError| LaunchError::Runtime(e.to_string());
        let ours = self.ours();
        let pods = self.rt.list_pods(&ours).await.map_err(rt_err)?;
        let containers = self.rt.list_containers(&ours).await.map_err(rt_err)?;
        let mut statuses = HashMap::new();
        for t in tasks.iter().filter(|t| !t.cleaned) {
            if let Some(cid) = &t.container_id {
                let st = self.rt.container_status(cid).await.map_err(rt_err)?;
                statuses.insert(cid.clone(), st);
            }
        }
        for task in tasks.iter().filter(|t| !t.cleaned) {
            let mut task = task.clone();
            if let Some(img) = &task.image_id {
                self.cache.mark_in_use(img);
            }
            let status = task
                .container_id
                .as_ref()
                .and_then(|cid| statuses.get(cid).cloned().flatten());
            let cancel = CancellationToken::new();
            match status {
                _ if task.state.is_final() => {
                    self.cleanup(task, None).await;
                    report.finished += 1;
                }
                Some(st)
                    if st.state == ContainerState::Running
                        || st.state == ContainerState::Exited =>
                {
                    if task.state != TaskState::Running {
                        task.state = TaskState::Running;
                        task.started.get_or_insert(self.clock.now_ms());
                        self.save_task(&task).await;
                    }
                    info!(task = %task.id, "re-attaching to a task that ran while cimaged was down");
                    self.live
                        .lock()
                        .unwrap()
                        .insert(task.id.clone(), cancel.clone());
                    let me = Arc::clone(self);
                    tokio::spawn(async move { me.wait_and_finish(task, None, cancel).await });
                    report.reattached += 1;
                }
                _ => {
                    self.fail(
                        task,
                        Stage::Start,
                        "interrupted: cimaged restarted before the container ran".into(),
                        None,
                    )
                    .await;
                    report.finished += 1;
                }
            }
        }
        // Re-read: the cleanups above may have ended jobs and released containers.
        let (jobs, tasks) = self.blocking(|s| Ok((s.jobs()?, s.tasks()?))).await?;
        let claimed_pods: Vec<&str> = jobs
            .iter()
            .filter(|j| j.ended.is_none())
            .filter_map(|j| j.sandbox_id.as_deref())
            .collect();
        for pod in pods
            .iter()
            .filter(|p| !claimed_pods.contains(&p.id.as_str()))
        {
            let job = pod.labels.get(LABEL_JOB).map(String::as_str).unwrap_or("?");
            info!(pod = %pod.id, job, "removing orphan pod");
            let _ = self.rt.stop_pod(&pod.id).await;
            match self.rt.remove_pod(&pod.id).await {
                Ok(()) => report.orphan_pods += 1,
                Err(e) => warn!(pod = %pod.id, "cannot remove orphan pod: {e}"),
            }
        }
        let claimed: Vec<&str> = tasks
            .iter()
            .filter(|t| !t.cleaned)
            .filter_map(|t| t.container_id.as_deref())
            .collect();
        for c in containers
            .iter()
            .filter(|c| !claimed.contains(&c.id.as_str()))
        {
            info!(container = %c.id, "removing orphan container");
            let _ = self.rt.stop_container(&c.id, Duration::ZERO).await;
            match self.rt.remove_container(&c.id).await {
                Ok(()) => report.orphan_containers += 1,
                Err(e) => warn!(container = %c.id, "cannot remove orphan container: {e}"),
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::puller::PullerSettings;
    use crate::runtime::task::fake::{FakeTaskRuntime, Script};

    const IMG: &str = "127.0.0.1:5000/app:1";
    const ROOT: Principal = Principal {
        uid: 0,
        gid: 0,
        admin: true,
    };
    const ALICE: Principal = Principal {
        uid: 1000,
        gid: 1000,
        admin: false,
    };
    const BOB: Principal = Principal {
        uid: 1001,
        gid: 1001,
        admin: false,
    };

    struct Rig {
        base: crate::testing::Rig,
        tasks: Arc<FakeTaskRuntime>,
        launcher: Arc<Launcher>,
    }

    impl std::ops::Deref for Rig {
        type Target = crate::testing::Rig;
        fn deref(&self) -> &Self::Target {
            &self.base
        }
    }

    fn launcher_over(base: &crate::testing::Rig, tasks: Arc<FakeTaskRuntime>) -> Arc<Launcher> {
        Launcher::new(
            tasks,
            base.puller.clone(),
            base.cache.clone(),
            &base.store,
            Arc::new(SystemClock),
            LauncherSettings {
                allowed_mount_prefixes: vec![],
                stop_grace: Duration::from_secs(1),
                log_dir: base.dir.path().join("logs"),
            },
        )
        .unwrap()
    }

    fn rig() -> Rig {
        let base = crate::testing::Rig::on_system_clock(PullerSettings {
            max_concurrent_pulls: 2,
            retries: 0,
            ..crate::testing::puller_settings()
        });
        base.rt.offer(IMG, "sha256:img1", "sha256:d1", 10);
        let tasks = Arc::new(FakeTaskRuntime::default());
        let launcher = launcher_over(&base, tasks.clone());
        Rig {
            base,
            tasks,
            launcher,
        }
    }

    fn spec(job: Option<&str>) -> LaunchSpec {
        LaunchSpec {
            job: job.map(str::to_owned),
            image: IMG.into(),
            command: vec!["true".into()],
            ..Default::default()
        }
    }

    async fn events(mut rx: UnboundedReceiver<TaskEvent>) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(e) = rx.recv().await {
            let done = e.event == Event::CleanedUp;
            out.push(e.event);
            if done {
                break;
            }
        }
        out
    }

    fn names(evs: &[Event]) -> Vec<&'static str> {
        evs.iter()
            .map(|e| match e {
                Event::Accepted { .. } => "Accepted",
                Event::SandboxReady { .. } => "SandboxReady",
                Event::ImageReady { .. } => "ImageReady",
                Event::ContainerCreated { .. } => "ContainerCreated",
                Event::Started => "Started",
                Event::Output(_) => "Output",
                Event::Exited { .. } => "Exited",
                Event::CleanedUp => "CleanedUp",
                Event::Failed { .. } => "Failed",
            })
            .collect()
    }

    #[tokio::test]
    async fn one_off_task_runs_through_every_stage_and_leaves_nothing() {
        let r = rig();
        *r.tasks.script.lock().unwrap() = Some(Script {
            runs_for: Duration::from_millis(20),
            exit_code: 3,
        });
        let (task, rx) = r.launcher.launch(ROOT, spec(None)).await.unwrap();
        let evs = events(rx).await;
        assert_eq!(
            names(&evs),
            [
                "Accepted",
                "SandboxReady",
                "ImageReady",
                "ContainerCreated",
                "Started",
                "Exited",
                "CleanedUp"
            ]
        );
        assert!(evs.contains(&Event::Exited {
            exit_code: 3,
            signal: None,
            reason: "exited".into()
        }));
        assert_eq!((r.tasks.pod_count(), r.tasks.container_count()), (0, 0));
        let t = r.launcher.task(ROOT, &task.id).await.unwrap();
        assert_eq!(
            (t.state, t.exit_code, t.cleaned),
            (TaskState::Exited, Some(3), true)
        );
        assert_eq!(
            r.cache
                .metrics()
                .counter("cimage_tasks_total", &[("state", "exited")]),
            1
        );
        let img = r.cache.list().await.unwrap().into_iter().next().unwrap();
        assert_eq!(
            (img.use_count, img.origin),
            (1, Origin::Job),
            "a launch is a use of its image"
        );
        assert!(!r.cache.is_in_use(&img.id), "released after the task");
    }

    #[tokio::test]
    async fn an_image_missing_at_container_creation_is_checked_again() {
        let r = rig();
        r.tasks.fail_once.lock().unwrap().insert(
            "CreateContainer",
            crate::runtime::RuntimeError {
                op: "CreateContainer",
                kind: crate::runtime::RuntimeErrorKind::NotFound,
                message: "failed to get image: not found".into(),
            },
        );
        let (task, rx) = r.launcher.launch(ROOT, spec(None)).await.unwrap();
        let evs = events(rx).await;
        assert!(
            evs.contains(&Event::Exited {
                exit_code: 0,
                signal: None,
                reason: "exited".into()
            }),
            "{evs:?}"
        );
        let creates = r
            .tasks
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| **c == "CreateContainer")
            .count();
        assert_eq!(creates, 2, "retried once after re-checking the image");
        assert!(r
            .launcher
            .task(ROOT, &task.id)
            .await
            .unwrap()
            .failure
            .is_none());
    }

    #[tokio::test]
    async fn signal_deaths_are_reported_as_signals() {
        let r = rig();
        *r.tasks.script.lock().unwrap() = Some(Script {
            runs_for: Duration::ZERO,
            exit_code: 137,
        });
        let (_, rx) = r.launcher.launch(ROOT, spec(None)).await.unwrap();
        let evs = events(rx).await;
        assert!(evs.contains(&Event::Exited {
            exit_code: 137,
            signal: Some(9),
            reason: "exited".into()
        }));
    }

    #[tokio::test]
    async fn image_failure_leaves_no_pod() {
        let r = rig();
        let mut s = spec(None);
        s.image = "127.0.0.1:5000/missing:1".into();
        let (task, rx) = r.launcher.launch(ROOT, s).await.unwrap();
        let evs = events(rx).await;
        assert_eq!(
            names(&evs),
            ["Accepted", "SandboxReady", "Failed", "CleanedUp"]
        );
        assert!(
            matches!(&evs[2], Event::Failed { stage: Stage::Image, message } if message.contains("missing:1"))
        );
        assert_eq!(r.tasks.pod_count(), 0);
        let t = r.launcher.task(ROOT, &task.id).await.unwrap();
        assert_eq!(t.failure.unwrap().0, "ImageReady");

        // Also for a named job whose first step fails: the next step gets a fresh pod.
        let mut s = spec(Some("j1"));
        s.image = "127.0.0.1:5000/missing:1".into();
        let (_, rx) = r.launcher.launch(ROOT, s).await.unwrap();
        events(rx).await;
        assert_eq!(r.tasks.pod_count(), 0);
    }

    #[tokio::test]
    async fn failures_at_create_and_start_still_clean_up() {
        for op in ["CreateContainer", "StartContainer", "RunPodSandbox"] {
            let r = rig();
            r.tasks.failing.lock().unwrap().insert(op, "boom".into());
            let (_, rx) = r.launcher.launch(ROOT, spec(None)).await.unwrap();
            let evs = events(rx).await;
            assert!(
                evs.iter().any(
                    |e| matches!(e, Event::Failed { message, .. } if message.contains("boom"))
                ),
                "{op}: {evs:?}"
            );
            assert_eq!(
                (r.tasks.pod_count(), r.tasks.container_count()),
                (0, 0),
                "{op}"
            );
        }
    }

    #[tokio::test]
    async fn cancel_and_time_limit_stop_the_container() {
        let r = rig();
        *r.tasks.script.lock().unwrap() = Some(Script {
            runs_for: Duration::from_secs(30),
            exit_code: 0,
        });
        let (task, rx) = r.launcher.launch(ROOT, spec(None)).await.unwrap();
        let waiter = tokio::spawn(events(rx));
        tokio::time::sleep(Duration::from_millis(50)).await;
        r.launcher.cancel(ROOT, &task.id).await.unwrap();
        let evs = waiter.await.unwrap();
        assert!(
            evs.contains(&Event::Exited {
                exit_code: 143,
                signal: Some(15),
                reason: "cancelled".into()
            }),
            "{evs:?}"
        );
        assert_eq!(
            r.launcher.task(ROOT, &task.id).await.unwrap().state,
            TaskState::Cancelled
        );

        let mut s = spec(None);
        s.timeout = Some(Duration::from_millis(50));
        let (task, rx) = r.launcher.launch(ROOT, s).await.unwrap();
        let evs = events(rx).await;
        assert!(
            evs.iter().any(
                |e| matches!(e, Event::Exited { reason, .. } if reason == "ExceededTimeLimit")
            ),
            "{evs:?}"
        );
        assert_eq!(
            r.launcher.task(ROOT, &task.id).await.unwrap().state,
            TaskState::TimedOut
        );
        assert_eq!(r.tasks.pod_count(), 0);
    }

    #[tokio::test]
    async fn steps_of_a_job_share_one_pod_until_the_job_ends() {
        let r = rig();
        *r.tasks.script.lock().unwrap() = Some(Script {
            runs_for: Duration::from_millis(100),
            exit_code: 0,
        });
        let (a, rxa) = r.launcher.launch(ALICE, spec(Some("job7"))).await.unwrap();
        let (b, rxb) = r.launcher.launch(ALICE, spec(Some("job7"))).await.unwrap();
        assert_eq!((a.step, b.step), (0, 1));
        let (ea, eb) = tokio::join!(events(rxa), events(rxb));
        let sandbox = |evs: &[Event]| {
            evs.iter().find_map(|e| match e {
                Event::SandboxReady { sandbox_id } => Some(sandbox_id.clone()),
                _ => None,
            })
        };
        assert_eq!(sandbox(&ea), sandbox(&eb));
        assert_eq!(r.tasks.pod_count(), 1, "the pod outlives the steps");
        assert!(
            r.tasks
                .calls
                .lock()
                .unwrap()
                .iter()
                .filter(|c| **c == "RunPodSandbox")
                .count()
                == 1
        );
        // Bob may not add steps to, see, or end Alice's job.
        assert!(matches!(
            r.launcher.launch(BOB, spec(Some("job7"))).await,
            Err(LaunchError::Spec(SpecError::Denied(_)))
        ));
        assert!(r.launcher.end_job(BOB, "job7").await.is_err());
        assert!(r.launcher.task(BOB, &a.id).await.is_err());
        assert!(r.launcher.tasks(BOB, true).await.unwrap().is_empty());
        assert_eq!(r.launcher.tasks(ALICE, true).await.unwrap().len(), 2);
        r.launcher.end_job(ALICE, "job7").await.unwrap();
        assert_eq!(r.tasks.pod_count(), 0);
    }

    #[tokio::test]
    async fn recovery_reattaches_running_tasks_and_sweeps_orphans() {
        let r = rig();
        *r.tasks.script.lock().unwrap() = Some(Script {
            runs_for: Duration::from_millis(300),
            exit_code: 7,
        });
        // The first daemon runs on a runtime of its own, so that its crash can be real: shutting
        // that runtime down stops its waiter mid-task, as `kill -9` would.
        let first = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let l1 = r.launcher.clone();
        let (task, mut rx) = first
            .spawn(async move { l1.launch(ROOT, spec(None)).await.unwrap() })
            .await
            .unwrap();
        while let Some(e) = rx.recv().await {
            if e.event == Event::Started {
                break;
            }
        }
        first.shutdown_background();
        drop(rx);
        let mut ours = r.launcher.ours();
        ours.insert(LABEL_JOB.into(), "ghost".into());
        r.tasks.add_pod(ours);
        let foreign = r.tasks.add_pod(BTreeMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_INSTANCE.to_string(), "someone-else".to_string()),
        ]));
        let again = launcher_over(&r, r.tasks.clone());
        let report = again.recover().await.unwrap();
        assert_eq!(
            (report.reattached, report.orphan_pods),
            (1, 1),
            "{report:?}"
        );
        for _ in 0..200 {
            if again.task(ROOT, &task.id).await.unwrap().cleaned {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t = again.task(ROOT, &task.id).await.unwrap();
        assert_eq!((t.state, t.exit_code), (TaskState::Exited, Some(7)));
        let left = r.tasks.list_pods(&BTreeMap::new()).await.unwrap();
        assert_eq!(
            left.iter().map(|p| p.id.clone()).collect::<Vec<_>>(),
            vec![foreign]
        );
    }
}
