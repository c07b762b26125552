//! The ingest queue's message: a versioned envelope packing many device messages.
//!
//! Wire form: the queue message text is standard base64 of a JSON document
//! `{"v":1,"m":[entry, ...]}`. Base64 makes the text immune to XML escaping (queue messages
//! travel inside XML), so the encoded size is exact arithmetic, not a worst-case guess. Each entry is
//! `{"t":topic,"r":receivedAtMs,"p":"utf-8 payload"}`, or `"b":"base64"` instead of `"p"` when
//! the payload is not UTF-8 or would grow more under JSON escaping than under base64. `"n"` is
//! the published size when ingest truncated an oversize payload; `"rc"` counts replays, and
//! `"o"` carries an operator's [`Override`] on a replayed message.

use crate::framed::Framed;
use crate::reading::Override;
use crate::{base64_len, MAX_PAYLOAD_BYTES};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

pub const ENVELOPE_VERSION: u32 = 1;
/// Longest topic carried, in bytes. Longer topics are cut on a character boundary; they cannot
/// name a valid device anyway (ids are at most 128 bytes).
pub const MAX_TOPIC_BYTES: usize = 256;

const HEADER: &[u8] = b"{\"v\":1,\"m\":[";

/// One MQTT message as ingest received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMessage {
    pub topic: String,
    pub received_at_ms: i64,
    /// The payload, byte-exact, or its first [`MAX_PAYLOAD_BYTES`] when it was larger.
    pub payload: Vec<u8>,
    /// The payload's size as published.
    pub original_len: usize,
    /// How many times an operator has replayed this message from the dead-letter queue.
    pub replay_count: u32,
    /// Rules relaxed for this message alone by an operator's replay; none for live traffic.
    pub overrides: Override,
}

impl DeviceMessage {
    /// Builds the message from what the broker delivered, applying the size caps that keep any
    /// single message within one envelope.
    pub fn from_mqtt(topic: &str, payload: &[u8], received_at_ms: i64) -> Self {
        let kept = &payload[..payload.len().min(MAX_PAYLOAD_BYTES)];
        Self {
            topic: crate::reading::truncate(topic, MAX_TOPIC_BYTES).to_owned(),
            received_at_ms,
            payload: kept.to_vec(),
            original_len: payload.len(),
            replay_count: 0,
            overrides: Override::NONE,
        }
    }

    pub fn is_truncated(&self) -> bool {
        self.original_len > self.payload.len()
    }
}

#[derive(Serialize, Deserialize)]
struct Entry<'a> {
    #[serde(rename = "t", borrow)]
    topic: std::borrow::Cow<'a, str>,
    #[serde(rename = "r")]
    received_at_ms: i64,
    #[serde(rename = "p", borrow, default, skip_serializing_if = "Option::is_none")]
    text: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "b", default, skip_serializing_if = "Option::is_none")]
    base64: Option<String>,
    #[serde(rename = "n", default, skip_serializing_if = "Option::is_none")]
    original_len: Option<usize>,
    #[serde(rename = "rc", default, skip_serializing_if = "is_zero")]
    replay_count: u32,
    #[serde(rename = "o", default, skip_serializing_if = "Override::is_none")]
    overrides: Override,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Deserialize)]
struct Document<'a> {
    v: u32,
    #[serde(borrow)]
    m: Vec<Entry<'a>>,
}

/// The payload as text, when it is UTF-8 and no larger as a JSON string than as base64; the
/// wire shapes carry such payloads as text (readable) and others as base64 (smaller, and
/// byte-exact for non-UTF-8).
pub(crate) fn compact_text(payload: &[u8]) -> Option<&str> {
    std::str::from_utf8(payload)
        .ok()
        .filter(|t| json_string_len(t) <= base64_len(t.len()) + 2)
}

/// Encodes one entry, choosing the smaller of JSON-string and base64 payload forms.
fn encode_entry(msg: &DeviceMessage) -> Vec<u8> {
    let text = compact_text(&msg.payload);
    let entry = Entry {
        topic: msg.topic.as_str().into(),
        received_at_ms: msg.received_at_ms,
        text: text.map(Into::into),
        base64: text.is_none().then(|| B64.encode(&msg.payload)),
        original_len: msg.is_truncated().then_some(msg.original_len),
        replay_count: msg.replay_count,
        overrides: msg.overrides.clone(),
    };
    // Serialising a struct of strings and integers into a Vec cannot fail.
    serde_json::to_vec(&entry).expect("entry serialises")
}

/// Length of `s` as a JSON string literal, quotes included, as serde_json writes it.
fn json_string_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// Packs device messages into one envelope without ever exceeding the queue's limit.
#[derive(Debug)]
pub struct EnvelopeBuilder(Framed);

/// The message did not fit; it is handed back untouched.
#[derive(Debug)]
pub struct Full(pub DeviceMessage);

impl Default for EnvelopeBuilder {
    fn default() -> Self {
        Self(Framed::new(HEADER))
    }
}

