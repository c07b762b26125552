//! The completeness ledger read back: which `seq` numbers a device skipped, found from its
//! hourly rollups' ledgers where an hour is complete, and from its readings only where an hour
//! has a gap or no ledger yet (the hour has not settled, or its readings straddle a
//! resharding). Pure: the API reads, this decides.
//!
//! A device counts its readings up; a fall in `seq`, in time order, is the device counting
//! again from a restart, not a gap (as [`schemas::rollup::Seqs`] takes it).

use schemas::rollup::Rollup;

/// One UTC hour of a device, as far as its numbering goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Hour {
    /// Its ledger says nothing is missing inside it: only where its numbering starts and
    /// ends matters, and when.
    Complete { first: (i64, i64), last: (i64, i64) },
    /// Its numbered readings, `(seq, measured at)` in time order.
    Read(Vec<(i64, i64)>),
}

impl Hour {
    /// The hour `rollup` describes, if its ledger makes reading it unnecessary: none missing
    /// inside. A rollup with no ledger (no numbered reading, or parts in two shards) or with
    /// numbers missing must be read.
    pub fn complete(rollup: &Rollup) -> Option<Self> {
        let q = rollup.seqs.filter(|q| q.missing == 0)?;
        Some(Hour::Complete {
            first: (q.first, rollup.first_at_ms),
            last: (q.last, rollup.last_at_ms),
        })
    }
}

/// Numbers skipped between two readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub first: i64,
    pub last: i64,
    /// When the readings on either side were measured.
    pub after_ms: i64,
    pub before_ms: i64,
}

impl Gap {
    pub fn count(&self) -> u64 {
        self.last.abs_diff(self.first) + 1
    }
}

/// The gaps in a device's consecutive hours, in time order.
pub fn find(hours: impl IntoIterator<Item = Hour>) -> Vec<Gap> {
    let mut gaps = Vec::new();
    let mut prev: Option<(i64, i64)> = None;
    let mut step = |next: (i64, i64), prev: &mut Option<(i64, i64)>| {
        if let Some((seq, at)) = *prev {
            if next.0 > seq.saturating_add(1) {
                gaps.push(Gap {
                    first: seq + 1,
                    last: next.0 - 1,
                    after_ms: at,
                    before_ms: next.1,
                });
            }
        }
        *prev = Some(next);
    };
    for hour in hours {
        match hour {
            Hour::Complete { first, last } => {
                step(first, &mut prev);
                prev = Some(last);
            }
            Hour::Read(points) => {
                for p in points {
                    step(p, &mut prev);
                }
            }
        }
    }
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::rollup::{Interval, HOUR_MS};
    use schemas::Reading;

    const H0: i64 = 1_764_064_800_000;

    fn numbered(seqs: &[i64], from: i64) -> Vec<Reading> {
        (0..)
            .zip(seqs)
            .map(|(i, &seq)| Reading {
                device_id: "d".into(),
                measured_at_ms: from + i * 60_000,
                seq: Some(seq),
                temperature: Some(20.0),
                humidity: None,
                pressure: None,
                extras: Vec::new(),
            })
            .collect()
    }

    fn read(readings: &[Reading]) -> Hour {
        Hour::Read(
            readings
                .iter()
                .filter_map(|r| Some((r.seq?, r.measured_at_ms)))
                .collect(),
        )
    }

    #[test]
    fn gaps_inside_and_between_hours_with_the_readings_around_them() {
        let a = numbered(&[1, 2, 3], H0);
        let b = numbered(&[6, 7, 9, 10], H0 + HOUR_MS);
        let gaps = find([read(&a), read(&b)]);
        assert_eq!(
            gaps,
            [
                Gap {
                    first: 4,
                    last: 5,
                    after_ms: H0 + 120_000,
                    before_ms: H0 + HOUR_MS
                },
                Gap {
                    first: 8,
                    last: 8,
                    after_ms: H0 + HOUR_MS + 60_000,
                    before_ms: H0 + HOUR_MS + 120_000
                },
            ]
        );
        assert_eq!(gaps.iter().map(Gap::count).sum::<u64>(), 3);
    }

    #[test]
    fn a_complete_hour_needs_no_readings_and_gives_the_same_gaps() {
        let a = numbered(&[1, 2, 3], H0);
        let b = numbered(&[6, 7, 9, 10], H0 + HOUR_MS);
        let rollup = Rollup::of(Interval::Hour, H0, &a).unwrap();
        let complete = Hour::complete(&rollup).expect("nothing missing in the first hour");
        assert_eq!(find([complete, read(&b)]), find([read(&a), read(&b)]));
        let gappy = Rollup::of(Interval::Hour, H0 + HOUR_MS, &b).unwrap();
        assert_eq!(Hour::complete(&gappy), None, "an hour with a gap is read");
    }

    #[test]
    fn restarts_and_repeats_are_not_gaps() {
        let readings = numbered(&[40, 41, 41, 0, 1, 2], H0);
        assert_eq!(find([read(&readings)]), []);
        // Inside a complete hour, a restart is not compared with its neighbours.
        let hour = Rollup::of(Interval::Hour, H0, &numbered(&[50, 51, 0, 1], H0)).unwrap();
        let next = numbered(&[2, 4], H0 + HOUR_MS);
        let gaps = find([Hour::complete(&hour).unwrap(), read(&next)]);
        assert_eq!(
            gaps.iter().map(|g| (g.first, g.last)).collect::<Vec<_>>(),
            [(3, 3)]
        );
    }
}
