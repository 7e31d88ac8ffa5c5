//! Submitting a signed-in user's message to the gateway and following its answer.
//!
//! The user comes from the credential only; the message is an `InboundMessage` from
//! `web:<user id>` (the gateway treats web peers as the user id, see the gateway's router).

use crate::error::WebError;
use crate::state::WebState;
use futures::Stream;
use moltmate_core::channel::{Accepted, InboundMessage, OfferedFile};
use moltmate_core::model::DeltaSink;
use moltmate_core::{ChannelKind, Identity, PeerId, Shutdown, UserId};
use moltmate_gateway::Reply;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// What happens to a submitted message, in order: deltas, then exactly one of done/failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TurnEvent {
    Delta(String),
    /// `send_file` put a file up for download during the turn (shown next to the answer).
    /// Boxed: each answer's event channel allocates a block of 32 events, and this variant
    /// set their size (~4 KiB a block, per request in flight, instead of ~1.5 KiB).
    File(Box<OfferedFile>),
    /// The committed reply (authoritative: command replies and multi-step turns may differ
    /// from the concatenated deltas), with the turn's token usage.
    Done(Reply),
    Failed(TurnFailure),
}

/// Why an answer did not arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnFailure {
    /// The server is stopping; the message is stored and will be answered after the restart.
    ShuttingDown,
    /// The gateway dropped the answer's receiver without a reply.
    Lost,
}

impl TurnFailure {
    pub fn message(self) -> &'static str {
        match self {
            TurnFailure::ShuttingDown => {
                "The server is restarting; your message is kept and will be answered."
            }
            TurnFailure::Lost => "The answer could not be completed. Please try again.",
        }
    }

    pub fn into_error(self) -> WebError {
        match self {
            TurnFailure::ShuttingDown => WebError::ShuttingDown,
            TurnFailure::Lost => {
                WebError::Internal("the gateway dropped an answer without replying".to_string())
            }
        }
    }
}

/// Forwards the gateway's text deltas and offered files into a channel. `text_delta` is
/// synchronous, hence an unbounded channel; its size is bounded by one answer's text and the
/// turn's tool calls.
struct ChannelDeltas(mpsc::UnboundedSender<TurnEvent>);

impl DeltaSink for ChannelDeltas {
    fn text_delta(&self, text: &str) {
        // A closed receiver means the client went away; the turn still completes and is stored.
        let _ = self.0.send(TurnEvent::Delta(text.to_string()));
    }

    fn file_offered(&self, file: &OfferedFile) {
        let _ = self.0.send(TurnEvent::File(Box::new(file.clone())));
    }
}

/// The primary language subtag of an `Accept-Language` header (`de-DE,de;q=0.9` → `de`).
pub fn language_from(accept_language: Option<&str>) -> Option<String> {
    let first = accept_language?
        .split(',')
        .next()?
        .split(';')
        .next()?
        .trim();
    let primary = first.split('-').next()?.to_ascii_lowercase();
    (!primary.is_empty() && primary.len() <= 8 && primary.chars().all(|c| c.is_ascii_alphabetic()))
        .then_some(primary)
}

/// Submits `text` as `user` and returns the answer's events.
pub async fn submit(
    state: &WebState,
    user: &UserId,
    text: String,
    language: Option<String>,
) -> Result<impl Stream<Item = TurnEvent> + Send + 'static, WebError> {
    if state.inner.shutdown.is_cancelled() {
        return Err(WebError::ShuttingDown);
    }
    let peer = PeerId::new(user.as_str()).map_err(|e| WebError::Internal(e.to_string()))?;
    let message = InboundMessage {
        sender: Identity::new(ChannelKind::Web, peer),
        chat_id: user.as_str().to_string(),
        external_id: moltmate_store::auth::new_secret("web_"),
        cursor: None,
        text,
        sender_name: None,
        language_code: language,
        attachments: Vec::new(),
    };
    let (sender, receiver) = mpsc::unbounded_channel();
    let submitted = state
        .gateway()
        .submit(message, Arc::new(ChannelDeltas(sender)))
        .await?;
    match submitted.accepted {
        Accepted::Queued => Ok(events(
            receiver,
            submitted.reply,
            state.inner.shutdown.clone(),
        )),
        // The external id is random, so a duplicate means a broken store; refusal means the
        // gateway no longer accepts this web user (it does not refuse web peers today).
        Accepted::Duplicate => Err(WebError::Internal(
            "a fresh web message was seen as a duplicate".to_string(),
        )),
        Accepted::Refused => Err(WebError::Forbidden("the gateway refused this message")),
        // Too many of this user's messages wait for an answer (limits.queuedMessages).
        Accepted::QueueFull => Err(WebError::RateLimited {
            retry_after: std::time::Duration::from_secs(5),
        }),
    }
}

