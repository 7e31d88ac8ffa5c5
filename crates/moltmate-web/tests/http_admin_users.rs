//! `/admin` as the operator's console: usage at a glance (inline SVG charts per user and
//! family) and what `moltmate users ...` does — add, sign-in link with a QR code, revoke,
//! reset and remove with a typed confirmation — each behind the admin session, the CSRF token
//! and the same-origin check.

mod common;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use common::*;
use moltmate_core::{ChannelKind, Identity, PeerId, UserId};
use moltmate_gateway::GatewaySettings;

fn form(cookie: &str, body: &str) -> Request<Body> {
    Request::post("/admin/users")
        .header(header::COOKIE, cookie)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

async fn dashboard(h: &Harness, cookie: &str) -> String {
    dashboard_at(h, cookie, "/admin").await
}

async fn dashboard_at(h: &Harness, cookie: &str, path: &str) -> String {
    let page = send(
        &h.app(),
        Request::get(path)
            .header(header::COOKIE, cookie)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(page.status, StatusCode::OK);
    page.body
}

fn family_settings() -> GatewaySettings {
    let anna = UserId::new("anna").unwrap();
    let mut settings = GatewaySettings::default();
    settings.families.insert(anna.clone(), "smiths".to_string());
    settings
        .trust_names
        .insert(anna.clone(), "family".to_string());
    settings.configured_identities.insert(
        Identity::new(ChannelKind::Telegram, PeerId::new("555").unwrap()),
        anna,
    );
    settings
}

#[tokio::test]
async fn the_dashboard_charts_usage_per_user_and_family_and_says_what_moltmate_json_decides() {
    let h = harness_with_gateway(test_settings(), family_settings());
    let (anna, _) = h.user("anna").await;
    h.gateway.store().ensure_user(&anna, None).await.unwrap();
    h.gateway
        .store()
        .link_identity(
            &Identity::new(ChannelKind::Telegram, PeerId::new("555").unwrap()),
            &anna,
            "config",
        )
        .await
        .unwrap();
    let (mallory, _) = h.user("mallory").await;
    // A hostile display name (Telegram first names are the sender's choice).
    h.gateway
        .store()
        .ensure_user(
            &UserId::new("eve").unwrap(),
            Some("<script>alert(1)</script>=cmd|x"),
        )
        .await
        .unwrap();
    for user in [&anna, &mallory] {
        let session = h.browser_session(user).await;
        let sent = send(&h.app(), chat_request(&session, "hello")).await;
        assert_eq!(sent.status, StatusCode::OK);
    }
    let admin = h.admin_session().await;
    let page = dashboard(&h, &admin.cookie).await;
    assert!(page.contains("Usage, last 14 days"));
    assert!(page.contains("<h3>Families</h3>") && page.contains("smiths"));
    assert!(
        page.contains("members: anna (moltmate.json)"),
        "family tile"
    );
    assert!(
        page.contains("<svg viewBox=\"0 0 140 36\""),
        "inline SVG charts"
    );
    assert!(page.contains("<rect class=\"bar\""));
    assert!(page.contains("<dt>Sandbox</dt><dd>no backend</dd>"));
    assert!(page.contains("<dt>Last seen</dt>"));
    assert!(page.contains("— (no model.prices)"));
    assert!(
        page.contains("family <span class=\"from-config\">moltmate.json</span>"),
        "trust from moltmate.json is marked"
    );
    assert!(page.contains("telegram:555 <span class=\"from-config\">moltmate.json</span>"));
    assert!(!page.contains("<script>alert(1)"), "names are escaped");
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(
        !page.contains("<script>") || page.matches("<script").count() == 1,
        "only admin.js"
    );
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no external assets"
    );
    assert!(!page.contains(ADMIN_TOKEN));
}

#[tokio::test]
async fn costs_are_estimated_from_model_prices() {
    let mut settings = test_settings();
    settings.prices = moltmate_ops::usage::PriceTable::new(std::collections::HashMap::from([(
        "test/echo".to_string(),
        moltmate_ops::usage::Price {
            input_per_m_tok: 1_000.0,
            output_per_m_tok: 2_000.0,
        },
    )]));
    let h = harness_with(settings);
    let (anna, _) = h.user("anna").await;
    let session = h.browser_session(&anna).await;
    send(&h.app(), chat_request(&session, "hello")).await;
    let admin = h.admin_session().await;
    let page = dashboard(&h, &admin.cookie).await;
    // 12 input and 7 output tokens at $1000 and $2000 per million.
    assert!(
        page.contains("<dt>Est. cost</dt><dd>$0.0260</dd>"),
        "{page}"
    );
    assert!(page.contains("Est. cost <span class=\"num\">$0.0260</span>"));
}

#[tokio::test]
async fn user_actions_need_the_admin_session_csrf_and_same_origin() {
    let h = harness();
    let admin = h.admin_session().await;
    let body = "action=add&user=zoe";
    let anonymous = send(&h.app(), form("", &format!("csrf={}&{body}", admin.csrf))).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let no_csrf = send(&h.app(), form(&admin.cookie, body)).await;
    assert_eq!(no_csrf.status, StatusCode::FORBIDDEN);
    let wrong = send(&h.app(), form(&admin.cookie, &format!("csrf=nope&{body}"))).await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    let mut cross = form(&admin.cookie, &format!("csrf={}&{body}", admin.csrf));
    cross
        .headers_mut()
        .insert("sec-fetch-site", "cross-site".parse().unwrap());
    assert_eq!(send(&h.app(), cross).await.status, StatusCode::FORBIDDEN);
    let mut foreign = form(&admin.cookie, &format!("csrf={}&{body}", admin.csrf));
    foreign
        .headers_mut()
        .insert(header::ORIGIN, "https://evil.example".parse().unwrap());
    foreign
        .headers_mut()
        .insert(header::HOST, "moltbot.example".parse().unwrap());
    assert_eq!(send(&h.app(), foreign).await.status, StatusCode::FORBIDDEN);
    // A user's own session is not the operator's.
    let (anna, _) = h.user("anna").await;
    let user_session = h.browser_session(&anna).await;
    let as_user = send(
        &h.app(),
        form(
            &user_session.cookie.replace("mm_session", "mm_admin"),
            &format!("csrf={}&{body}", user_session.csrf),
        ),
    )
    .await;
    assert_eq!(as_user.status, StatusCode::UNAUTHORIZED);
    assert!(h
        .gateway
        .store()
        .user(&UserId::new("zoe").unwrap())
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn add_user_makes_the_user_their_identities_and_home() {
    let h = harness();
    let admin = h.admin_session().await;
    let added = send(
        &h.app(),
        form(
            &admin.cookie,
            &format!(
                "csrf={}&action=add&user=zoe&name={}&identities={}",
                admin.csrf,
                encode("Zoë <b>"),
                encode("telegram:777, web:zoe")
            ),
        ),
    )
    .await;
    assert_eq!(added.status, StatusCode::SEE_OTHER, "{}", added.body);
    assert_eq!(added.header("location"), Some("/admin?done=added#users"));
    let zoe = UserId::new("zoe").unwrap();
    let record = h.gateway.store().user(&zoe).await.unwrap().unwrap();
    assert_eq!(record.display_name.as_deref(), Some("Zoë <b>"));
    assert_eq!(record.identities.len(), 2);
    assert!(h.dir.path().join("users/zoe/memory").is_dir(), "home made");
    let audit = h.gateway.store().recent_audit(Some(&zoe), 5).await.unwrap();
    assert!(audit.iter().any(|e| e.kind == "admin_user_added"));

    // Bad input changes nothing.
    for body in [
        "action=add&user=..%2Fetc",
        "action=add&user=bob&identities=nonsense",
        "action=add&user=bob&name=a%1Bb",
        "action=fly&user=bob",
    ] {
        let response = send(
            &h.app(),
            form(&admin.cookie, &format!("csrf={}&{body}", admin.csrf)),
        )
        .await;
        assert_eq!(
            response.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            response.body
        );
    }
    assert!(h
        .gateway
        .store()
        .user(&UserId::new("bob").unwrap())
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn a_sign_in_link_is_shown_once_as_a_qr_code_and_signs_the_member_in() {
    let mut settings = test_settings();
    settings.base_url = "https://moltbot.example".to_string();
    let h = harness_with(settings);
    let (anna, _) = h.user("anna").await;
    let admin = h.admin_session().await;
    let page = send(
        &h.app(),
        form(
            &admin.cookie,
            &format!("csrf={}&action=link&user=anna", admin.csrf),
        ),
    )
    .await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.header("cache-control"), Some("no-store"));
    assert!(page.body.contains("<svg class=\"qr\""), "QR code inline");
    assert!(page.body.contains("<path class=\"qr-dark\" d=\"M"));
    let start = page
        .body
        .find("https://moltbot.example/login/")
        .expect("the link, on the public URL");
    let url = &page.body[start..];
    let code = url["https://moltbot.example/login/".len()..]
        .split('<')
        .next()
        .unwrap();
    let redeemed = send(
        &h.app(),
        Request::post(format!("/login/{code}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(redeemed.status, StatusCode::SEE_OTHER);
    assert!(
        redeemed.cookie("mm_session").is_some(),
        "the member is signed in"
    );
    let again = send(
        &h.app(),
        Request::post(format!("/login/{code}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(again.cookie("mm_session").is_none(), "once only");
    let _ = anna;
}

#[tokio::test]
async fn revoke_ends_tokens_and_browser_sessions() {
    let h = harness();
    let (anna, token) = h.user("anna").await;
    let session = h.browser_session(&anna).await;
    let admin = h.admin_session().await;
    let revoked = send(
        &h.app(),
        form(
            &admin.cookie,
            &format!("csrf={}&action=revoke&user=anna", admin.csrf),
        ),
    )
    .await;
    assert_eq!(revoked.status, StatusCode::SEE_OTHER);
    assert_eq!(
        h.gateway.store().user_for_token(&token).await.unwrap(),
        None
    );
    let history = send(
        &h.app(),
        Request::get("/api/history")
            .header(header::COOKIE, &session.cookie)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(history.status, StatusCode::UNAUTHORIZED);
    let missing = send(
        &h.app(),
        form(
            &admin.cookie,
            &format!("csrf={}&action=revoke&user=nobody", admin.csrf),
        ),
    )
    .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn reset_and_remove_need_the_user_id_typed_and_do_what_the_cli_does() {
    let h = harness();
    let (anna, token) = h.user("anna").await;
    let session = h.browser_session(&anna).await;
    send(&h.app(), chat_request(&session, "remember chess")).await;
    let home = h.dir.path().join("users/anna");
    std::fs::write(home.join("MEMORY.md"), "Anna likes chess").unwrap();
    let admin = h.admin_session().await;

    for confirm in ["", "ann", "Anna", "bob"] {
        let refused = send(
            &h.app(),
            form(
                &admin.cookie,
                &format!(
                    "csrf={}&action=reset&user=anna&confirm={confirm}",
                    admin.csrf
                ),
            ),
        )
        .await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{confirm:?}");
        assert!(
            refused.body.contains("type the user id"),
            "{}",
            refused.body
        );
    }
    assert!(home.join("MEMORY.md").exists(), "nothing was reset");

    let reset = send(
        &h.app(),
        form(
            &admin.cookie,
            &format!("csrf={}&action=reset&user=anna&confirm=anna", admin.csrf),
        ),
    )
    .await;
    assert_eq!(reset.status, StatusCode::SEE_OTHER, "{}", reset.body);
    assert!(!home.join("MEMORY.md").exists(), "the home was wiped");
    assert!(home.join("memory").is_dir(), "and made fresh");
    let archives: Vec<_> = std::fs::read_dir(h.dir.path().join("archive"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(archives.len(), 1);
    assert_eq!(
        std::fs::read_to_string(archives[0].path().join("home/MEMORY.md")).unwrap(),
        "Anna likes chess"
    );
    let export: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(archives[0].path().join("export.json")).unwrap(),
    )
    .unwrap();
    assert!(export["transcripts"]
        .as_array()
        .is_some_and(|t| !t.is_empty()));
    assert!(h
        .gateway
        .store()
        .user_transcripts(&anna)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        h.gateway.store().user_for_token(&token).await.unwrap(),
        None,
        "reset ends the user's tokens, like the CLI (nothing of the old life signs in)"
    );

    let removed = send(
        &h.app(),
        form(
            &admin.cookie,
            &format!("csrf={}&action=remove&user=anna&confirm=anna", admin.csrf),
        ),
    )
    .await;
    assert_eq!(removed.status, StatusCode::SEE_OTHER);
    assert!(h.gateway.store().user(&anna).await.unwrap().is_none());
    assert!(!home.exists());
    assert_eq!(
        std::fs::read_dir(h.dir.path().join("archive"))
            .unwrap()
            .count(),
        2
    );
    assert_eq!(
        removed.header("location"),
        Some("/admin?done=removed#users")
    );
    let page = dashboard_at(&h, &admin.cookie, "/admin?done=removed").await;
    assert!(page.contains("User removed"));
}
