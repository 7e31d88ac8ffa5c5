//! Provider settings: which wire format, where, with which key, and how long to wait.
//!
//! The API key lives in a [`ApiKey`] wrapper whose `Debug` prints `[redacted]`, so a settings
//! struct can be logged or put in an error without leaking it.

use std::fmt;
use std::time::Duration;

/// The wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiKind {
    /// Anthropic Messages API (`POST {base_url}/v1/messages`).
    Anthropic,
    /// OpenAI Chat Completions (`POST {base_url}/chat/completions`, `base_url` includes `/v1`).
    /// Also ollama, vLLM, OpenRouter and every other OpenAI-compatible server.
    OpenAi,
}

impl ApiKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiKind::Anthropic => "anthropic",
            ApiKind::OpenAi => "openai",
        }
    }
}

impl fmt::Display for ApiKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An API key. Never shown by `Debug` or `Display`-like formatting; read it with [`ApiKey::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        ApiKey(key.into())
    }

    /// The key itself, for the one place that needs it: building the auth header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for ApiKey {
    fn from(key: String) -> Self {
        ApiKey(key)
    }
}

impl From<&str> for ApiKey {
    fn from(key: &str) -> Self {
        ApiKey(key.to_string())
    }
}

/// One configured `providers.<name>` entry.
#[derive(Clone, PartialEq, Eq)]
pub struct ProviderSettings {
    /// The configured name (`anthropic`, `ollama`, ...), used in errors, logs and metrics.
    pub name: String,
    pub api: ApiKind,
    /// For [`ApiKind::Anthropic`] the API root (`https://api.anthropic.com`); for
    /// [`ApiKind::OpenAi`] the root including the version (`https://api.openai.com/v1`,
    /// `http://127.0.0.1:11434/v1`). A trailing `/` is ignored.
    pub base_url: String,
    /// `None` sends no auth header (local ollama / vLLM).
    pub api_key: Option<String>,
    /// Bounds connecting, sending the request and waiting for the response headers.
    pub request_timeout: Duration,
    /// Bounds the gap between two chunks of the response body (a stalled stream).
    pub stream_idle_timeout: Duration,
}

impl ProviderSettings {
    /// Settings with the default timeouts (60 s to the response headers, 60 s between chunks).
    pub fn new(
        name: impl Into<String>,
        api: ApiKind,
        base_url: impl Into<String>,
        api_key: Option<String>,
    ) -> Self {
        ProviderSettings {
            name: name.into(),
            api,
            base_url: base_url.into(),
            api_key,
            request_timeout: Duration::from_secs(60),
            stream_idle_timeout: Duration::from_secs(60),
        }
    }
}

impl fmt::Debug for ProviderSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderSettings")
            .field("name", &self.name)
            .field("api", &self.api)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("request_timeout", &self.request_timeout)
            .field("stream_idle_timeout", &self.stream_idle_timeout)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_key() {
        let settings = ProviderSettings::new(
            "a",
            ApiKind::Anthropic,
            "http://x",
            Some("sk-ant-secret123".into()),
        );
        let shown = format!("{settings:?} {:?}", ApiKey::new("sk-ant-secret123"));
        assert!(!shown.contains("secret123"), "{shown}");
        assert!(shown.contains("[redacted]"));
    }
}
