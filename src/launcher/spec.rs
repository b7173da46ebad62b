//! What a launch asks for, and its validation: everything is checked before anything is created,
//! so a refused launch changes nothing.

use std::path::PathBuf;
use std::time::Duration;

use super::devices::{self, CdiSupport};
use super::limits;
use super::mounts::{self, MountError};
use super::request::{Identity, MountRequest, Principal, SpecError, UserRequest};
use crate::credentials::Credentials;
use crate::policy::PullPolicy;
use crate::reference::ImageRef;
use crate::runtime::{DeviceSpec, Resources};

/// What the node allows a launch, besides the caller's own rights.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// Host prefixes mounts must lie under.
    pub allowed_mount_prefixes: Vec<PathBuf>,
    /// Device paths, globs and CDI names steps may have.
    pub allowed_devices: Vec<String>,
    /// Whether the runtime honours CDI names.
    pub cdi: Option<CdiSupport>,
    /// Cgroup parents (prefixes) any launching caller may place a job under
    /// (`Launcher.AllowedCgroupParents`).
    pub allowed_cgroup_parents: Vec<String>,
    /// The caller may place a job under any cgroup parent (root and `AdminGroup`).
    pub any_cgroup_parent: bool,
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
    /// The host user (and optionally group) to run as; `None`: the caller.
    pub user: Option<UserRequest>,
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
    /// CPU and memory limits of the step.
    pub resources: Resources,
    /// The cgroup the job's pod goes under (the first step of a job sets it; later steps keep
    /// it).
    pub cgroup_parent: Option<String>,
    /// A name for the step, shown beside its task id (a container label).
    pub name: Option<String>,
}

/// A launch that passed every check: what validation produced, and nothing added later (the
/// staged mounts and the task's record belong to the accepted step, see `lifecycle`).
#[derive(Debug, Clone)]
pub struct Validated {
    /// Job id (given or generated).
    pub job: String,
    /// Whether the job ends with this step.
    pub one_off: bool,
    /// The normalised image reference, or the local image id it was asked by.
    pub image: String,
    /// The host identity the process runs as; its uid also owns the task.
    pub identity: Identity,
    /// Who asked (a new job records its uid as its creator, and joining a job is checked
    /// against it).
    pub creator: Principal,
    /// The mounts asked for (their paths checked, not yet opened: they are opened, checked as
    /// the step's user and staged when the step is accepted).
    pub mount_requests: Vec<MountRequest>,
    /// Devices by path.
    pub devices: Vec<DeviceSpec>,
    /// CDI devices.
    pub cdi_devices: Vec<String>,
    /// CPU and memory limits.
    pub resources: Resources,
    /// The cgroup parent asked for, checked.
    pub cgroup_parent: Option<String>,
    /// The step's name, checked.
    pub name: Option<String>,
}

/// Container paths a step's mounts may not cover: the file systems the runtime sets up.
pub(super) const RUNTIME_FILESYSTEMS: &[&str] = &["/proc", "/sys", "/dev"];

/// Files cimage writes into every step that runs as a user (see `etc_files`):
/// the host's account of the user, which the runtime reads to set the groups.
pub const IDENTITY_FILES: &[&str] = &["/etc/passwd", "/etc/group"];

/// Whether `path` lies strictly below `dir` (both normal and absolute).
pub(super) fn under(path: &str, dir: &str) -> bool {
    (dir == "/" && path != "/")
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The first of `dirs` that `path` is or lies below.
pub(super) fn under_any<'a>(path: &str, dirs: &[&'a str]) -> Option<&'a str> {
    dirs.iter().copied().find(|d| path == *d || under(path, d))
}

