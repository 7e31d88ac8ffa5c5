//! The bubblewrap backend against real bubblewrap: isolation, limits, timeouts, fairness.
//!
//! Without bwrap (or without namespace support) every test prints `SKIP: <reason>` and passes,
//! unless `MOLTMATE_REQUIRE_SANDBOX=1`, which turns the skip into a failure.

use moltmate_core::sandbox::{
    ExecCommand, ExecOutput, ExecRequest, Sandbox, SandboxError, SandboxIds, SandboxLimits,
    SandboxProfile, WorkspaceAccess,
};
use moltmate_core::UserId;
use moltmate_sandbox::bwrap::BwrapSandbox;
use moltmate_sandbox::{BackendChoice, SandboxScope, SandboxSettings};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct Fixture {
    sandbox: BwrapSandbox,
    root: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl Fixture {
    /// `user`'s sandbox ids in this fixture, as a root gateway would allocate them: distinct
    /// per user and per fixture (the fixture root is random).
    fn ids(&self, user: &str) -> SandboxIds {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(format!("{}/{user}", self.root.display()).as_bytes());
        let n = u32::from_le_bytes([digest[0], digest[1], digest[2], 0]);
        SandboxIds::same(2_110_000_000 + n % 10_000_000)
    }

    fn home(&self, user: &str) -> PathBuf {
        let home = self.root.join("users").join(user);
        std::fs::create_dir_all(&home).unwrap();
        home
    }

    fn request(&self, user: &str, command: &str) -> ExecRequest {
        ExecRequest {
            user: UserId::new(user).unwrap(),
            home: self.home(user),
            family: None,
            ids: self.ids(user),
            family_gid: None,
            session_id: "s1".into(),
            command: ExecCommand::Shell(command.into()),
            timeout: Duration::from_secs(20),
            // No disk image (a loop mount per test home); the disk test opts in.
            profile: SandboxProfile {
                limits: SandboxLimits {
                    disk_bytes: 0,
                    ..SandboxLimits::default()
                },
                ..SandboxProfile::default()
            },
        }
    }

    async fn run(&self, user: &str, command: &str) -> ExecOutput {
        self.sandbox
            .exec(self.request(user, command))
            .await
            .unwrap()
    }
}

fn temp_root(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "moltmate-bwrap-{tag}-{:016x}",
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn settings(root: &Path, scope: SandboxScope) -> SandboxSettings {
    SandboxSettings {
        backend: BackendChoice::Bwrap,
        scope,
        image: String::new(),
        docker_host: None,
        prune_idle: Duration::from_secs(3600),
        state_dir: root.join("sandboxes"),
        allowed_domains: Vec::new(),
        config_digest: String::new(),
    }
}

fn skip(reason: String) -> Option<Fixture> {
    if std::env::var("MOLTMATE_REQUIRE_SANDBOX").as_deref() == Ok("1") {
        panic!("MOLTMATE_REQUIRE_SANDBOX=1 but bubblewrap is unusable: {reason}");
    }
    println!("SKIP: {reason}");
    None
}

async fn fixture_with(tag: &str, scope: SandboxScope) -> Option<Fixture> {
    let root = temp_root(tag);
    let sandbox = match BwrapSandbox::new(&settings(&root, scope), None) {
        Ok(s) => s,
        Err(e) => return skip(e.to_string()),
    };
    if let Err(e) = sandbox.probe().await {
        return skip(e.to_string());
    }
    Some(Fixture { sandbox, root })
}

async fn fixture(tag: &str) -> Option<Fixture> {
    fixture_with(tag, SandboxScope::Session).await
}

/// Host processes whose command line contains `marker`.
fn host_processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    let me = std::process::id().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(marker) {
                found.push(format!("{name}: {cmdline}"));
            }
        }
    }
    found
}

