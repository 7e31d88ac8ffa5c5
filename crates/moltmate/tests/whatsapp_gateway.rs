//! People chatting over WhatsApp (Cloud API) with the real gateway: signed webhook deliveries
//! to the gateway's web server, replies to the fake Graph API.

mod common;
use common::{inbox_files, png};

use common::{run_cli, Harness};
use moltmate::wiring;
use moltmate_core::channel_status::ErrorClass;
use moltmate_core::ChannelKind;
use moltmate_testkit::llm::Reply;
use moltmate_testkit::speech::FakeSpeech;
use moltmate_testkit::whatsapp::{FakeGraphApi, WebhookSigner};
use serde_json::json;
use std::time::Duration;

const PHONE_ID: &str = "106540352242922";
const TOKEN: &str = "EAAG-TEST-ACCESS-TOKEN-NEVER-LOGGED";
const APP_SECRET: &str = "test-app-secret-never-logged";
const VERIFY: &str = "test-verify-token";
const ALICE: &str = "4917011111111";
const BOB: &str = "4917022222222";

struct Wa {
    h: Harness,
    graph: FakeGraphApi,
    meta: WebhookSigner,
    base: String,
}

async fn start(extra: serde_json::Value, token: &str) -> Wa {
    let graph = FakeGraphApi::start(PHONE_ID, TOKEN).await;
    let mut whatsapp = json!({
        "phoneNumberId": PHONE_ID, "accessToken": token, "appSecret": APP_SECRET,
        "verifyToken": VERIFY, "apiUrl": graph.api_url(), "dmPolicy": "open", "allowFrom": ["*"]
    });
    common::merge(&mut whatsapp, extra);
    // A free port for the web server (the webhook lives there).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let h = Harness::start(json!({"gateway": {"port": port}, "channels": {"whatsapp": whatsapp}}))
        .await;
    let config = wiring::load_config(&h.home).unwrap();
    let base = wiring::start_web(&h.home, &config, &h.built).await.unwrap();
    let meta = WebhookSigner::new(&format!("{base}/webhooks/whatsapp"), APP_SECRET, PHONE_ID);
    Wa {
        h,
        graph,
        meta,
        base,
    }
}

