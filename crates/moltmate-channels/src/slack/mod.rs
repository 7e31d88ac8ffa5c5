//! Slack channel: a Slack app in Socket Mode for receiving, the Web API for sending.
//!
//! # Receiving
//!
//! [`SlackChannel::run`] checks the bot token with `auth.test` (learning the bot's own user id
//! and team), asks `apps.connections.open` (app-level token) for a websocket URL, connects,
//! and reads envelopes. An `events_api` envelope carrying a direct message (`message` event,
//! `channel_type: "im"`) is handed to the gateway, and only after the gateway stored it is the
//! envelope acknowledged with `{"envelope_id": …}`: Slack redelivers unacknowledged envelopes
//! (`retry_attempt`), and the inbox deduplicates by channel and message `ts`, so a redelivery is
//! never answered twice. Bot messages, our own, edits and every other subtype are acknowledged
//! and skipped. A `disconnect` envelope (Slack refreshes connections every few hours) or any
//! error reconnects with backoff and jitter, each time with a fresh URL; `link_disabled` (Socket
//! Mode switched off for the app) and refused tokens stop the channel with an operator-readable
//! error.
//!
//! With groups enabled, an `app_mention` in a channel (or, with `mention: false`, any channel
//! message) becomes a message of the group `slack:group/<team>/<channel>`.
//!
//! # Sending
//!
//! `chat.postMessage`, in the thread the message came from (`thread_ts`), so a thread stays one
//! conversation. Text is escaped (`&`, `<`, `>`) so nothing a model writes becomes a `<!channel>`
//! ping or a link; parts of at most 3,000 characters (Slack truncates past 40,000 and
//! recommends 4,000). HTTP 429 waits `Retry-After`. Slack bots have no typing indicator in the
//! Web API, so `send_typing` does nothing.

mod api;
mod events;

pub use events::{signature as events_signature, MAX_EVENT_BODY, REPLAY_WINDOW};

use crate::retry::{deliver_until_stored, sleep_or_shutdown, Backoff};
use crate::telegram::split;
use api::{ApiError, AuthTest, WebApi, SERVICE};
use async_trait::async_trait;
use futures::{SinkExt, StreamExt};
use moltmate_core::channel::{
    group_message_text, Attachment, AttachmentKind, Channel, ChannelError, GroupPolicy,
    InboundMessage, InboundSink, OutboundFile,
};
use moltmate_core::channel_status::{ChannelHealth, ErrorClass};
use moltmate_core::{ChannelKind, Identity, PeerId, Shutdown};
use serde::Deserialize;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// The public Web API.
pub const DEFAULT_API_URL: &str = "https://slack.com/api";

/// Longest part we send, in characters before escaping.
pub const SLACK_MAX_PART_CHARS: usize = 3000;

const MAX_ENVELOPE_BYTES: usize = 1 << 20;

/// Where Slack serves private files (`url_private_download`) and takes uploads.
const SLACK_FILE_HOST: &str = "files.slack.com";

/// Files taken from one message (Slack allows ten).
const MAX_FILES: usize = 10;
const HEALTHY_CONNECTION: Duration = Duration::from_secs(60);

/// How Slack reaches the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlackMode {
    /// Socket Mode: the gateway opens a websocket to Slack (no public URL needed).
    Socket,
    /// Events API: Slack POSTs signed events to `/webhooks/slack` on the gateway's web server.
    Events,
}

/// How the Slack channel connects. `Debug` shows no token.
#[derive(Clone)]
pub struct SlackSettings {
    /// Bot token (`xoxb-…`).
    pub bot_token: String,
    /// App-level token (`xapp-…`) with `connections:write` (Socket Mode only; empty otherwise).
    pub app_token: String,
    pub mode: SlackMode,
    /// The app's signing secret (Events API only; empty otherwise): key of every request's
    /// `X-Slack-Signature`.
    pub signing_secret: String,
    pub api_url: String,
    pub groups: GroupPolicy,
    pub request_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub max_retry_after: Duration,
    pub send_attempts: u32,
    /// Socket Mode: how often we ping Slack, and how long the socket may stay silent (no
    /// frame, no pong) before it counts as dead and is replaced (a half-open connection after
    /// a router reboot would otherwise look connected forever).
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
}

