//! Tests that stop or restart parts of the shared testbed (the registry, containerd). They run
//! one at a time, and always put the testbed back.

mod common;

use std::sync::Mutex;

use common::images::{push, Layer};
use common::*;

static SERIAL: Mutex<()> = Mutex::new(());

/// Starts the registry again when dropped, even if the test failed.
struct RegistryBack<'a>(&'a Testbed);
impl Drop for RegistryBack<'_> {
    fn drop(&mut self) {
        self.0.script(&["start-registry"]);
    }
}

#[test]
fn registry_down_cached_images_still_serve_and_always_fails_clearly() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = Daemon::start("");
    let tb = d.testbed.clone();
    let repo = Testbed::unique_repo("regdown");
    let pushed = block_on(push(
        &tb.registry,
        &repo,
        "1",
        &[Layer::random(1024)],
        &["sh"],
    ));
    assert_eq!(d.pull_json(&pushed.reference, None)["action"], "pulled");

    tb.script(&["stop-registry"]);
    let _back = RegistryBack(&tb);
    for policy in ["IfNotPresent", "Never"] {
        assert_eq!(
            d.pull_json(&pushed.reference, Some(policy))["action"],
            "cached",
            "{policy}"
        );
    }
    let out = d.cli(&["pull", &pushed.reference, "--policy", "Always"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&pushed.reference) && err.contains("unreachable"),
        "{err}"
    );
    assert!(err.contains(&tb.registry), "names the registry: {err}");
}

#[test]
fn next_pull_works_after_containerd_restarts() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = Daemon::start("");
    let tb = d.testbed.clone();
    let repo = Testbed::unique_repo("restart");
    let a = block_on(push(
        &tb.registry,
        &repo,
        "1",
        &[Layer::random(1024)],
        &["sh"],
    ));
    assert_eq!(d.pull_json(&a.reference, None)["action"], "pulled");

    tb.script(&["restart-containerd"]);

    let b = block_on(push(
        &tb.registry,
        &repo,
        "2",
        &[Layer::random(1024)],
        &["sh"],
    ));
    assert_eq!(d.pull_json(&b.reference, None)["action"], "pulled");
    assert_eq!(d.pull_json(&a.reference, Some("Never"))["action"], "cached");
    assert!(ctr_images(&tb).contains(&b.reference));
}
