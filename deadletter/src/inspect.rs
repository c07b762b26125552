//! `list` and `show`: walks that change nothing.

use crate::config::{ListArgs, ShowArgs};
use crate::summary::{count, rows_table, terminal_safe, Summary};
use crate::{record_id, stdout, Session};
use schemas::DeadLetter;
use std::sync::atomic::Ordering::Relaxed;

pub async fn list(session: &Session, args: &ListArgs) -> anyhow::Result<bool> {
    let mut walker = session.walker().await?;
    let progress = session.progress(&walker, |_| String::new());
    let mut summary = Summary::default();
    let mut rows = Vec::new();
    let mut unreadable = 0;
    let outcome: anyhow::Result<()> = async {
        while !session.shutdown.is_cancelled() {
            if args.limit.is_some_and(|limit| rows.len() >= limit) {
                break;
            }
            let batch = walker.next().await?;
            if batch.is_empty() {
                break;
            }
            for taken in batch {
                let Ok(records) = taken.records else {
                    unreadable += 1;
                    continue;
                };
                for record in records.into_iter().filter(|r| args.filter.matches(r)) {
                    match args.limit {
                        Some(limit) if rows.len() < limit => {
                            rows.push((record_id(&record), record))
                        }
                        Some(_) => {}
                        None => summary.add(&record),
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    progress.finish().await;
    let walked = walker.seen.messages.load(Relaxed);
    let unseen = walker.unseen();
    let unreleased = walker.release().await;
    outcome?;
    let interrupted = session.shutdown.is_cancelled();
    rows.sort_by(|a, b| a.1.received_at.cmp(&b.1.received_at));

    if args.json {
        let mut out = match args.limit {
            Some(_) => serde_json::json!({
                "records": rows.iter().map(|(id, r)| with_id(id, r)).collect::<Vec<_>>()
            }),
            None => summary.to_json(),
        };
        out["queue"] = session.queue_name().into();
        out["filter"] = args.filter.describe().into();
        out["messages_walked"] = walked.into();
        out["messages_unseen"] = unseen.into();
        out["messages_unreadable"] = unreadable.into();
        out["complete"] = (!interrupted && args.limit.is_none()).into();
        stdout(&format!("{out}\n"));
    } else {
        match args.limit {
            Some(_) => stdout(&rows_table(&rows)),
            None => {
                let duplicates = if summary.duplicates > 0 {
                    format!(
                        " ({} more records repeat one of them and are not counted)",
                        count(summary.duplicates)
                    )
                } else {
                    String::new()
                };
                stdout(&format!(
                    "{} dead letters match ({}) in queue {}{duplicates}.\n\n",
                    count(summary.records),
                    args.filter.describe(),
                    session.queue_name()
                ));
                if summary.records > 0 {
                    stdout(&summary.to_table());
                }
            }
        }
    }
    session.report_walk(walked, unseen, unreadable, unreleased, interrupted);
    Ok(!interrupted)
}

pub async fn show(session: &Session, args: &ShowArgs) -> anyhow::Result<bool> {
    let mut walker = session.walker().await?;
    let progress = session.progress(&walker, |_| String::new());
    let found: anyhow::Result<Option<DeadLetter>> = async {
        while !session.shutdown.is_cancelled() {
            let batch = walker.next().await?;
            if batch.is_empty() {
                break;
            }
            for record in batch.into_iter().filter_map(|t| t.records.ok()).flatten() {
                if record_id(&record) == args.id {
                    return Ok(Some(record));
                }
            }
        }
        Ok(None)
    }
    .await;
    progress.finish().await;
    let unseen = walker.unseen();
    walker.release().await;
    let Some(record) = found? else {
        let hint = if unseen > 0 {
            format!(" ({unseen} messages were held by another reader; try again shortly)")
        } else {
            String::new()
        };
        anyhow::bail!(
            "no dead letter with id {} in queue {}{hint}",
            args.id,
            session.queue_name()
        );
    };
    if args.json {
        stdout(&format!("{}\n", with_id(&args.id, &record)));
    } else {
        stdout(&render(&args.id, &record));
    }
    Ok(true)
}

/// The record's JSON with its id first.
fn with_id(id: &str, record: &DeadLetter) -> serde_json::Value {
    let mut value = serde_json::json!({ "id": id });
    if let (Some(map), Ok(serde_json::Value::Object(fields))) =
        (value.as_object_mut(), serde_json::to_value(record))
    {
        map.extend(fields);
    }
    value
}

/// A record for reading: its fields, then the payload, pretty-printed when it is JSON.
fn render(id: &str, r: &DeadLetter) -> String {
    let mut out = String::new();
    // Values may be device-controlled: escaped, so they cannot drive the terminal.
    let mut field = |name: &str, value: &str| {
        out.push_str(&format!("{name:<16} {}\n", terminal_safe(value, false)));
    };
    field("id", id);
    field("reason", r.reason.as_str());
    field("detail", &r.detail);
    field("device", r.device_id.as_deref().unwrap_or("(none)"));
    field("topic", &r.topic);
    if !r.rejected_indexes.is_empty() {
        let list: Vec<String> = r.rejected_indexes.iter().map(usize::to_string).collect();
        field(
            "rejected",
            &format!("elements {} of the array", list.join(", ")),
        );
    }
    field("received at", &r.received_at);
    field("dead-lettered", &r.dead_lettered_at);
    field("attempts", &r.attempts.to_string());
    field("source", &r.source);
    field("replays", &r.replay_count.to_string());
    if !r.overrides.is_none() {
        field(
            "overrides",
            &serde_json::to_string(&r.overrides).unwrap_or_default(),
        );
    }
    let size = if r.payload_truncated {
        format!("{} bytes (only the first part is kept)", r.payload_bytes)
    } else {
        format!("{} bytes", r.payload_bytes)
    };
    field("payload size", &size);
    out.push_str("payload:\n");
    match r.payload_bytes() {
        Ok(bytes) => {
            let pretty = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| serde_json::to_string_pretty(&v).ok());
            match (pretty, std::str::from_utf8(&bytes)) {
                (Some(json), _) => out.push_str(&terminal_safe(&json, true)),
                (None, Ok(text)) => out.push_str(&terminal_safe(text, true)),
                (None, Err(_)) => {
                    out.push_str("(not UTF-8; base64) ");
                    out.push_str(r.payload_base64.as_deref().unwrap_or_default());
                }
            }
        }
        Err(e) => out.push_str(&format!("(unreadable: {e})")),
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::dead_letter::Refusal;
    use schemas::{DeviceMessage, Reason};

    #[test]
    fn shows_json_payloads_pretty_and_binary_as_base64() {
        let refusal = || Refusal {
            reason: Reason::OutOfRange,
            detail: "[1] out_of_range: temperature 900".into(),
            device_id: Some("d-1".into()),
            rejected_indexes: vec![1],
            attempts: 1,
            dead_lettered_at_ms: 0,
        };
        let msg = DeviceMessage::from_mqtt("devices/d-1/telemetry", br#"[{"a":1},{"b":2}]"#, 0);
        let text = render("abc", &DeadLetter::new(&msg, refusal()));
        assert!(
            text.contains("rejected         elements 1 of the array"),
            "{text}"
        );
        assert!(text.contains("[\n  {\n    \"a\": 1\n  },"), "{text}");
        let msg = DeviceMessage::from_mqtt("devices/d-1/telemetry", &[0xff, 0xfe], 0);
        let text = render("abc", &DeadLetter::new(&msg, refusal()));
        assert!(text.contains("(not UTF-8; base64) //4="), "{text}");
        assert_eq!(
            with_id("abc", &DeadLetter::new(&msg, refusal()))["id"],
            "abc"
        );
    }
}
