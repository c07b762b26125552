//! Time formats. Internally every instant is UTC milliseconds since the Unix epoch (`i64`).

use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// Earliest instant the contract accepts: 1970-01-01T00:00:00Z.
pub const MIN_MS: i64 = 0;
/// Latest instant with a four-digit year: 9999-12-31T23:59:59.999Z. RowKeys are fixed width.
pub const MAX_MS: i64 = 253_402_300_799_999;

/// Parses RFC 3339 with an explicit offset and normalises to UTC milliseconds (sub-millisecond
/// digits are truncated). `None` for anything else, including years outside 1970-9999.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let dt = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    let ms = i64::try_from(dt.unix_timestamp_nanos().div_euclid(1_000_000)).ok()?;
    (MIN_MS..=MAX_MS).contains(&ms).then_some(ms)
}

/// Formats UTC milliseconds as fixed-width `YYYY-MM-DDTHH:MM:SS.sssZ`, so lexical order is time
/// order. This is the RowKey and the wire format of every instant this project writes.
///
/// # Panics
/// If `ms` is outside [`MIN_MS`]..=[`MAX_MS`]; validation guarantees it for readings.
pub fn format_ms(ms: i64) -> String {
    let mut out = Vec::with_capacity(24);
    write_ms(&mut out, ms);
    String::from_utf8(out).expect("the format is ASCII")
}

/// [`format_ms`] appended to `out`, without a `String` of its own.
///
/// # Panics
/// As [`format_ms`].
pub fn write_ms(out: &mut Vec<u8>, ms: i64) {
    use std::io::Write;
    assert!((MIN_MS..=MAX_MS).contains(&ms), "instant {ms} out of range");
    let dt = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .expect("range checked above")
        .to_offset(UtcOffset::UTC);
    write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.millisecond()
    )
    .expect("writing to a Vec cannot fail");
}

/// Current time in UTC milliseconds.
pub fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
        .expect("the current time fits in i64 milliseconds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_key_is_fixed_width_and_sorts_by_time() {
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (1_705_312_800_123, "2024-01-15T10:00:00.123Z"),
            (MAX_MS, "9999-12-31T23:59:59.999Z"),
        ];
        for (ms, want) in cases {
            assert_eq!(format_ms(ms), want);
            assert_eq!(parse_rfc3339_ms(want), Some(ms));
        }
        let keys: Vec<String> = [5, 1_000, 86_400_000, 1_705_312_800_123]
            .iter()
            .map(|&ms| format_ms(ms))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn parse_normalises_offsets_and_truncates() {
        assert_eq!(
            parse_rfc3339_ms("2024-01-15T12:00:00.123999+02:00"),
            parse_rfc3339_ms("2024-01-15T10:00:00.123Z")
        );
        assert_eq!(
            parse_rfc3339_ms("2024-01-15T10:00:00"),
            None,
            "offset required"
        );
        assert_eq!(parse_rfc3339_ms("1969-12-31T23:59:59Z"), None);
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
    }
}
