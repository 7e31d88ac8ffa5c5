//! A minimal multipart/form-data reader for the doubles (what `reqwest::multipart` writes:
//! CRLF-separated parts with `Content-Disposition: form-data; name="..."; filename="..."`).

/// One part of a form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub filename: Option<String>,
    pub data: Vec<u8>,
}

/// The parts of `body`, if `content_type` is multipart/form-data with a boundary.
pub fn parse(content_type: &str, body: &[u8]) -> Option<Vec<Part>> {
    let boundary = content_type
        .strip_prefix("multipart/form-data; boundary=")
        .map(|b| format!("--{}", b.trim_matches('"')))?;
    let mut parts = Vec::new();
    let mut rest = body;
    while let Some(start) = find(rest, boundary.as_bytes()) {
        rest = &rest[start + boundary.len()..];
        if rest.starts_with(b"--") {
            break;
        }
        let head_end = find(rest, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&rest[..head_end]).to_string();
        let data_start = head_end + 4;
        let data_len = find(&rest[data_start..], format!("\r\n{boundary}").as_bytes())?;
        let value = |key: &str| {
            head.split(&format!("{key}=\""))
                .nth(1)
                .and_then(|v| v.split('"').next())
                .map(str::to_string)
        };
        parts.push(Part {
            name: value("name").unwrap_or_default(),
            filename: value("filename"),
            data: rest[data_start..data_start + data_len].to_vec(),
        });
        rest = &rest[data_start + data_len..];
    }
    Some(parts)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
