//! Fake search services for `web_search`: the Brave Search API and a SearXNG instance, one
//! in-process axum server on `127.0.0.1:0` each, speaking their real wire formats.
//!
//! * **Brave** (`GET /res/v1/web/search?q=…&count=…`, key in `X-Subscription-Token`): results
//!   as `{"type": "search", "web": {"type": "search", "results": [{title, url, description,
//!   …}]}}`; a missing key is a 422 `VALIDATION` error and a wrong one a 422
//!   `SUBSCRIPTION_TOKEN_INVALID` (`{"type": "ErrorResponse", "error": {…}}`), as the service
//!   answers; a query over 400 characters or a `count` outside 1–20 is a 422 `VALIDATION`.
//!   Limits are 429 with `X-RateLimit-Limit/Policy/Remaining/Reset` (one comma-separated entry
//!   per window: per second, per month) and code `RATE_LIMITED` or `QUOTA_LIMITED`.
//! * **SearXNG** (`GET /search?q=…&format=json`): results as `{"query", "number_of_results",
//!   "results": [{url, title, content, engine, …}], "answers", "suggestions", …}`; without
//!   `format` (or `format=html`) it answers its HTML page; with the JSON format not enabled
//!   (see [`FakeSearch::set_json_enabled`]) it answers 403 Forbidden with an HTML body, like an
//!   instance whose `search.formats` lists only `html`; its limiter's 429 is plain text.
//!
//! Beyond that, replies are scripted: queued with [`FakeSearch::push_reply`] (used first, in
//! order), else the results set with [`FakeSearch::set_hits`] (default: three results derived
//! from the query). Every request is recorded ([`FakeSearch::requests`]), authorised or not.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Which service the fake plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Brave,
    Searxng,
}

/// One result, written into the flavor's format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeHit {
    pub title: String,
    pub url: String,
    /// Brave `description`, SearXNG `content`.
    pub snippet: String,
}

impl FakeHit {
    pub fn new(
        title: impl Into<String>,
        url: impl Into<String>,
        snippet: impl Into<String>,
    ) -> Self {
        FakeHit {
            title: title.into(),
            url: url.into(),
            snippet: snippet.into(),
        }
    }
}

/// What the fake answers to one (authorised, valid) request.
#[derive(Debug, Clone, PartialEq)]
pub enum SearchReply {
    /// These results, in the flavor's format.
    Hits(Vec<FakeHit>),
    /// This JSON document, 200 `application/json`.
    Json(Value),
    /// Exactly this: status, content type, extra headers, body.
    Raw {
        status: u16,
        content_type: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// The flavor's rate-limit answer (429). Brave: `RATE_LIMITED` with the per-second window
    /// used up and resetting in `reset_seconds`; SearXNG: its limiter's plain 429. Both send
    /// `Retry-After` when given.
    RateLimited {
        retry_after: Option<u64>,
        reset_seconds: u64,
    },
    /// Brave's monthly quota used up (429 `QUOTA_LIMITED`, the monthly window at 0).
    QuotaExhausted { reset_seconds: u64 },
    /// Wait (without blocking other requests), then answer.
    Delay(Duration, Box<SearchReply>),
    /// A 200 JSON body of `bytes` bytes, sent in 64 KiB chunks.
    Huge { bytes: usize },
    /// 200 and the start of a body, then nothing more while the connection stays open.
    Stall,
    /// A 302 to this location.
    Redirect(String),
}

impl SearchReply {
    pub fn hits(hits: Vec<FakeHit>) -> Self {
        SearchReply::Hits(hits)
    }

    pub fn delayed(delay: Duration, reply: SearchReply) -> Self {
        SearchReply::Delay(delay, Box::new(reply))
    }

