//! The lean path for the table writes, the hot path of the processor: an upsert and an entity
//! group transaction, built, signed and sent here in one buffer each, without the SDK.
//!
//! Through the SDK one upsert cost far more CPU than the reading it carried: a request object
//! with header maps, a policy pipeline of boxed futures, the account key decoded from base64
//! and the URL parsed again on every request, and the body serialised from a JSON map. Here
//! the key is decoded once, the body comes already encoded ([`Row`]), and a request is one
//! URL string, a few headers and the body. The answers are read as the SDK read them and
//! failures classified into the same [`ErrorKind`]s, with two differences: the error code is
//! also read from a table error's body (`odata.error`, which the SDK missed, so a refusal
//! for an entity's content is recognised even without the `x-ms-error-code` header), and the
//! message is the service's first line rather than the SDK's dump. The adapter tests run
//! against Azurite to hold it to that; golden tests below pin the signature and the batch
//! body. The table's other requests (create, delete, queries, a single-row delete) are built
//! and signed here too, and sent the same way: no official Azure SDK for tables exists.

use super::credential::Cached;
use super::pool::{Pool, Rebuild, Resend, Response, MAX_QUERY_RESPONSE, MAX_WRITE_RESPONSE};
use super::{full_chain, percent_encode, redact, ErrorKind};
use azure_core::credentials::AccessToken;
use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt::Write;
use std::sync::Arc;

/// The service version the SDK speaks, kept so that both paths see the same service.
const VERSION: &str = "2022-11-02";
const JSON: &str = "application/json";
const ACCEPT: &str = "application/json;odata=minimalmetadata";

/// A table row ready to write: its keys, and its whole JSON body (keys included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub partition_key: String,
    pub row_key: String,
    /// Shared, not copied, by every try of a write.
    pub json: Bytes,
}

/// A row to delete: its keys and the ETag it was read with (`odata.etag` of a queried entity).
#[derive(Debug, Clone, Copy)]
pub struct RowRef<'a> {
    pub partition_key: &'a str,
    pub row_key: &'a str,
    pub etag: &'a str,
}

impl<'a> RowRef<'a> {
    /// The keys and ETag of an entity returned by a query; `None` if any is missing.
    pub fn of(entity: &'a serde_json::Map<String, serde_json::Value>) -> Option<Self> {
        let text = |k: &str| entity.get(k).and_then(serde_json::Value::as_str);
        Some(Self {
            partition_key: text("PartitionKey")?,
            row_key: text("RowKey")?,
            etag: text("odata.etag")?,
        })
    }
}

