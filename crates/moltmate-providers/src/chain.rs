//! Retries and fallbacks: `model.primary`, then each of `model.fallbacks`, in order.
//!
//! For each model, a retryable error ([`ProviderError::is_retryable`]) is retried up to
//! [`RetryPolicy::max_retries`] times with exponential backoff and jitter, or after the
//! server's `Retry-After` when it gave one. A `Retry-After` longer than
//! [`RetryPolicy::max_retry_after`] is not waited for: the chain falls back at once. When retries
//! are exhausted (or the error is not retryable) and [`ProviderError::should_fall_back`] holds,
//! the next model is tried.
//!
//! **Partial streams.** Once an attempt has streamed any text to the caller's [`DeltaSink`], the
//! user has seen it, so that model is not retried. The chain still falls back, but the later
//! attempts stream to nobody: their text is only in the final [`ChainAnswer::response`], and
//! [`ChainAnswer::streamed_text_is_final`] is `false` so the channel knows the streamed preview
//! was abandoned and must show the final text instead of appending to the preview.

use moltmate_core::model::{
    ConversationItem, DeltaSink, ModelRequest, ModelResponse, Provider, ProviderError, StoredItems,
    ToolSpec,
};
use rand::Rng;
use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How hard to try one model before falling back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (so `2` means up to three calls per model).
    pub max_retries: u32,
    /// The first backoff; doubled on every retry.
    pub base_delay: Duration,
    /// The longest backoff.
    pub max_delay: Duration,
    /// The longest server-requested `Retry-After` that is waited for.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 2,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The backoff before retry number `retry` (0-based): "equal jitter", i.e. a uniformly random
    /// delay between half and all of `min(max_delay, base_delay * 2^retry)`, so that many users
    /// hitting the same outage do not retry in lockstep.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(retry.min(30)));
        let full = exp.min(self.max_delay);
        let half = full / 2;
        let jitter_nanos = u64::try_from((full - half).as_nanos()).unwrap_or(u64::MAX);
        let jitter = if jitter_nanos == 0 {
            0
        } else {
            rand::rng().random_range(0..=jitter_nanos)
        };
        half + Duration::from_nanos(jitter)
    }
}

/// One model of the chain.
#[derive(Clone)]
pub struct ChainEntry {
    pub provider: Arc<dyn Provider>,
    /// The model name as the provider knows it.
    pub model: String,
}

impl fmt::Debug for ChainEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.provider.name(), self.model)
    }
}

/// The kind of a failed attempt, for logs, metrics and [`ChainError`]'s message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    Connect,
    Timeout,
    RateLimited,
    Server,
    Rejected,
    InvalidReply,
    NotConfigured,
    /// The model streamed part of an answer and then failed (it is not retried).
    Interrupted,
}

