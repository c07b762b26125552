//! Which shard (storage account) a device's readings go to: every service that routes or finds
//! a device must agree, so the rule lives here.
//!
//! A device belongs to shard [`of`]`(id, shards)`: a jump consistent hash (Lamping and Veach,
//! "A Fast, Minimal Memory, Consistent Hash Algorithm", 2014) of a fixed 64-bit hash of its id.
//! Growing from `n` to `n + 1` shards moves about `1 / (n + 1)` of the devices, and only to the
//! new shard; the others stay where they were. So after a resharding a device's history is in
//! its shard now or in its shard under an earlier count ([`Layout::shards_holding`]).
//! The hash is this crate's own (FNV-1a, then a 64-bit finaliser), so it cannot change with a
//! compiler or library version: changing it would move devices between shards.

/// The shard of `device_id` among `shards` (0 for one shard or none).
pub fn of(device_id: &str, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let buckets = i64::try_from(shards).unwrap_or(i64::MAX);
    let mut key = stable_hash(device_id.as_bytes());
    let (mut bucket, mut next) = (-1_i64, 0_i64);
    while next < buckets {
        bucket = next;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        let step = (1_u64 << 31) as f64 / ((key >> 33) + 1) as f64;
        next = ((bucket + 1) as f64 * step) as i64;
    }
    usize::try_from(bucket).unwrap_or(0)
}

/// FNV-1a over `bytes`, then MurmurHash3's 64-bit finaliser, so that ids differing in one
/// character spread over every bit.
fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The shard counts a deployment has had: its current one, and the earlier ones with when
/// each ended (readings measured before then may be in the shard of that count).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub shards: usize,
    /// `(count, until_ms)`: `count` shards took readings measured before `until_ms`.
    pub earlier: Vec<(usize, i64)>,
}

/// Parses earlier shard counts written `COUNT@TIME`, comma-separated, TIME in RFC 3339
/// (`2@2026-12-01T00:00:00Z`): COUNT shards took the readings measured before TIME. Empty
/// for none.
pub fn parse_earlier(text: &str) -> Result<Vec<(usize, i64)>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let (count, until) = entry
                .split_once('@')
                .ok_or_else(|| format!("{entry:?} is not COUNT@TIME"))?;
            let count: usize = count
                .trim()
                .parse()
                .ok()
                .filter(|&n| n >= 1)
                .ok_or_else(|| format!("{count:?} in {entry:?} is not a shard count"))?;
            let until = crate::timefmt::parse_rfc3339_ms(until.trim())
                .ok_or_else(|| format!("{until:?} in {entry:?} is not an RFC 3339 time"))?;
            Ok((count, until))
        })
        .collect()
}

impl Layout {
    /// One count, never changed.
    pub fn fixed(shards: usize) -> Self {
        Self {
            shards: shards.max(1),
            earlier: Vec::new(),
        }
    }

    /// The shard `device_id` writes to now.
    pub fn shard(&self, device_id: &str) -> usize {
        of(device_id, self.shards)
    }

    /// The shards that may hold `device_id`'s readings measured from `from_ms` on, each with
    /// the time its readings end (`None` for the shard it writes to now, listed first): its
    /// shard under each earlier count whose readings reach past `from_ms`, without repeats.
    pub fn shards_holding(&self, device_id: &str, from_ms: i64) -> Vec<(usize, Option<i64>)> {
        let current = self.shard(device_id);
        let mut shards: Vec<(usize, Option<i64>)> = vec![(current, None)];
        for &(count, until_ms) in &self.earlier {
            let shard = of(device_id, count);
            if from_ms >= until_ms || shard == current {
                continue;
            }
            match shards.iter_mut().find(|(s, _)| *s == shard) {
                Some((_, until)) => *until = (*until).max(Some(until_ms)),
                None => shards.push((shard, Some(until_ms))),
            }
        }
        shards
    }

