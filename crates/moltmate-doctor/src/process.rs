//! The process itself: which privilege mode it runs in, what it holds, and the systemd
//! hardening in effect when systemd started it.

use crate::{list_some, Context};
use moltmate_core::doctor::{Check, CheckStatus};
use std::path::Path;

/// The privilege split actually in effect (README, "Privilege modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrivilegeMode {
    /// Effective uid 0: disk caps and everything else work; whoever controls the gateway
    /// controls the host.
    Root,
    /// Not root, but the Docker daemon answers this process: root-equivalent (the Engine API
    /// starts privileged containers with the host's `/` mounted).
    DockerAccess,
    /// Not root and no Docker access: bubblewrap sandboxes only. Least privilege.
    Unprivileged,
}

impl PrivilegeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PrivilegeMode::Root => "root",
            PrivilegeMode::DockerAccess => "docker",
            PrivilegeMode::Unprivileged => "unprivileged",
        }
    }
}

/// What the kernel says about this process. Gathered by [`ProcessFacts::current`]; public so
/// tests can describe a process (a hardened systemd service) that the test runner is not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessFacts {
    pub euid: u32,
    /// `CapEff` of /proc/self/status.
    pub cap_eff: Option<u64>,
    /// `CapBnd`: what the process could ever regain.
    pub cap_bnd: Option<u64>,
    /// Every capability this kernel has (from /proc/sys/kernel/cap_last_cap).
    pub cap_all: Option<u64>,
    pub no_new_privs: Option<bool>,
    /// 0 off, 1 strict, 2 filter.
    pub seccomp: Option<u8>,
    /// `INVOCATION_ID` or `NOTIFY_SOCKET` is set: systemd started us.
    pub under_systemd: bool,
    /// `/` is mounted read-only for this process (ProtectSystem=strict).
    pub root_read_only: bool,
    /// The home can be written.
    pub home_writable: bool,
    /// `/tmp` is a private mount (PrivateTmp=).
    pub private_tmp: bool,
    /// What this process sees of /home: `hidden`, `read-only` or `visible`.
    pub home_dirs: &'static str,
    /// `/.dockerenv` or `/run/.containerenv` exists.
    pub in_container: bool,
    /// Our mount namespace differs from PID 1's (systemd's namespacing options); `None` when
    /// PID 1's cannot be read (not root).
    pub own_mount_namespace: Option<bool>,
    /// The local Docker daemon (by its pid file) shares our mount namespace, so mounts this
    /// process makes (disk caps) are what the daemon binds into containers; `None` when its pid
    /// file or namespace cannot be read (a daemon elsewhere, or not root).
    pub docker_daemon_same_mounts: Option<bool>,
}

fn status_field(status: &str, name: &str) -> Option<String> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

fn read_proc(path: &str) -> String {
    use std::io::Read;
    let mut text = String::new();
    if let Ok(file) = std::fs::File::open(path) {
        let _ = file.take(256 * 1024).read_to_string(&mut text);
    }
    text
}

fn is_read_only(path: &str) -> bool {
    rustix::fs::statvfs(path)
        .is_ok_and(|s| s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
}

impl ProcessFacts {
    /// This process, now.
    pub fn current(home: &Path) -> ProcessFacts {
        let status = read_proc("/proc/self/status");
        let hex =
            |name: &str| status_field(&status, name).and_then(|v| u64::from_str_radix(&v, 16).ok());
        let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
        let mountinfo = read_proc("/proc/self/mountinfo");
        // Fields: id parent major:minor root mount-point ...; PrivateTmp binds
        // /tmp/systemd-private-*/tmp over /tmp.
        let private_tmp = mountinfo.lines().any(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            fields.get(4) == Some(&"/tmp")
                && fields.get(3).is_some_and(|r| r.contains("systemd-private"))
        });
        let home_dirs = if is_read_only("/home") && !is_read_only("/") {
            "read-only"
        } else {
            match std::fs::metadata("/home") {
                Ok(meta) => {
                    use std::os::unix::fs::PermissionsExt;
                    if meta.permissions().mode() & 0o777 == 0 {
                        "hidden"
                    } else if is_read_only("/home") {
                        "read-only"
                    } else {
                        "visible"
                    }
                }
                Err(_) => "hidden",
            }
        };
        let own_mount_namespace = match (
            std::fs::read_link("/proc/self/ns/mnt"),
            std::fs::read_link("/proc/1/ns/mnt"),
        ) {
            (Ok(ours), Ok(init)) => Some(ours != init),
            _ => None,
        };
        let docker_daemon_same_mounts = ["/run/docker.pid", "/var/run/docker.pid"]
            .iter()
            .find_map(|file| read_proc(file).trim().parse::<u32>().ok())
            .and_then(|pid| {
                let theirs = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()?;
                let ours = std::fs::read_link("/proc/self/ns/mnt").ok()?;
                Some(theirs == ours)
            });
        ProcessFacts {
            euid: rustix::process::geteuid().as_raw(),
            cap_eff: hex("CapEff"),
            cap_bnd: hex("CapBnd"),
            cap_all: read_proc("/proc/sys/kernel/cap_last_cap")
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|last| *last < 63)
                .map(|last| (1u64 << (last + 1)) - 1),
            no_new_privs: status_field(&status, "NoNewPrivs").map(|v| v == "1"),
            seccomp: status_field(&status, "Seccomp").and_then(|v| v.parse().ok()),
            under_systemd: set("INVOCATION_ID") || set("NOTIFY_SOCKET"),
            root_read_only: is_read_only("/"),
            home_writable: rustix::fs::access(home, rustix::fs::Access::WRITE_OK).is_ok(),
            private_tmp,
            home_dirs,
            in_container: Path::new("/.dockerenv").exists()
                || Path::new("/run/.containerenv").exists(),
            own_mount_namespace,
            docker_daemon_same_mounts,
        }
    }

    /// The mode, given whether the Docker daemon answers this process.
    pub fn mode(&self, docker_access: bool) -> PrivilegeMode {
        if self.euid == 0 {
            PrivilegeMode::Root
        } else if docker_access {
            PrivilegeMode::DockerAccess
        } else {
            PrivilegeMode::Unprivileged
        }
    }
}

