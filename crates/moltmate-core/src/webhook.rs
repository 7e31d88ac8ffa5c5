//! Inbound webhooks: how a channel that is pushed to over HTTP (WhatsApp Cloud API) receives
//! deliveries through the gateway's web server without the web layer knowing the channel.
//!
//! The web layer routes `GET`/`POST /webhooks/<channel>` to the [`Webhook`] registered for that
//! channel, with the body already bounded in size and the request already rate-limited; the
//! webhook verifies it (signatures), stores what it carries durably through the gateway, and
//! only then answers 2xx.

use crate::ChannelKind;
use async_trait::async_trait;

/// One HTTP request to a webhook route.
#[derive(Debug, Clone)]
pub struct WebhookRequest {
    /// `true` for POST (a delivery), `false` for GET (a verification handshake).
    pub post: bool,
    /// Query parameters, decoded.
    pub query: Vec<(String, String)>,
    /// Request headers, names lowercase (at most 64, values that are not UTF-8 left out).
    pub headers: Vec<(String, String)>,
    /// The raw body, exactly as received (signatures are over these bytes).
    pub body: Vec<u8>,
}

impl WebhookRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The answer: a status and a short plain-text body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookResponse {
    pub status: u16,
    pub body: String,
}

impl WebhookResponse {
    pub fn new(status: u16, body: impl Into<String>) -> Self {
        WebhookResponse {
            status,
            body: body.into(),
        }
    }
}

/// A channel's webhook endpoint.
#[async_trait]
pub trait Webhook: Send + Sync {
    fn channel(&self) -> ChannelKind;
    async fn handle(&self, request: WebhookRequest) -> WebhookResponse;
}
