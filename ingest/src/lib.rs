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
use infra::storage::{create_missing, Grant, Queue, Resource};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What ingest may do with a SAS minted from an account key: add messages.
const STORAGE_GRANT: Grant = Grant {
    services: "q",
    resource_types: "o",
    permissions: "a",
};

/// After leaving its share group, how long a replica must have had nothing owed and nothing
/// arriving before it says it can be stopped. The broker sends what it queued for the session
/// as acknowledgements free its in-flight window, so a gap this long means it has no more.
pub const LEAVE_QUIET: Duration = Duration::from_secs(5);

/// The readiness key of leaving the share group.
const LEAVE_HEALTH: &str = "share group";

/// The longest ingest takes to stop after SIGTERM: the packer's grace for the last
/// envelopes, then up to three waits of [`CLOSE_GRACE`] to send the last acknowledgements and
/// leave the broker.
pub const MAX_SHUTDOWN: Duration =
    Duration::from_secs(packer::SHUTDOWN_GRACE.as_secs() + 3 * CLOSE_GRACE.as_secs());

/// Each step of closing the broker connection.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Runs ingest until `shutdown`, then flushes what it holds and exits.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Before anything can wait: SIGUSR1's default action would end the process.
    let leave_signal = leave_signal();
    let health = Health::new("connecting to the broker");
    let metrics_addr =
        infra::serve::serve_http(config.metrics_addr, health.clone(), shutdown.clone()).await?;
    metrics::gauge!(metrics_names::RECEIVE_MAXIMUM).set(f64::from(config.receive_maximum));
    let accounts = config.storage.accounts(&config.shards, STORAGE_GRANT)?;
    let broker = config.mqtt.connection()?;
    let queues: Vec<Queue> = accounts
        .iter()
        .map(|a| a.queue(&config.queue_name))
        .collect();
    if broker.sends_password_in_clear() {
        tracing::warn!(broker = %broker.url, "The MQTT password is sent unencrypted; use an mqtts:// URL beyond a trusted network.");
    }
    tracing::info!(
        broker = %broker.url,
        user = broker.username().unwrap_or("(anonymous)"),
        client_id = %config.client_id,
        queue = %config.queue_name,
        queue_endpoint = accounts[0].queue_endpoint(),
        account = accounts[0].name(),
        shards = accounts.len(),
        filter = %config.filter(),
        %metrics_addr,
        "Ingest starting."
    );
    for (shard, account) in accounts.iter().enumerate().skip(1) {
        tracing::info!(
            shard,
            queue_endpoint = account.queue_endpoint(),
            account = account.name(),
            "Shard."
        );
    }
    if !config.share_group.is_empty() {
        tracing::warn!(group = %config.share_group, "Shared subscription: Mosquitto does not restore it after a broker restart, so readings published between the restart and this replica's resubscribe are routed nowhere and lost. Unset INGEST_SHARE_GROUP when one replica runs.");
    }
    let create = config.storage.create_missing;
    // With several shards, one account down at start must not keep the others from flowing:
    // each packer creates its queue when a write finds it missing.
    if queues.len() == 1 && !create_missing(&[Resource::Queue(&queues[0])], create, &shutdown).await
    {
        return Ok(());
    }

    let leave = mqtt::Leave::default();
    tokio::spawn(leave_on_request(
        leave_signal,
        config.share_group.clone(),
        leave.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    let (mqtt, publishes, acks) = mqtt::connect(&config, &broker, health.clone(), leave);
    let count = queues.len();
    let packer = |(shard, queue): (usize, Queue)| {
        packer::Packer::new(
            queue,
            acks.clone(),
            config.linger,
            config.puts_in_flight,
            create,
            health.clone(),
            packer::Shard::new(shard, count),
        )
    };
    let mut packers: Vec<packer::Packer> = queues.into_iter().enumerate().map(packer).collect();
    drop(acks);
    let (outcome, router) = if count == 1 {
        let one = packers.pop().expect("one shard");
        (one.run(publishes, shutdown.clone()).await, None)
    } else {
        let (outcome, router) =
            run_shards(packers, publishes, &config.topic_prefix, &shutdown).await;
        (outcome, Some(router))
    };

    // Let the poller send the last PUBACKs, then leave the broker cleanly. The session persists,
    // so anything not acknowledged is redelivered to the next ingest.
    mqtt.close(CLOSE_GRACE).await;
    if let Some(router) = router {
        router.abort();
    }
    tracing::info!("Ingest stopped.");
    outcome
}

/// Runs a packer per shard, each on its own task, and deals each delivery to its device's
/// shard ([`schemas::shard`]). A shard whose queue cannot be written holds back only its own
/// deliveries: the others are written and acknowledged meanwhile (within the broker's
/// Receive Maximum of unacknowledged messages, which the held ones use up). So PUBACKs leave
/// in order of receipt within a shard, not across shards, which MQTT asks for (4.6) and which
/// brokers do not need: they match a PUBACK by its packet id.
///
/// Returns when every packer has stopped, with the router still taking deliveries (and
/// dropping them, unacknowledged: the broker redelivers them), so that the MQTT poller keeps
/// running to send the last PUBACKs; the caller ends the router after closing the broker
/// connection.
async fn run_shards(
    packers: Vec<packer::Packer>,
    mut publishes: mpsc::UnboundedReceiver<mqtt::Delivery>,
    topic_prefix: &str,
    shutdown: &CancellationToken,
) -> (anyhow::Result<()>, tokio::task::JoinHandle<()>) {
    let mut senders = Vec::with_capacity(packers.len());
    let mut tasks = tokio::task::JoinSet::new();
    for packer in packers {
        let (send, receive) = mpsc::unbounded_channel();
        senders.push(send);
        tasks.spawn(packer.run(receive, shutdown.clone()));
    }
    let prefix = topic_prefix.to_owned();
    let router = tokio::spawn(async move {
        while let Some(delivery) = publishes.recv().await {
            // A topic that names no device goes to the first shard, whose processor
            // dead-letters it.
            let topic = String::from_utf8_lossy(&delivery.publish.topic);
            let shard = schemas::reading::device_id_from_topic(&prefix, &topic)
                .map_or(0, |id| schemas::shard::of(id, senders.len()));
            // A send fails only once that packer has stopped: the delivery stays
            // unacknowledged.
            let _ = senders[shard].send(delivery);
        }
    });
    let mut outcome = Ok(());
    while let Some(done) = tasks.join_next().await {
        let result = done.map_err(anyhow::Error::from).and_then(|r| r);
        if outcome.is_ok() {
            outcome = result;
        }
    }
    (outcome, router)
}

/// On SIGUSR1, leaves the share group for good: the step before a replica is removed (docs/deployment.md,
/// "Scaling ingest down for good"). A removed replica's persistent session would otherwise
/// keep being dealt its share of the messages, to wait for a client that never returns. The
/// replica unsubscribes, goes on writing and acknowledging what it holds and what the broker
/// had queued for it, and `/readyz` says it can be stopped only while it is connected, owes
/// the broker nothing and has received nothing for [`LEAVE_QUIET`], and the broker has
/// answered a request sent behind its last PUBACK (a disconnect or a late message withdraws
/// that). Ignored without a share group: a plain subscription is the only
/// one, and dropping it would route every reading nowhere.
async fn leave_on_request(
    signal: Option<LeaveSignal>,
    group: String,
    leave: mqtt::Leave,
    health: Health,
    shutdown: CancellationToken,
) {
    if !leave_requested(signal, &group, &shutdown).await {
        return;
    }
    // Ready until drained, so that this replica's "not ready" is the operator's signal.
    leave.requested.cancel();
    let quiet_ms = i64::try_from(LEAVE_QUIET.as_millis()).unwrap_or(i64::MAX);
    let mut drained = false;
    let mut asked: Option<mqtt::Asked> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let since = schemas::timefmt::now_ms() - leave.last_event_ms.load(Ordering::Relaxed);
        let quiet = leave.unsubscribed.is_cancelled()
            && leave.connected.load(Ordering::Relaxed)
            && leave.owed.load(Ordering::Relaxed) <= 0
            && since >= quiet_ms;
        // Quiet is not enough: the last PUBACKs may sit unread in a dead connection. The
        // broker answering an unsubscribe sent behind them proves it has them.
        let confirmation = asked.map(|a| leave.confirm.state(a));
        if quiet && matches!(confirmation, None | Some(mqtt::Confirmation::Stale)) {
            asked = Some(leave.confirm.ask());
        }
        let now_drained = quiet && confirmation == Some(mqtt::Confirmation::Confirmed);
        if now_drained == drained {
            continue;
        }
        drained = now_drained;
        if drained {
            metrics::gauge!(metrics_names::LEFT_SHARE_GROUP).set(1.0);
            tracing::info!(
                "Left the share group and owe the broker nothing: stop this replica for good."
            );
            health.fail(
                LEAVE_HEALTH,
                "left the share group: nothing more will arrive; stop this replica",
            );
        } else {
            metrics::gauge!(metrics_names::LEFT_SHARE_GROUP).set(0.0);
            tracing::info!("More arrived, or the broker connection dropped: not drained yet; do not stop this replica.");
            health.recover(LEAVE_HEALTH);
        }
    }
}

#[cfg(unix)]
type LeaveSignal = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type LeaveSignal = ();

/// Listens for SIGUSR1 from now on (`None` where it cannot).
fn leave_signal() -> Option<LeaveSignal> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::user_defined1()) {
            Ok(usr1) => Some(usr1),
            Err(error) => {
                tracing::warn!(%error, "Cannot listen for SIGUSR1; this replica cannot leave its share group.");
                None
            }
        }
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Waits for SIGUSR1 in a share group (false if the service stops first).
async fn leave_requested(
    signal: Option<LeaveSignal>,
    group: &str,
    shutdown: &CancellationToken,
) -> bool {
    #[cfg(unix)]
    if let Some(mut usr1) = signal {
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
    let _ = (signal, group);
    shutdown.cancelled().await;
    false
}
