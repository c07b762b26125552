//! Every metric the simulator exports.

/// Publishes the broker acknowledged.
pub const PUBLISHED: &str = "simulator_published_total";
/// Publishes handed to the MQTT client (a duplicate counts twice).
pub const MESSAGES: &str = "simulator_messages_total";
/// Readings generated (a gateway message carries several).
pub const READINGS: &str = "simulator_readings_total";
/// Messages given a fault, by `fault`.
pub const INJECTED: &str = "simulator_injected_total";
