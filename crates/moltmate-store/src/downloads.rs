//! Files put up for download (`send_file` on the web chat and the API): one row per file in
//! `downloads`, the bytes in `<MOLTMATE_HOME>/downloads/<user>/<id>` (dirs 0700, files 0600),
//! outside the user's home so nothing the user's sandbox does can swap a stored file for a
//! symlink or a FIFO the gateway would then serve.
//!
//! * The id is 256 random bits (`dl_<hex>`); a link opens only together with the same user's
//!   credential ([`Downloads::open`] looks up by id *and* user), until `expires_at`.
//! * Bounded per user: at most `max_files` live links and `max_bytes` stored; expired files are
//!   deleted when a new one is offered and at startup ([`Downloads::prune_expired`]).
//! * `users remove`/`reset` delete the rows in the ending transaction
//!   ([`crate::ending`]) and the directory when the user's files are wiped; the CLI deletes any
//!   row a turn wrote in between once the user's lock is held ([`Store::forget_user_downloads`]).

use crate::db::{now_millis, Store, StoreError};
use async_trait::async_trait;
use moltmate_core::channel::{ChannelError, DownloadArea, OfferedFile, OutboundFile};
use moltmate_core::UserId;
use rusqlite::{params, OptionalExtension};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Appended to the store's migrations (see `db::MIGRATIONS`).
pub(crate) const MIGRATION: &str = r#"
CREATE TABLE downloads (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    file_name     TEXT NOT NULL,
    size          INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    ready         INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX downloads_user ON downloads(user_id, expires_at);
CREATE INDEX downloads_expiry ON downloads(expires_at);
"#;

/// A reservation whose file was never written (the process died) is pruned after this.
const STALE_RESERVATION_MS: i64 = 10 * 60 * 1000;

/// Longest id accepted from a request (`dl_` and 64 hex digits).
pub const MAX_ID_LEN: usize = 67;

/// How long links live and how much each user may keep (`gateway.downloads`).
#[derive(Debug, Clone)]
pub struct DownloadSettings {
    pub ttl: Duration,
    pub max_files_per_user: usize,
    pub max_bytes_per_user: u64,
    /// What all users' waiting files may take together (`maxMbTotal`).
    pub max_bytes_total: u64,
    /// The public URL links are made absolute with (`gateway.publicUrl`).
    pub base_url: String,
}

impl Default for DownloadSettings {
    fn default() -> Self {
        DownloadSettings {
            ttl: Duration::from_secs(7 * 24 * 3600),
            max_files_per_user: 50,
            max_bytes_per_user: 200 << 20,
            max_bytes_total: 2048 << 20,
            base_url: "http://127.0.0.1:18790".to_string(),
        }
    }
}

/// One stored download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadRecord {
    pub id: String,
    pub user: UserId,
    pub file_name: String,
    pub size: u64,
    pub expires_at: i64,
}

/// The download area: database rows and the files beside them.
#[derive(Clone)]
pub struct Downloads {
    store: Store,
    dir: PathBuf,
    settings: DownloadSettings,
}

/// `<MOLTMATE_HOME>/downloads`.
pub fn downloads_dir(moltmate_home: &Path) -> PathBuf {
    moltmate_home.join("downloads")
}

/// Whether `id` has the shape of an id this module makes (anything else is not looked up).
pub fn is_download_id(id: &str) -> bool {
    id.len() == MAX_ID_LEN
        && id.starts_with("dl_")
        && id[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

fn full(detail: String) -> ChannelError {
    ChannelError::Rejected {
        service: "downloads",
        status: 507,
        detail,
    }
}

fn failed(detail: String) -> ChannelError {
    ChannelError::Server {
        service: "downloads",
        status: 500,
        detail,
    }
}

fn private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

fn remove_if_present(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(error = %e, "could not delete an expired download");
        }
    }
}

