//! Registry mirrors: cimage resolves tags through the configured mirror first and falls back to
//! the upstream when the mirror is down; the runtime pulls through the same mirror.

mod common;

use common::images::{push, Layer};
use common::*;

/// Starts the mirror again when dropped, even if the test failed.
struct MirrorBack<'a>(&'a Testbed);
impl Drop for MirrorBack<'_> {
    fn drop(&mut self) {
        self.0.script(&["start-mirror"]);
    }
}

#[test]
fn resolution_and_pulls_go_through_the_mirror_and_fall_back_when_it_is_down() {
    let tb = Testbed::get();
    let repo = Testbed::unique_repo("mirrored");
    let image = block_on(push(
        &tb.upstream,
        &repo,
        "1",
        &[Layer::random(4096)],
        &["sh"],
    ));
    let d = Daemon::start(&format!(
        "Registries:\n  \"{reg}\":\n    Insecure: true\n  \"{up}\":\n    Insecure: true\n    Mirrors: [\"{mirror}\"]\n  \"{mirror}\":\n    Insecure: true\n",
        reg = tb.registry,
        up = tb.upstream,
        mirror = tb.mirror
    ));

    // The runtime pulls through the mirror.
    let mark = log_mark(&tb.mirror_log);
    assert_eq!(d.pull_json(&image.reference, None)["action"], "pulled");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let via_mirror = requests_in_log(&tb.mirror_log, mark, &repo);
    assert!(
        via_mirror
            .iter()
            .any(|r| r.starts_with("GET ") && r.contains("/blobs/")),
        "{via_mirror:?}"
    );

    // cimage resolves the tag at the mirror.
    let mark = log_mark(&tb.mirror_log);
    assert_eq!(
        d.pull_json(&image.reference, Some("Always"))["action"],
        "cached"
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    let heads = requests_in_log(&tb.mirror_log, mark, &repo);
    assert!(
        heads
            .iter()
            .any(|r| r.starts_with("HEAD ") && r.contains("/manifests/1")),
        "{heads:?}"
    );

    // Mirror down: resolution falls back to the upstream, and so do pulls.
    tb.script(&["stop-mirror"]);
    let _back = MirrorBack(&tb);
    let mark = log_mark(&tb.upstream_log);
    assert_eq!(
        d.pull_json(&image.reference, Some("Always"))["action"],
        "cached"
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    let up = requests_in_log(&tb.upstream_log, mark, &repo);
    assert!(
        up.iter().any(|r| r.starts_with("HEAD ")),
        "fell back to the upstream: {up:?}"
    );
    let fresh = block_on(push(
        &tb.upstream,
        &repo,
        "2",
        &[Layer::random(4096)],
        &["sh"],
    ));
    assert_eq!(d.pull_json(&fresh.reference, None)["action"], "pulled");
}
