//! Trust levels mean what they say, end to end: a `family` user's model (exec forced to
//! `allowlist` whatever `tools.exec.security` says) asks for the escapes the old default
//! `safeBins` allowed (`awk 'BEGIN{system("id")}'`, `sed '1e id'`) and for a file write through
//! a kept safe bin (`uniq IN OUT`): each is refused with a message the model can act on, nothing
//! runs, nothing is written; a plain pipeline of safe bins still works. On bubblewrap and Docker.
//!
//! Without the backend these tests print `SKIP: <reason>` and pass, unless
//! `MOLTMATE_REQUIRE_SANDBOX=1`.

mod common;

use common::Harness;
use moltmate_testkit::llm::Reply;
use serde_json::json;

fn skip_or_fail(reason: &str) {
    if std::env::var("MOLTMATE_REQUIRE_SANDBOX").as_deref() == Ok("1") {
        panic!("sandbox required but unavailable: {reason}");
    }
    eprintln!("SKIP: {reason}");
}

async fn start(backend: &str) -> Option<Harness> {
    if backend == "docker" {
        let dir = tempfile::tempdir().ok()?;
        let settings = moltmate_sandbox::SandboxSettings {
            backend: moltmate_sandbox::BackendChoice::Docker,
            scope: moltmate_sandbox::SandboxScope::User,
            image: "moltmate-sandbox:bookworm-slim".into(),
            docker_host: None,
            prune_idle: std::time::Duration::from_secs(600),
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
    // The operator allows everything for owners; family trust still gets the allowlist.
    let harness = Harness::start(json!({
        "sandbox": { "backend": backend, "mode": "all", "scope": "user" },
        "tools": { "exec": { "security": "full", "timeoutSeconds": 10 } },
        "users": {
            "telegram_1001": { "identities": ["telegram:1001"], "trust": "family" }
        }
    }))
    .await;
    if harness.built.sandbox.as_ref().map(|s| s.backend()) != Some(backend) {
        skip_or_fail(&format!("the {backend} backend could not be selected"));
        harness.stop().await;
        return None;
    }
    harness.llm.set_brain(|request| {
        if let Some(result) = request.trailing_tool_results() {
            return Reply::text(format!("result: {result}"));
        }
        let text = request.last_user_text().unwrap_or_default();
        match text.strip_prefix("run: ") {
            Some(command) => Reply::tool_call("exec", json!({ "command": command })),
            None => Reply::text(format!("echo: {text}")),
        }
    });
    Some(harness)
}

async fn family_allowlist_refuses_program_runners_and_writes(backend: &str) {
    let Some(h) = start(backend).await else {
        return;
    };
    let home = h.home.join("users/telegram_1001");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("notes.txt"), "a\na\nb\n").unwrap();

    // Replies accumulate per chat: the n-th command's answer is the n-th message.
    let mut sent = 0;
    for (command, expected) in [
        (
            "awk 'BEGIN{system(\"id\")}'",
            "program `awk` is not allowed",
        ),
        ("sed -n '1e id' notes.txt", "program `sed` is not allowed"),
        ("find . -exec id ;", "`;`"),
        ("sh -c id", "program `sh` is not allowed"),
        ("uniq notes.txt pwned", "a file uniq would write"),
        (
            "uniq --skip-fields=0 -- notes.txt pwned",
            "a file uniq would write",
        ),
        ("cat notes.txt | uniq - pwned", "a file uniq would write"),
        ("date -s 2000-01-01", "sets the system clock"),
    ] {
        h.telegram.push_text(1001, &format!("run: {command}"));
        sent += 1;
        let reply = h.expect_reply(1001, sent).await.remove(sent - 1);
        assert!(reply.contains("command refused"), "{command}: {reply}");
        // Telegram shows the reply's `code` spans as code (the backticks are formatting).
        assert!(
            reply.contains(&expected.replace('`', "")),
            "{command}: {reply}"
        );
        assert!(!reply.contains("uid="), "{command} ran: {reply}");
        assert!(!home.join("pwned").exists(), "{command} wrote a file");
    }

    h.telegram.push_text(1001, "run: cat notes.txt | uniq -c");
    let reply = h.expect_reply(1001, sent + 1).await.remove(sent);
    assert!(
        reply.contains("2 a") && reply.contains("1 b"),
        "a pipeline of safe bins runs: {reply}"
    );
    h.stop().await;
}

#[tokio::test]
async fn bwrap_family_allowlist_refuses_program_runners_and_writes() {
    family_allowlist_refuses_program_runners_and_writes("bwrap").await;
}

#[tokio::test]
async fn docker_family_allowlist_refuses_program_runners_and_writes() {
    family_allowlist_refuses_program_runners_and_writes("docker").await;
}
