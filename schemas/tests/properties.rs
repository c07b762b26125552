//! Property tests of the contract: any input either decodes or is refused with a reason, and
//! never panics; envelopes and dead-letter records round-trip byte-exact at every size up to
//! the queue's limit.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use proptest::prelude::*;
use schemas::dead_letter::{decode_message, pack, DeadLetter, Refusal};
use schemas::envelope::{decode, decode_entries};
use schemas::reading::{validate, Override, Policy, Reading, Rejection};
use schemas::{DeviceMessage, EnvelopeBuilder, Reason, MAX_PAYLOAD_BYTES, QUEUE_MESSAGE_MAX_CHARS};

const NOW: i64 = 1_700_000_000_000;

/// Payloads that are mostly near-valid readings, with arbitrary values where it matters.
fn reading_json() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        any::<f64>().prop_map(|f| format!("{f:?}")),
        any::<i64>().prop_map(|i| i.to_string()),
        Just("null".to_owned()),
        Just("\"text\"".to_owned()),
        Just("[]".to_owned()),
        Just("{}".to_owned()),
    ];
    let timestamp = prop_oneof![
        (NOW - 40 * 86_400_000..NOW + 3_600_000)
            .prop_map(|ms| format!("\"{}\"", schemas::timefmt::format_ms(ms))),
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        any::<i64>().prop_map(|i| i.to_string()),
    ];
    let device = prop_oneof![
        Just("\"d-1\"".to_owned()),
        Just("\"other\"".to_owned()),
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
    ];
    let one = (device, timestamp, value.clone(), value.clone(), value).prop_map(
        |(d, t, temperature, seq, extra)| {
            format!(r#"{{"deviceId":{d},"timestamp":{t},"temperature":{temperature},"seq":{seq},"x":{extra}}}"#)
        },
    );
    prop_oneof![
        one.clone(),
        prop::collection::vec(one, 0..120).prop_map(|v| format!("[{}]", v.join(","))),
    ]
}

/// Reading objects with repeated, escaped and case-shifted names, in any order.
fn messy_objects() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        Just("deviceId"),
        Just("device\\u0049d"),
        Just("timestamp"),
        Just("seq"),
        Just("temperature"),
        Just("temp\\u0065rature"),
        Just("humidity"),
        Just("pressure"),
        Just("Temperature"),
        Just("x"),
        Just("y"),
        Just("b1"),
    ];
    let value = prop_oneof![
        Just("\"d-1\"".to_owned()),
        Just("\"d\\u002d1\"".to_owned()),
        (NOW - 40 * 86_400_000..NOW + 3_600_000)
            .prop_map(|ms| format!("\"{}\"", schemas::timefmt::format_ms(ms))),
        (-100.0..1200.0f64).prop_map(|f| format!("{f:?}")),
        any::<i64>().prop_map(|i| i.to_string()),
        any::<u64>().prop_map(|u| u.to_string()),
        Just("-0".to_owned()),
        Just("true".to_owned()),
        Just("null".to_owned()),
        Just("[1,{\"a\":[]}]".to_owned()),
        Just("{\"deviceId\":\"d-1\"}".to_owned()),
    ];
    // Often a valid reading first, so what follows decides between stored values.
    let valid = format!(
        r#""deviceId":"d-1","timestamp":"{}","temperature":1"#,
        schemas::timefmt::format_ms(NOW)
    );
    let start = prop_oneof![Just(String::new()), Just(valid)];
    let object =
        (start, prop::collection::vec((name, value), 0..12)).prop_map(|(start, fields)| {
            let fields = fields.iter().map(|(n, v)| format!("\"{n}\":{v}"));
            let all: Vec<String> = std::iter::once(start)
                .filter(|s| !s.is_empty())
                .chain(fields)
                .collect();
            format!("{{{}}}", all.join(","))
        });
    prop_oneof![
        object.clone(),
        prop::collection::vec(object, 0..5).prop_map(|v| format!("[{}]", v.join(","))),
    ]
}

fn outcome(payload: &[u8]) -> (Vec<Reading>, Vec<Rejection>) {
    let out = validate(
        "devices",
        "devices/d-1/telemetry",
        payload,
        payload.len(),
        NOW,
        &Policy::default(),
        &Override::NONE,
    );
    (out.readings, out.rejections)
}

