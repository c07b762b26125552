//! The completeness ledger end to end: the simulator loses known messages on the devices'
//! side (`drop`), sends readings the pipeline refuses (out of range, stale), also delivers out
//! of order and twice, and the dashboard's gaps API must name exactly the `seq` numbers lost,
//! and those refused with their reasons, device by device: first from the readings alone (no
//! hour rolled up yet), then with every hour rolled up (complete hours answered from their
//! ledger).

use crate::Pipeline;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tests::accounting::{simulate, Expected};
use tests::services::http_get;
use tests::{unique, Service};

#[tokio::test]
async fn the_gaps_api_names_exactly_the_readings_the_devices_lost() {
    let rollups = unique("rollups");
    let processor_env = [("PROCESSOR_ROLLUP_TABLE", rollups.clone())];
    let Some(p) = Pipeline::start("completeness", &[], &processor_env).await else {
        return;
    };
    let started = schemas::timefmt::now_ms();
    let run = |prefix: &str, devices: usize, faults: &str| {
        simulate(
            p.mosquitto.url(),
            vec![
                ("SIMULATOR_DEVICES", devices.to_string()),
                ("SIMULATOR_DEVICE_PREFIX", unique(prefix)),
                ("SIMULATOR_INTERVAL", "200ms".into()),
                ("SIMULATOR_ROUNDS", "60".into()),
                ("SIMULATOR_FAULTS", faults.into()),
            ],
        )
    };
    // Devices that lose messages, and a few that lose none (whose hours are complete).
    let (lossy, whole) = tokio::join!(
        run(
            "gap",
            12,
            "drop=0.1,out_of_range=0.04,stale=0.03,out_of_order=0.05,duplicate=0.05"
        ),
        run("whole", 3, "out_of_order=0.05,duplicate=0.05")
    );
    let (summary, whole) = (lossy.expect("the simulator"), whole.expect("the simulator"));
    let expected = Expected::from_summaries(&[summary.clone(), whole]);
    let drops = summary["injected"]["drop"].as_u64().unwrap();
    assert!(drops >= 20, "too few drops to prove anything: {summary}");
    let rows = p
        .wait_rows(expected.rows as usize, Duration::from_secs(120))
        .await;

    // What each device stored and lost.
    let mut stored: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    let mut readings: BTreeMap<String, Vec<schemas::Reading>> = BTreeMap::new();
    for e in &rows {
        let r = schemas::entity::from_entity(e)
            .expect("a reading row")
            .reading;
        stored
            .entry(r.device_id.clone())
            .or_default()
            .insert(r.seq.expect("numbered"));
        readings.entry(r.device_id.clone()).or_default().push(r);
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
        drops,
        "one reading a message, every drop listed"
    );
    let mut refused: BTreeMap<String, BTreeMap<i64, String>> = BTreeMap::new();
    for r in summary["refused"].as_array().expect("refused") {
        refused
            .entry(r["device"].as_str().unwrap().to_owned())
            .or_default()
            .insert(
                r["seq"].as_i64().unwrap(),
                r["reason"].as_str().unwrap().to_owned(),
            );
    }
    let refusals = refused.values().map(BTreeMap::len).sum::<usize>();
    assert!(
        refusals >= 10,
        "too few refusals to prove anything: {summary}"
    );
    // The refused numbers are recorded as their dead letters are written (a few seconds on).
    let processor = &p.processor;
    tests::wait_for(
        "the refused readings' numbers recorded",
        Duration::from_secs(60),
        || async move {
            (processor.metric("processor_refusals_recorded_total").await >= refusals as f64)
                .then_some(())
        },
    )
    .await;

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
            ("DASHBOARD_ROLLUP_TABLE", rollups.clone()),
        ],
    )
    .await;
    let from = schemas::timefmt::format_ms(started - 60_000);
    let expect = Expect {
        stored: &stored,
        lost: &lost,
        refused: &refused,
    };
    let reported = check(&dashboard, &from, &expect).await;
    assert!(reported.0 > 0, "no loss between stored readings at all");
    assert!(reported.1 > 0, "no refusal between stored readings at all");

    // Every hour rolled up, as the archiver's keeper does: the same gaps, with the whole
    // devices' hours now answered from their ledgers.
    let table = p.account.table(&rollups);
    table.create_if_missing().await.unwrap();
    let mut complete = 0;
    for list in readings.values_mut() {
        list.sort_by_key(|r| r.measured_at_ms);
        for hour in schemas::rollup::hourly(list) {
            complete += usize::from(hour.seqs.is_some_and(|q| q.missing == 0));
            table.upsert(&hour.to_entity()).await.unwrap();
        }
    }
    assert!(complete >= 3, "the whole devices' hours are complete");
    assert_eq!(check(&dashboard, &from, &expect).await, reported);
    eprintln!(
        "completeness: {drops} drops and {refusals} refusals; between stored readings, {} \
         missing and {} refused, all reported (from readings, and with {complete} complete \
         hours from their ledgers)",
        reported.0, reported.1
    );
}

/// What each device stored, lost and had refused.
struct Expect<'a> {
    stored: &'a BTreeMap<String, BTreeSet<i64>>,
    lost: &'a BTreeMap<String, BTreeSet<i64>>,
    refused: &'a BTreeMap<String, BTreeMap<i64, String>>,
}

/// Asks the gaps API about every device: it must name exactly the numbers lost between
/// stored ones, and those refused with their reasons. Returns how many of each it named.
async fn check(dashboard: &Service, from: &str, expect: &Expect<'_>) -> (usize, usize) {
    let mut reported = (0, 0);
    for (device, seqs) in expect.stored {
        let (lo, hi) = (*seqs.first().unwrap(), *seqs.last().unwrap());
        // A loss or a refusal shows only between two stored readings.
        let lost: BTreeSet<i64> = expect
            .lost
            .get(device)
            .map(|l| l.range(lo + 1..hi).copied().collect())
            .unwrap_or_default();
        let refused: BTreeMap<i64, String> = expect
            .refused
            .get(device)
            .map(|r| r.range(lo + 1..hi).map(|(s, r)| (*s, r.clone())).collect())
            .unwrap_or_default();
        let want: BTreeSet<i64> = lost.iter().chain(refused.keys()).copied().collect();
        assert!(
            (lo..=hi).all(|s| seqs.contains(&s) || want.contains(&s)),
            "{device}: a reading neither stored, lost nor refused"
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
        let mut got_refused = BTreeMap::new();
        for g in v["gaps"].as_array().unwrap() {
            let (first, last) = (g["first"].as_i64().unwrap(), g["last"].as_i64().unwrap());
            assert_eq!(g["count"].as_i64().unwrap(), last - first + 1);
            assert!(g["after"].as_str().unwrap() <= g["before"].as_str().unwrap());
            got.extend(first..=last);
            for r in g["refused"].as_array().unwrap() {
                let seq = r["seq"].as_i64().unwrap();
                assert!((first..=last).contains(&seq));
                got_refused.insert(seq, r["reason"].as_str().unwrap().to_owned());
            }
        }
        assert_eq!(
            got, want,
            "{device}: the gaps against the drops and refusals"
        );
        assert_eq!(
            got_refused, refused,
            "{device}: the refusals and their reasons"
        );
        assert_eq!(v["missing"].as_u64(), Some(lost.len() as u64), "{body}");
        assert_eq!(v["refused"].as_u64(), Some(refused.len() as u64), "{body}");
        reported.0 += lost.len();
        reported.1 += refused.len();
    }
    reported
}
