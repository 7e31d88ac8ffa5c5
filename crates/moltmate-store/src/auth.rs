//! Credentials for the web channel and the OpenAI-compatible API: per-user bearer tokens,
//! one-time login links and browser sessions.
//!
//! A credential is honoured only while the user it names exists and was created no later than
//! the credential: one issued to an earlier user of the same id (removed, then the id given to
//! someone new) is refused even if a row of it survived (see [`crate::ending`]).
//!
//! Only SHA-256 digests of secrets are stored. A token is 32 random bytes (256 bits), so a
//! plain digest (no salt, no slow hash) is enough: there is nothing to brute-force. Lookups are
//! by digest, which also makes the comparison constant-time with respect to the secret.

use crate::db::{Store, StoreError};
use chrono::Utc;
use moltmate_core::UserId;
use rand::Rng;
use rusqlite::{params, OptionalExtension};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::time::Duration;

/// Prefix of user API tokens, so leaked ones are recognisable by secret scanners.
pub const TOKEN_PREFIX: &str = "mm_";

/// A fresh random secret, URL-safe, with a prefix.
pub fn new_secret(prefix: &str) -> String {
    let bytes: [u8; 32] = rand::rng().random();
    format!("{prefix}{}", hex::encode(bytes))
}

/// The stored form of a secret.
pub fn digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A user's API token as listed (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenInfo {
    pub id: i64,
    pub user: String,
    pub label: Option<String>,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked: bool,
}

/// A browser session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSession {
    /// `None` for an operator session.
    pub user: Option<UserId>,
    pub is_admin: bool,
    pub csrf_token: String,
    pub expires_at: i64,
}

fn now() -> i64 {
    Utc::now().timestamp_millis()
}

impl Store {
    /// Issues a new API token for `user` (creating the user row if needed). Returns the secret;
    /// it is shown once and only its digest is kept.
    pub async fn issue_token(
        &self,
        user: &UserId,
        label: Option<&str>,
    ) -> Result<String, StoreError> {
        let secret = new_secret(TOKEN_PREFIX);
        let hash = digest(&secret);
        let user = user.clone();
        let label = label.map(str::to_string);
        self.with(move |c| {
            c.prepare_cached("INSERT OR IGNORE INTO users (id, created_at) VALUES (?1, ?2)")?.execute( params![user.as_str(), now()])?;
            c.prepare_cached("INSERT INTO api_tokens (user_id, token_hash, label, created_at) VALUES (?1, ?2, ?3, ?4)")?.execute(
                params![user.as_str(), hash, label, now()],
            )?;
            Ok(())
        })
        .await?;
        Ok(secret)
    }

