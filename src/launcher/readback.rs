//! What a created container is checked for before it starts: the identity the runtime would
//! give its process (containerd 1.6 adds the groups the image's `/etc/group` names) and, for a
//! step as a user, an `/etc` in the image that cimage's own identity files really cover.

use tracing::warn;

use super::request::Identity;
use crate::runtime::{EtcCheck, ProcessIdentity, RuntimeError};

/// Why a created container is not started.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadBackRefusal {
    /// The runtime could not be asked what it made.
    #[error("cannot read back container {cid} before its start: {source}")]
    Unreadable {
        /// The container.
        cid: String,
        /// The runtime's error.
        source: RuntimeError,
    },
    /// The runtime does not say who the process would be.
    #[error(
        "the runtime did not report the identity of container {cid}; its groups cannot be \
         checked, so the step is refused"
    )]
    NoIdentity {
        /// The container.
        cid: String,
    },
    /// The process would run as another uid or gid than asked.
    #[error(
        "the runtime would run the step as {}:{}, not {}:{} as asked; refused",
        got.0, got.1, want.0, want.1
    )]
    OtherIdentity {
        /// (uid, gid) the runtime would use.
        got: (u32, u32),
        /// (uid, gid) asked for.
        want: (u32, u32),
    },
    /// The image's `/etc/group` adds groups the host does not give the user.
    #[error(
        "the image adds groups {extra:?} to user {name} (uid {uid}) through its /etc/group; a \
         step gets only its host groups {groups:?}, so it is refused"
    )]
    ExtraGroups {
        /// The gids added.
        extra: Vec<u32>,
        /// The user's name.
        name: String,
        /// The user's uid.
        uid: u32,
        /// The user's host groups.
        groups: Vec<u32>,
    },
    /// The image's `/etc` (or a file in it) would send cimage's files elsewhere.
    #[error(
        "in image {image}, {why}: a step as a user would not get its host groups for sure, so \
         it is refused (make /etc/group a regular file in the image)"
    )]
    EtcRedirected {
        /// The image.
        image: String,
        /// What is redirected, e.g. `/etc/group is a symlink to /dev/shm/group`.
        why: String,
    },
}

/// Refuses a created container whose read-back identity goes beyond the host identity:
/// containerd 1.6 adds the groups the image's /etc/group gives the user, and has no strict
/// supplemental-groups policy to stop it.
pub fn check_identity(
    cid: &str,
    got: Option<ProcessIdentity>,
    want: &Identity,
) -> Result<(), ReadBackRefusal> {
    let Some(got) = got else {
        return Err(ReadBackRefusal::NoIdentity {
            cid: cid.to_owned(),
        });
    };
    if (got.uid, got.gid) != (want.uid, want.gid) {
        return Err(ReadBackRefusal::OtherIdentity {
            got: (got.uid, got.gid),
            want: (want.uid, want.gid),
        });
    }
    let mut extra: Vec<u32> = got
        .additional_gids
        .iter()
        .copied()
        .filter(|g| !want.groups.contains(g))
        .collect();
    extra.sort_unstable();
    extra.dedup();
    if !extra.is_empty() {
        return Err(ReadBackRefusal::ExtraGroups {
            extra,
            name: want.name.clone(),
            uid: want.uid,
            groups: want.groups.clone(),
        });
    }
    Ok(())
}

/// Refuses an image whose `/etc`, `/etc/passwd` or `/etc/group` is a symlink (or not a
/// directory and regular files): cimage's own files for the step would be mounted where the
/// link points, and runc would read the job's file instead when it sets the groups.
pub fn check_etc(etc: Option<EtcCheck>, image: &str) -> Result<(), ReadBackRefusal> {
    match etc {
        None | Some(EtcCheck::Plain) => Ok(()),
        Some(EtcCheck::Redirected(why)) => Err(ReadBackRefusal::EtcRedirected {
            image: image.to_owned(),
            why,
        }),
        Some(EtcCheck::Unknown(why)) => {
            warn!(
                image,
                "cannot check the image's /etc before the start: {why}"
            );
            Ok(())
        }
    }
}
