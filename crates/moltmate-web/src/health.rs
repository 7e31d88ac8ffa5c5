//! `GET /healthz` (liveness JSON) and `GET /metrics` (Prometheus text).
//!
//! Neither needs a credential, so neither says anything secret or personal: no user ids, no
//! tokens, only counts. Metrics are the gateway's registry followed by the web layer's own.

use crate::state::WebState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use moltmate_core::channel_status::{ChannelStatus, LinkState};
use serde_json::json;

pub async fn healthz(State(state): State<WebState>) -> Response {
    let shutting_down = state.inner.shutdown.is_cancelled();
    let statuses = state.gateway().channel_statuses();
    let now_ms = now_millis();
    let mut channels = serde_json::Map::new();
    for status in &statuses {
        channels.insert(
            status.channel.as_str().to_string(),
            json!({
                "connected": status.connected,
                "ok": status.is_healthy(),
                "last_event_seconds_ago": status.last_event_ms.map(|t| (now_ms.saturating_sub(t) / 1000).max(0)),
                "errors": status.errors_total(),
                "last_error": status.last_error.map(|(class, _)| class.as_str()),
                "link": status.link.as_str(),
            }),
        );
    }
    let body = json!({
        "status": if shutting_down { "shutting_down" } else { "ok" },
        "uptime_seconds": state.inner.started.elapsed().as_secs(),
        "active_users": state.gateway().active_workers(),
        "sandbox": state.gateway().sandbox().map(|s| s.backend()),
        "channels_ok": statuses.iter().all(|s| s.is_healthy()),
        "channels": channels,
    });
    let status = if shutting_down {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

/// Joins OpenMetrics texts: each encoding ends with `# EOF`, which may appear only once, last.
pub fn join_expositions(parts: &[String]) -> String {
    let mut out = String::new();
    for part in parts {
        out.push_str(
            part.trim_end()
                .strip_suffix("# EOF")
                .unwrap_or(part.trim_end()),
        );
        if !out.ends_with('\n') && !out.is_empty() {
            out.push('\n');
        }
    }
    out.push_str("# EOF\n");
    out
}

/// The sandbox backend's counters in OpenMetrics text (read at scrape time).
fn sandbox_exposition(state: &WebState) -> String {
    let Some(sandbox) = state.gateway().sandbox() else {
        return "# EOF\n".to_string();
    };
    let stats = sandbox.stats();
    let backend = sandbox.backend();
    format!(
        "# HELP moltmate_sandbox_starts Sandboxes started (containers created, bubblewrap sandboxes spawned).\n\
         # TYPE moltmate_sandbox_starts counter\n\
         moltmate_sandbox_starts_total{{backend=\"{backend}\"}} {}\n\
         # HELP moltmate_sandbox_pruned Idle sandboxes removed.\n\
         # TYPE moltmate_sandbox_pruned counter\n\
         moltmate_sandbox_pruned_total{{backend=\"{backend}\"}} {}\n# EOF\n",
        stats.started, stats.pruned
    )
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Every configured channel's health in OpenMetrics text (read at scrape time). Labels are
/// the channel's fixed name and the fixed error classes, nothing else.
pub fn channel_exposition(statuses: &[ChannelStatus]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if statuses.is_empty() {
        out.push_str("# EOF\n");
        return out;
    }
    out.push_str("# HELP moltmate_channel_connected Whether the channel's last exchange with its service worked.\n# TYPE moltmate_channel_connected gauge\n");
    for s in statuses {
        let _ = writeln!(
            out,
            "moltmate_channel_connected{{channel=\"{}\"}} {}",
            s.channel.as_str(),
            u8::from(s.connected)
        );
    }
    out.push_str("# HELP moltmate_channel_linked Whether the channel's account is linked (channels that link a device).\n# TYPE moltmate_channel_linked gauge\n");
    for s in statuses
        .iter()
        .filter(|s| s.link != LinkState::NotApplicable)
    {
        let _ = writeln!(
            out,
            "moltmate_channel_linked{{channel=\"{}\"}} {}",
            s.channel.as_str(),
            u8::from(s.link == LinkState::Linked)
        );
    }
    out.push_str("# HELP moltmate_channel_last_event_timestamp_seconds Unix time of the channel's last inbound event.\n# TYPE moltmate_channel_last_event_timestamp_seconds gauge\n");
    for s in statuses {
        if let Some(ms) = s.last_event_ms {
            let _ = writeln!(
                out,
                "moltmate_channel_last_event_timestamp_seconds{{channel=\"{}\"}} {}",
                s.channel.as_str(),
                ms / 1000
            );
        }
    }
    out.push_str("# HELP moltmate_channel_errors Channel errors by class.\n# TYPE moltmate_channel_errors counter\n");
    for s in statuses {
        for (class, count) in &s.errors {
            let _ = writeln!(
                out,
                "moltmate_channel_errors_total{{channel=\"{}\",class=\"{}\"}} {count}",
                s.channel.as_str(),
                class.as_str()
            );
        }
    }
    out.push_str("# EOF\n");
    out
}

pub async fn metrics(State(state): State<WebState>) -> Response {
    let text = join_expositions(&[
        state.gateway().metrics().encode(),
        state.inner.metrics.encode(),
        sandbox_exposition(&state),
        channel_exposition(&state.gateway().channel_statuses()),
    ]);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_metrics_use_only_fixed_labels() {
        use moltmate_core::channel_status::{ChannelHealth, ErrorClass};
        use moltmate_core::ChannelKind;
        let h = ChannelHealth::new(ChannelKind::Signal);
        h.set_link(LinkState::Lost);
        h.error(ErrorClass::LinkLost);
        let text = channel_exposition(&[h.snapshot()]);
        assert!(
            text.contains("moltmate_channel_connected{channel=\"signal\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("moltmate_channel_linked{channel=\"signal\"} 0"),
            "{text}"
        );
        assert!(
            text.contains(
                "moltmate_channel_errors_total{channel=\"signal\",class=\"link_lost\"} 1"
            ),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn expositions_end_with_one_eof() {
        let joined = join_expositions(&["a 1\n# EOF\n".to_string(), "b 2\n# EOF\n".to_string()]);
        assert_eq!(joined, "a 1\nb 2\n# EOF\n");
    }
}
