//! The recordings catalogue as its users meet it: starting and stopping a recording of a room,
//! who may watch (API, page and media alike), comments, the library's filters, deleting, seeking
//! in the replay with HTTP Range requests, and recordings left unfinished by a restart.
//!
//! Recordings that need a finished replay are put in place directly (a row in the database and a
//! small object at `recorder::replay_key`), so that these tests do not depend on composing video.

mod common;

use std::time::Duration;

use common::api::{keeper, new_org};
use common::{Backend, PgDatabase, TestApp};
use dangjian::config::{Layer, Secret};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use portal::db::Db;
use portal::storage::Storage;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::time::{Instant, timeout};

/// How long any single request may take.
const WAIT: Duration = Duration::from_secs(10);
/// How long a stopped recording may take to become `ready` or `failed`.
const SETTLE: Duration = Duration::from_secs(20);

async fn send(req: reqwest::RequestBuilder) -> reqwest::Response {
    timeout(WAIT, req.send())
        .await
        .expect("HTTP request timed out")
        .unwrap()
}

/// Status and JSON body (`Null` when there is none).
async fn call(
    c: &reqwest::Client,
    app: &TestApp,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = c.request(method, app.url(path));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = send(req).await;
    let status = r.status();
    let bytes = timeout(WAIT, r.bytes()).await.unwrap().unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn get(c: &reqwest::Client, app: &TestApp, path: &str) -> (StatusCode, Value) {
    call(c, app, Method::GET, path, None).await
}

async fn page(c: &reqwest::Client, app: &TestApp, path: &str) -> (StatusCode, String) {
    let r = send(c.get(app.url(path))).await;
    let status = r.status();
    (status, timeout(WAIT, r.text()).await.unwrap().unwrap())
}

async fn user_id(c: &reqwest::Client, app: &TestApp) -> String {
    let (status, me) = get(c, app, "/api/v1/me").await;
    assert_eq!(status, 200);
    me["id"].as_str().unwrap().to_string()
}

fn store(app: &TestApp) -> Storage {
    Storage::local(&app.data_dir().join("objects")).unwrap()
}

/// A recording put straight into the catalogue.
struct Seed<'a> {
    room: &'a str,
    title: &'a str,
    created_by: &'a str,
    status: &'a str,
    started_at: i64,
    published: bool,
}

impl Seed<'_> {
    async fn insert(&self, db: &Db) -> String {
        let id = uuid::Uuid::now_v7().to_string();
        let key = (self.status == "ready").then(|| recorder::replay_key(&id));
        sqlx::query(
            "INSERT INTO recordings (id, room, title, created_by, status, started_at, ended_at, duration_ms, \
             size_bytes, tracks, media_key, published) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&id)
        .bind(self.room)
        .bind(self.title)
        .bind(self.created_by)
        .bind(self.status)
        .bind(self.started_at)
        .bind(self.started_at + 65_000)
        .bind(65_000_i64)
        .bind(1000_i64)
        .bind("[]")
        .bind(key)
        .bind(self.published as i64)
        .execute(&db.pool)
        .await
        .unwrap();
        id
    }
}

fn ready<'a>(title: &'a str, created_by: &'a str) -> Seed<'a> {
    Seed {
        room: "branch-1",
        title,
        created_by,
        status: "ready",
        started_at: 1_780_000_000_000,
        published: false,
    }
}

/// 1000 bytes whose value tells their offset: byte i is `i % 251`.
fn fake_replay() -> Vec<u8> {
    (0..1000u32).map(|i| (i % 251) as u8).collect()
}

async fn put_replay(app: &TestApp, id: &str) {
    store(app)
        .store
        .put(
            &ObjectPath::from(recorder::replay_key(id)),
            PutPayload::from(fake_replay()),
        )
        .await
        .unwrap();
}

