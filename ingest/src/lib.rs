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
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// After leaving its share group, how long a replica must receive nothing before it says it
/// can be stopped: the broker delivers what it had queued for this session at once.
pub const LEAVE_QUIET: Duration = Duration::from_secs(5);

/// The longest ingest takes to stop after SIGTERM: the packer's grace for the last
/// envelopes, then up to three waits of [`CLOSE_GRACE`] to send the last acknowledgements and
/// leave the broker.
pub const MAX_SHUTDOWN: Duration =
    Duration::from_secs(packer::SHUTDOWN_GRACE.as_secs() + 3 * CLOSE_GRACE.as_secs());

/// Each step of closing the broker connection.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

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

    let leave = mqtt::Leave::default();
    tokio::spawn(leave_on_request(
        config.share_group.clone(),
        leave.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    let (mqtt, publishes, acks) = mqtt::connect(&config, &broker, health.clone(), leave);
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
    mqtt.close(CLOSE_GRACE).await;
    tracing::info!("Ingest stopped.");
    outcome
}

/// On SIGUSR1, leaves the share group for good: the step before a replica is removed (README
/// "Scaling ingest down for good"). A removed replica's persistent session would otherwise
/// keep being dealt its share of the messages, to wait for a client that never returns. The
/// replica goes on writing and acknowledging what it holds and what the broker had queued
/// for it; once nothing has arrived for [`LEAVE_QUIET`], `/readyz` says it can be stopped.
/// Ignored without a share group: a plain subscription is the only one, and dropping it would
/// route every reading nowhere.
async fn leave_on_request(
    group: String,
    leave: mqtt::Leave,
    health: Health,
    shutdown: CancellationToken,
) {
    const KEY: &str = "share group";
    if !leave_requested(&group, &shutdown).await {
        return;
    }
    // Ready until done, so that "not ready" is the operator's signal to stop it.
    leave.requested.cancel();
    leave.unsubscribed.cancelled().await;
    let quiet_ms = i64::try_from(LEAVE_QUIET.as_millis()).unwrap_or(i64::MAX);
    loop {
        let since = schemas::timefmt::now_ms() - leave.last_publish_ms.load(Ordering::Relaxed);
        if since >= quiet_ms {
            break;
        }
        let wait = u64::try_from(quiet_ms - since).unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    metrics::gauge!(metrics_names::LEFT_SHARE_GROUP).set(1.0);
    tracing::info!("Left the share group and received nothing since: stop this replica for good.");
    health.fail(
        KEY,
        "left the share group: nothing more will arrive; stop this replica",
    );
}

/// Waits for SIGUSR1 in a share group (false if the service stops first).
async fn leave_requested(group: &str, shutdown: &CancellationToken) -> bool {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
            tracing::warn!("Cannot listen for SIGUSR1; this replica cannot leave its share group.");
            return false;
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = usr1.recv() => {}
            }
            if !group.is_empty() {
                return true;
            }
            tracing::warn!("SIGUSR1 ignored: this replica is not in a share group, and dropping its subscription would route every reading nowhere.");
        }
    }
    #[cfg(not(unix))]
    {
        let _ = group;
        shutdown.cancelled().await;
        false
    }
}
