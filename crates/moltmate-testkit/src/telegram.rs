//! A fake Telegram Bot API server for tests, in-process on `127.0.0.1:0`.
//!
//! It speaks the real wire format for the methods the gateway uses (`getMe`, `getUpdates`,
//! `sendMessage`, `sendChatAction`), with Telegram's semantics where they matter for
//! correctness: `getUpdates` drops every update whose id is below the `offset` it is given
//! (that is how a client confirms updates), long-polls up to `timeout` seconds and returns early
//! when an update arrives; `sendMessage` refuses texts over 4096 UTF-16 code units; a wrong
//! token gets `401 Unauthorized`. Tests push updates, inspect what the bot sent and what
//! offsets it confirmed, and inject failures.
//!
//! ```ignore
//! let fake = FakeTelegram::start("123:secret").await;
//! fake.push_text(42, "hello");
//! let replies = fake.wait_for_messages(42, 1, Duration::from_secs(5)).await?;
//! ```

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Telegram's message length limit, in UTF-16 code units.
pub const MAX_MESSAGE_UTF16: usize = 4096;

/// The fake's bot user id (what `getMe` reports).
pub const FAKE_BOT_ID: i64 = 4242;

/// A message the bot sent with `sendMessage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentMessage {
    /// `chat_id` as sent (integers rendered in decimal).
    pub chat_id: String,
    /// The text as the user sees it: for `parse_mode: "HTML"`, after entity parsing (tags
    /// removed, entities decoded), as Telegram returns it in the sent `Message`.
    pub text: String,
    /// The raw text as sent, when `parse_mode` was `HTML`.
    pub html: Option<String>,
}

/// A document the bot sent with `sendDocument` (multipart upload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentDocument {
    pub chat_id: String,
    pub file_name: String,
    pub content: Vec<u8>,
    pub caption: Option<String>,
}

/// A `sendChatAction` the bot sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatAction {
    pub chat_id: String,
    pub action: String,
}

/// One `getUpdates` call as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetUpdatesCall {
    pub offset: Option<i64>,
    pub timeout: u64,
    pub allowed_updates: Option<Vec<String>>,
}

/// An incoming text message to push, with optional sender details.
#[derive(Debug, Clone)]
pub struct IncomingText {
    from_id: i64,
    text: String,
    first_name: String,
    last_name: Option<String>,
    language_code: Option<String>,
    group_chat: Option<i64>,
}

impl IncomingText {
    /// A private-chat message from `from_id` (chat id = sender id, as Telegram does for DMs).
    pub fn new(from_id: i64, text: &str) -> Self {
        IncomingText {
            from_id,
            text: text.to_string(),
            first_name: format!("User{from_id}"),
            last_name: None,
            language_code: None,
            group_chat: None,
        }
    }

    pub fn first_name(mut self, name: &str) -> Self {
        self.first_name = name.to_string();
        self
    }

    pub fn last_name(mut self, name: &str) -> Self {
        self.last_name = Some(name.to_string());
        self
    }

    pub fn language_code(mut self, code: &str) -> Self {
        self.language_code = Some(code.to_string());
        self
    }

    /// Send it in a group chat with this (negative) chat id instead of a private chat.
    pub fn in_group(mut self, chat_id: i64) -> Self {
        self.group_chat = Some(chat_id);
        self
    }
}

/// `wait_for_messages` gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "timed out after {timeout:?} waiting for {wanted} message(s) to chat {chat_id}; got {got:?}"
)]
pub struct WaitTimeout {
    pub chat_id: String,
    pub wanted: usize,
    pub timeout: Duration,
    pub got: Vec<String>,
}

/// An injected failure: the next `remaining` calls (of `method`, or of any method) get `body`
/// with HTTP `status` instead of being served.
#[derive(Debug, Clone)]
struct Fault {
    method: Option<String>,
    remaining: usize,
    status: u16,
    body: String,
}

