//! Reading results back, and publishing device messages.

use infra::storage::{Account, Entity, StorageError};
use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use schemas::DeadLetter;
use std::time::Duration;

/// Every row of `table`.
pub async fn rows(account: &Account, table: &str) -> Result<Vec<Entity>, StorageError> {
    account.table(table).query("PartitionKey ne ''").await
}

/// Takes every dead letter off `queue` (deleting them), decoded.
pub async fn drain_dead_letters(account: &Account, queue: &str) -> Vec<DeadLetter> {
    drain_dead_letter_messages(account, queue)
        .await
        .into_iter()
        .flat_map(|(_, records)| records)
        .collect()
}

/// Takes every message off the dead-letter `queue` (deleting them): its text and its records.
pub async fn drain_dead_letter_messages(
    account: &Account,
    queue: &str,
) -> Vec<(String, Vec<DeadLetter>)> {
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
            let records =
                schemas::dead_letter::decode_message(&m.text).expect("dead letter decodes");
            q.delete(&m).await.expect("delete dead letter");
            out.push((m.text, records));
        }
    }
}

/// Publishes `(topic, payload)` pairs with QoS 1 and returns once the broker acknowledged all.
pub async fn publish_all(broker_port: u16, messages: Vec<(String, Vec<u8>)>) {
    let url = format!("mqtt://127.0.0.1:{broker_port}");
    let broker = infra::mqtt::Connection::plain(url.parse().expect("a broker URL"));
    publish_with(&broker, messages).await;
}

/// [`publish_all`] through any broker connection (TLS, credentials).
pub async fn publish_with(broker: &infra::mqtt::Connection, messages: Vec<(String, Vec<u8>)>) {
    let mut options = broker.options(client_id(broker, "pub"));
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

/// Publishes `messages` the way devices do through broker trouble: one publisher per chunk of
/// `lanes`, each message with QoS 1 and waiting for its PUBACK, `pause` between messages,
/// reconnecting whenever the connection fails. Returns the indexes of the messages the broker
/// acknowledged: those it took responsibility for, and the pipeline must store. A message
/// whose publish failed is not retried (a device would; here it is simply not counted).
pub async fn publish_through_trouble(
    broker_port: u16,
    messages: Vec<(String, Vec<u8>)>,
    lanes: usize,
    pause: Duration,
) -> Vec<usize> {
    let url = format!("mqtt://127.0.0.1:{broker_port}");
    let broker = infra::mqtt::Connection::plain(url.parse().expect("a broker URL"));
    let mut lanes_of: Vec<Vec<(usize, String, Vec<u8>)>> = vec![Vec::new(); lanes.max(1)];
    for (i, (topic, payload)) in messages.into_iter().enumerate() {
        lanes_of[i % lanes.max(1)].push((i, topic, payload));
    }
    let tasks: Vec<_> = lanes_of
        .into_iter()
        .map(|lane| {
            let broker = broker.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut link = None;
                for (i, topic, payload) in lane {
                    let (client, eventloop) = link.get_or_insert_with(|| {
                        AsyncClient::new(broker.options(crate::unique("steady")), 16)
                    });
                    client
                        .publish(topic, QoS::AtLeastOnce, false, payload)
                        .await
                        .expect("queue a publish");
                    let answer = tokio::time::timeout(Duration::from_secs(10), async {
                        loop {
                            match eventloop.poll().await {
                                Ok(Event::Incoming(Packet::PubAck(_))) => return true,
                                Ok(_) => {}
                                Err(_) => return false,
                            }
                        }
                    })
                    .await;
                    if answer == Ok(true) {
                        acked.push(i);
                    } else {
                        link = None;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    tokio::time::sleep(pause).await;
                }
                acked
            })
        })
        .collect();
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.expect("publisher task"));
    }
    acked.sort_unstable();
    acked
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

