//! Turning what a search service sent into what the model may see: one line of plain text per
//! field, bounded, and only http(s) links.
//!
//! Everything here is text a stranger wrote (a page title, a snippet) that a search service
//! passed on, so it is shaped before anyone reads it:
//!
//! * entities are decoded and then complete tags (`<b>`, `</strong>`, `<script ...>`) removed,
//!   so neither real markup nor markup hidden behind `&lt;` survives; a `<` that starts no tag
//!   (`a < b`) stays;
//! * control characters (line breaks included, and the Unicode line and paragraph separators)
//!   become spaces and invisible formatting characters (zero-width, bidirectional overrides)
//!   are removed, then whitespace is collapsed: a field is always one line, so a result cannot
//!   fake the start of another result or the end of the list;
//! * fields are cut to [`MAX_TITLE_CHARS`] / [`MAX_SNIPPET_CHARS`] (with `…`), and at most
//!   [`MAX_FIELD_SCAN_BYTES`] of a raw field are looked at, so the work per field is bounded;
//! * a link is kept only when it parses as an `http`/`https` URL with a host, no credentials
//!   and at most [`MAX_URL_BYTES`]; the URL is shown as the parser serialises it (percent-
//!   encoded, so it holds no spaces or control characters). A result without such a link is
//!   dropped.

use serde_json::Value;
use url::Url;

/// Longest title shown, in characters.
pub const MAX_TITLE_CHARS: usize = 200;
/// Longest snippet shown, in characters.
pub const MAX_SNIPPET_CHARS: usize = 600;
/// Longest link kept, in bytes (a longer one is dropped with its result, not cut).
pub const MAX_URL_BYTES: usize = 2048;
/// Bytes of one raw field looked at; the rest is never scanned.
pub const MAX_FIELD_SCAN_BYTES: usize = 16 * 1024;
/// Longest tag removed: a `<` whose `>` is further away than this is text.
const MAX_TAG_BYTES: usize = 512;

/// One search result as shown to the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchHit {
    /// One line, at most [`MAX_TITLE_CHARS`]; the link's host when the service sent none.
    pub title: String,
    /// `http` or `https`, with a host, without credentials.
    pub url: Url,
    /// One line, at most [`MAX_SNIPPET_CHARS`]; may be empty.
    pub snippet: String,
}

/// A result from the service's fields (any JSON: a field that is not a string counts as
/// missing), or `None` when it has no usable link.
pub fn hit(
    title: Option<&Value>,
    url: Option<&Value>,
    snippet: Option<&Value>,
) -> Option<SearchHit> {
    let url = link(url?.as_str()?)?;
    let mut title = text(title.and_then(Value::as_str).unwrap_or(""), MAX_TITLE_CHARS);
    if title.is_empty() {
        title = url.host_str().unwrap_or("").to_string();
    }
    let snippet = text(
        snippet.and_then(Value::as_str).unwrap_or(""),
        MAX_SNIPPET_CHARS,
    );
    Some(SearchHit {
        title,
        url,
        snippet,
    })
}

/// An `http`/`https` link with a host and no credentials, at most [`MAX_URL_BYTES`].
pub fn link(raw: &str) -> Option<Url> {
    let raw = raw.trim();
    if raw.is_empty() || raw.len() > MAX_URL_BYTES {
        return None;
    }
    let url = Url::parse(raw).ok()?;
    let usable = matches!(url.scheme(), "http" | "https")
        && url.host_str().is_some_and(|h| !h.is_empty())
        && url.username().is_empty()
        && url.password().is_none()
        && url.as_str().len() <= MAX_URL_BYTES;
    usable.then_some(url)
}

/// One line of plain text from a raw field, at most `max_chars` characters.
pub fn text(raw: &str, max_chars: usize) -> String {
    let raw = prefix(raw, MAX_FIELD_SCAN_BYTES);
    let decoded = crate::html::decode_entities(raw);
    let untagged = strip_tags(&decoded);
    let mut out = String::with_capacity(untagged.len().min(max_chars.saturating_mul(4)));
    // Characters taken, and where the last one that still leaves room for `…` ends.
    let mut chars = 0;
    let mut room_for_ellipsis = 0;
    let mut pending_space = false;
    for c in untagged.chars() {
        if is_invisible(c) {
            continue;
        }
        if c.is_whitespace() || c.is_control() {
            pending_space = !out.is_empty();
            continue;
        }
        for c in pending_space.then_some(' ').into_iter().chain([c]) {
            if chars == max_chars {
                out.truncate(room_for_ellipsis);
                if max_chars > 0 {
                    out.push('…');
                }
                return out;
            }
            out.push(c);
            chars += 1;
            if chars + 1 == max_chars {
                room_for_ellipsis = out.len();
            }
        }
        pending_space = false;
    }
    out
}

