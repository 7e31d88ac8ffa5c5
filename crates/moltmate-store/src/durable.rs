//! The database thread: one thread owns the connection and runs every statement, and the
//! commits that make a promise to the outside world are committed in groups.
//!
//! **One thread, not a mutex and the blocking pool.** SQLite has one writer and this process
//! one connection, so statements run one at a time whatever the callers do. Before, each call
//! took a thread of tokio's blocking pool that then waited for the connection's mutex: under
//! load (hundreds of users at once) hundreds of threads queued on it, each hand-over a context
//! switch, and the profile of a busy gateway was a third scheduler. Now a caller sends its
//! work to the database thread over a channel and awaits the answer; a busy thread works
//! through its queue without sleeping, and no other thread waits for the connection.
//!
//! **Group commit.** Accepting a message (the channel is told "received" right after) and
//! claiming a reply for sending (the guard against sending it twice) must be on disk before the
//! caller goes on, so their commits are fsynced (`synchronous = FULL`). An fsync costs the same
//! for one row as for a hundred, so the thread does not commit them one caller at a time: it
//! takes everything queued, runs the ordinary work in order, and runs every piece of durable
//! work in its own savepoint inside one `BEGIN IMMEDIATE` transaction, commits that with one
//! fsync, and only then answers those callers. Alone (one message at a time) a group is one
//! piece of work, exactly the old cost; under load the fsyncs per message fall with the group.
//!
//! What each caller is promised is unchanged: a durable result arrives only after the commit
//! holding its work returned from the fsync. A piece of work that fails is rolled back to its
//! savepoint and only its caller gets the error; the rest of the group commits. When the commit
//! itself fails, nothing of the group is stored and every caller in it gets the error (and
//! retries, as it would have before). Each caller has at most one call in flight (it awaits
//! the answer), so running one caller's ordinary work before another caller's durable work
//! reorders nothing any caller can observe.
//!
//! **Grouped work.** A turn's commit (without a reply to push) needs no fsync, but under load
//! many users' turns are queued at once; each in a commit of its own wrote the pages they all
//! touch (counters, indexes) again and again. Such writes join the round's group instead: in
//! a savepoint each, answered after the group's commit — fsynced when the group holds durable
//! work, `synchronous = NORMAL` otherwise. Alone, a turn is one ordinary commit, as before.
//!
//! **Later work.** Some writes only record what happened for the operator — a reply's
//! `sent` after its channel took it — and no caller waits for them or decides anything on
//! them. They are queued beside the channel, without waking the thread, and committed inside
//! the next group (a savepoint each, like durable work), or on their own once the oldest has
//! waited [`LATER_WAIT`] (the idle thread looks at least that often) or [`MAX_LATER`] are
//! queued (which wakes it), and when the thread ends. A message then costs one commit
//! fewer; a crash can lose such a record (the row keeps its earlier state, which promises
//! no less), never anything a caller was answered for.

use crate::db::StoreError;
use rusqlite::Connection;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Calls taken from the queue in one round at most (ordinary and durable together); bounds how
/// long durable work waits behind ordinary work, and the size of a group.
const MAX_ROUND: usize = 256;

/// Ordinary work: runs and answers its caller itself.
type Plain = Box<dyn FnOnce(&mut Connection) + Send>;

/// Work no caller waits for (see "Later work" above).
type Later = Box<dyn FnOnce(&Connection) -> Result<(), StoreError> + Send>;

/// How long later work waits for a group before it is committed on its own.
pub(crate) const LATER_WAIT: Duration = Duration::from_secs(1);

/// Later work queued at most before it is committed on its own: bounds its memory.
const MAX_LATER: usize = 256;

/// One caller's durable work in a group.
trait Durable: Send {
    /// Runs the work inside the group's transaction. False when it failed (its changes are then
    /// rolled back to its savepoint).
    fn run(&mut self, c: &Connection) -> bool;
    /// Answers the caller: its work's own result, or `failed` when the group did not commit.
    fn finish(self: Box<Self>, failed: Option<&StoreError>);
}

