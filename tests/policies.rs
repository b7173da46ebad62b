//! Pull policies, single flight, crash safety and permissions against the real testbed
//! (containerd CRI + docker-registry), through the real cimaged and cimage binaries.

mod common;

use common::images::{push, Layer};
use common::*;

fn count_pull_calls(d: &Daemon, reference: &str) -> usize {
    d.log()
        .lines()
        .filter(|l| l.contains("calling PullImage") && l.contains(reference))
        .count()
}

#[test]
fn never_on_absent_image_errors_and_contacts_nothing() {
    let d = Daemon::start("");
    let tb = &d.testbed;
    let pushed = tb.push_new("never", &[Layer::random(1024)]);
    let repo = pushed.repo.clone();
    let mark = tb.registry_log_mark();
    let out = d.cli(&["pull", &pushed.reference, "--policy", "Never"]);
    assert_eq!(out.status.code(), Some(3), "not present under Never");
    assert_eq!(
        stderr(&out).trim(),
        format!(
            "cimage: image {} is not present and pull policy is Never",
            pushed.reference
        )
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        tb.registry_requests_since(mark, &repo),
        Vec::<String>::new()
    );
    assert!(!ctr_images(tb).contains(&pushed.reference));
    assert_eq!(count_pull_calls(&d, &pushed.reference), 0);
}

#[test]
fn every_policy_row_against_the_real_runtime() {
    let d = Daemon::start("");
    let tb = d.testbed.clone();
    let v1 = tb.push_new("rows", &[Layer::random(4096)]);
    let repo = v1.repo.clone();
    let image = v1.reference.clone();

    // IfNotPresent, absent: pulled, and the runtime has it (ctr as witness).
    let j = d.pull_json(&image, Some("IfNotPresent"));
    assert_eq!(j["action"], "pulled");
    assert_eq!(j["manifest_digest"], v1.digest.as_str());
    assert_eq!(j["image"], image.as_str());
    assert!(j["elapsed_seconds"].as_f64().unwrap() > 0.0);
    assert!(ctr_images(&tb).contains(&image));

    // IfNotPresent and Never, present: cached, and the registry hears nothing.
    let mark = tb.registry_log_mark();
    for policy in ["IfNotPresent", "Never"] {
        assert_eq!(
            d.pull_json(&image, Some(policy))["action"],
            "cached",
            "{policy}"
        );
    }
    // The default for a non-latest tag is IfNotPresent.
    let j = d.pull_json(&image, None);
    assert_eq!(
        (j["action"].as_str(), j["policy"].as_str()),
        (Some("cached"), Some("IfNotPresent"))
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        tb.registry_requests_since(mark, &repo),
        Vec::<String>::new()
    );

    // Always, present, digest unchanged: one HEAD of the manifest, no GET of manifest or blobs.
    let mark = tb.registry_log_mark();
    let j = d.pull_json(&image, Some("Always"));
    assert_eq!(j["action"], "cached");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let reqs = tb.registry_requests_since(mark, &repo);
    assert!(!reqs.is_empty(), "Always must ask the registry");
    assert!(
        reqs.iter().all(|r| r.starts_with("HEAD ")),
        "only HEADs expected: {reqs:?}"
    );

    // Always after the tag moved: pulled, new digest.
    let v2 = block_on(push(
        &tb.registry,
        &repo,
        "1",
        &[Layer::random(4096)],
        &["sh"],
    ));
    assert_ne!(v1.digest, v2.digest);
    let j = d.pull_json(&image, Some("Always"));
    assert_eq!(
        (j["action"].as_str(), j["manifest_digest"].as_str()),
        (Some("pulled"), Some(v2.digest.as_str()))
    );

    // A digest reference is immutable: present means current, even under Always.
    let by_digest = format!("{}/{}@{}", tb.registry, repo, v2.digest);
    let mark = tb.registry_log_mark();
    let j = d.pull_json(&by_digest, Some("Always"));
    assert_eq!(j["action"], "cached");
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        tb.registry_requests_since(mark, &repo),
        Vec::<String>::new()
    );

    // Always, absent: pulled.
    let other = block_on(push(
        &tb.registry,
        &repo,
        "other",
        &[Layer::random(1024)],
        &["sh"],
    ));
    assert_eq!(
        d.pull_json(&other.reference, Some("Always"))["action"],
        "pulled"
    );

    // Untagged means latest, and without a policy it is IfNotPresent like every tag: pulled,
    // then served from the cache without any registry request; with Always, after a HEAD.
    block_on(push(
        &tb.registry,
        &repo,
        "latest",
        &[Layer::random(1024)],
        &["sh"],
    ));
    let untagged = format!("{}/{}", tb.registry, repo);
    let j = d.pull_json(&untagged, None);
    assert_eq!(
        (j["action"].as_str(), j["policy"].as_str()),
        (Some("pulled"), Some("IfNotPresent"))
    );
    assert_eq!(j["image"], format!("{untagged}:latest"));
    let mark = tb.registry_log_mark();
    assert_eq!(d.pull_json(&untagged, None)["action"], "cached");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let reqs = tb.registry_requests_since(mark, &repo);
    assert!(reqs.is_empty(), "{reqs:?}");
    let mark = tb.registry_log_mark();
    assert_eq!(d.pull_json(&untagged, Some("Always"))["action"], "cached");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let reqs = tb.registry_requests_since(mark, &repo);
    assert!(
        !reqs.is_empty() && reqs.iter().all(|r| r.starts_with("HEAD ")),
        "{reqs:?}"
    );

    // The index counted every use; images -o json has the documented fields.
    let out = d.cli(&["images", "-o", "json"]);
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rec = all
        .as_array()
        .unwrap()
        .iter()
        .find(|i| {
            i["names"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n.as_str() == Some(other.reference.as_str()))
        })
        .expect("pulled image is listed");
    for key in [
        "digest",
        "names",
        "size_bytes",
        "last_used",
        "use_count",
        "pinned",
    ] {
        assert!(rec.get(key).is_some(), "images -o json lacks {key}: {rec}");
    }
    assert_eq!(rec["use_count"], 1);
    assert!(rec["size_bytes"].as_u64().unwrap() > 1024);
}

