//! The tool contract.
//!
//! Invariant: a tool call carries its user's identity ([`ToolContext::user`]) and that user's
//! home ([`UserHome`]), derived from the id and nothing else. No tool looks a user's files up by
//! a path that came from outside the context.

use crate::model::ToolSpec;
use crate::sandbox::{ExecCommand, ExecRequest, ExecSettings, SandboxIds, SandboxProfile};
use crate::UserId;
use async_trait::async_trait;
use std::path::{Path, PathBuf};

/// A user's home directory, `<MOLTMATE_HOME>/users/<user_id>/`.
///
/// Constructed only from a [`UserId`], whose alphabet cannot express a path separator or `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserHome {
    user: UserId,
    root: PathBuf,
}

impl UserHome {
    /// `users_dir` is `<MOLTMATE_HOME>/users`.
    pub fn new(users_dir: &Path, user: &UserId) -> Self {
        UserHome {
            user: user.clone(),
            root: users_dir.join(user.as_str()),
        }
    }

    pub fn user(&self) -> &UserId {
        &self.user
    }

    /// The directory itself. Open files beneath it only with beneath-resolution.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// A shared family folder a user can see (issue: families).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyFolder {
    pub name: String,
    pub root: PathBuf,
    /// The folder's group (members get it as a supplementary group in their sandbox); `None`
    /// when the gateway cannot switch uids and everything runs as itself.
    pub gid: Option<u32>,
}

/// Everything a tool may know about the call it serves.
#[derive(Debug, Clone)]
pub struct ToolContext {
    pub user: UserId,
    pub home: UserHome,
    /// The session the call belongs to (sandbox scope `session` keys on it).
    pub session_id: String,
    /// The family folder the user belongs to, if any; visible as `family/...`.
    pub family: Option<FamilyFolder>,
    /// When true, file tools refuse to write (trust level `restricted`, `workspaceAccess: ro`).
    pub read_only: bool,
    /// The sandbox this user's code runs with.
    pub sandbox: SandboxProfile,
    /// The host identity this user's sandboxed commands run as, which owns their home.
    pub sandbox_ids: SandboxIds,
    /// How `exec` command lines are vetted for this user.
    pub exec: ExecSettings,
    /// Where files go back to the user (`send_file`): the channel and chat the current message
    /// came from. `None` where the channel cannot take files (or outside a user's turn).
    pub outlet: Option<FileOutlet>,
}

/// Where `send_file` puts a file for the user whose message is being answered.
#[derive(Clone)]
pub enum FileOutlet {
    /// Pushed through the channel the message came from (Telegram, WhatsApp, ...), to the chat
    /// it came from.
    Channel {
        channel: std::sync::Arc<dyn crate::channel::Channel>,
        chat_id: String,
    },
    /// Kept for download by the user (web chat, OpenAI-compatible API): the area stores a copy
    /// and returns a link only that user can open; `notify` is the waiting caller's live
    /// stream, told about the link so it can show it whatever the model writes.
    Download {
        area: std::sync::Arc<dyn crate::channel::DownloadArea>,
        notify: std::sync::Arc<dyn crate::model::DeltaSink>,
    },
}

impl std::fmt::Debug for FileOutlet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileOutlet::Channel { channel, chat_id } => f
                .debug_struct("FileOutlet::Channel")
                .field("channel", &channel.kind())
                .field("chat_id", chat_id)
                .finish(),
            FileOutlet::Download { .. } => f.debug_struct("FileOutlet::Download").finish(),
        }
    }
}

impl ToolContext {
    /// The sandbox request for `command` on behalf of this context's user: their home, family
    /// folder, session and profile, nothing taken from the model but the command. One place
    /// builds it, so `exec` and prewarming address the same sandbox.
    pub fn exec_request(&self, command: ExecCommand, timeout: std::time::Duration) -> ExecRequest {
        ExecRequest {
            user: self.user.clone(),
            home: self.home.root().to_path_buf(),
            family: self.family.as_ref().map(|f| f.root.clone()),
            ids: self.sandbox_ids,
            family_gid: self.family.as_ref().and_then(|f| f.gid),
            session_id: self.session_id.clone(),
            command,
            timeout,
            profile: self.sandbox.clone(),
        }
    }
}

/// What a tool returns to the model on success.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutput {
    pub content: String,
    /// How long a command ran in the sandbox, as the backend reported it (`exec`); charged to
    /// the user's `exec` time budget.
    pub sandbox_time: Option<std::time::Duration>,
}

impl ToolOutput {
    pub fn text(content: impl Into<String>) -> Self {
        ToolOutput {
            content: content.into(),
            sandbox_time: None,
        }
    }

    /// The same output, with the sandbox time it took.
    pub fn with_sandbox_time(mut self, ran: std::time::Duration) -> Self {
        self.sandbox_time = Some(ran);
        self
    }
}

/// Why a tool call did not succeed.
///
/// All variants but [`ToolError::Fatal`] are answers *to the model*: the agent loop sends the
/// message back as an error tool result and the model may try something else. `Fatal` means
/// the gateway itself is broken (database gone); the turn is aborted and the user told so.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ToolError {
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("failed: {0}")]
    Failed(String),
    #[error("internal error: {0}")]
    Fatal(String),
}

impl ToolError {
    pub fn is_fatal(&self) -> bool {
        match self {
            ToolError::Fatal(_) => true,
            ToolError::InvalidArguments(_) | ToolError::Refused(_) | ToolError::Failed(_) => false,
        }
    }

    /// A short machine-readable outcome for audit logs and metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            ToolError::InvalidArguments(_) => "invalid_arguments",
            ToolError::Refused(_) => "refused",
            ToolError::Failed(_) => "failed",
            ToolError::Fatal(_) => "fatal",
        }
    }
}

/// A tool the model can call.
#[async_trait]
pub trait Tool: Send + Sync {
    /// Name and schema as offered to the model. The name is the config name (`read`, `exec`...).
    fn spec(&self) -> ToolSpec;
    async fn call(
        &self,
        context: &ToolContext,
        arguments: serde_json::Value,
    ) -> Result<ToolOutput, ToolError>;
}
