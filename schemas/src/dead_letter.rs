//! The dead-letter record: everything an operator needs to see why a message was refused and
//! to replay it, including the byte-exact original payload.
//!
//! Wire form on the dead-letter queue: standard base64 of `{"v":1,"d":[record, ...]}`, like
//! the envelope. Packing many records per queue message keeps the dead-letter queue shallow,
//! which is what makes walking it cheap (every per-message operation on a deep queue costs
//! more, on the emulator far more). [`decode_message`] also reads the earlier form, one
//! record's JSON per queue message.

use crate::envelope::DeviceMessage;
use crate::framed::Framed;
use crate::reading::Override;
use crate::reason::Reason;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

pub const DEAD_LETTER_VERSION: u32 = 1;
/// Longest `detail`, in bytes; longer explanations are cut.
pub const MAX_DETAIL_BYTES: usize = 2048;

const HEADER: &[u8] = b"{\"v\":1,\"d\":[";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub v: u32,
    pub reason: Reason,
    /// Human-readable explanation, e.g. which field of which array element failed.
    pub detail: String,
    pub topic: String,
    /// The device the topic names, when it names one; for filtering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Positions of the refused readings in a gateway array; empty for single readings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected_indexes: Vec<usize>,
    /// When ingest received the message (RFC 3339, UTC, milliseconds).
    pub received_at: String,
    /// When the processor dead-lettered it.
    pub dead_lettered_at: String,
    /// Deliveries of the queue message holding it, this one included.
    pub attempts: u64,
    /// Where the message entered the pipeline: `mqtt`, or `replay` for an operator replay.
    pub source: String,
    #[serde(default)]
    pub replay_count: u32,
    /// The payload as UTF-8 text, when it is valid UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// The payload as standard base64, when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    /// The payload's size as published.
    pub payload_bytes: usize,
    /// True when `payload` holds only a prefix (oversize messages).
    #[serde(default)]
    pub payload_truncated: bool,
    /// The override an operator's replay applied, when the replayed message failed again.
    #[serde(default, skip_serializing_if = "Override::is_none")]
    pub overrides: Override,
    /// Fields (other than the payload) cut so that the record fits a queue message, by their
    /// wire names: `rejectedIndexes`, `overrides`, `detail`. Empty for nearly every record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shortened: Vec<String>,
}

/// Most rejected indexes a record keeps when it must be shortened to fit.
const SHORT_INDEXES: usize = 1000;
/// Most bytes of overrides a record keeps when it must be shortened to fit.
const SHORT_OVERRIDE_BYTES: usize = 8 * 1024;
/// Longest detail when nothing else makes a record fit.
const SHORTEST_DETAIL_BYTES: usize = 256;

/// The facts about one refusal that are not in the message itself.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub reason: Reason,
    pub detail: String,
    pub device_id: Option<String>,
    pub rejected_indexes: Vec<usize>,
    pub attempts: u64,
    pub dead_lettered_at_ms: i64,
}

impl DeadLetter {
    /// The record for `msg`, refused for `refusal`.
    pub fn new(msg: &DeviceMessage, refusal: Refusal) -> Self {
        let mut record = Self {
            v: DEAD_LETTER_VERSION,
            reason: refusal.reason,
            detail: crate::reading::truncate(&refusal.detail, MAX_DETAIL_BYTES).to_owned(),
            topic: msg.topic.clone(),
            device_id: refusal.device_id,
            rejected_indexes: refusal.rejected_indexes,
            received_at: crate::timefmt::format_ms(clamp_ms(msg.received_at_ms)),
            dead_lettered_at: crate::timefmt::format_ms(clamp_ms(refusal.dead_lettered_at_ms)),
            attempts: refusal.attempts,
            source: if msg.replay_count > 0 {
                "replay"
            } else {
                "mqtt"
            }
            .to_owned(),
            replay_count: msg.replay_count,
            payload: None,
            payload_base64: None,
            payload_bytes: msg.original_len,
            payload_truncated: msg.is_truncated(),
            overrides: msg.overrides.clone(),
            shortened: Vec::new(),
        };
        record.set_payload(&msg.payload);
        record
    }

