//! `simulator`: N sensors publishing the device contract over MQTT, for demos and load tests.
//!
//! Each device publishes once per interval at its own phase, so load is spread evenly (or as
//! fast as the broker takes it, with `--flat-out`). Every message is a pure function of
//! (seed, device, tick) ([`sensor`]), faults included ([`faults`]), and every message is
//! counted ([`tally`]), so a test can check the pipeline's rows and dead letters exactly.

mod config;
mod faults;
mod metrics_names;
mod progress;
mod sensor;
mod tally;

pub use config::Config;
pub use faults::{Fault, Faults};
pub use metrics_names::PUBLISHED;
pub use sensor::{Generator, Message};

use anyhow::Context;
use infra::mqtt::{Connection, Reconnect};
use infra::serve::Health;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use rumqttc::Outgoing;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tally::Tally;
use tokio_util::sync::CancellationToken;

/// How long a stopping connection waits for the broker's last acknowledgements.
const ACK_GRACE: Duration = Duration::from_secs(10);
/// How long the broker keeps a simulated device's session while it is disconnected.
const SESSION_EXPIRY_SECONDS: u32 = 600;
/// File descriptors kept free beyond one per connection.
const SPARE_FDS: u64 = 64;

/// Publishes until `shutdown`, the configured duration or the configured rounds are done.
/// Returns the summary: what was sent, and the rows and dead letters (by reason) the pipeline
/// must make of it.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<serde_json::Value> {
    let shutdown = shutdown.child_token();
    if let Some(duration) = config.duration {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            stop.cancel();
        });
    }
    let broker = config.mqtt.connection()?;
    let device_secret = config.device_secret()?;
    // Per-device identities need per-device connections.
    let connections = match config.connections {
        _ if device_secret.is_some() => config.devices.max(1),
        0 => config.devices.max(1),
        n => n.clamp(1, config.devices.max(1)),
    };
    check_fd_limit(connections)?;
    let health = Health::new("connecting to the broker");
    infra::serve::serve_http(config.metrics_addr, health.clone(), shutdown.clone()).await?;
    let interval = config.effective_interval();
    anyhow::ensure!(
        config.flat_out || interval >= Duration::from_millis(u64::from(config.batch)),
        "the interval ({interval:?}) is too short for {} readings per message",
        config.batch
    );
    tracing::info!(
        devices = config.devices,
        ?interval,
        flat_out = config.flat_out,
        batch = config.batch,
        faults = ?config.faults,
        connections,
        broker = %broker.url,
        identities = if device_secret.is_some() { "per device" } else { "shared" },
        "Simulator starting."
    );
    let generator = Arc::new(Generator {
        seed: config.seed,
        devices: config.devices,
        id_space: config.id_space,
        device_prefix: config.device_prefix.clone(),
        topic_prefix: config.topic_prefix.clone(),
        batch: config.batch,
        // Flat out, a gateway's readings are 1 ms apart, ending at the clock's time.
        interval_ms: if config.flat_out {
            i64::from(config.batch)
        } else {
            interval.as_millis() as i64
        },
        faults: config.faults.clone(),
    });
    let tally = Arc::new(Tally::default());
    let started = std::time::Instant::now();
    let progress = progress::start(tally.clone(), config.log.log_format);
    let mut tasks = tokio::task::JoinSet::new();
    for conn in 0..connections {
        let devices: Vec<usize> = (conn..config.devices).step_by(connections).collect();
        let (broker, client_id) = match &device_secret {
            // One device per connection here: it connects as itself, with its id as client id
            // too (the secure broker binds each device to it).
            Some(secret) => {
                let id = generator.device_id(conn);
                let password = infra::mqtt::device_password(secret, &id);
                (broker.with_credentials(id.clone(), password), id)
            }
            None => (
                broker.clone(),
                format!("simulator-{}-{conn}", std::process::id()),
            ),
        };
        let opens_after = if config.connect_rate > 0.0 {
            Duration::from_secs_f64(conn as f64 / config.connect_rate)
        } else {
            Duration::ZERO
        };
        tasks.spawn(connection(Conn {
            broker,
            client_id,
            opens_after,
            config: config.clone(),
            interval,
            devices,
            generator: generator.clone(),
            tally: tally.clone(),
            health: health.clone(),
            shutdown: shutdown.clone(),
        }));
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a publishing task panicked")??;
    }
    progress.finish().await;
    tracing::info!("Simulator stopped.");
    Ok(tally.summary(started.elapsed().as_secs_f64()))
}

