//! HTTP/1.1 for the two hot table writes (`wire.rs`): a request written in one buffer on a
//! kept-alive connection, its answer read on the same task.
//!
//! Through the pooled client an upsert also passed a URL parse, a redirect and a timeout
//! layer, a pool checkout, and a hand-off to the connection's own task and back (a wake-up
//! each way): at the seed load, one request per reading, that was most of the processor's CPU
//! outside the kernel. Here the request future owns its connection from checkout to the end of
//! the answer, so a request cut short (a timeout) takes its connection with it and no later
//! request can read a stale answer. Only whole answers return a connection to the pool.
//!
//! Everything else stays with the pooled client: the SDK's requests, and these writes too
//! when a proxy is configured (the pooled client honours `HTTPS_PROXY` and the like; this one
//! does not).

use super::account::AccountError;
use super::http::{IDLE, USER_AGENT};
use bytes::Bytes;
use futures::FutureExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Most idle connections kept: above the writes a processor has in flight by default (128),
/// so that a round's burst of writes finds its connections again in the next round.
const MAX_IDLE: usize = 256;
/// Largest answer head: the table service's are under 2 KiB.
const MAX_HEAD: usize = 64 * 1024;
/// Largest answer body: a 100-operation transaction's is about 40 KiB; past this the peer is
/// not the table service, and reading on would only hold memory (up to twice this per write
/// in flight while it is read).
const MAX_BODY: usize = 1024 * 1024;
/// What one read asks for at least.
const READ_CHUNK: usize = 8 * 1024;
/// A body at most this long is copied behind the head, so a request is one write.
const COPY_BODY: usize = 16 * 1024;
/// The variables through which the pooled client finds a proxy.
const PROXY_VARIABLES: [&str; 6] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// One origin's connections.
pub(super) struct H1 {
    /// `host:port`, where to connect.
    authority: String,
    /// The `Host` header.
    host: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    idle: Mutex<Vec<(Conn, Instant)>>,
}

impl std::fmt::Debug for H1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1")
            .field("authority", &self.authority)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// What the service answered (on either path of `wire.rs`).
#[derive(Debug)]
pub(super) struct Reply {
    pub status: u16,
    /// `x-ms-error-code`, when present and not empty.
    pub code: Option<String>,
    pub body: Bytes,
}

impl H1 {
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
        Ok(Self {
            authority: format!("{host}:{port}"),
            host: match url.port() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_owned(),
            },
            tls,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Sends `request` (its buffered body) and reads the whole answer.
    pub(super) async fn send(&self, request: &reqwest::Request) -> io::Result<Reply> {
        let (out, rest) = self.encode(request)?;
        if let Some(conn) = self.checkout() {
            match self.exchange(conn, &out, rest).await {
                // The server closed the kept connection as it was taken (after the probe),
                // before a byte of an answer: the request goes again, once, on a new
                // connection, rather than back to the caller as a failure to wait out. The
                // writes sent here (upserts, merges, their transactions) are idempotent.
                Err((e, false)) if closed(&e) => {}
                other => return other.map_err(|(e, _)| e),
            }
        }
        let conn = self.connect().await?;
        self.exchange(conn, &out, rest).await.map_err(|(e, _)| e)
    }

    /// One request and its answer on `conn`, which goes back to the pool if it may carry
    /// another. A failure says whether any byte of an answer had arrived.
    async fn exchange(
        &self,
        mut conn: Conn,
        out: &[u8],
        rest: &[u8],
    ) -> Result<Reply, (io::Error, bool)> {
        let sent = async {
            conn.stream.write_all(out).await?;
            if !rest.is_empty() {
                conn.stream.write_all(rest).await?;
            }
            conn.stream.flush().await
        };
        sent.await.map_err(|e| (e, false))?;
        match conn.read_reply().await {
            Ok((reply, reusable)) => {
                if reusable {
                    self.checkin(conn);
                }
                Ok(reply)
            }
            Err(e) => Err((e, conn.heard)),
        }
    }

    /// What [`H1::send`] writes for `request`: its head with the body behind it when the
    /// body is short, and the rest of the body (empty, or the whole of a long one).
    pub(super) fn encode<'r>(
        &self,
        request: &'r reqwest::Request,
    ) -> io::Result<(Vec<u8>, &'r [u8])> {
        let body = match request.body() {
            None => &[][..],
            Some(body) => body
                .as_bytes()
                .ok_or_else(|| io::Error::other("a streamed body cannot be sent here"))?,
        };
        let mut out = Vec::with_capacity(1024 + body.len().min(COPY_BODY));
        self.head(&mut out, request, body.len());
        if body.len() <= COPY_BODY {
            out.extend_from_slice(body);
            Ok((out, &[]))
        } else {
            Ok((out, body))
        }
    }

