//! The SQLite database: schema, migrations and every query the gateway makes.
//!
//! One connection, owned by one database thread that runs every call in turn and commits the
//! durable ones in groups (see [`crate::durable`]): SQLite has a single writer anyway, every
//! statement here is sub-millisecond, and a pool would only add memory. WAL mode lets the
//! operator's CLI (`moltmate pairing approve`, `moltmate users ...`) read and write while the
//! gateway runs; `busy_timeout` makes the two wait for each other instead of failing.

use crate::durable::DbThread;
use crate::ending::Completion;
use chrono::Utc;
use moltmate_core::channel::InboundMessage;
use moltmate_core::model::{ConversationItem, TokenUsage};
use moltmate_core::sandbox::{SandboxIds, UidRange};
use moltmate_core::{ChannelKind, Identity, PeerId, UserId};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Storage failures. None of them is the user's fault; the gateway reports them as internal.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the database is newer (schema {found}) than this moltmate (schema {supported}); upgrade moltmate")]
    TooNew { found: i64, supported: i64 },
    #[error("could not prepare the database directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    NotFound(String),
    #[error("database worker failed: {0}")]
    Worker(String),
    /// No sandbox id can be given out (range used up or invalid); the operator must act.
    #[error("{0}")]
    SandboxIds(String),
}

impl StoreError {
    /// Whether a statement was stopped by a deadline (SQLite's progress handler, see
    /// `MemoryIndex::with_deadline`).
    pub fn is_interrupted(&self) -> bool {
        matches!(
            self,
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::OperationInterrupted
        )
    }

    /// Whether the operation may succeed if repeated (the database was busy or locked).
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ),
            StoreError::Sqlite(_)
            | StoreError::Corrupt(_)
            | StoreError::TooNew { .. }
            | StoreError::Io(_)
            | StoreError::NotFound(_)
            | StoreError::Worker(_)
            | StoreError::SandboxIds(_) => false,
        }
    }
}

/// Migrations, applied in order; the index + 1 is the schema version. Never edit a released one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    display_name  TEXT,
    created_at    INTEGER NOT NULL,
    onboarded     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE identities (
    channel     TEXT NOT NULL,
    peer        TEXT NOT NULL,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    source      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (channel, peer)
);
CREATE INDEX identities_user ON identities(user_id);
CREATE TABLE sessions (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    started_at  INTEGER NOT NULL,
    last_active INTEGER NOT NULL,
    ended_at    INTEGER,
    summary     TEXT
);
CREATE INDEX sessions_user ON sessions(user_id, ended_at);
CREATE TABLE transcript (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id  TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    user_id     TEXT NOT NULL,
    item        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX transcript_session ON transcript(session_id, id);
CREATE TABLE inbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    channel       TEXT NOT NULL,
    external_id   TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    chat_id       TEXT NOT NULL,
    text          TEXT NOT NULL,
    sender_name   TEXT,
    language_code TEXT,
    received_at   INTEGER NOT NULL,
    done_at       INTEGER,
    UNIQUE (channel, external_id)
);
CREATE INDEX inbox_pending ON inbox(user_id, done_at, id);
CREATE TABLE outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    inbox_id    INTEGER,
    user_id     TEXT,
    channel     TEXT NOT NULL,
    chat_id     TEXT NOT NULL,
    text        TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'pending',
    detail      TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX outbox_state ON outbox(state, id);
CREATE TABLE channel_cursors (
    channel TEXT PRIMARY KEY,
    cursor  INTEGER NOT NULL
);
CREATE TABLE pairing_requests (
    code        TEXT PRIMARY KEY,
    channel     TEXT NOT NULL,
    peer        TEXT NOT NULL,
    chat_id     TEXT NOT NULL,
    sender_name TEXT,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    state       TEXT NOT NULL DEFAULT 'pending'
);
CREATE INDEX pairing_peer ON pairing_requests(channel, peer, state);
CREATE TABLE token_usage (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id       TEXT NOT NULL,
    provider      TEXT NOT NULL,
    model         TEXT NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    at            INTEGER NOT NULL
);
CREATE INDEX token_usage_user ON token_usage(user_id);
CREATE TABLE audit_events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id      TEXT NOT NULL,
    kind         TEXT NOT NULL,
    tool         TEXT,
    args_digest  TEXT,
    duration_ms  INTEGER,
    outcome      TEXT NOT NULL,
    detail       TEXT,
    at           INTEGER NOT NULL
);
CREATE INDEX audit_user ON audit_events(user_id, id);
"#,
    r#"
CREATE TABLE api_tokens (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id      TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    token_hash   TEXT NOT NULL UNIQUE,
    label        TEXT,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked_at   INTEGER
);
CREATE INDEX api_tokens_user ON api_tokens(user_id);
CREATE TABLE login_links (
    code_hash   TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER
);
CREATE TABLE web_sessions (
    session_hash TEXT PRIMARY KEY,
    user_id      TEXT,
    is_admin     INTEGER NOT NULL DEFAULT 0,
    csrf_token   TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
);
"#,
    r#"
ALTER TABLE users ADD COLUMN onboarding_step TEXT;
"#,
    // Sandbox ids (`sandbox.uidRange`): one row per user or family that was ever given one.
    // Rows are never deleted: a removed user's row is retired (`retired_at`), so its id is
    // never handed out again, and a new user with the same name starts from a fresh id.
    r#"
CREATE TABLE sandbox_ids (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT NOT NULL,
    name        TEXT NOT NULL,
    host_id     INTEGER NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    retired_at  INTEGER
);
CREATE UNIQUE INDEX sandbox_ids_live ON sandbox_ids(kind, name) WHERE retired_at IS NULL;
"#,
    crate::usage::MIGRATION,
    crate::ending::MIGRATION,
    crate::reminders::MIGRATION,
    crate::usage::RETENTION_MIGRATION,
    // Attachment references of an inbox row (JSON array of `Attachment`), downloaded by the
    // user's worker; NULL for text messages.
    r#"
ALTER TABLE inbox ADD COLUMN attachments TEXT;
"#,
    // `/admin` usage and `moltmate usage --since`: the report reads a window by time (all
    // users) and tool calls by kind and time; without these they scanned whole tables.
    r#"
CREATE INDEX IF NOT EXISTS token_usage_at ON token_usage(at);
CREATE INDEX IF NOT EXISTS audit_kind_at ON audit_events(kind, at);
"#,
    crate::downloads::MIGRATION,
    crate::usage::HISTORY_CHANGES_MIGRATION,
];

/// The schema version this code creates and reads. A database with a higher version (made by a
/// newer moltmate) is refused with [`StoreError::TooNew`]; a lower one is migrated forward.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

pub(crate) fn now_millis() -> i64 {
    Utc::now().timestamp_millis()
}

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserRecord {
    pub id: UserId,
    pub display_name: Option<String>,
    pub created_at: i64,
    pub onboarded: bool,
    pub identities: Vec<Identity>,
}

/// An accepted message waiting for (or past) its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxItem {
    pub id: i64,
    pub channel: ChannelKind,
    pub user: UserId,
    pub chat_id: String,
    pub text: String,
    pub sender_name: Option<String>,
    pub language_code: Option<String>,
    pub received_at: i64,
    /// Set when a reminder of the user produced this row (not a message they sent).
    pub reminder: Option<crate::reminders::ReminderFire>,
    /// Files sent with the message (references; downloaded by the worker).
    pub attachments: Vec<moltmate_core::channel::Attachment>,
}

/// A reply waiting to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    pub id: i64,
    pub inbox_id: Option<i64>,
    pub user: Option<UserId>,
    pub channel: ChannelKind,
    pub chat_id: String,
    pub text: String,
}

/// A session of a user (the conversation the model sees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: String,
    pub user: UserId,
    pub started_at: i64,
    pub last_active: i64,
    /// Summary of compacted earlier turns, if any.
    pub summary: Option<String>,
}

/// Everything a finished turn commits at once.
#[derive(Debug, Clone)]
pub struct TurnRecord {
    pub inbox_id: i64,
    pub user: UserId,
    pub session_id: String,
    /// New transcript items of this turn, in order (the user's message first).
    pub items: Vec<ConversationItem>,
    /// The answer to deliver, if any.
    pub reply: Option<(ChannelKind, String, String)>,
    /// Token usage per model call: (provider, model, usage).
    pub usage: Vec<(String, String, TokenUsage)>,
    /// The budget charge of the turn's last model call, charged in the same transaction.
    pub charge: Option<crate::usage::DeferredCharge>,
}

/// A pairing request's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PairingState {
    Pending,
    Approved,
    Denied,
}

impl PairingState {
    fn as_str(self) -> &'static str {
        match self {
            PairingState::Pending => "pending",
            PairingState::Approved => "approved",
            PairingState::Denied => "denied",
        }
    }
    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "pending" => Ok(PairingState::Pending),
            "approved" => Ok(PairingState::Approved),
            "denied" => Ok(PairingState::Denied),
            other => Err(StoreError::Corrupt(format!(
                "unknown pairing state {other:?}"
            ))),
        }
    }
}

/// An unknown sender's request to be let in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PairingRequest {
    pub code: String,
    pub identity: Identity,
    pub chat_id: String,
    pub sender_name: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
    pub state: PairingState,
}

/// A tool call or security-relevant event, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub user: UserId,
    /// `tool_call`, `pairing_approved`, `access_refused`, ...
    pub kind: String,
    pub tool: Option<String>,
    /// SHA-256 of the canonical arguments (never the arguments themselves: they may hold
    /// personal data, and the audit log is read by the operator).
    pub args_digest: Option<String>,
    pub duration_ms: Option<i64>,
    /// `ok`, `refused`, `failed`, ...
    pub outcome: String,
    pub detail: Option<String>,
}

/// An audit event as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    pub id: i64,
    pub user: String,
    pub kind: String,
    pub tool: Option<String>,
    pub args_digest: Option<String>,
    pub duration_ms: Option<i64>,
    pub outcome: String,
    pub detail: Option<String>,
    pub at: i64,
}

/// Token usage summed per user and model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    pub user: String,
    pub provider: String,
    pub model: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub calls: i64,
}

/// Pairing codes: 8 characters from an alphabet without look-alikes (no 0/O, 1/I/L).
const PAIRING_ALPHABET: &[u8] = b"ABCDEFGHJKMNPQRSTUVWXYZ23456789";

