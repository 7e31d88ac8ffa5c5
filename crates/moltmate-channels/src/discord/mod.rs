//! Discord channel: a bot on the Discord Gateway (websocket) for receiving, REST for sending.
//!
//! # Receiving
//!
//! [`DiscordChannel::run`] asks `GET /gateway/bot` for the websocket URL (which also checks the
//! token: a refused token stops the channel with an error naming the config key), connects,
//! waits for Hello, identifies with the fewest intents that work (`DIRECT_MESSAGES`; plus
//! `GUILD_MESSAGES` when groups are enabled; plus the privileged `MESSAGE_CONTENT` only when
//! groups answer without a mention — Discord delivers the content of DMs and of messages that
//! mention the bot without it), heartbeats at the server's interval (the first beat after a
//! random fraction of it), and treats a beat without an ACK before the next one as a dead
//! connection. After any disconnect it resumes (session id + last sequence number, at the
//! `resume_gateway_url`), so Discord replays what it has buffered; when the session cannot be
//! resumed (invalid session, close codes 4007/4009) it identifies anew. Reconnects back off
//! exponentially with jitter; close codes that mean the configuration is wrong (4004 bad token,
//! 4013/4014 intents) stop the channel with an operator-readable error.
//!
//! # Durable before acknowledged
//!
//! Discord has no acknowledgement. The sequence number we resume from is the closest thing:
//! it moves past a message only after the gateway stored it, so a disconnect while storing
//! replays it on resume. Messages are deduplicated by their Discord message id (the inbox's
//! external id), so a replay is never answered twice. What remains: messages sent while the
//! gateway process is down, or while disconnected longer than Discord keeps the session, are
//! not redelivered and are lost (the sender sees no answer).
//!
//! # Sending
//!
//! `POST /channels/{id}/messages`, split at 2000 characters, with `allowed_mentions` empty (no
//! `@everyone` from a model). Discord renders Markdown, which is what models write. A 429 waits
//! `retry_after` (a global limit holds every request back), server and connection errors back
//! off; each part is attempted `send_attempts` times. Files (`send_file`) go the same way as
//! multipart/form-data (`payload_json` + `files[0]`), at most `max_upload_bytes` (10 MiB).
//!
//! # Files users send
//!
//! A MESSAGE_CREATE's `attachments[]` become [`Attachment`] references whose `file_ref` is the
//! attachment's CDN URL (photos by an `image/*` type a vision model takes, voice messages by
//! flag `IS_VOICE_MESSAGE`, audio by type, everything else a document). The URL is input: it is
//! fetched only when it is `https` on Discord's own CDN hosts ([`CDN_HOSTS`]; against a local
//! plain-HTTP test double, only that double's own origin), with no credentials in it, through
//! a client that sends no `Authorization` (the bot token never goes to the CDN) and follows a
//! redirect only to those same hosts; bounded in bytes (the size claim first, then while
//! streaming) and in time.

mod rest;
mod settings;
mod wire;

pub use settings::{DiscordSettings, DEFAULT_API_URL, DEFAULT_MAX_UPLOAD_BYTES};

use crate::retry::{deliver_until_stored, sleep_or_shutdown, Backoff};
use crate::telegram::{display_name, split};
use async_trait::async_trait;
use futures::{SinkExt, StreamExt};
use moltmate_core::channel::{
    group_message_text, Attachment, AttachmentKind, Channel, ChannelError, InboundMessage,
    InboundSink, OutboundFile,
};
use moltmate_core::channel_status::{ChannelHealth, ErrorClass};
use moltmate_core::{ChannelKind, Identity, PeerId, Shutdown};
use rand::Rng;
use rest::{Rest, RestError, SERVICE};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use wire::{op, Frame, MessageCreate};

/// Discord's message length limit (characters; we count UTF-16 units, which is never fewer).
pub const DISCORD_MAX_MESSAGE_CHARS: usize = 2000;

/// Largest gateway message we accept. READY of a bot in a few servers is a few KiB.
const MAX_GATEWAY_MESSAGE_BYTES: usize = 4 << 20;

/// How long we wait for Hello after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(20);

/// Discord allows one Identify per 5 seconds.
const IDENTIFY_SPACING: Duration = Duration::from_secs(5);

/// A connection that lasted this long was healthy: the next reconnect starts the backoff anew.
const HEALTHY_CONNECTION: Duration = Duration::from_secs(60);

/// The hosts Discord serves attachments from. Nothing else is ever fetched.
pub const CDN_HOSTS: [&str; 2] = ["cdn.discordapp.com", "media.discordapp.net"];

/// Attachments per message we pass on (Discord allows 10).
const MAX_ATTACHMENTS: usize = 10;

/// Longest attachment URL we keep (Discord's signed CDN URLs are ~250 characters).
const MAX_URL_CHARS: usize = 2048;

/// Longest file name and content type we keep.
const MAX_FILE_FIELD_CHARS: usize = 256;

/// Redirects followed on the CDN at most (each to a CDN host again).
const MAX_CDN_REDIRECTS: usize = 3;

/// An origin attachments may be fetched from: scheme, host, port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

impl Origin {
    fn allows(&self, url: &reqwest::Url) -> bool {
        url.scheme() == self.scheme
            && url
                .host_str()
                .is_some_and(|h| h.eq_ignore_ascii_case(&self.host))
            && url.port_or_known_default() == self.port
            && url.username().is_empty()
            && url.password().is_none()
    }
}

