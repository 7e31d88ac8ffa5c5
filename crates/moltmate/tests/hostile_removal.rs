//! Hostile removal: an attacker is removed by the operator (`moltmate users remove`, the real
//! binary, next to the running gateway) while their turn runs — a slow model answer, or a
//! command in their sandbox on Docker and on bubblewrap — and a bystander keeps chatting.
//! The bystander stays within 2× their normal answer time + 500 ms; nothing of the attacker
//! survives: no database row with their id but the operator's audit and usage records, no
//! home, no memory index, no container, no process; the aborted turn commits and sends
//! nothing; the worker is gone; and when the same Telegram identity writes again (`open`
//! policy) a new user starts with nothing of the old one.
//!
//! The sandbox tests print `SKIP: <reason>` without the backend, unless
//! `MOLTMATE_REQUIRE_SANDBOX=1`, which turns a skip into a failure.

mod common;

use common::{bystander_bound, rows_naming, rss_bytes, run_cli_async, Harness};
use moltmate_core::UserId;
use moltmate_testkit::llm::Reply;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

const ATTACKER: i64 = 6666;
const BYSTANDER: i64 = 7777;
const ATTACKER_ID: &str = "telegram_6666";
/// Tables that keep rows of a removed user: the operator's records (and the removal signal).
const OPERATOR_RECORDS: &[&str] = &["audit_events", "token_usage", "user_events"];

fn skip_or_fail(reason: &str) {
    if std::env::var("MOLTMATE_REQUIRE_SANDBOX").as_deref() == Ok("1") {
        panic!("sandbox required but unavailable: {reason}");
    }
    eprintln!("SKIP: {reason}");
}

/// The attacker's model: `remember: X` writes MEMORY.md, `search: X` searches memory, `slow`
/// answers after a minute, `run: CMD` runs CMD in the sandbox (up to a minute); tool results
/// are echoed.
fn attacker_brain(h: &Harness) {
    h.llm.set_brain(|request| {
        if let Some(result) = request.trailing_tool_results() {
            return Reply::text(format!("tool said: {result}"));
        }
        let text = request.last_user_text().unwrap_or_default();
        if let Some(memory) = text.strip_prefix("remember: ") {
            Reply::tool_call("write", json!({ "path": "MEMORY.md", "content": memory }))
        } else if let Some(query) = text.strip_prefix("search: ") {
            Reply::tool_call("memory_search", json!({ "query": query }))
        } else if let Some(command) = text.strip_prefix("run: ") {
            Reply::tool_call("exec", json!({ "command": command, "timeout_seconds": 60 }))
        } else if text.contains("slow") {
            Reply::delayed(Duration::from_secs(60), Reply::text("the slow answer"))
        } else {
            Reply::text(format!("echo: {text}"))
        }
    });
}

/// Host processes whose real or effective uid is `uid`.
fn processes_of_uid(uid: u32) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let uids: Vec<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .map(|l| {
                l.split_whitespace()
                    .filter_map(|u| u.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if uids.iter().take(2).any(|u| *u == uid) {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push(format!(
                "{name}: {}",
                String::from_utf8_lossy(&cmdline).replace('\0', " ")
            ));
        }
    }
    found
}

/// Host processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let own = std::process::id().to_string();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == own || !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!("{name}: {cmdline}"));
        }
    }
    found
}

/// The Docker containers of `user` made by the gateway of `home` (any state).
async fn containers_of(home: &Path, user: &str) -> Vec<String> {
    let config = moltmate::wiring::load_config(home).unwrap();
    let settings = moltmate::wiring::sandbox_settings(home, &config);
    let docker = moltmate_sandbox::docker::DockerSandbox::connect(&settings).unwrap();
    moltmate_core::sandbox::Sandbox::list(&docker)
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.user == user)
        .map(|s| s.name)
        .collect()
}