/// Polls the recording until `done` holds or [`SETTLE`] passes.
async fn wait_for(
    c: &reqwest::Client,
    app: &TestApp,
    id: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + SETTLE;
    loop {
        let (status, rec) = get(c, app, &format!("/api/v1/recordings/{id}")).await;
        assert_eq!(status, 200, "{rec}");
        if done(&rec) {
            return rec;
        }
        assert!(Instant::now() < deadline, "recording never settled: {rec}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn settled(rec: &Value) -> bool {
    rec["status"] == "ready" || rec["status"] == "failed"
}

async fn starting_and_stopping_a_recording(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let member = app.user_client("m1", "member").await;
    let lecturer = app.user_client("l1", "lecturer").await;

    let (status, body) = call(
        &member,
        &app,
        Method::POST,
        "/api/v1/rooms/branch-1/recordings",
        None,
    )
    .await;
    assert_eq!(status, 403, "members may not record: {body}");

    let (status, created) = call(
        &app.client,
        &app,
        Method::POST,
        "/api/v1/rooms/branch-1/recordings",
        Some(json!({"title": "  党课：学习二十大精神 "})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("an id").to_string();

    let (status, rec) = get(&app.client, &app, &format!("/api/v1/recordings/{id}")).await;
    assert_eq!(status, 200, "{rec}");
    assert_eq!(rec["status"], "recording");
    assert_eq!(rec["room"], "branch-1");
    assert_eq!(rec["title"], "党课：学习二十大精神");
    assert_eq!(rec["media_url"], Value::Null, "nothing to watch yet");

    // One capture per room, whoever asks; another room is free.
    for c in [&app.client, &lecturer] {
        let (status, body) = call(
            c,
            &app,
            Method::POST,
            "/api/v1/rooms/branch-1/recordings",
            None,
        )
        .await;
        assert_eq!(status, 409, "{body}");
    }
    let (status, listed) = get(&app.client, &app, "/api/v1/recordings?status=recording").await;
    assert_eq!(status, 200);
    assert_eq!(listed["total"], 1, "{listed}");
    assert_eq!(listed["items"][0]["id"], id.as_str());
    let (status, body) = call(
        &app.client,
        &app,
        Method::DELETE,
        &format!("/api/v1/recordings/{id}"),
        None,
    )
    .await;
    assert_eq!(
        status, 409,
        "a capture in progress is stopped first: {body}"
    );

    let (status, stopped) = call(
        &app.client,
        &app,
        Method::POST,
        &format!("/api/v1/recordings/{id}/stop"),
        None,
    )
    .await;
    assert_eq!(status, 202, "{stopped}");
    assert!(
        ["processing", "ready", "failed"].contains(&stopped["status"].as_str().unwrap()),
        "{stopped}"
    );
    let (status, body) = call(
        &app.client,
        &app,
        Method::POST,
        &format!("/api/v1/recordings/{id}/stop"),
        None,
    )
    .await;
    assert_eq!(status, 409, "stopping twice: {body}");

    let done = wait_for(&app.client, &app, &id, settled).await;
    if done["status"] == "failed" {
        // Nobody was in the room: nothing to replay, and the reason is given.
        assert!(
            done["failure"].as_str().is_some_and(|f| !f.is_empty()),
            "{done}"
        );
        assert_eq!(done["media_url"], Value::Null);
    } else {
        assert_eq!(
            done["media_url"],
            format!("/api/v1/recordings/{id}/media").as_str()
        );
    }
    assert!(done["ended_at"].as_i64().is_some(), "{done}");

    // The room is free again.
    let (status, again) = call(
        &lecturer,
        &app,
        Method::POST,
        "/api/v1/rooms/branch-1/recordings",
        None,
    )
    .await;
    assert_eq!(status, 201, "{again}");
    let (status, _) = call(
        &lecturer,
        &app,
        Method::POST,
        &format!("/api/v1/recordings/{}/stop", again["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(status, 202);
    app.stop().await;
}

async fn only_the_creator_admins_and_everyone_once_published_may_watch(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let member = app.user_client("m1", "member").await;
    let lecturer = app.user_client("l1", "lecturer").await;
    let other_lecturer = app.user_client("l2", "lecturer").await;
    let org_admin = app.user_client("o1", "org_admin").await;
    let anonymous = common::client();
    let db = app.db().await;
    let id = ready("支部党课", &user_id(&lecturer, &app).await)
        .insert(&db)
        .await;
    put_replay(&app, &id).await;

    let api = format!("/api/v1/recordings/{id}");
    let media = format!("{api}/media");
    let comments = format!("{api}/comments");
    let page_path = format!("/recordings/{id}");

    for c in [&member, &other_lecturer] {
        for path in [&api, &media, &comments] {
            let (status, body) = get(c, &app, path).await;
            assert_eq!(status, 403, "{path}: {body}");
            assert_eq!(body["error"], "forbidden");
        }
        let (status, html) = page(c, &app, &page_path).await;
        assert_eq!(status, 403);
        assert!(html.contains("无法观看"), "{html}");
        assert!(!html.contains("<video"), "{html}");
        let (_, list) = get(c, &app, "/api/v1/recordings").await;
        assert_eq!(list["total"], 0, "not even listed: {list}");
        let (status, _) = call(c, &app, Method::DELETE, &api, None).await;
        assert_eq!(status, 403);
        let (status, _) = call(
            c,
            &app,
            Method::PATCH,
            &api,
            Some(json!({"published": true})),
        )
        .await;
        assert_eq!(status, 403);
    }
    for c in [&lecturer, &app.client, &org_admin] {
        let (status, rec) = get(c, &app, &api).await;
        assert_eq!(status, 200, "{rec}");
        assert_eq!(rec["title"], "支部党课");
        assert_eq!(rec["media_url"], media.as_str());
        let r = send(c.get(app.url(&media))).await;
        assert_eq!(r.status(), 200);
        let (status, html) = page(c, &app, &page_path).await;
        assert_eq!(status, 200);
        assert!(html.contains(&format!("src=\"{media}\"")), "{html}");
    }

    // Strangers are asked to sign in; unknown recordings are 404 everywhere.
    for path in [&api, &media, &comments] {
        let (status, _) = get(&anonymous, &app, path).await;
        assert_eq!(status, 401, "{path}");
    }
    let r = send(anonymous.get(app.url(&page_path))).await;
    assert!(r.status().is_redirection(), "{}", r.status());
    let to = r.headers()["location"].to_str().unwrap();
    assert!(to.starts_with("/login?next="), "{to}");
    let unknown = uuid::Uuid::now_v7();
    for path in [
        format!("/api/v1/recordings/{unknown}"),
        format!("/api/v1/recordings/{unknown}/media"),
        format!("/api/v1/recordings/{unknown}/comments"),
    ] {
        let (status, body) = get(&app.client, &app, &path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"], "not_found");
    }
    let (status, html) = page(&app.client, &app, &format!("/recordings/{unknown}")).await;
    assert_eq!(status, 404);
    assert!(html.contains("页面不存在"), "{html}");

    // Published: everyone signed in may watch; still only the creator or an admin may manage.
    let (status, rec) = call(
        &lecturer,
        &app,
        Method::PATCH,
        &api,
        Some(json!({"published": true})),
    )
    .await;
    assert_eq!(status, 200, "{rec}");
    assert_eq!(rec["published"], true);
    for path in [&api, &media, &comments] {
        let (status, _) = get(&member, &app, path).await;
        assert_eq!(status, 200, "{path}");
    }
    let (status, html) = page(&member, &app, &page_path).await;
    assert_eq!(status, 200);
    assert!(html.contains("<video"), "{html}");
    assert!(
        !html.contains("/delete\""),
        "no delete button for members: {html}"
    );
    let (status, _) = call(&member, &app, Method::DELETE, &api, None).await;
    assert_eq!(status, 403);
    let (_, list) = get(&member, &app, "/api/v1/recordings").await;
    assert_eq!(list["total"], 1, "{list}");
    app.stop().await;
}

async fn comments_are_checked_and_shown(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let member = app.user_client("m1", "member").await;
    let db = app.db().await;
    let mut seed = ready("专题党课", "someone");
    seed.published = true;
    let id = seed.insert(&db).await;
    let path = format!("/api/v1/recordings/{id}/comments");

    for bad in [json!(""), json!("   \n "), json!("字".repeat(2001))] {
        let (status, body) = call(
            &member,
            &app,
            Method::POST,
            &path,
            Some(json!({"body": bad})),
        )
        .await;
        assert_eq!(status, 422, "{body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (status, c) = call(
        &member,
        &app,
        Method::POST,
        &path,
        Some(json!({"body": "  深受教育，收获很大。 "})),
    )
    .await;
    assert_eq!(status, 201, "{c}");
    assert_eq!(c["body"], "深受教育，收获很大。");
    let (status, list) = get(&app.client, &app, &path).await;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["body"], "深受教育，收获很大。");
    assert_eq!(list[0]["author"], "m1");
    let (_, rec) = get(&app.client, &app, &format!("/api/v1/recordings/{id}")).await;
    assert_eq!(rec["comments"], 1, "{rec}");

    // The page's own form, with its CSRF token.
    let (status, html) = page(&member, &app, &format!("/recordings/{id}")).await;
    assert_eq!(status, 200);
    assert!(html.contains("深受教育，收获很大。"), "{html}");
    let csrf = value_after(&html, "name=\"csrf\" value=\"");
    let r = send(
        member
            .post(app.url(&format!("/recordings/{id}/comments")))
            .form(&[("csrf", csrf.as_str()), ("body", "第二条心得")]),
    )
    .await;
    assert!(r.status().is_redirection(), "{}", r.status());
    let r = send(
        member
            .post(app.url(&format!("/recordings/{id}/comments")))
            .form(&[("csrf", csrf.as_str()), ("body", "  ")]),
    )
    .await;
    assert_eq!(r.status(), 422);
    let r = send(
        member
            .post(app.url(&format!("/recordings/{id}/comments")))
            .form(&[("csrf", "forged"), ("body", "伪造")]),
    )
    .await;
    assert_eq!(r.status(), 403);
    let (_, html) = page(&member, &app, &format!("/recordings/{id}")).await;
    assert!(html.contains("第二条心得"), "{html}");
    assert!(!html.contains("伪造"), "{html}");
    assert!(html.contains("学习心得（2）"), "{html}");
    app.stop().await;
}

fn value_after(html: &str, prefix: &str) -> String {
    let start = html.find(prefix).expect("the marker") + prefix.len();
    let len = html[start..].find('"').unwrap();
    html[start..start + len].to_string()
}

async fn the_library_filters_by_room_status_title_and_date(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let member = app.user_client("m1", "member").await;
    let db = app.db().await;
    let day = 86_400_000;
    // 2026-06-01 00:00 Beijing time, then one recording a day.
    let t0 = 1_780_243_200_000;
    let mut ids = Vec::new();
    for (i, (room, title, status, published)) in [
        ("branch-1", "党课第一讲", "ready", true),
        ("branch-1", "支部大会", "failed", false),
        ("branch-2", "党课第二讲 100%", "ready", true),
        ("branch-2", "组织生活会", "processing", false),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = Seed {
            room,
            title,
            created_by: "someone",
            status,
            started_at: t0 + i as i64 * day + 3_600_000,
            published,
        };
        ids.push(seed.insert(&db).await);
    }
    let titles = |list: &Value| -> Vec<String> {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["title"].as_str().unwrap().to_string())
            .collect()
    };
    let (status, all) = get(&app.client, &app, "/api/v1/recordings").await;
    assert_eq!(status, 200);
    assert_eq!(
        titles(&all),
        ["组织生活会", "党课第二讲 100%", "支部大会", "党课第一讲"],
        "newest first"
    );
    for (query, expected) in [
        ("room=branch-1", vec!["支部大会", "党课第一讲"]),
        ("status=ready", vec!["党课第二讲 100%", "党课第一讲"]),
        ("q=党课", vec!["党课第二讲 100%", "党课第一讲"]),
        ("q=100%25", vec!["党课第二讲 100%"]),
        ("q=%25", vec!["党课第二讲 100%"]),
        ("room=branch-2&status=processing", vec!["组织生活会"]),
        (
            &format!("from={}&to={}", t0 + day, t0 + 3 * day - 1),
            vec!["党课第二讲 100%", "支部大会"],
        ),
        ("limit=2&offset=1", vec!["党课第二讲 100%", "支部大会"]),
    ] {
        let (status, list) = get(&app.client, &app, &format!("/api/v1/recordings?{query}")).await;
        assert_eq!(status, 200, "{query}: {list}");
        assert_eq!(titles(&list), expected, "{query}");
    }
    let (_, paged) = get(&app.client, &app, "/api/v1/recordings?limit=2&offset=1").await;
    assert_eq!(paged["total"], 4);
    let (status, body) = get(&app.client, &app, "/api/v1/recordings?status=lost").await;
    assert_eq!(status, 400, "{body}");

    // A member sees the published ones only, in the API and on the page.
    let (_, list) = get(&member, &app, "/api/v1/recordings").await;
    assert_eq!(titles(&list), ["党课第二讲 100%", "党课第一讲"]);
    let (status, html) = page(&member, &app, "/recordings").await;
    assert_eq!(status, 200);
    assert!(
        html.contains("党课第一讲") && html.contains("党课第二讲"),
        "{html}"
    );
    assert!(!html.contains("支部大会"), "{html}");
    assert!(html.contains("badge-ready\">可回放"), "{html}");

    // The page's filters: room, status, title and a date range (Beijing days).
    let (_, html) = page(&app.client, &app, "/recordings?room=branch-1&status=failed").await;
    assert!(
        html.contains("支部大会") && html.contains("badge-failed\">失败"),
        "{html}"
    );
    assert!(!html.contains("党课第一讲"), "{html}");
    let (_, html) = page(
        &app.client,
        &app,
        "/recordings?from=2026-06-02&to=2026-06-03",
    )
    .await;
    assert!(
        html.contains("支部大会") && html.contains("党课第二讲"),
        "{html}"
    );
    assert!(
        !html.contains("党课第一讲") && !html.contains("组织生活会"),
        "{html}"
    );
    let (_, html) = page(&app.client, &app, "/recordings?q=%E7%BB%84%E7%BB%87").await;
    assert!(
        html.contains("组织生活会") && html.contains("badge-processing\">处理中"),
        "{html}"
    );
    assert!(!html.contains("支部大会"), "{html}");
    let (status, _) = page(&common::client(), &app, "/recordings").await;
    assert!(status.is_redirection(), "{status}");
    app.stop().await;
}

async fn deleting_removes_the_recording_and_its_media(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let lecturer = app.user_client("l1", "lecturer").await;
    let db = app.db().await;
    let creator = user_id(&lecturer, &app).await;
    let mut seed = ready("待删除", &creator);
    seed.published = true;
    let id = seed.insert(&db).await;
    put_replay(&app, &id).await;
    let api = format!("/api/v1/recordings/{id}");
    let (status, _) = call(
        &lecturer,
        &app,
        Method::POST,
        &format!("{api}/comments"),
        Some(json!({"body": "好"})),
    )
    .await;
    assert_eq!(status, 201);

    let (status, _) = call(&lecturer, &app, Method::DELETE, &api, None).await;
    assert_eq!(status, 204);
    let (status, _) = get(&lecturer, &app, &api).await;
    assert_eq!(status, 404);
    let (status, _) = get(&lecturer, &app, &format!("{api}/media")).await;
    assert_eq!(status, 404);
    let (_, list) = get(&app.client, &app, "/api/v1/recordings").await;
    assert_eq!(list["total"], 0, "{list}");
    let (comments,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM recording_comments WHERE recording_id = $1")
            .bind(&id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(comments, 0);
    let gone = store(&app)
        .store
        .head(&ObjectPath::from(recorder::replay_key(&id)))
        .await;
    assert!(
        matches!(gone, Err(object_store::Error::NotFound { .. })),
        "the replay is deleted from the object store: {gone:?}"
    );

    // An admin may delete anyone's, from the page too.
    let id = ready("管理员删除", "someone").insert(&db).await;
    let (_, html) = page(&app.client, &app, &format!("/recordings/{id}")).await;
    let csrf = value_after(&html, "name=\"csrf\" value=\"");
    let r = send(
        app.client
            .post(app.url(&format!("/recordings/{id}/delete")))
            .form(&[("csrf", csrf.as_str())]),
    )
    .await;
    assert!(r.status().is_redirection(), "{}", r.status());
    let (status, _) = get(&app.client, &app, &format!("/api/v1/recordings/{id}")).await;
    assert_eq!(status, 404);
    app.stop().await;
}

async fn the_replay_is_streamed_with_ranges(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let db = app.db().await;
    let id = ready("可拖动的录像", "someone").insert(&db).await;
    put_replay(&app, &id).await;
    let media = app.url(&format!("/api/v1/recordings/{id}/media"));
    let whole = fake_replay();

    let r = send(app.client.get(&media)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "video/mp4");
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    assert_eq!(r.headers()["content-length"], "1000");
    assert_eq!(r.bytes().await.unwrap().to_vec(), whole);

    for (range, start, end) in [
        ("bytes=0-99", 0, 99),
        ("bytes=900-", 900, 999),
        ("bytes=-10", 990, 999),
        ("bytes=500-5000", 500, 999),
    ] {
        let r = send(app.client.get(&media).header("range", range)).await;
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(
            r.headers()["content-range"],
            format!("bytes {start}-{end}/1000").as_str(),
            "{range}"
        );
        assert_eq!(r.headers()["content-type"], "video/mp4");
        let body = r.bytes().await.unwrap();
        assert_eq!(&body[..], &whole[start..=end], "{range}");
    }
    for range in ["bytes=1000-", "bytes=2000-3000", "bytes=-0"] {
        let r = send(app.client.get(&media).header("range", range)).await;
        assert_eq!(r.status(), 416, "{range}");
        assert_eq!(r.headers()["content-range"], "bytes */1000", "{range}");
    }

    // Not ready: no media to serve yet.
    let mut seed = ready("处理中", "someone");
    seed.status = "processing";
    let pending = seed.insert(&db).await;
    let (status, rec) = get(&app.client, &app, &format!("/api/v1/recordings/{pending}")).await;
    assert_eq!(status, 200);
    assert_eq!(rec["media_url"], Value::Null);
    let (status, _) = get(
        &app.client,
        &app,
        &format!("/api/v1/recordings/{pending}/media"),
    )
    .await;
    assert_eq!(status, 404);
    app.stop().await;
}

async fn the_per_track_originals_are_listed_and_streamed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let member = app.user_client("m1", "member").await;
    let db = app.db().await;
    let id = ready("分轨录像", "someone").insert(&db).await;
    put_replay(&app, &id).await;
    let key = format!("recordings/{id}/originals/TR_cam.webm");
    let originals = vec![recorder::originals::OriginalObject {
        track: "TR_cam".into(),
        participant: "alice".into(),
        kind: recorder::segment::Kind::Video,
        source: "camera".into(),
        key: key.clone(),
        size: 1000,
        start_ms: 1500,
        duration_ms: 60_000,
    }];
    sqlx::query("UPDATE recordings SET originals = $2 WHERE id = $1")
        .bind(&id)
        .bind(serde_json::to_string(&originals).unwrap())
        .execute(&db.pool)
        .await
        .unwrap();
    store(&app)
        .store
        .put(&ObjectPath::from(key), PutPayload::from(fake_replay()))
        .await
        .unwrap();

    let url = format!("/api/v1/recordings/{id}/originals/TR_cam");
    let (status, rec) = get(&app.client, &app, &format!("/api/v1/recordings/{id}")).await;
    assert_eq!(status, 200, "{rec}");
    assert_eq!(
        rec["originals"],
        json!([{
            "track": "TR_cam", "participant": "alice", "kind": "video", "source": "camera",
            "start_ms": 1500, "duration_ms": 60_000, "size": 1000, "url": url,
        }]),
        "{rec}"
    );

    let whole = fake_replay();
    let r = send(
        app.client
            .get(app.url(&url))
            .header("range", "bytes=100-199"),
    )
    .await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-type"], "video/webm");
    assert_eq!(r.headers()["content-range"], "bytes 100-199/1000");
    assert_eq!(&r.bytes().await.unwrap()[..], &whole[100..200]);
    let r = send(app.client.get(app.url(&url))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().to_vec(), whole);
    let (status, _) = get(
        &app.client,
        &app,
        &format!("/api/v1/recordings/{id}/originals/TR_nope"),
    )
    .await;
    assert_eq!(status, 404);

    let (status, html) = page(&app.client, &app, &format!("/recordings/{id}")).await;
    assert_eq!(status, 200);
    assert!(html.contains("原始分轨"), "{html}");
    assert!(html.contains(&format!("href=\"{url}\"")), "{html}");

    // Someone who may not watch the recording may not fetch its tracks either.
    let r = send(member.get(app.url(&url)).header("range", "bytes=0-9")).await;
    assert_eq!(r.status(), 403);
    app.stop().await;
}

async fn the_replay_page_counts_views_and_jumps_to_marks(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let db = app.db().await;
    let id = ready("七一党课", "someone").insert(&db).await;
    let api = format!("/api/v1/recordings/{id}");
    for (at_ms, kind, label) in [
        (754_000, "vote", "表决：发展对象"),
        (60_000, "screen", "课件"),
    ] {
        let (status, body) = call(
            &app.client,
            &app,
            Method::POST,
            &format!("{api}/marks"),
            Some(json!({"at_ms": at_ms, "kind": kind, "label": label})),
        )
        .await;
        assert_eq!(status, 204, "{body}");
    }
    let (_, rec) = get(&app.client, &app, &api).await;
    assert_eq!(rec["views"], 0);
    assert_eq!(rec["marks"][0]["at_ms"], 60_000, "marks in replay order");
    assert_eq!(rec["marks"][1]["kind"], "vote");

    let (_, html) = page(&app.client, &app, &format!("/recordings/{id}")).await;
    assert!(
        html.contains(&format!(
            "<video id=\"player\" controls preload=\"metadata\" playsinline src=\"{api}/media\">"
        )),
        "{html}"
    );
    assert!(html.contains("href=\"#t=754\""), "{html}");
    assert!(
        html.contains("12:34") && html.contains("表决：发展对象"),
        "{html}"
    );
    assert!(html.contains("观看 1 次"), "{html}");
    page(&app.client, &app, &format!("/recordings/{id}")).await;
    let (_, rec) = get(&app.client, &app, &api).await;
    assert_eq!(rec["views"], 2, "one per page view; the API does not count");

    // The owner's buttons: publish, then the page says so.
    let csrf = value_after(&html, "name=\"csrf\" value=\"");
    let r = send(
        app.client
            .post(app.url(&format!("/recordings/{id}/publish")))
            .form(&[("csrf", csrf.as_str()), ("published", "1")]),
    )
    .await;
    assert!(r.status().is_redirection(), "{}", r.status());
    let (_, rec) = get(&app.client, &app, &api).await;
    assert_eq!(rec["published"], true);
    app.stop().await;
}

/// A database holding a recording that a previous process left capturing and one it left
/// composing, before any server has started on it.
async fn database_with_unfinished(
    backend: Backend,
) -> (String, Option<PgDatabase>, tempfile::TempDir, [String; 2]) {
    let dir = tempfile::tempdir().unwrap();
    let pg = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(PgDatabase::create().await),
    };
    let url = match &pg {
        Some(p) => p.url.clone(),
        None => format!("sqlite://{}?mode=rwc", dir.path().join("old.db").display()),
    };
    let db = Db::connect(&url).await.unwrap();
    let mut ids = Vec::new();
    for status in ["recording", "processing"] {
        let mut seed = ready("断电前的录像", "someone");
        seed.status = status;
        ids.push(seed.insert(&db).await);
    }
    db.pool.close().await;
    let ids: [String; 2] = ids.try_into().unwrap();
    (url, pg, dir, ids)
}

async fn recordings_left_unfinished_by_a_restart_are_finished(backend: Backend) {
    let (url, _pg, _dir, ids) = database_with_unfinished(backend).await;
    let app = TestApp::spawn_with(
        backend,
        Layer {
            database_url: Some(Secret::new(url)),
            ..Layer::default()
        },
    )
    .await;
    app.sign_in_admin().await;
    for id in &ids {
        let rec = wait_for(&app.client, &app, id, settled).await;
        if rec["status"] == "failed" {
            // Nothing reached the object store: the reason says so.
            assert!(
                rec["failure"].as_str().is_some_and(|f| !f.is_empty()),
                "{rec}"
            );
        }
    }
    let (_, list) = get(&app.client, &app, "/api/v1/recordings?status=recording").await;
    assert_eq!(list["total"], 0, "{list}");
    // The room is free to record again.
    let (status, body) = call(
        &app.client,
        &app,
        Method::POST,
        "/api/v1/rooms/branch-1/recordings",
        None,
    )
    .await;
    assert_ne!(status, 409, "{body}");
    app.stop().await;
}

/// With `recording_retention` configured, a new recording says when it will be deleted.
async fn configured_retention_sets_the_expiry_of_new_recordings(backend: Backend) {
    let app = TestApp::spawn_with(
        backend,
        Layer {
            recording_retention: Some("30d".into()),
            ..Layer::default()
        },
    )
    .await;
    app.sign_in_admin().await;
    let (status, created) = call(
        &app.client,
        &app,
        Method::POST,
        "/api/v1/rooms/kept/recordings",
        None,
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap();
    let (_, rec) = get(&app.client, &app, &format!("/api/v1/recordings/{id}")).await;
    let (started, expires) = (
        rec["started_at"].as_i64().unwrap(),
        rec["expires_at"].as_i64().expect("an expiry"),
    );
    assert_eq!(expires - started, 30 * 86_400_000, "{rec}");
    app.stop().await;
}

/// A recording belongs to its starter's org: that org's members (and its groups') and the orgs
/// above it may watch; another branch may not, on the page, the API or the media URL.
async fn the_owning_org_and_its_superiors_may_watch_other_branches_may_not(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let committee = new_org(&app, None, "街道党工委", "committee").await;
    let a = new_org(&app, Some(&committee), "第一支部", "branch").await;
    let b = new_org(&app, Some(&committee), "第二支部", "branch").await;
    let group = new_org(&app, Some(&a), "第一支部第一小组", "group").await;
    let secretary_a = keeper(&app, "sec-a", "secretary", &a).await;
    let (status, created) = call(
        &secretary_a,
        &app,
        Method::POST,
        "/api/v1/rooms/branch-a/recordings",
        None,
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let (status, _) = call(
        &secretary_a,
        &app,
        Method::POST,
        &format!("/api/v1/recordings/{id}/stop"),
        None,
    )
    .await;
    assert_eq!(status, 202);
    let rec = wait_for(&secretary_a, &app, &id, settled).await;
    assert_eq!(
        rec["org_id"],
        a.as_str(),
        "owned by the starter's org: {rec}"
    );
    // Give it a replay to watch.
    sqlx::query("UPDATE recordings SET status = 'ready', media_key = $2 WHERE id = $1")
        .bind(&id)
        .bind(recorder::replay_key(&id))
        .execute(&app.db().await.pool)
        .await
        .unwrap();
    put_replay(&app, &id).await;

    let api = format!("/api/v1/recordings/{id}");
    let paths = [
        api.clone(),
        format!("{api}/media"),
        format!("{api}/comments"),
    ];
    let member_a = keeper(&app, "m-a", "member", &a).await;
    let member_group = keeper(&app, "m-g", "member", &group).await;
    let above = keeper(&app, "m-c", "member", &committee).await;
    for (who, c) in [
        ("member of A", &member_a),
        ("member of A's group", &member_group),
        ("member of the committee above", &above),
    ] {
        for p in &paths {
            let (status, body) = get(c, &app, p).await;
            assert_eq!(status, 200, "{who} {p}: {body}");
        }
    }
    let member_b = keeper(&app, "m-b", "member", &b).await;
    let admin_b = keeper(&app, "adm-b", "org_admin", &b).await;
    for (who, c) in [("member of B", &member_b), ("org admin of B", &admin_b)] {
        for p in &paths {
            let (status, body) = get(c, &app, p).await;
            assert_eq!(status, 403, "{who} {p}: {body}");
        }
        let (status, _) = page(c, &app, &format!("/recordings/{id}")).await;
        assert_eq!(status, 403, "{who}: the page");
        let (_, list) = get(c, &app, "/api/v1/recordings").await;
        assert_eq!(
            list["total"], 0,
            "{who} does not even see it listed: {list}"
        );
    }
    // Published, another branch's admin may watch it but not change it; the committee's may.
    let admin_above = keeper(&app, "adm-c", "org_admin", &committee).await;
    let (status, _) = call(
        &admin_above,
        &app,
        Method::PATCH,
        &api,
        Some(json!({"published": true})),
    )
    .await;
    assert_eq!(status, 200, "an admin of the org above manages it");
    let (status, _) = get(&admin_b, &app, &api).await;
    assert_eq!(status, 200, "published: everyone signed in watches");
    let (status, _) = call(
        &admin_b,
        &app,
        Method::PATCH,
        &api,
        Some(json!({"title": "改掉"})),
    )
    .await;
    assert_eq!(status, 403, "but another branch's admin does not manage it");
    let (status, _) = call(&admin_b, &app, Method::DELETE, &api, None).await;
    assert_eq!(status, 403);
    app.stop().await;
}

on_both_databases!(
    the_owning_org_and_its_superiors_may_watch_other_branches_may_not,
    configured_retention_sets_the_expiry_of_new_recordings,
    starting_and_stopping_a_recording,
    only_the_creator_admins_and_everyone_once_published_may_watch,
    comments_are_checked_and_shown,
    the_library_filters_by_room_status_title_and_date,
    deleting_removes_the_recording_and_its_media,
    the_replay_is_streamed_with_ranges,
    the_per_track_originals_are_listed_and_streamed,
    the_replay_page_counts_views_and_jumps_to_marks,
    recordings_left_unfinished_by_a_restart_are_finished,
);
