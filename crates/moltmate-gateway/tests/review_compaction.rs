//! Review finding (issue 9, §3): compaction that a model can switch off. Ignored so the branch
//! stays green; run with `--ignored` to see the failure. Scaffolding copied from
//! `limits_behaviour.rs`.
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
            parameters: serde_json::json!({"type": "object"}),
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

/// Compaction archives nothing when the summary call answers with an empty text
/// (`session::compact` returns `None`), and it is then not tried again until the transcript
/// grew by half a window, where the same happens. The summary call goes to the user's own
/// assistant with the user's `SOUL.md` as its system prompt, so a user (or a prompt-injected
/// model) can make every summary empty; a provider that fails the summary call has the same
/// effect. Turns keep working (they load bounded pages), but the *current session* grows
/// without bound up to `transcriptMb` (32 MB for a stranger, 1 GB for an owner) — and
/// `GET /api/history` loads and returns the whole current session on every request (see
/// `moltmate-web/tests/review_rate_limits.rs`).
#[tokio::test]
#[ignore = "review: an empty summary disables compaction for good; the current session grows to transcriptMb (and /api/history returns all of it)"]
async fn review_empty_summaries_let_the_current_session_grow_without_bound() {
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
