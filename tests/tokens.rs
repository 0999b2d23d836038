//! Media access tokens: minted by the API for signed-in users and by `dangjian token`, checked the
//! way the room WebSocket checks them.

mod common;

use std::process::Command;

use common::{Backend, TestApp};
use serde_json::Value;

async fn validate(app: &TestApp, room: &str, token: &str) -> (u16, Value) {
    let r = app
        .client
        .get(app.url(&format!("/api/v1/rooms/{room}/validate")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn signed_in_users_get_tokens_for_rooms(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    assert_eq!(
        app.client
            .post(app.url("/api/v1/rooms/branch-1/tokens"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );

    app.sign_in_admin().await;
    let member = app.user_client("li.si", "member").await;
    let r = member
        .post(app.url("/api/v1/rooms/branch-1/tokens?ttl=600"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["identity"], "li.si");
    assert_eq!(body["expires_in"], 600);
    let token = body["token"].as_str().unwrap();

    let (status, claims) = validate(&app, "branch-1", token).await;
    assert_eq!(status, 200);
    assert_eq!(claims["identity"], "li.si");
    assert_eq!(claims["grants"]["publish"], true);
    assert_eq!(
        claims["grants"]["admin"], false,
        "members cannot run the meeting"
    );

    let r = app
        .client
        .post(app.url("/api/v1/rooms/branch-1/tokens"))
        .send()
        .await
        .unwrap();
    let admin_token: Value = r.json().await.unwrap();
    let (_, claims) = validate(&app, "branch-1", admin_token["token"].as_str().unwrap()).await;
    assert_eq!(claims["grants"]["admin"], true);
    assert_eq!(claims["grants"]["record"], true);

    let r = member
        .post(app.url("/api/v1/rooms/branch-1/tokens?ttl=999999"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    app.stop().await;
}

async fn forged_expired_and_wrong_room_tokens_are_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let body: Value = app
        .client
        .post(app.url("/api/v1/rooms/r1/tokens"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = body["token"].as_str().unwrap().to_string();

    let (status, body) = validate(&app, "r2", &token).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["message"].as_str().unwrap().contains("r1"));

    // Signed with another key: forged.
    let other = signaling::token::TokenKey::generate();
    let forged = other
        .mint(&signaling::token::TokenRequest {
            room: "r1".into(),
            identity: "intruder".into(),
            name: String::new(),
            grants: signaling::token::Grants::PARTICIPANT,
            ttl: std::time::Duration::from_secs(60),
        })
        .unwrap();
    assert_eq!(validate(&app, "r1", &forged).await.0, 401);
    // A flipped signature byte.
    let mut tampered = token.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    assert_eq!(
        validate(&app, "r1", &String::from_utf8(tampered).unwrap())
            .await
            .0,
        401
    );
    assert_eq!(validate(&app, "r1", "not.a.jwt").await.0, 401);

    let r = app
        .client
        .get(app.url("/api/v1/rooms/r1/validate"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "no token at all");

    // Expired: minted by the CLI with the server's key and a one-second lifetime.
    let expired = cli_token(&app, &["--room", "r1", "--identity", "late", "--ttl", "1s"]);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (status, body) = validate(&app, "r1", &expired).await;
    assert_eq!(status, 401);
    assert!(
        body["message"].as_str().unwrap().contains("expired"),
        "{body}"
    );
    app.stop().await;
}

fn cli_token(app: &TestApp, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dangjian"))
        .arg("token")
        .args(args)
        .arg("--data")
        .arg(app.data_dir())
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

async fn cli_tokens_carry_the_asked_grants(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let token = cli_token(
        &app,
        &[
            "--room",
            "studio",
            "--identity",
            "lecturer-1",
            "--name",
            "王老师",
            "--grant",
            "publish,record",
        ],
    );
    let (status, claims) = validate(&app, "studio", &token).await;
    assert_eq!(status, 200);
    assert_eq!(claims["name"], "王老师");
    assert_eq!(claims["grants"]["publish"], true);
    assert_eq!(claims["grants"]["record"], true);
    assert_eq!(claims["grants"]["subscribe"], false);

    let out = Command::new(env!("CARGO_BIN_EXE_dangjian"))
        .args([
            "token",
            "--room",
            "x",
            "--identity",
            "y",
            "--grant",
            "fly",
            "--data",
        ])
        .arg(app.data_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown grant `fly`"));
    app.stop().await;
}

on_both_databases!(
    signed_in_users_get_tokens_for_rooms,
    forged_expired_and_wrong_room_tokens_are_refused,
    cli_tokens_carry_the_asked_grants,
);

#[test]
fn cli_token_without_a_key_says_how_to_get_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dangjian"))
        .args(["token", "--room", "x", "--identity", "y", "--data"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("token.key") && err.contains("start the server once"),
        "{err}"
    );
}
