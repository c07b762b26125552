//! Walking the dead-letter queue.
//!
//! An Azure queue shows only its first 32 messages without taking them, so a walk takes
//! every message with a visibility timeout (`--hold`), keeps the ones it has taken hidden
//! while it goes on (a message made visible again would come back and be walked twice), and
//! at the end makes every message it still holds visible again in one sweep. Messages are
//! known by id: one that reappears because the walk outlasted its hold is recognised, its new
//! pop receipt kept, and it is not walked twice.
//!
//! What this guarantees:
//! - Nothing is deleted by walking. A record leaves the queue only when a command has put it
//!   somewhere durable first (the ingest queue, an export file) or an operator purges it.
//! - A message the walk holds is hidden for at most `--hold` after the tool dies, however it
//!   dies; an orderly end or Ctrl-C releases everything at once.
//! - Other writers (the processor appending dead letters) are unaffected; what they append
//!   during a walk is walked too. Another walker sees only what this one does not hold; each
//!   reports how many messages it could not see.

use futures::{stream, StreamExt};
use infra::storage::{Queue, QueueMessage, StorageError};
use schemas::dead_letter::{self, DeadLetter};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Queue calls in flight when deleting, rewriting or releasing many messages.
const CONCURRENCY: usize = 16;
/// How long one storage call is retried before the walk gives up on it.
const RETRY_FOR: Duration = Duration::from_secs(30);

/// A message taken in this walk for the first time, with its records.
#[derive(Debug)]
pub struct Taken {
    pub id: String,
    pub records: Result<Vec<DeadLetter>, dead_letter::DecodeError>,
}

/// What became of a message a command settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Deleted,
    /// Rewritten to hold only the records that stay.
    Rewritten,
    /// Deleted or retaken by someone else: this walk's hold had run out. Its records are
    /// wherever that other reader left them.
    Gone,
}

/// Progress counters, shared with the progress line.
#[derive(Debug, Default)]
pub struct Seen {
    pub messages: AtomicUsize,
    pub records: AtomicUsize,
}

/// The messages a walk holds: taken and not deleted, by id, as last seen (current pop
/// receipt). Their text is not kept: a release or a delete needs only the receipt, so memory
/// is a few hundred bytes a message whatever the messages hold.
#[derive(Debug, Default)]
struct Held {
    messages: HashMap<String, QueueMessage>,
}

impl Held {
    /// Keeps `message` (new, or a newer sight of one held), without its text.
    fn keep(&mut self, mut message: QueueMessage) {
        message.text = String::new();
        self.messages.insert(message.id.clone(), message);
    }

    fn forget(&mut self, id: &str) {
        self.messages.remove(id);
    }

    fn get(&self, id: &str) -> Option<&QueueMessage> {
        self.messages.get(id)
    }
}

#[derive(Debug)]
pub struct Walker {
    queue: Queue,
    hold: Duration,
    held: Held,
    /// Every id taken in this walk, deleted ones included.
    taken: HashSet<String>,
    started: Instant,
    warned: bool,
    /// A get came back empty: the walk saw everything visible.
    exhausted: bool,
    pub depth_at_start: usize,
    pub seen: Arc<Seen>,
}

impl Walker {
    /// Starts a walk of `queue`. Fails with a clear message when the queue does not exist.
    pub async fn start(queue: Queue, hold: Duration) -> anyhow::Result<Self> {
        let depth = depth_of(
            &queue,
            "--queue",
            "the dead-letter queue, and the connection string",
        )
        .await?;
        Ok(Self {
            queue,
            hold,
            held: Held::default(),
            taken: HashSet::new(),
            started: Instant::now(),
            warned: false,
            exhausted: false,
            depth_at_start: depth,
            seen: Arc::default(),
        })
    }

    /// The next messages this walk has not seen; empty when no message is visible.
    pub async fn next(&mut self) -> Result<Vec<Taken>, StorageError> {
        loop {
            if !self.warned && self.started.elapsed() > self.hold.mul_f64(0.8) {
                self.warned = true;
                tracing::warn!(hold = ?self.hold, "The walk is outlasting --hold: messages taken first are reappearing (they are recognised, not walked twice). A longer --hold is faster for a queue this size.");
            }
            let hold = self.hold;
            let got = retried(|| self.queue.get(32, hold)).await?;
            if got.is_empty() {
                self.exhausted = true;
                return Ok(Vec::new());
            }
            let mut fresh = Vec::new();
            for message in got {
                if !self.taken.insert(message.id.clone()) {
                    // Taken earlier in this walk and reappeared: keep the new receipt only.
                    self.held.keep(message);
                    continue;
                }
                let records = dead_letter::decode_message(&message.text);
                self.seen.messages.fetch_add(1, Relaxed);
                let n = records.as_ref().map_or(0, Vec::len);
                self.seen.records.fetch_add(n, Relaxed);
                fresh.push(Taken {
                    id: message.id.clone(),
                    records,
                });
                self.held.keep(message);
            }
            if !fresh.is_empty() {
                return Ok(fresh);
            }
        }
    }

