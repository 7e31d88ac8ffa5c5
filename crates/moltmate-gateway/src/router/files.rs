//! The filesystem steps of a turn, each off the async runtime with a deadline.
//!
//! Everything here touches a home, a family folder or the personas folder, all of which a user
//! (or their sandboxed code) may have filled with hostile things. The store's home functions
//! never block on what they find (FIFOs, sockets and devices are refused without being opened;
//! reads, listings and walks are bounded), and on top of that each step runs through
//! [`blocking::run`]: if the kernel still hangs (a stuck disk), the step is abandoned after
//! [`blocking::FILE_DEADLINE`], this user's turn fails with a clear message and everyone
//! else's turns go on.

use super::worker::TurnError;
use super::Inner;
use crate::onboarding::{self, PersonaChoice};
use crate::persona;
use crate::prompt::{build_system_prompt, SystemPrompt, SOUL_FILE};
use crate::settings::{GatewaySettings, SandboxIdPolicy, UserSettings};
use moltmate_core::blocking;
use moltmate_core::sandbox::{CappedDir, SandboxIds, WorkspaceAccess};
use moltmate_core::tool::{FamilyFolder, UserHome};
use moltmate_core::UserId;
use moltmate_store::homes::{read_beneath, write_beneath};
use moltmate_store::{HomeError, Homes};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Runs a file step with the deadline and turns both failure kinds into a [`TurnError`] the
/// worker answers the user with. A refusal (a file that is a FIFO, a link...) is explained to
/// the user with its path inside their home; any other failure gets a generic apology (its
/// detail, which may name server paths, goes to the operator's log only).
async fn step<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> Result<T, HomeError> + Send + 'static,
) -> Result<T, TurnError> {
    match blocking::run(what, blocking::FILE_DEADLINE, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(TurnError::Files {
            user_message: match refused_path(&e) {
                Some(path) => format!(
                    "Sorry — I could not answer this message: {path} in your files cannot be used ({}). \
                     Put a normal file there (or delete it) and write again.",
                    e.user_reason()
                ),
                None => "Sorry — I could not prepare your files, so I could not answer this message. \
                         Please try again later."
                    .to_string(),
            },
            detail: format!("{what}: {e}"),
        }),
        Err(e) => Err(TurnError::Files {
            user_message: e.user_message(),
            detail: e.to_string(),
        }),
    }
}

/// The path (relative to the user's home) of a refused file.
fn refused_path(e: &HomeError) -> Option<&str> {
    match e {
        HomeError::NotAFile { path, .. }
        | HomeError::Symlink { path }
        | HomeError::TooBig { path, .. }
        | HomeError::Raced { path } => Some(path),
        HomeError::Io { .. } | HomeError::BadPath(_) => None,
    }
}

/// Creates the user's home and, when it has no persona yet, writes the default persona.
/// Blocking.
pub(super) fn ensure_home(
    homes: &Homes,
    settings: &GatewaySettings,
    user: &UserId,
    ids: SandboxIds,
) -> Result<UserHome, HomeError> {
    let home = homes.ensure(user, ids)?;
    // A SOUL.md that is there but unreadable (a FIFO, a link) counts as present: it is
    // reported when the prompt is built, and never overwritten behind the user's back.
    let has_soul = read_beneath(home.root(), SOUL_FILE, 1)
        .map(|f| f.is_some())
        .unwrap_or(true);
    if !has_soul {
        give_default_persona(&home, settings)?;
    }
    Ok(home)
}

/// Writes the default persona's `SOUL.md` and `IDENTITY.md` into a home that has no
/// `SOUL.md` at all.
fn give_default_persona(home: &UserHome, settings: &GatewaySettings) -> Result<(), HomeError> {
    let persona = persona::built_in(&settings.default_persona).unwrap_or(persona::CAMI);
    write_beneath(home.root(), SOUL_FILE, persona.soul.as_bytes())?;
    write_beneath(home.root(), "IDENTITY.md", persona.identity.as_bytes())
}

