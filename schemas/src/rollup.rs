//! Rollups: per device and UTC hour or day, each measurement's count, min, max and sum (so
//! means combine exactly), the first and last reading times, and the completeness ledger
//! ([`Seqs`]): which of the readings the device numbered are stored.
//!
//! Table `rollups`: PartitionKey = device id, RowKey = `1h|<period start>` or `1d|<period
//! start>` ([`Interval::row_key`], fixed width), so one device's range of one interval is one
//! partition range query. A rollup is always recomputed from its readings (an hour) or its
//! hours (a day), never incremented, so redelivered readings cannot count twice.
//!
//! The same table holds the bookkeeping of whoever keeps rollups current, in partitions no
//! device id can name (device ids start with a letter or digit): [`MARKS`] (device-hours
//! written after their hour ended, to recompute), [`STATE`], and [`STORED`] (readings stored
//! per minute, for the dashboard).

use crate::entity::{self, integer_of, number_of, typed, RowError, INT64};
use crate::reading::Reading;
use crate::timefmt::{self, format_ms};
use serde_json::{Map, Value};

pub const DEFAULT_TABLE: &str = "rollups";
pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 86_400_000;
/// The partitions of device-hours to recompute (`~marks-0` to `~marks-f`, by device, so a
/// backlog's marks spread over 16 partitions): RowKey `<hour start>|<device>`.
pub const MARKS: &str = "~marks-";
/// A reading written more than this after its hour ended is marked; one written sooner is
/// left to the sweep, which runs `ARCHIVER_ROLLUP_SETTLE` (at least [`MIN_SETTLE_MS`]) after
/// the hour ends.
pub const MARK_AFTER_MS: i64 = 60_000;
/// The shortest settle the archiver accepts: the mark delay plus room for clock skew.
pub const MIN_SETTLE_MS: i64 = 2 * MARK_AFTER_MS;
/// The partition of the rollup keeper's own state.
pub const STATE: &str = "~state";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interval {
    Hour,
    Day,
}

impl Interval {
    pub fn ms(self) -> i64 {
        match self {
            Interval::Hour => HOUR_MS,
            Interval::Day => DAY_MS,
        }
    }

    /// `1h` or `1d`: the API's name and the RowKey prefix.
    pub fn name(self) -> &'static str {
        match self {
            Interval::Hour => "1h",
            Interval::Day => "1d",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "1h" => Some(Interval::Hour),
            "1d" => Some(Interval::Day),
            _ => None,
        }
    }

    /// The start of the period holding `ms`.
    pub fn floor(self, ms: i64) -> i64 {
        ms.div_euclid(self.ms()) * self.ms()
    }

    /// The RowKey of the period starting at `start_ms` (fixed width: lexical order is time
    /// order).
    pub fn row_key(self, start_ms: i64) -> String {
        format!("{}|{}", self.name(), format_ms(start_ms))
    }
}

/// One measurement over a period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            count: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sum: 0.0,
        }
    }
}

impl Stats {
    fn add(&mut self, v: f64) {
        self.count += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += v;
    }

    fn merge(&mut self, other: &Stats) {
        if other.count == 0 {
            return;
        }
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// The completeness ledger of a period: of the readings the device numbered (`seq`), which are
/// stored. A device counts its readings up; a fall in `seq`, in time order, is the device
/// counting again from the start (a restart), so the period is split there into runs, and
/// each run's missing readings are the numbers between its lowest and highest `seq` that no
/// stored reading carries. Exact, since a rollup is recomputed from its readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seqs {
    /// The `seq` of the period's first and last numbered readings, in time order.
    pub first: i64,
    pub last: i64,
    /// Distinct `seq` stored, run by run (a number the device used again after a restart is
    /// another reading).
    pub distinct: u64,
    /// Numbers skipped inside the runs: readings sent and never stored, or never sent.
    pub missing: u64,
}

impl Seqs {
    /// The ledger of a period in which no reading has a `seq`.
    pub const UNNUMBERED: Seqs = Seqs {
        first: 0,
        last: 0,
        distinct: 0,
        missing: 0,
    };

    /// Whether any reading of the period has a `seq`.
    pub fn numbered(&self) -> bool {
        self.distinct > 0
    }

