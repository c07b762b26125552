//! The fetcher that feeds the workers, and the round a worker runs on each get of up to 32
//! queue messages.
//!
//! A round: decode every envelope, validate every reading, write the valid ones grouped by
//! partition, and delete each queue message whose readings are all stored; a message with
//! refused readings goes to the dead-letter writer ([`crate::dead_letters`]), which deletes it
//! once their records are written. A message with any failure is
//! left alone; it reappears after the visibility timeout and is redone (upserts make that
//! harmless). On its last allowed delivery, a message still failing for a transient reason
//! is dead-lettered as `poison`; one failing because storage refuses the processor (403, a
//! missing table: [`StorageError::needs_operator`]) is never, and no reading is blamed for
//! it: readiness names the error and the fetcher slows down until the operator fixes it.

use crate::dead_letters::{Submission, Writer};
use crate::devices::{self, Registry};
use crate::metrics_names as m;
use crate::plan::{plan, Batch};
use futures::{stream, StreamExt};
use infra::retry::Backoff;
use infra::serve::Health;
use infra::storage::{BatchOutcome, Entity, Queue, QueueMessage, StorageError, Table};
use schemas::dead_letter::{DeadLetter, Refusal};
use schemas::envelope::{self, DeviceMessage};
use schemas::reading::{self, Policy, Rejection};
use schemas::timefmt::now_ms;
use schemas::Reason;
use std::collections::BTreeSet;
use std::sync::{Arc, PoisonError};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Most rejections spelled out in one dead-letter detail.
const DETAIL_REJECTIONS: usize = 10;

/// Everything a worker needs; shared by all workers.
#[derive(Debug)]
pub struct Ctx {
    pub queue: Queue,
    pub dead_letters: Queue,
    pub table: Table,
    pub devices: Registry,
    pub topic_prefix: String,
    pub policy: Policy,
    pub visibility: Duration,
    pub max_deliveries: u64,
    pub write_concurrency: usize,
    /// Table writes in flight across all rounds (`write_concurrency` permits): a backlog
    /// fills every worker, and more concurrent requests than storage serves only queue there
    /// until they time out and are redone.
    pub writes: tokio::sync::Semaphore,
    pub health: Health,
    /// Set while storage refuses this processor for a reason only the operator can fix (a
    /// credential without a right, a missing table): the fetcher then spaces its gets by this
    /// growing pause instead of cycling the queue through rounds that cannot succeed.
    pub stalled: std::sync::Mutex<Option<Backoff>>,
    /// No message is given up as `poison` before this: a while after start and after every
    /// stall, deliveries counted while storage refused the processor (or before a restart
    /// with a fixed credential) must not make a first transient error fatal.
    pub poison_from: std::sync::Mutex<Instant>,
}

/// How long poisoning waits after start and after a stall: as long as it takes a message to
/// use up its deliveries.
pub fn poison_grace(visibility: Duration, max_deliveries: u64) -> Duration {
    visibility.saturating_mul(u32::try_from(max_deliveries).unwrap_or(u32::MAX))
}

/// The readiness key of storage trouble met by rounds.
const STORAGE_TROUBLE: &str = "storage";

