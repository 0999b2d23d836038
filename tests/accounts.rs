//! Accounts and sign-in through the HTTP API and the forms, on SQLite and PostgreSQL.

mod common;

use common::api::call;
use common::{ADMIN_PASSWORD, Backend, TestApp};
use reqwest::Method;
use serde_json::{Value, json};

async fn sign_in_sets_cookie_and_sign_out_ends_it(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    assert_eq!(app.get("/api/v1/me").await.status(), 401);
    let r = app
        .post_json(
            "/api/v1/session",
            json!({"username": "admin", "password": ADMIN_PASSWORD}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    let user: Value = r.json().await.unwrap();
    assert_eq!(user["username"], "admin");
    assert_eq!(user["role"], "system_admin");
    assert!(
        user.get("password_hash").is_none(),
        "hash must never leave the server"
    );
    let me: Value = app.get("/api/v1/me").await.json().await.unwrap();
    assert_eq!(me["username"], "admin");

    let r = app
        .client
        .delete(app.url("/api/v1/session"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(app.get("/api/v1/me").await.status(), 401);
    app.stop().await;
}

async fn wrong_password_is_401_then_throttled(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for _ in 0..5 {
        let r = app
            .post_json(
                "/api/v1/session",
                json!({"username": "admin", "password": "wrong-one"}),
            )
            .await;
        assert_eq!(r.status(), 401);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized");
    }
    // Even the right password is refused while throttled, and the client is told how long to wait.
    let r = app
        .post_json(
            "/api/v1/session",
            json!({"username": "admin", "password": ADMIN_PASSWORD}),
        )
        .await;
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&wait));
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("dangjian_login_failures_total 5"),
        "{metrics}"
    );
    app.stop().await;
}

async fn unknown_user_is_401_like_a_wrong_password(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let r = app
        .post_json(
            "/api/v1/session",
            json!({"username": "nobody", "password": "whatever1"}),
        )
        .await;
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("wrong username or password")
    );
    app.stop().await;
}

async fn malformed_json_is_400_naming_the_problem(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let send = |body: &'static str, ctype: &'static str| {
        app.client
            .post(app.url("/api/v1/session"))
            .header("content-type", ctype)
            .body(body)
            .send()
    };
    let r = send("{\"username\": \"admin\",", "application/json")
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "bad_request");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("json"),
        "{body}"
    );

    let r = send("{\"username\": \"admin\"}", "application/json")
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("password"),
        "names the missing field: {body}"
    );

    let r = send("username=admin", "text/plain").await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("Content-Type"),
        "{body}"
    );
    app.stop().await;
}

