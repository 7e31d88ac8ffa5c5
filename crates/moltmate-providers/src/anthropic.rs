//! Anthropic Messages API (`POST {base_url}/v1/messages`, streamed).
//!
//! Conversation mapping: consecutive user-side items (tool results and user text) are merged
//! into one `user` message, tool results first, because the API wants every `tool_result` of an
//! assistant turn in the single message that follows it. Assistant items become `text` +
//! `tool_use` blocks. Empty text blocks are left out (the API rejects them).

use crate::http::{Auth, Reply, SseReader, Transport};
use crate::settings::ProviderSettings;
use crate::toolargs::parse_arguments;
use crate::tools_wire::ToolsWire;
use async_trait::async_trait;
use moltmate_core::model::{
    ConversationItem, DeltaSink, ModelRequest, ModelResponse, Provider, ProviderError, StopReason,
    TokenUsage, ToolCall,
};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// The Anthropic Messages API.
pub struct AnthropicProvider {
    transport: Transport,
    /// The `tools` arrays of recent requests (`tools_wire`).
    tools: ToolsWire,
}

impl AnthropicProvider {
    pub fn new(settings: &ProviderSettings) -> Result<Self, ProviderError> {
        let transport = Transport::new(
            settings,
            "/v1/messages",
            Auth::XApiKey,
            &[("anthropic-version", "2023-06-01")],
        )?;
        Ok(AnthropicProvider {
            transport,
            tools: ToolsWire::default(),
        })
    }
}

#[async_trait]
impl Provider for AnthropicProvider {
    fn name(&self) -> &str {
        &self.transport.name
    }

    async fn complete(
        &self,
        request: &ModelRequest<'_>,
        deltas: &dyn DeltaSink,
    ) -> Result<ModelResponse, ProviderError> {
        let heavy = crate::http::carries_images(&request.items);
        let encode = || encode(request, &self.tools);
        match self.transport.post(heavy, encode).await? {
            Reply::Json(value) => parse_message(&self.transport, &value, deltas),
            Reply::Stream(reader) => read_stream(&self.transport, reader, deltas).await,
        }
    }
}

/// The request JSON, as a value (for tests; the wire gets [`body`] serialised directly).
#[cfg(test)]
pub(crate) fn request_body(request: &ModelRequest<'_>) -> Value {
    encode(request, &ToolsWire::default())
        .and_then(|bytes| serde_json::from_slice(&bytes))
        .unwrap_or(Value::Null)
}

/// The wire name of this format in a [`moltmate_core::model::WireCache`].
const WIRE_FORMAT: &str = "anthropic";

