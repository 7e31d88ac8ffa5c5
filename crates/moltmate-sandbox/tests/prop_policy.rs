//! Property tests of the exec policy's word splitting (`policy::vet_command`):
//!
//! * nothing panics, in any mode, on any text;
//! * any list of words, each written with any mix of POSIX quoting (bare, `'...'`, `"..."`,
//!   backslashes), in a `|` pipeline of allowed programs, is split back into exactly those
//!   words;
//! * an accepted command's re-quoted form (what the backend's `/bin/sh -c` gets for a pipeline)
//!   is accepted again as the same words, and a real `/bin/sh` splits it into the same words;
//! * an unquoted shell metacharacter anywhere, or a control character anywhere, is refused in
//!   allowlist mode.

use moltmate_core::sandbox::{ExecCommand, ExecSecurity, ExecSettings};
use moltmate_sandbox::policy::{shell_quote, vet_command, ExecRefusal, MAX_COMMAND_BYTES};
use moltmate_testkit::prop::config as prop_config;
use proptest::prelude::*;
use std::process::Command;

/// Benign programs: none of them runs other programs, so any default-list or argument-vetting
/// rule keeps accepting them with plain arguments.
const SAFE: &[&str] = &["cat", "wc", "head", "ls", "echo"];

fn settings(security: ExecSecurity) -> ExecSettings {
    ExecSettings {
        security,
        safe_bins: SAFE.iter().map(|s| s.to_string()).collect(),
        vouched_bins: Vec::new(),
        blocked_bins: ["rm", "curl"].iter().map(|s| s.to_string()).collect(),
        ..ExecSettings::default()
    }
}

/// One argument word: any characters but control characters (which are refused even quoted;
/// tab is allowed).
fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9._/=:,+-]{0,8}",
        "[ -~\\t]{0,12}",
        "[;&|<>()$`*?\\[\\]~{}#!'\"\\\\ ]{0,6}",
        any::<String>().prop_map(|s| s
            .chars()
            .filter(|c| *c == '\t' || !c.is_control())
            .collect()),
    ]
}

/// How one piece of a word is written.
#[derive(Debug, Clone, Copy)]
enum Quoting {
    Bare,
    Single,
    Double,
    Backslashes,
}

/// Writes `piece` so that a POSIX shell reads it literally, in the chosen style (falling back
/// to backslashes where the style cannot hold the text).
fn quote_piece(piece: &str, quoting: Quoting) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "._/=:,+-@%^".contains(c) || !c.is_ascii();
    match quoting {
        Quoting::Bare if !piece.is_empty() && piece.chars().all(plain) => piece.to_string(),
        Quoting::Single if !piece.contains('\'') => format!("'{piece}'"),
        Quoting::Double => {
            let mut out = String::from("\"");
            for c in piece.chars() {
                if matches!(c, '"' | '\\' | '$' | '`') {
                    out.push('\\');
                }
                out.push(c);
            }
            out.push('"');
            out
        }
        _ if piece.is_empty() => "''".to_string(),
        _ => {
            let mut out = String::new();
            for c in piece.chars() {
                if !plain(c) {
                    out.push('\\');
                }
                out.push(c);
            }
            out
        }
    }
}

fn quoting() -> impl Strategy<Value = Quoting> {
    prop::sample::select(vec![
        Quoting::Bare,
        Quoting::Single,
        Quoting::Double,
        Quoting::Backslashes,
    ])
}

/// A word written as one or more adjacent quoted pieces (`'a'"b"c\ d`).
fn written_word() -> impl Strategy<Value = (String, String)> {
    prop::collection::vec((word(), quoting()), 1..4).prop_map(|pieces| {
        let word: String = pieces.iter().map(|(p, _)| p.as_str()).collect();
        let written: String = pieces.iter().map(|(p, q)| quote_piece(p, *q)).collect();
        (word, written)
    })
}

fn gap() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![" ", "  ", "\t", " \t "])
}

