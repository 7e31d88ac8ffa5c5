//! A fake signal-cli JSON-RPC daemon (multi-account mode, `--receive-mode=manual`) for tests,
//! on a TCP port of 127.0.0.1 or a Unix socket.
//!
//! It speaks the wire format of signal-cli-jsonrpc(5): one JSON object per line; requests with
//! an `id` get `{"jsonrpc":"2.0","result":...,"id":...}` or an `error` object; incoming
//! messages are `receive` notifications wrapped in the subscription object
//! (`{"method":"receive","params":{"subscription":0,"result":{"envelope":...,"account":...}}}`).
//! Semantics that matter for correctness: messages wait "on the server" until a connection
//! has called `subscribeReceive`, and are gone once written to it (signal-cli acknowledges
//! them to the server then); every call but `listAccounts`/`startLink`/`finishLink` needs the
//! `account` param naming a linked account (else `-32602 Specified account does not exist`);
//! `startLink` answers a `sgnl://linkdevice` URI and `finishLink` waits until the test
//! "scans" it.
//!
//! Files: a data message's `attachments[]` carry `contentType`, `filename`, `id`, `size` (as
//! signal-cli's `JsonAttachment`; `voiceNote` added when asked for), and signal-cli keeps the
//! file under that id: `getAttachment` (`{"id", "recipient"|"groupId"}`) answers
//! `{"data": "<base64>"}` (standard alphabet, padded, as `Base64.getEncoder()` writes), an
//! unknown id the user error "Could not find attachment with ID: …". `send` takes
//! `attachments` (or `attachment`), each a file path or an RFC 2397 data URI
//! `data:<mime>;filename=<name>;base64,<data>` (parameter values URL-decoded); both are
//! recorded, so a test can assert that no path was ever named.
//!
//! ```ignore
//! let fake = FakeSignalCli::start_tcp("+4917000000001").await;
//! fake.push_text("+4917011111111", "hello");
//! let replies = fake.wait_for_messages("+4917011111111", 1, Duration::from_secs(5)).await?;
//! ```

use base64::Engine as _;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{watch, Notify};

/// A message the gateway sent with `send`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentMessage {
    pub recipient: String,
    pub text: String,
}

/// An attachment the gateway sent with `send`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentAttachment {
    pub recipient: String,
    /// The media type of the data URI.
    pub mime: String,
    /// The `filename` parameter, URL-decoded.
    pub filename: Option<String>,
    pub content: Vec<u8>,
    /// The `message` sent with it, if any.
    pub message: Option<String>,
}

#[derive(Default)]
struct State {
    /// Attachment id → content, as signal-cli keeps them in `attachments/`.
    files: HashMap<String, Vec<u8>>,
    get_attachment_calls: Vec<Value>,
    sent_attachments: Vec<SentAttachment>,
    /// Attachments given as a path instead of a data URI.
    path_attachments: Vec<String>,
    account: String,
    linked: bool,
    /// Messages waiting on the "server" for a subscriber.
    queue: VecDeque<Value>,
    sent: Vec<SentMessage>,
    typing: Vec<String>,
    receipts: Vec<(String, i64)>,
    calls: Vec<String>,
    /// The next N `send` calls fail with a rate limit asking for this many seconds.
    rate_limit_sends: usize,
    rate_limit_seconds: u64,
    link_uri: Option<String>,
    scanned: bool,
    /// Connections are dropped when this generation changes.
    generation: u64,
    /// A hung daemon (a JVM stall): connections stay open, nothing is answered or delivered.
    frozen: bool,
    /// Connections accepted so far.
    connections: usize,
}

