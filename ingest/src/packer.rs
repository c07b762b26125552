//! Packs deliveries into envelopes, writes them to the queue, then acknowledges them.
//!
//! Up to `puts_in_flight` envelopes are written at once (one storage round trip per envelope
//! would otherwise cap ingest at 1/latency envelopes per second). Acknowledgements still leave
//! in order of receipt, as MQTT requires: a written envelope's messages wait for every earlier
//! envelope to be written too.

use crate::metrics_names as m;
use crate::mqtt::{Acks, Delivery};
use futures::stream::{FuturesOrdered, StreamExt};
use infra::retry::Backoff;
use infra::serve::Health;
use infra::storage::Queue;
use schemas::envelope::{DeviceMessage, EnvelopeBuilder, Full};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a shutdown may spend writing the last envelopes before giving up on them (the
/// broker still holds those messages, unacknowledged).
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// One envelope being written: its deliveries, `Ok` once the queue holds it, `Err` when the
/// write was abandoned (shutdown grace over).
type Write = Pin<Box<dyn Future<Output = Result<Vec<Delivery>, Vec<Delivery>>> + Send>>;

pub struct Packer {
    queue: Queue,
    acks: Acks,
    linger: Duration,
    /// Whether a missing queue may be created (`STORAGE_CREATE_MISSING`).
    create_missing: bool,
    health: Health,
    /// The shard whose queue this is: readiness and metrics say which one fails.
    shard: Shard,
    envelope: EnvelopeBuilder,
    /// Deliveries inside `envelope`, to acknowledge once it is written.
    held: Vec<Delivery>,
    /// Envelopes being written, oldest first.
    writing: FuturesOrdered<Write>,
    puts_in_flight: usize,
    /// Cancelled when the shutdown grace is over: writes still retrying give up.
    abandon: CancellationToken,
    /// What ends a wait for a free write slot: the shutdown signal, then the grace's end.
    interrupt: CancellationToken,
    /// Messages of abandoned writes and of every write after one: never acknowledged here
    /// (acks go in order), so the broker redelivers them.
    unacknowledged: usize,
    /// Deliveries held, not yet acknowledged (looked up once, changed per message).
    pending: metrics::Gauge,
}

/// Which shard a packer writes to, as readiness and metrics name it.
#[derive(Debug, Clone)]
pub struct Shard {
    /// Its readiness key: `queue`, or `queue of shard N` among several.
    key: &'static str,
    /// Its metrics label value.
    label: String,
}

impl Shard {
    /// Shard `index` of `count`; made once per shard at start (the key lives as long as the
    /// process, as readiness keys do).
    pub fn new(index: usize, count: usize) -> Self {
        let key = if count <= 1 {
            "queue"
        } else {
            Box::leak(format!("queue of shard {index}").into_boxed_str())
        };
        Self {
            key,
            label: index.to_string(),
        }
    }
}

impl Packer {
    pub fn new(
        queue: Queue,
        acks: Acks,
        linger: Duration,
        puts_in_flight: usize,
        create_missing: bool,
        health: Health,
        shard: Shard,
    ) -> Self {
        Self {
            queue,
            acks,
            linger,
            create_missing,
            health,
            shard,
            envelope: EnvelopeBuilder::default(),
            held: Vec::new(),
            writing: FuturesOrdered::new(),
            puts_in_flight: puts_in_flight.max(1),
            abandon: CancellationToken::new(),
            interrupt: CancellationToken::new(),
            unacknowledged: 0,
            pending: metrics::gauge!(m::PENDING),
        }
    }

    /// Packs until `shutdown`, then writes what it holds (within a grace period).
    pub async fn run(
        mut self,
        mut publishes: mpsc::UnboundedReceiver<Delivery>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        self.interrupt = shutdown.clone();
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let linger = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = linger => {
                    // Interrupted only by the shutdown, which the next turn handles.
                    self.flush().await;
                    deadline = None;
                }
                Some(written) = self.writing.next(), if !self.writing.is_empty() => {
                    self.settle(written);
                }
                delivery = publishes.recv() => {
                    let Some(delivery) = delivery else { break };
                    if self.add(delivery).await && deadline.is_none() {
                        deadline = Some(tokio::time::Instant::now() + self.linger);
                    }
                }
            }
        }
        // Pack what already arrived, so that the broker needs to redeliver as little as possible,
        // and finish the writes in flight, all within the grace period.
        self.interrupt = self.abandon.clone();
        let give_up = self.abandon.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
            give_up.cancel();
        });
        while let Ok(delivery) = publishes.try_recv() {
            self.add(delivery).await;
        }
        self.flush().await;
        while let Some(written) = self.writing.next().await {
            self.settle(written);
        }
        timer.abort();
        let unacknowledged = self.unacknowledged + self.held.len();
        if unacknowledged > 0 {
            tracing::warn!(
                messages = unacknowledged,
                "Shutdown grace expired before the queue took the last envelopes; the broker will redeliver those messages."
            );
        }
        Ok(())
    }

    /// Adds a delivery, writing the current envelope first when it is full. Returns whether
    /// the delivery starts a new envelope.
    async fn add(&mut self, delivery: Delivery) -> bool {
        if delivery.already_queued {
            // Acknowledged in order, with the envelope now being filled.
            metrics::counter!(m::ALREADY_QUEUED).increment(1);
            return self.hold(delivery);
        }
        let message = DeviceMessage::from_mqtt(
            &String::from_utf8_lossy(&delivery.publish.topic),
            &delivery.publish.payload,
            delivery.received_at_ms,
        );
        let message = match self.envelope.push(message) {
            Ok(()) => None,
            Err(Full(message)) => Some(message),
        };
        if let Some(message) = message {
            if !self.flush().await {
                // Stopping while every write slot is busy: this message stays unacknowledged
                // (the broker redelivers it), and so does everything after it.
                self.unacknowledged += 1;
                return false;
            }
            // `DeviceMessage::from_mqtt` caps sizes so that any one message fits an empty
            // envelope; a unit test in `schemas::envelope` holds that line.
            self.envelope
                .push(message)
                .expect("a single capped device message fits an empty envelope");
        }
        // The envelope holds the message now (capped at 32 KiB); the ack needs only the packet
        // id, so a held delivery costs bytes, not the publish's size (up to the broker's
        // limit), whatever the devices send.
        self.hold(delivery)
    }

    /// Holds `delivery` until the current envelope is written. Returns whether it starts a
    /// new envelope.
    fn hold(&mut self, mut delivery: Delivery) -> bool {
        delivery.publish.payload = Default::default();
        delivery.publish.topic = Default::default();
        self.held.push(delivery);
        self.pending.increment(1.0);
        self.held.len() == 1
    }

    /// Starts writing the envelope; when `puts_in_flight` are already being written, first
    /// waits for the oldest (and acknowledges it). Returns false, leaving the envelope as it
    /// is, when `interrupt` comes first (storage down at shutdown).
    async fn flush(&mut self) -> bool {
        if self.envelope.is_empty() {
            // Only redeliveries of queued messages, if anything: nothing to write.
            if !self.held.is_empty() {
                let held = std::mem::take(&mut self.held);
                self.writing
                    .push_back(Box::pin(std::future::ready(Ok(held))));
            }
            return true;
        }
        while self.writing.len() >= self.puts_in_flight {
            let interrupt = self.interrupt.clone();
            tokio::select! {
                written = self.writing.next() => match written {
                    Some(written) => self.settle(written),
                    None => break,
                },
                _ = interrupt.cancelled() => return false,
            }
        }
        let text = self.envelope.finish();
        let held = std::mem::take(&mut self.held);
        let (queue, health, abandon, create, shard) = (
            self.queue.clone(),
            self.health.clone(),
            self.abandon.clone(),
            self.create_missing,
            self.shard.clone(),
        );
        self.writing.push_back(Box::pin(async move {
            let to = To {
                queue: &queue,
                health: &health,
                shard: &shard,
                create_missing: create,
            };
            if write(to, text, held.len(), &abandon).await {
                Ok(held)
            } else {
                Err(held)
            }
        }));
        true
    }

    /// Sends a written envelope's deliveries to the acker, unless an earlier write was
    /// abandoned (then they stay unacknowledged, in order).
    fn settle(&mut self, written: Result<Vec<Delivery>, Vec<Delivery>>) {
        let deliveries = match written {
            Ok(deliveries) if self.unacknowledged == 0 => deliveries,
            Ok(deliveries) | Err(deliveries) => {
                self.unacknowledged += deliveries.len();
                return;
            }
        };
        let written = deliveries.iter().filter(|d| !d.already_queued).count();
        if written > 0 {
            metrics::counter!(m::ENVELOPES).increment(1);
            metrics::histogram!(m::ENVELOPE_MESSAGES).record(written as f64);
        }
        self.pending.decrement(deliveries.len() as f64);
        // The acker only ends after the packer, so this send cannot fail while it matters.
        let _ = self.acks.send(deliveries);
    }
}

