//! Retrying transient failures with exponential backoff.

use std::future::Future;
use std::time::Duration;

use tracing::warn;

use crate::registry::RegistryError;
use crate::runtime::RuntimeError;

/// Longest wait a registry's `Retry-After` may impose on one retry; one asking for more is
/// treated as down for now (the request fails with its words instead of hanging on).
pub(super) const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// An error that knows whether a retry may help, and when.
pub(super) trait Transient {
    fn is_transient(&self) -> bool;
    /// How long the other side asked to wait before trying again.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}

impl Transient for RuntimeError {
    fn is_transient(&self) -> bool {
        RuntimeError::is_transient(self)
    }
}

impl Transient for RegistryError {
    fn is_transient(&self) -> bool {
        RegistryError::is_transient(self)
    }
    fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

/// Runs `op`, retrying transient failures up to `retries` times with exponential backoff, or
/// after the wait the failure asked for when that is longer (up to [`MAX_RETRY_AFTER`]; a
/// longer one ends the retries); `on_retry` hears each failure that is retried.
pub(super) async fn retry<T, E, F, Fut>(
    retries: u32,
    backoff: Duration,
    what: &str,
    mut on_retry: impl FnMut(&E),
    mut op: F,
) -> Result<T, E>
where
    E: Transient + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && attempt < retries => {
                if e.retry_after().is_some_and(|w| w > MAX_RETRY_AFTER) {
                    return Err(e);
                }
                on_retry(&e);
                let mut delay = backoff * 2u32.pow(attempt);
                attempt += 1;
                match e.retry_after() {
                    Some(wait) if wait > delay => {
                        delay = wait;
                        warn!(attempt, retries, delay_ms = delay.as_millis() as u64, error = %e, "{what} failed, retrying when the Retry-After asks");
                    }
                    _ => {
                        warn!(attempt, retries, delay_ms = delay.as_millis() as u64, error = %e, "{what} failed, retrying")
                    }
                }
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug)]
    struct Busy(Option<Duration>);

    impl std::fmt::Display for Busy {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "busy")
        }
    }

    impl Transient for Busy {
        fn is_transient(&self) -> bool {
            true
        }
        fn retry_after(&self) -> Option<Duration> {
            self.0
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_longer_than_the_backoff_is_waited_and_a_huge_one_ends_it() {
        let calls = AtomicU32::new(0);
        let t = tokio::time::Instant::now();
        let r: Result<(), Busy> = retry(
            3,
            Duration::from_millis(100),
            "resolve",
            |_| {},
            || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    match n {
                        0 => Err(Busy(Some(Duration::from_secs(5)))),
                        1 => Err(Busy(None)),
                        _ => Ok(()),
                    }
                }
            },
        )
        .await;
        assert!(r.is_ok());
        // 5 s asked for, then the backoff's 200 ms.
        assert_eq!(t.elapsed(), Duration::from_millis(5_200));
        let calls = AtomicU32::new(0);
        let r: Result<(), Busy> = retry(
            3,
            Duration::from_millis(100),
            "resolve",
            |_| {},
            || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(Busy(Some(Duration::from_secs(3600)))) }
            },
        )
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
