//! The gateway end to end with a recording model: what each user sees, and what each user's
//! model requests contain.

use async_trait::async_trait;
use moltmate_core::channel::{Accepted, InboundMessage};
use moltmate_core::model::{
    ConversationItem, DeltaSink, IgnoreDeltas, ModelResponse, StopReason, TokenUsage, ToolCall,
    ToolSpec,
};
use moltmate_core::sandbox::{CappedDir, DiskCaps, SandboxError, SandboxIds};
use moltmate_core::tool::{Tool, ToolContext, ToolError, ToolOutput};
use moltmate_core::{ChannelKind, Identity, PeerId, Shutdown, UserId};
use moltmate_gateway::agent::{ModelAnswer, ModelCaller, ModelFailure, ToolBox};
use moltmate_gateway::memory_tool::MemorySearchTool;
use moltmate_gateway::{Gateway, GatewayParts, GatewaySettings, UserSettings};
use moltmate_store::{Homes, Store};
use std::sync::{Arc, Mutex};

/// What the model was asked.
#[derive(Clone, Debug)]
struct Seen {
    system: String,
    items: Vec<ConversationItem>,
    tools: Vec<String>,
}

type Script = Box<dyn Fn(&Seen) -> (String, Vec<ToolCall>) + Send + Sync>;

/// Echoes the last user text, or follows a script; records every request.
struct RecordingModel {
    seen: Mutex<Vec<Seen>>,
    script: Mutex<Option<Script>>,
}

impl RecordingModel {
    fn new() -> Arc<Self> {
        Arc::new(RecordingModel {
            seen: Mutex::new(Vec::new()),
            script: Mutex::new(None),
        })
    }
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    fn script(&self, script: impl Fn(&Seen) -> (String, Vec<ToolCall>) + Send + Sync + 'static) {
        *self.script.lock().unwrap() = Some(Box::new(script));
    }
}

#[async_trait]
impl ModelCaller for RecordingModel {
    async fn call(
        &self,
        system: &str,
        items: &[ConversationItem],
        _stored: Option<moltmate_core::model::StoredItems<'_>>,
        tools: &[ToolSpec],
        _: &dyn DeltaSink,
    ) -> Result<ModelAnswer, ModelFailure> {
        let seen = Seen {
            system: system.to_string(),
            items: items.to_vec(),
            tools: tools.iter().map(|t| t.name.clone()).collect(),
        };
        self.seen.lock().unwrap().push(seen.clone());
        let (text, tool_calls) = match &*self.script.lock().unwrap() {
            Some(script) => script(&seen),
            None => match items.last() {
                Some(ConversationItem::User { text }) => (format!("echo: {text}"), vec![]),
                Some(ConversationItem::ToolResult { content, .. }) => {
                    (format!("tool said: {content}"), vec![])
                }
                _ => ("ok".into(), vec![]),
            },
        };
        let stop_reason = if tool_calls.is_empty() {
            StopReason::EndTurn
        } else {
            StopReason::ToolUse
        };
        let usage = TokenUsage {
            input_tokens: 1,
            output_tokens: 1,
        };
        Ok(ModelAnswer {
            response: ModelResponse {
                text,
                tool_calls,
                usage,
                stop_reason,
            },
            provider: "rec".into(),
            model: "rec".into(),
            usage: vec![("rec".into(), "rec".into(), usage)],
        })
    }
}

/// A file-writing tool standing in for the real `write` (the tools crate is tested on its own).
struct NoteTool;

