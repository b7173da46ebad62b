//! A launch request's own words, below everything that checks them: who asks ([`Principal`]),
//! as whom the step is to run ([`UserRequest`], resolved to an [`Identity`]), which host paths
//! it mounts ([`MountRequest`]), and why a request is refused ([`SpecError`]). The checks of
//! `spec`, `devices` and `mounts` all speak these words; none of them is needed here.

use std::path::PathBuf;

/// Who is asking, as established by the API from the socket's peer credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    /// The caller's uid.
    pub uid: u32,
    /// The caller's gid.
    pub gid: u32,
    /// Root or a member of the admin group.
    pub admin: bool,
}

impl Principal {
    /// The daemon itself acting (carrying out what root or an admin asked before a restart).
    pub const ROOT: Principal = Principal {
        uid: 0,
        gid: 0,
        admin: true,
    };
}

/// A host path to mount, as asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRequest {
    /// Host path (resolved and checked against the allowed prefixes).
    pub source: PathBuf,
    /// Absolute path inside the container.
    pub target: String,
    /// Read-only.
    pub readonly: bool,
}

/// Why a `--mount` or `--user` argument was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgumentError {
    /// Not `SRC:DST[:ro|:rw]`.
    #[error("mount {0:?} is not SRC:DST[:ro]")]
    Mount(String),
    /// A group that is not a number.
    #[error("user {0:?}: the group must be a numeric gid")]
    Gid(String),
    /// Neither a uid nor a login name.
    #[error("user {0:?} is not UID[:GID] or NAME[:GID]")]
    User(String),
}

impl std::str::FromStr for MountRequest {
    type Err = ArgumentError;
    /// Parses `SRC:DST[:ro|:rw]`.
    fn from_str(s: &str) -> Result<Self, ArgumentError> {
        let parts: Vec<&str> = s.split(':').collect();
        let (src, dst, ro) = match parts.as_slice() {
            [src, dst] => (*src, *dst, false),
            [src, dst, "ro"] => (*src, *dst, true),
            [src, dst, "rw"] => (*src, *dst, false),
            _ => return Err(ArgumentError::Mount(s.to_owned())),
        };
        if src.is_empty() || dst.is_empty() {
            return Err(ArgumentError::Mount(s.to_owned()));
        }
        Ok(Self {
            source: PathBuf::from(src),
            target: dst.to_owned(),
            readonly: ro,
        })
    }
}

/// A host user by uid or name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserRef {
    /// By uid.
    Uid(u32),
    /// By login name.
    Name(String),
}

/// Who a step should run as: a host user, and a gid when not the user's primary group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRequest {
    /// The user.
    pub user: UserRef,
    /// The gid; `None`: the primary gid of the user's passwd entry.
    pub gid: Option<u32>,
}

impl std::str::FromStr for UserRequest {
    type Err = ArgumentError;
    /// Parses `USER[:GID]`, USER a uid or a login name.
    fn from_str(s: &str) -> Result<Self, ArgumentError> {
        let (u, g) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        let gid = g
            .map(|g| {
                g.parse::<u32>()
                    .map_err(|_| ArgumentError::Gid(s.to_owned()))
            })
            .transpose()?;
        let user = match u.parse::<u32>() {
            Ok(uid) => UserRef::Uid(uid),
            Err(_)
                if !u.is_empty()
                    && u.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) =>
            {
                UserRef::Name(u.to_owned())
            }
            Err(_) => return Err(ArgumentError::User(s.to_owned())),
        };
        Ok(Self { user, gid })
    }
}

/// The host identity a step runs as: its user, its gid and every host group of the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The uid (owns the task).
    pub uid: u32,
    /// The gid of the process.
    pub gid: u32,
    /// The login name.
    pub name: String,
    /// Every gid the process may have: `gid` and the user's host groups (sorted).
    pub groups: Vec<u32>,
}

impl Identity {
    /// The supplementary gids to ask the runtime for: the groups besides `gid`.
    pub fn supplementary(&self) -> Vec<u32> {
        self.groups
            .iter()
            .copied()
            .filter(|g| *g != self.gid)
            .collect()
    }
}

/// Why a launch was refused before anything was created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Malformed input.
    #[error("{0}")]
    Invalid(String),
    /// Not allowed for this caller.
    #[error("{0}")]
    Denied(String),
    /// No job by this id that the caller may use: the same answer whether it does not exist
    /// or is another's, so that ids cannot be probed.
    #[error("no job {0}")]
    NoJob(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mount_arguments() {
        let m: MountRequest = "/a:/b:ro".parse().unwrap();
        assert!(m.readonly && m.target == "/b");
        assert!(!"/a:/b".parse::<MountRequest>().unwrap().readonly);
        for bad in ["/a", "/a:/b:xx", ":/b", "/a:"] {
            assert!(bad.parse::<MountRequest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_user_arguments() {
        let r: UserRequest = "alice:27".parse().unwrap();
        assert_eq!((r.user, r.gid), (UserRef::Name("alice".into()), Some(27)));
        assert_eq!(
            "1000".parse::<UserRequest>().unwrap().user,
            UserRef::Uid(1000)
        );
        for bad in ["nobody:x", "a b", ""] {
            assert!(bad.parse::<UserRequest>().is_err(), "{bad}");
        }
    }
}
