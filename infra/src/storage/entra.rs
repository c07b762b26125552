//! Microsoft Entra ID tokens for storage, so a service needs no key at all: workload identity
//! (AKS), managed identity, or the Azure CLI (a developer's `az login`).
//!
//! These are the project's own small credentials, not `azure_identity` 0.21: that crate reads
//! the federated token file once (AKS rotates it about hourly; fixed only in 0.22, which needs
//! the new `azure_core`), offers system-assigned managed identity only, and pulls a dozen
//! crates. Tokens are cached until five minutes before they expire. No token, assertion or
//! response body is ever logged or put in an error: errors carry the HTTP status and the
//! service's error code and description.

use azure_core::auth::{AccessToken, TokenCredential};
use azure_core::error::{Error, ErrorKind};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;
use time::OffsetDateTime;

/// How a service authenticates to storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Auth {
    /// The connection string's account key or SAS.
    Key,
    /// AKS workload identity: `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`,
    /// `AZURE_FEDERATED_TOKEN_FILE` (re-read for every token), `AZURE_AUTHORITY_HOST`.
    WorkloadIdentity,
    /// The platform's managed identity (VM, App Service, Container Apps, Arc);
    /// `AZURE_CLIENT_ID` picks a user-assigned one.
    ManagedIdentity,
    /// The signed-in Azure CLI (`az account get-access-token`).
    AzureCli,
}

/// A token is renewed when it has less than this left.
const RENEW_BEFORE: Duration = Duration::from_secs(300);
/// Bound on one token request.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
enum Source {
    Workload {
        authority: String,
        tenant: String,
        client_id: String,
        token_file: PathBuf,
    },
    Managed {
        /// App Service style endpoint and its header, or none for the VM's IMDS.
        endpoint: Option<(String, String)>,
        client_id: Option<String>,
    },
    Cli,
}

