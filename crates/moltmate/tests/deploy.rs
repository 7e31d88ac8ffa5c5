//! The deployment files in `deploy/`: the systemd unit and its mode drop-ins pass
//! `systemd-analyze verify`, the compose file parses and routes only what it should, its
//! example config passes `moltmate doctor`, and the gateway image builds offline and runs
//! `moltmate --version` and `moltmate doctor --json` against the local dockerd.
//!
//! Tools these tests need (systemd-analyze, docker-compose or python3-yaml, Docker) print
//! `SKIP: <reason>` when missing, unless `MOLTMATE_REQUIRE_SANDBOX=1` (set by `.ci/run`, which
//! installs them), which turns a skip into a failure.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn skip_or_fail(reason: &str) {
    if std::env::var("MOLTMATE_REQUIRE_SANDBOX").as_deref() == Ok("1") {
        panic!("required but unavailable: {reason}");
    }
    eprintln!("SKIP: {reason}");
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn deploy(path: &str) -> PathBuf {
    repo().join("deploy").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn has(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

const MODES: [Option<&str>; 4] = [
    None,
    Some("moltmate-docker.conf"),
    Some("moltmate-root.conf"),
    Some("moltmate-root-docker.conf"),
];

/// A unit directory with moltmate.service (ExecStart pointed at the binary under test: verify
/// wants it to exist) and the drop-in of `mode`.
fn unit_dir(mode: Option<&str>, extra_drop_in: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let unit = read(&deploy("systemd/moltmate.service")).replace(
        "ExecStart=/usr/local/bin/moltmate serve",
        &format!("ExecStart={} serve", common::binary().display()),
    );
    assert!(unit.contains(&common::binary().display().to_string()));
    std::fs::write(dir.path().join("moltmate.service"), unit).unwrap();
    let drop_ins = dir.path().join("moltmate.service.d");
    std::fs::create_dir(&drop_ins).unwrap();
    if let Some(mode) = mode {
        std::fs::copy(deploy(&format!("systemd/{mode}")), drop_ins.join(mode)).unwrap();
    }
    if let Some(text) = extra_drop_in {
        std::fs::write(drop_ins.join("zz-extra.conf"), text).unwrap();
    }
    dir
}

/// `systemd-analyze <args> moltmate.service` with the unit directory on the unit path (by
/// name, so drop-ins are read); (success, stdout + stderr).
fn analyze(dir: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new("systemd-analyze")
        .args(args)
        .arg("moltmate.service")
        .current_dir(dir)
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()))
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn the_systemd_unit_and_every_mode_pass_systemd_analyze_verify() {
    if !has("systemd-analyze") {
        return skip_or_fail("systemd-analyze is not installed (apt-get install systemd)");
    }
    for mode in MODES {
        let dir = unit_dir(mode, None);
        let (ok, output) = analyze(dir.path(), &["verify"]);
        // verify exits 0 on unknown keys and bad values (it only warns), so any output fails.
        assert!(
            ok && output.trim().is_empty(),
            "{mode:?}: systemd-analyze verify said:\n{output}"
        );
    }
}

#[test]
fn systemd_analyze_verify_reads_the_drop_ins() {
    if !has("systemd-analyze") {
        return skip_or_fail("systemd-analyze is not installed (apt-get install systemd)");
    }
    let dir = unit_dir(None, Some("[Service]\nProtectSystem=bogus\nNoSuchKey=1\n"));
    let (_, output) = analyze(dir.path(), &["verify"]);
    assert!(output.contains("NoSuchKey"), "{output}");
    assert!(output.contains("bogus"), "{output}");
}

fn exposure(dir: &Path) -> f64 {
    let (_, output) = analyze(dir, &["security", "--offline=yes", "--no-pager"]);
    let line = output
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{output}"));
    line.split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read {line:?}"))
}

#[test]
fn systemd_exposure_is_low_and_grows_with_each_privileged_mode() {
    if !has("systemd-analyze") {
        return skip_or_fail("systemd-analyze is not installed (apt-get install systemd)");
    }
    let scores: Vec<f64> = MODES
        .iter()
        .map(|mode| exposure(unit_dir(*mode, None).path()))
        .collect();
    eprintln!("systemd-analyze security exposure: base, docker, root, root-docker = {scores:?}");
    assert!(
        scores[0] <= 3.0,
        "the least-privilege unit scores {}",
        scores[0]
    );
    assert!(scores[2] > scores[0] && scores[3] > scores[2], "{scores:?}");
}

#[test]
fn the_unit_has_the_hardening_of_the_security_considerations() {
    let unit = read(&deploy("systemd/moltmate.service"));
    for line in [
        "User=moltmate",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "StateDirectory=moltmate",
        "StateDirectoryMode=0700",
        "UMask=0077",
        "Environment=MOLTMATE_HOME=/var/lib/moltmate",
        "EnvironmentFile=-/etc/moltmate/moltmate.env",
        "SystemCallFilter=",
    ] {
        assert!(unit.lines().any(|l| l.starts_with(line)), "{line}");
    }
    assert!(
        unit.lines().any(|l| l == "CapabilityBoundingSet="),
        "no capabilities at all"
    );
    assert!(
        !unit.contains("ReadWritePaths=/"),
        "only the state directory is writable"
    );
    let root = read(&deploy("systemd/moltmate-root.conf"));
    assert!(root.contains("CapabilityBoundingSet=CAP_SYS_ADMIN "));
    assert!(
        !root.contains("ProtectSystem=no"),
        "root + bwrap keeps the namespacing"
    );
    let root_docker = read(&deploy("systemd/moltmate-root-docker.conf"));
    assert!(root_docker.contains("ProtectSystem=no"));
    let docker = read(&deploy("systemd/moltmate-docker.conf"));
    assert!(docker.contains("ROOT-EQUIVALENT") && docker.contains("SupplementaryGroups=docker"));
}

/// The compose file as compose resolves it (docker-compose when installed), else as YAML;
/// as JSON.
fn compose_json() -> Option<Value> {
    let file = deploy("compose/docker-compose.yml");
    let yaml = if has("docker-compose") {
        let output = Command::new("docker-compose")
            .arg("-f")
            .arg(&file)
            .args(["config"])
            .envs([
                ("DOMAIN", "example.com"),
                ("ANTHROPIC_API_KEY", "k"),
                ("MOLTMATE_GATEWAY_TOKEN", "t"),
                ("DOCKER_GID", "998"),
                ("TRAEFIK_IP", "172.18.0.2"),
            ])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "docker-compose config: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    } else {
        read(&file)
    };
    let output = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take()?.write_all(yaml.as_bytes()).ok()?;
            child.wait_with_output().ok()
        })?;
    if !output.status.success() {
        return None;
    }
    serde_json::from_slice(&output.stdout).ok()
}

