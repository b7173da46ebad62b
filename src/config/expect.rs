//! The `ImageCache.Expect` and `ImageCache.Queue` sections: images expected on the node, and the
//! scheduler's queue that says which.

use std::time::Duration;

use serde::Deserialize;

use super::de::de_duration;
use super::defaults::*;

/// The `ImageCache.Expect` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ExpectConfig {
    /// An expectation ends this long after its deadline (default 1h).
    #[serde(default = "default_expect_grace", deserialize_with = "de_duration")]
    pub grace: Duration,
    /// Expectations one ordinary uid may hold at once (default 16).
    #[serde(default = "default_expect_max_per_user")]
    pub max_per_user: usize,
}

impl Default for ExpectConfig {
    fn default() -> Self {
        Self {
            grace: DEFAULT_EXPECT_GRACE,
            max_per_user: DEFAULT_EXPECT_MAX_PER_USER,
        }
    }
}

fn default_expect_grace() -> Duration {
    DEFAULT_EXPECT_GRACE
}

fn default_expect_max_per_user() -> usize {
    DEFAULT_EXPECT_MAX_PER_USER
}

/// `ImageCache.Queue.Source`: where the jobs planned on this node come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueSourceKind {
    /// No queue source (default): only `cimage expect` makes expectations.
    #[default]
    None,
    /// Slurm's `squeue` and `scontrol`, run as root.
    Slurm,
    /// A site's command (`Queue.Command`) printing one JSON object a line.
    Command,
}

/// The `ImageCache.Queue` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct QueueConfig {
    /// `none` (default), `slurm` or `command`.
    #[serde(default)]
    pub source: QueueSourceKind,
    /// How often the source is asked (default 15s).
    #[serde(default = "default_queue_interval", deserialize_with = "de_duration")]
    pub interval: Duration,
    /// Jobs planned to start further ahead are not expected yet (default 2h).
    #[serde(default = "default_queue_horizon", deserialize_with = "de_duration")]
    pub horizon: Duration,
    /// This node's name in the scheduler (default: the host's short name).
    #[serde(default)]
    pub node_name: Option<String>,
    /// For `Source: command`: the program and its arguments.
    #[serde(default)]
    pub command: Vec<String>,
    /// A look at the queue that takes longer fails (default 30s).
    #[serde(default = "default_queue_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            source: QueueSourceKind::None,
            interval: DEFAULT_QUEUE_INTERVAL,
            horizon: DEFAULT_QUEUE_HORIZON,
            node_name: None,
            command: Vec::new(),
            timeout: DEFAULT_QUEUE_TIMEOUT,
        }
    }
}

fn default_queue_interval() -> Duration {
    DEFAULT_QUEUE_INTERVAL
}

fn default_queue_horizon() -> Duration {
    DEFAULT_QUEUE_HORIZON
}

fn default_queue_timeout() -> Duration {
    DEFAULT_QUEUE_TIMEOUT
}
