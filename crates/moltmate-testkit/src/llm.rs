//! Fake LLM APIs: one in-process axum server on `127.0.0.1:0` that speaks both the Anthropic
//! Messages API (`POST /v1/messages`) and OpenAI Chat Completions (`POST /v1/chat/completions`),
//! streamed (SSE, with the real event sequences) or not, following the request's `stream` flag.
//!
//! What it answers is scripted: replies queued with [`FakeLlm::push_reply`] are used first, in
//! order; then the brain set with [`FakeLlm::set_brain`] decides. The default brain answers
//! `echo: <last user text>`, or `tool said: <result>` when the conversation ends with tool
//! results. Every request is recorded ([`FakeLlm::requests`]) so tests can assert exactly what
//! the gateway sent.
//!
//! Usage numbers are deterministic: input tokens = words in [`RecordedRequest::all_text`]
//! (at least 1), output tokens = words of the reply text + 10 per tool call, unless fixed with
//! [`FakeLlm::set_usage`]. There is no artificial latency unless a reply asks for it.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use futures::stream::{self, StreamExt};
use moltmate_core::model::TokenUsage;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

/// Which wire format a request used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireApi {
    Anthropic,
    OpenAi,
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub api: WireApi,
    pub path: String,
    /// Header names lowercased, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The parsed JSON body (`Value::Null` if it was not JSON).
    pub body: Value,
    /// The body exactly as received.
    pub raw_body: String,
}