#[async_trait]
impl Tool for NoteTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "write".into(),
            description: "write".into(),
            parameters: std::sync::Arc::new(serde_json::json!({"type": "object"})),
        }
    }
    async fn call(
        &self,
        context: &ToolContext,
        arguments: serde_json::Value,
    ) -> Result<ToolOutput, ToolError> {
        if context.read_only {
            return Err(ToolError::Refused("read-only".into()));
        }
        let path = arguments["path"]
            .as_str()
            .ok_or_else(|| ToolError::InvalidArguments("path".into()))?;
        let content = arguments["content"].as_str().unwrap_or_default();
        let (root, relative) = match path.strip_prefix("family/") {
            Some(rest) => (
                context
                    .family
                    .as_ref()
                    .ok_or_else(|| ToolError::Refused("no family".into()))?
                    .root
                    .clone(),
                rest,
            ),
            None => (context.home.root().to_path_buf(), path),
        };
        moltmate_store::homes::write_beneath(&root, relative, content.as_bytes())
            .map_err(|e| ToolError::Failed(e.to_string()))?;
        Ok(ToolOutput::text("written"))
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    home: std::path::PathBuf,
    gateway: Gateway,
    model: Arc<RecordingModel>,
}

fn setup(configure: impl FnOnce(&mut GatewaySettings)) -> Setup {
    setup_with_caps(configure, None)
}

fn setup_with_caps(
    configure: impl FnOnce(&mut GatewaySettings),
    disk_caps: Option<Arc<dyn DiskCaps>>,
) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().to_path_buf();
    let store = Store::open(&home.join("moltmate.db")).unwrap();
    let mut settings = GatewaySettings {
        onboarding_enabled: false,
        ..GatewaySettings::default()
    };
    settings.default_user.tools = vec!["write".into(), "memory_search".into()];
    configure(&mut settings);
    let model = RecordingModel::new();
    let tools = ToolBox::new(vec![
        Arc::new(NoteTool),
        Arc::new(MemorySearchTool::new(store.clone(), home.join("index"))),
    ]);
    let gateway = Gateway::new(GatewayParts {
        store,
        homes: Homes::new(&home),
        settings,
        model: model.clone(),
        tools,
        channels: vec![],
        downloads: None,
        sandbox: None,
        disk_caps,
        shutdown: Shutdown::new(),
    });
    Setup {
        _dir: dir,
        home,
        gateway,
        model,
    }
}

async fn say(gateway: &Gateway, user: &str, text: &str, language: Option<&str>) -> String {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let message = InboundMessage {
        sender: Identity::new(ChannelKind::Local, PeerId::new(user).unwrap()),
        chat_id: user.to_string(),
        external_id: format!("t{n}"),
        cursor: None,
        text: text.to_string(),
        sender_name: None,
        language_code: language.map(str::to_string),
        attachments: Vec::new(),
    };
    let submitted = gateway
        .submit(message, Arc::new(IgnoreDeltas))
        .await
        .unwrap();
    assert_eq!(submitted.accepted, Accepted::Queued);
    tokio::time::timeout(std::time::Duration::from_secs(10), submitted.reply)
        .await
        .unwrap()
        .unwrap()
        .text
}

#[tokio::test]
async fn onboarding_asks_for_a_persona_in_german_and_writes_the_choice() {
    let s = setup(|settings| settings.onboarding_enabled = true);
    let menu = say(&s.gateway, "anna", "Hallo!", Some("de")).await;
    assert!(
        menu.contains("Wie soll ich sein?")
            && menu.contains("2. 🦎 Cami")
            && menu.contains("3. 🦀 Molty"),
        "{menu}"
    );
    assert!(s.model.seen().is_empty(), "no model call during onboarding");
    let done = say(&s.gateway, "anna", "3", Some("de")).await;
    assert!(done.contains("Molty"), "{done}");
    let soul = std::fs::read_to_string(s.home.join("users/anna/SOUL.md")).unwrap();
    assert!(soul.contains("Molty"));
    assert_eq!(
        say(&s.gateway, "anna", "Wie geht's?", Some("de")).await,
        "echo: Wie geht's?"
    );
    assert!(s.model.seen()[0].system.contains("You are Molty"));
}

