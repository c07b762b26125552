//! `dashboard`: the pipeline's data for people, read-only.
//!
//! One binary serves a versioned HTTP API ([`api`]) and the dashboard page that uses it
//! (`src/page/`, embedded: nothing is loaded from elsewhere at run time). The API reads the
//! device table, the telemetry table and the archive; a reading's range may span both, and
//! [`readings`] merges them by timestamp, so an answer does not depend on whether the archiver
//! has run. Every parameter is validated ([`params`]) before it reaches a storage filter; errors
//! are `application/problem+json` ([`problem`]). A bearer token guards `/api/` when set.

mod api;
mod config;
mod gaps;
mod http;
mod merge;
mod metrics_names;
mod params;
mod problem;
mod readings;
mod views;

pub use config::Config;
pub use http::SHUTDOWN_GRACE;

use anyhow::Context;
use infra::serve::Health;
use infra::storage::{Grant, Table};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What the dashboard may do with a SAS minted from an account key: read queue depths and
/// archives.
const STORAGE_GRANT: Grant = Grant {
    services: "qb",
    resource_types: "co",
    permissions: "r",
};

/// How often readiness re-checks that storage answers.
const STORAGE_CHECK: Duration = Duration::from_secs(15);

/// Serves until `shutdown`, then lets requests in progress finish.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let token = config.token()?;
    anyhow::ensure!(
        token.as_ref().is_none_or(|t| !t.expose().is_empty()),
        "the dashboard token (DASHBOARD_TOKEN or DASHBOARD_TOKEN_FILE) is empty: set one, or unset both"
    );
    if token.is_none() && !config.addr.ip().is_loopback() {
        tracing::warn!(addr = %config.addr, "The API is served beyond this machine without a token; set DASHBOARD_TOKEN_FILE.");
    }
    let accounts = config.storage.accounts(&config.shards, STORAGE_GRANT)?;
    let health = Health::new("checking storage");
    let shards: Vec<api::Shard> = accounts
        .iter()
        .map(|account| api::Shard {
            devices: account.table(&config.device_table),
            rollups: account.table(&config.rollup_table),
            alarms: account.table(&config.alarm_table),
            sources: readings::Sources {
                table: account.table(&config.table_name),
                archive: account.container(&config.archive_container),
                layout: config.archive_layout.clone(),
                format: config.archive_format,
            },
            ingest: account.queue(&config.ingest_queue),
            dead_letters: account.queue(&config.dead_letter_queue),
        })
        .collect();
    let device_tables: Vec<Table> = shards.iter().map(|s| s.devices.clone()).collect();
    let layout = schemas::shard::Layout {
        shards: shards.len(),
        earlier: config.shards_before.0.clone(),
    };
    layout
        .check()
        .map_err(|e| anyhow::anyhow!("DASHBOARD_SHARDS_BEFORE: {e}"))?;
    let app = Arc::new(http::App {
        api: api::Api {
            layout,
            shards,
            max_raw_range: config.max_raw_range,
            max_readings: config.max_readings.max(1),
            silent_after: config.silent_after,
            readings_permits: tokio::sync::Semaphore::new(api::READINGS_AT_ONCE),
        },
        token,
        health: health.clone(),
        metrics: infra::serve::metrics_handle(),
    });
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("cannot listen on {} (DASHBOARD_ADDR)", config.addr))?;
    let bound = listener.local_addr()?;
    tracing::info!(
        url = %format!("http://{bound}/"),
        token = app.token.is_some(),
        "Dashboard serving."
    );
    tokio::spawn(watch_storage(device_tables, health, shutdown.clone()));
    http::serve(listener, app, shutdown).await;
    tracing::info!("Dashboard stopped.");
    Ok(())
}

/// Keeps readiness true to whether every shard's device table answers.
async fn watch_storage(devices: Vec<Table>, health: Health, shutdown: CancellationToken) {
    let filter = format!("PartitionKey eq '{}'", schemas::device::PARTITION);
    loop {
        let mut trouble = Vec::new();
        for (shard, table) in devices.iter().enumerate() {
            match table.first(&filter).await {
                // A table the processor has not created yet is an empty answer, not trouble.
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) if devices.len() == 1 => trouble.push(format!("storage: {e}")),
                Err(e) => trouble.push(format!("storage of shard {shard}: {e}")),
            }
        }
        // Ready while any shard answers: a device of a shard that does not gets an error of
        // its own, the lists say which shards are missing.
        if trouble.len() < devices.len() {
            if !trouble.is_empty() {
                tracing::warn!(trouble = %trouble.join("; "), "A shard's storage does not answer.");
            }
            health.set_ready();
        } else {
            health.set_not_ready(trouble.join("; "));
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(STORAGE_CHECK) => {}
        }
    }
}