impl RecordedRequest {
    /// A header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn model(&self) -> Option<&str> {
        self.body.get("model").and_then(Value::as_str)
    }

    pub fn is_stream(&self) -> bool {
        self.body
            .get("stream")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// The messages array.
    pub fn messages(&self) -> &[Value] {
        self.body
            .get("messages")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Names of the tools offered.
    pub fn tool_names(&self) -> Vec<String> {
        let tools = self
            .body
            .get("tools")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        tools
            .iter()
            .filter_map(|t| {
                t.get("name")
                    .or_else(|| t.pointer("/function/name"))
                    .and_then(Value::as_str)
            })
            .map(str::to_string)
            .collect()
    }

    /// The system prompt (Anthropic `system`, string or text blocks; OpenAI `system`/`developer` messages).
    pub fn system_text(&self) -> String {
        match self.api {
            WireApi::Anthropic => self
                .body
                .get("system")
                .map(content_text)
                .unwrap_or_default(),
            WireApi::OpenAi => self
                .messages()
                .iter()
                .filter(|m| {
                    matches!(
                        m.get("role").and_then(Value::as_str),
                        Some("system") | Some("developer")
                    )
                })
                .map(|m| m.get("content").map(content_text).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    /// Every image in the request as `(media type, base64 data)`: Anthropic `image` blocks
    /// (`source.type: base64`) and OpenAI `image_url` parts with a `data:` URL.
    pub fn images(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for message in self.messages() {
            let Some(blocks) = message.get("content").and_then(Value::as_array) else {
                continue;
            };
            for block in blocks {
                match block.get("type").and_then(Value::as_str) {
                    Some("image") => {
                        let source = &block["source"];
                        if let (Some(media), Some(data)) = (
                            source.get("media_type").and_then(Value::as_str),
                            source.get("data").and_then(Value::as_str),
                        ) {
                            out.push((media.to_string(), data.to_string()));
                        }
                    }
                    Some("image_url") => {
                        let url = block["image_url"]["url"].as_str().unwrap_or("");
                        if let Some((media, data)) = url
                            .strip_prefix("data:")
                            .and_then(|rest| rest.split_once(";base64,"))
                        {
                            out.push((media.to_string(), data.to_string()));
                        }
                    }
                    _ => {}
                }
            }
        }
        out
    }

    /// The text of the last user message (tool results are not user text).
    pub fn last_user_text(&self) -> Option<String> {
        self.messages()
            .iter()
            .rev()
            .filter(|m| m.get("role").and_then(Value::as_str) == Some("user"))
            .find_map(|m| {
                let content = m.get("content")?;
                let text = match content {
                    Value::Array(blocks) => blocks
                        .iter()
                        .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
                        .filter_map(|b| b.get("text").and_then(Value::as_str))
                        .collect::<Vec<_>>()
                        .join("\n"),
                    other => content_text(other),
                };
                (!text.is_empty()).then_some(text)
            })
    }

    /// When the conversation ends with tool results: their contents, joined by newlines.
    pub fn trailing_tool_results(&self) -> Option<String> {
        let messages = self.messages();
        let results: Vec<String> = match self.api {
            WireApi::Anthropic => {
                let last = messages.last()?;
                let blocks = last.get("content").and_then(Value::as_array)?;
                if blocks.last()?.get("type").and_then(Value::as_str) != Some("tool_result") {
                    return None;
                }
                blocks
                    .iter()
                    .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
                    .map(|b| b.get("content").map(content_text).unwrap_or_default())
                    .collect()
            }
            WireApi::OpenAi => {
                let mut results: Vec<String> = messages
                    .iter()
                    .rev()
                    .take_while(|m| m.get("role").and_then(Value::as_str) == Some("tool"))
                    .map(|m| m.get("content").map(content_text).unwrap_or_default())
                    .collect();
                results.reverse();
                results
            }
        };
        (!results.is_empty()).then(|| results.join("\n"))
    }

    /// Everything the model would read: system prompt, every message's text, tool results,
    /// tool-call arguments and tool descriptions, joined by newlines.
    pub fn all_text(&self) -> String {
        let mut parts = vec![self.system_text()];
        for message in self.messages() {
            if self.api == WireApi::OpenAi
                && matches!(
                    message.get("role").and_then(Value::as_str),
                    Some("system") | Some("developer")
                )
            {
                continue;
            }
            if let Some(content) = message.get("content") {
                parts.push(content_text(content));
            }
            for call in message
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                parts.push(
                    call.pointer("/function/arguments")
                        .map(content_text)
                        .unwrap_or_default(),
                );
            }
        }
        for tool in self
            .body
            .get("tools")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let description = tool
                .get("description")
                .or_else(|| tool.pointer("/function/description"));
            parts.push(description.map(content_text).unwrap_or_default());
        }
        parts.retain(|p| !p.is_empty());
        parts.join("\n")
    }
}

/// The text in a content value: a string, or the texts of blocks (text, tool_result content,
/// tool_use input as JSON).
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .map(|b| match b.get("type").and_then(Value::as_str) {
                Some("text") => b
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                Some("tool_result") => b.get("content").map(content_text).unwrap_or_default(),
                Some("tool_use") => b.get("input").map(Value::to_string).unwrap_or_default(),
                _ => String::new(),
            })
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// What the fake answers to one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// A plain text answer.
    Text(String),
    /// Tool calls (several = parallel calls), arguments as JSON values.
    ToolCalls(Vec<(String, Value)>),
    /// Text, then tool calls.
    TextAndToolCalls(String, Vec<(String, Value)>),
    /// One tool call whose arguments text is sent verbatim (e.g. invalid JSON).
    RawToolCall { name: String, raw_arguments: String },
    /// An HTTP error with this exact body (sent as `application/json`).
    Error {
        status: u16,
        body: String,
        retry_after: Option<u64>,
    },
    /// An HTTP error with a body in the request's API error format.
    ApiError {
        status: u16,
        message: String,
        retry_after: Option<u64>,
    },
    /// A 200 stream that starts normally, then reports an error in-stream (Anthropic
    /// `event: error` with `overloaded_error`; OpenAI `{"error": ...}` chunk).
    StreamError { message: String },
    /// Wait (without blocking other requests), then answer.
    Delay(Duration, Box<Reply>),
    /// Start answering, then send nothing more while keeping the connection open.
    Stall,
    /// A malformed reply (broken SSE data, or invalid JSON when not streaming).
    Garbage,
    /// The reply ends mid-way (before the final event, or truncated JSON).
    CutStream,
    /// A 200 reply with this content type whose body is exactly these bytes, each piece sent
    /// as its own HTTP chunk (empty pieces are left out): for testing parsers against any
    /// chunking of any byte stream.
    Raw {
        content_type: String,
        chunks: Vec<Vec<u8>>,
    },
}

impl Reply {
    pub fn text(text: impl Into<String>) -> Self {
        Reply::Text(text.into())
    }

    pub fn tool_call(name: impl Into<String>, arguments: Value) -> Self {
        Reply::ToolCalls(vec![(name.into(), arguments)])
    }

    pub fn api_error(status: u16, message: impl Into<String>) -> Self {
        Reply::ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Reply::ApiError {
            status: 429,
            message: "rate limited".into(),
            retry_after: Some(retry_after_secs),
        }
    }

    pub fn delayed(delay: Duration, reply: Reply) -> Self {
        Reply::Delay(delay, Box::new(reply))
    }
}

/// Decides the reply to a request.
pub type Brain = Arc<dyn Fn(&RecordedRequest) -> Reply + Send + Sync>;

/// The default brain: `tool said: <results>` after tool results, else `echo: <last user text>`.
pub fn default_brain() -> Brain {
    Arc::new(
        |request: &RecordedRequest| match request.trailing_tool_results() {
            Some(result) => Reply::Text(format!("tool said: {result}")),
            None => Reply::Text(format!(
                "echo: {}",
                request.last_user_text().unwrap_or_default()
            )),
        },
    )
}

struct Inner {
    requests: Mutex<Vec<RecordedRequest>>,
    queue: Mutex<VecDeque<Reply>>,
    brain: RwLock<Brain>,
    usage: Mutex<Option<TokenUsage>>,
    /// Overrides the request's `stream` flag.
    stream_override: Mutex<Option<bool>>,
    anthropic_count: AtomicU64,
    openai_count: AtomicU64,
    /// Numbers ids in replies.
    serial: AtomicU64,
    /// Whether requests are kept for [`FakeLlm::requests`] (off for benchmarks, whose
    /// thousands of requests would only fill memory).
    recording: std::sync::atomic::AtomicBool,
}

/// Test code panicking while holding a lock must not break every later assertion.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running fake LLM server. Cloning shares it; it stops when the last clone is dropped.
#[derive(Clone)]
pub struct FakeLlm {
    addr: SocketAddr,
    inner: Arc<Inner>,
    _server: Arc<AbortOnDrop>,
}

impl FakeLlm {
    /// Starts the server on an ephemeral port of 127.0.0.1.
    ///
    /// # Panics
    /// If no local port can be bound (a broken test environment); use [`FakeLlm::try_start`] to
    /// handle that.
    pub async fn start() -> FakeLlm {
        match FakeLlm::try_start().await {
            Ok(fake) => fake,
            Err(err) => panic!("fake LLM server could not bind 127.0.0.1:0: {err}"),
        }
    }

    pub async fn try_start() -> std::io::Result<FakeLlm> {
        let inner = Arc::new(Inner {
            requests: Mutex::new(Vec::new()),
            queue: Mutex::new(VecDeque::new()),
            brain: RwLock::new(default_brain()),
            usage: Mutex::new(None),
            stream_override: Mutex::new(None),
            anthropic_count: AtomicU64::new(0),
            openai_count: AtomicU64::new(0),
            serial: AtomicU64::new(0),
            recording: std::sync::atomic::AtomicBool::new(true),
        });
        let app = Router::new()
            .route("/v1/messages", post(anthropic_handler))
            .route("/v1/chat/completions", post(openai_handler))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::warn!(%err, "fake LLM server stopped");
            }
        });
        Ok(FakeLlm {
            addr,
            inner,
            _server: Arc::new(AbortOnDrop(server)),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL for an Anthropic provider (`http://127.0.0.1:<port>`).
    pub fn anthropic_base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Base URL for an OpenAI provider, including `/v1`.
    pub fn openai_base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Replaces the brain (queued replies still come first).
    pub fn set_brain(&self, brain: impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static) {
        *self
            .inner
            .brain
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(brain);
    }

    pub fn reset_brain(&self) {
        *self
            .inner
            .brain
            .write()
            .unwrap_or_else(PoisonError::into_inner) = default_brain();
    }

    /// Queues a reply for the next request that finds the queue non-empty.
    pub fn push_reply(&self, reply: Reply) {
        lock(&self.inner.queue).push_back(reply);
    }

    /// Fixes the usage reported in every reply (`None`: computed from the text).
    pub fn set_usage(&self, usage: Option<TokenUsage>) {
        *lock(&self.inner.usage) = usage;
    }

    /// Answers streamed (`Some(true)`) or as one JSON document (`Some(false)`) whatever the
    /// request asked for, like servers that ignore `stream`; `None` follows the request.
    pub fn set_stream_override(&self, stream: Option<bool>) {
        *lock(&self.inner.stream_override) = stream;
    }

    /// Whether requests are recorded (default on). Benchmarks turn it off: the fake then
    /// keeps nothing per request.
    pub fn set_recording(&self, on: bool) {
        self.inner.recording.store(on, Ordering::SeqCst);
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.inner.requests).clone()
    }

    pub fn last_request(&self) -> Option<RecordedRequest> {
        lock(&self.inner.requests).last().cloned()
    }

    pub fn clear_requests(&self) {
        lock(&self.inner.requests).clear();
    }

    pub fn request_count(&self) -> u64 {
        self.anthropic_count() + self.openai_count()
    }

    pub fn anthropic_count(&self) -> u64 {
        self.inner.anthropic_count.load(Ordering::SeqCst)
    }

    pub fn openai_count(&self) -> u64 {
        self.inner.openai_count.load(Ordering::SeqCst)
    }
}

