//! Statistics (统计): normal members of a subtree by org, gender, age band, education,
//! ethnicity, joining year and category; orgs by kind; dues due against paid per month. Every
//! figure is a `GROUP BY` in SQL over the subtree (the caller's scope, or an org in it), shown on
//! the `/stats` page as tables with server-drawn SVG bar charts, and exported as one .xlsx
//! workbook with a sheet per table.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use minijinja::context;
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;

use crate::AppState;
use crate::auth::{CurrentUser, MaybeUser, Permission, User};
use crate::db::Db;
use crate::error::{AppError, ErrorBody};
use crate::orglife::{content_disposition, login_redirect, today};
use crate::orgs::{Org, OrgKind, Scope, like_escape};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/stats/members", get(members))
        .route("/api/v1/stats/orgs", get(orgs))
        .route("/api/v1/stats/dues", get(dues))
        .route("/api/v1/stats/export.xlsx", get(export))
        .route("/stats", get(page))
}

#[derive(OpenApi)]
#[openapi(paths(members, orgs, dues, export))]
pub struct StatsApi;

/// Age bands, youngest first.
pub const AGE_BANDS: [(&str, &str); 5] = [
    ("lt30", "30岁以下"),
    ("30_39", "30-39岁"),
    ("40_49", "40-49岁"),
    ("50_59", "50-59岁"),
    ("60_plus", "60岁及以上"),
];

