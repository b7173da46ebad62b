//! Accepting a step and driving it to a running container: validate → record → pod sandbox →
//! image (through the puller) → create → start. Waiting and cleanup are in `wait` and `cleanup`.

use std::sync::Arc;

use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::devices::CdiSupport;
use super::etc_files::etc_files;
use super::mounts::MountError;
use super::readback::{self, ReadBackRefusal};
use super::request::{Principal, SpecError};
use super::run_as;
use super::spec::{self, LaunchSpec, Rules, Validated};
use super::store::{JobRecord, TaskRecord, TaskState};
use super::{
    send, Event, EventSink, LaunchError, Launcher, SandboxError, Stage, TaskEvent, LABEL_TASK,
};
use crate::cache::Origin;
use crate::puller::EnsureRequest;
use crate::runtime::{ContainerSpec, PodSpec};

impl Launcher {
    /// Accepts a step: validates it (nothing is created if that fails), records it, and runs it
    /// in the background. The receiver gets its lifecycle events and output; dropping it does not
    /// stop the task.
    ///
    /// The acceptance runs as a task of its own: a caller that goes away mid-way (its request
    /// future dropped) leaves either an accepted task or nothing, never mounts staged for a task
    /// that was not recorded.
    pub async fn launch(
        self: &Arc<Self>,
        who: Principal,
        spec: LaunchSpec,
    ) -> Result<(TaskRecord, Receiver<TaskEvent>), LaunchError> {
        let me = Arc::clone(self);
        self.background
            .spawn(async move { me.accept(who, spec).await })
            .await
            .map_err(|e| SpecError::Invalid(format!("the launch was interrupted: {e}")))?
    }

