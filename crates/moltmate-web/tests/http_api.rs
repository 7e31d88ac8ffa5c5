//! The OpenAI-compatible API over HTTP, against a real gateway.

mod common;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use common::*;
use serde_json::json;

#[tokio::test]
async fn models_lists_the_assistant_for_a_valid_token() {
    let h = harness();
    let (_, token) = h.user("anna").await;
    let response = send(
        &h.app(),
        Request::get("/v1/models")
            .header(header::AUTHORIZATION, bearer(&token))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status, StatusCode::OK);
    let body = response.json();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["id"], "moltmate");
    assert_eq!(body["data"][0]["object"], "model");
}

#[tokio::test]
async fn a_non_streamed_completion_answers_from_the_users_session() {
    let h = harness();
    let (_, token) = h.user("anna").await;
    let body = json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "ignored"},
            {"role": "user", "content": "an older message"},
            {"role": "assistant", "content": "an older answer"},
            {"role": "user", "content": "hello there"}
        ]
    });
    let response = send(&h.app(), completion_request(&token, body)).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.body);
    let body = response.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(
        body["model"], "gpt-4o-mini",
        "the requested model is echoed"
    );
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        echo_of("hello there")
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}),
        "the turn's model usage is reported"
    );

    // Only the last user message was submitted: the model saw exactly one user item.
    let calls = h.model.calls();
    assert_eq!(calls.len(), 1);
    let users: Vec<_> = calls[0]
        .items
        .iter()
        .filter(|i| matches!(i, moltmate_core::model::ConversationItem::User { .. }))
        .collect();
    assert_eq!(users.len(), 1);
    assert!(!calls[0].all_text().contains("an older message"));
    assert!(!calls[0].system.contains("ignored"));

    // The gateway keeps the history: a second request sees the first exchange.
    let response = send(
        &h.app(),
        completion_request(
            &token,
            json!({"model": "x", "messages": [{"role": "user", "content": "again"}]}),
        ),
    )
    .await;
    assert_eq!(response.status, StatusCode::OK);
    let calls = h.model.calls();
    assert!(
        calls[1].all_text().contains("hello there"),
        "history is kept server-side"
    );
}

#[tokio::test]
async fn a_streamed_completion_uses_openai_chunks_and_done() {
    let h = harness();
    let (_, token) = h.user("anna").await;
    let body = json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": [{"type": "text", "text": "stream me"}]}]});
    let response = send(&h.app(), completion_request(&token, body)).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.body);
    assert!(response
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));

    let data = sse_data(&response.body);
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(
        chunks.len() >= 5,
        "role chunk, three content chunks, finish chunk: {chunks:?}"
    );
    let id = chunks[0]["id"].clone();
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], id, "one id for the whole stream");
        assert_eq!(chunk["model"], "m");
        assert_eq!(chunk["choices"][0]["index"], 0);
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, echo_of("stream me"));
    let content_chunks = chunks
        .iter()
        .filter(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        })
        .count();
    assert!(content_chunks >= 3, "the answer arrives in several deltas");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["choices"][0]["delta"], json!({}));
    for chunk in &chunks[..chunks.len() - 1] {
        assert!(chunk["choices"][0]["finish_reason"].is_null());
    }
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none()),
        "no usage chunk unless asked for"
    );
}

