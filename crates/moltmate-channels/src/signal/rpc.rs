//! A JSON-RPC 2.0 client for signal-cli's daemon: one JSON object per line over a Unix socket or
//! TCP, requests matched to responses by id, `receive` notifications handed to a bounded queue.
//!
//! Everything read is bounded: a line longer than the connection's limit ([`MAX_LINE_BYTES`], or
//! what the largest attachment needs in base64: [`line_limit_for`]) is dropped (the codec skips
//! to the next newline), at most [`MAX_PENDING`] calls wait at once, every call has a deadline.
//! A line over [`LARGE_LINE_BYTES`] (a `getAttachment` answer) is parsed on the blocking pool;
//! only answers may exceed [`MAX_LINE_BYTES`], a longer notification is skipped.

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{Decoder, FramedRead, FramedWrite, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;

/// Longest JSON-RPC line read when no attachments are fetched (a text message is a few KB).
pub(crate) const MAX_LINE_BYTES: usize = 1 << 20;

/// Lines longer than this are parsed off the async runtime.
pub(crate) const LARGE_LINE_BYTES: usize = 256 << 10;

/// The line limit that lets a `getAttachment` answer of `max_file_bytes` through: its base64
/// (4 characters per 3 bytes) plus room for the JSON around it; never below [`MAX_LINE_BYTES`].
pub(crate) fn line_limit_for(max_file_bytes: u64) -> usize {
    let encoded = max_file_bytes.div_ceil(3).saturating_mul(4);
    usize::try_from(encoded.saturating_add(64 << 10))
        .unwrap_or(usize::MAX)
        .max(MAX_LINE_BYTES)
}

/// A line read from the daemon, or the note that one was too long (and skipped).
enum Line {
    Text(String),
    TooLong,
}

/// [`LinesCodec`] with its length error turned into an item: a stream ends after its first
/// error, so an over-long line used to end the connection (and lose what signal-cli had
/// already written after it, acknowledged to the server), not just itself.
struct BoundedLines(LinesCodec);

impl Decoder for BoundedLines {
    type Item = Line;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut bytes::BytesMut) -> Result<Option<Line>, std::io::Error> {
        Self::item(self.0.decode(src))
    }

    fn decode_eof(&mut self, src: &mut bytes::BytesMut) -> Result<Option<Line>, std::io::Error> {
        Self::item(self.0.decode_eof(src))
    }
}

impl BoundedLines {
    fn item(
        decoded: Result<Option<String>, LinesCodecError>,
    ) -> Result<Option<Line>, std::io::Error> {
        match decoded {
            Ok(line) => Ok(line.map(Line::Text)),
            Err(LinesCodecError::MaxLineLengthExceeded) => Ok(Some(Line::TooLong)),
            Err(LinesCodecError::Io(e)) => Err(e),
        }
    }
}

/// TCP keepalive idle time and probe interval on `tcp:` connections.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Calls waiting for an answer at most.
const MAX_PENDING: usize = 256;

/// Longest piece of a daemon's error message we keep.
const MAX_ERROR_CHARS: usize = 300;

/// Where signal-cli's daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonAddress {
    Unix(PathBuf),
    Tcp(String),
}

impl DaemonAddress {
    /// `unix:/run/signal-cli/socket`, `/absolute/path`, `tcp:127.0.0.1:7583` or `host:port`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        if let Some(path) = raw.strip_prefix("unix:") {
            return Self::unix(path);
        }
        if raw.starts_with('/') {
            return Self::unix(raw);
        }
        let tcp = raw.strip_prefix("tcp:").unwrap_or(raw);
        match tcp.rsplit_once(':') {
            Some((host, port))
                if !host.is_empty()
                    && port.parse::<u16>().is_ok_and(|p| p > 0)
                    && host.chars().all(|c| {
                        c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':')
                    }) =>
            {
                Ok(DaemonAddress::Tcp(tcp.to_string()))
            }
            _ => Err("expected unix:/path/to/socket or tcp:host:port".to_string()),
        }
    }

    fn unix(path: &str) -> Result<Self, String> {
        if !path.starts_with('/') {
            return Err("a unix socket path must be absolute".to_string());
        }
        if path.len() > 107 {
            return Err("a unix socket path must be shorter than 108 bytes".to_string());
        }
        Ok(DaemonAddress::Unix(PathBuf::from(path)))
    }
}

