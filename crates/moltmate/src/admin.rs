//! Operator commands on a home's database and files: `pairing ...` and `users ...`.
//!
//! They open the same SQLite database as a running gateway (WAL mode lets both work at once)
//! and take effect immediately: an approved pairing is honoured on the sender's next message.

use anyhow::{bail, Context, Result};
use moltmate_core::{ChannelKind, Identity, UserId};
use moltmate_gateway::SandboxIdPolicy;
use moltmate_store::homes::read_beneath;
use moltmate_store::memory_index::MemoryIndex;
use moltmate_store::{Homes, Store};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything an admin command needs.
pub struct Admin {
    pub home: PathBuf,
    pub store: Store,
    pub homes: Homes,
    /// Where sandbox ids come from (`sandbox.uidRange`), or why the config could not say.
    id_policy: std::result::Result<SandboxIdPolicy, String>,
}

impl Admin {
    /// The user actions shared with `/admin`.
    pub fn users(&self) -> moltmate_ops::users::UserAdmin {
        moltmate_ops::users::UserAdmin::new(
            &self.home,
            self.store.clone(),
            std::sync::Arc::new(CliEnvironment {
                home: self.home.clone(),
                store: self.store.clone(),
                homes: self.homes.clone(),
                id_policy: self.id_policy.clone(),
            }),
        )
    }

    pub fn open(home: &Path) -> Result<Admin> {
        let store = Store::open(&home.join("moltmate.db")).context("opening the database")?;
        // Only commands that create a home need the config (for the uid range); the others
        // work even when it is broken.
        let id_policy = crate::wiring::load_config(home)
            .map(|config| SandboxIdPolicy::detect(config.sandbox.uid_range.to_core()))
            .map_err(|e| format!("{e:#}"));
        Ok(Admin {
            home: home.to_path_buf(),
            store,
            homes: Homes::new(home),
            id_policy,
        })
    }

