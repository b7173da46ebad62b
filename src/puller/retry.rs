//! Retrying transient failures with exponential backoff.

use std::future::Future;
use std::time::Duration;

use tracing::warn;

use crate::registry::RegistryError;
use crate::runtime::RuntimeError;

/// An error that knows whether a retry may help.
pub(super) trait Transient {
    fn is_transient(&self) -> bool;
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
}

/// Runs `op`, retrying transient failures up to `retries` times with exponential backoff;
/// `on_retry` hears each failure that is retried.
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
                on_retry(&e);
                let delay = backoff * 2u32.pow(attempt);
                attempt += 1;
                warn!(attempt, retries, delay_ms = delay.as_millis() as u64, error = %e, "{what} failed, retrying");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}
