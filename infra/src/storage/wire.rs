//! The lean path for the table writes, the hot path of the processor: an upsert and an entity
//! group transaction, built, signed and sent here in one buffer each, without the SDK.
//!
//! Through the SDK one upsert cost far more CPU than the reading it carried: a request object
//! with header maps, a policy pipeline of boxed futures, the account key decoded from base64
//! and the URL parsed again on every request, and the body serialised from a JSON map. Here
//! the key is decoded once, the body comes already encoded ([`Row`]), and a request is one
//! URL string, a few headers and the body. The answers are read as the SDK read them, and
//! failures classified the same way ([`ErrorKind`]), so callers see no difference; the
//! adapter tests run against Azurite to hold it to that. Everything else still goes through
//! the SDK.

use super::entra::Entra;
use super::{full_chain, redact, ErrorKind};
use azure_core::auth::TokenCredential;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt::Write;
use std::sync::Arc;

/// The service version the SDK speaks, kept so that both paths see the same service.
const VERSION: &str = "2022-11-02";
const STORAGE_SCOPE: &str = "https://storage.azure.com/.default";
const JSON: &str = "application/json";
const ACCEPT: &str = "application/json;odata=minimalmetadata";

/// A table row ready to write: its keys, and its whole JSON body (keys included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub partition_key: String,
    pub row_key: String,
    /// Shared, not copied, by every try of a write.
    pub json: bytes::Bytes,
}

/// How requests prove who sends them.
pub(super) enum Credential {
    /// Shared key: the HMAC keyed once with the decoded account key, cloned per request.
    Key { account: String, mac: Hmac<Sha256> },
    /// A SAS query string, appended to every URL.
    Sas(String),
    /// Entra ID: a bearer token from the project's own cached credential.
    Token(Arc<Entra>),
}

impl Credential {
    /// A shared-key credential; `Err` if the key is not base64 (never quoting it).
    pub(super) fn key(account: &str, key: &str) -> Result<Self, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .map_err(|_| "AccountKey is not base64".to_owned())?;
        let mac = Hmac::<Sha256>::new_from_slice(&bytes)
            .map_err(|_| "AccountKey cannot key an HMAC".to_owned())?;
        Ok(Self::Key {
            account: account.to_owned(),
            mac,
        })
    }

    pub(super) fn sas(sas: &str) -> Self {
        Self::Sas(sas.trim_start_matches('?').to_owned())
    }
}

/// One write in a transaction.
pub(super) enum WireOp<'a> {
    Replace(&'a Row),
    Merge(&'a Row),
    Delete {
        partition_key: &'a str,
        row_key: &'a str,
        etag: &'a str,
    },
}

impl WireOp<'_> {
    pub(super) fn partition_key(&self) -> &str {
        match self {
            WireOp::Replace(row) | WireOp::Merge(row) => &row.partition_key,
            WireOp::Delete { partition_key, .. } => partition_key,
        }
    }
}

/// The table service of one account, for the two hot writes.
pub(super) struct TableWire {
    http: reqwest::Client,
    /// The table endpoint without a trailing slash.
    endpoint: String,
    /// `/{account}{the endpoint's path}`: where every canonicalized resource starts.
    resource: String,
    credential: Credential,
}

impl std::fmt::Debug for TableWire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The credential is deliberately left out.
        f.debug_struct("TableWire")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// What the service answered.
struct Answer {
    status: u16,
    code: Option<String>,
    body: bytes::Bytes,
}

