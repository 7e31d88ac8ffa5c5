//! `exec {command, timeout_seconds?}`: a command line, vetted by the exec policy, run in the
//! user's sandbox.
//!
//! Without a sandbox the tool refuses: it never falls back to running on the host. The request
//! sent to the backend is built from the [`ToolContext`] alone (user, home, family, session,
//! profile), so nothing in the model's arguments can choose whose sandbox runs the command.

use crate::args;
use async_trait::async_trait;
use moltmate_core::model::ToolSpec;
use moltmate_core::sandbox::{ExecOutput, Sandbox, SandboxError};
use moltmate_core::tool::{Tool, ToolContext, ToolError, ToolOutput};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Used when the settings carry no default timeout (a zero duration).
const FALLBACK_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest `timeout_seconds` accepted as an argument at all (the policy cap usually is lower).
const MAX_TIMEOUT_ARGUMENT: u64 = 24 * 60 * 60;

/// The message for a gateway without a sandbox backend.
pub const NO_SANDBOX_MESSAGE: &str = "exec is unavailable: no sandbox is available on this server, and commands never run on the host. The operator must install Docker, or bubblewrap (`apt-get install bubblewrap`), and restart moltmate.";

/// `exec`: runs vetted commands through a [`Sandbox`].
#[derive(Clone)]
pub struct ExecTool {
    sandbox: Option<Arc<dyn Sandbox>>,
}

impl std::fmt::Debug for ExecTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecTool")
            .field("sandbox", &self.sandbox.as_ref().map(|s| s.backend()))
            .finish()
    }
}

impl ExecTool {
    /// `None`: every call is refused with [`NO_SANDBOX_MESSAGE`].
    pub fn new(sandbox: Option<Arc<dyn Sandbox>>) -> Self {
        ExecTool { sandbox }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecArgs {
    command: String,
    timeout_seconds: Option<u64>,
}

#[async_trait]
impl Tool for ExecTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "exec".into(),
            description: "Run a command line in your isolated sandbox (Linux). The working directory is /workspace, which holds your files; the family folder, if any, is at /family. Returns the exit code, duration, stdout and stderr. Depending on the server's policy only some programs are allowed, and shell features may be refused; the error says what is allowed.".into(),
            parameters: std::sync::Arc::new(json!({
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "The command line, e.g. `ls -la` or `grep -n TODO notes.md`."},
                    "timeout_seconds": {"type": "integer", "minimum": 1, "description": "Kill the command after this many seconds. Default and maximum are set by the server."}
                },
                "required": ["command"],
                "additionalProperties": false
            })),
        }
    }

    async fn call(&self, ctx: &ToolContext, arguments: Value) -> Result<ToolOutput, ToolError> {
        let args: ExecArgs = args::parse("exec", arguments)?;
        let (timeout, capped) = effective_timeout(ctx, args.timeout_seconds)?;
        let Some(sandbox) = &self.sandbox else {
            return Err(ToolError::Refused(NO_SANDBOX_MESSAGE.into()));
        };
        let command = moltmate_sandbox::policy::vet_command(&args.command, &ctx.exec)
            .map_err(|refusal| ToolError::Refused(format!("command refused: {refusal}")))?;
        let request = ctx.exec_request(command, timeout);
        let output = sandbox.exec(request).await.map_err(sandbox_error)?;
        Ok(ToolOutput::text(render(&output, timeout, capped)).with_sandbox_time(output.duration))
    }
}

/// The timeout to run with, and whether the model's request was lowered to the cap.
fn effective_timeout(
    ctx: &ToolContext,
    requested: Option<u64>,
) -> Result<(Duration, bool), ToolError> {
    let default = if ctx.exec.default_timeout.is_zero() {
        FALLBACK_TIMEOUT
    } else {
        ctx.exec.default_timeout
    };
    let max = if ctx.exec.max_timeout.is_zero() {
        default.max(FALLBACK_TIMEOUT)
    } else {
        ctx.exec.max_timeout
    };
    match requested {
        None => Ok((default.min(max), false)),
        Some(0) => Err(ToolError::InvalidArguments(
            "timeout_seconds must be at least 1".into(),
        )),
        Some(s) if s > MAX_TIMEOUT_ARGUMENT => Err(ToolError::InvalidArguments(format!(
            "timeout_seconds {s} is too large; the maximum here is {} seconds",
            max.as_secs()
        ))),
        Some(s) => {
            let wanted = Duration::from_secs(s);
            Ok(if wanted > max {
                (max, true)
            } else {
                (wanted, false)
            })
        }
    }
}

fn sandbox_error(e: SandboxError) -> ToolError {
    match e {
        SandboxError::Unavailable(detail) => ToolError::Refused(format!(
            "exec is unavailable: no sandbox is available ({detail}); commands never run on the host"
        )),
        SandboxError::Busy(why) => ToolError::Failed(format!(
            "the command did not run: {why}. Tell the user the server is busy and to try again in a minute."
        )),
        e @ (SandboxError::Backend { .. } | SandboxError::Interrupted { .. }) => {
            if e.is_retryable() {
                ToolError::Failed(format!("{e}; the command may not have run, you can try again"))
            } else {
                ToolError::Failed(e.to_string())
            }
        }
    }
}

fn render(output: &ExecOutput, timeout: Duration, capped: bool) -> String {
    let mut text = String::new();
    match output.exit_code {
        Some(code) => text.push_str(&format!("exit code: {code}\n")),
        None if output.timed_out => text.push_str("exit code: none (killed by the timeout)\n"),
        None => text.push_str("exit code: none (killed by a signal)\n"),
    }
    text.push_str(&format!(
        "duration: {:.2}s\n",
        output.duration.as_secs_f64()
    ));
    if output.timed_out {
        text.push_str(&format!(
            "note: the command was killed after the {}s timeout; output may be incomplete\n",
            timeout.as_secs()
        ));
    }
    if capped {
        text.push_str(&format!(
            "note: timeout_seconds was lowered to the server's maximum of {}s\n",
            timeout.as_secs()
        ));
    }
    if output.truncated {
        text.push_str("note: output was too long and has been truncated; redirect it to a file and read parts of it\n");
    }
    text.push_str("stdout:\n");
    text.push_str(if output.stdout.is_empty() {
        "(empty)"
    } else {
        &output.stdout
    });
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str("stderr:\n");
    text.push_str(if output.stderr.is_empty() {
        "(empty)"
    } else {
        &output.stderr
    });
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}
