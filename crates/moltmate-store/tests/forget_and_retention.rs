//! Regressions (issue 9 review, §3 `/forget`): what `/forget yes` left behind, and message
//! texts kept forever in the inbox and outbox.

use moltmate_core::model::ConversationItem;
use moltmate_core::UserId;
use moltmate_store::{Store, TurnRecord};

/// Regression: the worker answers `/forget yes` by ending the session (`end_session`, which keeps its
/// summary) and then calling `forget_transcripts`, whose `UPDATE sessions SET summary = NULL`
/// only touches sessions that are still open (`ended_at IS NULL`) — none by then. So the
/// compaction summary of the conversation the user asked to forget stays in the database (as
/// do the summaries of every session ended by `/reset` or the idle reset), although the user is
/// told "our past conversations are deleted". Now `/forget` clears the summaries of every
/// session of the user.
#[tokio::test]
async fn forget_deletes_the_summaries_of_past_conversations() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moltmate.db");
    let store = Store::open(&path).unwrap();
    let anna = UserId::new("anna").unwrap();
    store.ensure_user(&anna, None).await.unwrap();
    let session = store.current_session(&anna).await.unwrap();
    for text in ["my bank PIN is 4711", "and my doctor said ...", "ok"] {
        let _ = store
            .complete_turn(TurnRecord {
                charge: None,
                inbox_id: inbox_row(&store, &anna).await,
                user: anna.clone(),
                session_id: session.id.clone(),
                items: vec![ConversationItem::User { text: text.into() }],
                reply: None,
                usage: vec![],
            })
            .await
            .unwrap();
    }
    let rows = store.transcript(&session.id).await.unwrap();
    // Compaction summarised the first two rows.
    store
        .archive_before(
            &session.id,
            "Anna's bank PIN is 4711; her doctor said ...",
            rows[2].0,
        )
        .await
        .unwrap();
    // An earlier conversation ended by `/reset` with its summary.
    store.end_session(&anna).await.unwrap();
    let later = store.current_session(&anna).await.unwrap();
    store
        .archive_before(&later.id, "Anna's new address is ...", i64::MAX)
        .await
        .unwrap();
    // `/forget yes`, as the worker runs it.
    store.end_session(&anna).await.unwrap();
    store.forget_transcripts(&anna).await.unwrap();
    let connection = rusqlite::Connection::open(&path).unwrap();
    let kept: Vec<String> = connection
        .prepare("SELECT summary FROM sessions WHERE summary IS NOT NULL")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(kept.is_empty(), "kept after /forget: {kept:?}");
}

