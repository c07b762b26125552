//! Which storage account to talk to, from an Azure connection string.

use super::credential::{self, Auth, Cached};
use super::sas::{Grant, Minter, Sas, SasPolicy};
use super::wire::{Credential, TableWire};
use super::{blob::Container, queue::Queue, table::Table, AccountError};
use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, RetryOptions, Url};
use azure_storage_blob::{BlobContainerClient, BlobContainerClientOptions};
use azure_storage_queue::{QueueClient, QueueClientOptions};
use std::sync::Arc;
use std::time::Duration;

/// The connection string for the local emulator, and the default everywhere.
pub const DEVELOPMENT_STORAGE: &str = "UseDevelopmentStorage=true";

const EMULATOR_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's published, well-known key; not a secret.
const EMULATOR_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

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

/// The settings of a connection string, by key (case as [`KNOWN_KEYS`] spells it).
#[derive(Default)]
struct Settings<'a>(Vec<(&'static str, &'a str)>);

impl<'a> Settings<'a> {
    fn get(&self, key: &str) -> Option<&'a str> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

/// Reads the `Key=value;...` string. Errors name the part at fault, never a value: the string
/// holds the account key or SAS.
fn parse(s: &str) -> Result<Settings<'_>, AccountError> {
    let mut settings = Settings::default();
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
            Some(k) => settings.0.push((k, value.trim())),
        }
    }
    Ok(settings)
}

/// How the SDK's clients authenticate.
#[derive(Clone)]
enum Sdk {
    /// A SAS added to each request.
    Sas(Arc<SasPolicy>),
    /// An Entra ID token.
    Token(Arc<Cached>),
}

/// A storage account: credentials plus the queue, table and blob endpoints.
#[derive(Clone)]
pub struct Account {
    account: String,
    queue_endpoint: String,
    table_endpoint: String,
    blob_endpoint: String,
    queue_url: Url,
    blob_url: Url,
    sdk: Sdk,
    /// The SDK clients' options: the pooled transport, no SDK retries, the SAS policy.
    options: ClientOptions,
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

/// How a service reaches an account, besides the connection string.
#[derive(Debug, Clone, Copy)]
pub struct Access<'a> {
    pub auth: Auth,
    /// PEM: CAs the storage endpoints' certificates may come from, besides the public roots.
    pub trusted_ca: Option<&'a [u8]>,
    /// What a SAS minted from an account key allows on queues and blobs.
    pub grant: Grant,
    /// Whether that SAS may also create queues and containers (`STORAGE_CREATE_MISSING`).
    pub create: bool,
}

impl Access<'_> {
    /// The account key or SAS, everything on queues and blobs: the operator's own access.
    pub const FULL: Access<'static> = Access {
        auth: Auth::Key,
        trusted_ca: None,
        grant: Grant::ALL,
        create: true,
    };
}

impl Account {
    /// Reads an Azure Storage connection string: `UseDevelopmentStorage=true` (optionally with
    /// `DevelopmentStorageProxyUri`), account name and key, or a SAS, with either explicit
    /// `QueueEndpoint`/`TableEndpoint`/`BlobEndpoint` or `DefaultEndpointsProtocol` + `EndpointSuffix`.
    /// With the full access of [`Access::FULL`].
    pub fn from_connection_string(s: &str, timeout: Duration) -> Result<Self, AccountError> {
        Self::open(s, timeout, Access::FULL)
    }