impl SlackSettings {
    pub fn new(bot_token: impl Into<String>, app_token: impl Into<String>) -> Self {
        SlackSettings {
            bot_token: bot_token.into(),
            app_token: app_token.into(),
            mode: SlackMode::Socket,
            signing_secret: String::new(),
            api_url: DEFAULT_API_URL.to_string(),
            groups: GroupPolicy::default(),
            request_timeout: Duration::from_secs(15),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(300),
            send_attempts: 5,
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
        }
    }

    /// An app that receives over the Events API (HTTP) instead of Socket Mode.
    pub fn events(bot_token: impl Into<String>, signing_secret: impl Into<String>) -> Self {
        let mut settings = SlackSettings::new(bot_token, "");
        settings.mode = SlackMode::Events;
        settings.signing_secret = signing_secret.into();
        settings
    }

    pub fn with_api_url(mut self, api_url: impl Into<String>) -> Self {
        self.api_url = api_url.into();
        self
    }
}

impl fmt::Debug for SlackSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlackSettings")
            .field("bot_token", &"<redacted>")
            .field("app_token", &"<redacted>")
            .field("signing_secret", &"<redacted>")
            .field("mode", &self.mode)
            .field("api_url", &self.api_url)
            .field("groups", &self.groups)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SlackSetupError {
    #[error("the Slack bot token must look like \"xoxb-…\" (letters, digits and '-')")]
    MalformedBotToken,
    #[error("the Slack app-level token must look like \"xapp-…\" (letters, digits and '-')")]
    MalformedAppToken,
    #[error("the Slack signing secret must be 16 to 128 letters and digits")]
    MalformedSigningSecret,
    #[error("invalid Slack API URL: {reason}")]
    InvalidApiUrl { reason: String },
    #[error("could not build the HTTP client: {0}")]
    HttpClient(String),
}

#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    envelope_id: Option<String>,
    #[serde(default)]
    payload: Option<Payload>,
    #[serde(default)]
    reason: Option<String>,
}

/// An Events API payload: the body of an HTTP event request, or a Socket Mode envelope's
/// `payload`.
#[derive(Debug, Deserialize)]
struct Payload {
    /// `event_callback`, `url_verification`, `app_rate_limited`.
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    team_id: Option<String>,
    #[serde(default)]
    event: Option<Event>,
    /// Only in `url_verification`.
    #[serde(default)]
    challenge: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Event {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    subtype: Option<String>,
    #[serde(default)]
    channel_type: Option<String>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    bot_id: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    ts: Option<String>,
    #[serde(default)]
    thread_ts: Option<String>,
    #[serde(default)]
    team: Option<String>,
    /// Files shared with the message (`subtype: "file_share"`).
    #[serde(default)]
    files: Vec<SlackFile>,
}

/// A file on a message event. Nothing here is trusted: the URL must be on Slack's file host,
/// the size is checked again while downloading, the type is decided by the content.
#[derive(Debug, Deserialize)]
struct SlackFile {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    mimetype: Option<String>,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    url_private_download: Option<String>,
    #[serde(default)]
    url_private: Option<String>,
    /// `tombstone`, `hidden_by_limit`, `external`, … : nothing to download.
    #[serde(default)]
    mode: Option<String>,
}

#[derive(Debug)]
enum Disposition {
    Deliver(Box<InboundMessage>),
    Skip(&'static str),
}

enum Ended {
    Shutdown,
    Reconnect(String),
    Fatal(ChannelError),
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The Slack channel: Socket Mode, or the Events API through [`moltmate_core::webhook::Webhook`].
pub struct SlackChannel {
    settings: SlackSettings,
    api: WebApi,
    http_is_plain: bool,
    health: Arc<ChannelHealth>,
    /// Events API: the gateway's inbox, once [`Channel::run`] started.
    sink: OnceLock<Arc<dyn InboundSink>>,
    /// Events API: who the bot is (`auth.test`), once the token was checked.
    me: OnceLock<AuthTest>,
}

impl fmt::Debug for SlackChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlackChannel")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl SlackChannel {
    pub fn new(settings: SlackSettings) -> Result<Self, SlackSetupError> {
        if !token_ok(&settings.bot_token, "xoxb-") {
            return Err(SlackSetupError::MalformedBotToken);
        }
        match settings.mode {
            SlackMode::Socket if !token_ok(&settings.app_token, "xapp-") => {
                return Err(SlackSetupError::MalformedAppToken);
            }
            SlackMode::Events if !events::signing_secret_ok(&settings.signing_secret) => {
                return Err(SlackSetupError::MalformedSigningSecret);
            }
            _ => {}
        }
        let url =
            reqwest::Url::parse(&settings.api_url).map_err(|e| SlackSetupError::InvalidApiUrl {
                reason: e.to_string(),
            })?;
        if !matches!(url.scheme(), "http" | "https")
            || url.query().is_some()
            || url.password().is_some()
        {
            return Err(SlackSetupError::InvalidApiUrl {
                reason: "must be http(s) without query or password".to_string(),
            });
        }
        let http = reqwest::Client::builder()
            .connect_timeout(settings.request_timeout)
            // A redirect would carry nothing we want to follow: never the bot token elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| SlackSetupError::HttpClient(e.without_url().to_string()))?;
        let api = WebApi::new(
            http,
            &settings.api_url,
            &settings.bot_token,
            (settings.mode == SlackMode::Socket).then_some(settings.app_token.as_str()),
            settings.request_timeout,
            settings.max_retry_after,
        )
        .map_err(|_| SlackSetupError::MalformedBotToken)?;
        Ok(SlackChannel {
            http_is_plain: url.scheme() == "http",
            settings,
            api,
            health: ChannelHealth::new(ChannelKind::Slack),
            sink: OnceLock::new(),
            me: OnceLock::new(),
        })
    }

