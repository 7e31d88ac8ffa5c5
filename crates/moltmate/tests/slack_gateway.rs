//! People chatting over Slack (Socket Mode) with the real gateway, against the fake Slack and
//! the fake LLM.

mod common;

use common::{binary, Harness};
use moltmate_testkit::llm::Reply;
use moltmate_testkit::slack::{FakeSlack, TEAM_ID};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BOT: &str = "xoxb-1-slack-BOT-secret-NEVER-logged";
const APP: &str = "xapp-1-slack-APP-secret-NEVER-logged";

fn slack_patch(slack: &FakeSlack, extra: Value) -> Value {
    let mut channel = json!({
        "botToken": BOT, "appToken": APP, "apiUrl": slack.api_url(),
        "dmPolicy": "open", "allowFrom": ["*"],
    });
    common::merge(&mut channel, extra);
    json!({ "channels": { "slack": channel, "telegram": { "enabled": false } } })
}

async fn start(extra: Value) -> (Harness, FakeSlack) {
    let slack = FakeSlack::start(BOT, APP).await;
    let h = Harness::start(slack_patch(&slack, extra)).await;
    assert!(
        slack.wait_connected(Duration::from_secs(20)).await,
        "connected"
    );
    (h, slack)
}

async fn replies(slack: &FakeSlack, user: &str, count: usize) -> Vec<String> {
    slack
        .wait_for_messages(&FakeSlack::dm_channel(user), count, Duration::from_secs(20))
        .await
        .unwrap_or_else(|got| panic!("no reply for {user}: got {got:?}"))
}

fn posted_to(slack: &FakeSlack, channel: &str) -> Vec<String> {
    slack
        .posted()
        .into_iter()
        .filter(|m| m.channel == channel)
        .map(|m| m.text)
        .collect()
}

