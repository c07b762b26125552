//! Shards by device, with real servers: three Azurite instances as three storage accounts, one
//! ingest dealing each device's messages to its shard's queue (`STORAGE_SHARDS_FILE`), and a
//! processor per shard. Under steady load with every fault kind of the simulator, ingest and
//! two processors are killed with SIGKILL, and one account is stopped for 30 s. Then, from the
//! simulator's exact accounting: every valid reading is one row, in its device's shard and no
//! other, with the values sent; every refused one is a dead letter in its device's shard;
//! nothing is lost. Probe readings, one device per shard, time publish-to-row throughout: the
//! other shards' p99 during the outage is reported and bounded, and the stopped shard's
//! probes wait out the outage and then arrive.

use loadtest::measure::{self, Probes};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tests::accounting::{simulate, Expected, Keyed, ALL_FAULTS};
use tests::{unique, Azurite, Mosquitto, Service, TempDir};
use tokio_util::sync::CancellationToken;

const SHARDS: usize = 3;
/// The shard whose account is stopped.
const DOWN: usize = 1;
const OUTAGE: Duration = Duration::from_secs(30);
/// Seconds of load: 90 devices a second.
const LOAD_SECONDS: u64 = 75;

/// A device id of the probe that lands in `shard`.
fn probe_device(shard: usize) -> String {
    (0..)
        .map(|i| format!("probe-{shard}-{i}"))
        .find(|id| schemas::shard::of(id, SHARDS) == shard)
        .expect("some id lands in every shard")
}

fn mqtt(url: &str) -> infra::mqtt::Connection {
    use clap::Parser;
    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        mqtt: infra::mqtt::MqttArgs,
    }
    Args::parse_from(["t", "--mqtt-url", url])
        .mqtt
        .connection()
        .expect("the broker's URL")
}

/// p99 of the latencies of probes sent in `window` (seconds since start); lost probes count
/// as infinitely late.
fn p99(probes: &[(f64, Option<f64>)], window: std::ops::Range<f64>) -> f64 {
    let mut late: Vec<f64> = probes
        .iter()
        .filter(|(sent, _)| window.contains(sent))
        .map(|(_, latency)| latency.unwrap_or(f64::INFINITY))
        .collect();
    late.sort_by(f64::total_cmp);
    measure::quantile(&late, 0.99)
}

