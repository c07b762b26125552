//! Flags shared by several services. Every flag has an environment variable; the defaults
//! point at a local emulator and broker, so a newcomer needs none of them.

use crate::serve::LogFormat;
use crate::storage::{Account, AccountError, DEVELOPMENT_STORAGE};
use std::time::Duration;

/// The storage account.
#[derive(Clone, clap::Args)]
pub struct StorageArgs {
    /// Azure Storage connection string (account key or SAS). The default is the local Azurite
    /// emulator.
    #[arg(
        long = "storage-connection-string",
        env = "AZURE_STORAGE_CONNECTION_STRING",
        default_value = DEVELOPMENT_STORAGE,
        hide_env_values = true,
        hide_default_value = false
    )]
    pub connection_string: String,

    /// Create missing queues, tables and containers at start-up. Turn off for a credential
    /// that holds only data rights; a create refused with 403 is skipped either way.
    #[arg(long, env = "STORAGE_CREATE_MISSING", default_value_t = true, action = clap::ArgAction::Set)]
    pub create_missing: bool,

    /// Bound on each storage request.
    #[arg(long, env = "STORAGE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub storage_timeout: Duration,
}

impl std::fmt::Debug for StorageArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageArgs")
            .field("connection_string", &"<redacted>")
            .field("create_missing", &self.create_missing)
            .field("storage_timeout", &self.storage_timeout)
            .finish()
    }
}

impl StorageArgs {
    pub fn account(&self) -> Result<Account, AccountError> {
        Account::from_connection_string(&self.connection_string, self.storage_timeout)
    }
}

/// Log output.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format. `RUST_LOG` sets the level filter (default `info`).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
}
