//! `web_fetch {url}`: one public web page as readable text.
//!
//! The gateway fetches on the model's behalf, so an injected model will aim it at the inside:
//! `http://127.0.0.1:...`, `http://169.254.169.254/` (cloud metadata), a name whose DNS answer
//! is private, or a public page that redirects to any of those. Defences:
//!
//! * only ports in `allowed_ports` (default 80 and 443) are fetched from, on the first URL and
//!   on every redirect, so the tool cannot be aimed at other services of a public host;
//! * the client connects only to addresses returned by [`VettingResolver`], which resolves the
//!   name and drops every forbidden address ([`moltmate_sandbox::proxy::is_forbidden_address`])
//!   and every address of the gateway's own interfaces ([`OwnAddresses`], listed afresh for each
//!   resolution, public ones included) *before* the connector sees it, so a DNS answer that changes between check and connect
//!   (rebinding) cannot slip through: the address checked is the address used;
//! * IP-literal hosts, which never reach a resolver, are vetted directly (same two rules);
//! * redirects are followed by hand (at most [`MAX_REDIRECTS`]), each target re-vetted for
//!   scheme, `allowed_domains`, port and address;
//! * system proxy variables are ignored (a proxy would resolve names itself);
//! * the body is read up to `max_bytes` and no further, all within `timeout`.

use crate::args;
use async_trait::async_trait;
use futures::StreamExt;
use moltmate_core::model::ToolSpec;
use moltmate_core::tool::{Tool, ToolContext, ToolError, ToolOutput};
use moltmate_sandbox::proxy::OwnAddresses;
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use url::{Host, Url};

/// Redirects followed before giving up.
pub const MAX_REDIRECTS: usize = 5;
/// Longest URL accepted.
const MAX_URL_BYTES: usize = 8 * 1024;
/// Longest the HTML-to-text conversion of one page may take (it is linear; this is a backstop).
const HTML_DEADLINE: Duration = Duration::from_secs(10);

/// `tools.web.fetch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebFetchSettings {
    /// When set, only these hosts and their subdomains may be fetched.
    pub allowed_domains: Option<Vec<String>>,
    /// Destination ports that may be fetched from (`tools.web.fetch.allowedPorts`, default 80
    /// and 443): the first URL and every redirect target.
    pub allowed_ports: Vec<u16>,
    /// Bytes of body read at most; the rest is not downloaded.
    pub max_bytes: u64,
    /// The whole fetch (connect, redirects, body) must finish within this.
    pub timeout: Duration,
}

/// Why a [`WebFetchTool`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WebFetchError {
    #[error("web_fetch: max_bytes must be at least 1")]
    ZeroMaxBytes,
    #[error("web_fetch: timeout must be longer than zero")]
    ZeroTimeout,
    #[error("web_fetch: allowed domain {0:?} is not a valid host name")]
    InvalidDomain(String),
    #[error("web_fetch: allowed_ports must list at least one port other than 0")]
    NoPorts,
    #[error("web_fetch: building the HTTP client failed: {0}")]
    Client(#[source] reqwest::Error),
}

impl WebFetchError {
    /// All of these are configuration or environment problems; none goes away by retrying.
    pub fn is_retryable(&self) -> bool {
        match self {
            WebFetchError::ZeroMaxBytes
            | WebFetchError::ZeroTimeout
            | WebFetchError::InvalidDomain(_)
            | WebFetchError::NoPorts
            | WebFetchError::Client(_) => false,
        }
    }
}

/// Which destination addresses may be contacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AddressPolicy {
    /// Public addresses only. The only policy reachable from [`WebFetchTool::new`].
    PublicOnly,
    /// Public addresses plus loopback, for tests against a local server. Every other forbidden
    /// range (private, link-local, metadata...) stays forbidden.
    PublicAndLoopback,
}

/// Why an address may not be contacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// An address of one of the gateway's own interfaces.
    Own,
    /// Loopback, private, link-local, metadata...
    Internal,
}

