//! The limits a step asks for, checked for their values before anything is created: CPUs,
//! memory and cpuset (whether the node has that much is the kernel's to enforce), and the
//! cgroup parent its job's pod goes under, with who may choose it.

use super::request::SpecError;
use crate::runtime::Resources;

/// Smallest memory limit a step may have: runc refuses less than about 6 MiB.
pub const MIN_MEMORY: u64 = 6 << 20;

/// Fewest CPUs a step may ask for (in thousandths): 0.01 CPU.
pub const MIN_MILLICPUS: u32 = 10;

/// Most CPUs a step may ask for (in thousandths).
pub const MAX_MILLICPUS: u32 = 4096 * 1000;

/// Checks the limits' values (not whether the node has that much: the kernel enforces them).
pub fn check_resources(r: &Resources) -> Result<(), SpecError> {
    let invalid = |m: String| Err(SpecError::Invalid(m));
    if let Some(m) = r.millicpus {
        if !(MIN_MILLICPUS..=MAX_MILLICPUS).contains(&m) {
            return invalid(format!(
                "CPU limit {} is out of range: give between {} and {} CPUs",
                f64::from(m) / 1000.0,
                f64::from(MIN_MILLICPUS) / 1000.0,
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

/// The placeholder in `Launcher.AllowedCgroupParents` that stands for the caller's uid.
pub const UID_PLACEHOLDER: &str = "{uid}";

/// `Launcher.AllowedCgroupParents` as it applies to the caller `uid`: each `{uid}` replaced by
/// it. A site that keeps each user's jobs under a cgroup of their own (`/crane/user_{uid}`,
/// `crane-uid_{uid}.slice`) lets users place pods there and never under another user's job,
/// which a plain shared prefix (`/crane`) cannot tell apart.
pub fn cgroup_parents_for(allowed: &[String], uid: u32) -> Vec<String> {
    allowed
        .iter()
        .map(|p| p.replace(UID_PLACEHOLDER, &uid.to_string()))
        .collect()
}

/// Checks a cgroup parent: a plain absolute cgroup path (cgroupfs driver) or a systemd slice
/// name (`job-42.slice`, systemd driver), and that the caller may use it: within `allowed`
/// (`Launcher.AllowedCgroupParents`), or anywhere with `any` (root and `AdminGroup`).
pub fn check_cgroup_parent(p: &str, allowed: &[String], any: bool) -> Result<(), SpecError> {
    if !crate::names::is_cgroup_parent(p) {
        return Err(SpecError::Invalid(format!(
            "cgroup parent {:?} is neither an absolute cgroup path (/crane/job_42) nor a systemd \
             slice name (crane-job_42.slice)",
            crate::units::quote_short(p)
        )));
    }
    if any {
        return Ok(());
    }
    let within = allowed.iter().any(|prefix| {
        p == prefix
            // systemd names a slice's children by its name and a dash: crane.slice holds
            // crane-job_1.slice, never cranex.slice.
            || prefix.strip_suffix(".slice").is_some_and(|stem| {
                p.strip_prefix(stem)
                    .is_some_and(|rest| rest.starts_with('-') && rest.ends_with(".slice"))
            })
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
        let allowed = ["/crane".to_owned(), "crane.slice".to_owned()];
        let user = |p| check_cgroup_parent(p, &allowed, false);
        for ok in ["/crane/job_1", "/crane", "crane-job_1.slice"] {
            assert!(user(ok).is_ok(), "{ok}");
        }
        for denied in [
            "/system.slice/x",
            "/cranex",
            "other.slice",
            "cranebomb.slice",
            "crane_x.slice",
        ] {
            assert!(
                matches!(user(denied), Err(SpecError::Denied(_))),
                "{denied}"
            );
        }
        for bad in ["relative", "/a/../b", "/a b", "a/b.slice"] {
            assert!(matches!(user(bad), Err(SpecError::Invalid(_))), "{bad}");
        }
        assert!(check_cgroup_parent("/anywhere/job", &[], true).is_ok());
    }

    #[test]
    fn a_uid_placeholder_keeps_each_user_under_their_own_parent() {
        let allowed = vec![
            "/crane/user_{uid}".to_owned(),
            "crane-uid_{uid}.slice".to_owned(),
        ];
        let mine = cgroup_parents_for(&allowed, 1000);
        assert_eq!(mine, vec!["/crane/user_1000", "crane-uid_1000.slice"]);
        let check = |p| check_cgroup_parent(p, &mine, false);
        assert!(check("/crane/user_1000/job_7").is_ok());
        assert!(check("crane-uid_1000-job_7.slice").is_ok());
        for other in [
            "/crane/user_1001/job_8",
            "/crane/user_10000/job_8",
            "crane-uid_1001-job_8.slice",
            "crane-uid_10000.slice",
        ] {
            assert!(matches!(check(other), Err(SpecError::Denied(_))), "{other}");
        }
    }
}
