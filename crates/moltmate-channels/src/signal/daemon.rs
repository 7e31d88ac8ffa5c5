//! Running signal-cli ourselves: finding the program (and Java, which the JVM build needs),
//! its data directory (0700), and a supervisor that restarts the daemon with backoff.

use crate::retry::{sleep_or_shutdown, Backoff};
use futures::StreamExt;
use moltmate_core::channel_status::{ChannelHealth, ErrorClass};
use moltmate_core::Shutdown;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, Decoder, FramedRead};

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

/// Creates signal-cli's data directory (0700), or checks the one that exists: it must be a
/// directory of its own — not a symlink, not `/`, owned by the gateway's user, no sticky bit,
/// no access for group or others. An existing directory is never chmod-ed: a mistyped
/// `channels.signal.dataDir` (`/`, `/tmp`, `/etc`, someone's home) is refused instead of
/// being locked down to 0700 under the system's feet.
pub fn prepare_data_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let refuse = |why: &str| {
        std::io::Error::other(format!(
            "{} {why}; channels.signal.dataDir must be a directory of its own for signal-cli (a new path, or one owned by the gateway's user with mode 0700)",
            dir.display()
        ))
    };
    if dir.parent().is_none() || !dir.is_absolute() {
        return Err(refuse("is not a directory signal-cli may have"));
    }
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir);
        }
        Err(e) => return Err(e),
        Ok(meta) => {
            if !meta.is_dir() {
                return Err(refuse("is not a directory (or is a symlink)"));
            }
            // SAFETY: geteuid has no preconditions and cannot fail.
            let me = unsafe { libc::geteuid() };
            if meta.uid() != me {
                return Err(refuse("is owned by another user"));
            }
            if meta.mode() & 0o1000 != 0 {
                return Err(refuse("is a shared directory (sticky bit, like /tmp)"));
            }
            if meta.mode() & 0o077 != 0 {
                return Err(refuse(
                    "is open to group or others (chmod 700 it if it is signal-cli's)",
                ));
            }
        }
    }
    Ok(())
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

/// Longest line of signal-cli's log kept in memory; the rest of a longer line is skipped.
const MAX_LOG_LINE_BYTES: usize = 4096;

/// Characters of a log line written to our log.
const MAX_LOG_LINE_CHARS: usize = 500;

/// One line of signal-cli's log, or the note that one was too long.
enum LogLine {
    Line(bytes::Bytes),
    TooLong,
}

/// Newline-separated byte chunks of at most [`MAX_LOG_LINE_BYTES`]; an over-long line is an
/// item, not an error (a stream ends at its first error, and then the pipe would fill).
struct LogLines(AnyDelimiterCodec);

impl LogLines {
    fn new() -> Self {
        LogLines(AnyDelimiterCodec::new_with_max_length(
            b"\n".to_vec(),
            Vec::new(),
            MAX_LOG_LINE_BYTES,
        ))
    }

    fn item(
        decoded: Result<Option<bytes::Bytes>, AnyDelimiterCodecError>,
    ) -> Result<Option<LogLine>, std::io::Error> {
        match decoded {
            Ok(line) => Ok(line.map(LogLine::Line)),
            Err(AnyDelimiterCodecError::MaxChunkLengthExceeded) => Ok(Some(LogLine::TooLong)),
            Err(AnyDelimiterCodecError::Io(e)) => Err(e),
        }
    }
}

impl Decoder for LogLines {
    type Item = LogLine;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut bytes::BytesMut) -> Result<Option<LogLine>, std::io::Error> {
        Self::item(self.0.decode(src))
    }

    fn decode_eof(&mut self, src: &mut bytes::BytesMut) -> Result<Option<LogLine>, std::io::Error> {
        Self::item(self.0.decode_eof(src))
    }
}