/// Deletes a user's whole download directory (`users remove`/`reset`). Missing is fine.
pub fn wipe_user_downloads(moltmate_home: &Path, user: &UserId) -> std::io::Result<()> {
    let dir = downloads_dir(moltmate_home).join(user.as_str());
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

impl Downloads {
    /// The area at `<moltmate_home>/downloads`.
    pub fn new(store: Store, moltmate_home: &Path, settings: DownloadSettings) -> Self {
        Downloads {
            store,
            dir: downloads_dir(moltmate_home),
            settings,
        }
    }

    fn path_of(&self, user: &UserId, id: &str) -> PathBuf {
        self.dir.join(user.as_str()).join(id)
    }

    /// The live download `id` of `user` and its file opened for reading (no symlink
    /// followed, never blocking on a FIFO, regular files only). `None` for an unknown,
    /// expired or foreign id, or a file that is gone: all look the same to the caller.
    pub async fn open(
        &self,
        user: &UserId,
        id: &str,
    ) -> Result<Option<(DownloadRecord, std::fs::File)>, StoreError> {
        if !is_download_id(id) {
            return Ok(None);
        }
        let (owner, wanted) = (user.clone(), id.to_string());
        let now = now_millis();
        let record = self
            .store
            .with(move |c| {
                c.query_row(
                    "SELECT file_name, size, expires_at FROM downloads
                     WHERE id = ?1 AND user_id = ?2 AND expires_at > ?3 AND ready = 1",
                    params![wanted, owner.as_str(), now],
                    |r| {
                        Ok(DownloadRecord {
                            id: wanted.clone(),
                            user: owner.clone(),
                            file_name: r.get(0)?,
                            size: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                            expires_at: r.get(2)?,
                        })
                    },
                )
                .optional()
                .map_err(StoreError::from)
            })
            .await?;
        let Some(record) = record else {
            return Ok(None);
        };
        let path = self.path_of(user, id);
        let opened = moltmate_core::blocking::run(
            "opening a download",
            Duration::from_secs(10),
            move || -> std::io::Result<Option<std::fs::File>> {
                let file = match std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc_flags())
                    .open(&path)
                {
                    Ok(file) => file,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e),
                };
                let meta = file.metadata()?;
                Ok(meta.file_type().is_file().then_some(file))
            },
        )
        .await
        .map_err(|e| StoreError::Worker(e.to_string()))?
        .map_err(StoreError::Io)?;
        Ok(opened.map(|file| (record, file)))
    }

    /// Deletes every expired download (rows and files). Returns how many.
    pub async fn prune_expired(&self) -> Result<usize, StoreError> {
        let now = now_millis();
        let expired: Vec<(String, String)> = self
            .store
            .with(move |c| {
                let tx = c.transaction()?;
                let rows = tx
                    .prepare(
                        "SELECT id, user_id FROM downloads
                     WHERE expires_at <= ?1 OR (ready = 0 AND created_at <= ?2) LIMIT 10000",
                    )?
                    .query_map(params![now, now - STALE_RESERVATION_MS], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?
                    .collect::<Result<Vec<(String, String)>, _>>()?;
                for (id, _) in &rows {
                    tx.execute("DELETE FROM downloads WHERE id = ?1", params![id])?;
                }
                tx.commit()?;
                Ok(rows)
            })
            .await?;
        let count = expired.len();
        if count > 0 {
            let dir = self.dir.clone();
            moltmate_core::blocking::run(
                "deleting expired downloads",
                Duration::from_secs(60),
                move || {
                    for (id, user) in expired {
                        // Both come from rows this module wrote; checked again before joining.
                        if is_download_id(&id) && UserId::new(user.clone()).is_ok() {
                            remove_if_present(&dir.join(&user).join(&id));
                        }
                    }
                },
            )
            .await
            .map_err(|e| StoreError::Worker(e.to_string()))?;
        }
        Ok(count)
    }

    async fn store_file(
        &self,
        user: &UserId,
        file: &OutboundFile,
    ) -> Result<OfferedFile, ChannelError> {
        let size = file.content.len() as u64;
        let (max_files, max_bytes, max_total) = (
            self.settings.max_files_per_user,
            self.settings.max_bytes_per_user,
            self.settings.max_bytes_total,
        );
        if size > max_bytes {
            return Err(full(format!(
                "it is {size} bytes and at most {max_bytes} can be kept for download"
            )));
        }
        let id = crate::auth::new_secret("dl_");
        let now = now_millis();
        let expires_at =
            now.saturating_add(i64::try_from(self.settings.ttl.as_millis()).unwrap_or(i64::MAX));
        // Room first (counted in the same transaction that reserves the row), then the bytes,
        // then the row is made live; a failure in between leaves nothing behind.
        let (owner, name, reserved) = (user.clone(), file.file_name.clone(), id.clone());
        let room = self
            .store
            .with(move |c| {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let (count, bytes): (i64, i64) = tx.query_row(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM downloads
                     WHERE user_id = ?1 AND expires_at > ?2",
                    params![owner.as_str(), now],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                let count = usize::try_from(count).unwrap_or(usize::MAX);
                let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
                if count >= max_files {
                    return Ok(Err(format!(
                        "{count} files already wait for download (at most {max_files}); they expire on their own"
                    )));
                }
                if bytes.saturating_add(size) > max_bytes {
                    return Ok(Err(format!(
                        "files waiting for download already take {bytes} bytes (at most {max_bytes})"
                    )));
                }
                // Everyone's together: the files sit next to the database.
                let total: i64 = tx.query_row(
                    "SELECT COALESCE(SUM(size), 0) FROM downloads WHERE expires_at > ?1",
                    params![now],
                    |r| r.get(0),
                )?;
                let total = u64::try_from(total).unwrap_or(u64::MAX);
                if total.saturating_add(size) > max_total {
                    return Ok(Err(
                        "the server's download area is full; files there expire on their own"
                            .to_string(),
                    ));
                }
                // Reserved (`ready = 0`): invisible to `open` until the file is written, and
                // pruned if the process dies before that.
                tx.execute(
                    "INSERT INTO downloads (id, user_id, file_name, size, created_at, expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![reserved, owner.as_str(), name, size as i64, now, expires_at],
                )?;
                tx.commit()?;
                Ok(Ok(()))
            })
            .await
            .map_err(|e| failed(e.to_string()))?;
        room.map_err(full)?;
        let user_dir = self.dir.join(user.as_str());
        let (base, path, content) = (self.dir.clone(), user_dir.join(&id), file.content.clone());
        let written = moltmate_core::blocking::run(
            "storing a download",
            Duration::from_secs(60),
            move || -> std::io::Result<()> {
                private_dir(&base)?;
                private_dir(&user_dir)?;
                let mut out = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc_flags())
                    .open(&path)?;
                out.write_all(&content)?;
                out.sync_all()
            },
        )
        .await;
        let live_id = id.clone();
        let activated = match written {
            Ok(Ok(())) => self
                .store
                .with(move |c| {
                    Ok(c.execute(
                        "UPDATE downloads SET ready = 1 WHERE id = ?1",
                        params![live_id],
                    )?)
                })
                .await
                .map_err(|e| e.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match activated {
            // The row is gone: the user was removed or reset meanwhile.
            Ok(0) => {
                let path = self.path_of(user, &id);
                let _ = moltmate_core::blocking::run(
                    "discarding a download",
                    Duration::from_secs(10),
                    move || remove_if_present(&path),
                )
                .await;
                Err(full("the user's files were just removed".to_string()))
            }
            Ok(_) => {
                let path = format!("/files/{id}");
                Ok(OfferedFile {
                    file_name: file.file_name.clone(),
                    url: format!("{}{path}", self.settings.base_url.trim_end_matches('/')),
                    path,
                    size,
                    expires_at,
                })
            }
            Err(detail) => {
                let (path, gone) = (self.path_of(user, &id), id.clone());
                let _ = moltmate_core::blocking::run(
                    "discarding a download",
                    Duration::from_secs(10),
                    move || remove_if_present(&path),
                )
                .await;
                let _ = self
                    .store
                    .with(move |c| {
                        Ok(c.execute("DELETE FROM downloads WHERE id = ?1", params![gone])?)
                    })
                    .await;
                Err(failed(format!("storing the file failed: {detail}")))
            }
        }
    }
}

/// `O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC`.
fn libc_flags() -> i32 {
    (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::CLOEXEC)
        .bits() as i32
}

#[async_trait]
impl DownloadArea for Downloads {
    async fn offer(&self, user: &UserId, file: &OutboundFile) -> Result<OfferedFile, ChannelError> {
        if let Err(e) = self.prune_expired().await {
            tracing::warn!(error = %e, "could not prune expired downloads");
        }
        self.store_file(user, file).await
    }
}

impl Store {
    /// Deletes every download row of `user` (after their files were wiped: a turn may have
    /// offered one between the ending transaction and the wipe).
    pub async fn forget_user_downloads(&self, user: &UserId) -> Result<usize, StoreError> {
        let user = user.clone();
        self.with(move |c| {
            Ok(c.execute(
                "DELETE FROM downloads WHERE user_id = ?1",
                params![user.as_str()],
            )?)
        })
        .await
    }

    /// How many download rows `user` has (live, reserved or expired).
    pub async fn download_count(&self, user: &UserId) -> Result<usize, StoreError> {
        let user = user.clone();
        self.with(move |c| {
            let n: i64 = c.query_row(
                "SELECT COUNT(*) FROM downloads WHERE user_id = ?1",
                params![user.as_str()],
                |r| r.get(0),
            )?;
            Ok(usize::try_from(n).unwrap_or(0))
        })
        .await
    }
}