/// One row of a table: a key as stored, its label for people, and the count.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Count {
    pub key: String,
    pub label: String,
    pub count: i64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct OrgCount {
    pub org_id: String,
    pub name: String,
    /// True for the row of members kept directly on the org itself (not in an org below it).
    pub own: bool,
    pub count: i64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MemberStats {
    /// The org whose subtree is counted (absent: the caller's whole scope).
    pub org_id: Option<String>,
    pub org_name: Option<String>,
    /// The date ages are counted at (Beijing), `YYYY-MM-DD`.
    pub as_of: String,
    /// Normal members (status `normal`) in the subtree.
    pub total: i64,
    /// The org itself, then each direct child's whole subtree.
    pub by_org: Vec<OrgCount>,
    pub by_gender: Vec<Count>,
    pub by_age: Vec<Count>,
    pub by_education: Vec<Count>,
    pub by_ethnicity: Vec<Count>,
    pub by_join_year: Vec<Count>,
    pub by_join_decade: Vec<Count>,
    pub by_category: Vec<Count>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct OrgStats {
    pub org_id: Option<String>,
    /// Orgs in the subtree, the org itself included.
    pub total: i64,
    pub by_kind: Vec<Count>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DuesMonth {
    /// `YYYY-MM`.
    pub month: String,
    /// Members with dues entered for the month.
    pub members: i64,
    /// Of whom paid in full.
    pub paid_members: i64,
    pub due_fen: i64,
    pub paid_fen: i64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DuesStats {
    pub org_id: Option<String>,
    pub from: String,
    pub to: String,
    pub months: Vec<DuesMonth>,
    pub total_due_fen: i64,
    pub total_paid_fen: i64,
}

/// The subtree a request counts: an org in the caller's scope, or the whole scope.
struct Subject {
    org: Option<Org>,
    /// `LIKE` pattern of every path counted.
    pattern: String,
}

async fn subject(db: &Db, user: &User, org: Option<&str>) -> Result<Subject, AppError> {
    if !user.role.allows(Permission::ManageMembers) && !user.role.allows(Permission::ManageOrgs) {
        return Err(AppError::Forbidden(
            "你没有查看统计的权限 (permission denied)".into(),
        ));
    }
    let scope = Scope::of(db, user).await?;
    let org = match org.map(str::trim).filter(|s| !s.is_empty()) {
        Some(id) => Some(scope.org(db, id).await?),
        None => match &scope.root {
            Some(root) => Some(scope.org(db, root).await?),
            None => None,
        },
    };
    let pattern = match &org {
        Some(o) => format!("{}%", like_escape(&o.path)),
        None => scope.like(),
    };
    Ok(Subject { org, pattern })
}

// The org filter as a subquery, so that SQLite reads members through `members_org` for the few
// orgs of a branch instead of joining every member with its org (a join made it scan them all).
const MEMBERS_FROM: &str = "FROM members m \
     WHERE m.org_id IN (SELECT id FROM orgs WHERE path LIKE $1 ESCAPE '\\') AND m.status = 'normal'";

/// `SELECT <expr>, COUNT(*) … GROUP BY 1`, with extra string binds after the pattern.
async fn grouped(
    db: &Db,
    expr: &str,
    pattern: &str,
    extra: &[String],
) -> Result<Vec<(String, i64)>, AppError> {
    let sql = format!("SELECT {expr} AS k, COUNT(*) AS n {MEMBERS_FROM} GROUP BY 1 ORDER BY 1");
    let mut q = sqlx::query_as::<_, (Option<String>, i64)>(&sql).bind(pattern.to_string());
    for e in extra {
        q = q.bind(e.clone());
    }
    Ok(q.fetch_all(&db.pool)
        .await?
        .into_iter()
        .map(|(k, n)| (k.unwrap_or_default(), n))
        .collect())
}

fn labelled(rows: Vec<(String, i64)>, label: impl Fn(&str) -> String) -> Vec<Count> {
    let mut out: Vec<Count> = rows
        .into_iter()
        .map(|(key, count)| Count {
            label: label(&key),
            key,
            count,
        })
        .collect();
    out.sort_by(|a, b| b.count.cmp(&a.count).then(a.key.cmp(&b.key)));
    out
}

fn or_unset(s: &str) -> String {
    if s.trim().is_empty() {
        "未填写".into()
    } else {
        s.to_string()
    }
}

/// `YYYY-MM-DD` of `years` years before `today` (same month and day, compared as text, so a
/// 29 February birthday turns over on 1 March in other years).
fn years_before(today: &str, years: i32) -> String {
    let y: i32 = today.get(0..4).and_then(|s| s.parse().ok()).unwrap_or(1970);
    format!("{:04}{}", y - years, today.get(4..).unwrap_or("-01-01"))
}

async fn member_stats(db: &Db, s: &Subject, as_of: &str) -> Result<MemberStats, AppError> {
    let p = &s.pattern;
    // Per org of the subtree, rolled up in Rust to the org itself and each direct child.
    let per_org = grouped(db, "m.org_id", p, &[]).await?;
    let total = per_org.iter().map(|(_, n)| n).sum();
    let by_org = match &s.org {
        Some(org) => {
            let children: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT id, name, path FROM orgs WHERE parent_id = $1 ORDER BY sort_order, name",
            )
            .bind(&org.id)
            .fetch_all(&db.pool)
            .await?;
            roll_up(db, org, &children, per_org).await?
        }
        None => {
            let roots: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT id, name, path FROM orgs WHERE path LIKE $1 ESCAPE '\\' ORDER BY path",
            )
            .bind(p)
            .fetch_all(&db.pool)
            .await?;
            // Tops of the scope: orgs no other listed org is above.
            let tops: Vec<_> = roots
                .iter()
                .filter(|(_, _, path)| {
                    !roots
                        .iter()
                        .any(|(_, _, q)| q != path && path.starts_with(q.as_str()))
                })
                .cloned()
                .collect();
            let paths: BTreeMap<String, String> = roots
                .iter()
                .map(|(id, _, path)| (id.clone(), path.clone()))
                .collect();
            tops.into_iter()
                .map(|(id, name, path)| OrgCount {
                    count: per_org
                        .iter()
                        .filter(|(o, _)| paths.get(o).is_some_and(|q| q.starts_with(&path)))
                        .map(|(_, n)| n)
                        .sum(),
                    org_id: id,
                    name,
                    own: false,
                })
                .collect()
        }
    };
    let by_gender = labelled(grouped(db, "m.gender", p, &[]).await?, |k| {
        match k {
            "male" => "男",
            "female" => "女",
            _ => "未填写",
        }
        .into()
    });
    let cut: Vec<String> = [30, 40, 50, 60]
        .iter()
        .map(|y| years_before(as_of, *y))
        .collect();
    let age_expr = "CASE WHEN m.birth_date > $2 THEN 'lt30' WHEN m.birth_date > $3 THEN '30_39' \
         WHEN m.birth_date > $4 THEN '40_49' WHEN m.birth_date > $5 THEN '50_59' ELSE '60_plus' END";
    let ages = grouped(db, age_expr, p, &cut).await?;
    let by_age = AGE_BANDS
        .iter()
        .map(|(key, label)| Count {
            key: (*key).into(),
            label: (*label).into(),
            count: ages.iter().find(|(k, _)| k == key).map_or(0, |(_, n)| *n),
        })
        .collect();
    let by_education = labelled(grouped(db, "m.education", p, &[]).await?, or_unset);
    let by_ethnicity = labelled(grouped(db, "m.ethnicity", p, &[]).await?, or_unset);
    let years = grouped(db, "substr(m.joined_on, 1, 4)", p, &[]).await?;
    let by_join_year: Vec<Count> = years
        .iter()
        .map(|(y, n)| Count {
            key: y.clone(),
            label: format!("{y}年"),
            count: *n,
        })
        .collect();
    let mut decades: BTreeMap<String, i64> = BTreeMap::new();
    for (y, n) in &years {
        let d = y.get(0..3).map_or_else(String::new, |d| format!("{d}0"));
        *decades.entry(d).or_default() += n;
    }
    let by_join_decade = decades
        .into_iter()
        .map(|(d, count)| Count {
            label: format!("{d}年代"),
            key: d,
            count,
        })
        .collect();
    let by_category = labelled(grouped(db, "m.category", p, &[]).await?, |k| {
        match k {
            "full" => "正式党员",
            "probationary" => "预备党员",
            other => other,
        }
        .into()
    });
    Ok(MemberStats {
        org_id: s.org.as_ref().map(|o| o.id.clone()),
        org_name: s.org.as_ref().map(|o| o.name.clone()),
        as_of: as_of.into(),
        total,
        by_org,
        by_gender,
        by_age,
        by_education,
        by_ethnicity,
        by_join_year,
        by_join_decade,
        by_category,
    })
}

async fn roll_up(
    db: &Db,
    org: &Org,
    children: &[(String, String, String)],
    per_org: Vec<(String, i64)>,
) -> Result<Vec<OrgCount>, AppError> {
    let paths: Vec<(String, String)> =
        sqlx::query_as("SELECT id, path FROM orgs WHERE path LIKE $1 ESCAPE '\\'")
            .bind(format!("{}%", like_escape(&org.path)))
            .fetch_all(&db.pool)
            .await?;
    let paths: BTreeMap<String, String> = paths.into_iter().collect();
    let mut own = OrgCount {
        org_id: org.id.clone(),
        name: format!("{}（本级）", org.name),
        own: true,
        count: 0,
    };
    let mut rows: Vec<OrgCount> = children
        .iter()
        .map(|(id, name, _)| OrgCount {
            org_id: id.clone(),
            name: name.clone(),
            own: false,
            count: 0,
        })
        .collect();
    for (o, n) in per_org {
        if o == org.id {
            own.count += n;
        } else if let Some(p) = paths.get(&o)
            && let Some(i) = children
                .iter()
                .position(|(_, _, cp)| p.starts_with(cp.as_str()))
        {
            rows[i].count += n;
        }
    }
    rows.insert(0, own);
    Ok(rows)
}

async fn org_stats(db: &Db, s: &Subject) -> Result<OrgStats, AppError> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT kind, COUNT(*) FROM orgs WHERE path LIKE $1 ESCAPE '\\' GROUP BY kind",
    )
    .bind(&s.pattern)
    .fetch_all(&db.pool)
    .await?;
    let by_kind: Vec<Count> = OrgKind::ALL
        .iter()
        .map(|k| Count {
            key: k.as_str().into(),
            label: k.label().into(),
            count: rows
                .iter()
                .find(|(kk, _)| kk == k.as_str())
                .map_or(0, |(_, n)| *n),
        })
        .collect();
    Ok(OrgStats {
        org_id: s.org.as_ref().map(|o| o.id.clone()),
        total: rows.iter().map(|(_, n)| n).sum(),
        by_kind,
    })
}

