//! Docker credential helpers (`docker-credential-NAME get`): the protocol, run with a time
//! limit, and never quoting what a helper printed (it could hold a secret).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Deserialize;

use super::{CredentialError, Credentials};

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperAnswer {
    username: String,
    secret: String,
}

/// Asks `docker-credential-NAME get` for `registry`'s credentials (the docker credential-helper
/// protocol: the server URL on stdin, JSON with `Username` and `Secret` on stdout). `Ok(None)`
/// when the helper has none.
pub fn from_helper(
    name: &str,
    registry: &str,
    timeout: Duration,
) -> Result<Option<Credentials>, CredentialError> {
    let program = format!("docker-credential-{name}");
    let failed = |message: String| CredentialError::Helper {
        program: program.clone(),
        message,
    };
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot run it: {e}")))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(registry.as_bytes())
        .map_err(|e| failed(e.to_string()))?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed(format!("gave no answer within {timeout:?}")));
            }
            Err(e) => return Err(failed(e.to_string())),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        // "credentials not found" is the protocol's way of saying none; other failures are
        // reported without the helper's output, which could hold a secret.
        let said = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        if said.contains("not found") {
            return Ok(None);
        }
        return Err(failed(format!("failed ({})", out.status)));
    }
    let answer: HelperAnswer = serde_json::from_slice(&out.stdout)
        .map_err(|_| failed("did not answer with Username and Secret".into()))?;
    Ok(Some(Credentials {
        username: answer.username,
        password: answer.secret,
        kind: crate::credentials::SecretKind::Password,
    }))
}
