//! The dashboard against real Azurite: every endpoint and format, a range spanning archived
//! days and table days (archived by the real archiver), paging, every bad input, the token;
//! then the page in a real browser (Debian's Chromium, headless).

use crate::archive::Store;
use schemas::entity::StoredReading;
use schemas::reading::{Extra, Reading};
use schemas::timefmt::{format_ms, now_ms};
use std::time::Duration;
use tests::{repo_root, unique, Service, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MINUTE: i64 = 60_000;
const DAY: i64 = 86_400_000;
const HOUR: i64 = 3_600_000;
/// Readings every 10 minutes: any 24 h window holds exactly 144 of them.
const EVERY: i64 = 10 * MINUTE;

/// An HTTP answer: status, content type, `Link` header, body.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) content_type: String,
    link: Option<String>,
    pub(crate) body: Vec<u8>,
}

impl Answer {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

async fn request(port: u16, method: &str, path: &str, token: Option<&str>) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the dashboard");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    };
    Answer {
        status: head.split_whitespace().nth(1).unwrap().parse().unwrap(),
        content_type: header("content-type").unwrap_or_default(),
        link: header("link"),
        body: raw[split + 4..].to_vec(),
    }
}

pub(crate) async fn get(port: u16, path: &str) -> Answer {
    request(port, "GET", path, None).await
}

/// `device`'s readings every 10 minutes from `from` to `to`, with values derived from time.
fn series(device: &str, from: i64, to: i64) -> Vec<StoredReading> {
    let first = (from + EVERY - 1).div_euclid(EVERY) * EVERY;
    (0..)
        .map(|k| first + k * EVERY)
        .take_while(|t| *t < to)
        .map(|t| StoredReading {
            reading: Reading {
                device_id: device.to_owned(),
                measured_at_ms: t,
                seq: Some(t / EVERY),
                temperature: Some(((t / EVERY) % 50) as f64 / 2.0),
                humidity: Some(40.0),
                pressure: None,
                extras: vec![("fw".into(), Extra::Str("1.0".into()))],
            },
            ingested_at_ms: t,
        })
        .collect()
}

async fn start_dashboard(store: &Store, extra: &[(&str, String)]) -> Service {
    let mut env = vec![
        ("AZURE_STORAGE_CONNECTION_STRING", store.connection.clone()),
        ("DASHBOARD_TABLE_NAME", store.table.clone()),
        ("DASHBOARD_DEVICE_TABLE", store.devices.clone()),
        ("DASHBOARD_ARCHIVE_CONTAINER", store.container.clone()),
        ("DASHBOARD_MAX_RAW_RANGE", "10days".into()),
    ];
    env.extend(extra.iter().cloned());
    Service::start("dashboard", &env).await
}

fn times(readings: &serde_json::Value) -> Vec<i64> {
    readings
        .as_array()
        .unwrap()
        .iter()
        .map(|r| schemas::timefmt::parse_rfc3339_ms(r["measuredAt"].as_str().unwrap()).unwrap())
        .collect()
}

