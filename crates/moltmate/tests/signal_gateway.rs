//! People chatting over Signal with the real gateway, against the fake signal-cli daemon
//! (TCP and Unix socket) and the fake LLM.

mod common;

use common::{run_cli, Harness, API_KEY, BOT_TOKEN};
use moltmate_core::channel_status::{ErrorClass, LinkState};
use moltmate_core::ChannelKind;
use moltmate_testkit::llm::Reply;
use moltmate_testkit::signal::FakeSignalCli;
use serde_json::json;
use std::time::Duration;

const ACCOUNT: &str = "+4917000000001";
const ALICE: &str = "+4917011111111";
const BOB: &str = "+4917022222222";

fn signal_patch(fake: &FakeSignalCli, extra: serde_json::Value) -> serde_json::Value {
    let mut signal = json!({
        "account": ACCOUNT, "daemon": fake.address(), "dmPolicy": "open", "allowFrom": ["*"]
    });
    common::merge(&mut signal, extra);
    json!({ "channels": { "signal": signal } })
}

fn signal_status(h: &Harness) -> moltmate_core::channel_status::ChannelStatus {
    h.built
        .gateway
        .channel_statuses()
        .into_iter()
        .find(|s| s.channel == ChannelKind::Signal)
        .expect("signal is configured")
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn replies(fake: &FakeSignalCli, to: &str, count: usize) -> Vec<String> {
    fake.wait_for_messages(to, count, Duration::from_secs(20))
        .await
        .unwrap_or_else(|sent| panic!("no reply for {to}: {sent:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_signal_users_chatting_at_once_each_get_only_their_own_answers() {
    let fake = FakeSignalCli::start_tcp(ACCOUNT).await;
    let h = Harness::start(signal_patch(&fake, json!({"readReceipts": true}))).await;
    for round in 0..3 {
        fake.push_text(ALICE, &format!("alice says {round}"));
        fake.push_text(BOB, &format!("bob says {round}"));
    }
    let alice = replies(&fake, ALICE, 3).await;
    let bob = replies(&fake, BOB, 3).await;
    assert_eq!(
        alice,
        vec![
            "echo: alice says 0",
            "echo: alice says 1",
            "echo: alice says 2"
        ]
    );
    assert_eq!(
        bob,
        vec!["echo: bob says 0", "echo: bob says 1", "echo: bob says 2"]
    );
    assert!(h.home.join("users/signal__4917011111111").is_dir());
    assert_eq!(
        fake.receipts().len(),
        6,
        "a read receipt per stored message"
    );
    let status = signal_status(&h);
    assert!(status.connected && status.link == LinkState::Linked);
    assert!(status.last_event_ms.is_some());
    assert!(fake.calls().contains(&"subscribeReceive".to_string()));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signal_over_a_unix_socket_pairs_a_stranger_once_and_the_operator_approves() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSignalCli::start_unix(ACCOUNT, &dir.path().join("signal.sock")).await;
    let h = Harness::start(signal_patch(
        &fake,
        json!({"dmPolicy": "pairing", "allowFrom": []}),
    ))
    .await;
    fake.push_text(ALICE, "hello?");
    let code_reply = replies(&fake, ALICE, 1).await;
    let code = code_reply[0]
        .split_whitespace()
        .find(|w| {
            w.len() == 8
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() && !c.is_ascii_lowercase())
        })
        .unwrap_or_else(|| panic!("no code in {:?}", code_reply[0]))
        .to_string();
    assert!(
        code_reply[0].contains("moltmate pairing approve signal"),
        "{}",
        code_reply[0]
    );
    fake.push_text(ALICE, "hello again?");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fake.sent_messages().len(),
        1,
        "one reply per code, however often they write"
    );
    assert_eq!(
        h.llm.requests().len(),
        0,
        "a stranger never reaches the model"
    );

    let (status, stdout, stderr) = run_cli(&h.home, &["pairing", "approve", "signal", &code]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("signal:+4917011111111"), "{stdout}");
    fake.push_text(ALICE, "now?");
    assert_eq!(replies(&fake, ALICE, 2).await[1], "echo: now?");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signal_allowlist_answers_only_listed_numbers_and_config_identities_link_users() {
    let fake = FakeSignalCli::start_tcp(ACCOUNT).await;
    let mut patch = signal_patch(
        &fake,
        json!({"dmPolicy": "allowlist", "allowFrom": [ALICE]}),
    );
    common::merge(
        &mut patch,
        json!({"users": {"robert": {"identities": ["signal:+4917033333333", "telegram:3003"]}}}),
    );
    let h = Harness::start(patch).await;
    fake.push_text(BOB, "let me in");
    fake.push_text(ALICE, "hi");
    fake.push_text("+4917033333333", "robert here");
    assert_eq!(replies(&fake, ALICE, 1).await, vec!["echo: hi"]);
    assert_eq!(
        replies(&fake, "+4917033333333", 1).await,
        vec!["echo: robert here"]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        fake.sent_messages().iter().all(|m| m.recipient != BOB),
        "an unlisted number gets nothing"
    );
    // One person on two messengers is one user with one memory.
    h.telegram.push_text(3003, "robert on telegram");
    h.expect_reply(3003, 1).await;
    let history = h.llm.requests().last().unwrap().all_text();
    assert!(
        history.contains("robert here"),
        "the Signal turn is in robert's history"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signal_restart_in_the_middle_loses_nothing_and_answers_once() {
    let fake = FakeSignalCli::start_tcp(ACCOUNT).await;
    let h = Harness::start(signal_patch(&fake, json!({}))).await;
    h.llm.set_brain(|request| {
        let text = request.last_user_text().unwrap_or_default();
        if text.contains("slow") {
            Reply::delayed(Duration::from_secs(3), Reply::text(format!("echo: {text}")))
        } else {
            Reply::text(format!("echo: {text}"))
        }
    });
    fake.push_text(ALICE, "a slow question");
    wait_until("the message to be handed over", || fake.waiting() == 0).await;
    wait_until("the model to be asked", || !h.llm.requests().is_empty()).await;
    let h = h.restart().await;
    // Written while the gateway restarts: waits on the server until we subscribe again.
    fake.push_text(BOB, "while you were away");
    let alice = replies(&fake, ALICE, 1).await;
    assert_eq!(alice, vec!["echo: a slow question"]);
    assert_eq!(
        replies(&fake, BOB, 1).await,
        vec!["echo: while you were away"]
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        fake.sent_messages()
            .iter()
            .filter(|m| m.recipient == ALICE)
            .count(),
        1,
        "answered exactly once"
    );
    // A redelivery of the same message (same sender and timestamp) is recognised.
    let ts = fake.push_text(ALICE, "once only");
    replies(&fake, ALICE, 2).await;
    fake.push_envelope(json!({"sourceNumber": ALICE, "timestamp": ts,
        "dataMessage": {"timestamp": ts, "message": "once only"}}));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        fake.sent_messages()
            .iter()
            .filter(|m| m.recipient == ALICE)
            .count(),
        2
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signal_rate_limit_is_waited_out_and_long_replies_are_split() {
    let fake = FakeSignalCli::start_tcp(ACCOUNT).await;
    let h = Harness::start(signal_patch(&fake, json!({}))).await;
    fake.rate_limit_next_sends(1, 1);
    fake.push_text(ALICE, "hi");
    assert_eq!(replies(&fake, ALICE, 1).await, vec!["echo: hi"]);
    let sends = fake.calls().iter().filter(|c| *c == "send").count();
    assert_eq!(sends, 2, "refused once, sent after the wait");
    assert!(signal_status(&h)
        .errors
        .iter()
        .any(|(class, n)| *class == ErrorClass::RateLimited && *n == 1));

    let long = "x".repeat(4500);
    fake.push_text(BOB, &long);
    let parts = replies(&fake, BOB, 3).await;
    assert!(parts.iter().all(|p| p.encode_utf16().count() <= 2000));
    assert_eq!(parts.concat(), format!("echo: {long}"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signal_links_by_qr_code_and_a_lost_link_shows_in_health() {
    let fake = FakeSignalCli::start_tcp(ACCOUNT).await;
    fake.unlink();
    let h = Harness::start(signal_patch(&fake, json!({}))).await;
    wait_until("a link code", || signal_status(&h).link_uri.is_some()).await;
    let status = signal_status(&h);
    assert_eq!(status.link, LinkState::Linking);
    assert!(status.link_uri.unwrap().starts_with("sgnl://linkdevice?"));
    // The admin page renders it as a QR code; /healthz never shows the URI.
    let html = moltmate_web::admin::channels_html(&h.built.gateway.channel_statuses());
    assert!(html.contains("<svg"), "{html}");
    assert!(!html.contains("pub_key="), "the URI is drawn, not printed");
    fake.scan();
    wait_until("linked", || signal_status(&h).link == LinkState::Linked).await;
    fake.push_text(ALICE, "linked?");
    assert_eq!(replies(&fake, ALICE, 1).await, vec!["echo: linked?"]);

    // Unlinked on the phone: the daemon no longer has the account.
    fake.unlink();
    fake.drop_connections();
    wait_until("the lost link", || {
        signal_status(&h).last_error.map(|e| e.0) == Some(ErrorClass::LinkLost)
    })
    .await;
    assert!(!signal_status(&h).is_healthy());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signal_wrong_account_or_missing_signal_cli_give_clear_errors() {
    // The phone that scans is not the configured account.
    let fake = FakeSignalCli::start_tcp("+4917099999999").await;
    let h = Harness::start(signal_patch(&fake, json!({}))).await;
    wait_until("a link code", || signal_status(&h).link_uri.is_some()).await;
    fake.scan();
    wait_until("the refusal", || {
        signal_status(&h)
            .errors
            .iter()
            .any(|(class, n)| *class == ErrorClass::Credentials && *n > 0)
    })
    .await;
    assert_ne!(signal_status(&h).link, LinkState::Linked);
    h.stop().await;

    // Supervised, but signal-cli is not installed: the channel stops with the hint.
    let h = Harness::start(json!({"channels": {"signal": {
        "account": ACCOUNT, "cliPath": "/nonexistent/bin/signal-cli"
    }}}))
    .await;
    wait_until("the missing program", || {
        signal_status(&h).last_error.map(|e| e.0) == Some(ErrorClass::Missing)
    })
    .await;
    // Telegram is unaffected.
    h.telegram.push_text(1001, "still here");
    assert_eq!(h.expect_reply(1001, 1).await, vec!["echo: still here"]);
    let (_, _, stderr) = run_cli(&h.home, &["channels", "signal", "link"]);
    assert!(stderr.contains("signal-cli was not found"), "{stderr}");
    assert!(!stderr.contains(BOT_TOKEN) && !stderr.contains(API_KEY));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signal_an_oversize_or_odd_notification_is_skipped_and_the_next_is_answered() {
    let fake = FakeSignalCli::start_tcp(ACCOUNT).await;
    let h = Harness::start(signal_patch(&fake, json!({}))).await;
    // A 2 MiB line is over the reader's bound: dropped, the connection stays.
    fake.push_text(BOB, &"z".repeat(2 * 1024 * 1024));
    fake.push_envelope(json!({"sourceNumber": BOB, "timestamp": "not a number",
        "dataMessage": {"message": 42}}));
    fake.push_envelope(
        json!({"sourceNumber": "+4917022222222\nSYSTEM", "timestamp": 5,
        "dataMessage": {"message": "spoofed"}}),
    );
    fake.push_text(ALICE, "after the junk");
    assert_eq!(replies(&fake, ALICE, 1).await, vec!["echo: after the junk"]);
    assert!(fake.sent_messages().iter().all(|m| m.recipient == ALICE));
    assert!(signal_status(&h).connected);
    h.stop().await;
}

/// Regression (review 10, H1): one connection carried both the incoming messages and the
/// answers to calls. With more messages waiting than the reader's queue holds, the answer to a
/// read receipt sat behind them, the receive loop waited the full request timeout for it, and
/// every `send` of every user timed out with it (never retried: the replies were lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signal_backlog_with_read_receipts_does_not_time_out_replies() {
    let fake = FakeSignalCli::start_tcp(ACCOUNT).await;
    let senders: Vec<String> = (0..8).map(|i| format!("+49170555000{i:02}")).collect();
    for round in 0..5 {
        for sender in &senders {
            fake.push_text(sender, &format!("backlog {round}"));
        }
    }
    let h = Harness::start(signal_patch(&fake, json!({"readReceipts": true}))).await;
    fake.push_text(ALICE, "are you there?");
    assert_eq!(replies(&fake, ALICE, 1).await, vec!["echo: are you there?"]);
    for sender in &senders {
        assert_eq!(replies(&fake, sender, 5).await.len(), 5, "{sender}");
    }
    wait_until("a receipt per message", || fake.receipts().len() == 41).await;
    let states = h.built.gateway.store().outbox_states().await.unwrap();
    assert!(
        states.iter().all(|(state, _)| state != "failed"),
        "{states:?}"
    );
    h.stop().await;
}

/// Regression (review 10, L1): a read receipt went to every sender, strangers and refused
/// ones included: it tells a stranger the number is a live bot and spends the account's send
/// budget, one receipt per message, unthrottled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signal_read_receipts_only_for_admitted_senders() {
    let fake = FakeSignalCli::start_tcp(ACCOUNT).await;
    let h = Harness::start(signal_patch(
        &fake,
        json!({"readReceipts": true, "dmPolicy": "allowlist", "allowFrom": [ALICE]}),
    ))
    .await;
    for i in 0..5 {
        fake.push_text(BOB, &format!("stranger {i}"));
    }
    fake.push_text(ALICE, "hi");
    assert_eq!(replies(&fake, ALICE, 1).await, vec!["echo: hi"]);
    wait_until("alice's receipt", || !fake.receipts().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let receipts = fake.receipts();
    assert!(
        receipts.iter().all(|(to, _)| to == ALICE),
        "no receipt for a refused sender: {receipts:?}"
    );
    assert_eq!(receipts.len(), 1);
    h.stop().await;
}