impl ErrorKind {
    pub fn of(error: &ProviderError) -> Self {
        match error {
            ProviderError::Connect { .. } => ErrorKind::Connect,
            ProviderError::Timeout { .. } => ErrorKind::Timeout,
            ProviderError::RateLimited { .. } => ErrorKind::RateLimited,
            ProviderError::Server { .. } => ErrorKind::Server,
            ProviderError::Rejected { .. } => ErrorKind::Rejected,
            ProviderError::InvalidReply { .. } => ErrorKind::InvalidReply,
            ProviderError::NotConfigured { .. } => ErrorKind::NotConfigured,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Server => "server",
            ErrorKind::Rejected => "rejected",
            ErrorKind::InvalidReply => "invalid_reply",
            ErrorKind::NotConfigured => "not_configured",
            ErrorKind::Interrupted => "interrupted",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One failed call.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub provider: String,
    pub model: String,
    pub error: ProviderError,
    /// Whether text had already been streamed to the caller when it failed.
    pub interrupted: bool,
}

impl Attempt {
    pub fn kind(&self) -> ErrorKind {
        if self.interrupted {
            ErrorKind::Interrupted
        } else {
            ErrorKind::of(&self.error)
        }
    }
}

/// A successful answer and who gave it.
#[derive(Debug, Clone)]
pub struct ChainAnswer {
    pub response: ModelResponse,
    pub provider: String,
    pub model: String,
    /// The failed calls before this answer (retries and fallbacks), oldest first.
    pub failed_attempts: Vec<Attempt>,
    /// Whether the text streamed to the [`DeltaSink`] is exactly `response.text`. `false` after
    /// an attempt was interrupted mid-stream and a fallback answered silently.
    pub streamed_text_is_final: bool,
}

/// Every model of the chain failed.
#[derive(Debug, Clone)]
pub struct ChainError {
    /// Every failed call, oldest first. Empty when the chain has no models.
    pub attempts: Vec<Attempt>,
}

impl ChainError {
    /// What the user is told: short, with no key, URL, status code or stack trace.
    pub fn user_message(&self) -> &'static str {
        if self.attempts.is_empty() {
            return "No model is configured for the assistant; please ask the operator to set one up.";
        }
        if self
            .attempts
            .iter()
            .all(|a| a.kind() == ErrorKind::RateLimited)
        {
            return "The assistant's model is busy right now; please try again in a minute.";
        }
        "The assistant's model is unavailable right now; please try again in a minute."
    }

    /// For the operator's log: every attempt with its full (key-free) error message.
    pub fn detail(&self) -> String {
        if self.attempts.is_empty() {
            return "no model configured".into();
        }
        self.attempts
            .iter()
            .map(|a| format!("{}/{} [{}]: {}", a.provider, a.model, a.kind(), a.error))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.attempts.is_empty() {
            return f.write_str("no model is configured");
        }
        write!(f, "all {} model attempts failed: ", self.attempts.len())?;
        for (n, a) in self.attempts.iter().enumerate() {
            if n > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}/{} ({})", a.provider, a.model, a.kind())?;
        }
        Ok(())
    }
}

impl std::error::Error for ChainError {}

/// The primary model and its fallbacks, with retries.
#[derive(Clone)]
pub struct ModelChain {
    entries: Vec<ChainEntry>,
    policy: RetryPolicy,
    max_output_tokens: u32,
}

impl fmt::Debug for ModelChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelChain")
            .field("entries", &self.entries)
            .field("policy", &self.policy)
            .field("max_output_tokens", &self.max_output_tokens)
            .finish()
    }
}

/// Default output limit per model call.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u32 = 4096;

impl ModelChain {
    /// `entries` in order: primary first, then the fallbacks.
    pub fn new(entries: Vec<(Arc<dyn Provider>, String)>, policy: RetryPolicy) -> Self {
        ModelChain {
            entries: entries
                .into_iter()
                .map(|(provider, model)| ChainEntry { provider, model })
                .collect(),
            policy,
            max_output_tokens: DEFAULT_MAX_OUTPUT_TOKENS,
        }
    }

    /// Sets the `max_tokens` sent with every call.
    pub fn with_max_output_tokens(mut self, max_output_tokens: u32) -> Self {
        self.max_output_tokens = max_output_tokens;
        self
    }

