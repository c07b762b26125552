//! Reading results back, and publishing device messages.

use infra::storage::{Account, Entity, StorageError};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use schemas::DeadLetter;
use std::time::Duration;

/// Every row of `table`.
pub async fn rows(account: &Account, table: &str) -> Result<Vec<Entity>, StorageError> {
    account.table(table).query("PartitionKey ne ''").await
}

/// Takes every dead letter off `queue` (deleting them), decoded.
pub async fn drain_dead_letters(account: &Account, queue: &str) -> Vec<DeadLetter> {
    let q = account.queue(queue);
    let mut out = Vec::new();
    loop {
        let batch = q
            .get(32, Duration::from_secs(60))
            .await
            .expect("read dead letters");
        if batch.is_empty() {
            return out;
        }
        for m in batch {
            out.extend(schemas::dead_letter::decode_message(&m.text).expect("dead letter decodes"));
            q.delete(&m).await.expect("delete dead letter");
        }
    }
}

/// Publishes `(topic, payload)` pairs with QoS 1 and returns once the broker acknowledged all.
pub async fn publish_all(broker_port: u16, messages: Vec<(String, Vec<u8>)>) {
    let mut options = MqttOptions::new(crate::unique("pub"), "127.0.0.1", broker_port);
    options.set_max_packet_size(Some(1024 * 1024));
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    let total = messages.len();
    let sender = tokio::spawn(async move {
        for (topic, payload) in messages {
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .expect("queue a publish");
        }
        client
    });
    let mut acked = 0;
    while acked < total {
        match tokio::time::timeout(Duration::from_secs(30), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("publisher connection failed after {acked}/{total} acks: {e}"),
            Err(_) => panic!("publisher stalled after {acked}/{total} acks"),
        }
    }
    let client = sender.await.expect("sender task");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), eventloop.poll()).await;
}

/// A valid single reading for `device` at `at_ms`.
pub fn reading(device: &str, at_ms: i64, seq: u64) -> Vec<u8> {
    format!(
        r#"{{"deviceId":"{device}","timestamp":"{}","seq":{seq},"temperature":{:.1},"humidity":50,"pressure":1013.5}}"#,
        schemas::timefmt::format_ms(at_ms),
        20.0 + (seq % 10) as f64 / 10.0
    )
    .into_bytes()
}

pub fn topic(device: &str) -> String {
    schemas::reading::topic_for("devices", device)
}
