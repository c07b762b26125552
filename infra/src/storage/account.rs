//! Which storage account to talk to, from an Azure connection string.

use super::entra::{Auth, Entra};
use super::wire::{Credential, TableWire};
use super::{blob::Container, queue::Queue, table::Table};
use azure_data_tables::prelude::TableServiceClient;
use azure_storage::{CloudLocation, ConnectionString, StorageCredentials};
use azure_storage_blobs::prelude::BlobServiceClient;
use azure_storage_queues::QueueServiceClient;
use std::sync::Arc;
use std::time::Duration;

/// The connection string for the local emulator, and the default everywhere.
pub const DEVELOPMENT_STORAGE: &str = "UseDevelopmentStorage=true";

const EMULATOR_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's published, well-known key; not a secret.
const EMULATOR_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A connection string that cannot be used. Names the part at fault, never a value: the
/// string holds the account key or SAS.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("the storage connection string is malformed: {0}")]
    Malformed(String),
    #[error("the storage connection string has no {0}")]
    Missing(&'static str),
    #[error("Entra ID authentication: {0}")]
    Entra(String),
    #[error("AZURE_STORAGE_CA_FILE: {0}")]
    Ca(String),
    /// `AZURE_STORAGE_CONNECTION_STRING_FILE` cannot be read (names the file, never its
    /// contents).
    #[error(transparent)]
    File(#[from] crate::mqtt::ConfigError),
}

/// The settings a connection string may hold.
const KNOWN_KEYS: &[&str] = &[
    "UseDevelopmentStorage",
    "DevelopmentStorageProxyUri",
    "DefaultEndpointsProtocol",
    "AccountName",
    "AccountKey",
    "SharedAccessSignature",
    "EndpointSuffix",
    "BlobEndpoint",
    "QueueEndpoint",
    "TableEndpoint",
    "FileEndpoint",
    "BlobSecondaryEndpoint",
    "QueueSecondaryEndpoint",
    "TableSecondaryEndpoint",
    "FileSecondaryEndpoint",
];

/// Checks the `Key=value;...` shape before the SDK sees the string: the SDK's own parse
/// errors quote the whole string, key included.
fn check_shape(s: &str) -> Result<(), AccountError> {
    for (n, part) in s.split(';').map(str::trim).enumerate() {
        if part.is_empty() {
            continue;
        }
        let Some((key, value)) = part.split_once('=') else {
            return Err(AccountError::Malformed(format!(
                "part {} is not Key=value",
                n + 1
            )));
        };
        match KNOWN_KEYS
            .iter()
            .find(|k| k.eq_ignore_ascii_case(key.trim()))
        {
            None => {
                // Name the key only when it cannot be a pasted secret.
                let printable = key.len() <= 32 && key.chars().all(|c| c.is_ascii_alphabetic());
                return Err(AccountError::Malformed(if printable {
                    format!("part {} has the unknown key {key:?}", n + 1)
                } else {
                    format!("part {} has an unknown key", n + 1)
                }));
            }
            Some(k) if value.trim().is_empty() => {
                return Err(AccountError::Malformed(format!("{k} is empty")))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// A storage account: credentials plus the queue and table endpoints.
#[derive(Clone)]
pub struct Account {
    account: String,
    queue_endpoint: String,
    table_endpoint: String,
    blob_endpoint: String,
    queues: QueueServiceClient,
    tables: TableServiceClient,
    blobs: BlobServiceClient,
    wire: Arc<TableWire>,
    timeout: Duration,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Credentials are deliberately left out.
        f.debug_struct("Account")
            .field("account", &self.account)
            .field("queue_endpoint", &self.queue_endpoint)
            .field("table_endpoint", &self.table_endpoint)
            .field("blob_endpoint", &self.blob_endpoint)
            .finish_non_exhaustive()
    }
}

impl Account {
    /// Reads an Azure Storage connection string: `UseDevelopmentStorage=true` (optionally with
    /// `DevelopmentStorageProxyUri`), account name and key, or a SAS, with either explicit
    /// `QueueEndpoint`/`TableEndpoint`/`BlobEndpoint` or `DefaultEndpointsProtocol` + `EndpointSuffix`.
    pub fn from_connection_string(s: &str, timeout: Duration) -> Result<Self, AccountError> {
        Self::open(s, timeout, Auth::Key, None)
    }

    /// Like [`Account::from_connection_string`], authenticating with `auth`: with an Entra ID
    /// method the string gives only the account and endpoints (no key), and
    /// `trusted_ca` (PEM) adds CAs the storage endpoints' certificates may come from.
    pub fn open(
        s: &str,
        timeout: Duration,
        auth: Auth,
        trusted_ca: Option<&[u8]>,
    ) -> Result<Self, AccountError> {
        let token = match auth {
            Auth::Key => None,
            other => Some(Entra::from_env(other).map_err(AccountError::Entra)?),
        };
        let entra = token.is_some();
        check_shape(s)?;
        let cs = ConnectionString::new(s).map_err(|_| {
            AccountError::Malformed("the SDK cannot read it (check each Key=value)".to_owned())
        })?;
        let (account, credentials, wire, queue_endpoint, table_endpoint, blob_endpoint);
        if cs.use_development_storage == Some(true) {
            if token.is_some() {
                return Err(AccountError::Entra(
                    "it needs https endpoints: set AZURE_STORAGE_ACCOUNT, or a connection string \
                     with the account's endpoints"
                        .to_owned(),
                ));
            }
            let host = cs
                .development_storage_proxy_uri
                .unwrap_or("http://127.0.0.1")
                .trim_end_matches('/');
            account = EMULATOR_ACCOUNT.to_owned();
            credentials = StorageCredentials::access_key(EMULATOR_ACCOUNT, EMULATOR_KEY);
            wire =
                Credential::key(EMULATOR_ACCOUNT, EMULATOR_KEY).map_err(AccountError::Malformed)?;
            queue_endpoint = format!("{host}:10001/{EMULATOR_ACCOUNT}");
            table_endpoint = format!("{host}:10002/{EMULATOR_ACCOUNT}");
            blob_endpoint = format!("{host}:10000/{EMULATOR_ACCOUNT}");
        } else {
            account = cs
                .account_name
                .map(str::to_owned)
                .or_else(|| cs.queue_endpoint.and_then(account_from_endpoint))
                .ok_or(AccountError::Missing("AccountName"))?;
            (credentials, wire) = match (token, cs.account_key, cs.sas) {
                (Some(token), _, _) => {
                    let token = Arc::new(token);
                    (
                        StorageCredentials::token_credential(token.clone()),
                        Credential::Token(token),
                    )
                }
                (None, Some(key), _) => (
                    StorageCredentials::access_key(account.clone(), key.to_owned()),
                    Credential::key(&account, key).map_err(AccountError::Malformed)?,
                ),
                (None, None, Some(sas)) => (
                    StorageCredentials::sas_token(sas).map_err(|_| {
                        AccountError::Malformed("SharedAccessSignature cannot be read".to_owned())
                    })?,
                    Credential::sas(sas),
                ),
                (None, None, None) => {
                    return Err(AccountError::Missing("AccountKey or SharedAccessSignature"))
                }
            };
            let protocol = match cs.default_endpoints_protocol {
                Some(azure_storage::EndpointProtocol::Http) => "http",
                _ => "https",
            };
            let suffix = cs.endpoint_suffix.unwrap_or("core.windows.net");
            let default = |service: &str| format!("{protocol}://{account}.{service}.{suffix}");
            queue_endpoint = cs
                .queue_endpoint
                .map_or_else(|| default("queue"), str::to_owned);
            table_endpoint = cs
                .table_endpoint
                .map_or_else(|| default("table"), str::to_owned);
            blob_endpoint = cs
                .blob_endpoint
                .map_or_else(|| default("blob"), str::to_owned);
        }
        if entra {
            // A bearer token is the account's access for its lifetime: never in cleartext.
            let endpoints = [
                ("queue", &queue_endpoint),
                ("table", &table_endpoint),
                ("blob", &blob_endpoint),
            ];
            if let Some((service, _)) = endpoints.iter().find(|(_, e)| {
                !e.get(..8)
                    .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
            }) {
                return Err(AccountError::Entra(format!(
                    "a token is sent only over https, and the {service} endpoint is not https"
                )));
            }
        }
        let location = |uri: &str| CloudLocation::Custom {
            account: account.clone(),
            uri: uri.trim_end_matches('/').to_owned(),
        };
        let http = super::http::client(trusted_ca).map_err(AccountError::Ca)?;
        let wire = TableWire::new(http.clone(), &account, &table_endpoint, wire)
            .map_err(AccountError::Malformed)?
            .with_direct(super::h1::H1::for_endpoint(&table_endpoint, trusted_ca)?);
        let transport = azure_core::TransportOptions::new(super::http::Pooled::shared(http));
        let queues = azure_storage_queues::QueueServiceClientBuilder::with_location(
            location(&queue_endpoint),
            credentials.clone(),
        )
        .retry(azure_core::RetryOptions::none())
        .transport(transport.clone())
        .build();
        let tables = azure_data_tables::clients::TableServiceClientBuilder::with_location(
            location(&table_endpoint),
            credentials.clone(),
        )
        .retry(azure_core::RetryOptions::none())
        .transport(transport.clone())
        .build();
        let blobs = azure_storage_blobs::prelude::ClientBuilder::with_location(
            location(&blob_endpoint),
            credentials.clone(),
        )
        .retry(azure_core::RetryOptions::none())
        .transport(transport.clone())
        .blob_service_client();
        Ok(Self {
            account,
            queue_endpoint,
            table_endpoint,
            blob_endpoint,
            queues,
            tables,
            blobs,
            wire: Arc::new(wire),
            timeout,
        })
    }

    pub fn name(&self) -> &str {
        &self.account
    }

    pub fn queue_endpoint(&self) -> &str {
        &self.queue_endpoint
    }

    pub fn table_endpoint(&self) -> &str {
        &self.table_endpoint
    }

    /// A handle on queue `name` (nothing is sent).
    pub fn queue(&self, name: &str) -> Queue {
        Queue::new(self.queues.queue_client(name), self.timeout)
    }

    pub fn blob_endpoint(&self) -> &str {
        &self.blob_endpoint
    }

    /// A handle on blob container `name` (nothing is sent).
    pub fn container(&self, name: &str) -> Container {
        Container::new(self.blobs.container_client(name), self.timeout)
    }

    /// A handle on table `name` (nothing is sent).
    pub fn table(&self, name: &str) -> Table {
        Table::new(
            self.tables.table_client(name),
            self.wire.clone(),
            self.timeout,
        )
    }
}

/// `https://acct.queue.core.windows.net` -> `acct`, for SAS strings without `AccountName`.
fn account_from_endpoint(endpoint: &str) -> Option<String> {
    let host = endpoint.split("://").nth(1)?.split(['/', ':']).next()?;
    let first = host.split('.').next()?;
    (!first.is_empty() && host.contains('.')).then(|| first.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Account {
        Account::from_connection_string(s, Duration::from_secs(1)).unwrap()
    }

    #[test]
    fn development_storage_maps_to_the_emulator() {
        let a = parse(DEVELOPMENT_STORAGE);
        assert_eq!(a.name(), "devstoreaccount1");
        assert_eq!(
            a.queue_endpoint(),
            "http://127.0.0.1:10001/devstoreaccount1"
        );
        assert_eq!(
            a.table_endpoint(),
            "http://127.0.0.1:10002/devstoreaccount1"
        );
        assert_eq!(a.blob_endpoint(), "http://127.0.0.1:10000/devstoreaccount1");
        let proxied = parse("UseDevelopmentStorage=true;DevelopmentStorageProxyUri=http://azurite");
        assert_eq!(
            proxied.queue_endpoint(),
            "http://azurite:10001/devstoreaccount1"
        );
    }

    #[test]
    fn real_accounts_and_explicit_endpoints() {
        let a = parse("DefaultEndpointsProtocol=https;AccountName=acme;AccountKey=a2V5;EndpointSuffix=core.windows.net");
        assert_eq!(a.queue_endpoint(), "https://acme.queue.core.windows.net");
        assert_eq!(a.table_endpoint(), "https://acme.table.core.windows.net");
        assert_eq!(a.blob_endpoint(), "https://acme.blob.core.windows.net");
        let e = parse("AccountName=devstoreaccount1;AccountKey=a2V5;QueueEndpoint=http://127.0.0.1:5/devstoreaccount1;TableEndpoint=http://127.0.0.1:6/devstoreaccount1");
        assert_eq!(e.table_endpoint(), "http://127.0.0.1:6/devstoreaccount1");
        let sas = parse("QueueEndpoint=https://acme.queue.core.windows.net;TableEndpoint=https://acme.table.core.windows.net;SharedAccessSignature=sv=2022-11-02&ss=qt&sig=abc");
        assert_eq!(sas.name(), "acme");
        assert!(!format!("{sas:?}").contains("sig=abc"));
    }

    #[test]
    fn malformed_strings_name_the_part_never_the_value() {
        let key = "c2VjcmV0LWtleS12YWx1ZQ==";
        let cases = [
            (
                format!("AccountName=acme;{}", key.trim_end_matches('=')),
                "part 2 is not Key=value",
            ),
            (
                format!("AccountName=acme;AcountKey={key}"),
                "unknown key \"AcountKey\"",
            ),
            (
                format!("AccountName=acme;{key}=x"),
                "part 2 has an unknown key",
            ),
            (
                "AccountName=acme;AccountKey=".to_owned(),
                "AccountKey is empty",
            ),
        ];
        for (s, expected) in cases {
            let err = Account::from_connection_string(&s, Duration::from_secs(1))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{err}");
            assert!(!err.contains("c2VjcmV0"), "{err}");
        }
    }

    #[test]
    fn entra_tokens_go_only_to_https_endpoints() {
        let open = |s: &str| Account::open(s, Duration::from_secs(1), Auth::AzureCli, None);
        let https = "AccountName=acme;EndpointSuffix=core.windows.net";
        assert!(open(https).is_ok());
        for (s, service) in [
            (format!("{https};DefaultEndpointsProtocol=http"), "queue"),
            (
                format!("{https};TableEndpoint=http://10.0.0.5:10002/acme"),
                "table",
            ),
            (
                format!("{https};BlobEndpoint=HTTP://blob.example/acme"),
                "blob",
            ),
        ] {
            let err = open(&s).unwrap_err().to_string();
            assert!(
                err.contains(&format!("the {service} endpoint is not https")),
                "{err}"
            );
        }
    }

    #[test]
    fn missing_credentials_are_named() {
        let err = Account::from_connection_string("AccountName=acme", Duration::from_secs(1))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("AccountKey or SharedAccessSignature"),
            "{err}"
        );
    }
}