impl Ctx {
    /// A round met an error only the operator can fix: readiness says which, and the fetcher
    /// slows down. Nothing is dead-lettered or deleted for it.
    pub(crate) fn needs_operator(&self, error: &str) {
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
    fn storage_works(&self) {
        let mut stalled = self.stalled.lock().unwrap_or_else(PoisonError::into_inner);
        if stalled.take().is_some() {
            tracing::info!("Storage serves the processor again.");
        }
        self.health.recover(STORAGE_TROUBLE);
    }

    /// The pause before the next get while stalled.
    fn stall_delay(&self) -> Option<Duration> {
        let mut stalled = self.stalled.lock().unwrap_or_else(PoisonError::into_inner);
        stalled.as_mut().map(Backoff::next_delay)
    }
}

/// How the fetcher takes messages.
#[derive(Debug, Clone, Copy)]
pub struct Fetch {
    /// Rounds in progress at once.
    pub workers: usize,
    /// Queue text one round takes under backlog (gets of 32 while they come back full), in
    /// bytes; a round may exceed it by one get.
    pub round_bytes: usize,
    /// Pause after a get that came back short.
    pub batch_wait: Duration,
}

/// Takes messages and hands them to rounds until `shutdown`; rounds in progress finish.
///
/// One fetcher serves every worker: it gets messages only when a worker is free, so storage
/// sees one get per round under load instead of one per worker per poll. Under backlog (gets
/// come back full) it keeps getting, up to `round_bytes` of queue text, so that one round holds many
/// envelopes and can write a device's readings from all of them in one transaction. A get that
/// comes back short means there is no backlog: the fetcher then waits `batch_wait` so the next
/// get finds a fuller queue, which bounds both the gets per reading and the latency it adds.
/// An empty queue is polled with a backoff up to 1 s.
pub async fn run(ctx: Arc<Ctx>, writer: Writer, fetch: Fetch, shutdown: CancellationToken) {
    let free = Arc::new(tokio::sync::Semaphore::new(fetch.workers.max(1)));
    let rounds = tokio_util::task::TaskTracker::new();
    let mut idle = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let mut failing = Backoff::default();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = free.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        if let Some(pause) = ctx.stall_delay() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        let delay = match take(&ctx, fetch.round_bytes).await {
            Ok((messages, _)) if messages.is_empty() => {
                failing.reset();
                ctx.health.set_ready();
                idle.next_delay()
            }
            Ok((messages, backlog)) => {
                failing.reset();
                idle.reset();
                ctx.health.set_ready();
                let (ctx, writer) = (ctx.clone(), writer.clone());
                rounds.spawn(async move {
                    let started = std::time::Instant::now();
                    round(&ctx, &writer, messages).await;
                    metrics::histogram!(m::ROUND_SECONDS).record(started.elapsed().as_secs_f64());
                    drop(permit);
                });
                if backlog {
                    continue;
                }
                fetch.batch_wait
            }
            Err(error) => {
                metrics::counter!(m::STORAGE_ERRORS).increment(1);
                ctx.health
                    .set_not_ready(format!("queue {} unavailable: {error}", ctx.queue.name()));
                let delay = failing.next_delay();
                tracing::warn!(%error, retry_in = ?delay, "Cannot read the ingest queue.");
                delay
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    rounds.close();
    rounds.wait().await;
}

/// Messages in gets of 32 while they come back full, until they hold `max_bytes` of text
/// (full envelopes, 64 KiB each, reach 1 MiB in one get; small ones take several gets). Also
/// says whether the last get was full (a backlog). A failed get after some succeeded ends the
/// take with what it has.
async fn take(ctx: &Ctx, max_bytes: usize) -> Result<(Vec<QueueMessage>, bool), StorageError> {
    let mut messages = Vec::new();
    let mut bytes = 0;
    loop {
        let got = match ctx.queue.get(32, ctx.visibility).await {
            Ok(got) => got,
            Err(error) if messages.is_empty() => return Err(error),
            Err(error) => {
                metrics::counter!(m::STORAGE_ERRORS).increment(1);
                tracing::warn!(%error, "A get failed; the round goes on with what it has.");
                return Ok((messages, false));
            }
        };
        let full = got.len() == 32;
        bytes += got.iter().map(|m| m.text.len()).sum::<usize>();
        messages.extend(got);
        if !full || bytes >= max_bytes {
            return Ok((messages, full));
        }
    }
}

/// A queue message and what became of it this round.
struct Held {
    message: QueueMessage,
    devices: Vec<DeviceMessage>,
    /// The last error that keeps this message from being finished.
    failure: Option<Failure>,
}

/// Why a message cannot be finished this round.
#[derive(Debug, Clone)]
struct Failure {
    error: String,
    /// Only the operator can fix it (403, a missing table): the message is never given up
    /// as poison for it.
    needs_operator: bool,
}

impl Held {
    /// Records a failure; one only the operator can fix outweighs a transient one, so a
    /// message is never poisoned for a round that storage refused.
    fn fail(&mut self, failure: Failure) {
        match &self.failure {
            Some(held) if held.needs_operator && !failure.needs_operator => {}
            _ => self.failure = Some(failure),
        }
    }
}

impl Failure {
    fn of(error: &StorageError) -> Self {
        Self {
            error: error.to_string(),
            needs_operator: error.needs_operator(),
        }
    }
}

/// A dead letter to write, and the queue message it belongs to.
struct Pending {
    owner: usize,
    record: DeadLetter,
}

#[tracing::instrument(skip_all, fields(messages = messages.len()))]
async fn round(ctx: &Ctx, writer: &Writer, messages: Vec<QueueMessage>) {
    // Retries stop here, so the message is finished or released before it reappears.
    let deadline = Instant::now() + ctx.visibility / 2;
    let now = schemas::timefmt::now_ms();
    let mut held = Vec::with_capacity(messages.len());
    let mut dead = Vec::new();
    let mut rows: Vec<((usize, usize), Entity)> = Vec::new();
    let mut latest = devices::Latest::new();

    for (owner, message) in messages.into_iter().enumerate() {
        let devices = match envelope::decode(&message.text) {
            Ok(devices) => devices,
            Err(error) => {
                tracing::warn!(%error, id = %message.id, "Unreadable queue message; dead-lettering it.");
                let record = DeadLetter::for_unreadable(
                    &message.text,
                    error.to_string(),
                    message.dequeue_count,
                    now,
                );
                dead.push(Pending { owner, record });
                Vec::new()
            }
        };
        // A message past its delivery limit is still validated and written: earlier attempts
        // may have failed for reasons that are gone (storage refused the processor, or
        // was down), and its valid readings must not be dead-lettered unseen.
        for (index, device) in devices.iter().enumerate() {
            let outcome = reading::validate(
                &ctx.topic_prefix,
                &device.topic,
                &device.payload,
                device.original_len,
                now,
                &ctx.policy,
                &device.overrides,
            );
            for r in &outcome.readings {
                devices::keep_newest(&mut latest, r, device.received_at_ms);
                rows.push((
                    (owner, index),
                    schemas::entity::to_entity(r, device.received_at_ms),
                ));
            }
            if !outcome.rejections.is_empty() {
                let record = refuse(ctx, device, &outcome.rejections, message.dequeue_count, now);
                dead.push(Pending { owner, record });
            }
        }
        held.push(Held {
            message,
            devices,
            failure: None,
        });
    }

    write_rows(ctx, rows, &mut held, &mut dead, deadline, now).await;
    if let Err(failure) = register_devices(ctx, latest, deadline).await {
        tracing::warn!(error = %failure.error, "Cannot register new devices; the round will be redone.");
        for h in &mut held {
            h.fail(failure.clone());
        }
    }
    match held
        .iter()
        .filter_map(|h| h.failure.as_ref())
        .find(|f| f.needs_operator)
    {
        Some(failure) => ctx.needs_operator(&failure.error),
        None if held.iter().all(|h| h.failure.is_none()) => ctx.storage_works(),
        None => {}
    }

    // Last allowed delivery and still failing for a transient reason: dead-letter it whole,
    // so the queue moves on. A failure only the operator can fix never poisons a message.
    let mut poisoned = 0;
    let may_poison = Instant::now()
        >= *ctx
            .poison_from
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
    for (owner, h) in held.iter_mut().enumerate() {
        if !may_poison {
            break;
        }
        let Some(Failure {
            error,
            needs_operator: false,
        }) = h.failure.clone()
        else {
            continue;
        };
        if h.message.dequeue_count < ctx.max_deliveries {
            continue;
        }
        for device in &h.devices {
            let record = DeadLetter::new(
                device,
                Refusal {
                    reason: Reason::Poison,
                    detail: format!(
                        "gave up after {} deliveries: {error}",
                        h.message.dequeue_count
                    ),
                    device_id: topic_device(ctx, device),
                    rejected_indexes: Vec::new(),
                    attempts: h.message.dequeue_count,
                    dead_lettered_at_ms: now,
                },
            );
            dead.push(Pending { owner, record });
        }
        h.failure = None;
        poisoned += 1;
    }
    if poisoned > 0 {
        tracing::warn!(messages = poisoned, "Dead-lettering poison messages.");
    }

    // A message with dead letters goes to the writer, which deletes it once they are written;
    // one without is deleted here. A failing one is left to reappear, dead letters unwritten
    // (its redo finds them again).
    let mut records: Vec<Vec<DeadLetter>> = held.iter().map(|_| Vec::new()).collect();
    for p in dead {
        records[p.owner].push(p.record);
    }
    for (h, records) in held.into_iter().zip(records) {
        if let Some(failure) = &h.failure {
            metrics::counter!(m::MESSAGES_RETRIED).increment(1);
            tracing::warn!(id = %h.message.id, deliveries = h.message.dequeue_count, error = %failure.error, "Leaving the message to reappear.");
        } else if records.is_empty() {
            finished(ctx, &h.message, &h.devices, deadline, now_ms()).await;
        } else {
            writer
                .submit(Submission {
                    message: h.message,
                    devices: h.devices,
                    records,
                    deadline,
                    stored_at_ms: now_ms(),
                })
                .await;
        }
    }
}

/// Deletes a queue message whose every reading is stored or dead-lettered; `stored_at_ms` is
/// when the round finished storing its readings (the latency the metric reports).
pub(crate) async fn finished(
    ctx: &Ctx,
    message: &QueueMessage,
    devices: &[DeviceMessage],
    deadline: Instant,
    stored_at_ms: i64,
) {
    match retry(deadline, || ctx.queue.delete(message)).await {
        Ok(()) => {
            metrics::counter!(m::MESSAGES_DONE).increment(1);
            for d in devices {
                let seconds = (stored_at_ms - d.received_at_ms).max(0) as f64 / 1000.0;
                metrics::histogram!(m::LATENCY_SECONDS).record(seconds);
            }
        }
        // Deleted or retaken meanwhile: another worker has it, and its redo is harmless.
        Err(error) if matches!(error.status(), Some(400 | 404)) => {
            tracing::debug!(%error, "Message already gone or retaken.");
        }
        Err(error) => {
            if error.needs_operator() {
                ctx.needs_operator(&error.to_string());
            }
            tracing::warn!(%error, "Cannot delete a finished message; it will be redone.");
        }
    }
}

/// Writes the device-table rows of devices seen for the first time, so the archiver can find
/// their partitions, before any message carrying their readings is deleted.
async fn register_devices(
    ctx: &Ctx,
    latest: devices::Latest,
    deadline: Instant,
) -> Result<(), Failure> {
    for rows in ctx.devices.note(latest) {
        match retry(deadline, || ctx.devices.table.merge_batch(&rows)).await {
            Ok(BatchOutcome::Committed) => ctx.devices.registered(&rows),
            Ok(BatchOutcome::Rejected { status }) => {
                return Err(Failure {
                    error: format!(
                        "device rows refused by table {} with HTTP {status}",
                        ctx.devices.table.name()
                    ),
                    needs_operator: !matches!(status, 400 | 413),
                })
            }
            Err(e) => return Err(Failure::of(&e)),
        }
    }
    Ok(())
}

/// The dead-letter record for a device message with refused readings.
fn refuse(
    ctx: &Ctx,
    device: &DeviceMessage,
    rejections: &[Rejection],
    attempts: u64,
    now: i64,
) -> DeadLetter {
    let first = &rejections[0];
    let detail = if rejections.len() == 1 && first.index.is_none() {
        first.detail.clone()
    } else {
        let mut parts: Vec<String> = rejections
            .iter()
            .take(DETAIL_REJECTIONS)
            .map(|r| match r.index {
                Some(i) => format!("[{i}] {}: {}", r.reason, r.detail),
                None => format!("{}: {}", r.reason, r.detail),
            })
            .collect();
        if rejections.len() > DETAIL_REJECTIONS {
            parts.push(format!("and {} more", rejections.len() - DETAIL_REJECTIONS));
        }
        parts.join("; ")
    };
    DeadLetter::new(
        device,
        Refusal {
            reason: first.reason,
            detail,
            device_id: topic_device(ctx, device),
            rejected_indexes: rejections.iter().filter_map(|r| r.index).collect(),
            attempts,
            dead_lettered_at_ms: now,
        },
    )
}

fn topic_device(ctx: &Ctx, device: &DeviceMessage) -> Option<String> {
    reading::device_id_from_topic(&ctx.topic_prefix, &device.topic)
        .filter(|id| reading::is_valid_device_id(id))
        .map(str::to_owned)
}

/// What a table write came to.
enum Written {
    Stored(usize),
    /// Try the whole queue message again later.
    Retry(Failure),
    /// These entities were refused outright (after the others were stored one by one).
    Refused(usize, Vec<(usize, String)>),
}

async fn write_rows(
    ctx: &Ctx,
    rows: Vec<((usize, usize), Entity)>,
    held: &mut [Held],
    dead: &mut Vec<Pending>,
    deadline: Instant,
    now: i64,
) {
    let batches = plan(rows);
    let results: Vec<(Batch<(usize, usize)>, Written)> = stream::iter(batches)
        .map(|batch| async move {
            let permit = ctx.writes.acquire().await;
            let written = write_batch(ctx, &batch, deadline).await;
            drop(permit);
            // Counted as each write lands, not when the round ends, so the rate is live.
            if let Written::Stored(n) | Written::Refused(n, _) = &written {
                metrics::counter!(m::STORED).increment(*n as u64);
            }
            (batch, written)
        })
        .buffer_unordered(ctx.write_concurrency.max(1))
        .collect()
        .await;
    for (batch, written) in results {
        match written {
            Written::Stored(_) => {}
            Written::Retry(failure) => {
                for (owner, _) in batch.all_origins() {
                    held[owner].fail(failure.clone());
                }
            }
            Written::Refused(_, refused) => {
                let mut seen = BTreeSet::new();
                for (k, error) in refused {
                    for (owner, index) in batch.origins[k].iter().copied() {
                        if !seen.insert((owner, index)) {
                            continue;
                        }
                        let device = &held[owner].devices[index];
                        let record = DeadLetter::new(
                            device,
                            Refusal {
                                reason: Reason::StorageRejected,
                                detail: format!(
                                    "row {} refused by Table Storage: {error}",
                                    batch.entities[k]["RowKey"]
                                ),
                                device_id: topic_device(ctx, device),
                                rejected_indexes: Vec::new(),
                                attempts: held[owner].message.dequeue_count,
                                dead_lettered_at_ms: now,
                            },
                        );
                        dead.push(Pending { owner, record });
                    }
                }
            }
        }
    }
}

async fn write_batch(ctx: &Ctx, batch: &Batch<(usize, usize)>, deadline: Instant) -> Written {
    if let [entity] = batch.entities.as_slice() {
        metrics::counter!(m::TABLE_WRITES, "kind" => "single").increment(1);
        return match retry(deadline, || ctx.table.upsert(entity)).await {
            Ok(()) => Written::Stored(1),
            Err(e) if e.is_content_error() => Written::Refused(0, vec![(0, e.to_string())]),
            Err(e) => Written::Retry(Failure::of(&e)),
        };
    }
    metrics::counter!(m::TABLE_WRITES, "kind" => "batch").increment(1);
    // Only a refusal for what the batch carries (400, 413) can be one entity's fault; any
    // other leaves the whole round to be redone, and blames no reading.
    let why = match retry(deadline, || ctx.table.upsert_batch(&batch.entities)).await {
        Ok(BatchOutcome::Committed) => return Written::Stored(batch.entities.len()),
        Ok(BatchOutcome::Rejected {
            status: status @ (400 | 413),
        }) => format!("transaction refused with HTTP {status}"),
        Ok(BatchOutcome::Rejected { status }) => {
            return Written::Retry(Failure {
                error: format!(
                    "transaction refused by table {} with HTTP {status}",
                    ctx.table.name()
                ),
                needs_operator: true,
            })
        }
        Err(e) if e.is_content_error() => e.to_string(),
        Err(e) => return Written::Retry(Failure::of(&e)),
    };
    // A refused transaction wrote nothing; find the culprit by writing one at a time.
    tracing::warn!(reason = %why, entities = batch.entities.len(), "Transaction refused; writing its entities one by one.");
    let mut stored = 0;
    let mut refused = Vec::new();
    for (k, entity) in batch.entities.iter().enumerate() {
        metrics::counter!(m::TABLE_WRITES, "kind" => "single").increment(1);
        match retry(deadline, || ctx.table.upsert(entity)).await {
            Ok(()) => stored += 1,
            Err(e) if e.is_content_error() => refused.push((k, e.to_string())),
            Err(e) => return Written::Retry(Failure::of(&e)),
        }
    }
    Written::Refused(stored, refused)
}

/// Runs `op` until it succeeds, fails for good, or `deadline` passes.
pub(crate) async fn retry<T, F, Fut>(deadline: Instant, op: F) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StorageError>>,
{
    infra::retry::until_deadline(deadline, op, |_| {
        metrics::counter!(m::STORAGE_ERRORS).increment(1);
    })
    .await
}
