//! The node's pull slots (`MaxConcurrentPulls`), handed out by urgency: a pull someone waits
//! for now (a job's step, the CRI endpoint, `cimage pull`) before an expected image's, and an
//! expected image's before a pre-warm schedule's; within an urgency, oldest first. A pull's
//! urgency rises while it waits when a more urgent request joins it.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::cache::Origin;

/// How urgent a pull is; lower goes first.
pub(super) type Urgency = Arc<AtomicU8>;

/// The urgency of a request of this origin: 0 for someone waiting now, 1 for an expected
/// image, 2 for pre-warm.
pub(super) fn urgency_of(origin: Origin) -> u8 {
    match origin {
        Origin::Prewarm => 2,
        Origin::Expected => 1,
        Origin::Job | Origin::Pull | Origin::Cri | Origin::Runtime => 0,
    }
}

struct Waiter {
    seq: u64,
    urgency: Urgency,
    wake: oneshot::Sender<()>,
}

struct State {
    free: usize,
    next: u64,
    waiting: Vec<Waiter>,
}

/// The node's slots.
pub(super) struct Slots {
    state: Mutex<State>,
    held: AtomicUsize,
}

/// A waiter's turn: its receiver, and what to do with a slot that arrives after it left.
struct Turn {
    rx: Option<oneshot::Receiver<()>>,
    slots: Arc<Slots>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                self.slots.give_back();
            }
        }
    }
}

/// One slot, given back when dropped.
pub(super) struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.give_back();
    }
}

impl Slots {
    /// `n` slots.
    pub(super) fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                free: n,
                next: 0,
                waiting: Vec::new(),
            }),
            held: AtomicUsize::new(0),
        })
    }

    /// A slot now, if one is free.
    pub(super) fn try_take(self: &Arc<Self>) -> Option<Slot> {
        let mut s = self.state.lock().unwrap();
        (s.free > 0).then(|| {
            s.free -= 1;
            self.held.fetch_add(1, Ordering::SeqCst);
            Slot(Arc::clone(self))
        })
    }

    /// A slot, waiting behind more urgent and older pulls (cancel-safe: a waiter dropped
    /// before its turn leaves the line, and one dropped after it passes the slot on).
    pub(super) async fn take(self: &Arc<Self>, urgency: &Urgency) -> Slot {
        let rx = {
            let mut s = self.state.lock().unwrap();
            if s.free > 0 {
                s.free -= 1;
                self.held.fetch_add(1, Ordering::SeqCst);
                return Slot(Arc::clone(self));
            }
            let (tx, rx) = oneshot::channel();
            let seq = s.next;
            s.next += 1;
            s.waiting.push(Waiter {
                seq,
                urgency: Arc::clone(urgency),
                wake: tx,
            });
            rx
        };
        // The slot is handed over by give_back. Dropped while it waits, the guard gives back
        // a slot handed over too late to be taken.
        let mut turn = Turn {
            rx: Some(rx),
            slots: Arc::clone(self),
        };
        let _ = turn.rx.as_mut().unwrap().await;
        turn.rx = None;
        Slot(Arc::clone(self))
    }

    fn give_back(&self) {
        let mut s = self.state.lock().unwrap();
        loop {
            let next = s
                .waiting
                .iter()
                .enumerate()
                .min_by_key(|(_, w)| (w.urgency.load(Ordering::SeqCst), w.seq))
                .map(|(i, _)| i);
            match next {
                Some(i) => {
                    let w = s.waiting.swap_remove(i);
                    // A waiter that went away passes its turn on.
                    if w.wake.send(()).is_ok() {
                        return;
                    }
                }
                None => {
                    s.free += 1;
                    self.held.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
            }
        }
    }

    /// Slots held now.
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(n: u8) -> Urgency {
        Arc::new(AtomicU8::new(n))
    }

    #[tokio::test]
    async fn the_most_urgent_then_the_oldest_goes_first_and_urgency_can_rise() {
        let slots = Slots::new(1);
        let held = slots.take(&u(0)).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        let lifted = u(2);
        for (name, urgency) in [
            ("prewarm", u(2)),
            ("expected", u(1)),
            ("lifted", Arc::clone(&lifted)),
            ("job", u(0)),
        ] {
            let (slots, order) = (Arc::clone(&slots), Arc::clone(&order));
            waiters.push(tokio::spawn(async move {
                let s = slots.take(&urgency).await;
                order.lock().unwrap().push(name);
                tokio::task::yield_now().await;
                drop(s);
            }));
            tokio::task::yield_now().await;
        }
        // A job joins the third pull while it waits: it goes with the job's urgency.
        lifted.fetch_min(0, Ordering::SeqCst);
        drop(held);
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            ["lifted", "job", "expected", "prewarm"]
        );
        assert_eq!(slots.held(), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_goes_away_passes_its_turn_on() {
        let slots = Slots::new(1);
        let held = slots.take(&u(0)).await;
        let gone = {
            let slots = Arc::clone(&slots);
            tokio::spawn(async move {
                let _ = slots.take(&u(0)).await;
            })
        };
        tokio::task::yield_now().await;
        gone.abort();
        let _ = gone.await;
        let next = {
            let slots = Arc::clone(&slots);
            tokio::spawn(async move { slots.take(&u(1)).await })
        };
        tokio::task::yield_now().await;
        drop(held);
        let s = next.await.unwrap();
        assert_eq!(slots.held(), 1);
        drop(s);
        assert_eq!(slots.held(), 0);
        assert!(slots.try_take().is_some());
    }
}
