//! Progress of a pass: a redrawn bar on a terminal, a log line every few seconds otherwise.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Default)]
pub struct Counters {
    pub devices_done: AtomicUsize,
    pub days: AtomicUsize,
    pub rows: AtomicUsize,
    pub bytes: AtomicUsize,
    pub failures: AtomicUsize,
}

/// Reports `counters` until dropped.
#[derive(Debug)]
pub struct Progress {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    pub fn start(counters: Arc<Counters>, devices: usize, bar: bool) -> Self {
        let bar = bar && std::io::stderr().is_terminal();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let every = if bar {
                Duration::from_millis(250)
            } else {
                Duration::from_secs(10)
            };
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let done = counters.devices_done.load(Relaxed);
                let rows = counters.rows.load(Relaxed);
                let rate = rows as f64 / started.elapsed().as_secs_f64().max(0.001);
                if bar {
                    let width = 30;
                    let filled = (done * width).checked_div(devices).unwrap_or(width);
                    let mut err = std::io::stderr().lock();
                    let _ = write!(
                        err,
                        "\r\x1b[K[{}{}] {done}/{devices} devices · {rows} rows · {:.0} rows/s · {} failed",
                        "#".repeat(filled),
                        " ".repeat(width - filled),
                        rate,
                        counters.failures.load(Relaxed),
                    );
                    let _ = err.flush();
                } else {
                    tracing::info!(
                        devices_done = done,
                        devices,
                        days = counters.days.load(Relaxed),
                        rows,
                        rows_per_second = rate.round(),
                        failures = counters.failures.load(Relaxed),
                        "Archiving."
                    );
                }
            }
            if bar {
                let _ = write!(std::io::stderr(), "\r\x1b[K");
            }
        });
        Self { stop, task }
    }

    /// Stops reporting and clears the bar.
    pub async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}
