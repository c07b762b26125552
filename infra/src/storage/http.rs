//! The HTTP client of every storage request but the lean table writes (those have their own
//! connections, `h1.rs`, unless a proxy is configured): the SDK's transport, one pooled,
//! keep-alive connection set per account.
//!
//! The SDK's default client disables connection pooling (`pool_max_idle_per_host(0)`, a
//! workaround for hyperium/hyper#2312), so every storage request opened a new TCP connection
//! (and, on real Azure, a TLS session): at the seed load that was the largest CPU cost of the
//! processor. This transport keeps connections, and avoids the hang that workaround addressed
//! by never handing the SDK a live response body: each body is read to its end here, so the
//! connection is back in the pool before the SDK sees the response, and a body that stalls is
//! bounded by the adapter's per-call timeout like everything else.
//!
//! Idle connections are dropped after [`IDLE`], below the emulator's (Node's) 5 s keep-alive,
//! so the client never reuses a connection the server is closing.

use azure_core::error::{ErrorKind, ResultExt};
use azure_core::headers::{HeaderName, HeaderValue, Headers};
use azure_core::{Body, HttpClient, Request, Response};
use std::sync::Arc;
use std::time::Duration;

/// How long an unused connection stays in the pool (here and in `h1.rs`).
pub(super) const IDLE: Duration = Duration::from_secs(3);

/// What every storage request says it comes from.
pub(super) const USER_AGENT: &str = concat!("telemetry-pipeline/", env!("CARGO_PKG_VERSION"));

/// A `reqwest` client with pooling on, behind the SDK's `HttpClient` trait.
#[derive(Debug, Clone)]
pub(super) struct Pooled(reqwest::Client);

/// The pooled client; `trusted_ca` (PEM) adds CAs to the built-in web roots (a private
/// endpoint, or an emulator behind TLS). The SDK's transport and the lean table path
/// (`wire.rs`) share it, and so its connections.
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
    /// `client`, as the SDK's builders take it.
    pub(super) fn shared(client: reqwest::Client) -> Arc<dyn HttpClient> {
        Arc::new(Self(client))
    }
}

#[async_trait::async_trait]
impl HttpClient for Pooled {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<Response> {
        let method = reqwest::Method::from_bytes(request.method().as_ref().as_bytes())
            .with_context(ErrorKind::DataConversion, || {
                format!("HTTP method {}", request.method())
            })?;
        let mut builder = self.0.request(method, request.url().clone());
        for (name, value) in request.headers().iter() {
            builder = builder.header(name.as_str(), value.as_str());
        }
        builder = match request.body().clone() {
            Body::Bytes(bytes) => builder.body(bytes),
            Body::SeekableStream(stream) => builder.body(reqwest::Body::wrap_stream(stream)),
        };
        let response = builder
            .send()
            .await
            // Without the URL: with a SAS credential its query string holds the signature.
            .map_err(reqwest::Error::without_url)
            .context(ErrorKind::Io, "sending the request")?;
        let status = azure_core::StatusCode::try_from(response.status().as_u16())
            .map_err(|_| ErrorKind::DataConversion.into_error())?;
        let mut headers = Headers::new();
        for (name, value) in response.headers() {
            if let Ok(value) = value.to_str() {
                headers.insert(
                    HeaderName::from(name.as_str().to_owned()),
                    HeaderValue::from(value.to_owned()),
                );
            }
        }
        let body = response
            .bytes()
            .await
            .map_err(reqwest::Error::without_url)
            .context(ErrorKind::Io, "reading the response body")?;
        let once = futures::stream::once(async move { Ok(body) });
        Ok(Response::new(status, headers, Box::pin(once)))
    }
}