async fn anthropic_handler(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(inner, WireApi::Anthropic, "/v1/messages", headers, body).await
}

async fn openai_handler(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        inner,
        WireApi::OpenAi,
        "/v1/chat/completions",
        headers,
        body,
    )
    .await
}

async fn handle(
    inner: Arc<Inner>,
    api: WireApi,
    path: &str,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let raw_body = String::from_utf8_lossy(&body).into_owned();
    let request = RecordedRequest {
        api,
        path: path.to_string(),
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: serde_json::from_str(&raw_body).unwrap_or(Value::Null),
        raw_body,
    };
    if inner.recording.load(Ordering::SeqCst) {
        lock(&inner.requests).push(request.clone());
    }
    match api {
        WireApi::Anthropic => inner.anthropic_count.fetch_add(1, Ordering::SeqCst),
        WireApi::OpenAi => inner.openai_count.fetch_add(1, Ordering::SeqCst),
    };
    let serial = inner.serial.fetch_add(1, Ordering::SeqCst);
    if request.body.is_null() {
        return error_response(api, 400, "request body is not valid JSON", None);
    }
    let queued = lock(&inner.queue).pop_front();
    let mut reply = match queued {
        Some(reply) => reply,
        None => {
            let brain = inner
                .brain
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            brain(&request)
        }
    };
    while let Reply::Delay(delay, next) = reply {
        tokio::time::sleep(delay).await;
        reply = *next;
    }
    let fixed_usage = *lock(&inner.usage);
    let plan = Plan::new(&request, &reply, serial, fixed_usage);
    let include_usage = request
        .body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let stream = lock(&inner.stream_override).unwrap_or_else(|| request.is_stream());
    match (reply, stream) {
        (
            Reply::Error {
                status,
                body,
                retry_after,
            },
            _,
        ) => raw_response(status, "application/json", body, retry_after),
        (
            Reply::ApiError {
                status,
                message,
                retry_after,
            },
            _,
        ) => error_response(api, status, &message, retry_after),
        (
            Reply::Raw {
                content_type,
                chunks,
            },
            _,
        ) => raw_chunks_response(&content_type, chunks),
        (reply, true) => {
            let events = match api {
                WireApi::Anthropic => anthropic_events(&plan),
                WireApi::OpenAi => openai_events(&plan, include_usage),
            };
            sse_response(api, events, &reply)
        }
        (reply, false) => {
            let body = match api {
                WireApi::Anthropic => anthropic_json(&plan),
                WireApi::OpenAi => openai_json(&plan),
            };
            json_response(api, body, &reply)
        }
    }
}

