//! Driving an accepted step to a running container, stage by stage: pod sandbox → image
//! (through the puller) → container created and read back → started and its process checked
//! on the host (the checks themselves are in `confine`). Each stage reports its
//! event and its time when done; the first that cannot complete ends the task, recorded in
//! that stage. Acceptance is in `accept`; waiting and cleanup are in `wait` and `cleanup`.

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::confine::Confinement;
use super::request::SpecError;
use super::spec::{LaunchSpec, Validated};
use super::store::{JobRecord, TaskRecord, TaskState};
use super::{send, Event, EventSink, Launcher, SandboxError, Stage, LABEL_TASK};
use crate::cache::Origin;
use crate::puller::{EnsureRequest, SlotOwner};
use crate::runtime::{ContainerSpec, MountSpec, PodSpec, RuntimeErrorKind};

/// An accepted step: as validated, as asked (its command, environment, policy, credentials),
/// and what its acceptance added, the mounts staged for it.
pub(super) struct Step {
    /// What validation produced.
    pub(super) v: Validated,
    /// The request as asked.
    pub(super) spec: LaunchSpec,
    /// The staged mounts the runtime is given: the host mounts asked for, then (for a step as
    /// a user) its `/etc/passwd` and `/etc/group`.
    pub(super) mounts: Vec<MountSpec>,
}

/// Why a stage did not complete: the state the task ends in, the stage, and why, as the task's
/// record and its `Failed` event say it.
struct Stopped {
    state: TaskState,
    stage: Stage,
    message: String,
}

impl Stopped {
    /// The stage failed.
    fn failed(stage: Stage, why: impl ToString) -> Self {
        Self {
            state: TaskState::Failed,
            stage,
            message: why.to_string(),
        }
    }

    /// The task was cancelled during the stage, before its container ran.
    fn cancelled(stage: Stage) -> Self {
        Self {
            state: TaskState::Cancelled,
            stage,
            message: "cancelled before the container started".into(),
        }
    }
}

impl Launcher {
    /// Drives an accepted step: its stages, then its wait and cleanup; on a stage that cannot
    /// complete, records the failure and cleans up what the stages made.
    pub(super) async fn run(
        self: Arc<Self>,
        mut task: TaskRecord,
        step: Step,
        tx: EventSink,
        cancel: CancellationToken,
    ) {
        let tx = Some(&tx);
        let accepted = Event::Accepted {
            job: task.job.clone(),
            step: task.step,
        };
        send(tx, &task.id, self.clock.now_ms(), accepted);
        match self.drive(&mut task, &step, tx, &cancel).await {
            Ok(()) => self.wait_and_finish(task, tx, cancel).await,
            Err(s) => self.fail_as(task, s.state, s.stage, s.message, tx).await,
        }
    }

    /// The stages up to a running container. `task` keeps what each made (image, container),
    /// so that a failure later cleans it up.
    async fn drive(
        &self,
        task: &mut TaskRecord,
        step: &Step,
        tx: Option<&EventSink>,
        cancel: &CancellationToken,
    ) -> Result<(), Stopped> {
        let (pod, sandbox_id) = self.sandbox_stage(task, &step.v, tx).await?;
        let image_id = self.image_stage(task, step, tx, cancel).await?;
        let cid = self
            .create_stage(task, step, (&pod, &sandbox_id), image_id, tx)
            .await?;
        self.start_stage(task, step, &cid, tx, cancel).await
    }

    /// The job's pod sandbox, made unless the job has one: its spec and id.
    async fn sandbox_stage(
        &self,
        task: &TaskRecord,
        v: &Validated,
        tx: Option<&EventSink>,
    ) -> Result<(PodSpec, String), Stopped> {
        let started = Instant::now();
        let (job, sandbox_id) = self
            .ensure_sandbox(v)
            .await
            .map_err(|e| Stopped::failed(Stage::Sandbox, e))?;
        self.stage_time(Stage::Sandbox, started);
        let ready = Event::SandboxReady {
            sandbox_id: sandbox_id.clone(),
        };
        send(tx, &task.id, self.clock.now_ms(), ready);
        Ok((job.pod, sandbox_id))
    }

