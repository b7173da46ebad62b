//! Uses of images: each recorded durably with a group commit (uses that arrive while a commit
//! runs go into the next transaction together) and told to whoever follows them; and the marks
//! that keep an image from eviction: in use by a running step, or held for an expected job.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Cache, CacheError, ImageRecord, Origin, Use};
use crate::runtime::RuntimeImage;
use crate::store::{Store, StoreError};

/// A use waiting to be committed, with where to send the stored record (or the commit's
/// error, shared by every use of the failed batch).
pub(super) type PendingUse = (
    Use,
    tokio::sync::oneshot::Sender<Result<ImageRecord, Arc<StoreError>>>,
);

/// In-use marks by image id, with how many guards hold each.
pub(super) type InUseMarks = Arc<Mutex<HashMap<String, usize>>>;

/// A use as told to its followers (see [`Cache::subscribe_uses`]), once it is recorded.
#[derive(Debug, Clone)]
pub struct UseSeen {
    /// The image's id.
    pub id: String,
    /// Its names as the runtime reports them (tags and digest references).
    pub names: Vec<String>,
    /// What it was for.
    pub origin: Origin,
    /// The request pulled it (or joined a pull) rather than finding it on the node.
    pub pulled: bool,
    /// When it was recorded (Unix ms).
    pub at_ms: i64,
}

/// Uses a follower may fall behind by before it misses some (it is told how many).
pub const USES_SEEN_QUEUE: usize = 1024;

/// An image kept from eviction while a step uses it (or an expectation holds it); the mark goes
/// when this drops.
#[derive(Debug)]
pub struct InUse {
    marks: InUseMarks,
    id: String,
}

impl InUse {
    /// The image id it marks.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut m = self.marks.lock().unwrap();
        if let Some(n) = m.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.id);
            }
        }
    }
}

impl Cache {
    /// Records one use of an image the runtime holds; durable before it returns. Uses that
    /// arrive while a commit is under way are committed together in the next transaction (group
    /// commit), so a burst of requests costs one or two fsyncs, not one each.
    pub async fn record_use(
        &self,
        image: RuntimeImage,
        origin: Origin,
    ) -> Result<ImageRecord, CacheError> {
        self.record(Use {
            image,
            origin,
            fingerprint: None,
            pulled: false,
            verified: false,
            requester: None,
            measured: None,
        })
        .await
    }

    /// Records one use (with its credential facts); durable before it returns. Uses that arrive
    /// while a commit is under way are committed together in the next transaction.
    pub async fn record(&self, u: Use) -> Result<ImageRecord, CacheError> {
        let seen = UseSeen {
            id: u.image.id.clone(),
            names: u
                .image
                .repo_tags
                .iter()
                .chain(&u.image.repo_digests)
                .cloned()
                .collect(),
            origin: u.origin,
            pulled: u.pulled,
            at_ms: 0,
        };
        let recorded = self.commit_use(u).await;
        if recorded.is_ok() && self.uses_seen.receiver_count() > 0 {
            let _ = self.uses_seen.send(UseSeen {
                at_ms: self.clock.now_ms(),
                ..seen
            });
        }
        recorded
    }

    /// Follows every use recorded from now on (a follower that falls more than
    /// [`USES_SEEN_QUEUE`] behind is told how many it missed).
    pub fn subscribe_uses(&self) -> tokio::sync::broadcast::Receiver<UseSeen> {
        self.uses_seen.subscribe()
    }

    async fn commit_use(&self, u: Use) -> Result<ImageRecord, CacheError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let lead = {
            let mut p = self.pending_uses.lock().unwrap();
            p.0.push((u, tx));
            !std::mem::replace(&mut p.1, true)
        };
        if lead {
            // The commit loop runs in a task of its own: a request that goes away mid-commit
            // must not strand the others queued behind it.
            let (pending, index, clock) = (
                Arc::clone(&self.pending_uses),
                Arc::clone(&self.index),
                Arc::clone(&self.clock),
            );
            self.background.spawn(async move {
                loop {
                    let batch: Vec<PendingUse> = {
                        let mut p = pending.lock().unwrap();
                        if p.0.is_empty() {
                            p.1 = false;
                            break;
                        }
                        std::mem::take(&mut p.0)
                    };
                    let uses: Vec<Use> = batch.iter().map(|(u, _)| u.clone()).collect();
                    let now = clock.now_ms();
                    let result = Store::off_thread(Arc::clone(&index), move |idx| {
                        idx.record_uses(&uses, now)
                    })
                    .await;
                    match result {
                        Ok(recs) => {
                            for ((_, tx), rec) in batch.into_iter().zip(recs) {
                                let _ = tx.send(Ok(rec));
                            }
                        }
                        Err(e) => {
                            let e = Arc::new(e);
                            for (_, tx) in batch {
                                let _ = tx.send(Err(Arc::clone(&e)));
                            }
                        }
                    }
                }
            });
        }
        match rx.await {
            Ok(Ok(rec)) => Ok(rec),
            Ok(Err(e)) => Err(CacheError::Store(StoreError::new("recording a use", e))),
            Err(_) => Err(CacheError::Store(StoreError::new(
                "recording a use",
                "the commit task ended without an answer",
            ))),
        }
    }

    /// Marks an image as in use by a running step; eviction never touches it while the
    /// returned guard lives (marks count: an image used by two steps stays marked until both
    /// guards drop).
    pub fn mark_in_use(&self, id: &str) -> InUse {
        *self
            .in_use
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_insert(0) += 1;
        InUse {
            marks: Arc::clone(&self.in_use),
            id: id.to_owned(),
        }
    }

    /// Whether a running step uses the image.
    pub fn is_in_use(&self, id: &str) -> bool {
        self.in_use.lock().unwrap().contains_key(id)
    }

    /// Holds an image for a job expected to need it; eviction never touches it while the
    /// returned guard lives.
    pub fn mark_expected(&self, id: &str) -> InUse {
        *self
            .expected
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_insert(0) += 1;
        InUse {
            marks: Arc::clone(&self.expected),
            id: id.to_owned(),
        }
    }

    /// Whether an expectation holds the image for its job.
    pub fn is_expected(&self, id: &str) -> bool {
        self.expected.lock().unwrap().contains_key(id)
    }
}
