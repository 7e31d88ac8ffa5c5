//! Telegram channel: Bot API long polling with durable offsets.
//!
//! # Receiving
//!
//! [`TelegramChannel::run`] validates the token with `getMe`, reads the cursor the gateway stored
//! past the last batch, and long-polls `getUpdates` from that offset. The updates of a batch
//! are handed to the sink each sender's in order, different senders' at once (so the gateway
//! commits them in groups, one fsync for many); only after the sink answered `Ok` for every
//! one of them does the offset move past the batch, and only the next `getUpdates` carrying
//! that offset confirms it to Telegram. A sink failure is retried (with backoff) on the *same*
//! update, so nothing is ever skipped. The stored cursor follows at the end of each batch
//! ([`InboundSink::advance_cursor`]), or with the last message when the batch is one sender's;
//! a crash before that reads the batch again, and the sink knows the updates it already stored
//! by their id.
//!
//! Updates we do not answer (no text: stickers, photos, service messages; group chats unless
//! [`TelegramSettings::accept_group_chats`]; messages from bots; anything malformed) are skipped:
//! the in-memory offset moves past them at once, and when a batch ends on skipped updates the
//! stored cursor is moved past them with [`InboundSink::advance_cursor`] (not fsynced: losing
//! that write only means reading and skipping them again, as after a crash mid-batch).
//!
//! # Sending
//!
//! Replies are Markdown from the model, sent as Telegram HTML built by [`format`] (only
//! Telegram's tags, every piece of text escaped, raw HTML shown as text), split at Telegram's
//! 4096 UTF-16 unit limit without cutting a tag or an entity. If Telegram refuses a part (HTTP
//! 400, e.g. "can't parse entities"), that part is resent as plain text: a reply is never lost to
//! its formatting. Each part is retried on 429 and
//! server or connection errors; a timeout after the server got the request may therefore deliver
//! a part twice, which we prefer over losing it.

mod api;
pub mod format;
mod settings;
pub mod split;
mod wire;

pub use settings::{TelegramSettings, DEFAULT_API_URL};

use crate::retry::{sleep_or_shutdown, Backoff};
use api::{ApiError, BotApi, SERVICE};
use async_trait::async_trait;
use futures::StreamExt;
use moltmate_core::channel::Channel;
use moltmate_core::channel::{
    Attachment, AttachmentKind, ChannelError, InboundMessage, InboundSink, OutboundFile,
};
use moltmate_core::channel_status::{ChannelHealth, ErrorClass};
use moltmate_core::{ChannelKind, Identity, PeerId, Shutdown};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wire::{BotUser, ChatRef, GetUpdates, SendChatAction, SendMessage, Update};

/// The only update type we ask for; Telegram then does not even send the others.
const ALLOWED_UPDATES: &[&str] = &["message"];

/// A `getUpdates` reply that brought no progress faster than this did not long-poll.
const FAST_EMPTY_REPLY: Duration = Duration::from_millis(500);

/// Senders of one `getUpdates` batch whose messages are handed to the sink at once (see
/// [`TelegramChannel::deliver_batch`]). Telegram's batches hold at most 100 updates.
const MAX_SENDERS_AT_ONCE: usize = 64;

/// Why a [`TelegramChannel`] could not be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum TelegramSetupError {
    #[error("the Telegram bot token is empty")]
    EmptyToken,
    #[error("the Telegram bot token has an invalid format (expected digits, ':' and a secret of letters, digits, '_' or '-')")]
    MalformedToken,
    /// The URL itself is not repeated: it may carry credentials of a self-hosted server.
    #[error("invalid Telegram API URL: {reason}")]
    InvalidApiUrl { reason: String },
    #[error("could not build the HTTP client: {0}")]
    HttpClient(String),
}

/// Who the bot is, as reported by `getMe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BotInfo {
    pub id: i64,
    pub username: Option<String>,
}