/// A path inside the container, as given for `what`: absolute, without control characters, `.`
/// or `..` (the runtime resolves it inside the image, where cimage cannot see). Returns it with
/// repeated and trailing slashes removed.
pub fn container_path(what: &str, p: &str) -> Result<String, SpecError> {
    let bad =
        |why: &str| SpecError::Invalid(format!("{what} {:?} {why}", crate::units::quote_short(p)));
    if !p.starts_with('/') {
        return Err(bad("must be an absolute path"));
    }
    if p.chars().any(char::is_control) {
        return Err(bad("holds control characters"));
    }
    let parts: Vec<&str> = p.split('/').filter(|c| !c.is_empty()).collect();
    if parts.iter().any(|c| *c == "." || *c == "..") {
        return Err(bad("holds . or .. components; give the path itself"));
    }
    Ok(format!("/{}", parts.join("/")))
}

/// Where a step's mount may not go: over the whole root, into the runtime's `/proc`, `/sys` or
/// `/dev`, or over the identity files cimage writes (or their directory).
fn check_mount_target(target: &str) -> Result<(), SpecError> {
    if target == "/" {
        return Err(SpecError::Denied(
            "mount target / would replace the image's whole file system; mount below it".into(),
        ));
    }
    if let Some(fs) = under_any(target, RUNTIME_FILESYSTEMS) {
        return Err(SpecError::Denied(format!(
            "mount target {target} is inside {fs}, which the runtime sets up; mount elsewhere"
        )));
    }
    if let Some(f) = IDENTITY_FILES
        .iter()
        .find(|f| **f == target || under(f, target))
    {
        return Err(SpecError::Denied(format!(
            "mount target {target} would cover {f}, which cimage writes from the host's user \
             database; mount elsewhere"
        )));
    }
    Ok(())
}

/// Job ids follow [`crate::names::check`], so they are safe as labels and directory names.
pub fn check_job_id(id: &str) -> Result<(), SpecError> {
    crate::names::check("job id", id).map_err(|e| SpecError::Invalid(e.to_string()))
}

/// The job a caller's job id names. Root and the admin group (the scheduler) name jobs as they
/// are; anyone else names jobs in a space of their own, `u<uid>.<id>` (an id already written
/// so is taken as it is), so that no user can take an id the scheduler may use, nor name, join
/// or probe another user's job.
pub fn scoped_job_id(who: Principal, id: &str) -> String {
    let own = format!("u{}.", who.uid);
    match who.admin || id.starts_with(&own) {
        true => id.to_owned(),
        false => format!("{own}{id}"),
    }
}

