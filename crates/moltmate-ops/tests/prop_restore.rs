//! Properties of `restore`, whose input (an archive) is outside input: whatever bytes it is
//! handed — a damaged copy of a real backup, a cut one, noise — it never panics, and when it
//! refuses, nothing is left behind; when it accepts, everything it wrote is inside the target.

use moltmate_core::UserId;
use moltmate_ops::backup::{self, BackupOptions};
use moltmate_store::{Homes, Store};
use moltmate_testkit::prop::config as prop_config;
use proptest::prelude::*;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::OnceLock;

/// The sandbox ids the test homes are owned by (any id in the default range).
const SANDBOX_UID: u32 = 2_000_000_123;
const IDS: moltmate_core::sandbox::SandboxIds = moltmate_core::sandbox::SandboxIds::same(SANDBOX_UID);

/// The decompressed tar of a small real backup (made once).
fn real_tar() -> &'static [u8] {
    static TAR: OnceLock<Vec<u8>> = OnceLock::new();
    TAR.get_or_init(|| {
        let base = tempfile::tempdir().unwrap();
        let home = base.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        drop(Store::open(&home.join("moltmate.db")).unwrap());
        let homes = Homes::new(&home);
        let anna = homes.ensure(&UserId::new("anna").unwrap(), IDS).unwrap();
        std::fs::write(anna.root().join("MEMORY.md"), "notes").unwrap();
        std::os::unix::fs::symlink("MEMORY.md", anna.root().join("link.md")).unwrap();
        let archive = base.path().join("b.tar.gz");
        backup::backup(&home, &archive, &BackupOptions::default(), &mut |_| {}).unwrap();
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&archive).unwrap())
            .read_to_end(&mut tar)
            .unwrap();
        tar
    })
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    out.write_all(bytes).unwrap();
    out.finish().unwrap()
}

/// Every path under `dir`, without following links.
fn everything(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(next) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&next) {
            for entry in entries.flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(path.clone());
                }
                out.push(path);
            }
        }
    }
    out
}

fn archive() -> impl Strategy<Value = Vec<u8>> {
    let tar = real_tar();
    let len = tar.len();
    prop_oneof![
        // A few bytes of the tar changed (headers, names, the manifest, contents).
        3 => prop::collection::vec((0..len, any::<u8>()), 1..8).prop_map(move |edits| {
            let mut bytes = tar.to_vec();
            for (at, value) in edits {
                bytes[at] = value;
            }
            gzip(&bytes)
        }),
        // Cut anywhere, then compressed (a complete gzip of a partial tar).
        2 => (0..len).prop_map(move |cut| gzip(&tar[..cut])),
        // Cut after compression.
        1 => (0..len).prop_map(move |cut| {
            let full = gzip(tar);
            full[..cut.min(full.len())].to_vec()
        }),
        1 => prop::collection::vec(any::<u8>(), 0..2048),
        1 => prop::collection::vec(any::<u8>(), 0..2048).prop_map(|b| gzip(&b)),
    ]
}

proptest! {
    #![proptest_config(prop_config(48))]

    #[test]
    fn prop_restore_of_any_bytes_refuses_cleanly_or_stays_inside(bytes in archive()) {
        let base = tempfile::tempdir().unwrap();
        let file = base.path().join("in.tar.gz");
        std::fs::write(&file, &bytes).unwrap();
        let target = base.path().join("target");
        match backup::restore(&file, &target, &mut |_| {}) {
            Err(_) => {
                let left: Vec<_> = std::fs::read_dir(base.path())
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                prop_assert_eq!(left, vec![std::ffi::OsString::from("in.tar.gz")]);
            }
            Ok(_) => {
                for path in everything(base.path()) {
                    prop_assert!(
                        path == file || path.starts_with(&target),
                        "{} is outside the target", path.display()
                    );
                    if let Ok(target_of) = std::fs::read_link(&path) {
                        prop_assert!(!target_of.is_absolute());
                    }
                }
            }
        }
    }
}
