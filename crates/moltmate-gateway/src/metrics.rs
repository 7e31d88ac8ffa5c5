//! Prometheus metrics of the gateway. The web layer serves them at `/metrics`; the gateway only
//! counts. Labels never carry user ids (unbounded cardinality, and personal data).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    pub channel: String,
    /// `queued`, `duplicate`, `refused`.
    pub outcome: String,
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
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolLabels {
    pub tool: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolNameLabels {
    pub tool: String,
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

    pub fn observe_model(&self, provider: &str, model: &str, elapsed: Duration) {
        self.model_latency_seconds
            .get_or_create(&ModelLabels {
                provider: provider.to_string(),
                model: model.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_tool(&self, tool: &str, outcome: &str, elapsed: Duration) {
        self.tool_calls
            .get_or_create(&ToolLabels {
                tool: tool.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        self.tool_latency_seconds
            .get_or_create(&ToolNameLabels {
                tool: tool.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn count_tokens(&self, provider: &str, input: u64, output: u64) {
        self.tokens
            .get_or_create(&TokenLabels {
                provider: provider.to_string(),
                direction: "input".into(),
            })
            .inc_by(input);
        self.tokens
            .get_or_create(&TokenLabels {
                provider: provider.to_string(),
                direction: "output".into(),
            })
            .inc_by(output);
    }

    pub fn count_message(&self, channel: &str, outcome: &str) {
        self.messages
            .get_or_create(&MessageLabels {
                channel: channel.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }
}