/// Checks a launch that `who` asked for, to run as `identity` (see
/// [`super::run_as::resolve_identity`]), against the node's `rules`. Mount sources must be
/// absolute, without `.` or `..`, and under an allowed prefix (as written or resolved); they
/// are opened and checked on the file system when the step is accepted (see `mounts`).
pub fn validate(
    spec: &LaunchSpec,
    who: Principal,
    identity: Identity,
    rules: &Rules,
) -> Result<Validated, SpecError> {
    let invalid = |m: String| SpecError::Invalid(m);
    let allowed_prefixes = &rules.allowed_mount_prefixes;
    let (job, one_off) = match &spec.job {
        Some(j) => {
            check_job_id(j)?;
            let scoped = scoped_job_id(who, j);
            check_job_id(&scoped)?;
            (scoped, false)
        }
        None => (format!("run-{:012x}", rand::random::<u64>() >> 16), true),
    };
    let image = match crate::reference::local_image_id(&spec.image) {
        Some(id) => id.to_owned(),
        None => ImageRef::parse(&spec.image)
            .map_err(|e| invalid(e.to_string()))?
            .to_string(),
    };
    for (k, v) in &spec.env {
        let identifier = k
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !identifier {
            return Err(invalid(format!(
                "environment variable name {:?} is not a valid name (letters, digits and _, not starting with a digit)",
                crate::units::quote_short(k)
            )));
        }
        if v.contains('\0') {
            return Err(invalid(format!(
                "environment variable {k} holds a NUL byte"
            )));
        }
    }
    for (what, s) in std::iter::once(("working directory", spec.workdir.as_str())).chain(
        spec.command
            .iter()
            .map(|c| ("command argument", c.as_str())),
    ) {
        if s.contains('\0') {
            return Err(invalid(format!(
                "{what} {:?} holds a NUL byte",
                crate::units::quote_short(s)
            )));
        }
    }
    if !spec.workdir.is_empty() {
        let w = container_path("working directory", &spec.workdir)?;
        if let Some(fs) = under_any(&w, &["/proc", "/sys", "/dev"]) {
            return Err(SpecError::Denied(format!(
                "working directory {w} is inside {fs}, which a step may not start in"
            )));
        }
    }
    if spec.timeout == Some(Duration::ZERO) {
        return Err(invalid("time limit must be longer than 0s".into()));
    }
    if spec
        .timeout
        .is_some_and(|t| t > crate::units::MAX_TIME_LIMIT)
    {
        return Err(invalid(
            "time limit is longer than a year; give a shorter one, or none".into(),
        ));
    }
    let mut mount_requests = Vec::with_capacity(spec.mounts.len());
    for m in &spec.mounts {
        let target = container_path("mount target", &m.target)?;
        check_mount_target(&target)?;
        if let Some(other) = mount_requests.iter().find(|o: &&MountRequest| {
            o.target == target || under(&target, &o.target) || under(&o.target, &target)
        }) {
            return Err(invalid(format!(
                "mount targets {} and {target} overlap; give each mount its own place",
                other.target
            )));
        }
        mount_requests.push(MountRequest {
            target,
            ..m.clone()
        });
        // The path checks that need no file system; the rest is done when the mount is staged
        // (see `mounts`), on the very file that is then mounted.
        match mounts::locate(&m.source, allowed_prefixes) {
            Ok(_) => {}
            Err(e @ MountError::Outside { .. }) => return Err(SpecError::Denied(e.to_string())),
            Err(e) => return Err(invalid(e.to_string())),
        }
    }
    let cdi = rules.cdi.clone().unwrap_or(CdiSupport::Supported);
    let (devices, cdi_devices) = devices::check(&spec.devices, &rules.allowed_devices, &cdi)?;
    limits::check_resources(&spec.resources)?;
    if let Some(p) = &spec.cgroup_parent {
        limits::check_cgroup_parent(p, &rules.allowed_cgroup_parents, rules.any_cgroup_parent)?;
    }
    if let Some(n) = &spec.name {
        crate::names::check("step name", n).map_err(|e| invalid(e.to_string()))?;
    }
    Ok(Validated {
        resources: spec.resources.clone(),
        cgroup_parent: spec.cgroup_parent.clone(),
        name: spec.name.clone(),
        job,
        one_off,
        image,
        creator: who,
        identity,
        mount_requests,
        devices,
        cdi_devices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LaunchSpec {
        LaunchSpec {
            image: "127.0.0.1:5000/app:1".into(),
            ..Default::default()
        }
    }

    fn alice() -> Identity {
        Identity {
            uid: 1000,
            gid: 100,
            name: "alice".into(),
            groups: vec![100],
        }
    }

    fn validate_as(s: &LaunchSpec, prefixes: &[PathBuf]) -> Result<Validated, SpecError> {
        let who = Principal {
            uid: 1000,
            gid: 100,
            admin: false,
        };
        validate(
            s,
            who,
            alice(),
            &Rules {
                allowed_mount_prefixes: prefixes.to_vec(),
                ..Default::default()
            },
        )
    }

    #[test]
    fn mount_paths_are_checked_before_anything_is_opened() {
        let prefixes = vec![PathBuf::from("/scratch")];
        let with = |src: &str, target: &str| {
            let mut s = spec();
            s.mounts = vec![MountRequest {
                source: src.into(),
                target: target.into(),
                readonly: true,
            }];
            validate_as(&s, &prefixes)
        };
        let ok = with("/scratch/alice", "/data").unwrap();
        assert_eq!(ok.mount_requests.len(), 1);
        // Nothing is staged here: `Validated` has no staged mounts (the accepted step does).
        assert!(matches!(with("/etc", "/data"), Err(SpecError::Denied(_))));
        for (src, target) in [
            ("/scratch/../etc", "/data"),
            ("scratch/alice", "/data"),
            ("/scratch/alice", "rel"),
        ] {
            assert!(
                matches!(with(src, target), Err(SpecError::Invalid(_))),
                "{src} {target}"
            );
        }
        assert_eq!(
            with("/scratch/alice", "//data//x/").unwrap().mount_requests[0].target,
            "/data/x"
        );
        for target in ["/data/../etc", "/data/./x", "/da\nta"] {
            assert!(
                matches!(with("/scratch/alice", target), Err(SpecError::Invalid(_))),
                "{target}"
            );
        }
        for target in [
            "/",
            "//",
            "/proc",
            "/proc/1/root",
            "/sys/fs",
            "/dev",
            "/dev/shm",
            "/etc",
            "/etc/passwd",
            "/etc/group",
        ] {
            let e = with("/scratch/alice", target).unwrap_err();
            assert!(matches!(e, SpecError::Denied(_)), "{target}: {e}");
        }
        for target in ["/etc/hosts.d", "/devices", "/process", "/etcetera"] {
            assert!(with("/scratch/alice", target).is_ok(), "{target}");
        }
        let mut s = spec();
        s.mounts = ["/data", "/data/in"]
            .iter()
            .map(|t| MountRequest {
                source: "/scratch/alice".into(),
                target: (*t).into(),
                readonly: true,
            })
            .collect();
        let e = validate_as(&s, &prefixes).unwrap_err().to_string();
        assert!(e.contains("overlap"), "{e}");
        s.mounts[1].target = "/data/".into();
        assert!(validate_as(&s, &prefixes).is_err(), "the same place twice");
        s.mounts[1].target = "/database".into();
        assert!(validate_as(&s, &prefixes).is_ok());
    }

    #[test]
    fn other_checks() {
        let mut s = spec();
        s.job = Some("../etc".into());
        assert!(validate_as(&s, &[]).is_err());
        s.job = Some("job-42.a_b".into());
        let v = validate_as(&s, &[]).unwrap();
        // A user's job ids are in a space of their own; root's (the scheduler's) are as given.
        assert!(!v.one_off && v.job == "u1000.job-42.a_b");
        let root = Principal {
            uid: 0,
            gid: 0,
            admin: true,
        };
        let v = validate(&s, root, alice(), &Rules::default()).unwrap();
        assert_eq!(v.job, "job-42.a_b");
        s.job = Some("u1000.mine".into());
        assert_eq!(validate_as(&s, &[]).unwrap().job, "u1000.mine");
        s.job = Some("x".repeat(60));
        let e = validate_as(&s, &[]).unwrap_err().to_string();
        assert!(e.contains("1-64 characters"), "{e}");
        assert!(validate_as(&spec(), &[]).unwrap().one_off);
        let mut s = spec();
        s.workdir = "relative".into();
        assert!(validate_as(&s, &[]).is_err());
        for w in [
            "/proc/self/fd/7",
            "/proc",
            "/sys/kernel",
            "/work/../proc/1",
            "/dev/fd/7",
        ] {
            s.workdir = w.into();
            assert!(validate_as(&s, &[]).is_err(), "{w}");
        }
        s.workdir = "/work/dir".into();
        assert!(validate_as(&s, &[]).is_ok());
        let mut s = spec();
        s.env = vec![("A=B".into(), "x".into())];
        assert!(validate_as(&s, &[]).is_err());
        let mut s = spec();
        s.image = "Bad Image".into();
        assert!(validate_as(&s, &[]).is_err());
    }
}