/// Reads signal-cli's stderr to its end and logs it at debug level. Memory is bounded by
/// [`MAX_LOG_LINE_BYTES`] whatever it writes, and bytes that are not UTF-8 (a Latin-1 locale)
/// are decoded lossily: the drain stops only at EOF or a read error, so signal-cli never
/// blocks on a full pipe. Returns the number of lines read.
pub(crate) async fn drain_log(stderr: impl tokio::io::AsyncRead + Unpin) -> u64 {
    let mut lines = FramedRead::new(stderr, LogLines::new());
    let mut count = 0u64;
    while let Some(Ok(line)) = lines.next().await {
        count += 1;
        match line {
            LogLine::Line(bytes) => {
                let line: String = String::from_utf8_lossy(&bytes)
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(MAX_LOG_LINE_CHARS)
                    .collect();
                tracing::debug!(target: "signal_cli", "{line}");
            }
            LogLine::TooLong => {
                tracing::debug!(target: "signal_cli", "(an over-long log line skipped)")
            }
        }
    }
    count
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
        tokio::spawn(drain_log(stderr));
    }
    Ok(child)
}

/// Keeps signal-cli running until shutdown: restarts it with backoff when it exits, or when
/// `restart` is notified because it stopped answering (the backoff resets after a minute of
/// running).
pub(crate) async fn supervise(
    program: PathBuf,
    data_dir: PathBuf,
    health: std::sync::Arc<ChannelHealth>,
    restart: std::sync::Arc<tokio::sync::Notify>,
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
                    () = restart.notified() => {
                        // It stopped answering (the channel saw its calls time out).
                        let _ = child.start_kill();
                        child.wait().await
                    }
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

    #[tokio::test]
    async fn signal_cli_log_drain_survives_non_utf8_and_endless_lines() {
        let mut log = b"\xff latin-1 \xe9\n".to_vec();
        log.extend(std::iter::repeat_n(b'x', 1 << 20));
        log.push(b'\n');
        for i in 0..100_000 {
            log.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        log.extend_from_slice(b"last line without newline");
        let (mut writer, reader) = tokio::io::duplex(8192);
        let feeding = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            writer.write_all(&log).await.unwrap();
        });
        let mut framed = FramedRead::new(reader, LogLines::new());
        let mut lines = 0u64;
        let mut too_long = 0u64;
        while let Some(line) = framed.next().await {
            match line.unwrap() {
                LogLine::Line(_) => lines += 1,
                LogLine::TooLong => too_long += 1,
            }
            assert!(
                framed.read_buffer().capacity() <= 4 * MAX_LOG_LINE_BYTES + 8192,
                "the buffer stays bounded"
            );
        }
        feeding.await.unwrap();
        assert_eq!((lines, too_long), (1 + 100_000 + 1, 1));
        let (mut writer, reader) = tokio::io::duplex(64);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            writer.write_all(b"\xff\xfe\nok\n").await.unwrap();
        });
        assert_eq!(drain_log(reader).await, 2, "read to EOF");
    }

    /// Regression (review 10, L5): any absolute `dataDir` was chmod-ed to 0700 at every start
    /// (`/`, `/tmp`, someone's home), breaking the system or other users.
    #[test]
    fn signal_data_dir_refuses_system_directories() {
        use std::os::unix::fs::PermissionsExt;
        for system in ["/", "/tmp", "/usr", "/etc"] {
            let before = std::fs::metadata(system).unwrap().permissions().mode();
            assert!(prepare_data_dir(Path::new(system)).is_err(), "{system}");
            assert_eq!(
                std::fs::metadata(system).unwrap().permissions().mode(),
                before
            );
        }
        let base = tempfile::tempdir().unwrap();
        let shared = base.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(prepare_data_dir(&shared).is_err());
        assert_eq!(
            std::fs::metadata(&shared).unwrap().permissions().mode() & 0o777,
            0o755,
            "never chmod-ed"
        );
        let link = base.path().join("link");
        std::os::unix::fs::symlink(base.path(), &link).unwrap();
        assert!(prepare_data_dir(&link).is_err(), "a symlink");
        let fresh = base.path().join("a/signal");
        prepare_data_dir(&fresh).unwrap();
        assert_eq!(
            std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
            0o700
        );
        prepare_data_dir(&fresh).expect("its own directory again");
    }

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
