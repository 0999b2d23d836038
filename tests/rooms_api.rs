//! The room service as a host or admin sees it: the live-room list, muting, removing and closing
//! over `/api/v1/rooms`, who may do that, and the meeting pages (`/room/{room}`, `/rooms`). The
//! participants are real `/rtc` WebSocket clients, so every effect is checked where people notice
//! it: on their connection.

mod common;

use std::time::Duration;

use common::{Backend, TestApp};
use futures_util::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};
use signaling::token::{Grants, TokenKey, TokenRequest};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

/// How long any single wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(5);

const PARTICIPANT: &str = "publish,subscribe,data";

/// A token from the key the server under test loaded (`token.key` in its data directory).
fn token(app: &TestApp, room: &str, identity: &str) -> String {
    let hex = std::fs::read_to_string(app.data_dir().join("token.key")).unwrap();
    TokenKey::from_hex(&hex)
        .unwrap()
        .mint(&TokenRequest {
            room: room.into(),
            identity: identity.into(),
            name: format!("Name of {identity}"),
            grants: PARTICIPANT.parse::<Grants>().unwrap(),
            ttl: Duration::from_secs(3600),
        })
        .unwrap()
}

/// One participant's `/rtc` WebSocket.
struct Client {
    who: String,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    /// Connects with `token` and waits for `joined`, which it returns.
    async fn connect(app: &TestApp, who: &str, token: &str) -> (Client, Value) {
        let url = format!("ws://{}/rtc?access_token={token}", app.addr);
        let (ws, resp) = timeout(WAIT, connect_async(url))
            .await
            .expect("handshake timed out")
            .unwrap_or_else(|e| panic!("{who} cannot connect: {e}"));
        assert_eq!(resp.status().as_u16(), 101);
        let mut c = Client {
            who: who.into(),
            ws,
        };
        let joined = c.next_json().await;
        assert_eq!(joined["type"], "joined", "{who}'s first message");
        (c, joined)
    }

