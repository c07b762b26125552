use crate::filter::FilterArgs;
use infra::cli::{LogArgs, StorageArgs};
use std::path::PathBuf;
use std::time::Duration;

/// Inspect, replay, purge, export and import dead letters.
///
/// Every command walks the dead-letter queue by taking its messages for `--hold` and giving
/// back the ones it leaves, so nothing is lost if the tool dies: messages it held reappear
/// within `--hold`. A record leaves the queue only once it is safe elsewhere (replayed into the
/// ingest queue, written to an export file) or purged on purpose.
#[derive(Debug, clap::Parser)]
#[command(version)]
pub struct Cli {
    /// The dead-letter queue.
    #[arg(
        long,
        global = true,
        env = "DEADLETTER_QUEUE",
        default_value = "telemetry-deadletter"
    )]
    pub queue: String,

    /// How long a walk keeps the messages it has taken hidden. If the tool is killed, they
    /// reappear within this time; an orderly end (or Ctrl-C) releases them at once. Make it
    /// longer than the walk (about 10 s per 100,000 records on the emulator).
    #[arg(long, global = true, env = "DEADLETTER_HOLD", default_value = "5m", value_parser = humantime::parse_duration)]
    pub hold: Duration,

    #[command(flatten)]
    pub storage: StorageArgs,

    #[command(flatten)]
    pub log: LogArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Summarise dead letters by reason, device and day; or list records with `--limit`.
    List(ListArgs),
    /// Show one record in full, with its payload pretty-printed when it is JSON.
    Show(ShowArgs),
    /// Put dead letters back through the pipeline; each is removed only once the ingest
    /// queue holds it.
    Replay(ReplayArgs),
    /// Delete dead letters for good.
    Purge(PurgeArgs),
    /// Write dead letters to a JSON Lines file (removing them only with `--delete`).
    Export(ExportArgs),
    /// Add dead letters from a JSON Lines file written by `export`.
    Import(ImportArgs),
    /// The queue messages the processor could not decode, kept whole: list, replay, purge.
    Quarantine(QuarantineArgs),
}

#[derive(Debug, clap::Args)]
pub struct QuarantineArgs {
    /// The quarantine queue (the processor's `PROCESSOR_QUARANTINE_QUEUE`).
    #[arg(
        long,
        env = "DEADLETTER_QUARANTINE_QUEUE",
        default_value = "telemetry-quarantine"
    )]
    pub quarantine_queue: String,

    #[command(subcommand)]
    pub action: QuarantineAction,
}

