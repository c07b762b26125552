//! Observability: logs, the Prometheus recorder, and the small HTTP endpoint every service runs.
//!
//! `GET /metrics` renders Prometheus text; `GET /healthz` answers 200 while the process runs;
//! `GET /readyz` answers 200 once the service is connected and doing its job, 503 with the
//! reason otherwise. HTTP/1.1 by hyper, with no framework: three fixed routes do not justify
//! one in every binary.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Bound on reading a request's head, and on a whole [`http_get`].
const TIMEOUT: Duration = Duration::from_secs(5);

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
                        let service = hyper::service::service_fn(move |request| {
                            let response = respond(&request, &handle, &health);
                            async move { Ok::<_, Infallible>(response) }
                        });
                        let served = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(TIMEOUT)
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                        if let Err(error) = served {
                            tracing::debug!(%error, "Metrics request failed.");
                        }
                    });
                }
            }
        }
    });
    Ok(bound)
}

fn respond<B>(
    request: &Request<B>,
    handle: &PrometheusHandle,
    health: &Health,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            // Readiness as a metric too, read at scrape time (1 ready, 0 not), for alerting.
            let ready = health.not_ready_reason().is_none();
            metrics::gauge!(READY).set(if ready { 1.0 } else { 0.0 });
            (StatusCode::OK, "text/plain; version=0.0.4", handle.render())
        }
        (&Method::GET | &Method::HEAD, "/healthz") => {
            (StatusCode::OK, "text/plain", "ok\n".to_owned())
        }
        (&Method::GET | &Method::HEAD, "/readyz") => match health.not_ready_reason() {
            None => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
            Some(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{reason}\n"),
            ),
        },
        (&Method::GET | &Method::HEAD, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /healthz or /readyz\n".to_owned(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET and HEAD\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// An HTTP GET of one of these endpoints: (status, body), or `None` when unreachable, refused
/// or slower than 5 s. For tests and the load tester, which read the services' metrics and
/// readiness.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        // One request: the connection is driven until the response is read, and its task
        // ends with this call, however it ends (a timeout included).
        let _driver = AbortOnDrop(tokio::spawn(connection).abort_handle());
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = path.parse().ok()?;
        request
            .headers_mut()
            .insert(HOST, HeaderValue::from_str(&addr.to_string()).ok()?);
        let response = sender.send_request(request).await.ok()?;
        let status = response.status().as_u16();
        // Metrics bodies run to a few hundred KiB; 16 MiB bounds a wrong peer.
        let body = Limited::new(response.into_body(), 16 << 20)
            .collect()
            .await
            .ok()?
            .to_bytes();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(TIMEOUT, exchange).await.ok().flatten()
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn endpoint() -> (SocketAddr, Health, CancellationToken) {
        let (health, shutdown) = (Health::new("starting"), CancellationToken::new());
        let addr = serve_http(
            "127.0.0.1:0".parse().expect("an address"),
            health.clone(),
            shutdown.clone(),
        )
        .await
        .expect("bound");
        (addr, health, shutdown)
    }

    #[tokio::test]
    async fn the_routes_answer_by_method_and_path() {
        let (addr, health, shutdown) = endpoint().await;
        assert_eq!(
            http_get(addr, "/readyz").await,
            Some((503, "starting\n".to_owned()))
        );
        health.set_ready();
        assert_eq!(
            http_get(addr, "/readyz").await,
            Some((200, "ready\n".to_owned()))
        );
        assert_eq!(http_get(addr, "/healthz").await.map(|r| r.0), Some(200));
        let (status, metrics) = http_get(addr, "/metrics").await.expect("metrics");
        assert_eq!(status, 200);
        assert!(metrics.contains(READY), "{metrics}");
        assert_eq!(http_get(addr, "/nope").await.map(|r| r.0), Some(404));
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_request_split_across_packets_is_read_whole_and_a_post_refused() {
        let (addr, _health, shutdown) = endpoint().await;
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connected");
        stream.set_nodelay(true).expect("nodelay");
        for part in ["GET /heal", "thz HTTP/1.1\r\nHost: x\r\n", "\r\n"] {
            stream.write_all(part.as_bytes()).await.expect("written");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stream
            .write_all(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await
            .expect("written");
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .await
            .expect("read to the close");
        let statuses: Vec<&str> = answer
            .lines()
            .filter(|l| l.starts_with("HTTP/1.1 "))
            .collect();
        assert_eq!(
            statuses,
            ["HTTP/1.1 200 OK", "HTTP/1.1 405 Method Not Allowed"],
            "{answer}"
        );
        shutdown.cancel();
    }
}