    /// The image made ready through the puller (its pull shown as it moves) and marked in use:
    /// the runtime's image id. A step as a user (whoever launches it), or a launch by a caller
    /// who is neither root nor an admin, pulls under that user's share of the node's pull
    /// slots, as the user's own `cimage pull` would.
    async fn image_stage(
        &self,
        task: &mut TaskRecord,
        step: &Step,
        tx: Option<&EventSink>,
        cancel: &CancellationToken,
    ) -> Result<String, Stopped> {
        let started = Instant::now();
        let (clock, id) = (Arc::clone(&self.clock), task.id.clone());
        // The image is the step's user's choice even when the scheduler (root) launches it:
        // a step as a user pulls under that user's share, so an image that never arrives
        // holds none of the node's other slots.
        let owner = match (step.v.creator.admin, step.v.identity.uid) {
            (true, 0) => SlotOwner::Node,
            (true, uid) => SlotOwner::User(uid),
            (false, _) => SlotOwner::User(step.v.creator.uid),
        };
        let request = ensure_request(task, &step.spec);
        let ensure = self.puller.ensure_watched_for(request, owner, |p| {
            send(tx, &id, clock.now_ms(), Event::ImagePulling(p))
        });
        let ensured = tokio::select! {
            r = ensure => r,
            _ = cancel.cancelled() => return Err(Stopped::cancelled(Stage::Image)),
        };
        self.stage_time(Stage::Image, started);
        let ensured = ensured.map_err(|e| Stopped::failed(Stage::Image, e))?;
        self.hold_image(task, &ensured.record.id);
        task.image_id = Some(ensured.record.id.clone());
        let ready = Event::ImageReady {
            image: task.image.clone(),
            action: ensured.action,
        };
        send(tx, &task.id, self.clock.now_ms(), ready);
        Ok(ensured.record.id)
    }

    /// The step's container, created from `image_id` in the pod and read back before its
    /// start: its id.
    async fn create_stage(
        &self,
        task: &mut TaskRecord,
        step: &Step,
        (pod, sandbox_id): (&PodSpec, &str),
        image_id: String,
        tx: Option<&EventSink>,
    ) -> Result<String, Stopped> {
        let started = Instant::now();
        let image = task.image.clone();
        let c = confinement(step, &image);
        let refused = |r| Stopped::failed(Stage::Create, r);
        let mut volumes = self
            .check_image_volumes(&c, &image_id)
            .await
            .map_err(refused)?;
        let mut container = self.container_spec(task, step, image_id);
        let mut created = self.rt.create_container(sandbox_id, pod, &container).await;
        if matches!(&created, Err(e) if e.kind == RuntimeErrorKind::NotFound) {
            // The image was reported present from a recent confirmation but is gone (removed
            // behind cimage's back): ask the runtime again, pull if needed, and retry once.
            warn!(task = %task.id, image = %task.image, "image missing at container creation; re-checking");
            container.image = self.image_again(task, &step.spec).await?;
            volumes = self
                .check_image_volumes(&c, &container.image)
                .await
                .map_err(refused)?;
            created = self.rt.create_container(sandbox_id, pod, &container).await;
        }
        let cid = created.map_err(|e| Stopped::failed(Stage::Create, e))?;
        // Not saved yet: if cimaged dies before the start is recorded, the container carries no
        // claim and the orphan sweep removes it, and the task is finished off as interrupted.
        task.container_id = Some(cid.clone());
        task.state = TaskState::Created;
        // Read back before the start; a failure removes the container in the cleanup that
        // follows.
        self.read_back(&c, &cid, &volumes).await.map_err(refused)?;
        self.stage_time(Stage::Create, started);
        let event = Event::ContainerCreated {
            container_id: cid.clone(),
        };
        send(tx, &task.id, self.clock.now_ms(), event);
        Ok(cid)
    }

