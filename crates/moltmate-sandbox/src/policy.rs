//! `tools.exec.security`: vets an `exec` command line before any backend sees it.
//!
//! * `allowlist` — no shell. The line is split into words by POSIX quoting rules and must be one
//!   command or a `|` pipeline whose programs are all bare names from `safe_bins`. Every other
//!   shell construct (redirections, `;`, `&&`, `||`, `&`, substitutions, variables, globs, `~`,
//!   subshells, comments, newlines) is refused with a message naming what was refused. An
//!   accepted single command becomes [`ExecCommand::Argv`] (no shell at all); a pipeline becomes
//!   [`ExecCommand::Shell`] in which every word is single-quoted, so the shell sees literal words
//!   and `|` only. A program that runs other programs or writes files
//!   ([`moltmate_core::allowlist::refused_safe_bin`]: shells, interpreters, `env`, `xargs`,
//!   `find`, `awk`, `sed`, `sort`...) is refused even when `safe_bins` lists it (config validation
//!   refuses such a list first). The arguments of the few safe bins with one dangerous option or
//!   operand are vetted against a per-program table (`ARG_RULES`: `uniq`'s output file,
//!   `date --set`, `pdftotext`'s output file, `diff --paginate`, which runs `pr`): every option must be one the table knows, long
//!   options written in full (no GNU abbreviations), options before operands.
//! * `blocklist` — shell allowed; refused when a command word, found by a best-effort tokenizer
//!   (across `;`, `&&`, `||`, `|`, `&`, `$(`, backticks, `sh -c`, `eval` and wrappers like
//!   `env`/`nohup`/`xargs`), has a basename in `blocked_bins`. **This is a speed bump, not a
//!   boundary**: a shell can always build a name at run time (`$X`, `$(printf r)m`, a copied
//!   binary). The sandbox is the boundary; the blocklist only stops a model's casual mistakes.
//! * `full` — the line runs as given through `/bin/sh -c` (still inside the sandbox).

use moltmate_core::sandbox::{ExecCommand, ExecSecurity, ExecSettings};

/// Longest command line accepted in any mode. Far above what a sensible command needs, far below
/// the kernel's argument limits, so an oversized line is refused here with a clear message.
pub const MAX_COMMAND_BYTES: usize = 32 * 1024;

/// Nesting depth of `sh -c` / `eval` / `$(...)` the blocklist tokenizer follows.
const MAX_BLOCKLIST_DEPTH: usize = 8;

