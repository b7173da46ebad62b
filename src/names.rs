//! Names that end up in labels, directory names and database keys (job ids, schedule names):
//! one rule for every module that takes them, so a name accepted in one place is safe in all.

/// A name that breaks the rule, with what it was meant to name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {name:?} must be 1-{MAX_NAME_LEN} characters of A-Z a-z 0-9 . _ - (not starting with .)")]
pub struct InvalidName {
    /// What the name is for, e.g. `job id`.
    pub what: &'static str,
    /// The name as given.
    pub name: String,
}

/// Longest name accepted.
pub const MAX_NAME_LEN: usize = 64;

/// Checks a name: 1–64 of `[A-Za-z0-9._-]`, not starting with `.`, so it is safe as a CRI label
/// value, a path component and a key.
pub fn check(what: &'static str, name: &str) -> Result<(), InvalidName> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            what,
            name: name.to_owned(),
        })
    }
}

/// Whether `p` has the shape of a cgroup parent: a plain absolute cgroup path (cgroupfs
/// driver; no `.`/`..` components, no `//`) or a systemd slice name (`job-42.slice`, systemd
/// driver), at most 256 of `A-Z a-z 0-9 / _ . - @ :`. The launcher checks what a step asks for
/// with it, the config what `Launcher.AllowedCgroupParents` names.
pub fn is_cgroup_parent(p: &str) -> bool {
    let allowed_char = |c: char| c.is_ascii_alphanumeric() || "/_.-@:".contains(c);
    let path_ok =
        p.starts_with('/') && !p.split('/').any(|c| c == "." || c == "..") && !p.contains("//");
    let slice_ok = p.ends_with(".slice") && !p.contains('/');
    p.len() <= 256 && p.chars().all(allowed_char) && (path_ok || slice_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_rule() {
        for good in ["a", "slurm-44", "job_1.2", &"x".repeat(64)] {
            assert!(check("job id", good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "a b", "a\nb", "ü", &"x".repeat(65)] {
            let e = check("job id", bad).unwrap_err().to_string();
            assert!(e.starts_with("job id "), "{e}");
        }
    }
}
