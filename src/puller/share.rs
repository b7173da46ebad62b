//! Each user's share of the node's pull slots: a caller who is neither root nor an admin holds
//! at most `MaxPullsPerUser` of them, and its further pulls wait for its own share, outside the
//! node's line, so one user's pulls (a registry of its own that never answers, say) never hold
//! up other users', the scheduler's or root's.
//!
//! A pull counts for the user who started it. While it waits for that user's share, whoever
//! joins it may carry it on: a user with a share free lends it (the pull then counts for that
//! user), and the node's own work (root, an admin, the CRI endpoint, the scheduler's steps,
//! pre-warm) lifts it out of every share at once, since that work would otherwise wait behind
//! one user's pulls. When the node's work joins a pull that already holds a user's share, the
//! share goes back to the user: the pull is the node's from then on.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Whose share of the pull slots a request's pull counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotOwner {
    /// The node's own work: root and admins over the API, the CRI endpoint, the scheduler's
    /// steps, pre-warm. Waits in the node's line like every pull, under no share.
    Node,
    /// A caller who is neither root nor an admin: at most `MaxPullsPerUser` of the slots.
    User(u32),
}

/// Users kept in the map of shares before idle ones are dropped.
const USERS_KEPT: usize = 64;

/// The shares of every user with pulls (or kept from recent ones).
pub(super) struct Shares {
    per_user: usize,
    users: Mutex<HashMap<u32, Arc<Semaphore>>>,
}

impl Shares {
    /// Shares of `per_user` slots each.
    pub(super) fn new(per_user: usize) -> Self {
        Self {
            per_user,
            users: Mutex::default(),
        }
    }

    /// The share of `uid`.
    fn of(&self, uid: u32) -> Arc<Semaphore> {
        let mut users = self.users.lock().unwrap();
        if users.len() >= USERS_KEPT {
            // A share nobody holds or waits on is the same as a new one.
            let per_user = self.per_user;
            users.retain(|_, s| Arc::strong_count(s) > 1 || s.available_permits() < per_user);
        }
        Arc::clone(
            users
                .entry(uid)
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_user))),
        )
    }
}

/// Who a pull in flight counts for, and the user's slot it holds.
pub(super) struct Claim {
    state: Mutex<ClaimState>,
    changed: Notify,
}

#[derive(Default)]
struct ClaimState {
    /// The node's work asked for it: it counts for no user.
    node: bool,
    /// Users who asked for it (the first started it).
    users: BTreeSet<u32>,
    /// The user's slot it holds, and whose.
    held: Option<(u32, OwnedSemaphorePermit)>,
}

impl Claim {
    /// The claim of a pull started for `owner`.
    pub(super) fn new(owner: SlotOwner) -> Self {
        let claim = Self {
            state: Mutex::default(),
            changed: Notify::new(),
        };
        claim.join(owner);
        claim
    }

    /// One more requester for the pull.
    pub(super) fn join(&self, owner: SlotOwner) {
        let mut s = self.state.lock().unwrap();
        match owner {
            SlotOwner::Node => {
                s.node = true;
                // Back to its user: the pull counts for the node now.
                s.held = None;
            }
            SlotOwner::User(uid) => {
                s.users.insert(uid);
            }
        }
        drop(s);
        self.changed.notify_waiters();
    }

    /// The node's own work asked for the pull (it counts for no user).
    pub(super) fn for_node(&self) -> bool {
        self.state.lock().unwrap().node
    }

    /// The user whose share the pull holds, if any.
    pub(super) fn holder(&self) -> Option<u32> {
        self.state
            .lock()
            .unwrap()
            .held
            .as_ref()
            .map(|(uid, _)| *uid)
    }

    /// Gives the user's slot back (the pull ended).
    pub(super) fn release(&self) {
        self.state.lock().unwrap().held = None;
    }

    /// Takes a share for the pull: at once when the node's work asked for it or one of its
    /// users has a share free; otherwise `on_wait` is told (once) and the pull waits until a
    /// share frees up or a requester who can carry it joins.
    pub(super) async fn take(&self, shares: &Shares, on_wait: impl FnOnce(&BTreeSet<u32>)) {
        let mut on_wait = Some(on_wait);
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let users = {
                let s = self.state.lock().unwrap();
                if s.node || s.held.is_some() {
                    return;
                }
                s.users.clone()
            };
            let of_users: Vec<(u32, Arc<Semaphore>)> =
                users.iter().map(|&u| (u, shares.of(u))).collect();
            for (uid, share) in &of_users {
                if let Ok(permit) = Arc::clone(share).try_acquire_owned() {
                    self.hold(*uid, permit);
                    return;
                }
            }
            if of_users.is_empty() {
                // Not reachable (a claim starts with its owner); nothing to wait for.
                return;
            }
            if let Some(f) = on_wait.take() {
                f(&users);
            }
            let any =
                futures::future::select_all(of_users.into_iter().map(|(uid, share)| {
                    Box::pin(async move { (uid, share.acquire_owned().await) })
                }));
            tokio::select! {
                ((uid, permit), _, _) = any => {
                    self.hold(uid, permit.expect("a share is never closed"));
                    return;
                }
                _ = &mut changed => {}
            }
        }
    }

    /// Keeps `permit` of `uid`'s share, unless the node's work joined meanwhile.
    fn hold(&self, uid: u32, permit: OwnedSemaphorePermit) {
        let mut s = self.state.lock().unwrap();
        if !s.node && s.held.is_none() {
            s.held = Some((uid, permit));
        }
    }
}
