//! Member records through the API and the pages, on both databases: validation that names the
//! broken field, duplicates, scoping (a secretary keeps only their branch, and a guessed id from
//! another branch is simply not there), masking for viewers who do not manage members, the audit
//! trail, the honours history — and an `#[ignore]`d timing of the list over 100,000 members.

mod common;

use std::time::{Duration, Instant};

use common::api::{call, keeper, new_org};
use common::{Backend, TestApp};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn page(c: &reqwest::Client, app: &TestApp, path: &str) -> (StatusCode, String) {
    let r = c.get(app.url(path)).send().await.unwrap();
    (r.status(), r.text().await.unwrap())
}

/// A valid ID number from its first 17 digits.
fn id_number(first17: &str) -> String {
    format!("{first17}{}", portal::idcard::check_char(first17).unwrap())
}

fn member(name: &str, id: &str, org: &str) -> Value {
    json!({
        "name": name, "id_number": id, "org_id": org, "joined_on": "2015-07-01",
        "category": "full", "full_member_on": "2016-07-01", "ethnicity": "汉族",
        "education": "大学本科", "phone": "+86 138-0013-8000",
    })
}

async fn create(c: &reqwest::Client, app: &TestApp, body: Value) -> (StatusCode, Value) {
    call(c, app, Method::POST, "/api/v1/members", Some(body)).await
}

/// The fields a 422 names.
fn fields(v: &Value) -> Vec<String> {
    v["fields"]
        .as_array()
        .unwrap_or_else(|| panic!("no fields in {v}"))
        .iter()
        .map(|f| f["field"].as_str().unwrap().to_string())
        .collect()
}

