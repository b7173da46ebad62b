//! Accepting a step and driving it to a running container: validate → record → pod sandbox →
//! image (through the puller) → create → start. Waiting and cleanup are in `wait` and `cleanup`.

use std::sync::Arc;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::spec::{self, LaunchSpec, Principal, SpecError, Validated};
use super::store::{JobRecord, TaskRecord, TaskState};
use super::{send, Event, LaunchError, Launcher, SandboxError, Stage, TaskEvent, LABEL_TASK};
use crate::cache::Origin;
use crate::puller::EnsureRequest;
use crate::runtime::{ContainerSpec, PodSpec};

impl Launcher {
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
            return Err(LaunchError::Conflict {
                what: "step",
                id: format!("{step} of job {}", v.job),
                why: "is already running".into(),
            });
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
        self.background
            .spawn(Arc::clone(self).run(task.clone(), v, spec, tx, cancel));
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
            Err(e) => return self.fail(task, Stage::Sandbox, e.to_string(), tx).await,
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
    pub(super) async fn ensure_sandbox(
        &self,
        v: &Validated,
    ) -> Result<(JobRecord, String), SandboxError> {
        let lock = self.job_lock(&v.job);
        let _g = lock.lock().await;
        let id = v.job.clone();
        let existing = self.blocking(move |s| s.job(&id)).await?;
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
