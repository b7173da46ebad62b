//! The line behind the pull slots: pulls waiting for a global or per-registry slot, each told
//! its place as the line moves (and the gauge `cimage_pulls_queued` how long it is), and the
//! count of requesters waiting on a pull.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::progress::{Phase, PullProgress};
use crate::metrics::Metrics;

/// The pulls waiting for a slot, oldest first: their places are kept in their progress, and
/// their number in the gauge `cimage_pulls_queued`.
pub(super) struct Queue {
    next: AtomicU64,
    waiting: Mutex<Vec<(u64, Arc<watch::Sender<PullProgress>>)>>,
    metrics: Arc<Metrics>,
}

impl Queue {
    /// An empty queue counted into `metrics`.
    pub(super) fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            next: AtomicU64::new(0),
            waiting: Mutex::default(),
            metrics,
        }
    }

    /// Tells every waiting pull its place, and the gauge how many wait (called with the list
    /// held, on every change: a pull that is cancelled while waiting leaves it too).
    fn renumber(&self, waiting: &[(u64, Arc<watch::Sender<PullProgress>>)]) {
        self.metrics
            .set("cimage_pulls_queued", waiting.len() as f64);
        for (i, (_, tx)) in waiting.iter().enumerate() {
            tx.send_modify(|p| {
                p.phase = Phase::Queued;
                p.queue_position = i as u32 + 1;
            });
        }
    }

    /// Puts a pull at the back; it leaves when the returned guard drops.
    pub(super) fn enter(self: &Arc<Self>, tx: &Arc<watch::Sender<PullProgress>>) -> QueuePlace {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let mut w = self.waiting.lock().unwrap();
        w.push((seq, Arc::clone(tx)));
        self.renumber(&w);
        QueuePlace {
            queue: Arc::clone(self),
            seq,
        }
    }

    /// Pulls waiting now.
    pub(super) fn len(&self) -> usize {
        self.waiting.lock().unwrap().len()
    }
}

/// A pull's place in the [`Queue`].
pub(super) struct QueuePlace {
    queue: Arc<Queue>,
    seq: u64,
}

impl Drop for QueuePlace {
    fn drop(&mut self) {
        let mut w = self.queue.waiting.lock().unwrap();
        if let Some(at) = w.iter().position(|(s, _)| *s == self.seq) {
            let (_, tx) = w.remove(at);
            tx.send_modify(|p| p.queue_position = 0);
        }
        self.queue.renumber(&w);
    }
}

/// Counts a requester on a pull while it waits.
pub(super) struct Joined(Arc<watch::Sender<PullProgress>>);

impl Joined {
    pub(super) fn new(tx: &Arc<watch::Sender<PullProgress>>) -> Self {
        tx.send_modify(|p| p.requesters += 1);
        Self(Arc::clone(tx))
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        self.0
            .send_modify(|p| p.requesters = p.requesters.saturating_sub(1));
    }
}
