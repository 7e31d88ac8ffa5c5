//! `moltmate`: see the crate's library (`lib.rs`) and ARCHITECTURE.md.

fn main() -> std::process::ExitCode {
    moltmate::main_entry()
}
