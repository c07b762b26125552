//! Flags shared by several services. Every flag has an environment variable; the defaults
//! point at a local emulator and broker, so a newcomer needs none of them.

use crate::serve::LogFormat;
use crate::storage::{Account, AccountError, DEVELOPMENT_STORAGE};
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

    /// Bound on each storage request.
    #[arg(long, env = "STORAGE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub storage_timeout: Duration,
}

impl std::fmt::Debug for StorageArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageArgs")
            .field("connection_string", &"<redacted>")
            .field("storage_timeout", &self.storage_timeout)
            .finish()
    }
}

impl StorageArgs {
    pub fn account(&self) -> Result<Account, AccountError> {
        Account::from_connection_string(&self.connection_string, self.storage_timeout)
    }
}

/// Log output.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format. `RUST_LOG` sets the level filter (default `info`).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
}

/// An MQTT broker address: `mqtt://host:port` (`tcp://` is accepted too; the port defaults to
/// 1883).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttUrl {
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for MqttUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("mqtt://")
            .or_else(|| s.strip_prefix("tcp://"))
            .ok_or_else(|| {
                format!("{s:?} must start with mqtt:// (TLS brokers are not supported yet)")
            })?;
        let authority = rest.trim_end_matches('/');
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
                h,
                p.parse()
                    .map_err(|_| format!("{p:?} in {s:?} is not a port number"))?,
            ),
            _ => (authority, 1883),
        };
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        Ok(Self {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
        })
    }
}

impl std::fmt::Display for MqttUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mqtt://{}:{}", self.host, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_urls() {
        let ok = [
            ("mqtt://127.0.0.1:1883", "127.0.0.1", 1883),
            ("mqtt://broker", "broker", 1883),
            ("tcp://broker:1884/", "broker", 1884),
        ];
        for (s, host, port) in ok {
            let u: MqttUrl = s.parse().unwrap();
            assert_eq!((u.host.as_str(), u.port), (host, port), "{s}");
        }
        for bad in ["broker:1883", "mqtts://b", "mqtt://:1", "mqtt://b:x"] {
            assert!(bad.parse::<MqttUrl>().is_err(), "{bad}");
        }
    }
}
