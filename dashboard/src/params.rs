//! Reading a request's path and query: pure, so every bad input has a unit test. Whatever a
//! client sends is checked here, by the contract's own rules, before it goes near a query.

use crate::problem::Problem;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use schemas::timefmt;
use std::time::Duration;

/// A query string's parameters, percent-decoded. `+` stays `+` (RFC 3986), so a time with
/// an offset such as `+01:00` works as typed.
#[derive(Debug, Default)]
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn parse(query: Option<&str>) -> Result<Self, Problem> {
        let mut out = Vec::new();
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            out.push((decode(name)?, decode(value)?));
        }
        Ok(Self(out))
    }

    /// The parameter's value; the last one wins when it is repeated.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// An RFC 3339 time, or `default` when absent.
    pub fn time(&self, name: &str, default: i64) -> Result<i64, Problem> {
        match self.get(name) {
            None | Some("") => Ok(default),
            Some(text) => timefmt::parse_rfc3339_ms(text).ok_or_else(|| {
                Problem::bad_request(format!(
                    "{name}={text:?} is not an RFC 3339 time with an offset, such as \
                     2026-11-25T10:00:00Z (write + as %2B if your client turns it into a space)"
                ))
            }),
        }
    }

    /// A half-open range `[from, to)`: `to` defaults to `now`, `from` to `to - span`. Refused
    /// when empty or longer than `max`.
    pub fn range(&self, now: i64, span: Duration, max: Duration) -> Result<(i64, i64), Problem> {
        let to = self.time("to", now)?;
        let from = self.time(
            "from",
            (to.saturating_sub(millis(span))).max(timefmt::MIN_MS),
        )?;
        if from >= to {
            return Err(Problem::bad_request(format!(
                "the range is empty: from ({}) must be before to ({})",
                timefmt::format_ms(from),
                timefmt::format_ms(to)
            )));
        }
        if to - from > millis(max) {
            return Err(Problem::bad_request(format!(
                "the range is longer than {}: ask for less (raw readings: DASHBOARD_MAX_RAW_RANGE), or for rollups",
                humantime::format_duration(max)
            )));
        }
        Ok((from, to))
    }

    /// A positive count, `default` when absent, at most `max`.
    pub fn limit(&self, default: usize, max: usize) -> Result<usize, Problem> {
        match self.get("limit") {
            None | Some("") => Ok(default.min(max)),
            Some(text) => match text.parse::<usize>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(Problem::bad_request(format!(
                    "limit={text:?}: expected a whole number from 1 to {max}"
                ))),
            },
        }
    }

    /// A duration such as `10m` or `2h`, if given.
    pub fn duration(&self, name: &str) -> Result<Option<Duration>, Problem> {
        match self.get(name) {
            None | Some("") => Ok(None),
            Some(text) => humantime::parse_duration(text).map(Some).map_err(|e| {
                Problem::bad_request(format!("{name}={text:?}: {e} (try 10m, 2h or 7days)"))
            }),
        }
    }

    /// A rollup interval: `1h` (the default) or `1d`.
    pub fn interval(&self) -> Result<schemas::rollup::Interval, Problem> {
        match self.get("interval") {
            None | Some("") => Ok(schemas::rollup::Interval::Hour),
            Some(text) => schemas::rollup::Interval::parse(text).ok_or_else(|| {
                Problem::bad_request(format!("interval={text:?}: expected 1h or 1d"))
            }),
        }
    }

    /// The answer's format.
    pub fn format(&self) -> Result<Format, Problem> {
        match self.get("format") {
            None | Some("") | Some("json") => Ok(Format::Json),
            Some("csv") => Ok(Format::Csv),
            Some("parquet") => Ok(Format::Parquet),
            Some(other) => Err(Problem::bad_request(format!(
                "format={other:?}: expected json, csv or parquet"
            ))),
        }
    }

    /// A device-id prefix: empty, or the start of a valid device id.
    pub fn prefix(&self) -> Result<&str, Problem> {
        let prefix = self.get("prefix").unwrap_or_default();
        if prefix.is_empty() || schemas::reading::is_valid_device_id(prefix) {
            Ok(prefix)
        } else {
            Err(Problem::bad_request(format!(
                "prefix={prefix:?} cannot start a device id (1-128 of A-Z a-z 0-9 . _ : -, \
                 starting with a letter or digit)"
            )))
        }
    }

    /// The device id a listing continues after.
    pub fn cursor(&self) -> Result<Option<String>, Problem> {
        let Some(text) = self.get("cursor").filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        URL_SAFE_NO_PAD
            .decode(text)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .filter(|id| schemas::reading::is_valid_device_id(id))
            .map(Some)
            .ok_or_else(|| Problem::bad_request("cursor is not one this API gave out"))
    }
}