impl EnvelopeBuilder {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.len() == 0
    }

    /// The size the finished envelope would have now, as queue text.
    pub fn encoded_len(&self) -> usize {
        self.0.encoded_len()
    }

    /// Adds `msg` if the envelope, encoded, still fits; otherwise returns it.
    pub fn push(&mut self, msg: DeviceMessage) -> Result<(), Full> {
        if self.0.push(&encode_entry(&msg)) {
            Ok(())
        } else {
            Err(Full(msg))
        }
    }

    /// The queue message text, and a fresh empty builder in place of this one.
    pub fn finish(&mut self) -> String {
        self.0.finish()
    }
}

/// Why an envelope could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("queue message is not base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("envelope is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("envelope is JSON but not an envelope: {0}")]
    Shape(&'static str),
    /// Written by another version of ingest; a processor of that version can read it.
    #[error("envelope version {0} is not supported (this build reads {ENVELOPE_VERSION})")]
    Version(u64),
    #[error("envelope entry {index} is unreadable: {source}")]
    Entry { index: usize, source: EntryError },
}

/// Why one entry of a readable envelope could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("no payload (neither \"p\" nor \"b\")")]
    MissingPayload,
    #[error("payload is not base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("not an entry: {0}")]
    Shape(#[from] serde_json::Error),
}

/// An entry that could not be read: its position, its JSON as found, and why.
#[derive(Debug)]
pub struct BadEntry {
    pub index: usize,
    pub json: String,
    pub error: EntryError,
}

/// Decodes a queue message text into its device messages; any unreadable entry fails it all.
pub fn decode(text: &str) -> Result<Vec<DeviceMessage>, DecodeError> {
    let (messages, bad) = decode_entries(text)?;
    match bad.into_iter().next() {
        None => Ok(messages),
        Some(b) => Err(DecodeError::Entry {
            index: b.index,
            source: b.error,
        }),
    }
}

/// Decodes entry by entry, so that one unreadable entry does not condemn the others: the
/// readable device messages, and the entries that are not. Fails only when the text is not
/// an envelope of this version at all.
pub fn decode_entries(text: &str) -> Result<(Vec<DeviceMessage>, Vec<BadEntry>), DecodeError> {
    let raw = B64.decode(text.trim())?;
    let mut good = Vec::new();
    let mut bad = Vec::new();
    // The common case in one pass: every entry has the right shape.
    if let Ok(doc) = serde_json::from_slice::<Document<'_>>(&raw) {
        if u64::from(doc.v) != u64::from(ENVELOPE_VERSION) {
            return Err(DecodeError::Version(u64::from(doc.v)));
        }
        for (index, entry) in doc.m.into_iter().enumerate() {
            let json = || serde_json::to_string(&entry).unwrap_or_default();
            match device_message(&entry) {
                Ok(m) => good.push(m),
                Err(error) => bad.push(BadEntry {
                    index,
                    json: json(),
                    error,
                }),
            }
        }
        return Ok((good, bad));
    }
    // Otherwise read it as any JSON, check the version first (another version may have
    // another shape), and read each entry on its own.
    let doc: serde_json::Value = serde_json::from_slice(&raw)?;
    let version = doc
        .get("v")
        .and_then(serde_json::Value::as_u64)
        .ok_or(DecodeError::Shape("no version number \"v\""))?;
    if version != u64::from(ENVELOPE_VERSION) {
        return Err(DecodeError::Version(version));
    }
    let entries = doc
        .get("m")
        .and_then(serde_json::Value::as_array)
        .ok_or(DecodeError::Shape("no entry array \"m\""))?;
    for (index, value) in entries.iter().enumerate() {
        let read = Entry::deserialize(value)
            .map_err(EntryError::from)
            .and_then(|entry| device_message(&entry));
        match read {
            Ok(m) => good.push(m),
            Err(error) => bad.push(BadEntry {
                index,
                json: value.to_string(),
                error,
            }),
        }
    }
    Ok((good, bad))
}