#[tokio::test]
async fn onboarding_in_english_accepts_a_custom_description() {
    let s = setup(|settings| settings.onboarding_enabled = true);
    let menu = say(&s.gateway, "ben", "hi", Some("en-GB")).await;
    assert!(menu.contains("How should I be?"), "{menu}");
    let ask = say(&s.gateway, "ben", "1", None).await;
    assert!(ask.contains("Describe"), "{ask}");
    say(
        &s.gateway,
        "ben",
        "A grumpy but kind pirate who loves puns",
        None,
    )
    .await;
    say(&s.gateway, "ben", "ahoy", None).await;
    assert!(s.model.seen()[0].system.contains("grumpy but kind pirate"));
    // /persona starts over.
    assert!(say(&s.gateway, "ben", "/persona", None)
        .await
        .contains("How should I be?"));
    assert!(say(&s.gateway, "ben", "cami", None).await.contains("Cami"));
}

#[tokio::test]
async fn memory_written_in_one_session_is_used_after_reset() {
    let s = setup(|_| {});
    s.model.script(|seen| match seen.items.last() {
        Some(ConversationItem::User { text }) if text.contains("remember") => (
            String::new(),
            vec![ToolCall { id: "c1".into(), name: "write".into(), arguments: serde_json::json!({"path": "MEMORY.md", "content": "Her daughter is called Emma."}) }],
        ),
        Some(ConversationItem::ToolResult { .. }) => ("noted".into(), vec![]),
        _ => ("ok".into(), vec![]),
    });
    assert_eq!(
        say(&s.gateway, "carla", "please remember Emma", None).await,
        "noted"
    );
    assert!(say(&s.gateway, "carla", "/reset", None)
        .await
        .contains("memory stays"));
    say(&s.gateway, "carla", "who is my daughter?", None).await;
    let last = s.model.seen().pop().unwrap();
    assert!(
        last.system.contains("Her daughter is called Emma."),
        "memory is in the new session's prompt"
    );
    assert_eq!(
        last.items.len(),
        1,
        "the new session starts empty: {:?}",
        last.items
    );
}

#[tokio::test]
async fn memory_search_finds_only_ones_own_notes() {
    let s = setup(|_| {});
    say(&s.gateway, "dora", "hello", None).await;
    say(&s.gateway, "emil", "hello", None).await;
    std::fs::write(
        s.home.join("users/dora/MEMORY.md"),
        "Dora's locker code is 4711",
    )
    .unwrap();
    std::fs::write(
        s.home.join("users/emil/MEMORY.md"),
        "Emil's locker code is 0815",
    )
    .unwrap();
    s.model.script(|seen| match seen.items.last() {
        Some(ConversationItem::User { .. }) => (
            String::new(),
            vec![ToolCall {
                id: "s".into(),
                name: "memory_search".into(),
                arguments: serde_json::json!({"query": "locker code"}),
            }],
        ),
        Some(ConversationItem::ToolResult { content, .. }) => (content.clone(), vec![]),
        _ => ("?".into(), vec![]),
    });
    let dora = say(&s.gateway, "dora", "what is my locker code?", None).await;
    assert!(
        dora.contains("4711") && dora.contains("MEMORY.md:1"),
        "{dora}"
    );
    assert!(!dora.contains("0815"), "emil's note leaked: {dora}");
    let emil = say(&s.gateway, "emil", "what is my locker code?", None).await;
    assert!(emil.contains("0815") && !emil.contains("4711"), "{emil}");
}

