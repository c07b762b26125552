//! A worker's round on the messages of one take: sort them ([`classify`]), carry out what the
//! sorting asks (quarantine; then, a group of at most [`GROUP_DEVICES`] devices at a time,
//! table writes, late-hour marks and device registration), then settle each message:
//! delete it ([`settle`]), hand it with its dead letters to the writer
//! ([`crate::dead_letters`]), or leave it to reappear.
//!
//! A message with any failure is left alone; it reappears after the visibility timeout and is
//! redone (upserts make that harmless). On its last allowed delivery, a message still failing
//! to write its readings for a transient reason is dead-lettered as `poison`; one failing for
//! a reason only the operator can fix ([`Failure::needs_operator`]) never is, and no reading is
//! blamed for it: readiness names the error and the fetcher slows down until it is fixed.
//!
//! Time: the writes end by half the visibility timeout, counted from the first get of the
//! take; settling (dead letters, deletes) is planned to end by seven eighths of it, before the
//! messages can reappear to another worker. Only a dead-letter put may run later (it is never
//! cut short at the deadline: see [`crate::dead_letters`]).

use crate::claims::Claim;
use crate::classify::{self, classify, Classified, Keep, Origin, Sorted};
use crate::ctx::{retry, Ctx};
use crate::dead_letters::{Submission, Writer};
use crate::devices::{self, RegisterError};
use crate::failure::{Failure, Stage};
use crate::metrics_names as m;
use crate::plan::{device_groups, plan, Pending};
use crate::settle;
use crate::write::{write_all, Written};
use infra::storage::QueueMessage;
use schemas::timefmt::now_ms;
use schemas::{DeviceMessage, Reason};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use tokio::time::Instant;

/// A queue message leased to this round (hidden from other readers until its visibility
/// timeout), and what became of it.
struct Leased {
    message: QueueMessage,
    sorted: Sorted,
    /// The failure that keeps this message from being finished.
    failure: Option<Failure>,
    /// Its device messages, decoded again only when a refusal or poison needs them.
    devices: Option<Vec<DeviceMessage>>,
}

impl Leased {
    fn devices(&mut self) -> &[DeviceMessage] {
        self.devices
            .get_or_insert_with(|| classify::decode_again(&self.message.text))
    }

    /// Records a failure. One only the operator can fix outweighs a transient one, and one
    /// that forbids poisoning outweighs one that allows it, so a message is never poisoned
    /// for a round that storage refused, nor deleted after its quarantine or registration
    /// failed because a later write failed too.
    fn fail(&mut self, failure: Failure) {
        let keep = match &self.failure {
            Some(held) if held.needs_operator() => !failure.needs_operator(),
            Some(held) if !held.may_poison() => failure.may_poison(),
            _ => false,
        };
        if !keep {
            self.failure = Some(failure);
        }
    }
}

