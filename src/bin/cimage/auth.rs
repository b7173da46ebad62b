//! Registry credentials on the command line: `--username` with `--password-stdin` (a password is
//! never an argument, where `ps` would show it), or `--auth-file` (docker `config.json` or podman
//! `auth.json`).

use std::io::BufRead;
use std::path::PathBuf;

use cimage::api::pb;
use cimage::reference::ImageRef;
use serde::Deserialize;

use crate::Failure;

/// Credential arguments shared by `pull` and `run`.
#[derive(clap::Args, Debug, Default)]
pub struct AuthArgs {
    /// Registry user name; the password is read from standard input (--password-stdin).
    #[arg(long, requires = "password_stdin")]
    pub username: Option<String>,
    /// Read the password (or token) from the first line of standard input.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
    /// A docker config.json or podman auth.json holding credentials for the image's registry.
    #[arg(long, conflicts_with = "username")]
    pub auth_file: Option<PathBuf>,
}

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: std::collections::HashMap<String, AuthEntry>,
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
fn base64_decode(s: &str) -> Option<Vec<u8>> {
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

/// The keys a registry may appear under in an auth file.
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

impl AuthArgs {
    /// The credentials for `image`, or none. Errors name the file and what is wrong with it, and
    /// never show a secret.
    pub fn credentials(&self, image: &str) -> Result<Option<pb::Credentials>, Failure> {
        if let Some(user) = &self.username {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| Failure(format!("reading the password from standard input: {e}")))?;
            let password = line.trim_end_matches(['\n', '\r']).to_owned();
            if password.is_empty() {
                return Err(Failure(
                    "--password-stdin read an empty password from standard input".into(),
                ));
            }
            return Ok(Some(pb::Credentials {
                username: user.clone(),
                password,
            }));
        }
        let Some(path) = &self.auth_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure(format!("cannot read auth file {}: {e}", path.display())))?;
        let file: AuthFile = serde_json::from_str(&text).map_err(|e| {
            Failure(format!(
                "auth file {} is not a docker config.json / auth.json: {}",
                path.display(),
                // serde_json's message names a position, not the content.
                e
            ))
        })?;
        let registry = ImageRef::parse(image)
            .map_err(|e| Failure(e.to_string()))?
            .registry()
            .to_owned();
        let entry = host_keys(&registry)
            .iter()
            .find_map(|k| file.auths.get(k))
            .ok_or_else(|| {
                Failure(format!(
                    "auth file {} has no credentials for registry {registry}",
                    path.display()
                ))
            })?;
        let (username, password) = match (&entry.username, &entry.password, &entry.auth) {
            (Some(u), Some(p), _) => (u.clone(), p.clone()),
            (_, _, Some(a)) => {
                let raw = base64_decode(a)
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| {
                        Failure(format!(
                            "auth file {}: the \"auth\" entry for {registry} is not base64 of user:password",
                            path.display()
                        ))
                    })?;
                let (u, p) = raw.split_once(':').ok_or_else(|| {
                    Failure(format!(
                        "auth file {}: the \"auth\" entry for {registry} is not base64 of user:password",
                        path.display()
                    ))
                })?;
                (u.to_owned(), p.to_owned())
            }
            _ => {
                return Err(Failure(format!(
                "auth file {}: the entry for {registry} has neither auth nor username and password",
                path.display()
            )))
            }
        };
        Ok(Some(pb::Credentials { username, password }))
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
    fn reads_an_auth_file_for_the_images_registry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths":{"127.0.0.1:5443":{"auth":"YWxpY2U6czNjcmV0"},"https://quay.io":{"username":"bob","password":"pw"}}}"#,
        )
        .unwrap();
        let args = AuthArgs {
            auth_file: Some(path.clone()),
            ..Default::default()
        };
        let c = args
            .credentials("127.0.0.1:5443/private:1")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cret")
        );
        let c = args.credentials("quay.io/org/app:1").unwrap().unwrap();
        assert_eq!(c.username, "bob");
        let e = args.credentials("127.0.0.1:5000/app:1").err().unwrap().0;
        assert!(
            e.contains("no credentials for registry 127.0.0.1:5000") && !e.contains("s3cret"),
            "{e}"
        );
    }
}
