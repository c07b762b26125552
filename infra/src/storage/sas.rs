//! Shared access signatures for the SDK's queue and blob clients.
//!
//! The official clients take an Entra ID token or a SAS in the URL; they have no shared key.
//! With an account key (the emulator's included) the adapter mints an account SAS from it:
//! short-lived ([`LIFETIME`]), renewed well before it expires, and limited to the [`Grant`]
//! the service asked for, so a SAS seen anywhere is worth less than the key. A SAS from the
//! connection string is used as given. Either way the signature is added to each request by
//! [`SasPolicy`], never to a client's URL, so no error or `Debug` that prints a client's URL
//! can show it.

use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{Context, Request};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::{Arc, Mutex};
use time::OffsetDateTime;

/// The service version minted signatures are for (the string-to-sign with an encryption scope).
const VERSION: &str = "2022-11-02";
/// How long a minted SAS is valid.
const LIFETIME: time::Duration = time::Duration::hours(1);
/// A minted SAS is replaced when it has less than this left: longer than any request takes.
/// It has no start time (`st`), so a clock ahead of the service's cannot make it "not yet
/// valid"; one behind shortens its life by as much.
const RENEW_BEFORE: time::Duration = time::Duration::minutes(15);

/// What a service may do with an account's queues and blobs, as an account SAS says it:
/// services (`q`, `b`), resource types (`s`, `c`, `o`) and permissions (`r`, `w`, `d`, `l`,
/// `a`, `c`, `u`, `p`). Tables are not in it: their requests are signed with the key itself
/// (`wire.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub services: &'static str,
    pub resource_types: &'static str,
    pub permissions: &'static str,
}

impl Grant {
    /// Everything on queues and blobs: for tools and tests that do what the operator does.
    pub const ALL: Grant = Grant {
        services: "qb",
        resource_types: "sco",
        permissions: "rwdlacup",
    };

    /// Its resource types and permissions, with the right to create queues and containers
    /// when `create`, each in the order Azure documents (`sco`, `rwdlacup`).
    fn fields(self, create: bool) -> (String, String) {
        let (types, permissions) = if create {
            (
                format!("{}c", self.resource_types),
                format!("{}c", self.permissions),
            )
        } else {
            (self.resource_types.to_owned(), self.permissions.to_owned())
        };
        (
            in_order(&types, "sco"),
            in_order(&permissions, "rwdxylacuptfi"),
        )
    }
}

/// The letters of `order` that `letters` holds, in that order, each once.
fn in_order(letters: &str, order: &str) -> String {
    order.chars().filter(|c| letters.contains(*c)).collect()
}

/// Where a request's SAS comes from.
pub(super) enum Sas {
    /// The connection string's, as given (without a leading `?`).
    Given(String),
    /// Minted from the account key, and replaced before it expires.
    Minted(Box<Minter>),
}

impl std::fmt::Debug for Sas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The signature is deliberately left out.
        f.write_str(match self {
            Sas::Given(_) => "Sas::Given",
            Sas::Minted(_) => "Sas::Minted",
        })
    }
}

impl Sas {
    /// The query string to add to a request now.
    fn current(&self) -> String {
        match self {
            Sas::Given(sas) => sas.clone(),
            Sas::Minted(minter) => minter.current(OffsetDateTime::now_utc()),
        }
    }
}

/// Mints account SASs with one account's key.
pub(super) struct Minter {
    account: String,
    mac: Hmac<Sha256>,
    services: &'static str,
    resource_types: String,
    permissions: String,
    /// The SAS in use and when it expires.
    current: Mutex<Option<(String, OffsetDateTime)>>,
}