#[derive(Debug, clap::Subcommand)]
pub enum QuarantineAction {
    /// Show each quarantined message: its size, deliveries, and why it cannot be decoded.
    List {
        /// Print JSON instead of a table.
        #[arg(long, env = "DEADLETTER_JSON")]
        json: bool,
    },
    /// Put the quarantined messages back on the ingest queue, unchanged (after deploying a
    /// processor that reads them); each leaves quarantine only once the ingest queue holds it.
    Replay {
        /// The ingest queue.
        #[arg(
            long,
            env = "DEADLETTER_TARGET_QUEUE",
            default_value = "telemetry-ingest"
        )]
        target_queue: String,
    },
    /// Delete the quarantined messages for good.
    Purge {
        /// Required: there is no undo.
        #[arg(long, env = "DEADLETTER_YES")]
        yes: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub filter: FilterArgs,

    /// List up to this many records, one per row, instead of the summary.
    #[arg(long, env = "DEADLETTER_LIMIT")]
    pub limit: Option<usize>,

    /// Print JSON instead of tables.
    #[arg(long, env = "DEADLETTER_JSON")]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The record's id, as `list --limit` prints it.
    #[arg(env = "DEADLETTER_ID")]
    pub id: String,

    /// Print the record as JSON.
    #[arg(long, env = "DEADLETTER_JSON")]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub filter: FilterArgs,

    /// The ingest queue, where replayed messages go.
    #[arg(
        long,
        env = "DEADLETTER_TARGET_QUEUE",
        default_value = "telemetry-ingest"
    )]
    pub target_queue: String,

    /// Report what would be replayed and skipped; change nothing.
    #[arg(long, env = "DEADLETTER_DRY_RUN")]
    pub dry_run: bool,

    /// Replay at most this many records.
    #[arg(long, env = "DEADLETTER_LIMIT")]
    pub limit: Option<usize>,

    /// Records per second at most (0: as fast as the queues allow).
    #[arg(long, env = "DEADLETTER_RATE", default_value_t = 0)]
    pub rate: u32,

    /// Replays one message may have had before it is refused (without `--force`): a message
    /// that fails again comes back with its count one higher.
    #[arg(long, env = "DEADLETTER_MAX_REPLAYS", default_value_t = 3)]
    pub max_replays: u32,

    /// Replay records past `--max-replays` too.
    #[arg(long, env = "DEADLETTER_FORCE")]
    pub force: bool,

    /// Override for these messages only: accept readings older than the processor's maximum
    /// age (a backfill). The archiver moves them out of the table on its next pass.
    #[arg(long, env = "DEADLETTER_ALLOW_STALE")]
    pub allow_stale: bool,

    /// Override for these messages only: read device id FROM as TO, in the topic and in the
    /// payload's `deviceId` (repeatable; comma-separated in the environment variable).
    #[arg(long = "map-device", env = "DEADLETTER_MAP_DEVICE", value_name = "FROM=TO", value_delimiter = ',', value_parser = parse_mapping)]
    pub map_device: Vec<(String, String)>,

    /// Print the tally as JSON.
    #[arg(long, env = "DEADLETTER_JSON")]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub filter: FilterArgs,

    /// Delete without asking. Without it, the tool counts what matches and asks on the
    /// terminal (and refuses when there is no terminal).
    #[arg(long, env = "DEADLETTER_YES")]
    pub yes: bool,

    /// Delete at most this many records.
    #[arg(long, env = "DEADLETTER_LIMIT")]
    pub limit: Option<usize>,

    /// Print the tally as JSON.
    #[arg(long, env = "DEADLETTER_JSON")]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub filter: FilterArgs,

    /// The file to write, one record per line (`-` for standard output). An existing file
    /// is never overwritten.
    #[arg(long, short, env = "DEADLETTER_OUTPUT")]
    pub output: PathBuf,

    /// Remove each exported record from the queue, once it is on disk (flushed and synced).
    /// Needs a file: refused with `-o -`, since standard output cannot be synced.
    #[arg(long, env = "DEADLETTER_DELETE")]
    pub delete: bool,

    /// Export at most this many records.
    #[arg(long, env = "DEADLETTER_LIMIT")]
    pub limit: Option<usize>,
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub filter: FilterArgs,

    /// The file to read (`-` for standard input). A file is checked in full before anything
    /// is added.
    #[arg(long, short, env = "DEADLETTER_INPUT")]
    pub input: PathBuf,
}

fn parse_mapping(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((from, to)) if !from.is_empty() && schemas::reading::is_valid_device_id(to) => {
            Ok((from.to_owned(), to.to_owned()))
        }
        Some((_, to)) if !to.is_empty() => Err(format!(
            "{to:?} is not a valid device id (1-128 of [A-Za-z0-9._:-], starting alphanumeric)"
        )),
        _ => Err(format!("{s:?} is not FROM=TO")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "deadletter",
            "replay",
            "--reason",
            "stale,device_mismatch",
            "--device",
            "sensor-*",
            "--map-device",
            "OLD=sensor-1",
            "--allow-stale",
            "--hold",
            "90s",
        ])
        .unwrap();
        assert_eq!(cli.hold, Duration::from_secs(90));
        let Command::Replay(args) = cli.command else {
            panic!("not replay");
        };
        assert_eq!(args.filter.reasons.len(), 2);
        assert_eq!(args.map_device, [("OLD".to_owned(), "sensor-1".to_owned())]);
        assert!(args.allow_stale && !args.force && !args.dry_run);
        assert!(parse_mapping("a=bad id").is_err());
        assert!(parse_mapping("nothing").is_err());
    }
}
