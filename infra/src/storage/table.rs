//! Azure Table Storage operations.

use super::wire::{Page, Row, RowRef, TableWire, Transacted, WireOp};
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

/// How [`Table::insert_or_update`] writes a row: as a new one (an insert, refused if the row
/// exists) or into an existing one (a merge, refused if it does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    New,
    Existing,
}

impl Presence {
    /// The other one.
    pub fn flipped(self) -> Self {
        match self {
            Self::New => Self::Existing,
            Self::Existing => Self::New,
        }
    }
}

/// What became of [`Table::insert_or_update`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// Every row written.
    Committed,
    /// The row at this index was presumed wrongly: it exists (for [`Presence::New`]) or does
    /// not (for [`Presence::Existing`]). Nothing was written; the rows before it were
    /// presumed rightly.
    Mistaken(usize),
    /// Refused for another reason; nothing was written.
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

    /// Deletes one row if it still has `etag`; one changed since it was read (412) or already
    /// gone is left as it is, for whoever changed it.
    pub async fn delete_if_unchanged(&self, row: &RowRef<'_>) -> Result<(), StorageError> {
        match self.delete(row).await {
            Err(e) if e.is_changed() => Ok(()),
            deleted => deleted.map(drop),
        }
    }

    /// Writes one entity only if it is as it was read: replaced if it still has `etag`,
    /// inserted if `etag` is `None` and no such row exists. `Ok(Some(etag))` with its new
    /// ETag; `Ok(None)` when the row changed, appeared or went meanwhile (read it again).
    pub async fn write_if(
        &self,
        entity: &Entity,
        etag: Option<&str>,
    ) -> Result<Option<String>, StorageError> {
        let row = row("table_write_if", entity)?;
        match measured(
            "table_write_if",
            self.timeout,
            self.wire.write_if(&self.name, &row, etag),
        )
        .await
        {
            Ok(etag) => Ok(Some(etag)),
            Err(e) if matches!(e.status(), Some(404 | 409 | 412)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The first `limit` entities matching an OData `$filter`, in key order, with only the
    /// properties `select` names (as `$select` does: comma-separated).
    pub async fn query_first_select(
        &self,
        filter: &str,
        select: &str,
        limit: usize,
    ) -> Result<Vec<Entity>, StorageError> {
        self.first_n(filter, Some(select), limit, Some).await
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
        let Some(first) = ops.first() else {
            return Ok(BatchOutcome::Committed);
        };
        self.check_batch(&ops)?;
        let conditional = matches!(first, WireOp::Delete(_));
        Ok(match self.send_transaction(&ops).await? {
            Ok(()) => BatchOutcome::Committed,
            Err((status, _)) => BatchOutcome::Rejected(Refusal::of(status, conditional)),
        })
    }

    /// Refuses, before sending anything, a batch of too many operations or of more than one
    /// partition (Azurite accepts what Azure rejects).
    fn check_batch(&self, ops: &[WireOp<'_>]) -> Result<(), StorageError> {
        let invalid = |why: String| StorageError {
            op: "table_batch",
            kind: ErrorKind::Protocol(why),
        };
        let count = ops.len();
        if count > MAX_BATCH_OPERATIONS {
            return Err(invalid(format!("{count} operations in one batch")));
        }
        let pk = ops.first().map(WireOp::partition_key).unwrap_or_default();
        if let Some(other) = ops.iter().map(WireOp::partition_key).find(|&p| p != pk) {
            return Err(invalid(format!(
                "batch spans partitions {pk:?} and {other:?}"
            )));
        }
        Ok(())
    }

    /// Checks and sends a transaction: `Err((status, failing index))` when refused.
    async fn send_transaction(
        &self,
        ops: &[WireOp<'_>],
    ) -> Result<Result<(), (u16, Option<usize>)>, StorageError> {
        const OP: &str = "table_batch";
        let invalid = |why: String| StorageError {
            op: OP,
            kind: ErrorKind::Protocol(why),
        };
        let count = ops.len();
        let Transacted {
            statuses,
            failed_at,
        } = measured(OP, self.timeout, self.wire.transact(self.name(), ops)).await?;
        match statuses.iter().copied().find(|&s| s >= 300) {
            Some(status) => Ok(Err((status, failed_at))),
            None if statuses.len() == count => Ok(Ok(())),
            None => Err(invalid(format!(
                "{} responses for {count} operations",
                statuses.len(),
            ))),
        }
    }

    /// Writes up to [`MAX_BATCH_OPERATIONS`] entities of one partition atomically, each as
    /// `presence` says: a new row is inserted (so a property it alone carries, such as when
    /// it was first seen, is never overwritten), an existing one merged into. A wrong guess
    /// comes back as [`Placed::Mistaken`] with the row's index, and nothing is written.
    pub async fn insert_or_update(
        &self,
        entities: &[(Presence, Entity)],
    ) -> Result<Placed, StorageError> {
        let rows: Vec<(Presence, Row)> = entities
            .iter()
            .map(|(p, e)| Ok((*p, row("table_batch", e)?)))
            .collect::<Result<_, StorageError>>()?;
        let ops: Vec<WireOp<'_>> = rows
            .iter()
            .map(|(presence, row)| match presence {
                Presence::New => WireOp::Insert(row),
                Presence::Existing => WireOp::Update(row),
            })
            .collect();
        if ops.is_empty() {
            return Ok(Placed::Committed);
        }
        self.check_batch(&ops)?;
        let (status, failed_at) = match self.send_transaction(&ops).await? {
            Ok(()) => return Ok(Placed::Committed),
            Err(refused) => refused,
        };
        // Without an index (or with one past the rows), a refusal that may be a presumption's
        // is reported as one for content: the rows one by one tell which.
        let Some(i) = failed_at
            .filter(|&i| i < rows.len())
            .or((rows.len() == 1).then_some(0))
        else {
            return Ok(Placed::Rejected(match status {
                404 | 409 => Refusal::Content(status),
                status => Refusal::of(status, false),
            }));
        };
        Ok(match (rows[i].0, status) {
            (Presence::New, 409) | (Presence::Existing, 404) => Placed::Mistaken(i),
            (_, status) => Placed::Rejected(Refusal::of(status, false)),
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

    /// The RowKeys of the first `limit` entities matching an OData `$filter`, in key order,
    /// fetching nothing else: a listing costs the rows' keys, not their properties. Fewer
    /// than `limit` means no more match (continuations are followed).
    pub async fn row_keys_first(
        &self,
        filter: &str,
        limit: usize,
    ) -> Result<Vec<String>, StorageError> {
        self.first_n(filter, Some("RowKey"), limit, |mut e| {
            match e.remove("RowKey") {
                Some(Value::String(k)) => Some(k),
                _ => None,
            }
        })
        .await
    }

    /// The first `limit` entities matching an OData `$filter`, in key order (as many pages
    /// as that takes; a page may come back short, or empty with a continuation).
    pub async fn query_first(
        &self,
        filter: &str,
        limit: usize,
    ) -> Result<Vec<Entity>, StorageError> {
        self.first_n(filter, None, limit, Some).await
    }

    /// The first `limit` of what `keep` makes of the entities matching `filter` (those it
    /// maps to `None` are skipped), in pages of at most `limit` (the service's largest is 1,000).
    async fn first_n<T>(
        &self,
        filter: &str,
        select: Option<&str>,
        limit: usize,
        mut keep: impl FnMut(Entity) -> Option<T>,
    ) -> Result<Vec<T>, StorageError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let page_size = u32::try_from(limit.min(1000)).unwrap_or(1000);
        self.each_page(filter, select, Some(page_size), |page| {
            for entity in page {
                if out.len() == limit {
                    break;
                }
                out.extend(keep(entity));
            }
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
