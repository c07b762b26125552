//! `import`: records from a JSON Lines file (as `export` writes them) back into a dead-letter
//! queue, packed many per message.
//!
//! A file is read twice: once to check every line, so a bad line stops the import before
//! anything is added, then to add. Standard input is read once; a bad line stops it there.
//! Import is at-least-once: after an interruption, running it again adds again what had been
//! added (replaying a duplicate is harmless: readings are upserts).

use crate::config::ImportArgs;
use crate::filter::FilterArgs;
use crate::summary::count;
use crate::walk::retried;
use crate::Session;
use schemas::dead_letter::{self, DeadLetter};
use std::io::BufRead;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// Records read before they are packed and put.
const RECORDS_PER_FLUSH: usize = 1024;

pub async fn import(session: &Session, args: &ImportArgs) -> anyhow::Result<bool> {
    let queue = session.account.queue(session.queue_name());
    retried(|| queue.create_if_missing()).await.map_err(|e| {
        anyhow::Error::new(e).context(format!("cannot create queue {:?}", session.queue_name()))
    })?;
    let from_stdin = args.input.as_os_str() == "-";
    let total = if from_stdin {
        None
    } else {
        Some(check_file(&args.input)?)
    };
    let reader: Box<dyn BufRead + Send> = if from_stdin {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(open(&args.input)?))
    };

    let added = Arc::new(AtomicUsize::new(0));
    let shown = added.clone();
    let progress = infra::progress::Progress::start(session.log_format, move |elapsed| {
        let n = shown.load(Relaxed);
        let rate = n as f64 / elapsed.as_secs_f64().max(0.001);
        match total {
            Some(t) => format!(
                "{} {}/{} records added · {rate:.0}/s",
                infra::progress::bar(n, t, 20),
                count(n),
                count(t)
            ),
            None => format!("{} records added · {rate:.0}/s", count(n)),
        }
    });
    let result = add_all(session, reader, &args.filter, &added).await;
    progress.finish().await;
    let (filtered_out, lines) = result?;
    let interrupted = session.shutdown.is_cancelled();
    eprintln!(
        "Added {} records to {} from {} lines ({} did not match the filter){}.",
        count(added.load(Relaxed)),
        session.queue_name(),
        count(lines),
        count(filtered_out),
        if interrupted { "; interrupted" } else { "" }
    );
    Ok(!interrupted)
}

fn open(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::File::open(path).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))
}

/// Checks every line of `path`; returns the number of records.
fn check_file(path: &Path) -> anyhow::Result<usize> {
    let mut records = 0;
    for (i, line) in std::io::BufReader::new(open(path)?).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        parse(&line, i + 1, path)?;
        records += 1;
    }
    Ok(records)
}

fn parse(line: &str, number: usize, path: &Path) -> anyhow::Result<DeadLetter> {
    serde_json::from_str(line).map_err(|e| {
        anyhow::anyhow!(
            "{} line {number} is not a dead-letter record: {e}; nothing after it was added",
            path.display()
        )
    })
}

/// Adds the matching records; returns (records filtered out, lines read).
async fn add_all(
    session: &Session,
    reader: Box<dyn BufRead + Send>,
    filter: &FilterArgs,
    added: &AtomicUsize,
) -> anyhow::Result<(usize, usize)> {
    let queue = session.account.queue(session.queue_name());
    let mut pending: Vec<DeadLetter> = Vec::new();
    let (mut filtered_out, mut lines) = (0, 0);
    let flush = |pending: &mut Vec<DeadLetter>| {
        let records = std::mem::take(pending);
        let queue = queue.clone();
        async move {
            for (text, held) in dead_letter::pack(&records) {
                retried(|| queue.put(text.clone())).await.map_err(|e| {
                    anyhow::Error::new(e).context("cannot add records to the queue")
                })?;
                added.fetch_add(held.len(), Relaxed);
            }
            anyhow::Ok(())
        }
    };
    let source = Path::new("input");
    for line in reader.lines() {
        if session.shutdown.is_cancelled() {
            break;
        }
        let line = line?;
        lines += 1;
        if line.trim().is_empty() {
            continue;
        }
        let record = parse(&line, lines, source)?;
        if !filter.matches(&record) {
            filtered_out += 1;
            continue;
        }
        pending.push(record);
        if pending.len() >= RECORDS_PER_FLUSH {
            flush(&mut pending).await?;
        }
    }
    flush(&mut pending).await?;
    Ok((filtered_out, lines))
}
