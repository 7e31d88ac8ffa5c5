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
use moltmate_core::sandbox::SandboxAggregate;
use serde_json::json;
use std::fmt::Write;

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

/// The sandbox backend's counters and the aggregate over all sandboxes in OpenMetrics text
/// (read at scrape time; the aggregate from the parent cgroup).
async fn sandbox_exposition(state: &WebState) -> String {
    let Some(sandbox) = state.gateway().sandbox() else {
        return "# EOF\n".to_string();
    };
    let stats = sandbox.stats();
    let backend = sandbox.backend();
    let aggregate = sandbox.aggregate().await;
    let mut text = format!(
        "# HELP moltmate_sandbox_starts Sandboxes started (containers created, bubblewrap sandboxes spawned).\n\
         # TYPE moltmate_sandbox_starts counter\n\
         moltmate_sandbox_starts_total{{backend=\"{backend}\"}} {}\n\
         # HELP moltmate_sandbox_pruned Idle sandboxes removed.\n\
         # TYPE moltmate_sandbox_pruned counter\n\
         moltmate_sandbox_pruned_total{{backend=\"{backend}\"}} {}\n",
        stats.started, stats.pruned
    );
    if let Some(aggregate) = aggregate {
        text.push_str(&aggregate_exposition(backend, &aggregate));
    }
    text.push_str("# EOF\n");
    text
}

/// All sandboxes together: alive and queued against `maxActive`, memory, CPU and pids against
/// the totals. The only label is the backend's fixed name; a value the host cannot give (no
/// parent cgroup) is left out rather than reported as zero.
pub fn aggregate_exposition(backend: &str, a: &SandboxAggregate) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, sample: &str, value: Option<String>| {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
        if let Some(value) = value {
            let _ = writeln!(out, "{sample}{{backend=\"{backend}\"}} {value}");
        }
    };
    let gauge = |name: &'static str| (name, "gauge", name);
    for ((name, kind, sample), help, value) in [
        (gauge("moltmate_sandbox_alive"), "Sandboxes alive now (running containers, warm ones included; running bubblewrap commands).", Some(a.alive.to_string())),
        (gauge("moltmate_sandbox_max_active"), "sandbox.maxActive: sandboxes allowed alive at once.", Some(a.max_active.to_string())),
        (gauge("moltmate_sandbox_queued"), "Commands waiting for a sandbox slot.", Some(a.queued.to_string())),
        (("moltmate_sandbox_evictions", "counter", "moltmate_sandbox_evictions_total"), "Idle sandboxes stopped to make room for another.", Some(a.evicted.to_string())),
        (("moltmate_sandbox_queue_timeouts", "counter", "moltmate_sandbox_queue_timeouts_total"), "Commands that waited past sandbox.queueTimeoutSeconds and did not run.", Some(a.queue_timeouts.to_string())),
        (gauge("moltmate_sandbox_cgroup_enforced"), "1 when all sandboxes live under the gateway's parent cgroup with the total limits.", Some(u8::from(a.cgroup.is_some()).to_string())),
        (gauge("moltmate_sandbox_memory_bytes"), "Memory in use by all sandboxes together (parent cgroup).", a.memory_used_bytes.map(|v| v.to_string())),
        (gauge("moltmate_sandbox_memory_peak_bytes"), "Highest memory use of all sandboxes together the kernel recorded.", a.memory_peak_bytes.map(|v| v.to_string())),
        (gauge("moltmate_sandbox_memory_limit_bytes"), "sandbox.total.memoryMb in bytes.", Some(a.memory_limit_bytes.to_string())),
        (("moltmate_sandbox_cpu_seconds", "counter", "moltmate_sandbox_cpu_seconds_total"), "CPU time used by all sandboxes together (parent cgroup).", a.cpu_used_micros.map(|us| format!("{:.6}", us as f64 / 1e6))),
        (gauge("moltmate_sandbox_cpu_limit_cores"), "sandbox.total.cpus.", Some(format!("{:.3}", a.cpu_limit_millis as f64 / 1000.0))),
        (gauge("moltmate_sandbox_pids"), "Processes and threads of all sandboxes together.", a.pids_used.map(|v| v.to_string())),
        (gauge("moltmate_sandbox_pids_limit"), "sandbox.total.pids.", Some(a.pids_limit.to_string())),
    ] {
        family(name, kind, help, sample, value);
    }
    out
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
        sandbox_exposition(&state).await,
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
    fn aggregate_metrics_use_fixed_labels_and_leave_out_unknown_values() {
        let a = SandboxAggregate {
            alive: 3,
            max_active: 32,
            queued: 1,
            evicted: 2,
            queue_timeouts: 0,
            memory_limit_bytes: 1 << 30,
            memory_used_bytes: Some(812 << 20),
            memory_peak_bytes: None,
            cpu_limit_millis: 1500,
            cpu_used_micros: Some(2_500_000),
            cpu_recent_millis: Some(700),
            pids_limit: 4096,
            pids_used: Some(17),
            cgroup: Some("/moltmate".into()),
            cgroup_problem: None,
        };
        let text = aggregate_exposition("docker", &a);
        assert!(
            text.contains("moltmate_sandbox_alive{backend=\"docker\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("moltmate_sandbox_queued{backend=\"docker\"} 1\n"));
        assert!(text.contains("moltmate_sandbox_evictions_total{backend=\"docker\"} 2\n"));
        assert!(text.contains("moltmate_sandbox_memory_bytes{backend=\"docker\"} 851443712\n"));
        assert!(
            text.contains("moltmate_sandbox_memory_limit_bytes{backend=\"docker\"} 1073741824\n")
        );
        assert!(text.contains("moltmate_sandbox_cpu_seconds_total{backend=\"docker\"} 2.500000\n"));
        assert!(text.contains("moltmate_sandbox_cpu_limit_cores{backend=\"docker\"} 1.500\n"));
        assert!(text.contains("moltmate_sandbox_cgroup_enforced{backend=\"docker\"} 1\n"));
        assert!(
            !text.contains("moltmate_sandbox_memory_peak_bytes{"),
            "unknown is left out"
        );
        // Every sample line has exactly the one fixed label.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.contains("{backend=\"docker\"} "), "{line}");
        }
        let joined = join_expositions(&[format!("{text}# EOF\n")]);
        assert_eq!(joined.matches("# EOF").count(), 1);
    }

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
