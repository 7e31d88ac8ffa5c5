//! The Telegram channel against the in-process fake Bot API, with an in-memory sink.

use async_trait::async_trait;
use moltmate_channels::telegram::split::utf16_len;
use moltmate_channels::{TelegramChannel, TelegramSettings};
use moltmate_core::channel::{
    AcceptError, Accepted, Channel, ChannelError, InboundMessage, InboundSink,
};
use moltmate_core::{ChannelKind, Shutdown};
use moltmate_testkit::telegram::{FakeTelegram, IncomingText};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

const TOKEN: &str = "123456:TEST-secret_token";
const WAIT: Duration = Duration::from_secs(10);

/// Stores accepted messages and the cursor in memory; can be told to fail the next accepts.
#[derive(Default)]
struct MemorySink {
    accepted: Mutex<Vec<InboundMessage>>,
    cursor: Mutex<Option<i64>>,
    fail_next: AtomicUsize,
    attempts: Mutex<Vec<String>>,
    /// Updates (by external id) that fail this many more times.
    fail_update: Mutex<HashMap<String, usize>>,
    /// How long each accept takes, and the most accepts seen running at once.
    delay: Mutex<Duration>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Calls of `advance_cursor` (a commit of its own in the gateway).
    advances: AtomicUsize,
}

impl MemorySink {
    fn with_cursor(cursor: i64) -> Arc<Self> {
        let sink = MemorySink::default();
        *sink.cursor.lock().unwrap() = Some(cursor);
        Arc::new(sink)
    }

    fn accepted(&self) -> Vec<InboundMessage> {
        self.accepted.lock().unwrap().clone()
    }

    fn texts(&self) -> Vec<String> {
        self.accepted().into_iter().map(|m| m.text).collect()
    }