/// The fake daemon.
#[derive(Clone)]
pub struct FakeSignalCli {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    timestamps: Arc<AtomicI64>,
    address: String,
    socket: Option<PathBuf>,
    stop: watch::Sender<bool>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeSignalCli {
    fn new(account: &str, address: String, socket: Option<PathBuf>) -> Self {
        let (stop, _) = watch::channel(false);
        FakeSignalCli {
            state: Arc::new(Mutex::new(State {
                account: account.to_string(),
                linked: true,
                ..State::default()
            })),
            changed: Arc::new(Notify::new()),
            timestamps: Arc::new(AtomicI64::new(1_700_000_000_000)),
            address,
            socket,
            stop,
        }
    }

    /// A daemon on `127.0.0.1:<random port>` whose `account` is linked.
    pub async fn start_tcp(account: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake signal-cli");
        let address = listener.local_addr().expect("local address");
        let fake = FakeSignalCli::new(account, format!("tcp:{address}"), None);
        let serving = fake.clone();
        tokio::spawn(async move {
            let mut stop = serving.stop.subscribe();
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        // Lines are small request/answer pairs: without this, Nagle and
                        // delayed ACKs add ~40 ms to every answer on loopback.
                        let _ = stream.set_nodelay(true);
                        let (r, w) = stream.into_split();
                        tokio::spawn(serving.clone().serve(BufReader::new(r), w));
                    }
                }
            }
        });
        fake
    }

    /// A daemon on a Unix socket at `path` whose `account` is linked.
    pub async fn start_unix(account: &str, path: &Path) -> Self {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).expect("bind fake signal-cli socket");
        let fake = FakeSignalCli::new(
            account,
            format!("unix:{}", path.display()),
            Some(path.to_path_buf()),
        );
        let serving = fake.clone();
        tokio::spawn(async move {
            let mut stop = serving.stop.subscribe();
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let (r, w) = stream.into_split();
                        tokio::spawn(serving.clone().serve(BufReader::new(r), w));
                    }
                }
            }
        });
        fake
    }

    /// The value for `channels.signal.daemon`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Where the Unix socket is, for `start_unix`.
    pub fn socket(&self) -> Option<&Path> {
        self.socket.as_deref()
    }

    /// Stops accepting connections and drops the open ones.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
        self.drop_connections();
    }

    /// Drops every open connection (as a daemon restart would).
    pub fn drop_connections(&self) {
        lock(&self.state).generation += 1;
        self.changed.notify_waiters();
    }

    /// The daemon hangs: sockets stay open (and new ones are accepted), but no request is
    /// answered and no message delivered until [`Self::unfreeze`]. Requests read meanwhile are
    /// never answered.
    pub fn freeze(&self) {
        lock(&self.state).frozen = true;
        self.changed.notify_waiters();
    }

    pub fn unfreeze(&self) {
        lock(&self.state).frozen = false;
        self.changed.notify_waiters();
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        lock(&self.state).connections
    }

    /// Queues a direct text message from `from` (E.164) on the "server".
    pub fn push_text(&self, from: &str, text: &str) -> i64 {
        let timestamp = self.timestamps.fetch_add(1, Ordering::Relaxed);
        self.push_envelope(json!({
            "source": from, "sourceNumber": from, "sourceUuid": "00000000-0000-4000-8000-000000000001",
            "sourceName": format!("Person {from}"), "sourceDevice": 1, "timestamp": timestamp,
            "dataMessage": {"timestamp": timestamp, "message": text, "expiresInSeconds": 0,
                "viewOnce": false, "mentions": [], "attachments": [], "contacts": []}
        }));
        timestamp
    }

    /// Stores `content` as signal-cli would after downloading an attachment; returns the
    /// attachment object for a data message (edit it for lying claims).
    pub fn add_attachment(
        &self,
        content_type: &str,
        filename: Option<&str>,
        content: Vec<u8>,
    ) -> Value {
        let n = self.timestamps.fetch_add(1, Ordering::Relaxed);
        let extension = content_type.rsplit('/').next().unwrap_or("bin");
        let id = format!("att{n}.{extension}");
        let object = json!({
            "contentType": content_type, "filename": filename, "id": id,
            "size": content.len(), "width": null, "height": null, "caption": null,
            "uploadTimestamp": 1_700_000_000_000_i64,
        });
        lock(&self.state).files.insert(id, content);
        object
    }

    /// Queues a direct message from `from` with `attachments` (from [`Self::add_attachment`])
    /// and optional text.
    pub fn push_attachments(&self, from: &str, text: Option<&str>, attachments: Vec<Value>) -> i64 {
        let timestamp = self.timestamps.fetch_add(1, Ordering::Relaxed);
        let mut data = json!({"timestamp": timestamp, "expiresInSeconds": 0, "viewOnce": false,
            "mentions": [], "attachments": attachments, "contacts": []});
        if let Some(text) = text {
            data["message"] = json!(text);
        }
        self.push_envelope(json!({
            "source": from, "sourceNumber": from, "sourceUuid": "00000000-0000-4000-8000-000000000001",
            "sourceName": format!("Person {from}"), "sourceDevice": 1, "timestamp": timestamp,
            "dataMessage": data
        }));
        timestamp
    }

    /// Queues a group message (`groupInfo`) from `from` with `attachments`.
    pub fn push_group_attachments(&self, from: &str, text: &str, attachments: Vec<Value>) -> i64 {
        let timestamp = self.timestamps.fetch_add(1, Ordering::Relaxed);
        self.push_envelope(json!({
            "source": from, "sourceNumber": from, "sourceDevice": 1, "timestamp": timestamp,
            "dataMessage": {"timestamp": timestamp, "message": text, "attachments": attachments,
                "groupInfo": {"groupId": "Z3JvdXAtaWQ=", "type": "DELIVER"}}
        }));
        timestamp
    }

    /// The params of every `getAttachment` call.
    pub fn get_attachment_calls(&self) -> Vec<Value> {
        lock(&self.state).get_attachment_calls.clone()
    }

    /// Attachments sent as data URIs.
    pub fn sent_attachments(&self) -> Vec<SentAttachment> {
        lock(&self.state).sent_attachments.clone()
    }

    /// Attachments sent as file paths (the gateway must never do this).
    pub fn path_attachments(&self) -> Vec<String> {
        lock(&self.state).path_attachments.clone()
    }

    /// Queues a raw envelope.
    pub fn push_envelope(&self, envelope: Value) {
        lock(&self.state).queue.push_back(envelope);
        self.changed.notify_waiters();
    }

    /// Messages still waiting on the "server" (not yet handed to a subscriber).
    pub fn waiting(&self) -> usize {
        lock(&self.state).queue.len()
    }

    pub fn sent_messages(&self) -> Vec<SentMessage> {
        lock(&self.state).sent.clone()
    }

    pub fn typing(&self) -> Vec<String> {
        lock(&self.state).typing.clone()
    }

    pub fn receipts(&self) -> Vec<(String, i64)> {
        lock(&self.state).receipts.clone()
    }

    /// Method names called so far, in order.
    pub fn calls(&self) -> Vec<String> {
        lock(&self.state).calls.clone()
    }

    /// The next `count` sends fail with signal-cli's rate limit error asking for `seconds`.
    pub fn rate_limit_next_sends(&self, count: usize, seconds: u64) {
        let mut state = lock(&self.state);
        state.rate_limit_sends = count;
        state.rate_limit_seconds = seconds;
    }

    /// The account is unlinked (on the phone): calls naming it fail, `listAccounts` omits it.
    pub fn unlink(&self) {
        lock(&self.state).linked = false;
        self.changed.notify_waiters();
    }

    /// The device-link URI of the last `startLink`, if any.
    pub fn link_uri(&self) -> Option<String> {
        lock(&self.state).link_uri.clone()
    }

    /// The phone scans the code: the waiting `finishLink` answers and the account is linked.
    pub fn scan(&self) {
        let mut state = lock(&self.state);
        state.scanned = true;
        state.linked = true;
        drop(state);
        self.changed.notify_waiters();
    }

    /// Waits until `recipient` was sent `count` messages; returns their texts.
    pub async fn wait_for_messages(
        &self,
        recipient: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<String>, Vec<SentMessage>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let texts: Vec<String> = self
                .sent_messages()
                .into_iter()
                .filter(|m| m.recipient == recipient)
                .map(|m| m.text)
                .collect();
            if texts.len() >= count {
                return Ok(texts);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.sent_messages());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn serve<R, W>(self, mut reader: BufReader<R>, mut writer: W)
    where
        R: tokio::io::AsyncRead + Unpin,
        W: AsyncWrite + Unpin + Send,
    {
        let generation = {
            let mut state = lock(&self.state);
            state.connections += 1;
            state.generation
        };
        let mut subscribed = false;
        let mut line = String::new();
        loop {
            let changed = self.changed.notified();
            // Hand queued messages to a subscriber; they are gone from the "server" then.
            if subscribed {
                loop {
                    let next = {
                        let mut state = lock(&self.state);
                        if state.generation != generation || !state.linked || state.frozen {
                            None
                        } else {
                            let account = state.account.clone();
                            state.queue.pop_front().map(|e| (e, account))
                        }
                    };
                    let Some((envelope, account)) = next else {
                        break;
                    };
                    let note = json!({"jsonrpc": "2.0", "method": "receive", "params": {
                        "subscription": 0, "result": {"envelope": envelope, "account": account}}});
                    if write_line(&mut writer, &note).await.is_err() {
                        return;
                    }
                }
            }
            // A partly read line stays in `line` when the select picks `changed`.
            let read = tokio::select! {
                r = reader.read_line(&mut line) => r,
                _ = changed => {
                    if lock(&self.state).generation != generation {
                        return;
                    }
                    continue;
                }
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if lock(&self.state).generation != generation {
                return;
            }
            if !line.ends_with('\n') {
                continue;
            }
            let request = serde_json::from_str::<Value>(line.trim());
            line.clear();
            if lock(&self.state).frozen {
                continue;
            }
            let Ok(request) = request else {
                let _ = write_line(&mut writer, &json!({"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": null})).await;
                continue;
            };
            let id = request.get("id").cloned().unwrap_or(Value::Null);
            let method = request
                .get("method")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let params = request.get("params").cloned().unwrap_or(json!({}));
            lock(&self.state).calls.push(method.clone());
            let answer = match self.handle(&method, &params).await {
                Ok(result) => {
                    if method == "subscribeReceive" {
                        subscribed = true;
                    }
                    if method == "unsubscribeReceive" {
                        subscribed = false;
                    }
                    json!({"jsonrpc": "2.0", "result": result, "id": id})
                }
                Err(error) => json!({"jsonrpc": "2.0", "error": error, "id": id}),
            };
            if write_line(&mut writer, &answer).await.is_err() {
                return;
            }
        }
    }

    async fn handle(&self, method: &str, params: &Value) -> Result<Value, Value> {
        let account_ok = || {
            let state = lock(&self.state);
            params.get("account").and_then(Value::as_str) == Some(state.account.as_str())
                && state.linked
        };
        let needs_account = !matches!(method, "listAccounts" | "startLink" | "finishLink");
        if needs_account && !account_ok() {
            return Err(
                json!({"code": -32602, "message": "Specified account does not exist", "data": null}),
            );
        }
        let recipient = || {
            params
                .get("recipient")
                .and_then(|r| r.as_array().and_then(|a| a.first()).or(Some(r)))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        match method {
            "listAccounts" => {
                let state = lock(&self.state);
                Ok(if state.linked {
                    json!([{"number": state.account}])
                } else {
                    json!([])
                })
            }
            "subscribeReceive" => Ok(json!(0)),
            "unsubscribeReceive" => Ok(json!({})),
            "getAttachment" => {
                lock(&self.state).get_attachment_calls.push(params.clone());
                let id = params.get("id").and_then(Value::as_str).unwrap_or("");
                if params.get("recipient").is_none() && params.get("groupId").is_none() {
                    return Err(json!({"code": -32602, "message": "Missing recipient or groupId"}));
                }
                match lock(&self.state).files.get(id) {
                    Some(content) => Ok(
                        json!({"data": base64::engine::general_purpose::STANDARD.encode(content)}),
                    ),
                    None => Err(
                        json!({"code": -1, "message": format!("Could not find attachment with ID: {id}")}),
                    ),
                }
            }
            "send" => {
                let text = params
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let recipient = recipient();
                let attachments: Vec<String> =
                    match params.get("attachments").or(params.get("attachment")) {
                        Some(Value::Array(list)) => list
                            .iter()
                            .filter_map(Value::as_str)
                            .map(str::to_string)
                            .collect(),
                        Some(Value::String(one)) => vec![one.clone()],
                        _ => Vec::new(),
                    };
                if text.is_empty() && attachments.is_empty() {
                    return Err(json!({"code": -1, "message": "No message given"}));
                }
                let mut decoded = Vec::new();
                for attachment in &attachments {
                    if !attachment.starts_with("data:") {
                        lock(&self.state).path_attachments.push(attachment.clone());
                        return Err(
                            json!({"code": -1, "message": format!("Failed to add attachment \"{attachment}\": No such file")}),
                        );
                    }
                    match parse_data_uri(attachment) {
                        Some(parsed) => decoded.push(parsed),
                        None => {
                            return Err(
                                json!({"code": -1, "message": "The given string is not a valid data URI."}),
                            )
                        }
                    }
                }
                let mut state = lock(&self.state);
                for (mime, filename, content) in decoded {
                    state.sent_attachments.push(SentAttachment {
                        recipient: recipient.clone(),
                        mime,
                        filename,
                        content,
                        message: (!text.is_empty()).then(|| text.clone()),
                    });
                }
                if !attachments.is_empty() {
                    let timestamp = self.timestamps.fetch_add(1, Ordering::Relaxed);
                    return Ok(json!({"timestamp": timestamp, "results": [{
                        "recipientAddress": {"number": recipient}, "type": "SUCCESS"}]}));
                }
                if state.rate_limit_sends > 0 {
                    state.rate_limit_sends -= 1;
                    let seconds = state.rate_limit_seconds;
                    return Err(
                        json!({"code": -5, "message": "Failed to send message due to rate limiting",
                        "data": {"response": {"timestamp": 0, "results": [{
                            "recipientAddress": {"number": recipient}, "type": "RATE_LIMIT_FAILURE",
                            "retryAfterSeconds": seconds}]}}}),
                    );
                }
                if text.encode_utf16().count() > 2000 {
                    return Err(json!({"code": -1, "message": "Message too long"}));
                }
                state.sent.push(SentMessage {
                    recipient: recipient.clone(),
                    text,
                });
                let timestamp = self.timestamps.fetch_add(1, Ordering::Relaxed);
                Ok(json!({"timestamp": timestamp, "results": [{
                    "recipientAddress": {"number": recipient}, "type": "SUCCESS"}]}))
            }
            "sendTyping" => {
                lock(&self.state).typing.push(recipient());
                Ok(json!({}))
            }
            "sendReceipt" => {
                let ts = params
                    .get("targetTimestamp")
                    .and_then(|t| t.as_array().and_then(|a| a.first()).or(Some(t)))
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                lock(&self.state).receipts.push((recipient(), ts));
                Ok(json!({}))
            }
            "startLink" => {
                let uri = "sgnl://linkdevice?uuid=fake-uuid-123&pub_key=BQfakekey".to_string();
                let mut state = lock(&self.state);
                state.link_uri = Some(uri.clone());
                state.scanned = false;
                Ok(json!({"deviceLinkUri": uri}))
            }
            "finishLink" => loop {
                let changed = self.changed.notified();
                {
                    let state = lock(&self.state);
                    if state.scanned {
                        return Ok(
                            json!({"number": state.account, "aci": "11111111-1111-4111-8111-111111111111"}),
                        );
                    }
                }
                changed.await;
            },
            _ => Err(json!({"code": -32601, "message": "Method not implemented"})),
        }
    }
}

/// `data:<type>;<key>=<value>...;base64,<data>` → (type, filename, bytes), as signal-cli's
/// `DataURI.of` reads it (parameter values URL-decoded). Only base64 data URIs are accepted.
fn parse_data_uri(uri: &str) -> Option<(String, Option<String>, Vec<u8>)> {
    let rest = uri.strip_prefix("data:")?;
    let (head, data) = rest.split_once(',')?;
    let head = head.strip_suffix(";base64")?;
    let mut fields = head.split(';');
    let mime = fields.next()?.to_string();
    if !mime.contains('/') {
        return None;
    }
    let mut filename = None;
    for field in fields {
        let (key, value) = field.split_once('=')?;
        if key == "filename" {
            filename = Some(percent_decode(value)?);
        }
    }
    let content = base64::engine::general_purpose::STANDARD
        .decode(data)
        .ok()?;
    Some((mime, filename, content))
}

fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

async fn write_line<W: AsyncWrite + Unpin>(writer: &mut W, value: &Value) -> std::io::Result<()> {
    let mut line = value.to_string();
    line.push('\n');
    writer.write_all(line.as_bytes()).await?;
    writer.flush().await
}
