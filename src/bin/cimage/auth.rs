//! Registry credentials on the command line: `--username` with `--password-stdin` (a password is
//! never an argument, where `ps` would show it), or `--auth-file` (docker `config.json` or podman
//! `auth.json`).

use std::io::BufRead;
use std::path::PathBuf;

use cimage::api::pb;
use cimage::reference::ImageRef;

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

impl AuthArgs {
    /// The credentials for `image`, or none. Errors name the file and what is wrong with it, and
    /// never show a secret.
    pub fn credentials(&self, image: &str) -> Result<Option<pb::Credentials>, Failure> {
        if let Some(user) = &self.username {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).map_err(|e| {
                Failure::new(format!("reading the password from standard input: {e}"))
            })?;
            let password = line.trim_end_matches(['\n', '\r']).to_owned();
            if password.is_empty() {
                return Err(Failure::new(
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
        let registry = ImageRef::parse(image)
            .map_err(|e| Failure::new(e.to_string()))?
            .registry()
            .to_owned();
        let c = cimage::credentials::from_auth_file(path, &registry)
            .map_err(|e| Failure::new(e.to_string()))?
            .ok_or_else(|| {
                Failure::new(format!(
                    "auth file {} has no credentials for registry {registry}",
                    path.display()
                ))
            })?;
        let (username, password) = (c.username, c.password);
        Ok(Some(pb::Credentials { username, password }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_an_auth_file_for_the_images_registry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths":{"127.0.0.1:5443":{"auth":"YWxpY2U6czNjcmV0"}}}"#,
        )
        .unwrap();
        let args = AuthArgs {
            auth_file: Some(path),
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
        let e = args
            .credentials("127.0.0.1:5000/app:1")
            .err()
            .unwrap()
            .message;
        assert!(
            e.contains("no credentials for registry 127.0.0.1:5000") && !e.contains("s3cret"),
            "{e}"
        );
    }
}