/// Runs a round on `messages`, taken with the first get at `taken_at`. Returns whether it ran
/// out of time for any message (then the fetcher takes less next time).
#[tracing::instrument(skip_all, fields(messages = messages.len()))]
pub async fn round(
    ctx: &Ctx,
    writer: &Writer,
    messages: Vec<QueueMessage>,
    taken_at: Instant,
) -> bool {
    let write_by = taken_at + ctx.visibility / 2;
    let settle_by = taken_at + ctx.visibility / 8 * 7;
    let now = now_ms();
    let Classified {
        messages: sorted,
        rows,
    } = classify(
        messages.iter().map(|m| (m.text.as_str(), m.dequeue_count)),
        &ctx.rules,
        now,
    );
    let mut held: Vec<Leased> = messages
        .into_iter()
        .zip(sorted)
        .map(|(message, sorted)| Leased {
            message,
            sorted,
            failure: None,
            devices: None,
        })
        .collect();

    quarantine(ctx, &mut held, write_by).await;

    for group in device_groups(rows, GROUP_DEVICES) {
        match halt(&held, write_by) {
            Some(failure) => {
                for (origin, _) in &group {
                    held[origin.message].fail(failure.clone());
                }
            }
            None => store(ctx, group, &mut held, write_by, now).await,
        }
    }

    match held
        .iter()
        .filter_map(|h| h.failure.as_ref())
        .find(|f| f.needs_operator())
    {
        Some(failure) => ctx.needs_operator(&failure.to_string()),
        None if held.iter().all(|h| h.failure.is_none()) => ctx.storage_works(),
        None => {}
    }
    let out_of_time = held
        .iter()
        .any(|h| h.failure.as_ref().is_some_and(Failure::out_of_time));
    poison(ctx, &mut held, now);

    let mut newer: BTreeMap<u64, usize> = BTreeMap::new();
    for h in held {
        let Leased {
            message,
            sorted,
            failure,
            ..
        } = h;
        if let Keep::Queued(version) = sorted.keep {
            *newer.entry(version).or_default() += 1;
            continue;
        }
        if let Some(failure) = &failure {
            settle::leave(&message, failure);
            continue;
        }
        let Ok((refusals, claim)) = Claim::take(&ctx.dead_lettered, sorted.refusals) else {
            settle::leave(&message, &Failure::DeadLettersInFlight);
            continue;
        };
        if refusals.is_empty() {
            settle::finished(ctx, &message, &sorted.received_at_ms, settle_by, now_ms()).await;
        } else {
            writer
                .submit(Submission {
                    message,
                    received_at_ms: sorted.received_at_ms,
                    records: refusals,
                    claim,
                    deadline: settle_by,
                    stored_at_ms: now_ms(),
                })
                .await;
        }
    }
    for (version, count) in newer {
        ctx.newer_envelopes(version, count);
    }
    ctx.forget_held_back();
    out_of_time
}

/// Devices a round stores at once: what it holds per device (write plan, newest reading,
/// hours, carriers) stays a few MiB when every reading comes from a different device.
const GROUP_DEVICES: usize = 2_000;

/// Why a round's remaining groups are not tried: its write time is up (this processor took
/// more than it could write in time, which must not poison their messages), or storage
/// refused a write for what only the operator can fix (the rest would be refused alike).
fn halt(held: &[Leased], write_by: Instant) -> Option<Failure> {
    if Instant::now() >= write_by {
        return Some(Failure::NoWritePermit);
    }
    held.iter()
        .filter_map(|h| h.failure.as_ref())
        .find(|f| f.needs_operator() && f.stage() == Stage::Write)
        .cloned()
}

/// Stores a group of a round's readings: the table writes, the late hours' marks, then the
/// registration of their devices. A failure holds back the messages it concerns.
async fn store(
    ctx: &Ctx,
    rows: Vec<(Origin, Pending)>,
    held: &mut [Leased],
    write_by: Instant,
    now: i64,
) {
    // Which messages carry each device's readings: a failed registration holds back those.
    let mut carriers: HashMap<String, BTreeSet<usize>> = HashMap::new();
    for (origin, row) in &rows {
        let device = &row.reading.device_id;
        match carriers.get_mut(device) {
            Some(messages) => {
                messages.insert(origin.message);
            }
            None => {
                carriers.insert(device.clone(), BTreeSet::from([origin.message]));
            }
        }
    }
    let hours = device_hours(&rows);
    let latest = devices::newest(rows.iter().map(|(_, p)| (&p.reading, p.ingested_at_ms)));
    let rules = ctx.alarms.rules();
    let readings = rows
        .iter()
        .map(|(o, p)| (&p.reading, p.ingested_at_ms, p.backfill, o.message));
    let watched = crate::alarms::watched(&rules, readings);
    let planned = plan(rows);
    if planned.overwrites > 0 {
        metrics::counter!(m::OVERWRITES).increment(planned.overwrites as u64);
    }
    let written = write_all(ctx, planned.batches, write_by).await;
    for (batch, written) in written {
        match written {
            Written::Stored(_) => {}
            Written::Retry(failure) => {
                for origin in batch.all_origins() {
                    held[origin.message].fail(failure.clone());
                }
            }
            Written::Refused { refused, .. } => {
                let mut seen = BTreeSet::new();
                for (k, error) in refused {
                    for origin in batch.origins[k].iter().copied() {
                        if seen.insert(origin) {
                            let row = format!("{:?}", batch.rows[k].row_key());
                            storage_refused(ctx, held, origin, &row, &error, now);
                        }
                    }
                }
            }
        }
    }
    // Late by when the rows were written, not when they were read: only a row written after
    // the sweep may have missed it.
    let written_at = now_ms();
    let late = hours
        .into_iter()
        .filter(|((_, hour), _)| {
            hour + schemas::rollup::HOUR_MS + schemas::rollup::MARK_AFTER_MS <= written_at
        })
        .collect();
    mark_late(ctx, late, held, write_by).await;
    register(ctx, latest, &carriers, held, write_by).await;
    if !watched.is_empty() {
        judge(ctx, &rules, watched, held, write_by).await;
    }
}