/// Writes `deviceId:password` for every device, one per line (`--print-credentials`).
pub fn print_credentials(config: &Config, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let secret = config.device_secret()?.context(
        "--print-credentials needs SIMULATOR_DEVICE_SECRET or SIMULATOR_DEVICE_SECRET_FILE",
    )?;
    for device in 0..config.devices {
        let id = sensor::device_id(&config.device_prefix, device, config.devices);
        let password = infra::mqtt::device_password(&secret, &id);
        writeln!(out, "{id}:{}", password.expose())?;
    }
    Ok(())
}

/// One connection with one device per connection needs a descriptor each: fail clearly
/// rather than half-connect.
fn check_fd_limit(connections: usize) -> anyhow::Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok());
    let need = connections as u64 + SPARE_FDS;
    if let Some(soft) = soft {
        anyhow::ensure!(
            need <= soft,
            "{connections} MQTT connections need about {need} file descriptors, but this \
             process may open {soft}. Raise the limit (`ulimit -n {need}`) or use fewer \
             connections (--connections)."
        );
    }
    Ok(())
}

struct Conn {
    broker: Connection,
    client_id: String,
    /// When to connect, counted from the start (`--connect-rate`).
    opens_after: Duration,
    config: Config,
    interval: Duration,
    devices: Vec<usize>,
    generator: Arc<Generator>,
    tally: Arc<Tally>,
    health: Health,
    shutdown: CancellationToken,
}

