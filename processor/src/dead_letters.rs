//! The dead-letter writer: records from every round, packed many per queue message.
//!
//! A round hands over each finished queue message that has dead letters, with its records,
//! and moves on; it waits only while the writer holds [`MAX_PENDING`] messages
//! (backpressure). The writer gathers submissions for up to the linger (or until a batch is
//! large), packs all their records into as few dead-letter messages as fit, puts them, and
//! only then deletes each submitted queue message whose records were all put. A failed put leaves
//! its queue messages to reappear and be redone; a crash before the put does the same.
//!
//! A put is not cut short at its messages' deadline: cancelled, it could still land, and the
//! redone message would write its records again. It may run until one visibility timeout after
//! its flush began (unless the processor is stopping), and its messages' holds are renewed
//! meanwhile ([`keep_hidden`]), so they do not reappear and are deleted as soon as the put
//! ends. Should a renewal fail, a message that comes back to this process waits for the put's
//! outcome ([`crate::claims::DeadLettered::claim`]); another replica, or this one restarted, knows nothing of
//! the put and writes the records again: at-least-once, which the operator's tool shows once.
//!
//! Beside the puts, each refused reading whose device and number can be told
//! ([`DeadLetter::refused_seqs`]) is recorded in the device's partition of the rollup table
//! ([`schemas::rollup::refusal`]), so that the gaps API shows the number as refused, with its
//! reason, rather than as missing. That record is an index, not the dead letter: it is written
//! by a task of its own (at most [`RECORDINGS`] at once, each for at most one visibility
//! timeout), which no put or delete waits for; one that finds no room, fails or runs out of
//! time is counted and logged, and holds nothing up.
//!
//! Why gather across rounds: a dead-letter queue of one record per message is expensive to
//! operate on (every walk and every removal is per message, and on the emulator each costs
//! more as the queue grows). At a trickle of faults each round has one or two records; a few
//! seconds of lingering packs dozens into a message.

use crate::claims::Claim;
use crate::ctx::{retry, Ctx};
use crate::failure::Failure;
use crate::metrics_names as m;
use crate::settle;
use futures::{stream, StreamExt};
use infra::storage::{BatchOutcome, QueueMessage, StorageError};
use schemas::DeadLetter;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Packed text gathered before a flush, whatever the linger (about 16 full messages).
const FLUSH_BYTES: usize = 1024 * 1024;
/// Time kept before the earliest deadline of a flush's messages for the put and the deletes,
/// and the least time the deletes get after a put that ran late.
const FLUSH_RESERVE: Duration = Duration::from_secs(2);
/// Queue messages handed over and not yet finished. A round waits for room, so a writer that
/// falls behind (slow or failing dead-letter puts) slows the fetcher instead of piling up.
const MAX_PENDING: usize = 128;
/// Refusal recordings under way at most; a flush that finds none free leaves its numbers
/// unrecorded (counted), rather than wait or pile up.
const RECORDINGS: usize = 4;

/// A finished queue message whose dead letters are still to be written.
#[derive(Debug)]
pub struct Submission {
    pub message: QueueMessage,
    /// When each of its device messages was received.
    pub received_at_ms: Vec<i64>,
    pub records: Vec<DeadLetter>,
    /// The claim on `records`.
    pub claim: Claim,
    /// Its round's settling deadline: the flush starts so that its put and deletes can end by
    /// then, before the message reappears.
    pub deadline: Instant,
    /// When the round had stored the message's valid readings.
    pub stored_at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<(Submission, OwnedSemaphorePermit)>,
    room: Arc<Semaphore>,
}

