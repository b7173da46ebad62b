//! cimaged's configuration: a YAML file in CraneSched's style (PascalCase keys).
//!
//! The file may be CraneSched's whole `/etc/crane/config.yaml`: top-level sections that cimage does
//! not know are ignored, but unknown keys inside `Container` and `ImageCache` are errors, so a typo
//! never silently falls back to a default. Errors name the key and its line and column.
//!
//! This file owns the top of the model (the file, `Container`, `ImageCache`); the sections
//! below `ImageCache` are in `sections.rs`, every default in `defaults.rs`, the readers of
//! durations and sizes in `de.rs`, and the checks and resolved paths in `validate.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

mod de;
mod defaults;
mod expect;
pub mod reference;
mod sections;
#[cfg(test)]
mod tests;
mod validate;

use de::{de_duration, de_size};
use defaults::*;
pub use defaults::{
    DEFAULT_CONNECTION_IDLE_TIMEOUT, DEFAULT_CRANE_BASE_DIR, DEFAULT_FORGET_ABSENT_AFTER,
    DEFAULT_HIGH_PERCENT, DEFAULT_HISTORY_KEEP, DEFAULT_HISTORY_MAX_TASKS,
    DEFAULT_IMAGE_SERVICE_MAX_CONNECTIONS, DEFAULT_IMAGE_SERVICE_SOCKET, DEFAULT_LOW_PERCENT,
    DEFAULT_MAX_CONCURRENT_PULLS, DEFAULT_MAX_CONNECTIONS_PER_ADMIN,
    DEFAULT_MAX_CONNECTIONS_PER_USER, DEFAULT_MAX_LAUNCHES_PER_USER, DEFAULT_MAX_LOG_DIR_SIZE,
    DEFAULT_MAX_LOG_FILES, DEFAULT_MAX_LOG_SIZE, DEFAULT_MAX_PULLS_PER_USER,
    DEFAULT_MAX_REQUEST_BYTES_PER_ADMIN, DEFAULT_MAX_REQUEST_BYTES_PER_USER, DEFAULT_MIN_AGE,
    DEFAULT_NODE_KEY_FILE, DEFAULT_PIDS_LIMIT, DEFAULT_POPULARITY_HALF_LIFE, DEFAULT_PRESENCE_TTL,
    DEFAULT_PREWARM_CONCURRENCY, DEFAULT_PULL_RESOLVE_TIMEOUT, DEFAULT_PULL_RETRIES,
    DEFAULT_PULL_STALL_TIMEOUT, DEFAULT_PULL_TIMEOUT, DEFAULT_RECONCILE_INTERVAL,
    DEFAULT_REQUEST_READ_TIMEOUT, DEFAULT_RUNTIME_TIMEOUT, DEFAULT_SOCKET, DEFAULT_STATE_DIR,
    DEFAULT_STOP_GRACE_PERIOD, DEFAULT_TEMP_DIR,
};
pub use defaults::{
    DEFAULT_EXPECT_GRACE, DEFAULT_EXPECT_MAX_PER_USER, DEFAULT_QUEUE_HORIZON,
    DEFAULT_QUEUE_INTERVAL, DEFAULT_QUEUE_TIMEOUT,
};
pub use defaults::{
    DEFAULT_FETCH_CONNECTIONS_PER_PULL, DEFAULT_FETCH_CONNECTIONS_PER_REGISTRY,
    DEFAULT_FETCH_MAX_BUFFER_PER_PULL, DEFAULT_FETCH_MIN_BLOB_SIZE, DEFAULT_FETCH_SEGMENT_SIZE,
};
pub use expect::{ExpectConfig, QueueConfig, QueueSourceKind};
pub use sections::{
    AuthSection, DefaultPullPolicy, EvictionConfig, HistoryConfig, ImageServiceConfig,
    LauncherConfig, OnRegistryUnavailable, ParallelFetchConfig, ParallelFetchEnabled,
    PrewarmConfig, RegistryConfig, ScheduleConfig, VerifyMode,
};
pub use validate::{load, parse, ConfigError, Settings};
/// The whole configuration file. Only the sections cimage reads are modelled.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Config {
    /// Base directory that relative paths (`Container.TempDir`, `ImageCache.StateDir`) hang off.
    #[serde(default = "default_crane_base_dir")]
    pub crane_base_dir: PathBuf,
    /// CraneSched's container section: whether container support is on and where the runtime is.
    pub container: Option<ContainerConfig>,
    /// cimage's own section.
    #[serde(default)]
    pub image_cache: ImageCacheConfig,
}

