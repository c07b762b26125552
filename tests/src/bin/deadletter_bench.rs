//! Dead-letter tool load run: N records in a fresh Azurite, then every command on all of them,
//! timed, as a Markdown table.
//!
//! `cargo run --release -p tests --bin deadletter_bench -- [RECORDS]` (default 100,000). The
//! records are spread over five reasons, 500 devices and eight days, with small JSON payloads,
//! and are loaded with `import` (packed as the processor packs them).
#![allow(clippy::unwrap_used)] // a load tool: a panic is the report

use clap::Parser;
use schemas::dead_letter::{DeadLetter, Refusal};
use schemas::{DeviceMessage, Reason};
use std::io::Write;
use std::time::Instant;
use tests::{unique, Azurite, TempDir};
use tokio_util::sync::CancellationToken;

const REASONS: [Reason; 5] = [
    Reason::Stale,
    Reason::OutOfRange,
    Reason::Schema,
    Reason::DeviceMismatch,
    Reason::MalformedJson,
];

#[tokio::main]
async fn main() {
    let records: usize = std::env::args()
        .nth(1)
        .map_or(100_000, |a| a.parse().unwrap());
    let azurite = Azurite::start().await;
    let connection = azurite.connection_string();
    let (queue, target) = (unique("dead"), unique("ingest"));
    azurite
        .account()
        .queue(&target)
        .create_if_missing()
        .await
        .unwrap();
    let dir = TempDir::new("dl-bench");
    let input = dir.0.join("records.jsonl");
    write_records(&input, records);
    let input = input.to_str().unwrap().to_owned();
    let out = |name: &str| dir.0.join(name).to_str().unwrap().to_owned();

    let (export_all, export_delete) = (out("export.jsonl"), out("export-delete.jsonl"));
    let steps: Vec<(&str, Vec<&str>)> = vec![
        ("import", vec!["import", "-i", &input]),
        ("list", vec!["list"]),
        (
            "list, three filters",
            vec![
                "list",
                "--reason",
                "stale,schema",
                "--device",
                "sensor-00*",
                "--since",
                "2026-11-21T00:00:00Z",
            ],
        ),
        (
            "replay --dry-run",
            vec!["replay", "--dry-run", "--target-queue", &target],
        ),
        ("export", vec!["export", "-o", &export_all]),
        ("replay", vec!["replay", "--target-queue", &target]),
        ("import", vec!["import", "-i", &input]),
        ("purge --yes", vec!["purge", "--yes"]),
        ("import", vec!["import", "-i", &input]),
        (
            "export --delete",
            vec!["export", "--delete", "-o", &export_delete],
        ),
    ];
    let mut table =
        String::from("| operation | records | seconds | records/s |\n|---|---:|---:|---:|\n");
    for (name, args) in steps {
        let mut argv = vec![
            "deadletter",
            "--queue",
            &queue,
            "--storage-connection-string",
            &connection,
        ];
        argv.extend(args);
        let cli = deadletter::Cli::try_parse_from(argv).unwrap();
        let started = Instant::now();
        let ok = deadletter::run(cli, CancellationToken::new())
            .await
            .unwrap();
        let secs = started.elapsed().as_secs_f64();
        assert!(ok, "{name} did not finish");
        table.push_str(&format!(
            "| `{name}` | {records} | {secs:.1} | {:.0} |\n",
            records as f64 / secs
        ));
    }
    let (a, b) = (
        std::fs::read_to_string(&export_all).unwrap(),
        std::fs::read_to_string(&export_delete).unwrap(),
    );
    let (mut a, mut b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, b, "both exports hold the same records");
    println!("\n{table}");
}

fn write_records(path: &std::path::Path, n: usize) {
    let t0 = schemas::timefmt::parse_rfc3339_ms("2026-11-20T00:00:00Z").unwrap();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..n {
        let device = format!("sensor-{:05}", i % 500);
        let at = t0 + i as i64 * 7_000;
        let payload = format!(
            r#"{{"deviceId":"{device}","timestamp":"{}","temperature":21.5,"humidity":40.1,"seq":{i}}}"#,
            schemas::timefmt::format_ms(at)
        );
        let msg = DeviceMessage::from_mqtt(
            &format!("devices/{device}/telemetry"),
            payload.as_bytes(),
            at,
        );
        let reason = REASONS[i % REASONS.len()];
        let record = DeadLetter::new(
            &msg,
            Refusal {
                reason,
                detail: format!("{reason} (generated)"),
                device_id: Some(device),
                rejected_indexes: Vec::new(),
                attempts: 1,
                dead_lettered_at_ms: at,
            },
        );
        writeln!(file, "{}", record.to_json_line()).unwrap();
    }
    file.flush().unwrap();
}
