use crate::faults::Faults;
use infra::cli::LogArgs;
use infra::mqtt::{MqttArgs, Secret};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Publishes realistic readings for many sensors, with optional fault injection: the
/// load-testing tool. Prints a JSON summary of what it sent (and what the pipeline must make
/// of it) on stdout when it stops.
#[derive(Debug, Clone, clap::Parser)]
#[command(version, about, long_about = None)]
pub struct Config {
    /// The broker, and the identity multiplexed connections use (a gateway identity).
    #[command(flatten)]
    pub mqtt: MqttArgs,

    /// Gives every device its own MQTT identity, as real sensors have: one connection per
    /// device, user name = device id, password = HMAC-SHA256 of the device id under this
    /// secret (`--print-credentials` writes the broker's password file from it). Never
    /// printed; prefer `SIMULATOR_DEVICE_SECRET_FILE`.
    #[arg(long, env = "SIMULATOR_DEVICE_SECRET", hide_env_values = true)]
    pub device_secret: Option<Secret>,

    /// File holding the device secret; wins over `SIMULATOR_DEVICE_SECRET`.
    #[arg(long, env = "SIMULATOR_DEVICE_SECRET_FILE")]
    pub device_secret_file: Option<PathBuf>,

    /// Print `deviceId:password` for every device under the device secret, one per line, and
    /// exit: the broker's password file in plain text, to hash with `mosquitto_passwd -U`.
    #[arg(long, env = "SIMULATOR_PRINT_CREDENTIALS")]
    pub print_credentials: bool,

    /// Number of simulated devices.
    #[arg(long, env = "SIMULATOR_DEVICES", default_value_t = 10_000)]
    pub devices: usize,

    /// Distinct device ids the devices publish as, when more than `--devices`: device k
    /// publishes its round-t message as id number (t × devices + k) mod this, so each round
    /// brings `--devices` ids not seen for the longest time, and a run of this many /
    /// `--devices` rounds sends every id once (the processor's bounded memory is tested so).
    #[arg(long, env = "SIMULATOR_ID_SPACE", default_value_t = 0)]
    pub id_space: usize,

    /// Time between two messages of one device (compress time with e.g. `1s`).
    #[arg(long, env = "SIMULATOR_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub interval: Duration,

    /// Target messages per second across all devices; sets the interval to devices / rate.
    #[arg(long, env = "SIMULATOR_RATE", conflicts_with = "flat_out")]
    pub rate: Option<f64>,

    /// Publish as fast as the broker acknowledges, ignoring the interval.
    #[arg(long, env = "SIMULATOR_FLAT_OUT")]
    pub flat_out: bool,

    /// Readings per message: 1, or up to 100 for gateway arrays.
    #[arg(long, env = "SIMULATOR_BATCH", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub batch: u32,

    /// Faults to inject, as shares of messages: `malformed`, `schema`, `out_of_range`,
    /// `spoofed`, `future`, `stale`, `oversize`, `duplicate`, `out_of_order`, `drop` (lost on
    /// the device: never published); e.g. `malformed=0.01,stale=0.005`.
    #[arg(long, env = "SIMULATOR_FAULTS", default_value = "")]
    pub faults: Faults,

    /// Publish this much history first (at the interval, as fast as possible), so the
    /// archiver has work. Readings older than the processor's `PROCESSOR_MAX_AGE` are refused
    /// as stale: raise it for backfills beyond 30 days.
    #[arg(long, env = "SIMULATOR_BACKFILL", value_parser = humantime::parse_duration)]
    pub backfill: Option<Duration>,

    /// Seed for device phases, values and faults.
    #[arg(long, env = "SIMULATOR_SEED", default_value_t = 1)]
    pub seed: u64,

    /// Stop after this many rounds (each device publishes once per round); 0 runs until stopped.
    #[arg(long, env = "SIMULATOR_ROUNDS", default_value_t = 0)]
    pub rounds: u64,

    /// Stop after this long (then wait for the broker's last acks and print the summary);
    /// unset runs until stopped or until `--rounds` are done.
    #[arg(long, env = "SIMULATOR_DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,

    /// MQTT connections the devices are spread over; 0 gives every device its own (as real
    /// sensors have), which needs one file descriptor per device.
    #[arg(long, env = "SIMULATOR_CONNECTIONS", default_value_t = 4)]
    pub connections: usize,

    /// New connections opened per second at start; 0 opens them all at once, as after a
    /// broker restart. A broker takes TLS handshakes one at a time: 10,000 at once kept a
    /// tenth of the devices waiting for more than 25 s in our runs.
    #[arg(long, env = "SIMULATOR_CONNECT_RATE", default_value_t = 500.0)]
    pub connect_rate: f64,

    /// Topic prefix (`<prefix>/<deviceId>/telemetry`).
    #[arg(long, env = "SIMULATOR_TOPIC_PREFIX", default_value = "devices")]
    pub topic_prefix: String,

    /// Device id prefix; ids are `<prefix>-<n>` with n zero-padded.
    #[arg(long, env = "SIMULATOR_DEVICE_PREFIX", default_value = "sensor")]
    pub device_prefix: String,

    /// Address for `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "SIMULATOR_METRICS_ADDR", default_value = "127.0.0.1:9103")]
    pub metrics_addr: SocketAddr,

    #[command(flatten)]
    pub log: LogArgs,
}

impl Config {
    /// The device secret, from its file or its flag; `None` when devices share the gateway
    /// identity.
    pub fn device_secret(&self) -> anyhow::Result<Option<Secret>> {
        match &self.device_secret_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot read SIMULATOR_DEVICE_SECRET_FILE ({}): {e}",
                        path.display()
                    )
                })?;
                Ok(Some(Secret::new(text.trim_end_matches(['\r', '\n']))))
            }
            None => Ok(self.device_secret.clone()),
        }
    }

    /// The interval, after `--rate`.
    pub fn effective_interval(&self) -> Duration {
        match self.rate {
            Some(rate) if rate > 0.0 => Duration::from_secs_f64(self.devices as f64 / rate),
            _ => self.interval,
        }
    }
}
