//! Host identities, from the node's own user database through NSS (`getpwuid_r`, `getpwnam_r`,
//! `getgrouplist`): the same answers `id` gives, LDAP and sssd included. A step runs as its host
//! user with that user's host groups and nothing else, never with groups an image claims.
//!
//! NSS lookups may block (a directory service): async code calls them off the async workers.

use std::ffi::{CStr, CString};

/// A user as the host knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostUser {
    /// The uid.
    pub uid: u32,
    /// The primary gid (from the passwd entry).
    pub gid: u32,
    /// The login name.
    pub name: String,
}

/// Why the user database could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot look up {what} in the host's user database: {message}")]
pub struct IdentityError {
    /// What was looked up, e.g. `uid 1000`.
    pub what: String,
    /// The system's error.
    pub message: String,
}

/// The host's user database. The real one is [`Nss`]; unit tests use a fake.
pub trait Users: Send + Sync {
    /// The user with this uid, if the host has one.
    fn by_uid(&self, uid: u32) -> Result<Option<HostUser>, IdentityError>;
    /// The user with this name, if the host has one.
    fn by_name(&self, name: &str) -> Result<Option<HostUser>, IdentityError>;
    /// Every gid of the user's groups on the host: its primary `gid` and its supplementary
    /// groups, as `getgrouplist` gives them.
    fn groups(&self, user: &HostUser, gid: u32) -> Result<Vec<u32>, IdentityError>;
    /// The host's name of a group, if it has one (for the `/etc/group` a step sees).
    fn group_name(&self, gid: u32) -> Result<Option<String>, IdentityError>;
}

/// [`Users`] through the C library's NSS calls.
#[derive(Debug, Default, Clone, Copy)]
pub struct Nss;

/// Runs a `get*_r` lookup, growing the buffer while it says ERANGE.
fn passwd_lookup(
    what: &str,
    call: impl Fn(*mut libc::passwd, *mut libc::c_char, usize, *mut *mut libc::passwd) -> i32,
) -> Result<Option<HostUser>, IdentityError> {
    let mut size = 1024usize;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: passwd is plain old data; the call fills it and points its strings into buf,
        // which outlives every read below.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = call(&mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc == libc::ERANGE && size < (1 << 20) {
            size *= 4;
            continue;
        }
        if rc != 0 {
            return Err(IdentityError {
                what: what.to_owned(),
                message: std::io::Error::from_raw_os_error(rc).to_string(),
            });
        }
        if result.is_null() {
            return Ok(None);
        }
        // SAFETY: result points at pwd, whose pw_name points into buf (NUL-terminated).
        let name = unsafe { CStr::from_ptr(pwd.pw_name) }
            .to_string_lossy()
            .into_owned();
        return Ok(Some(HostUser {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            name,
        }));
    }
}

impl Users for Nss {
    fn by_uid(&self, uid: u32) -> Result<Option<HostUser>, IdentityError> {
        passwd_lookup(&format!("uid {uid}"), |pwd, buf, len, result| {
            // SAFETY: every pointer is valid for the call; see passwd_lookup.
            unsafe { libc::getpwuid_r(uid, pwd, buf, len, result) }
        })
    }

    fn by_name(&self, name: &str) -> Result<Option<HostUser>, IdentityError> {
        let Ok(c) = CString::new(name) else {
            return Ok(None);
        };
        passwd_lookup(&format!("user {name:?}"), |pwd, buf, len, result| {
            // SAFETY: every pointer is valid for the call; see passwd_lookup.
            unsafe { libc::getpwnam_r(c.as_ptr(), pwd, buf, len, result) }
        })
    }

    fn groups(&self, user: &HostUser, gid: u32) -> Result<Vec<u32>, IdentityError> {
        let name = CString::new(user.name.as_str()).map_err(|_| IdentityError {
            what: format!("groups of {:?}", user.name),
            message: "the name holds a NUL byte".into(),
        })?;
        let mut n: libc::c_int = 32;
        loop {
            let mut groups = vec![0 as libc::gid_t; n as usize];
            let mut count = n;
            // SAFETY: groups has room for `count` entries; getgrouplist writes at most that many
            // and reports the number it needs in `count`.
            let rc =
                unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
            if rc >= 0 {
                groups.truncate(count.max(0) as usize);
                groups.sort_unstable();
                groups.dedup();
                return Ok(groups);
            }
            if count <= n || count > 65536 {
                return Err(IdentityError {
                    what: format!("groups of {:?}", user.name),
                    message: "getgrouplist failed".into(),
                });
            }
            n = count;
        }
    }

    fn group_name(&self, gid: u32) -> Result<Option<String>, IdentityError> {
        Self::group_name_of(gid)
    }
}

