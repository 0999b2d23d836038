//! Work guidance (工作指导) through the API on both databases: sent from a committee to two
//! branches, acknowledged and answered by one, the sender seeing each target's status; targets
//! must be below the sender, and an unrelated org sees nothing.

mod common;

use common::api::{call, keeper, new_org};
use common::{Backend, TestApp};
use reqwest::Method;
use serde_json::json;

async fn guidance_down_the_tree(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let committee = new_org(&app, None, "机关党委", "committee").await;
    let a = new_org(&app, Some(&committee), "第一支部", "branch").await;
    let b = new_org(&app, Some(&committee), "第二支部", "branch").await;
    let other = new_org(&app, None, "另一党委", "committee").await;
    let boss = keeper(&app, "boss", "org_admin", &committee).await;
    let sec_a = keeper(&app, "sec_a", "secretary", &a).await;
    let sec_b = keeper(&app, "sec_b", "secretary", &b).await;
    let outsider = keeper(&app, "outsider", "org_admin", &other).await;
    let plain = keeper(&app, "plain", "member", &a).await;

    let body = json!({"from_org_id": committee, "title": "关于开展主题党日活动的通知", "body": "各支部于月底前完成。",
        "due_on": "2026-12-31", "to_org_ids": [a, b]});
    let (status, g) = call(
        &boss,
        &app,
        Method::POST,
        "/api/v1/guidance",
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, 201, "{g}");
    let id = g["id"].as_str().unwrap().to_string();
    assert_eq!(g["view"], "sender");
    assert_eq!(g["targets"].as_array().unwrap().len(), 2);

    // Targets must be strictly below the sender.
    for bad in [
        json!([other]),
        json!([committee]),
        json!([a, "no-such-org"]),
        json!([]),
    ] {
        let mut req = body.clone();
        req["to_org_ids"] = bad.clone();
        let (status, v) = call(&boss, &app, Method::POST, "/api/v1/guidance", Some(req)).await;
        assert_eq!(status, 422, "{bad}: {v}");
    }
    // A branch cannot send from the committee.
    let (status, _) = call(
        &sec_a,
        &app,
        Method::POST,
        "/api/v1/guidance",
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, 404);

    // Branch A receives it, seeing only its own target, acknowledges and replies.
    let (_, got) = call(
        &sec_a,
        &app,
        Method::GET,
        "/api/v1/guidance?direction=received",
        None,
    )
    .await;
    let got = got.as_array().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["view"], "receiver");
    assert_eq!(got[0]["targets"].as_array().unwrap().len(), 1);
    assert_eq!(got[0]["targets"][0]["org_id"], a.as_str());
    let (_, sent) = call(
        &sec_a,
        &app,
        Method::GET,
        "/api/v1/guidance?direction=sent",
        None,
    )
    .await;
    assert_eq!(sent.as_array().unwrap().len(), 0);
    let (status, _) = call(
        &plain,
        &app,
        Method::POST,
        &format!("/api/v1/guidance/{id}/targets/{a}/ack"),
        None,
    )
    .await;
    assert_eq!(status, 403, "a plain member does not act for the branch");
    let (status, v) = call(
        &sec_a,
        &app,
        Method::POST,
        &format!("/api/v1/guidance/{id}/targets/{a}/ack"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["targets"][0]["acknowledged"], true);
    let (status, _) = call(
        &sec_a,
        &app,
        Method::POST,
        &format!("/api/v1/guidance/{id}/targets/{a}/reply"),
        Some(json!({"reply": " "})),
    )
    .await;
    assert_eq!(status, 422);
    let (status, _) = call(
        &sec_a,
        &app,
        Method::POST,
        &format!("/api/v1/guidance/{id}/targets/{a}/reply"),
        Some(json!({"reply": "已于25日完成。"})),
    )
    .await;
    assert_eq!(status, 200);
    // Not for the other branch.
    let (status, _) = call(
        &sec_a,
        &app,
        Method::POST,
        &format!("/api/v1/guidance/{id}/targets/{b}/ack"),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // The sender sees the status per org.
    let (status, g) = call(
        &boss,
        &app,
        Method::GET,
        &format!("/api/v1/guidance/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let targets = g["targets"].as_array().unwrap();
    let ta = targets.iter().find(|t| t["org_id"] == a.as_str()).unwrap();
    let tb = targets.iter().find(|t| t["org_id"] == b.as_str()).unwrap();
    assert_eq!(ta["acknowledged"], true);
    assert_eq!(ta["replied"], true);
    assert_eq!(ta["reply"], "已于25日完成。");
    assert_eq!(ta["replied_by_name"], "sec_a");
    assert!(ta["replied_at"].as_i64().unwrap() >= ta["acknowledged_at"].as_i64().unwrap());
    assert_eq!(tb["acknowledged"], false);
    assert_eq!(tb["replied"], false);
    let (_, sent) = call(
        &boss,
        &app,
        Method::GET,
        "/api/v1/guidance?direction=sent",
        None,
    )
    .await;
    assert_eq!(sent.as_array().unwrap().len(), 1);
    let (_, received) = call(&boss, &app, Method::GET, "/api/v1/guidance", None).await;
    assert_eq!(
        received.as_array().unwrap().len(),
        0,
        "its own guidance is not received"
    );

    // Branch B sees it only as its own target; an unrelated org sees nothing at all.
    let (_, gb) = call(
        &sec_b,
        &app,
        Method::GET,
        &format!("/api/v1/guidance/{id}"),
        None,
    )
    .await;
    assert_eq!(gb["targets"].as_array().unwrap().len(), 1);
    for (m, p) in [
        (Method::GET, format!("/api/v1/guidance/{id}")),
        (
            Method::POST,
            format!("/api/v1/guidance/{id}/targets/{a}/ack"),
        ),
        (
            Method::POST,
            format!("/api/v1/guidance/{id}/targets/{other}/ack"),
        ),
    ] {
        let (status, _) = call(&outsider, &app, m, &p, None).await;
        assert_eq!(status, 404, "{p}");
    }
    let (_, list) = call(
        &outsider,
        &app,
        Method::GET,
        "/api/v1/guidance?direction=received",
        None,
    )
    .await;
    assert_eq!(list.as_array().unwrap().len(), 0);

    // Pages: the receiver gets the forms, the sender the table.
    let html = sec_b
        .get(app.url("/guidance"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("关于开展主题党日活动的通知")
            && html.contains(&format!("/guidance/{id}/targets/{b}/ack"))
    );
    let html = boss
        .get(app.url("/guidance"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("已于25日完成。") && html.contains("签收 1/2"),
        "{html}"
    );
    app.stop().await;
}

on_both_databases!(guidance_down_the_tree);