async fn records_are_validated_and_kept(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let county = new_org(&app, None, "县委", "committee").await;
    let branch = new_org(&app, Some(&county), "城关支部", "branch").await;
    let other = new_org(&app, Some(&county), "东关支部", "branch").await;

    let zhang = id_number("11010519900307001"); // male (odd sequence), born 1990-03-07
    let (status, m) = create(&app.client, &app, member("张三", &zhang, &branch)).await;
    assert_eq!(status, 201, "{m}");
    assert_eq!(m["birth_date"], "1990-03-07", "taken from the ID number");
    assert_eq!(m["gender"], "male");
    assert_eq!(m["phone"], "13800138000", "normalised");
    assert_eq!(m["status"], "normal");
    assert_eq!(m["cadre"], "none");
    assert_eq!(m["org_name"], "城关支部");
    assert_eq!(m["masked"], false);
    let id = m["id"].as_str().unwrap().to_string();

    // Each broken rule is a 422 naming its field.
    let bad_checksum = format!("{}0", &zhang[..17]);
    let bad_checksum = if bad_checksum == zhang {
        format!("{}1", &zhang[..17])
    } else {
        bad_checksum
    };
    let li = id_number("11010519850214002"); // female, born 1985-02-14
    for (patch, field) in [
        (json!({"id_number": bad_checksum}), "id_number"),
        (
            json!({"id_number": li, "birth_date": "1985-02-15"}),
            "birth_date",
        ),
        (json!({"id_number": li, "gender": "male"}), "gender"),
        (json!({"id_number": li, "gender": "男"}), "gender"),
        (json!({"id_number": li, "phone": "12345"}), "phone"),
        (
            json!({"id_number": li, "joined_on": "2999-01-01"}),
            "joined_on",
        ),
        (
            json!({"id_number": li, "joined_on": "2002-02-13"}),
            "joined_on",
        ),
        (
            json!({"id_number": li, "joined_on": "2010-02-30"}),
            "joined_on",
        ),
        (
            json!({"id_number": li, "full_member_on": "2999-01-01"}),
            "full_member_on",
        ),
        (
            json!({"id_number": li, "category": "probationary"}),
            "full_member_on",
        ),
        (json!({"id_number": li, "category": "x"}), "category"),
        (json!({"id_number": li, "status": "gone"}), "status"),
        (json!({"id_number": li, "name": "  "}), "name"),
    ] {
        let mut body = member("李四", &li, &branch);
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v) = create(&app.client, &app, body).await;
        assert_eq!(status, 422, "{patch}: {v}");
        assert_eq!(fields(&v), [field], "{patch}: {v}");
        assert!(v["message"].as_str().unwrap().contains(field), "{v}");
    }
    // Several at once: all named.
    let mut body = member("李四", &li, &branch);
    body["phone"] = json!("12345");
    body["birth_date"] = json!("1985-02-15");
    let (status, v) = create(&app.client, &app, body).await;
    assert_eq!(status, 422);
    assert_eq!(fields(&v), ["birth_date", "phone"]);

    // Chinese values are accepted; a probationary member without full_member_on is fine; the
    // 18th birthday itself is fine.
    let mut body = member("李四", &li.to_lowercase(), &branch);
    body["gender"] = json!("女");
    body["category"] = json!("预备党员");
    body["full_member_on"] = Value::Null;
    body["joined_on"] = json!("2003-02-14");
    body["phone"] = Value::Null;
    let (status, v) = create(&app.client, &app, body).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["category"], "probationary");
    assert_eq!(v["phone"], "");

    // The same ID number twice: 409, also in another branch, also by changing a record.
    let (status, v) = create(&app.client, &app, member("张三", &zhang, &other)).await;
    assert_eq!(status, 409, "{v}");
    let (status, v) = call(
        &app.client,
        &app,
        Method::PATCH,
        &format!("/api/v1/members/{}", v["id"].as_str().unwrap_or(&id)),
        Some(json!({"id_number": li})),
    )
    .await;
    assert_eq!(status, 409, "{v}");

    // Read, then change: the same checks apply to the whole record after the patch.
    let (status, got) = call(
        &app.client,
        &app,
        Method::GET,
        &format!("/api/v1/members/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(got["id_number"], zhang.as_str());
    for (patch, field) in [
        (json!({"phone": "1380013800"}), "phone"),
        (json!({"birth_date": "1990-03-08"}), "birth_date"),
        (json!({"joined_on": "2999-12-31"}), "joined_on"),
        (json!({"category": "probationary"}), "full_member_on"),
        (json!({"id_number": bad_checksum}), "id_number"),
    ] {
        let (status, v) = call(
            &app.client,
            &app,
            Method::PATCH,
            &format!("/api/v1/members/{id}"),
            Some(patch.clone()),
        )
        .await;
        assert_eq!(status, 422, "{patch}: {v}");
        assert_eq!(fields(&v), [field], "{patch}: {v}");
    }
    let (status, v) = call(
        &app.client,
        &app,
        Method::PATCH,
        &format!("/api/v1/members/{id}"),
        Some(json!({"status": "lost_contact", "cadre": "part_time", "cadre_position": "支部委员", "org_id": other})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "lost_contact");
    assert_eq!(v["org_name"], "东关支部", "moved within scope");
    // A new ID number brings its own birth date and gender.
    let wang = id_number("11010519920512004");
    let (status, v) = call(
        &app.client,
        &app,
        Method::PATCH,
        &format!("/api/v1/members/{id}"),
        Some(json!({"id_number": wang})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["birth_date"], "1992-05-12");
    assert_eq!(v["gender"], "female");
    let (status, v) = call(
        &app.client,
        &app,
        Method::PATCH,
        &format!("/api/v1/members/{id}"),
        Some(json!({"category": "probationary", "full_member_on": null})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["full_member_on"], Value::Null);

    // The audit trail names views and changed fields.
    let db = app.db().await;
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT action, detail FROM audit_log WHERE target = $1 ORDER BY at, id")
            .bind(&id)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let actions: Vec<&str> = rows.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(
        actions,
        [
            "create_member",
            "view_member",
            "update_member",
            "update_member",
            "update_member"
        ]
    );
    assert_eq!(rows[2].1, "status,cadre,cadre_position,org_id");
    assert_eq!(rows[3].1, "gender,id_number,birth_date");

    // Deleting (a mistaken record): gone, and audited.
    let (status, _) = call(
        &app.client,
        &app,
        Method::DELETE,
        &format!("/api/v1/members/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = call(
        &app.client,
        &app,
        Method::GET,
        &format!("/api/v1/members/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (n,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM audit_log WHERE action = 'delete_member' AND target = $1",
    )
    .bind(&id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(n, 1);
    app.stop().await;
}

async fn a_secretary_keeps_only_their_branch(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let county = new_org(&app, None, "县委", "committee").await;
    let mine = new_org(&app, Some(&county), "城关支部", "branch").await;
    let theirs = new_org(&app, Some(&county), "东关支部", "branch").await;
    let zhang = id_number("11010519900307001");
    let (_, a) = create(&app.client, &app, member("张三", &zhang, &mine)).await;
    let a = a["id"].as_str().unwrap().to_string();
    let (_, b) = create(
        &app.client,
        &app,
        member("王五", &id_number("11010519800101003"), &theirs),
    )
    .await;
    let b = b["id"].as_str().unwrap().to_string();

    let sec = keeper(&app, "sec", "secretary", &mine).await;
    let (status, list) = call(&sec, &app, Method::GET, "/api/v1/members", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["total"], 1);
    assert_eq!(list["items"][0]["id"], a.as_str());
    assert_eq!(list["items"][0]["id_number"], zhang.as_str(), "in full");
    assert_eq!(list["items"][0]["phone"], "13800138000");

    // Guessed ids and orgs from another branch are not there.
    let honour = json!({"kind": "reward", "title": "优秀共产党员", "decided_on": "2020-07-01"});
    for (method, path, body) in [
        (Method::GET, format!("/api/v1/members?org={theirs}"), None),
        (Method::GET, format!("/api/v1/members?org={county}"), None),
        (Method::GET, format!("/api/v1/members/{b}"), None),
        (
            Method::PATCH,
            format!("/api/v1/members/{b}"),
            Some(json!({"status": "left"})),
        ),
        (Method::DELETE, format!("/api/v1/members/{b}"), None),
        (Method::GET, format!("/api/v1/members/{b}/honours"), None),
        (
            Method::POST,
            format!("/api/v1/members/{b}/honours"),
            Some(honour.clone()),
        ),
        (
            Method::POST,
            "/api/v1/members".to_string(),
            Some(member("赵六", &id_number("11010519750101005"), &theirs)),
        ),
        (
            Method::PATCH,
            format!("/api/v1/members/{a}"),
            Some(json!({"org_id": theirs})),
        ),
    ] {
        let (status, v) = call(&sec, &app, method.clone(), &path, body).await;
        assert_eq!(status, 404, "{method} {path}: {v}");
    }
    let (status, v) = call(
        &sec,
        &app,
        Method::GET,
        &format!("/api/v1/members?org={mine}"),
        None,
    )
    .await;
    assert_eq!((status, v["total"].clone()), (StatusCode::OK, json!(1)));
    // B is untouched.
    let (_, still) = call(
        &app.client,
        &app,
        Method::GET,
        &format!("/api/v1/members/{b}"),
        None,
    )
    .await;
    assert_eq!(still["status"], "normal");
    // Within the branch the secretary creates and changes.
    let (status, v) = create(
        &sec,
        &app,
        member("赵六", &id_number("11010519750101005"), &mine),
    )
    .await;
    assert_eq!(status, 201, "{v}");

    // A member in the branch reads, masked, and changes nothing.
    let reader = keeper(&app, "reader", "member", &mine).await;
    let (status, list) = call(&reader, &app, Method::GET, "/api/v1/members?q=张", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["total"], 1);
    let item = &list["items"][0];
    assert_eq!(item["id_number"], portal::idcard::mask_id(&zhang).as_str());
    assert_eq!(item["phone"], "138****8000");
    assert_eq!(item["masked"], true);
    let (status, one) = call(
        &reader,
        &app,
        Method::GET,
        &format!("/api/v1/members/{a}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(one["id_number"], portal::idcard::mask_id(&zhang).as_str());
    assert_eq!(one["phone"], "138****8000");
    // Searching cannot uncover hidden digits: part of an ID number finds nothing, all of it does.
    let (_, found) = call(
        &reader,
        &app,
        Method::GET,
        &format!("/api/v1/members?q={}", &zhang[..14]),
        None,
    )
    .await;
    assert_eq!(found["total"], 0);
    let (_, found) = call(
        &reader,
        &app,
        Method::GET,
        &format!("/api/v1/members?q={zhang}"),
        None,
    )
    .await;
    assert_eq!(found["total"], 1);
    let (_, found) = call(
        &sec,
        &app,
        Method::GET,
        &format!("/api/v1/members?q={}", &zhang[..14]),
        None,
    )
    .await;
    assert_eq!(found["total"], 1);
    let (status, _) = call(
        &reader,
        &app,
        Method::PATCH,
        &format!("/api/v1/members/{a}"),
        Some(json!({"status": "left"})),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = call(
        &reader,
        &app,
        Method::POST,
        &format!("/api/v1/members/{a}/honours"),
        Some(honour),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = call(
        &reader,
        &app,
        Method::GET,
        &format!("/api/v1/members/{b}"),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // Each read is in the audit log, with who read it.
    let db = app.db().await;
    let (n,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM audit_log l JOIN users u ON u.id = l.actor_id \
         WHERE l.action = 'view_member' AND l.target = $1 AND u.username = 'reader'",
    )
    .bind(&a)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(n, 1);

    // The pages say the same.
    let (status, html) = page(&sec, &app, "/members").await;
    assert_eq!(status, 200);
    assert!(html.contains("张三") && html.contains(&zhang) && !html.contains("王五"));
    let (status, html) = page(&reader, &app, &format!("/members/{a}")).await;
    assert_eq!(status, 200);
    assert!(html.contains(&portal::idcard::mask_id(&zhang)) && !html.contains(&zhang));
    assert!(html.contains("138****8000") && !html.contains("13800138000"));
    let (status, _) = page(&sec, &app, &format!("/members/{b}")).await;
    assert_eq!(status, 404);
    let (status, _) = page(&sec, &app, &format!("/members/{b}/edit")).await;
    assert_eq!(status, 404);
    let (status, _) = page(&reader, &app, "/members/new").await;
    assert_eq!(status, 403);
    app.stop().await;
}

async fn honours_are_kept_in_order(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let branch = new_org(&app, None, "城关支部", "branch").await;
    let (_, m) = create(
        &app.client,
        &app,
        member("张三", &id_number("11010519900307001"), &branch),
    )
    .await;
    let path = format!("/api/v1/members/{}/honours", m["id"].as_str().unwrap());
    for (kind, title, on) in [
        ("reward", "优秀共产党员", "2021-06-30"),
        ("penalty", "警告", "2018-03-01"),
        ("奖励", "先进工作者", "2019-12-01"),
    ] {
        let (status, v) = call(
            &app.client,
            &app,
            Method::POST,
            &path,
            Some(json!({"kind": kind, "title": title, "decided_on": on, "note": "备注"})),
        )
        .await;
        assert_eq!(status, 201, "{v}");
    }
    for (body, field) in [
        (
            json!({"kind": "medal", "title": "x", "decided_on": "2020-01-01"}),
            "kind",
        ),
        (
            json!({"kind": "reward", "title": " ", "decided_on": "2020-01-01"}),
            "title",
        ),
        (
            json!({"kind": "reward", "title": "x", "decided_on": "2999-01-01"}),
            "decided_on",
        ),
        (json!({"kind": "reward", "title": "x"}), "decided_on"),
    ] {
        let (status, v) = call(&app.client, &app, Method::POST, &path, Some(body.clone())).await;
        assert_eq!(status, 422, "{body}: {v}");
        assert_eq!(fields(&v), [field]);
    }
    let (status, list) = call(&app.client, &app, Method::GET, &path, None).await;
    assert_eq!(status, 200);
    let got: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["decided_on"].as_str().unwrap().into(),
                h["kind"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("2018-03-01".into(), "penalty".into()),
            ("2019-12-01".into(), "reward".into()),
            ("2021-06-30".into(), "reward".into()),
        ] as [(String, String); 3]
    );
    let (_, html) = page(
        &app.client,
        &app,
        &format!("/members/{}", m["id"].as_str().unwrap()),
    )
    .await;
    let (a, b) = (
        html.find("警告").unwrap(),
        html.find("优秀共产党员").unwrap(),
    );
    assert!(a < b, "oldest first on the page too");
    let db = app.db().await;
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM audit_log WHERE action = 'add_honour'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 3);
    app.stop().await;
}

/// The form's CSRF token, from a page that carries one.
fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    html[at..at + 64].to_string()
}

async fn the_forms_create_and_edit_with_field_errors(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let branch = new_org(&app, None, "城关支部", "branch").await;
    let (status, html) = page(&app.client, &app, "/members/new").await;
    assert_eq!(status, 200);
    assert!(
        html.contains("城关支部"),
        "the org select lists orgs in scope"
    );
    let csrf = csrf_of(&html);
    let zhang = id_number("11010519900307001");
    let mut form = vec![
        ("csrf", csrf.clone()),
        ("name", "张三".to_string()),
        ("gender", String::new()),
        ("id_number", format!("{}0", &zhang[..17])),
        ("birth_date", String::new()),
        ("phone", "123".into()),
        ("joined_on", "2015-07-01".into()),
        ("category", "full".into()),
        ("full_member_on", String::new()),
        ("status", "normal".into()),
        ("cadre", "none".into()),
        ("org_id", branch.clone()),
    ];
    if zhang.ends_with('0') {
        form[3].1 = format!("{}1", &zhang[..17]);
    }
    let r = app
        .client
        .post(app.url("/members/new"))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let html = r.text().await.unwrap();
    assert!(html.contains("data-error=\"id_number\"") && html.contains("data-error=\"phone\""));
    assert!(html.contains("value=\"张三\""), "what was typed stays");
    form[3].1 = zhang.clone();
    form[5].1 = "13800138000".into();
    let r = app
        .client
        .post(app.url("/members/new"))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let to = r.headers()["location"].to_str().unwrap().to_string();
    let (status, html) = page(&app.client, &app, &to).await;
    assert_eq!(status, 200);
    assert!(html.contains(&zhang) && html.contains("1990-03-07"));
    // Edit: a future date is named; then a good change is saved.
    let (status, html) = page(&app.client, &app, &format!("{to}/edit")).await;
    assert_eq!(status, 200);
    assert!(html.contains(&zhang));
    form[6].1 = "2999-01-01".into();
    let r = app
        .client
        .post(app.url(&format!("{to}/edit")))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert!(r.text().await.unwrap().contains("data-error=\"joined_on\""));
    form[6].1 = "2016-07-01".into();
    let r = app
        .client
        .post(app.url(&format!("{to}/edit")))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let (_, html) = page(&app.client, &app, &to).await;
    assert!(html.contains("2016-07-01"));
    // Without the token nothing happens.
    form[0].1 = "0".repeat(64);
    let r = app
        .client
        .post(app.url(&format!("{to}/edit")))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    app.stop().await;
}

on_both_databases!(
    records_are_validated_and_kept,
    a_secretary_keeps_only_their_branch,
    honours_are_kept_in_order,
    the_forms_create_and_edit_with_field_errors,
);

/// Seeds 100,000 members in 1,000 branches (multi-row INSERTs in one transaction) and times the
/// first page of the list, as the API and as the page. Run with
/// `cargo test --test members -- --ignored --nocapture`.
async fn list_of_100k_members(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let root = new_org(&app, None, "市委", "committee").await;
    let db = app.db().await;
    let (root_path,): (String,) = sqlx::query_as("SELECT path FROM orgs WHERE id = $1")
        .bind(&root)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let started = Instant::now();
    let mut tx = db.pool.begin().await.unwrap();
    let branches: Vec<String> = (0..1000).map(|i| format!("b{i:04}")).collect();
    for chunk in branches.chunks(200) {
        let values: Vec<String> = chunk
            .iter()
            .map(|b| format!("('{b}', '{root}', '{root_path}{b}/', '支部{b}', 'branch', 0, 0)"))
            .collect();
        sqlx::query(&format!(
            "INSERT INTO orgs (id, parent_id, path, name, kind, created_at, updated_at) VALUES {}",
            values.join(", ")
        ))
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    let surnames = ["王", "李", "张", "刘", "陈", "杨", "赵", "黄", "周", "吴"];
    let mut rows = Vec::with_capacity(500);
    for i in 0..100_000u32 {
        let first17 = format!(
            "110105{}{:02}{:02}{:03}",
            1950 + (i / 1000) % 50,
            1 + (i / 1000) / 50,
            1 + i % 28,
            i % 1000
        );
        let id = id_number(&first17);
        let org = &branches[(i % 1000) as usize];
        let name = format!("{}{}", surnames[(i % 10) as usize], i);
        rows.push(format!(
            "('m{i:06}', '{org}', '{name}', 'male', '{id}', '1970-01-01', '13800138000', '1995-07-01', 'full', 0, 0)"
        ));
        if rows.len() == 500 {
            sqlx::query(&format!(
                "INSERT INTO members (id, org_id, name, gender, id_number, birth_date, phone, joined_on, category, created_at, updated_at) VALUES {}",
                rows.join(", ")
            ))
            .execute(&mut *tx)
            .await
            .unwrap();
            rows.clear();
        }
    }
    tx.commit().await.unwrap();
    // What autovacuum (PostgreSQL) or `PRAGMA optimize` (SQLite) would do in service.
    sqlx::query("ANALYZE").execute(&db.pool).await.unwrap();
    eprintln!(
        "{backend:?}: seeded 100k members in {:?}",
        started.elapsed()
    );

    let time = |path: String| {
        let app = &app;
        async move {
            let mut best = Duration::MAX;
            let mut body = Value::Null;
            for _ in 0..5 {
                let t = Instant::now();
                let r = app.client.get(app.url(&path)).send().await.unwrap();
                assert_eq!(r.status(), 200, "{path}");
                let text = r.text().await.unwrap();
                best = best.min(t.elapsed());
                body = serde_json::from_str(&text).unwrap_or(Value::Null);
            }
            (best, body)
        }
    };
    let (api, body) = time("/api/v1/members?limit=50".into()).await;
    assert_eq!(body["total"], 100_000);
    assert_eq!(body["items"].as_array().unwrap().len(), 50);
    let (deep, _) = time("/api/v1/members?limit=50&offset=50000".into()).await;
    let (one_org, body) = time(format!("/api/v1/members?limit=50&org={}", branches[500])).await;
    assert_eq!(body["total"], 100);
    let (search, _) = time("/api/v1/members?limit=50&q=王1".into()).await;
    let (page_time, _) = time("/members".into()).await;
    eprintln!(
        "{backend:?}: first page {api:?}, offset 50000 {deep:?}, one branch {one_org:?}, search {search:?}, page /members {page_time:?}"
    );
    // The target is 50 ms (met by SQLite in a debug build; PostgreSQL's COUNT(*) over 100k rows
    // is most of its ~45 ms). The bound here only catches a plan that sorts the whole subtree
    // (~350 ms), since a busy build machine adds noise.
    assert!(api < Duration::from_millis(250), "first page took {api:?}");
    app.stop().await;
}

#[tokio::test]
#[ignore = "timing: seeds 100,000 members"]
async fn list_of_100k_members_sqlite() {
    list_of_100k_members(Backend::Sqlite).await
}

#[tokio::test]
#[ignore = "timing: seeds 100,000 members"]
async fn list_of_100k_members_postgres() {
    list_of_100k_members(Backend::Postgres).await
}
