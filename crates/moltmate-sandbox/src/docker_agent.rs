//! The Docker backend's warm path: one long-lived command runner per container.
//!
//! An Engine API exec costs three requests (create, attached start, inspect) and a `runc exec`
//! per command: ~65 ms on a 2-core host, over the 50 ms target. Instead, the first command of a
//! container starts `python3 -c <docker_exec_agent.py>` as the sandbox user with stdin attached,
//! and every later command is one JSON line to it and one back over that open stream.
//!
//! # Trust
//! The agent runs inside the user's sandbox, as the user's uid, so a hostile command can kill or
//! even impersonate it. That stays inside the user's own boundary: it only ever carries that
//! user's commands in that user's container, and its replies are parsed as untrusted input (a
//! bounded line, a strict shape). The script itself comes from the gateway in the exec's argv,
//! never from the sandbox's filesystem. When the agent is gone or misbehaves the gateway drops
//! it and reaps the container with a separate exec; the next command starts a fresh agent.
//! A container whose image has no `python3` falls back to one Engine API exec per command.

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
    /// The agent could not be started here (no python3, exec refused): use per-command execs.
    Unsupported(String),
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
    #[allow(dead_code)]
    clean: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Reply {
    Done {
        exit: Option<i32>,
        stdout: String,
        stderr: String,
        truncated: bool,
        timed_out: bool,
        clean: bool,
    },
    Failed {
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
                AgentError::Unsupported(format!("creating the exec agent: {e}"))
            }
        })?;
        let started = docker.start_exec(&exec.id, None).await.map_err(|e| {
            if is_gone(&e) {
                AgentError::ContainerGone
            } else {
                AgentError::Unsupported(format!("starting the exec agent: {e}"))
            }
        })?;
        let StartExecResults::Attached { output, input } = started else {
            return Err(AgentError::Unsupported(
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
            // No ready line: most likely no python3 in the image (the exec exits 127).
            Ok(Err(e)) => return Err(AgentError::Unsupported(e)),
            Err(_) => {
                return Err(AgentError::Unsupported(
                    "the exec agent did not start in time".to_string(),
                ))
            }
        };
        match serde_json::from_slice::<Ready>(&line) {
            Ok(Ready { ready: true, .. }) => Ok(agent),
            _ => Err(AgentError::Unsupported(
                "the exec agent answered something other than ready".to_string(),
            )),
        }
    }

    /// Whether the runner still looks alive between commands: its output stream has not ended.
    /// Checked without waiting, so a runner that died while idle (killed from outside the
    /// gateway, say) is replaced before a command is sent to it, rather than after.
    pub(crate) fn is_alive(&mut self) -> bool {
        use futures::FutureExt;
        loop {
            match self.output.next().now_or_never() {
                // Nothing pending: alive and idle.
                None => return true,
                Some(None) | Some(Some(Err(_))) => return false,
                Some(Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message }))) => {
                    // An idle runner prints nothing; keep it for the line reader anyway.
                    self.pending.extend_from_slice(&message);
                    if self.pending.len() > 64 * 1024 {
                        return false;
                    }
                }
                Some(Some(Ok(_))) => {}
            }
        }
    }

    /// Runs `argv` with `timeout` and an output cap of `cap` bytes.
    pub(crate) async fn run(
        &mut self,
        argv: &[String],
        timeout: Duration,
        cap: u64,
    ) -> Result<AgentOutput, AgentError> {
        let request = serde_json::json!({
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
        match reply {
            Reply::Done {
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
            Reply::Failed { error, clean } => Ok(AgentOutput {
                exit_code: Some(126),
                stdout: Vec::new(),
                stderr: format!("could not run the command: {error}").into_bytes(),
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
                    tracing::debug!(
                        stderr = %String::from_utf8_lossy(&message[..message.len().min(512)]),
                        "exec agent stderr"
                    );
                }
                Some(Ok(LogOutput::StdIn { .. })) => {}
            }
        }
    }
}
