//! Time formats. Internally every instant is UTC milliseconds since the Unix epoch (`i64`).

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

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
    assert!((MIN_MS..=MAX_MS).contains(&ms), "instant {ms} out of range");
    // Plain arithmetic, no formatter: the processor writes three instants per row.
    let days = ms.div_euclid(DAY_MS);
    let in_day = ms.rem_euclid(DAY_MS);
    let (year, month, day) = civil(days);
    let mut text = *b"0000-00-00T00:00:00.000Z";
    digits(&mut text[0..4], year);
    digits(&mut text[5..7], month);
    digits(&mut text[8..10], day);
    digits(&mut text[11..13], in_day / 3_600_000);
    digits(&mut text[14..16], in_day / 60_000 % 60);
    digits(&mut text[17..19], in_day / 1_000 % 60);
    digits(&mut text[20..23], in_day % 1_000);
    out.extend_from_slice(&text);
}

const DAY_MS: i64 = 86_400_000;

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days from 0 on).
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `n` in decimal, zero-padded to fill `into` (which it fits: the callers' ranges say so).
fn digits(into: &mut [u8], mut n: i64) {
    for slot in into.iter_mut().rev() {
        // A digit: 0..=9, so the cast is exact.
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Current time in UTC milliseconds.
pub fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
        .expect("the current time fits in i64 milliseconds")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The arithmetic agrees with the `time` crate's calendar across the whole range: every
    /// day of the first years, leap days and century ends, and a spread of instants.
    #[test]
    fn write_ms_agrees_with_the_calendar() {
        let reference = |ms: i64| {
            let dt = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .expect("in range");
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                dt.year(),
                u8::from(dt.month()),
                dt.day(),
                dt.hour(),
                dt.minute(),
                dt.second(),
                dt.millisecond()
            )
        };
        let days = (0..3 * 366).map(|d| d * DAY_MS + 12_345_678);
        let edges = [
            951_782_400_000 - 1, // 2000-02-28T23:59:59.999Z, then the leap day
            951_782_400_000,
            4_107_542_400_000 - 1, // 2100-02-28, no leap day that century
            4_107_542_400_000,
            MAX_MS,
        ];
        let spread = (0..10_000).map(|i| i * (MAX_MS / 10_000) + i * 7_919);
        for ms in days.chain(edges).chain(spread) {
            assert_eq!(format_ms(ms), reference(ms), "at {ms}");
        }
    }

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