/// The user's home (owned by `ids`), created if missing.
pub(super) async fn home(
    inner: &Arc<Inner>,
    user: &UserId,
    ids: SandboxIds,
) -> Result<UserHome, TurnError> {
    let inner = Arc::clone(inner);
    let user = user.clone();
    step("creating your home", move || {
        ensure_home(&inner.homes, &inner.settings, &user, ids)
    })
    .await
}

/// How long putting a directory on its capped volume may take. The first time moves the
/// directory's files onto the new volume, which for a large home takes longer than a file
/// step; past this the turn fails for this user only (the move goes on in the background and
/// the next turn waits for it under the volume's lock).
const CAP_DEADLINE: Duration = Duration::from_secs(120);

/// Puts the directory the user's file tools write to (their home, or their scratch dir for
/// `workspaceAccess: none`) on its capped volume, before the turn writes anything. Runs in
/// the user's own worker, under their lock, before the turn: the first call may move files
/// onto the volume, which must not overlap with writes there. `false` when the cap should
/// apply but could not be set up: the turn then runs with read-only files (fail closed), and
/// `exec` refuses too (the backend sets the cap up itself first).
pub(super) async fn cap_user_dir(
    inner: &Inner,
    user: &UserId,
    ids: SandboxIds,
    settings: &UserSettings,
) -> bool {
    let Some(caps) = inner.disk_caps.clone() else {
        return true;
    };
    let cap_bytes = settings.sandbox.limits.disk_bytes;
    let (dir, kind) = match (
        &inner.settings.sandbox_scratch_dir,
        settings.sandbox.workspace_access,
    ) {
        (Some(scratch), WorkspaceAccess::None) => (
            UserHome::new(scratch, user).root().to_path_buf(),
            CappedDir::Scratch,
        ),
        _ => (inner.homes.home(user).root().to_path_buf(), CappedDir::Home),
    };
    let owner = user.clone();
    let capped = blocking::run("capping your disk space", CAP_DEADLINE, move || {
        caps.ensure_capped(&owner, &dir, kind, ids, cap_bytes)
            .map_err(|e| e.to_string())
    })
    .await;
    match capped {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::error!(user = %user, error = %e, "the disk cap could not be set up; this turn's files are read-only");
            false
        }
        Err(e) => {
            tracing::error!(user = %user, error = %e, "the disk cap could not be set up in time; this turn's files are read-only");
            false
        }
    }
}

/// A root gateway hands the user's scratch directory (what their file tools see with
/// `workspaceAccess: none`) to their sandbox ids, private, like a home. Blocking.
fn hand_scratch_to(dir: &std::path::Path, ids: SandboxIds) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    if (meta.uid(), meta.gid()) != (ids.uid, ids.gid) {
        std::os::unix::fs::lchown(dir, Some(ids.uid), Some(ids.gid))?;
    }
    if meta.mode() & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// The family folder `name` as a member's tools see it: its owner ids and, with per-user ids,
/// the family's own gid (members get it as a supplementary group).
pub(super) async fn family_ids(
    inner: &Inner,
    name: &str,
) -> Result<(SandboxIds, Option<u32>), TurnError> {
    Ok(match inner.settings.sandbox_ids {
        SandboxIdPolicy::PerUser(range) => {
            let gid = inner.store.family_sandbox_gid(name, range).await?;
            (SandboxIds::same(gid), Some(gid))
        }
        SandboxIdPolicy::Shared(ids) => (ids, None),
    })
}

/// The directories of one turn.
pub(super) struct TurnDirs {
    pub home: UserHome,
    pub family: Option<FamilyFolder>,
    /// What the file tools see: the home, or the scratch directory for `workspaceAccess: none`
    /// in sandbox mode "all".
    pub tool_home: UserHome,
}

