//! The `/rtc` WebSocket facing bad input: refused tokens, broken frames, garbage SDP, missing
//! grants, and participants who leave or just drop. Every check is what a client would notice.

mod common;

use std::time::Duration;

use common::{Backend, TestApp};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use signaling::token::{Grants, TokenKey, TokenRequest};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

/// How long any single wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(5);

/// Mints tokens with the key the server under test loaded (`token.key` in its data directory).
fn server_key(app: &TestApp) -> TokenKey {
    let hex = std::fs::read_to_string(app.data_dir().join("token.key")).unwrap();
    TokenKey::from_hex(&hex).unwrap()
}

fn mint(key: &TokenKey, room: &str, identity: &str, grants: &str, ttl: Duration) -> String {
    key.mint(&TokenRequest {
        room: room.into(),
        identity: identity.into(),
        name: format!("Name of {identity}"),
        grants: grants.parse::<Grants>().unwrap(),
        ttl,
    })
    .unwrap()
}

/// A token from the server's key for `identity` in `room` with `grants`, valid for an hour.
fn token(app: &TestApp, room: &str, identity: &str, grants: &str) -> String {
    mint(
        &server_key(app),
        room,
        identity,
        grants,
        Duration::from_secs(3600),
    )
}

const PARTICIPANT: &str = "publish,subscribe,data";

fn rtc_url(app: &TestApp, query: &str) -> String {
    format!("ws://{}/rtc?{query}", app.addr)
}

/// The HTTP status and JSON body of a refused upgrade; panics if the upgrade succeeds.
async fn refused(url: &str) -> (u16, Value) {
    match timeout(WAIT, connect_async(url))
        .await
        .expect("handshake timed out")
    {
        Ok(_) => panic!("upgrade to {url} was accepted"),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            (resp.status().as_u16(), body)
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
    }
}

/// One participant's WebSocket.
struct Client {
    who: String,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    async fn connect_url(who: &str, url: &str) -> Client {
        let (ws, resp) = timeout(WAIT, connect_async(url))
            .await
            .expect("handshake timed out")
            .unwrap_or_else(|e| panic!("{who} cannot connect: {e}"));
        assert_eq!(resp.status().as_u16(), 101);
        Client {
            who: who.into(),
            ws,
        }
    }

    /// Connects with a fresh token and waits for `joined`, which it returns.
    async fn join(app: &TestApp, room: &str, identity: &str, grants: &str) -> (Client, Value) {
        let t = token(app, room, identity, grants);
        let mut c =
            Client::connect_url(identity, &rtc_url(app, &format!("access_token={t}"))).await;
        let joined = c.next_json().await;
        assert_eq!(joined["type"], "joined", "{identity}'s first message");
        (c, joined)
    }

    async fn send_text(&mut self, text: impl Into<String>) {
        let text: String = text.into();
        timeout(WAIT, self.ws.send(Message::text(text)))
            .await
            .expect("send timed out")
            .unwrap_or_else(|e| panic!("{} cannot send: {e}", self.who));
    }

    async fn send(&mut self, v: Value) {
        self.send_text(v.to_string()).await;
    }

    /// The next JSON message; panics on anything else (a close included) or after [`WAIT`].
    async fn next_json(&mut self) -> Value {
        loop {
            let frame = timeout(WAIT, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{} waited in vain for a message", self.who));
            match frame {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("{} expected a JSON message, got {other:?}", self.who),
            }
        }
    }

    /// The next message of type `ty`, skipping the others (subscriber offers and the like).
    async fn expect(&mut self, ty: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let m = tokio::time::timeout_at(deadline, self.next_json())
                .await
                .unwrap_or_else(|_| panic!("{} waited in vain for `{ty}`", self.who));
            if m["type"] == ty {
                return m;
            }
        }
    }

    /// The next `error`, whose `code` must be `code`.
    async fn expect_error(&mut self, code: &str) -> Value {
        let e = self.expect("error").await;
        assert_eq!(e["code"], code, "{}: {e}", self.who);
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        e
    }

    /// Proves the connection is alive: a ping is answered with the same id.
    async fn ping(&mut self, id: u64) {
        self.send(json!({"type": "ping", "id": id})).await;
        let pong = self.expect("pong").await;
        assert_eq!(pong, json!({"type": "pong", "id": id}));
    }