impl Nss {
    fn group_name_of(gid: u32) -> Result<Option<String>, IdentityError> {
        let mut size = 1024usize;
        loop {
            let mut buf = vec![0 as libc::c_char; size];
            // SAFETY: group is plain old data; getgrgid_r fills it and points its strings into
            // buf, which outlives the read below.
            let mut grp: libc::group = unsafe { std::mem::zeroed() };
            let mut result: *mut libc::group = std::ptr::null_mut();
            let rc = unsafe {
                libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut result)
            };
            if rc == libc::ERANGE && size < (1 << 20) {
                size *= 4;
                continue;
            }
            if rc != 0 {
                return Err(IdentityError {
                    what: format!("gid {gid}"),
                    message: std::io::Error::from_raw_os_error(rc).to_string(),
                });
            }
            if result.is_null() {
                return Ok(None);
            }
            // SAFETY: result points at grp, whose gr_name points into buf (NUL-terminated).
            let name = unsafe { CStr::from_ptr(grp.gr_name) };
            return Ok(Some(name.to_string_lossy().into_owned()));
        }
    }
}

/// A user database held in memory, for unit tests.
#[cfg(any(test, feature = "test-util"))]
pub mod fake {
    use super::*;
    use std::sync::Mutex;

    /// Users and their supplementary groups.
    #[derive(Debug, Default)]
    pub struct FakeUsers {
        /// (user, supplementary gids).
        pub users: Mutex<Vec<(HostUser, Vec<u32>)>>,
        /// While set, every lookup fails as it does when the directory service behind NSS
        /// (LDAP, sssd) does not answer.
        pub unavailable: std::sync::atomic::AtomicBool,
    }

    impl FakeUsers {
        /// Adds a user.
        pub fn add(&self, uid: u32, gid: u32, name: &str, groups: &[u32]) {
            self.users.lock().unwrap().push((
                HostUser {
                    uid,
                    gid,
                    name: name.into(),
                },
                groups.to_vec(),
            ));
        }

        /// root, alice (1000) in group 27, bob (1001).
        pub fn standard() -> Self {
            let u = Self::default();
            u.add(0, 0, "root", &[]);
            u.add(1000, 1000, "alice", &[27]);
            u.add(1001, 1001, "bob", &[]);
            u
        }

        fn answering(&self, what: String) -> Result<(), IdentityError> {
            match self.unavailable.load(std::sync::atomic::Ordering::SeqCst) {
                true => Err(IdentityError {
                    what,
                    message: "Resource temporarily unavailable (os error 11)".into(),
                }),
                false => Ok(()),
            }
        }
    }

    impl Users for FakeUsers {
        fn by_uid(&self, uid: u32) -> Result<Option<HostUser>, IdentityError> {
            self.answering(format!("uid {uid}"))?;
            let users = self.users.lock().unwrap();
            Ok(users
                .iter()
                .find(|(u, _)| u.uid == uid)
                .map(|(u, _)| u.clone()))
        }
        fn by_name(&self, name: &str) -> Result<Option<HostUser>, IdentityError> {
            self.answering(format!("user {name:?}"))?;
            let users = self.users.lock().unwrap();
            Ok(users
                .iter()
                .find(|(u, _)| u.name == name)
                .map(|(u, _)| u.clone()))
        }
        fn groups(&self, user: &HostUser, gid: u32) -> Result<Vec<u32>, IdentityError> {
            self.answering(format!("the groups of {}", user.name))?;
            let users = self.users.lock().unwrap();
            let mut g: Vec<u32> = users
                .iter()
                .find(|(u, _)| u.uid == user.uid)
                .map(|(_, g)| g.clone())
                .unwrap_or_default();
            g.push(gid);
            g.sort_unstable();
            g.dedup();
            Ok(g)
        }
        fn group_name(&self, gid: u32) -> Result<Option<String>, IdentityError> {
            self.answering(format!("gid {gid}"))?;
            // Each user's primary group is named after it; others have no name.
            let users = self.users.lock().unwrap();
            Ok(users
                .iter()
                .find(|(u, _)| u.gid == gid)
                .map(|(u, _)| u.name.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_found_by_uid_and_name_with_its_groups() {
        let root = Nss.by_uid(0).unwrap().expect("every host has uid 0");
        assert_eq!((root.uid, root.name.as_str()), (0, "root"));
        assert_eq!(Nss.by_name("root").unwrap(), Some(root.clone()));
        let groups = Nss.groups(&root, root.gid).unwrap();
        assert!(groups.contains(&root.gid), "{groups:?}");
        assert_eq!(Nss.by_name("no-such-user-cimage").unwrap(), None);
        assert_eq!(Nss.by_name("bad\0name").unwrap(), None);
        assert_eq!(Nss.group_name(0).unwrap().as_deref(), Some("root"));
    }
}