/// How requests prove who sends them.
pub(super) enum Credential {
    /// Shared key: the HMAC keyed once with the decoded account key, cloned per request.
    Key { account: String, mac: Hmac<Sha256> },
    /// A SAS query string, appended to every URL.
    Sas(String),
    /// Entra ID: a bearer token from the cached credential.
    Token(Arc<Cached>),
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
    /// Insert or replace.
    Replace(&'a Row),
    /// Insert or merge.
    Merge(&'a Row),
    /// Insert only: refused (409) if the row exists.
    Insert(&'a Row),
    /// Merge into the row only if it exists: refused (404) if it does not.
    Update(&'a Row),
    Delete(&'a RowRef<'a>),
}

impl WireOp<'_> {
    pub(super) fn partition_key(&self) -> &str {
        match self {
            WireOp::Replace(row)
            | WireOp::Merge(row)
            | WireOp::Insert(row)
            | WireOp::Update(row) => &row.partition_key,
            WireOp::Delete(row) => row.partition_key,
        }
    }
}

/// A transaction's answer: the status of each answered operation (a refused transaction
/// answers one, the failing operation's) and, when refused, which operation failed.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Transacted {
    pub statuses: Vec<u16>,
    /// The failing operation's index, as the service's error message starts (`"3:The
    /// specified entity already exists."`); `None` when committed or not said.
    pub failed_at: Option<usize>,
}

/// What a request is, before its body: what [`TableWire::request`] signs and sends.
#[derive(Clone)]
pub(super) struct Head<'a> {
    method: hyper::Method,
    /// After the endpoint and a slash; signed.
    path: &'a str,
    /// Already encoded, without `?`; not signed.
    query: &'a str,
    /// Empty for a request with no body.
    content_type: &'a str,
    accept: &'static str,
    if_match: Option<&'a str>,
}

impl<'a> Head<'a> {
    fn new(method: hyper::Method, path: &'a str, content_type: &'a str) -> Self {
        Self {
            method,
            path,
            query: "",
            content_type,
            accept: ACCEPT,
            if_match: None,
        }
    }
}

/// One page of a query's answer.
pub(super) struct Page {
    pub entities: Vec<serde_json::Map<String, serde_json::Value>>,
    /// Where the next page starts (`NextPartitionKey`, `NextRowKey`); `None` on the last.
    pub next: Option<(String, Option<String>)>,
}

/// The table service of one account.
pub(super) struct TableWire {
    http: reqwest::Client,
    /// Where the requests are sent, unless a proxy is configured (then through `http`).
    direct: Option<Pool>,
    /// The table endpoint without a trailing slash.
    endpoint: String,
    /// Its scheme and authority (`http://127.0.0.1:10002`), and its path (`/devstoreaccount1`,
    /// or empty): a request's URI is the path and what follows.
    origin: String,
    prefix: String,
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
        let prefix = url.path().trim_end_matches('/').to_owned();
        let resource = format!("/{account}{prefix}");
        Ok(Self {
            http,
            direct: None,
            origin: url.origin().ascii_serialization(),
            prefix,
            endpoint,
            resource,
            credential,
        })
    }

    /// Sends the requests on `direct`'s connections instead of the pooled client's.
    pub(super) fn with_direct(self, direct: Option<Pool>) -> Self {
        Self { direct, ..self }
    }

    /// Inserts or replaces one row.
    pub(super) async fn upsert(&self, table: &str, row: &Row) -> Result<(), ErrorKind> {
        let token = self.token().await?;
        let bearer = bearer(token.as_ref());
        let request = self.upsert_request(table, row, bearer)?;
        let again = || self.upsert_request(table, row, bearer).ok();
        check(
            &self
                .execute(request, Resend::IfUnanswered, &again, MAX_WRITE_RESPONSE)
                .await?,
        )
    }

