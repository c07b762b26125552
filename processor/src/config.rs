use infra::cli::{LogArgs, StorageArgs};
use std::net::SocketAddr;
use std::time::Duration;

/// Queue in, Table Storage out: validates every reading, upserts the valid ones, and
/// dead-letters the rest with a reason and the original bytes.
#[derive(Debug, Clone, clap::Parser)]
#[command(version, about, long_about = None)]
pub struct Config {
    /// Queue of envelopes written by ingest.
    #[arg(long, env = "PROCESSOR_QUEUE_NAME", default_value = "telemetry-ingest")]
    pub queue_name: String,

    /// Queue that receives dead-letter records.
    #[arg(
        long,
        env = "PROCESSOR_DEAD_LETTER_QUEUE",
        default_value = "telemetry-deadletter"
    )]
    pub dead_letter_queue: String,

    /// Queue where queue messages that cannot be decoded (wholly or in part) are kept whole,
    /// as they were, before they leave the ingest queue; `deadletter quarantine` inspects
    /// and replays them.
    #[arg(
        long,
        env = "PROCESSOR_QUARANTINE_QUEUE",
        default_value = "telemetry-quarantine"
    )]
    pub quarantine_queue: String,

    /// Table that receives readings.
    #[arg(long, env = "PROCESSOR_TABLE_NAME", default_value = schemas::entity::DEFAULT_TABLE)]
    pub table_name: String,

    /// Table of devices: first/last seen and latest reading, one row per device. The archiver
    /// finds its work here.
    #[arg(long, env = "PROCESSOR_DEVICE_TABLE", default_value = schemas::device::DEFAULT_TABLE)]
    pub device_table: String,

    /// Rollup table. A reading stored after its hour ended marks that device-hour here, so
    /// the archiver recomputes its rollup (late data lands in its own hour).
    #[arg(long, env = "PROCESSOR_ROLLUP_TABLE", default_value = schemas::rollup::DEFAULT_TABLE)]
    pub rollup_table: String,

    /// Table of alarm rules (set with the `alarms` tool) and of each device's state under
    /// them.
    #[arg(long, env = "PROCESSOR_ALARM_TABLE", default_value = schemas::alarm::DEFAULT_TABLE)]
    pub alarm_table: String,

    /// Queue that receives every alarm raised and cleared, as JSON.
    #[arg(long, env = "PROCESSOR_ALARM_QUEUE", default_value = schemas::alarm::DEFAULT_QUEUE)]
    pub alarm_queue: String,

    /// How often devices are looked for that a silence rule (`silenceMinutes`) watches and
    /// that sent nothing for that long.
    #[arg(long, env = "PROCESSOR_ALARM_SILENCE_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub alarm_silence_interval: Duration,

    /// How far a device's clock may be behind: silence is raised only after its limit and
    /// this (and the age of the ingest queue's backlog) have passed without a reading.
    #[arg(long, env = "PROCESSOR_ALARM_CLOCK_SKEW", default_value = "2m", value_parser = humantime::parse_duration)]
    pub alarm_clock_skew: Duration,

    /// Where to POST each alarm event (JSON, as the alarms queue holds it). Set, the
    /// processors take the events from the alarms queue and delete each once the webhook
    /// answered 2xx; one that fails stays queued and is tried again. The URL may carry a
    /// token: it is never logged.
    #[arg(long, env = "ALARMS_WEBHOOK_URL", hide_env_values = true)]
    pub alarms_webhook_url: Option<infra::mqtt::Secret>,

    /// How long the webhook may take to answer one event (from 1s to 10min: a take of 16
    /// events is hidden for 16 times this).
    #[arg(long, env = "ALARMS_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = webhook_timeout)]
    pub alarms_webhook_timeout: Duration,

    /// How often the alarm rules are read again.
    #[arg(long, env = "PROCESSOR_ALARM_RULES_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub alarm_rules_interval: Duration,

    /// How often each device's latest reading is written to the device table (at most).
    /// New devices are registered at once, whatever this is.
    #[arg(long, env = "PROCESSOR_DEVICE_UPDATE_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub device_update_interval: Duration,

    /// Most devices the processor remembers having a device row (about 60 bytes each): it
    /// holds between half and all of this many of the devices it saw last. A forgotten
    /// device is registered again when it is next seen, at the cost of a retried
    /// transaction; size it to twice the devices one replica sees in a few minutes.
    #[arg(long, env = "PROCESSOR_DEVICE_CACHE", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(2..))]
    pub device_cache: u64,

    /// Topic prefix devices publish under (`<prefix>/<deviceId>/telemetry`).
    #[arg(long, env = "PROCESSOR_TOPIC_PREFIX", default_value = "devices")]
    pub topic_prefix: String,

    /// Concurrent workers (rounds in progress), each holding about `--round-kib` of messages.
    /// Two keep one round fetching and sorting while the other writes; more rounds would only
    /// split storage's bandwidth, and fewer, larger rounds group more of a device's readings
    /// into one transaction.
    #[arg(long, env = "PROCESSOR_WORKERS", default_value_t = 2)]
    pub workers: usize,

    /// Queue text one worker takes at a time under backlog, in KiB: gets go on while the
    /// queue is full and the round holds less, so a device's readings from many small
    /// envelopes share one transaction. Bounds memory: each get asks only for what the room
    /// left holds at 64 KiB a message, so a round exceeds it by one message at most, and the
    /// processor holds at most `PROCESSOR_WORKERS` rounds.
    #[arg(long, env = "PROCESSOR_ROUND_KIB", default_value_t = 4096)]
    pub round_kib: usize,

    /// After a get that found fewer than 32 messages (no backlog), wait this long before the
    /// next, so it finds more: fewer queue requests per reading, at most this much latency.
    #[arg(long, env = "PROCESSOR_BATCH_WAIT", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub batch_wait: Duration,

    /// Table writes in flight, all workers together. A round of full envelopes holds
    /// thousands of single-reading upserts; this is what keeps its latency down.
    #[arg(long, env = "PROCESSOR_WRITE_CONCURRENCY", default_value_t = 128)]
    pub write_concurrency: usize,

    /// Table request bodies in flight, in KiB, all workers together: each write waits for its
    /// body's largest size (a transaction of 100 readings about 100 KiB; a larger one than
    /// this goes alone). With the rounds, what bounds memory under a backlog: a write in flight
    /// holds its encoded rows and its body, about twice what it counts here.
    #[arg(long, env = "PROCESSOR_WRITE_KIB", default_value_t = 4096)]
    pub write_kib: u32,

    /// Longest wait to gather dead letters from many rounds into one dead-letter message
    /// (at most a quarter of the visibility timeout). A queue message with refused readings is
    /// deleted that much later; a dead-letter queue of packed messages is far cheaper to
    /// inspect and replay.
    #[arg(long, env = "PROCESSOR_DEAD_LETTER_LINGER", default_value = "5s", value_parser = humantime::parse_duration)]
    pub dead_letter_linger: Duration,

    /// How long a taken queue message stays hidden from other workers (3s to 7days). Retries
    /// of one message stop at half of it, so that it is finished or released before it
    /// reappears.
    #[arg(long, env = "PROCESSOR_VISIBILITY_TIMEOUT", default_value = "60s", value_parser = visibility)]
    pub visibility_timeout: Duration,

    /// Deliveries after which a queue message that still fails for a transient reason is
    /// dead-lettered as `poison` (it is always validated and written first; a refusal only
    /// the operator can fix, such as a 403, never poisons a message).
    #[arg(long, env = "PROCESSOR_MAX_DELIVERIES", default_value_t = 5)]
    pub max_deliveries: u64,

    /// How far ahead of this clock a reading's timestamp may be.
    #[arg(long, env = "PROCESSOR_MAX_FUTURE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub max_future: Duration,

    /// Oldest reading accepted; older ones are dead-lettered as `stale`.
    #[arg(long, env = "PROCESSOR_MAX_AGE", default_value = "30days", value_parser = humantime::parse_duration)]
    pub max_age: Duration,

    /// Address for `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "PROCESSOR_METRICS_ADDR", default_value = "127.0.0.1:9102")]
    pub metrics_addr: SocketAddr,

    #[command(flatten)]
    pub storage: StorageArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

