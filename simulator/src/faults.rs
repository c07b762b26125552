//! Fault injection: which messages go wrong, how, and what the pipeline must make of them.
//!
//! The choice is a pure function of (seed, device, tick), so a run is reproducible and its
//! accounting exact: every injected fault maps to one expected outcome (a dead letter with a
//! known reason, a harmless duplicate / late delivery that must still yield one row, or a
//! message the device loses, whose numbers the completeness ledger must report missing).

use schemas::Reason;
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// The payload is cut short: not JSON.
    Malformed,
    /// A measurement sent as a string.
    Schema,
    /// A temperature no sensor reports.
    OutOfRange,
    /// The payload names another device than the topic.
    Spoofed,
    /// A timestamp an hour ahead.
    Future,
    /// A timestamp 60 days old.
    Stale,
    /// A payload over the 32 KiB limit.
    Oversize,
    /// The same message published twice.
    Duplicate,
    /// The message published after the next one.
    OutOfOrder,
    /// The message lost on the device's side: never published, its `seq` numbers skipped.
    Drop,
}

impl Fault {
    pub const ALL: [Fault; 10] = [
        Fault::Malformed,
        Fault::Schema,
        Fault::OutOfRange,
        Fault::Spoofed,
        Fault::Future,
        Fault::Stale,
        Fault::Oversize,
        Fault::Duplicate,
        Fault::OutOfOrder,
        Fault::Drop,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Malformed => "malformed",
            Fault::Schema => "schema",
            Fault::OutOfRange => "out_of_range",
            Fault::Spoofed => "spoofed",
            Fault::Future => "future",
            Fault::Stale => "stale",
            Fault::Oversize => "oversize",
            Fault::Duplicate => "duplicate",
            Fault::OutOfOrder => "out_of_order",
            Fault::Drop => "drop",
        }
    }

    /// Whether the fault spoils the message's first reading only (the rest of a gateway array
    /// is stored).
    pub fn spoils_one_reading(self) -> bool {
        matches!(
            self,
            Fault::Schema | Fault::OutOfRange | Fault::Future | Fault::Stale
        )
    }

    /// The dead-letter reason the pipeline must give this fault's message, if any.
    pub fn expected_reason(self) -> Option<Reason> {
        match self {
            Fault::Malformed => Some(Reason::MalformedJson),
            Fault::Schema => Some(Reason::Schema),
            Fault::OutOfRange => Some(Reason::OutOfRange),
            Fault::Spoofed => Some(Reason::DeviceMismatch),
            Fault::Future => Some(Reason::FutureTimestamp),
            Fault::Stale => Some(Reason::Stale),
            Fault::Oversize => Some(Reason::TooLarge),
            Fault::Duplicate | Fault::OutOfOrder | Fault::Drop => None,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Fault ratios, e.g. `malformed=0.01,stale=0.002`: the share of messages given each fault.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults(Vec<(Fault, f64)>);

impl FromStr for Faults {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, ratio) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected <fault>=<ratio>"))?;
            let fault = Fault::ALL
                .into_iter()
                .find(|f| f.name() == name.trim())
                .ok_or_else(|| {
                    let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                    format!("unknown fault {name:?}; known: {}", names.join(", "))
                })?;
            let ratio: f64 = ratio
                .trim()
                .parse()
                .map_err(|_| format!("{part:?}: the ratio is not a number"))?;
            if !(0.0..=1.0).contains(&ratio) {
                return Err(format!("{part:?}: the ratio must be between 0 and 1"));
            }
            out.push((fault, ratio));
        }
        let total: f64 = out.iter().map(|(_, r)| r).sum();
        if total > 1.0 {
            return Err(format!("the ratios add up to {total}, more than 1"));
        }
        Ok(Self(out))
    }
}

impl Faults {
    /// The fault of the message for `u`, a uniform draw in [0, 1) for that message.
    pub fn pick(&self, u: f64) -> Option<Fault> {
        let mut edge = 0.0;
        for &(fault, ratio) in &self.0 {
            edge += ratio;
            if u < edge {
                return Some(fault);
            }
        }
        None
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|(_, r)| *r == 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_parse_and_pick_in_order() {
        let f: Faults = "malformed=0.1, stale=0.2".parse().unwrap();
        assert_eq!(f.pick(0.05), Some(Fault::Malformed));
        assert_eq!(f.pick(0.25), Some(Fault::Stale));
        assert_eq!(f.pick(0.35), None);
        assert!("".parse::<Faults>().unwrap().is_empty());
        for (bad, why) in [
            ("nope=0.1", "unknown fault"),
            ("stale", "expected"),
            ("stale=x", "not a number"),
            ("stale=2", "between 0 and 1"),
            ("stale=0.6,schema=0.6", "more than 1"),
        ] {
            let err = bad.parse::<Faults>().unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn every_refusing_fault_has_a_distinct_reason() {
        let reasons: std::collections::BTreeSet<&str> = Fault::ALL
            .iter()
            .filter_map(|f| f.expected_reason())
            .map(|r| r.as_str())
            .collect();
        assert_eq!(reasons.len(), 7);
    }
}
