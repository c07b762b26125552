//! The API's representations: JSON (camelCase, times in RFC 3339), CSV for spreadsheets, and
//! Parquet (the archive's own schema) for pandas and DuckDB.

use schemas::device::Device;
use schemas::entity::StoredReading;
use schemas::reading::Reading;
use schemas::rollup::{Rollup, Seqs, Stats, MEASUREMENTS};
use schemas::timefmt::format_ms;
use serde_json::{json, Map, Value};

fn extras(reading: &Reading) -> Value {
    Value::Object(
        reading
            .extras
            .iter()
            .map(|(name, extra)| (name.clone(), extra.to_json()))
            .collect::<Map<String, Value>>(),
    )
}

/// A reading as the table row holds it, in camelCase.
pub fn reading(row: &StoredReading) -> Value {
    let r = &row.reading;
    json!({
        "measuredAt": format_ms(r.measured_at_ms),
        "ingestedAt": format_ms(row.ingested_at_ms),
        "seq": r.seq,
        "temperature": r.temperature,
        "humidity": r.humidity,
        "pressure": r.pressure,
        "extras": extras(r),
    })
}

/// A device with its sightings and latest values.
pub fn device(d: &Device, now_ms: i64) -> Value {
    let r = &d.latest;
    json!({
        "id": r.device_id,
        "firstSeen": d.first_seen_ms.map(format_ms),
        "lastSeen": format_ms(d.last_seen_ms),
        "silentForSeconds": (now_ms - d.last_seen_ms).max(0) / 1000,
        "latest": {
            "measuredAt": format_ms(r.measured_at_ms),
            "seq": r.seq,
            "temperature": r.temperature,
            "humidity": r.humidity,
            "pressure": r.pressure,
            "extras": extras(r),
        },
    })
}

fn stats(s: &Stats) -> Value {
    if s.count == 0 {
        return Value::Null;
    }
    json!({ "count": s.count, "min": s.min, "max": s.max, "mean": s.mean(), "sum": s.sum })
}

/// A rollup: the period, its reading count and times, and per measurement count, min, max,
/// mean and sum (`null` when the period has none of it).
pub fn rollup(r: &Rollup) -> Value {
    json!({
        "periodStart": format_ms(r.start_ms),
        "count": r.count,
        "firstAt": format_ms(r.first_at_ms),
        "lastAt": format_ms(r.last_at_ms),
        "temperature": stats(&r.stats[0]),
        "humidity": stats(&r.stats[1]),
        "pressure": stats(&r.stats[2]),
        "seq": r.seqs.filter(Seqs::numbered).map(|q| json!({
            "first": q.first,
            "last": q.last,
            "distinct": q.distinct,
            "missing": q.missing,
        })),
    })
}

/// A run of `seq` numbers a device skipped, when the readings either side were measured, and
/// which of its numbers the processor refused, with the reasons.
pub fn gap<'r>(
    g: &crate::gaps::Gap,
    refused: impl Iterator<Item = &'r schemas::rollup::Refused>,
) -> Value {
    let refused: Vec<Value> = refused
        .map(|r| json!({"seq": r.seq, "reason": r.reason, "refusedAt": format_ms(r.at_ms)}))
        .collect();
    json!({
        "first": g.first,
        "last": g.last,
        "count": g.count(),
        "missing": g.count().saturating_sub(refused.len() as u64),
        "after": format_ms(g.after_ms),
        "before": format_ms(g.before_ms),
        "refused": refused,
    })
}

/// Rollups as CSV: one line a period, five columns a measurement.
pub fn rollups_csv(rollups: &[Rollup]) -> String {
    let mut out = String::from("periodStart,count,firstAt,lastAt");
    for m in MEASUREMENTS {
        let m = m.to_lowercase();
        for part in ["Count", "Min", "Max", "Mean", "Sum"] {
            out.push_str(&format!(",{m}{part}"));
        }
    }
    out.push_str(",seqFirst,seqLast,seqDistinct,seqMissing\r\n");
    for r in rollups {
        out.push_str(&format!(
            "{},{},{},{}",
            format_ms(r.start_ms),
            r.count,
            format_ms(r.first_at_ms),
            format_ms(r.last_at_ms)
        ));
        for s in &r.stats {
            if s.count == 0 {
                out.push_str(",0,,,,");
            } else {
                let mean = s.mean().unwrap_or_default();
                out.push_str(&format!(
                    ",{},{},{},{mean},{}",
                    s.count, s.min, s.max, s.sum
                ));
            }
        }
        match r.seqs.filter(Seqs::numbered) {
            Some(q) => out.push_str(&format!(
                ",{},{},{},{}\r\n",
                q.first, q.last, q.distinct, q.missing
            )),
            None => out.push_str(",,,,\r\n"),
        }
    }
    out
}

