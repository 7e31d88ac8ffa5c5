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
use crate::prompt::{build_system_prompt, SystemPrompt};
use crate::settings::GatewaySettings;
use moltmate_core::blocking;
use moltmate_core::tool::{FamilyFolder, UserHome};
use moltmate_core::UserId;
use moltmate_store::homes::{read_beneath, write_beneath};
use moltmate_store::{HomeError, Homes};
use std::path::PathBuf;
use std::sync::Arc;

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
) -> Result<UserHome, HomeError> {
    let home = homes.ensure(user)?;
    // A SOUL.md that is there but unreadable (a FIFO, a link) counts as present: it is
    // reported when the prompt is built, and never overwritten behind the user's back.
    let has_soul = read_beneath(home.root(), "SOUL.md", 1)
        .map(|f| f.is_some())
        .unwrap_or(true);
    if !has_soul {
        let persona = persona::built_in(&settings.default_persona).unwrap_or(persona::CAMI);
        write_beneath(home.root(), "SOUL.md", persona.soul.as_bytes())?;
        write_beneath(home.root(), "IDENTITY.md", persona.identity.as_bytes())?;
    }
    Ok(home)
}

/// The user's home, created if missing.
pub(super) async fn home(inner: &Arc<Inner>, user: &UserId) -> Result<UserHome, TurnError> {
    let inner = Arc::clone(inner);
    let user = user.clone();
    step("creating your home", move || {
        ensure_home(&inner.homes, &inner.settings, &user)
    })
    .await
}

/// The directories of one turn.
pub(super) struct TurnDirs {
    pub home: UserHome,
    pub family: Option<FamilyFolder>,
    /// What the file tools see: the home, or the scratch directory for `workspaceAccess: none`
    /// in sandbox mode "all".
    pub tool_home: UserHome,
}

/// Creates the home, the family folder and the scratch directory a turn needs.
pub(super) async fn turn_dirs(
    inner: &Arc<Inner>,
    user: &UserId,
    scratch_root: Option<PathBuf>,
) -> Result<TurnDirs, TurnError> {
    let inner = Arc::clone(inner);
    let user = user.clone();
    step("preparing your files", move || {
        let home = ensure_home(&inner.homes, &inner.settings, &user)?;
        let family = match inner.settings.families.get(&user) {
            Some(name) => Some(FamilyFolder {
                root: inner.homes.ensure_family(name)?,
                name: name.clone(),
            }),
            None => None,
        };
        let tool_home = match scratch_root {
            Some(scratch) => {
                let scratch_home = UserHome::new(&scratch, &user);
                std::fs::create_dir_all(scratch_home.root()).map_err(|source| HomeError::Io {
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
    })
    .await
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
    files: PersonaFiles,
) -> Result<(), TurnError> {
    let inner = Arc::clone(inner);
    let user = user.clone();
    step("writing your persona", move || {
        let home = ensure_home(&inner.homes, &inner.settings, &user)?;
        match files {
            PersonaFiles::Chosen(choice) => onboarding::apply_persona(&home, &choice),
            PersonaFiles::Custom(description) => onboarding::apply_custom(&home, &description),
        }
    })
    .await
}
