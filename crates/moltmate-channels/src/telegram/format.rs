//! Model Markdown → Telegram HTML (`parse_mode: "HTML"`), split into message-sized parts.
//!
//! Models answer in Markdown. Telegram understands a small HTML subset; this module parses the
//! Markdown with `pulldown-cmark` and emits only tags Telegram documents (`b`, `i`, `s`, `code`,
//! `pre`, `blockquote`, `a href`), with every piece of text escaped (`&`, `<`, `>`; `"` inside
//! attributes). Raw HTML in the model's text is shown as text, never passed on as markup. Links
//! keep their tag only for `http`, `https` and `mailto` URLs (`javascript:` and friends become
//! plain text). Lists become bullet or number lines, headings bold lines, rules a dash line.
//!
//! Each [`Part`] also carries its plain text (what the user would see without formatting): if
//! Telegram still refuses the formatting, the channel resends that instead — a reply is never
//! lost to markup.
//!
//! Splitting counts visible text only (Telegram's limit applies after entity parsing) and never
//! cuts inside a tag or an entity: text is cut before it is escaped, and every tag open at a cut
//! is closed at the end of the part and opened again at the start of the next.

use super::split;
use pulldown_cmark::{CodeBlockKind, Event, Options, Parser, Tag, TagEnd};

/// One message to send: Telegram HTML and the same text without formatting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub html: String,
    pub plain: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// An opening tag: its name and its full text (attributes already escaped).
    Open(&'static str, String),
    Close(&'static str),
    /// Visible text, not escaped.
    Text(String),
}

/// Render `markdown` as Telegram HTML parts of at most `limit` visible UTF-16 units each.
pub fn render_parts(markdown: &str, limit: usize) -> Vec<Part> {
    split_tokens(&tokens(markdown), limit.max(16))
}

/// Escape text for Telegram HTML (text and attribute values).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// A link target Telegram may show as a link: absolute `http`, `https` or `mailto`, normalised.
pub fn safe_link(dest: &str) -> Option<String> {
    let url = reqwest::Url::parse(dest.trim()).ok()?;
    matches!(url.scheme(), "http" | "https" | "mailto").then(|| url.as_str().to_string())
}

/// A code block language usable as a class name.
fn safe_language(lang: &str) -> Option<&str> {
    let lang = lang.split_whitespace().next()?;
    (lang.len() <= 32
        && lang
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '#')))
    .then_some(lang)
}

struct Builder {
    tokens: Vec<Token>,
    /// Line breaks owed before the next visible content (block separation).
    pending_newlines: usize,
    /// Per open list: the next number (`None` for bullets).
    lists: Vec<Option<u64>>,
    /// Per open link or image: whether an `<a>` was opened for it.
    links: Vec<bool>,
    in_code_block: bool,
}

impl Builder {
    fn flush(&mut self) {
        if self.pending_newlines > 0 && !self.tokens.is_empty() {
            self.tokens
                .push(Token::Text("\n".repeat(self.pending_newlines)));
        }
        self.pending_newlines = 0;
    }
    fn text(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        self.flush();
        self.tokens.push(Token::Text(text.to_string()));
    }
    fn open(&mut self, name: &'static str, tag: String) {
        self.flush();
        self.tokens.push(Token::Open(name, tag));
    }
    fn close(&mut self, name: &'static str) {
        self.tokens.push(Token::Close(name));
    }
    fn block_end(&mut self, newlines: usize) {
        self.pending_newlines = self.pending_newlines.max(newlines);
    }
}

