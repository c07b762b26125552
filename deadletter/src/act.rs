//! `replay`, `purge` and `export`: walks that take matching records out of the queue.
//!
//! Each get's matching records are first made safe where they are going (put into the ingest
//! queue, or written and synced to the export file; purge has nowhere to go), and only then
//! removed from their queue messages: a message whose records all left is deleted, one with
//! records staying is rewritten to hold just those. A crash between the two leaves a record
//! in both places, never in neither; duplicates are harmless because readings are upserts.

use crate::config::{ExportArgs, PurgeArgs, ReplayArgs};
use crate::filter::FilterArgs;
use crate::summary::count;
use crate::walk::{retried, Settled, Walker};
use crate::Session;
use infra::storage::Queue;
use schemas::reading::Override;
use schemas::{timefmt, DeadLetter, DeviceMessage, EnvelopeBuilder, Reason};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// What a command does with the records it takes.
enum Mode {
    Replay(Replay),
    Purge,
    Export(Box<dyn Write + Send>, bool),
}

struct Replay {
    target: Queue,
    /// Stops between envelopes: what is not yet put stays dead-lettered.
    shutdown: tokio_util::sync::CancellationToken,
    overrides: Override,
    max_replays: u32,
    force: bool,
    dry_run: bool,
    pacer: Option<Pacer>,
}

/// Why a matching record was left where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Skip {
    ReplayLimit,
    Truncated,
    NotADeviceMessage,
}

impl Skip {
    fn code(self) -> &'static str {
        match self {
            Skip::ReplayLimit => "replay_limit",
            Skip::Truncated => "payload_truncated",
            Skip::NotADeviceMessage => "not_a_device_message",
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Skip::ReplayLimit => "replay limit reached (--force replays anyway)",
            Skip::Truncated => "payload truncated or unreadable (the original bytes are gone)",
            Skip::NotADeviceMessage => "not a device message (an unreadable queue message)",
        }
    }
}

/// Running totals, shared with the progress line.
#[derive(Debug, Default)]
struct Counters {
    matched: AtomicUsize,
    done: AtomicUsize,
    skipped: AtomicUsize,
    failed: AtomicUsize,
}

#[derive(Debug, Default)]
struct Tally {
    skipped: BTreeMap<Skip, usize>,
    /// Records safe elsewhere whose dead letter could not be removed (still in both).
    not_removed: usize,
    removed: usize,
    unreadable: usize,
    /// Records repeating one already chosen in this walk (the processor redid work): never
    /// replayed or exported twice; removed along with it once it is safe.
    duplicates: usize,
    /// Identities chosen in this walk, and those of them made safe.
    chosen: std::collections::HashSet<u64>,
    safe: std::collections::HashSet<u64>,
}

pub async fn replay(session: &Session, args: &ReplayArgs) -> anyhow::Result<bool> {
    let target = session.account.queue(&args.target_queue);
    crate::walk::depth_of(&target, "--target-queue", "the ingest queue").await?;
    let mode = Mode::Replay(Replay {
        target,
        shutdown: session.shutdown.clone(),
        overrides: Override {
            allow_stale: args.allow_stale,
            device_ids: args.map_device.clone(),
        },
        max_replays: args.max_replays,
        force: args.force,
        dry_run: args.dry_run,
        pacer: (args.rate > 0).then(|| Pacer::new(args.rate)),
    });
    let verb = if args.dry_run {
        "would replay"
    } else {
        "replayed"
    };
    drive(session, &args.filter, args.limit, mode, verb, args.json).await
}

pub async fn purge(session: &Session, args: &PurgeArgs) -> anyhow::Result<bool> {
    let mut limit = args.limit;
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            anyhow::bail!(
                "purge deletes for good: pass --yes (there is no terminal to confirm on)"
            );
        }
        let matching = count_matching(session, &args.filter, args.limit).await?;
        if matching == 0 {
            eprintln!("Nothing matches ({}).", args.filter.describe());
            return Ok(true);
        }
        eprint!(
            "Delete {} dead letters ({}) from {} for good? Type 'yes': ",
            count(matching),
            args.filter.describe(),
            session.queue_name()
        );
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() != "yes" {
            eprintln!("Nothing deleted.");
            return Ok(true);
        }
        // Never more than was confirmed, even if more arrived meanwhile.
        limit = Some(matching);
    }
    drive(
        session,
        &args.filter,
        limit,
        Mode::Purge,
        "deleted",
        args.json,
    )
    .await
}

