//! The Azure Table row a reading becomes.
//!
//! Table `telemetry`; PartitionKey = device id; RowKey = [`timefmt::format_ms`] of the reading's
//! time, so one device's rows sort by time and a redelivered reading overwrites its own row.
//! Every typed property carries an explicit `@odata.type`: without it Azure stores an `i64` as a
//! double (losing precision above 2^53) and a datetime as a string. Extras are stored as
//! `Ext_<name>` so they can never collide with the contract's own properties.

use crate::reading::{Extra, Reading};
use crate::timefmt;
use serde_json::{Map, Value};

pub const DEFAULT_TABLE: &str = "telemetry";
pub const EXTRA_PREFIX: &str = "Ext_";

const DATETIME: &str = "Edm.DateTime";
pub(crate) const DOUBLE: &str = "Edm.Double";
pub(crate) const INT64: &str = "Edm.Int64";

/// The entity's JSON body, ready for an upsert.
pub fn to_entity(reading: &Reading, ingested_at_ms: i64) -> Map<String, Value> {
    let mut e = Map::with_capacity(16 + 2 * reading.extras.len());
    e.insert("PartitionKey".into(), reading.device_id.clone().into());
    e.insert("RowKey".into(), row_key(reading).into());
    typed_datetime(&mut e, "MeasuredAt", reading.measured_at_ms);
    typed_datetime(&mut e, "IngestedAt", ingested_at_ms);
    if let Some(seq) = reading.seq {
        typed(&mut e, "Seq", INT64, seq.to_string().into());
    }
    for (name, v) in [
        ("Temperature", reading.temperature),
        ("Humidity", reading.humidity),
        ("Pressure", reading.pressure),
    ] {
        if let Some(v) = v {
            typed(&mut e, name, DOUBLE, v.into());
        }
    }
    for (name, extra) in &reading.extras {
        let key = format!("{EXTRA_PREFIX}{name}");
        match extra {
            Extra::Int(i) => typed(&mut e, &key, INT64, i.to_string().into()),
            Extra::Float(f) => typed(&mut e, &key, DOUBLE, (*f).into()),
            Extra::Bool(b) => {
                e.insert(key, (*b).into());
            }
            Extra::Str(s) => {
                e.insert(key, s.clone().into());
            }
        }
    }
    e
}

/// [`to_entity`]'s JSON written straight into `out`, with no map, allocating only for a
/// property name that needs escaping (validated names never do): the processor's hot path.
/// The same properties and values (the equality is unit-tested).
pub fn encode(reading: &Reading, ingested_at_ms: i64, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"PartitionKey\":");
    json(out, reading.device_id.as_str());
    out.extend_from_slice(b",\"RowKey\":\"");
    timefmt::write_ms(out, reading.measured_at_ms);
    out.push(b'"');
    encoded_datetime(out, "MeasuredAt", reading.measured_at_ms);
    if let Some(seq) = reading.seq {
        encoded_int(out, "", "Seq", seq);
    }
    for (name, v) in [
        ("Temperature", reading.temperature),
        ("Humidity", reading.humidity),
        ("Pressure", reading.pressure),
    ] {
        if let Some(v) = v {
            encoded_double(out, "", name, v);
        }
    }
    for (name, extra) in &reading.extras {
        match extra {
            Extra::Int(i) => encoded_int(out, EXTRA_PREFIX, name, *i),
            Extra::Float(f) => encoded_double(out, EXTRA_PREFIX, name, *f),
            Extra::Bool(b) => {
                property(out, EXTRA_PREFIX, name, "");
                json(out, b);
            }
            Extra::Str(s) => {
                property(out, EXTRA_PREFIX, name, "");
                json(out, s.as_str());
            }
        }
    }
    encoded_datetime(out, INGESTED_AT, ingested_at_ms);
    out.push(b'}');
}

const INGESTED_AT: &str = "IngestedAt";

/// No body from [`encode`] is longer, and a typical one is about a third shorter: what a
/// write of `reading` is planned at before it is encoded. Each property present is counted at
/// its longest value (a number at 24 characters), each string at its escaped length.
pub fn encoded_len_bound(reading: &Reading) -> usize {
    /// `{"PartitionKey":`, `,"RowKey":"<time>"`, `MeasuredAt` and `IngestedAt` typed, `}`.
    const FIXED: usize = 16 + 36 + 2 * 79 + 1;
    /// A typed property's name twice, its type, separators and longest value, beyond the
    /// name's own length (twice).
    const TYPED: usize = 64;
    let numbers = [reading.temperature, reading.humidity, reading.pressure]
        .iter()
        .filter(|v| v.is_some())
        .count();
    let seq = reading.seq.map_or(0, |_| TYPED + 2 * "Seq".len());
    let extras: usize = reading
        .extras
        .iter()
        .map(|(name, extra)| {
            let value = match extra {
                Extra::Str(s) => escaped_len(s),
                Extra::Int(_) | Extra::Float(_) | Extra::Bool(_) => 0,
            };
            TYPED + 2 * (EXTRA_PREFIX.len() + escaped_len(name)) + value
        })
        .sum();
    FIXED
        + escaped_len(&reading.device_id)
        + numbers * (TYPED + 2 * "Temperature".len())
        + seq
        + extras
}