/// CraneSched's `Container` section, with the seed's keys and defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ContainerConfig {
    /// Container support on this node; cimaged refuses to start when it is off.
    #[serde(default)]
    pub enabled: bool,
    /// Scratch directory for container tasks, relative to `CraneBaseDir` unless absolute.
    #[serde(default = "default_temp_dir")]
    pub temp_dir: PathBuf,
    /// CRI RuntimeService endpoint (unix socket path, optionally with `unix://`). Required.
    pub runtime_endpoint: Option<String>,
    /// CRI ImageService endpoint; defaults to `RuntimeEndpoint`.
    pub image_endpoint: Option<String>,
}

/// cimage's `ImageCache` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ImageCacheConfig {
    /// Path of the API's unix socket (created with mode 0660).
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Group (name or numeric gid) that owns the API socket, so its members can connect.
    #[serde(default)]
    pub socket_group: Option<String>,
    /// API connections one uid may hold at once (root and `AdminGroup`: `MaxConnectionsPerAdmin`).
    #[serde(default = "default_max_connections_per_user")]
    pub max_connections_per_user: usize,
    /// API connections root or a member of `AdminGroup` may hold at once.
    #[serde(default = "default_max_connections_per_admin")]
    pub max_connections_per_admin: usize,
    /// An API connection that sends nothing for this long is closed.
    #[serde(
        default = "default_connection_idle_timeout",
        deserialize_with = "de_duration"
    )]
    pub connection_idle_timeout: Duration,
    /// Bytes one uid's API requests may hold while they have not arrived whole (root and
    /// `AdminGroup`: `MaxRequestBytesPerAdmin`); a request past it is refused.
    #[serde(
        default = "default_max_request_bytes_per_user",
        deserialize_with = "de_size"
    )]
    pub max_request_bytes_per_user: u64,
    /// The same for root and members of `AdminGroup`.
    #[serde(
        default = "default_max_request_bytes_per_admin",
        deserialize_with = "de_size"
    )]
    pub max_request_bytes_per_admin: u64,
    /// An API request that has not arrived whole this long after its headers is ended (for a
    /// streamed request: each message, from its first byte).
    #[serde(
        default = "default_request_read_timeout",
        deserialize_with = "de_duration"
    )]
    pub request_read_timeout: Duration,
    /// Group (name or numeric gid) whose members may use admin calls, besides root.
    #[serde(default)]
    pub admin_group: Option<String>,
    /// Directory of the redb index, relative to `CraneBaseDir` unless absolute.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The node's secret that keys credential fingerprints (32 bytes, mode 0600, made at first
    /// start); absolute, and outside `StateDir`.
    #[serde(default = "default_node_key_file")]
    pub node_key_file: PathBuf,
    /// How many pulls may run at once on this node.
    #[serde(default = "default_max_concurrent_pulls")]
    pub max_concurrent_pulls: usize,
    /// How many of those a user who is neither root nor in `AdminGroup` may hold; the user's
    /// further pulls wait for its own share, not in the node's line.
    #[serde(default = "default_max_pulls_per_user")]
    pub max_pulls_per_user: usize,
    /// Deadline for one pull, retries included (e.g. `10m`, `90s`).
    #[serde(default = "default_pull_timeout", deserialize_with = "de_duration")]
    pub pull_timeout: Duration,
    /// A pull that has neither read its manifest nor moved any bytes this long after it got
    /// its slot fails (a registry that accepts connections and never answers).
    #[serde(
        default = "default_pull_resolve_timeout",
        deserialize_with = "de_duration"
    )]
    pub pull_resolve_timeout: Duration,
    /// A pull whose download bytes have not moved for this long while a layer is still being
    /// fetched is cancelled and retried (e.g. `2m`); only where the runtime reports bytes
    /// (containerd). Unpacking is never a stall.
    #[serde(
        default = "default_pull_stall_timeout",
        deserialize_with = "de_duration"
    )]
    pub pull_stall_timeout: Duration,
    /// Ask the runtime for the bytes of pulls in flight (containerd's content service, twice a
    /// second per pull). `false`: pulls report phases only, and `PullStallTimeout` does not
    /// apply.
    #[serde(default = "default_true")]
    pub pull_byte_progress: bool,
    /// cimage's own range fetch of big layers.
    #[serde(default)]
    pub parallel_fetch: ParallelFetchConfig,
    /// How many times a transient pull failure is retried (exponential backoff from 500 ms).
    #[serde(default = "default_pull_retries")]
    pub pull_retries: u32,
    /// How often the index is reconciled with the runtime's image list.
    #[serde(
        default = "default_reconcile_interval",
        deserialize_with = "de_duration"
    )]
    pub reconcile_interval: Duration,
    /// How long the runtime's word that an image is present is trusted before it is asked again.
    /// Default `0s`: ask every time. A window takes `ImageStatus` off the warm path; removals
    /// through cimage take effect at once, but an image removed behind cimage's back (e.g.
    /// `crictl rmi`) may be reported present for this long.
    #[serde(default = "default_presence_ttl", deserialize_with = "de_duration")]
    pub presence_ttl: Duration,
    /// The pull policy of a request that names none: `IfNotPresent` (default, for every tag),
    /// `Always`, or `ByTag` (Kubernetes' convention: `Always` for `:latest` and untagged
    /// references). A digest reference is never pulled again once present.
    #[serde(default)]
    pub default_pull_policy: DefaultPullPolicy,
    /// What an `Always` request does when its registry cannot be reached (connection refused,
    /// timeout, 5xx; not 401/403/404): `Fail` (default), or `UseCached` to serve the node's copy
    /// unchecked, with a warning, a metric and `stale` in the answer.
    #[serde(default)]
    pub on_registry_unavailable: OnRegistryUnavailable,
    /// Deadline for one CRI call that is not a pull (status, list, remove).
    #[serde(default = "default_runtime_timeout", deserialize_with = "de_duration")]
    pub runtime_timeout: Duration,
    /// Per-registry settings, keyed by registry host (`host[:port]`).
    #[serde(default)]
    pub registries: BTreeMap<String, RegistryConfig>,
    /// How job tasks are run in containers.
    #[serde(default)]
    pub launcher: LauncherConfig,
    /// When images are evicted.
    #[serde(default)]
    pub eviction: EvictionConfig,
    /// Scheduled pre-warming.
    #[serde(default)]
    pub prewarm: PrewarmConfig,
    /// How much task and job history is kept.
    #[serde(default)]
    pub history: HistoryConfig,
    /// Registry credentials and who may have private images.
    #[serde(default)]
    pub auth: AuthSection,
    /// Address (`host:port`) to serve Prometheus metrics and `/healthz` on; off when unset.
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// The CRI image service cimaged serves to Craned, kubelet and crictl.
    #[serde(default)]
    pub image_service: ImageServiceConfig,
    /// Images expected on the node (`cimage expect`, the queue source).
    #[serde(default)]
    pub expect: ExpectConfig,
    /// The scheduler's queue, which says which images are coming.
    #[serde(default)]
    pub queue: QueueConfig,
}