#[tokio::test]
async fn family_members_share_family_notes_and_outsiders_never_see_them() {
    let s = setup(|settings| {
        settings
            .families
            .insert(UserId::new("mum").unwrap(), "smiths".into());
        settings
            .families
            .insert(UserId::new("dad").unwrap(), "smiths".into());
    });
    s.model.script(|seen| match seen.items.last() {
        Some(ConversationItem::User { text }) if text == "note it" => (
            String::new(),
            vec![ToolCall { id: "w".into(), name: "write".into(), arguments: serde_json::json!({"path": "family/FAMILY.md", "content": "Holiday in Crete in May."}) }],
        ),
        Some(ConversationItem::User { text }) if text == "outsider write" => (
            String::new(),
            vec![ToolCall { id: "w".into(), name: "write".into(), arguments: serde_json::json!({"path": "family/FAMILY.md", "content": "pwned"}) }],
        ),
        Some(ConversationItem::ToolResult { content, .. }) => (content.clone(), vec![]),
        _ => ("ok".into(), vec![]),
    });
    assert_eq!(say(&s.gateway, "mum", "note it", None).await, "written");
    say(&s.gateway, "dad", "anything planned?", None).await;
    assert!(
        s.model
            .seen()
            .last()
            .unwrap()
            .system
            .contains("Holiday in Crete"),
        "a member sees family notes"
    );
    say(&s.gateway, "stranger", "anything planned?", None).await;
    assert!(
        !s.model.seen().last().unwrap().system.contains("Crete"),
        "a non-member never sees family notes"
    );
    assert!(say(&s.gateway, "stranger", "outsider write", None)
        .await
        .contains("no family"));
    assert_eq!(
        std::fs::read_to_string(s.home.join("families/smiths/FAMILY.md")).unwrap(),
        "Holiday in Crete in May."
    );
}

#[tokio::test]
async fn restricted_users_are_offered_fewer_tools_and_the_call_layer_refuses_anyway() {
    let s = setup(|settings| {
        settings.users.insert(
            UserId::new("kid").unwrap(),
            UserSettings {
                tools: vec!["memory_search".into()],
                read_only: true,
                ..UserSettings::default()
            },
        );
    });
    s.model.script(|seen| match seen.items.last() {
        Some(ConversationItem::User { .. }) => (
            String::new(),
            vec![ToolCall {
                id: "x".into(),
                name: "write".into(),
                arguments: serde_json::json!({"path": "a.txt", "content": "x"}),
            }],
        ),
        Some(ConversationItem::ToolResult { content, .. }) => (content.clone(), vec![]),
        _ => ("?".into(), vec![]),
    });
    let reply = say(&s.gateway, "kid", "write a file", None).await;
    assert_eq!(
        s.model.seen()[0].tools,
        vec!["memory_search".to_string()],
        "only allowed tools are offered"
    );
    assert!(
        reply.contains("no tool named \"write\""),
        "the tool layer refuses a tool that was not offered: {reply}"
    );
    assert!(!s.home.join("users/kid/a.txt").exists());
    let audit = s.gateway.store().recent_audit(None, 5).await.unwrap();
    assert_eq!(audit[0].outcome, "refused");
}

#[tokio::test]
async fn identities_linked_in_config_share_one_home_and_memory() {
    let s = setup(|settings| {
        let anna = UserId::new("anna").unwrap();
        settings
            .configured_identities
            .insert("telegram:111".parse().unwrap(), anna.clone());
        settings
            .configured_identities
            .insert("web:anna".parse().unwrap(), anna);
        settings.access.insert(
            ChannelKind::Telegram,
            moltmate_gateway::access::ChannelAccess {
                policy: moltmate_gateway::access::DmPolicy::Allowlist,
                allow_from: vec![],
                groups: false,
            },
        );
    });
    std::fs::create_dir_all(s.home.join("users/anna")).unwrap();
    std::fs::write(s.home.join("users/anna/MEMORY.md"), "Anna prefers tea.").unwrap();
    let telegram = InboundMessage {
        sender: "telegram:111".parse().unwrap(),
        chat_id: "111".into(),
        external_id: "u1".into(),
        cursor: Some(2),
        text: "from telegram".into(),
        sender_name: None,
        language_code: None,
        attachments: Vec::new(),
    };
    let submitted = s
        .gateway
        .submit(telegram, Arc::new(IgnoreDeltas))
        .await
        .unwrap();
    assert_eq!(
        submitted.accepted,
        Accepted::Queued,
        "a configured identity is allowed even under an empty allowlist"
    );
    submitted.reply.await.unwrap();
    say(&s.gateway, "anna", "from the terminal", None).await;
    let seen = s.model.seen();
    assert!(seen.iter().all(|r| r.system.contains("Anna prefers tea.")));
    let last = seen.last().unwrap();
    assert!(
        last.items
            .iter()
            .any(|i| matches!(i, ConversationItem::User { text } if text == "from telegram")),
        "one session across channels"
    );
}