#[test]
fn twenty_concurrent_pulls_of_one_cold_image_fetch_each_blob_once() {
    let d = Daemon::start("");
    let tb = d.testbed.clone();
    let pushed = tb.push_new("herd", &[Layer::random(2 << 20), Layer::random(2 << 20)]);
    let repo = pushed.repo.clone();
    let mark = tb.registry_log_mark();
    let children: Vec<_> = (0..20)
        .map(|_| {
            std::process::Command::new(env!("CARGO_BIN_EXE_cimage"))
                .args(["pull", &pushed.reference, "-o", "json"])
                .env("CIMAGE_SOCKET", d.socket())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let reqs = tb.registry_requests_since(mark, &repo);
    for blob in &pushed.blobs {
        let gets = reqs
            .iter()
            .filter(|r| r.starts_with("GET ") && r.ends_with(blob.as_str()))
            .count();
        assert_eq!(gets, 1, "blob {blob} fetched {gets} times: {reqs:#?}");
    }
    assert_eq!(count_pull_calls(&d, &pushed.reference), 1, "{}", d.log());
    let out = d.cli(&["inspect", &pushed.reference, "-o", "json"]);
    let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rec["use_count"], 20);
}

#[test]
fn index_survives_kill_9() {
    let mut d = Daemon::start("");
    let tb = d.testbed.clone();
    let pushed = tb.push_new("crash", &[Layer::random(1024)]);
    for _ in 0..3 {
        d.pull_json(&pushed.reference, None);
    }
    let out = d.cli(&["pin", &pushed.reference]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.kill9();
    d.spawn();
    let out = d.cli(&["inspect", &pushed.reference, "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rec["use_count"], 3, "{rec}");
    assert_eq!(rec["pinned"], true, "{rec}");
    assert_eq!(rec["origin"], "pull");
}

#[test]
fn non_root_caller_cannot_remove_or_pin() {
    let d = Daemon::start("SocketGroup: nogroup");
    let tb = d.testbed.clone();
    let pushed = tb.push_new("perm", &[Layer::random(1024)]);
    let nobody = Some((65534, 65534));
    // An ordinary user may pull and look.
    let out = d.cli_as(nobody, &["pull", &pushed.reference]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(d.cli_as(nobody, &["images"]).status.success());
    for verb in ["rm", "pin", "unpin"] {
        let out = d.cli_as(nobody, &[verb, &pushed.reference]);
        assert_eq!(out.status.code(), Some(5), "{verb}: permission denied");
        let err = stderr(&out);
        assert!(
            err.contains("admin call") && err.contains("uid 65534"),
            "{verb}: {err}"
        );
    }
    // Nothing changed; root may do both.
    assert!(ctr_images(&tb).contains(&pushed.reference));
    assert!(d.cli(&["pin", &pushed.reference]).status.success());
    let out = d.cli(&["rm", &pushed.reference]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!ctr_images(&tb).contains(&pushed.reference));
    let out = d.cli(&["inspect", &pushed.reference]);
    assert!(stderr(&out).contains("not present"), "{}", stderr(&out));
}

#[test]
fn malformed_reference_is_refused_before_anything_is_contacted() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cimage"))
        .args([
            "--socket",
            "/nonexistent/cimaged.sock",
            "pull",
            "Not/A:Valid:Ref",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let err = stderr(&out);
    assert!(
        err.contains("invalid image reference \"Not/A:Valid:Ref\""),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn daemon_refuses_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    for (text, want) in [
        ("Container:\n  Enabled: false\n  RuntimeEndpoint: /x.sock\n", "container support is disabled"),
        ("Container:\n  Enabled: true\n  RuntimeEndpoint: /x.sock\nImageCache:\n  PullTimeout: soon\n", "line 5"),
        ("Container:\n  Enabled: true\n", "Container.RuntimeEndpoint"),
    ] {
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cimaged"))
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(stderr(&out).contains(want), "{text}: {}", stderr(&out));
    }
}
