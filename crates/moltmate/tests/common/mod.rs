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
    pub dir: tempfile::TempDir,
    pub home: PathBuf,
    pub telegram: FakeTelegram,
    pub llm: FakeLlm,
    pub built: Built,
    channels: tokio::task::JoinHandle<()>,
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

/// Unmounts the users' capped volumes (made when a sandbox ran), so the temporary directory
/// can be deleted and no loop device outlives the test.
pub fn release_volumes(home: &Path) {
    for dir in ["users", "families"] {
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