pub async fn export(session: &Session, args: &ExportArgs) -> anyhow::Result<bool> {
    let out: Box<dyn Write + Send> = if args.output.as_os_str() == "-" {
        // What goes to a pipe is not durable when the write returns (the reader may die with
        // it unread), so nothing may be removed for having been written there.
        anyhow::ensure!(
            !args.delete,
            "--delete needs a file: standard output cannot be synced, so records would be removed \
             before they are safe. Export to a file (`-o FILE --delete`), or export to `-` and \
             purge once what read it has kept the records."
        );
        Box::new(std::io::stdout())
    } else {
        Box::new(Synced(std::io::BufWriter::new(create_durably(
            &args.output,
        )?)))
    };
    let mode = Mode::Export(out, args.delete);
    let ok = drive(session, &args.filter, args.limit, mode, "exported", false).await?;
    if args.output.as_os_str() != "-" {
        eprintln!("Written to {}.", args.output.display());
    }
    Ok(ok)
}

/// Counts matching records (for purge's confirmation); changes nothing.
async fn count_matching(
    session: &Session,
    filter: &FilterArgs,
    limit: Option<usize>,
) -> anyhow::Result<usize> {
    let mut walker = session.walker().await?;
    let mut matching = 0;
    let walked: anyhow::Result<()> = async {
        while !session.shutdown.is_cancelled() && limit.is_none_or(|l| matching < l) {
            let batch = walker.next().await?;
            if batch.is_empty() {
                break;
            }
            for records in batch.into_iter().filter_map(|t| t.records.ok()) {
                matching += records.iter().filter(|r| filter.matches(r)).count();
            }
        }
        Ok(())
    }
    .await;
    walker.release().await;
    walked?;
    Ok(limit.map_or(matching, |l| matching.min(l)))
}

async fn drive(
    session: &Session,
    filter: &FilterArgs,
    limit: Option<usize>,
    mut mode: Mode,
    verb: &'static str,
    json: bool,
) -> anyhow::Result<bool> {
    let mut walker = session.walker().await?;
    let counters = Arc::new(Counters::default());
    let shown = counters.clone();
    let progress = session.progress(&walker, move |elapsed| {
        let done = shown.done.load(Relaxed);
        let rate = done as f64 / elapsed.as_secs_f64().max(0.001);
        format!(
            "matched {} · {verb} {} · skipped {} · failed {} · {rate:.0}/s",
            count(shown.matched.load(Relaxed)),
            count(done),
            count(shown.skipped.load(Relaxed)),
            count(shown.failed.load(Relaxed)),
        )
    });
    let mut tally = Tally::default();
    let outcome = walk_and_act(
        session,
        &mut walker,
        filter,
        limit,
        &mut mode,
        &counters,
        &mut tally,
    )
    .await;
    progress.finish().await;
    let walked = walker.seen.messages.load(Relaxed);
    let unseen = walker.unseen();
    let unreleased = walker.release().await;
    let interrupted = session.shutdown.is_cancelled();

    let (done, failed) = (counters.done.load(Relaxed), counters.failed.load(Relaxed));
    if json {
        let skipped: serde_json::Map<String, serde_json::Value> = tally
            .skipped
            .iter()
            .map(|(k, v)| (k.code().to_owned(), (*v).into()))
            .collect();
        let mut out = serde_json::json!({
            "queue": session.queue_name(),
            "filter": filter.describe(),
            "matched": counters.matched.load(Relaxed),
            "skipped": skipped,
            "failed": failed,
            "removed": tally.removed,
            "not_removed": tally.not_removed,
            "duplicates": tally.duplicates,
            "messages_walked": walked,
            "messages_unseen": unseen,
            "messages_unreadable": tally.unreadable,
            "complete": outcome.is_ok() && !interrupted,
        });
        out[verb.replace(' ', "_")] = done.into();
        crate::stdout(&format!("{out}\n"));
    } else {
        let mut line = format!(
            "{} {} of {} matching ({}); skipped {}; failed {}.",
            capitalise(verb),
            count(done),
            count(counters.matched.load(Relaxed)),
            filter.describe(),
            count(counters.skipped.load(Relaxed)),
            count(failed),
        );
        if tally.not_removed > 0 {
            let where_now = if matches!(mode, Mode::Purge) {
                "they are still dead-lettered"
            } else {
                "they are in both places"
            };
            line.push_str(&format!(
                " {} of them could not be removed from the dead-letter queue (another reader took them after --hold ran out); {where_now}.",
                count(tally.not_removed)
            ));
        }
        if tally.duplicates > 0 {
            line.push_str(&format!(
                " {} more records repeated one of these (the processor redid work) and were not {verb} again.",
                count(tally.duplicates)
            ));
        }
        line.push('\n');
        for (skip, n) in &tally.skipped {
            line.push_str(&format!("  skipped {}: {}\n", count(*n), skip.as_str()));
        }
        // An export may be writing records to standard output; its tally goes to stderr.
        if matches!(mode, Mode::Export(..)) {
            eprint!("{line}");
        } else {
            crate::stdout(&line);
        }
    }
    session.report_walk(walked, unseen, tally.unreadable, unreleased, interrupted);
    outcome?;
    Ok(failed == 0 && !interrupted)
}