/// The request body, written straight from the borrowed request: no `serde_json::Value` tree
/// of the conversation, and the content blocks of stored history rows taken from the user's
/// [`moltmate_core::model::WireCache`] when the request has one (made once per row, not once
/// per call). Fields in the order the API documents: `model`, `system`, `messages`, `tools`,
/// `max_tokens`, `stream`.
/// The `tools` array comes from (and is kept in) `kept_tools`, the provider's [`ToolsWire`].
pub(crate) fn encode(
    request: &ModelRequest<'_>,
    kept_tools: &ToolsWire,
) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(b"{\"model\":");
    serde_json::to_writer(&mut out, request.model.as_str())?;
    if !request.system.is_empty() {
        out.extend_from_slice(b",\"system\":");
        serde_json::to_writer(&mut out, request.system.as_ref())?;
    }
    out.extend_from_slice(b",\"messages\":[");
    let mut stored = request
        .stored
        .map(|stored| (stored.ids, stored.cache.rows(WIRE_FORMAT)));
    let plan = plan_messages(&request.items);
    for (n, message) in plan.messages.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"role\":\"");
        out.extend_from_slice(message.role.as_bytes());
        out.extend_from_slice(b"\",\"content\":");
        let indices = plan
            .order
            .get(message.start..message.end)
            .unwrap_or_default();
        let blocks_start = out.len() + 1;
        out.push(b'[');
        for (k, &index) in indices.iter().enumerate() {
            if k > 0 {
                out.push(b',');
            }
            let Some(item) = request.items.get(index) else {
                continue;
            };
            let row = stored.as_ref().and_then(|(ids, _)| ids.get(index).copied());
            match (row, stored.as_mut()) {
                // A photo is never a stored row; its base64 is not worth keeping anyway.
                (Some(row), Some((_, rows))) if !matches!(item, ConversationItem::Image { .. }) => {
                    rows.append(row, &mut out, |out| write_blocks(item, out))?
                }
                _ => write_blocks(item, &mut out)?,
            }
        }
        out.push(b']');
        if let [index] = indices {
            if request.items.get(*index).is_some_and(is_lone_text) {
                shorten_lone_text(&mut out, blocks_start);
            }
        }
        out.push(b'}');
    }
    out.push(b']');
    drop(stored);
    if !request.tools.is_empty() {
        out.extend_from_slice(b",\"tools\":");
        kept_tools.write(&request.tools, &mut out, |out| {
            let tools: Vec<WireTool<'_>> = request
                .tools
                .iter()
                .map(|t| WireTool {
                    name: &t.name,
                    description: &t.description,
                    input_schema: &t.parameters,
                })
                .collect();
            serde_json::to_writer(out, &tools)
        })?;
    }
    out.extend_from_slice(b",\"max_tokens\":");
    out.extend_from_slice(request.max_output_tokens.to_string().as_bytes());
    out.extend_from_slice(b",\"stream\":true}");
    Ok(out)
}

/// What serde writes before a text block's string (`Content::Text`, tag first).
const TEXT_BLOCK_HEAD: &[u8] = b"{\"type\":\"text\",\"text\":";

/// A message whose content is one text block, `[{"type":"text","text":"…"}]` from
/// `blocks_start - 1` to the end of `out`, becomes the API's documented shorthand for exactly
/// that, `"…"`: most messages of a conversation are one text each, and the shorthand is a
/// quarter of a short message's bytes, written and parsed on every call. Done on the bytes
/// written (kept or fresh), so the wire cache keeps one form per row. The caller knows from
/// the item that it wrote exactly one text block ([`is_lone_text`]); the head and tail are
/// checked all the same, and anything else is left as it is.
fn shorten_lone_text(out: &mut Vec<u8>, blocks_start: usize) {
    let Some(blocks) = out.get(blocks_start..) else {
        return;
    };
    if !(blocks.starts_with(TEXT_BLOCK_HEAD)
        && blocks.ends_with(b"\"}]")
        && blocks.len() >= TEXT_BLOCK_HEAD.len() + 4)
    {
        return;
    }
    // `[{"type":"text","text":"…"}]` → `"…"`.
    out.truncate(out.len() - 2);
    out.drain(blocks_start - 1..blocks_start + TEXT_BLOCK_HEAD.len());
}

/// Whether `item`'s blocks ([`write_blocks`]) are exactly one text block.
fn is_lone_text(item: &ConversationItem) -> bool {
    match item {
        ConversationItem::User { .. } => true,
        ConversationItem::Assistant { text, tool_calls } => {
            tool_calls.is_empty() && !is_blank(text)
        }
        ConversationItem::Image { .. } | ConversationItem::ToolResult { .. } => false,
    }
}

#[derive(Serialize)]
struct WireTool<'a> {
    name: &'a str,
    description: &'a str,
    input_schema: &'a Value,
}

/// Which items make which message: `messages[m]` holds the items `order[start..end]`, each
/// contributing all its content blocks, in that order.
struct MessagePlan {
    messages: Vec<PlannedMessage>,
    order: Vec<usize>,
}

struct PlannedMessage {
    role: &'static str,
    start: usize,
    end: usize,
}

/// The role an item speaks in and whether it is a tool result; `None` for an item with no
/// block to send (an assistant item with blank text and no tool call).
fn item_role(item: &ConversationItem) -> Option<(&'static str, bool)> {
    match item {
        ConversationItem::User { .. } | ConversationItem::Image { .. } => Some(("user", false)),
        ConversationItem::ToolResult { .. } => Some(("user", true)),
        ConversationItem::Assistant { text, tool_calls } => {
            (!is_blank(text) || !tool_calls.is_empty()).then_some(("assistant", false))
        }
    }
}

