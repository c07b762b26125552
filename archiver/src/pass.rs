//! One pass: walk the device table a page at a time, and archive each device's whole UTC days
//! before the cutoff.

use crate::day::{self, retried, DayReport, Target};
use crate::metrics_names as m;
use crate::progress::{self, Counters};
use futures::{future, stream, StreamExt};
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

impl PassReport {
    /// Adds one device's archived days to the totals.
    fn add_days(&mut self, days: &[DayReport]) {
        for day in days {
            self.days += 1;
            self.rows += day.rows;
            self.bytes += day.bytes;
            self.deleted += day.deleted;
            self.changed += day.changed;
        }
    }
}

/// Device ids read from the device table at a time. Each page is done before the next is
/// read, so this is the most a walk holds at any device count. 1,000 is also the largest page
/// the table service returns.
pub const DEVICE_PAGE: usize = 1_000;

/// The device table's ids, a page of at most [`DEVICE_PAGE`] at a time, in RowKey order.
#[derive(Debug)]
pub struct DevicePages<'a> {
    table: &'a Table,
    /// The last id of the page before; the next page starts after it.
    after: Option<String>,
    done: bool,
}

impl<'a> DevicePages<'a> {
    pub fn new(table: &'a Table) -> Self {
        Self {
            table,
            after: None,
            done: false,
        }
    }

    /// The next page, or `None` after the last. A read that fails (after retries) comes back
    /// as the error; the pages read before it are not read again.
    pub async fn next_page(&mut self) -> Result<Option<Vec<String>>, StorageError> {
        if self.done {
            return Ok(None);
        }
        let (table, filter) = (self.table, page_filter(self.after.as_deref()));
        let ids = retried(|| table.row_keys_first(&filter, DEVICE_PAGE)).await?;
        // `row_keys_first` follows continuations, so a short page is the end.
        self.done = ids.len() < DEVICE_PAGE;
        if let Some(last) = ids.last() {
            // The service returns one partition's rows sorted by RowKey: the next page is
            // everything after the last id of this one, by the service's own ordering.
            self.after = Some(last.clone());
        }
        Ok((!ids.is_empty()).then_some(ids))
    }
}

/// How many devices the device table lists, for a progress line: a walk of the keys that
/// holds only the count.
pub async fn device_count(devices: &Table) -> Result<usize, StorageError> {
    let filter = page_filter(None);
    retried(|| devices.count(&filter)).await
}

/// The device table's rows after the device `after` (all of them for `None`).
fn page_filter(after: Option<&str>) -> String {
    let partition = quote(device::PARTITION);
    match after {
        None => format!("PartitionKey eq {partition}"),
        Some(id) => format!("PartitionKey eq {partition} and RowKey gt {}", quote(id)),
    }
}

/// Archives every whole day before `cutoff_ms` of `only` (or of every device in the device
/// table, walked a page at a time: [`DEVICE_PAGE`]). Device-days that fail are counted and
/// left for the next pass; a pass fails as a whole only when the device list cannot be read.
/// A later page that cannot be read fails the pass the same way; what the pages before it
/// archived stays archived.
pub async fn run(
    ctx: &Ctx,
    cutoff_ms: i64,
    only: &[String],
    shutdown: &CancellationToken,
) -> Result<PassReport, StorageError> {
    let started = Instant::now();
    // Counted first for the progress line (only: a count that fails leaves it without a
    // total); the ids themselves are read a page at a time below.
    let total = if only.is_empty() {
        device_count(&ctx.devices).await.unwrap_or_else(|error| {
            tracing::warn!(%error, "Cannot count the devices; the pass goes on without a total.");
            0
        })
    } else {
        only.len()
    };
    tracing::info!(
        devices = total,
        before = %timefmt::format_ms(cutoff_ms),
        dry_run = ctx.target.dry_run,
        "Archive pass starting."
    );
    let counters = Arc::new(Counters::default());
    let progress = progress::start(counters.clone(), total, ctx.log_format);
    let mut report = PassReport::default();
    let walked = if only.is_empty() {
        let mut pages = DevicePages::new(&ctx.devices);
        loop {
            // Between pages is a safe point: at shutdown the devices of the pages not read
            // yet would only be skipped.
            if shutdown.is_cancelled() {
                break Ok(());
            }
            match pages.next_page().await {
                Ok(Some(ids)) => {
                    archive_devices(ctx, &ids, cutoff_ms, &counters, shutdown, &mut report).await;
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        }
    } else {
        archive_devices(ctx, only, cutoff_ms, &counters, shutdown, &mut report).await;
        Ok(())
    };
    progress.finish().await;
    walked?;

    report.failures = counters.failures.load(Relaxed);
    report.last_failure = counters
        .last_failure
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    report.elapsed = started.elapsed();
    report.interrupted = shutdown.is_cancelled();
    metrics::histogram!(m::PASS_SECONDS).record(report.elapsed.as_secs_f64());
    Ok(report)
}

/// Archives the devices `ids`, [`Ctx::concurrency`] at a time, adding them and their days to
/// `report` as each finishes.
async fn archive_devices(
    ctx: &Ctx,
    ids: &[String],
    cutoff_ms: i64,
    counters: &Counters,
    shutdown: &CancellationToken,
    report: &mut PassReport,
) {
    stream::iter(ids)
        .map(|id| async move {
            let days = archive_device(ctx, id, cutoff_ms, counters, shutdown).await;
            counters.devices_done.fetch_add(1, Relaxed);
            days
        })
        .buffer_unordered(ctx.concurrency.max(1))
        .for_each(|days| {
            report.devices += 1;
            report.add_days(&days);
            future::ready(())
        })
        .await;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn check(after: Option<&str>, expected: &str) {
        assert_eq!(page_filter(after), expected);
    }

    #[test]
    fn each_page_starts_after_the_last_id_of_the_one_before() {
        check(None, "PartitionKey eq 'device'");
        check(
            Some("dev-1"),
            "PartitionKey eq 'device' and RowKey gt 'dev-1'",
        );
        check(
            Some("it's"),
            "PartitionKey eq 'device' and RowKey gt 'it''s'",
        );
    }
}
