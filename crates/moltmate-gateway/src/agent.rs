//! One agent turn: the model is called, tools run, and the model is called again, until it
//! answers without tool calls or the iteration bound is reached.
//!
//! Tool errors other than [`ToolError::Fatal`] are answers to the model (it may try something
//! else); a fatal error ends the turn with a short apology to the user. Every tool call is
//! audited (user, tool, digest of the arguments, duration, outcome) — never the arguments
//! themselves, which may hold personal data.

use async_trait::async_trait;
use moltmate_core::model::{
    ConversationItem, DeltaSink, ModelResponse, StoredItems, TokenUsage, ToolSpec, WireCache,
};
use moltmate_core::tool::{Tool, ToolContext, ToolError, ToolOutput};
use moltmate_store::{AuditEvent, Store};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// A model answer and who gave it.
#[derive(Debug, Clone)]
pub struct ModelAnswer {
    pub response: ModelResponse,
    pub provider: String,
    pub model: String,
    /// Usage of every attempt that consumed tokens (including failed fallbacks' partial ones).
    pub usage: Vec<(String, String, TokenUsage)>,
}

impl ModelAnswer {
    /// Makes the reply's usage safe to charge: every entry clamped per reply
    /// ([`TokenUsage::clamped`]), and a reply that reported no usage at all charged an estimate
    /// of one token per 4 bytes sent (`system` + `items`) and received, so a provider (or
    /// proxy) that leaves `usage` out cannot spend without bound. Every caller charges the
    /// budget from this, never from the raw numbers.
    pub fn normalise_usage(&mut self, system: &str, items: &[ConversationItem]) {
        for (_, _, usage) in &mut self.usage {
            *usage = usage.clamped();
        }
        // The answering model's entry: a direction it reported as zero (a stream cut before its
        // usage, a proxy that drops it) is charged the estimate; one it reported is kept (a
        // cached prompt is legitimately cheaper than its bytes). A failed fallback's usage
        // never stands in for the model that answered.
        let (provider, model) = (self.provider.clone(), self.model.clone());
        let index = match self
            .usage
            .iter()
            .rposition(|(p, m, _)| *p == provider && *m == model)
        {
            Some(index) => index,
            None => {
                self.usage.push((provider, model, TokenUsage::default()));
                self.usage.len() - 1
            }
        };
        let reported = self.usage[index].2;
        // The estimate walks the whole history, so it is only made when it is needed: a
        // provider that reports its usage (the usual case) does not pay for it on every turn.
        if reported.input_tokens == 0 || reported.output_tokens == 0 {
            let sent = system.len().saturating_add(
                items
                    .iter()
                    .map(json_len)
                    .fold(0usize, usize::saturating_add),
            );
            let received = self.response.text.len().saturating_add(
                self.response
                    .tool_calls
                    .iter()
                    .map(|c| c.name.len().saturating_add(json_len(&c.arguments)))
                    .fold(0usize, usize::saturating_add),
            );
            let estimate = TokenUsage::estimated(sent, received);
            let answered = &mut self.usage[index].2;
            if answered.input_tokens == 0 {
                answered.input_tokens = estimate.input_tokens;
            }
            if answered.output_tokens == 0 {
                answered.output_tokens = estimate.output_tokens;
            }
        }
        self.response.usage = self.usage[index].2;
    }
}

/// The length of `value` as JSON, counted without building the text.
fn json_len(value: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 = self.0.saturating_add(bytes.len());
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        Err(_) => 0,
    }
}

/// Every model in the chain failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{detail}")]
pub struct ModelFailure {
    /// What the user is told: short, no stack trace, no key, no URL.
    pub user_message: String,
    /// For the operator's log (still never a key).
    pub detail: String,
}

/// The model side of a turn: primary model, retries and fallbacks behind one call.
#[async_trait]
pub trait ModelCaller: Send + Sync {
    /// `stored`: when the front of `items` came from the user's kept history, its transcript
    /// rows and the cache of their wire forms, so a provider encodes each stored row once
    /// (see [`StoredItems`]); `None` otherwise.
    async fn call(
        &self,
        system: &str,
        items: &[ConversationItem],
        stored: Option<StoredItems<'_>>,
        tools: &[ToolSpec],
        deltas: &dyn DeltaSink,
    ) -> Result<ModelAnswer, ModelFailure>;
}

