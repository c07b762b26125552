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
        let connection_string = match (&self.account, self.auth, &self.connection_string_file) {
            (Some(name), auth, _) if auth != Auth::Key => named_account(name),
            (_, _, Some(path)) => {
                crate::mqtt::Secret::read_file("AZURE_STORAGE_CONNECTION_STRING_FILE", path)?
                    .expose()
                    .to_owned()
            }
            _ => self.connection_string.clone(),
        };
        self.open(&connection_string, grant)
    }

    /// Every shard's account, in shard order: those `shards` names, or this one alone.
    pub fn accounts(&self, shards: &ShardArgs, grant: Grant) -> Result<Vec<Account>, AccountError> {
        let Some(path) = &shards.shards_file else {
            return Ok(vec![self.account(grant)?]);
        };
        let text = crate::mqtt::Secret::read_file("STORAGE_SHARDS_FILE", path)?;
        let lines: Vec<&str> = text
            .expose()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        if lines.is_empty() {
            return Err(AccountError::Malformed(
                "STORAGE_SHARDS_FILE names no account".into(),
            ));
        }
        lines
            .iter()
            .enumerate()
            .map(|(shard, line)| {
                let connection_string = if line.contains('=') {
                    (*line).to_owned()
                } else if is_account_name(line) {
                    named_account(line)
                } else {
                    // Not echoed: it may be a wrapped piece of a key.
                    return Err(AccountError::Malformed(format!(
                        "STORAGE_SHARDS_FILE, shard {shard}: neither a connection string nor \
                         an account name (3 to 24 lowercase letters and digits)"
                    )));
                };
                // The line itself is never shown: it may hold a key.
                self.open(&connection_string, grant).map_err(|e| {
                    AccountError::Malformed(format!("STORAGE_SHARDS_FILE, shard {shard}: {e}"))
                })
            })
            .collect()
    }

    fn open(&self, connection_string: &str, grant: Grant) -> Result<Account, AccountError> {
        let ca =
            match &self.ca_file {
                Some(path) => Some(std::fs::read(path).map_err(|e| {
                    AccountError::Ca(format!("cannot read {}: {e}", path.display()))
                })?),
                None => None,
            };
        let access = Access {
            auth: self.auth,
            trusted_ca: ca.as_deref(),
            grant,
            create: self.create_missing,
        };
        Account::open(connection_string, self.storage_timeout, access)
    }
}

/// Whether `name` can be a storage account's name: 3 to 24 lowercase letters and digits.
fn is_account_name(name: &str) -> bool {
    (3..=24).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// The connection string of an account reached by name (Entra ID): its public endpoints.
fn named_account(name: &str) -> String {
    format!("DefaultEndpointsProtocol=https;AccountName={name};EndpointSuffix=core.windows.net")
}

/// Several storage accounts, each a shard holding the readings of the devices
/// `schemas::shard` assigns it, with its own ingest queue, dead-letter queue and tables.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ShardArgs {
    /// File naming the shards' storage accounts, one per line in shard order: a connection
    /// string (with its key or SAS, or naming endpoints only for Entra ID) or an account name
    /// (Entra ID); blank lines and `#` comments are skipped. Unset: one shard, the account
    /// of the storage flags. Lines are only ever appended: a shard's place decides its
    /// devices.
    #[arg(long = "storage-shards-file", env = "STORAGE_SHARDS_FILE")]
    pub shards_file: Option<std::path::PathBuf>,
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
        #[command(flatten)]
        shards: ShardArgs,
    }

    #[test]
    fn a_shards_file_names_each_shards_account_in_order_and_never_shows_a_key() {
        let dir = std::env::temp_dir().join(format!("shards-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("shards");
        std::fs::write(
            &file,
            "# shard 0\nAccountName=first;AccountKey=a2V5;EndpointSuffix=core.windows.net\n\n\
             AccountName=second;AccountKey=a2V5;EndpointSuffix=core.windows.net\n",
        )
        .unwrap();
        let flag = format!("--storage-shards-file={}", file.display());
        let cli = Cli::parse_from(["t", flag.as_str()]);
        let names: Vec<String> = cli
            .storage
            .accounts(&cli.shards, Grant::ALL)
            .expect("two shards")
            .iter()
            .map(|a| a.name().to_owned())
            .collect();
        assert_eq!(names, ["first", "second"]);

        std::fs::write(&file, "WrappedKeyPiece+Secret\n").unwrap();
        let err = cli
            .storage
            .accounts(&cli.shards, Grant::ALL)
            .expect_err("not an account name")
            .to_string();
        assert!(err.contains("shard 0") && !err.contains("Secret"), "{err}");

        std::fs::write(&file, "AccountName=first;AccountKey=not*base64secret\n").unwrap();
        let err = cli
            .storage
            .accounts(&cli.shards, Grant::ALL)
            .expect_err("a key that is not base64")
            .to_string();
        assert!(err.contains("shard 0") && !err.contains("secret"), "{err}");

        let cli = Cli::parse_from([
            "t",
            "--storage-connection-string=UseDevelopmentStorage=true",
        ]);
        let one = cli
            .storage
            .accounts(&cli.shards, Grant::ALL)
            .expect("one shard");
        assert_eq!(one.len(), 1, "no shards file: the one account");
        std::fs::remove_dir_all(dir).unwrap();
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
