//! The cap on sandboxes alive at once (`sandbox.maxActive`) and its fair queue.
//!
//! A **slot** is one alive sandbox, keyed by the backend's name for it: a running Docker
//! container (prewarmed or not, busy or idle), or one running bubblewrap command (bubblewrap
//! keeps nothing alive between commands, so its slots are *ephemeral*: taken for the command,
//! gone with it). A command whose sandbox is alive runs at once. A command that needs a new one
//! takes a free slot; else the **least recently used idle** sandbox is stopped to make room
//! (never one running a command: a slot with a command in it is not idle, and a slot chosen for
//! eviction is marked so no command can start in it meanwhile); else it **waits** in a FIFO
//! queue across users, at most one waiting command per user (a user's commands run one at a
//! time anyway; a second one is refused at once), until `sandbox.queueTimeoutSeconds` pass —
//! then it fails with [`SandboxError::Busy`], a message for the model saying why, and nothing
//! ran. Only the head of the queue may take capacity, so a newcomer never overtakes a waiter.
//! The queue holds at most `maxActive` commands (at least 8): a waiting command holds one of
//! the gateway's concurrent turns, so past that a command is refused at once instead.
//!
//! **Prewarming** ([`ActiveSandboxes::try_prewarm`]) never waits and never jumps the queue: it
//! takes a free slot, or stops an idle sandbox *of the same user* (another session's), else it
//! is skipped — a prewarm is a guess that the user will run a command, which must not cost
//! anybody else their warm sandbox. The command itself, if it comes, then queues or evicts like
//! any other.
//!
//! Waiting is cancellation-safe: a dropped wait leaves the queue (and wakes the next), a dropped
//! [`Lease`] frees its slot, and an eviction dropped before it finished un-marks its victim.

use moltmate_core::sandbox::SandboxError;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

#[derive(Debug)]
struct Slot {
    user: String,
    busy: u32,
    last_used: Instant,
    /// Chosen to be stopped; no command may start in it.
    evicting: bool,
    /// Gone when its last lease is (a bubblewrap command, a `task`-scope container).
    ephemeral: bool,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    user: String,
    wake: Arc<Notify>,
}

#[derive(Debug, Default)]
struct State {
    slots: HashMap<String, Slot>,
    queue: VecDeque<Waiter>,
    next_id: u64,
}

impl State {
    fn wake_head(&self) {
        if let Some(head) = self.queue.front() {
            head.wake.notify_one();
        }
    }

    /// The least recently used idle slot, of `only_user` if given.
    fn lru_idle(&self, only_user: Option<&str>) -> Option<String> {
        self.slots
            .iter()
            .filter(|(_, s)| s.busy == 0 && !s.evicting && !s.ephemeral)
            .filter(|(_, s)| only_user.is_none_or(|u| s.user == u))
            .min_by_key(|(_, s)| s.last_used)
            .map(|(k, _)| k.clone())
    }

    fn insert(&mut self, key: &str, user: &str, ephemeral: bool) {
        self.slots.insert(
            key.to_string(),
            Slot {
                user: user.to_string(),
                busy: 1,
                last_used: Instant::now(),
                evicting: false,
                ephemeral,
            },
        );
    }
}

/// Counts for the aggregate view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActiveSnapshot {
    pub alive: usize,
    pub queued: usize,
    pub evicted: u64,
    pub queue_timeouts: u64,
}

/// Commands waiting for a sandbox at most, whatever `maxActive` says: half the gateway's 256
/// concurrent turns, so waiting commands can never hold every turn permit.
pub const MAX_QUEUED: usize = 128;

/// The cap and its queue. Shared (`Arc`) by a backend and whoever reads its counts.
#[derive(Debug)]
pub struct ActiveSandboxes {
    max: usize,
    wait: Duration,
    state: Mutex<State>,
    /// Wakes commands waiting for their own sandbox's eviction to end.
    evictions: Notify,
    evicted: AtomicU64,
    timeouts: AtomicU64,
}

