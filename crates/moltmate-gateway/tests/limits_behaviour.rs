//! Caps and budgets in the gateway with a scripted model: tool calls per answer, tool output
//! per turn, a budget that stops a turn mid-way, compaction that cannot shrink a session, the
//! per-user queue cap for in-band channels.

use async_trait::async_trait;
use moltmate_core::channel::{Accepted, InboundMessage};
use moltmate_core::model::{
    ConversationItem, DeltaSink, IgnoreDeltas, ModelResponse, StopReason, TokenUsage, ToolCall,
    ToolSpec,
};
use moltmate_core::tool::{Tool, ToolContext, ToolError, ToolOutput};
use moltmate_core::{ChannelKind, Identity, PeerId, Shutdown, UserId};
use moltmate_gateway::agent::{ModelAnswer, ModelCaller, ModelFailure, ToolBox};
use moltmate_gateway::{Gateway, GatewayParts, GatewaySettings};
use moltmate_store::{Homes, Store};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Script = Box<dyn Fn(&[ConversationItem]) -> (String, Vec<ToolCall>) + Send + Sync>;

/// Answers by a script; records what it was sent; may wait for a gate before answering.
struct Model {
    seen: Mutex<Vec<Vec<ConversationItem>>>,
    system_bytes: AtomicUsize,
    script: Script,
    gate: tokio::sync::Semaphore,
}

impl Model {
    fn new(
        script: impl Fn(&[ConversationItem]) -> (String, Vec<ToolCall>) + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Model {
            seen: Mutex::new(Vec::new()),
            system_bytes: AtomicUsize::new(0),
            script: Box::new(script),
            gate: tokio::sync::Semaphore::new(10_000),
        })
    }
    fn seen(&self) -> Vec<Vec<ConversationItem>> {
        self.seen.lock().unwrap().clone()
    }
}

#[async_trait]
impl ModelCaller for Model {
    async fn call(
        &self,
        system: &str,
        items: &[ConversationItem],
        _stored: Option<moltmate_core::model::StoredItems<'_>>,
        _tools: &[ToolSpec],
        _: &dyn DeltaSink,
    ) -> Result<ModelAnswer, ModelFailure> {
        self.seen.lock().unwrap().push(items.to_vec());
        self.system_bytes.store(system.len(), Ordering::SeqCst);
        let Ok(permit) = self.gate.acquire().await else {
            return Err(ModelFailure {
                user_message: "closed".into(),
                detail: "closed".into(),
            });
        };
        permit.forget();
        let (text, tool_calls) = (self.script)(items);
        let usage = TokenUsage {
            input_tokens: 1,
            output_tokens: 1,
        };
        Ok(ModelAnswer {
            response: ModelResponse {
                text,
                stop_reason: if tool_calls.is_empty() {
                    StopReason::EndTurn
                } else {
                    StopReason::ToolUse
                },
                tool_calls,
                usage,
            },
            provider: "m".into(),
            model: "m".into(),
            usage: vec![("m".into(), "m".into(), usage)],
        })
    }
}

/// `write` stand-in: counts calls and returns `size` bytes.
struct Echo {
    calls: AtomicUsize,
    size: AtomicUsize,
}

#[async_trait]
impl Tool for Echo {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "write".into(),
            description: "write".into(),
            parameters: std::sync::Arc::new(serde_json::json!({"type": "object"})),
        }
    }
    async fn call(&self, _: &ToolContext, _: serde_json::Value) -> Result<ToolOutput, ToolError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(ToolOutput::text(
            "w".repeat(self.size.load(Ordering::SeqCst)),
        ))
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    gateway: Gateway,
    store: Store,
    model: Arc<Model>,
    tool: Arc<Echo>,
}

fn setup(
    tool_size: usize,
    configure: impl FnOnce(&mut GatewaySettings),
    script: impl Fn(&[ConversationItem]) -> (String, Vec<ToolCall>) + Send + Sync + 'static,
) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("moltmate.db")).unwrap();
    let mut settings = GatewaySettings {
        onboarding_enabled: false,
        ..GatewaySettings::default()
    };
    settings.default_user.tools = vec!["write".into()];
    configure(&mut settings);
    let model = Model::new(script);
    let tool = Arc::new(Echo {
        calls: AtomicUsize::new(0),
        size: AtomicUsize::new(tool_size),
    });
    let gateway = Gateway::new(GatewayParts {
        store: store.clone(),
        homes: Homes::new(dir.path()),
        settings,
        model: model.clone(),
        tools: ToolBox::new(vec![tool.clone()]),
        channels: vec![],
        downloads: None,
        sandbox: None,
        disk_caps: None,
        shutdown: Shutdown::new(),
    });
    Setup {
        _dir: dir,
        gateway,
        store,
        model,
        tool,
    }
}

