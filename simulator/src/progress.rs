//! The simulator's live status: rates, acks and injected faults.

use crate::tally::Tally;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub fn start(tally: Arc<Tally>, format: infra::serve::LogFormat) -> infra::progress::Progress {
    // (elapsed, messages) at the previous report, for the current rate.
    let last = Mutex::new((Duration::ZERO, 0u64));
    infra::progress::Progress::start(format, move |elapsed| {
        let messages = tally.messages.load(Relaxed);
        let mut last = last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let rate = (messages - last.1) as f64 / (elapsed - last.0).as_secs_f64().max(0.001);
        *last = (elapsed, messages);
        format!(
            "published {messages} ({rate:.0}/s) · acked {} · readings {} · injected faults {}",
            tally.acked.load(Relaxed),
            tally.readings.load(Relaxed),
            tally.injected_total(),
        )
    })
}