/// The first at most `max` bytes of `s`, cut at a character boundary.
fn prefix(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Removes complete tags: `<` followed by a letter, `/`, `!` or `?`, up to the next `>` within
/// [`MAX_TAG_BYTES`]. Anything else is kept as text. Linear: each `<` looks ahead a bounded
/// distance.
fn strip_tags(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(open) = rest.find('<') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let starts_tag = after
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || matches!(c, '/' | '!' | '?'));
        let close = starts_tag
            .then(|| prefix(after, MAX_TAG_BYTES).find('>'))
            .flatten();
        match close {
            Some(close) => {
                // Other tags separate words (`a<br>b`); inline formatting does not
                // (`<b>Berlin</b>:` stays `Berlin:`).
                if !is_inline(&after[..close]) {
                    out.push(' ');
                }
                rest = &after[close + 1..];
            }
            None => {
                out.push('<');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Whether a tag (what is between `<` and `>`) is inline formatting, which does not separate
/// words: `b`, `/strong`, `em class="x"`...
fn is_inline(tag: &str) -> bool {
    const INLINE: &[&str] = &[
        "a", "abbr", "b", "bdi", "bdo", "cite", "code", "data", "dfn", "em", "font", "i", "kbd",
        "mark", "q", "s", "samp", "small", "span", "strong", "sub", "sup", "time", "u", "var",
    ];
    let name = tag.strip_prefix('/').unwrap_or(tag);
    let end = name
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(name.len());
    let name = &name[..end];
    INLINE
        .iter()
        .any(|inline| inline.eq_ignore_ascii_case(name))
}

/// Characters that change how text is displayed or read without being visible: zero-width
/// characters, bidirectional embeddings, overrides and isolates, the byte-order mark, soft
/// hyphens, and the tag characters (U+E0000 block) that can carry hidden text.
pub(crate) fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}'
        | '\u{061C}'
        | '\u{180E}'
        | '\u{200B}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{206F}'
        | '\u{FEFF}'
        | '\u{FFF9}'..='\u{FFFB}'
        | '\u{E0000}'..='\u{E007F}')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_become_one_line_of_plain_text() {
        assert_eq!(
            text("The <strong>Rust</strong> book &amp; more", 100),
            "The Rust book & more"
        );
        assert_eq!(
            text("a\nb\r\nc\td\u{2028}e\u{2029}f\u{85}g", 100),
            "a b c d e f g"
        );
        assert_eq!(text("  lots   of\n\n space  ", 100), "lots of space");
        assert_eq!(
            text("zero\u{200B}width\u{202E}rtl\u{2066}", 100),
            "zerowidthrtl"
        );
        assert_eq!(text("\u{1b}[31mred\u{7}", 100), "[31mred");
        assert_eq!(text("a < b and c > d", 100), "a < b and c > d");
        // Markup hidden behind entities is removed too.
        assert_eq!(
            text("&lt;script&gt;alert(1)&lt;/script&gt;ok", 100),
            "alert(1) ok"
        );
        assert_eq!(text("x&#10;y", 100), "x y");
        // A tag that never ends is text.
        assert_eq!(text("a <b c", 100), "a <b c");
        assert_eq!(text("line<br>break", 100), "line break");
        assert_eq!(
            text("in <b>Berlin</b>: <EM class=x>sunny</EM>", 100),
            "in Berlin: sunny"
        );
        assert_eq!(text("cell</td><td>cell", 100), "cell cell");
    }

    #[test]
    fn fields_are_cut_to_their_bound() {
        let long = "word ".repeat(1000);
        let cut = text(&long, 50);
        assert_eq!(cut.chars().count(), 50);
        assert!(cut.ends_with('…'));
        assert_eq!(text("abc", 3).chars().count(), 3);
        let huge = "é".repeat(100_000);
        assert!(text(&huge, 600).chars().count() <= 600);
    }

    #[test]
    fn only_http_links_with_a_host_and_no_credentials_are_kept() {
        for good in [
            "https://example.org/a?b=c#d",
            "http://example.org",
            " https://xn--bcher-kva.example/ ",
        ] {
            assert!(link(good).is_some(), "{good}");
        }
        for bad in [
            "javascript:alert(1)",
            "data:text/html,<script>",
            "file:///etc/passwd",
            "ftp://example.org/",
            "https://user:pw@example.org/",
            "https://user@example.org/",
            "mailto:a@example.org",
            "/relative/path",
            "",
            "https://",
        ] {
            assert!(link(bad).is_none(), "{bad}");
        }
        let long = format!("https://example.org/{}", "a".repeat(MAX_URL_BYTES));
        assert!(link(&long).is_none());
        // Spaces and control characters in a link are percent-encoded by the parser.
        let url = link("https://example.org/a b\u{7f}").unwrap();
        assert!(!url.as_str().contains(' '));
    }

    #[test]
    fn a_result_needs_a_link_and_gets_a_title() {
        assert!(hit(Some(&json!("t")), None, None).is_none());
        assert!(hit(Some(&json!("t")), Some(&json!(42)), None).is_none());
        let h = hit(
            None,
            Some(&json!("https://example.org/x")),
            Some(&json!(["no"])),
        )
        .unwrap();
        assert_eq!(h.title, "example.org");
        assert_eq!(h.snippet, "");
    }
}