const CAP_NAMES: [&str; 41] = [
    "chown",
    "dac_override",
    "dac_read_search",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_admin",
    "net_raw",
    "ipc_lock",
    "ipc_owner",
    "sys_module",
    "sys_rawio",
    "sys_chroot",
    "sys_ptrace",
    "sys_pacct",
    "sys_admin",
    "sys_boot",
    "sys_nice",
    "sys_resource",
    "sys_time",
    "sys_tty_config",
    "mknod",
    "lease",
    "audit_write",
    "audit_control",
    "setfcap",
    "mac_override",
    "mac_admin",
    "syslog",
    "wake_alarm",
    "block_suspend",
    "audit_read",
    "perfmon",
    "bpf",
    "checkpoint_restore",
];

/// Capability names of a mask; "all" when every known one is set.
pub(crate) fn cap_names(mask: u64) -> String {
    let names: Vec<String> = CAP_NAMES
        .iter()
        .enumerate()
        .filter(|(bit, _)| mask & (1u64 << bit) != 0)
        .map(|(_, name)| (*name).to_string())
        .collect();
    if names.is_empty() {
        "none".to_string()
    } else if names.len() == CAP_NAMES.len() {
        "all".to_string()
    } else if names.len() > CAP_NAMES.len() / 2 {
        let missing: Vec<&str> = CAP_NAMES
            .iter()
            .enumerate()
            .filter(|(bit, _)| mask & (1u64 << bit) == 0)
            .map(|(_, name)| *name)
            .collect();
        format!("all but {}", missing.join(", "))
    } else {
        names.join(", ")
    }
}

const CAP_SYS_ADMIN: u64 = 1 << 21;

pub(crate) async fn check(ctx: &Context, docker_access: bool) -> Vec<Check> {
    vec![mode(ctx, docker_access), privileges(ctx), systemd(ctx)]
}

fn mode(ctx: &Context, docker_access: bool) -> Check {
    const ID: &str = "process.mode";
    const TITLE: &str = "Privilege mode";
    let facts = &ctx.process;
    let place = if facts.in_container {
        " in a container"
    } else if facts.under_systemd {
        " under systemd"
    } else {
        ""
    };
    match facts.mode(docker_access) {
        PrivilegeMode::Root => Check::warn(
            ID,
            TITLE,
            format!("root{place}: disk caps work; whoever takes over the gateway process owns the host"),
            "for least privilege run as the moltmate user with sandbox.backend \"bwrap\" (deploy/systemd/moltmate.service); README \"Privilege modes\"",
        ),
        PrivilegeMode::DockerAccess => Check::warn(
            ID,
            TITLE,
            format!(
                "docker{place}: not root, but the Docker daemon answers this process{}, which is root-equivalent (the Engine API can start a privileged container with the host's / mounted)",
                if facts.in_container { " through a socket mounted into its container" } else { "" }
            ),
            "accept it knowingly (README \"Privilege modes\"), or run unprivileged with sandbox.backend \"bwrap\" and no access to the Docker socket",
        ),
        PrivilegeMode::Unprivileged => Check::pass(
            ID,
            TITLE,
            format!("unprivileged{place}: no root, no Docker access; sandboxes are bubblewrap namespaces"),
        ),
    }
}

