//! Every metric the archiver exports.

/// Rows archived (verified in a blob).
pub const ROWS_ARCHIVED: &str = "archiver_rows_archived_total";
/// Rows deleted from the table after archiving.
pub const ROWS_DELETED: &str = "archiver_rows_deleted_total";
/// Archive blobs written (new or merged).
pub const BLOBS_WRITTEN: &str = "archiver_blobs_written_total";
/// Bytes of archive blobs written.
pub const BYTES_WRITTEN: &str = "archiver_bytes_written_total";
/// Blobs rewritten to merge late rows into an existing archive.
pub const MERGES: &str = "archiver_merges_total";
/// Device-days that failed (left in the table for the next pass).
pub const FAILURES: &str = "archiver_failures_total";
/// Duration of a pass over all devices.
pub const PASS_SECONDS: &str = "archiver_pass_seconds";
/// Unix time of the last pass that finished without failures.
pub const LAST_SUCCESS: &str = "archiver_last_success_timestamp_seconds";
/// Unix time the archiver started (`archiver run`).
pub const STARTED: &str = "archiver_started_timestamp_seconds";
/// The wait between passes (`ARCHIVER_INTERVAL`, at most a day), for alerting on a stale
/// last success. Only `archiver run` serves metrics: `--once` is watched by its exit status.
pub const INTERVAL: &str = "archiver_interval_seconds";
/// Rollup rows written (hours and days).
pub const ROLLUPS_WRITTEN: &str = "archiver_rollups_written_total";
/// Unix time of the last rollup turn that succeeded.
pub const ROLLUPS_LAST_SUCCESS: &str = "archiver_rollups_last_success_timestamp_seconds";