async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_slack_users_at_once_each_get_only_their_own_answers() {
    let (h, slack) = start(json!({})).await;
    for round in 0..3 {
        slack.push_dm("U111", &format!("alice says {round}"), None);
        slack.push_dm("U222", &format!("bob says {round}"), None);
    }
    assert_eq!(
        replies(&slack, "U111", 3).await,
        vec![
            "echo: alice says 0",
            "echo: alice says 1",
            "echo: alice says 2"
        ]
    );
    assert_eq!(
        replies(&slack, "U222", 3).await,
        vec!["echo: bob says 0", "echo: bob says 1", "echo: bob says 2"]
    );
    assert!(slack.wait_until_acknowledged(Duration::from_secs(5)).await);
    assert!(h
        .home
        .join(format!("users/slack_{}_u111", TEAM_ID.to_lowercase()))
        .is_dir());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slack_threads_stay_one_conversation_and_mentions_are_escaped() {
    let (h, slack) = start(json!({})).await;
    h.llm.push_reply(Reply::text("ping <!channel> & <@U222>"));
    slack.push_dm("U111", "in a thread", Some("1700000000.000001"));
    replies(&slack, "U111", 1).await;
    let posted = slack.posted();
    assert_eq!(posted[0].thread_ts.as_deref(), Some("1700000000.000001"));
    assert_eq!(posted[0].text, "ping &lt;!channel&gt; &amp; &lt;@U222&gt;");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slack_bot_messages_and_edits_are_acknowledged_but_never_answered() {
    let (h, slack) = start(json!({})).await;
    let dm = FakeSlack::dm_channel("U111");
    slack.push_event(
        json!({"type": "message", "channel_type": "im", "channel": dm, "user": "U111",
        "text": "edited", "ts": "1.000001", "subtype": "message_changed"}),
    );
    slack.push_event(
        json!({"type": "message", "channel_type": "im", "channel": dm, "user": "U999",
        "bot_id": "B9", "text": "from a bot", "ts": "1.000002"}),
    );
    slack.push_event(
        json!({"type": "message", "channel_type": "im", "channel": dm, "user": "UBOT",
        "text": "our own", "ts": "1.000003"}),
    );
    slack.push_dm("U111", "real", None);
    assert_eq!(replies(&slack, "U111", 1).await, vec!["echo: real"]);
    assert!(slack.wait_until_acknowledged(Duration::from_secs(5)).await);
    assert_eq!(h.llm.request_count(), 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slack_pairing_and_allowlist_follow_the_dm_policy() {
    let (h, slack) =
        start(json!({ "dmPolicy": "pairing", "allowFrom": [format!("{TEAM_ID}/U111")] })).await;
    slack.push_dm("U333", "let me in", None);
    slack.push_dm("U111", "friend", None);
    assert_eq!(replies(&slack, "U111", 1).await, vec!["echo: friend"]);
    let reply = replies(&slack, "U333", 1).await;
    let code = reply[0]
        .split_whitespace()
        .find(|w| {
            w.len() == 8
                && w.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        })
        .unwrap_or_else(|| panic!("no code in {reply:?}"))
        .to_string();
    assert_eq!(
        h.llm.request_count(),
        1,
        "the stranger did not reach the model"
    );
    let (status, stdout, stderr) =
        common::run_cli(&h.home, &["pairing", "approve", "slack", &code]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("u333"), "{stdout}");
    slack.push_dm("U333", "now?", None);
    assert_eq!(replies(&slack, "U333", 2).await[1], "echo: now?");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slack_refresh_reconnects_and_redelivered_envelopes_are_answered_once() {
    let (h, slack) = start(json!({})).await;
    slack.push_dm("U111", "before", None);
    replies(&slack, "U111", 1).await;
    slack.disconnect("refresh_requested");
    let ts = slack.push_dm("U111", "while away", None);
    assert_eq!(
        replies(&slack, "U111", 2).await,
        vec!["echo: before", "echo: while away"]
    );
    assert!(
        slack.connections_opened() >= 2,
        "a fresh URL for the new connection"
    );
    // A redelivery of an envelope already stored (acknowledgement lost) is not answered again.
    slack.push_event(
        json!({"type": "message", "channel_type": "im", "channel": FakeSlack::dm_channel("U111"),
        "user": "U111", "text": "while away", "ts": ts}),
    );
    assert!(slack.wait_until_acknowledged(Duration::from_secs(5)).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        posted_to(&slack, &FakeSlack::dm_channel("U111")).len(),
        2,
        "answered once"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slacks_rate_limit_is_honoured() {
    let (h, slack) = start(json!({})).await;
    slack.rate_limit_next(1, 1);
    let pushed = Instant::now();
    slack.push_dm("U111", "slow down", None);
    assert_eq!(replies(&slack, "U111", 1).await, vec!["echo: slow down"]);
    assert_eq!(slack.requests_during_rate_limit(), 0);
    assert!(slack.posted()[0].at.duration_since(pushed) >= Duration::from_secs(1));
    h.stop().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_killed_mid_answer_on_slack_loses_nothing_and_answers_once() {
    let slack = FakeSlack::start(BOT, APP).await;
    let llm = moltmate_testkit::llm::FakeLlm::start().await;
    let telegram = moltmate_testkit::telegram::FakeTelegram::start(common::BOT_TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let mut config = common::base_config(&telegram, &llm);
    common::merge(&mut config, slack_patch(&slack, json!({})));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    common::merge(
        &mut config,
        json!({ "gateway": { "port": port }, "logging": { "level": "info" } }),
    );
    common::write_config(&home, &config);
    let _home = common::TestHome::new(dir, &home);
    llm.set_brain(|request| {
        let text = request.last_user_text().unwrap_or_default();
        Reply::delayed(
            Duration::from_millis(1500),
            Reply::text(format!("echo: {text}")),
        )
    });
    let mut gateway = start_gateway(&home);
    assert!(slack.wait_connected(Duration::from_secs(30)).await);
    slack.push_dm("U111", "crash me", None);
    wait_until("the model call", Duration::from_secs(20), || {
        llm.request_count() > 0
    })
    .await;
    assert!(
        slack.wait_until_acknowledged(Duration::from_secs(5)).await,
        "acknowledged once stored"
    );
    gateway.kill().unwrap();
    gateway.wait().unwrap();
    let mut gateway = start_gateway(&home);
    wait_until("the reply after restart", Duration::from_secs(30), || {
        !posted_to(&slack, &FakeSlack::dm_channel("U111")).is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        posted_to(&slack, &FakeSlack::dm_channel("U111")),
        vec!["echo: crash me"]
    );
    gateway.kill().unwrap();
    gateway.wait().unwrap();
    let log = std::fs::read_to_string(home.join("gateway.log")).unwrap_or_default();
    assert!(!log.contains("NEVER-logged"), "a token reached the log");
}