/// The longest a string can be as JSON, quotes included: two characters for a quote or a
/// backslash, six for a control character, one for anything else (other characters are
/// written as they are).
fn escaped_len(s: &str) -> usize {
    let escapes: usize = s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' => 1,
            0..=0x1f => 5,
            _ => 0,
        })
        .sum();
    2 + s.len() + escapes
}

/// `,"<prefix><name><suffix>":`
fn property(out: &mut Vec<u8>, prefix: &str, name: &str, suffix: &str) {
    out.extend_from_slice(b",\"");
    for part in [prefix, name, suffix] {
        // Validated names need no escaping; any other name is escaped as JSON requires.
        if part
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        {
            out.extend_from_slice(part.as_bytes());
        } else {
            let quoted = serde_json::to_string(part).expect("a string serialises");
            out.extend_from_slice(&quoted.as_bytes()[1..quoted.len() - 1]);
        }
    }
    out.extend_from_slice(b"\":");
}

/// `,"<prefix><name>@odata.type":"<edm>","<prefix><name>":`, for the value to follow.
fn typed_name(out: &mut Vec<u8>, prefix: &str, name: &str, edm: &str) {
    property(out, prefix, name, "@odata.type");
    out.push(b'"');
    out.extend_from_slice(edm.as_bytes());
    out.push(b'"');
    property(out, prefix, name, "");
}

fn encoded_datetime(out: &mut Vec<u8>, name: &str, ms: i64) {
    typed_name(out, "", name, DATETIME);
    out.push(b'"');
    timefmt::write_ms(out, ms.clamp(timefmt::MIN_MS, timefmt::MAX_MS));
    out.push(b'"');
}

/// An `Edm.Int64`, as a string (a JSON number would be read as a double).
fn encoded_int(out: &mut Vec<u8>, prefix: &str, name: &str, v: i64) {
    typed_name(out, prefix, name, INT64);
    out.push(b'"');
    json(out, &v);
    out.push(b'"');
}

fn encoded_double(out: &mut Vec<u8>, prefix: &str, name: &str, v: f64) {
    typed_name(out, prefix, name, DOUBLE);
    json(out, &v);
}

fn json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    serde_json::to_writer(out, v).expect("a value serialises into a Vec");
}

/// The RowKey of a reading.
pub fn row_key(reading: &Reading) -> String {
    timefmt::format_ms(reading.measured_at_ms)
}

/// Sets an `Edm.DateTime` property (clamped to the range the service stores).
pub fn typed_datetime(e: &mut Map<String, Value>, name: &str, ms: i64) {
    let text = timefmt::format_ms(ms.clamp(timefmt::MIN_MS, timefmt::MAX_MS));
    typed(e, name, DATETIME, text.into());
}

pub(crate) fn typed(e: &mut Map<String, Value>, name: &str, edm: &str, value: Value) {
    e.insert(format!("{name}@odata.type"), edm.into());
    e.insert(name.to_owned(), value);
}

/// A stored row read back, tolerant of how the service renders types (Int64 as strings,
/// whole doubles as integers, DateTime with seven fractional digits).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredReading {
    pub reading: Reading,
    pub ingested_at_ms: i64,
}

/// Why a row could not be read as a reading.
#[derive(Debug, thiserror::Error)]
#[error("table row is not a telemetry reading: {0}")]
pub struct RowError(String);

impl RowError {
    pub fn new(why: impl Into<String>) -> Self {
        Self(why.into())
    }
}

/// Reads a row returned by the table service (with `odata=fullmetadata` annotations).
pub fn from_entity(e: &Map<String, Value>) -> Result<StoredReading, RowError> {
    let text = |name: &str| {
        e.get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| RowError(format!("{name} is missing")))
    };
    let time = |name: &str| {
        text(name).and_then(|s| {
            timefmt::parse_rfc3339_ms(s).ok_or_else(|| RowError(format!("{name} {s:?}")))
        })
    };
    let number = |name: &str| e.get(name).and_then(number_of);
    let mut extras = Vec::new();
    for (key, value) in e {
        let Some(name) = key.strip_prefix(EXTRA_PREFIX) else {
            continue;
        };
        if name.contains('@') {
            continue;
        }
        let edm = e.get(&format!("{key}@odata.type")).and_then(Value::as_str);
        let extra = match (edm, value) {
            (Some(INT64), v) => {
                Extra::Int(integer_of(v).ok_or_else(|| RowError(format!("{key} is not an Int64")))?)
            }
            (_, Value::Bool(b)) => Extra::Bool(*b),
            (_, Value::String(s)) => Extra::Str(s.clone()),
            (_, v) => Extra::Float(
                number_of(v).ok_or_else(|| RowError(format!("{key} is not a number")))?,
            ),
        };
        extras.push((name.to_owned(), extra));
    }
    let seq = match e.get("Seq") {
        Some(v) => Some(integer_of(v).ok_or_else(|| RowError("Seq is not an Int64".into()))?),
        None => None,
    };
    Ok(StoredReading {
        reading: Reading {
            device_id: text("PartitionKey")?.to_owned(),
            measured_at_ms: time("MeasuredAt")?,
            seq,
            temperature: number("Temperature"),
            humidity: number("Humidity"),
            pressure: number("Pressure"),
            extras,
        },
        ingested_at_ms: time("IngestedAt")?,
    })
}

