//! Org life (组织生活) through the API on both databases: a meeting with its attendance, the
//! rules for absentees and attendees, attachments through the object store, and scoping.

mod common;

use common::api::{call, keeper, new_org};
use common::{Backend, TestApp};
use reqwest::Method;
use serde_json::{Value, json};

/// A member row written straight into the database (the members API is another module's).
async fn member(app: &TestApp, org: &str, name: &str) -> String {
    let db = portal::db::Db::connect_only(&app.database_url())
        .await
        .unwrap();
    let id = uuid::Uuid::now_v7().to_string();
    sqlx::query(
        "INSERT INTO members (id, org_id, name, gender, id_number, birth_date, joined_on, category, created_at, updated_at) \
         VALUES ($1, $2, $3, 'male', $4, '1980-01-01', '2005-07-01', 'full', 0, 0)",
    )
    .bind(&id)
    .bind(org)
    .bind(name)
    .bind(&id[id.len() - 18..])
    .execute(&db.pool)
    .await
    .unwrap();
    id
}

async fn meetings_with_attendance_attachments_and_scope(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let committee = new_org(&app, None, "机关党委", "committee").await;
    let a = new_org(&app, Some(&committee), "第一支部", "branch").await;
    let b = new_org(&app, Some(&committee), "第二支部", "branch").await;
    let a_group = new_org(&app, Some(&a), "第一党小组", "group").await;
    let m1 = member(&app, &a, "张三").await;
    let m2 = member(&app, &a_group, "李四").await;
    let m3 = member(&app, &b, "王五").await;
    let sec_a = keeper(&app, "sec_a", "secretary", &a).await;
    let sec_b = keeper(&app, "sec_b", "secretary", &b).await;

    let path = format!("/api/v1/orgs/{a}/meetings");
    let good = json!({
        "kind": "party_congress", "held_on": "2026-11-20", "topic": "学习全会精神", "minutes": "记录……",
        "attendance": [
            {"member_id": m1, "present": true},
            {"member_id": m2, "present": false, "absence_reason": "出差"},
        ],
    });
    let (status, meeting) = call(&sec_a, &app, Method::POST, &path, Some(good.clone())).await;
    assert_eq!(status, 201, "{meeting}");
    assert_eq!(meeting["present"], 1);
    assert_eq!(meeting["absent"], 1);
    assert_eq!(meeting["kind_label"], "支部党员大会");
    let att = meeting["attendance"].as_array().unwrap();
    assert_eq!(att.len(), 2);
    assert_eq!(att[0]["name"], "张三");
    assert_eq!(att[1]["absence_reason"], "出差");
    let id = meeting["id"].as_str().unwrap().to_string();

    // An absentee needs a reason; a member of another branch cannot attend; bad dates are 422.
    let mut no_reason = good.clone();
    no_reason["attendance"][1]["absence_reason"] = json!("  ");
    let (status, v) = call(&sec_a, &app, Method::POST, &path, Some(no_reason)).await;
    assert_eq!(status, 422, "{v}");
    let mut stranger = good.clone();
    stranger["attendance"][0]["member_id"] = json!(m3);
    let (status, v) = call(&sec_a, &app, Method::POST, &path, Some(stranger)).await;
    assert_eq!(status, 422, "{v}");
    let mut bad_date = good.clone();
    bad_date["held_on"] = json!("2026-02-30");
    let (status, _) = call(&sec_a, &app, Method::POST, &path, Some(bad_date)).await;
    assert_eq!(status, 422);
    // Another branch's secretary cannot record for this one.
    let (status, _) = call(&sec_b, &app, Method::POST, &path, Some(good.clone())).await;
    assert_eq!(status, 404);

    // A lecture, for the filters.
    let mut lecture = good.clone();
    lecture["kind"] = json!("lecture");
    lecture["held_on"] = json!("2026-10-01");
    let (status, _) = call(&sec_a, &app, Method::POST, &path, Some(lecture)).await;
    assert_eq!(status, 201);
    let (_, list) = call(&sec_a, &app, Method::GET, &path, None).await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    let (_, list) = call(
        &sec_a,
        &app,
        Method::GET,
        &format!("{path}?kind=lecture"),
        None,
    )
    .await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    let (_, list) = call(
        &sec_a,
        &app,
        Method::GET,
        &format!("{path}?from=2026-11-01&to=2026-11-30"),
        None,
    )
    .await;
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list.as_array().unwrap().len(), 1);
    // The committee sees its branches' meetings.
    let (_, list) = call(
        &app.client,
        &app,
        Method::GET,
        &format!("/api/v1/orgs/{committee}/meetings"),
        None,
    )
    .await;
    assert_eq!(list.as_array().unwrap().len(), 2);

    // Attachments: a raw body and a multipart form, back byte for byte with type and name.
    let pdf: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let r = sec_a
        .post(app.url(&format!(
            "/api/v1/meetings/{id}/attachments?name=签到表.pdf"
        )))
        .header("content-type", "application/pdf")
        .body(pdf.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let a1: Value = r.json().await.unwrap();
    assert_eq!(a1["size_bytes"], 100_000);
    let url = a1["url"].as_str().unwrap().to_string();
    let r = sec_a.get(app.url(&url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/pdf");
    let cd = r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        cd.contains("filename*=UTF-8''%E7%AD%BE%E5%88%B0%E8%A1%A8.pdf"),
        "{cd}"
    );
    assert_eq!(r.bytes().await.unwrap().to_vec(), pdf);
    let db = portal::db::Db::connect_only(&app.database_url())
        .await
        .unwrap();
    let (key,): (String,) =
        sqlx::query_as("SELECT object_key FROM org_meeting_attachments WHERE id = $1")
            .bind(a1["id"].as_str().unwrap())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(key, format!("orglife/{id}/{}", a1["id"].as_str().unwrap()));

    let form = b"--BOUND\r\nContent-Disposition: form-data; name=\"file\"; filename=\"photo.png\"\r\nContent-Type: image/png\r\n\r\n\x89PNG-data\r\n--BOUND--\r\n".to_vec();
    let r = sec_a
        .post(app.url(&format!("/api/v1/meetings/{id}/attachments")))
        .header("content-type", "multipart/form-data; boundary=BOUND")
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let a2: Value = r.json().await.unwrap();
    assert_eq!(a2["file_name"], "photo.png");
    let r = sec_a
        .get(app.url(a2["url"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(&r.bytes().await.unwrap()[..], b"\x89PNG-data");
    // Too large.
    let r = sec_a
        .post(app.url(&format!("/api/v1/meetings/{id}/attachments?name=big.bin")))
        .body(vec![0u8; 20 * 1024 * 1024 + 70 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    let (_, detail) = call(
        &sec_a,
        &app,
        Method::GET,
        &format!("/api/v1/meetings/{id}"),
        None,
    )
    .await;
    assert_eq!(detail["attachments"], 2);
    assert_eq!(detail["attachments_list"].as_array().unwrap().len(), 2);

    // Scoping: the other branch sees none of it.
    for p in [
        format!("/api/v1/meetings/{id}"),
        url.clone(),
        format!("/api/v1/orgs/{a}/meetings"),
    ] {
        let r = sec_b.get(app.url(&p)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{p}");
    }
    let (status, _) = call(
        &sec_b,
        &app,
        Method::PATCH,
        &format!("/api/v1/meetings/{id}"),
        Some(json!({"topic": "x"})),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = call(
        &sec_b,
        &app,
        Method::DELETE,
        &format!("/api/v1/meetings/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // Corrections replace the attendance list.
    let (status, v) = call(
        &sec_a,
        &app,
        Method::PATCH,
        &format!("/api/v1/meetings/{id}"),
        Some(json!({"topic": "学习全会精神（补记）", "attendance": [{"member_id": m1, "present": true}, {"member_id": m2, "present": true}]})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["present"], 2);
    assert_eq!(v["absent"], 0);

    // The page lists it with counts.
    let html = sec_a
        .get(app.url(&format!("/orglife?org={a}")))
        .send()
        .await
        .unwrap();
    assert_eq!(html.status(), 200);
    let html = html.text().await.unwrap();
    assert!(
        html.contains("学习全会精神（补记）") && html.contains("出席 2 人"),
        "{html}"
    );
    assert!(
        html.contains("李四"),
        "attendance form lists the branch's members"
    );

    // Deleting removes the record and its files.
    let (status, _) = call(
        &sec_a,
        &app,
        Method::DELETE,
        &format!("/api/v1/meetings/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let r = sec_a.get(app.url(&url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    app.stop().await;
}

on_both_databases!(meetings_with_attendance_attachments_and_scope);