    async fn accept(
        self: Arc<Self>,
        who: Principal,
        spec: LaunchSpec,
    ) -> Result<(TaskRecord, Receiver<TaskEvent>), LaunchError> {
        if !who.admin && !self.settings.allow_user_launch {
            return Err(SpecError::Denied(format!(
                "uid {} may not launch containers on this node: steps start through the \
                 scheduler (a site that lets users run them directly sets \
                 ImageCache.Launcher.AllowUserLaunch: true)",
                who.uid
            ))
            .into());
        }
        let reservation = self.reserve_launch(who)?;
        let users = Arc::clone(&self.users);
        let request = spec.user.clone();
        let (identity, group_names) = tokio::task::spawn_blocking(move || {
            let identity = run_as::resolve_identity(who, request.as_ref(), users.as_ref())?;
            let mut names = Vec::new();
            if identity.uid != 0 {
                for &gid in &identity.groups {
                    let name = users
                        .group_name(gid)
                        .map_err(|e| SpecError::Invalid(e.to_string()))?;
                    names.push((gid, name));
                }
            }
            Ok::<_, SpecError>((identity, names))
        })
        .await
        .map_err(|e| SpecError::Invalid(format!("the user lookup failed: {e}")))??;
        let cdi = match spec.devices.iter().any(|d| d.contains('=')) {
            false => None,
            true => Some(CdiSupport::of(&self.rt.version().await.map_err(
                |source| LaunchError::Runtime {
                    op: "ask the runtime's version (for CDI support)",
                    source,
                },
            )?)),
        };
        let rules = Rules {
            allowed_mount_prefixes: self.settings.allowed_mount_prefixes.clone(),
            allowed_devices: self.settings.allowed_devices.clone(),
            cdi,
            allowed_cgroup_parents: self.settings.allowed_cgroup_parents.clone(),
            any_cgroup_parent: who.admin,
        };
        let mut v = spec::validate(&spec, identity, &rules)?;
        v.creator = who;
        let lock = self.job_lock(&v.job);
        let guard = lock.lock().await;
        let job_id = v.job.clone();
        let (existing, tasks) = self
            .blocking(move |s| Ok((s.job(&job_id)?, s.job_tasks(&job_id)?)))
            .await?;
        // Only a live job claims its id (a job whose first step failed has ended).
        if let Some(j) = existing.as_ref().filter(|j| j.ended.is_none()) {
            may_join(j, &v)?;
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
            return Err(LaunchError::Conflict {
                what: "step",
                id: format!("{step} of job {}", v.job),
                why: "is already running".into(),
            });
        }
        let id = format!("{:012x}", rand::random::<u64>() >> 16);
        // Open, check as the step's user and bind the mount sources now: what is checked is
        // what the container gets, whatever happens to the paths afterwards. A step as a user
        // also gets the host's account of it as /etc/passwd and /etc/group.
        let identity_files = (v.identity.uid != 0).then(|| etc_files(&v.identity, &group_names));
        if !v.mount_requests.is_empty() || identity_files.is_some() {
            let (stager, task_id, requests, identity, prefixes) = (
                Arc::clone(&self.mounts),
                id.clone(),
                v.mount_requests.clone(),
                v.identity.clone(),
                self.settings.allowed_mount_prefixes.clone(),
            );
            let staged = tokio::task::spawn_blocking(move || {
                let mut mounts = stager.stage(&task_id, &requests, &identity, &prefixes)?;
                if let Some((passwd, group)) = identity_files {
                    match stager.identity_files(&task_id, &passwd, &group) {
                        Ok(files) => mounts.extend(files),
                        Err(e) => {
                            let _ = stager.release(&task_id);
                            return Err(e);
                        }
                    }
                }
                Ok(mounts)
            })
            .await
            .map_err(|e| SpecError::Invalid(format!("staging the mounts failed: {e}")))?;
            v.mounts = staged.map_err(|e| match e {
                MountError::Denied { .. } | MountError::Outside { .. } => {
                    SpecError::Denied(e.to_string())
                }
                _ => SpecError::Invalid(e.to_string()),
            })?;
        }
        let task = TaskRecord {
            log_path: self
                .settings
                .log_dir
                .join(&v.job)
                .join(format!("{step}-{id}.log")),
            id,
            job: v.job.clone(),
            step,
            uid: v.identity.uid,
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
        if let Err(e) = self.blocking(move |s| s.put_task(&t)).await {
            self.release_mounts(&task.id).await;
            return Err(e.into());
        }
        drop(guard);
        let cancel = CancellationToken::new();
        self.live
            .lock()
            .unwrap()
            .insert(task.id.clone(), cancel.clone());
        reservation.accept(&task.id);
        let (tx, rx) = EventSink::channel();
        info!(task = %task.id, job = %task.job, step, image = %task.image, uid = task.uid, "task accepted");
        self.background
            .spawn(Arc::clone(&self).run(task.clone(), v, spec, tx, cancel));
        Ok((task, rx))
    }

    async fn run(
        self: Arc<Self>,
        mut task: TaskRecord,
        v: Validated,
        spec: LaunchSpec,
        tx: EventSink,
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

        let sandbox_started = std::time::Instant::now();
        let (job, sandbox_id) = match self.ensure_sandbox(&v).await {
            Ok(x) => x,
            Err(e) => return self.fail(task, Stage::Sandbox, e.to_string(), tx).await,
        };
        self.stage_time(Stage::Sandbox, sandbox_started);
        send(
            tx,
            &task.id,
            self.clock.now_ms(),
            Event::SandboxReady {
                sandbox_id: sandbox_id.clone(),
            },
        );

        let image_started = std::time::Instant::now();
        let clock = Arc::clone(&self.clock);
        let ensure = self.puller.ensure_watched(
            EnsureRequest {
                image: task.image.clone(),
                policy: spec.policy,
                credentials: spec.credentials.clone(),
                origin: Origin::Job,
                requester: Some(task.uid),
                progress: None,
            },
            |p| send(tx, &task.id, clock.now_ms(), Event::ImagePulling(p)),
        );
        let ensured = tokio::select! {
            r = ensure => r,
            _ = cancel.cancelled() => {
                return self.fail_as(task, TaskState::Cancelled, Stage::Image, "cancelled before the container started".into(), tx).await;
            }
        };
        self.stage_time(Stage::Image, image_started);
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

        let create_started = std::time::Instant::now();
        let mut labels = self.base_labels(&task.job, task.uid);
        labels.insert(LABEL_TASK.to_owned(), task.id.clone());
        if let Some(n) = &v.name {
            labels.insert(super::LABEL_NAME.to_owned(), n.clone());
        }
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
            run_as_user: Some(v.identity.uid),
            run_as_group: Some(v.identity.gid),
            readonly_rootfs: spec.readonly_rootfs,
            supplemental_groups: v.identity.supplementary(),
            // A step as a user gets that user's rights and no more: setuid binaries and file
            // capabilities in the image raise nothing, and no capability is kept.
            no_new_privileges: v.identity.uid != 0,
            drop_all_capabilities: v.identity.uid != 0,
            resources: v.resources.clone(),
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
                    requester: Some(task.uid),
                    progress: None,
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
        // Read back before the start; a step as a user also needs a plain /etc in its image.
        // A failure removes the container in the cleanup that follows.
        let checked = match self.rt.inspect_created(&cid, v.identity.uid != 0).await {
            Ok(created) => readback::check_identity(&cid, created.identity, &v.identity)
                .and_then(|()| readback::check_etc(created.etc, &task.image)),
            Err(source) => Err(ReadBackRefusal::Unreadable {
                cid: cid.clone(),
                source,
            }),
        };
        if let Err(refusal) = checked {
            return self
                .fail(task, Stage::Create, refusal.to_string(), tx)
                .await;
        }
        self.stage_time(Stage::Create, create_started);
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
        let start_started = std::time::Instant::now();
        if let Err(e) = self.rt.start_container(&cid).await {
            return self.fail(task, Stage::Start, e.to_string(), tx).await;
        }
        self.stage_time(Stage::Start, start_started);
        task.state = TaskState::Running;
        task.started = Some(self.clock.now_ms());
        self.save_task(&task).await;
        send(tx, &task.id, self.clock.now_ms(), Event::Started);
        self.wait_and_finish(task, tx, cancel).await;
    }

    /// Records how long a launch stage took (`cimage_launch_duration_seconds{stage}`).
    fn stage_time(&self, stage: Stage, since: std::time::Instant) {
        let name = match stage {
            Stage::Sandbox => "sandbox",
            Stage::Image => "image",
            Stage::Create => "create",
            Stage::Start => "start",
            Stage::Wait => "wait",
        };
        self.cache.metrics().observe(
            "cimage_launch_duration_seconds",
            &[("stage", name)],
            since.elapsed().as_secs_f64(),
        );
    }

    /// Creates the job's pod sandbox unless it has one.
    pub(super) async fn ensure_sandbox(
        &self,
        v: &Validated,
    ) -> Result<(JobRecord, String), SandboxError> {
        let lock = self.job_lock(&v.job);
        let _g = lock.lock().await;
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
                },
                sandbox_id: None,
                created: self.clock.now_ms(),
                ended: None,
            },
        };
        if let Some(sid) = &job.sandbox_id {
            return Ok((job.clone(), sid.clone()));
        }
        std::fs::create_dir_all(&job.pod.log_directory).map_err(|source| SandboxError::LogDir {
            path: job.pod.log_directory.clone(),
            source,
        })?;
        // The job is saved once the pod exists: a pod created just before a crash carries no
        // claim, and the orphan sweep removes it.
        let sid = self.rt.run_pod(&job.pod).await?;
        job.sandbox_id = Some(sid.clone());
        self.save_job(&job).await?;
        Ok((job, sid))
    }
}

/// Whether the step `v` may join the live job `j`: its caller created the job, runs as the
/// job's user, or is an admin; and the step runs as the job's user.
fn may_join(j: &JobRecord, v: &Validated) -> Result<(), SpecError> {
    let who = v.creator;
    if !(who.admin || j.creator == who.uid || j.uid == who.uid) {
        // Not a word about whose it is.
        return Err(SpecError::Denied(format!(
            "job {} exists and is not open to uid {}; choose another job id",
            j.id, who.uid
        )));
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
