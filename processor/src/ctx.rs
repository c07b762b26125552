//! What every round shares: the storage handles, the rules, and the processor-wide state that
//! rounds report into (storage refusing the processor, envelopes of another version).

use crate::classify::Rules;
use crate::devices::Registry;
use crate::metrics_names as m;
use infra::retry::Backoff;
use infra::serve::Health;
use infra::storage::{Queue, StorageError, Table};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::SemaphorePermit;
use tokio::time::Instant;

/// The readiness key of storage trouble met by rounds.
const STORAGE_TROUBLE: &str = "storage";
/// The readiness key of envelopes this build cannot read.
const NEWER_ENVELOPES: &str = "envelope";
/// The readiness key of device rows the device table refuses.
const REFUSED_DEVICES: &str = "device";
/// How long readiness keeps naming a held-back message's cause after it was last seen.
const SHOWN_FOR: Duration = Duration::from_secs(300);

#[derive(Debug)]
pub struct Ctx {
    pub queue: Queue,
    pub dead_letters: Queue,
    /// Where unreadable queue messages are kept whole before they leave the ingest queue.
    pub quarantine: Queue,
    pub table: Table,
    /// Where late device-hours are marked for the rollup keeper.
    pub rollups: Table,
    pub devices: Registry,
    pub rules: Rules,
    pub visibility: Duration,
    pub max_deliveries: u64,
    pub write_concurrency: usize,
    /// Table writes in flight across all rounds (`write_concurrency` permits): a backlog
    /// fills every worker, and more concurrent requests than storage serves only queue there
    /// until they time out and are redone.
    pub writes: tokio::sync::Semaphore,
    /// The KiB of request bodies those writes may hold (`write_bytes` permits): with the
    /// rounds, what bounds memory.
    pub write_kib: u32,
    pub write_bytes: tokio::sync::Semaphore,
    pub health: Health,
    /// Set while storage refuses this processor for a reason only the operator can fix (a
    /// credential without a right, a missing table): the fetcher then spaces its gets by this
    /// growing pause instead of cycling the queue through rounds that cannot succeed.
    pub stalled: Mutex<Option<Backoff>>,
    /// No message is given up as `poison` before this: a while after start and after every
    /// stall, deliveries counted while storage refused the processor (or before a restart
    /// with a fixed credential) must not make a first transient error fatal.
    pub poison_from: Mutex<Instant>,
    /// Readiness reasons for messages held back while everything else flows (newer
    /// envelopes, a refused device row), by key, with when each was last seen: they stay in
    /// `/readyz` a while after, rather than flapping with every round that does not meet them.
    pub held_back: Mutex<std::collections::HashMap<&'static str, Instant>>,
    /// The dead letters this process has written lately or is writing, so that a message
    /// redone meanwhile (its delete failed, its round ran out of time) does not write them
    /// again (`claims::Claim`).
    pub dead_lettered: std::sync::Arc<Mutex<crate::claims::DeadLettered>>,
    /// Readings stored per minute, for the dashboard.
    pub stored: crate::stored::Stored,
    /// The alarm rules, and where states and events go.
    pub alarms: crate::alarms::Alarms,
    /// The age of the ingest queue's oldest waiting message, in ms, as last seen: readings
    /// that old may not be stored yet, so no silence is judged within it.
    pub backlog_ms: std::sync::atomic::AtomicI64,
}

/// How long poisoning waits after start and after a stall: as long as it takes a message to
/// use up its deliveries.
pub fn poison_grace(visibility: Duration, max_deliveries: u64) -> Duration {
    visibility.saturating_mul(u32::try_from(max_deliveries).unwrap_or(u32::MAX))
}

impl Ctx {
    /// A round met an error only the operator can fix: readiness says which, and the fetcher
    /// slows down. Nothing is dead-lettered or deleted for it.
    pub fn needs_operator(&self, error: &str) {
        let grace = poison_grace(self.visibility, self.max_deliveries);
        *self
            .poison_from
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now() + grace;
        self.health.fail(
            STORAGE_TROUBLE,
            format!(
                "storage refuses the processor: {error}; messages stay queued until it is fixed"
            ),
        );
        let mut stalled = self.stalled.lock().unwrap_or_else(PoisonError::into_inner);
        if stalled.is_none() {
            tracing::error!(%error, "Storage refuses the processor; holding every message until the credential or resource is fixed.");
            *stalled = Some(Backoff::new(
                Duration::from_secs(2),
                Duration::from_secs(30),
            ));
        }
    }

