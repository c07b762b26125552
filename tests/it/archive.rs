//! The archiver against real Azurite: layout, tier, content, crash safety, merges, formats.
//!
//! Rows are backfilled straight into the table (and device table) in the shapes the
//! processor writes, since the processor refuses readings older than the retention window.

use infra::storage::{Account, BatchOutcome, Entity};
use schemas::archive::{self, Format};
use schemas::entity::StoredReading;
use schemas::{Extra, Reading};
use std::collections::BTreeMap;
use std::process::Output;
use tests::{repo_root, unique, Azurite, TempDir};

const DAY: i64 = 86_400_000;

/// Azurite plus fresh table, device table and container names.
pub(crate) struct Store {
    _azurite: Azurite,
    pub(crate) account: Account,
    pub(crate) connection: String,
    pub(crate) table: String,
    pub(crate) devices: String,
    pub(crate) container: String,
}

impl Store {
    pub(crate) async fn start(test: &str) -> Option<Self> {
        if !tests::servers_available(test) {
            return None;
        }
        let azurite = Azurite::start().await;
        let store = Self {
            account: azurite.account(),
            connection: azurite.connection_string(),
            _azurite: azurite,
            table: unique("telemetry"),
            devices: unique("devices"),
            container: unique("archive"),
        };
        for t in [&store.table, &store.devices] {
            store.account.table(t).create_if_missing().await.unwrap();
        }
        Some(store)
    }

    /// Writes `rows` as the processor would: telemetry rows, and a device row per device.
    pub(crate) async fn backfill(&self, rows: &[StoredReading]) {
        let mut by_device: BTreeMap<&str, Vec<Entity>> = BTreeMap::new();
        for r in rows {
            by_device
                .entry(&r.reading.device_id)
                .or_default()
                .push(schemas::entity::to_entity(&r.reading, r.ingested_at_ms));
        }
        let table = self.account.table(&self.table);
        let mut device_rows = Vec::new();
        for (device, entities) in &by_device {
            for chunk in entities.chunks(100) {
                assert_eq!(
                    table.upsert_batch(chunk).await.unwrap(),
                    BatchOutcome::Committed
                );
            }
            let latest = rows
                .iter()
                .filter(|r| r.reading.device_id == *device)
                .max_by_key(|r| r.reading.measured_at_ms)
                .unwrap();
            device_rows.push(schemas::device::row(
                &latest.reading,
                latest.ingested_at_ms,
                Some(0),
            ));
        }
        let devices = self.account.table(&self.devices);
        assert_eq!(
            devices.merge_batch(&device_rows).await.unwrap(),
            BatchOutcome::Committed
        );
    }

    /// Runs `archiver run --once <args>` to completion.
    async fn archiver(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let out = tokio::process::Command::new(tests::services::bin_path("archiver"))
            .args(["run", "--once", "--log-format", "json"])
            .args(args)
            .env("AZURE_STORAGE_CONNECTION_STRING", &self.connection)
            .env("ARCHIVER_TABLE_NAME", &self.table)
            .env("ARCHIVER_DEVICE_TABLE", &self.devices)
            .env("ARCHIVER_CONTAINER", &self.container)
            .envs(env.iter().copied())
            .kill_on_drop(true)
            .output()
            .await
            .unwrap();
        out
    }

