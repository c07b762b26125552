//! Scale-out, replica by replica, as deploy/k8s runs it: two ingest replicas in one
//! shared-subscription group (each with its own client id and persistent session, as the
//! StatefulSet's pod names give them) and three processors, against one broker and one
//! storage account, under load with every fault kind of the simulator. One ingest replica
//! and one processor are killed with SIGKILL mid-run and started again a few seconds later.
//! Then ingest is scaled down for good: the last replica, back from a few seconds away (so
//! that the broker holds a backlog for it) and slowed, leaves the group (SIGUSR1) while that
//! backlog drains, says when it is done, and stops; the load goes on, and the removed
//! replica's session is left empty. From the simulator's exact accounting: every valid reading is one row
//! with the values sent, and every refused device message is dead-lettered, once by its
//! content.
//!
//! `SCALE_SECONDS` sets the length of the load (default 90).

use schemas::DeadLetter;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tests::accounting::{simulate, DeadLetters, Expected, ALL_FAULTS};
use tests::services::http_get;
use tests::{unique, Azurite, Mosquitto, Service};

const RECEIVED: &str = "ingest_messages_received_total";
const REDELIVERED: &str = "ingest_messages_redelivered_total";

/// What a refusal refuses, whichever delivery or receipt wrote it: a device message
/// that reached the queue twice (ingest killed before its acknowledgement) has two receipt
/// times, but one content.
fn content(d: &DeadLetter) -> (String, String, Option<String>, Option<String>, usize) {
    (
        d.reason.as_str().to_owned(),
        d.topic.clone(),
        d.payload.clone(),
        d.payload_base64.clone(),
        d.payload_bytes,
    )
}

