//! The process checks against described processes: a hardened systemd service, a bare one,
//! and the three privilege modes.

use moltmate_core::doctor::{CheckStatus, Report};
use moltmate_doctor::{ConfigState, Context, ProcessFacts, SandboxView};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

fn hardened_service() -> ProcessFacts {
    ProcessFacts {
        euid: 990,
        cap_eff: Some(0),
        cap_bnd: Some(0),
        cap_all: Some((1 << 41) - 1),
        no_new_privs: Some(true),
        seccomp: Some(2),
        under_systemd: true,
        root_read_only: true,
        home_writable: true,
        private_tmp: true,
        home_dirs: "hidden",
        in_container: false,
        own_mount_namespace: None,
        docker_daemon_same_mounts: None,
    }
}

async fn report(process: ProcessFacts) -> Report {
    let home = tempfile::tempdir().unwrap();
    let context = Context {
        home: home.path().to_path_buf(),
        config: ConfigState::Failed("not needed here".to_string()),
        sandbox: SandboxView::Running(None),
        sandbox_settings: None,
        repo_dockerfile: PathBuf::from("/nonexistent/Dockerfile.sandbox"),
        process,
        now: SystemTime::now(),
        docker_timeout: Duration::from_secs(2),
    };
    moltmate_doctor::run(&context).await
}

#[tokio::test]
async fn a_hardened_systemd_service_passes() {
    let report = report(hardened_service()).await;
    let check = report.get("systemd.hardening").unwrap();
    assert_eq!(check.status, CheckStatus::Pass, "{check:?}");
    assert!(check.detail.contains("NoNewPrivileges"));
    assert!(check.detail.contains("/ read-only"));
    assert!(check.fix.is_none());
}

#[tokio::test]
async fn missing_hardening_is_named() {
    let bare = ProcessFacts {
        euid: 0,
        cap_eff: Some((1 << 41) - 1),
        no_new_privs: Some(false),
        seccomp: Some(0),
        root_read_only: false,
        private_tmp: false,
        home_dirs: "visible",
        ..hardened_service()
    };
    let report = report(bare).await;
    let check = report.get("systemd.hardening").unwrap();
    assert_eq!(check.status, CheckStatus::Warn);
    for missing in [
        "NoNewPrivileges is off",
        "no seccomp filter",
        "/ is writable",
        "/tmp is shared",
        "/home is visible",
        "every capability is held",
    ] {
        assert!(
            check.detail.contains(missing),
            "{missing}: {}",
            check.detail
        );
    }
    assert!(check
        .fix
        .as_deref()
        .unwrap()
        .contains("deploy/systemd/moltmate.service"));
    let mode = report.get("process.mode").unwrap();
    assert_eq!(mode.status, CheckStatus::Warn);
    assert!(
        mode.detail.starts_with("root under systemd"),
        "{}",
        mode.detail
    );
}

#[tokio::test]
async fn outside_systemd_there_is_nothing_to_check() {
    let report = report(ProcessFacts {
        under_systemd: false,
        ..hardened_service()
    })
    .await;
    let check = report.get("systemd.hardening").unwrap();
    assert_eq!(check.status, CheckStatus::Pass);
    assert!(check.detail.contains("not started by systemd"));
}

#[test]
fn privilege_modes() {
    use moltmate_doctor::PrivilegeMode;
    let facts = hardened_service();
    assert_eq!(facts.mode(false), PrivilegeMode::Unprivileged);
    assert_eq!(facts.mode(true), PrivilegeMode::DockerAccess);
    let root = ProcessFacts { euid: 0, ..facts };
    assert_eq!(root.mode(false), PrivilegeMode::Root);
    assert_eq!(root.mode(true), PrivilegeMode::Root);
}

#[tokio::test]
async fn an_unprivileged_process_without_docker_is_least_privilege() {
    // Whether Docker answers this test is the machine's business; without settings the check
    // asks /var/run/docker.sock, so only look at the mode text when it did not answer.
    let report = report(hardened_service()).await;
    let mode = report.get("process.mode").unwrap();
    if mode.detail.starts_with("unprivileged") {
        assert_eq!(mode.status, CheckStatus::Pass);
    } else {
        assert!(mode.detail.starts_with("docker"), "{}", mode.detail);
        assert_eq!(mode.status, CheckStatus::Warn);
    }
    let privileges = report.get("process.privileges").unwrap();
    assert!(privileges.detail.contains("uid 990"));
    assert!(privileges
        .detail
        .contains("disk caps (loop mounts need CAP_SYS_ADMIN)"));
}

#[tokio::test]
async fn a_failed_config_still_reports_the_rest() {
    let report = report(hardened_service()).await;
    assert_eq!(report.get("config.load").unwrap().status, CheckStatus::Fail);
    assert_eq!(report.worst(), CheckStatus::Fail);
    assert!(
        report.get("gateway.bind").is_none(),
        "config checks skipped"
    );
    for id in [
        "perm.home",
        "secrets.plaintext",
        "process.mode",
        "backup.age",
    ] {
        assert!(report.get(id).is_some(), "{id}");
    }
}
