//! Builds a running gateway from a home and its config.

use super::settings::{gateway_settings, sandbox_required};
use anyhow::{Context, Result};
use moltmate_config::Config;
use moltmate_core::channel::Channel;
use moltmate_core::sandbox::{DiskCaps, Sandbox, SandboxIds};
use moltmate_core::tool::Tool;
use moltmate_core::Shutdown;
use moltmate_gateway::agent::ToolBox;
use moltmate_gateway::memory_tool::MemorySearchTool;
use moltmate_gateway::{Gateway, GatewayParts, SandboxIdPolicy};
use moltmate_store::{Homes, Store};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// What the gateway is started for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `moltmate serve`: channels receive, the web server runs.
    Serve,
    /// `moltmate chat`: channels are built (so replies to other channels' users can still be
    /// delivered) but do not receive; no web server.
    Chat,
}

/// A built gateway and what the binary needs besides it.
pub struct Built {
    pub gateway: Gateway,
    pub shutdown: Shutdown,
    pub sandbox: Option<Arc<dyn Sandbox>>,
    pub store: Store,
    /// Channels pushed to over HTTP (WhatsApp, Slack's Events API), for the web server's
    /// `/webhooks/<channel>`.
    pub webhooks: Vec<Arc<dyn moltmate_core::webhook::Webhook>>,
    /// The sandbox layer's state directory when this gateway loop-mounts capped volumes there
    /// (root, with a sandbox): [`Built::release_volumes`] takes them down at shutdown.
    pub volumes: std::sync::Mutex<Option<moltmate_sandbox::disk::VolumeHold>>,
    /// Files `send_file` keeps for web and API users, served at `/files/<id>`.
    pub downloads: moltmate_store::downloads::Downloads,
}

