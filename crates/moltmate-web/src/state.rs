//! What every handler shares: the gateway, the settings, the rate limiters and the web
//! layer's own metrics.

use crate::error::InvalidSettings;
use crate::security::RateLimits;
use moltmate_core::doctor::SecurityChecks;
use moltmate_core::Shutdown;
use moltmate_gateway::Gateway;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Configuration of the web layer.
#[derive(Clone)]
pub struct WebSettings {
    /// The operator token (`gateway.auth.token`): signs the operator into `/admin`. An empty
    /// token signs nobody in.
    pub admin_token: String,
    /// Sustained requests per minute of one signed-in user (all their tokens and browser
    /// sessions share the bucket; the operator has one of their own).
    pub rate_limit_per_minute: u32,
    /// Requests a signed-in user may make at once before the per-minute rate applies.
    pub rate_limit_burst: u32,
    /// Sustained requests per minute per client IP without a verified credential (no
    /// credential, a wrong one, one not verified recently, every sign-in).
    pub unauthenticated_per_minute: u32,
    /// Burst of the per-IP bucket.
    pub unauthenticated_burst: u32,
    /// Mark cookies `Secure` (set when served over HTTPS, directly or behind a proxy).
    pub secure_cookies: bool,
    /// How long a login link printed by `moltmate users login-link` stays valid. The CLI
    /// creates the link; the web layer only redeems it. Kept here so both read one setting.
    pub login_link_ttl: Duration,
    /// How long a browser stays signed in.
    pub session_ttl: Duration,
    /// Reverse proxies whose `X-Forwarded-For` names the client for rate limiting. Empty:
    /// every request is limited by its TCP peer (behind a proxy, all clients share one bucket).
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// `moltmate doctor`'s checks, run for the admin page's "Security checks" section. The
    /// binary provides them (the web layer knows neither the config nor the sandbox crate);
    /// `None`: the section says they are not available here.
    pub security_checks: Option<Arc<dyn SecurityChecks>>,
    /// The address people open (`gateway.publicUrl`, else the listening address): sign-in
    /// links made on `/admin` point there. Never taken from a request's `Host`.
    pub base_url: String,
    /// Model prices (`model.prices`) for the cost estimates on `/admin`.
    pub prices: moltmate_ops::usage::PriceTable,
    /// Channels pushed to over HTTP (WhatsApp, Slack's Events API), served at
    /// `/webhooks/<channel>`.
    pub webhooks: Vec<Arc<dyn moltmate_core::webhook::Webhook>>,
    /// Files `send_file` put up for download, served at `/files/<id>`; `None`: every such
    /// request is 404.
    pub downloads: Option<moltmate_store::downloads::Downloads>,
    /// How long a client may take to send a request's headers (the first request's, and each
    /// next one's on a kept-alive connection, idle time included) before the connection is
    /// closed. Without it a client sending a byte a minute holds a connection forever.
    pub header_read_timeout: Duration,
    /// How long a request body may take to arrive (a slower one fails with 408).
    pub body_timeout: Duration,
    /// The same for `/webhooks/*`, the path exposed to the internet (bodies of 256 KiB at most).
    pub webhook_body_timeout: Duration,
    /// Open connections at most; more wait in the kernel's accept queue until one closes.
    pub max_connections: usize,
}

impl Default for WebSettings {
    fn default() -> Self {
        WebSettings {
            admin_token: String::new(),
            rate_limit_per_minute: 100,
            rate_limit_burst: 50,
            unauthenticated_per_minute: 60,
            unauthenticated_burst: 30,
            secure_cookies: false,
            login_link_ttl: Duration::from_secs(15 * 60),
            session_ttl: Duration::from_secs(7 * 24 * 3600),
            trusted_proxies: Vec::new(),
            security_checks: None,
            base_url: "http://127.0.0.1:18790".to_string(),
            prices: moltmate_ops::usage::PriceTable::default(),
            webhooks: Vec::new(),
            downloads: None,
            header_read_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            webhook_body_timeout: Duration::from_secs(10),
            max_connections: 512,
        }
    }
}

