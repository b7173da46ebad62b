//! Another user's private image is absent from every listing a user may ask for: `images`,
//! `inspect`, `top` and `gc --dry-run` apply one rule, so neither its name nor its id, size
//! or use times say which image it is.

mod common;

use common::images::{push_with, Layer, Private};
use common::*;

#[test]
fn a_private_image_is_absent_from_top_and_gc_for_those_without_access() {
    let tb = Testbed::get();
    let repo = Testbed::unique_repo("private-top");
    let image = block_on(push_with(
        &tb.private_registry,
        &repo,
        "1",
        &[Layer::random(1024)],
        &["sh"],
        Some(Private {
            ca: Some(&tb.ca),
            username: &tb.alice.0,
            password: &tb.alice.1,
        }),
    ))
    .reference;
    let d = Daemon::start(&format!(
        "SocketGroup: nogroup\nRegistries:\n  \"{}\":\n    Insecure: true\n  \"{}\":\n    CaFile: {}\n",
        tb.registry,
        tb.private_registry,
        tb.ca.display()
    ));
    let (alice, alice_pw) = &tb.alice;
    let out = d.cli_stdin(
        &[
            "pull",
            &image,
            "--username",
            alice,
            "--password-stdin",
            "-o",
            "json",
        ],
        &format!("{alice_pw}\n"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let pulled: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = pulled["image_id"].as_str().unwrap().to_owned();
    let short = id.trim_start_matches("sha256:")[..12].to_owned();
    // Root sees it in top, with its id.
    let top = stdout(&d.cli(&["top", "-o", "json"]));
    assert!(top.contains(&short), "{top}");
    // Another user: absent, as from inspect.
    let nobody = Some((65534, 65534));
    let out = d.cli_as(nobody, &["inspect", &id]);
    assert!(stderr(&out).contains("not present"), "{}", stderr(&out));
    for args in [
        &["top", "-o", "json"][..],
        &["gc", "--dry-run", "-o", "json"][..],
    ] {
        let out = d.cli_as(nobody, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let text = stdout(&out);
        assert!(!text.contains(&short), "{args:?} shows the id: {text}");
        assert!(!text.contains("<private>"), "{args:?}: {text}");
    }
}
