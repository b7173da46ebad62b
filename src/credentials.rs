//! Where registry credentials come from besides the request: docker `config.json` / podman
//! `auth.json` files and docker credential helpers (`docker-credential-NAME get`). The CLI reads
//! `--auth-file` with the same code; the daemon uses [`NodeCredentials`] for pre-warm runs and for
//! requests that bring no credentials of their own. Nothing here logs or displays a secret.
//!
//! This file owns the credentials themselves, their errors, auth files and the node's sources;
//! `helper.rs` runs credential helpers, `fingerprint.rs` makes the fingerprints the index keeps,
//! and `bounded.rs` holds the bounded map the registry side shares.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod bounded;
mod fingerprint;
mod helper;

pub use bounded::BoundedMap;
pub use fingerprint::Fingerprinter;
pub use helper::{from_helper, HelperRunner, Helpers, ProcessHelpers, HELPER_ANSWER_TTL};

/// Registry credentials for one request. `Debug` never shows the secret, and there is no
/// `Display`: nothing formats a password by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name (not secret, but only shown where needed).
    pub username: String,
    /// The secret: a password, or the token `kind` says.
    pub password: String,
    /// What the secret is.
    pub kind: SecretKind,
}

/// What the secret of [`Credentials`] is (CRI's `AuthConfig` has a field for each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SecretKind {
    /// A password (HTTP basic, or a registry's token endpoint with basic credentials).
    #[default]
    Password,
    /// An OAuth2 refresh token (`identity_token`), exchanged by the runtime.
    IdentityToken,
    /// A bearer token sent to the registry as is (`registry_token`).
    RegistryToken,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("kind", &self.kind)
            .finish()
    }
}

/// Why credentials could not be had from a node source. Messages name the file or helper and
/// what went wrong, never a secret (a helper's output is not quoted: it could hold one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// An auth file could not be read.
    #[error("cannot read auth file {}: {message}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        message: String,
    },
    /// An auth file is not a docker config.json / auth.json, or an entry is malformed.
    #[error("auth file {}: {message}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The lookup itself could not run to its end (its worker thread failed).
    #[error("the node credential lookup failed: {message}")]
    LookupFailed {
        /// What happened to it.
        message: String,
    },
    /// A credential helper could not be run, failed or answered nonsense.
    #[error("credential helper {program}: {message}")]
    Helper {
        /// `docker-credential-NAME`.
        program: String,
        /// What went wrong.
        message: String,
    },
}

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
pub fn from_auth_file(path: &Path, registry: &str) -> Result<Option<Credentials>, CredentialError> {
    let text = std::fs::read_to_string(path).map_err(|e| CredentialError::Unreadable {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    parse_auth_file(&text, path, registry)
}

/// The credentials the text of an auth file holds for `registry` (see [`from_auth_file`];
/// `path` is only named in errors).
pub fn parse_auth_file(
    text: &str,
    path: &Path,
    registry: &str,
) -> Result<Option<Credentials>, CredentialError> {
    let malformed = |message: String| CredentialError::Malformed {
        path: path.to_owned(),
        message,
    };
    let file: AuthFile = serde_json::from_str(text)
        .map_err(|e| malformed(format!("not a docker config.json / auth.json: {e}")))?;
    let Some(entry) = host_keys(registry).iter().find_map(|k| file.auths.get(k)) else {
        return Ok(None);
    };
    let bad = || {
        malformed(format!(
            "the \"auth\" entry for {registry} is not base64 of user:password"
        ))
    };
    match (&entry.username, &entry.password, &entry.auth) {
        (Some(u), Some(p), _) => Ok(Some(Credentials {
            username: u.clone(),
            password: p.clone(),
            kind: crate::credentials::SecretKind::Password,
        })),
        (_, _, Some(a)) => {
            let raw = base64_decode(a)
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(bad)?;
            let (u, p) = raw.split_once(':').ok_or_else(bad)?;
            Ok(Some(Credentials {
                username: u.to_owned(),
                password: p.to_owned(),
                kind: crate::credentials::SecretKind::Password,
            }))
        }
        _ => Err(malformed(format!(
            "the entry for {registry} has neither auth nor username and password"
        ))),
    }
}

/// The node's own credentials: helpers by registry host, then auth files in order.
#[derive(Debug, Clone, Default)]
pub struct NodeCredentials {
    /// docker config.json / auth.json files, tried in order.
    pub config_files: Vec<PathBuf>,
    /// Registry host → credential helper name.
    pub helpers: BTreeMap<String, String>,
    /// Runs the helpers, and remembers their answers for [`HELPER_ANSWER_TTL`] (shared by
    /// every clone).
    pub runner: Helpers,
}

impl NodeCredentials {
    /// Whether any source is configured.
    pub fn is_empty(&self) -> bool {
        self.config_files.is_empty() && self.helpers.is_empty()
    }

    /// Credentials for `registry`, or none. Blocking (files, a helper process): call it off the
    /// async workers.
    pub fn lookup(&self, registry: &str) -> Result<Option<Credentials>, CredentialError> {
        if let Some(helper) = self.helpers.get(registry) {
            if let Some(c) = self.runner.get(helper, registry)? {
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
    use std::time::Duration;

    #[test]
    fn credentials_debug_hides_the_password() {
        let c = Credentials {
            username: "alice".into(),
            password: "s3cr3t-pw".into(),
            kind: crate::credentials::SecretKind::Password,
        };
        let shown = format!("{c:?} {:#?}", c);
        assert!(shown.contains("alice"));
        assert!(!shown.contains("s3cr3t-pw"), "{shown}");
    }

    #[test]
    fn fingerprints_are_keyed_stable_and_never_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/node.key");
        let a = Fingerprinter::load_or_create(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let c = Credentials {
            username: "alice".into(),
            password: "s3cr3t-pw".into(),
            kind: crate::credentials::SecretKind::Password,
        };
        let fp = a.fingerprint("r.io", &c);
        assert_eq!(fp.len(), 64);
        assert!(!fp.contains("s3cr3t"));
        assert_eq!(a.fingerprint("r.io", &c), fp, "memoised");
        let token = Credentials {
            kind: SecretKind::RegistryToken,
            ..c.clone()
        };
        assert_ne!(
            a.fingerprint("r.io", &token),
            fp,
            "a token is not a password"
        );
        // The same key file gives the same fingerprints; another key does not.
        let again = Fingerprinter::load_or_create(&path).unwrap();
        assert_eq!(again.fingerprint("r.io", &c), fp);
        assert_ne!(again.fingerprint("s.io", &c), fp);
        let other = Fingerprinter::with_key([7; 32]);
        assert_ne!(other.fingerprint("r.io", &c), fp);
        assert!(!format!("{a:?}").contains(&format!("{:?}", a.key)));
        std::fs::write(&path, b"short").unwrap();
        let e = Fingerprinter::load_or_create(&path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("32 bytes"), "{e}");
    }

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
        let e = from_auth_file(&path, "h").unwrap_err().to_string();
        assert!(e.contains("not base64"), "{e}");

        let node = NodeCredentials {
            config_files: vec![dir.path().join("missing.json")],
            ..Default::default()
        };
        assert!(node
            .lookup("h")
            .unwrap_err()
            .to_string()
            .contains("cannot read auth file"));
        let e = from_helper("cimage-test-no-such-helper", "h", Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("docker-credential-cimage-test-no-such-helper"),
            "{e}"
        );
    }
}
