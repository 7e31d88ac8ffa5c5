//! `moltmate doctor` as the operator runs it: the real binary against prepared homes.

mod common;

use common::run_cli;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A config that needs no sandbox (exec denied), so the outcome does not depend on Docker.
fn quiet_config(extra: Value) -> Value {
    let mut config = json!({
        "tools": { "deny": ["exec"] },
        "logging": { "tools": true },
    });
    common::merge(&mut config, extra);
    config
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mkdir(path: &Path, mode: u32) {
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

fn home_with(config: &Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    mkdir(dir.path(), 0o700);
    write(
        &dir.path().join("moltmate.json"),
        &serde_json::to_string_pretty(config).unwrap(),
        0o600,
    );
    dir
}

/// Runs `doctor --json` (plus `extra` arguments); returns the exit code and the report.
fn doctor_json(home: &Path, extra: &[&str]) -> (i32, Value, String) {
    let mut args = vec!["doctor", "--json"];
    args.extend_from_slice(extra);
    let (status, stdout, stderr) = run_cli(home, &args);
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("doctor --json prints JSON ({e}): {stdout}\n{stderr}"));
    (status.code().unwrap_or(-1), report, stdout)
}

fn check<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no check {id} in {report:#}"))
}

fn status<'a>(report: &'a Value, id: &str) -> &'a str {
    check(report, id)["status"].as_str().unwrap()
}

