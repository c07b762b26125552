//! The fetcher that feeds the workers: it takes messages from the ingest queue whenever a
//! worker is free and starts a [`round`] on them.

use crate::ctx::Ctx;
use crate::dead_letters::Writer;
use crate::metrics_names as m;
use crate::round::round;
use infra::retry::Backoff;
use infra::storage::{QueueMessage, StorageError};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How the fetcher takes messages.
#[derive(Debug, Clone, Copy)]
pub struct Fetch {
    /// Rounds in progress at once.
    pub workers: usize,
    /// Queue text one round takes under backlog (gets while they come back full), in bytes;
    /// a round may exceed it by one message. The most: after a round that ran out of time
    /// the fetcher takes half as much, and doubles back after rounds that did not.
    pub round_bytes: usize,
    /// Pause after a get that came back short.
    pub batch_wait: Duration,
}

/// Takes messages and hands them to rounds until `shutdown`; rounds in progress finish.
///
/// One fetcher serves every worker: it gets messages only when a worker is free, so storage
/// sees one get per round under load instead of one per worker per poll. Under backlog (gets
/// come back full) it keeps getting, up to `round_bytes` of queue text, so that one round holds
/// many envelopes and can write a device's readings from all of them in one transaction. A
/// get that comes back short means there is no backlog: the fetcher then waits `batch_wait` so
/// the next get finds a fuller queue, which bounds both the gets per reading and the latency it
/// adds. An empty queue is polled with a backoff up to 1 s.
pub async fn run(ctx: Arc<Ctx>, writer: Writer, fetch: Fetch, shutdown: CancellationToken) {
    let free = Arc::new(tokio::sync::Semaphore::new(fetch.workers.max(1)));
    let rounds = tokio_util::task::TaskTracker::new();
    let mut idle = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let mut failing = Backoff::default();
    let budget = Arc::new(Budget::new(fetch.round_bytes));
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
        // No new round while the rounds held keep writes waiting for a permit (the semaphores
        // are fair: this turn comes after every write queued before it): messages storage
        // cannot take yet wait in the queue, not in this process, where they would run out
        // of time and be redone.
        tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = ctx.write_permit(0) => drop(permit),
        }
        let taken_at = Instant::now();
        let delay = match take(&ctx, budget.get()).await {
            Ok((messages, _)) if messages.is_empty() => {
                failing.reset();
                ctx.health.set_ready();
                idle.next_delay()
            }
            Ok((messages, backlog)) => {
                failing.reset();
                idle.reset();
                ctx.health.set_ready();
                let (ctx, writer, budget) = (ctx.clone(), writer.clone(), budget.clone());
                rounds.spawn(async move {
                    let started = std::time::Instant::now();
                    budget.after_round(round(&ctx, &writer, messages, taken_at).await);
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

/// Messages in gets while they come back full, until they hold `max_bytes` of text. Each get
/// asks for no more messages than the room left could hold at the queue's largest (64 KiB),
/// 32 at most and 1 at least, so a take never exceeds `max_bytes` by more than one message:
/// what a worker holds is bounded by configuration, whatever the messages' sizes. Also says
/// whether the last get was full (a backlog). A failed get after some succeeded ends the take
/// with what it has.
async fn take(ctx: &Ctx, max_bytes: usize) -> Result<(Vec<QueueMessage>, bool), StorageError> {
    let mut messages = Vec::new();
    let mut bytes = 0;
    loop {
        let left = MAX_ROUND_MESSAGES - messages.len();
        let want = per_get(max_bytes.saturating_sub(bytes)).min(u8::try_from(left).unwrap_or(32));
        let got = match ctx.queue.get(want, ctx.visibility).await {
            Ok(got) => got,
            Err(error) if messages.is_empty() => return Err(error),
            Err(error) => {
                metrics::counter!(m::STORAGE_ERRORS).increment(1);
                tracing::warn!(%error, "A get failed; the round goes on with what it has.");
                return Ok((messages, false));
            }
        };
        let full = got.len() == usize::from(want);
        bytes += got.iter().map(|m| m.text.len()).sum::<usize>();
        messages.extend(got);
        if !full || bytes >= max_bytes || messages.len() >= MAX_ROUND_MESSAGES {
            return Ok((messages, full));
        }
    }
}

/// The most queue text a round takes: halved after a round that ran out of time (storage
/// took less than the round held in the time it had), doubled back after one that did not,
/// between one message and the configured most. So a slow storage account gets rounds it can
/// finish, instead of rounds that are redone forever.
#[derive(Debug)]
struct Budget {
    most: usize,
    now: std::sync::atomic::AtomicUsize,
}

impl Budget {
    fn new(most: usize) -> Self {
        let most = most.max(schemas::QUEUE_MESSAGE_MAX_CHARS);
        Self {
            most,
            now: most.into(),
        }
    }

    fn get(&self) -> usize {
        self.now.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn after_round(&self, out_of_time: bool) {
        let now = self.get();
        let next = if out_of_time {
            (now / 2).max(schemas::QUEUE_MESSAGE_MAX_CHARS)
        } else {
            now.saturating_mul(2).min(self.most)
        };
        if next != now {
            metrics::gauge!(m::ROUND_BUDGET_BYTES).set(next as f64);
            if out_of_time {
                tracing::warn!(
                    bytes = next,
                    "A round ran out of time; taking less from now on."
                );
            }
        }
        self.now.store(next, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The most messages one round takes, whatever their size: a round settles its messages one
/// by one, so a backlog of small envelopes must not make a round of thousands.
const MAX_ROUND_MESSAGES: usize = 256;

/// Messages to ask for with `room` bytes left: as many as fit at the largest size.
fn per_get(room: usize) -> u8 {
    let fit = room / schemas::QUEUE_MESSAGE_MAX_CHARS;
    u8::try_from(fit.clamp(1, 32)).unwrap_or(32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_that_ran_out_of_time_halves_the_next_take_down_to_one_message() {
        let one = schemas::QUEUE_MESSAGE_MAX_CHARS;
        let budget = Budget::new(4 << 20);
        budget.after_round(true);
        assert_eq!(budget.get(), 2 << 20);
        for _ in 0..20 {
            budget.after_round(true);
        }
        assert_eq!(budget.get(), one, "never below one message");
        budget.after_round(false);
        assert_eq!(budget.get(), 2 * one);
        for _ in 0..20 {
            budget.after_round(false);
        }
        assert_eq!(budget.get(), 4 << 20, "never above the configured most");
    }

    #[test]
    fn a_get_never_asks_for_more_than_the_room_left() {
        let max = schemas::QUEUE_MESSAGE_MAX_CHARS;
        assert_eq!(per_get(1024 * 1024), 16);
        assert_eq!(per_get(100 * max), 32);
        assert_eq!(per_get(max - 1), 1, "at least one");
        assert_eq!(per_get(0), 1);
        for room in [0, 1, max, 3 * max + 5, 1 << 20, 1 << 30] {
            assert!(usize::from(per_get(room)) * max <= room.max(max));
        }
    }
}
