//! Alarms: a round's stored readings judged against the operators' rules
//! ([`schemas::alarm`]), before any message carrying them may be deleted.
//!
//! Most readings cost nothing here: a device is judged only when one of its readings is out
//! of a rule's band, or when its state under a rule is not clear (the table's active list,
//! read at most once a second by all workers). Then its state rows are read, and its stored
//! readings since the newest one judged are read back from the telemetry table and judged in
//! order of measurement time, whichever processor stored them and in whatever order they
//! came. A state is written only with the ETag it was read with, so several processors
//! judging one device at once cannot both make the same change; the one refused reads again.
//!
//! Events are never lost and never made twice: each state row is written together with the
//! events its change makes (`Unsent`), those go to the alarms queue, and only then is the row
//! written again without them. A kill in between leaves the events in the row, and the
//! message that caused them reappears (it is deleted only after all this): judging its
//! device again sends them. So an event can be sent twice (consumers drop repeats by its
//! `id`), never made twice or lost.

use crate::ctx::retry;
use crate::metrics_names as m;
use infra::storage::{Entity, Queue, StorageError, Table};
use schemas::alarm::{self, Event, Rule, State, StateRow};
use schemas::timefmt::{format_ms, parse_rfc3339_ms};
use schemas::Reading;
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;
use tokio::time::Instant;

/// How long one read of the active list serves every worker.
const ACTIVE_FOR: Duration = Duration::from_secs(1);
/// A reading older than this (by its measurement, against the clock) does not begin an
/// alarm: a backfill or a replay of old data is history, not news. It is still judged when
/// its device's state is not clear and it is newer than the newest judged.
pub const NEWS_FOR_MS: i64 = 3_600_000;
/// Most stored readings read back at once.
const PASS_ROWS: usize = 1_000;
/// Times one device is judged again after another processor changed its state meanwhile.
const ATTEMPTS: usize = 4;

/// The rules, and the tables and queue alarms live in.
#[derive(Debug)]
pub struct Alarms {
    pub table: Table,
    pub events: Queue,
    rules: RwLock<Arc<[Rule]>>,
    active: tokio::sync::Mutex<Option<(Instant, Arc<HashSet<String>>)>>,
    /// The rules refused when last read, by id, so each is logged when it first appears.
    refused: Mutex<BTreeMap<String, String>>,
}

/// A device to judge: the rules (by index into the round's rules) with the measurement time
/// of its earliest reading that calls for it, and the messages that carry its readings.
#[derive(Debug, Default)]
pub struct Work {
    pub rules: BTreeMap<usize, i64>,
    pub messages: std::collections::BTreeSet<usize>,
}

impl Alarms {
    pub fn new(table: Table, events: Queue) -> Self {
        Self {
            table,
            events,
            rules: RwLock::new(Arc::from(Vec::new())),
            active: tokio::sync::Mutex::new(None),
            refused: Mutex::default(),
        }
    }

