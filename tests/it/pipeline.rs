//! The happy path and every kind of refusal, end to end.

use crate::Pipeline;
use schemas::timefmt::{format_ms, now_ms};
use schemas::Reason;
use std::collections::BTreeMap;
use std::time::Duration;
use tests::storage::{drain_dead_letters, publish_all, reading, topic};

#[tokio::test]
async fn readings_become_typed_rows_and_refusals_become_dead_letters() {
    let Some(mut p) = Pipeline::start("pipeline", &[], &[]).await else {
        return;
    };
    let now = now_ms();
    let devices = 200;
    let mut messages = Vec::new();
    for d in 0..devices {
        let id = format!("dev-{d:03}");
        for k in 0..3u64 {
            messages.push((
                topic(&id),
                reading(&id, now - 60_000 * (k as i64 + 1) - d, k),
            ));
        }
    }
    // A gateway array of 5 readings, and one reading delivered twice.
    let gw: Vec<String> = (0..5)
        .map(|k| {
            format!(
                r#"{{"deviceId":"gw-1","timestamp":"{}","temperature":{k}.5,"fw":"2.1","battery":9007199254740993}}"#,
                format_ms(now - 1_000 * (k + 1))
            )
        })
        .collect();
    messages.push((topic("gw-1"), format!("[{}]", gw.join(",")).into_bytes()));
    messages.push((topic("dev-000"), reading("dev-000", now - 60_000, 0)));
    let valid_rows = devices as usize * 3 + 5;

    // One of every refusal the contract defines for device input.
    let ts = format_ms(now - 5_000);
    let invalid: Vec<(Reason, String, Vec<u8>)> = vec![
        (Reason::MalformedJson, topic("bad-1"), b"{not json".to_vec()),
        (
            Reason::MalformedJson,
            topic("bad-2"),
            vec![0xff, 0xfe, 0x00, 0x7b],
        ),
        (
            Reason::Schema,
            topic("bad-3"),
            format!(r#"{{"deviceId":"bad-3","timestamp":"{ts}"}}"#).into_bytes(),
        ),
        (
            Reason::InvalidDeviceId,
            topic("-bad"),
            format!(r#"{{"deviceId":"-bad","timestamp":"{ts}","temperature":1}}"#).into_bytes(),
        ),
        (
            Reason::DeviceMismatch,
            topic("bad-5"),
            format!(r#"{{"deviceId":"someone-else","timestamp":"{ts}","temperature":1}}"#)
                .into_bytes(),
        ),
        (
            Reason::InvalidTimestamp,
            topic("bad-6"),
            br#"{"deviceId":"bad-6","timestamp":"2024-13-45T99:00:00Z","temperature":1}"#.to_vec(),
        ),
        (
            Reason::FutureTimestamp,
            topic("bad-7"),
            format!(
                r#"{{"deviceId":"bad-7","timestamp":"{}","temperature":1}}"#,
                format_ms(now + 3_600_000)
            )
            .into_bytes(),
        ),
        (
            Reason::Stale,
            topic("bad-8"),
            br#"{"deviceId":"bad-8","timestamp":"2020-01-01T00:00:00Z","temperature":1}"#.to_vec(),
        ),
        (
            Reason::OutOfRange,
            topic("bad-9"),
            format!(r#"{{"deviceId":"bad-9","timestamp":"{ts}","humidity":140}}"#).into_bytes(),
        ),
        (Reason::TooLarge, topic("bad-10"), {
            let mut big =
                format!(r#"{{"deviceId":"bad-10","timestamp":"{ts}","temperature":1,"pad":""#)
                    .into_bytes();
            big.extend(std::iter::repeat_n(b'x', 40_000));
            big.extend_from_slice(b"\"}");
            big
        }),
    ];
    messages.extend(invalid.iter().map(|(_, t, b)| (t.clone(), b.clone())));
    // The signal that makes a replica leave its share group is ignored without one: dropping
    // the only subscription would route everything below nowhere.
    p.ingest.signal("USR1");
    publish_all(p.mosquitto.port, messages).await;

    let rows = p.wait_rows(valid_rows, Duration::from_secs(90)).await;
    let dead = tests::wait_for(
        "every refusal dead-lettered",
        Duration::from_secs(60),
        || async {
            (p.processor.metric("processor_dead_letters_total").await >= invalid.len() as f64)
                .then_some(())
        },
    );
    dead.await;
    assert_eq!(
        rows.len(),
        valid_rows,
        "exactly one row per distinct reading"
    );

    // Values and EDM types, read back through the table API.
    let by_key: BTreeMap<(String, String), &infra::storage::Entity> = rows
        .iter()
        .map(|e| {
            (
                (
                    e["PartitionKey"].as_str().unwrap().to_owned(),
                    e["RowKey"].as_str().unwrap().to_owned(),
                ),
                e,
            )
        })
        .collect();
    let key = ("dev-007".to_owned(), format_ms(now - 60_000 * 2 - 7));
    let row = by_key
        .get(&key)
        .unwrap_or_else(|| panic!("row {key:?} missing"));
    assert_eq!(row["Seq@odata.type"], "Edm.Int64");
    assert_eq!(row["Seq"], "1");
    assert_eq!(row["MeasuredAt@odata.type"], "Edm.DateTime");
    assert_eq!(row["IngestedAt@odata.type"], "Edm.DateTime");
    let stored = schemas::entity::from_entity(row).expect("row reads back");
    assert_eq!(stored.reading.measured_at_ms, now - 60_000 * 2 - 7);
    assert_eq!(stored.reading.temperature, Some(20.1));
    assert_eq!(stored.reading.humidity, Some(50.0));
    assert_eq!(stored.reading.pressure, Some(1013.5));
    let gw_row = by_key
        .get(&("gw-1".to_owned(), format_ms(now - 1_000)))
        .expect("gateway row");
    assert_eq!(
        gw_row["Ext_battery"], "9007199254740993",
        "Int64 extras keep full precision"
    );
    assert_eq!(gw_row["Ext_battery@odata.type"], "Edm.Int64");
    assert_eq!(gw_row["Ext_fw"], "2.1");

    // Every refusal: the right reason and the byte-exact payload.
    let dead = drain_dead_letters(&p.account, &p.dead_letters).await;
    assert_eq!(dead.len(), invalid.len(), "{dead:#?}");
    for (reason, t, payload) in &invalid {
        let record = dead
            .iter()
            .find(|d| &d.topic == t && d.reason == *reason)
            .unwrap_or_else(|| panic!("no {reason} dead letter for {t}: {dead:#?}"));
        assert!(!record.detail.is_empty());
        assert_eq!(record.payload_bytes, payload.len());
        let recorded = record.payload_bytes().unwrap();
        if record.payload_truncated {
            assert_eq!(*reason, Reason::TooLarge);
            assert_eq!(recorded[..], payload[..recorded.len()]);
        } else {
            assert_eq!(&recorded, payload, "{reason} payload is byte-exact");
        }
        assert_eq!(record.source, "mqtt");
        assert!(record.attempts >= 1);
    }

    // SIGTERM: both services flush and exit cleanly.
    p.ingest.terminate(Duration::from_secs(20)).await;
    p.processor.terminate(Duration::from_secs(60)).await;

    // The device table lists every device with stored rows, with its newest reading (the
    // processor's last flush on SIGTERM wrote the final state).
    let mut newest: BTreeMap<String, String> = BTreeMap::new();
    for e in &rows {
        let (pk, rk) = (
            e["PartitionKey"].as_str().unwrap(),
            e["RowKey"].as_str().unwrap(),
        );
        let slot = newest.entry(pk.to_owned()).or_default();
        if rk > slot.as_str() {
            *slot = rk.to_owned();
        }
    }
    let device_rows = tests::storage::rows(&p.account, &p.devices).await.unwrap();
    let listed: BTreeMap<String, String> = device_rows
        .iter()
        .map(|e| {
            assert_eq!(e["PartitionKey"], schemas::device::PARTITION);
            assert_eq!(e["FirstSeen@odata.type"], "Edm.DateTime");
            let stored = schemas::entity::from_entity(&{
                let mut e = e.clone();
                e.insert("PartitionKey".into(), e["RowKey"].clone());
                e
            })
            .unwrap();
            (
                stored.reading.device_id,
                format_ms(stored.reading.measured_at_ms),
            )
        })
        .collect();
    assert_eq!(listed, newest);
}

/// A processor that remembers only 4 devices, restarted with a kill -9 between two rounds of
/// readings from 30 devices (and 10 new ones in the second): every device keeps the
/// `FirstSeen` its first registration wrote, its row carries its newest reading, and the
/// forgotten devices were found to have rows by the transactions themselves.
#[tokio::test]
async fn a_processor_that_forgets_devices_keeps_their_first_sighting() {
    let cache = [("PROCESSOR_DEVICE_CACHE", "4".to_owned())];
    let Some(mut p) = Pipeline::start("forgetful_registry", &[], &cache).await else {
        return;
    };
    let now = now_ms();
    let first_round: Vec<(String, Vec<u8>)> = (0..30)
        .map(|d| {
            let id = format!("fs-{d:02}");
            (topic(&id), reading(&id, now - 120_000, 0))
        })
        .collect();
    publish_all(p.mosquitto.port, first_round).await;
    p.wait_rows(30, Duration::from_secs(60)).await;
    let device_rows = |p: &Pipeline| {
        let (account, devices) = (p.account.clone(), p.devices.clone());
        async move {
            tests::storage::rows(&account, &devices)
                .await
                .unwrap()
                .into_iter()
                .map(|e| {
                    let id = e["RowKey"].as_str().unwrap().to_owned();
                    let first = e[schemas::device::FIRST_SEEN].as_str().unwrap().to_owned();
                    let measured = e["MeasuredAt"].as_str().unwrap().to_owned();
                    (id, (first, measured))
                })
                .collect::<BTreeMap<String, (String, String)>>()
        }
    };
    // A device's row is written before its messages are deleted, not before its readings'
    // rows can be read.
    let before = tests::wait_for("30 device rows", Duration::from_secs(60), || {
        let rows = device_rows(&p);
        async move { Some(rows.await).filter(|r| r.len() == 30) }
    })
    .await;

    p.processor.kill9().await;
    p.processor.restart().await;
    let second_round: Vec<(String, Vec<u8>)> = (0..40)
        .map(|d| {
            let id = format!("fs-{d:02}");
            (topic(&id), reading(&id, now - 60_000, 1))
        })
        .collect();
    publish_all(p.mosquitto.port, second_round).await;
    p.wait_rows(70, Duration::from_secs(60)).await;
    let wrong = p
        .processor
        .metric("processor_devices_presumed_wrongly_total")
        .await;
    assert!(
        wrong >= 1.0,
        "the new devices were presumed to have rows: {wrong}"
    );
    assert!(p.processor.metric("processor_devices_known").await <= 4.0);
    p.processor.terminate(Duration::from_secs(20)).await;

    let after = device_rows(&p).await;
    assert_eq!(after.len(), 40, "{after:?}");
    let newest = format_ms(now - 60_000);
    for (id, (first, measured)) in &after {
        assert_eq!(measured, &newest, "{id}: its newest reading");
        if let Some((was, _)) = before.get(id) {
            assert_eq!(first, was, "{id}: FirstSeen kept");
        }
    }
}
