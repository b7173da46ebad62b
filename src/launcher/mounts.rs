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

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

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
    /// Writes `task`'s `/etc/passwd` and `/etc/group` (see [`super::etc_files`]) where the
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

/// What the access check in the child found.
const CHILD_OK: i32 = 0;
const CHILD_UNREACHABLE: i32 = 1;
const CHILD_UNREADABLE: i32 = 2;
const CHILD_UNWRITABLE: i32 = 3;
const CHILD_CHANGED: i32 = 4;
const CHILD_NO_IDENTITY: i32 = 5;

/// `struct __user_cap_header_struct` of capget(2).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct` of capget(2) (two of them for version 3).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// An open `O_PATH` file descriptor, closed on drop.
struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe { libc::close(self.0) };
    }
}

fn fstat(fd: i32) -> std::io::Result<libc::stat> {
    // SAFETY: st is plain old data filled by the call.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open; st is valid for writes.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// Why the walk down to a mount source stopped.
#[derive(Debug, thiserror::Error)]
enum WalkError {
    /// A component does not exist.
    #[error("does not exist (it would be created as root by the runtime)")]
    Missing,
    /// A component is a symbolic link.
    #[error("contains a symbolic link at {0:?}; give the path it points to")]
    Symlink(CString),
    /// A component above the last is not a directory.
    #[error("{0:?} is not a directory")]
    NotDirectory(CString),
    /// The system refused a call on the way.
    #[error("{0}")]
    Io(std::io::Error),
}

impl BindStager {
    /// Stages under `root` (created with mode 0700 if missing).
    pub fn new(root: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&root)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))?;
        Ok(Self { root })
    }

    /// Opens `/`+`parts` component by component without following symlinks.
    fn open_beneath(parts: &[CString]) -> Result<(Fd, libc::stat), WalkError> {
        let root = c"/";
        // SAFETY: a constant path; the result is checked.
        let fd = unsafe { libc::open(root.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(WalkError::Io(std::io::Error::last_os_error()));
        }
        let mut cur = Fd(fd);
        for (i, part) in parts.iter().enumerate() {
            // SAFETY: cur is open; part is NUL-terminated.
            let next = unsafe {
                libc::openat(
                    cur.0,
                    part.as_ptr(),
                    libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                )
            };
            if next < 0 {
                let e = std::io::Error::last_os_error();
                return Err(if e.kind() == std::io::ErrorKind::NotFound {
                    WalkError::Missing
                } else {
                    WalkError::Io(e)
                });
            }
            cur = Fd(next);
            let st = fstat(cur.0).map_err(WalkError::Io)?;
            let kind = st.st_mode & libc::S_IFMT;
            if kind == libc::S_IFLNK {
                return Err(WalkError::Symlink(part.clone()));
            }
            if i + 1 < parts.len() && kind != libc::S_IFDIR {
                return Err(WalkError::NotDirectory(part.clone()));
            }
        }
        let st = fstat(cur.0).map_err(WalkError::Io)?;
        Ok((cur, st))
    }

    /// In a forked child running as the step's user: walks the path again (every parent must be
    /// searchable), checks it reached the same inode, and that the user may read it (and write
    /// it, for a read-write mount). Returns the child's verdict.
    fn check_as_user(
        parts: &[CString],
        expect: &libc::stat,
        identity: &Identity,
        writable: bool,
    ) -> std::io::Result<i32> {
        let groups: Vec<libc::gid_t> = identity.groups.clone();
        let is_dir = expect.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let (dev, ino) = (expect.st_dev, expect.st_ino);
        // SAFETY: the child only makes system calls on memory prepared before the fork, then
        // exits with _exit; it never returns into Rust code that could allocate or lock.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: raw system calls of the single-threaded child, see above.
            unsafe {
                let verdict = (|| {
                    if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0
                        || libc::syscall(
                            libc::SYS_setresgid,
                            identity.gid,
                            identity.gid,
                            identity.gid,
                        ) != 0
                        || libc::syscall(
                            libc::SYS_setresuid,
                            identity.uid,
                            identity.uid,
                            identity.uid,
                        ) != 0
                    {
                        return CHILD_NO_IDENTITY;
                    }
                    // Leaving uid 0 clears every capability; the check relies on that, so it
                    // makes sure for a user (a keep-caps securebit would leave them).
                    let header = CapHeader {
                        version: CAPABILITY_VERSION_3,
                        pid: 0,
                    };
                    let mut caps = [CapData::default(); 2];
                    if identity.uid != 0
                        && (libc::syscall(libc::SYS_capget, &header, caps.as_mut_ptr()) != 0
                            || caps.iter().any(|c| c.effective != 0 || c.permitted != 0))
                    {
                        return CHILD_NO_IDENTITY;
                    }
                    let mut cur = libc::open(c"/".as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
                    let mut parent = -1;
                    for part in parts {
                        let next = libc::openat(
                            cur,
                            part.as_ptr(),
                            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                        );
                        if next < 0 {
                            return CHILD_UNREACHABLE;
                        }
                        if parent >= 0 {
                            libc::close(parent);
                        }
                        parent = cur;
                        cur = next;
                    }
                    let mut st: libc::stat = std::mem::zeroed();
                    if libc::fstat(cur, &mut st) != 0 || st.st_dev != dev || st.st_ino != ino {
                        return CHILD_CHANGED;
                    }
                    let Some(last) = parts.last() else {
                        // The root directory itself: reachable by everyone.
                        return CHILD_OK;
                    };
                    let flags = libc::O_RDONLY
                        | libc::O_NOFOLLOW
                        | libc::O_CLOEXEC
                        | libc::O_NONBLOCK
                        | if is_dir { libc::O_DIRECTORY } else { 0 };
                    let rd = libc::openat(parent, last.as_ptr(), flags);
                    if rd < 0 {
                        return CHILD_UNREADABLE;
                    }
                    let mut st2: libc::stat = std::mem::zeroed();
                    if libc::fstat(rd, &mut st2) != 0 || st2.st_ino != ino || st2.st_dev != dev {
                        return CHILD_CHANGED;
                    }
                    // Asked of the open file itself (through its /proc/self/fd link), not of
                    // its name, which could name another file by now. The child's real and
                    // effective ids are the user's, so access(2) answers for the user.
                    if writable {
                        let mut path = *b"/proc/self/fd/\0\0\0\0\0\0\0\0\0\0\0\0";
                        let mut digits = [0u8; 10];
                        let (mut n, mut len) = (rd as u32, 0);
                        loop {
                            digits[len] = b'0' + (n % 10) as u8;
                            len += 1;
                            n /= 10;
                            if n == 0 {
                                break;
                            }
                        }
                        for i in 0..len {
                            path[14 + i] = digits[len - 1 - i];
                        }
                        if libc::syscall(
                            libc::SYS_faccessat,
                            libc::AT_FDCWD,
                            path.as_ptr(),
                            libc::W_OK,
                        ) != 0
                        {
                            return CHILD_UNWRITABLE;
                        }
                    }
                    CHILD_OK
                })();
                libc::_exit(verdict);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        if libc::WIFEXITED(status) {
            Ok(libc::WEXITSTATUS(status))
        } else {
            Err(std::io::Error::other(format!(
                "the access check did not finish (wait status {status})"
            )))
        }
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
        let (fd, st) = Self::open_beneath(&parts).map_err(|e| match e {
            WalkError::Io(e) => host(format!("opening it: {e}")),
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
        let verdict = Self::check_as_user(&parts, &st, identity, !req.readonly)
            .map_err(|e| host(format!("checking access as {}: {e}", identity.name)))?;
        match verdict {
            CHILD_OK => {}
            CHILD_UNREACHABLE => {
                return Err(denied(
                    "cannot reach it: a directory above it is not searchable",
                ))
            }
            CHILD_UNREADABLE => return Err(denied("may not read it")),
            CHILD_UNWRITABLE => {
                return Err(denied(
                    "may not write it; mount it read-only (:ro) or ask for access",
                ))
            }
            CHILD_CHANGED => return Err(refused("changed while it was being checked".into())),
            CHILD_NO_IDENTITY => return Err(host("cannot take the user's identity".into())),
            other => return Err(host(format!("access check ended with {other}"))),
        }
        let target = dir.join(index.to_string());
        let made = if kind == libc::S_IFDIR {
            std::fs::create_dir(&target)
        } else {
            std::fs::File::create(&target).map(|_| ())
        };
        made.map_err(|e| host(format!("{}: {e}", target.display())))?;
        let from = CString::new(format!("/proc/self/fd/{}", fd.0)).expect("no NUL");
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
        if unsafe { libc::fstatvfs(fd.0, &mut vfs) } != 0 {
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
    }

    impl MountStager for CheckOnly {
        fn stage(
            &self,
            _task: &str,
            requests: &[MountRequest],
            _identity: &Identity,
            prefixes: &[PathBuf],
        ) -> Result<Vec<MountSpec>, MountError> {
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