#[tokio::test]
async fn the_api_answers_every_endpoint_and_format_over_table_and_archive() {
    let Some(store) = Store::start("dashboard_api").await else {
        return;
    };
    let now = now_ms();
    // Five days of history for three devices (and an hour ahead, so any window up to now is
    // full); a fourth device went silent two days ago.
    let mut rows = Vec::new();
    for device in ["dash-a", "dash-b", "dash-c"] {
        rows.extend(series(device, now - 5 * DAY, now + 60 * MINUTE));
    }
    rows.extend(series("quiet-1", now - 5 * DAY, now - 2 * DAY));
    store.backfill(&rows).await;
    // The real archiver moves every day older than two days into blobs.
    store.archiver_ok(&["--retention", "2days"]).await;
    let in_table = tests::storage::rows(&store.account, &store.table)
        .await
        .unwrap();
    assert!(
        in_table.len() < rows.len(),
        "the archiver archived nothing, so nothing spans the archive"
    );

    let (ingest, dead) = (unique("ingest"), unique("dead"));
    for q in [&ingest, &dead] {
        store.account.queue(q).create_if_missing().await.unwrap();
    }
    store.account.queue(&dead).put("x".into()).await.unwrap();
    let dashboard = start_dashboard(
        &store,
        &[
            ("DASHBOARD_INGEST_QUEUE", ingest),
            ("DASHBOARD_DEAD_LETTER_QUEUE", dead),
            ("DASHBOARD_SILENT_AFTER", "1h".into()),
        ],
    )
    .await;
    let port = dashboard.metrics_port;

    // Devices: all, by prefix, silent, and page by page.
    let all = get(port, "/api/v1/devices").await;
    assert_eq!(
        (all.status, all.content_type.as_str()),
        (200, "application/json")
    );
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&all.json()), ["dash-a", "dash-b", "dash-c", "quiet-1"]);
    let a = &all.json()["devices"][0];
    assert_eq!(a["latest"]["extras"]["fw"], "1.0");
    assert!(a["firstSeen"].is_string() && a["lastSeen"].is_string());
    assert_eq!(
        ids(&get(port, "/api/v1/devices?prefix=dash-").await.json()),
        ["dash-a", "dash-b", "dash-c"]
    );
    assert_eq!(
        ids(&get(port, "/api/v1/devices?silent=1h").await.json()),
        ["quiet-1"]
    );
    let mut paged = Vec::new();
    let mut next = Some("/api/v1/devices?limit=3".to_owned());
    while let Some(path) = next {
        let page = get(port, &path).await;
        assert_eq!(page.status, 200, "{path}");
        let body = page.json();
        paged.extend(ids(&body));
        next = body["next"].as_str().map(str::to_owned);
        assert_eq!(page.link.is_some(), next.is_some(), "Link header with next");
    }
    assert_eq!(paged, ids(&all.json()), "pages cover every device once");

    // Readings over four days: two archived, two in the table, merged in time order.
    let (from, to) = (now - 4 * DAY, now);
    let sent = series("dash-a", from, to);
    let expected: Vec<i64> = sent.iter().map(|r| r.reading.measured_at_ms).collect();
    let path = format!(
        "/api/v1/devices/dash-a/readings?from={}&to={}",
        format_ms(from),
        format_ms(to)
    );
    let whole = get(port, &path).await;
    assert_eq!(whole.status, 200);
    let body = whole.json();
    assert_eq!(
        times(&body["readings"]),
        expected,
        "every reading once, in order"
    );
    let first = &body["readings"][0];
    assert_eq!(first["temperature"].as_f64(), sent[0].reading.temperature);
    assert_eq!(first["extras"]["fw"], "1.0");
    assert!(body["next"].is_null());

    // The same range page by page, by the `next` links.
    let mut walked = Vec::new();
    let mut next = Some(format!("{path}&limit=100"));
    while let Some(p) = next {
        let body = get(port, &p).await.json();
        walked.extend(times(&body["readings"]));
        next = body["next"].as_str().map(str::to_owned);
    }
    assert_eq!(walked, expected, "pages cover the range once");

    // CSV and Parquet hold the same readings.
    let csv = get(port, &format!("{path}&format=csv")).await;
    assert_eq!(csv.content_type, "text/csv; charset=utf-8");
    let text = String::from_utf8(csv.body).unwrap();
    assert_eq!(text.lines().count(), 1 + expected.len());
    assert!(text.starts_with("measuredAt,ingestedAt,seq,temperature,humidity,pressure,extras"));
    let parquet = get(port, &format!("{path}&format=parquet")).await;
    assert_eq!(parquet.content_type, "application/vnd.apache.parquet");
    let decoded =
        schemas::archive::decode(schemas::archive::Format::Parquet, parquet.body.into()).unwrap();
    let decoded_times: Vec<i64> = decoded.iter().map(|r| r.reading.measured_at_ms).collect();
    assert_eq!(decoded_times, expected);

    // The pipeline view.
    let pipeline = get(port, "/api/v1/pipeline").await.json();
    assert_eq!(pipeline["devices"]["total"], 4);
    assert_eq!(pipeline["devices"]["silent"], 1);
    assert_eq!(pipeline["queues"]["deadLetter"]["depth"], 1);
    assert_eq!(pipeline["queues"]["ingest"]["depth"], 0);

    // Every bad input: a 4xx problem that says what is wrong.
    let day = format_ms(now - DAY);
    let cases = [
        ("/api/v1/devices/bad'id/readings", 400, "not a device id"),
        (
            "/api/v1/devices/x%27%20or%20%271%27%3D%271/readings",
            400,
            "not a device id",
        ),
        ("/api/v1/devices/nobody/readings", 404, "never stored"),
        (
            "/api/v1/devices/dash-a/readings?from=yesterday",
            400,
            "RFC 3339",
        ),
        (
            &format!("/api/v1/devices/dash-a/readings?from={day}&to={day}"),
            400,
            "empty",
        ),
        (
            "/api/v1/devices/dash-a/readings?from=2020-01-01T00:00:00Z&to=2020-02-01T00:00:00Z",
            400,
            "longer than",
        ),
        (
            "/api/v1/devices/dash-a/readings?format=xml",
            400,
            "json, csv or parquet",
        ),
        (
            "/api/v1/devices/dash-a/readings?limit=0",
            400,
            "whole number",
        ),
        ("/api/v1/devices?prefix=a'b", 400, "cannot start"),
        ("/api/v1/devices?cursor=!!", 400, "gave out"),
        ("/api/v1/devices?silent=soon", 400, "try 10m"),
        (
            "/api/v1/devices/dash-a/rollups?interval=2h",
            400,
            "expected 1h or 1d",
        ),
        ("/api/v1/devices/nobody/rollups", 404, "never stored"),
        ("/api/v1/nothing", 404, "no such endpoint"),
    ];
    for (path, status, why) in cases {
        let answer = get(port, path).await;
        assert_eq!(answer.status, status, "{path}");
        assert_eq!(answer.content_type, "application/problem+json", "{path}");
        let detail = answer.json()["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains(why), "{path}: {detail:?} lacks {why:?}");
    }
    assert_eq!(
        request(port, "POST", "/api/v1/devices", None).await.status,
        405
    );
    let empty = format!(
        "/api/v1/devices/dash-a/readings?from={}&to={}&format=parquet",
        format_ms(now + 2 * DAY),
        format_ms(now + 3 * DAY)
    );
    let empty = get(port, &empty).await;
    assert_eq!(empty.status, 200, "an empty range");
    let none =
        schemas::archive::decode(schemas::archive::Format::Parquet, empty.body.into()).unwrap();
    assert!(none.is_empty(), "an empty Parquet file: {none:?}");
}

