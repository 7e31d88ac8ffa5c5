//! The Signal channel against the fake signal-cli daemon, without a gateway.

use async_trait::async_trait;
use moltmate_channels::signal::DaemonAddress;
use moltmate_channels::{SignalChannel, SignalDaemon, SignalSettings};
use moltmate_core::channel::{AcceptError, Accepted, Channel, InboundMessage, InboundSink};
use moltmate_core::{ChannelKind, Shutdown};
use moltmate_testkit::signal::FakeSignalCli;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ACCOUNT: &str = "+4917000000001";
const ALICE: &str = "+4917011111111";

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

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_daemon_that_stops_answering_is_reconnected() {
    let fake = FakeSignalCli::start_tcp(ACCOUNT).await;
    let mut settings = SignalSettings::new(
        ACCOUNT,
        SignalDaemon::External(DaemonAddress::parse(fake.address()).unwrap()),
    );
    settings.request_timeout = Duration::from_millis(500);
    settings.link_check_interval = Duration::from_millis(200);
    settings.backoff_initial = Duration::from_millis(50);
    settings.backoff_max = Duration::from_millis(200);
    let channel = Arc::new(SignalChannel::new(settings).unwrap());
    let health = channel.health();
    let sink = Arc::new(Sink::default());
    let shutdown = Shutdown::new();
    let run = {
        let (channel, sink, shutdown) = (channel.clone(), sink.clone(), shutdown.clone());
        tokio::spawn(async move { channel.run(sink, shutdown).await })
    };
    fake.push_text(ALICE, "before");
    wait_until("the first message", || {
        sink.accepted.lock().unwrap().len() == 1
    })
    .await;
    assert!(health.snapshot().connected);

    fake.freeze();
    let connections = fake.connections();
    wait_until("the hang to be noticed", || !health.snapshot().connected).await;
    let sent = channel.send_text(ALICE, "into the void").await;
    assert!(sent.is_err(), "a send to a hung daemon fails: {sent:?}");
    wait_until("a new connection", || fake.connections() > connections).await;

    fake.unfreeze();
    wait_until("connected again", || health.snapshot().connected).await;
    fake.push_text(ALICE, "after");
    wait_until("the message after the hang", || {
        sink.accepted.lock().unwrap().len() == 2
    })
    .await;
    channel
        .send_text(ALICE, "a reply")
        .await
        .expect("replies go out again");
    assert!(fake
        .sent_messages()
        .iter()
        .any(|m| m.recipient == ALICE && m.text == "a reply"));
    shutdown.cancel();
    run.await.unwrap().unwrap();
}
