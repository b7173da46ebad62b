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
    pub fn lookup(&self, registry: &str) -> Result<Option<Credentials>, CredentialError> {
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

/// Bytes of the node key that keys credential fingerprints.
const NODE_KEY_LEN: usize = 32;

/// Fingerprints of credentials, as the index keeps them instead of the credentials: Argon2id
/// (a slow, memory-hard password hash) keyed with a per-node secret kept outside the state
/// directory, so that a copy of the index does not yield passwords by guessing. Computing one
/// takes tens of milliseconds; results are remembered in memory (by a hash salted per process),
/// so a warm request pays nothing.
pub struct Fingerprinter {
    key: [u8; NODE_KEY_LEN],
    process_salt: [u8; 16],
    memo: std::sync::Mutex<HashMap<[u8; 32], String>>,
}

/// Fingerprints remembered at most (the memo is cleared when full).
const MEMO_LIMIT: usize = 4096;

impl std::fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprinter { key: <secret> }")
    }
}

impl Fingerprinter {
    /// A fingerprinter with this node key.
    pub fn with_key(key: [u8; NODE_KEY_LEN]) -> Self {
        Self {
            key,
            process_salt: rand::random(),
            memo: Default::default(),
        }
    }

    /// Loads the node key from `path`, or creates it (mode 0600, random) at first start.
    pub fn load_or_create(path: &Path) -> Result<Self, CredentialError> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let unreadable = |e: std::io::Error| CredentialError::Unreadable {
            path: path.to_owned(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(unreadable)?;
        }
        let mut key = [0u8; NODE_KEY_LEN];
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(mut f) => {
                rand::fill(&mut key[..]);
                f.write_all(&key)
                    .and_then(|_| f.sync_all())
                    .map_err(unreadable)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let mut f = std::fs::File::open(path).map_err(unreadable)?;
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes).map_err(unreadable)?;
                if bytes.len() != NODE_KEY_LEN {
                    return Err(CredentialError::Malformed {
                        path: path.to_owned(),
                        message: format!(
                            "a node key is {NODE_KEY_LEN} bytes; this file has {} (remove it to make a new one: private images are then verified again)",
                            bytes.len()
                        ),
                    });
                }
                key.copy_from_slice(&bytes);
            }
            Err(e) => return Err(unreadable(e)),
        }
        Ok(Self::with_key(key))
    }

    /// The fingerprint of `c` for `registry`. Blocking on a miss (the slow hash): call it off
    /// the async workers.
    pub fn fingerprint(&self, registry: &str, c: &Credentials) -> String {
        use sha2::{Digest, Sha256};
        // A token and a password of the same text are different credentials.
        let tagged;
        let c = match c.kind {
            SecretKind::Password => c,
            kind => {
                tagged = Credentials {
                    username: format!("\0{kind:?}\0{}", c.username),
                    ..c.clone()
                };
                &tagged
            }
        };
        let mut h = Sha256::new();
        h.update(self.process_salt);
        for part in [
            registry.as_bytes(),
            c.username.as_bytes(),
            c.password.as_bytes(),
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        let memo_key: [u8; 32] = h.finalize().into();
        if let Some(fp) = self.memo.lock().unwrap().get(&memo_key) {
            return fp.clone();
        }
        // Argon2id, keyed with the node key (its "secret" input), salted with the registry and
        // the user name, over the password.
        let mut salt = Vec::with_capacity(16 + registry.len() + c.username.len());
        salt.extend_from_slice(b"cimage-fp-v1\0\0\0\0");
        salt.extend_from_slice(registry.as_bytes());
        salt.push(0);
        salt.extend_from_slice(c.username.as_bytes());
        let params =
            argon2::Params::new(19 * 1024, 2, 1, Some(32)).expect("valid Argon2 parameters");
        let hasher = argon2::Argon2::new_with_secret(
            &self.key,
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            params,
        )
        .expect("a 32-byte secret is accepted");
        let mut out = [0u8; 32];
        hasher
            .hash_password_into(c.password.as_bytes(), &salt, &mut out)
            .expect("the salt is long enough and the output 32 bytes");
        let fp: String = out.iter().map(|b| format!("{b:02x}")).collect();
        let mut memo = self.memo.lock().unwrap();
        if memo.len() >= MEMO_LIMIT {
            memo.clear();
        }
        memo.insert(memo_key, fp.clone());
        fp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
