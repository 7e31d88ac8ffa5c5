//! Caps on the work one user can cause: tool calls per model answer, tool output per turn,
//! bytes stored per turn, history loaded per turn, stored transcript per user, queued messages
//! per user; `/forget`; and when compaction may be tried again.
//!
//! Every cap that hits is told to whoever can act on it: the model gets a tool result that says
//! what was dropped and why, the user gets a message that says what to do. None of them fails
//! the turn or makes it retry.

use crate::budget::Budget;
use moltmate_core::channel::InboundMessage;
use moltmate_core::model::ConversationItem;
use moltmate_core::UserId;
use moltmate_store::{OutboxItem, Store, StoreError};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const KIB: usize = 1024;
const MIB: u64 = 1024 * 1024;

/// The caps and budgets of one user (from their trust level).
#[derive(Debug, Clone, PartialEq)]
pub struct UserLimits {
    /// Tool calls run per model answer; further calls of the same answer are dropped.
    pub tool_calls_per_answer: usize,
    /// Tool output handed to the model per turn, all calls together.
    pub tool_output_bytes_per_turn: usize,
    /// Transcript bytes one turn may add.
    pub stored_bytes_per_turn: usize,
    /// Stored transcript of the user, all sessions.
    pub transcript_bytes: u64,
    /// Unanswered messages the user may have waiting.
    pub queued_messages: usize,
    /// Reminders the user may have at once (`limits.reminders`).
    pub reminders: usize,
    pub budget: Budget,
}

impl Default for UserLimits {
    /// An owner's defaults (`limits` in README).
    fn default() -> Self {
        UserLimits {
            tool_calls_per_answer: 32,
            tool_output_bytes_per_turn: 1024 * KIB,
            stored_bytes_per_turn: 1024 * KIB,
            transcript_bytes: 1024 * MIB,
            queued_messages: 50,
            reminders: 50,
            budget: Budget {
                messages_per_day: Some(2000),
                tokens_per_day: Some(10_000_000),
                spend_micros_per_month: None,
                exec_seconds_per_day: Some(4 * 3600),
            },
        }
    }
}

fn german(language: &str) -> bool {
    language.starts_with("de")
}

fn kib(bytes: usize) -> usize {
    bytes.div_ceil(KIB)
}

/// Cuts `text` to at most `max` bytes at a character boundary.
fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The tool output of one turn: what is left of its allowance.
#[derive(Debug, Clone)]
pub struct OutputAllowance {
    total: usize,
    left: usize,
}

impl OutputAllowance {
    pub fn new(total: usize) -> Self {
        OutputAllowance { total, left: total }
    }

    pub fn is_used_up(&self) -> bool {
        self.left == 0
    }

    /// Takes a tool result out of the allowance: whole if it fits, else cut with a note.
    pub fn take(&mut self, content: String) -> String {
        if content.len() <= self.left {
            self.left -= content.len();
            return content;
        }
        let kept = cut(&content, self.left).to_string();
        self.left = 0;
        format!(
            "{kept}\n[output cut after {} of {} KB: the tool output allowance of this message ({} KB) is used up. Answer with what you have; more can be read in another message.]",
            kib(kept.len()),
            kib(content.len()),
            kib(self.total)
        )
    }

    /// The result of a call that was not run because the allowance is used up.
    pub fn not_run(&self) -> String {
        format!(
            "not run: the tool output allowance of this message ({} KB) is used up. Answer with what you have; the user can ask for more in another message.",
            kib(self.total)
        )
    }
}

/// The note on the last result of an answer whose extra tool calls were dropped.
pub fn dropped_calls_note(asked: usize, ran: usize) -> String {
    format!(
        "\n[Moltmates: you asked for {asked} tool calls in one answer; only the first {ran} ran (the limit per answer). Ask for the rest in your next answer if you still need them.]"
    )
}

/// What a field of a stored item may shrink to.
const KEPT_TEXT_BYTES: usize = 2 * KIB;

fn stored_len(item: &ConversationItem) -> usize {
    serde_json::to_string(item).map(|s| s.len()).unwrap_or(0)
}

/// A field of a turn's items that can be shrunk for storage.
#[derive(Debug, Clone, Copy)]
enum Field {
    ToolResult(usize),
    Arguments(usize, usize),
    AssistantText(usize),
    UserText(usize),
}

