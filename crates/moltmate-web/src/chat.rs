//! The web chat: sign-in (login link or pasted token), the chat page, its history and
//! streamed answers, and sign-out.
//!
//! Login links (`/login/<code>`, from `moltmate users login-link <user>`) are redeemed by a
//! POST from a confirmation page, not by the GET itself: messengers and mail scanners fetch
//! links to build previews, and a GET that redeemed the one-time code would burn it before
//! the user ever clicked.
//!
//! `POST /api/chat` answers with `application/x-ndjson`: one JSON object per line,
//! `{"delta":"..."}` while the answer streams, then `{"done":"<full reply>","html":"..."}` (the
//! reply's Markdown rendered safely by [`crate::markdown`]) or `{"error":"..."}`.

use crate::error::{PageError, WebError};
use crate::html;
use crate::openai::body_error;
use crate::security::{check_csrf, check_same_origin, check_sign_in_origin};
use crate::session::{self, require_user, user_session, USER_COOKIE};
use crate::state::WebState;
use crate::turn::{self, TurnEvent};
use axum::body::Body;
use axum::extract::rejection::{BytesRejection, FormRejection, QueryRejection};
use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Json;
use bytes::Bytes;
use futures::StreamExt;
use moltmate_core::model::ConversationItem;
use moltmate_core::UserId;
use serde::{Deserialize, Serialize};
use std::convert::Infallible;

const CHAT_TEMPLATE: &str = include_str!("../assets/chat.html");
const LOGIN_TEMPLATE: &str = include_str!("../assets/login.html");
const LINK_TEMPLATE: &str = include_str!("../assets/link.html");

/// Longest message accepted from the chat box (the gateway cuts longer ones anyway).
pub const MAX_CHAT_CHARS: usize = 16_000;

/// Static files embedded in the binary: (name, content type, body).
const ASSETS: [(&str, &str, &str); 3] = [
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../assets/style.css"),
    ),
    (
        "chat.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/chat.js"),
    ),
    (
        "admin.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/admin.js"),
    ),
];

pub async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, body)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response(),
        None => WebError::NotFound.into_html(),
    }
}

fn login_page(status: StatusCode, message: &str) -> Response {
    (
        status,
        Html(html::render(LOGIN_TEMPLATE, &[("message", message)])),
    )
        .into_response()
}

pub async fn index(
    State(state): State<WebState>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let Some(session) = user_session(&state, &headers).await? else {
        return Ok(login_page(StatusCode::OK, ""));
    };
    let persona = session::persona_name(&state, &session.user).await;
    let page = html::render(
        CHAT_TEMPLATE,
        &[
            ("csrf", session.csrf_token.as_str()),
            ("persona", persona.as_str()),
            ("user", session.user.as_str()),
        ],
    );
    Ok(Html(page).into_response())
}

/// Starts a browser session for `user` and sends the browser to the chat, ending the
/// session the request came with (no session fixation across users).
async fn sign_in(
    state: &WebState,
    headers: &HeaderMap,
    user: &UserId,
) -> Result<Response, WebError> {
    if let Some(old) = session::cookie(headers, USER_COOKIE) {
        state.gateway().store().delete_web_session(old).await?;
    }
    let ttl = state.settings().session_ttl;
    let (secret, _) = state
        .gateway()
        .store()
        .create_web_session(Some(user), false, ttl)
        .await?;
    let cookie = session::set_cookie(USER_COOKIE, &secret, ttl, state.settings().secure_cookies)?;
    let mut response = Redirect::to("/").into_response();
    *response.status_mut() = StatusCode::SEE_OTHER;
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(response)
}

#[derive(Deserialize)]
pub struct TokenForm {
    token: String,
}

pub async fn login_with_token(
    State(state): State<WebState>,
    headers: HeaderMap,
    form: Result<Form<TokenForm>, FormRejection>,
) -> Result<Response, PageError> {
    check_sign_in_origin(&headers)?;
    let Ok(Form(form)) = form else {
        return Ok(login_page(
            StatusCode::BAD_REQUEST,
            "Paste your token into the field.",
        ));
    };
    match state
        .gateway()
        .store()
        .user_for_token(form.token.trim())
        .await?
    {
        Some(user) => Ok(sign_in(&state, &headers, &user).await?),
        None => Ok(login_page(
            StatusCode::UNAUTHORIZED,
            "That token is not valid (wrong, or revoked).",
        )),
    }
}

/// Login codes are 64 hex characters; anything else is not worth a database lookup.
fn plausible_code(code: &str) -> bool {
    !code.is_empty() && code.len() <= 128 && code.chars().all(|c| c.is_ascii_hexdigit())
}

pub async fn login_link_page(Path(code): Path<String>) -> Response {
    if !plausible_code(&code) {
        return login_page(StatusCode::NOT_FOUND, "This sign-in link is not valid.");
    }
    // The form posts back to this same URL, so the code is not rendered into the page.
    Html(LINK_TEMPLATE).into_response()
}

pub async fn redeem_login_link(
    State(state): State<WebState>,
    headers: HeaderMap,
    Path(code): Path<String>,
) -> Result<Response, PageError> {
    check_sign_in_origin(&headers)?;
    let invalid = || {
        login_page(
            StatusCode::UNAUTHORIZED,
            "This sign-in link is invalid, expired or already used. Ask for a new one.",
        )
    };
    if !plausible_code(&code) {
        return Ok(invalid());
    }
    match state.gateway().store().redeem_login_link(&code).await? {
        Some(user) => Ok(sign_in(&state, &headers, &user).await?),
        None => Ok(invalid()),
    }
}

