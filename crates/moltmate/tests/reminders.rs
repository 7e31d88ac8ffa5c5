//! Reminders through the real gateway (fake Telegram + fake model): the model calls the
//! `schedule` tool, the scheduler fires on time (a few seconds ahead, no minute-long sleeps) as
//! a turn on Telegram, users only ever reach their own reminders, caps refuse with a clear
//! message, over budget a reminder still arrives as a plain notice, `users reset`/`remove`
//! cancel them, and a user whose reminders all fall due at once slows down nobody else.

mod common;

use common::{run_cli, Harness};
use moltmate_store::{CreateOutcome, NewReminder};
use moltmate_testkit::llm::{RecordedRequest, Reply};
use serde_json::{json, Value};
use std::time::Duration;

/// The model: `schedule {json}` from the user becomes a `schedule` call with those
/// arguments; a tool result is answered `tool said: <result>`; anything else is echoed (so a
/// reminder's turn answers `echo: [Reminder #n ...]`).
fn scheduling_brain(request: &RecordedRequest) -> Reply {
    if let Some(result) = request.trailing_tool_results() {
        return Reply::text(format!("tool said: {result}"));
    }
    let text = request.last_user_text().unwrap_or_default();
    match text
        .strip_prefix("schedule ")
        .and_then(|args| serde_json::from_str::<Value>(args).ok())
    {
        Some(arguments) => Reply::tool_call("schedule", arguments),
        None => Reply::text(format!("echo: {text}")),
    }
}

fn replies_to(h: &Harness, chat: i64) -> Vec<String> {
    h.telegram
        .sent_messages()
        .into_iter()
        .filter(|m| m.chat_id == chat.to_string())
        .map(|m| m.text)
        .collect()
}

/// Sends `schedule {arguments}` as Telegram user `chat` and returns the reply.
async fn schedule(h: &Harness, chat: i64, arguments: Value) -> String {
    let before = replies_to(h, chat).len();
    h.telegram.push_text(chat, &format!("schedule {arguments}"));
    h.expect_reply(chat, before + 1).await[before].clone()
}

