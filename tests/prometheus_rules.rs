//! The Prometheus rules shipped in `contrib/prometheus/`: valid for `promtool check rules`, and
//! their unit tests (`cimage-rules.test.yml`) pass under `promtool test rules`.

use std::path::Path;
use std::process::Command;

fn promtool(args: &[&str]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/prometheus");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(&dir)
        .output()
        .expect("running promtool (Debian package prometheus; scripts/testbed install adds it)");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_rules_are_valid_and_their_unit_tests_pass() {
    promtool(&["check", "rules", "cimage-rules.yml"]);
    promtool(&["test", "rules", "cimage-rules.test.yml"]);
}
