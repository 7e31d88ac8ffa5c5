//! The egress proxy behind `sandbox.network = proxy`, and the address rules it enforces.
//!
//! **Shape.** A gateway-side HTTP proxy (absolute-form HTTP forwarding and `CONNECT` tunnels)
//! listening on one unix socket per user, `state_dir/proxy/<user>.sock`: the proxy knows the
//! user by the socket a request arrives on, never by anything the sandbox says. Sandboxes have no
//! network; inside each, [`FORWARDER_SCRIPT`] listens on 127.0.0.1:3128 of the sandbox's own
//! network namespace and relays to the socket mounted at [`PROXY_SOCKET_PATH`], and the
//! sandbox gets `HTTP_PROXY`/`HTTPS_PROXY` = [`PROXY_URL`].
//!
//! **Rules.** Only hosts equal to, or a subdomain of, an entry of `allowed_domains`; only ports
//! in [`ProxyConfig::allowed_ports`]. Host names are normalised (lowercase, one trailing dot
//! dropped) and refused when odd: IP literals in any notation (`127.0.0.1`, `0x7f.1`,
//! `2130706433`, `[::1]`), userinfo (`user@host`), NUL or other bytes outside the hostname
//! alphabet, empty or over-long labels and names. The proxy resolves the name itself, exactly
//! once, refuses the request if *any* answer is a forbidden address ([`is_forbidden_address`])
//! or an address of one of the gateway's own network interfaces ([`OwnAddresses`], listed
//! afresh for every request, public ones included: a service the gateway host runs on its
//! public address is still "the inside"), and connects only to an address it vetted, so DNS rebinding between check and connect is
//! impossible. Every request is logged (target `moltmate::egress`: user, method, host, port,
//! outcome; never bodies, paths or headers) and reported to an optional observer.
//!
//! [`is_forbidden_address`] is a pure function shared with every other component that fetches
//! URLs on a user's behalf (e.g. the `web_fetch` tool): an address the proxy would refuse must be
//! refused there too, or the tool becomes the way around the proxy.

use crate::settings::SandboxSettings;
use moltmate_core::UserId;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// True when `ip` must never be contacted on a user's behalf: loopback, private (RFC 1918),
/// carrier-grade NAT (100.64/10), link-local (169.254/16, which holds the cloud metadata address
/// 169.254.169.254; fe80::/10), unique-local (fc00::/7), multicast, broadcast, unspecified,
/// documentation/benchmark/reserved ranges, and every IPv6 form that embeds an IPv4 address
/// (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo) whose embedded address is itself
/// forbidden — or, for translation prefixes that could point anywhere, always.
pub fn is_forbidden_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => is_forbidden_v6(v6),
    }
}

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()            // 0.0.0.0
        || a == 0                  // 0/8 "this network": reaches the local host on Linux
        || ip.is_loopback()        // 127/8
        || ip.is_private()         // 10/8, 172.16/12, 192.168/16
        || (a == 100 && (64..128).contains(&b)) // 100.64/10 CGNAT
        || ip.is_link_local()      // 169.254/16 incl. metadata 169.254.169.254
        || (a == 192 && b == 0 && c == 0) // 192.0.0/24 IETF protocol assignments
        || ip.is_documentation()   // 192.0.2/24, 198.51.100/24, 203.0.113/24
        || (a == 198 && (b == 18 || b == 19)) // 198.18/15 benchmarking
        || (a == 192 && b == 88 && c == 99) // 6to4 relay anycast (deprecated)
        || ip.is_multicast()       // 224/4
        || a >= 240 // 240/4 reserved, incl. broadcast 255.255.255.255
}