/// Shrinks a turn's new transcript items to at most `max_bytes` of stored JSON, largest field
/// first: tool results and tool-call arguments are replaced by a note saying how much was not
/// kept, texts are cut to their first 2 KB. The model saw everything during the turn and the
/// user got the whole reply; only what later turns reload is shortened.
///
/// Terminates: every step shrinks one field that is larger than its replacement, and a field
/// is shrunk at most once. The result exceeds `max_bytes` only when even every field shrunk
/// does not fit (then it is what the items' structure needs, a few hundred bytes per item).
/// Returns the bytes saved.
pub fn shrink_for_storage(items: &mut [ConversationItem], max_bytes: usize) -> usize {
    let mut sizes: Vec<usize> = items.iter().map(stored_len).collect();
    let before: usize = sizes.iter().sum();
    if before <= max_bytes {
        return 0;
    }
    let mut fields: Vec<(usize, Field)> = Vec::new();
    for (index, item) in items.iter().enumerate() {
        match item {
            ConversationItem::ToolResult { content, .. } => {
                fields.push((content.len(), Field::ToolResult(index)))
            }
            ConversationItem::Assistant { text, tool_calls } => {
                fields.push((text.len(), Field::AssistantText(index)));
                for (call, tool_call) in tool_calls.iter().enumerate() {
                    let len = tool_call.arguments.to_string().len();
                    fields.push((len, Field::Arguments(index, call)));
                }
            }
            ConversationItem::User { text } => fields.push((text.len(), Field::UserText(index))),
            // Never stored (the turn drops images before storage); nothing to shorten.
            ConversationItem::Image { .. } => {}
        }
    }
    // Largest first; the user's own words last of all.
    fields.sort_by_key(|(len, field)| (matches!(field, Field::UserText(_)), usize::MAX - len));
    let mut total = before;
    for (len, field) in fields {
        if total <= max_bytes {
            break;
        }
        let index = match field {
            Field::ToolResult(i)
            | Field::Arguments(i, _)
            | Field::AssistantText(i)
            | Field::UserText(i) => i,
        };
        match (&mut items[index], field) {
            (ConversationItem::ToolResult { content, .. }, Field::ToolResult(_)) => {
                let note = format!(
                    "[{} KB of tool output not kept: over this server's storage limit per message]",
                    kib(len)
                );
                if note.len() >= content.len() {
                    continue;
                }
                *content = note;
            }
            (ConversationItem::Assistant { tool_calls, .. }, Field::Arguments(_, call)) => {
                let note = serde_json::json!({
                    "omitted": format!("{} KB of arguments not kept: over this server's storage limit per message", kib(len))
                });
                if note.to_string().len() >= len {
                    continue;
                }
                if let Some(tool_call) = tool_calls.get_mut(call) {
                    tool_call.arguments = note;
                }
            }
            (ConversationItem::Assistant { text, .. }, Field::AssistantText(_))
            | (ConversationItem::User { text }, Field::UserText(_)) => {
                if text.len() <= KEPT_TEXT_BYTES + 64 {
                    continue;
                }
                *text = format!(
                    "{}… [cut: over this server's storage limit per message]",
                    cut(text, KEPT_TEXT_BYTES)
                );
            }
            _ => continue,
        }
        let size = stored_len(&items[index]);
        total = total - sizes[index] + size;
        sizes[index] = size;
    }
    before.saturating_sub(total)
}

/// Bytes of history a turn may load: what the model's context window holds besides the system
/// prompt and the new message (token estimates are bytes/4, see `session`).
pub fn history_budget(context_window_tokens: usize, system: &str, message: &str) -> u64 {
    let window = (context_window_tokens as u64).saturating_mul(4);
    window.saturating_sub((system.len() + message.len()) as u64)
}

/// Whether compaction may be tried: not again after an attempt that did not bring the session
/// under the threshold, until the user's transcript has grown by half the context window since.
/// So a session that compaction cannot shrink (its newest turns alone fill the window) costs a
/// flush and a summary per half window of new conversation, not per message.
pub async fn compaction_due(
    store: &Store,
    session_id: &str,
    user: &UserId,
    context_window_tokens: usize,
) -> Result<bool, StoreError> {
    let Some(at) = store.compaction_attempt(session_id).await? else {
        return Ok(true);
    };
    let now = store.transcript_bytes(user).await?;
    let step = (context_window_tokens as u64).saturating_mul(4) / 2;
    Ok(now >= at.saturating_add(step.max(1)))
}

