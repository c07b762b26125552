//! The broker side: connection options, the polling task and the subscribing task.

use crate::config::Config;
use crate::metrics_names as m;
use infra::mqtt::{Connection, Reconnect};
use infra::recent::Recent;
use infra::serve::Health;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, SubscribeReasonCode, UnsubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use rumqttc::Outgoing;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Largest MQTT packet accepted: well above the contract's 32 KiB payload limit and the shipped
/// broker's 256 KiB `max_packet_size`, so an oversize payload arrives and is dead-lettered as
/// `too_large` instead of breaking the connection. (A publish above this limit would fail the
/// event loop before it could be acknowledged, and a persistent session would redeliver it on
/// every reconnect: a poison loop in ingest itself.)
pub const MAX_PACKET_BYTES: u32 = 512 * 1024;

/// Messages remembered as queued but not acknowledged because their connection was lost
/// (about 1.5 MiB): far more than the deliveries one connection can hold unacknowledged.
const REMEMBERED_UNACKED: usize = 65_536;

/// A publish and the connection it arrived on. A PUBACK is only valid on that connection:
/// after a reconnect the broker redelivers unacknowledged messages, and may reuse packet ids.
#[derive(Debug)]
pub struct Delivery {
    pub publish: Publish,
    pub connection: u64,
    pub received_at_ms: i64,
    /// Packet id, topic and payload, hashed: what a redelivery of the same message shares.
    pub fingerprint: u64,
    /// A redelivery of a message the queue already holds (this process wrote it, but its
    /// connection was lost before the PUBACK): acknowledge it without writing it again.
    pub already_queued: bool,
}

/// A resumed session redelivers a message under its packet id, so the id is part of it.
fn fingerprint(publish: &Publish) -> u64 {
    let mut h = DefaultHasher::new();
    publish.pkid.hash(&mut h);
    publish.topic.hash(&mut h);
    publish.payload.hash(&mut h);
    h.finish()
}

/// The number of the broker connection, changed by the poller whenever one ends or begins.
///
/// A PUBACK is queued on the client's request channel only under this lock and only while the
/// delivery's connection is still the current one. On a connection error the poller changes
/// the number under it, then has the event loop drop every PUBACK still queued (`clean`), so
/// no PUBACK of the lost connection reaches another. It changes the number again at ConnAck,
/// before it asks for the subscription.
#[derive(Debug, Clone, Default)]
struct Connections(Arc<Mutex<u64>>);

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn current(&self) -> u64 {
        *self.lock()
    }

    fn advance(&self) {
        *self.lock() += 1;
    }

    /// Runs `send` while `connection` is the current one; `None` when it is not.
    fn while_current<T>(&self, connection: u64, send: impl FnOnce() -> T) -> Option<T> {
        let current = self.lock();
        (*current == connection).then(send)
    }
}

/// Deliveries whose envelope the queue holds, in order of receipt: they may be acknowledged.
pub type Acks = mpsc::UnboundedSender<Vec<Delivery>>;

/// The client handle plus the tasks that drive it.
pub struct Mqtt {
    client: AsyncClient,
    stop: CancellationToken,
    poller: JoinHandle<()>,
    subscriber: JoinHandle<()>,
    acker: JoinHandle<()>,
}

/// Leaving the share group for good (a replica about to be removed). `requested` is
/// cancelled to unsubscribe; the rest is what tells whether this replica still owes the
/// broker anything, kept by the poller and the acker.
#[derive(Debug, Clone, Default)]
pub struct Leave {
    pub requested: CancellationToken,
    /// Cancelled once the broker confirmed the unsubscribe (or had no such subscription).
    pub unsubscribed: CancellationToken,
    pub connected: Arc<AtomicBool>,
    /// Deliveries received and not yet acknowledged, nor given back to the broker by a lost
    /// connection (it redelivers those: each comes again, and counts again).
    pub owed: Arc<AtomicI64>,
    /// When a message, a ConnAck or the first UnsubAck last arrived: the broker may still be
    /// delivering what it holds for this session until some time after.
    pub last_event_ms: Arc<AtomicI64>,
    /// Proof that the broker has read every PUBACK: see [`Confirm`].
    pub confirm: Confirm,
}

