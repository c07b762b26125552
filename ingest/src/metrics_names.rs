//! Every metric ingest exports.

/// MQTT messages received (redeliveries included).
pub const RECEIVED: &str = "ingest_messages_received_total";
/// Of those, marked as redeliveries by the broker.
pub const REDELIVERED: &str = "ingest_messages_redelivered_total";
/// Payload bytes received.
pub const RECEIVED_BYTES: &str = "ingest_received_bytes_total";
/// Messages acknowledged to the broker (each one is in the queue).
pub const ACKED: &str = "ingest_messages_acked_total";
/// Redelivered messages the queue already held (written before their connection was lost):
/// acknowledged without being queued again.
pub const ALREADY_QUEUED: &str = "ingest_messages_already_queued_total";
/// Envelopes written to the queue.
pub const ENVELOPES: &str = "ingest_envelopes_written_total";
/// Messages per envelope.
pub const ENVELOPE_MESSAGES: &str = "ingest_envelope_messages";
/// Failed queue writes (each is retried).
pub const PUT_FAILURES: &str = "ingest_queue_put_failures_total";
/// Time to write one envelope, retries included.
pub const PUT_SECONDS: &str = "ingest_queue_put_seconds";
/// Messages received and not yet acknowledged.
pub const PENDING: &str = "ingest_pending_messages";
/// The Receive Maximum asked of the broker: the most messages it sends unacknowledged.
pub const RECEIVE_MAXIMUM: &str = "ingest_receive_maximum";
/// 1 once this replica has left its share group (SIGUSR1) and nothing has arrived for
/// [`crate::LEAVE_QUIET`]: it can be stopped for good.
pub const LEFT_SHARE_GROUP: &str = "ingest_left_share_group";
/// MQTT connection errors.
pub const CONNECTION_ERRORS: &str = "ingest_mqtt_connection_errors_total";