fn is_forbidden_v6(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return true;
    }
    // Every spelling that reaches an IPv4 address (IPv4-mapped, IPv4-translated, NAT64's
    // well-known /96, 6to4) is judged as that address: one table, shared with `OwnAddresses`.
    if let Some(v4) = embedded_ipv4(ip) {
        return is_forbidden_v4(v4);
    }
    // IPv4-compatible ::a.b.c.d (deprecated) and the all-zero prefix generally: never a
    // legitimate public destination.
    if seg[..6].iter().all(|&s| s == 0) {
        return true;
    }
    // NAT64 local-use 64:ff9b:1::/48 (and anything else under 64:ff9b::/32 that is not the
    // well-known /96): may be translated to anything, so refuse it outright.
    if seg[0] == 0x64 && seg[1] == 0xff9b {
        return true;
    }
    match seg[0] {
        // fc00::/7 unique local.
        s if s & 0xfe00 == 0xfc00 => true,
        // fe80::/10 link-local, fec0::/10 deprecated site-local.
        s if s & 0xffc0 == 0xfe80 || s & 0xffc0 == 0xfec0 => true,
        // 2001:db8::/32 documentation.
        0x2001 if seg[1] == 0x0db8 => true,
        // 2001:0::/32 Teredo: tunnels to an IPv4 address the proxy cannot vet.
        0x2001 if seg[1] == 0 => true,
        // 2001:10::/28 ORCHID, 2001:20::/28 ORCHIDv2, 2001:2::/48 benchmarking.
        0x2001 if (seg[1] & 0xfff0) == 0x0010 || (seg[1] & 0xfff0) == 0x0020 => true,
        0x2001 if seg[1] == 0x0002 && seg[2] == 0 => true,
        // 100::/64 discard-only.
        0x0100 if seg[1..4].iter().all(|&s| s == 0) => true,
        // 3fff::/20 documentation (RFC 9637).
        0x3fff if seg[1] & 0xf000 == 0 => true,
        _ => false,
    }
}

/// The addresses of this host's own network interfaces, listed with `getifaddrs` (the
/// `if-addrs` crate), public ones included. Loopback and link-local addresses are left out:
/// [`is_forbidden_address`] refuses them everywhere anyway, with its own message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnAddresses(Vec<IpAddr>);

impl OwnAddresses {
    /// Lists the interfaces now. Blocking (a netlink round trip); async callers use
    /// [`OwnAddresses::list`].
    pub fn list_blocking() -> std::io::Result<Self> {
        let mut addrs: Vec<IpAddr> = if_addrs::get_if_addrs()?
            .into_iter()
            .map(|i| canonical(i.ip()))
            .filter(|ip| !ip.is_loopback())
            .collect();
        addrs.sort();
        addrs.dedup();
        Ok(OwnAddresses(addrs))
    }

    /// Lists the interfaces now, off the async runtime.
    pub async fn list() -> std::io::Result<Self> {
        tokio::task::spawn_blocking(Self::list_blocking)
            .await
            .map_err(|e| std::io::Error::other(format!("listing interfaces failed: {e}")))?
    }

    /// A fixed list, for tests.
    pub fn from_addresses(addrs: Vec<IpAddr>) -> Self {
        OwnAddresses(addrs.into_iter().map(canonical).collect())
    }

    /// True when `ip` (in any spelling that reaches an IPv4 address: mapped, translated, NAT64,
    /// 6to4) is one of this host's addresses.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&canonical(ip))
    }

    /// The listed addresses.
    pub fn addresses(&self) -> &[IpAddr] {
        &self.0
    }
}

/// The IPv4 address an IPv6 spelling reaches, if it is one of the forms that carry an IPv4
/// address to a host other than an IPv6 one: IPv4-mapped `::ffff:a.b.c.d`, IPv4-translated
/// `::ffff:0:a.b.c.d` (RFC 2765), NAT64's well-known prefix `64:ff9b::a.b.c.d` (RFC 6052, what
/// DNS64 synthesises) and 6to4 `2002:aabb:ccdd::/48` (RFC 3056). Both the forbidden-range check
/// and the own-address check go through it, so no spelling of an IPv4 address escapes either.
/// (The all-zero prefix, NAT64 local-use and Teredo are refused outright by
/// [`is_forbidden_address`] and need no mapping.)
pub fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let seg = ip.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if let Some(mapped) = ip.to_ipv4_mapped() {
        return Some(mapped);
    }
    if seg[..4].iter().all(|&s| s == 0) && seg[4] == 0xffff && seg[5] == 0 {
        return Some(v4(seg[6], seg[7]));
    }
    if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6].iter().all(|&s| s == 0) {
        return Some(v4(seg[6], seg[7]));
    }
    if seg[0] == 0x2002 {
        return Some(v4(seg[1], seg[2]));
    }
    None
}

