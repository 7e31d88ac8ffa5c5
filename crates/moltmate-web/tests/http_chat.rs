//! The web chat over HTTP: sign-in, history, streamed answers, CSRF and user isolation.

mod common;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use common::*;
use std::time::Duration;

fn get(path: &str, cookie: &str) -> Request<Body> {
    Request::get(path)
        .header(header::COOKIE, cookie)
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn signed_out_visitors_get_the_sign_in_page_and_no_data() {
    let h = harness();
    let page = send(&h.app(), Request::get("/").body(Body::empty()).unwrap()).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("action=\"/login\""));
    let history = send(
        &h.app(),
        Request::get("/api/history").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(history.status, StatusCode::UNAUTHORIZED);
    let forged = send(&h.app(), get("/api/history", "mm_session=0123456789abcdef")).await;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn login_links_work_once_and_need_a_post() {
    let h = harness();
    let (anna, _) = h.user("anna").await;
    let code = h
        .gateway
        .store()
        .create_login_link(&anna, Duration::from_secs(60))
        .await
        .unwrap();

    // The GET (what a link preview fetches) shows a confirmation and redeems nothing.
    let page = send(
        &h.app(),
        Request::get(format!("/login/{code}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.cookie("mm_session").is_none());
    assert!(page.body.contains("method=\"post\""));
    assert!(
        !page.body.contains(&code),
        "the code is not rendered into the page"
    );

    let first = send(
        &h.app(),
        Request::post(format!("/login/{code}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(first.status, StatusCode::SEE_OTHER);
    assert_eq!(first.header("location"), Some("/"));
    let set_cookie = first.header("set-cookie").unwrap();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    let second = send(
        &h.app(),
        Request::post(format!("/login/{code}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(second.status, StatusCode::UNAUTHORIZED);
    assert!(second.cookie("mm_session").is_none());
    assert!(
        !second.body.contains(&code),
        "the code is never rendered back"
    );

    let nonsense = send(
        &h.app(),
        Request::get("/login/%3Cscript%3E")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(nonsense.status, StatusCode::NOT_FOUND);
    assert!(!nonsense.body.contains("<script>"));
}

#[tokio::test]
async fn secure_cookies_when_configured() {
    let h = harness_with(moltmate_web::WebSettings {
        secure_cookies: true,
        ..test_settings()
    });
    let (anna, _) = h.user("anna").await;
    let code = h
        .gateway
        .store()
        .create_login_link(&anna, Duration::from_secs(60))
        .await
        .unwrap();
    let response = send(
        &h.app(),
        Request::post(format!("/login/{code}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(response.header("set-cookie").unwrap().contains("Secure"));
}

#[tokio::test]
async fn token_form_signs_in_and_bad_tokens_do_not() {
    let h = harness();
    let (_, token) = h.user("anna").await;
    let form = |token: &str| {
        Request::post("/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("token={token}")))
            .unwrap()
    };
    let ok = send(&h.app(), form(&token)).await;
    assert_eq!(ok.status, StatusCode::SEE_OTHER);
    let cookie = ok.cookie("mm_session").unwrap();
    let history = send(
        &h.app(),
        get("/api/history", &format!("mm_session={cookie}")),
    )
    .await;
    assert_eq!(history.status, StatusCode::OK);
    assert_eq!(history.json()["user"], "anna");

    let bad = send(&h.app(), form("mm_wrong")).await;
    assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
    assert!(bad.cookie("mm_session").is_none());
    assert!(
        !bad.body.contains("mm_wrong"),
        "the presented token is not echoed"
    );
}

#[tokio::test]
async fn chat_streams_the_answer_and_history_shows_it() {
    let h = harness();
    let (anna, _) = h.user("anna").await;
    let session = h.browser_session(&anna).await;

    let page = send(&h.app(), get("/", &session.cookie)).await;
    assert!(
        page.body.contains("Cami"),
        "the default persona's name is shown"
    );

    let response = send(&h.app(), chat_request(&session, "hello web")).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.body);
    assert_eq!(
        response.header("content-type"),
        Some("application/x-ndjson")
    );
    let events = ndjson(&response.body);
    let deltas: String = events.iter().filter_map(|e| e["delta"].as_str()).collect();
    assert!(
        events.iter().filter(|e| e["delta"].is_string()).count() >= 3,
        "{events:?}"
    );
    assert_eq!(deltas, echo_of("hello web"));
    assert_eq!(events.last().unwrap()["done"], echo_of("hello web"));

    let history = send(&h.app(), get("/api/history", &session.cookie))
        .await
        .json();
    assert_eq!(history["persona"], "Cami");
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[0]["text"], "hello web");
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[1]["text"], echo_of("hello web"));
}

#[tokio::test]
async fn state_changes_without_the_csrf_token_are_refused() {
    let h = harness();
    let (anna, _) = h.user("anna").await;
    let session = h.browser_session(&anna).await;
    let body = serde_json::json!({ "message": "hi" }).to_string();

    let missing = Request::post("/api/chat")
        .header(header::COOKIE, &session.cookie)
        .body(Body::from(body.clone()))
        .unwrap();
    assert_eq!(send(&h.app(), missing).await.status, StatusCode::FORBIDDEN);
    let wrong = Request::post("/api/chat")
        .header(header::COOKIE, &session.cookie)
        .header("x-csrf-token", "0".repeat(64))
        .body(Body::from(body.clone()))
        .unwrap();
    assert_eq!(send(&h.app(), wrong).await.status, StatusCode::FORBIDDEN);
    let cross_site = Request::post("/api/chat")
        .header(header::COOKIE, &session.cookie)
        .header("x-csrf-token", &session.csrf)
        .header(header::HOST, "moltmate.local")
        .header(header::ORIGIN, "https://evil.example")
        .body(Body::from(body))
        .unwrap();
    assert_eq!(
        send(&h.app(), cross_site).await.status,
        StatusCode::FORBIDDEN
    );
    assert!(h.model.calls().is_empty(), "nothing reached the model");

    let logout_without = Request::post("/logout")
        .header(header::COOKIE, &session.cookie)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("csrf=nope"))
        .unwrap();
    assert_eq!(
        send(&h.app(), logout_without).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send(&h.app(), get("/api/history", &session.cookie))
            .await
            .status,
        StatusCode::OK,
        "still signed in"
    );

    let logout = Request::post("/logout")
        .header(header::COOKIE, &session.cookie)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!("csrf={}", session.csrf)))
        .unwrap();
    let response = send(&h.app(), logout).await;
    assert_eq!(response.status, StatusCode::SEE_OTHER);
    assert!(response.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(
        send(&h.app(), get("/api/history", &session.cookie))
            .await
            .status,
        StatusCode::UNAUTHORIZED,
        "the session is gone"
    );
}

#[tokio::test]
async fn users_never_see_each_others_history_or_memory() {
    let h = harness();
    let (anna, anna_token) = h.user("anna").await;
    let (bob, _) = h.user("bob").await;
    let bob_home = h.gateway.ensure_home(&bob).await.unwrap();
    std::fs::write(
        bob_home.root().join("MEMORY.md"),
        "Bob's secret: BOB-PRIVATE-MEMORY\n",
    )
    .unwrap();

    let bob_session = h.browser_session(&bob).await;
    let anna_session = h.browser_session(&anna).await;
    assert_eq!(
        send(&h.app(), chat_request(&bob_session, "BOB-PRIVATE-MESSAGE"))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        send(&h.app(), chat_request(&anna_session, "anna here"))
            .await
            .status,
        StatusCode::OK
    );
    let api = send(
        &h.app(),
        completion_request(&anna_token, serde_json::json!({"user": "bob", "messages": [{"role": "user", "content": "anna via api"}]})),
    )
    .await;
    assert_eq!(api.status, StatusCode::OK);

    let anna_history = send(&h.app(), get("/api/history", &anna_session.cookie)).await;
    assert!(
        !anna_history.body.contains("BOB-PRIVATE"),
        "{}",
        anna_history.body
    );
    assert!(anna_history.body.contains("anna here"));
    let bob_history = send(&h.app(), get("/api/history", &bob_session.cookie)).await;
    assert!(bob_history.body.contains("BOB-PRIVATE-MESSAGE"));
    assert!(!bob_history.body.contains("anna"));

    let calls = h.model.calls();
    assert_eq!(calls.len(), 3);
    for call in &calls {
        let bobs = call.last_user_text() == Some("BOB-PRIVATE-MESSAGE");
        assert_eq!(
            call.all_text().contains("BOB-PRIVATE-MEMORY"),
            bobs,
            "only bob's turn sees bob's memory"
        );
        if !bobs {
            assert!(
                !call.all_text().contains("BOB-PRIVATE"),
                "anna's model request holds nothing of bob's"
            );
        }
    }

    // A user's session cookie is no admin cookie.
    let bob_secret = bob_session.cookie.trim_start_matches("mm_session=");
    let as_admin = send(&h.app(), get("/admin", &format!("mm_admin={bob_secret}"))).await;
    assert!(
        as_admin.body.contains("Operator sign-in"),
        "a user session does not open the dashboard"
    );
}

#[tokio::test]
async fn every_response_carries_the_security_headers() {
    let h = harness();
    for path in ["/", "/healthz", "/nope", "/assets/chat.js", "/admin"] {
        let response = send(&h.app(), Request::get(path).body(Body::empty()).unwrap()).await;
        let csp = response
            .header("content-security-policy")
            .unwrap_or_default();
        assert!(csp.contains("default-src 'self'"), "{path}: {csp}");
        assert_eq!(response.header("x-frame-options"), Some("DENY"), "{path}");
        assert_eq!(
            response.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(
            response.header("referrer-policy"),
            Some("same-origin"),
            "{path}"
        );
    }
    let js = send(
        &h.app(),
        Request::get("/assets/chat.js").body(Body::empty()).unwrap(),
    )
    .await;
    assert!(js
        .header("content-type")
        .unwrap()
        .starts_with("text/javascript"));
    assert_eq!(
        send(
            &h.app(),
            Request::get("/assets/../Cargo.toml")
                .body(Body::empty())
                .unwrap()
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );
}
