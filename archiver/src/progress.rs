//! The counters a pass reports progress from.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct Counters {
    pub devices_done: AtomicUsize,
    pub days: AtomicUsize,
    pub rows: AtomicUsize,
    pub bytes: AtomicUsize,
    pub failures: AtomicUsize,
    /// The last failure's error, for readiness.
    pub last_failure: std::sync::Mutex<Option<String>>,
}

/// Starts reporting `counters` for a pass over `devices` devices.
pub fn start(
    counters: Arc<Counters>,
    devices: usize,
    format: infra::serve::LogFormat,
) -> infra::progress::Progress {
    infra::progress::Progress::start(format, move |elapsed| {
        let done = counters.devices_done.load(Relaxed);
        let rows = counters.rows.load(Relaxed);
        format!(
            "{} {done}/{devices} devices · {} days · {rows} rows · {:.0} rows/s · {} failed",
            infra::progress::bar(done, devices, 30),
            counters.days.load(Relaxed),
            rows as f64 / elapsed.as_secs_f64().max(0.001),
            counters.failures.load(Relaxed),
        )
    })
}