struct Following {
    deltas: mpsc::UnboundedReceiver<TurnEvent>,
    reply: oneshot::Receiver<Reply>,
    shutdown: Shutdown,
}

fn events(
    deltas: mpsc::UnboundedReceiver<TurnEvent>,
    reply: oneshot::Receiver<Reply>,
    shutdown: Shutdown,
) -> impl Stream<Item = TurnEvent> + Send + 'static {
    futures::stream::unfold(
        Some(Following {
            deltas,
            reply,
            shutdown,
        }),
        |following| async move {
            let mut f = following?;
            tokio::select! {
                // Deltas are sent before the reply, so draining them first keeps the order.
                biased;
                delta = f.deltas.recv() => match delta {
                    Some(event) => Some((event, Some(f))),
                    None => Some((finished((&mut f.reply).await), None)),
                },
                reply = &mut f.reply => Some((finished(reply), None)),
                _ = f.shutdown.cancelled() => Some((TurnEvent::Failed(TurnFailure::ShuttingDown), None)),
            }
        },
    )
}

fn finished(reply: Result<Reply, oneshot::error::RecvError>) -> TurnEvent {
    match reply {
        Ok(reply) => TurnEvent::Done(reply),
        Err(_) => TurnEvent::Failed(TurnFailure::Lost),
    }
}

/// The links of `files` the reply text does not already contain, one Markdown line each
/// (`[name](url)`), for a caller that shows only text (the API).
pub fn missing_links(reply: &str, files: &[OfferedFile]) -> String {
    let mut out = String::new();
    for file in files {
        if reply.contains(&file.url) || reply.contains(&file.path) {
            continue;
        }
        let name: String = file
            .file_name
            .chars()
            .map(|c| {
                if matches!(c, '[' | ']' | '(' | ')') {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        out.push_str(&format!("\n\n[{name}]({})", file.url));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn languages_are_taken_from_accept_language() {
        assert_eq!(
            language_from(Some("de-DE,de;q=0.9,en;q=0.8")),
            Some("de".to_string())
        );
        assert_eq!(language_from(Some("EN")), Some("en".to_string()));
        assert_eq!(language_from(Some("*")), None);
        assert_eq!(language_from(None), None);
    }

    #[tokio::test]
    async fn deltas_come_before_the_reply() {
        let (tx, rx) = mpsc::unbounded_channel();
        let (reply_tx, reply_rx) = oneshot::channel();
        tx.send(TurnEvent::Delta("a".to_string())).unwrap();
        tx.send(TurnEvent::Delta("b".to_string())).unwrap();
        let reply = Reply {
            text: "ab".to_string(),
            usage: Default::default(),
        };
        reply_tx.send(reply.clone()).unwrap();
        let collected: Vec<TurnEvent> = events(rx, reply_rx, Shutdown::new()).collect().await;
        assert_eq!(
            collected,
            vec![
                TurnEvent::Delta("a".into()),
                TurnEvent::Delta("b".into()),
                TurnEvent::Done(reply)
            ]
        );
    }

    #[tokio::test]
    async fn a_dropped_reply_is_a_failure() {
        let (_tx, rx) = mpsc::unbounded_channel::<TurnEvent>();
        let (reply_tx, reply_rx) = oneshot::channel::<Reply>();
        drop(reply_tx);
        let collected: Vec<TurnEvent> = events(rx, reply_rx, Shutdown::new()).collect().await;
        assert!(matches!(collected.as_slice(), [TurnEvent::Failed(_)]));
    }
}
