//! From the configuration file's model to each module's own settings. This is the only place
//! that knows both: `config` describes the file and nothing else, and the domain modules take
//! plain settings structs. A domain module imports from `config` only its named defaults (so
//! that its own `Default` and the file's agree by construction), never the file model; `config`
//! imports no domain module.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use cimage::api::gate::Limits;
use cimage::cache::{EvictionSettings, IndexSettings};
use cimage::config::{
    ConfigError, DefaultPullPolicy, OnRegistryUnavailable, ParallelFetchEnabled, QueueSourceKind,
    Settings, VerifyMode, DEFAULT_PREWARM_CONCURRENCY,
};
use cimage::credentials::NodeCredentials;
use cimage::expect::ExpectSettings;
use cimage::fetch::{FetchMode, FetchSettings};
use cimage::launcher::LauncherSettings;
use cimage::policy::{DefaultPolicy, Verify};
use cimage::prewarm::ScheduleSpec;
use cimage::puller::{PullerSettings, DEFAULT_BACKOFF};
use cimage::registry::HostSettings;

/// Every module's settings, derived from one validated configuration.
#[derive(Debug, Clone)]
pub struct Wiring {
    /// The puller's limits, timings and credential sources.
    pub puller: PullerSettings,
    /// Eviction rules, or `None` when eviction is off.
    pub eviction: Option<EvictionSettings>,
    /// How long the runtime's word that an image is present is trusted.
    pub presence_ttl: Duration,
    /// How the index ranks images and how long it remembers those that left.
    pub index: IndexSettings,
    /// Deadline of one CRI call that is not a pull.
    pub runtime_timeout: Duration,
    /// How often the index is reconciled with the runtime.
    pub reconcile_interval: Duration,
    /// Connections each caller may hold on the API socket, the idle timeout, and what its
    /// requests may hold before they have arrived whole.
    pub connections: Limits,
    /// The launcher's mount prefixes, grace period and log directory.
    pub launcher: LauncherSettings,
    /// How to reach each configured registry host.
    pub registries: BTreeMap<String, HostSettings>,
    /// Schedules defined by the config file, validated and normalised.
    pub schedules: Vec<ScheduleSpec>,
    /// How expectations behave.
    pub expect: ExpectSettings,
    /// The queue source, if one is configured.
    pub queue: Option<QueueWiring>,
    /// cimage's own range fetch of big layers.
    pub fetch: FetchSettings,
}

/// Which queue source cimaged asks, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueWiring {
    /// Slurm, for this node name.
    Slurm {
        /// The node's name in Slurm.
        node: String,
        /// Bound of one command.
        timeout: Duration,
    },
    /// A site's command.
    Command {
        /// The program and its arguments.
        argv: Vec<String>,
        /// Bound of one run.
        timeout: Duration,
    },
}

/// This host's short name (up to the first dot), as Slurm names nodes by default.
fn short_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // truncates, and the slice below stops at the first NUL.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let name = if ok {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    name.split('.').next().unwrap_or("").to_owned()
}

