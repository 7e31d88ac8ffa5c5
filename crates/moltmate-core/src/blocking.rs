//! Blocking work with a deadline, off the async runtime.
//!
//! Invariant: nothing a user controls blocks the runtime. Every filesystem touch of a home, a
//! family folder, the personas folder or a memory index runs on tokio's blocking pool through
//! [`run`], which waits at most a deadline. A task that overruns is *abandoned*: the caller gets
//! [`BlockingError::TimedOut`] (and tells its user so), the runtime thread is free, and the
//! thread on the blocking pool finishes whenever the kernel lets it. Opens are non-blocking in
//! the first place (FIFOs, sockets and devices are refused after an `O_PATH` `fstat`), so the
//! deadline is a backstop for what no flag can prevent (a hung network filesystem, a stuck
//! disk), not the defence. [`abandoned`] counts tasks still running past their deadline, for
//! the operator's metrics.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

/// Deadline for the filesystem work of one step of a turn (reading the prompt files, creating
/// a home, applying a persona). Generous: the work is a handful of small files.
pub const FILE_DEADLINE: Duration = Duration::from_secs(10);

static ABANDONED: AtomicUsize = AtomicUsize::new(0);

/// Blocking tasks that overran their deadline and are still running.
pub fn abandoned() -> usize {
    ABANDONED.load(Ordering::Relaxed)
}

/// Why blocking work produced no result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockingError {
    /// The deadline passed; the task was abandoned and may still be running.
    #[error("{what} did not finish within {} s", deadline.as_secs_f64())]
    TimedOut {
        what: &'static str,
        deadline: Duration,
    },
    /// The task panicked or the runtime is shutting down.
    #[error("{what} failed: {detail}")]
    Failed { what: &'static str, detail: String },
}

impl BlockingError {
    /// Neither kind goes away by retrying at once: a task that hung once will hang again on
    /// the same input, and a panic is a bug.
    pub fn is_retryable(&self) -> bool {
        match self {
            BlockingError::TimedOut { .. } | BlockingError::Failed { .. } => false,
        }
    }

    /// A short sentence for the user whose work this was (no paths, no internals).
    pub fn user_message(&self) -> String {
        match self {
            BlockingError::TimedOut { .. } => {
                "Sorry — reading or writing your files took too long, so I could not answer this message. \
                 If you replaced one of your files with something unusual (a pipe, a socket, a huge file), \
                 put a normal file back and try again."
                    .to_string()
            }
            BlockingError::Failed { .. } => {
                "Sorry — something went wrong on my side and I could not answer this message. Please try again later."
                    .to_string()
            }
        }
    }
}

const RUNNING: u8 = 0;
const ABANDONED_STATE: u8 = 1;
const FINISHED: u8 = 2;

/// Decrements the abandoned count when a task that overran finally ends.
struct Overrun(std::sync::Arc<AtomicU8>);

impl Drop for Overrun {
    fn drop(&mut self) {
        if self.0.swap(FINISHED, Ordering::SeqCst) == ABANDONED_STATE {
            ABANDONED.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Runs `work` on the blocking pool and waits at most `deadline` for it.
pub async fn run<T, F>(what: &'static str, deadline: Duration, work: F) -> Result<T, BlockingError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let state = std::sync::Arc::new(AtomicU8::new(RUNNING));
    let guard = Overrun(std::sync::Arc::clone(&state));
    let task = tokio::task::spawn_blocking(move || {
        let _guard = guard;
        work()
    });
    match tokio::time::timeout(deadline, task).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(BlockingError::Failed {
            what,
            detail: e.to_string(),
        }),
        Err(_) => {
            // Counted before the state says so, so the guard never decrements first; undone
            // when the task finished in the meantime.
            ABANDONED.fetch_add(1, Ordering::Relaxed);
            if state
                .compare_exchange(RUNNING, ABANDONED_STATE, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                ABANDONED.fetch_sub(1, Ordering::Relaxed);
            }
            Err(BlockingError::TimedOut { what, deadline })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_hung_blocking_task_is_abandoned_and_the_runtime_stays_free() {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let result = run("test work", Duration::from_millis(50), move || {
            let _ = wait.recv();
        })
        .await;
        assert!(matches!(result, Err(BlockingError::TimedOut { .. })));
        assert!(!result.unwrap_err().is_retryable());
        assert_eq!(abandoned(), 1);
        // The (single-threaded) runtime still runs other work while the task hangs.
        assert_eq!(run("quick", Duration::from_secs(5), || 7).await, Ok(7));
        release.send(()).unwrap();
        for _ in 0..200 {
            if abandoned() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(abandoned(), 0, "a finished overrun is no longer counted");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_panicking_task_is_an_error_not_a_panic() {
        let result: Result<(), _> = run("panicky", Duration::from_secs(5), || panic!("boom")).await;
        assert!(matches!(result, Err(BlockingError::Failed { .. })));
    }
}
