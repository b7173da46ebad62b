//! After a (re)start: re-attach the steps still running, finish those that ended or were lost
//! while the daemon was down, and remove pods and containers of this instance that nothing claims.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::request::Principal;
use super::store::{cancel_key, TaskState};
use super::{LaunchError, Launcher, RecoveryReport, Stage, LABEL_JOB};
use crate::runtime::ContainerState;

impl Launcher {
    /// After a (re)start: re-attaches running tasks, finishes those that ended or were lost while
    /// the daemon was down, and removes pods and containers of this instance that no job or task
    /// claims.
    pub async fn recover(self: &Arc<Self>) -> Result<RecoveryReport, LaunchError> {
        let mut report = RecoveryReport::default();
        let (jobs, tasks, intents) = self
            .blocking(|s| Ok((s.live_jobs()?, s.live_tasks()?, s.intents()?)))
            .await?;
        // Ask the runtime everything first: if it cannot answer, nothing is decided and the
        // caller retries later (a task must not be declared lost because containerd was down).
        let rt_err = |op| move |source| LaunchError::Runtime { op, source };
        let ours = self.ours();
        let pods = self
            .rt
            .list_pods(&ours)
            .await
            .map_err(rt_err("list this daemon's pods"))?;
        let containers = self
            .rt
            .list_containers(&ours)
            .await
            .map_err(rt_err("list this daemon's containers"))?;
        let mut statuses = HashMap::new();
        for t in tasks.iter().filter(|t| !t.cleaned) {
            if let Some(cid) = &t.container_id {
                let st = self
                    .rt
                    .container_status(cid)
                    .await
                    .map_err(rt_err("read a re-attached container's status"))?;
                statuses.insert(cid.clone(), st);
            }
        }
        for task in tasks.iter().filter(|t| !t.cleaned) {
            let mut task = task.clone();
            if let Some(img) = &task.image_id {
                let in_use = self.cache.mark_in_use(img);
                self.images_in_use
                    .lock()
                    .unwrap()
                    .insert(task.id.clone(), in_use);
            }
            let status = task
                .container_id
                .as_ref()
                .and_then(|cid| statuses.get(cid).cloned().flatten());
            let cancel = CancellationToken::new();
            let cancel_asked = intents.contains(&cancel_key(&task.id));
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
                    if cancel_asked {
                        // Acknowledged before the stop: carried out now.
                        info!(task = %task.id, "carrying out a cancel asked before the restart");
                        cancel.cancel();
                    }
                    self.live
                        .lock()
                        .unwrap()
                        .insert(task.id.clone(), cancel.clone());
                    let me = Arc::clone(self);
                    self.background
                        .spawn(async move { me.wait_and_finish(task, None, cancel).await });
                    report.reattached += 1;
                }
                _ => {
                    // Where it stopped: the sandbox first, then image and container (which are
                    // not saved on the way; the record says Running once the container runs).
                    let sandbox_ready = jobs
                        .iter()
                        .any(|j| j.id == task.job && j.sandbox_id.is_some() && j.ended.is_none());
                    let stage = if sandbox_ready {
                        Stage::Image
                    } else {
                        Stage::Sandbox
                    };
                    let (state, message) = if cancel_asked {
                        (
                            TaskState::Cancelled,
                            "cancelled before the container started".to_owned(),
                        )
                    } else {
                        (
                            TaskState::Failed,
                            format!(
                                "interrupted: cimaged stopped at {} before the container ran",
                                stage.as_str()
                            ),
                        )
                    };
                    self.fail_as(task, state, stage, message, None).await;
                    report.finished += 1;
                }
            }
        }
        // Jobs whose end was asked before the stop: ended now, in the background (their steps
        // were re-attached with their cancels above).
        for job in intents.iter().filter_map(|k| k.strip_prefix("job:")) {
            info!(job, "carrying out an end-job asked before the restart");
            let (me, job) = (Arc::clone(self), job.to_owned());
            self.background.spawn(async move {
                if let Err(e) = me.end_job(Principal::ROOT, &job).await {
                    warn!(job, "cannot end the job: {e}");
                }
            });
        }
        // Re-read: the cleanups above may have ended jobs and released containers.
        let (jobs, tasks) = self
            .blocking(|s| Ok((s.live_jobs()?, s.live_tasks()?)))
            .await?;
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
        // Mounts staged for tasks that no longer hold them (a crash between staging and the
        // task's record, or during a cleanup).
        let holding: Vec<&str> = tasks
            .iter()
            .filter(|t| !t.cleaned)
            .map(|t| t.id.as_str())
            .collect();
        let stager = Arc::clone(&self.mounts);
        let staged = tokio::task::spawn_blocking(move || stager.staged_tasks())
            .await
            .unwrap_or_default();
        for task in staged.iter().filter(|t| !holding.contains(&t.as_str())) {
            info!(task, "releasing mounts no task holds");
            self.release_mounts(task).await;
        }
        Ok(report)
    }
}
