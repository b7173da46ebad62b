//! Who is calling: the uid, gid and groups of the process on the other end of the socket, read
//! from the kernel (SO_PEERCRED and /proc), and whether that caller may use admin calls.

use std::ffi::CString;

/// The calling process as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Effective uid of the peer.
    pub uid: u32,
    /// Effective gid of the peer.
    pub gid: u32,
    /// Peer pid, when known.
    pub pid: Option<i32>,
}

impl Caller {
    /// Supplementary groups of the peer process, from `/proc/PID/status` (empty if unknown).
    pub fn groups(&self) -> Vec<u32> {
        let Some(pid) = self.pid else { return vec![] };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            return vec![];
        };
        status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
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
            Some(g) => caller.gid == g || caller.groups().contains(&g),
            None => false,
        }
    }
}

/// Resolves a group given by name or number to its gid.
pub fn resolve_group(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name = CString::new(group).map_err(|_| format!("group {group:?} contains a NUL byte"))?;
    // SAFETY: getgrnam reads a NUL-terminated name and returns a pointer into static storage or
    // null; we copy the gid out immediately and keep no reference.
    let entry = unsafe { libc::getgrnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(format!("group {group:?} does not exist on this node"));
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
        };
        let user = Caller {
            uid: 1000,
            gid: 1000,
            pid: None,
        };
        let member = Caller {
            uid: 1001,
            gid: 50,
            pid: None,
        };
        let none = AdminPolicy::default();
        let wheel = AdminPolicy {
            admin_gid: Some(50),
        };
        assert!(none.is_admin(&root) && wheel.is_admin(&root));
        assert!(!none.is_admin(&user) && !wheel.is_admin(&user));
        assert!(wheel.is_admin(&member) && !none.is_admin(&member));
    }

    #[test]
    fn groups_resolve_by_name_and_number() {
        assert_eq!(resolve_group("0"), Ok(0));
        assert_eq!(resolve_group("root"), Ok(0));
        assert!(resolve_group("no-such-group-here")
            .unwrap_err()
            .contains("does not exist"));
    }
}
