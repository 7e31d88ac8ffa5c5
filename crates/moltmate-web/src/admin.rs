//! The operator's dashboard at `/admin`.
//!
//! Signed in with the operator token (`gateway.auth.token`) through a form; the token is
//! compared by digest in constant time and then replaced by an admin session cookie
//! (`mm_admin`, `Path=/admin`). Every value on the page is escaped; pairing decisions are
//! POSTed forms carrying the session's CSRF token.

use crate::error::{PageError, WebError};
use crate::html::{escape, render, render_with_markup};
use crate::security::{check_same_origin, check_sign_in_origin};
use crate::session::{self, admin_session, ADMIN_COOKIE};
use crate::state::WebState;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use moltmate_core::{ChannelKind, UserId};
use moltmate_store::{AuditEvent, StoreError};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use subtle::ConstantTimeEq;

const DASHBOARD_TEMPLATE: &str = include_str!("../assets/admin.html");
const LOGIN_TEMPLATE: &str = include_str!("../assets/admin_login.html");

/// Audit events shown on the dashboard.
const AUDIT_ROWS: usize = 50;

fn login_page(status: StatusCode, message: &str) -> Response {
    (
        status,
        Html(render(LOGIN_TEMPLATE, &[("message", message)])),
    )
        .into_response()
}

fn see_other(to: &str) -> Response {
    let mut response = Redirect::to(to).into_response();
    *response.status_mut() = StatusCode::SEE_OTHER;
    response
}

/// Whether `presented` is the operator token. Constant time over the digests.
pub fn is_admin_token(state: &WebState, presented: &str) -> bool {
    match &state.inner.admin_digest {
        Some(expected) => {
            let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
            bool::from(expected.ct_eq(&presented))
        }
        None => false,
    }
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
}