    /// Like [`Account::from_connection_string`], reaching the account as `access` says: with
    /// an Entra ID method the string gives only the account and endpoints (no key).
    pub fn open(s: &str, timeout: Duration, access: Access<'_>) -> Result<Self, AccountError> {
        let http = super::http::client(access.trusted_ca).map_err(AccountError::Ca)?;
        let transport = super::http::Pooled::transport(http.clone());
        let token =
            credential::from_env(access.auth, transport.clone()).map_err(AccountError::Entra)?;
        let settings = parse(s)?;
        let (account, key_or_sas, queue_endpoint, table_endpoint, blob_endpoint);
        if settings
            .get("UseDevelopmentStorage")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            if token.is_some() {
                return Err(AccountError::Entra(
                    "it needs https endpoints: set AZURE_STORAGE_ACCOUNT, or a connection string \
                     with the account's endpoints"
                        .to_owned(),
                ));
            }
            let host = settings
                .get("DevelopmentStorageProxyUri")
                .unwrap_or("http://127.0.0.1")
                .trim_end_matches('/');
            account = EMULATOR_ACCOUNT.to_owned();
            key_or_sas = KeyOrSas::Key(EMULATOR_KEY);
            queue_endpoint = format!("{host}:10001/{EMULATOR_ACCOUNT}");
            table_endpoint = format!("{host}:10002/{EMULATOR_ACCOUNT}");
            blob_endpoint = format!("{host}:10000/{EMULATOR_ACCOUNT}");
        } else {
            account = settings
                .get("AccountName")
                .map(str::to_owned)
                .or_else(|| {
                    settings
                        .get("QueueEndpoint")
                        .and_then(account_from_endpoint)
                })
                .ok_or(AccountError::Missing("AccountName"))?;
            key_or_sas = match (
                &token,
                settings.get("AccountKey"),
                settings.get("SharedAccessSignature"),
            ) {
                (Some(_), _, _) => KeyOrSas::Neither,
                (None, Some(key), _) => KeyOrSas::Key(key),
                (None, None, Some(sas)) => KeyOrSas::Sas(sas),
                (None, None, None) => {
                    return Err(AccountError::Missing("AccountKey or SharedAccessSignature"))
                }
            };
            let protocol = match settings.get("DefaultEndpointsProtocol") {
                Some(p) if p.eq_ignore_ascii_case("http") => "http",
                _ => "https",
            };
            let suffix = settings.get("EndpointSuffix").unwrap_or("core.windows.net");
            let endpoint = |key: &str, service: &str| {
                settings.get(key).map_or_else(
                    || format!("{protocol}://{account}.{service}.{suffix}"),
                    |e| e.trim_end_matches('/').to_owned(),
                )
            };
            queue_endpoint = endpoint("QueueEndpoint", "queue");
            table_endpoint = endpoint("TableEndpoint", "table");
            blob_endpoint = endpoint("BlobEndpoint", "blob");
        }
        let url = |service: &str, endpoint: &str| {
            let url = Url::parse(endpoint)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && !u.cannot_be_a_base())
                .ok_or_else(|| {
                    AccountError::Malformed(format!("the {service} endpoint is not an http(s) URL"))
                })?;
            // A bearer token is the account's access for its lifetime: never in cleartext.
            if token.is_some() && url.scheme() != "https" {
                return Err(AccountError::Entra(format!(
                    "a token is sent only over https, and the {service} endpoint is not https"
                )));
            }
            Ok(url)
        };
        let queue_url = url("queue", &queue_endpoint)?;
        url("table", &table_endpoint)?;
        let blob_url = url("blob", &blob_endpoint)?;
        let (sdk, wire_credential) = match (token, key_or_sas) {
            (Some(token), _) => (Sdk::Token(token.clone()), Credential::Token(token)),
            (None, KeyOrSas::Key(key)) => {
                let minter = Minter::new(&account, key, access.grant, access.create)
                    .map_err(AccountError::Malformed)?;
                (
                    Sdk::Sas(Arc::new(SasPolicy(Arc::new(Sas::Minted(Box::new(minter)))))),
                    Credential::key(&account, key).map_err(AccountError::Malformed)?,
                )
            }
            (None, KeyOrSas::Sas(sas)) => {
                let sas = sas.trim_start_matches('?');
                (
                    Sdk::Sas(Arc::new(SasPolicy(Arc::new(Sas::Given(sas.to_owned()))))),
                    Credential::sas(sas),
                )
            }
            (None, KeyOrSas::Neither) => {
                return Err(AccountError::Missing("AccountKey or SharedAccessSignature"))
            }
        };
        let wire = TableWire::new(http, &account, &table_endpoint, wire_credential)
            .map_err(AccountError::Malformed)?
            .with_direct(super::pool::Pool::for_endpoint(
                &table_endpoint,
                access.trusted_ca,
            )?);
        let mut options = ClientOptions {
            transport: Some(transport),
            retry: RetryOptions::none(),
            ..Default::default()
        };
        if let Sdk::Sas(policy) = &sdk {
            options.per_try_policies.push(policy.clone());
        }
        Ok(Self {
            account,
            queue_endpoint,
            table_endpoint,
            blob_endpoint,
            queue_url,
            blob_url,
            sdk,
            options,
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

    pub fn blob_endpoint(&self) -> &str {
        &self.blob_endpoint
    }

    /// `endpoint/name`, the URL of a queue or container.
    fn url(endpoint: &Url, name: &str) -> Url {
        let mut url = endpoint.clone();
        // An http(s) URL always has path segments (checked at open).
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push(name);
        }
        url
    }

    fn credential(&self) -> Option<Arc<dyn TokenCredential>> {
        match &self.sdk {
            Sdk::Token(token) => Some(token.clone()),
            Sdk::Sas(_) => None,
        }
    }

    /// A handle on queue `name` (nothing is sent).
    pub fn queue(&self, name: &str) -> Queue {
        let options = QueueClientOptions {
            client_options: self.options.clone(),
            ..Default::default()
        };
        let url = Self::url(&self.queue_url, name);
        // Fails only for a URL that cannot be a base, or a token over http: `open` refused both.
        let client = QueueClient::new(url, self.credential(), Some(options))
            .expect("an https or tokenless queue URL");
        Queue::new(name, client, self.timeout)
    }

    /// A handle on blob container `name` (nothing is sent).
    pub fn container(&self, name: &str) -> Container {
        let options = BlobContainerClientOptions {
            client_options: self.options.clone(),
            ..Default::default()
        };
        let url = Self::url(&self.blob_url, name);
        // Fails only for a URL that cannot be a base, or a token over http: `open` refused both.
        let client = BlobContainerClient::new(url, self.credential(), Some(options))
            .expect("an https or tokenless container URL");
        Container::new(name, client, self.timeout)
    }

    /// A handle on table `name` (nothing is sent).
    pub fn table(&self, name: &str) -> Table {
        Table::new(name, self.wire.clone(), self.timeout)
    }
}

/// The connection string's secret, unless a token takes its place.
enum KeyOrSas<'a> {
    Key(&'a str),
    Sas(&'a str),
    Neither,
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
        let open = |s: &str| {
            let access = Access {
                auth: Auth::AzureCli,
                ..Access::FULL
            };
            Account::open(s, Duration::from_secs(1), access)
        };
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
