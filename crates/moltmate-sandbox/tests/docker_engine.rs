//! Docker backend against the real engine.
//!
//! Skips (printing `SKIP: <reason>`) when the daemon does not answer or the sandbox image is
//! missing and cannot be built, unless `MOLTMATE_REQUIRE_SANDBOX=1`. The image is built once
//! (reusing `moltmate-base:test` as the base when present, to spare a debootstrap run) and kept.
//! Every test uses its own user ids and removes its containers.

use moltmate_core::sandbox::{
    ExecCommand, ExecOutput, ExecRequest, Sandbox, SandboxIds, SandboxLimits, SandboxProfile,
    WorkspaceAccess,
};
use moltmate_core::UserId;
use moltmate_sandbox::docker::{docker_available, DockerSandbox};
use moltmate_sandbox::{disk, image, SandboxScope, SandboxSettings};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const IMAGE: &str = "moltmate-sandbox:bookworm-slim";
const ROOT: &str = "/tmp/moltmate-docker-tests";

static SETUP: tokio::sync::Mutex<Option<Result<(), String>>> = tokio::sync::Mutex::const_new(None);
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Each test has its own state directory, hence its own installation label: a new
/// `DockerSandbox` removes stale containers of its installation only.
fn settings(scope: SandboxScope, digest: &str, state: &str) -> SandboxSettings {
    SandboxSettings {
        backend: moltmate_sandbox::BackendChoice::Docker,
        scope,
        image: IMAGE.to_string(),
        docker_host: None,
        prune_idle: Duration::from_secs(3600),
        // Short: the egress proxy's unix sockets live below it (sun_path is 108 bytes).
        state_dir: PathBuf::from(ROOT).join(short(state)),
        allowed_domains: Vec::new(),
        config_digest: digest.to_string(),
    }
}

/// `None` = skip this test (already printed why).
async fn ready() -> Option<()> {
    let mut guard = SETUP.lock().await;
    if guard.is_none() {
        *guard = Some(prepare().await);
    }
    match guard.as_ref() {
        Some(Ok(())) => Some(()),
        Some(Err(reason)) => {
            if std::env::var("MOLTMATE_REQUIRE_SANDBOX").as_deref() == Ok("1") {
                panic!("sandbox required but unavailable: {reason}");
            }
            println!("SKIP: {reason}");
            None
        }
        None => None,
    }
}

/// A test that panicked skips its cleanup: remove what earlier runs of this binary left behind
/// (their containers, then their loop mounts and files). Runs once, before any test starts.
async fn remove_leftovers(docker: &bollard::Docker) {
    let mut filters = std::collections::HashMap::new();
    filters.insert(
        "label".to_string(),
        vec!["moltmate.managed=true".to_string()],
    );
    let options = bollard::query_parameters::ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let mine = format!("-{}-", std::process::id());
    for c in docker
        .list_containers(Some(options))
        .await
        .unwrap_or_default()
    {
        let labels = c.labels.unwrap_or_default();
        let user = labels.get("moltmate.user").cloned().unwrap_or_default();
        let test_user = user.starts_with('t') && user.matches('-').count() == 2;
        if test_user && !user.contains(&mine) {
            let name = c.id.unwrap_or_default();
            let force = bollard::query_parameters::RemoveContainerOptionsBuilder::default()
                .force(true)
                .build();
            let _ = docker.remove_container(&name, Some(force)).await;
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let stale: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(ROOT))
        .collect();
    for m in stale.iter().rev() {
        let _ = std::process::Command::new("umount").arg(m).status();
    }
    let _ = std::fs::remove_dir_all(ROOT);
}

async fn prepare() -> Result<(), String> {
    let s = settings(SandboxScope::User, "test", "prepare");
    if !docker_available(&s).await {
        return Err("the Docker daemon does not answer".into());
    }
    let docker = moltmate_sandbox::docker::connect_client(&s).map_err(|e| e.to_string())?;
    remove_leftovers(&docker).await;
    let have_base = image::image_exists(&docker, image::BASE_IMAGE)
        .await
        .map_err(|e| e.to_string())?;
    if !have_base
        && image::image_exists(&docker, "moltmate-base:test")
            .await
            .unwrap_or(false)
    {
        let tag = bollard::query_parameters::TagImageOptionsBuilder::default()
            .repo("moltmate-base")
            .tag("bookworm")
            .build();
        docker
            .tag_image("moltmate-base:test", Some(tag))
            .await
            .map_err(|e| e.to_string())?;
    }
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Dockerfile.sandbox");
    image::ensure_image(&s, &dockerfile, &|line| eprintln!("build: {line}"))
        .await
        .map_err(|e| format!("the sandbox image is missing and cannot be built: {e}"))?;
    Ok(())
}

fn short(name: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(name.as_bytes()))[..8].to_string()
}

fn user(prefix: &str) -> UserId {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    UserId::new(format!("t{}-{}-{}", prefix, std::process::id(), n)).unwrap()
}

fn home_of(user: &UserId) -> PathBuf {
    let home = PathBuf::from(ROOT).join("homes").join(user.as_str());
    std::fs::create_dir_all(&home).unwrap();
    home
}

/// Each test user's own sandbox ids, as a root gateway would allocate them: distinct per user
/// (derived from the unique user id), in a block of their own.
fn ids_of(user: &UserId) -> SandboxIds {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(user.as_str().as_bytes());
    let n = u32::from_le_bytes([digest[0], digest[1], digest[2], 0]);
    SandboxIds::same(2_100_000_000 + n % 10_000_000)
}

fn request(user: &UserId, command: &str, timeout: Duration) -> ExecRequest {
    ExecRequest {
        user: user.clone(),
        home: home_of(user),
        family: None,
        ids: ids_of(user),
        family_gid: None,
        session_id: "s1".into(),
        command: ExecCommand::Shell(command.into()),
        timeout,
        profile: SandboxProfile::default(),
    }
}

fn with_limits(mut r: ExecRequest, f: impl FnOnce(&mut SandboxLimits)) -> ExecRequest {
    f(&mut r.profile.limits);
    r
}

async fn run(sb: &DockerSandbox, r: ExecRequest) -> ExecOutput {
    let out = sb.exec(r).await.expect("exec");
    eprintln!("{out:?}");
    out
}

/// Runs a shell command line for `user` with a 30 s timeout.
async fn sh(sb: &DockerSandbox, user: &UserId, command: &str) -> ExecOutput {
    run(sb, request(user, command, Duration::from_secs(30))).await
}

async fn cleanup(sb: &DockerSandbox, users: &[&UserId]) {
    for u in users {
        sb.remove_user(u).await.expect("remove containers");
        let home = PathBuf::from(ROOT).join("homes").join(u.as_str());
        let _ = disk::release_user_volume(&home);
        let _ = std::fs::remove_file(
            sb.settings()
                .state_dir
                .join("disks")
                .join(format!("{}.img", u.as_str())),
        );
        let _ = std::fs::remove_dir_all(&home);
        let scratch = sb.settings().state_dir.join("scratch").join(u.as_str());
        if scratch.exists() {
            let _ = disk::release_user_volume(&scratch);
            let _ = std::fs::remove_dir_all(&scratch);
            use sha2::Digest;
            let tag = hex::encode(sha2::Sha256::digest(u.as_str().as_bytes()));
            let img = format!("scratch.{}.img", &tag[..16]);
            let _ = std::fs::remove_file(sb.settings().state_dir.join("disks").join(img));
        }
    }
}

