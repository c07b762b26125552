//! The broker connection every MQTT client of the project shares (ingest, the simulator, the
//! load tester, the tests): `mqtt://` or `mqtts://` URLs, TLS through rustls with the ring
//! provider, credentials, and one-line reasons for failed connections.
//!
//! Certificate verification is always on; nothing here can turn it off. Passwords live in
//! [`Secret`], whose `Debug` and `Display` print `<redacted>`, and no error of this module
//! carries a password, a key or a file's contents.

use crate::retry::Backoff;
use hmac::Mac;
use rumqttc::v5::mqttbytes::v5::ConnectReturnCode;
use rumqttc::v5::{ConnectionError, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A broker address: `mqtt://host:port` (plain, port 1883 by default) or `mqtts://host:port`
/// (TLS, 8883). `tcp://` and `ssl://` are accepted as synonyms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl std::str::FromStr for MqttUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(rest) = s
            .strip_prefix("mqtts://")
            .or_else(|| s.strip_prefix("ssl://"))
        {
            (true, rest)
        } else if let Some(rest) = s
            .strip_prefix("mqtt://")
            .or_else(|| s.strip_prefix("tcp://"))
        {
            (false, rest)
        } else {
            return Err("the broker URL must start with mqtt:// or mqtts://".to_owned());
        };
        let authority = rest.trim_end_matches('/');
        // Never echo a URL that may carry credentials.
        if authority.contains('@') {
            return Err(
                "the broker URL must not hold credentials; use MQTT_USERNAME and \
                 MQTT_PASSWORD_FILE"
                    .to_owned(),
            );
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
                h,
                p.parse()
                    .map_err(|_| "its port is not a number".to_owned())?,
            ),
            _ => (authority, if tls { 8883 } else { 1883 }),
        };
        if host.is_empty() || host.contains('/') {
            return Err("it has no host".to_owned());
        }
        Ok(Self {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            tls,
        })
    }
}

impl std::fmt::Display for MqttUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// Outgoing QoS 1 publishes a connection keeps in flight, at most. rumqttc's default
/// (65,535) allocates a slot for each in every connection: several megabytes each, which
/// killed the simulator (out of memory) at 10,000 per-device connections. The broker's own
/// Receive Maximum (Mosquitto: 20) is the real limit anyway.
pub const OUTGOING_INFLIGHT: u16 = 256;

/// How long a connection attempt (TCP, TLS handshake, CONNACK) may take. rumqttc's 5 s is
/// too short when thousands of TLS handshakes queue at one broker (after its restart, say):
/// attempts abandoned midway cost the broker the handshake anyway and come straight back.
pub const CONNECT_TIMEOUT_SECS: u64 = 20;

/// A value that must never be printed: its `Debug` and `Display` say `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Reads a secret from a file (a mounted secret), ignoring trailing line breaks. An error
    /// names `setting` and the file, never its contents.
    pub fn read_file(setting: &'static str, path: &Path) -> Result<Self, ConfigError> {
        let text = read(setting, path)?;
        let text = String::from_utf8_lossy(&text);
        Ok(Self::new(text.trim_end_matches(['\r', '\n'])))
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Broker flags, the same in every MQTT client of the project. The environment variable names
/// are a contract: the deployment files rely on them.
#[derive(Debug, Clone, clap::Args)]
pub struct MqttArgs {
    /// MQTT broker: `mqtt://host:1883` (plain) or `mqtts://host:8883` (TLS; the broker's
    /// certificate is always verified).
    /// (Parsed after the command line, so a rejected URL, which may hold a password, is
    /// never echoed.)
    #[arg(
        long,
        env = "MQTT_URL",
        default_value = "mqtt://127.0.0.1:1883",
        hide_env_values = true
    )]
    pub mqtt_url: String,

    /// PEM bundle of the CAs trusted to sign the broker's certificate. Unset: the public web
    /// roots (Mozilla's list, built in), so a broker with a public certificate just works.
    #[arg(long, env = "MQTT_CA_FILE")]
    pub mqtt_ca_file: Option<PathBuf>,

    /// PEM certificate (chain) for mutual TLS; needs `MQTT_CLIENT_KEY`.
    #[arg(long, env = "MQTT_CLIENT_CERT", requires = "mqtt_client_key")]
    pub mqtt_client_cert: Option<PathBuf>,

    /// PEM private key of `MQTT_CLIENT_CERT`.
    #[arg(long, env = "MQTT_CLIENT_KEY", requires = "mqtt_client_cert")]
    pub mqtt_client_key: Option<PathBuf>,

    /// User name to authenticate with.
    #[arg(long, env = "MQTT_USERNAME")]
    pub mqtt_username: Option<String>,

    /// Password (prefer `MQTT_PASSWORD_FILE`: a flag shows in the process list). Never printed.
    #[arg(long, env = "MQTT_PASSWORD", hide_env_values = true)]
    pub mqtt_password: Option<Secret>,

    /// File holding the password (a mounted secret); wins over `MQTT_PASSWORD`. Trailing
    /// line breaks are ignored.
    #[arg(long, env = "MQTT_PASSWORD_FILE")]
    pub mqtt_password_file: Option<PathBuf>,
}

