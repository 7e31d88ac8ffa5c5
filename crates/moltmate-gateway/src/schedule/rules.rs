//! What the `schedule` tool accepts, checked and put into words: the arguments, one-off times
//! in a time zone (DST gaps refused with the nearest real time, overlaps taking the first
//! pass, both said), cron rules (5 fields, a bounded alphabet, a minimum interval, an
//! occurrence within the horizon), and the next occurrence after a delivery.
//!
//! Pure functions of their inputs and an explicit `now`: nothing here reads the clock, so the
//! tests can stand anywhere in time (a DST night, years ahead).

use chrono::{DateTime, Duration as Span, LocalResult, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use serde::Deserialize;

/// Longest reminder text, in characters.
pub const MAX_TEXT_CHARS: usize = 1_000;
/// Longest cron rule, in bytes.
pub const MAX_CRON_CHARS: usize = 100;
/// How far ahead a reminder may be set (about five years).
pub const HORIZON_DAYS: i64 = 5 * 366;
/// Missed occurrences counted at most when a recurring reminder was down (the rest is "more").
pub const MAX_MISSED_COUNTED: u32 = 100;

/// The cron rules' nicknames, as croner knows them.
const NICKNAMES: [&str; 6] = [
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@hourly",
];

/// A parsed call of the tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Create {
        text: String,
        when: When,
        /// An IANA zone the model named, instead of the user's own.
        timezone: Option<String>,
    },
    List,
    Cancel {
        number: i64,
    },
}

/// When a new reminder is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum When {
    /// Once, at this local wall time.
    At(NaiveDateTime),
    /// Once, this many minutes from now.
    InMinutes(i64),
    /// Recurring, by this cron rule (checked by [`plan`]).
    Cron(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawArguments {
    action: String,
    text: Option<String>,
    at: Option<String>,
    in_minutes: Option<serde_json::Value>,
    cron: Option<String>,
    timezone: Option<String>,
    id: Option<serde_json::Value>,
}

/// The JSON schema offered to the model.
pub fn parameters() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "action": {
                "type": "string",
                "enum": ["create", "list", "cancel"],
                "description": "create a reminder, list the user's reminders, or cancel one."
            },
            "text": {
                "type": "string",
                "description": "create: what to remind the user of, in their words (at most 1000 characters)."
            },
            "at": {
                "type": "string",
                "description": "create, once: the local date and time, YYYY-MM-DDTHH:MM (e.g. 2026-12-03T08:00), in the user's time zone."
            },
            "in_minutes": {
                "type": "integer",
                "minimum": 1,
                "description": "create, once: this many minutes from now (for \"in 20 minutes\")."
            },
            "cron": {
                "type": "string",
                "description": "create, recurring: a 5-field cron rule, minute hour day-of-month month day-of-week, in the user's time zone: \"0 8 * * 1-5\" = weekdays at 08:00, \"30 18 * * SUN\" = Sundays at 18:30, \"0 9 1 * *\" = the 1st of each month at 09:00."
            },
            "timezone": {
                "type": "string",
                "description": "Only when the user names a place or zone other than their own: its IANA name, e.g. America/New_York."
            },
            "id": {
                "type": "integer",
                "description": "cancel: the reminder's number, as list shows it."
            }
        },
        "required": ["action"],
        "additionalProperties": false
    })
}

fn invalid(text: impl Into<String>) -> String {
    text.into()
}

/// A whole number given as a JSON number or a string of digits (`3`, `"3"`, `"#3"`).
fn whole_number(value: &serde_json::Value, what: &str) -> Result<i64, String> {
    let parsed = match value {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) if s.len() <= 20 => {
            s.trim().trim_start_matches('#').parse::<i64>().ok()
        }
        _ => None,
    };
    parsed.ok_or_else(|| invalid(format!("{what} must be a whole number")))
}

