//! `GET /files/{id}`: a file `send_file` put up for download (web chat, API), for its owner.
//!
//! The user comes from the request's credential only — the web chat's session cookie or an API
//! bearer token — and the id is looked up *together with* that user. Every miss (no or a wrong
//! credential, another user's id, an expired link, a removed user, a malformed id) is the same
//! 404, so an id never tells whether it exists. The answer is always an attachment
//! (`Content-Disposition: attachment`, sanitised name), with `nosniff`, a type from a short list
//! of harmless ones (else `application/octet-stream`; never HTML or SVG) and `CSP: sandbox`, and
//! it is streamed from the open file, never read into memory whole.

use crate::error::WebError;
use crate::security::bearer_token;
use crate::session;
use crate::state::WebState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use moltmate_core::UserId;

/// The user the request's credential names, if any (cookie first, then bearer token).
async fn requester(state: &WebState, headers: &HeaderMap) -> Result<Option<UserId>, WebError> {
    if let Some(session) = session::user_session(state, headers).await? {
        return Ok(Some(session.user));
    }
    match bearer_token(headers) {
        Some(token) => Ok(state.gateway().store().user_for_token(token).await?),
        None => Ok(None),
    }
}

pub async fn download(
    State(state): State<WebState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let Some(downloads) = state.settings().downloads.as_ref() else {
        return Err(WebError::NotFound);
    };
    if !moltmate_store::downloads::is_download_id(&id) {
        return Err(WebError::NotFound);
    }
    let Some(user) = requester(&state, &headers).await? else {
        return Err(WebError::NotFound);
    };
    let Some((record, file)) = downloads.open(&user, &id).await? else {
        return Err(WebError::NotFound);
    };
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    let mut response = Response::new(Body::from_stream(stream));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(&record.file_name)),
    );
    if let Ok(value) = HeaderValue::from_str(&disposition(&record.file_name)) {
        h.insert(header::CONTENT_DISPOSITION, value);
    } else {
        h.insert(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_static("attachment; filename=\"download\""),
        );
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(record.size));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    Ok(response)
}

/// A harmless type for well-known extensions; everything else (HTML, SVG, scripts, unknown)
/// is `application/octet-stream`.
pub fn content_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "pdf" => "application/pdf",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "txt" | "md" | "csv" | "log" => "text/plain; charset=utf-8",
        "json" => "application/json",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
}

/// `attachment; filename="<ascii>"; filename*=UTF-8''<percent-encoded>`: the ASCII fallback
/// has quotes, backslashes, control and non-ASCII characters replaced by `_`.
pub fn disposition(name: &str) -> String {
    let ascii: String = name
        .chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let ascii = if ascii.trim().is_empty() {
        "download".to_string()
    } else {
        ascii
    };
    let mut encoded = String::new();
    for byte in name.chars().take(128).collect::<String>().bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dangerous_names_become_plain_attachments() {
        assert_eq!(content_type("x.html"), "application/octet-stream");
        assert_eq!(content_type("x.SVG"), "application/octet-stream");
        assert_eq!(content_type("report.PDF"), "application/pdf");
        let d = disposition("a\"b\r\nSet-Cookie: x.txt");
        assert!(HeaderValue::from_str(&d).is_ok(), "{d}");
        assert!(
            d.starts_with("attachment; filename=\"a_b__Set-Cookie: x.txt\""),
            "{d}"
        );
        let d = disposition("Bericht für Anna.pdf");
        assert!(
            d.contains("filename*=UTF-8''Bericht%20f%C3%BCr%20Anna.pdf"),
            "{d}"
        );
    }
}