fn clean_month(s: &str) -> Result<String, AppError> {
    let s = s.trim();
    let ok = s.len() == 7
        && s.as_bytes()[4] == b'-'
        && s[0..4].bytes().all(|b| b.is_ascii_digit())
        && s[5..7].parse::<u32>().is_ok_and(|m| (1..=12).contains(&m));
    if ok {
        Ok(s.to_string())
    } else {
        Err(AppError::Unprocessable(
            "月份须为 YYYY-MM (month must be YYYY-MM)".into(),
        ))
    }
}

/// From eleven months before `today`'s month through that month.
fn default_months(today: &str) -> (String, String) {
    let y: i32 = today.get(0..4).and_then(|s| s.parse().ok()).unwrap_or(1970);
    let m: i32 = today.get(5..7).and_then(|s| s.parse().ok()).unwrap_or(1);
    let start = y * 12 + (m - 1) - 11;
    (
        format!("{:04}-{:02}", start / 12, start % 12 + 1),
        format!("{y:04}-{m:02}"),
    )
}

async fn dues_stats(
    db: &Db,
    s: &Subject,
    from: Option<&str>,
    to: Option<&str>,
) -> Result<DuesStats, AppError> {
    let (df, dt) = default_months(&today());
    let from = match from.filter(|s| !s.trim().is_empty()) {
        Some(f) => clean_month(f)?,
        None => df,
    };
    let to = match to.filter(|s| !s.trim().is_empty()) {
        Some(t) => clean_month(t)?,
        None => dt,
    };
    let rows: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT d.month, COUNT(*), CAST(SUM(CASE WHEN d.paid_fen >= d.due_fen THEN 1 ELSE 0 END) AS BIGINT), \
         CAST(SUM(d.due_fen) AS BIGINT), CAST(SUM(d.paid_fen) AS BIGINT) \
         FROM dues d JOIN orgs o ON o.id = d.org_id \
         WHERE o.path LIKE $1 ESCAPE '\\' AND d.month >= $2 AND d.month <= $3 \
         GROUP BY d.month ORDER BY d.month",
    )
    .bind(&s.pattern)
    .bind(&from)
    .bind(&to)
    .fetch_all(&db.pool)
    .await?;
    let months: Vec<DuesMonth> = rows
        .into_iter()
        .map(
            |(month, members, paid_members, due_fen, paid_fen)| DuesMonth {
                month,
                members,
                paid_members,
                due_fen,
                paid_fen,
            },
        )
        .collect();
    Ok(DuesStats {
        org_id: s.org.as_ref().map(|o| o.id.clone()),
        total_due_fen: months.iter().map(|m| m.due_fen).sum(),
        total_paid_fen: months.iter().map(|m| m.paid_fen).sum(),
        from,
        to,
        months,
    })
}