/// Readings as CSV (RFC 4180): one line each, extras as one JSON column.
pub fn readings_csv(rows: &[StoredReading]) -> String {
    let mut out =
        String::from("measuredAt,ingestedAt,seq,temperature,humidity,pressure,extras\r\n");
    let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    for row in rows {
        let r = &row.reading;
        let extras = if r.extras.is_empty() {
            String::new()
        } else {
            quote(&extras(r).to_string())
        };
        out.push_str(&format!(
            "{},{},{},{},{},{},{}\r\n",
            format_ms(r.measured_at_ms),
            format_ms(row.ingested_at_ms),
            r.seq.map(|s| s.to_string()).unwrap_or_default(),
            opt(r.temperature),
            opt(r.humidity),
            opt(r.pressure),
            extras
        ));
    }
    out
}

fn quote(field: &str) -> String {
    format!("\"{}\"", field.replace('"', "\"\""))
}

/// A device's state under a rule, for `/api/v1/alarms` and `/api/v1/devices/{id}/alarms`:
/// the rule, its condition (`band` or `silence`), the status, since when (raised or pending),
/// and the last reading judged; the measurement is the rule's (`None`: the rule is gone).
pub fn alarm(
    device: &str,
    row: &schemas::alarm::StateRow,
    measurement: Option<&str>,
) -> serde_json::Value {
    use schemas::alarm::Status;
    let (rule, condition) = schemas::alarm::split_key(&row.rule);
    let (status, since) = match row.state.status {
        Status::Raised { since } => ("raised", Some(since)),
        Status::Pending { since } => ("pending", Some(since)),
        Status::Clear => ("clear", None),
    };
    serde_json::json!({
        "deviceId": device,
        "rule": rule,
        "condition": condition.name(),
        "measurement": measurement,
        "status": status,
        "since": since.map(schemas::timefmt::format_ms),
        "value": row.state.value,
        "measuredAt": schemas::timefmt::format_ms(row.state.at),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::reading::Extra;

    fn row() -> StoredReading {
        StoredReading {
            reading: Reading {
                device_id: "d".into(),
                measured_at_ms: 1_705_312_800_123,
                seq: Some(7),
                temperature: Some(21.5),
                humidity: None,
                pressure: Some(1013.0),
                extras: vec![("mode".into(), Extra::Str("a \"quoted\", b".into()))],
            },
            ingested_at_ms: 1_705_312_801_000,
        }
    }

    #[test]
    fn json_is_camel_case_with_rfc3339_times() {
        let v = reading(&row());
        assert_eq!(v["measuredAt"], "2024-01-15T10:00:00.123Z");
        assert_eq!(v["temperature"], 21.5);
        assert_eq!(v["humidity"], Value::Null);
        assert_eq!(v["extras"]["mode"], "a \"quoted\", b");
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let csv = readings_csv(&[row()]);
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(
            lines[0],
            "measuredAt,ingestedAt,seq,temperature,humidity,pressure,extras"
        );
        assert_eq!(
            lines[1],
            r#"2024-01-15T10:00:00.123Z,2024-01-15T10:00:01.000Z,7,21.5,,1013,"{""mode"":""a \""quoted\"", b""}""#
        );
    }

    #[test]
    fn rollups_carry_their_ledger_or_none() {
        use schemas::rollup::Interval;
        let numbered = row().reading;
        let unnumbered = Reading {
            seq: None,
            ..row().reading
        };
        let start = Interval::Hour.floor(numbered.measured_at_ms);
        let with = Rollup::of(Interval::Hour, start, [&numbered]).unwrap();
        let without = Rollup::of(Interval::Hour, start, [&unnumbered]).unwrap();
        assert_eq!(
            rollup(&with)["seq"],
            json!({"first": 7, "last": 7, "distinct": 1, "missing": 0})
        );
        assert_eq!(rollup(&without)["seq"], Value::Null);
        let csv = rollups_csv(&[with, without]);
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert!(lines[0].ends_with(",pressureSum,seqFirst,seqLast,seqDistinct,seqMissing"));
        assert!(lines[1].ends_with(",7,7,1,0"), "{}", lines[1]);
        assert!(lines[2].ends_with(",,,,"), "{}", lines[2]);
        assert_eq!(lines[0].split(',').count(), lines[2].split(',').count());
    }
}