#[test]
fn wrong_modes_fail_and_fix_repairs_them_and_says_so() {
    let dir = home_with(&quiet_config(
        json!({ "families": { "fam": { "members": [] } } }),
    ));
    let home = dir.path();
    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        home.join("moltmate.json"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    write(&home.join("moltmate.db"), "", 0o644);
    write(&home.join("moltmate.db-wal"), "", 0o640);
    write(&home.join("admin.token"), "mma_x", 0o604);
    mkdir(&home.join("users/anna"), 0o755);
    mkdir(&home.join("families/fam"), 0o750);
    mkdir(&home.join("index"), 0o711);
    write(&home.join("index/anna.db"), "", 0o644);
    mkdir(&home.join("archive"), 0o755);

    let (code, report, _) = doctor_json(home, &[]);
    assert_eq!(code, 1, "a failing check exits 1");
    for id in [
        "perm.home",
        "perm.config",
        "perm.database",
        "perm.admin_token",
        "perm.users",
        "perm.families",
        "perm.index",
        "perm.state",
    ] {
        assert_eq!(
            status(&report, id),
            "fail",
            "{id}: {:#}",
            check(&report, id)
        );
        assert!(check(&report, id)["fix"]
            .as_str()
            .unwrap()
            .contains("moltmate doctor --fix"));
    }
    assert!(check(&report, "perm.config")["detail"]
        .as_str()
        .unwrap()
        .contains("is 0644 (want 0600)"));

    let (status_fix, stdout, stderr) = run_cli(home, &["doctor", "--fix"]);
    assert!(
        status_fix.success(),
        "after the fixes nothing fails:\n{stdout}\n{stderr}"
    );
    let home_text = home.display().to_string();
    for line in [
        format!("chmod 0700 {home_text} (was 0755)"),
        format!("chmod 0600 {home_text}/moltmate.json (was 0644)"),
        format!("chmod 0600 {home_text}/moltmate.db (was 0644)"),
        format!("chmod 0600 {home_text}/moltmate.db-wal (was 0640)"),
        format!("chmod 0600 {home_text}/admin.token (was 0604)"),
        format!("chmod 0700 {home_text}/users/anna (was 0755)"),
        format!("chmod 0700 {home_text}/families/fam (was 0750)"),
        format!("chmod 0700 {home_text}/index (was 0711)"),
        format!("chmod 0600 {home_text}/index/anna.db (was 0644)"),
        format!("chmod 0700 {home_text}/archive (was 0755)"),
        // The database exists, so users/ and families/ (families are configured) must; users/
        // exists already, families/ too; nothing else is created.
    ] {
        assert!(stdout.contains(&line), "--fix says {line:?}:\n{stdout}");
    }
    assert_eq!(mode(home), 0o700);
    assert_eq!(mode(&home.join("moltmate.json")), 0o600);
    assert_eq!(mode(&home.join("admin.token")), 0o600);
    assert_eq!(mode(&home.join("users/anna")), 0o700);
    assert_eq!(mode(&home.join("index/anna.db")), 0o600);
    assert_eq!(
        std::fs::read_to_string(home.join("admin.token")).unwrap(),
        "mma_x",
        "contents untouched"
    );

    let (code, report, _) = doctor_json(home, &["--fix"]);
    assert_eq!(code, 0);
    assert_eq!(
        report["fixed"],
        json!([]),
        "a second --fix has nothing to do"
    );
    assert_eq!(status(&report, "perm.users"), "pass");
}

#[test]
fn fix_creates_missing_directories_only_where_the_gateway_needs_them() {
    let dir = home_with(&quiet_config(json!({})));
    let home = dir.path();
    write(&home.join("moltmate.db"), "", 0o600);
    let (code, report, _) = doctor_json(home, &[]);
    assert_eq!(code, 1);
    assert!(check(&report, "perm.users")["detail"]
        .as_str()
        .unwrap()
        .contains("users is missing"));
    let (code, report, _) = doctor_json(home, &["--fix"]);
    assert_eq!(code, 0, "{report:#}");
    let fixed: Vec<&str> = report["fixed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        fixed.iter().any(|l| l.ends_with("/users (0700)")),
        "{fixed:?}"
    );
    assert!(
        fixed.iter().any(|l| l.ends_with("/index (0700)")),
        "{fixed:?}"
    );
    assert_eq!(mode(&home.join("users")), 0o700);
    assert!(!home.join("families").exists(), "no families configured");
}

#[test]
fn what_is_not_a_file_or_directory_is_reported_not_repaired() {
    let dir = home_with(&quiet_config(json!({})));
    let home = dir.path();
    mkdir(&home.join("users"), 0o700);
    std::os::unix::fs::symlink("/etc", home.join("users/mallory")).unwrap();
    let fifo =
        std::ffi::CString::new(home.join("admin.token").as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);

    let (code, report, _) = doctor_json(home, &["--fix"]);
    assert_eq!(code, 1);
    let users = check(&report, "perm.users");
    assert_eq!(users["status"], "fail");
    assert!(users["detail"]
        .as_str()
        .unwrap()
        .contains("mallory is a symlink"));
    assert!(check(&report, "perm.admin_token")["detail"]
        .as_str()
        .unwrap()
        .contains("is a FIFO"));
    assert_eq!(
        report["fixed"],
        json!([]),
        "links and FIFOs are not touched"
    );
    assert_eq!(
        mode(Path::new("/etc")),
        0o755,
        "the link's target is untouched"
    );
}

#[test]
fn a_fifo_as_the_config_does_not_hang_doctor() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    mkdir(home, 0o700);
    let fifo =
        std::ffi::CString::new(home.join("moltmate.json").as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let (code, report, _) = doctor_json(home, &[]);
    assert_eq!(code, 1);
    assert_eq!(status(&report, "config.load"), "fail");
    assert_eq!(status(&report, "perm.config"), "fail");
    assert_eq!(status(&report, "secrets.plaintext"), "fail");
}

#[test]
fn secrets_in_plain_text_warn_and_fail_when_the_file_is_readable_by_others() {
    let key = "sk-ant-api03-0123456789abcdefghijklmnop";
    let bot = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsawq";
    let config = quiet_config(json!({
        "providers": { "anthropic": { "apiKey": key } },
        "channels": { "telegram": { "botToken": bot, "enabled": false } },
        "gateway": { "auth": { "token": "${DOCTOR_TEST_GATEWAY_TOKEN}" } },
    }));
    let dir = home_with(&config);
    let home = dir.path();

    let (code, report, stdout) = doctor_json(home, &[]);
    let secrets = check(&report, "secrets.plaintext");
    assert_eq!(secrets["status"], "warn", "{secrets:#}");
    let detail = secrets["detail"].as_str().unwrap();
    assert!(detail.contains("providers.anthropic.apiKey is written into the file"));
    assert!(detail.contains("channels.telegram.botToken is written into the file"));
    assert!(!detail.contains("gateway.auth.token"), "a ${{VAR}} is fine");
    assert!(secrets["fix"].as_str().unwrap().contains("${NAME}"));
    assert!(
        !stdout.contains(key) && !stdout.contains(bot) && !stdout.contains("AAHdq"),
        "the report never shows a secret"
    );
    // The referenced variable is unset here: the config still loads, with a warning.
    let load = check(&report, "config.load");
    assert_eq!(load["status"], "warn");
    assert!(load["detail"]
        .as_str()
        .unwrap()
        .contains("DOCTOR_TEST_GATEWAY_TOKEN"));
    assert_eq!(code, 0, "warnings do not fail: {report:#}");

    std::fs::set_permissions(
        home.join("moltmate.json"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (code, report, _) = doctor_json(home, &[]);
    assert_eq!(code, 1);
    assert_eq!(status(&report, "secrets.plaintext"), "fail");
    assert!(check(&report, "secrets.plaintext")["detail"]
        .as_str()
        .unwrap()
        .contains("readable by other users"));
}

#[test]
fn a_key_in_a_comment_is_found_too() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    mkdir(home, 0o700);
    write(
        &home.join("moltmate.json"),
        "{\n  // old key: sk-ant-api03-abcdefghijklmnopqrstuvwxyz\n  tools: { deny: [\"exec\"] },\n}\n",
        0o600,
    );
    let (_, report, stdout) = doctor_json(home, &[]);
    assert_eq!(status(&report, "secrets.plaintext"), "warn");
    assert!(check(&report, "secrets.plaintext")["detail"]
        .as_str()
        .unwrap()
        .contains("line 2 holds what looks like an Anthropic key"));
    assert!(!stdout.contains("abcdefghijklmnop"));
}

#[test]
fn a_non_loopback_bind_without_token_or_tls_fails() {
    let dir = home_with(&quiet_config(json!({ "gateway": { "bind": "0.0.0.0" } })));
    let (code, report, _) = doctor_json(dir.path(), &[]);
    assert_eq!(code, 1);
    // The config itself is refused (serve would not start); doctor says why.
    let load = check(&report, "config.load");
    assert_eq!(load["status"], "fail");
    assert!(load["detail"].as_str().unwrap().contains(
        "gateway.auth.token: required because gateway.bind (0.0.0.0) is not a loopback address"
    ));

    let dir = home_with(&quiet_config(json!({
        "gateway": { "bind": "0.0.0.0", "auth": { "token": "twenty-characters-xx" } }
    })));
    let (code, report, _) = doctor_json(dir.path(), &[]);
    assert_eq!(code, 1, "a token alone does not make plain HTTP safe");
    assert_eq!(status(&report, "gateway.bind"), "pass");
    assert_eq!(status(&report, "gateway.tls"), "fail");
    assert_eq!(status(&report, "gateway.token"), "warn");

    let dir = home_with(&quiet_config(json!({
        "gateway": {
            "bind": "0.0.0.0",
            "auth": { "token": "0123456789abcdef0123456789abcdef" },
            "publicUrl": "https://moltbot.example.com",
            "trustedProxies": ["172.18.0.2"],
        }
    })));
    let (code, report, _) = doctor_json(dir.path(), &[]);
    for id in [
        "gateway.bind",
        "gateway.tls",
        "gateway.token",
        "gateway.proxy",
    ] {
        assert_eq!(
            status(&report, id),
            "pass",
            "{id}: {:#}",
            check(&report, id)
        );
    }
    assert_eq!(code, 0, "{report:#}");
}

#[test]
fn full_exec_for_a_whole_channel_fails_and_an_open_dm_policy_warns() {
    let dir = home_with(&json!({
        "tools": { "exec": { "security": "full" } },
        "sandbox": { "mode": "none", "dangerouslyAllowHostExec": true },
        "channels": {
            "web": { "defaultTrust": "owner" },
            "telegram": { "botToken": "${DOCTOR_BOT}", "dmPolicy": "open", "allowFrom": ["*"] },
        },
    }));
    let (_, report, _) = doctor_json(dir.path(), &[]);
    // sandbox.mode none disables exec, so nobody can run anything.
    assert_eq!(status(&report, "exec.security"), "pass");
    assert_eq!(status(&report, "channels.dm_policy"), "warn");

    let dir = home_with(&json!({
        "tools": { "exec": { "security": "full" } },
        "channels": { "web": { "defaultTrust": "owner" } },
        "users": { "anna": { "trust": "owner" } },
    }));
    let (code, report, _) = doctor_json(dir.path(), &[]);
    assert_eq!(code, 1);
    let exec = check(&report, "exec.security");
    assert_eq!(exec["status"], "fail");
    assert!(exec["detail"]
        .as_str()
        .unwrap()
        .contains("channels.web.defaultTrust is owner"));

    let dir = home_with(&json!({
        "tools": { "exec": { "security": "full" } },
        "users": { "anna": { "trust": "owner" } },
    }));
    let (_, report, _) = doctor_json(dir.path(), &[]);
    let exec = check(&report, "exec.security");
    assert_eq!(exec["status"], "pass", "{exec:#}");
    assert!(exec["detail"].as_str().unwrap().contains("owners anna"));
}

#[test]
fn the_backup_marker_decides_the_backup_check() {
    let dir = home_with(&quiet_config(json!({})));
    let home = dir.path();
    let (_, report, _) = doctor_json(home, &[]);
    assert_eq!(check(&report, "backup.age")["detail"], "no backup yet");
    assert_eq!(status(&report, "backup.age"), "warn");

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    mkdir(&home.join("backups"), 0o700);
    let archive = home.join("backup-1.tar.zst");
    write(&archive, "x", 0o600);
    let marker = |finished: u64| {
        write(
            &home.join("backups/last.json"),
            &json!({ "finishedAt": finished, "file": archive, "extra": 1 }).to_string(),
            0o600,
        )
    };
    marker(now - 3_600_000);
    let (_, report, _) = doctor_json(home, &[]);
    assert_eq!(status(&report, "backup.age"), "pass", "{report:#}");
    assert!(check(&report, "backup.age")["detail"]
        .as_str()
        .unwrap()
        .contains("1 hour ago"));

    marker(now - 10 * 86_400_000);
    let (_, report, _) = doctor_json(home, &[]);
    assert_eq!(status(&report, "backup.age"), "warn");
    assert!(check(&report, "backup.age")["detail"]
        .as_str()
        .unwrap()
        .contains("10 days ago"));

    write(&home.join("backups/last.json"), "{ not json", 0o600);
    let (code, report, _) = doctor_json(home, &[]);
    assert_eq!(status(&report, "backup.age"), "warn");
    assert_eq!(code, 0, "an unreadable marker is a warning");
}

#[test]
fn the_json_report_has_a_stable_schema() {
    let dir = home_with(&quiet_config(json!({})));
    let (_, report, _) = doctor_json(dir.path(), &[]);
    let top: Vec<&String> = report.as_object().unwrap().keys().collect();
    assert_eq!(top, ["checks", "version"]);
    assert_eq!(report["version"], env!("CARGO_PKG_VERSION"));
    let mut ids = std::collections::HashSet::new();
    for check in report["checks"].as_array().unwrap() {
        let object = check.as_object().unwrap();
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["detail", "fix", "id", "status", "title"],
            "{check:#}"
        );
        let status = check["status"].as_str().unwrap();
        assert!(["pass", "warn", "fail"].contains(&status));
        assert_eq!(check["fix"].is_null(), status == "pass", "{check:#}");
        assert!(!check["title"].as_str().unwrap().is_empty());
        assert!(
            ids.insert(check["id"].as_str().unwrap().to_string()),
            "ids are unique"
        );
    }
    for id in [
        "version",
        "config.load",
        "perm.home",
        "perm.config",
        "perm.database",
        "perm.admin_token",
        "perm.index",
        "perm.users",
        "perm.families",
        "perm.state",
        "secrets.plaintext",
        "gateway.bind",
        "gateway.tls",
        "gateway.token",
        "gateway.proxy",
        "channels.dm_policy",
        "channels.signal_cli",
        "exec.security",
        "sandbox.mode",
        "sandbox.network",
        "logging.tools",
        "sandbox.backend",
        "sandbox.disk_caps",
        "process.mode",
        "process.privileges",
        "systemd.hardening",
        "backup.age",
    ] {
        assert!(ids.contains(id), "check {id} is reported");
    }
}

#[test]
fn a_missing_signal_cli_fails_with_the_install_hint() {
    let dir = home_with(&json!({
        "channels": { "signal": { "account": "+4917000000001", "cliPath": "/nonexistent/signal-cli" } },
    }));
    let (_, report, _) = doctor_json(dir.path(), &[]);
    assert_eq!(status(&report, "channels.signal_cli"), "fail");
    let check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "channels.signal_cli")
        .unwrap();
    assert!(
        check["detail"].as_str().unwrap().contains("install it"),
        "{check}"
    );
    let dir = home_with(&json!({
        "channels": { "signal": { "account": "+4917000000001", "daemon": "tcp:127.0.0.1:7583" } },
    }));
    let (_, report, _) = doctor_json(dir.path(), &[]);
    assert_eq!(status(&report, "channels.signal_cli"), "pass");
}

