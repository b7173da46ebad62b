//! A mount source opened without following symlinks, and checked as the step's user: the walk
//! from `/` one component at a time (`O_PATH|O_NOFOLLOW`), and a forked child that takes the
//! user's uid, gid and host groups (and makes sure it holds no capability), walks the path
//! again, and tells whether the user can reach, read and write the very file that was opened.

use std::ffi::CString;

use super::request::Identity;

/// What the access check in the child found (its exit code).
pub(super) const CHILD_OK: i32 = 0;
pub(super) const CHILD_UNREACHABLE: i32 = 1;
pub(super) const CHILD_UNREADABLE: i32 = 2;
pub(super) const CHILD_UNWRITABLE: i32 = 3;
pub(super) const CHILD_CHANGED: i32 = 4;
pub(super) const CHILD_NO_IDENTITY: i32 = 5;

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
pub(super) struct Fd(i32);

impl Fd {
    /// The descriptor, for system calls made while this is held.
    pub(super) fn raw(&self) -> i32 {
        self.0
    }
}

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
pub(super) enum WalkError {
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

/// Opens `/`+`parts` component by component without following symlinks.
pub(super) fn open_beneath(parts: &[CString]) -> Result<(Fd, libc::stat), WalkError> {
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
pub(super) fn check_as_user(
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
