//! Service plumbing shared by every binary, and the only door to Azure Storage.
//!
//! - [`storage`]: the adapter. Nothing else in the workspace names an `azure_*` crate, so the
//!   SDK can be replaced here alone. It counts every request it makes, by kind.
//! - [`retry`]: the one backoff policy (exponential, full jitter, capped).
//! - [`serve`]: tracing setup, the Prometheus recorder, and the `/metrics` + `/healthz` +
//!   `/readyz` endpoint.
//! - [`shutdown`]: SIGINT/SIGTERM into a `CancellationToken`.
//! - [`mqtt`]: the broker connection every MQTT client shares: `mqtts://`, CA and client
//!   certificates, credentials, and one-line reasons for failed connections.
//! - [`cli`]: flags that several services share (storage account, observability).
//! - [`recent`]: a bounded memory of recent identities, for cheap duplicate suppression.

pub mod cli;
pub mod mqtt;
pub mod progress;
pub mod recent;
pub mod retry;
pub mod serve;
pub mod shutdown;
pub mod storage;
pub mod webhook;