/// Parses the tool's arguments. Errors are for the model: they say what to send instead.
pub fn parse_arguments(arguments: serde_json::Value) -> Result<Request, String> {
    let raw: RawArguments = serde_json::from_value(arguments).map_err(|e| {
        invalid(format!(
            "schedule takes {{\"action\": \"create\"|\"list\"|\"cancel\", \"text\", \"at\" | \"in_minutes\" | \"cron\", \"timezone\", \"id\"}}: {e}"
        ))
    })?;
    match raw.action.as_str() {
        "create" => {
            if raw.id.is_some() {
                return Err(invalid("create takes no id (id is for cancel)"));
            }
            let text = raw
                .text
                .ok_or_else(|| invalid("create needs the text to remind of"))?;
            let text = reminder_text(&text)?;
            let when = match (raw.at, raw.in_minutes, raw.cron) {
                (Some(at), None, None) => When::At(local_time(&at)?),
                (None, Some(minutes), None) => {
                    let minutes = whole_number(&minutes, "in_minutes")?;
                    if !(1..=HORIZON_DAYS * 24 * 60).contains(&minutes) {
                        return Err(invalid(format!(
                            "in_minutes must be from 1 to {} (about five years)",
                            HORIZON_DAYS * 24 * 60
                        )));
                    }
                    When::InMinutes(minutes)
                }
                (None, None, Some(cron)) => When::Cron(cron),
                (None, None, None) => {
                    return Err(invalid(
                        "create needs when: \"at\" (a local date and time), \"in_minutes\", or \"cron\" (recurring)",
                    ))
                }
                _ => {
                    return Err(invalid(
                        "give exactly one of \"at\", \"in_minutes\" and \"cron\"",
                    ))
                }
            };
            Ok(Request::Create {
                text,
                when,
                timezone: raw.timezone,
            })
        }
        "list" => {
            if raw.text.is_some()
                || raw.at.is_some()
                || raw.in_minutes.is_some()
                || raw.cron.is_some()
                || raw.id.is_some()
                || raw.timezone.is_some()
            {
                return Err(invalid("list takes no other arguments"));
            }
            Ok(Request::List)
        }
        "cancel" => {
            if raw.text.is_some()
                || raw.at.is_some()
                || raw.in_minutes.is_some()
                || raw.cron.is_some()
                || raw.timezone.is_some()
            {
                return Err(invalid("cancel takes only the id"));
            }
            let id = raw
                .id
                .ok_or_else(|| invalid("cancel needs the id of the reminder (list shows them)"))?;
            Ok(Request::Cancel {
                number: whole_number(&id, "id")?,
            })
        }
        other => Err(invalid(format!(
            "unknown action {:?}; use \"create\", \"list\" or \"cancel\"",
            other.chars().take(40).collect::<String>()
        ))),
    }
}

/// The reminder text: trimmed, not empty, at most [`MAX_TEXT_CHARS`], no control characters
/// but line breaks and tabs.
fn reminder_text(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err(invalid("the text is empty; say what to remind of"));
    }
    let chars = text.chars().count();
    if chars > MAX_TEXT_CHARS {
        return Err(invalid(format!(
            "the text is {chars} characters long; at most {MAX_TEXT_CHARS} are kept for a reminder (shorten it, or keep the details in a file and remind of the file)"
        )));
    }
    if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(invalid("the text holds control characters"));
    }
    Ok(text.to_string())
}

/// `YYYY-MM-DDTHH:MM[:SS]` (or a space for the `T`), without an offset: a wall time in a zone.
fn local_time(at: &str) -> Result<NaiveDateTime, String> {
    let at = at.trim();
    if at.len() > 40 {
        return Err(invalid("at is too long; write YYYY-MM-DDTHH:MM"));
    }
    for format in [
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(time) = NaiveDateTime::parse_from_str(at, format) {
            return Ok(time);
        }
    }
    if DateTime::parse_from_rfc3339(at).is_ok() || at.ends_with('Z') {
        return Err(invalid(format!(
            "at {at:?} has a UTC offset; give the local time without one (YYYY-MM-DDTHH:MM) and, if it is not the user's own zone, its IANA name in \"timezone\""
        )));
    }
    Err(invalid(format!(
        "at {at:?} is not a local date and time; write YYYY-MM-DDTHH:MM, e.g. 2026-12-03T08:00"
    )))
}

