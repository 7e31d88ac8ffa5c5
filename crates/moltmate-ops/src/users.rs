//! What resetting or removing a user does, in one place for `moltmate users reset|remove` and
//! the `/admin` page.
//!
//! The action may run as its own process (the CLI) next to a running `moltmate serve` on the
//! same home, or inside the gateway (the page). The order:
//!
//! 1. The home is copied into `archive/<user>-<timestamp>/` with an export of everything stored.
//! 2. [`moltmate_store::Store::end_user`]: one transaction deletes sessions, transcripts,
//!    waiting messages, reminders, credentials, pairing codes (and for `remove` the user,
//!    identities and budget counters), retires the sandbox uid and appends a `user_events`
//!    row. From here on no credential of the user works and no turn of theirs can commit.
//! 3. A running gateway sees the event within ~500 ms, aborts the user's worker and running
//!    turn and ends their sandboxes; this action waits (bounded by [`LOCK_WAIT`]) for the
//!    user's lock, which a worker holds during a turn, so the home is not wiped under a turn
//!    still writing to it. Then it removes the user's sandbox containers through the
//!    [`Environment`] (for when no gateway runs), wipes the home, scratch directory, disk
//!    images and memory index, gives a reset user their new home, and appends a `settled`
//!    event: only now does a gateway start a worker for the id again, so nothing of the new
//!    life ever runs on the old files.
//!
//! [`UserAdmin::reset`] and [`UserAdmin::remove`] are the only entry points; whatever else a
//! removal must end belongs inside them, so the CLI and the page can never drift apart.

use crate::OpsError;
use moltmate_core::UserId;
use moltmate_store::homes::{list_beneath, open_beneath, CopyLimits, CopyReport, Expect};
use moltmate_store::memory_index::MemoryIndex;
use moltmate_store::{Ended, Ending, Homes, Store};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a reset or removal waits for a running turn of the user to be stopped. A current
/// gateway stops it within a second; what holds the lock longer is a gateway that does not act
/// on user events (an older release) or does not respond. Then the files are wiped anyway: the
/// turn can commit nothing (its records are gone), and the user's new life starts only after
/// the wipe.
pub const LOCK_WAIT: Duration = Duration::from_secs(30);
const LOCK_POLL: Duration = Duration::from_millis(50);

/// What only the caller knows: how homes are owned (the sandbox ids) and how to reach the
/// sandbox backend. The CLI and the gateway's `/admin` page each provide one.
#[async_trait::async_trait]
pub trait Environment: Send + Sync {
    /// Creates the user's home (if missing), owned by their sandbox ids.
    async fn ensure_home(&self, user: &UserId) -> Result<(), OpsError>;
    /// Removes the user's sandbox containers of this home, whether or not a gateway runs.
    /// Returns how many; `Err` is a note for the operator (Docker not reachable...).
    async fn remove_containers(&self, user: &UserId) -> Result<usize, String>;
}

/// The moltmate home's database, homes and paths, for operator actions on users.
#[derive(Clone)]
pub struct UserAdmin {
    pub home: PathBuf,
    pub store: Store,
    pub homes: Homes,
    environment: Arc<dyn Environment>,
}

/// What [`UserAdmin::reset`] or [`UserAdmin::remove`] did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// `<home>/archive/<user>-<timestamp>`: `export.json`, `home/`, `SKIPPED.txt`. Empty when
    /// an earlier, interrupted removal was only finished ([`Outcome::resumed`]).
    pub archive: PathBuf,
    /// Items of the home not archived (FIFOs, sockets, devices, over the bounds); listed in
    /// `SKIPPED.txt` in the archive.
    pub skipped: u64,
    /// What the store ended (sessions, links, tokens, pairing codes, messages, reminders).
    pub ended: Option<Ended>,
    /// The user's lock was busy (a turn was running) for this long before it was free.
    pub waited: Option<Duration>,
    /// The lock was still held after [`LOCK_WAIT`]; the files were wiped anyway.
    pub lock_timed_out: bool,
    /// Sandbox containers of the user removed.
    pub containers: usize,
    /// Why containers could not be looked for (Docker configured but not reachable...).
    pub sandbox_note: Option<String>,
    /// An earlier removal had ended the records but failed before its end; this one finished it.
    pub resumed: bool,
}

