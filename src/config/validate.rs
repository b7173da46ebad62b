//! Checking a parsed file: required keys, values that make sense together, paths resolved against
//! `CraneBaseDir`. The result, [`Settings`], is what the daemon is built from.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Config, ImageCacheConfig, RegistryConfig};

/// The least a uid's budget of unfinished request bytes may be: one request of the API's 1 MiB
/// message limit, with room for its header fields.
const MIN_REQUEST_BUDGET: u64 = 2 << 20;

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
    let ic = config.image_cache;
    let own = &ic.image_service.socket;
    if !own.is_absolute() {
        return Err(invalid(
            "ImageCache.ImageService.Socket",
            format!("{} must be an absolute path", own.display()),
        ));
    }
    if own == &ic.socket {
        return Err(invalid(
            "ImageCache.ImageService.Socket",
            format!(
                "{} is also ImageCache.Socket; the CRI endpoint needs a socket of its own",
                own.display()
            ),
        ));
    }
    // cimaged's own upstream: the override, else Container.ImageEndpoint unless that is
    // cimaged's socket (one config file shared with Craned), else the runtime's socket.
    let (image_endpoint, from) = match (
        &ic.image_service.upstream,
        container.image_endpoint.as_deref(),
    ) {
        (Some(u), _) => (
            unix_endpoint(u)
                .map_err(|m| invalid("ImageCache.ImageService.Upstream", format!("{u:?} {m}")))?,
            "ImageCache.ImageService.Upstream",
        ),
        (None, Some(s)) if !s.trim().is_empty() => {
            let e = unix_endpoint(s)
                .map_err(|m| invalid("Container.ImageEndpoint", format!("{s:?} {m}")))?;
            if &e == own {
                (runtime_endpoint.clone(), "Container.RuntimeEndpoint")
            } else {
                (e, "Container.ImageEndpoint")
            }
        }
        _ => (runtime_endpoint.clone(), "Container.RuntimeEndpoint"),
    };
    if &image_endpoint == own {
        return Err(invalid(
            from,
            format!(
                "names {}, cimaged's own image service: it would call itself; name the \
                 runtime's socket (e.g. /run/containerd/containerd.sock)",
                own.display()
            ),
        ));
    }
    if ic.max_concurrent_pulls == 0 {
        return Err(invalid(
            "ImageCache.MaxConcurrentPulls",
            "must be at least 1".into(),
        ));
    }
    if ic.max_pulls_per_user == 0 {
        return Err(invalid(
            "ImageCache.MaxPullsPerUser",
            "must be at least 1".into(),
        ));
    }
    if ic.max_connections_per_user == 0 || ic.max_connections_per_admin == 0 {
        return Err(invalid(
            "ImageCache.MaxConnectionsPerUser",
            "MaxConnectionsPerUser and MaxConnectionsPerAdmin must be at least 1".into(),
        ));
    }
    if ic.max_request_bytes_per_user < MIN_REQUEST_BUDGET
        || ic.max_request_bytes_per_admin < MIN_REQUEST_BUDGET
    {
        return Err(invalid(
            "ImageCache.MaxRequestBytesPerUser",
            "MaxRequestBytesPerUser and MaxRequestBytesPerAdmin must be at least 2MiB (one \
             request of the 1 MiB limit, with room for its header fields)"
                .into(),
        ));
    }
    if ic.request_read_timeout < Duration::from_secs(1) {
        return Err(invalid(
            "ImageCache.RequestReadTimeout",
            "must be at least 1s".into(),
        ));
    }
    if ic.image_service.max_connections == 0 {
        return Err(invalid(
            "ImageCache.ImageService.MaxConnections",
            "must be at least 1".into(),
        ));
    }
    if ic.connection_idle_timeout < Duration::from_secs(1) {
        return Err(invalid(
            "ImageCache.ConnectionIdleTimeout",
            "must be at least 1s".into(),
        ));
    }
    if ic.pull_timeout.is_zero() {
        return Err(invalid(
            "ImageCache.PullTimeout",
            "must be longer than 0s".into(),
        ));
    }
    if ic.history.keep < Duration::from_secs(60) {
        return Err(invalid(
            "ImageCache.History.Keep",
            "must be at least 1m".into(),
        ));
    }
    if ic.history.max_tasks == 0 {
        return Err(invalid(
            "ImageCache.History.MaxTasks",
            "must be at least 1".into(),
        ));
    }
    if ic.pull_resolve_timeout < Duration::from_secs(1) {
        return Err(invalid(
            "ImageCache.PullResolveTimeout",
            "must be at least 1s".into(),
        ));
    }
    if ic.pull_stall_timeout < Duration::from_secs(1) {
        return Err(invalid(
            "ImageCache.PullStallTimeout",
            "must be at least 1s".into(),
        ));
    }
    let pf = &ic.parallel_fetch;
    for (key, n) in [
        (
            "ImageCache.ParallelFetch.ConnectionsPerPull",
            pf.connections_per_pull,
        ),
        (
            "ImageCache.ParallelFetch.ConnectionsPerRegistry",
            pf.connections_per_registry,
        ),
    ] {
        if n == 0 {
            return Err(invalid(key, "must be at least 1".into()));
        }
    }
    for (key, n) in [
        ("ImageCache.ParallelFetch.SegmentSize", pf.segment_size),
        (
            "ImageCache.ParallelFetch.MaxBufferPerPull",
            pf.max_buffer_per_pull,
        ),
    ] {
        if n < 1 << 20 {
            return Err(invalid(key, "must be at least 1MiB".into()));
        }
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
    for p in &ic.launcher.allowed_cgroup_parents {
        // `{uid}` is the one placeholder (the caller's uid); what is left must be a cgroup
        // path or a slice name.
        if !crate::names::is_cgroup_parent(&p.replace("{uid}", "0")) {
            return Err(invalid(
                "ImageCache.Launcher.AllowedCgroupParents",
                format!(
                    "{p:?} is neither an absolute cgroup path (/crane, /crane/user_{{uid}}) nor a \
                     systemd slice name (crane.slice, crane-uid_{{uid}}.slice); {{uid}} is the one \
                     placeholder"
                ),
            ));
        }
    }
    for d in &ic.launcher.allowed_devices {
        let cdi = d.contains('=') && d.split('=').next().is_some_and(|k| k.contains('/'));
        if !(d.starts_with("/dev/") || cdi) || d.chars().any(|c| c.is_control()) {
            return Err(invalid(
                "ImageCache.Launcher.AllowedDevices",
                format!(
                    "{d:?} is neither a /dev path or glob nor a CDI name (vendor.com/class=name)"
                ),
            ));
        }
    }
    if ic.launcher.max_log_files < 2 {
        return Err(invalid(
            "ImageCache.Launcher.MaxLogFiles",
            "must be at least 2 (the file being written and one rotated)".into(),
        ));
    }
    if ic.launcher.max_log_size < 4096 {
        return Err(invalid(
            "ImageCache.Launcher.MaxLogSize",
            "must be at least 4KiB".into(),
        ));
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
    check_queue(&ic.queue, &invalid)?;
    if ic.expect.max_per_user == 0 {
        return Err(invalid(
            "ImageCache.Expect.MaxPerUser",
            "must be at least 1".into(),
        ));
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
    let state_dir = base.join(&ic.state_dir);
    if !ic.node_key_file.is_absolute() {
        return Err(invalid(
            "ImageCache.NodeKeyFile",
            format!("{} must be an absolute path", ic.node_key_file.display()),
        ));
    }
    if ic.node_key_file.starts_with(&state_dir) {
        return Err(invalid(
            "ImageCache.NodeKeyFile",
            format!(
                "{} is inside StateDir ({}); keep the key apart from the index it protects",
                ic.node_key_file.display(),
                state_dir.display()
            ),
        ));
    }
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
        state_dir,
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

/// `ImageCache.Queue`: a command source names a program by absolute path; the timings make
/// sense together.
fn check_queue(
    q: &super::QueueConfig,
    invalid: &impl Fn(&'static str, String) -> ConfigError,
) -> Result<(), ConfigError> {
    use super::QueueSourceKind;
    if q.interval < std::time::Duration::from_secs(1) {
        return Err(invalid(
            "ImageCache.Queue.Interval",
            "must be at least 1s".into(),
        ));
    }
    if q.horizon.is_zero() {
        return Err(invalid(
            "ImageCache.Queue.Horizon",
            "must be more than 0s".into(),
        ));
    }
    if q.timeout.is_zero() {
        return Err(invalid(
            "ImageCache.Queue.Timeout",
            "must be more than 0s".into(),
        ));
    }
    match q.source {
        QueueSourceKind::Command => match q.command.first() {
            None => Err(invalid(
                "ImageCache.Queue.Command",
                "is required with Source: command: the program (absolute path) and its arguments"
                    .into(),
            )),
            Some(p) if !std::path::Path::new(p).is_absolute() => Err(invalid(
                "ImageCache.Queue.Command",
                format!("{p:?} must be an absolute path"),
            )),
            Some(_) => Ok(()),
        },
        _ if !q.command.is_empty() => Err(invalid(
            "ImageCache.Queue.Command",
            "is only read with Source: command".into(),
        )),
        _ => Ok(()),
    }
}