    pub fn mode(&self) -> SlackMode {
        self.settings.mode
    }

    /// Classify one event (Socket Mode and Events API alike). `team` is the payload's
    /// `team_id`, `me` the bot's own user id and team.
    fn dispose(&self, team: Option<&str>, event: Event, me: &AuthTest) -> Disposition {
        if team.is_some_and(|t| t != me.team_id) {
            // Our bot token speaks for one workspace; an event of another cannot be answered.
            return Disposition::Skip("event of another workspace");
        }
        let is_mention = event.kind == "app_mention";
        if event.kind != "message" && !is_mention {
            return Disposition::Skip("not a message");
        }
        if event.subtype.as_deref().is_some_and(|s| s != "file_share") {
            return Disposition::Skip("edit, deletion, bot or other subtype");
        }
        if event.bot_id.is_some() || event.user.as_deref() == Some(me.user_id.as_str()) {
            return Disposition::Skip("a bot's message");
        }
        let (Some(user), Some(channel), Some(ts)) = (event.user, event.channel, event.ts) else {
            return Disposition::Skip("message without user, channel or ts");
        };
        let team = event.team.as_deref().or(team).unwrap_or(&me.team_id);
        if ![team, &user, &channel].iter().all(|id| slack_id(id)) || !slack_ts(&ts) {
            return Disposition::Skip("malformed ids");
        }
        let thread = event.thread_ts.filter(|t| slack_ts(t));
        let text = event.text.unwrap_or_default();
        let direct = event.channel_type.as_deref() == Some("im");
        let (sender, text) = if direct && !is_mention {
            let Ok(peer) = PeerId::new(format!("{team}/{user}")) else {
                return Disposition::Skip("invalid peer id");
            };
            (
                Identity::new(ChannelKind::Slack, peer),
                text.trim().to_string(),
            )
        } else {
            if !self.settings.groups.enabled {
                return Disposition::Skip("channel message (groups are not enabled)");
            }
            if self.settings.groups.require_mention && !is_mention {
                return Disposition::Skip("channel message without a mention");
            }
            let stripped = text.replace(&format!("<@{}>", me.user_id), "");
            if stripped.trim().is_empty() {
                return Disposition::Skip("mention without text");
            }
            let Ok(group) = Identity::group(ChannelKind::Slack, &format!("{team}/{channel}"))
            else {
                return Disposition::Skip("invalid group id");
            };
            (group, group_message_text(&user, &stripped))
        };
        let attachments = self.attachments(&event.files);
        if text.is_empty() && attachments.is_empty() {
            return Disposition::Skip("message without text");
        }
        let chat_id = match &thread {
            Some(thread) => format!("{channel}/{thread}"),
            None => channel.clone(),
        };
        Disposition::Deliver(Box::new(InboundMessage {
            attachments,
            sender,
            chat_id,
            // The same message reaches us as `message` and `app_mention`, and again on a
            // redelivery: channel + ts names it once.
            external_id: format!("{channel}/{ts}"),
            cursor: None,
            text,
            sender_name: None,
            language_code: None,
        }))
    }