#[derive(Deserialize)]
pub struct CsrfForm {
    csrf: String,
}

pub async fn logout(
    State(state): State<WebState>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Result<Response, PageError> {
    check_same_origin(&headers)?;
    let session = require_user(&state, &headers).await?;
    check_csrf(
        &session.csrf_token,
        form.as_ref().ok().map(|Form(f)| f.csrf.as_str()),
    )?;
    state
        .gateway()
        .store()
        .delete_web_session(&session.secret)
        .await?;
    let mut response = Redirect::to("/").into_response();
    *response.status_mut() = StatusCode::SEE_OTHER;
    response.headers_mut().insert(
        header::SET_COOKIE,
        session::clear_cookie(USER_COOKIE, state.settings().secure_cookies),
    );
    Ok(response)
}

/// One message of the history as the chat page shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryMessage {
    /// `user` or `assistant`.
    pub role: String,
    pub text: String,
    /// For assistant messages: the text's Markdown rendered as safe HTML ([`crate::markdown`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct History {
    pub user: String,
    pub persona: String,
    pub messages: Vec<HistoryMessage>,
    /// The cursor of the next older page (`GET /api/history?before=<it>`), absent when this
    /// page reaches the start of the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<i64>,
}

/// Transcript rows per history page unless `limit` asks for fewer (or more, up to
/// [`MAX_HISTORY_ROWS`]).
pub const DEFAULT_HISTORY_ROWS: usize = 50;
/// The most rows one history page holds.
pub const MAX_HISTORY_ROWS: usize = 200;
/// The most stored bytes one history page loads (one row more than this is never split, and a
/// row is bounded by the per-turn storage cap).
pub const MAX_HISTORY_PAGE_BYTES: u64 = 1024 * 1024;

/// `GET /api/history` query: `before` (a cursor from a previous page) and `limit` (rows).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    before: Option<i64>,
    limit: Option<usize>,
}

/// One page of the signed-in user's current session, newest rows (tool calls and results are
/// not shown): at most `limit` transcript rows and [`MAX_HISTORY_PAGE_BYTES`], whatever the
/// session holds. Older pages with `?before=`.
pub async fn history(
    State(state): State<WebState>,
    headers: HeaderMap,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<History>, WebError> {
    let session = require_user(&state, &headers).await?;
    let Query(query) =
        query.map_err(|e| WebError::BadRequest(format!("invalid history query: {e}")))?;
    let limit = query.limit.unwrap_or(DEFAULT_HISTORY_ROWS);
    if limit == 0 || limit > MAX_HISTORY_ROWS {
        return Err(WebError::BadRequest(format!(
            "limit must be between 1 and {MAX_HISTORY_ROWS}"
        )));
    }
    let store = state.gateway().store();
    let current = store.current_session(&session.user).await?;
    let page = store
        .transcript_page(&current.id, query.before, limit, MAX_HISTORY_PAGE_BYTES)
        .await?;
    let before = page.older;
    let messages = page
        .rows
        .into_iter()
        .filter_map(|(_, item)| match item {
            ConversationItem::User { text } => Some(HistoryMessage {
                role: "user".to_string(),
                text,
                html: None,
            }),
            ConversationItem::Assistant { text, .. } if !text.trim().is_empty() => {
                Some(HistoryMessage {
                    role: "assistant".to_string(),
                    html: Some(crate::markdown::to_html(&text)),
                    text,
                })
            }
            ConversationItem::Assistant { .. }
            | ConversationItem::ToolResult { .. }
            | ConversationItem::Image { .. } => None,
        })
        .collect();
    let persona = session::persona_name(&state, &session.user).await;
    Ok(Json(History {
        user: session.user.as_str().to_string(),
        persona,
        messages,
        before,
    }))
}

#[derive(Deserialize)]
struct ChatBody {
    message: String,
}

pub const CSRF_HEADER: &str = "x-csrf-token";

pub async fn send(
    State(state): State<WebState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, WebError> {
    check_same_origin(&headers)?;
    let session = require_user(&state, &headers).await?;
    check_csrf(
        &session.csrf_token,
        headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()),
    )?;
    let body = body.map_err(body_error)?;
    let ChatBody { message } = serde_json::from_slice(&body)
        .map_err(|e| WebError::BadRequest(format!("invalid request body: {e}")))?;
    if message.trim().is_empty() {
        return Err(WebError::BadRequest("the message is empty".to_string()));
    }
    if message.chars().count() > MAX_CHAT_CHARS {
        return Err(WebError::BadRequest(format!(
            "the message is longer than {MAX_CHAT_CHARS} characters"
        )));
    }
    let language = turn::language_from(
        headers
            .get(header::ACCEPT_LANGUAGE)
            .and_then(|v| v.to_str().ok()),
    );
    let events = turn::submit(&state, &session.user, message, language).await?;
    let lines = events.map(|event| {
        let value = match event {
            TurnEvent::Delta(text) => serde_json::json!({ "delta": text }),
            TurnEvent::File(file) => serde_json::json!({ "file": {
                "name": file.file_name,
                "url": file.path,
                "size": file.size,
                "expires_at": file.expires_at,
            } }),
            TurnEvent::Done(reply) => serde_json::json!({
                "done": reply.text,
                "html": crate::markdown::to_html(&reply.text),
            }),
            TurnEvent::Failed(failure) => serde_json::json!({ "error": failure.message() }),
        };
        let mut line = value.to_string();
        line.push('\n');
        Ok::<_, Infallible>(Bytes::from(line))
    });
    let mut response = Response::new(Body::from_stream(lines));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    // Ask reverse proxies (nginx) not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}