/// A setting that cannot be used. Names the setting and the file, never a file's contents.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {setting} ({path}): {source}")]
    Read {
        setting: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{setting} ({path}) holds no usable PEM {what}")]
    Pem {
        setting: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("MQTT_CLIENT_CERT and MQTT_CLIENT_KEY do not form a usable identity: {0}")]
    ClientIdentity(rustls::Error),
    #[error("{0} is set, but MQTT_URL is not an mqtts:// URL")]
    TlsSettingWithoutTls(&'static str),
    #[error("a password is set without MQTT_USERNAME")]
    PasswordWithoutUser,
    #[error("MQTT_URL: {0}")]
    Url(String),
}

/// Ready-to-use connection settings: TLS configuration built and the password read, once.
#[derive(Debug, Clone)]
pub struct Connection {
    pub url: MqttUrl,
    tls: Option<Arc<rustls::ClientConfig>>,
    username: Option<String>,
    password: Option<Secret>,
}

impl MqttArgs {
    /// These settings as the environment of a child process that takes the same flags (the
    /// load tester's simulator): through the environment, so no password shows in its
    /// command line.
    pub fn child_env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        let mut env = vec![("MQTT_URL", self.mqtt_url.clone().into())];
        let files = [
            ("MQTT_CA_FILE", &self.mqtt_ca_file),
            ("MQTT_CLIENT_CERT", &self.mqtt_client_cert),
            ("MQTT_CLIENT_KEY", &self.mqtt_client_key),
            ("MQTT_PASSWORD_FILE", &self.mqtt_password_file),
        ];
        for (name, path) in files {
            if let Some(path) = path {
                env.push((name, path.clone().into_os_string()));
            }
        }
        if let Some(user) = &self.mqtt_username {
            env.push(("MQTT_USERNAME", user.into()));
        }
        if let Some(password) = &self.mqtt_password {
            env.push(("MQTT_PASSWORD", password.expose().into()));
        }
        env
    }

    /// Reads the files the settings name and builds the TLS configuration.
    pub fn connection(&self) -> Result<Connection, ConfigError> {
        let url: MqttUrl = self.mqtt_url.parse().map_err(ConfigError::Url)?;
        let tls_only = [
            ("MQTT_CA_FILE", self.mqtt_ca_file.is_some()),
            ("MQTT_CLIENT_CERT", self.mqtt_client_cert.is_some()),
        ];
        if !url.tls {
            if let Some((setting, _)) = tls_only.iter().find(|(_, set)| *set) {
                return Err(ConfigError::TlsSettingWithoutTls(setting));
            }
        }
        let password = match &self.mqtt_password_file {
            Some(path) => Some(Secret::read_file("MQTT_PASSWORD_FILE", path)?),
            None => self.mqtt_password.clone(),
        };
        if password.is_some() && self.mqtt_username.is_none() {
            return Err(ConfigError::PasswordWithoutUser);
        }
        let tls = if url.tls {
            let identity = match (&self.mqtt_client_cert, &self.mqtt_client_key) {
                (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
                _ => None,
            };
            Some(tls_config(self.mqtt_ca_file.as_deref(), identity)?)
        } else {
            None
        };
        Ok(Connection {
            url,
            tls,
            username: self.mqtt_username.clone(),
            password,
        })
    }
}

impl Connection {
    /// A plain, anonymous connection to `url` (for tests and tools).
    pub fn plain(url: MqttUrl) -> Self {
        Self {
            url,
            tls: None,
            username: None,
            password: None,
        }
    }

    /// The same broker and TLS settings under another identity (the simulator's per-device
    /// connections).
    pub fn with_credentials(&self, username: String, password: Secret) -> Self {
        Self {
            username: Some(username),
            password: Some(password),
            ..self.clone()
        }
    }

    /// The user name connections authenticate with, if any.
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    /// Whether a password would cross the network unencrypted.
    pub fn sends_password_in_clear(&self) -> bool {
        self.password.is_some() && self.tls.is_none()
    }

    /// MQTT v5 options for `client_id`: address, transport, credentials, and a bound on
    /// outgoing QoS 1 publishes in flight. The caller adds session and flow settings.
    pub fn options(&self, client_id: impl Into<String>) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, self.url.host.clone(), self.url.port);
        options
            .set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT)
            .set_connection_timeout(CONNECT_TIMEOUT_SECS);
        if let Some(config) = &self.tls {
            options.set_transport(Transport::Tls(TlsConfiguration::Rustls(config.clone())));
        }
        if let Some(user) = &self.username {
            let password = self.password.as_ref().map_or("", Secret::expose);
            options.set_credentials(user.clone(), password.to_owned());
        }
        options
    }
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::Read {
        setting,
        path: path.to_owned(),
        source,
    })
}

