//! The device table, as the processor keeps it: register new devices before their messages
//! are deleted, and refresh every device's latest reading at a bounded rate.
//!
//! Registration is on the critical path (it is what lets the archiver find every partition of
//! the telemetry table); the latest-state refresh is not, so it is batched up to 100 devices
//! per transaction and written once per interval, costing a tiny fraction of a request per
//! reading.
//!
//! Memory is bounded at any device count. The devices known to have a row are a cache of at
//! most `capacity` ([`Known`]: the least recently seen are forgotten first), and the latest
//! states waiting for the refresh are at most [`MAX_PENDING`]. So is the rate: each row is
//! refreshed by this processor about once per interval of its readings' measured time, as
//! long as the cache holds the devices it sees (a backlog drained faster than real time
//! refreshes them as often faster). When the set is full, a device whose row is an interval
//! old or more takes the place of one queued while its row was newer, and only a set full of
//! such stale devices wakes the refresh early; a newer one waits for a later reading
//! (otherwise, past [`MAX_PENDING`] devices, every reading would be a device-row write, all
//! into the device table's one partition).
//! A forgotten device registered again with an older reading than its row holds (a replay, a
//! backfill) sets its latest state back until its next reading: the table service has no
//! write conditional on a property's value.
//! A device the cache does not hold is registered again, with insert semantics: a device that
//! has a row is merged into, so its `FirstSeen` is never overwritten. Which devices have rows
//! is learnt from the transaction itself: it is sent presuming each device new or existing,
//! and each wrong presumption the service names costs one more try ([`Registry::register`]).

use crate::metrics_names as m;
use futures::stream::{FuturesUnordered, StreamExt};
use infra::storage::{
    BatchOutcome, Entity, Placed, Presence, Refusal, StorageError, Table, MAX_BATCH_OPERATIONS,
};
use schemas::{device, Reading};
use std::collections::hash_map;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// How long one refresh of a chunk of device rows may retry.
const FLUSH_TIME: std::time::Duration = std::time::Duration::from_secs(10);
/// Most latest states waiting for the refresh (a few hundred bytes each): a full set of stale
/// devices is written at once, 100 transactions.
pub const MAX_PENDING: usize = 10_000;
/// Wrong presumptions one registration transaction may take before its devices are
/// registered one by one, concurrently: a chunk of new and known devices mixed half and half
/// would otherwise take 50 transactions in a row.
const MAX_MISTAKES: usize = 4;
/// Single-device registrations in flight once a chunk goes one by one.
const ONE_BY_ONE: usize = 16;

/// The newest reading of each device seen in one round, with its ingest time.
pub type Latest = HashMap<String, (Reading, i64)>;

#[derive(Debug)]
pub struct Registry {
    pub table: Table,
    state: Mutex<State>,
    /// Woken when the pending latest states are a full set of stale devices: flush them now.
    pub full: tokio::sync::Notify,
    /// The refresh interval, in milliseconds of measured time: a row this old or older is
    /// stale.
    interval_ms: i64,
}

#[derive(Debug)]
struct State {
    known: Known,
    /// Latest states newer than the rows hold, waiting for the next flush: at most
    /// [`MAX_PENDING`] of them.
    pending: HashMap<String, Pending>,
    /// Devices queued since the last flush while their rows were under an interval old: the
    /// ones a stale device may take the place of, the last queued first.
    fresh: Vec<String>,
    /// What most devices of the last registration turned out to be: the first presumption
    /// for the next (a restart finds devices with rows; a new fleet finds none).
    presume: Presence,
}

/// Device ids known to have a row, each with the time of its newest reading written or
/// pending, at most `capacity` of them: two generations, the young one taking every id
/// seen; when it is half the capacity, the old one is forgotten and the young one becomes
/// old. An id found in the old one moves to the young one. About 60 bytes per id.
#[derive(Debug)]
struct Known {
    capacity: usize,
    young: HashMap<Box<str>, i64>,
    old: HashMap<Box<str>, i64>,
}