    /// A 200 answer whose body is `body` as `content_type`.
    pub fn raw(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        SearchReply::Raw {
            status,
            content_type: content_type.to_string(),
            headers: Vec::new(),
            body: body.into(),
        }
    }
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct SearchRequest {
    pub method: String,
    pub path: String,
    /// The query string exactly as received (still encoded).
    pub raw_query: String,
    /// The decoded query parameters, in order.
    pub params: Vec<(String, String)>,
    /// Header names lowercased, in arrival order.
    pub headers: Vec<(String, String)>,
}

impl SearchRequest {
    /// A decoded query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Everything received, as text (for "never sent" checks).
    pub fn all_text(&self) -> String {
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(n, v)| format!("{n}: {v}"))
            .collect();
        format!(
            "{} {}?{}\n{}",
            self.method,
            self.path,
            self.raw_query,
            headers.join("\n")
        )
    }
}

struct Inner {
    flavor: Flavor,
    /// Brave: the key requests must carry.
    key: Option<String>,
    requests: Mutex<Vec<SearchRequest>>,
    queue: Mutex<VecDeque<SearchReply>>,
    hits: Mutex<Option<Vec<FakeHit>>>,
    json_enabled: AtomicBool,
    count: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running fake search service. Cloning shares it; it stops when the last clone is dropped.
#[derive(Clone)]
pub struct FakeSearch {
    addr: SocketAddr,
    inner: Arc<Inner>,
    _server: Arc<AbortOnDrop>,
}

impl FakeSearch {
    /// A fake Brave Search API accepting only `key`.
    ///
    /// # Panics
    /// If no local port can be bound (a broken test environment).
    pub async fn brave(key: &str) -> FakeSearch {
        Self::start(Flavor::Brave, Some(key.to_string())).await
    }

    /// A fake SearXNG instance with the JSON format enabled.
    ///
    /// # Panics
    /// If no local port can be bound (a broken test environment).
    pub async fn searxng() -> FakeSearch {
        Self::start(Flavor::Searxng, None).await
    }