/// Maps the configuration onto each module's settings, and runs the checks that need a
/// module's own rules (cron expressions, time zones, image references of schedules). Errors name
/// the key, like the file's own validation.
pub fn wire(s: &Settings) -> Result<Wiring, ConfigError> {
    let ic = &s.image_cache;
    let invalid = |key: &'static str, message: String| ConfigError::Invalid {
        path: s.source.clone(),
        key,
        message,
    };
    let mut schedules = Vec::with_capacity(ic.prewarm.schedules.len());
    for sc in &ic.prewarm.schedules {
        let mut spec = ScheduleSpec {
            name: sc.name.clone(),
            cron: sc.cron.clone(),
            time_zone: sc.time_zone.clone(),
            images: sc.images.clone(),
            top: sc.top,
            jitter_ms: sc.jitter.map(|j| j.as_millis() as u64).unwrap_or(0),
            concurrency: sc.concurrency.unwrap_or(DEFAULT_PREWARM_CONCURRENCY),
            catch_up: sc.catch_up,
            from_config: true,
        };
        spec.parse()
            .map_err(|e| invalid("ImageCache.Prewarm.Schedules", e.to_string()))?;
        schedules.push(spec);
    }
    let ev = &ic.eviction;
    let q = &ic.queue;
    let queue = match q.source {
        QueueSourceKind::None => None,
        QueueSourceKind::Slurm => Some(QueueWiring::Slurm {
            node: match &q.node_name {
                Some(n) if !n.trim().is_empty() => n.trim().to_owned(),
                _ => {
                    let n = short_hostname();
                    if n.is_empty() {
                        return Err(invalid(
                            "ImageCache.Queue.NodeName",
                            "is needed: this host's name could not be read".into(),
                        ));
                    }
                    n
                }
            },
            timeout: q.timeout,
        }),
        QueueSourceKind::Command => Some(QueueWiring::Command {
            argv: q.command.clone(),
            timeout: q.timeout,
        }),
    };
    let pf = &ic.parallel_fetch;
    let fetch = FetchSettings {
        mode: match pf.enabled {
            ParallelFetchEnabled::Auto => FetchMode::Auto,
            ParallelFetchEnabled::True => FetchMode::On,
            ParallelFetchEnabled::False => FetchMode::Off,
        },
        connections_per_pull: pf.connections_per_pull,
        connections_per_registry: pf.connections_per_registry,
        segment_size: pf.segment_size,
        min_blob_size: pf.min_blob_size,
        max_buffer_per_pull: pf.max_buffer_per_pull,
        stall_timeout: ic.pull_stall_timeout,
        // The daemon is its state directory: a restarted one finds its leases by it.
        owner: {
            use sha2::Digest;
            let h = sha2::Sha256::digest(s.state_dir.to_string_lossy().as_bytes());
            h[..8].iter().map(|b| format!("{b:02x}")).collect()
        },
        ..FetchSettings::default()
    };
    Ok(Wiring {
        fetch,
        puller: PullerSettings {
            max_concurrent_pulls: ic.max_concurrent_pulls,
            per_registry: ic
                .registries
                .iter()
                .filter_map(|(h, r)| r.max_concurrent_pulls.map(|n| (h.clone(), n)))
                .collect::<HashMap<_, _>>(),
            max_pulls_per_user: ic.max_pulls_per_user,
            pull_timeout: ic.pull_timeout,
            resolve_timeout: ic.pull_resolve_timeout,
            stall_timeout: ic.pull_stall_timeout,
            byte_progress: ic.pull_byte_progress,
            retries: ic.pull_retries,
            backoff: DEFAULT_BACKOFF,
            verify: match ic.auth.verify {
                VerifyMode::IfPulledWithCredentials => Verify::IfPulledWithCredentials,
                VerifyMode::Always => Verify::Always,
                VerifyMode::Never => Verify::Never,
            },
            node_credentials: NodeCredentials {
                config_files: ic.auth.config_files.clone(),
                helpers: ic.auth.credential_helpers.clone(),
                ..NodeCredentials::default()
            },
            use_cached_when_registry_down: ic.on_registry_unavailable
                == OnRegistryUnavailable::UseCached,
            // Only the configured registries and their mirrors are named in metrics.
            labelled_registries: ic
                .registries
                .iter()
                .flat_map(|(h, r)| std::iter::once(h.clone()).chain(r.mirrors.iter().cloned()))
                .collect(),
            default_policy: match ic.default_pull_policy {
                DefaultPullPolicy::IfNotPresent => DefaultPolicy::IfNotPresent,
                DefaultPullPolicy::Always => DefaultPolicy::Always,
                DefaultPullPolicy::ByTag => DefaultPolicy::ByTag,
            },
            // Replaced at start by one keyed with ImageCache.NodeKeyFile (reading the key is
            // start-up's business, not the mapping's).
            ..PullerSettings::default()
        },
        eviction: ev.enabled.then(|| EvictionSettings {
            high_percent: ev.high_percent,
            low_percent: ev.low_percent,
            max_bytes: ev.max_bytes,
            min_age: ev.min_age,
            max_unused_age: ev.max_unused_age,
            path: ev.path.clone(),
        }),
        presence_ttl: ic.presence_ttl,
        index: IndexSettings {
            popularity_half_life: ic.prewarm.popularity_half_life,
            forget_absent_after: ic.prewarm.forget_absent_after,
        },
        runtime_timeout: ic.runtime_timeout,
        reconcile_interval: ic.reconcile_interval,
        connections: Limits {
            per_user: ic.max_connections_per_user,
            per_admin: ic.max_connections_per_admin,
            idle: ic.connection_idle_timeout,
            request_bytes_per_user: ic.max_request_bytes_per_user,
            request_bytes_per_admin: ic.max_request_bytes_per_admin,
            request_read_timeout: ic.request_read_timeout,
        },
        launcher: LauncherSettings {
            allowed_mount_prefixes: ic.launcher.allowed_mount_prefixes.clone(),
            stop_grace: ic.launcher.stop_grace_period,
            log_dir: s.log_dir.clone(),
            allowed_devices: ic.launcher.allowed_devices.clone(),
            allow_user_launch: ic.launcher.allow_user_launch,
            max_launches_per_user: ic.launcher.max_launches_per_user,
            allowed_cgroup_parents: ic.launcher.allowed_cgroup_parents.clone(),
            history: cimage::launcher::history::HistorySettings {
                keep: ic.history.keep,
                max_tasks: ic.history.max_tasks,
                keep_logs: ic.history.keep_logs,
            },
            logs: cimage::launcher::log_files::LogLimits {
                max_size: ic.launcher.max_log_size,
                max_files: ic.launcher.max_log_files,
                max_dir_size: ic.launcher.max_log_dir_size,
            },
            pids_limit: ic.launcher.pids_limit,
            cgroup_root: Default::default(),
        },
        registries: ic
            .registries
            .iter()
            .map(|(host, r)| {
                (
                    host.clone(),
                    HostSettings {
                        insecure: r.insecure,
                        ca_file: r.ca_file.clone(),
                        mirrors: r.mirrors.clone(),
                    },
                )
            })
            .collect(),
        schedules,
        expect: ExpectSettings {
            grace: ic.expect.grace,
            max_per_user: ic.expect.max_per_user,
            concurrency: ic.max_concurrent_pulls,
            interval: q.interval,
            horizon: q.horizon,
            ..ExpectSettings::default()
        },
        queue,
    })
}

