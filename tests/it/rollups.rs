//! Rollups against real Azurite, Mosquitto and the service binaries: exact under duplicates,
//! redeliveries and late data (compared with rollups computed here from the readings sent),
//! served by the dashboard, and rebuilt from the archive by `archiver rollups`.

use crate::archive::Store;
use crate::Pipeline;
use schemas::entity::StoredReading;
use schemas::reading::Reading;
use schemas::rollup::{FleetHour, Interval, Rollup, DAY_MS, HOUR_MS};
use schemas::timefmt::{format_ms, now_ms};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tests::storage::{publish_all, topic};
use tests::{unique, Service};

/// A reading as a device sends it, numbered, with a temperature that sums inexactly in binary.
fn payload(device: &str, at: i64, seq: i64, temperature: f64, humidity: Option<f64>) -> Vec<u8> {
    let humidity = humidity
        .map(|h| format!(",\"humidity\":{h}"))
        .unwrap_or_default();
    format!(
        "{{\"deviceId\":\"{device}\",\"timestamp\":\"{}\",\"seq\":{seq},\"temperature\":{temperature}{humidity}}}",
        format_ms(at)
    )
    .into_bytes()
}

/// A device numbers its readings by the 5 minutes since `BASE` hours before the test's hour.
const EVERY: i64 = 5 * 60_000;
const BASE: i64 = 5 * HOUR_MS;

type Sent = BTreeMap<(String, i64), (f64, Option<f64>, i64)>;
/// (device, RowKey) -> the period's readings, temperature minimum, maximum and sum, and
/// readings with a humidity.
type Want = BTreeMap<(String, String), Expected>;
type Expected = (u64, f64, f64, f64, u64);
type Values = Vec<(f64, Option<f64>)>;

/// Sends (into `messages`) a reading of `device` at `at` with random values, numbered by
/// its time from `base`, noting it.
fn add(
    sent: &mut Sent,
    (device, at, base): (&str, i64, i64),
    rng: &mut fastrand::Rng,
    messages: &mut Vec<(String, Vec<u8>)>,
) {
    let t = 15.0 + rng.f64() * 10.0;
    let h = rng.bool().then(|| (rng.f64() * 100.0).round());
    let seq = (at - base).div_euclid(EVERY);
    sent.insert((device.to_owned(), at), (t, h, seq));
    messages.push((topic(device), payload(device, at, seq, t, h)));
}

/// The fleet's completeness ledger of each hour, computed here from what was sent: per device,
/// the distinct numbers, those between its lowest and highest not sent, and those skipped since
/// the highest of its hour before (the numbers only rise with time here: no restarts).
fn fleet_expected(sent: &Sent) -> BTreeMap<i64, FleetHour> {
    let mut seqs: BTreeMap<(&str, i64), BTreeSet<i64>> = BTreeMap::new();
    for ((device, at), (_, _, seq)) in sent {
        seqs.entry((device, Interval::Hour.floor(*at)))
            .or_default()
            .insert(*seq);
    }
    let mut out: BTreeMap<i64, FleetHour> = BTreeMap::new();
    for ((device, hour), s) in &seqs {
        let (lo, hi) = (*s.first().unwrap(), *s.last().unwrap());
        let across = seqs
            .get(&(*device, hour - HOUR_MS))
            .map_or(0, |before| (lo - before.last().unwrap() - 1).max(0) as u64);
        let fleet = out.entry(*hour).or_default();
        fleet.devices += 1;
        fleet.distinct += s.len() as u64;
        fleet.missing += (hi - lo + 1) as u64 - s.len() as u64 + across;
    }
    out
}

async fn stored_fleet(p: &Pipeline, table: &str) -> BTreeMap<i64, FleetHour> {
    tests::storage::rows(&p.account, table)
        .await
        .unwrap_or_default()
        .iter()
        .filter(|e| e["PartitionKey"] == schemas::rollup::LEDGER)
        .filter_map(FleetHour::from_entity)
        .collect()
}

