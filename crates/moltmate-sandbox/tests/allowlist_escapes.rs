//! `tools.exec.security: "allowlist"` against known escapes (GTFOBins-style: shell escapes,
//! command execution, file writes, file reads outside /workspace), with the default `safeBins`,
//! through the real exec policy and on both real backends.
//!
//! Every line of [`ESCAPES`] is either refused by the policy (and stays refused when an operator
//! lists the escaping program anyway, bypassing config validation), or accepted and then run in
//! Docker and in bubblewrap, where it must be provably harmless: no `id` output, no secret
//! planted outside the workspace, no file created, changed or removed in the workspace or (for
//! Docker, whose `/tmp` outlives a command) in `/tmp`. A control run of real escapes, bypassing
//! the policy, shows that these checks do catch an escape.
//!
//! Backends that are unavailable make their test print `SKIP: <reason>` and pass, unless
//! `MOLTMATE_REQUIRE_SANDBOX=1`.

use moltmate_core::allowlist::DEFAULT_SAFE_BINS;
use moltmate_core::sandbox::{
    ExecCommand, ExecOutput, ExecRequest, ExecSecurity, ExecSettings, Sandbox, SandboxIds,
    SandboxLimits, SandboxProfile,
};
use moltmate_core::UserId;
use moltmate_sandbox::bwrap::BwrapSandbox;
use moltmate_sandbox::docker::{docker_available, DockerSandbox};
use moltmate_sandbox::policy::{vet_command, ExecRefusal};
use moltmate_sandbox::{image, BackendChoice, SandboxScope, SandboxSettings};
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What the policy must do with a line.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Refused; the message contains this.
    Refused(&'static str),
    /// Accepted; running it must be harmless.
    Runs,
}
use Expect::{Refused, Runs};

