//! What callers ask of running and past work: tasks, jobs, output, cancel, ending a job, and the
//! drain before the daemon exits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::{channel, Receiver};
use tracing::info;

use super::history::HistoryCounts;
use super::logs::{Chunk, Tail};
use super::request::{Principal, SpecError};
use super::store::{cancel_key, end_key, JobRecord, TaskRecord, TaskState};
use super::{LaunchError, Launcher};
use crate::runtime::{ExecAttach, ExecOutput, ExecSession};

/// Attached commands (`cimage exec -i/-t`) one uid may have at once.
pub const MAX_EXEC_SESSIONS: usize = 16;

/// One of a uid's [`MAX_EXEC_SESSIONS`] attached commands; given back when dropped (when the
/// session ends).
#[derive(Debug)]
pub struct SessionSlot {
    counts: Arc<Mutex<HashMap<u32, usize>>>,
    uid: u32,
}

impl SessionSlot {
    fn take(counts: &Arc<Mutex<HashMap<u32, usize>>>, uid: u32) -> Option<Self> {
        let mut m = counts.lock().unwrap();
        let n = m.entry(uid).or_default();
        if *n >= MAX_EXEC_SESSIONS {
            return None;
        }
        *n += 1;
        Some(Self {
            counts: Arc::clone(counts),
            uid,
        })
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let mut m = self.counts.lock().unwrap();
        if let Some(n) = m.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

/// Longest a command run in a step (`cimage exec`) may take.
pub const MAX_EXEC_TIME: Duration = Duration::from_secs(3600);

/// Most bytes of each output of a command run in a step that are passed back.
pub const MAX_EXEC_OUTPUT: usize = 4 << 20;

impl Launcher {
    /// A task, if `who` may see it (others' tasks look absent to non-admins).
    pub async fn task(&self, who: Principal, id: &str) -> Result<TaskRecord, LaunchError> {
        let key = id.to_owned();
        match self.blocking(move |s| s.task(&key)).await? {
            Some(t) if Self::visible(who, t.uid) => Ok(t),
            _ => Err(LaunchError::NotFound {
                kind: "task",
                id: id.to_owned(),
            }),
        }
    }

    /// Tasks `who` may see: running ones, or all with `all`. Newest first.
    pub async fn tasks(&self, who: Principal, all: bool) -> Result<Vec<TaskRecord>, LaunchError> {
        let mut tasks: Vec<TaskRecord> = self
            .blocking(move |s| if all { s.tasks() } else { s.live_tasks() })
            .await?
            .into_iter()
            .filter(|t| Self::visible(who, t.uid) && (all || !t.state.is_final()))
            .collect();
        tasks.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
        Ok(tasks)
    }

    /// Jobs `who` may see, with their tasks: those not yet ended (read through the live
    /// index), or with `all` every job history keeps.
    pub async fn jobs(
        &self,
        who: Principal,
        all: bool,
    ) -> Result<Vec<(JobRecord, Vec<TaskRecord>)>, LaunchError> {
        let mut out: Vec<_> = self
            .blocking(move |s| {
                let mut out = Vec::new();
                let jobs = if all { s.jobs()? } else { s.live_jobs()? };
                for j in jobs.into_iter().filter(|j| Self::visible(who, j.uid)) {
                    let ts = s.job_tasks(&j.id)?;
                    out.push((j, ts));
                }
                Ok(out)
            })
            .await?;
        out.sort_by_key(|j| std::cmp::Reverse(j.0.created));
        Ok(out)
    }

    /// Cancels a task: the container gets SIGTERM, then SIGKILL after the grace period.
    pub async fn cancel(&self, who: Principal, id: &str) -> Result<TaskRecord, LaunchError> {
        let task = self.task(who, id).await?;
        if task.state.is_final() {
            return Err(LaunchError::Conflict {
                what: "task",
                id: id.to_owned(),
                why: format!("has already finished ({})", task.state.as_str()),
            });
        }
        let token = self.live.lock().unwrap().get(id).cloned();
        let Some(token) = token else {
            return Err(LaunchError::Conflict {
                what: "task",
                id: id.to_owned(),
                why: "is not being run by this daemon".into(),
            });
        };
        // Durable before it is acknowledged: after a crash the next start carries it out.
        let (keys, now) = (vec![cancel_key(id)], self.clock.now_ms());
        self.blocking(move |s| s.put_intents(&keys, now)).await?;
        token.cancel();
        Ok(task)
    }

    /// Task records kept, how many of them are live and how many went since this daemon
    /// started, with the history limits (for status).
    pub async fn history(&self) -> Result<HistoryCounts, LaunchError> {
        let (recorded, live) = self.blocking(|s| s.counts()).await?;
        Ok(HistoryCounts {
            recorded,
            live,
            pruned_since_start: self.tasks_pruned.load(std::sync::atomic::Ordering::Relaxed),
            settings: self.settings.history.clone(),
        })
    }

    /// Runs `cmd` in a running step and waits for it (up to `timeout`, at most
    /// `MAX_EXEC_TIME`). Only the step's owner and root may: the command runs as the step's
    /// process does (its user, capabilities, no_new_privs, seccomp), and each of its outputs is
    /// cut at `MAX_EXEC_OUTPUT`.
    pub async fn exec(
        &self,
        who: Principal,
        id: &str,
        cmd: Vec<String>,
        timeout: Duration,
    ) -> Result<(ExecOutput, bool), LaunchError> {
        if timeout.is_zero() || timeout > MAX_EXEC_TIME {
            return Err(SpecError::Invalid(format!(
                "exec time limit must be between 1s and {}",
                crate::units::format_duration(MAX_EXEC_TIME)
            ))
            .into());
        }
        let cid = self.exec_target(who, id, &cmd).await?;
        info!(
            task = %id,
            uid = who.uid,
            argv0 = ?crate::units::quote_short(&cmd[0]),
            "running a command in a step"
        );
        let mut out = self
            .rt
            .exec_sync(&cid, &cmd, timeout)
            .await
            .map_err(|source| LaunchError::Runtime {
                op: "run a command in the step",
                source,
            })?;
        let cut = out.stdout.len() > MAX_EXEC_OUTPUT || out.stderr.len() > MAX_EXEC_OUTPUT;
        out.stdout.truncate(MAX_EXEC_OUTPUT);
        out.stderr.truncate(MAX_EXEC_OUTPUT);
        Ok((out, cut))
    }

    /// Starts `cmd` in a running step attached to the caller (`cimage exec -i/-t`): with a
    /// terminal or not, with the caller's input or not. Who may, and as whom it runs, as for
    /// [`Launcher::exec`]; the session lasts until the command ends or the caller leaves (the
    /// step's end ends it too).
    pub async fn exec_attach(
        &self,
        who: Principal,
        id: &str,
        cmd: Vec<String>,
        attach: ExecAttach,
    ) -> Result<(ExecSession, SessionSlot), LaunchError> {
        let cid = self.exec_target(who, id, &cmd).await?;
        let slot = SessionSlot::take(&self.exec_sessions, who.uid).ok_or_else(|| {
            LaunchError::Spec(SpecError::Denied(format!(
                "uid {} already has {MAX_EXEC_SESSIONS} attached commands; end one first",
                who.uid
            )))
        })?;
        info!(
            task = %id,
            uid = who.uid,
            argv0 = ?crate::units::quote_short(&cmd[0]),
            tty = attach.tty,
            stdin = attach.stdin,
            "attaching a command to a step"
        );
        let session = self
            .rt
            .exec_attach(&cid, &cmd, attach)
            .await
            .map_err(|source| LaunchError::Runtime {
                op: "run a command in the step",
                source,
            })?;
        Ok((session, slot))
    }

    /// The container of running step `id`, if `who` may run commands in it (its owner or
    /// root) and `cmd` is a command.
    async fn exec_target(
        &self,
        who: Principal,
        id: &str,
        cmd: &[String],
    ) -> Result<String, LaunchError> {
        if cmd.is_empty() || cmd.iter().any(|a| a.contains('\0')) {
            return Err(
                SpecError::Invalid("exec needs a command, without NUL bytes".into()).into(),
            );
        }
        let task = self.task(who, id).await?;
        if who.uid != 0 && who.uid != task.uid {
            return Err(SpecError::Denied(format!(
                "only the owner of task {id} (uid {}) and root may run commands in it",
                task.uid
            ))
            .into());
        }
        match (&task.container_id, task.state) {
            (Some(c), TaskState::Running) => Ok(c.clone()),
            _ => Err(LaunchError::Conflict {
                what: "task",
                id: id.to_owned(),
                why: format!("is not running ({})", task.state.as_str()),
            }),
        }
    }

    /// Ends a job: cancels its running steps, waits for them (up to the grace period and a
    /// margin), and removes its pod.
    pub async fn end_job(&self, who: Principal, id: &str) -> Result<JobRecord, LaunchError> {
        let id = &super::spec::scoped_job_id(who, id);
        let key = id.to_owned();
        let (job, tasks) = self
            .blocking(move |s| Ok((s.job(&key)?, s.job_tasks(&key)?)))
            .await?;
        let job = match job {
            Some(j) if Self::visible(who, j.uid) => j,
            _ => {
                return Err(LaunchError::NotFound {
                    kind: "job",
                    id: id.to_owned(),
                })
            }
        };
        let running: Vec<String> = tasks
            .iter()
            .filter(|t| t.job == job.id && !t.state.is_final())
            .map(|t| t.id.clone())
            .collect();
        // The end and its cancels are durable before anything is stopped.
        let mut keys: Vec<String> = running.iter().map(|t| cancel_key(t)).collect();
        keys.push(end_key(&job.id));
        let now = self.clock.now_ms();
        self.blocking(move |s| s.put_intents(&keys, now)).await?;
        for t in &running {
            if let Some(token) = self.live.lock().unwrap().get(t) {
                token.cancel();
            }
        }
        // Wait for the steps to finish their cleanup (bounded by the grace period and a
        // margin), woken whenever a task leaves the live set.
        let deadline =
            tokio::time::Instant::now() + self.settings.stop_grace + Duration::from_secs(5);
        loop {
            let changed = self.live_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let any_live = {
                let live = self.live.lock().unwrap();
                running.iter().any(|t| live.contains_key(t))
            };
            if !any_live || tokio::time::timeout_at(deadline, changed).await.is_err() {
                break;
            }
        }
        let _g = self.job_locks.lock(&job.id).await;
        let key = id.to_owned();
        let mut job = self.blocking(move |s| s.job(&key)).await?.unwrap_or(job);
        self.teardown_pod(&mut job).await;
        job.ended = Some(self.clock.now_ms());
        self.save_job(&job).await?;
        info!(job = %job.id, "job ended");
        Ok(job)
    }

    /// A task's output so far; with `follow`, keeps sending until the task has finished (or
    /// the daemon shuts down).
    pub async fn logs(
        self: &Arc<Self>,
        who: Principal,
        id: &str,
        follow: bool,
        last: Option<u32>,
    ) -> Result<Receiver<Chunk>, LaunchError> {
        let task = self.task(who, id).await?;
        // Bounded: a client that stops reading pauses the reading of the file, nothing piles up.
        let (tx, rx) = channel(64);
        let me = Arc::clone(self);
        self.background.spawn(async move {
            let mut tail = match last {
                None => Tail::default(),
                Some(n) => {
                    let path = task.log_path.clone();
                    tokio::task::spawn_blocking(move || Tail::last_lines(&path, n))
                        .await
                        .unwrap_or_default()
                }
            };
            loop {
                for c in tail.read_off_thread(&task.log_path).await {
                    if tx.send(c).await.is_err() {
                        return;
                    }
                }
                if tail.has_more() {
                    continue;
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
                    loop {
                        for c in tail.read_off_thread(&task.log_path).await {
                            if tx.send(c).await.is_err() {
                                return;
                            }
                        }
                        if !tail.has_more() {
                            return;
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = tx.closed() => return,
                    _ = me.background.shutting_down() => return,
                }
            }
        });
        Ok(rx)
    }
}
