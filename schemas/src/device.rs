//! The device table: one row per device, holding its first/last sighting and latest reading.
//!
//! It is how the archiver finds work without scanning the telemetry table (it walks these rows
//! and queries each device's partition by RowKey range), and the "latest state" a dashboard
//! reads with one point lookup. All rows share one partition, so the processor updates up to
//! 100 devices per transaction; [`row`] is keyed by device id.
//!
//! The processor keeps one invariant: a device's row exists before any queue message carrying
//! its readings is deleted, so every partition of the telemetry table is listed here.

use crate::entity;
use crate::reading::{Extra, Reading};
use serde_json::{Map, Value};

pub const DEFAULT_TABLE: &str = "devices";
/// The one partition every device row lives in.
pub const PARTITION: &str = "device";

/// When the pipeline first stored a reading of the device (written once, at registration).
pub const FIRST_SEEN: &str = "FirstSeen";
/// The latest reading's extras, as one JSON object in a string (`{}` when it had none).
pub const EXTRAS: &str = "Extras";

/// The device row for `latest` (its newest reading so far): the reading's properties under
/// their telemetry-table names (`MeasuredAt`, `IngestedAt` = last seen, `Temperature`, ...),
/// plus [`FIRST_SEEN`] when `first_seen_ms` is given. Written with merge semantics, so a row
/// keeps its `FirstSeen` when later updates leave it out.
///
/// The schema is fixed: extras go into the one [`EXTRAS`] property, never `Ext_*` ones, since
/// merge keeps every property ever written, and a device that varies its extra names would
/// otherwise grow its row to Azure's 252-property limit, after which every update fails.
pub fn row(
    latest: &Reading,
    ingested_at_ms: i64,
    first_seen_ms: Option<i64>,
) -> Map<String, Value> {
    let extras: Map<String, Value> = latest
        .extras
        .iter()
        .map(|(name, extra)| (name.clone(), extra.to_json()))
        .collect();
    let bare = Reading {
        extras: Vec::new(),
        ..latest.clone()
    };
    let mut e = entity::to_entity(&bare, ingested_at_ms);
    e.insert(EXTRAS.into(), Value::Object(extras).to_string().into());
    e.insert("PartitionKey".into(), PARTITION.into());
    e.insert("RowKey".into(), latest.device_id.clone().into());
    if let Some(ms) = first_seen_ms {
        entity::typed_datetime(&mut e, FIRST_SEEN, ms);
    }
    e
}

/// The device id of a device row.
pub fn device_id(e: &Map<String, Value>) -> Option<&str> {
    e.get("RowKey").and_then(Value::as_str)
}

/// A device row read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// Its newest reading; `device_id` is the device's.
    pub latest: Reading,
    /// When that reading was stored: when the device was last heard from.
    pub last_seen_ms: i64,
    /// `None` for a row written before first sightings were recorded.
    pub first_seen_ms: Option<i64>,
}

/// Reads a device row returned by the table service.
pub fn from_row(e: &Map<String, Value>) -> Result<Device, entity::RowError> {
    let id = device_id(e).ok_or_else(|| entity::RowError::new("RowKey is missing"))?;
    let stored = entity::from_entity(e)?;
    let extras = match e.get(EXTRAS).and_then(Value::as_str) {
        Some(text) => match serde_json::from_str::<Map<String, Value>>(text) {
            Ok(map) => map
                .iter()
                .filter_map(|(name, v)| Extra::from_json(v).map(|x| (name.clone(), x)))
                .collect(),
            Err(_) => return Err(entity::RowError::new("Extras is not a JSON object")),
        },
        None => Vec::new(),
    };
    let first_seen_ms = e
        .get(FIRST_SEEN)
        .and_then(Value::as_str)
        .and_then(crate::timefmt::parse_rfc3339_ms);
    Ok(Device {
        latest: Reading {
            device_id: id.to_owned(),
            extras,
            ..stored.reading
        },
        last_seen_ms: stored.ingested_at_ms,
        first_seen_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_rows_share_a_partition_and_are_keyed_by_device() {
        let reading = Reading {
            device_id: "dev-7".into(),
            measured_at_ms: 1_705_312_800_000,
            seq: Some(4),
            temperature: Some(20.5),
            humidity: None,
            pressure: None,
            extras: Vec::new(),
        };
        let e = row(&reading, 1_705_312_801_000, Some(1_700_000_000_000));
        assert_eq!(e["PartitionKey"], PARTITION);
        assert_eq!(device_id(&e), Some("dev-7"));
        assert_eq!(e["FirstSeen@odata.type"], "Edm.DateTime");
        assert_eq!(e["Temperature"], 20.5);
        assert!(!row(&reading, 0, None).contains_key(FIRST_SEEN));
        assert_eq!(e[EXTRAS], "{}");
    }

    #[test]
    fn extras_never_add_properties() {
        let with = |name: &str| Reading {
            device_id: "dev-7".into(),
            measured_at_ms: 1,
            seq: None,
            temperature: Some(1.0),
            humidity: None,
            pressure: None,
            extras: vec![
                (name.to_owned(), Extra::Int(3)),
                ("mode".into(), Extra::Str("eco".into())),
            ],
        };
        let a = row(&with("fanA"), 2, None);
        let b = row(&with("fanB"), 2, None);
        let names = |e: &Map<String, Value>| e.keys().cloned().collect::<Vec<_>>();
        assert_eq!(names(&a), names(&b), "a fixed set of properties");
        assert!(names(&a).iter().all(|k| !k.starts_with("Ext_")));
        assert_eq!(a[EXTRAS], r#"{"fanA":3,"mode":"eco"}"#);
    }

    #[test]
    fn a_device_row_reads_back_with_its_extras_and_sightings() {
        let reading = Reading {
            device_id: "dev-7".into(),
            measured_at_ms: 1_705_312_800_000,
            seq: Some(4),
            temperature: Some(20.5),
            humidity: Some(40.0),
            pressure: None,
            extras: vec![
                ("fan".into(), Extra::Int(3)),
                ("mode".into(), Extra::Str("eco".into())),
            ],
        };
        let e = row(&reading, 1_705_312_801_000, Some(1_700_000_000_000));
        let device = from_row(&e).unwrap();
        assert_eq!(device.latest, reading);
        assert_eq!(device.last_seen_ms, 1_705_312_801_000);
        assert_eq!(device.first_seen_ms, Some(1_700_000_000_000));
        assert_eq!(
            from_row(&row(&reading, 5, None)).unwrap().first_seen_ms,
            None
        );
    }
}