#[test]
fn the_text_report_names_each_check_and_its_fix() {
    let dir = home_with(&json!({ "tools": { "deny": ["exec"] } }));
    let (status, stdout, _) = run_cli(dir.path(), &["doctor"]);
    assert!(status.success(), "{stdout}");
    assert!(stdout.contains("WARN  logging.tools"), "{stdout}");
    assert!(stdout.contains("fix: set logging.tools: true"), "{stdout}");
    assert!(stdout.contains("PASS  gateway.bind"), "{stdout}");
    assert!(stdout.contains(" fail, "), "{stdout}");
}

/// The serving gateway's `/admin` shows the same list, run inside the serving process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_page_of_a_serving_gateway_lists_the_checks() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let h = common::Harness::start(json!({
        "gateway": { "port": port },
        "tools": { "deny": ["exec"] },
    }))
    .await;
    // The harness writes the config with the default umask: 0644, which doctor reports.
    let config = moltmate::wiring::load_config(&h.home).unwrap();
    let url = moltmate::wiring::start_web(&h.home, &config, &h.built)
        .await
        .unwrap();
    let token = std::fs::read_to_string(h.home.join("admin.token")).unwrap();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = client
        .post(format!("{url}/admin/login"))
        .form(&[("token", token.trim())])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), reqwest::StatusCode::SEE_OTHER);
    let cookie = login
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .unwrap()
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let page = client
        .get(format!("{url}/admin"))
        .header(reqwest::header::COOKIE, cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("<h2>Security checks</h2>"), "{page}");
    for id in [
        "perm.config",
        "process.mode",
        "systemd.hardening",
        "backup.age",
    ] {
        assert!(
            page.contains(&format!("data-check=\"{id}\"")),
            "{id} on the page"
        );
    }
    let row = page
        .split("<tr class=\"check-")
        .find(|row| row.contains("data-check=\"perm.config\""))
        .unwrap();
    assert!(row.starts_with("fail"), "{row}");
    assert!(row.contains("is 0644 (want 0600)"), "{row}");
    assert!(
        !page.contains(token.trim()),
        "the operator token is never rendered"
    );
    h.stop().await;
}

