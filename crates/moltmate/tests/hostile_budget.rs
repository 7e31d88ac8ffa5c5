//! Hostile users against the per-user caps and budgets, through the real gateway (fake
//! Telegram + fake model): one answer with a hundred big reads, a message flood, budgets that
//! run out (messages, tokens, spend, `exec` time), a full transcript. Each test measures what
//! the attack cost (state directory, RSS, model requests) and, where the attack runs while
//! others chat, that a bystander is still answered within 2× their normal time + 500 ms.

mod common;

use common::{rss_bytes, Harness};
use moltmate_core::model::TokenUsage;
use moltmate_core::{ChannelKind, UserId};
use moltmate_testkit::llm::Reply;
use serde_json::json;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1024 * 1024;

/// The tests of this file run one at a time: they measure the process's RSS, which tests
/// running in parallel threads would share.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Bytes of every file under `path`.
fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => dir_size(&entry.path()),
            Ok(kind) if kind.is_file() => entry.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

fn user(id: &str) -> UserId {
    UserId::new(id).unwrap()
}

/// Today's usage of one user, as the budgets see it.
async fn used_today(h: &Harness, id: &str) -> moltmate_store::UsageTotals {
    let periods = moltmate_gateway::budget::Periods::now();
    h.built
        .store
        .usage_totals(&[user(id)], &periods.day, &periods.month)
        .await
        .unwrap()
}

/// Replies the fake Telegram sent to one chat.
fn replies_to(h: &Harness, chat: i64) -> Vec<String> {
    h.telegram
        .sent_messages()
        .into_iter()
        .filter(|m| m.chat_id == chat.to_string())
        .map(|m| m.text)
        .collect()
}

/// Outbox rows not yet handed to their channel (`pending` or `sending`).
async fn replies_unsent(h: &Harness) -> i64 {
    h.built
        .store
        .outbox_states()
        .await
        .unwrap()
        .into_iter()
        .filter(|(state, _)| state == "pending" || state == "sending")
        .map(|(_, n)| n)
        .sum()
}

/// The reported instance: one model answer asks for 100 `read`s of a 250 KB file. Before the
/// caps it added ~50 MB to the state directory and took the gateway from 14 MB to ~186 MB RSS,
/// and every later turn of that user reloaded it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_answer_with_a_hundred_big_reads_keeps_state_dir_and_rss_bounded() {
    let _serial = SERIAL.lock().await;
    let h = Harness::start(json!({
        "users": { "telegram_1001": { "identities": ["telegram:1001"], "trust": "owner" } }
    }))
    .await;
    let big: String = (0..256_000 / 64)
        .map(|n| {
            format!(
                "{n:08} {:<54}\n",
                "the quick brown fox jumps over the lazy dog"
            )
        })
        .collect();
    assert_eq!(big.len(), 256_000);
    std::fs::write(h.home.join("users/telegram_1001/big.txt"), &big).unwrap();
    h.llm.set_brain(|request| {
        if let Some(results) = request.trailing_tool_results() {
            return Reply::text(format!("read {} bytes: {}", results.len(), tail(&results)));
        }
        let text = request.last_user_text().unwrap_or_default();
        if text.contains("read it all") {
            Reply::ToolCalls(
                (0..100)
                    .map(|_| ("read".to_string(), json!({ "path": "big.txt" })))
                    .collect(),
            )
        } else {
            Reply::text(format!("echo: {text}"))
        }
    });
    let normal = h.bystander_baseline(2002, 3).await;
    h.round_trip(1001, "warm up").await;
    let state_before = dir_size(&h.home);
    let rss_before = rss_bytes();

    h.telegram.push_text(1001, "please read it all");
    h.assert_bystander_answered(2002, normal, "a hundred big reads")
        .await;
    let reply = h.expect_reply(1001, 2).await.remove(1);
    // The owner's caps: 32 calls per answer, 1 MB of tool output per turn.
    assert!(reply.contains("only the first 32 ran"), "{reply}");
    assert!(reply.starts_with("read "), "{reply}");
    let model_input: usize = reply
        .trim_start_matches("read ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        model_input < 1_100_000,
        "the model was handed {model_input} bytes of tool output in one turn"
    );

    // The next turn reloads a bounded page, not megabytes.
    h.llm.clear_requests();
    let (next, _) = h.round_trip(1001, "and now?").await;
    assert_eq!(next, "echo: and now?");
    let request = h.llm.last_request().unwrap();
    assert!(
        request.raw_body.len() < 1_200_000,
        "the next turn sent {} bytes of history",
        request.raw_body.len()
    );
    h.llm.clear_requests();

    let stored = h
        .built
        .store
        .transcript_bytes(&user("telegram_1001"))
        .await
        .unwrap();
    assert!(stored < 1_100_000, "the turn stored {stored} bytes");
    let state_growth = dir_size(&h.home).saturating_sub(state_before);
    let rss_growth = rss_bytes().saturating_sub(rss_before);
    eprintln!(
        "100 reads of 250 KB in one answer: state dir +{:.1} MB, RSS +{:.1} MB, transcript {:.1} MB",
        state_growth as f64 / MIB as f64,
        rss_growth as f64 / MIB as f64,
        stored as f64 / MIB as f64
    );
    assert!(
        state_growth < 6 * MIB,
        "state directory grew by {state_growth} bytes"
    );
    assert!(rss_growth < 32 * MIB, "RSS grew by {rss_growth} bytes");
    h.stop().await;
}