fn check_outcome(topic: &str, payload: &[u8]) {
    let out = validate(
        "devices",
        topic,
        payload,
        payload.len(),
        NOW,
        &Policy::default(),
        &Override::NONE,
    );
    assert!(
        !out.readings.is_empty() || !out.rejections.is_empty(),
        "neither stored nor refused"
    );
    for r in &out.readings {
        assert!(schemas::reading::is_valid_device_id(&r.device_id));
    }
    // One row per device and millisecond.
    let mut keys: Vec<_> = out
        .readings
        .iter()
        .map(|r| (&r.device_id, r.measured_at_ms))
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), out.readings.len());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_bytes_are_stored_or_refused(payload in prop::collection::vec(any::<u8>(), 0..2048), topic in any::<String>()) {
        check_outcome(&topic, &payload);
        check_outcome("devices/d-1/telemetry", &payload);
    }

    #[test]
    fn any_reading_shaped_json_is_stored_or_refused(payload in reading_json()) {
        check_outcome("devices/d-1/telemetry", payload.as_bytes());
    }

    /// Validation reads JSON as `serde_json::Value` does (the last of a repeated name counts,
    /// escapes are their text), so a payload and its normalised form have one outcome.
    #[test]
    fn validation_reads_json_as_serde_json_values_do(payload in messy_objects()) {
        let value: serde_json::Value = serde_json::from_str(&payload).unwrap();
        let normalised = serde_json::to_string(&value).unwrap();
        prop_assert_eq!(outcome(payload.as_bytes()), outcome(normalised.as_bytes()));
    }

    #[test]
    fn any_queue_text_decodes_or_is_refused(text in any::<String>()) {
        let _ = decode_entries(&text);
    }
}

fn message() -> impl Strategy<Value = DeviceMessage> {
    (
        any::<String>(),
        prop::collection::vec(any::<u8>(), 0..MAX_PAYLOAD_BYTES + 64),
        any::<i64>(),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(|(topic, payload, at, replays, stale)| {
            let mut m = DeviceMessage::from_mqtt(&topic, &payload, at);
            m.replay_count = replays;
            m.overrides.allow_stale = stale;
            m
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn envelopes_round_trip_byte_exact(messages in prop::collection::vec(message(), 1..6)) {
        let mut b = EnvelopeBuilder::default();
        let mut texts = Vec::new();
        let mut sent: Vec<Vec<DeviceMessage>> = vec![Vec::new()];
        for m in messages {
            if let Err(full) = b.push(m.clone()) {
                texts.push(b.finish());
                sent.push(Vec::new());
                b.push(full.0).unwrap();
            }
            sent.last_mut().unwrap().push(m);
        }
        texts.push(b.finish());
        for (text, want) in texts.iter().zip(&sent) {
            prop_assert!(text.len() <= QUEUE_MESSAGE_MAX_CHARS);
            prop_assert_eq!(&decode(text).unwrap(), want);
        }
    }

    #[test]
    fn dead_letters_pack_and_round_trip(
        messages in prop::collection::vec(message(), 1..5),
        detail in any::<String>(),
        indexes in prop::collection::vec(0usize..100, 0..100),
    ) {
        let records: Vec<DeadLetter> = messages
            .iter()
            .map(|m| {
                DeadLetter::new(
                    m,
                    Refusal {
                        reason: Reason::Schema,
                        detail: detail.clone(),
                        device_id: None,
                        rejected_indexes: indexes.clone(),
                        attempts: 1,
                        dead_lettered_at_ms: NOW,
                    },
                )
            })
            .collect();
        let mut seen = Vec::new();
        for (text, held) in pack(&records) {
            prop_assert!(text.len() <= QUEUE_MESSAGE_MAX_CHARS);
            let back = decode_message(&text).unwrap();
            prop_assert_eq!(back.len(), held.len());
            for (got, i) in back.iter().zip(&held) {
                let want = &records[*i];
                if got.payload_truncated && !want.payload_truncated {
                    // Cut to fit: the payload is a prefix, everything else intact.
                    let (g, w) = (got.payload_bytes().unwrap(), want.payload_bytes().unwrap());
                    prop_assert!(w.starts_with(&g));
                    prop_assert_eq!(&got.detail, &want.detail);
                } else {
                    prop_assert_eq!(got, want);
                }
            }
            seen.extend(held);
        }
        prop_assert_eq!(seen, (0..records.len()).collect::<Vec<_>>(), "every record packed, in order");
    }
}
