//! The operator's commands, run as the real binary against a home a gateway has used, and the
//! per-user features as seen over Telegram.

mod common;

use common::{run_cli, Harness};
use moltmate_testkit::telegram::IncomingText;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_commands_list_show_export_reset_and_remove() {
    let h = Harness::start(json!({})).await;
    h.telegram.push_text(1001, "hello, I am Alice");
    h.expect_reply(1001, 1).await;
    std::fs::write(
        h.home.join("users/telegram_1001/MEMORY.md"),
        "Alice likes chess",
    )
    .unwrap();
    let home = h.home.clone();
    let _dir = h.stop().await;

    let (status, stdout, stderr) = run_cli(
        &home,
        &[
            "users",
            "add",
            "anna",
            "--identity",
            "telegram:555",
            "--name",
            "Anna",
        ],
    );
    assert!(status.success(), "{stderr}");
    assert!(home.join("users/anna").is_dir());
    let (_, stdout_list, _) = run_cli(&home, &["users", "list"]);
    assert!(
        stdout_list.contains("telegram_1001")
            && stdout_list.contains("anna")
            && stdout_list.contains("telegram:555"),
        "{stdout_list}"
    );
    let (status, show, _) = run_cli(&home, &["users", "show", "telegram_1001"]);
    assert!(
        status.success() && show.contains("telegram:1001") && show.contains("MEMORY.md"),
        "{show}"
    );
    // Usage against the budgets of the user's trust level (Telegram default: stranger).
    assert!(
        show.contains("trust:       stranger (telegram default)"),
        "{show}"
    );
    assert!(show.contains("messages today:   1 of 100"), "{show}");
    assert!(show.contains("tokens today:"), "{show}");
    assert!(show.contains("spend this month: $0.00 of $2.00"), "{show}");
    assert!(
        show.contains("stored:") && show.contains("of 32.0 MB"),
        "{show}"
    );
    let (status, export, _) = run_cli(&home, &["users", "export", "telegram_1001"]);
    assert!(status.success(), "{stdout}");
    let export: serde_json::Value = serde_json::from_str(&export).expect("export is JSON");
    assert_eq!(export["files"]["MEMORY.md"], "Alice likes chess");
    assert!(export["transcripts"]
        .as_array()
        .is_some_and(|t| !t.is_empty()));

    let (status, _, stderr) = run_cli(&home, &["users", "reset", "telegram_1001"]);
    assert!(
        !status.success() && stderr.contains("--yes"),
        "destructive commands need --yes: {stderr}"
    );
    let (status, out, stderr) = run_cli(&home, &["users", "reset", "telegram_1001", "--yes"]);
    assert!(status.success(), "{stderr}");
    assert!(out.contains("archived"), "{out}");
    assert!(
        !home.join("users/telegram_1001/MEMORY.md").exists(),
        "the home was wiped"
    );
    let archived: Vec<_> = std::fs::read_dir(home.join("archive"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(archived.len(), 1);
    assert_eq!(
        std::fs::read_to_string(archived[0].path().join("home/MEMORY.md")).unwrap(),
        "Alice likes chess"
    );
    let (_, export, _) = run_cli(&home, &["users", "export", "telegram_1001"]);
    let export: serde_json::Value = serde_json::from_str(&export).unwrap();
    assert!(
        export["transcripts"]
            .as_array()
            .is_some_and(|t| t.is_empty()),
        "sessions were wiped"
    );

    // Her sandbox scratch directory (`workspaceAccess: none`) is hers too.
    let scratch = home.join("sandboxes/scratch/anna");
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::write(scratch.join("notes.txt"), "scratch").unwrap();
    let (status, _, stderr) = run_cli(&home, &["users", "remove", "anna", "--yes"]);
    assert!(status.success(), "{stderr}");
    assert!(!scratch.exists(), "the scratch directory outlived its user");
    let (_, list, _) = run_cli(&home, &["users", "list"]);
    assert!(!list.contains("anna"), "{list}");

    let (status, token, stderr) = run_cli(&home, &["users", "token", "bob"]);
    assert!(
        status.success() && token.trim().starts_with("mm_"),
        "{stderr}"
    );
    let (status, link, _) = run_cli(&home, &["users", "login-link", "bob"]);
    assert!(
        status.success() && link.trim().starts_with("http://127.0.0.1:18790/login/"),
        "{link}"
    );
    let (status, out, _) = run_cli(&home, &["users", "token", "bob", "--revoke"]);
    assert!(status.success() && out.contains("Revoked 1"), "{out}");
    // `show` and `export` mounted the stopped gateway's volumes again to read the files.
    common::release_volumes(&home);
}

/// Behind a reverse proxy (the seed's Traefik set-up) a login link must point where people
/// reach the gateway, not at its listening address; a wildcard bind is never printed.
#[test]
fn login_links_use_the_public_url_and_never_a_wildcard_address() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (status, _, stderr) = run_cli(&home, &["init"]);
    assert!(status.success(), "{stderr}");
    let config = home.join("moltmate.json");

    std::fs::write(
        &config,
        r#"{ gateway: { bind: "0.0.0.0", auth: { token: "abcdefghijklmnopqrstuvwx" } } }"#,
    )
    .unwrap();
    let (status, _, stderr) = run_cli(&home, &["users", "add", "anna"]);
    assert!(status.success(), "{stderr}");
    let (status, link, stderr) = run_cli(&home, &["users", "login-link", "anna"]);
    assert!(status.success(), "{stderr}");
    assert!(
        link.trim().starts_with("http://127.0.0.1:18790/login/"),
        "{link}"
    );

    std::fs::write(
        &config,
        r#"{ gateway: { publicUrl: "https://moltbot.example.com/", trustedProxies: ["172.18.0.2"] } }"#,
    )
    .unwrap();
    let (status, link, stderr) = run_cli(&home, &["users", "login-link", "anna"]);
    assert!(status.success(), "{stderr}");
    assert!(
        link.trim()
            .starts_with("https://moltbot.example.com/login/"),
        "{link}"
    );

    std::fs::write(
        &config,
        r#"{ gateway: { publicUrl: "https://example.com/moltmate" } }"#,
    )
    .unwrap();
    let (status, _, stderr) = run_cli(&home, &["config", "check"]);
    assert!(!status.success());
    assert!(stderr.contains("gateway.publicUrl"), "{stderr}");
}

/// The `sandbox uid:` line of `users show`.
fn shown_uid(show: &str) -> String {
    show.lines()
        .find_map(|l| l.strip_prefix("sandbox uid:"))
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| panic!("no sandbox uid line in {show}"))
}

