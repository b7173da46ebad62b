//! Retrying transient failures with exponential backoff.

use std::future::Future;
use std::time::Duration;

use tracing::warn;

use crate::registry::RegistryError;
use crate::runtime::RuntimeError;
use crate::runtime::OUTAGE_POLL;

/// Longest wait a registry's `Retry-After` may impose on one retry; one asking for more is
/// treated as down for now (the request fails with its words instead of hanging on).
pub(super) const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How long a runtime that does not answer at all (restarting) is waited for, polled every
/// [`OUTAGE_POLL`], before its failures count against the retries.
pub(super) const OUTAGE_PATIENCE: Duration = Duration::from_secs(30);

/// An error that knows whether a retry may help, and when.
pub(super) trait Transient {
    fn is_transient(&self) -> bool;
    /// The other side is not answering at all (a runtime restarting): worth waiting for
    /// without spending retries.
    fn is_outage(&self) -> bool {
        false
    }
    /// How long the other side asked to wait before trying again.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}

impl Transient for RuntimeError {
    fn is_transient(&self) -> bool {
        RuntimeError::is_transient(self)
    }
    fn is_outage(&self) -> bool {
        self.kind == crate::runtime::RuntimeErrorKind::Unavailable
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
/// longer one ends the retries); `on_retry` hears each failure that is retried. A runtime that
/// does not answer at all is first waited for, up to [`OUTAGE_PATIENCE`], without spending
/// retries (a containerd restart takes seconds).
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
    let mut outage: Option<tokio::time::Instant> = None;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e)
                if e.is_outage()
                    && outage.is_none_or(|since| since.elapsed() < OUTAGE_PATIENCE) =>
            {
                if outage.is_none() {
                    on_retry(&e);
                    warn!(error = %e, "{what} failed: the runtime is not answering; waiting for it (up to {}s)", OUTAGE_PATIENCE.as_secs());
                    outage = Some(tokio::time::Instant::now());
                }
                tokio::time::sleep(OUTAGE_POLL).await;
            }
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
    use crate::runtime::RuntimeErrorKind;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn down() -> RuntimeError {
        RuntimeError {
            op: "PullImage",
            kind: RuntimeErrorKind::Unavailable,
            message: "runtime at /run/c.sock is unavailable: No such file or directory".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_runtime_restarting_is_waited_for_without_spending_retries() {
        let calls = AtomicU32::new(0);
        let r: Result<u32, RuntimeError> = retry(
            0,
            Duration::from_millis(500),
            "pull",
            |_| {},
            || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < 5 {
                        Err(down())
                    } else {
                        Ok(n)
                    }
                }
            },
        )
        .await;
        assert_eq!(r.unwrap(), 5);
        // Down for good: waited for up to the patience, then failed (no retries left).
        let t = tokio::time::Instant::now();
        let r: Result<(), RuntimeError> = retry(
            0,
            Duration::from_millis(500),
            "pull",
            |_| {},
            || async { Err(down()) },
        )
        .await;
        assert!(r.is_err());
        assert!(t.elapsed() >= OUTAGE_PATIENCE && t.elapsed() < OUTAGE_PATIENCE + OUTAGE_POLL * 2);
    }

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