/// Docker: a sandbox container of this installation that mounts the Docker socket is a
/// failing check. (Made by the test by hand with the installation's labels: moltmate itself
/// never mounts it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_that_mounts_the_docker_socket_fails_the_check() {
    let docker_up = std::process::Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    if !docker_up {
        if std::env::var("MOLTMATE_REQUIRE_SANDBOX").as_deref() == Ok("1") {
            panic!("sandbox required but unavailable: docker does not answer");
        }
        eprintln!("SKIP: docker does not answer");
        return;
    }
    let dir = home_with(&json!({ "sandbox": { "backend": "docker" } }));
    let home = dir.path();
    let instance = moltmate_sandbox::docker::instance_label(&home.join("sandboxes"));
    let fake_socket = home.join("docker.sock");
    write(&fake_socket, "", 0o600);
    let name = format!("moltmate-sbx-doctortest-{}", std::process::id());
    let created = std::process::Command::new("docker")
        .args(["create", "--name", &name])
        .args(["--label", "moltmate.managed=true"])
        .args(["--label", &format!("moltmate.instance={instance}")])
        .args(["--network", "none"])
        .arg("-v")
        .arg(format!("{}:/var/run/docker.sock", fake_socket.display()))
        .args(["moltmate-sandbox:bookworm-slim", "true"])
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let (code, report, _) = doctor_json(home, &[]);
    let _ = std::process::Command::new("docker")
        .args(["rm", "-f", &name])
        .output();
    let socket = check(&report, "sandbox.docker_socket");
    assert_eq!(socket["status"], "fail", "{socket:#}");
    assert!(socket["detail"]
        .as_str()
        .unwrap()
        .contains(&format!("{name} mounts {}", fake_socket.display())));
    assert_eq!(code, 1);

    // Without it, the same installation passes that check.
    let (_, report, _) = doctor_json(home, &[]);
    assert_eq!(status(&report, "sandbox.docker_socket"), "pass");
    assert_eq!(status(&report, "sandbox.backend"), "pass");
}

