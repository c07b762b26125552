//! The table writes' own kept-alive HTTP/1.1 connections (`wire.rs`), on hyper's client
//! connections (`hyper::client::conn::http1`) with a small pool of the project's own.
//!
//! A request owns its connection from checkout to the end of the response: the connection's
//! driver (hyper's `Connection` future) is polled on the request's own task, never spawned,
//! so a request costs no hand-off to another task and back, and a request cut short (a
//! timeout) drops its connection with it: no later request can read a stale response. Only
//! a connection whose whole response was read goes back to the pool, and it is taken again
//! only if hyper, asked at checkout, says it can carry another request. Responses are
//! bounded: hyper bounds the head ([`MAX_HEAD`]), the body is read through the limit the
//! caller gives ([`MAX_WRITE_RESPONSE`] for writes, [`MAX_QUERY_RESPONSE`] for query pages).
//!
//! Every table request goes here. The SDK's queue and blob requests stay with the pooled
//! client (`http.rs`), and so do the table's when a proxy is configured (that client honours
//! `HTTPS_PROXY` and the like; this one does not).

use super::http::{IDLE, USER_AGENT};
use super::AccountError;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1;
use hyper::header::{HeaderValue, CONTENT_LENGTH, HOST, USER_AGENT as USER_AGENT_HEADER};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Most idle connections kept: above the writes a processor has in flight by default (128),
/// so that a round's burst of writes finds its connections again in the next round.
const MAX_IDLE: usize = 256;
/// Largest response head (hyper's read buffer): the table service's are under 2 KiB.
const MAX_HEAD: usize = 64 * 1024;
/// Largest response body to a write: a 100-operation transaction's is about 40 KiB; past this
/// the peer is not the table service, and reading on would only hold memory.
pub(super) const MAX_WRITE_RESPONSE: usize = 1024 * 1024;
/// Largest response body to a query: a page of 1,000 rows with full metadata, each up to the
/// service's 1 MiB entity limit in principle, in practice a few KiB (a rollup row about 1.2).
pub(super) const MAX_QUERY_RESPONSE: usize = 32 * 1024 * 1024;
/// The variables through which the pooled client finds a proxy.
const PROXY_VARIABLES: [&str; 6] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// What the service answered (on either path of `wire.rs`).
#[derive(Debug)]
pub(super) struct Response {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Response {
    /// `x-ms-error-code`, when present and not empty.
    pub(super) fn code(&self) -> Option<&str> {
        self.headers
            .get("x-ms-error-code")
            .and_then(|v| v.to_str().ok())
            .filter(|c| !c.is_empty())
    }
}

/// Whether a request may be sent again on a new connection when a kept one closes before a
/// whole response head arrives (hyper cannot tell a close before the first byte from one
/// inside the head, so a request the server began to answer may go again). The caller
/// decides: only a request whose repetition changes nothing (an upsert, a conditional delete,
/// whose repeat finds its row gone and says so) may say yes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resend {
    IfUnanswered,
    Never,
}

/// Builds a request anew for [`Resend::IfUnanswered`] (a shared key signs it again, with a new
/// date; a token or SAS is the same). `None` if it cannot, which a request already built once
/// does not meet in practice.
pub(super) type Rebuild<'a> = &'a (dyn Fn() -> Option<hyper::Request<Bytes>> + Sync);

/// One origin's connections.
pub(super) struct Pool {
    /// `host:port`, where to connect.
    authority: String,
    /// The `Host` header.
    host: HeaderValue,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    idle: Mutex<Vec<(Conn, Instant)>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("authority", &self.authority)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

type Driver = http1::Connection<TokioIo<Stream>, Full<Bytes>>;

/// A connection: hyper's handle to send on it, and its driver, polled by whoever holds it.
struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    driver: Pin<Box<Driver>>,
}

/// How a request went wrong on one connection.
struct Failed {
    error: io::Error,
    /// Whether the request may have reached the server and had no response at all: what
    /// [`Resend::IfUnanswered`] sends again.
    unanswered: bool,
}