#[tokio::test]
async fn docker_identity_filesystem_and_secrets() {
    if ready().await.is_none() {
        return;
    }
    std::env::set_var("ANTHROPIC_API_KEY", "sk-ant-fake-secret-for-test");
    let sb = DockerSandbox::connect(&settings(
        SandboxScope::User,
        "test",
        "docker_identity_filesystem_and_secrets",
    ))
    .unwrap();
    let u = user("ident");
    std::fs::write(home_of(&u).join("hello.txt"), "from the host\n").unwrap();
    let marker = format!("/tmp/moltmate-host-marker-{}", u.as_str());
    std::fs::write(&marker, "host only").unwrap();

    // Pre-warming a fresh user (what the benchmark and login use).
    let w = user("warm");
    let took = sb
        .prewarm(&request(&w, "true", Duration::from_secs(30)))
        .await
        .unwrap();
    eprintln!("prewarm (create + start): {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    cleanup(&sb, &[&w]).await;
    let t = Instant::now();
    let out = sh(&sb, &u, "id -u; id -g; pwd; cat hello.txt").await;
    eprintln!("cold exec (create + run): {:?}", t.elapsed());
    assert_eq!(out.exit_code, Some(0));
    let ids = ids_of(&u);
    assert_eq!(
        out.stdout,
        format!("{}\n{}\n/workspace\nfrom the host\n", ids.uid, ids.gid)
    );

    let t = Instant::now();
    let out = sh(&sb, &u, "echo warm").await;
    let warm = t.elapsed();
    eprintln!("warm exec: {warm:?}");
    assert_eq!(out.stdout, "warm\n");
    assert!(warm < Duration::from_secs(2), "warm exec took {warm:?}");

    // The host's files are not the container's.
    let out = run(
        &sb,
        request(
            &u,
            &format!("cat /etc/shadow; cat {marker}; ls /proc/1/root{marker}; cat /etc/hostname"),
            Duration::from_secs(30),
        ),
    )
    .await;
    assert!(out.stdout.trim_end().ends_with("sandbox"), "{out:?}");
    assert!(!out.stdout.contains("host only"));
    assert!(!out.stdout.contains("root:"));
    // No Docker socket anywhere.
    let out = run(&sb, request(&u, "find / -xdev -name 'docker.sock' 2>/dev/null; ls /var/run/docker.sock /run/docker.sock 2>&1; echo done", Duration::from_secs(60))).await;
    assert!(!out.stdout.contains("docker.sock\n/"), "{out:?}");
    assert!(out.stdout.contains("No such file"), "{out:?}");
    // No secrets, only the documented variables.
    let out = sh(&sb, &u, "env").await;
    assert!(!out.stdout.contains("ANTHROPIC"), "{out:?}");
    assert!(!out.stdout.contains("sk-ant"), "{out:?}");
    assert!(out.stdout.contains("HOME=/workspace"));
    // Read-only root, noexec /tmp, writable workspace visible on the host.
    let out = sh(&sb, &u, "touch /etc/x 2>&1; printf '#!/bin/sh\\necho ran\\n' > /tmp/s.sh; chmod +x /tmp/s.sh; /tmp/s.sh 2>&1; echo made > /workspace/out.txt").await;
    assert!(out.stdout.contains("Read-only file system"), "{out:?}");
    assert!(!out.stdout.contains("ran"), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(home_of(&u).join("out.txt")).unwrap(),
        "made\n"
    );
    // Argv form, no shell.
    let mut r = request(&u, "", Duration::from_secs(30));
    r.command = ExecCommand::Argv(vec![
        "printf".into(),
        "%s|".into(),
        "a b".into(),
        "$HOME".into(),
    ]);
    assert_eq!(run(&sb, r).await.stdout, "a b|$HOME|");

    let listed = sb.list().await.unwrap();
    let mine: Vec<_> = listed.iter().filter(|i| i.user == u.as_str()).collect();
    assert_eq!(mine.len(), 1);
    assert!(mine[0]
        .name
        .starts_with(&format!("moltmate-sbx-{}-", u.as_str())));
    assert!(mine[0].limits.is_some());
    let _ = std::fs::remove_file(&marker);
    cleanup(&sb, &[&u]).await;
}

#[tokio::test]
async fn docker_no_network() {
    if ready().await.is_none() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let sb =
        DockerSandbox::connect(&settings(SandboxScope::User, "test", "docker_no_network")).unwrap();
    let u = user("net");
    let script = format!(
        "import socket\nfor h,p in [('127.0.0.1',{port}),('172.17.0.1',{port}),('169.254.169.254',80),('deb.debian.org',80)]:\n  try:\n    socket.create_connection((h,p),3); print('OPEN',h)\n  except Exception as e:\n    print('FAIL',h,type(e).__name__)\n"
    );
    let mut r = request(&u, "", Duration::from_secs(60));
    r.command = ExecCommand::Argv(vec!["python3".into(), "-c".into(), script]);
    let out = run(&sb, r).await;
    assert_eq!(out.stdout.matches("FAIL").count(), 4, "{out:?}");
    assert!(!out.stdout.contains("OPEN"));
    drop(listener);
    cleanup(&sb, &[&u]).await;
}

#[tokio::test]
async fn docker_users_are_isolated() {
    if ready().await.is_none() {
        return;
    }
    let sb = DockerSandbox::connect(&settings(
        SandboxScope::User,
        "test",
        "docker_users_are_isolated",
    ))
    .unwrap();
    let a = user("isoa");
    let b = user("isob");
    sh(
        &sb,
        &a,
        "echo a-secret > /workspace/secret.txt; echo $$ > /tmp/pid",
    )
    .await;
    let out = sh(
        &sb,
        &b,
        "cat /workspace/secret.txt 2>&1; cat /tmp/pid 2>&1; ls /workspace; ps -eo comm=",
    )
    .await;
    assert!(!out.stdout.contains("a-secret"), "{out:?}");
    assert!(out.stdout.contains("No such file"), "{out:?}");
    let listed = sb.list().await.unwrap();
    let na: Vec<_> = listed
        .iter()
        .filter(|i| i.user == a.as_str())
        .map(|i| i.name.clone())
        .collect();
    let nb: Vec<_> = listed
        .iter()
        .filter(|i| i.user == b.as_str())
        .map(|i| i.name.clone())
        .collect();
    assert_eq!((na.len(), nb.len()), (1, 1));
    assert_ne!(na[0], nb[0]);
    cleanup(&sb, &[&a, &b]).await;
}

/// Runs `ps` with `request`'s user and limits and asserts [`assert_only_runner_and_ps`].
async fn assert_nothing_left(sb: &DockerSandbox, mut request: ExecRequest) {
    let uid = request.ids.uid.to_string();
    request.command = ExecCommand::Argv(
        ["ps", "-u", uid.as_str(), "-o", "comm="]
            .map(String::from)
            .to_vec(),
    );
    let out = run(sb, request).await;
    assert_only_runner_and_ps(&out);
}

/// `ps -u <uid> -o comm=` shows nothing but the container's command runner (`python3`), the
/// command wrapper (`sh`, on the per-exec path) and `ps` itself: nothing outlived its call.
fn assert_only_runner_and_ps(out: &ExecOutput) {
    let names: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    assert!(names.contains(&"ps"), "{out:?}");
    assert!(
        names.iter().all(|n| matches!(*n, "python3" | "sh" | "ps")),
        "only the runner, the command wrapper and ps may run: {out:?}"
    );
    assert!(
        names.iter().filter(|n| **n == "python3").count() <= 1,
        "one runner at most: {out:?}"
    );
}

/// While `a` runs `bomb`, `b`'s `echo hi` must finish within 2 s.
async fn neighbour_stays_responsive(
    sb: &DockerSandbox,
    a: &UserId,
    b: &UserId,
    bomb: ExecRequest,
) -> ExecOutput {
    run(sb, request(b, "true", Duration::from_secs(30))).await;
    run(sb, request(a, "true", Duration::from_secs(30))).await;
    let bomb_task = sb.exec(bomb);
    let probe = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let t = Instant::now();
        let out = sb
            .exec(request(b, "echo hi", Duration::from_secs(10)))
            .await
            .unwrap();
        (out, t.elapsed())
    };
    let (bomb_out, (probe_out, took)) = tokio::join!(bomb_task, probe);
    eprintln!("neighbour echo took {took:?}");
    assert_eq!(probe_out.stdout, "hi\n");
    assert!(
        took < Duration::from_secs(2),
        "neighbour echo took {took:?}"
    );
    bomb_out.expect("bomb exec")
}