    /// The numbers skipped between the last of `before` (an earlier period) and the first of
    /// this one: none across a restart (a fall), or when either has no numbers.
    pub fn skipped_since(&self, before: &Seqs) -> u64 {
        if self.numbered() && before.numbered() && self.first > before.last {
            self.first.abs_diff(before.last) - 1
        } else {
            0
        }
    }

    /// The ledger of `seqs` in time order.
    fn of(seqs: &[i64]) -> Self {
        let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else {
            return Self::UNNUMBERED;
        };
        let (mut distinct, mut missing) = (0, 0);
        for run in seqs.chunk_by(|a, b| b >= a) {
            let mut run = run.to_vec();
            run.dedup();
            let span = run[run.len() - 1].abs_diff(run[0]) + 1;
            distinct += run.len() as u64;
            // Saturating: a hostile device may number 0 and 2^63-1 in one run, and again.
            missing = u64::saturating_add(missing, span - run.len() as u64);
        }
        Self {
            first,
            last,
            distinct,
            missing,
        }
    }

    /// The ledger of consecutive periods, in time order: each boundary where the count went on
    /// adds the numbers skipped across it; periods without numbers are passed over.
    fn combine<'s>(parts: impl IntoIterator<Item = &'s Seqs>) -> Self {
        let mut out: Option<Seqs> = None;
        for &p in parts.into_iter().filter(|p| p.numbered()) {
            out = Some(match out {
                None => p,
                // The count went on across the boundary (a fall is a restart): the numbers
                // between are missing, and a number on both sides is one reading.
                Some(o) => Seqs {
                    first: o.first,
                    last: p.last,
                    distinct: o
                        .distinct
                        .saturating_add(p.distinct)
                        .saturating_sub(u64::from(p.first == o.last)),
                    missing: o.missing.saturating_add(p.missing).saturating_add(
                        if p.first > o.last {
                            p.first.abs_diff(o.last) - 1
                        } else {
                            0
                        },
                    ),
                },
            });
        }
        out.unwrap_or(Self::UNNUMBERED)
    }
}

/// The measurements a rollup covers, by property name.
pub const MEASUREMENTS: [&str; 3] = ["Temperature", "Humidity", "Pressure"];

#[derive(Debug, Clone, PartialEq)]
pub struct Rollup {
    pub device_id: String,
    pub interval: Interval,
    pub start_ms: i64,
    /// Readings in the period.
    pub count: u64,
    pub first_at_ms: i64,
    pub last_at_ms: i64,
    /// Per measurement, in [`MEASUREMENTS`] order.
    pub stats: [Stats; 3],
    /// The completeness ledger ([`Seqs::UNNUMBERED`] when no reading of the period has a
    /// `seq`); `None` when it is not known: a row written before the ledger existed (until it
    /// is recomputed: `archiver rollups`), or the combination of parts that overlap in time
    /// (see [`Rollup::combine`]) or of which one is not known.
    pub seqs: Option<Seqs>,
}