/// A reply resolved to concrete content: text, calls with ids and argument text, usage.
struct Plan {
    serial: u64,
    model: String,
    text: String,
    calls: Vec<(String, String, String)>,
    usage: TokenUsage,
}

impl Plan {
    fn new(
        request: &RecordedRequest,
        reply: &Reply,
        serial: u64,
        fixed_usage: Option<TokenUsage>,
    ) -> Plan {
        let (text, calls): (String, Vec<(String, String)>) = match reply {
            Reply::Text(text) => (text.clone(), vec![]),
            Reply::ToolCalls(calls) => (
                String::new(),
                calls
                    .iter()
                    .map(|(n, a)| (n.clone(), a.to_string()))
                    .collect(),
            ),
            Reply::TextAndToolCalls(text, calls) => (
                text.clone(),
                calls
                    .iter()
                    .map(|(n, a)| (n.clone(), a.to_string()))
                    .collect(),
            ),
            Reply::RawToolCall {
                name,
                raw_arguments,
            } => (String::new(), vec![(name.clone(), raw_arguments.clone())]),
            Reply::Stall | Reply::CutStream | Reply::StreamError { .. } => {
                ("partial answer that never finishes".into(), vec![])
            }
            _ => (String::new(), vec![]),
        };
        let prefix = match request.api {
            WireApi::Anthropic => "toolu_fake",
            WireApi::OpenAi => "call_fake",
        };
        let calls = calls
            .into_iter()
            .enumerate()
            .map(|(i, (name, args))| (format!("{prefix}_{serial}_{i}"), name, args))
            .collect::<Vec<_>>();
        let usage = fixed_usage.unwrap_or_else(|| TokenUsage {
            input_tokens: (request.all_text().split_whitespace().count() as u64).max(1),
            output_tokens: text.split_whitespace().count() as u64 + 10 * calls.len() as u64,
        });
        Plan {
            serial,
            model: request.model().unwrap_or("fake-model").to_string(),
            text,
            calls,
            usage,
        }
    }
}

