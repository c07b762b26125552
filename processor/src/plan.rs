//! Turns the readings of one round into table writes: grouped by partition, deduplicated by
//! key, and chunked within Azure's transaction limits. Pure, so its invariants are unit-tested.

use infra::storage::{Row, MAX_BATCH_BYTES, MAX_BATCH_OPERATIONS};
use schemas::reading::Reading;
use std::cmp::Ordering;

/// Multipart framing and headers around each operation in a transaction (the sub-request
/// line with the account's URL, and its headers).
const PER_OPERATION_OVERHEAD: usize = 512;

/// A valid reading on its way to the table. It is encoded only when its write is sent: a
/// round holds thousands, and a reading is a third of the size of its row.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub reading: Reading,
    pub ingested_at_ms: i64,
    /// From a message replayed as a backfill (`deadletter replay --allow-stale`): history,
    /// which begins no alarm.
    pub backfill: bool,
}

impl Pending {
    /// Its table row (no JSON map on the way to the wire), encoded in `scratch` and kept at
    /// its exact size.
    pub fn row(&self, scratch: &mut Vec<u8>) -> Row {
        scratch.clear();
        schemas::entity::encode(&self.reading, self.ingested_at_ms, scratch);
        Row {
            partition_key: self.reading.device_id.clone(),
            row_key: schemas::entity::row_key(&self.reading),
            json: bytes::Bytes::copy_from_slice(scratch),
        }
    }

    /// The RowKey it is written under.
    pub fn row_key(&self) -> String {
        schemas::entity::row_key(&self.reading)
    }

    fn key(&self) -> (&str, i64) {
        (&self.reading.device_id, self.reading.measured_at_ms)
    }
}

/// One table write: a single upsert or a same-partition transaction.
#[derive(Debug)]
pub struct Batch<O> {
    pub rows: Vec<Pending>,
    /// Where each entity came from (several sources when readings shared a key).
    pub origins: Vec<Vec<O>>,
    /// How large its request body can be, at most.
    pub bytes: usize,
}

impl<O: Copy> Batch<O> {
    fn new() -> Self {
        Self {
            rows: Vec::new(),
            origins: Vec::new(),
            bytes: 0,
        }
    }

    /// Every source this batch's outcome matters to.
    pub fn all_origins(&self) -> impl Iterator<Item = O> + '_ {
        self.origins.iter().flatten().copied()
    }
}

/// The writes of a round.
#[derive(Debug)]
pub struct Plan<O> {
    pub batches: Vec<Batch<O>>,
    /// Readings that replaced another of the same device and millisecond with other values
    /// (a re-sent correction, or a device clock that repeats); copies of one reading do not
    /// count.
    pub overwrites: usize,
}

/// Plans the writes for `(owner, reading)` pairs, owners in the order the readings came (a
/// round's [`crate::classify::Origin`]s). Every batch stays inside one partition, holds at most
/// 100 operations and 4 MiB, and never repeats a RowKey (Azure rejects a transaction that
/// touches one entity twice). When two readings share a key, the later one (of the greater
/// owner) wins, and the batch owes its result to both messages.
pub fn plan<O: Copy + Ord>(items: impl IntoIterator<Item = (O, Pending)>) -> Plan<O> {
    let mut items: Vec<(O, Pending)> = items.into_iter().collect();
    items.sort_unstable_by(by_key);
    let mut items = items.into_iter().peekable();
    let mut overwrites = 0;
    let mut batches = Vec::new();
    let mut current = Batch::new();
    while let Some((owner, mut row)) = items.next() {
        let mut owners = vec![owner];
        while let Some((owner, later)) = items.next_if(|(_, next)| next.key() == row.key()) {
            if later.reading != row.reading {
                overwrites += 1;
            }
            row = later;
            owners.push(owner);
        }
        let size = schemas::entity::encoded_len_bound(&row.reading) + PER_OPERATION_OVERHEAD;
        let other_partition = current
            .rows
            .first()
            .is_some_and(|first| first.reading.device_id != row.reading.device_id);
        let full = current.rows.len() == MAX_BATCH_OPERATIONS
            || (!current.rows.is_empty() && current.bytes + size > MAX_BATCH_BYTES);
        if other_partition || full {
            batches.push(std::mem::replace(&mut current, Batch::new()));
        }
        current.bytes += size;
        current.rows.push(row);
        current.origins.push(owners);
    }
    if !current.rows.is_empty() {
        batches.push(current);
    }
    Plan {
        batches,
        overwrites,
    }
}

/// By partition, then RowKey (a fixed-width time: its order is the instant's), then owner, so
/// that of two readings with one key the later comes last. Sorted in place and unstably: a
/// round holds thousands of readings, and a stable sort would take a scratch copy of them all.
fn by_key<O: Ord>((a_owner, a): &(O, Pending), (b_owner, b): &(O, Pending)) -> Ordering {
    a.key().cmp(&b.key()).then(a_owner.cmp(b_owner))
}