/// Creates the home, the family folder and the scratch directory a turn needs, and builds the
/// system prompt from the user's files (and their family's notes): one step, so a turn hands
/// work to the blocking pool once for both.
pub(super) async fn turn_files(
    inner: &Arc<Inner>,
    user: &UserId,
    ids: SandboxIds,
    scratch_root: Option<PathBuf>,
    summary: Option<String>,
) -> Result<(TurnDirs, SystemPrompt), TurnError> {
    let family_ids = match inner.settings.families.get(user) {
        Some(name) => Some((name.clone(), family_ids(inner, name).await?)),
        None => None,
    };
    let inner = Arc::clone(inner);
    let user = user.clone();
    let today = chrono::Local::now().date_naive();
    step("preparing your files", move || {
        let dirs = prepare_dirs(&inner, &user, ids, scratch_root, family_ids)?;
        let build = || {
            build_system_prompt(
                &dirs.home,
                today,
                inner.settings.prompt_file_max_bytes,
                summary.as_deref(),
                dirs.family.as_ref().map(|f| f.root.as_path()),
            )
        };
        // The prompt's own read of SOUL.md tells whether the home has one (a separate check
        // first cost a second open and read of it on every turn); without one, the default
        // persona is written and the prompt built again, as `ensure_home` would have.
        let mut prompt = build();
        if !prompt.has_soul {
            give_default_persona(&dirs.home, &inner.settings)?;
            prompt = build();
        }
        Ok((dirs, prompt))
    })
    .await
}

/// The directories of [`turn_files`]. Blocking.
fn prepare_dirs(
    inner: &Inner,
    user: &UserId,
    ids: SandboxIds,
    scratch_root: Option<PathBuf>,
    family_ids: Option<(String, (SandboxIds, Option<u32>))>,
) -> Result<TurnDirs, HomeError> {
    // SOUL.md is checked by the caller's prompt build (`turn_files`).
    let home = inner.homes.ensure(user, ids)?;
    let family = match family_ids {
        Some((name, (owner, gid))) => Some(FamilyFolder {
            root: inner.homes.ensure_family(&name, owner)?,
            name,
            gid,
        }),
        None => None,
    };
    let tool_home = match scratch_root {
        Some(scratch) => {
            let scratch_home = UserHome::new(&scratch, user);
            std::fs::create_dir_all(scratch_home.root())
                .and_then(|()| hand_scratch_to(scratch_home.root(), ids))
                .map_err(|source| HomeError::Io {
                    path: scratch_home.root().display().to_string(),
                    source,
                })?;
            scratch_home
        }
        None => home.clone(),
    };
    Ok(TurnDirs {
        home,
        family,
        tool_home,
    })
}

/// Builds the system prompt from the user's files (and their family's notes).
pub(super) async fn system_prompt(
    inner: &Arc<Inner>,
    home: &UserHome,
    family: Option<&FamilyFolder>,
    summary: Option<String>,
) -> Result<SystemPrompt, TurnError> {
    let home = home.clone();
    let family_root = family.map(|f| f.root.clone());
    let max = inner.settings.prompt_file_max_bytes;
    let today = chrono::Local::now().date_naive();
    step("reading your files", move || {
        Ok(build_system_prompt(
            &home,
            today,
            max,
            summary.as_deref(),
            family_root.as_deref(),
        ))
    })
    .await
}

/// The personas a user can choose from (built-ins and the operator's folder).
pub(super) async fn personas(inner: &Arc<Inner>) -> Result<Vec<PersonaChoice>, TurnError> {
    let dir = inner.settings.personas_dir.clone();
    step("listing personas", move || {
        Ok(onboarding::available_personas(dir.as_deref()))
    })
    .await
}

/// What onboarding writes into a home.
pub(super) enum PersonaFiles {
    Chosen(Box<PersonaChoice>),
    Custom(String),
}

/// Writes the chosen or described persona into the user's home.
pub(super) async fn apply_persona(
    inner: &Arc<Inner>,
    user: &UserId,
    ids: SandboxIds,
    files: PersonaFiles,
) -> Result<(), TurnError> {
    let inner = Arc::clone(inner);
    let user = user.clone();
    step("writing your persona", move || {
        let home = ensure_home(&inner.homes, &inner.settings, &user, ids)?;
        match files {
            PersonaFiles::Chosen(choice) => onboarding::apply_persona(&home, &choice),
            PersonaFiles::Custom(description) => onboarding::apply_custom(&home, &description),
        }
    })
    .await
}
