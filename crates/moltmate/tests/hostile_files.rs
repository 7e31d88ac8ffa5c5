//! Hostile files in a home, against the real gateway (Telegram double + model double): the
//! attacker replaces their context files with FIFOs (as a sandboxed `exec` could, with
//! `mkfifo`) and keeps writing; a bystander keeps chatting and must be answered within their
//! bound; the attacker is told which files were skipped; and a restart that replays the
//! attacker's pending messages does not bring the stall back.

mod common;

use common::{rss_bytes, Harness};
use moltmate_testkit::llm::Reply;
use serde_json::json;
use std::path::Path;
use std::time::Duration;

const ATTACKER: i64 = 666;
const MEMBER: i64 = 777;
const BYSTANDER: i64 = 1001;

fn mkfifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo has no other preconditions.
    assert_eq!(
        unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) },
        0,
        "{path:?}"
    );
}

/// The files the attacker turns into FIFOs, as the user sees them.
fn planted(today: &str) -> Vec<String> {
    vec![
        "SOUL.md".to_string(),
        "USER.md".to_string(),
        "MEMORY.md".to_string(),
        format!("memory/{today}.md"),
        "family/FAMILY.md".to_string(),
    ]
}

fn assert_told(reply: &str, files: &[String]) {
    for file in files {
        assert!(
            reply.contains(&format!(
                "{file} (it is a FIFO (named pipe), not a regular file)"
            )),
            "the attacker is told about {file}: {reply}"
        );
    }
}

/// Regression: "one user freezes the whole gateway" — a FIFO as SOUL.md, USER.md, MEMORY.md,
/// today's note or the family's FAMILY.md blocked every user's messages for minutes, and came
/// back after a restart because recovery replayed the pending message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifo_context_files_never_stall_the_gateway_not_even_after_a_restart() {
    let h = Harness::start(json!({
        "families": { "crew": { "members": ["telegram_666", "telegram_777"] } }
    }))
    .await;
    // Everyone has a home and a family folder; the bystander's normal answer time.
    h.round_trip(ATTACKER, "hi").await;
    h.round_trip(MEMBER, "hi").await;
    let normal = h.bystander_baseline(BYSTANDER, 3).await;
    let rss_before = rss_bytes();

    let home = h.home.join("users/telegram_666");
    let today = chrono::Local::now()
        .date_naive()
        .format("%Y-%m-%d")
        .to_string();
    for file in ["SOUL.md", "USER.md", "MEMORY.md"] {
        mkfifo(&home.join(file));
    }
    mkfifo(&home.join(format!("memory/{today}.md")));
    mkfifo(&h.home.join("families/crew/FAMILY.md"));

    // The attack: several messages at once, while the bystander keeps chatting.
    for i in 0..3 {
        h.telegram.push_text(ATTACKER, &format!("attack {i}"));
    }
    h.assert_bystander_answered(BYSTANDER, normal, "during the FIFO attack")
        .await;
    h.assert_bystander_answered(BYSTANDER, normal, "during the FIFO attack, again")
        .await;
    let replies = h.expect_reply(ATTACKER, 4).await;
    for (i, reply) in replies[1..].iter().enumerate() {
        assert!(
            reply.starts_with(&format!("echo: attack {i}")),
            "the attacker's turn still runs: {reply}"
        );
        assert_told(reply, &planted(&today));
    }
    // The other family member reads the same FAMILY.md: told too, and answered.
    let (member, _) = h.round_trip(MEMBER, "anything new?").await;
    assert!(member.starts_with("echo: anything new?"), "{member}");
    assert_told(&member, &["family/FAMILY.md".to_string()]);
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(
        grown < 64 << 20,
        "RSS grew by {grown} bytes during the attack"
    );

    // Messages the attacker sends right before a restart are still pending when it happens
    // (the model is slow for them); recovery replays them on the new gateway.
    h.llm.set_brain(|request| {
        let text = request.last_user_text().unwrap_or_default();
        let reply = Reply::text(format!("echo: {text}"));
        if text.starts_with("slow") {
            Reply::delayed(Duration::from_millis(1500), reply)
        } else {
            reply
        }
    });
    for i in 0..3 {
        h.telegram.push_text(ATTACKER, &format!("slow {i}"));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !h
        .llm
        .requests()
        .iter()
        .any(|r| r.last_user_text().is_some_and(|t| t.starts_with("slow 0")))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "slow 0 never reached the model"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pending = h
        .built
        .store
        .pending_inbox(&moltmate_core::UserId::new("telegram_666").unwrap(), 10)
        .await
        .unwrap();
    assert!(
        pending.len() >= 2,
        "messages are pending at the restart: {pending:?}"
    );

    let h = h.restart().await;
    h.assert_bystander_answered(BYSTANDER, normal, "after the restart, replaying the attack")
        .await;
    let replies = h.expect_reply(ATTACKER, 7).await;
    for (i, reply) in replies[4..].iter().enumerate() {
        assert!(reply.starts_with(&format!("echo: slow {i}")), "{reply}");
        assert_told(reply, &planted(&today));
    }
    h.assert_bystander_answered(BYSTANDER, normal, "after the replay")
        .await;
    h.stop().await;
}
