//! Users chatting over Telegram with the real gateway, against the fake Bot API and fake LLM.

mod common;

use common::{Harness, API_KEY, BOT_TOKEN};
use moltmate_testkit::llm::Reply;
use moltmate_testkit::telegram::IncomingText;
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_users_chatting_at_once_each_get_only_their_own_answers() {
    let h = Harness::start(json!({})).await;
    for round in 0..3 {
        h.telegram.push_text(1001, &format!("alice says {round}"));
        h.telegram.push_text(2002, &format!("bob says {round}"));
    }
    let alice = h.expect_reply(1001, 3).await;
    let bob = h.expect_reply(2002, 3).await;
    assert_eq!(
        alice,
        vec![
            "echo: alice says 0",
            "echo: alice says 1",
            "echo: alice says 2"
        ],
        "in order, only her own"
    );
    assert_eq!(
        bob,
        vec!["echo: bob says 0", "echo: bob says 1", "echo: bob says 2"]
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_users_model_requests_hold_only_their_own_files_and_history() {
    let h = Harness::start(json!({})).await;
    h.telegram.push_text(1001, "hello from alice");
    h.telegram.push_text(2002, "hello from bob");
    h.expect_reply(1001, 1).await;
    h.expect_reply(2002, 1).await;
    std::fs::write(
        h.home.join("users/telegram_1001/MEMORY.md"),
        "alice-secret: her cat is called Miso",
    )
    .unwrap();
    std::fs::write(
        h.home.join("users/telegram_2002/MEMORY.md"),
        "bob-secret: his bank is Sparkasse",
    )
    .unwrap();
    h.llm.clear_requests();
    h.telegram.push_text(1001, "second from alice");
    h.telegram.push_text(2002, "second from bob");
    h.expect_reply(1001, 2).await;
    h.expect_reply(2002, 2).await;

    let requests = h.llm.requests();
    assert_eq!(requests.len(), 2);
    for request in requests {
        let everything = request.all_text();
        let is_alice = everything.contains("second from alice");
        let (own, other) = if is_alice {
            ("alice", "bob")
        } else {
            ("bob", "alice")
        };
        assert!(
            everything.contains(&format!("{own}-secret")),
            "{own}'s memory is in {own}'s prompt"
        );
        assert!(
            everything.contains(&format!("hello from {own}")),
            "{own}'s history is in {own}'s request"
        );
        assert!(
            !everything.contains(&format!("{other}-secret")),
            "{other}'s memory leaked into {own}'s request"
        );
        assert!(
            !everything.contains(&format!("from {other}")),
            "{other}'s history leaked into {own}'s request"
        );
        assert!(
            !everything.contains(BOT_TOKEN) && !everything.contains(API_KEY),
            "a secret reached the model"
        );
        assert_eq!(
            request.header("x-api-key"),
            Some(API_KEY),
            "the key travels only in its header"
        );
    }
    h.stop().await;
}

/// From the third turn on, a request's history comes from the user's kept wire forms (each
/// stored row encoded once, see ARCHITECTURE "A stored row's wire form is made once"). Two
/// users taking turns: every request holds exactly its own user's conversation so far, in
/// order, as valid JSON, and nothing of the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_from_kept_wire_forms_hold_exactly_each_users_own_history() {
    let h = Harness::start(json!({})).await;
    for round in 0..5 {
        h.llm.clear_requests();
        h.telegram
            .push_text(1001, &format!("alice \"quoted\" {round}"));
        h.expect_reply(1001, round + 1).await;
        h.telegram.push_text(2002, &format!("bob\n{round}"));
        h.expect_reply(2002, round + 1).await;
        let requests = h.llm.requests();
        assert_eq!(requests.len(), 2);
        for (request, own, other) in [
            (&requests[0], "alice \"quoted\" ", "bob"),
            (&requests[1], "bob\n", "alice"),
        ] {
            assert!(serde_json::from_str::<serde_json::Value>(&request.raw_body).is_ok());
            let said: Vec<String> = request
                .messages()
                .iter()
                .flat_map(|m| {
                    let role = m["role"].as_str().unwrap_or("").to_string();
                    // A message of one text block goes as the API's string shorthand.
                    let blocks = match &m["content"] {
                        serde_json::Value::String(text) => {
                            vec![json!({"type": "text", "text": text})]
                        }
                        content => content.as_array().cloned().unwrap_or_default(),
                    };
                    blocks.into_iter().map(move |block| {
                        format!("{role}: {}", block["text"].as_str().unwrap_or(""))
                    })
                })
                .collect();
            let expected: Vec<String> = (0..=round)
                .flat_map(|n| {
                    let text = format!("{own}{n}");
                    let mut turn = vec![format!("user: {text}")];
                    if n < round {
                        turn.push(format!("assistant: echo: {text}"));
                    }
                    turn
                })
                .collect();
            assert_eq!(said, expected, "round {round}");
            assert!(
                !request.raw_body.contains(other),
                "round {round}: {other} leaked"
            );
        }
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_model_call_for_one_user_does_not_delay_another() {
    let h = Harness::start(json!({})).await;
    h.llm.set_brain(|request| {
        let text = request.last_user_text().unwrap_or_default();
        if text.contains("slow") {
            Reply::delayed(Duration::from_secs(30), Reply::text("finally"))
        } else {
            Reply::text(format!("echo: {text}"))
        }
    });
    h.telegram.push_text(1001, "a slow question");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    h.telegram.push_text(2002, "quick one");
    assert_eq!(h.expect_reply(2002, 1).await, vec!["echo: quick one"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bob waited {:?} behind alice's stuck model",
        started.elapsed()
    );
    assert!(
        h.telegram
            .sent_messages()
            .iter()
            .all(|m| m.chat_id != "1001"),
        "alice is still waiting"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_users_messages_are_answered_strictly_in_order_even_when_the_first_is_slow() {
    let h = Harness::start(json!({})).await;
    h.llm.set_brain(|request| {
        let text = request.last_user_text().unwrap_or_default();
        let delay = if text == "first" { 1500 } else { 0 };
        Reply::delayed(
            Duration::from_millis(delay),
            Reply::text(format!("echo: {text}")),
        )
    });
    h.telegram.push_text(1001, "first");
    h.telegram.push_text(1001, "second");
    assert_eq!(
        h.expect_reply(1001, 2).await,
        vec!["echo: first", "echo: second"]
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pairing_gives_unknown_senders_a_code_and_nothing_else_until_approved() {
    let h = Harness::start(
        json!({ "channels": { "telegram": { "dmPolicy": "pairing", "allowFrom": [] } } }),
    )
    .await;
    h.telegram
        .push_message(IncomingText::new(3003, "let me in").first_name("Eve"));
    let reply = h.expect_reply(3003, 1).await;
    let code = reply[0]
        .split_whitespace()
        .find(|w| {
            w.len() == 8
                && w.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        })
        .unwrap_or_else(|| panic!("no pairing code in {reply:?}"))
        .to_string();
    h.telegram.push_text(3003, "hello?");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        h.llm.request_count(),
        0,
        "an unpaired sender reached the model"
    );

    let (status, stdout, stderr) = common::run_cli(&h.home, &["pairing", "list"]);
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.contains(&code) && stdout.contains("telegram:3003") && stdout.contains("Eve"),
        "{stdout}"
    );
    let (status, stdout, stderr) =
        common::run_cli(&h.home, &["pairing", "approve", "telegram", &code]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("telegram_3003"), "{stdout}");

    h.telegram.push_text(3003, "now?");
    // The code came once: "hello?" while it was pending got no second reply.
    let replies = h.expect_reply(3003, 2).await;
    assert_eq!(replies.last().map(String::as_str), Some("echo: now?"));
    let (status, _, stderr) = common::run_cli(&h.home, &["pairing", "approve", "telegram", &code]);
    assert!(
        !status.success() && stderr.contains("already"),
        "codes are single use: {stderr}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allowlist_answers_listed_senders_and_drops_everyone_else() {
    let h = Harness::start(
        json!({ "channels": { "telegram": { "dmPolicy": "allowlist", "allowFrom": ["1001"] } } }),
    )
    .await;
    h.telegram.push_text(4004, "intruder");
    h.telegram.push_text(1001, "friend");
    assert_eq!(h.expect_reply(1001, 1).await, vec!["echo: friend"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        h.telegram
            .sent_messages()
            .iter()
            .all(|m| m.chat_id != "4004"),
        "a refused sender got an answer"
    );
    assert_eq!(
        h.llm.request_count(),
        1,
        "only the allowed sender reached the model"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disabled_policy_answers_nobody_but_still_confirms_updates() {
    let h = Harness::start(json!({ "channels": { "telegram": { "dmPolicy": "disabled" } } })).await;
    let update = h.telegram.push_text(1001, "anyone?");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.telegram.get_updates_offsets().contains(&Some(update + 1)) {
        assert!(
            Instant::now() < deadline,
            "the refused update was never confirmed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(h.telegram.sent_messages().is_empty());
    assert_eq!(h.llm.request_count(), 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_every_model_fails_the_user_gets_a_short_clear_message_without_secrets() {
    let h = Harness::start(json!({})).await;
    h.llm
        .set_brain(|_| Reply::api_error(500, "upstream exploded"));
    h.telegram.push_text(1001, "hello?");
    let reply = h.expect_reply(1001, 1).await.remove(0);
    assert!(reply.len() < 200, "{reply}");
    for forbidden in [
        API_KEY,
        BOT_TOKEN,
        "127.0.0.1",
        "http",
        "panicked",
        "upstream exploded",
    ] {
        assert!(!reply.contains(forbidden), "{forbidden:?} in {reply:?}");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tool_call_runs_for_the_calling_user_and_is_audited() {
    let h = Harness::start(json!({})).await;
    h.llm.set_brain(|request| {
        if let Some(result) = request.trailing_tool_results() {
            return Reply::text(format!("tool said: {result}"));
        }
        Reply::tool_call(
            "write",
            json!({ "path": "notes/todo.md", "content": "buy milk" }),
        )
    });
    h.telegram.push_text(1001, "remember to buy milk");
    let reply = h.expect_reply(1001, 1).await.remove(0);
    assert!(reply.starts_with("tool said:"), "{reply}");
    let written =
        std::fs::read_to_string(h.home.join("users/telegram_1001/notes/todo.md")).unwrap();
    assert_eq!(written, "buy milk");
    let audit = h.built.store.recent_audit(None, 10).await.unwrap();
    let call = audit
        .iter()
        .find(|a| a.kind == "tool_call")
        .expect("tool call audited");
    assert_eq!(
        (
            call.user.as_str(),
            call.tool.as_deref(),
            call.outcome.as_str()
        ),
        ("telegram_1001", Some("write"), "ok")
    );
    assert!(call.args_digest.as_ref().is_some_and(|d| d.len() == 64));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_usage_is_recorded_per_user_and_model() {
    let h = Harness::start(json!({})).await;
    h.telegram.push_text(1001, "count me");
    h.expect_reply(1001, 1).await;
    let usage = h.built.store.usage(None).await.unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!(
        (
            usage[0].user.as_str(),
            usage[0].provider.as_str(),
            usage[0].model.as_str()
        ),
        ("telegram_1001", "fake", "test-model")
    );
    assert!(usage[0].input_tokens > 0 && usage[0].output_tokens > 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_answers_arrive_split_at_telegrams_limit_and_in_order() {
    let h = Harness::start(json!({})).await;
    let long: String = (0..1200).map(|i| format!("word{i} ")).collect();
    let expected = long.clone();
    h.llm.set_brain(move |_| Reply::text(expected.clone()));
    h.telegram.push_text(1001, "tell me everything");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let parts: Vec<String> = h
            .telegram
            .sent_messages()
            .into_iter()
            .filter(|m| m.chat_id == "1001")
            .map(|m| m.text)
            .collect();
        // The splitter cuts at a space and may drop it, so compare words, not bytes.
        let joined = parts.join(" ");
        if joined.split_whitespace().count() == 1200 {
            assert!(parts.len() >= 2 && parts.iter().all(|p| p.encode_utf16().count() <= 4096));
            assert_eq!(
                joined.split_whitespace().collect::<Vec<_>>(),
                long.split_whitespace().collect::<Vec<_>>()
            );
            break;
        }
        assert!(Instant::now() < deadline, "answer never arrived whole");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn typing_is_shown_only_while_a_reply_takes_longer_than_a_moment() {
    let h = Harness::start(json!({})).await;
    h.llm.set_brain(|request| {
        let text = request.last_user_text().unwrap_or_default();
        if text.contains("slow") {
            Reply::delayed(Duration::from_millis(2500), Reply::text("thought it over"))
        } else {
            Reply::text(format!("echo: {text}"))
        }
    });
    h.telegram.push_text(1001, "quick one");
    assert_eq!(h.expect_reply(1001, 1).await, vec!["echo: quick one"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        h.telegram.chat_actions().is_empty(),
        "a quick reply needs no typing indicator (one Bot API call saved per message)"
    );
    h.telegram.push_text(2002, "a slow question");
    assert_eq!(h.expect_reply(2002, 1).await, vec!["thought it over"]);
    let actions = h.telegram.chat_actions();
    assert!(
        !actions.is_empty() && actions.iter().all(|a| a.chat_id == "2002"),
        "the slow reply was announced as typing, in its own chat only: {actions:?}"
    );
    h.stop().await;
}
