//! The egress proxy over its real unix sockets, with an injected network: test domains resolve
//! to public addresses that the test connector maps to local servers, so the address rules run
//! unweakened while nothing leaves 127.0.0.1.

use moltmate_core::sandbox::{
    ExecCommand, ExecRequest, Sandbox, SandboxLimits, SandboxNetwork, SandboxProfile,
};
use moltmate_core::UserId;
use moltmate_sandbox::bwrap::BwrapSandbox;
use moltmate_sandbox::proxy::{
    normalize_host, EgressEvent, EgressNetwork, EgressProxy, EgressRefusal, OwnAddresses,
    ProxyConfig,
};
use moltmate_sandbox::{BackendChoice, SandboxScope, SandboxSettings};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::mpsc::UnboundedReceiver;

const PUBLIC: &str = "93.184.216.34";

/// Answers per host (popped in order; the last answer repeats), and a public→local port map.
#[derive(Default)]
struct FakeNetwork {
    answers: Mutex<HashMap<String, VecDeque<Vec<IpAddr>>>>,
    resolved: Mutex<Vec<String>>,
    routes: Mutex<HashMap<SocketAddr, SocketAddr>>,
    connected: Mutex<Vec<SocketAddr>>,
}

impl FakeNetwork {
    fn answer(&self, host: &str, answers: &[&[&str]]) {
        let q = answers
            .iter()
            .map(|a| a.iter().map(|s| s.parse().unwrap()).collect())
            .collect();
        self.answers.lock().unwrap().insert(host.to_string(), q);
    }
    fn route(&self, public: SocketAddr, local: SocketAddr) {
        self.routes.lock().unwrap().insert(public, local);
    }
}

#[async_trait::async_trait]
impl EgressNetwork for FakeNetwork {
    async fn resolve(&self, host: &str, _port: u16) -> std::io::Result<Vec<IpAddr>> {
        self.resolved.lock().unwrap().push(host.to_string());
        let mut answers = self.answers.lock().unwrap();
        let q = answers
            .get_mut(host)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such host"))?;
        Ok(if q.len() > 1 {
            q.pop_front().unwrap()
        } else {
            q[0].clone()
        })
    }
    async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        self.connected.lock().unwrap().push(addr);
        let local = self.routes.lock().unwrap().get(&addr).copied();
        match local {
            Some(local) => TcpStream::connect(local).await,
            None => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "unrouted",
            )),
        }
    }
}