    /// Whether the earlier counts can be: each at least one and fewer than now, growing with
    /// time (a count only grows: a shard's place decides its devices).
    pub fn check(&self) -> Result<(), String> {
        let mut last = (0, i64::MIN);
        for &(count, until_ms) in &self.earlier {
            if count == 0 || count >= self.shards {
                return Err(format!(
                    "an earlier count of {count} shards, with {} now: earlier counts are fewer",
                    self.shards
                ));
            }
            if count <= last.0 || until_ms <= last.1 {
                return Err("earlier counts must grow with their times, oldest first".to_owned());
            }
            last = (count, until_ms);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> impl Iterator<Item = String> {
        (0..n).map(|i| format!("sensor-{i:05}"))
    }

    #[test]
    fn one_shard_is_shard_zero() {
        assert_eq!(of("anything", 1), 0);
        assert_eq!(of("anything", 0), 0);
    }

    #[test]
    fn the_assignment_is_fixed_forever() {
        // Pinned: a change here moves stored devices to other shards.
        let got: Vec<usize> = ["sensor-00000", "sensor-00001", "gw-7", ""]
            .iter()
            .flat_map(|id| [of(id, 3), of(id, 10), of(id, 1000)])
            .collect();
        assert_eq!(got, PINNED);
    }
    const PINNED: [usize; 12] = [0, 5, 572, 0, 4, 665, 1, 5, 204, 1, 1, 499];

    #[test]
    fn devices_spread_evenly() {
        let mut counts = [0usize; 3];
        for id in ids(30_000) {
            counts[of(&id, 3)] += 1;
        }
        for c in counts {
            assert!((9_400..10_600).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn growing_moves_devices_only_to_the_new_shard() {
        let mut moved = 0;
        for id in ids(30_000) {
            let (before, after) = (of(&id, 2), of(&id, 3));
            if before != after {
                assert_eq!(after, 2, "{id} moved from {before} to an old shard");
                moved += 1;
            }
        }
        assert!((9_400..10_600).contains(&moved), "{moved} of 30,000 moved");
    }

    #[test]
    fn earlier_counts_read_as_count_at_time() {
        assert_eq!(parse_earlier(""), Ok(Vec::new()));
        let at = crate::timefmt::parse_rfc3339_ms("2026-12-01T00:00:00Z").unwrap();
        assert_eq!(
            parse_earlier(" 2@2026-12-01T00:00:00Z , 1@2026-12-01T00:00:00Z"),
            Ok(vec![(2, at), (1, at)])
        );
        for bad in [
            "2",
            "0@2026-12-01T00:00:00Z",
            "x@2026-12-01T00:00:00Z",
            "2@yesterday",
        ] {
            assert!(parse_earlier(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn history_is_looked_for_only_where_it_can_be() {
        let layout = Layout {
            shards: 3,
            earlier: vec![(2, 1_000)],
        };
        let moved = ids(100)
            .find(|id| of(id, 2) != of(id, 3))
            .expect("a device that moved");
        assert_eq!(
            layout.shards_holding(&moved, 0),
            vec![(of(&moved, 3), None), (of(&moved, 2), Some(1_000))]
        );
        assert_eq!(
            layout.shards_holding(&moved, 1_000),
            vec![(of(&moved, 3), None)]
        );
        let stayed = ids(100).find(|id| of(id, 2) == of(id, 3)).unwrap();
        assert_eq!(
            layout.shards_holding(&stayed, 0),
            vec![(of(&stayed, 3), None)]
        );
        assert_eq!(Layout::fixed(1).shards_holding("x", 0), vec![(0, None)]);
    }

    #[test]
    fn earlier_counts_are_fewer_and_grow_with_time() {
        let layout = |earlier: Vec<(usize, i64)>| Layout { shards: 3, earlier };
        assert!(layout(vec![]).check().is_ok());
        assert!(layout(vec![(1, 10), (2, 20)]).check().is_ok());
        assert!(layout(vec![(3, 10)]).check().is_err(), "as many as now");
        assert!(layout(vec![(4, 10)]).check().is_err(), "more than now");
        assert!(layout(vec![(2, 10), (1, 20)]).check().is_err(), "shrinking");
        assert!(
            layout(vec![(1, 20), (2, 10)]).check().is_err(),
            "times out of order"
        );
    }
}
