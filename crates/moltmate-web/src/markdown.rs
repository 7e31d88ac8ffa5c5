//! Model Markdown → safe HTML for the web chat.
//!
//! The model's text is parsed with `pulldown-cmark` and rendered with its HTML writer, which
//! escapes all text and code. Raw HTML in the model's text (blocks and inline) is turned into
//! text before rendering, so it is shown, never interpreted. Links keep their tag only for
//! absolute `http`, `https` and `mailto` URLs and open in a new tab with
//! `rel="noopener noreferrer"`; images are rendered as such links (no third-party image is ever
//! loaded, and the CSP `default-src 'self'` would refuse it anyway). The browser inserts this
//! HTML as produced; the page's CSP forbids inline script as a second line of defence.

use pulldown_cmark::{html, CowStr, Event, Options, Parser, Tag, TagEnd};

/// Render `markdown` as HTML safe to insert into the chat page.
pub fn to_html(markdown: &str) -> String {
    let options = Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TABLES;
    let mut links: Vec<bool> = Vec::new();
    let events = Parser::new_ext(markdown, options).map(|event| match event {
        Event::Html(raw) | Event::InlineHtml(raw) => Event::Text(raw),
        Event::Start(Tag::Link { dest_url, .. }) | Event::Start(Tag::Image { dest_url, .. }) => {
            match safe_link(&dest_url) {
                Some(url) => {
                    links.push(true);
                    Event::InlineHtml(CowStr::from(format!(
                        "<a href=\"{}\" target=\"_blank\" rel=\"noopener noreferrer\">",
                        escape(&url)
                    )))
                }
                None => {
                    links.push(false);
                    Event::Text(CowStr::Borrowed(""))
                }
            }
        }
        Event::End(TagEnd::Link) | Event::End(TagEnd::Image) => {
            if links.pop() == Some(true) {
                Event::InlineHtml(CowStr::Borrowed("</a>"))
            } else {
                Event::Text(CowStr::Borrowed(""))
            }
        }
        // Math, footnotes and metadata are not enabled; everything else is rendered by the
        // writer, which escapes text, code and attribute values.
        other => other,
    });
    let mut out = String::with_capacity(markdown.len() + markdown.len() / 4);
    html::push_html(&mut out, events);
    out
}

/// An absolute `http`, `https` or `mailto` URL, normalised (percent-encoded) by the URL parser.
fn safe_link(dest: &str) -> Option<String> {
    let url = url::Url::parse(dest.trim()).ok()?;
    matches!(url.scheme(), "http" | "https" | "mailto").then(|| url.as_str().to_string())
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_lists_emphasis_code_and_links() {
        let html = to_html("**a** _b_\n\n- x\n- y\n\n```rust\nlet a = 1 < 2;\n```\n\n[site](https://example.org/?q=1&r=2)");
        assert!(html.contains("<strong>a</strong> <em>b</em>"), "{html}");
        assert!(
            html.contains("<ul>\n<li>x</li>\n<li>y</li>\n</ul>"),
            "{html}"
        );
        assert!(
            html.contains("<code class=\"language-rust\">let a = 1 &lt; 2;"),
            "{html}"
        );
        assert!(html.contains("<a href=\"https://example.org/?q=1&amp;r=2\" target=\"_blank\" rel=\"noopener noreferrer\">site</a>"), "{html}");
    }

    #[test]
    fn raw_html_and_script_urls_never_become_markup() {
        for hostile in [
            "<script>alert(1)</script>",
            "<img src=x onerror=alert(1)>",
            "hi <b onmouseover=alert(1)>x</b>",
            "[x](javascript:alert(1))",
            "[x](JAVASCRIPT:alert(1))",
            "[x](java&#115;cript:alert(1))",
            "[x]( javascript:alert(1))",
            "[x](data:text/html,<script>alert(1)</script>)",
            "![i](javascript:alert(1))",
            "<a href=\"javascript:alert(1)\">x</a>",
            "[x](https://e.org/\"onmouseover=\"alert(1))",
            "```\n</code><script>alert(1)</script>\n```",
            "<div>\n<iframe src=//evil></iframe>\n</div>",
        ] {
            let html = to_html(hostile);
            assert_only_safe_markup(hostile, &html);
        }
    }

    /// Every tag is one the renderer emits, with no event handler, and every link is http(s).
    fn assert_only_safe_markup(input: &str, html: &str) {
        let allowed = [
            "p",
            "/p",
            "em",
            "/em",
            "strong",
            "/strong",
            "code",
            "/code",
            "pre",
            "/pre",
            "a",
            "/a",
            "ul",
            "/ul",
            "ol",
            "/ol",
            "li",
            "/li",
            "del",
            "/del",
            "blockquote",
            "/blockquote",
            "h1",
            "/h1",
            "h2",
            "/h2",
            "h3",
            "/h3",
            "hr",
            "br",
            "table",
            "/table",
            "thead",
            "/thead",
            "tbody",
            "/tbody",
            "tr",
            "/tr",
            "th",
            "/th",
            "td",
            "/td",
        ];
        let mut rest = html;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').expect("tags are closed") + start;
            let tag = &rest[start + 1..end];
            let name = tag.split([' ', '/']).find(|n| !n.is_empty()).unwrap_or("");
            let name = if tag.starts_with('/') {
                format!("/{name}")
            } else {
                name.to_string()
            };
            assert!(
                allowed.contains(&name.as_str()),
                "{input:?} → tag {tag:?} in {html}"
            );
            assert!(
                !tag.to_ascii_lowercase().contains(" on"),
                "{input:?} → {html}"
            );
            if name == "a" {
                assert!(
                    tag.starts_with("a href=\"https://") || tag.starts_with("a href=\"http://"),
                    "{input:?} → {html}"
                );
                assert!(
                    tag.ends_with("target=\"_blank\" rel=\"noopener noreferrer\""),
                    "{html}"
                );
            }
            rest = &rest[end + 1..];
        }
    }
}