impl Writer {
    /// Starts the writer task. It flushes what it holds and ends once `closing` is cancelled
    /// (after the rounds have ended) and everything submitted is written. Once `shutdown` is
    /// cancelled, no put outlives its messages' deadline.
    pub fn spawn(
        ctx: Arc<Ctx>,
        linger: Duration,
        shutdown: CancellationToken,
        closing: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(ctx, rx, linger, shutdown, closing));
        let room = Arc::new(Semaphore::new(MAX_PENDING));
        (Self { tx, room }, task)
    }

    /// Hands a message over, once there is room.
    pub async fn submit(&self, submission: Submission) {
        let permit = self
            .room
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        // The receiver lives until `closing` and an empty channel; rounds end before that.
        // Dropped with its claim, which ends.
        if let Err(lost) = self.tx.send((submission, permit)) {
            tracing::warn!(id = %(lost.0).0.message.id, "Dead-letter writer gone; the message will be redone.");
        }
    }
}

async fn run(
    ctx: Arc<Ctx>,
    mut rx: mpsc::UnboundedReceiver<(Submission, OwnedSemaphorePermit)>,
    linger: Duration,
    shutdown: CancellationToken,
    closing: CancellationToken,
) {
    // Flushes run side by side: a slow one must not hold the next batch's messages past
    // their deadlines (each flush keeps its own messages hidden).
    let flushes = tokio_util::task::TaskTracker::new();
    let recordings = Arc::new(Semaphore::new(RECORDINGS));
    loop {
        let first = tokio::select! {
            biased;
            s = rx.recv() => s,
            _ = closing.cancelled() => rx.try_recv().ok(),
        };
        let Some((first, permit)) = first else { break };
        // The linger, but never so late that a message's deletes would miss its deadline: a
        // message left then reappears, is redone, and its records are written twice.
        let mut flush_at = (Instant::now() + linger).min(first.deadline - FLUSH_RESERVE);
        let mut bytes = size(&first);
        let mut pending = vec![first];
        // Released when the flush is done, making room for more.
        let mut permits = vec![permit];
        while bytes < FLUSH_BYTES {
            let next = tokio::select! {
                biased;
                s = rx.recv() => s,
                _ = closing.cancelled() => rx.try_recv().ok(),
                _ = tokio::time::sleep_until(flush_at) => None,
            };
            let Some((s, permit)) = next else { break };
            flush_at = flush_at.min(s.deadline - FLUSH_RESERVE);
            bytes += size(&s);
            pending.push(s);
            permits.push(permit);
        }
        record_refusals(&ctx, refusal_rows(&pending), &recordings, &shutdown);
        let (ctx, shutdown) = (ctx.clone(), shutdown.clone());
        flushes.spawn(async move {
            flush(&ctx, pending, &shutdown).await;
            drop(permits);
        });
    }
    flushes.close();
    flushes.wait().await;
}

/// Roughly the packed size of a submission's records.
fn size(s: &Submission) -> usize {
    s.records
        .iter()
        .map(|r| r.payload_bytes + r.detail.len() + 300)
        .sum()
}

