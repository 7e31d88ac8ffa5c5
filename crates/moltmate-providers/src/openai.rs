//! OpenAI Chat Completions (`POST {base_url}/chat/completions`, streamed), which also serves
//! ollama, vLLM, OpenRouter and other OpenAI-compatible servers.
//!
//! The output limit is sent as `max_tokens`: it is what ollama, vLLM, OpenRouter, LM Studio and
//! llama.cpp accept, and OpenAI still honours it for chat models. (OpenAI's reasoning models
//! want `max_completion_tokens` instead, which several compatible servers reject.)
//!
//! Tool results have no error flag in this API, so a failed tool's content is prefixed with
//! `Error: ` so the model can tell.

use crate::http::{Auth, Reply, SseReader, Transport};
use crate::settings::ProviderSettings;
use crate::toolargs::parse_arguments;
use crate::tools_wire::ToolsWire;
use async_trait::async_trait;
use moltmate_core::model::{
    ConversationItem, DeltaSink, ModelRequest, ModelResponse, Provider, ProviderError, StopReason,
    TokenUsage, ToolCall,
};
use reqwest::header::HeaderMap;
use serde::Serialize;
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// OpenAI Chat Completions and compatibles.
pub struct OpenAiProvider {
    transport: Transport,
    /// The `tools` arrays of recent requests (`tools_wire`).
    tools: ToolsWire,
}

impl OpenAiProvider {
    pub fn new(settings: &ProviderSettings) -> Result<Self, ProviderError> {
        let transport = Transport::new(settings, "/chat/completions", Auth::Bearer, &[])?;
        Ok(OpenAiProvider {
            transport,
            tools: ToolsWire::default(),
        })
    }
}

#[async_trait]
impl Provider for OpenAiProvider {
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
            Reply::Json(value) => parse_completion(&self.transport, &value, deltas),
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
const WIRE_FORMAT: &str = "openai";

/// The request body, written straight from the borrowed request: no `serde_json::Value` tree
/// of the conversation, and the messages of stored history rows taken from the user's
/// [`moltmate_core::model::WireCache`] when the request has one (made once per row, not once
/// per call). One message per item, after the system message.
/// The `tools` array comes from (and is kept in) `kept_tools`, the provider's [`ToolsWire`].
pub(crate) fn encode(
    request: &ModelRequest<'_>,
    kept_tools: &ToolsWire,
) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(b"{\"model\":");
    serde_json::to_writer(&mut out, request.model.as_str())?;
    out.extend_from_slice(b",\"messages\":[");
    let mut first = true;
    if !request.system.is_empty() {
        first = false;
        serde_json::to_writer(
            &mut out,
            &Message::System {
                content: &request.system,
            },
        )?;
    }
    let mut stored = request
        .stored
        .map(|stored| (stored.ids, stored.cache.rows(WIRE_FORMAT)));
    for (index, item) in request.items.iter().enumerate() {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        let row = stored.as_ref().and_then(|(ids, _)| ids.get(index).copied());
        match (row, stored.as_mut()) {
            // A photo is never a stored row; its base64 is not worth keeping anyway.
            (Some(row), Some((_, rows))) if !matches!(item, ConversationItem::Image { .. }) => rows
                .append(row, &mut out, |out| {
                    serde_json::to_writer(out, &item_message(item))
                })?,
            _ => serde_json::to_writer(&mut out, &item_message(item))?,
        }
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
                    kind: "function",
                    function: WireToolFunction {
                        name: &t.name,
                        description: &t.description,
                        parameters: &t.parameters,
                    },
                })
                .collect();
            serde_json::to_writer(out, &tools)
        })?;
    }
    out.extend_from_slice(b",\"max_tokens\":");
    out.extend_from_slice(request.max_output_tokens.to_string().as_bytes());
    out.extend_from_slice(b",\"stream\":true,\"stream_options\":");
    serde_json::to_writer(
        &mut out,
        &StreamOptions {
            include_usage: true,
        },
    )?;
    out.push(b'}');
    Ok(out)
}

