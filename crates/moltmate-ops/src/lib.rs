//! Operator actions shared by the `moltmate` CLI and the `/admin` page, so both do exactly the
//! same thing:
//!
//! * [`users`] — resetting and removing a user (archive, wipe, database), exporting one.
//! * [`backup`] — `moltmate backup` / `moltmate restore`: an online, consistent, checksummed
//!   archive of a home, and a restore that verifies everything before it writes anything.
//! * [`usage`] — messages, tokens, estimated cost, tool calls and `exec` time per user, family
//!   and day, as rows, CSV, JSON or a terminal table.

pub mod backup;
pub mod usage;
pub mod users;

use moltmate_core::UserId;

/// Why an operator action failed. Messages name paths and users, never file contents or
/// secrets.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("no user {0}")]
    NoSuchUser(UserId),
    #[error(transparent)]
    Store(#[from] moltmate_store::StoreError),
    #[error(transparent)]
    Home(#[from] moltmate_store::HomeError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// The archive is damaged, not a moltmate backup, or holds something a restore must not
    /// write; nothing was written.
    #[error("refusing the archive: {0}")]
    BadArchive(String),
    /// The operator's input is not valid (an identity, a date).
    #[error("{0}")]
    Invalid(String),
    /// The restore target is not an empty directory.
    #[error("{0}")]
    TargetNotEmpty(String),
    #[error("{0}")]
    Failed(String),
}

impl OpsError {
    /// True when the operator asked for something that does not exist or cannot be done as
    /// asked (a missing user, a bad archive, a non-empty target), false for failures of the
    /// machine (I/O, database).
    pub fn is_refusal(&self) -> bool {
        match self {
            OpsError::NoSuchUser(_)
            | OpsError::Invalid(_)
            | OpsError::BadArchive(_)
            | OpsError::TargetNotEmpty(_) => true,
            OpsError::Store(_) | OpsError::Home(_) | OpsError::Io { .. } | OpsError::Failed(_) => {
                false
            }
        }
    }
}