impl Failed {
    /// The connection ended where `what` says.
    fn closed(unanswered: bool, what: &str) -> Self {
        Failed {
            unanswered,
            error: io::Error::new(io::ErrorKind::UnexpectedEof, what),
        }
    }
}

impl Pool {
    /// For the origin of `endpoint` (`http` or `https`); `trusted_ca` (PEM) adds CAs to the
    /// built-in web roots, as for the pooled client. `None` when a proxy is configured.
    pub(super) fn for_endpoint(
        endpoint: &str,
        trusted_ca: Option<&[u8]>,
    ) -> Result<Option<Self>, AccountError> {
        let proxied = PROXY_VARIABLES
            .iter()
            .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
        if proxied {
            return Ok(None);
        }
        Self::new(endpoint, trusted_ca).map(Some)
    }

    fn new(endpoint: &str, trusted_ca: Option<&[u8]>) -> Result<Self, AccountError> {
        let malformed = |what: &str| AccountError::Malformed(what.to_owned());
        let url = reqwest::Url::parse(endpoint)
            .map_err(|_| malformed("the table endpoint is not a URL"))?;
        let host = url
            .host_str()
            .ok_or_else(|| malformed("the table endpoint names no host"))?;
        let port = url
            .port_or_known_default()
            .ok_or_else(|| malformed("the table endpoint has no port"))?;
        let tls = match url.scheme() {
            "http" => None,
            "https" => {
                // An IPv6 host comes bracketed; rustls reads a bare IP address as one.
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                let name = ServerName::try_from(bare.to_owned())
                    .map_err(|_| malformed("the table endpoint's host is not a DNS name"))?;
                Some((tls_connector(trusted_ca).map_err(AccountError::Ca)?, name))
            }
            _ => {
                return Err(malformed(
                    "the table endpoint's scheme is not http or https",
                ))
            }
        };
        let host_header = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        Ok(Self {
            authority: format!("{host}:{port}"),
            host: HeaderValue::from_str(&host_header)
                .map_err(|_| malformed("the table endpoint's host is not a header value"))?,
            tls,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Sends `request` (an origin-form URI, no `Host`: this adds it) and reads the whole
    /// response, of at most `max_body` bytes. With [`Resend::IfUnanswered`], a kept
    /// connection that closes before a whole response head arrives sends the request once
    /// more, on a new connection, as `again` builds it: a request is built once, not copied
    /// on every send for a resend that rarely comes.
    pub(super) async fn send(
        &self,
        request: hyper::Request<Bytes>,
        resend: Resend,
        again: Rebuild<'_>,
        max_body: usize,
    ) -> io::Result<Response> {
        let request = self.prepare(request);
        let request = match self.checkout() {
            None => request,
            Some(conn) => {
                match self.exchange(conn, request, max_body).await {
                    Ok(response) => return Ok(response),
                    // The server closed the kept connection as it was taken, before a byte
                    // of a response: the request goes again, once, on a new connection,
                    // rather than back to the caller as a failure to wait out.
                    Err(failed) if failed.unanswered && resend == Resend::IfUnanswered => {}
                    Err(failed) => return Err(failed.error),
                }
                let request = again().ok_or_else(|| {
                    io::Error::other("the request to send again could not be built")
                })?;
                self.prepare(request)
            }
        };
        let conn = self.connect().await?;
        self.exchange(conn, request, max_body)
            .await
            .map_err(|failed| failed.error)
    }

    /// `request` with this origin's `Host`, the user agent and its length.
    fn prepare(&self, request: hyper::Request<Bytes>) -> hyper::Request<Full<Bytes>> {
        let (mut parts, body) = request.into_parts();
        parts.headers.insert(HOST, self.host.clone());
        parts
            .headers
            .insert(USER_AGENT_HEADER, HeaderValue::from_static(USER_AGENT));
        parts
            .headers
            .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        hyper::Request::from_parts(parts, Full::new(body))
    }

    /// One request and its response on `conn`, driven on this task; the connection goes back
    /// to the pool once its whole response is read and it waits for no more of this exchange.
    async fn exchange(
        &self,
        mut conn: Conn,
        request: hyper::Request<Full<Bytes>>,
        max_body: usize,
    ) -> Result<Response, Failed> {
        let mut sent = std::pin::pin!(conn.sender.send_request(request));
        let head = drive(&mut conn.driver, sent.as_mut()).await;
        let response = match head {
            Some(Ok(response)) => response,
            Some(Err(e)) => {
                return Err(Failed {
                    // Canceled: never written; incomplete: closed before a response.
                    unanswered: e.is_canceled() || e.is_incomplete_message(),
                    error: hyper_error(&e),
                });
            }
            None => {
                return Err(Failed::closed(
                    true,
                    "the connection closed before a response",
                ))
            }
        };
        let (parts, body) = response.into_parts();
        let invalid = |why: String| Failed {
            unanswered: false,
            error: io::Error::new(io::ErrorKind::InvalidData, why),
        };
        // A length past the bound is refused before a byte of it is awaited.
        if hyper::body::Body::size_hint(&body).lower() > max_body as u64 {
            return Err(invalid(format!("a response body over {max_body} bytes")));
        }
        // Most writes are answered without a body (204): nothing to wait for.
        let body = if hyper::body::Body::is_end_stream(&body) {
            Bytes::new()
        } else {
            let mut collected = std::pin::pin!(Limited::new(body, max_body).collect());
            match drive(&mut conn.driver, collected.as_mut()).await {
                Some(Ok(body)) => body.to_bytes(),
                Some(Err(e)) => return Err(invalid(e.to_string())),
                None => {
                    return Err(Failed::closed(
                        false,
                        "the connection closed inside a response",
                    ))
                }
            }
        };
        let status = parts.status.as_u16();
        if status < 200 {
            // hyper hands over only final answers but 101, which ends HTTP on the connection.
            return Err(invalid(format!(
                "an interim status {status} as the response"
            )));
        }
        // Framed both by length and by chunks (read by its chunks): a sign of a response
        // split or smuggled, after which the connection is not trusted (RFC 9112 6.3).
        let framed_twice = parts.headers.contains_key(hyper::header::TRANSFER_ENCODING)
            && parts.headers.contains_key(CONTENT_LENGTH);
        // `is_ready` polls nothing: it is false for a connection that closed or that still
        // owes this exchange. Whether the server kept it open since is asked at checkout.
        if !framed_twice && conn.sender.is_ready() {
            self.checkin(conn);
        }
        Ok(Response {
            status,
            headers: parts.headers,
            body,
        })
    }

    /// The newest idle connection still young and still open, if any.
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some((mut conn, since)) = idle.pop() {
            if since.elapsed() < IDLE && conn.reusable() {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        // Checked in at the end and taken from the end: the oldest, the ones past IDLE
        // included, are at the start.
        let now = Instant::now();
        let stale = idle
            .iter()
            .take_while(|(_, since)| now.duration_since(*since) >= IDLE)
            .count();
        idle.drain(..stale);
        if idle.len() < MAX_IDLE {
            idle.push((conn, now));
        }
    }

    async fn connect(&self) -> io::Result<Conn> {
        let tcp = TcpStream::connect(&self.authority).await?;
        tcp.set_nodelay(true)?;
        let stream = match &self.tls {
            None => Stream::Plain(tcp),
            Some((connector, name)) => {
                Stream::Tls(Box::new(connector.connect(name.clone(), tcp).await?))
            }
        };
        let (sender, driver) = http1::Builder::new()
            .max_buf_size(MAX_HEAD)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| hyper_error(&e))?;
        Ok(Conn {
            sender,
            driver: Box::pin(driver),
        })
    }
}

impl Conn {
    /// Whether the connection can carry another request now: its driver, polled once here,
    /// has read whatever the server did while the connection was idle (a close, stray bytes:
    /// either ends it) and not ended, and hyper is ready to send.
    fn reusable(&mut self) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        if self.driver.as_mut().poll(&mut cx).is_ready() {
            return false;
        }
        matches!(self.sender.poll_ready(&mut cx), Poll::Ready(Ok(())))
    }
}

/// Polls the connection's `driver` and `work` together on this task until `work` is done;
/// `None` if the connection ended first. The driver goes first: what it reads completes the
/// work in the same poll, not in one more trip through the scheduler.
///
/// Only the driver moves `work` on (it hands over the response, its body, or the end), and it
/// is polled just before, on this task, with this task's waker for what it waits on. So `work`
/// is polled without that waker: the driver completing it would otherwise wake this task
/// while it runs, which tokio answers by rescheduling it and waking another worker thread, a
/// futex call and a context switch per request.
async fn drive<T>(
    driver: &mut Pin<Box<Driver>>,
    mut work: Pin<&mut impl Future<Output = T>>,
) -> Option<T> {
    let mut ended = false;
    poll_fn(|cx| {
        if !ended && driver.as_mut().poll(cx).is_ready() {
            ended = true;
        }
        let mut quiet = Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(done) = work.as_mut().poll(&mut quiet) {
            return Poll::Ready(Some(done));
        }
        if ended {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// hyper's error as I/O: a malformed or oversized response is invalid data; a connection
/// closed early an unexpected end; the rest as it came.
fn hyper_error(e: &hyper::Error) -> io::Error {
    let kind = if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() {
        io::ErrorKind::InvalidData
    } else if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        io::ErrorKind::UnexpectedEof
    } else {
        io::ErrorKind::Other
    };
    // The error's sources carry the detail; no URL is in any of them.
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    io::Error::new(kind, text)
}

/// The pooled client's trust: the web roots, plus `trusted_ca`.
fn tls_connector(trusted_ca: Option<&[u8]>) -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = trusted_ca {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|_| "holds no readable PEM certificate".to_owned())?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err("holds no PEM certificate".to_owned());
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot configure TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// A plain or a TLS connection.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    // Vectored: hyper then writes a request's head and body as they are, where it would
    // otherwise copy the body behind the head (a transaction's is 40 KiB).
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// What the test server does after reading a request.
    #[derive(Clone)]
    enum Then {
        /// Writes this answer and keeps the connection.
        Answer(&'static [u8]),
        /// Writes this answer and closes the connection.
        AnswerAndClose(&'static [u8]),
        /// Answers this after a while.
        Late(&'static [u8]),
        /// Writes this head, then this line again and again until the client leaves.
        Flood(&'static [u8], &'static [u8]),
        /// Closes the connection without an answer.
        Close,
    }

    struct Server {
        origin: String,
        connections: Arc<AtomicUsize>,
        requests: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    /// A server on a free loopback port that answers requests, in any connection, from `script`
    /// in order.
    async fn server(script: Vec<Then>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let (counted, seen) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                let (script, seen) = (script.clone(), seen.clone());
                tokio::spawn(async move {
                    while let Some(request) = read_request(&mut socket).await {
                        seen.lock().unwrap().push(request);
                        let next = script.lock().unwrap().pop_front();
                        match next {
                            Some(Then::Answer(bytes)) => socket.write_all(bytes).await.unwrap(),
                            Some(Then::AnswerAndClose(bytes)) => {
                                socket.write_all(bytes).await.unwrap();
                                return;
                            }
                            Some(Then::Late(bytes)) => {
                                tokio::time::sleep(Duration::from_millis(300)).await;
                                // The client may be gone, and the connection with it.
                                let _ = socket.write_all(bytes).await;
                            }
                            Some(Then::Close) => return,
                            Some(Then::Flood(head, line)) => {
                                socket.write_all(head).await.unwrap();
                                while socket.write_all(line).await.is_ok() {}
                                return;
                            }
                            None => tokio::time::sleep(Duration::from_secs(3600)).await,
                        }
                    }
                });
            }
        });
        Server {
            origin,
            connections,
            requests,
        }
    }

    /// One whole request (head and Content-Length body); `None` at the end of the stream.
    async fn read_request(socket: &mut TcpStream) -> Option<Vec<u8>> {
        let mut buf = Vec::new();
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&buf[..end])
                    .unwrap()
                    .to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.parse().unwrap());
                if buf.len() >= end + 4 + length {
                    return Some(buf);
                }
            }
            let mut chunk = [0u8; 4096];
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn request(body: &'static [u8]) -> hyper::Request<Bytes> {
        let mut request = hyper::Request::new(Bytes::from_static(body));
        *request.method_mut() = hyper::Method::PUT;
        *request.uri_mut() = hyper::Uri::from_static("/acct/t(PartitionKey='p')?sv=1");
        request
            .headers_mut()
            .insert("x-ms-version", HeaderValue::from_static("2022-11-02"));
        request
    }

    /// Past the proxy check: the tests hold whatever the environment says.
    fn client(origin: &str) -> Pool {
        Pool::new(origin, None).unwrap()
    }

    /// `send`, bounded: a regression fails the test instead of hanging it.
    async fn send(pool: &Pool, body: &'static [u8], resend: Resend) -> io::Result<Response> {
        tokio::time::timeout(
            Duration::from_secs(10),
            pool.send(
                request(body),
                resend,
                &|| Some(request(body)),
                MAX_WRITE_RESPONSE,
            ),
        )
        .await
        .expect("answered or failed within 10 s")
    }

    #[tokio::test]
    async fn a_request_is_one_head_and_its_body() {
        let server = server(vec![Then::Answer(b"HTTP/1.1 204 No Content\r\n\r\n")]).await;
        let pool = client(&server.origin);
        let response = send(&pool, b"{}", Resend::Never).await.unwrap();
        assert_eq!((response.status, response.body.len()), (204, 0));
        let host = server.origin.trim_start_matches("http://");
        let seen = String::from_utf8(server.requests.lock().unwrap()[0].clone()).unwrap();
        let (head, body) = seen.split_once("\r\n\r\n").unwrap();
        let mut lines: Vec<&str> = head.lines().collect();
        assert_eq!(
            lines.remove(0),
            "PUT /acct/t(PartitionKey='p')?sv=1 HTTP/1.1"
        );
        lines.sort_unstable();
        let user_agent = format!("user-agent: {USER_AGENT}");
        let host = format!("host: {host}");
        let mut expected = vec![
            "content-length: 2",
            &host,
            &user_agent,
            "x-ms-version: 2022-11-02",
        ];
        expected.sort_unstable();
        assert_eq!(lines, expected);
        assert_eq!(body, "{}");
    }

    #[tokio::test]
    async fn answers_without_a_body_leave_their_connection_to_the_next_request() {
        let no_content = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n";
        let server = server(vec![Then::Answer(no_content); 3]).await;
        let pool = client(&server.origin);
        for _ in 0..3 {
            let response = send(&pool, b"x", Resend::Never).await.unwrap();
            assert_eq!(response.status, 204);
        }
        assert_eq!(server.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_redirect_is_the_answer_on_both_paths() {
        let moved = b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n";
        let server = server(vec![
            Then::Answer(moved),
            Then::Answer(moved),
            // What a redirect followed would find: a page that reads as the write's success.
            Then::Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        ])
        .await;
        let direct = send(&client(&server.origin), b"x", Resend::Never).await;
        assert_eq!(direct.unwrap().status, 302);
        let pooled = super::super::http::client(None).unwrap();
        let url = format!("{}/acct/t", server.origin);
        let answer = pooled.put(url).body("x").send().await.unwrap();
        assert_eq!(answer.status().as_u16(), 302);
        assert_eq!(server.requests.lock().unwrap().len(), 2, "nothing followed");
    }

    #[tokio::test]
    async fn answers_by_length_by_chunks_and_to_the_close_are_read_whole() {
        let server = server(vec![
            Then::Answer(
                b"HTTP/1.1 400 Bad Request\r\nx-ms-error-code: InvalidInput\r\nContent-Length: 5\r\n\r\nhello",
            ),
            Then::Answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n"),
            Then::AnswerAndClose(b"HTTP/1.1 200 OK\r\n\r\nuntil the end"),
            Then::Answer(b"HTTP/1.1 204 No Content\r\nx-ms-error-code: \r\n\r\n"),
        ])
        .await;
        let pool = client(&server.origin);
        let mut responses = Vec::new();
        for _ in 0..4 {
            responses.push(send(&pool, b"x", Resend::Never).await.unwrap());
        }
        let seen: Vec<_> = responses
            .iter()
            .map(|r| (r.status, r.code(), &r.body[..]))
            .collect();
        assert_eq!(
            seen,
            [
                (400, Some("InvalidInput"), &b"hello"[..]),
                (202, None, b"abcde"),
                (200, None, b"until the end"),
                (204, None, b""),
            ]
        );
        // The first three shared a connection; the server closed it after the third.
        assert_eq!(server.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_request_cut_short_takes_its_connection_with_it() {
        let server = server(vec![
            Then::Late(b"HTTP/1.1 500 Late\r\nContent-Length: 0\r\n\r\n"),
            Then::Answer(b"HTTP/1.1 204 No Content\r\n\r\n"),
        ])
        .await;
        let pool = client(&server.origin);
        let cut = tokio::time::timeout(
            Duration::from_millis(100),
            pool.send(
                request(b"first"),
                Resend::IfUnanswered,
                &|| Some(request(b"first")),
                MAX_WRITE_RESPONSE,
            ),
        )
        .await;
        assert!(cut.is_err(), "the slow request timed out");
        // Past the late answer's arrival: it must never be read as the second request's.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let response = send(&pool, b"second", Resend::Never).await.unwrap();
        assert_eq!(response.status, 204);
        assert_eq!(server.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_while_idle_is_not_reused() {
        let server = server(vec![
            // Keep-alive by its headers, then closed: as a server whose idle timeout passed.
            Then::AnswerAndClose(b"HTTP/1.1 204 No Content\r\n\r\n"),
            Then::Answer(b"HTTP/1.1 204 No Content\r\n\r\n"),
        ])
        .await;
        let pool = client(&server.origin);
        send(&pool, b"one", Resend::Never).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let response = send(&pool, b"two", Resend::Never).await.unwrap();
        assert_eq!(response.status, 204);
        assert_eq!(server.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_kept_connection_closed_unanswered_is_retried_once_on_a_new_one() {
        let no_content = b"HTTP/1.1 204 No Content\r\n\r\n";
        let server = server(vec![
            Then::Answer(no_content),
            // Closed as the second request arrives on the kept connection: sent again.
            Then::Close,
            Then::Answer(no_content),
            // Closed on a new connection: that is the caller's to retry.
            Then::Close,
        ])
        .await;
        let pool = client(&server.origin);
        for _ in 0..2 {
            let response = send(&pool, b"x", Resend::IfUnanswered).await.unwrap();
            assert_eq!(response.status, 204);
        }
        assert_eq!(server.requests.lock().unwrap().len(), 3);
        assert_eq!(server.connections.load(Ordering::SeqCst), 2);
        let fresh = client(&server.origin);
        let error = send(&fresh, b"x", Resend::IfUnanswered).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(server.requests.lock().unwrap().len(), 4, "not sent again");
    }

    #[tokio::test]
    async fn a_request_that_must_not_repeat_is_never_sent_again() {
        let server = server(vec![
            Then::Answer(b"HTTP/1.1 204 No Content\r\n\r\n"),
            // Closed as the second request arrives on the kept connection.
            Then::Close,
            Then::Answer(b"HTTP/1.1 204 No Content\r\n\r\n"),
        ])
        .await;
        let pool = client(&server.origin);
        send(&pool, b"x", Resend::Never).await.unwrap();
        let error = send(&pool, b"x", Resend::Never).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(server.requests.lock().unwrap().len(), 2, "not sent again");
    }

    #[tokio::test]
    async fn bytes_past_an_answer_retire_its_connection() {
        let server = server(vec![
            Then::Answer(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 500 Stale\r\n\r\n",
            ),
            Then::Answer(
                b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nextra",
            ),
            Then::Answer(b"HTTP/1.1 204 No Content\r\n\r\n"),
        ])
        .await;
        let pool = client(&server.origin);
        let mut statuses = Vec::new();
        for _ in 0..3 {
            statuses.push(send(&pool, b"x", Resend::Never).await.unwrap().status);
        }
        assert_eq!(
            statuses,
            [200, 202, 204],
            "no answer read from another's leftovers"
        );
        assert_eq!(server.connections.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_answer_framed_two_ways_retires_its_connection() {
        let server = server(vec![
            Then::Answer(b"HTTP/1.1 202 Accepted\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
            Then::Answer(b"HTTP/1.1 204 No Content\r\n\r\n"),
        ])
        .await;
        let pool = client(&server.origin);
        let first = send(&pool, b"x", Resend::Never).await.unwrap();
        assert_eq!((first.status, &first.body[..]), (202, &b"ok"[..]));
        assert_eq!(send(&pool, b"x", Resend::Never).await.unwrap().status, 204);
        assert_eq!(server.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn hostile_answers_are_errors_not_memory() {
        let hostile: [Then; 9] = [
            Then::Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n"),
            Then::Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
            Then::Answer(b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nab"),
            Then::Answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            Then::Answer(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+1\r\na\r\n0\r\n\r\n",
            ),
            Then::Answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n"),
            Then::Answer(b"HTTP/1.1 000 Fine\r\nContent-Length: 0\r\n\r\n"),
            Then::Answer(b"SMTP ready\r\n\r\n"),
            // Endless trailers: bounded by the answer's size, not only per line.
            Then::Flood(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
                b"X-Trailer: 0123456789abcdef0123456789abcdef\r\n",
            ),
        ];
        let hostile_count = hostile.len();
        let server = server(hostile.into()).await;
        let pool = client(&server.origin);
        for case in 0..hostile_count {
            let error = send(&pool, b"x", Resend::Never).await.expect_err("refused");
            assert_eq!(
                error.kind(),
                io::ErrorKind::InvalidData,
                "case {case}: {error}"
            );
        }
    }

    #[tokio::test]
    async fn a_chunk_declared_past_the_bound_holds_no_memory_until_the_timeout() {
        // hyper reads a chunk's size without judging it, and then waits for its bytes: nothing
        // is allocated for them, and the caller's timeout (every storage call has one) ends
        // the wait and the connection with it.
        let server = server(vec![
            Then::Answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\nffffffffffffffff\r\n"),
            Then::Answer(b"HTTP/1.1 204 No Content\r\n\r\n"),
        ])
        .await;
        let pool = client(&server.origin);
        let cut = tokio::time::timeout(
            Duration::from_millis(300),
            pool.send(
                request(b"x"),
                Resend::IfUnanswered,
                &|| Some(request(b"x")),
                MAX_WRITE_RESPONSE,
            ),
        )
        .await;
        assert!(cut.is_err(), "still waiting for the chunk");
        assert_eq!(send(&pool, b"x", Resend::Never).await.unwrap().status, 204);
        assert_eq!(server.connections.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn endpoints_are_checked_and_https_gets_tls() {
        let https = Pool::new("https://acme.table.core.windows.net", None).unwrap();
        assert_eq!(
            (
                https.authority.as_str(),
                https.host.to_str().unwrap(),
                https.tls.is_some()
            ),
            (
                "acme.table.core.windows.net:443",
                "acme.table.core.windows.net",
                true
            )
        );
        let local = Pool::new("http://[::1]:10002/devstoreaccount1", None).unwrap();
        assert_eq!(local.authority, "[::1]:10002");
        assert!(Pool::new("ftp://acme", None).is_err());
        assert!(matches!(
            Pool::new("https://acme", Some(b"not a certificate")),
            Err(AccountError::Ca(_))
        ));
    }
}
