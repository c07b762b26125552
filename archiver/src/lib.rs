//! `archiver`: keeps the telemetry table to the retention window, moving older readings into
//! date-partitioned, Cool-tier archive blobs (Parquet by default, or JSON Lines).
//!
//! It finds work through the device table the processor maintains ([`pass`]): for each
//! device, it queries one partition by RowKey range, one UTC day at a time, and archives each
//! day ([`day`]) as write, verify, then delete. Invariant: a row leaves the table only after a
//! blob read back holds it, and a blob is only ever replaced, conditionally, by a superset of
//! itself, so a crash or a concurrent archiver can cost repeated work but never a reading.

mod config;
mod day;
mod metrics_names;
mod pass;
mod progress;
mod rollups;

pub use config::{Command, Config, RollupArgs, RunArgs, Sources};
pub use schemas::archive::layout::Layout;

use anyhow::Context as _;
use futures::StreamExt;
use infra::serve::Health;
use infra::storage::{create_missing, Grant, Resource};
use schemas::archive::layout::{self, floor_day, DAY_MS};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What the archiver may do with a SAS minted from an account key: read and write blobs.
const STORAGE_GRANT: Grant = Grant {
    services: "b",
    resource_types: "co",
    permissions: "rw",
};

/// Runs the archiver. Returns whether every device-day of every pass succeeded.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<bool> {
    match config.command {
        Command::Run(args) => run_passes(args, shutdown).await,
        Command::Rollups(args) => rebuild_rollups(args, shutdown).await,
    }
}

fn keeper(
    account: &infra::storage::Account,
    sources: &Sources,
    settle: Duration,
    (retention, table_retention): (Duration, Duration),
    concurrency: usize,
) -> rollups::Keeper {
    rollups::Keeper {
        telemetry: account.table(&sources.table_name),
        devices: account.table(&sources.device_table),
        rollups: account.table(&sources.rollup_table),
        archive: account.container(&sources.container),
        layout: sources.layout.clone(),
        format: sources.format,
        settle,
        retention,
        table_retention,
        concurrency,
    }
}

