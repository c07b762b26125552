//! The one way queue messages are built: a JSON document whose last field is an array
//! (`{"v":1,"m":[` ... `]}`), grown one pre-serialised item at a time and sent as standard
//! base64. Base64 makes the encoded size exact arithmetic, so an item is added only if the
//! finished message still fits the queue's 64 KiB.

use crate::{base64_len, QUEUE_MESSAGE_MAX_CHARS};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

const FOOTER: &[u8] = b"]}";

/// Room for the items of one message, in bytes before base64, framing excluded.
pub(crate) const fn item_room(header: &[u8]) -> usize {
    QUEUE_MESSAGE_MAX_CHARS / 4 * 3 - header.len() - FOOTER.len()
}

#[derive(Debug)]
pub(crate) struct Framed {
    header: &'static [u8],
    body: Vec<u8>,
    count: usize,
}

impl Framed {
    /// An empty message opening with `header` (which ends with `[`).
    pub(crate) fn new(header: &'static [u8]) -> Self {
        let mut body = Vec::with_capacity(QUEUE_MESSAGE_MAX_CHARS / 4 * 3);
        body.extend_from_slice(header);
        Self {
            header,
            body,
            count: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// The size the finished message would have now, as queue text.
    pub(crate) fn encoded_len(&self) -> usize {
        base64_len(self.body.len() + FOOTER.len())
    }

    /// Appends `item` (one JSON value) if the finished message still fits; false otherwise.
    pub(crate) fn push(&mut self, item: &[u8]) -> bool {
        let separator = usize::from(self.count > 0);
        if base64_len(self.body.len() + separator + item.len() + FOOTER.len())
            > QUEUE_MESSAGE_MAX_CHARS
        {
            return false;
        }
        if separator == 1 {
            self.body.push(b',');
        }
        self.body.extend_from_slice(item);
        self.count += 1;
        true
    }

    /// The queue message text, leaving this message empty again.
    pub(crate) fn finish(&mut self) -> String {
        self.body.extend_from_slice(FOOTER);
        let text = B64.encode(&self.body);
        self.body.truncate(self.header.len());
        self.count = 0;
        text
    }
}