/// Any IPv6 spelling of an IPv4 address ([`embedded_ipv4`]) → that IPv4 address; everything
/// else unchanged.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_ipv4(v6).map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

// ---------------------------------------------------------------------------------------------
// the proxy server

/// The in-sandbox forwarder (python3, stdlib only). Run it with [`forwarder_command`].
pub const FORWARDER_SCRIPT: &str = include_str!("../../../sandbox/proxy-forwarder.py");
/// Where sandboxes find the forwarder script.
pub const FORWARDER_PATH: &str = "/run/moltmate/fwd.py";
/// Where sandboxes find their user's proxy socket. Docker mounts the socket's directory (see
/// [`EgressProxy::user_socket`]) at its parent, so a restarted proxy's new socket is seen by
/// containers that outlived the old one.
pub const PROXY_SOCKET_PATH: &str = "/run/moltmate/proxy/proxy.sock";
/// The directory holding [`PROXY_SOCKET_PATH`].
pub const PROXY_SOCKET_DIR: &str = "/run/moltmate/proxy";
/// The forwarder creates this file once it listens.
pub const FORWARDER_READY_FILE: &str = "/tmp/.moltmate-proxy-ready";
/// The value of `HTTP_PROXY`/`HTTPS_PROXY` inside sandboxes.
pub const PROXY_URL: &str = "http://127.0.0.1:3128";

/// The command that starts the forwarder inside a sandbox (script at [`FORWARDER_PATH`], user
/// socket at [`PROXY_SOCKET_PATH`]).
pub fn forwarder_command() -> Vec<String> {
    vec!["python3".to_string(), FORWARDER_PATH.to_string()]
}

/// Longest request head (request line + headers) the proxy reads.
const MAX_HEAD_BYTES: usize = 16 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HOST_LEN: usize = 253;
/// Open connections one user may hold through the proxy; bounds what one sandbox can make the
/// gateway hold open.
pub const MAX_CONNECTIONS_PER_USER: usize = 64;

/// Errors starting or using the proxy (not refusals of requests: those are [`EgressRefusal`]).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("egress proxy: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("egress proxy is shut down")]
    ShutDown,
}

impl ProxyError {
    pub fn is_retryable(&self) -> bool {
        match self {
            ProxyError::Io { .. } => true,
            ProxyError::ShutDown => false,
        }
    }
}

/// Why one request was refused. The Display text is sent to the sandbox in a 403/502 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressRefusal {
    #[error("malformed proxy request: {0}")]
    Malformed(String),
    #[error("host name {0:?} is not allowed: {1}")]
    BadHost(String, &'static str),
    #[error("{0} is not in the allowed domains")]
    DomainNotAllowed(String),
    #[error("port {0} is not allowed (sandbox.allowedPorts)")]
    PortNotAllowed(u16),
    #[error(
        "{host} resolves to {addr}, a private, loopback, link-local or otherwise internal address"
    )]
    ForbiddenAddress { host: String, addr: IpAddr },
    #[error("{host} resolves to {addr}, an address of this server itself")]
    OwnAddress { host: String, addr: IpAddr },
    #[error("cannot list this server's own addresses, so no address can be vetted")]
    OwnAddressesUnknown,
    #[error("cannot resolve {0}")]
    Unresolvable(String),
    #[error("cannot connect to {0}")]
    Unreachable(String),
    #[error("too many open connections (limit {0} per user)")]
    TooManyConnections(usize),
}