/// `{SECRET_FILE}` / `{HOST_DIR}` are replaced by a file and a directory outside the workspace
/// on the host, both holding the secret marker.
const ESCAPES: &[(&str, Expect)] = &[
    // Shells and interpreters: command execution.
    ("sh -c id", Refused("program `sh` is not allowed")),
    (
        "bash -c 'id > /workspace/pwned'",
        Refused("program `bash` is not allowed"),
    ),
    ("dash -c id", Refused("program `dash` is not allowed")),
    (
        "busybox sh -c id",
        Refused("program `busybox` is not allowed"),
    ),
    ("echo id | sh", Refused("program `sh` is not allowed")),
    (
        "python3 -c 'import os; os.system(\"id\")'",
        Refused("program `python3` is not allowed"),
    ),
    (
        "python3.11 -c 'import os'",
        Refused("program `python3.11` is not allowed"),
    ),
    (
        "perl -e 'exec \"id\"'",
        Refused("program `perl` is not allowed"),
    ),
    (
        "ruby -e 'exec \"id\"'",
        Refused("program `ruby` is not allowed"),
    ),
    (
        "node -e 'require(\"child_process\").execSync(\"id\")'",
        Refused("program `node` is not allowed"),
    ),
    // awk, sed, find, sort: the programs the old default list held.
    (
        "awk 'BEGIN{system(\"id\")}'",
        Refused("program `awk` is not allowed"),
    ),
    (
        "gawk 'BEGIN{system(\"touch /workspace/pwned\")}'",
        Refused("program `gawk` is not allowed"),
    ),
    (
        "mawk 'BEGIN{print > \"/workspace/pwned\"}'",
        Refused("program `mawk` is not allowed"),
    ),
    (
        "cat in.txt | awk '{system($0)}'",
        Refused("program `awk` is not allowed"),
    ),
    (
        "sed -n '1e id' in.txt",
        Refused("program `sed` is not allowed"),
    ),
    (
        "sed -n 's/.*/id/ep' in.txt",
        Refused("program `sed` is not allowed"),
    ),
    (
        "sed 'w pwned' in.txt",
        Refused("program `sed` is not allowed"),
    ),
    (
        "sed -i s/a/b/ in.txt",
        Refused("program `sed` is not allowed"),
    ),
    (
        "find . -exec id \\;",
        Refused("program `find` is not allowed"),
    ),
    (
        "find . -fprintf pwned x",
        Refused("program `find` is not allowed"),
    ),
    ("find . -delete", Refused("program `find` is not allowed")),
    (
        "sort --compress-program=id in.txt",
        Refused("program `sort` is not allowed"),
    ),
    (
        "cat in.txt | sort --compress-prog=id -S 1 -T /tmp",
        Refused("program `sort` is not allowed"),
    ),
    (
        "sort -o pwned in.txt",
        Refused("program `sort` is not allowed"),
    ),
    // Wrappers that run the program in their arguments.
    ("env id", Refused("program `env` is not allowed")),
    ("env -i sh -c id", Refused("program `env` is not allowed")),
    (
        "xargs -a in.txt id",
        Refused("program `xargs` is not allowed"),
    ),
    (
        "cat in.txt | xargs id",
        Refused("program `xargs` is not allowed"),
    ),
    ("timeout 5 id", Refused("program `timeout` is not allowed")),
    ("nice id", Refused("program `nice` is not allowed")),
    ("nohup id", Refused("program `nohup` is not allowed")),
    ("stdbuf -o0 id", Refused("program `stdbuf` is not allowed")),
    ("setsid id", Refused("program `setsid` is not allowed")),
    ("flock /tmp/l id", Refused("program `flock` is not allowed")),
    (
        "split --filter=id in.txt",
        Refused("program `split` is not allowed"),
    ),
    // Archivers, VCS, network, editors, pagers.
    (
        "tar -cf /dev/null in.txt --checkpoint=1 --checkpoint-action=exec=id",
        Refused("program `tar` is not allowed"),
    ),
    (
        "zip /tmp/x.zip in.txt -T -TT 'id #'",
        Refused("program `zip` is not allowed"),
    ),
    (
        "git -c core.pager=id log",
        Refused("program `git` is not allowed"),
    ),
    (
        "ssh -o ProxyCommand=id x",
        Refused("program `ssh` is not allowed"),
    ),
    (
        "rsync -e id x:y .",
        Refused("program `rsync` is not allowed"),
    ),
    ("vi -c ':!id'", Refused("program `vi` is not allowed")),
    ("ed in.txt", Refused("program `ed` is not allowed")),
    ("less in.txt", Refused("program `less` is not allowed")),
    ("man id", Refused("program `man` is not allowed")),
    ("dc -e '!id'", Refused("program `dc` is not allowed")),
    ("make -f in.txt", Refused("program `make` is not allowed")),
    // File writers.
    (
        "echo x | tee pwned",
        Refused("program `tee` is not allowed"),
    ),
    (
        "dd if=in.txt of=pwned",
        Refused("program `dd` is not allowed"),
    ),
    ("cp in.txt pwned", Refused("program `cp` is not allowed")),
    ("mv in.txt pwned", Refused("program `mv` is not allowed")),
    // Shell builtins (pipelines run through /bin/sh).
    ("exec id", Refused("program `exec` is not allowed")),
    ("eval id", Refused("program `eval` is not allowed")),
    (
        "echo x | command id",
        Refused("program `command` is not allowed"),
    ),
    ("kill -9 1", Refused("program `kill` is not allowed")),
    // Paths and shell syntax.
    ("/usr/bin/id", Refused("program path `/usr/bin/id`")),
    ("/bin/sh -c id", Refused("program path `/bin/sh`")),
    ("./pwned", Refused("program path `./pwned`")),
    ("echo $(id)", Refused("command substitution")),
    ("echo `id`", Refused("backticks")),
    ("cat in.txt > pwned", Refused("redirection `>`")),
    ("uniq in.txt >pwned", Refused("redirection `>`")),
    ("cat in.txt; id", Refused("`;`")),
    ("cat in.txt && id", Refused("`&&`")),
    ("cat in.txt\nid", Refused("a newline")),
    ("cat$IFS/etc/passwd", Refused("variable expansion")),
    // Safe bins with a dangerous operand or option: every spelling.
    ("uniq in.txt pwned", Refused("a file uniq would write")),
    ("uniq -c in.txt pwned", Refused("a file uniq would write")),
    ("uniq -cf1 in.txt pwned", Refused("a file uniq would write")),
    (
        "uniq -c -f 1 in.txt pwned",
        Refused("a file uniq would write"),
    ),
    (
        "uniq --skip-fields=1 in.txt pwned",
        Refused("a file uniq would write"),
    ),
    (
        "uniq --skip-fields 1 in.txt pwned",
        Refused("a file uniq would write"),
    ),
    ("uniq -- in.txt pwned", Refused("a file uniq would write")),
    (
        "uniq in.txt -- pwned",
        Refused("put options before file names"),
    ),
    (
        "uniq in.txt pwned -c",
        Refused("put options before file names"),
    ),
    (
        "cat in.txt | uniq - pwned",
        Refused("a file uniq would write"),
    ),
    (
        "cat in.txt | uniq -c | uniq - pwned",
        Refused("a file uniq would write"),
    ),
    (
        "uniq --skip-f=1 in.txt pwned",
        Refused("write long options in full"),
    ),
    ("date -s 2000-01-01", Refused("sets the system clock")),
    ("date -us 2000-01-01", Refused("sets the system clock")),
    ("date --set=2000-01-01", Refused("sets the system clock")),
    ("date --set 2000-01-01", Refused("sets the system clock")),
    (
        "date --se=2000-01-01",
        Refused("write long options in full"),
    ),
    ("date 0101000070", Refused("would set the system clock")),
    (
        "date -u -- 0101000070",
        Refused("would set the system clock"),
    ),
    (
        "pdftotext in.pdf",
        Refused("writes a text file next to `in.pdf`"),
    ),
    (
        "pdftotext in.pdf pwned",
        Refused("a file pdftotext would write"),
    ),
    (
        "pdftotext -- in.pdf pwned",
        Refused("a file pdftotext would write"),
    ),
    (
        "pdftotext -layout in.pdf pwned",
        Refused("a file pdftotext would write"),
    ),
    (
        "pdftotext -f1 in.pdf -",
        Refused("not an option pdftotext accepts"),
    ),
    // Accepted: reads outside /workspace, slow readers, pipelines of allowed programs.
    ("uniq in.txt -", Runs),
    ("uniq -c -- in.txt -", Runs),
    ("cat in.txt | uniq -c", Runs),
    ("cat in.txt | grep -v zzz | uniq -c | wc -l", Runs),
    ("echo id | cat", Runs),
    ("pdftotext in.pdf -", Runs),
    ("pdftotext -layout -- in.pdf -", Runs),
    ("date -f /etc/shadow", Runs),
    ("date -r {SECRET_FILE}", Runs),
    ("date -d 'TZ=\"/etc/shadow\" now'", Runs),
    ("cat /etc/shadow", Runs),
    ("cat {SECRET_FILE}", Runs),
    ("grep -r MOLTMATE {HOST_DIR}", Runs),
    ("ls -la {HOST_DIR}", Runs),
    ("wc --files0-from=/etc/shadow", Runs),
    ("head -c 200 /proc/1/environ", Runs),
    ("cat /proc/self/environ", Runs),
    ("ls -la /var/run/docker.sock /run/docker.sock /root", Runs),
    ("cut -d: -f1 /etc/passwd", Runs),
    ("tail -f /dev/null", Runs),
    ("head -c 100000 /dev/zero | wc -c", Runs),
    ("tr a-z A-Z", Runs),
];