fn message(user: &str, text: &str) -> InboundMessage {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    InboundMessage {
        sender: Identity::new(ChannelKind::Web, PeerId::new(user).unwrap()),
        chat_id: user.to_string(),
        external_id: format!("m{}", COUNTER.fetch_add(1, Ordering::SeqCst)),
        cursor: None,
        text: text.to_string(),
        sender_name: None,
        language_code: None,
        attachments: Vec::new(),
    }
}

async fn say(gateway: &Gateway, user: &str, text: &str) -> String {
    let submitted = gateway
        .submit(message(user, text), Arc::new(IgnoreDeltas))
        .await
        .unwrap();
    assert_eq!(submitted.accepted, Accepted::Queued);
    tokio::time::timeout(Duration::from_secs(30), submitted.reply)
        .await
        .unwrap()
        .unwrap()
        .text
}

fn calls(n: usize) -> Vec<ToolCall> {
    (0..n)
        .map(|i| ToolCall {
            id: format!("c{i}"),
            name: "write".into(),
            arguments: serde_json::json!({"path": "x"}),
        })
        .collect()
}

/// Every tool call in the items has exactly one result (what providers require).
fn well_formed(items: &[ConversationItem]) {
    let mut open: Vec<String> = Vec::new();
    for item in items {
        match item {
            ConversationItem::Assistant { tool_calls, .. } => {
                assert!(open.is_empty(), "calls without results: {open:?}");
                open = tool_calls.iter().map(|c| c.id.clone()).collect();
            }
            ConversationItem::ToolResult { call_id, .. } => {
                let at = open.iter().position(|id| id == call_id);
                assert!(at.is_some(), "result without a call: {call_id}");
                open.retain(|id| id != call_id);
            }
            ConversationItem::User { .. } | ConversationItem::Image { .. } => {
                assert!(open.is_empty(), "unanswered: {open:?}")
            }
        }
    }
    assert!(open.is_empty(), "unanswered at the end: {open:?}");
}

async fn stored(store: &Store, user: &str) -> Vec<ConversationItem> {
    let session = store
        .current_session(&UserId::new(user).unwrap())
        .await
        .unwrap();
    store
        .history_page(&session.id, u64::MAX)
        .await
        .unwrap()
        .rows
        .into_iter()
        .map(|(_, item)| item)
        .collect()
}

#[tokio::test]
async fn extra_tool_calls_of_one_answer_are_dropped_and_the_model_is_told() {
    let s = setup(
        10,
        |settings| settings.default_user.limits.tool_calls_per_answer = 3,
        |items| match items.last() {
            Some(ConversationItem::User { .. }) => (String::new(), calls(100)),
            _ => ("done".into(), vec![]),
        },
    );
    assert_eq!(say(&s.gateway, "anna", "go").await, "done");
    assert_eq!(s.tool.calls.load(Ordering::SeqCst), 3);
    let items = stored(&s.store, "anna").await;
    well_formed(&items);
    let results: Vec<&String> = items
        .iter()
        .filter_map(|i| match i {
            ConversationItem::ToolResult { content, .. } => Some(content),
            _ => None,
        })
        .collect();
    assert_eq!(results.len(), 3);
    assert!(results[2].contains("you asked for 100 tool calls in one answer; only the first 3 ran"));
}

#[tokio::test]
async fn tool_output_beyond_the_turns_allowance_is_cut_then_not_run() {
    let s = setup(
        400,
        |settings| settings.default_user.limits.tool_output_bytes_per_turn = 1000,
        |items| match items.last() {
            Some(ConversationItem::User { .. }) => (String::new(), calls(5)),
            _ => ("done".into(), vec![]),
        },
    );
    assert_eq!(say(&s.gateway, "anna", "go").await, "done");
    assert_eq!(
        s.tool.calls.load(Ordering::SeqCst),
        3,
        "the last two were not run"
    );
    let last_request = s.model.seen().pop().unwrap();
    let results: Vec<&String> = last_request
        .iter()
        .filter_map(|i| match i {
            ConversationItem::ToolResult { content, .. } => Some(content),
            _ => None,
        })
        .collect();
    assert_eq!(results[0].len(), 400);
    assert!(results[2].starts_with(&"w".repeat(200)) && results[2].contains("[output cut after"));
    assert!(results[3].starts_with("not run: the tool output allowance of this message (1 KB)"));
    let handed: usize = results.iter().map(|r| r.len()).sum();
    assert!(handed < 1000 + 3 * 300, "{handed}");
    well_formed(&stored(&s.store, "anna").await);
}