impl Known {
    fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(2),
            young: HashMap::new(),
            old: HashMap::new(),
        }
    }

    fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    /// The newest reading time of `id`, if it is known; it becomes the most recently seen.
    fn newest(&mut self, id: &str) -> Option<&mut i64> {
        if !self.young.contains_key(id) {
            let (id, newest) = self.old.remove_entry(id)?;
            self.insert(id, newest);
        }
        self.young.get_mut(id)
    }

    /// The newest reading time of `id`, if it is known, without making it the most recently
    /// seen.
    fn peek(&self, id: &str) -> Option<i64> {
        self.young.get(id).or_else(|| self.old.get(id)).copied()
    }

    /// Sets the newest reading time of `id`, if it is known, without making it the most
    /// recently seen.
    fn set(&mut self, id: &str, newest: i64) {
        if let Some(slot) = self.young.get_mut(id).or_else(|| self.old.get_mut(id)) {
            *slot = newest;
        }
    }

    fn insert(&mut self, id: Box<str>, newest: i64) {
        self.old.remove(&id);
        if self.young.len() >= self.capacity / 2 && !self.young.contains_key(&id) {
            self.old = std::mem::take(&mut self.young);
        }
        let slot = self.young.entry(id).or_insert(newest);
        *slot = (*slot).max(newest);
    }
}

/// A latest state waiting for the refresh.
#[derive(Debug)]
struct Pending {
    reading: Reading,
    ingested_at_ms: i64,
    /// The measured time of the newest reading the row holds, as far as this processor knows:
    /// what the cache takes back if this state is put aside.
    written: i64,
    /// Queued while the row was under an interval old: a stale device may take its place.
    fresh: bool,
}

impl State {
    /// Puts aside the last state queued while its row was fresh, if any is left, to make room:
    /// the cache takes back the time its row holds, so a later reading queues it again.
    fn put_aside_fresh(&mut self) -> bool {
        while let Some(id) = self.fresh.pop() {
            if !self.pending.get(&id).is_some_and(|p| p.fresh) {
                continue; // written or put aside since, or queued again as stale
            }
            if let Some(put_aside) = self.pending.remove(&id) {
                self.known.set(&id, put_aside.written);
                return true;
            }
        }
        false
    }
}

