//! The Docker backend's warm path: one long-lived command runner per container.
//!
//! An Engine API exec costs three requests (create, attached start, inspect) and a `runc exec`
//! per command: ~65 ms on a 2-core host, over the 50 ms target. Instead, the first command of a
//! container starts `python3 -I -c <docker_exec_agent.py>` as the sandbox user with stdin
//! attached, and every later command is one JSON line to it and one back over that open stream.
//!
//! # Trust
//! The agent runs inside the user's sandbox, as the user's uid, so a hostile command can kill or
//! stop it. It makes itself non-dumpable, so a command cannot reach its file descriptors, memory
//! or `oom_score_adj` through `/proc` to forge replies or inject requests; each reply must echo
//! its request's random id, and output from an idle agent counts as a dead agent. All of this
//! stays inside the user's own boundary anyway: an agent only ever carries that user's commands
//! in that user's container, and its replies are parsed as untrusted input (a bounded line, a
//! strict shape). The script comes from the gateway in the exec's argv, never from the
//! sandbox's filesystem. When the agent is gone or misbehaves the gateway drops it and reaps the
//! container with a separate exec; the next command starts a fresh agent. A container whose
//! image has no `python3` (the exec exits 126/127) falls back to one Engine API exec per
//! command; other start failures fall back for that one command only.

use base64::Engine as _;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::Docker;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use std::pin::Pin;
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// The runner, passed to `python3 -c`.
const SCRIPT: &str = include_str!("docker_exec_agent.py");
/// How long a fresh agent may take to say it is ready (python start + initial reap).
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra time for a reply beyond the command's own timeout (the kill and reap after it).
const REPLY_GRACE: Duration = Duration::from_secs(15);

/// Why talking to the agent failed.
#[derive(Debug)]
pub(crate) enum AgentError {
    /// The image cannot run the agent (no `python3`): use per-command execs for this container.
    Unsupported(String),
    /// Starting the agent failed this time (slow start, engine hiccup, unclean start-up):
    /// fall back for this command and try again next time. A stray agent may be left running;
    /// the caller reaps the container.
    StartFailed(String),
    /// The engine said the container is gone or stopped.
    ContainerGone,
    /// The agent died, hung or answered nonsense mid-command. The command may have run.
    Broken(String),
}

/// What the agent reports for one command.
#[derive(Debug)]
pub(crate) struct AgentOutput {
    pub exit_code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub truncated: bool,
    pub timed_out: bool,
    /// Whether every process the command left behind was killed.
    pub clean: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ready {
    ready: bool,
    clean: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Reply {
    Done {
        id: Option<String>,
        exit: Option<i32>,
        stdout: String,
        stderr: String,
        truncated: bool,
        timed_out: bool,
        clean: bool,
    },
    Failed {
        id: Option<String>,
        error: String,
        clean: bool,
    },
}

type OutputStream = Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;

/// A started agent: the write half of its stdin and the multiplexed output of its exec.
pub(crate) struct ExecAgent {
    input: Pin<Box<dyn AsyncWrite + Send>>,
    output: OutputStream,
    /// Bytes of stdout read past the last complete line.
    pending: Vec<u8>,
}

impl std::fmt::Debug for ExecAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecAgent").finish_non_exhaustive()
    }
}

fn is_gone(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404 | 409,
            ..
        }
    )
}

impl ExecAgent {
    /// Starts the agent in container `id` as `user` and waits for its ready line.
    pub(crate) async fn start(docker: &Docker, id: &str, user: &str) -> Result<Self, AgentError> {
        let options = CreateExecOptions {
            cmd: Some(vec![
                "python3".to_string(),
                "-I".to_string(),
                "-c".to_string(),
                SCRIPT.to_string(),
            ]),
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            user: Some(user.to_string()),
            working_dir: Some("/workspace".to_string()),
            ..Default::default()
        };
        let exec = docker.create_exec(id, options).await.map_err(|e| {
            if is_gone(&e) {
                AgentError::ContainerGone
            } else {
                AgentError::StartFailed(format!("creating the exec agent: {e}"))
            }
        })?;
        let started = docker.start_exec(&exec.id, None).await.map_err(|e| {
            if is_gone(&e) {
                AgentError::ContainerGone
            } else {
                AgentError::StartFailed(format!("starting the exec agent: {e}"))
            }
        })?;
        let StartExecResults::Attached { output, input } = started else {
            return Err(AgentError::StartFailed(
                "exec agent started detached".to_string(),
            ));
        };
        let mut agent = ExecAgent {
            input,
            output,
            pending: Vec::new(),
        };
        let line = match tokio::time::timeout(READY_TIMEOUT, agent.read_line(4096)).await {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => {
                // The agent ended before it was ready. 126/127 from the shell-less exec mean
                // the image has no (runnable) python3; anything else may pass.
                let exit = docker
                    .inspect_exec(&exec.id)
                    .await
                    .ok()
                    .and_then(|i| i.exit_code);
                return Err(match exit {
                    Some(126 | 127) => {
                        AgentError::Unsupported(format!("python3 is not runnable here ({e})"))
                    }
                    _ => AgentError::StartFailed(e),
                });
            }
            Err(_) => {
                return Err(AgentError::StartFailed(
                    "the exec agent did not start in time".to_string(),
                ))
            }
        };
        match serde_json::from_slice::<Ready>(&line) {
            Ok(Ready {
                ready: true,
                clean: true,
            }) => Ok(agent),
            Ok(Ready { clean: false, .. }) => Err(AgentError::StartFailed(
                "processes of an earlier command survived the exec agent's start".to_string(),
            )),
            _ => Err(AgentError::StartFailed(
                "the exec agent answered something other than ready".to_string(),
            )),
        }
    }

