//! Photos, voice messages and documents sent over Discord, and `send_file` back, through the
//! real gateway against the fake Discord (Gateway websocket, REST, CDN), the fake LLM and the
//! fake transcription endpoint.

mod common;
use common::{elf, inbox_files, ogg, pdf, png};

use base64::Engine as _;
use common::Harness;
use moltmate_testkit::discord::FakeDiscord;
use moltmate_testkit::llm::Reply;
use moltmate_testkit::speech::FakeSpeech;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const DISCORD_TOKEN: &str = "MTIz.discord-TEST-token_NEVER-logged";

async fn start(extra: Value) -> (Harness, FakeDiscord) {
    let discord = FakeDiscord::start(DISCORD_TOKEN).await;
    let mut patch = json!({ "channels": { "discord": {
        "botToken": DISCORD_TOKEN, "apiUrl": discord.api_url(),
        "dmPolicy": "open", "allowFrom": ["*"],
    }, "telegram": { "enabled": false } } });
    common::merge(&mut patch, extra);
    let h = Harness::start(patch).await;
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

/// Every file under `<home>/users/<user>/inbox`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_discord_photo_reaches_the_model_as_an_image_of_that_user_only() {
    let (h, discord) = start(json!({ "model": { "vision": ["fake/*"] } })).await;
    let photo = png();
    let attachment = discord.attachment(111, "cat.png", Some("image/png"), photo.clone());
    discord.push_dm_with_attachments(111, "what is this?", vec![attachment], 0);
    discord.push_dm(222, "bob's plain text");
    let alice = replies(&discord, 111, 1).await;
    replies(&discord, 222, 1).await;
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
    let text = with_image[0].last_user_text().unwrap();
    assert!(
        text.contains("what is this?") && text.contains("inbox/"),
        "{text}"
    );

    let files = inbox_files(&h.home, "discord_111");
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0].to_string_lossy().ends_with("-cat.png"),
        "{files:?}"
    );
    assert_eq!(std::fs::read(&files[0]).unwrap(), photo);
    let mode = std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(inbox_files(&h.home, "discord_222").is_empty());
    let cdn = discord.cdn_requests();
    assert_eq!(cdn.len(), 1);
    assert!(
        !cdn[0].had_authorization,
        "the bot token never goes to the CDN"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_discord_voice_message_becomes_text() {
    let speech = FakeSpeech::start("speech-test-key", "turn the lights off").await;
    let (h, discord) = start(json!({
        "speech": { "baseUrl": speech.base_url(), "apiKey": "speech-test-key" }
    }))
    .await;
    let audio = ogg();
    discord.push_voice_message(111, audio.clone(), 2.5);
    let replies = replies(&discord, 111, 1).await;
    assert!(
        replies[0].starts_with("heard: turn the lights off"),
        "{replies:?}"
    );
    assert!(
        replies[0].contains("echo: turn the lights off"),
        "{replies:?}"
    );
    let requests = speech.requests();
    assert_eq!(requests.len(), 1);
    assert!(requests[0].contains(&audio));
    let files = inbox_files(&h.home, "discord_111");
    assert_eq!(files.len(), 1);
    assert!(files[0].to_string_lossy().ends_with(".ogg"), "{files:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_discord_document_is_saved_and_the_model_told_where() {
    let (h, discord) = start(json!({})).await;
    let document = pdf();
    // A hostile name: path, shell metacharacters, control characters.
    let attachment = discord.attachment(
        111,
        "..%2F..%2Fschool%20letter;rm%20-rf.pdf",
        Some("application/pdf"),
        document.clone(),
    );
    discord.push_dm_with_attachments(111, "", vec![attachment], 0);
    let replies = replies(&discord, 111, 1).await;
    assert!(replies[0].contains("inbox/"), "{replies:?}");
    let text = h.llm.last_request().unwrap().last_user_text().unwrap();
    assert!(
        text.contains("application/pdf") && text.contains("pdftotext"),
        "{text}"
    );
    let files = inbox_files(&h.home, "discord_111");
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().to_string();
    assert!(
        name.ends_with(".pdf") && !name.contains([';', ' ', '%']),
        "{name}"
    );
    assert!(
        text.contains(&name),
        "the model is told the saved name: {text}"
    );
    assert_eq!(std::fs::read(&files[0]).unwrap(), document);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_or_mislabelled_discord_files_are_refused_with_a_clear_message() {
    let (h, discord) = start(json!({ "attachments": { "maxMb": 1 } })).await;
    // 1. The claim alone is over the cap: never downloaded.
    let mut big = discord.attachment(111, "big.txt", Some("text/plain"), vec![b'a'; 10]);
    big["size"] = json!(5 << 20);
    discord.push_dm_with_attachments(111, "", vec![big], 0);
    let r = replies(&discord, 111, 1).await;
    assert!(r[0].contains("more than the 1.0 MB"), "{r:?}");
    assert!(discord.cdn_requests().is_empty());
    // 2. A lying claim: small on the message, 2 MB on the wire. Refused while streaming.
    let mut liar = discord.attachment(111, "small.txt", Some("text/plain"), vec![b'a'; 2 << 20]);
    liar["size"] = json!(100);
    discord.push_dm_with_attachments(111, "", vec![liar], 0);
    let r = replies(&discord, 111, 2).await;
    assert!(r[1].contains("larger than the 1.0 MB"), "{r:?}");
    // 3. A program labelled as a PNG photo, and as a PDF with a caption.
    let program = discord.attachment(111, "cute.png", Some("image/png"), elf());
    discord.push_dm_with_attachments(111, "", vec![program], 0);
    let program = discord.attachment(111, "report.pdf", Some("application/pdf"), elf());
    discord.push_dm_with_attachments(111, "please read", vec![program], 0);
    let r = replies(&discord, 111, 4).await;
    assert!(r[2].contains("not a type I accept"), "{r:?}");
    assert!(r[3].contains("not a type I accept"), "{r:?}");
    assert!(r[3].contains("echo: please read"), "nothing lost: {r:?}");
    assert_eq!(h.llm.request_count(), 1);
    assert!(inbox_files(&h.home, "discord_111").is_empty());
    h.stop().await;
}

/// A listener that counts connections (it answers none).
async fn counting_listener() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((_stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    (format!("http://{addr}"), count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_foreign_host_attachment_url_on_discord_is_refused_without_a_request_to_it() {
    let (h, discord) = start(json!({})).await;
    let (elsewhere, connections) = counting_listener().await;
    let web = h.start_web().await;
    let hostile = [
        format!("{elsewhere}/attachments/1/2/x.png"),
        format!("{web}/admin"),
        "http://169.254.169.254/latest/meta-data/iam/".to_string(),
        "https://cdn.discordapp.com.evil.example/x.png".to_string(),
        "file:///etc/passwd".to_string(),
    ];
    for (i, url) in hostile.iter().enumerate() {
        let mut attachment = discord.attachment(111, "x.png", Some("image/png"), png());
        attachment["url"] = json!(url);
        attachment["proxy_url"] = json!(url);
        discord.push_dm_with_attachments(111, &format!("look {i}"), vec![attachment], 0);
        let r = replies(&discord, 111, i + 1).await;
        assert!(r[i].contains("downloading it failed"), "{url}: {r:?}");
        assert!(r[i].contains(&format!("echo: look {i}")), "{url}: {r:?}");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "no request to the foreign host"
    );
    assert!(discord.cdn_requests().is_empty());
    assert!(inbox_files(&h.home, "discord_111").is_empty());
    h.stop().await;
}

/// A CDN answer that redirects off Discord's hosts is not followed; one that stays on them is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_discord_cdn_redirect_off_the_cdn_is_not_followed() {
    let (h, discord) = start(json!({})).await;
    let (elsewhere, connections) = counting_listener().await;
    let away = discord.attachment(111, "x.txt", Some("text/plain"), b"away".to_vec());
    discord.redirect_attachment(&away, &format!("{elsewhere}/x.txt"));
    discord.push_dm_with_attachments(111, "one", vec![away], 0);
    let r = replies(&discord, 111, 1).await;
    assert!(r[0].contains("downloading it failed"), "{r:?}");
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "the redirect was not followed"
    );
    // A redirect to another file on the CDN itself is followed.
    let target = discord.attachment(111, "real.txt", Some("text/plain"), b"hello file".to_vec());
    let hop = discord.attachment(111, "hop.txt", Some("text/plain"), b"unused".to_vec());
    let target_url = target["url"].as_str().unwrap().to_string();
    discord.redirect_attachment(&hop, &target_url);
    discord.push_dm_with_attachments(111, "two", vec![hop], 0);
    let r = replies(&discord, 111, 2).await;
    assert!(r[1].contains("echo: two"), "{r:?}");
    let files = inbox_files(&h.home, "discord_111");
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(std::fs::read(&files[0]).unwrap(), b"hello file");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attachments_on_server_messages_are_ignored_when_groups_are_off() {
    let (h, discord) = start(json!({})).await;
    let attachment = discord.attachment(111, "x.png", Some("image/png"), png());
    discord.push_guild_with_attachments(111, "444", "555", "look", true, vec![attachment]);
    discord.push_dm(111, "dm");
    assert_eq!(replies(&discord, 111, 1).await, vec!["echo: dm"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        discord.cdn_requests().is_empty(),
        "nothing fetched for a server message"
    );
    assert!(discord
        .sent_messages()
        .iter()
        .all(|m| m.channel_id != "555"));
    assert_eq!(h.llm.request_count(), 1);
    h.stop().await;
}

/// `send_file` sends the caller's own file to their DM, and nothing outside their home.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn discord_send_file_delivers_a_home_file_to_the_right_dm_and_cannot_leave_the_home() {
    let (h, discord) = start(json!({})).await;
    h.llm.set_brain(|request| {
        if let Some(result) = request.trailing_tool_results() {
            return Reply::text(format!("tool said: {result}"));
        }
        let text = request.last_user_text().unwrap_or_default();
        match text.strip_prefix("send ") {
            Some(path) => Reply::tool_call(
                "send_file",
                json!({"path": path.trim(), "caption": "here you go @everyone"}),
            ),
            None => Reply::text(format!("echo: {text}")),
        }
    });
    discord.push_dm(111, "hi");
    discord.push_dm(222, "hi");
    replies(&discord, 111, 1).await;
    replies(&discord, 222, 1).await;
    let alice = h.home.join("users/discord_111");
    let bob = h.home.join("users/discord_222");
    std::fs::write(alice.join("report.txt"), "alice's report").unwrap();
    std::fs::write(alice.join("huge.bin"), vec![0u8; (10 << 20) + 1]).unwrap();
    std::fs::write(bob.join("secret.txt"), "bob-secret").unwrap();
    std::os::unix::fs::symlink(bob.join("secret.txt"), alice.join("link.txt")).unwrap();

    discord.push_dm(111, "send report.txt");
    let r = replies(&discord, 111, 2).await;
    assert!(r[1].contains("sent `report.txt`"), "{r:?}");
    let files = discord.sent_files();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].channel_id, FakeDiscord::dm_channel(111));
    assert_eq!(files[0].file_name, "report.txt");
    assert_eq!(files[0].content, b"alice's report");
    assert_eq!(files[0].content_text, "here you go @everyone");
    assert_eq!(files[0].allowed_mentions, Some(json!({"parse": []})));
    assert_eq!(
        files[0].attachments_json,
        json!([{"id": 0, "filename": "report.txt"}])
    );

    let hostile = [
        "../discord_222/secret.txt",
        "/etc/passwd",
        "link.txt",
        "/workspace/../../discord_222/secret.txt",
        "huge.bin",
    ];
    for (i, path) in hostile.iter().enumerate() {
        discord.push_dm(111, &format!("send {path}"));
        let r = replies(&discord, 111, 3 + i).await;
        let last = r.last().unwrap();
        assert!(
            last.starts_with("tool said:") && !last.contains("to the user"),
            "{path}: {last}"
        );
    }
    assert_eq!(discord.sent_files().len(), 1, "nothing else was sent");
    assert!(discord
        .sent_files()
        .iter()
        .all(|f| f.channel_id == FakeDiscord::dm_channel(111)));
    h.stop().await;
}

/// A 429 on the upload is waited out as for text, then the file is sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_discord_rate_limit_on_send_file_is_waited_out_and_the_file_sent_once() {
    let (h, discord) = start(json!({})).await;
    h.llm.set_brain(|request| {
        if let Some(result) = request.trailing_tool_results() {
            return Reply::text(format!("tool said: {result}"));
        }
        Reply::tool_call("send_file", json!({"path": "notes.txt"}))
    });
    std::fs::create_dir_all(h.home.join("users/discord_111")).unwrap();
    std::fs::write(h.home.join("users/discord_111/notes.txt"), "n").unwrap();
    discord.rate_limit_next(1, 0.5, false);
    discord.push_dm(111, "send it");
    let r = replies(&discord, 111, 1).await;
    assert!(r[0].contains("to the user"), "{r:?}");
    assert_eq!(discord.sent_files().len(), 1);
    assert_eq!(discord.requests_during_rate_limit(), 0);
    h.stop().await;
}
