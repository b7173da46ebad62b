//! Single flight: one runtime pull per (image, credential fingerprint), shared by every request
//! that wants it, run in a task of its own ([`super::job`]) so that a requester going away does
//! not cancel it for the others; what `cimage pulls` reads of the pulls in flight; and the
//! per-registry pull slots.

use std::sync::Arc;

use futures::future::FutureExt;
use tokio::sync::{watch, Semaphore};

use super::job::PullJob;
use super::progress::PullProgress;
use super::queue::Joined;
use super::share::Claim;
use super::{Flight, FlightEntry, FlightKey, PullContext, PullError, Puller, Resolved};
use crate::runtime::RuntimeError;

/// A pull in flight as `cimage pulls` shows it.
#[derive(Debug, Clone)]
pub struct InFlight {
    /// Its progress now.
    pub progress: PullProgress,
    /// It was asked for with credentials (possibly a private image).
    pub credentialed: bool,
    /// Uids of the API callers waiting on it.
    pub uids: Vec<u32>,
}

impl Puller {
    /// The pull slots of registry `host` (its `MaxConcurrentPulls`, or the node's).
    fn registry_limit(&self, host: &str) -> Arc<Semaphore> {
        let mut map = self.per_registry.lock().unwrap();
        map.entry(host.to_owned())
            .or_insert_with(|| {
                let s = &self.core.settings;
                let n = s
                    .per_registry
                    .get(host)
                    .copied()
                    .unwrap_or(s.max_concurrent_pulls);
                Arc::new(Semaphore::new(n))
            })
            .clone()
    }

    /// The pulls in flight and queued, oldest first.
    pub fn pulls(&self) -> Vec<InFlight> {
        let mut out: Vec<InFlight> = self
            .inflight
            .lock()
            .unwrap()
            .values()
            .map(|e| InFlight {
                progress: e.progress.borrow().clone(),
                credentialed: e.credentialed,
                uids: e.uids.lock().unwrap().iter().copied().collect(),
            })
            .filter(|f| !f.progress.phase.is_final())
            .collect();
        out.sort_by_key(|f| f.progress.started);
        out
    }

    /// Pulls waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.core.queue.len()
    }

    /// Joins the pull of `image` already under way for the same credentials, or starts one;
    /// the requester's sink gets the pull's progress until it ends.
    pub(super) async fn pull_shared(
        &self,
        ask: &PullContext<'_>,
        creds: &Resolved,
    ) -> Result<super::Pulled, PullError> {
        let (image, who) = (ask.image, ask.who);
        let credentials = creds.credentials.as_ref();
        let fingerprint = creds.fingerprint.as_deref();
        let key: FlightKey = (image.to_string(), fingerprint.map(str::to_owned));
        let entry = {
            let mut inflight = self.inflight.lock().unwrap();
            if let Some(e) = inflight.get(&key) {
                e.claim.join(who.owner);
                e.urgency
                    .fetch_min(who.urgency, std::sync::atomic::Ordering::SeqCst);
                e.clone()
            } else {
                let claim = Arc::new(Claim::new(who.owner));
                let urgency = Arc::new(std::sync::atomic::AtomicU8::new(who.urgency));
                let progress = Arc::new(watch::Sender::new(PullProgress::new(
                    &image.to_string(),
                    image.registry(),
                )));
                let job = PullJob {
                    core: Arc::clone(&self.core),
                    image: image.clone(),
                    credentials: credentials.cloned(),
                    per_registry: self.registry_limit(image.registry()),
                    progress: Arc::clone(&progress),
                    claim: Arc::clone(&claim),
                    urgency: Arc::clone(&urgency),
                };
                let stop = self.background.shutdown_token().clone();
                let task =
                    self.background
                        .spawn(job.run(Arc::clone(&self.inflight), key.clone(), stop));
                let image_name = image.to_string();
                let f: Flight = async move {
                    task.await.unwrap_or_else(|e| {
                        Err(PullError::Runtime {
                            image: image_name,
                            what: "pull",
                            source: RuntimeError {
                                op: "PullImage",
                                kind: crate::runtime::RuntimeErrorKind::Other,
                                message: format!("pull task failed: {e}"),
                            },
                        })
                    })
                }
                .boxed()
                .shared();
                let e = FlightEntry {
                    flight: f,
                    progress,
                    credentialed: credentials.is_some(),
                    uids: Arc::default(),
                    claim,
                    urgency,
                };
                inflight.insert(key, e.clone());
                e
            }
        };
        if let Some(uid) = who.uid {
            entry.uids.lock().unwrap().insert(uid);
        }
        let _joined = Joined::new(&entry.progress);
        let Some(sink) = &who.progress else {
            return entry.flight.await;
        };
        let mut rx = entry.progress.subscribe();
        let _ = sink.send(rx.borrow_and_update().clone());
        let mut flight = entry.flight;
        loop {
            tokio::select! {
                r = &mut flight => {
                    // The end (done or failed) is published before the flight resolves.
                    if rx.has_changed().unwrap_or(false) {
                        let _ = sink.send(rx.borrow_and_update().clone());
                    }
                    return r;
                }
                changed = rx.changed() => {
                    if changed.is_err() {
                        return flight.await;
                    }
                    let _ = sink.send(rx.borrow_and_update().clone());
                }
            }
        }
    }
}