    /// The downloadable files of a message as attachments (at most [`MAX_FILES`]); a file whose
    /// URL is not on Slack's file host is left out.
    fn attachments(&self, files: &[SlackFile]) -> Vec<Attachment> {
        files
            .iter()
            .filter(|f| f.mode.as_deref().is_none_or(|m| m == "hosted"))
            .filter_map(|f| {
                let url = f
                    .url_private_download
                    .as_deref()
                    .or(f.url_private.as_deref())?;
                if !self.file_url_ok(url) {
                    tracing::warn!(
                        "slack: a file named a download URL outside Slack's file host; left out"
                    );
                    return None;
                }
                let mime = f.mimetype.as_deref().unwrap_or("");
                let kind = if mime.starts_with("image/") {
                    AttachmentKind::Photo
                } else if mime.starts_with("audio/") {
                    AttachmentKind::Audio
                } else {
                    AttachmentKind::Document
                };
                let mut attachment = Attachment::new(kind, url);
                attachment.file_name = f.name.clone();
                attachment.mime_type = f.mimetype.clone();
                attachment.size = f.size;
                Some(attachment)
            })
            .take(MAX_FILES)
            .collect()
    }

    /// Whether the bot token may be sent to `url`: `https://files.slack.com/…`, or the origin of
    /// the configured `apiUrl` (a test double, or the operator's own proxy). Nothing else, and
    /// no credentials or odd ports in the URL.
    fn file_url_ok(&self, url: &str) -> bool {
        if url.len() > 2048 {
            return false;
        }
        let Ok(url) = reqwest::Url::parse(url) else {
            return false;
        };
        if !url.username().is_empty() || url.password().is_some() {
            return false;
        }
        let slack = url.scheme() == "https"
            && url.host_str() == Some(SLACK_FILE_HOST)
            && url.port().is_none();
        let ours = reqwest::Url::parse(&self.settings.api_url)
            .is_ok_and(|api| api.origin() == url.origin() && api.host_str() != Some("slack.com"));
        slack || ours
    }

    async fn deliver(
        &self,
        sink: &dyn InboundSink,
        message: InboundMessage,
        shutdown: &Shutdown,
    ) -> bool {
        let backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        deliver_until_stored("slack", sink, message, &self.health, backoff, shutdown).await
    }

    async fn connect(&self, url: &str) -> Result<Socket, String> {
        let parsed = reqwest::Url::parse(url).map_err(|_| "invalid websocket URL".to_string())?;
        match parsed.scheme() {
            "wss" => {}
            "ws" if self.http_is_plain => {}
            _ => return Err("websocket URL is not wss".to_string()),
        }
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_ENVELOPE_BYTES))
            .max_frame_size(Some(MAX_ENVELOPE_BYTES));
        let connecting = tokio_tungstenite::connect_async_with_config(url, Some(config), false);
        match tokio::time::timeout(self.settings.request_timeout, connecting).await {
            Err(_) => Err("websocket handshake timed out".to_string()),
            // The URL carries a one-time ticket: never repeat it.
            Ok(Err(e)) => Err(self.api.scrub(&e.to_string()).replace(url, "<url>")),
            Ok(Ok((socket, _))) => Ok(socket),
        }
    }

