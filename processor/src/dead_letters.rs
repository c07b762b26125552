//! The dead-letter writer: records from every round, packed many per queue message.
//!
//! A round hands over each finished queue message that has dead letters, with its records,
//! and moves on; it waits only while the writer holds [`MAX_PENDING`] messages
//! (backpressure). The writer gathers submissions for up to the linger (or until a batch is
//! large), packs all their records into as few dead-letter messages as fit, puts them, and
//! only then deletes each submitted queue message whose records were all put. A failed put leaves
//! its queue messages to reappear and be redone; a crash before the put does the same.
//!
//! A put is not cut short by its messages' visibility: cancelled, it could still land, and the
//! redone message would write its records again. It runs for up to one more visibility
//! timeout, and a message that comes back meanwhile is left to wait for its outcome
//! ([`DeadLettered::claim`]).
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
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;
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

/// What this process knows of its dead letters, by identity ([`DeadLetter::identity`]): the
/// records it wrote most recently, and those handed to the writer whose put has no outcome
/// yet. A message that comes back after its records were written (its delete failed, its
/// round ran out of time) is settled without writing them twice; one that comes back while
/// they are being written (a slow put outlived the message's visibility) waits for the put.
/// Memory only: a restarted processor writes them again (a duplicate the operator's tool
/// shows once).
#[derive(Debug)]
pub struct DeadLettered {
    written: Recent,
    /// Claimed by a submission and not yet put or given up, with how many claims hold each.
    /// Bounded by what the writer holds ([`MAX_PENDING`] messages).
    writing: HashMap<u64, u32>,
}

impl Default for DeadLettered {
    fn default() -> Self {
        Self {
            written: Recent::new(REMEMBERED),
            writing: HashMap::new(),
        }
    }
}

/// Some of a message's records are in a put that has not ended.
#[derive(Debug, PartialEq, Eq)]
pub struct InFlight;

impl DeadLettered {
    /// Claims `records` for a submission: those already written are left out, and the rest
    /// are in flight until [`DeadLettered::settle`]. Claims none if any is in flight already.
    pub fn claim(&mut self, records: Vec<DeadLetter>) -> Result<Vec<DeadLetter>, InFlight> {
        if records
            .iter()
            .any(|r| self.writing.contains_key(&r.identity()))
        {
            return Err(InFlight);
        }
        let before = records.len();
        let left: Vec<DeadLetter> = records
            .into_iter()
            .filter(|r| !self.written.contains(r.identity()))
            .collect();
        let skipped = (before - left.len()) as u64;
        if skipped > 0 {
            metrics::counter!(m::DEAD_LETTERS_ALREADY_WRITTEN).increment(skipped);
        }
        for r in &left {
            *self.writing.entry(r.identity()).or_default() += 1;
        }
        Ok(left)
    }

    /// Ends a claim on `identity`: its put succeeded (`written`) or will not be tried again.
    pub fn settle(&mut self, identity: u64, written: bool) {
        if let Entry::Occupied(mut claims) = self.writing.entry(identity) {
            *claims.get_mut() -= 1;
            if *claims.get() == 0 {
                claims.remove();
            }
        }
        if written {
            self.written.remember(identity);
        }
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
    ctx: Arc<Ctx>,
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
        let task = tokio::spawn(run(ctx.clone(), rx, linger, closing));
        let room = Arc::new(Semaphore::new(MAX_PENDING));
        (Self { ctx, tx, room }, task)
    }

