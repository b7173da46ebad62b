//! What a launch asks for, and its validation: everything is checked before anything is created,
//! so a refused launch changes nothing.

use std::path::PathBuf;
use std::time::Duration;

use super::devices::{self, CdiSupport};
use super::mounts::{self, MountError};
use super::request::{Identity, MountRequest, Principal, SpecError, UserRef, UserRequest};
use crate::credentials::Credentials;
use crate::identity::{HostUser, Users};
use crate::policy::PullPolicy;
use crate::reference::ImageRef;
use crate::runtime::{DeviceSpec, MountSpec, Resources};

/// Resolves who a step runs as, through the host's user database: the caller when `request` is
/// `None`. A non-root caller may only run as itself, with its primary group or one of its host
/// groups; only root may name another user (uid 0 included). The user must exist on the host.
/// Blocking (NSS).
pub fn resolve_identity(
    who: Principal,
    request: Option<&UserRequest>,
    users: &dyn Users,
) -> Result<Identity, SpecError> {
    let lookup = |r: &UserRef| -> Result<HostUser, SpecError> {
        let found = match r {
            UserRef::Uid(uid) => users.by_uid(*uid),
            UserRef::Name(name) => users.by_name(name),
        }
        .map_err(|e| SpecError::Invalid(e.to_string()))?;
        found.ok_or_else(|| {
            SpecError::Invalid(match r {
                UserRef::Uid(uid) => format!(
                    "uid {uid} has no passwd entry on this node; a step runs as a host user"
                ),
                UserRef::Name(n) => {
                    format!("user {n:?} does not exist on this node; a step runs as a host user")
                }
            })
        })
    };
    let (mut user, gid) = match request {
        None => (lookup(&UserRef::Uid(who.uid))?, None),
        Some(r) => (lookup(&r.user)?, r.gid),
    };
    if who.uid != 0
        && user.uid == who.uid
        && matches!(request, Some(r) if matches!(r.user, UserRef::Name(_)))
    {
        // Another name for the same uid (an alias line in passwd) is still the caller: the
        // step gets the uid's own entry, its name and primary group, as `id` would show them.
        user = lookup(&UserRef::Uid(who.uid))?;
    }
    let gid = gid.unwrap_or(user.gid);
    let groups = users
        .groups(&user, gid)
        .map_err(|e| SpecError::Invalid(e.to_string()))?;
    if who.uid != 0 {
        if user.uid != who.uid {
            return Err(SpecError::Denied(format!(
                "uid {} may only launch as itself, not as {} (uid {})",
                who.uid, user.name, user.uid
            )));
        }
        let own = users
            .groups(&user, user.gid)
            .map_err(|e| SpecError::Invalid(e.to_string()))?;
        if gid != who.gid && !own.contains(&gid) {
            return Err(SpecError::Denied(format!(
                "uid {} may only launch as itself with one of its own groups, not gid {gid}",
                who.uid
            )));
        }
    }
    Ok(Identity {
        uid: user.uid,
        gid,
        name: user.name,
        groups,
    })
}

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

/// A launch that passed every check.
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
    /// Who asked (set by the launcher; a new job records its uid as its creator, and joining
    /// a job is checked against it).
    pub creator: Principal,
    /// The mounts asked for (their paths checked, not yet opened).
    pub mount_requests: Vec<MountRequest>,
    /// The staged mounts the runtime is given (filled in when they are staged).
    pub mounts: Vec<MountSpec>,
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
const RUNTIME_FILESYSTEMS: &[&str] = &["/proc", "/sys", "/dev"];

/// Files cimage writes into every step that runs as a user (see [`super::etc_files`]):
/// the host's account of the user, which the runtime reads to set the groups.
pub const IDENTITY_FILES: &[&str] = &["/etc/passwd", "/etc/group"];

/// Whether `path` lies strictly below `dir` (both normal and absolute).
fn under(path: &str, dir: &str) -> bool {
    (dir == "/" && path != "/")
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The first of `dirs` that `path` is or lies below.
fn under_any<'a>(path: &str, dirs: &[&'a str]) -> Option<&'a str> {
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