#[tokio::test]
async fn docker_fork_bomb_is_contained() {
    if ready().await.is_none() {
        return;
    }
    let sb = DockerSandbox::connect(&settings(
        SandboxScope::User,
        "test",
        "docker_fork_bomb_is_contained",
    ))
    .unwrap();
    let a = user("fork");
    let b = user("forkb");
    let bomb = with_limits(request(&a, "b(){ b|b& }; b", Duration::from_secs(5)), |l| {
        l.pids = 64
    });
    let out = neighbour_stays_responsive(&sb, &a, &b, bomb).await;
    eprintln!("fork bomb: {out:?}");
    // The sandbox is usable again and nothing of the bomb survives.
    assert_nothing_left(
        &sb,
        with_limits(request(&a, "", Duration::from_secs(30)), |l| l.pids = 64),
    )
    .await;
    cleanup(&sb, &[&a, &b]).await;
}

#[tokio::test]
async fn docker_memory_bomb_is_oom_killed() {
    if ready().await.is_none() {
        return;
    }
    let sb = DockerSandbox::connect(&settings(
        SandboxScope::User,
        "test",
        "docker_memory_bomb_is_oom_killed",
    ))
    .unwrap();
    let a = user("mem");
    let b = user("memb");
    let mut bomb = with_limits(request(&a, "", Duration::from_secs(30)), |l| {
        l.memory_bytes = 128 << 20
    });
    bomb.command = ExecCommand::Argv(vec![
        "python3".into(),
        "-c".into(),
        "import time\na=[]\nwhile True:\n  a.append(bytearray(8<<20)); time.sleep(0.01)".into(),
    ]);
    let first = with_limits(request(&a, "true", Duration::from_secs(30)), |l| {
        l.memory_bytes = 128 << 20
    });
    run(&sb, first).await;
    let out = neighbour_stays_responsive(&sb, &a, &b, bomb).await;
    assert!(!out.timed_out, "{out:?}");
    assert_eq!(out.exit_code, None, "{out:?}");
    assert!(out.stderr.contains("out of memory"), "{out:?}");
    cleanup(&sb, &[&a, &b]).await;
}

/// A sandbox for a disk-cap test, or `None` (skip) when Docker or root is missing.
async fn disk_cap_sandbox(state: &str) -> Option<DockerSandbox> {
    ready().await?;
    if !disk::can_enforce() {
        println!("SKIP: disk caps need root");
        return None;
    }
    Some(DockerSandbox::connect(&settings(SandboxScope::User, "test", state)).unwrap())
}

#[tokio::test]
async fn docker_disk_cap_gives_enospc() {
    let Some(sb) = disk_cap_sandbox("docker_disk_cap_gives_enospc").await else {
        return;
    };
    let u = user("disk");
    let r = with_limits(
        request(
            &u,
            "dd if=/dev/zero of=/workspace/big bs=1M count=100 2>&1; df -k /workspace | tail -1",
            Duration::from_secs(60),
        ),
        |l| l.disk_bytes = 32 << 20,
    );
    let out = run(&sb, r).await;
    assert!(out.stdout.contains("No space left on device"), "{out:?}");
    let size = std::fs::metadata(home_of(&u).join("big")).unwrap().len();
    assert!(size <= 32 << 20, "wrote {size} bytes");
    let listed = sb.list().await.unwrap();
    assert!(listed
        .iter()
        .any(|i| i.user == u.as_str() && !i.state.contains("no disk cap")));
    cleanup(&sb, &[&u]).await;
}

/// A member filling the shared family folder hits the family volume's cap.
#[tokio::test]
async fn docker_family_folder_fill_is_stopped() {
    let Some(sb) = disk_cap_sandbox("docker_family_folder_fill_is_stopped").await else {
        return;
    };
    let u = user("famdisk");
    let family = PathBuf::from(ROOT).join("families").join(u.as_str());
    std::fs::create_dir_all(&family).unwrap();
    std::fs::write(family.join("FAMILY.md"), "We are the Smiths.").unwrap();
    let mut r = with_limits(
        request(
            &u,
            "cat /family/FAMILY.md; dd if=/dev/zero of=/family/big bs=1M count=100 2>&1",
            Duration::from_secs(60),
        ),
        |l| l.disk_bytes = 32 << 20,
    );
    r.family = Some(family.clone());
    r.family_gid = Some(ids_of(&u).gid + 1);
    let out = run(&sb, r).await;
    assert!(out.stdout.contains("We are the Smiths."), "{out:?}");
    // The family's volume belongs to the family's own gid, shared by the group (setgid 2770).
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&family).unwrap();
        assert_eq!(
            (meta.gid(), meta.mode() & 0o7777),
            (ids_of(&u).gid + 1, 0o2770)
        );
    }
    assert!(out.stdout.contains("No space left on device"), "{out:?}");
    let size = std::fs::metadata(family.join("big")).unwrap().len();
    assert!(size <= 32 << 20, "wrote {size} bytes");
    cleanup(&sb, &[&u]).await;
    disk::release_user_volume(&family).unwrap();
    let _ = std::fs::remove_dir_all(&family);
}

#[tokio::test]
async fn docker_cpu_is_limited_and_spin_times_out() {
    if ready().await.is_none() {
        return;
    }
    let sb = DockerSandbox::connect(&settings(
        SandboxScope::User,
        "test",
        "docker_cpu_is_limited_and_spin_times_out",
    ))
    .unwrap();
    let u = user("cpu");
    let mut r = with_limits(request(&u, "", Duration::from_secs(30)), |l| {
        l.cpu_millis = 250
    });
    r.command = ExecCommand::Argv(vec![
        "python3".into(),
        "-c".into(),
        "import time\nt=time.time()\nwhile time.time()-t<2: pass\nprint(time.process_time())"
            .into(),
    ]);
    let out = run(&sb, r).await;
    let cpu: f64 = out.stdout.trim().parse().unwrap();
    assert!(cpu < 1.2, "used {cpu} s of CPU in 2 s at a 0.25 CPU quota");
    let spin = with_limits(
        request(&u, "while :; do :; done", Duration::from_secs(2)),
        |l| l.cpu_millis = 250,
    );
    let out = run(&sb, spin).await;
    assert!(out.timed_out);
    assert_eq!(out.exit_code, None);
    assert!(out.duration < Duration::from_secs(6), "{out:?}");
    cleanup(&sb, &[&u]).await;
}