    /// The user a (non-revoked) token belongs to.
    pub async fn user_for_token(&self, secret: &str) -> Result<Option<UserId>, StoreError> {
        let hash = digest(secret);
        let lookup = hash.clone();
        // A read on the caller's thread; the write of `last_used_at` only when it is due.
        let found: Option<(String, Option<i64>)> = self
            .read(move |c| {
                Ok(c.prepare_cached(
                    "SELECT t.user_id, t.last_used_at FROM api_tokens t JOIN users u ON u.id = t.user_id
                     WHERE t.token_hash = ?1 AND t.revoked_at IS NULL AND u.created_at <= t.created_at",
                )?
                .query_row(params![lookup], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?)
            })
            .await?;
        let Some((user, last_used_at)) = found else {
            return Ok(None);
        };
        // To the minute: a request a second does not write a row a second.
        let now = now();
        if last_used_at.is_none_or(|at| at <= now - 60_000) {
            self.with(move |c| {
                c.prepare_cached(
                    "UPDATE api_tokens SET last_used_at = ?2 WHERE token_hash = ?1
                     AND (last_used_at IS NULL OR last_used_at <= ?2 - 60000)",
                )?
                .execute(params![hash, now])?;
                Ok(())
            })
            .await?;
        }
        UserId::new(user)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    pub async fn list_tokens(&self, user: Option<&UserId>) -> Result<Vec<TokenInfo>, StoreError> {
        let user = user.map(|u| u.as_str().to_string());
        self.with(move |c| {
            let mut statement = c.prepare(
                "SELECT id, user_id, label, created_at, last_used_at, revoked_at IS NOT NULL FROM api_tokens
                 WHERE ?1 IS NULL OR user_id = ?1 ORDER BY id",
            )?;
            let rows = statement.query_map(params![user], |r| {
                Ok(TokenInfo {
                    id: r.get(0)?,
                    user: r.get(1)?,
                    label: r.get(2)?,
                    created_at: r.get(3)?,
                    last_used_at: r.get(4)?,
                    revoked: r.get(5)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Revokes all of a user's tokens (or one by id). Returns how many were revoked.
    pub async fn revoke_tokens(
        &self,
        user: &UserId,
        token_id: Option<i64>,
    ) -> Result<usize, StoreError> {
        let user = user.clone();
        self.with(move |c| {
            Ok(c.prepare_cached("UPDATE api_tokens SET revoked_at = ?3 WHERE user_id = ?1 AND revoked_at IS NULL AND (?2 IS NULL OR id = ?2)")?.execute(
                params![user.as_str(), token_id, now()],
            )?)
        })
        .await
    }

    /// Creates a one-time login link code for `user`, valid for `ttl`.
    pub async fn create_login_link(
        &self,
        user: &UserId,
        ttl: Duration,
    ) -> Result<String, StoreError> {
        let secret = new_secret("");
        let hash = digest(&secret);
        let user = user.clone();
        self.with(move |c| {
            c.prepare_cached("INSERT OR IGNORE INTO users (id, created_at) VALUES (?1, ?2)")?.execute( params![user.as_str(), now()])?;
            c.prepare_cached("INSERT INTO login_links (code_hash, user_id, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)")?.execute(
                params![hash, user.as_str(), now(), now() + ttl.as_millis() as i64],
            )?;
            Ok(())
        })
        .await?;
        Ok(secret)
    }

    /// Redeems a login link code (single use). Returns its user if it was valid.
    pub async fn redeem_login_link(&self, code: &str) -> Result<Option<UserId>, StoreError> {
        let hash = digest(code);
        self.with(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let user: Option<String> = tx
                .prepare_cached(
                    "SELECT l.user_id FROM login_links l JOIN users u ON u.id = l.user_id
                     WHERE l.code_hash = ?1 AND l.used_at IS NULL AND l.expires_at > ?2 AND u.created_at <= l.created_at",
                )?.query_row(
                    params![hash, now()],
                    |r| r.get(0),
                )
                .optional()?;
            if user.is_some() {
                tx.prepare_cached("UPDATE login_links SET used_at = ?2 WHERE code_hash = ?1")?.execute( params![hash, now()])?;
            }
            tx.commit()?;
            user.map(|u| UserId::new(u).map_err(|e| StoreError::Corrupt(e.to_string()))).transpose()
        })
        .await
    }

    /// Starts a browser session; returns the session secret (for the cookie) and the session.
    pub async fn create_web_session(
        &self,
        user: Option<&UserId>,
        is_admin: bool,
        ttl: Duration,
    ) -> Result<(String, WebSession), StoreError> {
        let secret = new_secret("");
        let csrf = new_secret("");
        let hash = digest(&secret);
        let expires_at = now() + ttl.as_millis() as i64;
        let session = WebSession {
            user: user.cloned(),
            is_admin,
            csrf_token: csrf.clone(),
            expires_at,
        };
        let user = user.map(|u| u.as_str().to_string());
        self.with(move |c| {
            c.prepare_cached("DELETE FROM web_sessions WHERE expires_at <= ?1")?.execute( params![now()])?;
            c.prepare_cached("INSERT INTO web_sessions (session_hash, user_id, is_admin, csrf_token, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?.execute(
                params![hash, user, is_admin, csrf, now(), expires_at],
            )?;
            Ok(())
        })
        .await?;
        Ok((secret, session))
    }

    /// The live session behind a cookie secret. A user's session ends with the user: it is
    /// refused once they are removed, and never belongs to a new user given the same id.
    pub async fn web_session(&self, secret: &str) -> Result<Option<WebSession>, StoreError> {
        let hash = digest(secret);
        self.with(move |c| {
            let row: Option<(Option<String>, bool, String, i64)> = c
                .prepare_cached(
                    "SELECT s.user_id, s.is_admin, s.csrf_token, s.expires_at FROM web_sessions s
                     WHERE s.session_hash = ?1 AND s.expires_at > ?2
                       AND (s.user_id IS NULL OR EXISTS (SELECT 1 FROM users u
                            WHERE u.id = s.user_id AND u.created_at <= s.created_at))",
                )?
                .query_row(params![hash, now()], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()?;
            row.map(|(user, is_admin, csrf_token, expires_at)| {
                Ok(WebSession {
                    user: user
                        .map(|u| UserId::new(u).map_err(|e| StoreError::Corrupt(e.to_string())))
                        .transpose()?,
                    is_admin,
                    csrf_token,
                    expires_at,
                })
            })
            .transpose()
        })
        .await
    }

    /// Signs a user out of every browser (after their tokens were revoked).
    pub async fn delete_user_web_sessions(&self, user: &UserId) -> Result<usize, StoreError> {
        let user = user.clone();
        self.with(move |c| {
            Ok(
                c.prepare_cached("DELETE FROM web_sessions WHERE user_id = ?1")?
                    .execute(params![user.as_str()])?,
            )
        })
        .await
    }

    /// Ends a browser session (sign out).
    pub async fn delete_web_session(&self, secret: &str) -> Result<(), StoreError> {
        let hash = digest(secret);
        self.with(move |c| {
            c.prepare_cached("DELETE FROM web_sessions WHERE session_hash = ?1")?
                .execute(params![hash])?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_are_stored_hashed_and_revocable() {
        let store = Store::open_in_memory().unwrap();
        let anna = UserId::new("anna").unwrap();
        let token = store.issue_token(&anna, Some("laptop")).await.unwrap();
        assert!(token.starts_with(TOKEN_PREFIX));
        assert_eq!(
            store.user_for_token(&token).await.unwrap(),
            Some(anna.clone())
        );
        assert_eq!(store.user_for_token("mm_wrong").await.unwrap(), None);
        assert_eq!(store.revoke_tokens(&anna, None).await.unwrap(), 1);
        assert_eq!(store.user_for_token(&token).await.unwrap(), None);
    }

    #[tokio::test]
    async fn login_links_work_once() {
        let store = Store::open_in_memory().unwrap();
        let anna = UserId::new("anna").unwrap();
        let code = store
            .create_login_link(&anna, Duration::from_secs(600))
            .await
            .unwrap();
        assert_eq!(store.redeem_login_link(&code).await.unwrap(), Some(anna));
        assert_eq!(store.redeem_login_link(&code).await.unwrap(), None);
    }

    /// Regression (issue 9): after `users remove` the browser session of the removed user still
    /// worked, and using it created the user again. Sessions, tokens and links of a removed
    /// user are refused even if a row of them survived, and never pass to a new user of the id.
    #[tokio::test]
    async fn credentials_of_a_removed_user_never_pass_to_a_new_user_of_the_same_id() {
        let store = Store::open_in_memory().unwrap();
        let anna = UserId::new("anna").unwrap();
        store.ensure_user(&anna, None).await.unwrap();
        let token = store.issue_token(&anna, None).await.unwrap();
        let link = store
            .create_login_link(&anna, Duration::from_secs(600))
            .await
            .unwrap();
        let (cookie, _) = store
            .create_web_session(Some(&anna), false, Duration::from_secs(600))
            .await
            .unwrap();
        // Rows that survive a deletion (simulated: the user is re-created later than them).
        store
            .with(|c| {
                c.execute_batch(
                    "PRAGMA foreign_keys = OFF;
                     UPDATE users SET created_at = created_at + 1000;
                     PRAGMA foreign_keys = ON;",
                )?;
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(store.user_for_token(&token).await.unwrap(), None);
        assert_eq!(store.redeem_login_link(&link).await.unwrap(), None);
        assert!(store.web_session(&cookie).await.unwrap().is_none());
        // Deleting the user deletes their browser sessions (a trigger; the table has no
        // foreign key).
        let ben = UserId::new("ben").unwrap();
        store.ensure_user(&ben, None).await.unwrap();
        let (cookie, _) = store
            .create_web_session(Some(&ben), false, Duration::from_secs(600))
            .await
            .unwrap();
        assert!(store.web_session(&cookie).await.unwrap().is_some());
        assert!(store.delete_user(&ben).await.unwrap());
        assert!(store.delete_user(&anna).await.unwrap());
        let left: i64 = store
            .with(|c| Ok(c.query_row("SELECT COUNT(*) FROM web_sessions", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(left, 0);
    }

    #[tokio::test]
    async fn web_sessions_carry_csrf_and_expire() {
        let store = Store::open_in_memory().unwrap();
        let (secret, session) = store
            .create_web_session(None, true, Duration::from_millis(30))
            .await
            .unwrap();
        let loaded = store.web_session(&secret).await.unwrap().unwrap();
        assert_eq!(loaded.csrf_token, session.csrf_token);
        assert!(loaded.is_admin);
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(store.web_session(&secret).await.unwrap().is_none());
    }
}
