//! The HTTP side: one listener, HTTP/1.1 by hyper, a handful of fixed routes. Graceful
//! shutdown: stop accepting, let requests in progress finish (within a grace), close idle
//! connections.

use crate::api::{self, Api};
use crate::metrics_names as m;
use crate::problem::Problem;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, LINK};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use infra::mqtt::Secret;
use infra::serve::Health;
use metrics_exporter_prometheus::PrometheusHandle;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long requests in progress may run on after the shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A client must send its request head within this (slow-loris defence).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

const INDEX_HTML: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");
const APP_CSS: &str = include_str!("page/app.css");
// uPlot 1.6.32 (MIT, npm `uplot`), its dist files unmodified: the page's charts.
const UPLOT_JS: &str = include_str!("page/vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("page/vendor/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("page/vendor/LICENSE-uPlot");

#[derive(Debug)]
pub struct App {
    pub api: Api,
    pub token: Option<Secret>,
    pub health: Health,
    pub metrics: PrometheusHandle,
}

type Body = Full<Bytes>;

/// Serves `listener` until `shutdown`, then drains.
pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    let mut upkeep = tokio::time::interval(Duration::from_secs(5));
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = upkeep.tick() => {
                app.metrics.run_upkeep();
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "Cannot accept a connection.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (app, shutdown) = (app.clone(), shutdown.clone());
        tracker.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(app.handle(request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, "Connection ended with an error.");
            }
        });
    }
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("Requests still running after the shutdown grace were cut off.");
    }
}

impl App {
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let path = request.uri().path().to_owned();
        let route = match path.as_str() {
            "/"
            | "/app.js"
            | "/app.css"
            | "/vendor/uPlot.iife.min.js"
            | "/vendor/uPlot.min.css"
            | "/vendor/LICENSE-uPlot" => "page",
            "/healthz" | "/readyz" => "health",
            "/metrics" => "metrics",
            p if p.starts_with("/api/") => api::route_of(p),
            _ => "unknown",
        };
        let response = self.respond(&request, &path).await;
        let status = response.status().as_u16().to_string();
        metrics::counter!(m::REQUESTS, "route" => route, "status" => status).increment(1);
        metrics::histogram!(m::REQUEST_SECONDS, "route" => route)
            .record(started.elapsed().as_secs_f64());
        response
    }

    async fn respond(&self, request: &Request<Incoming>, path: &str) -> Response<Body> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return problem(&Problem::method_not_allowed());
        }
        match path {
            "/" => text(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML),
            "/app.js" => text(StatusCode::OK, "text/javascript; charset=utf-8", APP_JS),
            "/app.css" => text(StatusCode::OK, "text/css; charset=utf-8", APP_CSS),
            "/vendor/uPlot.iife.min.js" => {
                text(StatusCode::OK, "text/javascript; charset=utf-8", UPLOT_JS)
            }
            "/vendor/uPlot.min.css" => text(StatusCode::OK, "text/css; charset=utf-8", UPLOT_CSS),
            "/vendor/LICENSE-uPlot" => {
                text(StatusCode::OK, "text/plain; charset=utf-8", UPLOT_LICENSE)
            }
            "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
            "/readyz" => match self.health.not_ready_reason() {
                None => text(StatusCode::OK, "text/plain", "ready\n"),
                Some(reason) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    &format!("{reason}\n"),
                ),
            },
            "/metrics" => text(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                &self.metrics.render(),
            ),
            p if p.starts_with("/api/") => {
                if !self.authorised(request) {
                    return problem(&Problem::unauthorized());
                }
                match self.api.answer(p, request.uri().query()).await {
                    Ok(reply) => {
                        let mut response = Response::new(Full::new(reply.body));
                        let headers = response.headers_mut();
                        headers.insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
                        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                        if let Some(next) = reply.next {
                            // Built from validated ids and formatted times: always a valid value.
                            if let Ok(link) =
                                HeaderValue::from_str(&format!("<{next}>; rel=\"next\""))
                            {
                                headers.insert(LINK, link);
                            }
                        }
                        response
                    }
                    Err(p) => {
                        if p.status >= 500 {
                            tracing::warn!(status = p.status, detail = %p.detail, "API request failed.");
                        }
                        problem(&p)
                    }
                }
            }
            _ => problem(&Problem::not_found(
                "nothing here: the dashboard is at /, the API under /api/v1/",
            )),
        }
    }

    /// Whether the request carries the token (always, when none is set). Compared in constant
    /// time.
    fn authorised(&self, request: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let given = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token.trim());
        constant_time_eq(given.as_bytes(), token.expose().as_bytes())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn text(status: StatusCode, content_type: &'static str, body: &str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn problem(p: &Problem) -> Response<Body> {
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = text(status, "application/problem+json", &p.body());
    if p.status == 401 {
        response.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"secret"));
    }
}
