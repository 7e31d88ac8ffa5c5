//! ModelChain against the fake LLM server: retries, Retry-After, fallbacks, partial streams,
//! and what the user is told when everything fails.

use moltmate_core::model::{ConversationItem, DeltaSink, Provider, ProviderError};
use moltmate_providers::{
    build_provider, ApiKind, ErrorKind, ModelChain, ProviderSettings, RetryPolicy,
};
use moltmate_testkit::llm::{FakeLlm, Reply};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: &str = "sk-chain-SECRET-0123456789";

#[derive(Default)]
struct Collect(Mutex<Vec<String>>);

impl DeltaSink for Collect {
    fn text_delta(&self, text: &str) {
        self.0.lock().unwrap().push(text.to_string());
    }
}

impl Collect {
    fn text(&self) -> String {
        self.0.lock().unwrap().concat()
    }
}

fn provider(fake: &FakeLlm, api: ApiKind, name: &str) -> Arc<dyn Provider> {
    let base = match api {
        ApiKind::Anthropic => fake.anthropic_base_url(),
        ApiKind::OpenAi => fake.openai_base_url(),
    };
    build_provider(ProviderSettings::new(name, api, base, Some(KEY.into()))).unwrap()
}

fn fast() -> RetryPolicy {
    RetryPolicy {
        max_retries: 2,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
        max_retry_after: Duration::from_secs(5),
    }
}

fn hello() -> Vec<ConversationItem> {
    vec![ConversationItem::User {
        text: "hello".into(),
    }]
}

#[tokio::test]
async fn rate_limit_with_retry_after_is_honoured_then_succeeds() {
    let fake = FakeLlm::start().await;
    fake.push_reply(Reply::rate_limited(1));
    let chain = ModelChain::new(
        vec![(
            provider(&fake, ApiKind::Anthropic, "anthropic"),
            "claude".into(),
        )],
        fast(),
    );
    let started = Instant::now();
    let answer = chain
        .complete("sys", &hello(), &[], &Collect::default())
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was not honoured"
    );
    assert_eq!(answer.response.text, "echo: hello");
    assert_eq!(
        (answer.provider.as_str(), answer.model.as_str()),
        ("anthropic", "claude")
    );
    assert_eq!(answer.failed_attempts.len(), 1);
    assert_eq!(answer.failed_attempts[0].kind(), ErrorKind::RateLimited);
    assert!(answer.streamed_text_is_final);
    assert_eq!(fake.request_count(), 2);
}

#[tokio::test]
async fn server_error_is_retried_then_succeeds() {
    let fake = FakeLlm::start().await;
    fake.push_reply(Reply::api_error(500, "internal"));
    fake.push_reply(Reply::StreamError {
        message: "Overloaded".into(),
    });
    let chain = ModelChain::new(
        vec![(provider(&fake, ApiKind::OpenAi, "openai"), "gpt".into())],
        fast(),
    );
    let answer = chain
        .complete("sys", &hello(), &[], &Collect::default())
        .await;
    // 500 (retried), then a stream error after partial text: not retried, no fallback left.
    let err = answer.unwrap_err();
    assert_eq!(
        err.attempts.iter().map(|a| a.kind()).collect::<Vec<_>>(),
        vec![ErrorKind::Server, ErrorKind::Interrupted]
    );
    assert_eq!(fake.request_count(), 2);

    fake.push_reply(Reply::api_error(503, "busy"));
    let sink = Collect::default();
    let answer = chain.complete("sys", &hello(), &[], &sink).await.unwrap();
    assert_eq!(answer.response.text, "echo: hello");
    assert_eq!(sink.text(), "echo: hello");
    assert_eq!(fake.request_count(), 4);
}

