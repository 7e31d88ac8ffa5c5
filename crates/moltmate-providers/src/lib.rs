//! Model providers for Moltmates: the Anthropic Messages API and OpenAI Chat Completions (which
//! also covers ollama, vLLM, OpenRouter and other OpenAI-compatible servers), both streamed with
//! tool calls, plus [`ModelChain`] for retries and fallbacks.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use moltmate_providers::{build_provider, ApiKind, ModelChain, ProviderSettings, RetryPolicy};
//! let anthropic = build_provider(ProviderSettings::new(
//!     "anthropic", ApiKind::Anthropic, "https://api.anthropic.com", Some("sk-ant-...".into()),
//! ))?;
//! let ollama = build_provider(ProviderSettings::new("ollama", ApiKind::OpenAi, "http://127.0.0.1:11434/v1", None))?;
//! let chain = ModelChain::new(
//!     vec![(anthropic, "claude-sonnet-4-5".into()), (ollama, "llama3.1".into())],
//!     RetryPolicy::default(),
//! );
//! let answer = chain
//!     .complete("You are helpful.", &[], &[], &moltmate_core::model::IgnoreDeltas)
//!     .await;
//! # let _ = answer; Ok(()) }
//! ```
//!
//! Streaming: every request asks for a stream. A server that answers with one JSON document
//! instead is understood too; its text then reaches the [`DeltaSink`](moltmate_core::model::DeltaSink)
//! as a single delta. `request_timeout` bounds the wait for the response headers,
//! `stream_idle_timeout` the silence between two chunks of the body, so long answers that keep
//! streaming are never cut off.
//!
//! Secrets: the API key is only ever placed in the auth header (marked sensitive). Errors carry
//! the server's message with anything key-like redacted, never a URL or request body.

mod anthropic;
mod chain;
mod http;
mod openai;
mod settings;
mod speech;
mod toolargs;
mod tools_wire;
#[cfg(test)]
mod wire_cache_tests;

pub use anthropic::AnthropicProvider;
pub use chain::{
    Attempt, ChainAnswer, ChainEntry, ChainError, ErrorKind, ModelChain, RetryPolicy,
    DEFAULT_MAX_OUTPUT_TOKENS,
};
pub use openai::OpenAiProvider;
pub use settings::{ApiKey, ApiKind, ProviderSettings};
pub use speech::OpenAiTranscriber;

use moltmate_core::model::{Provider, ProviderError};
use std::sync::Arc;

/// Builds a provider with its own pooled HTTP client.
///
/// Fails with [`ProviderError::NotConfigured`] when the base URL is not an http(s) URL or the key
/// cannot be sent as a header.
pub fn build_provider(settings: ProviderSettings) -> Result<Arc<dyn Provider>, ProviderError> {
    Ok(match settings.api {
        ApiKind::Anthropic => Arc::new(AnthropicProvider::new(&settings)?),
        ApiKind::OpenAi => Arc::new(OpenAiProvider::new(&settings)?),
    })
}
