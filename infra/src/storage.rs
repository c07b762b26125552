//! The Azure Storage adapter: queues, tables and blobs behind small, SDK-free types.
//!
//! Every call is bounded by a timeout, classified into [`StorageError`] with
//! [`StorageError::is_retriable`], counted in `storage_requests_total{op}` and timed in
//! `storage_request_seconds{op}`. SDK-level
//! retries are off: callers own retry so that they can back off, give up, and report.

mod account;
mod blob;
mod credential;
mod http;
mod pool;
mod prepare;
mod queue;
mod sas;
mod table;
mod wire;

pub use account::{Access, Account, DEVELOPMENT_STORAGE};
pub use blob::{BlobContent, BlobInfo, Container, PutOptions, PutOutcome, Write};
pub use credential::Auth;
pub use prepare::{create_missing, Resource};
pub use queue::{Queue, QueueMessage};
pub use sas::Grant;
pub use table::{
    BatchOutcome, Entity, Placed, Presence, Refusal, Table, MAX_BATCH_BYTES, MAX_BATCH_OPERATIONS,
};
pub use wire::{Row, RowRef};

use std::time::Duration;

/// A connection string that cannot be used. Names the part at fault, never a value: the
/// string holds the account key or SAS.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("the storage connection string is malformed: {0}")]
    Malformed(String),
    #[error("the storage connection string has no {0}")]
    Missing(&'static str),
    #[error("Entra ID authentication: {0}")]
    Entra(String),
    #[error("AZURE_STORAGE_CA_FILE: {0}")]
    Ca(String),
    /// `AZURE_STORAGE_CONNECTION_STRING_FILE` cannot be read (names the file, never its
    /// contents).
    #[error(transparent)]
    File(#[from] crate::mqtt::ConfigError),
}

/// A failed storage call.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op} failed: {kind}")]
pub struct StorageError {
    /// The operation, as in the `op` metric label (`queue_put`, `table_batch`, ...).
    pub op: &'static str,
    pub kind: ErrorKind,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ErrorKind {
    /// The service answered with an error status.
    #[error("HTTP {status} {code}: {message}")]
    Status {
        status: u16,
        code: String,
        message: String,
    },
    /// No answer within the timeout.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The request never completed: connection refused or reset, DNS, TLS.
    #[error("transport error: {0}")]
    Transport(String),
    /// The service answered something this adapter cannot read.
    #[error("unexpected response: {0}")]
    Protocol(String),
    /// No Entra ID token: the identity is misconfigured or its endpoint refused.
    #[error("no storage token: {0}")]
    Credential(String),
    /// The caller's deadline came before the answer (the request may still take effect).
    #[error("out of time: the caller's deadline passed first")]
    OutOfTime,
}

impl StorageError {
    /// Whether trying again later can succeed: server errors, throttling, timeouts and broken
    /// connections. Other 4xx answers mean the request itself is wrong.
    pub fn is_retriable(&self) -> bool {
        match &self.kind {
            ErrorKind::Status { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            ErrorKind::Timeout(_) | ErrorKind::Transport(_) | ErrorKind::OutOfTime => true,
            ErrorKind::Protocol(_) | ErrorKind::Credential(_) => false,
        }
    }

    /// The HTTP status, when the service answered (for logs and tests; services decide with
    /// the typed questions below).
    pub fn status(&self) -> Option<u16> {
        match &self.kind {
            ErrorKind::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The thing named does not exist (404): a queue, table, message or row.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// A queue message this caller held is no longer its own: deleted (404), or taken again
    /// by another reader after the hold ran out (400 `PopReceiptMismatch`). Any other 400 is
    /// a request refused, not a message gone.
    pub fn is_gone(&self) -> bool {
        match &self.kind {
            ErrorKind::Status { status: 404, .. } => true,
            ErrorKind::Status {
                status: 400, code, ..
            } => code == "PopReceiptMismatch",
            _ => false,
        }
    }

    /// A conditional write or delete found the thing changed since it was read (412).
    pub fn is_changed(&self) -> bool {
        self.status() == Some(412)
    }

    /// Whether the service refused the request for what it carries (400, 413): another
    /// request, with other content, can succeed, so the one entity or message is at fault.
    /// Refused authorisation (401, 403), a missing resource (404) or a resource in the wrong
    /// state (409) are about the account or the resource: the operator's to fix, never the
    /// data's fault.
    ///
    /// Only codes that name the entity or message count: Azure answers 400 for request-level
    /// mistakes too (an invalid table name, a malformed header), and those must not blame
    /// the data. An unlisted 400 is treated as the operator's, so at worst a bad entity
    /// waits in the queue with readiness naming it, rather than good ones being dead-lettered.
    pub fn is_content_error(&self) -> bool {
        const ENTITY_CODES: &[&str] = &[
            "PropertyValueTooLarge",
            "EntityTooLarge",
            "PropertyNameTooLong",
            "PropertyNameInvalid",
            "TooManyProperties",
            "InvalidValueType",
            "InvalidDuplicateRow",
            "RequestBodyTooLarge",
            "MessageTooLarge",
        ];
        match &self.kind {
            ErrorKind::Status { status: 413, .. } => true,
            ErrorKind::Status {
                status: 400, code, ..
            } => ENTITY_CODES.contains(&code.as_str()),
            _ => false,
        }
    }

    /// Whether only the operator can fix this: refused credentials or permissions, or a
    /// missing resource. Retrying soon will not help; data is never blamed for it.
    pub fn needs_operator(&self) -> bool {
        !self.is_retriable() && !self.is_content_error()
    }
}

impl ErrorKind {
    /// How an SDK error is classified.
    fn from_sdk(e: &azure_core::Error) -> Self {
        use azure_core::error::ErrorKind as Sdk;
        match e.kind() {
            Sdk::HttpResponse {
                status, error_code, ..
            } => ErrorKind::Status {
                status: u16::from(*status),
                code: error_code.clone().unwrap_or_default(),
                message: service_message(&e.to_string()),
            },
            Sdk::Connection | Sdk::Io => ErrorKind::Transport(full_chain(e)),
            Sdk::DataConversion => ErrorKind::Protocol(full_chain(e)),
            Sdk::Credential => ErrorKind::Credential(full_chain(e)),
            _ => ErrorKind::Transport(full_chain(e)),
        }
    }
}

/// The service's own words from an SDK error's text (`{status}: {XML error body}`): the
/// `<Message>`'s first line, or the text's first line, bounded and with URLs' queries cut.
fn service_message(text: &str) -> String {
    let message = text
        .split_once("<Message>")
        .and_then(|(_, rest)| rest.split_once("</Message>"))
        .map_or(text, |(message, _)| message);
    let line = message.lines().next().unwrap_or_default();
    redact(&line.chars().take(300).collect::<String>())
}

/// An SDK failure outside [`call`] (building a request), as this adapter reports it.
fn sdk_error(op: &'static str, e: &azure_core::Error) -> StorageError {
    StorageError {
        op,
        kind: ErrorKind::from_sdk(e),
    }
}

fn full_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    redact(&s)
}

/// Error text with every URL's query string cut: a SAS signature travels in one. The
/// transport already drops URLs from its errors; this covers what the SDK writes itself.
fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, url) = rest.split_at(at);
        out.push_str(before);
        let end = url
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '>' | ','))
            .unwrap_or(url.len());
        let (url, after) = url.split_at(end);
        match url.split_once('?') {
            Some((path, _)) => {
                out.push_str(path);
                out.push_str("?<query redacted>");
            }
            None => out.push_str(url),
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Appends `value` percent-encoded: every byte but RFC 3986's unreserved characters, as the
/// .NET and JS SDKs send keys and query values (the service has read a raw `+` as a space).
fn percent_encode(out: &mut String, value: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(char::from(b))
            }
            _ => {
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        }
    }
}