    /// Whether the runner still looks alive between commands: its output stream has not ended.
    /// Checked without waiting, so a runner that died while idle (killed from outside the
    /// gateway, say) is replaced before a command is sent to it, rather than after.
    pub(crate) fn is_alive(&mut self) -> bool {
        use futures::FutureExt;
        // Nothing pending: alive and idle. An ended stream is a dead agent, and an idle agent
        // prints nothing, so any output at all means it cannot be trusted with a command.
        self.pending.is_empty() && self.output.next().now_or_never().is_none()
    }

    /// Runs `argv` with `timeout` and an output cap of `cap` bytes.
    pub(crate) async fn run(
        &mut self,
        argv: &[String],
        timeout: Duration,
        cap: u64,
    ) -> Result<AgentOutput, AgentError> {
        let request_id = format!("{:016x}", rand::random::<u64>());
        let request = serde_json::json!({
            "id": request_id,
            "argv": argv,
            "timeout_ms": u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            "cap": cap,
        });
        let mut line = serde_json::to_vec(&request)
            .map_err(|e| AgentError::Broken(format!("encoding the request: {e}")))?;
        line.push(b'\n');
        let write = async {
            self.input.write_all(&line).await?;
            self.input.flush().await
        };
        tokio::time::timeout(Duration::from_secs(10), write)
            .await
            .map_err(|_| AgentError::Broken("the exec agent does not read".to_string()))?
            .map_err(|e| AgentError::Broken(format!("writing to the exec agent: {e}")))?;

        // Base64 of at most `cap` bytes of output, plus the JSON around it.
        let limit = usize::try_from(cap)
            .unwrap_or(usize::MAX)
            .saturating_mul(2)
            .saturating_add(64 * 1024);
        let reply = tokio::time::timeout(timeout + REPLY_GRACE, self.read_line(limit))
            .await
            .map_err(|_| AgentError::Broken("the exec agent did not answer".to_string()))?
            .map_err(AgentError::Broken)?;
        let reply: Reply = serde_json::from_slice(&reply)
            .map_err(|e| AgentError::Broken(format!("unreadable exec agent reply: {e}")))?;
        let echoed = match &reply {
            Reply::Done { id, .. } | Reply::Failed { id, .. } => id.as_deref(),
        };
        if echoed != Some(request_id.as_str()) {
            return Err(AgentError::Broken(
                "the exec agent answered another request".to_string(),
            ));
        }
        match reply {
            Reply::Done {
                id: _,
                exit,
                stdout,
                stderr,
                truncated,
                timed_out,
                clean,
            } => {
                let decode = |text: &str| {
                    base64::engine::general_purpose::STANDARD
                        .decode(text)
                        .map_err(|e| AgentError::Broken(format!("exec agent output: {e}")))
                };
                let stdout = decode(&stdout)?;
                let stderr = decode(&stderr)?;
                if (stdout.len() + stderr.len()) as u64 > cap {
                    return Err(AgentError::Broken(
                        "exec agent sent more output than allowed".to_string(),
                    ));
                }
                Ok(AgentOutput {
                    exit_code: exit,
                    stdout,
                    stderr,
                    truncated,
                    timed_out,
                    clean,
                })
            }
            Reply::Failed {
                id: _,
                error,
                clean,
            } => Ok(AgentOutput {
                exit_code: None,
                stdout: Vec::new(),
                stderr: format!("[moltmate: the sandbox's command runner failed: {error}]")
                    .into_bytes(),
                truncated: false,
                timed_out: false,
                clean,
            }),
        }
    }

    /// Reads one line of the agent's stdout (stderr is logged and dropped), at most `limit`
    /// bytes long.
    async fn read_line(&mut self, limit: usize) -> Result<Vec<u8>, String> {
        loop {
            if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let rest = self.pending.split_off(end + 1);
                let mut line = std::mem::replace(&mut self.pending, rest);
                line.pop();
                return Ok(line);
            }
            if self.pending.len() > limit {
                return Err("exec agent reply too long".to_string());
            }
            match self.output.next().await {
                None => return Err("the exec agent ended".to_string()),
                Some(Err(e)) => return Err(format!("reading from the exec agent: {e}")),
                Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                    self.pending.extend_from_slice(&message)
                }
                Some(Ok(LogOutput::StdErr { message })) => {
                    // Debug formatting: a sandbox's bytes never forge log lines.
                    tracing::debug!(
                        stderr = ?String::from_utf8_lossy(&message[..message.len().min(512)]),
                        "exec agent stderr"
                    );
                }
                Some(Ok(LogOutput::StdIn { .. })) => {}
            }
        }
    }
}
