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

#[test]
fn every_metric_the_rules_use_is_one_cimaged_serves() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/prometheus/cimage-rules.yml"),
    )
    .unwrap();
    let known: Vec<&str> = cimage::metrics::CATALOG.iter().map(|m| m.0).collect();
    let mut used = std::collections::BTreeSet::new();
    for (i, _) in text.match_indices("cimage_") {
        // A recording rule's own name (`image:cimage_…:sum`) is not a metric of cimaged.
        if i > 0 && text.as_bytes()[i - 1] == b':' {
            continue;
        }
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        used.insert(name);
    }
    assert!(!used.is_empty());
    let unknown: Vec<&String> = used
        .iter()
        .filter(|n| {
            let base = n
                .trim_end_matches("_bucket")
                .trim_end_matches("_count")
                .trim_end_matches("_sum");
            !known.contains(&n.as_str()) && !known.contains(&base)
        })
        .collect();
    assert!(
        unknown.is_empty(),
        "the rules use metrics cimaged does not serve: {unknown:?}"
    );
}