/// A visibility timeout: at least 3 s (a round settles by seven eighths of it, and the
/// dead-letter writer keeps a 2 s reserve before that), at most Azure's 7 days.
fn visibility(text: &str) -> Result<Duration, String> {
    duration_within(text, (3, "3s"), (7 * 86_400, "7days"))
}

/// A webhook's timeout: at least a second, at most ten minutes, so that a take's hold (16 of
/// them and a margin) stays far below Azure's 7-day visibility limit.
fn webhook_timeout(text: &str) -> Result<Duration, String> {
    duration_within(text, (1, "1s"), (600, "10min"))
}

/// A duration from `low` to `high` seconds (each with how it is written).
fn duration_within(
    text: &str,
    (low, low_text): (u64, &str),
    (high, high_text): (u64, &str),
) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if !(Duration::from_secs(low)..=Duration::from_secs(high)).contains(&d) {
        return Err(format!("{text} is not from {low_text} to {high_text}"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_webhook_timeout_keeps_a_take_within_the_visibility_limit() {
        assert_eq!(
            super::webhook_timeout("10min"),
            Ok(std::time::Duration::from_secs(600))
        );
        assert!(super::webhook_timeout("11min")
            .unwrap_err()
            .contains("from 1s to 10min"));
        assert!(super::webhook_timeout("500ms").is_err());
        assert!(super::webhook_timeout("never").is_err());
    }

    #[test]
    fn a_visibility_timeout_leaves_room_for_the_round() {
        assert_eq!(
            super::visibility("8s"),
            Ok(std::time::Duration::from_secs(8))
        );
        assert_eq!(
            super::visibility("3s"),
            Ok(std::time::Duration::from_secs(3))
        );
        assert!(super::visibility("2s").unwrap_err().contains("from 3s"));
        assert!(super::visibility("8days").is_err());
        assert!(super::visibility("soon").is_err());
    }
}