pub(crate) fn number_of(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

pub(crate) fn integer_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_has_explicit_types_and_round_trips() {
        let reading = Reading {
            device_id: "dev-1".into(),
            measured_at_ms: 1_705_312_800_123,
            seq: Some(i64::MAX),
            temperature: Some(3.0),
            humidity: None,
            pressure: Some(1013.25),
            extras: vec![
                ("battery".into(), Extra::Int(9_007_199_254_740_993)),
                ("charging".into(), Extra::Bool(true)),
                ("fw".into(), Extra::Str("1.2.3".into())),
                ("rssi".into(), Extra::Float(-71.5)),
            ],
        };
        let e = to_entity(&reading, 1_705_312_801_000);
        assert_eq!(e["RowKey"], "2024-01-15T10:00:00.123Z");
        assert_eq!(e["Seq@odata.type"], "Edm.Int64");
        assert_eq!(e["Seq"], i64::MAX.to_string());
        assert_eq!(e["MeasuredAt@odata.type"], "Edm.DateTime");
        assert_eq!(e["Ext_battery"], "9007199254740993");
        // What the service sends back: whole doubles as integers, seven fractional digits.
        let mut back = e.clone();
        back.insert("Temperature".into(), 3.into());
        back.insert("MeasuredAt".into(), "2024-01-15T10:00:00.1230000Z".into());
        let stored = from_entity(&back).unwrap();
        assert_eq!(stored.reading, reading);
        assert_eq!(stored.ingested_at_ms, 1_705_312_801_000);
    }

    #[test]
    fn the_encoded_body_is_the_entity() {
        let full = Reading {
            device_id: "dev \"q\" ü".into(),
            measured_at_ms: 1_705_312_800_123,
            seq: Some(-5),
            temperature: Some(3.0),
            humidity: Some(-0.0),
            pressure: Some(1e300),
            extras: vec![
                ("battery".into(), Extra::Int(i64::MIN)),
                ("charging".into(), Extra::Bool(false)),
                ("fw".into(), Extra::Str("a\"b\\c\n☃".into())),
                ("rssi".into(), Extra::Float(-71.5)),
                ("odd \"name\"".into(), Extra::Float(1.0)),
            ],
        };
        let bare = Reading {
            device_id: "d".into(),
            measured_at_ms: 0,
            seq: None,
            temperature: None,
            humidity: None,
            pressure: None,
            extras: vec![],
        };
        for (reading, at) in [(full, 1_705_312_801_000), (bare, timefmt::MAX_MS + 9)] {
            let mut body = Vec::new();
            encode(&reading, at, &mut body);
            let parsed: Map<String, Value> = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)));
            assert_eq!(parsed, to_entity(&reading, at));
        }
    }

    #[test]
    fn no_body_is_longer_than_its_bound() {
        let longest = Reading {
            device_id: "\u{1}".repeat(64),
            measured_at_ms: timefmt::MIN_MS,
            seq: Some(i64::MIN),
            temperature: Some(-1.234_567_890_123_456_7e-300),
            humidity: Some(f64::MIN_POSITIVE),
            pressure: Some(f64::MIN),
            extras: vec![
                ("\u{2}".repeat(40), Extra::Int(i64::MIN)),
                ("\"".repeat(40), Extra::Float(-2.225_073_858_507_201_4e-308)),
                ("b".into(), Extra::Bool(false)),
                ("s".into(), Extra::Str("\u{3}\"\\".repeat(100))),
            ],
        };
        let mut body = Vec::new();
        encode(&longest, i64::MIN, &mut body);
        assert!(body.len() <= encoded_len_bound(&longest), "{}", body.len());
        let bare = Reading {
            device_id: "d".into(),
            measured_at_ms: 0,
            seq: None,
            temperature: None,
            humidity: None,
            pressure: None,
            extras: vec![],
        };
        body.clear();
        encode(&bare, i64::MAX, &mut body);
        assert!(body.len() <= encoded_len_bound(&bare));
        let typical = Reading {
            device_id: "sensor-00042".into(),
            measured_at_ms: 1_705_312_800_123,
            seq: Some(1234),
            temperature: Some(21.37),
            humidity: Some(45.2),
            pressure: None,
            extras: vec![("fw".into(), Extra::Str("1.2.3".into()))],
        };
        body.clear();
        encode(&typical, 1_705_312_801_000, &mut body);
        let bound = encoded_len_bound(&typical);
        assert!(
            body.len() <= bound && bound <= body.len() * 3 / 2,
            "{} of {bound}",
            body.len()
        );
    }
}