impl Outcome {
    /// One line for the operator: what was ended, stopped and removed.
    pub fn summary(&self) -> String {
        let mut text = match &self.ended {
            Some(e) => format!(
                "ended {} browser session(s), {} login link(s), {} API token(s), {} pairing code(s); {} waiting message(s) dropped; {} reminder(s) cancelled",
                e.web_sessions, e.login_links, e.api_tokens, e.pairing_codes, e.pending_messages, e.reminders
            ),
            None => "an earlier removal was finished".to_string(),
        };
        match self.waited {
            _ if self.lock_timed_out => text.push_str(
                "; a running turn did not stop in time (files wiped anyway; nothing it does is kept)",
            ),
            Some(waited) => text.push_str(&format!(
                "; a running turn was stopped ({:.1} s)",
                waited.as_secs_f64()
            )),
            None => {}
        }
        if self.containers > 0 {
            text.push_str(&format!(
                "; {} sandbox container(s) removed",
                self.containers
            ));
        }
        text
    }
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
    pub fn new(home: &Path, store: Store, environment: Arc<dyn Environment>) -> UserAdmin {
        UserAdmin {
            home: home.to_path_buf(),
            store,
            homes: Homes::new(home),
            environment,
        }
    }

    async fn existing(&self, user: &UserId) -> Result<(), OpsError> {
        match self.store.user(user).await? {
            Some(_) => Ok(()),
            None => Err(OpsError::NoSuchUser(user.clone())),
        }
    }

    /// Archives, then ends the user's sessions, transcripts, pending messages, reminders,
    /// credentials and pairings, stops what they had running and wipes their files. The user
    /// row, identities, trust and the operator's records (audit, usage) stay; their next
    /// message starts over in a fresh home.
    pub async fn reset(&self, user: &UserId) -> Result<Outcome, OpsError> {
        self.existing(user).await?;
        let (archive, skipped) = self.archive(user).await?;
        let ended = self
            .store
            .end_user(user, Ending::Reset)
            .await?
            .ok_or_else(|| OpsError::NoSuchUser(user.clone()))?;
        let mut outcome = self.finish(user, Ending::Reset).await?;
        outcome.archive = archive;
        outcome.skipped = skipped;
        outcome.ended = Some(ended);
        Ok(outcome)
    }

    /// Archives, then deletes the user entirely (home, index, identities, sessions,
    /// transcripts, reminders, tokens, pending messages and pairings), stopping what they had
    /// running. Audit events and usage stay: they are the operator's record. A removal that
    /// failed half-way (records ended, files not yet wiped) is finished by running it again.
    pub async fn remove(&self, user: &UserId) -> Result<Outcome, OpsError> {
        if self.store.user(user).await?.is_none() {
            let unsettled = self
                .store
                .unsettled_user_events(0)
                .await?
                .iter()
                .any(|e| &e.user == user);
            if unsettled {
                let mut outcome = self.finish(user, Ending::Remove).await?;
                outcome.resumed = true;
                return Ok(outcome);
            }
            return Err(OpsError::NoSuchUser(user.clone()));
        }
        let (archive, skipped) = self.archive(user).await?;
        let ended = self
            .store
            .end_user(user, Ending::Remove)
            .await?
            .ok_or_else(|| OpsError::NoSuchUser(user.clone()))?;
        let mut outcome = self.finish(user, Ending::Remove).await?;
        outcome.archive = archive;
        outcome.skipped = skipped;
        outcome.ended = Some(ended);
        Ok(outcome)
    }

    /// Waits (bounded) until no turn of `user` runs, then stops their sandboxes, wipes their
    /// files and settles the ending. Called after the user's records were ended in the store.
    async fn finish(&self, user: &UserId, how: Ending) -> Result<Outcome, OpsError> {
        let mut outcome = Outcome::default();
        let lock = self.wait_for_turn(user, &mut outcome).await?;
        match self.environment.remove_containers(user).await {
            Ok(count) => outcome.containers = count,
            Err(note) => outcome.sandbox_note = Some(note),
        }
        let (home_dir, homes, again) = (self.home.clone(), self.homes.clone(), user.clone());
        blocking("wiping the user's files", move || {
            wipe_user_files(&home_dir, &homes, &again)
        })
        .await?;
        // A turn may have offered a download between the ending transaction and the wipe.
        self.store.forget_user_downloads(user).await?;
        self.store.settle_user(user).await?;
        drop(lock);
        if how == Ending::Reset {
            // The fresh home right away where the caller can make it (the CLI); a gateway
            // still holding the user back until it sees the settling makes it on the user's
            // next message instead.
            if let Err(e) = self.environment.ensure_home(user).await {
                tracing::info!(%user, "the fresh home is made on the next message: {e}");
            }
        }
        Ok(outcome)
    }