#[tokio::test]
async fn two_ingest_replicas_and_three_processors_lose_nothing_when_one_of_each_is_killed() {
    if !tests::servers_available("scale-out") {
        return;
    }
    let seconds: u64 = std::env::var("SCALE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(90);
    let (azurite, mosquitto) = tokio::join!(Azurite::start(), Mosquitto::start());
    let (queue, dead, table) = (unique("ingest"), unique("dead"), unique("telemetry"));
    let storage = (
        "AZURE_STORAGE_CONNECTION_STRING",
        azurite.connection_string(),
    );
    let group = unique("g");
    let ingest_env = |replica: &str| {
        vec![
            storage.clone(),
            ("MQTT_URL", mosquitto.url()),
            ("INGEST_QUEUE_NAME", queue.clone()),
            ("INGEST_SHARE_GROUP", group.clone()),
            // As a StatefulSet names them: stable across restarts, unique per replica.
            ("INGEST_CLIENT_ID", format!("{group}-{replica}")),
        ]
    };
    // The replica to remove takes its messages slowly (20 unacknowledged at most, envelopes
    // every 400 ms), so a backlog the broker holds for it takes a while to drain.
    let mut slow_env = ingest_env("1");
    slow_env.extend([
        ("INGEST_RECEIVE_MAXIMUM", "20".to_owned()),
        ("INGEST_LINGER", "400ms".to_owned()),
    ]);
    let processor_env = vec![
        storage.clone(),
        ("PROCESSOR_QUEUE_NAME", queue.clone()),
        ("PROCESSOR_DEAD_LETTER_QUEUE", dead.clone()),
        ("PROCESSOR_QUARANTINE_QUEUE", unique("quarantine")),
        ("PROCESSOR_TABLE_NAME", table.clone()),
        ("PROCESSOR_DEVICE_TABLE", unique("devices")),
        ("PROCESSOR_WORKERS", "2".into()),
        ("PROCESSOR_VISIBILITY_TIMEOUT", "20s".into()),
    ];
    let mut processors = Vec::new();
    for _ in 0..3 {
        processors.push(Service::start("processor", &processor_env).await);
    }
    let mut ingests = [
        Service::start("ingest", &ingest_env("0")).await,
        Service::start("ingest", &slow_env).await,
    ];

    // 150 devices every second, every fault kind.
    let devices = 150;
    let live = simulate(
        mosquitto.url(),
        vec![
            ("SIMULATOR_DEVICES", devices.to_string()),
            ("SIMULATOR_INTERVAL", "1s".into()),
            ("SIMULATOR_ROUNDS", seconds.to_string()),
            ("SIMULATOR_CONNECTIONS", "4".into()),
            ("SIMULATOR_FAULTS", ALL_FAULTS.into()),
        ],
    );

    let started = Instant::now();
    // Both replicas take a share of the load.
    tests::wait_for(
        "both ingest replicas receiving",
        Duration::from_secs(30),
        || async {
            let (a, b) = (
                ingests[0].metric(RECEIVED).await,
                ingests[1].metric(RECEIVED).await,
            );
            (a > 0.0 && b > 0.0).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(seconds / 4)).await;

    // One of each dies mid-run; the survivors go on.
    eprintln!("scale-out: kill -9 ingest replica 0 and processor 1");
    let survivor_before = ingests[1].metric(RECEIVED).await;
    let down = Instant::now();
    ingests[0].kill9().await;
    processors[1].kill9().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let survivor_during = ingests[1].metric(RECEIVED).await - survivor_before;
    let down_for = down.elapsed().as_secs_f64();
    ingests[0].restart().await;
    processors[1].restart().await;
    // The restarted replica resumes its own session: the broker redelivers to it what it held
    // unacknowledged when it died.
    let redelivered = tests::wait_for(
        "the restarted replica's unacknowledged messages redelivered to it",
        Duration::from_secs(30),
        || async {
            let n = ingests[0].metric(REDELIVERED).await;
            (n > 0.0).then_some(n)
        },
    )
    .await;
    eprintln!(
        "scale-out: while replica 0 was down ({down_for:.1} s), replica 1 received \
         {survivor_during} messages (the devices sent about {}); replica 0 got {redelivered} \
         redelivered on its return",
        (down_for * f64::from(devices)).round()
    );

    // Scaling down for good: the replica to remove leaves the group, says when nothing more
    // will come, and stops. Without the leave, the broker would go on dealing its session a
    // share of the load after it stopped, for a client that never returns: those readings
    // would be missing below.
    let until = Duration::from_secs(seconds / 3).saturating_sub(started.elapsed());
    tokio::time::sleep(until).await;
    // Away for a while first: the broker queues its share meanwhile, and delivers that backlog
    // (20 at a time) while it leaves.
    ingests[1].kill9().await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    ingests[1].restart().await;
    assert!(!live.is_finished(), "the load ended before the scale-down");
    eprintln!("scale-out: replica 1 leaves the group");
    let left_at = Instant::now();
    ingests[1].signal("USR1");
    let received_at_leave = ingests[1].metric(RECEIVED).await;
    let port = ingests[1].metrics_port;
    tests::wait_for(
        "replica 1 to say it can be stopped",
        Duration::from_secs(120),
        || async move {
            let (_, body) = http_get(port, "/readyz").await?;
            body.contains("stop this replica").then_some(())
        },
    )
    .await;
    let left_with = ingests[1].metric(RECEIVED).await;
    // What the broker held for it arrived after the signal: the backlog was real.
    let backlog = left_with - received_at_leave;
    assert!(
        backlog >= 100.0,
        "only {backlog} messages arrived after the leave signal"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ingests[1].metric(RECEIVED).await,
        left_with,
        "a replica that left its group was dealt more messages"
    );
    let drained_in = left_at.elapsed().as_secs_f64();
    ingests[1].terminate(Duration::from_secs(30)).await;
    let [remaining, _] = &ingests;
    // Nothing waits in the removed replica's session (resuming it delivers nothing).
    let stranded = delivered_to_session(
        mosquitto.port,
        &format!("{group}-1"),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(
        stranded, 0,
        "messages left in the removed replica's session"
    );
    // The load goes on after the removal: what the broker does with it is part of the test.
    assert!(!live.is_finished(), "the load ended before the removal");

    let summary = live.await.expect("the simulator");
    let expected = Expected::from_summaries(&[summary]);
    let account = azurite.account();

    // Every valid reading, once, with the values sent.
    let stored = tests::wait_for(
        "every valid reading stored",
        Duration::from_secs(180),
        || async {
            let stored = tests::accounting::stored(&account, &table).await?;
            (stored.len() as u64 >= expected.rows).then_some(stored)
        },
    )
    .await;
    assert_eq!(
        stored.len() as u64,
        expected.rows,
        "one row per valid reading"
    );
    let digest = stored.values().fold(0u64, |sum, d| sum.wrapping_add(*d));
    assert_eq!(
        digest, expected.digest,
        "the stored values differ from those sent"
    );

    // Every refused message, dead-lettered with its reason.
    let dead_letters =
        DeadLetters::collect(&account, &dead, &expected.dead, Duration::from_secs(120)).await;
    let mut by_content: BTreeMap<String, BTreeSet<_>> = BTreeMap::new();
    for d in &dead_letters.records {
        by_content
            .entry(d.reason.as_str().to_owned())
            .or_default()
            .insert(content(d));
    }
    let distinct: BTreeMap<String, u64> = by_content
        .iter()
        .map(|(reason, set)| (reason.clone(), set.len() as u64))
        .collect();
    let report = serde_json::json!({
        "seconds": seconds,
        "readings_offered": expected.readings,
        "rows": stored.len(),
        "refused_messages": expected.refused(),
        "dead_letter_records": dead_letters.records.len(),
        "written_again_same_identity": dead_letters.same_identity(),
        "put_twice_after_a_lost_answer": dead_letters.put_twice,
        "queued_twice_by_ingest": (dead_letters.records.len() as u64)
            .saturating_sub(dead_letters.same_identity())
            .saturating_sub(expected.refused()),
        "survivor_received_while_one_was_down": survivor_during,
        "redelivered_to_the_restarted_replica": redelivered,
        "seconds_to_drain_and_leave": (drained_in * 10.0).round() / 10.0,
        "backlog_taken_while_leaving": backlog,
    });
    eprintln!("scale-out report: {report:#}");
    let want: BTreeMap<String, u64> = expected
        .dead
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(r, n)| (r.clone(), *n))
        .collect();
    assert_eq!(
        distinct, want,
        "each refused message dead-lettered, none lost, none invented"
    );

    for svc in std::iter::once(remaining).chain(&processors) {
        let ready = http_get(svc.metrics_port, "/readyz").await.map(|r| r.0);
        assert_eq!(ready, Some(200), "{} not ready at the end", svc.name());
    }
}

/// Resumes the persistent session of `client_id` for `wait`: how many messages it delivers.
async fn delivered_to_session(port: u16, client_id: &str, wait: Duration) -> usize {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_clean_start(false);
    let (client, mut events) = AsyncClient::new(options, 16);
    let deadline = tokio::time::Instant::now() + wait;
    let mut delivered = 0;
    while let Ok(event) = tokio::time::timeout_at(deadline, events.poll()).await {
        if let Event::Incoming(Packet::Publish(_)) = event.expect("resume the session") {
            delivered += 1;
        }
    }
    let _ = client.disconnect().await;
    delivered
}