/// Runs `users remove` (the real binary) while the bystander keeps chatting, each round trip
/// held to the bound. Returns the CLI's stdout and how long it took.
async fn remove_while_bystander_chats(h: &Harness, normal: Duration) -> (String, Duration) {
    let bound = bystander_bound(normal);
    let home = h.home.clone();
    let started = Instant::now();
    let cli = tokio::spawn(async move {
        run_cli_async(&home, &["users", "remove", ATTACKER_ID, "--yes"]).await
    });
    let mut rounds = 0;
    let mut slowest = Duration::ZERO;
    while !cli.is_finished() || rounds < 3 {
        let (reply, took) = h
            .round_trip(
                BYSTANDER,
                &format!("still there? (removal, round {rounds})"),
            )
            .await;
        assert!(
            took <= bound,
            "round {rounds}: bystander answered in {took:?}, over the bound {bound:?} (normal {normal:?}); reply {reply:?}"
        );
        slowest = slowest.max(took);
        rounds += 1;
        // Paced: a removal can take seconds, and a bystander chatting flat out hit the daily
        // message budget (100) before it ended, then waited for an answer that never came.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, out, stderr) = cli.await.unwrap();
    let took = started.elapsed();
    assert!(status.success(), "{stderr}");
    eprintln!(
        "removal took {took:?}; bystander normal {normal:?}, slowest {slowest:?} over {rounds} rounds (bound {bound:?})\n{out}{stderr}"
    );
    (out, took)
}

/// Nothing of the attacker is left: rows, home, index, disk image, worker; no reply of the
/// aborted turn was sent.
async fn assert_nothing_left(h: &Harness) {
    let rows = rows_naming(&h.home, ATTACKER_ID, OPERATOR_RECORDS);
    assert!(rows.is_empty(), "rows of the removed attacker: {rows:?}");
    assert!(!h.home.join("users").join(ATTACKER_ID).exists(), "home");
    for suffix in ["db", "db-wal", "db-shm"] {
        let index = h.home.join("index").join(format!("{ATTACKER_ID}.{suffix}"));
        assert!(!index.exists(), "memory index {}", index.display());
    }
    assert!(!h
        .home
        .join("sandboxes/disks")
        .join(format!("{ATTACKER_ID}.img"))
        .exists());
    assert!(!h.home.join("sandboxes/scratch").join(ATTACKER_ID).exists());
    let user = UserId::new(ATTACKER_ID).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.built.gateway.has_worker(&user) || h.built.gateway.held_users() > 0 {
        assert!(Instant::now() < deadline, "the attacker's worker lives on");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give an aborted turn time to (wrongly) send something.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let late: Vec<String> = h
        .telegram
        .sent_messages()
        .into_iter()
        .filter(|m| m.chat_id == ATTACKER.to_string())
        .map(|m| m.text)
        .filter(|t| {
            t.contains("the slow answer") || t.contains("tool said: ") && t.contains("sleep")
        })
        .collect();
    assert!(late.is_empty(), "the aborted turn answered: {late:?}");
}

/// The same Telegram identity writes again (`open`): a new user with nothing of the old one.
async fn assert_new_life_is_empty(h: &Harness, old_uid: Option<u32>) {
    let before = h
        .telegram
        .sent_messages()
        .iter()
        .filter(|m| m.chat_id == ATTACKER.to_string())
        .count();
    h.telegram.push_text(ATTACKER, "hello again");
    let replies = h.expect_reply(ATTACKER, before + 1).await;
    assert_eq!(replies[before], "echo: hello again");
    let request = h.llm.last_request().unwrap();
    assert!(
        !request.all_text().contains("attacker secret"),
        "the new user's model saw the old memory: {}",
        request.all_text()
    );
    let user = UserId::new(ATTACKER_ID).unwrap();
    let home = h.home.join("users").join(ATTACKER_ID);
    assert!(
        !home.join("MEMORY.md").exists(),
        "old memory in the new home"
    );
    let periods = moltmate_gateway::budget::Periods::now();
    let used = h
        .built
        .store
        .usage_totals(std::slice::from_ref(&user), &periods.day, &periods.month)
        .await
        .unwrap();
    assert_eq!(
        used.messages_today, 1,
        "the new user inherited usage: {used:?}"
    );
    let transcript = format!("{:?}", h.built.store.user_transcripts(&user).await.unwrap());
    assert!(
        transcript.contains("hello again") && !transcript.contains("attacker secret"),
        "{transcript}"
    );
    if let Some(old) = old_uid {
        let new = h.built.store.sandbox_uids().await.unwrap()[ATTACKER_ID];
        assert_ne!(new, old, "the new user got the old uid");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_attacker_removed_mid_turn_leaves_nothing_while_a_bystander_chats() {
    // Budgets are not what this test is about: the bystander's many round trips must not run
    // into the default 100 messages a day.
    let h = Harness::start(json!({ "limits": { "messagesPerDay": 100_000 } })).await;
    attacker_brain(&h);
    let normal = h.bystander_baseline(BYSTANDER, 3).await;
    let rss_before = rss_bytes();

    // The attacker's life: a memory file, a memory index, a transcript, usage.
    h.telegram
        .push_text(ATTACKER, "remember: the attacker secret");
    h.expect_reply(ATTACKER, 1).await;
    h.telegram.push_text(ATTACKER, "search: secret");
    h.expect_reply(ATTACKER, 2).await;
    assert!(h
        .home
        .join("users")
        .join(ATTACKER_ID)
        .join("MEMORY.md")
        .exists());
    assert!(h
        .home
        .join("index")
        .join(format!("{ATTACKER_ID}.db"))
        .exists());
    let old_uid = h
        .built
        .store
        .sandbox_uids()
        .await
        .unwrap()
        .get(ATTACKER_ID)
        .copied();
    // A slow turn in flight, and more messages queued behind it.
    let calls = h.llm.request_count();
    h.telegram.push_text(ATTACKER, "a slow one");
    for n in 0..5 {
        h.telegram.push_text(ATTACKER, &format!("queued {n}"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.llm.request_count() == calls {
        assert!(
            Instant::now() < deadline,
            "the slow turn never reached the model"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (out, took) = remove_while_bystander_chats(&h, normal).await;
    assert!(
        took < Duration::from_secs(30),
        "the removal waited for the model instead of stopping the turn ({took:?})"
    );
    assert!(out.contains("a running turn was stopped"), "{out}");
    assert!(out.contains("waiting message(s) dropped"), "{out}");
    assert_nothing_left(&h).await;
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(grown < 64 << 20, "RSS grew by {} MB", grown >> 20);

    assert_new_life_is_empty(&h, old_uid).await;
    h.stop().await;
}

/// Owners with full `exec` on `backend`; `None` (after a skip) when it is not available.
/// `uid_start` gives the test a uid range of its own, so the processes it looks for are its
/// own and not those of another test running at the same time.
async fn sandbox_harness(backend: &str, uid_start: u32) -> Option<Harness> {
    if backend == "docker" {
        let dir = tempfile::tempdir().ok()?;
        let settings = moltmate_sandbox::SandboxSettings {
            backend: moltmate_sandbox::BackendChoice::Docker,
            scope: moltmate_sandbox::SandboxScope::User,
            image: "moltmate-sandbox:bookworm-slim".into(),
            docker_host: None,
            prune_idle: Duration::from_secs(600),
            state_dir: dir.path().to_path_buf(),
            allowed_domains: vec![],
            config_digest: String::new(),
        };
        if !moltmate_sandbox::docker::docker_available(&settings).await {
            skip_or_fail("no Docker daemon answers");
            return None;
        }
        if let Err(reason) = common::ensure_sandbox_image(&settings).await {
            skip_or_fail(&reason);
            return None;
        }
    } else if moltmate_sandbox::bwrap::find_bwrap().is_none() {
        skip_or_fail("bubblewrap (bwrap) is not installed");
        return None;
    }
    let h = Harness::start(json!({
        "sandbox": {
            "backend": backend, "mode": "all", "scope": "user",
            "limits": { "pids": 64, "memoryMb": 256 },
            "uidRange": { "start": uid_start, "count": 1000 }
        },
        "tools": { "exec": { "security": "full", "timeoutSeconds": 60 } },
        "users": {
            "telegram_6666": { "identities": ["telegram:6666"], "trust": "owner" },
            "telegram_7777": { "identities": ["telegram:7777"], "trust": "owner" }
        }
    }))
    .await;
    if h.built.sandbox.as_ref().map(|s| s.backend()) != Some(backend) {
        skip_or_fail(&format!("the {backend} backend could not be selected"));
        h.stop().await;
        return None;
    }
    attacker_brain(&h);
    Some(h)
}

/// The attacker runs a long command (plus a background one) in their sandbox and is removed
/// while it runs: their container (Docker) and every process (both backends) are gone.
async fn removed_mid_command(backend: &str, uid_start: u32) {
    let Some(h) = sandbox_harness(backend, uid_start).await else {
        return;
    };
    let normal = h.bystander_baseline(BYSTANDER, 3).await;
    h.telegram
        .push_text(ATTACKER, "remember: the attacker secret");
    h.expect_reply(ATTACKER, 1).await;
    let old_uid = h
        .built
        .store
        .sandbox_uids()
        .await
        .unwrap()
        .get(ATTACKER_ID)
        .copied();
    // The fractional seconds make the command line unique (found by it without per-user uids).
    let marker = format!("sleep 45.{}", std::process::id());
    h.telegram
        .push_text(ATTACKER, &format!("run: sleep 300 & {marker}"));
    // Wait until the command runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let running = match old_uid {
            Some(uid) => !processes_of_uid(uid).is_empty(),
            None => !processes_mentioning(&marker).is_empty(),
        };
        if running {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the attacker's command never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if backend == "docker" {
        assert!(!containers_of(&h.home, ATTACKER_ID).await.is_empty());
    }

    let (out, took) = remove_while_bystander_chats(&h, normal).await;
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert!(out.contains("a running turn was stopped"), "{out}");
    if backend == "docker" {
        let left = containers_of(&h.home, ATTACKER_ID).await;
        assert!(
            left.is_empty(),
            "containers of the removed attacker: {left:?}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = match old_uid {
            Some(uid) => processes_of_uid(uid),
            None => processes_mentioning(&marker),
        };
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes of the removed attacker: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_nothing_left(&h).await;
    assert_new_life_is_empty(&h, old_uid).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_attacker_removed_mid_command_leaves_no_process_bwrap() {
    removed_mid_command("bwrap", 2_001_000_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_attacker_removed_mid_command_leaves_no_container_or_process_docker() {
    removed_mid_command("docker", 2_002_000_000).await;
}

/// With no gateway running, `users remove` removes the user's Docker containers itself
/// (a stopped gateway leaves them for adoption by its next start).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_remove_without_a_gateway_removes_the_users_docker_containers() {
    let Some(h) = sandbox_harness("docker", 2_003_000_000).await else {
        return;
    };
    h.telegram.push_text(ATTACKER, "run: echo warm");
    let reply = h.expect_reply(ATTACKER, 1).await.remove(0);
    assert!(reply.contains("warm"), "{reply}");
    let home = h.home.clone();
    assert_eq!(containers_of(&home, ATTACKER_ID).await.len(), 1);
    let _dir = h.stop_keeping_sandboxes().await;
    assert_eq!(
        containers_of(&home, ATTACKER_ID).await.len(),
        1,
        "a stopped gateway keeps its sandboxes"
    );
    let (status, out, stderr) =
        run_cli_async(&home, &["users", "remove", ATTACKER_ID, "--yes"]).await;
    assert!(status.success(), "{stderr}");
    assert!(out.contains("1 sandbox container(s) removed"), "{out}");
    assert!(containers_of(&home, ATTACKER_ID).await.is_empty());
    let rows = rows_naming(&home, ATTACKER_ID, OPERATOR_RECORDS);
    assert!(rows.is_empty(), "{rows:?}");
    common::release_volumes(&home);
}