fn tail(text: &str) -> &str {
    let start = text.len().saturating_sub(400);
    let mut start = start;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// One user sends 200 messages at once while their model is slow: only their queue's worth
/// is accepted (stranger: 10), they are told once, Telegram's cursor moves past every update,
/// and another user is answered in bound throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_flood_is_capped_per_user_and_others_are_answered_in_bound() {
    let _serial = SERIAL.lock().await;
    let h = Harness::start(json!({})).await;
    h.llm.set_brain(|request| {
        let text = request.last_user_text().unwrap_or_default();
        if text.starts_with("flood") {
            Reply::delayed(Duration::from_millis(200), Reply::text("ok"))
        } else {
            Reply::text(format!("echo: {text}"))
        }
    });
    let normal = h.bystander_baseline(2002, 3).await;
    let rss_before = rss_bytes();
    let mut last_update = 0;
    for n in 0..200 {
        last_update = h.telegram.push_text(1001, &format!("flood {n}"));
    }
    for round in 0..3 {
        h.assert_bystander_answered(2002, normal, &format!("message flood, round {round}"))
            .await;
    }
    // Everything the flooder got accepted is answered; wait for the queue to drain and for
    // every answer to be handed to Telegram (an inbox row is done at commit; its reply is
    // sent from the outbox a moment later).
    let flooder = user("telegram_1001");
    for _ in 0..200 {
        if h.telegram.pending_updates() == 0
            && h.built.store.pending_inbox_count(&flooder).await.unwrap() == 0
            && replies_unsent(&h).await == 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        h.built.store.pending_inbox_count(&flooder).await.unwrap(),
        0
    );
    let replies = replies_to(&h, 1001);
    let notices = replies
        .iter()
        .filter(|r| r.contains("waiting for an answer"))
        .count();
    let answered = replies.iter().filter(|r| *r == "ok").count();
    eprintln!(
        "flood of 200: {answered} accepted and answered, {notices} notice, RSS +{:.1} MB",
        rss_bytes().saturating_sub(rss_before) as f64 / MIB as f64
    );
    // Told once per full queue: a further notice needs the queue to have had room again,
    // i.e. one more message accepted beyond the first 10 (how many depends on how fast the
    // model double answers while the flood is taken, on a busy machine).
    assert!(
        notices >= 1 && notices <= 1 + answered.saturating_sub(10),
        "told once per full queue: {notices} notices for {answered} answers: {replies:?}"
    );
    assert!(
        (10..=50).contains(&answered),
        "the flooder's queue holds 10 (plus what was answered meanwhile), got {answered} of 200"
    );
    let model_calls = h
        .llm
        .requests()
        .iter()
        .filter(|r| r.last_user_text().is_some_and(|t| t.starts_with("flood")))
        .count();
    assert_eq!(
        model_calls, answered,
        "refused messages never reach the model"
    );
    let cursor = h
        .built
        .store
        .cursor(ChannelKind::Telegram)
        .await
        .unwrap()
        .unwrap();
    assert!(
        cursor > last_update,
        "the cursor ({cursor}) moves past refused updates (last {last_update})"
    );
    // With the queue drained, the flooder is served again.
    let (again, _) = h.round_trip(1001, "hello again").await;
    assert_eq!(again, "echo: hello again");
    h.stop().await;
}

