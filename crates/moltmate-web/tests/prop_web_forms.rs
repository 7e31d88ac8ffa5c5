//! Property tests of the web layer's parsers of outside input, through `app(state)` with
//! tower's `oneshot` (no network): the token login form, login-link redemption, the admin
//! login, the CSRF fields of the state-changing forms, the chat body, `Cookie` and
//! `Authorization` headers, `Origin`/`Sec-Fetch-Site`, content types and body sizes.
//!
//! Whatever bytes arrive, the answer is a 4xx (a 2xx/3xx only where the request carried a
//! real credential), never a 5xx or a panic, and no submitted secret is reflected in the page.

mod common;

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Method, Request};
use common::*;
use moltmate_testkit::prop::config as prop_config;
use proptest::prelude::*;
use std::sync::OnceLock;

/// Marks every random credential, so a reflected one can be found in a response.
const MARK: &str = "zqxsecret";

/// A real gateway with a user, her API token and browser session, and an operator session;
/// plus a second user whose API token the API property uses (so what it submits never shows up
/// in the first user's history, where the forms property looks for reflected secrets).
struct World {
    runtime: tokio::runtime::Runtime,
    harness: Harness,
    token: String,
    user: BrowserSession,
    admin: BrowserSession,
    api_token: String,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (harness, token, user, admin, api_token) = runtime.block_on(async {
            // Rate limits high enough that every case reaches the handler under test.
            let harness = harness_with(moltmate_web::WebSettings {
                rate_limit_per_minute: 1_000_000,
                rate_limit_burst: 1_000_000,
                ..test_settings()
            });
            let (anna, token) = harness.user("anna").await;
            let user = harness.browser_session(&anna).await;
            let admin = harness.admin_session().await;
            let (_, api_token) = harness.user("bob").await;
            (harness, token, user, admin, api_token)
        });
        World {
            runtime,
            harness,
            token,
            user,
            admin,
            api_token,
        }
    })
}

/// A random credential-looking value, marked so it can be found again.
fn secret() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9+/=_-]{0,40}".prop_map(|s| format!("{MARK}{s}"))
}

/// Header bytes as a client could send them (any visible ASCII, tabs, obs-text bytes).
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..60),
        "[ -~]{0,60}".prop_map(String::into_bytes),
    ]
    .prop_filter("not a header value", |b| HeaderValue::from_bytes(b).is_ok())
}

/// Which real credentials a request may carry.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Real {
    None,
    UserCookie,
    AdminCookie,
    UserCookieAndCsrf,
    AdminCookieAndCsrf,
    Token,
}

fn real() -> impl Strategy<Value = Real> {
    prop::sample::select(vec![
        Real::None,
        Real::None,
        Real::UserCookie,
        Real::AdminCookie,
        Real::UserCookieAndCsrf,
        Real::AdminCookieAndCsrf,
        Real::Token,
    ])
}

#[derive(Debug, Clone)]
struct Req {
    method: Method,
    path: String,
    headers: Vec<(HeaderName, Vec<u8>)>,
    body: Vec<u8>,
    real: Real,
}

fn cookie_header(real: Real) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        secret().prop_map(|s| format!("mm_session={s}").into_bytes()),
        secret().prop_map(|s| format!("mm_admin={s}; mm_session={s}").into_bytes()),
        Just(b"mm_session=; mm_admin=".to_vec()),
        Just(b"mm_session".to_vec()),
        Just(b";;;=;=".to_vec()),
        header_bytes(),
    ]
    .prop_map(move |random| {
        let w = world();
        match real {
            Real::UserCookie | Real::UserCookieAndCsrf => {
                [w.user.cookie.as_bytes(), b"; ", &random].concat()
            }
            Real::AdminCookie | Real::AdminCookieAndCsrf => {
                [&random[..], b"; ", w.admin.cookie.as_bytes()].concat()
            }
            Real::None | Real::Token => random,
        }
    })
}