fn privileges(ctx: &Context) -> Check {
    const ID: &str = "process.privileges";
    const TITLE: &str = "What the process holds, and what needs root";
    let facts = &ctx.process;
    let caps = facts
        .cap_eff
        .map(cap_names)
        .unwrap_or_else(|| "unknown".to_string());
    let who = if facts.euid == 0 {
        "uid 0 (root)".to_string()
    } else {
        format!("uid {}", facts.euid)
    };
    let has_sys_admin = facts.cap_eff.is_some_and(|c| c & CAP_SYS_ADMIN != 0);
    let mut needs = Vec::new();
    if !has_sys_admin {
        needs.push("disk caps (loop mounts need CAP_SYS_ADMIN)".to_string());
    }
    if facts.euid != 0 {
        needs.push("building the base image (debootstrap)".to_string());
        needs.push("handing homes to the sandbox uid (chown)".to_string());
    }
    let detail = if needs.is_empty() {
        format!("{who}; effective capabilities: {caps}")
    } else {
        format!(
            "{who}; effective capabilities: {caps}; not available without root: {}",
            needs.join(", ")
        )
    };
    Check::pass(ID, TITLE, detail)
}

fn systemd(ctx: &Context) -> Check {
    const ID: &str = "systemd.hardening";
    const TITLE: &str = "systemd hardening in effect";
    let facts = &ctx.process;
    if !facts.under_systemd {
        return Check::pass(
            ID,
            TITLE,
            "not started by systemd (nothing to check here; /admin shows the serving process, and deploy/systemd/moltmate.service has the hardening)",
        );
    }
    let mut have = Vec::new();
    let mut missing = Vec::new();
    let mut note = |ok: bool, good: &str, bad: &str| {
        if ok {
            have.push(good.to_string());
        } else {
            missing.push(bad.to_string());
        }
    };
    note(
        facts.no_new_privs == Some(true),
        "NoNewPrivileges",
        "NoNewPrivileges is off",
    );
    note(
        facts.seccomp == Some(2),
        "a seccomp filter",
        "no seccomp filter (SystemCallFilter=)",
    );
    note(
        facts.root_read_only,
        "/ read-only",
        "/ is writable (ProtectSystem=strict)",
    );
    note(
        facts.home_writable,
        "the home writable",
        "the home is not writable (ReadWritePaths=/StateDirectory=)",
    );
    note(
        facts.private_tmp,
        "a private /tmp",
        "/tmp is shared (PrivateTmp=yes)",
    );
    note(
        facts.home_dirs != "visible",
        "/home hidden",
        "/home is visible (ProtectHome=yes)",
    );
    let full_caps = match (facts.cap_eff, facts.cap_all) {
        (Some(eff), Some(all)) => eff & all == all,
        (Some(eff), None) => cap_names(eff) == "all",
        _ => false,
    };
    note(
        !full_caps,
        "a reduced capability set",
        "every capability is held (CapabilityBoundingSet=)",
    );
    let status = if missing.is_empty() {
        CheckStatus::Pass
    } else {
        CheckStatus::Warn
    };
    let detail = if missing.is_empty() {
        format!("in effect: {}", have.join(", "))
    } else {
        format!(
            "missing: {}; in effect: {}",
            list_some(&missing, 8),
            if have.is_empty() {
                "nothing".to_string()
            } else {
                have.join(", ")
            }
        )
    };
    Check::new(
        ID,
        TITLE,
        status,
        detail,
        Some(
            "install deploy/systemd/moltmate.service (and the drop-in of your mode); `systemctl cat moltmate` shows what is in effect".to_string(),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names() {
        assert_eq!(cap_names(0), "none");
        assert_eq!(cap_names((1 << 41) - 1), "all");
        assert_eq!(cap_names(1 | CAP_SYS_ADMIN), "chown, sys_admin");
        assert_eq!(
            cap_names(((1 << 41) - 1) & !CAP_SYS_ADMIN),
            "all but sys_admin"
        );
    }

    #[test]
    fn status_fields() {
        let status = "Name:\tx\nNoNewPrivs:\t1\nSeccomp:\t2\nCapEff:\t0000000000000000\n";
        assert_eq!(status_field(status, "NoNewPrivs").as_deref(), Some("1"));
        assert_eq!(status_field(status, "Seccomp").as_deref(), Some("2"));
        assert_eq!(
            status_field(status, "CapEff").as_deref(),
            Some("0000000000000000")
        );
        assert_eq!(status_field(status, "Missing"), None);
    }
}