/// Where an envelope goes, and who hears when it cannot.
struct To<'a> {
    queue: &'a Queue,
    health: &'a Health,
    shard: &'a Shard,
    create_missing: bool,
}

/// Writes one envelope, retrying until the queue takes it (true) or `cancel` (false). Every
/// failure is retried, a refused credential (403) or a missing queue (404) included: those
/// are the operator's to fix, and until then the broker keeps the messages unacknowledged.
async fn write(to: To<'_>, text: String, messages: usize, cancel: &CancellationToken) -> bool {
    let To {
        queue,
        health,
        shard,
        create_missing,
    } = to;
    let started = Instant::now();
    let mut backoff = Backoff::default();
    loop {
        match queue.put(text.clone()).await {
            Ok(()) => break,
            Err(error) => {
                metrics::counter!(m::PUT_FAILURES, "shard" => shard.label.clone()).increment(1);
                health.fail(
                    shard.key,
                    format!("queue {} unavailable: {error}", queue.name()),
                );
                if error.is_not_found() && create_missing {
                    let _ = queue.create_if_missing().await;
                }
                let delay = backoff.next_delay();
                if backoff.attempts() == 1 || backoff.attempts() % 10 == 0 {
                    tracing::warn!(%error, shard = %shard.label, attempts = backoff.attempts(), messages, "Cannot write an envelope; holding its messages unacknowledged and retrying.");
                }
                tokio::select! {
                    _ = cancel.cancelled() => return false,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    if backoff.attempts() > 0 {
        tracing::info!(
            shard = %shard.label,
            attempts = backoff.attempts(),
            "The queue is writable again."
        );
        health.recover(shard.key);
    }
    metrics::histogram!(m::PUT_SECONDS).record(started.elapsed().as_secs_f64());
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use infra::storage::{Account, DEVELOPMENT_STORAGE};
    use rumqttc::v5::mqttbytes::v5::Publish;
    use rumqttc::v5::mqttbytes::QoS;

    fn packer() -> Packer {
        let account =
            Account::from_connection_string(DEVELOPMENT_STORAGE, Duration::from_secs(1)).unwrap();
        let (acks, _) = mpsc::unbounded_channel();
        Packer::new(
            account.queue("unused"),
            acks,
            Duration::from_secs(60),
            1,
            false,
            Health::new("test"),
            Shard::new(0, 1),
        )
    }

    fn delivery(payload: Vec<u8>, already_queued: bool) -> Delivery {
        let mut publish = Publish::new("devices/d-1/telemetry", QoS::AtLeastOnce, payload, None);
        publish.pkid = 7;
        Delivery {
            publish,
            connection: 1,
            received_at_ms: 0,
            fingerprint: 0,
            already_queued,
        }
    }

    #[tokio::test]
    async fn a_held_delivery_keeps_its_packet_id_not_its_publish() {
        // 200 KiB, as a hostile device may send within the broker's limit: held until its
        // envelope is written, it must cost bytes, not the publish.
        let mut p = packer();
        p.add(delivery(vec![b'x'; 200 * 1024], false)).await;
        p.add(delivery(b"{}".to_vec(), true)).await;
        assert_eq!(p.held.len(), 2);
        for held in &p.held {
            assert!(held.publish.payload.is_empty());
            assert!(held.publish.topic.is_empty());
            assert_eq!(held.publish.pkid, 7);
        }
        // The redelivery of a queued message adds nothing to the envelope.
        assert_eq!(p.envelope.len(), 1);
    }
}