const SECRET: &str = "MOLTMATE-ESCAPE-SECRET-7f3a";
const SECRET_ENV: &str = "MOLTMATE_ESCAPE_TEST_SECRET";

fn default_settings() -> ExecSettings {
    ExecSettings {
        security: ExecSecurity::Allowlist,
        safe_bins: DEFAULT_SAFE_BINS.iter().map(|b| b.to_string()).collect(),
        vouched_bins: Vec::new(),
        blocked_bins: Vec::new(),
        default_timeout: Duration::from_secs(5),
        max_timeout: Duration::from_secs(5),
    }
}

fn expand(line: &str, host: &HostFiles) -> String {
    line.replace("{SECRET_FILE}", &host.secret_file.display().to_string())
        .replace("{HOST_DIR}", &host.dir.display().to_string())
}

/// A file and a directory outside every workspace, holding the secret.
struct HostFiles {
    dir: PathBuf,
    secret_file: PathBuf,
}

impl HostFiles {
    fn new(root: &Path) -> Self {
        let dir = root.join("host-only");
        std::fs::create_dir_all(&dir).unwrap();
        let secret_file = dir.join("secret.txt");
        std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
        // Readable by anyone on the host, so only the sandbox's view can keep it out.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        HostFiles { dir, secret_file }
    }
}

#[test]
fn the_escape_table_is_large_enough() {
    assert!(ESCAPES.len() >= 40, "{}", ESCAPES.len());
    let runs = ESCAPES.iter().filter(|(_, e)| matches!(e, Runs)).count();
    assert!(runs >= 10, "{runs}");
}

