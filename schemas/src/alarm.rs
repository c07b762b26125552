//! Alarms: the rules operators set, each device's state under a rule, and the events a change
//! of state sends. Pure: storage and the queue are the processor's and the `alarms` tool's.
//!
//! A rule watches one measurement of one device, or of every device whose id starts with a
//! prefix, for two conditions, each with its own state:
//! - **band**: a reading is out of band below `low` or above `high`; after out-of-band
//!   readings spanning at least `forSeconds` of measurement time, it is raised. It clears at
//!   the first reading back inside the band by at least `hysteresis` (so a value hovering at a
//!   bound does not flap).
//! - **silence**: no reading measured for `silenceMinutes` (found by a sweep); it clears at
//!   the device's next reading.
//!
//! Readings are judged in order of measurement time, and each state remembers the newest one
//! judged (`at`): an older one (late, out of order, redelivered, replayed) is not judged
//! again, so no delivery order can raise or clear an alarm that the readings in time order
//! would not.

use crate::entity::{integer_of, number_of, typed, INT64};
use crate::reading::{is_valid_device_id, is_valid_extra_name, truncate};
use crate::timefmt::format_ms;
use crate::Reading;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Table of rules, states and the active list (one per storage shard).
pub const DEFAULT_TABLE: &str = "alarms";
/// Queue that receives every raise and clear, as a JSON [`Event`].
pub const DEFAULT_QUEUE: &str = "telemetry-alarms";
/// The rules' partition: RowKey = rule id, `Rule` = the rule as JSON.
pub const RULES_PARTITION: &str = "~rules";
/// The states that are not clear, one row each (RowKey `device|rule`): what a processor
/// reads to know which devices' readings it must judge even when they are in band.
pub const ACTIVE_PARTITION: &str = "~active";
/// Rules being deleted (`alarms rules delete`): moved here from [`RULES_PARTITION`], which is
/// all processors read, so a rule here judges nothing while its alarms are cleared; the row
/// goes once they are, and a deletion that stopped is finished by running it again.
pub const DELETING_PARTITION: &str = "~deleting";
/// RowKey prefix of a device's states, in the device's own partition.
const STATE_PREFIX: &str = "state|";
/// Longest `forSeconds`: a day.
pub const MAX_FOR_SECONDS: u32 = 86_400;
/// Longest rule id.
pub const MAX_RULE_ID_LEN: usize = 64;
/// Longest `silenceMinutes`: a week.
pub const MAX_SILENCE_MINUTES: u32 = 10_080;

/// A validated rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub id: String,
    pub target: Target,
    pub measurement: Measurement,
    pub low: Option<f64>,
    pub high: Option<f64>,
    /// Out of band for this long (measurement time) before raising; 0 raises at once.
    pub for_ms: i64,
    /// How far back inside the band a value must come to clear.
    pub hysteresis: f64,
    /// Raised when no reading was measured for this long.
    pub silence_ms: Option<i64>,
}

/// What a state under a rule watches: the band, or silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Condition {
    Band,
    Silence,
}

impl Condition {
    /// As events, metrics and the API name it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Band => "band",
            Self::Silence => "silence",
        }
    }
}

/// Which devices a rule watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Device(String),
    /// Every device whose id starts with this (empty: every device).
    Prefix(String),
}

/// What a rule watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Measurement {
    Temperature,
    Humidity,
    Pressure,
    /// A numeric extra property, by name.
    Extra(String),
}

impl Measurement {
    fn parse(name: &str) -> Result<Self, RuleError> {
        Ok(match name {
            "temperature" => Self::Temperature,
            "humidity" => Self::Humidity,
            "pressure" => Self::Pressure,
            other if is_valid_extra_name(other) => Self::Extra(other.to_owned()),
            other => {
                return Err(RuleError(format!(
                    "measurement {:?} is none of temperature, humidity, pressure, nor an extra \
                     property's name (1-64 of [A-Za-z0-9_], starting with a letter)",
                    truncate(other, 80)
                )))
            }
        })
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Temperature => "temperature",
            Self::Humidity => "humidity",
            Self::Pressure => "pressure",
            Self::Extra(name) => name,
        }
    }

    /// The reading's value of it; `None` when absent or not a number.
    pub fn of(&self, reading: &Reading) -> Option<f64> {
        match self {
            Self::Temperature => reading.temperature,
            Self::Humidity => reading.humidity,
            Self::Pressure => reading.pressure,
            Self::Extra(name) => reading
                .extras
                .binary_search_by(|(n, _)| n.as_str().cmp(name))
                .ok()
                .and_then(|i| match reading.extras[i].1 {
                    crate::Extra::Int(v) => Some(v as f64),
                    crate::Extra::Float(v) => Some(v),
                    _ => None,
                }),
        }
    }
}

