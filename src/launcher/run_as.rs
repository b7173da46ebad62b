//! Who a step runs as: a host user and its host groups, resolved through the node's user
//! database (NSS), never through the image. A non-root caller runs only as itself; root may name
//! any user of the host.

use super::request::{Identity, Principal, SpecError, UserRef, UserRequest};
use super::LaunchError;
use crate::identity::{HostUser, Users};

/// Resolves who a step runs as, through the host's user database: the caller when `request` is
/// `None`. A non-root caller may only run as itself, with its primary group or one of its host
/// groups; only root may name another user (uid 0 included). The user must exist on the host.
/// A user database that does not answer is [`LaunchError::IdentityUnavailable`], not a bad
/// request. Blocking (NSS).
pub fn resolve_identity(
    who: Principal,
    request: Option<&UserRequest>,
    users: &dyn Users,
) -> Result<Identity, LaunchError> {
    let lookup = |r: &UserRef| -> Result<HostUser, LaunchError> {
        let found = match r {
            UserRef::Uid(uid) => users.by_uid(*uid),
            UserRef::Name(name) => users.by_name(name),
        }?;
        let absent = || {
            SpecError::Invalid(match r {
                UserRef::Uid(uid) => format!(
                    "uid {uid} has no passwd entry on this node; a step runs as a host user"
                ),
                UserRef::Name(n) => {
                    format!("user {n:?} does not exist on this node; a step runs as a host user")
                }
            })
        };
        found.ok_or_else(|| absent().into())
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
    let groups = users.groups(&user, gid)?;
    if who.uid != 0 {
        if user.uid != who.uid {
            return Err(SpecError::Denied(format!(
                "uid {} may only launch as itself, not as {} (uid {})",
                who.uid, user.name, user.uid
            ))
            .into());
        }
        let own = users.groups(&user, user.gid)?;
        if gid != who.gid && !own.contains(&gid) {
            return Err(SpecError::Denied(format!(
                "uid {} may only launch as itself with one of its own groups, not gid {gid}",
                who.uid
            ))
            .into());
        }
    }
    Ok(Identity {
        uid: user.uid,
        gid,
        name: user.name,
        groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: Principal = Principal {
        uid: 0,
        gid: 0,
        admin: true,
    };

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
                matches!(
                    ask(alice, Some(other)),
                    Err(LaunchError::Spec(SpecError::Denied(_)))
                ),
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
    fn a_user_database_that_does_not_answer_is_an_outage_not_a_bad_request() {
        let users = crate::identity::fake::FakeUsers::standard();
        users
            .unavailable
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let e = resolve_identity(ROOT, None, &users).unwrap_err();
        assert!(matches!(e, LaunchError::IdentityUnavailable(_)), "{e}");
        assert!(e.to_string().contains("uid 0"), "{e}");
    }
}