impl Rollup {
    /// The rollup of one device's readings of one period, in time order; `None` for none.
    pub fn of<'r>(
        interval: Interval,
        start_ms: i64,
        readings: impl IntoIterator<Item = &'r Reading>,
    ) -> Option<Self> {
        let mut out: Option<Rollup> = None;
        let mut seqs = Vec::new();
        for r in readings {
            seqs.extend(r.seq);
            let rollup = out.get_or_insert_with(|| Rollup {
                device_id: r.device_id.clone(),
                interval,
                start_ms,
                count: 0,
                first_at_ms: r.measured_at_ms,
                last_at_ms: r.measured_at_ms,
                stats: [Stats::default(); 3],
                seqs: None,
            });
            rollup.count += 1;
            rollup.first_at_ms = rollup.first_at_ms.min(r.measured_at_ms);
            rollup.last_at_ms = rollup.last_at_ms.max(r.measured_at_ms);
            for (stats, v) in rollup
                .stats
                .iter_mut()
                .zip([r.temperature, r.humidity, r.pressure])
            {
                if let Some(v) = v {
                    stats.add(v);
                }
            }
        }
        if let Some(rollup) = out.as_mut() {
            rollup.seqs = Some(Seqs::of(&seqs));
        }
        out
    }

    /// Combines the rollups of the parts of a period: a day's hours, or one period's parts in
    /// several shards. The ledger combines only for parts that follow one another in time; of
    /// parts that overlap (one period's readings in two shards, both before and after a
    /// resharding), which numbers the others filled is not in their rollups, so the result
    /// has none.
    pub fn combine(interval: Interval, start_ms: i64, parts: &[Rollup]) -> Option<Self> {
        let first = parts.first()?;
        let mut out = Rollup {
            interval,
            start_ms,
            stats: [Stats::default(); 3],
            count: 0,
            ..first.clone()
        };
        let mut in_time: Vec<&Rollup> = parts.iter().collect();
        in_time.sort_by_key(|p| p.first_at_ms);
        let consecutive = in_time
            .windows(2)
            .all(|w| w[1].first_at_ms > w[0].last_at_ms);
        let ledgers: Option<Vec<Seqs>> = in_time.iter().map(|p| p.seqs).collect();
        out.seqs = ledgers.filter(|_| consecutive).map(|l| Seqs::combine(&l));
        for p in parts {
            out.count += p.count;
            out.first_at_ms = out.first_at_ms.min(p.first_at_ms);
            out.last_at_ms = out.last_at_ms.max(p.last_at_ms);
            for (s, o) in out.stats.iter_mut().zip(&p.stats) {
                s.merge(o);
            }
        }
        Some(out)
    }

    pub fn row_key(&self) -> String {
        self.interval.row_key(self.start_ms)
    }

    /// The table row, ready for an upsert.
    pub fn to_entity(&self) -> Map<String, Value> {
        let mut e = Map::with_capacity(32);
        e.insert("PartitionKey".into(), self.device_id.clone().into());
        e.insert("RowKey".into(), self.row_key().into());
        entity::typed_datetime(&mut e, "PeriodStart", self.start_ms);
        typed(&mut e, "Count", INT64, self.count.to_string().into());
        entity::typed_datetime(&mut e, "FirstAt", self.first_at_ms);
        entity::typed_datetime(&mut e, "LastAt", self.last_at_ms);
        for (name, s) in MEASUREMENTS.iter().zip(&self.stats) {
            if s.count == 0 {
                continue;
            }
            typed(
                &mut e,
                &format!("{name}Count"),
                INT64,
                s.count.to_string().into(),
            );
            for (part, v) in [("Min", s.min), ("Max", s.max), ("Sum", s.sum)] {
                typed(&mut e, &format!("{name}{part}"), entity::DOUBLE, v.into());
            }
        }
        if let Some(q) = &self.seqs {
            for (name, v) in [
                ("SeqFirst", q.first.to_string()),
                ("SeqLast", q.last.to_string()),
                ("SeqDistinct", q.distinct.to_string()),
                ("SeqMissing", q.missing.to_string()),
            ] {
                typed(&mut e, name, INT64, v.into());
            }
        }
        e
    }

    /// Reads a rollup row back.
    pub fn from_entity(e: &Map<String, Value>) -> Result<Self, RowError> {
        let text = |name: &str| {
            e.get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| RowError::new(format!("{name} is missing")))
        };
        let time = |name: &str| {
            text(name).and_then(|s| {
                timefmt::parse_rfc3339_ms(s).ok_or_else(|| RowError::new(format!("{name} {s:?}")))
            })
        };
        let count = |name: &str| {
            e.get(name)
                .and_then(integer_of)
                .and_then(|n| u64::try_from(n).ok())
        };
        let key = text("RowKey")?;
        let interval = key
            .split_once('|')
            .and_then(|(i, _)| Interval::parse(i))
            .ok_or_else(|| RowError::new(format!("RowKey {key:?} is not a rollup's")))?;
        let mut stats = [Stats::default(); 3];
        for (name, s) in MEASUREMENTS.iter().zip(stats.iter_mut()) {
            let Some(n) = count(&format!("{name}Count")).filter(|n| *n > 0) else {
                continue;
            };
            let part = |p: &str| {
                e.get(&format!("{name}{p}"))
                    .and_then(number_of)
                    .ok_or_else(|| RowError::new(format!("{name}{p} is missing")))
            };
            *s = Stats {
                count: n,
                min: part("Min")?,
                max: part("Max")?,
                sum: part("Sum")?,
            };
        }
        // A row written before the ledger existed has none: it is recomputed like any other.
        let seqs = match e.get("SeqFirst") {
            None => None,
            Some(_) => {
                let int = |name: &str| {
                    e.get(name)
                        .and_then(integer_of)
                        .ok_or_else(|| RowError::new(format!("{name} is missing")))
                };
                let count = |name: &str| {
                    int(name).and_then(|n| {
                        u64::try_from(n).map_err(|_| RowError::new(format!("{name} {n}")))
                    })
                };
                Some(Seqs {
                    first: int("SeqFirst")?,
                    last: int("SeqLast")?,
                    distinct: count("SeqDistinct")?,
                    missing: count("SeqMissing")?,
                })
            }
        };
        Ok(Rollup {
            device_id: text("PartitionKey")?.to_owned(),
            interval,
            start_ms: time("PeriodStart")?,
            count: count("Count").ok_or_else(|| RowError::new("Count is missing"))?,
            first_at_ms: time("FirstAt")?,
            last_at_ms: time("LastAt")?,
            stats,
            seqs,
        })
    }
}

