//! The daemon's background work: every task it spawns is tracked, and one token says when
//! shutdown has begun. At shutdown the daemon stops accepting requests, cancels the token (long
//! waits and streams end, pulls stop), and waits a bounded time for what is still running to
//! finish writing its state, mini-redis style, instead of dropping tasks mid-flight.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Tracked tasks and the shutdown token. Cheap to clone; clones share both.
#[derive(Clone, Default)]
pub struct Background {
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Background {
    /// A fresh set, not shutting down.
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns `fut` as a tracked task: shutdown waits for it (up to its bound).
    pub fn spawn<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(fut)
    }

    /// The token cancelled when shutdown begins; long waits select on it.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Resolves when shutdown begins.
    pub async fn shutting_down(&self) {
        self.shutdown.cancelled().await
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Begins shutdown: cancels the token. Tasks may still be spawned (a cleanup may need one)
    /// until [`Background::wait`].
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits up to `bound` for every tracked task to finish; returns how many were still
    /// running when the bound passed (0: all done).
    pub async fn wait(&self, bound: Duration) -> usize {
        self.tracker.close();
        match tokio::time::timeout(bound, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tracker.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_waits_for_tracked_work_within_its_bound() {
        let bg = Background::new();
        let quick = bg.clone();
        bg.spawn(async move {
            quick.shutting_down().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        bg.spawn(async { tokio::time::sleep(Duration::from_secs(30)).await });
        bg.begin_shutdown();
        assert!(bg.is_shutting_down());
        assert_eq!(
            bg.wait(Duration::from_millis(300)).await,
            1,
            "the stuck one is left"
        );
    }
}
