//! Host mounts of a step: the path mounted is the path checked.
//!
//! The runtime resolves a host path when the container is created and mounts it later, when it
//! starts, so no path string handed to it can close the race with a user who swaps a checked
//! directory for a symlink. Instead cimage opens the source itself, walking down from `/` one
//! component at a time without following symlinks (`O_PATH|O_NOFOLLOW`), checks in a forked
//! child that runs as the step's user (its uid, gid and host groups) that the user can reach it
//! (every parent searchable), read it and, for a read-write mount, write it, and that the child
//! reached the same inode; then it binds that open file onto a staging path of its own, under a
//! root-only directory, and gives the runtime the staging path. Staged mounts are released when
//! the step's container is gone, and swept at start-up for tasks that no longer exist.
//!
//! This file owns the contract ([`MountStager`], [`MountError`], the path rules of [`locate`])
//! and the binding; the walk and the check as the user are in `access`.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use super::access;
use super::request::{Identity, MountRequest};
use crate::runtime::MountSpec;

/// Why a mount cannot be given to a step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountError {
    /// The source lies outside `ImageCache.Launcher.AllowedMountPrefixes`.
    #[error(
        "mount source {path}: is outside the allowed prefixes {prefixes} \
         (ImageCache.Launcher.AllowedMountPrefixes)"
    )]
    Outside {
        /// The source as asked for.
        path: String,
        /// The allowed prefixes, listed for the reader.
        prefixes: String,
    },
    /// The request itself is not acceptable (relative, `..`, missing, a symlink).
    #[error("mount source {path}: {message}")]
    Refused {
        /// The source as asked for.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The step's user may not use it.
    #[error("mount source {path}: {message}")]
    Denied {
        /// The source as asked for.
        path: String,
        /// Which permission is missing.
        message: String,
    },
    /// Staging failed on the host.
    #[error("cannot stage mount source {path}: {message}")]
    Host {
        /// The source as asked for.
        path: String,
        /// The system's error.
        message: String,
    },
}

/// Stages the host mounts of steps. The real one binds opened files ([`BindStager`]); unit
/// tests use a fake that checks without mounting.
pub trait MountStager: Send + Sync {
    /// Checks and stages every mount of `task` for `identity`, all or nothing; returns what the
    /// runtime is to mount. Blocking.
    fn stage(
        &self,
        task: &str,
        requests: &[MountRequest],
        identity: &Identity,
        prefixes: &[PathBuf],
    ) -> Result<Vec<MountSpec>, MountError>;
    /// Writes `task`'s `/etc/passwd` and `/etc/group` (see `etc_files`) where the
    /// user cannot change them; returns their read-only mounts. Released with the mounts.
    /// Blocking.
    fn identity_files(
        &self,
        task: &str,
        passwd: &str,
        group: &str,
    ) -> Result<Vec<MountSpec>, MountError>;
    /// Releases the staged mounts of `task` (none is fine). Blocking.
    fn release(&self, task: &str) -> Result<(), MountError>;
    /// Tasks that have staged mounts now (for the sweep after a restart).
    fn staged_tasks(&self) -> Vec<String>;
}

/// The checks that need no file system: an absolute, normal path (no `.` or `..`, which would
/// mean something else to the user than to cimage) below one of the prefixes. Returns the
/// canonical prefix and the components below it.
pub fn locate(source: &Path, prefixes: &[PathBuf]) -> Result<(PathBuf, Vec<String>), MountError> {
    let refused = |message: String| MountError::Refused {
        path: source.display().to_string(),
        message,
    };
    if !source.is_absolute() {
        return Err(refused(
            "must be an absolute path (a relative one would name the daemon's directory)".into(),
        ));
    }
    if source
        .components()
        .any(|c| matches!(c, Component::CurDir | Component::ParentDir))
        || source.as_os_str().as_bytes().contains(&0)
    {
        return Err(refused("must not contain . or .. components".into()));
    }
    for p in prefixes {
        let canonical = p.canonicalize().unwrap_or_else(|_| p.clone());
        let rest = source
            .strip_prefix(p)
            .or_else(|_| source.strip_prefix(&canonical));
        if let Ok(rest) = rest {
            let parts = rest
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            return Ok((canonical, parts));
        }
    }
    Err(MountError::Outside {
        path: source.display().to_string(),
        prefixes: if prefixes.is_empty() {
            "(none configured)".to_owned()
        } else {
            prefixes
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        },
    })
}

/// [`MountStager`] that binds opened files under a root-only staging directory.
pub struct BindStager {
    root: PathBuf,
}

