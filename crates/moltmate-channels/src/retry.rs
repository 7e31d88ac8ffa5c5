//! Backoff with jitter and a shutdown-aware sleep, shared by every channel.

use moltmate_core::channel::{InboundMessage, InboundSink};
use moltmate_core::channel_status::{ChannelHealth, ErrorClass};
use moltmate_core::Shutdown;
use rand::Rng;
use std::time::Duration;

/// Sleep unless shutdown comes first. True if the full delay passed.
pub(crate) async fn sleep_or_shutdown(delay: Duration, shutdown: &Shutdown) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Exponential backoff with "equal jitter" (half fixed, half random).
#[derive(Debug)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            failures: 0,
        }
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let factor = 2u32.saturating_pow(self.failures.min(20));
        self.failures = self.failures.saturating_add(1);
        let full = self.initial.saturating_mul(factor).min(self.max);
        let half = full / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        let jitter = if jitter_ms == 0 {
            0
        } else {
            rand::rng().random_range(0..=jitter_ms)
        };
        half + Duration::from_millis(jitter)
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Hands one message to the sink until it is stored (durable before acknowledged: the caller
/// acknowledges to its service only after `true`). A refusal to store is counted on the
/// channel's status and retried with `backoff`. False on shutdown.
pub(crate) async fn deliver_until_stored(
    service: &'static str,
    sink: &dyn InboundSink,
    message: InboundMessage,
    health: &ChannelHealth,
    mut backoff: Backoff,
    shutdown: &Shutdown,
) -> bool {
    loop {
        if shutdown.is_cancelled() {
            return false;
        }
        match sink.accept(message.clone()).await {
            Ok(outcome) => {
                tracing::debug!(service, message = %message.external_id, ?outcome, "message accepted");
                return true;
            }
            Err(e) => {
                health.error(ErrorClass::Storage);
                tracing::warn!(service, message = %message.external_id, error = %e, "the gateway did not store the message, retrying it");
                if !sleep_or_shutdown(backoff.next_delay(), shutdown).await {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..30 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
        let late = b.next_delay();
        assert!(late >= Duration::from_millis(500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
