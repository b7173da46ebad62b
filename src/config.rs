//! cimaged's configuration: a YAML file in CraneSched's style (PascalCase keys).
//!
//! The file may be CraneSched's whole `/etc/crane/config.yaml`: top-level sections that cimage does
//! not know are ignored, but unknown keys inside `Container` and `ImageCache` are errors, so a typo
//! never silently falls back to a default. Errors name the key and its line and column.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::units::{parse_duration, parse_size};

/// Default for `CraneBaseDir`.
pub const DEFAULT_CRANE_BASE_DIR: &str = "/var/crane";
/// Default for `Container.TempDir` (relative to `CraneBaseDir`).
pub const DEFAULT_TEMP_DIR: &str = "supervisor/containers/";
/// Default for `ImageCache.Socket`.
pub const DEFAULT_SOCKET: &str = "/run/cimage/cimaged.sock";
/// Default for `ImageCache.StateDir` (relative to `CraneBaseDir`).
pub const DEFAULT_STATE_DIR: &str = "cimage/";
/// Default for `ImageCache.MaxConcurrentPulls`.
pub const DEFAULT_MAX_CONCURRENT_PULLS: usize = 3;
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
    /// Group (name or numeric gid) whose members may use admin calls, besides root.
    #[serde(default)]
    pub admin_group: Option<String>,
    /// Directory of the redb index, relative to `CraneBaseDir` unless absolute.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// How many pulls may run at once on this node.
    #[serde(default = "default_max_concurrent_pulls")]
    pub max_concurrent_pulls: usize,
    /// Deadline for one pull, retries included (e.g. `10m`, `90s`).
    #[serde(default = "default_pull_timeout", deserialize_with = "de_duration")]
    pub pull_timeout: Duration,
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
    /// Registry credentials and who may have private images.
    #[serde(default)]
    pub auth: AuthSection,
    /// Address (`host:port`) to serve Prometheus metrics and `/healthz` on; off when unset.
    #[serde(default)]
    pub metrics_addr: Option<String>,
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

/// The `ImageCache.Prewarm` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct PrewarmConfig {
    /// Half-life of the decayed use counts that rank images for `Top: N`.
    #[serde(default = "default_half_life", deserialize_with = "de_duration")]
    pub popularity_half_life: Duration,
    /// Schedules defined by the node's configuration.
    #[serde(default)]
    pub schedules: Vec<ScheduleConfig>,
}

impl Default for PrewarmConfig {
    fn default() -> Self {
        Self {
            popularity_half_life: default_half_life(),
            schedules: Vec::new(),
        }
    }
}

fn default_half_life() -> Duration {
    Duration::from_secs(7 * 86400)
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
}

impl Default for LauncherConfig {
    fn default() -> Self {
        Self {
            allowed_mount_prefixes: Vec::new(),
            stop_grace_period: DEFAULT_STOP_GRACE_PERIOD,
            log_dir: None,
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
            admin_group: None,
            state_dir: default_state_dir(),
            max_concurrent_pulls: DEFAULT_MAX_CONCURRENT_PULLS,
            pull_timeout: DEFAULT_PULL_TIMEOUT,
            pull_retries: DEFAULT_PULL_RETRIES,
            reconcile_interval: DEFAULT_RECONCILE_INTERVAL,
            runtime_timeout: DEFAULT_RUNTIME_TIMEOUT,
            presence_ttl: DEFAULT_PRESENCE_TTL,
            registries: BTreeMap::new(),
            launcher: LauncherConfig::default(),
            eviction: EvictionConfig::default(),
            prewarm: PrewarmConfig::default(),
            auth: AuthSection::default(),
            metrics_addr: None,
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
fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}
fn default_max_concurrent_pulls() -> usize {
    DEFAULT_MAX_CONCURRENT_PULLS
}
fn default_pull_timeout() -> Duration {
    DEFAULT_PULL_TIMEOUT
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

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML is malformed or a key has the wrong type or is unknown; the message has the location.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with line and column.
        message: String,
    },
    /// The values parse but do not make sense together.
    #[error("config file {path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The dotted key, e.g. `Container.RuntimeEndpoint`.
        key: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
    /// Container support is switched off; cimaged has nothing to do.
    #[error("container support is disabled (Container.Enabled is not true in {path}); cimaged has nothing to manage")]
    Disabled {
        /// The file.
        path: PathBuf,
    },
}

/// A validated configuration with every path resolved and every default applied.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The config file this came from (for messages).
    pub source: PathBuf,
    /// CRI RuntimeService socket path.
    pub runtime_endpoint: PathBuf,
    /// CRI ImageService socket path.
    pub image_endpoint: PathBuf,
    /// Absolute scratch directory for container tasks.
    pub temp_dir: PathBuf,
    /// Absolute directory of the index.
    pub state_dir: PathBuf,
    /// Absolute directory of step logs.
    pub log_dir: PathBuf,
    /// The `ImageCache` section as written (with defaults).
    pub image_cache: ImageCacheConfig,
}

