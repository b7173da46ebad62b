//! The sub-sections of `ImageCache` (image service, auth, eviction, history, pre-warm,
//! launcher, per-registry settings) and the choices some keys take.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::de::{de_duration, de_opt_duration, de_opt_size, de_size};
use super::defaults::*;

/// The `ImageCache.ImageService` section: cimaged as the node's CRI image endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ImageServiceConfig {
    /// Serve `runtime.v1.ImageService` (default on).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Its unix socket (mode 0600, root only).
    #[serde(default = "default_image_service_socket")]
    pub socket: PathBuf,
    /// The runtime's image endpoint cimaged itself talks to. Unset: `Container.ImageEndpoint`,
    /// unless that names `Socket` (a config shared with Craned), then `Container.RuntimeEndpoint`.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Connections served at once on the socket; more wait to be accepted until one closes.
    #[serde(default = "default_image_service_max_connections")]
    pub max_connections: usize,
}

impl Default for ImageServiceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            socket: default_image_service_socket(),
            upstream: None,
            max_connections: DEFAULT_IMAGE_SERVICE_MAX_CONNECTIONS,
        }
    }
}

/// The `ImageCache.ParallelFetch` section: cimage fetches big layer blobs itself, several range
/// requests per blob, into the runtime's content store before the runtime's pull finds them.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ParallelFetchConfig {
    /// `auto` (where the runtime answers containerd's content API), `true`, or `false`.
    #[serde(default)]
    pub enabled: ParallelFetchEnabled,
    /// HTTP connections one pull's fetch uses at most.
    #[serde(default = "default_fetch_connections_per_pull")]
    pub connections_per_pull: usize,
    /// HTTP connections all fetches from one registry use at most.
    #[serde(default = "default_fetch_connections_per_registry")]
    pub connections_per_registry: usize,
    /// Bytes per range request, at most.
    #[serde(default = "default_fetch_segment_size", deserialize_with = "de_size")]
    pub segment_size: u64,
    /// Layers smaller than this are left to the runtime.
    #[serde(default = "default_fetch_min_blob_size", deserialize_with = "de_size")]
    pub min_blob_size: u64,
    /// Bytes one pull's fetch holds in memory at most (fetched ahead, not yet written).
    #[serde(
        default = "default_fetch_max_buffer_per_pull",
        deserialize_with = "de_size"
    )]
    pub max_buffer_per_pull: u64,
}

impl Default for ParallelFetchConfig {
    fn default() -> Self {
        Self {
            enabled: ParallelFetchEnabled::default(),
            connections_per_pull: DEFAULT_FETCH_CONNECTIONS_PER_PULL,
            connections_per_registry: DEFAULT_FETCH_CONNECTIONS_PER_REGISTRY,
            segment_size: DEFAULT_FETCH_SEGMENT_SIZE,
            min_blob_size: DEFAULT_FETCH_MIN_BLOB_SIZE,
            max_buffer_per_pull: DEFAULT_FETCH_MAX_BUFFER_PER_PULL,
        }
    }
}

/// `ImageCache.ParallelFetch.Enabled`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ParallelFetchEnabled {
    /// Where the runtime answers containerd's content API.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// The same, and a runtime without it is reported.
    #[serde(rename = "true")]
    True,
    /// Never.
    #[serde(rename = "false")]
    False,
}

/// `ImageCache.OnRegistryUnavailable`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum OnRegistryUnavailable {
    /// The request fails.
    #[default]
    Fail,
    /// The cached copy is served unchecked.
    UseCached,
}

/// `ImageCache.DefaultPullPolicy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum DefaultPullPolicy {
    /// IfNotPresent for every reference.
    #[default]
    IfNotPresent,
    /// Always for every tag.
    Always,
    /// Always for `:latest` and untagged references, IfNotPresent for other tags.
    ByTag,
}

