//! Reminders and `kill -9` of the real binary: a reminder due while the gateway is down comes
//! after startup, marked late, once; a gateway killed during a reminder's turn answers it once
//! after the restart and never again; a recurring reminder that missed days fires once, late,
//! and moves on to its next occurrence.

mod common;

use common::{base_config, binary, merge, write_config, BOT_TOKEN};
use moltmate_core::UserId;
use moltmate_testkit::llm::{FakeLlm, RecordedRequest, Reply};
use moltmate_testkit::telegram::FakeTelegram;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_gateway(home: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.join("gateway.log"))
        .unwrap();
    Command::new(binary())
        .arg("--home")
        .arg(home)
        .arg("serve")
        .env_remove("ANTHROPIC_API_KEY")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("gateway starts")
}

fn kill_hard(child: &mut Child) {
    child.kill().expect("SIGKILL"); // no shutdown code runs
    child.wait().unwrap();
}

async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `schedule {json}` becomes a `schedule` call; tool results are answered `tool said: ...`;
/// a reminder's turn is answered after `reminder_delay` with `echo: <its message>`.
fn brain(reminder_delay: Duration) -> impl Fn(&RecordedRequest) -> Reply + Send + Sync {
    move |request| {
        if let Some(result) = request.trailing_tool_results() {
            return Reply::text(format!("tool said: {result}"));
        }
        let text = request.last_user_text().unwrap_or_default();
        if let Some(arguments) = text
            .strip_prefix("schedule ")
            .and_then(|a| serde_json::from_str::<Value>(a).ok())
        {
            return Reply::tool_call("schedule", arguments);
        }
        if text.starts_with("[Reminder") {
            return Reply::delayed(reminder_delay, Reply::text(format!("echo: {text}")));
        }
        Reply::text(format!("echo: {text}"))
    }
}

async fn setup() -> (common::TestHome, std::path::PathBuf, FakeTelegram, FakeLlm) {
    let telegram = FakeTelegram::start(BOT_TOKEN).await;
    let llm = FakeLlm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let mut config = base_config(&telegram, &llm);
    merge(
        &mut config,
        json!({
            "gateway": { "port": free_port() }, "logging": { "level": "info" },
            "users": { "telegram_1001": { "timezone": "UTC" } }
        }),
    );
    write_config(&home, &config);
    (common::TestHome::new(dir, &home), home, telegram, llm)
}

fn replies_to(telegram: &FakeTelegram, chat: i64) -> Vec<String> {
    telegram
        .sent_messages()
        .into_iter()
        .filter(|m| m.chat_id == chat.to_string())
        .map(|m| m.text)
        .collect()
}

