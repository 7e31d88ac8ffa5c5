//! People chatting over WhatsApp (Cloud API) with the real gateway: signed webhook deliveries
//! to the gateway's web server, replies to the fake Graph API.

mod common;

use common::{run_cli, Harness};
use moltmate::wiring;
use moltmate_core::channel_status::ErrorClass;
use moltmate_core::ChannelKind;
use moltmate_testkit::llm::Reply;
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