/// `moltmate backup` and `doctor` agree on the marker: a real backup turns the check green,
/// with the archive's path in the detail, and doctor leaves the marker's modes alone.
#[test]
fn a_real_backup_passes_the_backup_check() {
    let dir = home_with(&quiet_config(json!({})));
    let home = dir.path();
    let out = tempfile::tempdir().unwrap();
    let archive = out.path().join("home.tar.gz");
    let (made, _, stderr) = run_cli(home, &["users", "add", "anna"]);
    assert!(made.success(), "{stderr}");
    let (status_code, stdout, stderr) = run_cli(home, &["backup", archive.to_str().unwrap()]);
    assert!(status_code.success(), "backup: {stdout}\n{stderr}");
    assert!(archive.exists());
    let (_, report, _) = doctor_json(home, &[]);
    assert_eq!(status(&report, "backup.age"), "pass", "{report:#}");
    assert_eq!(mode(&home.join("backups/last.json")), 0o600);
}

/// F6: a root gateway shares a family folder with the family's own group (2770, setgid).
/// doctor called that a FAIL (want 0700) and `--fix` chmodded it 0700, ending the sharing.
#[test]
fn doctor_fix_keeps_family_folders_shared_with_their_group() {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        eprintln!("skipped: needs root to give a folder a family's group");
        return;
    }
    let dir = home_with(&quiet_config(
        json!({ "families": { "fam": { "members": [] } } }),
    ));
    let home = dir.path();
    write(&home.join("moltmate.db"), "", 0o600);
    mkdir(&home.join("users"), 0o700);
    mkdir(&home.join("families"), 0o700);
    let shared = home.join("families/fam");
    mkdir(&shared, 0o700);
    std::os::unix::fs::chown(&shared, Some(2_000_000_777), Some(2_000_000_777)).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o2770)).unwrap();
    // Open to others as well: others' bits go, the group's stay.
    let leaky = home.join("families/leaky");
    mkdir(&leaky, 0o700);
    std::os::unix::fs::chown(&leaky, Some(2_000_000_778), Some(2_000_000_778)).unwrap();
    std::fs::set_permissions(&leaky, std::fs::Permissions::from_mode(0o2775)).unwrap();

    let (_, report, _) = doctor_json(home, &[]);
    let families = check(&report, "perm.families");
    assert_eq!(families["status"], "fail", "{families:#}");
    let detail = families["detail"].as_str().unwrap();
    assert!(detail.contains("leaky"), "{detail}");
    assert!(!detail.contains("families/fam "), "2770 is right: {detail}");

    let (_, stdout, _) = run_cli(home, &["doctor", "--fix"]);
    assert!(!stdout.contains("families/fam "), "{stdout}");
    assert_eq!(
        mode(&shared),
        0o2770,
        "a shared family folder keeps its group"
    );
    assert_eq!(
        mode(&leaky),
        0o2770,
        "others lose access, the group keeps it"
    );
    let (_, report, _) = doctor_json(home, &[]);
    assert_eq!(status(&report, "perm.families"), "pass");
}

