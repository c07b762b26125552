//! A fault-injecting HTTP/1.1 proxy between the services and Azurite.
//!
//! Each storage endpoint (queue, table, blob) gets a proxy; services are given the proxies'
//! ports in their connection string (Shared Key signatures cover paths, not ports). Per
//! operation kind and at configurable rates, it can:
//! - answer `503 ServerBusy` or `500 InternalError` without forwarding;
//! - forward the request and drop the connection before the response: the storage acted,
//!   the client does not know (the case that proves idempotency);
//! - forward, then hold the response past the client's timeout, and drop it;
//! - forward, then hold the response for a while, and deliver it (slow storage);
//! - reset the connection without forwarding.
//!
//! Everything else passes through untouched, one upstream connection per client connection.
//! It understands exactly as much HTTP as the Azure SDK and Azurite speak: a head, then a body
//! by `Content-Length` or chunked encoding.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// How often each fault strikes a request, as probabilities (their sum at most 1).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub busy: f64,
    pub error: f64,
    pub drop_response: f64,
    pub delay: f64,
    pub reset: f64,
    /// Held for the proxy's hold, then delivered.
    pub slow: f64,
}

impl Rates {
    /// Every fault at `each`.
    pub fn all(each: f64) -> Self {
        Self {
            busy: each,
            error: each,
            drop_response: each,
            delay: each,
            reset: each,
            slow: 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Busy,
    Error,
    DropResponse,
    Delay,
    Reset,
    Slow,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Busy => "busy_503",
            Fault::Error => "error_500",
            Fault::DropResponse => "drop_response",
            Fault::Delay => "delay",
            Fault::Reset => "reset",
            Fault::Slow => "slow",
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Rates by operation kind; `None` for kinds not listed.
    rates: BTreeMap<&'static str, Rates>,
    /// Rates for every kind not in `rates`.
    default: Rates,
    /// Faults injected, by `kind/fault`.
    injected: BTreeMap<String, u64>,
    /// Requests whose body holds the text are refused with the status and error code.
    refusals: Vec<(String, u16, String)>,
    /// Requests forwarded.
    forwarded: u64,
}

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    pub port: u16,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream` on loopback. A held
    /// response (`delay`) is kept for `hold` before the connection is dropped: make it longer
    /// than the services' storage timeout.
    pub async fn start(upstream: u16, hold: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = serve(client, upstream, state, hold).await;
                });
            }
        });
        Self { port, state, task }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets the rates for every operation kind (and forgets per-kind ones).
    pub fn set_all(&self, rates: Rates) {
        let mut s = self.state();
        s.rates.clear();
        s.default = rates;
    }

    /// Sets the rates for one operation kind (`queue_get`, `queue_put`, `queue_delete`,
    /// `queue_update`, `table_batch`, `table_write`, `table_query`, `blob_write`, `blob_read`,
    /// `other`).
    pub fn set(&self, kind: &'static str, rates: Rates) {
        self.state().rates.insert(kind, rates);
    }

    /// No faults from now on (refusals included).
    pub fn clear(&self) {
        self.set_all(Rates::default());
        self.state().refusals.clear();
    }

    /// Refuses every request whose body contains `needle` with `status` and error `code`,
    /// without forwarding it (for example one entity's rows, by `"RowKey":"id"`).
    pub fn refuse_containing(&self, needle: &str, status: u16, code: &str) {
        self.state()
            .refusals
            .push((needle.to_owned(), status, code.to_owned()));
    }

    /// Faults injected so far, by `kind/fault`.
    pub fn injected(&self) -> BTreeMap<String, u64> {
        self.state().injected.clone()
    }

    /// Requests passed through so far.
    pub fn forwarded(&self) -> u64 {
        self.state().forwarded
    }
}

/// The operation a request is, from its method and path.
fn kind(method: &str, path: &str) -> &'static str {
    let path = path.split('?').next().unwrap_or(path);
    if path.contains("/messages") {
        return match method {
            "GET" => "queue_get",
            "POST" => "queue_put",
            "DELETE" => "queue_delete",
            "PUT" => "queue_update",
            _ => "other",
        };
    }
    if path.ends_with("$batch") {
        return "table_batch";
    }
    if path.contains("(PartitionKey=") || path.contains("(PartitionKey%3D") {
        return match method {
            "GET" => "table_query",
            _ => "table_write",
        };
    }
    match method {
        "GET" if path.matches('/').count() >= 3 => "blob_read",
        "PUT" if path.matches('/').count() >= 3 => "blob_write",
        "GET" if path.contains("()") => "table_query",
        _ => "other",
    }
}

fn pick(state: &Mutex<State>, kind: &'static str) -> Option<Fault> {
    let mut s = state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let rates = s.rates.get(kind).copied().unwrap_or(s.default);
    let roll = fastrand::f64();
    let mut edge = 0.0;
    let fault = [
        (Fault::Busy, rates.busy),
        (Fault::Error, rates.error),
        (Fault::DropResponse, rates.drop_response),
        (Fault::Delay, rates.delay),
        (Fault::Reset, rates.reset),
        (Fault::Slow, rates.slow),
    ]
    .into_iter()
    .find_map(|(fault, rate)| {
        edge += rate;
        (roll < edge).then_some(fault)
    });
    match fault {
        Some(f) => {
            *s.injected
                .entry(format!("{kind}/{}", f.name()))
                .or_default() += 1
        }
        None => s.forwarded += 1,
    }
    fault
}

/// One HTTP message: its head (up to and including the blank line) and body, as bytes.
struct Message {
    head: Vec<u8>,
    body: Vec<u8>,
}

impl Message {
    fn head_text(&self) -> String {
        String::from_utf8_lossy(&self.head).into_owned()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head_text().lines().skip(1).find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// Reads a head; `None` at a clean end of stream.
async fn read_head<R: AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let n = r.read_until(b'\n', &mut head).await?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        if head.ends_with(b"\r\n\r\n") || head == b"\r\n" {
            return Ok(Some(head));
        }
    }
}

/// Reads a body as the head describes it. `to_eof`: a response with neither length nor
/// chunking runs to the end of the connection.
async fn read_body<R: AsyncBufRead + Unpin>(
    r: &mut R,
    msg: &mut Message,
    to_eof: bool,
) -> std::io::Result<()> {
    if let Some(len) = msg.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| std::io::Error::other("bad content-length"))?;
        msg.body.resize(len, 0);
        r.read_exact(&mut msg.body).await?;
        return Ok(());
    }
    if msg
        .header("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut line = Vec::new();
            r.read_until(b'\n', &mut line).await?;
            msg.body.extend_from_slice(&line);
            let size = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| usize::from_str_radix(l.trim().split(';').next()?, 16).ok())
                .ok_or_else(|| std::io::Error::other("bad chunk size"))?;
            if size == 0 {
                // Trailers, then the blank line.
                loop {
                    let mut t = Vec::new();
                    r.read_until(b'\n', &mut t).await?;
                    msg.body.extend_from_slice(&t);
                    if t == b"\r\n" || t.is_empty() {
                        return Ok(());
                    }
                }
            }
            let start = msg.body.len();
            msg.body.resize(start + size + 2, 0);
            r.read_exact(&mut msg.body[start..]).await?;
        }
    }
    if to_eof {
        r.read_to_end(&mut msg.body).await?;
    }
    Ok(())
}

/// The refusal a request's body earns, if any.
fn refusal_for(state: &Mutex<State>, body: &[u8]) -> Option<(u16, String)> {
    let s = state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    s.refusals
        .iter()
        .find(|(needle, _, _)| {
            body.windows(needle.len().max(1))
                .any(|w| w == needle.as_bytes())
        })
        .map(|(_, status, code)| (*status, code.clone()))
}

fn canned(status: u16, code: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>"
    );
    let reason = match status {
        503 => "Service Unavailable",
        500 => "Internal Server Error",
        _ => "Refused",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nx-ms-error-code: {code}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn serve(
    client: TcpStream,
    upstream: u16,
    state: Arc<Mutex<State>>,
    hold: Duration,
) -> std::io::Result<()> {
    let (client_read, mut client_write) = client.into_split();
    let mut client_read = BufReader::new(client_read);
    let mut up: Option<(
        BufReader<tokio::net::tcp::OwnedReadHalf>,
        tokio::net::tcp::OwnedWriteHalf,
    )> = None;
    loop {
        let Some(head) = read_head(&mut client_read).await? else {
            return Ok(());
        };
        let mut request = Message {
            head,
            body: Vec::new(),
        };
        read_body(&mut client_read, &mut request, false).await?;
        let text = request.head_text();
        let mut first = text.lines().next().unwrap_or_default().split(' ');
        let (method, path) = (
            first.next().unwrap_or_default().to_owned(),
            first.next().unwrap_or_default().to_owned(),
        );
        if let Some((status, code)) = refusal_for(&state, &request.body) {
            client_write.write_all(&canned(status, &code)).await?;
            continue;
        }
        let fault = pick(&state, kind(&method, &path));
        match fault {
            Some(Fault::Reset) => return Ok(()),
            Some(Fault::Busy) => {
                client_write.write_all(&canned(503, "ServerBusy")).await?;
                continue;
            }
            Some(Fault::Error) => {
                client_write
                    .write_all(&canned(500, "InternalError"))
                    .await?;
                continue;
            }
            _ => {}
        }
        // Forward, reconnecting once if the kept-alive upstream connection went away.
        let mut response = None;
        for _ in 0..2 {
            if up.is_none() {
                let stream = TcpStream::connect(("127.0.0.1", upstream)).await?;
                let (r, w) = stream.into_split();
                up = Some((BufReader::new(r), w));
            }
            let (up_read, up_write) = up.as_mut().expect("connected above");
            let sent = async {
                up_write.write_all(&request.head).await?;
                up_write.write_all(&request.body).await
            };
            if sent.await.is_err() {
                up = None;
                continue;
            }
            match read_head(up_read).await {
                Ok(Some(head)) => {
                    let mut msg = Message {
                        head,
                        body: Vec::new(),
                    };
                    let status = msg
                        .head_text()
                        .split(' ')
                        .nth(1)
                        .unwrap_or_default()
                        .to_owned();
                    let bodiless = method == "HEAD" || status == "204" || status == "304";
                    if !bodiless {
                        read_body(up_read, &mut msg, true).await?;
                    }
                    response = Some(msg);
                    break;
                }
                _ => up = None,
            }
        }
        let Some(response) = response else {
            return Ok(());
        };
        match fault {
            Some(Fault::DropResponse) => return Ok(()),
            Some(Fault::Delay) => {
                tokio::time::sleep(hold).await;
                return Ok(());
            }
            Some(Fault::Slow) => tokio::time::sleep(hold).await,
            _ => {}
        }
        client_write.write_all(&response.head).await?;
        client_write.write_all(&response.body).await?;
        if response
            .header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"))
        {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::kind;

    #[test]
    fn operations_are_told_apart_by_method_and_path() {
        let q = "/devstoreaccount1/telemetry-ingest/messages";
        assert_eq!(kind("GET", &format!("{q}?numofmessages=32")), "queue_get");
        assert_eq!(kind("POST", q), "queue_put");
        assert_eq!(
            kind("DELETE", &format!("{q}/abc?popreceipt=x")),
            "queue_delete"
        );
        assert_eq!(kind("POST", "/devstoreaccount1/$batch"), "table_batch");
        assert_eq!(
            kind(
                "PUT",
                "/devstoreaccount1/telemetry(PartitionKey='a',RowKey='b')"
            ),
            "table_write"
        );
        assert_eq!(
            kind("GET", "/devstoreaccount1/telemetry()?$filter=x"),
            "table_query"
        );
        assert_eq!(
            kind("PUT", "/devstoreaccount1/archive/2026/01/01/a.parquet"),
            "blob_write"
        );
    }
}
