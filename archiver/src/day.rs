//! Archiving one device-day, crash-safely.
//!
//! The steps, each safe to repeat after a crash at any point:
//! 1. read the day's rows from the table (one partition, one RowKey range);
//! 2. read the existing archive blob, if any, and merge: one row per timestamp, the table's
//!    version winning, never fewer rows than the blob holds;
//! 3. write the merged archive with a precondition (`If-None-Match: *` for a new blob,
//!    `If-Match: <etag>` for a merge), so a concurrent archiver's write is never overwritten
//!    unseen: on a conflict, start again from step 2;
//! 4. read the blob back and check that it holds every row read in step 1;
//! 5. only then delete those rows, 100 per transaction, each only if unchanged since step 1.
//!
//! A crash before 5 leaves rows in the table that the next run merges again (no duplicates,
//! because merging is by timestamp); a crash during 5 leaves fewer. A row rewritten after
//! step 1 keeps its new version in the table for the next run.

use crate::metrics_names as m;
use infra::retry::until_deadline;
use infra::storage::{
    BatchOutcome, Container, Entity, PutOptions, PutOutcome, RowRef, StorageError, Table, Write,
    MAX_BATCH_OPERATIONS,
};
use schemas::archive::{self, Format, Summary};
use schemas::entity::{self, StoredReading};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::time::Instant;

/// How many times a write that lost a race with another archiver is redone.
const CONFLICT_RETRIES: usize = 5;
/// How long one storage call is retried before the device-day is reported failed.
const CALL_RETRY_BUDGET: Duration = Duration::from_secs(60);

/// The stores and settings one device-day needs.
#[derive(Debug)]
pub struct Target {
    pub telemetry: Table,
    pub container: Container,
    pub format: Format,
    pub dry_run: bool,
    /// Test hook: abort the process right after this step (`after-upload`, `mid-delete`), as a
    /// kill -9 would, so tests can stop it at an exact point.
    pub failpoint: Option<String>,
}

impl Target {
    fn crash_point(&self, step: &str) {
        if self.failpoint.as_deref() == Some(step) {
            eprintln!("failpoint {step}: aborting");
            std::process::abort();
        }
    }
}

/// What became of one device-day.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DayReport {
    /// Rows read from the table.
    pub rows: usize,
    /// Rows in the blob afterwards.
    pub archived: usize,
    /// Rows the blob held before (0 if it was new).
    pub previous: usize,
    /// Bytes written (0 if the blob already held everything, or on a dry run).
    pub bytes: usize,
    /// Rows deleted from the table.
    pub deleted: usize,
    /// Rows left in the table because they changed after being read (the next run takes them).
    pub changed: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DayError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("row {row_key} cannot be archived: {error}")]
    Row {
        row_key: String,
        error: entity::RowError,
    },
    #[error("existing archive {blob} cannot be read ({error}); leaving it and the rows alone")]
    Unreadable {
        blob: String,
        error: archive::ArchiveError,
    },
    #[error("cannot encode the archive: {0}")]
    Encode(archive::ArchiveError),
    #[error("{blob} was changed by another writer {CONFLICT_RETRIES} times in a row")]
    Contended { blob: String },
    #[error("{blob} read back lacks {missing} of the rows just archived; nothing was deleted")]
    Verify { blob: String, missing: usize },
}

