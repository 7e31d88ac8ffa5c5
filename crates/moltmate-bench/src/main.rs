//! `moltmate-bench`: measures the targets in README's performance section.
//!
//! ```text
//! cargo run --release -p moltmate-bench -- gateway    # per-message cost, instant model: in-process,
//!                                                     # then the binary over Telegram and the API
//! cargo run --release -p moltmate-bench -- gateway-api        # only the binary, OpenAI-compatible API
//! cargo run --release -p moltmate-bench -- gateway-telegram   # only the binary, Telegram
//! cargo run --release -p moltmate-bench -- startup    # cold start and idle RSS of `moltmate serve`
//! cargo run --release -p moltmate-bench -- memory     # RSS with 1,000 users known and 100 active
//! cargo run --release -p moltmate-bench -- sandbox    # exec round trip: bubblewrap, warm and cold Docker
//! cargo run --release -p moltmate-bench -- channels   # round trip through the Telegram, Discord, Slack
//!                                                     # (Socket Mode and Events API), Signal and WhatsApp doubles
//! ```
//!
//! `gateway`, `startup` and `memory` run the release binary (`target/release/moltmate`, or
//! `MOLTMATE_BENCH_BINARY` for the black-box gateway figures), so build it first
//! (`cargo build --release`). Every measurement talks only to 127.0.0.1 and stops by itself.

mod blackbox;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use moltmate_core::channel::InboundMessage;
use moltmate_core::model::{
    ConversationItem, DeltaSink, IgnoreDeltas, ModelResponse, StopReason, TokenUsage, ToolSpec,
};
use moltmate_core::sandbox::{ExecCommand, ExecRequest, SandboxIds, SandboxProfile, UidRange};
use moltmate_core::{ChannelKind, Identity, PeerId, Shutdown, UserId};
use moltmate_gateway::agent::{ModelAnswer, ModelCaller, ModelFailure, ToolBox};
use moltmate_gateway::SandboxIdPolicy;
use moltmate_gateway::{Gateway, GatewayParts, GatewaySettings};
use moltmate_store::{Homes, Store};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A model that answers at once: what is measured is the gateway alone.
struct InstantModel;

#[async_trait]
impl ModelCaller for InstantModel {
    async fn call(
        &self,
        _: &str,
        items: &[ConversationItem],
        _stored: Option<moltmate_core::model::StoredItems<'_>>,
        _: &[ToolSpec],
        _: &dyn DeltaSink,
    ) -> Result<ModelAnswer, ModelFailure> {
        let text = match items.last() {
            Some(ConversationItem::User { text }) => format!("echo: {text}"),
            _ => "ok".to_string(),
        };
        Ok(ModelAnswer {
            response: ModelResponse {
                text,
                tool_calls: vec![],
                usage: TokenUsage {
                    input_tokens: 10,
                    output_tokens: 2,
                },
                stop_reason: StopReason::EndTurn,
            },
            provider: "instant".into(),
            model: "instant".into(),
            usage: vec![(
                "instant".into(),
                "instant".into(),
                TokenUsage {
                    input_tokens: 10,
                    output_tokens: 2,
                },
            )],
        })
    }
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<44} n={:<5} p50={:>8.2} ms  p99={:>8.2} ms  max={:>8.2} ms",
        samples.len(),
        percentile(&samples, 0.50).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
}

fn message(user: &str, n: usize) -> Result<InboundMessage> {
    Ok(InboundMessage {
        sender: Identity::new(ChannelKind::Web, PeerId::new(user)?),
        chat_id: user.to_string(),
        external_id: format!("bench-{user}-{n}"),
        cursor: None,
        text: format!("message {n}"),
        sender_name: None,
        language_code: None,
        attachments: Vec::new(),
    })
}