/// The hourly rollups of one device's readings in time order, one per hour that has any.
pub fn hourly(readings: &[Reading]) -> Vec<Rollup> {
    readings
        .chunk_by(|a, b| {
            Interval::Hour.floor(a.measured_at_ms) == Interval::Hour.floor(b.measured_at_ms)
        })
        .filter_map(|hour| {
            let start = Interval::Hour.floor(hour[0].measured_at_ms);
            Rollup::of(Interval::Hour, start, hour)
        })
        .collect()
}

/// The partition of the fleet's completeness ledger, for the dashboard's "completeness over
/// the last day": RowKey `1h|<hour start>`, the sums of every device's hourly [`Seqs`] of that
/// hour (written by the rollup keeper's sweep of the hour, and written again whenever late
/// readings change a device's hour), and RowKey `stale|<hour start>` for an hour whose sums
/// late readings made stale, until they are summed again.
pub const LEDGER: &str = "~ledger";
/// How far back the fleet ledger is kept current (the dashboard shows a day), and kept.
pub const LEDGER_KEPT_MS: i64 = 25 * HOUR_MS;
const LEDGER_DEVICES: &str = "Devices";
const LEDGER_DISTINCT: &str = "Distinct";
const LEDGER_MISSING: &str = "Missing";
const STALE: &str = "stale|";

/// The fleet's ledger of one hour: devices that numbered readings, and their sums.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetHour {
    pub devices: u64,
    pub distinct: u64,
    pub missing: u64,
}

impl FleetHour {
    /// Adds one device's hour (nothing, if it has no numbered reading).
    pub fn add(&mut self, seqs: &Seqs) {
        if !seqs.numbered() {
            return;
        }
        self.devices += 1;
        self.distinct = self.distinct.saturating_add(seqs.distinct);
        self.missing = self.missing.saturating_add(seqs.missing);
    }

    /// Adds another hour's sums (a day of hours, or another shard).
    pub fn merge(&mut self, other: &FleetHour) {
        self.devices += other.devices;
        self.distinct = self.distinct.saturating_add(other.distinct);
        self.missing = self.missing.saturating_add(other.missing);
    }

    /// The row of the hour starting at `hour_ms`, ready for an upsert.
    pub fn to_entity(&self, hour_ms: i64) -> Map<String, Value> {
        let mut e = Map::new();
        e.insert("PartitionKey".into(), LEDGER.into());
        e.insert("RowKey".into(), Interval::Hour.row_key(hour_ms).into());
        for (name, v) in [
            (LEDGER_DEVICES, self.devices),
            (LEDGER_DISTINCT, self.distinct),
            (LEDGER_MISSING, self.missing),
        ] {
            typed(&mut e, name, INT64, v.to_string().into());
        }
        e
    }

    /// An hour's row read back: its start and sums; `None` for a stale flag or another row.
    pub fn from_entity(e: &Map<String, Value>) -> Option<(i64, Self)> {
        let key = e.get("RowKey")?.as_str()?;
        let hour = timefmt::parse_rfc3339_ms(key.strip_prefix("1h|")?)?;
        let count = |name: &str| {
            e.get(name)
                .and_then(integer_of)
                .and_then(|n| u64::try_from(n).ok())
        };
        Some((
            hour,
            Self {
                devices: count(LEDGER_DEVICES)?,
                distinct: count(LEDGER_DISTINCT)?,
                missing: count(LEDGER_MISSING)?,
            },
        ))
    }
}

