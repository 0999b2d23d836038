//! Statistics on both databases: a small known set of members and dues counted exactly, and
//! the .xlsx export. An ignored test seeds 100 000 members and times the member statistics.

mod common;

use std::time::Instant;

use common::api::{call, keeper, new_org};
use common::{Backend, TestApp};
use reqwest::Method;
use serde_json::Value;

/// This year, from the clock (close enough for choosing birth years well inside age bands).
fn this_year() -> i64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    1970 + secs / 31_556_952
}

struct M<'a> {
    org: &'a str,
    gender: &'a str,
    age: i64,
    education: &'a str,
    ethnicity: &'a str,
    joined: &'a str,
    category: &'a str,
    status: &'a str,
}

/// Member rows written straight into the database (the members API is another module's).
async fn seed(db: &portal::db::Db, ms: &[M<'_>]) -> Vec<String> {
    let year = this_year();
    let mut ids = Vec::new();
    for m in ms {
        let id = uuid::Uuid::now_v7().to_string();
        // 1 July: never within half a year of a band boundary.
        let birth = format!("{}-07-01", year - m.age);
        sqlx::query(
            "INSERT INTO members (id, org_id, name, gender, id_number, birth_date, ethnicity, education, joined_on, category, status, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 0, 0)",
        )
        .bind(&id)
        .bind(m.org)
        .bind(format!("党员{}", ids.len()))
        .bind(m.gender)
        .bind(&id[id.len() - 18..])
        .bind(birth)
        .bind(m.ethnicity)
        .bind(m.education)
        .bind(m.joined)
        .bind(m.category)
        .bind(m.status)
        .execute(&db.pool)
        .await
        .unwrap();
        ids.push(id);
    }
    ids
}

async fn dues(db: &portal::db::Db, member: &str, org: &str, month: &str, due: i64, paid: i64) {
    sqlx::query("INSERT INTO dues (member_id, month, org_id, due_fen, paid_fen, updated_at) VALUES ($1, $2, $3, $4, $5, 0)")
        .bind(member)
        .bind(month)
        .bind(org)
        .bind(due)
        .bind(paid)
        .execute(&db.pool)
        .await
        .unwrap();
}

#[allow(clippy::too_many_arguments)]
fn m<'a>(
    org: &'a str,
    gender: &'a str,
    age: i64,
    education: &'a str,
    ethnicity: &'a str,
    joined: &'a str,
    category: &'a str,
) -> M<'a> {
    M {
        org,
        gender,
        age,
        education,
        ethnicity,
        joined,
        category,
        status: "normal",
    }
}

fn count(list: &Value, key_field: &str, key: &str) -> i64 {
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c[key_field] == key)
        .map_or(0, |c| c["count"].as_i64().unwrap())
}