    /// The rules as last read.
    pub fn rules(&self) -> Arc<[Rule]> {
        self.rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads the rules again. A rule that does not parse is left out and logged (once until
    /// it changes), never fatal; a failed read keeps the rules read before.
    pub async fn reload(&self) -> Result<(), StorageError> {
        let rows = self
            .table
            .query(&format!("PartitionKey eq '{}'", alarm::RULES_PARTITION))
            .await?;
        let mut rules = Vec::with_capacity(rows.len());
        let mut refused = BTreeMap::new();
        for row in &rows {
            match alarm::rule_of(row) {
                Ok(rule) => rules.push(rule),
                Err(error) => {
                    let key = row
                        .get("RowKey")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    refused.insert(key, error.to_string());
                }
            }
        }
        {
            let mut known = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
            for (id, error) in &refused {
                if known.get(id) != Some(error) {
                    tracing::warn!(rule = %schemas::reading::truncate(id, 80), %error, "An alarm rule in the table is malformed; it is ignored until it is fixed.");
                }
            }
            *known = refused;
            metrics::gauge!(m::ALARM_RULES_REFUSED).set(known.len() as f64);
        }
        metrics::gauge!(m::ALARM_RULES).set(rules.len() as f64);
        *self.rules.write().unwrap_or_else(PoisonError::into_inner) = Arc::from(rules);
        Ok(())
    }

    /// The active list (`device|rule` of every state not clear), read at most once a second.
    async fn active(&self, deadline: Instant) -> Result<Arc<HashSet<String>>, StorageError> {
        let mut held = self.active.lock().await;
        if let Some((at, set)) = held.as_ref() {
            if at.elapsed() < ACTIVE_FOR {
                return Ok(set.clone());
            }
        }
        let filter = format!("PartitionKey eq '{}'", alarm::ACTIVE_PARTITION);
        let rows = retry(deadline, || self.table.query(&filter)).await?;
        let set: Arc<HashSet<String>> = Arc::new(
            rows.into_iter()
                .filter_map(|mut e| match e.remove("RowKey") {
                    Some(Value::String(k)) => Some(k),
                    _ => None,
                })
                .collect(),
        );
        *held = Some((Instant::now(), set.clone()));
        Ok(set)
    }

    /// Which devices of a group need judging, and under which rules. Empty, at no cost, when
    /// there are no rules.
    pub async fn work<'r>(
        &self,
        rules: &[Rule],
        readings: impl Iterator<Item = (&'r Reading, usize)>,
        now: i64,
        deadline: Instant,
    ) -> Result<(BTreeMap<String, Work>, Arc<HashSet<String>>), StorageError> {
        let mut work: BTreeMap<String, Work> = BTreeMap::new();
        if rules.is_empty() {
            return Ok((work, Arc::default()));
        }
        let active = self.active(deadline).await?;
        for (reading, message) in readings {
            let device = reading.device_id.as_str();
            for (i, rule) in rules.iter().enumerate() {
                if !rule.watches(device) {
                    continue;
                }
                let Some(value) = rule.measurement.of(reading) else {
                    continue;
                };
                let at = reading.measured_at_ms;
                let news = rule.outside(value) && at >= now - NEWS_FOR_MS;
                if !news && !active.contains(&alarm::active_key(device, &rule.id)) {
                    continue;
                }
                let entry = match work.get_mut(device) {
                    Some(entry) => entry,
                    None => work.entry(device.to_owned()).or_default(),
                };
                entry.messages.insert(message);
                let from = entry.rules.entry(i).or_insert(at);
                *from = (*from).min(at);
            }
        }
        Ok((work, active))
    }

    /// Judges `device` under the rules `work` names: reads its states, reads back its stored
    /// readings since the newest judged, writes each changed state with its events, keeps the
    /// active list, sends the events, then writes the states without them.
    pub async fn judge(
        &self,
        readings: &Table,
        rules: &[Rule],
        active: &HashSet<String>,
        device: &str,
        work: &Work,
        deadline: Instant,
    ) -> Result<(), Judged> {
        for _ in 0..ATTEMPTS {
            if self
                .judge_once(readings, rules, active, device, work, deadline)
                .await?
            {
                return Ok(());
            }
            metrics::counter!(m::ALARM_CONFLICTS).increment(1);
        }
        Err(Judged::Contended)
    }

    /// One try of [`Alarms::judge`]: `Ok(false)` when another processor changed a state
    /// meanwhile (judge again from what it wrote).
    async fn judge_once(
        &self,
        readings: &Table,
        rules: &[Rule],
        active: &HashSet<String>,
        device: &str,
        work: &Work,
        deadline: Instant,
    ) -> Result<bool, Judged> {
        let filter = alarm::states_filter(device);
        let rows = retry(deadline, || self.table.query(&filter)).await?;
        // Each state read, with its ETag, by rule id.
        let mut states: BTreeMap<String, (StateRow, Option<String>)> = BTreeMap::new();
        for row in &rows {
            if let Some(state) = alarm::state_of(row) {
                let etag = row
                    .get("odata.etag")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                states.insert(state.rule.clone(), (state, etag));
            }
        }
        // What each rule judges from: past the newest judged; for a clear state, no earlier
        // than the reading that called for it.
        let mut judging: Vec<(&Rule, State, i64)> = Vec::new();
        for (&i, &from) in &work.rules {
            let rule = &rules[i];
            let state = states
                .get(&rule.id)
                .map(|(row, _)| row.state)
                .unwrap_or_default();
            let start = match state.status {
                alarm::Status::Clear => state.at.saturating_add(1).max(from),
                _ => state.at.saturating_add(1),
            };
            judging.push((rule, state, start));
        }
        let mut made: Vec<Vec<Event>> = vec![Vec::new(); judging.len()];
        let select = select(judging.iter().map(|(r, _, _)| *r));
        let mut next = judging.iter().map(|(_, _, s)| *s).min();
        // In passes of at most PASS_ROWS rows, so that a long range is never held whole.
        while let Some(from) = next.take() {
            let filter = format!(
                "PartitionKey eq '{device}' and RowKey ge '{}'",
                format_ms(from)
            );
            let rows = retry(deadline, || {
                readings.query_first_select(&filter, &select, PASS_ROWS)
            })
            .await?;
            let full = rows.len() == PASS_ROWS;
            for row in rows {
                let Some(at) = row
                    .get("RowKey")
                    .and_then(Value::as_str)
                    .and_then(parse_rfc3339_ms)
                else {
                    continue;
                };
                if full {
                    next = Some(at.saturating_add(1));
                }
                for (k, (rule, state, start)) in judging.iter_mut().enumerate() {
                    if at < *start {
                        continue;
                    }
                    let Some(value) = row.get(&column(&rule.measurement)).and_then(number) else {
                        continue;
                    };
                    if let Some(kind) = rule.judge(state, at, value) {
                        made[k].push(rule.event(device, kind, state));
                    }
                }
            }
        }

        // Write each changed state with its events (and any still unsent from before).
        let mut sent_later: Vec<(String, Vec<Event>, State, String)> = Vec::new();
        for ((rule, state, _), events) in judging.iter().zip(made) {
            let (before, etag) = match states.remove(&rule.id) {
                Some((row, etag)) => (Some(row), etag),
                None => (None, None),
            };
            let old = before.as_ref().map(|r| r.state);
            let mut unsent = before.map(|r| r.unsent).unwrap_or_default();
            if old == Some(*state) && unsent.is_empty() {
                continue;
            }
            if old.is_none() && !state.status.is_active() && events.is_empty() {
                // Nothing happened that a row must remember.
                continue;
            }
            unsent.extend(events);
            let entity = alarm::state_entity(device, &rule.id, state, &unsent);
            let written = if old == Some(*state) {
                etag
            } else {
                let Some(etag) = write_if(&self.table, &entity, etag.as_deref(), deadline).await?
                else {
                    return Ok(false);
                };
                self.keep_active(
                    active,
                    device,
                    rule,
                    old.map(|s| s.status),
                    *state,
                    deadline,
                )
                .await?;
                Some(etag)
            };
            if let (false, Some(etag)) = (unsent.is_empty(), written) {
                sent_later.push((rule.id.clone(), unsent, *state, etag));
            }
        }
        // States of rules not judged this time that still hold events (a kill between their
        // write and their events' put).
        for (rule, (row, etag)) in states {
            if let (false, Some(etag)) = (row.unsent.is_empty(), etag) {
                sent_later.push((rule, row.unsent, row.state, etag));
            }
        }
        for (rule, events, state, etag) in sent_later {
            for event in &events {
                let text = serde_json::to_string(event).expect("events serialise");
                retry(deadline, || self.events.put(text.clone())).await?;
                metrics::counter!(m::ALARM_EVENTS, "rule" => rule.clone(), "event" => event.event.name())
                    .increment(1);
                tracing::info!(device, rule = %rule, event = event.event.name(), value = event.value, measured_at = %event.measured_at, "Alarm {}.", event.event.name());
            }
            // Without the events now; if another processor wrote the row meanwhile, it read
            // them and sends them too (a repeat, by the same ids).
            let entity = alarm::state_entity(device, &rule, &state, &[]);
            write_if(&self.table, &entity, Some(&etag), deadline).await?;
        }
        Ok(true)
    }

    /// Keeps the active list in step with a state just written: listed while not clear.
    /// A kill between the two is mended by the next judging of the device (a state not clear
    /// comes back with its reading, out of band; a listed clear one with the device's next).
    async fn keep_active(
        &self,
        active: &HashSet<String>,
        device: &str,
        rule: &Rule,
        before: Option<alarm::Status>,
        state: State,
        deadline: Instant,
    ) -> Result<(), StorageError> {
        let listed = active.contains(&alarm::active_key(device, &rule.id));
        if state.status.is_active() && !listed {
            let row = alarm::active_entity(device, &rule.id);
            retry(deadline, || self.table.upsert(&row)).await?;
        } else if !state.status.is_active() && (listed || before.is_some_and(|s| s.is_active())) {
            let key = alarm::active_key(device, &rule.id);
            let row = infra::storage::RowRef {
                partition_key: alarm::ACTIVE_PARTITION,
                row_key: &key,
                etag: "*",
            };
            retry(deadline, || self.table.delete(&row)).await?;
        }
        Ok(())
    }
}

/// Why a device could not be judged.
#[derive(Debug)]
pub enum Judged {
    Storage(StorageError),
    /// Other processors changed its states every time it was judged.
    Contended,
}

impl From<StorageError> for Judged {
    fn from(error: StorageError) -> Self {
        Self::Storage(error)
    }
}

async fn write_if(
    table: &Table,
    entity: &Entity,
    etag: Option<&str>,
    deadline: Instant,
) -> Result<Option<String>, StorageError> {
    retry(deadline, || table.write_if(entity, etag)).await
}

/// The telemetry table's column of a measurement.
fn column(measurement: &alarm::Measurement) -> String {
    match measurement {
        alarm::Measurement::Temperature => "Temperature".into(),
        alarm::Measurement::Humidity => "Humidity".into(),
        alarm::Measurement::Pressure => "Pressure".into(),
        alarm::Measurement::Extra(name) => format!("{}{name}", schemas::entity::EXTRA_PREFIX),
    }
}

/// `$select` of the row key and the rules' columns.
fn select<'r>(rules: impl Iterator<Item = &'r Rule>) -> String {
    let mut columns: Vec<String> = rules.map(|r| column(&r.measurement)).collect();
    columns.sort();
    columns.dedup();
    format!("RowKey,{}", columns.join(","))
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}
