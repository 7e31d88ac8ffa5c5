//! Leaked loop mounts, at the volume layer: a failed first set-up (the home does not fit the
//! cap) leaves no staging mount, no image, and the home's files where they were; ending a
//! volume takes down every mount of its image (stacked ones too) and deletes it; releasing a
//! gateway's volumes takes down everything and refuses new mounts until they are reopened.
//! Root only (loop mounts); prints `SKIP` otherwise unless `MOLTMATE_REQUIRE_SANDBOX=1`.

use moltmate_core::sandbox::SandboxIds;
use moltmate_core::UserId;
use moltmate_sandbox::disk;
use std::io::Write;
use std::path::Path;
use std::process::Command;

const IDS: SandboxIds = SandboxIds {
    uid: 2_015_000_001,
    gid: 2_015_000_001,
};

fn root_or_skip() -> bool {
    if disk::can_enforce() {
        return true;
    }
    if std::env::var("MOLTMATE_REQUIRE_SANDBOX").as_deref() == Ok("1") {
        panic!("disk caps need root (loop mounts)");
    }
    eprintln!("SKIP: disk caps need root (loop mounts)");
    false
}

/// Mount points of loop mounts at or below `dir`.
fn mounts_below(dir: &Path) -> Vec<String> {
    let dir = std::fs::canonicalize(dir).unwrap();
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|line| line.contains(" - ext4 /dev/loop"))
        .filter_map(|line| line.split(' ').nth(4).map(str::to_string))
        .filter(|at| at.starts_with(&dir))
        .collect()
}

/// Incompressible bytes (a home that cannot fit a 16 MiB volume).
fn write_noise(path: &Path, bytes: usize) {
    let mut file = std::fs::File::create(path).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 1 << 16];
    for _ in 0..bytes / chunk.len() {
        for b in chunk.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state as u8;
        }
        file.write_all(&chunk).unwrap();
    }
}

#[test]
fn leaked_loop_mounts_a_failed_migration_leaves_no_mount_and_keeps_the_files() {
    if !root_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("sandboxes");
    let home = dir.path().join("users/telegram_1");
    std::fs::create_dir_all(&home).unwrap();
    write_noise(&home.join("big.bin"), 24 << 20);
    std::fs::write(home.join("SOUL.md"), "mine").unwrap();
    let user = UserId::new("telegram_1").unwrap();
    let failed = disk::ensure_user_volume(&state, &home, &user, 16 << 20, IDS);
    assert!(failed.is_err(), "a home larger than the cap cannot move");
    assert!(
        mounts_below(dir.path()).is_empty(),
        "{:?}",
        mounts_below(dir.path())
    );
    let disks: Vec<_> = std::fs::read_dir(state.join("disks"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name != ".gateways")
        .collect();
    assert!(
        disks.is_empty(),
        "nothing of the failed set-up stays: {disks:?}"
    );
    assert_eq!(
        std::fs::read_to_string(home.join("SOUL.md")).unwrap(),
        "mine"
    );
    assert_eq!(
        std::fs::metadata(home.join("big.bin")).unwrap().len(),
        24 << 20
    );
    // Once it fits, it moves.
    std::fs::remove_file(home.join("big.bin")).unwrap();
    let cap = disk::ensure_user_volume(&state, &home, &user, 16 << 20, IDS).unwrap();
    assert!(cap.enforced);
    assert_eq!(
        std::fs::read_to_string(home.join("SOUL.md")).unwrap(),
        "mine"
    );
    disk::remove_volume(&state, &home, "telegram_1").unwrap();
    assert!(mounts_below(dir.path()).is_empty());
}

#[test]
fn leaked_loop_mounts_removing_a_volume_takes_down_every_mount_of_its_image() {
    if !root_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("sandboxes");
    let home = dir.path().join("users/telegram_2");
    let user = UserId::new("telegram_2").unwrap();
    disk::ensure_user_volume(&state, &home, &user, 16 << 20, IDS).unwrap();
    std::fs::write(home.join("note.md"), "x").unwrap();
    // Two more mounts of the same volume, as an older release or a crash could leave: one
    // stacked on the home, one elsewhere (`mount` itself refuses an image mounted already).
    let image = state.join("disks/telegram_2.img");
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    for at in [&home, &elsewhere] {
        assert!(Command::new("mount")
            .arg("--bind")
            .arg(&home)
            .arg(at)
            .status()
            .unwrap()
            .success());
    }
    assert_eq!(mounts_below(dir.path()).len(), 3);
    disk::remove_volume(&state, &home, "telegram_2").unwrap();
    assert!(
        mounts_below(dir.path()).is_empty(),
        "{:?}",
        mounts_below(dir.path())
    );
    assert!(!image.exists());
}

#[test]
fn leaked_loop_mounts_released_volumes_stay_released_until_reopened() {
    if !root_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("sandboxes");
    let hold = disk::open_volumes(&state).unwrap();
    let home = dir.path().join("users/telegram_3");
    let user = UserId::new("telegram_3").unwrap();
    disk::ensure_user_volume(&state, &home, &user, 16 << 20, IDS).unwrap();
    assert_eq!(mounts_below(dir.path()).len(), 1);
    assert_eq!(hold.release().unwrap(), 1);
    assert!(mounts_below(dir.path()).is_empty());
    // A turn still running after the shutdown cannot mount it again.
    assert!(disk::ensure_user_volume(&state, &home, &user, 16 << 20, IDS).is_err());
    assert!(mounts_below(dir.path()).is_empty());
    let hold = disk::open_volumes(&state).unwrap();
    disk::ensure_user_volume(&state, &home, &user, 16 << 20, IDS).unwrap();
    assert_eq!(mounts_below(dir.path()).len(), 1);
    assert_eq!(hold.release().unwrap(), 1);
    assert!(mounts_below(dir.path()).is_empty());
}
