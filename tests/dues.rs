//! Party dues (党费) through the API, on both databases: the month's sheet entered in one go and
//! re-entered idempotently, all or nothing when a member is not the org's, arrears and totals
//! that add up to the fen, and scoping (an org outside one's subtree is 404).
//! Members are seeded by SQL (the members API is another module's).

mod common;

use common::api::{call, keeper, new_org};
use common::{Backend, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn seed_member(db: &portal::db::Db, org: &str, name: &str, status: &str) -> String {
    let id = uuid::Uuid::now_v7().to_string();
    let id_number: String = uuid::Uuid::new_v4().simple().to_string()[..18].to_string();
    sqlx::query(
        "INSERT INTO members (id, org_id, name, gender, id_number, birth_date, joined_on, category, status, created_at, updated_at) \
         VALUES ($1, $2, $3, 'male', $4, '1975-05-05', '2000-07-01', 'full', $5, 0, 0)",
    )
    .bind(&id)
    .bind(org)
    .bind(name)
    .bind(&id_number)
    .bind(status)
    .execute(&db.pool)
    .await
    .unwrap();
    id
}

async fn dues_rows(db: &portal::db::Db) -> Vec<(String, String, String, i64, i64, Option<String>)> {
    sqlx::query_as(
        "SELECT member_id, month, org_id, due_fen, paid_fen, paid_on FROM dues ORDER BY member_id, month",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

fn row<'a>(sheet: &'a Value, member: &str) -> &'a Value {
    sheet["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["member_id"] == member)
        .unwrap_or_else(|| panic!("{member} not on the sheet {sheet}"))
}

struct World {
    app: TestApp,
    db: portal::db::Db,
    east: String,
    east_b1: String,
    east_b2: String,
    west_b1: String,
    /// Secretary of 东街道党总支 (东一 and 东二 below it).
    sec_e: reqwest::Client,
    /// Secretary of 东一支部.
    sec_b1: reqwest::Client,
    /// Secretary of 西一支部.
    sec_w: reqwest::Client,
    a: String,
    b: String,
    c: String,
    w: String,
    gone: String,
}

async fn world(backend: Backend) -> World {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let county = new_org(&app, None, "县委", "committee").await;
    let east = new_org(&app, Some(&county), "东街道党总支", "general_branch").await;
    let west = new_org(&app, Some(&county), "西街道党工委", "committee").await;
    let east_b1 = new_org(&app, Some(&east), "东一支部", "branch").await;
    let east_b2 = new_org(&app, Some(&east), "东二支部", "branch").await;
    let west_b1 = new_org(&app, Some(&west), "西一支部", "branch").await;
    let sec_e = keeper(&app, "sec-e", "secretary", &east).await;
    let sec_b1 = keeper(&app, "sec-b1", "secretary", &east_b1).await;
    let sec_w = keeper(&app, "sec-w", "secretary", &west_b1).await;
    let db = portal::db::Db::connect_only(&app.database_url())
        .await
        .unwrap();
    let a = seed_member(&db, &east_b1, "甲", "normal").await;
    let b = seed_member(&db, &east_b1, "乙", "normal").await;
    let c = seed_member(&db, &east_b2, "丙", "normal").await;
    let w = seed_member(&db, &west_b1, "丁", "normal").await;
    let gone = seed_member(&db, &east_b1, "戊", "transferred_out").await;
    World {
        app,
        db,
        east,
        east_b1,
        east_b2,
        west_b1,
        sec_e,
        sec_b1,
        sec_w,
        a,
        b,
        c,
        w,
        gone,
    }
}

async fn put(
    c: &reqwest::Client,
    w: &World,
    org: &str,
    month: &str,
    body: Value,
) -> (StatusCode, Value) {
    call(
        c,
        &w.app,
        Method::PUT,
        &format!("/api/v1/orgs/{org}/dues/{month}"),
        Some(body),
    )
    .await
}

async fn the_month_is_entered_in_one_go(backend: Backend) {
    let w = world(backend).await;
    let app = &w.app;

    // Before anything is entered, every normal member is on the sheet with nulls.
    let (status, sheet) = call(
        &w.sec_b1,
        app,
        Method::GET,
        &format!("/api/v1/orgs/{}/dues/2026-01", w.east_b1),
        None,
    )
    .await;
    assert_eq!(status, 200, "{sheet}");
    assert_eq!(
        sheet["rows"].as_array().unwrap().len(),
        2,
        "甲 and 乙; not 戊: {sheet}"
    );
    assert_eq!(row(&sheet, &w.a)["due_fen"], Value::Null);
    assert_eq!(sheet["due_fen"], 0);

    let batch = json!([
        {"member_id": w.a, "due_fen": 1000, "paid_fen": 1000, "paid_on": "2026-01-10"},
        {"member_id": w.b, "due_fen": 1000},
    ]);
    let (status, sheet) = put(&w.sec_b1, &w, &w.east_b1, "2026-01", batch.clone()).await;
    assert_eq!(status, 200, "{sheet}");
    assert_eq!(row(&sheet, &w.a)["paid_fen"], 1000);
    assert_eq!(row(&sheet, &w.a)["paid_on"], "2026-01-10");
    assert_eq!(row(&sheet, &w.b)["paid_fen"], 0);
    assert_eq!(row(&sheet, &w.b)["owed_fen"], 1000);
    assert_eq!(
        (&sheet["due_fen"], &sheet["paid_fen"], &sheet["owed_fen"]),
        (&json!(2000), &json!(1000), &json!(1000))
    );
    assert_eq!(
        (&sheet["members_paid"], &sheet["members_unpaid"]),
        (&json!(1), &json!(1))
    );
    let first = dues_rows(&w.db).await;
    assert_eq!(first.len(), 2);
    assert!(
        first.iter().all(|r| r.2 == w.east_b1),
        "kept with the member's org"
    );

    // The same sheet again changes nothing.
    let (status, _) = put(&w.sec_b1, &w, &w.east_b1, "2026-01", batch).await;
    assert_eq!(status, 200);
    let again = dues_rows(&w.db).await;
    assert_eq!(
        first
            .iter()
            .map(|r| (&r.0, &r.1, r.3, r.4, &r.5))
            .collect::<Vec<_>>(),
        again
            .iter()
            .map(|r| (&r.0, &r.1, r.3, r.4, &r.5))
            .collect::<Vec<_>>()
    );
    // A correction overwrites, in yuan this time.
    let (status, sheet) = put(
        &w.sec_b1,
        &w,
        &w.east_b1,
        "2026-01",
        json!([{"member_id": w.b, "due_yuan": "10.00", "paid_yuan": "4.5", "paid_on": "2026-01-31"}]),
    )
    .await;
    assert_eq!(status, 200, "{sheet}");
    assert_eq!(row(&sheet, &w.b)["paid_fen"], 450);
    assert_eq!(row(&sheet, &w.b)["owed_fen"], 550);
    assert_eq!(row(&sheet, &w.a)["paid_fen"], 1000, "others untouched");
    assert_eq!(dues_rows(&w.db).await.len(), 2);

    // A member of another branch in the batch: 404 naming them, and nothing saved.
    for (other, why) in [(&w.w, "another street"), (&w.c, "a sibling branch")] {
        let r = w
            .sec_b1
            .put(app.url(&format!("/api/v1/orgs/{}/dues/2026-01", w.east_b1)))
            .json(&json!([
                {"member_id": w.a, "due_fen": 9999, "paid_fen": 0},
                {"member_id": other, "due_fen": 1000},
            ]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{why}");
        let body: Value = r.json().await.unwrap();
        assert!(
            body["message"].as_str().unwrap().contains(other.as_str()),
            "{body}"
        );
        assert!(!body["message"].as_str().unwrap().contains(w.a.as_str()));
    }
    let (_, sheet) = call(
        &w.sec_b1,
        app,
        Method::GET,
        &format!("/api/v1/orgs/{}/dues/2026-01", w.east_b1),
        None,
    )
    .await;
    assert_eq!(row(&sheet, &w.a)["due_fen"], 1000, "nothing saved");
    assert_eq!(row(&sheet, &w.a)["paid_fen"], 1000);

    // Invalid content is 422, and nothing is saved either.
    for body in [
        json!([{"member_id": w.a, "due_fen": -1}]),
        json!([{"member_id": w.a, "due_fen": 100, "paid_fen": -5}]),
        json!([{"member_id": w.a}]),
        json!([{"member_id": w.a, "due_fen": 100, "due_yuan": "1.00"}]),
        json!([{"member_id": w.a, "due_yuan": "1.234"}]),
        json!([{"member_id": w.a, "due_fen": 100_000_000}]),
        json!([{"member_id": w.a, "due_fen": 100, "paid_on": "2026-02-30"}]),
        json!([{"member_id": w.a, "due_fen": 1}, {"member_id": w.a, "due_fen": 2}]),
    ] {
        let (status, v) = put(&w.sec_b1, &w, &w.east_b1, "2026-01", body.clone()).await;
        assert_eq!(status, 422, "{body}: {v}");
    }
    let (status, _) = put(&w.sec_b1, &w, &w.east_b1, "2026-13", json!([])).await;
    assert_eq!(status, 422);
    let a_rows: Vec<_> = dues_rows(&w.db)
        .await
        .into_iter()
        .filter(|r| r.0 == w.a)
        .map(|r| (r.3, r.4))
        .collect();
    assert_eq!(
        a_rows,
        [(1000, 1000)],
        "nothing saved by the invalid sheets"
    );

    // A member transferred out may still have a row entered; then they show on that month.
    let (status, sheet) = put(
        &w.sec_b1,
        &w,
        &w.east_b1,
        "2026-01",
        json!([{"member_id": w.gone, "due_fen": 300, "paid_fen": 300}]),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(row(&sheet, &w.gone)["status"], "transferred_out");
    let (_, feb) = call(
        &w.sec_b1,
        app,
        Method::GET,
        &format!("/api/v1/orgs/{}/dues/2026-02", w.east_b1),
        None,
    )
    .await;
    assert_eq!(
        feb["rows"].as_array().unwrap().len(),
        2,
        "but not on other months"
    );

    w.db.pool.close().await;
    w.app.stop().await;
}

async fn arrears_and_totals_add_up(backend: Backend) {
    let w = world(backend).await;
    let app = &w.app;
    // January: 甲 10.00/10.00, 乙 10.00/4.50 (东一); 丙 20.00/5.00 (东二).
    let (status, v) = put(
        &w.sec_b1,
        &w,
        &w.east_b1,
        "2026-01",
        json!([
            {"member_id": w.a, "due_fen": 1000, "paid_fen": 1000},
            {"member_id": w.b, "due_fen": 1000, "paid_fen": 450},
        ]),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // The general branch's secretary enters for both branches at once.
    let (status, v) = put(
        &w.sec_e,
        &w,
        &w.east,
        "2026-01",
        json!([{"member_id": w.c, "due_fen": 2000, "paid_fen": 500}]),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // February: 甲 10.00/8.00, 丙 20.00/25.00 (paid extra; does not cancel January).
    let (status, v) = put(
        &w.sec_e,
        &w,
        &w.east,
        "2026-02",
        json!([
            {"member_id": w.a, "due_fen": 1000, "paid_fen": 800},
            {"member_id": w.c, "due_fen": 2000, "paid_fen": 2500},
        ]),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // Outside the range, and in another street: neither counts.
    put(
        &w.sec_b1,
        &w,
        &w.east_b1,
        "2025-12",
        json!([{"member_id": w.a, "due_fen": 700}]),
    )
    .await;
    put(
        &w.sec_w,
        &w,
        &w.west_b1,
        "2026-01",
        json!([{"member_id": w.w, "due_fen": 5000}]),
    )
    .await;

    let (status, arr) = call(
        &w.sec_e,
        app,
        Method::GET,
        &format!(
            "/api/v1/orgs/{}/dues/arrears?from=2026-01&to=2026-02",
            w.east
        ),
        None,
    )
    .await;
    assert_eq!(status, 200, "{arr}");
    let got: Vec<(String, i64, Vec<String>)> = arr["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["member_id"].as_str().unwrap().to_string(),
                m["owed_fen"].as_i64().unwrap(),
                m["months"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (w.c.clone(), 1500, vec!["2026-01".to_string()]),
            (w.b.clone(), 550, vec!["2026-01".to_string()]),
            (w.a.clone(), 200, vec!["2026-02".to_string()]),
        ],
        "most owed first"
    );
    assert_eq!(arr["total_owed_fen"], 2250);

    let (_, arr) = call(
        &w.sec_b1,
        app,
        Method::GET,
        &format!(
            "/api/v1/orgs/{}/dues/arrears?from=2025-12&to=2026-02",
            w.east_b1
        ),
        None,
    )
    .await;
    assert_eq!(arr["total_owed_fen"], 700 + 550 + 200, "{arr}");

    let (status, t) = call(
        &w.sec_e,
        app,
        Method::GET,
        &format!(
            "/api/v1/orgs/{}/dues/totals?from=2026-01&to=2026-02",
            w.east
        ),
        None,
    )
    .await;
    assert_eq!(status, 200, "{t}");
    let fig = |due: i64, paid: i64, n_paid: i64, n_unpaid: i64| json!({"due_fen": due, "paid_fen": paid, "members_paid": n_paid, "members_unpaid": n_unpaid});
    assert_eq!(t["total"], fig(7000, 5250, 2, 3));
    assert_eq!(
        t["months"],
        json!([
            {"month": "2026-01", "due_fen": 4000, "paid_fen": 1950, "members_paid": 1, "members_unpaid": 2},
            {"month": "2026-02", "due_fen": 3000, "paid_fen": 3300, "members_paid": 1, "members_unpaid": 1},
        ])
    );
    let orgs = t["orgs"].as_array().unwrap();
    assert_eq!(orgs.len(), 3, "the general branch and both branches");
    let org = |id: &str| orgs.iter().find(|o| o["org_id"] == id).unwrap();
    assert_eq!(org(&w.east)["own"], fig(0, 0, 0, 0));
    assert_eq!(org(&w.east)["subtree"], t["total"]);
    assert_eq!(org(&w.east)["depth"], 0);
    assert_eq!(org(&w.east_b1)["own"], fig(3000, 2250, 1, 2));
    assert_eq!(org(&w.east_b1)["subtree"], fig(3000, 2250, 1, 2));
    assert_eq!(org(&w.east_b1)["depth"], 1);
    assert_eq!(org(&w.east_b2)["own"], fig(4000, 3000, 1, 1));
    assert_eq!(org(&w.east_b2)["months"].as_array().unwrap().len(), 2);

    // Rows keep the org they were entered under: moving 丙 leaves the totals where they were.
    sqlx::query("UPDATE members SET org_id = $1 WHERE id = $2")
        .bind(&w.east_b1)
        .bind(&w.c)
        .execute(&w.db.pool)
        .await
        .unwrap();
    let (_, t2) = call(
        &w.sec_e,
        app,
        Method::GET,
        &format!(
            "/api/v1/orgs/{}/dues/totals?from=2026-01&to=2026-02",
            w.east
        ),
        None,
    )
    .await;
    assert_eq!(t2["orgs"], t["orgs"]);

    // Bad ranges.
    for q in ["from=2026-03&to=2026-01", "from=2026-1", "to=2026-13"] {
        let (status, _) = call(
            &w.sec_e,
            app,
            Method::GET,
            &format!("/api/v1/orgs/{}/dues/totals?{q}", w.east),
            None,
        )
        .await;
        assert_eq!(status, 422, "{q}");
    }

    w.db.pool.close().await;
    w.app.stop().await;
}

async fn dues_are_scoped(backend: Backend) {
    let w = world(backend).await;
    let app = &w.app;
    // A branch secretary sees neither the general branch above nor a sibling nor another street.
    for org in [&w.east, &w.east_b2, &w.west_b1] {
        for path in [
            format!("/api/v1/orgs/{org}/dues/2026-01"),
            format!("/api/v1/orgs/{org}/dues/arrears"),
            format!("/api/v1/orgs/{org}/dues/totals"),
        ] {
            let (status, _) = call(&w.sec_b1, app, Method::GET, &path, None).await;
            assert_eq!(status, 404, "{path}");
        }
        let (status, _) = put(
            &w.sec_b1,
            &w,
            org,
            "2026-01",
            json!([{"member_id": w.a, "due_fen": 1}]),
        )
        .await;
        assert_eq!(status, 404);
    }
    let (status, _) = call(
        &w.sec_w,
        app,
        Method::GET,
        &format!("/api/v1/orgs/{}/dues/totals", w.east),
        None,
    )
    .await;
    assert_eq!(status, 404);
    assert!(dues_rows(&w.db).await.is_empty());
    // Defaults: this year up to this month.
    let (status, t) = call(
        &w.sec_b1,
        app,
        Method::GET,
        &format!("/api/v1/orgs/{}/dues/totals", w.east_b1),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(t["from"].as_str().unwrap().ends_with("-01"));
    // Plain members may not read dues at all.
    let member = keeper(app, "plain", "member", &w.east_b1).await;
    let (status, _) = call(
        &member,
        app,
        Method::GET,
        &format!("/api/v1/orgs/{}/dues/2026-01", w.east_b1),
        None,
    )
    .await;
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

async fn the_page_saves_the_whole_month(backend: Backend) {
    let w = world(backend).await;
    let app = &w.app;
    let r = w
        .sec_b1
        .get(app.url("/dues?month=2026-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    assert!(html.contains("甲") && html.contains(&format!("name=\"due.{}\"", w.a)));
    let csrf = csrf_of(&html);

    let due_a = format!("due.{}", w.a);
    let paid_a = format!("paid.{}", w.a);
    let on_a = format!("paid_on.{}", w.a);
    let due_b = format!("due.{}", w.b);
    let paid_b = format!("paid.{}", w.b);
    let r = w
        .sec_b1
        .post(app.url("/dues"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("org", w.east_b1.as_str()),
            ("month", "2026-01"),
            (due_a.as_str(), "12.50"),
            (paid_a.as_str(), "12.5"),
            (on_a.as_str(), "2026-01-15"),
            (due_b.as_str(), ""),
            (paid_b.as_str(), ""),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let rows = dues_rows(&w.db).await;
    assert_eq!(rows.len(), 1, "blank rows are left alone");
    assert_eq!((rows[0].3, rows[0].4), (1250, 1250));
    assert_eq!(rows[0].5.as_deref(), Some("2026-01-15"));

    let r = w
        .sec_b1
        .get(app.url("/dues?month=2026-01&saved=1"))
        .send()
        .await
        .unwrap();
    let html = r.text().await.unwrap();
    assert!(html.contains("12.50") && html.contains("已保存 1 条"));

    // A bad amount shows the page again with the error, and saves nothing.
    let r = w
        .sec_b1
        .post(app.url("/dues"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("org", w.east_b1.as_str()),
            ("month", "2026-01"),
            (due_a.as_str(), "十元"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert!(r.text().await.unwrap().contains("不是有效金额"));
    // Another street's org from the page is not there.
    let r = w
        .sec_b1
        .post(app.url("/dues"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("org", w.west_b1.as_str()),
            ("month", "2026-01"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = w
        .sec_b1
        .get(app.url(&format!("/dues?org={}", w.west_b1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    w.db.pool.close().await;
    w.app.stop().await;
}

on_both_databases!(
    the_month_is_entered_in_one_go,
    arrears_and_totals_add_up,
    dues_are_scoped,
    the_page_saves_the_whole_month,
);