/// One item as the message this API takes.
fn item_message(item: &ConversationItem) -> Message<'_> {
    match item {
        ConversationItem::User { text } => Message::User { content: text },
        ConversationItem::Image { media_type, data } => Message::UserParts {
            content: vec![Part::ImageUrl {
                image_url: ImageUrl {
                    url: format!("data:{media_type};base64,{data}"),
                },
            }],
        },
        ConversationItem::ToolResult {
            call_id,
            content,
            is_error,
        } => Message::Tool {
            tool_call_id: call_id,
            content: if *is_error {
                Cow::Owned(format!("Error: {content}"))
            } else {
                Cow::Borrowed(content.as_str())
            },
        },
        ConversationItem::Assistant { text, tool_calls } if tool_calls.is_empty() => {
            Message::Assistant {
                content: Some(text),
                tool_calls: Vec::new(),
            }
        }
        ConversationItem::Assistant { text, tool_calls } => Message::Assistant {
            content: (!text.is_empty()).then_some(text.as_str()),
            tool_calls: tool_calls
                .iter()
                .map(|call| WireCall {
                    id: &call.id,
                    kind: "function",
                    function: WireFunction {
                        name: &call.name,
                        arguments: arguments_text(&call.arguments),
                    },
                })
                .collect(),
        },
    }
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
#[serde(tag = "role", rename_all = "lowercase")]
enum Message<'a> {
    System {
        content: &'a str,
    },
    User {
        content: &'a str,
    },
    /// A user message of parts (a photo of this turn, as a data URL).
    #[serde(rename = "user")]
    UserParts {
        content: Vec<Part>,
    },
    Tool {
        tool_call_id: &'a str,
        content: Cow<'a, str>,
    },
    Assistant {
        /// `null` next to tool calls when the model said nothing.
        content: Option<&'a str>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<WireCall<'a>>,
    },
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Part {
    ImageUrl { image_url: ImageUrl },
}

#[derive(Serialize)]
struct ImageUrl {
    url: String,
}

#[derive(Serialize)]
struct WireCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireFunction<'a>,
}

#[derive(Serialize)]
struct WireFunction<'a> {
    name: &'a str,
    arguments: String,
}

#[derive(Serialize)]
struct WireTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireToolFunction<'a>,
}

#[derive(Serialize)]
struct WireToolFunction<'a> {
    name: &'a str,
    description: &'a str,
    parameters: &'a Value,
}

/// `arguments` is a JSON string on this API. Arguments the model wrote as invalid JSON (kept as
/// a string) are echoed back verbatim.
fn arguments_text(arguments: &Value) -> String {
    match arguments {
        Value::String(raw) => raw.clone(),
        other => other.to_string(),
    }
}

fn stop_reason(raw: Option<&str>) -> StopReason {
    match raw {
        Some("stop") => StopReason::EndTurn,
        Some("tool_calls") | Some("function_call") => StopReason::ToolUse,
        Some("length") => StopReason::MaxTokens,
        _ => StopReason::Other,
    }
}