/// Why a command line was refused. The `Display` text is what the model reads, so each message
/// says exactly what was refused and, where useful, what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecRefusal {
    #[error("empty command")]
    Empty,
    #[error("command is {len} bytes long; the limit is {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("{what} in the command line is not allowed")]
    ControlCharacter { what: &'static str },
    #[error("unterminated {0} quote")]
    UnterminatedQuote(&'static str),
    #[error("trailing backslash with nothing to escape")]
    TrailingBackslash,
    #[error("`{token}` ({what}) is not allowed in allowlist mode: run one command, or a pipeline of allowed programs joined by `|`")]
    Operator { token: String, what: &'static str },
    #[error("redirection `{0}` is not allowed in allowlist mode: commands cannot read or write files through the shell")]
    Redirection(String),
    #[error("{0} (command substitution) is not allowed in allowlist mode")]
    Substitution(String),
    #[error("`{0}` (variable expansion) is not allowed in allowlist mode; quote it with single quotes if you mean the literal text")]
    Variable(String),
    #[error("`{0}` (glob pattern) is not allowed in allowlist mode; quote it if you mean the literal character")]
    Glob(char),
    #[error("`~` (home expansion) is not allowed in allowlist mode; the working directory is /workspace")]
    Tilde,
    #[error("empty stage in pipeline: every `|` needs a command on both sides")]
    EmptyPipelineStage,
    #[error("program path `{0}` is not allowed: use a bare program name from the allowed list")]
    ProgramPath(String),
    #[error("program `{program}` is not allowed; allowed programs: {}", allowed_list(.allowed))]
    NotAllowed {
        program: String,
        allowed: Vec<String>,
    },
    #[error("program `{0}` is blocked by tools.exec.blocked_bins")]
    Blocked(String),
    #[error("program `{program}` {why}; allowlist mode never runs it")]
    Runner { program: String, why: &'static str },
    #[error("`{program}`: {reason}")]
    Argument { program: String, reason: String },
}

fn allowed_list(allowed: &[String]) -> String {
    if allowed.is_empty() {
        "(none configured)".to_string()
    } else {
        allowed.join(", ")
    }
}

impl ExecRefusal {
    /// True when the refusal is about *which program* was asked for (not in `safe_bins`, or in
    /// `blocked_bins`); false when it is about the command line's syntax or size.
    pub fn is_program_refusal(&self) -> bool {
        match self {
            ExecRefusal::NotAllowed { .. }
            | ExecRefusal::Blocked(_)
            | ExecRefusal::Runner { .. }
            | ExecRefusal::ProgramPath(_) => true,
            ExecRefusal::Empty
            | ExecRefusal::TooLong { .. }
            | ExecRefusal::ControlCharacter { .. }
            | ExecRefusal::UnterminatedQuote(_)
            | ExecRefusal::TrailingBackslash
            | ExecRefusal::Operator { .. }
            | ExecRefusal::Redirection(_)
            | ExecRefusal::Substitution(_)
            | ExecRefusal::Variable(_)
            | ExecRefusal::Glob(_)
            | ExecRefusal::Tilde
            | ExecRefusal::EmptyPipelineStage
            | ExecRefusal::Argument { .. } => false,
        }
    }
}

/// Vets `command_line` under `settings.security` and returns what the backend should run.
pub fn vet_command(
    command_line: &str,
    settings: &ExecSettings,
) -> Result<ExecCommand, ExecRefusal> {
    if command_line.len() > MAX_COMMAND_BYTES {
        return Err(ExecRefusal::TooLong {
            len: command_line.len(),
            max: MAX_COMMAND_BYTES,
        });
    }
    if command_line.trim().is_empty() {
        return Err(ExecRefusal::Empty);
    }
    // NUL can never reach a process argument and would be silently cut by C APIs; refuse it in
    // every mode so what is vetted is what runs.
    if command_line.contains('\0') {
        return Err(ExecRefusal::ControlCharacter { what: "a NUL byte" });
    }
    match settings.security {
        ExecSecurity::Allowlist => {
            vet_allowlist(command_line, &settings.safe_bins, &settings.vouched_bins)
        }
        ExecSecurity::Blocklist => {
            vet_blocklist(command_line, &settings.blocked_bins, 0)?;
            Ok(ExecCommand::Shell(command_line.to_string()))
        }
        ExecSecurity::Full => Ok(ExecCommand::Shell(command_line.to_string())),
    }
}

/// Quotes `word` for a POSIX shell so it is always one literal word.
pub fn shell_quote(word: &str) -> String {
    let mut out = String::with_capacity(word.len() + 2);
    out.push('\'');
    for c in word.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

// ---------------------------------------------------------------------------------------------
// allowlist

fn vet_allowlist(
    line: &str,
    safe_bins: &[String],
    vouched_bins: &[String],
) -> Result<ExecCommand, ExecRefusal> {
    let stages = split_allowlist(line)?;
    for stage in &stages {
        // split_allowlist never returns an empty stage.
        let Some(program) = stage.first() else {
            return Err(ExecRefusal::EmptyPipelineStage);
        };
        if program.contains('/') {
            return Err(ExecRefusal::ProgramPath(program.clone()));
        }
        if !safe_bins.iter().any(|b| b == program) {
            return Err(ExecRefusal::NotAllowed {
                program: program.clone(),
                allowed: safe_bins.to_vec(),
            });
        }
        // Config validation refuses such a list; this holds for settings from anywhere else:
        // a known runner or writer never runs, and neither does a name that is neither vetted
        // by the project nor vouched for by the operator.
        if let Some(why) = moltmate_core::allowlist::refused_safe_bin(program) {
            return Err(ExecRefusal::Runner {
                program: program.clone(),
                why,
            });
        }
        if moltmate_core::allowlist::safe_bin_verdict(program, vouched_bins).is_err() {
            return Err(ExecRefusal::Runner {
                program: program.clone(),
                why: moltmate_core::allowlist::NOT_VETTED,
            });
        }
        vet_arguments(stage)?;
    }
    let mut stages = stages;
    if stages.len() == 1 {
        return Ok(ExecCommand::Argv(stages.remove(0)));
    }
    let rendered = stages
        .iter()
        .map(|stage| {
            stage
                .iter()
                .map(|w| shell_quote(w))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join(" | ");
    Ok(ExecCommand::Shell(rendered))
}

// ---------------------------------------------------------------------------------------------
// allowlist: arguments of the safe bins that have one dangerous option or operand

/// Whether an option takes a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arity {
    None,
    /// In the same word (`-f1`, `--skip-fields=1`) or the next one (`-f 1`, `--skip-fields 1`).
    Required,
    /// Only in the same word (`-Iseconds`, `--iso-8601=seconds`).
    Optional,
}

/// How a program reads its options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Syntax {
    /// GNU `getopt_long`: short options cluster (`-cd`, `-cf1`), long options are `--name` or
    /// `--name=value`, `--` ends the options.
    Gnu,
    /// poppler's `parseArgs`: each option is one whole word `-name` matched exactly (no
    /// clusters, no `=`), a value is always the next word, `--` ends the options.
    SingleDash,
}

/// One option, by every spelling (`-c`, `--count`).
struct Opt {
    names: &'static [&'static str],
    arity: Arity,
    /// `Some(why)`: the option is refused, with this reason.
    refused: Option<&'static str>,
}

const fn opt(names: &'static [&'static str], arity: Arity) -> Opt {
    Opt {
        names,
        arity,
        refused: None,
    }
}

const fn refused(names: &'static [&'static str], arity: Arity, why: &'static str) -> Opt {
    Opt {
        names,
        arity,
        refused: Some(why),
    }
}

/// The arguments a program accepts under `allowlist`. Only options listed here are accepted
/// (an option a newer version added is refused, not guessed at); each must be spelled in full,
/// and all options come before the operands, so GNU argument permutation and
/// `POSIXLY_CORRECT` cannot make a word mean something else to the program than it meant here.
struct ArgRules {
    program: &'static str,
    syntax: Syntax,
    options: &'static [Opt],
    /// Checks the operands (the words that are not options or option values).
    operands: fn(&[&str]) -> Result<(), String>,
}

/// Programs of the default `safeBins` with a dangerous option or operand. Every other safe bin
/// only reads files and prints, whatever its arguments (see README, "The allowlist").
const ARG_RULES: &[ArgRules] = &[
    ArgRules {
        program: "uniq",
        syntax: Syntax::Gnu,
        options: &[
            opt(&["-c", "--count"], Arity::None),
            opt(&["-d", "--repeated"], Arity::None),
            opt(&["-D"], Arity::None),
            opt(&["--all-repeated"], Arity::Optional),
            opt(&["-f", "--skip-fields"], Arity::Required),
            opt(&["--group"], Arity::Optional),
            opt(&["-i", "--ignore-case"], Arity::None),
            opt(&["-s", "--skip-chars"], Arity::Required),
            opt(&["-u", "--unique"], Arity::None),
            opt(&["-z", "--zero-terminated"], Arity::None),
            opt(&["-w", "--check-chars"], Arity::Required),
            opt(&["--help"], Arity::None),
            opt(&["--version"], Arity::None),
        ],
        operands: uniq_operands,
    },
    ArgRules {
        program: "date",
        syntax: Syntax::Gnu,
        options: &[
            opt(&["-d", "--date"], Arity::Required),
            opt(&["--debug"], Arity::None),
            opt(&["-f", "--file"], Arity::Required),
            opt(&["-I", "--iso-8601"], Arity::Optional),
            opt(&["--resolution"], Arity::None),
            opt(
                &["-R", "--rfc-email", "--rfc-822", "--rfc-2822"],
                Arity::None,
            ),
            opt(&["--rfc-3339"], Arity::Required),
            opt(&["-r", "--reference"], Arity::Required),
            refused(
                &["-s", "--set"],
                Arity::Required,
                "sets the system clock; only showing dates is allowed",
            ),
            opt(&["-u", "--utc", "--universal", "--uct"], Arity::None),
            opt(&["--help"], Arity::None),
            opt(&["--version"], Arity::None),
        ],
        operands: date_operands,
    },
    ArgRules {
        program: "pdftotext",
        syntax: Syntax::SingleDash,
        options: &[
            opt(&["-f"], Arity::Required),
            opt(&["-l"], Arity::Required),
            opt(&["-r"], Arity::Required),
            opt(&["-x"], Arity::Required),
            opt(&["-y"], Arity::Required),
            opt(&["-W"], Arity::Required),
            opt(&["-H"], Arity::Required),
            opt(&["-layout"], Arity::None),
            opt(&["-fixed"], Arity::Required),
            opt(&["-raw"], Arity::None),
            opt(&["-nodiag"], Arity::None),
            opt(&["-htmlmeta"], Arity::None),
            opt(&["-tsv"], Arity::None),
            opt(&["-enc"], Arity::Required),
            opt(&["-listenc"], Arity::None),
            opt(&["-eol"], Arity::Required),
            opt(&["-nopgbrk"], Arity::None),
            opt(&["-bbox"], Arity::None),
            opt(&["-bbox-layout"], Arity::None),
            opt(&["-cropbox"], Arity::None),
            opt(&["-colspacing"], Arity::Required),
            opt(&["-opw"], Arity::Required),
            opt(&["-upw"], Arity::Required),
            opt(&["-q"], Arity::None),
            opt(&["-v"], Arity::None),
            opt(&["-h", "-help", "--help"], Arity::None),
        ],
        operands: pdftotext_operands,
    },
    // GNU diffutils 3.8. `-l`/`--paginate` runs `pr` on the output: no vetted program may
    // run another, so it is refused; every other option only reads and prints.
    ArgRules {
        program: "diff",
        syntax: Syntax::Gnu,
        options: &[
            opt(&["--normal"], Arity::None),
            opt(&["-q", "--brief"], Arity::None),
            opt(&["-s", "--report-identical-files"], Arity::None),
            opt(&["-c"], Arity::None),
            opt(&["-C"], Arity::Required),
            opt(&["--context"], Arity::Optional),
            opt(&["-u"], Arity::None),
            opt(&["-U"], Arity::Required),
            opt(&["--unified"], Arity::Optional),
            opt(&["-e", "--ed"], Arity::None),
            opt(&["-n", "--rcs"], Arity::None),
            opt(&["-y", "--side-by-side"], Arity::None),
            opt(&["-W", "--width"], Arity::Required),
            opt(&["--left-column"], Arity::None),
            opt(&["--suppress-common-lines"], Arity::None),
            opt(&["-p", "--show-c-function"], Arity::None),
            opt(&["-F", "--show-function-line"], Arity::Required),
            opt(&["--label"], Arity::Required),
            opt(&["-t", "--expand-tabs"], Arity::None),
            opt(&["-T", "--initial-tab"], Arity::None),
            opt(&["--tabsize"], Arity::Required),
            opt(&["--suppress-blank-empty"], Arity::None),
            refused(
                &["-l", "--paginate"],
                Arity::None,
                "runs `pr` on the output, another program; allowlist mode runs only programs that run none (pipe into nothing; the plain output is the same text)",
            ),
            opt(&["-r", "--recursive"], Arity::None),
            opt(&["--no-dereference"], Arity::None),
            opt(&["-N", "--new-file"], Arity::None),
            opt(&["--unidirectional-new-file"], Arity::None),
            opt(&["--ignore-file-name-case"], Arity::None),
            opt(&["--no-ignore-file-name-case"], Arity::None),
            opt(&["-x", "--exclude"], Arity::Required),
            opt(&["-X", "--exclude-from"], Arity::Required),
            opt(&["-S", "--starting-file"], Arity::Required),
            opt(&["--from-file"], Arity::Required),
            opt(&["--to-file"], Arity::Required),
            opt(&["-i", "--ignore-case"], Arity::None),
            opt(&["-E", "--ignore-tab-expansion"], Arity::None),
            opt(&["-Z", "--ignore-trailing-space"], Arity::None),
            opt(&["-b", "--ignore-space-change"], Arity::None),
            opt(&["-w", "--ignore-all-space"], Arity::None),
            opt(&["-B", "--ignore-blank-lines"], Arity::None),
            opt(&["-I", "--ignore-matching-lines"], Arity::Required),
            opt(&["-a", "--text"], Arity::None),
            opt(&["--strip-trailing-cr"], Arity::None),
            opt(&["-D", "--ifdef"], Arity::Required),
            opt(
                &[
                    "--old-group-format",
                    "--new-group-format",
                    "--unchanged-group-format",
                    "--changed-group-format",
                    "--line-format",
                    "--old-line-format",
                    "--new-line-format",
                    "--unchanged-line-format",
                ],
                Arity::Required,
            ),
            opt(&["-d", "--minimal"], Arity::None),
            opt(&["--horizon-lines"], Arity::Required),
            opt(&["--speed-large-files"], Arity::None),
            opt(&["--color"], Arity::Optional),
            opt(&["--palette"], Arity::Required),
            opt(&["--help"], Arity::None),
            opt(&["-v", "--version"], Arity::None),
        ],
        operands: |_| Ok(()),
    },
];

/// `uniq [INPUT [OUTPUT]]`: OUTPUT is a file uniq writes.
fn uniq_operands(operands: &[&str]) -> Result<(), String> {
    match operands {
        [] | [_] | [_, "-"] => Ok(()),
        [_, output] => Err(format!(
            "its second file operand (`{output}`) is a file uniq would write; in allowlist mode commands write no files, so leave it out (the result is printed)"
        )),
        [_, _, extra, ..] => Err(format!("extra operand `{extra}`: uniq reads at most one file")),
    }
}

/// `date [+FORMAT]`: any other operand (`MMDDhhmm...`) sets the clock.
fn date_operands(operands: &[&str]) -> Result<(), String> {
    match operands {
        [] => Ok(()),
        [format] if format.starts_with('+') => Ok(()),
        [other] => Err(format!(
            "the operand `{other}` would set the system clock; only showing dates is allowed (a format starts with `+`, e.g. `date +%Y-%m-%d`)"
        )),
        [_, extra, ..] => Err(format!("extra operand `{extra}`: date takes at most one `+FORMAT`")),
    }
}

/// `pdftotext PDF -`: without `-` as the second operand it writes a text file.
fn pdftotext_operands(operands: &[&str]) -> Result<(), String> {
    match operands {
        [] | [_, "-"] => Ok(()),
        [pdf] => Err(format!(
            "without an output operand pdftotext writes a text file next to `{pdf}`; in allowlist mode commands write no files, so print the text instead: `pdftotext {pdf} -`"
        )),
        [_, output] => Err(format!(
            "`{output}` is a file pdftotext would write; in allowlist mode commands write no files, so use `-` to print the text instead"
        )),
        [_, _, extra, ..] => Err(format!(
            "extra operand `{extra}`: pdftotext takes a PDF file and `-`"
        )),
    }
}

/// Vets one pipeline stage's arguments against [`ARG_RULES`]; programs without rules pass.
fn vet_arguments(stage: &[String]) -> Result<(), ExecRefusal> {
    let Some((program, args)) = stage.split_first() else {
        return Err(ExecRefusal::EmptyPipelineStage);
    };
    let Some(rules) = ARG_RULES.iter().find(|r| r.program == program) else {
        return Ok(());
    };
    let refuse = |reason: String| ExecRefusal::Argument {
        program: program.clone(),
        reason,
    };
    let mut operands: Vec<&str> = Vec::new();
    let mut options_ended = false;
    let mut i = 0;
    while i < args.len() {
        let word = args[i].as_str();
        i += 1;
        if options_ended || word == "-" || !word.starts_with('-') {
            operands.push(word);
            continue;
        }
        if let Some(first) = operands.first() {
            return Err(refuse(format!(
                "put options before file names (`{word}` comes after `{first}`)"
            )));
        }
        if word == "--" {
            options_ended = true;
            continue;
        }
        // Each option of the word, as spelled, and whether a value for it follows in the next
        // word.
        let mut options: Vec<(String, &Opt)> = Vec::new();
        let mut value_in_next_word = false;
        match rules.syntax {
            Syntax::SingleDash => {
                let entry = find_option(rules, word, word)?;
                value_in_next_word = entry.arity == Arity::Required;
                options.push((word.to_string(), entry));
            }
            Syntax::Gnu if word.starts_with("--") => {
                let (name, has_value) = match word.split_once('=') {
                    Some((name, _)) => (name, true),
                    None => (word, false),
                };
                let entry = find_option(rules, name, word)?;
                if has_value && entry.arity == Arity::None {
                    return Err(refuse(format!("`{name}` takes no value")));
                }
                value_in_next_word = entry.arity == Arity::Required && !has_value;
                options.push((name.to_string(), entry));
            }
            Syntax::Gnu => {
                // A cluster (`-cd`, `-cf1`): each character is an option until one takes a
                // value, which is the rest of the word, or (if required and nothing is left)
                // the next word.
                let body = &word[1..];
                for (at, c) in body.char_indices() {
                    let short = format!("-{c}");
                    let entry = find_option(rules, &short, word)?;
                    options.push((short, entry));
                    let rest_empty = at + c.len_utf8() >= body.len();
                    match entry.arity {
                        Arity::None => {}
                        Arity::Optional => break,
                        Arity::Required => {
                            value_in_next_word = rest_empty;
                            break;
                        }
                    }
                }
            }
        }
        for (spelled, entry) in &options {
            if let Some(why) = entry.refused {
                return Err(refuse(format!("`{spelled}` {why}")));
            }
        }
        if value_in_next_word {
            if i >= args.len() {
                let spelled = options.last().map(|(s, _)| s.as_str()).unwrap_or(word);
                return Err(refuse(format!("`{spelled}` needs a value")));
            }
            i += 1;
        }
    }
    (rules.operands)(&operands).map_err(refuse)
}

/// The table entry for the option spelled `name` (exactly), or a refusal naming `word`.
fn find_option<'a>(rules: &'a ArgRules, name: &str, word: &str) -> Result<&'a Opt, ExecRefusal> {
    if let Some(entry) = rules.options.iter().find(|o| o.names.contains(&name)) {
        return Ok(entry);
    }
    let mut reason = format!("`{word}` is not an option {} accepts here", rules.program);
    if name.starts_with("--") {
        let full: Vec<&str> = rules
            .options
            .iter()
            .filter(|o| o.refused.is_none())
            .flat_map(|o| o.names.iter().copied())
            .filter(|n| n.starts_with(name))
            .collect();
        reason.push_str("; write long options in full");
        if !full.is_empty() {
            reason.push_str(&format!(" (did you mean {}?)", full.join(" or ")));
        }
    } else {
        let known: Vec<&str> = rules
            .options
            .iter()
            .filter(|o| o.refused.is_none())
            .flat_map(|o| o.names.iter().copied())
            .collect();
        reason.push_str(&format!("; accepted: {}", known.join(" ")));
    }
    Err(ExecRefusal::Argument {
        program: rules.program.to_string(),
        reason,
    })
}