    async fn start(flavor: Flavor, key: Option<String>) -> FakeSearch {
        let inner = Arc::new(Inner {
            flavor,
            key,
            requests: Mutex::new(Vec::new()),
            queue: Mutex::new(VecDeque::new()),
            hits: Mutex::new(None),
            json_enabled: AtomicBool::new(true),
            count: AtomicU64::new(0),
        });
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let listener = match tokio::net::TcpListener::bind(("127.0.0.1", 0)).await {
            Ok(listener) => listener,
            Err(err) => panic!("fake search server could not bind 127.0.0.1:0: {err}"),
        };
        let addr = match listener.local_addr() {
            Ok(addr) => addr,
            Err(err) => panic!("fake search server has no address: {err}"),
        };
        let server = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::warn!(%err, "fake search server stopped");
            }
        });
        FakeSearch {
            addr,
            inner,
            _server: Arc::new(AbortOnDrop(server)),
        }
    }

    pub fn flavor(&self) -> Flavor {
        self.inner.flavor
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What `tools.web.search.baseUrl` should be: Brave's API root
    /// (`http://127.0.0.1:<port>/res/v1`) or the SearXNG instance root.
    pub fn base_url(&self) -> String {
        match self.inner.flavor {
            Flavor::Brave => format!("http://{}/res/v1", self.addr),
            Flavor::Searxng => format!("http://{}", self.addr),
        }
    }

    /// Queues a reply for the next authorised, valid request.
    pub fn push_reply(&self, reply: SearchReply) {
        lock(&self.inner.queue).push_back(reply);
    }

    /// The results answered when no reply is queued (`None`: three derived from the query).
    pub fn set_hits(&self, hits: Option<Vec<FakeHit>>) {
        *lock(&self.inner.hits) = hits;
    }

    /// SearXNG: whether `format=json` is enabled (`search.formats` lists `json`).
    pub fn set_json_enabled(&self, enabled: bool) {
        self.inner.json_enabled.store(enabled, Ordering::SeqCst);
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<SearchRequest> {
        lock(&self.inner.requests).clone()
    }

    pub fn request_count(&self) -> u64 {
        self.inner.count.load(Ordering::SeqCst)
    }

    pub fn clear_requests(&self) {
        lock(&self.inner.requests).clear();
    }
}

fn record(inner: &Inner, method: &Method, uri: &Uri, headers: &HeaderMap) -> SearchRequest {
    let raw_query = uri.query().unwrap_or("").to_string();
    let request = SearchRequest {
        method: method.to_string(),
        path: uri.path().to_string(),
        params: url::form_urlencoded::parse(raw_query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
        raw_query,
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    lock(&inner.requests).push(request.clone());
    inner.count.fetch_add(1, Ordering::SeqCst);
    request
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let request = record(&inner, &method, &uri, &headers);
    if method != Method::GET {
        return plain(405, "text/plain", "Method Not Allowed");
    }
    let query = request.param("q").unwrap_or("").to_string();
    match inner.flavor {
        Flavor::Brave => {
            if request.path != "/res/v1/web/search" {
                return plain(404, "text/plain", "Not Found");
            }
            match (inner.key.as_deref(), request.header("x-subscription-token")) {
                (_, None) => {
                    return brave_error(
                        422,
                        "VALIDATION",
                        "Unable to validate request parameter(s)",
                    )
                }
                (Some(key), Some(sent)) if key != sent => {
                    return brave_error(
                        422,
                        "SUBSCRIPTION_TOKEN_INVALID",
                        "The provided subscription token is invalid.",
                    )
                }
                _ => {}
            }
            let count_ok = request
                .param("count")
                .is_none_or(|c| c.parse::<u32>().is_ok_and(|n| (1..=20).contains(&n)));
            if query.is_empty() || query.chars().count() > 400 || !count_ok {
                return brave_error(422, "VALIDATION", "Unable to validate request parameter(s)");
            }
        }
        Flavor::Searxng => {
            if request.path != "/search" && request.path != "/" {
                return plain(
                    404,
                    "text/html",
                    "<!doctype html><title>404 Not Found</title>",
                );
            }
            match request.param("format") {
                None | Some("html") => {
                    return plain(
                        200,
                        "text/html; charset=utf-8",
                        "<!DOCTYPE html><html><head><title>SearXNG</title></head><body>results page</body></html>",
                    )
                }
                Some("json") if inner.json_enabled.load(Ordering::SeqCst) => {}
                Some(_) => return forbidden(),
            }
            if query.is_empty() {
                return plain(400, "text/plain", "Bad Request");
            }
        }
    }
    let count = request
        .param("count")
        .and_then(|c| c.parse::<usize>().ok())
        .unwrap_or(20);
    let reply = lock(&inner.queue).pop_front();
    let reply = match reply {
        Some(reply) => reply,
        None => SearchReply::Hits(
            lock(&inner.hits)
                .clone()
                .unwrap_or_else(|| default_hits(&query)),
        ),
    };
    answer(inner.flavor, &query, count, reply).await
}

fn default_hits(query: &str) -> Vec<FakeHit> {
    (1..=3)
        .map(|i| {
            FakeHit::new(
                format!("Result {i} for {query}"),
                format!("https://example.org/{i}"),
                format!("Snippet {i} about {query}."),
            )
        })
        .collect()
}

fn answer(
    flavor: Flavor,
    query: &str,
    count: usize,
    reply: SearchReply,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send + '_>> {
    Box::pin(async move {
        match reply {
            SearchReply::Hits(hits) => {
                json_response(200, results_document(flavor, query, count, &hits))
            }
            SearchReply::Json(value) => json_response(200, value),
            SearchReply::Raw {
                status,
                content_type,
                headers,
                body,
            } => {
                let mut response = plain(status, &content_type, body);
                for (name, value) in headers {
                    if let (Ok(name), Ok(value)) = (
                        axum::http::HeaderName::try_from(name.as_str()),
                        HeaderValue::from_str(&value),
                    ) {
                        response.headers_mut().insert(name, value);
                    }
                }
                response
            }
            SearchReply::RateLimited {
                retry_after,
                reset_seconds,
            } => {
                let mut response = match flavor {
                    Flavor::Brave => {
                        let mut r = brave_error(
                            429,
                            "RATE_LIMITED",
                            "Request rate limit exceeded for plan.",
                        );
                        rate_headers(&mut r, &format!("{reset_seconds}, 1419704"), "0, 1500");
                        r
                    }
                    Flavor::Searxng => plain(429, "text/plain", "Too Many Requests"),
                };
                if let Some(seconds) = retry_after {
                    response
                        .headers_mut()
                        .insert("retry-after", HeaderValue::from(seconds));
                }
                response
            }
            SearchReply::QuotaExhausted { reset_seconds } => {
                let mut r = brave_error(
                    429,
                    "QUOTA_LIMITED",
                    "Request quota limit exceeded for plan.",
                );
                rate_headers(&mut r, &format!("1, {reset_seconds}"), "1, 0");
                r
            }
            SearchReply::Delay(delay, reply) => {
                tokio::time::sleep(delay).await;
                answer(flavor, query, count, *reply).await
            }
            SearchReply::Huge { bytes } => {
                let chunk = Bytes::from(vec![b' '; 64 * 1024]);
                let chunks = bytes.div_ceil(chunk.len());
                let body = stream::once(async {
                    Ok::<Bytes, Infallible>(Bytes::from_static(b"{\"web\":{\"results\":["))
                })
                .chain(stream::iter((0..chunks).map(move |_| Ok(chunk.clone()))))
                .chain(stream::once(async { Ok(Bytes::from_static(b"]}}")) }));
                streamed(200, "application/json", Body::from_stream(body))
            }
            SearchReply::Stall => {
                let body = stream::once(async {
                    Ok::<Bytes, Infallible>(Bytes::from_static(b"{\"web\":"))
                })
                .chain(stream::pending());
                streamed(200, "application/json", Body::from_stream(body))
            }
            SearchReply::Redirect(location) => {
                let mut response = plain(302, "text/plain", "Found");
                if let Ok(value) = HeaderValue::from_str(&location) {
                    response.headers_mut().insert("location", value);
                }
                response
            }
        }
    })
}

/// The flavor's success document for `hits` (at most `count` for Brave, which honours it).
fn results_document(flavor: Flavor, query: &str, count: usize, hits: &[FakeHit]) -> Value {
    match flavor {
        Flavor::Brave => {
            let results: Vec<Value> = hits
                .iter()
                .take(count)
                .map(|h| {
                    json!({
                        "title": h.title,
                        "url": h.url,
                        "is_source_local": false,
                        "is_source_both": false,
                        "description": h.snippet,
                        "profile": {"name": "Example", "url": h.url, "long_name": "example.org"},
                        "language": "en",
                        "family_friendly": true,
                        "type": "search_result",
                        "subtype": "generic",
                        "meta_url": {"scheme": "https", "netloc": "example.org", "hostname": "example.org", "path": "› 1"}
                    })
                })
                .collect();
            json!({
                "type": "search",
                "query": {"original": query, "show_strict_warning": false, "is_navigational": false, "spellcheck_off": true, "more_results_available": true},
                "mixed": {"type": "mixed", "main": [], "top": [], "side": []},
                "web": {"type": "search", "results": results, "family_friendly": true}
            })
        }
        Flavor::Searxng => {
            let results: Vec<Value> = hits
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    json!({
                        "url": h.url,
                        "title": h.title,
                        "content": h.snippet,
                        "engine": "duckduckgo",
                        "parsed_url": ["https", "example.org", "/", "", "", ""],
                        "template": "default.html",
                        "engines": ["duckduckgo", "brave"],
                        "positions": [i + 1],
                        "score": 1.0,
                        "category": "general"
                    })
                })
                .collect();
            json!({
                "query": query,
                "number_of_results": 0,
                "results": results,
                "answers": [],
                "corrections": [],
                "infoboxes": [],
                "suggestions": [],
                "unresponsive_engines": []
            })
        }
    }
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn plain(code: u16, content_type: &str, body: impl Into<Body>) -> Response {
    streamed(code, content_type, body.into())
}

fn streamed(code: u16, content_type: &str, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status(code);
    if let Ok(value) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert("content-type", value);
    }
    response
}

fn json_response(code: u16, value: Value) -> Response {
    plain(code, "application/json", value.to_string())
}

fn brave_error(code: u16, error_code: &str, detail: &str) -> Response {
    json_response(
        code,
        json!({
            "type": "ErrorResponse",
            "error": {
                "id": "5d832250-9396-4f6e-b84a-2a1fe524cd7d",
                "status": code,
                "code": error_code,
                "detail": detail,
                "meta": {"component": if code == 429 { "rate_limiter" } else { "authentication" }}
            },
            "time": 1663072993
        }),
    )
}

fn rate_headers(response: &mut Response, reset: &str, remaining: &str) {
    for (name, value) in [
        ("x-ratelimit-limit", "1, 2000".to_string()),
        ("x-ratelimit-policy", "1;w=1, 2000;w=2592000".to_string()),
        ("x-ratelimit-remaining", remaining.to_string()),
        ("x-ratelimit-reset", reset.to_string()),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
}

fn forbidden() -> Response {
    plain(
        403,
        "text/html; charset=utf-8",
        "<!doctype html>\n<html lang=en>\n<title>403 Forbidden</title>\n<h1>Forbidden</h1>\n<p>You don&#39;t have the permission to access the requested resource. It is either read-protected or not readable by the server.</p>\n",
    )
}