impl Settings {
    /// The redb file that holds the index.
    pub fn index_path(&self) -> PathBuf {
        self.state_dir.join("index.redb")
    }

    /// The settings for one registry host (defaults when it has no entry).
    pub fn registry(&self, host: &str) -> RegistryConfig {
        self.image_cache
            .registries
            .get(host)
            .cloned()
            .unwrap_or_default()
    }
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Parses and validates config text; `path` is only used in messages.
pub fn parse(text: &str, path: &Path) -> Result<Settings, ConfigError> {
    let config: Config = serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    validate(config, path)
}

fn validate(config: Config, path: &Path) -> Result<Settings, ConfigError> {
    let invalid = |key: &'static str, message: String| ConfigError::Invalid {
        path: path.to_owned(),
        key,
        message,
    };
    let container = config.container.ok_or_else(|| ConfigError::Disabled {
        path: path.to_owned(),
    })?;
    if !container.enabled {
        return Err(ConfigError::Disabled {
            path: path.to_owned(),
        });
    }
    let runtime = container
        .runtime_endpoint
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| {
            invalid(
                "Container.RuntimeEndpoint",
                "is required: the CRI runtime's unix socket, e.g. /run/containerd/containerd.sock"
                    .into(),
            )
        })?;
    let runtime_endpoint = unix_endpoint(runtime)
        .map_err(|m| invalid("Container.RuntimeEndpoint", format!("{runtime:?} {m}")))?;
    let image_endpoint = match container.image_endpoint.as_deref() {
        Some(s) if !s.trim().is_empty() => unix_endpoint(s)
            .map_err(|m| invalid("Container.ImageEndpoint", format!("{s:?} {m}")))?,
        _ => runtime_endpoint.clone(),
    };
    let ic = config.image_cache;
    if ic.max_concurrent_pulls == 0 {
        return Err(invalid(
            "ImageCache.MaxConcurrentPulls",
            "must be at least 1".into(),
        ));
    }
    if ic.pull_timeout.is_zero() {
        return Err(invalid(
            "ImageCache.PullTimeout",
            "must be longer than 0s".into(),
        ));
    }
    if ic.reconcile_interval < Duration::from_secs(1) {
        return Err(invalid(
            "ImageCache.ReconcileInterval",
            "must be at least 1s".into(),
        ));
    }
    if ic.runtime_timeout.is_zero() {
        return Err(invalid(
            "ImageCache.RuntimeTimeout",
            "must be longer than 0s".into(),
        ));
    }
    for (host, reg) in &ic.registries {
        if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
            return Err(invalid(
                "ImageCache.Registries",
                format!("{host:?} is not a registry host (expected host or host:port)"),
            ));
        }
        if let Some(ca) = &reg.ca_file {
            if reg.insecure {
                return Err(invalid(
                    "ImageCache.Registries.*.CaFile",
                    format!("{host:?} is Insecure (plain HTTP); a CaFile makes no sense there"),
                ));
            }
            if !ca.is_absolute() {
                return Err(invalid(
                    "ImageCache.Registries.*.CaFile",
                    format!("for {host:?}: {} must be an absolute path", ca.display()),
                ));
            }
        }
        for m in &reg.mirrors {
            if m.is_empty() || m.contains('/') || m.contains(char::is_whitespace) || m == host {
                return Err(invalid(
                    "ImageCache.Registries.*.Mirrors",
                    format!("{m:?} (for {host:?}) is not a mirror host (host or host:port, not the registry itself)"),
                ));
            }
        }
        if reg.max_concurrent_pulls == Some(0) {
            return Err(invalid(
                "ImageCache.Registries.*.MaxConcurrentPulls",
                format!("for {host:?} must be at least 1"),
            ));
        }
    }
    if ic.socket.as_os_str().is_empty() || ic.socket.is_relative() {
        return Err(invalid(
            "ImageCache.Socket",
            format!("{:?} must be an absolute path", ic.socket),
        ));
    }
    for prefix in &ic.launcher.allowed_mount_prefixes {
        if !prefix.is_absolute() {
            return Err(invalid(
                "ImageCache.Launcher.AllowedMountPrefixes",
                format!("{} must be an absolute path", prefix.display()),
            ));
        }
    }
    if ic.launcher.stop_grace_period > Duration::from_secs(3600) {
        return Err(invalid(
            "ImageCache.Launcher.StopGracePeriod",
            "must be at most 1h".into(),
        ));
    }
    let ev = &ic.eviction;
    if !(0.0..=100.0).contains(&ev.high_percent) || !(0.0..=100.0).contains(&ev.low_percent) {
        return Err(invalid(
            "ImageCache.Eviction",
            "HighPercent and LowPercent must be between 0 and 100".into(),
        ));
    }
    if ev.low_percent > ev.high_percent {
        return Err(invalid(
            "ImageCache.Eviction.LowPercent",
            format!(
                "{} must not be above HighPercent ({})",
                ev.low_percent, ev.high_percent
            ),
        ));
    }
    if let Some(addr) = &ic.metrics_addr {
        addr.parse::<std::net::SocketAddr>().map_err(|e| {
            invalid(
                "ImageCache.MetricsAddr",
                format!("{addr:?} is not host:port ({e}), e.g. 127.0.0.1:9464"),
            )
        })?;
    }
    let mut names = std::collections::HashSet::new();
    for sc in &ic.prewarm.schedules {
        if !names.insert(sc.name.as_str()) {
            return Err(invalid(
                "ImageCache.Prewarm.Schedules",
                format!("schedule name {:?} is used twice", sc.name),
            ));
        }
    }
    for f in &ic.auth.config_files {
        if !f.is_absolute() {
            return Err(invalid(
                "ImageCache.Auth.ConfigFiles",
                format!("{} must be an absolute path", f.display()),
            ));
        }
    }
    for (host, helper) in &ic.auth.credential_helpers {
        let ok = !helper.is_empty()
            && helper
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok {
            return Err(invalid(
                "ImageCache.Auth.CredentialHelpers",
                format!("{helper:?} (for {host:?}) is not a helper name; the helper runs as docker-credential-NAME"),
            ));
        }
    }
    let base = config.crane_base_dir;
    let temp_dir = base.join(&container.temp_dir);
    Ok(Settings {
        source: path.to_owned(),
        runtime_endpoint,
        image_endpoint,
        log_dir: match &ic.launcher.log_dir {
            Some(d) => base.join(d),
            None => temp_dir.clone(),
        },
        temp_dir,
        state_dir: base.join(&ic.state_dir),
        image_cache: ic,
    })
}

