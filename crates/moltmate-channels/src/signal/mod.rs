//! Signal channel: signal-cli's JSON-RPC daemon, supervised by us or run by the operator.
//!
//! # Receiving
//!
//! The channel connects to the daemon (multi-account mode; every call names the account),
//! checks the account is linked (`listAccounts`; if not, it starts a device link and shows the
//! QR code on `/admin` until the phone scans it), then calls `subscribeReceive`. With the
//! daemon in `--receive-mode=manual` (how we start it; operators running their own should do
//! the same), signal-cli fetches from the Signal server only while we are subscribed. Each
//! `receive` notification is handed to the sink in order; the next is read only once the sink
//! has stored it. Messages are deduplicated by `<sender>:<timestamp>`.
//!
//! **The window that remains:** signal-cli acknowledges a message to the Signal server as soon
//! as it has decrypted it and written the notification to our socket — not when we stored it.
//! A gateway crash (or a stop) between signal-cli's write and our inbox commit loses the
//! messages in flight on that socket (typically none or one; milliseconds). A failure to
//! *store* loses nothing: the message is retried from memory until it is stored. Messages sent
//! while the gateway (or its connection) is down stay on the Signal server, because nobody is
//! subscribed.
//!
//! # Sending
//!
//! `send` with the recipient's number, in parts of at most [`MAX_MESSAGE_UTF16`] UTF-16 units
//! (plain text; Signal shows long messages as an attachment otherwise). Rate limits
//! (code -5 or a `RATE_LIMIT_FAILURE` result) are waited out, as asked, and the part retried;
//! a timeout is not retried (the message may have gone out: at most once).
//!
//! # Files
//!
//! `dataMessage.attachments[]` (`contentType`, `filename`, `id`, `size`; `voiceNote` where a
//! signal-cli version reports it) become [`Attachment`] references (`file_ref`: the id and the
//! sender). signal-cli has already downloaded them into its data directory; the worker fetches
//! one with `getAttachment` (`{"id", "recipient"}` → `{"data": "<base64>"}`), which works for an
//! external daemon as well, and never reads signal-cli's data directory itself. The id is checked
//! (letters, digits, `.`, `_`, `-`; no `..`), the size claim and the base64 length are checked
//! before decoding, the decoded length after; the connection's line limit follows
//! `max_file_bytes`. `send_file` sends `send` with `attachments: ["data:<mime>;filename=<name>;
//! base64,<data>"]` (RFC 2397 as signal-cli reads it), so no path of the gateway's is ever named
//! to signal-cli; the MIME type is taken from the content, the name percent-encoded.

mod daemon;
mod files;
mod rpc;
mod settings;

pub use daemon::{check_signal_cli, prepare_data_dir, spawn_daemon, SignalCliMissing, SOCKET_NAME};
pub use rpc::{DaemonAddress, RpcError};
pub use settings::{is_e164, SignalDaemon, SignalSettings, DEFAULT_MAX_FILE_BYTES};

use crate::retry::{sleep_or_shutdown, Backoff};
use async_trait::async_trait;
use base64::Engine as _;
use moltmate_core::channel::{
    Accepted, Attachment, AttachmentKind, Channel, ChannelError, InboundMessage, InboundSink,
    OutboundFile,
};
use moltmate_core::channel_status::{ChannelHealth, ErrorClass, LinkState};
use moltmate_core::{ChannelKind, Identity, PeerId, Shutdown};
use rpc::RpcConnection;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Service name in errors.
const SERVICE: &str = "Signal";

/// Longest part we send, in UTF-16 units (Signal turns longer bodies into a text attachment).
pub const MAX_MESSAGE_UTF16: usize = 2000;

/// Notifications read ahead of the sink at most.
const NOTIFICATION_QUEUE: usize = 16;

/// Read receipts waiting to be sent at most (more are skipped).
const RECEIPT_QUEUE: usize = 64;

/// Stalls in a row (signal-cli not answering within the request timeout) after which a
/// supervised daemon is killed and started again.
const STALLS_BEFORE_RESTART: u32 = 2;

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionEnd {
    Shutdown,
    /// A connection dropped, the link was lost or signal-cli stopped answering: reconnect.
    Lost,
}

/// How long `finishLink` waits for the phone before a fresh code is made.
const LINK_WAIT: Duration = Duration::from_secs(120);

/// Name of the file in the data directory that records the account was linked once (so a
/// missing account later reads as "link lost", not "never linked").
const LINKED_MARKER: &str = "moltmate-linked";

/// Attachments per message we pass on.
const MAX_ATTACHMENTS: usize = 10;

/// Longest attachment id, file name and content type we keep.
const MAX_FILE_FIELD_CHARS: usize = 256;

/// Why a [`SignalChannel`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SignalSetupError {
    #[error("channels.signal.account must be a phone number in international format (+4917...)")]
    InvalidAccount,
}

/// The Signal channel.
pub struct SignalChannel {
    settings: SignalSettings,
    health: Arc<ChannelHealth>,
    connection: Mutex<Option<Arc<RpcConnection>>>,
    /// Linked at some point since start (a daemon we do not supervise has no marker file).
    ever_linked: std::sync::atomic::AtomicBool,
    /// Calls that timed out in a row (see [`SignalChannel::note_stall`]).
    stalls: std::sync::atomic::AtomicU32,
    /// Asks the supervisor to kill and restart signal-cli.
    restart: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for SignalChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalChannel")
            .field("daemon", &self.settings.daemon)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What to do with one notification.
#[derive(Debug)]
enum Disposition {
    Deliver(Box<InboundMessage>, i64),
    Skip(&'static str),
}

impl SignalChannel {
    pub fn new(settings: SignalSettings) -> Result<Self, SignalSetupError> {
        if !is_e164(&settings.account) {
            return Err(SignalSetupError::InvalidAccount);
        }
        let health = ChannelHealth::new(ChannelKind::Signal);
        health.set_link(LinkState::NotLinked);
        Ok(SignalChannel {
            settings,
            health,
            connection: Mutex::new(None),
            ever_linked: std::sync::atomic::AtomicBool::new(false),
            stalls: std::sync::atomic::AtomicU32::new(0),
            restart: Arc::new(tokio::sync::Notify::new()),
        })
    }

