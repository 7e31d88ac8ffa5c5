//! What a due reminder says: the message the model gets for the turn (so the persona phrases
//! it), the gateway's own "late" mark on the reply, the plain notice when the user is over
//! budget, and the time note in the system prompt.

use super::rules::in_words;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use moltmate_store::ReminderFire;

/// Delivered later than this after its time, a reminder is marked late.
pub const LATE_AFTER_MS: i64 = 60_000;

fn zone_of(fire: &ReminderFire, fallback: Tz) -> Tz {
    fire.timezone.parse().unwrap_or(fallback)
}

fn time_of(millis: i64, zone: Tz) -> Option<DateTime<Tz>> {
    DateTime::from_timestamp_millis(millis).map(|t| t.with_timezone(&zone))
}

/// Whether the delivery is late: it was due while the gateway was down, or comes more than
/// [`LATE_AFTER_MS`] after its time (the user's queue was full), or occurrences were missed.
pub fn is_late(fire: &ReminderFire) -> bool {
    fire.after_downtime
        || fire.fired_at.saturating_sub(fire.due_at) > LATE_AFTER_MS
        || fire.missed > 0
}

fn german(language: &str) -> bool {
    language.starts_with("de")
}

/// The gateway's own mark on a late reminder's reply, so the user knows whatever the model
/// wrote: `(late: due at Thursday, 3 December 2026 at 08:00, Europe/Berlin)`.
pub fn late_marker(fire: &ReminderFire, language: &str, fallback: Tz) -> Option<String> {
    if !is_late(fire) {
        return None;
    }
    let zone = zone_of(fire, fallback);
    let due = time_of(fire.due_at, zone)?;
    let missed = match (fire.missed, german(language)) {
        (0, _) => String::new(),
        (n, false) => format!(
            "; {}{n} earlier time(s) passed while I was offline",
            if n >= super::rules::MAX_MISSED_COUNTED {
                "at least "
            } else {
                ""
            }
        ),
        (n, true) => format!(
            "; {}{n} frühere(r) Termin(e) fielen in die Zeit, in der ich offline war",
            if n >= super::rules::MAX_MISSED_COUNTED {
                "mindestens "
            } else {
                ""
            }
        ),
    };
    Some(if german(language) {
        format!(
            "(verspätet: fällig war {}, {}{missed})",
            due.format("%d.%m.%Y %H:%M"),
            zone.name()
        )
    } else {
        format!("(late: due at {}, {}{missed})", in_words(due), zone.name())
    })
}

/// The message the model gets when a reminder is due: what to remind of, when it was set
/// for, and whether it comes late. Not something the user typed, and marked as such.
pub fn reminder_prompt(fire: &ReminderFire, fallback: Tz) -> String {
    let zone = zone_of(fire, fallback);
    let due = time_of(fire.due_at, zone)
        .map(in_words)
        .unwrap_or_else(|| "?".to_string());
    let mut text = format!(
        "[Reminder #{} from the scheduler, not typed by your user: they asked to be reminded of this now. \
         Tell them in your own words and in their language, briefly.]\nSet for: {due} ({})",
        fire.number,
        zone.name()
    );
    if let Some(rule) = &fire.cron {
        let next = fire
            .next_at
            .and_then(|n| time_of(n, zone))
            .map(|n| format!("; next {}", in_words(n)))
            .unwrap_or_else(|| "; this was the last time".to_string());
        text.push_str(&format!("\nRepeats: cron rule \"{rule}\"{next}"));
    }
    if is_late(fire) {
        let now = time_of(fire.fired_at, zone)
            .map(in_words)
            .unwrap_or_else(|| "?".to_string());
        text.push_str(&format!(
            "\nLate: it comes only now ({now}) because the assistant was offline or busy; say that it is late."
        ));
        if fire.missed > 0 {
            text.push_str(&format!(
                " {} earlier time(s) of it passed meanwhile; they are folded into this one.",
                fire.missed
            ));
        }
    }
    text.push_str(&format!("\nReminder: {}", fire.text));
    text
}

/// The reminder as a plain message, when no model may be called for it (`notice` says which
/// budget or cap ran out).
pub fn plain_notice(fire: &ReminderFire, notice: &str, language: &str, fallback: Tz) -> String {
    let late = late_marker(fire, language, fallback)
        .map(|l| format!("\n{l}"))
        .unwrap_or_default();
    if german(language) {
        format!("⏰ Erinnerung: {}{late}\n\n{notice}", fire.text)
    } else {
        format!("⏰ Reminder: {}{late}\n\n{notice}", fire.text)
    }
}

/// The system prompt's note on the time, for users who may set reminders.
pub fn time_note(now: DateTime<Utc>, zone: Tz) -> String {
    format!(
        "\n\n## Time\n\nIt is now {} in your user's time zone ({}). Reminders you set with the \
         `schedule` tool are meant in that zone unless you name another.",
        in_words(now.with_timezone(&zone)),
        zone.name()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fire(due_at: i64, fired_at: i64, missed: u32) -> ReminderFire {
        ReminderFire {
            number: 3,
            text: "water the plants".into(),
            due_at,
            fired_at,
            timezone: "Europe/Berlin".into(),
            cron: None,
            missed,
            next_at: None,
            after_downtime: false,
        }
    }

    // 3 December 2026, 07:00 UTC = 08:00 in Berlin.
    const DUE: i64 = 1_796_281_200_000;

    #[test]
    fn on_time_reminders_carry_no_mark_and_late_ones_say_when_they_were_due() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        assert_eq!(late_marker(&fire(DUE, DUE + 2_000, 0), "en", berlin), None);
        let after_restart = ReminderFire {
            after_downtime: true,
            ..fire(DUE, DUE + 2_000, 0)
        };
        assert!(late_marker(&after_restart, "en", berlin).is_some());
        assert_eq!(
            late_marker(&fire(DUE, DUE + 3_600_000, 0), "en", berlin).as_deref(),
            Some("(late: due at Thursday, 3 December 2026 at 08:00, Europe/Berlin)")
        );
        assert_eq!(
            late_marker(&fire(DUE, DUE + 3_600_000, 2), "de", berlin).as_deref(),
            Some("(verspätet: fällig war 03.12.2026 08:00, Europe/Berlin; 2 frühere(r) Termin(e) fielen in die Zeit, in der ich offline war)")
        );
    }

    #[test]
    fn the_prompt_marks_the_reminder_as_not_typed_by_the_user_and_carries_its_text() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let prompt = reminder_prompt(&fire(DUE, DUE + 3_600_000, 0), berlin);
        assert!(prompt.starts_with("[Reminder #3 from the scheduler, not typed by your user"));
        assert!(prompt.contains("Set for: Thursday, 3 December 2026 at 08:00 (Europe/Berlin)"));
        assert!(prompt.contains("Late: it comes only now (Thursday, 3 December 2026 at 09:00)"));
        assert!(prompt.ends_with("\nReminder: water the plants"));
        let notice = plain_notice(&fire(DUE, DUE, 0), "Budget used up.", "en", berlin);
        assert_eq!(notice, "⏰ Reminder: water the plants\n\nBudget used up.");
    }
}