/// A PUBACK handed to the client is not yet read by the broker: a connection that dies
/// silently loses it, and the broker keeps that message in the session. An unsubscribe queued
/// after the last PUBACK travels behind it on the same connection, so its UnsubAck proves the
/// broker read them all.
///
/// `tick` orders requests: the acker takes a number after queuing PUBACKs, and a confirmation
/// takes one before its unsubscribe is queued. A confirmation counts only if no PUBACK was
/// queued after it, its UnsubAck has arrived, and the connection is the one it was sent on.
#[derive(Debug, Clone, Default)]
pub struct Confirm {
    tick: Arc<AtomicU64>,
    last_ack: Arc<AtomicU64>,
    /// Successful UnsubAcks received.
    pub unsubacks: Arc<AtomicU64>,
    /// ConnAcks received: a confirmation sent on an earlier connection proves nothing.
    pub connects: Arc<AtomicU64>,
    /// Asks the subscriber to send one more unsubscribe.
    request: Arc<Notify>,
}

/// A confirmation in flight: what was true when it was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked {
    tick: u64,
    unsubacks: u64,
    connects: u64,
}

impl Confirm {
    fn acks_queued(&self) {
        let tick = self.tick.fetch_add(1, Ordering::SeqCst) + 1;
        self.last_ack.store(tick, Ordering::SeqCst);
    }

    /// Takes a number and asks for an unsubscribe behind every PUBACK queued so far.
    pub fn ask(&self) -> Asked {
        let asked = Asked {
            tick: self.tick.fetch_add(1, Ordering::SeqCst) + 1,
            unsubacks: self.unsubacks.load(Ordering::SeqCst),
            connects: self.connects.load(Ordering::SeqCst),
        };
        self.request.notify_one();
        asked
    }