    pub fn entries(&self) -> &[ChainEntry] {
        &self.entries
    }

    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }

    /// Asks the chain. Text streams to `deltas` (see the module docs for interrupted streams).
    pub async fn complete(
        &self,
        system: &str,
        items: &[ConversationItem],
        tools: &[ToolSpec],
        deltas: &dyn DeltaSink,
    ) -> Result<ChainAnswer, ChainError> {
        self.complete_stored(system, items, None, tools, deltas)
            .await
    }

    /// [`ModelChain::complete`] with the front of `items` from a user's kept history
    /// (see [`StoredItems`]): every provider of the chain may reuse those items' wire forms.
    pub async fn complete_stored(
        &self,
        system: &str,
        items: &[ConversationItem],
        stored: Option<StoredItems<'_>>,
        tools: &[ToolSpec],
        deltas: &dyn DeltaSink,
    ) -> Result<ChainAnswer, ChainError> {
        let mut request = ModelRequest {
            model: String::new(),
            system: Cow::Borrowed(system),
            items: Cow::Borrowed(items),
            tools: Cow::Borrowed(tools),
            max_output_tokens: self.max_output_tokens,
            stored,
        };
        let mut attempts: Vec<Attempt> = Vec::new();
        // Set once any attempt streamed text that did not become the answer.
        let mut muted = false;
        for (position, entry) in self.entries.iter().enumerate() {
            request.model.clone_from(&entry.model);
            let provider = entry.provider.name().to_string();
            let mut retry = 0u32;
            loop {
                let sink = TrackingSink {
                    inner: deltas,
                    muted,
                    streamed: AtomicBool::new(false),
                };
                let error = match entry.provider.complete(&request, &sink).await {
                    Ok(response) => {
                        if position > 0 || retry > 0 {
                            tracing::info!(provider = %provider, model = %entry.model, failed = attempts.len(), "model answered after earlier failures");
                        }
                        return Ok(ChainAnswer {
                            response,
                            provider,
                            model: entry.model.clone(),
                            failed_attempts: attempts,
                            streamed_text_is_final: !muted,
                        });
                    }
                    Err(error) => error,
                };
                let interrupted = sink.streamed.load(Ordering::Relaxed);
                let attempt = Attempt {
                    provider: provider.clone(),
                    model: entry.model.clone(),
                    error,
                    interrupted,
                };
                tracing::warn!(
                    provider = %provider, model = %entry.model, kind = %attempt.kind(), retry,
                    error = %attempt.error, "model call failed"
                );
                let error = attempt.error.clone();
                attempts.push(attempt);
                if interrupted {
                    muted = true;
                    break;
                }
                if !error.is_retryable() || retry >= self.policy.max_retries {
                    break;
                }
                let delay = match error.retry_after() {
                    Some(wait) if wait > self.policy.max_retry_after => break,
                    Some(wait) => wait,
                    None => self.policy.backoff(retry),
                };
                tokio::time::sleep(delay).await;
                retry += 1;
            }
            let last_allows_fallback = attempts.last().is_none_or(|a| a.error.should_fall_back());
            if !last_allows_fallback {
                break;
            }
        }
        Err(ChainError { attempts })
    }
}

/// Forwards deltas (unless muted) and remembers whether any text went out.
struct TrackingSink<'a> {
    inner: &'a dyn DeltaSink,
    muted: bool,
    streamed: AtomicBool,
}

impl DeltaSink for TrackingSink<'_> {
    fn text_delta(&self, text: &str) {
        if text.is_empty() || self.muted {
            return;
        }
        self.streamed.store(true, Ordering::Relaxed);
        self.inner.text_delta(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy {
            max_retries: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(300),
            max_retry_after: Duration::from_secs(1),
        };
        for _ in 0..50 {
            let first = policy.backoff(0);
            assert!(
                first >= Duration::from_millis(50) && first <= Duration::from_millis(100),
                "{first:?}"
            );
            let capped = policy.backoff(10);
            assert!(
                capped >= Duration::from_millis(150) && capped <= Duration::from_millis(300),
                "{capped:?}"
            );
        }
        let zero = RetryPolicy {
            base_delay: Duration::ZERO,
            ..policy
        };
        assert_eq!(zero.backoff(3), Duration::ZERO);
    }

    #[test]
    fn user_message_is_plain() {
        let err = ChainError {
            attempts: vec![Attempt {
                provider: "p".into(),
                model: "m".into(),
                error: ProviderError::Connect {
                    provider: "p".into(),
                    detail: "refused".into(),
                },
                interrupted: false,
            }],
        };
        assert_eq!(
            err.user_message(),
            "The assistant's model is unavailable right now; please try again in a minute."
        );
        assert_eq!(
            err.to_string(),
            "all 1 model attempts failed: p/m (connect)"
        );
    }
}
