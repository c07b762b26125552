//! What the simulator sent, counted exactly, and the outcome the pipeline owes for it.

use crate::faults::Fault;
use crate::metrics_names as m;
use crate::sensor::Message;
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Tally {
    /// Publishes handed to the client (a duplicate counts twice).
    pub messages: AtomicU64,
    /// Publishes the broker acknowledged.
    pub acked: AtomicU64,
    pub readings: AtomicU64,
    /// Distinct readings the pipeline must store.
    pub valid: AtomicU64,
    /// The wrapping sum of their digests (`schemas::Reading::digest`).
    digest: AtomicU64,
    faults: [AtomicU64; Fault::ALL.len()],
    /// The messages lost on purpose (`drop`): device and `seq` range, the first
    /// [`DROPPED_LISTED`] of them.
    dropped: std::sync::Mutex<Vec<(String, u64, u64)>>,
    /// The readings refused for their content (a reading-level fault spoils the message's
    /// first reading): device, `seq` and the reason the pipeline must give, the first
    /// [`DROPPED_LISTED`] of them.
    refused: std::sync::Mutex<Vec<(String, u64, &'static str)>>,
    /// Connections that have connected at least once, and when the last of them did
    /// (milliseconds since the tally began).
    connections: AtomicU64,
    all_connected_ms: AtomicU64,
    started: OnceInstant,
}

/// The moment a tally is created, for connection set-up times.
#[derive(Debug)]
struct OnceInstant(std::time::Instant);

impl Default for OnceInstant {
    fn default() -> Self {
        Self(std::time::Instant::now())
    }
}

impl Tally {
    /// Records one generated message (before any duplicate publish of it).
    pub fn message(&self, msg: &Message) {
        self.readings.fetch_add(u64::from(msg.readings), Relaxed);
        self.valid.fetch_add(u64::from(msg.valid), Relaxed);
        // fetch_add wraps on overflow, as the sum is defined.
        self.digest.fetch_add(msg.digest, Relaxed);
        metrics::counter!(m::READINGS).increment(u64::from(msg.readings));
        if let Some(fault) = msg.fault {
            self.faults[index(fault)].fetch_add(1, Relaxed);
            metrics::counter!(m::INJECTED, "fault" => fault.name()).increment(1);
            if fault.spoils_one_reading() {
                if let (Some(reason), Ok(mut list)) = (fault.expected_reason(), self.refused.lock())
                {
                    if list.len() < DROPPED_LISTED {
                        list.push((device_of(msg), msg.first_seq, reason.as_str()));
                    }
                }
            }
        }
    }

    /// Records a message the device lost (`drop`): its readings' numbers are skipped.
    pub fn dropped(&self, msg: &Message) {
        let device = device_of(msg);
        let last = msg.first_seq + u64::from(msg.readings.max(1)) - 1;
        if let Ok(mut list) = self.dropped.lock() {
            if list.len() < DROPPED_LISTED {
                list.push((device, msg.first_seq, last));
            }
        }
    }

    /// Records a connection's first CONNACK.
    pub fn connected(&self) {
        self.connections.fetch_add(1, Relaxed);
        let ms = u64::try_from(self.started.0.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.all_connected_ms.fetch_max(ms, Relaxed);
    }

    pub fn published(&self) {
        self.messages.fetch_add(1, Relaxed);
        metrics::counter!(m::MESSAGES).increment(1);
    }

    pub fn injected(&self, fault: Fault) -> u64 {
        self.faults[index(fault)].load(Relaxed)
    }

    pub fn injected_total(&self) -> u64 {
        self.faults.iter().map(|f| f.load(Relaxed)).sum()
    }

    /// The run's summary: what was sent, and the dead letters (by reason) and rows it must
    /// produce.
    pub fn summary(&self, seconds: f64) -> Value {
        let mut injected = Map::new();
        let mut dead = Map::new();
        for fault in Fault::ALL {
            let n = self.injected(fault);
            injected.insert(fault.name().into(), n.into());
            if let Some(reason) = fault.expected_reason() {
                dead.insert(reason.as_str().into(), n.into());
            }
        }
        let messages = self.messages.load(Relaxed);
        let dropped: Vec<Value> = self
            .dropped
            .lock()
            .map(|list| {
                list.iter()
                    .map(|(device, first, last)| json!({"device": device, "first": first, "last": last}))
                    .collect()
            })
            .unwrap_or_default();
        let refused: Vec<Value> = self
            .refused
            .lock()
            .map(|list| {
                list.iter()
                    .map(|(device, seq, reason)| json!({"device": device, "seq": seq, "reason": reason}))
                    .collect()
            })
            .unwrap_or_default();
        json!({
            "seconds": (seconds * 10.0).round() / 10.0,
            "messages": messages,
            "acked": self.acked.load(Relaxed),
            "messages_per_second": (messages as f64 / seconds.max(0.001)).round(),
            "readings": self.readings.load(Relaxed),
            "expected_rows": self.valid.load(Relaxed),
            "expected_digest": self.digest.load(Relaxed),
            "injected": injected,
            "expected_dead_letters": dead,
            // What `drop` lost, for the completeness ledger to report (the first
            // DROPPED_LISTED messages; `injected.drop` counts them all).
            "dropped": dropped,
            // The readings refused for their content, whose numbers the gaps API must show
            // as refused (the first DROPPED_LISTED).
            "refused": refused,
            "connections": self.connections.load(Relaxed),
            "all_connected_seconds": self.all_connected_ms.load(Relaxed) as f64 / 1000.0,
        })
    }
}

/// The most dropped messages a summary lists, so that a long run's memory stays bounded.
const DROPPED_LISTED: usize = 100_000;

/// The device a message's topic (`{prefix}/{device}/telemetry`) names.
fn device_of(msg: &Message) -> String {
    msg.topic.rsplit('/').nth(1).unwrap_or_default().to_owned()
}

fn index(fault: Fault) -> usize {
    Fault::ALL.iter().position(|f| *f == fault).unwrap_or(0)
}
