//! Running signal-cli ourselves: finding the program (and Java, which the JVM build needs),
//! its data directory (0700), and a supervisor that restarts the daemon with backoff.

use crate::retry::{sleep_or_shutdown, Backoff};
use moltmate_core::channel_status::{ChannelHealth, ErrorClass};
use moltmate_core::Shutdown;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;

/// How long signal-cli outlives a shutdown signal (the gateway's turns get 10 s).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(12);

/// The socket the supervised daemon listens on, inside its data directory.
pub const SOCKET_NAME: &str = "jsonrpc.sock";

/// What is missing to run signal-cli. The messages are the operator's hint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalCliMissing {
    #[error("signal-cli was not found (channels.signal.cliPath is {0:?}): install it from https://github.com/AsamK/signal-cli/releases (the JVM build needs Java 21+, the native build nothing), or set channels.signal.cliPath, or point channels.signal.daemon at a running daemon")]
    Program(String),
    #[error("signal-cli at {0} is the JVM build and needs Java 21 or newer, but no `java` was found in PATH or JAVA_HOME: install a JRE (Debian: apt install openjdk-21-jre-headless) or use signal-cli's native build")]
    Java(String),
}

/// Finds `cli_path` (a path, or a name looked up in `PATH`) and, for the JVM build (a shell
/// script), a `java`. The native build is an ELF binary and needs nothing else.
pub fn check_signal_cli(cli_path: &str) -> Result<PathBuf, SignalCliMissing> {
    let program =
        find_program(cli_path).ok_or_else(|| SignalCliMissing::Program(cli_path.to_string()))?;
    if !is_elf(&program) && find_java().is_none() {
        return Err(SignalCliMissing::Java(program.display().to_string()));
    }
    Ok(program)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let path = PathBuf::from(name);
        return is_executable(&path).then_some(path);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn find_java() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("JAVA_HOME") {
        let java = PathBuf::from(home).join("bin/java");
        if is_executable(&java) {
            return Some(java);
        }
    }
    find_program("java")
}

fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// Creates signal-cli's data directory (0700, also tightened if it exists).
pub fn prepare_data_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The command line of the supervised daemon: multi-account mode (so `startLink` works),
/// a Unix socket in the data directory, and **manual receive**: signal-cli fetches (and
/// acknowledges to the Signal server) only while we are subscribed, so messages sent while the
/// gateway is down stay on the server instead of being fetched and dropped.
pub fn daemon_command(program: &Path, data_dir: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(program);
    command
        .arg("--config")
        .arg(data_dir)
        .arg("daemon")
        .arg("--socket")
        .arg(data_dir.join(SOCKET_NAME))
        .arg("--receive-mode=manual")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // A clean environment: none of the gateway's keys (provider keys, bot tokens) reach it.
    command.env_clear();
    for key in [
        "PATH",
        "HOME",
        "JAVA_HOME",
        "JAVA_OPTS",
        "LANG",
        "TMPDIR",
        "TZ",
    ] {
        if let Some(value) = std::env::var_os(key) {
            command.env(key, value);
        }
    }
    command
}

/// Starts the daemon once (removing a stale socket first).
pub fn spawn_daemon(program: &Path, data_dir: &Path) -> std::io::Result<tokio::process::Child> {
    prepare_data_dir(data_dir)?;
    let socket = data_dir.join(SOCKET_NAME);
    if std::fs::symlink_metadata(&socket).is_ok_and(|m| !m.is_dir()) {
        let _ = std::fs::remove_file(&socket);
    }
    let mut child = daemon_command(program, data_dir).spawn()?;
    if let Some(stderr) = child.stderr.take() {
        // signal-cli's own log, at debug level, line length bounded.
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let line: String = line.chars().filter(|c| !c.is_control()).take(500).collect();
                tracing::debug!(target: "signal_cli", "{line}");
            }
        });
    }
    Ok(child)
}

/// Keeps signal-cli running until shutdown: restarts it with backoff when it exits (the
/// backoff resets after a minute of running).
pub(crate) async fn supervise(
    program: PathBuf,
    data_dir: PathBuf,
    health: std::sync::Arc<ChannelHealth>,
    shutdown: Shutdown,
) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        let started = Instant::now();
        match spawn_daemon(&program, &data_dir) {
            Ok(mut child) => {
                tracing::info!(
                    pid = child.id().unwrap_or(0),
                    "signal: signal-cli daemon started"
                );
                let status = tokio::select! {
                    _ = shutdown.cancelled() => {
                        // Replies of turns finishing in the gateway's shutdown grace still go
                        // out through it; then it is stopped (or killed when the process ends).
                        let _ = tokio::time::timeout(SHUTDOWN_GRACE, child.wait()).await;
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                        return;
                    }
                    status = child.wait() => status,
                };
                health.set_connected(false);
                health.error(ErrorClass::Unreachable);
                match status {
                    Ok(status) => {
                        tracing::warn!(%status, "signal: signal-cli exited; restarting it")
                    }
                    Err(e) => tracing::warn!(error = %e, "signal: lost signal-cli; restarting it"),
                }
            }
            Err(e) => {
                health.error(ErrorClass::Missing);
                tracing::error!(error = %e, program = %program.display(), "signal: could not start signal-cli");
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff.reset();
        }
        if !sleep_or_shutdown(backoff.next_delay(), &shutdown).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_gets_a_hint() {
        let e = check_signal_cli("/nonexistent/signal-cli").unwrap_err();
        assert!(matches!(e, SignalCliMissing::Program(_)));
        assert!(e.to_string().contains("install it"), "{e}");
    }

    #[test]
    fn the_daemon_runs_in_manual_receive_mode_without_our_environment() {
        std::env::set_var("MOLTMATE_TEST_SECRET_FOR_SIGNAL", "x");
        let command = daemon_command(
            Path::new("/usr/bin/signal-cli"),
            Path::new("/home/m/signal"),
        );
        let command = command.as_std();
        let args: Vec<_> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(
            args.contains(&"--receive-mode=manual".to_string()),
            "{args:?}"
        );
        assert!(!args.iter().any(|a| a == "-a"), "multi-account mode");
        assert!(!command
            .get_envs()
            .any(|(k, _)| k == "MOLTMATE_TEST_SECRET_FOR_SIGNAL"));
    }
}
