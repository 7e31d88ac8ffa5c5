//! The web layer of Moltmates: everything a browser or an HTTP client talks to.
//!
//! * `/v1/models`, `/v1/chat/completions` — an OpenAI-compatible API ([`openai`]), authenticated
//!   by a per-user bearer token (`moltmate users token <user>`). The token alone decides the
//!   user; nothing in the request body (not `user`, not `model`) can name another one.
//! * `/` — the web chat ([`chat`]): sign in with a one-time login link or a pasted token, read
//!   the current session, send messages and watch the answer stream in.
//! * `/files/{id}` — a file `send_file` put up for download ([`files`]), for its owner only
//!   (session cookie or bearer token); anyone else gets 404.
//! * `/admin` — the operator's dashboard ([`admin`]): users, usage, pairing requests (approve
//!   or deny), sandboxes, audit events, health.
//! * `/healthz`, `/metrics` — liveness JSON and Prometheus text ([`health`]).
//!
//! Every request passes the same outer layers ([`security`]): rate limits per signed-in user
//! and, for everything without a verified credential, per client IP; a body size limit;
//! security headers (CSP `default-src 'self'`, no framing, no sniffing, no referrer to other
//! sites) and, inside the rate limit, a request counter labelled by route template. Browser state changes need a
//! session cookie (HttpOnly, SameSite=Strict), a CSRF token bound to that session and a
//! same-origin `Origin`/`Sec-Fetch-Site`.
//!
//! Secrets (tokens, session cookies, login codes, the operator token) are never logged,
//! rendered or put in an error message; route metrics use the route template, so a login code
//! in a path never reaches a label either.

pub mod admin;
mod charts;
pub mod chat;
mod conn;
pub mod error;
pub mod files;
pub mod health;
mod html;
pub mod markdown;
pub mod openai;
pub mod security;
pub mod session;
pub mod state;
mod turn;
pub mod webhook;

pub use error::{InvalidSettings, WebError};
pub use state::{WebSettings, WebState};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use moltmate_core::Shutdown;
use std::net::SocketAddr;
use tower_http::timeout::RequestBodyTimeoutLayer;

/// Every route template of [`app`]: the only values the request counter's `route` label
/// takes (a unit test keeps this list and the routes in step).
pub const ROUTES: [&str; 18] = [
    "/",
    "/login",
    "/login/{code}",
    "/logout",
    "/api/history",
    "/api/chat",
    "/assets/{name}",
    "/files/{id}",
    "/admin",
    "/admin/login",
    "/admin/logout",
    "/admin/pairing",
    "/admin/users",
    "/v1/models",
    "/v1/chat/completions",
    "/healthz",
    "/metrics",
    "/webhooks/{channel}",
];

/// Largest request body accepted anywhere. OpenAI clients resend the whole conversation with
/// every request, so this is generous; the gateway itself cuts a message at 16,000 characters.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The whole web application, without a network: tests drive it with `tower::ServiceExt`.
///
/// Client IPs for rate limiting come from axum's `ConnectInfo<SocketAddr>`, which [`serve`]
/// provides; when it is missing (in-process tests) all requests share one IP bucket.
/// `X-Forwarded-For` counts only from [`WebSettings::trusted_proxies`]: trusting it from
/// anyone would let every client pick their own bucket.
pub fn app(state: WebState) -> Router {
    let body_timeout = state.settings().body_timeout;
    let webhook_body_timeout = state.settings().webhook_body_timeout;
    Router::new()
        .route("/", get(chat::index))
        .route("/login", post(chat::login_with_token))
        .route(
            "/login/{code}",
            get(chat::login_link_page).post(chat::redeem_login_link),
        )
        .route("/logout", post(chat::logout))
        .route("/api/history", get(chat::history))
        .route("/api/chat", post(chat::send))
        .route("/assets/{name}", get(chat::asset))
        .route("/files/{id}", get(files::download))
        .route("/admin", get(admin::dashboard))
        .route("/admin/login", post(admin::login))
        .route("/admin/logout", post(admin::logout))
        .route("/admin/pairing", post(admin::decide_pairing))
        .route("/admin/users", post(admin::user_action))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/healthz", get(health::healthz))
        .route("/metrics", get(health::metrics))
        .route(
            "/webhooks/{channel}",
            get(webhook::handle)
                .post(webhook::handle)
                .layer::<_, std::convert::Infallible>(DefaultBodyLimit::max(
                    webhook::MAX_WEBHOOK_BODY,
                ))
                .layer::<_, std::convert::Infallible>(axum::middleware::from_fn(
                    move |request, next| {
                        read_body_within(
                            webhook_body_timeout,
                            webhook::MAX_WEBHOOK_BODY,
                            request,
                            next,
                        )
                    },
                )),
        )
        .fallback(security::not_found)
        // Counted inside the rate limit: a refused request only moves `rate_limited`.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            security::count_requests,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            security::rate_limit,
        ))
        .layer(axum::middleware::from_fn(security::security_headers))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(RequestBodyTimeoutLayer::new(body_timeout))
        .with_state(state)
}

/// Reads the whole request body within `deadline` (a total, unlike `tower_http`'s body
/// timeout, which restarts with every chunk and so lets a byte a second through): slower gets
/// 408, more than `limit` bytes 413.
async fn read_body_within(
    deadline: std::time::Duration,
    limit: usize,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Err(_) => (
            axum::http::StatusCode::REQUEST_TIMEOUT,
            "the request body was not sent in time",
        )
            .into_response(),
        Ok(Err(_)) => (
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "the request body is too large",
        )
            .into_response(),
        Ok(Ok(bytes)) => {
            next.run(axum::extract::Request::from_parts(
                parts,
                axum::body::Body::from(bytes),
            ))
            .await
        }
    }
}