    async fn wait_accepted(&self, count: usize) -> Vec<InboundMessage> {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.accepted();
            if got.len() >= count {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {count} accepted messages, got {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[async_trait]
impl InboundSink for MemorySink {
    async fn accept(&self, message: InboundMessage) -> Result<Accepted, AcceptError> {
        self.attempts
            .lock()
            .unwrap()
            .push(message.external_id.clone());
        if self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(AcceptError::Storage("disk full (test)".to_string()));
        }
        if let Some(left) = self
            .fail_update
            .lock()
            .unwrap()
            .get_mut(&message.external_id)
            .filter(|left| **left > 0)
        {
            *left -= 1;
            return Err(AcceptError::Storage("disk full (test)".to_string()));
        }
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let delay = *self.delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let mut accepted = self.accepted.lock().unwrap();
        if accepted
            .iter()
            .any(|m| m.external_id == message.external_id)
        {
            return Ok(Accepted::Duplicate);
        }
        if let Some(cursor) = message.cursor {
            let mut stored = self.cursor.lock().unwrap();
            *stored = Some(stored.map_or(cursor, |s| s.max(cursor)));
        }
        accepted.push(message);
        Ok(Accepted::Queued)
    }

    async fn cursor(&self, channel: ChannelKind) -> Result<Option<i64>, AcceptError> {
        assert_eq!(channel, ChannelKind::Telegram);
        Ok(*self.cursor.lock().unwrap())
    }

    async fn advance_cursor(&self, channel: ChannelKind, cursor: i64) -> Result<(), AcceptError> {
        assert_eq!(channel, ChannelKind::Telegram);
        self.advances.fetch_add(1, Ordering::SeqCst);
        let mut stored = self.cursor.lock().unwrap();
        *stored = Some(stored.map_or(cursor, |s| s.max(cursor)));
        Ok(())
    }
}

fn settings(fake: &FakeTelegram) -> TelegramSettings {
    let mut s = TelegramSettings::new(TOKEN).with_api_url(fake.api_url());
    s.poll_timeout = Duration::from_secs(1);
    s.request_timeout = Duration::from_secs(3);
    s.backoff_initial = Duration::from_millis(20);
    s.backoff_max = Duration::from_millis(200);
    s
}

struct Running {
    shutdown: Shutdown,
    task: JoinHandle<Result<(), ChannelError>>,
}

impl Running {
    fn start(settings: TelegramSettings, sink: Arc<MemorySink>) -> Running {
        let channel = Arc::new(TelegramChannel::new(settings).unwrap());
        let shutdown = Shutdown::new();
        let task = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move { channel.run(sink, shutdown).await })
        };
        Running { shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(2), self.task).await;
        result
            .expect("run must return promptly on shutdown")
            .unwrap()
            .unwrap();
    }
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn delivers_updates_in_order_with_fields_and_confirms_them() {
    let fake = FakeTelegram::start(TOKEN).await;
    let sink = Arc::new(MemorySink::default());
    let first = fake.push_message(
        IncomingText::new(42, "hello")
            .first_name("Anna")
            .last_name("Berg")
            .language_code("de"),
    );
    let second = fake.push_text(42, "second");
    let running = Running::start(settings(&fake), sink.clone());
    let third = {
        sink.wait_accepted(2).await;
        fake.push_text(7, "from someone else")
    };
    let got = sink.wait_accepted(3).await;
    assert_eq!(sink.texts(), vec!["hello", "second", "from someone else"]);
    let m = &got[0];
    assert_eq!(m.sender.to_string(), "telegram:42");
    assert_eq!(m.chat_id, "42");
    assert_eq!(m.external_id, first.to_string());
    // Messages go without a cursor; the cursor past the batch is stored once all of it is.
    assert_eq!(m.cursor, None);
    assert_eq!(m.sender_name.as_deref(), Some("Anna Berg"));
    assert_eq!(m.language_code.as_deref(), Some("de"));
    assert_eq!(got[2].sender.to_string(), "telegram:7");
    assert_eq!(got[2].language_code, None);

    wait_until("the last update is confirmed", || {
        fake.get_updates_offsets().last() == Some(&Some(third + 1))
    })
    .await;
    assert_eq!(*sink.cursor.lock().unwrap(), Some(third + 1));
    assert!(second < third);
    assert_eq!(fake.pending_updates(), 0);
    let calls = fake.get_updates_calls();
    assert_eq!(
        calls[0].offset, None,
        "no stored cursor: start without offset"
    );
    assert_eq!(
        calls[0].allowed_updates.as_deref(),
        Some(&["message".to_string()][..])
    );
    assert_eq!(calls[0].timeout, 1);
    running.stop().await;
}

#[tokio::test]
async fn failed_accept_retries_the_same_update_and_never_skips() {
    let fake = FakeTelegram::start(TOKEN).await;
    let sink = Arc::new(MemorySink::default());
    sink.fail_next.store(2, Ordering::SeqCst);
    let first = fake.push_text(42, "one");
    let second = fake.push_text(42, "two");
    let running = Running::start(settings(&fake), sink.clone());
    sink.wait_accepted(2).await;
    assert_eq!(sink.texts(), vec!["one", "two"]);
    let attempts = sink.attempts.lock().unwrap().clone();
    assert_eq!(
        attempts,
        vec![
            first.to_string(),
            first.to_string(),
            first.to_string(),
            second.to_string()
        ]
    );
    // The offset never moved past an update before it was stored.
    let offsets = fake.get_updates_offsets();
    assert!(
        offsets.iter().flatten().all(|o| *o <= second + 1),
        "{offsets:?}"
    );
    running.stop().await;
}

#[tokio::test]
async fn restart_from_stored_cursor_does_not_redeliver() {
    let fake = FakeTelegram::start(TOKEN).await;
    let _old = fake.push_text(42, "already stored");
    let stored = fake.push_text(42, "also stored");
    let new = fake.push_text(42, "new");
    // As after a crash between storing and confirming: the store has the cursor, Telegram
    // still holds the updates.
    let sink = MemorySink::with_cursor(stored + 1);
    let running = Running::start(settings(&fake), sink.clone());
    sink.wait_accepted(1).await;
    wait_until("the new update is confirmed", || {
        fake.get_updates_offsets().contains(&Some(new + 1))
    })
    .await;
    assert_eq!(sink.texts(), vec!["new"]);
    assert_eq!(fake.get_updates_offsets()[0], Some(stored + 1));
    running.stop().await;
}

/// A quiet bot's batch is one sender's (usually one message): its last message carries the
/// cursor past the whole batch (skipped updates included), stored in the same commit, and no
/// separate cursor write follows. Several senders' messages go without a cursor and the cursor
/// follows once all are stored.
#[tokio::test]
async fn a_one_sender_batch_stores_its_cursor_with_its_last_message() {
    let fake = FakeTelegram::start(TOKEN).await;
    fake.push_text(42, "first");
    fake.push_text(42, "second");
    let from = json!({"id": 42, "is_bot": false, "first_name": "A"});
    let chat = json!({"id": 42, "type": "private"});
    let sticker = fake
        .push_raw_update(
            json!({"message": {"message_id": 9, "date": 0, "from": from, "chat": chat,
        "sticker": {"file_id": "x", "width": 1, "height": 1}}}),
        )
        .unwrap();
    let sink = Arc::new(MemorySink::default());
    let running = Running::start(settings(&fake), sink.clone());
    let accepted = sink.wait_accepted(2).await;
    wait_until("the batch is confirmed", || {
        fake.get_updates_offsets().contains(&Some(sticker + 1))
    })
    .await;
    let cursors: Vec<Option<i64>> = accepted.iter().map(|m| m.cursor).collect();
    assert_eq!(cursors, vec![None, Some(sticker + 1)]);
    assert_eq!(*sink.cursor.lock().unwrap(), Some(sticker + 1));
    assert_eq!(sink.advances.load(Ordering::SeqCst), 0);
    running.stop().await;

    let fake = FakeTelegram::start(TOKEN).await;
    fake.push_text(42, "from one");
    let last = fake.push_text(43, "from another");
    let sink = Arc::new(MemorySink::default());
    let running = Running::start(settings(&fake), sink.clone());
    let accepted = sink.wait_accepted(2).await;
    wait_until("the batch is confirmed", || {
        fake.get_updates_offsets().contains(&Some(last + 1))
    })
    .await;
    assert!(accepted.iter().all(|m| m.cursor.is_none()), "{accepted:?}");
    wait_until("the cursor follows the batch", || {
        *sink.cursor.lock().unwrap() == Some(last + 1)
    })
    .await;
    assert_eq!(sink.advances.load(Ordering::SeqCst), 1);
    running.stop().await;
}

#[tokio::test]
async fn updates_without_text_or_a_file_or_outside_private_chats_are_skipped() {
    let fake = FakeTelegram::start(TOKEN).await;
    let from = json!({"id": 42, "is_bot": false, "first_name": "A"});
    let chat = json!({"id": 42, "type": "private"});
    fake.push_raw_update(
        json!({"message": {"message_id": 1, "date": 0, "from": from, "chat": chat,
        "sticker": {"file_id": "x", "width": 1, "height": 1}}}),
    );
    fake.push_raw_update(
        json!({"message": {"message_id": 2, "date": 0, "from": from, "chat": chat,
        "photo": [{"file_id": "y", "width": 1, "height": 1}], "caption": "look"}}),
    );
    fake.push_raw_update(json!({"message": {"message_id": 3, "date": 0, "chat": {"id": -100, "type": "channel"}, "text": "post"}}));
    fake.push_raw_update(json!({"message": {"message_id": 4, "date": 0,
        "from": {"id": 9, "is_bot": true, "first_name": "OtherBot"}, "chat": chat, "text": "beep"}}));
    fake.push_message(IncomingText::new(43, "in a group").in_group(-555));
    let last = fake.push_text(42, "real text");
    let sink = Arc::new(MemorySink::default());
    let running = Running::start(settings(&fake), sink.clone());
    sink.wait_accepted(2).await;
    wait_until("everything is confirmed", || {
        fake.get_updates_offsets().contains(&Some(last + 1))
    })
    .await;
    // The photo's caption is its text; the largest size is its attachment reference.
    assert_eq!(sink.texts(), vec!["look", "real text"]);
    let photo = &sink.accepted()[0].attachments;
    assert_eq!(photo.len(), 1);
    assert_eq!(photo[0].file_ref, "y");
    assert_eq!(photo[0].kind, moltmate_core::channel::AttachmentKind::Photo);
    assert_eq!(fake.pending_updates(), 0);
    running.stop().await;
}

#[tokio::test]
async fn group_chats_are_delivered_when_enabled() {
    let fake = FakeTelegram::start(TOKEN).await;
    fake.push_message(IncomingText::new(43, "hi all").in_group(-555));
    fake.push_raw_update(json!({"edited_message": {"message_id": 1, "date": 0, "edit_date": 1,
        "from": {"id": 43, "is_bot": false, "first_name": "B"}, "chat": {"id": 43, "type": "private"}, "text": "edited"}}));
    let sink = Arc::new(MemorySink::default());
    let mut s = settings(&fake);
    s.accept_group_chats = true;
    let running = Running::start(s, sink.clone());
    let got = sink.wait_accepted(1).await;
    assert_eq!(got[0].chat_id, "-555");
    assert_eq!(got[0].sender.to_string(), "telegram:43");
    wait_until("all confirmed", || fake.pending_updates() == 0).await;
    assert_eq!(
        sink.texts(),
        vec!["hi all"],
        "edited messages are never delivered"
    );
    running.stop().await;
}

#[tokio::test]
async fn skipped_updates_are_confirmed_even_without_a_following_message() {
    let fake = FakeTelegram::start(TOKEN).await;
    let sticker = fake
        .push_raw_update(json!({"message": {"message_id": 1, "date": 0,
            "from": {"id": 42, "is_bot": false, "first_name": "A"}, "chat": {"id": 42, "type": "private"},
            "sticker": {"file_id": "x"}}}))
        .unwrap();
    let sink = Arc::new(MemorySink::default());
    let running = Running::start(settings(&fake), sink.clone());
    wait_until("the sticker is confirmed", || {
        fake.get_updates_offsets().contains(&Some(sticker + 1))
    })
    .await;
    assert!(sink.accepted().is_empty());
    running.stop().await;
    // Stored too: after a restart the skipped update is not read again.
    assert_eq!(*sink.cursor.lock().unwrap(), Some(sticker + 1));
}

/// Regression: when a batch ended on skipped updates, only the in-memory offset moved past them,
/// so every restart re-read (and re-skipped) them. The stored cursor now follows, and never
/// moves backwards past what an accepted message stored.
#[tokio::test]
async fn a_batch_ending_in_skipped_updates_moves_the_stored_cursor() {
    let fake = FakeTelegram::start(TOKEN).await;
    let text = fake.push_text(42, "hello");
    let sticker_update = fake
        .push_raw_update(json!({"message": {"message_id": 2, "date": 0,
            "from": {"id": 42, "is_bot": false, "first_name": "A"}, "chat": {"id": 42, "type": "private"},
            "sticker": {"file_id": "x"}}}))
        .unwrap();
    assert!(sticker_update > text);
    let sink = Arc::new(MemorySink::default());
    let running = Running::start(settings(&fake), sink.clone());
    sink.wait_accepted(1).await;
    wait_until("the stored cursor passes the sticker", || {
        *sink.cursor.lock().unwrap() == Some(sticker_update + 1)
    })
    .await;
    running.stop().await;

    // A restart starts after the sticker: nothing is read twice.
    let running = Running::start(settings(&fake), sink.clone());
    wait_until("the restarted channel polls", || {
        fake.get_updates_offsets().len() >= 3
    })
    .await;
    assert!(fake
        .get_updates_offsets()
        .iter()
        .rev()
        .take(1)
        .all(|o| *o == Some(sticker_update + 1)));
    assert_eq!(sink.texts(), vec!["hello"]);
    running.stop().await;
}

#[tokio::test]
async fn rate_limit_retry_after_is_honoured() {
    let fake = FakeTelegram::start(TOKEN).await;
    fake.fail_next_method("getUpdates", 1, 429, Some(1));
    fake.push_text(42, "hi");
    let sink = Arc::new(MemorySink::default());
    let started = Instant::now();
    let running = Running::start(settings(&fake), sink.clone());
    sink.wait_accepted(1).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(950),
        "retried after {elapsed:?}, before retry_after"
    );
    // One refused call, one that delivered (a third may already be confirming it).
    assert_eq!(fake.get_updates_offsets()[..2], [None, None]);
    assert_eq!(fake.get_updates_calls()[0].timeout, 1);
    running.stop().await;
}

#[tokio::test]
async fn server_errors_and_conflicts_back_off_and_recover() {
    let fake = FakeTelegram::start(TOKEN).await;
    fake.fail_next_method("getMe", 2, 500, None);
    fake.fail_next_method("getUpdates", 3, 502, None);
    fake.fail_next_method("getUpdates", 1, 409, None);
    fake.push_text(42, "hi");
    let sink = Arc::new(MemorySink::default());
    let started = Instant::now();
    let running = Running::start(settings(&fake), sink.clone());
    sink.wait_accepted(1).await;
    assert_eq!(fake.calls("getMe"), 3);
    // Four refused calls, then the one that delivered (a sixth may already be confirming it).
    assert_eq!(fake.get_updates_offsets()[..5], [None; 5]);
    // Six failures with a 20 ms initial backoff and equal jitter: at least 10+20+40+10+20+40 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(140),
        "{:?}",
        started.elapsed()
    );
    running.stop().await;
}

