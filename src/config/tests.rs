//! Unit tests of loading and validating the config file.

use std::path::{Path, PathBuf};
use std::time::Duration;

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
    assert_eq!(
        s.image_cache.default_pull_policy,
        DefaultPullPolicy::IfNotPresent
    );
    let by_tag = GOOD.replace(
        "  PullTimeout: 10m",
        "  PullTimeout: 10m\n  DefaultPullPolicy: ByTag",
    );
    let s = parse(&by_tag, Path::new("c.yaml")).unwrap();
    assert_eq!(s.image_cache.default_pull_policy, DefaultPullPolicy::ByTag);
    let e = err(&GOOD.replace(
        "  PullTimeout: 10m",
        "  PullTimeout: 10m\n  DefaultPullPolicy: Sometimes",
    ));
    assert!(
        e.contains("Sometimes") || e.contains("DefaultPullPolicy"),
        "{e}"
    );
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
    assert!(err(&format!("{base}  MaxPullsPerUser: 0\n")).contains("MaxPullsPerUser"));
    assert!(err(&format!("{base}  PullResolveTimeout: 0s\n")).contains("PullResolveTimeout"));
    assert!(err(&format!("{base}  Socket: relative.sock\n")).contains("absolute"));
    for bad in ["crane", "/crane/{user}", "/crane/../x", "crane/{uid}.slice"] {
        let e = err(&format!(
            "{base}  Launcher:\n    AllowedCgroupParents: [\"{bad}\"]\n"
        ));
        assert!(
            e.contains("AllowedCgroupParents") && e.contains("placeholder"),
            "{bad}: {e}"
        );
    }
    for good in [
        "/crane",
        "/crane/user_{uid}",
        "crane.slice",
        "crane-uid_{uid}.slice",
    ] {
        let c = format!("{base}  Launcher:\n    AllowedCgroupParents: [\"{good}\"]\n");
        assert!(parse(&c, Path::new("c.yaml")).is_ok(), "{good}");
    }
    assert!(
        err("Container:\n  Enabled: true\n  RuntimeEndpoint: tcp://1.2.3.4:1\n").contains("unix")
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

#[test]
fn the_image_service_upstream_never_loops_back_to_cimaged() {
    // One config shared with Craned: its ImageEndpoint is cimaged's socket, cimaged goes to the
    // runtime.
    let shared = GOOD.replace(
        "  RuntimeEndpoint: /run/containerd/containerd.sock",
        "  RuntimeEndpoint: /run/containerd/containerd.sock\n  ImageEndpoint: unix:///run/cimage/image.sock",
    );
    let s = parse(&shared, Path::new("c.yaml")).unwrap();
    assert_eq!(
        s.image_endpoint,
        PathBuf::from("/run/containerd/containerd.sock")
    );
    assert!(s.image_cache.image_service.enabled);
    assert_eq!(
        s.image_cache.image_service.socket,
        PathBuf::from(DEFAULT_IMAGE_SERVICE_SOCKET)
    );
    // An explicit upstream wins; one that is cimaged's own socket is refused by name.
    let with = |lines: &str| {
        GOOD.replace(
            "  PullTimeout: 10m",
            &format!("  PullTimeout: 10m\n{lines}"),
        )
    };
    let s = parse(
        &with("  ImageService:\n    Upstream: /run/crio/crio.sock"),
        Path::new("c.yaml"),
    )
    .unwrap();
    assert_eq!(s.image_endpoint, PathBuf::from("/run/crio/crio.sock"));
    let e = err(&with(
        "  ImageService:\n    Upstream: /run/cimage/image.sock",
    ));
    assert!(
        e.contains("ImageCache.ImageService.Upstream") && e.contains("call itself"),
        "{e}"
    );
    let e = err(&with(
        "  ImageService:\n    Socket: /run/containerd/containerd.sock",
    ));
    assert!(
        e.contains("Container.RuntimeEndpoint") && e.contains("call itself"),
        "{e}"
    );
    let e = err(&with(
        "  ImageService:\n    Socket: /run/cimage/cimaged.sock",
    ));
    assert!(e.contains("socket of its own"), "{e}");
}

#[test]
fn what_a_uids_requests_may_hold_and_the_cri_sockets_connections_are_read_and_checked() {
    let s = parse(GOOD, Path::new("c.yaml")).unwrap();
    let ic = &s.image_cache;
    assert_eq!(ic.max_request_bytes_per_user, 64 << 20);
    assert_eq!(ic.max_request_bytes_per_admin, 1 << 30);
    assert_eq!(ic.request_read_timeout, Duration::from_secs(30));
    assert_eq!(ic.image_service.max_connections, 512);
    let set = GOOD.replace(
        "  PullTimeout: 10m",
        "  PullTimeout: 10m\n  MaxRequestBytesPerUser: 8MiB\n  MaxRequestBytesPerAdmin: 2GiB\n  RequestReadTimeout: 5s\n  ImageService:\n    MaxConnections: 64",
    );
    let s = parse(&set, Path::new("c.yaml")).unwrap();
    let ic = &s.image_cache;
    assert_eq!(ic.max_request_bytes_per_user, 8 << 20);
    assert_eq!(ic.max_request_bytes_per_admin, 2 << 30);
    assert_eq!(ic.request_read_timeout, Duration::from_secs(5));
    assert_eq!(ic.image_service.max_connections, 64);
    for (line, key) in [
        ("  MaxRequestBytesPerUser: 1MiB", "MaxRequestBytesPerUser"),
        ("  MaxRequestBytesPerAdmin: 100", "MaxRequestBytesPerUser"),
        ("  RequestReadTimeout: 0s", "RequestReadTimeout"),
        (
            "  ImageService:\n    MaxConnections: 0",
            "ImageService.MaxConnections",
        ),
        ("  MaxRequestBytesPerUser: lots", "MaxRequestBytesPerUser"),
    ] {
        let e = err(&GOOD.replace("  PullTimeout: 10m", &format!("  PullTimeout: 10m\n{line}")));
        assert!(e.contains(key), "{line}: {e}");
    }
}