#[tokio::test]
async fn a_long_session_is_compacted_after_a_silent_memory_flush() {
    let s = setup(|settings| {
        settings.context_window_tokens = 2_000;
        settings.compact_at_ratio = 0.5;
    });
    s.model.script(|seen| match seen.items.last() {
        Some(ConversationItem::User { text }) if text.contains("about to be compacted") => (
            String::new(),
            vec![ToolCall {
                id: "f".into(),
                name: "write".into(),
                arguments: serde_json::json!({"path": "MEMORY.md", "content": "Flushed: the user's dog is Rex."}),
            }],
        ),
        Some(ConversationItem::ToolResult { .. }) => ("done".into(), vec![]),
        Some(ConversationItem::User { text }) if text.contains("Summarise the conversation") => {
            ("SUMMARY: we talked about Rex the dog.".into(), vec![])
        }
        Some(ConversationItem::User { text }) => (format!("echo: {}", &text[..text.len().min(20)]), vec![]),
        _ => ("?".into(), vec![]),
    });
    let filler = "blah ".repeat(150);
    for i in 0..8 {
        let reply = say(&s.gateway, "fred", &format!("{i} {filler}"), None).await;
        assert!(
            reply.starts_with("echo:"),
            "the user only ever sees real answers: {reply}"
        );
    }
    let seen = s.model.seen();
    assert!(seen.iter().any(|r| matches!(r.items.last(), Some(ConversationItem::User { text }) if text.contains("about to be compacted"))));
    assert!(seen.iter().any(|r| r.tools.is_empty() && matches!(r.items.last(), Some(ConversationItem::User { text }) if text.contains("Summarise"))));
    let last = seen.last().unwrap();
    assert!(
        last.system.contains("SUMMARY: we talked about Rex"),
        "the summary replaces old turns in the prompt"
    );
    assert!(
        last.system.contains("Flushed: the user's dog is Rex."),
        "the flush saved memory before compaction"
    );
    assert!(
        last.items.len() < 16,
        "old turns are gone from the request: {}",
        last.items.len()
    );
    assert!(
        !last.items.iter().any(|i| matches!(i, ConversationItem::User { text } if text.contains("about to be compacted"))),
        "the flush turn itself is not part of the session"
    );
}

fn mkfifo(path: &std::path::Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo has no other preconditions.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
}

/// Regression: a FIFO as SOUL.md (or USER.md, MEMORY.md, today's note, a family member's
/// FAMILY.md) blocked the gateway: the read hung inside async code on the accept path and in
/// the worker. Now the files are refused unopened, the turn runs, and the user is told which
/// files were skipped and why.
#[tokio::test]
async fn fifo_context_files_are_skipped_with_a_note_and_the_turn_still_runs() {
    let s = setup(|settings| {
        settings
            .families
            .insert(UserId::new("mallory").unwrap(), "crew".into());
    });
    say(&s.gateway, "mallory", "hello", None).await;
    let home = s.home.join("users/mallory");
    let today = chrono::Local::now().date_naive().format("%Y-%m-%d");
    for file in ["SOUL.md", "USER.md", "MEMORY.md"] {
        std::fs::remove_file(home.join(file)).ok();
        mkfifo(&home.join(file));
    }
    mkfifo(&home.join(format!("memory/{today}.md")));
    mkfifo(&s.home.join("families/crew/FAMILY.md"));

    let reply = say(&s.gateway, "mallory", "still there?", None).await;
    assert!(reply.starts_with("echo: still there?"), "{reply}");
    for file in [
        "SOUL.md".to_string(),
        "USER.md".to_string(),
        "MEMORY.md".to_string(),
        format!("memory/{today}.md"),
        "family/FAMILY.md".to_string(),
    ] {
        assert!(
            reply.contains(&format!(
                "{file} (it is a FIFO (named pipe), not a regular file)"
            )),
            "{file} missing in {reply}"
        );
    }
    let system = s.model.seen().pop().unwrap().system;
    assert!(system.contains("## Files left out"), "{system}");
    // Someone else is not affected at all.
    assert_eq!(say(&s.gateway, "bystander", "hi", None).await, "echo: hi");
}