impl EgressRefusal {
    /// HTTP status the sandbox receives: policy refusals are 403, upstream failures 502, bad
    /// requests 400.
    pub fn status(&self) -> u16 {
        match self {
            EgressRefusal::Malformed(_) => 400,
            EgressRefusal::BadHost(..)
            | EgressRefusal::DomainNotAllowed(_)
            | EgressRefusal::PortNotAllowed(_)
            | EgressRefusal::ForbiddenAddress { .. }
            | EgressRefusal::OwnAddress { .. } => 403,
            EgressRefusal::Unresolvable(_)
            | EgressRefusal::Unreachable(_)
            | EgressRefusal::OwnAddressesUnknown => 502,
            EgressRefusal::TooManyConnections(_) => 429,
        }
    }
}

/// One request as seen by the proxy, logged and sent to the observer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressEvent {
    pub user: UserId,
    pub method: String,
    /// Normalised host (or the raw one, truncated, when it was refused as malformed).
    pub host: String,
    pub port: u16,
    /// `Ok(addr)` = connected to this vetted address.
    pub outcome: Result<SocketAddr, EgressRefusal>,
}

/// Name resolution and connecting, injectable so tests can point names at local servers
/// without weakening the address rules.
#[async_trait::async_trait]
pub trait EgressNetwork: Send + Sync {
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<IpAddr>>;
    async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream>;
}

/// The host's resolver and TCP stack.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemNetwork;

#[async_trait::async_trait]
impl EgressNetwork for SystemNetwork {
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<IpAddr>> {
        Ok(tokio::net::lookup_host((host, port))
            .await?
            .map(|a| a.ip())
            .collect())
    }
    async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        TcpStream::connect(addr).await
    }
}

/// Configuration of the proxy.
#[derive(Clone)]
pub struct ProxyConfig {
    /// Directory of the per-user sockets (created 0700).
    pub socket_dir: PathBuf,
    /// Allowed domains: a host matches `d` when it equals `d` or ends with `.d`.
    pub allowed_domains: Vec<String>,
    /// Allowed destination ports (`sandbox.allowedPorts`); only these, so an empty list allows
    /// none.
    pub allowed_ports: Vec<u16>,
    pub network: Arc<dyn EgressNetwork>,
    /// Receives every [`EgressEvent`] (audit, tests).
    pub observer: Option<tokio::sync::mpsc::UnboundedSender<EgressEvent>>,
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("socket_dir", &self.socket_dir)
            .field("allowed_domains", &self.allowed_domains)
            .field("allowed_ports", &self.allowed_ports)
            .finish_non_exhaustive()
    }
}

impl ProxyConfig {
    /// The production configuration: sockets in `state_dir/proxy`, ports 80 and 443, the
    /// system resolver.
    pub fn from_settings(settings: &SandboxSettings) -> Self {
        ProxyConfig {
            socket_dir: settings.state_dir.join("proxy"),
            allowed_domains: settings.allowed_domains.clone(),
            allowed_ports: vec![80, 443],
            network: Arc::new(SystemNetwork),
            observer: None,
        }
    }
}

/// The running egress proxy. Sockets are created per user on first use and served until the
/// proxy is dropped or [`EgressProxy::shutdown`] is called.
pub struct EgressProxy {
    config: ProxyConfig,
    domains: Vec<String>,
    sockets: Mutex<HashMap<UserId, PathBuf>>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressProxy")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl EgressProxy {
    /// Starts the proxy for `settings` (see [`ProxyConfig::from_settings`]).
    pub fn start(settings: &SandboxSettings) -> Result<Arc<Self>, ProxyError> {
        Self::start_with(ProxyConfig::from_settings(settings))
    }

