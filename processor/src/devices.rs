//! The device table, as the processor keeps it: register new devices before their messages
//! are deleted, and refresh every device's latest reading at a bounded rate.
//!
//! Registration is on the critical path (it is what lets the archiver find every partition of
//! the telemetry table); the latest-state refresh is not, so it is batched up to 100 devices
//! per transaction and written once per interval, costing a tiny fraction of a request per
//! reading.

use crate::metrics_names as m;
use infra::storage::{BatchOutcome, Entity, Refusal, StorageError, Table, MAX_BATCH_OPERATIONS};
use schemas::{device, Reading};
use std::collections::hash_map;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// How long one refresh of a chunk of device rows may retry.
const FLUSH_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// The newest reading of each device seen in one round, with its ingest time.
pub type Latest = HashMap<String, (Reading, i64)>;

#[derive(Debug)]
pub struct Registry {
    pub table: Table,
    state: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug, Default)]
struct Entry {
    /// Known to have a row in the device table.
    registered: bool,
    /// Time of the newest reading written or pending, so older ones never overwrite it.
    newest_ms: i64,
    /// A newer reading than the row holds, waiting for the next flush.
    /// Boxed: most devices have none, and an entry is then 24 bytes (about 80 per device
    /// with its id and the map's overhead: 80 MB for a million devices).
    pending: Option<Box<(Reading, i64)>>,
}

