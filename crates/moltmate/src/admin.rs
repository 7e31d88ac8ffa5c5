//! Operator commands on a home's database and files: `pairing ...` and `users ...`.
//!
//! They open the same SQLite database as a running gateway (WAL mode lets both work at once)
//! and take effect immediately: an approved pairing is honoured on the sender's next message.

use anyhow::{bail, Context, Result};
use moltmate_core::{ChannelKind, Identity, UserId};
use moltmate_gateway::SandboxIdPolicy;
use moltmate_store::homes::{list_beneath, read_beneath, CopyLimits};
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

pub async fn users_add(
    admin: &Admin,
    user: &UserId,
    identities: &[String],
    name: Option<&str>,
) -> Result<()> {
    let created = admin.store.ensure_user(user, name).await?;
    for raw in identities {
        let identity: Identity = raw.parse()?;
        admin.store.link_identity(&identity, user, "admin").await?;
    }
    admin.ensure_home(user).await?;
    println!(
        "{} user {user}.",
        if created { "Created" } else { "Updated" }
    );
    Ok(())
}

/// Removes a user's home. A home on a capped volume is unmounted and its image deleted (the
/// image is where the files live).
pub fn wipe_home(home_dir: &Path, users_home: &Path, user: &UserId) -> Result<()> {
    if home_dir.exists() {
        moltmate_sandbox::disk::release_user_volume(users_home)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        std::fs::remove_dir_all(users_home)
            .with_context(|| format!("removing {}", users_home.display()))?;
    }
    // The scratch directory (`workspaceAccess: none`) is the user's too, and may sit on its
    // own volume.
    let scratch = home_dir
        .join("sandboxes")
        .join("scratch")
        .join(user.as_str());
    if scratch.exists() {
        moltmate_sandbox::disk::release_user_volume(&scratch)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        std::fs::remove_dir_all(&scratch)
            .with_context(|| format!("removing {}", scratch.display()))?;
    }
    let disks = home_dir.join("sandboxes").join("disks");
    let scratch_image = format!("{}.img", moltmate_sandbox::disk::scratch_volume_name(user));
    for image in [disks.join(format!("{user}.img")), disks.join(scratch_image)] {
        match std::fs::remove_file(&image) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", image.display())),
        }
    }
    Ok(())
}

/// Copies the user's home into `archive/<user>-<timestamp>/home` next to an export of their
/// transcripts, then wipes the home, so a reset or removal can be undone by hand.
async fn archive(admin: &Admin, user: &UserId) -> Result<PathBuf> {
    let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
    let archive_root = admin.home.join("archive");
    let archive_dir = archive_root.join(format!("{user}-{stamp}"));
    std::fs::create_dir_all(&archive_dir)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&archive_root, std::fs::Permissions::from_mode(0o700))?;
    let export = export_json(admin, user).await?;
    std::fs::write(
        archive_dir.join("export.json"),
        serde_json::to_vec_pretty(&export)?,
    )?;
    let home = admin.homes.home(user);
    if home.root().exists() {
        // The home is the user's: bounded and never blocking (FIFOs, sockets and devices are
        // skipped, links copied as links, depth, entries and bytes capped), so nothing in it
        // can hang or fail the reset or removal. What was skipped is listed in the archive.
        let (from, to) = (home.root().to_path_buf(), archive_dir.join("home"));
        let report = tokio::task::spawn_blocking(move || {
            moltmate_store::homes::copy_tree(&from, &to, CopyLimits::default())
        })
        .await
        .context("copying the home into the archive")?
        .context("copying the home into the archive")?;
        if report.skipped_total > 0 {
            let mut text = format!(
                "{} item(s) of the home were not archived:\n",
                report.skipped_total
            );
            for line in &report.skipped {
                text.push_str(line);
                text.push('\n');
            }
            std::fs::write(archive_dir.join("SKIPPED.txt"), text)?;
            eprintln!(
                "Note: {} item(s) of {user}'s home were not archived (see SKIPPED.txt in the archive).",
                report.skipped_total
            );
        }
        wipe_home(&admin.home, home.root(), user)?;
    }
    let index = MemoryIndex::path_for(&admin.home.join("index"), user);
    for path in [
        index.clone(),
        index.with_extension("db-wal"),
        index.with_extension("db-shm"),
    ] {
        let _ = std::fs::remove_file(path);
    }
    Ok(archive_dir)
}

