//! Leaked loop mounts: the capped volumes a root gateway mounts over its users' homes
//! (`sandboxes/disks/<user>.img`) never outlive what they belong to. The real binary runs
//! `serve` on both sandbox backends; after `users remove`, `users reset` and a shutdown no
//! mount of that user (or of the gateway) remains in `/proc/self/mountinfo`; a gateway
//! restarted after `kill -9` reuses the homes it left mounted (never mounts one twice) and
//! clears a first set-up the kill interrupted (its staging mount and image).
//!
//! Root only (loop mounts). Prints `SKIP: <reason>` without the backend, unless
//! `MOLTMATE_REQUIRE_SANDBOX=1`, which turns a skip into a failure.

mod common;

use common::{base_config, binary, merge, run_cli_async, write_config, BOT_TOKEN};
use moltmate_testkit::llm::{FakeLlm, Reply};
use moltmate_testkit::telegram::FakeTelegram;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn skip_or_fail(reason: &str) {
    if std::env::var("MOLTMATE_REQUIRE_SANDBOX").as_deref() == Ok("1") {
        panic!("sandbox required but unavailable: {reason}");
    }
    eprintln!("SKIP: {reason}");
}

async fn backend_ready(backend: &str) -> bool {
    if !moltmate_sandbox::disk::can_enforce() {
        skip_or_fail("disk caps need a root gateway (loop mounts)");
        return false;
    }
    if backend == "docker" {
        let dir = tempfile::tempdir().unwrap();
        let settings = moltmate_sandbox::SandboxSettings {
            backend: moltmate_sandbox::BackendChoice::Docker,
            scope: moltmate_sandbox::SandboxScope::User,
            image: "moltmate-sandbox:bookworm-slim".into(),
            docker_host: None,
            prune_idle: Duration::from_secs(600),
            state_dir: dir.path().to_path_buf(),
            allowed_domains: vec![],
            config_digest: String::new(),
        };
        if !moltmate_sandbox::docker::docker_available(&settings).await {
            skip_or_fail("no Docker daemon answers");
            return false;
        }
        if let Err(reason) = common::ensure_sandbox_image(&settings).await {
            skip_or_fail(&reason);
            return false;
        }
    } else if moltmate_sandbox::bwrap::find_bwrap().is_none() {
        skip_or_fail("bubblewrap (bwrap) is not installed");
        return false;
    }
    true
}

/// `(mount point, backing file)` of every loop mount in this mount namespace (the gateway
/// under test runs in it too).
fn loop_mounts() -> Vec<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut out = Vec::new();
    for line in info.lines() {
        let mountpoint = line.split(' ').nth(4).unwrap_or("").replace("\\040", " ");
        let source = line
            .split(" - ")
            .nth(1)
            .and_then(|rest| rest.split(' ').nth(1))
            .unwrap_or("");
        let backing = source
            .strip_prefix("/dev/")
            .and_then(|dev| {
                std::fs::read_to_string(format!("/sys/block/{dev}/loop/backing_file")).ok()
            })
            .map(|b| b.trim_end().to_string())
            .unwrap_or_default();
        if source.starts_with("/dev/loop") {
            out.push((mountpoint, backing));
        }
    }
    out
}

/// Loop mounts at or below `dir`, or backed by an image below it.
fn mounts_of(dir: &Path) -> Vec<(String, String)> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let dir = dir.to_string_lossy().into_owned();
    loop_mounts()
        .into_iter()
        .filter(|(at, backing)| at.starts_with(&dir) || backing.starts_with(&dir))
        .collect()
}

/// Loop mounts of one user: at their home, or backed by their image.
fn mounts_of_user(home: &Path, user: &str) -> Vec<(String, String)> {
    let users_home = home.join("users").join(user);
    let image = format!("/{user}.img");
    mounts_of(home)
        .into_iter()
        .filter(|(at, backing)| {
            Path::new(at) == users_home || backing.contains(&image) || at.ends_with(user)
        })
        .collect()
}

fn start_gateway(home: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.join("gateway.log"))
        .unwrap();
    Command::new(binary())
        .arg("--home")
        .arg(home)
        .arg("serve")
        .env_remove("ANTHROPIC_API_KEY")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("gateway starts")
}

fn kill_hard(child: &mut Child) {
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
}

/// SIGTERM, as a service manager stops the gateway; waits until it has exited.
fn stop_gracefully(child: &mut Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "the gateway stopped with {status}");
            return;
        }
        assert!(Instant::now() < deadline, "the gateway did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn replies(telegram: &FakeTelegram, chat: i64, count: usize) {
    telegram
        .wait_for_messages(chat, count, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("no reply for chat {chat}: {e:?}"));
}

async fn setup(
    backend: &str,
    users: &[i64],
    uid_start: u32,
) -> (common::TestHome, PathBuf, FakeTelegram, FakeLlm) {
    let telegram = FakeTelegram::start(BOT_TOKEN).await;
    let llm = FakeLlm::start().await;
    llm.set_brain(|request| {
        Reply::text(format!(
            "echo: {}",
            request.last_user_text().unwrap_or_default()
        ))
    });
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let mut config = base_config(&telegram, &llm);
    let users: serde_json::Map<String, serde_json::Value> = users
        .iter()
        .map(|chat| {
            (
                format!("telegram_{chat}"),
                json!({ "identities": [format!("telegram:{chat}")], "trust": "owner" }),
            )
        })
        .collect();
    merge(
        &mut config,
        json!({
            "gateway": { "port": common::free_port() },
            "logging": { "level": "info" },
            "sandbox": {
                "backend": backend, "mode": "all", "scope": "user", "prewarm": false,
                "limits": { "pids": 64, "memoryMb": 256, "diskMb": 16 },
                "uidRange": { "start": uid_start, "count": 1000 }
            },
            "users": users
        }),
    );
    write_config(&home, &config);
    // Whatever a failing test leaves mounted is released when it ends.
    (common::TestHome::new(dir, &home), home, telegram, llm)
}