async fn users_change_their_password(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let r = app
        .client
        .put(app.url("/api/v1/me/password"))
        .json(&json!({"current_password": "not-it-at-all", "new_password": "brand-new-pass"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = app
        .client
        .put(app.url("/api/v1/me/password"))
        .json(&json!({"current_password": ADMIN_PASSWORD, "new_password": "short"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = app
        .client
        .put(app.url("/api/v1/me/password"))
        .json(&json!({"current_password": ADMIN_PASSWORD, "new_password": "brand-new-pass"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let fresh = common::client();
    let r = fresh
        .post(app.url("/api/v1/session"))
        .json(&json!({"username": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the old password no longer works");
    app.sign_in("admin", "brand-new-pass").await;
    app.stop().await;
}

async fn roles_are_checked_on_every_endpoint(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let member = app.user_client("zhang.san", "member").await;
    let me: Value = member
        .get(app.url("/api/v1/me"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["role"], "member");
    assert_eq!(me["must_change_password"], false, "chose their own");
    assert_eq!(
        member
            .get(app.url("/api/v1/users"))
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    let r = member
        .post(app.url("/api/v1/users"))
        .json(&json!({"username": "x", "display_name": "x", "password": "12345678", "role": "system_admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a member cannot make an admin");

    let users: Vec<Value> = app.get("/api/v1/users").await.json().await.unwrap();
    let names: Vec<&str> = users
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["admin", "zhang.san"]);

    let r = app
        .post_json("/api/v1/users", json!({"username": "zhang.san", "display_name": "", "password": "12345678", "role": "member"}))
        .await;
    assert_eq!(r.status(), 409);
    let r = app
        .post_json("/api/v1/users", json!({"username": "li", "display_name": "", "password": "12345678", "role": "emperor"}))
        .await;
    assert_eq!(r.status(), 400, "unknown role");
    app.stop().await;
}

async fn cross_site_requests_are_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let r = app
        .client
        .post(app.url("/api/v1/session"))
        .header("origin", "http://evil.example")
        .json(&json!({"username": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let same = format!("http://{}", app.addr);
    let r = app
        .client
        .post(app.url("/api/v1/session"))
        .header("origin", same)
        .json(&json!({"username": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.stop().await;
}

async fn sign_in_form_needs_its_csrf_token(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    // Without first loading the form there is no CSRF cookie: the post is refused.
    let r = app
        .client
        .post(app.url("/login"))
        .form(&[
            ("username", "admin"),
            ("password", ADMIN_PASSWORD),
            ("csrf", "guess"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let page = app.get("/login").await.text().await.unwrap();
    let token = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    let r = app
        .client
        .post(app.url("/login"))
        .form(&[
            ("username", "admin"),
            ("password", "wrong-password"),
            ("csrf", &token),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("用户名或密码错误"));

    let r = app
        .client
        .post(app.url("/login"))
        .form(&[
            ("username", "admin"),
            ("password", ADMIN_PASSWORD),
            ("csrf", &token),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/");
    let home = app.get("/").await;
    assert_eq!(home.status(), 200);
    let html = home.text().await.unwrap();
    assert!(
        html.contains("您好，系统管理员") && html.contains("系统管理"),
        "{html}"
    );
    app.stop().await;
}

/// Someone signed in with the initial password an admin gave them may look at who they are and
/// change it; nothing else, in the API or the pages, until they have.
async fn an_initial_password_is_good_only_for_changing_it(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let r = app
        .post_json("/api/v1/users", json!({"username": "wang.wu", "display_name": "王五", "password": "initial-pass-1", "role": "secretary"}))
        .await;
    assert_eq!(r.status(), 201);
    let c = app.signed_in("wang.wu", "initial-pass-1").await;
    let (_, me) = call(&c, &app, Method::GET, "/api/v1/me", None).await;
    assert_eq!(me["must_change_password"], true);

    let (status, body) = call(&c, &app, Method::GET, "/api/v1/members", None).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"], "password_change_required", "{body}");
    let tokens = "/api/v1/rooms/branch-1/tokens";
    let (status, _) = call(&c, &app, Method::POST, tokens, Some(json!({}))).await;
    assert_eq!(status, 403, "no meeting tokens either");
    for page in ["/members", "/orgs", "/"] {
        let r = c.get(app.url(page)).send().await.unwrap();
        assert_eq!(r.status(), 303, "{page}");
        assert_eq!(r.headers()["location"], "/account/password", "{page}");
    }
    let (status, _) = call(&c, &app, Method::GET, "/account/password", None).await;
    assert_eq!(status, 200);

    let change = json!({"current_password": "initial-pass-1", "new_password": "wang-own-pass-5"});
    let (status, _) = call(&c, &app, Method::PUT, "/api/v1/me/password", Some(change)).await;
    assert!(status.is_success());
    // Now they may; with no org of their own they see no members (on both databases).
    let (status, list) = call(&c, &app, Method::GET, "/api/v1/members", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["total"], 0, "{list}");
    let (status, _) = call(&c, &app, Method::GET, "/members", None).await;
    assert_eq!(status, 200);
    app.stop().await;
}

async fn generated_admin_must_change_password_first(backend: Backend) {
    // Without a configured password the first start makes one and forces a change.
    let dir = tempfile::tempdir().unwrap();
    let pg = match backend {
        Backend::Postgres => Some(common::PgDatabase::create().await),
        Backend::Sqlite => None,
    };
    let config = dangjian::config::Layer {
        http: Some("127.0.0.1:0".into()),
        data: Some(dir.path().to_path_buf()),
        database_url: pg
            .as_ref()
            .map(|p| dangjian::config::Secret::new(p.url.clone())),
        rtc_udp: Some("127.0.0.1:0".into()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    let server = dangjian::start(config.clone()).await.unwrap();
    let pw = server
        .generated_admin_password
        .clone()
        .expect("a one-time password is printed");
    let c = common::client();
    let url = |p: &str| format!("http://{}{}", server.addr, p);
    let r = c
        .post(url("/api/v1/session"))
        .json(&json!({"username": "admin", "password": pw}))
        .send()
        .await
        .unwrap();
    let user: Value = r.json().await.unwrap();
    assert_eq!(user["must_change_password"], true);
    let r = c.get(url("/")).send().await.unwrap();
    assert_eq!(r.headers()["location"], "/account/password");
    server.stop().await.unwrap();
    // A second start keeps the account and prints nothing.
    let again = dangjian::start(config).await.unwrap();
    assert!(again.generated_admin_password.is_none());
    again.stop().await.unwrap();
}

async fn expired_sessions_are_purged(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let db = portal::db::Db::connect_only(&app.database_url())
        .await
        .unwrap();
    sqlx_any_exec(&db, "INSERT INTO sessions (token_hash, user_id, created_at, expires_at) SELECT 'old', id, 0, 1 FROM users WHERE username = 'admin'").await;
    let count = |db: portal::db::Db| async move {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM sessions")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        n
    };
    assert_eq!(count(db.clone()).await, 2);
    assert_eq!(portal::auth::purge_expired_sessions(&db).await.unwrap(), 1);
    assert_eq!(count(db.clone()).await, 1, "the live session stays");
    assert_eq!(app.get("/api/v1/me").await.status(), 200, "and still works");
    db.pool.close().await;
    app.stop().await;
}

async fn sqlx_any_exec(db: &portal::db::Db, sql: &str) {
    sqlx::query(sql).execute(&db.pool).await.unwrap();
}

on_both_databases!(
    sign_in_sets_cookie_and_sign_out_ends_it,
    wrong_password_is_401_then_throttled,
    unknown_user_is_401_like_a_wrong_password,
    malformed_json_is_400_naming_the_problem,
    users_change_their_password,
    roles_are_checked_on_every_endpoint,
    cross_site_requests_are_refused,
    sign_in_form_needs_its_csrf_token,
    generated_admin_must_change_password_first,
    an_initial_password_is_good_only_for_changing_it,
    expired_sessions_are_purged,
);
