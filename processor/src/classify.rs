//! The pure half of a round: what each queue message holds, and what must become of it.
//!
//! Every envelope is decoded entry by entry and every reading validated. The result says, per
//! queue message, which rows to write, which refusals to dead-letter, and whether the message
//! must be kept somewhere before it may leave the queue. No storage is touched here, so unit
//! tests drive it from fixtures; [`crate::round`] carries out the effects.

use crate::plan::Pending;
use schemas::dead_letter::{DeadLetter, Refusal};
use schemas::envelope::{self, DecodeError, DeviceMessage};
use schemas::reading::{self, Policy, Rejection};
use schemas::Reason;

/// Most rejections spelled out in one dead-letter detail.
const DETAIL_REJECTIONS: usize = 10;

/// The rules a round applies.
#[derive(Debug, Clone)]
pub struct Rules {
    pub topic_prefix: String,
    pub policy: Policy,
    /// Named in the records of unreadable messages, which are kept whole there.
    pub quarantine_queue: String,
}

/// Where a row came from: the queue message's position in the round, and the device
/// message's position in its envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Origin {
    pub message: usize,
    pub device: usize,
}

/// What must be kept of a queue message before it may be deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Nothing: its rows and refusals account for all of it.
    Nothing,
    /// Its whole text, in the quarantine queue: some or all of it could not be decoded.
    Quarantine,
    /// The message itself: an envelope version this build cannot read, left queued for a
    /// processor that can. It is never deleted, dead-lettered or poisoned here.
    Queued(u64),
}

/// One queue message, sorted. It keeps no copy of its device messages: a round holds the
/// queue text, and the rare path that needs them again decodes it again ([`decode_again`]).
#[derive(Debug)]
pub struct Sorted {
    /// When each device message that decoded was received, in envelope order (rows point
    /// into these by [`Origin::device`]).
    pub received_at_ms: Vec<i64>,
    /// Dead-letter records: refused readings and unreadable entries.
    pub refusals: Vec<DeadLetter>,
    pub keep: Keep,
}

#[derive(Debug)]
pub struct Classified {
    /// Per queue message, in the order given.
    pub messages: Vec<Sorted>,
    /// The valid readings, with where each came from.
    pub rows: Vec<(Origin, Pending)>,
}

/// Sorts the queue messages of a round: `(text, deliveries so far)` each.
pub fn classify<'a>(
    messages: impl IntoIterator<Item = (&'a str, u64)>,
    rules: &Rules,
    now_ms: i64,
) -> Classified {
    let mut out = Classified {
        messages: Vec::new(),
        rows: Vec::new(),
    };
    for (message, (text, attempts)) in messages.into_iter().enumerate() {
        let mut sorted = Sorted {
            received_at_ms: Vec::new(),
            refusals: Vec::new(),
            keep: Keep::Nothing,
        };
        let decoded = match envelope::decode_entries(text) {
            Ok((devices, bad)) => {
                for entry in bad {
                    sorted.keep = Keep::Quarantine;
                    let detail = format!(
                        "envelope entry {} is unreadable: {}; the whole queue message is kept in queue {}",
                        entry.index, entry.error, rules.quarantine_queue
                    );
                    sorted.refusals.push(DeadLetter::for_unreadable(
                        &entry.json,
                        detail,
                        attempts,
                        now_ms,
                    ));
                }
                devices
            }
            Err(DecodeError::Version(version)) => {
                sorted.keep = Keep::Queued(version);
                Vec::new()
            }
            Err(error) => {
                sorted.keep = Keep::Quarantine;
                let detail = format!(
                    "{error}; the whole queue message is kept in queue {}",
                    rules.quarantine_queue
                );
                sorted
                    .refusals
                    .push(DeadLetter::for_unreadable(text, detail, attempts, now_ms));
                Vec::new()
            }
        };
        for (device, msg) in decoded.iter().enumerate() {
            let outcome = reading::validate(
                &rules.topic_prefix,
                &msg.topic,
                &msg.payload,
                msg.original_len,
                now_ms,
                &rules.policy,
                &msg.overrides,
            );
            for reading in outcome.readings {
                let origin = Origin { message, device };
                let ingested_at_ms = msg.received_at_ms;
                out.rows.push((
                    origin,
                    Pending {
                        reading,
                        ingested_at_ms,
                        backfill: msg.overrides.allow_stale,
                    },
                ));
            }
            if !outcome.rejections.is_empty() {
                let record = refusal(rules, msg, &outcome.rejections, attempts, now_ms);
                sorted.refusals.push(record);
            }
        }
        sorted.received_at_ms = decoded.iter().map(|d| d.received_at_ms).collect();
        out.messages.push(sorted);
    }
    out
}

