//! Property tests of HTML extraction for `web_fetch`, on the public contract only
//! (`html::html_to_text`), so they hold for any implementation:
//!
//! * any text, and any soup of tags, attributes, comments, entities and broken markup, gives a
//!   result without panicking;
//! * the output is bounded by the input: a few times its size, plus the base URL for each link
//!   (links are written out resolved against the page);
//! * nothing inside `<script>`, `<style>` or the other non-content elements, inside comments,
//!   or inside attributes other than `href`/`alt`, reaches the output.

use moltmate_testkit::prop::config as prop_config;
use proptest::prelude::*;
use url::Url;

/// The function under test, in one place so a signature change is a one-line change here.
fn to_text(html: &str, base: Option<&Url>) -> String {
    moltmate_tools::html::html_to_text(html, base)
}

/// Never produced by the generators except where a test plants it.
const MARKER: &str = "QZXLEAK";

fn base() -> impl Strategy<Value = Option<Url>> {
    prop_oneof![
        Just(None),
        Just(Url::parse("https://example.com/").ok()),
        Just(
            Url::parse("https://very-long-host-name.example.org/some/deep/path/page.html?query=1")
                .ok()
        ),
    ]
}

/// Text between tags: no `<` and no `&` (so the marker cannot be spelled with entities).
fn text() -> impl Strategy<Value = String> {
    "[a-z0-9 .,!?\\n\\t]{0,20}"
}

/// Markup soup: tags of every kind (with and without closing, with odd attributes), comments,
/// entities, stray `<` and `>`, and arbitrary characters.
fn soup() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        4 => text(),
        3 => prop::sample::select(vec![
            "<p>", "</p>", "<div>", "</div>", "<br>", "<br/>", "<li>", "</li>", "<ul>", "</ul>",
            "<h1>", "</h1>", "<h6>", "</h6>", "<pre>", "</pre>", "<td>", "<th>", "<tr>", "<table>",
            "<a href=\"/x\">", "<a href='https://a.example/b'>", "<a href=rel>", "<a>", "</a>",
            "<a href=\"javascript:alert(1)\">", "<a href=\"#top\">", "<img alt=\"pic\">",
            "<img alt='' src=x>", "<title>", "</title>", "<script>", "</script>", "<style>",
            "</style>", "<svg>", "</svg>", "<!--", "-->", "<!DOCTYPE html>", "<?xml?>", "<",
            ">", "</", "/>", "&amp;", "&lt;", "&#x41;", "&#65;", "&#0;", "&#x110000;",
            "&nbsp;", "&unknown;", "&", "&#", "\"", "'", "<SCRIPT>", "</SCRIPT >", "<a href=\"",
            "<p class=\"x>y\">", "<!---->", "<br clear=all>",
        ])
        .prop_map(String::from),
        1 => any::<String>(),
        1 => any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(token, 0..80).prop_map(|t| t.concat())
}

/// Content of a raw-text element that never closes it early: anything, including `<`,
/// quotes, comments and other tags, but not `</name` in any case.
fn raw_content(name: &'static str) -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[a-z0-9 ;(){}=+\"'\\n]{0,12}",
        prop::sample::select(vec![
            "<!--",
            "-->",
            "<p>",
            "</p>",
            "<div class=\"x\">",
            "if (a < b && c > d)",
            "document.write(\"<b>\")",
            "'</scr' + 'ipt>'",
            "<a href=\"/x\">",
            "</a>",
            "&amp;",
            "<img alt=\"x\">",
            "<![CDATA[",
            "]]>",
            "<scriptx>",
            "<script>",
            "<style>",
            "<h1>",
            "<li>",
            "body { color: red }",
        ])
        .prop_map(String::from),
        Just(MARKER.to_string()),
    ];
    prop::collection::vec(piece, 0..12).prop_map(move |p| {
        let content = p.concat();
        // Keep the element open until its own end tag.
        let closing = format!("</{name}");
        if content.to_ascii_lowercase().contains(&closing) {
            content.replace('<', " ")
        } else {
            content
        }
    })
}

