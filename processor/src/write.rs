//! A round's table writes: one same-partition transaction per planned batch, and, when a
//! transaction is refused for what it carries, its entities one by one to find the culprit.
//! Every step, waiting for a write permit included, ends by the round's deadline.

use crate::classify::Origin;
use crate::ctx::{retry, Ctx};
use crate::failure::{Failure, Stage};
use crate::metrics_names as m;
use crate::plan::Batch;
use futures::{stream, StreamExt};
use infra::storage::{BatchOutcome, Refusal, Row, StorageError};
use tokio::time::Instant;

/// Single writes at once when a refused transaction is retried entity by entity.
const SINGLE_WRITES: usize = 8;

/// What a batch's write came to.
#[derive(Debug)]
pub enum Written {
    Stored(usize),
    /// Try the messages again later.
    Retry(Failure),
    /// These entities (by position in the batch) were refused for their content, with the
    /// service's error; the others were stored one by one.
    Refused {
        stored: usize,
        refused: Vec<(usize, String)>,
    },
}

/// Writes every batch, at most `write_concurrency` at once and `write_kib` of bodies across
/// all rounds.
pub async fn write_all(
    ctx: &Ctx,
    batches: Vec<Batch<Origin>>,
    deadline: Instant,
) -> Vec<(Batch<Origin>, Written)> {
    stream::iter(batches)
        .map(|batch| async move {
            let turn = tokio::time::timeout_at(deadline, ctx.write_permit(batch.bytes)).await;
            let written = match turn {
                Ok(permit) => {
                    let written = write_batch(ctx, &batch, deadline).await;
                    drop(permit);
                    written
                }
                Err(_) => Written::Retry(Failure::NoWritePermit),
            };
            // Counted as each write lands, not when the round ends, so the rate is live.
            if let Written::Stored(n) | Written::Refused { stored: n, .. } = &written {
                metrics::counter!(m::STORED).increment(*n as u64);
                ctx.stored.add(*n as u64, schemas::timefmt::now_ms());
            }
            (batch, written)
        })
        .buffer_unordered(ctx.write_concurrency.max(1))
        .collect()
        .await
}

fn failed(error: StorageError) -> Failure {
    Failure::Storage {
        stage: Stage::Write,
        error,
    }
}

async fn write_batch(ctx: &Ctx, batch: &Batch<Origin>, deadline: Instant) -> Written {
    // Encoded now, not when the round was sorted: only the writes in flight hold rows.
    let mut scratch = Vec::with_capacity(1024);
    let rows: Vec<Row> = batch.rows.iter().map(|p| p.row(&mut scratch)).collect();
    if let [row] = rows.as_slice() {
        metrics::counter!(m::TABLE_WRITES, "kind" => "single").increment(1);
        return match retry(deadline, || ctx.table.upsert_row(row)).await {
            Ok(()) => Written::Stored(1),
            Err(e) if e.is_content_error() => Written::Refused {
                stored: 0,
                refused: vec![(0, e.to_string())],
            },
            Err(e) => Written::Retry(failed(e)),
        };
    }
    metrics::counter!(m::TABLE_WRITES, "kind" => "batch").increment(1);
    // Only a refusal for what the batch carries can be one entity's fault; any other leaves
    // the messages to be redone, and blames no reading.
    let why = match retry(deadline, || ctx.table.upsert_rows(&rows)).await {
        Ok(BatchOutcome::Committed) => return Written::Stored(rows.len()),
        Ok(BatchOutcome::Rejected(refusal @ Refusal::Content(_))) => refusal.to_string(),
        Ok(BatchOutcome::Rejected(refusal)) => {
            return Written::Retry(Failure::Refused {
                stage: Stage::Write,
                table: ctx.table.name().to_owned(),
                refusal,
            })
        }
        Err(e) if e.is_content_error() => e.to_string(),
        Err(e) => return Written::Retry(failed(e)),
    };
    // A refused transaction wrote nothing; find the culprit by writing one at a time.
    tracing::warn!(reason = %why, entities = rows.len(), "Transaction refused; writing its entities one by one.");
    let rows = &rows;
    let results: Vec<(usize, Result<(), StorageError>)> = stream::iter(0..rows.len())
        .map(|k| async move {
            metrics::counter!(m::TABLE_WRITES, "kind" => "single").increment(1);
            (k, retry(deadline, || ctx.table.upsert_row(&rows[k])).await)
        })
        .buffer_unordered(SINGLE_WRITES)
        .collect()
        .await;
    let mut stored = 0;
    let mut refused = Vec::new();
    for (k, result) in results {
        match result {
            Ok(()) => stored += 1,
            Err(e) if e.is_content_error() => refused.push((k, e.to_string())),
            Err(e) => return Written::Retry(failed(e)),
        }
    }
    refused.sort_unstable_by_key(|(k, _)| *k);
    Written::Refused { stored, refused }
}