/// The real policy with the default list: refused where expected, accepted where expected.
#[test]
fn default_allowlist_refuses_every_escape() {
    let host = HostFiles::new(
        &std::env::temp_dir().join(format!("moltmate-escape-policy-{}", std::process::id())),
    );
    let settings = default_settings();
    let mut failures = Vec::new();
    for (line, expect) in ESCAPES {
        let line = expand(line, &host);
        match (vet_command(&line, &settings), expect) {
            (Err(refusal), Refused(needle)) => {
                let text = refusal.to_string();
                if !text.contains(needle) {
                    failures.push(format!("{line:?}: refused with {text:?}, lacks {needle:?}"));
                }
            }
            (Ok(_), Runs) => {}
            (outcome, expect) => {
                failures.push(format!("{line:?}: expected {expect:?}, got {outcome:?}"))
            }
        }
    }
    let _ = std::fs::remove_dir_all(host.dir.parent().unwrap());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// An operator who lists an escaping program anyway (settings that skipped config validation)
/// still gets every program-refused escape refused: by the runner check, or for a safe bin by
/// its argument rules.
#[test]
fn listing_an_escaping_program_does_not_allow_its_escape() {
    for (line, expect) in ESCAPES {
        let Refused(needle) = expect else { continue };
        let Some(program) = needle
            .strip_prefix("program `")
            .and_then(|rest| rest.strip_suffix("` is not allowed"))
        else {
            continue;
        };
        let mut settings = default_settings();
        settings.safe_bins.push(program.to_string());
        match vet_command(line, &settings) {
            Err(ExecRefusal::Runner { program: p, why }) => {
                assert_eq!(p, program, "{line}");
                assert!(!why.is_empty());
            }
            other => panic!("{line:?} with {program} listed: {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// running the accepted lines

/// A minimal one-page PDF saying "hello pdf".
fn tiny_pdf() -> Vec<u8> {
    let content = "BT /F1 12 Tf 20 100 Td (hello pdf) Tj ET";
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_string(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>".to_string(),
        format!("<< /Length {} >>\nstream\n{content}\nendstream", content.len()),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_string(),
    ];
    let mut pdf = String::from("%PDF-1.4\n");
    let mut offsets = Vec::new();
    for (i, body) in objects.iter().enumerate() {
        offsets.push(pdf.len());
        pdf.push_str(&format!("{} 0 obj\n{body}\nendobj\n", i + 1));
    }
    let xref = pdf.len();
    pdf.push_str(&format!(
        "xref\n0 {}\n0000000000 65535 f \n",
        objects.len() + 1
    ));
    for offset in offsets {
        pdf.push_str(&format!("{offset:010} 00000 n \n"));
    }
    pdf.push_str(&format!(
        "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
        objects.len() + 1
    ));
    pdf.into_bytes()
}

fn fill_workspace(home: &Path) {
    std::fs::create_dir_all(home).unwrap();
    std::fs::write(home.join("in.txt"), "b\na\na\nid\n").unwrap();
    std::fs::write(home.join("in.pdf"), tiny_pdf()).unwrap();
    for f in ["in.txt", "in.pdf"] {
        std::fs::set_permissions(home.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

/// Every entry below `dir`: relative path → (size, mtime, mode).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, i64, i64, u32)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path.clone());
            }
            let rel = path.strip_prefix(dir).unwrap_or(&path).to_path_buf();
            out.insert(
                rel,
                (meta.len(), meta.mtime(), meta.mtime_nsec(), meta.mode()),
            );
        }
    }
    out
}

/// The sandbox ids of a test home, as a root gateway would allocate them: distinct per home
/// (the home path is random).
fn ids_of(home: &Path) -> SandboxIds {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(home.display().to_string().as_bytes());
    let n = u32::from_le_bytes([digest[0], digest[1], digest[2], 0]);
    SandboxIds::same(2_120_000_000 + n % 10_000_000)
}

fn request(user: &UserId, home: &Path, command: ExecCommand, timeout: Duration) -> ExecRequest {
    ExecRequest {
        user: user.clone(),
        home: home.to_path_buf(),
        family: None,
        ids: ids_of(home),
        family_gid: None,
        session_id: "s1".into(),
        command,
        timeout,
        profile: SandboxProfile {
            // No per-user disk image (a loop mount) for these short-lived homes.
            limits: SandboxLimits {
                disk_bytes: 0,
                ..SandboxLimits::default()
            },
            ..SandboxProfile::default()
        },
    }
}

/// What went wrong with one run, if anything: output that only an escape prints, or a
/// workspace changed.
fn harm(
    out: &ExecOutput,
    before: &BTreeMap<PathBuf, (u64, i64, i64, u32)>,
    home: &Path,
) -> Vec<String> {
    let mut found = Vec::new();
    let text = format!("{}{}", out.stdout, out.stderr);
    for needle in ["uid=", SECRET, "sk-ant-escape"] {
        if text.contains(needle) {
            found.push(format!("output holds {needle:?}"));
        }
    }
    if text.contains("root:*:") || text.contains("root:!") || text.contains("root:$") {
        found.push("output holds a shadow password line".into());
    }
    let after = snapshot(home);
    if &after != before {
        found.push(format!(
            "workspace changed: before {before:?}, after {after:?}"
        ));
    }
    found
}

/// Runs every accepted line of [`ESCAPES`] in `sandbox` and asserts it was harmless.
async fn run_accepted_escapes(sandbox: &dyn Sandbox, user: &UserId, home: &Path, host: &HostFiles) {
    fill_workspace(home);
    let settings = default_settings();
    // Warm up (Docker moves the home into place on the first exec), then take the snapshot.
    let warm = sandbox
        .exec(request(
            user,
            home,
            ExecCommand::Argv(vec!["cat".into(), "in.txt".into()]),
            Duration::from_secs(30),
        ))
        .await
        .expect("warm-up exec");
    assert_eq!(warm.stdout, "b\na\na\nid\n", "{warm:?}");
    let tmp_before = sandbox
        .exec(request(
            user,
            home,
            ExecCommand::Argv(vec!["ls".into(), "-A".into(), "/tmp".into()]),
            Duration::from_secs(30),
        ))
        .await
        .expect("ls /tmp");
    let before = snapshot(home);
    let mut failures = Vec::new();
    let mut ran = 0;
    for (line, expect) in ESCAPES {
        if !matches!(expect, Runs) {
            continue;
        }
        let line = expand(line, host);
        let command = vet_command(&line, &settings).expect("accepted by the policy");
        let out = sandbox
            .exec(request(user, home, command, Duration::from_secs(5)))
            .await
            .unwrap_or_else(|e| panic!("{line:?}: {e}"));
        eprintln!(
            "{} {line:?}: exit {:?}, timed out {}, stdout {:?}, stderr {:?}",
            sandbox.backend(),
            out.exit_code,
            out.timed_out,
            out.stdout.chars().take(200).collect::<String>(),
            out.stderr.chars().take(200).collect::<String>()
        );
        for problem in harm(&out, &before, home) {
            failures.push(format!("{line:?}: {problem}"));
        }
        ran += 1;
    }
    let tmp_after = sandbox
        .exec(request(
            user,
            home,
            ExecCommand::Argv(vec!["ls".into(), "-A".into(), "/tmp".into()]),
            Duration::from_secs(30),
        ))
        .await
        .expect("ls /tmp");
    if tmp_after.stdout != tmp_before.stdout {
        failures.push(format!(
            "/tmp changed: {:?} -> {:?}",
            tmp_before.stdout, tmp_after.stdout
        ));
    }
    assert!(ran >= 10);
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The checks catch a real escape: the same programs run without the policy.
    for line in [
        "id",
        "awk 'BEGIN{system(\"id\")}'",
        "sed -n '1e id' in.txt",
        "echo x | uniq - pwned",
    ] {
        let out = sandbox
            .exec(request(
                user,
                home,
                ExecCommand::Shell(line.to_string()),
                Duration::from_secs(10),
            ))
            .await
            .unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(
            !harm(&out, &before, home).is_empty(),
            "the harm check missed the unvetted {line:?}: {out:?}"
        );
        let _ = std::fs::remove_file(home.join("pwned"));
    }

    // `diff` (vetted, not in the default list): `--paginate` runs `pr`, so it is refused; what
    // is accepted runs alone. The control shows the option really does run `pr` here.
    let with_diff = diff_settings();
    for line in [
        "diff -u in.txt in.pdf",
        "diff -q in.txt in.txt",
        "diff --brief -a in.txt in.pdf",
    ] {
        let command = vet_command(line, &with_diff).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        let out = sandbox
            .exec(request(user, home, command, Duration::from_secs(5)))
            .await
            .unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(!out.stdout.contains("Page 1"), "{line:?} ran pr: {out:?}");
        let problems = harm(&out, &before, home);
        assert!(problems.is_empty(), "{line:?}: {problems:?}");
    }
    let control = sandbox
        .exec(request(
            user,
            home,
            ExecCommand::Shell("diff --paginate in.txt in.pdf".into()),
            Duration::from_secs(10),
        ))
        .await
        .expect("unvetted diff --paginate");
    assert!(
        control.stdout.contains("Page 1"),
        "unvetted, --paginate pipes through pr: {control:?}"
    );
}

fn diff_settings() -> ExecSettings {
    let mut settings = default_settings();
    settings.safe_bins.push("diff".into());
    settings
}

/// `diff --paginate` forks `/usr/bin/pr`: refused in every spelling once `diff` is listed, so
/// "no vetted program runs another" holds.
#[test]
fn diff_paginate_runs_pr_and_is_refused_in_every_spelling() {
    let settings = diff_settings();
    for line in [
        "diff --paginate a b",
        "diff -l a b",
        "diff -ql a b",
        "diff -u -l a b",
        "diff --pag a b",
        "diff --paginate=yes a b",
        "diff -u a b | diff -l - b",
    ] {
        let refusal = vet_command(line, &settings).expect_err(line).to_string();
        // Spelled in full it is named as running `pr`; abbreviated or with a value it is
        // refused before that.
        let names_pr = refusal.contains("runs `pr`");
        assert!(
            refusal.contains("`diff`") && (names_pr || line.contains("--pag")),
            "{line:?}: {refusal}"
        );
    }
    for line in [
        "diff a b",
        "diff -u a b",
        "diff -ru --exclude=x a b",
        "diff -U3 a b",
    ] {
        assert!(vet_command(line, &settings).is_ok(), "{line}");
    }
}

fn skip(reason: &str) {
    if std::env::var("MOLTMATE_REQUIRE_SANDBOX").as_deref() == Ok("1") {
        panic!("MOLTMATE_REQUIRE_SANDBOX=1 but the backend is unusable: {reason}");
    }
    println!("SKIP: {reason}");
}

fn test_root(backend: &str) -> PathBuf {
    // Short: Docker state lives below it.
    let root = PathBuf::from(format!(
        "/tmp/mm-esc-{backend}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&root).unwrap();
    root
}

fn sandbox_settings(backend: BackendChoice, root: &Path) -> SandboxSettings {
    SandboxSettings {
        backend,
        scope: SandboxScope::User,
        image: "moltmate-sandbox:bookworm-slim".into(),
        docker_host: None,
        prune_idle: Duration::from_secs(3600),
        state_dir: root.join("sandboxes"),
        allowed_domains: Vec::new(),
        config_digest: "escapes".into(),
    }
}

fn plant_secret_env() {
    // The gateway's environment never reaches a sandbox; a key in it would show in
    // /proc/*/environ if it did.
    std::env::set_var(SECRET_ENV, "sk-ant-escape-test-secret");
}

#[tokio::test]
async fn bwrap_default_allowlist_escapes_are_harmless() {
    plant_secret_env();
    let root = test_root("bwrap");
    let settings = sandbox_settings(BackendChoice::Bwrap, &root);
    let sandbox = match BwrapSandbox::new(&settings, None) {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&root);
            return skip(&e.to_string());
        }
    };
    if let Err(e) = sandbox.probe().await {
        let _ = std::fs::remove_dir_all(&root);
        return skip(&e.to_string());
    }
    let host = HostFiles::new(&root);
    let user = UserId::new(format!("esc-b{}", std::process::id())).unwrap();
    let home = root.join("users").join(user.as_str());
    run_accepted_escapes(&sandbox, &user, &home, &host).await;
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn docker_default_allowlist_escapes_are_harmless() {
    plant_secret_env();
    let root = test_root("docker");
    let settings = sandbox_settings(BackendChoice::Docker, &root);
    if !docker_available(&settings).await {
        let _ = std::fs::remove_dir_all(&root);
        return skip("the Docker daemon does not answer");
    }
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Dockerfile.sandbox");
    if let Err(e) =
        image::ensure_image(&settings, &dockerfile, &|line| eprintln!("build: {line}")).await
    {
        let _ = std::fs::remove_dir_all(&root);
        return skip(&format!(
            "the sandbox image is missing and cannot be built: {e}"
        ));
    }
    let sandbox = DockerSandbox::connect(&settings).unwrap();
    let host = HostFiles::new(&root);
    let user = UserId::new(format!("esc-d{}", std::process::id())).unwrap();
    let home = root.join("users").join(user.as_str());
    run_accepted_escapes(&sandbox, &user, &home, &host).await;
    sandbox
        .remove_user(&user)
        .await
        .expect("remove the container");
    let _ = std::fs::remove_dir_all(&root);
}
