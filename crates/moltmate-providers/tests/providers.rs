//! Both providers against the fake LLM server: streaming, tools, usage, error mapping, secrecy.

use moltmate_core::model::{
    ConversationItem, DeltaSink, ModelRequest, Provider, ProviderError, StopReason, TokenUsage,
    ToolCall, ToolSpec,
};
use moltmate_providers::{build_provider, ApiKind, ProviderSettings};
use moltmate_testkit::llm::{FakeLlm, RecordedRequest, Reply, WireApi};
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: &str = "sk-test-SECRETKEY0123456789abcdef";

#[derive(Default)]
struct Collect(Mutex<Vec<String>>);

impl DeltaSink for Collect {
    fn text_delta(&self, text: &str) {
        self.0.lock().unwrap().push(text.to_string());
    }
}

impl Collect {
    fn pieces(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

fn settings(fake: &FakeLlm, api: ApiKind) -> ProviderSettings {
    let base = match api {
        ApiKind::Anthropic => fake.anthropic_base_url(),
        ApiKind::OpenAi => fake.openai_base_url(),
    };
    let mut s = ProviderSettings::new(format!("{api}-test"), api, base, Some(KEY.into()));
    s.request_timeout = Duration::from_secs(5);
    s.stream_idle_timeout = Duration::from_secs(5);
    s
}

fn provider(fake: &FakeLlm, api: ApiKind) -> Arc<dyn Provider> {
    build_provider(settings(fake, api)).unwrap()
}

fn ask(text: &str) -> ModelRequest<'static> {
    ModelRequest {
        model: "test-model".into(),
        system: "You are terse.".into(),
        items: vec![ConversationItem::User { text: text.into() }].into(),
        tools: vec![ToolSpec {
            name: "read_file".into(),
            description: "Reads a file".into(),
            parameters: std::sync::Arc::new(
                json!({"type": "object", "properties": {"path": {"type": "string"}}}),
            ),
        }]
        .into(),
        max_output_tokens: 321,
        stored: None,
    }
}

const APIS: [ApiKind; 2] = [ApiKind::Anthropic, ApiKind::OpenAi];

fn assert_key_only_in_auth_header(request: &RecordedRequest) {
    assert!(!request.raw_body.contains(KEY), "key leaked into the body");
    for (name, value) in &request.headers {
        if value.contains(KEY) {
            assert!(
                name == "x-api-key" || name == "authorization",
                "key in header {name}"
            );
        }
    }
}

#[tokio::test]
async fn streamed_text_arrives_in_order_with_usage() {
    let fake = FakeLlm::start().await;
    for api in APIS {
        let sink = Collect::default();
        let response = provider(&fake, api)
            .complete(&ask("hello big world"), &sink)
            .await
            .unwrap();
        assert_eq!(response.text, "echo: hello big world");
        assert_eq!(sink.pieces(), vec!["echo: ", "hello ", "big ", "world"]);
        assert_eq!(response.stop_reason, StopReason::EndTurn);
        assert!(response.tool_calls.is_empty());
        let request = fake.last_request().unwrap();
        // input = words of everything sent, output = words of the reply (the fake's formula)
        let input = request.all_text().split_whitespace().count() as u64;
        assert_eq!(
            response.usage,
            TokenUsage {
                input_tokens: input,
                output_tokens: 4
            }
        );
        assert!(request.is_stream());
        assert_eq!(request.model(), Some("test-model"));
        assert_eq!(request.system_text(), "You are terse.");
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert_key_only_in_auth_header(&request);
        match api {
            ApiKind::Anthropic => {
                assert_eq!(request.api, WireApi::Anthropic);
                assert_eq!(request.path, "/v1/messages");
                assert_eq!(request.header("x-api-key"), Some(KEY));
                assert_eq!(request.header("anthropic-version"), Some("2023-06-01"));
                assert_eq!(request.header("authorization"), None);
                assert_eq!(request.body["max_tokens"], 321);
                assert_eq!(request.body["system"], "You are terse.");
                assert_eq!(
                    request.body["messages"],
                    // One text block goes as the API's string shorthand for it.
                    json!([{"role": "user", "content": "hello big world"}])
                );
                assert_eq!(
                    request.body["tools"],
                    json!([{"name": "read_file", "description": "Reads a file",
                            "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}])
                );
            }
            ApiKind::OpenAi => {
                assert_eq!(request.api, WireApi::OpenAi);
                assert_eq!(request.path, "/v1/chat/completions");
                assert_eq!(
                    request.header("authorization"),
                    Some(format!("Bearer {KEY}").as_str())
                );
                assert_eq!(request.header("x-api-key"), None);
                assert_eq!(request.body["max_tokens"], 321);
                assert_eq!(
                    request.body["stream_options"],
                    json!({"include_usage": true})
                );
                assert_eq!(
                    request.body["messages"],
                    json!([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello big world"}])
                );
                assert_eq!(
                    request.body["tools"],
                    json!([{"type": "function", "function": {"name": "read_file", "description": "Reads a file",
                            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}])
                );
            }
        }
    }
}

#[tokio::test]
async fn non_streamed_json_replies_are_understood() {
    let fake = FakeLlm::start().await;
    fake.set_stream_override(Some(false));
    fake.set_usage(Some(TokenUsage {
        input_tokens: 123,
        output_tokens: 45,
    }));
    for api in APIS {
        let sink = Collect::default();
        let response = provider(&fake, api)
            .complete(&ask("plain"), &sink)
            .await
            .unwrap();
        assert_eq!(response.text, "echo: plain");
        assert_eq!(sink.pieces(), vec!["echo: plain"]);
        assert_eq!(
            response.usage,
            TokenUsage {
                input_tokens: 123,
                output_tokens: 45
            }
        );
        assert_eq!(response.stop_reason, StopReason::EndTurn);

        fake.push_reply(Reply::TextAndToolCalls(
            "checking".into(),
            vec![
                ("read_file".into(), json!({"path": "a.txt"})),
                ("read_file".into(), json!({"path": "b.txt"})),
            ],
        ));
        let response = provider(&fake, api)
            .complete(&ask("files"), &Collect::default())
            .await
            .unwrap();
        assert_eq!(response.text, "checking");
        assert_eq!(response.stop_reason, StopReason::ToolUse);
        let args: Vec<_> = response
            .tool_calls
            .iter()
            .map(|c| c.arguments.clone())
            .collect();
        assert_eq!(
            args,
            vec![json!({"path": "a.txt"}), json!({"path": "b.txt"})]
        );
    }
}

#[tokio::test]
async fn streamed_tool_calls_round_trip_one_and_parallel() {
    let fake = FakeLlm::start().await;
    fake.set_usage(Some(TokenUsage {
        input_tokens: 7,
        output_tokens: 9,
    }));
    for api in APIS {
        let provider = provider(&fake, api);
        let nested =
            json!({"path": "notes/ü ✓.md", "options": {"lines": [1, 2, 3], "quote": "a \"b\""}});
        fake.push_reply(Reply::tool_call("read_file", nested.clone()));
        let response = provider
            .complete(&ask("read it"), &Collect::default())
            .await
            .unwrap();
        assert_eq!(response.stop_reason, StopReason::ToolUse);
        assert_eq!(response.tool_calls.len(), 1);
        assert_eq!(response.tool_calls[0].name, "read_file");
        assert_eq!(response.tool_calls[0].arguments, nested);
        assert!(!response.tool_calls[0].id.is_empty());
        assert_eq!(
            response.usage,
            TokenUsage {
                input_tokens: 7,
                output_tokens: 9
            }
        );

        fake.push_reply(Reply::TextAndToolCalls(
            "Let me look. ".into(),
            vec![
                ("read_file".into(), json!({"path": "a"})),
                ("list_dir".into(), json!({})),
                ("read_file".into(), json!({"path": "c"})),
            ],
        ));
        let sink = Collect::default();
        let response = provider.complete(&ask("read all"), &sink).await.unwrap();
        assert_eq!(response.text, "Let me look. ");
        assert_eq!(sink.pieces().concat(), "Let me look. ");
        let calls: Vec<_> = response
            .tool_calls
            .iter()
            .map(|c| (c.name.as_str(), c.arguments.clone()))
            .collect();
        assert_eq!(
            calls,
            vec![
                ("read_file", json!({"path": "a"})),
                ("list_dir", json!({})),
                ("read_file", json!({"path": "c"}))
            ]
        );
        let mut ids: Vec<_> = response.tool_calls.iter().map(|c| c.id.clone()).collect();
        ids.dedup();
        assert_eq!(ids.len(), 3, "each parallel call has its own id");
    }
}

#[tokio::test]
async fn invalid_tool_arguments_are_kept_as_a_string() {
    let fake = FakeLlm::start().await;
    for api in APIS {
        fake.push_reply(Reply::RawToolCall {
            name: "read_file".into(),
            raw_arguments: "{\"path\": \"a.txt\"".into(),
        });
        let response = provider(&fake, api)
            .complete(&ask("x"), &Collect::default())
            .await
            .unwrap();
        assert_eq!(
            response.tool_calls[0].arguments,
            json!("{\"path\": \"a.txt\"")
        );
    }
}

fn tool_conversation() -> Vec<ConversationItem> {
    vec![
        ConversationItem::User {
            text: "read both".into(),
        },
        ConversationItem::Assistant {
            text: "Reading.".into(),
            tool_calls: vec![
                ToolCall {
                    id: "call_1".into(),
                    name: "read_file".into(),
                    arguments: json!({"path": "a"}),
                },
                ToolCall {
                    id: "call_2".into(),
                    name: "read_file".into(),
                    arguments: json!({"path": "b"}),
                },
            ],
        },
        ConversationItem::ToolResult {
            call_id: "call_1".into(),
            content: "AAA".into(),
            is_error: false,
        },
        ConversationItem::ToolResult {
            call_id: "call_2".into(),
            content: "no such file".into(),
            is_error: true,
        },
    ]
}

#[tokio::test]
async fn tool_results_are_sent_in_the_api_shape() {
    let fake = FakeLlm::start().await;
    for api in APIS {
        let mut request = ask("unused");
        request.items = tool_conversation().into();
        let response = provider(&fake, api)
            .complete(&request, &Collect::default())
            .await
            .unwrap();
        let sent = fake.last_request().unwrap();
        match api {
            ApiKind::Anthropic => {
                assert_eq!(response.text, "tool said: AAA\nno such file");
                assert_eq!(
                    sent.body["messages"],
                    json!([
                        {"role": "user", "content": "read both"},
                        {"role": "assistant", "content": [
                            {"type": "text", "text": "Reading."},
                            {"type": "tool_use", "id": "call_1", "name": "read_file", "input": {"path": "a"}},
                            {"type": "tool_use", "id": "call_2", "name": "read_file", "input": {"path": "b"}}
                        ]},
                        {"role": "user", "content": [
                            {"type": "tool_result", "tool_use_id": "call_1", "content": "AAA"},
                            {"type": "tool_result", "tool_use_id": "call_2", "content": "no such file", "is_error": true}
                        ]}
                    ])
                );
            }
            ApiKind::OpenAi => {
                assert_eq!(response.text, "tool said: AAA\nError: no such file");
                assert_eq!(
                    sent.body["messages"],
                    json!([
                        {"role": "system", "content": "You are terse."},
                        {"role": "user", "content": "read both"},
                        {"role": "assistant", "content": "Reading.", "tool_calls": [
                            {"id": "call_1", "type": "function", "function": {"name": "read_file", "arguments": "{\"path\":\"a\"}"}},
                            {"id": "call_2", "type": "function", "function": {"name": "read_file", "arguments": "{\"path\":\"b\"}"}}
                        ]},
                        {"role": "tool", "tool_call_id": "call_1", "content": "AAA"},
                        {"role": "tool", "tool_call_id": "call_2", "content": "Error: no such file"}
                    ])
                );
            }
        }
    }
}

#[tokio::test]
async fn http_errors_are_classified() {
    let fake = FakeLlm::start().await;
    for api in APIS {
        let p = provider(&fake, api);
        fake.push_reply(Reply::rate_limited(7));
        match p
            .complete(&ask("x"), &Collect::default())
            .await
            .unwrap_err()
        {
            ProviderError::RateLimited { retry_after, .. } => {
                assert_eq!(retry_after, Some(Duration::from_secs(7)))
            }
            other => panic!("{other:?}"),
        }
        for (status, retryable) in [
            (500, true),
            (503, true),
            (529, true),
            (400, false),
            (404, false),
        ] {
            fake.push_reply(Reply::api_error(status, "boom"));
            let err = p
                .complete(&ask("x"), &Collect::default())
                .await
                .unwrap_err();
            assert_eq!(err.is_retryable(), retryable, "{status}: {err:?}");
            match (&err, status) {
                (ProviderError::Server { status: s, .. }, 500..) => assert_eq!(*s, status),
                (
                    ProviderError::Rejected {
                        status: s, detail, ..
                    },
                    _,
                ) => {
                    assert_eq!(*s, status);
                    assert_eq!(detail, "boom");
                }
                _ => panic!("{status}: {err:?}"),
            }
        }
        // A proxy's HTML error page still gives a clear, bounded error.
        fake.push_reply(Reply::Error {
            status: 502,
            body: format!("<html>{}</html>", "x".repeat(5000)),
            retry_after: None,
        });
        let err = p
            .complete(&ask("x"), &Collect::default())
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProviderError::Server { status: 502, .. }),
            "{err:?}"
        );
        assert!(err.to_string().len() < 500);
    }
}

#[tokio::test]
async fn a_key_echoed_by_the_server_is_redacted() {
    let fake = FakeLlm::start().await;
    for api in APIS {
        let p = provider(&fake, api);
        fake.push_reply(Reply::api_error(
            401,
            format!(
                "Incorrect API key provided: {KEY}. Also {}***{}",
                &KEY[..8],
                &KEY[28..]
            ),
        ));
        let err = p
            .complete(&ask("x"), &Collect::default())
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProviderError::Rejected { status: 401, .. }),
            "{err:?}"
        );
        let shown = format!("{err} {err:?}");
        assert!(
            !shown.contains("SECRETKEY") && !shown.contains("abcdef") && !shown.contains("sk-test"),
            "{shown}"
        );
        assert!(shown.contains("Incorrect API key provided"), "{shown}");
    }
}

#[tokio::test]
async fn malformed_and_cut_replies_are_invalid() {
    let fake = FakeLlm::start().await;
    for api in APIS {
        let p = provider(&fake, api);
        for stream in [true, false] {
            fake.set_stream_override(Some(stream));
            for reply in [Reply::Garbage, Reply::CutStream] {
                fake.push_reply(reply.clone());
                let err = p
                    .complete(&ask("x"), &Collect::default())
                    .await
                    .unwrap_err();
                assert!(
                    matches!(err, ProviderError::InvalidReply { .. }),
                    "{api} {stream} {reply:?}: {err:?}"
                );
                assert!(!err.is_retryable());
            }
        }
        fake.set_stream_override(None);
    }
}

#[tokio::test]
async fn in_stream_errors_are_server_errors_after_partial_text() {
    let fake = FakeLlm::start().await;
    for api in APIS {
        fake.push_reply(Reply::StreamError {
            message: "Overloaded".into(),
        });
        let sink = Collect::default();
        let err = provider(&fake, api)
            .complete(&ask("x"), &sink)
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::Server { .. }), "{err:?}");
        assert!(err.is_retryable());
        assert!(
            !sink.pieces().is_empty(),
            "some text streamed before the error"
        );
    }
}

#[tokio::test]
async fn stalls_and_slow_answers_time_out_without_blocking_others() {
    let fake = FakeLlm::start().await;
    for api in APIS {
        let mut s = settings(&fake, api);
        s.stream_idle_timeout = Duration::from_millis(300);
        s.request_timeout = Duration::from_millis(300);
        let p = build_provider(s).unwrap();

        fake.push_reply(Reply::Stall);
        let started = Instant::now();
        let err = p
            .complete(&ask("x"), &Collect::default())
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(3));

        // A stuck model (no headers) times out, while another request is served at once.
        fake.push_reply(Reply::delayed(Duration::from_secs(30), Reply::text("late")));
        let (stuck_request, stuck_sink) = (ask("x"), Collect::default());
        let stuck = p.complete(&stuck_request, &stuck_sink);
        let quick = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            p.complete(&ask("quick"), &Collect::default()).await
        };
        let (stuck, quick) = tokio::join!(stuck, quick);
        assert!(
            matches!(stuck, Err(ProviderError::Timeout { .. })),
            "{stuck:?}"
        );
        assert_eq!(quick.unwrap().text, "echo: quick");
    }
}