/// Waits up to three minutes for the stored rollups to be those of `sent`, computed again at
/// each look (a day that ends meanwhile has a daily rollup only once its last hour settled).
/// Returns them.
async fn rollups_match(p: &Pipeline, table: &str, sent: &Sent, when: &str) -> Want {
    let mut last = String::new();
    for _ in 0..180 {
        let want = expected(sent, now_ms());
        match matches(&want, &stored_rollups(p, table).await) {
            Ok(()) => return want,
            Err(why) => last = why,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("rollups {when}: {last}");
}

/// Waits up to a minute for the fleet ledger to hold `want` for its hours.
async fn fleet_matches(p: &Pipeline, table: &str, want: &BTreeMap<i64, FleetHour>, when: &str) {
    let mut got = BTreeMap::new();
    for _ in 0..60 {
        got = stored_fleet(p, table).await;
        got.retain(|hour, _| want.contains_key(hour));
        if &got == want {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("the fleet ledger {when}: stored {got:?}, expected {want:?}");
}

/// Rollups of `readings` (one per device and time), computed here, independently: by hour
/// and, for days that have ended, by day.
fn expected(readings: &Sent, now: i64) -> Want {
    let mut out: BTreeMap<(String, String), Values> = BTreeMap::new();
    for ((device, at), (t, h, _)) in readings {
        let values = (*t, *h);
        out.entry((
            device.clone(),
            Interval::Hour.row_key(Interval::Hour.floor(*at)),
        ))
        .or_default()
        .push(values);
        let day = Interval::Day.floor(*at);
        if day + DAY_MS <= now {
            out.entry((device.clone(), Interval::Day.row_key(day)))
                .or_default()
                .push(values);
        }
    }
    out.into_iter()
        .map(|(k, v)| {
            let t: Vec<f64> = v.iter().map(|(t, _)| *t).collect();
            let sum: f64 = t.iter().sum();
            let min = t.iter().copied().fold(f64::INFINITY, f64::min);
            let max = t.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let humid = v.iter().filter(|(_, h)| h.is_some()).count() as u64;
            (k, (t.len() as u64, min, max, sum, humid))
        })
        .collect()
}

/// Equal to 1e-9, relatively: the emulator keeps 15 significant digits of a double.
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

async fn stored_rollups(p: &Pipeline, table: &str) -> BTreeMap<(String, String), Rollup> {
    tests::storage::rows(&p.account, table)
        .await
        .unwrap_or_default()
        .iter()
        .filter_map(|e| Rollup::from_entity(e).ok())
        .map(|r| ((r.device_id.clone(), r.row_key()), r))
        .collect()
}

fn matches(want: &Want, got: &BTreeMap<(String, String), Rollup>) -> Result<(), String> {
    for (key, (count, min, max, sum, humid)) in want {
        let Some(r) = got.get(key) else {
            return Err(format!("no rollup {key:?}"));
        };
        let t = &r.stats[0];
        if r.count != *count
            || t.count != *count
            || !close(t.min, *min)
            || !close(t.max, *max)
            || !close(t.sum, *sum)
            || !close(t.mean().unwrap_or(f64::NAN), sum / *count as f64)
            || r.stats[1].count != *humid
        {
            return Err(format!("{key:?}: stored {r:?}, expected count {count}, min {min}, max {max}, sum {sum}, humidity count {humid}"));
        }
    }
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    if !extra.is_empty() {
        return Err(format!("rollups nothing explains: {extra:?}"));
    }
    Ok(())
}

#[tokio::test]
async fn rollups_stay_exact_under_duplicates_redeliveries_and_late_data() {
    let rollups = unique("rollups");
    let Some(p) = Pipeline::start(
        "rollups_exact",
        &[],
        &[("PROCESSOR_ROLLUP_TABLE", rollups.clone())],
    )
    .await
    else {
        return;
    };
    let now = now_ms();
    let hour = Interval::Hour.floor(now);
    let mut rng = fastrand::Rng::with_seed(7);
    // What the table will hold: one reading per device and millisecond (the last sent wins).
    let mut sent = Sent::new();
    let mut messages = Vec::new();
    // Three devices, readings over four hours ending more than an hour ago (so that every one
    // has been swept or marked, whenever in the hour the test runs).
    // Some numbers are never sent (gaps in the completeness ledger), one of them until later.
    let base = hour - BASE;
    let later = ("roll-b", 20);
    for device in ["roll-a", "roll-b", "roll-c"] {
        for k in 0..48 {
            // roll-a's 24 is the first of an hour: a loss at the boundary, the later hour's.
            if (device == "roll-c" && k % 11 == 5)
                || (device, k) == ("roll-a", 24)
                || (device, k) == later
            {
                continue;
            }
            let at = base + k * EVERY + rng.i64(0..60_000);
            add(&mut sent, (device, at, base), &mut rng, &mut messages);
        }
    }
    // Every fifth message twice: a redelivery the pipeline must not count twice.
    let again: Vec<_> = messages.iter().step_by(5).cloned().collect();
    messages.extend(again);
    publish_all(p.mosquitto.port, messages).await;
    p.wait_rows(sent.len(), Duration::from_secs(120)).await;

    let archiver_env = vec![
        (
            "AZURE_STORAGE_CONNECTION_STRING",
            p.azurite.connection_string(),
        ),
        ("ARCHIVER_TABLE_NAME", p.table.clone()),
        ("ARCHIVER_DEVICE_TABLE", p.devices.clone()),
        ("ARCHIVER_ROLLUP_TABLE", rollups.clone()),
        ("ARCHIVER_CONTAINER", unique("archive")),
        ("ARCHIVER_ROLLUP_SETTLE", "2m".into()),
        ("ARCHIVER_ROLLUP_INTERVAL", "1s".into()),
    ];
    let archiver = Service::start_with_args("archiver", &["run"], &archiver_env).await;
    rollups_match(&p, &rollups, &sent, "after the first readings").await;
    let fleet = fleet_expected(&sent);
    assert!(fleet.values().any(|f| f.missing > 0));
    fleet_matches(&p, &rollups, &fleet, "after the first readings").await;

    // Hours later, a device catches up: readings for an hour already rolled up, one of them
    // a new value for a time already stored (the row is overwritten: the rollup must follow).
    let mut late = Vec::new();
    for k in 0..10 {
        let at = hour - 4 * HOUR_MS + 30 * 60_000 + k * 1_000;
        add(&mut sent, ("roll-b", at, base), &mut rng, &mut late);
    }
    let (device, at) = sent.keys().find(|(d, _)| d == "roll-a").cloned().unwrap();
    add(&mut sent, (&device, at, base), &mut rng, &mut late);
    // And the number it had skipped: the fleet ledger of that hour must be summed again.
    let at = base + later.1 * EVERY + 1_000;
    add(&mut sent, (later.0, at, base), &mut rng, &mut late);
    publish_all(p.mosquitto.port, late).await;
    p.wait_rows(sent.len(), Duration::from_secs(60)).await;
    let want = rollups_match(&p, &rollups, &sent, "after late readings").await;
    let fleet_after = fleet_expected(&sent);
    assert_ne!(
        fleet_after, fleet,
        "the late readings change the fleet ledger"
    );
    fleet_matches(&p, &rollups, &fleet_after, "after late readings").await;
    assert!(
        p.processor
            .metric("processor_late_hours_marked_total")
            .await
            >= 2.0
    );

    // The dashboard serves them.
    let dashboard = Service::start(
        "dashboard",
        &[
            (
                "AZURE_STORAGE_CONNECTION_STRING",
                p.azurite.connection_string(),
            ),
            ("DASHBOARD_TABLE_NAME", p.table.clone()),
            ("DASHBOARD_DEVICE_TABLE", p.devices.clone()),
            ("DASHBOARD_ROLLUP_TABLE", rollups.clone()),
        ],
    )
    .await;
    let path = format!(
        "/api/v1/devices/roll-b/rollups?interval=1h&from={}&to={}",
        format_ms(hour - 6 * HOUR_MS),
        format_ms(hour)
    );
    let (status, body) = tests::services::http_get(dashboard.metrics_port, &path)
        .await
        .expect("the dashboard answers");
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let served = body["rollups"].as_array().unwrap();
    let hours: Vec<&String> = want
        .keys()
        .filter(|(d, k)| d == "roll-b" && k.starts_with("1h|"))
        .map(|(_, k)| k)
        .collect();
    assert_eq!(served.len(), hours.len());
    for r in served {
        let key = Interval::Hour.row_key(
            schemas::timefmt::parse_rfc3339_ms(r["periodStart"].as_str().unwrap()).unwrap(),
        );
        let (count, _, _, sum, _) = want[&("roll-b".to_owned(), key)];
        assert_eq!(r["count"], count);
        assert!(close(
            r["temperature"]["mean"].as_f64().unwrap(),
            sum / count as f64
        ));
    }
    // The fleet page's readings in the last hour: what the processor stored, as it counted.
    let stored = p.processor.metric("processor_readings_stored_total").await;
    let port = dashboard.metrics_port;
    tests::wait_for(
        "the processor's count of readings stored",
        Duration::from_secs(30),
        || async move {
            let (_, body) = tests::services::http_get(port, "/api/v1/pipeline").await?;
            let body: serde_json::Value = serde_json::from_str(&body).ok()?;
            (body["readings"]["storedLastHour"].as_f64() == Some(stored)).then_some(())
        },
    )
    .await;
    // ... and its completeness over the last day, from the fleet ledger.
    let (_, body) = tests::services::http_get(port, "/api/v1/pipeline")
        .await
        .expect("the dashboard answers");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let day = &body["completeness"]["lastDay"];
    let (received, missing) = fleet_after
        .values()
        .fold((0, 0), |(r, m), f| (r + f.distinct, m + f.missing));
    assert_eq!(
        (day["received"].as_u64(), day["missing"].as_u64()),
        (Some(received), Some(missing)),
        "{body}"
    );
    let percent = received as f64 * 100.0 / (received + missing) as f64;
    assert!(
        (day["percent"].as_f64().unwrap() - percent).abs() < 0.001,
        "{body}"
    );
    // The same rollups as Parquet, row for row.
    let parquet =
        crate::dashboard::get(dashboard.metrics_port, &format!("{path}&format=parquet")).await;
    assert_eq!(parquet.status, 200);
    assert_eq!(parquet.content_type, "application/vnd.apache.parquet");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        bytes::Bytes::from(parquet.body),
    )
    .unwrap();
    assert_eq!(
        reader.schema().as_ref(),
        schemas::archive::rollups::arrow_schema().as_ref()
    );
    let rows: usize = reader.build().unwrap().map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, served.len());
    drop(archiver);
}

/// A first start rolls up the day before too, whatever the hour: its daily rollups are whole
/// and the fleet ledger of its last hour (within the ledger's 25 hours until midnight) is
/// summed.
#[tokio::test]
async fn a_first_start_rolls_up_the_day_before_whatever_the_hour() {
    let Some(store) = Store::start("rollups_first_start").await else {
        return;
    };
    // Yesterday's last hour leaves the ledger's 25 hours at midnight: a test that would run
    // over it waits for it.
    let to_midnight = Interval::Day.floor(now_ms()) + DAY_MS - now_ms();
    if to_midnight < 5 * 60_000 {
        tokio::time::sleep(Duration::from_millis(to_midnight as u64 + 1_000)).await;
    }
    let today = Interval::Day.floor(now_ms());
    let (first_hour, last_hour) = (today - DAY_MS, today - HOUR_MS);
    let reading = |at: i64, seq: i64| StoredReading {
        reading: Reading {
            device_id: "first-1".into(),
            measured_at_ms: at,
            seq: Some(seq),
            temperature: Some(20.0 + seq as f64 / 4.0),
            humidity: None,
            pressure: None,
            extras: Vec::new(),
        },
        ingested_at_ms: at,
    };
    // Twelve readings in the day's first hour; in its last, numbers 0 to 11 but 4.
    let mut rows: Vec<StoredReading> = (0..12)
        .map(|k| reading(first_hour + k * EVERY + 7, k))
        .collect();
    rows.extend(
        (0..12)
            .filter(|k| *k != 4)
            .map(|k| reading(last_hour + k * EVERY + 7, k)),
    );
    store.backfill(&rows).await;
    let rollups = unique("rollups");
    let env = [
        ("AZURE_STORAGE_CONNECTION_STRING", store.connection.clone()),
        ("ARCHIVER_TABLE_NAME", store.table.clone()),
        ("ARCHIVER_DEVICE_TABLE", store.devices.clone()),
        ("ARCHIVER_ROLLUP_TABLE", rollups.clone()),
        ("ARCHIVER_CONTAINER", store.container.clone()),
        ("ARCHIVER_ROLLUP_SETTLE", "2m".into()),
        ("ARCHIVER_ROLLUP_INTERVAL", "1s".into()),
    ];
    let archiver = Service::start_with_args("archiver", &["run"], &env).await;
    let (day_key, ledger_key) = (
        &Interval::Day.row_key(first_hour),
        &Interval::Hour.row_key(last_hour),
    );
    let (account, table) = (&store.account, &rollups);
    // Up to three minutes: started in the first two of a day, yesterday's last hour has not
    // settled yet.
    let (day, fleet) = tests::wait_for(
        "the day before's rollup and its last hour's fleet ledger",
        Duration::from_secs(180),
        || async move {
            let rows = tests::storage::rows(account, table).await.ok()?;
            let row = |pk: &str, rk: &str| {
                rows.iter()
                    .find(|e| e["PartitionKey"] == pk && e["RowKey"] == rk)
                    .cloned()
            };
            let day = Rollup::from_entity(&row("first-1", day_key)?).ok()?;
            let fleet = FleetHour::from_entity(&row(schemas::rollup::LEDGER, ledger_key)?)?;
            Some((day, fleet))
        },
    )
    .await;
    assert_eq!(
        (day.count, day.first_at_ms, day.last_at_ms),
        (23, first_hour + 7, last_hour + 11 * EVERY + 7)
    );
    assert_eq!(
        fleet,
        (
            last_hour,
            FleetHour {
                devices: 1,
                distinct: 11,
                missing: 1
            }
        )
    );
    drop(archiver);
}

#[tokio::test]
async fn archived_days_get_their_rollups_back_with_one_command() {
    let Some(store) = Store::start("rollups_rebuild").await else {
        return;
    };
    let today = Interval::Day.floor(now_ms());
    let mut rows = Vec::new();
    for device in ["old-1", "old-2"] {
        for k in 0..(3 * 144) {
            let at = today - 6 * DAY_MS + k * 600_000 + 7;
            rows.push(StoredReading {
                reading: Reading {
                    device_id: device.into(),
                    measured_at_ms: at,
                    seq: None,
                    temperature: Some(10.0 + (k % 37) as f64 / 3.0),
                    humidity: None,
                    pressure: Some(1000.0 + (k % 5) as f64),
                    extras: Vec::new(),
                },
                ingested_at_ms: at,
            });
        }
    }
    store.backfill(&rows).await;
    store.archiver_ok(&["--retention", "2days"]).await;
    let rollups = unique("rollups");
    let out = tokio::process::Command::new(tests::services::bin_path("archiver"))
        .args([
            "rollups",
            "--from",
            &date(today - 6 * DAY_MS),
            "--to",
            &date(today - 3 * DAY_MS),
        ])
        .env("AZURE_STORAGE_CONNECTION_STRING", &store.connection)
        .env("ARCHIVER_TABLE_NAME", &store.table)
        .env("ARCHIVER_DEVICE_TABLE", &store.devices)
        .env("ARCHIVER_CONTAINER", &store.container)
        .env("ARCHIVER_ROLLUP_TABLE", &rollups)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Rebuilt 150 rollups of 2 devices over 3 days"),
        "{stdout}"
    );
    let stored: Vec<Rollup> = tests::storage::rows(&store.account, &rollups)
        .await
        .unwrap()
        .iter()
        .map(|e| Rollup::from_entity(e).unwrap())
        .collect();
    for device in ["old-1", "old-2"] {
        for d in 0..3 {
            let day = today - (6 - d) * DAY_MS;
            let readings: Vec<&Reading> = rows
                .iter()
                .map(|r| &r.reading)
                .filter(|r| r.device_id == device && Interval::Day.floor(r.measured_at_ms) == day)
                .collect();
            let want = Rollup::of(Interval::Day, day, readings.iter().copied()).unwrap();
            let got = stored
                .iter()
                .find(|r| r.device_id == device && r.interval == Interval::Day && r.start_ms == day)
                .unwrap_or_else(|| panic!("no daily rollup of {device} {}", date(day)));
            assert_eq!(
                (got.count, got.first_at_ms, got.last_at_ms),
                (want.count, want.first_at_ms, want.last_at_ms)
            );
            for (g, w) in got.stats.iter().zip(&want.stats) {
                assert_eq!((g.count, g.min, g.max), (w.count, w.min, w.max));
                assert!(close(g.sum, w.sum));
            }
        }
    }
    assert_eq!(
        stored
            .iter()
            .filter(|r| r.interval == Interval::Hour)
            .count(),
        2 * 3 * 24
    );
}

fn date(ms: i64) -> String {
    format_ms(ms)[..10].to_owned()
}
