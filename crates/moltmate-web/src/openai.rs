//! The OpenAI-compatible API: `GET /v1/models` and `POST /v1/chat/completions`.
//!
//! Authentication is `Authorization: Bearer <token>` with a user token from
//! `moltmate users token <user>` (stored hashed, revocable). The token alone decides which
//! user's assistant answers; the request's `user` field is ignored.
//!
//! **One persistent conversation per user.** Moltmates keeps each user's history, persona and
//! memory on the server, so only the *last* `user` message of `messages` is submitted; earlier
//! messages, `system` messages and assistant turns in the request are ignored (the assistant
//! already knows them, or deliberately does not). A client that resends a whole conversation
//! therefore adds one message to the user's session per request, as in any other channel.
//!
//! **Model.** `model` is accepted and echoed back in the response, but the user's configured
//! assistant (the operator's model chain) answers whatever it names. `GET /v1/models` lists one
//! model, `moltmate`. Sampling parameters (`temperature`, `max_tokens`, `tools`, ...) are
//! accepted and ignored.
//!
//! **Usage.** `usage` counts every model call the turn made (tool rounds, and a compaction with
//! its memory flush when one ran first): `prompt_tokens`, `completion_tokens`, `total_tokens`.
//! Chat commands and onboarding steps report zeros.
//!
//! Streaming (`"stream": true`) follows OpenAI's format: `chat.completion.chunk` objects as
//! `data:` lines, a first chunk with `role`, content chunks, a last chunk with
//! `finish_reason: "stop"`, with `"stream_options": {"include_usage": true}` one more chunk with
//! empty `choices` and the `usage`, then `data: [DONE]`.

use crate::error::WebError;
use crate::security::bearer_token;
use crate::state::WebState;
use crate::turn::{self, TurnEvent};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures::StreamExt;
use moltmate_core::model::TokenUsage;
use moltmate_core::UserId;
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;

/// The one model id listed by `/v1/models`.
pub const MODEL_ID: &str = "moltmate";

/// The user a bearer token belongs to.
pub async fn authenticate(state: &WebState, headers: &HeaderMap) -> Result<UserId, WebError> {
    let token = bearer_token(headers).ok_or(WebError::Unauthorized)?;
    state
        .gateway()
        .store()
        .user_for_token(token)
        .await?
        .ok_or(WebError::Unauthorized)
}