#[derive(Debug, Default)]
struct Inner {
    pending: VecDeque<Value>,
    next_update_id: i64,
    next_message_id: i64,
    sent: Vec<SentMessage>,
    actions: Vec<ChatAction>,
    get_updates_calls: Vec<GetUpdatesCall>,
    faults: Vec<Fault>,
    calls_by_method: Vec<String>,
    /// How many of the next formatted `sendMessage` calls to refuse as unparsable.
    reject_formatting: usize,
    /// Documents the bot sent with `sendDocument`.
    documents: Vec<SentDocument>,
    /// Files the bot may download: file_id → (file_path, content).
    files: std::collections::HashMap<String, (String, Vec<u8>)>,
    /// Paths downloaded from `/file/bot<token>/<path>`, in order.
    downloads: Vec<String>,
}

/// Telegram's limit for files bots download (`getFile` refuses bigger ones).
pub const MAX_DOWNLOAD_BYTES: usize = 20 << 20;

struct Shared {
    token: String,
    inner: Mutex<Inner>,
    /// Bumped whenever an update is pushed, so long polls wake up.
    updates_changed: watch::Sender<u64>,
    /// Bumped whenever the bot sends something, so waiters wake up.
    sent_changed: watch::Sender<u64>,
    /// Subscribers of [`FakeTelegram::subscribe_sent`].
    sent_subscribers: Mutex<Vec<tokio::sync::mpsc::UnboundedSender<SentMessage>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means another test thread panicked while holding it; the data
        // is still the best record of what happened, so keep serving it.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The fake Bot API. Stops serving when dropped.
pub struct FakeTelegram {
    shared: Arc<Shared>,
    addr: std::net::SocketAddr,
    server: JoinHandle<()>,
}

impl fmt::Debug for FakeTelegram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeTelegram")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeTelegram {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeTelegram {
    /// Start serving on an ephemeral loopback port, accepting only `token`.
    ///
    /// Panics if the loopback listener cannot be bound: there is no test to run without it.
    pub async fn start(token: &str) -> FakeTelegram {
        let shared = Arc::new(Shared {
            token: token.to_string(),
            inner: Mutex::new(Inner {
                next_update_id: 1000,
                next_message_id: 1,
                ..Inner::default()
            }),
            updates_changed: watch::channel(0).0,
            sent_changed: watch::channel(0).0,
            sent_subscribers: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/file/{bot}/{*path}", axum::routing::get(download))
            .route("/{bot}/{method}", any(handle))
            .with_state(shared.clone());
        #[allow(clippy::expect_used)] // test double: failing to bind loopback is a broken host
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake Telegram: bind 127.0.0.1:0");
        #[allow(clippy::expect_used)] // a bound listener always has a local address
        let addr = listener.local_addr().expect("fake Telegram: local address");
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "fake Telegram server stopped");
            }
        });
        FakeTelegram {
            shared,
            addr,
            server,
        }
    }

    /// Base URL to put in the channel's `api_url` (no trailing slash).
    pub fn api_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Push a private text message from `from_id`; returns its `update_id`.
    pub fn push_text(&self, from_id: i64, text: &str) -> i64 {
        self.push_message(IncomingText::new(from_id, text))
    }

    /// Push a text message built with [`IncomingText`]; returns its `update_id`.
    pub fn push_message(&self, message: IncomingText) -> i64 {
        let mut from =
            json!({"id": message.from_id, "is_bot": false, "first_name": message.first_name});
        if let Some(last) = &message.last_name {
            from["last_name"] = json!(last);
        }
        if let Some(code) = &message.language_code {
            from["language_code"] = json!(code);
        }
        let chat = match message.group_chat {
            Some(id) => json!({"id": id, "type": "group", "title": "Test group"}),
            None => {
                json!({"id": message.from_id, "type": "private", "first_name": message.first_name})
            }
        };
        let mut inner = self.shared.lock();
        let message_id = inner.next_message_id;
        inner.next_message_id += 1;
        drop(inner);
        self.push_update(|id| {
            json!({
                "update_id": id,
                "message": {"message_id": message_id, "date": 1_700_000_000, "from": from, "chat": chat, "text": message.text}
            })
        })
    }

    /// Push an arbitrary update. If it has no `update_id`, the next id is added; a given
    /// `update_id` is used as is (and later ids continue after it). Returns the id used, or
    /// `None` if the value is not an object (it is still queued, to test malformed updates).
    pub fn push_raw_update(&self, mut update: Value) -> Option<i64> {
        let Some(object) = update.as_object_mut() else {
            self.shared.lock().pending.push_back(update);
            self.shared.updates_changed.send_modify(|v| *v += 1);
            return None;
        };
        if let Some(id) = object.get("update_id").and_then(Value::as_i64) {
            let mut inner = self.shared.lock();
            inner.next_update_id = inner.next_update_id.max(id + 1);
            inner.pending.push_back(update);
            drop(inner);
            self.shared.updates_changed.send_modify(|v| *v += 1);
            return Some(id);
        }
        Some(self.push_update(move |id| {
            update["update_id"] = json!(id);
            update
        }))
    }

    fn push_update(&self, build: impl FnOnce(i64) -> Value) -> i64 {
        let mut inner = self.shared.lock();
        let id = inner.next_update_id;
        inner.next_update_id += 1;
        inner.pending.push_back(build(id));
        drop(inner);
        self.shared.updates_changed.send_modify(|v| *v += 1);
        id
    }

    /// Store a file the bot can fetch with `getFile` and download; returns its `file_id`.
    pub fn add_file(&self, content: Vec<u8>) -> String {
        let mut inner = self.shared.lock();
        let n = inner.files.len() + 1;
        let file_id = format!("AgACAgFILE{n:04}xyz");
        inner.files.insert(
            file_id.clone(),
            (format!("documents/file_{n}.bin"), content),
        );
        file_id
    }

    /// Push a private message carrying a file: `kind` is `photo`, `voice`, `audio` or
    /// `document`; `claimed_size` is the `file_size` the update states (which a hostile or
    /// buggy client could get wrong); returns the `update_id`.
    pub fn push_file(
        &self,
        from_id: i64,
        kind: &str,
        file_id: &str,
        claimed_size: Option<u64>,
        file_name: Option<&str>,
        caption: Option<&str>,
    ) -> i64 {
        let mut file = json!({"file_id": file_id, "file_unique_id": format!("u{file_id}")});
        if let Some(size) = claimed_size {
            file["file_size"] = json!(size);
        }
        if let Some(name) = file_name {
            file["file_name"] = json!(name);
        }
        let mut message = json!({
            "message_id": 1, "date": 1_700_000_000,
            "from": {"id": from_id, "is_bot": false, "first_name": format!("User{from_id}")},
            "chat": {"id": from_id, "type": "private"},
        });
        match kind {
            "photo" => {
                file["width"] = json!(800);
                file["height"] = json!(600);
                let mut thumb = file.clone();
                thumb["file_id"] = json!("thumbnail-never-fetched");
                message["photo"] = json!([thumb, file]);
            }
            "voice" => {
                file["duration"] = json!(3);
                file["mime_type"] = json!("audio/ogg");
                message["voice"] = file;
            }
            other => message[other] = file,
        }
        if let Some(caption) = caption {
            message["caption"] = json!(caption);
        }
        self.push_update(|id| json!({"update_id": id, "message": message}))
    }

    /// Documents the bot sent, in order.
    pub fn sent_documents(&self) -> Vec<SentDocument> {
        self.shared.lock().documents.clone()
    }

    /// The file paths the bot downloaded, in order.
    pub fn downloads(&self) -> Vec<String> {
        self.shared.lock().downloads.clone()
    }

    /// Updates not yet confirmed by an offset.
    pub fn pending_updates(&self) -> usize {
        self.shared.lock().pending.len()
    }

    /// Everything the bot sent, in order.
    pub fn sent_messages(&self) -> Vec<SentMessage> {
        self.shared.lock().sent.clone()
    }

    /// Every message the bot sends from now on, as it arrives (for benchmarks, which follow
    /// thousands of replies without rescanning [`FakeTelegram::sent_messages`]).
    pub fn subscribe_sent(&self) -> tokio::sync::mpsc::UnboundedReceiver<SentMessage> {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        self.shared
            .sent_subscribers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(sender);
        receiver
    }

    /// Every chat action the bot sent, in order.
    pub fn chat_actions(&self) -> Vec<ChatAction> {
        self.shared.lock().actions.clone()
    }

    /// Every `getUpdates` call, in order.
    pub fn get_updates_calls(&self) -> Vec<GetUpdatesCall> {
        self.shared.lock().get_updates_calls.clone()
    }

    /// The offsets the `getUpdates` calls carried, in order.
    pub fn get_updates_offsets(&self) -> Vec<Option<i64>> {
        self.shared
            .lock()
            .get_updates_calls
            .iter()
            .map(|c| c.offset)
            .collect()
    }

    /// How many calls each method got (including failed ones), e.g. `calls("sendMessage")`.
    pub fn calls(&self, method: &str) -> usize {
        self.shared
            .lock()
            .calls_by_method
            .iter()
            .filter(|m| *m == method)
            .count()
    }

    /// Wait until the bot has sent at least `count` messages to `chat_id`; returns the texts
    /// of all messages sent to that chat so far.
    pub async fn wait_for_messages(
        &self,
        chat_id: i64,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<String>, WaitTimeout> {
        let chat = chat_id.to_string();
        let mut changes = self.shared.sent_changed.subscribe();
        let texts = |shared: &Shared| -> Vec<String> {
            shared
                .lock()
                .sent
                .iter()
                .filter(|m| m.chat_id == chat)
                .map(|m| m.text.clone())
                .collect()
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            changes.borrow_and_update();
            let got = texts(&self.shared);
            if got.len() >= count {
                return Ok(got);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Err(WaitTimeout {
                    chat_id: chat.clone(),
                    wanted: count,
                    timeout,
                    got: texts(&self.shared),
                });
            }
        }
    }

    /// Make the next `n` calls of any method fail with `status` (a Telegram-shaped error body,
    /// with `parameters.retry_after` if given).
    pub fn fail_next(&self, n: usize, status: u16, retry_after: Option<u64>) {
        self.add_fault(None, n, status, error_body(status, retry_after));
    }

    /// Make the next `n` calls of `method` fail like [`FakeTelegram::fail_next`].
    pub fn fail_next_method(&self, method: &str, n: usize, status: u16, retry_after: Option<u64>) {
        self.add_fault(Some(method), n, status, error_body(status, retry_after));
    }

    /// Refuse the next `n` `sendMessage` calls that carry a `parse_mode` with Telegram's
    /// `400 Bad Request: can't parse entities: ...` (plain sends still succeed).
    pub fn reject_formatting_next(&self, n: usize) {
        self.shared.lock().reject_formatting = n;
    }

    /// Answer the next `n` calls of `method` (or of any method) with this raw body and status,
    /// e.g. malformed JSON.
    pub fn respond_raw_next(&self, method: Option<&str>, n: usize, status: u16, body: &str) {
        self.add_fault(method, n, status, body.to_string());
    }

    fn add_fault(&self, method: Option<&str>, n: usize, status: u16, body: String) {
        if n == 0 {
            return;
        }
        self.shared.lock().faults.push(Fault {
            method: method.map(str::to_string),
            remaining: n,
            status,
            body,
        });
    }
}