/// An account SAS for the emulator's account (signed with its well-known key) that holds
/// exactly `services` (`bqt` subset), `resource_types` (`sco` subset) and `permissions`
/// (`rwdlacup` subset) until `expiry`, as a connection string to `azurite`.
pub fn sas_connection_string(
    azurite: &crate::Azurite,
    services: &str,
    resource_types: &str,
    permissions: &str,
    expiry: time::OffsetDateTime,
) -> String {
    use base64::Engine;
    use hmac::Mac;
    const ACCOUNT: &str = "devstoreaccount1";
    const KEY: &str =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
    const VERSION: &str = "2019-12-12";
    let b64 = base64::engine::general_purpose::STANDARD;
    let expiry = expiry
        .to_offset(time::UtcOffset::UTC)
        .format(time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
        ))
        .expect("format the expiry");
    // Account SAS string-to-sign (versions before 2020-12-06): no encryption scope field.
    let to_sign = format!(
        "{ACCOUNT}\n{permissions}\n{services}\n{resource_types}\n\n{expiry}\n\n\n{VERSION}\n"
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&b64.decode(KEY).expect("key"))
        .expect("any key length");
    mac.update(to_sign.as_bytes());
    let sig = b64.encode(mac.finalize().into_bytes());
    let encode = |s: &str| {
        s.replace('%', "%25")
            .replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D")
            .replace(':', "%3A")
    };
    format!(
        "AccountName={ACCOUNT};\
         SharedAccessSignature=sv={VERSION}&ss={services}&srt={resource_types}&sp={permissions}&se={}&sig={};\
         QueueEndpoint=http://127.0.0.1:{}/{ACCOUNT};\
         TableEndpoint=http://127.0.0.1:{}/{ACCOUNT};\
         BlobEndpoint=http://127.0.0.1:{}/{ACCOUNT}",
        encode(&expiry),
        encode(&sig),
        azurite.queue_port,
        azurite.table_port,
        azurite.blob_port
    )
}

/// The `sig=` value of a SAS connection string, as it appears in it (URL-encoded).
pub fn sas_signature(connection_string: &str) -> String {
    connection_string
        .split(['&', ';'])
        .find_map(|p| p.strip_prefix("sig="))
        .expect("a signature")
        .to_owned()
}

/// Publishes one message with QoS 1 on a fresh connection and returns the broker's answer:
/// the PUBACK's reason, or the connection error that came instead.
pub async fn publish_one(
    broker: &infra::mqtt::Connection,
    topic: &str,
    payload: Vec<u8>,
) -> Result<rumqttc::v5::mqttbytes::v5::PubAckReason, rumqttc::v5::ConnectionError> {
    let (client, mut eventloop) = AsyncClient::new(broker.options(client_id(broker, "one")), 16);
    client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .expect("queue a publish");
    let outcome = loop {
        match tokio::time::timeout(Duration::from_secs(15), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => break Ok(ack.reason),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => break Err(e),
            Err(_) => panic!("no answer to a publish within 15 s"),
        }
    };
    let _ = client.disconnect().await;
    outcome
}

/// The client id a test connection uses: its user name when it has one (the secure broker
/// binds each device to its id as client id), else a fresh one.
fn client_id(broker: &infra::mqtt::Connection, prefix: &str) -> String {
    broker
        .username()
        .map_or_else(|| crate::unique(prefix), str::to_owned)
}

/// Subscribes to `filter` on a fresh connection and collects what arrives for `listen`:
/// the SUBACK's reason codes, and the topics of what was delivered.
pub async fn listen(
    broker: &infra::mqtt::Connection,
    filter: &str,
    listen: Duration,
) -> (Vec<SubscribeReasonCode>, Vec<String>) {
    let (client, mut eventloop) = AsyncClient::new(broker.options(client_id(broker, "sub")), 16);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("queue a subscribe");
    let (mut codes, mut got) = (Vec::new(), Vec::new());
    let until = tokio::time::Instant::now() + listen;
    loop {
        match tokio::time::timeout_at(until, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => codes.extend(ack.return_codes),
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                got.push(String::from_utf8_lossy(&p.topic).into_owned());
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    (codes, got)
}

/// Connects with `client_id` and returns the broker's verdict.
pub async fn connect_as(
    broker: &infra::mqtt::Connection,
    client_id: &str,
) -> Result<(), rumqttc::v5::ConnectionError> {
    let (_client, mut eventloop) = AsyncClient::new(broker.options(client_id), 16);
    loop {
        match tokio::time::timeout(Duration::from_secs(15), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => panic!("no answer to a connect within 15 s"),
        }
    }
}