/// An IANA zone name the model gave.
pub fn zone(name: &str) -> Result<Tz, String> {
    let name = name.trim();
    if name.len() > 64 {
        return Err(invalid("timezone is too long"));
    }
    name.parse::<Tz>().map_err(|_| {
        let hint = chrono_tz::TZ_VARIANTS
            .iter()
            .find(|tz| tz.name().eq_ignore_ascii_case(name))
            .map(|tz| format!("; did you mean {:?}?", tz.name()))
            .unwrap_or_else(|| "; use an IANA name such as Europe/Berlin".to_string());
        invalid(format!("{name:?} is not a time zone{hint}"))
    })
}

/// A checked reminder, ready to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// The cron rule of a recurring reminder (as given, trimmed).
    pub cron: Option<String>,
    /// First occurrence.
    pub first: DateTime<Utc>,
    /// What was set, in words, for the model to repeat back.
    pub words: String,
}

/// A time in words: `Thursday, 3 December 2026 at 08:00` (seconds when there are some).
pub fn in_words(time: DateTime<Tz>) -> String {
    let clock = if chrono::Timelike::second(&time) == 0 {
        time.format("%H:%M")
    } else {
        time.format("%H:%M:%S")
    };
    format!("{} at {clock}", time.format("%A, %-d %B %Y"))
}

/// `08:00` of a wall time, with seconds when there are some.
fn clock_of(time: &NaiveDateTime) -> String {
    if chrono::Timelike::second(time) == 0 {
        time.format("%H:%M").to_string()
    } else {
        time.format("%H:%M:%S").to_string()
    }
}

/// The cron parser: five fields (no seconds, no years), POSIX weekdays.
fn cron_parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
}

/// Parses a cron rule after checking what it may contain, so the parser only ever sees short
/// rules of the cron alphabet.
pub fn parse_cron(rule: &str) -> Result<Cron, String> {
    let rule = rule.trim();
    if rule.is_empty() {
        return Err(invalid("the cron rule is empty"));
    }
    if rule.len() > MAX_CRON_CHARS {
        return Err(invalid(format!(
            "the cron rule is longer than {MAX_CRON_CHARS} characters"
        )));
    }
    if rule.starts_with('@') {
        if !NICKNAMES.contains(&rule.to_ascii_lowercase().as_str()) {
            return Err(invalid(format!(
                "unknown cron nickname {rule:?}; use 5 fields or one of {}",
                NICKNAMES.join(", ")
            )));
        }
    } else {
        if let Some(bad) = rule.chars().find(|c| {
            !(c.is_ascii_alphanumeric()
                || matches!(c, ' ' | '*' | ',' | '-' | '/' | '?' | '#' | '+'))
        }) {
            return Err(invalid(format!(
                "the cron rule holds {bad:?}; use digits, names (MON, JAN), * , - / and the croner extensions L W # +"
            )));
        }
        let fields = rule.split_whitespace().count();
        if fields != 5 {
            return Err(invalid(format!(
                "the cron rule has {fields} fields; it needs 5: minute hour day-of-month month day-of-week (e.g. \"0 8 * * 1-5\")"
            )));
        }
    }
    cron_parser()
        .parse(rule)
        .map_err(|e| invalid(format!("the cron rule {rule:?} is not valid: {e}")))
}

/// The shortest time between two occurrences of `cron`, in minutes, judged from the times of
/// day it allows: between neighbours within a day, and from the last time of a day to the
/// first of the next (assuming both days are allowed, which errs on the strict side).
pub fn shortest_gap_minutes(cron: &Cron) -> u32 {
    let minutes = cron.pattern.minutes.values();
    let hours = cron.pattern.hours.values();
    let mut times: Vec<u32> = hours
        .iter()
        .flat_map(|h| {
            minutes
                .iter()
                .map(move |m| u32::from(*h) * 60 + u32::from(*m))
        })
        .collect();
    times.sort_unstable();
    times.dedup();
    let (Some(first), Some(last)) = (times.first(), times.last()) else {
        return u32::MAX;
    };
    let wrap = 24 * 60 - last + first;
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .chain(std::iter::once(wrap))
        .min()
        .unwrap_or(u32::MAX)
}