/// Why a rule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RuleError(String);

/// A rule as operators write it (JSON, camelCase; unknown fields refused).
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleText {
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    measurement: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    low: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    high: Option<f64>,
    #[serde(default)]
    for_seconds: u32,
    #[serde(default)]
    hysteresis: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    silence_minutes: Option<u32>,
}

impl Rule {
    /// Reads and checks one rule.
    pub fn parse(json: &str) -> Result<Self, RuleError> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| RuleError(format!("not JSON: {e}")))?;
        Self::from_value(value)
    }

    /// Checks one rule given as a JSON value.
    pub fn from_value(value: Value) -> Result<Self, RuleError> {
        let text: RuleText =
            serde_json::from_value(value).map_err(|e| RuleError(format!("not a rule: {e}")))?;
        let id_ok = !text.id.is_empty()
            && text.id.len() <= MAX_RULE_ID_LEN
            && text.id.starts_with(|c: char| c.is_ascii_alphanumeric())
            && text
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !id_ok {
            return Err(RuleError(format!(
                "id {:?} must be 1-{MAX_RULE_ID_LEN} of [A-Za-z0-9._-], starting with a letter or digit",
                truncate(&text.id, 80)
            )));
        }
        let target =
            match (text.device, text.prefix) {
                (Some(device), None) if is_valid_device_id(&device) => Target::Device(device),
                (Some(device), None) => {
                    return Err(RuleError(format!(
                        "device {:?} is not a valid device id",
                        truncate(&device, 80)
                    )))
                }
                (None, Some(prefix)) if prefix.is_empty() || is_valid_device_id(&prefix) => {
                    Target::Prefix(prefix)
                }
                (None, Some(prefix)) => {
                    return Err(RuleError(format!(
                        "prefix {:?} cannot begin a valid device id",
                        truncate(&prefix, 80)
                    )))
                }
                _ => return Err(RuleError(
                    "exactly one of device and prefix must be given (prefix \"\" is every device)"
                        .into(),
                )),
            };
        let measurement = Measurement::parse(&text.measurement)?;
        let (low, high, hysteresis) = (text.low, text.high, text.hysteresis);
        let silence = text.silence_minutes;
        if low.is_none() && high.is_none() && silence.is_none() {
            return Err(RuleError(
                "at least one of low, high and silenceMinutes must be given".into(),
            ));
        }
        if low.is_none() && high.is_none() && (text.for_seconds > 0 || hysteresis != 0.0) {
            return Err(RuleError(
                "forSeconds and hysteresis need a band (low or high)".into(),
            ));
        }
        if let Some(minutes) = silence {
            if !(1..=MAX_SILENCE_MINUTES).contains(&minutes) {
                return Err(RuleError(format!(
                    "silenceMinutes ({minutes}) must be from 1 to {MAX_SILENCE_MINUTES}"
                )));
            }
        }
        if hysteresis < 0.0 {
            return Err(RuleError(format!(
                "hysteresis ({hysteresis}) must not be negative"
            )));
        }
        if let (Some(low), Some(high)) = (low, high) {
            if low >= high {
                return Err(RuleError(format!(
                    "low ({low}) must be below high ({high})"
                )));
            }
            if 2.0 * hysteresis >= high - low {
                return Err(RuleError(format!(
                    "hysteresis ({hysteresis}) leaves no value between low and high to clear at"
                )));
            }
        }
        if text.for_seconds > MAX_FOR_SECONDS {
            return Err(RuleError(format!(
                "forSeconds ({}) must be at most {MAX_FOR_SECONDS}",
                text.for_seconds
            )));
        }
        Ok(Self {
            id: text.id,
            target,
            measurement,
            low,
            high,
            for_ms: i64::from(text.for_seconds) * 1_000,
            hysteresis,
            silence_ms: silence.map(|m| i64::from(m) * 60_000),
        })
    }

    /// The rule as JSON, as [`Rule::parse`] reads it.
    pub fn to_json(&self) -> String {
        let (device, prefix) = match &self.target {
            Target::Device(d) => (Some(d.clone()), None),
            Target::Prefix(p) => (None, Some(p.clone())),
        };
        let text = RuleText {
            id: self.id.clone(),
            device,
            prefix,
            measurement: self.measurement.name().to_owned(),
            low: self.low,
            high: self.high,
            for_seconds: u32::try_from(self.for_ms / 1_000).unwrap_or(MAX_FOR_SECONDS),
            hysteresis: self.hysteresis,
            silence_minutes: self
                .silence_ms
                .map(|ms| u32::try_from(ms / 60_000).unwrap_or(MAX_SILENCE_MINUTES)),
        };
        serde_json::to_string(&text).expect("a rule serialises")
    }

    /// Whether the rule watches `device`.
    pub fn watches(&self, device: &str) -> bool {
        match &self.target {
            Target::Device(d) => d == device,
            Target::Prefix(p) => device.starts_with(p.as_str()),
        }
    }

    /// Whether the rule has a band (low or high).
    pub fn has_band(&self) -> bool {
        self.low.is_some() || self.high.is_some()
    }

    /// The key of a device's state under this rule for `condition` (its state row's and its
    /// active-list row's): the id, with `~silence` for silence (`~` is in no id).
    pub fn key(&self, condition: Condition) -> String {
        key(&self.id, condition)
    }

    /// Whether `value` is out of band.
    pub fn outside(&self, value: f64) -> bool {
        self.low.is_some_and(|low| value < low) || self.high.is_some_and(|high| value > high)
    }

    /// Whether `value` is back inside the band by the hysteresis.
    fn cleared_by(&self, value: f64) -> bool {
        self.low.is_none_or(|low| value >= low + self.hysteresis)
            && self.high.is_none_or(|high| value <= high - self.hysteresis)
    }

    /// Judges one reading (`value` measured at `at`) against `state`: a reading not newer
    /// than the newest judged is ignored. Returns the change it makes, if any.
    pub fn judge(&self, state: &mut State, at: i64, value: f64) -> Option<Kind> {
        if at <= state.at || !value.is_finite() {
            return None;
        }
        state.at = at;
        state.value = Some(value);
        let out = self.outside(value);
        match state.status {
            Status::Clear | Status::Pending { .. } if !out => {
                state.status = Status::Clear;
                None
            }
            Status::Clear if self.for_ms == 0 => {
                state.status = Status::Raised { since: at };
                Some(Kind::Raised)
            }
            Status::Clear => {
                state.status = Status::Pending { since: at };
                None
            }
            Status::Pending { since } if at - since >= self.for_ms => {
                state.status = Status::Raised { since: at };
                Some(Kind::Raised)
            }
            Status::Pending { .. } => None,
            Status::Raised { .. } if self.cleared_by(value) => {
                state.status = Status::Clear;
                Some(Kind::Cleared)
            }
            Status::Raised { .. } => None,
        }
    }

    /// Judges one reading measured at `at` against a silence `state`: a reading not newer
    /// than the newest judged is ignored; a newer one clears a raised silence.
    pub fn judge_silence(&self, state: &mut State, at: i64) -> Option<Kind> {
        if at <= state.at {
            return None;
        }
        state.at = at;
        state.value = None;
        match state.status {
            Status::Raised { .. } => {
                state.status = Status::Clear;
                Some(Kind::Cleared)
            }
            _ => None,
        }
    }

    /// Raises silence on `state` if no reading was judged measured at or after `since` (the
    /// start of a window found empty). Returns whether it did.
    pub fn raise_silence(&self, state: &mut State, since: i64) -> bool {
        if state.status != Status::Clear || state.at >= since {
            return false;
        }
        state.status = Status::Raised { since };
        state.at = since;
        state.value = None;
        true
    }

    /// The `cleared` event of `device`'s alarm under `condition`, raised `since`, when the
    /// rule is deleted (`at`). Its id names the raise, so a deletion run again sends the same.
    pub fn deleted_event(&self, device: &str, condition: Condition, since: i64, at: i64) -> Event {
        let state = State {
            status: Status::Clear,
            at,
            value: None,
        };
        Event {
            id: format!("{device}|{}|cleared|deleted|{since}", self.key(condition)),
            cause: Some(Cause::RuleDeleted),
            ..self.event(device, condition, Kind::Cleared, &state)
        }
    }

    /// The event of `kind` that `state` (just judged) under `condition` sends for `device`.
    pub fn event(&self, device: &str, condition: Condition, kind: Kind, state: &State) -> Event {
        let (low, high, silence_minutes) = match condition {
            Condition::Band => (self.low, self.high, None),
            Condition::Silence => (None, None, self.silence_ms.map(|ms| ms / 60_000)),
        };
        Event {
            id: format!(
                "{device}|{}|{}|{}",
                self.key(condition),
                kind.name(),
                state.at
            ),
            device_id: device.to_owned(),
            rule: self.id.clone(),
            condition,
            measurement: self.measurement.name().to_owned(),
            event: kind,
            value: state.value.filter(|v| v.is_finite()),
            measured_at: format_ms(state.at),
            low,
            high,
            silence_minutes,
            cause: None,
        }
    }
}