fn error_body(status: u16, retry_after: Option<u64>) -> String {
    let description = match (status, retry_after) {
        (429, Some(s)) => format!("Too Many Requests: retry after {s}"),
        (429, None) => "Too Many Requests".to_string(),
        (400, _) => "Bad Request: chat not found".to_string(),
        (401, _) => "Unauthorized".to_string(),
        (403, _) => "Forbidden: bot was blocked by the user".to_string(),
        (404, _) => "Not Found".to_string(),
        (409, _) => "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running".to_string(),
        (502, _) => "Bad Gateway".to_string(),
        (s, _) if s >= 500 => "Internal Server Error".to_string(),
        _ => "Error".to_string(),
    };
    let mut body = json!({"ok": false, "error_code": status, "description": description});
    if let Some(seconds) = retry_after {
        body["parameters"] = json!({"retry_after": seconds});
    }
    body.to_string()
}

fn reply(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok(result: Value) -> Response {
    reply(200, json!({"ok": true, "result": result}))
}

fn error(status: u16, description: &str) -> Response {
    reply(
        status,
        json!({"ok": false, "error_code": status, "description": description}),
    )
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    Path((bot, method)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    if bot.strip_prefix("bot") != Some(shared.token.as_str()) {
        return error(401, "Unauthorized");
    }
    if method == "sendDocument" {
        shared.lock().calls_by_method.push(method.clone());
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        return send_document(&shared, content_type, &body);
    }
    let params = parse_params(query.as_deref(), &body);
    {
        let mut inner = shared.lock();
        inner.calls_by_method.push(method.clone());
        // Recorded before fault injection, so tests see the offsets of refused calls too.
        if method == "getUpdates" {
            if let Ok(params) = &params {
                inner.get_updates_calls.push(GetUpdatesCall {
                    offset: int_param(params, "offset").ok().flatten(),
                    timeout: timeout_param(params).unwrap_or(0),
                    allowed_updates: allowed_updates_param(params),
                });
            }
        }
        let fault = inner
            .faults
            .iter_mut()
            .find(|f| f.remaining > 0 && f.method.as_deref().is_none_or(|m| m == method));
        if let Some(fault) = fault {
            fault.remaining -= 1;
            let status =
                StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = fault.body.clone();
            inner.faults.retain(|f| f.remaining > 0);
            return (status, [("content-type", "application/json")], body).into_response();
        }
    }
    let params = match params {
        Ok(params) => params,
        Err(description) => return error(400, &description),
    };
    match method.as_str() {
        "getMe" => ok(json!({
            "id": FAKE_BOT_ID, "is_bot": true, "first_name": "Fake", "username": "fake_moltmate_bot",
            "can_join_groups": true, "can_read_all_group_messages": false, "supports_inline_queries": false
        })),
        "getUpdates" => get_updates(&shared, &params).await,
        "sendMessage" => send_message(&shared, &params),
        "sendChatAction" => send_chat_action(&shared, &params),
        "getFile" => get_file(&shared, &params),
        _ => error(404, "Not Found"),
    }
}

/// `sendDocument` as multipart/form-data: `chat_id`, `document` (with a filename), `caption`.
fn send_document(shared: &Shared, content_type: &str, body: &[u8]) -> Response {
    let Some(boundary) = content_type
        .strip_prefix("multipart/form-data; boundary=")
        .map(|b| format!("--{}", b.trim_matches('"')))
    else {
        return error(400, "Bad Request: sendDocument expects multipart/form-data");
    };
    let mut fields: Vec<(String, Option<String>, Vec<u8>)> = Vec::new();
    let mut rest = body;
    while let Some(start) = find(rest, boundary.as_bytes()) {
        rest = &rest[start + boundary.len()..];
        if rest.starts_with(b"--") {
            break;
        }
        let Some(head_end) = find(rest, b"\r\n\r\n") else {
            break;
        };
        let head = String::from_utf8_lossy(&rest[..head_end]).to_string();
        let data_start = head_end + 4;
        let Some(data_len) = find(&rest[data_start..], format!("\r\n{boundary}").as_bytes()) else {
            break;
        };
        let value = |key: &str| {
            head.split(&format!("{key}=\""))
                .nth(1)
                .and_then(|v| v.split('"').next())
                .map(str::to_string)
        };
        fields.push((
            value("name").unwrap_or_default(),
            value("filename"),
            rest[data_start..data_start + data_len].to_vec(),
        ));
        rest = &rest[data_start + data_len..];
    }
    let field = |name: &str| fields.iter().find(|(n, _, _)| n == name);
    let Some((_, _, chat)) = field("chat_id") else {
        return error(400, "Bad Request: chat_id is empty");
    };
    let Some((_, Some(file_name), content)) = field("document") else {
        return error(400, "Bad Request: there is no document in the request");
    };
    let document = SentDocument {
        chat_id: String::from_utf8_lossy(chat).to_string(),
        file_name: file_name.clone(),
        content: content.clone(),
        caption: field("caption").map(|(_, _, c)| String::from_utf8_lossy(c).to_string()),
    };
    shared.lock().documents.push(document);
    shared.sent_changed.send_modify(|v| *v += 1);
    ok(json!({"message_id": 1, "date": 1_700_000_000, "chat": {"id": 0, "type": "private"}}))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn get_file(shared: &Shared, params: &Value) -> Response {
    let Some(file_id) = params.get("file_id").and_then(Value::as_str) else {
        return error(400, "Bad Request: file_id not specified");
    };
    let inner = shared.lock();
    let Some((path, content)) = inner.files.get(file_id) else {
        return error(400, "Bad Request: invalid file_id");
    };
    if content.len() > MAX_DOWNLOAD_BYTES {
        return error(400, "Bad Request: file is too big");
    }
    ok(json!({
        "file_id": file_id, "file_unique_id": format!("u{file_id}"),
        "file_size": content.len(), "file_path": path
    }))
}

async fn download(
    State(shared): State<Arc<Shared>>,
    Path((bot, path)): Path<(String, String)>,
) -> Response {
    if bot.strip_prefix("bot") != Some(shared.token.as_str()) {
        return error(401, "Unauthorized");
    }
    let mut inner = shared.lock();
    inner.downloads.push(path.clone());
    match inner.files.values().find(|(p, _)| *p == path) {
        Some((_, content)) => (StatusCode::OK, content.clone()).into_response(),
        None => error(404, "Not Found"),
    }
}

/// Bot API parameters may come as a JSON body or as a query string; we accept both.
fn parse_params(query: Option<&str>, body: &[u8]) -> Result<Value, String> {
    if !body.is_empty() {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| format!("Bad Request: can't parse JSON body: {e}"))?;
        return if value.is_object() {
            Ok(value)
        } else {
            Err("Bad Request: parameters must be an object".to_string())
        };
    }
    let mut params = serde_json::Map::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        // Values are taken as JSON when they parse (numbers, arrays), else as strings; percent
        // decoding is not needed by any client this fake serves.
        let value =
            serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
        params.insert(key.to_string(), value);
    }
    Ok(Value::Object(params))
}

fn int_param(params: &Value, name: &str) -> Result<Option<i64>, String> {
    match params.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| format!("Bad Request: {name} must be an integer")),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| format!("Bad Request: {name} must be an integer")),
        Some(_) => Err(format!("Bad Request: {name} must be an integer")),
    }
}