#[tokio::test]
async fn runs_as_the_users_own_uid_in_workspace_with_the_home() {
    let Some(f) = fixture("ident").await else {
        return;
    };
    std::fs::write(f.home("anna").join("hello.txt"), "hi from home").unwrap();
    let out = f
        .run(
            "anna",
            "id -u; id -g; pwd; echo $HOME; cat hello.txt; echo new > made.txt",
        )
        .await;
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    let ids = f.ids("anna");
    assert_eq!(
        out.stdout,
        format!(
            "{}\n{}\n/workspace\n/workspace\nhi from home",
            ids.uid, ids.gid
        )
    );
    assert_eq!(
        std::fs::read_to_string(f.home("anna").join("made.txt")).unwrap(),
        "new\n"
    );
    // A root gateway drops to the user's own host uid: what the sandbox makes is theirs.
    if rustix::process::geteuid().is_root() {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(f.home("anna").join("made.txt")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (ids.uid, ids.gid));
        assert_eq!(meta.mode() & 0o777, 0o660, "umask 007");
    }

    let mut argv = f.request("anna", "");
    argv.command = ExecCommand::Argv(vec!["cat".into(), "hello.txt".into()]);
    let out = f.sandbox.exec(argv).await.unwrap();
    assert_eq!(out.stdout, "hi from home");
}

#[tokio::test]
async fn host_secrets_and_other_homes_are_invisible() {
    let Some(f) = fixture("secrets").await else {
        return;
    };
    let other = f.home("bob");
    std::fs::write(other.join("diary.txt"), "secret").unwrap();
    // (/tmp exists inside as the sandbox's own tmpfs, so a gateway HOME of /tmp says nothing.)
    let gateway_home = std::env::var("HOME")
        .ok()
        .filter(|h| h != "/tmp" && h != "/")
        .unwrap_or_else(|| "/root".into());
    let paths = [
        "/etc/shadow".to_string(),
        "/root".to_string(),
        "/home".to_string(),
        gateway_home,
        other.display().to_string(),
        f.root.display().to_string(),
        "/var/run/docker.sock".to_string(),
        "/run/docker.sock".to_string(),
        "/proc/1/root/etc/shadow".to_string(),
        "/proc/1/root/root".to_string(),
        "/sys/fs/cgroup".to_string(),
    ];
    let script: String = paths
        .iter()
        .map(|p| format!("test -e '{p}' && echo 'PRESENT {p}'; "))
        .collect();
    let out = f.run("anna", &format!("{script} echo done")).await;
    assert_eq!(out.stdout, "done\n", "visible host paths: {out:?}");
    // The sandbox's pid namespace holds only its own processes.
    let out = f.run("anna", "ls /proc | grep -c '^[0-9]'").await;
    let count: u32 = out.stdout.trim().parse().unwrap();
    assert!(count <= 5, "too many processes visible: {count}");
}

#[tokio::test]
async fn environment_holds_no_gateway_secrets() {
    let Some(f) = fixture("env").await else {
        return;
    };
    // Only this test sets it; other tests never read it.
    std::env::set_var("ANTHROPIC_API_KEY", "sk-ant-test-secret-value");
    let out = f.run("anna", "env").await;
    assert!(!out.stdout.contains("sk-ant"), "{}", out.stdout);
    assert!(!out.stdout.contains("ANTHROPIC"), "{}", out.stdout);
    let mut names: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.split('=').next())
        .collect();
    names.sort();
    // sh adds PWD itself.
    names.retain(|n| *n != "PWD" && *n != "SHLVL" && *n != "_" && *n != "OLDPWD");
    assert_eq!(names, ["HOME", "LANG", "PATH"]);
}

