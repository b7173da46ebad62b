//! The defaults of the configuration file, each named once. The file model's serde defaults
//! read them here, and the domain modules' own `Default` settings refer to the same constants
//! (a domain module may import these constants, never the file model), so a default is written
//! in one place whichever way a module is built.

use std::path::PathBuf;
use std::time::Duration;

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
/// Default for `ImageCache.ParallelFetch.ConnectionsPerPull`.
pub const DEFAULT_FETCH_CONNECTIONS_PER_PULL: usize = 8;
/// Default for `ImageCache.ParallelFetch.ConnectionsPerRegistry`.
pub const DEFAULT_FETCH_CONNECTIONS_PER_REGISTRY: usize = 16;
/// Default for `ImageCache.ParallelFetch.SegmentSize`.
pub const DEFAULT_FETCH_SEGMENT_SIZE: u64 = 16 << 20;
/// Default for `ImageCache.ParallelFetch.MinBlobSize`.
pub const DEFAULT_FETCH_MIN_BLOB_SIZE: u64 = 32 << 20;
/// Default for `ImageCache.ParallelFetch.MaxBufferPerPull`.
pub const DEFAULT_FETCH_MAX_BUFFER_PER_PULL: u64 = 64 << 20;
/// Default for `ImageCache.PullStallTimeout`.
pub const DEFAULT_PULL_STALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Default for `ImageCache.PullTimeout`.
pub const DEFAULT_PULL_TIMEOUT: Duration = Duration::from_secs(600);
/// Default for `ImageCache.PullResolveTimeout`: how long a pull may go without its manifest or
/// any bytes.
pub const DEFAULT_PULL_RESOLVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default for `ImageCache.MaxPullsPerUser`: pull slots one user who is neither root nor an
/// admin may hold.
pub const DEFAULT_MAX_PULLS_PER_USER: usize = 2;
/// Default for `ImageCache.PullRetries`.
pub const DEFAULT_PULL_RETRIES: u32 = 3;
/// Default for `ImageCache.ReconcileInterval`.
pub const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_secs(60);
/// Default for `ImageCache.Expect.Grace`: an expectation ends this long after its deadline.
pub const DEFAULT_EXPECT_GRACE: Duration = Duration::from_secs(3600);
/// Default for `ImageCache.Expect.MaxPerUser`.
pub const DEFAULT_EXPECT_MAX_PER_USER: usize = 16;
/// Default for `ImageCache.Queue.Interval`: how often the queue source is asked.
pub const DEFAULT_QUEUE_INTERVAL: Duration = Duration::from_secs(15);
/// Default for `ImageCache.Queue.Horizon`: how far ahead planned jobs count.
pub const DEFAULT_QUEUE_HORIZON: Duration = Duration::from_secs(2 * 3600);
/// Default for `ImageCache.Queue.Timeout`: a look at the queue that takes longer fails.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for `ImageCache.Launcher.StopGracePeriod`.
pub const DEFAULT_STOP_GRACE_PERIOD: Duration = Duration::from_secs(10);
/// Default for `ImageCache.PresenceTtl`.
pub const DEFAULT_PRESENCE_TTL: Duration = Duration::ZERO;
/// Default for `ImageCache.RuntimeTimeout`.
pub const DEFAULT_RUNTIME_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for `ImageCache.History.Keep`.
pub const DEFAULT_HISTORY_KEEP: Duration = Duration::from_secs(7 * 86_400);
/// Default for `ImageCache.History.MaxTasks`.
pub const DEFAULT_HISTORY_MAX_TASKS: u64 = 100_000;