async fn exact_counts_and_export(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let committee = new_org(&app, None, "机关党委", "committee").await;
    let a = new_org(&app, Some(&committee), "第一支部", "branch").await;
    let b = new_org(&app, Some(&committee), "第二支部", "branch").await;
    let a1 = new_org(&app, Some(&a), "第一小组", "group").await;
    let other = new_org(&app, None, "另一党委", "committee").await;
    let db = portal::db::Db::connect_only(&app.database_url())
        .await
        .unwrap();

    let ids = seed(
        &db,
        &[
            m(
                &a,
                "male",
                25,
                "大学本科",
                "汉族",
                "2020-07-01",
                "probationary",
            ),
            m(&a, "female", 35, "大学本科", "汉族", "2010-07-01", "full"),
            m(&a1, "male", 45, "研究生", "回族", "2001-07-01", "full"),
            m(&a1, "female", 55, "大学本科", "汉族", "1995-07-01", "full"),
            m(&b, "male", 65, "", "汉族", "1985-07-01", "full"),
            m(&b, "male", 38, "研究生", "满族", "2012-07-01", "full"),
            m(
                &committee,
                "female",
                28,
                "大学本科",
                "汉族",
                "2019-07-01",
                "probationary",
            ),
            // Not counted: not normal, or elsewhere.
            M {
                status: "transferred_out",
                ..m(&a, "male", 40, "大学本科", "汉族", "2000-07-01", "full")
            },
            m(&other, "male", 40, "大学本科", "汉族", "2000-07-01", "full"),
        ],
    )
    .await;
    dues(&db, &ids[0], &a, "2026-01", 1000, 1000).await;
    dues(&db, &ids[1], &a, "2026-01", 2050, 0).await;
    dues(&db, &ids[4], &b, "2026-01", 500, 500).await;
    dues(&db, &ids[0], &a, "2026-02", 1000, 600).await;
    dues(&db, &ids[8], &other, "2026-01", 9999, 9999).await;
    dues(&db, &ids[0], &a, "2025-12", 1000, 1000).await;
    let boss = keeper(&app, "boss", "org_admin", &committee).await;
    let sec_b = keeper(&app, "sec_b", "secretary", &b).await;

    let (status, s) = call(&boss, &app, Method::GET, "/api/v1/stats/members", None).await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["total"], 7);
    let by_org = &s["by_org"];
    assert_eq!(count(by_org, "org_id", &committee), 1, "{by_org}");
    assert_eq!(count(by_org, "org_id", &a), 4);
    assert_eq!(count(by_org, "org_id", &b), 2);
    assert_eq!(by_org.as_array().unwrap().len(), 3);
    assert_eq!(count(&s["by_gender"], "key", "male"), 4);
    assert_eq!(count(&s["by_gender"], "key", "female"), 3);
    for (band, n) in [
        ("lt30", 2),
        ("30_39", 2),
        ("40_49", 1),
        ("50_59", 1),
        ("60_plus", 1),
    ] {
        assert_eq!(
            count(&s["by_age"], "key", band),
            n,
            "{band}: {}",
            s["by_age"]
        );
    }
    assert_eq!(count(&s["by_education"], "key", "大学本科"), 4);
    assert_eq!(count(&s["by_education"], "key", "研究生"), 2);
    assert_eq!(count(&s["by_education"], "label", "未填写"), 1);
    assert_eq!(count(&s["by_ethnicity"], "key", "汉族"), 5);
    assert_eq!(count(&s["by_ethnicity"], "key", "回族"), 1);
    assert_eq!(count(&s["by_join_year"], "key", "2010"), 1);
    assert_eq!(count(&s["by_join_decade"], "key", "2010"), 3);
    assert_eq!(count(&s["by_join_decade"], "key", "2000"), 1);
    assert_eq!(count(&s["by_join_decade"], "key", "1990"), 1);
    assert_eq!(count(&s["by_category"], "key", "full"), 5);
    assert_eq!(count(&s["by_category"], "key", "probationary"), 2);

    // One branch: itself and its group.
    let (_, s) = call(
        &boss,
        &app,
        Method::GET,
        &format!("/api/v1/stats/members?org={a}"),
        None,
    )
    .await;
    assert_eq!(s["total"], 4);
    assert_eq!(count(&s["by_org"], "org_id", &a), 2);
    assert_eq!(count(&s["by_org"], "org_id", &a1), 2);
    // Scope: another branch, or another tree, is not there.
    let (status, _) = call(
        &sec_b,
        &app,
        Method::GET,
        &format!("/api/v1/stats/members?org={a}"),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = call(
        &boss,
        &app,
        Method::GET,
        &format!("/api/v1/stats/dues?org={other}"),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (_, s) = call(&sec_b, &app, Method::GET, "/api/v1/stats/members", None).await;
    assert_eq!(s["total"], 2);

    let (_, o) = call(&boss, &app, Method::GET, "/api/v1/stats/orgs", None).await;
    assert_eq!(o["total"], 4);
    assert_eq!(count(&o["by_kind"], "key", "branch"), 2);
    assert_eq!(count(&o["by_kind"], "key", "group"), 1);
    assert_eq!(count(&o["by_kind"], "key", "committee"), 1);

    let (status, d) = call(
        &boss,
        &app,
        Method::GET,
        "/api/v1/stats/dues?from=2026-01&to=2026-02",
        None,
    )
    .await;
    assert_eq!(status, 200, "{d}");
    let months = d["months"].as_array().unwrap();
    assert_eq!(months.len(), 2);
    assert_eq!(months[0]["month"], "2026-01");
    assert_eq!(months[0]["due_fen"], 3550);
    assert_eq!(months[0]["paid_fen"], 1500);
    assert_eq!(months[0]["members"], 3);
    assert_eq!(months[0]["paid_members"], 2);
    assert_eq!(months[1]["due_fen"], 1000);
    assert_eq!(months[1]["paid_fen"], 600);
    assert_eq!(d["total_due_fen"], 4550);
    assert_eq!(d["total_paid_fen"], 2100);
    let (status, _) = call(
        &boss,
        &app,
        Method::GET,
        "/api/v1/stats/dues?from=2026-13",
        None,
    )
    .await;
    assert_eq!(status, 422);

    let r = boss
        .get(app.url("/api/v1/stats/export.xlsx?from=2026-01&to=2026-02"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    );
    let bytes = r.bytes().await.unwrap();
    assert!(bytes.starts_with(b"PK"), "a zip container");

    let html = boss
        .get(app.url("/stats?from=2026-01&to=2026-02"))
        .send()
        .await
        .unwrap();
    assert_eq!(html.status(), 200);
    let html = html.text().await.unwrap();
    assert!(
        html.contains("<svg") && html.contains("35.50") && html.contains("第一支部"),
        "{html}"
    );
    app.stop().await;
}

on_both_databases!(exact_counts_and_export);

/// `cargo test --test stats -- --ignored --nocapture`: 100 000 members over 200 branches, timing
/// the member statistics (the whole tree and one branch) on both databases.
async fn hundred_thousand_members(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let committee = new_org(&app, None, "机关党委", "committee").await;
    let mut branches = Vec::new();
    for i in 0..20 {
        let g = new_org(
            &app,
            Some(&committee),
            &format!("总支{i}"),
            "general_branch",
        )
        .await;
        for j in 0..10 {
            branches.push(new_org(&app, Some(&g), &format!("支部{i}-{j}"), "branch").await);
        }
    }
    let db = portal::db::Db::connect_only(&app.database_url())
        .await
        .unwrap();
    let started = Instant::now();
    let edu = ["大学本科", "研究生", "大专", "高中", ""];
    let mut n = 0usize;
    while n < 100_000 {
        let mut sql = String::from(
            "INSERT INTO members (id, org_id, name, gender, id_number, birth_date, education, ethnicity, joined_on, category, created_at, updated_at) VALUES ",
        );
        for k in 0..500 {
            let i = n + k;
            if k > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "('m{i:08}', '{}', '党员{i}', '{}', 'N{i:017}', '{}-{:02}-{:02}', '{}', '汉族', '{}-07-01', '{}', 0, 0)",
                branches[i % branches.len()],
                if i.is_multiple_of(3) { "female" } else { "male" },
                1950 + i % 55, 1 + i % 12, 1 + i % 28,
                edu[i % edu.len()],
                1970 + i % 56,
                if i.is_multiple_of(10) { "probationary" } else { "full" },
            ));
        }
        sqlx::query(&sql).execute(&db.pool).await.unwrap();
        n += 500;
    }
    eprintln!(
        "{backend:?}: seeded 100000 members in {:?}",
        started.elapsed()
    );
    for (what, path) in [
        ("whole tree", "/api/v1/stats/members".to_string()),
        (
            "one branch",
            format!("/api/v1/stats/members?org={}", branches[0]),
        ),
        ("whole tree again", "/api/v1/stats/members".to_string()),
    ] {
        let t = Instant::now();
        let (status, s) = call(&app.client, &app, Method::GET, &path, None).await;
        assert_eq!(status, 200);
        eprintln!(
            "{backend:?}: {what}: {} members counted in {:?}",
            s["total"],
            t.elapsed()
        );
    }
    let t = Instant::now();
    let r = app
        .client
        .get(app.url("/api/v1/stats/export.xlsx"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    eprintln!(
        "{backend:?}: export {} bytes in {:?}",
        r.bytes().await.unwrap().len(),
        t.elapsed()
    );
    app.stop().await;
}

mod seeded {
    #[tokio::test]
    #[ignore]
    async fn sqlite() {
        super::hundred_thousand_members(super::common::Backend::Sqlite).await
    }
    #[tokio::test]
    #[ignore]
    async fn postgres() {
        super::hundred_thousand_members(super::common::Backend::Postgres).await
    }
}
