use infra::cli::{LogArgs, ShardArgs, StorageArgs};
use infra::mqtt::MqttArgs;
use std::net::SocketAddr;
use std::time::Duration;

/// MQTT in, Azure Storage Queue out: buffers device messages durably and acknowledges them to
/// the broker only once the queue holds them.
#[derive(Debug, Clone, clap::Parser)]
#[command(version, about, long_about = None)]
pub struct Config {
    /// The broker (MQTT v5) and how to authenticate to it.
    #[command(flatten)]
    pub mqtt: MqttArgs,

    /// MQTT client id. It names the persistent session that holds unacknowledged messages
    /// across restarts, so it must be stable per replica and unique across replicas
    /// (a StatefulSet pod name is ideal). Defaults to `ingest-<hostname>`.
    #[arg(long, env = "INGEST_CLIENT_ID", default_value_t = default_client_id())]
    pub client_id: String,

    /// Topic prefix: devices publish to `<prefix>/<deviceId>/telemetry`.
    #[arg(long, env = "INGEST_TOPIC_PREFIX", default_value = "devices")]
    pub topic_prefix: String,

    /// Shared-subscription group, for several replicas that split the load. Empty (the default)
    /// subscribes without sharing, which is loss-free across broker restarts: Mosquitto (2.0)
    /// restores a plain subscription of a persistent session after a restart, but not a shared
    /// one, so readings published between a broker restart and ingest's resubscribe are routed
    /// nowhere. Set a group only when running several replicas, and accept that window.
    /// Before removing a replica for good, send it SIGUSR1: it leaves the group, takes what the
    /// broker held for it, and says on `/readyz` when it can be stopped.
    #[arg(long, env = "INGEST_SHARE_GROUP", default_value = "")]
    pub share_group: String,

    /// Queue that receives the envelopes.
    #[arg(long, env = "INGEST_QUEUE_NAME", default_value = "telemetry-ingest")]
    pub queue_name: String,

    /// Longest a message waits for its envelope to fill before the envelope is written. Longer
    /// means fuller envelopes (fewer queue requests per reading) and more latency; at the seed
    /// load (333 readings/s) 200ms packs about 65 readings per envelope.
    #[arg(long, env = "INGEST_LINGER", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub linger: Duration,

    /// Envelopes being written to the queue at once. Acknowledgements still go in order.
    #[arg(long, env = "INGEST_PUTS_IN_FLIGHT", default_value_t = 4)]
    pub puts_in_flight: usize,

    /// Unacknowledged messages the broker may send before waiting for acks (MQTT v5 Receive
    /// Maximum). Bounds memory, and the work a crash makes the broker redeliver. With shards,
    /// also how long the others keep flowing while one shard's account is down: its held
    /// messages use this up (raise it, up to 65535, for long outages at high rates).
    #[arg(long, env = "INGEST_RECEIVE_MAXIMUM", default_value_t = 2000)]
    pub receive_maximum: u16,

    /// How long the broker keeps this client's session (and queues messages for it) while it
    /// is disconnected.
    #[arg(long, env = "INGEST_SESSION_EXPIRY", default_value = "7days", value_parser = humantime::parse_duration)]
    pub session_expiry: Duration,

    /// Address for `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "INGEST_METRICS_ADDR", default_value = "127.0.0.1:9101")]
    pub metrics_addr: SocketAddr,

    #[command(flatten)]
    pub storage: StorageArgs,

    /// Several accounts: each device's messages go to its shard's queue.
    #[command(flatten)]
    pub shards: ShardArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

impl Config {
    /// The subscription filter, shared when a group is set.
    pub fn filter(&self) -> String {
        let plain = format!("{}/+/telemetry", self.topic_prefix);
        if self.share_group.is_empty() {
            plain
        } else {
            format!("$share/{}/{plain}", self.share_group)
        }
    }
}

fn default_client_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".to_owned());
    format!("ingest-{host}")
}
