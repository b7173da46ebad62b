//! Waiting for a running step to exit: status polling (containerd 1.6 has no container events),
//! output forwarding, its log kept within bounds (see `log_budget`), cancel and time limit
//! (SIGTERM, then SIGKILL after the grace period).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::log_budget::LogWatch;
use super::logs::{Chunk, Tail};
use super::store::{TaskRecord, TaskState};
use super::{send, Event, EventSink, ExitReason, Launcher, Stage};
use crate::runtime::{ContainerState, RuntimeError};

/// How long the end of a step's output waits for a client that does not read before it is
/// given up on (it stays in the log: `cimage logs`).
const OUTPUT_PATIENCE: Duration = Duration::from_secs(10);

/// How long a step is followed through a runtime that does not answer (a containerd restart
/// takes seconds; the step runs on in its shim meanwhile) before it is given up as lost.
const RUNTIME_OUTAGE_PATIENCE: Duration = Duration::from_secs(300);

/// Why a running step could no longer be followed.
#[derive(Debug, thiserror::Error)]
enum LostTrack {
    /// The runtime no longer knows the container.
    #[error("container {cid} disappeared from the runtime")]
    Disappeared {
        /// The container.
        cid: String,
    },
    /// The runtime has not answered for [`RUNTIME_OUTAGE_PATIENCE`].
    #[error(
        "lost track of container {cid}: the runtime has not answered for {}: {source}",
        crate::units::format_duration(RUNTIME_OUTAGE_PATIENCE)
    )]
    RuntimeSilent {
        /// The container.
        cid: String,
        /// The last error.
        source: RuntimeError,
    },
    /// The runtime kept failing to say how the container is.
    #[error("lost track of container {cid}: {source}")]
    Failing {
        /// The container.
        cid: String,
        /// The last error.
        source: RuntimeError,
    },
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
    /// Waits for the container to exit (stopping it on cancel or at the time limit), records
    /// the exit, and cleans up. Also used for tasks re-attached after a restart.
    pub(super) async fn wait_and_finish(
        &self,
        mut task: TaskRecord,
        tx: Option<&EventSink>,
        cancel: CancellationToken,
    ) {
        let cid = task
            .container_id
            .clone()
            .expect("a running task has a container");
        let deadline = task.timeout_ms.map(|limit| {
            let elapsed =
                (self.clock.now_ms() - task.started.unwrap_or(task.created)).max(0) as u64;
            Instant::now() + Duration::from_millis(limit.saturating_sub(elapsed))
        });
        let mut tail = Tail::default();
        let mut log_watch = LogWatch::new();
        let mut stopped_as: Option<TaskState> = None;
        let mut errors = 0;
        let mut outage: Option<Instant> = None;
        let waiting = Instant::now();
        // Output read from the log but not yet taken by the client: reading pauses while the
        // client is behind (the log file keeps everything), so this stays at most one read.
        let mut pending: VecDeque<Chunk> = VecDeque::new();
        let outcome = loop {
            if let Some(sink) = tx {
                self.forward(sink, &task, &mut tail, &mut pending).await;
            }
            match self.rt.container_status(&cid).await {
                Ok(Some(st)) if st.state == ContainerState::Exited => break Ok(st),
                Ok(Some(_)) => {
                    errors = 0;
                    if outage.take().is_some() {
                        info!(task = %task.id, "the runtime answers again; still following the step");
                    }
                    self.keep_log_in_bounds(&task, &cid, &mut log_watch).await;
                }
                Ok(None) => break Err(LostTrack::Disappeared { cid: cid.clone() }),
                // The runtime restarting: the step runs on in its shim; wait for the runtime.
                Err(e) if e.is_transient() => {
                    let since = *outage.get_or_insert_with(|| {
                        warn!(task = %task.id, "the runtime is not answering ({e}); waiting for it");
                        Instant::now()
                    });
                    if since.elapsed() > RUNTIME_OUTAGE_PATIENCE {
                        break Err(LostTrack::RuntimeSilent {
                            cid: cid.clone(),
                            source: e,
                        });
                    }
                }
                Err(e) => {
                    errors += 1;
                    if errors >= 50 {
                        break Err(LostTrack::Failing {
                            cid: cid.clone(),
                            source: e,
                        });
                    }
                }
            }
            let far = Instant::now() + Duration::from_secs(86400 * 365);
            let pause = match outage {
                Some(_) => crate::runtime::OUTAGE_POLL,
                None => poll_interval(waiting.elapsed()),
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
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
                _ = self.background.shutting_down() => {
                    // The step is the user's, not the daemon's: it keeps running, and the next
                    // start re-attaches it (its record says Running).
                    info!(task = %task.id, "cimaged is shutting down; the step keeps running");
                    self.forget_live(&task.id);
                    return;
                }
            }
        };
        if let Some(sink) = tx {
            // The rest of the output, waiting (a bounded time) for a client that is behind.
            loop {
                self.forward(sink, &task, &mut tail, &mut pending).await;
                if pending.is_empty() && !tail.has_more() {
                    break;
                }
                if !sink.room_for_output(OUTPUT_PATIENCE).await {
                    sink.give_up_output(pending.len() as u64);
                    break;
                }
            }
        }
        task.finished = Some(self.clock.now_ms());
        match outcome {
            Ok(st) => {
                task.exit_code = Some(st.exit_code);
                task.signal = signal_of(st.exit_code);
                // The kernel's OOM killer says so through the runtime's reason.
                let oom = st.reason == "OOMKilled";
                task.state = match stopped_as {
                    Some(s) => s,
                    None if oom => TaskState::OutOfMemory,
                    None => TaskState::Exited,
                };
                let reason = match task.state {
                    TaskState::Cancelled => ExitReason::Cancelled,
                    TaskState::TimedOut => ExitReason::ExceededTimeLimit,
                    TaskState::OutOfMemory => ExitReason::OutOfMemory,
                    _ => ExitReason::Exited,
                };
                info!(task = %task.id, exit_code = st.exit_code, reason = reason.as_str(), "task finished");
                self.save_task(&task).await;
                send(
                    tx,
                    &task.id,
                    self.clock.now_ms(),
                    Event::Exited {
                        exit_code: st.exit_code,
                        signal: task.signal,
                        reason,
                    },
                );
                self.cleanup(task, tx).await;
            }
            Err(lost) => {
                // Another waiter (a re-attach racing a slow shutdown) may have finished the task
                // and removed the container; its record stands.
                let id = task.id.clone();
                if let Ok(Some(t)) = self.blocking(move |s| s.task(&id)).await {
                    if t.state.is_final() {
                        self.forget_live(&task.id);
                        return;
                    }
                }
                self.fail(task, Stage::Wait, lost.to_string(), tx).await
            }
        }
    }

    /// Sends what output the client has room for, reading more from the log only when
    /// nothing is pending.
    async fn forward(
        &self,
        sink: &EventSink,
        task: &TaskRecord,
        tail: &mut Tail,
        pending: &mut VecDeque<Chunk>,
    ) {
        if sink.is_closed() {
            pending.clear();
            return;
        }
        if pending.is_empty() && sink.has_room_for_output() {
            pending.extend(tail.read_off_thread(&task.log_path).await);
        }
        while sink.has_room_for_output() {
            let Some(chunk) = pending.pop_front() else {
                break;
            };
            sink.send(&task.id, self.clock.now_ms(), Event::Output(chunk));
        }
    }

    async fn stop(&self, cid: &str) {
        if let Err(e) = self.rt.stop_container(cid, self.settings.stop_grace).await {
            warn!(container = cid, "stopping failed: {e}");
        }
    }
}