impl BindStager {
    /// Stages under `root` (created with mode 0700 if missing).
    pub fn new(root: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&root)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))?;
        Ok(Self { root })
    }

    fn stage_one(
        &self,
        dir: &Path,
        index: usize,
        req: &MountRequest,
        identity: &Identity,
        prefixes: &[PathBuf],
    ) -> Result<MountSpec, MountError> {
        let source = req.source.display().to_string();
        let (prefix, rest) = locate(&req.source, prefixes)?;
        let full = prefix.join(rest.iter().collect::<PathBuf>());
        let parts: Vec<CString> = full
            .components()
            .filter_map(|c| match c {
                Component::Normal(s) => CString::new(s.as_bytes()).ok(),
                _ => None,
            })
            .collect();
        let refused = |message: String| MountError::Refused {
            path: source.clone(),
            message,
        };
        let host = |message: String| MountError::Host {
            path: source.clone(),
            message,
        };
        let (fd, st) = access::open_beneath(&parts).map_err(|e| match e {
            access::WalkError::Io(e) => host(format!("opening it: {e}")),
            refusal => refused(refusal.to_string()),
        })?;
        let kind = st.st_mode & libc::S_IFMT;
        if kind != libc::S_IFDIR && kind != libc::S_IFREG {
            return Err(refused("is neither a directory nor a regular file".into()));
        }
        let denied = |message: &str| MountError::Denied {
            path: source.clone(),
            message: format!("{} (uid {}) {message}", identity.name, identity.uid),
        };
        let verdict = access::check_as_user(&parts, &st, identity, !req.readonly)
            .map_err(|e| host(format!("checking access as {}: {e}", identity.name)))?;
        match verdict {
            access::CHILD_OK => {}
            access::CHILD_UNREACHABLE => {
                return Err(denied(
                    "cannot reach it: a directory above it is not searchable",
                ))
            }
            access::CHILD_UNREADABLE => return Err(denied("may not read it")),
            access::CHILD_UNWRITABLE => {
                return Err(denied(
                    "may not write it; mount it read-only (:ro) or ask for access",
                ))
            }
            access::CHILD_CHANGED => {
                return Err(refused("changed while it was being checked".into()))
            }
            access::CHILD_NO_IDENTITY => {
                return Err(host("cannot take the user's identity".into()))
            }
            other => return Err(host(format!("access check ended with {other}"))),
        }
        let target = dir.join(index.to_string());
        let made = if kind == libc::S_IFDIR {
            std::fs::create_dir(&target)
        } else {
            std::fs::File::create(&target).map(|_| ())
        };
        made.map_err(|e| host(format!("{}: {e}", target.display())))?;
        let from = CString::new(format!("/proc/self/fd/{}", fd.raw())).expect("no NUL");
        let to = CString::new(target.as_os_str().as_bytes()).map_err(|e| host(e.to_string()))?;
        // SAFETY: both paths are NUL-terminated; the source names our open O_PATH descriptor,
        // so the file bound is the one checked, whatever its path names now.
        let rc = unsafe {
            libc::mount(
                from.as_ptr(),
                to.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(host(format!(
                "binding onto {}: {}",
                target.display(),
                std::io::Error::last_os_error()
            )));
        }
        // The staged copy takes no part in mount propagation; it honours no setuid bit or
        // device node, keeps the source mount's other flags (a remount replaces them all), and
        // a read-only mount is read-only here already, not only in the container.
        // SAFETY: statvfs is plain old data, filled by fstatvfs for our open descriptor.
        let mut vfs: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: see above.
        if unsafe { libc::fstatvfs(fd.raw(), &mut vfs) } != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: undoes the bind just made.
            unsafe { libc::umount2(to.as_ptr(), libc::MNT_DETACH) };
            return Err(host(format!("reading its mount flags: {e}")));
        }
        let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV;
        for (st, ms) in [
            (libc::ST_RDONLY, libc::MS_RDONLY),
            (libc::ST_NOEXEC, libc::MS_NOEXEC),
            (libc::ST_NOATIME, libc::MS_NOATIME),
            (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
            (libc::ST_RELATIME, libc::MS_RELATIME),
        ] {
            if vfs.f_flag & st != 0 {
                flags |= ms;
            }
        }
        if req.readonly {
            flags |= libc::MS_RDONLY;
        }
        let remounts = [
            (libc::MS_PRIVATE, "making it private"),
            (flags, "setting its flags"),
        ];
        for (flags, what) in remounts {
            // SAFETY: a NUL-terminated path; no source, type or data.
            let rc = unsafe {
                libc::mount(
                    std::ptr::null(),
                    to.as_ptr(),
                    std::ptr::null(),
                    flags,
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                // SAFETY: as above; undoes the bind just made.
                unsafe { libc::umount2(to.as_ptr(), libc::MNT_DETACH) };
                return Err(host(format!("{what} {}: {e}", target.display())));
            }
        }
        Ok(MountSpec {
            host_path: target,
            container_path: req.target.clone(),
            // Read-only where it is staged, and a bind of it stays so. Asking the runtime for
            // read-only would make runc remount it with that flag alone, dropping nosuid and
            // nodev.
            readonly: false,
        })
    }
}

impl MountStager for BindStager {
    fn stage(
        &self,
        task: &str,
        requests: &[MountRequest],
        identity: &Identity,
        prefixes: &[PathBuf],
    ) -> Result<Vec<MountSpec>, MountError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let dir = self.root.join(task);
        std::fs::create_dir_all(&dir).map_err(|e| MountError::Host {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
        let mut staged = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            match self.stage_one(&dir, i, r, identity, prefixes) {
                Ok(m) => staged.push(m),
                Err(e) => {
                    let _ = self.release(task);
                    return Err(e);
                }
            }
        }
        Ok(staged)
    }

    fn identity_files(
        &self,
        task: &str,
        passwd: &str,
        group: &str,
    ) -> Result<Vec<MountSpec>, MountError> {
        let dir = self.root.join(task);
        let host = |path: &Path, e: std::io::Error| MountError::Host {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(&dir).map_err(|e| host(&dir, e))?;
        let mut mounts = Vec::new();
        for (name, text) in [("passwd", passwd), ("group", group)] {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| host(&path, e))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
                .map_err(|e| host(&path, e))?;
            mounts.push(MountSpec {
                host_path: path,
                container_path: format!("/etc/{name}"),
                readonly: true,
            });
        }
        Ok(mounts)
    }

    fn release(&self, task: &str) -> Result<(), MountError> {
        let dir = self.root.join(task);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let path = e.path();
            if let Ok(c) = CString::new(path.as_os_str().as_bytes()) {
                // SAFETY: a NUL-terminated path; not being a mount point is fine.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            let _ = std::fs::remove_dir(&path).or_else(|_| std::fs::remove_file(&path));
        }
        std::fs::remove_dir(&dir).map_err(|e| MountError::Host {
            path: dir.display().to_string(),
            message: format!("releasing: {e}"),
        })
    }

    fn staged_tasks(&self) -> Vec<String> {
        std::fs::read_dir(&self.root)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A stager for unit tests: the path checks, and the source's canonical path as the staged one.
#[cfg(test)]
pub mod fake {
    use super::*;

    /// Checks like [`BindStager`] without mounting; records releases and identity files.
    #[derive(Default)]
    pub struct CheckOnly {
        /// Tasks released, in order.
        pub released: std::sync::Mutex<Vec<String>>,
        /// Identity files asked for: (task, passwd, group).
        pub identity_files: std::sync::Mutex<Vec<(String, String, String)>>,
        /// When set, staging fails on the host with this message (as an I/O error would).
        pub host_failure: std::sync::Mutex<Option<String>>,
    }

    impl MountStager for CheckOnly {
        fn stage(
            &self,
            _task: &str,
            requests: &[MountRequest],
            _identity: &Identity,
            prefixes: &[PathBuf],
        ) -> Result<Vec<MountSpec>, MountError> {
            if let Some(message) = self.host_failure.lock().unwrap().clone() {
                return Err(MountError::Host {
                    path: format!("{}", requests[0].source.display()),
                    message,
                });
            }
            requests
                .iter()
                .map(|r| {
                    let (prefix, rest) = locate(&r.source, prefixes)?;
                    Ok(MountSpec {
                        host_path: prefix.join(rest.iter().collect::<PathBuf>()),
                        container_path: r.target.clone(),
                        readonly: r.readonly,
                    })
                })
                .collect()
        }
        fn identity_files(
            &self,
            task: &str,
            passwd: &str,
            group: &str,
        ) -> Result<Vec<MountSpec>, MountError> {
            self.identity_files.lock().unwrap().push((
                task.to_owned(),
                passwd.to_owned(),
                group.to_owned(),
            ));
            Ok(["passwd", "group"]
                .iter()
                .map(|f| MountSpec {
                    host_path: PathBuf::from(format!("/staged/{task}/{f}")),
                    container_path: format!("/etc/{f}"),
                    readonly: true,
                })
                .collect())
        }
        fn release(&self, task: &str) -> Result<(), MountError> {
            self.released.lock().unwrap().push(task.to_owned());
            Ok(())
        }
        fn staged_tasks(&self) -> Vec<String> {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_absolute_normal_and_under_a_prefix() {
        let prefixes = vec![PathBuf::from("/scratch")];
        let (p, rest) = locate(Path::new("/scratch/alice/data"), &prefixes).unwrap();
        assert_eq!(
            (p, rest),
            (
                PathBuf::from("/scratch"),
                vec!["alice".into(), "data".into()]
            )
        );
        for (bad, why) in [
            ("scratch/alice", "absolute"),
            ("/scratch/../etc", ". or .."),
            ("/etc", "outside the allowed prefixes"),
            ("/scratchy", "outside the allowed prefixes"),
        ] {
            let e = locate(Path::new(bad), &prefixes).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let e = locate(Path::new("/scratch/a"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("none configured"), "{e}");
    }
}
