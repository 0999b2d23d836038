//! Spreadsheets through the API, on both databases: members out and back in (10,000 of them),
//! every kind of bad file refused with the row and column named and nothing imported,
//! `only_valid=true`, scoping (a secretary cannot import into another branch), and the org tree.
//!
//! Figures (release build, 2-core machine; `cargo test --release --test xlsx -- --ignored
//! --nocapture figures`): see `figures_100k` at the end.

mod common;

use std::time::Instant;

use common::api::{call, keeper, new_org};
use common::{Backend, TestApp};
use portal::xlsx::calamine::{Data, Reader, Xlsx};
use portal::xlsx::rust_xlsxwriter::Workbook;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const FIELDS: [&str; 18] = portal::members::FIELDS;

/// 县委 → 东街道党工委 → 东一支部, 县委 → 西街道党工委 → 西一支部. Returns (east branch, west branch).
async fn tree(app: &TestApp) -> (String, String) {
    let county = new_org(app, None, "县委", "committee").await;
    let east = new_org(app, Some(&county), "东街道党工委", "committee").await;
    let west = new_org(app, Some(&county), "西街道党工委", "committee").await;
    let e1 = new_org(app, Some(&east), "东一支部", "branch").await;
    let w1 = new_org(app, Some(&west), "西一支部", "branch").await;
    (e1, w1)
}

/// A valid ID number for person `i` (unique for i < 1,000,000) and its birth date and gender.
fn person(i: usize) -> (String, String, &'static str) {
    let year = 1950 + (i / 1000) % 40;
    let month = 1 + (i / 40_000) % 12;
    let day = 1 + (i / 480_000) % 28;
    let seq = i % 1000;
    let first17 = format!("110105{year:04}{month:02}{day:02}{seq:03}");
    let id = format!("{first17}{}", portal::idcard::check_char(&first17).unwrap());
    let gender = if seq % 2 == 1 { "男" } else { "女" };
    (id, format!("{year:04}-{month:02}-{day:02}"), gender)
}

/// A good member row in FIELDS order.
fn row(i: usize, org: &str) -> Vec<String> {
    let (id, birth, gender) = person(i);
    let joined = format!("{}-07-01", &birth[..4].parse::<u32>().unwrap() + 25);
    vec![
        format!("党员{i}"),
        gender.into(),
        id,
        birth,
        "汉族".into(),
        "大学本科".into(),
        "山东济南".into(),
        format!("138{:08}", i),
        "东街道办事处".into(),
        "机关".into(),
        "东街道".into(),
        joined,
        "正式党员".into(),
        String::new(),
        "正常".into(),
        "非干部".into(),
        String::new(),
        org.into(),
    ]
}

/// An .xlsx with `header` and `rows` (all text cells; empty strings left blank).
fn sheet(header: &[&str], rows: &[Vec<String>]) -> Vec<u8> {
    let mut book = Workbook::new();
    let ws = book.add_worksheet();
    for (c, t) in header.iter().enumerate() {
        ws.write_string(0, c as u16, *t).unwrap();
    }
    for (r, cells) in rows.iter().enumerate() {
        for (c, v) in cells.iter().enumerate() {
            if !v.is_empty() {
                ws.write_string(r as u32 + 1, c as u16, v).unwrap();
            }
        }
    }
    book.save_to_buffer().unwrap()
}

/// Every row of the first sheet (header included) as text.
fn read(bytes: &[u8]) -> Vec<Vec<String>> {
    let mut book: Xlsx<_> = Xlsx::new(std::io::Cursor::new(bytes.to_vec())).unwrap();
    let range = book.worksheet_range_at(0).unwrap().unwrap();
    range
        .rows()
        .map(|r| {
            r.iter()
                .map(|d| match d {
                    Data::Empty => String::new(),
                    other => other.to_string(),
                })
                .collect()
        })
        .collect()
}

async fn upload(
    c: &reqwest::Client,
    app: &TestApp,
    path: &str,
    bytes: Vec<u8>,
) -> (StatusCode, Value) {
    let r = c.post(app.url(path)).body(bytes).send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| json!({"raw": text})),
    )
}

async fn download(c: &reqwest::Client, app: &TestApp, path: &str) -> Vec<u8> {
    let r = c.get(app.url(path)).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    assert_eq!(
        r.headers()["content-type"],
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    );
    r.bytes().await.unwrap().to_vec()
}

/// How many members the caller's export holds.
async fn member_count(c: &reqwest::Client, app: &TestApp) -> usize {
    read(&download(c, app, "/api/v1/members/export.xlsx").await).len() - 1
}