/// The flag that the fleet ledger of the hour starting at `hour_ms` must be summed again.
pub fn ledger_stale(hour_ms: i64) -> Map<String, Value> {
    let mut e = Map::new();
    e.insert("PartitionKey".into(), LEDGER.into());
    e.insert(
        "RowKey".into(),
        format!("{STALE}{}", format_ms(hour_ms)).into(),
    );
    e
}

/// A stale flag's hour.
pub fn parse_ledger_stale(row_key: &str) -> Option<i64> {
    timefmt::parse_rfc3339_ms(row_key.strip_prefix(STALE)?)
}

/// The RowKey range of the stale flags, for a filter: `[from, to)`.
pub fn ledger_stale_range() -> (String, String) {
    (STALE.to_owned(), "stale}".to_owned())
}

/// A refused reading's number, in its device's partition of the rollup table (RowKey
/// `refused|<seq, 19 digits>`, after the device's rollups), so that a number missing from
/// its readings can be shown as refused, with the reason, rather than as missing. Written by
/// the processor as it dead-letters the reading; the rollup keeper deletes it after the
/// rollup retention.
pub const REFUSED: &str = "refused|";
const REFUSED_REASON: &str = "Reason";
pub const REFUSED_AT: &str = "RefusedAt";

/// The row recording that `device`'s reading `seq` was refused for `reason` at `at_ms`.
pub fn refusal(device: &str, seq: i64, reason: &str, at_ms: i64) -> Map<String, Value> {
    let mut e = Map::new();
    e.insert("PartitionKey".into(), device.into());
    e.insert("RowKey".into(), format!("{REFUSED}{seq:019}").into());
    e.insert(REFUSED_REASON.into(), reason.into());
    entity::typed_datetime(&mut e, REFUSED_AT, at_ms);
    e
}

/// The RowKey range, both ends included, of the refusals of numbers `first` to `last`.
pub fn refusal_keys(first: i64, last: i64) -> (String, String) {
    (
        format!("{REFUSED}{:019}", first.max(0)),
        format!("{REFUSED}{:019}", last.max(0)),
    )
}

/// A refused number, its reason, and when it was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub seq: i64,
    pub reason: String,
    pub at_ms: i64,
}

/// A refusal row read back.
pub fn parse_refusal(e: &Map<String, Value>) -> Option<Refused> {
    Some(Refused {
        seq: e
            .get("RowKey")?
            .as_str()?
            .strip_prefix(REFUSED)?
            .parse()
            .ok()?,
        reason: e.get(REFUSED_REASON)?.as_str()?.to_owned(),
        at_ms: timefmt::parse_rfc3339_ms(e.get(REFUSED_AT)?.as_str()?)?,
    })
}

/// The partition of stored-reading counts, for the dashboard's "readings in the last hour":
/// RowKey `<minute start>|<processor instance>`, property `Readings`, what that processor
/// stored in that minute (it counts writes, so a redone message counts again). Each processor
/// replaces its own rows; the rollup keeper deletes them after [`STORED_KEPT_MS`].
pub const STORED: &str = "~stored";
pub const STORED_KEPT_MS: i64 = 2 * HOUR_MS;
const READINGS: &str = "Readings";

/// The counts' period.
pub const MINUTE_MS: i64 = 60_000;

/// The start of the minute holding `ms`: the minute a reading stored then is counted in.
pub fn stored_minute(ms: i64) -> i64 {
    ms - ms.rem_euclid(MINUTE_MS)
}

/// The RowKey prefix of the minute starting at `minute_ms`, for range filters.
pub fn stored_key(minute_ms: i64) -> String {
    format_ms(minute_ms)
}

/// The row counting `readings` stored by `instance` in the minute starting at `minute_ms`.
pub fn stored_count(minute_ms: i64, instance: &str, readings: u64) -> Map<String, Value> {
    let mut e = Map::new();
    e.insert("PartitionKey".into(), STORED.into());
    e.insert(
        "RowKey".into(),
        format!("{}|{instance}", stored_key(minute_ms)).into(),
    );
    typed(&mut e, READINGS, INT64, readings.to_string().into());
    e
}

