//! Ending a step: recording a failure, removing its container, releasing its image and, when
//! the job ends with it, tearing its pod down (and the pod cgroup cimage made for it, which is
//! made here too). Safe to run again after a crash.

use std::sync::Arc;

use tracing::warn;

use super::pod_cgroup;
use super::store::{JobRecord, TaskRecord, TaskState};
use super::{send, Event, EventSink, Launcher, SandboxError, Stage};
use crate::runtime::PodSpec;

impl Launcher {
    pub(super) async fn fail(
        &self,
        task: TaskRecord,
        stage: Stage,
        message: String,
        tx: Option<&EventSink>,
    ) {
        self.fail_as(task, TaskState::Failed, stage, message, tx)
            .await
    }

    pub(super) async fn fail_as(
        &self,
        mut task: TaskRecord,
        state: TaskState,
        stage: Stage,
        message: String,
        tx: Option<&EventSink>,
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

    /// Removes the container, releases the image, and tears the pod down when the job ends with
    /// this task (a one-off job), or when the pod was made for a step that never got a container
    /// and no other step of the job is running. Safe to run again after a crash.
    pub(super) async fn cleanup(&self, mut task: TaskRecord, tx: Option<&EventSink>) {
        if let Some(cid) = &task.container_id {
            if let Err(e) = self.rt.remove_container(cid).await {
                warn!(task = %task.id, "removing container {cid} failed: {e}");
            }
        }
        self.images_in_use.lock().unwrap().remove(&task.id);
        self.release_mounts(&task.id).await;
        task.cleaned = true;
        self.metrics
            .inc("cimage_tasks_total", &[("state", task.state.as_str())]);
        let job_id = task.job.clone();
        {
            let _g = self.job_locks.lock(&job_id).await;
            let (job, tasks) = match self
                .blocking(move |s| Ok((s.job(&job_id)?, s.job_tasks(&job_id)?)))
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
                let never_started = task.started.is_none();
                let others_ever = tasks.iter().any(|t| t.job == job.id && t.id != task.id);
                if job.ended.is_none() && (job.one_off || (never_started && !others_live)) {
                    self.teardown_pod(&mut job).await;
                    // A job whose only step never started leaves no claim on its id.
                    if job.one_off || !others_ever {
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
        self.forget_live(&task.id);
        send(tx, &task.id, self.clock.now_ms(), Event::CleanedUp);
    }

    pub(super) async fn teardown_pod(&self, job: &mut JobRecord) {
        if let Some(sid) = job.sandbox_id.take() {
            if let Err(e) = self.rt.stop_pod(&sid).await {
                warn!(job = %job.id, "stopping pod {sid} failed: {e}");
            }
            if let Err(e) = self.rt.remove_pod(&sid).await {
                warn!(job = %job.id, "removing pod {sid} failed: {e}");
                // Keep the id so the next sweep tries again.
                job.sandbox_id = Some(sid);
                return;
            }
            self.remove_pod_cgroup(&job.pod).await;
        }
    }

    /// Makes the pod cgroup of `pod` with the node's process limit, when there is one and the
    /// pod's parent is not a systemd slice: the cgroup to give the runtime as its parent.
    pub(super) async fn make_pod_cgroup(
        &self,
        pod: &PodSpec,
    ) -> Result<Option<String>, SandboxError> {
        let limit = self.settings.pids_limit;
        if limit == 0 {
            return Ok(None);
        }
        let Some(path) = pod_cgroup::pod_cgroup(pod.cgroup_parent.as_deref(), &pod.uid) else {
            warn!(
                pod = %pod.name,
                "the pod's cgroup parent is a systemd slice: its TasksMax, not \
                 Launcher.PidsLimit, bounds its processes"
            );
            return Ok(None);
        };
        let (root, p) = (self.settings.cgroup_root.clone(), path.clone());
        tokio::task::spawn_blocking(move || root.create(&p, limit))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|source| SandboxError::PodCgroup {
                path: path.clone(),
                source,
            })?;
        Ok(Some(path))
    }

    /// Removes the pod cgroup cimage made for `pod`, if any (once the pod is gone).
    pub(super) async fn remove_pod_cgroup(&self, pod: &PodSpec) {
        if let Some(path) = pod.pod_cgroup.clone() {
            let root = self.settings.cgroup_root.clone();
            let _ = tokio::task::spawn_blocking(move || root.remove(&path)).await;
        }
    }

    /// Unbinds the task's staged mounts (once its container is gone).
    pub(super) async fn release_mounts(&self, task: &str) {
        let (stager, id) = (Arc::clone(&self.mounts), task.to_owned());
        match tokio::task::spawn_blocking(move || stager.release(&id)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(task, "{e}"),
            Err(e) => warn!(task, "releasing the mounts failed: {e}"),
        }
    }
}