fn form_body(real: Real) -> impl Strategy<Value = Vec<u8>> {
    let field = prop::sample::select(vec![
        "token", "csrf", "channel", "code", "decision", "message", "x", "",
    ]);
    let value = prop_oneof![
        secret(),
        prop::sample::select(vec![
            "telegram", "approve", "deny", "", "%", "%zz", "%00", "+", "&", "="
        ])
        .prop_map(String::from),
        any::<String>(),
    ];
    (prop::collection::vec((field, value), 0..5), any::<bool>()).prop_map(move |(pairs, encode)| {
        let w = world();
        let mut pairs: Vec<(String, String)> =
            pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        match real {
            Real::UserCookieAndCsrf => pairs.push(("csrf".into(), w.user.csrf.clone())),
            Real::AdminCookieAndCsrf => pairs.push(("csrf".into(), w.admin.csrf.clone())),
            _ => {}
        }
        let enc = |s: &str| {
            if encode {
                s.bytes()
                    .map(|b| {
                        if b.is_ascii_alphanumeric() {
                            (b as char).to_string()
                        } else {
                            format!("%{b:02X}")
                        }
                    })
                    .collect()
            } else {
                s.to_string()
            }
        };
        pairs
            .iter()
            .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
            .collect::<Vec<_>>()
            .join("&")
            .into_bytes()
    })
}

fn body(real: Real) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => form_body(real),
        2 => prop::collection::vec(any::<u8>(), 0..300),
        1 => secret().prop_map(|s| format!("{{\"message\": {:?}, \"token\": {s:?}}}", "")).prop_map(String::into_bytes),
        1 => Just(b"{\"message\": 5}".to_vec()),
        1 => Just(b"{\"messages\": []}".to_vec()),
        1 => Just(vec![b'a'; moltmate_web::MAX_BODY_BYTES + 1]),
        1 => Just(Vec::new()),
    ]
}

/// A path under test: the sign-in and state-changing routes, with random login codes.
fn path() -> impl Strategy<Value = String> {
    let code = prop_oneof![
        "[0-9a-f]{64}",
        "[0-9a-fA-F]{0,130}",
        prop::collection::vec(any::<u8>(), 0..40)
            .prop_map(|b| b.iter().map(|x| format!("%{x:02X}")).collect()),
        "[a-zA-Z0-9._~-]{1,20}",
        Just("..%2F..%2Fadmin".to_string()),
    ];
    prop_oneof![
        3 => prop::sample::select(vec![
            "/login", "/logout", "/admin/login", "/admin/logout", "/admin/pairing", "/admin/users", "/api/chat",
            "/api/history", "/", "/admin", "/v1/models", "/v1/chat/completions",
        ])
        .prop_map(String::from),
        2 => code.prop_map(|c| format!("/login/{c}")),
    ]
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        6 => Just(Method::POST),
        3 => Just(Method::GET),
        1 => prop::sample::select(vec![Method::PUT, Method::DELETE, Method::PATCH, Method::HEAD, Method::OPTIONS]),
    ]
}