#[tokio::test]
async fn a_budget_that_runs_out_mid_turn_stops_it_and_leaves_the_transcript_well_formed() {
    let s = setup(
        10,
        |settings| settings.default_user.limits.budget.tokens_per_day = Some(5),
        |items| match items.last() {
            Some(ConversationItem::User { text }) if text == "hi" => ("hello".into(), vec![]),
            // Otherwise the model never stops asking for tools.
            _ => (String::new(), calls(2)),
        },
    );
    let reply = say(&s.gateway, "anna", "go").await;
    assert!(reply.contains("You have used today's 5 tokens"), "{reply}");
    // 2 tokens per call: 2, 4, 6 — the tool round after the third call is not run.
    assert_eq!(s.model.seen().len(), 3);
    assert_eq!(s.tool.calls.load(Ordering::SeqCst), 4);
    let items = stored(&s.store, "anna").await;
    well_formed(&items);
    // The next message gets the notice without a model call.
    let notice = say(&s.gateway, "anna", "again").await;
    assert!(
        notice.starts_with("You have used today's 5 tokens"),
        "{notice}"
    );
    assert_eq!(s.model.seen().len(), 3);
    // Others are not affected.
    assert_eq!(say(&s.gateway, "ben", "hi").await, "hello");
}

#[tokio::test]
async fn compaction_that_cannot_shrink_the_session_is_not_retried_on_every_message() {
    const WINDOW_TOKENS: usize = 8_000;
    let window = WINDOW_TOKENS * 4;
    let s = setup(
        10,
        |settings| {
            settings.context_window_tokens = WINDOW_TOKENS;
            settings.compact_at_ratio = 0.5;
        },
        |items| match items.last() {
            Some(ConversationItem::User { text }) if text.contains("about to be compacted") => {
                ("done".into(), vec![])
            }
            Some(ConversationItem::User { text }) if text.contains("Summarise") => {
                ("SUMMARY".into(), vec![])
            }
            Some(ConversationItem::User { .. }) => (String::new(), calls(1)),
            _ => ("ok".into(), vec![]),
        },
    );
    assert_eq!(say(&s.gateway, "anna", "hello").await, "ok");
    // Turns so big that two fit the window but one alone is over the compaction threshold:
    // compaction summarises the older one and the session is still over the threshold.
    let prompt = s.model.system_bytes.load(Ordering::SeqCst);
    let turn = (window - prompt) / 2 - 400;
    assert!(
        turn + prompt > window / 2,
        "the test's sizes: prompt {prompt}"
    );
    s.tool.size.store(turn, Ordering::SeqCst);
    let messages = 12;
    for i in 0..messages {
        assert_eq!(say(&s.gateway, "anna", &format!("go {i}")).await, "ok");
    }
    let flushes = s
        .model
        .seen()
        .iter()
        .filter(|items| {
            matches!(items.last(), Some(ConversationItem::User { text }) if text.contains("about to be compacted"))
        })
        .count();
    // Retried only after half a window of new conversation: about every second message here,
    // where every message would otherwise compact.
    assert!(flushes >= 2, "compaction still happens: {flushes}");
    assert!(
        flushes <= 1 + messages / 2,
        "{flushes} compactions for {messages} messages"
    );
    // Every request stayed within the window, and nothing was deleted.
    for items in s.model.seen() {
        let bytes: usize = items
            .iter()
            .map(|i| serde_json::to_string(i).unwrap().len())
            .sum();
        assert!(
            bytes + prompt <= window + turn,
            "a request carried {bytes} bytes of history"
        );
    }
    let all = s
        .store
        .user_transcripts(&UserId::new("anna").unwrap())
        .await
        .unwrap();
    assert_eq!(
        all.len(),
        (1 + messages) * 4,
        "compaction archives, it does not delete"
    );
}

#[tokio::test]
async fn a_full_queue_refuses_further_messages_of_that_user_only() {
    let s = setup(
        10,
        |settings| settings.default_user.limits.queued_messages = 3,
        |_| ("ok".into(), vec![]),
    );
    // Hold the model so nothing is answered while the queue fills.
    let held = s.model.gate.acquire_many(10_000).await.unwrap();
    let mut waiting = Vec::new();
    for i in 0..3 {
        let submitted = s
            .gateway
            .submit(message("anna", &format!("m{i}")), Arc::new(IgnoreDeltas))
            .await
            .unwrap();
        assert_eq!(submitted.accepted, Accepted::Queued);
        waiting.push(submitted.reply);
    }
    let refused = s
        .gateway
        .submit(message("anna", "one too many"), Arc::new(IgnoreDeltas))
        .await
        .unwrap();
    assert_eq!(refused.accepted, Accepted::QueueFull);
    let other = s
        .gateway
        .submit(message("ben", "hi"), Arc::new(IgnoreDeltas))
        .await
        .unwrap();
    assert_eq!(
        other.accepted,
        Accepted::Queued,
        "another user's queue is their own"
    );
    drop(held);
    s.model.gate.add_permits(10_000);
    for reply in waiting {
        let reply = tokio::time::timeout(Duration::from_secs(10), reply)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply.text, "ok");
    }
    // Room again.
    assert_eq!(say(&s.gateway, "anna", "now?").await, "ok");
}
