//! The commented starter configuration written by `moltmate init`, and the safe way to write it.

use crate::error::ConfigError;
use crate::CONFIG_FILE_NAME;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// A starter `moltmate.json`: every section, with its defaults and what each key does. Secrets
/// are never written here; they come from the environment (`${VAR}` or the provider fallbacks).
pub const STARTER_CONFIG: &str = r#"// Moltmates configuration (JSON5: comments and trailing commas are fine).
// Every key is optional; what is shown here is the default unless a comment says otherwise.
// Any string may use ${VAR} to read an environment variable (write $${VAR} for a literal ${VAR}).
// Keep secrets out of this file: reference them with ${...} instead.
{
  // The HTTP gateway (web chat, API, admin page).
  gateway: {
    // Listening address. Anything other than a loopback address requires auth.token.
    bind: "127.0.0.1",
    port: 18790,
    auth: {
      // Bearer token for the API, at least 16 characters. Required when bind is not loopback.
      // token: "${MOLTMATE_GATEWAY_TOKEN}",
    },
    // Request limits (token buckets): per signed-in user (all their tokens and sessions), and
    // per client IP for everything without a verified credential (sign-ins, wrong tokens).
    rateLimit: { perMinute: 100, burst: 50, unauthenticatedPerMinute: 60, unauthenticatedBurst: 30 },
    // Behind a reverse proxy with TLS: the address people use (login links point there;
    // https makes cookies Secure), and the proxy's IP so X-Forwarded-For counts for rate limits.
    // publicUrl: "https://moltbot.example.com",
    // trustedProxies: ["172.18.0.2"],
  },

  // Which model answers, as "provider/model". Providers are configured below or builtin
  // ("anthropic", "openai").
  model: {
    primary: "anthropic/claude-sonnet-4-5",
    // Tried in order when the primary is down or overloaded, e.g. ["openai/gpt-4o"].
    fallbacks: [],
    maxToolIterations: 8,
    maxOutputTokens: 4096,
    requestTimeoutSeconds: 120,
    maxRetries: 2,
    contextWindowTokens: 200000,
    // US dollars per million tokens, for limits.spendPerMonth ("provider/*" covers a whole
    // provider). A model without a price counts as free for spend budgets.
    prices: {
      // "anthropic/claude-sonnet-4-5": { inputPerMTok: 3, outputPerMTok: 15 },
    },
  },

  // Model providers. "anthropic" and "openai" exist without configuration; their keys come
  // from ANTHROPIC_API_KEY / OPENAI_API_KEY when apiKey is not set.
  providers: {
    anthropic: {
      api: "anthropic",
      baseUrl: "https://api.anthropic.com",
      // apiKey: "${ANTHROPIC_API_KEY}",
    },
    // A local OpenAI-compatible server:
    // ollama: { api: "openai", baseUrl: "http://127.0.0.1:11434/v1" },
  },

  channels: {
    telegram: {
      // Enabled automatically when botToken is set.
      // botToken: "${TELEGRAM_BOT_TOKEN}",
      apiUrl: "https://api.telegram.org",
      // pairing: strangers get a code the owner approves; allowlist: only allowFrom;
      // open: anyone (requires "*" in allowFrom); disabled: no direct messages.
      dmPolicy: "pairing",
      // Telegram user ids (numbers or strings).
      allowFrom: [],
      pollTimeoutSeconds: 30,
      // Trust of Telegram users not listed under "users".
      defaultTrust: "stranger",
      // Pending pairing codes at most; past it, new strangers get no code and no reply.
      maxPendingPairings: 50,
    },
    // Signal through signal-cli (https://github.com/AsamK/signal-cli; the JVM build needs
    // Java 21+). Enabled automatically when account is set. Link it with
    // `moltmate channels signal link` (or scan the code on /admin).
    signal: {
      // account: "+4917012345678",
      // The gateway starts and supervises signal-cli itself:
      cliPath: "signal-cli",
      // dataDir: "/var/lib/moltmate/signal",   // default <home>/signal (0700)
      // ... or connects to one you run (multi-account, --receive-mode=manual):
      // daemon: "unix:/run/signal-cli/socket",   // or "tcp:127.0.0.1:7583"
      deviceName: "moltmate",
      readReceipts: false,
      dmPolicy: "pairing",
      // Phone numbers ("+4917...") or "*".
      allowFrom: [],
      defaultTrust: "stranger",
      maxPendingPairings: 50,
    },
    // WhatsApp Business Cloud API. Enabled automatically when phoneNumberId is set. Meta calls
    // the webhook https://<gateway.publicUrl>/webhooks/whatsapp (see README, WhatsApp).
    whatsapp: {
      // phoneNumberId: "106540352242922",
      // accessToken: "${WHATSAPP_ACCESS_TOKEN}",
      // appSecret: "${WHATSAPP_APP_SECRET}",
      // verifyToken: "${WHATSAPP_VERIFY_TOKEN}",
      apiUrl: "https://graph.facebook.com",
      apiVersion: "v21.0",
      dmPolicy: "pairing",
      // Phone numbers ("+4917...") or "*".
      allowFrom: [],
      defaultTrust: "stranger",
      maxPendingPairings: 50,
    },
    // A Discord bot (README "Discord"): enabled when botToken is set.
    // discord: {
    //   botToken: "${DISCORD_BOT_TOKEN}",
    //   apiUrl: "https://discord.com/api/v10",
    //   dmPolicy: "pairing",
    //   // Discord user ids, as strings ("123456789012345678").
    //   allowFrom: [],
    //   defaultTrust: "stranger",
    //   maxPendingPairings: 50,
    //   // Server channels: answer only when mentioned; each channel is its own user,
    //   // admitted by the operator (pairing code or allowFrom "group/<channel id>").
    //   groups: { enabled: false, mention: true },
    // },
    // A Slack app (README "Slack"): Socket Mode needs no public URL.
    // slack: {
    //   // "socket" (the gateway connects out), or "events": Slack POSTs to
    //   // https://<gateway.publicUrl>/webhooks/slack (Event Subscriptions, bot event message.im).
    //   mode: "socket",
    //   botToken: "${SLACK_BOT_TOKEN}",      // xoxb-...
    //   appToken: "${SLACK_APP_TOKEN}",      // xapp-... (mode "socket" only, connections:write)
    //   // signingSecret: "${SLACK_SIGNING_SECRET}",  // mode "events" only (Basic Information)
    //   apiUrl: "https://slack.com/api",
    //   dmPolicy: "pairing",
    //   // "<team id>/<user id>", e.g. "T0123ABC/U0456DEF".
    //   allowFrom: [],
    //   defaultTrust: "stranger",
    //   maxPendingPairings: 50,
    //   groups: { enabled: false, mention: true },
    // },
    web: { enabled: true, defaultTrust: "friend" },
    // `moltmate chat` on this machine's terminal.
    local: { defaultTrust: "owner" },
    // Pending pairing codes at most, over all channels.
    maxPendingPairings: 100,
  },

  // Where the assistant's commands and file tools run.
  sandbox: {
    // auto (Docker if reachable, else bubblewrap), docker, bwrap.
    backend: "auto",
    // all: every tool is sandboxed; tools: only exec; none: host execution (dangerous, needs
    // dangerouslyAllowHostExec: true).
    mode: "all",
    // session, user or task: how long one sandbox lives. Never shared between users.
    scope: "session",
    // rw, ro or none: how the user's home is mounted at /workspace.
    workspaceAccess: "rw",
    // none, or proxy (egress only to allowedDomains through the gateway's proxy).
    network: "none",
    allowedDomains: [],
    // Ports the proxy connects to.
    allowedPorts: [80, 443],
    image: "moltmate-sandbox:bookworm-slim",
    // dockerHost: "unix:///var/run/docker.sock",
    dangerouslyAllowHostExec: false,
    // Start a user's sandbox in the background when their turn begins (users allowed exec).
    prewarm: true,
    limits: { memoryMb: 512, cpus: 1.0, pids: 128, diskMb: 1024, tmpMb: 64, outputKb: 64 },
    prune: { idleMinutes: 30 },
    // Host uids for sandboxes when the gateway runs as root: each user gets their own (never
    // reused), each family folder a gid. Keep it clear of logins, subuid and container ranges.
    uidRange: { start: 2000000000, count: 1000000 },
    // Sandboxes alive at once, all users together (Docker: running containers, warm ones
    // included; bubblewrap: running commands). Past it the least recently used idle one is
    // stopped; if none is idle, a command waits up to queueTimeoutSeconds, then the model is
    // told the server is busy.
    maxActive: 32,
    queueTimeoutSeconds: 60,
    // What all sandboxes together may use (one parent cgroup; needs root). Left out, memory is
    // the host's RAM minus max(1 GiB, 20 %) and cpus the cores minus max(0.5, 10 %).
    // cgroup: the parent's name; a second gateway on the same host needs its own.
    total: { /* memoryMb: 8192, cpus: 3.5, */ pids: 4096, cgroup: "moltmate" },
  },

  tools: {
    // Known tools: read, write, edit, exec, web_fetch, memory_search, web_search, schedule
    // (reminders), send_file. deny wins over allow. web_search is only offered once
    // tools.web.search is enabled (below).
    allow: ["read", "write", "edit", "exec", "web_fetch", "memory_search", "web_search", "schedule", "send_file"],
    deny: [],
    exec: {
      // allowlist: only safeBins, no shell; blocklist: shell, blockedBins refused; full: anything
      // (still inside the sandbox).
      security: "allowlist",
      // Programs that only read and print. Programs that can run other programs or write files
      // (shells, interpreters, awk, sed, find, sort, env, xargs, tar, git, editors, pagers...)
      // are refused here; uniq, date and pdftotext have their arguments checked.
      safeBins: ["cat", "head", "tail", "grep", "wc", "ls", "uniq", "cut", "tr", "pdftotext",
                 "echo", "date"],
      // A program outside the project's vetted readers (jq, diff, sha256sum, ... see README,
      // "The allowlist") must also be listed here: your word that it cannot run programs or
      // write files.
      vouchedBins: [],
      blockedBins: ["curl", "wget", "nc", "ssh", "sudo", "su", "mount", "docker"],
      timeoutSeconds: 30,
      maxTimeoutSeconds: 300,
    },
    web: {
      fetch: {
        enabled: true,
        // Leave out to allow any public host; set to restrict, e.g. ["en.wikipedia.org"].
        // allowedDomains: [],
        // Ports that may be fetched from (also after a redirect).
        allowedPorts: [80, 443],
        maxBytes: 1048576,
        timeoutSeconds: 20,
      },
      // web_search: titles, links and snippets from a search service. Owners, family and
      // friends get it; strangers and restricted users never do. Results are handed to the
      // assistant as untrusted data, never as instructions.
      search: {
        enabled: false,
        // brave (Brave Search API, needs a key) or searxng (your own instance, JSON enabled).
        provider: "brave",
        // Brave: the key from https://api-dashboard.search.brave.com (default: BRAVE_API_KEY).
        // apiKey: "${BRAVE_API_KEY}",
        // SearXNG: your instance, e.g. "http://127.0.0.1:8080" (Brave needs no baseUrl).
        // baseUrl: "http://127.0.0.1:8080",
        // Results per search (1-20), the time one search may take (1-60 s), and searches per
        // user and hour (the service's quota is shared by everyone).
        maxResults: 5,
        timeoutSeconds: 10,
        perUserPerHour: 60,
      },
    },
  },

  logging: {
    // A level or tracing directives, e.g. "info,moltmate_gateway=debug".
    level: "info",
    // Log each tool call (name and outcome, never contents).
    tools: false,
    // text or json.
    format: "text",
  },

  // First-contact conversation for new users.
  onboarding: { enabled: true, language: "en", defaultPersona: "cami" },

  session: {
    // Start a fresh conversation after this many idle minutes (default: never).
    // idleResetMinutes: 720,
    // Summarise older turns when the context window is this full.
    compactAtRatio: 0.8,
  },

  // How much work one user may cause. These values apply to everyone; limits.trust.<level>
  // can only lower them (family, friend, stranger and restricted have tighter built-in
  // defaults, see README). Budgets reset at midnight (per day) and on the 1st (per month),
  // in this server's local time; any budget may be "unlimited".
  limits: {
    toolCallsPerAnswer: 32,
    toolOutputKbPerTurn: 1024,
    storedKbPerTurn: 1024,
    transcriptMb: 1024,
    memoryIndexMb: 256,
    queuedMessages: 50,
    messagesPerDay: 2000,
    tokensPerDay: 10000000,
    spendPerMonth: "unlimited",
    execSecondsPerDay: 14400,
    // Reminders one user may have at once, and the shortest repeat of a recurring one.
    reminders: 50,
    reminderMinIntervalMinutes: 15,
    trust: {
      // stranger: { messagesPerDay: 20, tokensPerDay: 50000, spendPerMonth: 0.5 },
    },
  },

  // Families share a folder. A user belongs to at most one family. A family may also share
  // a budget (on top of each member's own).
  families: {
    // home: { members: ["anna", "ben"], budget: { spendPerMonth: 30 } },
  },

  // Known users. Trust: owner, family, friend, stranger, restricted.
  users: {
    // anna: {
    //   identities: ["telegram:123456789", "signal:+4917012345678", "web:anna"],
    //   trust: "owner",
    //   displayName: "Anna",
    //   persona: "cami",
    //   // Reminders are meant in this time zone (default: the server's) and delivered on
    //   // this channel (default: the one they last wrote from).
    //   timezone: "Europe/Berlin",
    //   preferredChannel: "telegram",
    // },
  },
}
"#;