impl Minter {
    /// `Err` if the key is not base64 (never quoting it). `create` adds the right to create
    /// queues and containers to `grant`.
    pub(super) fn new(
        account: &str,
        key: &str,
        grant: Grant,
        create: bool,
    ) -> Result<Self, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .map_err(|_| "AccountKey is not base64".to_owned())?;
        let mac = Hmac::<Sha256>::new_from_slice(&bytes)
            .map_err(|_| "AccountKey cannot key an HMAC".to_owned())?;
        let (resource_types, permissions) = grant.fields(create);
        Ok(Self {
            account: account.to_owned(),
            mac,
            services: grant.services,
            resource_types,
            permissions,
            current: Mutex::new(None),
        })
    }

    /// The SAS to use at `now`: the one in use while it has [`RENEW_BEFORE`] left, else a new
    /// one (minting is one HMAC: no request, nothing to wait for).
    fn current(&self, now: OffsetDateTime) -> String {
        // A panic while holding this lock cannot leave the pair half-written.
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((sas, expires)) = current.as_ref() {
            if *expires - now > RENEW_BEFORE {
                return sas.clone();
            }
        }
        let expires = now + LIFETIME;
        let sas = self.mint(expires);
        *current = Some((sas.clone(), expires));
        sas
    }

    /// An account SAS valid until `expiry`, over https or http (the emulator).
    fn mint(&self, expiry: OffsetDateTime) -> String {
        let expiry = iso8601(expiry);
        let protocol = "https,http";
        // The account SAS string-to-sign of versions from 2020-12-06: account, permissions,
        // services, resource types, start (none), expiry, IP, protocol, version, encryption
        // scope.
        let to_sign = format!(
            "{}\n{}\n{}\n{}\n\n{expiry}\n\n{protocol}\n{VERSION}\n\n",
            self.account, self.permissions, self.services, self.resource_types
        );
        let mut mac = self.mac.clone();
        mac.update(to_sign.as_bytes());
        let signature =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        format!(
            "sv={VERSION}&ss={}&srt={}&sp={}&se={}&spr={}&sig={}",
            self.services,
            self.resource_types,
            self.permissions,
            encode(&expiry),
            encode(protocol),
            encode(&signature)
        )
    }
}

/// `2026-12-04T15:04:05Z`, as a SAS wants its times.
fn iso8601(at: OffsetDateTime) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    at.to_offset(time::UtcOffset::UTC)
        .format(FORMAT)
        .unwrap_or_default()
}

fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    super::percent_encode(&mut out, value);
    out
}

/// Adds the SAS to each request's query, on every try, so a renewed SAS is used at once.
#[derive(Debug)]
pub(super) struct SasPolicy(pub(super) Arc<Sas>);

#[async_trait::async_trait]
impl Policy for SasPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let sas = self.0.current();
        let url = request.url_mut();
        let query = match url.query() {
            Some(q) if !q.is_empty() => format!("{q}&{sas}"),
            _ => sas,
        };
        url.set_query(Some(&query));
        next[0].send(ctx, request, &next[1..]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

    fn at(unix: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(unix).expect("a time")
    }

    #[test]
    fn a_minted_sas_signs_the_documented_string() {
        let grant = Grant {
            services: "q",
            resource_types: "o",
            permissions: "a",
        };
        let minter = Minter::new("devstoreaccount1", KEY, grant, false).expect("a key");
        let sas = minter.mint(at(1_800_003_600));
        // The string-to-sign Azure documents for account SASs from version 2020-12-06, whole.
        let expected = "sv=2022-11-02&ss=q&srt=o&sp=a&se=2027-01-15T09%3A00%3A00Z\
            &spr=https%2Chttp&sig=";
        assert!(sas.starts_with(expected), "{sas}");
        let to_sign =
            "devstoreaccount1\na\nq\no\n\n2027-01-15T09:00:00Z\n\nhttps,http\n2022-11-02\n\n";
        let mut mac = minter.mac.clone();
        mac.update(to_sign.as_bytes());
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert_eq!(sas, format!("{expected}{}", encode(&sig)));
    }

    #[test]
    fn a_sas_is_kept_until_renewal_is_due_then_replaced() {
        let minter = Minter::new("a", KEY, Grant::ALL, false).expect("a key");
        let first = minter.current(at(1_800_000_000));
        assert_eq!(minter.current(at(1_800_000_000 + 44 * 60)), first);
        let renewed = minter.current(at(1_800_000_000 + 46 * 60));
        assert_ne!(renewed, first);
        assert!(renewed.contains("se=2027-01-15T09%3A46%3A00Z"), "{renewed}");
    }

    #[test]
    fn creating_adds_the_create_right_only_when_asked() {
        let grant = Grant {
            services: "q",
            resource_types: "o",
            permissions: "a",
        };
        let narrow = Minter::new("a", KEY, grant, false).expect("a key");
        assert_eq!(
            (narrow.resource_types.as_str(), narrow.permissions.as_str()),
            ("o", "a")
        );
        let creating = Minter::new("a", KEY, grant, true).expect("a key");
        assert_eq!(
            (
                creating.resource_types.as_str(),
                creating.permissions.as_str()
            ),
            ("co", "ac")
        );
        let processor = Grant {
            services: "q",
            resource_types: "co",
            permissions: "rapu",
        };
        let both = Minter::new("a", KEY, processor, true).expect("a key");
        assert_eq!(
            (both.resource_types.as_str(), both.permissions.as_str()),
            ("co", "racup"),
            "each once, in Azure's order"
        );
        assert!(Minter::new("a", "not base64!", grant, false).is_err());
    }
}