/// What became of a batch handed to the sink.
enum Delivered {
    /// Every message is stored; with the cursor past the batch when it went with the last one.
    Stored {
        cursor_stored: Option<i64>,
    },
    ShuttingDown,
}

/// What to do with one update.
#[derive(Debug)]
enum Disposition {
    Deliver(Box<InboundMessage>),
    Skip(&'static str),
}

/// The Telegram channel. Cheap to share behind an `Arc`; `run` and the send methods may be
/// used concurrently.
#[derive(Debug)]
pub struct TelegramChannel {
    settings: TelegramSettings,
    api: BotApi,
    health: Arc<ChannelHealth>,
}

impl TelegramChannel {
    /// Validate the settings and build the HTTP client. Does no I/O; the token is checked
    /// against Telegram by [`TelegramChannel::verify`] and at the start of `run`.
    pub fn new(settings: TelegramSettings) -> Result<Self, TelegramSetupError> {
        validate_token(&settings.bot_token)?;
        let url = reqwest::Url::parse(&settings.api_url).map_err(|e| {
            TelegramSetupError::InvalidApiUrl {
                reason: e.to_string(),
            }
        })?;
        if url.scheme() != "https" && url.scheme() != "http" {
            return Err(TelegramSetupError::InvalidApiUrl {
                reason: "scheme must be http or https".to_string(),
            });
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(TelegramSetupError::InvalidApiUrl {
                reason: "must not contain a query or fragment".to_string(),
            });
        }
        let http = reqwest::Client::builder()
            .connect_timeout(settings.request_timeout)
            .build()
            .map_err(|e| TelegramSetupError::HttpClient(e.without_url().to_string()))?;
        let api = BotApi::new(
            http,
            &settings.api_url,
            &settings.bot_token,
            settings.request_timeout,
        );
        Ok(TelegramChannel {
            settings,
            api,
            health: ChannelHealth::new(ChannelKind::Telegram),
        })
    }

    /// Ask Telegram who we are (`getMe`), once. A refused token gives
    /// [`ChannelError::Rejected`] whose message says so, without the token.
    pub async fn verify(&self) -> Result<BotInfo, ChannelError> {
        self.get_me().await.map_err(ApiError::into_channel_error)
    }

    async fn get_me(&self) -> Result<BotInfo, ApiError> {
        let me: BotUser = self
            .api
            .call("getMe", &serde_json::json!({}), Duration::ZERO)
            .await?;
        Ok(BotInfo {
            id: me.id,
            username: me.username,
        })
    }

