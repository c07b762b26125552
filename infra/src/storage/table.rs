//! Azure Table Storage operations.

use super::{call, ErrorKind, StorageError};
use azure_data_tables::prelude::*;
use futures::StreamExt;
use serde_json::{Map, Value};
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
    /// The service refused the transaction; nothing was written. The SDK reports this as
    /// success, so it is read from the per-operation statuses here.
    Rejected { status: u16 },
}

#[derive(Debug, Clone)]
pub struct Table {
    client: TableClient,
    timeout: Duration,
}

impl Table {
    pub(super) fn new(client: TableClient, timeout: Duration) -> Self {
        Self { client, timeout }
    }

    /// Creates the table unless it exists.
    pub async fn create_if_missing(&self) -> Result<(), StorageError> {
        super::create_if_missing(
            "table_create",
            self.timeout,
            self.client.create().into_future(),
        )
        .await
    }

    /// Inserts or replaces one entity, keyed by its `PartitionKey` and `RowKey`.
    pub async fn upsert(&self, entity: &Entity) -> Result<(), StorageError> {
        let (pk, rk) = keys("table_upsert", entity)?;
        let op = self
            .client
            .partition_key_client(pk)
            .entity_client(rk)
            .insert_or_replace(entity)
            .map_err(|e| StorageError::from_sdk("table_upsert", &e))?;
        call("table_upsert", self.timeout, op.into_future())
            .await
            .map(drop)
    }

    /// Inserts or replaces up to [`MAX_BATCH_OPERATIONS`] entities of one partition atomically.
    ///
    /// Refuses batches that span partitions or hold too many operations before sending
    /// anything: Azurite accepts mixed-partition batches that Azure rejects, so no emulator test
    /// would catch the mistake. Keeping within [`MAX_BATCH_BYTES`] is the caller's job (it has
    /// to measure entities anyway to chunk them); a batch over it comes back `Rejected`.
    pub async fn upsert_batch(&self, entities: &[Entity]) -> Result<BatchOutcome, StorageError> {
        const OP: &str = "table_batch";
        let invalid = |why: String| StorageError {
            op: OP,
            kind: ErrorKind::Protocol(why),
        };
        let Some(first) = entities.first() else {
            return Ok(BatchOutcome::Committed);
        };
        if entities.len() > MAX_BATCH_OPERATIONS {
            return Err(invalid(format!(
                "{} operations in one batch",
                entities.len()
            )));
        }
        let (pk, _) = keys(OP, first)?;
        let mut tx = self.client.partition_key_client(pk).transaction();
        for entity in entities {
            let (epk, rk) = keys(OP, entity)?;
            if epk != pk {
                return Err(invalid(format!(
                    "batch spans partitions {pk:?} and {epk:?}"
                )));
            }
            tx = tx
                .insert_or_replace(rk, entity)
                .map_err(|e| StorageError::from_sdk(OP, &e))?;
        }
        let response = call(OP, self.timeout, tx.into_future()).await?;
        let failed = response
            .operation_responses
            .iter()
            .map(|r| u16::from(r.status_code))
            .find(|&s| s >= 300);
        Ok(match failed {
            Some(status) => BatchOutcome::Rejected { status },
            None if response.operation_responses.len() == entities.len() => BatchOutcome::Committed,
            None => {
                return Err(invalid(format!(
                    "{} responses for {} operations",
                    response.operation_responses.len(),
                    entities.len()
                )))
            }
        })
    }

    /// Every entity matching an OData `$filter` (all pages).
    pub async fn query(&self, filter: &str) -> Result<Vec<Entity>, StorageError> {
        let mut pages = self
            .client
            .query()
            .filter(filter.to_owned())
            .into_stream::<Entity>();
        let mut out = Vec::new();
        while let Some(page) = call("table_query", self.timeout, async {
            pages.next().await.transpose()
        })
        .await?
        {
            out.extend(page.entities);
        }
        Ok(out)
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
