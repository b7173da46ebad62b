//! Who is calling: the uid, gid and groups of the process on the other end of the socket, read
//! from the kernel when the connection is accepted (`SO_PEERCRED`, `SO_PEERGROUPS`), and whether
//! that caller may use admin calls. Nothing is looked up later by pid: a pid can be reused.

use std::ffi::CString;
use std::os::fd::AsRawFd;

/// The calling process as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Effective uid of the peer.
    pub uid: u32,
    /// Effective gid of the peer.
    pub gid: u32,
    /// Peer pid, when known (for logs only).
    pub pid: Option<i32>,
    /// Supplementary groups of the peer when it connected (`SO_PEERGROUPS`).
    pub groups: Vec<u32>,
}

impl Caller {
    /// The peer of a unix stream, as the kernel recorded it when the peer connected.
    pub fn of_stream(stream: &tokio::net::UnixStream) -> std::io::Result<Self> {
        let cred = stream.peer_cred()?;
        Ok(Self {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            groups: peer_groups(stream.as_raw_fd())?,
        })
    }
}

/// The supplementary groups of a unix socket's peer, from `SO_PEERGROUPS` (Linux 4.13+).
fn peer_groups(fd: i32) -> std::io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer holds `len` bytes; the kernel writes at most that many, or says
        // ERANGE and sets `len` to the size it needs.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let need = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(need);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && need > groups.len() && need <= 65536 {
            groups.resize(need, 0);
            continue;
        }
        return Err(e);
    }
}

/// Who may use admin calls: root, and members of the configured admin group.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdminPolicy {
    /// The admin group's gid, if one is configured.
    pub admin_gid: Option<u32>,
}

impl AdminPolicy {
    /// Whether `caller` may remove and pin images (and other admin calls).
    pub fn is_admin(&self, caller: &Caller) -> bool {
        if caller.uid == 0 {
            return true;
        }
        match self.admin_gid {
            Some(g) => caller.gid == g || caller.groups.contains(&g),
            None => false,
        }
    }
}

/// Why a configured group (`SocketGroup`, `AdminGroup`) names no group of this node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// The name holds a NUL byte, which no group name can.
    #[error("group {group:?} contains a NUL byte; give a group name or a numeric gid")]
    Nul {
        /// The name as given.
        group: String,
    },
    /// The host's group database (NSS) has no group of that name.
    #[error("group {group:?} does not exist on this node; create it or give a numeric gid")]
    Unknown {
        /// The name as given.
        group: String,
    },
}

/// Resolves a group given by name or number to its gid.
pub fn resolve_group(group: &str) -> Result<u32, GroupError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name = CString::new(group).map_err(|_| GroupError::Nul {
        group: crate::units::quote_short(group),
    })?;
    // SAFETY: getgrnam reads a NUL-terminated name and returns a pointer into static storage or
    // null; we copy the gid out immediately and keep no reference.
    let entry = unsafe { libc::getgrnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(GroupError::Unknown {
            group: crate::units::quote_short(group),
        });
    }
    // SAFETY: entry is non-null and points at a valid `struct group`.
    Ok(unsafe { (*entry).gr_gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_admin_others_only_by_group() {
        let root = Caller {
            uid: 0,
            gid: 0,
            pid: None,
            groups: vec![],
        };
        let user = Caller {
            uid: 1000,
            gid: 1000,
            pid: None,
            groups: vec![],
        };
        let member = Caller {
            uid: 1001,
            gid: 50,
            pid: None,
            groups: vec![],
        };
        let supplementary = Caller {
            uid: 1002,
            gid: 1002,
            pid: None,
            groups: vec![7, 50],
        };
        let none = AdminPolicy::default();
        let wheel = AdminPolicy {
            admin_gid: Some(50),
        };
        assert!(none.is_admin(&root) && wheel.is_admin(&root));
        assert!(!none.is_admin(&user) && !wheel.is_admin(&user));
        assert!(wheel.is_admin(&member) && !none.is_admin(&member));
        assert!(wheel.is_admin(&supplementary) && !none.is_admin(&supplementary));
    }

    #[tokio::test]
    async fn the_peers_groups_are_the_kernels_record_of_the_connecting_process() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let c = Caller::of_stream(&a).unwrap();
        // SAFETY: plain getters of this process's identity.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        let mut mine = vec![0 as libc::gid_t; n.max(0) as usize];
        unsafe { libc::getgroups(n, mine.as_mut_ptr()) };
        assert_eq!((c.uid, c.gid), (uid, gid));
        let (mut got, mut want) = (c.groups.clone(), mine);
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
        drop(b);
    }

    #[test]
    fn groups_resolve_by_name_and_number() {
        assert_eq!(resolve_group("0"), Ok(0));
        assert_eq!(resolve_group("root"), Ok(0));
        assert!(resolve_group("no-such-group-here")
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
    }
}
