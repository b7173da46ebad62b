//! Hostile input through the raw API, past the CLI's own checks: it is refused with a short,
//! one-line error, and nothing of it reaches the log as a line of its own.

mod common;

use cimage::api::pb;
use common::*;

fn pull_raw(d: &Daemon, image: &str) -> tonic::Status {
    block_on(async {
        cimage::api::client(&d.socket())
            .pull(pb::PullRequest {
                image: image.to_owned(),
                policy: pb::PullPolicy::IfNotPresent as i32,
                credentials: None,
            })
            .await
            .expect_err("a hostile reference must be refused")
    })
}

#[test]
fn control_characters_and_huge_references_are_refused_shortly_and_forge_no_log_line() {
    let d = Daemon::start("");
    let forged = "FORGED-cimage-log-line";
    for image in [
        format!(
            "{}/app:1\n2026-01-01T00:00:00Z  INFO {forged}",
            d.testbed.registry
        ),
        format!("{}/app:1\r{forged}", d.testbed.registry),
        format!("{}/app\0:1", d.testbed.registry),
    ] {
        let s = pull_raw(&d, &image);
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{image:?}");
        assert!(
            !s.message().contains('\n') && !s.message().contains('\r'),
            "{s:?}"
        );
    }
    let huge = format!("{}/{}:1", d.testbed.registry, "a".repeat(100 * 1024));
    let s = pull_raw(&d, &huge);
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    assert!(s.message().len() < 300, "{} characters", s.message().len());
    let log = d.log();
    assert!(
        !log.lines()
            .any(|l| l.contains(forged) && !l.contains("app:1")),
        "a forged line in the log:\n{log}"
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_client_that_stops_reading_a_steps_output_does_not_grow_the_daemon() {
    let d = Daemon::start("");
    let pid = d.child.as_ref().unwrap().id();
    let img = busybox(&d.testbed);
    // Warm the image and the paths first, then take the idle footprint.
    assert!(run(&d, &["--image", &img], &["true"]).status.success());
    let idle = rss_kib(pid);
    let line = "x".repeat(1023);
    let script = format!("/bin/busybox yes {line} | /bin/busybox head -c 300000000");
    let stalled = block_on(async {
        let mut launcher = cimage::api::launcher_client(&d.socket());
        let stream = launcher
            .launch(pb::LaunchRequest {
                image: img.clone(),
                command: vec!["sh".into(), "-c".into(), script],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // Hold the stream without reading until the step has finished.
        for _ in 0..1200 {
            let ps: serde_json::Value =
                serde_json::from_slice(&d.cli(&["ps", "-o", "json"]).stdout).unwrap();
            if ps.as_array().is_some_and(|a| a.is_empty()) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let peak = rss_kib(pid);
        drop(stream);
        peak
    });
    assert!(
        stalled < idle + 64 * 1024,
        "daemon RSS went from {idle} KiB to {stalled} KiB"
    );
    // The output is all in the log.
    let ps: serde_json::Value =
        serde_json::from_slice(&d.cli(&["ps", "-a", "-o", "json"]).stdout).unwrap();
    let task = ps.as_array().unwrap()[0]["id"].as_str().unwrap().to_owned();
    let logs = d.cli(&["logs", &task]);
    assert_eq!(logs.stdout.len(), 300_000_000);
}