impl ActiveSandboxes {
    /// At most `max` (at least 1) alive; a command waits at most `wait` for a slot.
    pub fn new(max: usize, wait: Duration) -> Arc<Self> {
        Arc::new(ActiveSandboxes {
            max: max.max(1),
            wait,
            state: Mutex::new(State::default()),
            evictions: Notify::new(),
            evicted: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Commands that may wait at once: as many as there are slots (at least 8), and never
    /// more than [`MAX_QUEUED`]. A waiting command holds its user's turn — one of the
    /// gateway's concurrent turns — so the queue must not grow with the number of users nor
    /// with `maxActive`; past it a command is refused at once.
    pub fn max_queued(&self) -> usize {
        self.max.clamp(8, MAX_QUEUED)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state whole; a panic elsewhere cannot leave it half-done.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> ActiveSnapshot {
        let state = self.lock();
        ActiveSnapshot {
            alive: state.slots.len(),
            queued: state.queue.len(),
            evicted: self.evicted.load(Ordering::Relaxed),
            queue_timeouts: self.timeouts.load(Ordering::Relaxed),
        }
    }

    /// Whether a command (or a prewarm) holds `key` now.
    pub fn is_busy(&self, key: &str) -> bool {
        self.lock().slots.get(key).is_some_and(|s| s.busy > 0)
    }

    /// Whether `key` holds a slot.
    pub fn contains(&self, key: &str) -> bool {
        self.lock().slots.contains_key(key)
    }

    /// A slot for a command of `user` in sandbox `key`, waiting in the fair queue when every
    /// slot is busy. The lease may name an idle sandbox to stop first
    /// ([`Lease::take_eviction`]).
    pub async fn acquire(
        self: &Arc<Self>,
        key: &str,
        user: &str,
        ephemeral: bool,
    ) -> Result<Lease, SandboxError> {
        let deadline = tokio::time::Instant::now() + self.wait;
        let mut spot: Option<QueueSpot> = None;
        loop {
            let woken = match self.step(key, user, ephemeral, &mut spot)? {
                Step::Ready(lease) => {
                    drop(spot);
                    return Ok(lease);
                }
                // A wake-up sent between the decision and this await is not lost: the
                // eviction wait was registered under the lock, and a queue wake-up is kept as
                // a permit.
                Step::AwaitEviction(evicted) => tokio::time::timeout_at(deadline, evicted).await,
                Step::AwaitTurn(wake) => tokio::time::timeout_at(deadline, wake.notified()).await,
            };
            if woken.is_err() {
                drop(spot);
                return Err(self.timed_out());
            }
        }
    }

    /// One decision of [`Self::acquire`], under the lock.
    fn step<'a>(
        self: &'a Arc<Self>,
        key: &str,
        user: &str,
        ephemeral: bool,
        spot: &mut Option<QueueSpot>,
    ) -> Result<Step<'a>, SandboxError> {
        let mut state = self.lock();
        let my_turn = match (spot.as_ref(), state.queue.front()) {
            (_, None) => true,
            (Some(spot), Some(head)) => head.id == spot.id,
            (None, Some(_)) => false,
        };
        let full = state.slots.len() >= self.max;
        match state.slots.get_mut(key) {
            // Our sandbox is alive: run in it — unless it sits idle while others wait for room
            // (then it is as reclaimable as anyone's, and we queue like anyone: a user with
            // back-to-back commands must not keep a slot from the queue forever).
            Some(slot) if !slot.evicting && (slot.busy > 0 || my_turn || !full) => {
                slot.busy += 1;
                slot.last_used = Instant::now();
                if let Some(spot) = spot.as_ref() {
                    state.queue.retain(|w| w.id != spot.id);
                    state.wake_head();
                }
                return Ok(Step::Ready(self.lease(key, None)));
            }
            Some(slot) if !slot.evicting => {}
            Some(_) => {
                // Our own idle sandbox is being stopped for someone else: wait for that to
                // finish, then ask for a new one like anybody.
                let mut evicted = Box::pin(self.evictions.notified());
                evicted.as_mut().enable();
                return Ok(Step::AwaitEviction(evicted));
            }
            None => {}
        }
        if my_turn && !state.slots.contains_key(key) {
            let victim = if state.slots.len() < self.max {
                Some(None)
            } else {
                state.lru_idle(None).map(Some)
            };
            if let Some(victim) = victim {
                if let Some(v) = &victim {
                    if let Some(slot) = state.slots.get_mut(v) {
                        slot.evicting = true;
                    }
                }
                state.insert(key, user, ephemeral);
                if let Some(spot) = spot.as_ref() {
                    state.queue.retain(|w| w.id != spot.id);
                }
                // Room may be left for the next in line.
                state.wake_head();
                return Ok(Step::Ready(self.lease(key, victim)));
            }
        }
        if let Some(spot) = spot.as_ref() {
            return Ok(Step::AwaitTurn(spot.wake.clone()));
        }
        if state.queue.iter().any(|w| w.user == user) {
            return Err(SandboxError::Busy(format!(
                "all {} sandboxes of this server are in use, and another command of yours is already waiting for one",
                self.max
            )));
        }
        if state.queue.len() >= self.max_queued() {
            return Err(SandboxError::Busy(format!(
                "all {} sandboxes of this server are in use and {} commands are already waiting, so this command did not start",
                self.max,
                state.queue.len()
            )));
        }
        let id = state.next_id;
        state.next_id += 1;
        let wake = Arc::new(Notify::new());
        state.queue.push_back(Waiter {
            id,
            user: user.to_string(),
            wake: wake.clone(),
        });
        *spot = Some(QueueSpot {
            active: self.clone(),
            id,
            wake: wake.clone(),
        });
        Ok(Step::AwaitTurn(wake))
    }

    fn timed_out(&self) -> SandboxError {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
        SandboxError::Busy(format!(
            "all {} sandboxes of this server stayed in use by other commands for {} s, so this command did not start",
            self.max,
            self.wait.as_secs()
        ))
    }

    /// A slot for prewarming `key`, or `None` (skip the prewarm): never waits, never overtakes
    /// a waiting command, and evicts only an idle sandbox of the same user.
    pub fn try_prewarm(self: &Arc<Self>, key: &str, user: &str) -> Option<Lease> {
        let mut state = self.lock();
        let waiting = !state.queue.is_empty();
        match state.slots.get_mut(key) {
            // Never holds an idle sandbox others are waiting to reclaim.
            Some(slot) if !slot.evicting && (slot.busy > 0 || !waiting) => {
                slot.busy += 1;
                return Some(self.lease(key, None));
            }
            Some(_) => return None,
            None => {}
        }
        if waiting {
            return None;
        }
        let victim = if state.slots.len() < self.max {
            None
        } else {
            let own = state.lru_idle(Some(user))?;
            if let Some(slot) = state.slots.get_mut(&own) {
                slot.evicting = true;
            }
            Some(own)
        };
        state.insert(key, user, false);
        drop(state);
        Some(self.lease(key, victim))
    }

    /// Registers a sandbox found alive (Docker containers adopted after a restart), idle since
    /// `last_used`. Returns false, registering nothing, when every slot is taken.
    pub fn adopt(&self, key: &str, user: &str, last_used: Instant) -> bool {
        let mut state = self.lock();
        if state.slots.contains_key(key) {
            return true;
        }
        if state.slots.len() >= self.max {
            return false;
        }
        state.slots.insert(
            key.to_string(),
            Slot {
                user: user.to_string(),
                busy: 0,
                last_used,
                evicting: false,
                ephemeral: false,
            },
        );
        true
    }

    /// `key` counts as just used (it will not be the next one evicted).
    pub fn touch(&self, key: &str) {
        if let Some(slot) = self.lock().slots.get_mut(key) {
            slot.last_used = Instant::now();
        }
    }

    /// The sandbox `key` is gone (removed, pruned, evicted, never made): its slot is free.
    pub fn forget(&self, key: &str) {
        let mut state = self.lock();
        let was_evicting = state.slots.remove(key).is_some_and(|s| s.evicting);
        state.wake_head();
        drop(state);
        if was_evicting {
            self.evictions.notify_waiters();
        }
    }

    fn lease(self: &Arc<Self>, key: &str, evict: Option<String>) -> Lease {
        Lease {
            active: self.clone(),
            key: key.to_string(),
            evict: evict.map(|victim| Eviction {
                active: self.clone(),
                victim,
                done: false,
            }),
        }
    }

    fn release(&self, key: &str) {
        let mut state = self.lock();
        let gone = match state.slots.get_mut(key) {
            Some(slot) => {
                slot.busy = slot.busy.saturating_sub(1);
                slot.last_used = Instant::now();
                slot.busy == 0 && slot.ephemeral
            }
            None => false,
        };
        if gone {
            state.slots.remove(key);
        }
        // A freed or newly idle slot is room for the head of the queue.
        state.wake_head();
    }
}

/// What [`ActiveSandboxes::acquire`] does next.
enum Step<'a> {
    Ready(Lease),
    AwaitEviction(std::pin::Pin<Box<tokio::sync::futures::Notified<'a>>>),
    AwaitTurn(Arc<Notify>),
}

/// A place in the queue; leaving it (timeout, cancellation) wakes the next waiter.
struct QueueSpot {
    active: Arc<ActiveSandboxes>,
    id: u64,
    wake: Arc<Notify>,
}

impl Drop for QueueSpot {
    fn drop(&mut self) {
        let mut state = self.active.lock();
        state.queue.retain(|w| w.id != self.id);
        state.wake_head();
    }
}

/// A command's (or prewarm's) hold on a slot; dropping it marks the sandbox idle (or frees an
/// ephemeral slot).
#[derive(Debug)]
pub struct Lease {
    active: Arc<ActiveSandboxes>,
    key: String,
    evict: Option<Eviction>,
}

impl Lease {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The idle sandbox to stop before this one starts, if room had to be made.
    pub fn take_eviction(&mut self) -> Option<Eviction> {
        self.evict.take()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // An eviction never carried out leaves its victim alive (and usable again).
        self.evict.take();
        self.active.release(&self.key);
    }
}

/// An idle sandbox chosen to be stopped. Call [`Eviction::done`] once it is; dropping it
/// without that leaves the sandbox alive and usable again.
#[derive(Debug)]
pub struct Eviction {
    active: Arc<ActiveSandboxes>,
    victim: String,
    done: bool,
}

impl Eviction {
    /// The backend's name of the sandbox to stop.
    pub fn victim(&self) -> &str {
        &self.victim
    }

    /// The sandbox is stopped: its slot is free.
    pub fn done(mut self) {
        self.done = true;
        self.active.evicted.fetch_add(1, Ordering::Relaxed);
        self.active.forget(&self.victim);
    }
}

impl Drop for Eviction {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut state = self.active.lock();
        if let Some(slot) = state.slots.get_mut(&self.victim) {
            slot.evicting = false;
        }
        state.wake_head();
        drop(state);
        self.active.evictions.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(max: usize, wait_ms: u64) -> Arc<ActiveSandboxes> {
        ActiveSandboxes::new(max, Duration::from_millis(wait_ms))
    }

    #[tokio::test]
    async fn a_users_alive_sandbox_runs_at_once_even_when_full() {
        let active = cap(1, 50);
        drop(active.acquire("a", "anna", false).await.unwrap());
        let again = active.acquire("a", "anna", false).await.unwrap();
        assert!(again.evict.is_none());
        assert_eq!(active.snapshot().alive, 1);
    }

    #[tokio::test]
    async fn the_least_recently_used_idle_sandbox_is_stopped_first() {
        let active = cap(2, 50);
        drop(active.acquire("a", "anna", false).await.unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(active.acquire("b", "bob", false).await.unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
        // Anna used hers again: Bob's is now the least recently used.
        drop(active.acquire("a", "anna", false).await.unwrap());
        let mut carl = active.acquire("c", "carl", false).await.unwrap();
        let eviction = carl.take_eviction().expect("room made");
        assert_eq!(eviction.victim(), "b");
        // While it is being stopped, Bob's next command cannot start in it.
        assert!(!active.is_busy("b"));
        eviction.done();
        assert!(!active.contains("b"));
        assert_eq!(active.snapshot().alive, 2);
        assert_eq!(active.snapshot().evicted, 1);
    }

    #[tokio::test]
    async fn a_sandbox_running_a_command_is_never_evicted() {
        let active = cap(2, 100);
        let _a = active.acquire("a", "anna", false).await.unwrap();
        let _b = active.acquire("b", "bob", false).await.unwrap();
        let err = active.acquire("c", "carl", false).await.unwrap_err();
        assert!(matches!(err, SandboxError::Busy(_)));
        assert!(err.to_string().contains("did not start"), "{err}");
        assert!(active.contains("a") && active.contains("b"));
        assert_eq!(active.snapshot().queue_timeouts, 1);
        assert_eq!(active.snapshot().queued, 0, "the timed-out waiter left");
    }

    #[tokio::test]
    async fn a_waiting_command_runs_when_a_sandbox_goes_idle() {
        let active = cap(2, 5_000);
        let a = active.acquire("a", "anna", false).await.unwrap();
        let _b = active.acquire("b", "bob", false).await.unwrap();
        let waiter = {
            let active = active.clone();
            tokio::spawn(async move { active.acquire("c", "carl", false).await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(active.snapshot().queued, 1);
        drop(a);
        let mut carl = waiter.await.unwrap().unwrap();
        assert_eq!(
            carl.take_eviction().map(|e| e.victim().to_string()),
            Some("a".into())
        );
    }

    #[tokio::test]
    async fn the_queue_is_fifo_across_users_and_holds_one_command_per_user() {
        let active = cap(1, 5_000);
        let a = active.acquire("a", "anna", true).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (key, user) in [("b", "bob"), ("c", "carl"), ("d", "dora")] {
            let active = active.clone();
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let lease = active.acquire(key, user, true).await.unwrap();
                order.lock().unwrap().push(user);
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(lease);
            }));
            // Queue in a known order.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(active.snapshot().queued, 3);
        // Bob already waits: a second command of his is refused at once.
        let err = active.acquire("b2", "bob", true).await.unwrap_err();
        assert!(err.to_string().contains("already waiting"), "{err}");
        drop(a);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec!["bob", "carl", "dora"]);
        assert_eq!(
            active.snapshot().alive,
            0,
            "ephemeral slots go with their command"
        );
    }

    /// Regression: a user whose idle container was theirs ran command after command in it
    /// while another waited for room, and the waiter never got a turn.
    #[tokio::test]
    async fn an_idle_sandbox_is_not_kept_from_the_queue_by_its_owner() {
        let active = cap(1, 5_000);
        let anna = active.acquire("a", "anna", false).await.unwrap();
        let bob = {
            let active = active.clone();
            tokio::spawn(async move { active.acquire("b", "bob", false).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Anna's command ends and her next one asks at once, before Bob has run.
        drop(anna);
        let anna_again = {
            let active = active.clone();
            tokio::spawn(async move { active.acquire("a", "anna", false).await })
        };
        let mut bob = bob.await.unwrap().unwrap();
        let eviction = bob.take_eviction().expect("Anna's idle sandbox makes room");
        assert_eq!(eviction.victim(), "a");
        eviction.done();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!anna_again.is_finished(), "anna now waits behind bob");
        drop(bob);
        let mut anna = anna_again.await.unwrap().unwrap();
        assert_eq!(
            anna.take_eviction().map(|e| e.victim().to_string()),
            Some("b".into())
        );
    }

    #[tokio::test]
    async fn the_queue_is_bounded_and_refuses_at_once_past_it() {
        let active = cap(1, 5_000);
        let _a = active.acquire("a", "anna", true).await.unwrap();
        let mut waiting = Vec::new();
        for i in 0..active.max_queued() {
            let active = active.clone();
            waiting.push(tokio::spawn(async move {
                active
                    .acquire(&format!("k{i}"), &format!("user{i}"), true)
                    .await
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(active.snapshot().queued, 8);
        let started = Instant::now();
        let err = active.acquire("z", "zoe", true).await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused at once"
        );
        assert!(
            err.to_string().contains("8 commands are already waiting"),
            "{err}"
        );
        for w in waiting {
            w.abort();
        }
    }

    #[tokio::test]
    async fn a_newcomer_does_not_overtake_the_queue() {
        let active = cap(1, 5_000);
        let a = active.acquire("a", "anna", true).await.unwrap();
        let waiter = {
            let active = active.clone();
            tokio::spawn(async move { active.acquire("b", "bob", true).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Room appears and a newcomer asks at the same moment: Bob, first in line, gets it.
        drop(a);
        let newcomer = {
            let active = active.clone();
            tokio::spawn(async move { active.acquire("c", "carl", true).await })
        };
        let bob = waiter.await.unwrap().unwrap();
        assert_eq!(bob.key(), "b");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!newcomer.is_finished(), "carl waits behind bob");
        drop(bob);
        assert_eq!(newcomer.await.unwrap().unwrap().key(), "c");
    }

    #[tokio::test]
    async fn a_cancelled_wait_leaves_the_queue_and_wakes_the_next() {
        let active = cap(1, 5_000);
        let a = active.acquire("a", "anna", true).await.unwrap();
        let first = {
            let active = active.clone();
            tokio::spawn(async move { active.acquire("b", "bob", true).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = {
            let active = active.clone();
            tokio::spawn(async move { active.acquire("c", "carl", true).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        first.abort();
        let _ = first.await;
        assert_eq!(active.snapshot().queued, 1);
        drop(a);
        assert_eq!(second.await.unwrap().unwrap().key(), "c");
    }

    #[tokio::test]
    async fn prewarming_never_evicts_someone_elses_sandbox_or_waits() {
        let active = cap(2, 50);
        drop(active.acquire("a", "anna", false).await.unwrap());
        drop(active.acquire("b", "bob", false).await.unwrap());
        // Full, both idle: Carl's prewarm is skipped rather than stopping Anna's or Bob's.
        assert!(active.try_prewarm("c", "carl").is_none());
        // Anna's prewarm of another session of hers may replace her own idle one.
        let mut anna2 = active.try_prewarm("a2", "anna").expect("own idle sandbox");
        assert_eq!(
            anna2.take_eviction().map(|e| e.victim().to_string()),
            Some("a".into())
        );
        // Never one in use.
        let _busy = active.acquire("b", "bob", false).await.unwrap();
        assert!(active.try_prewarm("b2", "bob").is_none());
    }

    #[tokio::test]
    async fn an_eviction_dropped_before_it_finished_leaves_the_victim_usable() {
        let active = cap(1, 50);
        drop(active.acquire("a", "anna", false).await.unwrap());
        let mut bob = active.acquire("b", "bob", false).await.unwrap();
        let eviction = bob.take_eviction().unwrap();
        drop(eviction);
        drop(bob);
        // Anna's sandbox is still there and runs her command.
        let again = active.acquire("a", "anna", false).await.unwrap();
        assert_eq!(again.key(), "a");
    }

    #[tokio::test]
    async fn a_command_whose_sandbox_is_being_evicted_waits_for_a_new_one() {
        let active = cap(1, 2_000);
        drop(active.acquire("a", "anna", false).await.unwrap());
        let mut bob = active.acquire("b", "bob", false).await.unwrap();
        let eviction = bob.take_eviction().unwrap();
        let anna = {
            let active = active.clone();
            tokio::spawn(async move { active.acquire("a", "anna", false).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!anna.is_finished());
        eviction.done();
        drop(bob);
        // Bob's is idle now, so Anna's new sandbox replaces it.
        let mut anna = anna.await.unwrap().unwrap();
        assert_eq!(
            anna.take_eviction().map(|e| e.victim().to_string()),
            Some("b".into())
        );
    }

    #[test]
    fn adopted_sandboxes_count_up_to_the_cap() {
        let active = cap(1, 50);
        assert!(active.adopt("a", "anna", Instant::now()));
        assert!(!active.adopt("b", "bob", Instant::now()));
        assert_eq!(active.snapshot().alive, 1);
    }

    /// F8: with `maxActive` ≥ 256 the queue could hold every one of the gateway's 256 turn
    /// permits, so no other turn could start.
    #[test]
    fn queue_never_holds_more_than_half_the_turn_permits() {
        assert_eq!(
            ActiveSandboxes::new(10_000, Duration::from_secs(1)).max_queued(),
            128
        );
        assert_eq!(
            ActiveSandboxes::new(256, Duration::from_secs(1)).max_queued(),
            128
        );
        assert_eq!(
            ActiveSandboxes::new(32, Duration::from_secs(1)).max_queued(),
            32
        );
        assert_eq!(
            ActiveSandboxes::new(1, Duration::from_secs(1)).max_queued(),
            8
        );
    }
}
