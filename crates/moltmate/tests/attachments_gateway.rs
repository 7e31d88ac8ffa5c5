//! Photos, voice notes and documents sent over Telegram, through the real gateway, against the
//! fake Bot API (getFile + file download), the fake LLM and a fake transcription endpoint.

mod common;
use common::{elf, ogg, png};

use base64::Engine as _;
use common::Harness;
use moltmate_testkit::llm::Reply;
use moltmate_testkit::speech::FakeSpeech;
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Every file under `<home>/users/<user>/inbox`.
fn inbox_files(home: &Path, user: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let root = home.join("users").join(user).join("inbox");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_photo_reaches_the_model_as_an_image_of_that_user_only() {
    let h = Harness::start(json!({ "model": { "vision": ["fake/*"] } })).await;
    let photo = png();
    let file_id = h.telegram.add_file(photo.clone());
    h.telegram.push_file(
        1001,
        "photo",
        &file_id,
        Some(photo.len() as u64),
        None,
        Some("what is this?"),
    );
    h.telegram.push_text(2002, "bob's plain text");
    let alice = h.expect_reply(1001, 1).await;
    h.expect_reply(2002, 1).await;
    assert!(alice[0].contains("echo: what is this?"), "{alice:?}");

    let requests = h.llm.requests();
    let encoded = base64::engine::general_purpose::STANDARD.encode(&photo);
    let (with_image, without): (Vec<_>, Vec<_>) =
        requests.iter().partition(|r| !r.images().is_empty());
    assert_eq!(
        with_image.len(),
        1,
        "exactly alice's request carries an image"
    );
    let request = with_image[0];
    assert_eq!(request.images(), vec![("image/png".to_string(), encoded)]);
    let text = request.last_user_text().unwrap();
    assert!(
        text.contains("what is this?") && text.contains("inbox/"),
        "{text}"
    );
    assert!(!request.all_text().contains("bob's plain text"));
    assert!(without
        .iter()
        .all(|r| r.all_text().contains("bob's plain text") && r.images().is_empty()));

    // Saved 0600 beneath her home only; the file is the photo, its name from the content.
    let files = inbox_files(&h.home, "telegram_1001");
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0].to_string_lossy().ends_with("-photo.png"),
        "{files:?}"
    );
    assert_eq!(std::fs::read(&files[0]).unwrap(), photo);
    let mode = std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(inbox_files(&h.home, "telegram_2002").is_empty());
    assert_eq!(
        h.telegram.downloads().len(),
        1,
        "the thumbnail is never fetched"
    );

    // The picture is of that turn only: the next request names the file but has no image.
    h.llm.clear_requests();
    h.telegram.push_text(1001, "and now?");
    h.expect_reply(1001, 2).await;
    let next = h.llm.last_request().unwrap();
    assert!(next.images().is_empty());
    assert!(next.all_text().contains("inbox/"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_photo_for_a_model_without_vision_is_described_as_a_saved_file() {
    let h = Harness::start(json!({})).await;
    let file_id = h.telegram.add_file(png());
    h.telegram
        .push_file(1001, "photo", &file_id, None, None, None);
    h.expect_reply(1001, 1).await;
    let request = h.llm.last_request().unwrap();
    assert!(request.images().is_empty());
    let text = request.last_user_text().unwrap();
    assert!(
        text.contains("cannot see images") && text.contains("inbox/"),
        "{text}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_or_mislabelled_files_are_refused_with_a_clear_message() {
    let h = Harness::start(json!({ "attachments": { "maxMb": 1 } })).await;
    // 1. The claim alone is over the cap: never downloaded.
    let big = h.telegram.add_file(vec![b'a'; 10]);
    h.telegram
        .push_file(1001, "document", &big, Some(5 << 20), Some("big.txt"), None);
    let replies = h.expect_reply(1001, 1).await;
    assert!(replies[0].contains("more than the 1.0 MB"), "{replies:?}");
    assert!(h.telegram.downloads().is_empty());
    // 2. A lying claim: small on the update, 2 MB on the wire. Refused while streaming.
    let liar = h.telegram.add_file(vec![b'a'; 2 << 20]);
    h.telegram
        .push_file(1001, "document", &liar, Some(100), Some("small.txt"), None);
    let replies = h.expect_reply(1001, 2).await;
    assert!(replies[1].contains("larger than the 1.0 MB"), "{replies:?}");
    // 3. A program sent as a photo, and as "report.pdf".
    let program = h.telegram.add_file(elf());
    h.telegram
        .push_file(1001, "photo", &program, None, None, None);
    h.telegram.push_file(
        1001,
        "document",
        &program,
        None,
        Some("report.pdf"),
        Some("please read"),
    );
    let replies = h.expect_reply(1001, 4).await;
    assert!(replies[2].contains("not a type I accept"), "{replies:?}");
    assert!(replies[3].contains("not a type I accept"), "{replies:?}");
    // The caption is still answered; the caption-less refusals cost no model call.
    assert!(replies[3].contains("echo: please read"), "{replies:?}");
    assert_eq!(h.llm.request_count(), 1);
    assert!(
        inbox_files(&h.home, "telegram_1001").is_empty(),
        "nothing refused was kept"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_voice_note_becomes_text() {
    let speech = FakeSpeech::start("speech-test-key", "turn the lights off").await;
    let h = Harness::start(json!({
        "speech": { "baseUrl": speech.base_url(), "apiKey": "speech-test-key" }
    }))
    .await;
    let audio = ogg();
    let file_id = h.telegram.add_file(audio.clone());
    h.telegram
        .push_file(1001, "voice", &file_id, None, None, None);
    let replies = h.expect_reply(1001, 1).await;
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
    assert!(requests[0].contains(&audio) && requests[0].contains(b"whisper-1"));
    assert_eq!(
        requests[0].authorization.as_deref(),
        Some("Bearer speech-test-key")
    );
    assert!(!h
        .llm
        .last_request()
        .unwrap()
        .all_text()
        .contains("speech-test-key"));
    // The audio is kept in the home.
    let files = inbox_files(&h.home, "telegram_1001");
    assert_eq!(files.len(), 1);
    assert!(files[0].to_string_lossy().ends_with(".ogg"), "{files:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_speech_a_voice_note_is_answered_with_a_notice() {
    let h = Harness::start(json!({})).await;
    let file_id = h.telegram.add_file(ogg());
    h.telegram
        .push_file(1001, "voice", &file_id, None, None, None);
    let replies = h.expect_reply(1001, 1).await;
    assert!(
        replies[0].contains("Voice notes are not enabled"),
        "{replies:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn telegram_formatting_rejected_is_resent_as_plain_text() {
    let h = Harness::start(json!({})).await;
    h.llm
        .set_brain(|_| Reply::text("**Done.** Your list:\n\n- milk\n- <eggs> & bread"));
    h.telegram.reject_formatting_next(1);
    h.telegram.push_text(1001, "list?");
    let replies = h.expect_reply(1001, 1).await;
    assert_eq!(
        replies,
        vec!["Done. Your list:\n\n• milk\n• <eggs> & bread"]
    );
    let sent = h.telegram.sent_messages();
    assert_eq!(sent[0].html, None, "the resend is plain text");
    // The next reply goes out formatted again.
    h.telegram.push_text(1001, "again");
    h.expect_reply(1001, 2).await;
    let sent = h.telegram.sent_messages();
    assert!(
        sent[1].html.as_deref().unwrap().contains("<b>Done.</b>"),
        "{sent:?}"
    );
    h.stop().await;
}

/// `send_file` sends the caller's own file to the chat they wrote from, and nothing outside
/// their home: not `..`, not an absolute path, not through a symlink, not a FIFO (which must not
/// block either), not a hard link to another user's file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn send_file_sends_own_files_and_cannot_leave_the_home() {
    let h = Harness::start(json!({})).await;
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
    h.telegram.push_text(1001, "hi");
    h.telegram.push_text(2002, "hi");
    h.expect_reply(1001, 1).await;
    h.expect_reply(2002, 1).await;
    let alice = h.home.join("users/telegram_1001");
    let bob = h.home.join("users/telegram_2002");
    std::fs::write(alice.join("report.txt"), "alice's report").unwrap();
    std::fs::write(bob.join("secret.txt"), "bob-secret").unwrap();
    std::os::unix::fs::symlink(bob.join("secret.txt"), alice.join("link.txt")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", alice.join("passwd")).unwrap();
    let fifo = std::ffi::CString::new(alice.join("pipe").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

    h.telegram.push_text(1001, "send report.txt");
    let replies = h.expect_reply(1001, 2).await;
    assert!(replies[1].contains("sent report.txt"), "{replies:?}");
    let documents = h.telegram.sent_documents();
    assert_eq!(documents.len(), 1);
    assert_eq!(documents[0].chat_id, "1001");
    assert_eq!(documents[0].file_name, "report.txt");
    assert_eq!(documents[0].content, b"alice's report");
    assert_eq!(documents[0].caption.as_deref(), Some("here you go"));

    let hostile = [
        "../telegram_2002/secret.txt",
        "/etc/passwd",
        "link.txt",
        "passwd",
        "pipe",
        "/workspace/../../telegram_2002/secret.txt",
    ];
    for (i, path) in hostile.iter().enumerate() {
        h.telegram.push_text(1001, &format!("send {path}"));
        let replies = h.expect_reply(1001, 3 + i).await;
        let last = replies.last().unwrap();
        assert!(
            last.starts_with("tool said:") && !last.contains("to the user"),
            "{path}: {last}"
        );
    }
    assert_eq!(
        h.telegram.sent_documents().len(),
        1,
        "nothing else was sent"
    );
    assert!(h
        .telegram
        .sent_documents()
        .iter()
        .all(|d| !String::from_utf8_lossy(&d.content).contains("bob-secret")));
    // Bob still gets answers (the FIFO blocked nothing).
    h.telegram.push_text(2002, "still there?");
    assert!(h.expect_reply(2002, 2).await[1].contains("still there?"));
    h.stop().await;
}