/// `chat_id` is an integer or a string (`@channel` or a decimal id).
fn chat_param(params: &Value) -> Result<String, String> {
    match params.get("chat_id") {
        Some(Value::Number(n)) if n.is_i64() => Ok(n.to_string()),
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err("Bad Request: chat_id is empty".to_string()),
    }
}

async fn get_updates(shared: &Shared, params: &Value) -> Response {
    let offset = match int_param(params, "offset") {
        Ok(v) => v,
        Err(e) => return error(400, &e),
    };
    let timeout = match timeout_param(params) {
        Ok(v) => v,
        Err(e) => return error(400, &e),
    };
    let limit = match int_param(params, "limit") {
        Ok(v) => usize::try_from(v.unwrap_or(100).clamp(1, 100)).unwrap_or(100),
        Err(e) => return error(400, &e),
    };
    let allowed_updates = allowed_updates_param(params);

    let mut changes = shared.updates_changed.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    loop {
        changes.borrow_and_update();
        let batch = {
            let mut inner = shared.lock();
            // Telegram semantics: an offset confirms (forgets) every update below it.
            if let Some(offset) = offset.filter(|o| *o > 0) {
                inner
                    .pending
                    .retain(|u| update_id(u).is_some_and(|id| id >= offset));
            }
            // Telegram only stores the allowed kinds; the others are gone for good.
            if let Some(allowed) = &allowed_updates {
                if !allowed.is_empty() {
                    inner
                        .pending
                        .retain(|u| update_kind(u).is_none_or(|k| allowed.iter().any(|a| a == k)));
                }
            }
            let skip = match offset {
                // A negative offset asks for the last -offset updates.
                Some(o) if o < 0 => inner
                    .pending
                    .len()
                    .saturating_sub(usize::try_from(-o).unwrap_or(usize::MAX)),
                _ => 0,
            };
            inner
                .pending
                .iter()
                .skip(skip)
                .take(limit)
                .cloned()
                .collect::<Vec<_>>()
        };
        if !batch.is_empty() {
            return ok(Value::Array(batch));
        }
        if tokio::time::timeout_at(deadline, changes.changed())
            .await
            .is_err()
        {
            return ok(json!([]));
        }
    }
}

