//! `web_fetch` against a local axum server (via the loopback-allowing test constructor), and the
//! production policy's refusals of local, private and metadata destinations.

mod common;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use common::Fixture;
use moltmate_core::tool::{Tool, ToolError};
use moltmate_tools::{WebFetchSettings, WebFetchTool};
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;

fn redirect(to: &'static str) -> Response {
    (StatusCode::FOUND, [(header::LOCATION, to)]).into_response()
}

async fn server() -> SocketAddr {
    let app = Router::new()
        .route(
            "/page",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                    "<html><head><title>Family Recipes</title><script>var secret = 1;</script><style>body{}</style></head>\
                     <body><h1>Pancakes</h1><p>Mix <em>flour</em> &amp; eggs.</p><a href=\"/more\">More recipes</a></body></html>",
                )
            }),
        )
        .route("/text", get(|| async { ([(header::CONTENT_TYPE, "text/plain")], "plain words") }))
        .route("/json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], "{\"a\": 1}") }))
        .route("/big", get(|| async { ([(header::CONTENT_TYPE, "text/plain")], "y".repeat(200_000)) }))
        .route("/image", get(|| async { ([(header::CONTENT_TYPE, "image/png")], vec![0x89u8, b'P', b'N', b'G']) }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        )
        .route("/to-text", get(|| async { redirect("/text") }))
        .route("/to-metadata", get(|| async { redirect("http://169.254.169.254/latest/meta-data/") }))
        .route("/to-private", get(|| async { redirect("http://10.0.0.1/admin") }))
        .route("/to-mapped", get(|| async { redirect("http://[::ffff:169.254.169.254]/") }))
        .route("/to-file", get(|| async { redirect("file:///etc/passwd") }))
        .route("/loop", get(|| async { redirect("/loop") }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

fn settings(allowed: Option<&[&str]>) -> WebFetchSettings {
    WebFetchSettings {
        allowed_domains: allowed.map(|d| d.iter().map(|s| s.to_string()).collect()),
        max_bytes: 1000,
        timeout: Duration::from_secs(2),
    }
}

async fn fetch(tool: &WebFetchTool, url: String) -> Result<String, ToolError> {
    let fx = Fixture::new();
    tool.call(&fx.ctx("anna"), json!({ "url": url }))
        .await
        .map(|o| o.content)
}

#[tokio::test]
async fn html_becomes_readable_text() {
    let addr = server().await;
    let tool = WebFetchTool::new_allowing_loopback_for_tests(settings(None)).unwrap();
    let out = fetch(&tool, format!("http://{addr}/page")).await.unwrap();
    assert!(out.contains("Family Recipes"), "{out}");
    assert!(out.contains("# Pancakes"), "{out}");
    assert!(out.contains("Mix flour & eggs."), "{out}");
    assert!(
        out.contains(&format!("More recipes (http://{addr}/more)")),
        "{out}"
    );
    assert!(!out.contains("secret") && !out.contains("body{}"), "{out}");

    assert!(fetch(&tool, format!("http://{addr}/text"))
        .await
        .unwrap()
        .ends_with("plain words"));
    assert!(fetch(&tool, format!("http://{addr}/json"))
        .await
        .unwrap()
        .ends_with("{\"a\": 1}"));
    // A same-host redirect is followed.
    let out = fetch(&tool, format!("http://{addr}/to-text"))
        .await
        .unwrap();
    assert!(
        out.contains(&format!("URL: http://{addr}/text")) && out.ends_with("plain words"),
        "{out}"
    );
}

#[tokio::test]
async fn size_cap_timeout_and_types() {
    let addr = server().await;
    let tool = WebFetchTool::new_allowing_loopback_for_tests(settings(None)).unwrap();
    let out = fetch(&tool, format!("http://{addr}/big")).await.unwrap();
    assert!(out.contains("larger than 1000 bytes"), "{out}");
    let body = out.split_once("\n\n").map(|(_, body)| body).unwrap_or("");
    assert_eq!(body, "y".repeat(1000));

    let started = std::time::Instant::now();
    match fetch(&tool, format!("http://{addr}/slow")).await {
        Err(ToolError::Failed(m)) => {
            assert!(m.contains("2 seconds") || m.contains("timed out"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));

    assert!(matches!(
        fetch(&tool, format!("http://{addr}/image")).await,
        Err(ToolError::Refused(_))
    ));
    assert!(matches!(
        fetch(&tool, format!("http://{addr}/loop")).await,
        Err(ToolError::Failed(_))
    ));
}

#[tokio::test]
async fn non_http_schemes_and_bad_urls() {
    let tool = WebFetchTool::new(settings(None)).unwrap();
    for url in [
        "file:///etc/passwd",
        "ftp://example.org/x",
        "javascript:alert(1)",
        "data:text/plain,hi",
    ] {
        let r = fetch(&tool, url.to_string()).await;
        assert!(matches!(r, Err(ToolError::Refused(_))), "{url}: {r:?}");
    }
    assert!(matches!(
        fetch(&tool, "not a url".into()).await,
        Err(ToolError::InvalidArguments(_))
    ));
    let fx = Fixture::new();
    assert!(matches!(
        tool.call(&fx.ctx("anna"), json!({"url": 5})).await,
        Err(ToolError::InvalidArguments(_))
    ));
}

#[tokio::test]
async fn redirects_to_internal_addresses_are_refused() {
    let addr = server().await;
    // Even the test policy only adds loopback: private and metadata stay forbidden.
    let tool = WebFetchTool::new_allowing_loopback_for_tests(settings(None)).unwrap();
    for path in ["/to-metadata", "/to-private", "/to-mapped", "/to-file"] {
        let r = fetch(&tool, format!("http://{addr}{path}")).await;
        assert!(matches!(r, Err(ToolError::Refused(_))), "{path}: {r:?}");
    }
}

#[tokio::test]
async fn production_policy_refuses_loopback_by_literal_and_by_name() {
    let addr = server().await;
    let tool = WebFetchTool::new(settings(None)).unwrap();
    let port = addr.port();
    for url in [
        format!("http://127.0.0.1:{port}/text"),
        format!("http://localhost:{port}/text"),
        format!("http://[::ffff:127.0.0.1]:{port}/text"),
        format!("http://0x7f000001:{port}/text"),
        format!("http://127.1:{port}/text"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
    ] {
        match fetch(&tool, url.clone()).await {
            Err(ToolError::Refused(m)) => assert!(m.contains("public"), "{url}: {m}"),
            other => panic!("{url}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn allowed_domains_are_enforced_on_every_hop() {
    let addr = server().await;
    let port = addr.port();
    let tool =
        WebFetchTool::new_allowing_loopback_for_tests(settings(Some(&["example.org"]))).unwrap();
    assert!(matches!(
        fetch(&tool, format!("http://127.0.0.1:{port}/text")).await,
        Err(ToolError::Refused(_))
    ));

    let tool =
        WebFetchTool::new_allowing_loopback_for_tests(settings(Some(&["localhost"]))).unwrap();
    let out = fetch(&tool, format!("http://localhost:{port}/text"))
        .await
        .unwrap();
    assert!(out.ends_with("plain words"), "{out}");
    // The redirect stays on localhost: allowed. A redirect elsewhere is refused.
    assert!(fetch(&tool, format!("http://localhost:{port}/to-text"))
        .await
        .is_ok());
    assert!(matches!(
        fetch(&tool, format!("http://localhost:{port}/to-private")).await,
        Err(ToolError::Refused(_))
    ));
}