/// Checks a launch that runs as `identity` (see [`resolve_identity`]) against the node's
/// `rules`. Mount sources are resolved (symlinks, `..`) before they are compared with the
/// allowed prefixes, which are resolved too.
pub fn validate(
    spec: &LaunchSpec,
    identity: Identity,
    rules: &Rules,
) -> Result<Validated, SpecError> {
    let invalid = |m: String| SpecError::Invalid(m);
    let allowed_prefixes = &rules.allowed_mount_prefixes;
    let (job, one_off) = match &spec.job {
        Some(j) => {
            check_job_id(j)?;
            (j.clone(), false)
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
    check_resources(&spec.resources)?;
    if let Some(p) = &spec.cgroup_parent {
        check_cgroup_parent(p, rules)?;
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
        creator: Principal {
            uid: identity.uid,
            gid: identity.gid,
            admin: false,
        },
        identity,
        mount_requests,
        mounts: Vec::new(),
        devices,
        cdi_devices,
    })
}

/// Smallest memory limit a step may have: runc refuses less than about 6 MiB.
pub const MIN_MEMORY: u64 = 6 << 20;

/// Most CPUs a step may ask for (in thousandths).
const MAX_MILLICPUS: u32 = 4096 * 1000;

/// Checks the limits' values (not whether the node has that much: the kernel enforces them).
fn check_resources(r: &Resources) -> Result<(), SpecError> {
    let invalid = |m: String| Err(SpecError::Invalid(m));
    if let Some(m) = r.millicpus {
        if !(10..=MAX_MILLICPUS).contains(&m) {
            return invalid(format!(
                "CPU limit {} is out of range: give between 0.01 and {} CPUs",
                f64::from(m) / 1000.0,
                MAX_MILLICPUS / 1000
            ));
        }
    }
    if let Some(b) = r.memory_bytes {
        if b < MIN_MEMORY {
            return invalid(format!(
                "memory limit {} is below the 6 MiB a container needs to start",
                crate::units::format_size(b)
            ));
        }
    }
    if let Some(c) = &r.cpuset_cpus {
        let ok = !c.is_empty()
            && c.len() <= 256
            && c.split(',').all(|part| {
                let mut ends = part.splitn(2, '-');
                let num = |s: Option<&str>| {
                    s.is_some_and(|s| !s.is_empty() && s.chars().all(|ch| ch.is_ascii_digit()))
                };
                let first = ends.next();
                match ends.next() {
                    None => num(first),
                    Some(last) => num(first) && num(Some(last)),
                }
            });
        if !ok {
            return invalid(format!(
                "CPU set {:?} is not a cpuset list (e.g. 0-3,8)",
                crate::units::quote_short(c)
            ));
        }
    }
    Ok(())
}

/// Checks a cgroup parent: a plain absolute cgroup path (cgroupfs driver) or a systemd slice
/// name (`job-42.slice`, systemd driver), and that the caller may use it.
fn check_cgroup_parent(p: &str, rules: &Rules) -> Result<(), SpecError> {
    let allowed_char = |c: char| c.is_ascii_alphanumeric() || "/_.-@:".contains(c);
    let path_ok =
        p.starts_with('/') && !p.split('/').any(|c| c == "." || c == "..") && !p.contains("//");
    let slice_ok = p.ends_with(".slice") && !p.contains('/');
    if p.len() > 256 || !p.chars().all(allowed_char) || !(path_ok || slice_ok) {
        return Err(SpecError::Invalid(format!(
            "cgroup parent {:?} is neither an absolute cgroup path (/crane/job_42) nor a systemd \
             slice name (crane-job_42.slice)",
            crate::units::quote_short(p)
        )));
    }
    if rules.any_cgroup_parent {
        return Ok(());
    }
    let within = rules.allowed_cgroup_parents.iter().any(|prefix| {
        p == prefix
            || (prefix.ends_with(".slice")
                && p.starts_with(prefix.trim_end_matches(".slice"))
                && p.ends_with(".slice"))
            || p.strip_prefix(prefix.as_str())
                .is_some_and(|rest| prefix.ends_with('/') || rest.starts_with('/'))
    });
    if within {
        Ok(())
    } else {
        Err(SpecError::Denied(format!(
            "cgroup parent {p} is not under ImageCache.Launcher.AllowedCgroupParents; only root \
             and the admin group may place a job elsewhere"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_cgroup_parents_are_checked() {
        let r = |millicpus, memory_bytes, cpuset: Option<&str>| Resources {
            millicpus,
            memory_bytes,
            cpuset_cpus: cpuset.map(str::to_owned),
        };
        assert!(check_resources(&r(Some(500), Some(32 << 20), Some("0-1,3"))).is_ok());
        for bad in [
            r(Some(0), None, None),
            r(None, Some(1 << 20), None),
            r(None, None, Some("0-")),
            r(None, None, Some("a")),
        ] {
            assert!(check_resources(&bad).is_err(), "{bad:?}");
        }
        let user = Rules {
            allowed_cgroup_parents: vec!["/crane".into(), "crane.slice".into()],
            ..Default::default()
        };
        for ok in ["/crane/job_1", "/crane", "crane-job_1.slice"] {
            assert!(check_cgroup_parent(ok, &user).is_ok(), "{ok}");
        }
        for denied in ["/system.slice/x", "/cranex", "other.slice"] {
            assert!(
                matches!(
                    check_cgroup_parent(denied, &user),
                    Err(SpecError::Denied(_))
                ),
                "{denied}"
            );
        }
        for bad in ["relative", "/a/../b", "/a b", "a/b.slice"] {
            assert!(
                matches!(check_cgroup_parent(bad, &user), Err(SpecError::Invalid(_))),
                "{bad}"
            );
        }
        let admin = Rules {
            any_cgroup_parent: true,
            ..Default::default()
        };
        assert!(check_cgroup_parent("/anywhere/job", &admin).is_ok());
    }

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

    fn alice() -> Identity {
        Identity {
            uid: 1000,
            gid: 100,
            name: "alice".into(),
            groups: vec![100],
        }
    }

    fn validate_as(s: &LaunchSpec, prefixes: &[PathBuf]) -> Result<Validated, SpecError> {
        validate(
            s,
            alice(),
            &Rules {
                allowed_mount_prefixes: prefixes.to_vec(),
                ..Default::default()
            },
        )
    }

    #[test]
    fn users_launch_only_as_themselves_with_their_host_groups() {
        let users = crate::identity::fake::FakeUsers::standard();
        let alice = Principal {
            uid: 1000,
            gid: 1000,
            admin: false,
        };
        let ask = |who, r: Option<&str>| {
            let req = r.map(|r| r.parse::<UserRequest>().unwrap());
            resolve_identity(who, req.as_ref(), &users)
        };
        let me = ask(alice, None).unwrap();
        assert_eq!(
            (me.uid, me.gid, me.groups.clone()),
            (1000, 1000, vec![27, 1000])
        );
        assert_eq!(me.supplementary(), vec![27]);
        assert_eq!(ask(alice, Some("alice")).unwrap(), me);
        assert_eq!(
            ask(alice, Some("1000:27")).unwrap().gid,
            27,
            "one of her groups"
        );
        for other in ["0", "bob", "1001", "1000:0"] {
            assert!(
                matches!(ask(alice, Some(other)), Err(SpecError::Denied(_))),
                "{other}"
            );
        }
        assert_eq!(ask(ROOT, None).unwrap().uid, 0);
        let bob = ask(ROOT, Some("bob")).unwrap();
        assert_eq!(
            (bob.uid, bob.gid, bob.groups.clone()),
            (1001, 1001, vec![1001])
        );
        assert_eq!(ask(ROOT, Some("1000:5678")).unwrap().groups, vec![27, 5678]);
        let e = ask(ROOT, Some("4242")).unwrap_err().to_string();
        assert!(e.contains("no passwd entry"), "{e}");
        assert!("nobody:x".parse::<UserRequest>().is_err());
        assert!("a b".parse::<UserRequest>().is_err());
        // An alias line for her uid with root's group gives her nothing: she is her own entry.
        users.add(1000, 0, "alice-root", &[0]);
        assert_eq!(ask(alice, Some("alice-root")).unwrap(), me);
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
        assert!(ok.mounts.is_empty(), "staged later");
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
        assert!(!v.one_off && v.job == "job-42.a_b");
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