    /// Reads until the server closes; returns the close code (messages before it are skipped).
    async fn expect_close(&mut self) -> u16 {
        let deadline = Instant::now() + WAIT;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{} waited in vain for a close", self.who));
            match frame {
                Some(Ok(Message::Close(Some(f)))) => return f.code.into(),
                Some(Ok(Message::Close(None))) => panic!("{}: close without a code", self.who),
                Some(Ok(_)) => continue,
                other => panic!("{} expected a close frame, got {other:?}", self.who),
            }
        }
    }

    /// Reads for `period` and fails on any message whose type is in `unwanted`.
    async fn quiet_for(&mut self, period: Duration, unwanted: &[&str]) {
        let deadline = Instant::now() + period;
        while let Ok(frame) = tokio::time::timeout_at(deadline, self.ws.next()).await {
            match frame {
                Some(Ok(Message::Text(t))) => {
                    let m: Value = serde_json::from_str(&t).unwrap();
                    let ty = m["type"].as_str().unwrap_or_default();
                    assert!(!unwanted.contains(&ty), "{} got {m}", self.who);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!(
                    "{} expected the connection to stay, got {other:?}",
                    self.who
                ),
            }
        }
    }

    /// Goes away without a word: no `leave`, no close frame, just the TCP connection dropped.
    fn drop_connection(self) {
        drop(self.ws);
    }
}

#[tokio::test]
async fn missing_forged_and_expired_tokens_get_401_before_the_upgrade() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    // Minted first so that it has expired by the time the other cases are done.
    let expired = mint(
        &server_key(&app),
        "a",
        "late",
        PARTICIPANT,
        Duration::from_secs(1),
    );
    let started = Instant::now();

    let (status, body) = refused(&rtc_url(&app, "")).await;
    assert_eq!(status, 401, "no token: {body}");
    assert_eq!(body["error"], "unauthorized");
    let (status, _) = refused(&rtc_url(&app, "room=a")).await;
    assert_eq!(status, 401, "no token, with a room");

    let forged = mint(
        &TokenKey::generate(),
        "a",
        "intruder",
        PARTICIPANT,
        Duration::from_secs(60),
    );
    let (status, body) = refused(&rtc_url(&app, &format!("access_token={forged}"))).await;
    assert_eq!(status, 401, "forged: {body}");
    let (status, _) = refused(&rtc_url(&app, &format!("access_token={forged}&room=a"))).await;
    assert_eq!(status, 401, "forged, with its room");
    let (status, _) = refused(&rtc_url(&app, "access_token=not.a.jwt")).await;
    assert_eq!(status, 401, "not a JWT");

    // `exp` is in whole seconds and checked without leeway: 2.1 s is past it whatever the phase.
    tokio::time::sleep_until(started + Duration::from_millis(2100)).await;
    let (status, body) = refused(&rtc_url(&app, &format!("access_token={expired}&room=a"))).await;
    assert_eq!(status, 401, "expired: {body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("expired"),
        "{body}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_token_for_another_room_gets_403() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let t = token(&app, "room-a", "alice", PARTICIPANT);
    let (status, body) = refused(&rtc_url(&app, &format!("access_token={t}&room=room-b"))).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "forbidden");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("room-a"),
        "{body}"
    );
    // The same token for its own room is fine.
    let mut c = Client::connect_url(
        "alice",
        &rtc_url(&app, &format!("access_token={t}&room=room-a")),
    )
    .await;
    assert_eq!(c.next_json().await["type"], "joined");
    app.stop().await;
}

#[tokio::test]
async fn a_valid_token_is_greeted_with_joined() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (mut first, joined) = Client::join(&app, "branch-1", "zhang.san", PARTICIPANT).await;
    assert_eq!(joined["room"], "branch-1");
    assert_eq!(joined["you"]["identity"], "zhang.san");
    assert_eq!(joined["you"]["name"], "Name of zhang.san");
    assert_eq!(joined["you"]["can_publish"], true);
    assert_eq!(joined["you"]["is_admin"], false);
    assert_eq!(joined["resumed"], false);
    assert_eq!(joined["participants"], json!([]));

    // A second one, naming itself in the URL, sees the first; the first hears of it.
    let t = token(&app, "branch-1", "li.si", "subscribe");
    let mut second = Client::connect_url(
        "li.si",
        &rtc_url(
            &app,
            &format!("access_token={t}&room=branch-1&name=Li%20Si"),
        ),
    )
    .await;
    let joined = second.next_json().await;
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["you"]["identity"], "li.si");
    assert_eq!(joined["you"]["name"], "Li Si");
    assert_eq!(joined["you"]["can_publish"], false);
    let others = joined["participants"].as_array().unwrap();
    assert_eq!(others.len(), 1, "{joined}");
    assert_eq!(others[0]["identity"], "zhang.san");
    let seen = first.expect("participant_joined").await;
    assert_eq!(seen["participant"]["identity"], "li.si");
    app.stop().await;
}

