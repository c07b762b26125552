//! Every metric the dashboard exports.

/// Requests answered, by `route` and `status`.
pub const REQUESTS: &str = "dashboard_requests_total";
/// Time to answer, by `route`.
pub const REQUEST_SECONDS: &str = "dashboard_request_seconds";
