//! The dead-letter tool against real Azurite: every command with combined filters, replay
//! through a running processor, replay loops, kill -9 mid-replay and mid-purge, and a walk of
//! a large queue while the processor appends to it.

use crate::Pipeline;
use infra::storage::{Account, Queue};
use schemas::dead_letter::{self, DeadLetter, Refusal};
use schemas::timefmt::{format_ms, now_ms};
use schemas::{DeviceMessage, Reason};
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;
use tests::storage::{publish_all, reading, topic};
use tests::{unique, Azurite, TempDir};

const HOUR: i64 = 3_600_000;

/// The tool, pointed at one account and dead-letter queue.
#[derive(Clone)]
struct Tool {
    connection_string: String,
    queue: String,
}

/// What one run printed, and whether it succeeded.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

impl Tool {
    /// The pipeline's dead-letter queue.
    fn of(p: &Pipeline) -> Self {
        Self {
            connection_string: p.azurite.connection_string(),
            queue: p.dead_letters.clone(),
        }
    }

    /// Azurite alone, and the tool on a fresh queue of it; `None` when servers are missing.
    async fn on_own_azurite(test: &str) -> Option<(Azurite, Account, Self)> {
        if !tests::servers_available(test) {
            return None;
        }
        let azurite = Azurite::start().await;
        let tool = Self {
            connection_string: azurite.connection_string(),
            queue: unique("dead"),
        };
        let account = azurite.account();
        Some((azurite, account, tool))
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(tests::services::bin_path("deadletter"));
        cmd.args(args)
            .env("AZURE_STORAGE_CONNECTION_STRING", &self.connection_string)
            .env("DEADLETTER_QUEUE", &self.queue)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    async fn run(&self, args: &[&str]) -> Run {
        let out = self.command(args).output().await.expect("run deadletter");
        Run {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs and asserts success.
    async fn ok(&self, args: &[&str]) -> Run {
        let run = self.run(args).await;
        assert!(
            run.ok,
            "deadletter {args:?} failed:\n{}\n{}",
            run.stdout, run.stderr
        );
        run
    }
}

fn record(reason: Reason, device: &str, received_at_ms: i64, payload: &[u8]) -> DeadLetter {
    let msg = DeviceMessage::from_mqtt(&topic(device), payload, received_at_ms);
    DeadLetter::new(
        &msg,
        Refusal {
            reason,
            detail: format!("{reason} for the test"),
            device_id: Some(device.to_owned()),
            rejected_indexes: Vec::new(),
            attempts: 1,
            dead_lettered_at_ms: received_at_ms,
        },
    )
}

/// Puts `records` on `queue`, packed as the processor packs them.
async fn put_records(queue: &Queue, records: &[DeadLetter]) {
    queue.create_if_missing().await.expect("create queue");
    for (text, _) in dead_letter::pack(records) {
        queue.put(text).await.expect("put dead letters");
    }
}

/// Every record on `queue`, taken off it.
async fn drain(account: &Account, queue: &str) -> Vec<DeadLetter> {
    tests::storage::drain_dead_letters(account, queue).await
}

/// Every device message in the envelopes on `queue`, taken off it.
async fn drain_envelopes(account: &Account, queue: &str) -> Vec<DeviceMessage> {
    let q = account.queue(queue);
    let mut out = Vec::new();
    loop {
        let got = q.get(32, Duration::from_secs(60)).await.expect("get");
        if got.is_empty() {
            return out;
        }
        for m in got {
            out.extend(schemas::envelope::decode(&m.text).expect("an envelope"));
            q.delete(&m).await.expect("delete");
        }
    }
}

fn payloads(records: &[DeadLetter]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = records.iter().map(|r| r.payload_bytes().unwrap()).collect();
    out.sort();
    out
}

/// A mixed set: three reasons, two device families, two days; one binary payload.
fn mixed(t0: i64) -> Vec<DeadLetter> {
    let mut records = Vec::new();
    for i in 0..120 {
        let reason = [Reason::Stale, Reason::OutOfRange, Reason::Schema][i % 3];
        let device = if i % 4 < 2 {
            format!("sensor-{i:03}")
        } else {
            format!("gw-{i:03}")
        };
        let at = t0 + (i as i64 % 2) * 24 * HOUR + i as i64;
        records.push(record(reason, &device, at, &reading(&device, at, i as u64)));
    }
    records.push(record(
        Reason::MalformedJson,
        "sensor-bin",
        t0,
        &[0xff, 0x00, 0xfe, b'\n'],
    ));
    records
}

#[tokio::test]
async fn every_command_with_combined_filters() {
    let Some((_azurite, account, tool)) = Tool::on_own_azurite("deadletter_commands").await else {
        return;
    };
    let t0 = schemas::timefmt::parse_rfc3339_ms("2026-11-20T10:00:00Z").unwrap();
    let records = mixed(t0);
    put_records(&account.queue(&tool.queue), &records).await;
    let (since, until) = (format_ms(t0 - HOUR), format_ms(t0 + HOUR));
    let filter = [
        "--reason",
        "stale,schema",
        "--device",
        "sensor-*",
        "--since",
        &since,
        "--until",
        &until,
    ];
    let expected = |r: &DeadLetter| {
        matches!(r.reason, Reason::Stale | Reason::Schema)
            && r.device_id
                .as_deref()
                .is_some_and(|d| d.starts_with("sensor-"))
            && r.received_at < until
    };
    let want = records.iter().filter(|r| expected(r)).count();
    assert!(want > 5 && want < 40, "{want}");

    // Standard output cannot be synced, so removing what went there could lose it.
    let refused = tool.run(&["export", "-o", "-", "--delete"]).await;
    assert!(
        !refused.ok && refused.stdout.is_empty(),
        "{}\n{}",
        refused.stdout,
        refused.stderr
    );
    assert!(
        refused.stderr.contains("--delete needs a file"),
        "{}",
        refused.stderr
    );

    // list: the summary, with the filter and without.
    let all = tool.ok(&["list", "--json"]).await.json();
    assert_eq!(all["records"], records.len());
    assert_eq!(all["complete"], true);
    let by_reason: BTreeMap<String, u64> = all["by_reason"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["reason"].as_str().unwrap().to_owned(),
                g["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(by_reason["stale"], 40);
    assert_eq!(by_reason["malformed_json"], 1);
    assert_eq!(all["by_day"].as_array().unwrap().len(), 2);
    let mut args = vec!["list", "--json"];
    args.extend(filter);
    let some = tool.ok(&args).await.json();
    assert_eq!(some["records"], want);
    let table = tool.ok(&["list"]).await.stdout;
    assert!(table.contains("121 dead letters match"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("stale ") && l.split_whitespace().nth(1) == Some("40")),
        "{table}"
    );

    // list --limit: rows; show: one of them in full.
    let rows = tool
        .ok(&[
            "list",
            "--limit",
            "3",
            "--json",
            "--reason",
            "malformed_json",
        ])
        .await
        .json();
    let rows = rows["records"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    let id = rows[0]["id"].as_str().unwrap();
    let shown = tool.ok(&["show", id]).await.stdout;
    assert!(shown.contains("(not UTF-8; base64) /wD+Cg=="), "{shown}");
    let id = tool
        .ok(&["list", "--limit", "1", "--json", "--reason", "stale"])
        .await
        .json()["records"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let shown = tool.ok(&["show", &id]).await.stdout;
    assert!(
        shown.contains("\"deviceId\": \""),
        "pretty JSON payload: {shown}"
    );
    assert!(!tool.run(&["show", "0000000000000000"]).await.ok);

    // replay --dry-run changes nothing; replay to a missing queue is refused up front.
    let target = unique("ingest");
    account.queue(&target).create_if_missing().await.unwrap();
    let mut args = vec!["replay", "--dry-run", "--json", "--target-queue", &target];
    args.extend(filter);
    let dry = tool.ok(&args).await.json();
    assert_eq!(dry["would_replay"], want);
    assert!(
        !tool
            .run(&["replay", "--target-queue", "no-such-queue"])
            .await
            .ok
    );

    // export: non-destructive, the matching records exactly.
    let dir = TempDir::new("dl-export");
    let file = dir.0.join("matching.jsonl");
    let mut args = vec!["export", "-o", file.to_str().unwrap()];
    args.extend(filter);
    tool.ok(&args).await;
    let exported: Vec<DeadLetter> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let matching: Vec<DeadLetter> = records.iter().filter(|r| expected(r)).cloned().collect();
    assert_eq!(payloads(&exported), payloads(&matching));
    assert_eq!(
        tool.ok(&["list", "--json"]).await.json()["records"],
        records.len()
    );
    assert!(
        !tool.run(&args).await.ok,
        "an existing file is never overwritten"
    );

    // purge: refused without --yes and a terminal; then the matching records only.
    let mut args = vec!["purge"];
    args.extend(filter);
    let refused = tool.run(&args).await;
    assert!(
        !refused.ok && refused.stderr.contains("--yes"),
        "{}",
        refused.stderr
    );
    args.extend(["--yes", "--json"]);
    let purged = tool.ok(&args).await.json();
    assert_eq!(purged["deleted"], want);
    assert_eq!(purged["removed"], want);
    assert_eq!(
        tool.ok(&["list", "--json"]).await.json()["records"],
        records.len() - want
    );

    // export --delete, then import: byte-exact payloads, the binary one included.
    let everything = dir.0.join("everything.jsonl");
    let run = tool
        .ok(&["export", "--delete", "-o", everything.to_str().unwrap()])
        .await;
    assert!(
        run.stderr
            .contains(&format!("Exported {}", records.len() - want)),
        "{}",
        run.stderr
    );
    assert_eq!(tool.ok(&["list", "--json"]).await.json()["records"], 0);
    let other = Tool {
        connection_string: tool.connection_string.clone(),
        queue: unique("elsewhere"),
    };
    other
        .ok(&["import", "-i", everything.to_str().unwrap()])
        .await;
    other
        .ok(&["import", "-i", file.to_str().unwrap(), "--reason", "stale"])
        .await;
    let back = drain(&account, &other.queue).await;
    let mut want_back: Vec<DeadLetter> = records.iter().filter(|r| !expected(r)).cloned().collect();
    want_back.extend(
        matching
            .iter()
            .filter(|r| r.reason == Reason::Stale)
            .cloned(),
    );
    assert_eq!(payloads(&back), payloads(&want_back));
    let mut back_sorted = back.clone();
    back_sorted.sort_by_key(|r| r.payload_bytes().unwrap());
    let mut want_sorted = want_back.clone();
    want_sorted.sort_by_key(|r| r.payload_bytes().unwrap());
    assert_eq!(
        back_sorted, want_sorted,
        "records are whole, not just payloads"
    );

    // A bad line stops an import before anything is added.
    let bad = dir.0.join("bad.jsonl");
    std::fs::write(&bad, format!("{}\nnot json\n", records[0].to_json_line())).unwrap();
    let run = other.run(&["import", "-i", bad.to_str().unwrap()]).await;
    assert!(!run.ok && run.stderr.contains("line 2"), "{}", run.stderr);
    assert!(drain(&account, &other.queue).await.is_empty());
}

/// Processor settings with the pipeline's names, and defaults for everything else.
fn processor_env(p: &Pipeline) -> Vec<(&'static str, String)> {
    vec![
        (
            "AZURE_STORAGE_CONNECTION_STRING",
            p.azurite.connection_string(),
        ),
        ("PROCESSOR_QUEUE_NAME", p.queue.clone()),
        ("PROCESSOR_DEAD_LETTER_QUEUE", p.dead_letters.clone()),
        ("PROCESSOR_QUARANTINE_QUEUE", p.quarantine.clone()),
        ("PROCESSOR_TABLE_NAME", p.table.clone()),
        ("PROCESSOR_DEVICE_TABLE", p.devices.clone()),
    ]
}

async fn wait_dead_letters(p: &Pipeline, n: f64) {
    tests::wait_for("dead letters", Duration::from_secs(60), || async {
        (p.processor.metric("processor_dead_letters_total").await >= n).then_some(())
    })
    .await;
}

#[tokio::test]
async fn replay_after_fixing_the_cause_and_with_overrides() {
    // The processor starts misconfigured: readings older than an hour are refused as stale.
    let strict = [("PROCESSOR_MAX_AGE", "1h".to_owned())];
    let Some(mut p) = Pipeline::start("deadletter_replay", &[], &strict).await else {
        return;
    };
    let tool = Tool::of(&p);
    let target = ["--target-queue", p.queue.as_str()];
    let now = now_ms();
    let mut messages = Vec::new();
    // Three hours old: stale for the misconfigured processor, fine for the right one.
    for i in 0..20 {
        let device = format!("fix-{i:02}");
        messages.push((
            topic(&device),
            reading(&device, now - 3 * HOUR + i, i as u64),
        ));
    }
    // Forty days old: stale for any processor; a backfill needs --allow-stale.
    for i in 0..10 {
        let device = format!("old-{i:02}");
        messages.push((
            topic(&device),
            reading(&device, now - 40 * 24 * HOUR + i, i as u64),
        ));
    }
    // Published under a retired id: the payload names the device as it was.
    for i in 0..5 {
        let payload = reading(&format!("legacy-{i}"), now - i, i as u64);
        messages.push((topic(&format!("renamed-{i}")), payload));
    }
    publish_all(p.mosquitto.port, messages).await;
    wait_dead_letters(&p, 35.0).await;
    let summary = tool.ok(&["list", "--json"]).await.json();
    assert_eq!(summary["records"], 35);

    // Fix the cause (the right max age), then replay what it refused.
    p.processor.kill9().await;
    p.processor = tests::Service::start("processor", &processor_env(&p)).await;
    let mut args = vec!["replay", "--reason", "stale", "--device", "fix-*", "--json"];
    args.extend(target);
    let run = tool.ok(&args).await.json();
    assert_eq!(run["replayed"], 20);
    assert_eq!(run["removed"], 20);
    p.wait_rows(20, Duration::from_secs(60)).await;

    // A backfill: the override applies to the replayed messages only.
    let mut args = vec!["replay", "--reason", "stale", "--allow-stale"];
    args.extend(target);
    tool.ok(&args).await;
    // A corrected id mapping: topic and payload ids are read as the new ones.
    let mut args = vec!["replay", "--reason", "device_mismatch"];
    let maps: Vec<String> = (0..5).map(|i| format!("legacy-{i}=renamed-{i}")).collect();
    for m in &maps {
        args.extend(["--map-device", m.as_str()]);
    }
    args.extend(target);
    tool.ok(&args).await;
    let rows = p.wait_rows(35, Duration::from_secs(60)).await;
    let partitions: std::collections::BTreeSet<&str> = rows
        .iter()
        .map(|e| e["PartitionKey"].as_str().unwrap())
        .collect();
    assert!(
        partitions.contains("old-00") && partitions.contains("renamed-4"),
        "{partitions:?}"
    );
    assert!(!partitions.iter().any(|d| d.starts_with("legacy-")));
    assert_eq!(
        tool.ok(&["list", "--json"]).await.json()["records"],
        0,
        "the dead letters are gone"
    );

    // Live traffic never sees an override: a new 40-day-old reading is still refused.
    let dead_before = p.processor.metric("processor_dead_letters_total").await;
    publish_all(
        p.mosquitto.port,
        vec![(
            topic("old-00"),
            reading("old-00", now - 40 * 24 * HOUR - 1, 99),
        )],
    )
    .await;
    wait_dead_letters(&p, dead_before + 1.0).await;
    let left = drain(&p.account, &p.dead_letters).await;
    assert_eq!(left.len(), 1);
    assert_eq!((left[0].reason, left[0].replay_count), (Reason::Stale, 0));
}

#[tokio::test]
async fn a_replay_loop_stops_at_the_limit() {
    let Some(p) = Pipeline::start("deadletter_loop", &[], &[]).await else {
        return;
    };
    let tool = Tool::of(&p);
    publish_all(
        p.mosquitto.port,
        vec![(topic("loop-1"), b"{not json".to_vec())],
    )
    .await;
    wait_dead_letters(&p, 1.0).await;
    let replay = |extra: &'static [&'static str]| {
        let mut args = vec![
            "replay",
            "--json",
            "--max-replays",
            "2",
            "--target-queue",
            p.queue.as_str(),
        ];
        args.extend(extra);
        args
    };
    for round in 1..=2 {
        let run = tool.ok(&replay(&[])).await.json();
        assert_eq!(run["replayed"], 1, "round {round}");
        wait_dead_letters(&p, 1.0 + f64::from(round)).await;
    }
    // Replayed twice and refused twice: the third replay is refused and the record stays.
    let rows = tool.ok(&["list", "--limit", "5", "--json"]).await.json();
    assert_eq!(rows["records"][0]["replayCount"], 2);
    assert_eq!(rows["records"][0]["source"], "replay");
    let run = tool.run(&replay(&[])).await;
    let tally = run.json();
    assert_eq!(tally["replayed"], 0);
    assert_eq!(tally["skipped"]["replay_limit"], 1);
    assert_eq!(tool.ok(&["list", "--json"]).await.json()["records"], 1);
    // --force goes past the limit, knowingly.
    assert_eq!(tool.ok(&replay(&["--force"])).await.json()["replayed"], 1);
    wait_dead_letters(&p, 4.0).await;
    let left = drain(&p.account, &p.dead_letters).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].replay_count, 3);
}

/// `n` records with unique payloads, `reason` for all.
fn many(n: usize, reason: Reason, pad: usize) -> Vec<DeadLetter> {
    let t0 = now_ms() - HOUR;
    (0..n)
        .map(|i| {
            let device = format!("bulk-{:03}", i % 100);
            let payload = format!(
                r#"{{"deviceId":"{device}","n":{i},"pad":"{}"}}"#,
                "p".repeat(pad)
            );
            record(reason, &device, t0 + i as i64, payload.as_bytes())
        })
        .collect()
}

#[tokio::test]
async fn kill_9_mid_replay_and_mid_purge_loses_nothing() {
    let Some((_azurite, account, tool)) = Tool::on_own_azurite("deadletter_kill9").await else {
        return;
    };
    let target = unique("ingest");
    account.queue(&target).create_if_missing().await.unwrap();
    let dead = account.queue(&tool.queue);

    // Replay at a slow pace, killed once part of it is in the target queue.
    let records = many(3_000, Reason::Stale, 100);
    put_records(&dead, &records).await;
    let mut child = tool
        .command(&[
            "replay",
            "--rate",
            "500",
            "--hold",
            "3s",
            "--target-queue",
            &target,
        ])
        .spawn()
        .unwrap();
    let target_queue = account.queue(&target);
    tests::wait_for("some records replayed", Duration::from_secs(60), || async {
        (target_queue.approximate_depth().await.unwrap_or(0) >= 2).then_some(())
    })
    .await;
    child.kill().await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await; // the killed walk's --hold
    let replayed = drain_envelopes(&account, &target).await;
    let still_dead = drain(&account, &tool.queue).await;
    let mut found: Vec<Vec<u8>> = replayed.iter().map(|m| m.payload.clone()).collect();
    found.extend(still_dead.iter().map(|r| r.payload_bytes().unwrap()));
    found.sort();
    found.dedup();
    assert_eq!(
        found,
        payloads(&records),
        "every record is dead-lettered or replayed"
    );
    assert!(
        !replayed.is_empty() && !still_dead.is_empty(),
        "killed mid-replay: {} replayed, {} still dead",
        replayed.len(),
        still_dead.len()
    );
    assert!(replayed.iter().all(|m| m.replay_count == 1));

    // Purge: one reason's records in messages of their own, killed once some are deleted.
    let keep = many(500, Reason::Schema, 100);
    let doomed = many(30_000, Reason::Stale, 1_000);
    put_records(&dead, &keep).await;
    put_records(&dead, &doomed).await;
    let depth = dead.approximate_depth().await.unwrap();
    let mut child = tool
        .command(&["purge", "--yes", "--reason", "stale", "--hold", "3s"])
        .spawn()
        .unwrap();
    tests::wait_for("some records purged", Duration::from_secs(60), || async {
        (dead.approximate_depth().await.unwrap_or(depth) < depth).then_some(())
    })
    .await;
    child.kill().await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let left = drain(&account, &tool.queue).await;
    let kept: Vec<DeadLetter> = left
        .iter()
        .filter(|r| r.reason == Reason::Schema)
        .cloned()
        .collect();
    assert_eq!(
        payloads(&kept),
        payloads(&keep),
        "nothing that did not match was touched"
    );
    let stale_left = left.len() - kept.len();
    assert!(
        stale_left > 0 && stale_left < doomed.len(),
        "killed mid-purge: {stale_left} of {} left",
        doomed.len()
    );
}

#[tokio::test]
async fn list_walks_a_large_queue_while_the_processor_appends() {
    let Some(p) = Pipeline::start("deadletter_concurrent", &[], &[]).await else {
        return;
    };
    let tool = Tool::of(&p);
    let existing = many(30_000, Reason::Schema, 50);
    put_records(&p.account.queue(&p.dead_letters), &existing).await;
    let bad: Vec<(String, Vec<u8>)> = (0..300)
        .map(|i| {
            (
                topic(&format!("live-{i}")),
                format!("{{broken {i}").into_bytes(),
            )
        })
        .collect();
    // A long hold: everything the walk took must be given back at its end, not by timeout.
    let walk = tokio::spawn({
        let tool = tool.clone();
        async move { tool.ok(&["list", "--json", "--hold", "10m"]).await.json() }
    });
    publish_all(p.mosquitto.port, bad).await;
    let summary = walk.await.unwrap();
    let seen = summary["records"].as_u64().unwrap() as usize;
    assert!(
        (existing.len()..=existing.len() + 300).contains(&seen),
        "the walk saw {seen}"
    );
    wait_dead_letters(&p, 300.0).await;
    // Nothing lost, nothing doubled, nothing left hidden.
    let all = drain(&p.account, &p.dead_letters).await;
    assert_eq!(all.len(), existing.len() + 300);
    let malformed = all
        .iter()
        .filter(|r| r.reason == Reason::MalformedJson)
        .count();
    assert_eq!(malformed, 300);
}

#[tokio::test]
async fn a_trickle_of_dead_letters_is_packed_across_rounds() {
    let Some(p) = Pipeline::start("deadletter_trickle", &[], &[]).await else {
        return;
    };
    let tool = Tool::of(&p);
    // One bad message at a time, each in a round of its own. Without the writer's linger
    // this made 11 queue messages.
    for i in 0..12 {
        publish_all(
            p.mosquitto.port,
            vec![(topic("drip"), format!("{{bad {i}").into_bytes())],
        )
        .await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_dead_letters(&p, 12.0).await;
    let summary = tool.ok(&["list", "--json"]).await.json();
    assert_eq!(summary["records"], 12);
    let messages = summary["messages_walked"].as_u64().unwrap();
    assert!(
        messages <= 3,
        "12 dead letters took {messages} queue messages"
    );
}

#[tokio::test]
async fn two_operators_at_once_lose_nothing_and_say_what_they_missed() {
    let Some((_azurite, account, tool)) = Tool::on_own_azurite("deadletter_two_operators").await
    else {
        return;
    };
    let target = unique("ingest");
    account.queue(&target).create_if_missing().await.unwrap();
    let mut records = many(10_000, Reason::Stale, 200);
    records.extend(many(10_000, Reason::Schema, 200));
    put_records(&account.queue(&tool.queue), &records).await;

    let replay = [
        "replay",
        "--json",
        "--reason",
        "stale",
        "--target-queue",
        &target,
    ];
    let (listed, replayed) = tokio::join!(tool.ok(&["list", "--json"]), tool.ok(&replay));
    let (listed, replayed) = (listed.json(), replayed.json());
    // Each saw what the other was not holding, and says so when that was not everything.
    if listed["records"].as_u64() < Some(20_000) {
        assert!(listed["messages_unseen"].as_u64() > Some(0), "{listed}");
    }
    if replayed["replayed"].as_u64() < Some(10_000) {
        assert!(replayed["messages_unseen"].as_u64() > Some(0), "{replayed}");
    }
    // Nothing lost, and nothing left hidden: every stale record is replayed or still here.
    let in_target = drain_envelopes(&account, &target).await;
    assert_eq!(
        in_target.len() as u64,
        replayed["replayed"].as_u64().unwrap()
    );
    let left = drain(&account, &tool.queue).await;
    let mut found: Vec<Vec<u8>> = in_target.iter().map(|m| m.payload.clone()).collect();
    found.extend(left.iter().map(|r| r.payload_bytes().unwrap()));
    found.sort();
    assert_eq!(found, payloads(&records), "each record exactly once");
}

#[tokio::test]
async fn undecodable_messages_are_kept_whole_and_replayable_and_newer_envelopes_wait() {
    use base64::Engine;
    let Some(p) = Pipeline::start("quarantine", &[], &[]).await else {
        return;
    };
    let b64 = |json: &str| base64::engine::general_purpose::STANDARD.encode(json);
    let entry = |device: &str, at: i64| {
        let payload = String::from_utf8(reading(device, at, 1)).unwrap();
        format!(
            r#"{{"t":"{}","r":{},"p":{}}}"#,
            topic(device),
            now_ms(),
            serde_json::to_string(&payload).unwrap()
        )
    };
    let now = now_ms();
    // Near the queue's 64 KiB, and not base64: once cut to 32 KiB and deleted. (It ends in
    // no blank: the queue service trims trailing whitespace from any message text.)
    let garbage = format!("{}!", "not an envelope; ".repeat(3_800));
    // A readable envelope with one unreadable entry between two good ones.
    let mixed = b64(&format!(
        r#"{{"v":1,"m":[{},{{"t":"x","r":1}},{}]}}"#,
        entry("q-a", now - 1_000),
        entry("q-b", now - 1_000)
    ));
    // Written by a newer ingest: this processor cannot read it and must not destroy it.
    let newer = b64(r#"{"v":2,"m":{"shape":"unknown"}}"#);
    let queue = p.account.queue(&p.queue);
    for text in [&garbage, &mixed, &newer] {
        queue.put(text.clone()).await.unwrap();
    }

    // The readable entries are stored; each unreadable part is a dead letter naming the
    // quarantine; the unreadable messages are kept whole there.
    p.wait_rows(2, Duration::from_secs(60)).await;
    wait_dead_letters(&p, 2.0).await;
    let tool = Tool {
        connection_string: p.azurite.connection_string(),
        queue: p.dead_letters.clone(),
    };
    let q = ["quarantine", "--quarantine-queue", p.quarantine.as_str()];
    let listed = tests::wait_for("two quarantined messages", Duration::from_secs(30), || {
        let tool = tool.clone();
        async move {
            let run = tool.ok(&[q[0], q[1], q[2], "list", "--json"]).await.json();
            (run.as_array()?.len() == 2).then_some(run)
        }
    })
    .await;
    let mut sizes: Vec<u64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["bytes"].as_u64().unwrap())
        .collect();
    sizes.sort_unstable();
    assert_eq!(
        sizes,
        [mixed.len() as u64, garbage.len() as u64],
        "{listed}"
    );
    let problems = listed.to_string();
    assert!(
        problems.contains("not base64") && problems.contains("entry 1"),
        "{problems}"
    );
    let held = p.account.queue(&p.quarantine);
    let taken = held.get(32, Duration::from_secs(1)).await.unwrap();
    let mut texts: Vec<&str> = taken.iter().map(|m| m.text.as_str()).collect();
    texts.sort_unstable_by_key(|t| t.len());
    assert_eq!(
        texts,
        [mixed.as_str(), garbage.as_str()],
        "kept whole, as they were"
    );
    let records = tests::storage::drain_dead_letters(&p.account, &p.dead_letters).await;
    assert_eq!(records.len(), 2);
    assert!(records
        .iter()
        .all(|r| r.reason == Reason::InvalidEnvelope && r.detail.contains(&p.quarantine)));

    // The newer envelope stays queued, and readiness and a metric say why.
    let (status, body) = tests::services::http_get(p.processor.metrics_port, "/readyz")
        .await
        .unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("envelope version 2"), "{body}");
    assert!(p.processor.metric("processor_newer_envelopes_total").await >= 1.0);
    assert!(p.processor.metric("processor_quarantined_total").await >= 2.0);
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    // What a processor once could not read, replayed now: a message an older processor
    // quarantined becomes rows; the still-unreadable ones come back to quarantine, once.
    held.put(b64(&format!(
        r#"{{"v":1,"m":[{}]}}"#,
        entry("q-c", now - 500)
    )))
    .await
    .unwrap();
    tool.ok(&[
        q[0],
        q[1],
        q[2],
        "replay",
        "--target-queue",
        p.queue.as_str(),
    ])
    .await;
    let rows = p.wait_rows(3, Duration::from_secs(60)).await;
    assert!(rows.iter().any(|r| r["PartitionKey"] == "q-c"));
    tests::wait_for(
        "the unreadable two back in quarantine",
        Duration::from_secs(60),
        || {
            let tool = tool.clone();
            async move {
                let run = tool.ok(&[q[0], q[1], q[2], "list", "--json"]).await.json();
                (run.as_array()?.len() == 2).then_some(())
            }
        },
    )
    .await;
    assert!(
        queue.approximate_depth().await.unwrap() >= 1,
        "the newer envelope is still queued"
    );
}

#[tokio::test]
async fn a_refusal_written_twice_is_counted_and_exported_once() {
    let Some((_azurite, account, tool)) = Tool::on_own_azurite("deadletter_duplicates").await
    else {
        return;
    };
    let t0 = now_ms() - HOUR;
    let original = record(Reason::Schema, "dup-1", t0, br#"{"deviceId":"dup-1"}"#);
    // The processor redid the round: the same refusal, a later delivery, other words.
    let mut redone = original.clone();
    redone.attempts = 3;
    redone.detail = "redone".into();
    let other = record(Reason::Schema, "dup-2", t0, br#"{"deviceId":"dup-2"}"#);
    put_records(&account.queue(&tool.queue), &[original, other, redone]).await;

    let listed = tool.ok(&["list", "--json"]).await.json();
    assert_eq!(listed["records"], 2, "{listed}");
    assert_eq!(listed["duplicates"], 1, "{listed}");

    let dir = TempDir::new("dl-dup");
    let file = dir.0.join("out.jsonl");
    let run = tool
        .ok(&["export", "--delete", "-o", file.to_str().unwrap()])
        .await;
    assert!(
        run.stderr.contains("Exported 2 of 2") && run.stderr.contains("1 more records repeated"),
        "{}",
        run.stderr
    );
    let lines = std::fs::read_to_string(&file).unwrap();
    assert_eq!(lines.lines().count(), 2, "each refused message once");
    // The duplicate left with its twin, once the twin was on disk.
    assert!(drain(&account, &tool.queue).await.is_empty());
}

#[tokio::test]
async fn a_purge_limit_counts_duplicates_as_records() {
    let Some((_azurite, account, tool)) = Tool::on_own_azurite("deadletter_purge_dups").await
    else {
        return;
    };
    let t0 = now_ms() - HOUR;
    let a = record(Reason::Schema, "dup-a", t0, b"{}");
    let mut twin = a.clone();
    twin.attempts = 4;
    let b = record(Reason::Schema, "dup-b", t0, b"[]");
    put_records(&account.queue(&tool.queue), &[a, twin, b]).await;
    // What the operator confirms is a number of records: no more may go.
    tool.ok(&["purge", "--yes", "--limit", "2"]).await;
    assert_eq!(drain(&account, &tool.queue).await.len(), 1);
}
