//! Microsoft Entra ID tokens for storage, so a service needs no key at all: workload identity
//! (AKS), managed identity, or the Azure CLI (a developer's `az login`).
//!
//! The credentials are `azure_identity`'s. In front of them sits one small piece of the
//! project's own, [`Cached`]: the table path (`wire.rs`) asks for a token on every request, and
//! `AzureCliCredential` caches nothing (it would run `az` per write), while the others fetch
//! under a lock that holds every caller for the length of a renewal. [`Cached`] serves the
//! token it holds until it is nearly expired, then renews on a task of its own (so no caller's
//! timeout cuts a renewal short) while every caller goes on with the valid token, keeps
//! serving that token when a renewal fails, until it expires, and renews at most every 30 s.
//! No token or assertion is ever logged or put in an error.

use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::http::{ClientOptions, RetryOptions, Transport};
use azure_identity::{
    AzureCliCredential, ClientAssertionCredentialOptions, ManagedIdentityCredential,
    ManagedIdentityCredentialOptions, UserAssignedId, WorkloadIdentityCredential,
    WorkloadIdentityCredentialOptions,
};
use std::sync::{Arc, Mutex};
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
    state: Arc<Mutex<State>>,
    /// Counts finished renewals, for callers with no valid token to wait on.
    renewed: tokio::sync::watch::Sender<u64>,
    /// [`RETRY_AFTER`], but in tests.
    retry_after: Duration,
}

#[derive(Debug, Default)]
struct State {
    token: Option<AccessToken>,
    /// A renewal runs (on a task of its own: no caller's timeout can cut it short).
    renewing: bool,
    /// When the last renewal began: the next waits [`RETRY_AFTER`].
    last_attempt: Option<std::time::Instant>,
    /// Why the last renewal failed, for callers with no valid token.
    last_error: Option<String>,
}

/// A renewal begins at most this often, whether the last one failed or brought a token that
/// is already due for renewal.
const RETRY_AFTER: Duration = Duration::from_secs(30);

impl Cached {
    pub(super) fn new(inner: Arc<dyn TokenCredential>) -> Self {
        Self {
            inner,
            state: Arc::default(),
            renewed: tokio::sync::watch::Sender::new(0),
            retry_after: RETRY_AFTER,
        }
    }

    fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-written.
        state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The storage token: the cached one while it is fresh. When it is due, a renewal starts
    /// on its own task (one at a time, at most every [`RETRY_AFTER`]) and every caller goes on
    /// with the cached token while it is valid; only a caller with no valid token waits for
    /// the renewal, or gets the last renewal's error.
    pub(super) async fn token(&self) -> azure_core::Result<AccessToken> {
        let mut renewed = self.renewed.subscribe();
        loop {
            let now = OffsetDateTime::now_utc();
            {
                let mut state = Self::lock(&self.state);
                let left_over = |margin| {
                    state
                        .token
                        .as_ref()
                        .filter(|t| t.expires_on - now > margin)
                        .cloned()
                };
                if let Some(fresh) = left_over(RENEW_BEFORE) {
                    return Ok(fresh);
                }
                let valid = left_over(time::Duration::ZERO);
                let due = state
                    .last_attempt
                    .is_none_or(|at| at.elapsed() >= self.retry_after);
                if !state.renewing && due {
                    state.renewing = true;
                    state.last_attempt = Some(std::time::Instant::now());
                    self.renew();
                }
                if let Some(valid) = valid {
                    return Ok(valid);
                }
                if !state.renewing {
                    let why = state
                        .last_error
                        .clone()
                        .unwrap_or_else(|| "no token yet".to_owned());
                    return Err(azure_core::Error::with_message(
                        azure_core::error::ErrorKind::Credential,
                        why,
                    ));
                }
                renewed.borrow_and_update();
            };
            // The sender lives as long as `self`, so this waits for the renewal's end.
            let _ = renewed.changed().await;
        }
    }

    /// Starts a renewal on a task of its own.
    fn renew(&self) {
        let (inner, state, renewed) =
            (self.inner.clone(), self.state.clone(), self.renewed.clone());
        tokio::spawn(async move {
            let fetched =
                tokio::time::timeout(TOKEN_TIMEOUT, inner.get_token(&[STORAGE_SCOPE], None)).await;
            {
                let mut state = Self::lock(&state);
                state.renewing = false;
                match fetched {
                    Ok(Ok(token)) => {
                        state.token = Some(token);
                        state.last_error = None;
                    }
                    failed => {
                        let error = match failed {
                            Ok(Err(e)) => super::full_chain(&e),
                            _ => format!("no token within {TOKEN_TIMEOUT:?}"),
                        };
                        let valid = state
                            .token
                            .as_ref()
                            .is_some_and(|t| t.expires_on > OffsetDateTime::now_utc());
                        if valid {
                            tracing::warn!(error = %error, "Cannot renew the storage token; using the current one until it expires.");
                        }
                        state.last_error = Some(error);
                    }
                }
            }
            renewed.send_modify(|n| *n += 1);
        });
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
        let cached = Cached {
            retry_after: Duration::ZERO,
            ..Cached::new(inner.clone())
        };
        assert_eq!(
            cached.token().await.expect("first").token.secret(),
            "token-0"
        );
        inner.fail.store(true, Ordering::SeqCst);
        // The caller that starts the renewal is not held by it, nor is any other.
        for _ in 0..3 {
            let now = tokio::time::timeout(Duration::from_millis(50), cached.token())
                .await
                .expect("not held by the renewal")
                .expect("the valid token");
            assert_eq!(now.token.secret(), "token-0");
        }
        // The renewal is under way on its own task: callers still go on, and start no other.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let during = tokio::time::timeout(Duration::from_millis(50), cached.token())
            .await
            .expect("not held by the renewal")
            .expect("the valid token");
        assert_eq!(during.token.secret(), "token-0");
        assert_eq!(
            inner.fetches.load(Ordering::SeqCst),
            2,
            "one renewal at a time"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The renewal failed: the still-valid token is served.
        let after = cached.token().await.expect("the valid token");
        assert_eq!(after.token.secret(), "token-0");
    }

    #[tokio::test]
    async fn a_renewal_outlives_the_caller_that_started_it() {
        let inner = source(time::Duration::hours(1), Duration::from_millis(300));
        let cached = Cached::new(inner.clone());
        let cut = tokio::time::timeout(Duration::from_millis(50), cached.token()).await;
        assert!(cut.is_err(), "the caller gave up");
        tokio::time::sleep(Duration::from_millis(400)).await;
        let token = tokio::time::timeout(Duration::from_millis(50), cached.token())
            .await
            .expect("already renewed")
            .expect("a token");
        assert_eq!(token.token.secret(), "token-0");
        assert_eq!(inner.fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn with_no_valid_token_a_failure_is_the_callers_and_is_not_retried_at_once() {
        let inner = source(time::Duration::hours(1), Duration::ZERO);
        inner.fail.store(true, Ordering::SeqCst);
        let cached = Cached::new(inner.clone());
        for _ in 0..3 {
            let err = cached.token().await.expect_err("no token");
            assert!(err.to_string().contains("the endpoint refused"), "{err}");
        }
        assert_eq!(inner.fetches.load(Ordering::SeqCst), 1, "one try per 30 s");
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