/// Ten users flood at once (100 messages each) while their model is slow: each is capped at
/// their own queue, the process's RSS stays bounded, and while the floods' accepted messages
/// are being answered a bystander is answered in bound (their turns share the semaphore and
/// the database with ten busy workers). Telegram hands out updates in order, so a message sent
/// *behind* the 1000 flood updates waits for them to be accepted or refused first; that time
/// is printed (and is what README reports).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_users_flooding_at_once_keep_rss_bounded_and_others_answered() {
    let _serial = SERIAL.lock().await;
    let h = Harness::start(json!({})).await;
    h.llm.set_brain(|request| {
        let text = request.last_user_text().unwrap_or_default();
        if text.starts_with("flood") {
            Reply::delayed(Duration::from_millis(500), Reply::text("ok"))
        } else {
            Reply::text(format!("echo: {text}"))
        }
    });
    let normal = h.bystander_baseline(2002, 3).await;
    let rss_before = rss_bytes();
    for n in 0..100 {
        for flooder in 3001..3011 {
            h.telegram.push_text(flooder, &format!("flood {n}"));
        }
    }
    let started = std::time::Instant::now();
    while h.telegram.pending_updates() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!(
        "10 users x 100 messages: the 1000 updates were taken in {:?}",
        started.elapsed()
    );
    for round in 0..3 {
        h.assert_bystander_answered(2002, normal, &format!("ten floods, round {round}"))
            .await;
    }
    for _ in 0..400 {
        let mut pending = h.telegram.pending_updates();
        for flooder in 3001..3011 {
            pending += h
                .built
                .store
                .pending_inbox_count(&user(&format!("telegram_{flooder}")))
                .await
                .unwrap();
        }
        if pending == 0 && replies_unsent(&h).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_growth = rss_bytes().saturating_sub(rss_before);
    let answered = h
        .llm
        .requests()
        .iter()
        .filter(|r| r.last_user_text().is_some_and(|t| t.starts_with("flood")))
        .count();
    eprintln!(
        "10 users x 100 messages: {answered} accepted and answered, RSS +{:.1} MB",
        rss_growth as f64 / MIB as f64
    );
    assert!(answered <= 10 * 20, "each queue is capped: {answered}");
    for flooder in 3001..3011 {
        let notices = replies_to(&h, flooder)
            .iter()
            .filter(|r| r.contains("waiting for an answer"))
            .count();
        // Once per full queue: the queue drains while the flood goes on, so a later refusal
        // can bring another notice (how often depends on how fast the model double answers
        // on a busy machine). What matters: a handful, not one per refused message (~90).
        assert!(
            (1..=10).contains(&notices),
            "flooder {flooder} told {notices} times"
        );
    }
    assert!(rss_growth < 32 * MIB, "RSS grew by {rss_growth} bytes");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_the_daily_message_budget_the_user_is_told_when_it_resets_and_no_model_is_called() {
    let _serial = SERIAL.lock().await;
    let h = Harness::start(json!({
        "limits": { "trust": { "stranger": { "messagesPerDay": 2 } } }
    }))
    .await;
    assert_eq!(h.round_trip(1001, "one").await.0, "echo: one");
    assert_eq!(h.round_trip(1001, "two").await.0, "echo: two");
    let requests = h.llm.request_count();
    let (notice, _) = h.round_trip(1001, "three").await;
    assert!(
        notice.starts_with("You have used today's 2 messages; it resets at 00:00 (in "),
        "{notice}"
    );
    assert_eq!(h.llm.request_count(), requests, "no model call");
    // A fourth message is answered too, but a flood of them does not become a flood of
    // notices: it is finished without another push (the next /help shows it was handled
    // in order).
    h.telegram.push_text(1001, "four");
    let (help, _) = h.round_trip(1001, "/help").await;
    assert!(help.contains("/forget"), "{help}");
    assert_eq!(replies_to(&h, 1001).len(), 4, "{:?}", replies_to(&h, 1001));
    assert_eq!(h.llm.request_count(), requests, "still no model call");
    assert_eq!(used_today(&h, "telegram_1001").await.messages_today, 2);
    // Someone else's budget is their own.
    assert_eq!(h.round_trip(2002, "hi").await.0, "echo: hi");
    h.stop().await;
}

/// A model that keeps asking for tools, billed at a fixed token count per call.
fn tool_loop(h: &Harness, usage: TokenUsage) {
    h.llm.set_usage(Some(usage));
    h.llm.set_brain(|request| {
        let text = request.last_user_text().unwrap_or_default();
        if request.trailing_tool_results().is_some() || text.contains("go") {
            Reply::tool_call("read", json!({ "path": "notes.md" }))
        } else {
            Reply::text(format!("echo: {text}"))
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_budget_stops_a_turn_of_tool_calls_and_the_next_message() {
    let _serial = SERIAL.lock().await;
    let h = Harness::start(json!({
        "limits": { "trust": { "stranger": { "tokensPerDay": 3500 } } }
    }))
    .await;
    tool_loop(
        &h,
        TokenUsage {
            input_tokens: 900,
            output_tokens: 100,
        },
    );
    let (reply, _) = h.round_trip(1001, "go").await;
    assert!(
        reply.contains("You have used today's 3,500 tokens; it resets at 00:00 (in "),
        "{reply}"
    );
    // Checked before every model call and tool round: 1000, 2000, 3000, 4000 — stop.
    assert_eq!(h.llm.request_count(), 4);
    assert_eq!(used_today(&h, "telegram_1001").await.tokens_today, 4000);
    let (notice, _) = h.round_trip(1001, "go on").await;
    assert!(
        notice.starts_with("You have used today's 3,500 tokens"),
        "{notice}"
    );
    assert_eq!(h.llm.request_count(), 4, "no model call over budget");
    h.stop().await;
}

/// The proof the brief asks for: a compromised assistant keeps asking for tools (and the
/// iteration cap is far away); the spend stops at the budget, at most one model call past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_that_keeps_asking_for_tools_cannot_spend_past_the_monthly_budget() {
    let _serial = SERIAL.lock().await;
    let h = Harness::start(json!({
        "model": {
            "maxToolIterations": 100,
            "prices": { "fake/test-model": { "inputPerMTok": 3, "outputPerMTok": 15 } }
        },
        "limits": { "spendPerMonth": 1 },
        "users": { "telegram_1001": { "identities": ["telegram:1001"], "trust": "owner" } }
    }))
    .await;
    // $0.30 + $0.15 per call.
    tool_loop(
        &h,
        TokenUsage {
            input_tokens: 100_000,
            output_tokens: 10_000,
        },
    );
    let (reply, _) = h.round_trip(1001, "go").await;
    assert!(
        reply.contains("You have used this month's budget of $1.00; it resets on 1 "),
        "{reply}"
    );
    assert_eq!(h.llm.request_count(), 3, "$0.45, $0.90, $1.35: stopped");
    let periods = moltmate_gateway::budget::Periods::now();
    let spent = h
        .built
        .store
        .usage_totals(&[user("telegram_1001")], &periods.day, &periods.month)
        .await
        .unwrap()
        .cost_micros_month;
    assert_eq!(spent, 1_350_000);
    let (notice, _) = h.round_trip(1001, "go").await;
    assert!(notice.contains("this month's budget of $1.00"), "{notice}");
    // More messages are answered in order, without more notices or model requests.
    h.telegram.push_text(1001, "please go");
    h.telegram.push_text(1001, "I insist, go");
    h.round_trip(1001, "/help").await;
    assert_eq!(h.llm.request_count(), 3, "no further model requests");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_transcript_is_reported_to_the_user_and_forget_makes_room() {
    let _serial = SERIAL.lock().await;
    let h = Harness::start(json!({
        "limits": { "trust": { "stranger": { "transcriptMb": 1 } } }
    }))
    .await;
    h.round_trip(1001, "hello").await;
    let big = "x".repeat(250_000);
    std::fs::write(h.home.join("users/telegram_1001/big.txt"), &big).unwrap();
    h.llm.set_brain(|request| {
        if request.trailing_tool_results().is_some() {
            return Reply::text("read it");
        }
        let text = request.last_user_text().unwrap_or_default();
        if text.starts_with("read") {
            Reply::tool_call("read", json!({ "path": "big.txt" }))
        } else {
            Reply::text(format!("echo: {text}"))
        }
    });
    // Compaction keeps one session near the context window; ended sessions stay stored.
    for n in 0..5 {
        assert_eq!(h.round_trip(1001, &format!("read {n}")).await.0, "read it");
        let result = h
            .llm
            .last_request()
            .unwrap()
            .trailing_tool_results()
            .unwrap();
        assert_eq!(result.len(), 250_000, "{}", tail(&result));
        h.round_trip(1001, "/reset").await;
    }
    let requests = h.llm.request_count();
    let (full, _) = h.round_trip(1001, "hello?").await;
    assert!(
        full.starts_with("Our stored conversations have reached their limit")
            && full.contains("/forget"),
        "{full}"
    );
    assert_eq!(h.llm.request_count(), requests);
    let (ask, _) = h.round_trip(1001, "/forget").await;
    assert!(ask.contains("/forget yes"), "{ask}");
    let (done, _) = h.round_trip(1001, "/forget yes").await;
    assert!(done.starts_with("Done: our past conversations"), "{done}");
    assert_eq!(
        h.built
            .store
            .transcript_bytes(&user("telegram_1001"))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        h.round_trip(1001, "hello again").await.0,
        "echo: hello again"
    );
    h.stop().await;
}

fn skip_or_fail(reason: &str) {
    if std::env::var("MOLTMATE_REQUIRE_SANDBOX").as_deref() == Ok("1") {
        panic!("sandbox required but unavailable: {reason}");
    }
    eprintln!("SKIP: {reason}");
}

/// `exec` time is charged as the sandbox reports it; a command runs at most for the seconds
/// left (its timeout is lowered), and once none are left `exec` is refused with the reset time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_exec_time_budget_lowers_the_timeout_then_refuses() {
    let _serial = SERIAL.lock().await;
    if moltmate_sandbox::bwrap::find_bwrap().is_none() {
        skip_or_fail("bubblewrap (bwrap) is not installed");
        return;
    }
    let h = Harness::start(json!({
        "sandbox": { "backend": "bwrap", "mode": "all", "scope": "user" },
        "tools": { "exec": { "security": "full", "timeoutSeconds": 30 } },
        "limits": { "execSecondsPerDay": 3 },
        "users": { "telegram_1001": { "identities": ["telegram:1001"], "trust": "owner" } }
    }))
    .await;
    if h.built.sandbox.as_ref().map(|s| s.backend()) != Some("bwrap") {
        skip_or_fail("the bwrap backend could not be selected");
        h.stop().await;
        return;
    }
    let step = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&step);
    h.llm.set_brain(move |request| {
        let text = request.last_user_text().unwrap_or_default();
        if !text.contains("run") {
            return Reply::text(format!("echo: {text}"));
        }
        match counter.fetch_add(1, Ordering::SeqCst) {
            0 => Reply::tool_call("exec", json!({ "command": "sleep 1" })),
            1 => Reply::tool_call("exec", json!({ "command": "sleep 20" })),
            2 => Reply::tool_call("exec", json!({ "command": "echo hi" })),
            _ => Reply::text(format!(
                "results: {}",
                request.trailing_tool_results().unwrap_or_default()
            )),
        }
    });
    let (reply, took) = h.round_trip(1001, "run things").await;
    assert!(
        reply.contains(
            "exec refused: You have used today's 3 seconds of command time; it resets at 00:00"
        ),
        "{reply}"
    );
    let used = used_today(&h, "telegram_1001").await.exec_ms_today;
    assert!(
        (2_500..=4_500).contains(&used),
        "charged {used} ms for 1 s + a command cut to the 2 s left"
    );
    assert!(
        took < Duration::from_secs(15),
        "sleep 20 was not cut: {took:?}"
    );
    h.stop().await;
}
