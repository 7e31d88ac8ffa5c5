//! Property tests of both providers' streamed replies, through `Provider::complete` against the
//! fake LLM server sending raw bytes in the chunks each case chooses:
//!
//! * any valid SSE stream (any text, tool calls with any arguments, usage, stop reason, written
//!   with `\n` or `\r\n`, comments, pings, multi-line `data:`), cut into arbitrary chunks (also
//!   inside UTF-8 sequences and line breaks), gives exactly the answer it encodes, and its text
//!   reaches the delta sink in order;
//! * any bytes at all (random, a valid stream cut short or corrupted, SSE-shaped soup with wrong
//!   types and huge numbers) never panic and give an answer or a classified error whose text is
//!   bounded and free of the API key.

use moltmate_core::model::{
    ConversationItem, DeltaSink, ModelRequest, ModelResponse, Provider, ProviderError, StopReason,
    ToolCall,
};
use moltmate_providers::{build_provider, ApiKind, ProviderSettings};
use moltmate_testkit::llm::{FakeLlm, Reply};
use moltmate_testkit::prop::config as prop_config;
use proptest::prelude::*;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KEY: &str = "sk-prop-SECRETKEY0123456789abcdef";

#[derive(Default)]
struct Collect(Mutex<String>);

impl DeltaSink for Collect {
    fn text_delta(&self, text: &str) {
        self.0.lock().unwrap().push_str(text);
    }
}

/// The fake server and a provider of each API, on one runtime, for a whole test.
struct World {
    runtime: tokio::runtime::Runtime,
    fake: FakeLlm,
    anthropic: Arc<dyn Provider>,
    openai: Arc<dyn Provider>,
}

impl World {
    fn start() -> World {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let fake = runtime.block_on(FakeLlm::start());
        let provider = |api: ApiKind, base: String| {
            let mut s = ProviderSettings::new(format!("{api}-prop"), api, base, Some(KEY.into()));
            s.request_timeout = Duration::from_secs(10);
            s.stream_idle_timeout = Duration::from_secs(10);
            build_provider(s).unwrap()
        };
        let anthropic = provider(ApiKind::Anthropic, fake.anthropic_base_url());
        let openai = provider(ApiKind::OpenAi, fake.openai_base_url());
        World {
            runtime,
            fake,
            anthropic,
            openai,
        }
    }

    /// One request answered with `body` cut into `chunks`; the result and the streamed text.
    fn complete(
        &self,
        api: ApiKind,
        content_type: &str,
        chunks: Vec<Vec<u8>>,
    ) -> (Result<ModelResponse, ProviderError>, String) {
        self.fake.push_reply(Reply::Raw {
            content_type: content_type.to_string(),
            chunks,
        });
        let provider = match api {
            ApiKind::Anthropic => &self.anthropic,
            ApiKind::OpenAi => &self.openai,
        };
        let request = ModelRequest {
            model: "m".into(),
            system: String::new().into(),
            items: vec![ConversationItem::User { text: "hi".into() }].into(),
            tools: vec![].into(),
            max_output_tokens: 100,
            stored: None,
        };
        let deltas = Collect::default();
        let result = self.runtime.block_on(provider.complete(&request, &deltas));
        let streamed = deltas.0.lock().unwrap().clone();
        (result, streamed)
    }
}

/// `body` cut at the given positions (any byte offsets: inside characters and line breaks too).
fn cut(body: &[u8], cuts: &[prop::sample::Index]) -> Vec<Vec<u8>> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(body.len() + 1)).collect();
    at.push(0);
    at.push(body.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| body[w[0]..w[1]].to_vec()).collect()
}

// ---------------------------------------------------------------------------------------------
// Valid answers and their wire form.

#[derive(Debug, Clone)]
struct Call {
    id: String,
    name: String,
    arguments: Value,
    /// Where the arguments' JSON text is cut into fragments (character positions).
    cuts: Vec<prop::sample::Index>,
}