#[tokio::test]
async fn docker_huge_output_is_truncated() {
    if ready().await.is_none() {
        return;
    }
    let sb = DockerSandbox::connect(&settings(
        SandboxScope::User,
        "test",
        "docker_huge_output_is_truncated",
    ))
    .unwrap();
    let u = user("out");
    let r = request(
        &u,
        "head -c 200000000 /dev/zero | tr '\\0' a; echo end >&2",
        Duration::from_secs(120),
    );
    let out = sb.exec(r).await.unwrap();
    eprintln!("200 MB in {:?}", out.duration);
    assert!(out.truncated);
    assert!(!out.timed_out);
    assert_eq!(out.exit_code, Some(0));
    assert!(out.stdout.len() + out.stderr.len() <= SandboxLimits::default().output_bytes as usize);
    cleanup(&sb, &[&u]).await;
}

#[tokio::test]
async fn docker_timeout_leaves_no_orphans() {
    if ready().await.is_none() {
        return;
    }
    let sb = DockerSandbox::connect(&settings(
        SandboxScope::User,
        "test",
        "docker_timeout_leaves_no_orphans",
    ))
    .unwrap();
    let u = user("tmo");
    sh(&sb, &u, "true").await;
    let t = Instant::now();
    let out = run(
        &sb,
        request(
            &u,
            "sleep 600 & setsid sleep 601 & sleep 600",
            Duration::from_secs(2),
        ),
    )
    .await;
    assert!(out.timed_out);
    assert_eq!(out.exit_code, None);
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "took {:?}",
        t.elapsed()
    );
    assert_nothing_left(&sb, request(&u, "", Duration::from_secs(30))).await;
    cleanup(&sb, &[&u]).await;
}

#[tokio::test]
async fn docker_digest_change_restart_and_prune() {
    if ready().await.is_none() {
        return;
    }
    let u = user("life");
    let first = DockerSandbox::connect(&settings(
        SandboxScope::User,
        "digest-a",
        "docker_digest_change_restart_and_prune",
    ))
    .unwrap();
    run(
        &first,
        request(&u, "echo kept > /tmp/mark", Duration::from_secs(30)),
    )
    .await;
    let name_a = first
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.user == u.as_str())
        .unwrap()
        .name;

    // A restarted gateway knows how long the container has been idle.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let fresh = DockerSandbox::connect(&settings(
        SandboxScope::User,
        "digest-a",
        "docker_digest_change_restart_and_prune",
    ))
    .unwrap();
    fresh.recover().await.unwrap();
    let info = fresh
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.user == u.as_str())
        .unwrap();
    assert!(info.idle_seconds.unwrap_or(0) >= 2, "{info:?}");

    // Restart with the same config: the container is found again and reused.
    let again = DockerSandbox::connect(&settings(
        SandboxScope::User,
        "digest-a",
        "docker_digest_change_restart_and_prune",
    ))
    .unwrap();
    let out = run(
        &again,
        request(&u, "cat /tmp/mark", Duration::from_secs(30)),
    )
    .await;
    assert_eq!(out.stdout, "kept\n");

    // Restart under another config digest: the old container goes, a new one is made.
    let changed = DockerSandbox::connect(&settings(
        SandboxScope::User,
        "digest-b",
        "docker_digest_change_restart_and_prune",
    ))
    .unwrap();
    let out = run(
        &changed,
        request(
            &u,
            "cat /tmp/mark 2>/dev/null || echo fresh",
            Duration::from_secs(30),
        ),
    )
    .await;
    assert_eq!(out.stdout, "fresh\n");
    let mine: Vec<_> = changed
        .list()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.user == u.as_str())
        .collect();
    assert_eq!(mine.len(), 1);
    assert_ne!(mine[0].name, name_a);

    // A profile change recreates too.
    let r = with_limits(
        request(
            &u,
            "cat /tmp/mark 2>/dev/null || echo fresh",
            Duration::from_secs(30),
        ),
        |l| l.pids = 100,
    );
    assert_eq!(run(&changed, r).await.stdout, "fresh\n");
    let mine: Vec<_> = changed
        .list()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.user == u.as_str())
        .collect();
    assert_eq!(mine.len(), 1);

    // Prune removes idle ones.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let removed = changed.prune(Duration::from_secs(1)).await.unwrap();
    assert!(removed.contains(&mine[0].name), "{removed:?}");
    assert!(!changed
        .list()
        .await
        .unwrap()
        .iter()
        .any(|i| i.user == u.as_str()));
    cleanup(&changed, &[&u]).await;
}

#[tokio::test]
async fn docker_session_and_task_scopes() {
    if ready().await.is_none() {
        return;
    }
    let u = user("scope");
    let sessions = DockerSandbox::connect(&settings(
        SandboxScope::Session,
        "test",
        "docker_session_and_task_scopes",
    ))
    .unwrap();
    run(&sessions, request(&u, "true", Duration::from_secs(30))).await;
    let mut other = request(&u, "true", Duration::from_secs(30));
    other.session_id = "s2".into();
    run(&sessions, other).await;
    let count = |l: &[moltmate_core::sandbox::SandboxInfo]| {
        l.iter().filter(|i| i.user == u.as_str()).count()
    };
    assert_eq!(count(&sessions.list().await.unwrap()), 2);
    sessions.end_session(&u, "s1").await.unwrap();
    assert_eq!(count(&sessions.list().await.unwrap()), 1);
    cleanup(&sessions, &[&u]).await;

    let v = user("task");
    let tasks = DockerSandbox::connect(&settings(
        SandboxScope::Task,
        "test",
        "docker_session_and_task_scopes",
    ))
    .unwrap();
    let out = run(
        &tasks,
        request(
            &v,
            "echo once > /tmp/x; cat /tmp/x",
            Duration::from_secs(30),
        ),
    )
    .await;
    assert_eq!(out.stdout, "once\n");
    assert_eq!(count(&tasks.list().await.unwrap()), 0);
    cleanup(&tasks, &[&v]).await;
}

#[tokio::test]
async fn docker_workspace_access_modes() {
    if ready().await.is_none() {
        return;
    }
    let sb = DockerSandbox::connect(&settings(
        SandboxScope::User,
        "test",
        "docker_workspace_access_modes",
    ))
    .unwrap();
    let u = user("ro");
    std::fs::write(home_of(&u).join("note.txt"), "ro note\n").unwrap();
    let family = PathBuf::from(ROOT).join("family").join(u.as_str());
    std::fs::create_dir_all(&family).unwrap();
    std::fs::write(family.join("shared.txt"), "family\n").unwrap();
    let mut r = request(
        &u,
        "cat note.txt /family/shared.txt; touch x 2>&1; touch /family/y 2>&1",
        Duration::from_secs(30),
    );
    r.profile.workspace_access = WorkspaceAccess::Ro;
    r.family = Some(family.clone());
    r.family_gid = Some(ids_of(&u).gid + 1);
    let out = run(&sb, r).await;
    assert!(out.stdout.starts_with("ro note\nfamily\n"), "{out:?}");
    assert_eq!(
        out.stdout.matches("Read-only file system").count(),
        2,
        "{out:?}"
    );
    let mut r = request(
        &u,
        "ls -A /workspace; ls /family 2>&1",
        Duration::from_secs(30),
    );
    r.profile.workspace_access = WorkspaceAccess::None;
    r.family = Some(family.clone());
    let out = run(&sb, r).await;
    assert!(!out.stdout.contains("note.txt"), "{out:?}");
    assert!(!out.stdout.contains("shared.txt"), "{out:?}");
    cleanup(&sb, &[&u]).await;
    let _ = disk::release_user_volume(&family);
    let _ = std::fs::remove_dir_all(&family);
}

