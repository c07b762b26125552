//! The pipeline's contract: every shape that crosses a process boundary, and the rules that
//! decide whether a reading is accepted.
//!
//! - [`reading`]: the device message (one reading or a gateway array) and its validation.
//! - [`reason`]: the closed list of rejection reasons.
//! - [`envelope`]: the versioned queue message that packs many device messages.
//! - [`dead_letter`]: the record an operator inspects and replays.
//! - [`entity`]: the Azure Table row a reading becomes, with explicit EDM types.
//! - [`device`]: the device table's row (first/last seen, latest reading).
//! - [`archive`] (feature `archive`): the Arrow schema and the Parquet/JSON Lines archive
//!   format of readings rolled out of the table.
//! - [`rollup`]: hourly and daily rollups of a device's readings, and their rows.
//! - [`shard`]: which storage account (shard) a device's readings go to.
//! - [`timefmt`]: RowKey and RFC 3339 formatting shared by all of the above.
//!
//! Invariants: this crate does no I/O, and no other crate defines a wire shape. Every queue
//! message it encodes fits Azure's 64 KiB limit by construction, not by hope.

pub mod alarm;
#[cfg(feature = "archive")]
pub mod archive;
pub mod dead_letter;
pub mod device;
pub mod entity;
pub mod envelope;
mod framed;
pub mod reading;
pub mod reason;
pub mod rollup;
pub mod shard;
pub mod timefmt;

pub use dead_letter::DeadLetter;
pub use envelope::{DeviceMessage, EnvelopeBuilder};
pub use reading::{Extra, Override, Policy, Reading, Rejection};
pub use reason::Reason;

/// Azure Storage Queue's limit on a message's text, in characters (64 KiB).
pub const QUEUE_MESSAGE_MAX_CHARS: usize = 64 * 1024;

/// The largest payload the contract accepts (32 KiB). Larger ones are dead-lettered as
/// `too_large`, carrying only their first `MAX_PAYLOAD_BYTES`.
pub const MAX_PAYLOAD_BYTES: usize = 32 * 1024;

/// Length of the standard, padded base64 encoding of `n` bytes.
pub const fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// FNV-1a, 64 bits, with a separator after each field: stable by definition, unlike std's
/// hasher.
pub(crate) struct Fnv(pub(crate) u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for b in bytes.iter().chain([&0xff]) {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}