/// One matching record and what becomes of it.
struct Chosen {
    record: DeadLetter,
    /// Set once the record is safe where it goes (or, for purge, may simply go).
    safe: bool,
    id: u64,
    /// A duplicate of a record chosen before: not placed itself; safe when that one is.
    twin: bool,
}

async fn walk_and_act(
    session: &Session,
    walker: &mut Walker,
    filter: &FilterArgs,
    limit: Option<usize>,
    mode: &mut Mode,
    counters: &Counters,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    let dry_run = matches!(mode, Mode::Replay(Replay { dry_run: true, .. }));
    while !session.shutdown.is_cancelled() {
        // The limit counts records taken, duplicates included (what a purge confirmed).
        let taken_so_far = counters.matched.load(Relaxed) + tally.duplicates;
        if limit.is_some_and(|l| taken_so_far >= l) {
            break;
        }
        let batch = walker.next().await?;
        if batch.is_empty() {
            break;
        }
        // Records per message: (staying, chosen). Unreadable messages are left untouched.
        let mut plan: Vec<(String, Vec<DeadLetter>, Vec<Chosen>)> = Vec::new();
        for taken in batch {
            let Ok(records) = taken.records else {
                tally.unreadable += 1;
                continue;
            };
            let mut staying = Vec::new();
            let mut chosen = Vec::new();
            for record in records {
                let room =
                    limit.is_none_or(|l| counters.matched.load(Relaxed) + tally.duplicates < l);
                if !room || !filter.matches(&record) {
                    staying.push(record);
                    continue;
                }
                let id = record.identity();
                if tally.chosen.contains(&id) {
                    tally.duplicates += 1;
                    chosen.push(Chosen {
                        record,
                        safe: false,
                        id,
                        twin: true,
                    });
                    continue;
                }
                counters.matched.fetch_add(1, Relaxed);
                if let Some(skip) = skip_reason(mode, &record) {
                    counters.skipped.fetch_add(1, Relaxed);
                    *tally.skipped.entry(skip).or_default() += 1;
                    staying.push(record);
                    continue;
                }
                tally.chosen.insert(id);
                chosen.push(Chosen {
                    record,
                    safe: false,
                    id,
                    twin: false,
                });
            }
            if !chosen.is_empty() {
                plan.push((taken.id, staying, chosen));
            }
        }
        let mut chosen: Vec<&mut Chosen> = plan
            .iter_mut()
            .flat_map(|(_, _, c)| c.iter_mut())
            .filter(|c| !c.twin)
            .collect();
        if dry_run {
            counters.done.fetch_add(chosen.len(), Relaxed);
            continue;
        }
        place(mode, &mut chosen, counters).await?;
        for c in plan.iter().flat_map(|(_, _, c)| c) {
            if c.safe {
                tally.safe.insert(c.id);
            }
        }
        for c in plan.iter_mut().flat_map(|(_, _, c)| c.iter_mut()) {
            if c.twin {
                c.safe = tally.safe.contains(&c.id);
            }
        }

        // Remove what is safe; a record that did not make it stays in its message.
        let mut changes = Vec::new();
        let mut moved: BTreeMap<String, usize> = BTreeMap::new();
        for (id, mut staying, chosen) in plan {
            let mut any = 0;
            for c in chosen {
                if c.safe {
                    any += 1;
                } else {
                    staying.push(c.record);
                }
            }
            if any > 0 {
                moved.insert(id.clone(), any);
                changes.push((id, staying));
            }
        }
        for (id, result) in walker.settle(changes).await {
            let n = moved.get(&id).copied().unwrap_or(0);
            match result {
                Ok(Settled::Deleted | Settled::Rewritten) => tally.removed += n,
                Ok(Settled::Gone) => tally.not_removed += n,
                Err(error) => {
                    tracing::warn!(%error, "Cannot remove records from a dead-letter message; they stay in it (and are now in both places).");
                    tally.not_removed += n;
                }
            }
        }
    }
    if let Mode::Export(out, _) = mode {
        out.flush()?;
    }
    Ok(())
}