// ---------------------------------------------------------------------------------------------
// REST
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct OrgQuery {
    /// An org in the caller's scope (default: the caller's own org, or everything for a system
    /// admin).
    pub org: Option<String>,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct DuesQuery {
    pub org: Option<String>,
    /// First month, `YYYY-MM` (default: eleven months ago).
    pub from: Option<String>,
    /// Last month, `YYYY-MM` (default: this month).
    pub to: Option<String>,
}

/// Normal members of the subtree, counted by org, gender, age band, education, ethnicity,
/// joining year and decade, and category.
#[utoipa::path(get, path = "/api/v1/stats/members", params(OrgQuery),
    responses((status = 200, body = MemberStats), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn members(
    State(state): State<AppState>,
    user: CurrentUser,
    Query(q): Query<OrgQuery>,
) -> Result<Json<MemberStats>, AppError> {
    let s = subject(&state.db, &user.0, q.org.as_deref()).await?;
    Ok(Json(member_stats(&state.db, &s, &today()).await?))
}

/// Orgs of the subtree by kind.
#[utoipa::path(get, path = "/api/v1/stats/orgs", params(OrgQuery),
    responses((status = 200, body = OrgStats), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn orgs(
    State(state): State<AppState>,
    user: CurrentUser,
    Query(q): Query<OrgQuery>,
) -> Result<Json<OrgStats>, AppError> {
    let s = subject(&state.db, &user.0, q.org.as_deref()).await?;
    Ok(Json(org_stats(&state.db, &s).await?))
}

/// Dues due against paid per month (amounts in fen), by the org the dues were entered under.
#[utoipa::path(get, path = "/api/v1/stats/dues", params(DuesQuery),
    responses((status = 200, body = DuesStats), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn dues(
    State(state): State<AppState>,
    user: CurrentUser,
    Query(q): Query<DuesQuery>,
) -> Result<Json<DuesStats>, AppError> {
    let s = subject(&state.db, &user.0, q.org.as_deref()).await?;
    Ok(Json(
        dues_stats(&state.db, &s, q.from.as_deref(), q.to.as_deref()).await?,
    ))
}

const XLSX: &str = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet";

/// Every table of the stats page, one sheet each, as an .xlsx workbook.
#[utoipa::path(get, path = "/api/v1/stats/export.xlsx", params(DuesQuery),
    responses((status = 200, description = "The workbook", content_type = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn export(
    State(state): State<AppState>,
    user: CurrentUser,
    Query(q): Query<DuesQuery>,
) -> Result<Response, AppError> {
    let s = subject(&state.db, &user.0, q.org.as_deref()).await?;
    let m = member_stats(&state.db, &s, &today()).await?;
    let o = org_stats(&state.db, &s).await?;
    let d = dues_stats(&state.db, &s, q.from.as_deref(), q.to.as_deref()).await?;
    let bytes = workbook(&m, &o, &d).map_err(|e| anyhow::anyhow!("writing xlsx: {e}"))?;
    let name = format!("党员统计-{}.xlsx", m.as_of);
    let mut resp = bytes.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(XLSX));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&content_disposition(&name)) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// The workbook: one sheet per table, a header row, then label and count (and totals).
pub fn workbook(
    m: &MemberStats,
    o: &OrgStats,
    d: &DuesStats,
) -> Result<Vec<u8>, rust_xlsxwriter::XlsxError> {
    use rust_xlsxwriter::{Format, Workbook};
    let mut wb = Workbook::new();
    let bold = Format::new().set_bold();
    let money = Format::new().set_num_format("0.00");
    let simple: [(&str, &str, &[Count]); 8] = [
        ("性别", "性别", &m.by_gender),
        ("年龄", "年龄段", &m.by_age),
        ("学历", "学历", &m.by_education),
        ("民族", "民族", &m.by_ethnicity),
        ("入党年份", "入党年份", &m.by_join_year),
        ("入党年代", "入党年代", &m.by_join_decade),
        ("党员类别", "类别", &m.by_category),
        ("组织类型", "组织类型", &o.by_kind),
    ];
    {
        let ws = wb.add_worksheet().set_name("按组织")?;
        ws.write_string_with_format(0, 0, "组织", &bold)?;
        ws.write_string_with_format(0, 1, "党员数", &bold)?;
        for (i, r) in m.by_org.iter().enumerate() {
            let row = i as u32 + 1;
            ws.write_string(row, 0, &r.name)?;
            ws.write_number(row, 1, r.count as f64)?;
        }
        let row = m.by_org.len() as u32 + 1;
        ws.write_string_with_format(row, 0, "合计", &bold)?;
        ws.write_number_with_format(row, 1, m.total as f64, &bold)?;
        ws.set_column_width(0, 30)?;
    }
    for (sheet, head, rows) in simple {
        let ws = wb.add_worksheet().set_name(sheet)?;
        ws.write_string_with_format(0, 0, head, &bold)?;
        ws.write_string_with_format(0, 1, "数量", &bold)?;
        for (i, r) in rows.iter().enumerate() {
            let row = i as u32 + 1;
            ws.write_string(row, 0, &r.label)?;
            ws.write_number(row, 1, r.count as f64)?;
        }
        let row = rows.len() as u32 + 1;
        ws.write_string_with_format(row, 0, "合计", &bold)?;
        ws.write_number_with_format(
            row,
            1,
            rows.iter().map(|r| r.count).sum::<i64>() as f64,
            &bold,
        )?;
        ws.set_column_width(0, 20)?;
    }
    {
        let ws = wb.add_worksheet().set_name("党费")?;
        for (c, h) in ["月份", "人数", "足额缴纳人数", "应缴(元)", "实缴(元)"]
            .iter()
            .enumerate()
        {
            ws.write_string_with_format(0, c as u16, *h, &bold)?;
        }
        for (i, r) in d.months.iter().enumerate() {
            let row = i as u32 + 1;
            ws.write_string(row, 0, &r.month)?;
            ws.write_number(row, 1, r.members as f64)?;
            ws.write_number(row, 2, r.paid_members as f64)?;
            ws.write_number_with_format(row, 3, r.due_fen as f64 / 100.0, &money)?;
            ws.write_number_with_format(row, 4, r.paid_fen as f64 / 100.0, &money)?;
        }
        let row = d.months.len() as u32 + 1;
        ws.write_string_with_format(row, 0, "合计", &bold)?;
        ws.write_number_with_format(row, 3, d.total_due_fen as f64 / 100.0, &money)?;
        ws.write_number_with_format(row, 4, d.total_paid_fen as f64 / 100.0, &money)?;
        ws.set_column_width(0, 12)?;
    }
    wb.save_to_buffer()
}

// ---------------------------------------------------------------------------------------------
// Page
// ---------------------------------------------------------------------------------------------

/// Width in the SVG of the longest bar.
const BAR_MAX: f64 = 220.0;

/// Rows for a table plus a bar chart: label, count, bar width.
fn chart(rows: impl Iterator<Item = (String, i64)>) -> minijinja::Value {
    let rows: Vec<(String, i64)> = rows.collect();
    let max = rows.iter().map(|(_, n)| *n).max().unwrap_or(0).max(1) as f64;
    let total: i64 = rows.iter().map(|(_, n)| n).sum();
    let items: Vec<_> = rows
        .iter()
        .enumerate()
        .map(|(i, (label, n))| {
            context! {
                label => label, short => short(label), count => n, y => i * 26,
                w => format!("{:.1}", *n as f64 / max * BAR_MAX), tx => format!("{:.1}", 136.0 + *n as f64 / max * BAR_MAX),
                pct => if total > 0 { format!("{:.1}%", *n as f64 * 100.0 / total as f64) } else { String::new() },
            }
        })
        .collect();
    context! { rows => items, total => total, height => rows.len() * 26 + 4 }
}

/// A label cut to fit beside the bars.
fn short(label: &str) -> String {
    if label.chars().count() > 9 {
        format!("{}…", label.chars().take(8).collect::<String>())
    } else {
        label.to_string()
    }
}

fn counts(c: &[Count]) -> minijinja::Value {
    chart(c.iter().map(|c| (c.label.clone(), c.count)))
}

fn yuan(fen: i64) -> String {
    format!("{}.{:02}", fen / 100, (fen % 100).abs())
}

#[derive(Debug, Default, Deserialize)]
struct PageQuery {
    org: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

async fn page(
    State(state): State<AppState>,
    headers: HeaderMap,
    MaybeUser(user): MaybeUser,
    Query(q): Query<PageQuery>,
) -> Result<Response, AppError> {
    let Some(user) = user else {
        return Ok(login_redirect("/stats"));
    };
    let s = subject(&state.db, &user, q.org.as_deref()).await?;
    let m = member_stats(&state.db, &s, &today()).await?;
    let o = org_stats(&state.db, &s).await?;
    let (d, error) = match dues_stats(&state.db, &s, q.from.as_deref(), q.to.as_deref()).await {
        Ok(d) => (d, None),
        Err(AppError::Unprocessable(msg)) => {
            (dues_stats(&state.db, &s, None, None).await?, Some(msg))
        }
        Err(e) => return Err(e),
    };
    let scope = Scope::of(&state.db, &user).await?;
    let all = scope.orgs(&state.db).await?;
    let base = all.first().map_or(0, |o| o.depth);
    let org_options: Vec<_> = all
        .iter()
        .map(|o| context! { id => o.id, name => format!("{}{}", "　".repeat(o.depth - base.min(o.depth)), o.name) })
        .collect();
    let due_max = d
        .months
        .iter()
        .map(|r| r.due_fen.max(r.paid_fen))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let dues_rows: Vec<_> = d
        .months
        .iter()
        .enumerate()
        .map(|(i, r)| {
            context! {
                month => r.month, members => r.members, paid_members => r.paid_members,
                due => yuan(r.due_fen), paid => yuan(r.paid_fen), owed => yuan(r.due_fen - r.paid_fen),
                y => i * 30, due_w => format!("{:.1}", r.due_fen as f64 / due_max * BAR_MAX),
                paid_w => format!("{:.1}", r.paid_fen as f64 / due_max * BAR_MAX),
                tx => format!("{:.1}", 136.0 + r.due_fen as f64 / due_max * BAR_MAX),
            }
        })
        .collect();
    let export = {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        if let Some(id) = &m.org_id {
            s.append_pair("org", id);
        }
        s.append_pair("from", &d.from);
        s.append_pair("to", &d.to);
        format!("/api/v1/stats/export.xlsx?{}", s.finish())
    };
    let ctx = context! {
        user => user, orgs => org_options, org => m.org_id, org_name => m.org_name, as_of => m.as_of,
        total => m.total, org_total => o.total, error => error, export => export,
        by_org => chart(m.by_org.iter().map(|r| (r.name.clone(), r.count))),
        by_gender => counts(&m.by_gender), by_age => counts(&m.by_age),
        by_education => counts(&m.by_education), by_ethnicity => counts(&m.by_ethnicity),
        by_join_decade => counts(&m.by_join_decade), by_join_year => counts(&m.by_join_year),
        by_category => counts(&m.by_category), by_kind => counts(&o.by_kind),
        dues => dues_rows, dues_height => d.months.len() * 30 + 4, from => d.from, to => d.to,
        total_due => yuan(d.total_due_fen), total_paid => yuan(d.total_paid_fen),
        total_owed => yuan(d.total_due_fen - d.total_paid_fen),
    };
    Ok(crate::pages::render_page(&state, &headers, "stats.html", ctx)?.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_off_dates_and_default_months() {
        assert_eq!(years_before("2026-11-30", 30), "1996-11-30");
        assert_eq!(years_before("2028-02-29", 30), "1998-02-29");
        assert_eq!(
            default_months("2026-03-15"),
            ("2025-04".to_string(), "2026-03".to_string())
        );
        assert_eq!(
            default_months("2026-12-01"),
            ("2026-01".to_string(), "2026-12".to_string())
        );
        assert!(clean_month("2026-13").is_err() && clean_month("2026-1").is_err());
        assert_eq!(yuan(12345), "123.45");
    }

    #[test]
    fn workbook_reads_back() {
        use calamine::{Reader, Xlsx};
        let c = |label: &str, count| Count {
            key: label.into(),
            label: label.into(),
            count,
        };
        let m = MemberStats {
            org_id: None,
            org_name: None,
            as_of: "2026-11-30".into(),
            total: 7,
            by_org: vec![OrgCount {
                org_id: "a".into(),
                name: "一支部".into(),
                own: false,
                count: 7,
            }],
            by_gender: vec![c("男", 4), c("女", 3)],
            by_age: vec![],
            by_education: vec![],
            by_ethnicity: vec![],
            by_join_year: vec![],
            by_join_decade: vec![],
            by_category: vec![],
        };
        let o = OrgStats {
            org_id: None,
            total: 0,
            by_kind: vec![],
        };
        let d = DuesStats {
            org_id: None,
            from: "2026-01".into(),
            to: "2026-02".into(),
            months: vec![DuesMonth {
                month: "2026-01".into(),
                members: 2,
                paid_members: 1,
                due_fen: 1050,
                paid_fen: 500,
            }],
            total_due_fen: 1050,
            total_paid_fen: 500,
        };
        let bytes = workbook(&m, &o, &d).unwrap();
        assert!(bytes.starts_with(b"PK"));
        let mut x: Xlsx<_> = Xlsx::new(std::io::Cursor::new(bytes)).unwrap();
        let g = x.worksheet_range("性别").unwrap();
        assert_eq!(g.get_value((1, 0)).unwrap().to_string(), "男");
        assert_eq!(g.get_value((1, 1)).unwrap().to_string(), "4");
        assert_eq!(g.get_value((3, 1)).unwrap().to_string(), "7");
        let dues = x.worksheet_range("党费").unwrap();
        assert_eq!(dues.get_value((1, 3)).unwrap().to_string(), "10.5");
    }
}
