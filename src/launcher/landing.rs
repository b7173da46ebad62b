//! Where a step's mounts land in its image, and which landings a step as a user refuses.
//!
//! runc resolves every mount destination through the image's symlinks and the mounts already
//! made, and only then reads the container's `/etc/group` to turn the step's gids into groups.
//! So for a step as a user, whatever decides where a mount lands decides its groups: a target
//! checked as text (`/a/b/etc`) may land on `/etc` in an image with `/a/b -> /`. Every mount of
//! the spec the runtime generated (the request's, cimage's own files, the runtime's `/dev`,
//! `/dev/shm`, `/etc/hosts`..., the image's volumes) is checked where `cri` found it lands:
//! - cimage's own `/etc/passwd` and `/etc/group` land exactly there;
//! - nothing else lands on `/`, `/etc`, `/etc/passwd` or `/etc/group`;
//! - the request's mounts do not land inside `/proc`, `/sys` or `/dev`;
//! - no path looked up on the way to a destination lies inside another mount (a request's
//!   directory, the pod's `/dev/shm`, a volume, a file system the runtime makes): what is
//!   there is not the image's and could send the mount anywhere. Only the runtime's own mounts
//!   nest in the file systems it makes new (`/dev/pts` in `/dev`, `/sys/fs/cgroup` in `/sys`).

use tracing::warn;

use super::readback::ReadBackRefusal;
use super::spec::{under, under_any, IDENTITY_FILES, RUNTIME_FILESYSTEMS};
use crate::runtime::{Landing, MountSpec, SpecMount};

/// Where no mount but cimage's own identity files may land: those files and what holds them.
const COVERS_IDENTITY: &[&str] = &["/", "/etc", "/etc/passwd", "/etc/group"];