fn skip_reason(mode: &Mode, record: &DeadLetter) -> Option<Skip> {
    let Mode::Replay(replay) = mode else {
        return None;
    };
    if record.reason == Reason::InvalidEnvelope {
        Some(Skip::NotADeviceMessage)
    } else if record.payload_truncated || record.payload_bytes().is_err() {
        Some(Skip::Truncated)
    } else if record.replay_count >= replay.max_replays && !replay.force {
        Some(Skip::ReplayLimit)
    } else {
        None
    }
}

/// Makes the chosen records safe where they go, marking each that is.
async fn place(
    mode: &mut Mode,
    chosen: &mut [&mut Chosen],
    counters: &Counters,
) -> anyhow::Result<()> {
    match mode {
        Mode::Purge => {
            for c in chosen.iter_mut() {
                c.safe = true;
            }
            counters.done.fetch_add(chosen.len(), Relaxed);
        }
        Mode::Export(out, delete) => {
            for c in chosen.iter() {
                writeln!(out, "{}", c.record.to_json_line())?;
            }
            // On disk before anything leaves the queue.
            out.flush()?;
            counters.done.fetch_add(chosen.len(), Relaxed);
            if *delete {
                for c in chosen.iter_mut() {
                    c.safe = true;
                }
            }
        }
        Mode::Replay(replay) => replay.put(chosen, counters).await,
    }
    Ok(())
}

impl Replay {
    /// Puts the records into the target queue, packed into envelopes (at most `--rate` records
    /// each, so pacing stays smooth).
    async fn put(&mut self, chosen: &mut [&mut Chosen], counters: &Counters) {
        let per_envelope = self.pacer.as_ref().map_or(usize::MAX, |p| p.rate as usize);
        let mut start = 0;
        while start < chosen.len() && !self.shutdown.is_cancelled() {
            let mut builder = EnvelopeBuilder::default();
            let mut end = start;
            while end < chosen.len() && end - start < per_envelope {
                if builder.push(self.message(&chosen[end].record)).is_err() {
                    break;
                }
                end += 1;
            }
            if end == start {
                // Cannot happen: any record fits an empty envelope. Counted, not looped on.
                counters.failed.fetch_add(1, Relaxed);
                start += 1;
                continue;
            }
            if let Some(pacer) = &mut self.pacer {
                tokio::select! {
                    _ = self.shutdown.cancelled() => break,
                    _ = pacer.wait(end - start) => {}
                }
            }
            let n = end - start;
            let text = builder.finish();
            match retried(|| self.target.put(text.clone())).await {
                Ok(()) => {
                    for c in &mut chosen[start..end] {
                        c.safe = true;
                    }
                    counters.done.fetch_add(n, Relaxed);
                }
                Err(error) => {
                    tracing::warn!(%error, records = n, "Cannot put replayed records into the target queue; they stay dead-lettered.");
                    counters.failed.fetch_add(n, Relaxed);
                }
            }
            start = end;
        }
    }

    /// The device message a record replays as.
    fn message(&self, record: &DeadLetter) -> DeviceMessage {
        // Records with unreadable payloads are skipped before this.
        let payload = record.payload_bytes().unwrap_or_default();
        let received_at_ms =
            timefmt::parse_rfc3339_ms(&record.received_at).unwrap_or_else(timefmt::now_ms);
        let mut msg = DeviceMessage::from_mqtt(&record.topic, &payload, received_at_ms);
        msg.replay_count = record.replay_count.saturating_add(1);
        msg.overrides = self.overrides.clone();
        msg
    }
}

/// Spaces puts so that records go out at `rate` per second on average.
struct Pacer {
    rate: u32,
    next: Instant,
}

impl Pacer {
    fn new(rate: u32) -> Self {
        Self {
            rate,
            next: Instant::now(),
        }
    }

    async fn wait(&mut self, records: usize) {
        let now = Instant::now();
        if self.next > now {
            tokio::time::sleep_until(self.next).await;
        } else {
            self.next = now;
        }
        self.next += Duration::from_secs_f64(records as f64 / f64::from(self.rate));
    }
}

/// Creates `path` (never overwriting) and syncs its directory, so the file's name survives a
/// crash as well as the data later synced into it.
fn create_durably(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| anyhow::anyhow!("cannot sync directory {}: {e}", dir.display()))?;
    Ok(file)
}

/// A file writer whose flush also syncs to disk, so "flushed" means "survives a crash".
struct Synced(std::io::BufWriter<std::fs::File>);

impl Write for Synced {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()?;
        self.0.get_ref().sync_data()
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|first| first.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}
