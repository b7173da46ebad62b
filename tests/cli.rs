//! The operator's view through the CLI: status as df sees the disk, images by manifest digest,
//! filters and quiet listings, several images at once, tasks of one job, the tail of a log,
//! exit statuses and JSON errors.

mod common;

use common::images::Layer;
use common::*;

/// `df`'s Use% of the filesystem holding `path`, as it prints it.
fn df_percent(path: &str) -> u64 {
    let out = std::process::Command::new("df")
        .args(["--output=pcent", path])
        .output()
        .expect("df");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .nth(1)
        .and_then(|l| l.trim().trim_end_matches('%').parse().ok())
        .unwrap_or_else(|| panic!("df said {text:?}"))
}

#[test]
fn status_reports_the_image_filesystem_as_df_does() {
    let d = Daemon::start("");
    let out = d.cli(&["status", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["healthy"], true, "{s}");
    let fs = &s["image_fs"];
    let mount = fs["mountpoint"].as_str().unwrap();
    let ours = fs["used_percent"].as_u64().unwrap();
    let df = df_percent(mount);
    assert!(
        ours.abs_diff(df) <= 1,
        "status {ours}% vs df {df}% for {mount}"
    );
    assert!(fs["size_bytes"].as_u64().unwrap() >= fs["used_bytes"].as_u64().unwrap());
    assert_eq!(s["pulls_in_flight"], 0);
    assert_eq!(s["history"]["max_tasks"], 100_000, "{s}");
    assert_eq!(s["history"]["keep_seconds"], 604_800.0);
    let table = stdout(&d.cli(&["status"]));
    assert!(
        table.contains(&format!("({ours}%, as df counts)")) && table.contains("healthy"),
        "{table}"
    );
}

#[test]
fn an_image_is_found_by_its_manifest_digest_and_listings_filter() {
    let d = Daemon::start("");
    let tb = d.testbed.clone();
    let a = tb.push_new("bydigest", &[Layer::random(2048)]);
    let b = tb.push_new("other", &[Layer::random(2048)]);
    let j = d.pull_json(&a.reference, None);
    let id = j["image_id"].as_str().unwrap().to_owned();
    assert_eq!(j["manifest_digest"], a.digest.as_str());
    d.pull_json(&b.reference, None);
    // The table labels both.
    let out = d.cli(&["pull", &a.reference]);
    let text = stdout(&out);
    assert!(
        text.contains(&format!("manifest digest: {}", a.digest))
            && text.contains(&format!("image id:        {id}")),
        "{text}"
    );
    for arg in [&a.digest, &id] {
        let out = d.cli(&["inspect", arg, "-o", "json"]);
        assert!(out.status.success(), "{arg}: {}", stderr(&out));
        let i: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(i["id"], id.as_str(), "{arg}");
    }
    // images REPO keeps that repository; -q prints ids only.
    let repo = format!("{}/{}", tb.registry, a.repo);
    let out = d.cli(&["images", &repo, "-q"]);
    assert_eq!(stdout(&out).trim(), id, "{}", stderr(&out));
    let out = d.cli(&["images", &b.reference, "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert!(listed[0]["size_bytes"].as_u64().unwrap() > 2048);

    // rm takes several images, checked before anything is removed.
    let out = d.cli(&["rm", &a.reference, "Bad:Ref:x"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(ctr_images(&tb).contains(&a.reference), "nothing removed");
    let out = d.cli(&["rm", &a.digest, &b.reference]);
    assert!(out.status.success(), "{}", stderr(&out));
    let images = ctr_images(&tb);
    assert!(!images.contains(&a.reference) && !images.contains(&b.reference));
    // Now absent: not found, with a JSON error under -o json.
    let out = d.cli(&["inspect", &b.reference, "-o", "json"]);
    assert_eq!(out.status.code(), Some(3));
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["error"]["code"], "not_found", "{e}");
    assert_eq!(e["error"]["exit"], 3);
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains(&b.reference));
}

#[test]
fn exit_statuses_say_what_went_wrong() {
    let d = Daemon::start("");
    let tb = d.testbed.clone();
    let absent = format!(
        "{}/never-pushed-{:08x}:1",
        tb.registry,
        rand::random::<u32>()
    );
    let out = d.cli(&["pull", &absent, "--policy", "Never", "-o", "json"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["error"]["code"], "not_found");
    // A daemon that is not there is unavailable.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cimage"))
        .args(["--socket", "/nonexistent/cimaged.sock", "images"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    // A flag that does not exist is a usage error.
    let out = d.cli(&["images", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn tasks_of_one_job_and_the_tail_of_a_log() {
    let port = free_port();
    let d = Daemon::start(&format!("MetricsAddr: 127.0.0.1:{port}"));
    let image = busybox(&d.testbed);
    let job = format!("tail-{:08x}", rand::random::<u32>());
    let out = run(
        &d,
        &["--image", &image, "--job", &job],
        &["sh", "-c", "for i in $(seq 1 500); do echo line $i; done"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&d, &["--image", &image], &["true"]);
    assert!(out.status.success());
    let ps = d.cli(&["ps", "--job", &job, "-o", "json"]);
    let tasks: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
    let tasks = tasks.as_array().unwrap();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let id = tasks[0]["id"].as_str().unwrap();
    let out = d.cli(&["logs", "--tail", "3", id]);
    assert_eq!(stdout(&out), "line 498\nline 499\nline 500\n");
    let _ = d.cli(&["end-job", &job]);
    // Each launch stage was timed, once per step.
    let page = scrape(port);
    for stage in ["sandbox", "image", "create", "start"] {
        assert_eq!(
            series(
                &page,
                &format!("cimage_launch_duration_seconds_count{{stage=\"{stage}\"}}")
            ),
            2.0,
            "{stage}: {page}"
        );
    }
    assert_eq!(
        series(
            &page,
            "cimage_request_duration_seconds_count{result=\"cached\"}"
        ) + series(
            &page,
            "cimage_request_duration_seconds_count{result=\"pulled\"}"
        ),
        2.0
    );
}