/// Archives `entities` (one device's rows for one UTC day, as queried) into blob `blob`.
pub async fn archive(
    target: &Target,
    blob: &str,
    entities: Vec<Entity>,
) -> Result<DayReport, DayError> {
    let rows = entities
        .iter()
        .map(|e| {
            entity::from_entity(e).map_err(|error| DayError::Row {
                row_key: e
                    .get("RowKey")
                    .and_then(|v| v.as_str())
                    .unwrap_or("?")
                    .to_owned(),
                error,
            })
        })
        .collect::<Result<Vec<StoredReading>, _>>()?;
    let keys: BTreeSet<i64> = rows.iter().map(|r| r.reading.measured_at_ms).collect();
    let mut report = DayReport {
        rows: rows.len(),
        ..DayReport::default()
    };

    let mut written = false;
    for _ in 0..CONFLICT_RETRIES {
        let existing = retried(|| target.container.get(blob)).await?;
        let (previous, condition) = match &existing {
            Some(content) => {
                let previous =
                    archive::decode(target.format, content.bytes.clone()).map_err(|error| {
                        DayError::Unreadable {
                            blob: blob.to_owned(),
                            error,
                        }
                    })?;
                (
                    previous,
                    Write::Replace {
                        etag: &content.etag,
                    },
                )
            }
            None => (Vec::new(), Write::Create),
        };
        report.previous = previous.len();
        let merged = archive::merge(previous.clone(), rows.clone());
        let unchanged = existing.is_some() && merged == previous;
        report.archived = merged.len();
        if target.dry_run || unchanged {
            // Nothing new for the blob (a re-run after a crash that followed the upload).
            written = true;
            break;
        }
        let body = archive::encode(target.format, &merged).map_err(DayError::Encode)?;
        let metadata = Summary::of(&merged)
            .map(|s| s.metadata())
            .unwrap_or_default();
        let options = PutOptions {
            content_type: target.format.content_type(),
            cool: true,
            metadata: &metadata,
        };
        let size = body.len();
        match retried(|| target.container.put(blob, body.clone(), condition, options)).await? {
            PutOutcome::Written { .. } => {
                report.bytes = size;
                metrics::counter!(m::BLOBS_WRITTEN).increment(1);
                metrics::counter!(m::BYTES_WRITTEN).increment(size as u64);
                if report.previous > 0 {
                    metrics::counter!(m::MERGES).increment(1);
                }
                written = true;
                target.crash_point("after-upload");
                break;
            }
            PutOutcome::Conflict => {
                tracing::info!(%blob, "Another writer changed the archive; merging again.");
            }
        }
    }
    if !written {
        return Err(DayError::Contended {
            blob: blob.to_owned(),
        });
    }
    if target.dry_run {
        return Ok(report);
    }

    verify(target, blob, &keys).await?;
    metrics::counter!(m::ROWS_ARCHIVED).increment(rows.len() as u64);

    let refs: Vec<RowRef<'_>> = entities.iter().filter_map(RowRef::of).collect();
    for chunk in refs.chunks(MAX_BATCH_OPERATIONS) {
        let (deleted, changed) = delete(&target.telemetry, chunk).await?;
        report.deleted += deleted;
        report.changed += changed;
        metrics::counter!(m::ROWS_DELETED).increment(deleted as u64);
        target.crash_point("mid-delete");
    }
    Ok(report)
}

/// Reads the blob back and checks it holds every timestamp in `keys`.
async fn verify(target: &Target, blob: &str, keys: &BTreeSet<i64>) -> Result<(), DayError> {
    let unreadable = |error| DayError::Unreadable {
        blob: blob.to_owned(),
        error,
    };
    let stored = match retried(|| target.container.get(blob)).await? {
        Some(content) => archive::decode(target.format, content.bytes).map_err(unreadable)?,
        None => Vec::new(),
    };
    let have: BTreeSet<i64> = stored.iter().map(|r| r.reading.measured_at_ms).collect();
    let missing = keys.difference(&have).count();
    if missing > 0 {
        return Err(DayError::Verify {
            blob: blob.to_owned(),
            missing,
        });
    }
    Ok(())
}

/// Deletes up to 100 rows of one partition. Returns (deleted, left because changed).
async fn delete(table: &Table, rows: &[RowRef<'_>]) -> Result<(usize, usize), StorageError> {
    match retried(|| table.delete_batch(rows)).await? {
        BatchOutcome::Committed => return Ok((rows.len(), 0)),
        // A row deleted (404) or rewritten (412) since it was read: go one by one.
        BatchOutcome::Rejected(_) => {}
    }
    let (mut deleted, mut changed) = (0, 0);
    for row in rows {
        match retried(|| table.delete(row)).await {
            Ok(true) => deleted += 1,
            Ok(false) => {}
            Err(e) if e.is_changed() => changed += 1,
            Err(e) => return Err(e),
        }
    }
    Ok((deleted, changed))
}

/// Retries one storage call for up to [`CALL_RETRY_BUDGET`].
pub async fn retried<T, F, Fut>(op: F) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StorageError>>,
{
    until_deadline(Instant::now() + CALL_RETRY_BUDGET, op, |error| {
        tracing::debug!(%error, "Retrying.");
    })
    .await
}