#[derive(Debug, Clone)]
struct Answer {
    pieces: Vec<String>,
    calls: Vec<Call>,
    /// input, cache creation, cache read, output
    usage: (u64, u64, u64, u64),
    stop: &'static str,
}

#[derive(Debug, Clone)]
struct Style {
    crlf: bool,
    pretty: bool,
    space_after_colon: bool,
    comments: bool,
    pings: bool,
    event_lines: bool,
    usage_chunk: bool,
}

fn text_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-zäß😀 \\n\\r:]{1,10}",
        Just("data: [DONE]\n\n".to_string()),
        Just("event: error\r\n".to_string()),
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        // Short decimals: serde_json (without `float_roundtrip`) may read a 17-digit float back
        // one ULP off, which is serde's business, not the stream parser's.
        any::<i32>().prop_map(|n| json!(f64::from(n) / 64.0)),
        any::<String>().prop_map(Value::String),
    ]
}

fn arguments() -> impl Strategy<Value = Value> {
    let value = json_leaf().prop_recursive(3, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    prop::collection::btree_map("[a-z_]{1,8}", value, 0..4)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

fn answer(stops: Vec<&'static str>) -> impl Strategy<Value = Answer> {
    answer_with_usage(
        stops,
        (
            0u64..=u32::MAX.into(),
            0u64..1000,
            0u64..1000,
            0u64..=u32::MAX.into(),
        ),
    )
}

fn answer_with_usage(
    stops: Vec<&'static str>,
    usage: impl Strategy<Value = (u64, u64, u64, u64)>,
) -> impl Strategy<Value = Answer> {
    let call = (
        "[a-zA-Z0-9_]{1,20}",
        "[a-z_]{1,16}",
        arguments(),
        prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    )
        .prop_map(|(id, name, arguments, cuts)| Call {
            id,
            name,
            arguments,
            cuts,
        });
    (
        prop::collection::vec(text_piece(), 0..6),
        prop::collection::vec(call, 0..3),
        usage,
        prop::sample::select(stops),
    )
        .prop_map(|(pieces, calls, usage, stop)| Answer {
            pieces,
            calls,
            usage,
            stop,
        })
}

fn style() -> impl Strategy<Value = Style> {
    (any::<[bool; 7]>()).prop_map(|b| Style {
        crlf: b[0],
        pretty: b[1],
        space_after_colon: b[2],
        comments: b[3],
        pings: b[4],
        event_lines: b[5],
        usage_chunk: b[6],
    })
}

/// One SSE event in the chosen style.
fn event(style: &Style, name: Option<&str>, data: &Value, out: &mut String) {
    let nl = if style.crlf { "\r\n" } else { "\n" };
    let sp = if style.space_after_colon { " " } else { "" };
    if style.comments {
        out.push_str(&format!(": keep-alive{nl}"));
    }
    if let Some(name) = name.filter(|_| style.event_lines) {
        out.push_str(&format!("event:{sp}{name}{nl}"));
    }
    let text = if style.pretty {
        serde_json::to_string_pretty(data).unwrap()
    } else {
        data.to_string()
    };
    // Pretty JSON spans several `data:` lines, which SSE joins with `\n`.
    for line in text.lines() {
        out.push_str(&format!("data:{sp}{line}{nl}"));
    }
    out.push_str(nl);
}

fn fragments(call: &Call) -> Vec<String> {
    let text = call.arguments.to_string();
    let chars: Vec<char> = text.chars().collect();
    let mut at: Vec<usize> = call.cuts.iter().map(|i| i.index(chars.len() + 1)).collect();
    at.push(0);
    at.push(chars.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2)
        .map(|w| chars[w[0]..w[1]].iter().collect())
        .collect()
}

fn anthropic_stream(answer: &Answer, style: &Style) -> String {
    let mut out = String::new();
    let (input, cache_write, cache_read, output) = answer.usage;
    event(
        style,
        Some("message_start"),
        &json!({"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "m",
        "stop_reason": null, "usage": {"input_tokens": input, "cache_creation_input_tokens": cache_write,
        "cache_read_input_tokens": cache_read, "output_tokens": 1}}}),
        &mut out,
    );
    if style.pings {
        event(style, Some("ping"), &json!({"type": "ping"}), &mut out);
    }
    event(
        style,
        Some("content_block_start"),
        &json!({"type": "content_block_start", "index": 0,
        "content_block": {"type": "text", "text": ""}}),
        &mut out,
    );
    for piece in &answer.pieces {
        event(
            style,
            Some("content_block_delta"),
            &json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": piece}}),
            &mut out,
        );
    }
    event(
        style,
        Some("content_block_stop"),
        &json!({"type": "content_block_stop", "index": 0}),
        &mut out,
    );
    for (i, call) in answer.calls.iter().enumerate() {
        let index = i + 1;
        event(
            style,
            Some("content_block_start"),
            &json!({"type": "content_block_start", "index": index,
            "content_block": {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}}),
            &mut out,
        );
        for fragment in fragments(call) {
            event(
                style,
                Some("content_block_delta"),
                &json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "input_json_delta", "partial_json": fragment}}),
                &mut out,
            );
        }
        if style.pings {
            event(style, Some("ping"), &json!({"type": "ping"}), &mut out);
        }
        event(
            style,
            Some("content_block_stop"),
            &json!({"type": "content_block_stop", "index": index}),
            &mut out,
        );
    }
    event(
        style,
        Some("message_delta"),
        &json!({"type": "message_delta",
        "delta": {"stop_reason": answer.stop, "stop_sequence": null}, "usage": {"output_tokens": output}}),
        &mut out,
    );
    event(
        style,
        Some("message_stop"),
        &json!({"type": "message_stop"}),
        &mut out,
    );
    out
}

