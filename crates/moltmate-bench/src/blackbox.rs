//! The gateway measured from outside: the release binary (`moltmate serve`) against the wire
//! doubles of `moltmate-testkit` on loopback — Telegram through the fake Bot API, the
//! OpenAI-compatible API through HTTP — with a model double that answers at once.
//!
//! What is reported per path: the gateway process's own CPU time per message (utime + stime
//! from `/proc/<pid>/stat`, so the doubles and the clients, which run in this process, do not
//! count), sequentially from one user and with 20 and 200 clients at once (each client its own
//! user, one message in flight, the next sent when the answer arrived), throughput, latency
//! percentiles, and the gateway's peak RSS (sampled every 10 ms, and the kernel's high-water
//! mark).
//!
//! `MOLTMATE_BENCH_BINARY=/path/to/moltmate` measures another build (e.g. an older commit's)
//! with exactly the same clients and doubles.

use anyhow::{bail, Context, Result};
use moltmate_core::model::TokenUsage;
use moltmate_testkit::llm::FakeLlm;
use moltmate_testkit::telegram::FakeTelegram;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Users of the 200-client phase; every phase's clients are the first of them.
const USERS: usize = 200;
/// Messages of the sequential phase (one user).
const SEQUENTIAL: usize = 1000;
/// How long one answer may take before the benchmark gives up.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// First Telegram user id.
const TELEGRAM_BASE_ID: i64 = 100_000;

/// The binary under measurement.
pub fn binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("MOLTMATE_BENCH_BINARY") {
        return Ok(PathBuf::from(path));
    }
    crate::release_binary()
}

/// `utime + stime` of a process (all its threads, living and exited), from `/proc`.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3 (`state`).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| -> Result<u64> {
        fields
            .get(index)
            .and_then(|v| v.parse().ok())
            .context("malformed /proc/<pid>/stat")
    };
    // utime is field 14, stime 15; in clock ticks, which Linux fixes at 100 per second
    // (USER_HZ) for everything it reports to user space.
    let total = ticks(14 - 3)? + ticks(15 - 3)?;
    Ok(Duration::from_millis(total * 10))
}

fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{key} not found"))
}