    fn head(&self, out: &mut Vec<u8>, request: &reqwest::Request, body_len: usize) {
        let url = request.url();
        out.extend_from_slice(request.method().as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(url.path().as_bytes());
        if let Some(query) = url.query() {
            out.push(b'?');
            out.extend_from_slice(query.as_bytes());
        }
        out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        out.extend_from_slice(self.host.as_bytes());
        out.extend_from_slice(b"\r\nUser-Agent: ");
        out.extend_from_slice(USER_AGENT.as_bytes());
        for (name, value) in request.headers() {
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
        }
        out.extend_from_slice(b"\r\nContent-Length: ");
        out.extend_from_slice(body_len.to_string().as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
    }

    /// The newest idle connection still young and still open, if any.
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some((mut conn, since)) = idle.pop() {
            if since.elapsed() < IDLE && conn.still_open() {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, mut conn: Conn) {
        // An idle connection keeps a small buffer, whatever its last answer needed.
        conn.buf.shrink_to(READ_CHUNK);
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|(_, since)| since.elapsed() < IDLE);
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
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
        Ok(Conn {
            stream,
            buf: Vec::new(),
            heard: false,
        })
    }
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

/// A connection and what was read from it and not yet used.
struct Conn {
    stream: Stream,
    buf: Vec<u8>,
    /// Some byte of the current answer has arrived.
    heard: bool,
}

/// How an answer's body is delimited.
enum Framing {
    None,
    Length(usize),
    Chunked,
    /// Until the server closes the connection.
    Close,
}

impl Conn {
    /// Whether the server has not closed (or written to) the connection while it was idle:
    /// one read that must find nothing to return yet. Through the stream, not its socket, so
    /// that bytes TLS decrypted and holds, or its close, count too.
    fn still_open(&mut self) -> bool {
        let mut probe = [0u8; 1];
        self.stream.read(&mut probe).now_or_never().is_none()
    }

    /// Reads more into `buf`; an error at the end of the stream.
    async fn fill(&mut self) -> io::Result<()> {
        // Every answer, head and framing included, is bounded here, whatever its shape.
        if self.buf.len() > MAX_HEAD + MAX_BODY {
            return Err(invalid("the answer is too long"));
        }
        self.buf.reserve(READ_CHUNK);
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed before the answer ended",
            ));
        }
        self.heard = true;
        Ok(())
    }

    /// The answer, and whether the connection may carry another request.
    async fn read_reply(&mut self) -> io::Result<(Reply, bool)> {
        self.buf.clear();
        self.heard = false;
        let (status, code, framing, close, head_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let status = response.code.unwrap_or_default();
                    if status < 100 {
                        // Not a status HTTP knows: never read as a success.
                        return Err(invalid("the answer's status is below 100"));
                    }
                    if status == 101 {
                        // Never asked for: what follows would not be HTTP.
                        return Err(invalid("the answer switches protocols"));
                    }
                    if (100..200).contains(&status) {
                        // An interim answer (100 Continue): the real one follows.
                        self.buf.drain(..len);
                        continue;
                    }
                    let (framing, close, code) = read_headers(&response, status)?;
                    break (status, code, framing, close, len);
                }
                Ok(httparse::Status::Partial) if self.buf.len() < MAX_HEAD => self.fill().await?,
                Ok(httparse::Status::Partial) => {
                    return Err(invalid("the answer's head is too long"))
                }
                Err(e) => return Err(invalid(&format!("the answer is not HTTP/1.1: {e}"))),
            }
        };
        self.buf.drain(..head_len);
        let (body, reusable) = match framing {
            Framing::None => (Bytes::new(), self.buf.is_empty()),
            Framing::Length(len) if len > MAX_BODY => {
                return Err(invalid("the answer's body is too long"))
            }
            Framing::Length(len) => {
                while self.buf.len() < len {
                    self.fill().await?;
                }
                let reusable = self.buf.len() == len;
                (Bytes::copy_from_slice(&self.buf[..len]), reusable)
            }
            Framing::Chunked => self.read_chunked().await?,
            Framing::Close => {
                loop {
                    if self.buf.len() > MAX_BODY {
                        return Err(invalid("the answer's body is too long"));
                    }
                    self.buf.reserve(READ_CHUNK);
                    if self.stream.read_buf(&mut self.buf).await? == 0 {
                        break;
                    }
                }
                (Bytes::copy_from_slice(&self.buf), false)
            }
        };
        Ok((Reply { status, code, body }, reusable && !close))
    }

    /// A chunked body, from the start of `buf`, and whether nothing followed it.
    async fn read_chunked(&mut self) -> io::Result<(Bytes, bool)> {
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            let line_end = self.line_from(at).await?;
            let line = std::str::from_utf8(&self.buf[at..line_end])
                .map_err(|_| invalid("a chunk size is not text"))?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size =
                digits(size, 16).ok_or_else(|| invalid("a chunk size is not hexadecimal"))?;
            at = line_end + 2;
            if size == 0 {
                // Trailers, up to an empty line.
                loop {
                    let end = self.line_from(at).await?;
                    let empty = end == at;
                    at = end + 2;
                    if empty {
                        break;
                    }
                }
                return Ok((Bytes::from(body), self.buf.len() == at));
            }
            if size > MAX_BODY - body.len() {
                return Err(invalid("the answer's body is too long"));
            }
            while self.buf.len() < at + size + 2 {
                self.fill().await?;
            }
            body.extend_from_slice(&self.buf[at..at + size]);
            if &self.buf[at + size..at + size + 2] != b"\r\n" {
                return Err(invalid("a chunk does not end in CRLF"));
            }
            at += size + 2;
        }
    }

    /// Where the line starting at `at` ends (its CR), reading on until it does.
    async fn line_from(&mut self, at: usize) -> io::Result<usize> {
        loop {
            if let Some(i) = self.buf[at.min(self.buf.len())..]
                .windows(2)
                .position(|w| w == b"\r\n")
            {
                return Ok(at + i);
            }
            if self.buf.len().saturating_sub(at) > MAX_HEAD {
                return Err(invalid("a chunk line is too long"));
            }
            self.fill().await?;
        }
    }
}

