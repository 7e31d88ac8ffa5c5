//! The configuration every property test of the workspace runs with (feature `proptest`).
//!
//! * **Case count**: each test names a default small enough that all property tests together
//!   add well under 30 s to a debug `cargo test --workspace` on 2 cores; the environment
//!   variable [`CASES_ENV`] replaces it for every test at once, for a long run:
//!   `MOLTMATE_PROPTEST_CASES=100000 cargo test --workspace prop_`.
//! * **No failure persistence**: proptest would otherwise write `proptest-regressions/*.txt`
//!   next to the test sources and replay them first on every run. A failure found here is
//!   turned into an ordinary regression test named after the bug (a project rule), so a seed
//!   file would only be an unreviewed, unnamed copy of it; proptest still prints the minimal
//!   failing input.

use proptest::test_runner::Config;

/// Environment variable that sets the number of cases of every property test.
pub const CASES_ENV: &str = "MOLTMATE_PROPTEST_CASES";

/// The proptest configuration with `default_cases` cases unless [`CASES_ENV`] says otherwise.
pub fn config(default_cases: u32) -> Config {
    Config {
        cases: cases(default_cases),
        failure_persistence: None,
        ..Config::default()
    }
}

/// The case count: [`CASES_ENV`] when it holds a positive number, else `default_cases`.
pub fn cases(default_cases: u32) -> u32 {
    std::env::var(CASES_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default_cases)
}
