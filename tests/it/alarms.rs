//! Alarms end to end: rules set with the `alarms` tool, readings through MQTT, ingest and the
//! processor, events read from the alarms queue. Raises and clears happen at the right
//! readings whatever the order and repetition of delivery, and a malformed rule is refused
//! by the tool and ignored by the processor.

use crate::Pipeline;
use schemas::alarm::{Event, Kind};
use schemas::timefmt::{format_ms, now_ms};
use std::time::Duration;
use tests::storage::{publish_all, topic};

const RULES: &str = r#"[
  {"id": "freezer-warm", "prefix": "fz-", "measurement": "temperature", "high": -10, "forSeconds": 20, "hysteresis": 2},
  {"id": "co2-high", "device": "room-1", "measurement": "co2", "high": 1000}
]"#;

/// Runs the `alarms` tool against `p`'s storage; its exit status, standard output and error.
async fn tool(p: &Pipeline, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use tokio::io::AsyncWriteExt as _;
    let mut cmd = tokio::process::Command::new(tests::services::bin_path("alarms"));
    cmd.args(args)
        .env(
            "AZURE_STORAGE_CONNECTION_STRING",
            p.azurite.connection_string(),
        )
        .env("LOG_FORMAT", "json")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("run alarms");
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .await
        .unwrap();
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sets one rule with the tool and waits until the processor has read it.
async fn set_rule(p: &Pipeline, rule: &str) {
    let (ok, out, err) = tool(p, &["rules", "set", "-"], Some(rule)).await;
    assert!(ok, "{out}{err}");
    tests::wait_for(
        "the processor to read the rule",
        Duration::from_secs(20),
        || async { (p.processor.metric("processor_alarm_rules").await == 1.0).then_some(()) },
    )
    .await;
}

/// A reading of `device` at `at` with `field` = `value` (and a humidity: a reading needs a
/// measurement of the contract's).
fn payload(device: &str, at: i64, field: &str, value: f64) -> (String, Vec<u8>) {
    (
        topic(device),
        format!(
            r#"{{"deviceId":"{device}","timestamp":"{}","humidity":40,"{field}":{value}}}"#,
            format_ms(at)
        )
        .into_bytes(),
    )
}

/// Every event in the alarms queue so far (taken and deleted), added to `seen`.
async fn drain(p: &Pipeline, seen: &mut Vec<Event>) {
    let queue = p.account.queue(schemas::alarm::DEFAULT_QUEUE);
    loop {
        let got = queue.get(32, Duration::from_secs(30)).await.unwrap();
        if got.is_empty() {
            return;
        }
        for m in got {
            seen.push(serde_json::from_str(&m.text).expect("an event is JSON"));
            queue.delete(&m).await.unwrap();
        }
    }
}

/// Publishes `messages` and waits until the processor has finished them (their judging
/// precedes their deletion), `sent` counting every message published so far.
async fn send(p: &Pipeline, sent: &mut usize, messages: Vec<(String, Vec<u8>)>) {
    *sent += messages.len();
    publish_all(p.mosquitto.port, messages).await;
    finished(p, *sent, Duration::from_secs(60)).await;
}

/// Waits until ingest has queued `sent` messages in all and the processor has finished every
/// one (deleted: judged).
async fn finished(p: &Pipeline, sent: usize, timeout: Duration) {
    let queue = p.account.queue(&p.queue);
    let want = sent as f64;
    tests::wait_for("the messages to be finished", timeout, || async {
        let acked = p.ingest.metric("ingest_messages_acked_total").await;
        let depth = queue.approximate_depth().await.ok();
        (acked >= want && depth == Some(0)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn rules_raise_and_clear_at_the_right_readings_whatever_the_delivery() {
    let penv = [("PROCESSOR_ALARM_RULES_INTERVAL", "1s".to_owned())];
    let Some(p) = Pipeline::start("alarms", &[], &penv).await else {
        return;
    };

    // A malformed rule is refused with its place and reason, and nothing is written.
    let bad = r#"[{"id": "ok", "prefix": "", "measurement": "humidity", "high": 90},
                  {"id": "bad", "prefix": "", "measurement": "temperature", "low": 5, "high": 1}]"#;
    let (ok, _, err) = tool(&p, &["rules", "set", "-"], Some(bad)).await;
    assert!(!ok, "a malformed rule must be refused");
    assert!(
        err.contains("rule 2 (\"bad\"): low (5) must be below high (1)"),
        "{err}"
    );
    let (ok, out, err) = tool(&p, &["rules", "set", "-"], Some(RULES)).await;
    assert!(ok, "{out}{err}");
    let (ok, out, _) = tool(&p, &["rules", "list", "--json"], None).await;
    assert!(ok);
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["rules"].as_array().unwrap().len(), 2, "{out}");
    // A row written by hand past the tool is ignored by the processor, which goes on.
    let table = p.account.table(schemas::alarm::DEFAULT_TABLE);
    let mut forged = serde_json::Map::new();
    forged.insert(
        "PartitionKey".into(),
        schemas::alarm::RULES_PARTITION.into(),
    );
    forged.insert("RowKey".into(), "forged".into());
    forged.insert("Rule".into(), r#"{"id":"forged","prefix":""}"#.into());
    table.upsert(&forged).await.unwrap();
    tests::wait_for(
        "the processor to read the rules",
        Duration::from_secs(20),
        || async {
            (p.processor.metric("processor_alarm_rules").await == 2.0
                && p.processor.metric("processor_alarm_rules_refused").await == 1.0)
                .then_some(())
        },
    )
    .await;
    let (_, out, _) = tool(&p, &["rules", "list"], None).await;
    assert!(out.contains("malformed row \"forged\""), "{out}");

    let s = 1_000;
    let t = |k: i64| now_ms() / 1_000 * 1_000 - 600 * s + k * 10 * s;
    let base: Vec<i64> = (0..8).map(t).collect();
    let fz = |k: usize, v: f64| payload("fz-1", base[k], "temperature", v);
    let co2 = |k: usize, v: f64| payload("room-1", base[k], "co2", v);
    let mut events = Vec::new();

    let mut sent = 0;
    let raised = |out: &str| -> usize {
        let active: serde_json::Value = serde_json::from_str(out).unwrap();
        active.as_array().unwrap().len()
    };

    // In band, then out of band for 20 s (raised at the third such reading), which is sent
    // three times; room-1 over 1000 (raised at once). A device no rule names.
    let first = vec![
        fz(0, -20.0),
        fz(1, -5.0),
        fz(3, -3.0),
        fz(3, -3.0),
        fz(3, -3.0),
        co2(0, 900.0),
        co2(1, 1200.0),
        payload("other-1", base[0], "temperature", 99.0),
    ];
    send(&p, &mut sent, first).await;
    let (_, out, _) = tool(&p, &["list", "--json"], None).await;
    assert_eq!(raised(&out), 2, "both raised: {out}");

    // A late reading (before the newest judged) would clear it: it changes nothing. Back in
    // band but within the hysteresis: still raised. room-1 still over 1000.
    send(
        &p,
        &mut sent,
        vec![fz(2, -30.0), fz(4, -11.0), co2(2, 1100.0)],
    )
    .await;
    let (_, out, _) = tool(&p, &["list", "--json"], None).await;
    assert_eq!(raised(&out), 2, "both still raised: {out}");

    // Inside by the hysteresis: cleared; room-1 at 950: cleared.
    send(&p, &mut sent, vec![fz(5, -15.0), co2(3, 950.0)]).await;
    // Redelivered and late out-of-band readings after the clear raise nothing.
    let late = vec![fz(3, -3.0), fz(4, 0.0), co2(1, 1200.0), co2(2, 2000.0)];
    send(&p, &mut sent, late).await;
    drain(&p, &mut events).await;

    let got: Vec<(String, String, Kind, String, Option<f64>)> = events
        .iter()
        .map(|e| {
            (
                e.device_id.clone(),
                e.rule.clone(),
                e.event,
                e.measured_at.clone(),
                e.value,
            )
        })
        .collect();
    let want = vec![
        (
            "fz-1".to_owned(),
            "freezer-warm".to_owned(),
            Kind::Raised,
            format_ms(base[3]),
            Some(-3.0),
        ),
        (
            "fz-1".into(),
            "freezer-warm".into(),
            Kind::Cleared,
            format_ms(base[5]),
            Some(-15.0),
        ),
        (
            "room-1".into(),
            "co2-high".into(),
            Kind::Raised,
            format_ms(base[1]),
            Some(1200.0),
        ),
        (
            "room-1".into(),
            "co2-high".into(),
            Kind::Cleared,
            format_ms(base[3]),
            Some(950.0),
        ),
    ];
    // Each once; the order is only that of each device's own events.
    let mut sorted = got.clone();
    sorted.sort_by(|a, b| (&a.0, &a.3).cmp(&(&b.0, &b.3)));
    assert_eq!(sorted, want, "events, in the order sent: {got:?}");
    for rule in ["freezer-warm", "co2-high"] {
        for event in ["raised", "cleared"] {
            let metric =
                format!("processor_alarm_events_total{{rule=\"{rule}\",condition=\"band\",event=\"{event}\"}}");
            assert_eq!(p.processor.metric(&metric).await, 1.0, "{metric}");
        }
    }
    let (_, out, _) = tool(&p, &["list"], None).await;
    assert!(out.contains("No alarm is raised or pending."), "{out}");
}

#[tokio::test]
async fn two_processors_one_killed_while_judging_never_lose_or_make_again_a_change() {
    let penv = [
        ("PROCESSOR_ALARM_RULES_INTERVAL", "1s".to_owned()),
        ("PROCESSOR_VISIBILITY_TIMEOUT", "6s".to_owned()),
    ];
    let Some(mut p) = Pipeline::start("alarms_kill9", &[], &penv).await else {
        return;
    };
    // A second processor: every device's readings are judged by both, in turn and at once.
    let second = tests::Service::start(
        "processor",
        &[
            (
                "AZURE_STORAGE_CONNECTION_STRING",
                p.azurite.connection_string(),
            ),
            ("PROCESSOR_QUEUE_NAME", p.queue.clone()),
            ("PROCESSOR_DEAD_LETTER_QUEUE", p.dead_letters.clone()),
            ("PROCESSOR_QUARANTINE_QUEUE", p.quarantine.clone()),
            ("PROCESSOR_TABLE_NAME", p.table.clone()),
            ("PROCESSOR_DEVICE_TABLE", p.devices.clone()),
            ("PROCESSOR_ALARM_RULES_INTERVAL", "1s".to_owned()),
            ("PROCESSOR_VISIBILITY_TIMEOUT", "6s".to_owned()),
        ],
    )
    .await;
    let rule = r#"{"id": "hot", "prefix": "k-", "measurement": "temperature", "high": 30}"#;
    set_rule(&p, rule).await;
    tests::wait_for(
        "the second processor to read the rule",
        Duration::from_secs(20),
        || async { (second.metric("processor_alarm_rules").await == 1.0).then_some(()) },
    )
    .await;

    // Waves: in each, every device sends one reading, alternately out of band and back in,
    // so every reading raises or clears. The processor is killed a moment into most waves,
    // at a different point each time, and started again; its messages come back.
    let devices: Vec<String> = (0..40).map(|d| format!("k-{d:02}")).collect();
    let waves = 10;
    let start = now_ms() / 1_000 * 1_000 - 1_200_000;
    let mut sent = 0;
    let mut want = std::collections::BTreeSet::new();
    for wave in 0..waves {
        let at = start + wave * 60_000;
        let hot = wave % 2 == 0;
        let messages: Vec<(String, Vec<u8>)> = devices
            .iter()
            .map(|d| payload(d, at, "temperature", if hot { 40.0 } else { 20.0 }))
            .collect();
        for d in &devices {
            let kind = if hot { "raised" } else { "cleared" };
            want.insert(format!("{d}|hot|{kind}|{at}"));
        }
        sent += messages.len();
        publish_all(p.mosquitto.port, messages).await;
        if wave % 5 != 4 {
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..500))).await;
            p.processor.kill9().await;
            p.processor.restart().await;
        }
        finished(&p, sent, Duration::from_secs(90)).await;
    }
    let mut events = Vec::new();
    drain(&p, &mut events).await;
    let got: std::collections::BTreeSet<String> = events.iter().map(|e| e.id.clone()).collect();
    let missing: Vec<&String> = want.difference(&got).collect();
    let made_again: Vec<&String> = got.difference(&want).collect();
    println!(
        "alarms kill -9, two processors: {} changes, {} events, {} sent twice (same id), \
         judged again {} times",
        want.len(),
        events.len(),
        events.len() - got.len(),
        second.metric("processor_alarm_rejudged_total").await as u64
    );
    assert!(missing.is_empty(), "lost: {missing:?}");
    assert!(
        made_again.is_empty(),
        "made again, or at the wrong reading: {made_again:?}"
    );
}

#[tokio::test]
async fn silence_is_raised_for_a_quiet_device_and_cleared_by_its_next_reading() {
    let penv = [
        ("PROCESSOR_ALARM_RULES_INTERVAL", "1s".to_owned()),
        ("PROCESSOR_ALARM_SILENCE_INTERVAL", "1s".to_owned()),
        ("PROCESSOR_ALARM_CLOCK_SKEW", "0s".to_owned()),
    ];
    let Some(p) = Pipeline::start("alarms_silence", &[], &penv).await else {
        return;
    };
    let rule =
        r#"{"id": "quiet", "prefix": "q-", "measurement": "temperature", "silenceMinutes": 5}"#;
    set_rule(&p, rule).await;

    // q-1 last measured 10 minutes ago: silent. q-2 a minute ago: not yet. x-1, silent too,
    // is watched by no rule.
    let now = now_ms() / 1_000 * 1_000;
    let mut sent = 0;
    let quiet = vec![
        payload("q-1", now - 600_000, "temperature", 4.0),
        payload("q-2", now - 60_000, "temperature", 4.0),
        payload("x-1", now - 600_000, "temperature", 4.0),
    ];
    send(&p, &mut sent, quiet).await;
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while events.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "silence was not raised within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        drain(&p, &mut events).await;
    }
    let (_, out, _) = tool(&p, &["list", "--json"], None).await;
    assert!(
        out.contains(r#""condition":"silence""#) && out.contains(r#""deviceId":"q-1""#),
        "{out}"
    );

    // A late reading, measured before the silence began, ends nothing; a new one ends it.
    send(
        &p,
        &mut sent,
        vec![payload("q-1", now - 540_000, "temperature", 4.0)],
    )
    .await;
    let back = now_ms() / 1_000 * 1_000;
    send(
        &p,
        &mut sent,
        vec![payload("q-1", back, "temperature", 4.0)],
    )
    .await;
    // A few more sweeps raise nothing again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    drain(&p, &mut events).await;
    let got: Vec<(String, String, Kind)> = events
        .iter()
        .map(|e| (e.device_id.clone(), e.measured_at.clone(), e.event))
        .collect();
    assert_eq!(got.len(), 2, "one raise and one clear: {got:?}");
    let (raised, cleared) = (&events[0], &events[1]);
    assert_eq!(
        (raised.device_id.as_str(), raised.event, raised.condition),
        ("q-1", Kind::Raised, schemas::alarm::Condition::Silence)
    );
    let since = schemas::timefmt::parse_rfc3339_ms(&raised.measured_at).unwrap();
    assert!(
        since > now - 600_000 && since <= now_ms() - 300_000,
        "silent since {} (last reading {})",
        raised.measured_at,
        format_ms(now - 600_000)
    );
    assert_eq!(
        (cleared.event, cleared.measured_at.clone()),
        (Kind::Cleared, format_ms(back)),
        "cleared at the new reading"
    );
}

#[tokio::test]
async fn the_webhook_gets_every_event_once_up_and_holds_back_no_reading_while_down() {
    let webhook = tests::webhook::Receiver::start().await;
    webhook.set_down(true);
    let url = format!(
        "http://127.0.0.1:{}/alarms?token=webhook-s3cret",
        webhook.port
    );
    let penv = [
        ("PROCESSOR_ALARM_RULES_INTERVAL", "1s".to_owned()),
        ("ALARMS_WEBHOOK_URL", url),
    ];
    let Some(p) = Pipeline::start("alarms_webhook", &[], &penv).await else {
        return;
    };
    let rule = r#"{"id": "hot", "prefix": "w-", "measurement": "temperature", "high": 30}"#;
    set_rule(&p, rule).await;

    // Raised, cleared, raised, while the webhook is down: every reading is stored all the
    // same (send waits until the processor finished each message).
    let start = now_ms() / 1_000 * 1_000 - 300_000;
    let mut sent = 0;
    let mut want = Vec::new();
    for (k, (value, kind)) in [(40.0, "raised"), (20.0, "cleared"), (45.0, "raised")]
        .into_iter()
        .enumerate()
    {
        let at = start + k as i64 * 10_000;
        send(
            &p,
            &mut sent,
            vec![payload("w-1", at, "temperature", value)],
        )
        .await;
        want.push(format!("w-1|hot|{kind}|{at}"));
    }
    tests::wait_for(
        "the webhook to be tried",
        Duration::from_secs(30),
        || async { (webhook.refused() > 0).then_some(()) },
    )
    .await;
    assert!(webhook.bodies().is_empty());

    // Up again: every event arrives, and the queue empties.
    webhook.set_down(false);
    let events: Vec<Event> = tests::wait_for(
        "the webhook to get every event",
        Duration::from_secs(120),
        || async {
            let events: Vec<Event> = webhook
                .bodies()
                .iter()
                .map(|b| serde_json::from_str(b).expect("an event"))
                .collect();
            let ids: std::collections::BTreeSet<&str> =
                events.iter().map(|e| e.id.as_str()).collect();
            (want.iter().all(|w| ids.contains(w.as_str()))).then_some(events.clone())
        },
    )
    .await;
    assert!(
        events.iter().all(|e| want.contains(&e.id)),
        "only these events: {events:?}"
    );
    let queue = p.account.queue(schemas::alarm::DEFAULT_QUEUE);
    tests::wait_for(
        "the alarms queue to empty",
        Duration::from_secs(30),
        || async { (queue.approximate_depth().await.ok() == Some(0)).then_some(()) },
    )
    .await;
    let log = p.processor.log_text();
    assert!(
        !log.contains("webhook-s3cret"),
        "the webhook's token in the log"
    );
    assert!(log.contains("refuses events"), "the outage is logged");
}

#[tokio::test]
async fn deleting_a_rule_clears_its_alarms_with_an_event_even_when_stopped_midway() {
    let penv = [("PROCESSOR_ALARM_RULES_INTERVAL", "1s".to_owned())];
    let Some(p) = Pipeline::start("alarms_delete", &[], &penv).await else {
        return;
    };
    let rules = r#"[
      {"id": "del-hot", "prefix": "del-", "measurement": "temperature", "high": 30},
      {"id": "del-slow", "prefix": "del-", "measurement": "temperature", "high": 30, "forSeconds": 3600}
    ]"#;
    let (ok, out, err) = tool(&p, &["rules", "set", "-"], Some(rules)).await;
    assert!(ok, "{out}{err}");
    let rules_read = |n: f64| {
        let p = &p;
        move || async move { (p.processor.metric("processor_alarm_rules").await == n).then_some(()) }
    };
    tests::wait_for(
        "the processor to read the rules",
        Duration::from_secs(20),
        rules_read(2.0),
    )
    .await;
    // del-1 raised under del-hot, pending under del-slow.
    let now = now_ms() / 1_000 * 1_000;
    let mut sent = 0;
    let hot = vec![payload("del-1", now - 2_000, "temperature", 40.0)];
    send(&p, &mut sent, hot).await;
    let mut events = Vec::new();
    drain(&p, &mut events).await;
    let raised: Vec<_> = events.iter().map(|e| (e.rule.as_str(), e.event)).collect();
    assert_eq!(raised, [("del-hot", Kind::Raised)]);

    // A deletion stopped while it waits for the processors: the rules judge nothing from then.
    let mut stopped = tokio::process::Command::new(tests::services::bin_path("alarms"))
        .args([
            "rules", "delete", "del-hot", "del-slow", "--settle", "10min",
        ])
        .env(
            "AZURE_STORAGE_CONNECTION_STRING",
            p.azurite.connection_string(),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let table = p.account.table(schemas::alarm::DEFAULT_TABLE);
    let table = &table;
    let partition = |name: &str| format!("PartitionKey eq '{name}'");
    let (moved, left) = (
        &partition(schemas::alarm::DELETING_PARTITION),
        &partition(schemas::alarm::RULES_PARTITION),
    );
    tests::wait_for(
        "both rules moved aside",
        Duration::from_secs(20),
        || async move {
            let moved = table.query(moved).await.ok()?.len();
            let left = table.query(left).await.ok()?.len();
            (moved == 2 && left == 0).then_some(())
        },
    )
    .await;
    stopped.kill().await.unwrap();
    tests::wait_for(
        "the processor to drop the rules",
        Duration::from_secs(20),
        rules_read(0.0),
    )
    .await;
    let again = vec![payload("del-3", now - 1_000, "temperature", 50.0)];
    send(&p, &mut sent, again).await;
    let (_, _, err) = tool(&p, &["rules", "list"], None).await;
    assert!(err.contains(r#"rule "del-hot" is being deleted"#), "{err}");

    // Run again, it finishes: one alarm cleared with an event, the pending state dropped.
    let args = ["rules", "delete", "del-hot", "del-slow", "--settle", "1s"];
    let (ok, out, err) = tool(&p, &args, None).await;
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("Deleted 2 rules")
            && out.contains("1 alarm cleared with an event, 1 pending dropped"),
        "{out}"
    );
    let mut after = Vec::new();
    drain(&p, &mut after).await;
    assert_eq!(after.len(), 1, "{after:?}");
    let cleared = &after[0];
    assert_eq!(
        (
            cleared.device_id.as_str(),
            cleared.rule.as_str(),
            cleared.event,
            cleared.cause
        ),
        (
            "del-1",
            "del-hot",
            Kind::Cleared,
            Some(schemas::alarm::Cause::RuleDeleted)
        )
    );
    assert_eq!(
        cleared.id,
        format!("del-1|del-hot|cleared|deleted|{}", now - 2_000)
    );
    let (_, out, _) = tool(&p, &["list"], None).await;
    assert!(out.contains("No alarm is raised or pending."), "{out}");
    let rows = table.query("PartitionKey ne 'x'").await.unwrap();
    let left: Vec<_> = rows
        .iter()
        .map(|e| format!("{}/{}", e["PartitionKey"], e["RowKey"]))
        .collect();
    assert!(left.is_empty(), "rows left: {left:?}");

    // Once more: nothing to delete, nothing sent.
    let (ok, out, err) = tool(&p, &args, None).await;
    assert!(ok && err.contains(r#"No rule "del-hot""#), "{out}{err}");
    drain(&p, &mut after).await;
    assert_eq!(after.len(), 1);
}
