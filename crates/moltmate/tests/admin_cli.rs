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

/// A bad `TOKIO_WORKER_THREADS` is refused with a message naming it (tokio itself would panic
/// on it), and a good one is used.
#[test]
fn a_bad_worker_thread_count_is_refused_with_its_name_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    for bad in ["0", "lots", "-3"] {
        let (status, stdout, stderr) =
            common::run_cli_env(&home, &["users", "list"], &[("TOKIO_WORKER_THREADS", bad)]);
        assert!(!status.success(), "{bad}: {stdout}");
        assert!(
            stderr.contains("TOKIO_WORKER_THREADS must be a whole number"),
            "{bad}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let (status, _, stderr) =
        common::run_cli_env(&home, &["users", "list"], &[("TOKIO_WORKER_THREADS", "2")]);
    assert!(status.success(), "{stderr}");
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
            "schedule",
            "send_file",
            "web_fetch",
            "write"
        ]
    );
    assert_eq!(
        tools_for("stranger here"),
        vec![
            "edit",
            "memory_search",
            "read",
            "schedule",
            "send_file",
            "write"
        ],
        "telegram's default trust is stranger"
    );
    assert_eq!(
        tools_for("restricted here"),
        vec!["memory_search", "read", "send_file"]
    );
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

// ---- users remove / reset end everything (issue 9, "Identities end cleanly") ---------------

/// The web server of a test gateway, spoken to over HTTP like a browser or an API client.
struct Web {
    base: String,
    client: reqwest::Client,
}

impl Web {
    async fn start(h: &Harness) -> Web {
        Web {
            base: h.start_web().await,
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        }
    }