#[tokio::test]
async fn docker_availability_probe() {
    let mut s = settings(SandboxScope::User, "test", "docker_availability_probe");
    s.docker_host = Some("unix:///nonexistent/docker.sock".into());
    assert!(!docker_available(&s).await);
    s.docker_host = Some("ftp://nowhere".into());
    assert!(DockerSandbox::connect(&s).is_err());
}

/// What a gateway starts for proxied sandboxes: an egress proxy allowing `allowed.invalid`
/// (its events observed) and a Docker backend using it.
fn start_proxied(
    s: &SandboxSettings,
) -> (
    std::sync::Arc<moltmate_sandbox::proxy::EgressProxy>,
    DockerSandbox,
    tokio::sync::mpsc::UnboundedReceiver<moltmate_sandbox::proxy::EgressEvent>,
) {
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    let mut config = moltmate_sandbox::proxy::ProxyConfig::from_settings(s);
    config.allowed_domains = vec!["allowed.invalid".into()];
    config.observer = Some(tx);
    let proxy = moltmate_sandbox::proxy::EgressProxy::start_with(config).unwrap();
    let sb = DockerSandbox::connect(s).unwrap().with_proxy(proxy.clone());
    (proxy, sb, events)
}

#[tokio::test]
async fn docker_proxy_network_goes_through_the_egress_proxy() {
    if ready().await.is_none() {
        return;
    }
    let s = settings(
        SandboxScope::User,
        "test",
        "docker_proxy_network_goes_through_the_egress_proxy",
    );
    let u = user("proxy");

    // Without a proxy attached, proxy networking is refused clearly.
    let plain = DockerSandbox::connect(&s).unwrap();
    let mut r = request(&u, "true", Duration::from_secs(30));
    r.profile.network = moltmate_core::sandbox::SandboxNetwork::Proxy;
    let refused = plain.exec(r.clone()).await.unwrap_err();
    assert!(
        matches!(
            refused,
            moltmate_core::sandbox::SandboxError::Unavailable(_)
        ),
        "{refused}"
    );

    let (proxy, sb, mut events) = start_proxied(&s);
    let script = "import urllib.request, os\nprint(os.environ.get('HTTP_PROXY'))\ntry:\n  urllib.request.urlopen('http://blocked.invalid/', timeout=10)\n  print('FETCHED')\nexcept urllib.error.HTTPError as e:\n  print('HTTP', e.code)\nexcept Exception as e:\n  print('ERR', type(e).__name__, e)\n";
    r.command = ExecCommand::Argv(vec!["python3".into(), "-c".into(), script.into()]);
    let out = run(&sb, r.clone()).await;
    assert!(out.stdout.starts_with("http://127.0.0.1:3128\n"), "{out:?}");
    assert!(out.stdout.contains("HTTP 403"), "{out:?}");
    let event = events.try_recv();
    assert!(event.is_ok(), "the proxy saw no request");
    // Still no direct route out.
    let fetch = r.command.clone();
    r.command = ExecCommand::Shell("python3 -c \"import socket; socket.create_connection(('169.254.169.254',80),3)\" 2>&1 | tail -1".into());
    let out = run(&sb, r.clone()).await;
    assert!(out.stdout.contains("Error"), "{out:?}");

    // A gateway restart: a new proxy (new socket in the same directory) and a new backend.
    // The proxied container is adopted, not recreated, and its egress works again.
    let before: Vec<String> = sb
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    proxy.shutdown();
    drop(sb);
    let (proxy, sb, mut events) = start_proxied(&s);
    r.command = fetch;
    let out = run(&sb, r).await;
    assert!(out.stdout.contains("HTTP 403"), "{out:?}");
    assert!(
        events.try_recv().is_ok(),
        "the restarted proxy saw no request"
    );
    let after: Vec<String> = sb
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(before, after, "the container was adopted");
    assert_eq!(sb.stats().started, 0, "nothing was recreated");
    proxy.shutdown();
    cleanup(&sb, &[&u]).await;
}

#[tokio::test]
async fn docker_concurrent_calls_of_one_user_do_not_kill_each_other() {
    if ready().await.is_none() {
        return;
    }
    let sb = DockerSandbox::connect(&settings(
        SandboxScope::User,
        "test",
        "docker_concurrent_calls_of_one_user_do_not_kill_each_other",
    ))
    .unwrap();
    let u = user("conc");
    sh(&sb, &u, "true").await;
    let slow = sb.exec(request(&u, "sleep 1; echo slow", Duration::from_secs(30)));
    let fast = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        sb.exec(request(&u, "echo fast", Duration::from_secs(30)))
            .await
    };
    let (slow, fast) = tokio::join!(slow, fast);
    assert_eq!(slow.unwrap().stdout, "slow\n");
    assert_eq!(fast.unwrap().stdout, "fast\n");
    cleanup(&sb, &[&u]).await;
}

