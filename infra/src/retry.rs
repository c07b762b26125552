//! The one backoff policy: exponential growth, capped, with jitter so that many workers
//! recovering from the same outage do not retry in lockstep.

use crate::storage::StorageError;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next attempt: uniformly random in [cap/2, cap], where cap doubles
    /// with every call up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = cap / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

/// Runs `op` until it succeeds, backing off between failures (each logged as a warning naming
/// `what`). Returns `None` if `shutdown` comes first: for start-up steps such as creating
/// queues, where the only sensible reaction to an unreachable store is to keep trying.
pub async fn until_ok<T, E, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut op: F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::default();
    loop {
        match op().await {
            Ok(v) => return Some(v),
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in = ?delay, "Cannot {what}; retrying.");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Runs a storage call until it succeeds, fails for good (a non-retriable error), or the next
/// backoff would pass `deadline`; `on_retry` sees each retried error. No attempt outlives
/// `deadline`: one still waiting then fails with [`ErrorKind::OutOfTime`](crate::storage::ErrorKind)
/// (the request may still take effect, which idempotent callers allow for).
pub async fn until_deadline<T, F, Fut>(
    deadline: tokio::time::Instant,
    mut op: F,
    mut on_retry: impl FnMut(&StorageError),
) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StorageError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        let attempt = match tokio::time::timeout_at(deadline, op()).await {
            Ok(result) => result,
            Err(_) => {
                return Err(StorageError {
                    op: "deadline",
                    kind: crate::storage::ErrorKind::OutOfTime,
                })
            }
        };
        match attempt {
            Err(e) if e.is_retriable() => {
                let delay = backoff.next_delay();
                if tokio::time::Instant::now() + delay >= deadline {
                    return Err(e);
                }
                on_retry(&e);
                tracing::debug!(error = %e, retry_in = ?delay, "Retrying a storage call.");
                tokio::time::sleep(delay).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        for d in &delays[5..] {
            assert!(
                *d >= Duration::from_secs(1) && *d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