/// Per-message gateway overhead: accept → durable inbox → worker → prompt from files →
/// (instant) model → transcript/usage/outbox commit → reply, on a real on-disk database.
async fn bench_gateway() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let home = dir.path();
    let store = Store::open(&home.join("moltmate.db"))?;
    let settings = GatewaySettings {
        onboarding_enabled: false,
        ..GatewaySettings::default()
    };
    let gateway = Gateway::new(GatewayParts {
        store,
        homes: Homes::new(home),
        settings,
        model: Arc::new(InstantModel),
        tools: ToolBox::default(),
        channels: vec![],
        downloads: None,
        sandbox: None,
        disk_caps: None,
        shutdown: Shutdown::new(),
    });
    // As `serve` runs: the watcher of users removed or reset by the CLI polls meanwhile.
    gateway.watch_user_events().await?;
    let users: Vec<String> = (0..100).map(|i| format!("bench{i}")).collect();
    // Warm-up: every user's home, session and worker exist, as for active users.
    for (n, user) in users.iter().enumerate() {
        let submitted = gateway
            .submit(message(user, n)?, Arc::new(IgnoreDeltas))
            .await?;
        submitted.reply.await?;
    }
    let mut samples = Vec::with_capacity(2000);
    for n in 0..2000 {
        let user = &users[n % users.len()];
        let started = Instant::now();
        let submitted = gateway
            .submit(message(user, 1000 + n)?, Arc::new(IgnoreDeltas))
            .await?;
        submitted.reply.await?;
        samples.push(started.elapsed());
    }
    report("gateway overhead per message (sequential)", samples);

    // 100 users at once: latency of each message while the others are in flight.
    let started_all = Instant::now();
    let mut tasks = Vec::new();
    for (i, user) in users.iter().cloned().enumerate() {
        let gateway = gateway.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            for n in 0..10 {
                let started = Instant::now();
                let submitted = gateway
                    .submit(
                        message(&user, 10_000 + i * 100 + n)?,
                        Arc::new(IgnoreDeltas),
                    )
                    .await?;
                submitted.reply.await?;
                samples.push(started.elapsed());
            }
            anyhow::Ok(samples)
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await??);
    }
    let total = started_all.elapsed();
    report("gateway overhead, 100 users concurrently", samples);
    println!(
        "{:<44} {:.0} messages/s",
        "throughput, 100 users concurrently",
        1000.0 / total.as_secs_f64()
    );
    Ok(())
}

pub(crate) fn release_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("binary directory")?.join("moltmate");
    if !path.exists() {
        bail!(
            "{} not found: run `cargo build --release` first",
            path.display()
        );
    }
    Ok(path)
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS not found")
}