fn openai_stream(answer: &Answer, style: &Style) -> String {
    let mut out = String::new();
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    event(
        style,
        None,
        &chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        &mut out,
    );
    for piece in &answer.pieces {
        event(
            style,
            None,
            &chunk(json!({"content": piece}), Value::Null),
            &mut out,
        );
    }
    for (i, call) in answer.calls.iter().enumerate() {
        event(
            style,
            None,
            &chunk(
                json!({"tool_calls": [{"index": i, "id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": ""}}]}),
                Value::Null,
            ),
            &mut out,
        );
        for fragment in fragments(call) {
            event(
                style,
                None,
                &chunk(
                    json!({"tool_calls": [{"index": i,
                "function": {"arguments": fragment}}]}),
                    Value::Null,
                ),
                &mut out,
            );
        }
    }
    event(style, None, &chunk(json!({}), json!(answer.stop)), &mut out);
    if style.usage_chunk {
        let (input, _, _, output) = answer.usage;
        event(
            style,
            None,
            &json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [],
            "usage": {"prompt_tokens": input, "completion_tokens": output, "total_tokens": input.saturating_add(output)}}),
            &mut out,
        );
    }
    let nl = if style.crlf { "\r\n" } else { "\n" };
    out.push_str(&format!("data: [DONE]{nl}{nl}"));
    out
}

fn expected(api: ApiKind, answer: &Answer, style: &Style) -> ModelResponse {
    let (input, cache_write, cache_read, output) = answer.usage;
    let (input, output) = match api {
        ApiKind::Anthropic => (input + cache_write + cache_read, output),
        ApiKind::OpenAi if style.usage_chunk => (input, output),
        ApiKind::OpenAi => (0, 0),
    };
    let stop_reason = match (api, answer.stop) {
        (ApiKind::Anthropic, "end_turn" | "stop_sequence") | (ApiKind::OpenAi, "stop") => {
            StopReason::EndTurn
        }
        (ApiKind::Anthropic, "tool_use") | (ApiKind::OpenAi, "tool_calls") => StopReason::ToolUse,
        (_, "max_tokens" | "length") => StopReason::MaxTokens,
        _ => StopReason::Other,
    };
    ModelResponse {
        text: answer.pieces.concat(),
        tool_calls: answer
            .calls
            .iter()
            .map(|c| ToolCall {
                id: c.id.clone(),
                name: c.name.clone(),
                arguments: c.arguments.clone(),
            })
            .collect(),
        usage: moltmate_core::model::TokenUsage {
            input_tokens: input,
            output_tokens: output,
        },
        stop_reason,
    }
}

