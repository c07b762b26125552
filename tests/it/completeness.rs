//! The completeness ledger end to end: the simulator loses known messages on the devices'
//! side (`drop`), also delivers out of order and twice, and the dashboard's gaps API must name
//! exactly the `seq` numbers lost, device by device.

use crate::Pipeline;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tests::accounting::{simulate, Expected};
use tests::services::http_get;
use tests::{unique, Service};

#[tokio::test]
async fn the_gaps_api_names_exactly_the_readings_the_devices_lost() {
    let Some(p) = Pipeline::start("completeness", &[], &[]).await else {
        return;
    };
    let started = schemas::timefmt::now_ms();
    let prefix = unique("gap");
    let devices = 12;
    let summary = simulate(
        p.mosquitto.url(),
        vec![
            ("SIMULATOR_DEVICES", devices.to_string()),
            ("SIMULATOR_DEVICE_PREFIX", prefix.clone()),
            ("SIMULATOR_INTERVAL", "200ms".into()),
            ("SIMULATOR_ROUNDS", "60".into()),
            (
                "SIMULATOR_FAULTS",
                "drop=0.1,out_of_order=0.05,duplicate=0.05".into(),
            ),
        ],
    )
    .await
    .expect("the simulator");
    let expected = Expected::from_summaries(std::slice::from_ref(&summary));
    assert!(
        summary["injected"]["drop"].as_u64().unwrap() >= 20,
        "too few drops to prove anything: {summary}"
    );
    let rows = p
        .wait_rows(expected.rows as usize, Duration::from_secs(120))
        .await;

    // What each device stored and lost.
    let mut stored: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    for e in &rows {
        let r = schemas::entity::from_entity(e)
            .expect("a reading row")
            .reading;
        stored
            .entry(r.device_id.clone())
            .or_default()
            .insert(r.seq.expect("numbered"));
    }
    let mut lost: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    for d in summary["dropped"].as_array().expect("dropped") {
        let (first, last) = (d["first"].as_i64().unwrap(), d["last"].as_i64().unwrap());
        lost.entry(d["device"].as_str().unwrap().to_owned())
            .or_default()
            .extend(first..=last);
    }
    assert_eq!(
        lost.values().map(BTreeSet::len).sum::<usize>() as u64,
        summary["injected"]["drop"].as_u64().unwrap(),
        "one reading a message, every drop listed"
    );

    let dashboard = Service::start(
        "dashboard",
        &[
            (
                "AZURE_STORAGE_CONNECTION_STRING",
                p.azurite.connection_string(),
            ),
            ("DASHBOARD_TABLE_NAME", p.table.clone()),
            ("DASHBOARD_DEVICE_TABLE", p.devices.clone()),
            ("DASHBOARD_ARCHIVE_CONTAINER", unique("archive")),
        ],
    )
    .await;
    let from = schemas::timefmt::format_ms(started - 60_000);
    let mut reported_total = 0;
    for (device, seqs) in &stored {
        let (lo, hi) = (*seqs.first().unwrap(), *seqs.last().unwrap());
        // A loss shows as a gap only between two stored readings.
        let want: BTreeSet<i64> = lost
            .get(device)
            .map(|l| l.range(lo + 1..hi).copied().collect())
            .unwrap_or_default();
        assert!(
            (lo..=hi).all(|s| seqs.contains(&s) || want.contains(&s)),
            "{device}: a reading neither stored nor lost"
        );
        let (status, body) = http_get(
            dashboard.metrics_port,
            &format!("/api/v1/devices/{device}/gaps?from={from}"),
        )
        .await
        .expect("the gaps API answers");
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let mut got = BTreeSet::new();
        for g in v["gaps"].as_array().unwrap() {
            let (first, last) = (g["first"].as_i64().unwrap(), g["last"].as_i64().unwrap());
            assert_eq!(g["count"].as_i64().unwrap(), last - first + 1);
            assert!(g["after"].as_str().unwrap() <= g["before"].as_str().unwrap());
            got.extend(first..=last);
        }
        assert_eq!(got, want, "{device}: the gaps API against the drops");
        assert_eq!(v["missing"].as_u64().unwrap(), want.len() as u64);
        reported_total += want.len();
    }
    assert!(reported_total > 0, "no gap between stored readings at all");
    eprintln!(
        "completeness: {} drops, {reported_total} of them between stored readings, all reported",
        summary["injected"]["drop"]
    );
}
