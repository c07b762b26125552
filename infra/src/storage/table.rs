//! Azure Table Storage operations.

use super::wire::{Page, Row, RowRef, TableWire, WireOp};
use super::{measured, ErrorKind, StorageError};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::Duration;

/// Azure's limit on operations in one entity group transaction.
pub const MAX_BATCH_OPERATIONS: usize = 100;
/// Azure's limit on a transaction's payload (4 MiB), less room for the multipart framing.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024 - 100 * 1024;

pub type Entity = Map<String, Value>;

/// What became of an entity group transaction that the service answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Every operation applied.
    Committed,
    /// The service refused the transaction; nothing was written. The service answers such a
    /// transaction with success (202) and the failing operation's status inside, so it is
    /// read from the per-operation statuses.
    Rejected(Refusal),
}

/// Why a transaction was refused, as far as its statuses tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Something an operation carries (400, 413): the same operations one by one tell which,
    /// and the others can succeed.
    Content(u16),
    /// A row was changed (412) or deleted (404) since it was read.
    Changed(u16),
    /// Busy or failing for now (408, 429, 5xx): the same transaction later can succeed.
    Transient(u16),
    /// The account, table or credential (403, 409, ...): no operation can succeed until the
    /// operator acts.
    Refused(u16),
}

impl Refusal {
    fn of(status: u16, conditional: bool) -> Self {
        match status {
            400 | 413 => Self::Content(status),
            404 | 412 if conditional => Self::Changed(status),
            408 | 429 | 500..=599 => Self::Transient(status),
            _ => Self::Refused(status),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, status) = match self {
            Self::Content(s) => ("an operation's content", s),
            Self::Changed(s) => ("a row changed since it was read", s),
            Self::Transient(s) => ("now, by a busy or failing service", s),
            Self::Refused(s) => ("the table or credential", s),
        };
        write!(f, "refused for {what} (HTTP {status})")
    }
}

/// A table of an account. No official Azure SDK for tables exists yet, so every request is the
/// project's own (`wire.rs`): the writes on their lean path, the rest on the pooled client.
#[derive(Debug, Clone)]
pub struct Table {
    name: String,
    wire: Arc<TableWire>,
    timeout: Duration,
}

/// An entity as a row (its keys and its JSON), for operation `op`.
fn row(op: &'static str, entity: &Entity) -> Result<Row, StorageError> {
    let (pk, rk) = keys(op, entity)?;
    let json = serde_json::to_vec(entity).map_err(|e| StorageError {
        op,
        kind: ErrorKind::Protocol(format!("entity cannot be encoded: {e}")),
    })?;
    Ok(Row {
        partition_key: pk.to_owned(),
        row_key: rk.to_owned(),
        json: json.into(),
    })
}

fn rows(entities: &[Entity]) -> Result<Vec<Row>, StorageError> {
    entities.iter().map(|e| row("table_batch", e)).collect()
}

