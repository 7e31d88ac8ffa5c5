//! Regressions from the review of issue 9: a signed-in user stepping out of their rate-limit
//! bucket, and `/api/history` returning a whole session.

mod common;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Request, StatusCode};
use common::*;
use moltmate_web::WebSettings;
use std::net::{Ipv6Addr, SocketAddr};

fn from(ip: std::net::IpAddr, mut request: Request<Body>) -> Request<Body> {
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::new(ip, 40_000)));
    request
}

fn history(cookie: &str, bogus_bearer: bool) -> Request<Body> {
    let mut builder = Request::get("/api/history").header(header::COOKIE, cookie);
    if bogus_bearer {
        builder = builder.header(header::AUTHORIZATION, "Bearer not-a-token");
    }
    builder.body(Body::empty()).unwrap()
}

/// Regression: the limiter picked the request's credential as bearer first, then the
/// `mm_session` cookie, while the browser routes (`/api/history`, `/api/chat`, `/`)
/// authenticate by the cookie alone. A signed-in user who added `Authorization: Bearer
/// <anything>` was charged to the *client IP's* bucket (the bogus bearer is "unverified") and
/// still served as themselves; with IPv6 (one bucket per /64) every /64 was a fresh bucket, so
/// the per-user limit was gone. Now the credential the route authenticates with picks the
/// bucket, and a credential the route does not use is ignored.
#[tokio::test]
async fn a_bogus_bearer_next_to_a_session_cookie_stays_in_the_users_bucket() {
    let h = harness_with(WebSettings {
        rate_limit_per_minute: 1,
        rate_limit_burst: 3,
        unauthenticated_per_minute: 1,
        unauthenticated_burst: 3,
        ..test_settings()
    });
    let (anna, _) = h.user("anna").await;
    let session = h.browser_session(&anna).await;
    let home: std::net::IpAddr = "2001:db8:1:100::7".parse().unwrap();
    // Drain anna's own bucket (signing in already took a unit of it).
    let mut drained = false;
    for _ in 0..10 {
        let r = send(&h.app(), from(home, history(&session.cookie, false))).await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            drained = true;
            break;
        }
        assert_eq!(r.status, StatusCode::OK);
    }
    assert!(drained, "anna's own bucket is empty");
    // The same user, same cookie, 60 more requests from 60 addresses of her /56.
    let mut served = 0;
    for subnet in 0..60u16 {
        let ip = std::net::IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0x100 + subnet, 0, 0, 0, 7));
        let r = send(&h.app(), from(ip, history(&session.cookie, true))).await;
        if r.status == StatusCode::OK {
            served += 1;
        }
    }
    // The same for the route that runs model turns.
    let mut chat = chat_request(&session, "hello");
    chat.headers_mut()
        .insert(header::AUTHORIZATION, "Bearer not-a-token".parse().unwrap());
    let ip = std::net::IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0x1ff, 0, 0, 0, 7));
    let chat_status = send(&h.app(), from(ip, chat)).await.status;
    assert_eq!(
        (served, chat_status),
        (0, StatusCode::TOO_MANY_REQUESTS),
        "anna's bucket is empty, yet {served} of 60 history requests and a chat message were served to her"
    );
}

/// Regression: `GET /api/history` loaded the user's *whole* current session (`Store::transcript`: every row,
/// parsed) into memory and returns all its messages, while turns load bounded pages
/// (`history_page`). The current session is bounded only by the user's `transcriptMb` (1024 /
/// 512 / 256 / 32 MB by trust level) whenever compaction does not archive it: the summary call
/// fails, or a (prompt-injected) model answers the summary request with nothing
/// (`session::compact` returns `None` for an empty summary and is not retried until the
/// transcript grew by half a window). Each such request then costs memory in the size of the
/// session, several at once multiply it (and the per-user rate limit can be stepped around,
/// see above). Here a 20 MB session came back whole. Now it returns bounded pages (at most
/// `limit` rows and 1 MiB, newest first) with a `before` cursor for older ones.
#[tokio::test]
async fn history_returns_bounded_pages_of_a_huge_session() {
    use moltmate_core::model::ConversationItem;
    use moltmate_store::TurnRecord;
    let h = harness();
    let (anna, _) = h.user("anna").await;
    let session = h.browser_session(&anna).await;
    let store = h.gateway.store();
    let current = store.current_session(&anna).await.unwrap();
    for turn in 0..200 {
        let _ = store
            .complete_turn(TurnRecord {
                charge: None,
                inbox_id: inbox_row(store, &anna).await,
                user: anna.clone(),
                session_id: current.id.clone(),
                items: vec![
                    ConversationItem::User {
                        text: format!("turn {turn}"),
                    },
                    ConversationItem::Assistant {
                        text: "x".repeat(100_000),
                        tool_calls: vec![],
                    },
                ],
                reply: None,
                usage: vec![],
            })
            .await
            .unwrap();
    }
    let r = send(
        &h.app(),
        Request::get("/api/history")
            .header(header::COOKIE, &session.cookie)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.body.len() < 2 * 1024 * 1024,
        "/api/history returned {} bytes ({} messages)",
        r.body.len(),
        r.json()["messages"].as_array().map(Vec::len).unwrap_or(0)
    );
    // The newest messages come first, and the cursor pages through all of the session.
    let first = r.json();
    let newest = first["messages"].as_array().unwrap();
    assert_eq!(newest.last().unwrap()["role"], "assistant");
    let mut seen_turns = newest.iter().filter(|m| m["role"] == "user").count();
    let mut before = first["before"].as_i64();
    let mut pages = 1;
    while let Some(cursor) = before {
        let r = send(
            &h.app(),
            Request::get(format!("/api/history?before={cursor}&limit=200"))
                .header(header::COOKIE, &session.cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(
            r.body.len() < 2 * 1024 * 1024,
            "page of {} bytes",
            r.body.len()
        );
        let page = r.json();
        seen_turns += page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "user")
            .count();
        before = page["before"].as_i64();
        pages += 1;
        assert!(pages < 1_000, "paging does not end");
    }
    assert_eq!(seen_turns, 200, "every turn is reachable through the pages");
    // Limits outside 1..=200 and unknown parameters are refused, not clamped silently.
    for query in ["limit=0", "limit=100000", "before=x", "offset=3"] {
        let r = send(
            &h.app(),
            Request::get(format!("/api/history?{query}"))
                .header(header::COOKIE, &session.cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{query}");
    }
}

/// A fresh inbox row of `user` for a turn to complete (a turn whose inbox row is gone commits
/// nothing, as for a user removed meanwhile).
async fn inbox_row(store: &moltmate_store::Store, user: &moltmate_core::UserId) -> i64 {
    use moltmate_core::channel::InboundMessage;
    use moltmate_core::{ChannelKind, Identity, PeerId};
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    store
        .insert_inbound(
            &InboundMessage {
                attachments: Vec::new(),
                sender: Identity::new(ChannelKind::Telegram, PeerId::new("42").unwrap()),
                chat_id: "42".into(),
                external_id: format!("turn-{n}"),
                cursor: None,
                text: "x".into(),
                sender_name: None,
                language_code: None,
            },
            user,
        )
        .await
        .unwrap()
        .unwrap()
}