#[tokio::test]
async fn bad_frames_get_an_error_and_the_connection_stays() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (mut c, _) = Client::join(&app, "r", "alice", PARTICIPANT).await;

    let cases: &[(&str, &str)] = &[
        ("{not json", "malformed"),
        ("[]", "malformed"),
        (r#"{"no":"type"}"#, "malformed"),
        (r#"{"type":"fly","high":true}"#, "unknown_type"),
        (r#"{"type":"offer"}"#, "malformed"),
        (r#"{"type":"mute","track":"t"}"#, "malformed"),
        (r#"{"type":"mute","track":"t","muted":"yes"}"#, "malformed"),
        (r#"{"type":"ping","id":-1}"#, "malformed"),
    ];
    for (frame, code) in cases {
        c.send_text(*frame).await;
        let e = c.expect("error").await;
        assert_eq!(e["code"], *code, "for {frame}: {e}");
        c.ping(7).await;
    }

    timeout(
        WAIT,
        c.ws.send(Message::binary(b"{\"type\":\"ping\",\"id\":1}".to_vec())),
    )
    .await
    .unwrap()
    .unwrap();
    c.expect_error("malformed").await;
    c.ping(7).await;
    app.stop().await;
}

#[tokio::test]
async fn an_oversized_frame_is_closed_with_1009() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (mut c, _) = Client::join(&app, "r", "alice", PARTICIPANT).await;
    // Just under the limit is fine (and is answered as the chat it is not: too long a text).
    let big = "x".repeat(signaling::ws::MAX_MESSAGE - 100);
    c.send(json!({"type": "chat", "text": big})).await;
    c.expect_error("malformed").await;
    c.ping(1).await;

    let huge = "x".repeat(signaling::ws::MAX_MESSAGE + 1024);
    c.send(json!({"type": "chat", "text": huge})).await;
    assert_eq!(c.expect_close().await, signaling::ws::CLOSE_TOO_BIG);
    assert_eq!(signaling::ws::CLOSE_TOO_BIG, 1009);
    app.stop().await;
}

#[tokio::test]
async fn garbage_sdp_is_refused_without_disturbing_anyone() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (mut other, _) = Client::join(&app, "r", "bob", PARTICIPANT).await;
    let (mut c, _) = Client::join(&app, "r", "alice", PARTICIPANT).await;
    other.expect("participant_joined").await;

    for sdp in [
        "garbage",
        "",
        "v=0\r\nm=video nonsense\r\n",
        "\u{0}\u{1}\u{2}",
    ] {
        c.send(json!({"type": "offer", "sdp": sdp, "tracks": [{"mid": "0"}]}))
            .await;
        c.expect_error("bad_sdp").await;
        c.ping(2).await;
    }
    c.send(json!({"type": "answer", "sdp": "garbage"})).await;
    c.expect_error("bad_sdp").await;
    c.ping(3).await;

    other
        .quiet_for(
            Duration::from_millis(300),
            &["participant_left", "error", "closed"],
        )
        .await;
    other.ping(4).await;
    app.stop().await;
}

#[tokio::test]
async fn grants_decide_who_may_publish_and_remove() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (mut host, _) = Client::join(&app, "r", "host", "publish,subscribe,data,admin").await;
    let (mut viewer, _) = Client::join(&app, "r", "viewer", "subscribe").await;
    let (mut member, _) = Client::join(&app, "r", "member", PARTICIPANT).await;

    viewer
        .send(json!({"type": "offer", "sdp": "v=0\r\n", "tracks": []}))
        .await;
    viewer.expect_error("not_allowed").await;
    viewer.send(json!({"type": "chat", "text": "hello"})).await;
    viewer.expect_error("not_allowed").await;
    viewer.ping(1).await;

    member
        .send(json!({"type": "remove_participant", "identity": "viewer"}))
        .await;
    member.expect_error("not_allowed").await;
    member
        .send(json!({"type": "mute_participant", "identity": "viewer"}))
        .await;
    member.expect_error("not_allowed").await;
    viewer.ping(2).await;

    host.send(json!({"type": "remove_participant", "identity": "nobody"}))
        .await;
    host.expect_error("not_found").await;

    host.send(json!({"type": "remove_participant", "identity": "viewer"}))
        .await;
    let closed = viewer.expect("closed").await;
    assert!(closed["reason"].as_str().is_some(), "{closed}");
    assert_eq!(viewer.expect_close().await, 4003);
    for c in [&mut member, &mut host] {
        let left = c.expect("participant_left").await;
        assert_eq!(left["identity"], "viewer");
        c.ping(3).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn leave_is_at_once_but_a_drop_keeps_the_place() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (mut stayer, _) = Client::join(&app, "r", "stayer", PARTICIPANT).await;

    let (mut leaver, _) = Client::join(&app, "r", "leaver", PARTICIPANT).await;
    assert_eq!(
        stayer.expect("participant_joined").await["participant"]["identity"],
        "leaver"
    );
    leaver.send(json!({"type": "leave"})).await;
    assert_eq!(leaver.expect_close().await, 1000);
    let left = stayer.expect("participant_left").await;
    assert_eq!(left["identity"], "leaver");

    let (dropper, _) = Client::join(&app, "r", "dropper", PARTICIPANT).await;
    assert_eq!(
        stayer.expect("participant_joined").await["participant"]["identity"],
        "dropper"
    );
    dropper.drop_connection();
    stayer
        .quiet_for(Duration::from_secs(2), &["participant_left"])
        .await;
    stayer.ping(1).await;

    let (mut back, joined) = Client::join(&app, "r", "dropper", PARTICIPANT).await;
    assert_eq!(joined["resumed"], true, "{joined}");
    assert_eq!(joined["you"]["identity"], "dropper");
    let others: Vec<&Value> = joined["participants"].as_array().unwrap().iter().collect();
    assert_eq!(others.len(), 1, "{joined}");
    assert_eq!(others[0]["identity"], "stayer");
    stayer
        .quiet_for(
            Duration::from_millis(500),
            &["participant_left", "participant_joined"],
        )
        .await;
    back.ping(2).await;
    stayer.ping(3).await;
    app.stop().await;
}

#[tokio::test]
async fn chat_reaches_the_others() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (mut a, _) = Client::join(&app, "r", "alice", PARTICIPANT).await;
    let (mut b, _) = Client::join(&app, "r", "bob", PARTICIPANT).await;
    a.send(json!({"type": "chat", "text": "同志们好"})).await;
    let m = b.expect("chat").await;
    assert_eq!(m["from"], "alice");
    assert_eq!(m["name"], "Name of alice");
    assert_eq!(m["text"], "同志们好");
    assert!(m["at"].as_u64().is_some_and(|t| t > 0), "{m}");
    // The sender sees its own message too, as everyone else does.
    assert_eq!(a.expect("chat").await["text"], "同志们好");

    a.send(json!({"type": "chat", "text": "   "})).await;
    a.expect_error("malformed").await;
    b.quiet_for(Duration::from_millis(300), &["chat"]).await;
    app.stop().await;
}

#[tokio::test]
async fn a_hidden_participant_is_invisible_and_recording_is_announced() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (mut alice, _) = Client::join(&app, "h", "alice", PARTICIPANT).await;
    let (mut rec, joined) = Client::join(&app, "h", "recorder-x", "subscribe,hidden").await;
    assert_eq!(
        joined["participants"].as_array().unwrap().len(),
        1,
        "{joined}"
    );
    alice
        .quiet_for(Duration::from_millis(300), &["participant_joined"])
        .await;
    let (mut bob, joined) = Client::join(&app, "h", "bob", PARTICIPANT).await;
    let seen: Vec<&str> = joined["participants"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["identity"].as_str())
        .collect();
    assert_eq!(seen, ["alice"], "the recorder is not listed: {joined}");
    assert_eq!(joined["recording"], false);

    // Asking to record needs the grant; the host with it is heard (the portal acts on it).
    bob.send(json!({"type": "record", "start": true})).await;
    bob.expect_error("not_allowed").await;

    // Whoever starts a recording, everyone in the room is told, and so is every newcomer.
    app.sign_in_admin().await;
    let r = app.post_json("/api/v1/rooms/h/recordings", json!({})).await;
    assert_eq!(r.status(), 201);
    for c in [&mut alice, &mut bob] {
        assert_eq!(c.expect("recording").await["active"], true);
    }
    let (_carol, joined) = Client::join(&app, "h", "carol", PARTICIPANT).await;
    assert_eq!(joined["recording"], true);

    rec.send(json!({"type": "leave"})).await;
    alice
        .quiet_for(Duration::from_millis(300), &["participant_left"])
        .await;
    app.stop().await;
}