/// The `ImageCache.Auth` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct AuthSection {
    /// When a cached image needs the request to prove access: `IfPulledWithCredentials`
    /// (default), `Always` or `Never`.
    #[serde(default)]
    pub verify: VerifyMode,
    /// docker config.json / podman auth.json files with the node's own credentials, tried in
    /// order, for pre-warm runs and requests without credentials.
    #[serde(default)]
    pub config_files: Vec<PathBuf>,
    /// Registry host → docker credential helper name (run as `docker-credential-NAME get`).
    #[serde(default)]
    pub credential_helpers: BTreeMap<String, String>,
}

/// `ImageCache.Auth.Verify`: when a cached image needs the request to prove access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum VerifyMode {
    /// Only images first pulled with credentials (the default).
    #[default]
    IfPulledWithCredentials,
    /// Every image, anonymous ones included.
    Always,
    /// Never: every cached image is served to every request.
    Never,
}

/// The `ImageCache.Eviction` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct EvictionConfig {
    /// Eviction on or off (on by default: the watermarks protect the node's disk).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Image filesystem usage (percent) above which images are evicted.
    #[serde(default = "default_high_percent")]
    pub high_percent: f64,
    /// Usage (percent) eviction brings the filesystem down to.
    #[serde(default = "default_low_percent")]
    pub low_percent: f64,
    /// Bound on the total size of indexed images (e.g. `50GiB`); unset for none.
    #[serde(default, deserialize_with = "de_opt_size")]
    pub max_bytes: Option<u64>,
    /// Images younger than this are never evicted.
    #[serde(default = "default_min_age", deserialize_with = "de_duration")]
    pub min_age: Duration,
    /// Images unused this long are evicted regardless of pressure; unset for never.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub max_unused_age: Option<Duration>,
    /// Watch this path's filesystem instead of the one the runtime reports for images.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

impl Default for EvictionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            high_percent: default_high_percent(),
            low_percent: default_low_percent(),
            max_bytes: None,
            min_age: default_min_age(),
            max_unused_age: None,
            path: None,
        }
    }
}

/// The `ImageCache.History` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct HistoryConfig {
    /// Finished tasks and ended jobs older than this are removed (e.g. `7d`).
    #[serde(default = "default_history_keep", deserialize_with = "de_duration")]
    pub keep: Duration,
    /// At most this many task records are kept; the oldest finished ones go first.
    #[serde(default = "default_history_max_tasks")]
    pub max_tasks: u64,
    /// Keep the log files of removed tasks (default: they go with their records).
    #[serde(default)]
    pub keep_logs: bool,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            keep: default_history_keep(),
            max_tasks: default_history_max_tasks(),
            keep_logs: false,
        }
    }
}

/// The `ImageCache.Prewarm` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct PrewarmConfig {
    /// Half-life of the decayed use counts that rank images for `Top: N`.
    #[serde(default = "default_half_life", deserialize_with = "de_duration")]
    pub popularity_half_life: Duration,
    /// How long an image that left the node keeps its place in the ranking after its last use
    /// (it is also forgotten once its score decays below 0.01).
    #[serde(
        default = "default_forget_absent_after",
        deserialize_with = "de_duration"
    )]
    pub forget_absent_after: Duration,
    /// Schedules defined by the node's configuration.
    #[serde(default)]
    pub schedules: Vec<ScheduleConfig>,
}

impl Default for PrewarmConfig {
    fn default() -> Self {
        Self {
            popularity_half_life: default_half_life(),
            forget_absent_after: default_forget_absent_after(),
            schedules: Vec::new(),
        }
    }
}

/// One pre-warm schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Unique name.
    pub name: String,
    /// Crontab expression: 5 fields (minute hour day month weekday), or 6 with seconds first.
    pub cron: String,
    /// IANA time zone the expression is read in (default UTC).
    #[serde(default)]
    pub time_zone: Option<String>,
    /// Images to keep warm.
    #[serde(default)]
    pub images: Vec<String>,
    /// Also keep the N most popular images on this node warm.
    #[serde(default)]
    pub top: Option<usize>,
    /// Random delay up to this long before a run starts.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub jitter: Option<Duration>,
    /// Images pulled at once within a run (default 2).
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Run once after a start if a fire was missed while cimaged was down.
    #[serde(default)]
    pub catch_up: bool,
}

