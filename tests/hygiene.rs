//! Hostile input through the raw API, past the CLI's own checks: it is refused with a short,
//! one-line error, and nothing of it reaches the log as a line of its own.

mod common;

use cimage::api::pb;
use common::*;

fn pull_raw(d: &Daemon, image: &str) -> tonic::Status {
    block_on(async {
        cimage::api::client(&d.socket())
            .pull(pb::PullRequest {
                image: image.to_owned(),
                policy: pb::PullPolicy::IfNotPresent as i32,
                credentials: None,
            })
            .await
            .expect_err("a hostile reference must be refused")
    })
}

#[test]
fn control_characters_and_huge_references_are_refused_shortly_and_forge_no_log_line() {
    let d = Daemon::start("");
    let forged = "FORGED-cimage-log-line";
    for image in [
        format!(
            "{}/app:1\n2026-01-01T00:00:00Z  INFO {forged}",
            d.testbed.registry
        ),
        format!("{}/app:1\r{forged}", d.testbed.registry),
        format!("{}/app\0:1", d.testbed.registry),
    ] {
        let s = pull_raw(&d, &image);
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{image:?}");
        assert!(
            !s.message().contains('\n') && !s.message().contains('\r'),
            "{s:?}"
        );
    }
    let huge = format!("{}/{}:1", d.testbed.registry, "a".repeat(100 * 1024));
    let s = pull_raw(&d, &huge);
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    assert!(s.message().len() < 300, "{} characters", s.message().len());
    let log = d.log();
    assert!(
        !log.lines()
            .any(|l| l.contains(forged) && !l.contains("app:1")),
        "a forged line in the log:\n{log}"
    );
}
