//! Private registries: basic auth over TLS on the testbed's private registry, per-request
//! credentials (password on stdin, auth file), CA configuration, and that no secret leaks.

mod common;

use common::images::{push_with, Layer, Private};
use common::*;

fn private_image(tb: &Testbed, prefix: &str) -> String {
    let repo = Testbed::unique_repo(prefix);
    let p = block_on(push_with(
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
    ));
    p.reference
}

fn with_ca(tb: &Testbed) -> String {
    format!(
        "Registries:\n  \"{}\":\n    Insecure: true\n  \"{}\":\n    CaFile: {}\n",
        tb.registry,
        tb.private_registry,
        tb.ca.display()
    )
}

#[test]
fn basic_auth_over_tls_with_right_wrong_and_missing_credentials() {
    let tb = Testbed::get();
    let image = private_image(&tb, "basic");
    // The harness already has a Registries section for the plain registry; add the private one
    // through a second daemon config key set.
    // The pulls are the runtime's (it has the testbed CA); cimage's own CA use is tested below.
    let d = Daemon::start("");
    let (user, pw) = &tb.alice;

    let out = d.cli(&["pull", &image]);
    assert_eq!(out.status.code(), Some(5), "refused: permission denied");
    let err = stderr(&out);
    assert!(
        err.contains(&image) && err.contains("refused access"),
        "no credentials: {err}"
    );

    let out = d.cli_stdin(
        &["pull", &image, "--username", user, "--password-stdin"],
        "wrong-password\n",
    );
    assert_eq!(out.status.code(), Some(5));
    let err = stderr(&out);
    assert!(
        err.contains(&image) && err.contains("refused access"),
        "wrong password: {err}"
    );
    assert!(!err.contains("wrong-password"), "{err}");

    let out = d.cli_stdin(
        &[
            "pull",
            &image,
            "--username",
            user,
            "--password-stdin",
            "-o",
            "json",
        ],
        &format!("{pw}\n"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["action"], "pulled");
    assert!(ctr_images(&tb).contains(&image));

    // Leak check: the password appears in no output, no log line, not in the index file.
    let everything = format!("{}{}{}", stdout(&out), stderr(&out), d.log());
    assert!(
        !everything.contains(pw.as_str()),
        "password leaked into output or log"
    );
    assert_no_secret(&d, &[pw.as_str()]);
}

#[test]
fn an_auth_file_works_and_tls_needs_the_ca_for_registry_checks() {
    let tb = Testbed::get();
    let image = private_image(&tb, "authfile");
    let (user, pw) = &tb.bob;
    let dir = tempfile::tempdir().unwrap();
    let auth_file = dir.path().join("config.json");
    let auth = {
        // base64 of user:password, as docker writes it.
        let raw = format!("{user}:{pw}");
        const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let b = raw.as_bytes();
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let n =
                chunk.iter().fold(0u32, |a, c| (a << 8) | u32::from(*c)) << (8 * (3 - chunk.len()));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    };
    std::fs::write(
        &auth_file,
        format!(
            "{{\"auths\":{{\"{}\":{{\"auth\":\"{auth}\"}}}}}}",
            tb.private_registry
        ),
    )
    .unwrap();
    let auth_arg = auth_file.display().to_string();

    // Without the CA, cimage's own registry check (Always) fails clearly on TLS.
    let no_ca = Daemon::start("");
    let out = no_ca.cli(&["pull", &image, "--auth-file", &auth_arg]);
    assert!(
        out.status.success(),
        "the runtime pulls with its own CA: {}",
        stderr(&out)
    );
    let out = no_ca.cli(&[
        "pull",
        &image,
        "--policy",
        "Always",
        "--auth-file",
        &auth_arg,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("TLS verification failed") && err.contains(&tb.private_registry),
        "{err}"
    );
    drop(no_ca);

    let d = Daemon::start(&with_ca(&tb));
    let out = d.cli(&[
        "pull",
        &image,
        "--policy",
        "Always",
        "--auth-file",
        &auth_arg,
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        j["action"], "cached",
        "digest unchanged, checked over TLS with the CA"
    );
    assert_no_secret(&d, &[pw.as_str()]);
}

#[test]
fn a_private_image_is_served_only_to_requests_that_prove_access() {
    let tb = Testbed::get();
    let image = private_image(&tb, "tenant");
    let public = block_on(common::images::push(
        &tb.registry,
        &Testbed::unique_repo("public"),
        "1",
        &[Layer::random(512)],
        &["sh"],
    ))
    .reference;
    let d = Daemon::start(&format!("SocketGroup: nogroup\n{}", with_ca(&tb)));
    let nobody = Some((65534, 65534));
    let (alice, alice_pw) = &tb.alice;
    let (bob, bob_pw) = &tb.bob;

    // Root pulls the private image with alice's credentials.
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

    // Another user does not even see its name, in any listing.
    let seen = |who: Option<(u32, u32)>| {
        let mut text = String::new();
        for args in [
            &["images", "-o", "json"][..],
            &["top", "-o", "json"][..],
            &["gc", "--dry-run", "-o", "json"][..],
        ] {
            text.push_str(&stdout(&d.cli_as(who, args)));
        }
        let repo = image.rsplit_once(':').unwrap().0.to_owned();
        text.contains(&repo)
    };
    assert!(!seen(nobody), "nobody sees a private image's name");
    let out = d.cli_as(nobody, &["inspect", &image]);
    assert!(
        !out.status.success() && stderr(&out).contains("not present"),
        "{}",
        stderr(&out)
    );

    // Another user without credentials: as if the image were absent.
    let out = d.cli_as(nobody, &["pull", &image, "--policy", "Never"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        stderr(&out).trim(),
        format!("cimage: image {image} is not present and pull policy is Never")
    );
    let out = d.cli_as(nobody, &["pull", &image, "--policy", "IfNotPresent"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(
        stderr(&out).contains("refused access"),
        "the registry decided: {}",
        stderr(&out)
    );

    // ... with wrong credentials: refused.
    let out = d.cli_as_stdin(
        nobody,
        &[
            "pull",
            &image,
            "--policy",
            "Never",
            "--username",
            bob,
            "--password-stdin",
        ],
        "not-bobs-password\n",
    );
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));

    // ... with valid credentials of its own: served from the cache, and remembered.
    for _ in 0..2 {
        let out = d.cli_as_stdin(
            nobody,
            &[
                "pull",
                &image,
                "--policy",
                "Never",
                "--username",
                bob,
                "--password-stdin",
                "-o",
                "json",
            ],
            &format!("{bob_pw}\n"),
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["action"], "cached");
    }
    // Having proved access, nobody sees the name; root always does.
    assert!(seen(nobody), "after proving access");
    assert!(seen(None));

    // An anonymous public image is everyone's.
    d.pull_json(&public, None);
    let out = d.cli_as(nobody, &["pull", &public, "--policy", "Never"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Nothing of the secrets in the log or the state directory.
    assert_no_secret(
        &d,
        &[alice_pw.as_str(), bob_pw.as_str(), "not-bobs-password"],
    );
}

#[test]
fn node_credentials_from_a_helper_or_a_config_file_and_request_credentials_win() {
    use std::os::unix::fs::PermissionsExt;
    let tb = Testbed::get();
    let (bob, bob_pw) = &tb.bob;
    let bin = tempfile::tempdir().unwrap();
    let helper = bin.path().join("docker-credential-testbed");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 2\nread server\n[ \"$server\" = \"{host}\" ] || {{ echo 'credentials not found in native keychain'; exit 1; }}\nprintf '{{\"ServerURL\":\"%s\",\"Username\":\"{bob}\",\"Secret\":\"{bob_pw}\"}}' \"$server\"\n",
            host = tb.private_registry
        ),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let d = Daemon::start_with_env(
        &format!(
            "Auth:\n  CredentialHelpers:\n    \"{}\": testbed\n",
            tb.private_registry
        ),
        &[("PATH", &path)],
    );
    let image = private_image(&tb, "helper");
    assert_eq!(
        d.pull_json(&image, None)["action"],
        "pulled",
        "the helper's credentials were used"
    );
    // A request's own credentials win over the node's: wrong ones are refused.
    let other = private_image(&tb, "helper2");
    let out = d.cli_stdin(
        &["pull", &other, "--username", bob, "--password-stdin"],
        "wrong\n",
    );
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("refused access"), "{}", stderr(&out));
    assert_no_secret(&d, &[bob_pw.as_str()]);
    drop(d);

    let cfg = bin.path().join("auth.json");
    std::fs::write(
        &cfg,
        format!(
            "{{\"auths\":{{\"{}\":{{\"username\":\"{}\",\"password\":\"{}\"}}}}}}",
            tb.private_registry, tb.alice.0, tb.alice.1
        ),
    )
    .unwrap();
    let d = Daemon::start(&format!("Auth:\n  ConfigFiles: [{}]\n", cfg.display()));
    let image = private_image(&tb, "cfgfile");
    assert_eq!(
        d.pull_json(&image, None)["action"],
        "pulled",
        "the config file's credentials were used"
    );
    assert_no_secret(&d, &[tb.alice.1.as_str()]);
}