impl Registry {
    /// A registry that knows at most `capacity` devices at a time and refreshes their rows
    /// every `interval`.
    pub fn new(table: Table, capacity: usize, interval: std::time::Duration) -> Self {
        Self {
            table,
            state: Mutex::new(State {
                known: Known::new(capacity),
                pending: HashMap::new(),
                fresh: Vec::new(),
                presume: Presence::Existing,
            }),
            full: tokio::sync::Notify::new(),
            interval_ms: i64::try_from(interval.as_millis()).unwrap_or(i64::MAX),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is one insert.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a round's newest readings: devices known to have a row get them queued for
    /// the next flush; the others are returned (chunked for transactions), to be registered
    /// with [`Registry::register`] before the round deletes its messages.
    pub fn note(&self, latest: Latest) -> Vec<Vec<(Reading, i64)>> {
        let mut unknown = Vec::new();
        let mut deferred = 0u64;
        let mut flush_due = false;
        let mut state = self.state();
        let state = &mut *state;
        for (id, (reading, ingested_at_ms)) in latest {
            let Some(newest) = state.known.newest(&id) else {
                unknown.push((reading, ingested_at_ms));
                continue;
            };
            if reading.measured_at_ms <= *newest {
                continue;
            }
            let measured_at_ms = reading.measured_at_ms;
            if let Some(queued) = state.pending.get_mut(&id) {
                *newest = measured_at_ms;
                queued.reading = reading;
                queued.ingested_at_ms = ingested_at_ms;
                continue;
            }
            let written = *newest;
            let fresh = measured_at_ms.saturating_sub(written) < self.interval_ms;
            if state.pending.len() < MAX_PENDING {
                *newest = measured_at_ms;
            } else if !fresh && state.put_aside_fresh() {
                state.known.set(&id, measured_at_ms);
            } else {
                // The device's next reading brings its state (not marked as written, so it
                // is not taken for older). A stale one finds the set full of stale ones: the
                // flush is due now.
                deferred += 1;
                flush_due |= !fresh;
                continue;
            }
            if fresh {
                state.fresh.push(id.clone());
            }
            state.pending.insert(
                id,
                Pending {
                    reading,
                    ingested_at_ms,
                    written,
                    fresh,
                },
            );
        }
        if deferred > 0 {
            metrics::counter!(m::DEVICE_UPDATES_DEFERRED).increment(deferred);
        }
        if flush_due {
            self.full.notify_one();
        }
        metrics::gauge!(m::DEVICES_KNOWN).set(state.known.len() as f64);
        chunk(unknown)
    }

    /// Writes the device rows of up to 100 devices (each with its newest reading) and
    /// remembers them: a new device's row is inserted, with `FirstSeen`; an existing one's
    /// merged into, its `FirstSeen` kept. Each device is presumed as the last registration
    /// found most; each wrong presumption, which the service names and refuses the whole
    /// transaction for, is put right and the transaction sent again. If it is refused for
    /// what one row carries, or presumed wrongly too often, each device on its own,
    /// concurrently, so one bad row never holds back the others. Returns the devices whose
    /// rows were not written, each with why.
    pub async fn register(
        &self,
        devices: &[(Reading, i64)],
        deadline: tokio::time::Instant,
    ) -> HashMap<String, RegisterError> {
        if let Some(failed) = self.transact(devices, deadline).await {
            return failed;
        }
        let mut failed = HashMap::new();
        let mut rest = devices.iter();
        let mut running = FuturesUnordered::new();
        loop {
            while running.len() < ONE_BY_ONE {
                let Some(one) = rest.next() else { break };
                running.push(self.transact(std::slice::from_ref(one), deadline));
            }
            match running.next().await {
                // A single device always comes back settled.
                Some(more) => failed.extend(more.unwrap_or_default()),
                None => return failed,
            }
        }
    }

    /// One registration transaction of `devices`, sent again after each wrong presumption;
    /// `None` when they are to go one by one instead (never for one device).
    async fn transact(
        &self,
        devices: &[(Reading, i64)],
        deadline: tokio::time::Instant,
    ) -> Option<HashMap<String, RegisterError>> {
        let all_fail = |why: RegisterError| {
            devices
                .iter()
                .map(|(r, _)| (r.device_id.clone(), why.clone()))
                .collect()
        };
        let mut presumed: Vec<Option<Presence>> = vec![None; devices.len()];
        let mut presume = self.state().presume;
        let mut mistakes = 0;
        // Each wrong presumption settles a device; past a few, the devices go one by one.
        while mistakes <= MAX_MISTAKES {
            let rows: Vec<(Presence, Entity)> = devices
                .iter()
                .zip(&presumed)
                .map(|((reading, at), p)| {
                    let p = p.unwrap_or(presume);
                    let first_seen = (p == Presence::New).then_some(*at);
                    (p, device::row(reading, *at, first_seen))
                })
                .collect();
            let placed = infra::retry::until_deadline(
                deadline,
                || self.table.insert_or_update(&rows),
                |_| metrics::counter!(m::STORAGE_ERRORS).increment(1),
            );
            match placed.await {
                Ok(Placed::Committed) => {
                    self.registered(devices, &rows);
                    return Some(HashMap::new());
                }
                Ok(Placed::Mistaken(i)) => {
                    metrics::counter!(m::DEVICES_PRESUMED_WRONGLY).increment(1);
                    mistakes += 1;
                    // The rows before it were presumed rightly; it, wrongly. The rows not
                    // settled yet are presumed as most of the settled ones turned out: a
                    // lone exception costs one retry, a chunk of the other kind two.
                    for (slot, (p, _)) in presumed.iter_mut().zip(&rows).take(i) {
                        slot.get_or_insert(*p);
                    }
                    presumed[i] = Some(rows[i].0.flipped());
                    let new = presumed
                        .iter()
                        .filter(|p| **p == Some(Presence::New))
                        .count();
                    let settled = presumed.iter().filter(|p| p.is_some()).count();
                    presume = if 2 * new > settled {
                        Presence::New
                    } else {
                        Presence::Existing
                    };
                }
                Ok(Placed::Rejected(Refusal::Content(_))) if devices.len() > 1 => break,
                Err(error) if error.is_content_error() && devices.len() > 1 => {
                    tracing::warn!(%error, "Device rows refused for their content; writing them one by one.");
                    break;
                }
                Ok(Placed::Rejected(refusal)) => {
                    tracing::warn!(%refusal, devices = devices.len(), "Device rows refused.");
                    return Some(all_fail(RegisterError::Refused(refusal)));
                }
                Err(error) => {
                    tracing::warn!(%error, devices = devices.len(), "Cannot write device rows.");
                    return Some(all_fail(RegisterError::Storage(error)));
                }
            }
        }
        // One device presumed wrongly again and again: its row kept appearing and
        // disappearing (another writer); the next round tries again.
        if devices.len() == 1 {
            Some(all_fail(RegisterError::Refused(Refusal::Transient(409))))
        } else {
            None
        }
    }

    /// Remembers the devices of committed registration `rows`, and what most of them were.
    fn registered(&self, devices: &[(Reading, i64)], rows: &[(Presence, Entity)]) {
        metrics::counter!(m::DEVICE_ROWS).increment(rows.len() as u64);
        let new = rows.iter().filter(|(p, _)| *p == Presence::New).count();
        let mut state = self.state();
        state.presume = if 2 * new > rows.len() {
            Presence::New
        } else {
            Presence::Existing
        };
        for (reading, _) in devices {
            let id = reading.device_id.as_str();
            // A waiting state older than the row now written would only take it back; a newer
            // one keeps this row's time, to give back if it is put aside.
            if let hash_map::Entry::Occupied(mut slot) = state.pending.entry(id.to_owned()) {
                if slot.get().reading.measured_at_ms <= reading.measured_at_ms {
                    slot.remove();
                } else {
                    let queued = slot.get_mut();
                    queued.written = queued.written.max(reading.measured_at_ms);
                }
            }
            state.known.insert(id.into(), reading.measured_at_ms);
        }
    }

    /// Writes every pending latest state, by `until`. Failed devices, and those not reached
    /// by then, stay pending for the next flush.
    pub async fn flush(&self, until: tokio::time::Instant) {
        let pending: Vec<Pending> = {
            let mut state = self.state();
            state.fresh.clear();
            std::mem::take(&mut state.pending).into_values().collect()
        };
        if pending.is_empty() {
            return;
        }
        // Each transaction's rows are built as it goes: 10,000 pending states would be about
        // 30 MB of entities at once.
        for readings in pending.chunks(MAX_BATCH_OPERATIONS) {
            let rows: Vec<Entity> = readings
                .iter()
                .map(|p| device::row(&p.reading, p.ingested_at_ms, None))
                .collect();
            let rows = rows.as_slice();
            let deadline = until.min(tokio::time::Instant::now() + FLUSH_TIME);
            let failed = if tokio::time::Instant::now() < deadline {
                self.merge_each(rows, deadline).await
            } else {
                let late = RegisterError::Refused(Refusal::Transient(408));
                rows.iter()
                    .filter_map(device::device_id)
                    .map(|id| (id.to_owned(), late.clone()))
                    .collect()
            };
            if failed.is_empty() {
                continue;
            }
            let mut state = self.state();
            for queued in readings {
                if !failed.contains_key(&queued.reading.device_id) {
                    continue;
                }
                let id = queued.reading.device_id.as_str();
                // Only a state the cache still takes for the device's newest goes back: one
                // noted or registered since is newer, and a forgotten device registers again.
                if state.pending.contains_key(id)
                    || state.known.peek(id) != Some(queued.reading.measured_at_ms)
                {
                    continue;
                }
                if state.pending.len() < MAX_PENDING {
                    // Not among the states a stale device may take the place of: it waited
                    // its turn already.
                    state.pending.insert(
                        id.to_owned(),
                        Pending {
                            reading: queued.reading.clone(),
                            fresh: false,
                            ..*queued
                        },
                    );
                } else {
                    // No room: the device's next reading queues it again.
                    state.known.set(id, queued.written);
                }
            }
        }
    }

    /// Merges up to 100 device rows in one transaction; if it is refused for what one of them
    /// carries, each row on its own, so one bad row never holds back the others. Returns the
    /// devices whose rows were not written, each with why.
    async fn merge_each(
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

fn chunk<T>(rows: Vec<T>) -> Vec<Vec<T>> {
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

    /// The refresh interval of the tests' registries: rows registered at 1,000 ms are stale
    /// from 6,000 ms on.
    const INTERVAL: Duration = Duration::from_secs(5);

    fn registry(capacity: usize) -> Registry {
        let account = Account::from_connection_string(
            infra::storage::DEVELOPMENT_STORAGE,
            Duration::from_secs(1),
        )
        .unwrap();
        Registry::new(account.table("devices"), capacity, INTERVAL)
    }

    fn latest(offered: &[(Reading, i64)]) -> Latest {
        newest(offered.iter().map(|(r, at)| (r, *at)))
    }

    fn known(r: &Registry, ids: &[&str]) {
        let devices: Vec<(Reading, i64)> = ids.iter().map(|id| (reading(id, 1_000), 1)).collect();
        let rows: Vec<(Presence, Entity)> = devices
            .iter()
            .map(|(r, at)| (Presence::New, device::row(r, *at, Some(*at))))
            .collect();
        r.registered(&devices, &rows);
    }

    #[test]
    fn new_devices_are_registered_and_known_ones_queued_newest_first() {
        let offered = [
            (reading("a", 2_000), 10),
            (reading("a", 1_000), 11),
            (reading("b", 5_000), 12),
            (reading("b", 5_000), 13),
        ];
        let latest = latest(&offered);
        assert_eq!(latest["a"], (reading("a", 2_000), 10));
        assert_eq!(latest["b"].1, 12, "the first of equals");

        let r = registry(100);
        let fresh = r.note(latest.clone());
        assert_eq!(fresh.iter().map(Vec::len).sum::<usize>(), 2);
        let rows: Vec<(Presence, Entity)> = fresh[0]
            .iter()
            .map(|(r, at)| (Presence::New, device::row(r, *at, Some(*at))))
            .collect();
        r.registered(&fresh[0], &rows);
        assert_eq!(r.state().presume, Presence::New, "most were new");

        // Known now: nothing to register; only readings newer than the row are queued.
        let next = self::latest(&[(reading("a", 1_500), 20), (reading("b", 6_000), 21)]);
        assert!(r.note(next).is_empty());
        let state = r.state();
        assert!(
            !state.pending.contains_key("a"),
            "older than the registered row"
        );
        assert_eq!(state.pending["b"].reading.measured_at_ms, 6_000);
    }

    #[test]
    fn registrations_are_chunked_for_transactions() {
        let offered: Vec<(Reading, i64)> = (0..250)
            .map(|i| (reading(&format!("d{i}"), 1), 1))
            .collect();
        let sizes: Vec<usize> = registry(1_000)
            .note(latest(&offered))
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, vec![100, 100, 50]);
    }

    #[test]
    fn the_cache_forgets_the_least_recently_seen_first_and_stays_bounded() {
        let r = registry(4);
        known(&r, &["a", "b"]);
        // "a" seen again: it stays when the next two push out a generation.
        assert!(r.note(latest(&[(reading("a", 2_000), 1)])).is_empty());
        known(&r, &["c", "d"]);
        let mut state = r.state();
        assert!(state.known.len() <= 4, "{}", state.known.len());
        assert!(state.known.newest("a").is_some(), "recently seen");
        assert!(state.known.newest("b").is_none(), "least recently seen");
        drop(state);
        for i in 0..1_000 {
            known(&r, &[&format!("x{i}")]);
        }
        assert!(r.state().known.len() <= 4);
        let forgotten = r.note(latest(&[(reading("c", 3_000), 1)]));
        assert_eq!(forgotten.concat().len(), 1, "forgotten: registered again");
    }

    #[test]
    fn pending_states_are_bounded_and_a_full_set_wakes_the_flush() {
        let r = registry(100_000);
        let ids: Vec<String> = (0..MAX_PENDING + 5).map(|i| format!("d{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        known(&r, &refs);
        let woken = r.full.notified();
        let mut woken = std::pin::pin!(woken);
        woken.as_mut().enable();
        let offered: Vec<(Reading, i64)> = refs.iter().map(|id| (reading(id, 9_000), 2)).collect();
        assert!(r.note(latest(&offered)).is_empty());
        let mut state = r.state();
        assert_eq!(state.pending.len(), MAX_PENDING);
        let deferred: Vec<&str> = refs
            .iter()
            .copied()
            .filter(|id| !state.pending.contains_key(*id))
            .collect();
        assert_eq!(deferred.len(), 5);
        for id in deferred {
            assert_eq!(
                state.known.newest(id).copied(),
                Some(1_000),
                "{id}: not taken as written, so its next reading is queued"
            );
        }
        drop(state);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(
            std::future::Future::poll(woken.as_mut(), &mut cx).is_ready(),
            "the flush is woken"
        );
    }

    #[test]
    fn past_the_bound_each_row_is_refreshed_about_once_per_interval() {
        let r = registry(1_000_000);
        let ids: Vec<String> = (0..3 * MAX_PENDING).map(|i| format!("d{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        known(&r, &refs);
        let woken = r.full.notified();
        let mut woken = std::pin::pin!(woken);
        woken.as_mut().enable();
        let mut poll_woken = || {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            std::future::Future::poll(woken.as_mut(), &mut cx).is_ready()
        };
        let offer = |ids: &[&str], ms: i64| {
            let offered: Vec<(Reading, i64)> = ids.iter().map(|id| (reading(id, ms), 2)).collect();
            assert!(r.note(latest(&offered)).is_empty());
        };

        // Every device reports again before its row is an interval old: the set fills, and
        // the rest wait, without an early flush (which would write every reading).
        offer(&refs, 2_000);
        assert_eq!(r.state().pending.len(), MAX_PENDING);
        assert!(
            !poll_woken(),
            "rows under an interval old wait for the interval"
        );
        let (queued, waiting): (Vec<&str>, Vec<&str>) = refs
            .iter()
            .partition(|id| r.state().pending.contains_key(**id));
        assert_eq!(waiting.len(), 2 * MAX_PENDING);

        // Half of those report with their rows an interval old: each takes the place of a
        // fresh one, which gets its row's time back and is queued again by a later reading.
        let (stale, later) = waiting.split_at(MAX_PENDING / 2);
        offer(stale, 7_000);
        let mut state = r.state();
        assert_eq!(state.pending.len(), MAX_PENDING);
        assert!(stale.iter().all(|id| state.pending.contains_key(*id)));
        let put_aside: Vec<&str> = queued
            .iter()
            .copied()
            .filter(|id| !state.pending.contains_key(*id))
            .collect();
        assert_eq!(put_aside.len(), MAX_PENDING / 2);
        assert!(put_aside
            .iter()
            .all(|id| state.known.newest(id).copied() == Some(1_000)));
        drop(state);
        assert!(!poll_woken(), "room was made without a flush");

        // More stale devices than fresh states left: the set is all stale, and the flush is due.
        offer(later, 7_000);
        let state = r.state();
        assert!(state.pending.values().all(|p| !p.fresh));
        drop(state);
        assert!(poll_woken(), "a set full of stale devices wakes the flush");
    }
}