/// A pipeline of allowed programs with written arguments: the expected stages and the line.
fn pipeline() -> impl Strategy<Value = (Vec<Vec<String>>, String)> {
    let stage = (
        prop::sample::select(SAFE.to_vec()),
        quoting(),
        prop::collection::vec((written_word(), gap()), 0..5),
    );
    (prop::collection::vec(stage, 1..4), gap(), gap()).prop_map(|(stages, lead, tail)| {
        let mut expected = Vec::new();
        let mut line = String::from(lead);
        for (i, (program, program_quoting, args)) in stages.into_iter().enumerate() {
            if i > 0 {
                line.push_str(if i % 2 == 0 { " | " } else { "|" });
            }
            // The program name may itself be quoted: `'cat'` is still `cat`.
            line.push_str(&quote_piece(program, program_quoting));
            let mut words = vec![program.to_string()];
            for ((word, written), gap) in args {
                line.push_str(gap);
                line.push_str(&written);
                words.push(word);
            }
            expected.push(words);
        }
        line.push_str(tail);
        (expected, line)
    })
}

/// What `vet_command` returns for accepted stages.
fn rendered(stages: &[Vec<String>]) -> ExecCommand {
    if stages.len() == 1 {
        return ExecCommand::Argv(stages[0].clone());
    }
    ExecCommand::Shell(
        stages
            .iter()
            .map(|s| {
                s.iter()
                    .map(|w| shell_quote(w))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join(" | "),
    )
}

/// The words a real `/bin/sh` reads from `quoted` (a stage written with [`shell_quote`]).
fn sh_words(quoted: &str) -> Vec<String> {
    let script = format!("set -- {quoted}; printf '%s\\0' \"$@\"");
    let output = Command::new("/bin/sh")
        .arg("-c")
        .arg(&script)
        .env_clear()
        .output()
        .expect("/bin/sh runs");
    assert!(output.status.success(), "sh failed on {script:?}");
    let mut words: Vec<String> = output
        .stdout
        .split(|b| *b == 0)
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    words.pop(); // after the last NUL
    words
}

/// Metacharacters that must never appear unquoted in allowlist mode (`|` is the one allowed
/// operator; `#` only starts a comment at the start of a word and is tested there).
const METACHARACTERS: &[&str] = &[
    ";", "&", ">", "<", "(", ")", "$", "`", "*", "?", "[", "~", "{", "}", "\n", "\r", "||", "|&",
    "&&", ">>", "2>", "$(", "${", "<(",
];

proptest! {
    #![proptest_config(prop_config(256))]

    /// Any text, any mode: a decision, never a panic; refusals say something.
    #[test]
    fn prop_any_command_line_gets_a_decision(
        line in prop_oneof![
            any::<String>(),
            "[ -~\\t\\n]{0,60}",
            "[a-z |;&<>()$`'\"\\\\*?\\[\\]{}~#\\n]{0,40}",
            (0usize..3).prop_map(|n| "x".repeat(MAX_COMMAND_BYTES - 1 + n)),
        ],
        security in prop::sample::select(vec![ExecSecurity::Allowlist, ExecSecurity::Blocklist, ExecSecurity::Full]),
    ) {
        match vet_command(&line, &settings(security)) {
            Ok(ExecCommand::Argv(words)) => {
                prop_assert_eq!(security, ExecSecurity::Allowlist);
                prop_assert!(!words.is_empty());
                prop_assert!(SAFE.contains(&words[0].as_str()));
            }
            Ok(ExecCommand::Shell(shell)) => prop_assert!(!shell.is_empty()),
            Err(refusal) => prop_assert!(!refusal.to_string().is_empty()),
        }
        if line.len() > MAX_COMMAND_BYTES {
            prop_assert!(
                matches!(vet_command(&line, &settings(security)), Err(ExecRefusal::TooLong { .. })),
                "an over-long line must be refused"
            );
        }
    }

    /// Any words, quoted in any way, in a pipeline of allowed programs are read back exactly.
    #[test]
    fn prop_allowlist_splits_quoted_words_exactly((stages, line) in pipeline()) {
        prop_assume!(line.len() <= MAX_COMMAND_BYTES);
        let got = vet_command(&line, &settings(ExecSecurity::Allowlist));
        prop_assert_eq!(got, Ok(rendered(&stages)), "line {:?}", line);
    }

    /// What is run is what was vetted: the re-quoted form is accepted again as the same command,
    /// and `/bin/sh` splits every stage of it into the same words.
    #[test]
    fn prop_requoted_form_splits_back_to_the_same_words((stages, line) in pipeline()) {
        prop_assume!(line.len() <= MAX_COMMAND_BYTES);
        let first = vet_command(&line, &settings(ExecSecurity::Allowlist))
            .map_err(|e| TestCaseError::fail(format!("{line:?} refused: {e}")))?;
        let requoted = match &first {
            ExecCommand::Argv(words) => words.iter().map(|w| shell_quote(w)).collect::<Vec<_>>().join(" "),
            ExecCommand::Shell(shell) => shell.clone(),
        };
        prop_assume!(requoted.len() <= MAX_COMMAND_BYTES);
        let again = vet_command(&requoted, &settings(ExecSecurity::Allowlist));
        prop_assert_eq!(again, Ok(first.clone()));
        for stage in &stages {
            let quoted = stage.iter().map(|w| shell_quote(w)).collect::<Vec<_>>().join(" ");
            prop_assert_eq!(&sh_words(&quoted), stage, "sh read {:?} differently", quoted);
        }
    }

    /// An unquoted metacharacter anywhere in an otherwise acceptable line is refused.
    #[test]
    fn prop_unquoted_metacharacters_are_refused(
        (_, line) in pipeline(),
        meta in prop::sample::select(METACHARACTERS.to_vec()),
        at in any::<prop::sample::Index>(),
    ) {
        // Insert at a position outside any quote or escape: a boundary between the line's
        // top-level characters, found by scanning the quoting.
        let points = unquoted_points(&line);
        let at = points[at.index(points.len())];
        let bad = format!("{}{meta}{}", &line[..at], &line[at..]);
        prop_assume!(bad.len() <= MAX_COMMAND_BYTES);
        let result = vet_command(&bad, &settings(ExecSecurity::Allowlist));
        prop_assert!(result.is_err(), "{:?} was accepted as {:?}", bad, result);
    }

    /// A control character (other than tab) is refused anywhere, even inside quotes.
    #[test]
    fn prop_control_characters_are_refused_even_quoted(
        (_, line) in pipeline(),
        control in prop_oneof![
            (0u32..0x20).prop_filter("tab is a separator", |c| *c != 9),
            0x7fu32..0xa0,
        ]
        .prop_map(|c| char::from_u32(c).unwrap_or('\0')),
        at in any::<prop::sample::Index>(),
    ) {
        let boundaries: Vec<usize> = line.char_indices().map(|(i, _)| i).chain([line.len()]).collect();
        let at = boundaries[at.index(boundaries.len())];
        let bad = format!("{}{control}{}", &line[..at], &line[at..]);
        let result = vet_command(&bad, &settings(ExecSecurity::Allowlist));
        prop_assert!(result.is_err(), "{:?} was accepted as {:?}", bad, result);
    }

    /// A comment (`#` starting a word) is refused, never silently cut off.
    #[test]
    fn prop_comments_are_refused((_, line) in pipeline(), rest in "[a-z ]{0,10}") {
        let bad = format!("{line} #{rest}");
        prop_assume!(bad.len() <= MAX_COMMAND_BYTES);
        prop_assert!(vet_command(&bad, &settings(ExecSecurity::Allowlist)).is_err(), "{:?}", bad);
    }

    /// Blocklist mode: a blocked program as a command anywhere after `;`, `&&`, `||`, `|`,
    /// a newline or inside `$(...)` is refused, whatever harmless command precedes it.
    #[test]
    fn prop_blocklist_finds_blocked_commands_after_separators(
        (_, line) in pipeline(),
        separator in prop::sample::select(vec!["; ", " && ", " || ", " | ", "\n", " & ", " $(", " `"]),
        blocked in prop::sample::select(vec!["rm", "/bin/rm", "curl", "'rm'", "r\\m", "env rm", "X=1 rm"]),
    ) {
        let bad = format!("{line}{separator}{blocked} x");
        let result = vet_command(&bad, &settings(ExecSecurity::Blocklist));
        prop_assert!(matches!(result, Err(ExecRefusal::Blocked(_))), "{:?} gave {:?}", bad, result);
    }
}

/// Byte offsets in `line` that lie outside quotes and escapes (where an inserted character is
/// unquoted).
fn unquoted_points(line: &str) -> Vec<usize> {
    let mut points = Vec::new();
    let mut chars = line.char_indices().peekable();
    let mut quote: Option<char> = None;
    while let Some((i, c)) = chars.next() {
        if quote.is_none() {
            points.push(i);
        }
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (None, '\\') => {
                chars.next();
            }
            (Some('"'), '\\') => {
                chars.next();
            }
            (Some(q), c) if c == q => quote = None,
            _ => {}
        }
    }
    points.push(line.len());
    points
}
