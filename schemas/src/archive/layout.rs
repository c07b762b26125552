//! Where a device-day's archive lives: a blob name template, and UTC day arithmetic. The
//! archiver writes by it and the dashboard reads by it.

use std::fmt;
use std::str::FromStr;

pub const DEFAULT: &str = "{year}/{month}/{day}/{device}";
pub const DAY_MS: i64 = 86_400_000;

const PLACEHOLDERS: [&str; 4] = ["{year}", "{month}", "{day}", "{device}"];

/// A blob name template. Every placeholder is required: without one, two device-days would
/// share a blob, and merging them by timestamp would drop readings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout(String);

impl FromStr for Layout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(missing) = PLACEHOLDERS.iter().find(|p| !s.contains(*p)) {
            return Err(format!("the layout must contain {missing}"));
        }
        let mut rest = s.to_owned();
        for p in PLACEHOLDERS {
            rest = rest.replace(p, "");
        }
        if rest.contains(['{', '}']) {
            return Err(format!(
                "unknown placeholder in {s:?}; use {}",
                PLACEHOLDERS.join(", ")
            ));
        }
        if s.starts_with('/') {
            return Err("the layout must not start with '/'".into());
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Layout {
    /// The blob name of `device`'s archive for the UTC day starting at `day_ms`.
    pub fn blob_name(&self, device: &str, day_ms: i64, extension: &str) -> String {
        let date = day_of(day_ms);
        let name = self
            .0
            .replace("{year}", &format!("{:04}", date.year()))
            .replace("{month}", &format!("{:02}", u8::from(date.month())))
            .replace("{day}", &format!("{:02}", date.day()))
            .replace("{device}", device);
        format!("{name}.{extension}")
    }
}

/// The start of the UTC day holding `ms`.
pub fn floor_day(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS) * DAY_MS
}

fn day_of(day_ms: i64) -> time::Date {
    time::OffsetDateTime::from_unix_timestamp(day_ms.div_euclid(1000))
        .map(|t| t.date())
        .unwrap_or(time::Date::MIN)
}

/// `YYYY-MM-DD` of a day, for messages.
pub fn date_text(day_ms: i64) -> String {
    let d = day_of(day_ms);
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_matches_the_original_design() {
        let layout: Layout = DEFAULT.parse().unwrap();
        let day = floor_day(1_705_312_800_123); // 2024-01-15T10:00:00.123Z
        assert_eq!(
            layout.blob_name("device-123", day, "parquet"),
            "2024/01/15/device-123.parquet"
        );
        assert_eq!(date_text(day), "2024-01-15");
    }

    #[test]
    fn layouts_missing_a_placeholder_or_with_unknown_ones_are_refused() {
        for (bad, why) in [
            ("{year}/{month}/{device}", "{day}"),
            ("{year}/{month}/{day}", "{device}"),
            (
                "{year}/{month}/{day}/{device}/{hour}",
                "unknown placeholder",
            ),
            ("/{year}/{month}/{day}/{device}", "start with"),
        ] {
            let err = bad.parse::<Layout>().unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let custom: Layout = "archive/{device}/{year}-{month}-{day}".parse().unwrap();
        assert_eq!(
            custom.blob_name("d", 0, "json"),
            "archive/d/1970-01-01.json"
        );
    }

    #[test]
    fn days_floor_in_utc() {
        assert_eq!(floor_day(DAY_MS - 1), 0);
        assert_eq!(floor_day(DAY_MS), DAY_MS);
        assert_eq!(floor_day(-1), -DAY_MS);
    }
}
