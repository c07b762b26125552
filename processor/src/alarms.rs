//! Alarms: a round's stored readings judged against the operators' rules
//! ([`schemas::alarm`]), before any message carrying them may be deleted.
//!
//! Most readings cost nothing here: a device is judged only when one of its readings is out
//! of a rule's band, or when its state under a rule is not clear (the table's active list,
//! read once per group of a round that rules watch). Then its state rows are read, and its stored
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
use schemas::alarm::{self, Condition, Event, Rule, State, StateRow};
use schemas::timefmt::{format_ms, parse_rfc3339_ms};
use schemas::Reading;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;
use tokio::time::Instant;

/// A reading older than this when ingest received it does not begin an alarm: a backfill or
/// a replay of old data is history, not news (a backlog in the queue is not: it is judged by
/// when it arrived). It is still judged when
/// its device's state is not clear and it is newer than the newest judged.
pub const NEWS_FOR_MS: i64 = 3_600_000;
/// Most devices one silence rule judges in a sweep (the next sweep takes the others).
const SILENT_PER_SWEEP: usize = 10_000;
/// A silent device already listed is judged again every this many sweeps.
const RESWEEP_EVERY: u64 = 10;
/// Devices the silence sweep judges at once.
const SWEEP_AT_ONCE: usize = 8;
/// Most stored readings read back at once.
const PASS_ROWS: usize = 1_000;
/// Most events one rule makes in a pass (so a state row with its unsent events stays small
/// whatever backlog of a flapping device it judges); the next pass goes on from there.
const MAX_EVENTS: usize = 16;
/// Times one device is judged again after another processor changed its state meanwhile.
const ATTEMPTS: usize = 4;

/// The rules, and the tables and queue alarms live in.
#[derive(Debug)]
pub struct Alarms {
    pub table: Table,
    pub events: Queue,
    rules: RwLock<Arc<[Rule]>>,
    /// Where each silence rule's sweep goes on from (the device id after which), when the
    /// last one stopped at [`SILENT_PER_SWEEP`] devices.
    cursors: Mutex<HashMap<String, String>>,
    /// The rules refused when last read, by id, so each is logged when it first appears.
    refused: Mutex<BTreeMap<String, String>>,
}

/// A device's readings in a group that rules watch: per rule (by index into the round's
/// rules) and condition, the measurement time of the earliest, and of the earliest recent one
/// out of band; and the messages carrying them.
#[derive(Debug, Default)]
pub struct Watched {
    pub rules: BTreeMap<(usize, Condition), (i64, Option<i64>)>,
    pub messages: std::collections::BTreeSet<usize>,
}

