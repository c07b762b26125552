//! The device message and its validation.
//!
//! A payload is one reading object, or an array of up to [`MAX_READINGS_PER_MESSAGE`] readings
//! of the topic's device (a gateway batch). Validation is per reading: the valid readings of a
//! message are stored even when a sibling is rejected, and every rejected one is reported.

mod fields;

use crate::reason::Reason;
use crate::timefmt;
use fields::{Field, Fields, Item, Payload};
use std::time::Duration;

/// Most readings in one gateway array.
pub const MAX_READINGS_PER_MESSAGE: usize = 100;
/// Longest device id, in bytes (all allowed characters are ASCII).
pub const MAX_DEVICE_ID_LEN: usize = 128;
/// Most extra properties on one reading.
pub const MAX_EXTRAS: usize = 16;
/// Longest extra property name.
pub const MAX_EXTRA_NAME_LEN: usize = 64;
/// Longest extra string value, in bytes.
pub const MAX_EXTRA_STRING_LEN: usize = 256;

/// Physical ranges, inclusive: wider than any real sensor, narrow enough to catch garbage.
pub const TEMPERATURE_RANGE: (f64, f64) = (-90.0, 150.0);
pub const HUMIDITY_RANGE: (f64, f64) = (0.0, 100.0);
pub const PRESSURE_RANGE: (f64, f64) = (300.0, 1100.0);

const KNOWN_FIELDS: [&str; 6] = [
    "deviceId",
    "timestamp",
    "seq",
    "temperature",
    "humidity",
    "pressure",
];

/// The time-dependent part of validation.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// How far ahead of the processor's clock a timestamp may be (device clock skew).
    pub max_future: Duration,
    /// How old a reading may be. Older ones belong in the archive, not the live table.
    pub max_age: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_future: Duration::from_secs(5 * 60),
            max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// An operator's explicit relaxation of the rules for one replayed message
/// (`deadletter replay --allow-stale`, `--map-device`). It travels inside that message's
/// envelope entry, so it applies to that message alone: live traffic never carries one, and
/// the processor's own rules are never changed by it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Override {
    /// Accept readings older than the processor's maximum age (a backfill). The archiver rolls
    /// them out of the table on its next pass.
    #[serde(rename = "stale", default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_stale: bool,
    /// Device ids to read as others: `(from, to)`. A topic or payload `deviceId` equal to
    /// `from` counts as `to` (a corrected device-id mapping).
    #[serde(rename = "ids", default, skip_serializing_if = "Vec::is_empty")]
    pub device_ids: Vec<(String, String)>,
}

impl Override {
    /// No relaxation: the rules as configured.
    pub const NONE: Override = Override {
        allow_stale: false,
        device_ids: Vec::new(),
    };

    pub fn is_none(&self) -> bool {
        !self.allow_stale && self.device_ids.is_empty()
    }

    /// The id `id` is read as.
    pub fn device_id<'a>(&'a self, id: &'a str) -> &'a str {
        self.device_ids
            .iter()
            .find(|(from, _)| from == id)
            .map_or(id, |(_, to)| to.as_str())
    }
}

/// A validated reading, normalised: UTC milliseconds, measurements as `f64`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub device_id: String,
    pub measured_at_ms: i64,
    pub seq: Option<i64>,
    pub temperature: Option<f64>,
    pub humidity: Option<f64>,
    pub pressure: Option<f64>,
    /// Extra properties, sorted by name.
    pub extras: Vec<(String, Extra)>,
}

impl Reading {
    /// A digest of everything the reading holds, for checking stored values against what
    /// was sent (order-independent sums of digests compare whole sets cheaply).
    pub fn digest(&self) -> u64 {
        let mut h = crate::Fnv::default();
        h.write(self.device_id.as_bytes());
        h.write(&self.measured_at_ms.to_le_bytes());
        h.write(&self.seq.unwrap_or(-1).to_le_bytes());
        for v in [self.temperature, self.humidity, self.pressure] {
            // -0.0 and 0.0 are one value (storage may not keep the sign of a zero).
            h.write(&v.map_or(u64::MAX, |v| (v + 0.0).to_bits()).to_le_bytes());
        }
        for (name, extra) in &self.extras {
            h.write(name.as_bytes());
            h.write(format!("{extra:?}").as_bytes());
        }
        h.0
    }
}

/// An extra property's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Extra {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
}

