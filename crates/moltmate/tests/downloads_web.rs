//! `send_file` on the web chat and the OpenAI-compatible API: the file becomes a download link
//! (`/files/<id>`) that opens only for the same user, through the real gateway and web server.

mod common;

use common::Harness;
use moltmate_testkit::llm::Reply;
use serde_json::{json, Value};
use std::path::Path;

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

    async fn sign_in(&self, code: &str) -> String {
        let response = self
            .client
            .post(format!("{}/login/{code}", self.base))
            .send()
            .await
            .unwrap();
        response
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.split(';').next())
            .find(|pair| pair.starts_with("mm_session=") && pair.len() > "mm_session=".len())
            .map(str::to_string)
            .expect("a session cookie")
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
        let start = page.find(marker).expect("a CSRF token") + marker.len();
        page[start..].split('"').next().unwrap().to_string()
    }

    /// The NDJSON events of one web chat turn.
    async fn chat(&self, cookie: &str, csrf: &str, text: &str) -> Vec<Value> {
        let response = self
            .client
            .post(format!("{}/api/chat", self.base))
            .header("cookie", cookie)
            .header("x-csrf-token", csrf)
            .json(&json!({ "message": text }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response
            .text()
            .await
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The reply text of one API turn.
    async fn api(&self, token: &str, text: &str) -> String {
        let response = self
            .client
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(token)
            .json(
                &json!({ "model": "moltmate", "messages": [{ "role": "user", "content": text }] }),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// GET a link with a cookie, a bearer token or nothing.
    async fn get(
        &self,
        path: &str,
        cookie: Option<&str>,
        token: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self.client.get(format!("{}{path}", self.base));
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }
}

async fn cli(home: &Path, args: &[&str]) -> String {
    let (status, out, err) = common::run_cli_async(home, args).await;
    assert!(status.success(), "{args:?}: {err}");
    out
}

fn link_code(output: &str) -> String {
    output.trim().rsplit("/login/").next().unwrap().to_string()
}

/// The brain: `send <path>` calls `send_file`; after the tool, the reply repeats what the tool
/// said only when asked to (`say`), so the API's own link is tested too.
fn brain(h: &Harness) {
    h.llm.set_brain(|request| {
        let text = request.last_user_text().unwrap_or_default();
        if let Some(result) = request.trailing_tool_results() {
            if text.contains("quiet") {
                return Reply::text("done");
            }
            return Reply::text(format!("tool said: {result}"));
        }
        match text.split_whitespace().nth(1) {
            Some(path) if text.starts_with("send ") => {
                Reply::tool_call("send_file", json!({ "path": path }))
            }
            _ => Reply::text(format!("echo: {text}")),
        }
    });
}

fn file_event(events: &[Value]) -> Option<&Value> {
    events.iter().find_map(|e| e.get("file"))
}

fn done_text(events: &[Value]) -> String {
    events
        .iter()
        .find_map(|e| e["done"].as_str())
        .expect("a finished answer")
        .to_string()
}

fn db(home: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(home.join("moltmate.db")).unwrap()
}

fn download_rows(home: &Path, user: &str) -> i64 {
    db(home)
        .query_row(
            "SELECT COUNT(*) FROM downloads WHERE user_id = ?1",
            [user],
            |r| r.get(0),
        )
        .unwrap()
}

/// A file sent on the web chat is downloadable by its owner (cookie or their API token), as an
/// attachment that is never rendered; another user, an anonymous request, a made-up id and an
/// expired link all get the same 404. On the API the reply carries the absolute link even when
/// the model does not mention it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn send_file_on_the_web_is_a_link_only_its_owner_opens() {
    let h = Harness::start(json!({ "gateway": { "port": common::free_port() } })).await;
    brain(&h);
    let web = Web::start(&h).await;
    let home = h.home.clone();
    cli(&home, &["users", "add", "anna"]).await;
    cli(&home, &["users", "add", "bert"]).await;
    let anna_token = cli(&home, &["users", "token", "anna"])
        .await
        .trim()
        .to_string();
    let bert_token = cli(&home, &["users", "token", "bert"])
        .await
        .trim()
        .to_string();
    let anna = web
        .sign_in(&link_code(
            &cli(&home, &["users", "login-link", "anna"]).await,
        ))
        .await;
    let bert = web
        .sign_in(&link_code(
            &cli(&home, &["users", "login-link", "bert"]).await,
        ))
        .await;
    let anna_csrf = web.csrf(&anna).await;
    std::fs::write(
        home.join("users/anna/page.html"),
        "<script>alert(document.cookie)</script>",
    )
    .unwrap();

    let events = web.chat(&anna, &anna_csrf, "send page.html").await;
    let file = file_event(&events).expect("a file event").clone();
    let path = file["url"].as_str().unwrap().to_string();
    assert!(path.starts_with("/files/dl_"), "{path}");
    assert_eq!(file["name"], "page.html");
    assert!(
        done_text(&events).contains(&path),
        "the model was told the link"
    );

    // The owner, by cookie and by API token.
    for (cookie, token) in [
        (Some(anna.as_str()), None),
        (None, Some(anna_token.as_str())),
    ] {
        let response = web.get(&path, cookie, token).await;
        assert_eq!(response.status(), 200);
        let headers = response.headers().clone();
        assert_eq!(headers["content-type"], "application/octet-stream");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert!(headers["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment; filename=\"page.html\""));
        assert!(headers["content-security-policy"]
            .to_str()
            .unwrap()
            .starts_with("sandbox"));
        assert_eq!(
            response.text().await.unwrap(),
            "<script>alert(document.cookie)</script>"
        );
    }
    // Everyone else: the same 404, whether the id exists or not.
    let made_up = format!("/files/dl_{}", "0".repeat(64));
    for (what, cookie, token, link) in [
        (
            "another user's cookie",
            Some(bert.as_str()),
            None,
            path.as_str(),
        ),
        (
            "another user's token",
            None,
            Some(bert_token.as_str()),
            path.as_str(),
        ),
        ("nobody", None, None, path.as_str()),
        (
            "a wrong token",
            None,
            Some("mmu_not-a-token"),
            path.as_str(),
        ),
        ("a made-up id", Some(anna.as_str()), None, made_up.as_str()),
        (
            "a malformed id",
            Some(anna.as_str()),
            None,
            "/files/..%2Fmoltmate.db",
        ),
    ] {
        let response = web.get(link, cookie, token).await;
        assert_eq!(response.status(), 404, "{what}");
        assert!(!response.text().await.unwrap().contains("alert"), "{what}");
    }

    // On the API, the reply names the absolute link even though the model said only "done".
    std::fs::write(home.join("users/anna/notes.txt"), "anna's notes").unwrap();
    let reply = web.api(&anna_token, "send notes.txt quiet").await;
    let url_start = reply
        .find("http://")
        .expect("an absolute link in the reply");
    let url = reply[url_start..].trim_end_matches(')').to_string();
    assert!(reply.starts_with("done"), "{reply}");
    let link = &url[url.find("/files/").unwrap()..];
    let response = web.get(link, None, Some(&anna_token)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; charset=utf-8"
    );
    assert_eq!(response.text().await.unwrap(), "anna's notes");
    assert_eq!(web.get(link, None, Some(&bert_token)).await.status(), 404);

    // Expired: the link no longer opens (and the next offer deletes its file).
    db(&home)
        .execute(
            "UPDATE downloads SET expires_at = 1 WHERE user_id = 'anna'",
            [],
        )
        .unwrap();
    assert_eq!(web.get(&path, Some(&anna), None).await.status(), 404);
    let events = web.chat(&anna, &anna_csrf, "send notes.txt").await;
    assert!(file_event(&events).is_some());
    assert_eq!(download_rows(&home, "anna"), 1, "expired rows were pruned");
    let files = std::fs::read_dir(home.join("downloads/anna"))
        .unwrap()
        .count();
    assert_eq!(files, 1, "expired files were deleted");
    let mode = std::fs::metadata(home.join("downloads/anna"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o700
    );
    h.stop().await;
}

/// `send_file` on the web refuses what it refuses everywhere — paths outside the home, symlinks,
/// FIFOs (without blocking), files over the cap — and a user's download area is bounded
/// (`attachments.downloads.maxMbPerUser`), each with a clear tool error and no link.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn send_file_on_the_web_refuses_hostile_paths_and_caps_the_area() {
    let h = Harness::start(json!({
        "gateway": { "port": common::free_port() },
        "attachments": { "downloads": { "maxMbPerUser": 1 } },
    }))
    .await;
    brain(&h);
    let web = Web::start(&h).await;
    let home = h.home.clone();
    cli(&home, &["users", "add", "anna"]).await;
    cli(&home, &["users", "add", "bert"]).await;
    let anna = web
        .sign_in(&link_code(
            &cli(&home, &["users", "login-link", "anna"]).await,
        ))
        .await;
    let csrf = web.csrf(&anna).await;
    let anna_home = home.join("users/anna");
    std::fs::write(home.join("users/bert/secret.txt"), "bert-secret").unwrap();
    std::os::unix::fs::symlink(
        home.join("users/bert/secret.txt"),
        anna_home.join("link.txt"),
    )
    .unwrap();
    let fifo = std::ffi::CString::new(anna_home.join("pipe").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    std::fs::File::create(anna_home.join("huge.bin"))
        .unwrap()
        .set_len(21 << 20)
        .unwrap();
    std::fs::write(anna_home.join("big.bin"), vec![7u8; 600 << 10]).unwrap();

    for (path, expected) in [
        ("../bert/secret.txt", ""),
        ("/etc/passwd", ""),
        ("link.txt", ""),
        ("pipe", ""),
        ("huge.bin", "at most"),
    ] {
        let events = web.chat(&anna, &csrf, &format!("send {path}")).await;
        let text = done_text(&events);
        assert!(file_event(&events).is_none(), "{path}: {text}");
        assert!(
            text.starts_with("tool said:") && !text.contains("/files/"),
            "{path}: {text}"
        );
        assert!(text.contains(expected), "{path}: {text}");
        assert!(!text.contains("bert-secret"), "{path}: {text}");
    }
    // The area: one 600 KB file fits into 1 MB, the second does not.
    let first = web.chat(&anna, &csrf, "send big.bin").await;
    assert!(file_event(&first).is_some(), "{first:?}");
    let second = web.chat(&anna, &csrf, "send big.bin").await;
    assert!(file_event(&second).is_none());
    assert!(
        done_text(&second).contains("cannot be offered"),
        "{second:?}"
    );
    assert_eq!(download_rows(&home, "anna"), 1);
    h.stop().await;
}

/// `users remove` and `users reset` take a user's download links with them: rows and files are
/// gone, and the old link opens for nobody (not for a new user of the same name either).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removed_or_reset_users_links_are_gone_from_disk_and_database() {
    let h = Harness::start(json!({ "gateway": { "port": common::free_port() } })).await;
    brain(&h);
    let web = Web::start(&h).await;
    let home = h.home.clone();
    for (user, ending) in [("anna", "remove"), ("bert", "reset")] {
        cli(&home, &["users", "add", user]).await;
        let token = cli(&home, &["users", "token", user])
            .await
            .trim()
            .to_string();
        std::fs::write(home.join(format!("users/{user}/a.txt")), "mine").unwrap();
        let reply = web.api(&token, "send a.txt").await;
        let start = reply.find("/files/").expect("a link");
        let link: String = reply[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '/' || *c == '_')
            .collect();
        assert_eq!(web.get(&link, None, Some(&token)).await.status(), 200);
        assert_eq!(download_rows(&home, user), 1);

        cli(&home, &["users", ending, user, "--yes"]).await;
        assert_eq!(download_rows(&home, user), 0, "{ending}");
        assert!(
            !home.join(format!("downloads/{user}")).exists(),
            "{ending}: the files are gone"
        );
        cli(&home, &["users", "add", user]).await;
        let new_token = cli(&home, &["users", "token", user])
            .await
            .trim()
            .to_string();
        assert_eq!(
            web.get(&link, None, Some(&new_token)).await.status(),
            404,
            "{ending}"
        );
        assert_eq!(web.get(&link, None, Some(&token)).await.status(), 404);
    }
    h.stop().await;
}

/// Files kept for download sit next to the database: besides each user's share, all users'
/// together are bounded (`attachments.downloads.maxMbTotal`), so many users cannot fill the
/// gateway's disk with copies (review 11b #4).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn downloads_are_bounded_across_users_not_only_per_user() {
    let h = Harness::start(json!({
        "gateway": { "port": common::free_port() },
        "attachments": { "downloads": { "maxMbPerUser": 1, "maxMbTotal": 1 } },
    }))
    .await;
    brain(&h);
    let web = Web::start(&h).await;
    let home = h.home.clone();
    let mut sessions = Vec::new();
    for user in ["anna", "bert"] {
        cli(&home, &["users", "add", user]).await;
        std::fs::write(
            home.join(format!("users/{user}/big.bin")),
            vec![7u8; 600 << 10],
        )
        .unwrap();
        let session = web
            .sign_in(&link_code(
                &cli(&home, &["users", "login-link", user]).await,
            ))
            .await;
        let csrf = web.csrf(&session).await;
        sessions.push((session, csrf));
    }
    let first = web
        .chat(&sessions[0].0, &sessions[0].1, "send big.bin")
        .await;
    assert!(file_event(&first).is_some(), "{first:?}");
    let second = web
        .chat(&sessions[1].0, &sessions[1].1, "send big.bin")
        .await;
    assert!(file_event(&second).is_none(), "{second:?}");
    assert!(
        done_text(&second).contains("download area is full"),
        "{second:?}"
    );
    assert_eq!(download_rows(&home, "anna"), 1);
    assert_eq!(download_rows(&home, "bert"), 0);
    h.stop().await;
}