/// Long-poll seconds; Telegram caps it (we use 50 s, the documented practical maximum).
fn timeout_param(params: &Value) -> Result<u64, String> {
    Ok(
        u64::try_from(int_param(params, "timeout")?.unwrap_or(0).max(0))
            .unwrap_or(0)
            .min(50),
    )
}

fn allowed_updates_param(params: &Value) -> Option<Vec<String>> {
    params
        .get("allowed_updates")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
}

fn update_id(update: &Value) -> Option<i64> {
    update.get("update_id").and_then(Value::as_i64)
}

/// The update's kind: its one field besides `update_id`.
fn update_kind(update: &Value) -> Option<&str> {
    update
        .as_object()?
        .keys()
        .map(String::as_str)
        .find(|k| *k != "update_id")
}

fn send_message(shared: &Shared, params: &Value) -> Response {
    let chat_id = match chat_param(params) {
        Ok(c) => c,
        Err(e) => return error(400, &e),
    };
    let Some(text) = params.get("text").and_then(Value::as_str) else {
        return error(400, "Bad Request: message text is empty");
    };
    let (visible, html) = match params.get("parse_mode").and_then(Value::as_str) {
        None | Some("") => (text.to_string(), None),
        Some("HTML") => {
            {
                let mut inner = shared.lock();
                if inner.reject_formatting > 0 {
                    inner.reject_formatting -= 1;
                    return error(
                        400,
                        "Bad Request: can't parse entities: Unsupported start tag \"x\" at byte offset 0",
                    );
                }
            }
            match parse_html(text) {
                Ok(visible) => (visible, Some(text.to_string())),
                Err(e) => return error(400, &format!("Bad Request: can't parse entities: {e}")),
            }
        }
        Some(_) => return error(400, "Bad Request: unsupported parse_mode"),
    };
    if visible.trim().is_empty() {
        return error(400, "Bad Request: message text is empty");
    }
    if visible.chars().map(char::len_utf16).sum::<usize>() > MAX_MESSAGE_UTF16 {
        return error(400, "Bad Request: message is too long");
    }
    let text = visible.as_str();
    let message_id = {
        let mut inner = shared.lock();
        let sent = SentMessage {
            chat_id: chat_id.clone(),
            text: text.to_string(),
            html,
        };
        shared
            .sent_subscribers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .retain(|subscriber| subscriber.send(sent.clone()).is_ok());
        inner.sent.push(sent);
        let id = inner.next_message_id;
        inner.next_message_id += 1;
        id
    };
    shared.sent_changed.send_modify(|v| *v += 1);
    let chat = match chat_id.parse::<i64>() {
        Ok(id) => json!({"id": id, "type": if id < 0 { "group" } else { "private" }}),
        Err(_) => {
            json!({"id": -1_000_000_000_001_i64, "type": "channel", "username": chat_id.trim_start_matches('@')})
        }
    };
    ok(json!({
        "message_id": message_id, "date": 1_700_000_000,
        "from": {"id": FAKE_BOT_ID, "is_bot": true, "first_name": "Fake", "username": "fake_moltmate_bot"},
        "chat": chat, "text": text
    }))
}

