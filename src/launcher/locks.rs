//! One lock per job, held while a job's record and pod change (a launch joining it, its
//! sandbox being made, a step's cleanup, its end). The map holds a job only while someone holds
//! or awaits its lock: every one-off `cimage run` makes a job id of its own, so entries kept for
//! ended jobs would pile up for as long as the daemon runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::OwnedMutexGuard;

/// The job locks: by job id, the lock of each job being worked on (held weakly, so that the
/// lock goes with its last holder and a later one starts afresh).
#[derive(Debug, Default)]
pub(super) struct JobLocks(Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>);

/// A job's lock, held until dropped; the job's entry goes with the last holder.
pub(super) struct JobGuard<'a> {
    held: Option<OwnedMutexGuard<()>>,
    locks: &'a JobLocks,
    job: String,
}

impl JobLocks {
    /// Waits for `job`'s lock.
    pub(super) async fn lock(&self, job: &str) -> JobGuard<'_> {
        let lock = {
            let mut map = self.0.lock().unwrap();
            match map.get(job).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    // Also the entries of callers that stopped waiting (their futures dropped
                    // before they got the lock, so no guard removed them).
                    map.retain(|_, w| w.strong_count() > 0);
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(job.to_owned(), Arc::downgrade(&lock));
                    lock
                }
            }
        };
        JobGuard {
            held: Some(lock.lock_owned().await),
            locks: self,
            job: job.to_owned(),
        }
    }

    /// Jobs in the map (for tests: only jobs being worked on).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        drop(self.held.take());
        let mut map = self.locks.0.lock().unwrap();
        // Another caller may hold or await it by now; then it stays for them.
        if map.get(&self.job).is_some_and(|w| w.strong_count() == 0) {
            map.remove(&self.job);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_job_has_one_lock_while_it_is_held_or_awaited_and_none_after() {
        let locks = JobLocks::default();
        let first = locks.lock("j").await;
        let mut second = Box::pin(locks.lock("j"));
        // The second caller waits for the same lock.
        assert!(futures::poll!(second.as_mut()).is_pending());
        assert_eq!(locks.len(), 1);
        drop(first);
        let second = second.await;
        assert_eq!(locks.len(), 1, "still held");
        drop(second);
        assert_eq!(locks.len(), 0);
        // A caller that stops waiting leaves no entry behind for long: the next job's lock
        // clears it.
        let held = locks.lock("k").await;
        let gave_up = Box::pin(locks.lock("k"));
        drop(held);
        drop(gave_up);
        let other = locks.lock("l").await;
        assert_eq!(locks.len(), 1);
        drop(other);
        assert_eq!(locks.len(), 0);
    }
}