    /// Joins `room` as `identity` with a freshly minted token.
    async fn join(app: &TestApp, room: &str, identity: &str) -> Client {
        Client::connect(app, identity, &token(app, room, identity))
            .await
            .0
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

    /// The next message of type `ty`, skipping the others.
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

    /// Proves the connection is alive: a ping is answered with the same id.
    async fn ping(&mut self, id: u64) {
        timeout(
            WAIT,
            self.ws
                .send(Message::text(json!({"type": "ping", "id": id}).to_string())),
        )
        .await
        .expect("send timed out")
        .unwrap_or_else(|e| panic!("{} cannot send: {e}", self.who));
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

    /// Reads for `period` and fails on any message whose type is in `unwanted`, or a close.
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
}

/// Sends a request with a bounded wait.
async fn send(req: reqwest::RequestBuilder) -> reqwest::Response {
    timeout(WAIT, req.send())
        .await
        .expect("HTTP request timed out")
        .unwrap()
}

async fn call(
    client: &reqwest::Client,
    app: &TestApp,
    method: Method,
    path: &str,
) -> reqwest::Response {
    send(client.request(method, app.url(path))).await
}

/// Status and JSON body (`Null` when there is none).
async fn call_json(
    client: &reqwest::Client,
    app: &TestApp,
    method: Method,
    path: &str,
) -> (StatusCode, Value) {
    let r = call(client, app, method, path).await;
    let status = r.status();
    let bytes = timeout(WAIT, r.bytes()).await.unwrap().unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn text(r: reqwest::Response) -> String {
    timeout(WAIT, r.text()).await.unwrap().unwrap()
}

/// The identities in a room summary, in the order given.
fn identities(room: &Value) -> Vec<&str> {
    room["participants"]
        .as_array()
        .unwrap_or_else(|| panic!("no participants in {room}"))
        .iter()
        .map(|p| p["identity"].as_str().unwrap())
        .collect()
}

/// The value of `attr="…"` in an HTML page.
fn attr<'a>(html: &'a str, attr: &str) -> &'a str {
    let start = html
        .find(&format!("{attr}=\""))
        .unwrap_or_else(|| panic!("no {attr} in the page"))
        + attr.len()
        + 2;
    let len = html[start..].find('"').unwrap();
    &html[start..start + len]
}

fn location(r: &reqwest::Response) -> String {
    let v = r.headers().get("location").expect("a Location header");
    String::from_utf8(v.as_bytes().to_vec()).unwrap()
}

/// `/room/{room}` with the name percent-encoded as one path segment.
fn room_path(room: &str) -> String {
    let mut u = Url::parse("http://x/").unwrap();
    u.path_segments_mut()
        .unwrap()
        .clear()
        .push("room")
        .push(room);
    u.path().to_string()
}

/// Asks the server what a media token says, for `room`.
async fn validate(app: &TestApp, room_path_segment: &str, token: &str) -> (StatusCode, Value) {
    let r = send(
        common::client()
            .get(app.url(&format!("/api/v1/rooms/{room_path_segment}/validate")))
            .bearer_auth(token),
    )
    .await;
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// An admin, signed in on `app.client`, and two participants in `branch-1` who have seen each
/// other arrive.
async fn admin_and_two_in_branch_1() -> (TestApp, Client, Client) {
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.sign_in_admin().await;
    let mut alice = Client::join(&app, "branch-1", "alice").await;
    let bob = Client::join(&app, "branch-1", "bob").await;
    let seen = alice.expect("participant_joined").await;
    assert_eq!(seen["participant"]["identity"], "bob");
    (app, alice, bob)
}

#[tokio::test]
async fn an_admin_sees_live_rooms_and_who_is_in_them() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.sign_in_admin().await;
    let (status, rooms) = call_json(&app.client, &app, Method::GET, "/api/v1/rooms").await;
    assert_eq!(status, 200);
    assert_eq!(rooms, json!([]), "nobody has joined yet");

    let mut alice = Client::join(&app, "branch-1", "alice").await;
    let _bob = Client::join(&app, "branch-1", "bob").await;
    alice.expect("participant_joined").await;

    let (status, rooms) = call_json(&app.client, &app, Method::GET, "/api/v1/rooms").await;
    assert_eq!(status, 200, "{rooms}");
    let list = rooms.as_array().expect("an array of rooms");
    assert_eq!(list.len(), 1, "{rooms}");
    assert_eq!(list[0]["name"], "branch-1");
    let mut ids = identities(&list[0]);
    ids.sort_unstable();
    assert_eq!(ids, ["alice", "bob"], "{rooms}");
    for p in list[0]["participants"].as_array().unwrap() {
        let id = p["identity"].as_str().unwrap();
        assert_eq!(p["name"], format!("Name of {id}"), "{p}");
        assert_eq!(p["can_publish"], true, "{p}");
        assert_eq!(p["is_admin"], false, "{p}");
    }

    let (status, room) = call_json(&app.client, &app, Method::GET, "/api/v1/rooms/branch-1").await;
    assert_eq!(status, 200, "{room}");
    assert_eq!(room, list[0], "the room alone is what the list shows");

    let (status, body) = call_json(&app.client, &app, Method::GET, "/api/v1/rooms/branch-2").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "not_found");
    app.stop().await;
}

