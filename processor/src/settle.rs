//! The one place that deletes ingest queue messages, and the one that leaves them to reappear.
//!
//! A message is deleted only when every reading in it is stored or dead-lettered, and what
//! could not be decoded is kept whole in the quarantine queue; callers establish that, and
//! this module is the only code that calls `delete` on the ingest queue.

use crate::ctx::{retry, Ctx};
use crate::failure::Failure;
use crate::metrics_names as m;
use infra::storage::QueueMessage;
use tokio::time::Instant;

/// Deletes a queue message whose every reading is stored or dead-lettered; `stored_at_ms` is
/// when its readings were stored, and `received_at_ms` when each of its device messages was
/// received (the latency the metric reports).
pub async fn finished(
    ctx: &Ctx,
    message: &QueueMessage,
    received_at_ms: &[i64],
    deadline: Instant,
    stored_at_ms: i64,
) {
    match retry(deadline, || ctx.queue.delete(message)).await {
        Ok(()) => {
            metrics::counter!(m::MESSAGES_DONE).increment(1);
            for received in received_at_ms {
                let seconds = (stored_at_ms - received).max(0) as f64 / 1000.0;
                metrics::histogram!(m::LATENCY_SECONDS).record(seconds);
            }
        }
        // Deleted or retaken meanwhile: another worker has it, and its redo is harmless.
        Err(error) if error.is_gone() => {
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

/// Leaves a message to reappear after its visibility timeout; it is redone then.
pub fn leave(message: &QueueMessage, failure: &Failure) {
    metrics::counter!(m::MESSAGES_RETRIED, "stage" => failure.stage().as_str()).increment(1);
    tracing::warn!(id = %message.id, deliveries = message.dequeue_count, error = %failure, "Leaving the message to reappear.");
}
