//! Test harness: a real gateway (built by the binary's own wiring from a `moltmate.json`)
//! talking to the fake Telegram Bot API and the fake LLM servers over HTTP on 127.0.0.1.
#![allow(dead_code)]

use moltmate::wiring::{self, Built, Purpose};
use moltmate_testkit::llm::FakeLlm;
use moltmate_testkit::telegram::FakeTelegram;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const BOT_TOKEN: &str = "123456:TEST-BOT-TOKEN-NEVER-LOGGED";
pub const API_KEY: &str = "sk-ant-test-KEY-NEVER-LOGGED";

/// Merges `patch` into `base` (objects recursively, everything else replaced).
pub fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (key, value) in patch {
                merge(base.entry(key).or_insert(Value::Null), value);
            }
        }
        (base, patch) => *base = patch,
    }
}

/// The config every test starts from: fake model, fake Telegram, open access, no onboarding.
pub fn base_config(telegram: &FakeTelegram, llm: &FakeLlm) -> Value {
    json!({
        "model": { "primary": "fake/test-model", "maxRetries": 0 },
        "providers": { "fake": { "api": "anthropic", "baseUrl": llm.anthropic_base_url(), "apiKey": API_KEY } },
        "channels": { "telegram": {
            "botToken": BOT_TOKEN, "apiUrl": telegram.api_url(), "dmPolicy": "open", "allowFrom": ["*"],
            "pollTimeoutSeconds": 1
        } },
        "onboarding": { "enabled": false },
        "logging": { "level": "warn" }
    })
}

pub fn write_config(home: &Path, config: &Value) {
    std::fs::create_dir_all(home).unwrap();
    std::fs::write(
        home.join("moltmate.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
}

pub struct Harness {
    pub home: PathBuf,
    pub telegram: FakeTelegram,
    pub llm: FakeLlm,
    pub built: Built,
    channels: tokio::task::JoinHandle<()>,
    /// Unmounts the home's capped volumes when a test drops the harness without `stop`
    /// (fields drop in order: after the gateway, before the directory).
    _volumes: VolumeGuard,
    pub dir: tempfile::TempDir,
}

/// Releases the capped volumes below a home when dropped (a root gateway with a sandbox puts
/// every user's home on one before their first turn), also after a gateway was killed.
pub struct VolumeGuard(pub PathBuf);

/// A temporary directory holding a gateway home at `<dir>/home`, whose capped volumes are
/// released before the directory is deleted.
pub struct TestHome {
    _volumes: VolumeGuard,
    _dir: tempfile::TempDir,
}

impl TestHome {
    pub fn new(dir: tempfile::TempDir, home: &Path) -> Self {
        TestHome {
            _volumes: VolumeGuard(home.to_path_buf()),
            _dir: dir,
        }
    }
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        release_volumes(&self.0);
    }
}

impl Harness {
    /// Starts fakes and a gateway whose config is `base_config` merged with `patch`.
    pub async fn start(patch: Value) -> Harness {
        let telegram = FakeTelegram::start(BOT_TOKEN).await;
        let llm = FakeLlm::start().await;
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let mut config = base_config(&telegram, &llm);
        merge(&mut config, patch);
        write_config(&home, &config);
        let config = wiring::load_config(&home).expect("test config loads");
        let built = wiring::build(&home, &config, Purpose::Serve)
            .await
            .expect("gateway builds");
        built.gateway.recover().await.unwrap();
        let gateway = built.gateway.clone();
        let channels = tokio::spawn(async move { gateway.run_channels().await });
        Harness {
            _volumes: VolumeGuard(home.clone()),
            dir,
            home,
            telegram,
            llm,
            built,
            channels,
        }
    }

    pub async fn expect_reply(&self, chat_id: i64, count: usize) -> Vec<String> {
        self.telegram
            .wait_for_messages(chat_id, count, Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("no reply for chat {chat_id}: {e:?}"))
    }

    /// Stops the gateway and starts a new one on the same home with the same doubles, as a
    /// restart after a crash or an upgrade: messages accepted but not answered are replayed by
    /// recovery before the channels run again.
    pub async fn restart(self) -> Harness {
        let Harness {
            dir,
            home,
            telegram,
            llm,
            built,
            channels,
            _volumes,
        } = self;
        built.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), channels).await;
        built.gateway.drain(Duration::from_secs(5)).await;
        built.release_volumes().await;
        drop(built);
        let config = wiring::load_config(&home).expect("test config loads");
        let built = wiring::build(&home, &config, Purpose::Serve)
            .await
            .expect("gateway builds again");
        built.gateway.recover().await.unwrap();
        let gateway = built.gateway.clone();
        let channels = tokio::spawn(async move { gateway.run_channels().await });
        Harness {
            dir,
            home,
            telegram,
            llm,
            built,
            channels,
            _volumes,
        }
    }

    /// Starts the web server (UI, API) of this gateway on its configured port (give it
    /// [`free_port`]). Returns its base URL.
    pub async fn start_web(&self) -> String {
        let config = wiring::load_config(&self.home).expect("test config loads");
        wiring::start_web(&self.home, &config, &self.built)
            .await
            .expect("the web server starts")
    }

    /// Stops the gateway without removing its sandboxes, as production does on shutdown (they
    /// are adopted by the next start, or pruned). Returns the temporary directory.
    pub async fn stop_keeping_sandboxes(self) -> tempfile::TempDir {
        self.built.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.channels).await;
        self.built.gateway.drain(Duration::from_secs(5)).await;
        // As production does at shutdown.
        self.built.release_volumes().await;
        drop(self.built);
        self.dir
    }

    /// Stops the gateway; returns the temporary directory so a test can keep using the home.
    pub async fn stop(self) -> tempfile::TempDir {
        self.built.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.channels).await;
        // Drained first, so no background task (a sandbox prewarm) creates a sandbox after
        // the prune below.
        self.built.gateway.drain(Duration::from_secs(5)).await;
        // Production keeps sandboxes warm across restarts; a test removes what it made.
        if let Some(sandbox) = &self.built.sandbox {
            let _ = sandbox.prune(Duration::ZERO).await;
        }
        release_volumes(&self.home);
        self.dir
    }
}