/// The errors of a report as (row, column) pairs.
fn places(v: &Value) -> Vec<(u64, String)> {
    v["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors in {v}"))
        .iter()
        .map(|e| {
            (
                e["row"].as_u64().unwrap(),
                e["column"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

const IMPORT: &str = "/api/v1/members/import.xlsx";

async fn ten_thousand_members_round_trip(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    tree(&app).await;
    let rows: Vec<Vec<String>> = (0..10_000)
        .map(|i| {
            // Full paths, tails and the two branches mixed.
            let org = match i % 3 {
                0 => "县委/东街道党工委/东一支部",
                1 => "东一支部",
                _ => "西街道党工委/西一支部",
            };
            row(i, org)
        })
        .collect();
    let t = Instant::now();
    let (status, v) = upload(&app.client, &app, IMPORT, sheet(&FIELDS, &rows)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["inserted"], 10_000, "{v}");
    eprintln!("{backend:?}: import 10,000 in {:?}", t.elapsed());

    let t = Instant::now();
    let exported = download(&app.client, &app, "/api/v1/members/export.xlsx").await;
    eprintln!("{backend:?}: export 10,000 in {:?}", t.elapsed());
    let mut cells = read(&exported);
    assert_eq!(cells.len(), 10_001);
    assert_eq!(cells[0], FIELDS);
    let first = cells
        .iter()
        .find(|r| r[0] == "党员1")
        .expect("党员1 exported");
    assert_eq!(first[17], "县委/东街道党工委/东一支部");
    assert_eq!(first[2], person(1).0, "admins see ID numbers in full");

    // The export, imported again, changes nothing.
    let (status, v) = upload(&app.client, &app, IMPORT, exported).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (&v["inserted"], &v["updated"], &v["unchanged"]),
        (&json!(0), &json!(0), &json!(10_000)),
        "{v}"
    );

    // One cell edited: one member updated.
    cells[5][4] = "回族".into();
    let header: Vec<&str> = cells[0].iter().map(String::as_str).collect();
    let (status, v) = upload(&app.client, &app, IMPORT, sheet(&header, &cells[1..])).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (&v["inserted"], &v["updated"]),
        (&json!(0), &json!(1)),
        "{v}"
    );

    // A plain member sees the same list masked.
    let e1 = {
        let (_, orgs) = call(&app.client, &app, Method::GET, "/api/v1/orgs", None).await;
        orgs.as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == "东一支部")
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let plain = keeper(&app, "plain", "member", &e1).await;
    let masked = read(&download(&plain, &app, "/api/v1/members/export.xlsx").await);
    assert_eq!(masked.len() - 1, 6667, "only 东一支部's members");
    assert!(masked[1][2].contains("********"), "{:?}", masked[1]);
    assert!(masked[1][7].contains("****"), "{:?}", masked[1]);
    app.stop().await;
}

async fn bad_spreadsheets_import_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    tree(&app).await;
    let good: Vec<Vec<String>> = (0..3).map(|i| row(i, "东一支部")).collect();
    let (status, v) = upload(&app.client, &app, IMPORT, sheet(&FIELDS, &good)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(member_count(&app.client, &app).await, 3);

    // Wrong types, a bad checksum, a contradicting gender, a bad phone, an unknown org, and two
    // rows with one ID number — every problem reported, nothing imported.
    let mut rows: Vec<Vec<String>> = (10..20).map(|i| row(i, "东一支部")).collect();
    rows[0][11] = "去年".into(); // row 2: 入党时间
    let mut id = person(11).0;
    id.replace_range(17.., if id.ends_with('1') { "2" } else { "1" });
    rows[1][2] = id; // row 3: 身份证号
    rows[2][1] = if rows[2][1] == "男" { "女" } else { "男" }.into(); // row 4: 性别
    rows[3][7] = "12345".into(); // row 5: 手机号
    rows[4][17] = "北街道/北一支部".into(); // row 6: 所属组织
    rows[5][3] = "1900-01-01".into(); // row 7: 出生日期 contradicts the ID
    rows[8] = rows[6].clone(); // rows 8 and 10: the same ID number
    rows[8][0] = "另一个人".into();
    let (status, v) = upload(&app.client, &app, IMPORT, sheet(&FIELDS, &rows)).await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["imported"], 0);
    assert_eq!(v["error"], "invalid_rows");
    let got = places(&v);
    for want in [
        (2, "入党时间"),
        (3, "身份证号"),
        (4, "性别"),
        (5, "手机号"),
        (6, "所属组织"),
        (7, "出生日期"),
        (8, "身份证号"),
        (10, "身份证号"),
    ] {
        assert!(
            got.contains(&(want.0, want.1.to_string())),
            "{want:?} not in {got:?}"
        );
    }
    assert_eq!(got.len(), 8, "{got:?}");
    let e = &v["errors"][0];
    assert_eq!(e["cell"], "L2");
    assert!(e["message"].as_str().unwrap().contains("去年"), "{e}");
    assert_eq!(member_count(&app.client, &app).await, 3);

    // Excel dates as serial numbers are dates.
    {
        let mut book = Workbook::new();
        let ws = book.add_worksheet();
        for (c, t) in FIELDS.iter().enumerate() {
            ws.write_string(0, c as u16, *t).unwrap();
        }
        let r = row(30, "东一支部");
        for (c, v) in r.iter().enumerate() {
            if c == 11 {
                // 1990-07-01
                ws.write_number(1, c as u16, 33055.0).unwrap();
            } else if !v.is_empty() {
                ws.write_string(1, c as u16, v).unwrap();
            }
        }
        let (status, v) = upload(&app.client, &app, IMPORT, book.save_to_buffer().unwrap()).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["inserted"], 1);
        let all = read(&download(&app.client, &app, "/api/v1/members/export.xlsx").await);
        let r = all.iter().find(|r| r[0] == "党员30").unwrap();
        assert_eq!(r[11], "1990-07-01");
    }

    // Missing required columns: named, before any row.
    let header: Vec<&str> = FIELDS
        .iter()
        .copied()
        .filter(|t| *t != "身份证号" && *t != "入党时间")
        .collect();
    let rows: Vec<Vec<String>> = (40..42)
        .map(|i| {
            let mut r = row(i, "东一支部");
            r.remove(11);
            r.remove(2);
            r
        })
        .collect();
    let (status, v) = upload(&app.client, &app, IMPORT, sheet(&header, &rows)).await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["error"], "missing_columns");
    assert_eq!(
        places(&v),
        [(1, "身份证号".to_string()), (1, "入党时间".to_string())]
    );

    // Not a spreadsheet at all.
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    for body in [png, b"name,id\n".to_vec(), b"PK\x03\x04broken zip".to_vec()] {
        let (status, v) = upload(&app.client, &app, IMPORT, body).await;
        assert_eq!(status, 422, "{v}");
        assert_eq!(v["error"], "not_xlsx", "{v}");
        assert!(v["message"].as_str().unwrap().contains("not an .xlsx file"));
    }

    // 50 MB: refused before it is read.
    let (status, v) = upload(&app.client, &app, IMPORT, vec![0u8; 50 << 20]).await;
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["error"], "payload_too_large");
    assert_eq!(member_count(&app.client, &app).await, 4);

    // only_valid=true: the good rows go in, the bad ones are reported.
    let mut rows: Vec<Vec<String>> = (50..55).map(|i| row(i, "东一支部")).collect();
    rows[1][11] = "not a date".into();
    rows[3][2] = "123".into();
    let (status, v) = upload(
        &app.client,
        &app,
        &format!("{IMPORT}?only_valid=true"),
        sheet(&FIELDS, &rows),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (&v["inserted"], &v["skipped"]),
        (&json!(3), &json!(2)),
        "{v}"
    );
    assert_eq!(
        places(&v),
        [(3, "入党时间".to_string()), (5, "身份证号".to_string())]
    );
    assert_eq!(member_count(&app.client, &app).await, 7);
    app.stop().await;
}

