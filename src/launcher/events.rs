//! What a task reports while it runs: the stage it reached, its output, how it ended.

use super::logs::Chunk;
use crate::puller::Action;

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
}

impl ExitReason {
    /// The name used in events, the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exited => "exited",
            Self::Cancelled => "cancelled",
            Self::ExceededTimeLimit => "ExceededTimeLimit",
        }
    }
}
