//! What resetting or removing a user does, in one place for `moltmate users reset|remove` and
//! the `/admin` page: archive the home and an export of everything stored, wipe the home (its
//! capped volume unmounted and its image deleted), the memory index, then the database rows.
//!
//! [`UserAdmin::reset`] and [`UserAdmin::remove`] are the only entry points; whatever else a
//! removal must end (web sessions, tokens, sandboxes, in-memory workers) belongs inside them,
//! so the CLI and the page can never drift apart.

use crate::OpsError;
use moltmate_core::UserId;
use moltmate_store::homes::{list_beneath, read_beneath, CopyLimits, CopyReport};
use moltmate_store::memory_index::MemoryIndex;
use moltmate_store::{Homes, Store};
use std::path::{Path, PathBuf};

/// The moltmate home's database, homes and paths, for operator actions on users.
#[derive(Clone)]
pub struct UserAdmin {
    pub home: PathBuf,
    pub store: Store,
    pub homes: Homes,
}

/// What [`UserAdmin::reset`] or [`UserAdmin::remove`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `<home>/archive/<user>-<timestamp>`: `export.json`, `home/`, `SKIPPED.txt`.
    pub archive: PathBuf,
    /// Items of the home not archived (FIFOs, sockets, devices, over the bounds); listed in
    /// `SKIPPED.txt` in the archive.
    pub skipped: u64,
    /// Pairing requests revoked (reset only).
    pub pairings_revoked: usize,
}

async fn blocking<R: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> Result<R, OpsError> + Send + 'static,
) -> Result<R, OpsError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| OpsError::Failed(format!("{what}: {e}")))?
}

impl UserAdmin {
    /// For the home at `home` whose database is `store`.
    pub fn new(home: &Path, store: Store) -> UserAdmin {
        UserAdmin {
            home: home.to_path_buf(),
            store,
            homes: Homes::new(home),
        }
    }

    async fn existing(&self, user: &UserId) -> Result<(), OpsError> {
        match self.store.user(user).await? {
            Some(_) => Ok(()),
            None => Err(OpsError::NoSuchUser(user.clone())),
        }
    }

    /// Archives, then wipes the user's home, sessions, transcripts, pending messages and
    /// pairings. The user row, identities, tokens and the operator's records (audit, usage)
    /// stay; their next message starts over.
    pub async fn reset(&self, user: &UserId) -> Result<Outcome, OpsError> {
        self.existing(user).await?;
        let (archive, skipped) = self.archive(user).await?;
        let pairings_revoked = self.store.revoke_pairings(user).await?;
        self.store.wipe_user_history(user).await?;
        let homes = self.homes.clone();
        let again = user.clone();
        blocking("making the fresh home", move || {
            homes.ensure(&again)?;
            Ok(())
        })
        .await?;
        Ok(Outcome {
            archive,
            skipped,
            pairings_revoked,
        })
    }

    /// Archives, then deletes the user entirely (home, index, identities, sessions,
    /// transcripts, tokens, pending messages and pairings). Audit events and usage stay: they
    /// are the operator's record.
    pub async fn remove(&self, user: &UserId) -> Result<Outcome, OpsError> {
        self.existing(user).await?;
        let (archive, skipped) = self.archive(user).await?;
        self.store.delete_user(user).await?;
        Ok(Outcome {
            archive,
            skipped,
            pairings_revoked: 0,
        })
    }

    /// Creates the user (or updates nothing but links), links channel identities (`telegram:123`)
    /// and makes their home. Returns whether the user was new. Identities are parsed before
    /// anything is stored, so a bad one changes nothing.
    pub async fn add(
        &self,
        user: &UserId,
        identities: &[String],
        name: Option<&str>,
    ) -> Result<bool, OpsError> {
        let mut parsed = Vec::with_capacity(identities.len());
        for raw in identities {
            let identity: moltmate_core::Identity =
                raw.trim().parse().map_err(|e: moltmate_core::InvalidId| {
                    OpsError::Invalid(format!("identity {raw:?}: {e}"))
                })?;
            parsed.push(identity);
        }
        let created = self.store.ensure_user(user, name).await?;
        for identity in &parsed {
            self.store.link_identity(identity, user, "admin").await?;
        }
        let homes = self.homes.clone();
        let user = user.clone();
        blocking("making the home", move || {
            homes.ensure(&user)?;
            Ok(())
        })
        .await?;
        Ok(created)
    }