/// Splits text into small pieces (word by word) so streaming order can be asserted.
fn text_pieces(text: &str) -> Vec<String> {
    text.split_inclusive(' ').map(str::to_string).collect()
}

/// Splits argument text into fragments of at most 5 characters.
fn argument_fragments(args: &str) -> Vec<String> {
    let chars: Vec<char> = args.chars().collect();
    chars.chunks(5).map(|c| c.iter().collect()).collect()
}

/// One SSE event: optional `event:` name and `data:` payload.
struct SseEvent {
    name: Option<&'static str>,
    data: String,
}

fn anthropic_event(name: &'static str, data: Value) -> SseEvent {
    SseEvent {
        name: Some(name),
        data: data.to_string(),
    }
}

fn anthropic_events(plan: &Plan) -> Vec<SseEvent> {
    let mut events = vec![anthropic_event(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": format!("msg_fake_{}", plan.serial), "type": "message", "role": "assistant", "content": [],
            "model": plan.model, "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": plan.usage.input_tokens, "output_tokens": 1}
        }}),
    )];
    let mut index = 0;
    if !plan.text.is_empty() || plan.calls.is_empty() {
        events.push(anthropic_event(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
        ));
        events.push(anthropic_event("ping", json!({"type": "ping"})));
        for piece in text_pieces(&plan.text) {
            events.push(anthropic_event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}}),
            ));
        }
        events.push(anthropic_event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    }
    for (id, name, args) in &plan.calls {
        events.push(anthropic_event(
            "content_block_start",
            json!({"type": "content_block_start", "index": index,
                   "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}),
        ));
        events.push(anthropic_event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": ""}}),
        ));
        for fragment in argument_fragments(args) {
            events.push(anthropic_event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index,
                       "delta": {"type": "input_json_delta", "partial_json": fragment}}),
            ));
        }
        events.push(anthropic_event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    }
    let stop = if plan.calls.is_empty() {
        "end_turn"
    } else {
        "tool_use"
    };
    events.push(anthropic_event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
               "usage": {"output_tokens": plan.usage.output_tokens}}),
    ));
    events.push(anthropic_event(
        "message_stop",
        json!({"type": "message_stop"}),
    ));
    events
}

fn openai_chunk(plan: &Plan, choices: Value, usage: Option<Value>) -> SseEvent {
    let mut chunk = json!({
        "id": format!("chatcmpl-fake-{}", plan.serial), "object": "chat.completion.chunk",
        "created": 1_700_000_000u64, "model": plan.model, "choices": choices,
    });
    if let Some(usage) = usage {
        chunk["usage"] = usage;
    }
    SseEvent {
        name: None,
        data: chunk.to_string(),
    }
}