/// The count a [`stored_count`] row holds (0 if unreadable).
pub fn stored_readings(e: &Map<String, Value>) -> u64 {
    e.get(READINGS)
        .and_then(integer_of)
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(0)
}

/// A mark: `device`'s readings of the hour starting at `hour_ms` changed after the hour ended.
pub fn mark(device: &str, hour_ms: i64) -> Map<String, Value> {
    let mut h = crate::Fnv::default();
    h.write(device.as_bytes());
    let mut e = Map::new();
    e.insert(
        "PartitionKey".into(),
        format!("{MARKS}{:x}", h.0 % 16).into(),
    );
    e.insert(
        "RowKey".into(),
        format!("{}|{device}", format_ms(hour_ms)).into(),
    );
    e
}

/// A mark's device and hour.
pub fn parse_mark(row_key: &str) -> Option<(String, i64)> {
    let (hour, device) = row_key.split_once('|')?;
    Some((device.to_owned(), timefmt::parse_rfc3339_ms(hour)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_count_reads_back_and_sorts_by_minute() {
        let e = stored_count(1_700_000_040_000, "ab12-7f", 1234);
        assert_eq!(e["PartitionKey"], STORED);
        assert_eq!(e["RowKey"], "2023-11-14T22:14:00.000Z|ab12-7f");
        assert!(e["RowKey"].as_str().unwrap() >= stored_key(1_700_000_040_000).as_str());
        assert!(e["RowKey"].as_str().unwrap() < stored_key(1_700_000_100_000).as_str());
        assert_eq!(stored_readings(&e), 1234);
        assert_eq!(stored_readings(&Map::new()), 0);
    }

    fn reading(at: i64, t: Option<f64>, h: Option<f64>) -> Reading {
        Reading {
            device_id: "d".into(),
            measured_at_ms: at,
            seq: None,
            temperature: t,
            humidity: h,
            pressure: None,
            extras: Vec::new(),
        }
    }

    const H0: i64 = 1_764_064_800_000; // 2025-11-25T10:00:00Z

    #[test]
    fn an_hour_rolls_up_each_measurement_and_its_times() {
        let readings = [
            reading(H0 + 1_000, Some(20.0), None),
            reading(H0 + 2_000, Some(22.0), Some(40.0)),
            reading(H0 + 3_000, None, Some(50.0)),
        ];
        let r = Rollup::of(Interval::Hour, H0, &readings).unwrap();
        assert_eq!(
            (r.count, r.first_at_ms, r.last_at_ms),
            (3, H0 + 1_000, H0 + 3_000)
        );
        assert_eq!(
            r.stats[0],
            Stats {
                count: 2,
                min: 20.0,
                max: 22.0,
                sum: 42.0
            }
        );
        assert_eq!(r.stats[1].mean(), Some(45.0));
        assert_eq!(r.stats[2].count, 0);
        assert_eq!(r.stats[2].mean(), None);
        assert!(Rollup::of(Interval::Hour, H0, &[]).is_none());
    }

    #[test]
    fn days_combine_their_hours_exactly() {
        let readings: Vec<Reading> = (0..48)
            .map(|i| reading(H0 + i * 1_800_000, Some(i as f64), None))
            .collect();
        let hours = hourly(&readings);
        assert_eq!(hours.len(), 24);
        assert!(hours.iter().all(|h| h.count == 2));
        let day = Interval::Day.floor(H0);
        let combined = Rollup::combine(Interval::Day, day, &hours).unwrap();
        let direct = Rollup::of(Interval::Day, day, &readings).unwrap();
        assert_eq!(combined, direct);
    }

    fn numbered(at: i64, seq: i64) -> Reading {
        Reading {
            seq: Some(seq),
            ..reading(at, Some(20.0), None)
        }
    }

    /// Readings one a minute from `H0`, numbered `seqs`, plus one without a number.
    fn numbered_hour(seqs: &[i64]) -> Vec<Reading> {
        let mut readings: Vec<Reading> = (0..)
            .zip(seqs)
            .map(|(i, &seq)| numbered(H0 + i * 60_000, seq))
            .collect();
        readings.push(reading(H0 + 3_599_000, Some(1.0), None));
        readings
    }

    #[test]
    fn an_hour_keeps_the_ledger_of_its_numbered_readings() {
        let ledger = |seqs: &[i64]| {
            Rollup::of(Interval::Hour, H0, &numbered_hour(seqs))
                .unwrap()
                .seqs
        };
        // 12, 14 and 15 skipped; 13 twice (a duplicate with another time) is one reading.
        assert_eq!(
            ledger(&[10, 11, 13, 13, 16]),
            Some(Seqs {
                first: 10,
                last: 16,
                distinct: 4,
                missing: 3
            })
        );
        // A fall is a restart: 100-101, then 0-3 with 2 skipped; 0 and 1 again are readings.
        assert_eq!(
            ledger(&[100, 101, 0, 1, 3]),
            Some(Seqs {
                first: 100,
                last: 3,
                distinct: 5,
                missing: 1
            })
        );
        assert_eq!(
            ledger(&[7]),
            Some(Seqs {
                first: 7,
                last: 7,
                distinct: 1,
                missing: 0
            })
        );
        assert_eq!(
            ledger(&[]),
            Some(Seqs::UNNUMBERED),
            "no numbered reading, an empty ledger"
        );
        let (a, b) = (ledger(&[1, 2]).unwrap(), ledger(&[5, 6]).unwrap());
        assert_eq!(b.skipped_since(&a), 2, "3 and 4, across the boundary");
        assert_eq!(a.skipped_since(&b), 0, "a fall is a restart");
        assert_eq!(b.skipped_since(&Seqs::UNNUMBERED), 0);
        let top = i64::MAX;
        assert_eq!(
            ledger(&[0, top, 0, top, 0, top]).map(|q| q.missing),
            Some(u64::MAX),
            "hostile numbers saturate, they do not wrap"
        );
    }

    #[test]
    fn a_days_ledger_combines_its_hours_exactly() {
        // Every 20 minutes for a day, numbered on, with numbers skipped inside hours and
        // across their boundaries, a number repeated across a boundary, a restart at a
        // boundary and one inside an hour, and an hour without numbers.
        let mut seq = 0;
        let readings: Vec<Reading> = (0..72)
            .map(|i| {
                seq = match i {
                    5 | 9 => seq + 3,
                    12 => seq,
                    30 => 0,
                    40 => 2,
                    _ => seq + 1,
                };
                let r = reading(H0 + i * 1_200_000, Some(i as f64), None);
                if (45..48).contains(&i) {
                    r
                } else {
                    Reading {
                        seq: Some(seq),
                        ..r
                    }
                }
            })
            .collect();
        let hours = hourly(&readings);
        assert_eq!(hours.len(), 24);
        let day = Interval::Day.floor(H0);
        let combined = Rollup::combine(Interval::Day, day, &hours).unwrap();
        let direct = Rollup::of(Interval::Day, day, &readings).unwrap();
        assert_eq!(combined, direct);
        assert!(direct.seqs.unwrap().missing > 0);
    }

    #[test]
    fn parts_that_overlap_in_time_have_no_combined_ledger() {
        let a = Rollup::of(Interval::Hour, H0, &[numbered(H0, 1), numbered(H0 + 20, 3)]);
        let b = Rollup::of(Interval::Hour, H0, &[numbered(H0 + 10, 2)]);
        let both = Rollup::combine(Interval::Hour, H0, &[a.unwrap(), b.unwrap()]).unwrap();
        assert_eq!((both.count, both.seqs), (3, None));
        // Parts that follow one another combine, in whatever order they come; one part not
        // known makes the whole not known.
        let early = Rollup::of(Interval::Hour, H0, &[numbered(H0, 1)]).unwrap();
        let late = Rollup::of(Interval::Hour, H0, &[numbered(H0 + 20, 3)]).unwrap();
        let both = Rollup::combine(Interval::Hour, H0, &[late.clone(), early.clone()]).unwrap();
        assert_eq!(
            both.seqs.map(|q| (q.first, q.last, q.missing)),
            Some((1, 3, 1))
        );
        let unknown = Rollup { seqs: None, ..late };
        let both = Rollup::combine(Interval::Hour, H0, &[early, unknown]).unwrap();
        assert_eq!(both.seqs, None);
    }

    #[test]
    fn rows_round_trip_and_sort_by_time() {
        let readings = [reading(H0 + 5, Some(-3.5), Some(99.25))];
        let r = Rollup::of(Interval::Hour, H0, &readings).unwrap();
        let e = r.to_entity();
        assert_eq!(e["RowKey"], "1h|2025-11-25T10:00:00.000Z");
        assert_eq!(e["Count@odata.type"], "Edm.Int64");
        assert!(!e.contains_key("PressureCount"));
        assert_eq!(Rollup::from_entity(&e).unwrap(), r);
        assert_eq!(
            e["SeqDistinct"], "0",
            "no numbered reading, an empty ledger"
        );
        // A row from before the ledger: not known, and not taken for complete.
        let mut before: Map<String, Value> = e.clone();
        before.retain(|k, _| !k.starts_with("Seq"));
        assert_eq!(Rollup::from_entity(&before).unwrap().seqs, None);
        let r = Rollup::of(Interval::Hour, H0, &numbered_hour(&[4, 6])).unwrap();
        let e = r.to_entity();
        assert_eq!(e["SeqMissing@odata.type"], "Edm.Int64");
        assert_eq!(Rollup::from_entity(&e).unwrap(), r);
        let mut partial = e.clone();
        partial.remove("SeqMissing");
        assert!(Rollup::from_entity(&partial).is_err());
        assert!(Interval::Hour.row_key(H0) < Interval::Hour.row_key(H0 + HOUR_MS));
        assert_eq!(
            Interval::Day.row_key(Interval::Day.floor(H0)),
            "1d|2025-11-25T00:00:00.000Z"
        );
    }

    #[test]
    fn the_fleet_ledger_sums_hours_and_reads_back() {
        let mut fleet = FleetHour::default();
        for seqs in [[1, 2, 4].as_slice(), &[7, 8]] {
            let hour = Rollup::of(Interval::Hour, H0, &numbered_hour(seqs)).unwrap();
            fleet.add(&hour.seqs.unwrap());
        }
        assert_eq!(
            fleet,
            FleetHour {
                devices: 2,
                distinct: 5,
                missing: 1
            }
        );
        let e = fleet.to_entity(H0);
        assert_eq!(e["PartitionKey"], LEDGER);
        assert_eq!(FleetHour::from_entity(&e), Some((H0, fleet)));
        let stale = ledger_stale(H0);
        assert_eq!(FleetHour::from_entity(&stale), None);
        let key = stale["RowKey"].as_str().unwrap();
        assert_eq!(parse_ledger_stale(key), Some(H0));
        let (lo, hi) = ledger_stale_range();
        assert!(lo.as_str() <= key && key < hi.as_str());
        assert!(
            e["RowKey"].as_str().unwrap() < lo.as_str(),
            "hours sort before the flags"
        );
    }

    #[test]
    fn refusals_sort_by_number_after_the_rollups() {
        let e = refusal("sensor-1", 42, "out_of_range", H0);
        assert_eq!(
            parse_refusal(&e),
            Some(Refused {
                seq: 42,
                reason: "out_of_range".to_owned(),
                at_ms: H0
            })
        );
        let key = e["RowKey"].as_str().unwrap();
        let (lo, hi) = refusal_keys(40, 42);
        assert!(lo.as_str() <= key && key <= hi.as_str());
        assert!(
            refusal_keys(9, 9).0 < refusal_keys(10, 10).0,
            "numeric order"
        );
        assert!(
            Interval::Day.row_key(H0).as_str() < key,
            "after the rollups"
        );
        assert_eq!(
            parse_refusal(
                &Rollup::of(Interval::Hour, H0, &numbered_hour(&[1]))
                    .unwrap()
                    .to_entity()
            ),
            None
        );
    }

    #[test]
    fn marks_name_a_device_hour() {
        let m = mark("sensor-1", H0);
        assert!(m["PartitionKey"].as_str().unwrap().starts_with(MARKS));
        assert_eq!(
            m["PartitionKey"],
            mark("sensor-1", H0 + HOUR_MS)["PartitionKey"]
        );
        let key = m["RowKey"].as_str().unwrap();
        assert_eq!(parse_mark(key), Some(("sensor-1".into(), H0)));
        assert_eq!(parse_mark("nonsense"), None);
    }
}
