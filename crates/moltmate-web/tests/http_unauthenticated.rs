//! What a request costs before it is known who sent it: rate limits that fit who is asking
//! (per user when the credential is verified, per client IP otherwise), metrics that take no
//! text from requests or models, and sign-ins that refuse `Origin: null`.

mod common;

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Request, StatusCode};
use common::*;
use moltmate_core::model::{
    ConversationItem, DeltaSink, ModelResponse, StopReason, TokenUsage, ToolCall, ToolSpec,
};
use moltmate_core::Shutdown;
use moltmate_gateway::agent::{ModelAnswer, ModelCaller, ModelFailure, ToolBox};
use moltmate_gateway::{Gateway, GatewayParts, GatewaySettings};
use moltmate_store::{Homes, Store};
use moltmate_web::{WebSettings, WebState};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// `request` as if it came from `ip` over TCP (what `serve` attaches to every request).
fn from(ip: [u8; 4], mut request: Request<Body>) -> Request<Body> {
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::from((ip, 40_000))));
    request
}

fn models(token: &str) -> Request<Body> {
    Request::get("/v1/models")
        .header(header::AUTHORIZATION, bearer(token))
        .body(Body::empty())
        .unwrap()
}

fn form(path: &str, body: String) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .unwrap()
}

const HOME_ROUTER: [u8; 4] = [203, 0, 113, 7];
const ELSEWHERE: [u8; 4] = [198, 51, 100, 9];

#[tokio::test]
async fn twenty_api_clients_behind_one_address_do_not_share_a_bucket() {
    // Regression: every request also counted against one per-IP bucket (100/min, burst 50),
    // so 20 clients behind one router got 429 on nearly every request.
    let h = harness();
    let mut tokens = Vec::new();
    for i in 0..20 {
        tokens.push(h.user(&format!("member{i}")).await.1);
    }
    let mut clients = Vec::new();
    for token in tokens {
        let app = h.app();
        clients.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for round in 0..10 {
                let response = if round == 0 {
                    send(
                        &app,
                        from(
                            HOME_ROUTER,
                            completion_request(
                                &token,
                                serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}),
                            ),
                        ),
                    )
                    .await
                } else {
                    send(&app, from(HOME_ROUTER, models(&token))).await
                };
                statuses.push(response.status);
            }
            statuses
        }));
    }
    for client in clients {
        let statuses = client.await.unwrap();
        assert!(
            statuses.iter().all(|s| *s == StatusCode::OK),
            "{statuses:?}"
        );
    }
}

#[tokio::test]
async fn one_user_is_limited_across_their_tokens_and_sessions() {
    let h = harness_with(WebSettings {
        rate_limit_per_minute: 1,
        rate_limit_burst: 5,
        ..test_settings()
    });
    let (anna, first) = h.user("anna").await;
    let second = h
        .gateway
        .store()
        .issue_token(&anna, Some("laptop"))
        .await
        .unwrap();
    let (_, bobs) = h.user("bob").await;
    for _ in 0..5 {
        let response = send(&h.app(), from(HOME_ROUTER, models(&first))).await;
        assert_eq!(response.status, StatusCode::OK);
    }
    let limited = send(&h.app(), from(ELSEWHERE, models(&first))).await;
    assert_eq!(
        limited.status,
        StatusCode::TOO_MANY_REQUESTS,
        "a token is limited wherever it comes from"
    );
    assert!(limited.header("retry-after").is_some());
    assert_eq!(
        send(&h.app(), from(HOME_ROUTER, models(&second)))
            .await
            .status,
        StatusCode::TOO_MANY_REQUESTS,
        "a second token of the same user shares the bucket"
    );
    assert_eq!(
        send(&h.app(), from(HOME_ROUTER, models(&bobs)))
            .await
            .status,
        StatusCode::OK,
        "another user behind the same address is not affected"
    );
}

