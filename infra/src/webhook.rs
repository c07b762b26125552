//! An operator's webhook: JSON POSTed on the same HTTP stack as storage (reqwest on hyper,
//! rustls), with a timeout, never following a redirect. The URL may carry a token in its
//! path (Slack, Teams, Discord), query or user part, so it is only ever shown as its scheme,
//! host and port ([`Webhook::redacted`]), and no error from here names it.

use std::time::Duration;

#[derive(Clone)]
pub struct Webhook {
    client: reqwest::Client,
    url: reqwest::Url,
    redacted: String,
}

/// Shows only the redacted URL: the rest may hold a token.
impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.redacted)
            .finish()
    }
}

/// Why a delivery failed.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// It answered, but not with success.
    #[error("answered HTTP {0}")]
    Status(u16),
    /// No answer in time, or no connection.
    #[error("{0}")]
    Transport(String),
}

impl Webhook {
    /// A webhook at `url` (`http` or `https`), each POST given `timeout`. The error never
    /// repeats the URL.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err("must be an http:// or https:// URL with a host".into());
        }
        let redacted = format!(
            "{}://{}{}/…",
            parsed.scheme(),
            parsed.host_str().unwrap_or_default(),
            parsed.port().map(|p| format!(":{p}")).unwrap_or_default(),
        );
        let client = reqwest::Client::builder()
            .user_agent(concat!("telemetry-pipeline/", env!("CARGO_PKG_VERSION")))
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {}", e.without_url()))?;
        Ok(Self {
            client,
            url: parsed,
            redacted,
        })
    }

    /// The URL's scheme, host and port alone: what logs may show.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// POSTs `json`; success is any 2xx.
    pub async fn post(&self, json: String) -> Result<(), WebhookError> {
        let response = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(json)
            .send()
            .await
            .map_err(|e| WebhookError::Transport(e.without_url().to_string()))?;
        let status = response.status();
        // The body is not read: a webhook's answer says nothing the status does not.
        drop(response);
        if status.is_success() {
            Ok(())
        } else {
            Err(WebhookError::Status(status.as_u16()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_is_checked_and_shown_without_its_secrets() {
        let hook = Webhook::new(
            "https://user:pass@hooks.example.com:8443/alarms?token=s3cret",
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(hook.redacted(), "https://hooks.example.com:8443/…");
        assert!(!format!("{hook:?}").contains("s3cret"));
        for bad in ["ftp://example.com/x", "hooks.example.com/x", "https://"] {
            let error = Webhook::new(bad, Duration::from_secs(5)).unwrap_err();
            assert!(!error.contains("example"), "{error}");
        }
    }
}