/// Reads a list of rules (a JSON array, or one rule alone), checking every one: all are
/// returned, or the first refusal with the rule's place and id.
pub fn parse_rules(json: &str) -> Result<Vec<Rule>, RuleError> {
    let value: Value =
        serde_json::from_str(json).map_err(|e| RuleError(format!("not JSON: {e}")))?;
    let items = match value {
        Value::Array(items) => items,
        one => vec![one],
    };
    let mut rules: Vec<Rule> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let id = item
            .get("id")
            .and_then(Value::as_str)
            .map(|id| format!(" ({:?})", truncate(id, 80)))
            .unwrap_or_default();
        let rule =
            Rule::from_value(item).map_err(|e| RuleError(format!("rule {}{id}: {e}", i + 1)))?;
        if rules.iter().any(|r| r.id == rule.id) {
            return Err(RuleError(format!(
                "rule {}{id}: the id is given twice",
                i + 1
            )));
        }
        rules.push(rule);
    }
    Ok(rules)
}

/// A device's state under one rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct State {
    pub status: Status,
    /// The measurement time of the newest reading judged (`i64::MIN`: none yet).
    pub at: i64,
    /// Its value.
    pub value: Option<f64>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            status: Status::Clear,
            at: i64::MIN,
            value: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Clear,
    /// Out of band since then, not yet for long enough.
    Pending {
        since: i64,
    },
    /// Raised by the reading measured then.
    Raised {
        since: i64,
    },
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Self::Clear => "clear",
            Self::Pending { .. } => "pending",
            Self::Raised { .. } => "raised",
        }
    }

    /// Whether a processor must judge every reading of the device (and list it as active).
    pub fn is_active(self) -> bool {
        self != Self::Clear
    }
}