fn request() -> impl Strategy<Value = Req> {
    real().prop_flat_map(|real| {
        let content_type = prop_oneof![
            Just(b"application/x-www-form-urlencoded".to_vec()),
            Just(b"application/x-www-form-urlencoded; charset=utf-8".to_vec()),
            Just(b"application/json".to_vec()),
            Just(b"multipart/form-data; boundary=x".to_vec()),
            Just(b"text/plain".to_vec()),
            header_bytes(),
        ];
        let origin = prop_oneof![
            Just(b"null".to_vec()),
            Just(b"http://localhost".to_vec()),
            Just(b"https://evil.example".to_vec()),
            header_bytes(),
        ];
        let site = prop::sample::select(vec![
            "same-origin",
            "none",
            "cross-site",
            "same-site",
            "SAME-ORIGIN",
            "",
        ]);
        let authorization = prop_oneof![
            secret().prop_map(|s| format!("Bearer {s}").into_bytes()),
            secret().prop_map(|s| format!("bearer    {s}   ").into_bytes()),
            Just(b"Bearer".to_vec()),
            Just(b"Bearer ".to_vec()),
            secret().prop_map(|s| format!("Basic {s}").into_bytes()),
            header_bytes(),
        ];
        (
            method(),
            path(),
            prop::option::of(content_type),
            prop::option::of(cookie_header(real)),
            prop::option::of(origin),
            prop::option::of(site),
            prop::option::of(authorization),
            prop::option::of(prop_oneof![
                secret().prop_map(String::into_bytes),
                header_bytes()
            ]),
            body(real),
        )
            .prop_map(
                move |(method, path, ct, cookie, origin, site, auth, csrf, body)| {
                    let w = world();
                    let mut headers = Vec::new();
                    let mut push = |name: &str, value: Vec<u8>| {
                        headers.push((HeaderName::from_bytes(name.as_bytes()).unwrap(), value));
                    };
                    if let Some(v) = ct {
                        push("content-type", v);
                    }
                    match (real, cookie) {
                        (Real::UserCookie | Real::UserCookieAndCsrf, None) => {
                            push("cookie", w.user.cookie.clone().into_bytes())
                        }
                        (Real::AdminCookie | Real::AdminCookieAndCsrf, None) => {
                            push("cookie", w.admin.cookie.clone().into_bytes())
                        }
                        (_, Some(v)) => push("cookie", v),
                        (_, None) => {}
                    }
                    if let Some(v) = origin {
                        push("origin", v);
                    }
                    if let Some(v) = site {
                        push("sec-fetch-site", v.as_bytes().to_vec());
                    }
                    match (real, auth) {
                        (Real::Token, _) => {
                            push("authorization", format!("Bearer {}", w.token).into_bytes())
                        }
                        (_, Some(v)) => push("authorization", v),
                        (_, None) => {}
                    }
                    match (real, csrf) {
                        (Real::UserCookieAndCsrf, _) => {
                            push("x-csrf-token", w.user.csrf.clone().into_bytes())
                        }
                        (_, Some(v)) => push("x-csrf-token", v),
                        (_, None) => {}
                    }
                    Req {
                        method,
                        path,
                        headers,
                        body,
                        real,
                    }
                },
            )
    })
}

/// Requests that may succeed: those carrying a real credential, and pages anyone may GET.
fn may_succeed(req: &Req) -> bool {
    let reading = req.method == Method::GET || req.method == Method::HEAD;
    let public_page =
        reading && (req.path == "/" || req.path == "/admin" || req.path.starts_with("/login/"));
    public_page || req.real != Real::None
}

proptest! {
    #![proptest_config(prop_config(160))]

    /// Any request to the sign-in and state-changing routes: 4xx unless it carries a real
    /// credential, never 5xx, never a reflected secret.
    #[test]
    fn prop_web_forms_and_headers_never_give_5xx(req in request()) {
        let w = world();
        // A signed-in user's logout would end the session the other cases use.
        prop_assume!(!(req.path.ends_with("/logout") && matches!(req.real, Real::UserCookieAndCsrf | Real::AdminCookieAndCsrf)));
        let mut builder = Request::builder().method(req.method.clone()).uri(req.path.as_str());
        for (name, value) in &req.headers {
            builder = builder.header(name, HeaderValue::from_bytes(value).unwrap());
        }
        let Ok(request) = builder.body(Body::from(req.body.clone())) else {
            // Not a request a client could send (e.g. an invalid URI): nothing to test.
            return Ok(());
        };
        let response = w.runtime.block_on(send(&w.harness.app(), request));
        let status = response.status;
        prop_assert!(
            !status.is_server_error(),
            "{} for {} {}: {}",
            status,
            req.method,
            req.path,
            response.body.chars().take(300).collect::<String>()
        );
        if !may_succeed(&req) {
            prop_assert!(
                status.is_client_error(),
                "{} for {} {} without a credential",
                status,
                req.method,
                req.path
            );
        }
        prop_assert!(
            !response.body.contains(MARK),
            "a submitted secret was reflected by {} {}",
            req.method,
            req.path
        );
        for value in response.headers.values() {
            prop_assert!(!String::from_utf8_lossy(value.as_bytes()).contains(MARK), "a secret reflected in a header");
        }
    }
}

fn json_leaf() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        "[a-z ]{0,12}".prop_map(serde_json::Value::String),
        secret().prop_map(serde_json::Value::String),
        Just(serde_json::json!("x".repeat(20_000))),
    ]
}