impl Built {
    /// Unmounts every capped volume this gateway mounted (homes, family folders, scratch
    /// directories) and refuses new mounts until the next build: call after the drain, so
    /// nothing the gateway mounted outlives it. Sandboxes kept warm (Docker containers) keep
    /// their own bind of a home; the next start mounts the same image again, on the same loop
    /// device.
    pub async fn release_volumes(&self) {
        let hold = self
            .volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(hold) = hold else {
            return;
        };
        let released = tokio::task::spawn_blocking(move || hold.release()).await;
        match released {
            Ok(Ok(count)) => tracing::info!(count, "disk volumes released"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not release every disk volume"),
            Err(e) => tracing::warn!(error = %e, "releasing the disk volumes failed"),
        }
    }
}

/// The sandbox backend the config asks for, or an error that says what to install. Without
/// the aggregate bound: for the `sandbox list/prune` commands, which run next to a gateway and
/// must not count or stop its sandboxes as their own.
pub async fn sandbox_backend(home: &Path, config: &Config) -> Result<Arc<dyn Sandbox>> {
    sandbox_backend_with(home, config, None).await
}

/// [`sandbox_backend`] for a gateway: every sandbox under the aggregate bound `total`.
pub async fn sandbox_backend_with(
    home: &Path,
    config: &Config,
    total: Option<moltmate_sandbox::total::TotalSettings>,
) -> Result<Arc<dyn Sandbox>> {
    let settings = super::sandbox_settings(home, config);
    let proxy = if config.sandbox.network == moltmate_core::sandbox::SandboxNetwork::Proxy {
        let mut proxy = moltmate_sandbox::proxy::ProxyConfig::from_settings(&settings);
        proxy.allowed_ports = config.sandbox.allowed_ports.clone();
        Some(
            moltmate_sandbox::proxy::EgressProxy::start_with(proxy)
                .context("starting the egress proxy")?,
        )
    } else {
        None
    };
    Ok(moltmate_sandbox::select::select_backend_bounded(&settings, proxy, total).await?)
}

fn tools(
    config: &Config,
    home: &Path,
    store: &Store,
    sandbox: Option<Arc<dyn Sandbox>>,
) -> Result<ToolBox> {
    let fetch = &config.tools.web.fetch;
    let web_fetch = moltmate_tools::WebFetchTool::new(moltmate_tools::WebFetchSettings {
        allowed_domains: fetch.allowed_domains.clone(),
        allowed_ports: fetch.allowed_ports.clone(),
        max_bytes: fetch.max_bytes,
        timeout: Duration::from_secs(fetch.timeout_seconds),
    })
    .context("building web_fetch")?;
    let mut tools: Vec<Arc<dyn Tool>> = vec![
        Arc::new(moltmate_tools::ReadTool),
        Arc::new(moltmate_tools::WriteTool),
        Arc::new(moltmate_tools::EditTool),
        Arc::new(moltmate_tools::ExecTool::new(sandbox)),
        Arc::new(web_fetch),
        Arc::new(moltmate_tools::SendFileTool::default()),
        Arc::new(
            MemorySearchTool::new(store.clone(), home.join("index"))
                .with_max_index_bytes(config.limits.memory_index_mb.saturating_mul(1024 * 1024)),
        ),
    ];
    if let Some(search) = web_search(config)? {
        tools.push(Arc::new(search));
    }
    Ok(ToolBox::new(tools))
}

/// `web_search` when `tools.web.search` is enabled (validation made sure it is complete).
fn web_search(config: &Config) -> Result<Option<moltmate_tools::WebSearchTool>> {
    use moltmate_config::SearchProvider;
    use moltmate_tools::{SearchApiKey, SearchProviderSettings, WebSearchSettings, WebSearchTool};
    let search = &config.tools.web.search;
    if !search.enabled {
        return Ok(None);
    }
    let base_url = search
        .effective_base_url()
        .context("tools.web.search.baseUrl is required for this provider")?;
    let base_url = url::Url::parse(&base_url).context("tools.web.search.baseUrl is not a URL")?;
    let provider = match search.provider {
        SearchProvider::Brave => SearchProviderSettings::Brave {
            base_url,
            api_key: SearchApiKey::new(
                config
                    .web_search_api_key()
                    .context(
                        "tools.web.search: Brave Search needs an API key (BRAVE_API_KEY or apiKey)",
                    )?
                    .expose(),
            ),
        },
        SearchProvider::Searxng => SearchProviderSettings::Searxng { base_url },
    };
    let tool = WebSearchTool::new(WebSearchSettings {
        provider,
        max_results: usize::try_from(search.max_results)
            .unwrap_or(moltmate_tools::web_search::MAX_RESULTS),
        timeout: Duration::from_secs(search.timeout_seconds),
        per_user_per_hour: u32::try_from(search.per_user_per_hour).unwrap_or(u32::MAX),
    })
    .context("building web_search")?;
    Ok(Some(tool))
}

/// The Signal channel's settings, if the channel is enabled.
pub fn signal_settings(
    home: &Path,
    config: &Config,
) -> Result<Option<moltmate_channels::SignalSettings>> {
    let signal = &config.channels.signal;
    if !signal.is_enabled() {
        return Ok(None);
    }
    let account = signal
        .account
        .clone()
        .context("channels.signal.enabled is true but channels.signal.account is not set")?;
    let daemon = match &signal.daemon {
        Some(address) => moltmate_channels::SignalDaemon::External(
            moltmate_channels::signal::DaemonAddress::parse(address)
                .map_err(|e| anyhow::anyhow!("channels.signal.daemon: {e}"))?,
        ),
        None => moltmate_channels::SignalDaemon::Supervised {
            cli_path: signal.cli_path.clone(),
            data_dir: signal_data_dir(home, config),
        },
    };
    let mut settings = moltmate_channels::SignalSettings::new(account, daemon);
    settings.device_name = signal.device_name.clone();
    settings.read_receipts = signal.read_receipts;
    // Large enough for the biggest file fetched (`attachments.maxMb`) and sent (`send_file`).
    settings.max_file_bytes = config
        .attachments
        .max_mb
        .saturating_mul(1 << 20)
        .max(moltmate_tools::SEND_FILE_MAX_BYTES);
    Ok(Some(settings))
}

/// signal-cli's data directory: `channels.signal.dataDir`, else `<home>/signal`.
pub fn signal_data_dir(home: &Path, config: &Config) -> std::path::PathBuf {
    config
        .channels
        .signal
        .data_dir
        .clone()
        .unwrap_or_else(|| home.join("signal"))
}

type Webhooks = Vec<Arc<dyn moltmate_core::webhook::Webhook>>;

fn channels(home: &Path, config: &Config) -> Result<(Vec<Arc<dyn Channel>>, Webhooks)> {
    let mut channels: Vec<Arc<dyn Channel>> = Vec::new();
    let mut webhooks: Webhooks = Vec::new();
    let whatsapp = &config.channels.whatsapp;
    if whatsapp.is_enabled() {
        let missing = |key: &str| anyhow::anyhow!("channels.whatsapp.{key} is required");
        let mut settings = moltmate_channels::WhatsAppSettings::new(
            whatsapp
                .phone_number_id
                .clone()
                .ok_or_else(|| missing("phoneNumberId"))?,
            whatsapp
                .access_token
                .as_ref()
                .ok_or_else(|| missing("accessToken"))?
                .expose(),
            whatsapp
                .app_secret
                .as_ref()
                .ok_or_else(|| missing("appSecret"))?
                .expose(),
            whatsapp
                .verify_token
                .as_ref()
                .ok_or_else(|| missing("verifyToken"))?
                .expose(),
        );
        settings.api_url = whatsapp.api_url.clone();
        settings.api_version = whatsapp.api_version.clone();
        let channel = Arc::new(
            moltmate_channels::WhatsAppChannel::new(settings)
                .map_err(|e| anyhow::anyhow!("channels.whatsapp: {e}"))?,
        );
        channels.push(channel.clone());
        webhooks.push(channel);
    }
    let telegram = &config.channels.telegram;
    if telegram.enabled.unwrap_or(telegram.bot_token.is_some()) {
        let token = telegram.bot_token.as_ref().context(
            "channels.telegram.enabled is true but channels.telegram.botToken is not set",
        )?;
        let mut settings = moltmate_channels::TelegramSettings::new(token.expose())
            .with_api_url(telegram.api_url.clone());
        settings.poll_timeout = Duration::from_secs(telegram.poll_timeout_seconds);
        channels.push(Arc::new(
            moltmate_channels::TelegramChannel::new(settings)
                .map_err(|e| anyhow::anyhow!("channels.telegram: {e}"))?,
        ));
    }
    if let Some(settings) = signal_settings(home, config)? {
        channels.push(Arc::new(
            moltmate_channels::SignalChannel::new(settings)
                .map_err(|e| anyhow::anyhow!("channels.signal: {e}"))?,
        ));
    }
    let discord = &config.channels.discord;
    if discord.is_enabled() {
        let token = discord
            .bot_token
            .as_ref()
            .context("channels.discord.enabled is true but channels.discord.botToken is not set")?;
        let mut settings = moltmate_channels::DiscordSettings::new(token.expose())
            .with_api_url(discord.api_url.clone());
        settings.groups = discord.groups.to_core();
        channels.push(Arc::new(
            moltmate_channels::DiscordChannel::new(settings)
                .map_err(|e| anyhow::anyhow!("channels.discord: {e}"))?,
        ));
    }
    let slack = &config.channels.slack;
    if slack.is_enabled() {
        let Some(bot) = slack.bot_token.as_ref() else {
            anyhow::bail!("channels.slack needs botToken");
        };
        let settings = match slack.mode {
            moltmate_config::SlackMode::Socket => {
                let Some(app) = slack.app_token.as_ref() else {
                    anyhow::bail!("channels.slack needs appToken in Socket Mode");
                };
                moltmate_channels::SlackSettings::new(bot.expose(), app.expose())
            }
            moltmate_config::SlackMode::Events => {
                let Some(secret) = slack.signing_secret.as_ref() else {
                    anyhow::bail!("channels.slack needs signingSecret with mode \"events\"");
                };
                moltmate_channels::SlackSettings::events(bot.expose(), secret.expose())
            }
        };
        let mut settings = settings.with_api_url(slack.api_url.clone());
        settings.groups = slack.groups.to_core();
        let channel = Arc::new(
            moltmate_channels::SlackChannel::new(settings)
                .map_err(|e| anyhow::anyhow!("channels.slack: {e}"))?,
        );
        if slack.mode == moltmate_config::SlackMode::Events {
            webhooks.push(channel.clone());
        }
        channels.push(channel);
    }
    Ok((channels, webhooks))
}

/// Builds the gateway: database, homes, model chain, sandbox, tools, channels.
pub async fn build(home: &Path, config: &Config, purpose: Purpose) -> Result<Built> {
    let store = Store::open(&home.join("moltmate.db")).context("opening the database")?;
    let homes = Homes::new(home);
    let shutdown = Shutdown::new();
    let mut settings = gateway_settings(config, home);
    if purpose == Purpose::Chat {
        // A terminal session has no pruner running: only start a sandbox when a command
        // actually needs one, or it would outlive the session unused.
        settings.prewarm_sandboxes = false;
    }
    let model = super::model::model_caller(config)?;
    let sandbox = if sandbox_required(config) {
        let total = super::total_settings(config, purpose == Purpose::Serve);
        match sandbox_backend_with(home, config, Some(total)).await {
            Ok(sandbox) => {
                // Under memory pressure the kernel picks sandboxes (biased up), not the gateway.
                super::protect_gateway_from_oom();
                Some(sandbox)
            }
            Err(e) => {
                tracing::warn!("exec is disabled: {e:#}");
                None
            }
        }
    } else {
        None
    };
    let tools = tools(config, home, &store, sandbox.clone())?;
    let (channels, webhooks) = channels(home, config)?;

    let id_policy = settings.sandbox_ids;
    if let (SandboxIdPolicy::Shared(ids), Some(_)) = (id_policy, &sandbox) {
        tracing::warn!(
            uid = ids.uid,
            "the gateway is not root, so it cannot give each user their own sandbox uid: every user's commands run as the gateway's own uid (run as root for one uid per user from sandbox.uidRange)"
        );
    }
    // Users named in the config exist (and are linked) before their first message, so the
    // operator sees them in `users list` and the admin page.
    for (user, user_config) in &config.users {
        store
            .ensure_user(user, user_config.display_name.as_deref())
            .await?;
        homes.ensure(user, user_sandbox_ids(&store, id_policy, user).await?)?;
        for identity in &user_config.identities {
            store.link_identity(identity, user, "config").await?;
        }
    }
    let mut family_dirs = Vec::new();
    for family in config.families.keys() {
        let (ids, gid) = family_sandbox_ids(&store, id_policy, family).await?;
        family_dirs.push((homes.ensure_family(family, ids)?, gid));
    }
    let state_dir = super::sandbox_settings(home, config).state_dir;
    let mut volumes = None;
    if sandbox.is_some() && moltmate_sandbox::disk::can_enforce() {
        // Reopened after an earlier shutdown in this process; a set-up a crash interrupted is
        // cleared (its staging mount and image), the homes a killed gateway left mounted are
        // reused as they are.
        let state_dir = state_dir.clone();
        volumes = Some(
            tokio::task::spawn_blocking(move || moltmate_sandbox::disk::open_volumes(&state_dir))
                .await
                .context("disk volume recovery")?
                .context("clearing interrupted disk volume set-ups")?,
        );
    }
    if purpose == Purpose::Serve && sandbox.is_some() {
        // Family folders go onto their capped volumes before any turn runs: the first move
        // copies a folder's files and deletes them underneath, which must not overlap with a
        // member writing there. (Homes move before their user's first turn, in that user's
        // own ordered worker: see `disk_caps` below.)
        let state_dir = state_dir.clone();
        let cap_bytes = config.sandbox.limits.disk_mb * 1024 * 1024;
        tokio::task::spawn_blocking(move || {
            for (dir, gid) in family_dirs {
                // Without a family gid (a gateway that cannot switch uids) there is no volume
                // to make either: loop mounts need root too.
                let Some(gid) = gid else { continue };
                let ids = moltmate_core::sandbox::SandboxIds::same(gid);
                if let Err(e) = moltmate_sandbox::disk::ensure_family_volume(&state_dir, &dir, cap_bytes, ids) {
                    tracing::warn!(family = %dir.display(), error = %e, "family folder has no disk cap");
                }
            }
        })
        .await
        .context("family volume set-up")?;
    }
    // The disk cap holds from a user's first write: their home goes onto its capped volume
    // before their first turn (root only: loop mounts; and only with a sandbox, whose limits
    // the cap is part of).
    let disk_caps: Option<Arc<dyn DiskCaps>> = (sandbox.is_some()
        && moltmate_sandbox::disk::can_enforce())
    .then(|| Arc::new(moltmate_sandbox::disk::LoopVolumes::new(&state_dir)) as _);
    let downloads =
        moltmate_store::downloads::Downloads::new(store.clone(), home, download_settings(config));
    if purpose == Purpose::Serve {
        match downloads.prune_expired().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(count = n, "deleted expired downloads"),
            Err(e) => tracing::warn!(error = %e, "could not delete expired downloads"),
        }
    }
    let gateway = Gateway::new(GatewayParts {
        store: store.clone(),
        homes,
        settings,
        model,
        tools,
        channels,
        downloads: Some(Arc::new(downloads.clone())),
        sandbox: sandbox.clone(),
        disk_caps,
        shutdown: shutdown.clone(),
    });
    // Users removed or reset by `moltmate users ...` (another process) are stopped here too;
    // before recovery starts any worker, users whose ending is under way are held back.
    gateway
        .watch_user_events()
        .await
        .context("reading user events")?;
    Ok(Built {
        gateway,
        shutdown,
        sandbox,
        store,
        webhooks,
        volumes: std::sync::Mutex::new(volumes),
        downloads,
    })
}