/// A change of state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Raised,
    Cleared,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Raised => "raised",
            Self::Cleared => "cleared",
        }
    }
}

/// What the alarms queue receives for every raise and clear. `id` is the same for every copy
/// of one change (a change can be sent twice, never lost): consumers drop repeats by it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub id: String,
    pub device_id: String,
    pub rule: String,
    pub condition: Condition,
    pub measurement: String,
    pub event: Kind,
    /// The reading's value (none for silence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// RFC 3339, UTC, milliseconds: the reading that made the change; for a silence raised,
    /// the start of the time no reading was measured in.
    pub measured_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silence_minutes: Option<i64>,
    /// Why, when no reading made the change (then `measuredAt` is when it was made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
}

/// What made a change other than a reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Cause {
    /// The rule was deleted: each alarm it had raised is cleared.
    RuleDeleted,
}

/// The rule's row in [`RULES_PARTITION`].
pub fn rule_entity(rule: &Rule) -> Map<String, Value> {
    let mut e = Map::new();
    e.insert("PartitionKey".into(), RULES_PARTITION.into());
    e.insert("RowKey".into(), rule.id.clone().into());
    e.insert("Rule".into(), rule.to_json().into());
    e
}

/// A rule's row (`row`, as read, even one that does not parse) moved to
/// [`DELETING_PARTITION`] at `moved_at`: its rule reads back with [`rule_of`], the time with
/// [`moved_at`].
pub fn deleting_entity(row: &Map<String, Value>, moved_at: i64) -> Map<String, Value> {
    // Not the service's own: metadata, and the timestamp with its type annotation.
    let own =
        |name: &str| !name.starts_with("odata.") && name.split('@').next() != Some("Timestamp");
    let mut e: Map<String, Value> = row
        .iter()
        .filter(|(name, _)| own(name))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    e.insert("PartitionKey".into(), DELETING_PARTITION.into());
    typed(&mut e, MOVED_AT, INT64, moved_at.to_string().into());
    e
}

