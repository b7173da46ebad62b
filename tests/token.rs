//! Bearer-token registries (the Docker Hub flow) against the testbed's `auth: token` registry and
//! a token issuer run here.

mod common;

use common::images::{push_with, Layer};
use common::token::TokenIssuer;
use common::*;

#[test]
fn token_registry_pulls_checks_and_distinct_errors() {
    let tb = Testbed::get();
    let issuer = TokenIssuer::start(&tb);
    let repo = Testbed::unique_repo("token");
    let image = block_on(push_with(
        &tb.token_registry,
        &repo,
        "1",
        &[Layer::random(1024)],
        &["sh"],
        Some(common::images::Private {
            ca: None,
            username: &tb.alice.0,
            password: &tb.alice.1,
        }),
    ))
    .reference;
    let d = Daemon::start(&format!(
        "Registries:\n  \"{}\":\n    Insecure: true\n  \"{}\":\n    Insecure: true\n",
        tb.registry, tb.token_registry
    ));
    let (bob, bob_pw) = &tb.bob;
    let with_bob = |args: &[&str], pw: &str| {
        let mut all = args.to_vec();
        all.extend(["--username", bob, "--password-stdin"]);
        d.cli_stdin(&all, &format!("{pw}\n"))
    };

    let out = with_bob(&["pull", &image, "-o", "json"], bob_pw);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = with_bob(
        &["pull", &image, "--policy", "Always", "-o", "json"],
        bob_pw,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["action"], "cached", "checked with a token");

    // The token is cached until it expires: checking again asks the issuer for nothing.
    let issued = issuer.issued.load(std::sync::atomic::Ordering::SeqCst);
    let out = with_bob(&["pull", &image, "--policy", "Always"], bob_pw);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        issuer.issued.load(std::sync::atomic::Ordering::SeqCst),
        issued,
        "token reused"
    );

    let out = with_bob(&["pull", &image, "--policy", "Always"], "wrong");
    assert_eq!(out.status.code(), Some(5), "refused: permission denied");
    assert!(stderr(&out).contains("access denied"), "{}", stderr(&out));

    // Token service down: a cached token still works; credentials without one fail distinctly.
    drop(issuer);
    let out = with_bob(&["pull", &image, "--policy", "Always"], bob_pw);
    assert!(out.status.success(), "cached token: {}", stderr(&out));
    let (alice, alice_pw) = &tb.alice;
    let out = d.cli_stdin(
        &[
            "pull",
            &image,
            "--policy",
            "Always",
            "--username",
            alice,
            "--password-stdin",
        ],
        &format!("{alice_pw}\n"),
    );
    assert_eq!(out.status.code(), Some(4), "unavailable: try again");
    let err = stderr(&out);
    assert!(
        err.contains("token service unreachable") && err.contains(&tb.token_registry),
        "{err}"
    );
    for pw in [bob_pw.as_str(), alice_pw.as_str()] {
        assert!(!err.contains(pw));
    }
    assert_no_secret(&d, &[bob_pw.as_str(), alice_pw.as_str()]);
}
