//! Archiver load run: backfills N old readings into a fresh Azurite, archives them, and prints
//! rows/s and archive bytes per reading for Parquet and for JSON Lines on the same data.
//!
//! `cargo run --release -p tests --bin archive_bench -- [ROWS] [ROWS_PER_TABLE] [DEVICES]`
//! (defaults: 1,000,000 rows, in tables of 50,000 over 20 devices at one reading per 30 s).
//! Azurite's table operations slow down linearly with the table's size (they scan), so a
//! million rows are archived as a series of smaller tables; the times add up.
#![allow(clippy::unwrap_used)] // a load tool: a panic is the report

use clap::Parser;
use futures::{stream, StreamExt};
use infra::storage::{Account, BatchOutcome, Entity};
use schemas::{Extra, Reading};
use std::collections::BTreeMap;
use std::time::Instant;
use tests::{unique, Azurite};

const DAY: i64 = 86_400_000;
const INTERVAL_MS: i64 = 30_000;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut arg = |default: i64| args.next().map_or(default, |a| a.parse().unwrap());
    let (rows, per_table, devices) = (arg(1_000_000), arg(50_000), arg(20));
    let metrics = infra::serve::metrics_handle();
    let azurite = Azurite::start().await;
    let account = azurite.account();
    println!(
        "| format | rows | tables | archive time | rows/s | blobs | bytes/reading | archiver CPU µs/row | storage requests/row |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    // Parquet for the whole run; JSON on the first table only (the same data), for its size.
    for (format, total) in [("parquet", rows), ("json", per_table)] {
        let (mut secs, mut cpu, mut blobs, mut bytes) = (0.0, 0.0, 0, 0);
        let mut requests: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        let tables = (total / per_table).max(1);
        for chunk in 0..tables {
            let (table, device_table, container) =
                (unique("telemetry"), unique("devices"), unique("archive"));
            let started = Instant::now();
            backfill(&account, &table, &device_table, per_table, devices, chunk).await;
            eprintln!(
                "{format} table {}/{tables}: backfilled {per_table} rows in {:.1} s",
                chunk + 1,
                started.elapsed().as_secs_f64()
            );
            let config = archiver::Config::try_parse_from([
                "archiver",
                "run",
                "--once",
                "--format",
                format,
                "--concurrency",
                "8",
                "--table-name",
                &table,
                "--device-table",
                &device_table,
                "--container",
                &container,
                "--storage-connection-string",
                &azurite.connection_string(),
            ])
            .unwrap();
            let before = request_times(&metrics.render());
            let cpu_before = cpu_seconds();
            let started = Instant::now();
            let ok = archiver::run(config, Default::default()).await.unwrap();
            secs += started.elapsed().as_secs_f64();
            cpu += cpu_seconds() - cpu_before;
            assert!(ok, "archive run failed");
            for (op, (n, s)) in request_times(&metrics.render()) {
                let (n0, s0) = before.get(&op).copied().unwrap_or_default();
                let slot = requests.entry(op).or_default();
                slot.0 += n - n0;
                slot.1 += s - s0;
            }
            let listed = account.container(&container).list("").await.unwrap();
            blobs += listed.len();
            bytes += listed.iter().map(|b| b.size).sum::<u64>();
            let left = account
                .table(&table)
                .first("PartitionKey ne ''")
                .await
                .unwrap();
            assert!(left.is_none(), "rows left in the table");
        }
        let archived = (tables * per_table) as f64;
        let total_requests: f64 = requests.values().map(|r| r.0).sum();
        println!(
            "| {format} | {archived} | {tables} | {secs:.1} s | {:.0} | {blobs} | {:.1} | {:.0} | {:.3} |",
            archived / secs,
            bytes as f64 / archived,
            cpu * 1e6 / archived,
            total_requests / archived,
        );
        for (op, (n, s)) in &requests {
            if *n > 0.0 {
                eprintln!(
                    "  {op}: {n} requests, {:.1} ms mean, {s:.1} s in all",
                    s / n * 1000.0
                );
            }
        }
    }
}

/// This process's user + system CPU time, in seconds.
fn cpu_seconds() -> f64 {
    loadtest::measure::proc_stat(std::process::id()).cpu_seconds
}

/// `op -> (requests, seconds)` from the rendered `storage_request_seconds` histogram.
fn request_times(rendered: &str) -> BTreeMap<String, (f64, f64)> {
    let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for line in rendered.lines() {
        let Some(rest) = line.strip_prefix("storage_request_seconds_") else {
            continue;
        };
        let Some((kind, rest)) = rest.split_once("{op=\"") else {
            continue;
        };
        let Some((op, value)) = rest.split_once("\"} ") else {
            continue;
        };
        let value: f64 = value.parse().unwrap_or(0.0);
        let slot = out.entry(op.to_owned()).or_default();
        match kind {
            "count" => slot.0 = value,
            "sum" => slot.1 = value,
            _ => {}
        }
    }
    out
}

/// `rows` readings spread over `devices` (named after `chunk`), 30 s apart, ending 40 days ago.
async fn backfill(
    account: &Account,
    table: &str,
    device_table: &str,
    rows: i64,
    devices: i64,
    chunk: i64,
) {
    let t = account.table(table);
    t.create_if_missing().await.unwrap();
    let d = account.table(device_table);
    d.create_if_missing().await.unwrap();
    let per_device = rows / devices;
    let end = (schemas::timefmt::now_ms() / DAY - 40) * DAY;
    let start = end - per_device * INTERVAL_MS;
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15 ^ chunk as u64);
    let mut latest = Vec::new();
    let mut batches: Vec<Vec<Entity>> = Vec::new();
    for dev in 0..devices {
        let id = format!("sensor-{chunk:03}-{dev:05}");
        let mut batch = Vec::new();
        for i in 0..per_device {
            let at = start + i * INTERVAL_MS + dev * 97;
            let phase = (at % DAY) as f64 / DAY as f64 * std::f64::consts::TAU;
            let round = |v: f64, digits: i32| (v * 10f64.powi(digits)).round() / 10f64.powi(digits);
            let reading = Reading {
                device_id: id.clone(),
                measured_at_ms: at,
                seq: Some(i),
                // A daily cycle plus sensor noise, at the resolution real sensors report.
                temperature: Some(round(18.0 + 4.0 * phase.sin() + noise.next(0.3), 2)),
                humidity: Some(round(55.0 + 10.0 * phase.cos() + noise.next(1.0), 1)),
                pressure: Some(round(1013.0 + noise.next(2.0), 1)),
                extras: vec![("battery".into(), Extra::Int(100 - i / 1000))],
            };
            batch.push(schemas::entity::to_entity(&reading, at + 800));
            // A device-day boundary or a full transaction ends a batch.
            let next_day = (at + INTERVAL_MS) / DAY != at / DAY;
            if batch.len() == 100 || next_day || i + 1 == per_device {
                batches.push(std::mem::take(&mut batch));
            }
            if i + 1 == per_device {
                latest.push(schemas::device::row(&reading, at + 800, Some(start)));
            }
        }
    }
    stream::iter(batches)
        .map(|b| {
            let t = t.clone();
            async move {
                assert_eq!(t.upsert_batch(&b).await.unwrap(), BatchOutcome::Committed);
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    for chunk in latest.chunks(100) {
        assert_eq!(d.merge_batch(chunk).await.unwrap(), BatchOutcome::Committed);
    }
}

/// Deterministic noise (xorshift64): uniform in [-amplitude, amplitude].
struct Noise(u64);

impl Noise {
    fn next(&mut self, amplitude: f64) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * amplitude
    }
}
