//! What this process knows of the dead letters it writes, so that a queue message redelivered
//! while or after its records are put does not write them twice: [`DeadLettered`], and the
//! [`Claim`] a submission holds on its records until its put has an outcome. The writer
//! (`dead_letters.rs`) takes and settles claims; a round (`round.rs`) takes them.

use crate::metrics_names as m;
use infra::recent::Recent;
use schemas::DeadLetter;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Identities remembered by [`DeadLettered`]: about 1.5 MiB, and hours of refusals at any
/// plausible rate of bad input.
const REMEMBERED: usize = 65_536;

/// What this process knows of its dead letters, by identity ([`DeadLetter::identity`]): the
/// records it wrote most recently, and those claimed by a submission whose put has no outcome
/// yet. A message that comes back after its records were written (its delete failed, its
/// round ran out of time) is settled without writing them twice; one that comes back while
/// they are being written (a slow put outlived the message's visibility) waits for the put.
/// Memory only: a restarted processor writes them again (a duplicate the operator's tool
/// shows once).
#[derive(Debug)]
pub struct DeadLettered {
    written: Recent,
    /// Claimed and not yet put or given up, with how many claims hold each: the records of
    /// the submissions held or awaited by the writer, its pending messages plus one round
    /// per worker waiting for room (`dead_letters::MAX_PENDING`).
    writing: HashMap<u64, u32>,
}

impl Default for DeadLettered {
    fn default() -> Self {
        Self {
            written: Recent::new(REMEMBERED),
            writing: HashMap::new(),
        }
    }
}

/// Some of a message's records are in a put that has not ended.
#[derive(Debug, PartialEq, Eq)]
pub struct InFlight;

impl DeadLettered {
    /// Claims `records` for a submission: those already written are left out, and the rest
    /// are in flight until [`DeadLettered::settle`]. Claims none if any is in flight already.
    pub fn claim(&mut self, records: Vec<DeadLetter>) -> Result<Vec<DeadLetter>, InFlight> {
        if records
            .iter()
            .any(|r| self.writing.contains_key(&r.identity()))
        {
            return Err(InFlight);
        }
        let before = records.len();
        let left: Vec<DeadLetter> = records
            .into_iter()
            .filter(|r| !self.written.contains(r.identity()))
            .collect();
        let skipped = (before - left.len()) as u64;
        if skipped > 0 {
            metrics::counter!(m::DEAD_LETTERS_ALREADY_WRITTEN).increment(skipped);
        }
        for r in &left {
            *self.writing.entry(r.identity()).or_default() += 1;
        }
        Ok(left)
    }

    /// Ends a claim on `identity`: its put succeeded (`written`) or will not be tried again.
    fn settle(&mut self, identity: u64, written: bool) {
        if let Entry::Occupied(mut claims) = self.writing.entry(identity) {
            *claims.get_mut() -= 1;
            if *claims.get() == 0 {
                claims.remove();
            }
        }
        if written {
            self.written.remember(identity);
        }
    }
}

/// Records claimed by one submission ([`DeadLettered::claim`]). The claim ends when it is
/// settled or dropped, whatever ends the submission (a panic included), so no identity stays
/// in flight for good; only records marked written are remembered as written.
#[derive(Debug)]
pub struct Claim {
    known: Arc<Mutex<DeadLettered>>,
    identities: Vec<u64>,
    written: Vec<bool>,
    settled: bool,
}

impl Claim {
    /// Claims `records` in `known` (see [`DeadLettered::claim`]).
    pub fn take(
        known: &Arc<Mutex<DeadLettered>>,
        records: Vec<DeadLetter>,
    ) -> Result<(Vec<DeadLetter>, Claim), InFlight> {
        let left = known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .claim(records)?;
        let claim = Claim {
            known: known.clone(),
            identities: left.iter().map(DeadLetter::identity).collect(),
            written: vec![false; left.len()],
            settled: false,
        };
        Ok((left, claim))
    }

    /// The `i`th record's put succeeded.
    pub fn written(&mut self, i: usize) {
        self.written[i] = true;
    }

    pub fn settle(&mut self) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        for (identity, written) in self.identities.iter().zip(&self.written) {
            known.settle(*identity, *written);
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.settle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::dead_letter::Refusal;
    use schemas::{DeviceMessage, Reason};

    fn record(received_at_ms: i64, attempts: u64) -> DeadLetter {
        let msg = DeviceMessage::from_mqtt("devices/d-1/telemetry", b"{}", received_at_ms);
        DeadLetter::new(
            &msg,
            Refusal {
                reason: Reason::Schema,
                detail: "missing temperature".into(),
                device_id: Some("d-1".into()),
                rejected_indexes: vec![],
                attempts,
                dead_lettered_at_ms: received_at_ms + 1,
            },
        )
    }

    #[test]
    fn a_redelivery_waits_while_its_records_are_being_written_and_skips_them_once_written() {
        let mut known = DeadLettered::default();
        let claimed = known.claim(vec![record(1, 1), record(2, 1)]).unwrap();
        assert_eq!(claimed.len(), 2);
        // The message came back while the put runs: nothing is claimed twice.
        assert_eq!(known.claim(vec![record(1, 2), record(2, 2)]), Err(InFlight));
        assert_eq!(known.claim(vec![record(3, 2), record(2, 2)]), Err(InFlight));
        for r in &claimed {
            known.settle(r.identity(), true);
        }
        assert_eq!(known.claim(vec![record(1, 3), record(2, 3)]), Ok(vec![]));
        assert!(known.writing.is_empty());
    }

    #[test]
    fn a_claim_ends_when_dropped_remembering_only_the_records_written() {
        let known = Arc::new(Mutex::new(DeadLettered::default()));
        let (left, mut claim) = Claim::take(&known, vec![record(1, 1), record(2, 1)]).unwrap();
        assert_eq!(left.len(), 2);
        assert_eq!(
            Claim::take(&known, vec![record(1, 2)]).err(),
            Some(InFlight)
        );
        claim.written(0);
        // However the submission ends (settled, dropped by a failed send, a panic's unwind).
        drop(claim);
        let (left, _claim) = Claim::take(&known, vec![record(1, 3), record(2, 3)]).unwrap();
        assert_eq!(
            left,
            vec![record(2, 3)],
            "only the unwritten one is written again"
        );
    }

    #[test]
    fn a_failed_put_lets_the_redelivery_write_its_records() {
        let mut known = DeadLettered::default();
        let claimed = known.claim(vec![record(1, 1)]).unwrap();
        known.settle(claimed[0].identity(), false);
        let again = known.claim(vec![record(1, 2)]).unwrap();
        assert_eq!(again.len(), 1, "not written: written by the redelivery");
        known.settle(again[0].identity(), true);
        assert!(known.writing.is_empty());
    }
}
