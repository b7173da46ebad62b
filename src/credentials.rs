//! Where registry credentials come from besides the request: docker `config.json` / podman
//! `auth.json` files and docker credential helpers (`docker-credential-NAME get`). The CLI reads
//! `--auth-file` with the same code; the daemon uses [`NodeCredentials`] for pre-warm runs and for
//! requests that bring no credentials of their own. Nothing here logs or displays a secret.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Deserialize;

use crate::registry::Credentials;

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Decodes standard base64 (the `auth` field of docker config files).
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut buf, mut bits) = (0u32, 0);
    for c in s.trim().bytes().filter(|c| *c != b'=') {
        let v = T.iter().position(|t| *t == c)? as u32;
        buf = (buf << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    Some(out)
}

/// The keys a registry host may appear under in an auth file.
fn host_keys(registry: &str) -> Vec<String> {
    let mut keys = vec![
        registry.to_owned(),
        format!("https://{registry}"),
        format!("http://{registry}"),
    ];
    if registry == "docker.io" {
        keys.push("https://index.docker.io/v1/".into());
        keys.push("index.docker.io".into());
    }
    keys
}

/// The credentials an auth file holds for `registry`: `Ok(None)` when it has no entry. Errors
/// name the file and what is wrong, never a secret.
pub fn from_auth_file(path: &Path, registry: &str) -> Result<Option<Credentials>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read auth file {}: {e}", path.display()))?;
    let file: AuthFile = serde_json::from_str(&text).map_err(|e| {
        format!(
            "auth file {} is not a docker config.json / auth.json: {e}",
            path.display()
        )
    })?;
    let Some(entry) = host_keys(registry).iter().find_map(|k| file.auths.get(k)) else {
        return Ok(None);
    };
    let bad = || {
        format!(
            "auth file {}: the \"auth\" entry for {registry} is not base64 of user:password",
            path.display()
        )
    };
    match (&entry.username, &entry.password, &entry.auth) {
        (Some(u), Some(p), _) => Ok(Some(Credentials {
            username: u.clone(),
            password: p.clone(),
        })),
        (_, _, Some(a)) => {
            let raw = base64_decode(a)
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(bad)?;
            let (u, p) = raw.split_once(':').ok_or_else(bad)?;
            Ok(Some(Credentials {
                username: u.to_owned(),
                password: p.to_owned(),
            }))
        }
        _ => Err(format!(
            "auth file {}: the entry for {registry} has neither auth nor username and password",
            path.display()
        )),
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
) -> Result<Option<Credentials>, String> {
    let program = format!("docker-credential-{name}");
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run credential helper {program}: {e}"))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(registry.as_bytes())
        .map_err(|e| format!("credential helper {program}: {e}"))?;
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
                return Err(format!(
                    "credential helper {program} gave no answer within {timeout:?}"
                ));
            }
            Err(e) => return Err(format!("credential helper {program}: {e}")),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("credential helper {program}: {e}"))?;
    if !out.status.success() {
        // "credentials not found" is the protocol's way of saying none; other failures are
        // reported without the helper's output, which could hold a secret.
        let said = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        if said.contains("not found") {
            return Ok(None);
        }
        return Err(format!(
            "credential helper {program} failed ({})",
            out.status
        ));
    }
    let answer: HelperAnswer = serde_json::from_slice(&out.stdout).map_err(|_| {
        format!("credential helper {program} did not answer with Username and Secret")
    })?;
    Ok(Some(Credentials {
        username: answer.username,
        password: answer.secret,
    }))
}

/// The node's own credentials: helpers by registry host, then auth files in order.
#[derive(Debug, Clone, Default)]
pub struct NodeCredentials {
    /// docker config.json / auth.json files, tried in order.
    pub config_files: Vec<PathBuf>,
    /// Registry host → credential helper name.
    pub helpers: BTreeMap<String, String>,
}

impl NodeCredentials {
    /// Whether any source is configured.
    pub fn is_empty(&self) -> bool {
        self.config_files.is_empty() && self.helpers.is_empty()
    }

    /// Credentials for `registry`, or none. Blocking (files, a helper process): call it off the
    /// async workers.
    pub fn lookup(&self, registry: &str) -> Result<Option<Credentials>, String> {
        if let Some(helper) = self.helpers.get(registry) {
            if let Some(c) = from_helper(helper, registry, Duration::from_secs(10))? {
                return Ok(Some(c));
            }
        }
        for f in &self.config_files {
            if let Some(c) = from_auth_file(f, registry)? {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_docker_auth_entries() {
        assert_eq!(base64_decode("YWxpY2U6czNjcmV0").unwrap(), b"alice:s3cret");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert!(base64_decode("not base64!").is_none());
    }

    #[test]
    fn auth_files_and_helpers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths":{"127.0.0.1:5443":{"auth":"YWxpY2U6czNjcmV0"},"https://quay.io":{"username":"bob","password":"pw"}}}"#,
        )
        .unwrap();
        let c = from_auth_file(&path, "127.0.0.1:5443").unwrap().unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cret")
        );
        assert_eq!(
            from_auth_file(&path, "quay.io").unwrap().unwrap().username,
            "bob"
        );
        assert!(from_auth_file(&path, "127.0.0.1:5000").unwrap().is_none());
        std::fs::write(&path, r#"{"auths":{"h":{"auth":"%%%"}}}"#).unwrap();
        let e = from_auth_file(&path, "h").unwrap_err();
        assert!(e.contains("not base64"), "{e}");

        let node = NodeCredentials {
            config_files: vec![dir.path().join("missing.json")],
            ..Default::default()
        };
        assert!(node
            .lookup("h")
            .unwrap_err()
            .contains("cannot read auth file"));
        let e = from_helper("cimage-test-no-such-helper", "h", Duration::from_secs(1)).unwrap_err();
        assert!(
            e.contains("docker-credential-cimage-test-no-such-helper"),
            "{e}"
        );
    }
}
