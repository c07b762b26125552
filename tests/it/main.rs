//! End-to-end and integration tests, in one binary so it links once.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod adapter;
mod alarms;
mod archive;
mod chaos;
mod cluster_broker;
mod completeness;
mod compose;
mod dashboard;
mod deadletter;
mod deploy;
mod failures;
mod k8s;
mod pipeline;
mod rollups;
mod scale;
mod secure;
mod shards;
mod simulator;

use infra::storage::Account;
use std::time::Duration;
use tests::{unique, Azurite, Mosquitto, Service};

/// Azurite, Mosquitto, ingest and processor, with names of their own.
#[derive(Debug)]
pub struct Pipeline {
    pub azurite: Azurite,
    pub mosquitto: Mosquitto,
    pub account: Account,
    pub queue: String,
    pub dead_letters: String,
    pub quarantine: String,
    pub table: String,
    pub devices: String,
    pub ingest: Service,
    pub processor: Service,
}

impl Pipeline {
    /// Starts everything; `None` (after a message) when the servers are not installed.
    pub async fn start(
        test: &str,
        ingest_env: &[(&str, String)],
        processor_env: &[(&str, String)],
    ) -> Option<Self> {
        if !tests::servers_available(test) {
            return None;
        }
        let (azurite, mosquitto) = tokio::join!(Azurite::start(), Mosquitto::start());
        let (queue, dead_letters, table) = (unique("ingest"), unique("dead"), unique("telemetry"));
        let devices = unique("devices");
        let quarantine = unique("quarantine");
        let storage = azurite.connection_string();
        let mut ienv = vec![
            ("MQTT_URL", mosquitto.url()),
            ("AZURE_STORAGE_CONNECTION_STRING", storage.clone()),
            ("INGEST_QUEUE_NAME", queue.clone()),
            ("INGEST_CLIENT_ID", unique("ingest")),
        ];
        ienv.extend(ingest_env.iter().cloned());
        let mut penv = vec![
            ("AZURE_STORAGE_CONNECTION_STRING", storage),
            ("PROCESSOR_QUEUE_NAME", queue.clone()),
            ("PROCESSOR_DEAD_LETTER_QUEUE", dead_letters.clone()),
            ("PROCESSOR_QUARANTINE_QUEUE", quarantine.clone()),
            ("PROCESSOR_TABLE_NAME", table.clone()),
            ("PROCESSOR_DEVICE_TABLE", devices.clone()),
            ("PROCESSOR_WORKERS", "4".into()),
        ];
        penv.extend(processor_env.iter().cloned());
        let (ingest, processor) = tokio::join!(
            Service::start("ingest", &ienv),
            Service::start("processor", &penv)
        );
        Some(Self {
            account: azurite.account(),
            azurite,
            mosquitto,
            queue,
            dead_letters,
            quarantine,
            table,
            devices,
            ingest,
            processor,
        })
    }

    /// Waits until the table holds `n` rows, and returns them.
    pub async fn wait_rows(&self, n: usize, timeout: Duration) -> Vec<infra::storage::Entity> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let last = match tests::storage::rows(&self.account, &self.table).await {
                Ok(rows) if rows.len() >= n => return rows,
                Ok(rows) => format!("{} rows", rows.len()),
                Err(e) => format!("query failed: {e}"),
            };
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {n} rows; last: {}; ingest received {}, acked {}; processor stored {}, dead-lettered {}, queue depth {}",
                last,
                self.ingest.metric("ingest_messages_received_total").await,
                self.ingest.metric("ingest_messages_acked_total").await,
                self.processor.metric("processor_readings_stored_total").await,
                self.processor.metric("processor_dead_letters_total").await,
                self.processor.metric("processor_queue_depth").await,
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
