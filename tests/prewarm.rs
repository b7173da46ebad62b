//! Scheduled pre-warming and metrics against the real containerd and registry.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::images::{push, Layer};
use common::*;

fn history(d: &Daemon, name: &str) -> Vec<serde_json::Value> {
    let out = d.cli(&["prewarm", "history", name, "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn wait_for(d: &Daemon, what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn schedule_yaml(name: &str, cron: &str, images: &[&str], extra: &str) -> String {
    let list = images
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!("Prewarm:\n  Schedules:\n    - Name: {name}\n      Cron: \"{cron}\"\n      Images: [{list}]\n{extra}")
}

#[test]
fn a_schedule_pulls_its_images_and_records_history() {
    let tb = Testbed::get();
    let img = tb.push_new("cron", &[Layer::random(2048)]);
    let d = Daemon::start(&schedule_yaml(
        "every2s",
        "*/2 * * * * *",
        &[&img.reference],
        "",
    ));
    wait_for(&d, "a successful run", Duration::from_secs(15), || {
        history(&d, "every2s").iter().any(|r| r["outcome"] == "ok")
    });
    let runs = history(&d, "every2s");
    let first = runs.iter().find(|r| r["outcome"] == "ok").unwrap();
    assert_eq!(first["trigger"], "cron");
    let image = &first["images"][0];
    assert_eq!(image["image"], img.reference.as_str());
    assert_eq!(image["outcome"], "pulled");
    assert!(image["pulled_bytes"].as_u64().unwrap() > 2048);
    assert!(ctr_images(&tb).contains(&img.reference));
    // Later runs find it current.
    wait_for(&d, "a cached run", Duration::from_secs(15), || {
        history(&d, "every2s")
            .iter()
            .any(|r| r["images"][0]["outcome"] == "cached")
    });
    let ls: serde_json::Value =
        serde_json::from_slice(&d.cli(&["prewarm", "ls", "-o", "json"]).stdout).unwrap();
    assert_eq!(ls[0]["name"], "every2s");
    assert_eq!(ls[0]["from_config"], true);
    assert!(ls[0]["next_fire"].is_string());
}

#[test]
fn an_overlapping_fire_is_skipped_and_recorded() {
    // A "registry" that accepts connections and never answers: the run hangs until PullTimeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = format!("127.0.0.1:{}", silent.local_addr().unwrap().port());
    let keep: Vec<_> = Vec::new();
    let accepting = std::thread::spawn(move || {
        let mut keep = keep;
        for s in silent.incoming().take(20) {
            keep.push(s);
        }
    });
    let image = format!("{host}/hangs:1");
    let d = Daemon::start(&format!(
        "PullTimeout: 4s\n{}",
        schedule_yaml("overlap", "* * * * * *", &[&image], "")
    ));
    wait_for(&d, "a skipped fire", Duration::from_secs(20), || {
        history(&d, "overlap")
            .iter()
            .any(|r| r["outcome"] == "skipped")
    });
    wait_for(
        &d,
        "the hanging run to fail",
        Duration::from_secs(20),
        || {
            history(&d, "overlap")
                .iter()
                .any(|r| r["outcome"] == "failed")
        },
    );
    let runs = history(&d, "overlap");
    let failed = runs.iter().find(|r| r["outcome"] == "failed").unwrap();
    let err = failed["images"][0]["error"].as_str().unwrap();
    assert!(err.contains("did not finish within 4s"), "{err}");
    drop(d);
    drop(accepting);
}

#[test]
fn top_two_refresh_and_jitter() {
    let tb = Testbed::get();
    let d = Daemon::start("");
    let mut imgs = Vec::new();
    for (n, uses) in [("a", 3), ("b", 2), ("c", 1)] {
        let repo = Testbed::unique_repo(&format!("top{n}"));
        let p = block_on(push(
            &tb.registry,
            &repo,
            "1",
            &[Layer::random(1024)],
            &["sh"],
        ));
        for _ in 0..uses {
            d.pull_json(&p.reference, None);
        }
        imgs.push(p);
    }
    let out = d.cli(&[
        "prewarm",
        "add",
        "top2",
        "--cron",
        "0 3 * * *",
        "--top",
        "2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.cli(&["prewarm", "run", "top2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = history(&d, "top2").pop().unwrap();
    let mut picked: Vec<&str> = run["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["image"].as_str().unwrap())
        .collect();
    picked.sort();
    let mut want = vec![imgs[0].reference.as_str(), imgs[1].reference.as_str()];
    want.sort();
    assert_eq!(picked, want, "Top 2 are the two most used");
    let top: serde_json::Value =
        serde_json::from_slice(&d.cli(&["top", "-o", "json"]).stdout).unwrap();
    assert_eq!(top[0]["image"]["names"][0], imgs[0].reference.as_str());

    // The tag of a moves: the next run refreshes it.
    let repo_a = imgs[0]
        .reference
        .split('/')
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .to_owned();
    block_on(push(
        &tb.registry,
        &repo_a,
        "1",
        &[Layer::random(1024)],
        &["sh"],
    ));
    let out = d.cli(&["prewarm", "run", "top2"]);
    assert!(stdout(&out).contains("refreshed"), "{}", stdout(&out));
    let run = history(&d, "top2").pop().unwrap();
    let a = run["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["image"] == imgs[0].reference.as_str())
        .unwrap();
    assert_eq!(a["outcome"], "refreshed");

    // Jitter: cron-fired runs start within the bound after their fire time, not all at once.
    let out = d.cli(&[
        "prewarm",
        "add",
        "jit",
        "--cron",
        "*/2 * * * * *",
        "--image",
        &imgs[2].reference,
        "--jitter",
        "1s",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for(&d, "three jittered runs", Duration::from_secs(30), || {
        history(&d, "jit")
            .iter()
            .filter(|r| r["outcome"] == "ok")
            .count()
            >= 3
    });
    let runs: Vec<serde_json::Value> = history(&d, "jit")
        .into_iter()
        .filter(|r| r["outcome"] == "ok")
        .collect();
    let jitters: Vec<u64> = runs
        .iter()
        .map(|r| (r["jitter_seconds"].as_f64().unwrap() * 1000.0).round() as u64)
        .collect();
    assert!(jitters.iter().all(|j| *j <= 1000), "{jitters:?}");
    assert!(
        jitters.windows(2).any(|w| w[0] != w[1]),
        "jitter varies: {jitters:?}"
    );
    d.cli(&["prewarm", "rm", "jit"]);
}

#[test]
fn an_api_schedule_survives_kill_9_and_a_missed_run_is_caught_up_once() {
    let tb = Testbed::get();
    let img = tb.push_new("catchup", &[Layer::random(1024)]);
    let mut d = Daemon::start("");
    let out = d.cli(&[
        "prewarm",
        "add",
        "cu",
        "--cron",
        "*/3 * * * * *",
        "--image",
        &img.reference,
        "--catch-up",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for(&d, "a first run", Duration::from_secs(15), || {
        !history(&d, "cu").is_empty()
    });
    d.kill9();
    std::thread::sleep(Duration::from_secs(7));
    d.spawn();
    let ls: serde_json::Value =
        serde_json::from_slice(&d.cli(&["prewarm", "ls", "-o", "json"]).stdout).unwrap();
    assert_eq!(ls[0]["name"], "cu", "the schedule survived: {ls}");
    assert_eq!(ls[0]["catch_up"], true);
    wait_for(&d, "the catch-up run", Duration::from_secs(10), || {
        history(&d, "cu")
            .iter()
            .any(|r| r["trigger"] == "catch_up" && r["outcome"] != "running")
    });
    std::thread::sleep(Duration::from_secs(4));
    let catch_ups = history(&d, "cu")
        .iter()
        .filter(|r| r["trigger"] == "catch_up")
        .count();
    assert_eq!(catch_ups, 1, "{:#?}", history(&d, "cu"));
    assert!(d.log().contains("catching up"), "{}", d.log());
}

#[test]
fn bad_schedules_are_refused_with_the_reason() {
    let d = Daemon::start("");
    for (args, want) in [
        (
            vec!["--cron", "61 * * * *", "--image", "busybox:1"],
            "is not valid",
        ),
        (
            vec![
                "--cron",
                "0 3 * * *",
                "--tz",
                "Mars/Base",
                "--image",
                "busybox:1",
            ],
            "IANA",
        ),
        (vec!["--cron", "0 3 * * *"], "Images, Top or both"),
    ] {
        let mut all = vec!["prewarm", "add", "bad"];
        all.extend(args);
        let out = d.cli(&all);
        assert_eq!(out.status.code(), Some(2), "bad input is a usage error");
        assert!(stderr(&out).contains(want), "{}", stderr(&out));
    }
    let ls: serde_json::Value =
        serde_json::from_slice(&d.cli(&["prewarm", "ls", "-o", "json"]).stdout).unwrap();
    assert_eq!(ls, serde_json::json!([]), "nothing was added");
}

fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1.to_owned();
    (code, body)
}

#[test]
fn metrics_are_served_and_parse() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let tb = Testbed::get();
    let d = Daemon::start(&format!("MetricsAddr: {addr}"));
    let img = tb.push_new("metrics", &[Layer::random(1024)]);
    d.pull_json(&img.reference, Some("IfNotPresent"));
    d.pull_json(&img.reference, Some("IfNotPresent"));
    let (code, body) = http_get(&addr, "/metrics");
    assert_eq!(code, 200);
    let mut samples = std::collections::HashMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        samples.insert(name.to_owned(), v);
    }
    assert_eq!(
        samples["cimage_pulls_total{policy=\"IfNotPresent\",outcome=\"pulled\"}"],
        1.0
    );
    assert_eq!(
        samples["cimage_pulls_total{policy=\"IfNotPresent\",outcome=\"cached\"}"],
        1.0
    );
    // The same counts under the new name.
    for result in ["pulled", "cached"] {
        assert_eq!(
            samples
                [&format!("cimage_requests_total{{policy=\"IfNotPresent\",result=\"{result}\"}}")],
            1.0
        );
    }
    assert_eq!(samples["cimage_cache_hits_total"], 1.0);
    let reg = format!("registry=\"{}\"", tb.registry);
    assert!(samples[&format!("cimage_pulled_bytes_total{{{reg}}}")] > 1024.0);
    // A real pull's duration once; each request's under its result.
    assert_eq!(
        samples[&format!("cimage_pull_duration_seconds_count{{{reg}}}")],
        1.0
    );
    assert_eq!(
        samples["cimage_request_duration_seconds_count{result=\"cached\"}"],
        1.0
    );
    assert!(samples["cimage_images"] >= 1.0);
    for kind in ["counter", "histogram", "gauge"] {
        assert!(body.contains(&format!(" {kind}\n")), "TYPE {kind} declared");
    }
    let (code, body) = http_get(&addr, "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("runtime: ok") && body.contains("index: ok"),
        "{body}"
    );
    assert_eq!(http_get(&addr, "/nope").0, 404);
}

#[test]
fn popularity_outlives_presence_and_top_two_brings_back_removed_images() {
    let tb = Testbed::get();
    let d = Daemon::start("");
    let mut imgs = Vec::new();
    for (n, uses) in [("a", 5), ("b", 3), ("c", 1)] {
        let p = tb.push_new(&format!("gone{n}"), &[Layer::random(1024)]);
        for _ in 0..uses {
            d.pull_json(&p.reference, None);
        }
        imgs.push(p);
    }
    for p in &imgs {
        let out = d.cli(&["rm", &p.reference]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(!ctr_images(&tb).contains(&p.reference));
    }
    let top: serde_json::Value =
        serde_json::from_slice(&d.cli(&["top", "-o", "json"]).stdout).unwrap();
    let ranked: Vec<(String, bool, u64)> = top
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["image"]["names"][0].as_str().unwrap().to_owned(),
                t["absent"].as_bool().unwrap(),
                t["image"]["use_count"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, bool, u64)> = imgs
        .iter()
        .zip([5, 3, 1])
        .map(|(p, n)| (p.reference.clone(), true, n))
        .collect();
    assert_eq!(ranked, want);
    let out = d.cli(&["top"]);
    assert!(stdout(&out).contains("absent"), "{}", stdout(&out));
    let out = d.cli(&[
        "prewarm",
        "add",
        "back",
        "--cron",
        "0 3 * * *",
        "--top",
        "2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.cli(&["prewarm", "run", "back"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let present = ctr_images(&tb);
    assert!(present.contains(&imgs[0].reference) && present.contains(&imgs[1].reference));
    assert!(!present.contains(&imgs[2].reference), "only the top two");
    // Back on the node, each keeps its history.
    let top: serde_json::Value =
        serde_json::from_slice(&d.cli(&["top", "-o", "json"]).stdout).unwrap();
    assert_eq!(top[0]["image"]["use_count"], 5);
    assert_eq!(top[0]["absent"], false);
}
