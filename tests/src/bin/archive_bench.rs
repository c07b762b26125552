//! Archiver load run: backfills N old readings into a fresh Azurite, archives them, and prints
//! rows/s and archive bytes per reading for Parquet and for JSON Lines on the same data.
//!
//! `cargo run --release -p tests --bin archive_bench -- [ROWS] [DEVICES]`
//! (defaults: 1,000,000 rows over 350 devices, at one reading per 30 s, so whole device-days).
#![allow(clippy::unwrap_used)] // a load tool: a panic is the report

use clap::Parser;
use futures::{stream, StreamExt};
use infra::storage::{Account, BatchOutcome, Entity};
use schemas::{Extra, Reading};
use std::time::Instant;
use tests::{unique, Azurite};

const DAY: i64 = 86_400_000;
const INTERVAL_MS: i64 = 30_000;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let rows: i64 = args.next().map_or(1_000_000, |a| a.parse().unwrap());
    let devices: i64 = args.next().map_or(350, |a| a.parse().unwrap());
    let azurite = Azurite::start().await;
    let account = azurite.account();
    println!("| format | rows | archive time | rows/s | blobs | bytes | bytes/reading |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for format in ["parquet", "json"] {
        let (table, device_table, container) =
            (unique("telemetry"), unique("devices"), unique("archive"));
        let started = Instant::now();
        backfill(&account, &table, &device_table, rows, devices).await;
        eprintln!(
            "backfilled {rows} rows in {:.1} s",
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
        let started = Instant::now();
        let ok = archiver::run(config, Default::default()).await.unwrap();
        let secs = started.elapsed().as_secs_f64();
        assert!(ok, "archive run failed");
        let blobs = account.container(&container).list("").await.unwrap();
        let bytes: u64 = blobs.iter().map(|b| b.size).sum();
        let left = account
            .table(&table)
            .first("PartitionKey ne ''")
            .await
            .unwrap();
        assert!(left.is_none(), "rows left in the table");
        println!(
            "| {format} | {rows} | {secs:.1} s | {:.0} | {} | {bytes} | {:.1} |",
            rows as f64 / secs,
            blobs.len(),
            bytes as f64 / rows as f64
        );
    }
}

/// `rows` readings spread over `devices`, 30 s apart, ending 40 days ago.
async fn backfill(account: &Account, table: &str, device_table: &str, rows: i64, devices: i64) {
    let t = account.table(table);
    t.create_if_missing().await.unwrap();
    let d = account.table(device_table);
    d.create_if_missing().await.unwrap();
    let per_device = rows / devices;
    let end = (schemas::timefmt::now_ms() / DAY - 40) * DAY;
    let start = end - per_device * INTERVAL_MS;
    let mut latest = Vec::new();
    let mut batches: Vec<Vec<Entity>> = Vec::new();
    for dev in 0..devices {
        let id = format!("sensor-{dev:05}");
        let mut batch = Vec::new();
        for i in 0..per_device {
            let at = start + i * INTERVAL_MS + dev * 97;
            let phase = (at % DAY) as f64 / DAY as f64 * std::f64::consts::TAU;
            let reading = Reading {
                device_id: id.clone(),
                measured_at_ms: at,
                seq: Some(i),
                temperature: Some(((18.0 + 4.0 * phase.sin()) * 100.0).round() / 100.0),
                humidity: Some(((55.0 + 10.0 * phase.cos()) * 10.0).round() / 10.0),
                pressure: Some(((1013.0 + (i % 50) as f64 * 0.1) * 10.0).round() / 10.0),
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