fn tls_config(
    ca_file: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = read("MQTT_CA_FILE", path)?;
            let bad = || ConfigError::Pem {
                setting: "MQTT_CA_FILE",
                path: path.to_owned(),
                what: "certificate",
            };
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|_| bad())?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(bad());
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(ConfigError::ClientIdentity)?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert_path, key_path)) => {
            let pem = read("MQTT_CLIENT_CERT", cert_path)?;
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .ok()
                .filter(|c: &Vec<_>| !c.is_empty())
                .ok_or_else(|| ConfigError::Pem {
                    setting: "MQTT_CLIENT_CERT",
                    path: cert_path.to_owned(),
                    what: "certificate",
                })?;
            let key_pem = read("MQTT_CLIENT_KEY", key_path)?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| ConfigError::Pem {
                setting: "MQTT_CLIENT_KEY",
                path: key_path.to_owned(),
                what: "private key",
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(ConfigError::ClientIdentity)?
        }
    };
    Ok(Arc::new(config))
}

/// The password of device `device_id` under a shared `secret`: base64url (no padding) of
/// HMAC-SHA256(secret, device id). The simulator connects with it, and
/// `simulator --print-credentials` writes the broker's password file from it, so 10,000
/// device identities need one secret, not 10,000.
pub fn device_password(secret: &Secret, device_id: &str) -> Secret {
    use base64::Engine;
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.expose().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(device_id.as_bytes());
    Secret::new(
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()),
    )
}

/// What kind of failure a broker connection met: refusals and TLS failures are the
/// operator's to fix, so clients retry them slowly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The broker refused the user name or password.
    Credentials,
    /// The broker refused this identity (or this client id, or a subscription).
    NotAuthorised,
    /// The TLS handshake failed.
    Tls,
    /// No connection at all: refused, unresolvable, timed out.
    Unreachable,
    /// An established connection broke.
    Lost,
}

/// The wait before the next connection attempt: quick after a broken connection, slow after a
/// refusal or a TLS failure. Those are the operator's to fix and will not fix themselves in
/// seconds; thousands of clients retrying them fast would only load the broker.
///
/// The waits start over only after a connection has stayed up for [`STABLE`]: a client that
/// is accepted and then thrown out at once (its session taken over by another client with the
/// same id, say) backs off like one that is refused, instead of reconnecting ten times a
/// second.
#[derive(Debug, Clone)]
pub struct Reconnect {
    quick: Backoff,
    slow: Backoff,
    connected_at: Option<std::time::Instant>,
}

