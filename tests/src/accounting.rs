//! Exact accounting for the runs under load (chaos, scale-out): what the simulators say they
//! sent, against what the pipeline stored and dead-lettered.

use schemas::DeadLetter;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::services::bin_path;

/// Every fault kind the simulator injects, at rates that give a few hundred refusals a minute
/// at 150 devices a second.
pub const ALL_FAULTS: &str = "malformed=0.01,schema=0.01,out_of_range=0.01,spoofed=0.01,\
                              future=0.01,stale=0.01,oversize=0.005,duplicate=0.03,\
                              out_of_order=0.03";

/// Runs a simulator to completion in the background; its JSON summary at the end.
pub fn simulate(
    mqtt: String,
    args: Vec<(&'static str, String)>,
) -> tokio::task::JoinHandle<serde_json::Value> {
    tokio::spawn(async move {
        let out = tokio::process::Command::new(bin_path("simulator"))
            .env("MQTT_URL", mqtt)
            .env("SIMULATOR_METRICS_ADDR", "127.0.0.1:0")
            .env("LOG_FORMAT", "json")
            .envs(args)
            .kill_on_drop(true)
            .output()
            .await
            .expect("run the simulator");
        assert!(
            out.status.success(),
            "simulator failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("simulator summary")
    })
}

/// What the simulators' summaries say the pipeline must end with.
#[derive(Debug, Default)]
pub struct Expected {
    /// Readings offered, valid or not.
    pub readings: u64,
    /// Distinct valid readings: one row each.
    pub rows: u64,
    /// The sum of the valid readings' digests (the values, not only the keys).
    pub digest: u64,
    /// Refused device messages by reason.
    pub dead: BTreeMap<String, u64>,
}

impl Expected {
    /// Adds up the summaries. The counts hold only if the broker confirmed every publish (a
    /// device-side loss is not the pipeline's), which this asserts.
    pub fn from_summaries(summaries: &[serde_json::Value]) -> Self {
        let mut e = Expected::default();
        for s in summaries {
            let (messages, acked) = (s["messages"].as_u64(), s["acked"].as_u64());
            assert!(
                acked >= messages,
                "the broker did not confirm every publish ({acked:?} of {messages:?}): {s}"
            );
            e.readings += s["readings"].as_u64().unwrap_or(0);
            e.rows += s["expected_rows"].as_u64().expect("expected_rows");
            e.digest = e
                .digest
                .wrapping_add(s["expected_digest"].as_u64().expect("expected_digest"));
            for (reason, n) in s["expected_dead_letters"]
                .as_object()
                .expect("dead letters")
            {
                *e.dead.entry(reason.clone()).or_default() += n.as_u64().unwrap_or(0);
            }
        }
        e
    }

    /// Refused device messages, all reasons.
    pub fn refused(&self) -> u64 {
        self.dead.values().sum()
    }
}

/// Stored readings by (device, RowKey), with their digests.
pub type Keyed = BTreeMap<(String, String), u64>;

/// A reading's (device, RowKey) and digest.
pub fn keyed(r: &schemas::Reading) -> ((String, String), u64) {
    (
        (r.device_id.clone(), schemas::entity::row_key(r)),
        r.digest(),
    )
}

/// The rows of `table` that read back as readings.
pub async fn stored(account: &infra::storage::Account, table: &str) -> Option<Keyed> {
    let rows = crate::storage::rows(account, table).await.ok()?;
    Some(
        rows.iter()
            .filter_map(|e| schemas::entity::from_entity(e).ok())
            .map(|row| keyed(&row.reading))
            .collect(),
    )
}

/// The dead letters a run left.
#[derive(Debug, Default)]
pub struct DeadLetters {
    pub records: Vec<DeadLetter>,
    pub by_reason: BTreeMap<String, u64>,
    /// Records in a dead-letter message that landed twice, byte for byte (a put retried after
    /// its answer was lost).
    pub put_twice: u64,
    /// Dead-letter messages that landed more than once.
    pub repeated_messages: u64,
}

impl DeadLetters {
    /// Takes dead letters off `queue` until every expected one is there and none came for
    /// 10 s more (redone work adds late ones), or `timeout`.
    pub async fn collect(
        account: &infra::storage::Account,
        queue: &str,
        expected: &BTreeMap<String, u64>,
        timeout: Duration,
    ) -> Self {
        let mut out = DeadLetters::default();
        let mut texts: BTreeMap<String, u64> = BTreeMap::new();
        let until = Instant::now() + timeout;
        let mut quiet_from: Option<Instant> = None;
        loop {
            let more = crate::storage::drain_dead_letter_messages(account, queue).await;
            if !more.is_empty() {
                // Still arriving: the quiet time starts again.
                quiet_from = None;
            }
            for (text, records) in more {
                for r in &records {
                    *out.by_reason
                        .entry(r.reason.as_str().to_owned())
                        .or_default() += 1;
                }
                let seen = texts.entry(text).or_default();
                if *seen > 0 {
                    out.put_twice += records.len() as u64;
                    out.repeated_messages += 1;
                }
                *seen += 1;
                out.records.extend(records);
            }
            let complete = expected
                .iter()
                .all(|(reason, want)| out.by_reason.get(reason).copied().unwrap_or(0) >= *want);
            if complete {
                let since = *quiet_from.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_secs(10) {
                    break;
                }
            }
            if Instant::now() >= until {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        out
    }

    /// Records written more than once: same identity (the processor redoing a delivery, or a
    /// put landing twice).
    pub fn same_identity(&self) -> u64 {
        let distinct: std::collections::BTreeSet<u64> =
            self.records.iter().map(DeadLetter::identity).collect();
        (self.records.len() - distinct.len()) as u64
    }
}