/// Puts the submissions' records, then deletes each submission whose records all made it.
/// A put may run until one visibility timeout from now, past its messages' deadline, unless
/// `shutdown` comes first: stopping, no put outlives its messages' deadline (another process
/// redoes them, and this one's memory of what it wrote ends with it).
async fn flush(ctx: &Ctx, mut pending: Vec<Submission>, shutdown: &CancellationToken) {
    let deadline = pending
        .iter()
        .map(|s| s.deadline)
        .min()
        .unwrap_or_else(Instant::now);
    let put_by = deadline.max(Instant::now() + ctx.visibility);
    // Which submission each record belongs to, in packing order.
    let owners: Vec<(usize, usize)> = pending
        .iter()
        .enumerate()
        .flat_map(|(i, s)| (0..s.records.len()).map(move |k| (i, k)))
        .collect();
    let reasons: Vec<&'static str> = pending
        .iter()
        .flat_map(|s| s.records.iter().map(|r| r.reason.as_str()))
        .collect();
    let packed = schemas::dead_letter::pack(pending.iter().flat_map(|s| &s.records));
    // A record in no packed message was not written: its queue message must stay.
    let mut unpacked = vec![true; owners.len()];
    for i in packed.iter().flat_map(|(_, records)| records) {
        unpacked[*i] = false;
    }
    let puts_done = CancellationToken::new();
    let puts = stream::iter(packed)
        .map(|(text, records)| async move {
            let put = retry(put_by, || ctx.dead_letters.put(text.clone()));
            let stopping = async {
                shutdown.cancelled().await;
                tokio::time::sleep_until(deadline).await;
            };
            let put = tokio::select! {
                put = put => put,
                () = stopping => Err(StorageError {
                    op: "dead_letter_put",
                    kind: infra::storage::ErrorKind::OutOfTime,
                }),
            };
            (records, put)
        })
        .buffer_unordered(ctx.write_concurrency.max(1))
        .collect::<Vec<(Vec<usize>, Result<(), StorageError>)>>();
    let puts = async {
        let results = puts.await;
        puts_done.cancel();
        results
    };
    let keep =
        futures::future::join_all(pending.iter_mut().map(|s| keep_hidden(ctx, s, &puts_done)));
    let (results, _) = tokio::join!(puts, keep);
    let mut failed: Vec<Option<Failure>> = vec![None; pending.len()];
    for (i, _) in unpacked.iter().enumerate().filter(|(_, u)| **u) {
        failed[owners[i].0] = Some(Failure::Unpacked);
    }
    for (records, result) in results {
        for i in records {
            let (owner, k) = owners[i];
            match &result {
                Ok(()) => {
                    metrics::counter!(m::DEAD_LETTERS, "reason" => reasons[i]).increment(1);
                    pending[owner].claim.written(k);
                }
                Err(error) => {
                    if error.needs_operator() {
                        ctx.needs_operator(&format!(
                            "dead-letter queue {}: {error}",
                            ctx.dead_letters.name()
                        ));
                    }
                    failed[owner] = Some(Failure::Storage {
                        stage: crate::failure::Stage::DeadLetter,
                        error: error.clone(),
                    });
                }
            }
        }
    }
    // Settled before the deletes: a message that comes back now finds its records written.
    for s in &mut pending {
        s.claim.settle();
    }
    // A put that outlived the deadline still leaves time for the deletes. Deleting after the
    // visibility ran out is safe: a message taken again meanwhile has a new pop receipt, and
    // the delete fails (its taker writes or skips the records, as it knows).
    let delete_by = Instant::now() + FLUSH_RESERVE;
    stream::iter(pending.into_iter().zip(failed))
        .for_each_concurrent(ctx.write_concurrency.max(1), |(s, failure)| async move {
            match failure {
                Some(failure) => settle::leave(&s.message, &failure),
                None => {
                    let by = s.deadline.max(delete_by);
                    settle::finished(ctx, &s.message, &s.received_at_ms, by, s.stored_at_ms).await;
                }
            }
        })
        .await;
}

/// The refusal rows of the submissions' records, by device (one partition each), each number
/// once, at most a message's worth of readings per record.
fn refusal_rows(pending: &[Submission]) -> Vec<Vec<infra::storage::Entity>> {
    let now = schemas::timefmt::now_ms();
    let mut by_device: BTreeMap<&str, BTreeMap<i64, &'static str>> = BTreeMap::new();
    for r in pending.iter().flat_map(|s| &s.records) {
        let Some(device) = r.device_id.as_deref() else {
            continue;
        };
        for seq in r
            .refused_seqs()
            .into_iter()
            .take(schemas::reading::MAX_READINGS_PER_MESSAGE)
        {
            by_device
                .entry(device)
                .or_default()
                .insert(seq, r.reason.as_str());
        }
    }
    by_device
        .into_iter()
        .map(|(device, seqs)| {
            seqs.into_iter()
                .map(|(seq, reason)| schemas::rollup::refusal(device, seq, reason, now))
                .collect()
        })
        .collect()
}

