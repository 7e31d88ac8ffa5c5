//! Photos, voice notes and documents sent over Signal, and `send_file` back, through the real
//! gateway against the fake signal-cli daemon (`getAttachment`, `send` with data URIs), the fake
//! LLM and the fake transcription endpoint.

mod common;
use common::{elf, inbox_files, ogg, pdf, png};

use base64::Engine as _;
use common::Harness;
use moltmate_testkit::llm::Reply;
use moltmate_testkit::signal::FakeSignalCli;
use moltmate_testkit::speech::FakeSpeech;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const ACCOUNT: &str = "+4917000000001";
const ALICE: &str = "+4917011111111";
const BOB: &str = "+4917022222222";
const ALICE_USER: &str = "signal__4917011111111";

async fn start(extra: Value) -> (Harness, FakeSignalCli) {
    let fake = FakeSignalCli::start_tcp(ACCOUNT).await;
    let mut patch = json!({ "channels": { "signal": {
        "account": ACCOUNT, "daemon": fake.address(), "dmPolicy": "open", "allowFrom": ["*"]
    } } });
    common::merge(&mut patch, extra);
    let h = Harness::start(patch).await;
    (h, fake)
}

async fn replies(fake: &FakeSignalCli, to: &str, count: usize) -> Vec<String> {
    fake.wait_for_messages(to, count, Duration::from_secs(20))
        .await
        .unwrap_or_else(|sent| panic!("no reply for {to}: {sent:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signal_photo_reaches_the_model_as_an_image_of_that_user_only() {
    let (h, fake) = start(json!({ "model": { "vision": ["fake/*"] } })).await;
    let photo = png();
    let attachment = fake.add_attachment("image/png", Some("IMG_0001.png"), photo.clone());
    fake.push_attachments(ALICE, Some("what is this?"), vec![attachment]);
    fake.push_text(BOB, "bob's plain text");
    let alice = replies(&fake, ALICE, 1).await;
    replies(&fake, BOB, 1).await;
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
    let files = inbox_files(&h.home, ALICE_USER);
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(std::fs::read(&files[0]).unwrap(), photo);
    let mode = std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(inbox_files(&h.home, "signal__4917022222222").is_empty());
    let calls = fake.get_attachment_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["recipient"], json!(ALICE));
    assert_eq!(calls[0]["account"], json!(ACCOUNT));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signal_voice_note_becomes_text() {
    let speech = FakeSpeech::start("speech-test-key", "buy milk on the way").await;
    let (h, fake) = start(json!({
        "speech": { "baseUrl": speech.base_url(), "apiKey": "speech-test-key" }
    }))
    .await;
    let audio = ogg();
    let mut attachment = fake.add_attachment("audio/aac", None, audio.clone());
    attachment["voiceNote"] = json!(true);
    fake.push_attachments(ALICE, None, vec![attachment]);
    let replies = replies(&fake, ALICE, 1).await;
    assert!(
        replies[0].starts_with("heard: buy milk on the way"),
        "{replies:?}"
    );
    assert!(
        replies[0].contains("echo: buy milk on the way"),
        "{replies:?}"
    );
    assert!(speech.requests()[0].contains(&audio));
    let files = inbox_files(&h.home, ALICE_USER);
    assert_eq!(files.len(), 1);
    assert!(
        files[0].to_string_lossy().ends_with("-voice.ogg"),
        "{files:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signal_document_is_saved_and_the_model_told_where() {
    let (h, fake) = start(json!({})).await;
    let document = pdf();
    let attachment = fake.add_attachment(
        "application/pdf",
        Some("../../Schule/Elternbrief $(reboot).pdf"),
        document.clone(),
    );
    fake.push_attachments(ALICE, None, vec![attachment]);
    let replies = replies(&fake, ALICE, 1).await;
    assert!(replies[0].contains("inbox/"), "{replies:?}");
    let text = h.llm.last_request().unwrap().last_user_text().unwrap();
    assert!(
        text.contains("application/pdf") && text.contains("pdftotext"),
        "{text}"
    );
    let files = inbox_files(&h.home, ALICE_USER);
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().to_string();
    assert!(name.ends_with("-Elternbrief_reboot.pdf"), "{name}");
    assert!(text.contains(&name), "{text}");
    assert_eq!(std::fs::read(&files[0]).unwrap(), document);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_mislabelled_or_hostile_signal_files_are_refused_with_a_clear_message() {
    let (h, fake) = start(json!({ "attachments": { "maxMb": 1 } })).await;
    // 1. The claim alone is over the cap: never fetched.
    let mut big = fake.add_attachment("text/plain", Some("big.txt"), vec![b'a'; 10]);
    big["size"] = json!(5 << 20);
    fake.push_attachments(ALICE, None, vec![big]);
    let r = replies(&fake, ALICE, 1).await;
    assert!(r[0].contains("more than the 1.0 MB"), "{r:?}");
    assert!(fake.get_attachment_calls().is_empty());
    // 2. A lying claim: 100 bytes claimed, 2 MB in the base64 answer. Refused by its length.
    let mut liar = fake.add_attachment("text/plain", Some("small.txt"), vec![b'a'; 2 << 20]);
    liar["size"] = json!(100);
    fake.push_attachments(ALICE, None, vec![liar]);
    let r = replies(&fake, ALICE, 2).await;
    assert!(r[1].contains("larger than the 1.0 MB"), "{r:?}");
    // 3. A program as a photo, and as a PDF with text.
    let program = fake.add_attachment("image/jpeg", Some("cat.jpg"), elf());
    fake.push_attachments(ALICE, None, vec![program]);
    let program = fake.add_attachment("application/pdf", Some("report.pdf"), elf());
    fake.push_attachments(ALICE, Some("please read"), vec![program]);
    let r = replies(&fake, ALICE, 4).await;
    assert!(r[2].contains("not a type I accept"), "{r:?}");
    assert!(
        r[3].contains("not a type I accept") && r[3].contains("echo: please read"),
        "{r:?}"
    );
    // 4. An id signal-cli never made: a path. Dropped before anything asks for it; the text
    //    is still answered.
    let evil = json!({"contentType": "image/png", "id": "../../../../etc/passwd", "size": 10});
    fake.push_attachments(ALICE, Some("and this"), vec![evil]);
    let r = replies(&fake, ALICE, 5).await;
    assert_eq!(r[4], "echo: and this");
    // 5. An id signal-cli does not know: the user is asked to send it again.
    let unknown = json!({"contentType": "image/png", "id": "gone123.png", "size": 10});
    fake.push_attachments(ALICE, None, vec![unknown]);
    let r = replies(&fake, ALICE, 6).await;
    assert!(r[5].contains("downloading it failed"), "{r:?}");
    let ids: Vec<String> = fake
        .get_attachment_calls()
        .iter()
        .map(|c| c["id"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(ids.iter().all(|id| !id.contains('/')), "{ids:?}");
    assert_eq!(h.llm.request_count(), 2);
    assert!(inbox_files(&h.home, ALICE_USER).is_empty());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attachments_on_signal_group_messages_are_ignored() {
    let (h, fake) = start(json!({})).await;
    let attachment = fake.add_attachment("image/png", Some("x.png"), png());
    fake.push_group_attachments(ALICE, "look", vec![attachment]);
    fake.push_text(ALICE, "dm");
    assert_eq!(replies(&fake, ALICE, 1).await, vec!["echo: dm"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(fake.get_attachment_calls().is_empty());
    assert_eq!(h.llm.request_count(), 1);
    h.stop().await;
}

/// `send_file` sends the caller's own file as a data URI to their number, never a path, and
/// nothing outside their home.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signal_send_file_delivers_a_home_file_to_the_right_chat_and_cannot_leave_the_home() {
    let (h, fake) = start(json!({})).await;
    h.llm.set_brain(|request| {
        if let Some(result) = request.trailing_tool_results() {
            return Reply::text(format!("tool said: {result}"));
        }
        let text = request.last_user_text().unwrap_or_default();
        match text.strip_prefix("send ") {
            Some(path) => Reply::tool_call(
                "send_file",
                json!({"path": path.trim(), "caption": "here you go"}),
            ),
            None => Reply::text(format!("echo: {text}")),
        }
    });
    fake.push_text(ALICE, "hi");
    fake.push_text(BOB, "hi");
    replies(&fake, ALICE, 1).await;
    replies(&fake, BOB, 1).await;
    let alice = h.home.join("users").join(ALICE_USER);
    let bob = h.home.join("users/signal__4917022222222");
    std::fs::write(alice.join("Bericht; final.png"), png()).unwrap();
    std::fs::write(bob.join("secret.txt"), "bob-secret").unwrap();
    std::os::unix::fs::symlink(bob.join("secret.txt"), alice.join("link.txt")).unwrap();

    fake.push_text(ALICE, "send Bericht; final.png");
    let r = replies(&fake, ALICE, 2).await;
    assert!(r[1].contains("to the user"), "{r:?}");
    let sent = fake.sent_attachments();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].recipient, ALICE);
    assert_eq!(sent[0].mime, "image/png");
    assert_eq!(sent[0].content, png());
    assert_eq!(sent[0].message.as_deref(), Some("here you go"));
    let name = sent[0].filename.clone().unwrap();
    assert!(name.ends_with(".png") && !name.contains('/'), "{name}");

    for (i, path) in [
        "../signal__4917022222222/secret.txt",
        "/etc/passwd",
        "link.txt",
        "/workspace/../../signal__4917022222222/secret.txt",
    ]
    .iter()
    .enumerate()
    {
        fake.push_text(ALICE, &format!("send {path}"));
        let r = replies(&fake, ALICE, 3 + i).await;
        let last = r.last().unwrap();
        assert!(
            last.starts_with("tool said:") && !last.contains("to the user"),
            "{path}: {last}"
        );
    }
    assert_eq!(fake.sent_attachments().len(), 1, "nothing else was sent");
    assert!(
        fake.path_attachments().is_empty(),
        "no path was ever named to signal-cli"
    );
    h.stop().await;
}

/// Files far over the cap whose size claims lie arrive as megabytes of base64 on signal-cli's
/// socket: they are refused by their encoded length (parsed and checked off the runtime), the
/// bystander on another channel keeps getting answers in time and the memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_base64_attachments_from_signal_slow_no_bystander_and_are_not_kept() {
    let (h, fake) = start(json!({ "attachments": { "maxMb": 1 } })).await;
    let normal = h.bystander_baseline(2002, 3).await;
    let rss_before = common::rss_bytes();
    for _ in 0..4 {
        let mut liar = fake.add_attachment("application/pdf", Some("x.pdf"), vec![b'%'; 4 << 20]);
        liar["size"] = json!(100);
        fake.push_attachments(ALICE, None, vec![liar]);
    }
    h.assert_bystander_answered(2002, normal, "while huge base64 answers arrive")
        .await;
    let r = replies(&fake, ALICE, 4).await;
    assert!(
        r.iter().all(|r| r.contains("larger than the 1.0 MB")),
        "{r:?}"
    );
    assert!(inbox_files(&h.home, ALICE_USER).is_empty());
    let grown = common::rss_bytes().saturating_sub(rss_before);
    assert!(grown < 256 << 20, "RSS grew by {} MiB", grown >> 20);
    h.stop().await;
}
