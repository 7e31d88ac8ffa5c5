//! Hostile strangers on Telegram: hundreds of unknown senders writing again and again, while a
//! let-in user keeps chatting. What strangers cost stays bounded (replies, rows, log lines,
//! memory), and the bystander is answered within 2× their normal time + 500 ms.

mod common;

use common::{bystander_bound, rss_bytes, Harness};
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const BYSTANDER: i64 = 1001;
const STRANGERS: i64 = 200;
const MESSAGES_EACH: usize = 30;
/// The default `channels.telegram.maxPendingPairings`.
const TELEGRAM_PAIRING_CAP: usize = 50;

fn stranger(i: i64) -> i64 {
    500_000 + i
}

/// Every stranger writes `MESSAGES_EACH` times, round by round (one message each per round:
/// 200 updates ahead of the bystander in Telegram's one update stream); the bystander checks
/// in after every round. Returns once every stranger update has been taken off the queue.
async fn flood(h: &Harness, normal: Duration, what: &str) {
    let bound = bystander_bound(normal);
    let mut slowest = Duration::ZERO;
    for round in 0..MESSAGES_EACH {
        for i in 0..STRANGERS {
            h.telegram
                .push_text(stranger(i), &format!("let me in, round {round}"));
        }
        let (reply, took) = h
            .round_trip(BYSTANDER, &format!("still there? ({what}, round {round})"))
            .await;
        assert!(
            took <= bound,
            "{what}, round {round}: bystander answered in {took:?}, over the bound {bound:?} (normal {normal:?}); reply {reply:?}"
        );
        slowest = slowest.max(took);
    }
    // Every stranger update was ahead of the bystander's last message, so all are accepted;
    // the last batch is confirmed to Telegram with the next poll.
    let deadline = Instant::now() + Duration::from_secs(20);
    while h.telegram.pending_updates() > 0 {
        assert!(Instant::now() < deadline, "the flood was never confirmed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "{what}: bystander normal {normal:?}, slowest under the flood {slowest:?} (bound {bound:?})"
    );
}

fn replies_per_stranger(h: &Harness) -> HashMap<String, usize> {
    let mut replies = HashMap::new();
    for message in h.telegram.sent_messages() {
        if message.chat_id != BYSTANDER.to_string() {
            *replies.entry(message.chat_id).or_insert(0) += 1;
        }
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_strangers_under_pairing_get_one_code_each_up_to_the_cap() {
    // Regression: an unknown sender writing 30 times got 30 replies (30 outbox rows, 30 Bot
    // API calls), and every stranger got a code.
    let h = Harness::start(json!({ "channels": { "telegram": {
        "dmPolicy": "pairing", "allowFrom": [BYSTANDER.to_string()]
    } } }))
    .await;
    let normal = h.bystander_baseline(BYSTANDER, 3).await;
    let rss_before = rss_bytes();

    flood(&h, normal, "pairing flood").await;

    // Replies are handed to Telegram by background tasks: wait for the last of them.
    let deadline = Instant::now() + Duration::from_secs(20);
    while replies_per_stranger(&h).values().sum::<usize>() < TELEGRAM_PAIRING_CAP {
        assert!(Instant::now() < deadline, "pairing replies never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let replies = replies_per_stranger(&h);
    assert_eq!(
        replies.len(),
        TELEGRAM_PAIRING_CAP,
        "codes only up to the cap"
    );
    assert!(
        replies.values().all(|n| *n == 1),
        "each stranger with a code got exactly one reply: {replies:?}"
    );
    for message in h.telegram.sent_messages() {
        if message.chat_id != BYSTANDER.to_string() {
            assert!(message.text.contains("pairing code"), "{}", message.text);
        }
    }

    let store = h.built.gateway.store();
    assert_eq!(
        store.pending_pairing_count(None).await.unwrap(),
        TELEGRAM_PAIRING_CAP
    );
    let outbox: i64 = store
        .outbox_states()
        .await
        .unwrap()
        .iter()
        .map(|(_, n)| n)
        .sum();
    let bystander_rounds = 3 + MESSAGES_EACH as i64;
    assert_eq!(
        outbox, bystander_rounds,
        "the bystander's answers; each stranger's one reply is deleted once sent"
    );
    let audit = store.recent_audit(None, 100_000).await.unwrap();
    assert!(audit.is_empty(), "{audit:?}");
    assert_eq!(
        h.llm.request_count() as i64,
        bystander_rounds,
        "no stranger reached the model"
    );
    let grown = rss_bytes().saturating_sub(rss_before);
    eprintln!(
        "pairing flood: {} stranger messages, RSS grew by {} KiB",
        STRANGERS as usize * MESSAGES_EACH,
        grown / 1024
    );
    assert!(
        grown < 32 * 1024 * 1024,
        "RSS grew by {grown} bytes under the flood"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_strangers_under_allowlist_get_nothing_and_leave_bounded_audit_rows() {
    let h = Harness::start(json!({ "channels": { "telegram": {
        "dmPolicy": "allowlist", "allowFrom": [BYSTANDER.to_string()]
    } } }))
    .await;
    let normal = h.bystander_baseline(BYSTANDER, 3).await;
    let rss_before = rss_bytes();

    flood(&h, normal, "allowlist flood").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert!(
        replies_per_stranger(&h).is_empty(),
        "a refused sender got an answer"
    );
    let store = h.built.gateway.store();
    assert_eq!(store.pending_pairing_count(None).await.unwrap(), 0);
    let audit = store.recent_audit(None, 100_000).await.unwrap();
    let refused: Vec<_> = audit
        .iter()
        .filter(|a| a.kind == "access_refused")
        .collect();
    assert_eq!(
        refused.len(),
        moltmate_gateway::strangers::MAX_REFUSED_AUDITS_PER_WINDOW,
        "one row per sender, at most the cap per hour (not one per message)"
    );
    let mut senders: Vec<_> = refused.iter().map(|a| a.user.as_str()).collect();
    senders.sort();
    senders.dedup();
    assert_eq!(senders.len(), refused.len(), "one row per sender");
    let grown = rss_bytes().saturating_sub(rss_before);
    eprintln!(
        "allowlist flood: {} stranger messages, RSS grew by {} KiB",
        STRANGERS as usize * MESSAGES_EACH,
        grown / 1024
    );
    assert!(
        grown < 32 * 1024 * 1024,
        "RSS grew by {grown} bytes under the flood"
    );
    h.stop().await;
}
