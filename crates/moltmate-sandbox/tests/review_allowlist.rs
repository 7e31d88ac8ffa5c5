//! Review findings (issue 9): program runners and writers that config validation and the exec
//! policy let into `tools.exec.safeBins`. Each is a binary of the sandbox image
//! `moltmate-sandbox:bookworm-slim` (`ls /usr/bin /usr/sbin` in it). Ignored so the branch
//! stays green; run with `--ignored` to see the failures.

use moltmate_core::allowlist::refused_safe_bin;
use moltmate_core::sandbox::{ExecCommand, ExecSecurity, ExecSettings};
use moltmate_sandbox::policy::vet_command;
use std::time::Duration;

fn allowlist(bins: &[&str]) -> ExecSettings {
    ExecSettings {
        security: ExecSecurity::Allowlist,
        safe_bins: bins.iter().map(|b| b.to_string()).collect(),
        blocked_bins: Vec::new(),
        default_timeout: Duration::from_secs(10),
        max_timeout: Duration::from_secs(10),
    }
}

/// Programs in the sandbox image that run another program (or Python code) or write files,
/// and that `refused_safe_bin` does not know. `setarch`, `linux32` and `linux64` are refused,
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

#[test]
#[ignore = "review: config validation and the exec policy accept program runners and writers of the sandbox image (x86_64/i386 = setarch, choom, uclampset, pdb3, pydoc3, scriptlive, vim.basic, vipw, debconf, fallocate, rename.ul, ...)"]
fn review_runners_in_the_sandbox_image_pass_as_safe_bins() {
    let mut accepted = Vec::new();
    for (bin, line) in UNREFUSED {
        let refused_by_config = refused_safe_bin(bin).is_some();
        let vetted = vet_command(line, &allowlist(&[bin]));
        if !refused_by_config && vetted.is_ok() {
            accepted.push(format!("{bin}: `{line}` -> {vetted:?}"));
        }
    }
    assert!(accepted.is_empty(), "accepted:\n{}", accepted.join("\n"));
}

/// The most direct one: `x86_64` is setarch under another name; the vetted command is the
/// argv `["x86_64", "sh", "-c", "id"]`, which runs a shell.
#[test]
#[ignore = "review: `x86_64 sh -c id` passes the allowlist when x86_64 is listed (setarch alias not in the known table)"]
fn review_setarch_alias_runs_a_shell_under_allowlist() {
    assert!(refused_safe_bin("setarch").is_some());
    let vetted = vet_command("x86_64 sh -c id", &allowlist(&["x86_64"]));
    assert!(
        !matches!(vetted, Ok(ExecCommand::Argv(ref argv)) if argv[1] == "sh"),
        "{vetted:?}"
    );
}