/// A token source with its cache.
#[derive(Debug)]
pub(super) struct Entra {
    source: Source,
    http: reqwest::Client,
    cache: tokio::sync::Mutex<Option<AccessToken>>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Entra {
    /// The credential for `auth` from the environment; `Err` names what is missing.
    pub(super) fn from_env(auth: Auth) -> Result<Self, String> {
        let need = |name: &str| env(name).ok_or_else(|| format!("{name} is not set"));
        let source = match auth {
            Auth::Key => return Err("not an Entra ID method".to_owned()),
            Auth::WorkloadIdentity => Source::Workload {
                authority: env("AZURE_AUTHORITY_HOST")
                    .unwrap_or_else(|| "https://login.microsoftonline.com".to_owned())
                    .trim_end_matches('/')
                    .to_owned(),
                tenant: need("AZURE_TENANT_ID")?,
                client_id: need("AZURE_CLIENT_ID")?,
                token_file: need("AZURE_FEDERATED_TOKEN_FILE")?.into(),
            },
            Auth::ManagedIdentity => Source::Managed {
                endpoint: env("IDENTITY_ENDPOINT").zip(env("IDENTITY_HEADER")),
                client_id: env("AZURE_CLIENT_ID"),
            },
            Auth::AzureCli => Source::Cli,
        };
        let http = reqwest::Client::builder()
            .timeout(TOKEN_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot build the token client: {e}"))?;
        Ok(Self {
            source,
            http,
            cache: tokio::sync::Mutex::default(),
        })
    }

    async fn fetch(&self, scope: &str) -> Result<AccessToken, String> {
        match &self.source {
            Source::Workload {
                authority,
                tenant,
                client_id,
                token_file,
            } => {
                // Read every time: the platform rotates it.
                let assertion = tokio::fs::read_to_string(token_file).await.map_err(|e| {
                    format!(
                        "cannot read AZURE_FEDERATED_TOKEN_FILE ({}): {e}",
                        token_file.display()
                    )
                })?;
                let form = [
                    ("client_id", client_id.as_str()),
                    ("scope", scope),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", assertion.trim()),
                    ("grant_type", "client_credentials"),
                ];
                let url = format!("{authority}/{tenant}/oauth2/v2.0/token");
                let request = self.http.post(&url).form(&form);
                token(request, "the Entra ID token endpoint").await
            }
            Source::Managed {
                endpoint,
                client_id,
            } => {
                let resource = scope.trim_end_matches("/.default");
                let mut query = vec![("resource", resource)];
                if let Some(id) = client_id {
                    query.push(("client_id", id));
                }
                let request = match endpoint {
                    Some((url, header)) => self
                        .http
                        .get(url)
                        .query(&[("api-version", "2019-08-01")])
                        .query(&query)
                        .header("X-IDENTITY-HEADER", header),
                    None => self
                        .http
                        .get("http://169.254.169.254/metadata/identity/oauth2/token")
                        .query(&[("api-version", "2018-02-01")])
                        .query(&query)
                        .header("Metadata", "true"),
                };
                token(request, "the managed identity endpoint").await
            }
            Source::Cli => {
                let out = tokio::process::Command::new("az")
                    .args(["account", "get-access-token", "--output", "json", "--scope"])
                    .arg(scope)
                    .kill_on_drop(true)
                    .output();
                let out = tokio::time::timeout(TOKEN_TIMEOUT, out)
                    .await
                    .map_err(|_| "the Azure CLI gave no token within 30 s".to_owned())?
                    .map_err(|e| format!("cannot run the Azure CLI (az): {e}"))?;
                if !out.status.success() {
                    let why = String::from_utf8_lossy(&out.stderr);
                    let why = why.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
                    return Err(format!(
                        "az account get-access-token failed ({}): {}; run `az login`",
                        out.status,
                        why.chars().take(200).collect::<String>()
                    ));
                }
                parse(&out.stdout).ok_or_else(|| {
                    "the Azure CLI's answer has no accessToken and expires_on (Azure CLI 2.54 or newer is needed)".to_owned()
                })
            }
        }
    }
}

/// Sends a token request and reads `access_token` with `expires_on` or `expires_in`.
async fn token(request: reqwest::RequestBuilder, what: &str) -> Result<AccessToken, String> {
    let response = request
        .send()
        .await
        .map_err(|e| format!("cannot reach {what}: {}", e.without_url()))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("cannot read {what}'s answer: {}", e.without_url()))?;
    if !status.is_success() {
        // The error code and description say why (AADSTS...); never the body as a whole.
        let json: Value = serde_json::from_slice(&body).unwrap_or_default();
        let text = |k: &str| json.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let description: String = text("error_description").chars().take(300).collect();
        return Err(format!(
            "{what} answered HTTP {status}: {} {description}",
            text("error")
        ));
    }
    parse(&body).ok_or_else(|| format!("{what}'s answer has no access token"))
}

/// A token answer from any of the three sources: `access_token` or `accessToken`, with
/// `expires_on` (Unix seconds, number or string) or `expires_in` (seconds from now).
fn parse(body: &[u8]) -> Option<AccessToken> {
    let json: Value = serde_json::from_slice(body).ok()?;
    let token = json
        .get("access_token")
        .or_else(|| json.get("accessToken"))?
        .as_str()?
        .to_owned();
    let seconds = |v: &Value| v.as_i64().or_else(|| v.as_str()?.parse().ok());
    let expires_on = match json.get("expires_on").and_then(seconds) {
        Some(at) => OffsetDateTime::from_unix_timestamp(at).ok()?,
        None => {
            OffsetDateTime::now_utc()
                + time::Duration::seconds(json.get("expires_in").and_then(seconds)?)
        }
    };
    Some(AccessToken::new(token, expires_on))
}

#[async_trait::async_trait]
impl TokenCredential for Entra {
    async fn get_token(&self, scopes: &[&str]) -> azure_core::Result<AccessToken> {
        let mut cache = self.cache.lock().await;
        if let Some(token) = cache.as_ref() {
            if token.expires_on - OffsetDateTime::now_utc() > RENEW_BEFORE {
                return Ok(token.clone());
            }
        }
        let scope = scopes
            .first()
            .copied()
            .unwrap_or("https://storage.azure.com/.default");
        let token = self
            .fetch(scope)
            .await
            .map_err(|why| Error::message(ErrorKind::Credential, why))?;
        *cache = Some(token.clone());
        Ok(token)
    }

    async fn clear_cache(&self) -> azure_core::Result<()> {
        *self.cache.lock().await = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_answers_of_every_source_are_read() {
        let cli = br#"{"accessToken":"t1","expires_on":1900000000,"subscription":"s","tenant":"t","tokenType":"Bearer"}"#;
        let t = parse(cli).unwrap();
        assert_eq!(
            (t.token.secret(), t.expires_on.unix_timestamp()),
            ("t1", 1_900_000_000)
        );
        let managed = br#"{"access_token":"t2","expires_on":"1900000001","resource":"r","token_type":"Bearer"}"#;
        assert_eq!(
            parse(managed).unwrap().expires_on.unix_timestamp(),
            1_900_000_001
        );
        let workload = br#"{"access_token":"t3","expires_in":3599,"token_type":"Bearer"}"#;
        let left = parse(workload).unwrap().expires_on - OffsetDateTime::now_utc();
        assert!(left > time::Duration::seconds(3500), "{left}");
        assert!(parse(br#"{"error":"invalid_client"}"#).is_none());
    }

    #[test]
    fn missing_settings_are_named() {
        if env("AZURE_TENANT_ID").is_none() {
            let err = Entra::from_env(Auth::WorkloadIdentity).unwrap_err();
            assert_eq!(err, "AZURE_TENANT_ID is not set");
        }
    }
}