enum Call {
    Plain(Plain),
    Durable(Box<dyn Durable>),
    /// Like `Durable`, but needs no fsync of its own (see [`DbThread::run_grouped`]).
    Grouped(Box<dyn Durable>),
    /// Takes the later work queued so far along (sent when [`MAX_LATER`] are queued).
    Wake,
}

struct DurableWork<R, F> {
    work: Option<F>,
    result: Option<Result<R, StoreError>>,
    reply: oneshot::Sender<Result<R, StoreError>>,
}

impl<R, F> Durable for DurableWork<R, F>
where
    R: Send,
    F: FnOnce(&Connection) -> Result<R, StoreError> + Send,
{
    fn run(&mut self, c: &Connection) -> bool {
        let Some(work) = self.work.take() else {
            return false;
        };
        // A panicking job (a bug) fails alone, like a job that returned an error.
        let result = catch_unwind(AssertUnwindSafe(|| work(c)))
            .unwrap_or_else(|_| Err(StoreError::Worker("the database work panicked".to_string())));
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn finish(self: Box<Self>, failed: Option<&StoreError>) {
        let result = match (self.result, failed) {
            // The work's own failure is the more precise answer.
            (Some(Err(e)), _) => Err(e),
            (_, Some(e)) => Err(replicate(e)),
            (Some(Ok(value)), None) => Ok(value),
            (None, None) => Err(StoreError::Worker(
                "the work was not run in its group".to_string(),
            )),
        };
        // A caller that went away (its future dropped) needs no answer.
        let _ = self.reply.send(result);
    }
}

/// The same error again, for every caller of a group that did not commit. SQLite failures keep
/// their code, so `is_retryable` answers for each caller as it would have for one.
fn replicate(e: &StoreError) -> StoreError {
    match e {
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(code, message)) => {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(*code, message.clone()))
        }
        other => StoreError::Worker(other.to_string()),
    }
}

fn stopped() -> StoreError {
    StoreError::Worker("the database thread stopped".to_string())
}

/// The sending side of the database thread. Cloned into every `Store`; the thread ends when
/// the last clone is dropped (after the calls already queued).
#[derive(Clone)]
pub(crate) struct DbThread {
    calls: mpsc::Sender<Call>,
    later: Arc<LaterQueue>,
}

/// Later work waiting for the database thread. Queued here without waking the thread: a
/// message's `sent` used to wake it only for it to set a timer and sleep again (a context
/// switch per message, and a hand-over across CPUs on a 2-core VM), when the next group
/// takes it along anyway. The thread looks here at every round and, when idle, at least
/// every [`LATER_WAIT`].
#[derive(Default)]
struct LaterQueue {
    state: Mutex<LaterState>,
}

#[derive(Default)]
struct LaterState {
    work: Vec<Later>,
    /// When the oldest of `work` was queued.
    since: Option<Instant>,
    /// The thread has ended: what is queued now would never be committed.
    closed: bool,
}

impl LaterQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, LaterState> {
        // A panic while holding this lock leaves a consistent state (a push or a take).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything queued: always when a group commits anyway (`with_group`), otherwise only
    /// when it is due — [`MAX_LATER`] queued, or the oldest queued [`LATER_WAIT`] ago.
    fn take(&self, with_group: bool) -> Vec<Later> {
        let mut state = self.lock();
        let due = state.work.len() >= MAX_LATER
            || state
                .since
                .is_some_and(|since| since.elapsed() >= LATER_WAIT);
        if !(due || with_group) {
            return Vec::new();
        }
        state.since = None;
        std::mem::take(&mut state.work)
    }