// ---------------------------------------------------------------------------------------------
// Arbitrary bytes.

/// SSE-shaped soup: events of the right names whose data are JSON of the right field names with
/// values of any type (huge numbers, the API key, long strings), or not JSON at all.
fn soup() -> impl Strategy<Value = Vec<u8>> {
    let key = prop::sample::select(vec![
        "type",
        "index",
        "delta",
        "text",
        "partial_json",
        "content_block",
        "message",
        "usage",
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "stop_reason",
        "error",
        "message",
        "choices",
        "content",
        "tool_calls",
        "function",
        "arguments",
        "name",
        "id",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "code",
    ]);
    let leaf = prop_oneof![
        json_leaf(),
        any::<u64>().prop_map(|n| json!(n)),
        Just(json!(u64::MAX)),
        Just(json!(KEY)),
        Just(json!(format!("Incorrect API key provided: {KEY}"))),
        Just(json!("x".repeat(3000))),
        prop::sample::select(vec![
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
            "error",
            "ping",
            "text",
            "tool_use",
            "text_delta",
            "input_json_delta",
            "overloaded_error",
            "stop",
            "tool_calls",
        ])
        .prop_map(|s| json!(s)),
    ];
    let value = leaf.prop_recursive(4, 24, 5, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..5).prop_map(|m| Value::Object(
                m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    });
    let line = prop_oneof![
        4 => value.prop_map(|v| format!("data: {v}\n\n")),
        1 => "[ -~]{0,40}".prop_map(|s| format!("data: {s}\n\n")),
        1 => Just("data: [DONE]\n\n".to_string()),
        2 => prop::sample::select(vec!["message_start", "content_block_delta", "error", "ping", "message_stop"])
            .prop_map(|e| format!("event: {e}\n")),
        1 => "[ -~\u{80}-\u{10ffff}]{0,3000}".prop_map(|e| format!("event: {e}\n")),
        1 => Just(": comment\r\n".to_string()),
        1 => "(id|retry|data|event)?:?[ -~]{0,10}\r?\n".prop_map(|s| s),
    ];
    prop::collection::vec(line, 0..20).prop_map(|lines| lines.concat().into_bytes())
}

