//! `GET /healthz` (liveness JSON) and `GET /metrics` (Prometheus text).
//!
//! Neither needs a credential, so neither says anything secret or personal: no user ids, no
//! tokens, only counts. Metrics are the gateway's registry followed by the web layer's own.

use crate::state::WebState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

pub async fn healthz(State(state): State<WebState>) -> Response {
    let shutting_down = state.inner.shutdown.is_cancelled();
    let body = json!({
        "status": if shutting_down { "shutting_down" } else { "ok" },
        "uptime_seconds": state.inner.started.elapsed().as_secs(),
        "active_users": state.gateway().active_workers(),
        "sandbox": state.gateway().sandbox().map(|s| s.backend()),
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

pub async fn metrics(State(state): State<WebState>) -> Response {
    let text = join_expositions(&[
        state.gateway().metrics().encode(),
        state.inner.metrics.encode(),
        sandbox_exposition(&state),
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
    fn expositions_end_with_one_eof() {
        let joined = join_expositions(&["a 1\n# EOF\n".to_string(), "b 2\n# EOF\n".to_string()]);
        assert_eq!(joined, "a 1\nb 2\n# EOF\n");
    }
}
