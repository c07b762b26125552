//! The dead-letter writer: records from every round, packed many per queue message.
//!
//! A round hands over each finished queue message that has dead letters, with its records,
//! and moves on; it waits only while the writer holds [`MAX_PENDING`] messages
//! (backpressure). The writer gathers submissions for up to the linger (or until a batch is
//! large), packs all their records into as few dead-letter messages as fit, puts them, and
//! only then deletes each submitted queue message whose records were all put. A failed put leaves
//! its queue messages to reappear and be redone; a crash before the put does the same.
//!
//! Why gather across rounds: a dead-letter queue of one record per message is expensive to
//! operate on (every walk and every removal is per message, and on the emulator each costs
//! more as the queue grows). At a trickle of faults each round has one or two records; a few
//! seconds of lingering packs dozens into a message.

use crate::ctx::{retry, Ctx};
use crate::failure::Failure;
use crate::metrics_names as m;
use crate::settle;
use futures::{stream, StreamExt};
use infra::recent::Recent;
use infra::storage::{QueueMessage, StorageError};
use schemas::{DeadLetter, DeviceMessage};
use std::sync::{Arc, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Packed text gathered before a flush, whatever the linger (about 16 full messages).
const FLUSH_BYTES: usize = 1024 * 1024;
/// Time kept before the earliest deadline of a flush's messages for the put and the deletes.
const FLUSH_RESERVE: Duration = Duration::from_secs(2);
/// Queue messages handed over and not yet finished. A round waits for room, so a writer that
/// falls behind (slow or failing dead-letter puts) slows the fetcher instead of piling up.
const MAX_PENDING: usize = 128;

/// Identities remembered by [`DeadLettered`]: about 1.5 MiB, and hours of refusals at any
/// plausible rate of bad input.
const REMEMBERED: usize = 65_536;

/// The identities ([`DeadLetter::identity`]) of the records this process wrote most recently.
/// A message whose records were written but that came back (its delete failed, or its round
/// outlived the visibility timeout) is then settled without writing them twice. Memory only:
/// a restarted processor writes them again (a duplicate the operator's tool shows once).
#[derive(Debug)]
pub struct DeadLettered(Recent);

impl Default for DeadLettered {
    fn default() -> Self {
        Self(Recent::new(REMEMBERED))
    }
}

impl DeadLettered {
    /// `records` without those already written.
    pub fn unwritten(&self, records: Vec<DeadLetter>) -> Vec<DeadLetter> {
        let before = records.len();
        let left: Vec<DeadLetter> = records
            .into_iter()
            .filter(|r| !self.0.contains(r.identity()))
            .collect();
        let skipped = (before - left.len()) as u64;
        if skipped > 0 {
            metrics::counter!(m::DEAD_LETTERS_ALREADY_WRITTEN).increment(skipped);
        }
        left
    }
}

/// A finished queue message whose dead letters are still to be written.
#[derive(Debug)]
pub struct Submission {
    pub message: QueueMessage,
    pub devices: Vec<DeviceMessage>,
    pub records: Vec<DeadLetter>,
    /// Retries stop here, so that the message is deleted before it reappears.
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
    /// (after the rounds have ended) and everything submitted is written.
    pub fn spawn(
        ctx: Arc<Ctx>,
        linger: Duration,
        closing: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(ctx, rx, linger, closing));
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
        if let Err(lost) = self.tx.send((submission, permit)) {
            tracing::warn!(id = %(lost.0).0.message.id, "Dead-letter writer gone; the message will be redone.");
        }
    }
}

async fn run(
    ctx: Arc<Ctx>,
    mut rx: mpsc::UnboundedReceiver<(Submission, OwnedSemaphorePermit)>,
    linger: Duration,
    closing: CancellationToken,
) {
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
        flush(&ctx, pending).await;
        drop(permits);
    }
}

/// Roughly the packed size of a submission's records.
fn size(s: &Submission) -> usize {
    s.records
        .iter()
        .map(|r| r.payload_bytes + r.detail.len() + 300)
        .sum()
}

/// Puts the submissions' records, then deletes each submission whose records all made it.
async fn flush(ctx: &Ctx, pending: Vec<Submission>) {
    let deadline = pending
        .iter()
        .map(|s| s.deadline)
        .min()
        .unwrap_or_else(Instant::now);
    // Which submission each record belongs to, in packing order.
    let owners: Vec<usize> = pending
        .iter()
        .enumerate()
        .flat_map(|(i, s)| std::iter::repeat_n(i, s.records.len()))
        .collect();
    let reasons: Vec<&'static str> = pending
        .iter()
        .flat_map(|s| s.records.iter().map(|r| r.reason.as_str()))
        .collect();
    let identities: Vec<u64> = pending
        .iter()
        .flat_map(|s| s.records.iter().map(DeadLetter::identity))
        .collect();
    let packed = schemas::dead_letter::pack(pending.iter().flat_map(|s| &s.records));
    // A record in no packed message was not written: its queue message must stay.
    let mut unpacked = vec![true; owners.len()];
    for i in packed.iter().flat_map(|(_, records)| records) {
        unpacked[*i] = false;
    }
    let results: Vec<(Vec<usize>, Result<(), StorageError>)> = stream::iter(packed)
        .map(|(text, records)| async move {
            let put = retry(deadline, || ctx.dead_letters.put(text.clone())).await;
            (records, put)
        })
        .buffer_unordered(ctx.write_concurrency.max(1))
        .collect()
        .await;
    let mut failed: Vec<Option<Failure>> = vec![None; pending.len()];
    for (i, _) in unpacked.iter().enumerate().filter(|(_, u)| **u) {
        failed[owners[i]] = Some(Failure::Unpacked);
    }
    let mut written = Vec::new();
    for (records, result) in results {
        for i in records {
            match &result {
                Ok(()) => {
                    metrics::counter!(m::DEAD_LETTERS, "reason" => reasons[i]).increment(1);
                    written.push(identities[i]);
                }
                Err(error) => {
                    if error.needs_operator() {
                        ctx.needs_operator(&format!(
                            "dead-letter queue {}: {error}",
                            ctx.dead_letters.name()
                        ));
                    }
                    failed[owners[i]] = Some(Failure::Storage {
                        stage: crate::failure::Stage::DeadLetter,
                        error: error.clone(),
                    });
                }
            }
        }
    }
    {
        let mut remembered = ctx
            .dead_lettered
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for identity in written {
            remembered.0.remember(identity);
        }
    }
    stream::iter(pending.into_iter().zip(failed))
        .for_each_concurrent(ctx.write_concurrency.max(1), |(s, failure)| async move {
            match failure {
                Some(failure) => settle::leave(&s.message, &failure),
                None => {
                    settle::finished(ctx, &s.message, &s.devices, s.deadline, s.stored_at_ms).await;
                }
            }
        })
        .await;
}