/// What start-up would fail on, checked before anything starts, so that `--check-config` calls
/// valid exactly what the daemon accepts: the registries' CA files, the node's auth files, the
/// socket and admin groups, the socket path's length and directory, the state directory, and
/// the metrics address. Each failure names its key.
pub fn preflight(s: &Settings, w: &Wiring) -> Result<(), ConfigError> {
    let ic = &s.image_cache;
    let invalid = |key: &'static str, message: String| ConfigError::Invalid {
        path: s.source.clone(),
        key,
        message,
    };
    cimage::registry::OciRegistry::new(&w.registries)
        .map_err(|e| invalid("ImageCache.Registries.*.CaFile", e.to_string()))?;
    for f in &ic.auth.config_files {
        cimage::credentials::from_auth_file(f, "preflight.invalid")
            .map_err(|e| invalid("ImageCache.Auth.ConfigFiles", e.to_string()))?;
    }
    for (key, group) in [
        ("ImageCache.SocketGroup", &ic.socket_group),
        ("ImageCache.AdminGroup", &ic.admin_group),
    ] {
        if let Some(g) = group {
            cimage::api::peer::resolve_group(g).map_err(|e| invalid(key, e.to_string()))?;
        }
    }
    let mut sockets = vec![("ImageCache.Socket", &ic.socket)];
    if ic.image_service.enabled {
        sockets.push(("ImageCache.ImageService.Socket", &ic.image_service.socket));
    }
    for (key, socket) in sockets {
        // sun_path holds 108 bytes with the terminating NUL.
        if socket.as_os_str().len() > 107 {
            return Err(invalid(
                key,
                format!(
                    "{} is {} bytes long; a unix socket path holds at most 107",
                    socket.display(),
                    socket.as_os_str().len()
                ),
            ));
        }
        if let Some(dir) = socket.parent() {
            if dir.exists() && !dir.is_dir() {
                return Err(invalid(
                    key,
                    format!("{} is not a directory", dir.display()),
                ));
            }
        }
    }
    if s.state_dir.exists() && !s.state_dir.is_dir() {
        return Err(invalid(
            "ImageCache.StateDir",
            format!("{} exists and is not a directory", s.state_dir.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const BASE: &str = "Container:\n  Enabled: true\n  RuntimeEndpoint: /x.sock\nImageCache:\n";

    #[test]
    fn every_section_reaches_its_module() {
        let s = cimage::config::parse(
            &format!("{BASE}  MaxConcurrentPulls: 5\n  Registries:\n    \"r:5000\":\n      Insecure: true\n      MaxConcurrentPulls: 1\n      Mirrors: [m:5000]\n  Auth:\n    Verify: Always\n  Eviction:\n    MaxBytes: 1GiB\n  Prewarm:\n    Schedules:\n      - Name: n\n        Cron: \"0 3 * * *\"\n        Images: [busybox]\n"),
            Path::new("c.yaml"),
        )
        .unwrap();
        let w = wire(&s).unwrap();
        assert_eq!(w.puller.max_concurrent_pulls, 5);
        assert_eq!(w.puller.per_registry.get("r:5000"), Some(&1));
        assert_eq!(w.puller.verify, Verify::Always);
        assert_eq!(w.eviction.unwrap().max_bytes, Some(1 << 30));
        assert!(w.registries["r:5000"].insecure);
        assert_eq!(w.registries["r:5000"].mirrors, ["m:5000"]);
        assert_eq!(
            w.puller.labelled_registries,
            ["m:5000".to_owned(), "r:5000".to_owned()].into()
        );
        assert_eq!(w.schedules[0].images, ["docker.io/library/busybox:latest"]);
        assert_eq!(w.schedules[0].concurrency, DEFAULT_PREWARM_CONCURRENCY);
        assert_eq!(
            w.index.popularity_half_life,
            cimage::config::DEFAULT_POPULARITY_HALF_LIFE
        );
    }

    #[test]
    fn preflight_checks_what_start_up_needs() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "not a directory").unwrap();
        let notpem = dir.path().join("ca.txt");
        std::fs::write(&notpem, "hello").unwrap();
        let long = format!("/{}/s.sock", "x".repeat(120));
        for (extra, key) in [
            (format!("CaFile: {}", notpem.display()), "CaFile"),
            (
                format!("CaFile: {}/missing.pem", dir.path().display()),
                "CaFile",
            ),
        ] {
            let text = format!("{BASE}  Registries:\n    \"r.io\":\n      {extra}\n");
            let s = cimage::config::parse(&text, Path::new("c.yaml")).unwrap();
            let e = preflight(&s, &wire(&s).unwrap()).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
        for (extra, key) in [
            (
                "  SocketGroup: no-such-group-cimage\n".to_owned(),
                "ImageCache.SocketGroup",
            ),
            (format!("  Socket: {long}\n"), "ImageCache.Socket"),
            (
                format!("  StateDir: {}\n", file.display()),
                "ImageCache.StateDir",
            ),
            (
                format!(
                    "  Auth:\n    ConfigFiles: [{}/missing.json]\n",
                    dir.path().display()
                ),
                "ImageCache.Auth.ConfigFiles",
            ),
        ] {
            let s = cimage::config::parse(&format!("{BASE}{extra}"), Path::new("c.yaml")).unwrap();
            let e = preflight(&s, &wire(&s).unwrap()).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        let s = cimage::config::parse(&format!("{BASE}  PullRetries: 1\n"), Path::new("c.yaml"))
            .unwrap();
        preflight(&s, &wire(&s).unwrap()).unwrap();
    }

    #[test]
    fn a_bad_schedule_names_the_key() {
        let s = cimage::config::parse(
            &format!("{BASE}  Prewarm:\n    Schedules:\n      - Name: n\n        Cron: \"every day\"\n        Images: [busybox]\n"),
            Path::new("c.yaml"),
        )
        .unwrap();
        let e = wire(&s).unwrap_err().to_string();
        assert!(
            e.contains("ImageCache.Prewarm.Schedules") && e.contains("cron"),
            "{e}"
        );
    }
}
