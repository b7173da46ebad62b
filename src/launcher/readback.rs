//! What a step's container is checked for, and why one is refused: before its creation, the
//! image's own volumes; before its start, the identity the runtime would give its process
//! (containerd 1.6 adds the groups the image's `/etc/group` names), for a step as a user an
//! `/etc` in the image that cimage's own identity files really cover, and where every mount
//! lands (see `landing`); after its start, the groups its process has on the host.

use tracing::warn;

use super::request::Identity;
use crate::runtime::{EtcCheck, HostProcess, ProcessIdentity, RuntimeError};

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
    /// The runtime could not be asked something the checks need.
    #[error("cannot ask the runtime {what}: {source}; the step is refused unchecked")]
    Unasked {
        /// What was asked, e.g. `which volumes the image declares`.
        what: &'static str,
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
    /// The image declares volumes and the runtime creates them: one can cover `/etc/group`.
    #[error(
        "image {image} declares volumes [{}], which the runtime creates for each container \
         ({why}); a volume can cover the /etc/group a step's groups are read from, so a step as \
         a user is refused: use an image without VOLUME, run the step as root, or set \
         ignore_image_defined_volumes = true in containerd's CRI plugin config",
        volumes.join(", ")
    )]
    ImageVolumes {
        /// The image.
        image: String,
        /// The volumes it declares.
        volumes: Vec<String>,
        /// What the runtime said, e.g. `containerd's ignore_image_defined_volumes is false`.
        why: String,
    },
    /// The runtime mounted an image volume it said it would not create.
    #[error(
        "the runtime mounted image {image}'s volume {volume} although its config says it \
         ignores image volumes; refused"
    )]
    UnexpectedVolume {
        /// The image.
        image: String,
        /// The volume's destination.
        volume: String,
    },
    /// A mount would land where a step's mounts may not go, through the image's symlinks.
    #[error("in image {image}, mount target {target} lands on {landed}: {why}; refused")]
    MountLands {
        /// The image.
        image: String,
        /// The destination as the spec names it.
        target: String,
        /// Where it lands.
        landed: String,
        /// Why that is refused.
        why: String,
    },
    /// A mount's destination is found through another mount, whose contents (not the
    /// image's) would decide where it lands.
    #[error(
        "in image {image}, mount target {target} is reached through {at}, inside the mount at \
         {through} whose contents are not the image's (they could send it anywhere); refused"
    )]
    MountThroughMount {
        /// The image.
        image: String,
        /// The destination as the spec names it.
        target: String,
        /// The path looked up inside the other mount.
        at: String,
        /// Where the other mount lands.
        through: String,
    },
    /// A mount's destination cannot be resolved in the image (a symlink loop).
    #[error("in image {image}, mount target {target} cannot be resolved: {why}; refused")]
    Unresolvable {
        /// The image.
        image: String,
        /// The destination.
        target: String,
        /// Why.
        why: String,
    },
    /// The started process has other credentials on the host than the step was given.
    #[error(
        "the step's process (pid {pid}) has uids {uids:?}, gids {gids:?} and groups {groups:?} \
         on the host where {uid}:{gid} with groups {want:?} were asked; it was killed"
    )]
    OtherCredentials {
        /// Its host pid.
        pid: u32,
        /// Its real, effective, saved and file-system uid.
        uids: [u32; 4],
        /// Its gids likewise.
        gids: [u32; 4],
        /// Its supplementary groups.
        groups: Vec<u32>,
        /// The uid asked for.
        uid: u32,
        /// The gid asked for.
        gid: u32,
        /// The host groups asked for.
        want: Vec<u32>,
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

/// Refuses a step as a user from an image that declares volumes, unless the runtime says it
/// does not create them (`creates`: `None` when it does not say).
pub fn check_volumes(
    image: &str,
    volumes: &[String],
    creates: Option<bool>,
) -> Result<(), ReadBackRefusal> {
    let why = match creates {
        _ if volumes.is_empty() => return Ok(()),
        Some(false) => return Ok(()),
        Some(true) => "containerd's ignore_image_defined_volumes is false",
        None => "the runtime does not say whether it ignores them",
    };
    Err(ReadBackRefusal::ImageVolumes {
        image: image.to_owned(),
        volumes: volumes.to_vec(),
        why: why.to_owned(),
    })
}

/// Refuses a started process whose credentials on the host are not the step's: every uid
/// and gid as asked, and its groups the host groups asked for (the gid itself may or may not
/// be listed among them).
pub fn check_process(p: &HostProcess, want: &Identity) -> Result<(), ReadBackRefusal> {
    let mut groups: Vec<u32> = p.groups.iter().copied().chain([want.gid]).collect();
    groups.sort_unstable();
    groups.dedup();
    let mut expected = want.groups.clone();
    expected.push(want.gid);
    expected.sort_unstable();
    expected.dedup();
    let same = p.uids.iter().all(|u| *u == want.uid)
        && p.gids.iter().all(|g| *g == want.gid)
        && groups == expected;
    if same {
        return Ok(());
    }
    Err(ReadBackRefusal::OtherCredentials {
        pid: p.pid,
        uids: p.uids,
        gids: p.gids,
        groups: p.groups.clone(),
        uid: want.uid,
        gid: want.gid,
        want: want.groups.clone(),
    })
}
