//! The admin dashboard, pairing decisions, `/healthz` and `/metrics` over HTTP.

mod common;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use common::*;
use moltmate_core::{ChannelKind, Identity, PeerId, UserId};
use std::time::Duration;

fn form(path: &str, cookie: &str, body: String) -> Request<Body> {
    Request::post(path)
        .header(header::COOKIE, cookie)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .unwrap()
}

async fn pairing_request(h: &Harness, peer: &str, name: &str) -> (Identity, String) {
    let identity = Identity::new(ChannelKind::Telegram, PeerId::new(peer).unwrap());
    let (request, created) = h
        .gateway
        .store()
        .pairing_request_for(&identity, peer, Some(name), Duration::from_secs(600))
        .await
        .unwrap();
    assert!(created);
    (identity, request.code)
}

#[tokio::test]
async fn the_dashboard_needs_the_operator_token() {
    let h = harness();
    let (_, user_token) = h.user("anna").await;
    h.gateway
        .store()
        .ensure_user(&UserId::new("anna").unwrap(), Some("Anna Secretname"))
        .await
        .unwrap();

    let anonymous = send(
        &h.app(),
        Request::get("/admin").body(Body::empty()).unwrap(),
    )
    .await;
    assert!(anonymous.body.contains("Operator sign-in"));
    assert!(!anonymous.body.contains("anna"), "no data before sign-in");

    for wrong in [user_token.as_str(), "", "operator-secret-token-for-test"] {
        let response = send(&h.app(), form("/admin/login", "", format!("token={wrong}"))).await;
        assert_eq!(response.status, StatusCode::UNAUTHORIZED, "{wrong:?}");
        assert!(response.cookie("mm_admin").is_none());
    }

    let admin = h.admin_session().await;
    let page = send(
        &h.app(),
        Request::get("/admin")
            .header(header::COOKIE, &admin.cookie)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("anna"));
    assert!(page.body.contains("No sandbox backend."));
    assert!(
        !page.body.contains(ADMIN_TOKEN),
        "the operator token is never rendered"
    );

    // An admin session is not a chat session.
    let secret = admin.cookie.trim_start_matches("mm_admin=");
    let as_user = send(
        &h.app(),
        Request::get("/api/history")
            .header(header::COOKIE, format!("mm_session={secret}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(as_user.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn an_empty_operator_token_signs_nobody_in() {
    let h = harness_with(moltmate_web::WebSettings {
        admin_token: String::new(),
        ..test_settings()
    });
    let response = send(&h.app(), form("/admin/login", "", "token=".to_string())).await;
    assert_eq!(response.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_admin_approves_and_denies_pairing_requests() {
    let h = harness();
    let (approved_identity, approve_code) =
        pairing_request(&h, "4242", "Mallory <script>alert(1)</script>").await;
    let (denied_identity, deny_code) = pairing_request(&h, "5151", "Eve").await;
    let admin = h.admin_session().await;

    let page = send(
        &h.app(),
        Request::get("/admin")
            .header(header::COOKIE, &admin.cookie)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(page.body.contains(&approve_code) && page.body.contains(&deny_code));
    assert!(
        page.body.contains("Mallory &lt;script&gt;"),
        "names are escaped"
    );
    assert!(!page.body.contains("<script>alert(1)"));

    // Without the CSRF token (or with the wrong one), or without the admin session: refused.
    let no_csrf = send(
        &h.app(),
        form(
            "/admin/pairing",
            &admin.cookie,
            format!("channel=telegram&code={approve_code}&decision=approve"),
        ),
    )
    .await;
    assert_eq!(no_csrf.status, StatusCode::FORBIDDEN);
    let wrong_csrf = send(
        &h.app(),
        form(
            "/admin/pairing",
            &admin.cookie,
            format!("csrf=abc&channel=telegram&code={approve_code}&decision=approve"),
        ),
    )
    .await;
    assert_eq!(wrong_csrf.status, StatusCode::FORBIDDEN);
    let (anna, _) = h.user("anna").await;
    let user_session = h.browser_session(&anna).await;
    let as_user = send(
        &h.app(),
        form(
            "/admin/pairing",
            &user_session.cookie,
            format!(
                "csrf={}&channel=telegram&code={approve_code}&decision=approve",
                user_session.csrf
            ),
        ),
    )
    .await;
    assert_eq!(as_user.status, StatusCode::UNAUTHORIZED);
    assert!(h
        .gateway
        .store()
        .user_for_identity(&approved_identity)
        .await
        .unwrap()
        .is_none());

    let approve = send(
        &h.app(),
        form(
            "/admin/pairing",
            &admin.cookie,
            format!(
                "csrf={}&channel=telegram&code={approve_code}&decision=approve",
                admin.csrf
            ),
        ),
    )
    .await;
    assert_eq!(approve.status, StatusCode::SEE_OTHER);
    assert_eq!(approve.header("location"), Some("/admin?done=approved"));
    let (user, source) = h
        .gateway
        .store()
        .user_for_identity(&approved_identity)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(user.as_str(), "telegram_4242");
    assert_eq!(source, "pairing");

    let deny = send(
        &h.app(),
        form(
            "/admin/pairing",
            &admin.cookie,
            format!(
                "csrf={}&channel=telegram&code={deny_code}&decision=deny",
                admin.csrf
            ),
        ),
    )
    .await;
    assert_eq!(deny.header("location"), Some("/admin?done=denied"));
    assert!(h
        .gateway
        .store()
        .user_for_identity(&denied_identity)
        .await
        .unwrap()
        .is_none());
    assert!(h
        .gateway
        .store()
        .pending_pairing_requests()
        .await
        .unwrap()
        .is_empty());

    // Deciding again: the request is gone, said plainly.
    let again = send(
        &h.app(),
        form(
            "/admin/pairing",
            &admin.cookie,
            format!(
                "csrf={}&channel=telegram&code={deny_code}&decision=approve",
                admin.csrf
            ),
        ),
    )
    .await;
    assert_eq!(again.header("location"), Some("/admin?done=gone"));

    let page = send(
        &h.app(),
        Request::get("/admin?done=approved")
            .header(header::COOKIE, &admin.cookie)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(page.body.contains("Pairing approved."));
    assert!(
        page.body.contains("telegram:4242"),
        "the new user's identity is listed"
    );
    assert!(
        page.body.contains("pairing_approved"),
        "the decision is audited"
    );
}

#[tokio::test]
async fn the_dashboard_shows_usage_and_audit() {
    let h = harness();
    let (anna, _) = h.user("anna").await;
    let session = h.browser_session(&anna).await;
    assert_eq!(
        send(&h.app(), chat_request(&session, "count my tokens"))
            .await
            .status,
        StatusCode::OK
    );
    let admin = h.admin_session().await;
    let page = send(
        &h.app(),
        Request::get("/admin")
            .header(header::COOKIE, &admin.cookie)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(
        page.body.contains("<dt>Tokens</dt><dd>12 in, 7 out</dd>"),
        "token usage per user"
    );
    assert!(
        page.body.contains("<th>Messages today</th>")
            && page
                .body
                .contains("<td class=\"num\">1 / 2,000</td><td class=\"num\">19 / 10,000,000</td>"),
        "today's usage against the user's budgets"
    );
    assert!(
        page.body.contains("<th>Reminders</th>")
            && page.body.contains("<td class=\"num\">0 / 50</td>"),
        "reminders against the user's cap"
    );
    assert!(
        page.body.contains("<dt>Messages</dt><dd>1</dd>"),
        "messages per user"
    );
    let logout = send(
        &h.app(),
        form(
            "/admin/logout",
            &admin.cookie,
            format!("csrf={}", admin.csrf),
        ),
    )
    .await;
    assert_eq!(logout.status, StatusCode::SEE_OTHER);
    let after = send(
        &h.app(),
        Request::get("/admin")
            .header(header::COOKIE, &admin.cookie)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(after.body.contains("Operator sign-in"));
}

#[tokio::test]
async fn healthz_reports_liveness_without_secrets() {
    let h = harness();
    let response = send(
        &h.app(),
        Request::get("/healthz").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(response.status, StatusCode::OK);
    let body = response.json();
    assert_eq!(body["status"], "ok");
    assert!(body["uptime_seconds"].is_u64());
    assert_eq!(body["active_users"], 0);
    assert!(body["sandbox"].is_null());
    assert!(!response.body.contains(ADMIN_TOKEN));
    h.shutdown.cancel();
    let response = send(
        &h.app(),
        Request::get("/healthz").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.json()["status"], "shutting_down");
}

#[tokio::test]
async fn metrics_join_the_gateways_and_the_web_layers() {
    let h = harness();
    let (_, token) = h.user("anna").await;
    let (anna, _) = h.user("anna").await;
    let code = h
        .gateway
        .store()
        .create_login_link(&anna, Duration::from_secs(60))
        .await
        .unwrap();
    send(
        &h.app(),
        Request::get(format!("/login/{code}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    send(
        &h.app(),
        completion_request(
            &token,
            serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}),
        ),
    )
    .await;
    let response = send(
        &h.app(),
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(response.status, StatusCode::OK);
    let text = response.body;
    assert!(
        text.contains("moltmate_messages_total{channel=\"web\",outcome=\"queued\"} 1"),
        "{text}"
    );
    assert!(text.contains("moltmate_web_http_requests_total{route=\"/v1/chat/completions\",method=\"POST\",status=\"200\"} 1"), "{text}");
    assert!(
        text.contains("route=\"/login/{code}\""),
        "routes are templates"
    );
    assert!(!text.contains(&code), "login codes never reach a label");
    assert_eq!(text.matches("# EOF").count(), 1);
    assert!(text.ends_with("# EOF\n"));
}

struct FixedChecks(moltmate_core::doctor::Report);

#[async_trait::async_trait]
impl moltmate_core::doctor::SecurityChecks for FixedChecks {
    async fn report(&self) -> moltmate_core::doctor::Report {
        self.0.clone()
    }
}

async fn dashboard(h: &Harness) -> String {
    let admin = h.admin_session().await;
    let page = send(
        &h.app(),
        Request::get("/admin")
            .header(header::COOKIE, &admin.cookie)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(page.status, StatusCode::OK);
    page.body
}

#[tokio::test]
async fn the_dashboard_lists_the_security_checks_failures_first() {
    use moltmate_core::doctor::{Check, Report};
    let report = Report {
        version: "9.9.9".to_string(),
        checks: vec![
            Check::pass("version", "Version", "moltmate 9.9.9"),
            Check::warn(
                "logging.tools",
                "Tool calls are logged",
                "logging.tools is off",
                "set logging.tools: true",
            ),
            Check::fail(
                "perm.config",
                "moltmate.json is private (0600)",
                "/h/moltmate.json is 0644 <script>alert(1)</script>",
                "run `moltmate doctor --fix`",
            ),
        ],
    };
    let h = harness_with(moltmate_web::WebSettings {
        security_checks: Some(std::sync::Arc::new(FixedChecks(report))),
        ..test_settings()
    });
    let body = dashboard(&h).await;
    assert!(body.contains("<h2>Security checks</h2>"));
    assert!(body.contains("1 fail · 1 warn · 1 pass"), "{body}");
    let fail = body.find("data-check=\"perm.config\"").unwrap();
    let warn = body.find("data-check=\"logging.tools\"").unwrap();
    let pass = body.find("data-check=\"version\"").unwrap();
    assert!(fail < warn && warn < pass, "failures first, then warnings");
    assert!(body.contains("status-fail"));
    assert!(body.contains("run `moltmate doctor --fix`"));
    assert!(body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(!body.contains("<script>alert(1)"), "details are escaped");
}

#[tokio::test]
async fn without_checks_the_dashboard_says_where_to_run_them() {
    let h = harness();
    let body = dashboard(&h).await;
    assert!(body.contains("<h2>Security checks</h2>"));
    assert!(body.contains("Not available here; run <code>moltmate doctor</code>."));
}

/// Sections used to be filled one `replacen` after another, so a pairing sender named
/// `{{checks}}` pulled the security checks into their table row and left the placeholder in
/// the real section.
#[tokio::test]
async fn a_sender_named_like_a_placeholder_does_not_move_dashboard_sections() {
    use moltmate_core::doctor::{Check, Report};
    let report = Report {
        version: "1".to_string(),
        checks: vec![Check::pass("version", "Version", "marker-of-the-checks")],
    };
    let h = harness_with(moltmate_web::WebSettings {
        security_checks: Some(std::sync::Arc::new(FixedChecks(report))),
        ..test_settings()
    });
    pairing_request(&h, "4242", "{{checks}}{{audit}}{{users}}").await;
    let body = dashboard(&h).await;
    assert!(
        body.contains("{{checks}}{{audit}}{{users}}"),
        "the name stays text"
    );
    let section = body.find("<section id=\"checks\">").unwrap();
    let marker = body.find("marker-of-the-checks").unwrap();
    assert!(marker > section, "the checks render in their own section");
    assert_eq!(body.matches("marker-of-the-checks").count(), 1);
    assert_eq!(
        body.matches("No audit events yet.").count() + body.matches("<th>Kind</th>").count(),
        1
    );
}