/// A running `moltmate serve` with its home.
struct Served {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Served {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The configuration both paths run with: the model double as the only provider, budgets
/// that stay active but never run out, rate limits that never refuse, no sandbox (nothing
/// runs commands here, and a root gateway would otherwise set up a disk-capped volume per
/// user: measured by the `sandbox` benchmark instead).
fn config(port: u16, llm: &FakeLlm, telegram: Option<&FakeTelegram>) -> serde_json::Value {
    let mut config = serde_json::json!({
        "gateway": {
            "port": port,
            "rateLimit": {
                "perMinute": 1_000_000, "burst": 1_000_000,
                "unauthenticatedPerMinute": 1_000_000, "unauthenticatedBurst": 1_000_000
            }
        },
        "model": { "primary": "fake/bench" },
        "providers": { "fake": { "api": "anthropic", "baseUrl": llm.anthropic_base_url(), "apiKey": "k" } },
        "channels": { "web": { "defaultTrust": "owner" } },
        "sandbox": { "mode": "none", "dangerouslyAllowHostExec": true },
        "limits": { "messagesPerDay": 1_000_000_000u64, "tokensPerDay": 1_000_000_000_000u64 },
        "onboarding": { "enabled": false },
        "logging": { "level": "warn" }
    });
    if let Some(telegram) = telegram {
        config["channels"]["telegram"] = serde_json::json!({
            "botToken": "1:BENCH",
            "apiUrl": telegram.api_url(),
            "dmPolicy": "open",
            "allowFrom": ["*"],
            "defaultTrust": "owner"
        });
    }
    config
}

/// Writes the config into a fresh home, lets `prepare` work on the home (the gateway not yet
/// running), then starts `moltmate serve` there.
async fn serve(
    config_for: impl FnOnce(u16) -> serde_json::Value,
    prepare: impl FnOnce(&Path) -> Result<()>,
) -> Result<Served> {
    let binary = binary()?;
    let dir = tempfile::tempdir()?;
    let home = dir.path().join("home");
    let port = crate::free_port()?;
    crate::write_config(&home, config_for(port))?;
    prepare(&home)?;
    let served = Served {
        child: crate::spawn_serve(&binary, &home)?,
        port,
        _dir: dir,
    };
    crate::wait_healthy(served.port, Duration::from_secs(20)).await?;
    if let Ok(file) = std::env::var("MOLTMATE_BENCH_PID_FILE") {
        // For attaching a profiler to the gateway while the phases run.
        std::fs::write(file, served.pid().to_string())?;
    }
    Ok(served)
}

/// Samples the gateway's RSS every 10 ms while a phase runs.
struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (peak, stop) = (Arc::clone(&peak), Arc::clone(&stop));
            async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(rss) = status_kib(pid, "VmRSS:") {
                        peak.fetch_max(rss, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        RssSampler { peak, stop, task }
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.peak.load(Ordering::Relaxed)
    }
}

/// `clients` clients at once, each sending `per_client` messages one after the other through
/// `send(client, n)`; prints what the phase cost the gateway.
async fn phase<F, Fut>(
    path: &str,
    name: &str,
    served: &Served,
    clients: usize,
    per_client: usize,
    send: F,
) -> Result<()>
where
    F: Fn(usize, usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let pid = served.pid();
    let cpu_before = cpu_time(pid)?;
    let sampler = RssSampler::start(pid);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for client in 0..clients {
        let send = send.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(per_client);
            for n in 0..per_client {
                let sent = Instant::now();
                send(client, n).await?;
                samples.push(sent.elapsed());
            }
            anyhow::Ok(samples)
        }));
    }
    let mut samples = Vec::with_capacity(clients * per_client);
    for task in tasks {
        samples.extend(task.await??);
    }
    let wall = started.elapsed();
    let cpu = cpu_time(pid)?.saturating_sub(cpu_before);
    let peak = sampler.finish().await;
    let messages = samples.len();
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{path:<9} {name:<22} n={messages:<5} cpu/msg={:>6.3} ms  {:>6.0} msg/s  p50={:>7.2} ms  p99={:>7.2} ms  max={:>7.2} ms  peak RSS={:>5.1} MB",
        ms(cpu) / messages.max(1) as f64,
        messages as f64 / wall.as_secs_f64(),
        ms(crate::percentile(&samples, 0.50)),
        ms(crate::percentile(&samples, 0.99)),
        ms(samples.last().copied().unwrap_or_default()),
        peak as f64 / 1024.0,
    );
    Ok(())
}

/// Every phase, in order: a warm-up (every user's first message: user, home, session), one
/// user sequentially, 20 clients, 200 clients.
async fn phases<F, Fut>(path: &str, served: &Served, send: F) -> Result<()>
where
    F: Fn(usize, usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    // Warm-up, 20 at a time: each of the 200 users gets their first message.
    let warm = send.clone();
    let warm_up = move |client: usize, n: usize| {
        let warm = warm.clone();
        async move { warm(client + 20 * n, 0).await }
    };
    phase(path, "warm-up (200 users)", served, 20, USERS / 20, warm_up).await?;
    let seq = send.clone();
    phase(
        path,
        "sequential, 1 user",
        served,
        1,
        SEQUENTIAL,
        move |_, n| seq(0, 1 + n),
    )
    .await?;
    let twenty = send.clone();
    phase(path, "20 clients", served, 20, 50, move |client, n| {
        twenty(client, 10_000 + n)
    })
    .await?;
    phase(path, "200 clients", served, USERS, 10, move |client, n| {
        send(client, 20_000 + n)
    })
    .await?;
    println!(
        "{path:<9} {:<22} peak RSS (VmHWM) {:.1} MB",
        "whole run",
        status_kib(served.pid(), "VmHWM:")? as f64 / 1024.0
    );
    Ok(())
}