#[tokio::test]
async fn malformed_replies_and_updates_do_not_stop_the_channel() {
    let fake = FakeTelegram::start(TOKEN).await;
    fake.respond_raw_next(Some("getUpdates"), 1, 200, "{not json at all");
    fake.respond_raw_next(
        Some("getUpdates"),
        1,
        200,
        r#"{"ok":true,"result":{"unexpected":"object"}}"#,
    );
    fake.respond_raw_next(Some("getUpdates"), 1, 502, "<html>Bad Gateway</html>");
    fake.push_raw_update(json!("not an object"));
    fake.push_raw_update(json!({"message": "not a message object"}));
    fake.push_raw_update(json!({"update_id": "not a number"}));
    let last = fake.push_text(42, "still here");
    let sink = Arc::new(MemorySink::default());
    let running = Running::start(settings(&fake), sink.clone());
    sink.wait_accepted(1).await;
    wait_until("the text is confirmed", || {
        fake.get_updates_offsets().contains(&Some(last + 1))
    })
    .await;
    assert_eq!(sink.texts(), vec!["still here"]);
    running.stop().await;
}

#[tokio::test]
async fn wrong_token_is_rejected_without_revealing_it() {
    let fake = FakeTelegram::start("999:the-right-one").await;
    let sink = Arc::new(MemorySink::default());
    let channel = TelegramChannel::new(settings(&fake)).unwrap();
    let err = channel.verify().await.unwrap_err();
    assert!(
        matches!(err, ChannelError::Rejected { status: 401, .. }),
        "{err:?}"
    );
    let result = tokio::time::timeout(Duration::from_secs(5), channel.run(sink, Shutdown::new()))
        .await
        .expect("a refused token must stop run at once");
    let err = result.unwrap_err();
    assert!(!err.is_retryable());
    for shown in [err.to_string(), format!("{err:?}"), format!("{channel:?}")] {
        assert!(!shown.contains("TEST-secret"), "token leaked: {shown}");
        assert!(!shown.contains("the-right-one"), "token leaked: {shown}");
    }
    assert!(err.to_string().contains("bot token"), "{err}");
}

