//! The end-to-end test harness: starts Azurite and Mosquitto on free loopback ports, runs the
//! service binaries as real processes (so they can be killed with SIGKILL), and reads results
//! back through the storage adapter.
//!
//! When Azurite or Mosquitto is missing the tests skip at runtime with a message, unless
//! `REQUIRE_E2E` is set (CI sets it), in which case they fail.

pub mod accounting;
pub mod proxy;
pub mod servers;
pub mod services;
pub mod storage;
pub mod webhook;

pub use servers::{Azurite, Mosquitto, SecureMosquitto};
pub use services::Service;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_path_buf()
}

/// A name no other test uses: lowercase letters and digits, valid for queues and tables.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A fresh directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("iot-e2e-{}", unique(label)));
        std::fs::create_dir_all(&dir).expect("create a temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A free loopback port (bound and released; a race with another process is possible but rare).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port")
}

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether the end-to-end prerequisites exist; prints why a test skips when they do not.
pub fn servers_available(test: &str) -> bool {
    let missing: Vec<&str> = [
        (!servers::azurite_bin().exists()).then_some("Azurite (run scripts/prereqs.sh)"),
        servers::mosquitto_bin().is_none().then_some("mosquitto"),
        (!services::bin_path("ingest").exists()).then_some("service binaries (cargo build --bins)"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if missing.is_empty() {
        return true;
    }
    skip_missing(test, &missing.join(", "));
    false
}

/// A test cannot run without `missing`: fails under `REQUIRE_E2E` (CI), else says it skips.
pub fn skip_missing(test: &str, missing: &str) {
    let msg = format!("{test}: missing {missing}");
    assert!(
        std::env::var_os("REQUIRE_E2E").is_none_or(|v| v.is_empty()),
        "{msg}"
    );
    eprintln!("SKIPPED {msg}");
}