/// The first occurrence of `cron` in `zone` strictly after `after`.
pub fn next_occurrence(cron: &Cron, zone: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron.find_next_occurrence(&after.with_timezone(&zone), false)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Checks a new reminder and puts it into words. `min_interval_minutes` bounds recurring
/// rules. CPU-bound for odd cron rules (a search may scan years): run off the runtime.
pub fn plan(
    when: &When,
    zone: Tz,
    now: DateTime<Utc>,
    min_interval_minutes: u32,
) -> Result<Planned, String> {
    let horizon = now + Span::days(HORIZON_DAYS);
    let zone_name = zone.name();
    match when {
        When::InMinutes(minutes) => {
            let first = now + Span::minutes(*minutes);
            Ok(Planned {
                cron: None,
                first,
                words: format!(
                    "once, {} ({zone_name})",
                    in_words(first.with_timezone(&zone))
                ),
            })
        }
        When::At(local) => {
            let (first, note) = match zone.from_local_datetime(local) {
                LocalResult::Single(t) => (t, None),
                LocalResult::Ambiguous(earlier, later) => (
                    earlier,
                    Some(format!(
                        "{} happens twice that night in {zone_name} (the clocks go back); the reminder is set for the first time, {} (UTC{}), not the second, {} (UTC{})",
                        clock_of(local),
                        earlier.format("%H:%M %Z"),
                        earlier.format("%:z"),
                        later.format("%H:%M %Z"),
                        later.format("%:z"),
                    )),
                ),
                LocalResult::None => {
                    return Err(gap_explanation(local, zone));
                }
            };
            let first_utc = first.with_timezone(&Utc);
            if first_utc <= now {
                return Err(invalid(format!(
                    "{} ({zone_name}) has passed: it is now {} there",
                    in_words(first),
                    in_words(now.with_timezone(&zone))
                )));
            }
            if first_utc > horizon {
                return Err(invalid(format!(
                    "{} is more than five years ahead; reminders reach at most five years",
                    in_words(first)
                )));
            }
            let mut words = format!("once, {} ({zone_name})", in_words(first));
            if let Some(note) = note {
                words.push_str(&format!(". Note: {note}"));
            }
            Ok(Planned {
                cron: None,
                first: first_utc,
                words,
            })
        }
        When::Cron(rule) => {
            let cron = parse_cron(rule)?;
            let gap = shortest_gap_minutes(&cron);
            if gap < min_interval_minutes {
                return Err(invalid(format!(
                    "the rule {rule:?} repeats after {gap} minute(s); recurring reminders may repeat at most every {min_interval_minutes} minutes"
                )));
            }
            let first = next_occurrence(&cron, zone, now)
                .filter(|first| *first <= horizon)
                .ok_or_else(|| {
                    invalid(format!(
                        "the rule {rule:?} has no occurrence in the next five years"
                    ))
                })?;
            Ok(Planned {
                cron: Some(rule.trim().to_string()),
                first,
                words: format!(
                    "recurring: {} ({zone_name}); next {}",
                    cron.describe().trim_end_matches('.'),
                    in_words(first.with_timezone(&zone))
                ),
            })
        }
    }
}

/// Why a wall time does not exist (the clocks jump over it), with the first time after it.
fn gap_explanation(local: &NaiveDateTime, zone: Tz) -> String {
    // Gaps are at most a few hours; step minute by minute to the first real time.
    let after = (1..=24 * 60)
        .map(|m| *local + Span::minutes(m))
        .find_map(|t| zone.from_local_datetime(&t).earliest());
    let suggestion = after
        .map(|t| format!("; the first time after it is {}", t.format("%H:%M")))
        .unwrap_or_default();
    invalid(format!(
        "{} does not exist in {} on {}: the clocks jump forward that night{suggestion}. Ask the user which time they mean, then set that",
        clock_of(local),
        zone.name(),
        local.format("%A, %-d %B %Y")
    ))
}

/// After delivering occurrence `due` of a recurring reminder at `now`: the next occurrence
/// (from the schedule, not from `now`: no drift), never sooner than `min_interval` after `due`
/// (a clock going back cannot make it fire twice in the interval), and how many occurrences
/// between `due` and `now` were missed (folded into this one delivery; counted up to
/// [`MAX_MISSED_COUNTED`]). `None`: the rule has no further occurrence.
pub fn after_delivery(
    cron: &Cron,
    zone: Tz,
    due: DateTime<Utc>,
    now: DateTime<Utc>,
    min_interval_minutes: u32,
) -> (Option<DateTime<Utc>>, u32) {
    let mut missed = 0;
    let mut cursor = due;
    while missed < MAX_MISSED_COUNTED {
        match next_occurrence(cron, zone, cursor) {
            Some(t) if t <= now => {
                missed += 1;
                cursor = t;
            }
            _ => break,
        }
    }
    let floor = due + Span::minutes(i64::from(min_interval_minutes)) - Span::seconds(1);
    (next_occurrence(cron, zone, floor.max(now)), missed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn berlin() -> Tz {
        "Europe/Berlin".parse().unwrap()
    }

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn local(text: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M").unwrap()
    }

    #[test]
    fn arguments_parse_into_requests_and_errors_say_what_to_send() {
        assert_eq!(
            parse_arguments(
                json!({"action": "create", "text": " Call mum ", "at": "2026-12-03T08:00"})
            ),
            Ok(Request::Create {
                text: "Call mum".into(),
                when: When::At(local("2026-12-03T08:00")),
                timezone: None
            })
        );
        assert_eq!(
            parse_arguments(json!({"action": "create", "text": "x", "in_minutes": "20"})),
            Ok(Request::Create {
                text: "x".into(),
                when: When::InMinutes(20),
                timezone: None
            })
        );
        assert_eq!(
            parse_arguments(
                json!({"action": "create", "text": "x", "cron": "0 8 * * 1-5", "timezone": "UTC"})
            ),
            Ok(Request::Create {
                text: "x".into(),
                when: When::Cron("0 8 * * 1-5".into()),
                timezone: Some("UTC".into())
            })
        );
        assert_eq!(
            parse_arguments(json!({"action": "list"})),
            Ok(Request::List)
        );
        assert_eq!(
            parse_arguments(json!({"action": "cancel", "id": "#3"})),
            Ok(Request::Cancel { number: 3 })
        );
        for (bad, needle) in [
            (json!({"action": "create", "text": "x"}), "needs when"),
            (
                json!({"action": "create", "at": "2026-12-03T08:00"}),
                "needs the text",
            ),
            (
                json!({"action": "create", "text": "x", "at": "2026-12-03T08:00", "cron": "0 8 * * *"}),
                "exactly one",
            ),
            (
                json!({"action": "create", "text": "   ", "in_minutes": 5}),
                "empty",
            ),
            (
                json!({"action": "create", "text": "x".repeat(1001), "in_minutes": 5}),
                "at most 1000",
            ),
            (
                json!({"action": "create", "text": "a\u{0}b", "in_minutes": 5}),
                "control",
            ),
            (
                json!({"action": "create", "text": "x", "in_minutes": 0}),
                "from 1",
            ),
            (
                json!({"action": "create", "text": "x", "in_minutes": 1.5}),
                "whole number",
            ),
            (
                json!({"action": "create", "text": "x", "at": "tomorrow at 8"}),
                "YYYY-MM-DDTHH:MM",
            ),
            (
                json!({"action": "create", "text": "x", "at": "2026-12-03T08:00:00+01:00"}),
                "offset",
            ),
            (
                json!({"action": "create", "text": "x", "at": "2026-12-03T08:00Z"}),
                "offset",
            ),
            (
                json!({"action": "create", "text": "x", "in_minutes": 5, "id": 3}),
                "no id",
            ),
            (json!({"action": "list", "id": 3}), "no other"),
            (json!({"action": "cancel"}), "needs the id"),
            (json!({"action": "cancel", "id": "three"}), "whole number"),
            (json!({"action": "delete", "id": 1}), "unknown action"),
            (json!({"action": "list", "user": "ben"}), "unknown field"),
            (json!("list"), "schedule takes"),
        ] {
            let error = parse_arguments(bad.clone()).unwrap_err();
            assert!(error.contains(needle), "{bad}: {error}");
        }
    }

    #[test]
    fn a_one_off_is_repeated_back_in_words_in_its_zone() {
        let now = utc("2026-11-30T12:00:00Z");
        let planned = plan(&When::At(local("2026-12-03T08:00")), berlin(), now, 15).unwrap();
        assert_eq!(planned.first, utc("2026-12-03T07:00:00Z"));
        assert_eq!(
            planned.words,
            "once, Thursday, 3 December 2026 at 08:00 (Europe/Berlin)"
        );
        let planned = plan(&When::InMinutes(90), berlin(), now, 15).unwrap();
        assert_eq!(planned.first, utc("2026-11-30T13:30:00Z"));
        assert!(
            planned.words.contains("14:30 (Europe/Berlin)"),
            "{}",
            planned.words
        );
    }

    #[test]
    fn past_and_absurdly_far_times_are_refused() {
        let now = utc("2026-11-30T12:00:00Z");
        let past = plan(&When::At(local("2026-11-30T12:59")), berlin(), now, 15).unwrap_err();
        assert!(
            past.contains("has passed") && past.contains("13:00"),
            "{past}"
        );
        let far = plan(&When::At(local("2032-01-01T00:00")), berlin(), now, 15).unwrap_err();
        assert!(far.contains("five years"), "{far}");
        assert!(plan(&When::At(local("2031-11-01T00:00")), berlin(), now, 15).is_ok());
    }

    #[test]
    fn a_time_in_the_dst_gap_is_refused_with_the_first_real_time_after_it() {
        // 29 March 2026, Berlin: 02:00 jumps to 03:00.
        let now = utc("2026-03-20T12:00:00Z");
        let error = plan(&When::At(local("2026-03-29T02:30")), berlin(), now, 15).unwrap_err();
        assert!(
            error.contains("02:30 does not exist in Europe/Berlin")
                && error.contains("jump forward")
                && error.contains("03:00"),
            "{error}"
        );
    }

    #[test]
    fn a_time_in_the_dst_overlap_takes_the_first_pass_and_says_so() {
        // 25 October 2026, Berlin: 03:00 CEST goes back to 02:00 CET.
        let now = utc("2026-10-20T12:00:00Z");
        let planned = plan(&When::At(local("2026-10-25T02:30")), berlin(), now, 15).unwrap();
        assert_eq!(planned.first, utc("2026-10-25T00:30:00Z"), "02:30 CEST");
        assert!(
            planned.words.contains("happens twice")
                && planned.words.contains("02:30 CEST (UTC+02:00)")
                && planned.words.contains("02:30 CET (UTC+01:00)"),
            "{}",
            planned.words
        );
    }

    #[test]
    fn cron_rules_are_bounded_checked_and_described() {
        let now = utc("2026-11-30T12:00:00Z"); // a Monday
        let planned = plan(&When::Cron("0 8 * * 1-5".into()), berlin(), now, 15).unwrap();
        assert_eq!(planned.first, utc("2026-12-01T07:00:00Z"), "Tuesday 08:00");
        assert!(
            planned.words.starts_with("recurring: At 08:00, on Monday")
                && planned
                    .words
                    .contains("next Tuesday, 1 December 2026 at 08:00"),
            "{}",
            planned.words
        );
        assert!(plan(&When::Cron("@daily".into()), berlin(), now, 15).is_ok());
        assert!(plan(&When::Cron("*/15 * * * *".into()), berlin(), now, 15).is_ok());
        for (rule, needle) in [
            ("* * * * *", "repeats after 1 minute"),
            ("*/5 * * * *", "repeats after 5 minute"),
            ("0,59 0,23 * * *", "repeats after 1 minute"),
            ("0 8 * * * *", "6 fields"),
            ("0 8 * *", "4 fields"),
            ("0 8 * * * 2030", "6 fields"),
            ("0 0 31 2 *", "no occurrence"),
            ("0 8 * * $(id)", "holds '$'"),
            ("@reboot", "unknown cron nickname"),
            ("61 8 * * *", "not valid"),
            ("", "empty"),
        ] {
            let error = plan(&When::Cron(rule.into()), berlin(), now, 15).unwrap_err();
            assert!(error.contains(needle), "{rule}: {error}");
        }
        let long = format!("0 8 * * {}", "1,".repeat(60));
        assert!(plan(&When::Cron(long), berlin(), now, 15)
            .unwrap_err()
            .contains("longer than"));
        // The minimum interval is the operator's.
        assert!(plan(&When::Cron("0 * * * *".into()), berlin(), now, 60).is_ok());
        assert!(plan(&When::Cron("*/30 * * * *".into()), berlin(), now, 60).is_err());
    }

    #[test]
    fn the_next_occurrence_follows_the_schedule_not_the_delivery_time() {
        let cron = parse_cron("0 8 * * *").unwrap();
        let due = utc("2026-12-03T07:00:00Z");
        // Delivered 40 s late: the next one is still 08:00 tomorrow, not 08:00:40.
        let (next, missed) = after_delivery(&cron, berlin(), due, due + Span::seconds(40), 15);
        assert_eq!(next, Some(utc("2026-12-04T07:00:00Z")));
        assert_eq!(missed, 0);
    }

    #[test]
    fn occurrences_missed_during_downtime_collapse_into_one_delivery() {
        let cron = parse_cron("0 8 * * *").unwrap();
        let due = utc("2026-12-03T07:00:00Z");
        // Down for three and a half days: one delivery now, three missed, next tomorrow.
        let now = utc("2026-12-06T19:00:00Z");
        let (next, missed) = after_delivery(&cron, berlin(), due, now, 15);
        assert_eq!(missed, 3);
        assert_eq!(next, Some(utc("2026-12-07T07:00:00Z")));
        // Counting stops at a bound for a long outage of a frequent rule.
        let every_quarter = parse_cron("*/15 * * * *").unwrap();
        let (next, missed) =
            after_delivery(&every_quarter, berlin(), due, due + Span::days(30), 15);
        assert_eq!(missed, MAX_MISSED_COUNTED);
        assert_eq!(next, Some(due + Span::days(30) + Span::minutes(15)));
    }

    #[test]
    fn recurring_reminders_keep_their_wall_time_across_dst_and_skip_nothing_twice() {
        let cron = parse_cron("30 2 * * *").unwrap();
        // Spring forward: 02:30 does not exist on 29 March; croner fires at 03:00 that day.
        let (next, _) = after_delivery(
            &cron,
            berlin(),
            utc("2026-03-28T01:30:00Z"),
            utc("2026-03-28T01:30:01Z"),
            15,
        );
        assert_eq!(next, Some(utc("2026-03-29T01:00:00Z")), "03:00 CEST");
        // Fall back: 02:30 happens twice on 25 October; a fixed-time rule fires once.
        let first = utc("2026-10-25T00:30:00Z"); // 02:30 CEST
        let (next, _) = after_delivery(&cron, berlin(), first, first + Span::seconds(5), 15);
        assert_eq!(
            next,
            Some(utc("2026-10-26T01:30:00Z")),
            "02:30 CET the next day"
        );
        // An interval rule in the repeated hour: each wall time once per pass, never closer
        // than the minimum interval.
        let half_hourly = parse_cron("*/30 * * * *").unwrap();
        let mut at = utc("2026-10-24T23:30:00Z");
        let mut seen = Vec::new();
        for _ in 0..6 {
            let (next, _) = after_delivery(&half_hourly, berlin(), at, at, 30);
            let next = next.unwrap();
            assert!(next - at >= Span::minutes(30), "{at} -> {next}");
            seen.push(next);
            at = next;
        }
        assert_eq!(seen.last(), Some(&utc("2026-10-25T02:30:00Z")));
    }

    #[test]
    fn shortest_gaps_are_read_from_the_times_of_day() {
        let gap = |rule: &str| shortest_gap_minutes(&parse_cron(rule).unwrap());
        assert_eq!(gap("0 8 * * *"), 24 * 60);
        assert_eq!(gap("*/15 * * * *"), 15);
        assert_eq!(gap("0,30 9-17 * * 1-5"), 30);
        assert_eq!(gap("0 0,23 * * *"), 60);
        assert_eq!(gap("@hourly"), 60);
        assert_eq!(gap("59 23 * * *"), 24 * 60);
    }

    #[test]
    fn zones_are_iana_names() {
        assert_eq!(zone("Asia/Tokyo").unwrap().name(), "Asia/Tokyo");
        assert!(zone("asia/tokyo").unwrap_err().contains("Asia/Tokyo"));
        assert!(zone("Mars/Olympus").unwrap_err().contains("IANA"));
        assert!(zone(&"A".repeat(100)).unwrap_err().contains("too long"));
    }
}