/// A page whose hidden parts all carry the marker, and whose visible text never does.
fn page_with_hidden_marker() -> impl Strategy<Value = String> {
    let hidden = prop_oneof![
        prop::sample::select(vec![
            "script", "style", "noscript", "template", "iframe", "object", "canvas"
        ])
        .prop_flat_map(|name| (
            Just(name),
            raw_content(name),
            "( [a-z]{1,5}(=\"[a-z ]{0,5}\")?){0,2}"
        ))
        .prop_map(|(name, content, attrs)| format!("<{name}{attrs}>{content}{MARKER}</{name}>")),
        Just(format!("<!-- {MARKER} <p>not text</p> -->")),
        prop::sample::select(vec![
            "class",
            "id",
            "style",
            "title",
            "data-x",
            "onclick",
            "srcset",
            "aria-label"
        ])
        .prop_map(|attr| format!("<div {attr}=\"{MARKER}\">visible</div>")),
        Just(format!(
            "<span data-x='{MARKER} > still inside'>visible</span>"
        )),
        Just(format!("<head><meta content=\"{MARKER}\"></head>")),
    ];
    let part = prop_oneof![
        3 => text(),
        2 => prop::sample::select(vec!["<p>", "</p>", "<div>", "</div>", "<br>", "<li>", "<h2>", "</h2>", "<a href=\"/x\">", "</a>", "<b>", "</b>"])
            .prop_map(String::from),
        2 => hidden,
    ];
    prop::collection::vec(part, 0..30).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(prop_config(256))]

    /// Anything at all converts without a panic, and the output is bounded by the input.
    #[test]
    fn prop_html_any_input_converts_with_bounded_output(
        html in prop_oneof![any::<String>(), soup()],
        base in base(),
    ) {
        let out = to_text(&html, base.as_ref());
        let links = html.matches("<a").count() + html.matches("<A").count();
        let per_link = base.as_ref().map_or(0, |b| b.as_str().len()) + 16;
        let bound = 4 * html.len() + links * per_link + 64;
        prop_assert!(
            out.len() <= bound,
            "{} bytes of output for {} bytes of input ({} links)",
            out.len(),
            html.len(),
            links
        );
        if html.trim().is_empty() {
            prop_assert!(out.trim().is_empty(), "{out:?} from blank input");
        }
    }

    /// Scripts, styles, other non-content elements, comments and attribute values never reach
    /// the text.
    #[test]
    fn prop_html_hidden_content_never_leaks(
        html in page_with_hidden_marker(),
        base in base(),
    ) {
        // The one case left out here is pinned by the ignored test below.
        prop_assume!(!html.to_ascii_lowercase().contains("<title"));
        let out = to_text(&html, base.as_ref());
        prop_assert!(!out.contains(MARKER), "hidden content leaked: {out:?}\nfrom {html:?}");
    }

    /// Visible text survives: words outside tags all appear in the output, in order.
    #[test]
    fn prop_html_visible_words_survive_in_order(
        words in prop::collection::vec("[a-z]{1,8}", 1..20),
        tags in prop::collection::vec(
            prop::sample::select(vec!["<p>", "</p>", "<div>", "</div>", "<b>", "</b>", "<br>", "<li>", "<span class=\"a\">", "</span>", ""]),
            20,
        ),
    ) {
        let html: String = words.iter().zip(&tags).map(|(w, t)| format!("{t}{w} ")).collect();
        let out = to_text(&html, None);
        let got: Vec<&str> = out.split_whitespace().filter(|w| !w.starts_with('-')).collect();
        prop_assert_eq!(got, words.iter().map(String::as_str).collect::<Vec<_>>(), "from {:?}", html);
    }
}

#[test]

fn html_title_inside_script_does_not_leak() {
    // The title is looked up anywhere in the raw page, before skipped elements are removed, so
    // script text that merely builds a <title> string is shown as the page's title.
    let html = format!(
        "<html><body><script>document.write(\"<title>{MARKER}</title>\")</script><p>hello</p></body></html>"
    );
    let out = to_text(&html, None);
    assert!(!out.contains(MARKER), "{out:?}");
    let html = format!("<style>/* <title>{MARKER}</title> */</style>visible");
    let out = to_text(&html, None);
    assert!(!out.contains(MARKER), "{out:?}");
}

#[test]

fn html_unterminated_attribute_quote_does_not_leak_scripts() {
    // A browser drops a tag whose quoted attribute never ends (to the end of the document);
    // the extractor prints everything from its `<` on as text, script source included.
    let html = format!("<p>hello</p><div class=\"x><script>var k = \"{MARKER}\";</script>");
    let out = to_text(&html, None);
    assert!(!out.contains(MARKER), "{out:?}");
}
