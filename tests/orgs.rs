//! The org tree through the API, on both databases: building it, renaming, moving a subtree,
//! dissolving only when empty, and above all scoping — an org admin sees and changes only their
//! own subtree, and a guessed id from elsewhere is simply not there (404).

mod common;

use common::api::{call, keeper, new_org_as as new_org};
use common::{Backend, TestApp};
use reqwest::Method;
use serde_json::{Value, json};

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap().to_string())
        .collect()
}

async fn an_org_admin_keeps_only_their_subtree(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let county = new_org(&app.client, &app, None, "县委", "committee").await;
    let east = new_org(
        &app.client,
        &app,
        Some(&county),
        "东街道党工委",
        "committee",
    )
    .await;
    let west = new_org(
        &app.client,
        &app,
        Some(&county),
        "西街道党工委",
        "committee",
    )
    .await;
    let east_b1 = new_org(&app.client, &app, Some(&east), "东一支部", "branch").await;
    let west_b1 = new_org(&app.client, &app, Some(&west), "西一支部", "branch").await;

    let (_, all) = call(&app.client, &app, Method::GET, "/api/v1/orgs", None).await;
    assert_eq!(
        names(&all),
        [
            "县委",
            "东街道党工委",
            "东一支部",
            "西街道党工委",
            "西一支部"
        ],
        "tree order, children under parents"
    );

    let east_admin = keeper(&app, "east", "org_admin", &east).await;
    let (_, mine) = call(&east_admin, &app, Method::GET, "/api/v1/orgs", None).await;
    assert_eq!(names(&mine), ["东街道党工委", "东一支部"]);

    // Another subtree's ids are not there, for reading or changing.
    for (method, path, body) in [
        (Method::GET, format!("/api/v1/orgs/{west_b1}"), None),
        (
            Method::PATCH,
            format!("/api/v1/orgs/{west_b1}"),
            Some(json!({"name": "改名"})),
        ),
        (Method::DELETE, format!("/api/v1/orgs/{west_b1}"), None),
        (
            Method::POST,
            format!("/api/v1/orgs/{west_b1}/move"),
            Some(json!({"parent_id": east})),
        ),
        (
            Method::POST,
            format!("/api/v1/orgs/{east_b1}/move"),
            Some(json!({"parent_id": west})),
        ),
        (Method::GET, format!("/api/v1/orgs/{county}"), None),
    ] {
        let (status, v) = call(&east_admin, &app, method.clone(), &path, body).await;
        assert_eq!(status, 404, "{method} {path}: {v}");
    }
    let (status, _) = call(
        &east_admin,
        &app,
        Method::POST,
        "/api/v1/orgs",
        Some(json!({"parent_id": west, "name": "偷建", "kind": "branch"})),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = call(
        &east_admin,
        &app,
        Method::POST,
        "/api/v1/orgs",
        Some(json!({"name": "新顶级", "kind": "committee"})),
    )
    .await;
    assert_eq!(status, 403, "only system admins make roots");
    // Nor may they give a new user an org outside their subtree.
    let (status, _) = call(
        &east_admin,
        &app,
        Method::POST,
        "/api/v1/users",
        Some(json!({"username": "x", "display_name": "x", "password": "initial-pass-1", "role": "member", "org_id": west})),
    )
    .await;
    assert!(status == 403 || status == 404, "{status}");

    // Within their subtree they build and rename.
    let east_b2 = new_org(&east_admin, &app, Some(&east), "东二支部", "branch").await;
    let (status, v) = call(
        &east_admin,
        &app,
        Method::PATCH,
        &format!("/api/v1/orgs/{east_b2}"),
        Some(json!({"name": "  东二支部（社区） "})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["name"], "东二支部（社区）");
    let (status, _) = call(
        &east_admin,
        &app,
        Method::POST,
        &format!("/api/v1/orgs/{east}/move"),
        Some(json!({"parent_id": east_b1})),
    )
    .await;
    assert_eq!(status, 403, "the root of one's own subtree stays put");
    let (status, _) = call(
        &east_admin,
        &app,
        Method::PATCH,
        &format!("/api/v1/orgs/{east_b2}"),
        Some(json!({"name": "   "})),
    )
    .await;
    assert_eq!(status, 422);

    // A secretary without the org permission reads their branch but cannot restructure.
    let secretary = keeper(&app, "sec", "secretary", &east_b1).await;
    let (_, seen) = call(&secretary, &app, Method::GET, "/api/v1/orgs", None).await;
    assert_eq!(names(&seen), ["东一支部"]);
    let (status, _) = call(
        &secretary,
        &app,
        Method::POST,
        "/api/v1/orgs",
        Some(json!({"parent_id": east_b1, "name": "小组", "kind": "group"})),
    )
    .await;
    assert_eq!(status, 403);
    app.stop().await;
}

async fn moving_a_subtree_carries_its_descendants(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let root = new_org(&app.client, &app, None, "市委", "committee").await;
    let a = new_org(&app.client, &app, Some(&root), "甲党委", "committee").await;
    let b = new_org(&app.client, &app, Some(&root), "乙党委", "committee").await;
    let branch = new_org(&app.client, &app, Some(&a), "甲一支部", "branch").await;
    let group = new_org(&app.client, &app, Some(&branch), "第一党小组", "group").await;

    let (status, moved) = call(
        &app.client,
        &app,
        Method::POST,
        &format!("/api/v1/orgs/{branch}/move"),
        Some(json!({"parent_id": b})),
    )
    .await;
    assert_eq!(status, 200, "{moved}");
    assert_eq!(moved["parent_id"], b.as_str());
    // b's keeper now sees the branch and its group; a's keeper no longer does.
    let b_admin = keeper(&app, "badmin", "org_admin", &b).await;
    let (_, seen) = call(&b_admin, &app, Method::GET, "/api/v1/orgs", None).await;
    assert_eq!(names(&seen), ["乙党委", "甲一支部", "第一党小组"]);
    let (status, g) = call(
        &b_admin,
        &app,
        Method::GET,
        &format!("/api/v1/orgs/{group}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(g["depth"], 3);
    let a_admin = keeper(&app, "aadmin", "org_admin", &a).await;
    let (status, _) = call(
        &a_admin,
        &app,
        Method::GET,
        &format!("/api/v1/orgs/{group}"),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // Not under itself; dissolving waits until it is empty.
    let (status, _) = call(
        &app.client,
        &app,
        Method::POST,
        &format!("/api/v1/orgs/{branch}/move"),
        Some(json!({"parent_id": group})),
    )
    .await;
    assert_eq!(status, 422);
    let (status, v) = call(
        &app.client,
        &app,
        Method::DELETE,
        &format!("/api/v1/orgs/{branch}"),
        None,
    )
    .await;
    assert_eq!(status, 409, "{v}");
    let (status, _) = call(
        &app.client,
        &app,
        Method::DELETE,
        &format!("/api/v1/orgs/{group}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = call(
        &app.client,
        &app,
        Method::DELETE,
        &format!("/api/v1/orgs/{branch}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    app.stop().await;
}

/// The tree page shows one's own subtree, and its forms change it.
async fn the_tree_page_shows_and_changes_only_ones_subtree(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let root = new_org(&app.client, &app, None, "镇党委", "committee").await;
    let a = new_org(&app.client, &app, Some(&root), "甲村党支部", "branch").await;
    new_org(&app.client, &app, Some(&root), "乙村党支部", "branch").await;
    let keeper_a = keeper(&app, "cun", "org_admin", &a).await;
    let html = keeper_a
        .get(app.url("/orgs"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("甲村党支部") && !html.contains("乙村党支部") && !html.contains("镇党委")
    );
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a CSRF token in the form")
        .to_string();
    let r = keeper_a
        .post(app.url("/orgs"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("parent_id", a.as_str()),
            ("name", "第一党小组"),
            ("kind", "group"),
        ])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_redirection(), "{}", r.status());
    let (_, mine) = call(&keeper_a, &app, Method::GET, "/api/v1/orgs", None).await;
    assert_eq!(names(&mine), ["甲村党支部", "第一党小组"]);
    // A refused change says why on the page.
    let r = keeper_a
        .post(app.url(&format!("/orgs/{a}/dissolve")))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert!(r.text().await.unwrap().contains("不能撤销自己管理的根组织"));
    app.stop().await;
}

on_both_databases!(
    the_tree_page_shows_and_changes_only_ones_subtree,
    an_org_admin_keeps_only_their_subtree,
    moving_a_subtree_carries_its_descendants,
);