#[tokio::test]
async fn connection_refused_is_a_connect_error_without_url() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    for api in APIS {
        let s = ProviderSettings::new(
            "down",
            api,
            format!("http://127.0.0.1:{port}/v1"),
            Some(KEY.into()),
        );
        let err = build_provider(s)
            .unwrap()
            .complete(&ask("x"), &Collect::default())
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::Connect { .. }), "{err:?}");
        let shown = format!("{err} {err:?}");
        assert!(
            !shown.contains("127.0.0.1") && !shown.contains(KEY),
            "{shown}"
        );
    }
}

#[tokio::test]
async fn no_key_means_no_auth_header() {
    let fake = FakeLlm::start().await;
    let mut s = settings(&fake, ApiKind::OpenAi);
    s.api_key = None;
    build_provider(s)
        .unwrap()
        .complete(&ask("x"), &Collect::default())
        .await
        .unwrap();
    assert_eq!(fake.last_request().unwrap().header("authorization"), None);
}

#[test]
fn bad_settings_are_not_configured() {
    let s = ProviderSettings::new("bad", ApiKind::Anthropic, "ftp://example", None);
    assert!(matches!(
        build_provider(s),
        Err(ProviderError::NotConfigured { .. })
    ));
    let s = ProviderSettings::new("bad", ApiKind::Anthropic, "not a url", None);
    assert!(matches!(
        build_provider(s),
        Err(ProviderError::NotConfigured { .. })
    ));
    let s = ProviderSettings::new(
        "bad",
        ApiKind::OpenAi,
        "http://127.0.0.1/v1",
        Some("line\nbreak".into()),
    );
    match build_provider(s) {
        Err(err @ ProviderError::NotConfigured { .. }) => {
            assert!(!err.to_string().contains("break"))
        }
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("a key with a newline must be refused"),
    }
}