fn openai_events(plan: &Plan, include_usage: bool) -> Vec<SseEvent> {
    let null_usage = include_usage.then_some(Value::Null);
    let delta = |delta: Value, finish: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    let mut events = vec![openai_chunk(
        plan,
        delta(json!({"role": "assistant", "content": ""}), Value::Null),
        null_usage.clone(),
    )];
    for piece in text_pieces(&plan.text) {
        events.push(openai_chunk(
            plan,
            delta(json!({"content": piece}), Value::Null),
            null_usage.clone(),
        ));
    }
    for (i, (id, name, args)) in plan.calls.iter().enumerate() {
        events.push(openai_chunk(
            plan,
            delta(
                json!({"tool_calls": [{"index": i, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]}),
                Value::Null,
            ),
            null_usage.clone(),
        ));
        for fragment in argument_fragments(args) {
            events.push(openai_chunk(
                plan,
                delta(
                    json!({"tool_calls": [{"index": i, "function": {"arguments": fragment}}]}),
                    Value::Null,
                ),
                null_usage.clone(),
            ));
        }
    }
    let finish = if plan.calls.is_empty() {
        "stop"
    } else {
        "tool_calls"
    };
    events.push(openai_chunk(
        plan,
        delta(json!({}), json!(finish)),
        null_usage,
    ));
    if include_usage {
        events.push(openai_chunk(plan, json!([]), Some(openai_usage(plan))));
    }
    events.push(SseEvent {
        name: None,
        data: "[DONE]".into(),
    });
    events
}

fn openai_usage(plan: &Plan) -> Value {
    json!({
        "prompt_tokens": plan.usage.input_tokens,
        "completion_tokens": plan.usage.output_tokens,
        "total_tokens": plan.usage.input_tokens + plan.usage.output_tokens,
    })
}

fn anthropic_json(plan: &Plan) -> Value {
    let mut content = Vec::new();
    if !plan.text.is_empty() {
        content.push(json!({"type": "text", "text": plan.text}));
    }
    for (id, name, args) in &plan.calls {
        // A non-streamed reply carries parsed input; unparseable text is sent as a string.
        let input =
            serde_json::from_str::<Value>(args).unwrap_or_else(|_| Value::String(args.clone()));
        content.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
    }
    json!({
        "id": format!("msg_fake_{}", plan.serial), "type": "message", "role": "assistant", "model": plan.model,
        "content": content, "stop_reason": if plan.calls.is_empty() { "end_turn" } else { "tool_use" },
        "stop_sequence": null,
        "usage": {"input_tokens": plan.usage.input_tokens, "output_tokens": plan.usage.output_tokens},
    })
}

fn openai_json(plan: &Plan) -> Value {
    let mut message = json!({"role": "assistant", "content": if plan.text.is_empty() { Value::Null } else { json!(plan.text) }});
    if !plan.calls.is_empty() {
        message["tool_calls"] = plan
            .calls
            .iter()
            .map(|(id, name, args)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}))
            .collect();
    }
    json!({
        "id": format!("chatcmpl-fake-{}", plan.serial), "object": "chat.completion", "created": 1_700_000_000u64,
        "model": plan.model,
        "choices": [{"index": 0, "message": message, "logprobs": null,
                     "finish_reason": if plan.calls.is_empty() { "stop" } else { "tool_calls" }}],
        "usage": openai_usage(plan),
    })
}

fn encode(event: &SseEvent) -> Bytes {
    let mut out = String::new();
    if let Some(name) = event.name {
        out.push_str("event: ");
        out.push_str(name);
        out.push('\n');
    }
    out.push_str("data: ");
    out.push_str(&event.data);
    out.push_str("\n\n");
    Bytes::from(out)
}

fn sse_response(api: WireApi, events: Vec<SseEvent>, reply: &Reply) -> Response {
    // How many events of the normal sequence are sent before a scripted failure: the start and
    // the first text delta, so the client has already streamed some text.
    let head = match api {
        WireApi::Anthropic => 4,
        WireApi::OpenAi => 2,
    };
    let chunks: Vec<Bytes> = match reply {
        Reply::Garbage => {
            let broken = match api {
                WireApi::Anthropic => "event: message_start\ndata: {\"type\": \"message_start\", \"message\": {oops\n\n",
                WireApi::OpenAi => "data: {\"id\": \"chatcmpl\", \"choices\": [oops\n\n",
            };
            vec![Bytes::from_static(broken.as_bytes())]
        }
        Reply::CutStream | Reply::Stall => events.iter().take(head).map(encode).collect(),
        Reply::StreamError { message } => {
            let mut chunks: Vec<Bytes> = events.iter().take(head).map(encode).collect();
            chunks.push(encode(&match api {
                WireApi::Anthropic => anthropic_event(
                    "error",
                    json!({"type": "error", "error": {"type": "overloaded_error", "message": message}}),
                ),
                WireApi::OpenAi => SseEvent {
                    name: None,
                    data: json!({"error": {"message": message, "type": "server_error", "code": null}}).to_string(),
                },
            }));
            chunks
        }
        _ => events.iter().map(encode).collect(),
    };
    let stall = matches!(reply, Reply::Stall);
    let body = stream::iter(chunks.into_iter().map(Ok::<Bytes, Infallible>));
    let body = if stall {
        body.chain(stream::pending()).boxed()
    } else {
        body.boxed()
    };
    let mut response = Response::new(Body::from_stream(body));
    response.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/event-stream"),
    );
    response
        .headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    response
}

