//! One pass: walk the devices, and archive each one's whole UTC days before the cutoff.

use crate::day::{self, retried, DayReport, Target};
use crate::metrics_names as m;
use crate::progress::{self, Counters};
use futures::{stream, StreamExt};
use infra::storage::{StorageError, Table};
use schemas::archive::layout::{self, Layout, DAY_MS};
use schemas::{device, timefmt};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct Ctx {
    pub target: Target,
    pub devices: Table,
    pub layout: Layout,
    pub concurrency: usize,
    /// Progress is a bar on a terminal with pretty logs, log lines otherwise.
    pub log_format: infra::serve::LogFormat,
}

/// The totals of a pass.
#[derive(Debug, Clone, Default)]
pub struct PassReport {
    pub devices: usize,
    pub days: usize,
    pub rows: usize,
    pub bytes: usize,
    pub deleted: usize,
    /// Rows left because they changed after being read; the next pass takes them.
    pub changed: usize,
    pub failures: usize,
    /// What the last failure was (an error only the operator can fix, such as a 403, shows
    /// here and in readiness).
    pub last_failure: Option<String>,
    pub elapsed: Duration,
    /// Stopped early by shutdown.
    pub interrupted: bool,
}

impl std::fmt::Display for PassReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "{} rows of {} device-days ({} devices), {} bytes, in {:.1} s ({:.0} rows/s); \
             {} rows deleted, {} left because they changed, {} failed device-days{}",
            self.rows,
            self.days,
            self.devices,
            self.bytes,
            secs,
            self.rows as f64 / secs.max(0.001),
            self.deleted,
            self.changed,
            self.failures,
            if self.interrupted {
                "; interrupted"
            } else {
                ""
            },
        )
    }
}

/// Archives every whole day before `cutoff_ms` of `only` (or of every device in the device
/// table). Device-days that fail are counted and left for the next pass; a pass fails as a
/// whole only when the device list cannot be read.
pub async fn run(
    ctx: &Ctx,
    cutoff_ms: i64,
    only: &[String],
    shutdown: &CancellationToken,
) -> Result<PassReport, StorageError> {
    let started = Instant::now();
    let devices = if only.is_empty() {
        let filter = format!("PartitionKey eq '{}'", device::PARTITION);
        let mut ids = retried(|| ctx.devices.row_keys(&filter)).await?;
        ids.sort();
        ids
    } else {
        only.to_vec()
    };
    tracing::info!(
        devices = devices.len(),
        before = %timefmt::format_ms(cutoff_ms),
        dry_run = ctx.target.dry_run,
        "Archive pass starting."
    );
    let counters = Arc::new(Counters::default());
    let progress = progress::start(counters.clone(), devices.len(), ctx.log_format);
    let reports: Vec<Vec<DayReport>> = stream::iter(&devices)
        .map(|id| {
            let counters = counters.clone();
            async move {
                let days = archive_device(ctx, id, cutoff_ms, &counters, shutdown).await;
                counters.devices_done.fetch_add(1, Relaxed);
                days
            }
        })
        .buffer_unordered(ctx.concurrency.max(1))
        .collect()
        .await;
    progress.finish().await;

    let mut report = PassReport {
        devices: devices.len(),
        failures: counters.failures.load(Relaxed),
        last_failure: counters
            .last_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(),
        elapsed: started.elapsed(),
        interrupted: shutdown.is_cancelled(),
        ..PassReport::default()
    };
    for day in reports.iter().flatten() {
        report.days += 1;
        report.rows += day.rows;
        report.bytes += day.bytes;
        report.deleted += day.deleted;
        report.changed += day.changed;
    }
    metrics::histogram!(m::PASS_SECONDS).record(report.elapsed.as_secs_f64());
    Ok(report)
}

/// One device's days, oldest first. Stops at the cutoff, at a failure to query the device's
/// partition, or at shutdown (between days).
async fn archive_device(
    ctx: &Ctx,
    id: &str,
    cutoff_ms: i64,
    counters: &Counters,
    shutdown: &CancellationToken,
) -> Vec<DayReport> {
    let pk = quote(id);
    let cutoff_key = quote(&timefmt::format_ms(cutoff_ms));
    let fail = |what: &str, error: &dyn std::fmt::Display| {
        counters.failures.fetch_add(1, Relaxed);
        *counters
            .last_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(format!("device {id}, {what}: {error}"));
        metrics::counter!(m::FAILURES).increment(1);
        tracing::error!(device = %id, %error, "Cannot archive {what}; it stays in the table for the next pass.");
    };
    let mut reports = Vec::new();
    let mut from = quote("");
    while !shutdown.is_cancelled() {
        // The oldest row not yet looked at tells which day to archive next.
        let next = format!("PartitionKey eq {pk} and RowKey ge {from} and RowKey lt {cutoff_key}");
        let first = match retried(|| ctx.target.telemetry.first(&next)).await {
            Ok(Some(row)) => row,
            Ok(None) => break,
            Err(e) => {
                fail("the device's partition", &e);
                break;
            }
        };
        let Some(day_ms) = first
            .get("RowKey")
            .and_then(|v| v.as_str())
            .and_then(timefmt::parse_rfc3339_ms)
            .map(layout::floor_day)
        else {
            fail(
                "a row whose RowKey is not a timestamp",
                &format!("{first:?}"),
            );
            break;
        };
        let end_ms = (day_ms + DAY_MS).min(cutoff_ms);
        let (start_key, end_key) = (
            quote(&timefmt::format_ms(day_ms)),
            quote(&timefmt::format_ms(end_ms)),
        );
        from = end_key.clone();
        let range =
            format!("PartitionKey eq {pk} and RowKey ge {start_key} and RowKey lt {end_key}");
        let rows = match retried(|| ctx.target.telemetry.query(&range)).await {
            Ok(rows) => rows,
            Err(e) => {
                fail("a day", &e);
                continue;
            }
        };
        let blob = ctx
            .layout
            .blob_name(id, day_ms, ctx.target.format.extension());
        match day::archive(&ctx.target, &blob, rows).await {
            Ok(report) => {
                counters.days.fetch_add(1, Relaxed);
                counters.rows.fetch_add(report.rows, Relaxed);
                counters.bytes.fetch_add(report.bytes, Relaxed);
                if ctx.target.dry_run {
                    println!(
                        "{}  {id}  {} rows -> {blob}{}",
                        layout::date_text(day_ms),
                        report.rows,
                        match report.previous {
                            0 => String::new(),
                            n => format!(" (merge with {n} archived rows)"),
                        }
                    );
                } else {
                    tracing::debug!(device = %id, %blob, rows = report.rows, archived = report.archived, "Day archived.");
                }
                reports.push(report);
            }
            Err(e) => fail(&format!("day {}", layout::date_text(day_ms)), &e),
        }
    }
    reports
}

/// An OData string literal.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
