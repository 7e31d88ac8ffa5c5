//! The operator's dashboard at `/admin`.
//!
//! Signed in with the operator token (`gateway.auth.token`) through a form; the token is
//! compared by digest in constant time and then replaced by an admin session cookie
//! (`mm_admin`, `Path=/admin`). Every value on the page is escaped; pairing decisions are
//! POSTed forms carrying the session's CSRF token.

use crate::charts;
use crate::error::{PageError, WebError};
use crate::html::{escape, render, render_with_markup};
use crate::security::{check_same_origin, check_sign_in_origin};
use crate::session::{self, admin_session, ADMIN_COOKIE};
use crate::state::WebState;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use moltmate_core::sandbox::SandboxAggregate;
use moltmate_core::{ChannelKind, UserId};
use moltmate_ops::usage::{Totals, UsageQuery};
use moltmate_ops::users::UserAdmin;
use moltmate_store::{AuditEvent, StoreError};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use subtle::ConstantTimeEq;

const DASHBOARD_TEMPLATE: &str = include_str!("../assets/admin.html");
const LOGIN_TEMPLATE: &str = include_str!("../assets/admin_login.html");

/// Audit events shown on the dashboard.
const AUDIT_ROWS: usize = 50;
/// Days of usage charted on the dashboard.
const USAGE_DAYS: u32 = 14;
/// Users with a usage tile at most (the most active); `moltmate usage` lists everyone.
const USAGE_TILES: usize = 60;
const LINK_TEMPLATE: &str = include_str!("../assets/admin_link.html");

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

