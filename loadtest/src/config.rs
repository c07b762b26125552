use infra::cli::{LogArgs, StorageArgs};
use infra::mqtt::MqttArgs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Drives a load profile through the locally running pipeline (ingest and processor) and
/// measures it end to end: throughput, publish-to-row latency, loss, CPU, memory and storage
/// requests per reading, against the raw storage ceiling measured in the same run. Writes a
/// Markdown and JSON report and an SVG chart.
#[derive(Debug, Clone, clap::Parser)]
#[command(version, about, long_about = None)]
pub struct Config {
    /// `seed` (10,000 sensors every 30 s), `saturation` (single readings, offered at 25% to
    /// 150% of the single-write ceiling in steps), `gateway` (1,000 gateways sending arrays
    /// of 100 readings at 120% of the batch ceiling), or `burst` (1,000 devices publishing
    /// 100 single readings each as fast as the broker takes them: 100,000 readings, timed
    /// from the first publish to the last row), or `million` (10,000 devices, then 10,000
    /// devices taking turns over `--id-space` distinct ids until each has published once,
    /// single readings at 70% of the single-write ceiling: throughput and every service's
    /// memory against the device count).
    #[arg(long, env = "LOADTEST_PROFILE", value_enum, default_value = "seed")]
    pub profile: Profile,

    /// How long the load runs (per step, for `saturation`). Default: 5m for `seed`, 30s per
    /// step for `saturation`, 2m for `gateway`, 1m for `million`'s first step (its second
    /// takes as long as the id space needs); for `burst`, the most the publisher may take
    /// (10m).
    #[arg(long, env = "LOADTEST_DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,

    /// Distinct device ids of the `million` profile's second step.
    #[arg(long, env = "LOADTEST_ID_SPACE", default_value_t = 1_000_000)]
    pub id_space: u64,

    /// Time spent measuring each raw storage ceiling (single writes, 100-entity batches).
    #[arg(long, env = "LOADTEST_CEILING_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub ceiling_duration: Duration,

    /// Writes in flight while measuring the ceiling.
    #[arg(long, env = "LOADTEST_CEILING_CONCURRENCY", default_value_t = 16)]
    pub ceiling_concurrency: usize,

    /// Where reports go.
    #[arg(long, env = "LOADTEST_REPORT_DIR", default_value = "reports")]
    pub report_dir: PathBuf,

    /// Table the processor writes.
    #[arg(long, env = "LOADTEST_TABLE_NAME", default_value = schemas::entity::DEFAULT_TABLE)]
    pub table_name: String,

    /// Queue between ingest and processor (for its depth).
    #[arg(long, env = "LOADTEST_QUEUE_NAME", default_value = "telemetry-ingest")]
    pub queue_name: String,

    /// Metrics endpoint of ingest.
    #[arg(
        long,
        env = "LOADTEST_INGEST_METRICS",
        default_value = "127.0.0.1:9101"
    )]
    pub ingest_metrics: SocketAddr,

    /// Metrics endpoint of the processor.
    #[arg(
        long,
        env = "LOADTEST_PROCESSOR_METRICS",
        default_value = "127.0.0.1:9102"
    )]
    pub processor_metrics: SocketAddr,

    /// The broker; the simulator it drives and its probe connect with these settings.
    #[command(flatten)]
    pub mqtt: MqttArgs,

    #[command(flatten)]
    pub storage: StorageArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    Seed,
    Saturation,
    Gateway,
    Burst,
    Million,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Profile::Seed => "seed",
            Profile::Saturation => "saturation",
            Profile::Gateway => "gateway",
            Profile::Burst => "burst",
            Profile::Million => "million",
        }
    }
}
