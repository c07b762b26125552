//! A bounded memory of recently seen 64-bit identities, oldest forgotten first.
//!
//! For duplicate suppression that is an optimisation, never a guarantee: whatever it forgets
//! is done twice, never lost (a dead letter written again, a redelivered message queued again).

use std::collections::{HashSet, VecDeque};

#[derive(Debug)]
pub struct Recent {
    order: VecDeque<u64>,
    set: HashSet<u64>,
    capacity: usize,
}

impl Recent {
    /// Remembers at most `capacity` identities (about 24 bytes each).
    pub fn new(capacity: usize) -> Self {
        Self {
            order: VecDeque::new(),
            set: HashSet::new(),
            capacity: capacity.max(1),
        }
    }

    /// Remembers `identity`, forgetting the oldest one when full. Remembering one already
    /// held changes nothing (it is not made younger).
    pub fn remember(&mut self, identity: u64) {
        if !self.set.insert(identity) {
            return;
        }
        self.order.push_back(identity);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    pub fn clear(&mut self) {
        self.order.clear();
        self.set.clear();
    }

    pub fn contains(&self, identity: u64) -> bool {
        self.set.contains(&identity)
    }

    /// Whether `identity` was remembered; it is forgotten either way.
    pub fn take(&mut self, identity: u64) -> bool {
        // Its place in `order` stays until it ages out (if remembered again meanwhile, it is
        // forgotten then, early: harmless here).
        self.set.remove(&identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_up_to_its_capacity_forgetting_the_oldest_first() {
        let mut recent = Recent::new(3);
        for identity in [1, 2, 3, 1] {
            recent.remember(identity);
        }
        recent.remember(4);
        assert!(
            !recent.contains(1),
            "the oldest is forgotten, a repeat does not refresh it"
        );
        assert!([2, 3, 4].iter().all(|i| recent.contains(*i)));
        assert_eq!(recent.order.len(), 3);
    }

    #[test]
    fn take_forgets() {
        let mut recent = Recent::new(2);
        recent.remember(7);
        assert!(recent.take(7));
        assert!(!recent.take(7));
        assert!(!recent.contains(7));
    }
}
