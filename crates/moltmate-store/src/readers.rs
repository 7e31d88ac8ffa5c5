//! Short reads on the caller's own thread: a few read-only connections to the database file.
//!
//! **Why.** Every call to the database thread is two thread hand-overs (the caller's task
//! parks, the database thread wakes; then the other way round). On the 2-core VMs this runs on
//! a hand-over between CPUs costs ~45 µs of CPU (an IPI and a halt exit), twenty times a
//! same-CPU switch, and a message used to make thirteen such calls: the hand-overs, not
//! SQLite, were most of a message's CPU. The point reads of the hot path (a token's user, an
//! identity's user, the pending inbox, a session, a budget's totals, the newest transcript
//! rows) take microseconds, so they run where the caller is.
//!
//! **Why that is safe.** In WAL mode a reader never waits for the writer and the writer never
//! waits for a reader: a read here cannot be held up by a group commit's fsync, and it sees
//! every commit that returned before it started (each statement reads the newest snapshot), so
//! a caller reads its own writes. The connections are opened read-only, so a read that tried
//! to write would fail rather than bypass the database thread's ordering. Only bounded reads
//! (an index lookup, a page of at most the history budget) go here; reports and scans go to
//! their own connection on the blocking pool (`Store::read_report`).
//!
//! **Bounded.** At most [`MAX_READERS`] connections exist; a caller that finds none free does
//! not wait for one but sends its read to the database thread, as before. A connection is
//! taken out of the pool for the one read and put back after, so two runtime threads never
//! share one.

use crate::db::StoreError;
use rusqlite::{Connection, OpenFlags};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Connections at most: one per runtime worker thread on the small machines this runs on,
/// and a spare.
pub(crate) const MAX_READERS: usize = 3;

/// How long a read waits for SQLite's own short locks (WAL index recovery after a crash of
/// another process); a read on the runtime must not wait long, and in WAL mode a reader never
/// waits for the writer or a checkpoint.
const READ_BUSY_TIMEOUT: Duration = Duration::from_millis(20);

/// Page cache per reader: the hot path's pages are few, and the OS caches the file.
const READER_CACHE_KIB: i64 = 1024;

pub(crate) struct Readers {
    path: Arc<PathBuf>,
    pool: Mutex<Pool>,
}

#[derive(Default)]
struct Pool {
    idle: Vec<Connection>,
    /// Connections open, idle or lent out.
    open: usize,
}

/// A connection lent out for one read; goes back to the pool when dropped.
pub(crate) struct Lent<'a> {
    readers: &'a Readers,
    connection: Option<Connection>,
}

impl std::ops::Deref for Lent<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        // Set in `lend` and only taken in `drop`.
        self.connection
            .as_ref()
            .expect("a lent connection is present until dropped")
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            let mut pool = self.readers.lock();
            if connection.is_autocommit() {
                pool.idle.push(connection);
            } else {
                // A read left a transaction open (a bug): not lent again.
                pool.open = pool.open.saturating_sub(1);
            }
        }
    }
}

impl Readers {
    pub(crate) fn new(path: Arc<PathBuf>) -> Readers {
        Readers {
            path,
            pool: Mutex::new(Pool::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A free connection, opening one when fewer than [`MAX_READERS`] exist; `None` when all
    /// are lent out (or one could not be opened): the caller uses the database thread.
    pub(crate) fn lend(&self) -> Option<Lent<'_>> {
        let mut pool = self.lock();
        if let Some(connection) = pool.idle.pop() {
            return Some(Lent {
                readers: self,
                connection: Some(connection),
            });
        }
        if pool.open >= MAX_READERS {
            return None;
        }
        pool.open += 1;
        drop(pool);
        match open(&self.path) {
            Ok(connection) => Some(Lent {
                readers: self,
                connection: Some(connection),
            }),
            Err(e) => {
                self.lock().open -= 1;
                tracing::debug!(error = %e, "could not open a read connection; reading on the database thread");
                None
            }
        }
    }
}

fn open(path: &std::path::Path) -> Result<Connection, StoreError> {
    let connection = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    connection.busy_timeout(READ_BUSY_TIMEOUT)?;
    connection.execute_batch(&format!("PRAGMA cache_size = -{READER_CACHE_KIB}"))?;
    connection.set_prepared_statement_cache_capacity(64);
    Ok(connection)
}