    /// Whether `asked` still stands (no PUBACK queued since, same connection) and whether
    /// its answer has arrived.
    pub fn state(&self, asked: Asked) -> Confirmation {
        if self.last_ack.load(Ordering::SeqCst) > asked.tick
            || self.connects.load(Ordering::SeqCst) != asked.connects
        {
            Confirmation::Stale
        } else if self.unsubacks.load(Ordering::SeqCst) > asked.unsubacks {
            Confirmation::Confirmed
        } else {
            Confirmation::Waiting
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmation {
    /// The broker has read every PUBACK queued before it was asked, and none came after.
    Confirmed,
    Waiting,
    /// Superseded by a later PUBACK or a new connection: ask again.
    Stale,
}

impl Leave {
    fn event_at(&self, now_ms: i64) {
        self.last_event_ms.store(now_ms, Ordering::Relaxed);
    }

    fn event(&self) {
        self.event_at(schemas::timefmt::now_ms());
    }
}

/// Starts the connection. Deliveries arrive on the returned receiver; whatever is sent on the
/// returned [`Acks`] is acknowledged to the broker.
pub fn connect(
    config: &Config,
    broker: &Connection,
    health: Health,
    leave: Leave,
) -> (Mqtt, mpsc::UnboundedReceiver<Delivery>, Acks) {
    let mut options = broker.options(config.client_id.clone());
    let session_expiry = u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_start(false)
        .set_session_expiry_interval(Some(session_expiry))
        .set_manual_acks(true)
        .set_receive_maximum(Some(config.receive_maximum))
        .set_max_packet_size(Some(MAX_PACKET_BYTES));
    // Every unacknowledged delivery can produce one PUBACK request; with room for all of them
    // the packer never waits on the request channel.
    let capacity = usize::from(config.receive_maximum) + 64;
    let (client, mut eventloop) = AsyncClient::new(options, capacity);
    // Unbounded, so the poller never stops polling: a poller waiting for the packer sends no
    // keep-alive, the broker drops the connection, and every delivery in flight becomes
    // unacknowledgeable (under sustained overload, a livelock of redeliveries). What bounds the
    // deliveries held is the Receive Maximum the broker honours.
    let (tx, publishes) = mpsc::unbounded_channel();
    let connections = Connections::default();
    // Fingerprints of messages written to the queue whose PUBACK could not be sent: when the
    // broker redelivers one, the packer acknowledges it without queuing a duplicate.
    let unacked = Arc::new(Mutex::new(Recent::new(REMEMBERED_UNACKED)));
    let connected = Arc::new(Notify::new());
    let stop = CancellationToken::new();
    // Cancelled when the poller ends: nothing drains the request channel after that.
    let poller_gone = CancellationToken::new();

    let poller = {
        let (connections, unacked, connected, stop, health, url) = (
            connections.clone(),
            unacked.clone(),
            connected.clone(),
            stop.clone(),
            health.clone(),
            broker.url.clone(),
        );
        let leave = leave.clone();
        let gone = poller_gone.clone().drop_guard();
        tokio::spawn(async move {
            let _gone = gone;
            let mut reconnect = Reconnect::default();
            // Looked up once: a lookup per message was a measurable part of its CPU.
            let received = metrics::counter!(m::RECEIVED);
            let received_bytes = metrics::counter!(m::RECEIVED_BYTES);
            let redelivered = metrics::counter!(m::REDELIVERED);
            loop {
                let event = tokio::select! {
                    _ = stop.cancelled() => break,
                    event = eventloop.poll() => event,
                };
                match event {
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let received_at_ms = schemas::timefmt::now_ms();
                        received.increment(1);
                        leave.owed.fetch_add(1, Ordering::Relaxed);
                        leave.event_at(received_at_ms);
                        received_bytes.increment(publish.payload.len() as u64);
                        if publish.dup {
                            redelivered.increment(1);
                        }
                        let fingerprint = fingerprint(&publish);
                        let already_queued = publish.dup
                            && unacked
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .take(fingerprint);
                        let delivery = Delivery {
                            publish,
                            connection: connections.current(),
                            received_at_ms,
                            fingerprint,
                            already_queued,
                        };
                        if tx.send(delivery).is_err() {
                            break;
                        }
                    }
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        reconnect.connected();
                        leave.confirm.connects.fetch_add(1, Ordering::SeqCst);
                        leave.connected.store(true, Ordering::Relaxed);
                        leave.event();
                        connections.advance();
                        if !ack.session_present {
                            // A new session redelivers nothing: what was remembered is stale.
                            unacked
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .clear();
                        }
                        tracing::info!(
                            session_present = ack.session_present,
                            "Connected to the broker."
                        );
                        connected.notify_one();
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        match ack
                            .return_codes
                            .iter()
                            .find(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                        {
                            None => {
                                tracing::info!("Subscribed.");
                                health.set_ready();
                            }
                            Some(code) => {
                                tracing::error!(
                                    ?code,
                                    "The broker refused the subscription; no messages will arrive."
                                );
                                health.set_not_ready(format!("subscription refused: {code:?}"));
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::UnsubAck(ack))) => {
                        // A confirmation's answer is not news from the broker.
                        let first = !leave.unsubscribed.is_cancelled();
                        if first {
                            leave.event();
                        }
                        match ack.reasons.iter().find(|r| {
                            !matches!(
                                r,
                                UnsubAckReason::Success | UnsubAckReason::NoSubscriptionExisted
                            )
                        }) {
                            None => {
                                if first {
                                    tracing::info!("Unsubscribed from the share group: the broker deals this replica no new messages.");
                                }
                                // Connected, and meant to receive nothing new (no SubAck
                                // will come to say so).
                                health.set_ready();
                                leave.confirm.unsubacks.fetch_add(1, Ordering::SeqCst);
                                leave.unsubscribed.cancel();
                            }
                            Some(reason) => {
                                tracing::error!(?reason, "The broker refused to let this replica leave its share group; it is still dealt messages.");
                                health.fail(
                                    crate::LEAVE_HEALTH,
                                    format!("leaving the share group was refused: {reason:?}"),
                                );
                            }
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(error) => {
                        // The connection is gone: deliveries from it are not acked from now on
                        // (see `Connections`). Its messages are redelivered.
                        connections.advance();
                        leave.connected.store(false, Ordering::Relaxed);
                        // The event loop dropped the PUBACKs queued before the error; this drops
                        // those the acker queued since, before the number changed.
                        eventloop.clean();
                        metrics::counter!(m::CONNECTION_ERRORS).increment(1);
                        let (failure, why) = infra::mqtt::describe(&url, &error);
                        health.set_not_ready(format!("broker: {why}"));
                        let delay = reconnect.delay(failure);
                        tracing::warn!(error = %why, retry_in = ?delay, "Broker connection failed.");
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        })
    };

    // Subscribing from the poller could deadlock on a full request channel, so it happens here.
    // After a leave request every connect unsubscribes instead (again, in case the connection
    // that carried the first request was lost before the broker read it).
    let subscriber = {
        let (client, filter, stop) = (client.clone(), config.filter(), stop.clone());
        let (requested, confirm) = (leave.requested.clone(), leave.confirm.request.clone());
        tokio::spawn(async move {
            let mut leaving = false;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = connected.notified() => {}
                    _ = requested.cancelled(), if !leaving => leaving = true,
                    _ = confirm.notified(), if leaving => {}
                }
                let request = if leaving {
                    tracing::info!(%filter, "Leaving the share group.");
                    client.unsubscribe(filter.clone()).await
                } else {
                    tracing::debug!(%filter, "Subscribing.");
                    client.subscribe(filter.clone(), QoS::AtLeastOnce).await
                };
                if let Err(error) = request {
                    tracing::warn!(%error, "Cannot request the subscription change.");
                }
            }
        })
    };

    // Acks go through their own task so that the packer never waits on the client's request
    // channel: that channel drains only while the poller polls, and the poller may itself be
    // waiting for the packer to take a delivery. (A broker may send more unacknowledged
    // messages than the Receive Maximum asks for, so capacity alone cannot rule this out.)
    let (acks, mut to_ack) = mpsc::unbounded_channel::<Vec<Delivery>>();
    let acker = {
        let (client, owed, confirm) = (client.clone(), leave.owed.clone(), leave.confirm.clone());
        tokio::spawn(async move {
            while let Some(deliveries) = to_ack.recv().await {
                let mut acked = 0u64;
                for delivery in deliveries {
                    owed.fetch_sub(1, Ordering::Relaxed);
                    // A delivery from an earlier connection is not acked: the broker
                    // redelivers it. The queue holds it already, which is remembered so that
                    // the redelivered copy is acknowledged without being queued again.
                    loop {
                        let sent = connections.while_current(delivery.connection, || {
                            client.try_ack(&delivery.publish).is_ok()
                        });
                        match sent {
                            None => {
                                unacked
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .remember(delivery.fingerprint);
                                break;
                            }
                            Some(true) => {
                                acked += 1;
                                break;
                            }
                            // The request channel is full (it drains as the poller polls).
                            Some(false) => tokio::select! {
                                _ = poller_gone.cancelled() => {
                                    metrics::counter!(m::ACKED).increment(acked);
                                    return;
                                }
                                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                            },
                        }
                    }
                }
                // After the PUBACKs are queued: a confirmation asked before this is stale.
                confirm.acks_queued();
                metrics::counter!(m::ACKED).increment(acked);
            }
        })
    };

    let mqtt = Mqtt {
        client,
        stop,
        poller,
        subscriber,
        acker,
    };
    (mqtt, publishes, acks)
}

impl Mqtt {
    /// Gives the poller `grace` to send queued PUBACKs, disconnects, and stops the tasks.
    /// Call it after the packer (the holder of [`Acks`]) has finished.
    pub async fn close(self, grace: Duration) {
        let Mqtt {
            client,
            stop,
            poller,
            subscriber,
            acker,
        } = self;
        // Every sender is gone once the packer has stopped, so the acker ends after queuing
        // the last acks.
        let _ = tokio::time::timeout(grace, acker).await;
        // The disconnect request queues behind the acks, so the acks go out first; the poller
        // ends when it sees the disconnect leave. The timeout covers a broker that is gone.
        let _ = tokio::time::timeout(grace, client.disconnect()).await;
        let mut poller = poller;
        if tokio::time::timeout(grace, &mut poller).await.is_err() {
            stop.cancel();
            let _ = poller.await;
        }
        stop.cancel();
        let _ = subscriber.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confirmation_counts_only_if_answered_after_the_last_puback_on_its_connection() {
        let confirm = Confirm::default();
        confirm.acks_queued();
        let asked = confirm.ask();
        assert_eq!(confirm.state(asked), Confirmation::Waiting);
        confirm.unsubacks.fetch_add(1, Ordering::SeqCst);
        assert_eq!(confirm.state(asked), Confirmation::Confirmed);

        // A PUBACK queued after the question may still be unread: ask again.
        confirm.acks_queued();
        assert_eq!(confirm.state(asked), Confirmation::Stale);
        let asked = confirm.ask();
        assert_eq!(confirm.state(asked), Confirmation::Waiting);

        // The answer to an unsubscribe sent on a lost connection proves nothing about this one.
        confirm.connects.fetch_add(1, Ordering::SeqCst);
        confirm.unsubacks.fetch_add(1, Ordering::SeqCst);
        assert_eq!(confirm.state(asked), Confirmation::Stale);
    }
}