/// The `ImageCache.Launcher` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct LauncherConfig {
    /// Host directories under which job mounts may lie (checked after resolving symlinks and `..`).
    /// Empty: no host mounts at all.
    #[serde(default)]
    pub allowed_mount_prefixes: Vec<PathBuf>,
    /// Time between SIGTERM and SIGKILL when a task is cancelled or exceeds its time limit.
    #[serde(
        default = "default_stop_grace_period",
        deserialize_with = "de_duration"
    )]
    pub stop_grace_period: Duration,
    /// Where step logs go (one directory per job); relative to `CraneBaseDir`. Default:
    /// `Container.TempDir`.
    #[serde(default)]
    pub log_dir: Option<PathBuf>,
    /// Devices steps may have: absolute device paths and globs (`/dev/nvidia*`), matched against
    /// the resolved device node, and CDI names (`nvidia.com/gpu=*`) on runtimes with CDI.
    /// Empty (the default): no devices.
    #[serde(default)]
    pub allowed_devices: Vec<String>,
    /// Whether users who are neither root nor in `AdminGroup` may launch containers through
    /// cimage directly (outside the scheduler). Default false: they may pull, list and follow
    /// their own tasks only.
    #[serde(default)]
    pub allow_user_launch: bool,
    /// Launches one user (not root, not `AdminGroup`) may have in flight at once.
    #[serde(default = "default_max_launches_per_user")]
    pub max_launches_per_user: usize,
    /// Cgroup parents any launching caller may place a job's pod under: absolute cgroup paths
    /// (a parent and everything below it) or systemd slice names (a slice and those named
    /// after it, `crane.slice` → `crane-job_42.slice`). Root and `AdminGroup` may use any.
    #[serde(default)]
    pub allowed_cgroup_parents: Vec<String>,
    /// A step's log file is rotated once it is larger than this (checked every few seconds
    /// while the step runs, so a fast writer may pass it by what it writes meanwhile).
    #[serde(default = "default_max_log_size", deserialize_with = "de_size")]
    pub max_log_size: u64,
    /// Log files a step keeps, the one being written included (at least 2); the oldest
    /// rotated one goes first.
    #[serde(default = "default_max_log_files")]
    pub max_log_files: usize,
    /// Bound on all step logs under the log directory; past it the logs of the steps that
    /// finished first are removed (running steps' logs never).
    #[serde(default = "default_max_log_dir_size", deserialize_with = "de_size")]
    pub max_log_dir_size: u64,
    /// Processes a job's pod may hold, all its steps together (`pids.max` of the pod cgroup
    /// cimage makes under the job's cgroup parent); 0: none of cimage's.
    #[serde(default = "default_pids_limit")]
    pub pids_limit: u64,
}

impl Default for LauncherConfig {
    fn default() -> Self {
        Self {
            allowed_mount_prefixes: Vec::new(),
            stop_grace_period: DEFAULT_STOP_GRACE_PERIOD,
            log_dir: None,
            allowed_devices: Vec::new(),
            allow_user_launch: false,
            max_launches_per_user: DEFAULT_MAX_LAUNCHES_PER_USER,
            allowed_cgroup_parents: Vec::new(),
            max_log_size: DEFAULT_MAX_LOG_SIZE,
            max_log_files: DEFAULT_MAX_LOG_FILES,
            max_log_dir_size: DEFAULT_MAX_LOG_DIR_SIZE,
            pids_limit: DEFAULT_PIDS_LIMIT,
        }
    }
}

/// Settings for one registry host.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct RegistryConfig {
    /// Talk plain HTTP to this registry (test and air-gapped setups only).
    #[serde(default)]
    pub insecure: bool,
    /// How many pulls from this registry may run at once; defaults to `MaxConcurrentPulls`.
    #[serde(default)]
    pub max_concurrent_pulls: Option<usize>,
    /// PEM file of the CA that signed this registry's TLS certificate (trusted for this registry
    /// only, besides the system's roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Mirror hosts tried in order, before this registry, to resolve tags (the runtime needs the
    /// same mirrors in its own configuration to pull through them).
    #[serde(default)]
    pub mirrors: Vec<String>,
}
