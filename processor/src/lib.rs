//! `processor`: Azure Storage Queue in, Azure Table Storage out.
//!
//! One fetcher ([`fetch::run`]) takes up to 32 envelopes per get whenever one of many
//! concurrent workers is free and starts a [`round`] on them: [`classify`] sorts the messages
//! (pure: decode, validate), then the round writes the valid readings in same-partition
//! transactions ([`plan`], [`write`]), registers new devices ([`devices`]), keeps unreadable
//! messages whole in quarantine, and settles each message: [`settle`] deletes it, or the
//! dead-letter writer ([`dead_letters`]) packs its refusals with those of other rounds and then
//! has it deleted. The invariant that makes crashes safe: a queue message is deleted only after
//! every reading in it is stored or dead-lettered and what could not be decoded is kept whole;
//! everything before that is idempotent.

mod alarms;
mod claims;
mod classify;
mod config;
mod ctx;
mod dead_letters;
mod devices;
mod failure;
mod fetch;
mod metrics_names;
mod plan;
mod round;
mod settle;
mod stored;
mod write;

pub use config::Config;

use infra::serve::Health;
use infra::storage::{create_missing, Grant, Resource};
use schemas::reading::Policy;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the processor may do with a SAS minted from an account key: take, update and delete
/// messages, add dead letters, read the queue's depth.
/// The least time a refresh of the device table may take, however often it runs.
const MIN_FLUSH_TIME: Duration = Duration::from_secs(30);
/// The most time the last refresh, at shutdown, may take.
const FINAL_FLUSH: Duration = Duration::from_secs(15);

const STORAGE_GRANT: Grant = Grant {
    services: "q",
    resource_types: "co",
    permissions: "rapu",
};