/// Regression: accepting a message created the user's home (mkdir, chown, reads, writes) on
/// the channel's receive path. Now accepting is a database commit only; a home that cannot be
/// made is the worker's problem, answered once with a clear message and not retried forever.
#[tokio::test]
async fn accepting_touches_no_files_and_a_home_that_cannot_be_made_is_answered_not_retried() {
    let s = setup(|_| {});
    // `users` is a plain file: no home can be created beneath it.
    std::fs::write(s.home.join("users"), "not a directory").unwrap();
    let reply = say(&s.gateway, "nina", "hello", None).await;
    assert!(
        reply.contains("could not prepare your files"),
        "the user is told: {reply}"
    );
    assert!(s.model.seen().is_empty(), "no model call without a home");
    let pending = s
        .gateway
        .store()
        .pending_inbox(&UserId::new("nina").unwrap(), 10)
        .await
        .unwrap();
    assert!(
        pending.is_empty(),
        "the row is finished, not retried: {pending:?}"
    );
}

/// The operator's personas folder is read as carefully as a home: a FIFO persona file or a
/// symlinked folder does not hang onboarding.
#[tokio::test]
async fn hostile_entries_in_the_personas_folder_do_not_hang_onboarding() {
    let personas = tempfile::tempdir().unwrap();
    std::fs::create_dir(personas.path().join("nova")).unwrap();
    std::fs::write(personas.path().join("nova/SOUL.md"), "# Soul\n\nCurious.\n").unwrap();
    std::fs::create_dir(personas.path().join("piper")).unwrap();
    mkfifo(&personas.path().join("piper/SOUL.md"));
    mkfifo(&personas.path().join("nova/IDENTITY.md"));
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("SOUL.md"), "outside").unwrap();
    std::os::unix::fs::symlink(outside.path(), personas.path().join("linked")).unwrap();
    let dir = personas.path().to_path_buf();
    let s = setup(move |settings| {
        settings.onboarding_enabled = true;
        settings.personas_dir = Some(dir);
    });
    let menu = say(&s.gateway, "olga", "hi", None).await;
    assert!(menu.contains("4. ⭐ nova - Curious."), "{menu}");
    assert!(
        !menu.contains("piper") && !menu.contains("linked"),
        "{menu}"
    );
}

/// A disk-cap hook that records each call (and whether the home already held the note the
/// model writes) and fails for one user.
struct RecordingCaps {
    calls: Mutex<Vec<(String, CappedDir, SandboxIds, bool)>>,
    fail_for: &'static str,
}

impl DiskCaps for RecordingCaps {
    fn ensure_capped(
        &self,
        user: &UserId,
        dir: &std::path::Path,
        kind: CappedDir,
        ids: SandboxIds,
        _cap_bytes: u64,
    ) -> Result<bool, SandboxError> {
        let note_there = dir.join("note.md").exists();
        self.calls
            .lock()
            .unwrap()
            .push((user.to_string(), kind, ids, note_there));
        if user.as_str() == self.fail_for {
            return Err(SandboxError::Backend {
                backend: "disk",
                detail: "mkfs failed".into(),
            });
        }
        Ok(true)
    }
}