impl Extra {
    /// The value as JSON, as a device sent it.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Extra::Int(i) => (*i).into(),
            Extra::Float(f) => (*f).into(),
            Extra::Bool(b) => (*b).into(),
            Extra::Str(s) => s.clone().into(),
        }
    }

    /// A JSON value as an extra; `None` for arrays, objects and null (never extras).
    pub fn from_json(value: &serde_json::Value) -> Option<Self> {
        match value {
            serde_json::Value::Bool(b) => Some(Extra::Bool(*b)),
            serde_json::Value::String(s) => Some(Extra::Str(s.clone())),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Some(Extra::Int(i)),
                None => n.as_f64().map(Extra::Float),
            },
            _ => None,
        }
    }
}

/// Why one reading (or the whole message, when `index` is `None`) was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reason,
    pub detail: String,
    /// Position in a gateway array; `None` for a single reading or a message-level failure.
    pub index: Option<usize>,
}

impl Rejection {
    fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            index: None,
        }
    }
}

/// The outcome of validating one device message.
#[derive(Debug, Default)]
pub struct Validated {
    pub readings: Vec<Reading>,
    pub rejections: Vec<Rejection>,
}

impl Validated {
    fn refused(rejection: Rejection) -> Self {
        Self {
            readings: Vec::new(),
            rejections: vec![rejection],
        }
    }
}

/// Checks a device id against the contract: 1-128 of `[A-Za-z0-9._:-]`, starting alphanumeric.
pub fn is_valid_device_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_DEVICE_ID_LEN
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Checks an extra property's name: 1-[`MAX_EXTRA_NAME_LEN`] of `[A-Za-z0-9_]`, starting
/// with a letter.
pub fn is_valid_extra_name(name: &str) -> bool {
    name.len() <= MAX_EXTRA_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The device id a topic names: the level between `{prefix}/` and `/telemetry`.
pub fn device_id_from_topic<'t>(prefix: &str, topic: &'t str) -> Option<&'t str> {
    topic
        .strip_prefix(prefix)?
        .strip_prefix('/')?
        .strip_suffix("/telemetry")
}

/// The topic a device publishes to.
pub fn topic_for(prefix: &str, device_id: &str) -> String {
    format!("{prefix}/{device_id}/telemetry")
}

/// Validates one device message. `original_len` is the payload's size as published, which
/// exceeds `payload.len()` when ingest had to truncate it.
pub fn validate(
    topic_prefix: &str,
    topic: &str,
    payload: &[u8],
    original_len: usize,
    now_ms: i64,
    policy: &Policy,
    overrides: &Override,
) -> Validated {
    if original_len > crate::MAX_PAYLOAD_BYTES {
        return Validated::refused(Rejection::new(
            Reason::TooLarge,
            format!(
                "payload is {original_len} bytes; the limit is {}",
                crate::MAX_PAYLOAD_BYTES
            ),
        ));
    }
    let topic_device =
        match device_id_from_topic(topic_prefix, topic).map(|id| overrides.device_id(id)) {
            Some(id) if is_valid_device_id(id) => id,
            Some(_) => {
                return Validated::refused(Rejection::new(
                    Reason::InvalidDeviceId,
                    "the topic's device id breaks the id rules",
                ))
            }
            None => {
                return Validated::refused(Rejection::new(
                    Reason::InvalidDeviceId,
                    format!("topic is not {topic_prefix}/{{deviceId}}/telemetry"),
                ))
            }
        };
    let payload = match std::str::from_utf8(payload) {
        Err(e) => {
            return Validated::refused(Rejection::new(
                Reason::MalformedJson,
                format!("payload is not UTF-8: {e}"),
            ))
        }
        Ok(text) => match fields::parse(text) {
            Ok(v) => v,
            Err(e) => {
                return Validated::refused(Rejection::new(
                    Reason::MalformedJson,
                    format!("payload is not JSON: {e}"),
                ))
            }
        },
    };
    let check = |index: Option<usize>, item: Item, out: &mut Validated| match item {
        Item::Object(f) => match reading_from(f, topic_device, now_ms, policy, overrides) {
            Ok(r) => out.readings.push(r),
            Err(mut rej) => {
                rej.index = index;
                out.rejections.push(rej);
            }
        },
        Item::NotObject => out.rejections.push(Rejection {
            reason: Reason::Schema,
            detail: "a reading must be a JSON object".into(),
            index,
        }),
    };
    let mut out = Validated::default();
    match payload {
        Payload::Array { len: 0, .. } => {
            out.rejections
                .push(Rejection::new(Reason::Schema, "the reading array is empty"));
        }
        Payload::Array { len, .. } if len > MAX_READINGS_PER_MESSAGE => {
            out.rejections.push(Rejection::new(
                Reason::Schema,
                format!("{len} readings in one message; the limit is {MAX_READINGS_PER_MESSAGE}"),
            ));
        }
        Payload::Array { items, .. } => {
            out.readings.reserve(items.len());
            // Element index of each reading kept, to name the first of two that collide.
            let mut kept_from: Vec<usize> = Vec::new();
            for (i, item) in items.into_iter().enumerate() {
                let before = out.readings.len();
                check(Some(i), item, &mut out);
                if out.readings.len() == before {
                    continue;
                }
                // One row per device and millisecond: a second reading for the same one would
                // silently overwrite the first. An identical copy is harmless and dropped; a
                // different one is refused, naming the element it collides with.
                let new = &out.readings[before];
                // The instant first: it rules out nearly every pair without a string compare.
                let earlier = out.readings[..before].iter().position(|r| {
                    r.measured_at_ms == new.measured_at_ms && r.device_id == new.device_id
                });
                if let Some(j) = earlier {
                    let same = out.readings[j] == *new;
                    out.readings.pop();
                    if !same {
                        out.rejections.push(Rejection {
                            reason: Reason::DuplicateTimestamp,
                            detail: format!(
                                "same device and millisecond as element {} with other values; the first is stored",
                                kept_from[j]
                            ),
                            index: Some(i),
                        });
                    }
                    continue;
                }
                kept_from.push(i);
            }
        }
        Payload::One(item) => check(None, item, &mut out),
    }
    out
}

