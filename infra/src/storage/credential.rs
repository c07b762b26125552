//! Microsoft Entra ID tokens for storage, so a service needs no key at all: workload identity
//! (AKS), managed identity, or the Azure CLI (a developer's `az login`).
//!
//! The credentials are `azure_identity`'s. In front of them sits one small piece of the
//! project's own, [`Cached`]: the table path (`wire.rs`) asks for a token on every request, and
//! `AzureCliCredential` caches nothing (it would run `az` per write), while the others fetch
//! under a lock that holds every caller for the length of a renewal. [`Cached`] serves the
//! token it holds until it is nearly expired, lets one caller renew while the others go on with
//! the valid token, and keeps serving that token when a renewal fails, until it expires. No
//! token or assertion is ever logged or put in an error.

use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::http::{ClientOptions, RetryOptions, Transport};
use azure_identity::{
    AzureCliCredential, ClientAssertionCredentialOptions, ManagedIdentityCredential,
    ManagedIdentityCredentialOptions, UserAssignedId, WorkloadIdentityCredential,
    WorkloadIdentityCredentialOptions,
};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use time::OffsetDateTime;

/// How a service authenticates to storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Auth {
    /// The connection string's account key or SAS.
    Key,
    /// AKS workload identity: `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`,
    /// `AZURE_FEDERATED_TOKEN_FILE` (re-read at least every 10 minutes),
    /// `AZURE_AUTHORITY_HOST` (https).
    WorkloadIdentity,
    /// The platform's managed identity (VM, App Service, Container Apps);
    /// `AZURE_CLIENT_ID` picks a user-assigned one.
    ManagedIdentity,
    /// The signed-in Azure CLI (`az account get-access-token`).
    AzureCli,
}

/// The scope of every storage token.
pub(super) const STORAGE_SCOPE: &str = "https://storage.azure.com/.default";
/// A token is renewed when it has less than this left.
const RENEW_BEFORE: time::Duration = time::Duration::minutes(5);
/// Bound on one token request.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The credential for `auth` from the environment, its requests sent on `transport`; `Err`
/// names what is missing. `None` for [`Auth::Key`].
pub(super) fn from_env(auth: Auth, transport: Transport) -> Result<Option<Arc<Cached>>, String> {
    let client_options = ClientOptions {
        transport: Some(transport),
        retry: RetryOptions::none(),
        ..Default::default()
    };
    let need = |name: &str| env(name).ok_or_else(|| format!("{name} is not set"));
    let failed = |e: azure_core::Error| super::full_chain(&e);
    let inner: Arc<dyn TokenCredential> = match auth {
        Auth::Key => return Ok(None),
        Auth::WorkloadIdentity => {
            // Named here: the crate's own errors do not say which setting is missing.
            for name in [
                "AZURE_TENANT_ID",
                "AZURE_CLIENT_ID",
                "AZURE_FEDERATED_TOKEN_FILE",
            ] {
                need(name)?;
            }
            WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
                credential_options: ClientAssertionCredentialOptions { client_options },
                ..Default::default()
            }))
            .map_err(failed)?
        }
        Auth::ManagedIdentity => {
            ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                user_assigned_id: env("AZURE_CLIENT_ID").map(UserAssignedId::ClientId),
                client_options,
            }))
            .map_err(failed)?
        }
        Auth::AzureCli => AzureCliCredential::new(None).map_err(failed)?,
    };
    Ok(Some(Arc::new(Cached::new(inner))))
}

/// A credential's token, cached: see the module's documentation.
#[derive(Debug)]
pub struct Cached {
    inner: Arc<dyn TokenCredential>,
    token: RwLock<Option<AccessToken>>,
    /// Held by the one caller renewing.
    renewing: tokio::sync::Mutex<()>,
}

impl Cached {
    pub(super) fn new(inner: Arc<dyn TokenCredential>) -> Self {
        Self {
            inner,
            token: RwLock::new(None),
            renewing: tokio::sync::Mutex::new(()),
        }
    }

    /// The cached token if it is still valid at `now` and has more than `margin` left.
    fn cached(&self, now: OffsetDateTime, margin: time::Duration) -> Option<AccessToken> {
        // A panic while holding this lock cannot leave the token half-written.
        let token = self.token.read().unwrap_or_else(|e| e.into_inner());
        token
            .as_ref()
            .filter(|t| t.expires_on - now > margin)
            .cloned()
    }

