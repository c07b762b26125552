//! `quarantine`: the ingest queue messages the processor could not decode (wholly or in part),
//! kept whole, exactly as they were. Each also has an `invalid_envelope` dead letter per
//! unreadable part; the quarantined text is what can be replayed.
//!
//! `list` shows them and why each cannot be decoded; `replay` puts each back on the ingest
//! queue unchanged (once a processor that reads it runs) and removes it from quarantine only
//! after the ingest queue holds it; `purge --yes` deletes them. Every command takes the
//! messages for `--hold` and gives back what it leaves, so a killed run loses nothing.

use crate::config::{QuarantineAction, QuarantineArgs};
use crate::summary::{count, terminal_safe};
use crate::walk::{depth_of, retried};
use crate::Session;
use infra::storage::{Queue, QueueMessage};
use schemas::envelope;
use std::time::Duration;

/// Most messages one `list` shows.
const LIST_LIMIT: usize = 1000;

pub async fn run(session: &Session, args: &QuarantineArgs) -> anyhow::Result<bool> {
    let queue = session.account.queue(&args.quarantine_queue);
    let depth = depth_of(
        &queue,
        "--quarantine-queue",
        "the processor's PROCESSOR_QUARANTINE_QUEUE",
    )
    .await?;
    match &args.action {
        QuarantineAction::List { json } => list(session, &queue, *json).await,
        QuarantineAction::Replay { target_queue } => {
            let target = session.account.queue(target_queue);
            depth_of(&target, "--target-queue", "the ingest queue").await?;
            settle(session, &queue, depth, Some(&target)).await
        }
        QuarantineAction::Purge { yes } => {
            anyhow::ensure!(
                *yes,
                "purge deletes quarantined messages for good; pass --yes (see them first with `quarantine list`)"
            );
            settle(session, &queue, depth, None).await
        }
    }
}

/// Why the processor could not decode `text`, in one line.
fn problem(text: &str) -> String {
    match envelope::decode_entries(text) {
        Err(error) => error.to_string(),
        Ok((good, bad)) if bad.is_empty() => format!(
            "{} device messages, all readable (a processor of this version reads it)",
            good.len()
        ),
        Ok((good, bad)) => format!(
            "{} of {} entries unreadable; first: entry {}: {}",
            bad.len(),
            bad.len() + good.len(),
            bad[0].index,
            bad[0].error
        ),
    }
}

async fn list(session: &Session, queue: &Queue, json: bool) -> anyhow::Result<bool> {
    let mut held: Vec<QueueMessage> = Vec::new();
    while held.len() < LIST_LIMIT && !session.shutdown.is_cancelled() {
        let got = retried(|| queue.get(32, session.hold)).await?;
        if got.is_empty() {
            break;
        }
        held.extend(got);
    }
    let rows: Vec<serde_json::Value> = held
        .iter()
        .map(|m| {
            serde_json::json!({
                "id": m.id,
                "bytes": m.text.len(),
                "deliveries": m.dequeue_count,
                "problem": problem(&m.text),
            })
        })
        .collect();
    if json {
        crate::stdout(&format!("{}\n", serde_json::Value::Array(rows)));
    } else {
        let mut out = format!("{} quarantined messages\n", count(held.len()));
        for (m, row) in held.iter().zip(&rows) {
            out.push_str(&format!(
                "{}  {:>6} B  {}\n",
                terminal_safe(&m.id, false),
                m.text.len(),
                terminal_safe(row["problem"].as_str().unwrap_or_default(), false)
            ));
        }
        crate::stdout(&out);
    }
    if held.len() >= LIST_LIMIT {
        eprintln!("Showing the first {LIST_LIMIT}; replay or purge to see the rest.");
    }
    // Give everything back at once; what cannot be given back reappears after --hold. One
    // gone (retaken after the hold ran out, or given back by a try whose answer was lost) is
    // not held here any more.
    let mut unreleased = 0;
    for m in &held {
        match retried(|| queue.hide(m, Duration::ZERO)).await {
            Err(e) if !e.is_gone() => unreleased += 1,
            _ => {}
        }
    }
    if unreleased > 0 {
        eprintln!(
            "{} messages could not be given back; they reappear within {}.",
            count(unreleased),
            humantime::format_duration(session.hold)
        );
    }
    Ok(true)
}

/// Replays each quarantined message into `target` (or, without one, purges it), then deletes
/// it from quarantine. A message whose put fails stays in quarantine.
async fn settle(
    session: &Session,
    queue: &Queue,
    depth: usize,
    target: Option<&Queue>,
) -> anyhow::Result<bool> {
    let verb = if target.is_some() {
        "replayed"
    } else {
        "purged"
    };
    let (mut done, mut failed) = (0, 0);
    // Only what was there at the start: a replayed message that is still unreadable comes
    // back to quarantine, and must not be replayed again in a loop.
    while done + failed < depth {
        if session.shutdown.is_cancelled() {
            eprintln!("Interrupted; messages held reappear within the hold.");
            break;
        }
        let got = retried(|| queue.get(32, session.hold)).await?;
        if got.is_empty() {
            break;
        }
        for m in got {
            if let Some(target) = target {
                if let Err(error) = retried(|| target.put(m.text.clone())).await {
                    tracing::warn!(%error, id = %m.id, "Cannot put a message back; it stays in quarantine.");
                    failed += 1;
                    continue;
                }
            }
            match retried(|| queue.delete(&m)).await {
                Ok(()) => done += 1,
                Err(e) if e.is_gone() => done += 1,
                Err(error) => {
                    // Replayed and still in quarantine: a later replay repeats it (harmless).
                    tracing::warn!(%error, id = %m.id, "Cannot remove a message from quarantine.");
                    failed += 1;
                }
            }
        }
    }
    eprintln!(
        "{} of about {} quarantined messages {verb}{}.",
        count(done),
        count(depth),
        if failed > 0 {
            format!("; {} failed and stay (run again)", count(failed))
        } else {
            String::new()
        }
    );
    Ok(failed == 0 && !session.shutdown.is_cancelled())
}