#[tokio::test]
async fn a_streamed_completion_reports_usage_when_asked() {
    let h = harness();
    let (_, token) = h.user("anna").await;
    let body = json!({"stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "count me"}]});
    let response = send(&h.app(), completion_request(&token, body)).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.body);
    let data = sse_data(&response.body);
    let usage_chunk: serde_json::Value = serde_json::from_str(data[data.len() - 2]).unwrap();
    assert_eq!(usage_chunk["object"], "chat.completion.chunk");
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(
        usage_chunk["usage"],
        json!({"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19})
    );
    let finish: serde_json::Value = serde_json::from_str(data[data.len() - 3]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn bad_missing_and_revoked_tokens_get_401_in_openai_shape() {
    let h = harness();
    let (anna, token) = h.user("anna").await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}]});

    let no_token = Request::post("/v1/chat/completions")
        .body(Body::from(body.to_string()))
        .unwrap();
    let bad = completion_request(
        "mm_0000000000000000000000000000000000000000000000000000000000000000",
        body.clone(),
    );
    let basic = Request::get("/v1/models")
        .header(header::AUTHORIZATION, "Basic YTpi")
        .body(Body::empty())
        .unwrap();
    for request in [no_token, bad, basic] {
        let response = send(&h.app(), request).await;
        assert_eq!(response.status, StatusCode::UNAUTHORIZED);
        let error = response.json();
        assert_eq!(error["error"]["type"], "authentication_error");
        assert_eq!(error["error"]["code"], "invalid_api_key");
        assert!(error["error"]["message"].is_string());
    }

    h.gateway.store().revoke_tokens(&anna, None).await.unwrap();
    let response = send(&h.app(), completion_request(&token, body)).await;
    assert_eq!(response.status, StatusCode::UNAUTHORIZED);
    assert!(!response.body.contains(&token), "the token is never echoed");
    assert!(h.model.calls().is_empty(), "nothing reached the model");
}

#[tokio::test]
async fn bad_bodies_get_400_and_huge_ones_413() {
    let h = harness();
    let (_, token) = h.user("anna").await;
    for body in [
        json!({"messages": []}),
        json!({"model": "x"}),
        json!({"messages": [{"role": "user", "content": 5}]}),
    ] {
        let response = send(&h.app(), completion_request(&token, body)).await;
        assert_eq!(response.status, StatusCode::BAD_REQUEST);
        assert_eq!(response.json()["error"]["type"], "invalid_request_error");
    }
    let not_json = Request::post("/v1/chat/completions")
        .header(header::AUTHORIZATION, bearer(&token))
        .body(Body::from("{not json"))
        .unwrap();
    let response = send(&h.app(), not_json).await;
    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    assert!(response.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("invalid request body"));

    let huge = "x".repeat(moltmate_web::MAX_BODY_BYTES + 10);
    let response = send(
        &h.app(),
        completion_request(
            &token,
            json!({"messages": [{"role": "user", "content": huge}]}),
        ),
    )
    .await;
    assert_eq!(response.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(response.json()["error"]["code"], "request_too_large");
}

#[tokio::test]
async fn the_token_decides_the_user_not_the_body() {
    let h = harness();
    let (_, anna_token) = h.user("anna").await;
    let (bob, _) = h.user("bob").await;
    let body = json!({"user": "bob", "messages": [{"role": "user", "content": "who am i"}]});
    let response = send(&h.app(), completion_request(&anna_token, body)).await;
    assert_eq!(response.status, StatusCode::OK);
    let bob_session = h.gateway.store().current_session(&bob).await.unwrap();
    assert!(
        h.gateway
            .store()
            .transcript(&bob_session.id)
            .await
            .unwrap()
            .is_empty(),
        "bob's session is untouched"
    );
    let anna = moltmate_core::UserId::new("anna").unwrap();
    let anna_session = h.gateway.store().current_session(&anna).await.unwrap();
    assert_eq!(
        h.gateway
            .store()
            .transcript(&anna_session.id)
            .await
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let h = harness_with(moltmate_web::WebSettings {
        rate_limit_per_minute: 1,
        rate_limit_burst: 3,
        ..test_settings()
    });
    let (_, token) = h.user("anna").await;
    let models = || {
        Request::get("/v1/models")
            .header(header::AUTHORIZATION, bearer(&token))
            .body(Body::empty())
            .unwrap()
    };
    for _ in 0..3 {
        assert_eq!(send(&h.app(), models()).await.status, StatusCode::OK);
    }
    let response = send(&h.app(), models()).await;
    assert_eq!(response.status, StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(response.json()["error"]["type"], "rate_limit_error");
}

#[tokio::test]
async fn shutting_down_answers_503() {
    let h = harness();
    let (_, token) = h.user("anna").await;
    h.shutdown.cancel();
    let response = send(
        &h.app(),
        completion_request(
            &token,
            json!({"messages": [{"role": "user", "content": "hi"}]}),
        ),
    )
    .await;
    assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.json()["error"]["code"], "shutting_down");
}

#[tokio::test]
async fn replies_that_were_not_streamed_still_arrive_in_the_stream() {
    // A brand-new user gets the onboarding menu: a gateway reply without model deltas.
    let h = harness();
    let newcomer = moltmate_core::UserId::new("newcomer").unwrap();
    let token = h
        .gateway
        .store()
        .issue_token(&newcomer, None)
        .await
        .unwrap();
    let body = json!({"stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let response = send(&h.app(), completion_request(&token, body)).await;
    assert_eq!(response.status, StatusCode::OK);
    let data: Vec<&str> = response
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let text: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<serde_json::Value>(d).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert!(
        text.len() > 20,
        "the onboarding menu arrives as content: {text:?}"
    );
    assert!(h.model.calls().is_empty(), "no model was needed for it");
}

/// The `data:` payloads of an SSE body, checked to end with `[DONE]`.
fn sse_data(body: &str) -> Vec<&str> {
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    data
}

/// Regression: a FIFO as SOUL.md froze the gateway for everyone, on the web as on Telegram
/// (the accept path read it on the runtime). Now the API user is answered, told which files
/// were skipped, and another user is answered too.
#[tokio::test]
async fn fifo_context_files_do_not_block_the_api_and_the_user_is_told() {
    let h = harness();
    let (mallory, token) = h.user("mallory").await;
    let (_, other) = h.user("bob").await;
    let home = h.gateway.ensure_home(&mallory).await.unwrap();
    for file in ["SOUL.md", "MEMORY.md"] {
        std::fs::remove_file(home.root().join(file)).ok();
        let path =
            std::ffi::CString::new(home.root().join(file).as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    }
    let ask = |token: &str, text: &str| {
        completion_request(
            token,
            json!({"model": "m", "messages": [{"role": "user", "content": text}]}),
        )
    };
    let response = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        send(&h.app(), ask(&token, "hello")),
    )
    .await
    .expect("the API answered");
    assert_eq!(response.status, StatusCode::OK, "{}", response.body);
    let content = response.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(content.starts_with(&echo_of("hello")), "{content}");
    for file in ["SOUL.md", "MEMORY.md"] {
        assert!(
            content.contains(&format!("{file} (it is a FIFO (named pipe)")),
            "{file} in {content}"
        );
    }
    let response = send(&h.app(), ask(&other, "hi")).await;
    assert_eq!(
        response.json()["choices"][0]["message"]["content"],
        echo_of("hi")
    );
}
