//! Release builds of the `moltmate` binary on x86_64 Linux link the code the gateway runs
//! (start-up, an idle tick, a chat over the API and over Telegram) next to each other, in the
//! order of `symbol-order.txt` (hottest first).
//!
//! Why: the kernel maps a whole 64–128 KiB block of the binary around every code page a fault
//! touches, and the linker otherwise scatters the ~3 MB of functions the gateway runs across
//! 16 MB of text, so start-up alone made ~11 MB of it resident. Grouped, the same code costs
//! about the size of the code (README, Performance; ARCHITECTURE, decisions).
//!
//! The file is a list of mangled symbol names taken from a callgrind run of the release
//! binary (`.ci/symbol-order`). Names that no longer exist are ignored, so a stale file costs
//! memory, never a failed build. Only LLD reads it: rustc links x86_64-unknown-linux-gnu with
//! its bundled LLD since 1.90, so the option is given only there, only when no linker was
//! chosen by the build's flags, and never when `MOLTMATE_NO_SYMBOL_ORDER` is set.

use std::env;
use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=symbol-order.txt");
    println!("cargo:rerun-if-env-changed=MOLTMATE_NO_SYMBOL_ORDER");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");
    let file =
        Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join("symbol-order.txt");
    // `-Wl,` splits its argument at commas: a checkout under such a path links unordered.
    if linked_by_bundled_lld() && file.is_file() && !file.to_string_lossy().contains(',') {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            file.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}

/// Whether this is a release build for x86_64 Linux (GNU) that rustc links with its own LLD.
fn linked_by_bundled_lld() -> bool {
    let var = |name: &str| env::var(name).unwrap_or_default();
    let flags = var("CARGO_ENCODED_RUSTFLAGS");
    var("PROFILE") == "release"
        && var("TARGET") == "x86_64-unknown-linux-gnu"
        && env::var_os("MOLTMATE_NO_SYMBOL_ORDER").is_none()
        && env::var_os("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_none()
        && !flags.contains("linker")
        && !flags.contains("fuse-ld")
        && rustc_minor().is_some_and(|minor| minor >= 90)
}

/// The minor version of the compiler building this (`rustc 1.95.0 (...)` gives 95).
fn rustc_minor() -> Option<u32> {
    let rustc = env::var_os("RUSTC")?;
    let output = Command::new(rustc).arg("--version").output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let version = text.split_whitespace().nth(1)?;
    let mut parts = version.split('.');
    (parts.next()? == "1").then_some(())?;
    parts.next()?.parse().ok()
}