pub async fn login(
    State(state): State<WebState>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Result<Response, PageError> {
    check_sign_in_origin(&headers)?;
    let Ok(Form(form)) = form else {
        return Ok(login_page(
            StatusCode::BAD_REQUEST,
            "Paste the operator token into the field.",
        ));
    };
    if !is_admin_token(&state, form.token.trim()) {
        if let Some(attempts) = state.inner.wrong_operator_tokens.hit() {
            tracing::warn!(
                attempts,
                "admin sign-in with a wrong token (attempts since the last such line)"
            );
        }
        return Ok(login_page(
            StatusCode::UNAUTHORIZED,
            "That is not the operator token.",
        ));
    }
    if let Some(old) = session::cookie(&headers, ADMIN_COOKIE) {
        state.gateway().store().delete_web_session(old).await?;
    }
    let ttl = state.settings().session_ttl;
    let (secret, _) = state
        .gateway()
        .store()
        .create_web_session(None, true, ttl)
        .await?;
    let cookie = session::set_cookie(ADMIN_COOKIE, &secret, ttl, state.settings().secure_cookies)?;
    let mut response = see_other("/admin");
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(response)
}

#[derive(Deserialize)]
pub struct CsrfForm {
    csrf: String,
}

pub async fn logout(
    State(state): State<WebState>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Result<Response, PageError> {
    check_same_origin(&headers)?;
    let session = admin_session(&state, &headers)
        .await?
        .ok_or(WebError::Unauthorized)?;
    crate::security::check_csrf(
        &session.csrf_token,
        form.as_ref().ok().map(|Form(f)| f.csrf.as_str()),
    )?;
    state
        .gateway()
        .store()
        .delete_web_session(&session.secret)
        .await?;
    let mut response = see_other("/admin");
    response.headers_mut().insert(
        header::SET_COOKIE,
        session::clear_cookie(ADMIN_COOKIE, state.settings().secure_cookies),
    );
    Ok(response)
}

#[derive(Deserialize)]
pub struct PairingForm {
    csrf: String,
    channel: String,
    code: String,
    decision: String,
}

pub async fn decide_pairing(
    State(state): State<WebState>,
    headers: HeaderMap,
    form: Result<Form<PairingForm>, FormRejection>,
) -> Result<Response, PageError> {
    check_same_origin(&headers)?;
    let session = admin_session(&state, &headers)
        .await?
        .ok_or(WebError::Unauthorized)?;
    let form = match form {
        Ok(Form(form)) => form,
        Err(_) => {
            // Without a readable form there is no CSRF token either: refuse as such.
            return Err(WebError::Forbidden("missing CSRF token; reload the page").into());
        }
    };
    crate::security::check_csrf(&session.csrf_token, Some(&form.csrf))?;
    let channel: ChannelKind = form
        .channel
        .parse()
        .map_err(|e: moltmate_core::InvalidId| WebError::BadRequest(e.to_string()))?;
    let approve = match form.decision.as_str() {
        "approve" => true,
        "deny" => false,
        _ => {
            return Err(
                WebError::BadRequest("decision must be 'approve' or 'deny'".to_string()).into(),
            )
        }
    };
    let decided = state
        .gateway()
        .store()
        .decide_pairing(channel, &form.code, approve, |identity| {
            UserId::for_identity(identity)
        })
        .await;
    let (request, user) = match decided {
        Ok(decided) => decided,
        Err(StoreError::NotFound(_)) => return Ok(see_other("/admin?done=gone")),
        Err(e) => return Err(WebError::from(e).into()),
    };
    let audited_user = user
        .clone()
        .unwrap_or_else(|| UserId::for_identity(&request.identity));
    let event = AuditEvent {
        user: audited_user,
        kind: if approve {
            "pairing_approved"
        } else {
            "pairing_denied"
        }
        .to_string(),
        tool: None,
        args_digest: None,
        duration_ms: None,
        outcome: "ok".to_string(),
        detail: Some(format!("{} via the admin dashboard", request.identity)),
    };
    if let Err(e) = state.gateway().store().record_audit(event).await {
        tracing::error!(error = %e, "could not audit a pairing decision");
    }
    tracing::info!(identity = %request.identity, approve, "pairing decided on the admin dashboard");
    Ok(see_other(if approve {
        "/admin?done=approved"
    } else {
        "/admin?done=denied"
    }))
}

/// How long the admin page waits for `moltmate doctor`'s checks.
const CHECKS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(15);

/// The "Security checks" section: the same list as `moltmate doctor`, failures first.
async fn security_checks_html(state: &WebState) -> String {
    use moltmate_core::doctor::CheckStatus;
    let Some(checks) = state.settings().security_checks.clone() else {
        return "<p class=\"empty\">Not available here; run <code>moltmate doctor</code>.</p>"
            .to_string();
    };
    let Ok(mut report) = tokio::time::timeout(CHECKS_DEADLINE, checks.report()).await else {
        return "<p class=\"empty\">The checks did not finish in time; run <code>moltmate doctor</code>.</p>"
            .to_string();
    };
    report.checks.sort_by_key(|c| std::cmp::Reverse(c.status));
    let mut out = format!(
        "<p class=\"note\">moltmate {} · {} fail · {} warn · {} pass (the same list as <code>moltmate doctor</code>, as this serving process sees it)</p>\
         <div class=\"scroll\"><table class=\"checks\"><thead><tr><th>Status</th><th>Check</th><th>Found</th><th>Fix</th></tr></thead><tbody>",
        escape(&report.version),
        report.count(CheckStatus::Fail),
        report.count(CheckStatus::Warn),
        report.count(CheckStatus::Pass),
    );
    for check in &report.checks {
        let status = check.status.as_str();
        let _ = write!(
            out,
            "<tr class=\"check-{status}\" data-check=\"{}\"><td><span class=\"status status-{status}\">{status}</span></td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&check.id),
            escape(&check.title),
            escape(&check.detail),
            escape(check.fix.as_deref().unwrap_or("")),
        );
    }
    out.push_str("</tbody></table></div>");
    out
}

#[derive(Deserialize)]
pub struct DashboardQuery {
    done: Option<String>,
}

/// The channels table of the health section: connected, last event, errors, link; a
/// device-link QR code while a Signal link waits to be scanned (operator-only: whoever scans
/// it links their phone's account to this gateway).
pub fn channels_html(statuses: &[moltmate_core::channel_status::ChannelStatus]) -> String {
    if statuses.is_empty() {
        return "<p class=\"empty\">No messaging channels configured.</p>".to_string();
    }
    let mut out = String::from(
        "<div class=\"scroll\"><table id=\"channels\"><thead><tr><th>Channel</th><th>Connected</th><th>Last event</th>\
         <th>Errors</th><th>Last error</th><th>Link</th></tr></thead><tbody>",
    );
    let mut codes = String::new();
    for status in statuses {
        let last_error = status
            .last_error
            .map(|(class, at)| format!("{} ({}): {}", time(at), class.as_str(), class.describe()))
            .unwrap_or_else(|| "—".to_string());
        let link = match status.link {
            moltmate_core::channel_status::LinkState::NotApplicable => "—",
            moltmate_core::channel_status::LinkState::Linked => "linked",
            moltmate_core::channel_status::LinkState::NotLinked => {
                "not linked: run `moltmate channels signal link` or scan the code below"
            }
            moltmate_core::channel_status::LinkState::Linking => {
                "waiting for the code to be scanned"
            }
            moltmate_core::channel_status::LinkState::Lost => {
                "LINK LOST: the device was unlinked; link it again"
            }
        };
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
            escape(status.channel.as_str()),
            if status.connected { "yes" } else { "no" },
            escape(&status.last_event_ms.map(time).unwrap_or_else(|| "—".to_string())),
            status.errors_total(),
            escape(&last_error),
            escape(link),
        );
        if let Some(uri) = &status.link_uri {
            if let Ok(code) = qrcode::QrCode::new(uri.as_bytes()) {
                let svg = code
                    .render::<qrcode::render::svg::Color<'_>>()
                    .min_dimensions(240, 240)
                    .build();
                let _ = write!(
                    codes,
                    "<figure class=\"link-code\" id=\"link-{}\">{svg}<figcaption>Scan with the phone: Signal → Settings → Linked devices → Link new device</figcaption></figure>",
                    escape(status.channel.as_str())
                );
            }
        }
    }
    out.push_str("</tbody></table></div>");
    out.push_str(&codes);
    out
}

fn time(millis: i64) -> String {
    chrono::DateTime::from_timestamp_millis(millis)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "—".to_string())
}

