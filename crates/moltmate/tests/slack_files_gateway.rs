//! Files over Slack through the real gateway: photos and documents people share in their DM
//! (downloaded from the fake Slack's file host with the bot token) and `send_file` back
//! (`files.getUploadURLExternal` + upload + `files.completeUploadExternal`).

mod common;
use common::{elf, png};

use base64::Engine as _;
use common::Harness;
use moltmate_testkit::llm::Reply;
use moltmate_testkit::slack::{FakeSlack, TEAM_ID};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

const BOT: &str = "xoxb-1-slack-BOT-secret-NEVER-logged";
const APP: &str = "xapp-1-slack-APP-secret-NEVER-logged";

fn user_dir(user: &str) -> String {
    format!("slack_{}_{}", TEAM_ID.to_lowercase(), user.to_lowercase())
}

fn inbox_files(home: &Path, user: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let root = home.join("users").join(user_dir(user)).join("inbox");
    let Ok(days) = std::fs::read_dir(&root) else {
        return out;
    };
    for day in days.flatten() {
        for file in std::fs::read_dir(day.path()).unwrap().flatten() {
            out.push(file.path());
        }
    }
    out
}

async fn start(extra: Value) -> (Harness, FakeSlack) {
    let slack = FakeSlack::start(BOT, APP).await;
    let mut patch = json!({ "channels": { "slack": {
        "botToken": BOT, "appToken": APP, "apiUrl": slack.api_url(),
        "dmPolicy": "open", "allowFrom": ["*"],
    }, "telegram": { "enabled": false } } });
    common::merge(&mut patch, extra);
    let h = Harness::start(patch).await;
    assert!(slack.wait_connected(Duration::from_secs(20)).await);
    (h, slack)
}