async fn connection(c: Conn) -> anyhow::Result<()> {
    tokio::select! {
        _ = c.shutdown.cancelled() => return Ok(()),
        _ = tokio::time::sleep(c.opens_after) => {}
    }
    let mut options = c.broker.options(c.client_id.clone());
    // A persistent session, as a device that must not lose readings keeps: after a broker
    // restart (which restores sessions from its store) the client resumes it and resends what
    // was not acknowledged. With a clean start, rumqttc drops every unacknowledged and queued
    // publish at the first reconnect to a new session.
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_start(false)
        .set_session_expiry_interval(Some(SESSION_EXPIRY_SECONDS))
        .set_max_packet_size(Some(1024 * 1024));
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    let poll_stop = CancellationToken::new();
    // This connection's acknowledged publishes, to wait for them before disconnecting.
    let acked = Arc::new(AtomicU64::new(0));
    let poller = {
        let stop = poll_stop.clone();
        let (health, tally, acked) = (c.health.clone(), c.tally.clone(), acked.clone());
        let url = c.broker.url.clone();
        tokio::spawn(async move {
            let mut reconnect = Reconnect::default();
            let mut last_failure = None;
            let mut connected_once = false;
            loop {
                let event = tokio::select! {
                    _ = stop.cancelled() => break,
                    event = eventloop.poll() => event,
                };
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        reconnect.connected();
                        last_failure = None;
                        if !connected_once {
                            connected_once = true;
                            tally.connected();
                        }
                        health.set_ready();
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acked.fetch_add(1, Relaxed);
                        tally.acked.fetch_add(1, Relaxed);
                        metrics::counter!(PUBLISHED).increment(1);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(error) => {
                        let (failure, why) = infra::mqtt::describe(&url, &error);
                        health.set_not_ready(format!("broker: {why}"));
                        // With thousands of device connections: one line per change of
                        // reason, not one per attempt.
                        let delay = reconnect.delay(failure);
                        if last_failure.as_ref() != Some(&why) {
                            tracing::warn!(error = %why, retry_in = ?delay, "Broker connection failed; reconnecting.");
                            last_failure = Some(why);
                        }
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        })
    };

    let mut publisher = Publisher {
        client: &client,
        tally: &c.tally,
        held: None,
        sent: 0,
    };
    // Each device gets a fixed phase inside the interval; one round walks them in phase order.
    let interval = c.interval;
    let interval_ms = interval.as_millis() as i64;
    let mut schedule: Vec<(Duration, usize)> = c
        .devices
        .iter()
        .map(|&d| (interval.mul_f64(sensor::phase(c.config.seed, d)), d))
        .collect();
    schedule.sort_unstable();
    let start_ms = schemas::timefmt::now_ms();

    // History first, as fast as the broker takes it; ticks continue from it.
    let history = c
        .config
        .backfill
        .map_or(0, |b| (b.as_millis() as i64 / interval_ms.max(1)) as u64);
    'history: for tick in 0..history {
        let tick_start = start_ms - (history - tick) as i64 * interval_ms;
        for &(phase, device) in &schedule {
            if c.shutdown.is_cancelled() {
                break 'history;
            }
            let at_ms = tick_start + phase.as_millis() as i64;
            if !publisher
                .send(c.generator.message(device, tick, at_ms))
                .await
            {
                break 'history;
            }
        }
    }

    let start = tokio::time::Instant::now();
    // Flat out, timestamps are the clock's, kept apart per device so no two readings share one.
    let mut last_at = vec![i64::MIN; schedule.len()];
    let mut round = 0u64;
    'rounds: while !c.shutdown.is_cancelled() && (c.config.rounds == 0 || round < c.config.rounds) {
        let round_start = start + interval * u32::try_from(round).unwrap_or(u32::MAX);
        for (slot, &(phase, device)) in schedule.iter().enumerate() {
            let at_ms = if c.config.flat_out {
                if c.shutdown.is_cancelled() {
                    break 'rounds;
                }
                let at = schemas::timefmt::now_ms()
                    .max(last_at[slot].saturating_add(i64::from(c.config.batch)));
                last_at[slot] = at;
                at
            } else {
                tokio::select! {
                    _ = c.shutdown.cancelled() => break 'rounds,
                    _ = tokio::time::sleep_until(round_start + phase) => {}
                }
                start_ms + (round_start + phase - start).as_millis() as i64
            };
            let msg = c.generator.message(device, history + round, at_ms);
            if !publisher.send(msg).await {
                break 'rounds;
            }
        }
        round += 1;
    }
    publisher.release_held().await;
    // Wait (a bounded time) for the broker to acknowledge everything, then leave cleanly.
    let sent = publisher.sent;
    let all_acked = async {
        while acked.load(Relaxed) < sent {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(ACK_GRACE, all_acked).await.is_err() {
        tracing::warn!(
            unacknowledged = sent - acked.load(Relaxed),
            "Leaving with publishes the broker has not acknowledged."
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), client.disconnect()).await;
    let mut poller = poller;
    if tokio::time::timeout(Duration::from_secs(5), &mut poller)
        .await
        .is_err()
    {
        poll_stop.cancel();
        let _ = poller.await;
    }
    Ok(())
}

/// Publishes messages, applying the delivery faults: duplicates go out twice, and an
/// out-of-order message is held back until the next one has gone.
struct Publisher<'a> {
    client: &'a AsyncClient,
    tally: &'a Tally,
    held: Option<Message>,
    /// Publishes handed to the client on this connection.
    sent: u64,
}

impl Publisher<'_> {
    /// `false` when the client is gone.
    async fn send(&mut self, msg: Message) -> bool {
        self.tally.message(&msg);
        match msg.fault {
            Some(Fault::Drop) => {
                self.tally.dropped(&msg);
                return true;
            }
            Some(Fault::OutOfOrder) if self.held.is_none() => {
                self.held = Some(msg);
                return true;
            }
            Some(Fault::Duplicate) if !self.publish(&msg).await => return false,
            _ => {}
        }
        if !self.publish(&msg).await {
            return false;
        }
        self.release_held().await
    }

    async fn release_held(&mut self) -> bool {
        match self.held.take() {
            Some(held) => self.publish(&held).await,
            None => true,
        }
    }

    async fn publish(&mut self, msg: &Message) -> bool {
        let sent = self
            .client
            .publish(
                msg.topic.clone(),
                QoS::AtLeastOnce,
                false,
                msg.payload.clone(),
            )
            .await
            .is_ok();
        if sent {
            self.sent += 1;
            self.tally.published();
        }
        sent
    }
}