/// The disk cap is set up before a turn writes anything (so it holds from the user's first
/// write, not their first `exec`), with the user's own sandbox ids; when it cannot be, the
/// turn's file tools are read-only instead of writing past the cap.
#[tokio::test]
async fn disk_cap_comes_before_the_first_write_and_a_failed_cap_makes_files_read_only() {
    let caps = Arc::new(RecordingCaps {
        calls: Mutex::new(Vec::new()),
        fail_for: "bob",
    });
    let s = setup_with_caps(|_| {}, Some(caps.clone()));
    s.model.script(|seen| match seen.items.last() {
        Some(ConversationItem::User { .. }) => (
            String::new(),
            vec![ToolCall {
                id: "w".into(),
                name: "write".into(),
                arguments: serde_json::json!({"path": "note.md", "content": "hello"}),
            }],
        ),
        Some(ConversationItem::ToolResult { content, .. }) => {
            (format!("tool said: {content}"), vec![])
        }
        _ => ("ok".into(), vec![]),
    });
    assert_eq!(
        say(&s.gateway, "anna", "note this", None).await,
        "tool said: written"
    );
    let reply = say(&s.gateway, "bob", "note this", None).await;
    assert!(reply.contains("read-only"), "{reply}");
    assert!(!s.home.join("users/bob/note.md").exists());
    assert!(s.home.join("users/anna/note.md").exists());

    let calls = caps.calls.lock().unwrap().clone();
    let anna: Vec<_> = calls.iter().filter(|c| c.0 == "anna").collect();
    assert_eq!(anna.len(), 1, "{calls:?}");
    assert_eq!(anna[0].1, CappedDir::Home);
    assert!(!anna[0].3, "the cap came before the write");
    let anna_ids = s
        .gateway
        .sandbox_ids(&UserId::new("anna").unwrap())
        .await
        .unwrap();
    let bob_ids = s
        .gateway
        .sandbox_ids(&UserId::new("bob").unwrap())
        .await
        .unwrap();
    assert_eq!(anna[0].2, anna_ids);
    if runs_as_root() {
        assert_ne!(anna_ids, bob_ids, "each user their own ids");
    }
}

fn runs_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .map(|u| u == "0")
        })
        .unwrap_or(false)
}

/// A user ended by another process (`moltmate users remove`: the store's `end_user`) gets no
/// worker until the ending settles: a message that arrives in between — even before the
/// watcher's next poll — is kept, reaches no model, and is answered once the CLI says it is
/// done, by the new user of the id, with nothing of the old conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_ended_by_another_process_runs_nothing_until_the_ending_settles() {
    let s = setup(|_| {});
    s.gateway.watch_user_events().await.unwrap();
    let anna = UserId::new("anna").unwrap();
    assert_eq!(
        say(&s.gateway, "anna", "first life", None).await,
        "echo: first life"
    );
    let store = s.gateway.store().clone();
    store
        .end_user(&anna, moltmate_store::Ending::Remove)
        .await
        .unwrap()
        .unwrap();
    let calls = s.model.seen().len();
    let message = InboundMessage {
        attachments: Vec::new(),
        sender: Identity::new(ChannelKind::Local, PeerId::new("anna").unwrap()),
        chat_id: "anna".into(),
        external_id: "after-the-end".into(),
        cursor: None,
        text: "second life".into(),
        sender_name: None,
        language_code: None,
    };
    let mut submitted = s
        .gateway
        .submit(message, Arc::new(IgnoreDeltas))
        .await
        .unwrap();
    assert_eq!(submitted.accepted, Accepted::Queued);
    // The watcher holds her; nothing runs for her meanwhile.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while s.gateway.held_users() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the ending was never seen"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!s.gateway.has_worker(&anna));
    assert!(s.gateway.ensure_home(&anna).await.is_err());
    assert!(
        matches!(
            submitted.reply.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        ),
        "answered (or dropped) while held"
    );
    assert_eq!(
        s.model.seen().len(),
        calls,
        "a model was called while she was held"
    );

    store.settle_user(&anna).await.unwrap();
    let reply = tokio::time::timeout(std::time::Duration::from_secs(10), submitted.reply)
        .await
        .expect("answered once settled")
        .unwrap();
    assert_eq!(reply.text, "echo: second life");
    let last = s.model.seen().pop().unwrap();
    assert!(
        !format!("{:?}", last.items).contains("first life"),
        "{:?}",
        last.items
    );
    assert_eq!(s.gateway.held_users(), 0);
}