/// Devices judged against the alarm rules at once.
const JUDGED_AT_ONCE: usize = 32;

/// Judges the devices of a group that alarm rules watch, once their readings are stored (from
/// the stored readings, so a failed write of one message is judged when it is redone, if
/// still the newest). A device that cannot be judged holds back the messages carrying its
/// readings; it never poisons them.
async fn judge(
    ctx: &Ctx,
    rules: &[schemas::alarm::Rule],
    watched: BTreeMap<String, crate::alarms::Watched>,
    held: &mut [Leased],
    deadline: Instant,
) {
    let carriers: BTreeSet<usize> = watched
        .values()
        .flat_map(|w| w.messages.iter().copied())
        .collect();
    let (work, active) = match ctx.alarms.work(watched, rules, deadline).await {
        Ok(work) => work,
        Err(error) => {
            let failure = Failure::Storage {
                stage: Stage::Alarm,
                error,
            };
            tracing::warn!(error = %failure, "Cannot read the active alarms; the messages of the devices rules watch will be redone.");
            for message in carriers {
                held[message].fail(failure.clone());
            }
            return;
        }
    };
    let active = &active;
    let mut rest = work.iter();
    let mut running = futures::stream::FuturesUnordered::new();
    loop {
        while running.len() < JUDGED_AT_ONCE {
            let Some((device, work)) = rest.next() else {
                break;
            };
            running.push(async move {
                let judged = ctx
                    .alarms
                    .judge(&ctx.table, rules, active, device, work, deadline)
                    .await;
                (device, work, judged)
            });
        }
        let Some((device, work, judged)) = futures::StreamExt::next(&mut running).await else {
            break;
        };
        let failure = match judged {
            Ok(()) => continue,
            Err(crate::alarms::Judged::Storage(error)) => Failure::Storage {
                stage: Stage::Alarm,
                error,
            },
            Err(crate::alarms::Judged::Contended) => Failure::Refused {
                stage: Stage::Alarm,
                table: ctx.alarms.table.name().to_owned(),
                refusal: infra::storage::Refusal::Transient(412),
            },
        };
        tracing::warn!(device = %device, error = %failure, "Cannot judge a device's readings against the alarm rules; its messages will be redone.");
        for &message in &work.messages {
            held[message].fail(failure.clone());
        }
    }
}

/// The device-hours of `rows`, with the messages carrying them.
fn device_hours(rows: &[(Origin, Pending)]) -> BTreeMap<(String, i64), BTreeSet<usize>> {
    let hour = schemas::rollup::Interval::Hour;
    let mut hours: BTreeMap<(String, i64), BTreeSet<usize>> = BTreeMap::new();
    for (origin, row) in rows {
        let at = hour.floor(row.reading.measured_at_ms);
        hours
            .entry((row.reading.device_id.clone(), at))
            .or_default()
            .insert(origin.message);
    }
    hours
}