/// Runs one SDK call under the timeout, counting and timing it and classifying its failure.
async fn call<T>(
    op: &'static str,
    timeout: Duration,
    fut: impl std::future::Future<Output = azure_core::Result<T>>,
) -> Result<T, StorageError> {
    measured(op, timeout, async {
        fut.await.map_err(|e| ErrorKind::from_sdk(&e))
    })
    .await
}

/// Runs one request under the timeout, counting and timing it (SDK or not).
async fn measured<T>(
    op: &'static str,
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, ErrorKind>>,
) -> Result<T, StorageError> {
    metrics::counter!("storage_requests_total", "op" => op).increment(1);
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(timeout, fut).await;
    metrics::histogram!("storage_request_seconds", "op" => op)
        .record(started.elapsed().as_secs_f64());
    let result = match outcome {
        Ok(Ok(v)) => return Ok(v),
        Ok(Err(kind)) => StorageError { op, kind },
        Err(_) => StorageError {
            op,
            kind: ErrorKind::Timeout(timeout),
        },
    };
    // By status, so that a credential's 403 can page someone while a 503 merely counts.
    let status = match &result.kind {
        ErrorKind::Status { status, .. } => status.to_string(),
        ErrorKind::Timeout(_) => "timeout".to_owned(),
        _ => "transport".to_owned(),
    };
    metrics::counter!("storage_request_errors_total", "op" => op, "status" => status).increment(1);
    Err(result)
}

/// A create call's outcome, with the "already exists" answer (409) as success.
async fn create_if_missing(
    created: impl std::future::Future<Output = Result<(), StorageError>>,
) -> Result<(), StorageError> {
    match created.await {
        Err(e) if e.status() != Some(409) => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_cut_from_error_text() {
        let text = "error sending request for url (https://acct.queue.core.windows.net/q/messages?sv=2022&sig=SECRET%2B): connection refused; see http://x/y";
        let clean = redact(text);
        assert!(!clean.contains("SECRET"), "{clean}");
        assert!(
            clean.contains("https://acct.queue.core.windows.net/q/messages?<query redacted>)"),
            "{clean}"
        );
        assert!(clean.ends_with("see http://x/y"), "{clean}");
    }

    #[test]
    fn errors_are_classified_by_whom_to_blame() {
        let status = |status: u16, code: &str| StorageError {
            op: "table_upsert",
            kind: ErrorKind::Status {
                status,
                code: code.into(),
                message: String::new(),
            },
        };
        let content = status(400, "PropertyValueTooLarge");
        assert!(content.is_content_error() && !content.needs_operator());
        for (s, code) in [
            (403, "AuthorizationPermissionMismatch"),
            (403, "AuthenticationFailed"),
            (404, "TableNotFound"),
            (409, "TableBeingDeleted"),
            (400, "OutOfRangeInput"),
            (400, "InvalidHeaderValue"),
            (400, "InvalidAuthenticationInfo"),
        ] {
            let e = status(s, code);
            assert!(!e.is_content_error() && e.needs_operator(), "{s} {code}");
        }
        assert!(!status(503, "ServerBusy").needs_operator());
        assert!(status(404, "MessageNotFound").is_gone());
        assert!(status(400, "PopReceiptMismatch").is_gone());
        assert!(!status(400, "InvalidHeaderValue").is_gone());
        assert!(!status(503, "ServerBusy").is_gone());
    }
}