#[tokio::test]
async fn each_device_lives_in_its_shard_through_kills_and_an_account_outage() {
    if !tests::servers_available("shards") {
        return;
    }
    let mosquitto = Mosquitto::start().await;
    let (a, b, c) = tokio::join!(Azurite::start(), Azurite::start(), Azurite::start());
    let mut azurites = [a, b, c];
    let dir = TempDir::new("shards");
    let shards_file = dir.0.join("shards");
    let lines: Vec<String> = azurites.iter().map(Azurite::connection_string).collect();
    std::fs::write(
        &shards_file,
        format!("# three emulators\n{}\n", lines.join("\n")),
    )
    .unwrap();
    let (queue, dead, quarantine) = (unique("ingest"), unique("dead"), unique("quarantine"));
    let (table, devices) = (unique("telemetry"), unique("devices"));
    let mut ingest = Service::start(
        "ingest",
        &[
            ("MQTT_URL", mosquitto.url()),
            ("STORAGE_SHARDS_FILE", shards_file.display().to_string()),
            ("STORAGE_TIMEOUT", "5s".into()),
            ("INGEST_QUEUE_NAME", queue.clone()),
            ("INGEST_CLIENT_ID", unique("ingest")),
        ],
    )
    .await;
    let mut processors = Vec::new();
    for azurite in &azurites {
        let env = [
            (
                "AZURE_STORAGE_CONNECTION_STRING",
                azurite.connection_string(),
            ),
            ("STORAGE_TIMEOUT", "5s".into()),
            ("PROCESSOR_QUEUE_NAME", queue.clone()),
            ("PROCESSOR_DEAD_LETTER_QUEUE", dead.clone()),
            ("PROCESSOR_QUARANTINE_QUEUE", quarantine.clone()),
            ("PROCESSOR_TABLE_NAME", table.clone()),
            ("PROCESSOR_DEVICE_TABLE", devices.clone()),
            ("PROCESSOR_VISIBILITY_TIMEOUT", "20s".into()),
        ];
        processors.push(Service::start("processor", &env).await);
    }

    let start = Instant::now();
    let (load_done, stop) = (CancellationToken::new(), CancellationToken::new());
    let probes: Vec<Probes> = (0..SHARDS).map(|_| Probes::default()).collect();
    let probers: Vec<_> = (0..SHARDS)
        .map(|shard| {
            tokio::spawn(measure::probe(
                mqtt(&mosquitto.url()),
                azurites[shard].account().table(&table),
                probe_device(shard),
                start,
                probes[shard].clone(),
                load_done.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let live = simulate(
        mosquitto.url(),
        vec![
            ("SIMULATOR_DEVICES", "90".into()),
            ("SIMULATOR_INTERVAL", "1s".into()),
            ("SIMULATOR_ROUNDS", LOAD_SECONDS.to_string()),
            ("SIMULATOR_FAULTS", ALL_FAULTS.into()),
        ],
    );

    let at = |s: u64| tokio::time::sleep_until((start + Duration::from_secs(s)).into());
    at(8).await;
    eprintln!("shards: kill -9 ingest");
    ingest.restart_now().await;
    at(14).await;
    eprintln!("shards: kill -9 processor 0");
    processors[0].restart_now().await;
    at(20).await;
    eprintln!("shards: stop the account of shard {DOWN} for {OUTAGE:?}");
    let outage_from = start.elapsed().as_secs_f64();
    azurites[DOWN].stop().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let acked = || ingest.metric("ingest_messages_acked_total");
    let acked_early = acked().await;
    tokio::time::sleep(OUTAGE - Duration::from_secs(5)).await;
    let acked_late = acked().await;
    azurites[DOWN].start_again().await;
    let outage_to = start.elapsed().as_secs_f64();
    assert!(
        acked_late > acked_early + 100.0,
        "ingest acknowledged {acked_early} then {acked_late}: the other shards' messages \
         waited for the stopped one"
    );
    at(60).await;
    eprintln!("shards: kill -9 processor 2");
    processors[2].restart_now().await;
    let summary = live.await.expect("the simulator");
    load_done.cancel();
    let expected = Expected::from_summaries(&[summary]);

    // Every valid reading, once, in its device's shard.
    let settle_until = Instant::now() + Duration::from_secs(240);
    let mut by_shard: Vec<Keyed> = vec![Keyed::new(); SHARDS];
    loop {
        for (shard, azurite) in azurites.iter().enumerate() {
            if let Some(rows) = tests::accounting::stored(&azurite.account(), &table).await {
                by_shard[shard] = rows
                    .into_iter()
                    .filter(|((device, _), _)| !device.starts_with("probe-"))
                    .collect();
            }
        }
        let total: usize = by_shard.iter().map(Keyed::len).sum();
        if total as u64 >= expected.rows || Instant::now() >= settle_until {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // A prober returns once every probe it sent is seen; a last look at `stop`.
    let last_look = stop.clone();
    let give_up = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        last_look.cancel();
    });
    for prober in probers {
        prober.await.expect("a prober");
    }
    give_up.abort();
    let mut all = Keyed::new();
    for (shard, rows) in by_shard.iter().enumerate() {
        for ((device, row_key), digest) in rows {
            assert_eq!(
                schemas::shard::of(device, SHARDS),
                shard,
                "{device} {row_key} stored in shard {shard}"
            );
            assert!(
                all.insert((device.clone(), row_key.clone()), *digest)
                    .is_none(),
                "{device} {row_key} in two shards"
            );
        }
    }
    let digest = all.values().fold(0u64, |sum, d| sum.wrapping_add(*d));
    assert_eq!(
        (all.len() as u64, digest),
        (expected.rows, expected.digest),
        "rows and values stored against the simulator's accounting"
    );

    // Every refusal, a dead letter in its device's shard: taken off every shard until all
    // are there and none came for 10 s more (redone rounds add late ones).
    let mut letters: Vec<Vec<schemas::DeadLetter>> = vec![Vec::new(); SHARDS];
    let until = Instant::now() + Duration::from_secs(120);
    let mut quiet_from: Option<Instant> = None;
    let refused = loop {
        let mut more = false;
        for (shard, azurite) in azurites.iter().enumerate() {
            for (_, records) in
                tests::storage::drain_dead_letter_messages(&azurite.account(), &dead).await
            {
                more = true;
                letters[shard].extend(records);
            }
        }
        let mut refused: BTreeMap<String, u64> = BTreeMap::new();
        for record in letters.iter().flatten() {
            *refused
                .entry(record.reason.as_str().to_owned())
                .or_default() += 1;
        }
        if more {
            quiet_from = None;
        }
        let complete = expected
            .dead
            .iter()
            .all(|(reason, want)| refused.get(reason).copied().unwrap_or(0) >= *want);
        let quiet = complete
            && quiet_from.get_or_insert_with(Instant::now).elapsed() >= Duration::from_secs(10);
        if quiet || Instant::now() >= until {
            break refused;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    for (shard, records) in letters.iter().enumerate() {
        for record in records {
            if let Some(device) = schemas::reading::device_id_from_topic("devices", &record.topic) {
                assert_eq!(
                    schemas::shard::of(device, SHARDS),
                    shard,
                    "a dead letter of {device} in shard {shard}"
                );
            }
        }
    }
    for (reason, want) in &expected.dead {
        let got = refused.get(reason).copied().unwrap_or(0);
        assert!(
            got >= *want,
            "{reason}: {got} dead letters for {want} refused"
        );
    }

    // Latency: the other shards flowed during the outage; the stopped one caught up.
    let window = outage_from..outage_to;
    let mut report = Vec::new();
    for (shard, probes) in probes.iter().enumerate() {
        let probes = measure::lock(probes).clone();
        let lost = probes.iter().filter(|p| p.1.is_none()).count();
        assert_eq!(lost, 0, "shard {shard}: {lost} probes never stored");
        let during = p99(&probes, window.clone());
        let before = p99(&probes, 0.0..window.start);
        report.push(format!(
            "shard {shard}: p99 {before:.2} s before the outage, {during:.2} s during it"
        ));
        if shard == DOWN {
            assert!(during >= 10.0, "shard {shard} stored during its outage?");
        } else {
            assert!(
                during < 15.0,
                "shard {shard} held back by shard {DOWN}'s outage: {report:?}"
            );
        }
    }
    eprintln!("shards: publish-to-row latency, {}", report.join("; "));
    // A clean stop with several shards: every packer flushes, the last PUBACKs leave.
    ingest
        .terminate(ingest::MAX_SHUTDOWN + Duration::from_secs(5))
        .await;
}

/// Growing from two shards to three mid-run: ingest restarted with a third account in its
/// shards file, a processor started for it. The dashboard, told the earlier count and when
/// it ended, finds every reading of every device through its API, also those of the devices
/// that moved (their older readings stay in their old shard), and lists each device once.
#[tokio::test]
async fn after_growing_from_two_shards_to_three_every_reading_is_found() {
    if !tests::servers_available("resharding") {
        return;
    }
    let mosquitto = Mosquitto::start().await;
    let (a, b, c) = tokio::join!(Azurite::start(), Azurite::start(), Azurite::start());
    let azurites = [a, b, c];
    let dir = TempDir::new("reshard");
    let shards_file = dir.0.join("shards");
    let write_shards = |n: usize| {
        let lines: Vec<String> = azurites[..n]
            .iter()
            .map(Azurite::connection_string)
            .collect();
        std::fs::write(&shards_file, lines.join("\n")).unwrap();
    };
    write_shards(2);
    let (queue, table, devices) = (unique("ingest"), unique("telemetry"), unique("devices"));
    let mut ingest = Service::start(
        "ingest",
        &[
            ("MQTT_URL", mosquitto.url()),
            ("STORAGE_SHARDS_FILE", shards_file.display().to_string()),
            ("INGEST_QUEUE_NAME", queue.clone()),
            ("INGEST_CLIENT_ID", unique("ingest")),
        ],
    )
    .await;
    let processor_env = |azurite: &Azurite| {
        vec![
            (
                "AZURE_STORAGE_CONNECTION_STRING",
                azurite.connection_string(),
            ),
            ("PROCESSOR_QUEUE_NAME", queue.clone()),
            ("PROCESSOR_TABLE_NAME", table.clone()),
            ("PROCESSOR_DEVICE_TABLE", devices.clone()),
        ]
    };
    let mut processors = Vec::new();
    for azurite in &azurites[..2] {
        processors.push(Service::start("processor", &processor_env(azurite)).await);
    }
    let from = schemas::timefmt::now_ms() - 60_000;
    let live = simulate(
        mosquitto.url(),
        vec![
            ("SIMULATOR_DEVICES", "60".into()),
            ("SIMULATOR_INTERVAL", "1s".into()),
            ("SIMULATOR_ROUNDS", "40".into()),
        ],
    );
    tokio::time::sleep(Duration::from_secs(15)).await;
    // The switch: the old ingest stops (what it holds goes to its two shards or back to the
    // broker), then every message is dealt among three.
    ingest
        .terminate(ingest::MAX_SHUTDOWN + Duration::from_secs(5))
        .await;
    let switched_at = schemas::timefmt::now_ms();
    write_shards(3);
    processors.push(Service::start("processor", &processor_env(&azurites[2])).await);
    ingest.restart().await;
    let expected = Expected::from_summaries(&[live.await.expect("the simulator")]);

    // Settled: every reading is a row in one of the three accounts.
    let want = expected.rows;
    let stored: Vec<Keyed> =
        tests::wait_for("every reading stored", Duration::from_secs(120), || {
            let accounts: Vec<_> = azurites.iter().map(Azurite::account).collect();
            let table = table.clone();
            async move {
                let mut found = Vec::new();
                for account in &accounts {
                    found.push(tests::accounting::stored(account, &table).await?);
                }
                // A reading redelivered across the switch may be a row in its old shard and
                // its new one: the same reading, counted once.
                let distinct: std::collections::BTreeSet<&(String, String)> =
                    found.iter().flat_map(Keyed::keys).collect();
                (distinct.len() as u64 >= want).then_some(found)
            }
        })
        .await;
    let moved: Vec<&String> = stored[2]
        .keys()
        .map(|(device, _)| device)
        .filter(|d| stored[..2].iter().any(|s| s.keys().any(|(o, _)| o == *d)))
        .collect();
    assert!(
        !moved.is_empty(),
        "no device has readings in an old shard and the new one"
    );

    let dashboard = Service::start(
        "dashboard",
        &[
            ("STORAGE_SHARDS_FILE", shards_file.display().to_string()),
            ("DASHBOARD_TABLE_NAME", table.clone()),
            ("DASHBOARD_DEVICE_TABLE", devices.clone()),
            (
                "DASHBOARD_SHARDS_BEFORE",
                format!("2@{}", schemas::timefmt::format_ms(switched_at)),
            ),
        ],
    )
    .await;
    let port = dashboard.metrics_port;
    let listed = crate::dashboard::get(port, "/api/v1/devices?limit=1000").await;
    assert_eq!(listed.status, 200);
    let ids: Vec<String> = listed.json()["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 60, "each device listed once: {ids:?}");
    let to = schemas::timefmt::now_ms() + 60_000;
    let mut found = 0u64;
    for id in &ids {
        let path = format!(
            "/api/v1/devices/{id}/readings?from={}&to={}",
            schemas::timefmt::format_ms(from),
            schemas::timefmt::format_ms(to)
        );
        let answer = crate::dashboard::get(port, &path).await;
        assert_eq!(answer.status, 200, "{path}");
        let readings = answer.json()["readings"].as_array().unwrap().len() as u64;
        let rows = stored
            .iter()
            .flat_map(|s| s.keys())
            .filter(|(device, _)| device == id)
            .collect::<std::collections::BTreeSet<_>>()
            .len() as u64;
        assert_eq!(
            readings, rows,
            "{id}: readings the API finds, of its rows in every shard"
        );
        found += readings;
    }
    assert_eq!(found, expected.rows, "every reading found through the API");
    // A moved device's readings, a page of 7 at a time across both its shards: in order,
    // none twice, none missing.
    let id = moved[0];
    let mut path = format!(
        "/api/v1/devices/{id}/readings?from={}&to={}&limit=7",
        schemas::timefmt::format_ms(from),
        schemas::timefmt::format_ms(to)
    );
    let mut walked: Vec<String> = Vec::new();
    loop {
        let page = crate::dashboard::get(port, &path).await.json();
        walked.extend(
            page["readings"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["measuredAt"].as_str().unwrap().to_owned()),
        );
        match page["next"].as_str() {
            Some(next) => path = next.to_owned(),
            None => break,
        }
    }
    let rows: std::collections::BTreeSet<&String> = stored
        .iter()
        .flat_map(|s| s.keys())
        .filter(|(device, _)| device == id)
        .map(|(_, row_key)| row_key)
        .collect();
    assert!(walked.windows(2).all(|w| w[0] < w[1]), "{id}: {walked:?}");
    assert_eq!(walked.len(), rows.len(), "{id}: walked {walked:?}");
    let pipeline = crate::dashboard::get(port, "/api/v1/pipeline").await.json();
    assert_eq!(pipeline["shards"], 3);
}
