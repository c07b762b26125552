//! `ingest`: MQTT in, Azure Storage Queue out.
//!
//! It subscribes with QoS 1 under a persistent session (a plain subscription by default, a
//! shared one when replicas split the load; see [`Config::share_group`]), packs device
//! messages into envelopes, and acknowledges each message to the broker only after the queue
//! holds the envelope containing it. Until then the broker keeps the message and redelivers it
//! if this process dies, so a crash can duplicate messages (the table upsert absorbs that) but
//! never lose one.
//!
//! Tasks: the *poller* only polls the rumqttc event loop and forwards publishes over a channel
//! (calling the client from the polling task can deadlock); the *subscriber* re-subscribes after
//! each connect; [`packer::Packer`] packs, writes (several envelopes at once) and acks, in
//! order of receipt. The poller never waits for the packer, so keep-alives flow even under
//! overload. Backpressure is the broker's: it
//! sends at most `receive_maximum` unacknowledged messages, so while the queue is unreachable
//! the packer retries, nothing is acked, and the broker stops sending and queues for us.

mod config;
mod metrics_names;
mod mqtt;
mod packer;

pub use config::Config;

use infra::serve::Health;
use infra::storage::{create_missing, Resource};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Runs ingest until `shutdown`, then flushes what it holds and exits.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let health = Health::new("connecting to the broker");
    let metrics_addr =
        infra::serve::serve_http(config.metrics_addr, health.clone(), shutdown.clone()).await?;
    metrics::gauge!(metrics_names::RECEIVE_MAXIMUM).set(f64::from(config.receive_maximum));
    let account = config.storage.account()?;
    let broker = config.mqtt.connection()?;
    let queue = account.queue(&config.queue_name);
    if broker.sends_password_in_clear() {
        tracing::warn!(broker = %broker.url, "The MQTT password is sent unencrypted; use an mqtts:// URL beyond a trusted network.");
    }
    tracing::info!(
        broker = %broker.url,
        user = broker.username().unwrap_or("(anonymous)"),
        client_id = %config.client_id,
        queue = %config.queue_name,
        queue_endpoint = account.queue_endpoint(),
        account = account.name(),
        filter = %config.filter(),
        %metrics_addr,
        "Ingest starting."
    );
    if !config.share_group.is_empty() {
        tracing::warn!(group = %config.share_group, "Shared subscription: Mosquitto does not restore it after a broker restart, so readings published between the restart and this replica's resubscribe are routed nowhere and lost. Unset INGEST_SHARE_GROUP when one replica runs.");
    }
    let create = config.storage.create_missing;
    if !create_missing(&[Resource::Queue(&queue)], create, &shutdown).await {
        return Ok(());
    }

    let (mqtt, publishes, acks) = mqtt::connect(&config, &broker, health.clone());
    let packer = packer::Packer::new(
        queue,
        acks,
        config.linger,
        config.puts_in_flight,
        create,
        health,
    );
    let outcome = packer.run(publishes, shutdown.clone()).await;

    // Let the poller send the last PUBACKs, then leave the broker cleanly. The session persists,
    // so anything not acknowledged is redelivered to the next ingest.
    mqtt.close(Duration::from_secs(5)).await;
    tracing::info!("Ingest stopped.");
    outcome
}