#[tokio::test]
async fn members_get_403_and_strangers_401_on_every_room_endpoint() {
    let (app, mut alice, mut bob) = admin_and_two_in_branch_1().await;
    let member = app.user_client("m1", "member").await;
    let lecturer = app.user_client("l1", "lecturer").await;
    let anonymous = common::client();

    let endpoints = [
        (Method::GET, "/api/v1/rooms"),
        (Method::GET, "/api/v1/rooms/branch-1"),
        (Method::POST, "/api/v1/rooms/branch-1/participants/bob/mute"),
        (Method::DELETE, "/api/v1/rooms/branch-1/participants/bob"),
        (Method::DELETE, "/api/v1/rooms/branch-1"),
        // Rooms and people that do not exist are refused the same way: no probing.
        (Method::GET, "/api/v1/rooms/nowhere"),
        (Method::POST, "/api/v1/rooms/nowhere/participants/x/mute"),
        (Method::DELETE, "/api/v1/rooms/nowhere/participants/x"),
        (Method::DELETE, "/api/v1/rooms/nowhere"),
    ];
    for (method, path) in &endpoints {
        let (status, body) = call_json(&member, &app, method.clone(), path).await;
        assert_eq!(status, 403, "member: {method} {path}: {body}");
        assert_eq!(body["error"], "forbidden", "{body}");
        let (status, body) = call_json(&anonymous, &app, method.clone(), path).await;
        assert_eq!(status, 401, "anonymous: {method} {path}: {body}");
        assert_eq!(body["error"], "unauthorized", "{body}");
    }

    // Nothing happened to anyone.
    for c in [&mut alice, &mut bob] {
        c.quiet_for(
            Duration::from_millis(300),
            &[
                "muted_by",
                "closed",
                "participant_left",
                "participant_updated",
            ],
        )
        .await;
        c.ping(1).await;
    }
    let (status, room) = call_json(&app.client, &app, Method::GET, "/api/v1/rooms/branch-1").await;
    assert_eq!(status, 200);
    assert_eq!(identities(&room), ["alice", "bob"]);

    // A host role that is not an admin may look.
    let (status, rooms) = call_json(&lecturer, &app, Method::GET, "/api/v1/rooms").await;
    assert_eq!(status, 200, "{rooms}");
    assert_eq!(rooms[0]["name"], "branch-1");
    app.stop().await;
}

