//! Flags shared by several services. Every flag has an environment variable; the defaults
//! point at a local emulator and broker, so a newcomer needs none of them.

use crate::serve::LogFormat;
use crate::storage::{Access, Account, AccountError, Auth, Grant, DEVELOPMENT_STORAGE};
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

    /// File holding the connection string (a mounted secret); wins over
    /// `AZURE_STORAGE_CONNECTION_STRING`, and keeps the key out of the environment. Trailing
    /// line breaks are ignored.
    #[arg(
        long = "storage-connection-string-file",
        env = "AZURE_STORAGE_CONNECTION_STRING_FILE"
    )]
    pub connection_string_file: Option<std::path::PathBuf>,

    /// How to authenticate: `key` (the connection string's account key or SAS), or a
    /// Microsoft Entra ID token with no key at all: `workload-identity` (AKS),
    /// `managed-identity`, `azure-cli`. With a token, the account comes from
    /// `AZURE_STORAGE_ACCOUNT`, or from a connection string that names endpoints only.
    #[arg(
        long = "storage-auth",
        env = "AZURE_STORAGE_AUTH",
        value_enum,
        default_value = "key"
    )]
    pub auth: Auth,

    /// Storage account name, for Entra ID (endpoints `https://<name>.<service>.core.windows.net`).
    #[arg(long = "storage-account", env = "AZURE_STORAGE_ACCOUNT")]
    pub account: Option<String>,

    /// PEM bundle of CAs trusted for the storage endpoints besides the public roots (a
    /// private endpoint, or an emulator behind TLS).
    #[arg(long = "storage-ca-file", env = "AZURE_STORAGE_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,

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
            .field("connection_string_file", &self.connection_string_file)
            .field("auth", &self.auth)
            .field("account", &self.account)
            .field("ca_file", &self.ca_file)
            .field("create_missing", &self.create_missing)
            .field("storage_timeout", &self.storage_timeout)
            .finish()
    }
}

impl StorageArgs {
    /// The account, reached as these flags say; a SAS minted from an account key allows
    /// `grant` on queues and blobs (and creating them, with `STORAGE_CREATE_MISSING`).
    pub fn account(&self, grant: Grant) -> Result<Account, AccountError> {
        let ca =
            match &self.ca_file {
                Some(path) => Some(std::fs::read(path).map_err(|e| {
                    AccountError::Ca(format!("cannot read {}: {e}", path.display()))
                })?),
                None => None,
            };
        let connection_string = match (&self.account, self.auth, &self.connection_string_file) {
            (Some(name), auth, _) if auth != Auth::Key => {
                format!("DefaultEndpointsProtocol=https;AccountName={name};EndpointSuffix=core.windows.net")
            }
            (_, _, Some(path)) => {
                crate::mqtt::Secret::read_file("AZURE_STORAGE_CONNECTION_STRING_FILE", path)?
                    .expose()
                    .to_owned()
            }
            _ => self.connection_string.clone(),
        };
        let access = Access {
            auth: self.auth,
            trusted_ca: ca.as_deref(),
            grant,
            create: self.create_missing,
        };
        Account::open(&connection_string, self.storage_timeout, access)
    }
}

/// Log output.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format. `RUST_LOG` sets the level filter (default `info`).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        storage: StorageArgs,
    }

    #[test]
    fn a_connection_string_file_wins_and_an_unreadable_one_is_named_not_shown() {
        let dir = std::env::temp_dir().join(format!("cs-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("connection-string");
        std::fs::write(
            &file,
            "AccountName=fromfile;AccountKey=a2V5;EndpointSuffix=core.windows.net\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "t",
            "--storage-connection-string=UseDevelopmentStorage=true",
            &format!("--storage-connection-string-file={}", file.display()),
        ]);
        let account = cli
            .storage
            .account(Grant::ALL)
            .expect("the file's connection string");
        assert_eq!(account.name(), "fromfile");

        let missing = dir.join("missing");
        let cli = Cli::parse_from([
            "t",
            &format!("--storage-connection-string-file={}", missing.display()),
        ]);
        let err = cli
            .storage
            .account(Grant::ALL)
            .expect_err("no such file")
            .to_string();
        assert!(
            err.contains("AZURE_STORAGE_CONNECTION_STRING_FILE") && err.contains("missing"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