pub(crate) fn new_pairing_code() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..8)
        .map(|_| PAIRING_ALPHABET[rng.random_range(0..PAIRING_ALPHABET.len())] as char)
        .collect()
}

fn new_session_id() -> String {
    use rand::Rng;
    let bytes: [u8; 12] = rand::rng().random();
    hex::encode(bytes)
}

fn parse_user(raw: String) -> Result<UserId, StoreError> {
    UserId::new(raw).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn parse_channel(raw: &str) -> Result<ChannelKind, StoreError> {
    raw.parse()
        .map_err(|e: moltmate_core::InvalidId| StoreError::Corrupt(e.to_string()))
}

fn parse_identity(channel: &str, peer: String) -> Result<Identity, StoreError> {
    let peer = PeerId::new(peer).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(Identity::new(parse_channel(channel)?, peer))
}

/// The gateway's database.
#[derive(Clone)]
pub struct Store {
    /// The thread that owns the connection (see [`crate::durable`]).
    db: DbThread,
    /// Held by every clone; the checkpointer stops when the last one is gone.
    alive: Arc<()>,
    /// Stored bytes all workers' history caches hold (see [`crate::usage::HistoryCache`]).
    pub(crate) history_budget: Arc<std::sync::atomic::AtomicU64>,
    /// The database file (`None` in memory): operator reports read it through a connection of
    /// their own, so a long report never holds the gateway's.
    path: Option<Arc<std::path::PathBuf>>,
    /// Read-only connections for the hot path's short reads, run on the caller's thread
    /// (`None` in memory). See [`crate::readers`].
    readers: Option<Arc<crate::readers::Readers>>,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and applies migrations, and starts a
    /// background thread that checkpoints the WAL (see [`Store::prepare`]).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let connection = Connection::open(path)?;
        // The database holds transcripts: owner-only, like everything else in the home.
        set_owner_only(path);
        let mut store = Self::prepare(connection)?;
        let shared = Arc::new(path.to_path_buf());
        store.readers = Some(Arc::new(crate::readers::Readers::new(Arc::clone(&shared))));
        store.path = Some(shared);
        start_checkpointer(path, Arc::downgrade(&store.alive));
        Ok(store)
    }

    /// An in-memory database, for tests and benchmarks.
    pub fn open_in_memory() -> Result<Store, StoreError> {
        Self::prepare(Connection::open_in_memory()?)
    }

    /// Durability, in WAL mode:
    /// * commits default to `synchronous = NORMAL`: on disk before the next checkpoint, which
    ///   survives any process crash (`kill -9`) but not a power loss;
    /// * the commits whose loss would break a promise to the outside world run with
    ///   `synchronous = FULL` (fsync before returning): accepting an inbound message (the channel
    ///   is told "received" right after) and claiming a reply for sending (the guard against
    ///   sending it twice), grouped across callers. See [`Store::durably`].
    /// * Automatic checkpoints are off on this connection; a background thread checkpoints, so a
    ///   message's latency rarely includes one: only past a long WAL under sustained load does
    ///   the writer checkpoint itself, between two commits, so the WAL restarts (see
    ///   `durable::checkpoint_a_long_wal`); a restarted WAL file is trimmed to 64 MiB.
    fn prepare(mut connection: Connection) -> Result<Store, StoreError> {
        connection.busy_timeout(Duration::from_secs(10))?;
        // A database of a newer moltmate is refused before anything (even the journal mode)
        // is changed in it.
        refuse_newer(&connection)?;
        connection.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;
             PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = 67108864;",
        )?;
        migrate(&mut connection)?;
        // Every statement of the hot path is prepared once (`prepare_cached`).
        connection.set_prepared_statement_cache_capacity(128);
        Ok(Store {
            db: DbThread::start(connection)?,
            alive: Arc::new(()),
            history_budget: Arc::default(),
            path: None,
            readers: None,
        })
    }

    /// Runs `work` in a transaction whose commit is fsynced (`synchronous = FULL`) before this
    /// returns, grouped with other callers' durable work (one fsync per group; see
    /// [`crate::durable`]). `work` must not begin a transaction of its own: it runs inside one.
    pub(crate) async fn durably<R, F>(&self, work: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        self.db.run_durably(work).await
    }

    /// Runs read-only `work` for an operator report: on a read-only connection of its own to
    /// the database file (WAL readers never wait for the writer, and the writer never waits
    /// for them), so a report over a large table never delays a message. In memory (tests),
    /// on the shared connection.
    pub(crate) async fn read_report<R, F>(&self, work: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let Some(path) = self.path.clone() else {
            return self.with(move |c| work(c)).await;
        };
        tokio::task::spawn_blocking(move || {
            let connection = Connection::open_with_flags(
                path.as_path(),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            connection.busy_timeout(Duration::from_secs(10))?;
            work(&connection)
        })
        .await
        .map_err(|e| StoreError::Worker(e.to_string()))?
    }

    /// The schema version of this database (after migrations: [`SCHEMA_VERSION`]).
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        self.with(|c| Ok(c.query_row("SELECT version FROM schema_version", [], |r| r.get(0))?))
            .await
    }

    /// Runs short read-only `work` on the caller's own thread, on a read-only connection of
    /// the pool (see [`crate::readers`]); on the database thread when none is free (or in
    /// memory). Only for bounded reads: an index lookup, a page within the history budget.
    pub(crate) async fn read<R, F>(&self, work: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        if let Some(connection) = self.readers.as_ref().and_then(|r| r.lend()) {
            return work(&connection);
        }
        self.with(move |c| work(c)).await
    }

    /// Runs `work` on the connection, on the database thread.
    pub(crate) async fn with<R, F>(&self, work: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        self.db.run(work).await
    }

    // ---- users and identities -------------------------------------------------------------

    /// Creates the user if missing. Returns true when it was created.
    pub async fn ensure_user(
        &self,
        user: &UserId,
        display_name: Option<&str>,
    ) -> Result<bool, StoreError> {
        let user = user.clone();
        // Almost always there already: a read on the caller's thread, no write transaction.
        let known = user.clone();
        if self.read(move |c| user_exists(c, &known)).await? {
            return Ok(false);
        }
        let display_name = display_name.map(str::to_string);
        self.with(move |c| {
            let inserted = c.prepare_cached("INSERT OR IGNORE INTO users (id, display_name, created_at) VALUES (?1, ?2, ?3)")?.execute(
                params![user.as_str(), display_name, now_millis()],
            )?;
            Ok(inserted == 1)
        })
        .await
    }

    /// Links an identity to a user (creating the user). An identity already linked to another
    /// user is moved only when `replace` is set (config is the source of truth for links).
    pub async fn link_identity(
        &self,
        identity: &Identity,
        user: &UserId,
        source: &str,
    ) -> Result<(), StoreError> {
        let identity = identity.clone();
        let user = user.clone();
        let source = source.to_string();
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.prepare_cached("INSERT OR IGNORE INTO users (id, created_at) VALUES (?1, ?2)")?.execute(
                params![user.as_str(), now_millis()],
            )?;
            tx.prepare_cached("INSERT INTO identities (channel, peer, user_id, source, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (channel, peer) DO UPDATE SET user_id = excluded.user_id, source = excluded.source")?.execute(
                params![identity.channel.as_str(), identity.peer.as_str(), user.as_str(), source, now_millis()],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// The user an identity belongs to, and how the link was made (`config`, `pairing`, ...).
    pub async fn user_for_identity(
        &self,
        identity: &Identity,
    ) -> Result<Option<(UserId, String)>, StoreError> {
        let identity = identity.clone();
        self.read(move |c| {
            let row: Option<(String, String)> = c
                .prepare_cached(
                    "SELECT user_id, source FROM identities WHERE channel = ?1 AND peer = ?2",
                )?
                .query_row(
                    params![identity.channel.as_str(), identity.peer.as_str()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            row.map(|(u, s)| Ok((parse_user(u)?, s))).transpose()
        })
        .await
    }

    pub async fn user(&self, user: &UserId) -> Result<Option<UserRecord>, StoreError> {
        let user = user.clone();
        self.with(move |c| load_user(c, &user)).await
    }

    pub async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        self.with(|c| {
            let ids: Vec<String> = c
                .prepare("SELECT id FROM users ORDER BY id")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut users = Vec::with_capacity(ids.len());
            for id in ids {
                let id = parse_user(id)?;
                if let Some(u) = load_user(c, &id)? {
                    users.push(u);
                }
            }
            Ok(users)
        })
        .await
    }

    pub async fn set_onboarded(&self, user: &UserId, onboarded: bool) -> Result<(), StoreError> {
        let user = user.clone();
        self.with(move |c| {
            c.prepare_cached("UPDATE users SET onboarded = ?2 WHERE id = ?1")?
                .execute(params![user.as_str(), onboarded])?;
            Ok(())
        })
        .await
    }

    /// Where the user is in the onboarding conversation (`None` = not started or finished;
    /// see `onboarded`).
    pub async fn onboarding_step(&self, user: &UserId) -> Result<Option<String>, StoreError> {
        let user = user.clone();
        self.with(move |c| {
            Ok(
                c.prepare_cached("SELECT onboarding_step FROM users WHERE id = ?1")?
                    .query_row(params![user.as_str()], |r| r.get(0))
                    .optional()?
                    .flatten(),
            )
        })
        .await
    }

    /// Sets the onboarding step and the onboarded flag together.
    pub async fn set_onboarding(
        &self,
        user: &UserId,
        step: Option<&str>,
        onboarded: bool,
    ) -> Result<(), StoreError> {
        let user = user.clone();
        let step = step.map(str::to_string);
        self.with(move |c| {
            c.prepare_cached(
                "UPDATE users SET onboarding_step = ?2, onboarded = ?3 WHERE id = ?1",
            )?
            .execute(params![user.as_str(), step, onboarded])?;
            Ok(())
        })
        .await
    }

    /// Forgets a user's conversations (sessions, transcripts, answered and pending messages),
    /// reminders and onboarding, keeping the user row, identities and the operator's records (audit,
    /// usage). Ends no credentials and tells no running gateway: `moltmate users reset` uses
    /// [`Store::end_user`] instead.
    pub async fn wipe_user_history(&self, user: &UserId) -> Result<(), StoreError> {
        let user = user.clone();
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.prepare_cached("DELETE FROM transcript WHERE user_id = ?1")?
                .execute(params![user.as_str()])?;
            tx.prepare_cached("DELETE FROM sessions WHERE user_id = ?1")?
                .execute(params![user.as_str()])?;
            tx.prepare_cached("DELETE FROM inbox WHERE user_id = ?1")?
                .execute(params![user.as_str()])?;
            tx.prepare_cached(
                "UPDATE users SET onboarded = 0, onboarding_step = NULL WHERE id = ?1",
            )?
            .execute(params![user.as_str()])?;
            crate::reminders::delete_user_reminders(&tx, &user)?;
            // The reset home starts over under a fresh uid: nothing left running under the old
            // one can reach it.
            retire_sandbox_ids(&tx, &user)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Deletes the user and everything stored about them (identities, sessions, transcripts,
    /// pending inbox and outbox rows, reminders, pairing requests of their identities; credentials by
    /// foreign key or trigger). Audit events and usage stay: they are the operator's record.
    /// Tells no running gateway: `moltmate users remove` uses [`Store::end_user`] instead.
    pub async fn delete_user(&self, user: &UserId) -> Result<bool, StoreError> {
        let user = user.clone();
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.prepare_cached(
                "DELETE FROM pairing_requests WHERE (channel, peer) IN
                   (SELECT channel, peer FROM identities WHERE user_id = ?1)",
            )?
            .execute(params![user.as_str()])?;
            tx.prepare_cached("DELETE FROM inbox WHERE user_id = ?1")?
                .execute(params![user.as_str()])?;
            tx.prepare_cached("DELETE FROM outbox WHERE user_id = ?1")?
                .execute(params![user.as_str()])?;
            tx.prepare_cached("DELETE FROM transcript WHERE user_id = ?1")?
                .execute(params![user.as_str()])?;
            crate::reminders::delete_user_reminders(&tx, &user)?;
            retire_sandbox_ids(&tx, &user)?;
            let deleted = tx
                .prepare_cached("DELETE FROM users WHERE id = ?1")?
                .execute(params![user.as_str()])?;
            tx.commit()?;
            Ok(deleted == 1)
        })
        .await
    }

    // ---- sandbox ids --------------------------------------------------------------------------

    /// The host uid/gid `user`'s sandbox runs as and their home belongs to, allocated from
    /// `range` on first need and kept until the user is removed or reset. A retired id is never
    /// given out again, to anyone.
    pub async fn user_sandbox_ids(
        &self,
        user: &UserId,
        range: UidRange,
    ) -> Result<SandboxIds, StoreError> {
        let user = user.clone();
        // Allocated once per user: after that a read on the caller's thread.
        let known = user.clone();
        let live = self
            .read(move |c| live_sandbox_id(c, IdHolder::User, known.as_str()))
            .await?;
        if let Some(id) = live {
            return Ok(SandboxIds::same(id));
        }
        self.with(move |c| {
            sandbox_id(c, IdHolder::User, user.as_str(), range).map(SandboxIds::same)
        })
        .await
    }

    /// The gid of family folder `family` (its members get it as a supplementary group),
    /// allocated from `range` on first need. Families keep theirs (their folder stays too).
    pub async fn family_sandbox_gid(
        &self,
        family: &str,
        range: UidRange,
    ) -> Result<u32, StoreError> {
        let family = family.to_string();
        self.with(move |c| sandbox_id(c, IdHolder::Family, &family, range))
            .await
    }

    /// Every live user's sandbox uid, without allocating (for the operator's eyes).
    pub async fn sandbox_uids(&self) -> Result<std::collections::HashMap<String, u32>, StoreError> {
        self.with(|c| {
            let mut statement = c.prepare(
                "SELECT name, host_id FROM sandbox_ids WHERE kind = 'user' AND retired_at IS NULL",
            )?;
            let rows = statement
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows
                .into_iter()
                .filter_map(|(name, id)| Some((name, u32::try_from(id).ok()?)))
                .collect())
        })
        .await
    }

    // ---- inbox, cursors, outbox -------------------------------------------------------------

    /// Stores an accepted message for `user` together with the channel cursor, atomically.
    /// Returns the inbox id, or `None` when this delivery was stored before.
    pub async fn insert_inbound(
        &self,
        message: &InboundMessage,
        user: &UserId,
    ) -> Result<Option<i64>, StoreError> {
        self.insert_inbound_then(message, user, |_| {}).await
    }

    /// [`Store::insert_inbound`], calling `stored(id)` with the new row's id inside the
    /// transaction, before the row can be seen by anyone else (a worker reading the inbox).
    /// Whatever must be in place when the row is answered (the caller waiting for the answer)
    /// is put there by `stored`; if the commit then fails, the row never existed and the
    /// caller gets the error.
    pub async fn insert_inbound_then(
        &self,
        message: &InboundMessage,
        user: &UserId,
        stored: impl FnOnce(i64) + Send + 'static,
    ) -> Result<Option<i64>, StoreError> {
        let message = message.clone();
        let user = user.clone();
        self.durably(move |c| {
            let id = insert_inbox_row(c, &message, &user)?;
            if let Some(cursor) = message.cursor {
                upsert_cursor(c, message.sender.channel, cursor)?;
            }
            if let Some(id) = id {
                stored(id);
            }
            Ok(id)
        })
        .await
    }

    /// Moves a channel's cursor forward (never back) without storing a message — for updates
    /// that are refused or skipped.
    pub async fn advance_cursor(
        &self,
        channel: ChannelKind,
        cursor: i64,
    ) -> Result<(), StoreError> {
        self.with(move |c| upsert_cursor(c, channel, cursor)).await
    }

    pub async fn cursor(&self, channel: ChannelKind) -> Result<Option<i64>, StoreError> {
        self.with(move |c| {
            Ok(
                c.prepare_cached("SELECT cursor FROM channel_cursors WHERE channel = ?1")?
                    .query_row(params![channel.as_str()], |r| r.get(0))
                    .optional()?,
            )
        })
        .await
    }

    /// The ids of the user's unanswered messages, oldest first (at most `limit`).
    pub async fn pending_inbox_ids(
        &self,
        user: &UserId,
        limit: usize,
    ) -> Result<Vec<i64>, StoreError> {
        let user = user.clone();
        self.read(move |c| {
            let mut statement = c.prepare_cached(&format!(
                "SELECT id FROM inbox WHERE user_id = ?1 AND done_at IS NULL ORDER BY id LIMIT {limit}"
            ))?;
            let ids = statement
                .query_map(params![user.as_str()], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            Ok(ids)
        })
        .await
    }

    /// The user's unanswered messages, oldest first.
    pub async fn pending_inbox(
        &self,
        user: &UserId,
        limit: usize,
    ) -> Result<Vec<InboxItem>, StoreError> {
        let user = user.clone();
        self.read(move |c| {
            let mut statement = c.prepare_cached(&format!(
                "SELECT id, channel, user_id, chat_id, text, sender_name, language_code, received_at, reminder, attachments
                 FROM inbox WHERE user_id = ?1 AND done_at IS NULL ORDER BY id LIMIT {limit}"
            ))?;
            let rows = statement.query_map(params![user.as_str()], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, Option<String>>(8)?,
                    r.get::<_, Option<String>>(9)?,
                ))
            })?;
            let mut items = Vec::new();
            for row in rows {
                let (id, channel, user_id, chat_id, text, sender_name, language_code, received_at, reminder, attachments) =
                    row?;
                let reminder = reminder
                    .map(|json| {
                        serde_json::from_str(&json)
                            .map_err(|e| StoreError::Corrupt(format!("inbox row {id}: {e}")))
                    })
                    .transpose()?;
                // A row that cannot be read back still gets answered; the files it named are
                // reported lost rather than blocking the user's queue.
                let attachments = match attachments {
                    None => Vec::new(),
                    Some(json) => serde_json::from_str(&json).unwrap_or_else(|e| {
                        tracing::warn!(inbox = id, error = %e, "unreadable attachment list");
                        Vec::new()
                    }),
                };
                items.push(InboxItem {
                    id,
                    channel: parse_channel(&channel)?,
                    user: parse_user(user_id)?,
                    chat_id,
                    text,
                    sender_name,
                    language_code,
                    received_at,
                    reminder,
                    attachments,
                });
            }
            Ok(items)
        })
        .await
    }

    /// Users with unanswered messages (startup recovery after a crash).
    pub async fn users_with_pending_inbox(&self) -> Result<Vec<UserId>, StoreError> {
        self.with(|c| {
            let ids: Vec<String> = c
                .prepare(
                    "SELECT DISTINCT user_id FROM inbox WHERE done_at IS NULL ORDER BY user_id",
                )?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            ids.into_iter().map(parse_user).collect()
        })
        .await
    }

    /// Marks an inbox row answered without a turn (e.g. a chat command that needs no model).
    /// Writes nothing when the row is gone or answered ([`Completion::Discarded`]). A reply is
    /// queued `pending`, for [`Store::claim_outbox`].
    pub async fn finish_inbox_with_reply(
        &self,
        inbox_id: i64,
        user: &UserId,
        reply: Option<(ChannelKind, String, String)>,
    ) -> Result<Completion, StoreError> {
        let user = user.clone();
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let completion =
                finish_inbox_in(&tx, inbox_id, &user, reply.as_ref(), Outbound::Pending)?;
            tx.commit()?;
            Ok(completion)
        })
        .await
    }

    /// [`Store::finish_inbox_with_reply`] for a reply its caller sends right away: the reply's
    /// row is committed already claimed (`sending`, see [`Store::complete_turn_claimed`]).
    pub async fn finish_inbox_with_claimed_reply(
        &self,
        inbox_id: i64,
        user: &UserId,
        reply: Option<(ChannelKind, String, String)>,
    ) -> Result<Completion, StoreError> {
        if reply.is_none() {
            return self.finish_inbox_with_reply(inbox_id, user, None).await;
        }
        let user = user.clone();
        self.durably(move |c| {
            finish_inbox_in(c, inbox_id, &user, reply.as_ref(), Outbound::Claimed)
        })
        .await
    }

    /// Commits a finished turn: transcript items, usage, the reply and the inbox row's
    /// completion, in one transaction. Returns the outbox id of the reply, queued `pending`
    /// for [`Store::claim_outbox`]. Commits nothing when the inbox row is gone — its user was
    /// removed or reset while the turn ran — or was answered already
    /// ([`Completion::Discarded`]).
    pub async fn complete_turn(&self, turn: TurnRecord) -> Result<Completion, StoreError> {
        // In the round's group commit: under load many users' turns share one commit.
        self.db
            .run_grouped(move |c| complete_turn_in(c, &turn, Outbound::Pending))
            .await
    }

    /// [`Store::complete_turn`] for a turn whose caller sends the reply right away: the
    /// reply's row is committed already claimed (`sending`, its text not kept: the transcript
    /// has it), in a fsynced group commit, so the turn and the claim cost one commit where
    /// they cost two. What a crash can do is unchanged: before this returns, nothing of the
    /// turn is committed and the message is answered again after restart; after, the row is
    /// `sending` and is never sent twice (at most once), exactly as after a separate claim.
    /// Without a reply it is [`Store::complete_turn`] (nothing leaves the gateway, so nothing
    /// needs the fsync).
    pub async fn complete_turn_claimed(&self, turn: TurnRecord) -> Result<Completion, StoreError> {
        if turn.reply.is_none() {
            return self.complete_turn(turn).await;
        }
        self.durably(move |c| complete_turn_in(c, &turn, Outbound::Claimed))
            .await
    }

    /// Queues a message that answers no inbox row (pairing codes, notices).
    pub async fn enqueue_outbound(
        &self,
        user: Option<&UserId>,
        channel: ChannelKind,
        chat_id: &str,
        text: &str,
    ) -> Result<i64, StoreError> {
        let user = user.cloned();
        let chat_id = chat_id.to_string();
        let text = text.to_string();
        self.with(move |c| insert_outbox(c, None, user.as_ref(), channel, &chat_id, &text))
            .await
    }

    /// Replies not yet handed to their channel, oldest first. Rows in state `sending` (a crash
    /// happened while handing them over) are not returned: delivery is at most once.
    pub async fn pending_outbox(&self, limit: usize) -> Result<Vec<OutboxItem>, StoreError> {
        self.with(move |c| {
            let mut statement = c.prepare_cached(&format!(
                "SELECT id, inbox_id, user_id, channel, chat_id, text FROM outbox WHERE state = 'pending' ORDER BY id LIMIT {limit}"
            ))?;
            let rows = statement.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })?;
            let mut items = Vec::new();
            for row in rows {
                let (id, inbox_id, user, channel, chat_id, text) = row?;
                items.push(OutboxItem {
                    id,
                    inbox_id,
                    user: user.map(parse_user).transpose()?,
                    channel: parse_channel(&channel)?,
                    chat_id,
                    text,
                });
            }
            Ok(items)
        })
        .await
    }

    /// Claims a pending outbox row for sending (`pending` → `sending`). Returns false when
    /// another worker or process claimed it first, so a reply is never handed over twice.
    pub async fn claim_outbox(&self, id: i64) -> Result<bool, StoreError> {
        self.durably(move |c| {
            let claimed = c.prepare_cached("UPDATE outbox SET state = 'sending', updated_at = ?2 WHERE id = ?1 AND state = 'pending'")?.execute(
                params![id, now_millis()],
            )?;
            Ok(claimed == 1)
        })
        .await
    }

    /// Whether an inbox row still waits for its answer (another process may have answered it).
    pub async fn inbox_is_pending(&self, id: i64) -> Result<bool, StoreError> {
        self.with(move |c| {
            Ok(
                c.prepare_cached("SELECT done_at IS NULL FROM inbox WHERE id = ?1")?
                    .query_row(params![id], |r| r.get(0))
                    .optional()?
                    .unwrap_or(false),
            )
        })
        .await
    }

    /// Sets an outbox row's state (`sending`, `sent`, `failed`) with an optional detail. A
    /// reply to a stranger (no user, no inbox row: a pairing reply) is deleted instead once it
    /// is `sent` or `failed`: nothing of a stranger is kept past its delivery (their pending
    /// code is in `pairing_requests`).
    pub async fn set_outbox_state(
        &self,
        id: i64,
        state: &'static str,
        detail: Option<String>,
    ) -> Result<(), StoreError> {
        self.with(move |c| {
            if matches!(state, "sent" | "failed") {
                let deleted = c
                    .prepare_cached(
                        "DELETE FROM outbox WHERE id = ?1 AND user_id IS NULL AND inbox_id IS NULL",
                    )?
                    .execute(params![id])?;
                if deleted > 0 {
                    return Ok(());
                }
            }
            c.prepare_cached(
                "UPDATE outbox SET state = ?2, detail = ?3, updated_at = ?4 WHERE id = ?1",
            )?
            .execute(params![id, state, detail, now_millis()])?;
            Ok(())
        })
        .await
    }

    /// [`Store::set_outbox_state`] for a row its caller has sent (or failed to send): recorded
    /// with the next group commit, or within [`crate::durable::LATER_WAIT`], not waited for.
    /// Nothing decides on the state after `sending` (the row is never sent again either way),
    /// so a crash that loses the record loses only the record. Returns at once.
    pub fn set_outbox_state_later(
        &self,
        id: i64,
        state: &'static str,
        detail: Option<String>,
    ) -> Result<(), StoreError> {
        self.db.run_later(move |c| {
            c.prepare_cached(
                "UPDATE outbox SET state = ?2, detail = ?3, updated_at = ?4 WHERE id = ?1",
            )?
            .execute(params![id, state, detail, now_millis()])?;
            Ok(())
        })
    }

    /// Count of outbox rows per state, for tests and health.
    pub async fn outbox_states(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.with(|c| {
            let rows = c
                .prepare("SELECT state, COUNT(*) FROM outbox GROUP BY state ORDER BY state")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
        .await
    }

    // ---- sessions and transcripts -----------------------------------------------------------

    /// The user's open session, created if there is none. A user who does not exist (removed
    /// while a turn of theirs was starting) is [`StoreError::NotFound`]: a session never
    /// brings a removed user back.
    pub async fn current_session(&self, user: &UserId) -> Result<SessionRecord, StoreError> {
        let user = user.clone();
        // An open session is the rule: read on the caller's thread; only a new one is written.
        let known = user.clone();
        if let Some(session) = self.read(move |c| open_session(c, &known)).await? {
            return Ok(session);
        }
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let session = match open_session(&tx, &user)? {
                Some(session) => session,
                None => {
                    let now = now_millis();
                    let id = new_session_id();
                    if !user_exists(&tx, &user)? {
                        return Err(StoreError::NotFound(format!("no user {user}")));
                    }
                    tx.prepare_cached("INSERT INTO sessions (id, user_id, started_at, last_active) VALUES (?1, ?2, ?3, ?3)")?.execute(
                        params![id, user.as_str(), now],
                    )?;
                    SessionRecord { id, user: user.clone(), started_at: now, last_active: now, summary: None }
                }
            };
            tx.commit()?;
            Ok(session)
        })
        .await
    }

    /// Ends the user's open session (`/reset`, idle reset). Transcripts are kept.
    pub async fn end_session(&self, user: &UserId) -> Result<Option<String>, StoreError> {
        let user = user.clone();
        self.with(move |c| {
            let id: Option<String> = c
                .prepare_cached("SELECT id FROM sessions WHERE user_id = ?1 AND ended_at IS NULL ORDER BY started_at DESC LIMIT 1")?.query_row(
                    params![user.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            c.prepare_cached("UPDATE sessions SET ended_at = ?2 WHERE user_id = ?1 AND ended_at IS NULL")?.execute(
                params![user.as_str(), now_millis()],
            )?;
            Ok(id)
        })
        .await
    }

    /// Replaces a session's transcript before `keep_from_id` with a summary (compaction).
    pub async fn compact_session(
        &self,
        session_id: &str,
        summary: &str,
        keep_from_id: i64,
    ) -> Result<(), StoreError> {
        let session_id = session_id.to_string();
        let summary = summary.to_string();
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.prepare_cached("UPDATE sessions SET summary = ?2 WHERE id = ?1")?
                .execute(params![session_id, summary])?;
            tx.prepare_cached("DELETE FROM transcript WHERE session_id = ?1 AND id < ?2")?
                .execute(params![session_id, keep_from_id])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// A session's transcript items with their row ids, oldest first.
    pub async fn transcript(
        &self,
        session_id: &str,
    ) -> Result<Vec<(i64, ConversationItem)>, StoreError> {
        let session_id = session_id.to_string();
        self.with(move |c| {
            let mut statement = c.prepare_cached(
                "SELECT id, item FROM transcript WHERE session_id = ?1 ORDER BY id",
            )?;
            let rows = statement.query_map(params![session_id], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut items = Vec::new();
            for row in rows {
                let (id, json) = row?;
                let item = serde_json::from_str(&json)
                    .map_err(|e| StoreError::Corrupt(format!("transcript row {id}: {e}")))?;
                items.push((id, item));
            }
            Ok(items)
        })
        .await
    }

    /// Every transcript item of a user across sessions (export), oldest first.
    pub async fn user_transcripts(
        &self,
        user: &UserId,
    ) -> Result<Vec<(String, i64, ConversationItem)>, StoreError> {
        let user = user.clone();
        self.with(move |c| {
            let mut statement = c.prepare(
                "SELECT session_id, created_at, item FROM transcript WHERE user_id = ?1 ORDER BY id",
            )?;
            let rows = statement.query_map(params![user.as_str()], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?))
            })?;
            let mut items = Vec::new();
            for row in rows {
                let (session, at, json) = row?;
                let item = serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                items.push((session, at, item));
            }
            Ok(items)
        })
        .await
    }

    /// A user's transcript rows after `after_id` (row id, unix millis, item), oldest first, at
    /// most `limit` (the memory index catches up with these).
    pub async fn transcript_since(
        &self,
        user: &UserId,
        after_id: i64,
        limit: usize,
        max_bytes: u64,
    ) -> Result<Vec<(i64, i64, ConversationItem)>, StoreError> {
        let user = user.clone();
        self.with(move |c| {
            let mut statement = c.prepare_cached(&format!(
                "SELECT id, created_at, item FROM transcript WHERE user_id = ?1 AND id > ?2 ORDER BY id LIMIT {limit}"
            ))?;
            let rows = statement.query_map(params![user.as_str(), after_id], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?))
            })?;
            let mut items = Vec::new();
            let mut bytes: u64 = 0;
            for row in rows {
                let (id, at, json) = row?;
                // Bounded in bytes as well as rows (the first row always comes, so a caller
                // paging with it makes progress).
                bytes = bytes.saturating_add(json.len() as u64);
                if bytes > max_bytes && !items.is_empty() {
                    break;
                }
                let item = serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(format!("transcript row {id}: {e}")))?;
                items.push((id, at, item));
            }
            Ok(items)
        })
        .await
    }

    // ---- pairing ----------------------------------------------------------------------------

    /// The sender's pending, unexpired pairing request, or a new one with a fresh code.
    /// Returns the request and whether it was created now. Uncapped: the gateway uses
    /// [`Store::pairing_for_stranger`], which bounds what strangers can create.
    pub async fn pairing_request_for(
        &self,
        identity: &Identity,
        chat_id: &str,
        sender_name: Option<&str>,
        ttl: Duration,
    ) -> Result<(PairingRequest, bool), StoreError> {
        let identity = identity.clone();
        let chat_id = chat_id.to_string();
        let sender_name = sender_name.map(str::to_string);
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = now_millis();
            let result = match crate::pairing::pending_request(&tx, &identity, now)? {
                Some(request) => (request, false),
                None => (
                    crate::pairing::insert_request(
                        &tx,
                        &identity,
                        &chat_id,
                        sender_name,
                        now,
                        ttl,
                    )?,
                    true,
                ),
            };
            tx.commit()?;
            Ok(result)
        })
        .await
    }

    /// Pending, unexpired requests, newest first.
    pub async fn pending_pairing_requests(&self) -> Result<Vec<PairingRequest>, StoreError> {
        self.with(|c| {
            let mut statement = c.prepare(
                "SELECT code, channel, peer, chat_id, sender_name, created_at, expires_at, state FROM pairing_requests
                 WHERE state = 'pending' AND expires_at > ?1 ORDER BY created_at DESC",
            )?;
            let rows = statement.query_map(params![now_millis()], pairing_row)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(pairing_from_row(row?)?);
            }
            Ok(out)
        })
        .await
    }

    /// Approves (or denies) a pending, unexpired request by channel and code. On approval the
    /// sender's identity is linked to `user` (source `pairing`). Codes are single use.
    pub async fn decide_pairing(
        &self,
        channel: ChannelKind,
        code: &str,
        approve: bool,
        user_for: impl FnOnce(&Identity) -> UserId + Send + 'static,
    ) -> Result<(PairingRequest, Option<UserId>), StoreError> {
        let code = code.trim().to_ascii_uppercase();
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let row = tx
                .prepare_cached("SELECT code, channel, peer, chat_id, sender_name, created_at, expires_at, state FROM pairing_requests
                     WHERE code = ?1 AND channel = ?2")?.query_row(
                    params![code, channel.as_str()],
                    pairing_row,
                )
                .optional()?;
            let Some(row) = row else {
                return Err(StoreError::NotFound(format!("no pairing request with code {code} on {channel}")));
            };
            let mut request = pairing_from_row(row)?;
            if request.state != PairingState::Pending {
                return Err(StoreError::NotFound(format!(
                    "pairing code {code} was already {}",
                    request.state.as_str()
                )));
            }
            if request.expires_at <= now_millis() {
                return Err(StoreError::NotFound(format!("pairing code {code} has expired; ask the sender to write again for a new one")));
            }
            let state = if approve { PairingState::Approved } else { PairingState::Denied };
            tx.prepare_cached("UPDATE pairing_requests SET state = ?2 WHERE code = ?1")?.execute( params![code, state.as_str()])?;
            request.state = state;
            let user = if approve {
                let user = user_for(&request.identity);
                let now = now_millis();
                tx.prepare_cached("INSERT OR IGNORE INTO users (id, display_name, created_at) VALUES (?1, ?2, ?3)")?.execute(
                    params![user.as_str(), request.sender_name, now],
                )?;
                tx.prepare_cached("INSERT INTO identities (channel, peer, user_id, source, created_at) VALUES (?1, ?2, ?3, 'pairing', ?4)
                     ON CONFLICT (channel, peer) DO UPDATE SET user_id = excluded.user_id, source = 'pairing'")?.execute(
                    params![request.identity.channel.as_str(), request.identity.peer.as_str(), user.as_str(), now],
                )?;
                Some(user)
            } else {
                None
            };
            tx.commit()?;
            Ok((request, user))
        })
        .await
    }

    /// Revokes every pairing-made link of a user (the user must pair again).
    pub async fn revoke_pairings(&self, user: &UserId) -> Result<usize, StoreError> {
        let user = user.clone();
        self.with(move |c| {
            Ok(c.prepare_cached(
                "DELETE FROM identities WHERE user_id = ?1 AND source = 'pairing'",
            )?
            .execute(params![user.as_str()])?)
        })
        .await
    }

    // ---- usage and audit --------------------------------------------------------------------

    pub async fn record_audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.with(move |c| {
            c.prepare_cached(
                "INSERT INTO audit_events (user_id, kind, tool, args_digest, duration_ms, outcome, detail, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                event.user.as_str(),
                event.kind,
                event.tool,
                event.args_digest,
                event.duration_ms,
                event.outcome,
                event.detail,
                now_millis()
            ])?;
            Ok(())
        })
        .await
    }

    /// The newest audit events, optionally of one user.
    pub async fn recent_audit(
        &self,
        user: Option<&UserId>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let user = user.map(|u| u.as_str().to_string());
        self.with(move |c| {
            let mut statement = c.prepare(&format!(
                "SELECT id, user_id, kind, tool, args_digest, duration_ms, outcome, detail, at FROM audit_events
                 WHERE ?1 IS NULL OR user_id = ?1 ORDER BY id DESC LIMIT {limit}"
            ))?;
            let rows = statement.query_map(params![user], |r| {
                Ok(AuditRecord {
                    id: r.get(0)?,
                    user: r.get(1)?,
                    kind: r.get(2)?,
                    tool: r.get(3)?,
                    args_digest: r.get(4)?,
                    duration_ms: r.get(5)?,
                    outcome: r.get(6)?,
                    detail: r.get(7)?,
                    at: r.get(8)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Token usage summed per user, provider and model. Calls of an earlier user of the same
    /// id (removed, then a new user given the id) are not counted for the current one: they
    /// happened before the current user row was created. They stay in the table as the
    /// operator's record.
    pub async fn usage(&self, user: Option<&UserId>) -> Result<Vec<UsageRow>, StoreError> {
        let user = user.map(|u| u.as_str().to_string());
        self.with(move |c| {
            let mut statement = c.prepare(
                "SELECT t.user_id, t.provider, t.model, CAST(MIN(total(t.input_tokens), 9007199254740992.0) AS INTEGER),
                        CAST(MIN(total(t.output_tokens), 9007199254740992.0) AS INTEGER), COUNT(*)
                 FROM token_usage t LEFT JOIN users u ON u.id = t.user_id
                 WHERE (?1 IS NULL OR t.user_id = ?1) AND (u.created_at IS NULL OR t.at >= u.created_at)
                 GROUP BY t.user_id, t.provider, t.model ORDER BY t.user_id, t.provider, t.model",
            )?;
            let rows = statement.query_map(params![user], |r| {
                Ok(UsageRow {
                    user: r.get(0)?,
                    provider: r.get(1)?,
                    model: r.get(2)?,
                    input_tokens: r.get(3)?,
                    output_tokens: r.get(4)?,
                    calls: r.get(5)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }
}

type PairingRow = (
    String,
    String,
    String,
    String,
    Option<String>,
    i64,
    i64,
    String,
);

fn pairing_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PairingRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
    ))
}

fn pairing_from_row(row: PairingRow) -> Result<PairingRequest, StoreError> {
    let (code, channel, peer, chat_id, sender_name, created_at, expires_at, state) = row;
    Ok(PairingRequest {
        code,
        identity: parse_identity(&channel, peer)?,
        chat_id,
        sender_name,
        created_at,
        expires_at,
        state: PairingState::parse(&state)?,
    })
}

fn load_user(c: &Connection, user: &UserId) -> Result<Option<UserRecord>, StoreError> {
    let row: Option<(Option<String>, i64, bool)> = c
        .prepare_cached("SELECT display_name, created_at, onboarded FROM users WHERE id = ?1")?
        .query_row(params![user.as_str()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let Some((display_name, created_at, onboarded)) = row else {
        return Ok(None);
    };
    let mut statement = c.prepare_cached(
        "SELECT channel, peer FROM identities WHERE user_id = ?1 ORDER BY channel, peer",
    )?;
    let pairs: Vec<(String, String)> = statement
        .query_map(params![user.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let identities = pairs
        .into_iter()
        .map(|(ch, peer)| parse_identity(&ch, peer))
        .collect::<Result<_, _>>()?;
    Ok(Some(UserRecord {
        id: user.clone(),
        display_name,
        created_at,
        onboarded,
        identities,
    }))
}

/// Whose sandbox id a row of `sandbox_ids` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdHolder {
    User,
    Family,
}

impl IdHolder {
    fn as_str(self) -> &'static str {
        match self {
            IdHolder::User => "user",
            IdHolder::Family => "family",
        }
    }
}

pub(crate) fn retire_sandbox_ids(c: &Connection, user: &UserId) -> Result<(), StoreError> {
    c.prepare_cached("UPDATE sandbox_ids SET retired_at = ?2 WHERE kind = 'user' AND name = ?1 AND retired_at IS NULL")?.execute(
        params![user.as_str(), now_millis()],
    )?;
    Ok(())
}

/// The live id of `name`, allocating the next unused one of `range` when it has none. Ids only
/// ever grow: the next one is above every id of the range ever handed out (retired ones too).
/// The user's open session, if any.
fn open_session(c: &Connection, user: &UserId) -> Result<Option<SessionRecord>, StoreError> {
    Ok(c.prepare_cached(
        "SELECT id, started_at, last_active, summary FROM sessions
         WHERE user_id = ?1 AND ended_at IS NULL ORDER BY started_at DESC LIMIT 1",
    )?
    .query_row(params![user.as_str()], |r| {
        Ok(SessionRecord {
            id: r.get(0)?,
            user: user.clone(),
            started_at: r.get(1)?,
            last_active: r.get(2)?,
            summary: r.get(3)?,
        })
    })
    .optional()?)
}

pub(crate) fn user_exists(c: &Connection, user: &UserId) -> Result<bool, StoreError> {
    Ok(
        c.prepare_cached("SELECT EXISTS (SELECT 1 FROM users WHERE id = ?1)")?
            .query_row(params![user.as_str()], |r| r.get(0))?,
    )
}

/// The live sandbox id of `name`, if it has one.
fn live_sandbox_id(
    c: &Connection,
    holder: IdHolder,
    name: &str,
) -> Result<Option<u32>, StoreError> {
    let live: Option<i64> = c
        .prepare_cached(
            "SELECT host_id FROM sandbox_ids WHERE kind = ?1 AND name = ?2 AND retired_at IS NULL",
        )?
        .query_row(params![holder.as_str(), name], |r| r.get(0))
        .optional()?;
    live.map(|id| {
        u32::try_from(id)
            .map_err(|_| StoreError::Corrupt(format!("sandbox id {id} of {name} is out of range")))
    })
    .transpose()
}

fn sandbox_id(
    c: &mut Connection,
    holder: IdHolder,
    name: &str,
    range: UidRange,
) -> Result<u32, StoreError> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if let Some(id) = live_sandbox_id(&tx, holder, name)? {
        return Ok(id);
    }
    if let Some(problem) = range.problem() {
        return Err(StoreError::SandboxIds(format!(
            "sandbox.uidRange: {problem}"
        )));
    }
    let highest: Option<i64> = tx
        .prepare_cached(
            "SELECT MAX(host_id) FROM sandbox_ids WHERE host_id >= ?1 AND host_id < ?2",
        )?
        .query_row(params![i64::from(range.start), range.end() as i64], |r| {
            r.get(0)
        })?;
    let next = highest.map_or(i64::from(range.start), |h| h + 1);
    if next >= range.end() as i64 {
        return Err(StoreError::SandboxIds(format!(
            "sandbox.uidRange ({} + {}) is used up: every id in it was given out once and is never reused; configure a larger or another range",
            range.start, range.count
        )));
    }
    tx.prepare_cached(
        "INSERT INTO sandbox_ids (kind, name, host_id, created_at) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![holder.as_str(), name, next, now_millis()])?;
    tx.commit()?;
    u32::try_from(next)
        .map_err(|_| StoreError::Corrupt(format!("sandbox id {next} is out of range")))
}

pub(crate) fn upsert_cursor(
    c: &Connection,
    channel: ChannelKind,
    cursor: i64,
) -> Result<(), StoreError> {
    c.prepare_cached(
        "INSERT INTO channel_cursors (channel, cursor) VALUES (?1, ?2)
         ON CONFLICT (channel) DO UPDATE SET cursor = MAX(cursor, excluded.cursor)",
    )?
    .execute(params![channel.as_str(), cursor])?;
    Ok(())
}

/// Stores an accepted message for `user`. The inbox id, or `None` when this delivery (channel
/// and external id) was stored before.
pub(crate) fn insert_inbox_row(
    c: &Connection,
    message: &InboundMessage,
    user: &UserId,
) -> Result<Option<i64>, StoreError> {
    // Attachment references (JSON), downloaded later by the user's worker; NULL for text.
    let attachments = if message.attachments.is_empty() {
        None
    } else {
        Some(
            serde_json::to_string(&message.attachments)
                .map_err(|e| StoreError::Corrupt(format!("attachments: {e}")))?,
        )
    };
    let inserted = c
        .prepare_cached(
            "INSERT OR IGNORE INTO inbox (channel, external_id, user_id, chat_id, text, sender_name, language_code, received_at, attachments)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?
        .execute(params![
            message.sender.channel.as_str(),
            message.external_id,
            user.as_str(),
            message.chat_id,
            message.text,
            message.sender_name,
            message.language_code,
            now_millis(),
            attachments
        ])?;
    Ok((inserted == 1).then(|| c.last_insert_rowid()))
}

/// Deletes the user's inbox rows answered and outbox rows claimed longer than
/// [`crate::usage::ANSWERED_ROW_RETENTION`] ago (their texts are long gone). Two index range
/// scans, run with each answered message, so the rows a user leaves are bounded by what they
/// can send in the retention period.
fn prune_answered_rows(c: &Connection, user: &UserId, now: i64) -> Result<(), StoreError> {
    let before = now.saturating_sub(
        i64::try_from(crate::usage::ANSWERED_ROW_RETENTION.as_millis()).unwrap_or(i64::MAX),
    );
    c.prepare_cached(
        "DELETE FROM inbox WHERE user_id = ?1 AND done_at IS NOT NULL AND done_at < ?2",
    )?
    .execute(params![user.as_str(), before])?;
    c.prepare_cached(
        "DELETE FROM outbox WHERE user_id = ?1 AND state <> 'pending' AND updated_at < ?2",
    )?
    .execute(params![user.as_str(), before])?;
    Ok(())
}

pub(crate) fn insert_outbox(
    c: &Connection,
    inbox_id: Option<i64>,
    user: Option<&UserId>,
    channel: ChannelKind,
    chat_id: &str,
    text: &str,
) -> Result<i64, StoreError> {
    let now = now_millis();
    c.prepare_cached(
        "INSERT INTO outbox (inbox_id, user_id, channel, chat_id, text, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
    )?
    .execute(params![inbox_id, user.map(UserId::as_str), channel.as_str(), chat_id, text, now])?;
    Ok(c.last_insert_rowid())
}

/// How a reply's outbox row is committed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outbound {
    /// `pending`, with its text: handed over later by whoever claims it.
    Pending,
    /// `sending`, without its text: its caller hands it over right after the commit.
    Claimed,
}

/// The body of [`Store::finish_inbox_with_reply`], inside the caller's transaction.
fn finish_inbox_in(
    c: &Connection,
    inbox_id: i64,
    user: &UserId,
    reply: Option<&(ChannelKind, String, String)>,
    outbound: Outbound,
) -> Result<Completion, StoreError> {
    if !crate::ending::inbox_row_pending(c, inbox_id)? {
        return Ok(Completion::Discarded);
    }
    let outbox = match reply {
        Some((channel, chat_id, text)) => Some(insert_reply(
            c, inbox_id, user, *channel, chat_id, text, outbound,
        )?),
        None => None,
    };
    let now = now_millis();
    c.prepare_cached("UPDATE inbox SET done_at = ?2 WHERE id = ?1")?
        .execute(params![inbox_id, now])?;
    prune_answered_rows(c, user, now)?;
    Ok(Completion::Committed(outbox))
}

/// The body of [`Store::complete_turn`], inside the caller's transaction.
fn complete_turn_in(
    c: &Connection,
    turn: &TurnRecord,
    outbound: Outbound,
) -> Result<Completion, StoreError> {
    // The model was called: its charge stands even when the turn is discarded (a reset keeps
    // what was spent; a removed user is charged nothing, see `charge_usage`).
    if let Some(deferred) = &turn.charge {
        if !crate::usage::charge_usage(
            c,
            &turn.user,
            &deferred.day,
            deferred.charge,
            deferred.since,
        )? {
            tracing::info!(user = %turn.user, "usage of a turn whose user was removed is not charged to anyone");
        }
    }
    if !crate::ending::inbox_row_pending(c, turn.inbox_id)? {
        return Ok(Completion::Discarded);
    }
    let now = now_millis();
    {
        let mut insert = c.prepare_cached(
            "INSERT INTO transcript (session_id, user_id, item, created_at) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for item in &turn.items {
            let json =
                serde_json::to_string(item).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            insert.execute(params![turn.session_id, turn.user.as_str(), json, now])?;
        }
        let mut usage = c.prepare_cached(
            "INSERT INTO token_usage (user_id, provider, model, input_tokens, output_tokens, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for (provider, model, u) in &turn.usage {
            usage.execute(params![
                turn.user.as_str(),
                provider,
                model,
                crate::usage::to_i64(u.input_tokens),
                crate::usage::to_i64(u.output_tokens),
                now
            ])?;
        }
    }
    c.prepare_cached("UPDATE sessions SET last_active = ?2 WHERE id = ?1")?
        .execute(params![turn.session_id, now])?;
    let outbox = match &turn.reply {
        Some((channel, chat_id, text)) => Some(insert_reply(
            c,
            turn.inbox_id,
            &turn.user,
            *channel,
            chat_id,
            text,
            outbound,
        )?),
        None => None,
    };
    c.prepare_cached("UPDATE inbox SET done_at = ?2 WHERE id = ?1")?
        .execute(params![turn.inbox_id, now])?;
    prune_answered_rows(c, &turn.user, now)?;
    Ok(Completion::Committed(outbox))
}

/// The outbox row of a reply to inbox row `inbox_id`.
fn insert_reply(
    c: &Connection,
    inbox_id: i64,
    user: &UserId,
    channel: ChannelKind,
    chat_id: &str,
    text: &str,
    outbound: Outbound,
) -> Result<i64, StoreError> {
    match outbound {
        Outbound::Pending => insert_outbox(c, Some(inbox_id), Some(user), channel, chat_id, text),
        Outbound::Claimed => {
            let now = now_millis();
            c.prepare_cached(
                "INSERT INTO outbox (inbox_id, user_id, channel, chat_id, text, state, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, '', 'sending', ?5, ?5)",
            )?
            .execute(params![inbox_id, user.as_str(), channel.as_str(), chat_id, now])?;
            Ok(c.last_insert_rowid())
        }
    }
}

/// Bytes of a transaction's statement journal (the old content of the pages a savepoint may
/// roll back to) SQLite keeps in memory before it moves the journal to a temporary file.
///
/// **Why.** Every piece of a group commit runs in its own savepoint ([`crate::durable`]), so
/// a turn's commit journals the ~16 pages it changes. SQLite's default of 64 KiB is just under
/// that: every such commit created, wrote and deleted a file in the temporary directory
/// (~9 writes, an `open` and an `unlink` per message). 1 MiB holds any hot-path group; it is
/// memory of the one writing connection, only while its transaction runs, and what is larger
/// (an operator's bulk delete) still spills to a file as before.
const STATEMENT_JOURNAL_IN_MEMORY_BYTES: std::os::raw::c_int = 1024 * 1024;

/// Process-wide SQLite settings; for the binary's `main`, before any thread uses SQLite
/// (`sqlite3_config` may only be called then). Called later it changes nothing (SQLite
/// refuses with `SQLITE_MISUSE`), which loses only the optimisation: never an error.
pub fn configure_sqlite_before_use() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: `SQLITE_CONFIG_STMTJRNL_SPILL` takes exactly one C `int`, which is what is
        // passed; the caller's contract (no other thread uses SQLite yet) is what
        // `sqlite3_config` requires, and if SQLite is already initialised it returns
        // `SQLITE_MISUSE` without touching anything.
        let rc = unsafe {
            rusqlite::ffi::sqlite3_config(
                rusqlite::ffi::SQLITE_CONFIG_STMTJRNL_SPILL,
                STATEMENT_JOURNAL_IN_MEMORY_BYTES,
            )
        };
        if rc != rusqlite::ffi::SQLITE_OK {
            tracing::debug!(
                code = rc,
                "SQLite already initialised; statement journals spill at its default size"
            );
        }
    });
}

/// Checkpoints the WAL from its own connection every 200 ms while the store is alive. PASSIVE
/// checkpoints never block the writer; they copy committed pages into the database file and fsync
/// it, which keeps the WAL short without putting that cost on a message's latency.
fn start_checkpointer(path: &Path, store: std::sync::Weak<()>) {
    let path = path.to_path_buf();
    let spawned = std::thread::Builder::new().name("moltmate-checkpoint".into()).spawn(move || {
        let connection = match Connection::open(&path) {
            Ok(connection) => connection,
            Err(e) => {
                tracing::warn!(error = %e, "no background checkpointer; the WAL grows until restart");
                return;
            }
        };
        let _ = connection.busy_timeout(Duration::from_secs(1));
        while store.strong_count() > 0 {
            std::thread::sleep(Duration::from_millis(200));
            if let Err(e) = connection.execute_batch("PRAGMA wal_checkpoint(PASSIVE)") {
                tracing::debug!(error = %e, "checkpoint skipped");
            }
        }
        // Last one, so a clean shutdown leaves a short WAL.
        let _ = connection.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the checkpoint thread");
    }
}

/// [`StoreError::TooNew`] when the database was made by a newer moltmate; reads only.
fn refuse_newer(c: &Connection) -> Result<(), StoreError> {
    let has_version: bool = c
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'",
            [],
            |_| Ok(true),
        )
        .optional()?
        .unwrap_or(false);
    if !has_version {
        return Ok(());
    }
    supported(stored_version(c)?)
}

/// The schema version the database records (0 when it records none).
fn stored_version(c: &Connection) -> Result<i64, StoreError> {
    Ok(c.prepare_cached("SELECT version FROM schema_version")?
        .query_row([], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

/// [`StoreError::TooNew`] for a version made by a newer moltmate.
fn supported(found: i64) -> Result<(), StoreError> {
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

fn migrate(c: &mut Connection) -> Result<(), StoreError> {
    c.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let current = stored_version(c)?;
    apply_migrations_from(c, current)
}

/// Applies the migrations after `seen`, the version read before taking the write lock: each
/// one in its own `BEGIN IMMEDIATE` transaction that reads the version again first, so when
/// another process (the CLI next to a starting gateway) migrated the same database in between,
/// it is skipped instead of failing (an `ALTER TABLE ... ADD COLUMN` run twice is an error).
fn apply_migrations_from(c: &mut Connection, seen: i64) -> Result<(), StoreError> {
    supported(seen)?;
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(seen.max(0) as usize) {
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = stored_version(&tx)?;
        supported(now)?;
        if now > index as i64 {
            continue;
        }
        tx.execute_batch(migration)?;
        tx.prepare_cached("DELETE FROM schema_version")?
            .execute([])?;
        tx.prepare_cached("INSERT INTO schema_version (version) VALUES (?1)")?
            .execute(params![index as i64 + 1])?;
        tx.commit()?;
    }
    Ok(())
}

/// Copies the database at `source` into a new file `target` with SQLite's online backup API,
/// while a gateway keeps writing to it: the copy is the database as of one moment (one read
/// transaction; in WAL mode that never blocks the writer, and the writer never blocks it).
/// `target` must not exist; it is created 0600. The copy is checked with `PRAGMA
/// integrity_check` and must carry a schema this code can read. Blocking: call it from a
/// blocking context.
pub fn backup_database(source: &Path, target: &Path) -> Result<u64, StoreError> {
    use rusqlite::backup::{Backup, StepResult};
    use std::os::unix::fs::OpenOptionsExt;
    // Created first (0600, exclusively): SQLite would otherwise create it with the umask.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(target)?;
    let from = Connection::open_with_flags(
        source,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    from.busy_timeout(Duration::from_secs(10))?;
    let found = stored_version(&from)?;
    supported(found)?;
    let mut to = Connection::open(target)?;
    {
        let backup = Backup::new(&from, &mut to)?;
        // All pages in one step: one read transaction, so the copy is one consistent moment
        // however busy the writer is (page-wise steps restart whenever another connection
        // writes, which a busy gateway does every few milliseconds).
        let mut attempts = 0;
        loop {
            match backup.step(-1)? {
                StepResult::Done => break,
                StepResult::More => continue,
                StepResult::Busy | StepResult::Locked if attempts < 100 => {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                StepResult::Busy | StepResult::Locked => {
                    return Err(StoreError::Corrupt(
                        "the database stayed locked for 5 s; the backup gave up".to_string(),
                    ))
                }
                _ => continue,
            }
        }
    }
    // A standalone file: no WAL beside it.
    to.execute_batch("PRAGMA journal_mode = DELETE")?;
    let check: String = to.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if check != "ok" {
        return Err(StoreError::Corrupt(format!(
            "the database copy fails its integrity check: {check}"
        )));
    }
    drop(to);
    Ok(std::fs::metadata(target)?.len())
}

/// Checks a database file (a restored or backed-up copy) without changing it: it opens,
/// passes `PRAGMA integrity_check`, and its schema is one this code can migrate.
pub fn check_database(path: &Path) -> Result<i64, StoreError> {
    let c = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let check: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if check != "ok" {
        return Err(StoreError::Corrupt(format!(
            "the database fails its integrity check: {check}"
        )));
    }
    let found = stored_version(&c)?;
    supported(found)?;
    Ok(found)
}

fn set_owner_only(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        tracing::warn!(error = %e, "could not make the database file owner-only");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two processes opening an old database at once (the CLI next to a starting gateway):
    /// the one that read the old version before the other migrated skips what is already
    /// applied instead of failing on a second `ALTER TABLE ... ADD COLUMN`.
    #[test]
    fn migrations_another_process_applied_meanwhile_are_skipped_not_failed() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Connection::open(dir.path().join("m.db")).unwrap();
        migrate(&mut c).unwrap();
        apply_migrations_from(&mut c, 0).unwrap();
        let version: i64 = c
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    fn message(peer: &str, external: &str, text: &str, cursor: Option<i64>) -> InboundMessage {
        InboundMessage {
            sender: Identity::new(ChannelKind::Telegram, PeerId::new(peer).unwrap()),
            chat_id: peer.to_string(),
            external_id: external.to_string(),
            cursor,
            text: text.to_string(),
            sender_name: None,
            language_code: None,
            attachments: Vec::new(),
        }
    }

    #[tokio::test]
    async fn redelivered_message_is_stored_once_and_cursor_never_goes_back() {
        let store = Store::open_in_memory().unwrap();
        let user = UserId::new("telegram_1").unwrap();
        assert!(store
            .insert_inbound(&message("1", "10", "hi", Some(11)), &user)
            .await
            .unwrap()
            .is_some());
        assert!(store
            .insert_inbound(&message("1", "10", "hi", Some(11)), &user)
            .await
            .unwrap()
            .is_none());
        store
            .advance_cursor(ChannelKind::Telegram, 5)
            .await
            .unwrap();
        assert_eq!(store.cursor(ChannelKind::Telegram).await.unwrap(), Some(11));
        assert_eq!(store.pending_inbox(&user, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn completing_a_turn_is_atomic_and_outbox_is_at_most_once() {
        let store = Store::open_in_memory().unwrap();
        let user = UserId::new("telegram_1").unwrap();
        store.ensure_user(&user, None).await.unwrap();
        let inbox_id = store
            .insert_inbound(&message("1", "10", "hi", None), &user)
            .await
            .unwrap()
            .unwrap();
        let session = store.current_session(&user).await.unwrap();
        let outbox = store
            .complete_turn(TurnRecord {
                charge: None,
                inbox_id,
                user: user.clone(),
                session_id: session.id.clone(),
                items: vec![
                    ConversationItem::User { text: "hi".into() },
                    ConversationItem::Assistant {
                        text: "hello".into(),
                        tool_calls: vec![],
                    },
                ],
                reply: Some((ChannelKind::Telegram, "1".into(), "hello".into())),
                usage: vec![(
                    "anthropic".into(),
                    "m".into(),
                    TokenUsage {
                        input_tokens: 3,
                        output_tokens: 1,
                    },
                )],
            })
            .await
            .unwrap()
            .outbox()
            .unwrap();
        assert!(store.pending_inbox(&user, 10).await.unwrap().is_empty());
        assert_eq!(store.transcript(&session.id).await.unwrap().len(), 2);
        assert_eq!(store.pending_outbox(10).await.unwrap().len(), 1);
        store
            .set_outbox_state(outbox, "sending", None)
            .await
            .unwrap();
        assert!(
            store.pending_outbox(10).await.unwrap().is_empty(),
            "a row being sent is never resent"
        );
        assert_eq!(store.usage(Some(&user)).await.unwrap()[0].input_tokens, 3);
    }

    /// A turn whose reply is sent right away commits it claimed: one commit (fsynced, in a
    /// group) instead of the turn's and the claim's. Nothing can send it again, its text is not
    /// kept twice, and the outcome recorded after sending rides the next group commit.
    #[tokio::test]
    async fn a_turn_committed_with_its_reply_claimed_is_never_resent_and_keeps_no_reply_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let store = Store::open(&path).unwrap();
        let user = UserId::new("telegram_1").unwrap();
        store.ensure_user(&user, None).await.unwrap();
        let inbox_id = store
            .insert_inbound(&message("1", "10", "hi", None), &user)
            .await
            .unwrap()
            .unwrap();
        let session = store.current_session(&user).await.unwrap();
        let turn = || TurnRecord {
            charge: None,
            inbox_id,
            user: user.clone(),
            session_id: session.id.clone(),
            items: vec![
                ConversationItem::User { text: "hi".into() },
                ConversationItem::Assistant {
                    text: "hello".into(),
                    tool_calls: vec![],
                },
            ],
            reply: Some((ChannelKind::Telegram, "1".into(), "hello".into())),
            usage: vec![],
        };
        let outbox = store
            .complete_turn_claimed(turn())
            .await
            .unwrap()
            .outbox()
            .unwrap();
        assert!(store.pending_inbox(&user, 10).await.unwrap().is_empty());
        assert_eq!(store.transcript(&session.id).await.unwrap().len(), 2);
        assert!(
            store.pending_outbox(10).await.unwrap().is_empty(),
            "a claimed reply is never sent again, after a crash either"
        );
        assert!(!store.claim_outbox(outbox).await.unwrap());
        let raw = Connection::open(&path).unwrap();
        let row = |raw: &Connection| -> (String, String) {
            raw.query_row(
                "SELECT state, text FROM outbox WHERE id = ?1",
                [outbox],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
        };
        assert_eq!(row(&raw), ("sending".to_string(), String::new()));
        // Answered already: a second commit of the same turn writes nothing.
        assert_eq!(
            store.complete_turn_claimed(turn()).await.unwrap(),
            Completion::Discarded
        );
        assert_eq!(
            store.outbox_states().await.unwrap(),
            vec![("sending".to_string(), 1)]
        );
        // The outcome is recorded with the next group commit.
        store.set_outbox_state_later(outbox, "sent", None).unwrap();
        store
            .insert_inbound(&message("1", "11", "again", None), &user)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row(&raw).0, "sent");
        // A command's reply the same way.
        let next = store.pending_inbox(&user, 10).await.unwrap()[0].id;
        let reply = store
            .finish_inbox_with_claimed_reply(
                next,
                &user,
                Some((ChannelKind::Telegram, "1".into(), "help".into())),
            )
            .await
            .unwrap()
            .outbox()
            .unwrap();
        assert!(store.pending_outbox(10).await.unwrap().is_empty());
        assert!(!store.claim_outbox(reply).await.unwrap());
        assert!(store.pending_inbox(&user, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn pairing_codes_are_reused_while_pending_and_single_use() {
        let store = Store::open_in_memory().unwrap();
        let who = Identity::new(ChannelKind::Telegram, PeerId::new("42").unwrap());
        let (first, created) = store
            .pairing_request_for(&who, "42", Some("Eve"), Duration::from_secs(3600))
            .await
            .unwrap();
        assert!(created);
        assert_eq!(first.code.len(), 8);
        let (again, created) = store
            .pairing_request_for(&who, "42", None, Duration::from_secs(3600))
            .await
            .unwrap();
        assert!(!created);
        assert_eq!(first.code, again.code);
        let (_, user) = store
            .decide_pairing(
                ChannelKind::Telegram,
                &first.code.to_lowercase(),
                true,
                UserId::for_identity,
            )
            .await
            .unwrap();
        assert_eq!(user.unwrap().as_str(), "telegram_42");
        assert_eq!(
            store.user_for_identity(&who).await.unwrap().unwrap().1,
            "pairing"
        );
        assert!(store
            .decide_pairing(
                ChannelKind::Telegram,
                &first.code,
                true,
                UserId::for_identity
            )
            .await
            .is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn inline_reads_see_every_returned_write_refuse_writes_and_fall_back_when_all_are_lent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("moltmate.db")).unwrap();
        let anna = UserId::new("anna").unwrap();
        for n in 0..50 {
            // Written on the database thread (durably), read on this thread at once.
            store
                .insert_inbound(&message("1", &format!("m{n}"), "hi", None), &anna)
                .await
                .unwrap();
            assert_eq!(store.pending_inbox_count(&anna).await.unwrap(), n + 1);
        }
        let write = store
            .read(|c| Ok(c.execute("DELETE FROM inbox", [])?))
            .await;
        assert!(write.is_err(), "a read connection must not write");
        assert_eq!(store.pending_inbox_count(&anna).await.unwrap(), 50);
        // Every reader lent out: a read goes to the database thread and still answers.
        let readers = store.readers.as_ref().unwrap();
        let lent: Vec<_> = std::iter::from_fn(|| readers.lend()).take(10).collect();
        assert_eq!(lent.len(), 3);
        assert_eq!(store.pending_inbox_count(&anna).await.unwrap(), 50);
        drop(lent);
        assert_eq!(store.pending_inbox_count(&anna).await.unwrap(), 50);
    }

    /// A web caller waited for ever: its waiter was registered after the insert returned, and
    /// the user's worker, still busy, had read and answered the row before that.
    #[tokio::test]
    async fn lost_reply_race_the_stored_hook_runs_before_any_reader_sees_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moltmate.db");
        let store = Store::open(&path).unwrap();
        let anna = UserId::new("anna").unwrap();
        store.ensure_user(&anna, None).await.unwrap();
        let seen_in_hook = Arc::new(std::sync::Mutex::new(None));
        let hook_path = path.clone();
        let seen = Arc::clone(&seen_in_hook);
        let id = store
            .insert_inbound_then(&message("1", "m1", "hi", None), &anna, move |id| {
                // Another connection (a worker's read) cannot see the row yet.
                let other = Connection::open(&hook_path).unwrap();
                let visible: i64 = other
                    .query_row("SELECT COUNT(*) FROM inbox WHERE id = ?1", [id], |r| {
                        r.get(0)
                    })
                    .unwrap();
                *seen.lock().unwrap() = Some((id, visible));
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(*seen_in_hook.lock().unwrap(), Some((id, 0)));
        assert_eq!(store.pending_inbox(&anna, 10).await.unwrap().len(), 1);
        // A duplicate stores nothing and calls nothing.
        let called = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&called);
        let again = store
            .insert_inbound_then(&message("1", "m1", "hi", None), &anna, move |_| {
                flag.store(true, std::sync::atomic::Ordering::SeqCst)
            })
            .await
            .unwrap();
        assert_eq!(again, None);
        assert!(!called.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test]
    async fn sandbox_uid_is_stable_and_never_reused_after_remove_or_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moltmate.db");
        let range = UidRange {
            start: 2_000_000_000,
            count: 10,
        };
        let store = Store::open(&path).unwrap();
        let anna = UserId::new("anna").unwrap();
        let ben = UserId::new("ben").unwrap();
        store.ensure_user(&anna, None).await.unwrap();
        store.ensure_user(&ben, None).await.unwrap();
        let a1 = store.user_sandbox_ids(&anna, range).await.unwrap();
        let b1 = store.user_sandbox_ids(&ben, range).await.unwrap();
        assert_eq!(a1, SandboxIds::same(2_000_000_000));
        assert_eq!(b1, SandboxIds::same(2_000_000_001));
        assert_eq!(store.user_sandbox_ids(&anna, range).await.unwrap(), a1);
        let family = store.family_sandbox_gid("smiths", range).await.unwrap();
        assert_eq!(
            family, 2_000_000_002,
            "families draw from the same sequence"
        );
        assert_eq!(
            store.family_sandbox_gid("smiths", range).await.unwrap(),
            family
        );
        drop(store);

        // Durable across a restart; a removed user's id is retired, never handed out again.
        let store = Store::open(&path).unwrap();
        assert_eq!(store.user_sandbox_ids(&anna, range).await.unwrap(), a1);
        assert!(store.delete_user(&anna).await.unwrap());
        assert!(!store.sandbox_uids().await.unwrap().contains_key("anna"));
        store.ensure_user(&anna, None).await.unwrap();
        let a2 = store.user_sandbox_ids(&anna, range).await.unwrap();
        assert_eq!(a2, SandboxIds::same(2_000_000_003));
        // Even when the highest id was retired, the next one is above it.
        assert!(store.delete_user(&anna).await.unwrap());
        store.ensure_user(&anna, None).await.unwrap();
        let a3 = store.user_sandbox_ids(&anna, range).await.unwrap();
        assert_eq!(a3, SandboxIds::same(2_000_000_004));
        // A reset starts the user over under a fresh id too.
        store.wipe_user_history(&ben).await.unwrap();
        let b2 = store.user_sandbox_ids(&ben, range).await.unwrap();
        assert_eq!(b2, SandboxIds::same(2_000_000_005));
        let live = store.sandbox_uids().await.unwrap();
        assert_eq!(live.get("anna"), Some(&a3.uid));
        assert_eq!(live.get("ben"), Some(&b2.uid));
        assert_eq!(live.len(), 2, "families are not users: {live:?}");
    }

    #[tokio::test]
    async fn sandbox_uid_range_used_up_or_invalid_is_a_clear_error() {
        let store = Store::open_in_memory().unwrap();
        let tiny = UidRange {
            start: 3_000_000,
            count: 2,
        };
        for name in ["a", "b"] {
            store
                .user_sandbox_ids(&UserId::new(name).unwrap(), tiny)
                .await
                .unwrap();
        }
        let err = store
            .user_sandbox_ids(&UserId::new("c").unwrap(), tiny)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("used up"), "{err}");
        // A later, larger range continues above everything given out before.
        let grown = UidRange {
            start: 3_000_000,
            count: 3,
        };
        let c = store
            .user_sandbox_ids(&UserId::new("c").unwrap(), grown)
            .await
            .unwrap();
        assert_eq!(c.uid, 3_000_002);
        for bad in [
            UidRange {
                start: 1000,
                count: 10,
            },
            UidRange {
                start: 70_000,
                count: 0,
            },
            UidRange {
                start: u32::MAX - 5,
                count: 10,
            },
        ] {
            let err = store
                .user_sandbox_ids(&UserId::new("d").unwrap(), bad)
                .await
                .unwrap_err();
            assert!(err.to_string().contains("sandbox.uidRange"), "{err}");
        }
    }

    #[tokio::test]
    async fn expired_pairing_code_is_refused() {
        let store = Store::open_in_memory().unwrap();
        let who = Identity::new(ChannelKind::Telegram, PeerId::new("7").unwrap());
        let (request, _) = store
            .pairing_request_for(&who, "7", None, Duration::from_millis(1))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let error = store
            .decide_pairing(
                ChannelKind::Telegram,
                &request.code,
                true,
                UserId::for_identity,
            )
            .await
            .unwrap_err();
        assert!(error.to_string().contains("expired"), "{error}");
        assert!(store.pending_pairing_requests().await.unwrap().is_empty());
    }

    #[test]
    fn migrations_are_idempotent_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moltmate.db");
        drop(Store::open(&path).unwrap());
        drop(Store::open(&path).unwrap());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
