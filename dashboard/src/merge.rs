//! Answers put together from several shards (storage accounts): pure, so that one shard is
//! exactly the answer of that shard alone.

use crate::readings::Page;
use schemas::device::Device;
use schemas::entity::StoredReading;
use schemas::rollup::{Interval, Rollup};
use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

/// The first `limit` devices of the shards' pages (each the first `limit` of its shard, in
/// id order), in id order, each with the shard its row comes from. Complete up to its last
/// id: a shard with a full page alone holds `limit` ids up to its own last one. A device
/// found in two shards (moved by a resharding) is shown once, as the shard it writes to now
/// (`current`) has it, or else as the one that heard from it last, first seen at the earliest.
pub fn devices(
    pages: Vec<(usize, Vec<Device>)>,
    current: impl Fn(&str) -> usize,
    limit: usize,
) -> Vec<(usize, Device)> {
    let mut by_id: BTreeMap<String, (usize, Device)> = BTreeMap::new();
    for (shard, device) in pages
        .into_iter()
        .flat_map(|(shard, page)| page.into_iter().map(move |d| (shard, d)))
    {
        match by_id.entry(device.latest.device_id.clone()) {
            Entry::Vacant(slot) => {
                slot.insert((shard, device));
            }
            Entry::Occupied(mut slot) => {
                let (held_shard, held) = slot.get_mut();
                let first_seen = match (held.first_seen_ms, device.first_seen_ms) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let home = current(&device.latest.device_id);
                let wins = *held_shard != home
                    && (shard == home || device.last_seen_ms > held.last_seen_ms);
                if wins {
                    *held_shard = shard;
                    *held = device;
                }
                held.first_seen_ms = first_seen;
            }
        }
    }
    by_id.into_values().take(limit).collect()
}

/// One page of a device's readings from its shards' pages, the first shard (where it writes
/// now) winning a millisecond both hold. A shard's page that stopped early (its `next_from`)
/// says nothing past that point, so the page ends there, at most `limit` readings.
pub fn pages(pages: Vec<Page>, limit: usize) -> Page {
    let cutoff = pages.iter().filter_map(|p| p.next_from).min();
    let mut by_time: BTreeMap<i64, StoredReading> = BTreeMap::new();
    for reading in pages.into_iter().flat_map(|p| p.readings) {
        if cutoff.is_none_or(|c| reading.reading.measured_at_ms < c) {
            by_time
                .entry(reading.reading.measured_at_ms)
                .or_insert(reading);
        }
    }
    let mut readings: Vec<StoredReading> = by_time.into_values().collect();
    let mut next_from = cutoff;
    if readings.len() > limit {
        readings.truncate(limit);
        next_from = readings.last().map(|r| r.reading.measured_at_ms + 1);
    }
    Page {
        readings,
        next_from,
    }
}

/// A device's rollups from its shards, in time order: a period rolled up in two shards (it
/// straddles a resharding, so each holds part of its readings) is their combination.
pub fn rollups(interval: Interval, lists: Vec<Vec<Rollup>>) -> Vec<Rollup> {
    let mut by_start: BTreeMap<i64, Vec<Rollup>> = BTreeMap::new();
    for rollup in lists.into_iter().flatten() {
        by_start.entry(rollup.start_ms).or_default().push(rollup);
    }
    by_start
        .into_iter()
        .filter_map(|(start, parts)| match parts.len() {
            1 => parts.into_iter().next(),
            _ => Rollup::combine(interval, start, &parts),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::Reading;

    fn reading(at: i64, temperature: f64) -> StoredReading {
        StoredReading {
            reading: Reading {
                device_id: "d".into(),
                measured_at_ms: at,
                seq: None,
                temperature: Some(temperature),
                humidity: None,
                pressure: None,
                extras: Vec::new(),
            },
            ingested_at_ms: at,
        }
    }

    fn device(id: &str, last_seen_ms: i64) -> Device {
        Device {
            latest: Reading {
                device_id: id.into(),
                ..reading(0, 0.0).reading
            },
            last_seen_ms,
            first_seen_ms: None,
        }
    }

    fn page(times: &[i64], next_from: Option<i64>) -> Page {
        Page {
            readings: times.iter().map(|&t| reading(t, t as f64)).collect(),
            next_from,
        }
    }

    fn times(p: &Page) -> Vec<i64> {
        p.readings
            .iter()
            .map(|r| r.reading.measured_at_ms)
            .collect()
    }

    #[test]
    fn one_shard_is_its_own_answer() {
        let p = pages(vec![page(&[1, 2, 3], Some(4))], 3);
        assert_eq!((times(&p), p.next_from), (vec![1, 2, 3], Some(4)));
        let d = devices(vec![(0, vec![device("a", 1), device("b", 1)])], |_| 0, 2);
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn readings_interleave_and_stop_where_a_shard_stopped() {
        // Shard 0 stopped its page at 5; shard 1 went on to 9: nothing from 5 on is known
        // complete, so the page ends there.
        let p = pages(vec![page(&[1, 4], Some(5)), page(&[2, 3, 7, 9], None)], 10);
        assert_eq!((times(&p), p.next_from), (vec![1, 2, 3, 4], Some(5)));
        let p = pages(vec![page(&[1, 4], None), page(&[2, 3, 7], None)], 3);
        assert_eq!((times(&p), p.next_from), (vec![1, 2, 3], Some(4)));
        // The shard written now wins a millisecond both hold.
        let mut current = page(&[2], None);
        current.readings[0].reading.temperature = Some(99.0);
        let p = pages(vec![current, page(&[2], None)], 10);
        assert_eq!(p.readings[0].reading.temperature, Some(99.0));
    }

    #[test]
    fn devices_merge_in_id_order_once_each() {
        let mut older = device("a", 5);
        older.first_seen_ms = Some(1);
        let mut moved = device("a", 3);
        moved.first_seen_ms = Some(4);
        let d = devices(
            vec![
                (0, vec![older, device("c", 1)]),
                (1, vec![moved, device("b", 1), device("d", 1)]),
            ],
            |id| usize::from(id == "a"),
            3,
        );
        let ids: Vec<&str> = d.iter().map(|(_, d)| d.latest.device_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        let (shard, a) = &d[0];
        assert_eq!(
            (*shard, a.last_seen_ms, a.first_seen_ms),
            (1, 3, Some(1)),
            "the shard it writes to now, first seen at the earliest"
        );
        let d = devices(
            vec![(0, vec![device("x", 5)]), (1, vec![device("x", 9)])],
            |_| 2,
            10,
        );
        assert_eq!(
            d[0].1.last_seen_ms, 9,
            "else the shard that heard from it last"
        );
    }

    #[test]
    fn a_period_in_two_shards_is_combined() {
        let hour = |start: i64, values: &[f64]| {
            let readings: Vec<Reading> = values
                .iter()
                .enumerate()
                .map(|(i, v)| reading(start + i as i64, *v).reading)
                .collect();
            Rollup::of(Interval::Hour, start, &readings).expect("readings")
        };
        const H: i64 = 3_600_000;
        let merged = rollups(
            Interval::Hour,
            vec![
                vec![hour(0, &[1.0, 3.0]), hour(H, &[5.0])],
                vec![hour(0, &[8.0])],
            ],
        );
        assert_eq!(merged.len(), 2);
        assert_eq!((merged[0].count, merged[1].count), (3, 1));
        assert_eq!(merged[0].start_ms, 0);
    }
}
