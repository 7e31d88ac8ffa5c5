//! `kill -9` of the real binary at awkward moments: no accepted message is lost, none is
//! answered twice.

mod common;

use common::{base_config, binary, merge, write_config, BOT_TOKEN};
use moltmate_testkit::llm::{FakeLlm, Reply};
use moltmate_testkit::telegram::FakeTelegram;
use serde_json::json;
use std::collections::HashMap;
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
    child.kill().expect("SIGKILL"); // std's kill() is SIGKILL on Unix: no shutdown code runs.
    child.wait().unwrap();
}

async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
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
        // Up to 16 messages per user may wait here (the queue cap is tested on its own, in
        // hostile_budget.rs).
        json!({
            "gateway": { "port": free_port() }, "logging": { "level": "info" },
            "limits": { "trust": { "stranger": { "queuedMessages": 50 } } }
        }),
    );
    write_config(&home, &config);
    // A killed gateway leaves its users' capped volumes mounted: released when the test ends.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_between_receive_and_reply_loses_nothing() {
    let (_dir, home, telegram, llm) = setup().await;
    llm.set_brain(|request| {
        let text = request.last_user_text().unwrap_or_default();
        Reply::delayed(
            Duration::from_millis(1500),
            Reply::text(format!("echo: {text}")),
        )
    });
    let mut gateway = start_gateway(&home);
    let update = telegram.push_text(1001, "crash me");
    wait_until(
        "the update to be confirmed",
        Duration::from_secs(20),
        || telegram.get_updates_offsets().contains(&Some(update + 1)),
    )
    .await;
    wait_until("the model call to start", Duration::from_secs(10), || {
        llm.request_count() > 0
    })
    .await;
    kill_hard(&mut gateway);
    assert!(
        replies_to(&telegram, 1001).is_empty(),
        "no reply was sent before the crash"
    );

    let mut gateway = start_gateway(&home);
    wait_until("the reply after restart", Duration::from_secs(20), || {
        !replies_to(&telegram, 1001).is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        replies_to(&telegram, 1001),
        vec!["echo: crash me"],
        "answered exactly once"
    );
    kill_hard(&mut gateway);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_after_the_reply_was_sent_does_not_answer_twice() {
    let (_dir, home, telegram, _llm) = setup().await;
    let mut gateway = start_gateway(&home);
    telegram.push_text(1001, "once please");
    wait_until("the reply", Duration::from_secs(20), || {
        !replies_to(&telegram, 1001).is_empty()
    })
    .await;
    kill_hard(&mut gateway);
    let mut gateway = start_gateway(&home);
    telegram.push_text(1001, "and again");
    wait_until("the second reply", Duration::from_secs(20), || {
        replies_to(&telegram, 1001).len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        replies_to(&telegram, 1001),
        vec!["echo: once please", "echo: and again"]
    );
    kill_hard(&mut gateway);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_kill_9_under_load_never_duplicates_and_never_loses_a_message() {
    let (_dir, home, telegram, llm) = setup().await;
    llm.set_brain(|request| {
        let text = request.last_user_text().unwrap_or_default();
        Reply::delayed(
            Duration::from_millis(150),
            Reply::text(format!("echo: {text}")),
        )
    });
    let mut gateway = start_gateway(&home);
    let mut sent = Vec::new();
    for round in 0..4 {
        for i in 0..4 {
            for chat in [1001, 2002] {
                let text = format!("m{round}-{i}-{chat}");
                telegram.push_text(chat, &text);
                sent.push((chat, text));
            }
        }
        tokio::time::sleep(Duration::from_millis(350 + round * 120)).await;
        kill_hard(&mut gateway);
        gateway = start_gateway(&home);
    }
    // Let the last run finish everything.
    wait_until(
        "every message to be answered or in flight",
        Duration::from_secs(60),
        || {
            let answered: usize = [1001, 2002]
                .iter()
                .map(|c| replies_to(&telegram, *c).len())
                .sum();
            answered + 2 >= sent.len()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    kill_hard(&mut gateway);

    let mut counts: HashMap<String, usize> = HashMap::new();
    for chat in [1001, 2002] {
        for reply in replies_to(&telegram, chat) {
            *counts.entry(reply).or_default() += 1;
        }
    }
    assert!(
        counts.values().all(|&n| n == 1),
        "a message was answered twice: {counts:?}"
    );

    // Every accepted message was answered in the transcript; the only replies Telegram may lack
    // are those caught mid-handover by a kill (state `sending`: at most once, by design).
    let store = moltmate_store::Store::open(&home.join("moltmate.db")).unwrap();
    let states = store.outbox_states().await.unwrap();
    let in_flight: i64 = states
        .iter()
        .filter(|(s, _)| s == "sending")
        .map(|(_, n)| *n)
        .sum();
    for (chat, text) in &sent {
        let user = moltmate_core::UserId::new(format!("telegram_{chat}")).unwrap();
        let transcript = store.user_transcripts(&user).await.unwrap();
        let answered = transcript.iter().any(|(_, _, item)| {
            matches!(item, moltmate_core::model::ConversationItem::Assistant { text: t, .. } if t == &format!("echo: {text}"))
        });
        assert!(answered, "{text} was lost");
        if !counts.contains_key(&format!("echo: {text}")) {
            assert!(
                in_flight > 0,
                "{text} was answered but never delivered, and nothing was in flight"
            );
        }
    }
    // Per user, replies arrived in the order the messages were sent.
    for chat in [1001, 2002] {
        let replies = replies_to(&telegram, chat);
        let order: Vec<&String> = sent
            .iter()
            .filter(|(c, _)| *c == chat)
            .map(|(_, t)| t)
            .collect();
        let positions: Vec<usize> = replies
            .iter()
            .filter_map(|r| order.iter().position(|t| r == &format!("echo: {t}")))
            .collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "out of order for {chat}: {replies:?}"
        );
    }
}

#[test]
fn config_errors_name_the_key_path_and_the_likely_intended_key() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(
        home.join("moltmate.json"),
        "{\n  // comment\n  sandbox: { mood: \"all\", },\n}\n",
    )
    .unwrap();
    let (status, _, stderr) = common::run_cli(&home, &["config", "check"]);
    assert!(!status.success());
    assert!(
        stderr.contains("sandbox.mood") && stderr.contains("mode"),
        "{stderr}"
    );
    let (status, _, stderr) = common::run_cli(&home, &["serve"]);
    assert!(!status.success(), "serve must refuse a bad config");
    assert!(stderr.contains("sandbox.mood"), "{stderr}");

    std::fs::write(home.join("moltmate.json"), "{ gateway: { port: \"abc\" } }").unwrap();
    let (status, _, stderr) = common::run_cli(&home, &["config", "check"]);
    assert!(
        !status.success() && stderr.contains("gateway.port"),
        "{stderr}"
    );
}

#[test]
fn init_writes_a_private_starter_config_that_passes_check() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("fresh");
    let (status, _, stderr) = common::run_cli(&home, &["init"]);
    assert!(status.success(), "{stderr}");
    assert_eq!(
        std::fs::metadata(&home).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        std::fs::metadata(home.join("moltmate.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let (status, stdout, stderr) = common::run_cli(&home, &["config", "check"]);
    assert!(status.success(), "{stdout}{stderr}");
    let (status, _, _) = common::run_cli(&home, &["init"]);
    assert!(
        !status.success(),
        "init must not overwrite an existing config"
    );
}