    /// Makes `user`'s files readable from here: a home whose files live in a capped volume's
    /// image (root gateways) is mounted again if it is not (after a reboot, or with the
    /// gateway stopped). Without this a reset or removal would archive an empty directory and
    /// then delete the image.
    pub fn mount_home(&self, user: &UserId) -> Result<()> {
        let home = self.homes.home(user);
        moltmate_sandbox::disk::mount_existing_user_volume(
            &self.home.join("sandboxes"),
            home.root(),
            user,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }

    /// Creates `user`'s home if missing, owned by their sandbox ids (allocated on first need
    /// when running as root, as the gateway does).
    pub async fn ensure_home(&self, user: &UserId) -> Result<()> {
        let policy = self.id_policy.clone().map_err(|e| anyhow::anyhow!("{e}"))?;
        let ids = crate::wiring::runtime::user_sandbox_ids(&self.store, policy, user).await?;
        self.homes.ensure(user, ids)?;
        Ok(())
    }
}

fn when(millis: i64) -> String {
    chrono::DateTime::from_timestamp_millis(millis)
        .map(|d| {
            d.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M")
                .to_string()
        })
        .unwrap_or_else(|| "?".to_string())
}

pub async fn pairing_list(admin: &Admin) -> Result<()> {
    let requests = admin.store.pending_pairing_requests().await?;
    if requests.is_empty() {
        println!("No pending pairing requests.");
        return Ok(());
    }
    println!(
        "{:<10} {:<24} {:<20} {:<17} EXPIRES",
        "CODE", "SENDER", "NAME", "REQUESTED"
    );
    for r in requests {
        println!(
            "{:<10} {:<24} {:<20} {:<17} {}",
            r.code,
            r.identity.to_string(),
            r.sender_name.unwrap_or_default(),
            when(r.created_at),
            when(r.expires_at)
        );
    }
    Ok(())
}

pub async fn pairing_decide(admin: &Admin, channel: &str, code: &str, approve: bool) -> Result<()> {
    // Any messaging channel (telegram, signal, whatsapp, discord, slack), in any case.
    let channel: ChannelKind = channel.trim().to_ascii_lowercase().parse()?;
    let (request, user) = admin
        .store
        .decide_pairing(channel, code, approve, UserId::for_identity)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    match user {
        Some(user) => {
            admin.ensure_home(&user).await?;
            println!(
                "Approved {} as user {user}. They can write to the assistant now.",
                request.identity
            );
        }
        None => println!("Denied {}.", request.identity),
    }
    Ok(())
}

pub async fn users_list(admin: &Admin) -> Result<()> {
    let users = admin.store.list_users().await?;
    let usage = admin.store.usage(None).await?;
    println!(
        "{:<28} {:<18} {:<40} {:>10}",
        "USER", "NAME", "IDENTITIES", "TOKENS"
    );
    for user in users {
        let tokens: i64 = usage
            .iter()
            .filter(|u| u.user == user.id.as_str())
            .map(|u| u.input_tokens + u.output_tokens)
            .sum();
        let identities = user
            .identities
            .iter()
            .map(Identity::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "{:<28} {:<18} {:<40} {:>10}",
            user.id.as_str(),
            user.display_name.unwrap_or_default(),
            identities,
            tokens
        );
    }
    Ok(())
}

pub async fn users_show(
    admin: &Admin,
    user: &UserId,
    settings: &moltmate_gateway::GatewaySettings,
) -> Result<()> {
    let Some(record) = admin.store.user(user).await? else {
        bail!("no user {user}")
    };
    println!("user:        {}", record.id);
    println!(
        "name:        {}",
        record.display_name.as_deref().unwrap_or("-")
    );
    println!("created:     {}", when(record.created_at));
    println!("onboarded:   {}", record.onboarded);
    println!(
        "identities:  {}",
        record
            .identities
            .iter()
            .map(Identity::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    admin.mount_home(user)?;
    let home = admin.homes.home(user);
    println!("home:        {}", home.root().display());
    let sandbox_uid = match admin.store.sandbox_uids().await?.get(user.as_str()) {
        Some(uid) => format!("{uid} (its own; never given to anyone else)"),
        None => match &admin.id_policy {
            Ok(SandboxIdPolicy::Shared(ids)) => {
                format!("{} (the gateway's own: not running as root)", ids.uid)
            }
            _ => "- (given on first use)".to_string(),
        },
    };
    println!("sandbox uid: {sandbox_uid}");
    for file in ["SOUL.md", "IDENTITY.md", "USER.md", "MEMORY.md"] {
        let size = read_beneath(home.root(), file, 1 << 20)
            .ok()
            .flatten()
            .map(|(t, _)| t.len());
        println!(
            "  {file:<12} {}",
            size.map(|s| format!("{s} bytes"))
                .unwrap_or_else(|| "-".to_string())
        );
    }
    for row in admin.store.usage(Some(user)).await? {
        println!(
            "usage:       {}/{}: {} in, {} out, {} calls",
            row.provider, row.model, row.input_tokens, row.output_tokens, row.calls
        );
    }
    // Today's and this month's usage against the budgets of the user's trust level.
    let channels: Vec<ChannelKind> = record.identities.iter().map(|i| i.channel).collect();
    println!("trust:       {}", settings.trust_label(user, &channels));
    let limits = &settings.settings_for_display(user, &channels).limits;
    let periods = moltmate_gateway::budget::Periods::now();
    let used = admin
        .store
        .usage_totals(std::slice::from_ref(user), &periods.day, &periods.month)
        .await?;
    let stored = admin.store.transcript_bytes(user).await?;
    for line in moltmate_gateway::budget::usage_lines(limits, &used, stored) {
        println!(
            "{:<18}{} of {}",
            format!("{}:", line.what),
            line.used,
            line.limit
        );
    }
    let index = MemoryIndex::path_for(&admin.home.join("index"), user);
    let index_bytes: u64 = [index.clone(), index.with_extension("db-wal")]
        .iter()
        .filter_map(|path| std::fs::symlink_metadata(path).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();
    println!(
        "{:<18}{:.1} MB (limits.memoryIndexMb)",
        "memory index:",
        index_bytes as f64 / (1024.0 * 1024.0)
    );
    if let Some(family) = settings.family_budget(user) {
        let used = admin
            .store
            .usage_totals(&family.members, &periods.day, &periods.month)
            .await?;
        let limits = moltmate_gateway::limits::UserLimits {
            budget: family.budget,
            ..Default::default()
        };
        for line in moltmate_gateway::budget::usage_lines(&limits, &used, 0)
            .into_iter()
            .take(4)
        {
            println!("family {}: {} of {}", line.what, line.used, line.limit);
        }
    }
    // Reminders, by the user's number, next due first, with the cap of their trust level.
    let reminders = admin.store.list_reminders(user).await?;
    println!(
        "{:<18}{} of {} (limits.reminders)",
        "reminders:",
        reminders.len(),
        limits.reminders
    );
    for reminder in &reminders {
        println!("  {}", reminder_line(reminder));
    }
    for token in admin.store.list_tokens(Some(user)).await? {
        println!(
            "api token:   #{} {} created {}{}",
            token.id,
            token.label.unwrap_or_default(),
            when(token.created_at),
            if token.revoked { " (revoked)" } else { "" }
        );
    }
    Ok(())
}

/// One reminder for the operator: number, next time in its zone, rule, text (cut).
fn reminder_line(reminder: &moltmate_store::ReminderRecord) -> String {
    let next = chrono::DateTime::from_timestamp_millis(reminder.due_at)
        .map(|t| match reminder.timezone.parse::<chrono_tz::Tz>() {
            Ok(zone) => t.with_timezone(&zone).format("%Y-%m-%d %H:%M").to_string(),
            Err(_) => t.format("%Y-%m-%d %H:%M UTC").to_string(),
        })
        .unwrap_or_else(|| "?".to_string());
    let mut text: String = reminder
        .text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(60)
        .collect();
    if reminder.text.chars().count() > 60 {
        text.push('…');
    }
    format!(
        "#{:<4} {next} {:<16} {:<18} {text}",
        reminder.number,
        reminder.timezone,
        reminder.cron.as_deref().unwrap_or("once"),
    )
}

pub async fn users_add(
    admin: &Admin,
    user: &UserId,
    identities: &[String],
    name: Option<&str>,
) -> Result<()> {
    let created = admin.users().add(user, identities, name).await?;
    println!(
        "{} user {user}.",
        if created { "Created" } else { "Updated" }
    );
    Ok(())
}

pub async fn users_reset(admin: &Admin, user: &UserId, yes: bool) -> Result<()> {
    if !yes {
        bail!("`users reset` archives and wipes {user}'s home, conversations, browser sessions and API tokens; add --yes to do it");
    }
    let done = admin.users().reset(user).await?;
    note_skipped(user, done.skipped);
    note_sandbox(&done);
    println!(
        "Reset {user}: home and history archived in {}; {}. Their identities and trust stay; their next message starts over.",
        done.archive.display(),
        done.summary()
    );
    Ok(())
}

pub async fn users_remove(admin: &Admin, user: &UserId, yes: bool) -> Result<()> {
    if !yes {
        bail!("`users remove` archives and deletes {user} entirely; add --yes to do it");
    }
    let done = admin.users().remove(user).await?;
    if done.resumed {
        note_sandbox(&done);
        println!("Finished removing {user}.");
        return Ok(());
    }
    note_skipped(user, done.skipped);
    note_sandbox(&done);
    println!(
        "Removed {user} (archived in {}); {}. Remove them from allowFrom / users in moltmate.json too, or they can pair again.",
        done.archive.display(),
        done.summary()
    );
    Ok(())
}

fn note_sandbox(done: &moltmate_ops::users::Outcome) {
    if done.lock_timed_out {
        eprintln!(
            "Warning: the user's turn still ran after {} s (a gateway that does not act on removals, or one that hangs); the files were wiped anyway. Nothing that turn does is kept.",
            moltmate_ops::users::LOCK_WAIT.as_secs()
        );
    }
    if let Some(note) = &done.sandbox_note {
        eprintln!("Note: {note}");
    }
}

fn note_skipped(user: &UserId, skipped: u64) {
    if skipped > 0 {
        eprintln!(
            "Note: {skipped} item(s) of {user}'s home were not archived (see SKIPPED.txt in the archive)."
        );
    }
}

pub async fn users_export(admin: &Admin, user: &UserId, output: Option<&Path>) -> Result<()> {
    if admin.store.user(user).await?.is_none() {
        bail!("no user {user}");
    }
    let export = serde_json::to_string_pretty(&admin.users().export(user).await?)?;
    match output {
        Some(path) => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(path)?;
            file.write_all(export.as_bytes())?;
            println!("Exported {user} to {}.", path.display());
        }
        None => println!("{export}"),
    }
    Ok(())
}

pub async fn users_token(
    admin: &Admin,
    user: &UserId,
    revoke: bool,
    label: Option<&str>,
) -> Result<()> {
    if revoke {
        let (count, sessions) = admin.users().revoke(user).await?;
        println!("Revoked {count} token(s) of {user} and signed them out of {sessions} browser session(s).");
        return Ok(());
    }
    admin.store.ensure_user(user, None).await?;
    admin.ensure_home(user).await?;
    let token = admin.store.issue_token(user, label).await?;
    eprintln!("API token for {user} (shown once; store it safely):");
    println!("{token}");
    Ok(())
}

pub async fn users_login_link(admin: &Admin, user: &UserId, base_url: &str) -> Result<()> {
    let url = admin
        .users()
        .login_link(user, base_url, Duration::from_secs(15 * 60))
        .await?;
    eprintln!("One-time login link for {user} (valid 15 minutes):");
    println!("{url}");
    Ok(())
}

/// What `users reset/remove/add` need from the binary when run from the CLI: homes owned by
/// the sandbox ids, and the Docker containers of this home removed whether or not a gateway
/// runs.
struct CliEnvironment {
    home: PathBuf,
    store: Store,
    homes: Homes,
    id_policy: std::result::Result<SandboxIdPolicy, String>,
}

#[async_trait::async_trait]
impl moltmate_ops::users::Environment for CliEnvironment {
    async fn ensure_home(&self, user: &UserId) -> std::result::Result<(), moltmate_ops::OpsError> {
        let policy = self
            .id_policy
            .clone()
            .map_err(moltmate_ops::OpsError::Failed)?;
        let ids = crate::wiring::runtime::user_sandbox_ids(&self.store, policy, user)
            .await
            .map_err(|e| moltmate_ops::OpsError::Failed(format!("{e:#}")))?;
        self.homes.ensure(user, ids)?;
        Ok(())
    }

    /// Nothing to do when the config says bubblewrap (its commands die with the gateway that
    /// ran them) or no Docker daemon answers.
    async fn remove_containers(&self, user: &UserId) -> std::result::Result<usize, String> {
        let config = crate::wiring::load_config(&self.home).map_err(|e| {
            format!("the config could not be read, so Docker sandboxes were not looked for: {e:#}")
        })?;
        let settings = crate::wiring::sandbox_settings(&self.home, &config);
        if settings.backend == moltmate_sandbox::BackendChoice::Bwrap
            || !moltmate_sandbox::docker::docker_available(&settings).await
        {
            return Ok(0);
        }
        let docker = moltmate_sandbox::docker::DockerSandbox::connect(&settings)
            .map_err(|e| e.to_string())?;
        docker
            .remove_user(user)
            .await
            .map(|removed| removed.len())
            .map_err(|e| format!("Docker sandboxes could not be removed: {e}"))
    }
}