    /// A one-time sign-in link for the user (created if new), valid for `ttl`.
    pub async fn login_link(
        &self,
        user: &UserId,
        base_url: &str,
        ttl: std::time::Duration,
    ) -> Result<String, OpsError> {
        self.store.ensure_user(user, None).await?;
        let homes = self.homes.clone();
        let again = user.clone();
        blocking("making the home", move || {
            homes.ensure(&again)?;
            Ok(())
        })
        .await?;
        let code = self.store.create_login_link(user, ttl).await?;
        Ok(format!("{}/login/{code}", base_url.trim_end_matches('/')))
    }

    /// Revokes all the user's API tokens and ends their browser sessions. Returns (tokens,
    /// sessions).
    pub async fn revoke(&self, user: &UserId) -> Result<(usize, usize), OpsError> {
        self.existing(user).await?;
        let tokens = self.store.revoke_tokens(user, None).await?;
        let sessions = self.store.delete_user_web_sessions(user).await?;
        Ok((tokens, sessions))
    }

    /// Everything stored about a user, as JSON (`users export`, and `export.json` in an
    /// archive).
    pub async fn export(&self, user: &UserId) -> Result<serde_json::Value, OpsError> {
        let record = self.store.user(user).await?;
        let transcripts = self.store.user_transcripts(user).await?;
        let usage = self.store.usage(Some(user)).await?;
        let root = self.homes.home(user).root().to_path_buf();
        let files = blocking("reading the home for the export", move || {
            Ok(export_files(&root))
        })
        .await?;
        Ok(serde_json::json!({
            "user": record,
            "files": files,
            "transcripts": transcripts.into_iter().map(|(session, at, item)| serde_json::json!({
                "session": session, "at": at, "item": item
            })).collect::<Vec<_>>(),
            "usage": usage,
        }))
    }

    /// Copies the user's home into `archive/<user>-<timestamp>/home` next to an export of
    /// their data, then wipes the home and the memory index, so a reset or removal can be
    /// undone by hand. Returns the archive and how many items were not archived.
    async fn archive(&self, user: &UserId) -> Result<(PathBuf, u64), OpsError> {
        let export = serde_json::to_vec_pretty(&self.export(user).await?)
            .map_err(|e| OpsError::Failed(format!("encoding the export: {e}")))?;
        let home_dir = self.home.clone();
        let root = self.homes.home(user).root().to_path_buf();
        let user = user.clone();
        blocking("archiving the home", move || {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
            let archive_root = home_dir.join("archive");
            let io = |what: String| move |source| OpsError::Io { what, source };
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&archive_root)
                .map_err(io(format!("creating {}", archive_root.display())))?;
            // A fresh folder every time: a reset and a removal in the same second must not
            // share one (the second export would replace the first).
            let mut archive_dir = archive_root.join(format!("{user}-{stamp}"));
            let mut attempt = 1;
            loop {
                match std::fs::DirBuilder::new().mode(0o700).create(&archive_dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 1000 => {
                        attempt += 1;
                        archive_dir = archive_root.join(format!("{user}-{stamp}-{attempt}"));
                    }
                    Err(e) => return Err(io(format!("creating {}", archive_dir.display()))(e)),
                }
            }
            std::fs::set_permissions(&archive_root, std::fs::Permissions::from_mode(0o700))
                .map_err(io(format!("securing {}", archive_root.display())))?;
            write_private(&archive_dir.join("export.json"), &export)?;
            let mut skipped = 0;
            if root.exists() {
                // The home is the user's: bounded and never blocking (FIFOs, sockets and devices
                // are skipped, links copied as links, depth, entries and bytes capped), so
                // nothing in it can hang or fail the reset or removal. What was skipped is
                // listed in the archive.
                let report = moltmate_store::homes::copy_tree(
                    &root,
                    &archive_dir.join("home"),
                    CopyLimits::default(),
                )?;
                skipped = report.skipped_total;
                if skipped > 0 {
                    write_private(
                        &archive_dir.join("SKIPPED.txt"),
                        skipped_text(&report).as_bytes(),
                    )?;
                }
                wipe_home(&home_dir, &root, &user)?;
            }
            let index = MemoryIndex::path_for(&home_dir.join("index"), &user);
            for path in [
                index.clone(),
                index.with_extension("db-wal"),
                index.with_extension("db-shm"),
            ] {
                let _ = std::fs::remove_file(path);
            }
            Ok((archive_dir, skipped))
        })
        .await
    }
}