#[tokio::test]
async fn an_address_spraying_bogus_tokens_is_limited_and_its_neighbours_are_not() {
    let h = harness_with(WebSettings {
        unauthenticated_per_minute: 1,
        unauthenticated_burst: 10,
        ..test_settings()
    });
    let (_, family_token) = h.user("anna").await;
    // A family member's client, verified once (one unit of the address's bucket).
    assert_eq!(
        send(&h.app(), from(HOME_ROUTER, models(&family_token)))
            .await
            .status,
        StatusCode::OK
    );
    let mut statuses = Vec::new();
    for i in 0..40 {
        let bogus = format!("mm_{:064x}", i);
        statuses.push(
            send(&h.app(), from(HOME_ROUTER, models(&bogus)))
                .await
                .status,
        );
    }
    let unauthorized = statuses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    assert_eq!(
        unauthorized, 9,
        "the burst, minus the family's verification"
    );
    assert!(statuses[9..]
        .iter()
        .all(|s| *s == StatusCode::TOO_MANY_REQUESTS));
    // No credential at all counts against the same bucket.
    assert_eq!(
        send(
            &h.app(),
            from(
                HOME_ROUTER,
                Request::get("/v1/models").body(Body::empty()).unwrap()
            )
        )
        .await
        .status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        send(&h.app(), from(HOME_ROUTER, models(&family_token)))
            .await
            .status,
        StatusCode::OK,
        "a verified client behind the same router keeps working"
    );
    assert_eq!(
        send(&h.app(), from(ELSEWHERE, models("mm_bogus")))
            .await
            .status,
        StatusCode::UNAUTHORIZED,
        "other addresses have their own bucket"
    );
    let metrics = send(
        &h.app(),
        from(
            ELSEWHERE,
            Request::get("/metrics").body(Body::empty()).unwrap(),
        ),
    )
    .await
    .body;
    assert!(
        metrics.contains("moltmate_web_rate_limited_total{bucket=\"ip\"} 32"),
        "{metrics}"
    );
}