/// A local wall time `seconds` from now in `zone`, as the model would write it.
fn local_in(zone: &str, seconds: i64) -> String {
    let zone: chrono_tz::Tz = zone.parse().unwrap();
    (chrono::Utc::now() + chrono::Duration::seconds(seconds))
        .with_timezone(&zone)
        .format("%Y-%m-%dT%H:%M:%S")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reminder_fires_on_telegram_as_a_turn_of_the_users_assistant() {
    let h = Harness::start(json!({
        "users": { "telegram_1001": { "timezone": "Europe/Berlin" } }
    }))
    .await;
    h.llm.set_brain(scheduling_brain);
    let at = local_in("Europe/Berlin", 4);
    let set = schedule(
        &h,
        1001,
        json!({"action": "create", "text": "water the plants", "at": at}),
    )
    .await;
    assert!(
        set.starts_with("tool said: Reminder #1 set: once, ") && set.contains("(Europe/Berlin)"),
        "repeated back in words: {set}"
    );
    // The model was told the time in the user's zone.
    let asked = h.llm.requests()[0].system_text();
    assert!(
        asked.contains("in your user's time zone (Europe/Berlin)"),
        "{asked}"
    );
    h.llm.clear_requests();

    let replies = h.expect_reply(1001, 2).await;
    let reminder = &replies[1];
    assert!(
        reminder.starts_with("echo: [Reminder #1 from the scheduler")
            && reminder.ends_with("Reminder: water the plants"),
        "delivered as a turn the model phrased: {reminder}"
    );
    assert!(!reminder.contains("late"), "on time: {reminder}");
    // A real turn: the user's own system prompt (persona files), one model request.
    let requests = h.llm.requests();
    assert_eq!(requests.len(), 1);
    assert!(requests[0].system_text().contains("Your persona"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(replies_to(&h, 1001).len(), 2, "fired once");
    assert!(
        h.built
            .store
            .list_reminders(&"telegram_1001".parse().unwrap())
            .await
            .unwrap()
            .is_empty(),
        "a one-off is gone after it fired"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_user_cannot_list_or_cancel_another_users_reminders() {
    let h = Harness::start(json!({})).await;
    h.llm.set_brain(scheduling_brain);
    let set = schedule(
        &h,
        1001,
        json!({"action": "create", "text": "alice's secret appointment", "in_minutes": 600}),
    )
    .await;
    assert!(set.contains("Reminder #1 set"), "{set}");

    let listed = schedule(&h, 2002, json!({"action": "list"})).await;
    assert!(listed.starts_with("tool said: No reminders."), "{listed}");
    assert!(!listed.contains("secret"), "{listed}");
    let cancelled = schedule(&h, 2002, json!({"action": "cancel", "id": 1})).await;
    assert!(
        cancelled.contains("reminder #1 not found") && !cancelled.contains("forbidden"),
        "another user's number is not found, not forbidden: {cancelled}"
    );
    // Arguments cannot name a user.
    let sneaky = schedule(&h, 2002, json!({"action": "list", "user": "telegram_1001"})).await;
    assert!(sneaky.contains("unknown field"), "{sneaky}");

    let own = schedule(&h, 1001, json!({"action": "list"})).await;
    assert!(
        own.contains("#1 — once, ") && own.contains("alice's secret appointment"),
        "{own}"
    );
    let cancelled = schedule(&h, 1001, json!({"action": "cancel", "id": "#1"})).await;
    assert!(cancelled.contains("Reminder #1 cancelled."), "{cancelled}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn caps_refuse_with_a_clear_message() {
    let h = Harness::start(json!({ "limits": { "reminders": 2 } })).await;
    h.llm.set_brain(scheduling_brain);
    for _ in 0..2 {
        let set = schedule(
            &h,
            1001,
            json!({"action": "create", "text": "x", "cron": "0 9 * * *"}),
        )
        .await;
        assert!(set.contains("set: recurring: At 09:00"), "{set}");
    }
    let third = schedule(
        &h,
        1001,
        json!({"action": "create", "text": "x", "in_minutes": 5}),
    )
    .await;
    assert!(
        third.contains("already has 2 reminders, the most they may have; cancel one first"),
        "{third}"
    );
    let often = schedule(
        &h,
        2002,
        json!({"action": "create", "text": "x", "cron": "*/5 * * * *"}),
    )
    .await;
    assert!(
        often.contains(
            "repeats after 5 minute(s); recurring reminders may repeat at most every 15 minutes"
        ),
        "{often}"
    );
    let long = schedule(
        &h,
        2002,
        json!({"action": "create", "text": "y".repeat(1001), "in_minutes": 5}),
    )
    .await;
    assert!(long.contains("at most 1000 are kept"), "{long}");
    let past = schedule(
        &h,
        2002,
        json!({"action": "create", "text": "x", "at": "2020-01-01T08:00", "timezone": "Asia/Tokyo"}),
    )
    .await;
    assert!(past.contains("(Asia/Tokyo) has passed"), "{past}");
    let far = schedule(
        &h,
        2002,
        json!({"action": "create", "text": "x", "at": "2099-01-01T08:00"}),
    )
    .await;
    assert!(far.contains("more than five years ahead"), "{far}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_budget_a_reminder_still_arrives_as_a_plain_notice() {
    // A stranger may have one model-answered message a day: the one that sets the reminder.
    let h = Harness::start(json!({
        "limits": { "trust": { "stranger": { "messagesPerDay": 1 } } }
    }))
    .await;
    h.llm.set_brain(scheduling_brain);
    let set = schedule(
        &h,
        1001,
        json!({"action": "create", "text": "take the pills", "at": local_in("UTC", 3), "timezone": "UTC"}),
    )
    .await;
    assert!(set.contains("Reminder #1 set"), "{set}");
    let requests = h.llm.request_count();
    let replies = h.expect_reply(1001, 2).await;
    assert!(
        replies[1].starts_with("⏰ Reminder: take the pills\n\nYou have used today's 1 messages"),
        "{}",
        replies[1]
    );
    assert_eq!(h.llm.request_count(), requests, "no model was called");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_reset_and_remove_cancel_their_reminders() {
    let h = Harness::start(json!({})).await;
    h.llm.set_brain(scheduling_brain);
    let due = tokio::time::Instant::now() + Duration::from_secs(12);
    let at = local_in("UTC", 12);
    for chat in [1001, 2002] {
        let set = schedule(
            &h,
            chat,
            json!({"action": "create", "text": "should never arrive", "at": at, "timezone": "UTC"}),
        )
        .await;
        assert!(set.contains("Reminder #1 set"), "{set}");
    }
    let (status, show, stderr) = run_cli(&h.home, &["users", "show", "telegram_1001"]);
    assert!(status.success(), "{stderr}");
    assert!(
        show.contains("reminders:        1 of 10 (limits.reminders)")
            && show.contains("should never arrive"),
        "{show}"
    );
    let (status, out, stderr) = run_cli(&h.home, &["users", "reset", "telegram_1001", "--yes"]);
    assert!(status.success(), "{stderr}");
    assert!(out.contains("1 reminder(s) cancelled"), "{out}");
    let (status, out, stderr) = run_cli(&h.home, &["users", "remove", "telegram_2002", "--yes"]);
    assert!(status.success(), "{stderr}");
    assert!(out.contains("1 reminder(s) cancelled"), "{out}");
    assert_eq!(h.built.store.reminder_total().await.unwrap(), 0);
    tokio::time::sleep_until(due + Duration::from_secs(3)).await;
    for chat in [1001, 2002] {
        assert_eq!(replies_to(&h, chat).len(), 1, "nothing fired for {chat}");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_reminders_falling_due_at_once_do_not_slow_down_another_user() {
    let h = Harness::start(json!({
        "limits": { "trust": { "stranger": { "reminders": 50, "queuedMessages": 50 } } }
    }))
    .await;
    h.llm.set_brain(|request| {
        let text = request.last_user_text().unwrap_or_default();
        Reply::delayed(
            Duration::from_millis(50),
            Reply::text(format!("echo: {text}")),
        )
    });
    // The attacker talks once (so the gateway knows their chat), then has 50 reminders.
    h.telegram.push_text(1001, "hello");
    h.expect_reply(1001, 1).await;
    let normal = h.bystander_baseline(2002, 3).await;
    let attacker: moltmate_core::UserId = "telegram_1001".parse().unwrap();
    let due = chrono::Utc::now().timestamp_millis() + 1_500;
    for i in 0..50 {
        let outcome = h
            .built
            .store
            .create_reminder(
                NewReminder {
                    user: attacker.clone(),
                    text: format!("flood {i}"),
                    cron: None,
                    timezone: "UTC".into(),
                    due_at: due,
                },
                50,
            )
            .await
            .unwrap();
        assert!(matches!(outcome, CreateOutcome::Created(_)));
    }
    h.built.gateway.wake_scheduler();
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    for round in 0..3 {
        h.assert_bystander_answered(2002, normal, &format!("reminder flood, round {round}"))
            .await;
    }
    let replies = h.expect_reply(1001, 51).await;
    let mut flood: Vec<&String> = replies
        .iter()
        .filter(|r| r.contains("Reminder: flood"))
        .collect();
    assert_eq!(flood.len(), 50, "each fired exactly once");
    flood.dedup();
    assert_eq!(flood.len(), 50);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(replies_to(&h, 1001).len(), 51, "and nothing more");
    h.stop().await;
}
