//! Text helpers shared by the SVG and the Markdown: times, escaping.

use crate::model::Time;

/// A duration in milliseconds as `h:mm:ss` (hours are not wrapped at 24).
#[must_use]
pub fn hms(ms: u64) -> String {
    let s = ms / 1000;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// Text safe inside an XML element or a quoted attribute value.
///
/// Characters XML 1.0 forbids (control characters other than tab, newline and carriage return)
/// become U+FFFD.
#[must_use]
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// Text safe in one cell of a Markdown table: `|` escaped, line breaks folded into spaces, and
/// `<` / `>` as entities so a message never opens an HTML tag.
#[must_use]
pub fn md_cell(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut last_space = false;
    for c in s.trim().chars() {
        let space = matches!(c, '\n' | '\r' | '\t');
        if space {
            if !last_space {
                out.push(' ');
            }
            last_space = true;
            continue;
        }
        last_space = false;
        match c {
            '|' => out.push_str("\\|"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// At most `max` characters of `s`, with `…` when cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// Unix milliseconds from 2000-01-01 on are shown as a UTC date; smaller values are a clock that
/// started near zero (the simulator's).
const CALENDAR_FROM_MS: u64 = 946_684_800_000;

/// Where `t` lies, for "t = 0 at …": a UTC date and time for Unix times, else the clock reading.
pub(crate) fn describe_instant(t: Time) -> String {
    if t.0 < CALENDAR_FROM_MS {
        return format!("clock {}", hms(t.0));
    }
    let secs = t.0 / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let (y, m, d) = civil_from_days(days);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Year, month, day of a day count since 1970-01-01 (proleptic Gregorian; H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hms_formats_hours_minutes_seconds() {
        assert_eq!(hms(0), "0:00:00");
        assert_eq!(hms(61_999), "0:01:01");
        assert_eq!(hms(90_000_000), "25:00:00");
    }

    #[test]
    fn xml_escape_escapes_markup_and_control_characters() {
        assert_eq!(
            xml_escape("a<b>&\"c\"'\u{1}"),
            "a&lt;b&gt;&amp;&quot;c&quot;&apos;\u{FFFD}"
        );
    }

    #[test]
    fn md_cell_escapes_pipes_and_folds_lines() {
        assert_eq!(md_cell(" a|b\n\nc <x> "), "a\\|b c &lt;x&gt;");
    }

    #[test]
    fn instants_are_dates_for_unix_times_and_clock_readings_otherwise() {
        assert_eq!(describe_instant(Time(61_000)), "clock 0:01:01");
        assert_eq!(
            describe_instant(Time(1_700_000_000_000)),
            "2023-11-14 22:13:20 UTC"
        );
        assert_eq!(
            describe_instant(Time(951_782_400_000)),
            "2000-02-29 00:00:00 UTC"
        );
    }

    #[test]
    fn truncate_marks_the_cut() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }
}
