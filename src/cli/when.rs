//! Times as a person reads them, for the readable (not `--json`) output of
//! `status` and `list`: the store keeps Unix milliseconds, which say
//! nothing at a glance. Always UTC, so two operators in different zones
//! (and the logs, which tracing writes in UTC) agree.

/// `ms` (Unix milliseconds) as `2026-11-28 01:32:04.656 UTC`.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (year, month, day) = civil_from_days(secs / 86_400);
    let of_day = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03} UTC",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60,
        ms % 1000
    )
}

/// `at` as an offset from `since`, both Unix milliseconds: `+0.034s`,
/// `+61.500s` (a clock that stepped back reads `-0.002s`).
pub fn offset(at: u64, since: u64) -> String {
    let (sign, d) = if at >= since {
        ('+', at - since)
    } else {
        ('-', since - at)
    };
    format!("{sign}{}.{:03}s", d / 1000, d % 1000)
}

/// The Gregorian (year, month, day) of a day counted from 1970-01-01
/// (Howard Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_reads_as_a_calendar_date_and_time() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000 UTC");
        // `date -u -d @1795829306.656`
        assert_eq!(utc(1_795_829_306_656), "2026-11-28 01:28:26.656 UTC");
        // Leap days, and the last millisecond of a century's leap year.
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00.000 UTC");
        assert_eq!(utc(978_307_199_999), "2000-12-31 23:59:59.999 UTC");
        assert_eq!(utc(4_107_542_400_000), "2100-03-01 00:00:00.000 UTC");
    }

    #[test]
    fn offsets_are_signed_seconds_with_milliseconds() {
        assert_eq!(offset(1_034, 1_000), "+0.034s");
        assert_eq!(offset(62_500, 1_000), "+61.500s");
        assert_eq!(offset(1_000, 1_000), "+0.000s");
        assert_eq!(offset(998, 1_000), "-0.002s");
    }
}