/// The device messages of a queue message's text, in the order [`classify`] numbered them.
/// Decoding is deterministic, so an [`Origin::device`] found then points into these now.
pub fn decode_again(text: &str) -> Vec<DeviceMessage> {
    envelope::decode_entries(text)
        .map(|(devices, _)| devices)
        .unwrap_or_default()
}

/// The dead-letter record for a device message with refused readings.
fn refusal(
    rules: &Rules,
    msg: &DeviceMessage,
    rejections: &[Rejection],
    attempts: u64,
    now_ms: i64,
) -> DeadLetter {
    let first = &rejections[0];
    let detail = if rejections.len() == 1 && first.index.is_none() {
        first.detail.clone()
    } else {
        let mut parts: Vec<String> = rejections
            .iter()
            .take(DETAIL_REJECTIONS)
            .map(|r| match r.index {
                Some(i) => format!("[{i}] {}: {}", r.reason, r.detail),
                None => format!("{}: {}", r.reason, r.detail),
            })
            .collect();
        if rejections.len() > DETAIL_REJECTIONS {
            parts.push(format!("and {} more", rejections.len() - DETAIL_REJECTIONS));
        }
        parts.join("; ")
    };
    record(
        rules,
        msg,
        first.reason,
        detail,
        rejections.iter().filter_map(|r| r.index).collect(),
        attempts,
        now_ms,
    )
}