fn usage(value: &Value) -> Option<TokenUsage> {
    let usage = value.get("usage").filter(|u| u.is_object())?;
    Some(TokenUsage {
        input_tokens: usage
            .get("prompt_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        output_tokens: usage
            .get("completion_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    })
}

/// An `{"error": {...}}` object inside a 2xx reply (OpenRouter and vLLM report mid-stream
/// failures this way). Classified by its numeric `code` when it has one.
fn embedded_error(transport: &Transport, value: &Value) -> Option<ProviderError> {
    let error = value.get("error").filter(|e| !e.is_null())?;
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .or_else(|| error.as_str())
        .unwrap_or("no error message");
    let status = error
        .get("code")
        .and_then(|c| {
            c.as_u64()
                .or_else(|| c.as_str().and_then(|s| s.parse().ok()))
        })
        .and_then(|c| u16::try_from(c).ok())
        .filter(|c| (400..600).contains(c))
        .unwrap_or(500);
    Some(crate::http::status_error(
        &transport.name,
        status,
        &HeaderMap::new(),
        transport.redact(message),
    ))
}

/// A non-streamed `chat.completion` object.
fn parse_completion(
    transport: &Transport,
    value: &Value,
    deltas: &dyn DeltaSink,
) -> Result<ModelResponse, ProviderError> {
    if let Some(err) = embedded_error(transport, value) {
        return Err(err);
    }
    let choice = value
        .pointer("/choices/0")
        .ok_or_else(|| transport.invalid("reply has no choices"))?;
    let message = choice
        .get("message")
        .ok_or_else(|| transport.invalid("choice has no message"))?;
    let text = message
        .get("content")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut tool_calls = Vec::new();
    for (n, call) in message
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let name = call
            .pointer("/function/name")
            .and_then(Value::as_str)
            .ok_or_else(|| transport.invalid("tool call without a function name"))?;
        let id = call
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("call_{n}"));
        let arguments = match call.pointer("/function/arguments") {
            Some(Value::String(raw)) => parse_arguments(raw),
            // Some compatible servers send the arguments as an object already.
            Some(object @ Value::Object(_)) => object.clone(),
            _ => json!({}),
        };
        tool_calls.push(ToolCall {
            id,
            name: name.to_string(),
            arguments,
        });
    }
    if !text.is_empty() {
        deltas.text_delta(&text);
    }
    Ok(ModelResponse {
        text,
        tool_calls,
        usage: usage(value).unwrap_or_default(),
        stop_reason: stop_reason(choice.get("finish_reason").and_then(Value::as_str)),
    })
}

/// A tool call being streamed, keyed by its `index`.
#[derive(Default)]
struct PartialCall {
    id: String,
    name: String,
    arguments: String,
}

async fn read_stream(
    transport: &Transport,
    mut reader: SseReader,
    deltas: &dyn DeltaSink,
) -> Result<ModelResponse, ProviderError> {
    let mut text = String::new();
    let mut calls: BTreeMap<u64, PartialCall> = BTreeMap::new();
    let mut finish: Option<StopReason> = None;
    let mut token_usage = TokenUsage::default();
    let mut done = false;
    while let Some(event) = reader.next().await? {
        let data = event.data.trim();
        if data.is_empty() {
            continue;
        }
        if data == "[DONE]" {
            done = true;
            break;
        }
        let chunk: Value = serde_json::from_str(data)
            .map_err(|_| transport.invalid("stream chunk is not valid JSON"))?;
        if let Some(err) = embedded_error(transport, &chunk) {
            return Err(err);
        }
        if let Some(u) = usage(&chunk) {
            token_usage = u;
        }
        let Some(choice) = chunk
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| {
                c.iter()
                    .find(|choice| choice.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)
            })
        else {
            continue;
        };
        if let Some(delta) = choice.get("delta") {
            if let Some(piece) = delta.get("content").and_then(Value::as_str) {
                if !piece.is_empty() {
                    deltas.text_delta(piece);
                    text.push_str(piece);
                }
            }
            for (n, fragment) in delta
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let index = fragment
                    .get("index")
                    .and_then(Value::as_u64)
                    .unwrap_or(n as u64);
                let call = calls.entry(index).or_default();
                if let Some(id) = fragment
                    .get("id")
                    .and_then(Value::as_str)
                    .filter(|id| !id.is_empty())
                {
                    if call.id.is_empty() {
                        call.id = id.to_string();
                    }
                }
                if let Some(name) = fragment.pointer("/function/name").and_then(Value::as_str) {
                    if call.name.is_empty() {
                        call.name = name.to_string();
                    }
                }
                match fragment.pointer("/function/arguments") {
                    Some(Value::String(piece)) => call.arguments.push_str(piece),
                    Some(object @ Value::Object(_)) => call.arguments.push_str(&object.to_string()),
                    _ => {}
                }
            }
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            finish = Some(stop_reason(Some(reason)));
        }
    }
    // `[DONE]` is the final event; a server that closes right after `finish_reason` is accepted
    // too (the answer is complete, only usage may be missing). Anything else was cut off.
    let Some(stop_reason) = finish else {
        return Err(transport.invalid(if done {
            "the stream ended without a finish_reason"
        } else {
            "the stream ended before [DONE]"
        }));
    };
    let mut tool_calls = Vec::with_capacity(calls.len());
    for (index, call) in calls {
        if call.name.is_empty() {
            return Err(transport.invalid("tool call without a function name"));
        }
        let id = if call.id.is_empty() {
            format!("call_{index}")
        } else {
            call.id
        };
        tool_calls.push(ToolCall {
            id,
            name: call.name,
            arguments: parse_arguments(&call.arguments),
        });
    }
    Ok(ModelResponse {
        text,
        tool_calls,
        usage: token_usage,
        stop_reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assistant_tool_calls_and_results_shape() {
        let request = ModelRequest {
            model: "gpt".into(),
            system: "be nice".into(),
            items: vec![
                ConversationItem::User { text: "hi".into() },
                ConversationItem::Assistant {
                    text: String::new(),
                    tool_calls: vec![ToolCall {
                        id: "c1".into(),
                        name: "x".into(),
                        arguments: json!({"a": 1}),
                    }],
                },
                ConversationItem::ToolResult {
                    call_id: "c1".into(),
                    content: "boom".into(),
                    is_error: true,
                },
            ]
            .into(),
            tools: vec![].into(),
            max_output_tokens: 5,
            stored: None,
        };
        let body = request_body(&request);
        assert_eq!(
            body["messages"][0],
            json!({"role": "system", "content": "be nice"})
        );
        assert_eq!(
            body["messages"][2],
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "x", "arguments": "{\"a\":1}"}}
            ]})
        );
        assert_eq!(
            body["messages"][3],
            json!({"role": "tool", "tool_call_id": "c1", "content": "Error: boom"})
        );
        assert!(body.get("tools").is_none());
        assert_eq!(body["stream_options"], json!({"include_usage": true}));
    }
}
