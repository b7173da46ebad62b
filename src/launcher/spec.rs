//! What a launch asks for, and its validation: everything is checked before anything is created,
//! so a refused launch changes nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::credentials::Credentials;
use crate::policy::PullPolicy;
use crate::reference::ImageRef;
use crate::runtime::{DeviceSpec, MountSpec};

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

impl std::str::FromStr for MountRequest {
    type Err = String;
    /// Parses `SRC:DST[:ro|:rw]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let (src, dst, ro) = match parts.as_slice() {
            [src, dst] => (*src, *dst, false),
            [src, dst, "ro"] => (*src, *dst, true),
            [src, dst, "rw"] => (*src, *dst, false),
            _ => return Err(format!("mount {s:?} is not SRC:DST[:ro]")),
        };
        if src.is_empty() || dst.is_empty() {
            return Err(format!("mount {s:?} is not SRC:DST[:ro]"));
        }
        Ok(Self {
            source: PathBuf::from(src),
            target: dst.to_owned(),
            readonly: ro,
        })
    }
}

/// One step to launch.
#[derive(Debug, Clone, Default)]
pub struct LaunchSpec {
    /// Job id; `None` makes a one-off job that ends with this step.
    pub job: Option<String>,
    /// Step number; `None` takes the job's next number.
    pub step: Option<u32>,
    /// Image reference.
    pub image: String,
    /// Pull policy (`None`: default by tag).
    pub policy: Option<PullPolicy>,
    /// Command and arguments; empty runs the image's default.
    pub command: Vec<String>,
    /// Environment.
    pub env: Vec<(String, String)>,
    /// Working directory ("" for the image's).
    pub workdir: String,
    /// `uid[:gid]` to run as; `None`: the caller.
    pub user: Option<(u32, Option<u32>)>,
    /// Host mounts.
    pub mounts: Vec<MountRequest>,
    /// Devices by path (`/dev/…`) or CDI name (`vendor.com/class=name`).
    pub devices: Vec<String>,
    /// Read-only root filesystem.
    pub readonly_rootfs: bool,
    /// Time limit; the step is stopped and reported `ExceededTimeLimit` past it.
    pub timeout: Option<Duration>,
    /// Registry credentials for the image.
    pub credentials: Option<Credentials>,
}

/// A launch that passed every check.
#[derive(Debug, Clone)]
pub struct Validated {
    /// Job id (given or generated).
    pub job: String,
    /// Whether the job ends with this step.
    pub one_off: bool,
    /// The normalised image.
    pub image: ImageRef,
    /// uid and gid the process runs as; the uid also owns the task.
    pub run_as: (u32, u32),
    /// Canonical mounts.
    pub mounts: Vec<MountSpec>,
    /// Devices by path.
    pub devices: Vec<DeviceSpec>,
    /// CDI devices.
    pub cdi_devices: Vec<String>,
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
}

/// Job ids follow [`crate::names::check`], so they are safe as labels and directory names.
pub fn check_job_id(id: &str) -> Result<(), SpecError> {
    crate::names::check("job id", id).map_err(|e| SpecError::Invalid(e.to_string()))
}

/// Checks a launch for `who`. Mount sources are resolved (symlinks, `..`) before they are
/// compared with `allowed_prefixes`, which are resolved too.
pub fn validate(
    spec: &LaunchSpec,
    who: Principal,
    allowed_prefixes: &[PathBuf],
) -> Result<Validated, SpecError> {
    let invalid = |m: String| SpecError::Invalid(m);
    let (job, one_off) = match &spec.job {
        Some(j) => {
            check_job_id(j)?;
            (j.clone(), false)
        }
        None => (format!("run-{:012x}", rand::random::<u64>() >> 16), true),
    };
    let image = ImageRef::parse(&spec.image).map_err(|e| invalid(e.to_string()))?;
    for (k, _) in &spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(invalid(format!(
                "environment variable name {k:?} is not valid"
            )));
        }
    }
    if !spec.workdir.is_empty() && !spec.workdir.starts_with('/') {
        return Err(invalid(format!(
            "working directory {:?} must be an absolute path",
            spec.workdir
        )));
    }
    if spec.timeout == Some(Duration::ZERO) {
        return Err(invalid("time limit must be longer than 0s".into()));
    }
    let run_as = match spec.user {
        None if who.uid == 0 => (0, 0),
        None => (who.uid, who.gid),
        Some((uid, gid)) => {
            let gid = gid.unwrap_or(if uid == who.uid { who.gid } else { uid });
            if who.uid != 0 && (uid != who.uid || gid != who.gid) {
                return Err(SpecError::Denied(format!(
                    "uid {} may only launch as itself ({}:{}), not as {uid}:{gid}",
                    who.uid, who.uid, who.gid
                )));
            }
            (uid, gid)
        }
    };
    let prefixes: Vec<PathBuf> = allowed_prefixes
        .iter()
        .filter_map(|p| p.canonicalize().ok())
        .collect();
    let mut mounts = Vec::new();
    for m in &spec.mounts {
        if !m.target.starts_with('/') {
            return Err(invalid(format!(
                "mount target {:?} must be an absolute path",
                m.target
            )));
        }
        let real = m.source.canonicalize().map_err(|e| {
            invalid(format!(
                "mount source {} cannot be used: {e}",
                m.source.display()
            ))
        })?;
        if !prefixes.iter().any(|p| real.starts_with(p)) {
            return Err(SpecError::Denied(format!(
                "mount source {} (resolved to {}) is outside the allowed prefixes {} (ImageCache.Launcher.AllowedMountPrefixes)",
                m.source.display(),
                real.display(),
                describe(allowed_prefixes)
            )));
        }
        mounts.push(MountSpec {
            host_path: real,
            container_path: m.target.clone(),
            readonly: m.readonly,
        });
    }
    let mut devices = Vec::new();
    let mut cdi_devices = Vec::new();
    for d in &spec.devices {
        if d.contains('=') {
            let (kind, name) = d.split_once('=').unwrap();
            if !kind.contains('/') || name.is_empty() {
                return Err(invalid(format!(
                    "device {d:?} is neither a /dev path nor a CDI name (vendor.com/class=name)"
                )));
            }
            cdi_devices.push(d.clone());
            continue;
        }
        let real = Path::new(d)
            .canonicalize()
            .map_err(|e| invalid(format!("device {d} cannot be used: {e}")))?;
        if !real.starts_with("/dev") {
            return Err(SpecError::Denied(format!(
                "device {d} resolves to {}, which is not under /dev",
                real.display()
            )));
        }
        devices.push(DeviceSpec {
            host_path: real,
            container_path: d.clone(),
        });
    }
    Ok(Validated {
        job,
        one_off,
        image,
        run_as,
        mounts,
        devices,
        cdi_devices,
    })
}

