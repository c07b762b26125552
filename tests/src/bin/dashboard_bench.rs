//! The dashboard's latency and the rollups' storage cost, on a fresh Azurite.
//!
//! `cargo run --release -p tests --bin dashboard_bench` (build the services in release first:
//! `cargo build --release --bins`). It seeds 10,000 devices; one device with a reading every
//! 30 s for 60 days, the older 30 archived as the archiver writes them, and a year of daily
//! rollups; then times each request of the list (median of 11, after one warm-up) and
//! prints a Markdown table. Last, it stores an hour of readings at the seed rate (a reading per
//! device every 30 s) for 1,000 devices, lets the archiver roll that hour up, and reports the
//! storage requests the sweep made per reading (the difference from a second start that has
//! nothing to sweep).
#![allow(clippy::unwrap_used)] // a load tool: a panic is the report

use infra::storage::{BatchOutcome, Entity};
use schemas::archive::layout::{floor_day, Layout, DAY_MS};
use schemas::entity::StoredReading;
use schemas::reading::Reading;
use schemas::rollup::{Interval, Rollup, HOUR_MS};
use schemas::timefmt::{format_ms, now_ms};
use std::time::{Duration, Instant};
use tests::{unique, Azurite, Service};

const DEVICES: usize = 10_000;
const EVERY: i64 = 30_000;

fn reading(device: &str, at: i64, k: i64) -> StoredReading {
    StoredReading {
        reading: Reading {
            device_id: device.to_owned(),
            measured_at_ms: at,
            seq: Some(k),
            temperature: Some(18.0 + (k % 100) as f64 / 10.0),
            humidity: Some(40.0 + (k % 7) as f64),
            pressure: Some(1000.0 + (k % 13) as f64),
            extras: Vec::new(),
        },
        ingested_at_ms: at,
    }
}

async fn upsert_all(table: &infra::storage::Table, rows: Vec<Entity>) {
    // A transaction holds one partition: chunk each partition's rows on their own.
    let mut by_partition: std::collections::BTreeMap<String, Vec<Entity>> = Default::default();
    for row in rows {
        let pk = row["PartitionKey"].as_str().unwrap().to_owned();
        by_partition.entry(pk).or_default().push(row);
    }
    let chunks: Vec<Vec<Entity>> = by_partition
        .values()
        .flat_map(|rows| rows.chunks(100).map(<[Entity]>::to_vec))
        .collect();
    // Four writers, each retrying: the emulator slows down under a seeding burst.
    let per_writer = chunks.len().div_ceil(4).max(1);
    futures::future::join_all(chunks.chunks(per_writer).map(|group| async move {
        for chunk in group {
            let mut attempts = 0;
            loop {
                attempts += 1;
                match table.upsert_batch(chunk).await {
                    Ok(outcome) => {
                        assert_eq!(outcome, BatchOutcome::Committed);
                        break;
                    }
                    Err(error) if attempts < 5 => eprintln!("retrying a seed batch: {error}"),
                    Err(error) => panic!("cannot seed: {error}"),
                }
            }
        }
    }))
    .await;
}