impl fmt::Debug for WebSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebSettings")
            .field(
                "admin_token",
                &if self.admin_token.is_empty() {
                    "<unset>"
                } else {
                    "<redacted>"
                },
            )
            .field("rate_limit_per_minute", &self.rate_limit_per_minute)
            .field("rate_limit_burst", &self.rate_limit_burst)
            .field(
                "unauthenticated_per_minute",
                &self.unauthenticated_per_minute,
            )
            .field("unauthenticated_burst", &self.unauthenticated_burst)
            .field("secure_cookies", &self.secure_cookies)
            .field("login_link_ttl", &self.login_link_ttl)
            .field("session_ttl", &self.session_ttl)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("security_checks", &self.security_checks.is_some())
            .field("base_url", &self.base_url)
            .field("prices", &self.prices)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("body_timeout", &self.body_timeout)
            .field("webhook_body_timeout", &self.webhook_body_timeout)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// Labels of the request counter. Every value is one of ours (`&'static str`, a status we
/// chose), never text from the request: `prometheus-client` writes label values unescaped.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    /// The route template (`/login/{code}`) from [`crate::ROUTES`], else `unmatched`.
    pub route: &'static str,
    /// A standard method, else `other`.
    pub method: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RateLimitedLabels {
    /// `ip` (no verified credential), `principal` (a user's or the operator's bucket) or
    /// `sign_in` (a sign-in past its address's quota whose credential's tries are used up).
    pub bucket: &'static str,
}

/// The web layer's own metrics, encoded after the gateway's at `/metrics`.
pub(crate) struct WebMetrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub rate_limited: Family<RateLimitedLabels, Counter>,
}

impl WebMetrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("moltmate_web");
        let requests = Family::<RequestLabels, Counter>::default();
        let rate_limited = Family::<RateLimitedLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route template, method and status",
            requests.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by the rate limiter, by bucket (ip or principal)",
            rate_limited.clone(),
        );
        WebMetrics {
            registry,
            requests,
            rate_limited,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "could not encode web metrics");
        }
        out
    }
}

pub(crate) struct Inner {
    pub gateway: Gateway,
    pub settings: WebSettings,
    pub shutdown: Shutdown,
    pub started: Instant,
    pub limits: RateLimits,
    pub metrics: WebMetrics,
    /// SHA-256 of the operator token, compared in constant time (fixed length, so the
    /// comparison does not even leak the token's length).
    pub admin_digest: Option<[u8; 32]>,
    /// At most one "wrong operator token" log line a minute.
    pub wrong_operator_tokens: crate::security::LogThrottle,
}

/// Shared state of the web layer. Cheap to clone.
#[derive(Clone)]
pub struct WebState {
    pub(crate) inner: Arc<Inner>,
}

impl WebState {
    /// `shutdown` is the process-wide shutdown: once it fires, new chat requests get 503 and
    /// open answer streams end.
    pub fn new(
        gateway: Gateway,
        settings: WebSettings,
        shutdown: Shutdown,
    ) -> Result<WebState, InvalidSettings> {
        let limits = RateLimits::new(
            settings.rate_limit_per_minute,
            settings.rate_limit_burst,
            settings.unauthenticated_per_minute,
            settings.unauthenticated_burst,
        )?;
        let admin_digest = (!settings.admin_token.is_empty())
            .then(|| Sha256::digest(settings.admin_token.as_bytes()).into());
        Ok(WebState {
            inner: Arc::new(Inner {
                gateway,
                settings,
                shutdown,
                started: Instant::now(),
                limits,
                metrics: WebMetrics::new(),
                admin_digest,
                wrong_operator_tokens: crate::security::LogThrottle::new(Duration::from_secs(60)),
            }),
        })
    }

    pub fn gateway(&self) -> &Gateway {
        &self.inner.gateway
    }

    pub fn settings(&self) -> &WebSettings {
        &self.inner.settings
    }
}

impl fmt::Debug for WebState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebState")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}
