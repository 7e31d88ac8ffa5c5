//! `serve` on a real socket: streaming reaches the client as it happens, client IPs are rate
//! limited, and shutdown is graceful and prompt.

mod common;

use common::*;
use futures::StreamExt;
use std::time::Duration;

async fn start(h: &Harness) -> (String, tokio::task::JoinHandle<std::io::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(moltmate_web::serve(
        h.state.clone(),
        listener,
        h.shutdown.clone(),
    ));
    (base, server)
}

#[tokio::test]
async fn streams_over_tcp_and_shuts_down_gracefully() {
    let h = harness();
    let (_, token) = h.user("anna").await;
    let (base, server) = start(&h).await;
    let client = reqwest::Client::new();

    let health: serde_json::Value = client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");

    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "over tcp"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut reads = 0;
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        reads += 1;
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(
        reads >= 3,
        "the answer arrived in several reads, not all at the end ({reads})"
    );
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    h.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns promptly")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn client_ips_are_rate_limited_even_with_fresh_bogus_tokens() {
    let h = harness_with(moltmate_web::WebSettings {
        unauthenticated_per_minute: 1,
        unauthenticated_burst: 2,
        ..test_settings()
    });
    let (base, _server) = start(&h).await;
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    for i in 0..3 {
        let response = client
            .get(format!("{base}/v1/models"))
            .bearer_auth(format!("mm_bogus{i}"))
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, vec![401, 401, 429]);
    h.shutdown.cancel();
}

#[tokio::test]
async fn an_open_stream_ends_at_shutdown() {
    // A model that never finishes: the stream must still end when the server stops.
    let h = harness();
    let (_, token) = h.user("anna").await;
    let (base, server) = start(&h).await;
    let client = reqwest::Client::new();
    let (anna, _) = h.user("anna").await;
    // Hold the user's lock so the turn cannot start: the answer stays pending.
    let homes = moltmate_store::Homes::new(h.dir.path());
    let lock = tokio::task::spawn_blocking(move || homes.lock_user(&anna).unwrap())
        .await
        .unwrap();
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&token)
        .json(
            &serde_json::json!({"stream": true, "messages": [{"role": "user", "content": "wait"}]}),
        )
        .send()
        .await
        .unwrap();
    let reader = tokio::spawn(async move { response.text().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.shutdown.cancel();
    let text = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("the stream ended")
        .unwrap();
    assert!(text.contains("shutting_down"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"));
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns")
        .unwrap()
        .unwrap();
    drop(lock);
}