/// An HTTP server answering `hello <path> host=<Host header>`.
async fn http_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let path = head.split(' ').nth(1).unwrap_or("").to_string();
                let host = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Host: "))
                    .unwrap_or("")
                    .trim()
                    .to_string();
                let leaked_proxy_header = head.to_ascii_lowercase().contains("proxy-authorization");
                let body = format!("hello {path} host={host} leaked={leaked_proxy_header}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

/// A TCP echo server (stands in for a TLS server behind CONNECT).
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

struct Harness {
    proxy: Arc<EgressProxy>,
    net: Arc<FakeNetwork>,
    events: UnboundedReceiver<EgressEvent>,
    dir: PathBuf,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.proxy.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn harness() -> Harness {
    harness_with_ports(vec![80, 443]).await
}

async fn harness_with_ports(allowed_ports: Vec<u16>) -> Harness {
    let dir = std::env::temp_dir().join(format!("moltmate-proxy-{:016x}", rand::random::<u64>()));
    let net = Arc::new(FakeNetwork::default());
    let http = http_server().await;
    let echo = echo_server().await;
    net.route(format!("{PUBLIC}:80").parse().unwrap(), http);
    net.route(format!("{PUBLIC}:443").parse().unwrap(), echo);
    for host in ["allowed.test", "api.allowed.test", "deep.api.allowed.test"] {
        net.answer(host, &[&[PUBLIC]]);
    }
    net.answer("evilallowed.test", &[&[PUBLIC]]);
    net.answer("loop.allowed.test", &[&["127.0.0.1"]]);
    net.answer("private.allowed.test", &[&["10.1.2.3"]]);
    net.answer("cgnat.allowed.test", &[&["100.100.100.100"]]);
    net.answer("metadata.allowed.test", &[&["169.254.169.254"]]);
    net.answer("mapped.allowed.test", &[&["::ffff:127.0.0.1"]]);
    net.answer("ula.allowed.test", &[&["fd00::1"]]);
    net.answer("mixed.allowed.test", &[&[PUBLIC, "127.0.0.1"]]);
    net.answer("rebind.allowed.test", &[&[PUBLIC], &["127.0.0.1"]]);
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    let proxy = EgressProxy::start_with(ProxyConfig {
        socket_dir: dir.join("proxy"),
        allowed_domains: vec!["allowed.test".into()],
        allowed_ports,
        network: net.clone(),
        observer: Some(tx),
    })
    .unwrap();
    Harness {
        proxy,
        net,
        events,
        dir,
    }
}

async fn send(h: &Harness, user: &str, request: &str) -> String {
    let socket = h.proxy.user_socket(&UserId::new(user).unwrap()).unwrap();
    let mut s = UnixStream::connect(socket).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

async fn get(h: &Harness, url: &str) -> String {
    send(
        h,
        "anna",
        &format!("GET {url} HTTP/1.1\r\nHost: ignored\r\nProxy-Authorization: Basic eA==\r\n\r\n"),
    )
    .await
}

#[tokio::test]
async fn allowed_domain_passes_and_is_logged_with_the_user() {
    let mut h = harness().await;
    let resp = get(&h, "http://api.allowed.test/v1/x?q=1").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.ends_with("hello /v1/x?q=1 host=api.allowed.test leaked=false"),
        "{resp}"
    );
    let ev = h.events.recv().await.unwrap();
    assert_eq!(ev.user.as_str(), "anna");
    assert_eq!(
        (ev.method.as_str(), ev.host.as_str(), ev.port),
        ("GET", "api.allowed.test", 80)
    );
    assert_eq!(ev.outcome, Ok(format!("{PUBLIC}:80").parse().unwrap()));

    // Exact domain, deeper subdomain, upper case and a trailing dot all normalise.
    for url in [
        "http://allowed.test/",
        "http://deep.api.allowed.test",
        "http://API.Allowed.TEST./",
    ] {
        let resp = get(&h, url).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{url}: {resp}");
    }
}

#[tokio::test]
async fn internal_addresses_are_refused_after_resolution() {
    let mut h = harness().await;
    for host in [
        "loop.allowed.test",
        "private.allowed.test",
        "cgnat.allowed.test",
        "metadata.allowed.test",
        "mapped.allowed.test",
        "ula.allowed.test",
        "mixed.allowed.test",
    ] {
        let resp = get(&h, &format!("http://{host}/")).await;
        assert!(resp.starts_with("HTTP/1.1 403"), "{host}: {resp}");
        let ev = h.events.recv().await.unwrap();
        assert!(
            matches!(ev.outcome, Err(EgressRefusal::ForbiddenAddress { .. })),
            "{host}: {ev:?}"
        );
        assert_eq!(ev.user.as_str(), "anna");
    }
    assert!(
        h.net.connected.lock().unwrap().is_empty(),
        "nothing internal may be dialled"
    );
}

#[tokio::test]
async fn rebinding_cannot_redirect_a_vetted_connection() {
    let h = harness().await;
    // First answer public (vetted and used), later answers loopback: the proxy resolves once
    // per request and dials the address it checked.
    let resp = get(&h, "http://rebind.allowed.test/").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let resp = get(&h, "http://rebind.allowed.test/").await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    let resolved = h.net.resolved.lock().unwrap().clone();
    assert_eq!(resolved, ["rebind.allowed.test", "rebind.allowed.test"]);
    let connected = h.net.connected.lock().unwrap().clone();
    assert_eq!(
        connected,
        [format!("{PUBLIC}:80").parse::<SocketAddr>().unwrap()]
    );
}

#[tokio::test]
async fn odd_hosts_and_other_domains_are_refused() {
    let h = harness().await;
    let long = format!("{}.allowed.test", "a.".repeat(130));
    for url in [
        "http://evil.test/".to_string(),
        "http://evilallowed.test/".to_string(),
        "http://allowed.test.evil.com/".to_string(),
        "http://127.0.0.1/".to_string(),
        "http://0x7f.1/".to_string(),
        "http://2130706433/".to_string(),
        "http://0177.0.0.1/".to_string(),
        "http://127.1/".to_string(),
        "http://[::1]/".to_string(),
        "http://[::ffff:169.254.169.254]/".to_string(),
        "http://anna@api.allowed.test/".to_string(),
        "http://api.allowed.test@evil.test/".to_string(),
        "http://a..allowed.test/".to_string(),
        "http://api.allowed.test:22/".to_string(),
        "http://api.allowed.test:99999/".to_string(),
        "http://ap%69.allowed.test/".to_string(),
        format!("http://{long}/"),
        "https://api.allowed.test/".to_string(),
        "/relative".to_string(),
    ] {
        let resp = get(&h, &url).await;
        assert!(
            resp.starts_with("HTTP/1.1 403") || resp.starts_with("HTTP/1.1 400"),
            "{url}: {resp}"
        );
    }
    let resp = send(
        &h,
        "anna",
        "GET http://api.allowed.test\0.evil/ HTTP/1.1\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    // A bare LF cannot smuggle a second header line past the parser.
    let resp = send(
        &h,
        "anna",
        "GET http://api.allowed.test/ HTTP/1.1\r\nX: a\nHost: evil.test\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(h.net.connected.lock().unwrap().is_empty());

    assert_eq!(
        normalize_host("API.allowed.test.").unwrap(),
        "api.allowed.test"
    );
    for bad in [
        "",
        ".",
        "a\0b",
        "x y",
        "0x7f",
        "1.2.3.4",
        "::1",
        "a@b",
        "ex\u{430}mple.com",
    ] {
        assert!(normalize_host(bad).is_err(), "{bad:?}");
    }
}

#[tokio::test]
async fn connect_tunnels_and_is_vetted() {
    let mut h = harness().await;
    let socket = h.proxy.user_socket(&UserId::new("bob").unwrap()).unwrap();
    let mut s = UnixStream::connect(&socket).await.unwrap();
    s.write_all(b"CONNECT api.allowed.test:443 HTTP/1.1\r\nHost: api.allowed.test:443\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 39];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200 Connection Established\r\n\r\n");
    s.write_all(b"\x16\x03\x01 tls bytes").await.unwrap();
    let mut echo = [0u8; 13];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"\x16\x03\x01 tls bytes");
    let ev = h.events.recv().await.unwrap();
    assert_eq!(
        (ev.user.as_str(), ev.method.as_str(), ev.port),
        ("bob", "CONNECT", 443)
    );
    assert!(ev.outcome.is_ok());

    for target in [
        "metadata.allowed.test:443",
        "api.allowed.test:22",
        "evil.test:443",
        "[::1]:443",
        "api.allowed.test",
    ] {
        let resp = send(&h, "bob", &format!("CONNECT {target} HTTP/1.1\r\n\r\n")).await;
        assert!(
            resp.starts_with("HTTP/1.1 403") || resp.starts_with("HTTP/1.1 400"),
            "{target}: {resp}"
        );
        let ev = h.events.recv().await.unwrap();
        assert_eq!(ev.user.as_str(), "bob");
        assert!(ev.outcome.is_err());
    }
}

/// `sandbox.allowedPorts` decides, for plain requests and CONNECT alike; an empty list allows
/// nothing (it is not "any port").
#[tokio::test]
async fn only_allowed_ports_are_reached() {
    let mut h = harness_with_ports(vec![443]).await;
    let resp = get(&h, "http://api.allowed.test/").await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("port 80 is not allowed"), "{resp}");
    let ev = h.events.recv().await.unwrap();
    assert_eq!(ev.outcome, Err(EgressRefusal::PortNotAllowed(80)));
    for target in [
        "api.allowed.test:80",
        "api.allowed.test:8443",
        "api.allowed.test:22",
    ] {
        let resp = send(&h, "anna", &format!("CONNECT {target} HTTP/1.1\r\n\r\n")).await;
        assert!(resp.starts_with("HTTP/1.1 403"), "{target}: {resp}");
        let ev = h.events.recv().await.unwrap();
        assert!(
            matches!(ev.outcome, Err(EgressRefusal::PortNotAllowed(_))),
            "{target}: {ev:?}"
        );
    }
    // The tunnel stays open: read only the answer line.
    let socket = h.proxy.user_socket(&UserId::new("anna").unwrap()).unwrap();
    let mut tunnel = UnixStream::connect(&socket).await.unwrap();
    tunnel
        .write_all(b"CONNECT api.allowed.test:443 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 39];
    tunnel.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200 Connection Established\r\n\r\n");
    assert!(h.events.recv().await.unwrap().outcome.is_ok());

    let h = harness_with_ports(Vec::new()).await;
    for req in [
        "GET http://api.allowed.test/ HTTP/1.1\r\n\r\n",
        "CONNECT api.allowed.test:443 HTTP/1.1\r\n\r\n",
    ] {
        let resp = send(&h, "anna", req).await;
        assert!(resp.starts_with("HTTP/1.1 403"), "{req:?}: {resp}");
    }
    assert!(h.net.connected.lock().unwrap().is_empty());
}

/// A name that resolves to an address of one of this machine's own (non-loopback) interfaces
/// is refused like an internal one, whatever range the address is in.
#[tokio::test]
async fn own_interface_addresses_are_refused_after_resolution() {
    let own = OwnAddresses::list_blocking().unwrap();
    let Some(mine) = own.addresses().first().copied() else {
        println!("SKIP: this machine has no non-loopback interface address to aim at");
        return;
    };
    let mut h = harness().await;
    h.net.answer("own.allowed.test", &[&[&mine.to_string()]]);
    h.net
        .answer("mixed-own.allowed.test", &[&[PUBLIC, &mine.to_string()]]);
    let mut hosts = vec!["own.allowed.test", "mixed-own.allowed.test"];
    if let IpAddr::V4(v4) = mine {
        h.net.answer(
            "mapped-own.allowed.test",
            &[&[&v4.to_ipv6_mapped().to_string()]],
        );
        hosts.push("mapped-own.allowed.test");
    }
    for host in hosts {
        let resp = get(&h, &format!("http://{host}/")).await;
        assert!(resp.starts_with("HTTP/1.1 403"), "{host}: {resp}");
        assert!(
            resp.contains("an address of this server itself"),
            "{host}: {resp}"
        );
        let ev = h.events.recv().await.unwrap();
        assert!(
            matches!(ev.outcome, Err(EgressRefusal::OwnAddress { addr, .. }) if OwnAddresses::from_addresses(vec![mine]).contains(addr)),
            "{host}: {ev:?}"
        );
        let resp = send(&h, "anna", &format!("CONNECT {host}:443 HTTP/1.1\r\n\r\n")).await;
        assert!(resp.starts_with("HTTP/1.1 403"), "{host}: {resp}");
        let _ = h.events.recv().await.unwrap();
    }
    assert!(h.net.connected.lock().unwrap().is_empty());
}

#[tokio::test]
async fn malformed_requests_get_400_and_are_logged() {
    let mut h = harness().await;
    for req in [
        "garbage\r\n\r\n",
        "GET http://allowed.test/ HTTP/2\r\n\r\n",
        "get http://allowed.test/ HTTP/1.1\r\n\r\n",
    ] {
        let resp = send(&h, "anna", req).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{req:?}: {resp}");
        let ev = h.events.recv().await.unwrap();
        assert_eq!(ev.user.as_str(), "anna");
    }
    let huge = format!(
        "GET http://allowed.test/ HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let resp = send(&h, "anna", &huge).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
}

#[tokio::test]
async fn sockets_are_per_user() {
    let h = harness().await;
    let a = h.proxy.user_socket(&UserId::new("anna").unwrap()).unwrap();
    let b = h.proxy.user_socket(&UserId::new("bob").unwrap()).unwrap();
    assert_ne!(a, b);
    assert!(a.ends_with("anna/proxy.sock") && b.ends_with("bob/proxy.sock"));
    // Each socket sits alone in its user's directory (that directory is what Docker mounts).
    let entries = |p: &std::path::Path| std::fs::read_dir(p.parent().unwrap()).unwrap().count();
    assert_eq!((entries(&a), entries(&b)), (1, 1));
    assert_eq!(
        a,
        h.proxy.user_socket(&UserId::new("anna").unwrap()).unwrap()
    );
}

/// A sandbox with `network = proxy` reaches an allowed domain through the in-sandbox
/// forwarder, and nothing else.
#[tokio::test]
async fn bwrap_sandbox_reaches_allowed_domain_through_the_proxy() {
    let mut h = harness().await;
    let settings = SandboxSettings {
        backend: BackendChoice::Bwrap,
        scope: SandboxScope::Session,
        image: String::new(),
        docker_host: None,
        prune_idle: Duration::from_secs(3600),
        state_dir: h.dir.join("sandboxes"),
        allowed_domains: vec!["allowed.test".into()],
        config_digest: String::new(),
    };
    let sandbox = match BwrapSandbox::new(&settings, Some(h.proxy.clone())) {
        Ok(s) => s,
        Err(e) => return skip(e.to_string()),
    };
    if let Err(e) = sandbox.probe().await {
        return skip(e.to_string());
    }
    let home = h.dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let script = r#"
import urllib.request, urllib.error
for url in ["http://api.allowed.test/from-sandbox", "http://metadata.allowed.test/", "http://evil.test/"]:
    try:
        print(url, urllib.request.urlopen(url, timeout=10).read().decode())
    except urllib.error.HTTPError as e:
        print(url, "HTTP", e.code)
    except Exception as e:
        print(url, "ERR", e)
"#;
    std::fs::write(home.join("fetch.py"), script).unwrap();
    let profile = SandboxProfile {
        network: SandboxNetwork::Proxy,
        // No per-user disk image for this throwaway home.
        limits: SandboxLimits {
            disk_bytes: 0,
            ..SandboxLimits::default()
        },
        ..SandboxProfile::default()
    };
    let out = sandbox
        .exec(ExecRequest {
            user: UserId::new("anna").unwrap(),
            home,
            family: None,
            ids: moltmate_core::sandbox::SandboxIds::same(2_100_000_001),
            family_gid: None,
            session_id: "s".into(),
            command: ExecCommand::Argv(vec!["python3".into(), "fetch.py".into()]),
            timeout: Duration::from_secs(30),
            profile,
        })
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "http://api.allowed.test/from-sandbox hello /from-sandbox host=api.allowed.test leaked=false", "{out:?}");
    assert_eq!(
        lines[1], "http://metadata.allowed.test/ HTTP 403",
        "{out:?}"
    );
    assert_eq!(lines[2], "http://evil.test/ HTTP 403", "{out:?}");
    for _ in 0..3 {
        let ev = h.events.recv().await.unwrap();
        assert_eq!(ev.user.as_str(), "anna");
    }
}

fn skip(reason: String) {
    if std::env::var("MOLTMATE_REQUIRE_SANDBOX").as_deref() == Ok("1") {
        panic!("MOLTMATE_REQUIRE_SANDBOX=1 but bubblewrap is unusable: {reason}");
    }
    println!("SKIP: {reason}");
}

#[tokio::test]
async fn open_connections_per_user_are_capped() {
    let h = harness().await;
    let socket = h.proxy.user_socket(&UserId::new("anna").unwrap()).unwrap();
    let mut idle = Vec::new();
    for _ in 0..moltmate_sandbox::proxy::MAX_CONNECTIONS_PER_USER {
        idle.push(UnixStream::connect(&socket).await.unwrap());
    }
    // Let the proxy accept them all.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resp = send(&h, "anna", "GET http://api.allowed.test/ HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 429"), "{resp}");
    // Another user is unaffected.
    let resp = send(&h, "bob", "GET http://api.allowed.test/ HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    drop(idle);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resp = send(&h, "anna", "GET http://api.allowed.test/ HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}