/// A root gateway gives each user their own sandbox uid from `sandbox.uidRange`, owns their
/// home with it, shows it in `users show`, and never gives a removed user's uid to anyone: a
/// new user under the same name starts with a fresh uid (and an empty home).
#[test]
fn sandbox_uids_are_per_user_shown_and_never_reused_after_remove() {
    use std::os::unix::fs::MetadataExt;
    if !moltmate_sandbox::disk::can_enforce() {
        println!("SKIP: per-user sandbox uids need root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(
        home.join("moltmate.json"),
        r#"{ sandbox: { uidRange: { start: 3000000, count: 100 } } }"#,
    )
    .unwrap();
    for user in ["anna", "bob"] {
        let (status, _, stderr) = run_cli(&home, &["users", "add", user]);
        assert!(status.success(), "{stderr}");
    }
    let (_, show_anna, _) = run_cli(&home, &["users", "show", "anna"]);
    let (_, show_bob, _) = run_cli(&home, &["users", "show", "bob"]);
    assert!(shown_uid(&show_anna).starts_with("3000000 "), "{show_anna}");
    assert!(shown_uid(&show_bob).starts_with("3000001 "), "{show_bob}");
    let anna_home = home.join("users/anna");
    let meta = std::fs::metadata(&anna_home).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (3_000_000, 3_000_000, 0o700)
    );
    std::fs::write(anna_home.join("MEMORY.md"), "old anna").unwrap();

    let (status, _, stderr) = run_cli(&home, &["users", "remove", "anna", "--yes"]);
    assert!(status.success(), "{stderr}");
    let (status, _, stderr) = run_cli(&home, &["users", "add", "anna"]);
    assert!(status.success(), "{stderr}");
    let (_, show_again, _) = run_cli(&home, &["users", "show", "anna"]);
    assert!(
        shown_uid(&show_again).starts_with("3000002 "),
        "{show_again}"
    );
    assert_eq!(std::fs::metadata(&anna_home).unwrap().uid(), 3_000_002);
    assert!(
        !anna_home.join("MEMORY.md").exists(),
        "the new anna starts empty"
    );
    // A reset starts the user over under a fresh uid as well.
    let (status, _, stderr) = run_cli(&home, &["users", "reset", "bob", "--yes"]);
    assert!(status.success(), "{stderr}");
    let (_, show_bob, _) = run_cli(&home, &["users", "show", "bob"]);
    assert!(shown_uid(&show_bob).starts_with("3000003 "), "{show_bob}");
    assert_eq!(
        std::fs::metadata(home.join("users/bob")).unwrap().uid(),
        3_000_003
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn onboarding_over_telegram_speaks_the_senders_language() {
    let h = Harness::start(json!({ "onboarding": { "enabled": true } })).await;
    h.telegram
        .push_message(IncomingText::new(1001, "Hallo").language_code("de"));
    let menu = h.expect_reply(1001, 1).await.remove(0);
    assert!(
        menu.contains("Wie soll ich sein?") && menu.contains("Molty"),
        "{menu}"
    );
    h.telegram
        .push_message(IncomingText::new(1001, "3").language_code("de"));
    assert!(h.expect_reply(1001, 2).await[1].contains("Molty"));
    h.telegram
        .push_message(IncomingText::new(1001, "Wer bist du?").language_code("de"));
    assert_eq!(h.expect_reply(1001, 3).await[2], "echo: Wer bist du?");
    assert!(h
        .llm
        .last_request()
        .unwrap()
        .system_text()
        .contains("You are Molty"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trust_levels_decide_which_tools_each_users_model_is_offered() {
    let h = Harness::start(json!({
        "users": {
            "telegram_1001": { "identities": ["telegram:1001"], "trust": "owner" },
            "telegram_3003": { "identities": ["telegram:3003"], "trust": "restricted" }
        }
    }))
    .await;
    h.telegram.push_text(1001, "owner here");
    h.telegram.push_text(2002, "stranger here");
    h.telegram.push_text(3003, "restricted here");
    for chat in [1001, 2002, 3003] {
        h.expect_reply(chat, 1).await;
    }
    let tools_for = |text: &str| {
        let request = h
            .llm
            .requests()
            .into_iter()
            .find(|r| r.last_user_text().as_deref() == Some(text))
            .unwrap();
        let mut tools = request.tool_names();
        tools.sort();
        tools
    };
    assert_eq!(
        tools_for("owner here"),
        vec![
            "edit",
            "exec",
            "memory_search",
            "read",
            "web_fetch",
            "write"
        ]
    );
    assert_eq!(
        tools_for("stranger here"),
        vec!["edit", "memory_search", "read", "write"],
        "telegram's default trust is stranger"
    );
    assert_eq!(tools_for("restricted here"), vec!["memory_search", "read"]);
    h.stop().await;
}

/// Regression: `users reset`/`remove` copied the home with `std::fs::copy` (which opens a FIFO
/// and waits) and recursion without bounds, so a user could hang or fail their own removal.
/// Now the copy skips what it cannot copy, says so, and the command completes.
#[test]
fn users_remove_of_a_hostile_home_completes_and_lists_what_was_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let (status, _, stderr) = run_cli(&home, &["users", "add", "mallory"]);
    assert!(status.success(), "{stderr}");
    let user_home = home.join("users/mallory");
    std::fs::write(user_home.join("MEMORY.md"), "keep").unwrap();
    let fifo =
        std::ffi::CString::new(user_home.join("SOUL.md").as_os_str().as_encoded_bytes()).unwrap();
    std::fs::remove_file(user_home.join("SOUL.md")).ok();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let _socket = std::os::unix::net::UnixListener::bind(user_home.join("sock")).unwrap();
    let mut deep = user_home.join("workspace");
    for _ in 0..1000 {
        deep.push("d");
    }
    std::fs::create_dir_all(&deep).unwrap();

    let (status, _, stderr) = run_cli(&home, &["users", "remove", "mallory", "--yes"]);
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("were not archived"), "{stderr}");
    assert!(!user_home.exists());
    let archive = std::fs::read_dir(home.join("archive"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(
        std::fs::read_to_string(archive.join("home/MEMORY.md")).unwrap(),
        "keep"
    );
    let skipped = std::fs::read_to_string(archive.join("SKIPPED.txt")).unwrap();
    assert!(
        skipped.contains("SOUL.md: it is a FIFO") && skipped.contains("nested too deep"),
        "{skipped}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_approve_works_for_every_messaging_channel() {
    use moltmate_core::{ChannelKind, Identity, PeerId};
    use moltmate_store::pairing::{PairingLimits, PairingOutcome, StrangerMessage};
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    common::write_config(&home, &json!({}));
    let (status, _, stderr) = run_cli(&home, &["pairing", "list"]);
    assert!(status.success(), "{stderr}");
    let store = moltmate_store::Store::open(&home.join("moltmate.db")).unwrap();
    let limits = PairingLimits {
        ttl: std::time::Duration::from_secs(3600),
        max_pending: 100,
        max_pending_per_channel: 50,
    };
    let senders = [
        (
            ChannelKind::Signal,
            "+4917012345678",
            "signal__4917012345678",
        ),
        (
            ChannelKind::Whatsapp,
            "+4917099999999",
            "whatsapp__4917099999999",
        ),
        (
            ChannelKind::Discord,
            "80351110224678912",
            "discord_80351110224678912",
        ),
        (
            ChannelKind::Slack,
            "T024BE7LD/U0G9QF9C6",
            "slack_t024be7ld_u0g9qf9c6",
        ),
    ];
    for (channel, peer, user) in senders {
        let outcome = store
            .pairing_for_stranger(
                StrangerMessage {
                    identity: Identity::new(channel, PeerId::new(peer).unwrap()),
                    chat_id: peer.to_string(),
                    sender_name: None,
                    cursor: None,
                },
                limits,
                |code| format!("code {code}"),
            )
            .await
            .unwrap();
        let PairingOutcome::Created { request, .. } = outcome else {
            panic!("{channel}: no code: {outcome:?}")
        };
        // The channel name as the operator types it, any case.
        let typed = channel.as_str().to_ascii_uppercase();
        let (status, stdout, stderr) = run_cli(
            &home,
            &["pairing", "approve", &typed, &request.code.to_lowercase()],
        );
        assert!(status.success(), "{channel}: {stderr}");
        assert!(
            stdout.contains(&format!("Approved {channel}:{peer} as user {user}")),
            "{stdout}"
        );
        assert!(home.join("users").join(user).is_dir(), "{user}'s home");
    }
    let (status, _, stderr) = run_cli(&home, &["pairing", "approve", "icq", "ABCD2345"]);
    assert!(!status.success());
    assert!(stderr.contains("expected one of"), "{stderr}");
}
