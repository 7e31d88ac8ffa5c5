//! Regressions (issue 9 review): program runners and writers that config validation and the
//! exec policy let into `tools.exec.safeBins`. Each is a binary of the sandbox image
//! `moltmate-sandbox:bookworm-slim` (`ls /usr/bin /usr/sbin` in it).

use moltmate_core::allowlist::{refused_safe_bin, safe_bin_verdict};
use moltmate_core::sandbox::{ExecCommand, ExecSecurity, ExecSettings};
use moltmate_sandbox::policy::vet_command;
use std::time::Duration;

fn allowlist(bins: &[&str]) -> ExecSettings {
    vouched(bins, &[])
}

fn vouched(bins: &[&str], vouched: &[&str]) -> ExecSettings {
    ExecSettings {
        security: ExecSecurity::Allowlist,
        safe_bins: bins.iter().map(|b| b.to_string()).collect(),
        vouched_bins: vouched.iter().map(|b| b.to_string()).collect(),
        blocked_bins: Vec::new(),
        default_timeout: Duration::from_secs(10),
        max_timeout: Duration::from_secs(10),
    }
}

/// Programs in the sandbox image that run another program (or Python code) or write files,
/// and that `refused_safe_bin` did not know. `setarch`, `linux32` and `linux64` are refused,
/// but their aliases `x86_64` and `i386` are not; `nice`/`ionice`/`taskset`/`chrt` are refused,
/// but util-linux's `choom -n N -- cmd` and `uclampset -m N cmd` are not; `python` is refused,
/// but `pdb3` (`pdb3 -c 'import os;os.system("id")' x`) and `pydoc3` (imports = runs the named
/// file; `-w` writes HTML files) are not; `script` is refused, `scriptlive` (re-runs a session
/// through a shell) is not; `vim`/`vi` are refused, Debian's real binary names `vim.basic` /
/// `vim.tiny` are not (the suffix after `.` defeats the version stripping); `vipe` is refused,
/// `vipw`/`vigr` (run $EDITOR) are not; writers: `fallocate`, `rename.ul`, `hardlink`,
/// `tempfile`, `savelog`, `gzexe`, `znew`, `zforce`, `mke2fs`, `mkfs.ext4`, `debugfs`,
/// `e2image`, `c_rehash`, `tic`, `zic`, `py3compile`, `py3clean`, `rmt`.
const UNREFUSED: &[(&str, &str)] = &[
    ("x86_64", "x86_64 sh -c id"),
    ("i386", "i386 sh -c id"),
    ("choom", "choom -n 0 -- sh -c id"),
    ("uclampset", "uclampset -m 0 sh -c id"),
    ("pdb3", "pdb3 -c 'import os' -c 'os.system(\"id\")' x"),
    ("pydoc3", "pydoc3 ./evil.py"),
    ("scriptlive", "scriptlive -c sh -B log"),
    ("vim.basic", "vim.basic -c '!id'"),
    ("vim.tiny", "vim.tiny -c '!id'"),
    ("vipw", "vipw"),
    ("debconf", "debconf sh -c id"),
    ("fallocate", "fallocate -l 1G big"),
    ("rename.ul", "rename.ul a b note.md"),
    ("hardlink", "hardlink ."),
    ("tempfile", "tempfile -d ."),
    ("savelog", "savelog note.md"),
    ("gzexe", "gzexe note.md"),
    ("zforce", "zforce note"),
    ("mkfs.ext4", "mkfs.ext4 -F note.md"),
    ("debugfs", "debugfs -w note.img"),
    ("c_rehash", "c_rehash ."),
    ("py3compile", "py3compile ."),
    ("py3clean", "py3clean ."),
];

/// Regression: each of these passed config validation and the exec policy. Now each is in the
/// known-bad table (so even an operator's `vouchedBins` cannot let it in), and — the class —
/// any name outside the vetted table needs the operator's explicit word.
#[test]
fn runners_and_writers_of_the_sandbox_image_are_refused_as_safe_bins() {
    let mut accepted = Vec::new();
    for (bin, line) in UNREFUSED {
        let known = refused_safe_bin(bin).is_some();
        let by_config = safe_bin_verdict(bin, &[bin.to_string()]).is_err();
        let vetted = vet_command(line, &vouched(&[bin], &[bin]));
        if !known || !by_config || vetted.is_ok() {
            accepted.push(format!("{bin}: `{line}` -> {vetted:?}"));
        }
    }
    assert!(accepted.is_empty(), "accepted:\n{}", accepted.join("\n"));
}

/// Regression: the most direct one — `x86_64` is setarch under another name; the vetted
/// command was the argv `["x86_64", "sh", "-c", "id"]`, which runs a shell.
#[test]
fn a_setarch_alias_does_not_run_a_shell_under_allowlist() {
    assert!(refused_safe_bin("setarch").is_some());
    let vetted = vet_command("x86_64 sh -c id", &allowlist(&["x86_64"]));
    assert!(
        !matches!(vetted, Ok(ExecCommand::Argv(ref argv)) if argv[1] == "sh"),
        "{vetted:?}"
    );
}

/// The class: a program nobody has vetted (here a made-up name, standing for the next runner
/// the table does not know) is refused by the policy unless the operator vouches for it, and
/// the vetted readers keep working.
#[test]
fn unvetted_programs_run_only_when_the_operator_vouches_for_them() {
    let refused = vet_command("mytool --help", &allowlist(&["mytool"]));
    assert!(
        matches!(&refused, Err(e) if e.to_string().contains("vouchedBins")),
        "{refused:?}"
    );
    let vouched_ok = vet_command("mytool --help", &vouched(&["mytool"], &["mytool"]));
    assert!(vouched_ok.is_ok(), "{vouched_ok:?}");
    for line in [
        "jq . data.json",
        "sha256sum note.md",
        "cat a | grep x | wc -l",
    ] {
        let ok = vet_command(line, &allowlist(&["jq", "sha256sum", "cat", "grep", "wc"]));
        assert!(ok.is_ok(), "{line}: {ok:?}");
    }
}