fn tokens(markdown: &str) -> Vec<Token> {
    let mut b = Builder {
        tokens: Vec::new(),
        pending_newlines: 0,
        lists: Vec::new(),
        links: Vec::new(),
        in_code_block: false,
    };
    for event in Parser::new_ext(markdown, Options::ENABLE_STRIKETHROUGH) {
        match event {
            Event::Start(tag) => match tag {
                Tag::Heading { .. } => b.open("b", "<b>".to_string()),
                Tag::BlockQuote(_) => b.open("blockquote", "<blockquote>".to_string()),
                Tag::CodeBlock(kind) => {
                    b.in_code_block = true;
                    b.open("pre", "<pre>".to_string());
                    if let CodeBlockKind::Fenced(lang) = kind {
                        if let Some(lang) = safe_language(&lang) {
                            b.open(
                                "code",
                                format!("<code class=\"language-{}\">", escape(lang)),
                            );
                        }
                    }
                }
                Tag::List(start) => {
                    if !b.lists.is_empty() {
                        b.block_end(1);
                    }
                    b.lists.push(start);
                }
                Tag::Item => {
                    b.block_end(1);
                    let depth = b.lists.len().saturating_sub(1).min(8);
                    let marker = match b.lists.last_mut() {
                        Some(Some(n)) => {
                            let m = format!("{n}. ");
                            *n = n.saturating_add(1);
                            m
                        }
                        _ => "• ".to_string(),
                    };
                    b.text(&format!("{}{marker}", "  ".repeat(depth)));
                }
                Tag::Emphasis => b.open("i", "<i>".to_string()),
                Tag::Strong => b.open("b", "<b>".to_string()),
                Tag::Strikethrough => b.open("s", "<s>".to_string()),
                Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. } => {
                    match safe_link(&dest_url) {
                        Some(url) => {
                            b.open("a", format!("<a href=\"{}\">", escape(&url)));
                            b.links.push(true);
                        }
                        None => b.links.push(false),
                    }
                }
                _ => {}
            },
            Event::End(tag) => match tag {
                TagEnd::Paragraph => b.block_end(if b.lists.is_empty() { 2 } else { 1 }),
                TagEnd::Heading(_) => {
                    b.close("b");
                    b.block_end(2);
                }
                TagEnd::BlockQuote(_) => {
                    b.close("blockquote");
                    b.block_end(2);
                }
                TagEnd::CodeBlock => {
                    if let Some(Token::Text(t)) = b.tokens.last_mut() {
                        // The block's final line break: Telegram shows the block without it.
                        if t.ends_with('\n') {
                            t.pop();
                        }
                    }
                    if matches!(
                        b.tokens.iter().rev().find(|t| matches!(t, Token::Open(..))),
                        Some(Token::Open("code", _))
                    ) {
                        b.close("code");
                    }
                    b.close("pre");
                    b.in_code_block = false;
                    b.block_end(2);
                }
                TagEnd::List(_) => {
                    b.lists.pop();
                    b.block_end(if b.lists.is_empty() { 2 } else { 1 });
                }
                TagEnd::Item => b.block_end(1),
                TagEnd::Emphasis => b.close("i"),
                TagEnd::Strong => b.close("b"),
                TagEnd::Strikethrough => b.close("s"),
                TagEnd::Link | TagEnd::Image if b.links.pop() == Some(true) => b.close("a"),
                _ => {}
            },
            Event::Text(text) => {
                if b.in_code_block {
                    b.flush();
                    b.tokens.push(Token::Text(text.to_string()));
                } else {
                    b.text(&text);
                }
            }
            Event::Code(code) => {
                b.open("code", "<code>".to_string());
                b.text(&code);
                b.close("code");
            }
            // Raw HTML from the model is shown as what it is: text.
            Event::Html(html) | Event::InlineHtml(html) => b.text(&html),
            Event::SoftBreak | Event::HardBreak => b.text("\n"),
            Event::Rule => {
                b.text("———");
                b.block_end(2);
            }
            Event::InlineMath(t) | Event::DisplayMath(t) => b.text(&t),
            Event::FootnoteReference(t) => b.text(&format!("[{t}]")),
            Event::TaskListMarker(done) => b.text(if done { "☑ " } else { "☐ " }),
        }
    }
    b.tokens
}

