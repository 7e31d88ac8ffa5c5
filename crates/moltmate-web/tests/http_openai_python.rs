//! The official `openai` Python package against the API. Runs only when
//! `MOLTMATE_OPENAI_PYTHON` names a virtualenv (or its python) with `openai` installed.

mod common;

use common::*;
use std::path::PathBuf;

const SCRIPT: &str = r#"
import os, openai
base = os.environ["MOLTMATE_BASE"] + "/v1"
client = openai.OpenAI(base_url=base, api_key=os.environ["MOLTMATE_TOKEN"], max_retries=0)
assert [m.id for m in client.models.list().data] == ["moltmate"]
reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "py hello"}])
assert reply.model == "gpt-4o", reply
assert reply.choices[0].message.content == "echo: py hello", reply
assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens > 0, reply
stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "py stream"}], stream=True)
text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
assert text == "echo: py stream", text
stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "py usage"}], stream=True, stream_options={"include_usage": True})
usage = [chunk.usage for chunk in stream if chunk.usage]
assert len(usage) == 1 and usage[0].completion_tokens > 0, usage
try:
    openai.OpenAI(base_url=base, api_key="mm_wrong", max_retries=0).models.list()
    raise SystemExit("a wrong token was accepted")
except openai.AuthenticationError:
    pass
print("openai-python ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_client_works() {
    let Some(venv) = std::env::var_os("MOLTMATE_OPENAI_PYTHON") else {
        println!("SKIP: MOLTMATE_OPENAI_PYTHON is not set");
        return;
    };
    let venv = PathBuf::from(venv);
    let python = if venv.is_dir() {
        venv.join("bin/python")
    } else {
        venv
    };
    let h = harness();
    let (_, token) = h.user("anna").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(moltmate_web::serve(
        h.state.clone(),
        listener,
        h.shutdown.clone(),
    ));
    let output = tokio::process::Command::new(&python)
        .arg("-c")
        .arg(SCRIPT)
        .env("MOLTMATE_BASE", &base)
        .env("MOLTMATE_TOKEN", &token)
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("openai-python ok"), "{stdout}");
    h.shutdown.cancel();
    server.await.unwrap().unwrap();
}