fn status(h: &Harness) -> moltmate_core::channel_status::ChannelStatus {
    h.built
        .gateway
        .channel_statuses()
        .into_iter()
        .find(|s| s.channel == ChannelKind::Whatsapp)
        .expect("whatsapp is configured")
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn replies(graph: &FakeGraphApi, to: &str, count: usize) -> Vec<String> {
    graph
        .wait_for_messages(to, count, Duration::from_secs(20))
        .await
        .unwrap_or_else(|sent| panic!("no reply for {to}: {sent:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whatsapp_two_people_at_once_get_only_their_own_answers_from_signed_deliveries() {
    let Wa { h, graph, meta, .. } = start(json!({}), TOKEN).await;
    // Meta's handshake.
    assert_eq!(
        meta.verify(VERIFY, "1158201444").await,
        (200, "1158201444".into())
    );
    assert_eq!(meta.verify("guess", "1158201444").await.0, 403);

    let (a, b) = tokio::join!(
        async {
            for round in 0..3 {
                assert_eq!(
                    meta.post_text(ALICE, &format!("alice says {round}"))
                        .await
                        .0,
                    200
                );
            }
        },
        async {
            for round in 0..3 {
                assert_eq!(
                    meta.post_text(BOB, &format!("bob says {round}")).await.0,
                    200
                );
            }
        }
    );
    let _ = (a, b);
    assert_eq!(
        replies(&graph, ALICE, 3).await,
        vec![
            "echo: alice says 0",
            "echo: alice says 1",
            "echo: alice says 2"
        ]
    );
    assert_eq!(
        replies(&graph, BOB, 3).await,
        vec!["echo: bob says 0", "echo: bob says 1", "echo: bob says 2"]
    );
    assert!(h.home.join("users/whatsapp__4917011111111").is_dir());
    assert!(status(&h).connected);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whatsapp_unsigned_forged_oversize_and_replayed_deliveries_are_refused_or_answered_once() {
    let Wa { h, graph, meta, .. } = start(json!({}), TOKEN).await;
    let (delivery, _) = meta.text_delivery(ALICE, "forged");
    let body = delivery.to_string();
    assert_eq!(meta.post_raw(body.as_bytes(), None).await, 401, "unsigned");
    assert_eq!(
        meta.post_raw(body.as_bytes(), Some("wrong-secret")).await,
        401,
        "forged"
    );
    let huge = vec![b'x'; 300 * 1024];
    assert_eq!(
        meta.post_raw(&huge, Some(APP_SECRET)).await,
        413,
        "over the bound"
    );
    assert_eq!(meta.post_raw(b"not json", Some(APP_SECRET)).await, 400);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(graph.sent_messages().is_empty());
    assert!(h.llm.requests().is_empty(), "nothing reached the model");
    assert!(status(&h)
        .errors
        .iter()
        .any(|(c, n)| *c == ErrorClass::BadDelivery && *n >= 3));

    // Meta delivers again when it did not see our 200: answered once.
    let (delivery, _) = meta.text_delivery(ALICE, "once");
    let body = delivery.to_string();
    assert_eq!(meta.post_raw(body.as_bytes(), Some(APP_SECRET)).await, 200);
    assert_eq!(meta.post_raw(body.as_bytes(), Some(APP_SECRET)).await, 200);
    assert_eq!(replies(&graph, ALICE, 1).await, vec!["echo: once"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(graph.sent_messages().len(), 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whatsapp_pairing_and_allowlist_work_like_telegram() {
    let Wa { h, graph, meta, .. } =
        start(json!({"dmPolicy": "pairing", "allowFrom": []}), TOKEN).await;
    meta.post_text(ALICE, "hello?").await;
    let first = replies(&graph, ALICE, 1).await;
    assert!(
        first[0].contains("moltmate pairing approve whatsapp"),
        "{}",
        first[0]
    );
    let code = first[0]
        .split_whitespace()
        .find(|w| {
            w.len() == 8
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() && !c.is_ascii_lowercase())
        })
        .unwrap()
        .to_string();
    meta.post_text(ALICE, "again?").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(graph.sent_messages().len(), 1, "one reply per code");
    let (ok, stdout, stderr) = run_cli(&h.home, &["pairing", "approve", "whatsapp", &code]);
    assert!(ok.success(), "{stderr}");
    assert!(stdout.contains("whatsapp:+4917011111111"), "{stdout}");
    meta.post_text(ALICE, "now?").await;
    assert_eq!(replies(&graph, ALICE, 2).await[1], "echo: now?");
    h.stop().await;

    let Wa { h, graph, meta, .. } = start(
        json!({"dmPolicy": "allowlist", "allowFrom": ["+4917011111111"]}),
        TOKEN,
    )
    .await;
    meta.post_text(BOB, "let me in").await;
    meta.post_text(ALICE, "hi").await;
    assert_eq!(replies(&graph, ALICE, 1).await, vec!["echo: hi"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(graph.sent_messages().iter().all(|m| m.to != BOB));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whatsapp_rate_limit_is_honoured_and_the_24_hour_window_fails_visibly() {
    let Wa { h, graph, meta, .. } = start(json!({}), TOKEN).await;
    graph.rate_limit_next_sends(1, 1);
    meta.post_text(ALICE, "hi").await;
    assert_eq!(replies(&graph, ALICE, 1).await, vec!["echo: hi"]);
    assert_eq!(
        graph.send_calls(),
        2,
        "refused once, sent after Retry-After"
    );

    graph.outside_window(BOB);
    meta.post_text(BOB, "hello from yesterday").await;
    wait_until("the window failure", || {
        status(&h).last_error.map(|e| e.0) == Some(ErrorClass::OutsideWindow)
    })
    .await;
    let html = moltmate_web::admin::channels_html(&h.built.gateway.channel_statuses());
    assert!(html.contains("24 hours"), "{html}");

    // A long reply is split at 4096 characters.
    let long = "y".repeat(5000);
    meta.post_text(ALICE, &long).await;
    let parts = replies(&graph, ALICE, 3).await;
    assert_eq!(parts[1..].concat(), format!("echo: {long}"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whatsapp_restart_in_the_middle_loses_nothing_and_answers_once() {
    let Wa { h, graph, meta, .. } = start(json!({}), TOKEN).await;
    h.llm.set_brain(|request| {
        let text = request.last_user_text().unwrap_or_default();
        Reply::delayed(Duration::from_secs(2), Reply::text(format!("echo: {text}")))
    });
    assert_eq!(meta.post_text(ALICE, "a slow question").await.0, 200);
    wait_until("the model to be asked", || !h.llm.requests().is_empty()).await;
    let h = h.restart().await;
    assert_eq!(
        replies(&graph, ALICE, 1).await,
        vec!["echo: a slow question"]
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(graph.sent_messages().len(), 1, "answered exactly once");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whatsapp_wrong_access_token_gives_a_clear_error() {
    let Wa {
        h,
        graph,
        meta,
        base,
    } = start(json!({}), "EAAG-WRONG").await;
    wait_until("the refused token", || {
        status(&h).last_error.map(|e| e.0) == Some(ErrorClass::Credentials)
    })
    .await;
    meta.post_text(ALICE, "hi").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(graph.sent_messages().is_empty());
    assert!(!status(&h).connected);
    // The operator sees it on /healthz and /metrics, without any secret.
    let health: serde_json::Value = reqwest::get(format!("{base}/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["channels"]["whatsapp"]["last_error"], "credentials");
    assert_eq!(health["channels_ok"], false);
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("moltmate_channel_connected{channel=\"whatsapp\"} 0"),
        "{metrics}"
    );
    assert!(metrics
        .contains("moltmate_channel_errors_total{channel=\"whatsapp\",class=\"credentials\"}"));
    for text in [health.to_string(), metrics] {
        assert!(!text.contains("EAAG-WRONG") && !text.contains(APP_SECRET));
    }
    h.stop().await;
}

// ---- media: photos, voice notes, documents in; send_file out --------------------------------

/// Like [`start`], with a patch for the top level of the config (vision, speech).
async fn start_top(top: serde_json::Value) -> Wa {
    let graph = FakeGraphApi::start(PHONE_ID, TOKEN).await;
    let port = common::free_port();
    let mut config = json!({"gateway": {"port": port}, "channels": {"whatsapp": {
        "phoneNumberId": PHONE_ID, "accessToken": TOKEN, "appSecret": APP_SECRET,
        "verifyToken": VERIFY, "apiUrl": graph.api_url(), "dmPolicy": "open", "allowFrom": ["*"]
    }}});
    common::merge(&mut config, top);
    let h = Harness::start(config).await;
    let loaded = wiring::load_config(&h.home).unwrap();
    let base = wiring::start_web(&h.home, &loaded, &h.built).await.unwrap();
    let meta = WebhookSigner::new(&format!("{base}/webhooks/whatsapp"), APP_SECRET, PHONE_ID);
    Wa {
        h,
        graph,
        meta,
        base,
    }
}

/// A WhatsApp photo (media id → `GET /{media-id}` → download with the token, sha256 checked)
/// reaches the model as an image, for the sender's turn only; the caption is the text.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whatsapp_photo_reaches_the_model_as_an_image_of_that_user_only() {
    let wa = start_top(json!({ "model": { "vision": ["fake/*"] } })).await;
    let photo = png();
    let (id, sha) = wa.graph.add_media(&photo, "image/png");
    let status = wa
        .meta
        .post_media(
            ALICE,
            "image",
            json!({"id": id, "mime_type": "image/png", "sha256": sha, "caption": "what is this?"}),
        )
        .await;
    assert_eq!(status, 200);
    wa.meta.post_text(BOB, "bob's plain text").await;
    let alice = replies(&wa.graph, ALICE, 1).await;
    replies(&wa.graph, BOB, 1).await;
    assert!(alice[0].contains("what is this?"), "{alice:?}");
    let requests = wa.h.llm.requests();
    let with_image: Vec<_> = requests.iter().filter(|r| !r.images().is_empty()).collect();
    assert_eq!(
        with_image.len(),
        1,
        "exactly alice's request carries an image"
    );
    assert_eq!(with_image[0].images()[0].0, "image/png");
    assert!(!with_image[0].all_text().contains("bob's plain text"));
    let files = inbox_files(&wa.h.home, &format!("whatsapp__{ALICE}"));
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(std::fs::read(&files[0]).unwrap(), photo);
    assert!(inbox_files(&wa.h.home, &format!("whatsapp__{BOB}")).is_empty());
    assert_eq!(wa.graph.media_downloads(), 1);
    wa.h.stop().await;
}

/// A voice note (`audio` with `voice: true`) is transcribed and answered as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whatsapp_voice_note_becomes_text() {
    let speech = FakeSpeech::start("speech-test-key", "turn the lights off").await;
    let wa = start_top(json!({
        "speech": { "baseUrl": speech.base_url(), "apiKey": "speech-test-key" }
    }))
    .await;
    let mut audio = b"OggS\0\x02".to_vec();
    audio.extend([7u8; 200]);
    let (id, sha) = wa.graph.add_media(&audio, "audio/ogg; codecs=opus");
    wa.meta
        .post_media(
            ALICE,
            "audio",
            json!({"id": id, "mime_type": "audio/ogg; codecs=opus", "sha256": sha, "voice": true}),
        )
        .await;
    let reply = replies(&wa.graph, ALICE, 1).await;
    assert!(reply[0].contains("turn the lights off"), "{reply:?}");
    assert_eq!(speech.requests().len(), 1);
    assert!(speech.requests()[0].contains(&audio));
    wa.h.stop().await;
}

/// Oversized (by the media object's claim), mislabelled (a program called a PDF), a wrong
/// sha256 and a media URL on a foreign host are refused with a clear message; the foreign
/// host never gets a request (it would have received the access token).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whatsapp_bad_media_is_refused_and_foreign_hosts_are_never_asked() {
    let wa = start_top(json!({})).await;
    let mut elf = vec![0x7F, b'E', b'L', b'F', 2, 1, 1, 0];
    elf.extend([0u8; 56]);
    // Oversized by the Graph API's claim: never downloaded.
    let (big, big_sha) = wa.graph.add_media(b"%PDF-1.4 small", "application/pdf");
    wa.graph.claim_media_size(&big, 500 << 20);
    wa.meta
        .post_media(ALICE, "document", json!({"id": big, "sha256": big_sha, "filename": "big.pdf", "mime_type": "application/pdf"}))
        .await;
    let r = replies(&wa.graph, ALICE, 1).await;
    assert!(
        r[0].contains("could not take your") && r[0].contains("MB"),
        "{r:?}"
    );
    assert_eq!(wa.graph.media_downloads(), 0);
    // Mislabelled.
    let (prog, prog_sha) = wa.graph.add_media(&elf, "application/pdf");
    wa.meta
        .post_media(ALICE, "document", json!({"id": prog, "sha256": prog_sha, "filename": "report.pdf", "mime_type": "application/pdf"}))
        .await;
    let r = replies(&wa.graph, ALICE, 2).await;
    assert!(r[1].contains("not a type I accept"), "{r:?}");
    // A sha256 that does not match what is downloaded.
    let (other, _) = wa.graph.add_media(b"%PDF-1.4 real", "application/pdf");
    let (_, wrong_sha) = wa.graph.add_media(b"something else", "application/pdf");
    wa.meta
        .post_media(
            ALICE,
            "document",
            json!({"id": other, "sha256": wrong_sha, "filename": "a.pdf"}),
        )
        .await;
    let r = replies(&wa.graph, ALICE, 3).await;
    assert!(r[2].contains("could not take your"), "{r:?}");
    // A media URL on another host: refused before any request to it.
    let (foreign, foreign_sha) = wa.graph.add_media(b"%PDF-1.4 x", "application/pdf");
    wa.graph.point_media_elsewhere(&foreign).await;
    wa.meta
        .post_media(
            ALICE,
            "document",
            json!({"id": foreign, "sha256": foreign_sha, "filename": "x.pdf"}),
        )
        .await;
    let r = replies(&wa.graph, ALICE, 4).await;
    assert!(r[3].contains("could not take your"), "{r:?}");
    assert_eq!(
        wa.graph.foreign_hits(),
        0,
        "the foreign host was never asked"
    );
    assert!(inbox_files(&wa.h.home, &format!("whatsapp__{ALICE}")).is_empty());
    wa.h.stop().await;
}

/// `send_file` on WhatsApp uploads the file (`POST /{phone}/media`, multipart) and sends it as
/// a document by media id to the person who asked; outside the 24-hour window it fails clearly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whatsapp_send_file_delivers_a_document() {
    let wa = start_top(json!({})).await;
    wa.h.llm.set_brain(|request| {
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
    wa.meta.post_text(ALICE, "hi").await;
    replies(&wa.graph, ALICE, 1).await;
    let home = wa.h.home.join(format!("users/whatsapp__{ALICE}"));
    std::fs::write(home.join("report.txt"), "alice's report").unwrap();
    wa.meta.post_text(ALICE, "send report.txt").await;
    let r = replies(&wa.graph, ALICE, 2).await;
    assert!(r[1].contains("sent `report.txt`"), "{r:?}");
    let sent = wa.graph.sent_media();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].to, ALICE);
    assert_eq!(sent[0].kind, "document");
    assert_eq!(sent[0].file_name.as_deref(), Some("report.txt"));
    assert_eq!(sent[0].caption.as_deref(), Some("here you go"));
    assert_eq!(sent[0].content, b"alice's report");

    wa.graph.outside_window(ALICE);
    wa.meta.post_text(ALICE, "send report.txt").await;
    wait_until("the window failure", || {
        status(&wa.h)
            .errors
            .iter()
            .any(|(c, _)| *c == ErrorClass::OutsideWindow)
    })
    .await;
    assert_eq!(wa.graph.sent_media().len(), 1);
    wa.h.stop().await;
}

/// One slow client: sends `head` and then trickles `trickle` a byte a second. Returns whether
/// the server closed the connection within `give_up`.
async fn slow_client(
    addr: String,
    head: String,
    trickle: &'static [u8],
    give_up: Duration,
) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(&addr).await else {
        return false;
    };
    if stream.write_all(head.as_bytes()).await.is_err() {
        return true;
    }
    let deadline = tokio::time::Instant::now() + give_up;
    let mut buf = [0u8; 1024];
    let mut next = 0;
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return true,
                // A 408 answer; the server closes next.
                Ok(_) => continue,
            },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if tokio::time::Instant::now() >= deadline {
                    return false;
                }
                let Some(byte) = trickle.get(next % trickle.len().max(1)) else {
                    continue;
                };
                next += 1;
                if stream.write_all(&[*byte]).await.is_err() {
                    return true;
                }
            }
        }
    }
}

/// Regression (review 10, M3): the web server set no header or body read timeout (axum's
/// `serve` gives hyper no timer) and had no connection cap, so clients trickling their headers
/// or a webhook body a byte at a time held their connections forever, until the gateway ran out
/// of file descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_slow_clients_are_cut_off_and_bystander_answers() {
    let wa = start(json!({}), TOKEN).await;
    let normal = wa.h.bystander_baseline(1001, 3).await;
    let addr = wa.base.trim_start_matches("http://").to_string();
    let give_up = Duration::from_secs(40);
    let mut clients = Vec::new();
    for i in 0..300 {
        let head = format!("POST /webhooks/whatsapp HTTP/1.1\r\nHost: x\r\nX-Slow-{i}: ");
        clients.push(tokio::spawn(slow_client(
            addr.clone(),
            head,
            b"abcdefgh",
            give_up,
        )));
    }
    for _ in 0..20 {
        let head = "POST /webhooks/whatsapp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4096\r\n\r\n{\"object\":".to_string();
        clients.push(tokio::spawn(slow_client(addr.clone(), head, b" ", give_up)));
    }
    // An idle connection that never sends a byte.
    clients.push(tokio::spawn(slow_client(
        addr.clone(),
        String::new(),
        b"",
        give_up,
    )));
    tokio::time::sleep(Duration::from_millis(500)).await;
    wa.h.assert_bystander_answered(1001, normal, "300 slow webhook clients")
        .await;
    let health = reqwest::get(format!("{}/healthz", wa.base)).await.unwrap();
    assert!(health.status().is_success(), "{}", health.status());
    for (i, client) in clients.into_iter().enumerate() {
        assert!(
            client.await.unwrap(),
            "slow client {i} was not cut off within {give_up:?}"
        );
    }
    wa.h.assert_bystander_answered(1001, normal, "after the slow clients")
        .await;
    wa.h.stop().await;
}

/// Regression (review 10, M5): a signed delivery has no freshness and its only dedupe was the
/// inbox row, which `users remove`/`reset` delete at once (and pruning after 30 days): whoever
/// kept one signed body could replay it and have the message answered (and its tools run)
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whatsapp_replayed_delivery_after_reset_or_pruning_is_not_answered() {
    let wa = start(json!({}), TOKEN).await;
    let (delivery, _) = wa.meta.text_delivery(ALICE, "order the pizza");
    let body = delivery.to_string();
    assert_eq!(
        wa.meta.post_raw(body.as_bytes(), Some(APP_SECRET)).await,
        200
    );
    assert_eq!(
        replies(&wa.graph, ALICE, 1).await,
        vec!["echo: order the pizza"]
    );
    let (removed, _, stderr) = run_cli(
        &wa.h.home,
        &["users", "remove", "whatsapp__4917011111111", "--yes"],
    );
    assert!(removed.success(), "{stderr}");
    // The same signed body, replayed after the user (and the inbox row) are gone.
    assert_eq!(
        wa.meta.post_raw(body.as_bytes(), Some(APP_SECRET)).await,
        200
    );
    // A signed message older than Meta's 7-day retry window, and one from the future.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for at in [now - 8 * 24 * 3600, now + 3600] {
        let (old, _) = wa.meta.text_delivery_at(ALICE, "stale order", at);
        let old = old.to_string();
        assert_eq!(
            wa.meta.post_raw(old.as_bytes(), Some(APP_SECRET)).await,
            200
        );
    }
    // A fresh message still goes through, and is the only one answered.
    wa.meta.post_text(ALICE, "a new question").await;
    let all = replies(&wa.graph, ALICE, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        wa.graph
            .sent_messages()
            .iter()
            .filter(|m| m.to == ALICE)
            .count(),
        2,
        "{all:?}"
    );
    assert_eq!(all[1], "echo: a new question");
    let s = status(&wa.h);
    assert!(s
        .errors
        .iter()
        .any(|(class, n)| *class == ErrorClass::BadDelivery && *n == 2));
    wa.h.stop().await;
}

/// Regression (review 10, L2): every unsigned POST and failed handshake replaced the channel's
/// last error, so a real one (credentials, outside the window) vanished from `/healthz` and
/// `/admin` under a stranger's flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unsigned_webhook_flood_keeps_last_real_error() {
    let wa = start(json!({}), TOKEN).await;
    wa.graph.outside_window(ALICE);
    wa.meta.post_text(ALICE, "hi").await;
    wait_until("the outside-window failure", || {
        status(&wa.h).last_error.map(|e| e.0) == Some(ErrorClass::OutsideWindow)
    })
    .await;
    let (delivery, _) = wa.meta.text_delivery(BOB, "forged");
    let body = delivery.to_string();
    for _ in 0..20 {
        assert_eq!(wa.meta.post_raw(body.as_bytes(), None).await, 401);
    }
    assert_eq!(wa.meta.verify("wrong", "abc").await.0, 403);
    let s = status(&wa.h);
    assert_eq!(s.last_error.map(|e| e.0), Some(ErrorClass::OutsideWindow));
    assert!(s
        .errors
        .iter()
        .any(|(class, n)| *class == ErrorClass::BadDelivery && *n == 21));
    wa.h.stop().await;
}
