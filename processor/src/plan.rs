//! Turns the readings of one round into table writes: grouped by partition, deduplicated by
//! key, and chunked within Azure's transaction limits. Pure, so its invariants are unit-tested.

use infra::storage::{Entity, MAX_BATCH_BYTES, MAX_BATCH_OPERATIONS};
use std::collections::BTreeMap;

/// Multipart framing and headers the SDK adds around each operation in a transaction.
const PER_OPERATION_OVERHEAD: usize = 512;

/// One table write: a single upsert or a same-partition transaction.
#[derive(Debug)]
pub struct Batch<O> {
    pub entities: Vec<Entity>,
    /// Where each entity came from (several sources when readings shared a key).
    pub origins: Vec<Vec<O>>,
}

impl<O: Copy> Batch<O> {
    fn new() -> Self {
        Self {
            entities: Vec::new(),
            origins: Vec::new(),
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

/// Plans the writes for `(owner, entity)` pairs. Every batch stays inside one partition, holds
/// at most 100 operations and 4 MiB, and never repeats a RowKey (Azure rejects a transaction
/// that touches one entity twice). When two readings share a key, the later one wins, and the
/// batch owes its result to both messages.
pub fn plan<O: Copy>(items: impl IntoIterator<Item = (O, Entity)>) -> Plan<O> {
    let mut partitions: BTreeMap<String, BTreeMap<String, (Entity, Vec<O>)>> = BTreeMap::new();
    let mut overwrites = 0;
    for (owner, entity) in items {
        let key = |name: &str| {
            entity
                .get(name)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        let (pk, rk) = (key("PartitionKey"), key("RowKey"));
        let slot = partitions
            .entry(pk)
            .or_default()
            .entry(rk)
            .or_insert_with(|| (Entity::new(), Vec::new()));
        if !slot.1.is_empty() && !same_reading(&slot.0, &entity) {
            overwrites += 1;
        }
        slot.0 = entity;
        slot.1.push(owner);
    }
    let mut batches = Vec::new();
    for rows in partitions.into_values() {
        let mut current = Batch::new();
        let mut bytes = 0;
        for (entity, owners) in rows.into_values() {
            let size = serde_json::to_vec(&entity).map_or(0, |v| v.len()) + PER_OPERATION_OVERHEAD;
            if current.entities.len() == MAX_BATCH_OPERATIONS || bytes + size > MAX_BATCH_BYTES {
                batches.push(std::mem::replace(&mut current, Batch::new()));
                bytes = 0;
            }
            bytes += size;
            current.entities.push(entity);
            current.origins.push(owners);
        }
        if !current.entities.is_empty() {
            batches.push(current);
        }
    }
    Plan {
        batches,
        overwrites,
    }
}

/// Whether two entities hold the same reading (when ingest received each aside).
fn same_reading(a: &Entity, b: &Entity) -> bool {
    let received = |k: &String| k.starts_with("IngestedAt");
    a.len() == b.len() && a.iter().all(|(k, v)| received(k) || b.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entity(pk: &str, rk: usize, filler: usize) -> Entity {
        let v =
            json!({"PartitionKey": pk, "RowKey": format!("{rk:08}"), "Pad": "x".repeat(filler)});
        v.as_object().unwrap().clone()
    }

    #[test]
    fn batches_stay_in_one_partition_and_within_limits() {
        let mut items = Vec::new();
        for i in 0..250 {
            items.push((i % 7, entity("a", i, 10)));
            items.push((i % 7, entity("b", i, 10)));
        }
        items.push((9, entity("c", 1, 10)));
        let batches = plan(items).batches;
        let sizes: Vec<usize> = batches.iter().map(|b| b.entities.len()).collect();
        assert_eq!(sizes, [100, 100, 50, 100, 100, 50, 1]);
        for b in &batches {
            let pk = &b.entities[0]["PartitionKey"];
            assert!(b.entities.iter().all(|e| &e["PartitionKey"] == pk));
        }
        assert_eq!(batches[6].origins, [vec![9]]);
    }

    #[test]
    fn duplicate_keys_collapse_and_keep_both_owners() {
        let mut later = entity("a", 1, 0);
        later.insert("V".into(), 2.into());
        let received = |at: i64| {
            let mut e = entity("a", 2, 0);
            e.insert("IngestedAt".into(), at.into());
            e
        };
        let planned = plan([
            (0, entity("a", 1, 0)),
            (3, later),
            (1, received(6)),
            (4, received(7)),
        ]);
        assert_eq!(planned.overwrites, 1, "a copy is not an overwrite");
        let batches = planned.batches;
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].entities.len(), 2);
        assert_eq!(batches[0].entities[0]["V"], 2);
        assert_eq!(batches[0].origins, [vec![0, 3], vec![1, 4]]);
    }

    #[test]
    fn large_entities_split_by_bytes() {
        let items = (0..60).map(|i| (0, entity("a", i, 200_000)));
        let batches = plan(items).batches;
        assert!(batches.len() >= 3);
        for b in &batches {
            let bytes: usize = b
                .entities
                .iter()
                .map(|e| serde_json::to_vec(e).unwrap().len())
                .sum();
            assert!(bytes <= MAX_BATCH_BYTES);
        }
    }
}
