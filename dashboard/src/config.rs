use infra::cli::{LogArgs, ShardArgs, StorageArgs};
use infra::mqtt::Secret;
use schemas::archive::layout::Layout;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Serves the pipeline's data, read-only: a versioned HTTP API over the table and the archive
/// (`/api/v1/...`), and the dashboard page at `/`. Also `/healthz`, `/readyz` and `/metrics`.
#[derive(Debug, Clone, clap::Parser)]
#[command(version, about, long_about = None)]
pub struct Config {
    /// Address to listen on. The default is reachable from this machine only; to serve others,
    /// bind a public address and set a token.
    #[arg(long, env = "DASHBOARD_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// Bearer token that `/api/` requires (`Authorization: Bearer <token>`). Unset: no token
    /// (fine on 127.0.0.1). Prefer `DASHBOARD_TOKEN_FILE`. Never printed.
    #[arg(long, env = "DASHBOARD_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,

    /// File holding the token (a mounted secret); wins over `DASHBOARD_TOKEN`.
    #[arg(long, env = "DASHBOARD_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// Table holding the readings.
    #[arg(long, env = "DASHBOARD_TABLE_NAME", default_value = schemas::entity::DEFAULT_TABLE)]
    pub table_name: String,

    /// Device table the processor maintains.
    #[arg(long, env = "DASHBOARD_DEVICE_TABLE", default_value = schemas::device::DEFAULT_TABLE)]
    pub device_table: String,

    /// Table of alarm rules and states (the processor's `PROCESSOR_ALARM_TABLE`).
    #[arg(long, env = "DASHBOARD_ALARM_TABLE", default_value = schemas::alarm::DEFAULT_TABLE)]
    pub alarm_table: String,

    /// Table of hourly and daily rollups (the archiver's `ARCHIVER_ROLLUP_TABLE`).
    #[arg(long, env = "DASHBOARD_ROLLUP_TABLE", default_value = schemas::rollup::DEFAULT_TABLE)]
    pub rollup_table: String,

    /// Blob container of the archive (the archiver's `ARCHIVER_CONTAINER`).
    #[arg(long, env = "DASHBOARD_ARCHIVE_CONTAINER", default_value = "telemetry")]
    pub archive_container: String,

    /// Blob name template of the archive (the archiver's `ARCHIVER_LAYOUT`).
    #[arg(long, env = "DASHBOARD_ARCHIVE_LAYOUT", default_value = schemas::archive::layout::DEFAULT)]
    pub archive_layout: Layout,

    /// Format of the archive, `parquet` or `json` (the archiver's `ARCHIVER_FORMAT`).
    #[arg(long, env = "DASHBOARD_ARCHIVE_FORMAT", default_value = "parquet")]
    pub archive_format: schemas::archive::Format,

    /// The ingest queue, whose depth the pipeline view shows.
    #[arg(
        long,
        env = "DASHBOARD_INGEST_QUEUE",
        default_value = "telemetry-ingest"
    )]
    pub ingest_queue: String,

    /// The dead-letter queue, whose depth the pipeline view shows.
    #[arg(
        long,
        env = "DASHBOARD_DEAD_LETTER_QUEUE",
        default_value = "telemetry-deadletter"
    )]
    pub dead_letter_queue: String,

    /// Longest range of raw readings one request may ask for (longer ranges: rollups).
    #[arg(long, env = "DASHBOARD_MAX_RAW_RANGE", default_value = "92days", value_parser = humantime::parse_duration)]
    pub max_raw_range: Duration,

    /// Most readings one response holds; a longer answer continues at its `next` link.
    #[arg(long, env = "DASHBOARD_MAX_READINGS", default_value_t = 50_000)]
    pub max_readings: usize,

    /// A device not heard from for this long counts as silent in the pipeline view.
    #[arg(long, env = "DASHBOARD_SILENT_AFTER", default_value = "10m", value_parser = humantime::parse_duration)]
    pub silent_after: Duration,

    #[command(flatten)]
    pub storage: StorageArgs,

    /// Several storage accounts: the device list, the counts and every device's data span
    /// them.
    #[command(flatten)]
    pub shards: ShardArgs,

    /// Earlier shard counts, after the count grew: `COUNT@TIME`, comma-separated
    /// (`2@2026-12-01T00:00:00Z`): COUNT shards took the readings measured before TIME, so a
    /// device's older readings are looked for in its shard under COUNT too (only for ranges
    /// that reach before TIME).
    #[arg(long, env = "DASHBOARD_SHARDS_BEFORE", default_value = "")]
    pub shards_before: Earlier,

    #[command(flatten)]
    pub log: LogArgs,
}

/// Earlier shard counts (`--shards-before`).
#[derive(Debug, Clone, Default)]
pub struct Earlier(pub Vec<(usize, i64)>);

impl std::str::FromStr for Earlier {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        schemas::shard::parse_earlier(s).map(Self)
    }
}

impl Config {
    /// The token `/api/` requires, if any, read from its file when one is given.
    pub fn token(&self) -> Result<Option<Secret>, infra::mqtt::ConfigError> {
        match &self.token_file {
            Some(path) => Secret::read_file("DASHBOARD_TOKEN_FILE", path).map(Some),
            None => Ok(self.token.clone()),
        }
    }
}
