//! People chatting over Discord with the real gateway, against the fake Discord (Gateway
//! websocket + REST) and the fake LLM.

mod common;

use common::{binary, Harness};
use moltmate_testkit::discord::{FakeDiscord, FAKE_BOT_ID};
use moltmate_testkit::llm::Reply;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DISCORD_TOKEN: &str = "MTIz.discord-TEST-token_NEVER-logged";

/// DIRECT_MESSAGES (1 << 12) and GUILD_MESSAGES (1 << 9).
const DIRECT_MESSAGES: u64 = 1 << 12;
const GUILD_MESSAGES: u64 = 1 << 9;

fn discord_patch(discord: &FakeDiscord, extra: Value) -> Value {
    let mut channel = json!({
        "botToken": DISCORD_TOKEN, "apiUrl": discord.api_url(),
        "dmPolicy": "open", "allowFrom": ["*"],
    });
    common::merge(&mut channel, extra);
    json!({ "channels": { "discord": channel, "telegram": { "enabled": false } } })
}

async fn start(extra: Value) -> (Harness, FakeDiscord) {
    let discord = FakeDiscord::start(DISCORD_TOKEN).await;
    let h = Harness::start(discord_patch(&discord, extra)).await;
    assert!(
        discord.wait_connected(Duration::from_secs(20)).await,
        "the bot connected to the gateway"
    );
    (h, discord)
}

async fn replies(discord: &FakeDiscord, user: u64, count: usize) -> Vec<String> {
    discord
        .wait_for_messages(
            &FakeDiscord::dm_channel(user),
            count,
            Duration::from_secs(20),
        )
        .await
        .unwrap_or_else(|e| panic!("no reply for {user}: {e:?}"))
}

fn sent_to(discord: &FakeDiscord, channel: &str) -> Vec<String> {
    discord
        .sent_messages()
        .into_iter()
        .filter(|m| m.channel_id == channel)
        .map(|m| m.content)
        .collect()
}

