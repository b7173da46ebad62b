//! Fingerprints of credentials, the only trace of them the index keeps: a slow, keyed hash
//! with a node key kept outside the state directory, remembered in memory for warm requests.

use std::io::Write;
use std::path::Path;

use super::bounded::BoundedMap;
use super::{CredentialError, Credentials, SecretKind};

/// Bytes of the node key that keys credential fingerprints.
const NODE_KEY_LEN: usize = 32;

/// Fingerprints of credentials, as the index keeps them instead of the credentials: Argon2id
/// (a slow, memory-hard password hash) keyed with a per-node secret kept outside the state
/// directory, so that a copy of the index does not yield passwords by guessing. Computing one
/// takes tens of milliseconds; results are remembered in memory (by a hash salted per process),
/// so a warm request pays nothing.
pub struct Fingerprinter {
    pub(super) key: [u8; NODE_KEY_LEN],
    process_salt: [u8; 16],
    memo: std::sync::Mutex<BoundedMap<[u8; 32], String>>,
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
            memo: std::sync::Mutex::new(BoundedMap::new(MEMO_LIMIT)),
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
        self.memo.lock().unwrap().insert(memo_key, fp.clone());
        fp
    }
}
