//! `deadletter`: the operator's tool for the dead-letter queue.
//!
//! - [`walk`]: the one way this tool reads the queue, and the guarantees it keeps (nothing
//!   deleted by reading, nothing hidden for longer than `--hold`).
//! - [`filter`]: which records a command touches.
//! - `inspect`: `list` and `show`; `act`: `replay`, `purge` and `export`; `import`;
//!   `quarantine`: the undecodable ingest messages the processor kept whole.
//!
//! Invariant: a record leaves the dead-letter queue only after it is safe where it goes (the
//! ingest queue holds it, or the export file has it on disk), or when an operator purges it.

mod act;
mod config;
pub mod filter;
mod import;
mod inspect;
mod quarantine;
mod summary;
pub mod walk;

pub use config::{Cli, Command};

use infra::serve::LogFormat;
use infra::storage::{Account, Grant};
use schemas::DeadLetter;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What the tool may do with a SAS minted from an account key: take, update, delete and add
/// messages, read a queue's depth.
const STORAGE_GRANT: Grant = Grant {
    services: "q",
    resource_types: "co",
    permissions: "rapu",
};

/// Runs one command. `Ok(false)` means it ran but did not finish cleanly (interrupted, or
/// some records failed); the exit code says so.
pub async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<bool> {
    // Azure takes visibility timeouts up to 7 days; under a few seconds a walk cannot keep
    // what it took hidden long enough to settle it.
    anyhow::ensure!(
        (MIN_HOLD..=MAX_HOLD).contains(&cli.hold),
        "--hold must be between {} and {}",
        humantime::format_duration(MIN_HOLD),
        humantime::format_duration(MAX_HOLD)
    );
    let session = Session {
        account: cli.storage.account(STORAGE_GRANT)?,
        queue: cli.queue.clone(),
        hold: cli.hold,
        log_format: cli.log.log_format,
        shutdown,
    };
    match &cli.command {
        Command::List(args) => inspect::list(&session, args).await,
        Command::Show(args) => inspect::show(&session, args).await,
        Command::Replay(args) => act::replay(&session, args).await,
        Command::Purge(args) => act::purge(&session, args).await,
        Command::Export(args) => act::export(&session, args).await,
        Command::Import(args) => import::import(&session, args).await,
        Command::Quarantine(args) => quarantine::run(&session, args).await,
    }
}

/// A record's id: a hash of its content, stable across walks and runs (queue message ids
/// are not: a message holds many records and is rewritten when some leave).
pub fn record_id(record: &DeadLetter) -> String {
    // FNV-1a, 64 bits: stable by definition, unlike std's hasher.
    let hash = record
        .to_json_line()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("{hash:016x}")
}

const MIN_HOLD: Duration = Duration::from_secs(3);
const MAX_HOLD: Duration = Duration::from_secs(7 * 24 * 3600);

/// Writes a command's output. A reader that went away (`| head`) is not an error worth a
/// panic: the output was for it alone.
fn stdout(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// What every command shares.
struct Session {
    account: Account,
    queue: String,
    hold: Duration,
    log_format: LogFormat,
    shutdown: CancellationToken,
}

impl Session {
    fn queue_name(&self) -> &str {
        &self.queue
    }

    async fn walker(&self) -> anyhow::Result<walk::Walker> {
        walk::Walker::start(self.account.queue(&self.queue), self.hold).await
    }

    /// The progress line of a walk: messages against the queue's depth at the start, records
    /// seen, then `more`.
    fn progress(
        &self,
        walker: &walk::Walker,
        more: impl Fn(Duration) -> String + Send + 'static,
    ) -> infra::progress::Progress {
        let seen = walker.seen.clone();
        let depth = walker.depth_at_start;
        infra::progress::Progress::start(self.log_format, move |elapsed| {
            let messages = seen.messages.load(Relaxed);
            let more = more(elapsed);
            format!(
                "{} {}/{} messages · {} records{}{more}",
                infra::progress::bar(messages, depth.max(messages), 20),
                summary::count(messages),
                summary::count(depth.max(messages)),
                summary::count(seen.records.load(Relaxed)),
                if more.is_empty() { "" } else { " · " },
            )
        })
    }

    /// Tells the operator what a walk could not see or give back.
    fn report_walk(
        &self,
        walked: usize,
        unseen: usize,
        unreadable: usize,
        unreleased: usize,
        interrupted: bool,
    ) {
        if interrupted {
            eprintln!(
                "Interrupted after {} queue messages; everything held was given back.",
                summary::count(walked)
            );
        }
        if unseen > 0 && !interrupted {
            eprintln!(
                "{} queue messages were not visible during the walk (held by another reader, or by a walk that was killed: those reappear within its --hold). Run again later for a complete view.",
                summary::count(unseen)
            );
        }
        if unreadable > 0 {
            eprintln!(
                "{} queue messages are not dead-letter records; they were left untouched.",
                summary::count(unreadable)
            );
        }
        if unreleased > 0 {
            eprintln!(
                "{} queue messages could not be given back; they reappear by themselves within {}.",
                summary::count(unreleased),
                humantime::format_duration(self.hold)
            );
        }
    }
}