/// When a rule being deleted was moved aside (UTC milliseconds).
pub fn moved_at(e: &Map<String, Value>) -> Option<i64> {
    e.get(MOVED_AT).and_then(integer_of)
}

const MOVED_AT: &str = "MovedAt";

/// Reads a rule's row back, checking it again (a row written by hand may be malformed).
pub fn rule_of(e: &Map<String, Value>) -> Result<Rule, RuleError> {
    let text = e
        .get("Rule")
        .and_then(Value::as_str)
        .ok_or_else(|| RuleError("the row has no Rule text".into()))?;
    let rule = Rule::parse(text)?;
    match e.get("RowKey").and_then(Value::as_str) {
        Some(key) if key == rule.id => Ok(rule),
        key => Err(RuleError(format!(
            "the row's key {key:?} is not the rule's id {:?}",
            rule.id
        ))),
    }
}

/// The key of a state under rule `id` for `condition` ([`Rule::key`]).
pub fn key(id: &str, condition: Condition) -> String {
    match condition {
        Condition::Band => id.to_owned(),
        Condition::Silence => format!("{id}~silence"),
    }
}

/// The rule id and condition a state's key names.
pub fn split_key(key: &str) -> (&str, Condition) {
    match key.strip_suffix("~silence") {
        Some(id) => (id, Condition::Silence),
        None => (key, Condition::Band),
    }
}

/// The RowKey of a device's state under a rule's key ([`Rule::key`]), in the device's
/// partition.
pub fn state_key(rule: &str) -> String {
    format!("{STATE_PREFIX}{rule}")
}

/// The OData filter of every state of `device` (its id checked by the contract).
pub fn states_filter(device: &str) -> String {
    format!(
        "PartitionKey eq '{}' and RowKey ge '{STATE_PREFIX}' and RowKey lt 'state}}'",
        device.replace('\'', "''")
    )
}

/// A state row read back: the rule it is under, the state, and the events written with it
/// that may not have reached the queue yet.
#[derive(Debug, Clone, PartialEq)]
pub struct StateRow {
    pub rule: String,
    pub state: State,
    pub unsent: Vec<Event>,
}

/// The row of `device`'s `state` under `rule`, with the events not yet sent.
pub fn state_entity(
    device: &str,
    rule: &str,
    state: &State,
    unsent: &[Event],
) -> Map<String, Value> {
    let mut e = Map::new();
    e.insert("PartitionKey".into(), device.into());
    e.insert("RowKey".into(), state_key(rule).into());
    e.insert("Status".into(), state.status.name().into());
    let since = match state.status {
        Status::Clear => None,
        Status::Pending { since } | Status::Raised { since } => Some(since),
    };
    if let Some(since) = since {
        typed(&mut e, "Since", INT64, since.to_string().into());
    }
    // Never judged (`i64::MIN`): written as the earliest time stored.
    let at = state.at.max(crate::timefmt::MIN_MS);
    typed(&mut e, "At", INT64, at.to_string().into());
    if let Some(value) = state.value.filter(|v| v.is_finite()) {
        e.insert("Value".into(), value.into());
    }
    if !unsent.is_empty() {
        e.insert(
            "Unsent".into(),
            serde_json::to_string(unsent)
                .expect("events serialise")
                .into(),
        );
    }
    e
}