/// `attachments.downloads` and the public URL → the download area's settings.
fn download_settings(config: &Config) -> moltmate_store::downloads::DownloadSettings {
    let d = &config.attachments.downloads;
    moltmate_store::downloads::DownloadSettings {
        ttl: Duration::from_secs(d.expire_days.saturating_mul(24 * 3600)),
        max_files_per_user: usize::try_from(d.max_files_per_user).unwrap_or(usize::MAX),
        max_bytes_per_user: d.max_mb_per_user.saturating_mul(1 << 20),
        max_bytes_total: d.max_mb_total.saturating_mul(1 << 20),
        base_url: super::public_base_url(config),
    }
}

/// The host ids `user`'s sandbox runs as and their home belongs to (allocated on first need
/// when the gateway is root).
pub async fn user_sandbox_ids(
    store: &Store,
    policy: SandboxIdPolicy,
    user: &moltmate_core::UserId,
) -> Result<SandboxIds> {
    Ok(match policy {
        SandboxIdPolicy::PerUser(range) => store.user_sandbox_ids(user, range).await?,
        SandboxIdPolicy::Shared(ids) => ids,
    })
}

/// The ids a family folder belongs to, and its gid for members when it has its own.
pub async fn family_sandbox_ids(
    store: &Store,
    policy: SandboxIdPolicy,
    family: &str,
) -> Result<(SandboxIds, Option<u32>)> {
    Ok(match policy {
        SandboxIdPolicy::PerUser(range) => {
            let gid = store.family_sandbox_gid(family, range).await?;
            (SandboxIds::same(gid), Some(gid))
        }
        SandboxIdPolicy::Shared(ids) => (ids, None),
    })
}

