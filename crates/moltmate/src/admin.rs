//! Operator commands on a home's database and files: `pairing ...` and `users ...`.
//!
//! They open the same SQLite database as a running gateway (WAL mode lets both work at once)
//! and take effect immediately: an approved pairing is honoured on the sender's next message.

use anyhow::{bail, Context, Result};
use moltmate_core::{ChannelKind, Identity, UserId};
use moltmate_store::homes::read_beneath;
use moltmate_store::{Homes, Store};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything an admin command needs.
pub struct Admin {
    pub home: PathBuf,
    pub store: Store,
    pub homes: Homes,
}

impl Admin {
    /// The user actions shared with `/admin`.
    pub fn users(&self) -> moltmate_ops::users::UserAdmin {
        moltmate_ops::users::UserAdmin::new(&self.home, self.store.clone())
    }

    pub fn open(home: &Path) -> Result<Admin> {
        let store = Store::open(&home.join("moltmate.db")).context("opening the database")?;
        Ok(Admin {
            home: home.to_path_buf(),
            store,
            homes: Homes::new(home),
        })
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
    let channel: ChannelKind = channel.parse()?;
    let (request, user) = admin
        .store
        .decide_pairing(channel, code, approve, UserId::for_identity)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    match user {
        Some(user) => {
            admin.homes.ensure(&user)?;
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

pub async fn users_show(admin: &Admin, user: &UserId) -> Result<()> {
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
    let home = admin.homes.home(user);
    println!("home:        {}", home.root().display());
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
    let created = admin.users().add(user, identities, name).await?;
    println!(
        "{} user {user}.",
        if created { "Created" } else { "Updated" }
    );
    Ok(())
}

pub async fn users_reset(admin: &Admin, user: &UserId, yes: bool) -> Result<()> {
    if !yes {
        bail!("`users reset` archives and wipes {user}'s home, sessions and pairings; add --yes to do it");
    }
    let done = admin.users().reset(user).await?;
    note_skipped(user, done.skipped);
    println!(
        "Reset {user}: home and history archived in {}, {} pairing(s) revoked. Their next message starts over.",
        done.archive.display(),
        done.pairings_revoked
    );
    Ok(())
}

pub async fn users_remove(admin: &Admin, user: &UserId, yes: bool) -> Result<()> {
    if !yes {
        bail!("`users remove` archives and deletes {user} entirely; add --yes to do it");
    }
    let done = admin.users().remove(user).await?;
    note_skipped(user, done.skipped);
    println!(
        "Removed {user} (archived in {}). Remove them from allowFrom / users in moltmate.json too, or they can pair again.",
        done.archive.display()
    );
    Ok(())
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
    admin.homes.ensure(user)?;
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