    pub(crate) async fn archiver_ok(&self, args: &[&str]) -> String {
        let out = self.archiver(args, &[]).await;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "archiver {args:?} failed with {}:\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Every telemetry row left in the table.
    async fn table_rows(&self) -> Vec<StoredReading> {
        let rows = tests::storage::rows(&self.account, &self.table)
            .await
            .unwrap();
        let mut rows: Vec<StoredReading> = rows
            .iter()
            .map(|e| schemas::entity::from_entity(e).unwrap())
            .collect();
        rows.sort_by_key(|r| (r.reading.device_id.clone(), r.reading.measured_at_ms));
        rows
    }

    /// Every archive blob: name -> (tier, rows metadata, decoded rows).
    async fn blobs(
        &self,
        format: Format,
    ) -> BTreeMap<String, (Option<String>, String, Vec<StoredReading>)> {
        let container = self.account.container(&self.container);
        let mut out = BTreeMap::new();
        let listed = match container.list("").await {
            // A dry run creates nothing, not even the container.
            Err(e) if e.status() == Some(404) => Vec::new(),
            other => other.unwrap(),
        };
        for info in listed {
            let content = container.get(&info.name).await.unwrap().unwrap();
            let rows = archive::decode(format, content.bytes).unwrap();
            assert_eq!(info.content_type, format.content_type(), "{}", info.name);
            assert_eq!(
                info.metadata.get("schema_version").map(String::as_str),
                Some("1")
            );
            let meta_rows = info.metadata.get("rows").cloned().unwrap_or_default();
            out.insert(info.name, (info.tier, meta_rows, rows));
        }
        out
    }
}

/// The start of the UTC day `days` before the day these tests began (read once: a test that
/// runs over midnight names the same days throughout).
fn day(days: i64) -> i64 {
    static TODAY: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let today = TODAY.get_or_init(|| schemas::timefmt::now_ms().div_euclid(DAY) * DAY);
    today - days * DAY
}

/// `n` readings of `device` spread over the day starting at `day_ms`, with varied fields.
fn readings(device: &str, day_ms: i64, n: i64) -> Vec<StoredReading> {
    (0..n)
        .map(|i| {
            let at = day_ms + i * (DAY / n) + 7;
            StoredReading {
                reading: Reading {
                    device_id: device.to_owned(),
                    measured_at_ms: at,
                    seq: (i % 5 != 0).then_some(i),
                    temperature: Some(20.0 + i as f64 / 8.0),
                    humidity: (i % 3 != 0).then_some(40.0 + i as f64 / 16.0),
                    pressure: Some(1000.0 + i as f64),
                    extras: if i % 4 == 0 {
                        vec![
                            ("battery".into(), Extra::Int(9_007_199_254_740_993 + i)),
                            ("fw".into(), Extra::Str(format!("1.{i}"))),
                        ]
                    } else {
                        Vec::new()
                    },
                },
                ingested_at_ms: at + 1_500,
            }
        })
        .collect()
}

/// `2026/10/14/<device>.<ext>`.
fn blob_name(device: &str, day_ms: i64, ext: &str) -> String {
    let date = &schemas::timefmt::format_ms(day_ms)[..10];
    format!("{}/{device}.{ext}", date.replace('-', "/"))
}

fn sorted(mut rows: Vec<StoredReading>) -> Vec<StoredReading> {
    rows.sort_by_key(|r| (r.reading.device_id.clone(), r.reading.measured_at_ms));
    rows
}

#[tokio::test]
async fn backfill_is_archived_to_cool_parquet_and_leaves_only_recent_rows() {
    let Some(store) = Store::start("archive_backfill").await else {
        return;
    };
    let devices = ["dev-a", "dev-b", "dev-c"];
    let old_days = [day(40), day(39), day(35)];
    let mut old = Vec::new();
    for d in devices {
        for &day_ms in &old_days {
            old.extend(readings(d, day_ms, 120));
        }
    }
    let recent: Vec<StoredReading> = devices
        .iter()
        .flat_map(|d| readings(d, day(1), 10))
        .collect();
    store.backfill(&old).await;
    store.backfill(&recent).await;

    // A dry run lists the work and changes nothing.
    let listing = store.archiver_ok(&["--dry-run"]).await;
    assert_eq!(
        listing.lines().filter(|l| l.contains(" rows -> ")).count(),
        9,
        "{listing}"
    );
    assert!(listing.contains("Would archive 1080 rows"), "{listing}");
    assert_eq!(store.table_rows().await.len(), old.len() + recent.len());
    assert!(store.blobs(Format::Parquet).await.is_empty());

    let summary = store.archiver_ok(&[]).await;
    assert!(
        summary.contains("Archived 1080 rows of 9 device-days"),
        "{summary}"
    );

    let blobs = store.blobs(Format::Parquet).await;
    let expected_names: Vec<String> = old_days
        .iter()
        .flat_map(|&day_ms| devices.iter().map(move |d| blob_name(d, day_ms, "parquet")))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(blobs.keys().cloned().collect::<Vec<_>>(), expected_names);
    for (name, (tier, meta_rows, rows)) in &blobs {
        assert_eq!(tier.as_deref(), Some("Cool"), "{name}");
        assert_eq!(meta_rows, "120", "{name}");
        assert_eq!(rows.len(), 120, "{name}");
    }
    let archived: Vec<StoredReading> = blobs.into_values().flat_map(|(_, _, r)| r).collect();
    assert_eq!(
        sorted(archived),
        sorted(old.clone()),
        "every field round-trips"
    );
    assert_eq!(store.table_rows().await, sorted(recent.clone()));

    // The files read correctly in analysts' tools, with the right types.
    let container = store.account.container(&store.container);
    let name = blob_name("dev-b", old_days[0], "parquet");
    let bytes = container.get(&name).await.unwrap().unwrap().bytes;
    let footer = archive::parquet_footer_summary(bytes.clone()).unwrap();
    assert_eq!(footer.rows, 120);
    check_with_python(&bytes, &readings("dev-b", old_days[0], 120));

    // A second run finds nothing left to do.
    let again = store.archiver_ok(&[]).await;
    assert!(again.contains("Archived 0 rows"), "{again}");
}

/// Reads `bytes` with pyarrow and DuckDB (from `scripts/prereqs.sh --test`) and checks what
/// they see against `expected`.
fn check_with_python(bytes: &[u8], expected: &[StoredReading]) {
    let python = repo_root().join(".tools/py/bin/python");
    if !python.exists() {
        let msg = "pyarrow/DuckDB check: .tools/py missing (scripts/prereqs.sh --test)";
        assert!(
            std::env::var_os("REQUIRE_E2E").is_none_or(|v| v.is_empty()),
            "{msg}"
        );
        eprintln!("SKIPPED {msg}");
        return;
    }
    let dir = TempDir::new("parquet");
    let path = dir.0.join("archive.parquet");
    std::fs::write(&path, bytes).unwrap();
    let out = std::process::Command::new(python)
        .arg(repo_root().join("tests/py/read_archive.py"))
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pa = &seen["pyarrow"];
    assert_eq!(pa["types"]["device_id"], "string");
    assert_eq!(pa["types"]["measured_at"], "timestamp[us, tz=UTC]");
    assert_eq!(pa["types"]["ingested_at"], "timestamp[us, tz=UTC]");
    assert_eq!(pa["types"]["seq"], "int64");
    assert_eq!(pa["types"]["temperature"], "double");
    assert_eq!(pa["types"]["extras"], "string");
    assert_eq!(pa["rows"], expected.len());
    assert_eq!(
        pa["first_measured_at_us"],
        expected[0].reading.measured_at_ms * 1000
    );
    assert_eq!(pa["first_device_id"], "dev-b");
    assert_eq!(pa["footer"]["telemetry.rows"], expected.len().to_string());
    let db = &seen["duckdb"];
    assert_eq!(db["types"]["measured_at"], "TIMESTAMP WITH TIME ZONE");
    assert_eq!(db["types"]["seq"], "BIGINT");
    assert_eq!(db["types"]["humidity"], "DOUBLE");
    assert_eq!(db["rows"], expected.len());
    assert_eq!(db["min_ms"], expected[0].reading.measured_at_ms);
    assert_eq!(
        db["max_ms"],
        expected.last().unwrap().reading.measured_at_ms
    );
    let seq_sum: i64 = expected.iter().filter_map(|r| r.reading.seq).sum();
    assert_eq!(db["seq_sum"], seq_sum);
    // Int64 extras keep full precision through the JSON column.
    assert_eq!(db["battery"], 9_007_199_254_740_993_i64);
}

#[tokio::test]
async fn killed_mid_way_and_rerun_loses_and_duplicates_nothing() {
    let Some(store) = Store::start("archive_crash").await else {
        return;
    };
    // 250 rows: the delete takes three transactions, so "mid-delete" leaves some behind.
    let old = readings("dev-k", day(45), 250);
    store.backfill(&old).await;
    let name = blob_name("dev-k", day(45), "parquet");

    // Killed right after the upload: the blob is there, every row is still in the table.
    let out = store
        .archiver(&[], &[("ARCHIVER_FAILPOINT", "after-upload")])
        .await;
    assert!(!out.status.success());
    assert_eq!(store.table_rows().await.len(), 250);
    assert_eq!(store.blobs(Format::Parquet).await[&name].2.len(), 250);

    // Re-run, killed after the first of three delete transactions.
    let out = store
        .archiver(&[], &[("ARCHIVER_FAILPOINT", "mid-delete")])
        .await;
    assert!(!out.status.success());
    assert_eq!(store.table_rows().await.len(), 150);
    assert_eq!(store.blobs(Format::Parquet).await[&name].2.len(), 250);

    // Two archivers finish the job at once: no loss, no duplicates, no shrinking.
    let (a, b) = tokio::join!(store.archiver_ok(&[]), store.archiver_ok(&[]));
    assert!(a.contains("Archived") && b.contains("Archived"));
    assert!(store.table_rows().await.is_empty());
    let blobs = store.blobs(Format::Parquet).await;
    assert_eq!(blobs.len(), 1);
    assert_eq!(blobs[&name].1, "250");
    assert_eq!(blobs[&name].2, old, "exactly the original rows, once each");
}

#[tokio::test]
async fn late_rows_are_merged_into_the_existing_archive() {
    let Some(store) = Store::start("archive_merge").await else {
        return;
    };
    let first = readings("dev-m", day(50), 100);
    store.backfill(&first).await;
    store.archiver_ok(&[]).await;
    let name = blob_name("dev-m", day(50), "parquet");
    assert_eq!(store.blobs(Format::Parquet).await[&name].2.len(), 100);

    // Late data for the archived day: 5 new timestamps and a redelivery of an archived one.
    let mut late = readings("dev-m", day(50) + 1_000, 5);
    late.push(first[10].clone());
    store.backfill(&late).await;
    let summary = store.archiver_ok(&[]).await;
    assert!(summary.contains("Archived 6 rows"), "{summary}");

    let blobs = store.blobs(Format::Parquet).await;
    let (tier, meta_rows, rows) = &blobs[&name];
    assert_eq!(meta_rows, "105");
    assert_eq!(tier.as_deref(), Some("Cool"));
    let expected = archive::merge(first, late);
    assert_eq!(rows, &expected);
    assert!(store.table_rows().await.is_empty());
}

#[tokio::test]
async fn json_format_writes_json_lines_at_the_same_paths() {
    let Some(store) = Store::start("archive_json").await else {
        return;
    };
    let old: Vec<StoredReading> = ["dev-j1", "dev-j2"]
        .iter()
        .flat_map(|d| readings(d, day(33), 40))
        .collect();
    store.backfill(&old).await;
    store.archiver_ok(&["--format", "json"]).await;

    let blobs = store.blobs(Format::Json).await;
    assert_eq!(
        blobs.keys().cloned().collect::<Vec<_>>(),
        vec![
            blob_name("dev-j1", day(33), "json"),
            blob_name("dev-j2", day(33), "json")
        ]
    );
    let container = store.account.container(&store.container);
    let text = container
        .get(&blob_name("dev-j1", day(33), "json"))
        .await
        .unwrap()
        .unwrap()
        .bytes;
    let first: serde_json::Value =
        serde_json::from_slice(text.split(|&b| b == b'\n').next().unwrap()).unwrap();
    assert_eq!(first["deviceId"], "dev-j1");
    assert_eq!(first["extras"]["battery"], 9_007_199_254_740_993_i64);
    let archived: Vec<StoredReading> = blobs.into_values().flat_map(|(_, _, r)| r).collect();
    assert_eq!(sorted(archived), sorted(old));
    assert!(store.table_rows().await.is_empty());
}

#[tokio::test]
async fn before_may_not_reach_into_the_retention_window() {
    let Some(store) = Store::start("archive_before").await else {
        return;
    };
    let tomorrow = &schemas::timefmt::format_ms(day(-1))[..10];
    let out = store.archiver(&["--before", tomorrow], &[]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("retention window"), "{stderr}");
}

#[tokio::test]
async fn as_a_service_it_archives_every_interval_and_stops_cleanly() {
    let Some(store) = Store::start("archive_service").await else {
        return;
    };
    let old = readings("dev-s", day(31), 60);
    store.backfill(&old).await;
    let mut service = tests::Service::start_with_args(
        "archiver",
        &["run"],
        &[
            ("AZURE_STORAGE_CONNECTION_STRING", store.connection.clone()),
            ("ARCHIVER_TABLE_NAME", store.table.clone()),
            ("ARCHIVER_DEVICE_TABLE", store.devices.clone()),
            ("ARCHIVER_CONTAINER", store.container.clone()),
            ("ARCHIVER_INTERVAL", "1s".into()),
        ],
    )
    .await;
    let archived = |n: f64| {
        let service = &service;
        // Deleting is a day's last step: once the rows are deleted, the day is done.
        move || async move { (service.metric("archiver_rows_deleted_total").await >= n).then_some(()) }
    };
    tests::wait_for(
        "the first pass",
        std::time::Duration::from_secs(30),
        archived(60.0),
    )
    .await;
    assert!(store.table_rows().await.is_empty());

    // Late rows are picked up by a later pass, without a restart.
    store.backfill(&readings("dev-s", day(31) + 500, 3)).await;
    tests::wait_for(
        "a later pass",
        std::time::Duration::from_secs(30),
        archived(63.0),
    )
    .await;
    assert_eq!(service.metric("archiver_merges_total").await, 1.0);
    assert_eq!(service.metric("archiver_rows_archived_total").await, 63.0);
    assert!(service.metric("archiver_bytes_written_total").await > 0.0);
    let blobs = store.blobs(Format::Parquet).await;
    assert_eq!(blobs[&blob_name("dev-s", day(31), "parquet")].1, "63");
    service.terminate(std::time::Duration::from_secs(10)).await;
}
