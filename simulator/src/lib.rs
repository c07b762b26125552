//! `simulator`: N sensors publishing the device contract over MQTT, for demos and load.
//!
//! Each device publishes once per interval at its own phase, so load is spread evenly. Values
//! are a pure function of (seed, device, tick): the same flags produce the same readings.
//! Devices are spread over a few MQTT connections; publishes are QoS 1.

mod sensor;

use anyhow::Context;
use infra::cli::{LogArgs, MqttUrl};
use infra::serve::Health;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::Outgoing;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Publishes realistic readings for many sensors.
#[derive(Debug, Clone, clap::Parser)]
#[command(version, about, long_about = None)]
pub struct Config {
    /// MQTT broker.
    #[arg(long, env = "MQTT_URL", default_value = "mqtt://127.0.0.1:1883")]
    pub mqtt_url: MqttUrl,

    /// Number of simulated devices.
    #[arg(long, env = "SIMULATOR_DEVICES", default_value_t = 10_000)]
    pub devices: usize,

    /// Time between two readings of one device.
    #[arg(long, env = "SIMULATOR_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub interval: Duration,

    /// Seed for device phases and values.
    #[arg(long, env = "SIMULATOR_SEED", default_value_t = 1)]
    pub seed: u64,

    /// Stop after this many rounds (each device publishes once per round); 0 runs until stopped.
    #[arg(long, env = "SIMULATOR_ROUNDS", default_value_t = 0)]
    pub rounds: u64,

    /// MQTT connections the devices are spread over.
    #[arg(long, env = "SIMULATOR_CONNECTIONS", default_value_t = 4)]
    pub connections: usize,

    /// Topic prefix (`<prefix>/<deviceId>/telemetry`).
    #[arg(long, env = "SIMULATOR_TOPIC_PREFIX", default_value = "devices")]
    pub topic_prefix: String,

    /// Device id prefix; ids are `<prefix>-<n>` with n zero-padded.
    #[arg(long, env = "SIMULATOR_DEVICE_PREFIX", default_value = "sensor")]
    pub device_prefix: String,

    /// Address for `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "SIMULATOR_METRICS_ADDR", default_value = "127.0.0.1:9103")]
    pub metrics_addr: SocketAddr,

    #[command(flatten)]
    pub log: LogArgs,
}

/// Published messages (acknowledged by the broker).
pub const PUBLISHED: &str = "simulator_published_total";

/// Publishes until `shutdown` or the configured rounds are done.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let health = Health::new("connecting to the broker");
    infra::serve::serve_http(config.metrics_addr, health.clone(), shutdown.clone()).await?;
    let connections = config.connections.clamp(1, config.devices.max(1));
    tracing::info!(
        devices = config.devices,
        interval = ?config.interval,
        connections,
        broker = %config.mqtt_url,
        "Simulator starting."
    );
    let mut tasks = tokio::task::JoinSet::new();
    for conn in 0..connections {
        let devices: Vec<usize> = (conn..config.devices).step_by(connections).collect();
        tasks.spawn(connection(
            config.clone(),
            conn,
            devices,
            health.clone(),
            shutdown.clone(),
        ));
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a publishing task panicked")??;
    }
    tracing::info!("Simulator stopped.");
    Ok(())
}

async fn connection(
    config: Config,
    index: usize,
    devices: Vec<usize>,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let id = format!("simulator-{}-{index}", std::process::id());
    let mut options = MqttOptions::new(id, config.mqtt_url.host.clone(), config.mqtt_url.port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(Some(1024 * 1024));
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    let poll_stop = CancellationToken::new();
    let poller = {
        let stop = poll_stop.clone();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = stop.cancelled() => break,
                    event = eventloop.poll() => event,
                };
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => health.set_ready(),
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        metrics::counter!(PUBLISHED).increment(1);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(error) => {
                        health.set_not_ready(format!("broker: {error}"));
                        tracing::warn!(%error, "Broker connection failed; reconnecting.");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        })
    };

    // Each device gets a fixed phase inside the interval; one round walks them in phase order.
    let interval = config.interval;
    let mut schedule: Vec<(Duration, usize)> = devices
        .iter()
        .map(|&d| (interval.mul_f64(sensor::phase(config.seed, d)), d))
        .collect();
    schedule.sort_unstable();
    let start = tokio::time::Instant::now();
    let start_ms = schemas::timefmt::now_ms();
    let mut round = 0u64;
    'rounds: while config.rounds == 0 || round < config.rounds {
        let round_start = start + interval * u32::try_from(round).unwrap_or(u32::MAX);
        for &(phase, device) in &schedule {
            tokio::select! {
                _ = shutdown.cancelled() => break 'rounds,
                _ = tokio::time::sleep_until(round_start + phase) => {}
            }
            let at_ms = start_ms + (round_start + phase - start).as_millis() as i64;
            let id = sensor::device_id(&config.device_prefix, device, config.devices);
            let payload = sensor::reading(config.seed, &id, device, round, at_ms);
            let topic = schemas::reading::topic_for(&config.topic_prefix, &id);
            if client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                break 'rounds;
            }
        }
        round += 1;
    }
    // Give in-flight publishes a moment to be acknowledged, then leave cleanly.
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