#[tokio::test]
async fn sign_in_routes_are_limited_per_address_whatever_cookie_comes_along() {
    let h = harness_with(WebSettings {
        unauthenticated_per_minute: 1,
        unauthenticated_burst: 6,
        ..test_settings()
    });
    let (anna, _) = h.user("anna").await;
    let session = h.browser_session(&anna).await; // one sign-in from the "unknown" address
    let with_cookie = |mut request: Request<Body>| {
        request
            .headers_mut()
            .insert(header::COOKIE, session.cookie.parse().unwrap());
        request
    };
    let attempt = |path: &str| {
        let body = match path {
            "/login" => "token=mm_wrong",
            "/admin/login" => "token=not-the-operator-token",
            _ => "",
        };
        form(path, body.to_string())
    };
    let link = format!("/login/{}", "ab".repeat(32));
    let mut statuses = Vec::new();
    for round in 0..3 {
        for path in ["/login", link.as_str(), "/admin/login"] {
            // A valid session cookie does not move a sign-in out of the address's bucket.
            let request = if round == 1 {
                with_cookie(attempt(path))
            } else {
                attempt(path)
            };
            statuses.push(send(&h.app(), from(HOME_ROUTER, request)).await.status);
        }
    }
    assert!(
        statuses[..6].iter().all(|s| *s == StatusCode::UNAUTHORIZED),
        "{statuses:?}"
    );
    // Past the address's quota each credential gets its own few tries (see
    // `sign_in_buckets_behind_a_shared_address`), then it is refused too.
    for path in ["/login", link.as_str(), "/admin/login"] {
        let mut refused = false;
        for _ in 0..=moltmate_web::security::SIGN_IN_ACCOUNT_BURST {
            let status = send(&h.app(), from(HOME_ROUTER, attempt(path)))
                .await
                .status;
            refused |= status == StatusCode::TOO_MANY_REQUESTS;
        }
        assert!(refused, "{path} is limited past its own tries");
    }
    // The signed-in user's own requests are not on the address's bucket.
    let history = send(
        &h.app(),
        from(
            HOME_ROUTER,
            Request::get("/api/history")
                .header(header::COOKIE, &session.cookie)
                .body(Body::empty())
                .unwrap(),
        ),
    )
    .await;
    assert_eq!(history.status, StatusCode::OK);
    assert_eq!(
        send(&h.app(), from(ELSEWHERE, form("/login", "token=x".into())))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
}

/// Sign-in buckets behind a shared IPv6 /48 or CGNAT: a hostile neighbour behind the same
/// address (here one IPv4; an IPv6 /48 shares its site bucket the same way) floods every
/// sign-in route until the address has no quota left. Anna's own token and login link and the
/// operator's token still sign in, each on its own bucket; only a credential that used up its
/// own tries is refused.
#[tokio::test]
async fn sign_in_buckets_behind_a_shared_address_keep_each_accounts_tries() {
    let h = harness_with(WebSettings {
        unauthenticated_per_minute: 1,
        unauthenticated_burst: 4,
        ..test_settings()
    });
    let (anna, token) = h.user("anna").await;
    let code = h
        .gateway
        .store()
        .create_login_link(&anna, Duration::from_secs(600))
        .await
        .unwrap();
    // The neighbour: wrong tokens, guessed links, wrong operator tokens, well past the
    // address's quota of 4.
    let guess = |n: u32| match n % 3 {
        0 => form("/login", format!("token=mm_guess{n}")),
        1 => form(&format!("/login/{n:064x}"), String::new()),
        _ => form("/admin/login", format!("token=guess{n}")),
    };
    for n in 0..20 {
        assert_eq!(
            send(&h.app(), from(HOME_ROUTER, guess(n))).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    // The address is out of quota for everything else.
    assert_eq!(
        send(&h.app(), from(HOME_ROUTER, models("mm_bogus")))
            .await
            .status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Anna, behind the same address, still signs in with her token and with her link, and the
    // operator with theirs.
    let signed_in = send(
        &h.app(),
        from(HOME_ROUTER, form("/login", format!("token={token}"))),
    )
    .await;
    assert_eq!(signed_in.status, StatusCode::SEE_OTHER);
    let linked = send(
        &h.app(),
        from(HOME_ROUTER, form(&format!("/login/{code}"), String::new())),
    )
    .await;
    assert_eq!(linked.status, StatusCode::SEE_OTHER);
    let operator = send(
        &h.app(),
        from(
            HOME_ROUTER,
            form("/admin/login", format!("token={ADMIN_TOKEN}")),
        ),
    )
    .await;
    assert_eq!(operator.status, StatusCode::SEE_OTHER);
    // One credential's tries are bounded: the neighbour repeating a guess is refused after
    // SIGN_IN_ACCOUNT_BURST of them, and that does not touch Anna's.
    let mut statuses = Vec::new();
    for _ in 0..=moltmate_web::security::SIGN_IN_ACCOUNT_BURST {
        statuses.push(
            send(
                &h.app(),
                from(HOME_ROUTER, form("/login", "token=mm_same_guess".into())),
            )
            .await
            .status,
        );
    }
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::UNAUTHORIZED)
            .count(),
        moltmate_web::security::SIGN_IN_ACCOUNT_BURST as usize,
        "{statuses:?}"
    );
    assert_eq!(statuses.last(), Some(&StatusCode::TOO_MANY_REQUESTS));
    let again = send(
        &h.app(),
        from(HOME_ROUTER, form("/login", format!("token={token}"))),
    )
    .await;
    assert_eq!(again.status, StatusCode::SEE_OTHER);
    // sign_in_overflow_drained_from_elsewhere_does_not_refuse_a_neighbours_token: an attacker
    // elsewhere, past their own quota, sends as many guesses as they can (distinct ones and the
    // same one over and over); Anna's real token behind HOME_ROUTER still signs in.
    let mut refused = 0;
    for n in 0..(2 * moltmate_web::security::SIGN_IN_OVERFLOW_PER_MINUTE) {
        for request in [
            guess(2000 + n),
            form("/login", "token=mm_same_guess".into()),
        ] {
            if send(&h.app(), from(ELSEWHERE, request)).await.status
                == StatusCode::TOO_MANY_REQUESTS
            {
                refused += 1;
            }
        }
    }
    assert!(
        refused > moltmate_web::security::SIGN_IN_OVERFLOW_PER_MINUTE,
        "the attacker elsewhere was not bounded ({refused} refused)"
    );
    let after_drain = send(
        &h.app(),
        from(HOME_ROUTER, form("/login", format!("token={token}"))),
    )
    .await;
    assert_eq!(after_drain.status, StatusCode::SEE_OTHER);
    // What all sign-ins past one site's quota may cost the server is bounded: distinct
    // guesses are refused once the site's share of the overflow is used up.
    let mut n = 1000;
    while send(&h.app(), from(HOME_ROUTER, guess(n))).await.status != StatusCode::TOO_MANY_REQUESTS
    {
        n += 1;
        assert!(
            n < 1000 + moltmate_web::security::SIGN_IN_OVERFLOW_SITE_PER_MINUTE + 5,
            "sign-ins past the address's quota are not bounded"
        );
    }
    let metrics = send(
        &h.app(),
        from(
            [192, 0, 2, 1],
            Request::get("/metrics").body(Body::empty()).unwrap(),
        ),
    )
    .await
    .body;
    assert!(
        metrics.contains("moltmate_web_rate_limited_total{bucket=\"sign_in\"} "),
        "{metrics}"
    );
}

#[tokio::test]
async fn origin_null_is_refused_on_every_sign_in_route() {
    let h = harness();
    let (anna, token) = h.user("anna").await;
    let code = h
        .gateway
        .store()
        .create_login_link(&anna, Duration::from_secs(600))
        .await
        .unwrap();
    let sign_ins = [
        ("/login".to_string(), format!("token={token}")),
        (format!("/login/{code}"), String::new()),
        ("/admin/login".to_string(), format!("token={ADMIN_TOKEN}")),
    ];
    for (path, body) in &sign_ins {
        // Login CSRF: a sandboxed frame or a data: page posts with `Origin: null`.
        let mut request = form(path, body.clone());
        request
            .headers_mut()
            .insert(header::ORIGIN, "null".parse().unwrap());
        let response = send(&h.app(), request).await;
        assert_eq!(response.status, StatusCode::FORBIDDEN, "{path}");
        assert!(response.cookie("mm_session").is_none() && response.cookie("mm_admin").is_none());
        // No Origin, but the browser says the request is cross-site.
        let mut request = form(path, body.clone());
        request
            .headers_mut()
            .insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert_eq!(
            send(&h.app(), request).await.status,
            StatusCode::FORBIDDEN,
            "{path}"
        );
    }
    // The refused attempts did not use up the one-time link; our own page's post works.
    for (path, body) in &sign_ins {
        let mut request = form(path, body.clone());
        let headers = request.headers_mut();
        headers.insert(header::HOST, "127.0.0.1:18790".parse().unwrap());
        headers.insert(header::ORIGIN, "http://127.0.0.1:18790".parse().unwrap());
        let response = send(&h.app(), request).await;
        assert_eq!(response.status, StatusCode::SEE_OTHER, "{path}");
    }
}

fn metric_lines(page: &str) -> Vec<&str> {
    page.lines().filter(|l| !l.starts_with('#')).collect()
}

#[tokio::test]
async fn odd_methods_and_paths_do_not_grow_the_metrics_page() {
    // Regression: every unusual method became a label value (40 requests grew /metrics by
    // ~325 KB, for good, before any rate limit).
    let h = harness_with(WebSettings {
        unauthenticated_burst: 10_000,
        ..test_settings()
    });
    let odd = |i: usize| {
        let method = match i % 4 {
            0 => "FOO".to_string(),
            1 => format!("M{i}"),
            2 => "X".repeat(1000 + i),
            _ => "PROPFIND".to_string(),
        };
        Request::builder()
            .method(method.as_str())
            .uri(format!("/{}", "a".repeat(i % 7)))
            .body(Body::empty())
            .unwrap()
    };
    let random_path = |i: usize| {
        Request::get(format!("/x{i}/{}%22%7D%0A", "z".repeat(i * 13)))
            .body(Body::empty())
            .unwrap()
    };
    let metrics = || Request::get("/metrics").body(Body::empty()).unwrap();
    // One of each kind first: the series they make exist from then on.
    send(&h.app(), odd(0)).await;
    send(&h.app(), odd(1)).await;
    send(&h.app(), random_path(0)).await;
    send(&h.app(), metrics()).await;
    let before = send(&h.app(), metrics()).await.body;
    for i in 2..=41 {
        send(&h.app(), odd(i)).await;
        send(&h.app(), random_path(i)).await;
    }
    let after = send(&h.app(), metrics()).await.body;
    assert_eq!(
        metric_lines(&before).len(),
        metric_lines(&after).len(),
        "no new series:\n{after}"
    );
    // Only counts changed (1 → 41 at most): a few digits, no new text.
    assert!(after.len() <= before.len() + 8, "{before}\n---\n{after}");
    assert!(after.contains("method=\"other\""));
    assert!(after.contains("route=\"unmatched\""));
    for leaked in ["FOO", "PROPFIND", "XXXX", "/x1", "%22"] {
        assert!(!after.contains(leaked), "{leaked} reached /metrics");
    }
}

#[tokio::test]
async fn a_refused_flood_moves_only_the_rate_limited_counter() {
    let h = harness_with(WebSettings {
        unauthenticated_per_minute: 1,
        unauthenticated_burst: 3,
        ..test_settings()
    });
    let metrics = || {
        from(
            ELSEWHERE,
            Request::get("/metrics").body(Body::empty()).unwrap(),
        )
    };
    for _ in 0..3 {
        send(&h.app(), from(HOME_ROUTER, models("mm_bogus"))).await;
    }
    send(&h.app(), metrics()).await;
    let before = send(&h.app(), metrics()).await.body;
    for i in 0..200 {
        let request = Request::builder()
            .method(format!("M{i}").as_str())
            .uri(format!("/flood/{i}"))
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            send(&h.app(), from(HOME_ROUTER, request)).await.status,
            StatusCode::TOO_MANY_REQUESTS
        );
    }
    let after = send(&h.app(), metrics()).await.body;
    assert!(
        !after.contains("route=\"unmatched\""),
        "refused requests are not counted as requests:\n{after}"
    );
    assert!(after.contains("moltmate_web_rate_limited_total{bucket=\"ip\"} 200"));
    assert_eq!(metric_lines(&before).len() + 1, metric_lines(&after).len());
}

/// Asks for a tool named like an exposition-format injection, then answers.
struct ForgingModel;

const FORGED: &str = "x\"} 1\nmoltmate_forged{a=\"";

#[async_trait]
impl ModelCaller for ForgingModel {
    async fn call(
        &self,
        _system: &str,
        items: &[ConversationItem],
        _stored: Option<moltmate_core::model::StoredItems<'_>>,
        _tools: &[ToolSpec],
        _deltas: &dyn DeltaSink,
    ) -> Result<ModelAnswer, ModelFailure> {
        let after_tool = matches!(items.last(), Some(ConversationItem::ToolResult { .. }));
        let usage = TokenUsage {
            input_tokens: 1,
            output_tokens: 1,
        };
        let tool_calls = if after_tool {
            vec![]
        } else {
            vec![ToolCall {
                id: "call_1".to_string(),
                name: FORGED.to_string(),
                arguments: serde_json::json!({}),
            }]
        };
        Ok(ModelAnswer {
            response: ModelResponse {
                text: if after_tool {
                    "done".into()
                } else {
                    String::new()
                },
                tool_calls,
                usage,
                stop_reason: StopReason::EndTurn,
            },
            provider: "test".to_string(),
            model: "forger".to_string(),
            usage: vec![("test".to_string(), "forger".to_string(), usage)],
        })
    }
}

#[tokio::test]
async fn a_model_inventing_a_tool_name_cannot_forge_metric_series() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = Shutdown::new();
    let gateway = Gateway::new(GatewayParts {
        store: Store::open_in_memory().unwrap(),
        homes: Homes::new(dir.path()),
        settings: GatewaySettings::default(),
        model: Arc::new(ForgingModel),
        tools: ToolBox::default(),
        channels: vec![],
        downloads: None,
        sandbox: None,
        disk_caps: None,
        shutdown: shutdown.clone(),
    });
    let state = WebState::new(gateway.clone(), test_settings(), shutdown).unwrap();
    let app = moltmate_web::app(state);
    let anna = moltmate_core::UserId::new("anna").unwrap();
    let token = gateway
        .store()
        .issue_token(&anna, Some("test"))
        .await
        .unwrap();
    gateway.store().set_onboarded(&anna, true).await.unwrap();
    let metrics = || Request::get("/metrics").body(Body::empty()).unwrap();
    let chat = || {
        completion_request(
            &token,
            serde_json::json!({"messages": [{"role": "user", "content": "go"}]}),
        )
    };
    let answer = send(&app, chat()).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    send(&app, metrics()).await;
    let first = send(&app, metrics()).await.body;
    for _ in 0..5 {
        send(&app, chat()).await;
    }
    let page = send(&app, metrics()).await.body;
    assert!(!page.contains("moltmate_forged"), "{page}");
    assert!(
        page.contains("moltmate_tool_calls_total{tool=\"unknown\",outcome=\"refused\"} 6"),
        "{page}"
    );
    assert_eq!(metric_lines(&first).len(), metric_lines(&page).len());
    for line in metric_lines(&page) {
        assert_eq!(line.matches('"').count() % 2, 0, "{line}");
    }
    // The audit keeps what was asked for, bounded, for the operator's eyes.
    let audit = gateway.store().recent_audit(Some(&anna), 50).await.unwrap();
    let call = audit.iter().find(|a| a.kind == "tool_call").unwrap();
    assert_eq!(call.tool.as_deref(), Some("x\"} 1moltmate_forged{a=\""));
}

