//! Prometheus metrics of the gateway. The web layer serves them at `/metrics`; the gateway only
//! counts.
//!
//! **Label values are fixed sets, never text from users, requests or the model**: channels and
//! outcomes are `&'static str`s of ours; tools are the names the [`crate::agent::ToolBox`]
//! registered, and any other name a model invents is `unknown`; providers and models come from
//! the operator's config and still pass [`label_value`]. `prometheus-client` writes label values
//! without escaping, so a quote or newline in one would forge series, and an open set of values
//! would grow the page without bound. No label carries a user id (unbounded, and personal).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    pub channel: &'static str,
    /// `queued`, `duplicate`, `refused`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub provider: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub provider: String,
    /// `input` or `output`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolLabels {
    /// A registered tool's name, or `unknown`.
    pub tool: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolNameLabels {
    pub tool: String,
}

/// The longest label value written; longer ones are cut.
pub const MAX_LABEL_CHARS: usize = 64;

/// A label value that is safe in the exposition format whatever `raw` holds: characters other
/// than ASCII letters, digits and `_ - . / : @` become `_`, and it is cut at
/// [`MAX_LABEL_CHARS`]. For values from the operator's config; values from requests, users or
/// models must not become labels at all.
pub fn label_value(raw: &str) -> String {
    let value: String = raw
        .chars()
        .take(MAX_LABEL_CHARS)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | ':' | '@') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if value.is_empty() {
        "unknown".to_string()
    } else {
        value
    }
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    pub messages: Family<MessageLabels, Counter>,
    pub model_latency_seconds: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub model_failures: Counter,
    pub tokens: Family<TokenLabels, Counter>,
    pub tool_calls: Family<ToolLabels, Counter>,
    /// Latency per tool; `tool="exec"` is the sandbox exec round trip as the model sees it.
    pub tool_latency_seconds: Family<ToolNameLabels, Histogram, fn() -> Histogram>,
    pub replies_sent: Counter,
    pub replies_failed: Counter,
    /// Users with a live worker (active in the last `worker_idle`).
    pub active_users: Gauge,
    /// Blocking tasks (file work) past their deadline and still running; set when encoding.
    pub blocking_abandoned: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("moltmate");
        let messages = Family::<MessageLabels, Counter>::default();
        let model_latency_seconds =
            Family::<ModelLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        let model_failures = Counter::default();
        let tokens = Family::<TokenLabels, Counter>::default();
        let tool_calls = Family::<ToolLabels, Counter>::default();
        let tool_latency_seconds =
            Family::<ToolNameLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        let replies_sent = Counter::default();
        let replies_failed = Counter::default();
        let active_users = Gauge::default();
        let blocking_abandoned = Gauge::default();
        registry.register(
            "blocking_abandoned",
            "Blocking file tasks past their deadline and still running (a stuck disk or filesystem)",
            blocking_abandoned.clone(),
        );
        registry.register(
            "messages",
            "Inbound messages by channel and outcome",
            messages.clone(),
        );
        registry.register(
            "model_latency_seconds",
            "Model call latency by provider and model",
            model_latency_seconds.clone(),
        );
        registry.register(
            "model_failures",
            "Turns that ended because every model failed",
            model_failures.clone(),
        );
        registry.register("tokens", "Tokens by provider and direction", tokens.clone());
        registry.register(
            "tool_calls",
            "Tool calls by tool and outcome",
            tool_calls.clone(),
        );
        registry.register(
            "tool_latency_seconds",
            "Tool call latency by tool (exec = sandbox round trip)",
            tool_latency_seconds.clone(),
        );
        registry.register(
            "replies_sent",
            "Replies handed to their channel",
            replies_sent.clone(),
        );
        registry.register(
            "replies_failed",
            "Replies the channel refused or could not take",
            replies_failed.clone(),
        );
        registry.register(
            "active_users",
            "Users with a live worker",
            active_users.clone(),
        );
        Metrics {
            registry,
            messages,
            model_latency_seconds,
            model_failures,
            tokens,
            tool_calls,
            tool_latency_seconds,
            replies_sent,
            replies_failed,
            active_users,
            blocking_abandoned,
        }
    }

    /// The registry, to add metrics of other layers (sandbox, web) before serving.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition format.
    pub fn encode(&self) -> String {
        self.blocking_abandoned
            .set(i64::try_from(moltmate_core::blocking::abandoned()).unwrap_or(i64::MAX));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "could not encode metrics");
        }
        out
    }

    /// `provider` and `model` as configured by the operator (a bounded set).
    pub fn observe_model(&self, provider: &str, model: &str, elapsed: Duration) {
        self.model_latency_seconds
            .get_or_create(&ModelLabels {
                provider: label_value(provider),
                model: label_value(model),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// `tool` must be a registered tool's name or `unknown`
    /// ([`crate::agent::ToolBox::metric_name`]), never the name a model asked for.
    pub fn observe_tool(&self, tool: &str, outcome: &'static str, elapsed: Duration) {
        let tool = label_value(tool);
        self.tool_calls
            .get_or_create(&ToolLabels {
                tool: tool.clone(),
                outcome,
            })
            .inc();
        self.tool_latency_seconds
            .get_or_create(&ToolNameLabels { tool })
            .observe(elapsed.as_secs_f64());
    }

    /// `provider` as configured by the operator.
    pub fn count_tokens(&self, provider: &str, input: u64, output: u64) {
        let provider = label_value(provider);
        self.tokens
            .get_or_create(&TokenLabels {
                provider: provider.clone(),
                direction: "input",
            })
            .inc_by(input);
        self.tokens
            .get_or_create(&TokenLabels {
                provider,
                direction: "output",
            })
            .inc_by(output);
    }

    pub fn count_message(&self, channel: &'static str, outcome: &'static str) {
        self.messages
            .get_or_create(&MessageLabels { channel, outcome })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_cannot_break_out_of_their_quotes() {
        assert_eq!(label_value("claude-sonnet-4-5"), "claude-sonnet-4-5");
        assert_eq!(
            label_value("meta-llama/llama-3:8b"),
            "meta-llama/llama-3:8b"
        );
        assert_eq!(label_value("x\"} 1\nforged{a=\""), "x___1_forged_a__");
        assert_eq!(label_value(""), "unknown");
        assert_eq!(label_value(&"y".repeat(500)).len(), MAX_LABEL_CHARS);
    }

    #[test]
    fn odd_tool_names_neither_forge_series_nor_grow_the_page() {
        let metrics = Metrics::new();
        metrics.observe_tool("read", "ok", Duration::from_millis(1));
        let forged = "x\"} 1\nmoltmate_forged{a=\"";
        metrics.observe_tool(forged, "ok", Duration::from_millis(1));
        let text = metrics.encode();
        assert!(!text.contains("moltmate_forged{"), "{text}");
        assert!(!text.contains('\u{0}'));
        for line in text
            .lines()
            .filter(|l| l.starts_with("moltmate_tool_calls_total"))
        {
            assert_eq!(line.matches('"').count(), 4, "{line}");
        }
    }
}