/// Consecutive items of one role make one message; in a `user` message, tool results come
/// before anything else (the API wants every `tool_result` of an assistant turn first in the
/// message that follows it). Every item's blocks stay together, so each item's wire form is
/// one piece that can be kept.
fn plan_messages(items: &[ConversationItem]) -> MessagePlan {
    let mut plan = MessagePlan {
        messages: Vec::new(),
        order: Vec::with_capacity(items.len()),
    };
    for (index, item) in items.iter().enumerate() {
        let Some((role, is_result)) = item_role(item) else {
            continue;
        };
        match plan.messages.last_mut() {
            Some(last) if last.role == role => {
                // The last message's items are the end of `order`.
                let at = if is_result {
                    let held = plan.order.get(last.start..).unwrap_or_default();
                    last.start
                        + held
                            .iter()
                            .position(|&i| !items.get(i).is_some_and(is_tool_result))
                            .unwrap_or(held.len())
                } else {
                    plan.order.len()
                };
                plan.order.insert(at, index);
                last.end += 1;
            }
            _ => {
                let start = plan.order.len();
                plan.order.push(index);
                plan.messages.push(PlannedMessage {
                    role,
                    start,
                    end: start + 1,
                });
            }
        }
    }
    plan
}

fn is_tool_result(item: &ConversationItem) -> bool {
    matches!(item, ConversationItem::ToolResult { .. })
}

/// An item's content blocks, comma-separated (what goes between a message's `[` and `]`).
fn write_blocks(item: &ConversationItem, out: &mut Vec<u8>) -> serde_json::Result<()> {
    let mut first = true;
    let mut block = |out: &mut Vec<u8>, content: &Content<'_>| {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, content)
    };
    match item {
        ConversationItem::User { text } => {
            // The API rejects empty text blocks; an empty user message still needs a turn.
            let text = if is_blank(text) {
                "(empty message)"
            } else {
                text.as_str()
            };
            block(out, &Content::Text { text })
        }
        ConversationItem::Image { media_type, data } => block(
            out,
            &Content::Image {
                source: ImageSource {
                    kind: "base64",
                    media_type,
                    data,
                },
            },
        ),
        ConversationItem::ToolResult {
            call_id,
            content,
            is_error,
        } => block(
            out,
            &Content::ToolResult {
                tool_use_id: call_id,
                content,
                is_error: *is_error,
            },
        ),
        ConversationItem::Assistant { text, tool_calls } => {
            if !is_blank(text) {
                block(out, &Content::Text { text })?;
            }
            for call in tool_calls {
                block(
                    out,
                    &Content::ToolUse {
                        id: &call.id,
                        name: &call.name,
                        input: ToolInput(&call.arguments),
                    },
                )?;
            }
            Ok(())
        }
    }
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Content<'a> {
    Text {
        text: &'a str,
    },
    ToolResult {
        tool_use_id: &'a str,
        content: &'a str,
        #[serde(skip_serializing_if = "is_false")]
        is_error: bool,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: ToolInput<'a>,
    },
    /// A photo of this turn (never stored in the transcript).
    Image {
        source: ImageSource<'a>,
    },
}

#[derive(Serialize)]
struct ImageSource<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    media_type: &'a str,
    data: &'a str,
}

/// `text.trim().is_empty()`, without the generic trim for the usual text that starts with a
/// visible ASCII character: this runs for every item of the history on every model call.
fn is_blank(text: &str) -> bool {
    match text.as_bytes().first() {
        None => true,
        Some(first) if first.is_ascii_graphic() => false,
        Some(_) => text.trim().is_empty(),
    }
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// `tool_use.input` must be an object. Arguments that were not a JSON object (the model's
/// invalid JSON, kept as a string) are wrapped so the model still sees what it sent.
struct ToolInput<'a>(&'a Value);