#[tokio::test]
async fn unreachable_api_errors_do_not_reveal_the_token() {
    // A port nothing listens on: connection refused.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let channel = TelegramChannel::new(TelegramSettings::new(TOKEN).with_api_url(url)).unwrap();
    let err = channel.send_typing("42").await.unwrap_err();
    assert!(matches!(err, ChannelError::Unreachable { .. }), "{err:?}");
    assert!(!err.to_string().contains("TEST-secret"), "{err}");
    assert!(!format!("{err:?}").contains("TEST-secret"), "{err:?}");
}

#[tokio::test]
async fn shutdown_interrupts_a_long_poll() {
    let fake = FakeTelegram::start(TOKEN).await;
    let mut s = settings(&fake);
    s.poll_timeout = Duration::from_secs(30);
    let running = Running::start(s, Arc::new(MemorySink::default()));
    wait_until("a long poll is in flight", || fake.calls("getUpdates") == 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    running.stop().await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn shutdown_interrupts_retry_waits() {
    let fake = FakeTelegram::start(TOKEN).await;
    fake.fail_next_method("getMe", 1, 429, Some(60));
    let running = Running::start(settings(&fake), Arc::new(MemorySink::default()));
    wait_until("getMe was rate limited", || fake.calls("getMe") == 1).await;
    let started = Instant::now();
    running.stop().await;
    assert!(started.elapsed() < Duration::from_millis(500));
}

#[tokio::test]
async fn long_replies_are_split_at_the_utf16_limit_in_order() {
    let fake = FakeTelegram::start(TOKEN).await;
    let channel = TelegramChannel::new(settings(&fake)).unwrap();

    let lines: Vec<String> = (0..600)
        .map(|i| format!("line {i:04} of a long answer"))
        .collect();
    let text = lines.join("\n");
    channel.send_text("42", &text).await.unwrap();
    let parts = fake.wait_for_messages(42, 1, WAIT).await.unwrap();
    assert!(parts.len() >= 4, "{}", parts.len());
    assert!(parts.iter().all(|p| utf16_len(p) <= 4096));
    // Cut at line breaks: rejoining with newlines gives back the text exactly, in order.
    assert_eq!(parts.join("\n"), text);

    // Emoji outside the BMP count twice: 3000 of them are 6000 units, two messages.
    let emoji = "😀".repeat(3000);
    channel.send_text("43", &emoji).await.unwrap();
    let parts = fake.wait_for_messages(43, 2, WAIT).await.unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(utf16_len(&parts[0]), 4096);
    assert_eq!(parts.concat(), emoji);

    let family = "👩\u{200D}👩\u{200D}👧 ".repeat(600); // 9 units each
    channel.send_text("44", &family).await.unwrap();
    let parts = fake.wait_for_messages(44, 2, WAIT).await.unwrap();
    assert!(parts
        .iter()
        .all(|p| utf16_len(p) <= 4096 && !p.starts_with('\u{200D}') && !p.ends_with('\u{200D}')));
    assert_eq!(parts.join(" ").split_whitespace().count(), 600);
}

#[tokio::test]
async fn sending_retries_rate_limits_and_server_errors_but_not_bad_requests() {
    let fake = FakeTelegram::start(TOKEN).await;
    let mut s = settings(&fake);
    s.send_attempts = 3;
    let channel = TelegramChannel::new(s).unwrap();

    fake.fail_next_method("sendMessage", 1, 429, Some(1));
    fake.fail_next_method("sendMessage", 1, 500, None);
    let started = Instant::now();
    channel.send_text("42", "hello").await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(950));
    assert_eq!(
        fake.wait_for_messages(42, 1, WAIT).await.unwrap(),
        vec!["hello"]
    );
    assert_eq!(fake.calls("sendMessage"), 3);

    fake.fail_next_method("sendMessage", 1, 400, None);
    let err = channel.send_text("42", "to nowhere").await.unwrap_err();
    assert!(
        matches!(err, ChannelError::Rejected { status: 400, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("chat not found"), "{err}");
    assert_eq!(fake.calls("sendMessage"), 4, "a 400 is not retried");

    fake.fail_next_method("sendMessage", 5, 503, None);
    let err = channel.send_text("42", "down").await.unwrap_err();
    assert!(
        matches!(err, ChannelError::Server { status: 503, .. }),
        "{err:?}"
    );
    assert_eq!(fake.calls("sendMessage"), 7, "gives up after send_attempts");

    let err = channel.send_text("not a chat", "x").await.unwrap_err();
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn typing_action_is_sent() {
    let fake = FakeTelegram::start(TOKEN).await;
    let channel = TelegramChannel::new(settings(&fake)).unwrap();
    channel.send_typing("42").await.unwrap();
    let actions = fake.chat_actions();
    assert_eq!(actions.len(), 1);
    assert_eq!(actions[0].chat_id, "42");
    assert_eq!(actions[0].action, "typing");
    assert_eq!(channel.kind(), ChannelKind::Telegram);
}

#[tokio::test]
async fn fake_refuses_overlong_messages_like_telegram() {
    let fake = FakeTelegram::start(TOKEN).await;
    let client = reqwest::Client::new();
    let url = format!("{}/bot{}/sendMessage", fake.api_url(), TOKEN);
    let reply = client
        .post(&url)
        .json(&json!({"chat_id": 1, "text": "😀".repeat(2049)}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 400);
    let body: serde_json::Value = reply.json().await.unwrap();
    assert_eq!(body["description"], "Bad Request: message is too long");
    let reply = client
        .post(&url)
        .json(&json!({"chat_id": 1, "text": "😀".repeat(2048)}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let wrong = format!("{}/botWRONG/getMe", fake.api_url());
    let reply = client.post(&wrong).send().await.unwrap();
    assert_eq!(reply.status(), 401);
    let body: serde_json::Value = reply.json().await.unwrap();
    assert_eq!(
        body,
        json!({"ok": false, "error_code": 401, "description": "Unauthorized"})
    );
}

#[tokio::test]
async fn fake_get_updates_honours_offsets_and_long_polls() {
    let fake = FakeTelegram::start(TOKEN).await;
    let client = reqwest::Client::new();
    let url = format!("{}/bot{}/getUpdates", fake.api_url(), TOKEN);
    let a = fake.push_text(1, "a");
    let b = fake.push_text(1, "b");
    let ids = |body: serde_json::Value| -> Vec<i64> {
        body["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["update_id"].as_i64().unwrap())
            .collect()
    };
    let body: serde_json::Value = client
        .post(&url)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ids(body), vec![a, b], "without offset nothing is confirmed");
    let body: serde_json::Value = client
        .post(&url)
        .json(&json!({"offset": b}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ids(body), vec![b]);
    assert_eq!(
        fake.pending_updates(),
        1,
        "offset confirmed the older update"
    );

    // Long poll: returns early when an update arrives, well before the 10 s timeout.
    let started = Instant::now();
    let poll = tokio::spawn({
        let client = client.clone();
        let url = url.clone();
        async move {
            let reply = client
                .post(&url)
                .json(&json!({"offset": b + 1, "timeout": 10}))
                .send()
                .await
                .unwrap();
            reply.json::<serde_json::Value>().await.unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = fake.push_text(1, "c");
    let body = poll.await.unwrap();
    assert_eq!(ids(body), vec![c]);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(fake.get_updates_offsets(), vec![None, Some(b), Some(b + 1)]);
    assert_eq!(fake.get_updates_calls()[2].timeout, 10);
}

/// Every update of a batch was stored one after the other, each with its own fsync in the
/// gateway, so a flood of 1,000 updates held a bystander's message behind 1,000 fsyncs. Now
/// different senders' messages are handed over at once (the gateway commits them in groups),
/// each sender's still in order, and the offset and the stored cursor pass the batch only when
/// all of it is stored.
#[tokio::test]
async fn a_batch_goes_to_the_sink_senders_at_once_each_in_order_and_the_cursor_waits_for_all() {
    let fake = FakeTelegram::start(TOKEN).await;
    let sink = Arc::new(MemorySink::default());
    *sink.delay.lock().unwrap() = Duration::from_millis(20);
    let mut ids = Vec::new();
    for round in 0..3 {
        for sender in 0..10 {
            ids.push((
                sender,
                fake.push_text(1000 + sender, &format!("{sender}/{round}")),
            ));
        }
    }
    // Sender 3's first update fails a few times while everyone else's is stored.
    let (_, stuck) = ids[3];
    sink.fail_update
        .lock()
        .unwrap()
        .insert(stuck.to_string(), 5);
    let last = ids.last().map(|(_, id)| *id).unwrap();
    let running = Running::start(settings(&fake), sink.clone());
    let mut cursors = Vec::new();
    let deadline = Instant::now() + WAIT;
    while sink.accepted().len() < ids.len() {
        assert!(
            Instant::now() < deadline,
            "timed out; got {:?}",
            sink.texts()
        );
        let stored_stuck = sink
            .accepted()
            .iter()
            .any(|m| m.external_id == stuck.to_string());
        cursors.push((stored_stuck, *sink.cursor.lock().unwrap()));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    wait_until("the batch is confirmed", || {
        fake.get_updates_offsets().contains(&Some(last + 1))
    })
    .await;
    // Never did the stored cursor or the offset pass the stuck update before it was stored.
    for (stored_stuck, cursor) in cursors {
        assert!(
            stored_stuck || cursor.is_none_or(|c| c <= stuck),
            "{cursor:?}"
        );
    }
    assert_eq!(*sink.cursor.lock().unwrap(), Some(last + 1));
    assert!(
        sink.max_in_flight.load(Ordering::SeqCst) > 1,
        "senders were handed over one at a time"
    );
    // Each sender's messages in their order.
    for sender in 0..10 {
        let theirs: Vec<String> = sink
            .texts()
            .into_iter()
            .filter(|t| t.starts_with(&format!("{sender}/")))
            .collect();
        let want: Vec<String> = (0..3).map(|round| format!("{sender}/{round}")).collect();
        assert_eq!(theirs, want);
    }
    running.stop().await;
}

#[tokio::test]
async fn markdown_replies_are_sent_as_telegram_html_the_fake_accepts() {
    let fake = FakeTelegram::start(TOKEN).await;
    let channel = TelegramChannel::new(settings(&fake)).unwrap();
    let reply = "**Plan** for _today_:\n\n- buy `milk & eggs`\n- call <Bob>\n\n```sh\necho \"a<b\"\n```\n\n[docs](https://example.org/?a=1&b=2) and [evil](javascript:alert(1)) <script>alert(1)</script>";
    channel.send_text("42", reply).await.unwrap();
    let sent = fake.sent_messages();
    assert_eq!(sent.len(), 1);
    let html = sent[0].html.clone().expect("sent with parse_mode HTML");
    assert!(html.contains("<b>Plan</b>"), "{html}");
    assert!(html.contains("<code>milk &amp; eggs</code>"), "{html}");
    assert!(
        html.contains("<a href=\"https://example.org/?a=1&amp;b=2\">docs</a>"),
        "{html}"
    );
    assert!(!html.contains("javascript"), "{html}");
    assert!(!html.contains("<script"), "{html}");
    // What the user sees: the hostile parts as text.
    assert!(
        sent[0].text.contains("<script>alert(1)</script>"),
        "{}",
        sent[0].text
    );
    assert!(sent[0].text.contains("• call <Bob>"), "{}", sent[0].text);
}

#[tokio::test]
async fn formatting_rejected_by_telegram_is_resent_as_plain_text() {
    let fake = FakeTelegram::start(TOKEN).await;
    let channel = TelegramChannel::new(settings(&fake)).unwrap();
    fake.reject_formatting_next(1);
    channel
        .send_text("42", "**bold** & <b>raw</b>")
        .await
        .unwrap();
    let sent = fake.sent_messages();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].html, None, "the resend is plain");
    assert_eq!(sent[0].text, "bold & <b>raw</b>");
    assert_eq!(fake.calls("sendMessage"), 2);
}

#[tokio::test]
async fn long_formatted_replies_split_into_parts_telegram_can_parse() {
    let fake = FakeTelegram::start(TOKEN).await;
    let channel = TelegramChannel::new(settings(&fake)).unwrap();
    let text = format!(
        "**{}**\n\n```\n{}```",
        "fish & chips <3 ".repeat(600).trim_end(),
        "x < y && z\n".repeat(900)
    );
    channel.send_text("42", &text).await.unwrap();
    let sent = fake.sent_messages();
    assert!(sent.len() >= 4, "{}", sent.len());
    // Every part was parsed by the fake's strict Telegram HTML parser (else it would be plain).
    assert!(sent.iter().all(|m| m.html.is_some()));
    assert!(sent.iter().all(|m| utf16_len(&m.text) <= 4096));
    assert_eq!(fake.calls("sendMessage"), sent.len());
}