impl Default for ImageCacheConfig {
    fn default() -> Self {
        Self {
            socket: default_socket(),
            socket_group: None,
            max_connections_per_user: DEFAULT_MAX_CONNECTIONS_PER_USER,
            max_connections_per_admin: DEFAULT_MAX_CONNECTIONS_PER_ADMIN,
            connection_idle_timeout: DEFAULT_CONNECTION_IDLE_TIMEOUT,
            max_request_bytes_per_user: DEFAULT_MAX_REQUEST_BYTES_PER_USER,
            max_request_bytes_per_admin: DEFAULT_MAX_REQUEST_BYTES_PER_ADMIN,
            request_read_timeout: DEFAULT_REQUEST_READ_TIMEOUT,
            admin_group: None,
            state_dir: default_state_dir(),
            node_key_file: default_node_key_file(),
            max_concurrent_pulls: DEFAULT_MAX_CONCURRENT_PULLS,
            max_pulls_per_user: DEFAULT_MAX_PULLS_PER_USER,
            pull_timeout: DEFAULT_PULL_TIMEOUT,
            pull_resolve_timeout: DEFAULT_PULL_RESOLVE_TIMEOUT,
            pull_stall_timeout: DEFAULT_PULL_STALL_TIMEOUT,
            pull_byte_progress: true,
            parallel_fetch: ParallelFetchConfig::default(),
            pull_retries: DEFAULT_PULL_RETRIES,
            reconcile_interval: DEFAULT_RECONCILE_INTERVAL,
            runtime_timeout: DEFAULT_RUNTIME_TIMEOUT,
            presence_ttl: DEFAULT_PRESENCE_TTL,
            default_pull_policy: DefaultPullPolicy::default(),
            on_registry_unavailable: OnRegistryUnavailable::default(),
            registries: BTreeMap::new(),
            launcher: LauncherConfig::default(),
            eviction: EvictionConfig::default(),
            prewarm: PrewarmConfig::default(),
            history: HistoryConfig::default(),
            auth: AuthSection::default(),
            metrics_addr: None,
            image_service: ImageServiceConfig::default(),
            expect: ExpectConfig::default(),
            queue: QueueConfig::default(),
        }
    }
}