fn control_name(c: char) -> Option<&'static str> {
    match c {
        '\n' => Some("a newline"),
        '\r' => Some("a carriage return"),
        '\0' => Some("a NUL byte"),
        '\t' => None,
        c if c.is_control() => Some("a control character"),
        _ => None,
    }
}

/// Splits an allowlist command line into pipeline stages of unquoted words.
fn split_allowlist(line: &str) -> Result<Vec<Vec<String>>, ExecRefusal> {
    let chars: Vec<char> = line.chars().collect();
    let mut stages: Vec<Vec<String>> = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    // A word exists once anything (even an empty quote pair) was seen, so `''` is an argument.
    let mut in_word = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if let Some(what) = control_name(c) {
            return Err(ExecRefusal::ControlCharacter { what });
        }
        let next = chars.get(i + 1).copied();
        match c {
            ' ' | '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(ExecRefusal::UnterminatedQuote("single")),
                        Some('\'') => break,
                        Some(&q) => {
                            if let Some(what) = control_name(q) {
                                return Err(ExecRefusal::ControlCharacter { what });
                            }
                            word.push(q);
                        }
                    }
                    i += 1;
                }
            }
            '"' => {
                in_word = true;
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(ExecRefusal::UnterminatedQuote("double")),
                        Some('"') => break,
                        Some('\\') => match chars.get(i + 1) {
                            // Inside double quotes a backslash escapes only these.
                            Some(&e @ ('$' | '`' | '"' | '\\')) => {
                                word.push(e);
                                i += 1;
                            }
                            _ => word.push('\\'),
                        },
                        Some('$') => return Err(dollar_refusal(&chars, i)),
                        Some('`') => return Err(ExecRefusal::Substitution("backticks".into())),
                        Some(&q) => {
                            if let Some(what) = control_name(q) {
                                return Err(ExecRefusal::ControlCharacter { what });
                            }
                            word.push(q);
                        }
                    }
                    i += 1;
                }
            }
            '\\' => match next {
                None => return Err(ExecRefusal::TrailingBackslash),
                Some(e) => {
                    if let Some(what) = control_name(e) {
                        return Err(ExecRefusal::ControlCharacter { what });
                    }
                    in_word = true;
                    word.push(e);
                    i += 1;
                }
            },
            '|' => {
                if next == Some('|') {
                    return Err(ExecRefusal::Operator {
                        token: "||".into(),
                        what: "or-list",
                    });
                }
                if next == Some('&') {
                    return Err(ExecRefusal::Operator {
                        token: "|&".into(),
                        what: "stderr pipe",
                    });
                }
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
                if words.is_empty() {
                    return Err(ExecRefusal::EmptyPipelineStage);
                }
                stages.push(std::mem::take(&mut words));
            }
            ';' => {
                return Err(ExecRefusal::Operator {
                    token: ";".into(),
                    what: "command separator",
                })
            }
            '&' => {
                return Err(if next == Some('&') {
                    ExecRefusal::Operator {
                        token: "&&".into(),
                        what: "and-list",
                    }
                } else {
                    ExecRefusal::Operator {
                        token: "&".into(),
                        what: "background job",
                    }
                })
            }
            '>' | '<' => {
                if next == Some('(') {
                    return Err(ExecRefusal::Substitution(format!("`{c}(`")));
                }
                return Err(ExecRefusal::Redirection(redirection_token(
                    &chars, i, &word,
                )));
            }
            '(' | ')' => {
                return Err(ExecRefusal::Operator {
                    token: c.to_string(),
                    what: "subshell",
                })
            }
            '{' | '}' => {
                return Err(ExecRefusal::Operator {
                    token: c.to_string(),
                    what: "brace group or expansion",
                })
            }
            '$' => return Err(dollar_refusal(&chars, i)),
            '`' => return Err(ExecRefusal::Substitution("backticks".into())),
            '*' | '?' | '[' => return Err(ExecRefusal::Glob(c)),
            '~' => return Err(ExecRefusal::Tilde),
            '#' if !in_word => {
                return Err(ExecRefusal::Operator {
                    token: "#".into(),
                    what: "comment",
                })
            }
            _ => {
                in_word = true;
                word.push(c);
            }
        }
        i += 1;
    }
    if in_word {
        words.push(word);
    }
    if words.is_empty() {
        // Either the line was blank (checked earlier) or it ended with `|`.
        return Err(if stages.is_empty() {
            ExecRefusal::Empty
        } else {
            ExecRefusal::EmptyPipelineStage
        });
    }
    stages.push(words);
    Ok(stages)
}