/// All sandboxes together, against `maxActive` and the totals of the parent cgroup.
pub fn aggregate_html(a: &SandboxAggregate) -> String {
    let of = |used: Option<String>, limit: String| match used {
        Some(used) => format!("{used} of {limit}"),
        None => format!("— of {limit}"),
    };
    let cores = |millis: u64| format!("{:.2}", millis as f64 / 1000.0);
    let memory = of(a.memory_used_bytes.map(mib), mib(a.memory_limit_bytes));
    let peak = a
        .memory_peak_bytes
        .map(|p| format!(" (peak {})", mib(p)))
        .unwrap_or_default();
    let cpu = of(
        a.cpu_recent_millis.map(cores),
        format!("{} CPUs", cores(a.cpu_limit_millis)),
    );
    let pids = of(a.pids_used.map(|p| p.to_string()), a.pids_limit.to_string());
    let cgroup = match (&a.cgroup, &a.cgroup_problem) {
        (Some(path), _) => format!("parent cgroup <code>{}</code>", escape(path)),
        (None, problem) => format!(
            "<strong>no parent cgroup</strong> ({}): the totals are not enforced, only the number alive",
            escape(problem.as_deref().unwrap_or("unknown"))
        ),
    };
    format!(
        "<table class=\"aggregate\"><tbody>\
         <tr><th>All sandboxes</th><td>{} alive of {} (<code>sandbox.maxActive</code>), {} command(s) waiting</td></tr>\
         <tr><th>Memory</th><td>{}{}</td></tr>\
         <tr><th>CPU</th><td>{} (recently)</td></tr>\
         <tr><th>Processes</th><td>{}</td></tr>\
         <tr><th>Bound</th><td>{}; since start {} idle sandbox(es) stopped to make room, {} command(s) gave up waiting</td></tr>\
         </tbody></table>",
        a.alive,
        a.max_active,
        a.queued,
        escape(&memory),
        escape(&peak),
        escape(&cpu),
        escape(&pids),
        cgroup,
        a.evicted,
        a.queue_timeouts,
    )
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
    let reminder_counts = store.reminder_counts().await?;
    let pairing = store.pending_pairing_requests().await?;
    let audit = store.recent_audit(None, AUDIT_ROWS).await?;
    let csrf = escape(&session.csrf_token);

    let notice = match query.done.as_deref() {
        Some("approved") => "Pairing approved.",
        Some("denied") => "Pairing denied.",
        Some("gone") => "That pairing request no longer exists (already decided, or expired).",
        Some("added") => "User saved.",
        Some("revoked") => "Tokens revoked and browser sessions ended.",
        Some("reset") => "User reset: their home and history were archived and wiped.",
        Some("removed") => "User removed (archived first). Remove them from moltmate.json too, or they can pair again.",
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

    // Budgets: each user's usage against the limits of their trust level, and reminders.
    let mut totals: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for row in &usage {
        let entry = totals.entry(row.user.as_str()).or_default();
        entry.0 += row.input_tokens;
        entry.1 += row.output_tokens;
    }
    let mut budgets_html = String::new();
    if users.is_empty() {
        budgets_html.push_str("<p class=\"empty\">No users yet.</p>");
    } else {
        budgets_html.push_str(
            "<div class=\"scroll\"><table><thead><tr><th>User</th><th>Name</th><th>Identities</th><th>Trust</th>\
             <th>Tokens in</th><th>Tokens out</th><th>Messages today</th><th>Tokens today</th><th>Spend this month</th>\
             <th>Exec today</th><th>Stored</th><th>Reminders</th><th>Since</th></tr></thead><tbody>",
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
                cells,
                "<td class=\"num\">{} / {}</td>",
                reminder_counts.get(user.id.as_str()).copied().unwrap_or(0),
                limits.reminders
            );
            let _ = write!(
                budgets_html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{input}</td><td class=\"num\">{output}</td>{cells}<td>{}</td></tr>",
                escape(user.id.as_str()),
                escape(user.display_name.as_deref().unwrap_or("—")),
                if identities.is_empty() { "—".to_string() } else { identities },
                escape(&trust),
                escape(&time(user.created_at)),
            );
        }
        budgets_html.push_str("</tbody></table></div>");
    }
    // Shared family budgets (`families.<name>.budget`), used by all members together.
    let settings = state.gateway().settings();
    let mut families: Vec<_> = settings.family_budgets.iter().collect();
    families.sort_by(|a, b| a.0.cmp(b.0));
    if !families.is_empty() {
        budgets_html.push_str(
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
                budgets_html,
                "<tr><td>{}</td><td>{members}</td>{cells}</tr>",
                escape(name)
            );
        }
        budgets_html.push_str("</tbody></table></div>");
    }
    let users_html = format!(
        "{}<h3>Budgets and reminders</h3>{budgets_html}",
        users_section(&state, &users, &csrf)
    );

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
    let sandbox_totals = match state.gateway().sandbox() {
        Some(sandbox) => {
            let stats = sandbox.stats();
            let aggregate = sandbox
                .aggregate()
                .await
                .map(|a| aggregate_html(&a))
                .unwrap_or_default();
            Some(format!(
                "{aggregate}<p class=\"note\">Since the gateway started: {} started, {} pruned.</p>",
                stats.started, stats.pruned
            ))
        }
        None => None,
    };
    let listed = match state.gateway().sandbox() {
        None => None,
        Some(sandbox) => Some((sandbox.backend(), sandbox.list().await)),
    };
    let sandboxes_html = match &listed {
        None => "<p class=\"empty\">No sandbox backend.</p>".to_string(),
        Some((backend, listing)) => match listing {
            Err(e) => {
                tracing::warn!(error = %e, "could not list sandboxes");
                format!(
                    "<p class=\"empty\">Could not list sandboxes ({}).</p>",
                    escape(backend)
                )
            }
            Ok(list) if list.is_empty() => {
                format!("<p class=\"empty\">No sandboxes ({}).</p>", escape(backend))
            }
            Ok(list) => {
                // Each user's own sandbox uid (a root gateway); one query for the whole table.
                let uids = store.sandbox_uids().await.unwrap_or_default();
                let mut out = String::from(
                    "<div class=\"scroll\"><table><thead><tr><th>Name</th><th>User</th><th>Uid</th><th>Backend</th><th>State</th>\
                     <th>Idle</th><th>Limits</th></tr></thead><tbody>",
                );
                for info in list {
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
    let sandbox_states: HashMap<String, String> = match &listed {
        Some((_, Ok(list))) => list
            .iter()
            .map(|info| (info.user.clone(), info.state.clone()))
            .collect(),
        _ => HashMap::new(),
    };
    let usage_html = usage_section(&state, &sandbox_states, listed.is_some()).await;

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

    let days = USAGE_DAYS.to_string();
    let sandboxes_all = format!("{}{sandboxes_html}", sandbox_totals.unwrap_or_default());
    let page = render_with_markup(
        DASHBOARD_TEMPLATE,
        &[
            ("csrf", session.csrf_token.as_str()),
            ("notice", notice),
            ("days", days.as_str()),
        ],
        &[
            ("health", health.as_str()),
            ("usage", usage_html.as_str()),
            ("users", users_html.as_str()),
            ("pairing", pairing_html.as_str()),
            ("sandboxes", sandboxes_all.as_str()),
            ("audit", audit_html.as_str()),
            ("checks", checks_html.as_str()),
        ],
    );
    Ok(Html(page).into_response())
}

// ---- usage ----------------------------------------------------------------------------------

/// Families by name from the gateway's settings (`families.<name>.members` of moltmate.json).
fn families(state: &WebState) -> BTreeMap<String, Vec<UserId>> {
    let mut families: BTreeMap<String, Vec<UserId>> = BTreeMap::new();
    for (user, family) in &state.gateway().settings().families {
        families
            .entry(family.clone())
            .or_default()
            .push(user.clone());
    }
    for members in families.values_mut() {
        members.sort();
    }
    families
}

fn count(value: f64) -> String {
    format!("{}", value.round() as u64)
}

fn compact(value: u64) -> String {
    match value {
        v if v >= 10_000_000 => format!("{:.0}M", v as f64 / 1e6),
        v if v >= 1_000_000 => format!("{:.1}M", v as f64 / 1e6),
        v if v >= 10_000 => format!("{:.0}k", v as f64 / 1e3),
        v if v >= 1_000 => format!("{:.1}k", v as f64 / 1e3),
        v => v.to_string(),
    }
}

fn exec_time(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        duration(ms / 1000)
    }
}

/// The facts and three charts (messages, tokens, cost per day) of a user or a family.
fn usage_tile(
    title: &str,
    sub: &str,
    facts: &[(&str, String)],
    totals: &Totals,
    days: &[(String, Totals)],
    priced: bool,
) -> String {
    let mut tile = format!(
        "<article class=\"tile\"><h3>{}</h3><p class=\"sub\">{}</p><dl class=\"facts\">",
        escape(title),
        escape(sub)
    );
    let mut all: Vec<(&str, String)> = facts.to_vec();
    all.extend([
        ("Messages", totals.messages.to_string()),
        (
            "Tokens",
            format!(
                "{} in, {} out",
                compact(totals.input_tokens),
                compact(totals.output_tokens)
            ),
        ),
        (
            "Est. cost",
            if priced {
                totals.cost_text()
            } else {
                "— (no model.prices)".to_string()
            },
        ),
        ("Tool calls", totals.tool_calls.to_string()),
        (
            "Exec",
            format!("{} calls, {}", totals.exec_calls, exec_time(totals.exec_ms)),
        ),
    ]);
    for (name, value) in all {
        let _ = write!(tile, "<dt>{}</dt><dd>{}</dd>", escape(name), escape(&value));
    }
    tile.push_str("</dl>");
    let series = |f: &dyn Fn(&Totals) -> f64| -> Vec<(String, f64)> {
        days.iter().map(|(day, t)| (day.clone(), f(t))).collect()
    };
    tile.push_str(&charts::bars(
        "Messages",
        &totals.messages.to_string(),
        &series(&|t| t.messages as f64),
        &count,
    ));
    tile.push_str(&charts::bars(
        "Tokens",
        &compact(totals.tokens()),
        &series(&|t| t.tokens() as f64),
        &|v| compact(v.round() as u64),
    ));
    if priced {
        tile.push_str(&charts::bars(
            "Est. cost",
            &totals.cost_text(),
            &series(&|t| t.cost_micros as f64 / 1e6),
            &|v| format!("${v:.4}"),
        ));
    }
    tile.push_str("</article>");
    tile
}

/// Usage per family and per user over the last [`USAGE_DAYS`] days, as tiles with inline SVG
/// charts.
async fn usage_section(
    state: &WebState,
    sandbox_states: &HashMap<String, String>,
    has_sandbox: bool,
) -> String {
    let families = families(state);
    let report = match moltmate_ops::usage::report(
        state.gateway().store(),
        &UsageQuery::last_days(USAGE_DAYS),
        &families,
        &state.settings().prices,
    )
    .await
    {
        Ok(report) => report,
        Err(e) => {
            tracing::error!(error = %e, "could not build the usage report");
            return "<p class=\"empty\">Usage could not be read (see the log).</p>".to_string();
        }
    };
    let settings = state.gateway().settings();
    let mut out = String::new();
    if report.truncated {
        out.push_str("<p class=\"hint\">Some rows were left out (row bound reached).</p>");
    }
    if !report.families.is_empty() {
        out.push_str("<h3>Families</h3><div class=\"tiles\">");
        for family in &report.families {
            let members = family.members.join(", ");
            out.push_str(&usage_tile(
                &family.family,
                &format!("members: {members} (moltmate.json)"),
                &[],
                &family.totals,
                &family.days,
                report.priced,
            ));
        }
        out.push_str("</div><h3>Users</h3>");
    }
    if report.users.is_empty() {
        out.push_str("<p class=\"empty\">No users yet.</p>");
        return out;
    }
    let mut users: Vec<&moltmate_ops::usage::UserUsage> = report.users.iter().collect();
    users.sort_by(|a, b| {
        (b.totals.tokens(), b.totals.messages, b.last_seen)
            .cmp(&(a.totals.tokens(), a.totals.messages, a.last_seen))
            .then_with(|| a.user.cmp(&b.user))
    });
    out.push_str("<div class=\"tiles\">");
    for user in users.iter().take(USAGE_TILES) {
        let trust = UserId::new(user.user.as_str())
            .map(|id| settings.trust_label(&id, &[]))
            .unwrap_or_else(|_| "—".to_string());
        let mut sub = user.user.clone();
        if let Some(family) = &user.family {
            sub.push_str(&format!(" · family {family}"));
        }
        sub.push_str(&format!(" · trust {trust}"));
        let sandbox = match sandbox_states.get(&user.user) {
            Some(state) => state.clone(),
            None if has_sandbox => "none".to_string(),
            None => "no backend".to_string(),
        };
        let facts = [
            (
                "Last seen",
                user.last_seen
                    .map(time)
                    .unwrap_or_else(|| "never".to_string()),
            ),
            ("Sandbox", sandbox),
        ];
        out.push_str(&usage_tile(
            user.display_name.as_deref().unwrap_or(&user.user),
            &sub,
            &facts,
            &user.totals,
            &user.days,
            report.priced,
        ));
    }
    out.push_str("</div>");
    if users.len() > USAGE_TILES {
        let _ = write!(
            out,
            "<p class=\"hint\">{} less active users are not shown; <code>moltmate usage</code> lists everyone.</p>",
            users.len() - USAGE_TILES
        );
    }
    out
}

// ---- users: list and actions ----------------------------------------------------------------

/// The users table with their actions, the add-user form, and what moltmate.json decides.
fn users_section(state: &WebState, users: &[moltmate_store::UserRecord], csrf: &str) -> String {
    let settings = state.gateway().settings();
    let mut out = String::from(
        "<p class=\"hint\">Trust levels, families and the identities marked <span class=\"from-config\">moltmate.json</span> \
         are set in <code>moltmate.json</code> (<code>users.&lt;id&gt;.trust</code>, <code>families.&lt;name&gt;.members</code>, \
         <code>users.&lt;id&gt;.identities</code>): edit the file and restart; this page shows them and keeps no copy.</p>",
    );
    let _ = write!(
        out,
        "<form method=\"post\" action=\"/admin/users\" class=\"add-user\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <input type=\"hidden\" name=\"action\" value=\"add\">\
         <label>User id<input type=\"text\" name=\"user\" required maxlength=\"64\" placeholder=\"anna\" autocomplete=\"off\"></label>\
         <label>Name<input type=\"text\" name=\"name\" maxlength=\"100\" placeholder=\"Anna\" autocomplete=\"off\"></label>\
         <label>Identities<input type=\"text\" name=\"identities\" maxlength=\"2000\" placeholder=\"telegram:123456\" autocomplete=\"off\"></label>\
         <button type=\"submit\">Add user</button></form>"
    );
    if users.is_empty() {
        out.push_str("<p class=\"empty\">No users yet.</p>");
        return out;
    }
    out.push_str(
        "<div class=\"scroll\"><table><thead><tr><th>User</th><th></th><th>Name</th><th>Identities</th><th>Trust</th>\
         <th>Family</th><th>Since</th></tr></thead><tbody>",
    );
    for user in users {
        let identities = user
            .identities
            .iter()
            .map(|i| {
                let from_config = settings.configured_identities.get(i) == Some(&user.id);
                format!(
                    "{}{}",
                    escape(&i.to_string()),
                    if from_config {
                        " <span class=\"from-config\">moltmate.json</span>"
                    } else {
                        ""
                    }
                )
            })
            .collect::<Vec<_>>()
            .join("<br>");
        let channels: Vec<_> = user.identities.iter().map(|i| i.channel).collect();
        let trust = settings.trust_label(&user.id, &channels);
        let trust_source = if settings.trust_names.contains_key(&user.id) {
            " <span class=\"from-config\">moltmate.json</span>"
        } else {
            ""
        };
        let family = settings
            .families
            .get(&user.id)
            .map(|f| {
                format!(
                    "{} <span class=\"from-config\">moltmate.json</span>",
                    escape(f)
                )
            })
            .unwrap_or_else(|| "—".to_string());
        let id = escape(user.id.as_str());
        let _ = write!(
            out,
            "<tr><td>{id}</td><td class=\"actions\"><form method=\"post\" action=\"/admin/users\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><input type=\"hidden\" name=\"user\" value=\"{id}\">\
             <button type=\"submit\" name=\"action\" value=\"link\" class=\"small\">Sign-in link</button>\
             <button type=\"submit\" name=\"action\" value=\"revoke\" class=\"small secondary\">Revoke tokens</button></form>\
             <details><summary>Reset or remove…</summary><form method=\"post\" action=\"/admin/users\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><input type=\"hidden\" name=\"user\" value=\"{id}\">\
             <label class=\"hint\">Type <code>{id}</code> to confirm. Both archive the home first; reset keeps the user, remove deletes them.\
             <input type=\"text\" name=\"confirm\" autocomplete=\"off\" required></label>\
             <button type=\"submit\" name=\"action\" value=\"reset\" class=\"small deny\">Reset</button>\
             <button type=\"submit\" name=\"action\" value=\"remove\" class=\"small deny\">Remove</button></form></details></td>\
             <td>{}</td><td>{}</td><td>{}{trust_source}</td><td>{family}</td><td>{}</td></tr>",
            escape(user.display_name.as_deref().unwrap_or("—")),
            if identities.is_empty() { "—".to_string() } else { identities },
            escape(&trust),
            escape(&time(user.created_at)),
        );
    }
    out.push_str("</tbody></table></div>");
    out
}

#[derive(Deserialize)]
pub struct UserForm {
    csrf: String,
    action: String,
    user: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    identities: String,
    #[serde(default)]
    confirm: String,
}

/// Identities linked in one add at most.
const MAX_IDENTITIES: usize = 20;

/// `POST /admin/users`: add, sign-in link, revoke, reset, remove — what the CLI's `users`
/// commands do, through the same functions (`moltmate_ops::users`). Same-origin, admin
/// session and CSRF token like the pairing decisions; reset and remove also need the user id
/// typed into `confirm`.
pub async fn user_action(
    State(state): State<WebState>,
    headers: HeaderMap,
    form: Result<Form<UserForm>, FormRejection>,
) -> Result<Response, PageError> {
    check_same_origin(&headers)?;
    let session = admin_session(&state, &headers)
        .await?
        .ok_or(WebError::Unauthorized)?;
    let Ok(Form(form)) = form else {
        return Err(WebError::Forbidden("missing CSRF token; reload the page").into());
    };
    crate::security::check_csrf(&session.csrf_token, Some(&form.csrf))?;
    let user = UserId::new(form.user.trim().to_string())
        .map_err(|e| WebError::BadRequest(format!("user id: {e}")))?;
    let gateway = state.gateway();
    let users = UserAdmin::new(
        gateway.homes().base_dir(),
        gateway.store().clone(),
        std::sync::Arc::new(GatewayEnvironment(gateway.clone())),
    );
    let done = match form.action.as_str() {
        "add" => {
            let name = form.name.trim();
            if name.chars().count() > 100 || name.chars().any(char::is_control) {
                return Err(WebError::BadRequest(
                    "the name must be at most 100 characters, without control characters".into(),
                )
                .into());
            }
            let identities: Vec<String> = form
                .identities
                .split([',', ' ', '\n', '\r', '\t'])
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            if identities.len() > MAX_IDENTITIES {
                return Err(WebError::BadRequest(format!(
                    "at most {MAX_IDENTITIES} identities at once"
                ))
                .into());
            }
            users
                .add(&user, &identities, (!name.is_empty()).then_some(name))
                .await?;
            "added"
        }
        "link" => {
            let ttl = state.settings().login_link_ttl;
            let url = users
                .login_link(&user, &state.settings().base_url, ttl)
                .await?;
            audit(&state, &user, "link").await;
            return Ok(link_page(&user, &url, ttl));
        }
        "revoke" => {
            users.revoke(&user).await?;
            "revoked"
        }
        "reset" | "remove" => {
            if form.confirm.trim() != user.as_str() {
                return Err(WebError::BadRequest(format!(
                    "to {} {user}, type the user id ({user}) into the confirmation field",
                    form.action
                ))
                .into());
            }
            if form.action == "reset" {
                users.reset(&user).await?;
                "reset"
            } else {
                users.remove(&user).await?;
                "removed"
            }
        }
        _ => {
            return Err(WebError::BadRequest(
                "action must be add, link, revoke, reset or remove".to_string(),
            )
            .into())
        }
    };
    audit(&state, &user, done).await;
    tracing::info!(user = %user, action = done, "user changed on the admin dashboard");
    Ok(see_other(&format!("/admin?done={done}#users")))
}

async fn audit(state: &WebState, user: &UserId, action: &str) {
    let event = AuditEvent {
        user: user.clone(),
        kind: format!("admin_user_{action}"),
        tool: None,
        args_digest: None,
        duration_ms: None,
        outcome: "ok".to_string(),
        detail: Some("via the admin dashboard".to_string()),
    };
    if let Err(e) = state.gateway().store().record_audit(event).await {
        tracing::error!(error = %e, "could not audit an admin action");
    }
}

/// The one-time sign-in link with its QR code. Not cached anywhere: the link is a credential.
fn link_page(user: &UserId, url: &str, ttl: std::time::Duration) -> Response {
    let minutes = (ttl.as_secs() / 60).max(1).to_string();
    let qr = charts::qr(url)
        .unwrap_or_else(|| "<p class=\"hint\">The link is too long for a QR code.</p>".to_string());
    let page = render_with_markup(
        LINK_TEMPLATE,
        &[("user", user.as_str()), ("url", url), ("minutes", &minutes)],
        &[("qr", qr.as_str())],
    );
    let mut response = Html(page).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    response
}

/// What the page's user actions need from the gateway they run in: homes made the way the
/// gateway makes them (sandbox ids, persona files), and the user's sandboxes ended (the
/// gateway's user-events watcher does so too; this makes it happen before the wipe).
struct GatewayEnvironment(moltmate_gateway::Gateway);

#[async_trait::async_trait]
impl moltmate_ops::users::Environment for GatewayEnvironment {
    async fn ensure_home(&self, user: &UserId) -> Result<(), moltmate_ops::OpsError> {
        self.0
            .ensure_home(user)
            .await
            .map(|_| ())
            .map_err(moltmate_ops::OpsError::Failed)
    }

    async fn remove_containers(&self, user: &UserId) -> Result<usize, String> {
        match self.0.sandbox() {
            Some(sandbox) => sandbox
                .end_user(user)
                .await
                .map(|()| 0)
                .map_err(|e| format!("the user's sandboxes could not be ended: {e}")),
            None => Ok(0),
        }
    }
}

#[cfg(test)]
mod aggregate_tests {
    use super::*;

    #[test]
    fn the_aggregate_shows_use_against_limits_or_why_there_is_no_bound() {
        let mut a = SandboxAggregate {
            alive: 2,
            max_active: 2,
            queued: 1,
            evicted: 4,
            queue_timeouts: 1,
            memory_limit_bytes: 1 << 30,
            memory_used_bytes: Some(300 << 20),
            memory_peak_bytes: Some(1000 << 20),
            cpu_limit_millis: 1500,
            cpu_used_micros: Some(1),
            cpu_recent_millis: Some(1200),
            pids_limit: 4096,
            pids_used: Some(40),
            cgroup: Some("/moltmate".into()),
            cgroup_problem: None,
        };
        let html = aggregate_html(&a);
        for needle in [
            "2 alive of 2",
            "1 command(s) waiting",
            "300 MiB of 1024 MiB (peak 1000 MiB)",
            "1.20 of 1.50 CPUs",
            "40 of 4096",
            "<code>/moltmate</code>",
            "4 idle sandbox(es) stopped",
        ] {
            assert!(html.contains(needle), "{needle}: {html}");
        }
        a.cgroup = None;
        a.cgroup_problem = Some("cannot create <x>".into());
        a.memory_used_bytes = None;
        let html = aggregate_html(&a);
        assert!(html.contains("no parent cgroup"), "{html}");
        assert!(html.contains("cannot create &lt;x&gt;"), "escaped: {html}");
        assert!(html.contains("— of 1024 MiB"), "{html}");
    }
}
