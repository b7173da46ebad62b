//! What a created container's image holds at `/etc`, `/etc/passwd` and `/etc/group`, and where
//! each of its mount destinations lands through the image's symlinks (see `layers`), read from
//! its containerd snapshot before the container starts.
//!
//! runc reads the container's `/etc/group` when it sets a process's supplementary groups, after
//! every mount is in place. cimage mounts its own `/etc/group` for a step, but a mount target is
//! resolved through the image's symlinks: an image whose `/etc/group` (or `/etc`) is a symlink
//! sends cimage's file elsewhere and can point runc at a file the job controls (in the pod's
//! `/dev/shm`, in a mount, in a volume). So a step as a user runs only from an image where those
//! paths are plain: a directory and regular files, or absent.
//!
//! containerd's CRI reports a container's snapshotter and snapshot key in its verbose status;
//! the snapshot's mounts come from containerd's own Snapshots service on the same socket (the
//! `k8s.io` namespace). For an overlay the layers are read top to bottom with overlayfs' rules
//! (whiteouts, opaque directories); nothing is mounted.

use std::path::PathBuf;

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::MountsRequest;
use containerd_client::types::Mount;
use tonic::transport::Channel;

use super::layers::{entry, resolve, show_target, Entry};
use crate::runtime::{EtcCheck, Landing, LandingError, RuntimeError, RuntimeErrorKind};

/// Asks containerd's Snapshots service for the mounts of snapshot `key` of `snapshotter`.
async fn snapshot_mounts(
    channel: Channel,
    snapshotter: &str,
    key: &str,
) -> Result<Vec<Mount>, tonic::Status> {
    let req = MountsRequest {
        snapshotter: snapshotter.to_owned(),
        key: key.to_owned(),
    };
    let mut client = SnapshotsClient::new(channel);
    Ok(client
        .mounts(super::content::request(req, None))
        .await?
        .into_inner()
        .mounts)
}

/// The layer directories of a snapshot's mounts, topmost first: an overlay's `upperdir` and
/// `lowerdir`s, or a bind mount's source. `None` for mounts of another kind.
fn layers(mounts: &[Mount]) -> Option<Vec<PathBuf>> {
    let [m] = mounts else { return None };
    match m.r#type.as_str() {
        "bind" => Some(vec![PathBuf::from(&m.source)]),
        "overlay" => {
            let opt = |k: &str| {
                m.options
                    .iter()
                    .find_map(|o| o.strip_prefix(k).map(str::to_owned))
            };
            let mut out = Vec::new();
            if let Some(u) = opt("upperdir=") {
                out.push(PathBuf::from(u));
            }
            out.extend(opt("lowerdir=")?.split(':').map(PathBuf::from));
            Some(out)
        }
        _ => None,
    }
}

/// Reads `/etc`, `/etc/passwd` and `/etc/group` through the layers (topmost first) with
/// overlayfs' rules.
pub fn inspect(layers: &[PathBuf]) -> EtcCheck {
    // The layers in which /etc is looked at: from the top, down to the first that hides the
    // rest (a non-directory, a whiteout, or an opaque directory).
    let mut etc_layers = Vec::new();
    for l in layers {
        match entry(&l.join("etc")) {
            Entry::Missing => continue,
            Entry::Whiteout => break,
            Entry::Dir { opaque } => {
                etc_layers.push(l);
                if opaque {
                    break;
                }
            }
            Entry::Symlink(to) => {
                if etc_layers.is_empty() {
                    let to = show_target(&to);
                    return EtcCheck::Redirected(format!("/etc is a symlink to {to}"));
                }
                break;
            }
            Entry::File | Entry::Other => {
                if etc_layers.is_empty() {
                    return EtcCheck::Redirected("/etc is not a directory".into());
                }
                break;
            }
        }
    }
    for name in ["passwd", "group"] {
        for l in &etc_layers {
            match entry(&l.join("etc").join(name)) {
                Entry::Missing => continue,
                Entry::Whiteout | Entry::File => break,
                Entry::Symlink(to) => {
                    let to = show_target(&to);
                    return EtcCheck::Redirected(format!("/etc/{name} is a symlink to {to}"));
                }
                Entry::Dir { .. } | Entry::Other => {
                    return EtcCheck::Redirected(format!("/etc/{name} is not a regular file"))
                }
            }
        }
    }
    EtcCheck::Plain
}

/// What a created container's image says, read before its start.
pub struct ImageView {
    /// What it holds at `/etc`, `/etc/passwd` and `/etc/group`.
    pub etc: EtcCheck,
    /// Where each destination asked about lands in it, in order; `None` when the image could
    /// not be read (then `etc` says why).
    pub landings: Option<Vec<Result<Landing, LandingError>>>,
}

impl ImageView {
    fn unknown(why: String) -> Self {
        Self {
            etc: EtcCheck::Unknown(why),
            landings: None,
        }
    }
}

