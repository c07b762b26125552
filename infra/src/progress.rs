//! Progress of long work: a line redrawn in place on a terminal, or a log line every 10 s
//! when stderr is not a terminal (or logs are JSON), so log files stay readable.

use crate::serve::LogFormat;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Reports until [`Progress::finish`].
#[derive(Debug)]
pub struct Progress {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// Calls `status` with the time since the start, every 250 ms on a terminal (drawn in
    /// place), else every 10 s (logged).
    pub fn start(format: LogFormat, status: impl Fn(Duration) -> String + Send + 'static) -> Self {
        let bar = format == LogFormat::Pretty && std::io::stderr().is_terminal();
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
                let line = status(started.elapsed());
                if bar {
                    let mut err = std::io::stderr().lock();
                    let _ = write!(err, "\r\x1b[K{line}");
                    let _ = err.flush();
                } else {
                    tracing::info!(status = %line, "Progress.");
                }
            }
            if bar {
                let _ = write!(std::io::stderr(), "\r\x1b[K");
            }
        });
        Self { stop, task }
    }

    /// Stops reporting and clears the line.
    pub async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// `[#####     ]` for `done` of `total`.
pub fn bar(done: usize, total: usize, width: usize) -> String {
    let filled = (done * width)
        .checked_div(total)
        .unwrap_or(width)
        .min(width);
    format!("[{}{}]", "#".repeat(filled), " ".repeat(width - filled))
}