    /// Redeems a login link: the status, and the session cookie (`mm_session=...`) if any.
    async fn sign_in(&self, code: &str) -> (u16, Option<String>) {
        let response = self
            .client
            .post(format!("{}/login/{code}", self.base))
            .send()
            .await
            .unwrap();
        let cookie = response
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.split(';').next())
            .find(|pair| pair.starts_with("mm_session=") && pair.len() > "mm_session=".len())
            .map(str::to_string);
        (response.status().as_u16(), cookie)
    }

    async fn history(&self, cookie: &str) -> (u16, String) {
        let response = self
            .client
            .get(format!("{}/api/history", self.base))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    async fn csrf(&self, cookie: &str) -> String {
        let page = self
            .client
            .get(format!("{}/", self.base))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let marker = "name=\"csrf-token\" content=\"";
        let start = page.find(marker).expect("the chat page has a CSRF token") + marker.len();
        page[start..].split('"').next().unwrap().to_string()
    }

    async fn chat(&self, cookie: &str, csrf: &str, text: &str) -> (u16, String) {
        let response = self
            .client
            .post(format!("{}/api/chat", self.base))
            .header("cookie", cookie)
            .header("x-csrf-token", csrf)
            .json(&json!({ "message": text }))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    async fn models(&self, token: &str) -> u16 {
        self.client
            .get(format!("{}/v1/models", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

async fn cli(home: &std::path::Path, args: &[&str]) -> (std::process::ExitStatus, String, String) {
    common::run_cli_async(home, args).await
}

/// The code of a `users login-link` output line.
fn link_code(output: &str) -> String {
    output
        .trim()
        .rsplit("/login/")
        .next()
        .expect("a login link")
        .to_string()
}

/// The code in a pairing reply ("Your pairing code is: ABCD2345").
fn pairing_code(reply: &str) -> String {
    let start = reply.find("code is: ").expect("a pairing code") + "code is: ".len();
    reply[start..start + 8].to_string()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn sandbox_uid(show: &str) -> Option<String> {
    show.lines()
        .find_map(|l| l.strip_prefix("sandbox uid:"))
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
}

/// `users remove` or `users reset` (the CLI, another process) next to a running gateway ends
/// every credential the user had: the live browser session (its next request is 401 and does
/// not bring the user back), a login link issued before, the API token and a pending pairing
/// code of their identity; the gateway drops the user's worker. Afterwards the user (a new one
/// under the same id for `remove`, the same one for `reset`) starts with nothing of before
/// (a reset keeps identities and today's budget usage).
async fn ending_ends_every_credential(how: &str) {
    let h = Harness::start(json!({
        "gateway": { "port": common::free_port() },
        "channels": { "telegram": { "dmPolicy": "pairing", "allowFrom": [] } },
    }))
    .await;
    let web = Web::start(&h).await;
    let home = h.home.clone();
    let anna = moltmate_core::UserId::new("anna").unwrap();
    let (status, _, stderr) = cli(
        &home,
        &["users", "add", "anna", "--identity", "telegram:555"],
    )
    .await;
    assert!(status.success(), "{stderr}");
    let (status, token, stderr) = cli(&home, &["users", "token", "anna"]).await;
    assert!(status.success(), "{stderr}");
    let token = token.trim().to_string();
    let (_, first_link, _) = cli(&home, &["users", "login-link", "anna"]).await;
    let (_, second_link, _) = cli(&home, &["users", "login-link", "anna"]).await;

    // A live browser session that chatted.
    let (status, cookie) = web.sign_in(&link_code(&first_link)).await;
    assert_eq!(status, 303);
    let cookie = cookie.expect("a session cookie");
    let csrf = web.csrf(&cookie).await;
    let (status, answer) = web.chat(&cookie, &csrf, "hello from the browser").await;
    assert!(
        status == 200 && answer.contains("echo: hello from the browser"),
        "{status} {answer}"
    );
    std::fs::write(home.join("users/anna/MEMORY.md"), "anna's old memory").unwrap();
    assert_eq!(web.models(&token).await, 200);
    assert!(h.built.gateway.has_worker(&anna));
    // Her Telegram identity (linked by the operator, not paired) asks to pair: a pending code.
    h.telegram.push_text(555, "let me in");
    let code = pairing_code(&h.expect_reply(555, 1).await[0]);
    let (_, pending, _) = cli(&home, &["pairing", "list"]).await;
    assert!(pending.contains(&code), "{pending}");
    let (_, show, _) = cli(&home, &["users", "show", "anna"]).await;
    let old_uid = sandbox_uid(&show);

    let (status, out, stderr) = cli(&home, &["users", how, "anna", "--yes"]).await;
    assert!(status.success(), "{stderr}");
    assert!(
        out.contains(
            "ended 1 browser session(s), 1 login link(s), 1 API token(s), 1 pairing code(s)"
        ),
        "{out}"
    );

    // Every credential is dead, right away, and using one brings nobody back.
    assert_eq!(web.history(&cookie).await.0, 401);
    assert_eq!(web.chat(&cookie, &csrf, "am I still here?").await.0, 401);
    assert_eq!(web.sign_in(&link_code(&second_link)).await.0, 401);
    assert_eq!(web.models(&token).await, 401);
    let (status, _, _) = cli(&home, &["pairing", "approve", "telegram", &code]).await;
    assert!(
        !status.success(),
        "the pairing code of an ended user was approved"
    );
    let (_, pending, _) = cli(&home, &["pairing", "list"]).await;
    assert!(!pending.contains(&code), "{pending}");
    let record = h.built.store.user(&anna).await.unwrap();
    if how == "remove" {
        assert!(record.is_none(), "the removed user came back: {record:?}");
        assert!(!home.join("users/anna").exists());
    } else {
        let record = record.expect("a reset user stays");
        assert!(
            record
                .identities
                .iter()
                .any(|i| i.to_string() == "telegram:555"),
            "a reset keeps identities: {:?}",
            record.identities
        );
        assert!(!record.onboarded);
    }
    let gateway = h.built.gateway.clone();
    wait_until("the gateway dropped the ended user's worker", || {
        !gateway.has_worker(&anna) && gateway.held_users() == 0
    })
    .await;

    // Starting over: a new user of the id (remove) or the same user (reset) has nothing of
    // before — no memory, no transcript, no usage today, a new uid — and can sign in again.
    if how == "remove" {
        let (status, _, stderr) = cli(&home, &["users", "add", "anna"]).await;
        assert!(status.success(), "{stderr}");
    }
    assert!(
        !home.join("users/anna/MEMORY.md").exists(),
        "old memory survived"
    );
    let (_, show, _) = cli(&home, &["users", "show", "anna"]).await;
    // A new user's budget starts at zero; a reset user's day keeps what was spent (a reset is
    // not a way around a budget).
    let today = if how == "remove" { 0 } else { 1 };
    assert!(
        show.contains(&format!("messages today:   {today} of")),
        "{show}"
    );
    assert!(!show.contains("api token:"), "{show}");
    if moltmate_sandbox::disk::can_enforce() {
        assert_ne!(sandbox_uid(&show), old_uid, "{show}");
    }
    let (_, export, _) = cli(&home, &["users", "export", "anna"]).await;
    let export: serde_json::Value = serde_json::from_str(&export).unwrap();
    assert_eq!(export["transcripts"].as_array().map(Vec::len), Some(0));
    assert!(export["files"].get("MEMORY.md").is_none(), "{export}");
    let (_, link, _) = cli(&home, &["users", "login-link", "anna"]).await;
    let (status, cookie) = web.sign_in(&link_code(&link)).await;
    assert_eq!(status, 303);
    let (status, history) = web.history(&cookie.unwrap()).await;
    assert_eq!(status, 200);
    assert!(!history.contains("hello from the browser"), "{history}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_remove_next_to_a_running_gateway_ends_sessions_links_tokens_and_pairing_codes() {
    ending_ends_every_credential("remove").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_reset_next_to_a_running_gateway_ends_sessions_links_tokens_and_pairing_codes() {
    ending_ends_every_credential("reset").await;
}

/// A paired Telegram user who is removed and writes again must pair again; once re-approved,
/// the new user of the same id starts with an empty home, no memory, no transcripts, zero
/// usage today and a new sandbox uid.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_paired_user_pairs_again_and_starts_from_nothing() {
    let h = Harness::start(json!({
        "channels": { "telegram": { "dmPolicy": "pairing", "allowFrom": [] } },
    }))
    .await;
    let home = h.home.clone();
    let approve = |code: String| {
        let home = home.clone();
        async move {
            let (status, _, stderr) =
                common::run_cli_async(&home, &["pairing", "approve", "telegram", &code]).await;
            assert!(status.success(), "{stderr}");
        }
    };
    h.telegram.push_text(901, "hi");
    approve(pairing_code(&h.expect_reply(901, 1).await[0])).await;
    h.telegram.push_text(901, "first life");
    assert_eq!(h.expect_reply(901, 2).await[1], "echo: first life");
    let user_home = home.join("users/telegram_901");
    std::fs::write(user_home.join("MEMORY.md"), "first life's secret").unwrap();
    let (_, show, _) = common::run_cli_async(&home, &["users", "show", "telegram_901"]).await;
    assert!(show.contains("messages today:   1 of"), "{show}");
    let old_uid = sandbox_uid(&show);

    let (status, _, stderr) =
        common::run_cli_async(&home, &["users", "remove", "telegram_901", "--yes"]).await;
    assert!(status.success(), "{stderr}");
    assert!(!user_home.exists());

    // Writing again is a stranger writing: a new code, nothing reaches the model.
    let model_calls = h.llm.request_count();
    h.telegram.push_text(901, "it's me again");
    let reply = h.expect_reply(901, 3).await.remove(2);
    assert!(reply.contains("pairing code"), "{reply}");
    approve(pairing_code(&reply)).await;
    assert_eq!(h.llm.request_count(), model_calls);
    h.telegram.push_text(901, "second life");
    assert_eq!(h.expect_reply(901, 4).await[3], "echo: second life");
    assert!(
        !user_home.join("MEMORY.md").exists(),
        "the old memory came back"
    );
    let (_, show, _) = common::run_cli_async(&home, &["users", "show", "telegram_901"]).await;
    assert!(
        show.contains("messages today:   1 of"),
        "usage starts at zero: {show}"
    );
    if moltmate_sandbox::disk::can_enforce() {
        assert_ne!(sandbox_uid(&show), old_uid, "{show}");
    }
    let (_, export, _) = common::run_cli_async(&home, &["users", "export", "telegram_901"]).await;
    let export: serde_json::Value = serde_json::from_str(&export).unwrap();
    let transcript = export["transcripts"].to_string();
    assert!(
        transcript.contains("second life") && !transcript.contains("first life"),
        "{transcript}"
    );
    // The model saw nothing of the first life either.
    let last = h.llm.last_request().unwrap();
    assert!(
        !last.all_text().contains("first life"),
        "{}",
        last.all_text()
    );
    h.stop().await;
}

/// A reset while the user's turn runs (the model double is slow): the turn is stopped, commits
/// nothing (no transcript, no reply), the CLI does not wait for the model, and the user's next
/// message starts over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_reset_mid_turn_stops_the_turn_and_it_commits_nothing() {
    use moltmate_testkit::llm::Reply;
    let h = Harness::start(json!({})).await;
    h.telegram.push_text(1001, "hello");
    h.expect_reply(1001, 1).await;
    h.llm.set_brain(|request| {
        let text = request.last_user_text().unwrap_or_default();
        if text.contains("slow") {
            Reply::delayed(std::time::Duration::from_secs(60), Reply::text("too late"))
        } else {
            Reply::text(format!("echo: {text}"))
        }
    });
    let calls = h.llm.request_count();
    h.telegram.push_text(1001, "a slow question");
    let llm = h.llm.clone();
    wait_until("the slow turn reached the model", || {
        llm.request_count() > calls
    })
    .await;

    let started = std::time::Instant::now();
    let (status, out, stderr) =
        common::run_cli_async(&h.home, &["users", "reset", "telegram_1001", "--yes"]).await;
    assert!(status.success(), "{stderr}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "the CLI waited for the model instead of stopping the turn"
    );
    assert!(
        out.contains("a running turn was stopped"),
        "{out}\n{stderr}"
    );
    let user = moltmate_core::UserId::new("telegram_1001").unwrap();
    let gateway = h.built.gateway.clone();
    wait_until("the worker is gone", || !gateway.has_worker(&user)).await;
    assert!(h
        .built
        .store
        .user_transcripts(&user)
        .await
        .unwrap()
        .is_empty());

    h.telegram.push_text(1001, "fresh start");
    let replies = h.expect_reply(1001, 2).await;
    assert_eq!(replies[1], "echo: fresh start");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let replies: Vec<String> = h
        .telegram
        .sent_messages()
        .into_iter()
        .filter(|m| m.chat_id == "1001")
        .map(|m| m.text)
        .collect();
    assert!(
        !replies.iter().any(|r| r.contains("too late")),
        "{replies:?}"
    );
    let transcript = format!("{:?}", h.built.store.user_transcripts(&user).await.unwrap());
    assert!(
        transcript.contains("fresh start") && !transcript.contains("slow question"),
        "{transcript}"
    );
    h.stop().await;
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