/// The check for a created container, from its verbose status `info` JSON: its snapshot's
/// layers are looked up in containerd, and its `/etc` and where each of `destinations` lands
/// read from them (off the async threads).
pub async fn check(
    channel: Channel,
    info: &str,
    destinations: Vec<String>,
) -> Result<ImageView, RuntimeError> {
    let v: serde_json::Value = match serde_json::from_str(info) {
        Ok(v) => v,
        Err(_) => {
            return Ok(ImageView::unknown(
                "the runtime's status is not JSON".into(),
            ))
        }
    };
    let (Some(snapshotter), Some(key)) = (
        v.get("snapshotter").and_then(|s| s.as_str()),
        v.get("snapshotKey").and_then(|s| s.as_str()),
    ) else {
        return Ok(ImageView::unknown(
            "the runtime does not name the container's snapshot".into(),
        ));
    };
    let mounts = snapshot_mounts(channel, snapshotter, key)
        .await
        .map_err(|s| RuntimeError {
            op: "Snapshots.Mounts",
            kind: RuntimeErrorKind::Other,
            message: s.message().to_owned(),
        })?;
    let Some(layers) = layers(&mounts) else {
        return Ok(ImageView::unknown(format!(
            "snapshotter {snapshotter} gives mounts cimage cannot read"
        )));
    };
    tokio::task::spawn_blocking(move || ImageView {
        etc: inspect(&layers),
        landings: Some(destinations.iter().map(|d| resolve(&layers, d)).collect()),
    })
    .await
    .map_err(|e| RuntimeError {
        op: "inspecting the image",
        kind: RuntimeErrorKind::Other,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn layer(root: &Path, name: &str) -> PathBuf {
        let l = root.join(name);
        std::fs::create_dir_all(&l).unwrap();
        l
    }

    #[test]
    fn symlinks_at_etc_are_found_through_the_layers() {
        let t = tempfile::tempdir().unwrap();
        let (top, mid, base) = (
            layer(t.path(), "top"),
            layer(t.path(), "mid"),
            layer(t.path(), "base"),
        );
        std::fs::create_dir_all(base.join("etc")).unwrap();
        std::fs::write(base.join("etc/group"), "root:x:0:\n").unwrap();
        std::fs::write(base.join("etc/passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
        let all = vec![top.clone(), mid.clone(), base.clone()];
        assert_eq!(inspect(&all), EtcCheck::Plain);
        // A middle layer makes /etc/group a symlink into /dev/shm.
        std::fs::create_dir_all(mid.join("etc")).unwrap();
        std::os::unix::fs::symlink("/dev/shm/group", mid.join("etc/group")).unwrap();
        match inspect(&all) {
            EtcCheck::Redirected(why) => assert!(why.contains("/dev/shm/group"), "{why}"),
            other => panic!("{other:?}"),
        }
        // The top layer puts a file back over it.
        std::fs::create_dir_all(top.join("etc")).unwrap();
        std::fs::write(top.join("etc/group"), "root:x:0:\n").unwrap();
        assert_eq!(inspect(&all), EtcCheck::Plain);
        // /etc itself a symlink in the top layer.
        std::fs::remove_dir_all(top.join("etc")).unwrap();
        std::os::unix::fs::symlink("/opt/etc", top.join("etc")).unwrap();
        assert!(matches!(inspect(&all), EtcCheck::Redirected(_)));
        // A target made to forge a log line shows escaped.
        std::fs::remove_file(top.join("etc")).unwrap();
        std::os::unix::fs::symlink("/x\nINFO forged", top.join("etc")).unwrap();
        match inspect(&all) {
            EtcCheck::Redirected(why) => assert!(why.contains("/x\\nINFO forged"), "{why}"),
            other => panic!("{other:?}"),
        }
        // No /etc at all is fine (the runtime makes it).
        assert_eq!(inspect(&[layer(t.path(), "empty")]), EtcCheck::Plain);
    }

    #[test]
    fn overlay_and_bind_mounts_give_their_layers_topmost_first() {
        let overlay = Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![
                "index=off".into(),
                "workdir=/s/9/work".into(),
                "upperdir=/s/9/fs".into(),
                "lowerdir=/s/3/fs:/s/2/fs:/s/1/fs".into(),
            ],
        };
        assert_eq!(
            layers(&[overlay]).unwrap(),
            ["/s/9/fs", "/s/3/fs", "/s/2/fs", "/s/1/fs"].map(PathBuf::from)
        );
        let bind = Mount {
            r#type: "bind".into(),
            source: "/s/1/fs".into(),
            target: String::new(),
            options: vec!["ro".into(), "rbind".into()],
        };
        assert_eq!(layers(&[bind]).unwrap(), [PathBuf::from("/s/1/fs")]);
        assert!(layers(&[]).is_none());
    }
}