/// The body's framing, whether the server closes the connection after it, and the error code.
fn read_headers(
    response: &httparse::Response<'_, '_>,
    status: u16,
) -> io::Result<(Framing, bool, Option<String>)> {
    let mut length = None;
    let mut chunked = false;
    let mut encoded = false;
    let mut close = response.version != Some(1);
    let mut code = None;
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or_default().trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            let parsed =
                digits(value, 10).ok_or_else(|| invalid("the Content-Length is not a number"))?;
            if length.is_some_and(|l| l != parsed) {
                return Err(invalid("two different Content-Lengths"));
            }
            length = Some(parsed);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            // Only a last coding of chunked delimits the body; any other runs to the close.
            encoded = true;
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if header.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',') {
                let token = token.trim();
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && response.version == Some(0) {
                    close = false;
                }
            }
        } else if header.name.eq_ignore_ascii_case("x-ms-error-code") && !value.is_empty() {
            code = Some(value.to_owned());
        }
    }
    let framing = if status == 204 || status == 304 {
        Framing::None
    } else if chunked {
        // Both framings named is how a request gets smuggled: use this answer, not the
        // connection after it (RFC 9112, 6.3).
        close |= length.is_some();
        Framing::Chunked
    } else if let (false, Some(length)) = (encoded, length) {
        Framing::Length(length)
    } else {
        close = true;
        Framing::Close
    };
    Ok((framing, close, code))
}

/// `text` as a number in `radix`, of digits alone (`from_str_radix` also takes a sign).
fn digits(text: &str, radix: u32) -> Option<usize> {
    text.chars()
        .all(|c| c.is_digit(radix))
        .then(|| usize::from_str_radix(text, radix).ok())
        .flatten()
}

