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

pub use config::{Command, Config, FormatArg, RunArgs};
pub use schemas::archive::layout::Layout;

use infra::serve::Health;
use infra::storage::{create_missing, Resource};
use schemas::archive::layout::{self, floor_day, DAY_MS};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Runs the archiver. Returns whether every device-day of every pass succeeded.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<bool> {
    match config.command {
        Command::Run(args) => run_passes(args, shutdown).await,
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
    let account = args.storage.account()?;
    let health = Health::new("creating the archive container");
    if !args.once {
        let addr =
            infra::serve::serve_http(args.metrics_addr, health.clone(), shutdown.clone()).await?;
        tracing::info!(metrics_addr = %addr, "Serving metrics and health.");
    }
    let ctx = pass::Ctx {
        target: day::Target {
            telemetry: account.table(&args.table_name),
            container: account.container(&args.container),
            format: args.format.into(),
            dry_run: args.dry_run,
            failpoint: args.failpoint.clone(),
        },
        devices: account.table(&args.device_table),
        layout: args.layout.clone(),
        concurrency: args.concurrency,
        log_format: args.log.log_format,
    };
    tracing::info!(
        container = %args.container,
        layout = %args.layout,
        format = ?args.format,
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