/// Names the redirection at `chars[i]` as the user wrote it, e.g. `2>`, `>>`, `<<`, `&>`.
fn redirection_token(chars: &[char], i: usize, word_before: &str) -> String {
    let mut token = String::new();
    // A file-descriptor number directly before the operator belongs to it (`2>`).
    if !word_before.is_empty() && word_before.chars().all(|c| c.is_ascii_digit()) {
        token.push_str(word_before);
    }
    token.push(chars[i]);
    if let Some(&n) = chars.get(i + 1) {
        if n == chars[i] || n == '&' || n == '|' || (chars[i] == '<' && n == '>') {
            token.push(n);
            if chars[i] == '<' && n == '<' && chars.get(i + 2) == Some(&'-') {
                token.push('-');
            }
        }
    }
    token
}

fn dollar_refusal(chars: &[char], i: usize) -> ExecRefusal {
    match chars.get(i + 1) {
        Some('(') => {
            if chars.get(i + 2) == Some(&'(') {
                ExecRefusal::Substitution("`$((`".into())
            } else {
                ExecRefusal::Substitution("`$(`".into())
            }
        }
        Some('{') => {
            let name: String = chars[i + 2..]
                .iter()
                .take_while(|&&c| c != '}')
                .take(64)
                .collect();
            ExecRefusal::Variable(format!("${{{name}}}"))
        }
        Some(&c) if c.is_ascii_alphanumeric() || c == '_' => {
            let name: String = chars[i + 1..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
                .take(64)
                .collect();
            ExecRefusal::Variable(format!("${name}"))
        }
        Some(&c) if "@*#?-$!".contains(c) => ExecRefusal::Variable(format!("${c}")),
        _ => ExecRefusal::Variable("$".into()),
    }
}

// ---------------------------------------------------------------------------------------------
// blocklist

/// Programs that run the next word as a program; it is checked too.
const WRAPPERS: &[&str] = &[
    "env", "command", "exec", "nohup", "nice", "time", "timeout", "xargs", "sudo", "doas",
    "stdbuf", "setsid", "builtin", "chroot", "unbuffer", "ionice", "taskset", "busybox", "strace",
    "watch", "flock", "runuser", "su",
];

/// Shells whose `-c` argument is itself a command line.
const SHELLS: &[&str] = &["sh", "bash", "dash", "zsh", "ksh", "ash", "mksh", "fish"];

/// Words that keep the next word in command position.
const KEYWORDS: &[&str] = &[
    "if", "then", "else", "elif", "do", "while", "until", "!", "{", "time",
];

#[derive(Debug)]
struct ShellWord {
    text: String,
    command_position: bool,
}

fn basename(word: &str) -> &str {
    word.rsplit('/').next().unwrap_or(word)
}

fn vet_blocklist(line: &str, blocked: &[String], depth: usize) -> Result<(), ExecRefusal> {
    if blocked.is_empty() || depth > MAX_BLOCKLIST_DEPTH {
        return Ok(());
    }
    let is_blocked = |w: &str| {
        let b = basename(w);
        blocked.iter().any(|x| x == b)
    };
    let words = tokenize_loosely(line);
    let mut i = 0;
    while i < words.len() {
        let w = &words[i];
        if !w.command_position {
            i += 1;
            continue;
        }
        // Leading assignments (`X=1 rm ...`) and keywords are not the program.
        let mut j = i;
        while j < words.len()
            && (is_assignment(&words[j].text) || KEYWORDS.contains(&words[j].text.as_str()))
        {
            j += 1;
        }
        // Follow wrappers: `env -i X=1 nohup rm` → rm.
        while j < words.len() {
            let program = &words[j].text;
            if is_blocked(program) {
                return Err(ExecRefusal::Blocked(basename(program).to_string()));
            }
            let name = basename(program);
            if SHELLS.contains(&name) {
                // `sh -c 'line'`: the argument after -c (or a combined flag like -ec) is a line.
                let mut k = j + 1;
                while k < words.len()
                    && words[k].text.starts_with('-')
                    && !words[k].command_position
                {
                    if words[k].text.contains('c') && !words[k].text.starts_with("--") {
                        if let Some(inner) = words.get(k + 1) {
                            vet_blocklist(&inner.text, blocked, depth + 1)?;
                        }
                        break;
                    }
                    k += 1;
                }
                break;
            }
            if name == "eval" {
                let rest: Vec<&str> = words[j + 1..]
                    .iter()
                    .take_while(|w| !w.command_position)
                    .map(|w| w.text.as_str())
                    .collect();
                vet_blocklist(&rest.join(" "), blocked, depth + 1)?;
                break;
            }
            if !WRAPPERS.contains(&name) {
                break;
            }
            // Skip the wrapper's options and assignments (and a numeric argument, as in
            // `timeout 5 rm` or `nice -n 5 rm`) to reach the program it runs.
            j += 1;
            while j < words.len()
                && !words[j].command_position
                && (words[j].text.starts_with('-')
                    || is_assignment(&words[j].text)
                    || words[j]
                        .text
                        .chars()
                        .all(|c| c.is_ascii_digit() || c == '.'))
            {
                j += 1;
            }
            if j < words.len() && words[j].command_position {
                break;
            }
        }
        i += 1;
    }
    Ok(())
}

fn is_assignment(word: &str) -> bool {
    match word.split_once('=') {
        Some((name, _)) => {
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit())
        }
        None => false,
    }
}