impl std::fmt::Display for DaemonAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DaemonAddress::Unix(path) => write!(f, "unix:{}", path.display()),
            DaemonAddress::Tcp(address) => write!(f, "tcp:{address}"),
        }
    }
}

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcError {
    #[error("could not connect to signal-cli at {address}: {detail}")]
    Connect { address: String, detail: String },
    #[error("the connection to signal-cli was lost")]
    Disconnected,
    #[error("signal-cli did not answer {method} within {seconds}s")]
    Timeout { method: &'static str, seconds: u64 },
    #[error("too many signal-cli calls waiting")]
    Busy,
    #[error("signal-cli refused {method} (code {code}): {message}")]
    Remote {
        method: &'static str,
        code: i64,
        message: String,
        data: Option<Value>,
    },
}

impl RpcError {
    /// signal-cli's rate limit: JSON-RPC code -5, or a send result of type
    /// `RATE_LIMIT_FAILURE`. Returns the wait it asks for (seconds), if any.
    pub fn rate_limit(&self) -> Option<Option<u64>> {
        let RpcError::Remote {
            code,
            message,
            data,
            ..
        } = self
        else {
            return None;
        };
        let results = data
            .as_ref()
            .and_then(|d| d.pointer("/response/results"))
            .and_then(Value::as_array);
        let limited: Vec<&Value> = results
            .map(|r| {
                r.iter()
                    .filter(|r| r.get("type").and_then(Value::as_str) == Some("RATE_LIMIT_FAILURE"))
                    .collect()
            })
            .unwrap_or_default();
        if *code == -5 || !limited.is_empty() || message.to_ascii_lowercase().contains("rate limit")
        {
            let retry = limited
                .iter()
                .filter_map(|r| r.get("retryAfterSeconds").and_then(Value::as_u64))
                .max();
            return Some(retry);
        }
        None
    }

    /// The account is not (or no longer) usable: unknown to the daemon, unlinked, unregistered.
    pub fn is_account_problem(&self) -> bool {
        let RpcError::Remote { code, message, .. } = self else {
            return false;
        };
        let lower = message.to_ascii_lowercase();
        (*code == -32602 && lower.contains("account"))
            || lower.contains("authorization failed")
            || lower.contains("not registered")
            || lower.contains("unregistered")
    }
}

/// Calls waiting for their answer, by request id.
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, RpcError>>>>>;

/// One open connection to the daemon.
pub(crate) struct RpcConnection {
    outgoing: mpsc::Sender<String>,
    pending: Pending,
    next_id: AtomicU64,
    closed: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn bounded(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control())
        .take(MAX_ERROR_CHARS)
        .collect()
}

impl RpcConnection {
    /// Connects and starts the reader and writer tasks. Notifications (`receive`) go to
    /// `notifications`; when that queue is full the reader waits (signal-cli then buffers),
    /// and so do the answers behind them: a connection that receives is therefore never used
    /// for ordinary calls (see the module docs of `signal`). Without `notifications` (a
    /// connection for calls only), notifications are dropped: a daemon in automatic receive
    /// mode writes them to every connection, and the receiving one gets them too.
    pub(crate) async fn connect(
        address: &DaemonAddress,
        timeout: Duration,
        max_line_bytes: usize,
        notifications: Option<mpsc::Sender<Value>>,
    ) -> Result<Arc<RpcConnection>, RpcError> {
        let connect_error = |detail: String| RpcError::Connect {
            address: address.to_string(),
            detail,
        };
        let (reader, writer): (
            Box<dyn tokio::io::AsyncRead + Send + Unpin>,
            Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
        ) = match address {
            DaemonAddress::Unix(path) => {
                let stream = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(path))
                    .await
                    .map_err(|_| connect_error("timed out".to_string()))?
                    .map_err(|e| connect_error(e.kind().to_string()))?;
                let (r, w) = stream.into_split();
                (Box::new(r), Box::new(w))
            }
            DaemonAddress::Tcp(host_port) => {
                let stream = tokio::time::timeout(
                    timeout,
                    tokio::net::TcpStream::connect(host_port.as_str()),
                )
                .await
                .map_err(|_| connect_error("timed out".to_string()))?
                .map_err(|e| connect_error(e.kind().to_string()))?;
                let _ = stream.set_nodelay(true);
                // A half-open connection (a rebooted router, a vanished host) is noticed by
                // the kernel instead of looking connected forever.
                let keepalive = socket2::TcpKeepalive::new()
                    .with_time(TCP_KEEPALIVE)
                    .with_interval(TCP_KEEPALIVE);
                let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
                let (r, w) = stream.into_split();
                (Box::new(r), Box::new(w))
            }
        };
        let (outgoing, mut queue) = mpsc::channel::<String>(64);
        let connection = Arc::new(RpcConnection {
            outgoing,
            pending: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(1),
            closed: CancellationToken::new(),
        });
        let closed = connection.closed.clone();
        tokio::spawn(async move {
            let mut sink = FramedWrite::new(writer, LinesCodec::new());
            loop {
                let line = tokio::select! {
                    _ = closed.cancelled() => break,
                    line = queue.recv() => line,
                };
                let Some(line) = line else { break };
                if sink.send(line).await.is_err() {
                    break;
                }
            }
            closed.cancel();
        });
        let closed = connection.closed.clone();
        let pending = Arc::clone(&connection.pending);
        tokio::spawn(async move {
            let mut lines = FramedRead::new(
                reader,
                BoundedLines(LinesCodec::new_with_max_length(max_line_bytes)),
            );
            loop {
                let next = tokio::select! {
                    _ = closed.cancelled() => break,
                    next = lines.next() => next,
                };
                let line = match next {
                    Some(Ok(Line::Text(line))) => line,
                    Some(Ok(Line::TooLong)) => {
                        tracing::warn!("signal: skipping an over-long line from signal-cli");
                        continue;
                    }
                    Some(Err(_)) | None => break,
                };
                let length = line.len();
                let parsed = if length > LARGE_LINE_BYTES {
                    tokio::task::spawn_blocking(move || serde_json::from_str::<Value>(&line))
                        .await
                        .ok()
                        .and_then(Result::ok)
                } else {
                    serde_json::from_str::<Value>(&line).ok()
                };
                let Some(value) = parsed else {
                    tracing::warn!("signal: skipping a line from signal-cli that is not JSON");
                    continue;
                };
                if let Some(method) = value.get("method").and_then(Value::as_str) {
                    // Only answers (a `getAttachment`'s base64) may be long; a notification
                    // keeps the ordinary bound.
                    if length > MAX_LINE_BYTES {
                        tracing::warn!(
                            "signal: skipping an over-long notification from signal-cli"
                        );
                        continue;
                    }
                    if let (Some(notifications), "receive") = (&notifications, method) {
                        let params = value.get("params").cloned().unwrap_or(Value::Null);
                        let sent = tokio::select! {
                            _ = closed.cancelled() => break,
                            sent = notifications.send(params) => sent,
                        };
                        if sent.is_err() {
                            // Nobody receives any more (shutdown after unsubscribing): the
                            // connection stays up for the last replies.
                            tracing::warn!("signal: a message arrived after receiving stopped; signal-cli has already acknowledged it to the server");
                        }
                    }
                    continue;
                }
                let Some(id) = value.get("id").and_then(Value::as_u64) else {
                    continue;
                };
                let Some(waiter) = lock(&pending).remove(&id) else {
                    continue;
                };
                let _ = waiter.send(Ok(value));
            }
            closed.cancel();
            for (_, waiter) in lock(&pending).drain() {
                let _ = waiter.send(Err(RpcError::Disconnected));
            }
        });
        Ok(connection)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    pub(crate) async fn closed(&self) {
        self.closed.cancelled().await
    }

    pub(crate) fn close(&self) {
        self.closed.cancel();
    }

    /// Calls `method` and returns its `result`.
    pub(crate) async fn call(
        &self,
        method: &'static str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, RpcError> {
        if self.is_closed() {
            return Err(RpcError::Disconnected);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        {
            let mut pending = lock(&self.pending);
            if pending.len() >= MAX_PENDING {
                return Err(RpcError::Busy);
            }
            pending.insert(id, sender);
        }
        let mut request = json!({"jsonrpc": "2.0", "id": id, "method": method});
        if !params.is_null() {
            request["params"] = params;
        }
        let forget = || {
            lock(&self.pending).remove(&id);
        };
        if self.outgoing.send(request.to_string()).await.is_err() {
            forget();
            return Err(RpcError::Disconnected);
        }
        let answer = match tokio::time::timeout(timeout, receiver).await {
            Ok(Ok(answer)) => answer?,
            Ok(Err(_)) => return Err(RpcError::Disconnected),
            Err(_) => {
                forget();
                return Err(RpcError::Timeout {
                    method,
                    seconds: timeout.as_secs(),
                });
            }
        };
        if let Some(error) = answer.get("error") {
            return Err(RpcError::Remote {
                method,
                code: error.get("code").and_then(Value::as_i64).unwrap_or(0),
                message: bounded(error.get("message").and_then(Value::as_str).unwrap_or("")),
                data: error.get("data").filter(|d| !d.is_null()).cloned(),
            });
        }
        Ok(answer.get("result").cloned().unwrap_or(Value::Null))
    }
}

impl Drop for RpcConnection {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            DaemonAddress::parse("unix:/run/s.sock").unwrap(),
            DaemonAddress::Unix("/run/s.sock".into())
        );
        assert_eq!(
            DaemonAddress::parse("/run/s.sock").unwrap(),
            DaemonAddress::Unix("/run/s.sock".into())
        );
        assert_eq!(
            DaemonAddress::parse("tcp:127.0.0.1:7583").unwrap(),
            DaemonAddress::Tcp("127.0.0.1:7583".into())
        );
        assert_eq!(
            DaemonAddress::parse("localhost:7583").unwrap(),
            DaemonAddress::Tcp("localhost:7583".into())
        );
        for bad in [
            "",
            "unix:relative",
            "tcp:host",
            "host:0",
            "a b:1",
            "tcp::80",
        ] {
            assert!(DaemonAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rate_limits_are_recognised() {
        let e = RpcError::Remote {
            method: "send",
            code: -5,
            message: "Failed to send message due to rate limiting".into(),
            data: Some(
                json!({"response": {"results": [{"type": "RATE_LIMIT_FAILURE", "retryAfterSeconds": 7}]}}),
            ),
        };
        assert_eq!(e.rate_limit(), Some(Some(7)));
        let e = RpcError::Remote {
            method: "send",
            code: -1,
            message: "Invalid number".into(),
            data: None,
        };
        assert_eq!(e.rate_limit(), None);
        assert!(RpcError::Remote {
            method: "send",
            code: -32602,
            message: "Specified account does not exist".into(),
            data: None
        }
        .is_account_problem());
    }
}