fn json_response(api: WireApi, body: Value, reply: &Reply) -> Response {
    let text = body.to_string();
    let response_body = match reply {
        Reply::Garbage => Body::from("{\"id\": this is not json"),
        Reply::CutStream => Body::from(
            text.chars()
                .take(text.chars().count() / 2)
                .collect::<String>(),
        ),
        Reply::Stall => {
            let head: String = text.chars().take(10).collect();
            Body::from_stream(
                stream::iter([Ok::<Bytes, Infallible>(Bytes::from(head))]).chain(stream::pending()),
            )
        }
        Reply::StreamError { message } => {
            let error = match api {
                WireApi::Anthropic => {
                    json!({"type": "error", "error": {"type": "overloaded_error", "message": message}})
                }
                WireApi::OpenAi => {
                    json!({"error": {"message": message, "type": "server_error", "code": null}})
                }
            };
            Body::from(error.to_string())
        }
        _ => Body::from(text),
    };
    let mut response = Response::new(response_body);
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    response
}

fn raw_chunks_response(content_type: &str, chunks: Vec<Vec<u8>>) -> Response {
    let chunks = chunks
        .into_iter()
        .filter(|c| !c.is_empty())
        .map(|c| Ok::<Bytes, Infallible>(Bytes::from(c)));
    let mut response = Response::new(Body::from_stream(stream::iter(chunks)));
    response.headers_mut().insert(
        "content-type",
        HeaderValue::from_str(content_type)
            .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream")),
    );
    response
}

fn raw_response(
    status: u16,
    content_type: &'static str,
    body: String,
    retry_after: Option<u64>,
) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static(content_type));
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from(secs));
    }
    response
}

/// An error in the API's own format.
fn error_response(api: WireApi, status: u16, message: &str, retry_after: Option<u64>) -> Response {
    let body = match api {
        WireApi::Anthropic => {
            let kind = match status {
                400 => "invalid_request_error",
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                529 => "overloaded_error",
                _ => "api_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
        WireApi::OpenAi => {
            let kind = match status {
                401 => "invalid_api_key",
                429 => "rate_limit_exceeded",
                500..=599 => "server_error",
                _ => "invalid_request_error",
            };
            json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
        }
    };
    raw_response(status, "application/json", body.to_string(), retry_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(api: WireApi, body: Value) -> RecordedRequest {
        RecordedRequest {
            api,
            path: String::new(),
            headers: vec![],
            raw_body: body.to_string(),
            body,
        }
    }

    #[test]
    fn anthropic_helpers_and_default_brain() {
        let request = recorded(
            WireApi::Anthropic,
            json!({"system": "sys", "messages": [
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "x", "input": {"k": "v"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "42"}]}]}
            ]}),
        );
        assert_eq!(request.system_text(), "sys");
        assert_eq!(request.last_user_text().as_deref(), Some("first"));
        assert_eq!(request.trailing_tool_results().as_deref(), Some("42"));
        assert_eq!(request.all_text(), "sys\nfirst\n{\"k\":\"v\"}\n42");
        assert_eq!(
            default_brain()(&request),
            Reply::Text("tool said: 42".into())
        );
    }

    #[test]
    fn openai_helpers_and_default_brain() {
        let request = recorded(
            WireApi::OpenAi,
            json!({"messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "hi there"}
            ], "tools": [{"type": "function", "function": {"name": "read", "description": "reads", "parameters": {}}}]}),
        );
        assert_eq!(request.system_text(), "sys");
        assert_eq!(request.trailing_tool_results(), None);
        assert_eq!(request.tool_names(), vec!["read"]);
        assert_eq!(request.all_text(), "sys\nhi there\nreads");
        assert_eq!(
            default_brain()(&request),
            Reply::Text("echo: hi there".into())
        );
    }

    #[test]
    fn argument_fragments_respect_char_boundaries() {
        let fragments = argument_fragments("{\"p\":\"üüüüü✓\"}");
        assert_eq!(fragments.concat(), "{\"p\":\"üüüüü✓\"}");
        assert!(fragments.iter().all(|f| f.chars().count() <= 5));
    }
}