/// Whether `e` is the peer closing or resetting the connection.
fn closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
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
    use tokio::net::TcpListener;

    /// What the test server does after reading a request.
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

    fn request(origin: &str, body: &'static [u8]) -> reqwest::Request {
        let url = reqwest::Url::parse(&format!("{origin}/acct/t(PartitionKey='p')?sv=1")).unwrap();
        let mut request = reqwest::Request::new(reqwest::Method::PUT, url);
        request.headers_mut().insert(
            "x-ms-version",
            reqwest::header::HeaderValue::from_static("2022-11-02"),
        );
        *request.body_mut() = Some(Bytes::from_static(body).into());
        request
    }

    /// Past the proxy check: the tests hold whatever the environment says.
    fn client(origin: &str) -> H1 {
        H1::new(origin, None).unwrap()
    }

    /// `send`, bounded: a regression fails the test instead of hanging it.
    async fn send(h1: &H1, origin: &str, body: &'static [u8]) -> io::Result<Reply> {
        tokio::time::timeout(Duration::from_secs(10), h1.send(&request(origin, body)))
            .await
            .expect("answered or failed within 10 s")
    }

    #[tokio::test]
    async fn a_request_is_one_head_and_its_body() {
        let server = server(vec![Then::Answer(b"HTTP/1.1 204 No Content\r\n\r\n")]).await;
        let h1 = client(&server.origin);
        let reply = h1.send(&request(&server.origin, b"{}")).await.unwrap();
        assert_eq!((reply.status, reply.body.len()), (204, 0));
        let host = server.origin.trim_start_matches("http://");
        let expected = format!(
            "PUT /acct/t(PartitionKey='p')?sv=1 HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\nx-ms-version: 2022-11-02\r\nContent-Length: 2\r\n\r\n{{}}"
        );
        assert_eq!(server.requests.lock().unwrap()[0], expected.as_bytes());
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
        let direct = send(&client(&server.origin), &server.origin, b"x").await;
        assert_eq!(direct.unwrap().status, 302);
        let pooled = super::super::http::client(None).unwrap();
        let answer = pooled.execute(request(&server.origin, b"x")).await.unwrap();
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
        let h1 = client(&server.origin);
        let mut replies = Vec::new();
        for _ in 0..4 {
            replies.push(h1.send(&request(&server.origin, b"x")).await.unwrap());
        }
        let seen: Vec<_> = replies
            .iter()
            .map(|r| (r.status, r.code.as_deref(), &r.body[..]))
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
        let h1 = client(&server.origin);
        let cut = tokio::time::timeout(
            Duration::from_millis(100),
            h1.send(&request(&server.origin, b"first")),
        )
        .await;
        assert!(cut.is_err(), "the slow request timed out");
        // Past the late answer's arrival: it must never be read as the second request's.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let reply = send(&h1, &server.origin, b"second").await.unwrap();
        assert_eq!(reply.status, 204);
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
        let h1 = client(&server.origin);
        h1.send(&request(&server.origin, b"one")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let reply = h1.send(&request(&server.origin, b"two")).await.unwrap();
        assert_eq!(reply.status, 204);
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
        let h1 = client(&server.origin);
        for _ in 0..2 {
            let reply = send(&h1, &server.origin, b"x").await.unwrap();
            assert_eq!(reply.status, 204);
        }
        assert_eq!(server.requests.lock().unwrap().len(), 3);
        assert_eq!(server.connections.load(Ordering::SeqCst), 2);
        let fresh = client(&server.origin);
        let error = send(&fresh, &server.origin, b"x").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(server.requests.lock().unwrap().len(), 4, "not sent again");
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
        let h1 = client(&server.origin);
        let mut statuses = Vec::new();
        for _ in 0..3 {
            statuses.push(
                h1.send(&request(&server.origin, b"x"))
                    .await
                    .unwrap()
                    .status,
            );
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
        let h1 = client(&server.origin);
        let first = send(&h1, &server.origin, b"x").await.unwrap();
        assert_eq!((first.status, &first.body[..]), (202, &b"ok"[..]));
        assert_eq!(send(&h1, &server.origin, b"x").await.unwrap().status, 204);
        assert_eq!(server.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn hostile_answers_are_errors_not_memory() {
        let hostile: [Then; 10] = [
            Then::Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n"),
            Then::Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
            Then::Answer(b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nab"),
            Then::Answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            Then::Answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\nffffffffffffffff\r\n"),
            Then::Answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+1\r\na\r\n0\r\n\r\n"),
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
        let h1 = client(&server.origin);
        for case in 0..hostile_count {
            let error = send(&h1, &server.origin, b"x").await.expect_err("refused");
            assert_eq!(
                error.kind(),
                io::ErrorKind::InvalidData,
                "case {case}: {error}"
            );
        }
    }

    #[test]
    fn endpoints_are_checked_and_https_gets_tls() {
        let https = H1::new("https://acme.table.core.windows.net", None).unwrap();
        assert_eq!(
            (
                https.authority.as_str(),
                https.host.as_str(),
                https.tls.is_some()
            ),
            (
                "acme.table.core.windows.net:443",
                "acme.table.core.windows.net",
                true
            )
        );
        let local = H1::new("http://[::1]:10002/devstoreaccount1", None).unwrap();
        assert_eq!(local.authority, "[::1]:10002");
        assert!(H1::new("ftp://acme", None).is_err());
        assert!(matches!(
            H1::new("https://acme", Some(b"not a certificate")),
            Err(AccountError::Ca(_))
        ));
    }
}