    /// Starts the proxy with an explicit configuration.
    pub fn start_with(config: ProxyConfig) -> Result<Arc<Self>, ProxyError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.socket_dir)
            .map_err(|source| ProxyError::Io {
                context: format!("cannot create {}", config.socket_dir.display()),
                source,
            })?;
        let domains = config
            .allowed_domains
            .iter()
            .filter_map(|d| {
                let d = d
                    .trim()
                    .trim_start_matches("*.")
                    .trim_start_matches('.')
                    .to_ascii_lowercase();
                let d = d.strip_suffix('.').map(str::to_string).unwrap_or(d);
                if d.is_empty() {
                    None
                } else {
                    Some(d)
                }
            })
            .collect();
        Ok(Arc::new(EgressProxy {
            config,
            domains,
            sockets: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
        }))
    }

    /// The socket of `user`, listening from the first call on. Must be called inside a tokio
    /// runtime.
    pub fn user_socket(&self, user: &UserId) -> Result<PathBuf, ProxyError> {
        if self.shutdown.is_cancelled() {
            return Err(ProxyError::ShutDown);
        }
        // A poisoned map only means a panic elsewhere while inserting; its entries are valid.
        let mut sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(path) = sockets.get(user) {
            if path.exists() {
                return Ok(path.clone());
            }
        }
        // One directory per user, holding only that user's socket: mounted whole into the
        // user's container, it shows a socket re-bound by a restarted gateway. 0755 so the
        // sandbox's forwarder can reach the socket; the parent (0700) keeps host users out.
        let dir = self.config.socket_dir.join(user.as_str());
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(|source| ProxyError::Io {
                context: format!("cannot create {}", dir.display()),
                source,
            })?;
        let path = dir.join("proxy.sock");
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ProxyError::Io {
                    context: format!("cannot remove stale {}", path.display()),
                    source,
                })
            }
        }
        let listener = UnixListener::bind(&path).map_err(|source| ProxyError::Io {
            context: format!("cannot bind {}", path.display()),
            source,
        })?;
        // The directory (0700) keeps other host users out; the socket itself must be usable by
        // the sandbox user that it is mounted into.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).map_err(
            |source| ProxyError::Io {
                context: format!("cannot chmod {}", path.display()),
                source,
            },
        )?;
        let ctx = Arc::new(ConnContext {
            user: user.clone(),
            domains: self.domains.clone(),
            ports: self.config.allowed_ports.clone(),
            network: self.config.network.clone(),
            observer: self.config.observer.clone(),
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS_PER_USER)),
        });
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    a = listener.accept() => a,
                };
                match accepted {
                    Ok((mut stream, _)) => {
                        let ctx = ctx.clone();
                        let shutdown = shutdown.clone();
                        let Ok(permit) = ctx.slots.clone().try_acquire_owned() else {
                            let refusal =
                                EgressRefusal::TooManyConnections(MAX_CONNECTIONS_PER_USER);
                            ctx.report("?", "?", 0, Err(refusal.clone()));
                            tokio::spawn(async move {
                                // Read the request first: closing a socket with unread data
                                // would reset it before the client sees the answer.
                                let _ = tokio::time::timeout(
                                    Duration::from_secs(2),
                                    read_head(&mut stream),
                                )
                                .await;
                                respond_error(&mut stream, &refusal).await
                            });
                            continue;
                        };
                        tokio::spawn(async move {
                            let _permit = permit;
                            tokio::select! {
                                _ = shutdown.cancelled() => {}
                                _ = handle_connection(stream, &ctx) => {}
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(target: "moltmate::egress", user = %ctx.user, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        sockets.insert(user.clone(), path.clone());
        Ok(path)
    }

    /// Stops every listener and open connection, and removes the sockets.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
        let sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        for path in sockets.values() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct ConnContext {
    user: UserId,
    domains: Vec<String>,
    ports: Vec<u16>,
    network: Arc<dyn EgressNetwork>,
    observer: Option<tokio::sync::mpsc::UnboundedSender<EgressEvent>>,
    slots: Arc<tokio::sync::Semaphore>,
}

impl ConnContext {
    fn report(
        &self,
        method: &str,
        host: &str,
        port: u16,
        outcome: Result<SocketAddr, EgressRefusal>,
    ) {
        match &outcome {
            Ok(addr) => tracing::info!(
                target: "moltmate::egress", user = %self.user, method, host, port, %addr, outcome = "allowed", "egress request"
            ),
            Err(refusal) => tracing::info!(
                target: "moltmate::egress", user = %self.user, method, host, port, outcome = "refused", reason = %refusal, "egress request"
            ),
        }
        if let Some(obs) = &self.observer {
            let _ = obs.send(EgressEvent {
                user: self.user.clone(),
                method: method.to_string(),
                host: host.to_string(),
                port,
                outcome,
            });
        }
    }
}

/// A parsed request head.
struct Head {
    method: String,
    host: String,
    port: u16,
    /// Bytes to send upstream first: the rewritten head for plain HTTP; empty for CONNECT.
    upstream_head: Vec<u8>,
    /// Bytes the client sent after the head (start of a body, or of the TLS handshake).
    rest: Vec<u8>,
}

async fn handle_connection(mut client: UnixStream, ctx: &ConnContext) {
    let raw = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client)).await {
        Ok(Ok(raw)) => raw,
        Ok(Err(refusal)) => {
            ctx.report("?", "?", 0, Err(refusal.clone()));
            respond_error(&mut client, &refusal).await;
            return;
        }
        Err(_) => return,
    };
    let head = match parse_head(&raw) {
        Ok(h) => h,
        Err(refusal) => {
            ctx.report("?", "?", 0, Err(refusal.clone()));
            respond_error(&mut client, &refusal).await;
            return;
        }
    };
    let method = head.method.clone();
    let upstream = match vet_and_connect(ctx, &head.host, head.port).await {
        Ok(pair) => pair,
        Err(refusal) => {
            let shown: String = head.host.chars().take(MAX_HOST_LEN).collect();
            ctx.report(&method, &shown, head.port, Err(refusal.clone()));
            respond_error(&mut client, &refusal).await;
            return;
        }
    };
    let (mut upstream, host, addr) = upstream;
    ctx.report(&method, &host, head.port, Ok(addr));
    if method == "CONNECT" {
        if client
            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
    } else if upstream.write_all(&head.upstream_head).await.is_err() {
        return;
    }
    if !head.rest.is_empty() && upstream.write_all(&head.rest).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

async fn respond_error(client: &mut UnixStream, refusal: &EgressRefusal) {
    let body = format!("moltmate egress proxy: {refusal}\n");
    let reason = match refusal.status() {
        400 => "Bad Request",
        403 => "Forbidden",
        429 => "Too Many Requests",
        _ => "Bad Gateway",
    };
    let resp = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        refusal.status(),
        body.len()
    );
    let _ = client.write_all(resp.as_bytes()).await;
    let _ = client.shutdown().await;
}

async fn read_head(client: &mut UnixStream) -> Result<Vec<u8>, EgressRefusal> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = client
            .read(&mut chunk)
            .await
            .map_err(|e| EgressRefusal::Malformed(format!("read failed: {e}")))?;
        if n == 0 {
            return Err(EgressRefusal::Malformed(
                "connection closed before the request head ended".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if end > MAX_HEAD_BYTES {
                break;
            }
            return Ok(buf);
        }
        if buf.len() > MAX_HEAD_BYTES {
            break;
        }
    }
    Err(EgressRefusal::Malformed(format!(
        "request head longer than {MAX_HEAD_BYTES} bytes"
    )))
}

/// Hop-by-hop and proxy headers that must not travel upstream.
const DROPPED_HEADERS: &[&str] = &[
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
];

fn parse_head(raw: &[u8]) -> Result<Head, EgressRefusal> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| EgressRefusal::Malformed("no end of head".into()))?;
    let head = std::str::from_utf8(&raw[..end])
        .map_err(|_| EgressRefusal::Malformed("head is not UTF-8".into()))?;
    let rest = raw[end + 4..].to_vec();
    // Bare CR/LF or other control bytes inside a line would let a request smuggle extra header
    // lines past this parser; nothing legitimate sends them.
    if head
        .split("\r\n")
        .any(|line| line.chars().any(|c| c.is_control() && c != '\t'))
    {
        return Err(EgressRefusal::Malformed(
            "control characters in the request head".into(),
        ));
    }
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && !t.is_empty() => (m, t, v),
        _ => return Err(EgressRefusal::Malformed("bad request line".into())),
    };
    if !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(EgressRefusal::Malformed("bad method".into()));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(EgressRefusal::Malformed(
            "only HTTP/1.0 and HTTP/1.1 are supported".into(),
        ));
    }
    if method == "CONNECT" {
        let (host, port) = split_authority(target)?;
        return Ok(Head {
            method: method.into(),
            host,
            port,
            upstream_head: Vec::new(),
            rest,
        });
    }
    let after_scheme = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("HTTP://"))
        .ok_or_else(|| {
            EgressRefusal::Malformed(
                "plain requests must use an absolute http:// URL; use CONNECT for https".into(),
            )
        })?;
    let split = after_scheme
        .find(['/', '?', '#'])
        .unwrap_or(after_scheme.len());
    let authority = &after_scheme[..split];
    let mut path = after_scheme[split..].to_string();
    if let Some(i) = path.find('#') {
        path.truncate(i);
    }
    if path.is_empty() || path.starts_with('?') {
        path.insert(0, '/');
    }
    let (host, port) = split_authority_default(authority, 80)?;
    let mut out = format!("{method} {path} HTTP/1.1\r\n");
    let mut saw_host = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(EgressRefusal::Malformed("bad header line".into()));
        };
        let lname = name.trim().to_ascii_lowercase();
        if DROPPED_HEADERS.contains(&lname.as_str()) {
            continue;
        }
        if lname == "host" {
            // The vetted authority decides where the request goes; keep Host consistent.
            saw_host = true;
            out.push_str(&format!("Host: {authority}\r\n"));
            continue;
        }
        out.push_str(name);
        out.push(':');
        out.push_str(value);
        out.push_str("\r\n");
    }
    if !saw_host {
        out.push_str(&format!("Host: {authority}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    Ok(Head {
        method: method.into(),
        host,
        port,
        upstream_head: out.into_bytes(),
        rest,
    })
}

