//! The model contract: provider-neutral conversation types and the [`Provider`] trait.
//!
//! Providers (Anthropic Messages, OpenAI Chat Completions and every OpenAI-compatible server)
//! translate these types to and from their wire format. Nothing above a provider sees a wire
//! format, and nothing in these types may hold a credential.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::time::Duration;

/// One item of a conversation, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ConversationItem {
    User {
        text: String,
    },
    Assistant {
        text: String,
        tool_calls: Vec<ToolCall>,
    },
    ToolResult {
        call_id: String,
        content: String,
        is_error: bool,
    },
    /// A picture the user sent, shown to a model that supports images together with the user
    /// item that follows it. Only ever part of the current turn's request: the transcript keeps
    /// the text that names where the picture was saved, never the picture itself.
    Image {
        /// `image/jpeg`, `image/png`, `image/gif` or `image/webp` (decided from the content).
        media_type: String,
        /// The picture, base64 (standard alphabet, padded).
        data: String,
    },
}

/// A tool call requested by the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The provider's id for this call; echoed back in the matching [`ConversationItem::ToolResult`].
    pub id: String,
    pub name: String,
    /// Parsed JSON arguments. If the model produced invalid JSON, the provider puts the raw text
    /// in a JSON string here so the tool can return a clear error to the model.
    pub arguments: serde_json::Value,
}

/// A tool as offered to the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments object. Shared: a tool's spec is built once and offered on
    /// every turn, so a turn holds a pointer to it rather than its own tree of maps.
    pub parameters: std::sync::Arc<serde_json::Value>,
}

/// One request to a model. The prompt, the history and the tool specs are usually borrowed
/// from the turn (`Cow::Borrowed`): a session's history can be thousands of items, and a copy
/// of it per model call was a measurable share of a message's CPU.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRequest<'a> {
    /// The model name as the provider knows it (`claude-sonnet-4-5`), without the provider prefix.
    pub model: String,
    pub system: Cow<'a, str>,
    pub items: Cow<'a, [ConversationItem]>,
    pub tools: Cow<'a, [ToolSpec]>,
    pub max_output_tokens: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl TokenUsage {
    /// Both counts added (saturating).
    pub fn plus(self, other: TokenUsage) -> TokenUsage {
        TokenUsage {
            input_tokens: self.input_tokens.saturating_add(other.input_tokens),
            output_tokens: self.output_tokens.saturating_add(other.output_tokens),
        }
    }

    /// Input plus output tokens.
    pub fn total(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }

    /// Each count capped at [`MAX_TOKENS_PER_REPLY`]: what one provider reply may charge,
    /// whatever number it claims (a reply's `usage` is outside input).
    pub fn clamped(self) -> TokenUsage {
        TokenUsage {
            input_tokens: self.input_tokens.min(MAX_TOKENS_PER_REPLY),
            output_tokens: self.output_tokens.min(MAX_TOKENS_PER_REPLY),
        }
    }

    /// Neither count is known (a provider or proxy that reports no usage).
    pub fn is_zero(&self) -> bool {
        self.input_tokens == 0 && self.output_tokens == 0
    }

    /// The usage of a reply that reported none, estimated at one token per 4 bytes of what was
    /// sent and what came back (at least one token each), so budgets still count it.
    pub fn estimated(sent_bytes: usize, received_bytes: usize) -> TokenUsage {
        let tokens = |bytes: usize| (u64::try_from(bytes).unwrap_or(u64::MAX) / 4).max(1);
        TokenUsage {
            input_tokens: tokens(sent_bytes),
            output_tokens: tokens(received_bytes),
        }
        .clamped()
    }
}

/// The most tokens one provider reply may charge per direction. The largest context windows are
/// a few million tokens; a reply claiming more is wrong or hostile, and its number must not
/// poison the day's counters (they saturate, see the store's `usage`).
pub const MAX_TOKENS_PER_REPLY: u64 = 100_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    EndTurn,
    ToolUse,
    MaxTokens,
    Other,
}

/// A complete model answer (after streaming finished).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelResponse {
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub usage: TokenUsage,
    pub stop_reason: StopReason,
}

/// Receives text as it streams in. Implemented by the web channel's SSE writer, for example.
pub trait DeltaSink: Send + Sync {
    fn text_delta(&self, text: &str);
    /// A file of this turn was put up for download (`send_file` on the web or the API); the
    /// caller shows the link next to the answer. Ignored by default.
    fn file_offered(&self, file: &crate::channel::OfferedFile) {
        let _ = file;
    }
}

/// A [`DeltaSink`] that drops everything.
pub struct IgnoreDeltas;

impl DeltaSink for IgnoreDeltas {
    fn text_delta(&self, _text: &str) {}
}

/// Why a model call failed. Messages never contain an API key or a request body.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    #[error("could not connect to {provider}: {detail}")]
    Connect { provider: String, detail: String },
    #[error("{provider} did not answer in time")]
    Timeout { provider: String },
    #[error("{provider} is rate limiting requests")]
    RateLimited {
        provider: String,
        retry_after: Option<Duration>,
    },
    #[error("{provider} had a server error (HTTP {status})")]
    Server {
        provider: String,
        status: u16,
        detail: String,
    },
    #[error("{provider} refused the request (HTTP {status}): {detail}")]
    Rejected {
        provider: String,
        status: u16,
        detail: String,
    },
    #[error("{provider} sent a malformed reply: {detail}")]
    InvalidReply { provider: String, detail: String },
    #[error("provider {provider:?} is not configured: {detail}")]
    NotConfigured { provider: String, detail: String },
}

impl ProviderError {
    /// Whether retrying the same request against the same provider may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Connect { .. }
            | ProviderError::Timeout { .. }
            | ProviderError::RateLimited { .. }
            | ProviderError::Server { .. } => true,
            ProviderError::Rejected { .. }
            | ProviderError::InvalidReply { .. }
            | ProviderError::NotConfigured { .. } => false,
        }
    }

    /// Whether the next model in the fallback chain should be tried after this error
    /// (once retries, if any, are exhausted).
    pub fn should_fall_back(&self) -> bool {
        match self {
            ProviderError::Connect { .. }
            | ProviderError::Timeout { .. }
            | ProviderError::RateLimited { .. }
            | ProviderError::Server { .. }
            | ProviderError::InvalidReply { .. }
            | ProviderError::NotConfigured { .. } => true,
            // A 4xx (bad key, unknown model, request too large) may well succeed elsewhere.
            ProviderError::Rejected { .. } => true,
        }
    }

    /// How long the server asked us to wait, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A model API (one configured `providers.<name>` entry).
#[async_trait]
pub trait Provider: Send + Sync {
    /// The configured provider name (`anthropic`, `ollama`, ...).
    fn name(&self) -> &str;
    /// One streamed request, without retries. Text deltas go to `deltas` as they arrive.
    async fn complete(
        &self,
        request: &ModelRequest<'_>,
        deltas: &dyn DeltaSink,
    ) -> Result<ModelResponse, ProviderError>;
}
