//! The Discord channel against the fake Discord, without a gateway: connection handling.

use async_trait::async_trait;
use moltmate_channels::{DiscordChannel, DiscordSettings};
use moltmate_core::channel::{AcceptError, Accepted, Channel, InboundMessage, InboundSink};
use moltmate_core::{ChannelKind, Shutdown};
use moltmate_testkit::discord::FakeDiscord;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TOKEN: &str = "MTIz.test_TOKEN-secret";

#[derive(Default)]
struct Sink {
    accepted: Mutex<Vec<InboundMessage>>,
}

#[async_trait]
impl InboundSink for Sink {
    async fn accept(&self, message: InboundMessage) -> Result<Accepted, AcceptError> {
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

fn settings(fake: &FakeDiscord, token: &str) -> DiscordSettings {
    let mut s = DiscordSettings::new(token).with_api_url(fake.api_url());
    s.backoff_initial = Duration::from_millis(50);
    s.backoff_max = Duration::from_millis(200);
    s
}

async fn wait_for(sink: &Sink, count: usize) -> Vec<String> {
    for _ in 0..400 {
        let texts: Vec<String> = sink
            .accepted
            .lock()
            .unwrap()
            .iter()
            .map(|m| m.text.clone())
            .collect();
        if texts.len() >= count {
            return texts;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {count} messages");
}

#[tokio::test]
async fn a_wrong_discord_token_stops_the_channel_with_a_clear_error_without_the_token() {
    let fake = FakeDiscord::start(TOKEN).await;
    let channel = DiscordChannel::new(settings(&fake, "MTIz.wrong_SECRET")).unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        channel.run(Arc::new(Sink::default()), Shutdown::new()),
    )
    .await
    .expect("gives up at once instead of retrying forever");
    let err = result.unwrap_err().to_string();
    assert!(err.contains("channels.discord.botToken"), "{err}");
    assert!(!err.contains("wrong_SECRET"), "{err}");
    let sent = channel
        .send_text("123", "hi")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        sent.contains("401") && !sent.contains("wrong_SECRET"),
        "{sent}"
    );
}

#[tokio::test]
async fn an_unacknowledged_heartbeat_reconnects_and_resumes() {
    let fake = FakeDiscord::start(TOKEN).await;
    fake.set_heartbeat_interval(Duration::from_millis(150));
    let channel = Arc::new(DiscordChannel::new(settings(&fake, TOKEN)).unwrap());
    let sink = Arc::new(Sink::default());
    let shutdown = Shutdown::new();
    let run = {
        let (channel, sink, shutdown) = (channel.clone(), sink.clone(), shutdown.clone());
        tokio::spawn(async move { channel.run(sink, shutdown).await })
    };
    assert!(fake.wait_connected(Duration::from_secs(10)).await);
    fake.push_dm(7, "one");
    assert_eq!(wait_for(&sink, 1).await, vec!["one"]);
    fake.set_drop_acks(true);
    for _ in 0..200 {
        if fake.heartbeats() >= 4 && !fake.is_connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fake.set_drop_acks(false);
    fake.push_dm(7, "two");
    assert_eq!(wait_for(&sink, 2).await, vec!["one", "two"]);
    assert!(fake.resumes() >= 1, "resumed after the zombie connection");
    assert_eq!(fake.identifies().len(), 1);
    shutdown.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_expired_session_identifies_anew() {
    let fake = FakeDiscord::start(TOKEN).await;
    let channel = Arc::new(DiscordChannel::new(settings(&fake, TOKEN)).unwrap());
    let sink = Arc::new(Sink::default());
    let shutdown = Shutdown::new();
    let run = {
        let (channel, sink, shutdown) = (channel.clone(), sink.clone(), shutdown.clone());
        tokio::spawn(async move { channel.run(sink, shutdown).await })
    };
    assert!(fake.wait_connected(Duration::from_secs(10)).await);
    fake.expire_session();
    fake.disconnect(4000);
    // Invalid session (op 9) → a random 1-5 s wait → Identify.
    for _ in 0..400 {
        if fake.identifies().len() == 2 && fake.is_connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(fake.identifies().len(), 2);
    fake.push_dm(7, "after");
    assert_eq!(wait_for(&sink, 1).await, vec!["after"]);
    channel
        .send_typing(&FakeDiscord::dm_channel(7))
        .await
        .unwrap();
    assert_eq!(fake.typing_calls(), vec![FakeDiscord::dm_channel(7)]);
    shutdown.cancel();
    run.await.unwrap().unwrap();
}