#[tokio::test]
async fn rejected_is_not_retried() {
    let fake = FakeLlm::start().await;
    fake.push_reply(Reply::api_error(401, "invalid x-api-key"));
    let chain = ModelChain::new(
        vec![(
            provider(&fake, ApiKind::Anthropic, "anthropic"),
            "claude".into(),
        )],
        fast(),
    );
    let err = chain
        .complete("sys", &hello(), &[], &Collect::default())
        .await
        .unwrap_err();
    assert_eq!(err.attempts.len(), 1);
    assert!(matches!(
        err.attempts[0].error,
        ProviderError::Rejected { status: 401, .. }
    ));
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test]
async fn exhausted_retries_fall_back_to_the_next_model() {
    let fake = FakeLlm::start().await;
    fake.set_brain(|request| {
        if request.model() == Some("primary") {
            Reply::api_error(503, "down")
        } else {
            Reply::text(format!(
                "backup: {}",
                request.last_user_text().unwrap_or_default()
            ))
        }
    });
    let chain = ModelChain::new(
        vec![
            (
                provider(&fake, ApiKind::Anthropic, "anthropic"),
                "primary".into(),
            ),
            (provider(&fake, ApiKind::OpenAi, "ollama"), "backup".into()),
        ],
        fast(),
    );
    let sink = Collect::default();
    let answer = chain.complete("sys", &hello(), &[], &sink).await.unwrap();
    assert_eq!(answer.response.text, "backup: hello");
    assert_eq!(sink.text(), "backup: hello");
    assert_eq!(
        (answer.provider.as_str(), answer.model.as_str()),
        ("ollama", "backup")
    );
    assert_eq!(
        answer.failed_attempts.len(),
        3,
        "one call and two retries of the primary"
    );
    assert!(answer.streamed_text_is_final);
    assert_eq!((fake.anthropic_count(), fake.openai_count()), (3, 1));
}

#[tokio::test]
async fn a_long_retry_after_falls_back_at_once() {
    let fake = FakeLlm::start().await;
    fake.push_reply(Reply::rate_limited(3600));
    let chain = ModelChain::new(
        vec![
            (
                provider(&fake, ApiKind::Anthropic, "anthropic"),
                "primary".into(),
            ),
            (
                provider(&fake, ApiKind::Anthropic, "anthropic"),
                "backup".into(),
            ),
        ],
        fast(),
    );
    let started = Instant::now();
    let answer = chain
        .complete("sys", &hello(), &[], &Collect::default())
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(answer.model, "backup");
    assert_eq!(fake.request_count(), 2);
}

#[tokio::test]
async fn an_interrupted_stream_falls_back_silently() {
    let fake = FakeLlm::start().await;
    fake.push_reply(Reply::CutStream);
    let chain = ModelChain::new(
        vec![
            (provider(&fake, ApiKind::OpenAi, "openai"), "primary".into()),
            (
                provider(&fake, ApiKind::Anthropic, "anthropic"),
                "backup".into(),
            ),
        ],
        fast(),
    );
    let sink = Collect::default();
    let answer = chain.complete("sys", &hello(), &[], &sink).await.unwrap();
    assert_eq!(answer.model, "backup");
    assert_eq!(answer.response.text, "echo: hello");
    assert!(!answer.streamed_text_is_final);
    assert!(
        !sink.text().contains("echo"),
        "the fallback's text is not streamed after a partial one"
    );
    assert_eq!(answer.failed_attempts[0].kind(), ErrorKind::Interrupted);
    assert_eq!(
        fake.request_count(),
        2,
        "the interrupted model is not retried"
    );
}

#[tokio::test]
async fn total_failure_tells_the_user_little_and_leaks_nothing() {
    let fake = FakeLlm::start().await;
    fake.set_brain(|_| Reply::api_error(500, format!("upstream failed for key {KEY}")));
    let chain = ModelChain::new(
        vec![
            (provider(&fake, ApiKind::Anthropic, "anthropic"), "a".into()),
            (provider(&fake, ApiKind::OpenAi, "openai"), "b".into()),
        ],
        RetryPolicy {
            max_retries: 1,
            ..fast()
        },
    );
    let err = chain
        .complete("sys", &hello(), &[], &Collect::default())
        .await
        .unwrap_err();
    assert_eq!(err.attempts.len(), 4);
    assert_eq!(
        err.user_message(),
        "The assistant's model is unavailable right now; please try again in a minute."
    );
    let port = fake.addr().port().to_string();
    for shown in [
        err.user_message().to_string(),
        err.to_string(),
        err.detail(),
        format!("{err:?}"),
    ] {
        assert!(
            !shown.contains("SECRET") && !shown.contains("sk-chain"),
            "{shown}"
        );
        assert!(!shown.contains(&port) && !shown.contains("http"), "{shown}");
    }
    assert_eq!(err.to_string(), "all 4 model attempts failed: anthropic/a (server), anthropic/a (server), openai/b (server), openai/b (server)");
}

#[tokio::test]
async fn an_empty_chain_fails_clearly() {
    let chain = ModelChain::new(vec![], fast());
    let err = chain
        .complete("sys", &hello(), &[], &Collect::default())
        .await
        .unwrap_err();
    assert!(err.attempts.is_empty());
    assert!(err.user_message().contains("No model is configured"));
}
