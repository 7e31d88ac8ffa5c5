//! People chatting over Slack's Events API (HTTP) with the real gateway: requests signed like
//! Slack signs them, POSTed to the gateway's `/webhooks/slack`; replies to the fake Web API.

mod common;

use common::Harness;
use moltmate_core::channel_status::ErrorClass;
use moltmate_core::ChannelKind;
use moltmate_testkit::llm::Reply;
use moltmate_testkit::slack::{EventsSender, FakeSlack, Signing, TEAM_ID};
use serde_json::{json, Value};
use std::time::Duration;

const BOT: &str = "xoxb-1-slack-BOT-secret-NEVER-logged";
const SIGNING: &str = "5ec2e75ec2e75ec2e75ec2e7NEVERlog";

struct Events {
    h: Harness,
    slack: FakeSlack,
    sender: EventsSender,
    base: String,
}

async fn start(bot_token: &str, extra: Value) -> Events {
    let slack = FakeSlack::start(BOT, "xapp-unused").await;
    let mut channel = json!({
        "mode": "events", "botToken": bot_token, "signingSecret": SIGNING,
        "apiUrl": slack.api_url(), "dmPolicy": "open", "allowFrom": ["*"],
    });
    common::merge(&mut channel, extra);
    let port = common::free_port();
    let h = Harness::start(json!({
        "gateway": { "port": port },
        "channels": { "slack": channel, "telegram": { "enabled": false } },
    }))
    .await;
    let base = h.start_web().await;
    let sender = EventsSender::new(&format!("{base}/webhooks/slack"), SIGNING);
    Events {
        h,
        slack,
        sender,
        base,
    }
}