/// Reads a state row; `None` when it is not one.
pub fn state_of(e: &Map<String, Value>) -> Option<StateRow> {
    let rule = e
        .get("RowKey")?
        .as_str()?
        .strip_prefix(STATE_PREFIX)?
        .to_owned();
    let int = |name: &str| e.get(name).and_then(integer_of);
    let since = int("Since");
    let status = match (e.get("Status")?.as_str()?, since) {
        ("clear", _) => Status::Clear,
        ("pending", Some(since)) => Status::Pending { since },
        ("raised", Some(since)) => Status::Raised { since },
        _ => return None,
    };
    let unsent = match e.get("Unsent").and_then(Value::as_str) {
        Some(text) if !text.is_empty() => serde_json::from_str(text).ok()?,
        _ => Vec::new(),
    };
    // Times out of the range the service stores are not read as given (a row edited by
    // hand would otherwise make them unprintable).
    let clamp = |ms: i64| ms.clamp(crate::timefmt::MIN_MS, crate::timefmt::MAX_MS);
    let status = match status {
        Status::Pending { since } => Status::Pending {
            since: clamp(since),
        },
        Status::Raised { since } => Status::Raised {
            since: clamp(since),
        },
        Status::Clear => Status::Clear,
    };
    Some(StateRow {
        rule,
        state: State {
            status,
            at: clamp(int("At")?),
            value: e.get("Value").and_then(number_of),
        },
        unsent,
    })
}

/// The active list's row of `device` under `rule`.
pub fn active_entity(device: &str, rule: &str) -> Map<String, Value> {
    let mut e = Map::new();
    e.insert("PartitionKey".into(), ACTIVE_PARTITION.into());
    e.insert("RowKey".into(), active_key(device, rule).into());
    e
}

pub fn active_key(device: &str, rule: &str) -> String {
    format!("{device}|{rule}")
}