    /// The storage token: the cached one while it is fresh; else one caller renews while the
    /// others use the cached one while it is valid, and wait only when there is none.
    pub(super) async fn token(&self) -> azure_core::Result<AccessToken> {
        let now = OffsetDateTime::now_utc();
        if let Some(fresh) = self.cached(now, RENEW_BEFORE) {
            return Ok(fresh);
        }
        let _renewing = match self.renewing.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                if let Some(valid) = self.cached(now, time::Duration::ZERO) {
                    return Ok(valid);
                }
                let guard = self.renewing.lock().await;
                // Renewed by the caller this one waited for.
                if let Some(fresh) = self.cached(OffsetDateTime::now_utc(), RENEW_BEFORE) {
                    return Ok(fresh);
                }
                guard
            }
        };
        let fetched =
            tokio::time::timeout(TOKEN_TIMEOUT, self.inner.get_token(&[STORAGE_SCOPE], None)).await;
        let error = match fetched {
            Ok(Ok(token)) => {
                *self.token.write().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
                return Ok(token);
            }
            Ok(Err(e)) => super::full_chain(&e),
            Err(_) => format!("no token within {TOKEN_TIMEOUT:?}"),
        };
        match self.cached(OffsetDateTime::now_utc(), time::Duration::ZERO) {
            Some(valid) => {
                tracing::warn!(error = %error, "Cannot renew the storage token; using the current one until it expires.");
                Ok(valid)
            }
            None => Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::Credential,
                error,
            )),
        }
    }
}

#[async_trait::async_trait]
impl TokenCredential for Cached {
    /// Storage asks for its one scope only, so the cache holds one token.
    async fn get_token(
        &self,
        _scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        self.token().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Hands out tokens valid for `valid_for`, or fails, counting its fetches.
    #[derive(Debug)]
    struct Source {
        fetches: AtomicUsize,
        valid_for: time::Duration,
        fail: std::sync::atomic::AtomicBool,
        delay: Duration,
    }

    #[async_trait::async_trait]
    impl TokenCredential for Source {
        async fn get_token(
            &self,
            _: &[&str],
            _: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            let n = self.fetches.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            if self.fail.load(Ordering::SeqCst) {
                return Err(azure_core::Error::with_message(
                    azure_core::error::ErrorKind::Credential,
                    "the endpoint refused",
                ));
            }
            Ok(AccessToken::new(
                format!("token-{n}"),
                OffsetDateTime::now_utc() + self.valid_for,
            ))
        }
    }

    fn source(valid_for: time::Duration, delay: Duration) -> Arc<Source> {
        Arc::new(Source {
            fetches: AtomicUsize::new(0),
            valid_for,
            fail: false.into(),
            delay,
        })
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch() {
        let inner = source(time::Duration::hours(1), Duration::from_millis(50));
        let cached = Arc::new(Cached::new(inner.clone()));
        let calls = (0..8).map(|_| {
            let cached = cached.clone();
            tokio::spawn(async move { cached.token().await.map(|t| t.token.secret().to_owned()) })
        });
        for call in futures::future::join_all(calls).await {
            assert_eq!(call.expect("joined").expect("a token"), "token-0");
        }
        assert_eq!(inner.fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_valid_token_is_served_while_a_renewal_runs_and_after_it_fails() {
        // Valid for 4 minutes: inside the renewal window from the start.
        let inner = source(time::Duration::minutes(4), Duration::from_millis(200));
        let cached = Arc::new(Cached::new(inner.clone()));
        assert_eq!(
            cached.token().await.expect("first").token.secret(),
            "token-0"
        );
        inner.fail.store(true, Ordering::SeqCst);
        let renewing = {
            let cached = cached.clone();
            tokio::spawn(async move { cached.token().await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The renewal is under way: another caller is not held by it.
        let during = tokio::time::timeout(Duration::from_millis(100), cached.token())
            .await
            .expect("not held by the renewal")
            .expect("the valid token");
        assert_eq!(during.token.secret(), "token-0");
        // The renewal failed: its caller gets the still-valid token, not the error.
        let after = renewing.await.expect("joined").expect("the valid token");
        assert_eq!(after.token.secret(), "token-0");
        assert_eq!(inner.fetches.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn with_no_valid_token_a_failure_is_the_callers() {
        let inner = source(time::Duration::hours(1), Duration::ZERO);
        inner.fail.store(true, Ordering::SeqCst);
        let err = Cached::new(inner).token().await.expect_err("no token");
        assert!(err.to_string().contains("the endpoint refused"), "{err}");
    }

    #[test]
    fn missing_settings_are_named() {
        if env("AZURE_TENANT_ID").is_none() {
            let transport = super::super::http::Pooled::transport(reqwest::Client::new());
            let err = from_env(Auth::WorkloadIdentity, transport).unwrap_err();
            assert_eq!(err, "AZURE_TENANT_ID is not set");
        }
    }
}