    /// A record for a queue message that is not a readable envelope; `raw` is its text.
    pub fn for_unreadable(raw: &str, detail: String, attempts: u64, now_ms: i64) -> Self {
        // The same size cap as any device message: the record must fit the queue.
        let msg = DeviceMessage::from_mqtt("", raw.as_bytes(), now_ms);
        Self::new(
            &msg,
            Refusal {
                reason: Reason::InvalidEnvelope,
                detail,
                device_id: None,
                rejected_indexes: Vec::new(),
                attempts,
                dead_lettered_at_ms: now_ms,
            },
        )
    }

    /// Stores the payload as text when it is UTF-8 and escapes no larger than base64 would.
    fn set_payload(&mut self, payload: &[u8]) {
        match crate::envelope::compact_text(payload) {
            Some(text) => self.payload = Some(text.to_owned()),
            None => self.payload_base64 = Some(B64.encode(payload)),
        }
    }

    /// The payload bytes as recorded (a prefix when `payload_truncated`).
    pub fn payload_bytes(&self) -> Result<Vec<u8>, base64::DecodeError> {
        match (&self.payload, &self.payload_base64) {
            (Some(text), _) => Ok(text.clone().into_bytes()),
            (None, Some(b)) => B64.decode(b),
            (None, None) => Ok(Vec::new()),
        }
    }

    /// The record's JSON, cut so that it always fits a queue message on its own. First the
    /// lists (a replay may carry many overrides, which a replay never reuses), named in
    /// `shortened`; then the payload, flagged `payloadTruncated` (replay needs it whole, so
    /// it goes second); then the detail. The source message is never lost for a record too
    /// large.
    fn wire_json(&self) -> Vec<u8> {
        const ROOM: usize = crate::framed::item_room(HEADER);
        // A struct of strings, integers and bools always serialises.
        let json = serde_json::to_vec(self).expect("record serialises");
        if json.len() <= ROOM {
            return json;
        }
        let mut cut = self.clone();
        cut.shorten_lists();
        let json = serde_json::to_vec(&cut).expect("record serialises");
        if json.len() <= ROOM {
            return json;
        }
        let bytes = self.payload_bytes().unwrap_or_default();
        cut.payload = None;
        cut.payload_base64 = Some(String::new());
        for harshness in 0..2 {
            match harshness {
                0 => {}
                _ => {
                    cut.rejected_indexes.clear();
                    cut.overrides.device_ids.clear();
                    let detail = crate::reading::truncate(&cut.detail, SHORTEST_DETAIL_BYTES);
                    cut.detail = detail.to_owned();
                    cut.mark_shortened(&["rejectedIndexes", "overrides", "detail"]);
                }
            }
            // Flagged before measuring, so the flag's own bytes are counted.
            cut.payload_truncated = true;
            let overhead = serde_json::to_vec(&cut).expect("record serialises").len();
            if overhead <= ROOM {
                let keep = ((ROOM - overhead) / 4 * 3).min(bytes.len());
                cut.payload_base64 = Some(B64.encode(&bytes[..keep]));
                cut.payload_truncated = self.payload_truncated || keep < bytes.len();
                break;
            }
        }
        serde_json::to_vec(&cut).expect("record serialises")
    }

    /// Keeps the first [`SHORT_INDEXES`] rejected indexes and the overrides that fit
    /// [`SHORT_OVERRIDE_BYTES`].
    fn shorten_lists(&mut self) {
        if self.rejected_indexes.len() > SHORT_INDEXES {
            self.rejected_indexes.truncate(SHORT_INDEXES);
            self.mark_shortened(&["rejectedIndexes"]);
        }
        let mut bytes = 0;
        let ids = &mut self.overrides.device_ids;
        let keep = ids
            .iter()
            .take_while(|(from, to)| {
                bytes += from.len() + to.len() + 8;
                bytes <= SHORT_OVERRIDE_BYTES
            })
            .count();
        if keep < ids.len() {
            ids.truncate(keep);
            self.mark_shortened(&["overrides"]);
        }
    }

    fn mark_shortened(&mut self, fields: &[&str]) {
        for field in fields {
            if !self.shortened.iter().any(|f| f == field) {
                self.shortened.push((*field).to_owned());
            }
        }
    }