/// The operator token for `/admin`: `gateway.auth.token`, else a random one kept in
/// `<home>/admin.token` (0600), created on first start.
pub fn admin_token(home: &Path, config: &Config) -> Result<String> {
    if let Some(token) = &config.gateway.auth.token {
        return Ok(token.expose().to_string());
    }
    let path = home.join("admin.token");
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => Ok(token.trim().to_string()),
        _ => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let token = moltmate_store::auth::new_secret("mma_");
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&path)?;
            file.write_all(token.as_bytes())?;
            Ok(token)
        }
    }
}

/// Starts the web server (UI, API, admin, health, metrics). Returns its URL.
pub async fn start_web(home: &Path, config: &Config, built: &Built) -> Result<String> {
    let address = super::web_address(config);
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding {address}"))?;
    let bound = listener.local_addr()?;
    let settings = moltmate_web::WebSettings {
        admin_token: admin_token(home, config)?,
        rate_limit_per_minute: config.gateway.rate_limit.per_minute,
        rate_limit_burst: config.gateway.rate_limit.burst,
        unauthenticated_per_minute: config.gateway.rate_limit.unauthenticated_per_minute,
        unauthenticated_burst: config.gateway.rate_limit.unauthenticated_burst,
        secure_cookies: config.gateway.served_over_https(),
        trusted_proxies: config.gateway.trusted_proxies.clone(),
        security_checks: Some(Arc::new(crate::doctor::RunningChecks::new(
            home,
            config,
            built.sandbox.as_ref().map(|s| s.backend()),
        ))),
        base_url: super::public_base_url(config),
        prices: moltmate_ops::usage::PriceTable::from_config(&config.model.prices),
        webhooks: built.webhooks.clone(),
        downloads: Some(built.downloads.clone()),
        ..moltmate_web::WebSettings::default()
    };
    let state =
        moltmate_web::WebState::new(built.gateway.clone(), settings, built.shutdown.clone())
            .map_err(|e| anyhow::anyhow!("gateway.rateLimit: {e}"))?;
    let shutdown = built.shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = moltmate_web::serve(state, listener, shutdown).await {
            tracing::error!(error = %e, "web server stopped");
        }
    });
    Ok(format!("http://{bound}"))
}

/// Removes idle sandboxes every minute.
pub fn spawn_pruner(config: &Config, built: &Built) -> Option<tokio::task::JoinHandle<()>> {
    let sandbox = built.sandbox.clone()?;
    let idle = Duration::from_secs(config.sandbox.prune.idle_minutes * 60);
    let shutdown = built.shutdown.clone();
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            match sandbox.prune(idle).await {
                Ok(removed) if !removed.is_empty() => {
                    tracing::info!(count = removed.len(), "pruned idle sandboxes")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "pruning sandboxes failed"),
            }
        }
    }))
}
