//! Docker credential helpers (`docker-credential-NAME get`): the protocol, run with a time
//! limit, and never quoting what a helper printed (it could hold a secret).

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::bounded::BoundedMap;
use super::{CredentialError, Credentials};

/// How long a helper's answer (credentials, or "none") is used before the helper is asked
/// again: the protocol states no lifetime, and registry tokens a helper hands out live for
/// minutes at least, so a minute keeps a busy node from spawning a helper per request.
pub const HELPER_ANSWER_TTL: Duration = Duration::from_secs(60);

/// How long a helper may take to answer.
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers remembered at most (a node has a handful of registries).
const MAX_HELPER_ANSWERS: usize = 64;

/// Runs a credential helper: the process (see [`ProcessHelpers`]), or a test double.
pub trait HelperRunner: Send + Sync {
    /// `docker-credential-NAME get` for `registry`; `Ok(None)` when it has none.
    fn run(&self, name: &str, registry: &str) -> Result<Option<Credentials>, CredentialError>;
}

/// Runs `docker-credential-NAME` from `PATH`.
#[derive(Debug, Default)]
pub struct ProcessHelpers;

impl HelperRunner for ProcessHelpers {
    fn run(&self, name: &str, registry: &str) -> Result<Option<Credentials>, CredentialError> {
        from_helper(name, registry, HELPER_TIMEOUT)
    }
}

/// A helper's answer and when it was had.
type Answer = (Option<Credentials>, Instant);

/// The node's credential helpers: a runner, and the answers it gave, by (helper, registry),
/// each used for [`HELPER_ANSWER_TTL`]. Failures are not remembered: the next lookup asks
/// again. Clones share the answers.
#[derive(Clone)]
pub struct Helpers {
    runner: Arc<dyn HelperRunner>,
    answers: Arc<Mutex<BoundedMap<(String, String), Answer>>>,
}

impl Default for Helpers {
    fn default() -> Self {
        Self::with_runner(Arc::new(ProcessHelpers))
    }
}

impl std::fmt::Debug for Helpers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The answers hold secrets.
        f.write_str("Helpers { .. }")
    }
}

impl Helpers {
    /// Helpers run by `runner`.
    pub fn with_runner(runner: Arc<dyn HelperRunner>) -> Self {
        Self {
            runner,
            answers: Arc::new(Mutex::new(BoundedMap::new(MAX_HELPER_ANSWERS))),
        }
    }

    /// Helper `name`'s credentials for `registry`, from a recent answer or by running it.
    /// Blocking on a miss.
    pub fn get(&self, name: &str, registry: &str) -> Result<Option<Credentials>, CredentialError> {
        let key = (name.to_owned(), registry.to_owned());
        if let Some((answer, at)) = self.answers.lock().unwrap().get(&key) {
            if at.elapsed() < HELPER_ANSWER_TTL {
                return Ok(answer.clone());
            }
        }
        let answer = self.runner.run(name, registry)?;
        self.answers
            .lock()
            .unwrap()
            .insert(key, (answer.clone(), Instant::now()));
        Ok(answer)
    }
}

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
