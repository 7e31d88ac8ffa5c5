//! HTML escaping and the tiny template filler for the embedded pages.
//!
//! Templates under `assets/` hold `{{name}}` placeholders; every value is escaped on the way
//! in, so nothing a user controls (a display name, a persona name from a user-writable
//! IDENTITY.md, a pairing sender's name) can become markup.

use axum::http::StatusCode;

/// Escapes text for use in HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
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

/// Fills `{{key}}` placeholders with escaped values, in one pass (a value that itself looks
/// like a placeholder stays literal text).
pub fn render(template: &str, values: &[(&str, &str)]) -> String {
    let escaped: Vec<(&str, String)> = values.iter().map(|(k, v)| (*k, escape(v))).collect();
    fill(template, |key| {
        escaped
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    })
}

/// Fills `{{key}}` placeholders in one pass: `values` escaped, `markup` inserted as is (markup
/// the caller built from escaped parts). One pass matters: inserted text is never scanned for
/// placeholders again, so a name that looks like `{{audit}}` in one section cannot pull another
/// section's markup into itself.
pub fn render_with_markup(
    template: &str,
    values: &[(&str, &str)],
    markup: &[(&str, &str)],
) -> String {
    let escaped: Vec<(&str, String)> = values.iter().map(|(k, v)| (*k, escape(v))).collect();
    fill(template, |key| {
        escaped
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
            .or_else(|| markup.iter().find(|(k, _)| *k == key).map(|(_, m)| *m))
    })
}

fn fill<'a>(template: &str, lookup: impl Fn(&str) -> Option<&'a str>) -> String {
    let mut out = String::with_capacity(template.len() + 256);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => match lookup(&after[..end]) {
                Some(value) => {
                    out.push_str(value);
                    rest = &after[end + 2..];
                }
                None => {
                    out.push_str("{{");
                    rest = after;
                }
            },
            None => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

pub const ERROR_TEMPLATE: &str = include_str!("../assets/error.html");

pub fn error_page(status: StatusCode, message: &str) -> String {
    let title = status.canonical_reason().unwrap_or("Error");
    render(
        ERROR_TEMPLATE,
        &[
            ("title", title),
            ("status", status.as_str()),
            ("message", message),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_markup_like_is_escaped() {
        assert_eq!(
            escape(r#"<script>alert("x&'y")</script>"#),
            "&lt;script&gt;alert(&quot;x&amp;&#39;y&quot;)&lt;/script&gt;"
        );
        assert_eq!(
            render("<p title=\"{{a}}\">{{a}}</p>", &[("a", "\"><img>")]),
            "<p title=\"&quot;&gt;&lt;img&gt;\">&quot;&gt;&lt;img&gt;</p>"
        );
        assert_eq!(
            render("{{a}}{{b}}", &[("a", "{{b}}"), ("b", "x")]),
            "{{b}}x"
        );
    }
}