    async fn connection(
        &self,
        mut socket: Socket,
        me: &AuthTest,
        sink: &dyn InboundSink,
        shutdown: &Shutdown,
    ) -> Ended {
        let mut ping = tokio::time::interval(self.settings.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_frame = tokio::time::Instant::now();
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = socket.close(None).await;
                    return Ended::Shutdown;
                }
                _ = ping.tick() => {
                    if last_frame.elapsed() >= self.settings.idle_timeout {
                        self.health.set_connected(false);
                        return Ended::Reconnect(format!(
                            "nothing from Slack for {} s (a dead connection)",
                            self.settings.idle_timeout.as_secs()
                        ));
                    }
                    let sent = tokio::time::timeout(
                        self.settings.request_timeout,
                        socket.send(Message::Ping(Vec::new().into())),
                    )
                    .await;
                    if !matches!(sent, Ok(Ok(()))) {
                        self.health.set_connected(false);
                        return Ended::Reconnect("could not ping Slack".into());
                    }
                    continue;
                }
                m = socket.next() => m,
            };
            last_frame = tokio::time::Instant::now();
            let text = match message {
                None => return Ended::Reconnect("connection closed".into()),
                Some(Err(e)) => return Ended::Reconnect(format!("websocket error: {e}")),
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(_))) => return Ended::Reconnect("closed by Slack".into()),
                Some(Ok(_)) => continue,
            };
            let envelope: Envelope = match serde_json::from_str(text.as_str()) {
                Ok(envelope) => envelope,
                Err(e) => {
                    tracing::warn!(error = %e, "slack: ignoring an unreadable envelope");
                    continue;
                }
            };
            match envelope.kind.as_str() {
                "hello" => {
                    self.health.set_connected(true);
                    tracing::info!(bot = %me.user_id, team = %me.team_id, "slack: connected");
                }
                "disconnect" => {
                    let reason = envelope.reason.unwrap_or_default();
                    if reason == "link_disabled" {
                        return Ended::Fatal(ChannelError::Rejected {
                            service: SERVICE,
                            status: 400,
                            detail: "Socket Mode is switched off for this Slack app (disconnect: link_disabled); turn it on under Settings → Socket Mode".into(),
                        });
                    }
                    return Ended::Reconnect(format!(
                        "Slack asked us to reconnect ({})",
                        reason
                            .chars()
                            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .take(40)
                            .collect::<String>()
                    ));
                }
                _ => {
                    let Some(envelope_id) = envelope.envelope_id else {
                        continue;
                    };
                    if envelope.kind == "events_api" {
                        self.health.event();
                        if let Some(payload) = envelope.payload {
                            if let Some(event) = payload.event {
                                match self.dispose(payload.team_id.as_deref(), event, me) {
                                    Disposition::Deliver(message) => {
                                        if !self.deliver(sink, *message, shutdown).await {
                                            return Ended::Shutdown;
                                        }
                                    }
                                    Disposition::Skip(reason) => {
                                        tracing::debug!(reason, "slack: skipping event")
                                    }
                                }
                            }
                        }
                    }
                    // Durable (or skipped) first, acknowledged second.
                    let ack = serde_json::json!({ "envelope_id": envelope_id }).to_string();
                    if let Err(e) = socket.send(Message::text(ack)).await {
                        return Ended::Reconnect(format!("acknowledging: {e}"));
                    }
                }
            }
        }
    }

    async fn send_part(
        &self,
        channel: &str,
        thread: Option<&str>,
        text: &str,
    ) -> Result<(), ChannelError> {
        let mut backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        let attempts = self.settings.send_attempts.max(1);
        let mut attempt = 1;
        loop {
            match self.api.post_message(channel, thread, text).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_send_retryable() && attempt < attempts => {
                    self.health.error(e.class());
                    let delay = e.retry_after().unwrap_or_else(|| backoff.next_delay());
                    tracing::warn!(error = %e, attempt, "slack: sending failed, retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => {
                    let e = e.into_channel_error();
                    self.health.channel_error(&e);
                    return Err(e);
                }
            }
        }
    }
}

#[async_trait]
impl Channel for SlackChannel {
    fn kind(&self) -> ChannelKind {
        ChannelKind::Slack
    }

    fn health(&self) -> Arc<ChannelHealth> {
        Arc::clone(&self.health)
    }

