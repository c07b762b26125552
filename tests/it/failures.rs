//! Crashes and outages: no reading may be lost.

use crate::Pipeline;
use schemas::timefmt::now_ms;
use schemas::{DeadLetter, Reason};
use std::collections::BTreeSet;
use std::time::Duration;
use tests::proxy::Rates;
use tests::storage::{publish_all, reading, topic};

/// `n` distinct valid readings over `devices` devices, each ending in a unique millisecond.
fn readings(n: usize, devices: usize, offset: usize) -> Vec<(String, Vec<u8>)> {
    let base = now_ms() - 600_000;
    (offset..offset + n)
        .map(|i| {
            let id = format!("dev-{:04}", i % devices);
            (topic(&id), reading(&id, base + i as i64, i as u64))
        })
        .collect()
}

/// A fault proxy in front of one of Azurite's endpoints (`port`), in the connection string a
/// service uses from its next start (`hold`: how long the proxy holds a delayed or slow
/// response).
async fn through_proxy(
    azurite: &tests::servers::Azurite,
    port: u16,
    service: &mut tests::services::Service,
    hold: Duration,
) -> tests::proxy::FaultProxy {
    let proxy = tests::proxy::FaultProxy::start(port, hold).await;
    let direct = format!("127.0.0.1:{port}/");
    let proxied = azurite
        .connection_string()
        .replace(&direct, &format!("127.0.0.1:{}/", proxy.port));
    service.set_env("AZURE_STORAGE_CONNECTION_STRING", proxied);
    proxy
}

/// A fault proxy in front of the pipeline's table endpoint, for the processor.
async fn tables_through_proxy(p: &mut Pipeline, hold: Duration) -> tests::proxy::FaultProxy {
    through_proxy(&p.azurite, p.azurite.table_port, &mut p.processor, hold).await
}