fn device_message(e: &Entry<'_>) -> Result<DeviceMessage, EntryError> {
    let payload = match (&e.text, &e.base64) {
        (Some(t), _) => t.as_bytes().to_vec(),
        (None, Some(b)) => B64.decode(b)?,
        (None, None) => return Err(EntryError::MissingPayload),
    };
    Ok(DeviceMessage {
        topic: e.topic.clone().into_owned(),
        received_at_ms: e.received_at_ms,
        original_len: e.original_len.unwrap_or(payload.len()),
        payload,
        replay_count: e.replay_count,
        overrides: e.overrides.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::QUEUE_MESSAGE_MAX_CHARS;

    fn msg(topic: &str, payload: &[u8]) -> DeviceMessage {
        DeviceMessage::from_mqtt(topic, payload, 1_700_000_000_000)
    }

    #[test]
    fn round_trips_text_binary_and_truncated_payloads() {
        let big = vec![b'x'; MAX_PAYLOAD_BYTES + 10];
        let msgs = vec![
            msg("devices/a/telemetry", br#"{"deviceId":"a","q":"<&>"}"#),
            msg("devices/b/telemetry", &[0xff, 0x00, 0xfe]),
            msg("devices/c/telemetry", &big),
            msg("devices/d/telemetry", b""),
            DeviceMessage {
                replay_count: 2,
                overrides: Override {
                    allow_stale: true,
                    device_ids: vec![("old".into(), "new".into())],
                },
                ..msg("devices/old/telemetry", b"{}")
            },
        ];
        let mut b = EnvelopeBuilder::default();
        for m in msgs.clone() {
            b.push(m).unwrap();
        }
        let decoded = decode(&b.finish()).unwrap();
        assert_eq!(decoded, msgs);
        assert!(decoded[2].is_truncated());
        assert_eq!(decoded[2].original_len, MAX_PAYLOAD_BYTES + 10);
    }

    #[test]
    fn worst_case_single_message_fits_an_empty_envelope() {
        // Control characters escape to six bytes each in JSON; invalid UTF-8 forces base64;
        // a long topic of quotes doubles under escaping. Each must still fit on its own.
        let payloads: [Vec<u8>; 3] = [
            vec![0x01; MAX_PAYLOAD_BYTES * 2],
            vec![0xff; MAX_PAYLOAD_BYTES],
            vec![b'"'; MAX_PAYLOAD_BYTES],
        ];
        let topic = "\u{1}".repeat(10_000);
        for payload in payloads {
            let mut b = EnvelopeBuilder::default();
            b.push(msg(&topic, &payload)).expect("fits alone");
            let text = b.finish();
            assert!(
                text.len() <= QUEUE_MESSAGE_MAX_CHARS,
                "{} chars",
                text.len()
            );
            assert_eq!(decode(&text).unwrap()[0].original_len, payload.len());
        }
    }

    #[test]
    fn packing_stops_exactly_at_the_limit() {
        let mut b = EnvelopeBuilder::default();
        let payload =
            br#"{"deviceId":"dev-1","timestamp":"2024-01-15T10:00:00Z","temperature":21.5}"#;
        let mut n = 0;
        while b.push(msg("devices/dev-1/telemetry", payload)).is_ok() {
            n += 1;
            assert!(b.encoded_len() <= QUEUE_MESSAGE_MAX_CHARS);
        }
        assert!(n > 300, "only {n} readings per envelope");
        let predicted = b.encoded_len();
        let text = b.finish();
        assert_eq!(text.len(), predicted);
        assert!(text.len() <= QUEUE_MESSAGE_MAX_CHARS);
        assert!(
            text.len() > QUEUE_MESSAGE_MAX_CHARS - 400,
            "wasted space: {}",
            text.len()
        );
        assert_eq!(decode(&text).unwrap().len(), n);
        assert!(b.is_empty(), "finish resets the builder");
    }

    #[test]
    fn rejects_unknown_versions_and_garbage() {
        let v2 = B64.encode(br#"{"v":2,"m":[]}"#);
        assert!(matches!(decode(&v2), Err(DecodeError::Version(2))));
        assert!(matches!(decode("%%%"), Err(DecodeError::Base64(_))));
        let no_payload = B64.encode(br#"{"v":1,"m":[{"t":"x","r":1}]}"#);
        assert!(matches!(
            decode(&no_payload),
            Err(DecodeError::Entry {
                index: 0,
                source: EntryError::MissingPayload
            })
        ));
        // Another version may have another shape: still reported as a version.
        let v3 = B64.encode(br#"{"v":3,"m":{"other":"shape"}}"#);
        assert!(matches!(decode(&v3), Err(DecodeError::Version(3))));
        let no_version = B64.encode(br#"{"m":[]}"#);
        assert!(matches!(decode(&no_version), Err(DecodeError::Shape(_))));
    }

    #[test]
    fn one_bad_entry_does_not_condemn_the_others() {
        let good = r#"{"t":"devices/a/telemetry","r":5,"p":"{}"}"#;
        for bad in [
            r#"{"t":"x","r":1}"#,
            r#"{"t":"x","r":1,"b":"%%"}"#,
            r#"{"t":7}"#,
            "42",
        ] {
            let text = B64.encode(format!(r#"{{"v":1,"m":[{good},{bad},{good}]}}"#));
            let (messages, broken) = decode_entries(&text).unwrap();
            assert_eq!(messages.len(), 2, "{bad}");
            assert_eq!(messages[1].topic, "devices/a/telemetry");
            assert_eq!(broken.len(), 1);
            assert_eq!(broken[0].index, 1);
            let back: serde_json::Value = serde_json::from_str(&broken[0].json).unwrap();
            assert_eq!(
                back,
                serde_json::from_str::<serde_json::Value>(bad).unwrap()
            );
        }
    }
}