    /// The `seq` numbers of the readings this record refuses, where they can be told: the
    /// topic names the device, the payload is whole JSON and names no other device, and a
    /// refused reading carries a `seq` (for a gateway array, the elements refused, or all of
    /// them when the whole message is). For the completeness ledger: these numbers are
    /// refused, not missing.
    pub fn refused_seqs(&self) -> Vec<i64> {
        if self.payload_truncated
            || self.device_id.is_none()
            || self.reason == Reason::DeviceMismatch
        {
            return Vec::new();
        }
        let Some(value) = self
            .payload
            .as_deref()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
        else {
            return Vec::new();
        };
        // A reading naming another device (a gateway array's element may) is not this one's.
        let device = self.device_id.as_deref();
        let seq = |r: &serde_json::Value| {
            let other = r
                .get("deviceId")
                .and_then(serde_json::Value::as_str)
                .is_some_and(|id| Some(id) != device);
            r.get("seq")
                .and_then(serde_json::Value::as_i64)
                .filter(|s| *s >= 0 && !other)
        };
        match &value {
            serde_json::Value::Array(items) if self.rejected_indexes.is_empty() => {
                items.iter().filter_map(seq).collect()
            }
            serde_json::Value::Array(items) => self
                .rejected_indexes
                .iter()
                .filter_map(|i| items.get(*i))
                .filter_map(seq)
                .collect(),
            single => seq(single).into_iter().collect(),
        }
    }

    /// What this record refuses, stable across the processor redoing its work: the same
    /// device message refused for the same reason (by topic, time of receipt, payload and
    /// replay) has the same identity, whichever delivery wrote it and whatever its detail
    /// says. Two records with one identity are duplicates; the operator's tool counts, exports
    /// and replays one of them.
    pub fn identity(&self) -> u64 {
        let mut h = crate::Fnv::default();
        h.write(self.reason.as_str().as_bytes());
        h.write(self.topic.as_bytes());
        h.write(self.received_at.as_bytes());
        h.write(self.payload.as_deref().unwrap_or_default().as_bytes());
        h.write(
            self.payload_base64
                .as_deref()
                .unwrap_or_default()
                .as_bytes(),
        );
        h.write(&(self.payload_bytes as u64).to_le_bytes());
        h.write(&self.replay_count.to_le_bytes());
        for i in &self.rejected_indexes {
            h.write(&(*i as u64).to_le_bytes());
        }
        h.0
    }

    /// The record as the JSON of one line of an export file.
    pub fn to_json_line(&self) -> String {
        // A struct of strings, integers and bools always serialises.
        serde_json::to_string(self).expect("record serialises")
    }
}

/// Packs `records` into as few queue messages as fit, in order. Each message is returned with
/// the positions of the records it holds; a record in no message (which [`DeadLetter`]'s
/// shortening rules out) was not packed, and its source must be kept.
pub fn pack<'a>(records: impl IntoIterator<Item = &'a DeadLetter>) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let mut message = Framed::new(HEADER);
    let mut held = Vec::new();
    for (i, record) in records.into_iter().enumerate() {
        let json = record.wire_json();
        if !message.push(&json) {
            if message.len() > 0 {
                out.push((message.finish(), std::mem::take(&mut held)));
            }
            // An empty message takes any record: `wire_json` cuts it to fit.
            if !message.push(&json) {
                continue;
            }
        }
        held.push(i);
    }
    if message.len() > 0 {
        out.push((message.finish(), held));
    }
    out
}

#[derive(Deserialize)]
struct Batch {
    v: u32,
    d: Vec<DeadLetter>,
}

/// Reads the records of one dead-letter queue message (either wire form).
pub fn decode_message(text: &str) -> Result<Vec<DeadLetter>, DecodeError> {
    let raw = B64.decode(text.trim())?;
    match serde_json::from_slice::<Batch>(&raw) {
        Ok(batch) if batch.v == DEAD_LETTER_VERSION => Ok(batch.d),
        Ok(batch) => Err(DecodeError::Version(batch.v)),
        Err(batch_error) => match serde_json::from_slice::<DeadLetter>(&raw) {
            Ok(record) => Ok(vec![record]),
            Err(_) => Err(DecodeError::Json(batch_error)),
        },
    }
}