/// Default for `ImageCache.MaxConnectionsPerUser`.
pub const DEFAULT_MAX_CONNECTIONS_PER_USER: usize = 64;
/// Default for `ImageCache.MaxConnectionsPerAdmin`.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADMIN: usize = 1024;
/// Default for `ImageCache.ConnectionIdleTimeout`.
pub const DEFAULT_CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default for `ImageCache.MaxRequestBytesPerUser`: what one uid's API requests that have not
/// arrived whole may hold at once (64 requests of the 1 MiB limit).
pub const DEFAULT_MAX_REQUEST_BYTES_PER_USER: u64 = 64 << 20;
/// Default for `ImageCache.MaxRequestBytesPerAdmin`.
pub const DEFAULT_MAX_REQUEST_BYTES_PER_ADMIN: u64 = 1 << 30;
/// Default for `ImageCache.RequestReadTimeout`.
pub const DEFAULT_REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for `ImageCache.ImageService.MaxConnections`.
pub const DEFAULT_IMAGE_SERVICE_MAX_CONNECTIONS: usize = 512;
/// Default for `ImageCache.Eviction.HighPercent`.
pub const DEFAULT_HIGH_PERCENT: f64 = 85.0;
/// Default for `ImageCache.Eviction.LowPercent`.
pub const DEFAULT_LOW_PERCENT: f64 = 80.0;
/// Default for `ImageCache.Eviction.MinAge`.
pub const DEFAULT_MIN_AGE: Duration = Duration::from_secs(120);
/// Default for `ImageCache.Prewarm.PopularityHalfLife`.
pub const DEFAULT_POPULARITY_HALF_LIFE: Duration = Duration::from_secs(7 * 86_400);
/// Default for `ImageCache.Prewarm.ForgetAbsentAfter`.
pub const DEFAULT_FORGET_ABSENT_AFTER: Duration = Duration::from_secs(90 * 86_400);
/// Default for `ImageCache.Prewarm.Schedules[].Concurrency`: images pulled at once in a run.
pub const DEFAULT_PREWARM_CONCURRENCY: usize = 2;
/// Default for `ImageCache.Launcher.MaxLaunchesPerUser`.
pub const DEFAULT_MAX_LAUNCHES_PER_USER: usize = 32;
/// Default for `ImageCache.Launcher.PidsLimit`: processes a job's pod may hold.
pub const DEFAULT_PIDS_LIMIT: u64 = 4096;
/// Default for `ImageCache.Launcher.MaxLogSize`: a step's log file is rotated past this.
pub const DEFAULT_MAX_LOG_SIZE: u64 = 100 << 20;
/// Default for `ImageCache.Launcher.MaxLogFiles`: a step keeps this many log files, the one
/// being written included (as kubelet's `containerLogMaxFiles`).
pub const DEFAULT_MAX_LOG_FILES: usize = 2;
/// Default for `ImageCache.Launcher.MaxLogDirSize`: past this, the logs of the steps that
/// finished first are removed.
pub const DEFAULT_MAX_LOG_DIR_SIZE: u64 = 10 << 30;