impl Serialize for ToolInput<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self.0 {
            Value::Object(_) => self.0.serialize(serializer),
            other => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("raw_arguments", other)?;
                map.end()
            }
        }
    }
}

fn stop_reason(raw: Option<&str>) -> StopReason {
    match raw {
        Some("end_turn") | Some("stop_sequence") => StopReason::EndTurn,
        Some("tool_use") => StopReason::ToolUse,
        Some("max_tokens") => StopReason::MaxTokens,
        _ => StopReason::Other,
    }
}

/// Input tokens including prompt-cache reads and writes, which are billed input too.
fn input_tokens(usage: &Value) -> Option<u64> {
    let base = usage.get("input_tokens").and_then(Value::as_u64)?;
    // The numbers are the server's: saturate rather than overflow.
    Some(
        ["cache_creation_input_tokens", "cache_read_input_tokens"]
            .iter()
            .filter_map(|k| usage.get(*k).and_then(Value::as_u64))
            .fold(base, u64::saturating_add),
    )
}

/// A non-streamed `message` object.
fn parse_message(
    transport: &Transport,
    value: &Value,
    deltas: &dyn DeltaSink,
) -> Result<ModelResponse, ProviderError> {
    if value.get("type").and_then(Value::as_str) == Some("error") {
        return Err(stream_error(transport, value));
    }
    let content = value
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| transport.invalid("reply has no content array"))?;
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for block in content {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(
                block
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
            ),
            Some("tool_use") => {
                let id = block.get("id").and_then(Value::as_str);
                let name = block.get("name").and_then(Value::as_str);
                let (Some(id), Some(name)) = (id, name) else {
                    return Err(transport.invalid("tool_use block without id or name"));
                };
                let arguments = block.get("input").cloned().unwrap_or_else(|| json!({}));
                tool_calls.push(ToolCall {
                    id: id.to_string(),
                    name: name.to_string(),
                    arguments,
                });
            }
            _ => {}
        }
    }
    if !text.is_empty() {
        deltas.text_delta(&text);
    }
    let usage = value.get("usage").cloned().unwrap_or(Value::Null);
    Ok(ModelResponse {
        text,
        tool_calls,
        usage: TokenUsage {
            input_tokens: input_tokens(&usage).unwrap_or(0),
            output_tokens: usage
                .get("output_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        },
        stop_reason: stop_reason(value.get("stop_reason").and_then(Value::as_str)),
    })
}

/// An `error` event or body: `{"type":"error","error":{"type":..,"message":..}}`.
fn stream_error(transport: &Transport, value: &Value) -> ProviderError {
    let provider = transport.name.clone();
    let kind = value
        .pointer("/error/type")
        .and_then(Value::as_str)
        .unwrap_or("");
    let detail = transport.redact(
        value
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or("no error message"),
    );
    match kind {
        "overloaded_error" => ProviderError::Server {
            provider,
            status: 529,
            detail,
        },
        "api_error" => ProviderError::Server {
            provider,
            status: 500,
            detail,
        },
        "timeout_error" => ProviderError::Server {
            provider,
            status: 504,
            detail,
        },
        "rate_limit_error" => ProviderError::RateLimited {
            provider,
            retry_after: None,
        },
        "authentication_error" => ProviderError::Rejected {
            provider,
            status: 401,
            detail,
        },
        "permission_error" | "billing_error" => ProviderError::Rejected {
            provider,
            status: 403,
            detail,
        },
        "not_found_error" => ProviderError::Rejected {
            provider,
            status: 404,
            detail,
        },
        "request_too_large" => ProviderError::Rejected {
            provider,
            status: 413,
            detail,
        },
        "invalid_request_error" => ProviderError::Rejected {
            provider,
            status: 400,
            detail,
        },
        // An unknown error type is still the server saying it failed.
        _ => ProviderError::Server {
            provider,
            status: 500,
            detail,
        },
    }
}

/// A content block being streamed.
enum Block {
    Text,
    ToolUse {
        id: String,
        name: String,
        json: String,
        initial: Value,
    },
    /// Thinking and future block types: ignored.
    Other,
}

async fn read_stream(
    transport: &Transport,
    mut reader: SseReader,
    deltas: &dyn DeltaSink,
) -> Result<ModelResponse, ProviderError> {
    let mut blocks: BTreeMap<u64, Block> = BTreeMap::new();
    let mut finished: BTreeMap<u64, ToolCall> = BTreeMap::new();
    let mut text = String::new();
    let mut usage = TokenUsage::default();
    let mut stop = None;
    let mut started = false;
    while let Some(event) = reader.next().await? {
        if event.data.trim().is_empty() {
            continue;
        }
        let data: Value = serde_json::from_str(&event.data).map_err(|_| {
            // The event name is the server's text: redacted and cut short like any other.
            let name: String = transport.redact(&event.event).chars().take(40).collect();
            transport.invalid(format!("event {name:?} is not valid JSON"))
        })?;
        let kind = data
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or(event.event.as_str());
        let index = data.get("index").and_then(Value::as_u64);
        match kind {
            "message_start" => {
                started = true;
                let u = data
                    .pointer("/message/usage")
                    .cloned()
                    .unwrap_or(Value::Null);
                usage.input_tokens = input_tokens(&u).unwrap_or(0);
                usage.output_tokens = u.get("output_tokens").and_then(Value::as_u64).unwrap_or(0);
            }
            "content_block_start" => {
                let index =
                    index.ok_or_else(|| transport.invalid("content_block_start without index"))?;
                let block = data.get("content_block").cloned().unwrap_or(Value::Null);
                let new = match block.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let initial = block
                            .get("text")
                            .and_then(Value::as_str)
                            .unwrap_or_default();
                        if !initial.is_empty() {
                            deltas.text_delta(initial);
                            text.push_str(initial);
                        }
                        Block::Text
                    }
                    Some("tool_use") => {
                        let id = block.get("id").and_then(Value::as_str);
                        let name = block.get("name").and_then(Value::as_str);
                        let (Some(id), Some(name)) = (id, name) else {
                            return Err(transport.invalid("tool_use block without id or name"));
                        };
                        Block::ToolUse {
                            id: id.to_string(),
                            name: name.to_string(),
                            json: String::new(),
                            initial: block.get("input").cloned().unwrap_or_else(|| json!({})),
                        }
                    }
                    _ => Block::Other,
                };
                blocks.insert(index, new);
            }
            "content_block_delta" => {
                let index =
                    index.ok_or_else(|| transport.invalid("content_block_delta without index"))?;
                let delta = data.get("delta").cloned().unwrap_or(Value::Null);
                match (
                    blocks.get_mut(&index),
                    delta.get("type").and_then(Value::as_str),
                ) {
                    (Some(Block::Text), Some("text_delta")) => {
                        let piece = delta
                            .get("text")
                            .and_then(Value::as_str)
                            .unwrap_or_default();
                        if !piece.is_empty() {
                            deltas.text_delta(piece);
                            text.push_str(piece);
                        }
                    }
                    (Some(Block::ToolUse { json, .. }), Some("input_json_delta")) => {
                        json.push_str(
                            delta
                                .get("partial_json")
                                .and_then(Value::as_str)
                                .unwrap_or_default(),
                        );
                    }
                    (None, _) => {
                        return Err(
                            transport.invalid("delta for a content block that was never started")
                        )
                    }
                    _ => {}
                }
            }
            "content_block_stop" => {
                let index =
                    index.ok_or_else(|| transport.invalid("content_block_stop without index"))?;
                if let Some(Block::ToolUse {
                    id,
                    name,
                    json,
                    initial,
                }) = blocks.remove(&index)
                {
                    let arguments = if json.trim().is_empty() {
                        initial
                    } else {
                        parse_arguments(&json)
                    };
                    finished.insert(
                        index,
                        ToolCall {
                            id,
                            name,
                            arguments,
                        },
                    );
                }
            }
            "message_delta" => {
                if let Some(reason) = data.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    stop = Some(stop_reason(Some(reason)));
                }
                if let Some(out) = data.pointer("/usage/output_tokens").and_then(Value::as_u64) {
                    usage.output_tokens = out;
                }
                if let Some(input) = data.get("usage").and_then(input_tokens) {
                    usage.input_tokens = usage.input_tokens.max(input);
                }
            }
            "message_stop" => {
                if !started {
                    return Err(transport.invalid("message_stop before message_start"));
                }
                if blocks.values().any(|b| matches!(b, Block::ToolUse { .. })) {
                    return Err(transport.invalid("a tool_use block was never finished"));
                }
                return Ok(ModelResponse {
                    text,
                    tool_calls: finished.into_values().collect(),
                    usage,
                    stop_reason: stop.unwrap_or(StopReason::Other),
                });
            }
            "error" => return Err(stream_error(transport, &data)),
            // `ping` and event types added after this was written.
            _ => {}
        }
    }
    Err(transport.invalid("the stream ended before message_stop"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use moltmate_core::model::ToolSpec;

    #[test]
    fn input_tokens_saturate_instead_of_overflowing() {
        // Found by proptest: a server reporting huge cache token counts made the sum overflow
        // (a panic in debug builds, a wrapped count in release).
        let usage = json!({"input_tokens": u64::MAX, "cache_creation_input_tokens": 1,
            "cache_read_input_tokens": u64::MAX});
        assert_eq!(input_tokens(&usage), Some(u64::MAX));
        let usage = json!({"input_tokens": 5, "cache_read_input_tokens": 7});
        assert_eq!(input_tokens(&usage), Some(12));
    }

    #[test]
    fn is_blank_is_trim_is_empty() {
        for text in [
            "",
            " ",
            "\n\t",
            "\u{a0}",
            "\u{2003}x",
            "a",
            " a",
            "é",
            "\u{200b}",
            "!",
        ] {
            assert_eq!(is_blank(text), text.trim().is_empty(), "{text:?}");
        }
    }

    #[test]
    fn tool_results_are_merged_into_one_user_message() {
        let request = ModelRequest {
            model: "m".into(),
            system: String::new().into(),
            items: vec![
                ConversationItem::User { text: "hi".into() },
                ConversationItem::Assistant {
                    text: String::new(),
                    tool_calls: vec![
                        ToolCall {
                            id: "a".into(),
                            name: "x".into(),
                            arguments: json!({"q": 1}),
                        },
                        ToolCall {
                            id: "b".into(),
                            name: "y".into(),
                            arguments: json!("{broken"),
                        },
                    ],
                },
                ConversationItem::ToolResult {
                    call_id: "a".into(),
                    content: "1".into(),
                    is_error: false,
                },
                ConversationItem::ToolResult {
                    call_id: "b".into(),
                    content: "bad".into(),
                    is_error: true,
                },
                ConversationItem::User {
                    text: "and?".into(),
                },
            ]
            .into(),
            tools: vec![ToolSpec {
                name: "x".into(),
                description: "d".into(),
                parameters: std::sync::Arc::new(json!({"type": "object"})),
            }]
            .into(),
            max_output_tokens: 10,
            stored: None,
        };
        let body = request_body(&request);
        assert!(body.get("system").is_none());
        let messages = body["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 3);
        assert_eq!(
            messages[1]["content"][0],
            json!({"type": "tool_use", "id": "a", "name": "x", "input": {"q": 1}})
        );
        assert_eq!(
            messages[1]["content"][1]["input"],
            json!({"raw_arguments": "{broken"})
        );
        assert_eq!(
            messages[2]["content"],
            json!([
                {"type": "tool_result", "tool_use_id": "a", "content": "1"},
                {"type": "tool_result", "tool_use_id": "b", "content": "bad", "is_error": true},
                {"type": "text", "text": "and?"}
            ])
        );
        assert_eq!(body["tools"][0]["input_schema"], json!({"type": "object"}));
    }
}