    /// How long the idle thread may sleep: until the oldest queued work is due, or
    /// [`LATER_WAIT`] when none is queued (work can be queued without waking the thread).
    fn wait(&self) -> Duration {
        match self.lock().since {
            Some(since) => LATER_WAIT.saturating_sub(since.elapsed()),
            None => LATER_WAIT,
        }
    }

    /// The thread's end: everything still queued, and nothing more accepted.
    fn close(&self) -> Vec<Later> {
        let mut state = self.lock();
        state.closed = true;
        state.since = None;
        std::mem::take(&mut state.work)
    }
}

impl DbThread {
    /// Starts the thread that owns `connection`.
    pub(crate) fn start(connection: Connection) -> Result<DbThread, StoreError> {
        let (calls, queue) = mpsc::channel();
        let later = Arc::new(LaterQueue::default());
        let queued = Arc::clone(&later);
        std::thread::Builder::new()
            .name("moltmate-db".into())
            .spawn(move || serve(connection, queue, &queued))?;
        Ok(DbThread { calls, later })
    }

    /// Runs `work` on the connection.
    pub(crate) async fn run<R, F>(&self, work: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let call: Plain = Box::new(move |c: &mut Connection| {
            let _ = reply.send(work(c));
        });
        self.calls.send(Call::Plain(call)).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Queues `work` to be committed with the next group, or on its own within
    /// [`LATER_WAIT`]. Nobody is answered: a failure is logged. `work` runs inside a
    /// transaction, so it must not begin its own.
    pub(crate) fn run_later<F>(&self, work: F) -> Result<(), StoreError>
    where
        F: FnOnce(&Connection) -> Result<(), StoreError> + Send + 'static,
    {
        let full = {
            let mut state = self.later.lock();
            if state.closed {
                return Err(stopped());
            }
            state.since.get_or_insert_with(Instant::now);
            state.work.push(Box::new(work));
            state.work.len() >= MAX_LATER
        };
        // Bounded memory: the thread commits them now, on their own if need be. A thread
        // that is gone (it only ends with the last sender, or by a bug) takes nothing more.
        if full && self.calls.send(Call::Wake).is_err() {
            drop(self.later.close());
            return Err(stopped());
        }
        Ok(())
    }

    /// Runs `work` in the next group commit and answers once that group is on disk. `work`
    /// runs inside a transaction (a savepoint of the group's), so it must not begin its own.
    pub(crate) async fn run_durably<R, F>(&self, work: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        self.run_in_group(work, Call::Durable).await
    }

    /// Runs write `work` in the round's group commit and answers once that commit returned:
    /// fsynced when the group holds durable work, otherwise at `synchronous = NORMAL` like an
    /// ordinary call. Under load many users' turns then share one commit (and the pages they
    /// all touch are written once); alone it is one ordinary commit. `work` runs inside a
    /// transaction (a savepoint of the group's), so it must not begin its own.
    pub(crate) async fn run_grouped<R, F>(&self, work: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        self.run_in_group(work, Call::Grouped).await
    }

    async fn run_in_group<R, F>(
        &self,
        work: F,
        call: fn(Box<dyn Durable>) -> Call,
    ) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let work = Box::new(DurableWork {
            work: Some(work),
            result: None,
            reply,
        });
        self.calls.send(call(work)).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// The thread's loop: a round takes what is queued (at least one call, waiting for it), runs
/// ordinary calls in order and commits the durable ones as one group, with the later work
/// queued so far.
fn serve(mut connection: Connection, queue: mpsc::Receiver<Call>, later: &LaterQueue) {
    // After every commit of this thread's connection (the only writer): see the function.
    connection.wal_hook(Some(checkpoint_a_long_wal));
    let mut level = Synchronous::default();
    let mut group: Vec<Box<dyn Durable>> = Vec::new();
    let mut grouped: Vec<Box<dyn Durable>> = Vec::new();
    loop {
        let first = match queue.recv_timeout(later.wait()) {
            Ok(call) => Some(call),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut next = first;
        let mut taken = 0;
        while let Some(call) = next.take() {
            taken += 1;
            match call {
                Call::Plain(work) => {
                    // Ordinary commits are not fsynced (module docs).
                    level.normal(&connection);
                    // A panicking call loses its own answer (the caller sees a stopped
                    // worker), not the thread.
                    let panicked =
                        catch_unwind(AssertUnwindSafe(|| work(&mut connection))).is_err();
                    // Every call ends its own transaction; one left open (a bug) would make
                    // the next group fail, so it is rolled back here.
                    if !connection.is_autocommit() {
                        if !panicked {
                            tracing::error!(
                                "a database call left its transaction open; rolled back"
                            );
                        }
                        rollback_open_transaction(&connection);
                    }
                }
                Call::Durable(work) => group.push(work),
                Call::Grouped(work) => grouped.push(work),
                Call::Wake => {}
            }
            if taken < MAX_ROUND {
                next = queue.try_recv().ok();
            }
        }
        let committing = !group.is_empty() || !grouped.is_empty();
        // With a group, everything queued rides it; without, only what is due.
        let records = later.take(committing);
        if committing || !records.is_empty() {
            let jobs = std::mem::take(&mut group);
            let writes = std::mem::take(&mut grouped);
            if catch_unwind(AssertUnwindSafe(|| {
                commit_group(&connection, &mut level, jobs, writes, records)
            }))
            .is_err()
            {
                rollback_open_transaction(&connection);
                level = Synchronous::default();
            }
        }
    }
    // The last callers are gone; what is queued for later is still committed.
    let records = later.close();
    if !records.is_empty()
        && catch_unwind(AssertUnwindSafe(|| {
            commit_group(&connection, &mut level, Vec::new(), Vec::new(), records)
        }))
        .is_err()
    {
        rollback_open_transaction(&connection);
    }
}

fn rollback_open_transaction(c: &Connection) {
    if !c.is_autocommit() {
        let _ = c.execute_batch("ROLLBACK");
    }
}

/// Frames in the WAL past which the writer checkpoints it itself (~32 MiB of 4 KiB pages).
pub(crate) const WAL_CHECKPOINT_FRAMES: i32 = 8192;

thread_local! {
    /// The WAL length at which this database thread next tries its own checkpoint.
    static NEXT_WAL_CHECKPOINT: std::cell::Cell<i32> = const { std::cell::Cell::new(WAL_CHECKPOINT_FRAMES) };
}

/// Keeps the WAL bounded under sustained load. The background checkpointer (`db.rs`) copies
/// committed pages into the database file, but SQLite starts the WAL from its beginning again
/// only when a write begins after a checkpoint that copied everything, and under a steady
/// stream of commits one always lands while a checkpoint runs: the WAL then grew for as long
/// as the load lasted (~70 MB within the benchmark's first seconds, and without bound under a
/// flood, every read probing more of its index). Past [`WAL_CHECKPOINT_FRAMES`] the writer itself checkpoints between two
/// commits, where no commit can land, copying what the background has not yet; the next
/// write then restarts the WAL (`journal_size_limit` trims the file). Readers that still hold
/// an older snapshot can keep that checkpoint from finishing, so it is tried again only after
/// another quarter of the bound, not after every commit.
///
/// Runs on the database thread inside SQLite's commit, after the commit is durable. It must
/// answer `Ok`: an error here would make SQLite report a commit that happened as failed.
fn checkpoint_a_long_wal(
    wal: &rusqlite::hooks::Wal,
    frames: std::ffi::c_int,
) -> rusqlite::Result<()> {
    NEXT_WAL_CHECKPOINT.with(|next| {
        if frames < WAL_CHECKPOINT_FRAMES {
            // Restarted since: the next long WAL is checkpointed at the bound again.
            next.set(WAL_CHECKPOINT_FRAMES);
            return;
        }
        if frames < next.get() {
            return;
        }
        next.set(frames.saturating_add(WAL_CHECKPOINT_FRAMES / 4));
        if let Err(e) = wal.checkpoint_v2(rusqlite::hooks::CheckpointMode::PASSIVE) {
            tracing::debug!(error = %e, frames, "the writer's checkpoint of a long WAL did not run");
        }
    });
    Ok(())
}

/// The connection's `synchronous` level as this thread last set it, so that it is changed only
/// when the next commit needs the other one: a run of durable groups (a Telegram user's accept
/// and turn, each a durable group) then costs no PRAGMA at all, where setting FULL before and
/// NORMAL after every group cost two statement compilations per group.
///
/// Invariant: `full` is true only when the connection is known to be at FULL. Any doubt (a
/// PRAGMA that failed either way, a panic mid-group) leaves it false, which at worst costs one
/// redundant `PRAGMA synchronous = FULL` before the next durable group, and never skips one.
#[derive(Default)]
struct Synchronous {
    full: bool,
}

impl Synchronous {
    /// Puts the connection at FULL before a durable commit, outside any transaction
    /// (SQLite ignores the change inside one). Not from the statement cache: SQLite applies
    /// `synchronous` when the PRAGMA is compiled, not when it runs, so a cached copy would only
    /// keep working because SQLite re-compiles every PRAGMA on each run (see the test
    /// `every_group_commits_with_synchronous_full`).
    fn full(&mut self, c: &Connection) -> Result<(), StoreError> {
        if !self.full {
            // Believed NORMAL until the PRAGMA returned.
            c.execute_batch("PRAGMA synchronous = FULL")?;
            self.full = true;
        }
        Ok(())
    }

    /// Back to NORMAL for an ordinary commit (see [`Synchronous::full`]).
    fn normal(&mut self, c: &Connection) {
        if !self.full {
            return;
        }
        // Believed NORMAL whatever the PRAGMA answers: SQLite applies the level when it
        // compiles the PRAGMA, so one that failed while running may have applied it all the
        // same, and believing FULL then could skip the next durable group's FULL. If it did
        // not apply, ordinary commits stay fsynced (slower, never less safe) and the next
        // durable group sets FULL again.
        self.full = false;
        if let Err(e) = c.execute_batch("PRAGMA synchronous = NORMAL") {
            tracing::warn!(error = %e, "could not return the database to synchronous = NORMAL");
        }
    }
}

/// One group: every job (durable, then grouped) in its own savepoint, then the later work (a
/// savepoint each), one commit — fsynced when it holds durable work — then every caller
/// answered.
fn commit_group(
    c: &Connection,
    level: &mut Synchronous,
    durable_jobs: Vec<Box<dyn Durable>>,
    grouped: Vec<Box<dyn Durable>>,
    later: Vec<Later>,
) {
    let durable = !durable_jobs.is_empty();
    let mut jobs = durable_jobs;
    jobs.extend(grouped);
    let committed = (|| -> Result<(), StoreError> {
        // Cannot change inside a transaction: set for this commit, left for the next.
        if durable {
            level.full(c)?;
        } else {
            level.normal(c);
        }
        run_cached(c, "BEGIN IMMEDIATE")?;
        for job in &mut jobs {
            run_cached(c, "SAVEPOINT job")?;
            if !job.run(c) {
                run_cached(c, "ROLLBACK TO job")?;
            }
            run_cached(c, "RELEASE job")?;
        }
        for work in later {
            run_cached(c, "SAVEPOINT job")?;
            let result = catch_unwind(AssertUnwindSafe(|| work(c))).unwrap_or_else(|_| {
                Err(StoreError::Worker("the database work panicked".to_string()))
            });
            if let Err(e) = result {
                tracing::warn!(error = %e, "a deferred record could not be written");
                run_cached(c, "ROLLBACK TO job")?;
            }
            run_cached(c, "RELEASE job")?;
        }
        run_cached(c, "COMMIT")?;
        Ok(())
    })();
    if committed.is_err() {
        rollback_open_transaction(c);
    }
    let failed = committed.err();
    for job in jobs {
        job.finish(failed.as_ref());
    }
}

/// Runs one of the group commit's fixed transaction statements from the connection's statement
/// cache: they run several times per group, and parsing them each time was a visible share of
/// the database thread's work.
fn run_cached(c: &Connection, sql: &str) -> Result<(), StoreError> {
    c.prepare_cached(sql)?.execute([])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::params;

    fn thread_with_table(dir: &std::path::Path) -> DbThread {
        let c = Connection::open(dir.join("t.db")).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
             CREATE TABLE t (x INTEGER NOT NULL UNIQUE);",
        )
        .unwrap();
        DbThread::start(c).unwrap()
    }

    async fn count(db: &DbThread) -> i64 {
        db.run(|c| Ok(c.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))?))
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_job_in_a_group_is_rolled_back_alone_and_the_rest_commits() {
        let dir = tempfile::tempdir().unwrap();
        let db = thread_with_table(dir.path());
        db.run(|c| Ok(c.execute("INSERT INTO t (x) VALUES (7)", [])?))
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for i in 0..200i64 {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                db.run_durably(move |c| {
                    // Job 7 writes a row of its own first, then fails on the duplicate: its
                    // first row must go with it.
                    if i == 7 {
                        c.execute("INSERT INTO t (x) VALUES (-7)", [])?;
                    }
                    c.execute("INSERT INTO t (x) VALUES (?1)", params![i])?;
                    Ok(i)
                })
                .await
            }));
        }
        let mut failed = Vec::new();
        for task in tasks {
            if let Err(e) = task.await.unwrap() {
                failed.push(e.to_string());
            }
        }
        assert_eq!(failed.len(), 1, "{failed:?}");
        // 200 rows: 199 from the jobs and the 7 stored before; not -7.
        assert_eq!(count(&db).await, 200);
        let minus_seven: i64 = db
            .run(|c| Ok(c.query_row("SELECT COUNT(*) FROM t WHERE x = -7", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(minus_seven, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_group_commits_with_synchronous_full() {
        let dir = tempfile::tempdir().unwrap();
        let db = thread_with_table(dir.path());
        // 2 = FULL: the commit fsyncs the WAL. Every group, not only the first (a PRAGMA run
        // from a statement cache would silently stop applying if SQLite ever stopped
        // re-compiling it), and ordinary calls in between stay at 1 = NORMAL.
        for group in 0..3 {
            let level: i64 = db
                .run_durably(|c| Ok(c.query_row("PRAGMA synchronous", [], |r| r.get(0))?))
                .await
                .unwrap();
            assert_eq!(level, 2, "group {group}");
            let level: i64 = db
                .run(|c| Ok(c.query_row("PRAGMA synchronous", [], |r| r.get(0))?))
                .await
                .unwrap();
            assert_eq!(level, 1, "between groups {group}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn durable_groups_in_a_row_stay_full_and_a_group_without_durable_work_is_normal() {
        let dir = tempfile::tempdir().unwrap();
        let db = thread_with_table(dir.path());
        let level = |durable: bool| {
            let db = db.clone();
            async move {
                let read =
                    |c: &Connection| Ok(c.query_row("PRAGMA synchronous", [], |r| r.get(0))?);
                let level: i64 = if durable {
                    db.run_durably(read).await.unwrap()
                } else {
                    db.run_grouped(read).await.unwrap()
                };
                level
            }
        };
        // Whatever order durable and other groups come in, each commits at its own level
        // (that no PRAGMA runs between durable groups is the benchmark's to show).
        for (round, durable, expected) in [
            (0, true, 2),
            (1, true, 2),
            (2, false, 1),
            (3, false, 1),
            (4, true, 2),
            (5, false, 1),
        ] {
            assert_eq!(level(durable).await, expected, "round {round}");
        }
    }

    /// The WAL grew for as long as commits kept coming (a checkpoint that lets the WAL restart
    /// never finished between two of them): here no checkpointer runs at all, the worst case,
    /// and the writer's own checkpoint still restarts it at the bound.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_restarts_past_its_bound_under_a_steady_stream_of_commits() {
        let dir = tempfile::tempdir().unwrap();
        let c = Connection::open(dir.path().join("t.db")).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 0;
             CREATE TABLE t (x INTEGER NOT NULL UNIQUE);",
        )
        .unwrap();
        let db = DbThread::start(c).unwrap();
        // Two frames a commit (the table and its index): half again past the bound.
        let commits = WAL_CHECKPOINT_FRAMES as i64 * 3 / 4;
        db.run(move |c| {
            for i in 0..commits {
                c.execute("INSERT INTO t (x) VALUES (?1)", params![i])?;
            }
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(count(&db).await, commits);
        let wal = std::fs::metadata(dir.path().join("t.db-wal"))
            .unwrap()
            .len();
        let bound = (WAL_CHECKPOINT_FRAMES as u64 + 16) * (4096 + 24) + 32;
        assert!(wal <= bound, "WAL of {wal} bytes, bound {bound}");
        // Restarted: the header's checkpoint sequence (bytes 12..16) counts restarts.
        let header = std::fs::read(dir.path().join("t.db-wal")).unwrap();
        let restarts = u32::from_be_bytes(header[12..16].try_into().unwrap());
        assert!(restarts > 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_whose_commit_fails_answers_every_caller_with_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let db = thread_with_table(dir.path());
        // Another connection holds the write lock: BEGIN IMMEDIATE of the group fails (after
        // the busy timeout, zero here) and nothing of the group may be stored or reported done.
        db.run(|c| Ok(c.busy_timeout(std::time::Duration::ZERO)?))
            .await
            .unwrap();
        let other = Connection::open(dir.path().join("t.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let mut tasks = Vec::new();
        for i in 0..20i64 {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                db.run_durably(move |c| Ok(c.execute("INSERT INTO t (x) VALUES (?1)", params![i])?))
                    .await
            }));
        }
        for task in tasks {
            let error = task.await.unwrap().unwrap_err();
            assert!(error.is_retryable(), "{error}");
        }
        other.execute_batch("ROLLBACK").unwrap();
        assert_eq!(count(&db).await, 0);
        // The thread goes on, back in autocommit: the next group commits.
        db.run_durably(|c| Ok(c.execute("INSERT INTO t (x) VALUES (1)", [])?))
            .await
            .unwrap();
        assert_eq!(count(&db).await, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_that_leaves_its_transaction_open_does_not_break_the_next_group() {
        let dir = tempfile::tempdir().unwrap();
        let db = thread_with_table(dir.path());
        db.run(|c| Ok(c.execute_batch("BEGIN; INSERT INTO t (x) VALUES (1);")?))
            .await
            .unwrap();
        db.run_durably(|c| Ok(c.execute("INSERT INTO t (x) VALUES (2)", [])?))
            .await
            .unwrap();
        assert_eq!(count(&db).await, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_call_loses_its_answer_not_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let db = thread_with_table(dir.path());
        let lost = db
            .run::<(), _>(|c| {
                c.execute_batch("BEGIN; INSERT INTO t (x) VALUES (1);")?;
                panic!("a bug mid-transaction")
            })
            .await;
        assert!(lost.is_err());
        let lost = db
            .run_durably::<(), _>(|c| {
                c.execute("INSERT INTO t (x) VALUES (2)", [])?;
                panic!("a bug in durable work")
            })
            .await;
        assert!(lost.is_err());
        // Both rolled back; the connection is usable and in autocommit.
        assert_eq!(count(&db).await, 0);
        db.run_durably(|c| Ok(c.execute("INSERT INTO t (x) VALUES (3)", [])?))
            .await
            .unwrap();
        assert!(db.run(|c| Ok(c.is_autocommit())).await.unwrap());
        assert_eq!(count(&db).await, 1);
    }

    fn insert_later(db: &DbThread, x: i64) {
        db.run_later(move |c| {
            c.execute("INSERT INTO t (x) VALUES (?1)", [x])?;
            Ok(())
        })
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn later_work_rides_the_next_group_and_a_failing_one_is_rolled_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let db = thread_with_table(dir.path());
        insert_later(&db, 1);
        insert_later(&db, 1); // fails on the duplicate, alone
        insert_later(&db, 2);
        // No group yet, and far less than LATER_WAIT since: nothing committed.
        assert_eq!(count(&db).await, 0);
        db.run_durably(|c| Ok(c.execute("INSERT INTO t (x) VALUES (3)", [])?))
            .await
            .unwrap();
        assert_eq!(count(&db).await, 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn later_work_without_a_group_is_committed_within_its_wait() {
        let dir = tempfile::tempdir().unwrap();
        let db = thread_with_table(dir.path());
        insert_later(&db, 1);
        // Ordinary calls meanwhile do not take it along (they end their own transactions).
        assert_eq!(count(&db).await, 0);
        tokio::time::sleep(LATER_WAIT + Duration::from_millis(400)).await;
        assert_eq!(count(&db).await, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn later_work_is_committed_when_the_thread_ends() {
        let dir = tempfile::tempdir().unwrap();
        let db = thread_with_table(dir.path());
        insert_later(&db, 7);
        drop(db);
        let reader = Connection::open(dir.path().join("t.db")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n: i64 = reader
                .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
                .unwrap();
            if n == 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the queued record was lost at the end"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn later_work_is_bounded_and_committed_on_its_own_when_many_are_queued() {
        let dir = tempfile::tempdir().unwrap();
        let db = thread_with_table(dir.path());
        for x in 0..MAX_LATER as i64 {
            insert_later(&db, x);
        }
        // The round that takes the last of them commits them all, well before LATER_WAIT (a
        // count in that same round runs before the commit, so it is asked again).
        let started = Instant::now();
        while count(&db).await < MAX_LATER as i64 {
            assert!(
                started.elapsed() < LATER_WAIT / 2,
                "{MAX_LATER} records waited for LATER_WAIT"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grouped_work_alone_commits_without_fsync_and_fails_alone_in_a_group() {
        let dir = tempfile::tempdir().unwrap();
        let db = thread_with_table(dir.path());
        // Alone: its own group, at synchronous = NORMAL (1).
        let synchronous: i64 = db
            .run_grouped(|c| {
                c.execute("INSERT INTO t (x) VALUES (1)", [])?;
                Ok(c.query_row("PRAGMA synchronous", [], |r| r.get(0))?)
            })
            .await
            .unwrap();
        assert_eq!(synchronous, 1);
        assert_eq!(count(&db).await, 1);
        // Many at once, with durable work: each answered with its own result; the failing one
        // (a duplicate) is rolled back alone.
        let mut tasks = Vec::new();
        for i in 0..50i64 {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                let x = if i == 7 { 1 } else { 100 + i };
                if i % 2 == 0 {
                    db.run_durably(move |c| Ok(c.execute("INSERT INTO t (x) VALUES (?1)", [x])?))
                        .await
                } else {
                    db.run_grouped(move |c| Ok(c.execute("INSERT INTO t (x) VALUES (?1)", [x])?))
                        .await
                }
            }));
        }
        let mut failed = 0;
        for task in tasks {
            if task.await.unwrap().is_err() {
                failed += 1;
            }
        }
        assert_eq!(failed, 1);
        assert_eq!(count(&db).await, 50);
    }
}