/// Chat completion bodies: mostly the right shape with parts of the wrong type or value.
fn completion_body() -> impl Strategy<Value = Vec<u8>> {
    let content = prop_oneof![
        3 => "[a-z ]{0,20}".prop_map(serde_json::Value::String),
        1 => json_leaf(),
        1 => prop::collection::vec(
            prop_oneof![
                "[a-z ]{0,10}".prop_map(|t| serde_json::json!({"type": "text", "text": t})),
                Just(serde_json::json!({"type": "image_url", "image_url": {"url": "http://x/y.png"}})),
                Just(serde_json::json!({"type": "text"})),
                Just(serde_json::json!({"text": "no type"})),
                json_leaf(),
            ],
            0..3,
        )
        .prop_map(serde_json::Value::Array),
    ];
    let message = (
        prop_oneof![
            3 => prop::sample::select(vec!["user", "assistant", "system", "tool", "User", ""]).prop_map(serde_json::Value::from),
            1 => json_leaf(),
        ],
        prop::option::of(content),
    )
        .prop_map(|(role, content)| {
            let mut m = serde_json::json!({ "role": role });
            if let Some(c) = content {
                m["content"] = c;
            }
            m
        });
    let messages = prop_oneof![
        4 => prop::collection::vec(message, 0..4).prop_map(serde_json::Value::Array),
        1 => json_leaf(),
    ];
    (
        prop::option::of(messages),
        prop::option::of(prop_oneof![
            "[a-z0-9-]{0,20}".prop_map(serde_json::Value::String),
            json_leaf()
        ]),
        prop::option::of(json_leaf()),
        prop::option::of(prop_oneof![
            Just(serde_json::json!({"include_usage": true})),
            json_leaf()
        ]),
        prop::option::of(json_leaf()),
    )
        .prop_map(|(messages, model, stream, options, user)| {
            let mut body = serde_json::Map::new();
            for (key, value) in [
                ("messages", messages),
                ("model", model),
                ("stream", stream),
                ("stream_options", options),
                ("user", user),
            ] {
                if let Some(v) = value {
                    body.insert(key.to_string(), v);
                }
            }
            serde_json::Value::Object(body).to_string().into_bytes()
        })
}

proptest! {
    #![proptest_config(prop_config(64))]

    /// The OpenAI-compatible API with a real token and any body: an answer or a bounded
    /// OpenAI-shaped 4xx, never a 5xx.
    #[test]
    fn prop_openai_api_bodies_never_give_5xx(body in prop_oneof![4 => completion_body(), 1 => prop::collection::vec(any::<u8>(), 0..200)]) {
        let w = world();
        let request = Request::post("/v1/chat/completions")
            .header("authorization", format!("Bearer {}", w.api_token))
            .header("content-type", "application/json")
            .body(Body::from(body.clone()))
            .unwrap();
        let response = w.runtime.block_on(send(&w.harness.app(), request));
        let status = response.status;
        prop_assert!(status.is_success() || status.is_client_error(), "{} for {}", status, String::from_utf8_lossy(&body));
        if status.is_client_error() {
            let error = response.json();
            prop_assert!(error.pointer("/error/message").and_then(serde_json::Value::as_str).is_some(), "{}", response.body);
            // The size of the error is pinned by the ignored test below until it is bounded.
        }
    }
}

#[test]
#[ignore = "found by proptest: a 400 quotes the offending JSON value whole (serde's message), so error bodies grow with the request, see report"]
fn openai_bad_request_errors_do_not_echo_the_whole_body() {
    let w = world();
    let long = format!("{MARK}{}", "x".repeat(100_000));
    let body = serde_json::json!({ "messages": [{"role": "user", "content": "hi"}], "stream_options": long });
    let request = Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {}", w.api_token))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = w.runtime.block_on(send(&w.harness.app(), request));
    assert_eq!(response.status, axum::http::StatusCode::BAD_REQUEST);
    assert!(
        response.body.len() <= 4096,
        "a {}-byte error body",
        response.body.len()
    );
}
