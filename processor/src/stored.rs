//! Readings stored per minute, kept in the rollup table for the dashboard's "readings in the
//! last hour" (`schemas::rollup::STORED`): one row per minute and processor, replaced with
//! the minute's running total every few seconds (one transaction), so it costs a tiny
//! fraction of a request per reading and needs no read or increment.

use infra::storage::{Entity, Table};
use schemas::rollup;
use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use schemas::rollup::{stored_minute, MINUTE_MS};

/// Minutes kept while storage refuses them (older ones would be expired anyway).
const KEPT_MINUTES: usize = (rollup::STORED_KEPT_MS / MINUTE_MS) as usize;

#[derive(Debug)]
pub struct Stored {
    /// This process's name in its rows: its start time and a random number (containers may
    /// all run as pid 1 and start in the same millisecond).
    instance: String,
    /// Per minute start: readings stored, and how many of them its row holds.
    minutes: Mutex<BTreeMap<i64, (u64, u64)>>,
}

impl Stored {
    pub fn new(started_ms: i64) -> Self {
        Self {
            instance: format!("{started_ms:x}-{:08x}", random_u32()),
            minutes: Mutex::default(),
        }
    }

    fn minutes(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, (u64, u64)>> {
        self.minutes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts `n` readings stored at `now_ms`.
    pub fn add(&self, n: u64, now_ms: i64) {
        let mut minutes = self.minutes();
        minutes.entry(stored_minute(now_ms)).or_default().0 += n;
        while minutes.len() > KEPT_MINUTES {
            minutes.pop_first();
        }
    }

    /// The rows of the minutes whose counts changed since they were last written.
    fn changed(&self) -> Vec<(i64, u64, Entity)> {
        self.minutes()
            .iter()
            .filter(|(_, (total, written))| total != written)
            .map(|(minute, (total, _))| {
                let row = rollup::stored_count(*minute, &self.instance, *total);
                (*minute, *total, row)
            })
            .collect()
    }

    /// Writes the changed minutes' rows; a failure leaves them for the next call. Minutes
    /// over and written are forgotten.
    pub async fn flush(&self, table: &Table, now_ms: i64) {
        let changed = self.changed();
        for chunk in changed.chunks(infra::storage::MAX_BATCH_OPERATIONS) {
            let rows: Vec<Entity> = chunk.iter().map(|(_, _, row)| row.clone()).collect();
            match table.upsert_batch(&rows).await {
                Ok(infra::storage::BatchOutcome::Committed) => {
                    let mut minutes = self.minutes();
                    for (minute, total, _) in chunk {
                        if let Some(m) = minutes.get_mut(minute) {
                            m.1 = *total;
                        }
                    }
                }
                Ok(infra::storage::BatchOutcome::Rejected(refusal)) => {
                    tracing::debug!(%refusal, "Stored-reading counts refused; kept for later.");
                }
                Err(error) => {
                    tracing::debug!(%error, "Cannot write stored-reading counts; kept for later.");
                }
            }
        }
        let current = stored_minute(now_ms);
        self.minutes()
            .retain(|minute, (total, written)| *minute >= current - MINUTE_MS || total != written);
    }
}

/// A random number, from the standard library's per-process hash seed.
fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_minute_and_writes_only_what_changed() {
        let stored = Stored::new(1);
        stored.add(3, 60_000);
        stored.add(4, 119_999);
        stored.add(5, 120_000);
        let changed = stored.changed();
        assert_eq!(
            changed.iter().map(|(m, t, _)| (*m, *t)).collect::<Vec<_>>(),
            [(60_000, 7), (120_000, 5)]
        );
        assert_eq!(rollup::stored_readings(&changed[0].2), 7);
        stored.minutes().get_mut(&60_000).unwrap().1 = 7;
        assert_eq!(
            stored.changed().len(),
            1,
            "a written minute is not written again"
        );
    }

    #[test]
    fn keeps_a_bounded_number_of_minutes() {
        let stored = Stored::new(1);
        for k in 0..(KEPT_MINUTES as i64 + 50) {
            stored.add(1, k * MINUTE_MS);
        }
        assert_eq!(stored.minutes().len(), KEPT_MINUTES);
    }
}