#[tokio::test]
async fn muting_tells_the_muted_who_did_it_and_the_others_what_changed() {
    let (app, mut alice, mut bob) = admin_and_two_in_branch_1().await;
    let r = call(
        &app.client,
        &app,
        Method::POST,
        "/api/v1/rooms/branch-1/participants/bob/mute",
    )
    .await;
    assert_eq!(r.status(), 204);
    assert_eq!(
        bob.expect("muted_by").await,
        json!({"type": "muted_by", "by": "admin"})
    );
    let updated = alice.expect("participant_updated").await;
    assert_eq!(updated["participant"]["identity"], "bob", "{updated}");
    alice
        .quiet_for(Duration::from_millis(200), &["muted_by"])
        .await;
    // Muted is not gone.
    bob.ping(1).await;
    alice.ping(2).await;

    for path in [
        "/api/v1/rooms/branch-1/participants/carol/mute",
        "/api/v1/rooms/branch-2/participants/bob/mute",
    ] {
        let (status, body) = call_json(&app.client, &app, Method::POST, path).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    app.stop().await;
}

#[tokio::test]
async fn removing_a_participant_closes_their_connection_with_4003() {
    let (app, mut alice, mut bob) = admin_and_two_in_branch_1().await;
    let r = call(
        &app.client,
        &app,
        Method::DELETE,
        "/api/v1/rooms/branch-1/participants/bob",
    )
    .await;
    assert_eq!(r.status(), 204);
    let closed = bob.expect("closed").await;
    assert!(
        closed["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{closed}"
    );
    assert_eq!(bob.expect_close().await, 4003);
    let left = alice.expect("participant_left").await;
    assert_eq!(left["identity"], "bob");
    alice.ping(1).await;

    let (status, room) = call_json(&app.client, &app, Method::GET, "/api/v1/rooms/branch-1").await;
    assert_eq!(status, 200, "{room}");
    assert_eq!(identities(&room), ["alice"]);

    for path in [
        "/api/v1/rooms/branch-1/participants/bob",
        "/api/v1/rooms/branch-1/participants/carol",
        "/api/v1/rooms/branch-2/participants/alice",
    ] {
        let (status, body) = call_json(&app.client, &app, Method::DELETE, path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"], "not_found");
    }
    alice
        .quiet_for(Duration::from_millis(200), &["participant_left", "closed"])
        .await;
    app.stop().await;
}

#[tokio::test]
async fn closing_a_room_disconnects_everyone_with_4004() {
    let (app, mut alice, mut bob) = admin_and_two_in_branch_1().await;
    let mut other = Client::join(&app, "branch-2", "carol").await;

    let r = call(&app.client, &app, Method::DELETE, "/api/v1/rooms/branch-1").await;
    assert_eq!(r.status(), 204);
    assert_eq!(alice.expect_close().await, 4004);
    assert_eq!(bob.expect_close().await, 4004);

    let (status, rooms) = call_json(&app.client, &app, Method::GET, "/api/v1/rooms").await;
    assert_eq!(status, 200);
    let names: Vec<&Value> = rooms
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["name"])
        .collect();
    assert_eq!(names, [&json!("branch-2")], "{rooms}");
    let (status, _) = call_json(&app.client, &app, Method::GET, "/api/v1/rooms/branch-1").await;
    assert_eq!(status, 404);
    let (status, _) = call_json(&app.client, &app, Method::DELETE, "/api/v1/rooms/branch-1").await;
    assert_eq!(status, 404, "closing twice");
    other.ping(1).await;

    let r = call(&app.client, &app, Method::DELETE, "/api/v1/rooms/branch-2").await;
    assert_eq!(r.status(), 204);
    assert_eq!(other.expect_close().await, 4004);
    let (status, rooms) = call_json(&app.client, &app, Method::GET, "/api/v1/rooms").await;
    assert_eq!(status, 200);
    assert_eq!(rooms, json!([]));
    app.stop().await;
}

#[tokio::test]
async fn the_room_page_sends_strangers_to_sign_in_and_gives_members_a_token() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.sign_in_admin().await;
    let member = app.user_client("m1", "member").await;
    let anonymous = common::client();

    let r = call(&anonymous, &app, Method::GET, "/room/branch-1").await;
    assert!(
        [StatusCode::SEE_OTHER, StatusCode::FOUND].contains(&r.status()),
        "{}",
        r.status()
    );
    let to = Url::parse(&app.url("/"))
        .unwrap()
        .join(&location(&r))
        .unwrap();
    assert_eq!(to.path(), "/login");
    let next: Vec<(String, String)> = to.query_pairs().into_owned().collect();
    assert_eq!(next, [("next".into(), "/room/branch-1".into())]);

    let r = call(&member, &app, Method::GET, "/room/branch-1").await;
    assert_eq!(r.status(), 200);
    let ctype = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ctype.starts_with("text/html"), "{ctype}");
    let page = text(r).await;
    assert_eq!(attr(&page, "data-room"), "branch-1");
    let t = attr(&page, "data-token").to_string();
    assert!(!t.is_empty());
    let (status, claims) = validate(&app, "branch-1", &t).await;
    assert_eq!(status, 200, "{claims}");
    assert_eq!(claims["identity"], "m1");
    assert_eq!(claims["room"], "branch-1");
    assert_eq!(claims["grants"]["admin"], false, "a member hosts nothing");
    let (status, _) = validate(&app, "branch-2", &t).await;
    assert_eq!(status, 403, "the page's token is for its room only");
    // And it gets the member in.
    let (_m1, joined) = Client::connect(&app, "m1", &t).await;
    assert_eq!(joined["room"], "branch-1");
    assert_eq!(joined["you"]["identity"], "m1");

    // An admin's page token carries the host grant.
    let r = call(&app.client, &app, Method::GET, "/room/branch-1").await;
    assert_eq!(r.status(), 200);
    let page = text(r).await;
    let (status, claims) = validate(&app, "branch-1", attr(&page, "data-token")).await;
    assert_eq!(status, 200);
    assert_eq!(claims["identity"], "admin");
    assert_eq!(claims["grants"]["admin"], true);

    // A token in the link: good for its room, refused for another, signed in or not.
    let elsewhere = token(&app, "branch-2", "guest");
    for c in [&anonymous, &member] {
        let r = call(
            c,
            &app,
            Method::GET,
            &format!("/room/branch-1?token={elsewhere}"),
        )
        .await;
        assert_eq!(r.status(), 403);
    }
    let r = call(
        &anonymous,
        &app,
        Method::GET,
        &format!("/room/branch-2?token={elsewhere}"),
    )
    .await;
    assert_eq!(r.status(), 200);
    let page = text(r).await;
    assert_eq!(attr(&page, "data-token"), elsewhere);
    assert_eq!(attr(&page, "data-name"), "Name of guest");
    app.stop().await;
}