/// F7: root's `doctor --fix` followed a link at the home's top level (`admin.token ->
/// /somewhere` had its target chmodded), and a `users/` swapped for a link to another folder
/// had that folder's entries repaired.
#[test]
fn doctor_fix_never_repairs_through_a_symlink() {
    let dir = home_with(&quiet_config(json!({})));
    let home = dir.path();
    let outside = tempfile::tempdir().unwrap();
    write(&outside.path().join("secret"), "x", 0o644);
    mkdir(&outside.path().join("dirs/a"), 0o755);
    write(&home.join("moltmate.db"), "", 0o600);
    std::os::unix::fs::symlink(outside.path().join("secret"), home.join("admin.token")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), home.join("moltmate.db-wal"))
        .unwrap();
    std::os::unix::fs::symlink(outside.path().join("dirs"), home.join("users")).unwrap();

    let (code, report, _) = doctor_json(home, &[]);
    assert_eq!(code, 1);
    for id in ["perm.admin_token", "perm.database", "perm.users"] {
        assert_eq!(status(&report, id), "fail", "{:#}", check(&report, id));
        assert!(
            check(&report, id)["detail"]
                .as_str()
                .unwrap()
                .contains("symlink"),
            "{:#}",
            check(&report, id)
        );
    }
    let (_, stdout, stderr) = run_cli(home, &["doctor", "--fix"]);
    assert_eq!(
        mode(&outside.path().join("secret")),
        0o644,
        "{stdout}{stderr}"
    );
    assert_eq!(
        mode(&outside.path().join("dirs")),
        0o755,
        "{stdout}{stderr}"
    );
    assert_eq!(
        mode(&outside.path().join("dirs/a")),
        0o755,
        "{stdout}{stderr}"
    );
}