async fn a_secretary_imports_only_into_their_branch(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    let (e1, _w1) = tree(&app).await;
    // One member already in 西一支部.
    let (status, v) = upload(
        &app.client,
        &app,
        IMPORT,
        sheet(&FIELDS, &[row(7, "西一支部")]),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let secretary = keeper(&app, "sec", "secretary", &e1).await;
    let rows = vec![
        row(1, "东一支部"),
        row(2, "西一支部"),                   // another branch: not found in scope
        row(7, "县委/东街道党工委/东一支部"), // exists in 西一支部: never overwritten
    ];
    let (status, v) = upload(&secretary, &app, IMPORT, sheet(&FIELDS, &rows)).await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(
        places(&v),
        [(3, "所属组织".to_string()), (4, "身份证号".to_string())]
    );
    let (status, v) = upload(
        &secretary,
        &app,
        &format!("{IMPORT}?only_valid=true"),
        sheet(&FIELDS, &rows),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["inserted"], 1);
    assert_eq!(member_count(&secretary, &app).await, 1);
    // The west member is untouched.
    let all = read(&download(&app.client, &app, "/api/v1/members/export.xlsx").await);
    let r = all.iter().find(|r| r[0] == "党员7").unwrap();
    assert_eq!(r[17], "县委/西街道党工委/西一支部");
    // A plain member may not import.
    let plain = keeper(&app, "plain", "member", &e1).await;
    let (status, _) = upload(&plain, &app, IMPORT, sheet(&FIELDS, &rows[..1])).await;
    assert_eq!(status, 403);
    app.stop().await;
}

async fn the_org_tree_out_and_in(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    tree(&app).await;
    let exported = download(&app.client, &app, "/api/v1/orgs/export.xlsx").await;
    let cells = read(&exported);
    assert_eq!(cells[0], ["组织名称", "组织类型", "上级组织", "组织编码"]);
    assert!(cells.contains(&vec![
        "东一支部".to_string(),
        "党支部".into(),
        "县委/东街道党工委".into(),
        String::new()
    ]));
    let (status, v) = upload(&app.client, &app, "/api/v1/orgs/import.xlsx", exported).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!((&v["inserted"], &v["unchanged"]), (&json!(0), &json!(5)));

    // Children before parents, a code, and one bad row: nothing is created.
    let header = ["组织名称", "组织类型", "上级组织", "组织编码"];
    let s = |v: [&str; 4]| v.map(String::from).to_vec();
    let mut rows = vec![
        s(["第一党小组", "党小组", "东街道党工委/东二支部", ""]),
        s(["东二支部", "党支部", "县委/东街道党工委", "E2"]),
        s(["南一支部", "党支部", "南街道党工委", ""]),
    ];
    let (status, v) = upload(
        &app.client,
        &app,
        "/api/v1/orgs/import.xlsx",
        sheet(&header, &rows),
    )
    .await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(places(&v), [(4, "上级组织".to_string())]);
    rows.pop();
    let (status, v) = upload(
        &app.client,
        &app,
        "/api/v1/orgs/import.xlsx",
        sheet(&header, &rows),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["inserted"], 2, "{v}");
    let (status, v) = upload(
        &app.client,
        &app,
        "/api/v1/orgs/import.xlsx",
        sheet(&header, &rows),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!((&v["inserted"], &v["unchanged"]), (&json!(0), &json!(2)));
    let (_, list) = call(&app.client, &app, Method::GET, "/api/v1/orgs", None).await;
    let group = list
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "第一党小组")
        .unwrap();
    assert_eq!(group["kind"], "group");
    assert_eq!(group["depth"], 3);

    // The template: header, an example that imports cleanly, and the explanations.
    let t = download(&app.client, &app, "/api/v1/members/template.xlsx").await;
    let cells = read(&t);
    assert_eq!(cells[0], FIELDS);
    let (status, v) = upload(&app.client, &app, IMPORT, t).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["inserted"], 1, "{v}");
    app.stop().await;
}