    fn address(&self) -> DaemonAddress {
        match &self.settings.daemon {
            SignalDaemon::Supervised { data_dir, .. } => {
                DaemonAddress::Unix(data_dir.join(SOCKET_NAME))
            }
            SignalDaemon::External(address) => address.clone(),
        }
    }

    /// signal-cli's attachments folder, for a daemon we supervise (an external daemon's
    /// operator cleans its own; see the README).
    fn attachment_files(&self) -> Option<files::AttachmentFiles> {
        match &self.settings.daemon {
            SignalDaemon::Supervised { data_dir, .. } => {
                Some(files::AttachmentFiles::new(data_dir))
            }
            SignalDaemon::External(_) => None,
        }
    }

    /// Removes signal-cli's copies of `ids` (supervised daemon only), on the blocking pool.
    async fn forget_files(&self, ids: Vec<String>) {
        if let Some(files) = self.attachment_files() {
            files.remove(ids).await;
        }
    }

    fn marker(&self) -> Option<PathBuf> {
        match &self.settings.daemon {
            SignalDaemon::Supervised { data_dir, .. } => Some(data_dir.join(LINKED_MARKER)),
            SignalDaemon::External(_) => None,
        }
    }

    fn was_linked(&self) -> bool {
        self.ever_linked.load(std::sync::atomic::Ordering::Relaxed)
            || self.marker().is_some_and(|m| m.is_file())
    }

    fn remember_linked(&self) {
        self.ever_linked
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(marker) = self.marker() {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let written = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&marker)
                .and_then(|mut f| f.write_all(b"linked\n"));
            if let Err(e) = written {
                tracing::warn!(error = %e, "signal: could not record the link");
            }
        }
    }

    fn current(&self) -> Option<Arc<RpcConnection>> {
        lock(&self.connection)
            .as_ref()
            .filter(|c| !c.is_closed())
            .cloned()
    }

    fn params(&self, extra: Value) -> Value {
        let mut params = json!({"account": self.settings.account});
        if let (Some(target), Value::Object(extra)) = (params.as_object_mut(), extra) {
            target.extend(extra);
        }
        params
    }

