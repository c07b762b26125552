use infra::cli::{LogArgs, StorageArgs};
use schemas::archive::layout::Layout;
use schemas::archive::Format;
use std::net::SocketAddr;
use std::time::Duration;

/// Rolls readings older than the retention window out of the table into date-partitioned,
/// Cool-tier blobs (Parquet, or JSON Lines), then deletes them from the table. Safe to kill
/// at any point and to run as several instances at once.
#[derive(Debug, Clone, clap::Parser)]
#[command(version, about, long_about = None)]
pub struct Config {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Archive everything older than the window: once (`--once`), or every `--interval`.
    Run(RunArgs),
    /// Rebuild the hourly and daily rollups of whole UTC days from the archive and the table
    /// (days archived before rollups existed, or history loaded by hand), then exit.
    Rollups(RollupArgs),
}

/// Where the readings, the archive and the rollups are.
#[derive(Debug, Clone, clap::Args)]
pub struct Sources {
    /// Archive file format: `parquet` or `json`.
    #[arg(long, env = "ARCHIVER_FORMAT", default_value = "parquet")]
    pub format: Format,

    /// Blob container for archives.
    #[arg(long, env = "ARCHIVER_CONTAINER", default_value = "telemetry")]
    pub container: String,

    /// Blob name template; `{year}`, `{month}`, `{day}` and `{device}` are required, and the
    /// format's extension (`.parquet` or `.json`) is appended.
    #[arg(long, env = "ARCHIVER_LAYOUT", default_value = schemas::archive::layout::DEFAULT)]
    pub layout: Layout,

    /// Table holding the readings.
    #[arg(long, env = "ARCHIVER_TABLE_NAME", default_value = schemas::entity::DEFAULT_TABLE)]
    pub table_name: String,

    /// Device table the processor maintains; the archiver walks it to find partitions.
    #[arg(long, env = "ARCHIVER_DEVICE_TABLE", default_value = schemas::device::DEFAULT_TABLE)]
    pub device_table: String,

    /// Table of hourly and daily rollups.
    #[arg(long, env = "ARCHIVER_ROLLUP_TABLE", default_value = schemas::rollup::DEFAULT_TABLE)]
    pub rollup_table: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RollupArgs {
    /// First UTC day to rebuild (YYYY-MM-DD).
    #[arg(long, value_parser = parse_date)]
    pub from: i64,

    /// Day after the last one to rebuild (YYYY-MM-DD, exclusive).
    #[arg(long, value_parser = parse_date)]
    pub to: i64,

    /// Only these devices (repeat the flag, or comma-separate in the variable).
    #[arg(long = "device", env = "ARCHIVER_DEVICES", value_delimiter = ',')]
    pub devices: Vec<String>,

    #[command(flatten)]
    pub sources: Sources,

    #[command(flatten)]
    pub storage: StorageArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Archive once and exit (status 1 if any device-day failed), instead of running as a
    /// service. A one-shot run serves no metrics endpoint; it prints a summary instead.
    #[arg(long, env = "ARCHIVER_ONCE")]
    pub once: bool,

    /// Show what would be archived, and where, without writing or deleting anything.
    #[arg(long, env = "ARCHIVER_DRY_RUN")]
    pub dry_run: bool,

    /// How long readings stay in the table. Whole UTC days older than this are archived.
    #[arg(long, env = "ARCHIVER_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub retention: Duration,

    /// Archive only days before this UTC date (YYYY-MM-DD, exclusive). It may not reach into
    /// the retention window.
    #[arg(long, env = "ARCHIVER_BEFORE", value_parser = parse_date)]
    pub before: Option<i64>,

    /// Archive only these devices (repeat the flag, or comma-separate in the variable).
    #[arg(long = "device", env = "ARCHIVER_DEVICES", value_delimiter = ',')]
    pub devices: Vec<String>,

    #[command(flatten)]
    pub sources: Sources,

    /// Keep hourly and daily rollups current (service mode): each hour once it has ended and
    /// settled, and the hours the processor marks for late readings.
    #[arg(long, env = "ARCHIVER_ROLLUPS", default_value_t = true, action = clap::ArgAction::Set)]
    pub rollups: bool,

    /// How long after an hour ends its rollup is computed (at least 2m). The processor marks
    /// readings it writes more than a minute after their hour ended for recomputation; the
    /// sweep must come after the others, clock skew included.
    #[arg(long, env = "ARCHIVER_ROLLUP_SETTLE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub rollup_settle: Duration,

    /// How often the rollups are brought up to date (the hours that ended, the marked ones).
    #[arg(long, env = "ARCHIVER_ROLLUP_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub rollup_interval: Duration,

    /// How long rollups are kept (they outlive the readings: long-range charts read them).
    #[arg(long, env = "ARCHIVER_ROLLUP_RETENTION", default_value = "400days", value_parser = humantime::parse_duration)]
    pub rollup_retention: Duration,

    /// Devices archived in parallel.
    #[arg(long, env = "ARCHIVER_CONCURRENCY", default_value_t = 4)]
    pub concurrency: usize,

    /// Time between passes when running as a service.
    #[arg(long, env = "ARCHIVER_INTERVAL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub interval: Duration,

    /// Address for `/metrics`, `/healthz` and `/readyz` (service mode).
    #[arg(long, env = "ARCHIVER_METRICS_ADDR", default_value = "127.0.0.1:9104")]
    pub metrics_addr: SocketAddr,

    /// Test hook: abort right after a step (`after-upload`, `mid-delete`).
    #[arg(long, env = "ARCHIVER_FAILPOINT", hide = true)]
    pub failpoint: Option<String>,

    #[command(flatten)]
    pub storage: StorageArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

/// `YYYY-MM-DD` -> milliseconds at that UTC midnight.
fn parse_date(s: &str) -> Result<i64, String> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let date = time::Date::parse(s, format).map_err(|e| format!("expected YYYY-MM-DD: {e}"))?;
    Ok(date.midnight().assume_utc().unix_timestamp() * 1000)
}
