//! A job's pod cgroup, made by cimage with the node's process limit (`Launcher.PidsLimit`).
//!
//! CRI 1.26 has no process limit for a container or a pod; kubelet sets its pod limit on the
//! pod cgroup it makes itself, and so does cimage: under the cgroup parent the job names (or
//! the root), `cimage-<pod uid>` is made with `pids.max`, and the runtime is given it as the
//! pod's cgroup parent, so the pod and every step of the job live inside it and share the
//! limit (a fork bomb stops there). cgroup v1 (the `pids` hierarchy) and v2 (the unified one,
//! the `pids` controller enabled on the way down) with the cgroupfs driver; a systemd slice
//! parent is the slice's to limit (`TasksMax`), and gets no cgroup of cimage's. Blocking.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Where cgroup file systems are mounted, and so where pod cgroups are made.
#[derive(Debug, Clone)]
pub struct CgroupRoot(pub PathBuf);

impl Default for CgroupRoot {
    /// `/sys/fs/cgroup`.
    fn default() -> Self {
        Self(PathBuf::from("/sys/fs/cgroup"))
    }
}

/// The pod cgroup for a pod with uid `pod_uid` under `parent` (none: the root): `None` for a
/// systemd slice parent, which cimage does not make cgroups in.
pub fn pod_cgroup(parent: Option<&str>, pod_uid: &str) -> Option<String> {
    match parent {
        Some(p) if p.ends_with(".slice") => None,
        Some(p) => Some(format!("{}/cimage-{pod_uid}", p.trim_end_matches('/'))),
        None => Some(format!("/cimage-{pod_uid}")),
    }
}

impl CgroupRoot {
    /// Whether the unified (v2) hierarchy is mounted at the root itself.
    fn unified(&self) -> bool {
        self.0.join("cgroup.controllers").exists()
    }

    /// The directory of cgroup `path` that holds `pids.max`.
    fn pids_dir(&self, path: &str) -> PathBuf {
        let rel = path.trim_start_matches('/');
        match self.unified() {
            true => self.0.join(rel),
            false => self.0.join("pids").join(rel),
        }
    }

    /// Makes cgroup `path` (and its parents) with `pids.max` set to `limit`.
    pub fn create(&self, path: &str, limit: u64) -> std::io::Result<()> {
        let dir = self.pids_dir(path);
        if self.unified() {
            // The controller must be enabled in every ancestor for pids.max to exist.
            let rel = path.trim_start_matches('/');
            let mut at = self.0.clone();
            for part in Path::new(rel).components() {
                enable_pids(&at)?;
                at.push(part);
                mkdir(&at)?;
            }
        } else {
            std::fs::create_dir_all(&dir)?;
        }
        // The kernel makes pids.max with the cgroup; creating it is for a plain directory
        // standing in for a cgroup file system (the unit tests').
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("pids.max"))?;
        f.write_all(limit.to_string().as_bytes())
    }

    /// Removes cgroup `path` from every hierarchy it was made in (by cimage, or by the runtime
    /// for the containers inside): empty by then. Errors are ignored: what stays is empty.
    pub fn remove(&self, path: &str) {
        let rel = path.trim_start_matches('/');
        if self.unified() {
            let _ = std::fs::remove_dir(self.0.join(rel));
            return;
        }
        for hierarchy in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let _ = std::fs::remove_dir(hierarchy.path().join(rel));
        }
    }
}

fn mkdir(dir: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// Enables the pids controller for the children of `dir` (v2), unless it is already.
fn enable_pids(dir: &Path) -> std::io::Result<()> {
    let control = dir.join("cgroup.subtree_control");
    let now = std::fs::read_to_string(&control).unwrap_or_default();
    if now.split_whitespace().any(|c| c == "pids") {
        return Ok(());
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&control)?
        .write_all(b"+pids")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cgroups_go_under_the_parent_and_not_into_slices() {
        assert_eq!(pod_cgroup(None, "ab12").as_deref(), Some("/cimage-ab12"));
        assert_eq!(
            pod_cgroup(Some("/crane/job_1/"), "ab12").as_deref(),
            Some("/crane/job_1/cimage-ab12")
        );
        assert_eq!(pod_cgroup(Some("crane-job_1.slice"), "ab12"), None);
    }

    #[test]
    fn the_limit_is_written_in_the_pids_hierarchy_and_removed_from_every_one() {
        let t = tempfile::tempdir().unwrap();
        let root = CgroupRoot(t.path().to_owned());
        for h in ["pids", "memory"] {
            std::fs::create_dir_all(t.path().join(h)).unwrap();
        }
        let dir = t.path().join("pids/crane/cimage-ab12");
        root.create("/crane/cimage-ab12", 4096).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("pids.max")).unwrap(),
            "4096"
        );
        // runc made the pod's directory in the other hierarchies too.
        std::fs::create_dir_all(t.path().join("memory/crane/cimage-ab12")).unwrap();
        std::fs::remove_file(dir.join("pids.max")).unwrap();
        root.remove("/crane/cimage-ab12");
        assert!(!dir.exists());
        assert!(!t.path().join("memory/crane/cimage-ab12").exists());
        assert!(
            t.path().join("pids/crane").exists(),
            "the parent is not cimage's"
        );
    }

    #[test]
    fn on_the_unified_hierarchy_the_controller_is_enabled_on_the_way_down() {
        let t = tempfile::tempdir().unwrap();
        let root = CgroupRoot(t.path().to_owned());
        std::fs::write(t.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        std::fs::write(t.path().join("cgroup.subtree_control"), "").unwrap();
        std::fs::create_dir_all(t.path().join("crane")).unwrap();
        std::fs::write(t.path().join("crane/cgroup.subtree_control"), "pids").unwrap();
        std::fs::create_dir_all(t.path().join("crane/cimage-ab12")).unwrap();
        std::fs::write(t.path().join("crane/cimage-ab12/pids.max"), "max").unwrap();
        root.create("/crane/cimage-ab12", 64).unwrap();
        assert_eq!(
            std::fs::read_to_string(t.path().join("cgroup.subtree_control")).unwrap(),
            "+pids"
        );
        assert_eq!(
            std::fs::read_to_string(t.path().join("crane/cimage-ab12/pids.max")).unwrap(),
            "64"
        );
    }
}