impl Registry {
    pub fn new(table: Table) -> Self {
        Self {
            table,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // The map stays consistent even if a holder panicked: every update is one insert.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Learns which devices already have rows. Returns how many.
    pub async fn load(&self) -> Result<usize, StorageError> {
        let filter = format!("PartitionKey eq '{}'", device::PARTITION);
        let ids = self.table.row_keys(&filter).await?;
        let mut state = self.state();
        for id in ids {
            state.entry(id).or_default().registered = true;
        }
        Ok(state.len())
    }

    /// Records a round's newest readings: devices with a row get them queued for the next
    /// flush; the rows returned (chunked for transactions) register the devices without one,
    /// and must be written before the round deletes its messages.
    pub fn note(&self, latest: Latest) -> Vec<Vec<Entity>> {
        let mut fresh = Vec::new();
        let mut state = self.state();
        for (id, (reading, ingested_at_ms)) in latest {
            let entry = state.entry(id).or_default();
            let newer = reading.measured_at_ms > entry.newest_ms;
            if !entry.registered {
                // The registration row carries this reading; if its write fails, the next
                // round registers the device again with its own newest reading.
                entry.newest_ms = entry.newest_ms.max(reading.measured_at_ms);
                fresh.push(device::row(&reading, ingested_at_ms, Some(ingested_at_ms)));
            } else if newer {
                entry.newest_ms = reading.measured_at_ms;
                entry.pending = Some(Box::new((reading, ingested_at_ms)));
            }
        }
        chunk(fresh)
    }

    /// Marks the devices of written registration rows as registered.
    pub fn registered<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut state = self.state();
        for id in ids {
            state.entry(id.to_owned()).or_default().registered = true;
        }
    }

    /// Writes every pending latest state. Failed devices stay pending for the next flush.
    pub async fn flush(&self) {
        let pending: Vec<(Reading, i64)> = self
            .state()
            .values_mut()
            .filter_map(|e| e.pending.take().map(|p| *p))
            .collect();
        if pending.is_empty() {
            return;
        }
        let rows: Vec<Entity> = pending
            .iter()
            .map(|(r, ingested)| device::row(r, *ingested, None))
            .collect();
        for (rows, readings) in rows
            .chunks(MAX_BATCH_OPERATIONS)
            .zip(pending.chunks(MAX_BATCH_OPERATIONS))
        {
            let deadline = tokio::time::Instant::now() + FLUSH_TIME;
            let failed = self.merge_each(rows, deadline).await;
            if failed.is_empty() {
                continue;
            }
            let mut state = self.state();
            for (reading, ingested) in readings {
                if !failed.contains_key(&reading.device_id) {
                    continue;
                }
                let entry = state.entry(reading.device_id.clone()).or_default();
                if entry.pending.is_none() {
                    entry.pending = Some(Box::new((reading.clone(), *ingested)));
                }
            }
        }
    }

    /// Merges up to 100 device rows in one transaction; if it is refused for what one of them
    /// carries, each row on its own, so one bad row never holds back the others. Returns the
    /// devices whose rows were not written, each with why.
    pub async fn merge_each(
        &self,
        rows: &[Entity],
        deadline: tokio::time::Instant,
    ) -> HashMap<String, RegisterError> {
        let ids = |rows: &[Entity]| {
            rows.iter()
                .filter_map(device::device_id)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let all_fail = |rows: &[Entity], why: RegisterError| {
            ids(rows).into_iter().map(|id| (id, why.clone())).collect()
        };
        let merged = infra::retry::until_deadline(
            deadline,
            || self.table.merge_batch(rows),
            |_| metrics::counter!(m::STORAGE_ERRORS).increment(1),
        );
        match merged.await {
            Ok(BatchOutcome::Committed) => {
                metrics::counter!(m::DEVICE_ROWS).increment(rows.len() as u64);
                return HashMap::new();
            }
            Ok(BatchOutcome::Rejected(Refusal::Content(_))) if rows.len() > 1 => {}
            Err(error) if error.is_content_error() && rows.len() > 1 => {
                tracing::warn!(%error, "Device rows refused for their content; writing them one by one.");
            }
            Ok(BatchOutcome::Rejected(refusal)) => {
                tracing::warn!(%refusal, devices = rows.len(), "Device rows refused.");
                return all_fail(rows, RegisterError::Refused(refusal));
            }
            Err(error) => {
                tracing::warn!(%error, devices = rows.len(), "Cannot write device rows.");
                return all_fail(rows, RegisterError::Storage(error));
            }
        }
        let mut failed = HashMap::new();
        for row in rows {
            failed.extend(Box::pin(self.merge_each(std::slice::from_ref(row), deadline)).await);
        }
        failed
    }
}

/// Why a device row was not written.
#[derive(Debug, Clone)]
pub enum RegisterError {
    Storage(StorageError),
    Refused(Refusal),
}

fn chunk(rows: Vec<Entity>) -> Vec<Vec<Entity>> {
    let mut out = Vec::new();
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        out.push(rows.by_ref().take(MAX_BATCH_OPERATIONS).collect());
    }
    out
}

/// The newest of `readings` for each device (the first of equals), cloned once per device:
/// a gateway's array holds a hundred readings of one device, each newer than the last.
pub fn newest<'a>(readings: impl IntoIterator<Item = (&'a Reading, i64)>) -> Latest {
    let mut picked: HashMap<&'a str, (&'a Reading, i64)> = HashMap::new();
    for (reading, ingested_at_ms) in readings {
        match picked.entry(&reading.device_id) {
            hash_map::Entry::Occupied(mut slot) => {
                if reading.measured_at_ms > slot.get().0.measured_at_ms {
                    slot.insert((reading, ingested_at_ms));
                }
            }
            hash_map::Entry::Vacant(slot) => {
                slot.insert((reading, ingested_at_ms));
            }
        }
    }
    picked
        .into_iter()
        .map(|(id, (reading, at))| (id.to_owned(), (reading.clone(), at)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use infra::storage::Account;
    use std::time::Duration;

    fn reading(device: &str, ms: i64) -> Reading {
        Reading {
            device_id: device.into(),
            measured_at_ms: ms,
            seq: None,
            temperature: Some(1.0),
            humidity: None,
            pressure: None,
            extras: Vec::new(),
        }
    }

    fn registry() -> Registry {
        let account = Account::from_connection_string(
            infra::storage::DEVELOPMENT_STORAGE,
            Duration::from_secs(1),
        )
        .unwrap();
        Registry::new(account.table("devices"))
    }

    #[test]
    fn new_devices_are_registered_and_known_ones_queued_newest_first() {
        let offered = [
            (reading("a", 2_000), 10),
            (reading("a", 1_000), 11),
            (reading("b", 5_000), 12),
            (reading("b", 5_000), 13),
        ];
        let latest = newest(offered.iter().map(|(r, at)| (r, *at)));
        assert_eq!(latest["a"], (reading("a", 2_000), 10));
        assert_eq!(latest["b"].1, 12, "the first of equals");

        let r = registry();
        let fresh = r.note(latest.clone());
        assert_eq!(fresh.iter().map(Vec::len).sum::<usize>(), 2);
        assert!(fresh[0].iter().all(|e| e.contains_key(device::FIRST_SEEN)));
        r.registered(fresh.concat().iter().filter_map(device::device_id));

        // Known now: nothing to register; only readings newer than the row are queued.
        let offered = [(reading("a", 1_500), 20), (reading("b", 6_000), 21)];
        let next = newest(offered.iter().map(|(r, at)| (r, *at)));
        assert!(r.note(next).is_empty());
        let state = r.state();
        assert!(
            state["a"].pending.is_none(),
            "older than the registered row"
        );
        assert_eq!(state["b"].pending.as_ref().unwrap().0.measured_at_ms, 6_000);
    }

    #[test]
    fn registrations_are_chunked_for_transactions() {
        let latest: Latest = (0..250)
            .map(|i| {
                let id = format!("d{i}");
                (id.clone(), (reading(&id, 1), 1))
            })
            .collect();
        let sizes: Vec<usize> = registry().note(latest).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![100, 100, 50]);
    }
}
