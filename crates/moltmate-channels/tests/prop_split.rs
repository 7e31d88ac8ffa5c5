//! Property tests of Telegram message splitting (`split_message`): parts never exceed the
//! limit, no text is lost or reordered (only the separator a part was cut at, and blank parts,
//! are dropped), and no cut falls inside a surrogate pair or a grapheme cluster as the module
//! approximates them.

use moltmate_channels::telegram::split::{split_message, utf16_len, TELEGRAM_MAX_MESSAGE_UTF16};
use moltmate_testkit::prop::config as prop_config;
use proptest::prelude::*;

/// Grapheme clusters as the splitter approximates them: a base character and what may attach
/// to it. None starts with an attaching character, none is a lone regional indicator or a lone
/// `\r`, so every boundary between two of them is a safe cut.
fn cluster() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9.,!?]",
        2 => Just(" ".to_string()),
        1 => Just("\n".to_string()),
        1 => Just("\r\n".to_string()),
        1 => prop::sample::select(vec!["\t", "\u{3000}", "\u{a0}", "\u{2028}"]).prop_map(String::from),
        1 => prop::sample::select(vec!["ä", "ß", "Ж", "語", "\u{10348}", "😀", "🌍"]).prop_map(String::from),
        // Combining marks, variation selectors, keycaps.
        1 => ("[aeo]", prop::collection::vec(prop::sample::select(vec!['\u{301}', '\u{308}', '\u{fe0f}', '\u{20e3}', '\u{5b4}']), 1..3))
            .prop_map(|(base, marks)| format!("{base}{}", marks.into_iter().collect::<String>())),
        // Skin tones and ZWJ sequences.
        1 => prop::sample::select(vec![
            "👍🏽",
            "👩\u{200D}👩\u{200D}👧",
            "🏳\u{fe0f}\u{200D}🌈",
            "🏴\u{e0067}\u{e0062}\u{e0073}\u{e0063}\u{e0074}\u{e007f}",
            "1\u{fe0f}\u{20e3}",
        ]).prop_map(String::from),
        // Flags: regional indicators in pairs.
        1 => prop::sample::select(vec!["🇩🇪", "🇫🇷", "🇮🇹", "🇺🇦"]).prop_map(String::from),
    ]
}

/// A text made of clusters, with the byte offset after each cluster.
fn clustered_text() -> impl Strategy<Value = (String, Vec<usize>)> {
    prop::collection::vec(cluster(), 0..400).prop_map(|clusters| {
        let mut text = String::new();
        let mut boundaries = vec![0];
        for c in clusters {
            text.push_str(&c);
            boundaries.push(text.len());
        }
        (text, boundaries)
    })
}

/// Where each part lies in `text` (byte ranges), checking that parts appear in order and that
/// only whitespace lies between, before and after them. Fails if that is impossible.
fn locate(text: &str, parts: &[String]) -> Result<Vec<(usize, usize)>, TestCaseError> {
    let mut at = 0;
    let mut ranges = Vec::with_capacity(parts.len());
    for (n, part) in parts.iter().enumerate() {
        let mut found = None;
        let mut pos = at;
        loop {
            if text[pos..].starts_with(part.as_str()) {
                found = Some(pos);
                break;
            }
            match text[pos..].chars().next() {
                Some(c) if c.is_whitespace() => pos += c.len_utf8(),
                _ => break,
            }
        }
        let Some(start) = found else {
            return Err(TestCaseError::fail(format!(
                "part {n} {part:?} does not follow part {} after whitespace only (text lost or reordered)",
                n.wrapping_sub(1)
            )));
        };
        ranges.push((start, start + part.len()));
        at = start + part.len();
    }
    prop_assert!(
        text[at..].chars().all(char::is_whitespace),
        "text after the last part was lost: {:?}",
        &text[at..]
    );
    Ok(ranges)
}

fn check_common(
    text: &str,
    limit: usize,
    parts: &[String],
) -> Result<Vec<(usize, usize)>, TestCaseError> {
    let effective = limit.max(2);
    for part in parts {
        prop_assert!(
            utf16_len(part) <= effective,
            "a part of {} UTF-16 units exceeds the limit {effective}",
            utf16_len(part)
        );
        prop_assert!(!part.trim().is_empty(), "blank part {part:?}");
    }
    if utf16_len(text) <= effective && !text.trim().is_empty() {
        prop_assert_eq!(
            parts,
            &[text.to_string()][..],
            "a text within the limit is one part"
        );
    }
    locate(text, parts)
}

proptest! {
    #![proptest_config(prop_config(128))]

    /// Any text and any limit: parts fit, nothing but separators and blanks is dropped.
    #[test]
    fn prop_split_fits_and_keeps_any_text(
        text in prop_oneof![any::<String>(), "[a \\n]{0,300}", "(😀|e\u{301}| |\n|x){0,200}"],
        limit in prop_oneof![0usize..12, 12usize..200, Just(TELEGRAM_MAX_MESSAGE_UTF16)],
    ) {
        let parts = split_message(&text, limit);
        check_common(&text, limit, &parts)?;
    }

    /// Texts of ordinary grapheme clusters (each shorter than the limit) are cut only between
    /// clusters: never inside a surrogate pair, a combining sequence, a ZWJ sequence, a flag or
    /// a CRLF.
    #[test]
    fn prop_split_never_cuts_inside_a_cluster(
        (text, boundaries) in clustered_text(),
        limit in 16usize..300,
    ) {
        let parts = split_message(&text, limit);
        let ranges = check_common(&text, limit, &parts)?;
        for ((start, end), part) in ranges.iter().zip(&parts) {
            prop_assert!(
                boundaries.binary_search(start).is_ok() && boundaries.binary_search(end).is_ok(),
                "part {part:?} ({start}..{end}) starts or ends inside a cluster"
            );
        }
    }

    /// Text at Telegram's real limit, large inputs: the number of parts is close to the minimum.
    #[test]
    fn prop_split_at_the_real_limit_uses_few_parts(
        words in prop::collection::vec("[a-zäöü😀]{1,40}", 0..600),
    ) {
        let text = words.join(" ");
        let parts = split_message(&text, TELEGRAM_MAX_MESSAGE_UTF16);
        check_common(&text, TELEGRAM_MAX_MESSAGE_UTF16, &parts)?;
        // Cuts prefer a separator in the latter half, so every part but the last is at least
        // half full: at most twice the minimum, plus one.
        let minimum = utf16_len(&text).div_ceil(TELEGRAM_MAX_MESSAGE_UTF16);
        prop_assert!(parts.len() <= 2 * minimum + 1, "{} parts for {minimum}", parts.len());
    }
}
