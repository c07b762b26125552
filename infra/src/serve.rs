//! Observability: logs, the Prometheus recorder, and the small HTTP endpoint every service runs.
//!
//! `GET /metrics` renders Prometheus text; `GET /healthz` answers 200 while the process runs;
//! `GET /readyz` answers 200 once the service is connected and doing its job, 503 with the
//! reason otherwise. The endpoint is hand-rolled on a `TcpListener`: three fixed routes do not
//! justify an HTTP server framework in every binary.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global tracing subscriber. `RUST_LOG` overrides the default `info` filter.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The gauge every service exports: 1 while `/readyz` answers 200, else 0.
pub const READY: &str = "service_ready";

/// Buckets for every latency histogram, in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The process-wide Prometheus recorder, installed on first use (tests run several services in
/// one process, and a recorder can be installed only once).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .and_then(PrometheusBuilder::install_recorder)
                // Only fails if another recorder is installed, which this module prevents.
                .expect("install the Prometheus recorder")
        })
        .clone()
}

/// Readiness, set by the service as it connects and loses connections. Besides the main
/// reason (`set_ready` / `set_not_ready`), parts of a service can hold reasons of their own
/// under a key (`fail` / `recover`): the service is ready only when none is held, so one part
/// recovering does not hide another's trouble.
#[derive(Debug, Clone)]
pub struct Health {
    reasons: Arc<Mutex<BTreeMap<&'static str, String>>>,
}

/// The key of the main reason.
const MAIN: &str = "";

impl Health {
    /// Starts not ready, for `reason`.
    pub fn new(reason: &str) -> Self {
        let health = Self {
            reasons: Arc::default(),
        };
        health.set_not_ready(reason);
        health
    }

    pub fn set_ready(&self) {
        self.recover(MAIN);
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        self.fail(MAIN, reason);
    }

    /// Not ready while `key` holds `reason`.
    pub fn fail(&self, key: &'static str, reason: impl Into<String>) {
        self.lock().insert(key, reason.into());
    }

    /// Drops the reason held under `key`.
    pub fn recover(&self, key: &'static str) {
        self.lock().remove(key);
    }

    /// `None` when ready, else why not.
    pub fn not_ready_reason(&self) -> Option<String> {
        let reasons = self.lock();
        (!reasons.is_empty()).then(|| reasons.values().cloned().collect::<Vec<_>>().join("; "))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, String>> {
        // A panic while holding this lock cannot leave the map half-written.
        self.reasons.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The metrics endpoint could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind the metrics endpoint {addr}: {source}")]
pub struct BindError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds `addr` (port 0 picks a free port) and serves the endpoints until `shutdown`.
/// Returns the bound address.
pub async fn serve_http(
    addr: SocketAddr,
    health: Health,
    shutdown: CancellationToken,
) -> Result<SocketAddr, BindError> {
    let bind_error = |source| BindError { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    let handle = metrics_handle();
    tokio::spawn(async move {
        let mut upkeep = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = upkeep.tick() => handle.run_upkeep(),
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let (handle, health) = (handle.clone(), health.clone());
                    tokio::spawn(async move {
                        if let Err(error) = respond(stream, &handle, &health).await {
                            tracing::debug!(%error, "Metrics request failed.");
                        }
                    });
                }
            }
        }
    });
    Ok(bound)
}

async fn respond(
    mut stream: tokio::net::TcpStream,
    handle: &PrometheusHandle,
    health: &Health,
) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let request = String::from_utf8_lossy(&buf[..n]);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let (status, content_type, body) = match path {
        "/metrics" => {
            // Readiness as a metric too, read at scrape time (1 ready, 0 not), for alerting.
            let ready = health.not_ready_reason().is_none();
            metrics::gauge!(READY).set(if ready { 1.0 } else { 0.0 });
            ("200 OK", "text/plain; version=0.0.4", handle.render())
        }
        "/healthz" => ("200 OK", "text/plain", "ok\n".to_owned()),
        "/readyz" => match health.not_ready_reason() {
            None => ("200 OK", "text/plain", "ready\n".to_owned()),
            Some(reason) => (
                "503 Service Unavailable",
                "text/plain",
                format!("{reason}\n"),
            ),
        },
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz or /readyz\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// A bare HTTP GET of one of these endpoints: (status, body), or `None` when unreachable.
/// For tests and the load tester, which read the services' metrics and readiness.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    // One request per connection: read to the end, whatever the server's keep-alive.
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// The sum of a metric's samples in a Prometheus text body, over every label set. `name`
/// may include a label set (`m{reason="stale"}`) to pick one series.
pub fn metric_sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
