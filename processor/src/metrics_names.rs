//! Every metric the processor exports.

/// Readings written to the table.
pub const STORED: &str = "processor_readings_stored_total";
/// Dead-letter records written, by `reason`.
pub const DEAD_LETTERS: &str = "processor_dead_letters_total";
/// Device-hours marked for the rollup keeper because readings of them were stored after the
/// hour ended.
pub const LATE_HOURS: &str = "processor_late_hours_marked_total";
/// Refused readings' numbers recorded for the completeness ledger, and those that could not
/// be (the dead letters were written all the same; the gaps API then shows such a number as
/// missing, not refused).
pub const REFUSALS_RECORDED: &str = "processor_refusals_recorded_total";
pub const REFUSALS_UNRECORDED: &str = "processor_refusals_unrecorded_total";
/// Dead-letter records not written again: this process wrote them for an earlier delivery of
/// the same message.
pub const DEAD_LETTERS_ALREADY_WRITTEN: &str = "processor_dead_letters_already_written_total";
/// Holds on queue messages renewed while their dead letters were being put (a slow put).
pub const HOLDS_RENEWED: &str = "processor_dead_letter_holds_renewed_total";
/// Queue messages finished and deleted.
pub const MESSAGES_DONE: &str = "processor_messages_done_total";
/// Queue messages left to reappear after a failure, by `stage` (`quarantine`, `write`,
/// `register`, `dead_letter`).
pub const MESSAGES_RETRIED: &str = "processor_messages_retried_total";
/// Table requests, by `kind` (`batch` or `single`).
pub const TABLE_WRITES: &str = "processor_table_writes_total";
/// Time to process one round (the messages of one or more gets).
pub const ROUND_SECONDS: &str = "processor_round_seconds";
/// From ingest receiving a message to its readings being stored (recorded once the message is
/// finished, so a message that is redone counts once).
pub const LATENCY_SECONDS: &str = "processor_ingest_to_store_seconds";
/// Approximate messages in the ingest queue.
pub const QUEUE_DEPTH: &str = "processor_queue_depth";
/// The visibility timeout (`PROCESSOR_VISIBILITY_TIMEOUT`), for alerting on message ages.
pub const VISIBILITY_SECONDS: &str = "processor_visibility_timeout_seconds";
/// Age of the oldest message waiting in the ingest queue (0 when none waits).
pub const QUEUE_OLDEST_AGE: &str = "processor_queue_oldest_age_seconds";
/// Storage errors seen by workers (each is retried or ends in a retry later).
pub const STORAGE_ERRORS: &str = "processor_storage_errors_total";
/// Device-table rows written (registrations and latest-state refreshes).
pub const DEVICE_ROWS: &str = "processor_device_rows_written_total";
/// Devices the processor knows to have a device row (at most `PROCESSOR_DEVICE_CACHE`).
pub const DEVICES_KNOWN: &str = "processor_devices_known";
/// Device registrations sent again because a device was presumed new and had a row, or the
/// reverse (a device the cache forgot, or the first registrations after a start).
pub const DEVICES_PRESUMED_WRONGLY: &str = "processor_devices_presumed_wrongly_total";
/// Latest-state updates left for the device's next reading because as many as the refresh
/// holds were already waiting: routine past 10,000 devices a processor sees; the refresh is
/// woken early only when all that wait are stale.
pub const DEVICE_UPDATES_DEFERRED: &str = "processor_device_updates_deferred_total";
/// Readings that replaced another of the same device and millisecond with other values,
/// within one round (a re-sent correction; copies of one reading do not count).
pub const OVERWRITES: &str = "processor_row_overwrites_total";
/// Unreadable queue messages kept whole in the quarantine queue.
pub const QUARANTINED: &str = "processor_quarantined_total";
/// Deliveries of queue messages whose envelope version this build cannot read (left queued).
pub const NEWER_ENVELOPES: &str = "processor_newer_envelopes_total";
/// The most queue text the next round takes (halved after a round that ran out of time).
pub const ROUND_BUDGET_BYTES: &str = "processor_round_budget_bytes";
/// Alarm rules in force, and those in the table that are malformed (ignored until fixed).
pub const ALARM_RULES: &str = "processor_alarm_rules";
pub const ALARM_RULES_REFUSED: &str = "processor_alarm_rules_refused";
/// Alarm events put on the alarms queue, by `rule`, `condition` (`band`, `silence`) and
/// `event` (`raised`, `cleared`).
pub const ALARM_EVENTS: &str = "processor_alarm_events_total";
/// Times a device was judged again: another processor changed its state meanwhile, or its
/// readings were stored while it was being listed active.
pub const ALARM_REJUDGED: &str = "processor_alarm_rejudged_total";
/// Failed reads of the alarm rules (the rules read before stay in force).
pub const ALARM_RULES_UNREAD: &str = "processor_alarm_rules_unread_total";
/// Age of the oldest event waiting in the alarms queue (0 when none waits): events nobody
/// takes are alarms nobody hears of.
pub const ALARM_QUEUE_OLDEST_AGE: &str = "processor_alarm_queue_oldest_age_seconds";
/// Alarm events POSTed to the webhook, by `outcome` (`delivered`, `failed`).
pub const ALARM_WEBHOOK: &str = "processor_alarm_webhook_total";
/// Silence sweeps, and devices in them, that failed (the next sweep tries again).
pub const ALARM_SWEEP_FAILURES: &str = "processor_alarm_sweep_failures_total";
