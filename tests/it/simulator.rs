//! The simulator's fault accounting against the real pipeline: what it says it injected is
//! exactly what the pipeline stores and dead-letters.

use crate::Pipeline;
use std::collections::BTreeMap;
use std::time::Duration;
use tests::services::bin_path;

/// Runs the simulator to completion; returns its JSON summary.
async fn simulate(p: &Pipeline, args: &[(&str, &str)]) -> serde_json::Value {
    let out = tokio::process::Command::new(bin_path("simulator"))
        .env("MQTT_URL", p.mosquitto.url())
        .env("SIMULATOR_METRICS_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "json")
        .envs(args.iter().copied())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "simulator failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("summary: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test]
async fn injected_faults_are_accounted_for_exactly() {
    let Some(p) = Pipeline::start("simulator_faults", &[], &[]).await else {
        return;
    };
    let faults = "malformed=0.04,schema=0.04,out_of_range=0.04,spoofed=0.04,future=0.04,\
                  stale=0.04,oversize=0.02,duplicate=0.05,out_of_order=0.05";
    let single = simulate(
        &p,
        &[
            ("SIMULATOR_DEVICES", "40"),
            ("SIMULATOR_INTERVAL", "250ms"),
            ("SIMULATOR_ROUNDS", "12"),
            ("SIMULATOR_SEED", "11"),
            ("SIMULATOR_CONNECTIONS", "3"),
            ("SIMULATOR_FAULTS", faults),
        ],
    )
    .await;
    let gateway = simulate(
        &p,
        &[
            ("SIMULATOR_DEVICES", "10"),
            ("SIMULATOR_DEVICE_PREFIX", "gw"),
            ("SIMULATOR_BATCH", "20"),
            ("SIMULATOR_FLAT_OUT", "true"),
            ("SIMULATOR_ROUNDS", "8"),
            ("SIMULATOR_SEED", "12"),
            ("SIMULATOR_FAULTS", faults),
        ],
    )
    .await;

    // Every message was acknowledged by the broker, and faults were really injected.
    let mut expected_dead: BTreeMap<String, u64> = BTreeMap::new();
    let mut expected_rows = 0;
    for summary in [&single, &gateway] {
        assert_eq!(summary["acked"], summary["messages"], "{summary}");
        expected_rows += summary["expected_rows"].as_u64().unwrap();
        for (reason, n) in summary["expected_dead_letters"].as_object().unwrap() {
            *expected_dead.entry(reason.clone()).or_default() += n.as_u64().unwrap();
        }
    }
    let injected: u64 = single["injected"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(injected >= 50, "too few faults to mean anything: {single}");
    assert_eq!(gateway["readings"], 10 * 8 * 20);

    let rows = p
        .wait_rows(expected_rows as usize, Duration::from_secs(120))
        .await;
    let total_dead: u64 = expected_dead.values().sum();
    tests::wait_for("every dead letter", Duration::from_secs(60), || async {
        (p.processor.metric("processor_dead_letters_total").await >= total_dead as f64)
            .then_some(())
    })
    .await;
    // Let anything extra arrive before judging.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rows_now = tests::storage::rows(&p.account, &p.table).await.unwrap();
    assert_eq!(rows_now.len(), rows.len());
    assert_eq!(rows.len() as u64, expected_rows, "stored rows");
    for (reason, n) in &expected_dead {
        let got = p
            .processor
            .metric(&format!(
                "processor_dead_letters_total{{reason=\"{reason}\"}}"
            ))
            .await;
        assert_eq!(got, *n as f64, "dead letters for {reason}");
    }
    assert_eq!(
        p.processor.metric("processor_dead_letters_total").await,
        total_dead as f64,
        "no dead letters beyond the injected faults"
    );
}