/// How long a connection must last for the backoff to start over.
pub const STABLE: Duration = Duration::from_secs(10);

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            quick: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
            slow: Backoff::new(Duration::from_secs(5), Duration::from_secs(60)),
            connected_at: None,
        }
    }
}

impl Reconnect {
    /// A connection was accepted (CONNACK).
    pub fn connected(&mut self) {
        self.connected_at = Some(std::time::Instant::now());
    }

    pub fn delay(&mut self, failure: Failure) -> Duration {
        if self
            .connected_at
            .take()
            .is_some_and(|at| at.elapsed() >= STABLE)
        {
            self.quick.reset();
            self.slow.reset();
        }
        match failure {
            Failure::Unreachable | Failure::Lost => self.quick.next_delay(),
            Failure::Credentials | Failure::NotAuthorised | Failure::Tls => self.slow.next_delay(),
        }
    }
}

/// One line that says what went wrong, naming the broker, never a secret.
pub fn describe(url: &MqttUrl, error: &ConnectionError) -> (Failure, String) {
    match error {
        ConnectionError::ConnectionRefused(code) => match code {
            ConnectReturnCode::BadUserNamePassword => (
                Failure::Credentials,
                format!("{url} refused the credentials (bad user name or password)"),
            ),
            ConnectReturnCode::NotAuthorized | ConnectReturnCode::Banned => (
                Failure::NotAuthorised,
                format!("{url} refused this client: not authorised ({code:?})"),
            ),
            ConnectReturnCode::BadAuthenticationMethod => (
                Failure::Credentials,
                format!("{url} refused the authentication method ({code:?})"),
            ),
            other => (
                Failure::NotAuthorised,
                format!("{url} refused the connection ({other:?})"),
            ),
        },
        ConnectionError::Timeout(_) => (
            Failure::Unreachable,
            format!("no answer from {url} within the connection timeout"),
        ),
        other => {
            if let Some(tls) = find_rustls(other) {
                return (Failure::Tls, describe_tls(url, tls));
            }
            use std::io::ErrorKind as K;
            let broke = matches!(other, ConnectionError::MqttState(_))
                || matches!(
                    find_io(other).map(std::io::Error::kind),
                    Some(
                        K::UnexpectedEof
                            | K::ConnectionReset
                            | K::ConnectionAborted
                            | K::BrokenPipe
                    )
                );
            if broke {
                (
                    Failure::Lost,
                    format!("connection to {url} lost: {}", chain(other)),
                )
            } else {
                (
                    Failure::Unreachable,
                    format!("cannot reach {url}: {}", chain(other)),
                )
            }
        }
    }
}

fn describe_tls(url: &MqttUrl, error: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    let host = &url.host;
    match error {
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => format!(
            "TLS handshake with {url} failed: its certificate is not signed by a trusted CA \
             (MQTT_CA_FILE names the CAs to trust)"
        ),
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => {
            format!(
                "TLS handshake with {url} failed: its certificate is not valid for the name {host:?}"
            )
        }
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            format!("TLS handshake with {url} failed: its certificate has expired")
        }
        rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            format!("TLS handshake with {url} failed: its certificate is not valid yet")
        }
        rustls::Error::AlertReceived(alert) => format!(
            "TLS handshake with {url} failed: the broker sent {alert:?} (with mutual TLS, \
             check MQTT_CLIENT_CERT: the broker may not trust it)"
        ),
        other => format!("TLS handshake with {url} failed: {other}"),
    }
}

/// The rustls error somewhere in the chain. `io::Error::source` skips the error it wraps,
/// so wrapped errors are reached through `get_ref`.
fn find_rustls<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        current = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as _),
            None => e.source(),
        };
    }
    None
}

fn find_io<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        current = e.source();
    }
    None
}

