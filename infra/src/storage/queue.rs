//! Azure Storage Queue operations.

use super::{call, ErrorKind, StorageError};
use azure_core::http::headers::HeaderName;
use azure_core::http::RequestContent;
use azure_storage_queue::models::{
    QueueClientGetPropertiesResultHeaders, QueueClientPeekMessagesOptions,
    QueueClientReceiveMessagesOptions, QueueClientSendMessageOptions,
    QueueClientUpdateMessageOptions, QueueMessage as Text,
};
use azure_storage_queue::QueueClient;
use std::sync::Arc;
use std::time::Duration;

/// The time-to-live this project gives every message: never expire (`-1`). Azure's default is
/// 7 days, which would silently delete a backlog.
pub const NEVER_EXPIRE: i32 = -1;

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

#[derive(Clone)]
pub struct Queue {
    name: String,
    client: Arc<QueueClient>,
    timeout: Duration,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn unix_ms(at: Option<time::OffsetDateTime>) -> Option<i64> {
    at.map(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
}

/// Seconds, as the queue service takes a visibility timeout.
fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

/// A message's text as the service takes it in a request body.
type Body = RequestContent<Text, azure_core::http::XmlFormat>;

fn text(text: String) -> Result<Body, ErrorKind> {
    Text {
        message_text: Some(text),
    }
    .try_into()
    .map_err(|e: azure_core::Error| ErrorKind::Protocol(super::full_chain(&e)))
}

impl Queue {
    pub(super) fn new(name: &str, client: QueueClient, timeout: Duration) -> Self {
        Self {
            name: name.to_owned(),
            client: Arc::new(client),
            timeout,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates the queue unless it exists.
    pub async fn create_if_missing(&self) -> Result<(), StorageError> {
        super::create_if_missing(call("queue_create", self.timeout, async {
            self.client.create(None).await.map(drop)
        }))
        .await
    }

    /// Appends a message that never expires.
    pub async fn put(&self, message: String) -> Result<(), StorageError> {
        const OP: &str = "queue_put";
        let body = text(message).map_err(|kind| StorageError { op: OP, kind })?;
        let options = QueueClientSendMessageOptions {
            message_time_to_live: Some(NEVER_EXPIRE),
            ..Default::default()
        };
        call(
            OP,
            self.timeout,
            self.client.send_message(body, Some(options)),
        )
        .await
        .map(drop)
    }

    /// Takes up to `max` (at most 32) messages, hiding them for `visibility`.
    pub async fn get(
        &self,
        max: u8,
        visibility: Duration,
    ) -> Result<Vec<QueueMessage>, StorageError> {
        const OP: &str = "queue_get";
        let options = QueueClientReceiveMessagesOptions {
            number_of_messages: Some(i32::from(max.clamp(1, 32))),
            visibility_timeout: Some(seconds(visibility)),
            ..Default::default()
        };
        let received = call(OP, self.timeout, async {
            self.client
                .receive_messages(Some(options))
                .await?
                .into_model()
        })
        .await?;
        let missing = |field: &str| StorageError {
            op: OP,
            kind: ErrorKind::Protocol(format!("a received message has no {field}")),
        };
        received
            .items
            .unwrap_or_default()
            .into_iter()
            .map(|m| {
                Ok(QueueMessage {
                    id: m.message_id.ok_or_else(|| missing("id"))?,
                    pop_receipt: m.pop_receipt.ok_or_else(|| missing("pop receipt"))?,
                    dequeue_count: m
                        .dequeue_count
                        .and_then(|n| u64::try_from(n).ok())
                        .unwrap_or(1),
                    expires_at_ms: unix_ms(m.expiration_time).unwrap_or(i64::MAX),
                    text: m.message_text.unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Deletes a message taken with [`Queue::get`]. Fails with 404 or 400
    /// (`PopReceiptMismatch`) when the message was deleted or retaken since.
    pub async fn delete(&self, message: &QueueMessage) -> Result<(), StorageError> {
        let delete = self
            .client
            .delete_message(&message.id, &message.pop_receipt, None);
        call("queue_delete", self.timeout, delete).await.map(drop)
    }

    /// Replaces the text of a message taken with [`Queue::get`] and hides it for `visibility`
    /// from now (zero makes it visible at once), in one atomic call. Returns the message as
    /// it now is: the old pop receipt no longer works. Fails like [`Queue::delete`] when the
    /// message was deleted or retaken since.
    pub async fn update(
        &self,
        message: &QueueMessage,
        new_text: String,
        visibility: Duration,
    ) -> Result<QueueMessage, StorageError> {
        let body = text(new_text.clone()).map_err(|kind| StorageError {
            op: "queue_update",
            kind,
        })?;
        let updated = self.set_visibility(message, Some(body), visibility).await?;
        Ok(QueueMessage {
            text: new_text,
            ..updated
        })
    }

    /// Hides a message taken with [`Queue::get`] for `visibility` from now (zero gives it
    /// back at once), its text untouched and not sent again. Returns `message` as given (its
    /// text too) with the new pop receipt; fails like [`Queue::delete`] when it was deleted
    /// or retaken since.
    pub async fn hide(
        &self,
        message: &QueueMessage,
        visibility: Duration,
    ) -> Result<QueueMessage, StorageError> {
        self.set_visibility(message, None, visibility).await
    }

    /// Update Message: a new visibility, and a new text if `body` (without one the service
    /// keeps the text).
    async fn set_visibility(
        &self,
        message: &QueueMessage,
        body: Option<Body>,
        visibility: Duration,
    ) -> Result<QueueMessage, StorageError> {
        const OP: &str = "queue_update";
        let options = QueueClientUpdateMessageOptions {
            queue_message: body,
            ..Default::default()
        };
        let response = call(
            OP,
            self.timeout,
            self.client.update_message(
                &message.id,
                &message.pop_receipt,
                seconds(visibility),
                Some(options),
            ),
        )
        .await?;
        // The new pop receipt comes in a header only.
        let pop_receipt = response
            .headers()
            .get_optional_str(&HeaderName::from_static("x-ms-popreceipt"))
            .map(str::to_owned)
            .ok_or(StorageError {
                op: OP,
                kind: ErrorKind::Protocol("an update answered no pop receipt".into()),
            })?;
        Ok(QueueMessage {
            pop_receipt,
            ..message.clone()
        })
    }

    /// When the first visible message was put (UTC milliseconds), `None` for none: the
    /// oldest waiting message, since messages are served roughly in order. One peek.
    pub async fn oldest_put_at(&self) -> Result<Option<i64>, StorageError> {
        let options = QueueClientPeekMessagesOptions {
            number_of_messages: Some(1),
            ..Default::default()
        };
        let peeked = call("queue_peek", self.timeout, async {
            self.client.peek_messages(Some(options)).await?.into_model()
        })
        .await?;
        Ok(peeked
            .items
            .unwrap_or_default()
            .first()
            .map(|m| unix_ms(m.insertion_time).unwrap_or(0)))
    }

    /// The service's approximate count of messages, visible or not.
    pub async fn approximate_depth(&self) -> Result<usize, StorageError> {
        let count = call("queue_metadata", self.timeout, async {
            self.client
                .get_properties(None)
                .await?
                .approximate_messages_count()
        })
        .await?;
        Ok(count.and_then(|n| usize::try_from(n).ok()).unwrap_or(0))
    }
}