    /// The image once more, after the runtime did not find it at container creation: the
    /// first one forgotten and released, the new one marked in use; its id.
    async fn image_again(
        &self,
        task: &mut TaskRecord,
        spec: &LaunchSpec,
    ) -> Result<String, Stopped> {
        if let Some(gone) = task.image_id.take() {
            self.cache.forget_presence(&gone);
            self.images_in_use.lock().unwrap().remove(&task.id);
        }
        let again = self
            .puller
            .ensure(ensure_request(task, spec))
            .await
            .map_err(|e| Stopped::failed(Stage::Image, e))?;
        self.hold_image(task, &again.record.id);
        task.image_id = Some(again.record.id.clone());
        Ok(again.record.id)
    }

    /// Keeps the task's image from eviction until its cleanup drops the guard.
    fn hold_image(&self, task: &TaskRecord, image_id: &str) {
        let in_use = self.cache.mark_in_use(image_id);
        self.images_in_use
            .lock()
            .unwrap()
            .insert(task.id.clone(), in_use);
    }

    /// The container started (unless cancelled meanwhile) and its process checked on the host,
    /// and the task saved as running.
    async fn start_stage(
        &self,
        task: &mut TaskRecord,
        step: &Step,
        cid: &str,
        tx: Option<&EventSink>,
        cancel: &CancellationToken,
    ) -> Result<(), Stopped> {
        if cancel.is_cancelled() {
            return Err(Stopped::cancelled(Stage::Start));
        }
        let started = Instant::now();
        self.rt
            .start_container(cid)
            .await
            .map_err(|e| Stopped::failed(Stage::Start, e))?;
        self.check_started(&confinement(step, &task.image), cid)
            .await
            .map_err(|r| Stopped::failed(Stage::Start, r))?;
        self.stage_time(Stage::Start, started);
        task.state = TaskState::Running;
        task.started = Some(self.clock.now_ms());
        self.save_task(task).await;
        send(tx, &task.id, self.clock.now_ms(), Event::Started);
        Ok(())
    }

    /// What the runtime is asked to create for the step, from image `image_id` (the id, not
    /// the tag: what was checked is what runs).
    fn container_spec(&self, task: &TaskRecord, step: &Step, image_id: String) -> ContainerSpec {
        let (v, spec) = (&step.v, &step.spec);
        let mut labels = self.base_labels(&task.job, task.uid);
        labels.insert(LABEL_TASK.to_owned(), task.id.clone());
        if let Some(n) = &v.name {
            labels.insert(super::LABEL_NAME.to_owned(), n.clone());
        }
        let as_user = v.identity.uid != 0;
        ContainerSpec {
            name: format!("step-{}-{}", task.step, task.id),
            image: image_id,
            command: spec.command.clone(),
            env: spec.env.clone(),
            working_dir: spec.workdir.clone(),
            mounts: step.mounts.clone(),
            devices: v.devices.clone(),
            cdi_devices: v.cdi_devices.clone(),
            labels,
            log_path: task
                .log_path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            run_as_user: Some(v.identity.uid),
            run_as_group: Some(v.identity.gid),
            readonly_rootfs: spec.readonly_rootfs,
            supplemental_groups: v.identity.supplementary(),
            // A step as a user gets that user's rights and no more: setuid binaries and file
            // capabilities in the image raise nothing, and no capability is kept.
            no_new_privileges: as_user,
            drop_all_capabilities: as_user,
            resources: v.resources.clone(),
        }
    }

    /// Records how long a launch stage took (`cimage_launch_duration_seconds{stage}`).
    fn stage_time(&self, stage: Stage, since: Instant) {
        self.metrics.observe(
            "cimage_launch_duration_seconds",
            &[("stage", stage.metric_label())],
            since.elapsed().as_secs_f64(),
        );
    }

