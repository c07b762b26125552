//! Why a device message was not stored. The list is closed: dashboards, alerts and the
//! dead-letter tool key on these codes, so adding one is a contract change.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Not UTF-8, or not JSON.
    MalformedJson,
    /// Valid JSON of the wrong shape: missing or mistyped fields, bad extras, empty arrays.
    Schema,
    /// The device id in the topic or payload breaks the id rules.
    InvalidDeviceId,
    /// The payload's `deviceId` differs from the topic's.
    DeviceMismatch,
    /// `timestamp` is not RFC 3339 with an offset, or is outside years 1970-9999.
    InvalidTimestamp,
    /// `timestamp` is further in the future than the clock-skew allowance.
    FutureTimestamp,
    /// `timestamp` is older than the accepted age.
    Stale,
    /// A measurement or `seq` is outside its physical or storable range.
    OutOfRange,
    /// The payload exceeds the contract's size limit.
    TooLarge,
    /// The queue message holding it failed processing too many times.
    Poison,
    /// The queue message is not a readable envelope.
    InvalidEnvelope,
    /// Table Storage refused the entity although it passed validation.
    StorageRejected,
    /// Another reading of the same message has the same device and millisecond (one row
    /// each) with other values; the first is stored.
    DuplicateTimestamp,
}

impl Reason {
    pub const ALL: [Reason; 13] = [
        Reason::MalformedJson,
        Reason::Schema,
        Reason::InvalidDeviceId,
        Reason::DeviceMismatch,
        Reason::InvalidTimestamp,
        Reason::FutureTimestamp,
        Reason::Stale,
        Reason::OutOfRange,
        Reason::TooLarge,
        Reason::Poison,
        Reason::InvalidEnvelope,
        Reason::StorageRejected,
        Reason::DuplicateTimestamp,
    ];

    /// The wire code, also used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MalformedJson => "malformed_json",
            Reason::Schema => "schema",
            Reason::InvalidDeviceId => "invalid_device_id",
            Reason::DeviceMismatch => "device_mismatch",
            Reason::InvalidTimestamp => "invalid_timestamp",
            Reason::FutureTimestamp => "future_timestamp",
            Reason::Stale => "stale",
            Reason::OutOfRange => "out_of_range",
            Reason::TooLarge => "too_large",
            Reason::Poison => "poison",
            Reason::InvalidEnvelope => "invalid_envelope",
            Reason::StorageRejected => "storage_rejected",
            Reason::DuplicateTimestamp => "duplicate_timestamp",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_codes_match_serde() {
        for reason in Reason::ALL {
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(json, format!("\"{}\"", reason.as_str()));
        }
    }
}