/// Removes the Docker containers the gateway under `home` left (kept warm across restarts).
async fn remove_containers(home: &Path) {
    let _ = run_cli_async(home, &["sandbox", "prune"]).await;
}

async fn leaked_loop_mounts_end_with_remove_reset_and_shutdown(backend: &str, uid_start: u32) {
    if !backend_ready(backend).await {
        return;
    }
    let (_dir, home, telegram, _llm) = setup(backend, &[5101, 5102, 5103], uid_start).await;
    let mut gateway = start_gateway(&home);
    for chat in [5101, 5102, 5103] {
        telegram.push_text(chat, "hello");
    }
    for chat in [5101, 5102, 5103] {
        replies(&telegram, chat, 1).await;
        let user = format!("telegram_{chat}");
        assert_eq!(
            mounts_of_user(&home, &user).len(),
            1,
            "{user}'s home is on its volume, once: {:?}",
            mounts_of(&home)
        );
    }

    let (status, out, err) =
        run_cli_async(&home, &["users", "remove", "telegram_5101", "--yes"]).await;
    assert!(status.success(), "{out}{err}");
    let left = mounts_of_user(&home, "telegram_5101");
    assert!(left.is_empty(), "mounts of the removed user: {left:?}");
    assert!(!home.join("sandboxes/disks/telegram_5101.img").exists());

    let (status, out, err) =
        run_cli_async(&home, &["users", "reset", "telegram_5102", "--yes"]).await;
    assert!(status.success(), "{out}{err}");
    let left = mounts_of_user(&home, "telegram_5102");
    assert!(left.is_empty(), "mounts of the reset user: {left:?}");
    assert!(!home.join("sandboxes/disks/telegram_5102.img").exists());
    // The bystander's volume was never touched.
    assert_eq!(mounts_of_user(&home, "telegram_5103").len(), 1);

    stop_gracefully(&mut gateway);
    let left = mounts_of(&home);
    assert!(left.is_empty(), "mounts after the shutdown: {left:?}");
    // Its files are in the image, and the next start mounts it again.
    let mut gateway = start_gateway(&home);
    telegram.push_text(5103, "again");
    replies(&telegram, 5103, 2).await;
    assert_eq!(mounts_of_user(&home, "telegram_5103").len(), 1);
    stop_gracefully(&mut gateway);
    assert!(mounts_of(&home).is_empty(), "{:?}", mounts_of(&home));
    remove_containers(&home).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leaked_loop_mounts_end_with_remove_reset_and_shutdown_bwrap() {
    leaked_loop_mounts_end_with_remove_reset_and_shutdown("bwrap", 2_011_000_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leaked_loop_mounts_end_with_remove_reset_and_shutdown_docker() {
    leaked_loop_mounts_end_with_remove_reset_and_shutdown("docker", 2_012_000_000).await;
}

async fn leaked_loop_mounts_kill_9_restart_reuses_and_clears_staging(
    backend: &str,
    uid_start: u32,
) {
    if !backend_ready(backend).await {
        return;
    }
    let (_dir, home, telegram, _llm) = setup(backend, &[5201], uid_start).await;
    let mut gateway = start_gateway(&home);
    telegram.push_text(5201, "hello");
    replies(&telegram, 5201, 1).await;
    kill_hard(&mut gateway);
    // A killed gateway runs no shutdown code: its home stays mounted.
    assert_eq!(mounts_of_user(&home, "telegram_5201").len(), 1);
    // And a first set-up the kill interrupted: its staging image, mounted on its staging dir.
    let disks = home.join("sandboxes/disks");
    let staged = disks.join(".migrate-telegram_5299.img");
    let staging = disks.join(".migrate-telegram_5299");
    std::fs::File::create(&staged)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    assert!(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&staged)
        .status()
        .unwrap()
        .success());
    std::fs::create_dir_all(&staging).unwrap();
    assert!(Command::new("mount")
        .args(["-t", "ext4", "-o", "loop"])
        .arg(&staged)
        .arg(&staging)
        .status()
        .unwrap()
        .success());

    let mut gateway = start_gateway(&home);
    telegram.push_text(5201, "after the crash");
    replies(&telegram, 5201, 2).await;
    assert_eq!(
        mounts_of_user(&home, "telegram_5201").len(),
        1,
        "the restarted gateway reuses the home's mount, never mounts it twice: {:?}",
        mounts_of(&home)
    );
    let left = mounts_of_user(&home, ".migrate-telegram_5299");
    assert!(
        left.is_empty(),
        "the interrupted set-up is cleared: {left:?}"
    );
    assert!(!staged.exists() && !staging.exists());
    stop_gracefully(&mut gateway);
    assert!(mounts_of(&home).is_empty(), "{:?}", mounts_of(&home));
    remove_containers(&home).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leaked_loop_mounts_kill_9_restart_reuses_and_clears_staging_bwrap() {
    leaked_loop_mounts_kill_9_restart_reuses_and_clears_staging("bwrap", 2_013_000_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leaked_loop_mounts_kill_9_restart_reuses_and_clears_staging_docker() {
    leaked_loop_mounts_kill_9_restart_reuses_and_clears_staging("docker", 2_014_000_000).await;
}