fn status(h: &Harness) -> moltmate_core::channel_status::ChannelStatus {
    h.built
        .gateway
        .channel_statuses()
        .into_iter()
        .find(|s| s.channel == ChannelKind::Slack)
        .expect("slack is configured")
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn ready(e: &Events) {
    wait_until("the bot token to be checked", || status(&e.h).connected).await;
}

async fn replies(slack: &FakeSlack, user: &str, count: usize) -> Vec<String> {
    slack
        .wait_for_messages(&FakeSlack::dm_channel(user), count, Duration::from_secs(20))
        .await
        .unwrap_or_else(|got| panic!("no reply for {user}: got {got:?}"))
}

fn inbox_rows(home: &std::path::Path) -> i64 {
    let db = rusqlite::Connection::open_with_flags(
        home.join("moltmate.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    db.query_row("SELECT COUNT(*) FROM inbox", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slack_events_signed_dms_of_two_users_are_answered_each_only_their_own() {
    let e = start(BOT, json!({})).await;
    ready(&e).await;
    // Saving the Request URL: Slack's handshake, echoed only when signed.
    assert_eq!(
        e.sender
            .url_verification(
                "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
                &e.sender.good()
            )
            .await,
        (
            200,
            "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P".to_string()
        )
    );
    assert_eq!(
        e.sender
            .url_verification("abc", &Signing::default())
            .await
            .0,
        401
    );
    let (a, b) = tokio::join!(
        async {
            for round in 0..3 {
                assert_eq!(
                    e.sender
                        .post_dm("U111", &format!("alice says {round}"))
                        .await
                        .0,
                    200
                );
            }
        },
        async {
            for round in 0..3 {
                assert_eq!(
                    e.sender
                        .post_dm("U222", &format!("bob says {round}"))
                        .await
                        .0,
                    200
                );
            }
        }
    );
    let _ = (a, b);
    assert_eq!(
        replies(&e.slack, "U111", 3).await,
        vec![
            "echo: alice says 0",
            "echo: alice says 1",
            "echo: alice says 2"
        ]
    );
    assert_eq!(
        replies(&e.slack, "U222", 3).await,
        vec!["echo: bob says 0", "echo: bob says 1", "echo: bob says 2"]
    );
    assert!(e
        .h
        .home
        .join(format!("users/slack_{}_u111", TEAM_ID.to_lowercase()))
        .is_dir());
    let s = status(&e.h);
    assert!(s.connected && s.last_event_ms.is_some(), "{s:?}");
    e.h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slack_events_unsigned_forged_stale_and_oversized_requests_are_refused_with_nothing_stored()
{
    let e = start(BOT, json!({})).await;
    ready(&e).await;
    let (event, _) = e.sender.dm_event("U111", "forged");
    let body = e.sender.callback(event).to_string();
    let body = body.as_bytes();
    let refused = [
        // No headers at all.
        (Signing::default(), 401, "unsigned"),
        // Signed, but no timestamp header (the signature is over a timestamp we never see).
        (
            Signing {
                secret: Some(SIGNING),
                skew_seconds: None,
                retry: None,
            },
            401,
            "no timestamp",
        ),
        (
            Signing {
                secret: Some("0000000000000000wrongsecret"),
                skew_seconds: Some(0),
                retry: None,
            },
            401,
            "wrong secret",
        ),
        (
            Signing {
                secret: Some(SIGNING),
                skew_seconds: Some(-301),
                retry: None,
            },
            401,
            "stale (a replay)",
        ),
        (
            Signing {
                secret: Some(SIGNING),
                skew_seconds: Some(600),
                retry: None,
            },
            401,
            "from the future",
        ),
    ];
    for (signing, expected, what) in refused {
        assert_eq!(
            e.sender.post_raw(body, &signing).await.0,
            expected,
            "{what}"
        );
    }
    // Over the Slack bound (signed), and over the web layer's bound.
    let big = json!({"type": "event_callback", "team_id": TEAM_ID, "pad": "x".repeat(200 * 1024)})
        .to_string();
    assert_eq!(
        e.sender.post_raw(big.as_bytes(), &e.sender.good()).await.0,
        413
    );
    let huge = vec![b'x'; 300 * 1024];
    assert_eq!(e.sender.post_raw(&huge, &e.sender.good()).await.0, 413);
    assert_eq!(
        e.sender.post_raw(b"not json", &e.sender.good()).await.0,
        400
    );
    // GET is not how Slack talks.
    assert_eq!(
        reqwest::get(format!("{}/webhooks/slack", e.base))
            .await
            .unwrap()
            .status()
            .as_u16(),
        405
    );
    // An event of another workspace (signed: another team's install of the same app).
    let (mut event, _) = e.sender.dm_event("U333", "other team");
    event["team"] = json!("T0OTHER");
    let mut other = e.sender.callback(event);
    other["team_id"] = json!("T0OTHER");
    assert_eq!(e.sender.post(&other).await, 200);

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(e.slack.posted().is_empty(), "nothing answered");
    assert!(e.h.llm.requests().is_empty(), "nothing reached the model");
    assert_eq!(inbox_rows(&e.h.home), 0, "nothing stored");
    assert!(status(&e.h)
        .errors
        .iter()
        .any(|(c, n)| *c == ErrorClass::BadDelivery && *n >= 6));
    // The operator's log and status never carry the secret.
    let health = reqwest::get(format!("{}/healthz", e.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!health.contains(SIGNING) && !health.contains(BOT));
    e.h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slack_events_retries_of_a_delivery_are_answered_once() {
    let e = start(BOT, json!({})).await;
    ready(&e).await;
    let (event, _) = e.sender.dm_event("U111", "only once");
    let body = e.sender.callback(event).to_string();
    assert_eq!(
        e.sender.post_raw(body.as_bytes(), &e.sender.good()).await.0,
        200
    );
    // Slack did not see our 200 in time: the same event again, with X-Slack-Retry-Num.
    for retry in 1..=3 {
        let mut signing = e.sender.good();
        signing.retry = Some(retry);
        assert_eq!(e.sender.post_raw(body.as_bytes(), &signing).await.0, 200);
    }
    assert_eq!(replies(&e.slack, "U111", 1).await, vec!["echo: only once"]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(e.slack.posted().len(), 1, "answered once");
    assert_eq!(e.h.llm.request_count(), 1);
    e.h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slack_events_restart_in_the_middle_loses_nothing_and_answers_once() {
    let e = start(BOT, json!({})).await;
    ready(&e).await;
    e.h.llm.set_brain(|request| {
        let text = request.last_user_text().unwrap_or_default();
        Reply::delayed(Duration::from_secs(2), Reply::text(format!("echo: {text}")))
    });
    assert_eq!(e.sender.post_dm("U111", "a slow question").await.0, 200);
    wait_until("the model to be asked", || !e.h.llm.requests().is_empty()).await;
    let h = e.h.restart().await;
    assert_eq!(
        replies(&e.slack, "U111", 1).await,
        vec!["echo: a slow question"]
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(e.slack.posted().len(), 1, "answered exactly once");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slack_events_wrong_bot_token_gives_a_clear_operator_error() {
    let e = start("xoxb-1-WRONG-token", json!({})).await;
    wait_until("the refused token", || {
        status(&e.h).last_error.map(|x| x.0) == Some(ErrorClass::Credentials)
    })
    .await;
    // Slack is told to come back later; nothing is stored meanwhile.
    assert_eq!(e.sender.post_dm("U111", "hi").await.0, 503);
    assert!(!status(&e.h).connected);
    let health: Value = reqwest::get(format!("{}/healthz", e.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["channels"]["slack"]["last_error"], "credentials");
    let metrics = reqwest::get(format!("{}/metrics", e.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("moltmate_channel_errors_total{channel=\"slack\",class=\"credentials\"}"),
        "{metrics}"
    );
    for text in [health.to_string(), metrics] {
        assert!(!text.contains("WRONG") && !text.contains(SIGNING));
    }
    assert_eq!(inbox_rows(&e.h.home), 0);
    e.h.stop().await;
}

/// A sender that trickles a body (slow-loris) gets 408 once the webhook's time bound is over,
/// holds nothing up meanwhile, and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slack_events_a_trickled_body_times_out_while_others_are_answered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let e = start(BOT, json!({})).await;
    ready(&e).await;
    // The bystander's normal answer time.
    let started = std::time::Instant::now();
    assert_eq!(e.sender.post_dm("U222", "baseline").await.0, 200);
    replies(&e.slack, "U222", 1).await;
    let normal = started.elapsed();

    let addr = e.base.trim_start_matches("http://").to_string();
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
        socket
            .write_all(
                format!(
                    "POST /webhooks/slack HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 4000\r\nX-Slack-Request-Timestamp: 1\r\nX-Slack-Signature: v0=00\r\n\r\n{{\"type\""
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        slow.push(socket);
    }
    let started = std::time::Instant::now();
    assert_eq!(e.sender.post_dm("U222", "still there?").await.0, 200);
    assert_eq!(replies(&e.slack, "U222", 2).await[1], "echo: still there?");
    let took = started.elapsed();
    assert!(
        took <= common::bystander_bound(normal),
        "bystander took {took:?}, normally {normal:?}"
    );
    // Each trickler is cut off with 408 (`webhook_body_timeout`), without waiting for its body.
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(20), slow[0].read(&mut answer))
        .await
        .expect("the server answers within its body timeout")
        .unwrap();
    let head = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert_eq!(inbox_rows(&e.h.home), 2, "only the bystander's messages");
    e.h.stop().await;
}