/// The device and rule an active row names.
pub fn active_of(row_key: &str) -> Option<(&str, &str)> {
    row_key.split_once('|')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: &str) -> Rule {
        Rule::parse(json).unwrap()
    }

    fn refused(json: &str) -> String {
        Rule::parse(json).unwrap_err().to_string()
    }

    const HOT: &str = r#"{"id":"hot","prefix":"freezer-","measurement":"temperature","high":-10,"low":-40,"forSeconds":60,"hysteresis":2}"#;

    #[test]
    fn a_rule_reads_and_writes_back_the_same() {
        let r = rule(HOT);
        assert_eq!(r.target, Target::Prefix("freezer-".into()));
        assert_eq!(r.for_ms, 60_000);
        assert_eq!(Rule::parse(&r.to_json()).unwrap(), r);
        assert!(r.watches("freezer-7") && !r.watches("fridge-1"));
        let one = rule(r#"{"id":"co2","device":"room-1","measurement":"co2","high":1000}"#);
        assert_eq!(one.measurement, Measurement::Extra("co2".into()));
        assert!(one.watches("room-1") && !one.watches("room-10"));
    }

    #[test]
    fn malformed_rules_are_refused_with_a_clear_reason() {
        for (json, says) in [
            ("{", "not JSON"),
            (
                r#"{"id":"a","prefix":"","measurement":"temperature","high":1,"colour":1}"#,
                "unknown field `colour`",
            ),
            (
                r#"{"id":"","prefix":"","measurement":"temperature","high":1}"#,
                "id \"\"",
            ),
            (
                r#"{"id":"a b","prefix":"","measurement":"temperature","high":1}"#,
                "id \"a b\"",
            ),
            (
                r#"{"id":"a","measurement":"temperature","high":1}"#,
                "exactly one of device and prefix",
            ),
            (
                r#"{"id":"a","device":"x","prefix":"x","measurement":"temperature","high":1}"#,
                "exactly one",
            ),
            (
                r#"{"id":"a","device":"-x","measurement":"temperature","high":1}"#,
                "not a valid device id",
            ),
            (
                r#"{"id":"a","prefix":"x/","measurement":"temperature","high":1}"#,
                "prefix \"x/\"",
            ),
            (
                r#"{"id":"a","prefix":"","measurement":"1x","high":1}"#,
                "measurement \"1x\"",
            ),
            (
                r#"{"id":"a","prefix":"","measurement":"temperature"}"#,
                "at least one of low, high and silenceMinutes",
            ),
            (
                r#"{"id":"a","prefix":"","measurement":"temperature","silenceMinutes":0}"#,
                "from 1 to 10080",
            ),
            (
                r#"{"id":"a","prefix":"","measurement":"temperature","silenceMinutes":5,"forSeconds":9}"#,
                "need a band",
            ),
            (
                r#"{"id":"a","prefix":"","measurement":"temperature","low":5,"high":5}"#,
                "must be below high",
            ),
            (
                r#"{"id":"a","prefix":"","measurement":"temperature","low":0,"high":4,"hysteresis":2}"#,
                "leaves no value",
            ),
            (
                r#"{"id":"a","prefix":"","measurement":"temperature","high":4,"hysteresis":-1}"#,
                "must not be negative",
            ),
            (
                r#"{"id":"a","prefix":"","measurement":"temperature","high":4,"forSeconds":86401}"#,
                "at most 86400",
            ),
            (
                r#"{"id":"a","prefix":"","measurement":"temperature","high":"4"}"#,
                "not a rule",
            ),
            (
                r#"{"id":"a","prefix":"","measurement":"temperature","high":4,"forSeconds":-1}"#,
                "not a rule",
            ),
        ] {
            let error = refused(json);
            assert!(error.contains(says), "{json}: {error}");
        }
    }

    #[test]
    fn a_list_names_the_rule_at_fault_and_refuses_repeated_ids() {
        let error = parse_rules(&format!(r#"[{HOT},{{"id":"b","prefix":""}}]"#)).unwrap_err();
        assert!(
            error.to_string().starts_with("rule 2 (\"b\"): not a rule"),
            "{error}"
        );
        let error = parse_rules(&format!("[{HOT},{HOT}]")).unwrap_err();
        assert!(error.to_string().contains("given twice"), "{error}");
        assert_eq!(parse_rules(HOT).unwrap().len(), 1);
    }

    /// Judges `(at, value)` in the order given; returns the changes with their times.
    fn run(r: &Rule, readings: &[(i64, f64)]) -> (State, Vec<(Kind, i64)>) {
        let mut state = State::default();
        let changes = readings
            .iter()
            .filter_map(|&(at, v)| r.judge(&mut state, at, v).map(|k| (k, at)))
            .collect();
        (state, changes)
    }

    #[test]
    fn raises_after_the_duration_and_clears_past_the_hysteresis() {
        let r = rule(HOT);
        let s = 1_000;
        let (state, changes) = run(
            &r,
            &[
                (0, -20.0),
                (10 * s, -5.0),  // out: pending
                (40 * s, -20.0), // back in: pending cancelled
                (50 * s, -5.0),  // out again
                (90 * s, -6.0),
                (110 * s, -4.0),  // 60 s out: raised
                (120 * s, -11.0), // in band, inside the hysteresis: stays raised
                (130 * s, -12.0), // by 2: cleared
                (140 * s, -45.0), // below low
                (200 * s, -45.0),
            ],
        );
        assert_eq!(
            changes,
            vec![
                (Kind::Raised, 110 * s),
                (Kind::Cleared, 130 * s),
                (Kind::Raised, 200 * s)
            ]
        );
        assert_eq!(state.status, Status::Raised { since: 200 * s });
    }

    #[test]
    fn late_and_repeated_readings_change_nothing() {
        let r = rule(r#"{"id":"hot","device":"d","measurement":"temperature","high":10}"#);
        let (_, changes) = run(
            &r,
            &[
                (100, 20.0),
                (100, 20.0),
                (50, 0.0),
                (200, 20.0),
                (150, 0.0),
                (300, 0.0),
                (300, 0.0),
                (250, 20.0),
            ],
        );
        assert_eq!(changes, vec![(Kind::Raised, 100), (Kind::Cleared, 300)]);
    }

    #[test]
    fn a_reading_without_the_measurement_is_not_judged() {
        let r = rule(r#"{"id":"co2","device":"d","measurement":"co2","high":10}"#);
        let mut reading = Reading {
            device_id: "d".into(),
            measured_at_ms: 1,
            seq: None,
            temperature: Some(50.0),
            humidity: None,
            pressure: None,
            extras: vec![
                ("co2".into(), crate::Extra::Int(12)),
                ("fw".into(), crate::Extra::Str("1".into())),
            ],
        };
        assert_eq!(r.measurement.of(&reading), Some(12.0));
        reading.extras.remove(0);
        assert_eq!(r.measurement.of(&reading), None);
    }

    #[test]
    fn states_and_rules_round_trip_through_their_rows() {
        let r = rule(HOT);
        assert_eq!(rule_of(&rule_entity(&r)).unwrap(), r);
        let mut forged = rule_entity(&r);
        forged.insert("RowKey".into(), "other".into());
        assert!(rule_of(&forged)
            .unwrap_err()
            .to_string()
            .contains("not the rule's id"));
        let state = State {
            status: Status::Raised { since: 5 },
            at: 9,
            value: Some(-3.5),
        };
        let event = r.event("freezer-1", Condition::Band, Kind::Raised, &state);
        assert_eq!(event.id, "freezer-1|hot|raised|9");
        let row = state_entity("freezer-1", "hot", &state, std::slice::from_ref(&event));
        // As the service renders it: Int64 as strings.
        let back = state_of(&row).unwrap();
        assert_eq!(
            back,
            StateRow {
                rule: "hot".into(),
                state,
                unsent: vec![event]
            }
        );
        assert_eq!(
            active_of(&active_key("freezer-1", "hot")),
            Some(("freezer-1", "hot"))
        );
    }

    #[test]
    fn silence_is_raised_on_an_empty_window_and_cleared_by_the_next_reading() {
        let r =
            rule(r#"{"id":"quiet","prefix":"","measurement":"temperature","silenceMinutes":10}"#);
        assert!(!r.has_band() && r.silence_ms == Some(600_000));
        assert_eq!(Rule::parse(&r.to_json()).unwrap(), r);
        assert_eq!(r.key(Condition::Silence), "quiet~silence");
        assert_eq!(split_key("quiet~silence"), ("quiet", Condition::Silence));
        assert_eq!(split_key("quiet"), ("quiet", Condition::Band));
        let mut state = State::default();
        assert_eq!(r.judge_silence(&mut state, 1_000), None);
        assert!(
            !r.raise_silence(&mut state, 1_000),
            "a reading at the window's start"
        );
        assert!(r.raise_silence(&mut state, 2_000));
        assert!(!r.raise_silence(&mut state, 3_000), "raised once");
        assert_eq!(
            r.judge_silence(&mut state, 1_500),
            None,
            "older than the window"
        );
        assert_eq!(r.judge_silence(&mut state, 2_500), Some(Kind::Cleared));
        let event = r.event("d", Condition::Silence, Kind::Cleared, &state);
        assert_eq!(event.id, "d|quiet~silence|cleared|2500");
        assert_eq!((event.value, event.silence_minutes), (None, Some(10)));
    }

    #[test]
    fn a_deleted_rule_clears_each_raise_once_by_its_id() {
        let r = rule(r#"{"id":"hot","device":"d","measurement":"temperature","high":30}"#);
        let event = r.deleted_event("d", Condition::Band, 5_000, 9_000);
        assert_eq!(event.id, "d|hot|cleared|deleted|5000");
        assert_eq!(
            r.deleted_event("d", Condition::Band, 5_000, 12_000).id,
            event.id,
            "a deletion run again sends the same event"
        );
        assert_eq!(
            (event.event, event.value, event.high, event.cause),
            (Kind::Cleared, None, Some(30.0), Some(Cause::RuleDeleted))
        );
        let json = serde_json::to_string(&event).unwrap();
        assert!(json.contains(r#""cause":"ruleDeleted""#), "{json}");
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), event);
        // Events of readings carry no cause.
        let state = State {
            status: Status::Raised { since: 5_000 },
            at: 5_000,
            value: Some(31.0),
        };
        let json = serde_json::to_string(&r.event("d", Condition::Band, Kind::Raised, &state));
        assert!(!json.unwrap().contains("cause"));
        // As a query with full metadata answers it.
        let mut row = rule_entity(&r);
        for (name, value) in [
            ("odata.etag", "W/1"),
            ("odata.type", "acct.alarms"),
            ("odata.id", "https://acct/alarms(...)"),
            ("odata.editLink", "alarms(...)"),
            ("Timestamp", "2026-12-07T00:00:00Z"),
            ("Timestamp@odata.type", "Edm.DateTime"),
        ] {
            row.insert(name.into(), value.into());
        }
        let moved = deleting_entity(&row, 42);
        assert_eq!(moved["PartitionKey"], DELETING_PARTITION);
        let mut names: Vec<&str> = moved.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "MovedAt",
                "MovedAt@odata.type",
                "PartitionKey",
                "RowKey",
                "Rule"
            ]
        );
        assert_eq!(rule_of(&moved).unwrap(), r);
        assert_eq!(moved_at(&moved), Some(42));
    }
}
