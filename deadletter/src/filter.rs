//! Which dead letters a command touches: reasons, a device glob and a time range, all of which
//! must hold. Pure, so it is unit-tested.

use schemas::timefmt;
use schemas::{DeadLetter, Reason};

/// The filter flags shared by `list`, `replay`, `purge`, `export` and `import`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FilterArgs {
    /// Only these reasons (comma-separated or repeated), e.g. `stale,out_of_range`.
    #[arg(long = "reason", env = "DEADLETTER_REASON", value_delimiter = ',', value_parser = parse_reason)]
    pub reasons: Vec<Reason>,

    /// Only devices whose id matches this glob (`*` any run, `?` one character), e.g.
    /// `sensor-00*`. Records without a valid device id match only `*`.
    #[arg(long, env = "DEADLETTER_DEVICE")]
    pub device: Option<String>,

    /// Only records ingest received at or after this time: RFC 3339
    /// (`2026-11-20T08:00:00Z`) or an age such as `6h` or `2days` (that long ago).
    #[arg(long, env = "DEADLETTER_SINCE", value_parser = parse_time)]
    pub since: Option<i64>,

    /// Only records ingest received before this time (same forms as `--since`).
    #[arg(long, env = "DEADLETTER_UNTIL", value_parser = parse_time)]
    pub until: Option<i64>,
}

impl FilterArgs {
    pub fn matches(&self, record: &DeadLetter) -> bool {
        if !self.reasons.is_empty() && !self.reasons.contains(&record.reason) {
            return false;
        }
        if let Some(glob) = &self.device {
            let matched = match &record.device_id {
                Some(id) => glob_match(glob, id),
                None => glob.chars().all(|c| c == '*'),
            };
            if !matched {
                return false;
            }
        }
        if self.since.is_none() && self.until.is_none() {
            return true;
        }
        let Some(at) = timefmt::parse_rfc3339_ms(&record.received_at) else {
            return false;
        };
        self.since.is_none_or(|since| at >= since) && self.until.is_none_or(|until| at < until)
    }

    /// The filter in words, for confirmations and reports.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.reasons.is_empty() {
            let names: Vec<&str> = self.reasons.iter().map(|r| r.as_str()).collect();
            parts.push(format!("reason {}", names.join("|")));
        }
        if let Some(glob) = &self.device {
            parts.push(format!("device {glob}"));
        }
        if let Some(since) = self.since {
            parts.push(format!("received since {}", timefmt::format_ms(since)));
        }
        if let Some(until) = self.until {
            parts.push(format!("received before {}", timefmt::format_ms(until)));
        }
        if parts.is_empty() {
            "all dead letters".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

fn parse_reason(s: &str) -> Result<Reason, String> {
    Reason::ALL
        .into_iter()
        .find(|r| r.as_str() == s)
        .ok_or_else(|| {
            let known: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
            format!("unknown reason {s:?}; one of: {}", known.join(", "))
        })
}

/// An RFC 3339 time, or a duration meaning that long before now; UTC milliseconds.
fn parse_time(s: &str) -> Result<i64, String> {
    if let Some(ms) = timefmt::parse_rfc3339_ms(s) {
        return Ok(ms);
    }
    let ago = humantime::parse_duration(s).map_err(|_| {
        format!("{s:?} is neither an RFC 3339 time (2026-11-20T08:00:00Z) nor an age (6h, 2days)")
    })?;
    let ago_ms = i64::try_from(ago.as_millis()).unwrap_or(i64::MAX);
    Ok(timefmt::now_ms().saturating_sub(ago_ms))
}

/// Matches `text` against a glob of `*` (any run, even empty) and `?` (one character).
pub fn glob_match(glob: &str, text: &str) -> bool {
    let (g, t): (Vec<char>, Vec<char>) = (glob.chars().collect(), text.chars().collect());
    let (mut gi, mut ti) = (0, 0);
    // Where the last `*` was, and the text position it has absorbed up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match g.get(gi) {
            Some('*') => {
                star = Some((gi, ti));
                gi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                gi += 1;
                ti += 1;
            }
            _ => match star {
                // Let the last `*` absorb one more character and retry from there.
                Some((sg, st)) => {
                    gi = sg + 1;
                    ti = st + 1;
                    star = Some((sg, st + 1));
                }
                None => return false,
            },
        }
    }
    g[gi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::dead_letter::Refusal;
    use schemas::DeviceMessage;

    #[test]
    fn globs() {
        let cases = [
            ("*", "", true),
            ("*", "anything", true),
            ("sensor-*", "sensor-0001", true),
            ("sensor-*", "gateway-1", false),
            ("s?n*1", "sensor-0001", true),
            ("*-00?1", "sensor-0001", true),
            ("*-00?1", "sensor-0012", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("", "", true),
            ("", "x", false),
        ];
        for (glob, text, want) in cases {
            assert_eq!(glob_match(glob, text), want, "{glob:?} ~ {text:?}");
        }
    }

    fn record(reason: Reason, device: Option<&str>, received_at_ms: i64) -> DeadLetter {
        let msg = DeviceMessage::from_mqtt("devices/x/telemetry", b"{}", received_at_ms);
        DeadLetter::new(
            &msg,
            Refusal {
                reason,
                detail: String::new(),
                device_id: device.map(str::to_owned),
                rejected_indexes: Vec::new(),
                attempts: 1,
                dead_lettered_at_ms: received_at_ms,
            },
        )
    }

    #[test]
    fn filters_compose() {
        let t0 = timefmt::parse_rfc3339_ms("2026-11-20T00:00:00Z").unwrap();
        let hour = 3_600_000;
        let filter = FilterArgs {
            reasons: vec![Reason::Stale, Reason::Schema],
            device: Some("sensor-*".into()),
            since: Some(t0),
            until: Some(t0 + hour),
        };
        let check = |r: &DeadLetter| filter.matches(r);
        assert!(check(&record(Reason::Stale, Some("sensor-1"), t0)));
        assert!(check(&record(
            Reason::Schema,
            Some("sensor-2"),
            t0 + hour - 1
        )));
        assert!(!check(&record(Reason::Stale, Some("sensor-1"), t0 + hour)));
        assert!(!check(&record(Reason::Stale, Some("sensor-1"), t0 - 1)));
        assert!(!check(&record(Reason::OutOfRange, Some("sensor-1"), t0)));
        assert!(!check(&record(Reason::Stale, Some("gw-1"), t0)));
        assert!(!check(&record(Reason::Stale, None, t0)));
        assert!(FilterArgs::default().matches(&record(Reason::Poison, None, 0)));
        let any_device = FilterArgs {
            device: Some("*".into()),
            ..FilterArgs::default()
        };
        assert!(any_device.matches(&record(Reason::InvalidEnvelope, None, 0)));
    }

    #[test]
    fn times_and_reasons_parse() {
        assert_eq!(
            parse_time("2026-11-20T00:00:00Z"),
            Ok(timefmt::parse_rfc3339_ms("2026-11-20T00:00:00Z").unwrap())
        );
        let ago = parse_time("2h").unwrap();
        let expected = timefmt::now_ms() - 2 * 3_600_000;
        assert!((ago - expected).abs() < 5_000);
        assert!(parse_time("yesterday").is_err());
        assert_eq!(parse_reason("stale"), Ok(Reason::Stale));
        assert!(parse_reason("stail").unwrap_err().contains("out_of_range"));
    }
}
