//! Membership changes (党籍管理) through the API, on both databases: an internal transfer waits
//! for the receiving org, which alone may accept (the member moves) or reject (the member stays);
//! deciding twice is 409; transfers out of the system keep the record as `transferred_out`; moves
//! stay inside one's own subtree; and a member outside the caller's subtree is simply not there.
//! Members are seeded by SQL (the members API is another module's).

mod common;

use common::api::{call, keeper, new_org};
use common::{Backend, TestApp};
use reqwest::Method;
use serde_json::{Value, json};

/// Inserts a member straight into the table; returns its id.
async fn seed_member(db: &portal::db::Db, org: &str, name: &str) -> String {
    let id = uuid::Uuid::now_v7().to_string();
    let id_number: String = uuid::Uuid::new_v4().simple().to_string()[..18].to_string();
    sqlx::query(
        "INSERT INTO members (id, org_id, name, gender, id_number, birth_date, joined_on, category, created_at, updated_at) \
         VALUES ($1, $2, $3, 'female', $4, '1980-01-01', '2005-07-01', 'full', 0, 0)",
    )
    .bind(&id)
    .bind(org)
    .bind(name)
    .bind(&id_number)
    .execute(&db.pool)
    .await
    .unwrap();
    id
}

async fn member_org_and_status(db: &portal::db::Db, id: &str) -> (String, String) {
    sqlx::query_as("SELECT org_id, status FROM members WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn members_of(db: &portal::db::Db, org: &str) -> Vec<String> {
    let rows: Vec<(String,)> = sqlx::query_as("SELECT id FROM members WHERE org_id = $1")
        .bind(org)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    rows.into_iter().map(|(id,)| id).collect()
}

async fn audited(db: &portal::db::Db, action: &str, target: &str) -> bool {
    let (n,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM audit_log WHERE action = $1 AND target = $2")
            .bind(action)
            .bind(target)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    n == 1
}

struct World {
    app: TestApp,
    db: portal::db::Db,
    east: String,
    east_b1: String,
    east_b2: String,
    west: String,
    west_b1: String,
    /// Secretary of 东一支部.
    sec_e1: reqwest::Client,
    /// Secretary of 西一支部.
    sec_w1: reqwest::Client,
    /// Org admin of 东街道党工委 (东一 and 东二 below it).
    east_admin: reqwest::Client,
}

async fn world(backend: Backend) -> World {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let county = new_org(&app, None, "县委", "committee").await;
    let east = new_org(&app, Some(&county), "东街道党工委", "committee").await;
    let west = new_org(&app, Some(&county), "西街道党工委", "committee").await;
    let east_b1 = new_org(&app, Some(&east), "东一支部", "branch").await;
    let east_b2 = new_org(&app, Some(&east), "东二支部", "branch").await;
    let west_b1 = new_org(&app, Some(&west), "西一支部", "branch").await;
    let sec_e1 = keeper(&app, "sec-e1", "secretary", &east_b1).await;
    let sec_w1 = keeper(&app, "sec-w1", "secretary", &west_b1).await;
    let east_admin = keeper(&app, "east-admin", "org_admin", &east).await;
    let db = app.db().await;
    World {
        app,
        db,
        east,
        east_b1,
        east_b2,
        west,
        west_b1,
        sec_e1,
        sec_w1,
        east_admin,
    }
}

async fn internal_transfer_waits_for_the_receiving_org(backend: Backend) {
    let w = world(backend).await;
    let app = &w.app;
    let m = seed_member(&w.db, &w.east_b1, "张三").await;

    let (status, t) = call(
        &w.sec_e1,
        app,
        Method::POST,
        &format!("/api/v1/members/{m}/transfers"),
        Some(json!({"kind": "internal", "to_org_id": w.west_b1, "reason": "工作调动"})),
    )
    .await;
    assert_eq!(status, 201, "{t}");
    assert_eq!(t["status"], "pending");
    assert_eq!(t["kind"], "internal");
    assert_eq!(t["from_org_id"], w.east_b1.as_str());
    assert_eq!(t["to_org_id"], w.west_b1.as_str());
    assert_eq!(t["member_name"], "张三");
    let tid = t["id"].as_str().unwrap().to_string();
    assert!(audited(&w.db, "transfer_request", &tid).await);
    assert_eq!(
        member_org_and_status(&w.db, &m).await,
        (w.east_b1.clone(), "normal".into()),
        "the member stays until accepted"
    );

    // One pending transfer at a time, and no other change meanwhile.
    for body in [
        json!({"kind": "internal", "to_org_id": w.west_b1}),
        json!({"kind": "out", "outside_org": "外省某单位", "letter_no": "2026-001"}),
    ] {
        let (status, v) = call(
            &w.sec_e1,
            app,
            Method::POST,
            &format!("/api/v1/members/{m}/transfers"),
            Some(body),
        )
        .await;
        assert_eq!(status, 409, "{v}");
    }

    // Both sides list it: outgoing for the sender, incoming for the receiver.
    let (status, out) = call(
        &w.sec_e1,
        app,
        Method::GET,
        "/api/v1/transfers?direction=outgoing&status=pending",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(out.as_array().unwrap().len(), 1);
    let (_, incoming_for_sender) = call(
        &w.sec_e1,
        app,
        Method::GET,
        "/api/v1/transfers?direction=incoming",
        None,
    )
    .await;
    assert_eq!(incoming_for_sender, json!([]));
    let (_, incoming) = call(
        &w.sec_w1,
        app,
        Method::GET,
        "/api/v1/transfers?direction=incoming&status=pending",
        None,
    )
    .await;
    assert_eq!(incoming.as_array().unwrap().len(), 1);
    assert_eq!(incoming[0]["id"], tid.as_str());
    let (status, _) = call(
        &w.sec_w1,
        app,
        Method::GET,
        "/api/v1/transfers?direction=sideways",
        None,
    )
    .await;
    assert_eq!(status, 400);

    // The sender cannot accept its own request: it is not theirs to decide.
    for path in ["accept", "reject"] {
        let (status, v) = call(
            &w.sec_e1,
            app,
            Method::POST,
            &format!("/api/v1/transfers/{tid}/{path}"),
            Some(json!({"reason": "自己批准"})),
        )
        .await;
        assert_eq!(status, 404, "{path}: {v}");
    }
    // Nor can the receiver withdraw it.
    let (status, _) = call(
        &w.sec_w1,
        app,
        Method::POST,
        &format!("/api/v1/transfers/{tid}/cancel"),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // The receiving secretary accepts (no body needed): the member moves.
    let r = w
        .sec_w1
        .post(app.url(&format!("/api/v1/transfers/{tid}/accept")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["status"], "accepted");
    assert!(t["decided_at"].as_i64().is_some());
    assert!(audited(&w.db, "transfer_accept", &tid).await);
    assert_eq!(
        member_org_and_status(&w.db, &m).await,
        (w.west_b1.clone(), "normal".into())
    );
    assert!(!members_of(&w.db, &w.east_b1).await.contains(&m));
    assert!(members_of(&w.db, &w.west_b1).await.contains(&m));

    // Deciding twice is a conflict, whichever way.
    for path in ["accept", "reject"] {
        let (status, v) = call(
            &w.sec_w1,
            app,
            Method::POST,
            &format!("/api/v1/transfers/{tid}/{path}"),
            Some(json!({"reason": "再来一次"})),
        )
        .await;
        assert_eq!(status, 409, "{path}: {v}");
    }

    // The member is now the receiver's: the sender no longer sees them at all.
    let (status, _) = call(
        &w.sec_e1,
        app,
        Method::GET,
        &format!("/api/v1/members/{m}/transfers"),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, history) = call(
        &w.sec_w1,
        app,
        Method::GET,
        &format!("/api/v1/members/{m}/transfers"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(history.as_array().unwrap().len(), 1);
    assert_eq!(history[0]["status"], "accepted");
    // The sender still sees the transfer itself among its outgoing ones.
    let (status, one) = call(
        &w.sec_e1,
        app,
        Method::GET,
        &format!("/api/v1/transfers/{tid}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(one["status"], "accepted");

    w.db.pool.close().await;
    w.app.stop().await;
}

async fn rejected_transfers_keep_the_member(backend: Backend) {
    let w = world(backend).await;
    let app = &w.app;
    let m = seed_member(&w.db, &w.east_b1, "李四").await;
    let ask = |body: Value| {
        let c = w.sec_e1.clone();
        let path = format!("/api/v1/members/{m}/transfers");
        async move { call(&c, app, Method::POST, &path, Some(body)).await }
    };

    // Receiving orgs that make no sense.
    for (to, why) in [
        (w.east_b1.clone(), "the member's own org"),
        (w.west.clone(), "a committee"),
        ("no-such-org".to_string(), "nothing"),
    ] {
        let (status, v) = ask(json!({"kind": "internal", "to_org_id": to})).await;
        assert_eq!(status, 422, "{why}: {v}");
    }
    let (status, _) = ask(json!({"kind": "internal"})).await;
    assert_eq!(status, 422);

    let (status, t) =
        ask(json!({"kind": "internal", "to_org_id": w.west_b1, "reason": "随配偶迁居"})).await;
    assert_eq!(status, 201);
    let tid = t["id"].as_str().unwrap().to_string();

    let (status, _) = call(
        &w.sec_w1,
        app,
        Method::POST,
        &format!("/api/v1/transfers/{tid}/reject"),
        Some(json!({"reason": "  "})),
    )
    .await;
    assert_eq!(status, 422, "a rejection needs a reason");
    let (status, t) = call(
        &w.sec_w1,
        app,
        Method::POST,
        &format!("/api/v1/transfers/{tid}/reject"),
        Some(json!({"reason": "材料不全"})),
    )
    .await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["status"], "rejected");
    let reason = t["reason"].as_str().unwrap();
    assert!(
        reason.contains("随配偶迁居") && reason.contains("材料不全"),
        "{reason}"
    );
    assert!(audited(&w.db, "transfer_reject", &tid).await);
    assert_eq!(
        member_org_and_status(&w.db, &m).await,
        (w.east_b1.clone(), "normal".into())
    );
    for path in ["accept", "reject"] {
        let (status, _) = call(
            &w.sec_w1,
            app,
            Method::POST,
            &format!("/api/v1/transfers/{tid}/{path}"),
            Some(json!({"reason": "改主意"})),
        )
        .await;
        assert_eq!(status, 409, "{path}");
    }

    // Asked again after the rejection, and withdrawn by the sender this time.
    let (status, t) = ask(json!({"kind": "internal", "to_org_id": w.west_b1})).await;
    assert_eq!(status, 201);
    let tid2 = t["id"].as_str().unwrap().to_string();
    let (status, t) = call(
        &w.sec_e1,
        app,
        Method::POST,
        &format!("/api/v1/transfers/{tid2}/cancel"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(t["status"], "rejected");
    assert!(t["reason"].as_str().unwrap().contains("撤回"));
    let (status, _) = call(
        &w.sec_w1,
        app,
        Method::POST,
        &format!("/api/v1/transfers/{tid2}/accept"),
        None,
    )
    .await;
    assert_eq!(status, 409, "withdrawn is decided");

    let (_, history) = call(
        &w.sec_e1,
        app,
        Method::GET,
        &format!("/api/v1/members/{m}/transfers"),
        None,
    )
    .await;
    let ids: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [tid.as_str(), tid2.as_str()], "oldest first");

    w.db.pool.close().await;
    w.app.stop().await;
}

async fn out_move_and_in_and_scoping(backend: Backend) {
    let w = world(backend).await;
    let app = &w.app;
    let m = seed_member(&w.db, &w.east_b1, "王五").await;

    // A secretary of another branch cannot touch a member they do not keep.
    for body in [
        json!({"kind": "internal", "to_org_id": w.west_b1}),
        json!({"kind": "out", "outside_org": "某省", "letter_no": "1"}),
        json!({"kind": "move", "to_org_id": w.west_b1}),
    ] {
        let (status, v) = call(
            &w.sec_w1,
            app,
            Method::POST,
            &format!("/api/v1/members/{m}/transfers"),
            Some(body),
        )
        .await;
        assert_eq!(status, 404, "{v}");
    }
    let (status, _) = call(
        &w.sec_w1,
        app,
        Method::GET,
        &format!("/api/v1/members/{m}/transfers"),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // Moves stay inside one's own subtree: the branch secretary cannot reach 东二支部…
    let (status, _) = call(
        &w.sec_e1,
        app,
        Method::POST,
        &format!("/api/v1/members/{m}/transfers"),
        Some(json!({"kind": "move", "to_org_id": w.east_b2})),
    )
    .await;
    assert_eq!(status, 404);
    // …the street committee's admin can, at once.
    let (status, t) = call(
        &w.east_admin,
        app,
        Method::POST,
        &format!("/api/v1/members/{m}/transfers"),
        Some(json!({"kind": "move", "to_org_id": w.east_b2, "reason": "支部调整"})),
    )
    .await;
    assert_eq!(status, 201, "{t}");
    assert_eq!(t["status"], "done");
    assert!(audited(&w.db, "transfer_move", t["id"].as_str().unwrap()).await);
    assert_eq!(member_org_and_status(&w.db, &m).await.0, w.east_b2);
    let (status, _) = call(
        &w.east_admin,
        app,
        Method::POST,
        &format!("/api/v1/members/{m}/transfers"),
        Some(json!({"kind": "move", "to_org_id": w.east})),
    )
    .await;
    assert_eq!(status, 422, "not into a committee");

    // Out of the system: the letter is required; the record stays, marked transferred out.
    let (status, _) = call(
        &w.east_admin,
        app,
        Method::POST,
        &format!("/api/v1/members/{m}/transfers"),
        Some(json!({"kind": "out", "outside_org": "外省某市委组织部"})),
    )
    .await;
    assert_eq!(status, 422);
    let (status, t) = call(
        &w.east_admin,
        app,
        Method::POST,
        &format!("/api/v1/members/{m}/transfers"),
        Some(json!({"kind": "out", "outside_org": "外省某市委组织部", "letter_no": "东组转〔2026〕12号"})),
    )
    .await;
    assert_eq!(status, 201, "{t}");
    assert_eq!(t["status"], "done");
    assert_eq!(t["letter_no"], "东组转〔2026〕12号");
    assert!(audited(&w.db, "transfer_out", t["id"].as_str().unwrap()).await);
    assert_eq!(
        member_org_and_status(&w.db, &m).await,
        (w.east_b2.clone(), "transferred_out".into())
    );
    let (status, _) = call(
        &w.east_admin,
        app,
        Method::POST,
        &format!("/api/v1/members/{m}/transfers"),
        Some(json!({"kind": "internal", "to_org_id": w.west_b1})),
    )
    .await;
    assert_eq!(status, 409, "a member transferred out goes nowhere else");

    // Coming back from outside, into 东一支部.
    let (status, t) = call(
        &w.east_admin,
        app,
        Method::POST,
        "/api/v1/transfers/in",
        Some(json!({"member_id": m, "outside_org": "外省某市委组织部", "letter_no": "外组转〔2027〕3号", "to_org_id": w.east_b1})),
    )
    .await;
    assert_eq!(status, 201, "{t}");
    assert_eq!(t["kind"], "in");
    assert_eq!(t["status"], "done");
    assert_eq!(
        member_org_and_status(&w.db, &m).await,
        (w.east_b1.clone(), "normal".into())
    );
    let (status, _) = call(
        &w.east_admin,
        app,
        Method::POST,
        "/api/v1/transfers/in",
        Some(json!({"member_id": m, "outside_org": "x", "letter_no": "y", "to_org_id": w.west_b1})),
    )
    .await;
    assert_eq!(status, 404, "arrivals are placed inside one's own subtree");

    let (_, history) = call(
        &w.sec_e1,
        app,
        Method::GET,
        &format!("/api/v1/members/{m}/transfers"),
        None,
    )
    .await;
    let kinds: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["move", "out", "in"], "the whole history is kept");

    // Plain members may not manage transfers.
    let member = keeper(app, "plain", "member", &w.east_b1).await;
    let (status, _) = call(&member, app, Method::GET, "/api/v1/transfers", None).await;
    assert_eq!(status, 403);

    w.db.pool.close().await;
    w.app.stop().await;
}

fn csrf_of(html: &str) -> String {
    let at = html
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token")
        + 19;
    html[at..at + 64].to_string()
}

async fn the_page_lists_and_accepts(backend: Backend) {
    let w = world(backend).await;
    let app = &w.app;
    let m = seed_member(&w.db, &w.east_b1, "赵六").await;
    let (status, t) = call(
        &w.sec_e1,
        app,
        Method::POST,
        &format!("/api/v1/members/{m}/transfers"),
        Some(json!({"kind": "internal", "to_org_id": w.west_b1})),
    )
    .await;
    assert_eq!(status, 201);
    let tid = t["id"].as_str().unwrap();

    let r = w.sec_w1.get(app.url("/transfers")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    assert!(html.contains("赵六") && html.contains(&format!("/transfers/{tid}/accept")));
    let csrf = csrf_of(&html);

    let r = w
        .sec_w1
        .post(app.url(&format!("/transfers/{tid}/accept")))
        .form(&[("csrf", "wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = w
        .sec_w1
        .post(app.url(&format!("/transfers/{tid}/accept")))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(member_org_and_status(&w.db, &m).await.0, w.west_b1);
    let r = w
        .sec_w1
        .post(app.url(&format!("/transfers/{tid}/accept")))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409, "the page says it was decided already");

    let r = w.sec_e1.get(app.url("/transfers")).send().await.unwrap();
    let html = r.text().await.unwrap();
    assert!(
        html.contains("赵六") && html.contains("已接收"),
        "outgoing list"
    );

    let member = keeper(app, "plain", "member", &w.east_b1).await;
    let r = member.get(app.url("/transfers")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = common::client()
        .get(app.url("/transfers"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "sign in first");

    w.db.pool.close().await;
    w.app.stop().await;
}

on_both_databases!(
    internal_transfer_waits_for_the_receiving_org,
    rejected_transfers_keep_the_member,
    out_move_and_in_and_scoping,
    the_page_lists_and_accepts,
);
