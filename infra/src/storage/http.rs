//! The HTTP client of every queue and blob request (the table's have their own connections,
//! `pool.rs`, unless a proxy is configured): the SDK's transport, one pooled, keep-alive
//! connection set per account.
//!
//! The official SDK is built without its default client (reqwest 0.13 with aws-lc, a second
//! HTTP and TLS stack in the graph), so every SDK client and Entra ID credential is handed this
//! one. It keeps connections, and never hands the SDK a live response body: each body is read
//! to its end here, so the connection is back in the pool before the SDK sees the response,
//! and a body that stalls is bounded by the adapter's per-call timeout like everything else.
//!
//! Idle connections are dropped after [`IDLE`], below the emulator's (Node's) 5 s keep-alive,
//! so the client never reuses a connection the server is closing.

use azure_core::error::{Error, ErrorKind};
use azure_core::http::headers::{HeaderName, HeaderValue, Headers};
use azure_core::http::{AsyncRawResponse, Body, HttpClient, Method, Request, StatusCode};
use std::sync::Arc;
use std::time::Duration;

/// How long an unused connection stays in the pool (here and in `pool.rs`).
pub(super) const IDLE: Duration = Duration::from_secs(3);

/// What every storage request says it comes from.
pub(super) const USER_AGENT: &str = concat!("telemetry-pipeline/", env!("CARGO_PKG_VERSION"));

/// A `reqwest` client with pooling on, behind the SDK's `HttpClient` trait.
#[derive(Debug, Clone)]
pub(super) struct Pooled(reqwest::Client);

/// The pooled client; `trusted_ca` (PEM) adds CAs to the built-in web roots (a private
/// endpoint, or an emulator behind TLS). The SDK's transport, the Entra ID credentials and the
/// lean table path (`wire.rs`) share it, and so its connections. It never decompresses (the
/// blob client's ranged reads need the bytes as stored).
pub(super) fn client(trusted_ca: Option<&[u8]>) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .pool_idle_timeout(IDLE)
        .tcp_nodelay(true)
        // Storage never redirects. A redirect followed would turn a PUT into a GET whose 200
        // (a proxy's page, say) reads as the write's success; unfollowed, a 3xx is an error.
        .redirect(reqwest::redirect::Policy::none());
    if let Some(pem) = trusted_ca {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|_| "holds no readable PEM certificate".to_owned())?;
        if certs.is_empty() {
            return Err("holds no PEM certificate".to_owned());
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

impl Pooled {
    /// `client`, as the SDK's client options take it.
    pub(super) fn transport(client: reqwest::Client) -> azure_core::http::Transport {
        azure_core::http::Transport::new(Arc::new(Self(client)))
    }
}

#[async_trait::async_trait]
impl HttpClient for Pooled {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let method = match request.method() {
            Method::Get => reqwest::Method::GET,
            Method::Put => reqwest::Method::PUT,
            Method::Post => reqwest::Method::POST,
            Method::Delete => reqwest::Method::DELETE,
            Method::Head => reqwest::Method::HEAD,
            Method::Patch => reqwest::Method::PATCH,
            other => {
                return Err(Error::with_message(
                    ErrorKind::DataConversion,
                    format!("HTTP method {other:?}"),
                ))
            }
        };
        let mut builder = self.0.request(method, request.url().clone());
        for (name, value) in request.headers().iter() {
            builder = builder.header(name.as_str(), value.as_str());
        }
        builder = match request.body().clone() {
            Body::Bytes(bytes) => builder.body(bytes),
            Body::SeekableStream(stream) => builder.body(reqwest::Body::wrap_stream(stream)),
        };
        // Errors without the URL: with a SAS its query string holds the signature.
        let io = |e: reqwest::Error| {
            let kind = if e.is_connect() {
                ErrorKind::Connection
            } else {
                ErrorKind::Io
            };
            Error::new(kind, e.without_url())
        };
        let response = builder.send().await.map_err(io)?;
        let status = StatusCode::from(response.status().as_u16());
        let mut headers = Headers::new();
        for (name, value) in response.headers() {
            if let Ok(value) = value.to_str() {
                headers.insert(
                    HeaderName::from(name.as_str().to_owned()),
                    HeaderValue::from(value.to_owned()),
                );
            }
        }
        // Read whole here, so the connection is back in the pool before the SDK sees the
        // response, and a stalled body is bounded by the adapter's per-call timeout.
        let body = response.bytes().await.map_err(io)?;
        Ok(AsyncRawResponse::from_bytes(status, headers, body))
    }
}