on_both_databases!(
    ten_thousand_members_round_trip,
    bad_spreadsheets_import_nothing,
    a_secretary_imports_only_into_their_branch,
    the_org_tree_out_and_in,
);

/// 100,000 members in and out, timed. Run in release:
/// `cargo test --release --test xlsx -- --ignored --nocapture figures`.
async fn figures(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.sign_in_admin().await;
    tree(&app).await;
    let rows: Vec<Vec<String>> = (0..100_000)
        .map(|i| {
            row(
                i,
                if i % 2 == 0 {
                    "东一支部"
                } else {
                    "西一支部"
                },
            )
        })
        .collect();
    let file = sheet(&FIELDS, &rows);
    let t = Instant::now();
    let (status, v) = upload(&app.client, &app, IMPORT, file.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["inserted"], 100_000);
    let import = t.elapsed();
    eprintln!("FIGURES {backend:?}: import 100,000 new: {import:?}");
    let t = Instant::now();
    let out = download(&app.client, &app, "/api/v1/members/export.xlsx").await;
    let export = t.elapsed();
    let t = Instant::now();
    let (status, v) = upload(&app.client, &app, IMPORT, out.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["unchanged"], 100_000);
    let again = t.elapsed();
    eprintln!(
        "FIGURES {backend:?}: file {} KB; import 100,000 new: {import:?}; export: {export:?} ({} KB); re-import unchanged: {again:?}",
        file.len() / 1024,
        out.len() / 1024
    );
    app.stop().await;
}

mod figures {
    #[tokio::test]
    #[ignore]
    async fn sqlite() {
        super::figures(crate::common::Backend::Sqlite).await
    }
    #[tokio::test]
    #[ignore]
    async fn postgres() {
        super::figures(crate::common::Backend::Postgres).await
    }
}
