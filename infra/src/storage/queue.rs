//! Azure Storage Queue operations.

use super::{call, StorageError};
use azure_storage_queues::prelude::*;
use std::time::Duration;

/// The time-to-live this project gives every message: effectively never. Azure's default is
/// 7 days, which would silently delete a backlog; the REST API's `-1` ("never") cannot be
/// expressed through the SDK's `Duration`, so the largest positive value (68 years) stands in.
pub const NEVER_EXPIRE: Duration = Duration::from_secs(i32::MAX as u64);

/// A message taken from a queue; invisible to others until its visibility timeout ends.
#[derive(Debug, Clone)]
pub struct QueueMessage {
    pub id: String,
    pub pop_receipt: String,
    /// Deliveries so far, this one included.
    pub dequeue_count: u64,
    /// When the service will delete the message unread (UTC milliseconds).
    pub expires_at_ms: i64,
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct Queue {
    client: QueueClient,
    timeout: Duration,
}

impl Queue {
    pub(super) fn new(client: QueueClient, timeout: Duration) -> Self {
        Self { client, timeout }
    }

    pub fn name(&self) -> &str {
        self.client.queue_name()
    }

    /// Creates the queue unless it exists.
    pub async fn create_if_missing(&self) -> Result<(), StorageError> {
        super::create_if_missing(
            "queue_create",
            self.timeout,
            self.client.create().into_future(),
        )
        .await
    }

    /// Appends a message that never expires.
    pub async fn put(&self, text: String) -> Result<(), StorageError> {
        let put = self
            .client
            .put_message(text)
            .ttl(NEVER_EXPIRE)
            .into_future();
        call("queue_put", self.timeout, put).await.map(drop)
    }

    /// Takes up to `max` (at most 32) messages, hiding them for `visibility`.
    pub async fn get(
        &self,
        max: u8,
        visibility: Duration,
    ) -> Result<Vec<QueueMessage>, StorageError> {
        let number = NumberOfMessages::new(max.clamp(1, 32));
        let get = self
            .client
            .get_messages()
            .number_of_messages(number)
            .visibility_timeout(visibility)
            .into_future();
        let response = call("queue_get", self.timeout, get).await?;
        Ok(response
            .messages
            .into_iter()
            .map(|m| QueueMessage {
                id: m.message_id,
                pop_receipt: m.pop_receipt,
                dequeue_count: m.dequeue_count,
                expires_at_ms: i64::try_from(m.expiration_time.unix_timestamp_nanos() / 1_000_000)
                    .unwrap_or(i64::MAX),
                text: m.message_text,
            })
            .collect())
    }

    /// Deletes a message taken with [`Queue::get`]. Fails with 404 or 400
    /// (`PopReceiptMismatch`) when the message was deleted or retaken since.
    pub async fn delete(&self, message: &QueueMessage) -> Result<(), StorageError> {
        let receipt = self
            .client
            .pop_receipt_client(PopReceipt::new(&message.id, &message.pop_receipt));
        call("queue_delete", self.timeout, receipt.delete().into_future())
            .await
            .map(drop)
    }

    /// Replaces the text of a message taken with [`Queue::get`] and hides it for `visibility`
    /// from now (zero makes it visible at once), in one atomic call. Returns the message as
    /// it now is: the old pop receipt no longer works. Fails like [`Queue::delete`] when the
    /// message was deleted or retaken since.
    pub async fn update(
        &self,
        message: &QueueMessage,
        text: String,
        visibility: Duration,
    ) -> Result<QueueMessage, StorageError> {
        let receipt = self
            .client
            .pop_receipt_client(PopReceipt::new(&message.id, &message.pop_receipt));
        let update = receipt.update(text.clone(), visibility).into_future();
        let response = call("queue_update", self.timeout, update).await?;
        Ok(QueueMessage {
            pop_receipt: response.pop_receipt,
            text,
            ..message.clone()
        })
    }

    /// When the first visible message was put (UTC milliseconds), `None` for none: the
    /// oldest waiting message, since messages are served roughly in order. One peek.
    pub async fn oldest_put_at(&self) -> Result<Option<i64>, StorageError> {
        let peek = self
            .client
            .peek_messages()
            .number_of_messages(NumberOfMessages::new(1))
            .into_future();
        let response = call("queue_peek", self.timeout, peek).await?;
        Ok(response.messages.first().map(|m| {
            i64::try_from(m.insertion_time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
        }))
    }

    /// The service's approximate count of messages, visible or not.
    pub async fn approximate_depth(&self) -> Result<usize, StorageError> {
        let metadata = call(
            "queue_metadata",
            self.timeout,
            self.client.get_metadata().into_future(),
        )
        .await?;
        Ok(metadata.approximate_messages_count)
    }
}