#[tokio::test]
async fn raw_garbage_methods_over_tcp_leave_no_trace_in_metrics() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = harness();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _server = tokio::spawn(moltmate_web::serve(
        h.state.clone(),
        listener,
        h.shutdown.clone(),
    ));
    let client = reqwest::Client::new();
    let page = || async {
        client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    page().await;
    let before = page().await;
    let long = "Q".repeat(5000);
    for method in [
        "GET\n",
        "G\"ET",
        "x\"} 1\nforged{a=\"",
        long.as_str(),
        "FOO",
    ] {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request =
            format!("{method} /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
    }
    let after = page().await;
    for leaked in ["forged", "QQQ", "FOO", "G\\\"ET"] {
        assert!(!after.contains(leaked), "{leaked} reached /metrics");
    }
    // At most one new series: `FOO /metrics` counted as method="other".
    assert!(metric_lines(&after).len() <= metric_lines(&before).len() + 1);
    h.shutdown.cancel();
}

/// This process's resident set size in bytes (0 where `/proc` cannot be read).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_web_flood_from_the_same_address_does_not_slow_a_signed_in_user() {
    let h = harness();
    let (_, token) = h.user("anna").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let _server = tokio::spawn(moltmate_web::serve(
        h.state.clone(),
        listener,
        h.shutdown.clone(),
    ));
    let client = reqwest::Client::new();
    let chat = |text: String| {
        let client = client.clone();
        let base = base.clone();
        let token = token.clone();
        async move {
            let started = std::time::Instant::now();
            let response = client
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(&token)
                .json(&serde_json::json!({"messages": [{"role": "user", "content": text}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["choices"][0]["message"]["content"], echo_of(&text));
            started.elapsed()
        }
    };
    let mut normal = Duration::ZERO;
    for i in 0..3 {
        normal = normal.max(chat(format!("baseline {i}")).await);
    }
    let bound = normal * 2 + Duration::from_millis(500);
    let rss_before = rss_bytes();

    // Eight attackers on the bystander's own address: bogus tokens, sign-in guesses, odd
    // methods and random paths, as fast as they can.
    let mut attackers = Vec::new();
    for a in 0..8 {
        let client = client.clone();
        let base = base.clone();
        attackers.push(tokio::spawn(async move {
            let mut limited = 0;
            for i in 0..250 {
                let request = match i % 4 {
                    0 => client
                        .get(format!("{base}/v1/models"))
                        .bearer_auth(format!("mm_{a}_{i}")),
                    1 => client
                        .post(format!("{base}/admin/login"))
                        .form(&[("token", format!("guess-{a}-{i}"))]),
                    2 => client.request(
                        reqwest::Method::from_bytes(format!("M{a}X{i}").as_bytes()).unwrap(),
                        format!("{base}/"),
                    ),
                    _ => client.get(format!("{base}/random/{a}/{i}")),
                };
                if request.send().await.unwrap().status() == 429 {
                    limited += 1;
                }
            }
            limited
        }));
    }
    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        let took = chat(format!("during the flood {i}")).await;
        assert!(
            took <= bound,
            "bystander answered in {took:?}, over {bound:?} (normal {normal:?})"
        );
        slowest = slowest.max(took);
    }
    let mut limited = 0;
    for attacker in attackers {
        limited += attacker.await.unwrap();
    }
    // The address's burst, and the sign-ins past it the server takes from all addresses
    // together (each guess is a credential of its own).
    let overflow = moltmate_web::security::SIGN_IN_OVERFLOW_PER_MINUTE;
    assert!(
        limited >= 2000 - 30 - overflow,
        "only the burst and the sign-in overflow got through: {limited}"
    );
    let grown = rss_bytes().saturating_sub(rss_before);
    eprintln!(
        "web flood: 2000 requests, {limited} refused; bystander normal {normal:?}, slowest {slowest:?}; RSS grew by {} KiB",
        grown / 1024
    );
    assert!(grown < 32 * 1024 * 1024, "RSS grew by {grown} bytes");
    // The flood's address is drained; ask from another one.
    let metrics = send(
        &h.app(),
        from(
            ELSEWHERE,
            Request::get("/metrics").body(Body::empty()).unwrap(),
        ),
    )
    .await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(
        metrics
            .body
            .contains("moltmate_web_rate_limited_total{bucket=\"ip\"} "),
        "{}",
        metrics.body
    );
    assert!(
        metrics.body.len() < 16 * 1024,
        "{} bytes of metrics",
        metrics.body.len()
    );
    h.shutdown.cancel();
}

#[tokio::test]
async fn a_sign_in_past_quota_with_a_stalled_body_is_refused() {
    let h = harness_with(WebSettings {
        unauthenticated_per_minute: 1,
        unauthenticated_burst: 1,
        ..test_settings()
    });
    let (_, token) = h.user("anna").await;
    // The address's one sign-in.
    assert_eq!(
        send(
            &h.app(),
            from(HOME_ROUTER, form("/login", "token=mm_x".into()))
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );
    // Past the quota: a body that never ends is given SIGN_IN_FORM_DEADLINE, then 429.
    let (_tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(1);
    let stalled = Request::post("/login")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap();
    // (Real time: SIGN_IN_FORM_DEADLINE is 5 s; the outer bound only keeps a regression from
    // hanging the suite.)
    let stalled = tokio::time::timeout(
        moltmate_web::security::SIGN_IN_FORM_DEADLINE * 6,
        send(&h.app(), from(HOME_ROUTER, stalled)),
    )
    .await
    .expect("a stalled sign-in body held the request open");
    assert_eq!(stalled.status, StatusCode::TOO_MANY_REQUESTS);
    // A body that is not a form is not read at all: 429 at once, even a real token.
    let json = Request::post("/login")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(format!("token={token}")))
        .unwrap();
    assert_eq!(
        send(&h.app(), from(HOME_ROUTER, json)).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // A real form still gets the credential's own tries.
    assert_eq!(
        send(
            &h.app(),
            from(HOME_ROUTER, form("/login", format!("token={token}")))
        )
        .await
        .status,
        StatusCode::SEE_OTHER
    );
}