fn clamp_ms(ms: i64) -> i64 {
    ms.clamp(crate::timefmt::MIN_MS, crate::timefmt::MAX_MS)
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("dead letter is not base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("dead letter is not a valid record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("dead-letter version {0} is not supported (this build reads {DEAD_LETTER_VERSION})")]
    Version(u32),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::QUEUE_MESSAGE_MAX_CHARS;

    fn refusal(reason: Reason) -> Refusal {
        Refusal {
            reason,
            detail: "x".repeat(10_000),
            device_id: Some("dev-1".into()),
            rejected_indexes: vec![],
            attempts: 1,
            dead_lettered_at_ms: 1_700_000_000_000,
        }
    }

    fn one(record: &DeadLetter) -> String {
        let mut packed = pack([record]);
        assert_eq!(packed.len(), 1);
        packed.remove(0).0
    }

    #[test]
    fn the_refused_numbers_are_told_where_they_can_be() {
        let record = |payload: &str, reason: Reason, indexes: Vec<usize>| {
            let msg = DeviceMessage::from_mqtt("devices/dev-1/telemetry", payload.as_bytes(), 1);
            DeadLetter::new(
                &msg,
                Refusal {
                    rejected_indexes: indexes,
                    ..refusal(reason)
                },
            )
        };
        let one = r#"{"deviceId":"dev-1","seq":7,"temperature":999}"#;
        assert_eq!(record(one, Reason::OutOfRange, vec![]).refused_seqs(), [7]);
        let array = r#"[{"seq":3},{"seq":4},{"seq":5}]"#;
        assert_eq!(
            record(array, Reason::Stale, vec![0, 2]).refused_seqs(),
            [3, 5]
        );
        assert_eq!(
            record(array, Reason::Poison, vec![]).refused_seqs(),
            [3, 4, 5]
        );
        // Not told: the payload names another device, is not JSON, or has no number.
        assert!(record(one, Reason::DeviceMismatch, vec![])
            .refused_seqs()
            .is_empty());
        assert!(record(r#"{"seq":7"#, Reason::MalformedJson, vec![])
            .refused_seqs()
            .is_empty());
        assert!(record(r#"{"seq":-1}"#, Reason::Schema, vec![])
            .refused_seqs()
            .is_empty());
        let mixed = r#"[{"deviceId":"dev-1","seq":3},{"deviceId":"dev-2","seq":4}]"#;
        assert_eq!(record(mixed, Reason::Stale, vec![0, 1]).refused_seqs(), [3]);
        let mut no_device = record(one, Reason::OutOfRange, vec![]);
        no_device.device_id = None;
        assert!(no_device.refused_seqs().is_empty());
    }

    #[test]
    fn round_trips_byte_exact_payloads() {
        for payload in [b"{\"a\":1}".to_vec(), vec![0xff, 0x00, 0x80], Vec::new()] {
            let msg = DeviceMessage::from_mqtt("devices/dev-1/telemetry", &payload, 1);
            let record = DeadLetter::new(&msg, refusal(Reason::Schema));
            let back = decode_message(&one(&record)).unwrap();
            assert_eq!(back, std::slice::from_ref(&record));
            assert_eq!(back[0].payload_bytes().unwrap(), payload);
            assert_eq!(back[0].detail.len(), MAX_DETAIL_BYTES);
            let line: DeadLetter = serde_json::from_str(&record.to_json_line()).unwrap();
            assert_eq!(line, record);
        }
    }

    #[test]
    fn packs_many_records_per_message_within_the_limit() {
        let records: Vec<DeadLetter> = (0..500)
            .map(|i| {
                let payload = format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(i * 7 % 900));
                let msg = DeviceMessage::from_mqtt(
                    "devices/dev-1/telemetry",
                    payload.as_bytes(),
                    i as i64,
                );
                DeadLetter::new(&msg, refusal(Reason::Schema))
            })
            .collect();
        let packed = pack(&records);
        assert!(packed.len() < 80, "{} messages", packed.len());
        let mut back = Vec::new();
        let mut positions = Vec::new();
        for (text, held) in packed {
            assert!(text.len() <= QUEUE_MESSAGE_MAX_CHARS);
            positions.extend(held);
            back.extend(decode_message(&text).unwrap());
        }
        assert_eq!(back, records);
        assert_eq!(positions, (0..500).collect::<Vec<_>>());
    }

    #[test]
    fn a_redone_refusal_has_the_same_identity() {
        let msg = DeviceMessage::from_mqtt("devices/dev-1/telemetry", b"{}", 5);
        let first = DeadLetter::new(&msg, refusal(Reason::Schema));
        let mut redone = refusal(Reason::Schema);
        redone.attempts = 3;
        redone.detail = "other words".into();
        redone.dead_lettered_at_ms += 60_000;
        assert_eq!(first.identity(), DeadLetter::new(&msg, redone).identity());
        let other_reason = DeadLetter::new(&msg, refusal(Reason::Poison));
        assert_ne!(first.identity(), other_reason.identity());
        let later = DeviceMessage::from_mqtt("devices/dev-1/telemetry", b"{}", 6);
        let again = DeadLetter::new(&later, refusal(Reason::Schema));
        assert_ne!(
            first.identity(),
            again.identity(),
            "published again: another message"
        );
    }

    #[test]
    fn reads_the_single_record_form_and_refuses_other_versions() {
        let msg = DeviceMessage::from_mqtt("devices/dev-1/telemetry", b"x", 1);
        let record = DeadLetter::new(&msg, refusal(Reason::MalformedJson));
        let single = B64.encode(serde_json::to_vec(&record).unwrap());
        assert_eq!(decode_message(&single).unwrap(), [record]);
        let v2 = B64.encode(br#"{"v":2,"d":[]}"#);
        assert!(matches!(decode_message(&v2), Err(DecodeError::Version(2))));
        assert!(matches!(decode_message("%%"), Err(DecodeError::Base64(_))));
        let garbage = B64.encode(b"{}");
        assert!(matches!(
            decode_message(&garbage),
            Err(DecodeError::Json(_))
        ));
    }

    #[test]
    fn largest_records_fit_the_queue() {
        let payloads = [
            vec![0xffu8; 200_000],
            vec![b'"'; 200_000],
            vec![1u8; 40_000],
        ];
        for payload in payloads {
            let msg = DeviceMessage::from_mqtt(&"\u{1}".repeat(999), &payload, 1);
            let record = DeadLetter::new(&msg, refusal(Reason::TooLarge));
            // Two such records never share a message.
            let packed = pack([&record, &record]);
            assert_eq!(packed.len(), 2);
            for (text, _) in packed {
                assert!(
                    text.len() <= QUEUE_MESSAGE_MAX_CHARS,
                    "{} chars",
                    text.len()
                );
                let back = decode_message(&text).unwrap();
                assert!(back[0].payload_truncated);
                assert_eq!(back[0].payload_bytes, payload.len());
            }
        }
        let raw = "z".repeat(QUEUE_MESSAGE_MAX_CHARS);
        let text = one(&DeadLetter::for_unreadable(&raw, "bad".into(), 6, 1));
        assert!(text.len() <= QUEUE_MESSAGE_MAX_CHARS);
    }

    #[test]
    fn a_record_too_large_even_without_its_payload_is_shortened_not_dropped() {
        // A 32 KiB gateway array of empty objects, every element refused, replayed with many
        // id mappings: the indexes and overrides alone exceed a queue message.
        let payload = format!("[{}{{}}]", "{},".repeat(10_900));
        let mut msg = DeviceMessage::from_mqtt("devices/gw-1/telemetry", payload.as_bytes(), 1);
        msg.overrides.device_ids = (0..2_000)
            .map(|i| {
                (
                    format!("old-{i:05}-{}", "x".repeat(30)),
                    format!("new-{i:05}"),
                )
            })
            .collect();
        let mut refused = refusal(Reason::Schema);
        refused.rejected_indexes = (0..10_901).collect();
        let record = DeadLetter::new(&msg, refused);
        let packed = pack([&record, &record]);
        assert_eq!(packed.len(), 2, "each in a message of its own");
        for (text, held) in &packed {
            assert_eq!(held.len(), 1);
            assert!(text.len() <= QUEUE_MESSAGE_MAX_CHARS);
            let back = &decode_message(text).unwrap()[0];
            assert_eq!(back.shortened, ["rejectedIndexes", "overrides"]);
            assert_eq!(
                back.rejected_indexes,
                (0..SHORT_INDEXES).collect::<Vec<_>>()
            );
            // The lists go first: the payload, which a replay needs, stays whole.
            assert!(!back.payload_truncated);
            assert_eq!(back.payload_bytes().unwrap(), payload.as_bytes());
            assert_eq!(back.topic, record.topic);
        }
    }
}