/// Writes [`STARTER_CONFIG`] to `<home>/moltmate.json` and returns that path.
///
/// Creates the home with mode 0700 if it is missing (an existing home keeps its mode). The file
/// gets mode 0600 from its creation on, is fully written and synced under a temporary name, then
/// published with a hard link, which — unlike `rename` — fails instead of replacing a file that
/// appeared meanwhile. An existing configuration is never overwritten.
pub fn write_starter_config(home: &Path) -> Result<PathBuf, ConfigError> {
    let target = home.join(CONFIG_FILE_NAME);
    let write_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ConfigError::Write { path, source }
    };
    if !home.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(home)
            .map_err(write_error(home))?;
    }
    if target.symlink_metadata().is_ok() {
        return Err(ConfigError::AlreadyExists { path: target });
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let temp = home.join(format!(
        ".{CONFIG_FILE_NAME}.tmp-{}-{nanos}",
        std::process::id()
    ));
    let result = write_and_publish(&temp, &target);
    // The temporary name is only a staging area; it must not linger either way.
    let _ = fs::remove_file(&temp);
    match result {
        Ok(()) => Ok(target),
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(ConfigError::AlreadyExists { path: target })
        }
        Err(err) => Err(write_error(&target)(err)),
    }
}

fn write_and_publish(temp: &Path, target: &Path) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(temp)?;
    file.write_all(STARTER_CONFIG.as_bytes())?;
    file.sync_all()?;
    drop(file);
    fs::hard_link(temp, target)?;
    if let Some(dir) = target.parent() {
        // Make the new directory entry durable; failure here does not undo a written file.
        if let Ok(dir) = fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}