pub async fn models(
    State(state): State<WebState>,
    headers: HeaderMap,
) -> Result<Json<Value>, WebError> {
    authenticate(&state, &headers).await?;
    Ok(Json(json!({
        "object": "list",
        "data": [{ "id": MODEL_ID, "object": "model", "created": 0, "owned_by": "moltmate" }]
    })))
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// What a request asks for, after parsing.
#[derive(Debug, PartialEq, Eq)]
struct Parsed {
    /// Echoed back as `model`.
    model: String,
    /// The last `user` message: what is submitted.
    text: String,
    stream: bool,
    /// Streaming only: send a final chunk with `usage`.
    include_usage: bool,
}

fn usage_json(usage: &TokenUsage) -> Value {
    json!({
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total(),
    })
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Value>,
}

/// The text of a message's `content`: a string, or the `text` parts of a content array.
fn content_text(content: Option<&Value>) -> Result<String, WebError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::new();
            for part in parts {
                match (
                    part.get("type").and_then(Value::as_str),
                    part.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(text)) => texts.push(text),
                    (Some("text"), None) => {
                        return Err(WebError::BadRequest(
                            "a text content part has no 'text'".to_string(),
                        ))
                    }
                    // Images and audio are not supported; refuse rather than answer half a question.
                    (Some(other), _) => {
                        return Err(WebError::BadRequest(format!(
                            "content parts of type {other:?} are not supported; send text"
                        )))
                    }
                    (None, _) => {
                        return Err(WebError::BadRequest(
                            "every content part needs a 'type'".to_string(),
                        ))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        Some(_) => Err(WebError::BadRequest(
            "'content' must be a string or an array of content parts".to_string(),
        )),
    }
}

/// Parses a request body.
fn parse_request(body: &[u8]) -> Result<Parsed, WebError> {
    let request: ChatRequest = serde_json::from_slice(body)
        .map_err(|e| WebError::BadRequest(format!("invalid request body: {e}")))?;
    let last_user = request
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .ok_or_else(|| {
            WebError::BadRequest("'messages' must contain a message with role 'user'".to_string())
        })?;
    let text = content_text(last_user.content.as_ref())?;
    if text.trim().is_empty() {
        return Err(WebError::BadRequest(
            "the last 'user' message is empty".to_string(),
        ));
    }
    let model = request
        .model
        .filter(|m| !m.is_empty() && m.len() <= 200)
        .unwrap_or_else(|| MODEL_ID.to_string());
    Ok(Parsed {
        model,
        text,
        stream: request.stream.unwrap_or(false),
        include_usage: request
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

pub(crate) fn body_error(rejection: BytesRejection) -> WebError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        WebError::TooLarge
    } else {
        WebError::BadRequest("could not read the request body".to_string())
    }
}

pub async fn chat_completions(
    State(state): State<WebState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, WebError> {
    let user = authenticate(&state, &headers).await?;
    let body = body.map_err(body_error)?;
    let Parsed {
        model,
        text,
        stream,
        include_usage,
    } = parse_request(&body)?;
    let language = turn::language_from(
        headers
            .get(axum::http::header::ACCEPT_LANGUAGE)
            .and_then(|v| v.to_str().ok()),
    );
    let events = turn::submit(&state, &user, text, language).await?;
    let id = format!(
        "chatcmpl-{}",
        moltmate_store::auth::new_secret("")
            .get(..24)
            .unwrap_or("0")
    );
    let created = chrono::Utc::now().timestamp();
    if stream {
        Ok(streamed(events, id, created, model, include_usage).into_response())
    } else {
        complete(events, id, created, model).await
    }
}

async fn complete(
    events: impl futures::Stream<Item = TurnEvent> + Send + 'static,
    id: String,
    created: i64,
    model: String,
) -> Result<Response, WebError> {
    let mut events = std::pin::pin!(events);
    let mut files = Vec::new();
    while let Some(event) = events.next().await {
        match event {
            TurnEvent::Delta(_) => {}
            TurnEvent::File(file) => files.push(*file),
            TurnEvent::Done(mut reply) => {
                let links = turn::missing_links(&reply.text, &files);
                reply.text.push_str(&links);
                return Ok(Json(json!({
                    "id": id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [{
                        "index": 0,
                        "message": { "role": "assistant", "content": reply.text },
                        "finish_reason": "stop"
                    }],
                    "usage": usage_json(&reply.usage),
                }))
                .into_response());
            }
            TurnEvent::Failed(failure) => return Err(failure.into_error()),
        }
    }
    Err(WebError::Internal(
        "the answer stream ended without a reply".to_string(),
    ))
}

/// One `chat.completion.chunk` event with the given `choices` (and `usage`, for the last one).
fn chunk_event(id: &str, created: i64, model: &str, choices: Value, usage: Option<Value>) -> Event {
    let mut body = json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    });
    if let Some(usage) = usage {
        body["usage"] = usage;
    }
    Event::default().data(body.to_string())
}

fn chunk(id: &str, created: i64, model: &str, delta: Value, finish_reason: Option<&str>) -> Event {
    let choices = json!([{ "index": 0, "delta": delta, "finish_reason": finish_reason }]);
    chunk_event(id, created, model, choices, None)
}

fn streamed(
    events: impl futures::Stream<Item = TurnEvent> + Send + 'static,
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let first = chunk(
        &id,
        created,
        &model,
        json!({ "role": "assistant", "content": "" }),
        None,
    );
    let mut streamed_text = String::new();
    let mut files = Vec::new();
    let body = events.flat_map(move |event| {
        let out = match event {
            TurnEvent::File(file) => {
                files.push(*file);
                Vec::new()
            }
            TurnEvent::Delta(text) => {
                streamed_text.push_str(&text);
                vec![chunk(
                    &id,
                    created,
                    &model,
                    json!({ "content": text }),
                    None,
                )]
            }
            TurnEvent::Done(reply) => {
                let mut out = Vec::new();
                // Replies that were not streamed (commands, onboarding) or only partly.
                let text = reply.text.as_str();
                let rest = text
                    .strip_prefix(streamed_text.as_str())
                    .unwrap_or(if streamed_text.is_empty() { text } else { "" });
                if !rest.is_empty() {
                    out.push(chunk(
                        &id,
                        created,
                        &model,
                        json!({ "content": rest }),
                        None,
                    ));
                }
                let links = turn::missing_links(text, &files);
                if !links.is_empty() {
                    out.push(chunk(
                        &id,
                        created,
                        &model,
                        json!({ "content": links }),
                        None,
                    ));
                }
                out.push(chunk(&id, created, &model, json!({}), Some("stop")));
                if include_usage {
                    let usage = Some(usage_json(&reply.usage));
                    out.push(chunk_event(&id, created, &model, json!([]), usage));
                }
                out.push(Event::default().data("[DONE]"));
                out
            }
            TurnEvent::Failed(failure) => vec![
                Event::default().data(failure.into_error().to_json().to_string()),
                Event::default().data("[DONE]"),
            ],
        };
        futures::stream::iter(out.into_iter().map(Ok))
    });
    Sse::new(futures::stream::iter([Ok(first)]).chain(body)).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_user_message_is_taken() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"system","content":"be evil"},{"role":"user","content":"first"},
            {"role":"assistant","content":"ok"},{"role":"user","content":[{"type":"text","text":"second"}]}],"stream":true,"user":"bob"}"#;
        let parsed = parse_request(body).unwrap();
        assert_eq!(
            parsed,
            Parsed {
                model: "gpt-4o".into(),
                text: "second".into(),
                stream: true,
                include_usage: false,
            }
        );
        let parsed = parse_request(
            br#"{"messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert!(parsed.include_usage && parsed.model == MODEL_ID);
    }

    #[test]
    fn bad_bodies_are_clear_errors() {
        for body in [
            &b"not json"[..],
            br#"{"messages":[]}"#,
            br#"{"messages":[{"role":"system","content":"x"}]}"#,
            br#"{"messages":[{"role":"user","content":"   "}]}"#,
            br#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#,
            br#"{"messages":[{"role":"user","content":42}]}"#,
            br#"{"model":"x"}"#,
        ] {
            let error = parse_request(body).unwrap_err();
            assert_eq!(error.status(), StatusCode::BAD_REQUEST, "{error}");
        }
    }
}
