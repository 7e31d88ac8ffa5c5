//! The part of `moltmate users remove` / `users reset` that comes after the database: stopping
//! what the user had running, wiping their files, and telling a running gateway it is done.
//!
//! The command runs as its own process, maybe next to a running `moltmate serve` (or
//! `moltmate chat`) on the same home. The order, after the home was copied into the archive:
//!
//! 1. [`moltmate_store::Store::end_user`]: one transaction deletes sessions, transcripts,
//!    waiting messages, credentials, pairing codes (and for `remove` the user, identities and
//!    budget counters), retires the sandbox uid and appends a `user_events` row. From here on
//!    no credential of the user works and no turn of theirs can commit.
//! 2. [`finish`]: a running gateway sees the event within ~500 ms, aborts the user's worker
//!    and running turn and ends their sandboxes; this process waits (bounded by
//!    [`LOCK_WAIT`]) for the user's lock, which a worker holds during a turn, so the home is
//!    not wiped under a turn still writing to it. Then it removes the user's Docker containers
//!    itself (for when no gateway runs; bubblewrap commands die with their gateway), wipes the
//!    home, scratch directory, disk images and memory index, gives a reset user their new
//!    home, and appends a `settled` event: only now does a gateway start a worker for the id
//!    again, so nothing of the new life ever runs on the old files.

use crate::admin::{wipe_home, Admin};
use anyhow::{Context, Result};
use moltmate_core::UserId;
use moltmate_store::memory_index::MemoryIndex;
use moltmate_store::Ending;
use std::time::{Duration, Instant};

/// How long the CLI waits for a running turn of the user to be stopped. A current gateway
/// stops it within a second; what holds the lock longer is a gateway that does not act on
/// user events (an older release) or does not respond. Then the files are wiped anyway: the
/// turn can commit nothing (its records are gone), and the user's new life starts only after
/// the wipe.
pub const LOCK_WAIT: Duration = Duration::from_secs(30);
const LOCK_POLL: Duration = Duration::from_millis(50);

/// What [`finish`] did besides wiping.
#[derive(Debug, Default)]
pub struct Finished {
    /// The user's lock was busy (a turn was running) for this long before it was free.
    pub waited: Option<Duration>,
    /// The lock was still held after [`LOCK_WAIT`]; the files were wiped anyway.
    pub lock_timed_out: bool,
    /// Docker containers of the user this process removed.
    pub containers: usize,
    /// Why containers could not be looked for (Docker configured but not reachable...).
    pub docker_note: Option<String>,
}

/// Waits (bounded) until no turn of `user` runs, then stops their sandboxes, wipes their files
/// and settles the ending. Call after the user's records were ended in the store.
pub async fn finish(admin: &Admin, user: &UserId, how: Ending) -> Result<Finished> {
    let mut finished = Finished::default();
    let lock = wait_for_turn(admin, user, &mut finished).await?;
    match remove_containers(admin, user).await {
        Ok(count) => finished.containers = count,
        Err(note) => finished.docker_note = Some(note),
    }
    wipe_user_files(admin, user).context("wiping the user's files")?;
    if how == Ending::Reset {
        admin.ensure_home(user).await?;
    }
    admin
        .store
        .settle_user(user)
        .await
        .context("telling a running gateway the user is done")?;
    drop(lock);
    Ok(finished)
}

/// Takes the user's lock, waiting for a running turn to be stopped by its gateway.
async fn wait_for_turn(
    admin: &Admin,
    user: &UserId,
    finished: &mut Finished,
) -> Result<Option<moltmate_store::homes::UserLock>> {
    let started = Instant::now();
    loop {
        if let Some(lock) = admin.homes.try_lock_user(user)? {
            if finished.waited.is_some() {
                finished.waited = Some(started.elapsed());
            }
            return Ok(Some(lock));
        }
        if finished.waited.is_none() {
            eprintln!("A turn of {user} is running; waiting for the gateway to stop it...");
            finished.waited = Some(Duration::ZERO);
        }
        if started.elapsed() >= LOCK_WAIT {
            eprintln!(
                "Warning: {user}'s turn still runs after {} s (a gateway that does not act on removals, or one that hangs); wiping the files anyway. Nothing that turn does is kept.",
                LOCK_WAIT.as_secs()
            );
            finished.lock_timed_out = true;
            return Ok(None);
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
}

/// Removes the user's Docker containers of this home (label `moltmate.user`, this home's
/// instance), whether or not a gateway runs. Nothing to do when the config says bubblewrap
/// (its commands die with the gateway that ran them) or no Docker daemon answers.
async fn remove_containers(admin: &Admin, user: &UserId) -> Result<usize, String> {
    let config = crate::wiring::load_config(&admin.home).map_err(|e| {
        format!("the config could not be read, so Docker sandboxes were not looked for: {e:#}")
    })?;
    let settings = crate::wiring::sandbox_settings(&admin.home, &config);
    if settings.backend == moltmate_sandbox::BackendChoice::Bwrap
        || !moltmate_sandbox::docker::docker_available(&settings).await
    {
        return Ok(0);
    }
    let docker =
        moltmate_sandbox::docker::DockerSandbox::connect(&settings).map_err(|e| e.to_string())?;
    docker
        .remove_user(user)
        .await
        .map(|removed| removed.len())
        .map_err(|e| format!("Docker sandboxes could not be removed: {e}"))
}

/// Wipes the user's home (and its capped volume), scratch directory and memory index.
fn wipe_user_files(admin: &Admin, user: &UserId) -> Result<()> {
    // The home's files may live in an image that is not mounted (gateway stopped, reboot):
    // mounted first so the unmount and delete below cover it.
    admin.mount_home(user)?;
    let home = admin.homes.home(user);
    wipe_home(&admin.home, home.root(), user)?;
    let index = MemoryIndex::path_for(&admin.home.join("index"), user);
    for path in [
        index.clone(),
        index.with_extension("db-wal"),
        index.with_extension("db-shm"),
    ] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(())
}

/// Whether `user` has an ending that never settled (an earlier `remove` that failed half-way):
/// running the command again finishes it.
pub async fn unsettled(admin: &Admin, user: &UserId) -> Result<bool> {
    Ok(admin
        .store
        .unsettled_user_events(0)
        .await?
        .iter()
        .any(|e| &e.user == user))
}