/// A command may kill its own warm runner (`kill -9 -1` reaches every sandbox-user process).
/// That command's output is lost, nothing it started survives, and the next command runs in a
/// fresh runner. Python modules planted in the home must not hijack the runner either (it runs
/// `python3 -I`, which never imports from the working directory).
#[tokio::test]
async fn docker_command_that_kills_its_runner_is_contained() {
    if ready().await.is_none() {
        return;
    }
    let sb = DockerSandbox::connect(&settings(
        SandboxScope::User,
        "test",
        "docker_command_that_kills_its_runner",
    ))
    .unwrap();
    let u = user("runner");
    for module in ["json", "base64", "selectors", "subprocess"] {
        std::fs::write(
            home_of(&u).join(format!("{module}.py")),
            "raise SystemExit('hijacked')\n",
        )
        .unwrap();
    }
    let out = sh(&sb, &u, "echo warm").await;
    assert_eq!(out.stdout, "warm\n");
    // A background job holding the output open neither delays the answer nor survives it.
    let t = Instant::now();
    let out = run(
        &sb,
        request(&u, "sleep 100 & echo hi; exit 3", Duration::from_secs(20)),
    )
    .await;
    assert_eq!(
        (out.exit_code, out.stdout.as_str()),
        (Some(3), "hi\n"),
        "{out:?}"
    );
    assert!(
        !out.timed_out && t.elapsed() < Duration::from_secs(5),
        "{out:?}"
    );
    // The runner is not dumpable: a command cannot reach its pipes to forge a reply.
    let out = sh(
        &sb,
        &u,
        "p=$(pgrep -x python3); echo runner=$p; ls /proc/$p/fd 2>&1 | head -1",
    )
    .await;
    assert!(!out.stdout.contains("runner=\n"), "runner found: {out:?}");
    assert!(out.stdout.contains("Permission denied"), "{out:?}");
    let out = sh(&sb, &u, "sleep 600 & kill -9 -1; sleep 1; echo after").await;
    assert!(!out.timed_out, "{out:?}");
    let out = sh(&sb, &u, "echo again").await;
    assert_eq!(out.stdout, "again\n", "{out:?}");

    // A runner killed from outside while idle is replaced before the next command is sent,
    // so that command runs and its output arrives.
    let name = sb
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.user == u.as_str())
        .unwrap()
        .name;
    let docker = moltmate_sandbox::docker::connect_client(sb.settings()).unwrap();
    let runner_user = format!("{0}:{0}", ids_of(&u).uid);
    let exec = docker
        .create_exec(
            &name,
            bollard::exec::CreateExecOptions {
                cmd: Some(vec!["pkill", "-9", "python3"]),
                user: Some(runner_user.as_str()),
                attach_stdout: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    if let bollard::exec::StartExecResults::Attached { mut output, .. } =
        docker.start_exec(&exec.id, None).await.unwrap()
    {
        use futures::StreamExt;
        while output.next().await.is_some() {}
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = sh(&sb, &u, "echo fresh").await;
    assert_eq!(out.stdout, "fresh\n", "{out:?}");
    assert_nothing_left(&sb, request(&u, "", Duration::from_secs(30))).await;
    cleanup(&sb, &[&u]).await;
}

/// Runs `program args` on the host as `ids` with no supplementary groups: what a process that
/// escaped a container of that uid could do. Returns (success, stdout + stderr).
fn run_on_host_as(ids: SandboxIds, program: &str, args: &[&str]) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).env_clear().env("PATH", "/usr/bin:/bin");
    // SAFETY: only async-signal-safe system calls before exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
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

/// The host pid of the process whose command line is exactly `cmdline` and whose real uid is
/// `uid`, waiting up to 20 s for it to appear.
async fn host_pid_of(cmdline: &str, uid: u32) -> u32 {
    for _ in 0..400 {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if String::from_utf8_lossy(&raw).replace('\0', " ").trim_end() != cmdline {
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

/// Two users' containers run their commands as two different host uids; what each makes in
/// its home belongs to that uid on the host, and the other uid cannot read it.
#[tokio::test]
async fn docker_users_run_as_their_own_uids_and_own_their_files() {
    if ready().await.is_none() {
        return;
    }
    if !disk::can_enforce() {
        println!("SKIP: per-user uids need a root gateway");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let sb = DockerSandbox::connect(&settings(
        SandboxScope::User,
        "test",
        "docker_users_run_as_their_own_uids",
    ))
    .unwrap();
    let (a, b) = (user("uida"), user("uidb"));
    for u in [&a, &b] {
        let out = sh(
            &sb,
            u,
            "id -u; id -g; id -un; echo mine > mine.txt; mkdir d",
        )
        .await;
        let ids = ids_of(u);
        assert_eq!(
            out.stdout,
            format!("{}\n{}\nagent\n", ids.uid, ids.gid),
            "{out:?}"
        );
        for path in [
            home_of(u),
            home_of(u).join("mine.txt"),
            home_of(u).join("d"),
        ] {
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (ids.uid, ids.gid), "{path:?}");
        }
        assert_eq!(std::fs::metadata(home_of(u)).unwrap().mode() & 0o777, 0o700);
    }
    assert_ne!(ids_of(&a).uid, ids_of(&b).uid);
    let theirs = home_of(&b).join("mine.txt");
    let (ok, text) = run_on_host_as(ids_of(&a), "cat", &[theirs.to_str().unwrap()]);
    assert!(!ok && text.contains("Permission denied"), "{text}");
    cleanup(&sb, &[&a, &b]).await;
}

/// A live container of one user is out of reach of every other uid, even through
/// `/proc/<pid>/root`: from another user's container (its own pid namespace) and from the
/// host as another user's uid or as uid 1000 (the first login, the old shared sandbox uid).
#[tokio::test]
async fn docker_live_sandbox_is_out_of_reach_through_proc_root() {
    if ready().await.is_none() {
        return;
    }
    if !disk::can_enforce() {
        println!("SKIP: per-user uids need a root gateway");
        return;
    }
    let sb = std::sync::Arc::new(
        DockerSandbox::connect(&settings(
            SandboxScope::User,
            "test",
            "docker_live_sandbox_is_out_of_reach",
        ))
        .unwrap(),
    );
    let (a, b) = (user("proca"), user("procb"));
    sh(&sb, &b, "echo bob-secret > secret.txt").await;
    let marker = format!(
        "{}.{}",
        500 + rand::random::<u32>() % 100,
        rand::random::<u32>() % 1_000_000 + 1
    );
    let mut long = request(&b, "", Duration::from_secs(60));
    long.command = ExecCommand::Argv(vec!["sleep".into(), marker.clone()]);
    let running = {
        let sb = sb.clone();
        tokio::spawn(async move { sb.exec(long).await })
    };
    let pid = host_pid_of(&format!("sleep {marker}"), ids_of(&b).uid).await;
    let through = format!("/proc/{pid}/root/workspace/secret.txt");
    // Control: the path does lead to the file (root can follow it).
    assert_eq!(std::fs::read_to_string(&through).unwrap(), "bob-secret\n");
    for (who, ids) in [
        ("the other user", ids_of(&a)),
        ("uid 1000", SandboxIds::same(1000)),
    ] {
        let (ok, text) = run_on_host_as(ids, "cat", &[through.as_str()]);
        assert!(!ok && text.contains("Permission denied"), "{who}: {text}");
        let (ok, text) = run_on_host_as(ids, "kill", &["-0", &pid.to_string()]);
        assert!(!ok, "{who} may signal the container's process: {text}");
    }
    let out = sh(
        &sb,
        &a,
        &format!("cat {through} 2>&1; for p in /proc/[0-9]*; do cat $p/root/workspace/secret.txt 2>/dev/null; done; echo end"),
    )
    .await;
    assert!(!out.stdout.contains("bob-secret"), "{out:?}");
    assert!(out.stdout.ends_with("end\n"), "{out:?}");
    // SAFETY: kill(2) on the sleep this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let out = running.await.unwrap().unwrap();
    assert_ne!(out.exit_code, Some(0), "{out:?}");
    cleanup(&sb, &[&a, &b]).await;
}

/// Family members (each their own uid, each their own container) both read and write
/// `/family`, each other's files and directories too, through the family's gid; a non-member
/// given the folder cannot, nor can the non-member's uid on the host.
#[tokio::test]
async fn docker_family_members_share_the_family_folder_and_others_cannot() {
    if ready().await.is_none() {
        return;
    }
    if !disk::can_enforce() {
        println!("SKIP: per-user uids need a root gateway");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let sb = DockerSandbox::connect(&settings(
        SandboxScope::User,
        "test",
        "docker_family_members_share",
    ))
    .unwrap();
    let (a, b, c) = (user("fama"), user("famb"), user("famc"));
    let family = PathBuf::from(ROOT).join("families").join(a.as_str());
    std::fs::create_dir_all(&family).unwrap();
    let fam_gid = ids_of(&a).gid + 1;
    let member = |u: &UserId, command: &str| {
        let mut r = request(u, command, Duration::from_secs(30));
        r.family = Some(family.clone());
        r.family_gid = Some(fam_gid);
        r
    };
    let out = run(
        &sb,
        member(
            &a,
            "echo from a > /family/a.txt && mkdir /family/a-dir && echo ok",
        ),
    )
    .await;
    assert_eq!(out.stdout, "ok\n", "{out:?}");
    let out = run(
        &sb,
        member(&b, "cat /family/a.txt && echo b was here >> /family/a.txt && echo from b > /family/a-dir/b.txt && echo ok"),
    )
    .await;
    assert_eq!(out.stdout, "from a\nok\n", "{out:?}");
    let out = run(
        &sb,
        member(&a, "cat /family/a.txt /family/a-dir/b.txt; id -Gn"),
    )
    .await;
    assert_eq!(
        out.stdout, "from a\nb was here\nfrom b\nagent family\n",
        "{out:?}"
    );
    let root = std::fs::metadata(&family).unwrap();
    assert_eq!((root.gid(), root.mode() & 0o7777), (fam_gid, 0o2770));
    let file = std::fs::metadata(family.join("a.txt")).unwrap();
    assert_eq!(
        (file.uid(), file.gid(), file.mode() & 0o777),
        (ids_of(&a).uid, fam_gid, 0o660)
    );
    let dir = std::fs::metadata(family.join("a-dir")).unwrap();
    assert_eq!((dir.gid(), dir.mode() & 0o7777), (fam_gid, 0o2770));

    let mut r = request(
        &c,
        "cat /family/a.txt 2>&1; ls /family 2>&1; touch /family/c 2>&1; echo end",
        Duration::from_secs(30),
    );
    r.family = Some(family.clone());
    let out = run(&sb, r).await;
    assert!(!out.stdout.contains("from a"), "{out:?}");
    assert_eq!(
        out.stdout.matches("Permission denied").count(),
        3,
        "{out:?}"
    );
    let path = family.join("a.txt");
    let (ok, text) = run_on_host_as(ids_of(&c), "cat", &[path.to_str().unwrap()]);
    assert!(!ok && text.contains("Permission denied"), "{text}");
    cleanup(&sb, &[&a, &b, &c]).await;
    let _ = disk::release_user_volume(&family);
    let _ = std::fs::remove_dir_all(&family);
}

/// `end_user` (the user was removed or reset) removes every container of that user — also
/// one running a command, whose exec then fails — and returns once they are gone, even when
/// another process removes the same container at the same time; another user's container
/// stays and keeps working.
#[tokio::test]
async fn docker_end_user_removes_the_users_containers_and_no_one_elses() {
    if ready().await.is_none() {
        return;
    }
    let sb = std::sync::Arc::new(
        DockerSandbox::connect(&settings(SandboxScope::User, "test", "docker_end_user")).unwrap(),
    );
    let (anna, bob) = (user("end"), user("end"));
    sh(&sb, &bob, "true").await;
    let running = {
        let sb = std::sync::Arc::clone(&sb);
        let request = request(&anna, "sleep 300 & sleep 300", Duration::from_secs(60));
        tokio::spawn(async move { sb.exec(request).await })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sb
        .list()
        .await
        .unwrap()
        .iter()
        .any(|i| i.user == anna.as_str())
    {
        assert!(Instant::now() < deadline, "anna's container never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A second process (the CLI next to the gateway) removes at the same time.
    let other =
        DockerSandbox::connect(&settings(SandboxScope::User, "test", "docker_end_user")).unwrap();
    let (mine, theirs) = tokio::join!(sb.end_user(&anna), other.remove_user(&anna));
    mine.unwrap();
    theirs.unwrap();
    let users: Vec<String> = sb
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.user)
        .collect();
    assert!(!users.contains(&anna.to_string()), "{users:?}");
    assert!(users.contains(&bob.to_string()), "{users:?}");
    // The exec's stream ends once Docker has torn the container down, which a busy daemon can
    // take a while to report (the gateway does not wait for it: it aborts the user's turn).
    let result = tokio::time::timeout(Duration::from_secs(90), running)
        .await
        .expect("the running exec ends with its container")
        .unwrap();
    assert!(
        result.is_err() || result.as_ref().is_ok_and(|o| o.exit_code != Some(0)),
        "{result:?}"
    );
    assert_eq!(sh(&sb, &bob, "echo still").await.stdout, "still\n");
    cleanup(&sb, &[&anna, &bob]).await;
}

/// A Unix-socket relay in front of the engine that holds every container create request for
/// `hold` before passing it on, and keeps the engine's side of the connection open after the
/// client hung up: a create request "in flight" for as long as the test needs, as when a busy
/// engine is slow to create.
struct SlowCreates {
    socket: PathBuf,
    /// Notified when a create request arrives (before it is held).
    seen: std::sync::Arc<tokio::sync::Notify>,
    /// Notified when a held create request has been passed on to the engine.
    passed: std::sync::Arc<tokio::sync::Notify>,
}

impl SlowCreates {
    async fn start(dir: &Path, hold: Duration) -> SlowCreates {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("engine.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let seen = std::sync::Arc::new(tokio::sync::Notify::new());
        let passed = std::sync::Arc::new(tokio::sync::Notify::new());
        let (s, p) = (seen.clone(), passed.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(Self::relay(client, hold, s.clone(), p.clone()));
            }
        });
        SlowCreates {
            socket,
            seen,
            passed,
        }
    }

    async fn relay(
        client: tokio::net::UnixStream,
        hold: Duration,
        seen: std::sync::Arc<tokio::sync::Notify>,
        passed: std::sync::Arc<tokio::sync::Notify>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(engine) = tokio::net::UnixStream::connect("/var/run/docker.sock").await else {
            return;
        };
        let (mut from_client, mut to_client) = client.into_split();
        let (mut from_engine, mut to_engine) = engine.into_split();
        let up = async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match from_client.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let create = buf[..n]
                    .windows(b"/containers/create".len())
                    .any(|w| w == b"/containers/create");
                if create {
                    seen.notify_one();
                    tokio::time::sleep(hold).await;
                }
                if to_engine.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                if create {
                    passed.notify_one();
                }
            }
            // Not closed: the engine goes on with what it was sent, as it would for a client
            // still connected.
            to_engine
        };
        let down = async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = from_engine.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let _ = to_client.write_all(&buf[..n]).await;
            }
        };
        let (_to_engine, ()) = tokio::join!(up, down);
    }
}

/// Every container of `user` the engine has, in any state (`Created` included) and of any
/// installation.
async fn containers_of(user: &UserId) -> Vec<String> {
    let s = settings(SandboxScope::User, "test", "prepare");
    let docker = moltmate_sandbox::docker::connect_client(&s).unwrap();
    let mut filters = std::collections::HashMap::new();
    filters.insert(
        "label".to_string(),
        vec![format!("moltmate.user={}", user.as_str())],
    );
    let options = bollard::query_parameters::ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    docker
        .list_containers(Some(options))
        .await
        .unwrap()
        .into_iter()
        .map(|c| {
            format!(
                "{} ({})",
                c.names.unwrap_or_default().join(","),
                c.state.map(|s| s.to_string()).unwrap_or_default()
            )
        })
        .collect()
}

/// Starts an `exec` of a new user through a relay that holds its container's create request
/// for a second, and aborts it once that request is at the relay (as the gateway aborts the
/// turn of a user being removed, or drops a prewarm when its quick turn ends). Returns the
/// backend, the user and the relay.
async fn creation_cut_short(state: &str) -> (std::sync::Arc<DockerSandbox>, UserId, SlowCreates) {
    let mut s = settings(SandboxScope::User, "test", state);
    let engine = SlowCreates::start(&s.state_dir, Duration::from_secs(1)).await;
    s.docker_host = Some(format!("unix://{}", engine.socket.display()));
    let sb = std::sync::Arc::new(DockerSandbox::connect(&s).unwrap());
    let u = user("creating");
    let creating = {
        let sb = std::sync::Arc::clone(&sb);
        let request = request(&u, "true", Duration::from_secs(30));
        tokio::spawn(async move { sb.exec(request).await })
    };
    tokio::time::timeout(Duration::from_secs(60), engine.seen.notified())
        .await
        .expect("the create request reaches the engine");
    creating.abort();
    let _ = creating.await;
    (sb, u, engine)
}

/// After the held create request went on to the engine (and the engine had time to finish
/// it), no container of `u` may exist, in any state. Cleans up before asserting.
async fn assert_no_container_after(sb: &DockerSandbox, u: &UserId, engine: &SlowCreates) {
    tokio::time::timeout(Duration::from_secs(30), engine.passed.notified())
        .await
        .expect("the held create request is passed on");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let left = containers_of(u).await;
    cleanup(sb, &[u]).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The user is removed while their container is being created: the command creating it was
/// aborted with the create request already at the engine, and the removal runs before the
/// engine has made the container. Nothing of the user may stay behind — formerly the engine
/// finished the create after the removal's sweep, and the container stayed `Created` for good,
/// unknown to everyone.
#[tokio::test]
async fn a_removal_during_container_creation_leaves_no_container() {
    if ready().await.is_none() {
        return;
    }
    let (sb, u, engine) = creation_cut_short("removal_during_creation").await;
    sb.remove_user(&u)
        .await
        .expect("remove the user's containers");
    assert_no_container_after(&sb, &u, &engine).await;
}

/// The same at shutdown: a prune of everything (what a test gateway's stop does after its
/// drain) while a container whose caller is gone is being created removes that container too,
/// instead of missing it and leaving it to die half-made with the runtime.
#[tokio::test]
async fn a_prune_during_container_creation_leaves_no_container() {
    if ready().await.is_none() {
        return;
    }
    let (sb, u, engine) = creation_cut_short("prune_during_creation").await;
    sb.prune(Duration::ZERO).await.expect("prune");
    assert_no_container_after(&sb, &u, &engine).await;
}

/// `maxActive: 1` with a container of Anna's alive. A second process on the same installation
/// that does not own what it finds (a terminal `moltmate chat` beside the gateway) runs Ben's
/// command without stopping Anna's container — from there it cannot know whether the gateway is
/// running a command in it. The gateway's own restart (which does own them) makes room by
/// stopping the idle one, as the cap says.
#[tokio::test]
async fn docker_a_terminal_chat_never_stops_the_gateways_sandboxes() {
    use moltmate_sandbox::total::{SandboxBounds, TotalLimits, TotalSettings};
    if ready().await.is_none() {
        return;
    }
    let state = "docker_a_terminal_chat_never_stops_the_gateways_sandboxes";
    let bounded = |adopt_found: bool| {
        let sb = DockerSandbox::connect(&settings(SandboxScope::User, "test", state)).unwrap();
        let total = TotalSettings {
            limits: TotalLimits {
                memory_bytes: 1 << 30,
                cpu_millis: 1000,
                pids: 1024,
            },
            cgroup_name: "unused".into(),
            max_active: 1,
            queue_timeout: Duration::from_secs(5),
            adopt_found,
        };
        // No parent cgroup here: this test is about the cap only.
        sb.with_bounds(SandboxBounds::with_parent(
            total,
            Err("not in this test".into()),
        ))
    };
    let (anna, ben) = (user("owner"), user("chat"));
    let gateway = bounded(true);
    sh(&gateway, &anna, "echo anna").await;
    assert!(alive(&gateway, &anna).await);

    let chat = bounded(false);
    assert_eq!(sh(&chat, &ben, "echo ben").await.stdout, "ben\n");
    assert!(
        alive(&chat, &anna).await,
        "the terminal chat stopped a container it does not own"
    );
    assert_eq!(chat.aggregate().await.unwrap().evicted, 0);

    // The gateway restarted owns both: Ben's next command there stops the idle one over the cap.
    let restarted = bounded(true);
    assert_eq!(sh(&restarted, &ben, "echo again").await.stdout, "again\n");
    let aggregate = restarted.aggregate().await.unwrap();
    assert_eq!(
        (aggregate.alive, aggregate.max_active),
        (1, 1),
        "{aggregate:?}"
    );
    assert!(
        !alive(&restarted, &anna).await,
        "over the cap, the idle one went"
    );
    cleanup(&restarted, &[&anna, &ben]).await;
}

async fn alive(sb: &DockerSandbox, u: &UserId) -> bool {
    sb.list()
        .await
        .unwrap()
        .iter()
        .any(|i| i.user == u.as_str())
}

/// `maxActive: 1`: a terminal `moltmate chat` runs a long command in Anna's container, which
/// the gateway counts as idle (it cannot see the other process's command). Ben's command
/// through the gateway would stop it to make room; instead it does not start, the model is
/// told why, and Anna's command finishes. Once it has, Ben's command makes room as usual.
#[tokio::test]
async fn docker_a_sandbox_busy_in_a_terminal_chat_is_not_stopped_by_the_gateway() {
    use moltmate_sandbox::total::{SandboxBounds, TotalLimits, TotalSettings};
    if ready().await.is_none() {
        return;
    }
    let state = "docker_a_sandbox_busy_in_a_terminal_chat_is_not_stopped";
    let bounded = |adopt_found: bool| {
        let sb = DockerSandbox::connect(&settings(SandboxScope::User, "test", state)).unwrap();
        let total = TotalSettings {
            limits: TotalLimits {
                memory_bytes: 1 << 30,
                cpu_millis: 1000,
                pids: 1024,
            },
            cgroup_name: "unused".into(),
            max_active: 1,
            queue_timeout: Duration::from_secs(5),
            adopt_found,
        };
        sb.with_bounds(SandboxBounds::with_parent(
            total,
            Err("not in this test".into()),
        ))
    };
    let (anna, ben) = (user("term"), user("gw"));
    let gateway = bounded(true);
    sh(&gateway, &anna, "echo anna").await;
    let chat = bounded(false);
    let long = chat.exec(request(
        &anna,
        "sleep 3; echo done-anna",
        Duration::from_secs(30),
    ));
    let from_gateway = async {
        // Until the terminal's command runs (its marker is there).
        let busy_dir = Path::new(ROOT).join(short(state)).join("docker-busy");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::read_dir(&busy_dir)
            .map(|d| {
                d.flatten()
                    .all(|c| std::fs::read_dir(c.path()).map_or(true, |mut m| m.next().is_none()))
            })
            .unwrap_or(true)
        {
            assert!(
                Instant::now() < deadline,
                "the terminal's command never ran"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        gateway
            .exec(request(&ben, "echo ben", Duration::from_secs(30)))
            .await
    };
    let (long, refused) = tokio::join!(long, from_gateway);
    assert_eq!(long.expect("anna's command").stdout, "done-anna\n");
    let err = refused.expect_err("no room while anna's sandbox runs a command");
    assert!(
        matches!(err, moltmate_core::sandbox::SandboxError::Busy(_))
            && err.to_string().contains("terminal session"),
        "{err}"
    );
    assert!(alive(&gateway, &anna).await);
    assert_eq!(gateway.aggregate().await.unwrap().evicted, 0);

    // Anna's command is over: Ben's makes room by stopping her idle container.
    assert_eq!(sh(&gateway, &ben, "echo ben").await.stdout, "ben\n");
    assert!(!alive(&gateway, &anna).await);
    assert_eq!(gateway.aggregate().await.unwrap().evicted, 1);
    cleanup(&gateway, &[&anna, &ben]).await;
}