/// A dead-letter record for `msg`, with the device its topic names.
pub fn record(
    rules: &Rules,
    msg: &DeviceMessage,
    reason: Reason,
    detail: String,
    rejected_indexes: Vec<usize>,
    attempts: u64,
    now_ms: i64,
) -> DeadLetter {
    let device_id = reading::device_id_from_topic(&rules.topic_prefix, &msg.topic)
        .filter(|id| reading::is_valid_device_id(id))
        .map(str::to_owned);
    DeadLetter::new(
        msg,
        Refusal {
            reason,
            detail,
            device_id,
            rejected_indexes,
            attempts,
            dead_lettered_at_ms: now_ms,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use schemas::EnvelopeBuilder;

    const NOW: i64 = 1_700_000_000_000;

    fn rules() -> Rules {
        Rules {
            topic_prefix: "devices".into(),
            policy: Policy::default(),
            quarantine_queue: "quarantine".into(),
        }
    }

    fn reading(device: &str, at_ms: i64, temperature: &str) -> (String, Vec<u8>) {
        let at = schemas::timefmt::format_ms(at_ms);
        let payload =
            format!(r#"{{"deviceId":"{device}","timestamp":"{at}","temperature":{temperature}}}"#);
        (format!("devices/{device}/telemetry"), payload.into_bytes())
    }

    fn envelope(messages: &[(String, Vec<u8>)]) -> String {
        let mut b = EnvelopeBuilder::default();
        for (topic, payload) in messages {
            b.push(DeviceMessage::from_mqtt(topic, payload, NOW))
                .expect("fits");
        }
        b.finish()
    }

    fn b64(json: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(json)
    }

    #[test]
    fn valid_readings_become_rows_and_invalid_ones_refusals() {
        let text = envelope(&[
            reading("a", NOW - 1_000, "20.5"),
            reading("b", NOW - 2_000, "999"),
            reading("a", NOW - 500, "21"),
        ]);
        let c = classify([(text.as_str(), 1)], &rules(), NOW);
        assert_eq!(c.rows.len(), 2);
        assert_eq!(
            c.rows.iter().map(|(o, _)| o.device).collect::<Vec<_>>(),
            [0, 2]
        );
        let m = &c.messages[0];
        assert_eq!(m.keep, Keep::Nothing);
        assert_eq!(m.refusals.len(), 1);
        assert_eq!(m.refusals[0].reason, Reason::OutOfRange);
        assert_eq!(m.refusals[0].device_id.as_deref(), Some("b"));
        let latest = crate::devices::newest(c.rows.iter().map(|(_, p)| (&p.reading, 0)));
        assert_eq!(latest["a"].0.measured_at_ms, NOW - 500);
        assert!(!latest.contains_key("b"));
    }

    #[test]
    fn an_unreadable_message_is_quarantined_whole_and_named() {
        let garbage = "not base64 %%%";
        let c = classify([(garbage, 3)], &rules(), NOW);
        let m = &c.messages[0];
        assert_eq!(m.keep, Keep::Quarantine);
        assert!(m.received_at_ms.is_empty() && c.rows.is_empty());
        assert_eq!(m.refusals[0].reason, Reason::InvalidEnvelope);
        assert_eq!(m.refusals[0].attempts, 3);
        assert!(m.refusals[0].detail.contains("kept in queue quarantine"));
    }

    #[test]
    fn one_bad_entry_is_refused_and_the_rest_stored() {
        let (topic, payload) = reading("a", NOW - 1_000, "20");
        let good = format!(
            r#"{{"t":"{topic}","r":{NOW},"p":{}}}"#,
            serde_json::to_string(std::str::from_utf8(&payload).unwrap()).unwrap()
        );
        let text = b64(&format!(r#"{{"v":1,"m":[{good},{{"t":"x","r":1}}]}}"#));
        let c = classify([(text.as_str(), 1)], &rules(), NOW);
        let m = &c.messages[0];
        assert_eq!(c.rows.len(), 1);
        assert_eq!(m.received_at_ms, [NOW]);
        assert_eq!(m.keep, Keep::Quarantine);
        assert_eq!(m.refusals.len(), 1);
        assert_eq!(m.refusals[0].reason, Reason::InvalidEnvelope);
        assert!(m.refusals[0].detail.contains("entry 1"));
    }

    #[test]
    fn a_rows_origin_points_at_its_device_message_when_decoded_again() {
        // The refusal and poison paths find a row's device message by decoding the text
        // again: an unreadable entry between readable ones must not shift the positions.
        let entry = |(topic, payload): (String, Vec<u8>), received: i64| {
            let payload = serde_json::to_string(std::str::from_utf8(&payload).unwrap()).unwrap();
            format!(r#"{{"t":"{topic}","r":{received},"p":{payload}}}"#)
        };
        let a = entry(reading("a", NOW - 1_000, "20"), NOW - 3);
        let b = entry(reading("b", NOW - 900, "21"), NOW - 2);
        let text = b64(&format!(r#"{{"v":1,"m":[{a},{{"t":"x","r":1}},{b}]}}"#));
        let c = classify([(text.as_str(), 1)], &rules(), NOW);
        assert_eq!(c.messages[0].received_at_ms, [NOW - 3, NOW - 2]);
        let again = decode_again(&text);
        assert_eq!(c.rows.len(), 2);
        for (origin, row) in &c.rows {
            let device = &again[origin.device];
            assert_eq!(
                device.topic,
                format!("devices/{}/telemetry", row.reading.device_id)
            );
            assert_eq!(
                device.received_at_ms,
                c.messages[0].received_at_ms[origin.device]
            );
        }
    }

    #[test]
    fn another_envelope_version_stays_queued_untouched() {
        let text = b64(r#"{"v":2,"m":{"a":"new shape"}}"#);
        let c = classify([(text.as_str(), 9)], &rules(), NOW);
        let m = &c.messages[0];
        assert_eq!(m.keep, Keep::Queued(2));
        assert!(m.refusals.is_empty() && m.received_at_ms.is_empty() && c.rows.is_empty());
    }
}