async fn timed(port: u16, path: &str) -> (Duration, usize) {
    let mut total = 0;
    let started = Instant::now();
    let mut next = Some(path.to_owned());
    while let Some(p) = next {
        let (status, body) = tests::services::http_get(port, &p).await.unwrap();
        assert_eq!(status, 200, "{p}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        total += ["devices", "readings", "rollups"]
            .iter()
            .filter_map(|k| v[k].as_array())
            .map(Vec::len)
            .sum::<usize>();
        next = v["next"].as_str().map(str::to_owned);
    }
    (started.elapsed(), total)
}

#[tokio::main]
async fn main() {
    let azurite = Azurite::start().await;
    let account = azurite.account();
    let (table, devices, rollups, container) = (
        unique("telemetry"),
        unique("devices"),
        unique("rollups"),
        unique("archive"),
    );
    for t in [&table, &devices, &rollups] {
        account.table(t).create_if_missing().await.unwrap();
    }
    let blobs = account.container(&container);
    blobs.create_if_missing().await.unwrap();
    let now = now_ms();
    let seeding = Instant::now();

    // 10,000 device rows.
    let device_rows: Vec<Entity> = (0..DEVICES)
        .map(|i| {
            let r = reading(
                &format!("sensor-{i:05}"),
                now - (i as i64 % 900) * 1000,
                i as i64,
            );
            schemas::device::row(&r.reading, r.ingested_at_ms, Some(now - 90 * DAY_MS))
        })
        .collect();
    upsert_all(&account.table(&devices), device_rows).await;

    // One device: 60 days at 30 s; the days older than 30 archived, the rest in the table.
    let device = "sensor-00000";
    let start = floor_day(now - 60 * DAY_MS);
    let cutoff = floor_day(now - 30 * DAY_MS);
    let series: Vec<StoredReading> = (0..)
        .map(|k| (start + k * EVERY, k))
        .take_while(|(at, _)| *at < now)
        .map(|(at, k)| reading(device, at, k))
        .collect();
    let layout: Layout = schemas::archive::layout::DEFAULT.parse().unwrap();
    let format = schemas::archive::Format::Parquet;
    for day in series
        .iter()
        .filter(|r| r.reading.measured_at_ms < cutoff)
        .collect::<Vec<_>>()
        .chunk_by(|a, b| floor_day(a.reading.measured_at_ms) == floor_day(b.reading.measured_at_ms))
    {
        let rows: Vec<StoredReading> = day.iter().map(|r| (*r).clone()).collect();
        let name = layout.blob_name(
            device,
            floor_day(rows[0].reading.measured_at_ms),
            format.extension(),
        );
        let bytes = schemas::archive::encode(format, &rows).unwrap();
        let options = infra::storage::PutOptions {
            content_type: format.content_type(),
            cool: true,
            metadata: &[],
        };
        blobs
            .put(&name, bytes, infra::storage::Write::Create, options)
            .await
            .unwrap();
    }
    let recent: Vec<Entity> = series
        .iter()
        .filter(|r| r.reading.measured_at_ms >= cutoff)
        .map(|r| schemas::entity::to_entity(&r.reading, r.ingested_at_ms))
        .collect();
    upsert_all(&account.table(&table), recent).await;
    // A year of daily rollups.
    let days: Vec<Entity> = (1..=365)
        .map(|d| {
            let day = floor_day(now) - d * DAY_MS;
            let readings: Vec<Reading> = (0..2880)
                .map(|k| reading(device, day + k * EVERY, k).reading)
                .collect();
            Rollup::of(Interval::Day, day, &readings)
                .unwrap()
                .to_entity()
        })
        .collect();
    upsert_all(&account.table(&rollups), days).await;
    eprintln!("seeded in {:.0} s", seeding.elapsed().as_secs_f64());

    let dashboard = Service::start(
        "dashboard",
        &[
            (
                "AZURE_STORAGE_CONNECTION_STRING",
                azurite.connection_string(),
            ),
            ("DASHBOARD_TABLE_NAME", table.clone()),
            ("DASHBOARD_DEVICE_TABLE", devices.clone()),
            ("DASHBOARD_ROLLUP_TABLE", rollups.clone()),
            ("DASHBOARD_ARCHIVE_CONTAINER", container.clone()),
        ],
    )
    .await;
    let port = dashboard.metrics_port;
    let day_ago = format_ms(now - DAY_MS);
    let cases = [
        (
            "device list, 10,000 devices (10 pages of 1,000)",
            "/api/v1/devices?limit=1000".to_owned(),
            "1 s",
        ),
        (
            "one device's last 24 h (2,880 readings)",
            format!("/api/v1/devices/{device}/readings?from={day_ago}"),
            "0.5 s",
        ),
        (
            "one year of daily rollups",
            format!(
                "/api/v1/devices/{device}/rollups?interval=1d&from={}",
                format_ms(now - 366 * DAY_MS)
            ),
            "0.5 s",
        ),
        (
            "60 days across archive and table (172,800 readings, 4 pages)",
            format!(
                "/api/v1/devices/{device}/readings?from={}&limit=50000",
                format_ms(now - 60 * DAY_MS)
            ),
            "2 s",
        ),
        (
            "60 days, the first page of 50,000",
            format!(
                "/api/v1/devices/{device}/readings?from={}&limit=50000&first",
                format_ms(now - 60 * DAY_MS)
            ),
            "-",
        ),
    ];
    println!("| request | items | median | p90 | target |\n|---|---|---|---|---|");
    for (label, path, target) in cases {
        let single = path.ends_with("&first");
        let path = path.trim_end_matches("&first").to_owned();
        let mut times = Vec::new();
        let mut items = 0;
        for run in 0..12 {
            let (t, n) = if single {
                let started = Instant::now();
                let (status, body) = tests::services::http_get(port, &path).await.unwrap();
                assert_eq!(status, 200, "{body}");
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                (
                    started.elapsed(),
                    v["readings"].as_array().map_or(0, Vec::len),
                )
            } else {
                timed(port, &path).await
            };
            items = n;
            if run > 0 {
                times.push(t.as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        println!(
            "| {label} | {items} | {:.3} s | {:.3} s | {target} |",
            times[times.len() / 2],
            times[times.len() * 9 / 10]
        );
    }

    // Rollup cost: an hour of seed-rate readings for 1,000 devices, rolled up by the archiver.
    let (table2, devices2, rollups2) = (unique("telemetry"), unique("devices"), unique("rollups"));
    for t in [&table2, &devices2] {
        account.table(t).create_if_missing().await.unwrap();
    }
    let hour = Interval::Hour.floor(now) - HOUR_MS;
    let mut rows = Vec::new();
    let mut device_rows = Vec::new();
    for i in 0..1000 {
        let id = format!("seed-{i:04}");
        for k in 0..120 {
            let r = reading(&id, hour + k * EVERY + i, k);
            rows.push(schemas::entity::to_entity(&r.reading, r.ingested_at_ms));
        }
        let last = reading(&id, hour + 119 * EVERY + i, 119);
        device_rows.push(schemas::device::row(
            &last.reading,
            last.ingested_at_ms,
            Some(hour),
        ));
    }
    let readings = rows.len();
    upsert_all(&account.table(&table2), rows).await;
    // As if the hours before were swept already: the archiver sweeps this one hour.
    let mut state = Entity::new();
    state.insert("PartitionKey".into(), schemas::rollup::STATE.into());
    state.insert("RowKey".into(), "sweep".into());
    schemas::entity::typed_datetime(&mut state, "SweptThrough", hour - HOUR_MS);
    let rollup_table = account.table(&rollups2);
    rollup_table.create_if_missing().await.unwrap();
    rollup_table.upsert(&state).await.unwrap();
    upsert_all(&account.table(&devices2), device_rows).await;
    let env = [
        (
            "AZURE_STORAGE_CONNECTION_STRING",
            azurite.connection_string(),
        ),
        ("ARCHIVER_TABLE_NAME", table2.clone()),
        ("ARCHIVER_DEVICE_TABLE", devices2.clone()),
        ("ARCHIVER_ROLLUP_TABLE", rollups2.clone()),
        ("ARCHIVER_CONTAINER", unique("archive")),
        // The archive pass looks at one device that does not exist: the requests counted are
        // the rollups'.
        ("ARCHIVER_DEVICES", "none".into()),
        ("ARCHIVER_ROLLUP_SETTLE", "2m".into()),
        ("ARCHIVER_ROLLUP_INTERVAL", "1h".into()),
    ];
    // The first start sweeps the hour; the second finds nothing to sweep. Each does the same
    // start-up work besides (the day's expiry of old rollups, the marks, the archive pass), so
    // the difference is the sweep's. The hour must have settled (2 minutes after it ended).
    let settled = hour + HOUR_MS + 2 * 60_000 + 5_000;
    if let Ok(wait) = u64::try_from(settled - now_ms()) {
        println!("Waiting {} s for the hour to settle.", wait / 1000);
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    let started = Instant::now();
    let with_sweep = archiver_requests(&env, 1000.0).await;
    let swept_in = started.elapsed().as_secs_f64();
    let without = archiver_requests(&env, 0.0).await;
    let sweep = with_sweep - without;
    println!(
        "\nRollups of one hour at the seed rate ({readings} readings of 1,000 devices): the sweep took {sweep} storage requests, {:.4} per reading, in {swept_in:.1} s. A start's other work (once a day: expiring old rollups, 2 queries a device) took {without}.",
        sweep / readings as f64,
    );
}

/// Starts an archiver on `env`, waits for its first rollup turn to write `written` rollups and
/// its requests to stop, and returns the storage requests it made.
async fn archiver_requests(env: &[(&'static str, String)], written: f64) -> f64 {
    let archiver = Service::start_with_args("archiver", &["run"], env).await;
    let started = Instant::now();
    let mut last = -1.0;
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the rollup turn did not finish"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let done = archiver
            .metric("archiver_rollups_last_success_timestamp_seconds")
            .await
            > 0.0
            && archiver.metric("archiver_rollups_written_total").await >= written;
        let requests = archiver.metric("storage_requests_total").await;
        if done && requests == last {
            return requests;
        }
        last = requests;
    }
}