    /// Hands a message over, once there is room; its records are claimed
    /// ([`DeadLettered::claim`]).
    pub async fn submit(&self, submission: Submission) {
        let permit = self
            .room
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        // The receiver lives until `closing` and an empty channel; rounds end before that.
        if let Err(lost) = self.tx.send((submission, permit)) {
            let lost = (lost.0).0;
            tracing::warn!(id = %lost.message.id, "Dead-letter writer gone; the message will be redone.");
            let mut known = self.ctx.dead_letters_known();
            for r in &lost.records {
                known.settle(r.identity(), false);
            }
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
        // Closing, no put outlives its messages: another process redoes them, and this one's
        // memory of what it wrote ends with it.
        flush(&ctx, pending, !closing.is_cancelled()).await;
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
/// `extend`: a put may outlive its messages' deadline by up to one visibility timeout.
async fn flush(ctx: &Ctx, pending: Vec<Submission>, extend: bool) {
    // The messages' deadline, or one more visibility timeout if that is later (see above).
    let deadline = pending
        .iter()
        .map(|s| s.deadline)
        .min()
        .unwrap_or_else(Instant::now);
    let put_by = if extend {
        deadline.max(Instant::now() + ctx.visibility)
    } else {
        deadline
    };
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
            let put = retry(put_by, || ctx.dead_letters.put(text.clone())).await;
            (records, put)
        })
        .buffer_unordered(ctx.write_concurrency.max(1))
        .collect()
        .await;
    let mut failed: Vec<Option<Failure>> = vec![None; pending.len()];
    for (i, _) in unpacked.iter().enumerate().filter(|(_, u)| **u) {
        failed[owners[i]] = Some(Failure::Unpacked);
    }
    let mut written = vec![false; owners.len()];
    for (records, result) in results {
        for i in records {
            match &result {
                Ok(()) => {
                    metrics::counter!(m::DEAD_LETTERS, "reason" => reasons[i]).increment(1);
                    written[i] = true;
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
        let mut known = ctx.dead_letters_known();
        for (identity, written) in identities.into_iter().zip(written) {
            known.settle(identity, written);
        }
    }
    // A put that outlived the deadline still leaves time for the deletes. Deleting after the
    // visibility ran out is safe: a message taken again meanwhile has a new pop receipt, and
    // its taker finds the records written.
    let delete_by = Instant::now() + FLUSH_RESERVE;
    stream::iter(pending.into_iter().zip(failed))
        .for_each_concurrent(ctx.write_concurrency.max(1), |(s, failure)| async move {
            match failure {
                Some(failure) => settle::leave(&s.message, &failure),
                None => {
                    let by = s.deadline.max(delete_by);
                    settle::finished(ctx, &s.message, &s.devices, by, s.stored_at_ms).await;
                }
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::dead_letter::Refusal;
    use schemas::Reason;

    fn record(received_at_ms: i64, attempts: u64) -> DeadLetter {
        let msg = DeviceMessage::from_mqtt("devices/d-1/telemetry", b"{}", received_at_ms);
        DeadLetter::new(
            &msg,
            Refusal {
                reason: Reason::Schema,
                detail: "missing temperature".into(),
                device_id: Some("d-1".into()),
                rejected_indexes: vec![],
                attempts,
                dead_lettered_at_ms: received_at_ms + 1,
            },
        )
    }

    #[test]
    fn a_redelivery_waits_while_its_records_are_being_written_and_skips_them_once_written() {
        let mut known = DeadLettered::default();
        let claimed = known.claim(vec![record(1, 1), record(2, 1)]).unwrap();
        assert_eq!(claimed.len(), 2);
        // The message came back while the put runs: nothing is claimed twice.
        assert_eq!(known.claim(vec![record(1, 2), record(2, 2)]), Err(InFlight));
        assert_eq!(known.claim(vec![record(3, 2), record(2, 2)]), Err(InFlight));
        for r in &claimed {
            known.settle(r.identity(), true);
        }
        assert_eq!(known.claim(vec![record(1, 3), record(2, 3)]), Ok(vec![]));
        assert!(known.writing.is_empty());
    }

    #[test]
    fn a_failed_put_lets_the_redelivery_write_its_records() {
        let mut known = DeadLettered::default();
        let claimed = known.claim(vec![record(1, 1)]).unwrap();
        known.settle(claimed[0].identity(), false);
        let again = known.claim(vec![record(1, 2)]).unwrap();
        assert_eq!(again.len(), 1, "not written: written by the redelivery");
        known.settle(again[0].identity(), true);
        assert!(known.writing.is_empty());
    }
}