pub(crate) async fn wait_healthy(port: u16, timeout: Duration) -> Result<Duration> {
    let client = reqwest::Client::new();
    let started = Instant::now();
    loop {
        if let Ok(response) = client
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
        {
            if response.status().is_success() {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() > timeout {
            bail!("the gateway did not become healthy in {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub(crate) fn write_config(home: &Path, config: serde_json::Value) -> Result<()> {
    std::fs::create_dir_all(home)?;
    std::fs::write(
        home.join("moltmate.json"),
        serde_json::to_vec_pretty(&config)?,
    )?;
    Ok(())
}

pub(crate) fn spawn_serve(binary: &Path, home: &Path) -> Result<std::process::Child> {
    Ok(Command::new(binary)
        .arg("--home")
        .arg(home)
        .arg("serve")
        .env_remove("ANTHROPIC_API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// Stops a `moltmate serve` the way an operator does (SIGTERM), so it takes down what it set up:
/// a root gateway with a sandbox mounts a disk-capped volume per active user, and a `kill -9`
/// (which it survives by design, reusing them on restart) would leave them mounted for ever
/// once the benchmark's home is gone. Killed after 30 s.
fn stop_serve(child: &mut std::process::Child) -> Result<()> {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill()?;
    child.wait()?;
    Ok(())
}

/// Cold start to a healthy `/healthz`, and idle RSS.
async fn bench_startup() -> Result<()> {
    let binary = release_binary()?;
    let mut starts = Vec::new();
    let mut idle_rss = 0;
    for round in 0..10 {
        let dir = tempfile::tempdir()?;
        let home = dir.path().join("home");
        let port = free_port()?;
        write_config(
            &home,
            serde_json::json!({ "gateway": { "port": port }, "logging": { "level": "warn" } }),
        )?;
        let started = Instant::now();
        let mut child = spawn_serve(&binary, &home)?;
        let ready = wait_healthy(port, Duration::from_secs(20)).await;
        let elapsed = started.elapsed();
        if round == 0 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            idle_rss = rss_kib(child.id())?;
        }
        child.kill()?;
        child.wait()?;
        ready?;
        starts.push(elapsed);
    }
    report("cold start to healthy /healthz (process spawn)", starts);
    println!("{:<44} {:.1} MB", "idle RSS", idle_rss as f64 / 1024.0);
    Ok(())
}

/// RSS with 1,000 users known (database + homes) and 100 of them active over Telegram.
async fn bench_memory() -> Result<()> {
    use moltmate_testkit::llm::FakeLlm;
    use moltmate_testkit::telegram::FakeTelegram;
    let binary = release_binary()?;
    let telegram = FakeTelegram::start("1:BENCH").await;
    let llm = FakeLlm::start().await;
    let dir = tempfile::tempdir()?;
    let home = dir.path().join("home");
    let port = free_port()?;
    write_config(
        &home,
        serde_json::json!({
            "gateway": { "port": port },
            "model": { "primary": "fake/bench" },
            "providers": { "fake": { "api": "anthropic", "baseUrl": llm.anthropic_base_url(), "apiKey": "k" } },
            "channels": { "telegram": { "botToken": "1:BENCH", "apiUrl": telegram.api_url(), "dmPolicy": "open", "allowFrom": ["*"], "pollTimeoutSeconds": 1 } },
            "onboarding": { "enabled": false },
            "logging": { "level": "warn" }
        }),
    )?;
    {
        let store = Store::open(&home.join("moltmate.db"))?;
        let homes = Homes::new(&home);
        for i in 0..1000 {
            let user = UserId::new(format!("telegram_{}", 100_000 + i))?;
            let identity = Identity::new(
                ChannelKind::Telegram,
                PeerId::new((100_000 + i).to_string())?,
            );
            store.link_identity(&identity, &user, "seen").await?;
            let ids = match SandboxIdPolicy::detect(UidRange::default()) {
                SandboxIdPolicy::PerUser(range) => store.user_sandbox_ids(&user, range).await?,
                SandboxIdPolicy::Shared(ids) => ids,
            };
            homes.ensure(&user, ids)?;
        }
    }
    let mut child = spawn_serve(&binary, &home)?;
    wait_healthy(port, Duration::from_secs(20)).await?;
    let idle = rss_kib(child.id())?;
    for i in 0..100 {
        telegram.push_text(100_000 + i, "hello");
    }
    for i in 0..100 {
        if telegram
            .wait_for_messages(100_000 + i, 1, Duration::from_secs(60))
            .await
            .is_err()
        {
            stop_serve(&mut child)?;
            bail!("user {i} was not answered");
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let active = rss_kib(child.id())?;
    stop_serve(&mut child)?;
    println!(
        "{:<44} {:.1} MB",
        "RSS, 1,000 users known, idle",
        idle as f64 / 1024.0
    );
    println!(
        "{:<44} {:.1} MB",
        "RSS, 1,000 known, 100 active",
        active as f64 / 1024.0
    );
    Ok(())
}

fn exec_request(user: &str, home: &Path) -> Result<ExecRequest> {
    let user = UserId::new(user)?;
    let home = home.join(user.as_str());
    std::fs::create_dir_all(&home)?;
    // Each bench user its own uid, as a root gateway gives them (else the bench's own ids).
    let ids = match SandboxIdPolicy::detect(UidRange::default()) {
        SandboxIdPolicy::PerUser(range) => {
            let n = user
                .as_str()
                .bytes()
                .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
            SandboxIds::same(range.start + n % range.count)
        }
        SandboxIdPolicy::Shared(ids) => ids,
    };
    Ok(ExecRequest {
        user,
        home,
        family: None,
        ids,
        family_gid: None,
        session_id: "bench".into(),
        command: ExecCommand::Argv(vec!["echo".into(), "hi".into()]),
        timeout: Duration::from_secs(10),
        profile: SandboxProfile::default(),
    })
}

async fn bench_backend(choice: moltmate_sandbox::BackendChoice, label: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let settings = moltmate_sandbox::SandboxSettings {
        backend: choice,
        scope: moltmate_sandbox::SandboxScope::User,
        image: "moltmate-sandbox:bookworm-slim".into(),
        docker_host: None,
        prune_idle: Duration::from_secs(600),
        state_dir: dir.path().join("sandboxes"),
        allowed_domains: vec![],
        config_digest: "bench".into(),
    };
    let sandbox = match moltmate_sandbox::select::select_backend(&settings, None).await {
        Ok(sandbox) => sandbox,
        Err(e) => {
            println!("{label:<44} skipped: {e}");
            return Ok(());
        }
    };
    let users_dir = dir.path().join("users");
    let mut cold = Vec::new();
    for i in 0..5 {
        let request = exec_request(&format!("bench-cold-{i}"), &users_dir)?;
        let started = Instant::now();
        sandbox.exec(request).await?;
        cold.push(started.elapsed());
    }
    report(&format!("{label}: first exec of a new user"), cold);
    let mut warm = Vec::new();
    for _ in 0..200 {
        let request = exec_request("bench-warm", &users_dir)?;
        let started = Instant::now();
        let output = sandbox.exec(request).await?;
        warm.push(started.elapsed());
        if output.stdout.trim() != "hi" {
            bail!("{label}: unexpected output {:?}", output.stdout);
        }
    }
    report(&format!("{label}: exec round trip, warm"), warm);
    for i in 0..5 {
        let _ = sandbox
            .end_session(&UserId::new(format!("bench-cold-{i}"))?, "bench")
            .await;
    }
    let _ = sandbox.prune(Duration::ZERO).await;
    // Homes were put on capped volumes (as root): unmount them before the directory goes.
    if let Ok(entries) = std::fs::read_dir(&users_dir) {
        for entry in entries.flatten() {
            let _ = moltmate_sandbox::disk::release_user_volume(&entry.path());
        }
    }
    Ok(())
}

async fn bench_sandbox() -> Result<()> {
    bench_backend(moltmate_sandbox::BackendChoice::Bwrap, "bubblewrap").await?;
    bench_backend(moltmate_sandbox::BackendChoice::Docker, "docker").await
}

/// A gateway with one real channel, open access and the instant model.
fn channel_gateway(
    home: &Path,
    channel: Arc<dyn moltmate_core::channel::Channel>,
) -> Result<Gateway> {
    let mut settings = GatewaySettings {
        onboarding_enabled: false,
        ..GatewaySettings::default()
    };
    settings.access.insert(
        channel.kind(),
        moltmate_gateway::access::ChannelAccess {
            policy: moltmate_gateway::access::DmPolicy::Open,
            allow_from: vec!["*".to_string()],
            groups: false,
        },
    );
    Ok(Gateway::new(GatewayParts {
        store: Store::open(&home.join("moltmate.db"))?,
        homes: Homes::new(home),
        settings,
        model: Arc::new(InstantModel),
        tools: ToolBox::default(),
        channels: vec![channel],
        downloads: None,
        sandbox: None,
        disk_caps: None,
        shutdown: Shutdown::new(),
    }))
}

/// Per-message round trip through each channel: the double delivers a message over the
/// service's own protocol, the gateway stores and answers it (instant model), the channel sends
/// the reply back to the double. 10 users, 30 messages each, one at a time.
async fn bench_channels() -> Result<()> {
    use moltmate_testkit::{discord::FakeDiscord, slack::FakeSlack, telegram::FakeTelegram};
    const USERS: u64 = 10;
    const ROUNDS: usize = 30;
    let wait = Duration::from_secs(10);

    let dir = tempfile::tempdir()?;
    let telegram = FakeTelegram::start("1:BENCH").await;
    let mut settings =
        moltmate_channels::TelegramSettings::new("1:BENCH").with_api_url(telegram.api_url());
    settings.poll_timeout = Duration::from_secs(1);
    let gateway = channel_gateway(
        dir.path(),
        Arc::new(moltmate_channels::TelegramChannel::new(settings)?),
    )?;
    let run = {
        let g = gateway.clone();
        tokio::spawn(async move { g.run_channels().await })
    };
    let mut samples = Vec::new();
    for n in 0..ROUNDS {
        for user in 0..USERS {
            let started = Instant::now();
            telegram.push_text(1000 + user as i64, "hi");
            telegram
                .wait_for_messages(1000 + user as i64, n + 1, wait)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            samples.push(started.elapsed());
        }
    }
    report("round trip per message, Telegram", samples);
    run.abort();

    let dir = tempfile::tempdir()?;
    let discord = FakeDiscord::start("BENCH.token").await;
    let channel = moltmate_channels::DiscordChannel::new(
        moltmate_channels::DiscordSettings::new("BENCH.token").with_api_url(discord.api_url()),
    )?;
    let gateway = channel_gateway(dir.path(), Arc::new(channel))?;
    let run = {
        let g = gateway.clone();
        tokio::spawn(async move { g.run_channels().await })
    };
    if !discord.wait_connected(wait).await {
        bail!("the Discord channel did not connect");
    }
    let mut samples = Vec::new();
    for n in 0..ROUNDS {
        for user in 0..USERS {
            let started = Instant::now();
            discord.push_dm(1000 + user, "hi");
            discord
                .wait_for_messages(&FakeDiscord::dm_channel(1000 + user), n + 1, wait)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            samples.push(started.elapsed());
        }
    }
    report("round trip per message, Discord", samples);
    run.abort();

    let dir = tempfile::tempdir()?;
    let slack = FakeSlack::start("xoxb-1-BENCH", "xapp-1-BENCH").await;
    let channel = moltmate_channels::SlackChannel::new(
        moltmate_channels::SlackSettings::new("xoxb-1-BENCH", "xapp-1-BENCH")
            .with_api_url(slack.api_url()),
    )?;
    let gateway = channel_gateway(dir.path(), Arc::new(channel))?;
    let run = {
        let g = gateway.clone();
        tokio::spawn(async move { g.run_channels().await })
    };
    if !slack.wait_connected(wait).await {
        bail!("the Slack channel did not connect");
    }
    let mut samples = Vec::new();
    for n in 0..ROUNDS {
        for user in 0..USERS {
            let id = format!("U{}", 1000 + user);
            let started = Instant::now();
            slack.push_dm(&id, "hi", None);
            slack
                .wait_for_messages(&FakeSlack::dm_channel(&id), n + 1, wait)
                .await
                .map_err(|got| anyhow::anyhow!("Slack: got {got:?}"))?;
            samples.push(started.elapsed());
        }
    }
    report("round trip per message, Slack (Socket Mode)", samples);
    run.abort();

    // Slack's Events API: signed POSTs to the real web layer's /webhooks/slack.
    let dir = tempfile::tempdir()?;
    let slack = FakeSlack::start("xoxb-1-BENCH", "xapp-1-BENCH").await;
    const SIGNING: &str = "0123456789abcdef0123456789abcdef";
    let channel = Arc::new(moltmate_channels::SlackChannel::new(
        moltmate_channels::SlackSettings::events("xoxb-1-BENCH", SIGNING)
            .with_api_url(slack.api_url()),
    )?);
    let gateway = channel_gateway(dir.path(), channel.clone())?;
    let run = {
        let g = gateway.clone();
        tokio::spawn(async move { g.run_channels().await })
    };
    let (base, web) = serve_webhooks(&gateway, channel.clone()).await?;
    let sender =
        moltmate_testkit::slack::EventsSender::new(&format!("{base}/webhooks/slack"), SIGNING);
    let started = Instant::now();
    while !gateway
        .channel_statuses()
        .iter()
        .any(|s| s.channel == moltmate_core::ChannelKind::Slack && s.connected)
    {
        if started.elapsed() > wait {
            bail!("the Slack channel did not check its token");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut samples = Vec::new();
    for n in 0..ROUNDS {
        for user in 0..USERS {
            let id = format!("U{}", 1000 + user);
            let started = Instant::now();
            let (status, _) = sender.post_dm(&id, "hi").await;
            if status != 200 {
                bail!("Slack Events: HTTP {status}");
            }
            let channel = FakeSlack::dm_channel(&id);
            poll(wait, || {
                slack
                    .posted()
                    .iter()
                    .filter(|m| m.channel == channel)
                    .count()
                    > n
            })
            .await?;
            samples.push(started.elapsed());
        }
    }
    report(
        "round trip per message, Slack (Events API over HTTP)",
        samples,
    );
    web.cancel();
    run.abort();

    // Signal, against the fake signal-cli daemon (JSON-RPC over TCP).
    let dir = tempfile::tempdir()?;
    const ACCOUNT: &str = "+4917000000001";
    let signal = moltmate_testkit::signal::FakeSignalCli::start_tcp(ACCOUNT).await;
    let address = moltmate_channels::signal::DaemonAddress::parse(signal.address())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let channel = moltmate_channels::SignalChannel::new(moltmate_channels::SignalSettings::new(
        ACCOUNT,
        moltmate_channels::SignalDaemon::External(address),
    ))?;
    let gateway = channel_gateway(dir.path(), Arc::new(channel))?;
    let run = {
        let g = gateway.clone();
        tokio::spawn(async move { g.run_channels().await })
    };
    let mut samples = Vec::new();
    for n in 0..ROUNDS {
        for user in 0..USERS {
            let number = format!("+49170{:08}", 1000 + user);
            let started = Instant::now();
            signal.push_text(&number, "hi");
            poll(wait, || {
                signal
                    .sent_messages()
                    .iter()
                    .filter(|m| m.recipient == number)
                    .count()
                    > n
            })
            .await?;
            samples.push(started.elapsed());
        }
    }
    report("round trip per message, Signal", samples);
    run.abort();

    // WhatsApp: deliveries signed like Meta's, POSTed to the real web layer's
    // /webhooks/whatsapp; replies to the fake Graph API.
    let dir = tempfile::tempdir()?;
    const PHONE_ID: &str = "106540352242922";
    const TOKEN: &str = "EAAG-BENCH";
    const APP_SECRET: &str = "bench-app-secret";
    let graph = moltmate_testkit::whatsapp::FakeGraphApi::start(PHONE_ID, TOKEN).await;
    let mut settings =
        moltmate_channels::WhatsAppSettings::new(PHONE_ID, TOKEN, APP_SECRET, "bench-verify");
    settings.api_url = graph.api_url().to_string();
    let channel = Arc::new(moltmate_channels::WhatsAppChannel::new(settings)?);
    let gateway = channel_gateway(dir.path(), channel.clone())?;
    let run = {
        let g = gateway.clone();
        tokio::spawn(async move { g.run_channels().await })
    };
    let (base, web) = serve_webhooks(&gateway, channel).await?;
    let meta = moltmate_testkit::whatsapp::WebhookSigner::new(
        &format!("{base}/webhooks/whatsapp"),
        APP_SECRET,
        PHONE_ID,
    );
    let mut samples = Vec::new();
    for n in 0..ROUNDS {
        for user in 0..USERS {
            let number = format!("49170{:08}", 1000 + user);
            let started = Instant::now();
            // Until the channel has the gateway's inbox, Meta is told to come back (503).
            loop {
                let (status, _) = meta.post_text(&number, "hi").await;
                match status {
                    200 => break,
                    503 if started.elapsed() < wait => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    other => bail!("WhatsApp: HTTP {other}"),
                }
            }
            poll(wait, || {
                graph
                    .sent_messages()
                    .iter()
                    .filter(|m| m.to == number)
                    .count()
                    > n
            })
            .await?;
            samples.push(started.elapsed());
        }
    }
    report("round trip per message, WhatsApp", samples);
    web.cancel();
    run.abort();
    Ok(())
}

/// Polls `done` every millisecond (the doubles' own waits poll every 20 ms, coarser than what
/// is measured here).
async fn poll(timeout: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > timeout {
            bail!("no reply within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// The real web layer (`moltmate_web::serve`) with one webhook, on a free loopback port; its
/// per-IP limit raised so the benchmark's one client is not throttled.
async fn serve_webhooks(
    gateway: &Gateway,
    webhook: Arc<dyn moltmate_core::webhook::Webhook>,
) -> Result<(String, Shutdown)> {
    let settings = moltmate_web::WebSettings {
        unauthenticated_per_minute: 1_000_000,
        unauthenticated_burst: 100_000,
        webhooks: vec![webhook],
        ..moltmate_web::WebSettings::default()
    };
    let shutdown = Shutdown::new();
    let state = moltmate_web::WebState::new(gateway.clone(), settings, shutdown.clone())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop = shutdown.clone();
    tokio::spawn(async move { moltmate_web::serve(state, listener, stop).await });
    Ok((base, shutdown))
}

#[tokio::main]
async fn main() -> Result<()> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".to_string());
    match which.as_str() {
        "gateway" => {
            bench_gateway().await?;
            blackbox::telegram().await?;
            blackbox::api().await
        }
        "gateway-inprocess" => bench_gateway().await,
        "gateway-api" => blackbox::api().await,
        "gateway-telegram" => blackbox::telegram().await,
        "startup" => bench_startup().await,
        "memory" => bench_memory().await,
        "sandbox" => bench_sandbox().await,
        "channels" => bench_channels().await,
        "all" => {
            bench_gateway().await?;
            blackbox::telegram().await?;
            blackbox::api().await?;
            bench_startup().await?;
            bench_memory().await?;
            bench_sandbox().await
        }
        other => bail!("unknown benchmark {other:?}: gateway | gateway-inprocess | gateway-api | gateway-telegram | startup | memory | sandbox | channels | all"),
    }
}