/// Accepts `/path/to.sock` or `unix:///path/to.sock`; other schemes are not supported.
fn unix_endpoint(s: &str) -> Result<PathBuf, &'static str> {
    let path = s.strip_prefix("unix://").unwrap_or(s);
    if path.contains("://") {
        return Err("is not a unix socket (only unix:// endpoints are supported)");
    }
    if !path.starts_with('/') {
        return Err("must be an absolute socket path");
    }
    Ok(PathBuf::from(path))
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

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
CraneBaseDir: /var/crane
ControlMachine: head01          # a CraneSched key cimage does not read
Container:
  Enabled: true
  TempDir: supervisor/containers/
  RuntimeEndpoint: /run/containerd/containerd.sock
ImageCache:
  Socket: /run/cimage/cimaged.sock
  StateDir: cimage/
  MaxConcurrentPulls: 3
  PullTimeout: 10m
  Registries:
    "127.0.0.1:5000":
      Insecure: true
"#;

    fn err(text: &str) -> String {
        parse(text, Path::new("c.yaml")).unwrap_err().to_string()
    }

    #[test]
    fn good_config_resolves_paths_and_defaults() {
        let s = parse(GOOD, Path::new("c.yaml")).unwrap();
        assert_eq!(
            s.runtime_endpoint,
            PathBuf::from("/run/containerd/containerd.sock")
        );
        assert_eq!(s.image_endpoint, s.runtime_endpoint);
        assert_eq!(s.state_dir, PathBuf::from("/var/crane/cimage/"));
        assert_eq!(
            s.temp_dir,
            PathBuf::from("/var/crane/supervisor/containers/")
        );
        assert_eq!(s.image_cache.pull_timeout, Duration::from_secs(600));
        assert!(s.registry("127.0.0.1:5000").insecure);
        assert!(!s.registry("docker.io").insecure);
        assert_eq!(s.image_cache.reconcile_interval, DEFAULT_RECONCILE_INTERVAL);
    }

    #[test]
    fn disabled_container_support_is_refused() {
        let e = err("Container:\n  Enabled: false\n  RuntimeEndpoint: /x.sock\n");
        assert!(e.contains("container support is disabled"), "{e}");
        let e = err("ImageCache: {}\n");
        assert!(e.contains("container support is disabled"), "{e}");
    }

    #[test]
    fn missing_runtime_endpoint_names_the_key() {
        let e = err("Container:\n  Enabled: true\n");
        assert!(e.contains("Container.RuntimeEndpoint"), "{e}");
    }

    #[test]
    fn unknown_key_inside_known_sections_names_key_and_line() {
        let e = err("Container:\n  Enabled: true\n  RuntimeEndpoint: /x.sock\nImageCache:\n  MaxConcurentPulls: 3\n");
        assert!(e.contains("MaxConcurentPulls"), "{e}");
        assert!(e.contains("line 5"), "{e}");
        let e = err("Container:\n  Enabled: true\n  RuntimeEndpiont: /x.sock\n");
        assert!(e.contains("RuntimeEndpiont") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn wrong_type_and_bad_duration_name_the_line() {
        let base = "Container:\n  Enabled: true\n  RuntimeEndpoint: /x.sock\nImageCache:\n";
        let e = err(&format!("{base}  MaxConcurrentPulls: lots\n"));
        assert!(e.contains("line 5"), "{e}");
        let e = err(&format!("{base}  PullTimeout: 10 minutes\n"));
        assert!(e.contains("line 5") && e.contains("unit"), "{e}");
    }

    #[test]
    fn invalid_values_are_refused() {
        let base = "Container:\n  Enabled: true\n  RuntimeEndpoint: /x.sock\nImageCache:\n";
        assert!(err(&format!("{base}  MaxConcurrentPulls: 0\n")).contains("at least 1"));
        assert!(err(&format!("{base}  Socket: relative.sock\n")).contains("absolute"));
        assert!(
            err("Container:\n  Enabled: true\n  RuntimeEndpoint: tcp://1.2.3.4:1\n")
                .contains("unix")
        );
    }

    #[test]
    fn eviction_prewarm_and_metrics_sections() {
        let base = "Container:\n  Enabled: true\n  RuntimeEndpoint: /x.sock\nImageCache:\n";
        let s = parse(
            &format!("{base}  MetricsAddr: 127.0.0.1:9464\n  Eviction:\n    MaxBytes: 10GiB\n    MinAge: 5m\n    MaxUnusedAge: 30d\n  Prewarm:\n    Schedules:\n      - Name: nightly\n        Cron: \"0 3 * * *\"\n        TimeZone: Europe/Berlin\n        Top: 5\n        Images: [busybox]\n        CatchUp: true\n"),
            Path::new("c.yaml"),
        )
        .unwrap();
        let ev = &s.image_cache.eviction;
        assert_eq!(ev.max_bytes, Some(10 << 30));
        assert_eq!((ev.high_percent, ev.low_percent), (85.0, 80.0));
        assert_eq!(ev.max_unused_age, Some(Duration::from_secs(30 * 86400)));
        let sc = &s.image_cache.prewarm.schedules[0];
        assert_eq!((sc.top, sc.catch_up, sc.images.len()), (Some(5), true, 1));
        assert!(err(&format!(
            "{base}  Eviction:\n    HighPercent: 70\n    LowPercent: 90\n"
        ))
        .contains("LowPercent"));
        assert!(err(&format!("{base}  Eviction:\n    MaxBytes: lots\n")).contains("line 6"));
        assert!(err(&format!("{base}  MetricsAddr: nowhere\n")).contains("MetricsAddr"));
        assert!(err(&format!("{base}  Auth:\n    Verify: Sometimes\n")).contains("Sometimes"));
        assert!(err(&format!(
            "{base}  Prewarm:\n    Schedules:\n      - Name: a\n        Cron: x\n        Crn: y\n"
        ))
        .contains("Crn"));
    }
}
