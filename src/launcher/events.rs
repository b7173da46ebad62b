//! What a task reports while it runs: the stage it reached, its output, how it ended.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

use super::logs::{Chunk, Stream};
use crate::puller::{Action, PullProgress};

/// Events buffered for a client that does not read: beyond this, output is dropped (the step's
/// log file keeps all of it) so that a stalled client cannot make the daemon hold its output.
pub const EVENT_BUFFER: usize = 256;

/// Slots kept for lifecycle events, which are never dropped: output may use the rest.
const LIFECYCLE_RESERVE: usize = 16;

/// Where a task's events go: a bounded channel to the client that launched it.
pub struct EventSink {
    tx: mpsc::Sender<TaskEvent>,
    dropped: AtomicU64,
}

impl EventSink {
    /// A sink and the receiver the client reads.
    pub fn channel() -> (Self, mpsc::Receiver<TaskEvent>) {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        (
            Self {
                tx,
                dropped: AtomicU64::new(0),
            },
            rx,
        )
    }

    /// Whether output may be sent now: the client reads (or is gone, when nothing needs to be
    /// kept for it).
    pub fn has_room_for_output(&self) -> bool {
        self.tx.is_closed() || self.tx.capacity() > LIFECYCLE_RESERVE
    }

    /// Whether the client went away.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Waits up to `limit` for room for output; false if the client did not read meanwhile.
    /// The wait is on the channel itself (its free slots, as the client takes events), not a
    /// poll: room is more free slots than those kept for lifecycle events, or a client gone.
    pub async fn room_for_output(&self, limit: std::time::Duration) -> bool {
        if self.has_room_for_output() {
            return true;
        }
        match tokio::time::timeout(limit, self.tx.reserve_many(LIFECYCLE_RESERVE + 1)).await {
            // The slots go back at once (dropped): room was waited for, not reserved.
            Ok(Ok(_room)) => true,
            // The client went away: nothing needs to be kept for it.
            Ok(Err(_closed)) => true,
            Err(_elapsed) => false,
        }
    }

    /// Counts output that is given up on (the client stopped reading for good).
    pub fn give_up_output(&self, pieces: u64) {
        self.dropped.fetch_add(pieces, Ordering::Relaxed);
    }

    /// Sends an event without ever waiting: output beyond the buffer is dropped and counted,
    /// and the client is told how much once it reads again. Callers that can wait check
    /// [`EventSink::has_room_for_output`] first, so that output is paused rather than dropped.
    pub fn send(&self, task: &str, now: i64, event: Event) {
        // Pull progress is a view of the moment: one a slow client misses is not owed to it.
        if matches!(event, Event::ImagePulling(_)) && self.tx.capacity() <= LIFECYCLE_RESERVE {
            return;
        }
        let is_output = matches!(event, Event::Output(_));
        if is_output && self.tx.capacity() <= LIFECYCLE_RESERVE {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = self.tx.try_send(TaskEvent {
                task_id: task.to_owned(),
                time_ms: now,
                event: Event::Output(Chunk {
                    stream: Stream::Stderr,
                    text: format!(
                        "[cimage: {dropped} pieces of output were not sent because this client \
                         was not reading; `cimage logs {task}` has all of it]\n"
                    ),
                }),
            });
        }
        let _ = self.tx.try_send(TaskEvent {
            task_id: task.to_owned(),
            time_ms: now,
            event,
        });
    }
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
    /// Each stage's two names, in one table: the event that reports it done (used in events,
    /// records and the API) and its label in `cimage_launch_duration_seconds{stage}`.
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Stage::Sandbox => ("SandboxReady", "sandbox"),
            Stage::Image => ("ImageReady", "image"),
            Stage::Create => ("ContainerCreated", "create"),
            Stage::Start => ("Started", "start"),
            Stage::Wait => ("Exited", "wait"),
        }
    }

    /// The name used in events and records.
    pub fn as_str(self) -> &'static str {
        self.names().0
    }

    /// The stage's label in the launch metrics.
    pub fn metric_label(self) -> &'static str {
        self.names().1
    }
}

/// A lifecycle event of a task.
#[derive(Debug, Clone, PartialEq)]
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
    /// The image is being pulled: where the pull is (sent on each change, while it runs).
    ImagePulling(PullProgress),
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
        /// Why it ended.
        reason: ExitReason,
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

/// Why a task's container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// Its process exited (or was killed) by itself.
    Exited,
    /// It was stopped on request (`cancel`, `end-job`).
    Cancelled,
    /// It was stopped at its time limit (Slurm's word for it).
    ExceededTimeLimit,
    /// The kernel killed it for passing its memory limit (Slurm's word for it).
    OutOfMemory,
}

impl ExitReason {
    /// The name used in events, the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exited => "exited",
            Self::Cancelled => "cancelled",
            Self::ExceededTimeLimit => "ExceededTimeLimit",
            Self::OutOfMemory => "OutOfMemory",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn output(n: usize) -> Event {
        Event::Output(Chunk {
            stream: Stream::Stdout,
            text: format!("{n}\n"),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn output_waits_for_a_reader_and_gives_up_on_one_that_does_not_read() {
        let (sink, mut rx) = EventSink::channel();
        for n in 0..EVENT_BUFFER {
            sink.send("t", 0, output(n));
        }
        assert!(!sink.has_room_for_output());
        let start = tokio::time::Instant::now();
        assert!(!sink.room_for_output(Duration::from_secs(10)).await);
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(10),
            "it waited the whole limit"
        );
        // A reader that takes what is held makes room, and the wait ends then.
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            for _ in 0..=LIFECYCLE_RESERVE {
                rx.recv().await.unwrap();
            }
            rx
        });
        let start = tokio::time::Instant::now();
        assert!(sink.room_for_output(Duration::from_secs(10)).await);
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert!(
            sink.has_room_for_output(),
            "the room was not kept by the wait"
        );
        // A client that went away needs no room.
        drop(reader.await.unwrap());
        assert!(sink.room_for_output(Duration::from_secs(10)).await);
    }
}