/// Unmounts the users' capped volumes (made before a user's first turn when the gateway is root
/// and has a sandbox), so the temporary directory can be deleted and no loop device outlives
/// the test.
pub fn release_volumes(home: &Path) {
    // Everything backed by an image of this home (a set-up's staging mount too), also what a
    // killed gateway left; and no task of a dropped in-process gateway mounts again.
    if let Err(e) = moltmate_sandbox::disk::release_all(&home.join("sandboxes")) {
        eprintln!("could not release every volume of {}: {e}", home.display());
    }
    for dir in ["users", "families", "sandboxes/scratch"] {
        if let Ok(entries) = std::fs::read_dir(home.join(dir)) {
            for entry in entries.flatten() {
                let _ = moltmate_sandbox::disk::release_user_volume(&entry.path());
            }
        }
    }
}

/// Path of the real binary under test.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_moltmate"))
}

/// Runs the binary with `--home` and args; returns (status, stdout, stderr).
pub fn run_cli(home: &Path, args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let output = std::process::Command::new(binary())
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("OPENAI_API_KEY")
        .output()
        .expect("binary runs");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// [`run_cli`] with extra environment variables (the secrets a restored config references).
pub fn run_cli_env(
    home: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::ExitStatus, String, String) {
    let output = std::process::Command::new(binary())
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("OPENAI_API_KEY")
        .envs(env.iter().copied())
        .output()
        .expect("binary runs");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A TCP port of 127.0.0.1 that was free a moment ago (for `gateway.port`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// [`run_cli`] off the async runtime (the command may wait for the gateway running in this
/// process).
pub async fn run_cli_async(
    home: &Path,
    args: &[&str],
) -> (std::process::ExitStatus, String, String) {
    let home = home.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_cli(&home, &args)
    })
    .await
    .expect("the CLI task runs")
}

/// Every row of the database (at `home`) that names `user` in a `user_id` column, by table,
/// except the tables listed in `allowed`.
pub fn rows_naming(home: &Path, user: &str, allowed: &[&str]) -> Vec<(String, i64)> {
    let db = rusqlite::Connection::open_with_flags(
        home.join("moltmate.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("the database opens");
    let tables: Vec<String> = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut found = Vec::new();
    for table in tables {
        if allowed.contains(&table.as_str()) {
            continue;
        }
        let columns: Vec<String> = db
            .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for column in ["user_id", "id", "name"] {
            if !columns.iter().any(|c| c == column) {
                continue;
            }
            // `id` names a user only in `users`; `name` only in `sandbox_ids` (live rows).
            let filter = match (table.as_str(), column) {
                ("users", "id") => "id = ?1".to_string(),
                ("sandbox_ids", "name") => {
                    "kind = 'user' AND name = ?1 AND retired_at IS NULL".to_string()
                }
                (_, "user_id") => "user_id = ?1".to_string(),
                _ => continue,
            };
            let count: i64 = db
                .query_row(
                    &format!("SELECT COUNT(*) FROM {table} WHERE {filter}"),
                    [user],
                    |r| r.get(0),
                )
                .unwrap();
            if count > 0 {
                found.push((table.clone(), count));
            }
        }
    }
    found
}

/// The bound every hostile test holds a bystander to: within 2× their normal answer time
/// plus 500 ms.
pub fn bystander_bound(normal: Duration) -> Duration {
    normal * 2 + Duration::from_millis(500)
}

/// This process's resident set size in bytes (`/proc/self/statm`); 0 where it cannot be read.
/// Integration tests run the gateway in-process, so this is the gateway's RSS plus the test's.
pub fn rss_bytes() -> u64 {
    let page = 4096;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * page)
        .unwrap_or(0)
}

impl Harness {
    /// Sends `text` as Telegram user `chat_id` and waits for one more reply to that chat;
    /// returns the reply and how long it took.
    pub async fn round_trip(&self, chat_id: i64, text: &str) -> (String, Duration) {
        let chat = chat_id.to_string();
        let before = self
            .telegram
            .sent_messages()
            .iter()
            .filter(|m| m.chat_id == chat)
            .count();
        let started = std::time::Instant::now();
        self.telegram.push_text(chat_id, text);
        let replies = self
            .telegram
            .wait_for_messages(chat_id, before + 1, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("bystander {chat_id} got no answer: {e:?}"));
        (replies[before].clone(), started.elapsed())
    }

    /// A bystander's normal answer time: the slowest of `rounds` round trips with nothing else
    /// going on (the slowest, so a hostile test does not fail on ordinary jitter).
    pub async fn bystander_baseline(&self, chat_id: i64, rounds: usize) -> Duration {
        let mut slowest = Duration::ZERO;
        for round in 0..rounds.max(1) {
            let (_, took) = self.round_trip(chat_id, &format!("baseline {round}")).await;
            slowest = slowest.max(took);
        }
        slowest
    }

    /// One bystander round trip during an attack, asserted against [`bystander_bound`].
    pub async fn assert_bystander_answered(&self, chat_id: i64, normal: Duration, what: &str) {
        let (reply, took) = self
            .round_trip(chat_id, &format!("still there? ({what})"))
            .await;
        let bound = bystander_bound(normal);
        assert!(
            took <= bound,
            "{what}: bystander answered in {took:?}, over the bound {bound:?} (normal {normal:?}); reply {reply:?}"
        );
    }
}

impl Harness {
    /// Stops this gateway and starts one on `home` (another home, e.g. a restored backup)
    /// with the same doubles; its config is read with `env` for `${VAR}` references instead
    /// of the process environment. The old home's temporary directory stays alive in the
    /// result's `dir`.
    pub async fn move_to(self, home: PathBuf, env: &dyn Fn(&str) -> Option<String>) -> Harness {
        let Harness {
            dir,
            home: old_home,
            telegram,
            llm,
            built,
            channels,
            _volumes: old_volumes,
        } = self;
        built.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), channels).await;
        built.gateway.drain(Duration::from_secs(5)).await;
        if let Some(sandbox) = &built.sandbox {
            let _ = sandbox.prune(Duration::ZERO).await;
        }
        drop(built);
        release_volumes(&old_home);
        drop(old_volumes);
        let config = moltmate_config::Config::load(&home, env).expect("the moved config loads");
        let built = wiring::build(&home, &config, Purpose::Serve)
            .await
            .expect("gateway builds on the new home");
        built.gateway.recover().await.unwrap();
        let gateway = built.gateway.clone();
        let channels = tokio::spawn(async move { gateway.run_channels().await });
        Harness {
            dir,
            _volumes: VolumeGuard(home.clone()),
            home,
            telegram,
            llm,
            built,
            channels,
        }
    }
}

