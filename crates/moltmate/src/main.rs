//! `moltmate`: see the crate's library (`lib.rs`) and ARCHITECTURE.md.

/// mimalloc instead of glibc's malloc: under load glibc spent a sixth of the gateway's CPU in
/// malloc, free and their consolidation, and kept freed memory in per-thread arenas (the peak
/// RSS with 200 users at once). See ARCHITECTURE.md, "Allocator".
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    moltmate::main_entry()
}
