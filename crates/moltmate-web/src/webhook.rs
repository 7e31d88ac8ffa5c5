//! `GET`/`POST /webhooks/{channel}`: deliveries pushed by a messaging service (WhatsApp Cloud
//! API, Slack's Events API), handed to the channel's [`Webhook`]. The channel verifies the
//! request (signature, handshake token) and stores what it carries before this answers 2xx. The
//! body is bounded in size ([`MAX_WEBHOOK_BODY`], 413) and in time
//! (`WebSettings::webhook_body_timeout`, 408: a sender trickling bytes holds no connection open
//! for long) by the route's middleware (`read_body_within` in `lib.rs`), which hands this
//! handler the body already read; requests count against the per-IP limit like every request
//! without a verified credential.

use crate::state::WebState;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use moltmate_core::webhook::WebhookRequest;
use moltmate_core::ChannelKind;

/// Largest webhook body accepted (a WhatsApp delivery is a few KB).
pub const MAX_WEBHOOK_BODY: usize = 256 * 1024;

pub async fn handle(
    State(state): State<WebState>,
    Path(channel): Path<String>,
    method: Method,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Ok(kind) = channel.parse::<ChannelKind>() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Some(webhook) = state
        .inner
        .settings
        .webhooks
        .iter()
        .find(|w| w.channel() == kind)
        .cloned()
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    // Already read whole, within its deadline and size, by the route's middleware.
    let Ok(body) = axum::body::to_bytes(body, MAX_WEBHOOK_BODY).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    let query: Vec<(String, String)> = query
        .as_deref()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .take(32)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let headers: Vec<(String, String)> = headers
        .iter()
        .take(64)
        .filter_map(|(name, value)| {
            Some((
                name.as_str().to_ascii_lowercase(),
                value.to_str().ok()?.to_string(),
            ))
        })
        .collect();
    let answer = webhook
        .handle(WebhookRequest {
            post: method == Method::POST,
            query,
            headers,
            body: body.to_vec(),
        })
        .await;
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        answer.body,
    )
        .into_response()
}