impl AddressPolicy {
    fn check(self, ip: IpAddr, own: &OwnAddresses) -> Result<(), Refused> {
        if own.contains(ip) {
            return Err(Refused::Own);
        }
        if !moltmate_sandbox::proxy::is_forbidden_address(ip) {
            return Ok(());
        }
        match self {
            AddressPolicy::PublicAndLoopback if is_loopback(ip) => Ok(()),
            AddressPolicy::PublicOnly | AddressPolicy::PublicAndLoopback => Err(Refused::Internal),
        }
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// The error a resolution carries when every address of a name was forbidden; found again by
/// downcasting the request error's source chain.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves only to addresses that may not be contacted ({addresses})")]
struct ForbiddenResolution {
    host: String,
    addresses: String,
    /// Some of them are the gateway's own.
    own: bool,
}

/// The own addresses could not be listed, so no address can be vetted: fail closed.
#[derive(Debug, thiserror::Error)]
#[error("cannot list this server's own network addresses: {0}")]
struct OwnAddressesUnknown(String);

/// Resolves with the system resolver and keeps only permitted addresses.
struct VettingResolver {
    policy: AddressPolicy,
}

impl reqwest::dns::Resolve for VettingResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy;
        let host = name.as_str().to_string();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            // Listed after resolving and for every resolution (so for every redirect):
            // interfaces come and go.
            let own = OwnAddresses::list().await.map_err(|e| {
                let error: Box<dyn std::error::Error + Send + Sync> =
                    Box::new(OwnAddressesUnknown(e.to_string()));
                error
            })?;
            let (allowed, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = resolved
                .into_iter()
                .partition(|addr| policy.check(addr.ip(), &own).is_ok());
            if allowed.is_empty() {
                let addresses = refused
                    .iter()
                    .map(|a| a.ip().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                let own = refused.iter().any(|a| own.contains(a.ip()));
                let error: Box<dyn std::error::Error + Send + Sync> =
                    Box::new(ForbiddenResolution {
                        host,
                        addresses,
                        own,
                    });
                return Err(error);
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// `web_fetch`.
#[derive(Debug, Clone)]
pub struct WebFetchTool {
    client: reqwest::Client,
    settings: Arc<WebFetchSettings>,
    policy: AddressPolicy,
}

impl WebFetchTool {
    /// The production tool: public addresses only.
    pub fn new(settings: WebFetchSettings) -> Result<Self, WebFetchError> {
        Self::build(settings, AddressPolicy::PublicOnly)
    }

    /// **For tests only**: additionally allows loopback destinations so a test can fetch from a
    /// server on 127.0.0.1. Private, link-local and metadata addresses stay refused. Nothing in
    /// the configuration leads here; the gateway calls [`WebFetchTool::new`].
    pub fn new_allowing_loopback_for_tests(
        settings: WebFetchSettings,
    ) -> Result<Self, WebFetchError> {
        Self::build(settings, AddressPolicy::PublicAndLoopback)
    }

    fn build(mut settings: WebFetchSettings, policy: AddressPolicy) -> Result<Self, WebFetchError> {
        if settings.max_bytes == 0 {
            return Err(WebFetchError::ZeroMaxBytes);
        }
        if settings.timeout.is_zero() {
            return Err(WebFetchError::ZeroTimeout);
        }
        settings.allowed_ports.retain(|&p| p != 0);
        if settings.allowed_ports.is_empty() {
            return Err(WebFetchError::NoPorts);
        }
        if let Some(domains) = &mut settings.allowed_domains {
            for domain in domains.iter_mut() {
                let normalized = domain.trim().trim_end_matches('.').to_ascii_lowercase();
                let valid = !normalized.is_empty()
                    && normalized
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == ':')
                    && !normalized.contains("..");
                if !valid {
                    return Err(WebFetchError::InvalidDomain(domain.clone()));
                }
                *domain = normalized;
            }
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(VettingResolver { policy }))
            .connect_timeout(settings.timeout)
            .user_agent(concat!("moltmate-web-fetch/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(WebFetchError::Client)?;
        Ok(WebFetchTool {
            client,
            settings: Arc::new(settings),
            policy,
        })
    }

    /// Checks scheme, `allowed_domains`, port and (for IP literals) the address of one URL.
    fn vet_url(&self, url: &Url, own: &OwnAddresses) -> Result<(), ToolError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ToolError::Refused(format!(
                "only http and https URLs can be fetched, not `{}:`",
                url.scheme()
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(ToolError::Refused(
                "URLs with credentials (user:password@) are not fetched".into(),
            ));
        }
        let host = url
            .host()
            .ok_or_else(|| ToolError::InvalidArguments(format!("`{url}` has no host")))?;
        let host_text = match &host {
            Host::Domain(d) => d.trim_end_matches('.').to_ascii_lowercase(),
            Host::Ipv4(ip) => ip.to_string(),
            Host::Ipv6(ip) => ip.to_string(),
        };
        if let Some(domains) = &self.settings.allowed_domains {
            let allowed = domains.iter().any(|d| {
                host_text == *d
                    || host_text
                        .strip_suffix(d.as_str())
                        .is_some_and(|p| p.ends_with('.'))
            });
            if !allowed {
                return Err(ToolError::Refused(format!(
                    "`{host_text}` is not in the allowed domains ({})",
                    domains.join(", ")
                )));
            }
        }
        // http and https always have a port (explicit or the scheme's default).
        let port = url.port_or_known_default().unwrap_or(0);
        if !self.settings.allowed_ports.contains(&port) {
            return Err(ToolError::Refused(format!(
                "port {port} is not allowed; web_fetch only reaches port{} {}",
                if self.settings.allowed_ports.len() == 1 {
                    ""
                } else {
                    "s"
                },
                self.settings
                    .allowed_ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let literal = match host {
            Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
            Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
            Host::Domain(_) => None,
        };
        if let Some(ip) = literal {
            match self.policy.check(ip, own) {
                Ok(()) => {}
                Err(Refused::Own) => return Err(own_address(&ip.to_string())),
                Err(Refused::Internal) => return Err(forbidden_address(&ip.to_string())),
            }
        }
        Ok(())
    }

    async fn fetch(&self, start: Url) -> Result<ToolOutput, ToolError> {
        let mut url = start;
        let mut redirects = 0;
        let response = loop {
            let own = OwnAddresses::list().await.map_err(|e| {
                ToolError::Failed(format!(
                    "cannot list this server's own network addresses ({e}), so nothing is fetched"
                ))
            })?;
            self.vet_url(&url, &own)?;
            let response = self
                .client
                .get(url.clone())
                .send()
                .await
                .map_err(|e| request_error(&e, &url))?;
            if !response.status().is_redirection() {
                break response;
            }
            let Some(location) = response.headers().get(reqwest::header::LOCATION) else {
                break response;
            };
            if redirects >= MAX_REDIRECTS {
                return Err(ToolError::Failed(format!(
                    "too many redirects (more than {MAX_REDIRECTS})"
                )));
            }
            let location = location
                .to_str()
                .map_err(|_| ToolError::Failed("the redirect target is not a valid URL".into()))?;
            url = url.join(location).map_err(|e| {
                ToolError::Failed(format!(
                    "the redirect target `{location}` is not a valid URL: {e}"
                ))
            })?;
            redirects += 1;
        };
        let status = response.status();
        let final_url = response.url().clone();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
        let kind = match content_type.as_deref() {
            Some("text/html" | "application/xhtml+xml") => Kind::Html,
            Some(t)
                if t.starts_with("text/") || t == "application/json" || t.ends_with("+json") =>
            {
                Kind::Text
            }
            Some("application/xml") => Kind::Text,
            Some(t) if t.ends_with("+xml") => Kind::Text,
            None => Kind::Text,
            Some(other) => {
                return Err(ToolError::Refused(format!(
                    "`{final_url}` is `{other}`; web_fetch only returns HTML, text and JSON"
                )))
            }
        };
        let (body, truncated) = self.read_body(response).await?;
        if kind == Kind::Text && content_type.is_none() && body.contains(&0) {
            return Err(ToolError::Refused(format!(
                "`{final_url}` has no content type and looks binary"
            )));
        }
        let readable = match kind {
            // Converting is CPU work on up to `max_bytes` of hostile markup: on the blocking
            // pool, abandoned after a deadline, never on the runtime.
            Kind::Html => {
                let base = final_url.clone();
                moltmate_core::blocking::run("converting the page", HTML_DEADLINE, move || {
                    crate::html::html_to_text(&String::from_utf8_lossy(&body), Some(&base))
                })
                .await
                .map_err(|e| {
                    ToolError::Failed(format!("`{final_url}` could not be converted to text: {e}"))
                })?
            }
            Kind::Text => String::from_utf8_lossy(&body).into_owned(),
        };
        let mut out = format!("URL: {final_url}\nStatus: {}\n", status.as_u16());
        if truncated {
            out.push_str(&format!(
                "Note: the page is larger than {} bytes; only the beginning was read.\n",
                self.settings.max_bytes
            ));
        }
        out.push('\n');
        out.push_str(&readable);
        Ok(ToolOutput::text(out))
    }

    /// Reads at most `max_bytes`; stops downloading as soon as more would be needed.
    async fn read_body(&self, response: reqwest::Response) -> Result<(Vec<u8>, bool), ToolError> {
        let max = usize::try_from(self.settings.max_bytes).unwrap_or(usize::MAX);
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ToolError::Failed(format!("reading the page failed: {}", describe(&e)))
            })?;
            let room = max - body.len();
            if chunk.len() > room {
                body.extend_from_slice(&chunk[..room]);
                return Ok((body, true));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((body, false))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Html,
    Text,
}

fn own_address(what: &str) -> ToolError {
    ToolError::Refused(format!(
        "{what} is an address of this server itself; web_fetch only reaches public web sites"
    ))
}

fn forbidden_address(what: &str) -> ToolError {
    ToolError::Refused(format!(
        "{what} is a local, private or otherwise internal address; web_fetch only reaches public web sites"
    ))
}

/// Classifies a request error by walking its source chain: a refusal from our resolver is a
/// refusal, everything else is a failure the model may retry.
fn request_error(e: &reqwest::Error, url: &Url) -> ToolError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(forbidden) = err.downcast_ref::<ForbiddenResolution>() {
            let what = format!("`{}` ({})", forbidden.host, forbidden.addresses);
            return if forbidden.own {
                own_address(&what)
            } else {
                forbidden_address(&what)
            };
        }
        if let Some(unknown) = err.downcast_ref::<OwnAddressesUnknown>() {
            return ToolError::Failed(format!("{unknown}, so nothing is fetched"));
        }
        source = err.source();
    }
    let host = url.host_str().unwrap_or("?");
    if e.is_timeout() {
        ToolError::Failed(format!("fetching from {host} timed out"))
    } else if e.is_connect() {
        ToolError::Failed(format!("could not connect to {host}: {}", describe(e)))
    } else {
        ToolError::Failed(format!("fetching from {host} failed: {}", describe(e)))
    }
}

/// The innermost cause, which is usually the informative one ("connection refused").
fn describe(e: &reqwest::Error) -> String {
    let mut last: &dyn std::error::Error = e;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchArgs {
    url: String,
}

#[async_trait]
impl Tool for WebFetchTool {
    fn spec(&self) -> ToolSpec {
        let mut description = String::from(
            "Fetch a public web page (http or https) and return it as readable text: HTML is reduced to its text with links kept as `text (url)`; plain text and JSON are returned as they are. Other content types (images, PDFs, archives) are refused. Large pages are cut.",
        );
        if let Some(domains) = &self.settings.allowed_domains {
            description.push_str(&format!(
                " Only these domains and their subdomains can be fetched: {}.",
                domains.join(", ")
            ));
        }
        ToolSpec {
            name: "web_fetch".into(),
            description,
            parameters: std::sync::Arc::new(json!({
                "type": "object",
                "properties": {
                    "url": {"type": "string", "description": "The full URL, starting with http:// or https://."}
                },
                "required": ["url"],
                "additionalProperties": false
            })),
        }
    }

    async fn call(&self, _ctx: &ToolContext, arguments: Value) -> Result<ToolOutput, ToolError> {
        let args: FetchArgs = args::parse("web_fetch", arguments)?;
        let raw = args.url.trim();
        if raw.len() > MAX_URL_BYTES {
            return Err(ToolError::InvalidArguments(format!(
                "the URL is longer than {MAX_URL_BYTES} bytes"
            )));
        }
        let url = Url::parse(raw)
            .map_err(|e| ToolError::InvalidArguments(format!("`{raw}` is not a valid URL: {e}")))?;
        match tokio::time::timeout(self.settings.timeout, self.fetch(url)).await {
            Ok(result) => result,
            Err(_) => Err(ToolError::Failed(format!(
                "the fetch did not finish within {} seconds",
                self.settings.timeout.as_secs_f64()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(policy: AddressPolicy, allowed: Option<Vec<&str>>) -> WebFetchTool {
        let settings = WebFetchSettings {
            allowed_domains: allowed.map(|d| d.into_iter().map(String::from).collect()),
            allowed_ports: vec![80, 443, 8080],
            max_bytes: 1024,
            timeout: Duration::from_secs(5),
        };
        WebFetchTool::build(settings, policy).unwrap()
    }

    fn none() -> OwnAddresses {
        OwnAddresses::default()
    }

    #[test]
    fn own_interface_addresses_are_refused_even_when_public() {
        let own = OwnAddresses::from_addresses(vec!["93.184.215.14".parse().unwrap()]);
        for policy in [AddressPolicy::PublicOnly, AddressPolicy::PublicAndLoopback] {
            let t = tool(policy, None);
            for url in ["https://93.184.215.14/", "http://[::ffff:93.184.215.14]/"] {
                match t.vet_url(&Url::parse(url).unwrap(), &own) {
                    Err(ToolError::Refused(m)) => assert!(m.contains("this server itself"), "{m}"),
                    other => panic!("{url}: {other:?}"),
                }
            }
            assert!(t
                .vet_url(&Url::parse("https://93.184.215.15/").unwrap(), &own)
                .is_ok());
        }
    }

    #[test]
    fn ports_outside_the_list_are_refused() {
        let t = tool(AddressPolicy::PublicOnly, None);
        for url in [
            "http://93.184.215.14:22/",
            "https://93.184.215.14:8443/",
            "http://example.org:6379/",
            "http://example.org:0/",
        ] {
            match t.vet_url(&Url::parse(url).unwrap(), &none()) {
                Err(ToolError::Refused(m)) => {
                    assert!(m.contains("ports 80, 443, 8080"), "{url}: {m}")
                }
                other => panic!("{url}: {other:?}"),
            }
        }
        for url in [
            "http://example.org/",
            "https://example.org/",
            "http://example.org:443/",
            "https://example.org:80/",
            "http://example.org:8080/",
        ] {
            assert!(
                t.vet_url(&Url::parse(url).unwrap(), &none()).is_ok(),
                "{url}"
            );
        }
    }

    #[test]
    fn production_policy_refuses_internal_literals() {
        let t = tool(AddressPolicy::PublicOnly, None);
        for url in [
            "http://127.0.0.1/",
            "http://2130706433/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.1/",
            "http://192.168.1.1/",
            "http://0.0.0.0/",
            "http://224.0.0.1/",
            "http://[fe80::1]/",
        ] {
            let parsed = Url::parse(url).unwrap();
            assert!(
                matches!(t.vet_url(&parsed, &none()), Err(ToolError::Refused(_))),
                "{url}"
            );
        }
        assert!(t
            .vet_url(&Url::parse("https://93.184.215.14/").unwrap(), &none())
            .is_ok());
    }

    #[test]
    fn test_policy_still_refuses_private_and_metadata() {
        let t = tool(AddressPolicy::PublicAndLoopback, None);
        assert!(t
            .vet_url(&Url::parse("http://127.0.0.1:8080/").unwrap(), &none())
            .is_ok());
        for url in [
            "http://169.254.169.254/",
            "http://10.1.2.3/",
            "http://[fd00::1]/",
        ] {
            assert!(
                matches!(
                    t.vet_url(&Url::parse(url).unwrap(), &none()),
                    Err(ToolError::Refused(_))
                ),
                "{url}"
            );
        }
    }

    #[test]
    fn allowed_domains_match_host_and_subdomains_only() {
        let t = tool(AddressPolicy::PublicOnly, Some(vec!["Example.org."]));
        assert!(t
            .vet_url(&Url::parse("https://example.org/a").unwrap(), &none())
            .is_ok());
        assert!(t
            .vet_url(&Url::parse("https://docs.example.org/a").unwrap(), &none())
            .is_ok());
        for url in [
            "https://badexample.org/",
            "https://example.org.evil.com/",
            "https://other.net/",
        ] {
            assert!(
                matches!(
                    t.vet_url(&Url::parse(url).unwrap(), &none()),
                    Err(ToolError::Refused(_))
                ),
                "{url}"
            );
        }
    }

    #[test]
    fn schemes_other_than_http_are_refused() {
        let t = tool(AddressPolicy::PublicOnly, None);
        for url in [
            "file:///etc/passwd",
            "ftp://example.org/",
            "gopher://example.org/",
        ] {
            assert!(
                matches!(
                    t.vet_url(&Url::parse(url).unwrap(), &none()),
                    Err(ToolError::Refused(_))
                ),
                "{url}"
            );
        }
    }

    #[test]
    fn settings_are_validated() {
        let bad = WebFetchSettings {
            allowed_domains: None,
            allowed_ports: vec![80],
            max_bytes: 0,
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            WebFetchTool::new(bad),
            Err(WebFetchError::ZeroMaxBytes)
        ));
        let bad = WebFetchSettings {
            allowed_domains: Some(vec!["exa mple.org".into()]),
            allowed_ports: vec![80],
            max_bytes: 1,
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            WebFetchTool::new(bad),
            Err(WebFetchError::InvalidDomain(_))
        ));
    }
}