/// Records how a compaction attempt ended: `still_over` keeps it from being retried until the
/// session has grown.
pub async fn compaction_done(
    store: &Store,
    session_id: &str,
    user: &UserId,
    still_over: bool,
) -> Result<(), StoreError> {
    let at = if still_over {
        Some(store.transcript_bytes(user).await?)
    } else {
        None
    };
    store.set_compaction_attempt(session_id, at).await
}

/// `Some(notice)` when the user's stored conversations (`used` bytes) fill their cap.
pub fn storage_notice(used: u64, cap: u64, language: &str) -> Option<String> {
    if used < cap {
        return None;
    }
    let mb = |b: u64| b.div_ceil(MIB);
    Some(if german(language) {
        format!(
            "Unsere gespeicherten Gespräche haben ihre Grenze erreicht ({} von {} MB), deshalb kann ich gerade nicht antworten. Schicke /forget, um unsere bisherigen Gespräche zu löschen (deine Notizen und Dateien bleiben), oder bitte den Betreiber, deine Grenze zu erhöhen.",
            mb(used),
            mb(cap)
        )
    } else {
        format!(
            "Our stored conversations have reached their limit ({} of {} MB), so I can't answer right now. Send /forget to delete our past conversations (your notes and files stay), or ask the operator to raise your limit.",
            mb(used),
            mb(cap)
        )
    })
}

/// Whether a `/forget` message confirms (`/forget yes`, `/forget ja`).
pub fn forget_confirmed(text: &str) -> bool {
    let mut words = text.split_whitespace().skip(1);
    matches!(
        words.next().map(str::to_ascii_lowercase).as_deref(),
        Some("yes" | "ja" | "confirm")
    ) && words.next().is_none()
}