    /// Takes the user's lock, waiting for a running turn to be stopped by its gateway.
    async fn wait_for_turn(
        &self,
        user: &UserId,
        outcome: &mut Outcome,
    ) -> Result<Option<moltmate_store::homes::UserLock>, OpsError> {
        let started = Instant::now();
        loop {
            if let Some(lock) = self.homes.try_lock_user(user)? {
                if outcome.waited.is_some() {
                    outcome.waited = Some(started.elapsed());
                }
                return Ok(Some(lock));
            }
            if outcome.waited.is_none() {
                tracing::info!(%user, "a turn of the user is running; waiting for the gateway to stop it");
                outcome.waited = Some(Duration::ZERO);
            }
            if started.elapsed() >= LOCK_WAIT {
                tracing::warn!(%user, "the user's turn still runs after {} s; wiping the files anyway (nothing that turn does is kept)", LOCK_WAIT.as_secs());
                outcome.lock_timed_out = true;
                return Ok(None);
            }
            tokio::time::sleep(LOCK_POLL).await;
        }
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
        self.environment.ensure_home(user).await?;
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
        self.environment.ensure_home(user).await?;
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
        let (files, left_out) = blocking("reading the home for the export", move || {
            Ok(export_files(&root))
        })
        .await?;
        Ok(serde_json::json!({
            "user": record,
            "files": files,
            "filesLeftOut": left_out,
            "transcripts": transcripts.into_iter().map(|(session, at, item)| serde_json::json!({
                "session": session, "at": at, "item": item
            })).collect::<Vec<_>>(),
            "usage": usage,
        }))
    }

    /// Copies the user's home into `archive/<user>-<timestamp>/home` next to an export of
    /// their data, so a reset or removal can be undone by hand (the wipe comes after the
    /// records are ended and a running turn is stopped). Returns the archive and how many
    /// items were not archived.
    async fn archive(&self, user: &UserId) -> Result<(PathBuf, u64), OpsError> {
        // The home's files may live in an image that is not mounted (gateway stopped, reboot):
        // mounted first, or the export and the copy would see the empty directory underneath.
        let (state, root, again) = (
            self.home.join("sandboxes"),
            self.homes.home(user).root().to_path_buf(),
            user.clone(),
        );
        blocking("mounting the home's volume", move || {
            moltmate_sandbox::disk::mount_existing_user_volume(&state, &root, &again)
                .map(|_| ())
                .map_err(|e| OpsError::Failed(e.to_string()))
        })
        .await?;
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
            }
            Ok((archive_dir, skipped))
        })
        .await
    }
}

/// Wipes the user's home (and its capped volume), scratch directory and memory index. The
/// home's files may live in an image that is not mounted (gateway stopped, reboot): it is
/// mounted first so the unmount and delete cover it. Blocking.
fn wipe_user_files(home_dir: &Path, homes: &Homes, user: &UserId) -> Result<(), OpsError> {
    let home = homes.home(user);
    moltmate_sandbox::disk::mount_existing_user_volume(
        &home_dir.join("sandboxes"),
        home.root(),
        user,
    )
    .map(|_| ())
    .map_err(|e| OpsError::Failed(e.to_string()))?;
    wipe_home(home_dir, home.root(), user)?;
    moltmate_store::downloads::wipe_user_downloads(home_dir, user).map_err(|source| {
        OpsError::Io {
            what: "removing the user's downloads".to_string(),
            source,
        }
    })?;
    let index = MemoryIndex::path_for(&home_dir.join("index"), user);
    for path in [
        index.clone(),
        index.with_extension("db-wal"),
        index.with_extension("db-shm"),
    ] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(OpsError::Io {
                    what: format!("removing {}", path.display()),
                    source,
                })
            }
        }
    }
    Ok(())
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

/// File content one export (`users export`, `export.json` of a reset or removal) holds at
/// most, all files together; the rest is listed under `filesLeftOut`. The export is built in
/// memory (inside the gateway for `/admin`), so it is bounded by what it costs there.
pub const EXPORT_BUDGET: u64 = 16 << 20;
/// One file's content in an export at most (the rest is cut, and the file listed as cut).
const EXPORT_FILE_MAX: u64 = 4 << 20;
/// Files of `memory/` looked at at most.
const EXPORT_MEMORY_FILES: usize = 2_000;