impl Table {
    pub(super) fn new(name: &str, wire: Arc<TableWire>, timeout: Duration) -> Self {
        Self {
            name: name.to_owned(),
            wire,
            timeout,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates the table unless it exists.
    pub async fn create_if_missing(&self) -> Result<(), StorageError> {
        super::create_if_missing(measured(
            "table_create",
            self.timeout,
            self.wire.create_table(&self.name),
        ))
        .await
    }

    /// Inserts or replaces one entity, keyed by its `PartitionKey` and `RowKey`.
    pub async fn upsert(&self, entity: &Entity) -> Result<(), StorageError> {
        self.upsert_row(&row("table_upsert", entity)?).await
    }

    /// Inserts or replaces one row already encoded.
    pub async fn upsert_row(&self, row: &Row) -> Result<(), StorageError> {
        measured(
            "table_upsert",
            self.timeout,
            self.wire.upsert(self.name(), row),
        )
        .await
    }

    /// Inserts or replaces up to [`MAX_BATCH_OPERATIONS`] entities of one partition atomically.
    ///
    /// Refuses batches that span partitions or hold too many operations before sending
    /// anything: Azurite accepts mixed-partition batches that Azure rejects, so no emulator test
    /// would catch the mistake. Keeping within [`MAX_BATCH_BYTES`] is the caller's job (it has
    /// to measure entities anyway to chunk them); a batch over it comes back `Rejected`.
    pub async fn upsert_batch(&self, entities: &[Entity]) -> Result<BatchOutcome, StorageError> {
        self.upsert_rows(&rows(entities)?).await
    }

    /// [`Table::upsert_batch`] of rows already encoded.
    pub async fn upsert_rows(&self, rows: &[Row]) -> Result<BatchOutcome, StorageError> {
        self.transact(rows.iter().map(WireOp::Replace).collect())
            .await
    }

    /// Like [`Table::upsert_batch`], but merges: properties the entities leave out are kept.
    pub async fn merge_batch(&self, entities: &[Entity]) -> Result<BatchOutcome, StorageError> {
        let rows = rows(entities)?;
        self.transact(rows.iter().map(WireOp::Merge).collect())
            .await
    }

    /// Deletes up to [`MAX_BATCH_OPERATIONS`] rows of one partition atomically, each only if
    /// it still has the ETag it was read with. A row changed or deleted meanwhile makes the
    /// whole transaction [`Refusal::Changed`], and nothing is deleted.
    pub async fn delete_batch(&self, rows: &[RowRef<'_>]) -> Result<BatchOutcome, StorageError> {
        self.transact(rows.iter().map(WireOp::Delete).collect())
            .await
    }

    /// Deletes one row if it still has `etag`. `Ok(false)` when it is already gone.
    pub async fn delete(&self, row: &RowRef<'_>) -> Result<bool, StorageError> {
        match measured(
            "table_delete",
            self.timeout,
            self.wire.delete_row(&self.name, row),
        )
        .await
        {
            Ok(()) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Builds and signs the upsert of `row` as [`Table::upsert_row`] would, without sending
    /// it: its body's length. For the `table_request` benchmarks.
    #[doc(hidden)]
    pub fn build_upsert(&self, row: &Row) -> Result<usize, StorageError> {
        let built = self.wire.upsert_request(self.name(), row, None);
        built
            .map(|request| request.body().len())
            .map_err(|kind| StorageError {
                op: "table_upsert",
                kind,
            })
    }

    /// Builds and signs the transaction [`Table::upsert_rows`] would send, without sending
    /// it: its body's length. For the `table_request` benchmarks.
    #[doc(hidden)]
    pub fn build_upsert_rows(&self, rows: &[Row]) -> Result<usize, StorageError> {
        let ops: Vec<WireOp<'_>> = rows.iter().map(WireOp::Replace).collect();
        let built = self.wire.transact_request(self.name(), &ops, None);
        built
            .map(|request| request.body().len())
            .map_err(|kind| StorageError {
                op: "table_batch",
                kind,
            })
    }

    async fn transact(&self, ops: Vec<WireOp<'_>>) -> Result<BatchOutcome, StorageError> {
        const OP: &str = "table_batch";
        let invalid = |why: String| StorageError {
            op: OP,
            kind: ErrorKind::Protocol(why),
        };
        let count = ops.len();
        if count > MAX_BATCH_OPERATIONS {
            return Err(invalid(format!("{count} operations in one batch")));
        }
        let Some(first) = ops.first() else {
            return Ok(BatchOutcome::Committed);
        };
        let pk = first.partition_key();
        if let Some(other) = ops.iter().map(WireOp::partition_key).find(|&p| p != pk) {
            return Err(invalid(format!(
                "batch spans partitions {pk:?} and {other:?}"
            )));
        }
        let conditional = matches!(first, WireOp::Delete(_));
        let statuses = measured(OP, self.timeout, self.wire.transact(self.name(), &ops)).await?;
        Ok(match statuses.iter().copied().find(|&s| s >= 300) {
            Some(status) => BatchOutcome::Rejected(Refusal::of(status, conditional)),
            None if statuses.len() == count => BatchOutcome::Committed,
            None => {
                return Err(invalid(format!(
                    "{} responses for {count} operations",
                    statuses.len(),
                )))
            }
        })
    }

    /// How many entities match `filter` (fetching only their keys).
    pub async fn count(&self, filter: &str) -> Result<usize, StorageError> {
        let mut n = 0;
        self.each_page(filter, Some("PartitionKey,RowKey"), None, |page| {
            n += page.len();
            true
        })
        .await?;
        Ok(n)
    }

    /// Deletes the whole table (for scratch tables).
    pub async fn delete_table(&self) -> Result<(), StorageError> {
        measured(
            "table_delete_table",
            self.timeout,
            self.wire.delete_table(&self.name),
        )
        .await
    }

    /// The first entity matching `filter`, in key order, or `None`.
    pub async fn first(&self, filter: &str) -> Result<Option<Entity>, StorageError> {
        let mut first = None;
        // A page may come back empty with a continuation; keep going until a row or the end.
        self.each_page(filter, None, Some(1), |page| {
            first = page.into_iter().next();
            first.is_none()
        })
        .await?;
        Ok(first)
    }

    /// The RowKey of every entity matching an OData `$filter` (all pages), fetching nothing
    /// else: a listing of a million rows costs their keys, not their properties.
    pub async fn row_keys(&self, filter: &str) -> Result<Vec<String>, StorageError> {
        let mut out = Vec::new();
        self.each_page(filter, Some("RowKey"), None, |page| {
            out.extend(
                page.into_iter()
                    .filter_map(|mut e| match e.remove("RowKey") {
                        Some(Value::String(k)) => Some(k),
                        _ => None,
                    }),
            );
            true
        })
        .await?;
        Ok(out)
    }

    /// The first `limit` entities matching an OData `$filter`, in key order (as many pages
    /// as that takes; a page may come back short, or empty with a continuation).
    pub async fn query_first(
        &self,
        filter: &str,
        limit: usize,
    ) -> Result<Vec<Entity>, StorageError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let page_size = u32::try_from(limit.min(1000)).unwrap_or(1000);
        self.each_page(filter, None, Some(page_size), |page| {
            out.extend(page.into_iter().take(limit - out.len()));
            out.len() < limit
        })
        .await?;
        Ok(out)
    }

    /// Every entity matching an OData `$filter` (all pages).
    pub async fn query(&self, filter: &str) -> Result<Vec<Entity>, StorageError> {
        let mut out = Vec::new();
        self.each_page(filter, None, None, |page| {
            out.extend(page);
            true
        })
        .await?;
        Ok(out)
    }

    /// Runs a query page by page (each page a timed call), handing each page to `on_page`
    /// until it returns `false` or the pages run out.
    async fn each_page(
        &self,
        filter: &str,
        select: Option<&str>,
        top: Option<u32>,
        mut on_page: impl FnMut(Vec<Entity>) -> bool,
    ) -> Result<(), StorageError> {
        let mut from = None;
        loop {
            let Page { entities, next } = measured(
                "table_query",
                self.timeout,
                self.wire
                    .query_page(&self.name, filter, select, top, from.as_ref()),
            )
            .await?;
            if !on_page(entities) || next.is_none() {
                return Ok(());
            }
            from = next;
        }
    }
}

fn keys<'e>(op: &'static str, entity: &'e Entity) -> Result<(&'e str, &'e str), StorageError> {
    let key = |name: &str| {
        entity
            .get(name)
            .and_then(Value::as_str)
            .ok_or(StorageError {
                op,
                kind: ErrorKind::Protocol(format!("entity has no string {name}")),
            })
    };
    Ok((key("PartitionKey")?, key("RowKey")?))
}