async fn replies(slack: &FakeSlack, user: &str, count: usize) -> Vec<String> {
    slack
        .wait_for_messages(&FakeSlack::dm_channel(user), count, Duration::from_secs(20))
        .await
        .unwrap_or_else(|got| panic!("no reply for {user}: got {got:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slack_photo_reaches_the_model_as_an_image_of_that_user_only() {
    let (h, slack) = start(json!({ "model": { "vision": ["fake/*"] } })).await;
    let photo = png();
    let url = slack.add_file("cat.png", photo.clone());
    slack.push_file_dm(
        "U111",
        "what is this?",
        vec![FakeSlack::file_object(
            &url,
            "cat.png",
            "image/png",
            photo.len() as u64,
        )],
    );
    slack.push_dm("U222", "bob's plain text", None);
    let alice = replies(&slack, "U111", 1).await;
    replies(&slack, "U222", 1).await;
    assert!(alice[0].contains("echo: what is this?"), "{alice:?}");

    let requests = h.llm.requests();
    let encoded = base64::engine::general_purpose::STANDARD.encode(&photo);
    let with_image: Vec<_> = requests.iter().filter(|r| !r.images().is_empty()).collect();
    assert_eq!(
        with_image.len(),
        1,
        "exactly alice's request carries an image"
    );
    assert_eq!(
        with_image[0].images(),
        vec![("image/png".to_string(), encoded)]
    );
    assert!(!with_image[0].all_text().contains("bob's plain text"));
    let files = inbox_files(&h.home, "U111");
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(std::fs::read(&files[0]).unwrap(), photo);
    assert!(inbox_files(&h.home, "U222").is_empty());
    let downloads = slack.downloads();
    assert_eq!(downloads.len(), 1);
    assert!(downloads[0].1, "downloaded with the bot token");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_mislabelled_and_foreign_slack_files_are_refused_with_a_clear_message() {
    let (h, slack) = start(json!({ "attachments": { "maxMb": 1 } })).await;
    // 1. The claim alone is over the cap: never downloaded.
    let big = slack.add_file("big.txt", vec![b'a'; 10]);
    slack.push_file_dm(
        "U111",
        "",
        vec![FakeSlack::file_object(
            &big,
            "big.txt",
            "text/plain",
            5 << 20,
        )],
    );
    let r = replies(&slack, "U111", 1).await;
    assert!(r[0].contains("more than the 1.0 MB"), "{r:?}");
    assert!(slack.downloads().is_empty());
    // 2. A lying claim: small on the event, 2 MB on the wire. Refused while streaming.
    let liar = slack.add_file("small.txt", vec![b'a'; 2 << 20]);
    slack.push_file_dm(
        "U111",
        "",
        vec![FakeSlack::file_object(
            &liar,
            "small.txt",
            "text/plain",
            100,
        )],
    );
    let r = replies(&slack, "U111", 2).await;
    assert!(r[1].contains("larger than the 1.0 MB"), "{r:?}");
    // 3. A program labelled as a PNG photo.
    let program = slack.add_file("cat.png", elf());
    slack.push_file_dm(
        "U111",
        "",
        vec![FakeSlack::file_object(&program, "cat.png", "image/png", 64)],
    );
    let r = replies(&slack, "U111", 3).await;
    assert!(r[2].contains("not a type I accept"), "{r:?}");
    // 4. A file whose URL names another host: the bot token never goes there.
    let foreign = FakeSlack::start(BOT, APP).await;
    let elsewhere = foreign.add_file("x.txt", b"hello".to_vec());
    slack.push_file_dm(
        "U111",
        "and this?",
        vec![FakeSlack::file_object(&elsewhere, "x.txt", "text/plain", 5)],
    );
    let r = replies(&slack, "U111", 4).await;
    assert!(r[3].contains("echo: and this?"), "{r:?}");
    assert!(
        foreign.downloads().is_empty(),
        "nothing was fetched from the foreign host"
    );
    assert_eq!(h.llm.request_count(), 1, "only the text reached the model");
    assert!(
        inbox_files(&h.home, "U111").is_empty(),
        "nothing refused was kept"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slack_send_file_delivers_a_file_from_the_home_and_cannot_leave_it() {
    let (h, slack) = start(json!({})).await;
    h.llm.set_brain(|request| {
        if let Some(result) = request.trailing_tool_results() {
            return Reply::text(format!("tool said: {result}"));
        }
        let text = request.last_user_text().unwrap_or_default();
        match text.strip_prefix("send ") {
            Some(path) => Reply::tool_call(
                "send_file",
                json!({"path": path.trim(), "caption": "here <!channel>"}),
            ),
            None => Reply::text(format!("echo: {text}")),
        }
    });
    slack.push_dm("U111", "hi", None);
    slack.push_dm("U222", "hi", None);
    replies(&slack, "U111", 1).await;
    replies(&slack, "U222", 1).await;
    let alice = h.home.join("users").join(user_dir("U111"));
    let bob = h.home.join("users").join(user_dir("U222"));
    std::fs::write(alice.join("report.txt"), "alice's report").unwrap();
    std::fs::write(bob.join("secret.txt"), "bob-secret").unwrap();
    std::os::unix::fs::symlink(bob.join("secret.txt"), alice.join("link.txt")).unwrap();

    slack.push_dm("U111", "send report.txt", Some("1700000000.000001"));
    let r = replies(&slack, "U111", 2).await;
    assert!(
        r[1].contains("report.txt") && r[1].contains("to the user"),
        "{r:?}"
    );
    let shared = slack.shared_files();
    assert_eq!(shared.len(), 1);
    assert_eq!(shared[0].channel, FakeSlack::dm_channel("U111"));
    assert_eq!(shared[0].thread_ts.as_deref(), Some("1700000000.000001"));
    assert_eq!(shared[0].file_name, "report.txt");
    assert_eq!(shared[0].content, b"alice's report");
    assert_eq!(shared[0].comment.as_deref(), Some("here &lt;!channel&gt;"));
    assert!(!slack.upload_saw_token(), "the upload URL gets no token");

    for (i, path) in [
        "../".to_string() + &user_dir("U222") + "/secret.txt",
        "/etc/passwd".into(),
        "link.txt".into(),
    ]
    .iter()
    .enumerate()
    {
        slack.push_dm("U111", &format!("send {path}"), None);
        let r = replies(&slack, "U111", 3 + i).await;
        let last = r.last().unwrap();
        assert!(
            last.starts_with("tool said:") && !last.contains("to the user"),
            "{path}: {last}"
        );
    }
    assert_eq!(slack.shared_files().len(), 1, "nothing else was sent");
    h.stop().await;
}