#[tokio::test]
async fn the_rooms_page_is_for_signed_in_users() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.sign_in_admin().await;
    let member = app.user_client("m1", "member").await;

    let r = call(&common::client(), &app, Method::GET, "/rooms").await;
    assert!(r.status().is_redirection(), "{}", r.status());
    assert!(location(&r).starts_with("/login"), "{}", location(&r));

    let r = call(&member, &app, Method::GET, "/rooms").await;
    assert_eq!(r.status(), 200);
    let page = text(r).await;
    assert!(
        page.contains("暂无正在进行的会议"),
        "no room is live yet: {page}"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_rooms_page_lists_live_rooms_by_name() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.sign_in_admin().await;
    let member = app.user_client("m1", "member").await;
    let _alice = Client::join(&app, "branch-1", "alice").await;
    let _bob = Client::join(&app, "branch-7", "bob").await;

    let r = call(&member, &app, Method::GET, "/rooms").await;
    assert_eq!(r.status(), 200);
    let page = text(r).await;
    for name in ["branch-1", "branch-7"] {
        assert!(
            page.contains(&format!("href=\"/room/{name}\"")),
            "{name} is not linked: {page}"
        );
        assert!(page.contains(&format!("<strong>{name}</strong>")), "{page}");
    }
    assert!(!page.contains("暂无正在进行的会议"), "{page}");
    app.stop().await;
}

/// A meeting link to a room whose name needs escaping in a URL (Chinese, `#`, `?`, `%`, a space)
/// leads through sign-in back to that same room.
#[tokio::test]
async fn signing_in_from_a_meeting_link_lands_in_that_room() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let room = "第一支部 #2? 100%";
    let path = room_path(room);
    let browser = common::client();

    let r = call(&browser, &app, Method::GET, &path).await;
    assert!(r.status().is_redirection(), "{}", r.status());
    let base = Url::parse(&app.url("/")).unwrap();
    let login = base.join(&location(&r)).unwrap();
    assert_eq!(login.path(), "/login");
    // What the sign-in form carries back: the `next` parameter, decoded.
    let next = login
        .query_pairs()
        .find(|(k, _)| k == "next")
        .map(|(_, v)| v.into_owned())
        .expect("a next parameter");

    let page = text(send(browser.get(login.clone())).await).await;
    let csrf = attr(&page, "name=\"csrf\" value").to_string();
    let r = send(browser.post(app.url("/login")).form(&[
        ("username", "admin"),
        ("password", common::ADMIN_PASSWORD),
        ("csrf", &csrf),
        ("next", &next),
    ]))
    .await;
    assert!(r.status().is_redirection(), "{}", r.status());
    let back = base.join(&location(&r)).unwrap();

    let r = send(browser.get(back.clone())).await;
    assert_eq!(r.status(), 200, "{back}");
    let page = text(r).await;
    let segment = path.trim_start_matches("/room/");
    let (status, claims) = validate(&app, segment, attr(&page, "data-token")).await;
    assert_eq!(status, 200, "signed in, then sent to {back}: {claims}");
    assert_eq!(claims["room"], room);
    app.stop().await;
}