fn duration(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes / (1024 * 1024))
}

pub async fn dashboard(
    State(state): State<WebState>,
    headers: HeaderMap,
    Query(query): Query<DashboardQuery>,
) -> Result<Response, PageError> {
    let Some(session) = admin_session(&state, &headers).await? else {
        return Ok(login_page(StatusCode::OK, ""));
    };
    let store = state.gateway().store();
    let users = store.list_users().await?;
    let usage = store.usage(None).await?;
    let periods = moltmate_gateway::budget::Periods::now();
    let budgets: BTreeMap<String, moltmate_store::UserUsage> = store
        .usage_overview(&periods.day, &periods.month)
        .await?
        .into_iter()
        .map(|u| (u.user.clone(), u))
        .collect();
    let pairing = store.pending_pairing_requests().await?;
    let audit = store.recent_audit(None, AUDIT_ROWS).await?;
    let csrf = escape(&session.csrf_token);

    let notice = match query.done.as_deref() {
        Some("approved") => "Pairing approved.",
        Some("denied") => "Pairing denied.",
        Some("gone") => "That pairing request no longer exists (already decided, or expired).",
        _ => "",
    };

    // Health.
    let sandbox_name = state.gateway().sandbox().map(|s| s.backend());
    let health = format!(
        "<dl class=\"facts\"><dt>Status</dt><dd>{}</dd><dt>Uptime</dt><dd>{}</dd><dt>Active users</dt><dd>{}</dd>\
         <dt>Sandbox backend</dt><dd>{}</dd><dt>Known users</dt><dd>{}</dd></dl>",
        if state.inner.shutdown.is_cancelled() { "shutting down" } else { "ok" },
        escape(&duration(state.inner.started.elapsed().as_secs())),
        state.gateway().active_workers(),
        escape(sandbox_name.unwrap_or("none")),
        users.len(),
    ) + &channels_html(&state.gateway().channel_statuses());

    // Users with their identities and token usage.
    let mut totals: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for row in &usage {
        let entry = totals.entry(row.user.as_str()).or_default();
        entry.0 += row.input_tokens;
        entry.1 += row.output_tokens;
    }
    let mut users_html = String::new();
    if users.is_empty() {
        users_html.push_str("<p class=\"empty\">No users yet.</p>");
    } else {
        users_html.push_str(
            "<div class=\"scroll\"><table><thead><tr><th>User</th><th>Name</th><th>Identities</th><th>Trust</th>\
             <th>Tokens in</th><th>Tokens out</th><th>Messages today</th><th>Tokens today</th><th>Spend this month</th>\
             <th>Exec today</th><th>Stored</th><th>Since</th></tr></thead><tbody>",
        );
        for user in &users {
            let identities = user
                .identities
                .iter()
                .map(|i| escape(&i.to_string()))
                .collect::<Vec<_>>()
                .join("<br>");
            let (input, output) = totals.get(user.id.as_str()).copied().unwrap_or((0, 0));
            let channels: Vec<_> = user.identities.iter().map(|i| i.channel).collect();
            let trust = state.gateway().settings().trust_label(&user.id, &channels);
            // Used / budget, by the budgets of the user's trust level.
            let limits = &state
                .gateway()
                .settings()
                .settings_for_display(&user.id, &channels)
                .limits;
            let used = budgets.get(user.id.as_str());
            let lines = moltmate_gateway::budget::usage_lines(
                limits,
                &used.map(|u| u.totals).unwrap_or_default(),
                used.map_or(0, |u| u.transcript_bytes),
            );
            let mut cells = String::new();
            for line in &lines {
                let _ = write!(
                    cells,
                    "<td class=\"num\">{} / {}</td>",
                    escape(&line.used),
                    escape(&line.limit)
                );
            }
            let _ = write!(
                users_html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{input}</td><td class=\"num\">{output}</td>{cells}<td>{}</td></tr>",
                escape(user.id.as_str()),
                escape(user.display_name.as_deref().unwrap_or("—")),
                if identities.is_empty() { "—".to_string() } else { identities },
                escape(&trust),
                escape(&time(user.created_at)),
            );
        }
        users_html.push_str("</tbody></table></div>");
    }
    // Shared family budgets (`families.<name>.budget`), used by all members together.
    let settings = state.gateway().settings();
    let mut families: Vec<_> = settings.family_budgets.iter().collect();
    families.sort_by(|a, b| a.0.cmp(b.0));
    if !families.is_empty() {
        users_html.push_str(
            "<h3>Family budgets</h3><div class=\"scroll\"><table><thead><tr><th>Family</th><th>Members</th>\
             <th>Messages today</th><th>Tokens today</th><th>Spend this month</th><th>Exec today</th></tr></thead><tbody>",
        );
        for (name, budget) in families {
            let Some(member) = settings
                .families
                .iter()
                .find(|(_, family)| *family == name)
                .map(|(member, _)| member)
            else {
                continue;
            };
            let Some(family) = settings.family_budget(member) else {
                continue;
            };
            let used = store
                .usage_totals(&family.members, &periods.day, &periods.month)
                .await?;
            let limits = moltmate_gateway::limits::UserLimits {
                budget: *budget,
                ..Default::default()
            };
            let lines = moltmate_gateway::budget::usage_lines(&limits, &used, 0);
            let mut cells = String::new();
            for line in lines.iter().take(4) {
                let _ = write!(
                    cells,
                    "<td class=\"num\">{} / {}</td>",
                    escape(&line.used),
                    escape(&line.limit)
                );
            }
            let members = family
                .members
                .iter()
                .map(|m| escape(m.as_str()))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = write!(
                users_html,
                "<tr><td>{}</td><td>{members}</td>{cells}</tr>",
                escape(name)
            );
        }
        users_html.push_str("</tbody></table></div>");
    }

    // Pending pairing requests.
    let mut pairing_html = String::new();
    if pairing.is_empty() {
        pairing_html.push_str("<p class=\"empty\">No pending pairing requests.</p>");
    } else {
        pairing_html.push_str(
            "<div class=\"scroll\"><table><thead><tr><th>Code</th><th>Who</th><th>Name</th><th>Requested</th>\
             <th>Expires</th><th></th></tr></thead><tbody>",
        );
        for request in &pairing {
            let channel = escape(request.identity.channel.as_str());
            let code = escape(&request.code);
            let _ = write!(
                pairing_html,
                "<tr><td><code>{code}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"actions\">\
                 <form method=\"post\" action=\"/admin/pairing\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                 <input type=\"hidden\" name=\"channel\" value=\"{channel}\"><input type=\"hidden\" name=\"code\" value=\"{code}\">\
                 <button type=\"submit\" name=\"decision\" value=\"approve\" class=\"approve\" data-code=\"{code}\">Approve</button>\
                 <button type=\"submit\" name=\"decision\" value=\"deny\" class=\"deny\" data-code=\"{code}\">Deny</button></form></td></tr>",
                escape(&request.identity.to_string()),
                escape(request.sender_name.as_deref().unwrap_or("—")),
                escape(&time(request.created_at)),
                escape(&time(request.expires_at)),
            );
        }
        pairing_html.push_str("</tbody></table></div>");
    }

    // Sandboxes.
    let sandbox_totals = state.gateway().sandbox().map(|sandbox| {
        let stats = sandbox.stats();
        format!(
            "<p class=\"note\">Since the gateway started: {} started, {} pruned.</p>",
            stats.started, stats.pruned
        )
    });
    let sandboxes_html = match state.gateway().sandbox() {
        None => "<p class=\"empty\">No sandbox backend.</p>".to_string(),
        Some(sandbox) => match sandbox.list().await {
            Err(e) => {
                tracing::warn!(error = %e, "could not list sandboxes");
                format!(
                    "<p class=\"empty\">Could not list sandboxes ({}).</p>",
                    escape(sandbox.backend())
                )
            }
            Ok(list) if list.is_empty() => format!(
                "<p class=\"empty\">No sandboxes ({}).</p>",
                escape(sandbox.backend())
            ),
            Ok(list) => {
                // Each user's own sandbox uid (a root gateway); one query for the whole table.
                let uids = store.sandbox_uids().await.unwrap_or_default();
                let mut out = String::from(
                    "<div class=\"scroll\"><table><thead><tr><th>Name</th><th>User</th><th>Uid</th><th>Backend</th><th>State</th>\
                     <th>Idle</th><th>Limits</th></tr></thead><tbody>",
                );
                for info in &list {
                    let limits = info
                        .limits
                        .as_ref()
                        .map(|l| {
                            format!(
                                "{} RAM, {:.2} CPU, {} pids",
                                mib(l.memory_bytes),
                                f64::from(l.cpu_millis) / 1000.0,
                                l.pids
                            )
                        })
                        .unwrap_or_else(|| "—".to_string());
                    let _ = write!(
                        out,
                        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        escape(&info.name),
                        escape(&info.user),
                        uids.get(&info.user)
                            .map(|u| u.to_string())
                            .unwrap_or_else(|| "—".to_string()),
                        escape(info.backend),
                        escape(&info.state),
                        escape(&info.idle_seconds.map(duration).unwrap_or_else(|| "—".to_string())),
                        escape(&limits),
                    );
                }
                out.push_str("</tbody></table></div>");
                out
            }
        },
    };

    let checks_html = security_checks_html(&state).await;

    // Audit events.
    let mut audit_html = String::new();
    if audit.is_empty() {
        audit_html.push_str("<p class=\"empty\">No audit events yet.</p>");
    } else {
        audit_html.push_str(
            "<div class=\"scroll\"><table><thead><tr><th>Time</th><th>User</th><th>Kind</th><th>Tool</th>\
             <th>Duration</th><th>Outcome</th></tr></thead><tbody>",
        );
        for event in &audit {
            let _ = write!(
                audit_html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                escape(&time(event.at)),
                escape(&event.user),
                escape(&event.kind),
                escape(event.tool.as_deref().unwrap_or("—")),
                escape(&event.duration_ms.map(|d| format!("{d} ms")).unwrap_or_else(|| "—".to_string())),
                escape(&event.outcome),
            );
        }
        audit_html.push_str("</tbody></table></div>");
    }

    let sandboxes_all = format!("{}{sandboxes_html}", sandbox_totals.unwrap_or_default());
    let page = render_with_markup(
        DASHBOARD_TEMPLATE,
        &[("csrf", session.csrf_token.as_str()), ("notice", notice)],
        &[
            ("health", health.as_str()),
            ("users", users_html.as_str()),
            ("pairing", pairing_html.as_str()),
            ("sandboxes", sandboxes_all.as_str()),
            ("audit", audit_html.as_str()),
            ("checks", checks_html.as_str()),
        ],
    );
    Ok(Html(page).into_response())
}