/// The error and its causes on one line.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut s = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        let text = e.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        current = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let ok = [
            ("mqtt://127.0.0.1:1883", "127.0.0.1", 1883, false),
            ("mqtt://broker", "broker", 1883, false),
            ("tcp://broker:1884/", "broker", 1884, false),
            ("mqtts://broker", "broker", 8883, true),
            ("ssl://[::1]:8884", "::1", 8884, true),
        ];
        for (s, host, port, tls) in ok {
            let u: MqttUrl = s.parse().unwrap();
            assert_eq!((u.host.as_str(), u.port, u.tls), (host, port, tls), "{s}");
        }
        for bad in ["broker:1883", "http://b", "mqtt://:1", "mqtt://b:x"] {
            assert!(bad.parse::<MqttUrl>().is_err(), "{bad}");
        }
        let with_user = "mqtts://alice:hunter2@broker"
            .parse::<MqttUrl>()
            .unwrap_err();
        assert!(!with_user.contains("hunter2"), "{with_user}");
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "<redacted> <redacted>");
        let args = MqttArgs {
            mqtt_url: "mqtt://b".into(),
            mqtt_ca_file: None,
            mqtt_client_cert: None,
            mqtt_client_key: None,
            mqtt_username: Some("u".into()),
            mqtt_password: Some(s),
            mqtt_password_file: None,
        };
        let c = args.connection().unwrap();
        assert!(!format!("{args:?} {c:?}").contains("hunter2"));
        assert!(c.sends_password_in_clear());
    }

    #[test]
    fn device_passwords_are_stable_and_distinct() {
        let secret = Secret::new("fleet-secret");
        let a = device_password(&secret, "sensor-00001");
        assert_eq!(a, device_password(&secret, "sensor-00001"));
        assert_ne!(a, device_password(&secret, "sensor-00002"));
        assert_ne!(a, device_password(&Secret::new("other"), "sensor-00001"));
        assert_eq!(a.expose().len(), 43);
    }

    #[test]
    fn bad_files_are_named_not_shown() {
        let dir = std::env::temp_dir().join(format!("mqtt-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "not a certificate, but a secret-looking line").unwrap();
        let args = MqttArgs {
            mqtt_url: "mqtts://b".into(),
            mqtt_ca_file: Some(ca.clone()),
            mqtt_client_cert: None,
            mqtt_client_key: None,
            mqtt_username: None,
            mqtt_password: None,
            mqtt_password_file: None,
        };
        let err = args.connection().unwrap_err().to_string();
        assert!(
            err.contains("MQTT_CA_FILE") && !err.contains("secret-looking"),
            "{err}"
        );
        let missing = MqttArgs {
            mqtt_ca_file: Some(dir.join("missing.pem")),
            ..args.clone()
        };
        assert!(missing
            .connection()
            .unwrap_err()
            .to_string()
            .contains("missing.pem"));
        let plain = MqttArgs {
            mqtt_url: "mqtt://b".into(),
            ..args
        };
        assert!(plain
            .connection()
            .unwrap_err()
            .to_string()
            .contains("mqtts://"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn failures_are_classified() {
        let url: MqttUrl = "mqtts://broker".parse().unwrap();
        let check = |e: ConnectionError, kind: Failure, words: &str| {
            let (k, line) = describe(&url, &e);
            assert_eq!(k, kind, "{line}");
            assert!(line.contains(words), "{line}");
        };
        check(
            ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword),
            Failure::Credentials,
            "bad user name or password",
        );
        check(
            ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized),
            Failure::NotAuthorised,
            "not authorised",
        );
        let unknown_ca = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        check(
            ConnectionError::Tls(rumqttc::TlsError::Io(unknown_ca)),
            Failure::Tls,
            "not signed by a trusted CA",
        );
        let expired = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Expired),
        );
        check(ConnectionError::Io(expired), Failure::Tls, "expired");
        check(
            ConnectionError::Io(std::io::ErrorKind::ConnectionRefused.into()),
            Failure::Unreachable,
            "cannot reach mqtts://broker:8883",
        );
    }
}
