//! Backup and restore of a prepared home (no gateway running; the round trip under load with a
//! real gateway is `crates/moltmate/tests/backup_restore.rs`): what a hostile home cannot do
//! to a backup, what a corrupted or hostile archive cannot do to a restore.

use moltmate_core::UserId;
use moltmate_ops::backup::{self, BackupOptions, Manifest, Progress};
use moltmate_ops::OpsError;
use moltmate_store::{Homes, Store};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The sandbox ids the test homes are owned by (any id in the default range).
const SANDBOX_UID: u32 = 2_000_000_123;
const IDS: moltmate_core::sandbox::SandboxIds =
    moltmate_core::sandbox::SandboxIds::same(SANDBOX_UID);

fn quiet() -> impl FnMut(&Progress) {
    |_| {}
}

fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
}

/// A home like a gateway leaves it, with a hostile user's files in it.
async fn prepared_home(base: &Path) -> PathBuf {
    let home = base.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let store = Store::open(&home.join("moltmate.db")).unwrap();
    let homes = Homes::new(&home);
    let anna = UserId::new("anna").unwrap();
    let mallory = UserId::new("mallory").unwrap();
    store.ensure_user(&anna, Some("Anna")).await.unwrap();
    store.ensure_user(&mallory, None).await.unwrap();
    let token = store.issue_token(&anna, Some("laptop")).await.unwrap();
    std::fs::write(home.join("admin.token"), "mma_ADMIN-SECRET").unwrap();
    std::fs::write(
        home.join("moltmate.json"),
        "// mine\n{ channels: { telegram: { botToken: \"123:BOT-SECRET\" } } }\n",
    )
    .unwrap();
    std::fs::write(home.join("token.txt"), &token).unwrap();

    let anna_home = homes.ensure(&anna, IDS).unwrap();
    std::fs::write(anna_home.root().join("MEMORY.md"), "Anna likes chess").unwrap();
    std::fs::write(
        anna_home.root().join("memory/2026-12-01.md"),
        "went to the club",
    )
    .unwrap();
    std::os::unix::fs::symlink("MEMORY.md", anna_home.root().join("notes.md")).unwrap();
    std::fs::write(anna_home.root().join("workspace/run.sh"), "echo hi").unwrap();
    std::fs::set_permissions(
        anna_home.root().join("workspace/run.sh"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();

    let m = homes.ensure(&mallory, IDS).unwrap();
    mkfifo(&m.root().join("SOUL.md"));
    let _socket = std::os::unix::net::UnixListener::bind(m.root().join("sock")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", m.root().join("shadow")).unwrap();
    std::os::unix::fs::symlink("../anna/MEMORY.md", m.root().join("steal.md")).unwrap();
    std::fs::File::create(m.root().join("sparse"))
        .unwrap()
        .set_len(100 << 30)
        .unwrap();
    let mut deep = m.root().join("workspace");
    for _ in 0..100 {
        deep.push("d");
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(m.root().join("MEMORY.md"), "mallory's own notes").unwrap();

    homes.ensure_family("smiths", IDS).unwrap();
    std::fs::write(home.join("families/smiths/FAMILY.md"), "We are the Smiths").unwrap();
    std::fs::create_dir_all(home.join("personas/pirate")).unwrap();
    std::fs::write(home.join("personas/pirate/SOUL.md"), "Arr").unwrap();
    std::fs::create_dir_all(home.join("index")).unwrap();
    std::fs::write(home.join("index/anna.db"), "cache").unwrap();
    if rustix::process::geteuid().is_root() {
        // Per-user sandbox uids: each home keeps its own numeric owner.
        std::os::unix::fs::chown(anna_home.root(), Some(1000), Some(1000)).unwrap();
        std::os::unix::fs::chown(anna_home.root().join("MEMORY.md"), Some(1000), Some(1000))
            .unwrap();
        std::os::unix::fs::chown(m.root(), Some(70123), Some(70123)).unwrap();
        std::os::unix::fs::chown(m.root().join("MEMORY.md"), Some(70123), Some(70123)).unwrap();
    }
    drop(store);
    home
}

fn read_manifest(archive: &Path) -> Manifest {
    let file = std::fs::File::open(archive).unwrap();
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap() == Path::new("MANIFEST.json") {
            let mut text = String::new();
            entry.read_to_string(&mut text).unwrap();
            return serde_json::from_str(&text).unwrap();
        }
    }
    panic!("no manifest")
}

fn decompressed(archive: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(archive).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// Nothing but `keep` is left in `dir` (no half-restored home, no work folder).
fn only(dir: &Path, keep: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut keep: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
    keep.sort();
    assert_eq!(names, keep, "left behind in {}", dir.display());
}

#[tokio::test]
async fn a_hostile_home_is_backed_up_bounded_and_restored_with_its_owners() {
    let base = tempfile::tempdir().unwrap();
    let home = prepared_home(base.path()).await;
    let token = std::fs::read_to_string(home.join("token.txt")).unwrap();
    let archive = base.path().join("backup.tar.gz");
    let mut events = Vec::new();
    let report = tokio::task::spawn_blocking({
        let (home, archive) = (home.clone(), archive.clone());
        move || {
            let mut record = |p: &Progress| events.push(*p);
            let report = backup::backup(&home, &archive, &BackupOptions::default(), &mut record);
            (report, events)
        }
    })
    .await
    .unwrap();
    let (report, events) = report;
    let report = report.unwrap();
    assert!(events.iter().any(|p| p.phase == "database"));
    assert_eq!(events.last().map(|p| p.phase), Some("done"));
    assert_eq!(
        std::fs::metadata(&archive).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The marker `moltmate doctor` reads.
    let marker: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(home.join("backups/last.json")).unwrap())
            .unwrap();
    assert_eq!(marker["finishedAt"], report.finished_at);
    assert_eq!(marker["file"], archive.display().to_string());
    assert_eq!(
        std::fs::metadata(home.join("backups/last.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(home.join("backups"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );

    // What was skipped, and why.
    let manifest = read_manifest(&archive);
    let skipped = manifest.skipped.join("\n");
    for expected in [
        "users/mallory/SOUL.md: it is a FIFO",
        "users/mallory/sock: it is a socket",
        "users/mallory/sparse:",
        "nested too deep",
        "users/mallory/shadow: a symbolic link pointing outside its folder",
        "users/mallory/steal.md: a symbolic link pointing outside its folder",
    ] {
        assert!(
            skipped.contains(expected),
            "{expected} missing in {skipped}"
        );
    }
    let paths: Vec<&str> = manifest.entries.iter().map(|e| e.path.as_str()).collect();
    assert!(
        paths.contains(&"users/anna/notes.md"),
        "links inside the home are kept"
    );
    assert!(
        !paths.iter().any(|p| p.starts_with("index")),
        "the index is rebuilt, not backed up"
    );
    assert!(!paths.contains(&"admin.token"));
    assert!(!manifest.includes_secrets);
    assert_eq!(
        manifest.secrets_left_out,
        ["channels.telegram.botToken → MOLTMATE_TELEGRAM_BOT_TOKEN"]
    );
    let bytes = decompressed(&archive);
    for secret in ["BOT-SECRET", "mma_ADMIN-SECRET"] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} is in the archive"
        );
    }

    // Restore into a new directory.
    let target = base.path().join("restored");
    let restored = tokio::task::spawn_blocking({
        let (archive, target) = (archive.clone(), target.clone());
        move || backup::restore(&archive, &target, &mut quiet())
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(restored.secrets_left_out, manifest.secrets_left_out);
    for (path, text) in [
        ("users/anna/MEMORY.md", "Anna likes chess"),
        ("users/anna/memory/2026-12-01.md", "went to the club"),
        ("users/mallory/MEMORY.md", "mallory's own notes"),
        ("families/smiths/FAMILY.md", "We are the Smiths"),
        ("personas/pirate/SOUL.md", "Arr"),
    ] {
        assert_eq!(
            std::fs::read_to_string(target.join(path)).unwrap(),
            text,
            "{path}"
        );
    }
    assert_eq!(
        std::fs::read_link(target.join("users/anna/notes.md")).unwrap(),
        Path::new("MEMORY.md")
    );
    for gone in [
        "users/mallory/SOUL.md",
        "users/mallory/shadow",
        "users/mallory/sparse",
        "admin.token",
        "index",
    ] {
        assert!(
            std::fs::symlink_metadata(target.join(gone)).is_err(),
            "{gone}"
        );
    }
    let config = std::fs::read_to_string(target.join("moltmate.json")).unwrap();
    assert!(
        config.contains("${MOLTMATE_TELEGRAM_BOT_TOKEN}") && config.contains("// mine"),
        "{config}"
    );
    let mode = |p: &str| {
        std::fs::metadata(target.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode(""), 0o700);
    assert_eq!(mode("moltmate.db"), 0o600);
    assert_eq!(mode("moltmate.json"), 0o600);
    assert_eq!(
        mode("users/anna/workspace/run.sh"),
        0o755,
        "setuid is dropped"
    );
    if rustix::process::geteuid().is_root() {
        assert!(!restored.owners_kept);
        let owner = |p: &str| std::fs::metadata(target.join(p)).unwrap().uid();
        assert_eq!(owner("users/anna"), 1000);
        assert_eq!(owner("users/anna/MEMORY.md"), 1000);
        assert_eq!(owner("users/mallory"), 70123);
        assert_eq!(owner("users/mallory/MEMORY.md"), 70123);
    }
    let store = Store::open(&target.join("moltmate.db")).unwrap();
    assert_eq!(
        store.user_for_token(&token).await.unwrap(),
        Some(UserId::new("anna").unwrap()),
        "API tokens survive"
    );
    assert_eq!(store.list_users().await.unwrap().len(), 2);
    only(base.path(), &["home", "backup.tar.gz", "restored"]);
}

#[tokio::test]
async fn backup_with_secrets_keeps_them_and_never_overwrites_a_file() {
    let base = tempfile::tempdir().unwrap();
    let home = prepared_home(base.path()).await;
    let archive = base.path().join("full.tar.gz");
    let options = BackupOptions {
        include_secrets: true,
        ..BackupOptions::default()
    };
    backup::backup(&home, &archive, &options, &mut quiet()).unwrap();
    let manifest = read_manifest(&archive);
    assert!(manifest.includes_secrets);
    assert!(manifest.entries.iter().any(|e| e.path == "admin.token"));
    let again = backup::backup(&home, &archive, &options, &mut quiet()).unwrap_err();
    assert!(again.to_string().contains("never overwrites"), "{again}");
    let target = base.path().join("restored");
    backup::restore(&archive, &target, &mut quiet()).unwrap();
    assert_eq!(
        std::fs::read_to_string(target.join("admin.token")).unwrap(),
        "mma_ADMIN-SECRET"
    );
    assert!(std::fs::read_to_string(target.join("moltmate.json"))
        .unwrap()
        .contains("123:BOT-SECRET"));
}

#[tokio::test]
async fn restore_refuses_a_non_empty_target_and_writes_nothing() {
    let base = tempfile::tempdir().unwrap();
    let home = prepared_home(base.path()).await;
    let archive = base.path().join("b.tar.gz");
    backup::backup(&home, &archive, &BackupOptions::default(), &mut quiet()).unwrap();
    let error = backup::restore(&archive, &home, &mut quiet()).unwrap_err();
    assert!(matches!(error, OpsError::TargetNotEmpty(_)), "{error}");
    assert!(error.to_string().contains("not empty"), "{error}");
    // An empty directory is fine.
    let empty = base.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    backup::restore(&archive, &empty, &mut quiet()).unwrap();
    assert!(empty.join("moltmate.db").is_file());
}

#[tokio::test]
async fn a_corrupted_or_truncated_archive_is_refused_with_nothing_written() {
    let base = tempfile::tempdir().unwrap();
    let home = prepared_home(base.path()).await;
    let archive = base.path().join("good.tar.gz");
    backup::backup(&home, &archive, &BackupOptions::default(), &mut quiet()).unwrap();
    let good = std::fs::read(&archive).unwrap();
    let scratch = base.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();

    // Compressed bytes flipped, compressed stream cut, a file's content changed inside an
    // intact compressed stream, the manifest cut off, garbage.
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x55;
    cases.push(("flipped", flipped));
    cases.push(("truncated", good[..good.len() * 2 / 3].to_vec()));
    cases.push(("trailer", good[..good.len() - 4].to_vec()));
    let plain = decompressed(&archive);
    let needle = b"Anna likes chess";
    let at = plain
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    let mut tampered = plain.clone();
    tampered[at] = b'B';
    cases.push(("tampered", gzip(&tampered)));
    let manifest_at = plain
        .windows(b"MANIFEST.json".len())
        .position(|w| w == b"MANIFEST.json")
        .unwrap();
    cases.push((
        "no manifest",
        gzip(&plain[..manifest_at - manifest_at % 512]),
    ));
    cases.push(("garbage", b"this is not an archive at all".to_vec()));

    for (name, bytes) in cases {
        let file = scratch.join(format!("{name}.tar.gz"));
        std::fs::write(&file, &bytes).unwrap();
        let target = scratch.join(format!("{name}-restored"));
        let error = backup::restore(&file, &target, &mut quiet()).unwrap_err();
        assert!(error.is_refusal(), "{name}: {error}");
        assert!(
            error.to_string().starts_with("refusing the archive"),
            "{name}: {error}"
        );
        assert!(!target.exists(), "{name}: nothing is written");
        let left: Vec<String> = std::fs::read_dir(&scratch)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.ends_with(".tar.gz"))
            .collect();
        assert!(left.is_empty(), "{name}: left behind {left:?}");
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    out.write_all(bytes).unwrap();
    out.finish().unwrap()
}

/// One raw tar entry, written byte for byte (the `tar` crate refuses to write `..` itself).
struct Raw {
    name: &'static [u8],
    kind: tar::EntryType,
    link: &'static [u8],
    data: &'static [u8],
}

fn raw(name: &'static [u8], kind: tar::EntryType) -> Raw {
    Raw {
        name,
        kind,
        link: b"",
        data: b"",
    }
}

/// A gzip'd tar of `entries`, each also listed in a manifest that matches it (so only the
/// entry's own nature can make the restore refuse it).
fn hostile_archive(entries: &[Raw]) -> Vec<u8> {
    use sha2::Digest;
    let mut tar = tar::Builder::new(Vec::new());
    let mut listed = Vec::new();
    let push = |tar: &mut tar::Builder<Vec<u8>>, entry: &Raw| {
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..entry.name.len()].copy_from_slice(entry.name);
        header.as_old_mut().linkname[..entry.link.len()].copy_from_slice(entry.link);
        header.set_entry_type(entry.kind);
        header.set_mode(0o600);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(entry.data.len() as u64);
        header.set_cksum();
        tar.append(&header, entry.data).unwrap();
    };
    let db = Raw {
        name: b"moltmate.db",
        kind: tar::EntryType::Regular,
        link: b"",
        data: b"x",
    };
    for entry in std::iter::once(&db).chain(entries) {
        push(&mut tar, entry);
        listed.push(serde_json::json!({
            "path": String::from_utf8_lossy(entry.name),
            "kind": match entry.kind { tar::EntryType::Directory => "dir", tar::EntryType::Symlink => "symlink", _ => "file" },
            "size": entry.data.len(), "mode": 0o600, "uid": 0, "gid": 0, "mtime": 0,
            "sha256": hex::encode(sha2::Sha256::digest(entry.data)),
            "target": String::from_utf8_lossy(entry.link),
        }));
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "format": "moltmate-backup", "version": 1, "moltmateVersion": "0", "schemaVersion": 1,
        "createdAt": 0, "includesSecrets": false, "entries": listed,
    }))
    .unwrap();
    let mut header = tar::Header::new_gnu();
    header.set_size(manifest.len() as u64);
    header.set_mode(0o600);
    header.set_cksum();
    tar.append_data(&mut header, "MANIFEST.json", &manifest[..])
        .unwrap();
    gzip(&tar.into_inner().unwrap())
}

#[test]
fn hostile_archive_entries_are_refused_before_anything_is_written() {
    use tar::EntryType::*;
    let base = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<Raw>, &str)> = vec![
        (
            "dotdot",
            vec![
                raw(b"users", Directory),
                Raw {
                    data: b"pwned",
                    ..raw(b"users/../../evil", Regular)
                },
            ],
            "`..` is refused",
        ),
        (
            "absolute",
            vec![Raw {
                data: b"pwned",
                ..raw(b"/tmp/evil", Regular)
            }],
            "absolute paths are refused",
        ),
        (
            "unknown top",
            vec![Raw {
                data: b"pwned",
                ..raw(b"etc/cron.d/x", Regular)
            }],
            "not part of a moltmate home",
        ),
        (
            "link out",
            vec![
                raw(b"users", Directory),
                raw(b"users/a", Directory),
                Raw {
                    link: b"/etc",
                    ..raw(b"users/a/x", Symlink)
                },
            ],
            "pointing outside its folder",
        ),
        (
            "link up",
            vec![
                raw(b"users", Directory),
                raw(b"users/a", Directory),
                Raw {
                    link: b"../../..",
                    ..raw(b"users/a/x", Symlink)
                },
            ],
            "pointing outside its folder",
        ),
        (
            "write through a link",
            vec![
                raw(b"users", Directory),
                raw(b"users/a", Directory),
                Raw {
                    link: b".",
                    ..raw(b"users/a/x", Symlink)
                },
                Raw {
                    data: b"pwned",
                    ..raw(b"users/a/x/y", Regular)
                },
            ],
            "beneath something that is not a directory",
        ),
        (
            "hard link",
            vec![
                raw(b"users", Directory),
                Raw {
                    link: b"/etc/shadow",
                    ..raw(b"users/h", Link)
                },
            ],
            "hard links are refused",
        ),
        (
            "device",
            vec![raw(b"users", Directory), raw(b"users/zero", Char)],
            "device nodes are refused",
        ),
        (
            "block device",
            vec![raw(b"users", Directory), raw(b"users/sda", Block)],
            "device nodes are refused",
        ),
        (
            "fifo",
            vec![raw(b"users", Directory), raw(b"users/p", Fifo)],
            "FIFOs are refused",
        ),
        (
            "orphan",
            vec![Raw {
                data: b"x",
                ..raw(b"users/a/MEMORY.md", Regular)
            }],
            "comes before its folder",
        ),
        (
            "twice",
            vec![raw(b"users", Directory), raw(b"users", Directory)],
            "",
        ),
    ];
    for (name, entries, expected) in cases {
        let file = base.path().join("hostile.tar.gz");
        std::fs::write(&file, hostile_archive(&entries)).unwrap();
        let target = base.path().join("target");
        let error = backup::restore(&file, &target, &mut quiet()).unwrap_err();
        assert!(matches!(error, OpsError::BadArchive(_)), "{name}: {error}");
        assert!(error.to_string().contains(expected), "{name}: {error}");
        assert!(!target.exists(), "{name}");
        only(base.path(), &["hostile.tar.gz"]);
        assert!(!Path::new("/tmp/evil").exists());
    }
}

/// A capped home lives on a loop-mounted ext4 image: the backup holds its files (never the
/// image), whether the volume is mounted here (the gateway runs) or not (after a reboot, or
/// the gateway's mounts live in another namespace).
#[test]
fn a_capped_home_is_backed_up_from_its_files_mounted_or_not() {
    use moltmate_sandbox::disk;
    if !disk::can_enforce() {
        assert!(
            std::env::var_os("MOLTMATE_REQUIRE_SANDBOX").is_none(),
            "disk caps need root"
        );
        eprintln!("SKIP: disk caps need root");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let home = base.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    drop(Store::open(&home.join("moltmate.db")).unwrap());
    let user = UserId::new("capped").unwrap();
    let dir = Homes::new(&home)
        .ensure(&user, IDS)
        .unwrap()
        .root()
        .to_path_buf();
    let cap =
        disk::ensure_user_volume(&home.join("sandboxes"), &dir, &user, 24 << 20, IDS).unwrap();
    assert!(cap.enforced);
    std::fs::write(dir.join("MEMORY.md"), "on the image").unwrap();
    std::os::unix::fs::chown(dir.join("MEMORY.md"), Some(SANDBOX_UID), Some(SANDBOX_UID)).unwrap();

    let mounted = base.path().join("mounted.tar.gz");
    backup::backup(&home, &mounted, &BackupOptions::default(), &mut quiet()).unwrap();
    disk::release_user_volume(&dir).unwrap();
    assert!(
        !dir.join("MEMORY.md").exists(),
        "the files are on the image only"
    );
    let unmounted = base.path().join("unmounted.tar.gz");
    backup::backup(&home, &unmounted, &BackupOptions::default(), &mut quiet()).unwrap();
    assert!(
        !disk::is_mounted_volume(&dir),
        "the read-only mount is gone"
    );

    for archive in [&mounted, &unmounted] {
        let manifest = read_manifest(archive);
        let memory = manifest
            .entries
            .iter()
            .find(|e| e.path == "users/capped/MEMORY.md")
            .unwrap_or_else(|| panic!("{}: {:?}", archive.display(), manifest.skipped));
        assert_eq!(memory.size, "on the image".len() as u64);
        assert!(
            !manifest
                .entries
                .iter()
                .any(|e| e.path.contains("sandboxes") || e.path.ends_with(".img")),
            "images are not backed up"
        );
        let home_entry = manifest
            .entries
            .iter()
            .find(|e| e.path == "users/capped")
            .unwrap();
        assert_eq!(home_entry.uid, u64::from(SANDBOX_UID));
    }
    let target = base.path().join("restored");
    backup::restore(&unmounted, &target, &mut quiet()).unwrap();
    assert_eq!(
        std::fs::read_to_string(target.join("users/capped/MEMORY.md")).unwrap(),
        "on the image"
    );
    assert_eq!(
        std::fs::metadata(target.join("users/capped/MEMORY.md"))
            .unwrap()
            .uid(),
        SANDBOX_UID
    );
}

#[test]
fn an_archive_claiming_more_than_the_free_space_is_refused_before_its_content_is_read() {
    let base = tempfile::tempdir().unwrap();
    let mut header = tar::Header::new_gnu();
    header.set_path("moltmate.db").unwrap();
    header.set_size(1 << 50);
    header.set_mode(0o600);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    // A petabyte promised, 512 bytes delivered.
    let mut tar = header.as_bytes().to_vec();
    tar.extend_from_slice(&[0u8; 512]);
    let file = base.path().join("bomb.tar.gz");
    std::fs::write(&file, gzip(&tar)).unwrap();
    let target = base.path().join("target");
    let error = backup::restore(&file, &target, &mut quiet()).unwrap_err();
    assert!(
        error.to_string().contains("free beside the target"),
        "{error}"
    );
    assert!(!target.exists());
}

/// Creates `dirs/…/file` beneath `root` one component at a time (the whole path may be longer
/// than the kernel's `PATH_MAX`).
fn deep_write(root: &Path, dirs: &[String], file: &str, content: &[u8]) {
    use rustix::fs::{Mode, OFlags};
    let mut dir =
        rustix::fs::open(root, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
    for name in dirs {
        match rustix::fs::mkdirat(&dir, name.as_str(), Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => panic!("{e}"),
        }
        dir = rustix::fs::openat(
            &dir,
            name.as_str(),
            OFlags::DIRECTORY | OFlags::RDONLY,
            Mode::empty(),
        )
        .unwrap();
    }
    let fd = rustix::fs::openat(
        &dir,
        file,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
        Mode::from_raw_mode(0o600),
    )
    .unwrap();
    std::fs::File::from(fd).write_all(content).unwrap();
}

fn deep_read(root: &Path, dirs: &[String], file: &str) -> Vec<u8> {
    use rustix::fs::{Mode, OFlags};
    let mut dir =
        rustix::fs::open(root, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
    for name in dirs {
        dir = rustix::fs::openat(
            &dir,
            name.as_str(),
            OFlags::DIRECTORY | OFlags::RDONLY,
            Mode::empty(),
        )
        .unwrap();
    }
    let fd = rustix::fs::openat(&dir, file, OFlags::RDONLY, Mode::empty()).unwrap();
    let mut out = Vec::new();
    std::fs::File::from(fd).read_to_end(&mut out).unwrap();
    out
}

/// F1: a path of ~4 KB inside a home (what the write tool allows) is longer than 4096 bytes
/// once `users/<id>/` or `archive/<id>-<stamp>/home/` is in front. The backup used to store it
/// and the restore refused it, so every backup was unrestorable while `doctor` said PASS.
#[tokio::test]
async fn backup_with_paths_longer_than_path_max_restores() {
    let base = tempfile::tempdir().unwrap();
    let home = prepared_home(base.path()).await;
    // 4,095 bytes: the longest relative path the write tool takes.
    let mut dirs: Vec<String> = (0..20)
        .map(|i| format!("{i:02}{}", "x".repeat(198)))
        .collect();
    dirs.push("y".repeat(67));
    assert_eq!(
        dirs.iter().map(|d| d.len() + 1).sum::<usize>() + "deep.md".len(),
        4095
    );
    deep_write(
        &home.join("users/anna"),
        &dirs,
        "deep.md",
        b"deep in anna's home",
    );
    let archived = home.join("archive/anna-20261201-120000/home");
    std::fs::create_dir_all(&archived).unwrap();
    deep_write(&archived, &dirs, "deep.md", b"deep in the reset archive");

    let archive = base.path().join("b.tar.gz");
    let report = backup::backup(&home, &archive, &BackupOptions::default(), &mut quiet()).unwrap();
    let manifest = read_manifest(&archive);
    assert!(
        manifest
            .entries
            .iter()
            .any(|e| e.path.starts_with("users/anna/")
                && e.path.ends_with("/deep.md")
                && e.path.len() > 4096)
            && manifest
                .entries
                .iter()
                .any(|e| e.path.starts_with("archive/anna-") && e.path.ends_with("/deep.md")),
        "the deep file is in the archive: {:?}",
        report.skipped
    );
    assert!(home.join("backups/last.json").exists());

    let restored = base.path().join("restored");
    backup::restore(&archive, &restored, &mut quiet()).unwrap();
    assert_eq!(
        deep_read(&restored.join("users/anna"), &dirs, "deep.md"),
        b"deep in anna's home"
    );
    assert_eq!(
        deep_read(
            &restored.join("archive/anna-20261201-120000/home"),
            &dirs,
            "deep.md"
        ),
        b"deep in the reset archive"
    );
}

/// F7: `moltmate.json` and `admin.token` were read following links, so a link there put an
/// outside file into the archive.
#[tokio::test]
async fn backup_does_not_follow_top_level_symlinks() {
    let base = tempfile::tempdir().unwrap();
    let home = prepared_home(base.path()).await;
    let outside = base.path().join("outside.txt");
    std::fs::write(&outside, "{ outside: \"OUTSIDE-SECRET\" }").unwrap();
    for name in ["moltmate.json", "admin.token"] {
        std::fs::remove_file(home.join(name)).unwrap();
        std::os::unix::fs::symlink(&outside, home.join(name)).unwrap();
    }
    let archive = base.path().join("b.tar.gz");
    let options = BackupOptions {
        include_secrets: true,
        ..BackupOptions::default()
    };
    let report = backup::backup(&home, &archive, &options, &mut quiet()).unwrap();
    let manifest = read_manifest(&archive);
    for name in ["moltmate.json", "admin.token"] {
        assert!(!manifest.entries.iter().any(|e| e.path == name), "{name}");
        assert!(
            report
                .skipped
                .iter()
                .any(|s| s.starts_with(name) && s.contains("symbolic link")),
            "{name}: {:?}",
            report.skipped
        );
    }
    let bytes = decompressed(&archive);
    assert!(!bytes
        .windows(b"OUTSIDE-SECRET".len())
        .any(|w| w == b"OUTSIDE-SECRET"));
}

/// F3: sparse files became real disk: the reset archive's copy wrote a 2 GiB sparse file out
/// in full, the backup read all of it, the restore wrote all zeros.
#[tokio::test]
async fn sparse_files_are_skipped_or_stay_sparse() {
    let base = tempfile::tempdir().unwrap();
    let home = prepared_home(base.path()).await;
    let anna = home.join("users/anna");
    let mut holes = std::fs::File::create(anna.join("holes")).unwrap();
    holes.write_all(b"head").unwrap();
    holes.set_len(32 << 20).unwrap();
    std::fs::File::create(anna.join("huge"))
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let allocated = |path: &Path| std::fs::metadata(path).unwrap().blocks() * 512;

    // The reset archive's copy.
    let copy = base.path().join("copy");
    let report = moltmate_store::homes::copy_tree(&anna, &copy, Default::default()).unwrap();
    assert!(
        report
            .skipped
            .iter()
            .any(|s| s.starts_with("huge: a sparse file")),
        "{:?}",
        report.skipped
    );
    assert!(!copy.join("huge").exists());
    assert_eq!(
        std::fs::metadata(copy.join("holes")).unwrap().len(),
        32 << 20
    );
    assert!(
        allocated(&copy.join("holes")) < 1 << 20,
        "the copy keeps its holes"
    );

    let archive = base.path().join("b.tar.gz");
    let report = backup::backup(&home, &archive, &BackupOptions::default(), &mut quiet()).unwrap();
    assert!(
        report
            .skipped
            .iter()
            .any(|s| s.starts_with("users/anna/huge: a sparse file")),
        "{:?}",
        report.skipped
    );
    let restored = base.path().join("restored");
    backup::restore(&archive, &restored, &mut quiet()).unwrap();
    let back = restored.join("users/anna/holes");
    assert_eq!(std::fs::metadata(&back).unwrap().len(), 32 << 20);
    assert!(allocated(&back) < 1 << 20, "the restore keeps holes");
    let mut head = [0u8; 4];
    std::fs::File::open(&back)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(&head, b"head");
}

/// F5: a link's target was resolved as text, ignoring that an earlier component may itself be
/// a link: `a/b -> ..` plus `escape -> a/b/a/b/../../../../etc/shadow` passed, was archived and
/// restored pointing out of the home.
#[tokio::test]
async fn link_through_another_link_is_not_archived() {
    let base = tempfile::tempdir().unwrap();
    let home = prepared_home(base.path()).await;
    let anna = home.join("users/anna");
    std::fs::create_dir(anna.join("a")).unwrap();
    std::os::unix::fs::symlink("..", anna.join("a/b")).unwrap();
    std::os::unix::fs::symlink("a/b/a/b/../../../../etc/shadow", anna.join("escape")).unwrap();
    let archive = base.path().join("b.tar.gz");
    let report = backup::backup(&home, &archive, &BackupOptions::default(), &mut quiet()).unwrap();
    assert!(
        report
            .skipped
            .iter()
            .any(|s| s.starts_with("users/anna/escape: a symbolic link")),
        "{:?}",
        report.skipped
    );
    let manifest = read_manifest(&archive);
    assert!(manifest.entries.iter().any(|e| e.path == "users/anna/a/b"));
    assert!(!manifest
        .entries
        .iter()
        .any(|e| e.path == "users/anna/escape"));
    let restored = base.path().join("restored");
    backup::restore(&archive, &restored, &mut quiet()).unwrap();
    assert!(std::fs::symlink_metadata(restored.join("users/anna/escape")).is_err());
}

/// F4: the verify pass kept every entry's name in memory with only their count bounded (300k
/// names of 4 KB: 1.27 GB RSS). The names' total is bounded now, refused before the manifest.
#[test]
fn archive_with_too_many_long_names_is_refused_bounded() {
    let base = tempfile::tempdir().unwrap();
    let file = base.path().join("names.tar.gz");
    let out = flate2::write::GzEncoder::new(
        std::io::BufWriter::new(std::fs::File::create(&file).unwrap()),
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(out);
    let add = |tar: &mut tar::Builder<_>, path: &str, kind: tar::EntryType| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(0o700);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(0);
        tar.append_data(&mut header, path, std::io::empty())
            .unwrap();
    };
    add(&mut tar, "users", tar::EntryType::Directory);
    let mut deep = "users/a".to_string();
    add(&mut tar, &deep, tar::EntryType::Directory);
    for _ in 0..100 {
        deep.push('/');
        deep.push_str(&"d".repeat(200));
        add(&mut tar, &deep, tar::EntryType::Directory);
    }
    // ~20 KB each: 14,000 of them pass 256 MiB of names.
    for i in 0..14_000 {
        add(&mut tar, &format!("{deep}/{i}"), tar::EntryType::Regular);
    }
    tar.into_inner().unwrap().finish().unwrap();
    let target = base.path().join("restored");
    let error = backup::restore(&file, &target, &mut quiet()).unwrap_err();
    assert!(
        error.to_string().contains("names take more than"),
        "{error}"
    );
    assert!(!target.exists());
}

/// F8: the restore dropped setgid from folders too, so a family folder's subfolders (2770)
/// came back 0770 and new files there no longer got the family's group. Setgid stays on
/// folders; it still goes on files, as setuid and sticky do everywhere.
#[tokio::test]
async fn restore_keeps_setgid_on_family_subfolders() {
    let base = tempfile::tempdir().unwrap();
    let home = prepared_home(base.path()).await;
    let photos = home.join("families/smiths/photos");
    std::fs::create_dir(&photos).unwrap();
    std::fs::set_permissions(&photos, std::fs::Permissions::from_mode(0o2770)).unwrap();
    std::fs::write(photos.join("run"), "x").unwrap();
    std::fs::set_permissions(photos.join("run"), std::fs::Permissions::from_mode(0o2755)).unwrap();
    let archive = base.path().join("b.tar.gz");
    backup::backup(&home, &archive, &BackupOptions::default(), &mut quiet()).unwrap();
    let restored = base.path().join("restored");
    backup::restore(&archive, &restored, &mut quiet()).unwrap();
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&restored.join("families/smiths/photos")), 0o2770);
    assert_eq!(mode(&restored.join("families/smiths/photos/run")), 0o755);
}