async fn assert_all_present(p: &Pipeline, expected: usize) {
    let rows = p.wait_rows(expected, Duration::from_secs(180)).await;
    let keys: BTreeSet<(String, String)> = rows
        .iter()
        .map(|e| {
            (
                e["PartitionKey"].as_str().unwrap_or_default().to_owned(),
                e["RowKey"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(keys.len(), expected, "every reading exactly once");
}

#[tokio::test]
async fn processor_killed_mid_run_loses_nothing() {
    // One worker, so it is caught mid-run; a shorter visibility timeout so that the messages
    // the killed process held reappear sooner.
    let penv = [
        ("PROCESSOR_WORKERS", "1".to_owned()),
        ("PROCESSOR_VISIBILITY_TIMEOUT", "20s".to_owned()),
    ];
    let Some(mut p) = Pipeline::start("processor_kill9", &[], &penv).await else {
        return;
    };
    let n = 6_000;
    publish_all(p.mosquitto.port, readings(n, 3_000, 0)).await;
    tests::wait_for(
        "the processor to store some readings",
        Duration::from_secs(60),
        || async {
            (p.processor.metric("processor_readings_stored_total").await > 0.0).then_some(())
        },
    )
    .await;
    p.processor.kill9().await;
    let stored_before = tests::storage::rows(&p.account, &p.table)
        .await
        .expect("query")
        .len();
    assert!(
        stored_before < n,
        "the kill came too late to prove anything"
    );
    p.processor.restart().await;
    assert_all_present(&p, n).await;
}

#[tokio::test]
async fn ingest_killed_while_holding_unacked_messages_loses_nothing() {
    // A long linger keeps received messages unacknowledged when the kill lands.
    let ienv = [("INGEST_LINGER", "3s".to_owned())];
    let Some(mut p) = Pipeline::start("ingest_kill9", &ienv, &[]).await else {
        return;
    };
    let first = 100; // fits one envelope, so only the linger would flush it
    publish_all(p.mosquitto.port, readings(first, 100, 0)).await;
    tests::wait_for(
        "ingest to hold the first messages",
        Duration::from_secs(30),
        || async {
            (p.ingest.metric("ingest_pending_messages").await >= first as f64).then_some(())
        },
    )
    .await;
    assert_eq!(p.ingest.metric("ingest_messages_acked_total").await, 0.0);
    p.ingest.kill9().await;
    // More than Mosquitto's default per-session queue (1000) arrives while ingest is down:
    // the shipped broker configuration must keep all of it.
    let second = 2_500;
    publish_all(p.mosquitto.port, readings(second, 100, first)).await;
    p.ingest.restart().await;
    assert_all_present(&p, first + second).await;
}

#[tokio::test]
async fn storage_outage_under_load_loses_nothing_and_services_recover() {
    let Some(mut p) = Pipeline::start("azurite_outage", &[], &[]).await else {
        return;
    };
    let batches = 10;
    let per_batch = 300;
    for b in 0..batches {
        publish_all(p.mosquitto.port, readings(per_batch, 200, b * per_batch)).await;
        if b == 3 {
            p.azurite.stop().await;
        }
        if b == 6 {
            p.azurite.restart().await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert_all_present(&p, batches * per_batch).await;
    assert!(
        p.ingest.metric("ingest_queue_put_failures_total").await > 0.0,
        "the outage never reached ingest; the test proves nothing"
    );
    // Same processes, still ready.
    for svc in [&p.ingest, &p.processor] {
        let ready = tests::services::http_get(svc.metrics_port, "/readyz").await;
        assert_eq!(ready.map(|r| r.0), Some(200));
    }
}

#[tokio::test]
async fn a_message_past_its_delivery_limit_is_still_validated_and_stored() {
    let penv = [("PROCESSOR_MAX_DELIVERIES", "2".to_owned())];
    let Some(mut p) = Pipeline::start("past_limit", &[], &penv).await else {
        return;
    };
    // With the processor down, take the message repeatedly without finishing it, as rounds
    // refused by storage (or crashed workers) would. Once storage serves the processor, its
    // valid reading must be stored, not given up as poison unseen.
    p.processor.kill9().await;
    let payload = reading("dev-p", now_ms() - 1_000, 1);
    let mut envelope = schemas::EnvelopeBuilder::default();
    envelope
        .push(schemas::DeviceMessage::from_mqtt(
            &topic("dev-p"),
            &payload,
            now_ms(),
        ))
        .expect("fits");
    let queue = p.account.queue(&p.queue);
    queue.put(envelope.finish()).await.expect("put");
    for delivery in 1..=3 {
        let got = queue.get(1, Duration::from_secs(1)).await.expect("get");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].dequeue_count, delivery);
        tokio::time::sleep(Duration::from_millis(1_100)).await;
    }
    p.processor.restart().await;
    let rows = p.wait_rows(1, Duration::from_secs(60)).await;
    assert_eq!(rows[0]["PartitionKey"], "dev-p");
    tests::wait_for(
        "the message to leave the queue",
        Duration::from_secs(30),
        || async { (queue.approximate_depth().await.ok()? == 0).then_some(()) },
    )
    .await;
    let dead = tests::storage::drain_dead_letters(&p.account, &p.dead_letters).await;
    assert!(dead.is_empty(), "{dead:#?}");
}

#[tokio::test]
async fn readings_acknowledged_around_a_broker_restart_are_all_stored() {
    let Some(mut p) = Pipeline::start("broker_restart", &[], &[]).await else {
        return;
    };
    // Four devices' worth of publishers at about 300 readings/s for about 10 s; the broker
    // restarts (SIGTERM, saving its store) a third of the way in. Whatever it acknowledged,
    // before, during or after, must become a row: ingest's session and subscription, and the
    // readings queued for it while it reconnects, must survive the restart.
    let messages = readings(3_000, 40, 0);
    let port = p.mosquitto.port;
    let publishing = tokio::spawn({
        let messages = messages.clone();
        async move {
            tests::storage::publish_through_trouble(port, messages, 4, Duration::from_millis(12))
                .await
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    p.mosquitto.restart().await;
    let acked = publishing.await.expect("publishers");
    assert!(
        acked.len() > 2_500,
        "too few publishes acknowledged ({}) to prove anything",
        acked.len()
    );
    let rows = p.wait_rows(acked.len(), Duration::from_secs(120)).await;
    let stored: BTreeSet<(String, i64)> = rows
        .iter()
        .map(|e| {
            let row = schemas::entity::from_entity(e).expect("a telemetry row");
            (row.reading.device_id, row.reading.measured_at_ms)
        })
        .collect();
    let missing: Vec<usize> = acked
        .iter()
        .copied()
        .filter(|&i| {
            let payload: serde_json::Value = serde_json::from_slice(&messages[i].1).unwrap();
            let device = payload["deviceId"].as_str().unwrap().to_owned();
            let at =
                schemas::timefmt::parse_rfc3339_ms(payload["timestamp"].as_str().unwrap()).unwrap();
            !stored.contains(&(device, at))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged readings never became rows (first: {:?}); broker log:\n{}",
        missing.len(),
        &missing[..missing.len().min(5)],
        p.mosquitto.log()
    );
}

#[tokio::test]
async fn a_device_the_table_refuses_holds_back_only_its_own_messages() {
    let penv = [
        ("PROCESSOR_MAX_DELIVERIES", "2".to_owned()),
        ("PROCESSOR_VISIBILITY_TIMEOUT", "3s".to_owned()),
    ];
    let Some(mut p) = Pipeline::start("device_refused", &[], &penv).await else {
        return;
    };
    // The processor reaches the tables through a proxy that refuses bad-dev's device row
    // (and only that row) for its content, as Azure would refuse an entity.
    let proxy = tables_through_proxy(&mut p, Duration::from_secs(8)).await;
    proxy.refuse_containing(r#""RowKey":"bad-dev""#, 400, "PropertyValueTooLarge");
    p.processor.kill9().await;

    // Two envelopes for one round: bad-dev's reading, and twenty other new devices'.
    let at = now_ms() - 1_000;
    let envelope = |devices: &[String]| {
        let mut b = schemas::EnvelopeBuilder::default();
        for (i, d) in devices.iter().enumerate() {
            let msg = schemas::DeviceMessage::from_mqtt(&topic(d), &reading(d, at, i as u64), at);
            b.push(msg).expect("fits");
        }
        b.finish()
    };
    let good: Vec<String> = (0..20).map(|i| format!("good-{i:02}")).collect();
    let queue = p.account.queue(&p.queue);
    queue.put(envelope(&["bad-dev".to_owned()])).await.unwrap();
    queue.put(envelope(&good)).await.unwrap();
    p.processor.restart_now().await;

    // Every reading is written, the twenty devices are registered one by one past the
    // refused one, and only bad-dev's message stays queued.
    p.wait_rows(21, Duration::from_secs(60)).await;
    let registered = || async {
        let rows = tests::storage::rows(&p.account, &p.devices).await.ok()?;
        Some(
            rows.iter()
                .filter_map(|r| r["RowKey"].as_str().map(str::to_owned))
                .collect::<BTreeSet<String>>(),
        )
    };
    tests::wait_for(
        "the twenty devices registered",
        Duration::from_secs(30),
        || async { (registered().await?.len() == 20).then_some(()) },
    )
    .await;
    assert!(!registered().await.unwrap().contains("bad-dev"));
    tests::wait_for(
        "the good message finished",
        Duration::from_secs(30),
        || async { (queue.approximate_depth().await.ok()? == 1).then_some(()) },
    )
    .await;
    // Well past its delivery limit and the poison grace: never poisoned, since its reading
    // is in the table and deleting the message would hide it from the archiver.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(queue.approximate_depth().await.unwrap(), 1);
    let (status, body) = tests::services::http_get(p.processor.metrics_port, "/readyz")
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(&p.devices), "{body}");
    assert!(
        tests::storage::drain_dead_letters(&p.account, &p.dead_letters)
            .await
            .is_empty()
    );

    // Once the table takes the row, the message is finished.
    proxy.clear();
    tests::wait_for(
        "bad-dev registered and its message finished",
        Duration::from_secs(60),
        || async {
            let done = registered().await?.contains("bad-dev")
                && queue.approximate_depth().await.ok()? == 0;
            done.then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn slow_storage_never_lets_a_round_outlive_its_messages() {
    let penv = [
        ("PROCESSOR_VISIBILITY_TIMEOUT", "8s".to_owned()),
        ("STORAGE_TIMEOUT", "30s".to_owned()),
    ];
    let Some(mut p) = Pipeline::start("slow_storage", &[], &penv).await else {
        return;
    };
    // Table writes answer after 10 s, longer than the messages stay hidden: a round that
    // waited for them would still be working when its messages reappear, and a second worker
    // would redo them (dead-lettering their refusals twice).
    let proxy = tables_through_proxy(&mut p, Duration::from_secs(10)).await;
    p.processor.restart().await;
    let slow = tests::proxy::Rates {
        slow: 1.0,
        ..Default::default()
    };
    proxy.set("table_batch", slow);
    proxy.set("table_write", slow);

    let queue = p.account.queue(&p.queue);
    queue.put(two_refused("slow", 7)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    proxy.clear();
    each_refusal_dead_lettered_once(&p, 5, Duration::from_secs(8)).await;
}

/// One envelope of `n` devices' readings (named `prefix-<i>`), the last two out of range.
fn two_refused(prefix: &str, n: u64) -> String {
    let at = now_ms() - 1_000;
    let mut b = schemas::EnvelopeBuilder::default();
    for i in 0..n {
        let device = format!("{prefix}-{i}");
        let mut payload = reading(&device, at, i);
        if i + 2 >= n {
            payload = String::from_utf8(payload)
                .unwrap()
                .replace("\"humidity\":50", "\"humidity\":500")
                .into_bytes();
        }
        b.push(schemas::DeviceMessage::from_mqtt(
            &topic(&device),
            &payload,
            at,
        ))
        .expect("fits");
    }
    b.finish()
}

/// Waits for [`two_refused`]'s `stored` rows and its message to be finished, then `settle` for
/// stragglers, and checks that its two refusals were dead-lettered once each. Returns them.
async fn each_refusal_dead_lettered_once(
    p: &Pipeline,
    stored: usize,
    settle: Duration,
) -> Vec<DeadLetter> {
    p.wait_rows(stored, Duration::from_secs(60)).await;
    let queue = p.account.queue(&p.queue);
    tests::wait_for("the message finished", Duration::from_secs(60), || async {
        (queue.approximate_depth().await.ok()? == 0).then_some(())
    })
    .await;
    tokio::time::sleep(settle).await;
    let dead = tests::storage::drain_dead_letters(&p.account, &p.dead_letters).await;
    let reasons: Vec<Reason> = dead.iter().map(|r| r.reason).collect();
    assert_eq!(
        reasons,
        [Reason::OutOfRange, Reason::OutOfRange],
        "each refusal dead-lettered once: {dead:#?}"
    );
    dead
}

/// A message with two refused readings whose dead-letter put answers after 14.5 s. The put
/// starts about 4 s after the take (the linger), so it lands after the message's settling
/// deadline (14 s) and after its hold would end (16 s), but before the put's own limit (a
/// visibility timeout after it began). A put cut short at the deadline lands all the same,
/// and the message, back for another delivery, would write its records again (on every
/// delivery, while storage stays this slow). `renewals_refused`: the queue refuses to renew the
/// message's hold. Returns the dead letters and the pipeline (`None` without the servers).
async fn slow_dead_letter_put(
    name: &str,
    renewals_refused: bool,
) -> Option<(Vec<DeadLetter>, Pipeline)> {
    let penv = [
        ("PROCESSOR_VISIBILITY_TIMEOUT", "16s".to_owned()),
        ("PROCESSOR_DEAD_LETTER_LINGER", "4s".to_owned()),
        ("STORAGE_TIMEOUT", "30s".to_owned()),
    ];
    let mut p = Pipeline::start(name, &[], &penv).await?;
    let hold = Duration::from_millis(14_500);
    let proxy = through_proxy(&p.azurite, p.azurite.queue_port, &mut p.processor, hold).await;
    p.processor.restart().await;
    proxy.set(
        "queue_put",
        Rates {
            slow: 1.0,
            ..Rates::default()
        },
    );
    if renewals_refused {
        proxy.set(
            "queue_update",
            Rates {
                busy: 1.0,
                ..Rates::default()
            },
        );
    }

    p.account
        .queue(&p.queue)
        .put(two_refused("slow-dl", 4))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(35)).await;
    proxy.clear();
    let dead = each_refusal_dead_lettered_once(&p, 2, Duration::from_secs(10)).await;
    assert!(
        proxy.injected().get("queue_put/slow").copied().unwrap_or(0) >= 1,
        "the dead letters went through the slow proxy"
    );
    Some((dead, p))
}

#[tokio::test]
async fn a_slow_dead_letter_put_keeps_its_message_hidden_and_writes_once() {
    let Some((dead, p)) = slow_dead_letter_put("slow_dead_letters", false).await else {
        return;
    };
    assert!(
        dead.iter().all(|r| r.attempts == 1),
        "the message was never delivered again: {dead:#?}"
    );
    let renewed = p
        .processor
        .metric("processor_dead_letter_holds_renewed_total")
        .await;
    assert!(renewed >= 1.0, "the hold was renewed: {renewed}");
}

#[tokio::test]
async fn a_slow_dead_letter_put_whose_hold_cannot_be_renewed_is_waited_for() {
    let Some((_, p)) = slow_dead_letter_put("slow_dead_letters_unrenewed", true).await else {
        return;
    };
    // The message came back while the put ran; that delivery left it, and a later one found
    // the records written.
    let waited = p
        .processor
        .metric("processor_messages_retried_total{stage=\"dead_letter\"}")
        .await;
    assert!(waited >= 1.0, "a delivery found the put running: {waited}");
    let skipped = p
        .processor
        .metric("processor_dead_letters_already_written_total")
        .await;
    assert_eq!(skipped, 2.0, "the last delivery found both records written");
}

#[tokio::test]
async fn an_ack_for_a_lost_connection_never_acknowledges_a_new_sessions_message() {
    let Some(mut p) = Pipeline::start("stale_acks", &[], &[]).await else {
        return;
    };
    // Ingest writes to the queue through a proxy that holds the first envelope's write for
    // 6 s (slow storage, well within the storage timeout) and refuses every later one.
    let hold = Duration::from_secs(6);
    let proxy = through_proxy(&p.azurite, p.azurite.queue_port, &mut p.ingest, hold).await;
    p.ingest.restart().await;
    let slow = Rates {
        slow: 1.0,
        ..Rates::default()
    };
    proxy.set("queue_put", slow);
    let first = readings(20, 4, 0);
    publish_all(p.mosquitto.port, first).await;
    tests::wait_for(
        "the first envelope's write",
        Duration::from_secs(10),
        || {
            let held = proxy.injected().get("queue_put/slow").copied().unwrap_or(0);
            async move { (held > 0).then_some(()) }
        },
    )
    .await;
    let written_at = tokio::time::Instant::now();
    proxy.set(
        "queue_put",
        Rates {
            busy: 1.0,
            ..Rates::default()
        },
    );
    // The broker loses its store while the write is held, so ingest's next session is a new
    // one, and the broker numbers its deliveries from 1 again: the second batch's packet ids
    // are the first batch's.
    p.mosquitto.restart_forgetting().await;
    let port = p.ingest.metrics_port;
    tests::wait_for(
        "ingest to subscribe again",
        Duration::from_secs(30),
        || async move {
            let ready = tests::services::http_get(port, "/readyz").await;
            (ready?.0 == 200).then_some(())
        },
    )
    .await;
    publish_all(p.mosquitto.port, readings(20, 4, 20)).await;
    // The held write completes, so ingest acknowledges the first batch, on a connection that
    // is gone. Had those PUBACKs gone out on the new connection, they would have acknowledged
    // the second batch, which no queue holds (its writes are refused).
    tokio::time::sleep_until(written_at + hold + Duration::from_secs(2)).await;
    assert_eq!(
        p.ingest.metric("ingest_envelopes_written_total").await,
        1.0,
        "the first envelope, and only it, is written"
    );
    p.ingest.kill9().await;
    proxy.clear();
    p.ingest.restart().await;
    // The broker redelivers whatever was not acknowledged: the second batch, all of it.
    assert_all_present(&p, 40).await;
}

#[tokio::test]
async fn a_message_queued_before_its_connection_was_lost_is_not_queued_again() {
    let Some(mut p) = Pipeline::start("redelivered_once", &[], &[]).await else {
        return;
    };
    // The envelope's write is held 3 s; the broker stops meanwhile, so ingest writes the
    // messages but cannot acknowledge them, and the broker redelivers them when it is back.
    let proxy = through_proxy(
        &p.azurite,
        p.azurite.queue_port,
        &mut p.ingest,
        Duration::from_secs(3),
    )
    .await;
    p.ingest.restart().await;
    proxy.set(
        "queue_put",
        Rates {
            slow: 1.0,
            ..Rates::default()
        },
    );
    publish_all(p.mosquitto.port, readings(30, 5, 0)).await;
    tests::wait_for("the envelope's write", Duration::from_secs(10), || {
        let held = proxy.injected().get("queue_put/slow").copied().unwrap_or(0);
        async move { (held > 0).then_some(()) }
    })
    .await;
    proxy.clear();
    p.mosquitto.stop().await;
    let ingest = &p.ingest;
    tests::wait_for("the envelope to be written", Duration::from_secs(30), || async move {
        (ingest.metric("ingest_envelopes_written_total").await >= 1.0).then_some(())
    })
    .await;
    p.mosquitto.start_again().await;
    let ingest = &p.ingest;
    tests::wait_for("the redelivered messages to be acknowledged", Duration::from_secs(60), || async move {
        (ingest.metric("ingest_messages_acked_total").await >= 30.0).then_some(())
    })
    .await;
    assert_eq!(
        p.ingest
            .metric("ingest_messages_already_queued_total")
            .await,
        30.0,
        "every redelivery recognised"
    );
    assert_eq!(
        p.ingest.metric("ingest_envelopes_written_total").await,
        1.0,
        "nothing queued twice"
    );
    assert_all_present(&p, 30).await;
}
