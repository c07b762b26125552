//! docker-compose.yml cannot be started here (no Docker engine), so it is validated offline,
//! and checked against the services' real flags.

use std::process::Command;

#[test]
fn docker_compose_file_is_valid() {
    let root = tests::repo_root();
    let available = Command::new("docker-compose")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        tests::skip_missing(
            "docker_compose_file_is_valid",
            "docker-compose (scripts/prereqs.sh --test installs it)",
        );
        return;
    }
    let out = Command::new("docker-compose")
        .args(["-f", "docker-compose.yml", "config", "-q"])
        .current_dir(&root)
        .output()
        .expect("run docker-compose");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn compose_environment_names_real_flags() {
    // Every environment variable the compose file sets must be one a service reads.
    let root = tests::repo_root();
    let compose = std::fs::read_to_string(root.join("docker-compose.yml")).expect("compose file");
    let mut known = String::new();
    for crate_dir in [
        "ingest",
        "processor",
        "archiver",
        "dashboard",
        "simulator",
        "deadletter",
        "alarms",
        "infra",
    ] {
        for entry in std::fs::read_dir(root.join(crate_dir).join("src")).expect("src") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "rs") {
                known.push_str(&std::fs::read_to_string(path).expect("source"));
            }
        }
    }
    let mut unknown = Vec::new();
    for line in compose.lines() {
        let t = line.trim();
        let Some((name, _)) = t.split_once(':') else {
            continue;
        };
        let name = name.trim();
        let looks_like_env = name.len() > 3
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit());
        if looks_like_env && name != "RUST_LOG" && !known.contains(&format!("\"{name}\"")) {
            unknown.push(name.to_owned());
        }
    }
    assert!(
        unknown.is_empty(),
        "compose sets variables no service reads: {unknown:?}"
    );
}