// ---- sample files for the attachment tests ----------------------------------------------

/// Bytes that start like a PNG (enough for type-by-content checks; not a real image).
pub fn png() -> Vec<u8> {
    let mut bytes = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    bytes.extend(b"\0\0\0\rIHDR-not-a-real-image-but-png-magic".iter());
    bytes
}

/// Bytes that start like an ELF program (refused whatever it is labelled).
pub fn elf() -> Vec<u8> {
    let mut bytes = vec![0x7F, b'E', b'L', b'F', 2, 1, 1, 0];
    bytes.extend([0u8; 56]);
    bytes
}

/// Bytes that start like an OGG audio file.
pub fn ogg() -> Vec<u8> {
    let mut bytes = b"OggS\0\x02".to_vec();
    bytes.extend([7u8; 200]);
    bytes
}

/// A minimal PDF.
pub fn pdf() -> Vec<u8> {
    b"%PDF-1.7\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n".to_vec()
}

/// The files saved in `user`'s `inbox/<day>/` folders.
pub fn inbox_files(home: &std::path::Path, user: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(days) = std::fs::read_dir(home.join("users").join(user).join("inbox")) else {
        return out;
    };
    for day in days.flatten() {
        for file in std::fs::read_dir(day.path()).unwrap().flatten() {
            out.push(file.path());
        }
    }
    out
}

/// Builds the sandbox image when the engine does not have it yet (a fresh CI machine has
/// none; a test that only checked for it would fail there, or skip). `Err` says why it could
/// not be built.
pub async fn ensure_sandbox_image(
    settings: &moltmate_sandbox::SandboxSettings,
) -> Result<(), String> {
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Dockerfile.sandbox");
    moltmate_sandbox::image::ensure_image(settings, &dockerfile, &|line| eprintln!("{line}"))
        .await
        .map(|_| ())
        .map_err(|e| format!("the sandbox image could not be built: {e}"))
}