/// A path without repeated or trailing slashes and `.` components (as image configs may write
/// a volume).
fn normal(path: &str) -> String {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

/// Whether `m` is one of the mounts cimage asked for (`ours`: the request's staged mounts and
/// the identity files). The runtime drops its own mount, or an image volume, at a destination
/// a request names, so the destination tells them apart.
fn is_ours(m: &SpecMount, ours: &[MountSpec]) -> bool {
    ours.iter()
        .any(|o| normal(&o.container_path) == normal(&m.destination))
}

/// Refuses a step as a user whose mounts land where they may not (see the module's doc), in
/// image `image`. Mounts whose landing is unknown (the image's files were not read) are not
/// checked: that is logged.
pub fn check_landings(
    mounts: &[SpecMount],
    ours: &[MountSpec],
    image: &str,
) -> Result<(), ReadBackRefusal> {
    let mut landed: Vec<(&SpecMount, &Landing)> = Vec::with_capacity(mounts.len());
    for m in mounts {
        match &m.landing {
            None => {
                warn!(
                    image,
                    "cannot check where the step's mounts land: the image's files were not read"
                );
                return Ok(());
            }
            Some(Err(why)) => {
                return Err(ReadBackRefusal::Unresolvable {
                    image: image.to_owned(),
                    target: m.destination.clone(),
                    why: why.to_string(),
                })
            }
            Some(Ok(l)) => landed.push((m, l)),
        }
    }
    let lands = |m: &SpecMount, l: &Landing, why: &str| ReadBackRefusal::MountLands {
        image: image.to_owned(),
        target: m.destination.clone(),
        landed: l.path.clone(),
        why: why.to_owned(),
    };
    for (m, l) in &landed {
        let ours = is_ours(m, ours);
        if ours && IDENTITY_FILES.contains(&normal(&m.destination).as_str()) {
            if l.path != normal(&m.destination) {
                return Err(lands(
                    m,
                    l,
                    "cimage's own file for the step must land where it is named",
                ));
            }
            continue;
        }
        if COVERS_IDENTITY.contains(&l.path.as_str()) {
            return Err(lands(
                m,
                l,
                "it would cover the /etc/passwd and /etc/group cimage writes for the step from \
                 the host's user database, from which runc takes the step's groups",
            ));
        }
        if let Some(fs) = under_any(&l.path, RUNTIME_FILESYSTEMS).filter(|_| ours) {
            return Err(lands(
                m,
                l,
                &format!("that is inside {fs}, which the runtime sets up"),
            ));
        }
    }
    for (i, (m, l)) in landed.iter().enumerate() {
        let ours = is_ours(m, ours);
        for (j, (other, ol)) in landed.iter().enumerate() {
            // The runtime's own mounts may nest in the file systems it makes new.
            if i == j || (!ours && !other.bind) {
                continue;
            }
            if let Some(at) = l.looked_at.iter().find(|v| under(v, &ol.path)) {
                return Err(ReadBackRefusal::MountThroughMount {
                    image: image.to_owned(),
                    target: m.destination.clone(),
                    at: at.clone(),
                    through: ol.path.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Refuses a container in which the runtime mounted one of the image's `volumes` although it
/// said it would not create them (only a request's own mount may sit at such a destination).
pub fn check_no_volume(
    mounts: &[SpecMount],
    ours: &[MountSpec],
    volumes: &[String],
    image: &str,
) -> Result<(), ReadBackRefusal> {
    for v in volumes {
        let v = normal(v);
        if let Some(m) = mounts
            .iter()
            .find(|m| normal(&m.destination) == v && !is_ours(m, ours))
        {
            return Err(ReadBackRefusal::UnexpectedVolume {
                image: image.to_owned(),
                volume: m.destination.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::LandingError;
    use std::path::PathBuf;

    /// A mount landing on `at`, having looked at every prefix of the walk given.
    fn mount(dest: &str, bind: bool, walk: &[&str]) -> SpecMount {
        SpecMount {
            destination: dest.into(),
            bind,
            landing: Some(Ok(Landing {
                path: walk.last().copied().unwrap_or("/").into(),
                looked_at: walk.iter().map(|s| s.to_string()).collect(),
            })),
        }
    }

    /// A mount that lands where it says.
    fn plain(dest: &str, bind: bool) -> SpecMount {
        let parts: Vec<&str> = dest.split('/').filter(|c| !c.is_empty()).collect();
        let walk: Vec<String> = (1..=parts.len())
            .map(|n| format!("/{}", parts[..n].join("/")))
            .collect();
        let walk: Vec<&str> = walk.iter().map(String::as_str).collect();
        mount(dest, bind, &walk)
    }

    fn ours(dests: &[&str]) -> Vec<MountSpec> {
        dests
            .iter()
            .map(|d| MountSpec {
                host_path: PathBuf::from("/staged").join(d.trim_start_matches('/')),
                container_path: d.to_string(),
                readonly: true,
            })
            .collect()
    }

    /// What containerd 1.6 makes for a step as a user with one request mount at /data.
    fn runtime_mounts() -> Vec<SpecMount> {
        vec![
            plain("/proc", false),
            plain("/dev", false),
            plain("/dev/pts", false),
            plain("/dev/mqueue", false),
            plain("/sys", false),
            plain("/sys/fs/cgroup", false),
            plain("/data", true),
            plain("/etc/group", true),
            plain("/etc/passwd", true),
            plain("/etc/hostname", true),
            plain("/etc/hosts", true),
            plain("/etc/resolv.conf", true),
            plain("/dev/shm", true),
        ]
    }

    fn check(mounts: &[SpecMount]) -> Result<(), String> {
        let ours = ours(&["/data", "/etc/passwd", "/etc/group"]);
        check_landings(mounts, &ours, "img").map_err(|e| e.to_string())
    }

    #[test]
    fn a_plain_image_passes() {
        assert_eq!(check(&runtime_mounts()), Ok(()));
    }

    #[test]
    fn nothing_lands_on_etc_or_the_identity_files_or_their_parents() {
        let cases = [
            // The request's mount, an image volume, the runtime's own /dev and /etc/hosts.
            mount("/data", true, &["/data"]),
            mount("/a/b/etc", true, &["/a", "/a/b", "/etc"]),
            mount("/dev", false, &["/dev", "/etc"]),
            mount("/etc/hosts", true, &["/etc", "/etc/hosts", "/etc/group"]),
            mount("/x", true, &["/x", "/"]),
        ];
        let landed = ["/data", "/etc", "/etc", "/etc/group", "/"];
        for (i, (bad, at)) in cases.into_iter().zip(landed).enumerate() {
            let mut all = runtime_mounts();
            match i {
                // The request's own /data lands on /etc/passwd.
                0 => all[6] = mount("/data", true, &["/data", "/etc/passwd"]),
                _ => all.push(bad),
            }
            let e = check(&all).unwrap_err();
            assert!(e.contains("lands on /"), "{i}: {e}");
            if i > 0 {
                assert!(e.contains(&format!("lands on {at}:")), "{i}: {e}");
            }
        }
        // cimage's /etc/group sent elsewhere by a symlink.
        let mut all = runtime_mounts();
        all[7] = mount(
            "/etc/group",
            true,
            &["/etc", "/etc/group", "/dev/shm/group"],
        );
        let e = check(&all).unwrap_err();
        assert!(e.contains("must land where it is named"), "{e}");
    }

    #[test]
    fn a_request_does_not_land_in_the_runtimes_file_systems() {
        let mut all = runtime_mounts();
        all[6] = mount("/data", true, &["/data", "/proc", "/proc/sys"]);
        let e = check(&all).unwrap_err();
        assert!(e.contains("inside /proc"), "{e}");
    }

    #[test]
    fn no_destination_is_looked_up_inside_another_mount() {
        // Through the pod's /dev/shm, where an earlier step left `e -> /etc`.
        let mut all = runtime_mounts();
        all[6] = mount(
            "/s/h/e",
            true,
            &["/s", "/s/h", "/dev", "/dev/shm", "/dev/shm/e"],
        );
        let e = check(&all).unwrap_err();
        assert!(e.contains("/dev/shm"), "{e}");
        // Through the user's own mounted directory.
        let mut all = runtime_mounts();
        all.push(mount("/q/r", true, &["/q", "/data", "/data/r"]));
        let e = check(&all).unwrap_err();
        assert!(
            e.contains("reached through /data/r, inside the mount at /data"),
            "{e}"
        );
        // The runtime's /etc/hosts sent by the image into the user's directory.
        let mut all = runtime_mounts();
        all[10] = mount(
            "/etc/hosts",
            true,
            &["/etc", "/etc/hosts", "/data", "/data/h"],
        );
        assert!(check(&all)
            .unwrap_err()
            .contains("inside the mount at /data"));
        // A request through the runtime's /dev tmpfs (runc's own links live there).
        let mut all = runtime_mounts();
        all[6] = mount("/data", true, &["/data", "/dev", "/dev/fd", "/home/x"]);
        assert!(check(&all)
            .unwrap_err()
            .contains("inside the mount at /dev"));
    }

    #[test]
    fn a_loop_refuses_and_an_unread_image_is_logged_and_passes() {
        let mut all = runtime_mounts();
        all[6].landing = Some(Err(LandingError::SymlinkLoop {
            limit: 255,
            at: "/a".into(),
        }));
        assert!(check(&all).unwrap_err().contains("cannot be resolved"));
        let mut all = runtime_mounts();
        for m in &mut all {
            m.landing = None;
        }
        assert_eq!(check(&all), Ok(()));
    }

    #[test]
    fn a_volume_the_runtime_said_it_ignores_refuses_the_step() {
        let ours = ours(&["/data", "/etc/passwd", "/etc/group"]);
        let mut all = runtime_mounts();
        let volumes = vec!["/data/".to_owned(), "/cache".to_owned()];
        // A request's own mount at a volume's place is the request's.
        assert!(check_no_volume(&all, &ours, &volumes, "img").is_ok());
        all.push(plain("/cache", true));
        let e = check_no_volume(&all, &ours, &volumes, "img").unwrap_err();
        assert!(e.to_string().contains("volume /cache"), "{e}");
    }
}