#[tokio::test]
async fn the_token_guards_the_api_and_never_reaches_the_log() {
    let Some(store) = Store::start("dashboard_token").await else {
        return;
    };
    let dir = TempDir::new("dashboard-token");
    let token = unique("tok");
    let file = dir.0.join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let dashboard = start_dashboard(
        &store,
        &[
            ("DASHBOARD_TOKEN_FILE", file.display().to_string()),
            ("RUST_LOG", "debug".into()),
        ],
    )
    .await;
    let port = dashboard.metrics_port;
    let none = get(port, "/api/v1/devices").await;
    assert_eq!(
        (none.status, none.content_type.as_str()),
        (401, "application/problem+json")
    );
    assert_eq!(
        request(port, "GET", "/api/v1/devices", Some("wrong"))
            .await
            .status,
        401
    );
    assert_eq!(
        request(port, "GET", "/api/v1/devices", Some(&token))
            .await
            .status,
        200
    );
    // The page, health and metrics stay open (the page asks for the token itself).
    for path in ["/", "/healthz", "/readyz", "/metrics"] {
        assert_eq!(get(port, path).await.status, 200, "{path}");
    }
    let log = dashboard.log_text();
    assert!(!log.contains(&token), "the token is in the log:\n{log}");
}

#[tokio::test]
async fn the_dashboard_works_in_a_real_browser() {
    let Some(store) = Store::start("dashboard_browser").await else {
        return;
    };
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let playwright = repo_root().join(".tools/browser/node_modules/playwright-core");
    if !std::path::Path::new(&chromium).exists() || !playwright.exists() {
        let missing =
            "Chromium or playwright-core is not installed (bash scripts/prereqs.sh --test)";
        assert!(std::env::var("REQUIRE_E2E").is_err(), "{missing}");
        eprintln!("skipping the browser test: {missing}");
        return;
    }
    let now = now_ms();
    let mut rows = Vec::new();
    for i in 0..12 {
        rows.extend(series(
            &format!("sensor-{i:02}"),
            now - 2 * DAY,
            now + 60 * MINUTE,
        ));
    }
    store.backfill(&rows).await;
    // sensor-03's hourly rollups, whole past hours: the 30-day view draws their means inside
    // their min–max band.
    let rollups = unique("rollups");
    let rollup_table = store.account.table(&rollups);
    rollup_table.create_if_missing().await.unwrap();
    let mut past: Vec<Reading> = rows
        .iter()
        .map(|r| r.reading.clone())
        .filter(|r| r.device_id == "sensor-03" && r.measured_at_ms < now - now % HOUR)
        .collect();
    // One reading never came: its hour's cell in the completeness strip is incomplete. The
    // last at half past: its hour (the last whole one) has readings before and after it.
    let lost = past
        .iter()
        .rposition(|r| r.measured_at_ms % HOUR == 30 * MINUTE)
        .expect("a reading at half past");
    past.remove(lost);
    let hourly = schemas::rollup::hourly(&past);
    assert_eq!(
        hourly
            .iter()
            .filter(|h| h.seqs.is_some_and(|q| q.missing > 0))
            .count(),
        1
    );
    for rollup in &hourly {
        rollup_table.upsert(&rollup.to_entity()).await.unwrap();
    }
    // An alarm raised on sensor-03's temperature three hours ago, as a processor leaves it.
    let alarms = unique("alarms");
    let alarm_table = store.account.table(&alarms);
    alarm_table.create_if_missing().await.unwrap();
    let rule = schemas::alarm::Rule::parse(
        r#"{"id":"warm","prefix":"sensor-","measurement":"temperature","high":20}"#,
    )
    .unwrap();
    let since = now - 3 * HOUR;
    let state = schemas::alarm::State {
        status: schemas::alarm::Status::Raised { since },
        at: since + HOUR,
        value: Some(24.5),
    };
    for row in [
        schemas::alarm::rule_entity(&rule),
        schemas::alarm::state_entity("sensor-03", "warm", &state, &[]),
        schemas::alarm::active_entity("sensor-03", "warm"),
    ] {
        alarm_table.upsert(&row).await.unwrap();
    }
    let dashboard = start_dashboard(
        &store,
        &[
            ("DASHBOARD_ROLLUP_TABLE", rollups),
            ("DASHBOARD_ALARM_TABLE", alarms),
        ],
    )
    .await;
    let shots = repo_root().join("target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let out = tokio::process::Command::new("node")
        .arg(repo_root().join("tests/browser/dashboard.mjs"))
        .env(
            "DASHBOARD_URL",
            format!("http://127.0.0.1:{}/", dashboard.metrics_port),
        )
        .env("EXPECT_DEVICES", "12")
        .env("DEVICE", "sensor-03")
        .env("EXPECT_POINTS", "144")
        .env("EXPECT_ROLLUPS", hourly.len().to_string())
        .env("EXPECT_INCOMPLETE", "1")
        .env("EXPECT_ALARMS", "1")
        .env("SCREENSHOT_DIR", &shots)
        .env("CHROMIUM", &chromium)
        .env("PLAYWRIGHT_CORE", &playwright)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .expect("the browser test finished within 2 minutes")
        .expect("run node");
    assert!(
        out.status.success(),
        "browser checks failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for name in [
        "fleet-laptop",
        "device-laptop",
        "fleet-phone",
        "device-phone",
    ] {
        assert!(
            shots.join(format!("{name}.png")).exists(),
            "no screenshot {name}"
        );
    }
}