fn utc_in(seconds: i64) -> (String, Instant) {
    let at = (chrono::Utc::now() + chrono::Duration::seconds(seconds))
        .format("%Y-%m-%dT%H:%M:%S")
        .to_string();
    (at, Instant::now() + Duration::from_secs(seconds as u64))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reminder_due_while_the_gateway_was_down_is_delivered_late_once_after_startup() {
    let (_dir, home, telegram, llm) = setup().await;
    llm.set_brain(brain(Duration::ZERO));
    let mut gateway = start_gateway(&home);
    let (at, due) = utc_in(5);
    telegram.push_text(
        1001,
        &format!(
            "schedule {}",
            json!({"action": "create", "text": "water the plants", "at": at})
        ),
    );
    wait_until("the reminder to be set", Duration::from_secs(20), || {
        !replies_to(&telegram, 1001).is_empty()
    })
    .await;
    assert!(replies_to(&telegram, 1001)[0].contains("Reminder #1 set: once"));
    kill_hard(&mut gateway);
    // Down over the reminder's time (a few seconds are enough: it was due before the next
    // start, so it is late however short the outage).
    tokio::time::sleep_until((due + Duration::from_secs(2)).into()).await;

    let mut gateway = start_gateway(&home);
    wait_until("the late reminder", Duration::from_secs(20), || {
        replies_to(&telegram, 1001).len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let replies = replies_to(&telegram, 1001);
    assert_eq!(replies.len(), 2, "delivered exactly once: {replies:?}");
    assert!(
        replies[1].contains("Reminder: water the plants")
            && replies[1].contains("Late: it comes only now")
            && replies[1].contains("\n\n(late: due at "),
        "marked late by the gateway, whatever the model says: {}",
        replies[1]
    );
    kill_hard(&mut gateway);
    let mut gateway = start_gateway(&home);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        replies_to(&telegram, 1001).len(),
        2,
        "not again after a restart"
    );
    kill_hard(&mut gateway);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reminder_fires_once_across_a_kill_9_during_its_turn_and_restarts() {
    let (_dir, home, telegram, llm) = setup().await;
    llm.set_brain(brain(Duration::from_millis(1500)));
    let mut gateway = start_gateway(&home);
    let (at, _) = utc_in(3);
    telegram.push_text(
        1001,
        &format!(
            "schedule {}",
            json!({"action": "create", "text": "call the dentist", "at": at})
        ),
    );
    wait_until("the reminder to be set", Duration::from_secs(20), || {
        !replies_to(&telegram, 1001).is_empty()
    })
    .await;
    wait_until(
        "the reminder's turn to start",
        Duration::from_secs(20),
        || {
            llm.requests().iter().any(|r| {
                r.last_user_text()
                    .is_some_and(|t| t.starts_with("[Reminder #1"))
            })
        },
    )
    .await;
    kill_hard(&mut gateway);
    assert_eq!(
        replies_to(&telegram, 1001).len(),
        1,
        "not answered before the kill"
    );

    let mut gateway = start_gateway(&home);
    wait_until(
        "the reminder after restart",
        Duration::from_secs(20),
        || replies_to(&telegram, 1001).len() >= 2,
    )
    .await;
    kill_hard(&mut gateway);
    let mut gateway = start_gateway(&home);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let replies = replies_to(&telegram, 1001);
    assert_eq!(replies.len(), 2, "exactly once: {replies:?}");
    assert!(
        replies[1].contains("Reminder: call the dentist"),
        "{}",
        replies[1]
    );
    let reminder_turns = llm
        .requests()
        .iter()
        .filter(|r| {
            r.last_user_text()
                .is_some_and(|t| t.starts_with("[Reminder #1"))
        })
        .count();
    assert_eq!(reminder_turns, 2, "the interrupted turn and its one retry");
    kill_hard(&mut gateway);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recurring_reminder_that_missed_days_fires_once_and_moves_on() {
    let (_dir, home, telegram, llm) = setup().await;
    llm.set_brain(brain(Duration::ZERO));
    let mut gateway = start_gateway(&home);
    telegram.push_text(1001, "hello");
    wait_until("the first answer", Duration::from_secs(20), || {
        !replies_to(&telegram, 1001).is_empty()
    })
    .await;
    kill_hard(&mut gateway);

    // While it is down: a daily 08:00 reminder whose occurrence three days ago was never
    // delivered (as if the gateway had been down since).
    let now = chrono::Utc::now();
    let three_days_ago = (now - chrono::Duration::days(3))
        .date_naive()
        .and_hms_opt(8, 0, 0)
        .unwrap()
        .and_utc();
    {
        let store = moltmate_store::Store::open(&home.join("moltmate.db")).unwrap();
        let user = UserId::new("telegram_1001").unwrap();
        let outcome = store
            .create_reminder(
                moltmate_store::NewReminder {
                    user: user.clone(),
                    text: "stretch".into(),
                    cron: Some("0 8 * * *".into()),
                    timezone: "UTC".into(),
                    due_at: three_days_ago.timestamp_millis(),
                },
                50,
            )
            .await
            .unwrap();
        assert!(matches!(outcome, moltmate_store::CreateOutcome::Created(_)));
    }

    let mut gateway = start_gateway(&home);
    wait_until("the late reminder", Duration::from_secs(20), || {
        replies_to(&telegram, 1001).len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let replies = replies_to(&telegram, 1001);
    assert_eq!(
        replies.len(),
        2,
        "one delivery for all missed days: {replies:?}"
    );
    // 08:00 three days ago, two days ago, yesterday, and today if it has passed.
    let missed = if now.time() >= chrono::NaiveTime::from_hms_opt(8, 0, 0).unwrap() {
        3
    } else {
        2
    };
    assert!(
        replies[1].contains("Reminder: stretch")
            && replies[1].contains(&format!(
                "; {missed} earlier time(s) passed while I was offline)"
            )),
        "{}",
        replies[1]
    );
    kill_hard(&mut gateway);
    let store = moltmate_store::Store::open(&home.join("moltmate.db")).unwrap();
    let listed = store
        .list_reminders(&UserId::new("telegram_1001").unwrap())
        .await
        .unwrap();
    let next = chrono::DateTime::from_timestamp_millis(listed[0].due_at).unwrap();
    assert!(
        next > now && next - now <= chrono::Duration::days(1),
        "next is the coming 08:00: {next}"
    );
    assert_eq!(
        next.format("%H:%M").to_string(),
        "08:00",
        "from the rule, no drift"
    );
    assert_eq!(listed[0].fired, 1);
}