    /// A round finished every message: storage serves this processor again.
    pub fn storage_works(&self) {
        let mut stalled = self.stalled.lock().unwrap_or_else(PoisonError::into_inner);
        if stalled.take().is_some() {
            tracing::info!("Storage serves the processor again.");
        }
        self.health.recover(STORAGE_TROUBLE);
    }

    /// The pause before the next get while stalled.
    pub fn stall_delay(&self) -> Option<Duration> {
        let mut stalled = self.stalled.lock().unwrap_or_else(PoisonError::into_inner);
        stalled.as_mut().map(Backoff::next_delay)
    }

    /// Whether a message may be given up as poison now.
    pub fn may_poison(&self) -> bool {
        Instant::now()
            >= *self
                .poison_from
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
    }

    /// A round left `count` messages of envelope `version` queued for a processor that reads
    /// it (a rolling upgrade in progress, or this one is out of date).
    pub fn newer_envelopes(&self, version: u64, count: usize) {
        metrics::counter!(m::NEWER_ENVELOPES).increment(count as u64);
        tracing::warn!(version, messages = count, "Envelopes of a version this build cannot read; leaving them queued for a processor that can.");
        self.held_back(
            NEWER_ENVELOPES,
            format!(
                "queue messages of envelope version {version}, which this build cannot read, \
                 stay queued for a processor that can: upgrade this one"
            ),
        );
    }

    /// The device table refuses a device's row for what it holds: the messages carrying the
    /// device stay queued (their readings are stored; the archiver would not find them).
    pub fn refused_device(&self, device: &str, error: &str) {
        self.held_back(
            REFUSED_DEVICES,
            format!(
                "device table {} refuses the row of device {device} ({error}); the messages \
                 carrying it stay queued",
                self.devices.table.name()
            ),
        );
    }

    fn held_back(&self, key: &'static str, reason: String) {
        self.held_back
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, Instant::now());
        self.health.fail(key, reason);
    }

    /// Readiness stops naming a held-back cause a while after it was last seen.
    pub fn forget_held_back(&self) {
        let mut held = self
            .held_back
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        held.retain(|key, at| {
            let keep = at.elapsed() < SHOWN_FOR;
            if !keep {
                self.health.recover(key);
            }
            keep
        });
    }
}

/// A table write's turn: one of the requests in flight, and its body's KiB.
pub type WritePermit<'a> = (SemaphorePermit<'a>, SemaphorePermit<'a>);

impl Ctx {
    /// Waits for a write's turn with a body of about `bytes` (one larger than all the KiB
    /// allowed waits for all of them, and goes alone). Both semaphores are fair, so a turn
    /// comes after every write that asked before it.
    pub async fn write_permit(&self, bytes: usize) -> WritePermit<'_> {
        let body = self
            .write_bytes
            .acquire_many(body_kib(bytes, self.write_kib))
            .await;
        let request = self.writes.acquire().await;
        (
            request.expect("the write semaphores are never closed"),
            body.expect("the write semaphores are never closed"),
        )
    }
}

/// The KiB permits a body of `bytes` takes of `most`: at least one, and never more than all
/// (more would wait forever).
fn body_kib(bytes: usize, most: u32) -> u32 {
    u32::try_from(bytes.div_ceil(1024))
        .unwrap_or(u32::MAX)
        .clamp(1, most.max(1))
}

/// Runs `op` until it succeeds, fails for good, or `deadline` passes (no attempt outlives it).
pub async fn retry<T, F, Fut>(deadline: Instant, op: F) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StorageError>>,
{
    infra::retry::until_deadline(deadline, op, |_| {
        metrics::counter!(m::STORAGE_ERRORS).increment(1);
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::body_kib;

    #[test]
    fn a_body_takes_its_kib_between_one_and_all() {
        assert_eq!(body_kib(0, 4096), 1, "the fetcher's gate takes one");
        assert_eq!(body_kib(70 * 1024 + 1, 4096), 71);
        assert_eq!(
            body_kib(4 << 20, 1024),
            1024,
            "larger than all: waits for all, goes alone"
        );
        assert_eq!(body_kib(usize::MAX, 0), 1);
    }
}