    /// Creates the job's pod sandbox unless it has one.
    pub(super) async fn ensure_sandbox(
        &self,
        v: &Validated,
    ) -> Result<(JobRecord, String), SandboxError> {
        let _g = self.job_locks.lock(&v.job).await;
        let id = v.job.clone();
        let existing = self.blocking(move |s| s.job(&id)).await?;
        let mut job = match existing {
            // Checked again here, where the job is saved: two launches that both found the id
            // free may race to it, and only the first one's user gets it.
            Some(j) if j.ended.is_none() => {
                may_join(&j, v).map_err(SandboxError::Denied)?;
                j
            }
            _ => JobRecord {
                id: v.job.clone(),
                uid: v.identity.uid,
                creator: v.creator.uid,
                one_off: v.one_off,
                pod: PodSpec {
                    name: format!("cimage-{}", v.job),
                    uid: format!("{:016x}", rand::random::<u64>()),
                    namespace: "cimage".into(),
                    hostname: String::new(),
                    log_directory: self.settings.log_dir.join(&v.job),
                    labels: self.base_labels(&v.job, v.identity.uid),
                    cgroup_parent: v.cgroup_parent.clone(),
                    pod_cgroup: None,
                },
                sandbox_id: None,
                created: self.clock.now_ms(),
                ended: None,
            },
        };
        if let Some(sid) = &job.sandbox_id {
            return Ok((job.clone(), sid.clone()));
        }
        // Off the async workers: the log directory is often on a shared file system.
        let (root, dir) = (self.settings.log_dir.clone(), job.pod.log_directory.clone());
        tokio::task::spawn_blocking(move || super::log_files::make_job_dir(&root, &dir))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|source| SandboxError::LogDir {
                path: job.pod.log_directory.clone(),
                source,
            })?;
        job.pod.pod_cgroup = self.make_pod_cgroup(&job.pod).await?;
        // The job is saved once the pod exists: a pod created just before a crash carries no
        // claim, and the orphan sweep removes it.
        let sid = match self.rt.run_pod(&job.pod).await {
            Ok(sid) => sid,
            Err(e) => {
                self.remove_pod_cgroup(&job.pod).await;
                return Err(e.into());
            }
        };
        job.sandbox_id = Some(sid.clone());
        self.save_job(&job).await?;
        Ok((job, sid))
    }
}

/// What the step's container is checked against.
fn confinement<'a>(step: &'a Step, image: &'a str) -> Confinement<'a> {
    Confinement {
        identity: &step.v.identity,
        ours: &step.mounts,
        image,
    }
}

/// The puller's request for the step's image: a job's use, on behalf of the task's user.
fn ensure_request(task: &TaskRecord, spec: &LaunchSpec) -> EnsureRequest {
    EnsureRequest {
        image: task.image.clone(),
        policy: spec.policy,
        credentials: spec.credentials.clone(),
        origin: Origin::Job,
        requester: Some(task.uid),
        progress: None,
    }
}

/// Whether the step `v` may join the live job `j`: its caller created the job, runs as the
/// job's user, or is an admin; and the step runs as the job's user.
pub(super) fn may_join(j: &JobRecord, v: &Validated) -> Result<(), SpecError> {
    let who = v.creator;
    if !(who.admin || j.creator == who.uid || j.uid == who.uid) {
        // The answer a job that does not exist gets (`end-job`, `ps`): not a word about
        // whether it exists or whose it is.
        return Err(SpecError::NoJob(j.id.clone()));
    }
    if j.uid != v.identity.uid {
        return Err(SpecError::Denied(format!(
            "job {} runs its steps as uid {}; a step for uid {} cannot join it",
            j.id, j.uid, v.identity.uid
        )));
    }
    // The pod was placed by the job's first step; its later steps stay there.
    if let Some(p) = &v.cgroup_parent {
        if j.pod.cgroup_parent.as_ref() != Some(p) {
            return Err(SpecError::Invalid(format!(
                "job {}'s pod is under cgroup parent {}; a later step cannot move it to {p}",
                j.id,
                j.pod
                    .cgroup_parent
                    .as_deref()
                    .unwrap_or("the runtime's default")
            )));
        }
    }
    Ok(())
}
