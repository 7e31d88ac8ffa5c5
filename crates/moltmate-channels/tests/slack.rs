//! The Slack channel against the fake Slack, without a gateway.

use async_trait::async_trait;
use moltmate_channels::{SlackChannel, SlackSettings};
use moltmate_core::channel::{AcceptError, Accepted, Channel, InboundMessage, InboundSink};
use moltmate_core::{ChannelKind, Shutdown};
use moltmate_testkit::slack::FakeSlack;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BOT: &str = "xoxb-1-BOT-secret";
const APP: &str = "xapp-1-APP-secret";

/// A sink that fails the first `fail` accepts (the gateway's database unavailable).
#[derive(Default)]
struct Sink {
    fail: Mutex<usize>,
    accepted: Mutex<Vec<InboundMessage>>,
}

#[async_trait]
impl InboundSink for Sink {
    async fn accept(&self, message: InboundMessage) -> Result<Accepted, AcceptError> {
        let mut fail = self.fail.lock().unwrap();
        if *fail > 0 {
            *fail -= 1;
            return Err(AcceptError::Storage("disk full".into()));
        }
        self.accepted.lock().unwrap().push(message);
        Ok(Accepted::Queued)
    }
    async fn cursor(&self, _: ChannelKind) -> Result<Option<i64>, AcceptError> {
        Ok(None)
    }
    async fn advance_cursor(&self, _: ChannelKind, _: i64) -> Result<(), AcceptError> {
        Ok(())
    }
}

fn settings(fake: &FakeSlack, bot: &str, app: &str) -> SlackSettings {
    let mut s = SlackSettings::new(bot, app).with_api_url(fake.api_url());
    s.backoff_initial = Duration::from_millis(50);
    s.backoff_max = Duration::from_millis(200);
    s
}

#[tokio::test]
async fn wrong_slack_tokens_stop_the_channel_with_a_clear_error_without_the_token() {
    let fake = FakeSlack::start(BOT, APP).await;
    for (bot, app, key) in [
        ("xoxb-1-wrong-SECRET", APP, "botToken"),
        (BOT, "xapp-1-wrong-SECRET", "appToken"),
    ] {
        let channel = SlackChannel::new(settings(&fake, bot, app)).unwrap();
        let err = tokio::time::timeout(
            Duration::from_secs(10),
            channel.run(Arc::new(Sink::default()), Shutdown::new()),
        )
        .await
        .expect("gives up at once")
        .unwrap_err()
        .to_string();
        assert!(err.contains(&format!("channels.slack.{key}")), "{err}");
        assert!(!err.contains("wrong-SECRET"), "{err}");
    }
}

#[tokio::test]
async fn an_envelope_is_acknowledged_only_after_the_gateway_stored_it() {
    let fake = FakeSlack::start(BOT, APP).await;
    let channel = Arc::new(SlackChannel::new(settings(&fake, BOT, APP)).unwrap());
    let sink = Arc::new(Sink {
        fail: Mutex::new(3),
        ..Sink::default()
    });
    let shutdown = Shutdown::new();
    let run = {
        let (channel, sink, shutdown) = (channel.clone(), sink.clone(), shutdown.clone());
        tokio::spawn(async move { channel.run(sink, shutdown).await })
    };
    assert!(fake.wait_connected(Duration::from_secs(10)).await);
    fake.push_dm("U7", "keep me", None);
    tokio::time::sleep(Duration::from_millis(60)).await;
    // While the store fails, the envelope stays unacknowledged (Slack would redeliver it).
    if sink.accepted.lock().unwrap().is_empty() {
        assert_eq!(fake.unacknowledged(), 1);
    }
    assert!(fake.wait_until_acknowledged(Duration::from_secs(10)).await);
    assert_eq!(sink.accepted.lock().unwrap().len(), 1);
    // A dropped connection: reconnects with a fresh URL.
    fake.drop_connection();
    fake.push_dm("U7", "after", None);
    assert!(fake.wait_until_acknowledged(Duration::from_secs(10)).await);
    assert_eq!(sink.accepted.lock().unwrap().len(), 2);
    assert!(fake.connections_opened() >= 2);
    // Socket Mode switched off: a clear, final error.
    fake.disconnect("link_disabled");
    let err = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("Socket Mode"), "{err}");
    shutdown.cancel();
}

/// Regression (review 10, M4): Socket Mode waited on the socket with no idle timeout and sent
/// no pings of its own, so a half-open connection (a rebooted router) looked connected forever
/// and nothing was received again.
#[tokio::test]
async fn slack_silent_connection_is_replaced() {
    let fake = FakeSlack::start(BOT, APP).await;
    let mut s = settings(&fake, BOT, APP);
    s.ping_interval = Duration::from_millis(100);
    s.idle_timeout = Duration::from_millis(400);
    let channel = Arc::new(SlackChannel::new(s).unwrap());
    let sink = Arc::new(Sink::default());
    let shutdown = Shutdown::new();
    let run = {
        let (channel, sink, shutdown) = (channel.clone(), sink.clone(), shutdown.clone());
        tokio::spawn(async move { channel.run(sink, shutdown).await })
    };
    assert!(fake.wait_connected(Duration::from_secs(10)).await);
    let opened = fake.connections_opened();
    // Pings answered: a quiet but live connection is kept.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(fake.connections_opened(), opened, "a live connection stays");
    fake.freeze_connection();
    assert!(
        fake.wait_connected(Duration::from_secs(10)).await,
        "a new connection"
    );
    assert!(fake.connections_opened() > opened);
    fake.push_dm("U7", "after the silence", None);
    assert!(fake.wait_until_acknowledged(Duration::from_secs(10)).await);
    assert_eq!(sink.accepted.lock().unwrap().len(), 1);
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), run).await;
}