    /// Whether the account is among the daemon's accounts. `None`: the daemon cannot tell
    /// (single-account mode has no `listAccounts`); we then assume it is.
    async fn account_listed(&self, connection: &RpcConnection) -> Result<Option<bool>, RpcError> {
        match connection
            .call("listAccounts", Value::Null, self.settings.request_timeout)
            .await
        {
            Ok(accounts) => Ok(Some(accounts.as_array().is_some_and(|list| {
                list.iter().any(|a| {
                    a.get("number").and_then(Value::as_str) == Some(self.settings.account.as_str())
                })
            }))),
            Err(RpcError::Remote { code: -32601, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Links the account by QR code (shown on `/admin`) until it is linked or shutdown.
    /// Returns false on shutdown or a lost connection.
    async fn link(&self, connection: &RpcConnection, shutdown: &Shutdown) -> bool {
        loop {
            let linked = tokio::select! {
                _ = shutdown.cancelled() => return false,
                r = link_device(connection, &self.settings.device_name, |uri| self.health.set_link_uri(uri)) => r,
            };
            match linked {
                Ok(number) if number.as_deref() == Some(self.settings.account.as_str()) => {
                    tracing::info!("signal: linked");
                    self.remember_linked();
                    self.health.set_link(LinkState::Linked);
                    return true;
                }
                Ok(_) => {
                    tracing::error!("signal: the phone that scanned the code is not channels.signal.account; unlink that device on the phone and scan again with the right one");
                    self.health.error(ErrorClass::Credentials);
                }
                Err(RpcError::Timeout { .. }) => {
                    tracing::info!(
                        "signal: the link code was not scanned in time; showing a new one"
                    );
                }
                Err(RpcError::Disconnected) => return false,
                Err(e) => {
                    tracing::warn!(error = %e, "signal: linking failed");
                    self.health.error(ErrorClass::Rejected);
                    if !sleep_or_shutdown(Duration::from_secs(5), shutdown).await {
                        return false;
                    }
                }
            }
            if connection.is_closed() {
                return false;
            }
        }
    }

    /// Classify one `receive` notification.
    fn dispose(&self, params: &Value) -> Disposition {
        let inner = params.get("result").unwrap_or(params);
        if let Some(account) = inner.get("account").and_then(Value::as_str) {
            if account != self.settings.account {
                return Disposition::Skip("for another account");
            }
        }
        let Some(envelope) = inner.get("envelope") else {
            return Disposition::Skip("no envelope");
        };
        let Some(data) = envelope.get("dataMessage") else {
            return Disposition::Skip("not a data message (receipt, typing, sync...)");
        };
        if data.get("groupInfo").is_some_and(|g| !g.is_null())
            || data.get("groupV2").is_some_and(|g| !g.is_null())
        {
            return Disposition::Skip("group message (group chats are not enabled)");
        }
        let text = data.get("message").and_then(Value::as_str).unwrap_or("");
        let files = data
            .get("attachments")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if text.is_empty() && files.is_empty() {
            return Disposition::Skip("message without text or file (reaction, sticker...)");
        }
        let number = envelope
            .get("sourceNumber")
            .and_then(Value::as_str)
            .or_else(|| {
                envelope
                    .get("source")
                    .and_then(Value::as_str)
                    .filter(|s| s.starts_with('+'))
            })
            .filter(|n| is_e164(n));
        let uuid = envelope
            .get("sourceUuid")
            .and_then(Value::as_str)
            .filter(|u| u.len() <= 64 && u.chars().all(|c| c.is_ascii_hexdigit() || c == '-'));
        let Some(peer) = number.or(uuid) else {
            return Disposition::Skip("sender without a number or uuid");
        };
        if peer == self.settings.account {
            return Disposition::Skip("our own message");
        }
        let Some(timestamp) = envelope
            .get("timestamp")
            .and_then(Value::as_i64)
            .or_else(|| data.get("timestamp").and_then(Value::as_i64))
        else {
            return Disposition::Skip("message without timestamp");
        };
        let Ok(peer_id) = PeerId::new(peer) else {
            return Disposition::Skip("sender id is not a valid peer id");
        };
        let attachments = attachments_of(files, peer);
        if text.is_empty() && attachments.is_empty() {
            return Disposition::Skip("message without text or a file we take");
        }
        let name = envelope.get("sourceName").and_then(Value::as_str);
        Disposition::Deliver(
            Box::new(InboundMessage {
                attachments,
                sender: Identity::new(ChannelKind::Signal, peer_id),
                chat_id: peer.to_string(),
                external_id: format!("{peer}:{timestamp}"),
                cursor: None,
                text: text.to_string(),
                sender_name: crate::telegram::display_name(name, None),
                language_code: None,
            }),
            timestamp,
        )
    }

    /// Hand one message to the sink until it is stored (or refused). None on shutdown.
    async fn deliver(
        &self,
        sink: &dyn InboundSink,
        message: &InboundMessage,
        shutdown: &Shutdown,
    ) -> Option<Accepted> {
        let mut backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            match sink.accept(message.clone()).await {
                Ok(outcome) => {
                    tracing::debug!(?outcome, "signal: message accepted");
                    return Some(outcome);
                }
                Err(e) => {
                    self.health.error(ErrorClass::Storage);
                    tracing::warn!(error = %e, "signal: the gateway did not store a message, retrying it");
                    if !sleep_or_shutdown(backoff.next_delay(), shutdown).await {
                        return None;
                    }
                }
            }
        }
    }

    fn note_rpc_error(&self, error: &RpcError) {
        if error.is_account_problem() {
            self.health.set_link(LinkState::Lost);
            self.health.error(ErrorClass::LinkLost);
        } else if error.rate_limit().is_some() {
            self.health.error(ErrorClass::RateLimited);
        } else {
            self.health.error(match error {
                RpcError::Connect { .. } | RpcError::Disconnected | RpcError::Busy => {
                    ErrorClass::Unreachable
                }
                RpcError::Timeout { .. } => ErrorClass::Unreachable,
                RpcError::Remote { .. } => ErrorClass::Rejected,
            });
        }
    }

    fn channel_error(&self, error: RpcError) -> ChannelError {
        let detail = error.to_string();
        match error {
            RpcError::Connect { .. }
            | RpcError::Disconnected
            | RpcError::Busy
            | RpcError::Timeout { .. } => ChannelError::Unreachable {
                service: SERVICE,
                detail,
            },
            RpcError::Remote { .. } => match error.rate_limit() {
                Some(wait) => ChannelError::RateLimited {
                    service: SERVICE,
                    retry_after_seconds: wait.unwrap_or(0),
                },
                None => ChannelError::Rejected {
                    service: SERVICE,
                    status: if error.is_account_problem() { 401 } else { 400 },
                    detail,
                },
            },
        }
    }

    /// Connects to the daemon once, for calls only (never subscribed).
    async fn connect(
        &self,
        notifications: Option<mpsc::Sender<Value>>,
        shutdown: &Shutdown,
    ) -> Option<Result<Arc<RpcConnection>, RpcError>> {
        let address = self.address();
        tokio::select! {
            _ = shutdown.cancelled() => None,
            c = RpcConnection::connect(
                &address,
                self.settings.request_timeout,
                rpc::line_limit_for(self.settings.max_file_bytes),
                notifications,
            ) => Some(c),
        }
    }

    /// signal-cli did not answer a call in time: the daemon hangs (a JVM stall) or the
    /// connection is half-open. After [`STALLS_BEFORE_RESTART`] in a row, a daemon we supervise
    /// is killed and started again.
    fn note_stall(&self) {
        self.health.set_connected(false);
        self.health.error(ErrorClass::Unreachable);
        let stalls = self
            .stalls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if stalls >= STALLS_BEFORE_RESTART
            && matches!(self.settings.daemon, SignalDaemon::Supervised { .. })
        {
            tracing::error!("signal: signal-cli stopped answering; restarting it");
            self.stalls.store(0, std::sync::atomic::Ordering::Relaxed);
            self.restart.notify_one();
        } else {
            tracing::warn!("signal: signal-cli stopped answering; reconnecting");
        }
    }

    /// One connected session: link check, subscribe, receive until a connection drops or the
    /// daemon stops answering. Returns false on shutdown.
    ///
    /// Two connections: one subscribed that only receives, and one for every call (send,
    /// typing, receipts, link checks). A backlog of incoming messages waits in the receiving
    /// connection's socket while the sink stores them one by one; an answer behind them would
    /// wait as long, so no call ever goes over that connection once it receives.
    async fn session(
        &self,
        sink: &dyn InboundSink,
        shutdown: &Shutdown,
        backoff: &mut Backoff,
    ) -> bool {
        let calls = match self.connect(None, shutdown).await {
            None => return false,
            Some(Ok(connection)) => connection,
            Some(Err(e)) => {
                self.health.set_connected(false);
                self.note_rpc_error(&e);
                tracing::warn!(error = %e, "signal: could not connect to signal-cli, retrying");
                return sleep_or_shutdown(backoff.next_delay(), shutdown).await;
            }
        };
        match self.account_listed(&calls).await {
            Ok(Some(true)) | Ok(None) => {
                self.stalls.store(0, std::sync::atomic::Ordering::Relaxed);
                self.remember_linked();
                self.health.set_link(LinkState::Linked);
            }
            Ok(Some(false)) => {
                self.stalls.store(0, std::sync::atomic::Ordering::Relaxed);
                if self.was_linked() {
                    tracing::error!("signal: the account is no longer linked (unlinked on the phone, or signal-cli's data lost); scan the new code on /admin or run `moltmate channels signal link`");
                    self.health.set_link(LinkState::Lost);
                    self.health.error(ErrorClass::LinkLost);
                } else {
                    tracing::warn!("signal: the account is not linked yet; scan the code on /admin or run `moltmate channels signal link`");
                }
                self.health.set_connected(true);
                if !self.link(&calls, shutdown).await {
                    return !shutdown.is_cancelled();
                }
            }
            Err(e) => {
                if matches!(e, RpcError::Timeout { .. }) {
                    self.note_stall();
                } else {
                    self.note_rpc_error(&e);
                    tracing::warn!(error = %e, "signal: listAccounts failed, reconnecting");
                }
                return sleep_or_shutdown(backoff.next_delay(), shutdown).await;
            }
        }
        let (notify, notifications) = mpsc::channel(NOTIFICATION_QUEUE);
        let receiving = match self.connect(Some(notify), shutdown).await {
            None => return false,
            Some(Ok(connection)) => connection,
            Some(Err(e)) => {
                self.health.set_connected(false);
                self.note_rpc_error(&e);
                tracing::warn!(error = %e, "signal: could not connect to signal-cli, retrying");
                return sleep_or_shutdown(backoff.next_delay(), shutdown).await;
            }
        };
        let mut subscription = None;
        match receiving
            .call(
                "subscribeReceive",
                self.params(json!({})),
                self.settings.request_timeout,
            )
            .await
        {
            Ok(id) => subscription = id.as_u64(),
            Err(e) if e.is_account_problem() => {
                self.note_rpc_error(&e);
                tracing::error!(error = %e, "signal: signal-cli does not know channels.signal.account; check the number, or link it");
                return sleep_or_shutdown(backoff.next_delay(), shutdown).await;
            }
            Err(RpcError::Remote { .. }) => {
                // A daemon in automatic receive mode: notifications come anyway, but messages
                // arriving while we are away are fetched and dropped by signal-cli.
                tracing::warn!("signal: signal-cli does not run with --receive-mode=manual; messages that arrive while the gateway is down are lost");
            }
            Err(e) => {
                if matches!(e, RpcError::Timeout { .. }) {
                    self.note_stall();
                } else {
                    self.note_rpc_error(&e);
                    tracing::warn!(error = %e, "signal: subscribeReceive failed, reconnecting");
                }
                return sleep_or_shutdown(backoff.next_delay(), shutdown).await;
            }
        }
        *lock(&self.connection) = Some(Arc::clone(&calls));
        self.health.set_connected(true);
        tracing::info!("signal: connected");
        backoff.reset();
        let (receipts, receipt_queue) = mpsc::channel(RECEIPT_QUEUE);
        let ended = tokio::select! {
            ended = self.receive(&receiving, notifications, sink, shutdown, receipts) => ended,
            ended = self.watch(&calls) => ended,
            () = self.send_receipts(&calls, receipt_queue) => SessionEnd::Lost,
        };
        match ended {
            SessionEnd::Shutdown => {
                // Stop signal-cli fetching for us (what it fetched would be acknowledged and
                // then dropped); the calls connection stays for replies still being sent.
                if let Some(id) = subscription {
                    let _ = receiving
                        .call(
                            "unsubscribeReceive",
                            self.params(json!({"subscription": id})),
                            Duration::from_secs(2),
                        )
                        .await;
                }
                false
            }
            SessionEnd::Lost => {
                receiving.close();
                calls.close();
                sleep_or_shutdown(backoff.next_delay(), shutdown).await
            }
        }
    }

    /// Hands each notification of the receiving connection to the sink, in order. Never waits
    /// for a call: read receipts are queued for [`Self::send_receipts`].
    async fn receive(
        &self,
        receiving: &RpcConnection,
        mut notifications: mpsc::Receiver<Value>,
        sink: &dyn InboundSink,
        shutdown: &Shutdown,
        receipts: mpsc::Sender<(String, i64)>,
    ) -> SessionEnd {
        loop {
            let params = tokio::select! {
                _ = shutdown.cancelled() => return SessionEnd::Shutdown,
                _ = receiving.closed() => {
                    self.health.set_connected(false);
                    self.health.error(ErrorClass::Unreachable);
                    tracing::warn!("signal: lost the connection to signal-cli, reconnecting");
                    return SessionEnd::Lost;
                }
                params = notifications.recv() => params,
            };
            let Some(params) = params else {
                return SessionEnd::Lost;
            };
            let file_ids = file_ids_of(&params);
            match self.dispose(&params) {
                Disposition::Skip(reason) => {
                    tracing::debug!(reason, "signal: skipping a notification");
                    // signal-cli stored the files of skipped messages (groups, strangers...).
                    self.forget_files(file_ids).await;
                }
                Disposition::Deliver(message, timestamp) => {
                    self.health.event();
                    // Files past the per-message count are never fetched: remove them now.
                    let unused: Vec<String> = file_ids
                        .iter()
                        .filter(|id| {
                            !message
                                .attachments
                                .iter()
                                .any(|a| a.file_ref.split(' ').next() == Some(id.as_str()))
                        })
                        .cloned()
                        .collect();
                    self.forget_files(unused).await;
                    let Some(outcome) = self.deliver(sink, &message, shutdown).await else {
                        return SessionEnd::Shutdown;
                    };
                    // A receipt tells the sender the number is a live bot and spends the
                    // account's send budget: only for senders the gateway admitted.
                    let admitted = matches!(outcome, Accepted::Queued | Accepted::Duplicate);
                    if !admitted {
                        // Refused or over the queue: no turn will fetch these files.
                        self.forget_files(file_ids).await;
                    }
                    if self.settings.read_receipts
                        && admitted
                        && receipts.try_send((message.chat_id, timestamp)).is_err()
                    {
                        tracing::debug!("signal: too many read receipts waiting; skipping one");
                    }
                }
            }
        }
    }

    /// Checks the link every `link_check_interval` over the calls connection. Ends the session
    /// when the link is lost, the connection drops or signal-cli stops answering.
    async fn watch(&self, calls: &RpcConnection) -> SessionEnd {
        let mut link_check = tokio::time::interval(self.settings.link_check_interval);
        link_check.tick().await;
        loop {
            tokio::select! {
                _ = calls.closed() => {
                    self.health.set_connected(false);
                    self.health.error(ErrorClass::Unreachable);
                    tracing::warn!("signal: lost the connection to signal-cli, reconnecting");
                    return SessionEnd::Lost;
                }
                _ = link_check.tick() => {}
            }
            match self.account_listed(calls).await {
                Ok(Some(false)) => {
                    tracing::error!("signal: the account is no longer linked; scan the new code on /admin or run `moltmate channels signal link`");
                    self.health.set_link(LinkState::Lost);
                    self.health.error(ErrorClass::LinkLost);
                    return SessionEnd::Lost;
                }
                Ok(_) => {
                    self.stalls.store(0, std::sync::atomic::Ordering::Relaxed);
                }
                Err(RpcError::Timeout { .. }) => {
                    self.note_stall();
                    return SessionEnd::Lost;
                }
                Err(RpcError::Disconnected) => return SessionEnd::Lost,
                Err(e) => tracing::debug!(error = %e, "signal: link check failed"),
            }
        }
    }

    /// Sends the queued read receipts, one at a time, over the calls connection.
    async fn send_receipts(&self, calls: &RpcConnection, mut queue: mpsc::Receiver<(String, i64)>) {
        while let Some((recipient, timestamp)) = queue.recv().await {
            let receipt = self.params(json!({
                "recipient": [recipient], "targetTimestamp": [timestamp], "type": "read"
            }));
            if let Err(e) = calls
                .call("sendReceipt", receipt, self.settings.request_timeout)
                .await
            {
                tracing::debug!(error = %e, "signal: read receipt failed");
            }
        }
        // The receive loop holds the sender until the session ends.
        std::future::pending::<()>().await
    }
    async fn send_part(&self, recipient: &str, text: &str) -> Result<(), ChannelError> {
        self.send_with_retries(
            json!({"recipient": [recipient], "message": text}),
            self.settings.request_timeout,
        )
        .await
    }

    /// `send` with `extra` params, retried like a text part.
    async fn send_with_retries(&self, extra: Value, timeout: Duration) -> Result<(), ChannelError> {
        let mut backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        let attempts = self.settings.send_attempts.max(1);
        let mut attempt = 1;
        loop {
            let result = match self.current() {
                Some(connection) => {
                    connection
                        .call("send", self.params(extra.clone()), timeout)
                        .await
                }
                None => Err(RpcError::Disconnected),
            };
            let error = match result {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            self.note_rpc_error(&error);
            let retry = match &error {
                RpcError::Connect { .. } | RpcError::Disconnected | RpcError::Busy => {
                    Some(backoff.next_delay())
                }
                RpcError::Remote { .. } => error.rate_limit().map(|wait| match wait {
                    Some(seconds) => {
                        Duration::from_secs(seconds).min(self.settings.max_retry_after)
                    }
                    None => backoff.next_delay(),
                }),
                // It may have been sent: at most once.
                RpcError::Timeout { .. } => None,
            };
            match retry {
                Some(delay) if attempt < attempts => {
                    tracing::warn!(error = %error, attempt, "signal: send failed, retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                _ => return Err(self.channel_error(error)),
            }
        }
    }
}

/// Whether `id` can be an attachment id signal-cli made (`<random>.<ext>`): it is handed back
/// to signal-cli, which opens a file by it, so nothing that could name another path passes.
fn is_attachment_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && !id.contains("..")
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The ids of every file a `receive` notification names that could be a file signal-cli
/// stored (vetted like [`is_attachment_id`]), at most 64.
fn file_ids_of(params: &Value) -> Vec<String> {
    let inner = params.get("result").unwrap_or(params);
    inner
        .pointer("/envelope/dataMessage/attachments")
        .and_then(Value::as_array)
        .map(|files| {
            files
                .iter()
                .filter_map(|f| f.get("id").and_then(Value::as_str))
                .filter(|id| is_attachment_id(id))
                .take(64)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A sender's claim without control characters, at most [`MAX_FILE_FIELD_CHARS`].
fn bounded(field: Option<&str>) -> Option<String> {
    field
        .map(|f| {
            f.chars()
                .filter(|c| !c.is_control())
                .take(MAX_FILE_FIELD_CHARS)
                .collect::<String>()
        })
        .filter(|f| !f.is_empty())
}

/// The attachments of a data message as references (`file_ref`: `<id> <sender>`); ones
/// without a usable id are left out, at most [`MAX_ATTACHMENTS`].
fn attachments_of(files: &[Value], sender: &str) -> Vec<Attachment> {
    files
        .iter()
        .filter_map(|file| {
            let id = file.get("id").and_then(Value::as_str)?;
            if !is_attachment_id(id) {
                return None;
            }
            let mime = bounded(file.get("contentType").and_then(Value::as_str))
                .map(|m| m.to_ascii_lowercase());
            let essence = mime
                .as_deref()
                .map(|m| m.split(';').next().unwrap_or("").trim().to_string())
                .unwrap_or_default();
            let kind = if file.get("voiceNote").and_then(Value::as_bool) == Some(true) {
                AttachmentKind::Voice
            } else if matches!(
                essence.as_str(),
                "image/jpeg" | "image/png" | "image/gif" | "image/webp"
            ) {
                AttachmentKind::Photo
            } else if essence.starts_with("audio/") {
                AttachmentKind::Audio
            } else {
                AttachmentKind::Document
            };
            Some(Attachment {
                kind,
                file_ref: format!("{id} {sender}"),
                file_name: bounded(file.get("filename").and_then(Value::as_str)),
                mime_type: mime,
                size: file.get("size").and_then(Value::as_u64),
                duration_seconds: None,
            })
        })
        .take(MAX_ATTACHMENTS)
        .collect()
}

/// `name` percent-encoded for a data URI parameter (all but unreserved characters).
fn percent_encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The RFC 2397 data URI signal-cli takes as an attachment:
/// `data:<mime>;filename=<name>;base64,<data>`. The type comes from the content.
fn data_uri(file: &OutboundFile) -> String {
    let mime = infer::get(&file.content)
        .map(|kind| kind.mime_type())
        .unwrap_or("application/octet-stream");
    let encoded = base64::engine::general_purpose::STANDARD.encode(&file.content);
    format!(
        "data:{mime};filename={};base64,{encoded}",
        percent_encode(&file.file_name)
    )
}

/// Links a new device over `connection` (a daemon in multi-account mode): `startLink`, hand
/// the `sgnl://linkdevice` URI to `show`, then `finishLink`, which returns once the phone
/// scanned it. Returns the linked number.
pub(crate) async fn link_device(
    connection: &RpcConnection,
    device_name: &str,
    show: impl FnOnce(&str),
) -> Result<Option<String>, RpcError> {
    let started = connection
        .call("startLink", Value::Null, Duration::from_secs(30))
        .await?;
    let Some(uri) = started
        .get("deviceLinkUri")
        .and_then(Value::as_str)
        .filter(|u| u.starts_with("sgnl://") && u.len() <= 2048)
    else {
        return Err(RpcError::Remote {
            method: "startLink",
            code: 0,
            message: "no device link URI in the answer".to_string(),
            data: None,
        });
    };
    show(uri);
    let finished = connection
        .call(
            "finishLink",
            json!({"deviceLinkUri": uri, "deviceName": device_name}),
            LINK_WAIT,
        )
        .await?;
    Ok(finished
        .get("number")
        .and_then(Value::as_str)
        .map(str::to_string))
}

/// `moltmate channels signal link`: connects to the daemon at `address`, shows the code with
/// `show` and waits (up to `LINK_WAIT`) for the phone. Returns the linked number.
pub async fn link_once(
    address: &DaemonAddress,
    device_name: &str,
    show: impl FnOnce(&str),
) -> Result<Option<String>, RpcError> {
    let connection =
        RpcConnection::connect(address, Duration::from_secs(10), rpc::MAX_LINE_BYTES, None).await?;
    link_device(&connection, device_name, show).await
}

/// Records in `data_dir` that the account was linked (after `moltmate channels signal link`).
pub fn remember_linked(data_dir: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(data_dir.join(LINKED_MARKER))
        .and_then(|mut f| f.write_all(b"linked\n"))
}

#[async_trait]
impl Channel for SignalChannel {
    fn kind(&self) -> ChannelKind {
        ChannelKind::Signal
    }

    fn health(&self) -> Arc<ChannelHealth> {
        Arc::clone(&self.health)
    }

    async fn run(
        &self,
        sink: Arc<dyn InboundSink>,
        shutdown: Shutdown,
    ) -> Result<(), ChannelError> {
        let supervisor = match &self.settings.daemon {
            SignalDaemon::Supervised { cli_path, data_dir } => {
                let program = match check_signal_cli(cli_path) {
                    Ok(program) => program,
                    Err(e) => {
                        self.health.error(ErrorClass::Missing);
                        tracing::error!("signal: {e}");
                        return Err(ChannelError::Unreachable {
                            service: SERVICE,
                            detail: e.to_string(),
                        });
                    }
                };
                if let Err(e) = prepare_data_dir(data_dir) {
                    tracing::error!(error = %e, dir = %data_dir.display(), "signal: could not create signal-cli's data directory");
                    return Err(ChannelError::Unreachable {
                        service: SERVICE,
                        detail: format!("could not create signal-cli's data directory: {e}"),
                    });
                }
                tokio::spawn(files::AttachmentFiles::new(data_dir).sweep_forever(shutdown.clone()));
                Some(tokio::spawn(daemon::supervise(
                    program,
                    data_dir.clone(),
                    Arc::clone(&self.health),
                    Arc::clone(&self.restart),
                    shutdown.clone(),
                )))
            }
            SignalDaemon::External(_) => None,
        };
        let mut backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        while self.session(sink.as_ref(), &shutdown, &mut backoff).await {}
        // The supervisor keeps signal-cli up a little longer, so replies of turns finishing
        // during the shutdown grace still go out; it is not awaited.
        drop(supervisor);
        Ok(())
    }

    async fn send_text(&self, chat_id: &str, text: &str) -> Result<(), ChannelError> {
        if !(is_e164(chat_id) || PeerId::new(chat_id).is_ok()) {
            return Err(ChannelError::Rejected {
                service: SERVICE,
                status: 400,
                detail: "not a Signal recipient".to_string(),
            });
        }
        for part in crate::telegram::split::split_message(text, MAX_MESSAGE_UTF16) {
            self.send_part(chat_id, &part).await?;
        }
        Ok(())
    }

    async fn send_typing(&self, chat_id: &str) -> Result<(), ChannelError> {
        let Some(connection) = self.current() else {
            return Err(ChannelError::Unreachable {
                service: SERVICE,
                detail: "not connected to signal-cli".to_string(),
            });
        };
        connection
            .call(
                "sendTyping",
                self.params(json!({"recipient": [chat_id]})),
                self.settings.request_timeout,
            )
            .await
            .map(|_| ())
            .map_err(|e| self.channel_error(e))
    }

    async fn fetch_attachment(
        &self,
        attachment: &Attachment,
        max_bytes: u64,
        timeout: Duration,
    ) -> Result<Vec<u8>, ChannelError> {
        let max_bytes = max_bytes.min(self.settings.max_file_bytes);
        let refused = || ChannelError::Rejected {
            service: SERVICE,
            status: 400,
            detail: "not a Signal attachment reference".to_string(),
        };
        let (id, sender) = attachment.file_ref.split_once(' ').ok_or_else(refused)?;
        if !is_attachment_id(id) || !(is_e164(sender) || PeerId::new(sender).is_ok()) {
            return Err(refused());
        }
        let result = self
            .fetch_vetted(id, sender, attachment.size, max_bytes, timeout)
            .await;
        // Fetched or refused: signal-cli's own copy is of no further use.
        self.forget_files(vec![id.to_string()]).await;
        result
    }

    async fn send_file(&self, chat_id: &str, file: &OutboundFile) -> Result<(), ChannelError> {
        if !(is_e164(chat_id) || PeerId::new(chat_id).is_ok()) {
            return Err(ChannelError::Rejected {
                service: SERVICE,
                status: 400,
                detail: "not a Signal recipient".to_string(),
            });
        }
        let max = self.settings.max_file_bytes;
        if file.content.len() as u64 > max {
            return Err(ChannelError::Rejected {
                service: SERVICE,
                status: 413,
                detail: format!(
                    "the file has {} bytes, more than the {max} this server sends over Signal",
                    file.content.len()
                ),
            });
        }
        let owned = file.clone();
        let uri = tokio::task::spawn_blocking(move || data_uri(&owned))
            .await
            .map_err(|_| ChannelError::InvalidReply {
                service: SERVICE,
                detail: "encoding the file failed".to_string(),
            })?;
        let mut params = json!({"recipient": [chat_id], "attachments": [uri]});
        if let Some(caption) = file.caption.as_deref().filter(|c| !c.is_empty()) {
            let mut units = 0;
            let caption: String = caption
                .chars()
                .take_while(|c| {
                    units += c.len_utf16();
                    units <= MAX_MESSAGE_UTF16
                })
                .collect();
            params["message"] = json!(caption);
        }
        // An upload takes longer than a text: six seconds per MiB on top.
        let extra = Duration::from_secs(6 * (file.content.len() as u64 >> 20).max(1));
        self.send_with_retries(params, self.settings.request_timeout + extra)
            .await
    }
}

impl SignalChannel {
    /// `getAttachment` of a vetted id; the caller removes signal-cli's copy afterwards.
    async fn fetch_vetted(
        &self,
        id: &str,
        sender: &str,
        size: Option<u64>,
        max_bytes: u64,
        timeout: Duration,
    ) -> Result<Vec<u8>, ChannelError> {
        let too_large = |size: Option<u64>| ChannelError::Rejected {
            service: SERVICE,
            status: 413,
            detail: match size {
                Some(size) => {
                    format!("the file has {size} bytes, more than the limit of {max_bytes}")
                }
                None => format!("the file is larger than the limit of {max_bytes} bytes"),
            },
        };
        if let Some(size) = size.filter(|s| *s > max_bytes) {
            return Err(too_large(Some(size)));
        }
        let Some(connection) = self.current() else {
            return Err(ChannelError::Unreachable {
                service: SERVICE,
                detail: "not connected to signal-cli".to_string(),
            });
        };
        let mut answer = connection
            .call(
                "getAttachment",
                self.params(json!({"id": id, "recipient": sender})),
                timeout,
            )
            .await
            .map_err(|e| self.channel_error(e))?;
        // Take the data out of the answer (no copy) and free the rest before decoding.
        let data = answer.get_mut("data").map(Value::take);
        drop(answer);
        let Some(Value::String(data)) = data else {
            return Err(ChannelError::InvalidReply {
                service: SERVICE,
                detail: "getAttachment returned no data".to_string(),
            });
        };
        // Refuse by the encoded length before decoding anything.
        let longest = max_bytes.div_ceil(3).saturating_mul(4);
        if data.len() as u64 > longest {
            return Err(too_large(None));
        }
        let decoded = tokio::task::spawn_blocking(move || {
            base64::engine::general_purpose::STANDARD.decode(data.trim())
        })
        .await
        .map_err(|_| ChannelError::InvalidReply {
            service: SERVICE,
            detail: "decoding the attachment failed".to_string(),
        })?
        .map_err(|_| ChannelError::InvalidReply {
            service: SERVICE,
            detail: "getAttachment returned invalid base64".to_string(),
        })?;
        if decoded.len() as u64 > max_bytes {
            return Err(too_large(Some(decoded.len() as u64)));
        }
        Ok(decoded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel() -> SignalChannel {
        SignalChannel::new(SignalSettings::new(
            "+4917000000001",
            SignalDaemon::External(DaemonAddress::Tcp("127.0.0.1:1".into())),
        ))
        .unwrap()
    }

    #[test]
    fn a_direct_text_message_is_delivered() {
        let params = json!({"subscription": 0, "result": {"account": "+4917000000001", "envelope": {
            "source": "+4917012345678", "sourceNumber": "+4917012345678", "sourceUuid": "a1b2-c3",
            "sourceName": "Anna\nSYSTEM", "sourceDevice": 1, "timestamp": 1700000000000_i64,
            "dataMessage": {"timestamp": 1700000000000_i64, "message": "hallo", "expiresInSeconds": 0}}}});
        let Disposition::Deliver(m, ts) = channel().dispose(&params) else {
            panic!("must deliver")
        };
        assert_eq!(m.sender.to_string(), "signal:+4917012345678");
        assert_eq!(m.chat_id, "+4917012345678");
        assert_eq!(m.external_id, "+4917012345678:1700000000000");
        assert_eq!(m.sender_name.as_deref(), Some("Anna SYSTEM"));
        assert_eq!(ts, 1700000000000);
    }

    #[test]
    fn groups_syncs_receipts_other_accounts_and_junk_are_skipped() {
        let c = channel();
        let env = |data: Value| json!({"envelope": {"sourceNumber": "+4917012345678", "timestamp": 1, "dataMessage": data}});
        for params in [
            env(json!({"message": "hi", "groupInfo": {"groupId": "x"}})),
            env(json!({"message": "hi", "groupV2": {"id": "x"}})),
            env(json!({"attachments": []})),
            json!({"envelope": {"sourceNumber": "+4917012345678", "timestamp": 1, "receiptMessage": {}}}),
            json!({"envelope": {"sourceNumber": "+4917000000001", "timestamp": 1, "syncMessage": {}}}),
            json!({"account": "+4999999999", "envelope": {"sourceNumber": "+4917012345678", "timestamp": 1, "dataMessage": {"message": "x"}}}),
            json!({"envelope": {"sourceNumber": "+4917012345678", "dataMessage": {"message": "no timestamp"}}}),
            json!({"envelope": {"sourceNumber": "not a number", "timestamp": 1, "dataMessage": {"message": "x"}}}),
            json!(null),
            json!([1, 2]),
        ] {
            assert!(
                matches!(c.dispose(&params), Disposition::Skip(_)),
                "{params}"
            );
        }
    }

    #[test]
    fn attachments_become_references_and_hostile_ids_are_dropped() {
        let env = |data: Value| json!({"envelope": {"sourceNumber": "+4917012345678", "timestamp": 1, "dataMessage": data}});
        let params = env(json!({"attachments": [
            {"contentType": "image/jpeg", "filename": "IMG_1.jpg", "id": "AbC123.jpg", "size": 2048, "width": 10, "height": 10},
            {"contentType": "audio/aac", "filename": null, "id": "voice-1.aac", "size": 900, "voiceNote": true},
            {"contentType": "audio/mpeg", "id": "song.mp3"},
            {"contentType": "application/pdf", "filename": "Brief\n../../x.pdf", "id": "Doc_1.pdf"},
            {"contentType": "image/png", "id": "../../../etc/passwd"},
            {"contentType": "image/png", "id": "a/b"},
            {"contentType": "image/png", "id": ".hidden"},
            {"contentType": "image/png", "id": "x y"},
            {"contentType": "image/png", "id": ""},
            {"contentType": "image/png"},
            {"contentType": "image/png", "id": 7},
        ]}));
        let Disposition::Deliver(m, _) = channel().dispose(&params) else {
            panic!("files without text are delivered")
        };
        assert_eq!(m.text, "");
        let kinds: Vec<_> = m.attachments.iter().map(|a| a.kind).collect();
        assert_eq!(
            kinds,
            vec![
                AttachmentKind::Photo,
                AttachmentKind::Voice,
                AttachmentKind::Audio,
                AttachmentKind::Document
            ]
        );
        assert_eq!(m.attachments[0].file_ref, "AbC123.jpg +4917012345678");
        assert_eq!(m.attachments[0].size, Some(2048));
        assert_eq!(
            m.attachments[3].file_name.as_deref(),
            Some("Brief../../x.pdf")
        );
        // Only hostile ids: nothing to deliver.
        let only_bad = env(json!({"attachments": [{"id": "../x"}]}));
        assert!(matches!(channel().dispose(&only_bad), Disposition::Skip(_)));
        // Attachments in a group are skipped with the group.
        let group = env(
            json!({"groupInfo": {"groupId": "x"}, "attachments": [{"id": "a.jpg", "contentType": "image/jpeg"}]}),
        );
        assert!(matches!(channel().dispose(&group), Disposition::Skip(_)));
    }

    #[test]
    fn files_go_out_as_data_uris_with_an_encoded_name_and_the_type_of_the_content() {
        let png = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0, 0];
        let uri = data_uri(&OutboundFile {
            file_name: "a b;base64,x=y%.png".to_string(),
            content: png.to_vec(),
            caption: None,
        });
        assert_eq!(
            uri,
            format!(
                "data:image/png;filename=a%20b%3Bbase64%2Cx%3Dy%25.png;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(png)
            )
        );
        let text = data_uri(&OutboundFile {
            file_name: "r.txt".to_string(),
            content: b"hi".to_vec(),
            caption: None,
        });
        assert!(text.starts_with("data:application/octet-stream;filename=r.txt;base64,aGk="));
    }

    #[test]
    fn the_line_limit_lets_the_largest_attachment_through() {
        assert_eq!(rpc::line_limit_for(0), rpc::MAX_LINE_BYTES);
        let limit = rpc::line_limit_for(20 << 20);
        assert!(limit as u64 > (20u64 << 20) * 4 / 3 && limit < 28 << 20);
        assert_eq!(rpc::line_limit_for(u64::MAX), usize::MAX);
    }

    #[test]
    fn signal_files_of_skipped_messages_are_named_for_removal() {
        let group = json!({"envelope": {"sourceNumber": "+4917012345678", "timestamp": 1,
            "dataMessage": {"groupInfo": {"groupId": "x"},
                "attachments": [{"id": "a.jpg"}, {"id": "../etc"}, {"id": "b.pdf"}]}}});
        assert_eq!(file_ids_of(&group), vec!["a.jpg", "b.pdf"]);
        let many: Vec<Value> = (0..100)
            .map(|i| json!({"id": format!("f{i}.bin")}))
            .collect();
        let flood = json!({"envelope": {"dataMessage": {"attachments": many}}});
        assert_eq!(file_ids_of(&flood).len(), 64);
    }

    #[test]
    fn the_account_must_be_e164() {
        assert!(SignalChannel::new(SignalSettings::new(
            "017012345",
            SignalDaemon::External(DaemonAddress::Tcp("127.0.0.1:1".into()))
        ))
        .is_err());
    }
}
