//! REST helpers shared by the API tests: a request with its JSON answer, orgs, and signed-in
//! users who keep an org.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::TestApp;

/// Sends `method path` (with a JSON body, if any) as `c`; the status and the JSON answer (null
/// when the body is not JSON).
pub async fn call(
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
    let r = req.send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Creates an org as the signed-in admin (`app.client`); its id.
pub async fn new_org(app: &TestApp, parent: Option<&str>, name: &str, kind: &str) -> String {
    new_org_as(&app.client, app, parent, name, kind).await
}

/// Creates an org as `c`; its id.
pub async fn new_org_as(
    c: &reqwest::Client,
    app: &TestApp,
    parent: Option<&str>,
    name: &str,
    kind: &str,
) -> String {
    let (status, v) = call(
        c,
        app,
        Method::POST,
        "/api/v1/orgs",
        Some(json!({"parent_id": parent, "name": name, "kind": kind})),
    )
    .await;
    assert_eq!(status, 201, "create {name}: {v}");
    v["id"].as_str().unwrap().to_string()
}

/// A client signed in as a new user of `role` keeping `org` (created by the signed-in admin).
pub async fn keeper(app: &TestApp, username: &str, role: &str, org: &str) -> reqwest::Client {
    let (status, v) = call(
        &app.client,
        app,
        Method::POST,
        "/api/v1/users",
        Some(json!({"username": username, "display_name": username, "password": "initial-pass-1", "role": role, "org_id": org})),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["org_id"], org);
    app.signed_in_new_user(username).await
}