pub async fn users_reset(admin: &Admin, user: &UserId, yes: bool) -> Result<()> {
    if !yes {
        bail!("`users reset` archives and wipes {user}'s home, sessions and pairings; add --yes to do it");
    }
    if admin.store.user(user).await?.is_none() {
        bail!("no user {user}");
    }
    let archived = archive(admin, user).await?;
    let revoked = admin.store.revoke_pairings(user).await?;
    admin.store.wipe_user_history(user).await?;
    admin.ensure_home(user).await?;
    println!(
        "Reset {user}: home and history archived in {}, {revoked} pairing(s) revoked. Their next message starts over.",
        archived.display()
    );
    Ok(())
}

pub async fn users_remove(admin: &Admin, user: &UserId, yes: bool) -> Result<()> {
    if !yes {
        bail!("`users remove` archives and deletes {user} entirely; add --yes to do it");
    }
    if admin.store.user(user).await?.is_none() {
        bail!("no user {user}");
    }
    let archived = archive(admin, user).await?;
    admin.store.delete_user(user).await?;
    println!(
        "Removed {user} (archived in {}). Remove them from allowFrom / users in moltmate.json too, or they can pair again.",
        archived.display()
    );
    Ok(())
}

async fn export_json(admin: &Admin, user: &UserId) -> Result<serde_json::Value> {
    admin.mount_home(user)?;
    let record = admin.store.user(user).await?;
    let transcripts = admin.store.user_transcripts(user).await?;
    let home = admin.homes.home(user);
    let mut files = serde_json::Map::new();
    for file in ["SOUL.md", "IDENTITY.md", "USER.md", "MEMORY.md"] {
        if let Ok(Some((text, _))) = read_beneath(home.root(), file, 4 << 20) {
            files.insert(file.to_string(), serde_json::Value::String(text));
        }
    }
    // Bounded: a `memory/` of millions of entries exports the first ones the kernel lists.
    if let Ok(Some(listing)) = list_beneath(home.root(), "memory", 10_000) {
        for entry in listing.entries.iter().filter(|e| !e.is_dir()).take(2_000) {
            let name = format!("memory/{}", entry.name);
            if let Ok(Some((text, _))) = read_beneath(home.root(), &name, 4 << 20) {
                files.insert(name, serde_json::Value::String(text));
            }
        }
    }
    Ok(serde_json::json!({
        "user": record,
        "files": files,
        "transcripts": transcripts.into_iter().map(|(session, at, item)| serde_json::json!({
            "session": session, "at": at, "item": item
        })).collect::<Vec<_>>(),
        "usage": admin.store.usage(Some(user)).await?,
    }))
}

pub async fn users_export(admin: &Admin, user: &UserId, output: Option<&Path>) -> Result<()> {
    if admin.store.user(user).await?.is_none() {
        bail!("no user {user}");
    }
    let export = serde_json::to_string_pretty(&export_json(admin, user).await?)?;
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
        let count = admin.store.revoke_tokens(user, None).await?;
        let sessions = admin.store.delete_user_web_sessions(user).await?;
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
    admin.store.ensure_user(user, None).await?;
    admin.ensure_home(user).await?;
    let code = admin
        .store
        .create_login_link(user, Duration::from_secs(15 * 60))
        .await?;
    eprintln!("One-time login link for {user} (valid 15 minutes):");
    println!("{base_url}/login/{code}");
    Ok(())
}