/// Writes refusal rows on a task of their own, a device's in transactions of up to 100, for at
/// most one visibility timeout (and no longer than a moment once the processor stops); with no
/// room for another recording, or past its time, what is not written is counted and logged.
fn record_refusals(
    ctx: &Arc<Ctx>,
    rows: Vec<Vec<infra::storage::Entity>>,
    room: &Arc<Semaphore>,
    shutdown: &CancellationToken,
) {
    let n: u64 = rows.iter().map(|d| d.len() as u64).sum();
    if n == 0 {
        return;
    }
    let Ok(permit) = room.clone().try_acquire_owned() else {
        metrics::counter!(m::REFUSALS_UNRECORDED).increment(n);
        tracing::debug!(numbers = n, "No room to record refused readings' numbers.");
        return;
    };
    let (ctx, shutdown) = (ctx.clone(), shutdown.clone());
    tokio::spawn(async move {
        let deadline = Instant::now() + ctx.visibility;
        let recorded = std::sync::atomic::AtomicU64::new(0);
        let chunks: Vec<&[infra::storage::Entity]> = rows
            .iter()
            .flat_map(|device| device.chunks(infra::storage::MAX_BATCH_OPERATIONS))
            .collect();
        let write = stream::iter(chunks).for_each_concurrent(
            ctx.write_concurrency.max(1),
            |chunk| {
                let (ctx, recorded) = (&ctx, &recorded);
                async move {
                    match retry(deadline, || ctx.rollups.upsert_batch(chunk)).await {
                        Ok(BatchOutcome::Committed) => {
                            recorded.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok(BatchOutcome::Rejected(refusal)) => {
                            tracing::warn!(%refusal, "Refused readings' numbers not recorded; the gaps API will show them as missing.");
                        }
                        Err(error) => {
                            tracing::warn!(%error, "Refused readings' numbers not recorded; the gaps API will show them as missing.");
                        }
                    }
                }
            },
        );
        let stopping = async {
            shutdown.cancelled().await;
            tokio::time::sleep(FLUSH_RESERVE).await;
        };
        tokio::select! {
            () = write => {}
            () = stopping => {}
        }
        let done = recorded.load(std::sync::atomic::Ordering::Relaxed);
        metrics::counter!(m::REFUSALS_RECORDED).increment(done);
        metrics::counter!(m::REFUSALS_UNRECORDED).increment(n - done);
        drop(permit);
    });
}

/// While its put runs, keeps a message hidden: shortly before its deadline, its hold is
/// renewed for another visibility timeout (`Queue::hide`, the text not sent again; the new
/// pop receipt replaces the old). So a slow put does not let the message reappear, here or to
/// another replica, and its delete still follows the put at once. A renewal that fails is not
/// tried again: the message comes back, and [`Claim`] keeps this process from writing its
/// records twice (another replica writes them again). Returns once `puts_done` is cancelled,
/// after a renewal under way.
async fn keep_hidden(ctx: &Ctx, s: &mut Submission, puts_done: &CancellationToken) {
    loop {
        let renew_at = s.deadline.checked_sub(FLUSH_RESERVE).unwrap_or(s.deadline);
        tokio::select! {
            biased;
            () = puts_done.cancelled() => return,
            () = tokio::time::sleep_until(renew_at) => {}
        }
        // The hold ends an eighth of the visibility after the deadline; the new one is counted
        // from the request, not from its answer.
        let (sent, by) = (Instant::now(), s.deadline + ctx.visibility / 8);
        let renewed = retry(by, || ctx.queue.hide(&s.message, ctx.visibility)).await;
        match renewed {
            Ok(message) => {
                metrics::counter!(m::HOLDS_RENEWED).increment(1);
                s.message = message;
                s.deadline = sent + ctx.visibility / 8 * 7;
            }
            Err(error) => {
                tracing::debug!(%error, id = %s.message.id, "Cannot keep a message hidden while its dead letters are put.");
                return;
            }
        }
    }
}