/// Best-effort shell tokenizer for the blocklist: unquotes words (so `'r'm` and `r\m` read as
/// `rm`) and marks the words that start a command. It never fails: malformed input is the
/// shell's problem, and the sandbox is the boundary.
fn tokenize_loosely(line: &str) -> Vec<ShellWord> {
    let chars: Vec<char> = line.chars().collect();
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut command_start = true;
    // After a redirection operator the next word is a file name, not a command.
    let mut redirect_target = false;
    let mut in_double = false;
    let mut i = 0;

    let finish = |word: &mut String,
                  in_word: &mut bool,
                  command_start: &mut bool,
                  redirect_target: &mut bool,
                  out: &mut Vec<ShellWord>| {
        if *in_word {
            let text = std::mem::take(word);
            if *redirect_target {
                *redirect_target = false;
            } else {
                out.push(ShellWord {
                    text,
                    command_position: *command_start,
                });
                *command_start = false;
            }
            *in_word = false;
        }
    };

    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if in_double {
            match c {
                '"' => in_double = false,
                '\\' => {
                    if let Some(n) = next {
                        word.push(n);
                        i += 1;
                    }
                }
                '`' => {
                    // A substitution inside quotes runs a command: parse on as unquoted text.
                    in_double = false;
                    finish(
                        &mut word,
                        &mut in_word,
                        &mut command_start,
                        &mut redirect_target,
                        &mut out,
                    );
                    command_start = true;
                }
                '$' if next == Some('(') => {
                    in_double = false;
                    finish(
                        &mut word,
                        &mut in_word,
                        &mut command_start,
                        &mut redirect_target,
                        &mut out,
                    );
                    command_start = true;
                    i += 1;
                }
                _ => word.push(c),
            }
            i += 1;
            continue;
        }
        match c {
            ' ' | '\t' => finish(
                &mut word,
                &mut in_word,
                &mut command_start,
                &mut redirect_target,
                &mut out,
            ),
            '\'' => {
                in_word = true;
                i += 1;
                while i < chars.len() && chars[i] != '\'' {
                    word.push(chars[i]);
                    i += 1;
                }
            }
            '"' => {
                in_word = true;
                in_double = true;
            }
            '\\' => {
                if let Some(n) = next {
                    // Backslash-newline is a line continuation, not a character.
                    if n != '\n' {
                        in_word = true;
                        word.push(n);
                    }
                    i += 1;
                }
            }
            ';' | '&' | '|' | '(' | ')' | '`' | '\n' | '\r' | '{' | '}' | '!' => {
                finish(
                    &mut word,
                    &mut in_word,
                    &mut command_start,
                    &mut redirect_target,
                    &mut out,
                );
                command_start = true;
                redirect_target = false;
            }
            '$' if next == Some('(') => {
                finish(
                    &mut word,
                    &mut in_word,
                    &mut command_start,
                    &mut redirect_target,
                    &mut out,
                );
                command_start = true;
                i += 1;
            }
            '<' | '>' => {
                let was_start = command_start;
                // `2>` — the fd number is part of the operator, not a word.
                if in_word && word.chars().all(|d| d.is_ascii_digit()) {
                    word.clear();
                    in_word = false;
                }
                finish(
                    &mut word,
                    &mut in_word,
                    &mut command_start,
                    &mut redirect_target,
                    &mut out,
                );
                if next == Some('(') {
                    command_start = true;
                    i += 1;
                } else {
                    while matches!(chars.get(i + 1), Some('<' | '>' | '&' | '|' | '-')) {
                        i += 1;
                    }
                    redirect_target = true;
                    // `> f rm x` still runs rm: the command position survives the redirection.
                    command_start = was_start;
                }
            }
            _ => {
                in_word = true;
                word.push(c);
            }
        }
        i += 1;
    }
    finish(
        &mut word,
        &mut in_word,
        &mut command_start,
        &mut redirect_target,
        &mut out,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(security: ExecSecurity) -> ExecSettings {
        ExecSettings {
            security,
            safe_bins: [
                "cat",
                "ls",
                "grep",
                "wc",
                "head",
                "echo",
                "uniq",
                "date",
                "pdftotext",
                "awk",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            blocked_bins: ["rm", "curl", "dd"].iter().map(|s| s.to_string()).collect(),
            ..ExecSettings::default()
        }
    }

    fn allow(line: &str) -> Result<ExecCommand, ExecRefusal> {
        vet_command(line, &settings(ExecSecurity::Allowlist))
    }

    fn block(line: &str) -> Result<ExecCommand, ExecRefusal> {
        vet_command(line, &settings(ExecSecurity::Blocklist))
    }

    fn argv(words: &[&str]) -> ExecCommand {
        ExecCommand::Argv(words.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn allowlist_single_command_is_argv() {
        assert_eq!(allow("ls -la").unwrap(), argv(&["ls", "-la"]));
        assert_eq!(
            allow("  cat   'a b'  \"c d\" e\\ f ").unwrap(),
            argv(&["cat", "a b", "c d", "e f"])
        );
        assert_eq!(allow("echo ''").unwrap(), argv(&["echo", ""]));
        assert_eq!(allow("echo it'\"'s").unwrap(), argv(&["echo", "it\"s"]));
        assert_eq!(allow("grep 'a*b' f").unwrap(), argv(&["grep", "a*b", "f"]));
        assert_eq!(allow("echo '$HOME'").unwrap(), argv(&["echo", "$HOME"]));
        assert_eq!(allow("echo \\$HOME").unwrap(), argv(&["echo", "$HOME"]));
        assert_eq!(
            allow("echo \"a\\\"b\\\\c\\d\"").unwrap(),
            argv(&["echo", "a\"b\\c\\d"])
        );
        assert_eq!(allow("echo a#b").unwrap(), argv(&["echo", "a#b"]));
        assert_eq!(allow("ca\\t x").unwrap(), argv(&["cat", "x"]));
    }

    #[test]
    fn allowlist_pipeline_is_quoted_shell() {
        assert_eq!(
            allow("cat f | grep -c 'x y' | wc -l").unwrap(),
            ExecCommand::Shell("'cat' 'f' | 'grep' '-c' 'x y' | 'wc' '-l'".into())
        );
        assert_eq!(
            allow("echo \"it's\"|uniq").unwrap(),
            ExecCommand::Shell("'echo' 'it'\\''s' | 'uniq'".into())
        );
    }

    #[test]
    fn allowlist_refusals_name_what_was_refused() {
        let cases: &[(&str, &str)] = &[
            ("cat f > out", "redirection `>`"),
            ("cat f >> out", "redirection `>>`"),
            ("cat < f", "redirection `<`"),
            ("cat f 2> err", "redirection `2>`"),
            ("cat <<EOF", "redirection `<<`"),
            ("ls; cat f", "`;`"),
            ("ls && cat f", "`&&`"),
            ("ls || cat f", "`||`"),
            ("ls &", "`&`"),
            ("echo $(id)", "`$(`"),
            ("echo `id`", "backticks (command substitution)"),
            ("cat <(ls)", "`<(`"),
            ("echo $HOME", "`$HOME`"),
            ("echo ${HOME}", "`${HOME}`"),
            ("echo \"$HOME\"", "`$HOME`"),
            ("cat *.txt", "`*`"),
            ("cat ?", "`?`"),
            ("cat [ab]", "`[`"),
            ("cat ~/x", "`~`"),
            ("cat f\nrm x", "newline"),
            ("(ls)", "`(`"),
            ("ls # c", "`#`"),
            ("/bin/cat f", "program path `/bin/cat`"),
            ("./x", "program path `./x`"),
            ("python3 -c 1", "program `python3` is not allowed"),
            ("cat f |", "empty stage"),
            ("| cat f", "empty stage"),
            ("cat 'f", "unterminated single quote"),
            ("cat \"f", "unterminated double quote"),
            ("cat f\\", "trailing backslash"),
            ("", "empty command"),
            ("   ", "empty command"),
        ];
        for (line, needle) in cases {
            let err = allow(line).expect_err(line).to_string();
            assert!(
                err.contains(needle),
                "{line:?}: {err:?} should contain {needle:?}"
            );
        }
    }

    #[test]
    fn allowlist_adversarial() {
        assert!(
            matches!(allow("cat$IFS/etc/passwd"), Err(ExecRefusal::Variable(v)) if v == "$IFS")
        );
        // Cyrillic 'а' in "cаt" is not the allowed "cat".
        assert!(matches!(
            allow("c\u{430}t f"),
            Err(ExecRefusal::NotAllowed { .. })
        ));
        assert!(matches!(
            allow("cat\u{200b} f"),
            Err(ExecRefusal::NotAllowed { .. })
        ));
        assert!(matches!(
            allow("cat\u{0}f"),
            Err(ExecRefusal::ControlCharacter { .. })
        ));
        assert!(matches!(
            allow("cat 'a\nb'"),
            Err(ExecRefusal::ControlCharacter { .. })
        ));
        assert!(matches!(
            allow("cat \x1b[2J"),
            Err(ExecRefusal::ControlCharacter { .. })
        ));
        assert!(matches!(allow("'c'\"a\"t f"), Ok(ExecCommand::Argv(v)) if v[0] == "cat"));
        assert!(
            matches!(allow("r\\m f"), Err(ExecRefusal::NotAllowed { program, .. }) if program == "rm")
        );
        let long = format!("cat {}", "a".repeat(MAX_COMMAND_BYTES));
        assert!(matches!(allow(&long), Err(ExecRefusal::TooLong { .. })));
        let ok_long = format!("cat {}", "a".repeat(MAX_COMMAND_BYTES - 10));
        assert!(allow(&ok_long).is_ok());
    }

    #[test]
    fn allowlist_refuses_runners_even_when_listed() {
        // `settings` lists awk, as a config that skipped validation might.
        for line in ["awk 'BEGIN{system(\"id\")}'", "cat f | awk '{print}'"] {
            let err = allow(line).expect_err(line);
            assert!(
                matches!(&err, ExecRefusal::Runner { program, .. } if program == "awk"),
                "{line}: {err:?}"
            );
            assert!(err.to_string().contains("system()"), "{err}");
            assert!(err.is_program_refusal());
        }
    }

    fn refused_argument(line: &str, needle: &str) {
        match allow(line) {
            Err(e @ ExecRefusal::Argument { .. }) => {
                assert!(!e.is_program_refusal());
                let text = e.to_string();
                assert!(text.contains(needle), "{line:?}: {text:?} lacks {needle:?}");
            }
            other => panic!("{line:?} should be refused for its arguments, got {other:?}"),
        }
    }

    #[test]
    fn uniq_may_not_write_its_output_file() {
        for line in [
            "uniq in out",
            "uniq -c in out",
            "uniq -f 1 in out",
            "uniq -f1 in out",
            "uniq -cf1 in out",
            "uniq -cf 1 in out",
            "uniq --skip-fields=1 in out",
            "uniq --skip-fields 1 in out",
            "uniq -- in out",
            "uniq -c -- in out",
            "cat in | uniq - out",
            "cat in | uniq -c - out",
            "uniq --all-repeated=none in out",
        ] {
            refused_argument(line, "would write");
        }
        refused_argument("uniq in -c", "put options before file names");
        refused_argument("uniq in -- out", "put options before file names");
        refused_argument("uniq a b c", "extra operand `c`");
        refused_argument("uniq -5 in", "not an option");
        refused_argument(
            "uniq --coun in",
            "write long options in full (did you mean --count?)",
        );
        refused_argument("uniq --count=1 in", "takes no value");
        refused_argument("uniq -f", "needs a value");
        refused_argument("uniq --output=x in", "not an option");
        for line in [
            "uniq",
            "uniq in",
            "uniq -c in",
            "uniq in -",
            "uniq -cd in -",
            "uniq -f 1 -s2 -w 3 in",
            "uniq --skip-fields=1 --group in",
            "uniq --all-repeated=prepend in",
            "uniq -- -odd-name",
            "uniq -f -1 in",
            "cat in | uniq -c",
            "uniq --help",
        ] {
            assert!(allow(line).is_ok(), "{line}: {:?}", allow(line));
        }
    }

    #[test]
    fn date_may_not_set_the_clock() {
        for line in [
            "date -s 2000-01-01",
            "date -s2000-01-01",
            "date -us 2000-01-01",
            "date --set=2000-01-01",
            "date --set 2000-01-01",
            "date -u -s 2000-01-01",
        ] {
            refused_argument(line, "sets the system clock");
        }
        refused_argument("date --se=2000-01-01", "write long options in full");
        refused_argument("date --s 2000", "write long options in full");
        refused_argument("date 0101000070", "would set the system clock");
        refused_argument("date -u 0101000070", "would set the system clock");
        refused_argument("date -- 0101000070", "would set the system clock");
        refused_argument("date +%s +%s", "extra operand");
        for line in [
            "date",
            "date +%Y-%m-%d",
            "date -u +%s",
            "date -d yesterday +%F",
            "date --date='2 days ago'",
            "date -Iseconds",
            "date --iso-8601=ns",
            "date -R",
            "date -r notes.md",
            "date -f dates.txt",
            "date --rfc-3339 seconds",
        ] {
            assert!(allow(line).is_ok(), "{line}: {:?}", allow(line));
        }
    }

    #[test]
    fn pdftotext_prints_and_never_writes_a_file() {
        refused_argument("pdftotext in.pdf", "writes a text file next to `in.pdf`");
        refused_argument("pdftotext -layout in.pdf", "pdftotext in.pdf -");
        refused_argument(
            "pdftotext in.pdf out.txt",
            "`out.txt` is a file pdftotext would write",
        );
        refused_argument("pdftotext -- in.pdf out.txt", "would write");
        refused_argument("pdftotext -f 1 in.pdf out.txt", "would write");
        // -opw takes `in.pdf` as its value, as pdftotext would: `out.txt` is the PDF.
        refused_argument("pdftotext -opw in.pdf out.txt", "next to `out.txt`");
        refused_argument(
            "pdftotext in.pdf - -layout",
            "put options before file names",
        );
        refused_argument("pdftotext -layout=1 in.pdf -", "not an option");
        refused_argument("pdftotext -f1 in.pdf -", "not an option");
        refused_argument("pdftotext in.pdf - x", "extra operand");
        for line in [
            "pdftotext in.pdf -",
            "pdftotext -layout -f 1 -l 2 in.pdf -",
            "pdftotext -opw secret in.pdf -",
            "pdftotext -- -odd.pdf -",
            "pdftotext -v",
            "pdftotext -listenc",
        ] {
            assert!(allow(line).is_ok(), "{line}: {:?}", allow(line));
        }
    }

    #[test]
    fn blocklist_finds_command_words() {
        for line in [
            "rm -rf /workspace",
            "ls; rm x",
            "ls && rm x",
            "ls || rm x",
            "ls | rm x",
            "ls & rm x",
            "echo $(rm x)",
            "echo \"a $(rm x) b\"",
            "echo `rm x`",
            "/bin/rm x",
            "'r'm x",
            "r\\m x",
            "X=1 rm x",
            "env -i X=1 rm x",
            "nohup nice -n 5 rm x",
            "timeout 5 rm x",
            "xargs rm < list",
            "sh -c 'rm x'",
            "bash -ec \"ls; rm x\"",
            "eval rm x",
            "if true; then rm x; fi",
            "> out rm x",
            "ls 2>/dev/null; curl http://x",
            "(dd if=/dev/zero)",
            "cat <(rm x)",
        ] {
            assert!(
                matches!(block(line), Err(ExecRefusal::Blocked(_))),
                "{line:?} should be blocked"
            );
        }
    }

    #[test]
    fn blocklist_allows_other_commands() {
        for line in [
            "ls -la | grep rm",
            "echo rm",
            "cat rm.txt > rm",
            "grep -r 'rm -rf' .",
            "for f in *; do echo \"$f\"; done",
            "python3 -c 'print(1)'",
        ] {
            assert!(
                matches!(block(line), Ok(ExecCommand::Shell(s)) if s == line),
                "{line:?} should pass"
            );
        }
    }

    #[test]
    fn full_passes_through() {
        let s = settings(ExecSecurity::Full);
        assert_eq!(
            vet_command("rm -rf x; echo $(id)", &s).unwrap(),
            ExecCommand::Shell("rm -rf x; echo $(id)".into())
        );
        assert_eq!(vet_command("", &s), Err(ExecRefusal::Empty));
    }

    #[test]
    fn classification() {
        assert!(ExecRefusal::Blocked("rm".into()).is_program_refusal());
        assert!(!ExecRefusal::Tilde.is_program_refusal());
    }
}