async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pairing_code(text: &str) -> String {
    text.split_whitespace()
        .find(|w| {
            w.len() == 8
                && w.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        })
        .unwrap_or_else(|| panic!("no pairing code in {text:?}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_discord_users_at_once_each_get_only_their_own_answers() {
    let (h, discord) = start(json!({})).await;
    assert_eq!(
        discord.identifies(),
        vec![DIRECT_MESSAGES],
        "identified with direct messages only: no privileged intent"
    );
    for round in 0..3 {
        discord.push_dm(111, &format!("alice says {round}"));
        discord.push_dm(222, &format!("bob says {round}"));
    }
    assert_eq!(
        replies(&discord, 111, 3).await,
        vec![
            "echo: alice says 0",
            "echo: alice says 1",
            "echo: alice says 2"
        ]
    );
    assert_eq!(
        replies(&discord, 222, 3).await,
        vec!["echo: bob says 0", "echo: bob says 1", "echo: bob says 2"]
    );
    assert!(
        discord
            .sent_messages()
            .iter()
            .all(|m| m.allowed_mentions == Some(json!({"parse": []}))),
        "no reply may ping @everyone or a member"
    );
    assert!(h.home.join("users/discord_111").is_dir());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn discord_pairing_gives_a_code_once_and_the_operator_lets_them_in() {
    let (h, discord) = start(json!({ "dmPolicy": "pairing", "allowFrom": [] })).await;
    discord.push_dm(333, "let me in");
    let reply = replies(&discord, 333, 1).await;
    let code = pairing_code(&reply[0]);
    discord.push_dm(333, "hello?");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        h.llm.request_count(),
        0,
        "an unpaired sender reached the model"
    );
    assert_eq!(
        sent_to(&discord, &FakeDiscord::dm_channel(333)).len(),
        1,
        "one code, once"
    );

    let (status, stdout, stderr) = common::run_cli(&h.home, &["pairing", "list"]);
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.contains(&code) && stdout.contains("discord:333"),
        "{stdout}"
    );
    let (status, stdout, stderr) =
        common::run_cli(&h.home, &["pairing", "approve", "discord", &code]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("discord_333"), "{stdout}");
    discord.push_dm(333, "now?");
    let replies = replies(&discord, 333, 2).await;
    assert_eq!(replies.last().map(String::as_str), Some("echo: now?"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn discord_allowlist_answers_listed_users_and_drops_everyone_else() {
    let (h, discord) = start(json!({ "dmPolicy": "allowlist", "allowFrom": ["111"] })).await;
    discord.push_dm(444, "intruder");
    discord.push_dm(111, "friend");
    assert_eq!(replies(&discord, 111, 1).await, vec!["echo: friend"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(sent_to(&discord, &FakeDiscord::dm_channel(444)).is_empty());
    assert_eq!(
        h.llm.request_count(),
        1,
        "only the allowed sender reached the model"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_discord_connection_resumes_and_replays_without_double_answers() {
    let (h, discord) = start(json!({})).await;
    discord.push_dm(111, "before");
    assert_eq!(replies(&discord, 111, 1).await, vec!["echo: before"]);
    discord.disconnect(4000);
    // Sent while the bot is away: Discord keeps it for the session and replays it on resume.
    discord.push_dm(111, "while away");
    assert_eq!(
        replies(&discord, 111, 2).await,
        vec!["echo: before", "echo: while away"]
    );
    assert!(discord.resumes() >= 1, "the session was resumed");
    assert_eq!(discord.identifies().len(), 1, "no second Identify");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sent_to(&discord, &FakeDiscord::dm_channel(111)).len(), 2);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn discords_rate_limit_is_honoured_before_the_reply_is_sent_again() {
    let (h, discord) = start(json!({})).await;
    // A global limit of 1.5 s on the first attempt.
    discord.rate_limit_next(1, 1.5, true);
    let pushed = Instant::now();
    discord.push_dm(111, "slow down");
    assert_eq!(replies(&discord, 111, 1).await, vec!["echo: slow down"]);
    assert_eq!(
        discord.requests_during_rate_limit(),
        0,
        "nothing was sent while the limit ran"
    );
    let sent = discord.sent_messages()[0].at;
    assert!(sent.duration_since(pushed) >= Duration::from_millis(1500));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_discord_answers_arrive_split_at_2000_characters_in_order() {
    let (h, discord) = start(json!({})).await;
    let long: String = (0..900).map(|i| format!("w{i} ")).collect();
    h.llm.push_reply(Reply::text(long.clone()));
    discord.push_dm(111, "tell me a lot");
    let parts = discord
        .wait_for_messages(&FakeDiscord::dm_channel(111), 3, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(parts.len(), 3, "about 4,500 characters: three parts");
    assert!(parts.iter().all(|p| p.chars().count() <= 2000));
    assert_eq!(
        parts.join(" ").split_whitespace().collect::<Vec<_>>(),
        long.split_whitespace().collect::<Vec<_>>()
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_discord_group_is_its_own_user_and_answers_only_when_mentioned() {
    let (h, discord) = start(json!({
        "dmPolicy": "pairing", "allowFrom": ["111"],
        "groups": { "enabled": true, "mention": true }
    }))
    .await;
    assert_eq!(discord.identifies(), vec![DIRECT_MESSAGES | GUILD_MESSAGES]);
    // Alice talks to her own assistant first; her memory holds a secret.
    discord.push_dm(111, "hi");
    replies(&discord, 111, 1).await;
    std::fs::write(
        h.home.join("users/discord_111/MEMORY.md"),
        "alice-secret: the safe code is 4711",
    )
    .unwrap();
    // In a server channel: no mention, no answer; a mention from a new group gets a code.
    discord.push_guild(111, "900", "555", "anyone here?", false);
    discord.push_guild(111, "900", "555", "what is the safe code?", true);
    let reply = discord
        .wait_for_messages("555", 1, Duration::from_secs(20))
        .await
        .unwrap();
    let code = pairing_code(&reply[0]);
    let (status, stdout, stderr) =
        common::run_cli(&h.home, &["pairing", "approve", "discord", &code]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("discord_group_555"), "{stdout}");
    h.llm.clear_requests();
    discord.push_guild(111, "900", "555", "what is the safe code?", true);
    let answers = discord
        .wait_for_messages("555", 2, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(answers[1], "echo: User 111: what is the safe code?");
    let request = h.llm.last_request().unwrap();
    assert!(
        !request.all_text().contains("4711"),
        "the group's prompt holds no member's memory"
    );
    assert!(h.home.join("users/discord_group_555").is_dir());
    assert_eq!(
        h.llm.requests().len(),
        1,
        "only the mention reached the model"
    );
    let _ = FAKE_BOT_ID;
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_killed_mid_answer_on_discord_loses_nothing_and_answers_once() {
    let discord = FakeDiscord::start(DISCORD_TOKEN).await;
    let llm = moltmate_testkit::llm::FakeLlm::start().await;
    let telegram = moltmate_testkit::telegram::FakeTelegram::start(common::BOT_TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let mut config = common::base_config(&telegram, &llm);
    common::merge(&mut config, discord_patch(&discord, json!({})));
    common::merge(
        &mut config,
        json!({ "gateway": { "port": free_port() }, "logging": { "level": "info" } }),
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
    assert!(discord.wait_connected(Duration::from_secs(30)).await);
    discord.push_dm(111, "crash me");
    wait_until("the model call to start", Duration::from_secs(20), || {
        llm.request_count() > 0
    })
    .await;
    gateway.kill().unwrap();
    gateway.wait().unwrap();
    assert!(sent_to(&discord, &FakeDiscord::dm_channel(111)).is_empty());

    let mut gateway = start_gateway(&home);
    wait_until("the reply after restart", Duration::from_secs(30), || {
        !sent_to(&discord, &FakeDiscord::dm_channel(111)).is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sent_to(&discord, &FakeDiscord::dm_channel(111)),
        vec!["echo: crash me"],
        "answered exactly once"
    );
    gateway.kill().unwrap();
    gateway.wait().unwrap();
    let log = std::fs::read_to_string(home.join("gateway.log")).unwrap_or_default();
    assert!(!log.contains(DISCORD_TOKEN), "the token reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_discord_strangers_neither_reaches_the_model_nor_slows_a_member() {
    let (h, discord) = start(json!({ "dmPolicy": "pairing", "allowFrom": ["111"] })).await;
    // The member's normal answer time.
    let started = Instant::now();
    discord.push_dm(111, "warm up");
    replies(&discord, 111, 1).await;
    let started_normal = Instant::now();
    discord.push_dm(111, "normal");
    replies(&discord, 111, 2).await;
    let normal = started_normal.elapsed();
    let _ = started;
    // 100 strangers write 10 messages each, interleaved with the member's messages.
    let mut slowest = Duration::ZERO;
    for round in 0..10 {
        for stranger in 0..100u64 {
            discord.push_dm(5_000 + stranger, &format!("let me in {round}"));
        }
        let asked = Instant::now();
        discord.push_dm(111, &format!("still there {round}"));
        replies(&discord, 111, 3 + round).await;
        slowest = slowest.max(asked.elapsed());
    }
    assert!(
        slowest <= normal * 2 + Duration::from_millis(500),
        "the member waited {slowest:?} against a normal {normal:?}"
    );
    // Only the member reached the model; each stranger got one code, once.
    assert_eq!(h.llm.request_count(), 12);
    let codes = discord
        .sent_messages()
        .iter()
        .filter(|m| m.channel_id != FakeDiscord::dm_channel(111))
        .count();
    assert_eq!(codes, 50, "at most maxPendingPairings (50) codes, one each");
    h.stop().await;
}