/// `archiver rollups`: rebuilds whole days' rollups, device by device, with a progress line.
async fn rebuild_rollups(args: RollupArgs, shutdown: CancellationToken) -> anyhow::Result<bool> {
    anyhow::ensure!(args.from < args.to, "--from must be before --to");
    let account = args.storage.account(STORAGE_GRANT)?;
    // Settle and retentions play no part in a rebuild.
    let retentions = (Duration::MAX, Duration::MAX);
    let keeper = keeper(&account, &args.sources, Duration::ZERO, retentions, 16);
    if !create_missing(
        &[Resource::Table(&keeper.rollups)],
        args.storage.create_missing,
        &shutdown,
    )
    .await
    {
        return Ok(true);
    }
    // Counted first for the progress line; the ids themselves are read a page at a time below.
    let devices = if args.devices.is_empty() {
        pass::device_count(&keeper.devices)
            .await
            .context("cannot count the devices")?
    } else {
        args.devices.len()
    };
    let days = ((args.to - args.from) / DAY_MS) as usize;
    let total = devices * days;
    let done = Arc::new(AtomicUsize::new(0));
    let shown = done.clone();
    let bar = infra::progress::Progress::start(args.log.log_format, move |elapsed| {
        let n = shown.load(Relaxed);
        format!(
            "rollups {} {n}/{total} device-days, {:.0} s",
            infra::progress::bar(n, total, 30),
            elapsed.as_secs_f64()
        )
    });
    let span = (args.from, args.to);
    let mut totals = Rebuilt::default();
    let read = if args.devices.is_empty() {
        let mut pages = pass::DevicePages::new(&keeper.devices);
        loop {
            // Between pages is a safe point: the devices of the pages not read yet would
            // only be skipped.
            if shutdown.is_cancelled() {
                break Ok(());
            }
            match pages.next_page().await {
                Ok(Some(ids)) => {
                    rebuild_devices(&keeper, &ids, span, &done, &shutdown, &mut totals).await;
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        }
    } else {
        rebuild_devices(&keeper, &args.devices, span, &done, &shutdown, &mut totals).await;
        Ok(())
    };
    bar.finish().await;
    // What the pages before a failed read rebuilt stays rebuilt.
    read.context("cannot list the devices")?;
    println!(
        "Rebuilt {} rollups of {} devices over {days} days ({} device-days failed).",
        totals.written, totals.devices, totals.failed
    );
    Ok(totals.failed == 0 && !shutdown.is_cancelled())
}

/// The running totals of `archiver rollups`.
#[derive(Debug, Default)]
struct Rebuilt {
    devices: usize,
    written: u64,
    /// Device-days that could not be rebuilt.
    failed: usize,
}

/// Rebuilds the days in `from..to` of `devices`, 16 device-days at a time, adding to
/// `totals` as each finishes; skips what has not started at shutdown.
async fn rebuild_devices(
    keeper: &rollups::Keeper,
    devices: &[String],
    (from, to): (i64, i64),
    done: &AtomicUsize,
    stop: &CancellationToken,
    totals: &mut Rebuilt,
) {
    let work = devices.iter().flat_map(|device| {
        (from..to)
            .step_by(DAY_MS as usize)
            .map(move |day| (device, day))
    });
    futures::stream::iter(work)
        .map(|(device, day)| async move {
            if stop.is_cancelled() {
                return None;
            }
            let result = keeper.rebuild_day(device, day).await;
            done.fetch_add(1, Relaxed);
            match result {
                Ok(n) => Some(n),
                Err(error) => {
                    tracing::error!(%error, device = %device, day = %layout::date_text(day), "Cannot rebuild a day's rollups.");
                    Some(u64::MAX)
                }
            }
        })
        .buffer_unordered(16)
        .for_each(|result| {
            match result {
                Some(u64::MAX) => totals.failed += 1,
                Some(n) => totals.written += n,
                None => {}
            }
            futures::future::ready(())
        })
        .await;
    totals.devices += devices.len();
}

/// Keeps rollups current until `shutdown`: a turn every `every`, expiry once a day. A failed
/// turn is logged and retried; it leaves readiness alone (that is about archiving), and
/// `archiver_rollups_last_success_timestamp_seconds` shows how far behind the rollups are.
async fn keep_rollups(keeper: rollups::Keeper, every: Duration, shutdown: CancellationToken) {
    let mut expired_day = None;
    loop {
        let now = schemas::timefmt::now_ms();
        match keeper.turn(now).await {
            Ok(turn) => {
                if turn.hours_swept > 0 || turn.marks_done > 0 {
                    tracing::info!(
                        hours = turn.hours_swept,
                        marks = turn.marks_done,
                        written = turn.rollups_written,
                        "Rollups brought up to date."
                    );
                }
                metrics::counter!(metrics_names::ROLLUPS_WRITTEN).increment(turn.rollups_written);
                metrics::gauge!(metrics_names::ROLLUPS_LAST_SUCCESS).set(now as f64 / 1000.0);
            }
            Err(error) => {
                tracing::warn!(%error, "Cannot bring rollups up to date; retrying.");
            }
        }
        if let Err(error) = keeper.expire_stored(now).await {
            tracing::warn!(%error, "Cannot delete old stored-reading counts; retrying.");
        }
        let today = floor_day(now);
        if expired_day != Some(today) {
            match keeper.expire(now).await {
                Ok(deleted) => {
                    expired_day = Some(today);
                    if deleted > 0 {
                        tracing::info!(deleted, "Expired rollups older than the rollup retention.");
                    }
                }
                Err(error) => tracing::warn!(%error, "Cannot expire old rollups; retrying later."),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

async fn run_passes(args: RunArgs, shutdown: CancellationToken) -> anyhow::Result<bool> {
    let now = schemas::timefmt::now_ms();
    let window_cutoff = |now: i64| floor_day(now - args.retention.as_millis() as i64);
    if let Some(before) = args.before {
        let limit = window_cutoff(now);
        anyhow::ensure!(
            before <= limit,
            "--before {} reaches into the {} retention window: the newest day that may be \
             archived now ends at {}. Lower --retention to archive newer days.",
            layout::date_text(before),
            humantime::format_duration(args.retention),
            layout::date_text(limit),
        );
    }
    anyhow::ensure!(
        args.rollup_settle.as_millis() >= schemas::rollup::MIN_SETTLE_MS as u128,
        "ARCHIVER_ROLLUP_SETTLE must be at least {} s: the processor marks only readings written \
         more than {} s after their hour ended, and the sweep must come after the rest",
        schemas::rollup::MIN_SETTLE_MS / 1000,
        schemas::rollup::MARK_AFTER_MS / 1000
    );
    let account = args.storage.account(STORAGE_GRANT)?;
    let health = Health::new("creating the archive container");
    if !args.once {
        let addr =
            infra::serve::serve_http(args.metrics_addr, health.clone(), shutdown.clone()).await?;
        tracing::info!(metrics_addr = %addr, "Serving metrics and health.");
        // The wait between passes, and the start: an archiver that never finishes a pass is
        // stale two intervals after it started, not silent.
        let wait = args.interval.min(Duration::from_millis(DAY_MS as u64));
        metrics::gauge!(metrics_names::INTERVAL).set(wait.as_secs_f64());
        metrics::gauge!(metrics_names::STARTED).set(schemas::timefmt::now_ms() as f64 / 1000.0);
    }
    let ctx = pass::Ctx {
        target: day::Target {
            telemetry: account.table(&args.sources.table_name),
            container: account.container(&args.sources.container),
            format: args.sources.format,
            dry_run: args.dry_run,
            failpoint: args.failpoint.clone(),
        },
        devices: account.table(&args.sources.device_table),
        layout: args.sources.layout.clone(),
        concurrency: args.concurrency,
        log_format: args.log.log_format,
    };
    tracing::info!(
        container = %args.sources.container,
        layout = %args.sources.layout,
        format = ?args.sources.format,
        retention = %humantime::format_duration(args.retention),
        blob_endpoint = account.blob_endpoint(),
        "Archiver starting."
    );
    if !args.dry_run {
        let container = [Resource::Container(&ctx.target.container)];
        if !create_missing(&container, args.storage.create_missing, &shutdown).await {
            return Ok(true);
        }
    }
    health.set_ready();
    if args.rollups && !args.once && !args.dry_run {
        let keeper = keeper(
            &account,
            &args.sources,
            args.rollup_settle,
            (args.rollup_retention, args.retention),
            args.concurrency.max(1) * 4,
        );
        let rollups = [Resource::Table(&keeper.rollups)];
        if create_missing(&rollups, args.storage.create_missing, &shutdown).await {
            tokio::spawn(keep_rollups(keeper, args.rollup_interval, shutdown.clone()));
        }
    }

    let mut all_ok = true;
    loop {
        let cutoff = args
            .before
            .unwrap_or_else(|| window_cutoff(schemas::timefmt::now_ms()));
        match pass::run(&ctx, cutoff, &args.devices, &shutdown).await {
            Ok(report) => {
                let ok = report.failures == 0 && !report.interrupted;
                all_ok &= ok;
                if ok {
                    health.set_ready();
                    metrics::gauge!(metrics_names::LAST_SUCCESS)
                        .set(schemas::timefmt::now_ms() as f64 / 1000.0);
                } else if let Some(why) = &report.last_failure {
                    health.set_not_ready(format!(
                        "{} device-days failed in the last pass; the last: {why}",
                        report.failures
                    ));
                }
                tracing::info!(
                    rows = report.rows,
                    days = report.days,
                    devices = report.devices,
                    bytes = report.bytes,
                    deleted = report.deleted,
                    failures = report.failures,
                    seconds = report.elapsed.as_secs_f64(),
                    "Archive pass finished."
                );
                if args.once {
                    let verb = if args.dry_run {
                        "Would archive"
                    } else {
                        "Archived"
                    };
                    println!("{verb} {report}.");
                }
            }
            Err(error) => {
                all_ok = false;
                health.set_not_ready(format!("cannot list devices: {error}"));
                let error = anyhow::Error::new(error).context("cannot list the devices to archive");
                if args.once {
                    return Err(error);
                }
                tracing::error!(error = format!("{error:#}"), "Archive pass failed.");
            }
        }
        if args.once || shutdown.is_cancelled() {
            break;
        }
        // Passes start at most once per interval, and at least once a day.
        let wait = args.interval.min(Duration::from_millis(DAY_MS as u64));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    tracing::info!("Archiver stopped.");
    Ok(all_ok)
}