pub(super) fn default_image_service_socket() -> PathBuf {
    PathBuf::from(DEFAULT_IMAGE_SERVICE_SOCKET)
}
pub(super) fn default_true() -> bool {
    true
}
pub(super) fn default_high_percent() -> f64 {
    DEFAULT_HIGH_PERCENT
}
pub(super) fn default_low_percent() -> f64 {
    DEFAULT_LOW_PERCENT
}
pub(super) fn default_min_age() -> Duration {
    DEFAULT_MIN_AGE
}
pub(super) fn default_history_keep() -> Duration {
    DEFAULT_HISTORY_KEEP
}
pub(super) fn default_history_max_tasks() -> u64 {
    DEFAULT_HISTORY_MAX_TASKS
}
pub(super) fn default_half_life() -> Duration {
    DEFAULT_POPULARITY_HALF_LIFE
}
pub(super) fn default_forget_absent_after() -> Duration {
    DEFAULT_FORGET_ABSENT_AFTER
}
pub(super) fn default_max_launches_per_user() -> usize {
    DEFAULT_MAX_LAUNCHES_PER_USER
}
pub(super) fn default_pids_limit() -> u64 {
    DEFAULT_PIDS_LIMIT
}
pub(super) fn default_max_log_size() -> u64 {
    DEFAULT_MAX_LOG_SIZE
}
pub(super) fn default_max_log_files() -> usize {
    DEFAULT_MAX_LOG_FILES
}
pub(super) fn default_max_log_dir_size() -> u64 {
    DEFAULT_MAX_LOG_DIR_SIZE
}
pub(super) fn default_stop_grace_period() -> Duration {
    DEFAULT_STOP_GRACE_PERIOD
}
pub(super) fn default_crane_base_dir() -> PathBuf {
    PathBuf::from(DEFAULT_CRANE_BASE_DIR)
}
pub(super) fn default_temp_dir() -> PathBuf {
    PathBuf::from(DEFAULT_TEMP_DIR)
}
pub(super) fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}
pub(super) fn default_max_connections_per_user() -> usize {
    DEFAULT_MAX_CONNECTIONS_PER_USER
}
pub(super) fn default_max_connections_per_admin() -> usize {
    DEFAULT_MAX_CONNECTIONS_PER_ADMIN
}
pub(super) fn default_connection_idle_timeout() -> Duration {
    DEFAULT_CONNECTION_IDLE_TIMEOUT
}
pub(super) fn default_max_request_bytes_per_user() -> u64 {
    DEFAULT_MAX_REQUEST_BYTES_PER_USER
}
pub(super) fn default_max_request_bytes_per_admin() -> u64 {
    DEFAULT_MAX_REQUEST_BYTES_PER_ADMIN
}
pub(super) fn default_request_read_timeout() -> Duration {
    DEFAULT_REQUEST_READ_TIMEOUT
}
pub(super) fn default_image_service_max_connections() -> usize {
    DEFAULT_IMAGE_SERVICE_MAX_CONNECTIONS
}
pub(super) fn default_node_key_file() -> PathBuf {
    PathBuf::from(DEFAULT_NODE_KEY_FILE)
}
pub(super) fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}
pub(super) fn default_max_concurrent_pulls() -> usize {
    DEFAULT_MAX_CONCURRENT_PULLS
}
pub(super) fn default_pull_timeout() -> Duration {
    DEFAULT_PULL_TIMEOUT
}
pub(super) fn default_pull_stall_timeout() -> Duration {
    DEFAULT_PULL_STALL_TIMEOUT
}
pub(super) fn default_pull_resolve_timeout() -> Duration {
    DEFAULT_PULL_RESOLVE_TIMEOUT
}
pub(super) fn default_max_pulls_per_user() -> usize {
    DEFAULT_MAX_PULLS_PER_USER
}
pub(super) fn default_pull_retries() -> u32 {
    DEFAULT_PULL_RETRIES
}
pub(super) fn default_reconcile_interval() -> Duration {
    DEFAULT_RECONCILE_INTERVAL
}
pub(super) fn default_presence_ttl() -> Duration {
    DEFAULT_PRESENCE_TTL
}
pub(super) fn default_runtime_timeout() -> Duration {
    DEFAULT_RUNTIME_TIMEOUT
}

pub(super) fn default_fetch_connections_per_pull() -> usize {
    DEFAULT_FETCH_CONNECTIONS_PER_PULL
}
pub(super) fn default_fetch_connections_per_registry() -> usize {
    DEFAULT_FETCH_CONNECTIONS_PER_REGISTRY
}
pub(super) fn default_fetch_segment_size() -> u64 {
    DEFAULT_FETCH_SEGMENT_SIZE
}
pub(super) fn default_fetch_min_blob_size() -> u64 {
    DEFAULT_FETCH_MIN_BLOB_SIZE
}
pub(super) fn default_fetch_max_buffer_per_pull() -> u64 {
    DEFAULT_FETCH_MAX_BUFFER_PER_PULL
}