impl TableWire {
    pub(super) fn new(
        http: reqwest::Client,
        account: &str,
        endpoint: &str,
        credential: Credential,
    ) -> Result<Self, String> {
        let endpoint = endpoint.trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&endpoint)
            .map_err(|_| "the table endpoint is not a URL".to_owned())?;
        let resource = format!("/{account}{}", url.path().trim_end_matches('/'));
        Ok(Self {
            http,
            endpoint,
            resource,
            credential,
        })
    }

    /// Inserts or replaces one row.
    pub(super) async fn upsert(&self, table: &str, row: &Row) -> Result<(), ErrorKind> {
        let mut path = String::with_capacity(table.len() + row.row_key.len() + 64);
        entity_path(&mut path, table, &row.partition_key, &row.row_key);
        let answer = self.send("PUT", &path, JSON, row.json.clone()).await?;
        check(&answer)
    }

    /// Sends `ops` as one entity group transaction; the status of each answered operation.
    /// (A refused transaction answers one status, the failing operation's.)
    pub(super) async fn transact(
        &self,
        table: &str,
        ops: &[WireOp<'_>],
    ) -> Result<Vec<u16>, ErrorKind> {
        let (batch, body) = self.batch_body(table, ops);
        let content_type = format!("multipart/mixed; boundary={batch}");
        let answer = self.send("POST", "$batch", &content_type, body).await?;
        check(&answer)?;
        let text = std::str::from_utf8(&answer.body)
            .map_err(|_| ErrorKind::Protocol("a transaction's answer is not UTF-8".into()))?;
        statuses(text)
    }

    /// The multipart body of a transaction, and its batch boundary.
    fn batch_body(&self, table: &str, ops: &[WireOp<'_>]) -> (String, Vec<u8>) {
        let batch = format!("batch_{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let changeset = format!(
            "changeset_{:016x}{:016x}",
            fastrand::u64(..),
            fastrand::u64(..)
        );
        let size: usize = ops
            .iter()
            .map(|op| match op {
                WireOp::Replace(row) | WireOp::Merge(row) => row.json.len() + 400,
                WireOp::Delete { .. } => 400,
            })
            .sum();
        let mut body = Vec::with_capacity(size + 200);
        let mut line = String::with_capacity(512);
        let _ = write!(
            line,
            "--{batch}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n"
        );
        for op in ops {
            let _ = write!(
                line,
                "--{changeset}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
            );
            let (method, pk, rk, json) = match op {
                WireOp::Replace(row) => ("PUT", &*row.partition_key, &*row.row_key, Some(row)),
                WireOp::Merge(row) => ("MERGE", &*row.partition_key, &*row.row_key, Some(row)),
                WireOp::Delete {
                    partition_key,
                    row_key,
                    ..
                } => ("DELETE", *partition_key, *row_key, None),
            };
            let _ = write!(line, "{method} {}/", self.endpoint);
            entity_path(&mut line, table, pk, rk);
            let _ = write!(line, " HTTP/1.1\r\nAccept: {ACCEPT}\r\n");
            match (op, json) {
                (WireOp::Delete { etag, .. }, _) => {
                    let _ = write!(line, "If-Match: {etag}\r\n\r\n");
                    body.extend_from_slice(line.as_bytes());
                }
                (_, Some(row)) => {
                    let _ = write!(line, "Content-Type: {JSON}\r\n\r\n");
                    body.extend_from_slice(line.as_bytes());
                    body.extend_from_slice(&row.json);
                    body.extend_from_slice(b"\r\n");
                }
                (_, None) => body.extend_from_slice(line.as_bytes()),
            }
            line.clear();
        }
        let _ = write!(line, "--{changeset}--\r\n--{batch}--\r\n");
        body.extend_from_slice(line.as_bytes());
        (batch, body)
    }

    /// Sends one request to `{endpoint}/{path}`, signed, and reads the whole answer (so the
    /// connection goes back to the pool at once).
    async fn send(
        &self,
        method: &'static str,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<Answer, ErrorKind> {
        let mut url = String::with_capacity(self.endpoint.len() + path.len() + 256);
        url.push_str(&self.endpoint);
        url.push('/');
        url.push_str(path);
        let date = rfc1123_now();
        let authorization = match &self.credential {
            Credential::Key { account, mac } => {
                let mut mac = mac.clone();
                for part in [method, "\n\n", content_type, "\n", &date, "\n"] {
                    mac.update(part.as_bytes());
                }
                mac.update(self.resource.as_bytes());
                mac.update(b"/");
                mac.update(path.as_bytes());
                let signature =
                    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
                Some(format!("SharedKey {account}:{signature}"))
            }
            Credential::Sas(sas) => {
                url.push('?');
                url.push_str(sas);
                None
            }
            Credential::Token(entra) => {
                let token = entra
                    .get_token(&[STORAGE_SCOPE])
                    .await
                    .map_err(|e| ErrorKind::Credential(full_chain(&e)))?;
                Some(format!("Bearer {}", token.token.secret()))
            }
        };
        let method = match method {
            "PUT" => reqwest::Method::PUT,
            _ => reqwest::Method::POST,
        };
        let mut request = self
            .http
            .request(method, url)
            .header("x-ms-date", date)
            .header("x-ms-version", VERSION)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .header(reqwest::header::ACCEPT, ACCEPT)
            .body(body);
        if let Some(authorization) = authorization {
            request = request.header(reqwest::header::AUTHORIZATION, authorization);
        }
        // Errors without the URL: with a SAS credential its query string holds the signature.
        let transport = |e: reqwest::Error| ErrorKind::Transport(full_chain(&e.without_url()));
        let response = request.send().await.map_err(transport)?;
        let status = response.status().as_u16();
        let code = response
            .headers()
            .get("x-ms-error-code")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.bytes().await.map_err(transport)?;
        Ok(Answer { status, code, body })
    }
}

/// `Ok` for a success status; the service's error, by status, code and message, otherwise.
fn check(answer: &Answer) -> Result<(), ErrorKind> {
    if answer.status < 300 {
        return Ok(());
    }
    // Table errors come as `{"odata.error": {"code", "message": {"value"}}}`.
    let error: Option<serde_json::Value> = serde_json::from_slice(&answer.body).ok();
    let detail = error
        .as_ref()
        .and_then(|e| e.get("odata.error").or_else(|| e.get("error")));
    let code = answer.code.clone().or_else(|| {
        detail
            .and_then(|d| d.get("code"))
            .and_then(|c| c.as_str())
            .map(str::to_owned)
    });
    let message = detail
        .and_then(|d| d.get("message"))
        .and_then(|m| m.get("value").or(Some(m)))
        .and_then(|m| m.as_str())
        .map(|m| m.lines().next().unwrap_or_default().to_owned())
        .unwrap_or_else(|| format!("HTTP {}", answer.status));
    Err(ErrorKind::Status {
        status: answer.status,
        code: code.unwrap_or_default(),
        message: redact(&message),
    })
}

/// The status line of every operation in a transaction's multipart answer.
fn statuses(text: &str) -> Result<Vec<u16>, ErrorKind> {
    text.lines()
        .filter_map(|line| line.strip_prefix("HTTP/1.1 "))
        .map(|rest| {
            rest.split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| ErrorKind::Protocol(format!("a status line {rest:?}")))
        })
        .collect()
}