    /// `getMe` until it works, the token is refused, or shutdown.
    async fn wait_for_bot(
        &self,
        backoff: &mut Backoff,
        shutdown: &Shutdown,
    ) -> Result<Option<BotInfo>, ChannelError> {
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                r = self.get_me() => r,
            };
            match result {
                Ok(me) => {
                    self.health.set_connected(true);
                    return Ok(Some(me));
                }
                Err(e) if e.is_fatal() => {
                    tracing::error!(error = %e, "telegram: giving up");
                    let e = e.into_channel_error();
                    self.health.set_connected(false);
                    self.health.channel_error(&e);
                    return Err(e);
                }
                Err(e) => {
                    self.record(&e);
                    tracing::warn!(error = %e, "telegram: getMe failed, retrying");
                    if !self.pause_after(&e, backoff, shutdown).await {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// The stored cursor, retrying while the store is unavailable.
    async fn read_cursor(
        &self,
        sink: &dyn InboundSink,
        backoff: &mut Backoff,
        shutdown: &Shutdown,
    ) -> Option<Option<i64>> {
        loop {
            match sink.cursor(ChannelKind::Telegram).await {
                Ok(cursor) => return Some(cursor),
                Err(e) => {
                    tracing::warn!(error = %e, "telegram: could not read the stored cursor, retrying");
                    if !sleep_or_shutdown(backoff.next_delay(), shutdown).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Hand one message to the sink until it is stored. Returns false on shutdown.
    async fn deliver(
        &self,
        sink: &dyn InboundSink,
        message: InboundMessage,
        backoff: &mut Backoff,
        shutdown: &Shutdown,
    ) -> bool {
        loop {
            if shutdown.is_cancelled() {
                return false;
            }
            match sink.accept(message.clone()).await {
                Ok(outcome) => {
                    // Queued, duplicate or refused: stored (with its cursor, if it carries one).
                    tracing::debug!(update = %message.external_id, ?outcome, "telegram: update accepted");
                    backoff.reset();
                    return true;
                }
                Err(e) => {
                    self.health.error(ErrorClass::Storage);
                    tracing::warn!(update = %message.external_id, error = %e, "telegram: the gateway did not store the update, retrying it");
                    if !sleep_or_shutdown(backoff.next_delay(), shutdown).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Hands a batch's messages to the sink: each sender's messages one after the other, in
    /// order, and different senders' at once (at most [`MAX_SENDERS_AT_ONCE`]), so the sink
    /// can commit many senders' messages with one fsync instead of one each. Returns when every
    /// message is stored; false on shutdown.
    ///
    /// With several senders the messages go without their cursor: stored in any order, a
    /// later update's cursor could be stored before an earlier update is, and a crash in
    /// between would skip that one. The caller then stores the cursor past the whole batch once
    /// all of it is stored; until then a restart reads the batch again, and the sink recognises
    /// what it stored before (same `external_id`). With one sender (a quiet bot: usually one
    /// message) the messages are stored one after the other anyway, so the last carries the
    /// cursor past the batch, `through`, and it is stored in the same commit as that message:
    /// one commit per message instead of two. Returns what the sink stored of the cursor.
    async fn deliver_batch(
        &self,
        sink: &dyn InboundSink,
        batch: Vec<InboundMessage>,
        through: Option<i64>,
        shutdown: &Shutdown,
    ) -> Delivered {
        let mut senders: Vec<(Identity, Vec<InboundMessage>)> = Vec::new();
        for mut message in batch {
            message.cursor = None;
            match senders.iter_mut().find(|(s, _)| *s == message.sender) {
                Some((_, messages)) => messages.push(message),
                None => senders.push((message.sender.clone(), vec![message])),
            }
        }
        let mut cursor_stored = None;
        if let [(_, messages)] = senders.as_mut_slice() {
            if let Some(last) = messages.last_mut() {
                last.cursor = through;
                cursor_stored = through;
            }
        }
        let delivered: Vec<bool> = futures::stream::iter(senders)
            .map(|(_, messages)| async move {
                let mut backoff =
                    Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
                for message in messages {
                    if !self.deliver(sink, message, &mut backoff, shutdown).await {
                        return false;
                    }
                }
                true
            })
            .buffer_unordered(MAX_SENDERS_AT_ONCE)
            .collect()
            .await;
        if delivered.into_iter().all(|ok| ok) {
            Delivered::Stored { cursor_stored }
        } else {
            Delivered::ShuttingDown
        }
    }

    /// Sleep as the error asks (server `retry_after`, else backoff). False on shutdown.
    async fn pause_after(
        &self,
        error: &ApiError,
        backoff: &mut Backoff,
        shutdown: &Shutdown,
    ) -> bool {
        let delay = match error.retry_after() {
            Some(seconds) => Duration::from_secs(seconds).min(self.settings.max_retry_after),
            None => backoff.next_delay(),
        };
        sleep_or_shutdown(delay, shutdown).await
    }

    /// Classify one raw update. Parsing is per update, so one odd update never blocks the rest.
    fn dispose(&self, update: Update) -> Disposition {
        let Some(message) = update.message else {
            return Disposition::Skip("not a new message");
        };
        match message.chat.kind.as_str() {
            "private" => {}
            "group" | "supergroup" if self.settings.accept_group_chats => {}
            "group" | "supergroup" => {
                return Disposition::Skip("group chat (group chats are not enabled)")
            }
            _ => return Disposition::Skip("not a private or group chat"),
        }
        let attachments = attachments_of(&message);
        let Some(from) = message.from else {
            return Disposition::Skip("message without sender");
        };
        if from.is_bot {
            return Disposition::Skip("message from a bot");
        }
        let text = match (message.text, message.caption) {
            (Some(text), _) => text,
            (None, caption) if !attachments.is_empty() => caption.unwrap_or_default(),
            (None, _) => return Disposition::Skip(
                "message without text or a file we take (sticker, location, service message...)",
            ),
        };
        let Ok(peer) = PeerId::new(from.id.to_string()) else {
            return Disposition::Skip("sender id is not a valid peer id");
        };
        let name = display_name(from.first_name.as_deref(), from.last_name.as_deref());
        Disposition::Deliver(Box::new(InboundMessage {
            sender: Identity::new(ChannelKind::Telegram, peer),
            chat_id: message.chat.id.to_string(),
            external_id: update.update_id.to_string(),
            cursor: Some(update.update_id.saturating_add(1)),
            text,
            sender_name: name,
            language_code: from.language_code.filter(|code| is_language_tag(code)),
            attachments,
        }))
    }

    /// Send one formatted part; if Telegram refuses it (400: the formatting, most likely), send
    /// its plain text instead.
    async fn send_formatted(
        &self,
        chat: ChatRef<'_>,
        part: &format::Part,
    ) -> Result<(), ChannelError> {
        match self
            .send_part(chat_ref_copy(&chat), &part.html, Some("HTML"))
            .await
        {
            Ok(()) => Ok(()),
            Err(ApiError::Refused {
                status: 400,
                description,
            }) if is_formatting_refusal(&description) => {
                tracing::warn!(%description, "telegram: formatted reply refused, resending it as plain text");
                for piece in split::split_message(&part.plain, split::TELEGRAM_MAX_MESSAGE_UTF16) {
                    self.send_part(chat_ref_copy(&chat), &piece, None)
                        .await
                        .map_err(ApiError::into_channel_error)?;
                }
                Ok(())
            }
            Err(e) => Err(e.into_channel_error()),
        }
    }

    /// Send one part, retrying what may succeed later.
    async fn send_part(
        &self,
        chat: ChatRef<'_>,
        text: &str,
        parse_mode: Option<&str>,
    ) -> Result<(), ApiError> {
        let mut backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        let attempts = self.settings.send_attempts.max(1);
        let mut attempt = 1;
        loop {
            let params = SendMessage {
                chat_id: chat_ref_copy(&chat),
                text,
                parse_mode,
            };
            let result: Result<serde_json::Value, ApiError> =
                self.api.call("sendMessage", &params, Duration::ZERO).await;
            match result {
                Ok(_) => return Ok(()),
                Err(e) if e.is_send_retryable() && attempt < attempts => {
                    tracing::warn!(error = %e, attempt, "telegram: sendMessage failed, retrying");
                    let delay = match e.retry_after() {
                        Some(seconds) => {
                            Duration::from_secs(seconds).min(self.settings.max_retry_after)
                        }
                        None => backoff.next_delay(),
                    };
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => {
                    self.health.error(e.class());
                    return Err(e);
                }
            }
        }
    }

    /// Count a failed exchange; the service is not reachable as it should be.
    fn record(&self, error: &ApiError) {
        self.health.set_connected(false);
        self.health.error(error.class());
    }
}

#[async_trait]
impl Channel for TelegramChannel {
    fn kind(&self) -> ChannelKind {
        ChannelKind::Telegram
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
        let Some(me) = self.wait_for_bot(&mut backoff, &shutdown).await? else {
            return Ok(());
        };
        tracing::info!(
            bot_id = me.id,
            bot = me.username.as_deref().unwrap_or("?"),
            "telegram: connected"
        );
        backoff.reset();
        let Some(mut offset) = self
            .read_cursor(sink.as_ref(), &mut backoff, &shutdown)
            .await
        else {
            return Ok(());
        };
        backoff.reset();
        if let Some(cursor) = offset.filter(|c| *c <= 0) {
            // update_id + 1 is always positive. A non-positive offset means "the last N
            // updates" to Telegram and would make it forget everything older: never send one.
            tracing::warn!(cursor, "telegram: ignoring an invalid stored cursor");
            offset = None;
        }
        // The cursor the sink has stored; it follows the offset at the end of each batch.
        let mut stored = offset;
        // At least one second, so every empty reply was a real long poll (see FAST_EMPTY_REPLY).
        let poll_seconds = self.settings.poll_timeout.as_secs().max(1);
        loop {
            let params = GetUpdates {
                offset,
                timeout: poll_seconds,
                allowed_updates: ALLOWED_UPDATES,
            };
            let started = Instant::now();
            let result: Result<Vec<serde_json::Value>, ApiError> = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = self.api.call("getUpdates", &params, Duration::from_secs(poll_seconds)) => r,
            };
            let updates = match result {
                Ok(updates) => {
                    self.health.set_connected(true);
                    updates
                }
                Err(e) if e.is_fatal() => {
                    tracing::error!(error = %e, "telegram: giving up");
                    let e = e.into_channel_error();
                    self.health.set_connected(false);
                    self.health.channel_error(&e);
                    return Err(e);
                }
                Err(e) => {
                    self.record(&e);
                    tracing::warn!(error = %e, "telegram: getUpdates failed, retrying");
                    if !self.pause_after(&e, &mut backoff, &shutdown).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            let offset_before = offset;
            let mut batch = Vec::new();
            for raw in updates {
                let update: Update = match serde_json::from_value(raw) {
                    Ok(update) => update,
                    Err(e) => {
                        // Without a readable update_id we cannot step past it by itself; the
                        // next well-formed update's offset confirms it along with the rest.
                        tracing::warn!(error = %e, "telegram: skipping an update we could not parse");
                        continue;
                    }
                };
                let id = update.update_id;
                if offset.is_some_and(|o| id < o) {
                    // Already confirmed; a compliant server never sends it again.
                    continue;
                }
                match self.dispose(update) {
                    Disposition::Skip(reason) => {
                        tracing::debug!(update = id, reason, "telegram: skipping update");
                    }
                    Disposition::Deliver(message) => {
                        self.health.event();
                        batch.push(*message)
                    }
                }
                offset = Some(id.saturating_add(1));
            }
            match self
                .deliver_batch(sink.as_ref(), batch, offset, &shutdown)
                .await
            {
                Delivered::ShuttingDown => return Ok(()),
                Delivered::Stored { cursor_stored } => {
                    if cursor_stored.is_some() {
                        stored = cursor_stored;
                    }
                }
            }
            // Every update of the batch is stored or skipped: the cursor may pass them all.
            if let Some(skipped_to) = offset.filter(|o| stored.is_none_or(|s| *o > s)) {
                match sink.advance_cursor(ChannelKind::Telegram, skipped_to).await {
                    Ok(()) => stored = Some(skipped_to),
                    Err(e) => {
                        tracing::warn!(error = %e, "telegram: could not store the cursor past skipped updates")
                    }
                }
            }
            if offset != offset_before || started.elapsed() >= FAST_EMPTY_REPLY {
                backoff.reset();
            } else if !sleep_or_shutdown(backoff.next_delay(), &shutdown).await {
                // Nothing moved forward and the server did not long-poll: either a batch of
                // unreadable updates or a server ignoring `timeout`. We paused rather than spin.
                return Ok(());
            }
        }
    }

    async fn send_text(&self, chat_id: &str, text: &str) -> Result<(), ChannelError> {
        let chat = parse_chat(chat_id)?;
        for part in format::render_parts(text, split::TELEGRAM_MAX_MESSAGE_UTF16) {
            self.send_formatted(chat_ref_copy(&chat), &part).await?;
        }
        Ok(())
    }

    async fn fetch_attachment(
        &self,
        attachment: &Attachment,
        max_bytes: u64,
        timeout: Duration,
    ) -> Result<Vec<u8>, ChannelError> {
        let too_large = |size: u64| ChannelError::Rejected {
            service: SERVICE,
            status: 413,
            detail: format!("the file has {size} bytes, more than the limit of {max_bytes}"),
        };
        if let Some(size) = attachment.size.filter(|s| *s > max_bytes) {
            return Err(too_large(size));
        }
        let work = async {
            let file: wire::File = self
                .api
                .call(
                    "getFile",
                    &wire::GetFile {
                        file_id: &attachment.file_ref,
                    },
                    Duration::ZERO,
                )
                .await
                .map_err(ApiError::into_channel_error)?;
            if let Some(size) = file.file_size.filter(|s| *s > max_bytes) {
                return Err(too_large(size));
            }
            let Some(path) = file.file_path else {
                return Err(ChannelError::InvalidReply {
                    service: SERVICE,
                    detail: "getFile returned no file_path (the file may be over 20 MB)"
                        .to_string(),
                });
            };
            self.api
                .download(&path, max_bytes, timeout)
                .await
                .map_err(ApiError::into_channel_error)
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(ChannelError::Unreachable {
                service: SERVICE,
                detail: format!("the download took longer than {}s", timeout.as_secs()),
            }),
        }
    }

    async fn send_file(&self, chat_id: &str, file: &OutboundFile) -> Result<(), ChannelError> {
        let chat = parse_chat(chat_id)?;
        let chat = match chat {
            ChatRef::Id(id) => id.to_string(),
            ChatRef::Name(name) => name.to_string(),
        };
        self.api
            .send_document(&chat, file)
            .await
            .map_err(ApiError::into_channel_error)
    }

    async fn send_typing(&self, chat_id: &str) -> Result<(), ChannelError> {
        let chat = parse_chat(chat_id)?;
        let params = SendChatAction {
            chat_id: chat,
            action: "typing",
        };
        let _: serde_json::Value = self
            .api
            .call("sendChatAction", &params, Duration::ZERO)
            .await
            .map_err(ApiError::into_channel_error)?;
        Ok(())
    }
}

/// Whether a 400 refused the formatting of a message (so its plain text may pass): "can't parse
/// entities" for markup Telegram does not accept, "too long" should its count after entity
/// parsing differ from ours. Anything else ("chat not found") would fail plain as well.
fn is_formatting_refusal(description: &str) -> bool {
    let d = description.to_ascii_lowercase();
    d.contains("entities") || d.contains("entity") || d.contains("too long")
}

/// Longest file reference, name and MIME type we keep (Telegram's file ids are ~100 chars).
const MAX_FILE_FIELD_CHARS: usize = 256;

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

/// The file of a message as an attachment reference. Telegram sends one file per message; for
/// a photo, the largest size (the last one) is taken.
fn attachments_of(message: &wire::Message) -> Vec<Attachment> {
    let (kind, file) = if let Some(size) = message.photo.as_ref().and_then(|p| p.last()) {
        (AttachmentKind::Photo, size)
    } else if let Some(voice) = &message.voice {
        (AttachmentKind::Voice, voice)
    } else if let Some(audio) = &message.audio {
        (AttachmentKind::Audio, audio)
    } else if let Some(document) = &message.document {
        (AttachmentKind::Document, document)
    } else {
        return Vec::new();
    };
    if file.file_id.is_empty() || file.file_id.len() > MAX_FILE_FIELD_CHARS {
        return Vec::new();
    }
    vec![Attachment {
        kind,
        file_ref: file.file_id.clone(),
        file_name: bounded(file.file_name.as_deref()),
        mime_type: bounded(file.mime_type.as_deref()),
        size: file.file_size,
        duration_seconds: file.duration,
    }]
}

/// Longest display name we pass on, in characters.
const MAX_NAME_CHARS: usize = 128;

/// "First Last" with control characters (newlines included) removed and whitespace collapsed:
/// the name is chosen by the sender and may end up in a prompt, so it must stay one short line.
pub(crate) fn display_name(first: Option<&str>, last: Option<&str>) -> Option<String> {
    let joined = [first, last]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    let cleaned: String = joined
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|word| !word.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_NAME_CHARS)
        .collect();
    // The cut may have ended the name with the space between two words.
    let cleaned = cleaned.trim_end();
    (!cleaned.is_empty()).then(|| cleaned.to_string())
}

/// A plausible IETF language tag (`de`, `pt-br`); anything else is dropped rather than passed on.
fn is_language_tag(code: &str) -> bool {
    !code.is_empty()
        && code.len() <= 35
        && code.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn chat_ref_copy<'a>(chat: &ChatRef<'a>) -> ChatRef<'a> {
    match chat {
        ChatRef::Id(id) => ChatRef::Id(*id),
        ChatRef::Name(name) => ChatRef::Name(name),
    }
}

/// A chat id is a (possibly negative) integer, or `@username` of a public channel.
fn parse_chat(chat_id: &str) -> Result<ChatRef<'_>, ChannelError> {
    let chat = ChatRef::parse(chat_id);
    match chat {
        ChatRef::Id(_) => Ok(chat),
        ChatRef::Name(name)
            if name.len() > 1
                && name.starts_with('@')
                && name[1..]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_') =>
        {
            Ok(chat)
        }
        ChatRef::Name(_) => Err(ChannelError::Rejected {
            service: SERVICE,
            status: 400,
            detail: format!("{chat_id:?} is not a Telegram chat id"),
        }),
    }
}

fn validate_token(token: &str) -> Result<(), TelegramSetupError> {
    if token.is_empty() {
        return Err(TelegramSetupError::EmptyToken);
    }
    // The token goes into the URL path verbatim; anything outside this alphabet could change
    // the request's meaning (a '/', '?' or '#') and is not a token BotFather issues anyway.
    let valid = token.split_once(':').is_some_and(|(id, secret)| {
        !id.is_empty()
            && id.chars().all(|c| c.is_ascii_digit())
            && !secret.is_empty()
            && secret
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    });
    if valid {
        Ok(())
    } else {
        Err(TelegramSetupError::MalformedToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_format_is_checked_without_echoing_it() {
        assert!(validate_token("123456:AAH-x_y").is_ok());
        for bad in ["", "abc", "123:", ":abc", "12:ab/../c", "12:ab?x", "12:a b"] {
            let err = validate_token(bad).unwrap_err();
            if !bad.is_empty() {
                assert!(!err.to_string().contains(bad), "{err}");
            }
        }
    }

    #[test]
    fn names_and_language_codes_are_sanitised() {
        assert_eq!(
            display_name(Some(" Anna "), Some("Berg")).as_deref(),
            Some("Anna Berg")
        );
        assert_eq!(
            display_name(Some("Eve\nSYSTEM:\u{7}"), None).as_deref(),
            Some("Eve SYSTEM:")
        );
        assert_eq!(display_name(Some("  "), None), None);
        assert_eq!(
            display_name(Some(&"x".repeat(500)), None).map(|n| n.len()),
            Some(MAX_NAME_CHARS)
        );
        assert!(is_language_tag("pt-br"));
        assert!(!is_language_tag("de\nx"));
        assert!(!is_language_tag(""));
    }

    #[test]
    fn display_name_cut_at_the_limit_has_no_trailing_space() {
        // The cut at MAX_NAME_CHARS could end the name with the space between two words.
        let first = "a".repeat(MAX_NAME_CHARS - 1);
        let name = display_name(Some(&first), Some("Berg")).unwrap();
        assert_eq!(name, first);
    }

    #[test]
    fn bad_api_urls_are_refused_without_echoing_them() {
        for bad in [
            "not a url",
            "ftp://tg.example",
            "https://tg.example/?x=1",
            "https://u:pw@/",
        ] {
            let err =
                TelegramChannel::new(TelegramSettings::new("1:x").with_api_url(bad)).unwrap_err();
            assert!(
                matches!(err, TelegramSetupError::InvalidApiUrl { .. }),
                "{bad}: {err:?}"
            );
            assert!(!err.to_string().contains(bad), "{err}");
        }
        assert!(TelegramChannel::new(
            TelegramSettings::new("1:x").with_api_url("http://127.0.0.1:8081/tg/")
        )
        .is_ok());
    }

    #[test]
    fn chat_ids() {
        assert!(matches!(parse_chat("-100123"), Ok(ChatRef::Id(-100123))));
        assert!(matches!(
            parse_chat("@my_channel"),
            Ok(ChatRef::Name("@my_channel"))
        ));
        assert!(parse_chat("bob").is_err());
        assert!(parse_chat("@").is_err());
    }

    fn channel() -> TelegramChannel {
        TelegramChannel::new(TelegramSettings::new("1:x").with_api_url("http://127.0.0.1:1"))
            .unwrap()
    }

    fn update(json: serde_json::Value) -> Update {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn private_text_message_is_delivered_with_fields() {
        let u = update(serde_json::json!({
            "update_id": 10,
            "message": {"message_id": 1, "date": 0, "text": "hi",
                "chat": {"id": 77, "type": "private"},
                "from": {"id": 77, "is_bot": false, "first_name": "Anna", "last_name": "B", "language_code": "de"}}
        }));
        let Disposition::Deliver(m) = channel().dispose(u) else {
            panic!("must deliver")
        };
        assert_eq!(m.sender.to_string(), "telegram:77");
        assert_eq!(m.chat_id, "77");
        assert_eq!(m.external_id, "10");
        assert_eq!(m.cursor, Some(11));
        assert_eq!(m.sender_name.as_deref(), Some("Anna B"));
        assert_eq!(m.language_code.as_deref(), Some("de"));
    }

    #[test]
    fn groups_bots_and_non_text_are_skipped() {
        let base = |chat_type: &str, is_bot: bool, text: Option<&str>| {
            let mut msg = serde_json::json!({"message_id": 1, "date": 0,
                "chat": {"id": -5, "type": chat_type},
                "from": {"id": 9, "is_bot": is_bot, "first_name": "X"}});
            if let Some(t) = text {
                msg["text"] = serde_json::json!(t);
            }
            update(serde_json::json!({"update_id": 1, "message": msg}))
        };
        let c = channel();
        assert!(matches!(
            c.dispose(base("group", false, Some("hi"))),
            Disposition::Skip(_)
        ));
        assert!(matches!(
            c.dispose(base("channel", false, Some("hi"))),
            Disposition::Skip(_)
        ));
        assert!(matches!(
            c.dispose(base("private", true, Some("hi"))),
            Disposition::Skip(_)
        ));
        assert!(matches!(
            c.dispose(base("private", false, None)),
            Disposition::Skip(_)
        ));
        assert!(matches!(
            c.dispose(update(serde_json::json!({"update_id": 2}))),
            Disposition::Skip(_)
        ));
        let mut settings = TelegramSettings::new("1:x");
        settings.accept_group_chats = true;
        let groups = TelegramChannel::new(settings).unwrap();
        assert!(matches!(
            groups.dispose(base("supergroup", false, Some("hi"))),
            Disposition::Deliver(_)
        ));
    }
}
