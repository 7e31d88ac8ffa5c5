//! Regressions (issue 9 review, §3): compaction that a model could switch off, and usage a
//! provider reply could poison or leave out. Scaffolding copied from `limits_behaviour.rs`.
#![allow(dead_code)] // the copied scaffolding has more than this test uses

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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Script = Box<dyn Fn(&[ConversationItem]) -> (String, Vec<ToolCall>) + Send + Sync>;

/// Answers by a script; records what it was sent; may wait for a gate before answering.
struct Model {
    seen: Mutex<Vec<Vec<ConversationItem>>>,
    system_bytes: AtomicUsize,
    script: Script,
    gate: tokio::sync::Semaphore,
    /// The usage every reply reports.
    usage_in: AtomicU64,
    usage_out: AtomicU64,
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
            usage_in: AtomicU64::new(1),
            usage_out: AtomicU64::new(1),
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
            input_tokens: self.usage_in.load(Ordering::SeqCst),
            output_tokens: self.usage_out.load(Ordering::SeqCst),
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

/// Regression: compaction archived nothing when the summary call answered with an empty text
/// (`session::compact` returns `None`), and it is then not tried again until the transcript
/// grew by half a window, where the same happens. The summary call goes to the user's own
/// assistant with the user's `SOUL.md` as its system prompt, so a user (or a prompt-injected
/// model) can make every summary empty; a provider that fails the summary call has the same
/// effect. Turns keep working (they load bounded pages), but the *current session* grows
/// without bound up to `transcriptMb` (32 MB for a stranger, 1 GB for an owner) — and
/// `GET /api/history` loaded and returned the whole current session on every request. Now a
/// failed or empty summary keeps the previous one and the rows still move out of the session.
#[tokio::test]
async fn an_empty_summary_does_not_let_the_current_session_grow_without_bound() {
    const WINDOW_TOKENS: usize = 8_000;
    let window = WINDOW_TOKENS * 4;
    let s = setup(
        4_000,
        |settings| {
            settings.context_window_tokens = WINDOW_TOKENS;
            settings.compact_at_ratio = 0.5;
        },
        |items| match items.last() {
            Some(ConversationItem::User { text }) if text.contains("about to be compacted") => {
                ("done".into(), vec![])
            }
            // The summary request gets nothing back.
            Some(ConversationItem::User { text }) if text.contains("Summarise") => {
                (String::new(), vec![])
            }
            Some(ConversationItem::User { .. }) => (String::new(), calls(1)),
            _ => ("ok".into(), vec![]),
        },
    );
    for i in 0..60 {
        assert_eq!(say(&s.gateway, "anna", &format!("go {i}")).await, "ok");
    }
    let session = s
        .store
        .current_session(&UserId::new("anna").unwrap())
        .await
        .unwrap();
    let bytes: usize = s
        .store
        .transcript(&session.id)
        .await
        .unwrap()
        .iter()
        .map(|(_, item)| serde_json::to_string(item).unwrap().len())
        .sum();
    assert!(
        bytes <= 2 * window,
        "the current session holds {bytes} bytes, {}x the {window}-byte window",
        bytes / window
    );
}

/// The archive of the session stays the user's: the rows moved out are in another (ended)
/// session, and an empty summary is stored as none, not as an empty text.
#[tokio::test]
async fn a_failed_summary_call_still_archives_the_rows() {
    const WINDOW_TOKENS: usize = 8_000;
    let s = setup(
        4_000,
        |settings| {
            settings.context_window_tokens = WINDOW_TOKENS;
            settings.compact_at_ratio = 0.5;
        },
        |items| match items.last() {
            Some(ConversationItem::User { text }) if text.contains("about to be compacted") => {
                ("done".into(), vec![])
            }
            Some(ConversationItem::User { text }) if text.contains("Summarise") => {
                ("   ".into(), vec![])
            }
            Some(ConversationItem::User { .. }) => (String::new(), calls(1)),
            _ => ("ok".into(), vec![]),
        },
    );
    for i in 0..20 {
        assert_eq!(say(&s.gateway, "anna", &format!("go {i}")).await, "ok");
    }
    let anna = UserId::new("anna").unwrap();
    let session = s.store.current_session(&anna).await.unwrap();
    assert_eq!(session.summary, None);
    let all = s.store.user_transcripts(&anna).await.unwrap();
    let current = s.store.transcript(&session.id).await.unwrap();
    assert!(
        all.len() > current.len(),
        "nothing was archived: {} rows in the session",
        current.len()
    );
    // Every turn's user message is still the user's.
    let users = all
        .iter()
        .filter(|(_, _, item)| matches!(item, ConversationItem::User { text } if text.starts_with("go ")))
        .count();
    assert_eq!(users, 20);
}

fn today() -> (String, String) {
    let now = chrono::Local::now();
    (
        now.format("%Y-%m-%d").to_string(),
        now.format("%Y-%m").to_string(),
    )
}

/// Regression: a provider reply's `usage` was charged as claimed — `u64::MAX` input tokens were
/// stored as `i64::MAX` and poisoned the day's counters. Now each reply is clamped to
/// `MAX_TOKENS_PER_REPLY` before anything is charged, and the user is over their token budget
/// (not locked out by an error).
#[tokio::test]
async fn a_huge_usage_in_a_reply_is_clamped_per_reply() {
    let s = setup(
        10,
        |settings| {
            settings.default_user.limits.budget.tokens_per_day = Some(1_000_000);
        },
        |_| ("ok".into(), vec![]),
    );
    s.model.usage_in.store(u64::MAX, Ordering::SeqCst);
    s.model.usage_out.store(u64::MAX, Ordering::SeqCst);
    assert_eq!(say(&s.gateway, "anna", "hello").await, "ok");
    let anna = UserId::new("anna").unwrap();
    let (day, month) = today();
    let totals = s
        .store
        .usage_totals(std::slice::from_ref(&anna), &day, &month)
        .await
        .unwrap();
    assert_eq!(
        totals.tokens_today,
        2 * moltmate_core::model::MAX_TOKENS_PER_REPLY
    );
    // The next message is refused with the budget notice, not an internal error.
    let calls_before = s.model.seen().len();
    let notice = say(&s.gateway, "anna", "again").await;
    assert!(notice.to_lowercase().contains("token"), "{notice}");
    assert_eq!(
        s.model.seen().len(),
        calls_before,
        "no model call over budget"
    );
}

/// Regression: a reply without usage (a provider or proxy that leaves it out) was charged
/// nothing, so token budgets never ran out. Now it is charged an estimate of one token per 4
/// bytes sent and received.
#[tokio::test]
async fn a_reply_without_usage_is_charged_an_estimate() {
    let s = setup(10, |_| {}, |_| ("x".repeat(4_000), vec![]));
    s.model.usage_in.store(0, Ordering::SeqCst);
    s.model.usage_out.store(0, Ordering::SeqCst);
    let long = "y".repeat(8_000);
    say(&s.gateway, "anna", &long).await;
    let anna = UserId::new("anna").unwrap();
    let (day, month) = today();
    let totals = s
        .store
        .usage_totals(std::slice::from_ref(&anna), &day, &month)
        .await
        .unwrap();
    // At least the message (8,000 bytes → 2,000 tokens) and the reply (4,000 → 1,000).
    assert!(totals.tokens_today >= 3_000, "{totals:?}");
}

/// Regression: a budget read that failed for good (an unreadable usage row) left the message
/// pending and retried it with backoff forever; the user never heard back and every later
/// message queued behind it. Now a persistent store error is tried a few times, then the
/// message is answered with an error and finished.
#[tokio::test]
async fn a_failing_budget_read_is_answered_not_retried_forever() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moltmate.db");
    let store = Store::open(&path).unwrap();
    let mut settings = GatewaySettings {
        onboarding_enabled: false,
        ..GatewaySettings::default()
    };
    settings.default_user.limits.budget.messages_per_day = Some(100);
    let model = Model::new(|_| ("ok".into(), vec![]));
    let gateway = Gateway::new(GatewayParts {
        store: store.clone(),
        homes: Homes::new(dir.path()),
        settings,
        model: model.clone(),
        tools: ToolBox::new(vec![]),
        channels: vec![],
        downloads: None,
        sandbox: None,
        disk_caps: None,
        shutdown: Shutdown::new(),
    });
    assert_eq!(say(&gateway, "anna", "hello").await, "ok");
    // Something (a bug, a hand edit) leaves a row that cannot be read as a number.
    let (day, _) = today();
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE usage_days SET messages = 'not a number' WHERE user_id = 'anna' AND day = ?1",
            [&day],
        )
        .unwrap();
    let answer = say(&gateway, "anna", "are you there?").await;
    assert!(answer.contains("internal error"), "{answer}");
    assert_eq!(
        store
            .pending_inbox_count(&UserId::new("anna").unwrap())
            .await
            .unwrap(),
        0
    );
}