/// Runs the processor until `shutdown`; rounds in progress finish first.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let health = Health::new("creating queues and table");
    let metrics_addr =
        infra::serve::serve_http(config.metrics_addr, health.clone(), shutdown.clone()).await?;
    metrics::gauge!(metrics_names::VISIBILITY_SECONDS).set(config.visibility_timeout.as_secs_f64());
    // Every reason's counter exists from the start, so the first dead letter of a reason is an
    // increase an alert sees, not the series appearing.
    for reason in schemas::Reason::ALL {
        metrics::counter!(metrics_names::DEAD_LETTERS, "reason" => reason.as_str()).increment(0);
    }
    let account = config.storage.account(STORAGE_GRANT)?;
    let webhook = match &config.alarms_webhook_url {
        Some(url) => Some(
            infra::webhook::Webhook::new(url.expose(), config.alarms_webhook_timeout)
                .map_err(|e| anyhow::anyhow!("ALARMS_WEBHOOK_URL {e}"))?,
        ),
        None => None,
    };
    let ctx = Arc::new(ctx::Ctx {
        queue: account.queue(&config.queue_name),
        dead_letters: account.queue(&config.dead_letter_queue),
        quarantine: account.queue(&config.quarantine_queue),
        table: account.table(&config.table_name),
        rollups: account.table(&config.rollup_table),
        devices: devices::Registry::new(
            account.table(&config.device_table),
            usize::try_from(config.device_cache).unwrap_or(usize::MAX),
            config.device_update_interval,
        ),
        rules: classify::Rules {
            topic_prefix: config.topic_prefix.clone(),
            policy: Policy {
                max_future: config.max_future,
                max_age: config.max_age,
            },
            quarantine_queue: config.quarantine_queue.clone(),
        },
        visibility: config.visibility_timeout,
        max_deliveries: config.max_deliveries,
        write_concurrency: config.write_concurrency,
        writes: tokio::sync::Semaphore::new(config.write_concurrency.max(1)),
        write_kib: config.write_kib.max(1),
        write_bytes: tokio::sync::Semaphore::new(config.write_kib.max(1) as usize),
        health: health.clone(),
        stalled: std::sync::Mutex::default(),
        poison_from: std::sync::Mutex::new(
            tokio::time::Instant::now()
                + ctx::poison_grace(config.visibility_timeout, config.max_deliveries),
        ),
        held_back: std::sync::Mutex::default(),
        dead_lettered: Arc::default(),
        stored: stored::Stored::new(schemas::timefmt::now_ms()),
        alarms: alarms::Alarms::new(
            account.table(&config.alarm_table),
            account.queue(&config.alarm_queue),
        ),
        backlog_ms: std::sync::atomic::AtomicI64::new(0),
    });
    tracing::info!(
        queue = %config.queue_name,
        dead_letters = %config.dead_letter_queue,
        quarantine = %config.quarantine_queue,
        table = %config.table_name,
        device_table = %config.device_table,
        workers = config.workers,
        table_endpoint = account.table_endpoint(),
        account = account.name(),
        %metrics_addr,
        "Processor starting."
    );
    let resources = [
        Resource::Queue(&ctx.queue),
        Resource::Queue(&ctx.dead_letters),
        Resource::Queue(&ctx.quarantine),
        Resource::Table(&ctx.table),
        Resource::Table(&ctx.devices.table),
        Resource::Table(&ctx.rollups),
        Resource::Table(&ctx.alarms.table),
        Resource::Queue(&ctx.alarms.events),
    ];
    if !create_missing(&resources, config.storage.create_missing, &shutdown).await {
        return Ok(());
    }
    health.set_ready();

    // The alarm rules before the first round (a failure is retried by the rules' task).
    if let Err(error) = ctx.alarms.reload().await {
        tracing::warn!(%error, table = ctx.alarms.table.name(), "Cannot read the alarm rules yet.");
    }
    // The writer outlives the rounds: it flushes what they handed it after they end.
    let closing = CancellationToken::new();
    let linger = config.dead_letter_linger.min(config.visibility_timeout / 4);
    let (writer, writer_task) =
        dead_letters::Writer::spawn(ctx.clone(), linger, shutdown.clone(), closing.clone());
    let tracker = tokio_util::task::TaskTracker::new();
    let fetch = fetch::Fetch {
        workers: config.workers,
        round_bytes: config.round_kib.saturating_mul(1024),
        batch_wait: config.batch_wait,
    };
    tracker.spawn(fetch::run(ctx.clone(), writer, fetch, shutdown.clone()));
    tracker.spawn(report_depth(ctx.clone(), shutdown.clone()));
    tracker.spawn(refresh_devices(
        ctx.clone(),
        config.device_update_interval,
        shutdown.clone(),
    ));
    tracker.spawn(report_stored(ctx.clone(), shutdown.clone()));
    tracker.spawn(read_alarm_rules(
        ctx.clone(),
        config.alarm_rules_interval,
        shutdown.clone(),
    ));
    if let Some(webhook) = webhook {
        tracing::info!(
            webhook = webhook.redacted(),
            "Alarm events are delivered to the webhook."
        );
        tracker.spawn(alarms::deliver(
            ctx.clone(),
            webhook,
            config.alarms_webhook_timeout,
            shutdown.clone(),
        ));
    }
    tracker.spawn(sweep_silence(
        ctx.clone(),
        config.alarm_silence_interval,
        config.alarm_clock_skew,
        shutdown.clone(),
    ));
    tracker.close();
    tracker.wait().await;
    closing.cancel();
    if let Err(error) = writer_task.await {
        tracing::error!(%error, "The dead-letter writer failed; its messages will be redone.");
    }
    // Workers are done; write the latest device states they left pending (a storage outage
    // leaves them: the devices' next readings bring them).
    ctx.devices
        .flush(tokio::time::Instant::now() + FINAL_FLUSH)
        .await;
    ctx.stored
        .flush(&ctx.rollups, schemas::timefmt::now_ms())
        .await;
    tracing::info!("Processor stopped.");
    Ok(())
}

/// Writes the devices' latest readings every `interval` (the last flush follows the workers).
async fn refresh_devices(ctx: Arc<ctx::Ctx>, interval: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
    let flush_time = interval.max(MIN_FLUSH_TIME);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => ctx.devices.flush(Instant::now() + flush_time).await,
            () = ctx.devices.full.notified() => ctx.devices.flush(Instant::now() + flush_time).await,
        }
    }
}