/// Where attachments may come from: Discord's CDN over https; when the API itself is a local
/// plain-HTTP double, that double's origin instead (so tests never leave the machine).
fn cdn_origins(api: &reqwest::Url) -> Vec<Origin> {
    if api.scheme() == "http" {
        return api
            .host_str()
            .map(|host| Origin {
                scheme: "http".to_string(),
                host: host.to_string(),
                port: api.port_or_known_default(),
            })
            .into_iter()
            .collect();
    }
    CDN_HOSTS
        .iter()
        .map(|host| Origin {
            scheme: "https".to_string(),
            host: host.to_string(),
            port: Some(443),
        })
        .collect()
}

/// Why a [`DiscordChannel`] could not be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum DiscordSetupError {
    #[error("the Discord bot token is empty")]
    EmptyToken,
    #[error(
        "the Discord bot token has an invalid format (expected letters, digits, '.', '_' or '-')"
    )]
    MalformedToken,
    #[error("invalid Discord API URL: {reason}")]
    InvalidApiUrl { reason: String },
    #[error("could not build the HTTP client: {0}")]
    HttpClient(String),
}

/// What to do with one MESSAGE_CREATE.
#[derive(Debug)]
enum Disposition {
    Deliver(Box<InboundMessage>),
    Skip(&'static str),
}

/// How a connection ended.
#[derive(Debug)]
enum Ended {
    Shutdown,
    /// Reconnect; resume the session if `resume`.
    Reconnect {
        resume: bool,
        reason: String,
    },
    /// The configuration is wrong; stop the channel.
    Fatal(ChannelError),
}

/// The resumable session.
#[derive(Debug, Clone)]
struct Session {
    id: String,
    resume_url: Option<String>,
    /// Sequence number of the last event handled (stored, or skipped).
    seq: Option<i64>,
}

/// The Discord channel. Cheap to share behind an `Arc`; `run` and the send methods may be used
/// concurrently.
#[derive(Debug)]
pub struct DiscordChannel {
    settings: DiscordSettings,
    rest: Rest,
    http_is_plain: bool,
    health: Arc<ChannelHealth>,
    /// Client for attachment downloads: no credentials, redirects only to `cdn`.
    cdn_http: reqwest::Client,
    cdn: Arc<Vec<Origin>>,
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl DiscordChannel {
    /// Validate the settings and build the HTTP client. Does no I/O.
    pub fn new(settings: DiscordSettings) -> Result<Self, DiscordSetupError> {
        validate_token(&settings.bot_token)?;
        let url = reqwest::Url::parse(&settings.api_url).map_err(|e| {
            DiscordSetupError::InvalidApiUrl {
                reason: e.to_string(),
            }
        })?;
        if url.scheme() != "https" && url.scheme() != "http" {
            return Err(DiscordSetupError::InvalidApiUrl {
                reason: "scheme must be http or https".to_string(),
            });
        }
        if url.query().is_some() || url.fragment().is_some() || url.password().is_some() {
            return Err(DiscordSetupError::InvalidApiUrl {
                reason: "must not contain a query, fragment or password".to_string(),
            });
        }
        let http = reqwest::Client::builder()
            .connect_timeout(settings.request_timeout)
            .build()
            .map_err(|e| DiscordSetupError::HttpClient(e.without_url().to_string()))?;
        let cdn = Arc::new(cdn_origins(&url));
        let allowed = Arc::clone(&cdn);
        let cdn_http = reqwest::Client::builder()
            .connect_timeout(settings.request_timeout)
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() > MAX_CDN_REDIRECTS {
                    attempt.error("too many redirects")
                } else if allowed.iter().any(|o| o.allows(attempt.url())) {
                    attempt.follow()
                } else {
                    attempt.stop()
                }
            }))
            .build()
            .map_err(|e| DiscordSetupError::HttpClient(e.without_url().to_string()))?;
        let rest = Rest::new(
            http,
            &settings.api_url,
            &settings.bot_token,
            settings.request_timeout,
            settings.max_retry_after,
        )
        .map_err(|_| DiscordSetupError::MalformedToken)?;
        Ok(DiscordChannel {
            http_is_plain: url.scheme() == "http",
            settings,
            rest,
            health: ChannelHealth::new(ChannelKind::Discord),
            cdn_http,
            cdn,
        })
    }

    /// The attachment URL, if it may be fetched: on an allowed CDN origin, no credentials.
    fn cdn_url(&self, raw: &str) -> Result<reqwest::Url, ChannelError> {
        let refused = |why: &str| ChannelError::Rejected {
            service: SERVICE,
            status: 400,
            detail: format!("attachment URL refused: {why}"),
        };
        if raw.len() > MAX_URL_CHARS {
            return Err(refused("too long"));
        }
        let url = reqwest::Url::parse(raw).map_err(|_| refused("not a URL"))?;
        if !self.cdn.iter().any(|origin| origin.allows(&url)) {
            return Err(refused("not on Discord's CDN"));
        }
        Ok(url)
    }

    /// The attachments of a message as references (at most [`MAX_ATTACHMENTS`]); odd ones
    /// (no id, no URL, unparsable) are left out.
    fn attachments_of(message: &MessageCreate) -> Vec<Attachment> {
        let voice = message.flags & wire::IS_VOICE_MESSAGE != 0;
        message
            .attachments
            .iter()
            .filter_map(|raw| serde_json::from_value::<wire::Attachment>(raw.clone()).ok())
            .filter(|a| is_snowflake(&a.id) && !a.url.is_empty() && a.url.len() <= MAX_URL_CHARS)
            .take(MAX_ATTACHMENTS)
            .map(|a| {
                let mime = bounded(a.content_type.as_deref()).map(|m| m.to_ascii_lowercase());
                let essence = mime
                    .as_deref()
                    .map(|m| m.split(';').next().unwrap_or("").trim().to_string())
                    .unwrap_or_default();
                let kind = if voice {
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
                Attachment {
                    kind,
                    file_ref: a.url,
                    file_name: bounded(a.filename.as_deref()),
                    mime_type: mime,
                    size: a.size,
                    duration_seconds: a
                        .duration_secs
                        .filter(|d| d.is_finite() && *d >= 0.0)
                        .map(|d| d.min(1e9).ceil() as u64),
                }
            })
            .collect()
    }

    /// GET an attachment from the CDN without credentials, at most `max_bytes`.
    async fn download(&self, url: reqwest::Url, max_bytes: u64) -> Result<Vec<u8>, ChannelError> {
        let too_large = || ChannelError::Rejected {
            service: SERVICE,
            status: 413,
            detail: format!("the file is larger than the limit of {max_bytes} bytes"),
        };
        let transport = |e: reqwest::Error| ChannelError::Unreachable {
            service: SERVICE,
            detail: rest::scrub(&e.without_url().to_string(), &self.settings.bot_token),
        };
        let mut response = self.cdn_http.get(url).send().await.map_err(transport)?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let detail = format!("attachment download failed (HTTP {status})");
            return Err(match status {
                500..=599 => ChannelError::Server {
                    service: SERVICE,
                    status,
                    detail,
                },
                _ => ChannelError::Rejected {
                    service: SERVICE,
                    status,
                    detail,
                },
            });
        }
        if response.content_length().is_some_and(|l| l > max_bytes) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if (body.len() + chunk.len()) as u64 > max_bytes {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Check the token against Discord once (`GET /gateway/bot`).
    pub async fn verify(&self) -> Result<(), ChannelError> {
        self.rest
            .gateway_bot()
            .await
            .map(|_| ())
            .map_err(RestError::into_channel_error)
    }

    /// The intents to identify with: only what the configuration needs.
    fn intents(&self) -> u64 {
        let mut intents = wire::intents::DIRECT_MESSAGES;
        if self.settings.groups.enabled {
            intents |= wire::intents::GUILD_MESSAGES;
            if !self.settings.groups.require_mention {
                intents |= wire::intents::MESSAGE_CONTENT;
            }
        }
        intents
    }

    /// The websocket URL to connect to (with `v=10&encoding=json`). A `ws://` URL is only
    /// accepted when the API itself is plain HTTP (a local test double).
    fn gateway_url(&self, base: &str) -> Result<String, String> {
        let mut url = reqwest::Url::parse(base).map_err(|e| format!("invalid gateway URL: {e}"))?;
        match url.scheme() {
            "wss" => {}
            "ws" if self.http_is_plain => {}
            other => return Err(format!("gateway URL has scheme {other:?}, expected wss")),
        }
        url.set_query(Some("v=10&encoding=json"));
        Ok(url.to_string())
    }

    /// `GET /gateway/bot` until it works, the token is refused, or shutdown.
    async fn fetch_gateway_url(
        &self,
        backoff: &mut Backoff,
        shutdown: &Shutdown,
    ) -> Result<Option<String>, ChannelError> {
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                r = self.rest.gateway_bot() => r,
            };
            match result {
                Ok(bot) => match self.gateway_url(&bot.url) {
                    Ok(url) => return Ok(Some(url)),
                    Err(reason) => {
                        tracing::warn!(reason, "discord: unusable gateway URL, retrying");
                    }
                },
                Err(e) if e.is_fatal() => {
                    tracing::error!(error = %e, "discord: giving up");
                    return Err(e.into_channel_error());
                }
                Err(e) => {
                    self.health.error(e.class());
                    tracing::warn!(error = %e, "discord: GET /gateway/bot failed, retrying")
                }
            }
            if !sleep_or_shutdown(backoff.next_delay(), shutdown).await {
                return Ok(None);
            }
        }
    }

    async fn connect(&self, url: &str) -> Result<Socket, String> {
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_GATEWAY_MESSAGE_BYTES))
            .max_frame_size(Some(MAX_GATEWAY_MESSAGE_BYTES));
        let connecting = tokio_tungstenite::connect_async_with_config(url, Some(config), false);
        match tokio::time::timeout(self.settings.request_timeout, connecting).await {
            Err(_) => Err("websocket handshake timed out".to_string()),
            Ok(Err(e)) => Err(rest::scrub(&e.to_string(), &self.settings.bot_token)),
            Ok(Ok((socket, _response))) => Ok(socket),
        }
    }

    /// Classify one MESSAGE_CREATE. `me` is the bot's own user id (from READY).
    fn dispose(&self, message: MessageCreate, me: Option<&str>) -> Disposition {
        if message.author.bot || message.webhook_id.is_some() {
            return Disposition::Skip("message from a bot or webhook");
        }
        if me.is_some_and(|me| me == message.author.id) {
            return Disposition::Skip("our own message");
        }
        // 0 = default, 19 = reply; everything else is a system message (joins, pins, calls).
        if message.kind != 0 && message.kind != 19 {
            return Disposition::Skip("system message");
        }
        if !is_snowflake(&message.id) || !is_snowflake(&message.channel_id) {
            return Disposition::Skip("malformed ids");
        }
        let Ok(author) = PeerId::new(message.author.id.clone()) else {
            return Disposition::Skip("author id is not a valid peer id");
        };
        if !is_snowflake(author.as_str()) {
            return Disposition::Skip("author id is not a snowflake");
        }
        let name = display_name(
            message
                .author
                .global_name
                .as_deref()
                .or(message.author.username.as_deref()),
            None,
        );
        let attachments = Self::attachments_of(&message);
        let (sender, text, sender_name) = match &message.guild_id {
            None => (
                Identity::new(ChannelKind::Discord, author),
                message.content.trim().to_string(),
                name,
            ),
            Some(_) if !self.settings.groups.enabled => {
                return Disposition::Skip("server message (groups are not enabled)")
            }
            Some(_) => {
                let mentioned = me.is_some_and(|me| {
                    message.mentions.iter().any(|u| u.id == me)
                        || message.content.contains(&format!("<@{me}>"))
                        || message.content.contains(&format!("<@!{me}>"))
                });
                if self.settings.groups.require_mention && !mentioned {
                    return Disposition::Skip("server message without a mention");
                }
                let mut content = message.content.clone();
                if let Some(me) = me {
                    content = content
                        .replace(&format!("<@{me}>"), "")
                        .replace(&format!("<@!{me}>"), "");
                }
                let Ok(group) = Identity::group(ChannelKind::Discord, &message.channel_id) else {
                    return Disposition::Skip("channel id is not a valid peer id");
                };
                let speaker = name.unwrap_or_else(|| format!("user {}", message.author.id));
                if content.trim().is_empty() && attachments.is_empty() {
                    return Disposition::Skip("mention without text");
                }
                (group, group_message_text(&speaker, &content), None)
            }
        };
        if text.is_empty() && attachments.is_empty() {
            return Disposition::Skip("message without text or file (sticker, embed...)");
        }
        Disposition::Deliver(Box::new(InboundMessage {
            attachments,
            sender,
            chat_id: message.channel_id,
            external_id: message.id,
            cursor: None,
            text,
            sender_name,
            language_code: None,
        }))
    }

    /// Hand one message to the sink until it is stored. False on shutdown.
    async fn deliver(
        &self,
        sink: &dyn InboundSink,
        message: InboundMessage,
        shutdown: &Shutdown,
    ) -> bool {
        let backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        deliver_until_stored("discord", sink, message, &self.health, backoff, shutdown).await
    }

    /// One websocket connection, from Hello to its end.
    async fn connection(
        &self,
        mut socket: Socket,
        session: &mut Option<Session>,
        me: &mut Option<String>,
        last_identify: &mut Option<Instant>,
        sink: &dyn InboundSink,
        shutdown: &Shutdown,
    ) -> Ended {
        // Hello.
        let hello = tokio::select! {
            _ = shutdown.cancelled() => return Ended::Shutdown,
            r = tokio::time::timeout(HELLO_TIMEOUT, next_frame(&mut socket)) => r,
        };
        let interval = match hello {
            Err(_) => return reconnect(true, "no Hello within 20 s"),
            Ok(Err(end)) => return end,
            Ok(Ok(frame)) if frame.op == op::HELLO => {
                match serde_json::from_value::<wire::Hello>(frame.d) {
                    Ok(hello) => {
                        Duration::from_millis(hello.heartbeat_interval.clamp(100, 600_000))
                    }
                    Err(_) => return reconnect(true, "malformed Hello"),
                }
            }
            Ok(Ok(frame)) => {
                return reconnect(true, &format!("expected Hello, got op {}", frame.op))
            }
        };
        // Identify or resume.
        let token = self.settings.bot_token.as_str();
        let resuming = session
            .as_ref()
            .and_then(|s| s.seq.map(|seq| (s.id.clone(), seq)));
        let payload = match &resuming {
            Some((session_id, seq)) => serde_json::to_string(&wire::Outgoing {
                op: op::RESUME,
                d: wire::Resume {
                    token,
                    session_id,
                    seq: *seq,
                },
            }),
            None => {
                if let Some(last) = *last_identify {
                    let wait = IDENTIFY_SPACING.saturating_sub(last.elapsed());
                    if !wait.is_zero() && !sleep_or_shutdown(wait, shutdown).await {
                        return Ended::Shutdown;
                    }
                }
                *last_identify = Some(Instant::now());
                *session = None;
                serde_json::to_string(&wire::Outgoing {
                    op: op::IDENTIFY,
                    d: wire::Identify {
                        token,
                        intents: self.intents(),
                        properties: wire::Properties {
                            os: "linux",
                            browser: "moltmate",
                            device: "moltmate",
                        },
                    },
                })
            }
        };
        let Ok(payload) = payload else {
            return reconnect(false, "could not encode Identify");
        };
        if let Err(e) = socket.send(Message::text(payload)).await {
            return reconnect(resuming.is_some(), &format!("sending Identify/Resume: {e}"));
        }
        // The first beat after a random fraction of the interval, so many clients reconnecting
        // at once do not beat in step.
        let jitter: f64 = rand::rng().random_range(0.0..1.0);
        let mut next_beat = tokio::time::Instant::now() + interval.mul_f64(jitter);
        let mut acked = true;
        loop {
            let frame = tokio::select! {
                _ = shutdown.cancelled() => {
                    // 1000 would end the session; 4000 keeps it resumable for a quick restart.
                    let _ = socket.close(Some(CloseFrame { code: CloseCode::from(4000), reason: "shutting down".into() })).await;
                    return Ended::Shutdown;
                }
                _ = tokio::time::sleep_until(next_beat) => {
                    if !acked {
                        let _ = socket.close(Some(CloseFrame { code: CloseCode::from(4000), reason: "heartbeat not acknowledged".into() })).await;
                        return reconnect(true, "heartbeat not acknowledged");
                    }
                    let seq = session.as_ref().and_then(|s| s.seq);
                    if let Err(e) = send_heartbeat(&mut socket, seq).await {
                        return reconnect(true, &format!("sending a heartbeat: {e}"));
                    }
                    acked = false;
                    next_beat += interval;
                    continue;
                }
                f = next_frame(&mut socket) => f,
            };
            let frame = match frame {
                Ok(frame) => frame,
                Err(end) => return end,
            };
            match frame.op {
                op::HEARTBEAT_ACK => acked = true,
                op::HEARTBEAT => {
                    let seq = session.as_ref().and_then(|s| s.seq);
                    if let Err(e) = send_heartbeat(&mut socket, seq).await {
                        return reconnect(true, &format!("sending a heartbeat: {e}"));
                    }
                }
                op::RECONNECT => return reconnect(true, "Discord asked us to reconnect"),
                op::INVALID_SESSION => {
                    let resumable = frame.d.as_bool().unwrap_or(false);
                    if !resumable {
                        *session = None;
                    }
                    // Discord asks for a random wait of 1-5 seconds before identifying again.
                    let wait = Duration::from_millis(rand::rng().random_range(1000..=5000));
                    if !sleep_or_shutdown(wait, shutdown).await {
                        return Ended::Shutdown;
                    }
                    return reconnect(resumable, "invalid session");
                }
                op::DISPATCH => {
                    let event = frame.t.as_deref().unwrap_or("");
                    match event {
                        "READY" => match serde_json::from_value::<wire::Ready>(frame.d) {
                            Ok(ready) => {
                                tracing::info!(bot_id = %ready.user.id, bot = ready.user.username.as_deref().unwrap_or("?"), "discord: connected");
                                self.health.set_connected(true);
                                *me = Some(ready.user.id);
                                *session = Some(Session {
                                    id: ready.session_id,
                                    resume_url: ready.resume_gateway_url,
                                    seq: frame.s,
                                });
                                continue;
                            }
                            Err(_) => return reconnect(false, "malformed READY"),
                        },
                        "RESUMED" => {
                            self.health.set_connected(true);
                            tracing::info!("discord: session resumed")
                        }
                        "MESSAGE_CREATE" => {
                            self.health.event();
                            match serde_json::from_value::<MessageCreate>(frame.d) {
                                Ok(message) => match self.dispose(message, me.as_deref()) {
                                    Disposition::Deliver(message) => {
                                        if !self.deliver(sink, *message, shutdown).await {
                                            return Ended::Shutdown;
                                        }
                                    }
                                    Disposition::Skip(reason) => {
                                        tracing::debug!(reason, "discord: skipping message");
                                    }
                                },
                                Err(e) => {
                                    tracing::warn!(error = %e, "discord: skipping a message we could not parse")
                                }
                            }
                        }
                        _ => {}
                    }
                    // Only now, with the event stored or skipped, does resuming start past it.
                    if let (Some(seq), Some(session)) = (frame.s, session.as_mut()) {
                        session.seq = Some(seq);
                    }
                }
                _ => {}
            }
        }
    }

    /// Send one part, retrying what may succeed later.
    async fn send_part(&self, channel_id: &str, text: &str) -> Result<(), ChannelError> {
        self.with_retries(|| self.rest.create_message(channel_id, text))
            .await
    }

    /// Run `send` until it succeeds, fails for good or `send_attempts` are used up; a 429
    /// waits its `retry_after`, other retryable errors back off.
    async fn with_retries<F, Fut>(&self, send: F) -> Result<(), ChannelError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), RestError>>,
    {
        let mut backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        let attempts = self.settings.send_attempts.max(1);
        let mut attempt = 1;
        loop {
            match send().await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_send_retryable() && attempt < attempts => {
                    self.health.error(e.class());
                    let delay = e.retry_after().unwrap_or_else(|| backoff.next_delay());
                    tracing::warn!(error = %e, attempt, "discord: sending failed, retrying");
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

fn reconnect(resume: bool, reason: &str) -> Ended {
    Ended::Reconnect {
        resume,
        reason: reason.to_string(),
    }
}

async fn send_heartbeat(socket: &mut Socket, seq: Option<i64>) -> Result<(), String> {
    let beat = serde_json::json!({ "op": op::HEARTBEAT, "d": seq }).to_string();
    socket
        .send(Message::text(beat))
        .await
        .map_err(|e| e.to_string())
}

/// The next gateway frame, answering pings; the connection's end as `Err`.
async fn next_frame(socket: &mut Socket) -> Result<Frame, Ended> {
    loop {
        let message = match socket.next().await {
            None => return Err(reconnect(true, "connection closed")),
            Some(Err(e)) => return Err(reconnect(true, &format!("websocket error: {e}"))),
            Some(Ok(message)) => message,
        };
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                // We never ask for compression or ETF: a binary frame is not for us.
                tracing::warn!("discord: ignoring a binary gateway frame");
                continue;
            }
            Message::Close(frame) => return Err(closed(frame.map(|f| u16::from(f.code)))),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        match serde_json::from_str::<Frame>(text.as_str()) {
            Ok(frame) => return Ok(frame),
            Err(e) => tracing::warn!(error = %e, "discord: ignoring an unreadable gateway frame"),
        }
    }
}

/// What a close code means for us.
fn closed(code: Option<u16>) -> Ended {
    // 401 for a refused token, so the status page counts it as a credentials error.
    let fatal = |detail: &str| {
        Ended::Fatal(ChannelError::Rejected {
            service: SERVICE,
            status: if code == Some(4004) { 401 } else { 400 },
            detail: detail.to_string(),
        })
    };
    match code {
        Some(4004) => fatal("Discord refused the bot token (close code 4004); check channels.discord.botToken"),
        Some(4010) | Some(4011) => fatal("Discord requires sharding for this bot (close code 4010/4011); not supported"),
        Some(4012) => fatal("Discord refused the gateway version (close code 4012)"),
        Some(4013) => fatal("Discord refused the intents (close code 4013)"),
        Some(4014) => fatal(
            "Discord refused a privileged intent (close code 4014): enable \"Message Content Intent\" in the Developer Portal (Bot page), or set channels.discord.groups.mention back to true",
        ),
        Some(4007) | Some(4009) => reconnect(false, "session expired"),
        Some(code) => reconnect(true, &format!("closed by Discord (code {code})")),
        None => reconnect(true, "closed by Discord"),
    }
}

#[async_trait]
impl Channel for DiscordChannel {
    fn kind(&self) -> ChannelKind {
        ChannelKind::Discord
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
        let mut session: Option<Session> = None;
        let mut me: Option<String> = None;
        let mut last_identify: Option<Instant> = None;
        loop {
            let resume_url = session
                .as_ref()
                .and_then(|s| s.resume_url.as_deref())
                .and_then(|u| self.gateway_url(u).ok());
            let url = match resume_url {
                Some(url) => url,
                None => match self.fetch_gateway_url(&mut backoff, &shutdown).await? {
                    Some(url) => url,
                    None => return Ok(()),
                },
            };
            let socket = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = self.connect(&url) => r,
            };
            let started = Instant::now();
            let ended = match socket {
                Ok(socket) => {
                    self.connection(
                        socket,
                        &mut session,
                        &mut me,
                        &mut last_identify,
                        sink.as_ref(),
                        &shutdown,
                    )
                    .await
                }
                Err(reason) => {
                    reconnect(session.is_some(), &format!("could not connect: {reason}"))
                }
            };
            self.health.set_connected(false);
            match ended {
                Ended::Shutdown => return Ok(()),
                Ended::Fatal(e) => {
                    tracing::error!(error = %e, "discord: giving up");
                    self.health.channel_error(&e);
                    return Err(e);
                }
                Ended::Reconnect { resume, reason } => {
                    self.health.error(ErrorClass::Unreachable);
                    if !resume {
                        session = None;
                    }
                    if started.elapsed() >= HEALTHY_CONNECTION {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        reason,
                        resume,
                        delay_ms = delay.as_millis() as u64,
                        "discord: reconnecting"
                    );
                    if !sleep_or_shutdown(delay, &shutdown).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn send_text(&self, chat_id: &str, text: &str) -> Result<(), ChannelError> {
        check_channel_id(chat_id)?;
        for part in split::split_message(text, DISCORD_MAX_MESSAGE_CHARS) {
            self.send_part(chat_id, &part).await?;
        }
        Ok(())
    }

    async fn send_typing(&self, chat_id: &str) -> Result<(), ChannelError> {
        check_channel_id(chat_id)?;
        self.rest
            .trigger_typing(chat_id)
            .await
            .map_err(RestError::into_channel_error)
    }

    async fn fetch_attachment(
        &self,
        attachment: &Attachment,
        max_bytes: u64,
        timeout: Duration,
    ) -> Result<Vec<u8>, ChannelError> {
        if let Some(size) = attachment.size.filter(|s| *s > max_bytes) {
            return Err(ChannelError::Rejected {
                service: SERVICE,
                status: 413,
                detail: format!("the file has {size} bytes, more than the limit of {max_bytes}"),
            });
        }
        let url = self.cdn_url(&attachment.file_ref)?;
        match tokio::time::timeout(timeout, self.download(url, max_bytes)).await {
            Ok(result) => result,
            Err(_) => Err(ChannelError::Unreachable {
                service: SERVICE,
                detail: format!("the download took longer than {}s", timeout.as_secs()),
            }),
        }
    }

    async fn send_file(&self, chat_id: &str, file: &OutboundFile) -> Result<(), ChannelError> {
        check_channel_id(chat_id)?;
        let max = self.settings.max_upload_bytes;
        if file.content.len() as u64 > max {
            return Err(ChannelError::Rejected {
                service: SERVICE,
                status: 413,
                detail: format!(
                    "the file has {} bytes; Discord takes at most {max} from this bot",
                    file.content.len()
                ),
            });
        }
        self.with_retries(|| self.rest.create_message_with_file(chat_id, file))
            .await
    }
}

/// A sender's claim, without control characters, at most [`MAX_FILE_FIELD_CHARS`].
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

/// `text` without any of `secrets`, bounded in length (shared with the Slack channel).
pub(crate) fn scrub_secrets(text: &str, secrets: &[String]) -> String {
    let mut text = text.to_string();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        text = text.replace(secret.as_str(), "<redacted>");
    }
    rest::scrub(&text, "")
}

/// Discord ids are snowflakes: decimal u64.
fn is_snowflake(id: &str) -> bool {
    !id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit())
}

/// A chat id goes into a URL path: only a snowflake is accepted.
fn check_channel_id(chat_id: &str) -> Result<(), ChannelError> {
    if is_snowflake(chat_id) {
        Ok(())
    } else {
        Err(ChannelError::Rejected {
            service: SERVICE,
            status: 400,
            detail: format!(
                "{:?} is not a Discord channel id",
                chat_id.chars().take(40).collect::<String>()
            ),
        })
    }
}

fn validate_token(token: &str) -> Result<(), DiscordSetupError> {
    if token.is_empty() {
        return Err(DiscordSetupError::EmptyToken);
    }
    let valid = token.len() <= 200
        && token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-');
    if valid {
        Ok(())
    } else {
        Err(DiscordSetupError::MalformedToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moltmate_core::channel::GroupPolicy;

    fn channel(groups: GroupPolicy) -> DiscordChannel {
        let mut settings = DiscordSettings::new("abc.DEF_ghi-1").with_api_url("http://127.0.0.1:1");
        settings.groups = groups;
        DiscordChannel::new(settings).unwrap()
    }

    fn message(json: serde_json::Value) -> MessageCreate {
        serde_json::from_value(json).unwrap()
    }

    fn dm(author: &str, text: &str) -> serde_json::Value {
        serde_json::json!({"id": "900", "channel_id": "800", "type": 0, "content": text,
            "author": {"id": author, "username": "anna", "global_name": "Anna\nB"}})
    }

    #[test]
    fn token_and_settings_never_echo_the_token() {
        assert!(validate_token("MTA.x-y_z").is_ok());
        for bad in ["", "a b", "a/b", "a\nb"] {
            let err = validate_token(bad).unwrap_err();
            if !bad.is_empty() {
                assert!(!err.to_string().contains(bad), "{err}");
            }
        }
        let shown = format!("{:?}", DiscordSettings::new("SECRET.token"));
        assert!(!shown.contains("SECRET"), "{shown}");
    }

    #[test]
    fn intents_are_the_fewest_that_work() {
        let dm_only = channel(GroupPolicy::default()).intents();
        assert_eq!(dm_only, wire::intents::DIRECT_MESSAGES);
        let mention = channel(GroupPolicy {
            enabled: true,
            require_mention: true,
        })
        .intents();
        assert_eq!(
            mention,
            wire::intents::DIRECT_MESSAGES | wire::intents::GUILD_MESSAGES
        );
        let all = channel(GroupPolicy {
            enabled: true,
            require_mention: false,
        })
        .intents();
        assert_ne!(all & wire::intents::MESSAGE_CONTENT, 0);
    }

    #[test]
    fn direct_message_is_delivered_with_fields() {
        let Disposition::Deliver(m) =
            channel(GroupPolicy::default()).dispose(message(dm("77", " hi ")), Some("1"))
        else {
            panic!("must deliver")
        };
        assert_eq!(m.sender.to_string(), "discord:77");
        assert_eq!(m.chat_id, "800");
        assert_eq!(m.external_id, "900");
        assert_eq!(m.cursor, None);
        assert_eq!(m.text, "hi");
        assert_eq!(m.sender_name.as_deref(), Some("Anna B"));
    }

    #[test]
    fn bots_own_system_and_empty_messages_are_skipped() {
        let c = channel(GroupPolicy::default());
        let mut bot = dm("77", "hi");
        bot["author"]["bot"] = serde_json::json!(true);
        let mut system = dm("77", "hi");
        system["type"] = serde_json::json!(7);
        let mut hook = dm("77", "hi");
        hook["webhook_id"] = serde_json::json!("5");
        let mut bad_channel = dm("77", "hi");
        bad_channel["channel_id"] = serde_json::json!("../x");
        for (json, me) in [
            (bot, Some("1")),
            (dm("1", "mine"), Some("1")),
            (system, Some("1")),
            (hook, Some("1")),
            (dm("77", "  "), Some("1")),
            (bad_channel, Some("1")),
        ] {
            assert!(matches!(c.dispose(message(json), me), Disposition::Skip(_)));
        }
    }

    #[test]
    fn server_messages_need_groups_and_a_mention_and_become_the_group() {
        let guild = |content: &str, mentions: serde_json::Value| {
            message(
                serde_json::json!({"id": "901", "channel_id": "555", "guild_id": "444",
                "type": 0, "content": content, "mentions": mentions,
                "author": {"id": "77", "username": "anna"}}),
            )
        };
        let off = channel(GroupPolicy::default());
        assert!(matches!(
            off.dispose(
                guild("<@1> hi", serde_json::json!([{"id": "1"}])),
                Some("1")
            ),
            Disposition::Skip(_)
        ));
        let on = channel(GroupPolicy {
            enabled: true,
            require_mention: true,
        });
        assert!(matches!(
            on.dispose(guild("hi all", serde_json::json!([])), Some("1")),
            Disposition::Skip(_)
        ));
        let Disposition::Deliver(m) = on.dispose(
            guild("<@1> what time is it?", serde_json::json!([{"id": "1"}])),
            Some("1"),
        ) else {
            panic!("mentioned: must deliver")
        };
        assert_eq!(m.sender.to_string(), "discord:group/555");
        assert!(m.sender.is_group());
        assert_eq!(m.text, "anna: what time is it?");
        assert_eq!(m.chat_id, "555");
        assert_eq!(m.sender_name, None);
        let chatty = channel(GroupPolicy {
            enabled: true,
            require_mention: false,
        });
        assert!(matches!(
            chatty.dispose(guild("hi all", serde_json::json!([])), Some("1")),
            Disposition::Deliver(_)
        ));
    }

    #[test]
    fn close_codes_that_mean_bad_config_are_fatal() {
        for code in [4004, 4013, 4014] {
            assert!(matches!(closed(Some(code)), Ended::Fatal(_)), "{code}");
        }
        assert!(matches!(
            closed(Some(4009)),
            Ended::Reconnect { resume: false, .. }
        ));
        assert!(matches!(
            closed(Some(1001)),
            Ended::Reconnect { resume: true, .. }
        ));
        assert!(matches!(
            closed(None),
            Ended::Reconnect { resume: true, .. }
        ));
    }

    #[test]
    fn chat_ids_must_be_snowflakes() {
        assert!(check_channel_id("123").is_ok());
        for bad in ["", "12a", "../../users/@me", &"1".repeat(21)] {
            assert!(check_channel_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn attachments_become_references_by_kind() {
        let c = channel(GroupPolicy::default());
        let mut json = dm("77", "");
        json["attachments"] = serde_json::json!([
            {"id": "1", "filename": "cat.png", "content_type": "image/png", "size": 10,
             "url": "https://cdn.discordapp.com/attachments/800/1/cat.png?ex=1&is=2&hm=3"},
            {"id": "2", "filename": "scan.heic", "content_type": "image/heic", "size": 10,
             "url": "https://cdn.discordapp.com/attachments/800/2/scan.heic"},
            {"id": "3", "filename": "a.mp3", "content_type": "audio/mpeg", "url": "https://cdn.discordapp.com/x"},
            {"id": "4", "filename": "x\n../../evil\u{7}.pdf", "content_type": "application/pdf", "url": "https://cdn.discordapp.com/y"},
            {"id": "not-a-snowflake", "url": "https://cdn.discordapp.com/z"},
            {"id": "5"},
            {"id": "6", "url": 7},
        ]);
        let Disposition::Deliver(m) = c.dispose(message(json), Some("1")) else {
            panic!("a message with files and no text is delivered")
        };
        assert_eq!(m.text, "");
        let kinds: Vec<_> = m.attachments.iter().map(|a| a.kind).collect();
        assert_eq!(
            kinds,
            vec![
                AttachmentKind::Photo,
                AttachmentKind::Document,
                AttachmentKind::Audio,
                AttachmentKind::Document
            ]
        );
        assert_eq!(m.attachments[0].size, Some(10));
        assert_eq!(
            m.attachments[3].file_name.as_deref(),
            Some("x../../evil.pdf")
        );

        let mut voice = dm("77", "");
        voice["flags"] = serde_json::json!(1 << 13);
        voice["attachments"] = serde_json::json!([{"id": "9", "filename": "voice-message.ogg",
            "content_type": "audio/ogg", "size": 500, "duration_secs": 3.2, "waveform": "AAAA",
            "url": "https://cdn.discordapp.com/attachments/800/9/voice-message.ogg"}]);
        let Disposition::Deliver(m) = c.dispose(message(voice), Some("1")) else {
            panic!("voice message delivered")
        };
        assert_eq!(m.attachments[0].kind, AttachmentKind::Voice);
        assert_eq!(m.attachments[0].duration_seconds, Some(4));

        let mut many = dm("77", "x");
        many["attachments"] = serde_json::json!((0..30)
            .map(|i| serde_json::json!({"id": format!("{}", i + 1), "url": "https://cdn.discordapp.com/a"}))
            .collect::<Vec<_>>());
        let Disposition::Deliver(m) = c.dispose(message(many), Some("1")) else {
            panic!()
        };
        assert_eq!(m.attachments.len(), MAX_ATTACHMENTS);
    }

    #[test]
    fn attachment_urls_must_be_on_discords_cdn() {
        let real = DiscordChannel::new(DiscordSettings::new("x")).unwrap();
        assert!(real
            .cdn_url("https://cdn.discordapp.com/attachments/1/2/a.png?ex=1&hm=2")
            .is_ok());
        assert!(real
            .cdn_url("https://media.discordapp.net/attachments/1/2/a.png")
            .is_ok());
        for bad in [
            "http://cdn.discordapp.com/attachments/1/2/a.png",
            "https://cdn.discordapp.com.evil.example/a.png",
            "https://evil.example/cdn.discordapp.com/a.png",
            "https://user:pw@cdn.discordapp.com/a.png",
            "https://token@cdn.discordapp.com/a.png",
            "https://cdn.discordapp.com:8443/a.png",
            "https://169.254.169.254/latest/meta-data/",
            "http://127.0.0.1:8080/admin",
            "file:///etc/passwd",
            "//cdn.discordapp.com/a.png",
            "not a url",
            &format!("https://cdn.discordapp.com/{}", "a".repeat(MAX_URL_CHARS)),
        ] {
            let err = real.cdn_url(bad).unwrap_err();
            assert!(
                matches!(err, ChannelError::Rejected { status: 400, .. }),
                "{bad}"
            );
        }
        // Against a local double, only the double's own origin.
        let local = channel(GroupPolicy::default());
        assert!(local.cdn_url("http://127.0.0.1:1/cdn/a.png").is_ok());
        assert!(local.cdn_url("http://127.0.0.1:2/cdn/a.png").is_err());
        assert!(local.cdn_url("https://cdn.discordapp.com/a.png").is_err());
    }

    #[test]
    fn gateway_urls_must_be_wss_unless_the_api_is_local_http() {
        let local = channel(GroupPolicy::default());
        assert!(local.gateway_url("ws://127.0.0.1:5/").is_ok());
        let real = DiscordChannel::new(DiscordSettings::new("x")).unwrap();
        assert!(real.gateway_url("ws://gateway.discord.gg").is_err());
        assert_eq!(
            real.gateway_url("wss://gateway.discord.gg").unwrap(),
            "wss://gateway.discord.gg/?v=10&encoding=json"
        );
        assert!(real.gateway_url("https://x").is_err());
    }
}