/// Serves [`app`] on `listener` until `shutdown` fires, then stops accepting connections and
/// waits for in-flight requests; open answer streams end at shutdown, so this returns promptly.
///
/// Hand-written instead of `axum::serve`, which sets no timer on hyper's connections (so
/// hyper's header read timeout never fires) and has no connection cap: every connection gets
/// [`WebSettings::header_read_timeout`] and at most [`WebSettings::max_connections`] are open
/// at once (the next waits in the kernel's accept queue). HTTP/1.1 only, as before.
pub async fn serve(
    state: WebState,
    listener: tokio::net::TcpListener,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let header_read_timeout = state.settings().header_read_timeout;
    let max_connections = state.settings().max_connections.max(1);
    let per_address = conn::PerAddress::new(
        conn::PerAddress::share_of(max_connections),
        state.settings().trusted_proxies.clone(),
    );
    let router = app(state);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(max_connections));
    let draining = tokio_util::sync::CancellationToken::new();
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = std::sync::Arc::clone(&slots).acquire_owned() => slot,
        };
        let Ok(slot) = slot else { break };
        let (stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "web: accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // One address holds at most its share of the cap (see `conn`): the connection over
        // it is closed at once, its slot given back.
        let Some(address_slot) = per_address.admit(remote.ip()) else {
            drop(stream);
            drop(slot);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = tower::ServiceExt::map_request(
            router.clone(),
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(remote));
                request.map(axum::body::Body::new)
            },
        );
        let draining = draining.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            let connection = builder.serve_connection(
                hyper_util::rt::TokioIo::new(conn::StallGuard::new(stream, conn::WRITE_STALL)),
                hyper_util::service::TowerToHyperService::new(service),
            );
            // No route upgrades a connection (no websockets here); an upgraded one would live
            // on outside the connection cap.
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = draining.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(address_slot);
            drop(slot);
        });
    }
    drop(listener);
    draining.cancel();
    // Every open connection holds a slot: all slots back means all connections ended.
    let _ = slots.acquire_many(max_connections as u32).await;
    Ok(())
}

/// The sign-in URL for a login code: `<base_url>/login/<code>` (`base_url` like
/// `http://127.0.0.1:8080`, with or without a trailing slash).
pub fn login_url(base_url: &str, code: &str) -> String {
    format!("{}/login/{code}", base_url.trim_end_matches('/'))
}

/// Creates a one-time login link for `user`, valid for `ttl` (use
/// [`WebSettings::login_link_ttl`]), and returns its URL. For `moltmate users login-link`.
pub async fn issue_login_url(
    store: &moltmate_store::Store,
    user: &moltmate_core::UserId,
    base_url: &str,
    ttl: std::time::Duration,
) -> Result<String, moltmate_store::StoreError> {
    let code = store.create_login_link(user, ttl).await?;
    Ok(login_url(base_url, &code))
}

/// The bind rule: the web layer may listen on a non-loopback address only when the gateway
/// has an auth token configured (`gateway.auth.token`), so a fresh install is never reachable
/// from the network by accident.
pub fn check_bind(addr: &SocketAddr, has_auth_token: bool) -> Result<(), String> {
    if addr.ip().is_loopback() || has_auth_token {
        Ok(())
    } else {
        Err(format!(
            "refusing to listen on {addr}: it is reachable from other machines and gateway.auth.token is not set. \
             Set gateway.auth.token, or bind to 127.0.0.1 and put a reverse proxy in front"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_binds_are_always_allowed() {
        for addr in ["127.0.0.1:8080", "[::1]:8080", "127.0.0.2:1"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert!(check_bind(&addr, false).is_ok(), "{addr}");
            assert!(check_bind(&addr, true).is_ok(), "{addr}");
        }
    }

    #[tokio::test]
    async fn login_urls_point_at_the_redeeming_route() {
        assert_eq!(
            login_url("http://127.0.0.1:8080/", "abc"),
            "http://127.0.0.1:8080/login/abc"
        );
        let store = moltmate_store::Store::open_in_memory().unwrap();
        let anna = moltmate_core::UserId::new("anna").unwrap();
        let url = issue_login_url(
            &store,
            &anna,
            "http://h:1",
            std::time::Duration::from_secs(60),
        )
        .await
        .unwrap();
        let code = url.strip_prefix("http://h:1/login/").unwrap();
        assert_eq!(store.redeem_login_link(code).await.unwrap(), Some(anna));
    }

    #[test]
    fn every_route_of_the_app_is_a_known_route_label() {
        let source = include_str!("lib.rs");
        let app = &source[source.find("pub fn app(").unwrap()..];
        let app = &app[..app.find("\n}\n").unwrap()];
        let registered: Vec<&str> = app
            .split(".route(")
            .skip(1)
            .map(|rest| rest.split('"').nth(1).unwrap())
            .collect();
        assert_eq!(registered.len(), ROUTES.len(), "{registered:?}");
        for route in registered {
            assert!(ROUTES.contains(&route), "{route} is missing from ROUTES");
        }
    }

    #[test]
    fn public_binds_need_an_auth_token() {
        for addr in ["0.0.0.0:8080", "[::]:8080", "192.168.1.10:80"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let refused = check_bind(&addr, false).unwrap_err();
            assert!(refused.contains("gateway.auth.token"), "{refused}");
            assert!(check_bind(&addr, true).is_ok(), "{addr}");
        }
    }
}