/// Reads the alarm rules at start and every `interval`. A failed read keeps the rules read
/// before (none at start), and is logged when it begins and counted.
async fn read_alarm_rules(ctx: Arc<ctx::Ctx>, interval: Duration, shutdown: CancellationToken) {
    let every = interval.max(Duration::from_secs(1));
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        match ctx.alarms.reload().await {
            Ok(()) => failing = false,
            Err(error) => {
                metrics::counter!(metrics_names::ALARM_RULES_UNREAD).increment(1);
                if !failing {
                    tracing::warn!(%error, table = ctx.alarms.table.name(), "Cannot read the alarm rules; those read before stay in force.");
                }
                failing = true;
            }
        }
    }
}

/// The most of the ingest queue's backlog a silence is given on top of its limit: past it,
/// silence is not judged at all.
const MAX_BACKLOG_ALLOWANCE_MS: i64 = 3_600_000;

/// Looks for silent devices every `interval` (each sweep given as long), allowing `skew` of
/// clock and the ingest queue's backlog.
async fn sweep_silence(
    ctx: Arc<ctx::Ctx>,
    interval: Duration,
    skew: Duration,
    shutdown: CancellationToken,
) {
    let every = interval.max(Duration::from_secs(1));
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let skew_ms = i64::try_from(skew.as_millis()).unwrap_or(i64::MAX);
    for n in 1u64.. {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        // Readings may wait in the queue and in a round (up to a visibility timeout). Past
        // an hour of backlog (catching up after an outage) nobody can tell silence from a
        // queue: no sweep until it is back under.
        let backlog = ctx.backlog_ms.load(std::sync::atomic::Ordering::Relaxed);
        if backlog > MAX_BACKLOG_ALLOWANCE_MS {
            tracing::warn!(backlog_s = backlog / 1000, "The ingest queue's backlog is over an hour old: silence is not judged until it is under.");
            continue;
        }
        let in_round = i64::try_from(ctx.visibility.as_millis()).unwrap_or(i64::MAX);
        let sweep = ctx.alarms.sweep_silence(
            &ctx.table,
            &ctx.devices.table,
            skew_ms.saturating_add(backlog).saturating_add(in_round),
            n,
            Instant::now() + every,
        );
        tokio::select! {
            _ = shutdown.cancelled() => break,
            swept = sweep => if let Err(error) = swept {
                metrics::counter!(metrics_names::ALARM_SWEEP_FAILURES).increment(1);
                tracing::warn!(%error, "Cannot look for silent devices; the next sweep tries again.");
            },
        }
    }
}

/// Writes the readings stored per minute every few seconds, for the dashboard (the last
/// write follows the workers).
async fn report_stored(ctx: Arc<ctx::Ctx>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => ctx.stored.flush(&ctx.rollups, schemas::timefmt::now_ms()).await,
        }
    }
}

/// Publishes the ingest queue's approximate depth every few seconds, the age of its oldest
/// waiting message every 10 s (a peek carries a message's text: up to 64 KiB), and that of
/// the alarms queue every 30 s.
async fn report_depth(ctx: Arc<ctx::Ctx>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    // When the oldest waiting message was put, as last seen: its age grows every tick, even
    // while a peek fails (an outage must not freeze it).
    let mut oldest: Option<i64> = None;
    for n in 0u64.. {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Ok(depth) = ctx.queue.approximate_depth().await {
            metrics::gauge!(metrics_names::QUEUE_DEPTH).set(depth as f64);
        }
        if n % 5 == 0 {
            if let Ok(seen) = ctx.queue.oldest_put_at().await {
                oldest = seen;
            }
        }
        let age = oldest.map_or(0, |at| (schemas::timefmt::now_ms() - at).max(0));
        metrics::gauge!(metrics_names::QUEUE_OLDEST_AGE).set(age as f64 / 1000.0);
        ctx.backlog_ms
            .store(age, std::sync::atomic::Ordering::Relaxed);
        // The alarms queue's oldest event, every 30 s: events nobody takes are undelivered.
        if n % 15 == 0 {
            if let Ok(seen) = ctx.alarms.events.oldest_put_at().await {
                let age = seen.map_or(0, |at| (schemas::timefmt::now_ms() - at).max(0));
                metrics::gauge!(metrics_names::ALARM_QUEUE_OLDEST_AGE).set(age as f64 / 1000.0);
            }
        }
    }
}