/// The home's notes for an export, within [`EXPORT_BUDGET`]: each file is charged before it is
/// read by the larger of its apparent and allocated size (capped at [`EXPORT_FILE_MAX`]; a
/// sparse file costs what it reads, not what it occupies), and what its JSON text costs beyond
/// that after (a NUL becomes six bytes). What does not fit is left out and listed.
fn export_files(root: &Path) -> (serde_json::Map<String, serde_json::Value>, Vec<String>) {
    use std::io::Read;
    let mut files = serde_json::Map::new();
    let mut left_out = Vec::new();
    let mut names: Vec<String> = ["SOUL.md", "IDENTITY.md", "USER.md", "MEMORY.md"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // Bounded: a `memory/` of millions of entries exports the first ones the kernel lists.
    if let Ok(Some(listing)) = list_beneath(root, "memory", 10_000) {
        names.extend(
            listing
                .entries
                .iter()
                .filter(|e| !e.is_dir())
                .take(EXPORT_MEMORY_FILES)
                .map(|e| format!("memory/{}", e.name)),
        );
    }
    let Ok(dir) = rustix::fs::open(
        root,
        rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::RDONLY
            | rustix::fs::OFlags::CLOEXEC
            | rustix::fs::OFlags::NOFOLLOW,
        rustix::fs::Mode::empty(),
    ) else {
        return (files, left_out);
    };
    let mut remaining = EXPORT_BUDGET;
    for name in names {
        let Ok(Some((fd, stat))) = open_beneath(&dir, &name, Expect::File) else {
            continue;
        };
        let apparent = u64::try_from(stat.st_size).unwrap_or(u64::MAX);
        let allocated = u64::try_from(stat.st_blocks)
            .unwrap_or(u64::MAX)
            .saturating_mul(512);
        let charge = apparent.max(allocated).min(EXPORT_FILE_MAX);
        if charge > remaining {
            left_out.push(format!("{name}: over the export's budget"));
            continue;
        }
        remaining -= charge;
        let mut bytes = Vec::new();
        if std::fs::File::from(fd)
            .take(EXPORT_FILE_MAX.min(charge))
            .read_to_end(&mut bytes)
            .is_err()
        {
            left_out.push(format!("{name}: could not be read"));
            continue;
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        drop(bytes);
        // What the text costs as JSON beyond what was charged for reading it.
        let encoded = json_string_len(&text) as u64;
        let extra = encoded.saturating_sub(charge);
        if extra > remaining {
            left_out.push(format!("{name}: over the export's budget"));
            continue;
        }
        remaining -= extra;
        if apparent > charge {
            left_out.push(format!(
                "{name}: cut to its first {charge} of {apparent} bytes"
            ));
        }
        files.insert(name, serde_json::Value::String(text));
    }
    (files, left_out)
}

/// Length of `text` as a JSON string, without building it.
fn json_string_len(text: &str) -> usize {
    2 + text
        .chars()
        .map(|c| match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        })
        .sum::<usize>()
}

/// Removes a user's home. A home on a capped volume is unmounted (every mount of its image,
/// wherever it is) and its image deleted (the image is where the files live); so is the
/// scratch directory (`workspaceAccess: none`). Blocking.
pub fn wipe_home(home_dir: &Path, users_home: &Path, user: &UserId) -> Result<(), OpsError> {
    let removing = |path: &Path| {
        let what = format!("removing {}", path.display());
        move |source| OpsError::Io { what, source }
    };
    let state_dir = home_dir.join("sandboxes");
    let failed = |e: moltmate_core::sandbox::SandboxError| OpsError::Failed(e.to_string());
    moltmate_sandbox::disk::remove_volume(&state_dir, users_home, user.as_str()).map_err(failed)?;
    if users_home.exists() {
        std::fs::remove_dir_all(users_home).map_err(removing(users_home))?;
    }
    let scratch = state_dir.join("scratch").join(user.as_str());
    moltmate_sandbox::disk::remove_volume(
        &state_dir,
        &scratch,
        &moltmate_sandbox::disk::scratch_volume_name(user),
    )
    .map_err(failed)?;
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).map_err(removing(&scratch))?;
    }
    Ok(())
}