/// Marks the late device-hours in the rollup table (up to 100 per transaction, one per mark
/// partition). A message whose mark failed stays, to be redone: its readings would otherwise
/// be missing from their hour's rollup for good.
async fn mark_late(
    ctx: &Ctx,
    late: BTreeMap<(String, i64), BTreeSet<usize>>,
    held: &mut [Leased],
    deadline: Instant,
) {
    if late.is_empty() {
        return;
    }
    let mut by_partition: BTreeMap<String, Vec<(infra::storage::Entity, BTreeSet<usize>)>> =
        BTreeMap::new();
    for ((device, hour), messages) in late {
        let mark = schemas::rollup::mark(&device, hour);
        let partition = mark["PartitionKey"].as_str().unwrap_or_default().to_owned();
        by_partition
            .entry(partition)
            .or_default()
            .push((mark, messages));
    }
    for chunk in by_partition.values().flat_map(|marks| marks.chunks(100)) {
        let marks: Vec<infra::storage::Entity> = chunk.iter().map(|(m, _)| m.clone()).collect();
        let failure = match retry(deadline, || ctx.rollups.upsert_batch(&marks)).await {
            Ok(infra::storage::BatchOutcome::Committed) => {
                metrics::counter!(m::LATE_HOURS).increment(marks.len() as u64);
                continue;
            }
            Ok(infra::storage::BatchOutcome::Rejected(refusal)) => Failure::Refused {
                stage: Stage::Rollup,
                table: ctx.rollups.name().to_owned(),
                refusal,
            },
            Err(error) => Failure::Storage {
                stage: Stage::Rollup,
                error,
            },
        };
        for (_, messages) in chunk {
            for &i in messages {
                held[i].fail(failure.clone());
            }
        }
    }
}

/// Keeps each message that could not be wholly decoded in the quarantine queue, as it is,
/// before anything lets it leave the ingest queue.
async fn quarantine(ctx: &Ctx, held: &mut [Leased], deadline: Instant) {
    for h in held
        .iter_mut()
        .filter(|h| h.sorted.keep == Keep::Quarantine)
    {
        let text = &h.message.text;
        match retry(deadline, || ctx.quarantine.put(text.clone())).await {
            Ok(()) => {
                metrics::counter!(m::QUARANTINED).increment(1);
                tracing::warn!(id = %h.message.id, queue = ctx.quarantine.name(), "Unreadable queue message kept whole in quarantine.");
            }
            Err(error) => h.fail(Failure::Storage {
                stage: Stage::Quarantine,
                error,
            }),
        }
    }
}

/// Dead-letters one reading the table refused for its content.
fn storage_refused(
    ctx: &Ctx,
    held: &mut [Leased],
    origin: Origin,
    row: &str,
    error: &str,
    now: i64,
) {
    let h = &mut held[origin.message];
    let attempts = h.message.dequeue_count;
    let record = classify::record(
        &ctx.rules,
        &h.devices()[origin.device],
        Reason::StorageRejected,
        format!("row {row} refused by Table Storage: {error}"),
        Vec::new(),
        attempts,
        now,
    );
    h.sorted.refusals.push(record);
}

/// Registration transactions of one round in flight at once (a round of fresh devices, as a
/// fleet comes online, has a transaction per 100 of them).
const REGISTRATIONS_AT_ONCE: usize = 4;

