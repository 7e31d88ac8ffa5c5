//! Starting bwrap off the async runtime, from threads that outlive what they start.
//!
//! `Command::spawn` forks the gateway and waits until the child has run its set-up (cgroup,
//! rlimits, staging namespace, ids) and exec'd bwrap: ~5 ms on an idle host, 50–100 ms and
//! more on a loaded one. On a runtime worker that held up other users' turns whenever several
//! commands started at once. The blocking pool is no place for it either: the child's
//! `PR_SET_PDEATHSIG` follows the *thread* that forked it, and the pool retires idle threads
//! after 10 s — killing every sandbox they had started. So a few dedicated threads, alive as
//! long as the backend, do the forking.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of long-lived threads that start processes.
pub(super) struct Spawner {
    jobs: Mutex<Sender<Job>>,
}

/// Spawns at once; more wait their turn (each takes milliseconds).
const THREADS: usize = 4;

impl Spawner {
    pub(super) fn new() -> std::io::Result<Self> {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..THREADS {
            let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
            std::thread::Builder::new()
                .name(format!("bwrap-spawn-{i}"))
                .spawn(move || loop {
                    // A poisoned lock only means another spawner thread panicked; the
                    // receiver itself is intact.
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        // The backend is gone.
                        Err(_) => return,
                    }
                })?;
        }
        Ok(Spawner {
            jobs: Mutex::new(tx),
        })
    }

    /// Starts `command` on a spawner thread (inside this runtime, so the child is reaped by
    /// it) and returns the child.
    pub(super) async fn spawn(
        &self,
        mut command: tokio::process::Command,
    ) -> std::io::Result<tokio::process::Child> {
        let runtime = tokio::runtime::Handle::current();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _entered = runtime.enter();
            let _ = done_tx.send(command.spawn());
        });
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| std::io::Error::other("the bwrap spawner threads are gone"))?;
        done_rx
            .await
            .map_err(|_| std::io::Error::other("the bwrap spawner thread ended"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Children started from the spawner threads run (and are waited for) on the runtime.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spawned_children_run_and_are_reaped() {
        let spawner = Spawner::new().unwrap();
        let mut waits = Vec::new();
        for _ in 0..8 {
            let mut cmd = tokio::process::Command::new("true");
            cmd.kill_on_drop(true);
            let mut child = spawner.spawn(cmd).await.unwrap();
            waits.push(tokio::spawn(async move { child.wait().await.unwrap() }));
        }
        for w in waits {
            assert!(w.await.unwrap().success());
        }
    }
}