fn mangled_valid() -> impl Strategy<Value = (ApiKind, Vec<u8>)> {
    (
        prop::sample::select(vec![ApiKind::Anthropic, ApiKind::OpenAi]),
        // Any token counts, up to u64::MAX: sums must not overflow.
        answer_with_usage(
            vec!["end_turn", "tool_use", "stop", "tool_calls", "weird"],
            prop_oneof![
                any::<(u64, u64, u64, u64)>(),
                Just((u64::MAX, u64::MAX, u64::MAX, u64::MAX)),
            ],
        ),
        style(),
        any::<prop::sample::Index>(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        any::<bool>(),
    )
        .prop_map(|(api, answer, style, cut_at, flips, truncate)| {
            let mut body = match api {
                ApiKind::Anthropic => anthropic_stream(&answer, &style),
                ApiKind::OpenAi => openai_stream(&answer, &style),
            }
            .into_bytes();
            if truncate {
                body.truncate(cut_at.index(body.len() + 1));
            }
            for (at, byte) in flips {
                if !body.is_empty() {
                    let i = at.index(body.len());
                    body[i] = byte;
                }
            }
            (api, body)
        })
}

fn check_error(err: &ProviderError) -> Result<(), TestCaseError> {
    // The body was complete: no timeout, no connection error, no configuration error.
    prop_assert!(
        matches!(
            err,
            ProviderError::InvalidReply { .. }
                | ProviderError::Server { .. }
                | ProviderError::Rejected { .. }
                | ProviderError::RateLimited { .. }
        ),
        "unexpected classification: {err:?}"
    );
    let text = err.to_string();
    prop_assert!(!text.contains("SECRETKEY"), "the key leaked: {text}");
    prop_assert!(
        text.chars().count() <= 500,
        "unbounded error text ({} chars): {}",
        text.chars().count(),
        text.chars().take(200).collect::<String>()
    );
    Ok(())
}

proptest! {
    #![proptest_config(prop_config(48))]

    /// Any chunking of a valid Anthropic stream gives exactly the answer it encodes.
    #[test]
    fn prop_anthropic_any_chunking_gives_the_encoded_answer(
        answer in answer(vec!["end_turn", "tool_use", "max_tokens", "stop_sequence", "pause_turn"]),
        style in style(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
    ) {
        let world = world();
        let body = anthropic_stream(&answer, &style).into_bytes();
        let (result, streamed) = world.complete(ApiKind::Anthropic, "text/event-stream", cut(&body, &cuts));
        let response = result.map_err(|e| TestCaseError::fail(format!("valid stream refused: {e}")))?;
        prop_assert_eq!(&response, &expected(ApiKind::Anthropic, &answer, &style));
        prop_assert_eq!(streamed, response.text);
    }

    /// Any chunking of a valid OpenAI stream gives exactly the answer it encodes.
    #[test]
    fn prop_openai_any_chunking_gives_the_encoded_answer(
        answer in answer(vec!["stop", "tool_calls", "length", "content_filter"]),
        style in style(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
    ) {
        let world = world();
        let body = openai_stream(&answer, &style).into_bytes();
        let (result, streamed) = world.complete(ApiKind::OpenAi, "text/event-stream", cut(&body, &cuts));
        let response = result.map_err(|e| TestCaseError::fail(format!("valid stream refused: {e}")))?;
        prop_assert_eq!(&response, &expected(ApiKind::OpenAi, &answer, &style));
        prop_assert_eq!(streamed, response.text);
    }

    /// Any bytes, streamed or as a JSON body, to either API: an answer or a classified,
    /// bounded, key-free error; never a panic.
    #[test]
    fn prop_any_bytes_give_an_answer_or_a_classified_error(
        (api, body) in prop_oneof![
            (prop::sample::select(vec![ApiKind::Anthropic, ApiKind::OpenAi]), prop::collection::vec(any::<u8>(), 0..600)),
            (prop::sample::select(vec![ApiKind::Anthropic, ApiKind::OpenAi]), soup()),
            mangled_valid(),
        ],
        json_body in any::<bool>(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let world = world();
        let content_type = if json_body { "application/json" } else { "text/event-stream" };
        let (result, streamed) = world.complete(api, content_type, cut(&body, &cuts));
        match result {
            Ok(response) => prop_assert_eq!(streamed, response.text),
            Err(err) => check_error(&err)?,
        }
    }
}

#[test]
fn anthropic_event_names_in_errors_are_bounded_and_redacted() {
    // Found by proptest: the name of an event whose data was not JSON went into the error
    // whole (any length, the API key included).
    let world = world();
    let name = format!("{KEY} {}", "e".repeat(5000));
    let body = format!("event: {name}\ndata: not json\n\n").into_bytes();
    let (result, _) = world.complete(ApiKind::Anthropic, "text/event-stream", vec![body]);
    let err = result.unwrap_err();
    assert!(matches!(err, ProviderError::InvalidReply { .. }), "{err:?}");
    let text = err.to_string();
    assert!(!text.contains("SECRETKEY"), "{text}");
    assert!(text.chars().count() < 200, "{text}");
}

thread_local! {
    static WORLD: std::cell::OnceCell<&'static World> = const { std::cell::OnceCell::new() };
}

/// One world per test thread, kept for the whole run (a fresh fake server per case would cost
/// more than the case).
fn world() -> &'static World {
    WORLD.with(|cell| *cell.get_or_init(|| Box::leak(Box::new(World::start()))))
}