fn send_chat_action(shared: &Shared, params: &Value) -> Response {
    let chat_id = match chat_param(params) {
        Ok(c) => c,
        Err(e) => return error(400, &e),
    };
    const ACTIONS: &[&str] = &[
        "typing",
        "upload_photo",
        "record_video",
        "upload_video",
        "record_voice",
        "upload_voice",
        "upload_document",
        "choose_sticker",
        "find_location",
        "record_video_note",
        "upload_video_note",
    ];
    let Some(action) = params
        .get("action")
        .and_then(Value::as_str)
        .filter(|a| ACTIONS.contains(a))
    else {
        return error(400, "Bad Request: wrong parameter action in request");
    };
    shared.lock().actions.push(ChatAction {
        chat_id,
        action: action.to_string(),
    });
    shared.sent_changed.send_modify(|v| *v += 1);
    ok(json!(true))
}

/// Tags Telegram's `parse_mode: "HTML"` supports.
const HTML_TAGS: &[&str] = &[
    "b",
    "strong",
    "i",
    "em",
    "u",
    "ins",
    "s",
    "strike",
    "del",
    "span",
    "tg-spoiler",
    "a",
    "code",
    "pre",
    "blockquote",
    "tg-emoji",
];

/// Parse Telegram HTML as Telegram does (strictly): only the supported tags, properly nested;
/// `<`, `>` and `&` outside tags only as entities (`&lt;` `&gt;` `&amp;` `&quot;` and numeric).
/// Returns the visible text, or the reason Telegram would give.
pub fn parse_html(text: &str) -> Result<String, String> {
    let mut visible = String::new();
    let mut stack: Vec<String> = Vec::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let offset = text.len() - rest.len();
        match c {
            '<' => {
                let end = rest
                    .find('>')
                    .ok_or_else(|| format!("unclosed start tag at byte offset {offset}"))?;
                let inner = &rest[1..end];
                if let Some(name) = inner.strip_prefix('/') {
                    let name = name.trim().to_ascii_lowercase();
                    if stack.pop().as_deref() != Some(name.as_str()) {
                        return Err(format!(
                            "Can't find end tag corresponding to start tag at byte offset {offset}"
                        ));
                    }
                } else {
                    let name: String = inner
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                        .collect::<String>()
                        .to_ascii_lowercase();
                    if !HTML_TAGS.contains(&name.as_str()) {
                        return Err(format!(
                            "Unsupported start tag \"{name}\" at byte offset {offset}"
                        ));
                    }
                    let attrs = inner[name.len()..].trim();
                    let ok = match name.as_str() {
                        "a" => attrs.starts_with("href=\"") && attrs.ends_with('"'),
                        "code" => attrs.is_empty() || attrs.starts_with("class=\"language-"),
                        "span" => attrs == "class=\"tg-spoiler\"",
                        "blockquote" => attrs.is_empty() || attrs == "expandable",
                        "tg-emoji" => attrs.starts_with("emoji-id=\""),
                        _ => attrs.is_empty(),
                    };
                    if !ok || attrs.contains('<') {
                        return Err(format!(
                            "Unsupported attribute in tag \"{name}\" at byte offset {offset}"
                        ));
                    }
                    stack.push(name);
                }
                rest = &rest[end + 1..];
            }
            '>' => return Err(format!("Unmatched end of tag at byte offset {offset}")),
            '&' => {
                let end = rest
                    .find(';')
                    .filter(|e| *e <= 10)
                    .ok_or_else(|| format!("Unclosed entity at byte offset {offset}"))?;
                let entity = &rest[1..end];
                let decoded = match entity {
                    "lt" => '<',
                    "gt" => '>',
                    "amp" => '&',
                    "quot" => '"',
                    e if e.starts_with('#') => e[1..]
                        .parse::<u32>()
                        .ok()
                        .and_then(char::from_u32)
                        .ok_or_else(|| format!("Invalid entity at byte offset {offset}"))?,
                    _ => return Err(format!("Unsupported entity at byte offset {offset}")),
                };
                visible.push(decoded);
                rest = &rest[end + 1..];
            }
            c => {
                visible.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    if let Some(open) = stack.last() {
        return Err(format!(
            "Can't find end tag corresponding to start tag \"{open}\""
        ));
    }
    Ok(visible)
}