    async fn run(
        &self,
        sink: Arc<dyn InboundSink>,
        shutdown: Shutdown,
    ) -> Result<(), ChannelError> {
        let mut backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        let fatal = |e: ApiError| {
            tracing::error!(error = %e, "slack: giving up");
            let e = e.into_channel_error();
            self.health.set_connected(false);
            self.health.channel_error(&e);
            Err(e)
        };
        let me = loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = self.api.auth_test() => r,
            };
            match result {
                Ok(me) if slack_id(&me.user_id) && slack_id(&me.team_id) => break me,
                Ok(_) => {
                    self.health.error(ErrorClass::InvalidReply);
                    tracing::warn!("slack: auth.test returned malformed ids, retrying");
                }
                Err(e) if e.is_fatal() => return fatal(e),
                Err(e) => {
                    self.health.error(e.class());
                    tracing::warn!(error = %e, "slack: auth.test failed, retrying");
                }
            }
            if !sleep_or_shutdown(backoff.next_delay(), &shutdown).await {
                return Ok(());
            }
        };
        backoff.reset();
        if self.settings.mode == SlackMode::Events {
            // Slack pushes to the webhook; it can deliver from now on.
            let _ = self.sink.set(sink);
            let _ = self.me.set(me.clone());
            self.health.set_connected(true);
            tracing::info!(bot = %me.user_id, team = %me.team_id, "slack: ready for the Events API at /webhooks/slack");
            shutdown.cancelled().await;
            return Ok(());
        }
        loop {
            let url = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = self.api.connections_open() => r,
            };
            let started = Instant::now();
            let ended = match url {
                Err(e) if e.is_fatal() => return fatal(e),
                Err(e) => {
                    self.health.error(e.class());
                    Ended::Reconnect(e.to_string())
                }
                Ok(url) => match self.connect(&url).await {
                    Ok(socket) => self.connection(socket, &me, sink.as_ref(), &shutdown).await,
                    Err(reason) => Ended::Reconnect(format!("could not connect: {reason}")),
                },
            };
            self.health.set_connected(false);
            match ended {
                Ended::Shutdown => return Ok(()),
                Ended::Fatal(e) => {
                    tracing::error!(error = %e, "slack: giving up");
                    self.health.channel_error(&e);
                    return Err(e);
                }
                Ended::Reconnect(reason) => {
                    if started.elapsed() >= HEALTHY_CONNECTION {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        reason,
                        delay_ms = delay.as_millis() as u64,
                        "slack: reconnecting"
                    );
                    if !sleep_or_shutdown(delay, &shutdown).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn send_text(&self, chat_id: &str, text: &str) -> Result<(), ChannelError> {
        let (channel, thread) = match chat_id.split_once('/') {
            Some((channel, thread)) => (channel, Some(thread)),
            None => (chat_id, None),
        };
        if !slack_id(channel) || thread.is_some_and(|t| !slack_ts(t)) {
            return Err(ChannelError::Rejected {
                service: SERVICE,
                status: 400,
                detail: "not a Slack channel id".to_string(),
            });
        }
        for part in split::split_message(text, SLACK_MAX_PART_CHARS) {
            self.send_part(channel, thread, &escape(&part)).await?;
        }
        Ok(())
    }

    async fn send_typing(&self, _chat_id: &str) -> Result<(), ChannelError> {
        Ok(())
    }

    async fn fetch_attachment(
        &self,
        attachment: &Attachment,
        max_bytes: u64,
        timeout: Duration,
    ) -> Result<Vec<u8>, ChannelError> {
        if !self.file_url_ok(&attachment.file_ref) {
            return Err(ChannelError::Rejected {
                service: SERVICE,
                status: 400,
                detail: "the file is not on Slack's file host".to_string(),
            });
        }
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
        if let Some(size) = attachment.size.filter(|s| *s > max_bytes) {
            return Err(too_large(Some(size)));
        }
        match tokio::time::timeout(timeout, self.api.download(&attachment.file_ref, max_bytes))
            .await
        {
            Err(_) => Err(ChannelError::Unreachable {
                service: SERVICE,
                detail: format!("the download took longer than {}s", timeout.as_secs()),
            }),
            Ok(Ok(Some(bytes))) => Ok(bytes),
            Ok(Ok(None)) => Err(too_large(None)),
            Ok(Err(e)) => {
                let e = e.into_channel_error();
                self.health.channel_error(&e);
                Err(e)
            }
        }
    }

    /// `files.getUploadURLExternal`, the upload, `files.completeUploadExternal` into the
    /// conversation (and thread) the message came from.
    async fn send_file(&self, chat_id: &str, file: &OutboundFile) -> Result<(), ChannelError> {
        let (channel, thread) = match chat_id.split_once('/') {
            Some((channel, thread)) => (channel, Some(thread)),
            None => (chat_id, None),
        };
        if !slack_id(channel) || thread.is_some_and(|t| !slack_ts(t)) || file.content.is_empty() {
            return Err(ChannelError::Rejected {
                service: SERVICE,
                status: 400,
                detail: "not a Slack channel id, or an empty file".to_string(),
            });
        }
        let fail = |e: ApiError| {
            let e = e.into_channel_error();
            self.health.channel_error(&e);
            e
        };
        let (upload_url, file_id) = self
            .api
            .upload_url(&file.file_name, file.content.len())
            .await
            .map_err(fail)?;
        if !self.file_url_ok(&upload_url) {
            return Err(ChannelError::InvalidReply {
                service: SERVICE,
                detail: "files.getUploadURLExternal named an upload URL outside Slack's file host"
                    .to_string(),
            });
        }
        self.api
            .upload(&upload_url, &file.content)
            .await
            .map_err(fail)?;
        let comment = file.caption.as_deref().map(escape);
        self.api
            .complete_upload(
                &file_id,
                &file.file_name,
                channel,
                thread,
                comment.as_deref(),
            )
            .await
            .map_err(fail)
    }
}

/// Slack's three control characters, escaped as Slack requires.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Team, user and channel ids: upper-case letters and digits.
fn slack_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 32
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// Message timestamps: `1355517523.000005`.
fn slack_ts(ts: &str) -> bool {
    !ts.is_empty() && ts.len() <= 32 && ts.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

fn token_ok(token: &str, prefix: &str) -> bool {
    token.starts_with(prefix)
        && token.len() <= 300
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(groups: GroupPolicy) -> SlackChannel {
        let mut s =
            SlackSettings::new("xoxb-1-SECRET", "xapp-1-SECRET").with_api_url("http://127.0.0.1:1");
        s.groups = groups;
        SlackChannel::new(s).unwrap()
    }

    fn me() -> AuthTest {
        AuthTest {
            team_id: "T1".into(),
            user_id: "UBOT".into(),
        }
    }

    fn event(json: serde_json::Value) -> Event {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn direct_messages_become_team_slash_user_and_threads_stay_together() {
        let Disposition::Deliver(m) = channel(GroupPolicy::default()).dispose(
            Some("T1"),
            event(
                serde_json::json!({"type": "message", "channel_type": "im", "channel": "D9",
                "user": "U7", "text": " hi ", "ts": "1.000100", "thread_ts": "1.000001"}),
            ),
            &me(),
        ) else {
            panic!("must deliver")
        };
        assert_eq!(m.sender.to_string(), "slack:T1/U7");
        assert_eq!(m.chat_id, "D9/1.000001");
        assert_eq!(m.external_id, "D9/1.000100");
        assert_eq!(m.text, "hi");
    }

    #[test]
    fn bots_edits_and_channel_messages_are_skipped_unless_groups() {
        let c = channel(GroupPolicy::default());
        for json in [
            serde_json::json!({"type": "message", "channel_type": "im", "channel": "D9", "user": "U7", "text": "x", "ts": "1.1", "subtype": "message_changed"}),
            serde_json::json!({"type": "message", "channel_type": "im", "channel": "D9", "user": "U7", "text": "x", "ts": "1.1", "bot_id": "B2"}),
            serde_json::json!({"type": "message", "channel_type": "im", "channel": "D9", "user": "UBOT", "text": "x", "ts": "1.1"}),
            serde_json::json!({"type": "message", "channel_type": "im", "channel": "../x", "user": "U7", "text": "x", "ts": "1.1"}),
            serde_json::json!({"type": "app_mention", "channel": "C5", "user": "U7", "text": "<@UBOT> x", "ts": "1.1"}),
        ] {
            assert!(matches!(
                c.dispose(Some("T1"), event(json), &me()),
                Disposition::Skip(_)
            ));
        }
        let groups = channel(GroupPolicy {
            enabled: true,
            require_mention: true,
        });
        let Disposition::Deliver(m) = groups.dispose(
            Some("T1"),
            event(serde_json::json!({"type": "app_mention", "channel": "C5", "user": "U7", "text": "<@UBOT> time?", "ts": "1.1"})),
            &me(),
        ) else {
            panic!("mention in a channel with groups on")
        };
        assert_eq!(m.sender.to_string(), "slack:group/T1/C5");
        assert_eq!(m.text, "U7: time?");
    }

    #[test]
    fn shared_files_become_attachments_only_from_slacks_file_host() {
        let c = channel(GroupPolicy::default());
        let Disposition::Deliver(m) = c.dispose(
            Some("T1"),
            event(serde_json::json!({"type": "message", "subtype": "file_share",
                "channel_type": "im", "channel": "D9", "user": "U7", "text": "", "ts": "1.1",
                "files": [
                    {"id": "F1", "name": "cat.png", "mimetype": "image/png", "size": 12, "mode": "hosted",
                     "url_private_download": "https://files.slack.com/files-pri/T1-F1/download/cat.png"},
                    {"id": "F2", "name": "x.pdf", "mimetype": "application/pdf", "size": 5,
                     "url_private_download": "https://evil.example/steal"},
                    {"id": "F3", "name": "y.pdf", "url_private_download": "http://files.slack.com/y"},
                    {"id": "F4", "name": "z", "url_private_download": "https://files.slack.com.evil.example/z"},
                    {"id": "F5", "name": "w", "url_private_download": "https://u:p@files.slack.com/w"},
                    {"id": "F6", "name": "gone", "mode": "tombstone", "url_private_download": "https://files.slack.com/g"},
                    {"id": "F7", "name": "memo.m4a", "mimetype": "audio/mp4",
                     "url_private": "https://files.slack.com/files-pri/T1-F7/memo.m4a"}
                ]})),
            &me(),
        ) else {
            panic!("a file message is delivered")
        };
        let kinds: Vec<_> = m
            .attachments
            .iter()
            .map(|a| (a.kind, a.file_ref.as_str()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (
                    AttachmentKind::Photo,
                    "https://files.slack.com/files-pri/T1-F1/download/cat.png"
                ),
                (
                    AttachmentKind::Audio,
                    "https://files.slack.com/files-pri/T1-F7/memo.m4a"
                ),
            ]
        );
        assert_eq!(m.attachments[0].size, Some(12));
        // The test double's origin (the configured apiUrl) counts as Slack's; slack.com itself
        // only through files.slack.com.
        assert!(c.file_url_ok("http://127.0.0.1:1/files/F1/x"));
        assert!(!c.file_url_ok("http://127.0.0.1:2/files/F1/x"));
        let public = SlackChannel::new(SlackSettings::new("xoxb-1", "xapp-1")).unwrap();
        assert!(!public.file_url_ok("https://slack.com/files/x"));
        assert!(!public.file_url_ok("https://files.slack.com:8443/x"));
        assert!(public.file_url_ok("https://files.slack.com/files-pri/T1-F1/download/a"));
    }

    #[test]
    fn events_of_another_workspace_are_skipped() {
        let c = channel(GroupPolicy::default());
        assert!(matches!(
            c.dispose(
                Some("T9"),
                event(
                    serde_json::json!({"type": "message", "channel_type": "im", "channel": "D9",
                    "user": "U7", "text": "hi", "ts": "1.1"})
                ),
                &me(),
            ),
            Disposition::Skip("event of another workspace")
        ));
    }

    #[test]
    fn replies_are_escaped_and_chat_ids_checked() {
        assert_eq!(
            escape("<!channel> & <@U1>"),
            "&lt;!channel&gt; &amp; &lt;@U1&gt;"
        );
        assert!(slack_id("D0123ABC") && !slack_id("d1") && !slack_id("C1/../x"));
        assert!(slack_ts("1712345678.000200") && !slack_ts("1.2/x"));
        assert!(!token_ok("xoxb-a/b", "xoxb-") && !token_ok("xapp-1", "xoxb-"));
        let shown = format!("{:?}", SlackSettings::new("xoxb-SECRET", "xapp-SECRET"));
        assert!(!shown.contains("SECRET"), "{shown}");
    }
}