fn split_authority(authority: &str) -> Result<(String, u16), EgressRefusal> {
    let (host, port) = split_authority_inner(authority)?;
    let port = port.ok_or_else(|| EgressRefusal::Malformed("CONNECT needs host:port".into()))?;
    Ok((host, port))
}

fn split_authority_default(authority: &str, default: u16) -> Result<(String, u16), EgressRefusal> {
    let (host, port) = split_authority_inner(authority)?;
    Ok((host, port.unwrap_or(default)))
}

fn split_authority_inner(authority: &str) -> Result<(String, Option<u16>), EgressRefusal> {
    if authority.contains('@') {
        return Err(EgressRefusal::BadHost(
            authority.chars().take(64).collect(),
            "userinfo (`@`) is not allowed",
        ));
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| EgressRefusal::Malformed("unterminated IPv6 literal".into()))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| EgressRefusal::Malformed("bad authority".into()))?,
            ),
        };
        (format!("[{h}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => Some(
            // Digits only: `parse` would also take `+80`.
            Some(p)
                .filter(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|&p| p != 0)
                .ok_or_else(|| EgressRefusal::Malformed(format!("bad port {p:?}")))?,
        ),
    };
    Ok((host, port))
}

/// Normalises a host name and refuses odd ones. Returns the lowercase name without a trailing
/// dot.
pub fn normalize_host(raw: &str) -> Result<String, EgressRefusal> {
    let shown = || raw.chars().take(64).collect::<String>();
    if raw.starts_with('[') || raw.parse::<IpAddr>().is_ok() {
        return Err(EgressRefusal::BadHost(
            shown(),
            "IP literals are not allowed; use a domain name",
        ));
    }
    if raw.contains('@') {
        return Err(EgressRefusal::BadHost(
            shown(),
            "userinfo (`@`) is not allowed",
        ));
    }
    let host = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
    if host.is_empty() {
        return Err(EgressRefusal::BadHost(shown(), "empty host name"));
    }
    if host.len() > MAX_HOST_LEN {
        return Err(EgressRefusal::BadHost(
            shown(),
            "host name longer than 253 characters",
        ));
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(EgressRefusal::BadHost(
            shown(),
            "host names may only hold letters, digits, '-', '_' and '.' (use the xn-- form for international names)",
        ));
    }
    let labels: Vec<&str> = host.split('.').collect();
    if labels.iter().any(|l| l.is_empty() || l.len() > 63) {
        return Err(EgressRefusal::BadHost(shown(), "empty or over-long label"));
    }
    // Any all-numeric (decimal, octal or 0x-hex) last label makes resolvers and URL parsers read
    // the name as an IPv4 address (`2130706433`, `0x7f.1`, `127.1`): refuse.
    let numeric = |l: &str| {
        l.bytes().all(|b| b.is_ascii_digit())
            || (l.starts_with("0x") && l[2..].bytes().all(|b| b.is_ascii_hexdigit()))
    };
    if labels.last().is_some_and(|l| numeric(l)) {
        return Err(EgressRefusal::BadHost(
            shown(),
            "numeric host names (IP addresses in any notation) are not allowed",
        ));
    }
    Ok(host)
}