/// Writes the device-table rows of devices not known to have one (seen for the first time, or
/// forgotten by the bounded cache), so the archiver can find their partitions, before any
/// message carrying their readings is deleted. A device whose row
/// cannot be written holds back only the messages that carry it.
async fn register(
    ctx: &Ctx,
    latest: devices::Latest,
    carriers: &HashMap<String, BTreeSet<usize>>,
    held: &mut [Leased],
    deadline: Instant,
) {
    let chunks = ctx.devices.note(latest);
    let mut failed = Vec::new();
    let mut rest = chunks.iter();
    let mut running = futures::stream::FuturesUnordered::new();
    loop {
        while running.len() < REGISTRATIONS_AT_ONCE {
            let Some(devices) = rest.next() else { break };
            running.push(ctx.devices.register(devices, deadline));
        }
        match futures::StreamExt::next(&mut running).await {
            Some(more) => failed.extend(more),
            None => break,
        }
    }
    for (id, trouble) in failed {
        let failure = match trouble {
            RegisterError::Storage(error) => Failure::Storage {
                stage: Stage::Register,
                error,
            },
            RegisterError::Refused(refusal) => Failure::Refused {
                stage: Stage::Register,
                table: ctx.devices.table.name().to_owned(),
                refusal,
            },
        };
        tracing::warn!(device = %id, error = %failure, "Cannot register a device; its messages will be redone.");
        if failure.blames_content() {
            ctx.refused_device(&id, &failure.to_string());
        }
        for &message in carriers.get(&id).into_iter().flatten() {
            held[message].fail(failure.clone());
        }
    }
}

/// On its last allowed delivery, a message still failing to write its readings for a
/// transient reason is dead-lettered whole (each device message as `poison`), so the queue
/// moves on and a replay can restore it.
fn poison(ctx: &Ctx, held: &mut [Leased], now: i64) {
    if !ctx.may_poison() {
        return;
    }
    let mut poisoned = 0;
    for h in held.iter_mut() {
        let Some(failure) = h.failure.as_ref() else {
            continue;
        };
        if !failure.may_poison() || h.message.dequeue_count < ctx.max_deliveries {
            continue;
        }
        let detail = format!(
            "gave up after {} deliveries: {failure}",
            h.message.dequeue_count
        );
        let attempts = h.message.dequeue_count;
        let records: Vec<_> = h
            .devices()
            .iter()
            .map(|device| {
                let (reason, detail) = (Reason::Poison, detail.clone());
                classify::record(
                    &ctx.rules,
                    device,
                    reason,
                    detail,
                    Vec::new(),
                    attempts,
                    now,
                )
            })
            .collect();
        h.sorted.refusals.extend(records);
        h.failure = None;
        poisoned += 1;
    }
    if poisoned > 0 {
        tracing::warn!(messages = poisoned, "Dead-lettering poison messages.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infra::storage::{ErrorKind, StorageError};

    fn held() -> Leased {
        Leased {
            message: QueueMessage {
                id: "m".into(),
                pop_receipt: "r".into(),
                dequeue_count: 9,
                expires_at_ms: 0,
                text: String::new(),
            },
            sorted: Sorted {
                received_at_ms: Vec::new(),
                refusals: Vec::new(),
                keep: Keep::Quarantine,
            },
            failure: None,
            devices: None,
        }
    }

    fn busy(stage: Stage) -> Failure {
        Failure::Storage {
            stage,
            error: StorageError {
                op: "test",
                kind: ErrorKind::OutOfTime,
            },
        }
    }

    #[test]
    fn a_failure_that_forbids_poison_is_not_overwritten_by_one_that_allows_it() {
        // A slow quarantine put, then writes out of time: still never poisoned (its text is
        // kept nowhere else).
        let mut h = held();
        h.fail(busy(Stage::Quarantine));
        h.fail(busy(Stage::Write));
        assert_eq!(
            h.failure.as_ref().map(Failure::stage),
            Some(Stage::Quarantine)
        );
        assert!(!h.failure.as_ref().unwrap().may_poison());
        let mut h = held();
        h.fail(busy(Stage::Write));
        h.fail(busy(Stage::Register));
        assert!(!h.failure.as_ref().unwrap().may_poison());
    }
}
