//! Server-rendered inline SVG for `/admin`: small bar charts of a value per day, and QR codes
//! of sign-in links. No script, no external asset, no inline style (the CSP forbids them):
//! geometry is in attributes, colours come from `style.css` classes. Every text that reaches
//! the markup (labels, days, tooltips) is escaped; the rest is numbers we computed.

use crate::html::escape;
use std::fmt::Write as _;

/// Width and height of a chart's view box; it scales to its container.
const WIDTH: f64 = 140.0;
const HEIGHT: f64 = 36.0;

/// A bar chart of `values` (one per day, oldest first) under `caption`, with `total` shown
/// next to it; each bar's tooltip is `day: <value as shown by fmt>`.
pub fn bars(
    caption: &str,
    total: &str,
    values: &[(String, f64)],
    fmt: &dyn Fn(f64) -> String,
) -> String {
    let count = values.len().max(1) as f64;
    let max = values
        .iter()
        .map(|(_, v)| *v)
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let slot = WIDTH / count;
    let gap = if slot > 4.0 { 1.0 } else { 0.0 };
    let mut svg = String::new();
    let described = values.iter().filter(|(_, v)| *v > 0.0).count();
    let _ = write!(
        svg,
        "<figure class=\"chart\"><figcaption>{} <span class=\"num\">{}</span></figcaption>\
         <svg viewBox=\"0 0 {WIDTH} {HEIGHT}\" preserveAspectRatio=\"none\" role=\"img\" aria-label=\"{}\">\
         <line class=\"axis\" x1=\"0\" y1=\"{HEIGHT}\" x2=\"{WIDTH}\" y2=\"{HEIGHT}\"/>",
        escape(caption),
        escape(total),
        escape(&format!("{caption} per day: {described} active day(s), total {total}")),
    );
    for (index, (day, value)) in values.iter().enumerate() {
        let value = if value.is_finite() {
            value.max(0.0)
        } else {
            0.0
        };
        let height = if max > 0.0 {
            (value / max * (HEIGHT - 2.0)).max(if value > 0.0 { 1.0 } else { 0.0 })
        } else {
            0.0
        };
        let x = index as f64 * slot + gap / 2.0;
        let _ = write!(
            svg,
            "<rect class=\"bar\" x=\"{x:.2}\" y=\"{:.2}\" width=\"{:.2}\" height=\"{height:.2}\"><title>{}</title></rect>",
            HEIGHT - height,
            (slot - gap).max(0.5),
            escape(&format!("{day}: {}", fmt(value))),
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

/// `text` as a QR code in inline SVG (`qrcode` encodes; the modules are drawn here as one
/// path), or `None` when it does not fit in a QR code.
pub fn qr(text: &str) -> Option<String> {
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    let width = code.width();
    let colors = code.to_colors();
    let quiet = 4;
    let size = width + 2 * quiet;
    let mut path = String::new();
    for (index, color) in colors.iter().enumerate() {
        if *color == qrcode::Color::Dark {
            let (x, y) = (index % width + quiet, index / width + quiet);
            let _ = write!(path, "M{x} {y}h1v1h-1z");
        }
    }
    Some(format!(
        "<svg class=\"qr\" viewBox=\"0 0 {size} {size}\" role=\"img\" aria-label=\"QR code of the sign-in link\" shape-rendering=\"crispEdges\">\
         <rect class=\"qr-light\" width=\"{size}\" height=\"{size}\"/><path class=\"qr-dark\" d=\"{path}\"/></svg>"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_escape_their_text_and_scale_to_the_largest_value() {
        let values = vec![
            ("2026-12-01".to_string(), 0.0),
            ("<b>day</b>".to_string(), 5.0),
            ("2026-12-03".to_string(), 10.0),
        ];
        let svg = bars("Messages <script>", "15", &values, &|v| format!("{v}"));
        assert!(!svg.contains("<script>") && !svg.contains("<b>"), "{svg}");
        assert!(svg.contains("Messages &lt;script&gt;"));
        assert!(
            svg.contains("height=\"34.00\""),
            "the largest bar is full height: {svg}"
        );
        assert!(svg.contains("height=\"17.00\""), "{svg}");
        assert!(!svg.contains("style="), "no inline style (CSP)");
        let empty = bars("x", "0", &[], &|v| format!("{v}"));
        assert!(empty.starts_with("<figure"));
        let nan = bars("x", "0", &[("d".into(), f64::NAN)], &|v| format!("{v}"));
        assert!(!nan.contains("NaN"), "{nan}");
    }

    #[test]
    fn qr_codes_are_svg_paths() {
        let svg = qr("http://127.0.0.1:18790/login/abcdef").unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<path class=\"qr-dark\" d=\"M"));
        assert!(!svg.contains("style="));
        assert!(qr(&"x".repeat(10_000)).is_none(), "too long for a QR code");
    }
}
