//! Splitting long replies into Telegram-sized messages.
//!
//! Telegram limits a message to 4096 characters *as UTF-16 code units* (an emoji outside the
//! Basic Multilingual Plane counts twice). A reply above the limit is cut into parts, preferably
//! after a line break, else after whitespace, else at the last safe point before the limit.
//! A safe point is never inside a surrogate pair (we cut at `char` boundaries) and, as far as a
//! dependency-free approximation allows, never inside a grapheme cluster: we do not cut before a
//! combining mark, a variation selector, an emoji modifier or tag, a zero-width joiner, or right
//! after a joiner, and we keep regional-indicator pairs (flags) together.

/// Telegram's maximum message length in UTF-16 code units.
pub const TELEGRAM_MAX_MESSAGE_UTF16: usize = 4096;

/// Length of `text` as Telegram counts it.
pub fn utf16_len(text: &str) -> usize {
    text.chars().map(char::len_utf16).sum()
}

/// Split `text` into parts of at most `limit` UTF-16 code units each, in order.
///
/// Parts that would be empty or whitespace-only are dropped (Telegram refuses them). The single
/// line break (`\n` or `\r\n`) or space a part was cut at is dropped too; all other characters
/// are preserved.
/// `limit` below 2 is treated as 2 so a surrogate pair always fits.
pub fn split_message(text: &str, limit: usize) -> Vec<String> {
    let limit = limit.max(2);
    let mut parts = Vec::new();
    let mut rest = text;
    // Kept as a running count: measuring the whole rest before every cut made splitting
    // quadratic in the reply's length.
    let mut rest_units = utf16_len(rest);
    while rest_units > limit {
        let (part, next) = cut(rest, limit);
        rest_units -= utf16_len(&rest[..rest.len() - next.len()]);
        push_part(&mut parts, part);
        rest = next;
    }
    push_part(&mut parts, rest);
    parts
}

fn push_part(parts: &mut Vec<String>, part: &str) {
    if !part.trim().is_empty() {
        parts.push(part.to_string());
    }
}

/// Split `rest` (longer than `limit`) into a head of at most `limit` units and the remainder.
pub(crate) fn cut(rest: &str, limit: usize) -> (&str, &str) {
    // Byte offset just past the last char that still fits, and the UTF-16 offset of each
    // candidate boundary so we can tell whether a separator lies in the latter half.
    let mut fits_until = 0;
    let mut units = 0;
    let mut last_newline: Option<(usize, usize)> = None;
    let mut last_space: Option<(usize, usize)> = None;
    let mut last_safe = 0;
    let mut prev: Option<char> = None;
    // Regional indicators right before the current char (counted as we go: counting back from
    // each candidate made a run of flags quadratic).
    let mut flags_before = 0usize;
    for (idx, c) in rest.char_indices() {
        let width = c.len_utf16();
        if units + width > limit {
            break;
        }
        if idx > 0 && is_safe_boundary(prev, c, flags_before) {
            last_safe = idx;
        }
        flags_before = if is_regional_indicator(c) {
            flags_before + 1
        } else {
            0
        };
        if c == '\n' {
            last_newline = Some((idx, units));
        } else if c.is_whitespace() {
            last_space = Some((idx, units));
        }
        units += width;
        fits_until = idx + c.len_utf8();
        prev = Some(c);
    }
    // The boundary right after the last fitting char is also a candidate.
    if let Some(next) = rest[fits_until..].chars().next() {
        if is_safe_boundary(prev, next, flags_before) {
            last_safe = fits_until;
        }
    }
    let half = limit / 2;
    for (idx, at_units) in [last_newline, last_space].into_iter().flatten() {
        if at_units >= half && idx > 0 {
            // A CRLF is one line break, dropped whole (the `\n` may be the separator found, or
            // the `\r`, which is whitespace too): a part never ends with half of it.
            let (end, next) = if rest[idx..].starts_with("\r\n") {
                (idx, idx + 2)
            } else if rest[idx..].starts_with('\n') && rest[..idx].ends_with('\r') {
                (idx - 1, idx + 1)
            } else {
                let sep_len = rest[idx..].chars().next().map_or(1, char::len_utf8);
                (idx, idx + sep_len)
            };
            return (&rest[..end], &rest[next..]);
        }
    }
    let at = if last_safe > 0 {
        last_safe
    } else if fits_until > 0 {
        // A single grapheme longer than the limit (e.g. thousands of combining marks): cutting
        // it is unavoidable, but a char boundary still keeps surrogate pairs whole.
        fits_until
    } else {
        // Unreachable for limit >= 2 (every char is at most 2 units), but never loop forever.
        rest.chars().next().map_or(rest.len(), char::len_utf8)
    };
    (&rest[..at], &rest[at..])
}

/// Whether cutting between `prev` and `next` keeps grapheme clusters whole (approximation).
/// `flags_before`: how many regional indicators end the text before the cut.
fn is_safe_boundary(prev: Option<char>, next: char, flags_before: usize) -> bool {
    let Some(prev) = prev else { return true };
    if prev == '\u{200D}' || extends_previous(next) {
        return false;
    }
    if prev == '\r' && next == '\n' {
        return false;
    }
    if is_regional_indicator(prev) && is_regional_indicator(next) {
        // Flags are pairs: cut only after an even-length run of regional indicators.
        return flags_before.is_multiple_of(2);
    }
    true
}