#[tokio::test]
async fn no_network_even_to_the_host_loopback() {
    let Some(f) = fixture("net").await else {
        return;
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let out = f
        .run(
            "anna",
            &format!(
                "python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)\" && echo CONNECTED; \
                 python3 -c \"import socket; socket.getaddrinfo('example.com', 80)\" 2>/dev/null && echo RESOLVED; echo end"
            ),
        )
        .await;
    assert_eq!(out.stdout, "end\n", "{out:?}");
    assert!(
        listener.accept().is_err(),
        "the host listener got a connection"
    );
}

#[tokio::test]
async fn seccomp_blocks_ptrace_mount_and_namespaces() {
    let Some(f) = fixture("seccomp").await else {
        return;
    };
    let py = format!(
        r#"
import ctypes, os, threading
libc = ctypes.CDLL(None, use_errno=True)
def check(name, rc):
    print(name, rc, os.strerror(ctypes.get_errno()) if rc != 0 else "ok", flush=True)
check("ptrace", libc.ptrace(0, 0, 0, 0))
check("mount", libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
check("unshare", libc.unshare(0x10000000))
check("keyctl", libc.syscall({keyctl}, 0, 0, 0, 0))
check("bpf", libc.syscall({bpf}, 0, 0, 0))
check("perf", libc.syscall({perf}, 0, 0, 0, 0, 0))
check("userfaultfd", libc.syscall({uffd}, 0))
check("clone-newuser", libc.syscall({clone}, 0x10000000 | 17, 0, 0, 0, 0))
# Threads still work: clone3 answers ENOSYS and libc falls back to clone.
t = threading.Thread(target=lambda: print("thread ok", flush=True)); t.start(); t.join()
"#,
        keyctl = libc::SYS_keyctl,
        bpf = libc::SYS_bpf,
        perf = libc::SYS_perf_event_open,
        uffd = libc::SYS_userfaultfd,
        clone = libc::SYS_clone,
    );
    std::fs::write(f.home("anna").join("sc.py"), py).unwrap();
    let out = f.run("anna", "python3 sc.py").await;
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    assert!(out.stdout.contains("thread ok"), "{out:?}");
    for name in [
        "ptrace",
        "mount",
        "unshare",
        "keyctl",
        "bpf",
        "perf",
        "userfaultfd",
        "clone-newuser",
    ] {
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default();
        assert!(
            line.contains("-1") && line.contains("not permitted"),
            "{name}: {line:?} in {out:?}"
        );
    }
}

#[tokio::test]
async fn symlinks_made_inside_stay_confined() {
    let Some(f) = fixture("symlink").await else {
        return;
    };
    let out = f
        .run(
            "anna",
            "ln -s /etc/shadow s1; ln -s / s2; ln -s ../../../../../../etc/passwd s3; \
             cat s1 2>/dev/null && echo READ-SHADOW; ls s2/ | tr '\\n' ' '; echo; cat s3",
        )
        .await;
    assert!(!out.stdout.contains("READ-SHADOW"), "{out:?}");
    assert!(
        !out.stdout.contains("root:x:0:0:root:/root"),
        "host passwd leaked: {out:?}"
    );
    assert!(
        out.stdout
            .contains(&format!("agent:x:{}:", f.ids("anna").uid)),
        "{out:?}"
    );
    assert!(!out.stdout.contains("home"), "{out:?}");
}

#[tokio::test]
async fn workspace_access_ro_and_none() {
    let Some(f) = fixture("access").await else {
        return;
    };
    std::fs::write(f.home("anna").join("keep.txt"), "keep").unwrap();
    let mut req = f.request("anna", "cat keep.txt; echo x > new.txt && echo WROTE");
    req.profile.workspace_access = WorkspaceAccess::Ro;
    let out = f.sandbox.exec(req).await.unwrap();
    assert_eq!(out.stdout, "keep", "{out:?}");
    assert!(!f.home("anna").join("new.txt").exists());

    let mut req = f.request("anna", "ls; echo persisted > s.txt");
    req.profile.workspace_access = WorkspaceAccess::None;
    let out = f.sandbox.exec(req).await.unwrap();
    assert_eq!(out.stdout, "", "scratch must not show the home: {out:?}");
    let mut req = f.request("anna", "cat s.txt");
    req.profile.workspace_access = WorkspaceAccess::None;
    let out = f.sandbox.exec(req).await.unwrap();
    assert_eq!(
        out.stdout, "persisted\n",
        "session scratch persists between calls"
    );
    f.sandbox
        .end_session(&UserId::new("anna").unwrap(), "s1")
        .await
        .unwrap();
    let mut req = f.request("anna", "cat s.txt");
    req.profile.workspace_access = WorkspaceAccess::None;
    let out = f.sandbox.exec(req).await.unwrap();
    assert_eq!(out.stdout, "", "end_session drops the scratch");
}

#[tokio::test]
async fn task_scope_scratch_is_fresh_each_call() {
    let Some(f) = fixture_with("task", SandboxScope::Task).await else {
        return;
    };
    for _ in 0..2 {
        let mut req = f.request("anna", "ls; echo x > t.txt");
        req.profile.workspace_access = WorkspaceAccess::None;
        let out = f.sandbox.exec(req).await.unwrap();
        assert_eq!(out.stdout, "");
    }
}

#[tokio::test]
async fn sleep_is_killed_at_the_timeout_and_leaves_no_orphan() {
    let Some(f) = fixture("sleep").await else {
        return;
    };
    let marker = format!("600.{}", rand::random::<u32>() % 1_000_000 + 1);
    let mut req = f.request("anna", &format!("sleep {marker} & sleep {marker}"));
    req.timeout = Duration::from_secs(2);
    let started = Instant::now();
    let out = f.sandbox.exec(req).await.unwrap();
    assert!(out.timed_out, "{out:?}");
    assert_eq!(out.exit_code, None);
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(host_processes_with(&marker), Vec::<String>::new());
}

/// `end_user` (the user was removed or reset) kills every command of that user running now —
/// the command and what it left in the background — and none of another user's.
#[tokio::test]
async fn end_user_kills_the_users_running_commands_and_no_one_elses() {
    let Some(f) = fixture("end-user").await else {
        return;
    };
    let f = std::sync::Arc::new(f);
    let marker = format!("300.{}", rand::random::<u32>() % 1_000_000 + 1);
    let other = format!("301.{}", rand::random::<u32>() % 1_000_000 + 1);
    let mut runs = Vec::new();
    for (user, m) in [("anna", &marker), ("anna", &marker), ("bob", &other)] {
        let f = std::sync::Arc::clone(&f);
        let command = format!("sleep {m} & sleep {m}");
        let user = user.to_string();
        runs.push(tokio::spawn(async move {
            let mut req = f.request(&user, &command);
            req.timeout = Duration::from_secs(60);
            f.sandbox.exec(req).await
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while host_processes_with(&marker).len() < 4 || host_processes_with(&other).len() < 2 {
        assert!(Instant::now() < deadline, "the commands never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    f.sandbox
        .end_user(&UserId::new("anna").unwrap())
        .await
        .unwrap();
    let bob = runs.pop().unwrap();
    for run in runs {
        let result = run.await.unwrap();
        assert!(
            matches!(result, Err(SandboxError::Interrupted { .. })),
            "{result:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(host_processes_with(&marker), Vec::<String>::new());
    assert!(!bob.is_finished(), "bob's command was stopped too");
    assert!(
        !host_processes_with(&other).is_empty(),
        "bob's command is untouched"
    );
    f.sandbox
        .end_user(&UserId::new("bob").unwrap())
        .await
        .unwrap();
    assert!(bob.await.unwrap().is_err());
    // Ending a user with nothing running is a no-op; later commands of the id run normally.
    f.sandbox
        .end_user(&UserId::new("anna").unwrap())
        .await
        .unwrap();
    assert_eq!(f.run("anna", "echo again").await.stdout, "again\n");
}

#[tokio::test]
async fn cpu_spin_times_out() {
    let Some(f) = fixture("spin").await else {
        return;
    };
    let mut req = f.request("anna", "while :; do :; done");
    req.timeout = Duration::from_secs(2);
    let out = f.sandbox.exec(req).await.unwrap();
    assert!(out.timed_out);
    assert!(out.duration < Duration::from_secs(6), "{:?}", out.duration);
}

#[tokio::test]
async fn output_flood_is_capped() {
    let Some(f) = fixture("flood").await else {
        return;
    };
    let mut req = f.request(
        "anna",
        "head -c 200000000 /dev/zero | tr '\\0' a; echo done >&2",
    );
    req.profile.limits.output_bytes = 4096;
    req.timeout = Duration::from_secs(60);
    let started = Instant::now();
    let out = f.sandbox.exec(req).await.unwrap();
    assert!(out.truncated);
    assert!(!out.timed_out, "{:?}", started.elapsed());
    assert_eq!(out.stdout.len() + out.stderr.len(), 4096);
    assert!(out.stdout.bytes().all(|b| b == b'a'));
}

#[tokio::test]
async fn disk_fill_is_stopped() {
    let Some(f) = fixture("disk").await else {
        return;
    };
    let home = f.home("anna");
    // One file: RLIMIT_FSIZE stops it at the cap.
    let mut req = f.request("anna", "head -c 50000000 /dev/zero > big; echo rc=$?");
    req.profile.limits.disk_bytes = 16 * 1024 * 1024;
    let out = f.sandbox.exec(req).await.unwrap();
    let size = std::fs::metadata(home.join("big"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(size <= 16 * 1024 * 1024, "wrote {size} bytes: {out:?}");
    // Many files: the per-user volume (when this host can loop-mount) stops the total.
    let mut req = f.request(
        "anna",
        "rm -f big; for i in 1 2 3 4 5; do head -c 8000000 /dev/zero > f$i; done; echo done",
    );
    req.profile.limits.disk_bytes = 16 * 1024 * 1024;
    let out = f.sandbox.exec(req).await.unwrap();
    let total = file_bytes(&home);
    if moltmate_sandbox::disk::can_enforce() {
        assert!(total <= 16 * 1024 * 1024, "wrote {total} bytes: {out:?}");
    } else {
        println!("SKIP (volume part): disk caps need root; wrote {total} bytes");
    }
    // tmpfs /tmp is size-capped too.
    let mut req = f.request(
        "anna",
        "head -c 50000000 /dev/zero > /tmp/big; ls -l /tmp/big | awk '{print $5}'",
    );
    req.profile.limits.tmp_bytes = 2 * 1024 * 1024;
    let out = f.sandbox.exec(req).await.unwrap();
    let written: u64 = out.stdout.trim().parse().unwrap_or(0);
    assert!(written <= 2 * 1024 * 1024, "{out:?}");
    moltmate_sandbox::disk::release_user_volume(&home).unwrap();
}

/// The family folder is shared by its members and writable at `/family`: a member filling it
/// must hit the cap of the family's own volume, not the host's disk.
#[tokio::test]
async fn family_folder_fill_is_stopped() {
    let Some(f) = fixture("famdisk").await else {
        return;
    };
    if !moltmate_sandbox::disk::can_enforce() {
        println!("SKIP: disk caps need root");
        return;
    }
    let family = f.root.join("families").join("smiths");
    std::fs::create_dir_all(&family).unwrap();
    std::fs::write(family.join("FAMILY.md"), "We are the Smiths.").unwrap();
    let mut req = f.request(
        "anna",
        "cat /family/FAMILY.md; for i in 1 2 3 4 5; do head -c 8000000 /dev/zero > /family/f$i; done; echo done",
    );
    req.family = Some(family.clone());
    let family_ids = f.ids("smiths");
    req.family_gid = Some(family_ids.gid);
    req.profile.limits.disk_bytes = 16 * 1024 * 1024;
    let out = f.sandbox.exec(req).await.unwrap();
    assert!(
        out.stdout.contains("We are the Smiths."),
        "migrated: {out:?}"
    );
    {
        // The family's volume belongs to the family's id, shared by its group.
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&family).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (family_ids.uid, family_ids.gid, 0o2770)
        );
        let moved = std::fs::metadata(family.join("FAMILY.md")).unwrap();
        assert_eq!((moved.gid(), moved.mode() & 0o070), (family_ids.gid, 0o060));
    }
    let total = file_bytes(&family);
    assert!(total <= 16 * 1024 * 1024, "wrote {total} bytes: {out:?}");
    assert!(out.stderr.contains("No space left"), "{out:?}");
    moltmate_sandbox::disk::release_user_volume(&family).unwrap();
    let _ = moltmate_sandbox::disk::release_user_volume(&f.home("anna"));
}

#[tokio::test]
async fn memory_bomb_fails_inside_the_sandbox() {
    let Some(f) = fixture("mem").await else {
        return;
    };
    let mut req = f.request(
        "anna",
        "python3 -c 'a = bytearray(3 * 1024**3); print(len(a))'",
    );
    req.profile.limits.memory_bytes = 256 * 1024 * 1024;
    let out = f.sandbox.exec(req).await.unwrap();
    println!("memory bomb: {out:?}");
    assert_ne!(out.exit_code, Some(0), "{out:?}");
    assert!(!out.stdout.contains("3221225472"));
}

#[tokio::test]
async fn memory_cgroup_kills_what_the_address_space_limit_allows() {
    let Some(f) = fixture("oom").await else {
        return;
    };
    if !f.sandbox.cgroups().limits_memory() {
        println!("SKIP: no memory cgroup on this host");
        return;
    }
    // 300 MB of touched memory: under RLIMIT_AS (4 x 128 MB), over the 128 MB cgroup limit.
    let mut req = f.request(
        "anna",
        "python3 -c 'a = b\"x\" * (300 * 1024 * 1024); print(\"survived\")'",
    );
    req.profile.limits.memory_bytes = 128 * 1024 * 1024;
    let out = f.sandbox.exec(req).await.unwrap();
    println!("oom: {out:?}");
    assert!(!out.stdout.contains("survived"), "{out:?}");
    assert_ne!(out.exit_code, Some(0), "{out:?}");
}

#[tokio::test]
async fn fork_bomb_is_contained_and_cleaned_up() {
    let Some(f) = fixture("fork").await else {
        return;
    };
    let marker = format!("bomb{}", rand::random::<u32>());
    let mut req = f.request(
        "anna",
        &format!("{marker}() {{ {marker} | {marker} & }}; {marker}; sleep 2; echo alive"),
    );
    req.profile.limits.pids = 64;
    req.timeout = Duration::from_secs(5);
    let out = f.sandbox.exec(req).await.unwrap();
    println!("fork bomb: {out:?}");
    assert!(out.duration < Duration::from_secs(10), "{out:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The bomb runs as `sh -c <script containing the marker>`: none of it may survive.
    assert_eq!(host_processes_with(&marker), Vec::<String>::new());
}

/// While one user's sandbox fork-bombs and eats memory, another user's trivial command still
/// completes within this bound.
const FAIRNESS_BOUND: Duration = Duration::from_secs(3);

#[tokio::test]
async fn other_users_stay_responsive_during_a_bomb() {
    let Some(f) = fixture("fair").await else {
        return;
    };
    let f = std::sync::Arc::new(f);
    let bomber = {
        let f = f.clone();
        tokio::spawn(async move {
            let mut req = f.request(
                "mallory",
                "b() { b | b & }; b; python3 -c 'a=bytearray(3*1024**3)'; sleep 8",
            );
            req.profile.limits.pids = 64;
            req.profile.limits.memory_bytes = 128 * 1024 * 1024;
            req.timeout = Duration::from_secs(6);
            f.sandbox.exec(req).await.unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    let out = f.run("bob", "echo hi").await;
    let took = started.elapsed();
    println!("bob's echo took {took:?} during the bomb");
    assert_eq!(out.stdout, "hi\n", "{out:?}");
    assert!(took < FAIRNESS_BOUND, "bob waited {took:?}");
    let bomb = bomber.await.unwrap();
    assert!(bomb.duration < Duration::from_secs(12));
}

#[tokio::test]
async fn list_and_prune_scratch() {
    let Some(f) = fixture("list").await else {
        return;
    };
    let mut req = f.request("anna", "echo x > f");
    req.profile.workspace_access = WorkspaceAccess::None;
    f.sandbox.exec(req).await.unwrap();
    let listed = f.sandbox.list().await.unwrap();
    assert!(
        listed
            .iter()
            .any(|s| s.user == "anna" && s.backend == "bwrap"),
        "{listed:?}"
    );
    let removed = f.sandbox.prune(Duration::from_secs(3600)).await.unwrap();
    assert!(removed.is_empty());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let removed = f.sandbox.prune(Duration::from_millis(500)).await.unwrap();
    assert_eq!(removed.len(), 1, "{removed:?}");
}

/// Bytes in the regular files directly in `dir`.
fn file_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Runs `program args` on the host as `ids` with only `groups` as supplementary groups: what a
/// process that escaped a sandbox of that uid could do. Returns (success, stdout + stderr).
fn run_on_host_as(ids: SandboxIds, groups: &[u32], program: &str, args: &[&str]) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let groups: Vec<libc::gid_t> = groups.to_vec();
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).env_clear().env("PATH", "/usr/bin:/bin");
    // SAFETY: only async-signal-safe system calls on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let ptr = if groups.is_empty() {
                std::ptr::null()
            } else {
                groups.as_ptr()
            };
            if libc::setgroups(groups.len(), ptr) != 0
                || libc::setresgid(ids.gid, ids.gid, ids.gid) != 0
                || libc::setresuid(ids.uid, ids.uid, ids.uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The host pid of the process whose command line is exactly `cmdline` (space-joined) and
/// whose real uid is `uid`, waiting up to 10 s for it to appear.
async fn host_pid_of(cmdline: &str, uid: u32) -> u32 {
    for _ in 0..200 {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(pid) = name.parse::<u32>() else {
                continue;
            };
            let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let line = String::from_utf8_lossy(&raw).replace('\0', " ");
            if line.trim_end() != cmdline {
                continue;
            }
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            let real_uid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|u| u.parse::<u32>().ok());
            if real_uid == Some(uid) {
                return pid;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no process {cmdline:?} of uid {uid} appeared");
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Two users' sandboxes run as two different host uids, and what each makes in its home is
/// owned by that user's uid on the host.
#[tokio::test]
async fn two_users_run_as_their_own_uids_and_own_their_files() {
    let Some(f) = fixture("twouids").await else {
        return;
    };
    if !rustix::process::geteuid().is_root() {
        println!("SKIP: per-user uids need a root gateway");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let mut seen = Vec::new();
    for user in ["anna", "bob"] {
        let out = f
            .run(user, "id -u; id -g; id -un; echo mine > mine.txt; mkdir d")
            .await;
        let ids = f.ids(user);
        assert_eq!(
            out.stdout,
            format!("{}\n{}\nagent\n", ids.uid, ids.gid),
            "{out:?}"
        );
        for path in [
            f.home(user),
            f.home(user).join("mine.txt"),
            f.home(user).join("d"),
        ] {
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (ids.uid, ids.gid), "{path:?}");
        }
        assert_eq!(
            std::fs::metadata(f.home(user)).unwrap().mode() & 0o777,
            0o700
        );
        seen.push(ids.uid);
    }
    assert_ne!(seen[0], seen[1]);
    // An escape with anna's uid cannot read bob's home on the host.
    let bob_file = f.home("bob").join("mine.txt");
    let (ok, text) = run_on_host_as(f.ids("anna"), &[], "cat", &[bob_file.to_str().unwrap()]);
    assert!(!ok && text.contains("Permission denied"), "{text}");
}

/// A live sandbox of one user is out of reach of every other uid, even through
/// `/proc/<pid>/root` (the path into a process's mount namespace): from inside another user's
/// sandbox (its own pid namespace shows nothing else), and from the host as another user's
/// uid or as uid 1000 (the first login on Debian/Ubuntu, the old shared sandbox uid).
#[tokio::test]
async fn live_sandbox_is_out_of_reach_through_proc_root() {
    let Some(f) = fixture("procroot").await else {
        return;
    };
    if !rustix::process::geteuid().is_root() {
        println!("SKIP: per-user uids need a root gateway");
        return;
    }
    std::fs::write(f.home("bob").join("secret.txt"), "bob-secret").unwrap();
    let marker = format!(
        "{}.{}",
        500 + rand::random::<u32>() % 100,
        rand::random::<u32>() % 1_000_000 + 1
    );
    let mut long = f.request("bob", "");
    long.command = ExecCommand::Argv(vec!["sleep".into(), marker.clone()]);
    long.timeout = Duration::from_secs(60);
    let bob = f.ids("bob");
    let sandbox = std::sync::Arc::new(f);
    let running = {
        let sandbox = sandbox.clone();
        tokio::spawn(async move { sandbox.sandbox.exec(long).await })
    };
    let f = sandbox;
    let pid = host_pid_of(&format!("sleep {marker}"), bob.uid).await;
    let through = format!("/proc/{pid}/root/workspace/secret.txt");
    // Control: the path does lead to bob's file (root can follow it).
    assert_eq!(std::fs::read_to_string(&through).unwrap(), "bob-secret");

    for (who, ids) in [
        ("anna", f.ids("anna")),
        ("uid 1000", SandboxIds::same(1000)),
    ] {
        let (ok, text) = run_on_host_as(ids, &[], "cat", &[through.as_str()]);
        assert!(!ok && text.contains("Permission denied"), "{who}: {text}");
        let cwd = format!("/proc/{pid}/cwd/");
        let (ok, text) = run_on_host_as(ids, &[], "ls", &[cwd.as_str()]);
        assert!(!ok && text.contains("Permission denied"), "{who}: {text}");
        let (ok, text) = run_on_host_as(ids, &[], "kill", &["-0", &pid.to_string()]);
        assert!(!ok, "{who} may signal bob's sandbox: {text}");
    }
    let out = f
        .run(
            "anna",
            &format!(
                "cat {through} 2>&1; for p in /proc/[0-9]*; do cat $p/root/workspace/secret.txt 2>/dev/null; done; kill -9 {pid} 2>&1; echo end"
            ),
        )
        .await;
    assert!(!out.stdout.contains("bob-secret"), "{out:?}");
    assert!(out.stdout.ends_with("end\n"), "{out:?}");

    // SAFETY: kill(2) on bob's sleep, which this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let out = running.await.unwrap().unwrap();
    assert_ne!(out.exit_code, Some(0), "{out:?}");
}

/// Family members (each their own uid) both read and write `/family` — each other's files and
/// directories too — through the family's gid; a non-member cannot, in a sandbox or on the host.
#[tokio::test]
async fn family_members_share_the_family_folder_and_others_cannot() {
    let Some(f) = fixture("famshare").await else {
        return;
    };
    if !rustix::process::geteuid().is_root() {
        println!("SKIP: per-user uids need a root gateway");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    // The folder as the gateway makes it (Homes::ensure_family): the family's id, setgid 2770.
    let family = f.root.join("families").join("smiths");
    std::fs::create_dir_all(&family).unwrap();
    let fam = f.ids("smiths");
    std::os::unix::fs::chown(&family, Some(fam.uid), Some(fam.gid)).unwrap();
    chmod(&family, 0o2770);
    let member = |user: &str, command: &str| {
        let mut req = f.request(user, command);
        req.family = Some(family.clone());
        req.family_gid = Some(fam.gid);
        req
    };
    let out = f
        .sandbox
        .exec(member(
            "anna",
            "echo from anna > /family/a.txt && mkdir /family/anna-dir && echo ok",
        ))
        .await
        .unwrap();
    assert_eq!(out.stdout, "ok\n", "{out:?}");
    let out = f
        .sandbox
        .exec(member(
            "bob",
            "cat /family/a.txt && echo bob was here >> /family/a.txt && echo from bob > /family/anna-dir/b.txt && echo ok",
        ))
        .await
        .unwrap();
    assert_eq!(out.stdout, "from anna\nok\n", "{out:?}");
    let out = f
        .sandbox
        .exec(member("anna", "cat /family/a.txt /family/anna-dir/b.txt"))
        .await
        .unwrap();
    assert_eq!(out.stdout, "from anna\nbob was here\nfrom bob\n", "{out:?}");
    // On the host: each file is its writer's, in the family's group, group read-write.
    let a = std::fs::metadata(family.join("a.txt")).unwrap();
    assert_eq!(
        (a.uid(), a.gid(), a.mode() & 0o777),
        (f.ids("anna").uid, fam.gid, 0o660)
    );
    let dir = std::fs::metadata(family.join("anna-dir")).unwrap();
    assert_eq!((dir.gid(), dir.mode() & 0o7777), (fam.gid, 0o2770));
    let b = std::fs::metadata(family.join("anna-dir/b.txt")).unwrap();
    assert_eq!((b.uid(), b.gid()), (f.ids("bob").uid, fam.gid));

    // A non-member given the folder anyway (no family gid) cannot use it.
    let mut req = f.request(
        "carol",
        "cat /family/a.txt 2>&1; ls /family 2>&1; touch /family/c 2>&1; echo end",
    );
    req.family = Some(family.clone());
    let out = f.sandbox.exec(req).await.unwrap();
    assert!(!out.stdout.contains("from anna"), "{out:?}");
    assert_eq!(
        out.stdout.matches("Permission denied").count(),
        3,
        "{out:?}"
    );
    assert!(!family.join("c").exists());
    // Nor can an escape with the non-member's uid on the host.
    let path = family.join("a.txt");
    let (ok, text) = run_on_host_as(f.ids("carol"), &[], "cat", &[path.to_str().unwrap()]);
    assert!(!ok && text.contains("Permission denied"), "{text}");
}