    /// Sends `ops` as one entity group transaction.
    pub(super) async fn transact(
        &self,
        table: &str,
        ops: &[WireOp<'_>],
    ) -> Result<Transacted, ErrorKind> {
        let token = self.token().await?;
        let bearer = bearer(token.as_ref());
        let request = self.transact_request(table, ops, bearer)?;
        let again = || self.transact_request(table, ops, bearer).ok();
        // A transaction repeated changes nothing: its upserts and merges write the same, and
        // its conditional deletes find their rows gone (412 or 404, as a refusal), and its
        // inserts their rows there (409, as a refusal that names the insert).
        let answer = self
            .execute(request, Resend::IfUnanswered, &again, MAX_WRITE_RESPONSE)
            .await?;
        check(&answer)?;
        let text = std::str::from_utf8(&answer.body)
            .map_err(|_| ErrorKind::Protocol("a transaction's answer is not UTF-8".into()))?;
        let statuses = statuses(text)?;
        let failed_at = statuses
            .iter()
            .any(|&s| s >= 300)
            .then(|| failed_at(text))
            .flatten();
        Ok(Transacted {
            statuses,
            failed_at,
        })
    }

    /// The upsert of `row` into `table`, built and signed.
    pub(super) fn upsert_request(
        &self,
        table: &str,
        row: &Row,
        bearer: Option<&str>,
    ) -> Result<hyper::Request<Bytes>, ErrorKind> {
        let mut path = String::with_capacity(table.len() + row.row_key.len() + 64);
        entity_path(&mut path, table, &row.partition_key, &row.row_key);
        self.request(
            Head::new(hyper::Method::PUT, &path, JSON),
            row.json.clone(),
            bearer,
        )
    }

    /// The transaction of `ops` on `table`, built and signed.
    pub(super) fn transact_request(
        &self,
        table: &str,
        ops: &[WireOp<'_>],
        bearer: Option<&str>,
    ) -> Result<hyper::Request<Bytes>, ErrorKind> {
        let ids = [fastrand::u128(..), fastrand::u128(..)];
        let (batch, body) = self.batch_body(table, ops, ids);
        let content_type = format!("multipart/mixed; boundary={batch}");
        self.request(
            Head::new(hyper::Method::POST, "$batch", &content_type),
            Bytes::from(body),
            bearer,
        )
    }

    /// Creates `table`; a table that exists answers 409 (`TableAlreadyExists`).
    pub(super) async fn create_table(&self, table: &str) -> Result<(), ErrorKind> {
        let body = serde_json::json!({ "TableName": table }).to_string();
        let head = Head::new(hyper::Method::POST, "Tables", JSON);
        // Created already, a second try answers 409, which is success to the caller.
        self.send(
            head,
            Bytes::from(body),
            Resend::IfUnanswered,
            MAX_WRITE_RESPONSE,
        )
        .await
        .map(drop)
    }

    /// Deletes `table` and every row in it.
    pub(super) async fn delete_table(&self, table: &str) -> Result<(), ErrorKind> {
        let mut path = String::with_capacity(table.len() + 10);
        path.push_str("Tables('");
        key(&mut path, table);
        path.push_str("')");
        let head = Head::new(hyper::Method::DELETE, &path, "");
        self.send(head, Bytes::new(), Resend::Never, MAX_WRITE_RESPONSE)
            .await
            .map(drop)
    }

    /// Writes one row only if it is as the caller read it: with `etag`, replaces it if it
    /// still has that ETag (412 when it changed, 404 when it is gone); without, inserts it
    /// (409 when it exists). Returns the row's new ETag. Never resent: a resend of a write
    /// that landed would be refused as a change.
    pub(super) async fn write_if(
        &self,
        table: &str,
        row: &Row,
        etag: Option<&str>,
    ) -> Result<String, ErrorKind> {
        let mut path = String::with_capacity(table.len() + row.row_key.len() + 64);
        let head = match etag {
            Some(etag) => {
                entity_path(&mut path, table, &row.partition_key, &row.row_key);
                Head {
                    if_match: Some(etag),
                    ..Head::new(hyper::Method::PUT, &path, JSON)
                }
            }
            None => {
                path.push_str(table);
                Head::new(hyper::Method::POST, &path, JSON)
            }
        };
        let answer = self
            .send(head, row.json.clone(), Resend::Never, MAX_WRITE_RESPONSE)
            .await?;
        answer
            .headers
            .get(hyper::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| {
                ErrorKind::Protocol("a conditional write was answered without an ETag".into())
            })
    }

    /// Deletes one row if it still has its ETag (404 when it is gone, 412 when it changed).
    pub(super) async fn delete_row(&self, table: &str, row: &RowRef<'_>) -> Result<(), ErrorKind> {
        let mut path = String::with_capacity(table.len() + 64);
        entity_path(&mut path, table, row.partition_key, row.row_key);
        let head = Head {
            if_match: Some(row.etag),
            ..Head::new(hyper::Method::DELETE, &path, "")
        };
        // Deleted already, a second try answers 404: "already gone" to the caller.
        self.send(head, Bytes::new(), Resend::IfUnanswered, MAX_WRITE_RESPONSE)
            .await
            .map(drop)
    }

    /// One page of the rows of `table` matching the OData `filter`, from `from` (a previous
    /// page's `next`), with only the properties `select` names (all when `None`) and at
    /// most `top` rows. Rows come with full metadata: every typed property annotated, and
    /// `odata.etag` for a conditional delete.
    pub(super) async fn query_page(
        &self,
        table: &str,
        filter: &str,
        select: Option<&str>,
        top: Option<u32>,
        from: Option<&(String, Option<String>)>,
    ) -> Result<Page, ErrorKind> {
        let path = format!("{table}()");
        let mut query = String::with_capacity(filter.len() * 2 + 64);
        query.push_str("$filter=");
        percent_encode(&mut query, filter);
        if let Some(select) = select {
            query.push_str("&$select=");
            percent_encode(&mut query, select);
        }
        if let Some(top) = top {
            let _ = write!(query, "&$top={top}");
        }
        if let Some((partition, row)) = from {
            query.push_str("&NextPartitionKey=");
            percent_encode(&mut query, partition);
            if let Some(row) = row {
                query.push_str("&NextRowKey=");
                percent_encode(&mut query, row);
            }
        }
        let head = Head {
            query: &query,
            accept: "application/json;odata=fullmetadata",
            ..Head::new(hyper::Method::GET, &path, "")
        };
        let answer = self
            .send(head, Bytes::new(), Resend::IfUnanswered, MAX_QUERY_RESPONSE)
            .await?;
        let header = |name: &str| {
            answer
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        let next = header("x-ms-continuation-nextpartitionkey")
            .map(|partition| (partition, header("x-ms-continuation-nextrowkey")));
        let unreadable = |why: &str| ErrorKind::Protocol(format!("a query's answer {why}"));
        let mut json: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&answer.body).map_err(|_| unreadable("is not a JSON object"))?;
        let Some(serde_json::Value::Array(rows)) = json.remove("value") else {
            return Err(unreadable("has no value array"));
        };
        let entities = rows
            .into_iter()
            .map(|row| match row {
                serde_json::Value::Object(entity) => Ok(entity),
                _ => Err(unreadable("has a row that is not an object")),
            })
            .collect::<Result<_, _>>()?;
        Ok(Page { entities, next })
    }

    /// Signs `head` and `body`, sends them and reads the whole response: an error unless its
    /// status is a success.
    async fn send(
        &self,
        head: Head<'_>,
        body: Bytes,
        resend: Resend,
        max_body: usize,
    ) -> Result<Response, ErrorKind> {
        let token = self.token().await?;
        let bearer = bearer(token.as_ref());
        let request = self.request(head.clone(), body.clone(), bearer)?;
        let again = || self.request(head.clone(), body.clone(), bearer).ok();
        let answer = self.execute(request, resend, &again, max_body).await?;
        check(&answer)?;
        Ok(answer)
    }

    /// Sends `request` on `direct`'s connections (or, with a proxy, the pooled client's) and
    /// reads the whole response (so the connection goes back to the pool at once); `again`
    /// builds it anew for a resend (see [`Pool::send`]).
    async fn execute(
        &self,
        request: hyper::Request<Bytes>,
        resend: Resend,
        again: Rebuild<'_>,
        max_body: usize,
    ) -> Result<Response, ErrorKind> {
        if let Some(direct) = &self.direct {
            // An I/O error names no URL, so no SAS signature can reach a log from here.
            return direct
                .send(request, resend, again, max_body)
                .await
                .map_err(|e| ErrorKind::Transport(full_chain(&e)));
        }
        let (parts, body) = request.into_parts();
        let url = reqwest::Url::parse(&format!("{}{}", self.origin, parts.uri))
            .map_err(|_| ErrorKind::Protocol("a request's URL cannot be read".into()))?;
        let mut request = reqwest::Request::new(parts.method, url);
        *request.headers_mut() = parts.headers;
        *request.body_mut() = Some(body.into());
        // Errors without the URL: with a SAS credential its query string holds the signature.
        let transport = |e: reqwest::Error| ErrorKind::Transport(full_chain(&e.without_url()));
        let response = self.http.execute(request).await.map_err(transport)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(transport)?;
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    /// The Entra token, when that is the credential (cached by [`Cached`]).
    async fn token(&self) -> Result<Option<AccessToken>, ErrorKind> {
        match &self.credential {
            Credential::Token(cached) => cached
                .token()
                .await
                .map(Some)
                .map_err(|e| ErrorKind::Credential(full_chain(&e))),
            _ => Ok(None),
        }
    }

    /// The multipart body of a transaction, and its batch boundary.
    fn batch_body(&self, table: &str, ops: &[WireOp<'_>], ids: [u128; 2]) -> (String, Vec<u8>) {
        let batch = format!("batch_{:032x}", ids[0]);
        let changeset = format!("changeset_{:032x}", ids[1]);
        let size: usize = ops
            .iter()
            .map(|op| match op {
                WireOp::Replace(row)
                | WireOp::Merge(row)
                | WireOp::Insert(row)
                | WireOp::Update(row) => row.json.len() + 400,
                WireOp::Delete(_) => 400,
            })
            .sum();
        let mut body = Vec::with_capacity(size + 200);
        let mut line = String::with_capacity(512);
        let _ = write!(
            line,
            "--{batch}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n"
        );
        for op in ops {
            // Pushed piece by piece, with no formatter (the `table_request` benchmarks).
            line.push_str("--");
            line.push_str(&changeset);
            line.push_str(
                "\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n",
            );
            let (method, keys) = match op {
                WireOp::Replace(row) => ("PUT", Some((&*row.partition_key, &*row.row_key))),
                WireOp::Merge(row) | WireOp::Update(row) => {
                    ("MERGE", Some((&*row.partition_key, &*row.row_key)))
                }
                // An insert is posted to the table; its keys are in its body.
                WireOp::Insert(_) => ("POST", None),
                WireOp::Delete(row) => ("DELETE", Some((row.partition_key, row.row_key))),
            };
            line.push_str(method);
            line.push(' ');
            line.push_str(&self.endpoint);
            line.push('/');
            match keys {
                Some((pk, rk)) => entity_path(&mut line, table, pk, rk),
                None => line.push_str(table),
            }
            line.push_str(" HTTP/1.1\r\nAccept: ");
            line.push_str(ACCEPT);
            line.push_str("\r\n");
            match op {
                WireOp::Insert(_) => line.push_str("Prefer: return-no-content\r\n"),
                WireOp::Update(_) => line.push_str("If-Match: *\r\n"),
                _ => {}
            }
            match op {
                WireOp::Delete(row) => {
                    line.push_str("If-Match: ");
                    line.push_str(row.etag);
                    line.push_str("\r\n\r\n");
                    body.extend_from_slice(line.as_bytes());
                }
                WireOp::Replace(row)
                | WireOp::Merge(row)
                | WireOp::Insert(row)
                | WireOp::Update(row) => {
                    line.push_str("Content-Type: ");
                    line.push_str(JSON);
                    line.push_str("\r\n\r\n");
                    body.extend_from_slice(line.as_bytes());
                    body.extend_from_slice(&row.json);
                    body.extend_from_slice(b"\r\n");
                }
            }
            line.clear();
        }
        let _ = write!(line, "--{changeset}--\r\n--{batch}--\r\n");
        body.extend_from_slice(line.as_bytes());
        (batch, body)
    }

    /// The request, signed: all the CPU a write costs before the network (what the
    /// `table_request` benchmarks measure). Its URI is origin-form (the endpoint's path and
    /// on). `bearer` is the Entra token, when that is the credential.
    fn request(
        &self,
        head: Head<'_>,
        body: Bytes,
        bearer: Option<&str>,
    ) -> Result<hyper::Request<Bytes>, ErrorKind> {
        use hyper::header::{
            HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, IF_MATCH,
        };
        let Head {
            method,
            path,
            query,
            content_type,
            accept,
            if_match,
        } = head;
        let mut uri = String::with_capacity(self.prefix.len() + path.len() + query.len() + 256);
        uri.push_str(&self.prefix);
        uri.push('/');
        uri.push_str(path);
        if !query.is_empty() {
            uri.push('?');
            uri.push_str(query);
        }
        let date = rfc1123_now();
        let authorization = match (&self.credential, bearer) {
            // The query is not signed: the Table service's canonicalized resource holds only
            // `comp`, which no request here uses.
            (Credential::Key { account, mac }, _) => Some(shared_key(
                mac,
                account,
                [method.as_str(), content_type, &date, &self.resource, path],
            )),
            (Credential::Sas(sas), _) => {
                uri.push(if query.is_empty() { '?' } else { '&' });
                uri.push_str(sas);
                None
            }
            (Credential::Token(_), Some(token)) => Some(format!("Bearer {token}")),
            (Credential::Token(_), None) => {
                return Err(ErrorKind::Credential("no token to send".into()))
            }
        };
        let invalid = |what: &str| ErrorKind::Protocol(format!("{what} is not a header value"));
        let mut request = hyper::Request::new(body);
        *request.method_mut() = method;
        // Only a URI that cannot be read fails here: the endpoint or a key, never data sent.
        *request.uri_mut() = hyper::Uri::try_from(uri)
            .map_err(|_| ErrorKind::Protocol("a request's URI cannot be read".into()))?;
        let headers = request.headers_mut();
        headers.insert(
            HeaderName::from_static("x-ms-date"),
            HeaderValue::from_str(&date).map_err(|_| invalid("the date"))?,
        );
        headers.insert(
            HeaderName::from_static("x-ms-version"),
            HeaderValue::from_static(VERSION),
        );
        headers.insert(
            HeaderName::from_static("dataserviceversion"),
            HeaderValue::from_static("3.0;"),
        );
        headers.insert(
            HeaderName::from_static("maxdataserviceversion"),
            HeaderValue::from_static("3.0;NetFx"),
        );
        headers.insert(ACCEPT, HeaderValue::from_static(accept));
        if !content_type.is_empty() {
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_str(content_type).map_err(|_| invalid("the content type"))?,
            );
        }
        if let Some(etag) = if_match {
            headers.insert(
                IF_MATCH,
                HeaderValue::from_str(etag).map_err(|_| invalid("the ETag"))?,
            );
        }
        if let Some(authorization) = authorization {
            // Sensitive: left out of any Debug of the request.
            let mut value =
                HeaderValue::from_str(&authorization).map_err(|_| invalid("the credential"))?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        Ok(request)
    }
}

/// The Table service's SharedKey authorization of `[verb, content type, x-ms-date, resource
/// prefix, path]`: HMAC-SHA256 of `VERB\n\nContent-Type\nx-ms-date\n/account/path` (the
/// Content-MD5 line empty), under the key `mac` was created with.
fn shared_key(mac: &Hmac<Sha256>, account: &str, parts: [&str; 5]) -> String {
    let [verb, content_type, date, resource, path] = parts;
    let mut mac = mac.clone();
    for part in [
        verb,
        "\n\n",
        content_type,
        "\n",
        date,
        "\n",
        resource,
        "/",
        path,
    ] {
        mac.update(part.as_bytes());
    }
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("SharedKey {account}:{signature}")
}

fn bearer(token: Option<&AccessToken>) -> Option<&str> {
    token.map(|t| t.token.secret())
}

/// `Ok` for a success status; the service's error, by status, code and message, otherwise.
fn check(answer: &Response) -> Result<(), ErrorKind> {
    if answer.status < 300 {
        return Ok(());
    }
    // Table errors come as `{"odata.error": {"code", "message": {"value"}}}`.
    let error: Option<serde_json::Value> = serde_json::from_slice(&answer.body).ok();
    let detail = error
        .as_ref()
        .and_then(|e| e.get("odata.error").or_else(|| e.get("error")));
    let code = answer.code().map(str::to_owned).or_else(|| {
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

/// Which operation a refused transaction's answer names: its error message starts with the
/// operation's index (`"value":"3:The specified entity ..."`), on Azure and Azurite alike.
fn failed_at(text: &str) -> Option<usize> {
    let after_key = &text[text.find("\"value\"")? + "\"value\"".len()..];
    let rest = after_key.trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let digits = rest.find(|c: char| !c.is_ascii_digit())?;
    if digits == 0 || !rest[digits..].starts_with(':') {
        return None;
    }
    rest[..digits].parse().ok()
}

/// Appends `table(PartitionKey='pk',RowKey='rk')`, each key quoted as OData requires
/// (a quote doubled) and percent-encoded but for unreserved characters.
fn entity_path(out: &mut String, table: &str, partition_key: &str, row_key: &str) {
    out.push_str(table);
    out.push_str("(PartitionKey='");
    key(out, partition_key);
    out.push_str("',RowKey='");
    key(out, row_key);
    out.push_str("')");
}

fn key(out: &mut String, key: &str) {
    for part in key.split_inclusive('\'') {
        match part.strip_suffix('\'') {
            // Doubled inside the OData literal, then encoded like the rest.
            Some(before) => {
                percent_encode(out, before);
                out.push_str("%27%27");
            }
            None => percent_encode(out, part),
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
            "t(PartitionKey='dev%20%27%27a%27%27%2F%C3%BC',RowKey='2026-11-26T15%3A04%3A05.123Z')"
        );
    }

    fn emulator() -> TableWire {
        const KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
        let credential = Credential::key("devstoreaccount1", KEY).expect("the emulator's key");
        TableWire::new(
            reqwest::Client::new(),
            "devstoreaccount1",
            "http://127.0.0.1:10002/devstoreaccount1/",
            credential,
        )
        .expect("an endpoint")
    }

    #[test]
    fn the_shared_key_signs_the_documented_string() {
        let wire = emulator();
        let Credential::Key { account, mac } = &wire.credential else {
            panic!("a key");
        };
        assert_eq!(wire.resource, "/devstoreaccount1/devstoreaccount1");
        let date = "Thu, 26 Nov 2026 15:04:05 GMT";
        let path = "t(PartitionKey='p',RowKey='r')";
        let signed = shared_key(mac, account, ["PUT", JSON, date, &wire.resource, path]);
        // Computed independently: HMAC-SHA256 under the decoded key of the string Azure
        // documents for the Table service, written out whole.
        let expected = "PUT\n\napplication/json\nThu, 26 Nov 2026 15:04:05 GMT\n/devstoreaccount1/devstoreaccount1/t(PartitionKey='p',RowKey='r')";
        let mut independent = mac.clone();
        independent.update(expected.as_bytes());
        let signature =
            base64::engine::general_purpose::STANDARD.encode(independent.finalize().into_bytes());
        assert_eq!(signed, format!("SharedKey devstoreaccount1:{signature}"));
        // And by Python's hmac module, for a value no Rust code here produced.
        assert_eq!(
            signed,
            "SharedKey devstoreaccount1:9cmchBGIGi7rEqwDtuHQoV2waXwRktV96a1VHW+dwGA="
        );
    }

    #[test]
    fn a_transaction_body_is_the_documented_multipart() {
        let wire = emulator();
        let row = Row {
            partition_key: "p".into(),
            row_key: "r 1".into(),
            json: Bytes::from_static(br#"{"PartitionKey":"p","RowKey":"r 1"}"#),
        };
        let stale = RowRef {
            partition_key: "p",
            row_key: "r2",
            etag: "W/\"1\"",
        };
        let ops = [WireOp::Replace(&row), WireOp::Delete(&stale)];
        let (batch, body) = wire.batch_body("t", &ops, [1, 2]);
        assert_eq!(batch, "batch_00000000000000000000000000000001");
        let expected = "--batch_00000000000000000000000000000001\r\n\
Content-Type: multipart/mixed; boundary=changeset_00000000000000000000000000000002\r\n\r\n\
--changeset_00000000000000000000000000000002\r\n\
Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
PUT http://127.0.0.1:10002/devstoreaccount1/t(PartitionKey='p',RowKey='r%201') HTTP/1.1\r\n\
Accept: application/json;odata=minimalmetadata\r\nContent-Type: application/json\r\n\r\n\
{\"PartitionKey\":\"p\",\"RowKey\":\"r 1\"}\r\n\
--changeset_00000000000000000000000000000002\r\n\
Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
DELETE http://127.0.0.1:10002/devstoreaccount1/t(PartitionKey='p',RowKey='r2') HTTP/1.1\r\n\
Accept: application/json;odata=minimalmetadata\r\nIf-Match: W/\"1\"\r\n\r\n\
--changeset_00000000000000000000000000000002--\r\n\
--batch_00000000000000000000000000000001--\r\n";
        assert_eq!(String::from_utf8(body).unwrap(), expected);
    }

    #[test]
    fn the_credential_never_shows_in_a_request() {
        let wire = emulator();
        let row = Row {
            partition_key: "p".into(),
            row_key: "r".into(),
            json: Bytes::new(),
        };
        let request = wire.upsert_request("t", &row, None).expect("built");
        let shown = format!("{request:?}");
        assert!(!shown.contains("SharedKey"), "{shown}");
        assert!(request.headers()["authorization"].is_sensitive());
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
    fn a_refused_transaction_names_its_failing_operation() {
        let refused = "--changesetresponse_2\r\nContent-Type: application/http\r\n\r\nHTTP/1.1 409 Conflict\r\nContent-ID: 4\r\n\r\n{\"odata.error\":{\"code\":\"EntityAlreadyExists\",\"message\":{\"lang\":\"en-US\",\"value\":\"3:The specified entity already exists.\\nRequestId:x\"}}}\r\n";
        assert_eq!(failed_at(refused), Some(3));
        let unsaid = "HTTP/1.1 409 Conflict\r\n\r\n{\"odata.error\":{\"message\":{\"value\":\"The specified entity already exists.\"}}}";
        assert_eq!(failed_at(unsaid), None);
        assert_eq!(failed_at("\"value\":\"12\""), None, "digits, but no colon");
        assert_eq!(
            failed_at("{\"value\" : \"7:Gone\"}"),
            Some(7),
            "spaced JSON"
        );
    }

    #[test]
    fn inserts_and_updates_say_what_they_presume() {
        let wire = emulator();
        let row = Row {
            partition_key: "p".into(),
            row_key: "r".into(),
            json: Bytes::from_static(br#"{"PartitionKey":"p","RowKey":"r"}"#),
        };
        let (_, body) = wire.batch_body("t", &[WireOp::Insert(&row), WireOp::Update(&row)], [1, 2]);
        let body = String::from_utf8(body).unwrap();
        let endpoint = &wire.endpoint;
        assert!(
            body.contains(&format!(
                "POST {endpoint}/t HTTP/1.1\r\nAccept: {ACCEPT}\r\nPrefer: return-no-content\r\n"
            )),
            "{body}"
        );
        assert!(
            body.contains(&format!("MERGE {endpoint}/t(PartitionKey='p',RowKey='r') HTTP/1.1\r\nAccept: {ACCEPT}\r\nIf-Match: *\r\n")),
            "{body}"
        );
    }

    #[test]
    fn errors_carry_the_service_code_and_message() {
        let answer = Response {
            status: 400,
            headers: hyper::HeaderMap::new(),
            body: Bytes::from_static(
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
        let mut headers = hyper::HeaderMap::new();
        headers.insert(
            "x-ms-error-code",
            hyper::header::HeaderValue::from_static("ServerBusy"),
        );
        let bare = Response {
            status: 503,
            headers,
            body: Bytes::new(),
        };
        assert!(
            matches!(check(&bare), Err(ErrorKind::Status { status: 503, code, .. }) if code == "ServerBusy")
        );
    }
}
