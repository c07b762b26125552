//! Packs deliveries into envelopes, writes them to the queue, then acknowledges them.

use crate::metrics_names as m;
use crate::mqtt::{Acks, Delivery};
use infra::retry::Backoff;
use infra::serve::Health;
use infra::storage::Queue;
use schemas::envelope::{DeviceMessage, EnvelopeBuilder, Full};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a shutdown may spend writing the last envelope before giving up on it (the broker
/// still holds those messages, unacknowledged).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub struct Packer {
    queue: Queue,
    acks: Acks,
    linger: Duration,
    health: Health,
    envelope: EnvelopeBuilder,
    /// Deliveries inside `envelope`, to acknowledge once it is written.
    held: Vec<Delivery>,
}

impl Packer {
    pub fn new(queue: Queue, acks: Acks, linger: Duration, health: Health) -> Self {
        Self {
            queue,
            acks,
            linger,
            health,
            envelope: EnvelopeBuilder::default(),
            held: Vec::new(),
        }
    }

    /// Packs until `shutdown`, then writes what it holds (within a grace period).
    pub async fn run(
        mut self,
        mut publishes: mpsc::Receiver<Delivery>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
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
                    self.flush(&shutdown).await;
                    deadline = None;
                }
                delivery = publishes.recv() => {
                    let Some(delivery) = delivery else { break };
                    if self.add(delivery, &shutdown).await && deadline.is_none() {
                        deadline = Some(tokio::time::Instant::now() + self.linger);
                    }
                }
            }
        }
        // Pack what already arrived, so that the broker needs to redeliver as little as possible.
        let grace = CancellationToken::new();
        let give_up = grace.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
            give_up.cancel();
        });
        while let Ok(delivery) = publishes.try_recv() {
            self.add(delivery, &grace).await;
        }
        self.flush(&grace).await;
        timer.abort();
        if !self.held.is_empty() {
            tracing::warn!(
                messages = self.held.len(),
                "Shutdown grace expired before the queue took the last envelope; the broker will redeliver those messages."
            );
        }
        Ok(())
    }

    /// Adds a delivery, writing the current envelope first when it is full. Returns whether
    /// the delivery starts a new envelope.
    async fn add(&mut self, delivery: Delivery, cancel: &CancellationToken) -> bool {
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
            self.flush(cancel).await;
            // `DeviceMessage::from_mqtt` caps sizes so that any one message fits an empty
            // envelope; a unit test in `schemas::envelope` holds that line.
            self.envelope
                .push(message)
                .expect("a single capped device message fits an empty envelope");
        }
        self.held.push(delivery);
        metrics::gauge!(m::PENDING).set(self.held.len() as f64);
        self.held.len() == 1
    }

    /// Writes the envelope, retrying until the queue takes it or `cancel`; then acks.
    async fn flush(&mut self, cancel: &CancellationToken) {
        if self.envelope.is_empty() {
            return;
        }
        let text = self.envelope.finish();
        let started = Instant::now();
        let mut backoff = Backoff::default();
        loop {
            match self.queue.put(text.clone()).await {
                Ok(()) => break,
                Err(error) => {
                    metrics::counter!(m::PUT_FAILURES).increment(1);
                    self.health
                        .set_not_ready(format!("queue {} unavailable: {error}", self.queue.name()));
                    if error.status() == Some(404) {
                        let _ = self.queue.create_if_missing().await;
                    }
                    let delay = backoff.next_delay();
                    if backoff.attempts() == 1 || backoff.attempts() % 10 == 0 {
                        tracing::warn!(%error, attempts = backoff.attempts(), held = self.held.len(), "Cannot write an envelope; holding its messages unacknowledged and retrying.");
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        if backoff.attempts() > 0 {
            tracing::info!(
                attempts = backoff.attempts(),
                "The queue is writable again."
            );
            self.health.set_ready();
        }
        metrics::histogram!(m::PUT_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::counter!(m::ENVELOPES).increment(1);
        metrics::histogram!(m::ENVELOPE_MESSAGES).record(self.held.len() as f64);
        // The acker only ends after the packer, so this send cannot fail while it matters.
        let _ = self.acks.send(std::mem::take(&mut self.held));
        metrics::gauge!(m::PENDING).set(0.0);
    }
}