/// The cursor that continues a listing after `device`.
pub fn cursor_after(device: &str) -> String {
    URL_SAFE_NO_PAD.encode(device)
}

/// A device id from the path, checked by the contract's rule.
pub fn device_id(segment: &str) -> Result<String, Problem> {
    let id = decode(segment)?;
    if schemas::reading::is_valid_device_id(&id) {
        Ok(id)
    } else {
        Err(Problem::bad_request(format!(
            "{id:?} is not a device id (1-128 of A-Z a-z 0-9 . _ : -, starting with a letter or digit)"
        )))
    }
}

/// The formats an answer can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    Parquet,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn decode(text: &str) -> Result<String, Problem> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Problem::bad_request("a malformed %-escape in the URL"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Problem::bad_request("the URL is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_764_064_800_000; // 2025-11-25T10:00:00Z
    const DAY: Duration = Duration::from_secs(86_400);

    fn params(q: &str) -> Params {
        Params::parse(Some(q)).unwrap()
    }

    fn refused<T: std::fmt::Debug>(r: Result<T, Problem>, why: &str) {
        let problem = r.unwrap_err();
        assert_eq!(problem.status, 400);
        assert!(
            problem.detail.contains(why),
            "{:?} lacks {why:?}",
            problem.detail
        );
    }

    #[test]
    fn ranges_default_to_the_last_span_and_are_half_open_checked() {
        assert_eq!(
            params("").range(NOW, DAY, 31 * DAY).unwrap(),
            (NOW - 86_400_000, NOW)
        );
        let (from, to) = params("from=2025-11-25T09:00:00%2B01:00&to=2025-11-25T10:00:00Z")
            .range(NOW, DAY, 31 * DAY)
            .unwrap();
        assert_eq!((from, to), (NOW - 7_200_000, NOW));
        // `+` as typed is an offset, not a space.
        assert_eq!(
            params("to=2025-11-25T11:00:00+01:00")
                .time("to", 0)
                .unwrap(),
            NOW
        );
        refused(params("from=yesterday").range(NOW, DAY, DAY), "RFC 3339");
        refused(
            params("from=2025-11-25T10:00:00Z&to=2025-11-25T10:00:00Z").range(NOW, DAY, DAY),
            "empty",
        );
        refused(
            params("from=2025-01-01T00:00:00Z").range(NOW, DAY, 31 * DAY),
            "longer than",
        );
    }

    #[test]
    fn limits_formats_and_durations() {
        assert_eq!(params("").limit(100, 1000).unwrap(), 100);
        assert_eq!(params("limit=7").limit(100, 1000).unwrap(), 7);
        for bad in ["limit=0", "limit=1001", "limit=-1", "limit=ten"] {
            refused(params(bad).limit(100, 1000), "whole number");
        }
        assert_eq!(params("format=csv").format().unwrap(), Format::Csv);
        assert_eq!(params("format=parquet").format().unwrap(), Format::Parquet);
        refused(params("format=xml").format(), "json, csv or parquet");
        assert_eq!(
            params("silent=10m").duration("silent").unwrap(),
            Some(Duration::from_secs(600))
        );
        refused(params("silent=soon").duration("silent"), "try 10m");
    }

    #[test]
    fn device_ids_prefixes_and_cursors_follow_the_contract() {
        assert_eq!(device_id("sensor-00042").unwrap(), "sensor-00042");
        assert_eq!(device_id("a%3Ab").unwrap(), "a:b");
        for bad in [
            "",
            "-x",
            "x'%20or%20'1'%3D'1",
            "x%27",
            "a%2Fb",
            "%ZZ",
            "%C3%28",
        ] {
            assert!(device_id(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(params("prefix=sensor-").prefix().unwrap(), "sensor-");
        refused(params("prefix=x'").prefix(), "cannot start");
        let cursor = cursor_after("sensor-00042");
        assert_eq!(
            params(&format!("cursor={cursor}"))
                .cursor()
                .unwrap()
                .as_deref(),
            Some("sensor-00042")
        );
        refused(params("cursor=Jw").cursor(), "gave out"); // "'"
        refused(params("cursor=!!").cursor(), "gave out");
    }

    #[test]
    fn repeated_parameters_keep_the_last() {
        assert_eq!(params("limit=1&limit=2").get("limit"), Some("2"));
        assert_eq!(params("a&b=").get("a"), Some(""));
    }
}