fn skipped_text(report: &CopyReport) -> String {
    let mut text = format!(
        "{} item(s) of the home were not archived:\n",
        report.skipped_total
    );
    for line in &report.skipped {
        text.push_str(line);
        text.push('\n');
    }
    text
}

/// Writes a new owner-only file (0600).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), OpsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| OpsError::Io {
            what: format!("writing {}", path.display()),
            source,
        })?;
    file.write_all(bytes).map_err(|source| OpsError::Io {
        what: format!("writing {}", path.display()),
        source,
    })
}

fn export_files(root: &Path) -> serde_json::Map<String, serde_json::Value> {
    let mut files = serde_json::Map::new();
    for file in ["SOUL.md", "IDENTITY.md", "USER.md", "MEMORY.md"] {
        if let Ok(Some((text, _))) = read_beneath(root, file, 4 << 20) {
            files.insert(file.to_string(), serde_json::Value::String(text));
        }
    }
    // Bounded: a `memory/` of millions of entries exports the first ones the kernel lists.
    if let Ok(Some(listing)) = list_beneath(root, "memory", 10_000) {
        for entry in listing.entries.iter().filter(|e| !e.is_dir()).take(2_000) {
            let name = format!("memory/{}", entry.name);
            if let Ok(Some((text, _))) = read_beneath(root, &name, 4 << 20) {
                files.insert(name, serde_json::Value::String(text));
            }
        }
    }
    files
}

/// Removes a user's home. A home on a capped volume is unmounted and its image deleted (the
/// image is where the files live); so is the scratch directory (`workspaceAccess: none`).
/// Blocking.
pub fn wipe_home(home_dir: &Path, users_home: &Path, user: &UserId) -> Result<(), OpsError> {
    let removing = |path: &Path| {
        let what = format!("removing {}", path.display());
        move |source| OpsError::Io { what, source }
    };
    if users_home.exists() {
        moltmate_sandbox::disk::release_user_volume(users_home)
            .map_err(|e| OpsError::Failed(e.to_string()))?;
        std::fs::remove_dir_all(users_home).map_err(removing(users_home))?;
    }
    let scratch = home_dir
        .join("sandboxes")
        .join("scratch")
        .join(user.as_str());
    if scratch.exists() {
        moltmate_sandbox::disk::release_user_volume(&scratch)
            .map_err(|e| OpsError::Failed(e.to_string()))?;
        std::fs::remove_dir_all(&scratch).map_err(removing(&scratch))?;
    }
    let disks = home_dir.join("sandboxes").join("disks");
    let scratch_image = format!("{}.img", moltmate_sandbox::disk::scratch_volume_name(user));
    for image in [disks.join(format!("{user}.img")), disks.join(scratch_image)] {
        match std::fs::remove_file(&image) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(removing(&image)(e)),
        }
    }
    Ok(())
}