/// Appends `table(PartitionKey='pk',RowKey='rk')`, each key quoted as OData requires
/// (a quote doubled) and percent-encoded as a path segment.
fn entity_path(out: &mut String, table: &str, partition_key: &str, row_key: &str) {
    out.push_str(table);
    out.push_str("(PartitionKey='");
    key(out, partition_key);
    out.push_str("',RowKey='");
    key(out, row_key);
    out.push_str("')");
}

fn key(out: &mut String, key: &str) {
    for b in key.bytes() {
        match b {
            b'\'' => out.push_str("''"),
            b'A'..=b'Z'
            | b'a'..=b'z'
            | b'0'..=b'9'
            | b'-'
            | b'.'
            | b'_'
            | b'~'
            | b'!'
            | b'$'
            | b'&'
            | b'('
            | b')'
            | b'*'
            | b'+'
            | b','
            | b';'
            | b'='
            | b':'
            | b'@' => out.push(char::from(b)),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
}

/// Now as RFC 1123 (`Thu, 26 Nov 2026 15:04:05 GMT`), as `x-ms-date` wants it.
fn rfc1123_now() -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::OffsetDateTime::now_utc()
        .format(FORMAT)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_quoted_and_encoded_as_a_path_segment() {
        let mut path = String::new();
        entity_path(&mut path, "t", "dev 'a'/ü", "2026-11-26T15:04:05.123Z");
        assert_eq!(
            path,
            "t(PartitionKey='dev%20''a''%2F%C3%BC',RowKey='2026-11-26T15:04:05.123Z')"
        );
    }

    #[test]
    fn the_date_is_rfc_1123() {
        let date = rfc1123_now();
        assert!(date.ends_with(" GMT") && date.len() == 29, "{date}");
    }

    #[test]
    fn a_transaction_answer_gives_each_status() {
        let committed = "--batchresponse_1\r\nContent-Type: multipart/mixed; boundary=changesetresponse_2\r\n\r\n--changesetresponse_2\r\nContent-Type: application/http\r\n\r\nHTTP/1.1 204 No Content\r\nX: y\r\n\r\n--changesetresponse_2\r\nContent-Type: application/http\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n--changesetresponse_2--\r\n--batchresponse_1--\r\n";
        assert_eq!(statuses(committed).unwrap(), [204, 204]);
        let refused = "--changesetresponse_2\nHTTP/1.1 400 Bad Request\n\n{\"odata.error\":{}}\n";
        assert_eq!(statuses(refused).unwrap(), [400]);
        assert!(statuses("HTTP/1.1 abc").is_err());
    }

    #[test]
    fn errors_carry_the_service_code_and_message() {
        let answer = Answer {
            status: 400,
            code: None,
            body: bytes::Bytes::from_static(
                br#"{"odata.error":{"code":"PropertyValueTooLarge","message":{"lang":"en-US","value":"The property value exceeds the maximum allowed size (64KB).\nRequestId:1"}}}"#,
            ),
        };
        let Err(ErrorKind::Status {
            status,
            code,
            message,
        }) = check(&answer)
        else {
            panic!("not an error");
        };
        assert_eq!((status, code.as_str()), (400, "PropertyValueTooLarge"));
        assert_eq!(
            message,
            "The property value exceeds the maximum allowed size (64KB)."
        );
        let bare = Answer {
            status: 503,
            code: Some("ServerBusy".into()),
            body: bytes::Bytes::new(),
        };
        assert!(
            matches!(check(&bare), Err(ErrorKind::Status { status: 503, code, .. }) if code == "ServerBusy")
        );
    }
}
