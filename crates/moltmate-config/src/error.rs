//! The one error type of this crate. Every variant names the file it came from and, where the
//! problem is inside the file, the dotted key path (`sandbox.limits.cpus`, `tools.allow[2]`), so
//! an operator can fix the file without reading code.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Why a configuration could not be loaded or written.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Neither `--home`, `MOLTMATE_HOME` nor `HOME` gives a home directory.
    #[error("cannot determine the Moltmates home: pass --home, set MOLTMATE_HOME, or set HOME")]
    NoHome,
    /// The file exists but could not be read (permissions, not a file, too large, not UTF-8).
    #[error("{}: cannot read the configuration: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Anyone on the machine may write the file, so anyone could, say, turn the sandbox off.
    #[error("{}: is writable by every local user (mode {mode:o}); run `chmod 600` on it", path.display())]
    InsecurePermissions { path: PathBuf, mode: u32 },
    /// The file is not valid JSON5. Line and column are 1-based when the parser knows them.
    #[error("{file}: syntax error{}: {message}", position_suffix(*line, *column))]
    Syntax {
        file: String,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    /// A key holds a bad value, an unknown key, or breaks a rule. `key` is the dotted path.
    #[error("{file}: {key}: {problem}")]
    Invalid {
        file: String,
        key: String,
        problem: Problem,
    },
    /// `write_starter_config` refuses to replace an existing configuration.
    #[error("{}: already exists; refusing to overwrite it (edit it, or move it away first)", path.display())]
    AlreadyExists { path: PathBuf },
    /// Creating the home or writing the starter configuration failed.
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn position_suffix(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!(" at line {line} column {column}"),
        (Some(line), None) => format!(" at line {line}"),
        _ => String::new(),
    }
}

impl ConfigError {
    /// The dotted key path the error is about, if it is about one key.
    pub fn key_path(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::NoHome
            | ConfigError::Read { .. }
            | ConfigError::InsecurePermissions { .. }
            | ConfigError::Syntax { .. }
            | ConfigError::AlreadyExists { .. }
            | ConfigError::Write { .. } => None,
        }
    }

    /// The problem with the key, for errors about one key.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            ConfigError::Invalid { problem, .. } => Some(problem),
            ConfigError::NoHome
            | ConfigError::Read { .. }
            | ConfigError::InsecurePermissions { .. }
            | ConfigError::Syntax { .. }
            | ConfigError::AlreadyExists { .. }
            | ConfigError::Write { .. } => None,
        }
    }

    /// True when editing the configuration file (or the environment it references) fixes the
    /// error; false when the problem is the machine (permissions, disk, missing HOME).
    pub fn is_fixable_in_file(&self) -> bool {
        match self {
            ConfigError::Syntax { .. } | ConfigError::Invalid { .. } => true,
            ConfigError::NoHome
            | ConfigError::Read { .. }
            | ConfigError::InsecurePermissions { .. }
            | ConfigError::AlreadyExists { .. }
            | ConfigError::Write { .. } => false,
        }
    }
}

/// What is wrong with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The key is not part of the schema at this place.
    UnknownKey {
        /// The nearest allowed key, when one is close enough to be a likely typo.
        suggestion: Option<String>,
        allowed: Vec<String>,
    },
    /// A required key is missing (only for keys without a sensible default).
    MissingKey,
    /// The value has the wrong JSON type (or is out of the type's range).
    WrongType { expected: String, found: String },
    /// The value is not one of a fixed set of names.
    UnknownValue {
        found: String,
        allowed: Vec<String>,
        suggestion: Option<String>,
    },
    /// The value is well-typed but breaks a rule; the text says which rule.
    Rule(String),
    /// A `${VAR}` reference names a variable that is not set.
    MissingEnvVar { var: String },
    /// A `${` reference is malformed (unterminated, or not a variable name).
    BadEnvReference(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::UnknownKey {
                suggestion: Some(s),
                ..
            } => {
                write!(f, "unknown key; did you mean {s:?}?")
            }
            Problem::UnknownKey {
                suggestion: None,
                allowed,
            } if allowed.is_empty() => f.write_str("unknown key; no keys are allowed here"),
            Problem::UnknownKey {
                suggestion: None,
                allowed,
            } => {
                write!(f, "unknown key; allowed keys: {}", quoted_list(allowed))
            }
            Problem::MissingKey => f.write_str("required key is missing"),
            Problem::WrongType { expected, found } => {
                write!(f, "expected {expected}, found {found}")
            }
            Problem::UnknownValue {
                found,
                allowed,
                suggestion,
            } => {
                write!(
                    f,
                    "unknown value {found:?}; expected one of {}",
                    quoted_list(allowed)
                )?;
                if let Some(s) = suggestion {
                    write!(f, "; did you mean {s:?}?")?;
                }
                Ok(())
            }
            Problem::Rule(text) => f.write_str(text),
            Problem::MissingEnvVar { var } => {
                write!(
                    f,
                    "environment variable {var} is not set (referenced as ${{{var}}})"
                )
            }
            Problem::BadEnvReference(text) => f.write_str(text),
        }
    }
}

fn quoted_list(items: &[String]) -> String {
    items
        .iter()
        .map(|i| format!("{i:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The candidate closest to `input`, if it is close enough to be a plausible typo.
pub(crate) fn suggest<'a>(
    input: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let mut best: Option<(f64, &str)> = None;
    for candidate in candidates {
        let score =
            strsim::jaro_winkler(&input.to_ascii_lowercase(), &candidate.to_ascii_lowercase());
        if best.is_none_or(|(s, _)| score > s) {
            best = Some((score, candidate));
        }
    }
    // 0.8 keeps "mood"->"mode" and "gatway"->"gateway" but drops unrelated names.
    best.filter(|(score, _)| *score >= 0.8)
        .map(|(_, c)| c.to_string())
}