/// `/forget`: asks for confirmation, or deletes the user's stored conversations and their
/// memory search index (rebuilt from the memory files at the next search). The caller ends the
/// session (and its sandbox) first when confirmed.
pub async fn forget(
    store: &Store,
    index_dir: Option<&Path>,
    user: &UserId,
    text: &str,
    language: &str,
) -> Result<String, StoreError> {
    let de = german(language);
    if !forget_confirmed(text) {
        let used = store.transcript_bytes(user).await?;
        let kb = used.div_ceil(1024);
        return Ok(if de {
            format!("Damit lösche ich alle unsere bisherigen Gespräche ({kb} KB); deine Notizen und Dateien bleiben. Schicke /forget ja, um es zu bestätigen.")
        } else {
            format!("This deletes all our past conversations ({kb} KB); your notes and files stay. Send /forget yes to confirm.")
        });
    }
    let freed = store.forget_transcripts(user).await?;
    if let Some(index_dir) = index_dir {
        let index = moltmate_store::memory_index::MemoryIndex::path_for(index_dir, user);
        let removed = tokio::task::spawn_blocking(move || {
            for path in [
                index.clone(),
                index.with_extension("db-wal"),
                index.with_extension("db-shm"),
            ] {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| StoreError::Worker(e.to_string()))?;
        removed?;
    }
    tracing::info!(user = %user, bytes = freed, "past conversations forgotten on the user's request");
    let kb = freed.div_ceil(1024);
    Ok(if de {
        format!("Erledigt: unsere bisherigen Gespräche ({kb} KB) sind gelöscht. Deine Notizen und Dateien sind noch da.")
    } else {
        format!("Done: our past conversations ({kb} KB) are deleted. Your notes and files are still there.")
    })
}

/// How often a user whose budget is used up is told so again on a channel that pushes
/// replies (Telegram): each of their messages is answered, but a flood of them must not become
/// a flood of notices through the bot's global send rate.
pub const NOTICE_INTERVAL: Duration = Duration::from_secs(10 * 60);

/// Notices already given, kept in memory (a restart may repeat one notice; that is bounded).
#[derive(Default)]
pub struct Notices {
    /// Users whose queue was full at their last message (told once until one is accepted).
    queue_full: Mutex<HashSet<UserId>>,
    /// When each user was last told that a budget or their storage is used up.
    budget: Mutex<HashMap<UserId, Instant>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Notices {
    /// Forgets what `user` was told (they were removed or reset).
    pub fn forget(&self, user: &UserId) {
        lock(&self.queue_full).remove(user);
        lock(&self.budget).remove(user);
    }

    /// A message of `user` was accepted: their next full queue is told again.
    pub fn queue_accepted(&self, user: &UserId) {
        let mut full = lock(&self.queue_full);
        if !full.is_empty() {
            full.remove(user);
        }
    }

    /// The user's queue is full: whether this refusal is the one that tells them.
    pub fn queue_full(&self, user: &UserId) -> bool {
        lock(&self.queue_full).insert(user.clone())
    }

    /// Whether a budget notice may be pushed to `user` now (at most one per
    /// [`NOTICE_INTERVAL`]).
    pub fn budget_notice_due(&self, user: &UserId, now: Instant) -> bool {
        let mut told = lock(&self.budget);
        if told.len() > 1024 {
            told.retain(|_, at| now.duration_since(*at) < NOTICE_INTERVAL);
        }
        match told.get(user) {
            Some(at) if now.duration_since(*at) < NOTICE_INTERVAL => false,
            _ => {
                told.insert(user.clone(), now);
                true
            }
        }
    }
}

/// The notice for a full queue.
pub fn queue_full_text(cap: usize, language: Option<&str>, default_language: &str) -> String {
    if german(language.unwrap_or(default_language)) {
        format!("Ich habe schon {cap} Nachrichten von dir, die auf eine Antwort warten. Diese und weitere Nachrichten nehme ich erst an, wenn ich sie beantwortet habe — bitte schicke sie danach noch einmal.")
    } else {
        format!("I already have {cap} messages from you waiting for an answer. I can't take this or further messages until I've answered those — please send them again afterwards.")
    }
}

/// What the queue cap says about an incoming message.
#[derive(Debug)]
pub enum QueueCheck {
    /// There is room: accept it.
    Room,
    /// Refused: nothing was stored but the channel cursor (so the channel moves past it).
    /// `notice` is the outbox row telling the sender, the first time their queue is full.
    Full { notice: Option<OutboxItem> },
}

/// Accepting a message: whether the user already has `cap` unanswered messages. If so the
/// message is refused, the channel cursor moves past it, and `push_notice` (for channels that
/// push replies) is queued the first time.
pub async fn check_queue(
    store: &Store,
    notices: &Notices,
    user: &UserId,
    cap: usize,
    message: &InboundMessage,
    push_notice: Option<String>,
) -> Result<QueueCheck, StoreError> {
    if store.pending_inbox_count(user).await? < cap {
        notices.queue_accepted(user);
        return Ok(QueueCheck::Room);
    }
    tracing::info!(user = %user, cap, "queue full; message refused");
    if let Some(cursor) = message.cursor {
        store.advance_cursor(message.sender.channel, cursor).await?;
    }
    let Some(text) = push_notice.filter(|_| notices.queue_full(user)) else {
        return Ok(QueueCheck::Full { notice: None });
    };
    let id = store
        .enqueue_outbound(Some(user), message.sender.channel, &message.chat_id, &text)
        .await?;
    Ok(QueueCheck::Full {
        notice: Some(OutboxItem {
            id,
            inbox_id: None,
            user: Some(user.clone()),
            channel: message.sender.channel,
            chat_id: message.chat_id.clone(),
            text,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use moltmate_core::model::ToolCall;

    fn total(items: &[ConversationItem]) -> usize {
        items.iter().map(stored_len).sum()
    }

    fn big_turn(results: usize, result_bytes: usize) -> Vec<ConversationItem> {
        let mut items = vec![ConversationItem::User {
            text: "read it all".into(),
        }];
        items.push(ConversationItem::Assistant {
            text: String::new(),
            tool_calls: (0..results)
                .map(|n| ToolCall {
                    id: format!("c{n}"),
                    name: "read".into(),
                    arguments: serde_json::json!({"path": "big.txt"}),
                })
                .collect(),
        });
        for n in 0..results {
            items.push(ConversationItem::ToolResult {
                call_id: format!("c{n}"),
                content: "é".repeat(result_bytes / 2),
                is_error: false,
            });
        }
        items.push(ConversationItem::Assistant {
            text: "done".into(),
            tool_calls: vec![],
        });
        items
    }

    #[test]
    fn a_turn_of_a_hundred_big_reads_is_stored_within_the_cap() {
        let mut items = big_turn(100, 250 * 1024);
        assert!(total(&items) > 25_000_000);
        let saved = shrink_for_storage(&mut items, 256 * 1024);
        assert!(saved > 24_000_000);
        assert!(total(&items) <= 256 * 1024, "{}", total(&items));
        assert_eq!(
            items.len(),
            103,
            "no item is dropped (call ids stay paired)"
        );
        assert_eq!(
            items[0],
            ConversationItem::User {
                text: "read it all".into()
            },
            "the user's words are kept"
        );
        match &items[2] {
            ConversationItem::ToolResult {
                content, call_id, ..
            } => {
                assert_eq!(call_id, "c0");
                assert!(
                    content.contains("250 KB of tool output not kept"),
                    "{content}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shrinking_leaves_a_small_turn_alone_and_cuts_huge_texts_and_arguments() {
        let mut small = big_turn(2, 100);
        let before = small.clone();
        assert_eq!(shrink_for_storage(&mut small, 64 * 1024), 0);
        assert_eq!(small, before);

        let mut items = vec![
            ConversationItem::User {
                text: "ü".repeat(40_000),
            },
            ConversationItem::Assistant {
                text: "x".repeat(100_000),
                tool_calls: vec![ToolCall {
                    id: "w".into(),
                    name: "write".into(),
                    arguments: serde_json::json!({"path": "a", "content": "y".repeat(200_000)}),
                }],
            },
        ];
        shrink_for_storage(&mut items, 64 * 1024);
        assert!(total(&items) <= 64 * 1024, "{}", total(&items));
        match &items[1] {
            ConversationItem::Assistant { text, tool_calls } => {
                assert!(text.len() < 3 * 1024 && text.ends_with("per message]"));
                assert!(tool_calls[0].arguments["omitted"]
                    .as_str()
                    .unwrap()
                    .contains("196 KB of arguments not kept"));
            }
            other => panic!("{other:?}"),
        }
        // Nothing can be shrunk further: the result is bounded by the structure.
        let mut tiny_cap = big_turn(50, 10);
        shrink_for_storage(&mut tiny_cap, 10);
        assert!(total(&tiny_cap) < 50 * 200);
    }

    #[test]
    fn tool_output_allowance_cuts_at_a_character_and_then_refuses() {
        let mut allowance = OutputAllowance::new(10);
        assert_eq!(allowance.take("abcd".into()), "abcd");
        let cut = allowance.take("ééééééé".into());
        assert!(cut.starts_with("ééé\n[output cut"), "{cut}");
        assert!(allowance.is_used_up());
        assert!(allowance
            .not_run()
            .starts_with("not run: the tool output allowance"));
    }

    #[test]
    fn a_full_transcript_tells_the_user_what_to_do() {
        assert_eq!(storage_notice(10, 11, "en"), None);
        let notice = storage_notice(33 * MIB, 32 * MIB, "en").unwrap();
        assert!(
            notice.contains("(33 of 32 MB)") && notice.contains("Send /forget"),
            "{notice}"
        );
        assert!(storage_notice(32 * MIB, 32 * MIB, "de")
            .unwrap()
            .contains("Schicke /forget"));
    }

    #[test]
    fn forget_needs_a_confirmation_word() {
        assert!(!forget_confirmed("/forget"));
        assert!(forget_confirmed("/forget yes"));
        assert!(forget_confirmed("/forget JA"));
        assert!(!forget_confirmed("/forget yes please"));
        assert!(!forget_confirmed("/forget no"));
    }

    #[test]
    fn history_budget_is_the_window_minus_prompt_and_message() {
        assert_eq!(history_budget(1000, "sys", "hi"), 3995);
        assert_eq!(history_budget(1, &"s".repeat(100), ""), 0);
    }

    #[test]
    fn budget_notices_are_pushed_at_most_once_per_interval_and_queue_notices_once_per_episode() {
        let notices = Notices::default();
        let anna = UserId::new("anna").unwrap();
        let start = Instant::now();
        assert!(notices.budget_notice_due(&anna, start));
        assert!(!notices.budget_notice_due(&anna, start + Duration::from_secs(60)));
        assert!(notices.budget_notice_due(&anna, start + NOTICE_INTERVAL));
        assert!(notices.queue_full(&anna));
        assert!(!notices.queue_full(&anna));
        notices.queue_accepted(&anna);
        assert!(notices.queue_full(&anna));
    }

    #[tokio::test]
    async fn compaction_is_not_retried_until_the_transcript_grew() {
        let store = Store::open_in_memory().unwrap();
        let anna = UserId::new("anna").unwrap();
        assert!(compaction_due(&store, "s", &anna, 1000).await.unwrap());
        compaction_done(&store, "s", &anna, true).await.unwrap();
        assert!(!compaction_due(&store, "s", &anna, 1000).await.unwrap());
        compaction_done(&store, "s", &anna, false).await.unwrap();
        assert!(compaction_due(&store, "s", &anna, 1000).await.unwrap());
    }
}
