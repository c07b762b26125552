//! The deployment's monitoring, validated offline: the alerting rules pass `promtool check
//! rules` and their own unit tests (`promtool test rules`), and name only metrics the
//! services export.

use std::path::PathBuf;
use std::process::Command;

const SERVICES: [&str; 4] = ["ingest", "processor", "archiver", "dashboard"];

/// promtool on the PATH, or where `scripts/prereqs.sh --test` extracts it.
fn promtool() -> Option<PathBuf> {
    let extracted = tests::repo_root().join(".tools/prometheus/usr/bin/promtool");
    let on_path = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if on_path {
        Some(PathBuf::from("promtool"))
    } else {
        extracted.exists().then_some(extracted)
    }
}

#[test]
fn alert_rules_pass_promtool_and_their_tests() {
    let Some(promtool) = promtool() else {
        tests::skip_missing(
            "alert_rules_pass_promtool_and_their_tests",
            "promtool (scripts/prereqs.sh --test extracts it)",
        );
        return;
    };
    let dir = tests::repo_root().join("deploy/prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The metric names `text` mentions: snake_case words with a service's (or the shared
/// `storage_`/`service_`) prefix.
fn metric_names(text: &str) -> std::collections::BTreeSet<&str> {
    text.split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        .filter(|w| {
            [
                "ingest_",
                "processor_",
                "archiver_",
                "dashboard_",
                "storage_",
                "service_",
            ]
            .iter()
            .any(|p| w.starts_with(p))
        })
        .collect()
}

/// The metrics `file` (under the repo) names that no service exports; panics if it names
/// fewer than `at_least` (a check that finds nothing proves nothing).
fn unexported(file: &str, at_least: usize) -> Vec<String> {
    let text = std::fs::read_to_string(tests::repo_root().join(file)).expect(file);
    let names = metric_names(&text);
    assert!(
        names.len() >= at_least,
        "{file}: too few metrics found: {names:?}"
    );
    names
        .into_iter()
        // A histogram's series carry suffixes its name does not.
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n)
        })
        .filter(|n| !SERVICES.iter().any(|s| tests::services::exports(s, n)))
        .map(str::to_owned)
        .collect()
}

#[test]
fn alert_rules_name_only_exported_metrics() {
    let unknown = unexported("deploy/prometheus/alerts.yml", 10);
    assert!(unknown.is_empty(), "no service exports {unknown:?}");
}

#[test]
fn the_grafana_dashboard_is_json_naming_only_exported_metrics() {
    let file = "deploy/grafana/pipeline.json";
    let text = std::fs::read_to_string(tests::repo_root().join(file)).expect(file);
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(
        panels.iter().all(|p| p["targets"]
            .as_array()
            .is_some_and(|t| !t.is_empty() && t.iter().all(|t| t["expr"].is_string()))),
        "every panel queries something"
    );
    let unknown = unexported(file, 12);
    assert!(unknown.is_empty(), "no service exports {unknown:?}");
}