    /// Takes records out of held messages: each `(id, keep)` deletes the message when `keep`
    /// is empty, else rewrites it to hold only `keep` (hidden until the walk ends). Only call
    /// this once the records leaving are safe elsewhere.
    pub async fn settle(
        &mut self,
        changes: Vec<(String, Vec<DeadLetter>)>,
    ) -> Vec<(String, Result<Settled, StorageError>)> {
        let work: Vec<(QueueMessage, Vec<DeadLetter>)> = changes
            .into_iter()
            .filter_map(|(id, keep)| self.held.get(&id).cloned().map(|m| (m, keep)))
            .collect();
        let (queue, hold) = (&self.queue, self.hold);
        let results: Vec<(String, Result<Option<QueueMessage>, StorageError>)> = stream::iter(work)
            .map(|(message, keep)| async move {
                let result = settle_one(queue, &message, &keep, hold).await;
                (message.id, result)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        results
            .into_iter()
            .map(|(id, result)| {
                let outcome = match result {
                    Ok(Some(rewritten)) => {
                        self.held.keep(rewritten);
                        Ok(Settled::Rewritten)
                    }
                    Ok(None) => {
                        self.held.forget(&id);
                        Ok(Settled::Deleted)
                    }
                    Err(e) if e.is_gone() => {
                        self.held.forget(&id);
                        Ok(Settled::Gone)
                    }
                    Err(e) => Err(e),
                };
                (id, outcome)
            })
            .collect()
    }

    /// Makes every message still held visible again. Returns how many could not be released
    /// (they become visible by themselves when their hold ends).
    pub async fn release(self) -> usize {
        let queue = &self.queue;
        stream::iter(self.held.messages.into_values())
            .map(|message| async move {
                let result = retried(|| queue.hide(&message, Duration::ZERO)).await;
                match result {
                    Ok(_) => 0,
                    // Retaken by someone else after this walk's hold ran out: theirs now.
                    Err(e) if e.is_gone() => 0,
                    Err(error) => {
                        tracing::warn!(%error, id = %message.id, "Cannot release a message; it becomes visible when its hold ends.");
                        1
                    }
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<usize>>()
            .await
            .into_iter()
            .sum()
    }

    /// Messages the queue reported at the start that a walk to the end never saw: held by
    /// another reader (zero is the common case). Zero for a walk stopped early.
    pub fn unseen(&self) -> usize {
        if !self.exhausted {
            return 0;
        }
        self.depth_at_start
            .saturating_sub(self.seen.messages.load(Relaxed))
    }
}

/// Deletes `message` (nothing to keep) or rewrites it to `keep`, still hidden for `hold`.
async fn settle_one(
    queue: &Queue,
    message: &QueueMessage,
    keep: &[DeadLetter],
    hold: Duration,
) -> Result<Option<QueueMessage>, StorageError> {
    let mut packed = dead_letter::pack(keep);
    let Some((text, _)) = packed.pop() else {
        retried(|| queue.delete(message)).await?;
        return Ok(None);
    };
    // A subset of one message's records fits one message; should packing ever differ, the
    // overflow is appended before the original is rewritten, so no record is ever in neither.
    for (extra, _) in packed {
        retried(|| queue.put(extra.clone())).await?;
    }
    retried(|| queue.update(message, text.clone(), hold))
        .await
        .map(Some)
}

/// The approximate depth of `queue`, or an error that says what to check: a missing queue
/// names the `flag` that chose it and what it should be (`expected`).
pub async fn depth_of(queue: &Queue, flag: &str, expected: &str) -> anyhow::Result<usize> {
    retried(|| queue.approximate_depth()).await.map_err(|e| {
        if e.is_not_found() {
            anyhow::anyhow!(
                "queue {:?} does not exist (is {flag} {expected}?)",
                queue.name()
            )
        } else {
            anyhow::Error::new(e).context(format!("cannot reach queue {:?}", queue.name()))
        }
    })
}

/// Runs a queue call, retrying transient failures for up to [`RETRY_FOR`].
pub async fn retried<T, F, Fut>(op: F) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StorageError>>,
{
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    infra::retry::until_deadline(deadline, op, |error| {
        tracing::debug!(%error, "Retrying a queue call.");
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: &str, text: &str) -> QueueMessage {
        QueueMessage {
            id: id.to_owned(),
            pop_receipt: format!("receipt-{id}"),
            dequeue_count: 1,
            expires_at_ms: 0,
            text: text.to_owned(),
        }
    }

    #[test]
    fn held_messages_keep_their_newest_receipt_and_no_text() {
        let mut held = Held::default();
        held.keep(message("a", "aaaa"));
        held.keep(message("b", "bbbb"));
        let mut again = message("b", "bbbb");
        again.pop_receipt = "newer".into();
        held.keep(again);
        held.forget("a");
        assert_eq!(held.messages.len(), 1);
        let b = held.get("b").unwrap();
        assert_eq!((b.pop_receipt.as_str(), b.text.as_str()), ("newer", ""));
    }
}