fn describe(prefixes: &[PathBuf]) -> String {
    if prefixes.is_empty() {
        "(none configured)".into()
    } else {
        prefixes
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: Principal = Principal {
        uid: 1000,
        gid: 100,
        admin: false,
    };
    const ROOT: Principal = Principal {
        uid: 0,
        gid: 0,
        admin: true,
    };

    fn spec() -> LaunchSpec {
        LaunchSpec {
            image: "127.0.0.1:5000/app:1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn users_launch_only_as_themselves() {
        assert_eq!(validate(&spec(), USER, &[]).unwrap().run_as, (1000, 100));
        assert_eq!(validate(&spec(), ROOT, &[]).unwrap().run_as, (0, 0));
        let mut s = spec();
        s.user = Some((1000, None));
        assert_eq!(validate(&s, USER, &[]).unwrap().run_as, (1000, 100));
        s.user = Some((0, None));
        assert!(matches!(validate(&s, USER, &[]), Err(SpecError::Denied(_))));
        s.user = Some((1000, Some(0)));
        assert!(matches!(validate(&s, USER, &[]), Err(SpecError::Denied(_))));
        s.user = Some((1234, Some(99)));
        assert_eq!(validate(&s, ROOT, &[]).unwrap().run_as, (1234, 99));
    }

    #[test]
    fn mounts_must_resolve_under_an_allowed_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("scratch");
        let outside = dir.path().join("secret");
        std::fs::create_dir_all(allowed.join("data")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, allowed.join("link")).unwrap();
        let prefixes = vec![allowed.clone()];
        let with = |src: PathBuf| {
            let mut s = spec();
            s.mounts = vec![MountRequest {
                source: src,
                target: "/data".into(),
                readonly: true,
            }];
            validate(&s, USER, &prefixes)
        };
        let ok = with(allowed.join("data")).unwrap();
        assert_eq!(
            ok.mounts[0].host_path,
            allowed.join("data").canonicalize().unwrap()
        );
        for escape in [
            outside.clone(),
            allowed.join("link"),
            allowed.join("data/../../secret"),
        ] {
            let e = with(escape.clone()).unwrap_err();
            assert!(
                matches!(e, SpecError::Denied(_)),
                "{}: {e}",
                escape.display()
            );
            assert!(e.to_string().contains("AllowedMountPrefixes"), "{e}");
        }
        assert!(matches!(
            with(allowed.join("missing")),
            Err(SpecError::Invalid(_))
        ));
        let mut s = spec();
        s.mounts = vec![MountRequest {
            source: allowed,
            target: "rel".into(),
            readonly: false,
        }];
        assert!(validate(&s, USER, &prefixes).is_err());
    }

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
    fn devices_by_path_or_cdi_name() {
        let mut s = spec();
        s.devices = vec!["/dev/null".into(), "nvidia.com/gpu=0".into()];
        let v = validate(&s, USER, &[]).unwrap();
        assert_eq!(v.devices[0].host_path, PathBuf::from("/dev/null"));
        assert_eq!(v.cdi_devices, vec!["nvidia.com/gpu=0".to_string()]);
        s.devices = vec!["/etc/passwd".into()];
        assert!(matches!(validate(&s, USER, &[]), Err(SpecError::Denied(_))));
        s.devices = vec!["gpu=0".into()];
        assert!(validate(&s, USER, &[]).is_err());
    }

    #[test]
    fn other_checks() {
        let mut s = spec();
        s.job = Some("../etc".into());
        assert!(validate(&s, USER, &[]).is_err());
        s.job = Some("job-42.a_b".into());
        let v = validate(&s, USER, &[]).unwrap();
        assert!(!v.one_off && v.job == "job-42.a_b");
        assert!(validate(&spec(), USER, &[]).unwrap().one_off);
        let mut s = spec();
        s.workdir = "relative".into();
        assert!(validate(&s, USER, &[]).is_err());
        let mut s = spec();
        s.env = vec![("A=B".into(), "x".into())];
        assert!(validate(&s, USER, &[]).is_err());
        let mut s = spec();
        s.image = "Bad Image".into();
        assert!(validate(&s, USER, &[]).is_err());
    }
}