#[test]
fn the_compose_file_routes_only_the_needed_paths_over_tls() {
    let Some(compose) = compose_json() else {
        return skip_or_fail("neither docker-compose nor python3-yaml can read YAML here");
    };
    let service = &compose["services"]["moltmate"];
    assert!(service["image"]
        .as_str()
        .unwrap()
        .starts_with("moltmate-gateway:"));
    assert_eq!(service["user"], "10001:10001");
    assert_eq!(service["read_only"], true);
    assert_eq!(service["cap_drop"], serde_json::json!(["ALL"]));
    let labels: Vec<String> = match &service["labels"] {
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect(),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
            .collect(),
        other => panic!("labels: {other}"),
    };
    let label = |key: &str| {
        labels
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no label {key} in {labels:#?}"))
            .to_string()
    };
    for router in ["moltmate", "moltmate-admin"] {
        assert_eq!(label(&format!("traefik.http.routers.{router}.tls")), "true");
        assert_eq!(
            label(&format!("traefik.http.routers.{router}.entrypoints")),
            "websecure"
        );
    }
    assert_eq!(
        label("traefik.http.routers.moltmate-admin.middlewares"),
        "admin-secure@file"
    );
    let rules: String = labels
        .iter()
        .filter(|l| l.contains(".rule="))
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    for path in ["/login", "/v1/", "/assets/", "/api/", "/admin"] {
        assert!(rules.contains(&format!("`{path}`")), "{path} is routed");
    }
    for path in ["/metrics", "/healthz"] {
        assert!(!rules.contains(path), "{path} is not routed");
    }
    assert!(!rules.contains("PathPrefix(`/`)"), "no catch-all route");
    assert_eq!(
        label("traefik.http.services.moltmate.loadbalancer.server.port"),
        "18790"
    );
    // The Docker socket is mounted, and the file says loudly what that means.
    let volumes = service["volumes"].to_string();
    assert!(volumes.contains("/var/run/docker.sock"), "{volumes}");
    let text = read(&deploy("compose/docker-compose.yml"));
    assert!(text.contains("ROOT-EQUIVALENT"));
}

/// The compose example config with the compose environment passes doctor's config checks.
#[test]
fn the_compose_example_config_passes_doctor() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    std::fs::copy(deploy("compose/moltmate.json"), home.join("moltmate.json")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(
        home.join("moltmate.json"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let output = Command::new(common::binary())
        .arg("--home")
        .arg(home)
        .args(["doctor", "--json"])
        .envs([
            ("MOLTMATE_GATEWAY_TOKEN", "0123456789abcdef0123456789abcdef"),
            ("MOLTMATE_PUBLIC_URL", "https://moltbot.example.com"),
            ("TRAEFIK_IP", "172.18.0.2"),
            ("ANTHROPIC_API_KEY", "sk-ant-test"),
            ("TELEGRAM_BOT_TOKEN", "123456:test"),
        ])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let status = |id: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .map(|c| c["status"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no {id}: {report:#}"))
    };
    for id in [
        "config.load",
        "secrets.plaintext",
        "gateway.bind",
        "gateway.tls",
        "gateway.token",
        "gateway.proxy",
        "channels.dm_policy",
        "exec.security",
        "sandbox.network",
        "logging.tools",
    ] {
        assert_eq!(status(id), "pass", "{id}: {report:#}");
    }
}

/// Docker: `moltmate image build` makes the gateway image from the debootstrap base and this
/// binary; inside it `--version` and `doctor --json` run, and doctor reports the Docker socket
/// when it is mounted in.
#[test]
fn the_gateway_image_builds_offline_and_runs_doctor() {
    let docker_up = Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    if !docker_up {
        return skip_or_fail("docker does not answer");
    }
    let home = tempfile::tempdir().unwrap();
    let tag = format!("moltmate-gateway-doctortest-{}:t", std::process::id());
    let (status, stdout, stderr) = common::run_cli(
        home.path(),
        &[
            "image",
            "build",
            "--tag",
            &tag,
            "--binary",
            &common::binary().display().to_string(),
        ],
    );
    let remove = || {
        let _ = Command::new("docker").args(["rmi", "-f", &tag]).output();
    };
    if !status.success() {
        remove();
        panic!("image build failed:\n{stdout}\n{stderr}");
    }
    let run = |args: &[&str], extra: &[&str]| {
        Command::new("docker")
            .args(["run", "--rm", "--network", "none"])
            .args(extra)
            .arg(&tag)
            .args(args)
            .output()
            .unwrap()
    };
    let version = run(&["--version"], &[]);
    let doctor = run(&["doctor", "--json"], &[]);
    let socket_gid = std::fs::metadata("/var/run/docker.sock").map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.gid().to_string()
    });
    let with_socket = socket_gid.as_ref().ok().map(|gid| {
        run(
            &["doctor", "--json"],
            &[
                "-v",
                "/var/run/docker.sock:/var/run/docker.sock",
                "--group-add",
                gid,
            ],
        )
    });
    let labels = Command::new("docker")
        .args([
            "image",
            "inspect",
            "-f",
            "{{json .Config.Labels}} {{.Config.User}}",
            &tag,
        ])
        .output()
        .unwrap();
    remove();

    assert!(
        String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")),
        "{version:?}"
    );
    let inspect = String::from_utf8_lossy(&labels.stdout).to_string();
    assert!(inspect.contains("moltmate.dockerfile-sha256"), "{inspect}");
    assert!(
        inspect.trim_end().ends_with("moltmate"),
        "runs as moltmate: {inspect}"
    );

    let mode_of = |output: &std::process::Output| -> (String, String) {
        let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "doctor --json in the image ({e}): {}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        });
        let mode = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == "process.mode")
            .unwrap()
            .clone();
        (
            mode["status"].as_str().unwrap().to_string(),
            mode["detail"].as_str().unwrap().to_string(),
        )
    };
    let (status, detail) = mode_of(&doctor);
    assert_eq!(status, "pass", "{detail}");
    assert!(
        detail.starts_with("unprivileged in a container"),
        "{detail}"
    );
    if let Some(with_socket) = with_socket {
        let (status, detail) = mode_of(&with_socket);
        assert_eq!(status, "warn", "{detail}");
        assert!(
            detail.contains("through a socket mounted into its container")
                && detail.contains("root-equivalent"),
            "{detail}"
        );
    }
}