/// The devices of a group's readings that `rules` watch (none, at no cost, without rules),
/// given each reading with when ingest received it, whether it was replayed as a backfill, and
/// the message carrying it.
pub fn watched<'r>(
    rules: &[Rule],
    readings: impl Iterator<Item = (&'r Reading, i64, bool, usize)>,
) -> BTreeMap<String, Watched> {
    let mut watched: BTreeMap<String, Watched> = BTreeMap::new();
    if rules.is_empty() {
        return watched;
    }
    for (reading, ingested_at, backfill, message) in readings {
        let device = reading.device_id.as_str();
        for (i, rule) in rules.iter().enumerate() {
            if !rule.watches(device) {
                continue;
            }
            let at = reading.measured_at_ms;
            let value = rule.measurement.of(reading);
            // Any reading ends a silence; only a recent one out of band, not replayed as a
            // backfill, begins a band alarm.
            let conditions = [
                (rule.silence_ms.is_some(), Condition::Silence, None),
                (
                    rule.has_band() && value.is_some(),
                    Condition::Band,
                    value
                        .filter(|&v| {
                            rule.outside(v) && !backfill && at >= ingested_at - NEWS_FOR_MS
                        })
                        .map(|_| at),
                ),
            ];
            for (applies, condition, news) in conditions {
                if !applies {
                    continue;
                }
                let entry = match watched.get_mut(device) {
                    Some(entry) => entry,
                    None => watched.entry(device.to_owned()).or_default(),
                };
                entry.messages.insert(message);
                let (earliest, first_news) =
                    entry.rules.entry((i, condition)).or_insert((at, news));
                *earliest = (*earliest).min(at);
                *first_news = match (*first_news, news) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
    }
    watched
}

/// A device to judge: the rules (by index into the round's rules) and conditions, with the
/// measurement time of its earliest reading that calls for it; the messages that carry its
/// readings; whether it comes from the silence sweep.
#[derive(Debug, Default)]
pub struct Work {
    pub rules: BTreeMap<(usize, Condition), i64>,
    pub messages: std::collections::BTreeSet<usize>,
    /// From the silence sweep: each silence rule's time is the start of a window the device
    /// table says no reading was measured in.
    pub sweep: bool,
}

impl Alarms {
    pub fn new(table: Table, events: Queue) -> Self {
        Self {
            table,
            events,
            rules: RwLock::new(Arc::from(Vec::new())),
            cursors: Mutex::default(),
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

    /// The active list: every `device|rule` whose state is not clear or holds unsent
    /// events, with the ETag of its row. Read after the readings it decides on are stored,
    /// never cached: a processor that lists a device then looks for readings stored
    /// meanwhile ([`Alarms::judge`]), so of the two, one sees the other.
    async fn active(&self, deadline: Instant) -> Result<Active, StorageError> {
        let filter = format!("PartitionKey eq '{}'", alarm::ACTIVE_PARTITION);
        let rows = retry(deadline, || self.table.query(&filter)).await?;
        Ok(rows
            .iter()
            .filter_map(|e| {
                let key = e.get("RowKey")?.as_str()?;
                let etag = e.get("odata.etag")?.as_str()?;
                Some((key.to_owned(), etag.to_owned()))
            })
            .collect())
    }

    /// Which of `watched` to judge, and under which rules: those listed active, from their
    /// earliest reading; the others only for a recent reading out of band, from the earliest
    /// such. Also returns the active list read.
    pub async fn work(
        &self,
        watched: BTreeMap<String, Watched>,
        rules: &[Rule],
        deadline: Instant,
    ) -> Result<(BTreeMap<String, Work>, Active), StorageError> {
        let active = self.active(deadline).await?;
        let mut work = BTreeMap::new();
        for (device, seen) in watched {
            let rules: BTreeMap<(usize, Condition), i64> = seen
                .rules
                .into_iter()
                .filter_map(|((i, condition), (earliest, news))| {
                    let key = alarm::active_key(&device, &rules[i].key(condition));
                    if active.contains_key(&key) {
                        Some(((i, condition), earliest))
                    } else {
                        news.map(|news| ((i, condition), news))
                    }
                })
                .collect();
            if !rules.is_empty() {
                let messages = seen.messages;
                work.insert(
                    device,
                    Work {
                        rules,
                        messages,
                        sweep: false,
                    },
                );
            }
        }
        Ok((work, active))
    }

    /// Judges `device` under the rules `work` names: reads its states, reads back its stored
    /// readings since the newest judged, lists the device active before writing a state
    /// that is not clear, writes each changed state with its events, sends the events,
    /// writes the states without them, and only then takes a clear one off the list.
    pub async fn judge(
        &self,
        readings: &Table,
        rules: &[Rule],
        active: &Active,
        device: &str,
        work: &Work,
        deadline: Instant,
    ) -> Result<(), Judged> {
        // This device's rows of the active list as this judging leaves them, with their
        // ETags (`None`: listed by another processor meanwhile, ETag unknown).
        let mut listed: HashMap<String, Option<String>> = work
            .rules
            .keys()
            .filter_map(|&(i, condition)| {
                let key = alarm::active_key(device, &rules[i].key(condition));
                let etag = active.get(&key)?.clone();
                Some((key, Some(etag)))
            })
            .collect();
        let mut again = 0;
        loop {
            match self
                .judge_once(readings, rules, &mut listed, device, work, deadline)
                .await?
            {
                Outcome::Done => return Ok(()),
                Outcome::More => {}
                Outcome::Again => {
                    metrics::counter!(m::ALARM_REJUDGED).increment(1);
                    again += 1;
                    if again == ATTEMPTS {
                        return Err(Judged::Contended);
                    }
                }
            }
        }
    }

    /// One pass of [`Alarms::judge`].
    async fn judge_once(
        &self,
        readings: &Table,
        rules: &[Rule],
        listed: &mut HashMap<String, Option<String>>,
        device: &str,
        work: &Work,
        deadline: Instant,
    ) -> Result<Outcome, Judged> {
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
        // Events a pass left unsent (a kill, a failed put) go first, so that a row never holds
        // more than one pass's events.
        let unsent: Vec<(&String, &StateRow, &String)> = states
            .iter()
            .filter_map(|(key, (row, etag))| Some((key, row, etag.as_ref()?)))
            .filter(|(_, row, _)| !row.unsent.is_empty())
            .collect();
        if !unsent.is_empty() {
            for (key, row, etag) in unsent {
                let sent = self
                    .send(device, key, &row.unsent, row.state, etag, deadline)
                    .await?;
                if sent.is_none() {
                    return Ok(Outcome::Again);
                }
                if !row.state.status.is_active() {
                    self.unlist(listed, &alarm::active_key(device, key), deadline)
                        .await?;
                }
            }
            return Ok(Outcome::More);
        }
        // What each rule judges from: past the newest judged; for a clear state, no earlier
        // than the reading that called for it.
        let mut judging: Vec<Judging<'_>> = Vec::new();
        for (&(i, condition), &from) in &work.rules {
            let rule = &rules[i];
            let key = rule.key(condition);
            let state = states
                .get(&key)
                .map(|(row, _)| row.state)
                .unwrap_or_default();
            let start = match state.status {
                alarm::Status::Clear => state.at.saturating_add(1).max(from),
                _ => state.at.saturating_add(1),
            };
            judging.push(Judging {
                rule,
                condition,
                key,
                state,
                from,
                start,
                made: Vec::new(),
            });
        }
        let newest_read = self
            .read_back(readings, device, &mut judging, deadline)
            .await?;
        // Silence: raised when the sweep's window holds no stored reading either.
        if work.sweep {
            for j in judging.iter_mut() {
                if j.condition == Condition::Silence && j.rule.raise_silence(&mut j.state, j.from) {
                    let event =
                        j.rule
                            .event(device, Condition::Silence, alarm::Kind::Raised, &j.state);
                    j.made.push(event);
                }
            }
        }
        let more = judging.iter().any(|j| j.made.len() >= MAX_EVENTS);

        // Write each changed state with its events.
        let mut send: Vec<(String, Vec<Event>, State, String)> = Vec::new();
        let mut unlist: Vec<String> = Vec::new();
        let mut listed_now = false;
        for j in judging.iter_mut() {
            let state = j.state;
            let key = alarm::active_key(device, &j.key);
            let (old, etag) = match states.remove(&j.key) {
                Some((row, etag)) => (Some(row.state), etag),
                None => (None, None),
            };
            let events = std::mem::take(&mut j.made);
            let was_active = old.is_some_and(|o| o.status.is_active());
            let now_active = state.status.is_active() || !events.is_empty();
            // Listed before a state becomes active or makes events (or when found unlisted,
            // after a kill between the two): every reading of the device is then judged.
            if now_active && (!was_active || !listed.contains_key(&key)) {
                let etag = self.list(&key, deadline).await?;
                listed.insert(key.clone(), Some(etag));
                listed_now = true;
            }
            // A device never judged before that stays clear, with nothing to send, leaves no
            // row.
            let mut wrote = None;
            if (old.is_some() || now_active) && old != Some(state) {
                let entity = alarm::state_entity(device, &j.key, &state, &events);
                match write_if(&self.table, &entity, etag.as_deref(), deadline).await? {
                    Some(etag) => wrote = Some(etag),
                    None => return Ok(Outcome::Again),
                }
            }
            match wrote {
                Some(etag) if !events.is_empty() => send.push((j.key.clone(), events, state, etag)),
                _ if !state.status.is_active() && listed.contains_key(&key) => {
                    // Off the list only after a write of the state in this pass: one that
                    // read the state before and writes it active meanwhile is refused, and
                    // lists it again.
                    if wrote.is_none() {
                        let entity = alarm::state_entity(device, &j.key, &state, &[]);
                        if write_if(&self.table, &entity, etag.as_deref(), deadline)
                            .await?
                            .is_none()
                        {
                            return Ok(Outcome::Again);
                        }
                    }
                    unlist.push(key);
                }
                _ => {}
            }
        }
        if listed_now {
            // Readings stored while it was being listed, by a processor that read the list
            // before: judged here.
            // Past what was read back; nothing read: from where it began.
            let from = newest_read
                .unwrap_or_else(|| judging.iter().map(|j| j.start).min().unwrap_or(i64::MIN) - 1);
            let filter = format!(
                "PartitionKey eq '{}' and RowKey gt '{}'",
                quoted(device),
                format_ms(from.max(schemas::timefmt::MIN_MS))
            );
            let newer = retry(deadline, || {
                readings.query_first_select(&filter, "RowKey", 1)
            })
            .await?;
            if !more && !newer.is_empty() {
                return Ok(Outcome::Again);
            }
        }
        for (key, events, state, etag) in send {
            if self
                .send(device, &key, &events, state, &etag, deadline)
                .await?
                .is_some()
                && !state.status.is_active()
            {
                unlist.push(alarm::active_key(device, &key));
            }
        }
        for key in unlist {
            self.unlist(listed, &key, deadline).await?;
        }
        Ok(if more { Outcome::More } else { Outcome::Done })
    }

    /// Puts `events` on the alarms queue, then writes the state they came with (`key`, read or
    /// written with `etag`) without them. `Ok(None)` when another processor wrote the row
    /// meanwhile: it read the events and sends them too (a repeat, by the same ids).
    async fn send(
        &self,
        device: &str,
        key: &str,
        events: &[Event],
        state: State,
        etag: &str,
        deadline: Instant,
    ) -> Result<Option<String>, StorageError> {
        for event in events {
            let text = serde_json::to_string(event).expect("events serialise");
            retry(deadline, || self.events.put(text.clone())).await?;
            metrics::counter!(m::ALARM_EVENTS, "rule" => event.rule.clone(), "condition" => event.condition.name(), "event" => event.event.name())
                .increment(1);
            tracing::info!(device, rule = %event.rule, condition = event.condition.name(), event = event.event.name(), value = event.value, measured_at = %event.measured_at, "Alarm {}.", event.event.name());
        }
        let entity = alarm::state_entity(device, key, &state, &[]);
        write_if(&self.table, &entity, Some(etag), deadline).await
    }

    /// Takes `key` off the active list, only with the ETag it was read or listed with: a
    /// processor that listed it again since (a new raise) changed that, and the row stays.
    async fn unlist(
        &self,
        listed: &mut HashMap<String, Option<String>>,
        key: &str,
        deadline: Instant,
    ) -> Result<(), StorageError> {
        if let Some(Some(etag)) = listed.remove(key) {
            let row = infra::storage::RowRef {
                partition_key: alarm::ACTIVE_PARTITION,
                row_key: key,
                etag: &etag,
            };
            retry(deadline, || self.table.delete_if_unchanged(&row)).await?;
        }
        Ok(())
    }

    /// Reads back `device`'s stored readings from the earliest start of `judging` on, in
    /// passes of at most [`PASS_ROWS`] rows, and judges each rule on those from its start;
    /// a rule stops at [`MAX_EVENTS`] events (the rest is judged in the next pass). Returns
    /// the measurement time of the newest row read.
    async fn read_back(
        &self,
        readings: &Table,
        device: &str,
        judging: &mut [Judging<'_>],
        deadline: Instant,
    ) -> Result<Option<i64>, StorageError> {
        let mut newest = None;
        let select = select(
            judging
                .iter()
                .filter(|j| j.condition == Condition::Band)
                .map(|j| j.rule),
        );
        let mut next = judging.iter().map(|j| j.start).min();
        while let Some(from) = next.take() {
            let filter = format!(
                "PartitionKey eq '{}' and RowKey ge '{}'",
                quoted(device),
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
                newest = newest.max(Some(at));
                if full {
                    next = Some(at.saturating_add(1));
                }
                for j in judging.iter_mut() {
                    if at < j.start || j.made.len() >= MAX_EVENTS {
                        continue;
                    }
                    let kind = match j.condition {
                        Condition::Silence => j.rule.judge_silence(&mut j.state, at),
                        Condition::Band => {
                            let Some(value) = number(&row, &column(&j.rule.measurement)) else {
                                continue;
                            };
                            j.rule.judge(&mut j.state, at, value)
                        }
                    };
                    if let Some(kind) = kind {
                        j.made
                            .push(j.rule.event(device, j.condition, kind, &j.state));
                    }
                }
            }
            if judging.iter().all(|j| j.made.len() >= MAX_EVENTS) {
                break;
            }
        }
        Ok(newest)
    }

    /// The silence sweep: judges each device a silence rule watches whose newest reading, by
    /// the device table, was measured before the rule's limit plus `allowance_ms` ago
    /// (clock skew, and the age of the ingest queue's backlog: readings not yet stored are
    /// not silence). Its stored readings from then on are read back, and silence is raised
    /// only if there are none. A device already listed is judged again only every
    /// [`RESWEEP_EVERY`]th sweep (`sweep` counts them), to send events a stopped sweep left
    /// unsent. Returns the devices judged.
    pub async fn sweep_silence(
        &self,
        readings: &Table,
        devices: &Table,
        allowance_ms: i64,
        sweep: u64,
        deadline: Instant,
    ) -> Result<usize, StorageError> {
        let rules = self.rules();
        if rules.iter().all(|r| r.silence_ms.is_none()) {
            return Ok(0);
        }
        let active = self.active(deadline).await?;
        let now = schemas::timefmt::now_ms();
        let mut work: BTreeMap<String, Work> = BTreeMap::new();
        for (i, rule) in rules.iter().enumerate() {
            let Some(limit) = rule.silence_ms else {
                continue;
            };
            let since = now.saturating_sub(limit).saturating_sub(allowance_ms);
            let mut filter = format!(
                "PartitionKey eq '{}' and MeasuredAt lt datetime'{}'",
                schemas::device::PARTITION,
                format_ms(since)
            );
            match &rule.target {
                alarm::Target::Device(d) => {
                    filter.push_str(&format!(" and RowKey eq '{}'", quoted(d)))
                }
                alarm::Target::Prefix(p) if !p.is_empty() => filter.push_str(&format!(
                    " and RowKey ge '{0}' and RowKey lt '{0}~'",
                    quoted(p)
                )),
                alarm::Target::Prefix(_) => {}
            }
            let cursor = self
                .cursors
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&rule.id)
                .cloned();
            if let Some(after) = &cursor {
                filter.push_str(&format!(" and RowKey gt '{}'", quoted(after)));
            }
            let rows = retry(deadline, || {
                devices.query_first_select(&filter, "RowKey", SILENT_PER_SWEEP)
            })
            .await?;
            {
                let mut cursors = self.cursors.lock().unwrap_or_else(PoisonError::into_inner);
                match rows
                    .last()
                    .and_then(|r| r.get("RowKey"))
                    .and_then(Value::as_str)
                {
                    Some(last) if rows.len() == SILENT_PER_SWEEP => {
                        cursors.insert(rule.id.clone(), last.to_owned());
                    }
                    _ => {
                        cursors.remove(&rule.id);
                    }
                }
            }
            let key = rule.key(Condition::Silence);
            for row in rows {
                let Some(device) = row.get("RowKey").and_then(Value::as_str) else {
                    continue;
                };
                let listed = active.contains_key(&alarm::active_key(device, &key));
                if !rule.watches(device) || (listed && sweep % RESWEEP_EVERY != 0) {
                    continue;
                }
                let entry = work.entry(device.to_owned()).or_insert_with(|| Work {
                    sweep: true,
                    ..Work::default()
                });
                entry.rules.insert((i, Condition::Silence), since);
            }
        }
        let judged = work.len();
        let (rules, active) = (&rules, &active);
        let mut rest = work.iter();
        let mut running = futures::stream::FuturesUnordered::new();
        loop {
            while running.len() < SWEEP_AT_ONCE {
                let Some((device, work)) = rest.next() else {
                    break;
                };
                running.push(async move {
                    let judged = self
                        .judge(readings, rules, active, device, work, deadline)
                        .await;
                    (device, judged)
                });
            }
            let Some((device, judged)) = futures::StreamExt::next(&mut running).await else {
                break;
            };
            if let Err(error) = judged {
                metrics::counter!(m::ALARM_SWEEP_FAILURES).increment(1);
                tracing::warn!(device = %device, ?error, "Cannot judge a device's silence; the next sweep tries again.");
            }
        }
        Ok(judged)
    }

    /// Lists `key` active, changing its row's ETag if it is there (a processor about to take
    /// it off the list with the ETag it read then leaves it). Returns the new ETag.
    async fn list(&self, key: &str, deadline: Instant) -> Result<String, StorageError> {
        let (device, rule) = alarm::active_of(key).unwrap_or((key, ""));
        let row = alarm::active_entity(device, rule);
        for _ in 0..ATTEMPTS {
            // Replace whatever is there, else insert; one of the two finds it as it is.
            for etag in [Some("*"), None] {
                if let Some(etag) = write_if(&self.table, &row, etag, deadline).await? {
                    return Ok(etag);
                }
            }
        }
        Err(StorageError {
            op: "table_write_if",
            kind: infra::storage::ErrorKind::Protocol(
                "an active-list row appeared and went away on every try".into(),
            ),
        })
    }
}

/// The active list's rows, by `device|rule`, with their ETags.
pub type Active = HashMap<String, String>;

/// One rule being judged on a device: its state as judged so far, the first measurement
/// time it judges, and the events made.
struct Judging<'r> {
    rule: &'r Rule,
    condition: Condition,
    /// The state's key ([`Rule::key`]).
    key: String,
    /// The earliest reading that called for judging; for the silence sweep, the start of the
    /// window no reading was measured in.
    from: i64,
    state: State,
    start: i64,
    made: Vec<Event>,
}

/// What a pass of judging ended with.
enum Outcome {
    Done,
    /// Stopped at [`MAX_EVENTS`] events for a rule: judge on from there.
    More,
    /// Another processor changed a state meanwhile, or readings were stored while the device
    /// was being listed: judge again.
    Again,
}

/// A device id (checked by the contract, so never holding a quote) as an OData literal's
/// text: a quote would be doubled.
fn quoted(device: &str) -> std::borrow::Cow<'_, str> {
    if device.contains('\'') {
        device.replace('\'', "''").into()
    } else {
        device.into()
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
    columns.insert(0, "RowKey".into());
    columns.join(",")
}

/// A number a row holds in `name`: a JSON number, or the string the service renders an
/// `Edm.Int64` as (a string property that reads as a number is not one).
fn number(row: &Entity, name: &str) -> Option<f64> {
    match row.get(name)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => {
            let edm = row
                .get(&format!("{name}@odata.type"))
                .and_then(Value::as_str);
            (edm == Some("Edm.Int64")).then(|| s.parse().ok()).flatten()
        }
        _ => None,
    }
}

/// What a delivery's hold on the events it took adds to the time their tries may take (a
/// refused one reappears after the hold).
const HOLD_MARGIN: Duration = Duration::from_secs(10);
/// Events taken from the alarms queue at once for the webhook.
const DELIVERED_AT_ONCE: u8 = 16;

/// Delivers the alarms queue's events to the webhook until `shutdown`: each taken for as long
/// as the tries of its take may last, POSTed, and deleted once the webhook answered 2xx. One
/// that fails stays queued and comes back after its hold (while it fails, events are taken one
/// at a time, after a pause growing to a minute; in no set order), so the queue is the
/// backlog: kept for as long as the webhook is down, and at most [`DELIVERED_AT_ONCE`] events
/// in memory. Readings never wait for it. A delete that fails sends the event again, by the
/// same id.
pub async fn deliver(
    ctx: Arc<crate::ctx::Ctx>,
    webhook: infra::webhook::Webhook,
    timeout: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let queue = &ctx.alarms.events;
    for outcome in ["delivered", "failed"] {
        metrics::counter!(m::ALARM_WEBHOOK, "outcome" => outcome).increment(0);
    }
    let mut pause = infra::retry::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut failing = false;
    loop {
        // While the webhook fails, one event at a time, held only as long as its try takes,
        // so that one refused comes back soon.
        let at_once = if failing { 1 } else { DELIVERED_AT_ONCE };
        let hold = timeout.saturating_mul(u32::from(at_once)) + HOLD_MARGIN;
        // The hold may start as soon as the get is sent: a slow answer is counted in it.
        let taken_at = Instant::now();
        let taken = tokio::select! {
            _ = shutdown.cancelled() => break,
            taken = queue.get(at_once, hold) => taken,
        };
        let mut wait = Duration::from_secs(1);
        match taken {
            Ok(messages) => {
                let mut messages = messages.into_iter();
                while let Some(message) = messages.next() {
                    // The rest come back by themselves: none is posted after its hold ends,
                    // when another processor may take it too.
                    if taken_at.elapsed() + timeout + HOLD_MARGIN / 2 > hold {
                        tracing::debug!(
                            events = 1 + messages.len(),
                            "Alarm events left for their hold to end: too little of it is left to post them."
                        );
                        break;
                    }
                    let posted = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        posted = webhook.post(message.text.clone()) => posted,
                    };
                    match posted {
                        Ok(()) => {
                            metrics::counter!(m::ALARM_WEBHOOK, "outcome" => "delivered")
                                .increment(1);
                            if failing {
                                tracing::info!(
                                    webhook = webhook.redacted(),
                                    "The alarms webhook takes events again."
                                );
                                failing = false;
                            }
                            pause.reset();
                            wait = Duration::ZERO;
                            if let Err(error) = queue.delete(&message).await {
                                tracing::warn!(%error, "Cannot delete an alarm event the webhook took; it will be sent again.");
                            }
                        }
                        Err(error) => {
                            metrics::counter!(m::ALARM_WEBHOOK, "outcome" => "failed").increment(1);
                            if !failing {
                                tracing::warn!(webhook = webhook.redacted(), %error, "The alarms webhook refuses events; they stay queued and are tried again.");
                                failing = true;
                            }
                            // It and the rest of this take come back after the pause, not
                            // their whole hold (if that cannot be said, after the hold).
                            wait = pause.next_delay();
                            for left in std::iter::once(message).chain(messages.by_ref()) {
                                if let Err(error) = queue.hide(&left, wait).await {
                                    tracing::debug!(%error, "Cannot shorten an alarm event's hold; it comes back after it.");
                                }
                            }
                            break;
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "Cannot take alarm events for the webhook.");
                wait = pause.next_delay();
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(device: &str, at: i64, temperature: f64) -> Reading {
        Reading {
            device_id: device.into(),
            measured_at_ms: at,
            seq: None,
            temperature: Some(temperature),
            humidity: None,
            pressure: None,
            extras: Vec::new(),
        }
    }

    #[test]
    fn only_recent_news_out_of_band_calls_for_judging_and_any_reading_for_silence() {
        let hot =
            Rule::parse(r#"{"id":"hot","prefix":"a-","measurement":"temperature","high":30}"#)
                .unwrap();
        let quiet = Rule::parse(
            r#"{"id":"quiet","device":"b-1","measurement":"temperature","silenceMinutes":5}"#,
        )
        .unwrap();
        let rules = [hot, quiet];
        let now = 10 * NEWS_FOR_MS;
        let readings = [
            (reading("a-1", now - 1_000, 20.0), now, false, 0), // in band
            (reading("a-2", now - 2_000, 40.0), now, false, 1), // news
            (reading("a-2", now - 3_000, 41.0), now, false, 2), // earlier news
            (reading("a-3", now - NEWS_FOR_MS - 1, 40.0), now, false, 3), // history
            (reading("a-4", now - 1_000, 40.0), now, true, 4),  // a replayed backfill
            (reading("b-1", now - 1_000, 40.0), now, false, 5), // silence: any reading
            (reading("c-1", now - 1_000, 99.0), now, false, 6), // watched by none
        ];
        let watched = watched(&rules, readings.iter().map(|(r, i, b, m)| (r, *i, *b, *m)));
        let news = |device: &str| watched[device].rules[&(0, Condition::Band)].1;
        assert_eq!(news("a-1"), None);
        assert_eq!(news("a-2"), Some(now - 3_000));
        assert_eq!(watched["a-2"].messages.len(), 2);
        assert_eq!(news("a-3"), None);
        assert_eq!(news("a-4"), None);
        assert_eq!(
            watched["b-1"].rules[&(1, Condition::Silence)],
            (now - 1_000, None)
        );
        assert!(!watched.contains_key("c-1"));
        assert!(
            super::watched(&[], readings.iter().map(|(r, i, b, m)| (r, *i, *b, *m))).is_empty()
        );
    }
}