/// The tools the gateway knows, by name. Which of them a user gets is decided per call.
#[derive(Default, Clone)]
pub struct ToolBox {
    tools: BTreeMap<String, Arc<dyn Tool>>,
    /// Each tool's spec, built once when it is registered: offering it on a turn copies two
    /// short strings and a pointer, not a tree of JSON maps.
    specs: BTreeMap<String, ToolSpec>,
}

impl ToolBox {
    pub fn new(tools: Vec<Arc<dyn Tool>>) -> Self {
        let mut toolbox = ToolBox::default();
        for tool in tools {
            toolbox.register(tool);
        }
        toolbox
    }

    pub fn register(&mut self, tool: Arc<dyn Tool>) {
        let spec = tool.spec();
        self.tools.insert(spec.name.clone(), tool);
        self.specs.insert(spec.name.clone(), spec);
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tools.keys().map(String::as_str)
    }

    /// The name to count and log a call to `name` under: the registered tool's name, or
    /// `unknown` for a name the model made up (its text never becomes a metric label or an
    /// unquoted log field).
    pub fn metric_name<'a>(&'a self, name: &str) -> &'a str {
        self.tools
            .get_key_value(name)
            .map_or("unknown", |(known, _)| known.as_str())
    }

    /// The specs offered to a model for a user allowed `allowed` tools.
    pub fn offered(&self, allowed: &[String]) -> Vec<ToolSpec> {
        self.specs
            .iter()
            .filter(|(name, _)| allowed.iter().any(|a| a == *name))
            .map(|(_, spec)| spec.clone())
            .collect()
    }

    /// Calls a tool, enforcing `allowed` again: the model may ask for a tool it was never
    /// offered (hallucinated, or injected text asking for it).
    pub async fn call(
        &self,
        allowed: &[String],
        name: &str,
        context: &ToolContext,
        arguments: serde_json::Value,
    ) -> Result<ToolOutput, ToolError> {
        let Some(tool) = self
            .tools
            .get(name)
            .filter(|_| allowed.iter().any(|a| a == name))
        else {
            return Err(ToolError::Refused(format!(
                "there is no tool named {name:?} available to you; available tools: {}",
                allowed
                    .iter()
                    .filter(|a| self.tools.contains_key(a.as_str()))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        tool.call(context, arguments).await
    }
}

/// Everything one turn needs.
pub struct Turn<'a> {
    pub model: &'a dyn ModelCaller,
    pub tools: &'a ToolBox,
    pub store: &'a Store,
    pub context: ToolContext,
    pub allowed_tools: &'a [String],
    pub system: String,
    /// The session so far (the new user message is not in it).
    pub history: Vec<ConversationItem>,
    /// The transcript rows of `history` (one id per item) and the cache of their wire forms,
    /// when `history` came from the worker's kept history.
    pub stored: Option<(Vec<i64>, Arc<WireCache>)>,
    pub user_text: String,
    /// Pictures sent with the message ([`ConversationItem::Image`]), shown to the model with the
    /// user's text in this turn only: they are not part of the turn's stored items.
    pub images: Vec<ConversationItem>,
    pub max_iterations: usize,
    pub deltas: &'a dyn DeltaSink,
    pub log_tool_calls: bool,
    pub metrics: &'a crate::metrics::Metrics,
    /// Tool calls per answer and tool output per turn.
    pub limits: &'a crate::limits::UserLimits,
    /// Checks budgets before each model call, tool round and `exec`; charges usage.
    pub budget: Option<&'a crate::budget::BudgetGuard>,
}

/// What a turn produced.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnResult {
    /// New transcript items, the user's message first.
    pub new_items: Vec<ConversationItem>,
    /// The history the turn was given, handed back unchanged (without the images), so the
    /// caller's history cache can take its items back instead of copying them every turn.
    pub history: Vec<ConversationItem>,
    /// The text to send to the user.
    pub reply: String,
    pub usage: Vec<(String, String, TokenUsage)>,
    /// The turn ended on a model failure (the reply is the failure notice).
    pub model_failed: bool,
}

/// SHA-256 of the canonical JSON of tool arguments (serde_json maps are sorted).
pub fn arguments_digest(arguments: &serde_json::Value) -> String {
    let canonical = serde_json::to_string(arguments).unwrap_or_default();
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

/// Ends a turn early with `notice` (a budget ran out): every call of the last answer gets a
/// result saying it was not run (so the transcript stays well-formed), then the notice.
fn stop_turn(
    mut items: Vec<ConversationItem>,
    first_new: usize,
    history_len: usize,
    mut replies: Vec<String>,
    unanswered: &[moltmate_core::model::ToolCall],
    notice: String,
    usage: Vec<(String, String, TokenUsage)>,
) -> TurnResult {
    for call in unanswered {
        items.push(ConversationItem::ToolResult {
            call_id: call.id.clone(),
            content: format!("not run: {notice}"),
            is_error: true,
        });
    }
    let note = format!("({notice})");
    items.push(ConversationItem::Assistant {
        text: note.clone(),
        tool_calls: vec![],
    });
    replies.push(note);
    ended(
        items,
        first_new,
        history_len,
        join_replies(&replies),
        usage,
        false,
    )
}

/// The result of a turn that ends with `items`: the new ones (from `first_new`) for the
/// transcript, and the history (the first `history_len`) handed back; the images between them
/// are dropped.
fn ended(
    mut items: Vec<ConversationItem>,
    first_new: usize,
    history_len: usize,
    reply: String,
    usage: Vec<(String, String, TokenUsage)>,
    model_failed: bool,
) -> TurnResult {
    let new_items = items.split_off(first_new);
    items.truncate(history_len);
    TurnResult {
        new_items,
        history: items,
        reply,
        usage,
        model_failed,
    }
}

pub async fn run_turn(turn: Turn<'_>) -> TurnResult {
    let offered = turn.tools.offered(turn.allowed_tools);
    let mut items = turn.history;
    let history_len = items.len();
    // Row ids for exactly the history's items, or none (then every item is encoded afresh).
    let stored = turn
        .stored
        .as_ref()
        .filter(|(ids, _)| ids.len() == history_len)
        .map(|(ids, cache)| StoredItems {
            ids,
            cache: cache.as_ref(),
        });
    items.extend(turn.images);
    let first_new = items.len();
    items.push(ConversationItem::User {
        text: turn.user_text,
    });
    let mut usage = Vec::new();
    let mut replies: Vec<String> = Vec::new();
    let mut output = crate::limits::OutputAllowance::new(turn.limits.tool_output_bytes_per_turn);
    let calls_per_answer = turn.limits.tool_calls_per_answer.max(1);

    for iteration in 0..turn.max_iterations.max(1) {
        if let Some(budget) = turn.budget {
            if let Some(notice) = budget.check().await {
                return stop_turn(items, first_new, history_len, replies, &[], notice, usage);
            }
        }
        let model_started = Instant::now();
        let answer = match turn
            .model
            .call(&turn.system, &items, stored, &offered, turn.deltas)
            .await
        {
            Ok(mut answer) => {
                answer.normalise_usage(&turn.system, &items);
                turn.metrics.observe_model(
                    &answer.provider,
                    &answer.model,
                    model_started.elapsed(),
                );
                for (provider, _, u) in &answer.usage {
                    turn.metrics
                        .count_tokens(provider, u.input_tokens, u.output_tokens);
                }
                answer
            }
            Err(failure) => {
                turn.metrics.model_failures.inc();
                tracing::warn!(user = %turn.context.user, error = %failure.detail, "model call failed");
                items.push(ConversationItem::Assistant {
                    text: failure.user_message.clone(),
                    tool_calls: vec![],
                });
                return ended(
                    items,
                    first_new,
                    history_len,
                    failure.user_message,
                    usage,
                    true,
                );
            }
        };
        if let Some(budget) = turn.budget {
            if answer.response.tool_calls.is_empty() {
                // The turn ends with this answer: charged with the turn's commit.
                budget.defer_model(&answer.usage);
            } else {
                budget.charge_model(&answer.usage).await;
            }
        }
        usage.extend(answer.usage.iter().cloned());
        let ModelResponse {
            text,
            mut tool_calls,
            ..
        } = answer.response;
        if !text.trim().is_empty() {
            replies.push(text.clone());
        }
        // A model may ask for any number of calls in one answer; only the first ones run, and
        // the dropped ones are left out of the transcript (the model is told on the last result).
        let asked = tool_calls.len();
        tool_calls.truncate(calls_per_answer);
        items.push(ConversationItem::Assistant {
            text,
            tool_calls: tool_calls.clone(),
        });
        if tool_calls.is_empty() {
            return ended(
                items,
                first_new,
                history_len,
                join_replies(&replies),
                usage,
                false,
            );
        }
        if let Some(budget) = turn.budget {
            if let Some(notice) = budget.check().await {
                return stop_turn(
                    items,
                    first_new,
                    history_len,
                    replies,
                    &tool_calls,
                    notice,
                    usage,
                );
            }
        }
        let last = tool_calls.len() - 1;
        for (index, call) in tool_calls.into_iter().enumerate() {
            let note = if index == last && asked > calls_per_answer {
                crate::limits::dropped_calls_note(asked, calls_per_answer)
            } else {
                String::new()
            };
            if output.is_used_up() {
                items.push(ConversationItem::ToolResult {
                    call_id: call.id,
                    content: format!("{}{note}", output.not_run()),
                    is_error: true,
                });
                continue;
            }
            // `exec` runs at most for the command time left today.
            let mut exec_context = None;
            if call.name == "exec" && turn.allowed_tools.iter().any(|t| t == "exec") {
                if let Some(budget) = turn.budget {
                    match budget.exec_allowance().await {
                        Ok(None) => {}
                        Ok(Some(left)) => {
                            let mut context = turn.context.clone();
                            context.exec.max_timeout = context.exec.max_timeout.min(left);
                            context.exec.default_timeout = context.exec.default_timeout.min(left);
                            exec_context = Some(context);
                        }
                        Err(refusal) => {
                            items.push(ConversationItem::ToolResult {
                                call_id: call.id,
                                content: format!("{refusal}{note}"),
                                is_error: true,
                            });
                            continue;
                        }
                    }
                }
            }
            let started = Instant::now();
            let digest = arguments_digest(&call.arguments);
            let result = turn
                .tools
                .call(
                    turn.allowed_tools,
                    &call.name,
                    exec_context.as_ref().unwrap_or(&turn.context),
                    call.arguments,
                )
                .await;
            let elapsed = started.elapsed();
            let duration_ms = elapsed.as_millis() as i64;
            let outcome = match &result {
                Ok(_) => "ok",
                Err(e) => e.outcome(),
            };
            let tool = turn.tools.metric_name(&call.name);
            turn.metrics.observe_tool(tool, outcome, elapsed);
            if turn.log_tool_calls {
                if tool == "unknown" {
                    // Debug-quoted and cut: the model's text cannot forge a log line.
                    tracing::info!(user = %turn.context.user, tool, requested = ?bounded_name(&call.name), outcome, duration_ms, "tool call");
                } else {
                    tracing::info!(user = %turn.context.user, tool, outcome, duration_ms, "tool call");
                }
            }
            let audit = AuditEvent {
                user: turn.context.user.clone(),
                kind: "tool_call".to_string(),
                tool: Some(bounded_name(&call.name)),
                args_digest: Some(digest),
                duration_ms: Some(duration_ms),
                outcome: outcome.to_string(),
                detail: None,
            };
            if let Err(e) = turn.store.record_audit(audit).await {
                tracing::error!(error = %e, "could not record an audit event");
            }
            match result {
                Ok(tool_output) => {
                    if let (Some(budget), Some(ran)) = (turn.budget, tool_output.sandbox_time) {
                        budget.charge_exec(ran).await;
                    }
                    items.push(ConversationItem::ToolResult {
                        call_id: call.id,
                        content: format!("{}{note}", output.take(tool_output.content)),
                        is_error: false,
                    })
                }
                Err(error) if error.is_fatal() => {
                    tracing::error!(user = %turn.context.user, tool, error = %error, "fatal tool error; turn aborted");
                    let reply = "Sorry — something went wrong on my side and I could not finish. Please try again later.".to_string();
                    items.push(ConversationItem::ToolResult {
                        call_id: call.id,
                        content: "internal error".to_string(),
                        is_error: true,
                    });
                    items.push(ConversationItem::Assistant {
                        text: reply.clone(),
                        tool_calls: vec![],
                    });
                    return ended(items, first_new, history_len, reply, usage, false);
                }
                Err(error) => items.push(ConversationItem::ToolResult {
                    call_id: call.id,
                    content: format!("{}{note}", output.take(error.to_string())),
                    is_error: true,
                }),
            }
        }
        tracing::debug!(user = %turn.context.user, iteration, "tool round finished");
    }
    let note = format!(
        "(I stopped after {} tool steps for this message. Tell me to continue if you want me to go on.)",
        turn.max_iterations.max(1)
    );
    items.push(ConversationItem::Assistant {
        text: note.clone(),
        tool_calls: vec![],
    });
    replies.push(note);
    ended(
        items,
        first_new,
        history_len,
        join_replies(&replies),
        usage,
        false,
    )
}

/// A tool name as the model sent it, cut to 64 characters without control characters (for
/// the audit log and quoted log fields only).
fn bounded_name(name: &str) -> String {
    name.chars().filter(|c| !c.is_control()).take(64).collect()
}

fn join_replies(replies: &[String]) -> String {
    let joined = replies
        .iter()
        .map(|r| r.trim())
        .filter(|r| !r.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n");
    if joined.is_empty() {
        "(no answer)".to_string()
    } else {
        joined
    }
}

#[cfg(test)]
mod usage_tests {
    use super::*;
    use moltmate_core::model::{ModelResponse, StopReason, TokenUsage};

    fn answer(text: &str, usage: Vec<(String, String, TokenUsage)>) -> ModelAnswer {
        ModelAnswer {
            response: ModelResponse {
                text: text.to_string(),
                tool_calls: Vec::new(),
                usage: TokenUsage::default(),
                stop_reason: StopReason::EndTurn,
            },
            provider: "b".into(),
            model: "answering".into(),
            usage,
        }
    }

    /// Regression: only a reply with no usage at all was estimated, so a stream cut before its
    /// output count (input reported, output 0) charged no output, and a failed fallback's
    /// usage stood in for the model that answered.
    #[test]
    fn a_direction_reported_as_zero_by_the_answering_model_is_estimated() {
        let text = "x".repeat(400);
        let mut cut = answer(
            &text,
            vec![(
                "b".into(),
                "answering".into(),
                TokenUsage {
                    input_tokens: 7,
                    output_tokens: 0,
                },
            )],
        );
        cut.normalise_usage("system", &[]);
        assert_eq!(cut.usage[0].2.input_tokens, 7, "a reported count is kept");
        assert_eq!(
            cut.usage[0].2.output_tokens, 100,
            "400 bytes out, 4 per token"
        );
        assert_eq!(cut.response.usage, cut.usage[0].2);

        let mut fell_back = answer(
            &text,
            vec![(
                "a".into(),
                "failed".into(),
                TokenUsage {
                    input_tokens: 5,
                    output_tokens: 5,
                },
            )],
        );
        fell_back.normalise_usage("system", &[]);
        assert_eq!(fell_back.usage.len(), 2, "{:?}", fell_back.usage);
        assert_eq!(fell_back.usage[1].0, "b");
        assert_eq!(fell_back.usage[1].2.output_tokens, 100);
    }
}