fn domain_allowed(host: &str, domains: &[String]) -> bool {
    domains.iter().any(|d| {
        host == d
            || (host.len() > d.len()
                && host.ends_with(d.as_str())
                && host.as_bytes()[host.len() - d.len() - 1] == b'.')
    })
}

async fn vet_and_connect(
    ctx: &ConnContext,
    raw_host: &str,
    port: u16,
) -> Result<(TcpStream, String, SocketAddr), EgressRefusal> {
    let host = normalize_host(raw_host)?;
    if !domain_allowed(&host, &ctx.domains) {
        return Err(EgressRefusal::DomainNotAllowed(host));
    }
    if !ctx.ports.contains(&port) {
        return Err(EgressRefusal::PortNotAllowed(port));
    }
    // Resolve once; every answer must pass, and only a vetted answer is connected to.
    let addrs = ctx
        .network
        .resolve(&host, port)
        .await
        .map_err(|_| EgressRefusal::Unresolvable(host.clone()))?;
    if addrs.is_empty() {
        return Err(EgressRefusal::Unresolvable(host));
    }
    // Listed per request: addresses come and go (DHCP, VPNs, containers).
    let own = OwnAddresses::list()
        .await
        .map_err(|_| EgressRefusal::OwnAddressesUnknown)?;
    if let Some(mine) = addrs.iter().find(|a| own.contains(**a)) {
        return Err(EgressRefusal::OwnAddress { host, addr: *mine });
    }
    if let Some(bad) = addrs.iter().find(|a| is_forbidden_address(**a)) {
        return Err(EgressRefusal::ForbiddenAddress { host, addr: *bad });
    }
    for ip in addrs {
        let addr = SocketAddr::new(ip, port);
        if let Ok(Ok(stream)) =
            tokio::time::timeout(CONNECT_TIMEOUT, ctx.network.connect(addr)).await
        {
            return Ok((stream, host, addr));
        }
    }
    Err(EgressRefusal::Unreachable(format!("{host}:{port}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden(s: &str) -> bool {
        is_forbidden_address(s.parse().unwrap())
    }

    #[test]
    fn own_addresses_match_in_every_spelling() {
        let own = OwnAddresses::from_addresses(vec![
            "203.0.114.7".parse().unwrap(),
            "2a01:4f8::7".parse().unwrap(),
        ]);
        for ip in ["203.0.114.7", "::ffff:203.0.114.7", "2a01:4f8::7"] {
            assert!(own.contains(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["203.0.114.8", "2a01:4f8::8", "127.0.0.1"] {
            assert!(!own.contains(ip.parse().unwrap()), "{ip}");
        }
        // The real list never holds loopback (refused everywhere by is_forbidden_address).
        let real = OwnAddresses::list_blocking().unwrap();
        assert!(real.addresses().iter().all(|ip| !ip.is_loopback()));
    }

    #[test]
    fn public_addresses_pass() {
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
            "2606:4700:4700::1111",
            "2a00:1450:4001:82a::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(!forbidden(s), "{s} should be allowed");
        }
    }

    #[test]
    fn internal_addresses_are_refused() {
        for s in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.169.254",
            "169.254.0.1",
            "192.0.0.170",
            "192.0.2.1",
            "198.18.0.1",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::ffff:0.0.0.0",
            "::127.0.0.1",
            "::ffff:0:127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::",
            "2001:db8::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "100::1",
        ] {
            assert!(forbidden(s), "{s} should be refused");
        }
    }
}