struct Splitter {
    limit: usize,
    parts: Vec<Part>,
    html: String,
    plain: String,
    units: usize,
    /// Open tags of the current part, outermost first.
    stack: Vec<(&'static str, String)>,
}

impl Splitter {
    fn finish_part(&mut self) {
        for (name, _) in self.stack.iter().rev() {
            self.html.push_str("</");
            self.html.push_str(name);
            self.html.push('>');
        }
        let html = std::mem::take(&mut self.html);
        let plain = std::mem::take(&mut self.plain);
        if !plain.trim().is_empty() {
            self.parts.push(Part {
                html: html.trim_end_matches('\n').to_string(),
                plain: plain.trim_end().to_string(),
            });
        }
        self.units = 0;
        for (_, tag) in &self.stack {
            self.html.push_str(tag);
        }
    }

    fn push_text(&mut self, text: &str) {
        // At the start of a part, separators left over from the cut are not worth a line.
        let text = if self.plain.is_empty() {
            text.trim_start_matches('\n')
        } else {
            text
        };
        self.html.push_str(&escape(text));
        self.plain.push_str(text);
        self.units += split::utf16_len(text);
    }

    fn text(&mut self, mut text: &str) {
        // A running count, not a measure of the whole rest before every cut (quadratic).
        let mut text_units = split::utf16_len(text);
        loop {
            let remaining = self.limit.saturating_sub(self.units);
            if text_units <= remaining {
                self.push_text(text);
                return;
            }
            if remaining < self.limit / 4 && self.units > 0 {
                self.finish_part();
                continue;
            }
            let (head, tail) = split::cut(text, remaining.max(2));
            text_units -= split::utf16_len(&text[..text.len() - tail.len()]);
            self.push_text(head);
            self.finish_part();
            text = tail;
        }
    }
}

fn split_tokens(tokens: &[Token], limit: usize) -> Vec<Part> {
    let mut s = Splitter {
        limit,
        parts: Vec::new(),
        html: String::new(),
        plain: String::new(),
        units: 0,
        stack: Vec::new(),
    };
    for token in tokens {
        match token {
            Token::Open(name, tag) => {
                s.html.push_str(tag);
                s.stack.push((name, tag.clone()));
            }
            Token::Close(name) => {
                if let Some(at) = s.stack.iter().rposition(|(n, _)| n == name) {
                    // Close everything opened inside it too (balanced by construction, but a
                    // stray close must never leave an unbalanced part).
                    for (inner, _) in s.stack.drain(at..).rev() {
                        s.html.push_str("</");
                        s.html.push_str(inner);
                        s.html.push('>');
                    }
                }
            }
            Token::Text(text) => s.text(text),
        }
    }
    s.stack.clear();
    s.finish_part();
    s.parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(markdown: &str) -> Part {
        let parts = render_parts(markdown, 4096);
        assert_eq!(parts.len(), 1, "{parts:?}");
        parts.into_iter().next().unwrap()
    }

    #[test]
    fn emphasis_code_lists_and_links() {
        let p = one("**Hi** _there_ `x<y`\n\n- one\n- two\n\n1. a\n2. b\n\n[site](https://example.org/a?b=1&c=2)");
        assert_eq!(
            p.html,
            "<b>Hi</b> <i>there</i> <code>x&lt;y</code>\n\n• one\n• two\n\n1. a\n2. b\n\n<a href=\"https://example.org/a?b=1&amp;c=2\">site</a>"
        );
        assert_eq!(
            p.plain,
            "Hi there x<y\n\n• one\n• two\n\n1. a\n2. b\n\nsite"
        );
    }

    #[test]
    fn code_block_with_language() {
        let p = one("```rust\nfn main() { a < b && c }\n```");
        assert_eq!(
            p.html,
            "<pre><code class=\"language-rust\">fn main() { a &lt; b &amp;&amp; c }</code></pre>"
        );
        let p = one("```\"><script>\nx\n```");
        assert_eq!(p.html, "<pre>x</pre>");
    }

    #[test]
    fn raw_html_and_hostile_links_are_text() {
        let p = one("<script>alert(1)</script> <b onclick=x>hi</b> [x](javascript:alert(1)) [y](JaVaScRiPt:alert(2))");
        assert!(!p.html.contains("<script"), "{}", p.html);
        assert!(!p.html.contains("<b "), "{}", p.html);
        assert!(!p.html.contains("href"), "{}", p.html);
        assert!(p.html.contains("&lt;script&gt;"), "{}", p.html);
        let p = one("[q](https://e.org/\"><b>x)");
        assert!(!p.html.contains("\"><b>"), "{}", p.html);
    }

    #[test]
    fn split_parts_are_balanced_and_never_cut_entities() {
        let long = format!("**{}**", "a & b < c ".repeat(1000).trim_end());
        let parts = render_parts(&long, 100);
        assert!(parts.len() > 50);
        for p in &parts {
            assert!(
                p.html.starts_with("<b>") && p.html.ends_with("</b>"),
                "{}",
                p.html
            );
            assert!(split::utf16_len(&p.plain) <= 100);
            // Every '&' starts a complete entity.
            for (i, _) in p.html.match_indices('&') {
                let rest = &p.html[i..];
                assert!(
                    rest.starts_with("&amp;")
                        || rest.starts_with("&lt;")
                        || rest.starts_with("&gt;")
                        || rest.starts_with("&quot;"),
                    "{}",
                    p.html
                );
            }
        }
        let code = format!("```\n{}\n```", "line <x>\n".repeat(2000));
        for p in render_parts(&code, 4096) {
            assert!(p.html.starts_with("<pre>") && p.html.ends_with("</pre>"));
        }
    }

    #[test]
    fn blank_input_has_no_parts() {
        assert!(render_parts("", 4096).is_empty());
        assert!(render_parts("  \n\n ", 4096).is_empty());
    }

    use proptest::prelude::*;

    fn markdownish() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("**".to_string()),
            Just("_".to_string()),
            Just("`".to_string()),
            Just("```rust\n".to_string()),
            Just("\n```\n".to_string()),
            Just("\n- ".to_string()),
            Just("\n1. ".to_string()),
            Just("\n> ".to_string()),
            Just("# ".to_string()),
            Just("[x](https://e.org/?a=1&b=2)".to_string()),
            Just("[y](javascript:alert(1))".to_string()),
            Just("<b>".to_string()),
            Just("</i>".to_string()),
            Just("&amp;".to_string()),
            Just("&".to_string()),
            Just("<".to_string()),
            Just("\n\n".to_string()),
            Just("~~".to_string()),
            Just("😀".to_string()),
            "[a-z ]{0,40}",
        ];
        prop::collection::vec(piece, 0..200).prop_map(|p| p.concat())
    }

    proptest! {
        #![proptest_config(moltmate_testkit::prop::config(256))]

        /// Whatever the model writes: every part is HTML Telegram parses, within the limit, and
        /// its visible text is the part's plain text.
        #[test]
        fn prop_every_part_parses_as_telegram_html(md in markdownish(), limit in 16usize..300) {
            for part in render_parts(&md, limit) {
                let visible = moltmate_testkit::telegram::parse_html(&part.html);
                prop_assert!(visible.is_ok(), "{:?} -> {:?}: {:?}", md, part.html, visible);
                let visible = visible.unwrap_or_default();
                prop_assert!(split::utf16_len(&visible) <= limit, "{} > {limit}", split::utf16_len(&visible));
                prop_assert_eq!(visible.trim_end(), part.plain.trim_end());
                prop_assert!(!part.html.to_ascii_lowercase().contains("href=\"javascript"));
            }
        }
    }
}
