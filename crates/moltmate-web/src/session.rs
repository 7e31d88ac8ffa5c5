//! Browser sessions: the cookies, and the checks that turn a cookie into a signed-in user or
//! operator.
//!
//! Two separate cookies, so the operator can be signed into `/admin` and, as a user, into the
//! chat in one browser without either session standing in for the other: `mm_session`
//! (a user, `Path=/`) and `mm_admin` (the operator, `Path=/admin`). Both are HttpOnly and
//! SameSite=Strict (and Secure when configured). The store keeps only their digests.

use crate::error::WebError;
use crate::state::WebState;
use axum::http::{header, HeaderMap, HeaderValue};
use moltmate_core::UserId;
use moltmate_store::auth::WebSession;
use std::time::Duration;

pub const USER_COOKIE: &str = "mm_session";
pub const ADMIN_COOKIE: &str = "mm_admin";

/// The value of cookie `name`, if the request carries it.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, value)| *key == name && !value.is_empty())
        .map(|(_, value)| value)
}

fn cookie_path(name: &str) -> &'static str {
    if name == ADMIN_COOKIE {
        "/admin"
    } else {
        "/"
    }
}

/// A `Set-Cookie` value that stores `secret` for `ttl`.
pub fn set_cookie(
    name: &str,
    secret: &str,
    ttl: Duration,
    secure: bool,
) -> Result<HeaderValue, WebError> {
    let secure = if secure { "; Secure" } else { "" };
    let value = format!(
        "{name}={secret}; Path={}; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        cookie_path(name),
        ttl.as_secs()
    );
    // Secrets are hex, names and attributes ASCII: the value is always a valid header.
    HeaderValue::from_str(&value)
        .map_err(|_| WebError::Internal("could not build a cookie header".to_string()))
}

/// A `Set-Cookie` value that removes the cookie.
pub fn clear_cookie(name: &str, secure: bool) -> HeaderValue {
    let value = match (name == ADMIN_COOKIE, secure) {
        (true, true) => "mm_admin=; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=0; Secure",
        (true, false) => "mm_admin=; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=0",
        (false, true) => "mm_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0; Secure",
        (false, false) => "mm_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
    };
    HeaderValue::from_static(value)
}

/// A signed-in chat user.
#[derive(Debug, Clone)]
pub struct UserSession {
    pub user: UserId,
    pub csrf_token: String,
    /// The cookie secret, to end the session on sign-out. Never logged.
    pub(crate) secret: String,
}

/// The user signed in by the request's `mm_session` cookie, if any.
pub async fn user_session(
    state: &WebState,
    headers: &HeaderMap,
) -> Result<Option<UserSession>, WebError> {
    let Some(secret) = cookie(headers, USER_COOKIE) else {
        return Ok(None);
    };
    let session = state.gateway().store().web_session(secret).await?;
    Ok(match session {
        Some(WebSession {
            user: Some(user),
            is_admin: false,
            csrf_token,
            ..
        }) => Some(UserSession {
            user,
            csrf_token,
            secret: secret.to_string(),
        }),
        _ => None,
    })
}

/// Like [`user_session`], but an absent session is an error.
pub async fn require_user(state: &WebState, headers: &HeaderMap) -> Result<UserSession, WebError> {
    user_session(state, headers)
        .await?
        .ok_or(WebError::Unauthorized)
}

/// A signed-in operator.
#[derive(Debug, Clone)]
pub struct AdminSession {
    pub csrf_token: String,
    pub(crate) secret: String,
}

/// The operator signed in by the request's `mm_admin` cookie, if any.
pub async fn admin_session(
    state: &WebState,
    headers: &HeaderMap,
) -> Result<Option<AdminSession>, WebError> {
    let Some(secret) = cookie(headers, ADMIN_COOKIE) else {
        return Ok(None);
    };
    let session = state.gateway().store().web_session(secret).await?;
    Ok(match session {
        Some(WebSession {
            is_admin: true,
            user: None,
            csrf_token,
            ..
        }) => Some(AdminSession {
            csrf_token,
            secret: secret.to_string(),
        }),
        _ => None,
    })
}

/// The persona's display name from the user's IDENTITY.md (`Name: ...`), "Assistant" when
/// there is none. Creates the home (with the default persona) if it does not exist yet, so a
/// new user sees the name they will be answered by.
pub async fn persona_name(state: &WebState, user: &UserId) -> String {
    let home = match state.gateway().ensure_home(user).await {
        Ok(home) => home,
        Err(e) => {
            tracing::warn!(error = %e, "could not prepare the home");
            return "Assistant".to_string();
        }
    };
    let read = moltmate_core::blocking::run(
        "reading IDENTITY.md",
        moltmate_core::blocking::FILE_DEADLINE,
        move || -> Result<Option<String>, String> {
            let identity = moltmate_store::homes::read_beneath(home.root(), "IDENTITY.md", 4096)
                .map_err(|e| e.to_string())?;
            Ok(identity.and_then(|(text, _)| parse_persona_name(&text)))
        },
    )
    .await;
    match read {
        Ok(Ok(Some(name))) => name,
        Ok(Ok(None)) => "Assistant".to_string(),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "could not read IDENTITY.md");
            "Assistant".to_string()
        }
        Err(e) => {
            tracing::warn!(error = %e, "persona lookup failed");
            "Assistant".to_string()
        }
    }
}

/// The `Name:` line of an IDENTITY.md, cut to a sane length (the file is user-writable).
pub fn parse_persona_name(identity: &str) -> Option<String> {
    identity.lines().find_map(|line| {
        let line = line.trim().trim_start_matches(['-', '*', ' ']);
        let rest = line.strip_prefix("Name:")?;
        let name: String = rest
            .trim()
            .trim_start_matches('*')
            .trim()
            .chars()
            .filter(|c| !c.is_control())
            .take(60)
            .collect();
        (!name.is_empty()).then_some(name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("x_mm_session=evil; mm_session=abc; mm_admin=def"),
        );
        assert_eq!(cookie(&headers, USER_COOKIE), Some("abc"));
        assert_eq!(cookie(&headers, ADMIN_COOKIE), Some("def"));
        assert_eq!(cookie(&headers, "other"), None);
    }

    #[test]
    fn cookie_attributes() {
        let value = set_cookie(USER_COOKIE, "s3", Duration::from_secs(60), true).unwrap();
        let value = value.to_str().unwrap();
        for part in [
            "mm_session=s3",
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Path=/",
            "Max-Age=60",
        ] {
            assert!(value.contains(part), "{value}");
        }
        let admin = set_cookie(ADMIN_COOKIE, "s4", Duration::from_secs(60), false).unwrap();
        assert!(admin.to_str().unwrap().contains("Path=/admin"));
        assert!(!admin.to_str().unwrap().contains("Secure"));
    }

    #[test]
    fn persona_names_are_read_from_identity_files() {
        assert_eq!(
            parse_persona_name("# Identity\n\nName: Cami\nEmoji: x\n"),
            Some("Cami".to_string())
        );
        assert_eq!(
            parse_persona_name("- **Name:** Nova\n"),
            Some("Nova".to_string())
        );
        assert_eq!(parse_persona_name("# nothing\n"), None);
        assert_eq!(
            parse_persona_name(&format!("Name: {}", "x".repeat(500)))
                .unwrap()
                .len(),
            60
        );
    }
}
