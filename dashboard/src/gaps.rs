//! The completeness ledger read back: which `seq` numbers a device skipped, found from its
//! hourly rollups' ledgers where an hour is complete, and from its readings only where an hour
//! has a gap or no known ledger (not rolled up yet, rolled up before the ledger existed, or
//! held by two shards across a resharding). Pure: the API reads, this decides.
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
    /// The hour `rollup` describes, if its ledger makes reading it unnecessary: numbered,
    /// none missing inside. Its first and last numbers are placed at the hour's first and last
    /// reading times (a reading without a number may be the one at either end).
    pub fn complete(rollup: &Rollup) -> Option<Self> {
        let q = rollup.seqs.filter(|q| q.numbered() && q.missing == 0)?;
        Some(Hour::Complete {
            first: (q.first, rollup.first_at_ms),
            last: (q.last, rollup.last_at_ms),
        })
    }
}

/// What finding an hour's gaps takes.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Its ledger: complete.
    Ledger(Hour),
    /// Its readings.
    Read,
    /// Nothing: its ledger says no reading of it has a number.
    Skip,
}

/// The step for an hour of which `parts` are the rollups found, when `holders` shards may
/// hold readings of it. Only one shard's ledger, when only one shard may hold the hour, is
/// trusted; an hour not rolled up yet (or at all: a quiet device), rolled up before the ledger
/// existed, or with numbers missing, is read.
pub fn step(parts: &[Rollup], holders: usize) -> Step {
    match parts {
        [one] if holders == 1 => match one.seqs {
            Some(q) if !q.numbered() => Step::Skip,
            Some(_) => Hour::complete(one).map_or(Step::Read, Step::Ledger),
            None => Step::Read,
        },
        _ => Step::Read,
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
    fn only_a_known_complete_ledger_of_one_shard_saves_the_read() {
        let complete = Rollup::of(Interval::Hour, H0, &numbered(&[1, 2], H0)).unwrap();
        assert!(matches!(
            step(std::slice::from_ref(&complete), 1),
            Step::Ledger(_)
        ));
        assert_eq!(
            step(std::slice::from_ref(&complete), 2),
            Step::Read,
            "another shard may hold some"
        );
        assert_eq!(step(&[complete.clone(), complete.clone()], 2), Step::Read);
        assert_eq!(step(&[], 1), Step::Read, "not rolled up yet");
        let before = Rollup {
            seqs: None,
            ..complete.clone()
        };
        assert_eq!(
            step(&[before], 1),
            Step::Read,
            "rolled up before the ledger"
        );
        let gappy = Rollup::of(Interval::Hour, H0, &numbered(&[1, 3], H0)).unwrap();
        assert_eq!(step(&[gappy], 1), Step::Read);
        let unnumbered = Rollup::of(
            Interval::Hour,
            H0,
            &[Reading {
                seq: None,
                ..numbered(&[1], H0).remove(0)
            }],
        )
        .unwrap();
        assert_eq!(step(&[unnumbered], 1), Step::Skip);
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