/// Regression: every accepted message kept its text in `inbox` and every Telegram reply its whole text in
/// `outbox`, forever: nothing prunes answered rows (only `users reset/remove` delete them),
/// `/forget` leaves them, and neither counts towards `transcriptMb` (`user_storage` is kept
/// from `transcript` only). The outbox row also holds the reply *unshrunk* — all assistant
/// texts of all tool rounds joined — while `storedKbPerTurn` only shortens the transcript
/// items. So a stranger's 32 MB `transcriptMb` bounds nothing of this: ~100 messages a day of
/// up to 16,000 characters, each answered with up to 8 model answers of text, accumulate
/// without end, and all of it survived `/forget`. Now an inbox row's text is cleared when it
/// is answered and an outbox row's when it is claimed for sending (triggers, so every path
/// that finishes a row does it); `/forget` clears what an older release left; the rows
/// themselves are pruned after `ANSWERED_ROW_RETENTION`.
#[tokio::test]
async fn answered_messages_and_sent_replies_keep_no_text() {
    use moltmate_core::channel::InboundMessage;
    use moltmate_core::{ChannelKind, Identity, PeerId};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moltmate.db");
    let store = Store::open(&path).unwrap();
    let anna = UserId::new("anna").unwrap();
    store.ensure_user(&anna, None).await.unwrap();
    let session = store.current_session(&anna).await.unwrap();
    let secret = "my bank PIN is 4711 ".repeat(800); // 16,000 characters
    let inbox_id = store
        .insert_inbound(
            &InboundMessage {
                attachments: Vec::new(),
                sender: Identity::new(ChannelKind::Telegram, PeerId::new("42").unwrap()),
                chat_id: "42".into(),
                external_id: "1".into(),
                cursor: None,
                text: secret.clone(),
                sender_name: None,
                language_code: None,
            },
            &anna,
        )
        .await
        .unwrap()
        .unwrap();
    let reply = "noted: 4711. ".repeat(20_000); // 260 KB, all rounds' texts joined
    let _ = store
        .complete_turn(TurnRecord {
            charge: None,
            inbox_id,
            user: anna.clone(),
            session_id: session.id.clone(),
            items: vec![ConversationItem::User {
                text: "(shrunk for storage)".into(),
            }],
            reply: Some((ChannelKind::Telegram, "42".into(), reply.clone())),
            usage: vec![],
        })
        .await
        .unwrap();
    let connection = rusqlite::Connection::open(&path).unwrap();
    let texts = |connection: &rusqlite::Connection| -> (i64, i64) {
        connection
            .query_row(
                "SELECT (SELECT COALESCE(SUM(length(text)), 0) FROM inbox WHERE user_id = 'anna'),
                        (SELECT COALESCE(SUM(length(text)), 0) FROM outbox WHERE user_id = 'anna')",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
    };
    // Answered: the message text is gone; the reply waits for its delivery with its text.
    assert_eq!(texts(&connection), (0, reply.len() as i64));
    // Delivery, as the gateway runs it: the pending row is read, claimed, sent.
    let pending = store.pending_outbox(10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].text, reply);
    assert!(store.claim_outbox(pending[0].id).await.unwrap());
    assert_eq!(
        texts(&connection),
        (0, 0),
        "claimed: nothing needs the text any more"
    );
    store
        .set_outbox_state(pending[0].id, "sent", None)
        .await
        .unwrap();
    // A message still waiting keeps its text (it has not been answered yet).
    let waiting = store
        .insert_inbound(
            &InboundMessage {
                attachments: Vec::new(),
                sender: Identity::new(ChannelKind::Telegram, PeerId::new("42").unwrap()),
                chat_id: "42".into(),
                external_id: "2".into(),
                cursor: None,
                text: "still to answer".into(),
                sender_name: None,
                language_code: None,
            },
            &anna,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(texts(&connection).0, "still to answer".len() as i64);
    // Rows an older release left with their texts are cleared by /forget.
    connection
        .execute(
            "INSERT INTO outbox (inbox_id, user_id, channel, chat_id, text, state, created_at, updated_at)
             VALUES (NULL, 'anna', 'telegram', '42', 'old reply 4711', 'failed', 0, 0)",
            [],
        )
        .unwrap();
    store.end_session(&anna).await.unwrap();
    store.forget_transcripts(&anna).await.unwrap();
    let counted = store.transcript_bytes(&anna).await.unwrap();
    assert_eq!(store.pending_inbox_count(&anna).await.unwrap(), 1);
    let _ = store
        .finish_inbox_with_reply(waiting, &anna, None)
        .await
        .unwrap();
    let kept: i64 = connection
        .query_row(
            "SELECT (SELECT COALESCE(SUM(length(text)), 0) FROM inbox WHERE user_id = 'anna')
                  + (SELECT COALESCE(SUM(length(text)), 0) FROM outbox WHERE user_id = 'anna')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        kept == 0,
        "after /forget {kept} bytes of anna's messages and replies are still stored, counted as {counted} against her cap"
    );
}

/// The rows themselves (without texts) are deleted after `ANSWERED_ROW_RETENTION`, with the
/// user's next answered message, so what a user leaves in the inbox and outbox is bounded by
/// what they can send in that time.
#[tokio::test]
async fn answered_rows_are_pruned_after_the_retention() {
    use moltmate_core::channel::InboundMessage;
    use moltmate_core::{ChannelKind, Identity, PeerId};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moltmate.db");
    let store = Store::open(&path).unwrap();
    let anna = UserId::new("anna").unwrap();
    store.ensure_user(&anna, None).await.unwrap();
    let mut ids = Vec::new();
    for n in 0..3 {
        let id = store
            .insert_inbound(
                &InboundMessage {
                    attachments: Vec::new(),
                    sender: Identity::new(ChannelKind::Telegram, PeerId::new("42").unwrap()),
                    chat_id: "42".into(),
                    external_id: format!("{n}"),
                    cursor: None,
                    text: format!("message {n}"),
                    sender_name: None,
                    language_code: None,
                },
                &anna,
            )
            .await
            .unwrap()
            .unwrap();
        ids.push(id);
    }
    let reply = store
        .finish_inbox_with_reply(
            ids[0],
            &anna,
            Some((ChannelKind::Telegram, "42".into(), "old".into())),
        )
        .await
        .unwrap()
        .outbox()
        .unwrap();
    assert!(store.claim_outbox(reply).await.unwrap());
    let connection = rusqlite::Connection::open(&path).unwrap();
    let old = chrono::Utc::now().timestamp_millis()
        - moltmate_store::usage::ANSWERED_ROW_RETENTION.as_millis() as i64
        - 1_000;
    connection
        .execute("UPDATE inbox SET done_at = ?1 WHERE id = ?2", (old, ids[0]))
        .unwrap();
    connection
        .execute(
            "UPDATE outbox SET updated_at = ?1 WHERE id = ?2",
            (old, reply),
        )
        .unwrap();
    let _ = store
        .finish_inbox_with_reply(ids[1], &anna, None)
        .await
        .unwrap();
    let rows: (i64, i64) = connection
        .query_row(
            "SELECT (SELECT COUNT(*) FROM inbox), (SELECT COUNT(*) FROM outbox)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    // ids[1] (answered now) and ids[2] (pending) stay; the old row and its reply are gone.
    assert_eq!(rows, (2, 0));
}

/// A fresh inbox row of `user` for a turn to complete (a turn whose inbox row is gone commits
/// nothing, as for a user removed meanwhile).
async fn inbox_row(store: &moltmate_store::Store, user: &moltmate_core::UserId) -> i64 {
    use moltmate_core::channel::InboundMessage;
    use moltmate_core::{ChannelKind, Identity, PeerId};
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    store
        .insert_inbound(
            &InboundMessage {
                attachments: Vec::new(),
                sender: Identity::new(ChannelKind::Telegram, PeerId::new("42").unwrap()),
                chat_id: "42".into(),
                external_id: format!("turn-{n}"),
                cursor: None,
                text: "x".into(),
                sender_name: None,
                language_code: None,
            },
            user,
        )
        .await
        .unwrap()
        .unwrap()
}