fn reading_from(
    fields: Fields,
    topic_device: &str,
    now_ms: i64,
    policy: &Policy,
    overrides: &Override,
) -> Result<Reading, Rejection> {
    let device_id = match fields.device_id {
        Some(Field::Str(s)) => overrides.device_id(&s).to_owned(),
        Some(_) => return Err(Rejection::new(Reason::Schema, "deviceId must be a string")),
        None => return Err(Rejection::new(Reason::Schema, "deviceId is missing")),
    };
    if !is_valid_device_id(&device_id) {
        return Err(Rejection::new(
            Reason::InvalidDeviceId,
            "deviceId must be 1-128 of [A-Za-z0-9._:-], starting alphanumeric",
        ));
    }
    if device_id != topic_device {
        return Err(Rejection::new(
            Reason::DeviceMismatch,
            format!("payload deviceId {device_id:?} differs from the topic's {topic_device:?}"),
        ));
    }
    let measured_at_ms = match fields.timestamp {
        Some(Field::Str(s)) => timefmt::parse_rfc3339_ms(&s).ok_or_else(|| {
            Rejection::new(
                Reason::InvalidTimestamp,
                format!("timestamp {s:?} is not RFC 3339 with an offset in years 1970-9999"),
            )
        })?,
        Some(_) => return Err(Rejection::new(Reason::Schema, "timestamp must be a string")),
        None => return Err(Rejection::new(Reason::Schema, "timestamp is missing")),
    };
    let ahead = measured_at_ms.saturating_sub(now_ms);
    if ahead > millis(policy.max_future) {
        return Err(Rejection::new(
            Reason::FutureTimestamp,
            format!(
                "timestamp is {ahead} ms ahead of the processor's clock (allowed: {} ms)",
                millis(policy.max_future)
            ),
        ));
    }
    let age = now_ms.saturating_sub(measured_at_ms);
    if age > millis(policy.max_age) && !overrides.allow_stale {
        return Err(Rejection::new(
            Reason::Stale,
            format!(
                "reading is {} h old (allowed: {} h)",
                age / 3_600_000,
                policy.max_age.as_secs() / 3600
            ),
        ));
    }
    let seq = match fields.seq {
        None | Some(Field::Null) => None,
        Some(Field::Number(n)) => match n.as_u64() {
            Some(v) => Some(i64::try_from(v).map_err(|_| {
                Rejection::new(Reason::OutOfRange, format!("seq {v} exceeds 2^63-1"))
            })?),
            None => {
                return Err(Rejection::new(
                    Reason::Schema,
                    format!("seq must be an unsigned integer, got {n}"),
                ))
            }
        },
        Some(_) => return Err(Rejection::new(Reason::Schema, "seq must be a number")),
    };
    let temperature = measurement(fields.temperature, "temperature", TEMPERATURE_RANGE)?;
    let humidity = measurement(fields.humidity, "humidity", HUMIDITY_RANGE)?;
    let pressure = measurement(fields.pressure, "pressure", PRESSURE_RANGE)?;
    if temperature.is_none() && humidity.is_none() && pressure.is_none() {
        return Err(Rejection::new(
            Reason::Schema,
            "at least one of temperature, humidity, pressure is required",
        ));
    }
    if fields.extras.len() > MAX_EXTRAS {
        return Err(Rejection::new(
            Reason::Schema,
            format!(
                "{} extra fields; the limit is {MAX_EXTRAS}",
                fields.extras.len()
            ),
        ));
    }
    let mut extras = Vec::with_capacity(fields.extras.len());
    for (name, value) in fields.extras {
        let extra = extra_from(&name, value)?;
        extras.push((name.into_owned(), extra));
    }
    Ok(Reading {
        device_id,
        measured_at_ms,
        seq,
        temperature,
        humidity,
        pressure,
        extras,
    })
}