/// `items` in groups of at most `devices` devices, each device's items in one group, sorted
/// as [`plan`] sorts them. A round writes a group at a time: what it holds per device (write
/// plan, newest reading, hours, carriers) stays bounded when every reading comes from a
/// different device. The groups are cut from the end of the sorted items, so no item is moved
/// twice and the last devices come first.
pub fn device_groups<O: Ord>(
    mut items: Vec<(O, Pending)>,
    devices: usize,
) -> impl Iterator<Item = Vec<(O, Pending)>> {
    items.sort_unstable_by(by_key);
    let mut starts = Vec::new();
    let mut distinct = 0;
    for (i, (_, item)) in items.iter().enumerate() {
        let another = i == 0 || items[i - 1].1.reading.device_id != item.reading.device_id;
        if another {
            if distinct % devices.max(1) == 0 {
                starts.push(i);
            }
            distinct += 1;
        }
    }
    std::iter::from_fn(move || {
        let start = starts.pop()?;
        Some(items.split_off(start))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::reading::Extra;
    use std::collections::BTreeSet;

    /// Device `pk`'s reading at `at` ms, `filler` bytes of padding, received at `received`.
    fn row_of(pk: &str, at: usize, filler: usize, value: f64, received: i64) -> Pending {
        let reading = Reading {
            device_id: pk.into(),
            measured_at_ms: at as i64,
            seq: None,
            temperature: Some(value),
            humidity: None,
            pressure: None,
            extras: vec![("pad".into(), Extra::Str("x".repeat(filler)))],
        };
        Pending {
            reading,
            ingested_at_ms: received,
            backfill: false,
        }
    }

    fn row(pk: &str, at: usize, filler: usize) -> Pending {
        row_of(pk, at, filler, 1.0, 0)
    }

    #[test]
    fn batches_stay_in_one_partition_and_within_limits() {
        let mut items = Vec::new();
        for i in 0..250 {
            items.push((i % 7, row("a", i, 10)));
            items.push((i % 7, row("b", i, 10)));
        }
        items.push((9, row("c", 1, 10)));
        let batches = plan(items).batches;
        let sizes: Vec<usize> = batches.iter().map(|b| b.rows.len()).collect();
        assert_eq!(sizes, [100, 100, 50, 100, 100, 50, 1]);
        for b in &batches {
            let pk = &b.rows[0].reading.device_id;
            assert!(b.rows.iter().all(|r| &r.reading.device_id == pk));
            assert!(b.rows.windows(2).all(|w| w[0].row_key() < w[1].row_key()));
        }
        assert_eq!(batches[6].origins, [vec![9]]);
    }

    #[test]
    fn duplicate_keys_collapse_and_keep_both_owners() {
        let later = row_of("a", 1, 0, 2.0, 0);
        let planned = plan([
            (0, row("a", 1, 0)),
            (3, later.clone()),
            (1, row_of("a", 2, 0, 1.0, 6)),
            (4, row_of("a", 2, 0, 1.0, 7)),
        ]);
        assert_eq!(planned.overwrites, 1, "a copy is not an overwrite");
        let batches = planned.batches;
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].rows.len(), 2);
        assert_eq!(batches[0].rows[0], later, "the later one wins");
        assert_eq!(batches[0].origins, [vec![0, 3], vec![1, 4]]);
    }

    #[test]
    fn large_entities_split_by_bytes() {
        let items = (0..60).map(|i| (0, row("a", i, 200_000)));
        let batches = plan(items).batches;
        assert!(batches.len() >= 3);
        let mut scratch = Vec::new();
        for b in &batches {
            let bytes: usize = b
                .rows
                .iter()
                .map(|r| r.row(&mut scratch).json.len() + PER_OPERATION_OVERHEAD)
                .sum();
            assert!(bytes <= b.bytes, "planned at its largest");
            assert!(b.bytes <= MAX_BATCH_BYTES);
        }
    }

    #[test]
    fn device_groups_keep_each_device_whole_in_plan_order() {
        // Seven devices, their readings interleaved; device d's k-th reading has owner
        // 10 * d + k, and every device repeats its first key last with another value.
        let names = ["g", "b", "e", "a", "f", "c", "d"];
        let mut items = Vec::new();
        for k in 0..4 {
            for (d, name) in names.iter().enumerate() {
                let at = if k == 3 { 0 } else { k };
                items.push((10 * d + k, row_of(name, at, 0, k as f64, 0)));
            }
        }
        let groups: Vec<_> = device_groups(items, 3).collect();
        assert_eq!(groups.len(), 3, "7 devices, 3 a group");
        let mut seen = BTreeSet::new();
        for group in &groups {
            let ids: BTreeSet<&str> = group
                .iter()
                .map(|(_, p)| p.reading.device_id.as_str())
                .collect();
            assert!(ids.len() <= 3);
            for id in &ids {
                assert!(seen.insert(id.to_string()), "{id} in one group only");
                let owners: Vec<usize> = group
                    .iter()
                    .filter(|(_, p)| p.reading.device_id == *id)
                    .map(|(o, _)| *o)
                    .collect();
                let d = names.iter().position(|n| n == id).unwrap();
                assert_eq!(
                    owners,
                    [10 * d, 10 * d + 3, 10 * d + 1, 10 * d + 2],
                    "by time, then owner"
                );
            }
            let planned = plan(group.iter().cloned());
            assert_eq!(
                planned.overwrites,
                ids.len(),
                "the repeated key, per device"
            );
            for batch in &planned.batches {
                assert_eq!(
                    batch.rows[0].reading.temperature,
                    Some(3.0),
                    "the later wins"
                );
            }
        }
        assert_eq!(seen.len(), names.len());
        assert_eq!(device_groups(Vec::<(usize, Pending)>::new(), 2).count(), 0);
        assert_eq!(device_groups(vec![(0, row("a", 1, 0))], 0).count(), 1);
    }
}
