//! End-to-end tests in headless Chromium over WebDriver (`chromium` + `chromium-driver`).
//!
//! Without the browser or the driver the test prints `SKIP: <reason>` and passes, unless
//! `MOLTMATE_REQUIRE_BROWSER=1`, where it fails. Screenshots of the chat at phone width and of
//! the dashboard land in `target/screenshots/`.

mod common;

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use moltmate_core::{ChannelKind, Identity, PeerId};
use std::path::{Path, PathBuf};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

fn find_in_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

fn skip_or_fail(reason: &str) {
    if std::env::var("MOLTMATE_REQUIRE_BROWSER").as_deref() == Ok("1") {
        panic!("browser tests are required (MOLTMATE_REQUIRE_BROWSER=1) but {reason}");
    }
    println!("SKIP: {reason}");
}

fn screenshots_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join("screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running chromedriver, killed on drop.
struct Driver {
    _child: tokio::process::Child,
    url: String,
    chromium: PathBuf,
    profiles: tempfile::TempDir,
}

impl Driver {
    async fn start(chromedriver: &Path, chromium: PathBuf) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = tokio::process::Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        let status = format!("{url}/status");
        for _ in 0..100 {
            if reqwest::get(&status)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Driver {
            _child: child,
            url,
            chromium,
            profiles: tempfile::tempdir().unwrap(),
        }
    }

    /// A fresh browser with its own profile (cookies are not shared between sessions).
    async fn browser(&self, name: &str) -> Client {
        let profile = self.profiles.path().join(name);
        std::fs::create_dir_all(&profile).unwrap();
        let mut args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1280,900",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_string(),
            serde_json::json!({ "args": args, "binary": self.chromium.display().to_string() }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .expect("a WebDriver session")
    }
}

async fn wait_for_text(client: &Client, css: &str, expected: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(element) = client.find(Locator::Css(css)).await {
            if let Ok(text) = element.text().await {
                if text.contains(expected) {
                    return text;
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            let url = client
                .current_url()
                .await
                .map(|u| u.to_string())
                .unwrap_or_default();
            let source = client.source().await.unwrap_or_default();
            panic!("timed out waiting for {expected:?} in {css} at {url}:\n{source}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn send_message(client: &Client, text: &str) {
    let input = client
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Id("input"))
        .await
        .unwrap();
    input.send_keys(text).await.unwrap();
    client
        .find(Locator::Id("send"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_chat_isolation_and_admin_pairing() {
    let Some(chromedriver) = find_in_path(&["chromedriver"]) else {
        return skip_or_fail("chromedriver is not installed (apt-get install chromium-driver)");
    };
    let Some(chromium) = find_in_path(&["chromium", "chromium-browser", "google-chrome"]) else {
        return skip_or_fail("chromium is not installed (apt-get install chromium)");
    };

    let h = harness();
    let (anna, _) = h.user("anna").await;
    let (_, bob_token) = h.user("bob").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(moltmate_web::serve(
        h.state.clone(),
        listener,
        h.shutdown.clone(),
    ));
    let driver = Driver::start(&chromedriver, chromium).await;
    let shots = screenshots_dir();

    // 1. Anna signs in with a login link, chats, and sees the answer stream in.
    let code = h
        .gateway
        .store()
        .create_login_link(&anna, Duration::from_secs(600))
        .await
        .unwrap();
    let anna_browser = driver.browser("anna").await;
    anna_browser
        .goto(&format!("{base}/login/{code}"))
        .await
        .unwrap();
    anna_browser
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Id("continue"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for_text(&anna_browser, "#persona", "Cami").await;
    wait_for_text(&anna_browser, "#messages", "Say hello").await;
    anna_browser
        .execute(
            "window.__updates = 0; new MutationObserver(() => window.__updates++)\
             .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});",
            vec![],
        )
        .await
        .unwrap();
    send_message(&anna_browser, "hello from anna's browser").await;
    wait_for_text(
        &anna_browser,
        ".msg.assistant[data-done=true]",
        &echo_of("hello from anna's browser"),
    )
    .await;
    let updates = anna_browser
        .execute("return window.__updates;", vec![])
        .await
        .unwrap();
    assert!(
        updates.as_u64().unwrap() >= 4,
        "the answer was rendered piecewise as it streamed ({updates})"
    );

    // Reloading shows the history from the server.
    anna_browser.refresh().await.unwrap();
    wait_for_text(
        &anna_browser,
        "#messages",
        &echo_of("hello from anna's browser"),
    )
    .await;
    anna_browser.set_window_size(390, 844).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(
        shots.join("chat-phone.png"),
        anna_browser.screenshot().await.unwrap(),
    )
    .unwrap();

    // 2. Bob, in another browser, signs in with his token and sees none of Anna's chat.
    let bob_browser = driver.browser("bob").await;
    bob_browser.goto(&format!("{base}/")).await.unwrap();
    bob_browser
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(&bob_token)
        .await
        .unwrap();
    bob_browser
        .find(Locator::Css("#login-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for_text(&bob_browser, "#user", "bob").await;
    wait_for_text(&bob_browser, "#messages", "Say hello").await;
    send_message(&bob_browser, "bob's own words").await;
    let bob_view = wait_for_text(
        &bob_browser,
        ".msg.assistant[data-done=true]",
        &echo_of("bob's own words"),
    )
    .await;
    assert!(!bob_view.contains("anna"));
    let bob_all = bob_browser
        .find(Locator::Id("messages"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!bob_all.contains("hello from anna"), "{bob_all}");
    anna_browser.refresh().await.unwrap();
    let anna_all = wait_for_text(&anna_browser, "#messages", "hello from anna").await;
    assert!(!anna_all.contains("bob's own words"), "{anna_all}");

    // 3. The operator signs in and approves a pairing request.
    let identity = Identity::new(ChannelKind::Telegram, PeerId::new("777000").unwrap());
    let (request, _) = h
        .gateway
        .store()
        .pairing_request_for(&identity, "777000", Some("Carla"), Duration::from_secs(600))
        .await
        .unwrap();
    let admin_browser = driver.browser("admin").await;
    admin_browser.goto(&format!("{base}/admin")).await.unwrap();
    admin_browser
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Id("admin-token"))
        .await
        .unwrap()
        .send_keys(ADMIN_TOKEN)
        .await
        .unwrap();
    admin_browser
        .find(Locator::Css("#admin-login button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for_text(&admin_browser, "#pairing", &request.code).await;
    wait_for_text(&admin_browser, "#users", "anna").await;
    std::fs::write(
        shots.join("admin.png"),
        admin_browser.screenshot().await.unwrap(),
    )
    .unwrap();
    admin_browser
        .find(Locator::Css(&format!(
            "button.approve[data-code='{}']",
            request.code
        )))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for_text(&admin_browser, "#notice", "Pairing approved.").await;
    wait_for_text(&admin_browser, "#users", "telegram:777000").await;
    let (user, source) = h
        .gateway
        .store()
        .user_for_identity(&identity)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (user.as_str(), source.as_str()),
        ("telegram_777000", "pairing")
    );

    for browser in [anna_browser, bob_browser, admin_browser] {
        browser.close().await.unwrap();
    }
    h.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// The model's Markdown is rendered (emphasis, lists, code, links in a new tab) and nothing
/// hostile in it runs or links anywhere but http(s): the echo model repeats what Anna types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_renders_markdown_safely() {
    let Some(chromedriver) = find_in_path(&["chromedriver"]) else {
        return skip_or_fail("chromedriver is not installed (apt-get install chromium-driver)");
    };
    let Some(chromium) = find_in_path(&["chromium", "chromium-browser", "google-chrome"]) else {
        return skip_or_fail("chromium is not installed (apt-get install chromium)");
    };
    let h = harness();
    let (anna, _) = h.user("anna").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(moltmate_web::serve(
        h.state.clone(),
        listener,
        h.shutdown.clone(),
    ));
    let driver = Driver::start(&chromedriver, chromium).await;
    let code = h
        .gateway
        .store()
        .create_login_link(&anna, Duration::from_secs(600))
        .await
        .unwrap();
    let browser = driver.browser("anna-md").await;
    browser.goto(&format!("{base}/login/{code}")).await.unwrap();
    browser
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Id("continue"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for_text(&browser, "#messages", "Say hello").await;
    let hostile = "**bold** and `code` <script>window.__pwned=1</script> <img src=x onerror=\"window.__pwned=2\"> [bad](javascript:window.__pwned=3) [good](https://example.org/x) <a href=\"javascript:window.__pwned=4\">raw</a>";
    send_message(&browser, hostile).await;
    let check = r#"
        const msg = [...document.querySelectorAll('.msg.assistant')].pop();
        const links = [...msg.querySelectorAll('a')].map(a => [a.getAttribute('href'), a.target, a.rel, a.textContent]);
        return {
            pwned: window.__pwned === undefined ? null : window.__pwned,
            strong: msg.querySelector('strong') ? msg.querySelector('strong').textContent : null,
            code: msg.querySelector('code') ? msg.querySelector('code').textContent : null,
            scripts: msg.querySelectorAll('script, img, iframe').length,
            links: links,
            text: msg.textContent,
        };
    "#;
    for round in 0..2 {
        // `.markdown` is set once the finished answer is rendered (live deltas are plain text).
        wait_for_text(&browser, ".msg.assistant.markdown", "good").await;
        // Links clicked would open a new tab; the hostile ones must not exist at all.
        let result = browser.execute(check, vec![]).await.unwrap();
        assert_eq!(
            result["pwned"],
            serde_json::Value::Null,
            "round {round}: {result}"
        );
        assert_eq!(result["strong"], "bold", "{result}");
        assert_eq!(result["code"], "code", "{result}");
        assert_eq!(result["scripts"], 0, "{result}");
        assert_eq!(
            result["links"],
            serde_json::json!([[
                "https://example.org/x",
                "_blank",
                "noopener noreferrer",
                "good"
            ]]),
            "{result}"
        );
        // The raw HTML is shown as text.
        assert!(
            result["text"]
                .as_str()
                .unwrap()
                .contains("<script>window.__pwned=1</script>"),
            "{result}"
        );
        // Round two: the history after a reload renders the same way.
        browser.refresh().await.unwrap();
    }
    browser.close().await.unwrap();
    h.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
