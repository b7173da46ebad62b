//! What `cimaged --check` prints: the settings a config resolves to, after validation, so an
//! admin sees what the daemon would run with (paths, limits, schedules, the queue source)
//! before starting it.

use cimage::config::Settings;
use cimage::units::format_duration;

use crate::wiring::Wiring;

/// Prints the resolved settings of a valid config.
pub(crate) fn print_settings(s: &Settings, w: &Wiring) {
    let ic = &s.image_cache;
    println!("config: {} is valid", s.source.display());
    println!("runtime endpoint: {}", s.runtime_endpoint.display());
    println!("image endpoint:   {}", s.image_endpoint.display());
    println!("temp dir:         {}", s.temp_dir.display());
    println!("index:            {}", s.index_path().display());
    println!("socket:           {}", ic.socket.display());
    match ic.image_service.enabled {
        true => println!("CRI image socket: {}", ic.image_service.socket.display()),
        false => println!("CRI image socket: off"),
    }
    println!(
        "max concurrent pulls: {} (at most {} for a user who is not an admin)",
        ic.max_concurrent_pulls, ic.max_pulls_per_user
    );
    println!("pull timeout:     {}", format_duration(ic.pull_timeout));
    println!(
        "pull resolve:     a pull with neither its manifest nor any bytes after {} fails",
        format_duration(ic.pull_resolve_timeout)
    );
    match ic.pull_byte_progress {
        true => println!(
            "pull progress:    bytes; a pull stalls after {} without",
            format_duration(ic.pull_stall_timeout)
        ),
        false => println!("pull progress:    phases only (PullByteProgress: false)"),
    }
    println!("pull retries:     {}", ic.pull_retries);
    println!(
        "reconcile every:  {}",
        format_duration(ic.reconcile_interval)
    );
    println!("presence ttl:     {}", format_duration(ic.presence_ttl));
    for (host, r) in &ic.registries {
        println!(
            "registry {host}: {}{}{}{}",
            if r.insecure { "plain HTTP" } else { "HTTPS" },
            r.ca_file
                .as_ref()
                .map(|c| format!(", CA {}", c.display()))
                .unwrap_or_default(),
            if r.mirrors.is_empty() {
                String::new()
            } else {
                format!(", mirrors {}", r.mirrors.join(" "))
            },
            r.max_concurrent_pulls
                .map(|n| format!(", at most {n} pulls at once"))
                .unwrap_or_default()
        );
    }
    println!("verify access:    {:?}", ic.auth.verify);
    for f in &ic.auth.config_files {
        println!("node auth file:   {}", f.display());
    }
    for (host, helper) in &ic.auth.credential_helpers {
        println!("credential helper for {host}: docker-credential-{helper}");
    }
    match &w.eviction {
        None => println!("eviction:         off"),
        Some(e) => println!(
            "eviction:         above {}% down to {}%, max {}, min age {}, max unused {}",
            e.high_percent,
            e.low_percent,
            e.max_bytes
                .map(|b| format!("{b} bytes"))
                .unwrap_or_else(|| "unbounded".into()),
            format_duration(e.min_age),
            e.max_unused_age
                .map(format_duration)
                .unwrap_or_else(|| "off".into())
        ),
    }
    println!(
        "launcher:         logs in {}, grace {}, mounts under {}",
        s.log_dir.display(),
        format_duration(ic.launcher.stop_grace_period),
        if ic.launcher.allowed_mount_prefixes.is_empty() {
            "(none allowed)".to_string()
        } else {
            ic.launcher
                .allowed_mount_prefixes
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    println!(
        "step logs:        rotated past {} bytes, {} files a step, {} bytes in all",
        ic.launcher.max_log_size, ic.launcher.max_log_files, ic.launcher.max_log_dir_size
    );
    println!(
        "processes:        {} per job's pod",
        match ic.launcher.pids_limit {
            0 => "no limit of cimage's".to_owned(),
            n => n.to_string(),
        }
    );
    for sc in &ic.prewarm.schedules {
        println!(
            "pre-warm {}: \"{}\" {}",
            sc.name,
            sc.cron,
            sc.time_zone.as_deref().unwrap_or("UTC")
        );
    }
    println!(
        "metrics:          {}",
        ic.metrics_addr.as_deref().unwrap_or("off")
    );
}