fn model_double(llm: &FakeLlm) {
    llm.set_recording(false);
    llm.set_usage(Some(TokenUsage {
        input_tokens: 10,
        output_tokens: 2,
    }));
}

/// The OpenAI-compatible API: `POST /v1/chat/completions` with each user's own token.
pub async fn api() -> Result<()> {
    let llm = FakeLlm::start().await;
    model_double(&llm);
    let binary = binary()?;
    let mut tokens = Vec::with_capacity(USERS);
    let served = serve(
        |port| config(port, &llm, None),
        |home| {
            for i in 0..USERS {
                let output = Command::new(&binary)
                    .arg("--home")
                    .arg(home)
                    .args(["users", "token", &format!("bench{i}")])
                    .stderr(Stdio::null())
                    .output()?;
                if !output.status.success() {
                    bail!("`moltmate users token` failed");
                }
                tokens.push(String::from_utf8(output.stdout)?.trim().to_string());
            }
            Ok(())
        },
    )
    .await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(USERS + 16)
        .build()?;
    let url = format!("http://127.0.0.1:{}/v1/chat/completions", served.port);
    let tokens = Arc::new(tokens);
    let send = move |user: usize, n: usize| {
        let (client, url, tokens) = (client.clone(), url.clone(), Arc::clone(&tokens));
        async move {
            let token = tokens.get(user).context("no such user")?;
            let response = client
                .post(&url)
                .bearer_auth(token)
                .json(&serde_json::json!({
                    "model": "moltmate",
                    "messages": [{ "role": "user", "content": format!("message {n}") }]
                }))
                .timeout(ANSWER_TIMEOUT)
                .send()
                .await?;
            let status = response.status();
            let body = response.bytes().await?;
            if !status.is_success() {
                bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
            }
            Ok(())
        }
    };
    phases("api", &served, send).await
}

/// Replies the fake Bot API received, routed to the client waiting in that chat.
#[derive(Default)]
struct Waiting {
    by_chat: Mutex<HashMap<String, oneshot::Sender<()>>>,
    unexpected: AtomicU64,
}

/// Telegram: updates pushed to the fake Bot API, answers taken from its `sendMessage`.
pub async fn telegram() -> Result<()> {
    let llm = FakeLlm::start().await;
    model_double(&llm);
    let telegram = Arc::new(FakeTelegram::start("1:BENCH").await);
    let served = serve(|port| config(port, &llm, Some(&telegram)), |_| Ok(())).await?;
    let waiting = Arc::new(Waiting::default());
    let mut sent = telegram.subscribe_sent();
    let router = tokio::spawn({
        let waiting = Arc::clone(&waiting);
        async move {
            while let Some(message) = sent.recv().await {
                let waiter = waiting
                    .by_chat
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&message.chat_id);
                match waiter {
                    Some(waiter) => {
                        let _ = waiter.send(());
                    }
                    None => {
                        waiting.unexpected.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    });
    let send = {
        let (telegram, waiting) = (Arc::clone(&telegram), Arc::clone(&waiting));
        move |user: usize, n: usize| {
            let (telegram, waiting) = (Arc::clone(&telegram), Arc::clone(&waiting));
            async move {
                let id = TELEGRAM_BASE_ID + user as i64;
                let (answered, answer) = oneshot::channel();
                waiting
                    .by_chat
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id.to_string(), answered);
                telegram.push_text(id, &format!("message {n}"));
                tokio::time::timeout(ANSWER_TIMEOUT, answer)
                    .await
                    .with_context(|| format!("user {user} got no answer to message {n}"))??;
                Ok(())
            }
        }
    };
    let result = phases("telegram", &served, send).await;
    router.abort();
    let unexpected = waiting.unexpected.load(Ordering::Relaxed);
    if unexpected > 0 {
        println!("telegram: {unexpected} messages nobody waited for (notices?)");
    }
    result
}
