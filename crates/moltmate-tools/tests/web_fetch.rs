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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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

/// Test servers listen on random ports: each test allows the ones it uses explicitly (the
/// default, 80 and 443 only, is tested on its own).
fn settings(allowed: Option<&[&str]>, ports: &[u16]) -> WebFetchSettings {
    WebFetchSettings {
        allowed_domains: allowed.map(|d| d.iter().map(|s| s.to_string()).collect()),
        allowed_ports: ports.to_vec(),
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
    let tool =
        WebFetchTool::new_allowing_loopback_for_tests(settings(None, &[addr.port()])).unwrap();
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
    let tool =
        WebFetchTool::new_allowing_loopback_for_tests(settings(None, &[addr.port()])).unwrap();
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
    let tool = WebFetchTool::new(settings(None, &[80, 443])).unwrap();
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
    // Even the test policy only adds loopback: private and metadata stay forbidden. Port 80 is
    // allowed so that the address, not the port, is what refuses the redirect targets.
    let tool =
        WebFetchTool::new_allowing_loopback_for_tests(settings(None, &[addr.port(), 80])).unwrap();
    for path in ["/to-metadata", "/to-private", "/to-mapped", "/to-file"] {
        let r = fetch(&tool, format!("http://{addr}{path}")).await;
        assert!(matches!(r, Err(ToolError::Refused(_))), "{path}: {r:?}");
    }
}

#[tokio::test]
async fn production_policy_refuses_loopback_by_literal_and_by_name() {
    let addr = server().await;
    let port = addr.port();
    // The server's port is allowed, so that the address is what refuses.
    let tool = WebFetchTool::new(settings(None, &[port, 80])).unwrap();
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
        WebFetchTool::new_allowing_loopback_for_tests(settings(Some(&["example.org"]), &[port]))
            .unwrap();
    assert!(matches!(
        fetch(&tool, format!("http://127.0.0.1:{port}/text")).await,
        Err(ToolError::Refused(_))
    ));

    let tool =
        WebFetchTool::new_allowing_loopback_for_tests(settings(Some(&["localhost"]), &[port, 80]))
            .unwrap();
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

/// A server on `bind` that counts requests and answers `/text`, and `/away` with a redirect to
/// `target`.
async fn counting_server(bind: &str, target: Option<String>) -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = Router::new()
        .route(
            "/text",
            get(|| async { ([(header::CONTENT_TYPE, "text/plain")], "plain words") }),
        )
        .route(
            "/away",
            get(move || {
                let target = target.clone().unwrap_or_default();
                async move { (StatusCode::FOUND, [(header::LOCATION, target)]).into_response() }
            }),
        )
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                counter.fetch_add(1, Ordering::SeqCst);
                next.run(request)
            },
        ));
    let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, hits)
}

#[tokio::test]
async fn a_port_outside_allowed_ports_is_refused() {
    let (addr, hits) = counting_server("127.0.0.1:0", None).await;
    let port = addr.port();
    // The defaults: 80 and 443 only.
    let tool = WebFetchTool::new_allowing_loopback_for_tests(settings(None, &[80, 443])).unwrap();
    for url in [
        format!("http://127.0.0.1:{port}/text"),
        format!("https://127.0.0.1:{port}/text"),
        format!("http://localhost:{port}/text"),
        "http://127.0.0.1:22/".to_string(),
        "https://127.0.0.1:80/".to_string().replace(":80", ":8443"),
    ] {
        match fetch(&tool, url.clone()).await {
            Err(ToolError::Refused(m)) => {
                assert!(
                    m.contains("is not allowed") && m.contains("ports 80, 443"),
                    "{url}: {m}"
                )
            }
            other => panic!("{url}: {other:?}"),
        }
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing reached the server");
    // Explicitly allowed, the same port works.
    let tool = WebFetchTool::new_allowing_loopback_for_tests(settings(None, &[port])).unwrap();
    let out = fetch(&tool, format!("http://127.0.0.1:{port}/text"))
        .await
        .unwrap();
    assert!(out.ends_with("plain words"), "{out}");
    // An empty list allows nothing and is refused when the tool is built.
    assert!(WebFetchTool::new(settings(None, &[])).is_err());
    assert!(WebFetchTool::new(settings(None, &[0])).is_err());
}

#[tokio::test]
async fn a_redirect_to_a_refused_port_is_refused() {
    let (inner, inner_hits) = counting_server("127.0.0.1:0", None).await;
    let (outer, outer_hits) = counting_server(
        "127.0.0.1:0",
        Some(format!("http://127.0.0.1:{}/text", inner.port())),
    )
    .await;
    let tool =
        WebFetchTool::new_allowing_loopback_for_tests(settings(None, &[outer.port()])).unwrap();
    match fetch(&tool, format!("http://127.0.0.1:{}/away", outer.port())).await {
        Err(ToolError::Refused(m)) => {
            assert!(
                m.contains(&format!("port {} is not allowed", inner.port())),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(outer_hits.load(Ordering::SeqCst), 1);
    assert_eq!(
        inner_hits.load(Ordering::SeqCst),
        0,
        "the redirect was not followed"
    );
}

/// An address of one of this machine's own (non-loopback) interfaces is refused, by literal
/// and after a redirect, even by the test constructor that allows loopback and with the
/// server's port allowed.
#[tokio::test]
async fn an_address_of_an_own_interface_is_refused() {
    let own = moltmate_sandbox::proxy::OwnAddresses::list_blocking().unwrap();
    if own.addresses().is_empty() {
        println!("SKIP: this machine has no non-loopback interface address to aim at");
        return;
    }
    let (any4, hits4) = counting_server("0.0.0.0:0", None).await;
    let mut checked = 0;
    for ip in own.addresses() {
        let (port, host) = match ip {
            std::net::IpAddr::V4(v4) => (any4.port(), v4.to_string()),
            // IPv6 servers listen separately; skip if this host cannot bind one.
            std::net::IpAddr::V6(v6) => {
                let Ok(listener) = std::net::TcpListener::bind("[::]:0") else {
                    continue;
                };
                let port = listener.local_addr().unwrap().port();
                drop(listener);
                (port, format!("[{v6}]"))
            }
        };
        let (loopback, _) =
            counting_server("127.0.0.1:0", Some(format!("http://{host}:{port}/text"))).await;
        let tool =
            WebFetchTool::new_allowing_loopback_for_tests(settings(None, &[port, loopback.port()]))
                .unwrap();
        for url in [
            format!("http://{host}:{port}/text"),
            format!("http://127.0.0.1:{}/away", loopback.port()),
        ] {
            match fetch(&tool, url.clone()).await {
                Err(ToolError::Refused(m)) => {
                    assert!(m.contains("an address of this server itself"), "{url}: {m}")
                }
                other => panic!("{url}: {other:?}"),
            }
        }
        let production = WebFetchTool::new(settings(None, &[port])).unwrap();
        assert!(matches!(
            fetch(&production, format!("http://{host}:{port}/text")).await,
            Err(ToolError::Refused(_))
        ));
        checked += 1;
    }
    assert!(checked > 0);
    assert_eq!(
        hits4.load(Ordering::SeqCst),
        0,
        "nothing reached the server"
    );
}
