//! cimaged's configuration: a YAML file in CraneSched's style (PascalCase keys).
//!
//! The file may be CraneSched's whole `/etc/crane/config.yaml`: top-level sections that cimage does
//! not know are ignored, but unknown keys inside `Container` and `ImageCache` are errors, so a typo
//! never silently falls back to a default. Errors name the key and its line and column.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::units::{parse_duration, parse_size};

#[cfg(test)]
mod tests;
mod validate;

pub use validate::{load, parse, ConfigError, Settings};

/// Default for `CraneBaseDir`.
pub const DEFAULT_CRANE_BASE_DIR: &str = "/var/crane";
/// Default for `Container.TempDir` (relative to `CraneBaseDir`).
pub const DEFAULT_TEMP_DIR: &str = "supervisor/containers/";
/// Default for `ImageCache.Socket`.
pub const DEFAULT_SOCKET: &str = "/run/cimage/cimaged.sock";
/// Default for `ImageCache.ImageService.Socket`: the CRI image endpoint cimaged serves.
pub const DEFAULT_IMAGE_SERVICE_SOCKET: &str = "/run/cimage/image.sock";
/// Default for `ImageCache.NodeKeyFile`: outside `StateDir`, so a copy of the index does not
/// carry the key of its credential fingerprints.
pub const DEFAULT_NODE_KEY_FILE: &str = "/etc/cimage/node.key";
/// Default for `ImageCache.StateDir` (relative to `CraneBaseDir`).
pub const DEFAULT_STATE_DIR: &str = "cimage/";
/// Default for `ImageCache.MaxConcurrentPulls`.
pub const DEFAULT_MAX_CONCURRENT_PULLS: usize = 3;
/// Default for `ImageCache.PullStallTimeout`.
pub const DEFAULT_PULL_STALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Default for `ImageCache.PullTimeout`.
pub const DEFAULT_PULL_TIMEOUT: Duration = Duration::from_secs(600);
/// Default for `ImageCache.PullRetries`.
pub const DEFAULT_PULL_RETRIES: u32 = 3;
/// Default for `ImageCache.ReconcileInterval`.
pub const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_secs(60);
/// Default for `ImageCache.Launcher.StopGracePeriod`.
pub const DEFAULT_STOP_GRACE_PERIOD: Duration = Duration::from_secs(10);
/// Default for `ImageCache.PresenceTtl`.
pub const DEFAULT_PRESENCE_TTL: Duration = Duration::ZERO;
/// Default for `ImageCache.RuntimeTimeout`.
pub const DEFAULT_RUNTIME_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Deadline for one pull, retries included (e.g. `10m`, `90s`).
    #[serde(default = "default_pull_timeout", deserialize_with = "de_duration")]
    pub pull_timeout: Duration,
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
}

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
}

impl Default for ImageServiceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            socket: default_image_service_socket(),
            upstream: None,
        }
    }
}

fn default_image_service_socket() -> PathBuf {
    PathBuf::from(DEFAULT_IMAGE_SERVICE_SOCKET)
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

fn default_true() -> bool {
    true
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

fn default_high_percent() -> f64 {
    85.0
}
fn default_low_percent() -> f64 {
    80.0
}
fn default_min_age() -> Duration {
    Duration::from_secs(120)
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

/// Default for `ImageCache.History.Keep`.
pub const DEFAULT_HISTORY_KEEP: Duration = Duration::from_secs(7 * 86_400);
/// Default for `ImageCache.History.MaxTasks`.
pub const DEFAULT_HISTORY_MAX_TASKS: u64 = 100_000;

fn default_history_keep() -> Duration {
    DEFAULT_HISTORY_KEEP
}

fn default_history_max_tasks() -> u64 {
    DEFAULT_HISTORY_MAX_TASKS
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

fn default_half_life() -> Duration {
    Duration::from_secs(7 * 86400)
}

fn default_forget_absent_after() -> Duration {
    Duration::from_secs(90 * 86400)
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

fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a size such as 500MiB or 10GiB")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            u64::try_from(v)
                .map(Some)
                .map_err(|_| E::custom("a size cannot be negative"))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            parse_size(v).map(Some).map_err(E::custom)
        }
    }
    d.deserialize_any(V)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
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
}

fn default_max_launches_per_user() -> usize {
    32
}

impl Default for LauncherConfig {
    fn default() -> Self {
        Self {
            allowed_mount_prefixes: Vec::new(),
            stop_grace_period: DEFAULT_STOP_GRACE_PERIOD,
            log_dir: None,
            allowed_devices: Vec::new(),
            allow_user_launch: false,
            max_launches_per_user: default_max_launches_per_user(),
            allowed_cgroup_parents: Vec::new(),
        }
    }
}

fn default_stop_grace_period() -> Duration {
    DEFAULT_STOP_GRACE_PERIOD
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

impl Default for ImageCacheConfig {
    fn default() -> Self {
        Self {
            socket: default_socket(),
            socket_group: None,
            max_connections_per_user: default_max_connections_per_user(),
            max_connections_per_admin: default_max_connections_per_admin(),
            connection_idle_timeout: default_connection_idle_timeout(),
            admin_group: None,
            state_dir: default_state_dir(),
            node_key_file: default_node_key_file(),
            max_concurrent_pulls: DEFAULT_MAX_CONCURRENT_PULLS,
            pull_timeout: DEFAULT_PULL_TIMEOUT,
            pull_stall_timeout: DEFAULT_PULL_STALL_TIMEOUT,
            pull_byte_progress: true,
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
        }
    }
}

fn default_crane_base_dir() -> PathBuf {
    PathBuf::from(DEFAULT_CRANE_BASE_DIR)
}
fn default_temp_dir() -> PathBuf {
    PathBuf::from(DEFAULT_TEMP_DIR)
}
fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}
fn default_max_connections_per_user() -> usize {
    64
}
fn default_max_connections_per_admin() -> usize {
    1024
}
fn default_connection_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_node_key_file() -> PathBuf {
    PathBuf::from(DEFAULT_NODE_KEY_FILE)
}
fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}
fn default_max_concurrent_pulls() -> usize {
    DEFAULT_MAX_CONCURRENT_PULLS
}
fn default_pull_timeout() -> Duration {
    DEFAULT_PULL_TIMEOUT
}

fn default_pull_stall_timeout() -> Duration {
    DEFAULT_PULL_STALL_TIMEOUT
}
fn default_pull_retries() -> u32 {
    DEFAULT_PULL_RETRIES
}
fn default_reconcile_interval() -> Duration {
    DEFAULT_RECONCILE_INTERVAL
}
fn default_presence_ttl() -> Duration {
    DEFAULT_PRESENCE_TTL
}
fn default_runtime_timeout() -> Duration {
    DEFAULT_RUNTIME_TIMEOUT
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a duration such as 90s, 10m or 1h30m")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
            parse_duration(v).map_err(E::custom)
        }
    }
    d.deserialize_str(V)
}