/// Characters that attach to the preceding one.
fn extends_previous(c: char) -> bool {
    matches!(c as u32,
        0x0300..=0x036F      // combining diacritical marks
        | 0x0483..=0x0489
        | 0x0591..=0x05BD
        | 0x0610..=0x061A
        | 0x064B..=0x065F
        | 0x0900..=0x0903    // Devanagari signs
        | 0x093A..=0x094F
        | 0x1AB0..=0x1AFF
        | 0x1DC0..=0x1DFF
        | 0x200C..=0x200D    // ZWNJ, ZWJ
        | 0x20D0..=0x20FF    // combining marks for symbols (keycaps)
        | 0xFE00..=0xFE0F    // variation selectors
        | 0xFE20..=0xFE2F
        | 0x1F3FB..=0x1F3FF  // emoji skin-tone modifiers
        | 0xE0020..=0xE007F  // tag characters (subdivision flags)
        | 0xE0100..=0xE01EF) // variation selectors supplement
}

fn is_regional_indicator(c: char) -> bool {
    matches!(c as u32, 0x1F1E6..=0x1F1FF)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_parts_fit(parts: &[String], limit: usize) {
        for p in parts {
            assert!(
                utf16_len(p) <= limit,
                "part of {} units exceeds {limit}",
                utf16_len(p)
            );
        }
    }

    #[test]
    fn short_text_is_one_part() {
        assert_eq!(split_message("hello", 4096), vec!["hello".to_string()]);
    }

    #[test]
    fn empty_and_blank_texts_have_no_parts() {
        assert!(split_message("", 10).is_empty());
        assert!(split_message("  \n ", 10).is_empty());
    }

    #[test]
    fn prefers_newline_in_latter_half() {
        let text = "aaaaaaa\nbbbbbbbbbb";
        let parts = split_message(text, 10);
        assert_eq!(parts, vec!["aaaaaaa".to_string(), "bbbbbbbbbb".to_string()]);
    }

    #[test]
    fn falls_back_to_space() {
        let parts = split_message("aaaa bbbb cccc", 10);
        assert_eq!(parts, vec!["aaaa bbbb".to_string(), "cccc".to_string()]);
    }

    #[test]
    fn hard_cut_without_separators() {
        let parts = split_message(&"x".repeat(25), 10);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts.concat(), "x".repeat(25));
        assert_parts_fit(&parts, 10);
    }

    #[test]
    fn never_splits_surrogate_pairs() {
        let text = "😀".repeat(9); // 18 units
        let parts = split_message(&text, 5);
        assert_parts_fit(&parts, 5);
        assert_eq!(parts.concat(), text);
        assert!(parts.iter().all(|p| p.chars().all(|c| c == '😀')));
    }

    #[test]
    fn keeps_skin_tone_and_zwj_sequences_together() {
        let family = "👩\u{200D}👩\u{200D}👧"; // 8 units
        let thumbs = "👍🏽"; // 4 units
        let text = format!("{thumbs}{family}{thumbs}{family}");
        let parts = split_message(&text, 9);
        assert_parts_fit(&parts, 9);
        assert_eq!(parts.concat(), text);
        for p in &parts {
            assert!(!p.starts_with('\u{200D}') && !p.ends_with('\u{200D}'));
            assert!(!p.starts_with('\u{1F3FD}'));
        }
    }

    #[test]
    fn keeps_flags_together() {
        let text = "🇩🇪🇫🇷🇮🇹"; // 3 flags, 12 units
        let parts = split_message(text, 6);
        assert_eq!(
            parts,
            vec!["🇩🇪".to_string(), "🇫🇷".to_string(), "🇮🇹".to_string()]
        );
    }

    #[test]
    fn combining_marks_stay_with_base() {
        let text = "e\u{0301}".repeat(6); // 12 units
        let parts = split_message(&text, 5);
        assert_parts_fit(&parts, 5);
        for p in &parts {
            assert!(!p.starts_with('\u{0301}'));
        }
        assert_eq!(parts.concat(), text);
    }

    #[test]
    fn crlf_line_break_is_not_cut_in_half() {
        // Found by proptest: the cut at a line break took `\n` and left the `\r` at the end of
        // the part, inside the CRLF pair.
        let parts = split_message("aaaa\r\nbbbb", 6);
        assert_eq!(parts, vec!["aaaa".to_string(), "bbbb".to_string()]);
        // `\r` is whitespace, so it can be the separator found too.
        let parts = split_message("aaaa bbbb\r\ncc", 10);
        assert_eq!(parts, vec!["aaaa bbbb".to_string(), "cc".to_string()]);
        let parts = split_message("\r\nxxxxxxxx", 8);
        assert_parts_fit(&parts, 8);
        assert!(
            parts
                .iter()
                .all(|p| !p.ends_with('\r') && !p.starts_with('\n')),
            "{parts:?}"
        );
    }

    #[test]
    fn huge_grapheme_is_still_cut() {
        let text = format!("a{}", "\u{0301}".repeat(20));
        let parts = split_message(&text, 8);
        assert_parts_fit(&parts, 8);
        assert_eq!(parts.concat(), text);
    }

    #[test]
    fn real_limit_with_emoji_text() {
        let text = "Hallo 🌍 Welt! ".repeat(1000);
        let parts = split_message(&text, TELEGRAM_MAX_MESSAGE_UTF16);
        assert!(parts.len() > 1);
        assert_parts_fit(&parts, TELEGRAM_MAX_MESSAGE_UTF16);
        let rejoined: String = parts.join(" ");
        assert_eq!(
            rejoined.split_whitespace().count(),
            text.split_whitespace().count()
        );
    }
}