fn measurement(
    field: Option<Field>,
    name: &str,
    (lo, hi): (f64, f64),
) -> Result<Option<f64>, Rejection> {
    match field {
        None | Some(Field::Null) => Ok(None),
        Some(Field::Number(n)) => {
            // serde_json numbers are always finite, and every JSON number has an f64 form.
            let v = n.as_f64().unwrap_or(f64::NAN);
            if (lo..=hi).contains(&v) {
                Ok(Some(v))
            } else {
                Err(Rejection::new(
                    Reason::OutOfRange,
                    format!("{name} {n} is outside [{lo}, {hi}]"),
                ))
            }
        }
        Some(_) => Err(Rejection::new(
            Reason::Schema,
            format!("{name} must be a number"),
        )),
    }
}

fn extra_from(name: &str, value: Field) -> Result<Extra, Rejection> {
    if !is_valid_extra_name(name) {
        return Err(Rejection::new(
            Reason::Schema,
            format!(
                "extra field name {:?} must be 1-{MAX_EXTRA_NAME_LEN} of [A-Za-z0-9_], starting with a letter",
                truncate(name, 80)
            ),
        ));
    }
    if KNOWN_FIELDS.iter().any(|k| k.eq_ignore_ascii_case(name)) {
        return Err(Rejection::new(
            Reason::Schema,
            format!("extra field {name:?} differs from a contract field only by case"),
        ));
    }
    match value {
        Field::Bool(b) => Ok(Extra::Bool(b)),
        Field::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(Extra::Int(i))
            } else if n.is_u64() {
                Err(Rejection::new(
                    Reason::OutOfRange,
                    format!("extra field {name:?} = {n} exceeds 2^63-1"),
                ))
            } else {
                Ok(Extra::Float(n.as_f64().unwrap_or(f64::NAN)))
            }
        }
        Field::Str(s) if s.len() <= MAX_EXTRA_STRING_LEN => Ok(Extra::Str(s.into_owned())),
        Field::Str(s) => Err(Rejection::new(
            Reason::Schema,
            format!(
                "extra field {name:?} is a {}-byte string; the limit is {MAX_EXTRA_STRING_LEN}",
                s.len()
            ),
        )),
        _ => Err(Rejection::new(
            Reason::Schema,
            format!("extra field {name:?} must be a number, bool or string"),
        )),
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `s` cut to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    fn check(topic: &str, payload: &str, overrides: &Override) -> Vec<Reason> {
        let out = validate(
            "devices",
            topic,
            payload.as_bytes(),
            payload.len(),
            NOW,
            &Policy::default(),
            overrides,
        );
        out.rejections.iter().map(|r| r.reason).collect()
    }

    #[test]
    fn overrides_relax_only_what_they_name() {
        let old = timefmt::format_ms(NOW - 90 * 24 * 3_600_000);
        let stale = format!(r#"{{"deviceId":"d-1","timestamp":"{old}","temperature":1}}"#);
        let topic = "devices/d-1/telemetry";
        let backfill = Override {
            allow_stale: true,
            ..Override::NONE
        };
        assert_eq!(check(topic, &stale, &Override::NONE), [Reason::Stale]);
        assert_eq!(check(topic, &stale, &backfill), []);

        let now = timefmt::format_ms(NOW);
        let renamed = format!(r#"{{"deviceId":"OLD ID","timestamp":"{now}","temperature":1}}"#);
        let map = Override {
            device_ids: vec![("OLD ID".into(), "d-1".into())],
            ..Override::NONE
        };
        assert_eq!(
            check(topic, &renamed, &Override::NONE),
            [Reason::InvalidDeviceId]
        );
        assert_eq!(check(topic, &renamed, &map), []);
        // The topic's id is mapped too, and the stored reading carries the new id.
        let out = validate(
            "devices",
            "devices/OLD ID/telemetry",
            renamed.as_bytes(),
            renamed.len(),
            NOW,
            &Policy::default(),
            &map,
        );
        assert_eq!(out.readings[0].device_id, "d-1");
        // A mapping does not excuse anything else.
        assert_eq!(check(topic, &stale, &map), [Reason::Stale]);
    }

    #[test]
    fn what_serde_json_values_refuse_is_not_json() {
        let at = timefmt::format_ms(NOW);
        let good = format!(r#"{{"deviceId":"d-1","timestamp":"{at}","temperature":1}}"#);
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let mut payloads: Vec<String> =
            [deep.as_str(), "[1e400]", r#"{"a":-1e999}"#, r#"["\ud800"]"#]
                .iter()
                .map(|inner| {
                    format!(r#"[{good},{{"deviceId":"d-1","timestamp":"{at}","x":{inner}}}]"#)
                })
                .collect();
        // Past the array limit too: the message is read whole before it is judged.
        payloads.push(format!(
            "[{}[1e400]]",
            "7,".repeat(MAX_READINGS_PER_MESSAGE)
        ));
        for payload in payloads {
            assert!(serde_json::from_str::<serde_json::Value>(&payload).is_err());
            assert_eq!(
                check("devices/d-1/telemetry", &payload, &Override::NONE),
                [Reason::MalformedJson],
                "{payload}"
            );
        }
    }

    #[test]
    fn nesting_is_json_exactly_as_deep_as_serde_json_values_go() {
        let at = timefmt::format_ms(NOW);
        let good = format!(r#"{{"deviceId":"d-1","timestamp":"{at}","temperature":1}}"#);
        for depth in 120..=132 {
            let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            let as_extra = format!(r#"{{"deviceId":"d-1","timestamp":"{at}","x":{nested}}}"#);
            let past_limit = format!("[{}{nested}]", "7,".repeat(MAX_READINGS_PER_MESSAGE));
            for payload in [
                format!("[{good},{as_extra}]"),
                format!("[{good},{nested}]"),
                past_limit,
            ] {
                let json = serde_json::from_str::<serde_json::Value>(&payload).is_ok();
                let refused = check("devices/d-1/telemetry", &payload, &Override::NONE);
                assert_eq!(
                    refused == [Reason::MalformedJson],
                    !json,
                    "depth {depth}: {refused:?}"
                );
            }
        }
    }

    #[test]
    fn two_readings_of_one_millisecond_in_an_array_are_one_row_or_a_refusal() {
        let at = timefmt::format_ms(NOW);
        let r = |t: f64| format!(r#"{{"deviceId":"gw-1","timestamp":"{at}","temperature":{t}}}"#);
        let other = timefmt::format_ms(NOW + 1);
        let later = format!(r#"{{"deviceId":"gw-1","timestamp":"{other}","temperature":1}}"#);
        let payload = format!("[{},{},{later},{}]", r(1.0), r(1.0), r(2.0));
        let out = validate(
            "devices",
            "devices/gw-1/telemetry",
            payload.as_bytes(),
            payload.len(),
            NOW,
            &Policy::default(),
            &Override::NONE,
        );
        // The identical copy is harmless; the different one is refused, naming the first.
        assert_eq!(out.readings.len(), 2);
        assert_eq!(out.readings[0].temperature, Some(1.0));
        assert_eq!(out.rejections.len(), 1);
        let refused = &out.rejections[0];
        assert_eq!(refused.reason, Reason::DuplicateTimestamp);
        assert_eq!(refused.index, Some(3));
        assert!(refused.detail.contains("element 0"), "{}", refused.detail);
    }
}
