//! Party dues (党费): the branch secretary enters each month's sheet in one go, and everyone who
//! keeps members reads the sheet, the arrears and the totals of their subtree.
//!
//! Amounts are integer fen (0.01 yuan) in `due_fen` / `paid_fen`; the same entry may instead give
//! yuan as a decimal string in `due_yuan` / `paid_yuan` (`"12.50"`, at most two decimals) — one
//! of the two per amount, never both. Amounts are non-negative and at most
//! [`MAX_MONTH_FEN`] a month; paying more than due is allowed (voluntary extra dues, 自愿多交),
//! and an extra payment in one month does not cancel another month's arrears.
//!
//! Scoping: the org in the path must be in the caller's subtree (else 404), and every member of
//! an entry must be in that org's subtree (else 404 naming them, and nothing is saved). A row
//! keeps the member's org at the time it was (last) entered, so the totals follow the tree as it
//! was; the sheet and the arrears follow the members where they are now.
//!
//! All of it needs [`Permission::ManageMembers`]: dues are personal data.

use std::collections::{HashMap, HashSet};

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use minijinja::context;
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;

use crate::AppState;
use crate::auth::{self, CurrentUser, MaybeUser, Permission, User};
use crate::db::{Db, now_ms};
use crate::error::{ApiJson, AppError, ErrorBody};
use crate::orgs::{Org, Scope, like_escape};

/// The most one member's due or payment for one month may be: 100 000 yuan.
pub const MAX_MONTH_FEN: i64 = 10_000_000;
/// The most entries one sheet may carry.
pub const MAX_ENTRIES: usize = 5000;
/// The longest range of months the reports cover.
pub const MAX_RANGE_MONTHS: i64 = 120;
/// Months are Beijing time.
const UTC_OFFSET_SECS: i32 = 8 * 3600;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/orgs/{id}/dues/arrears", get(arrears))
        .route("/api/v1/orgs/{id}/dues/totals", get(totals))
        .route(
            "/api/v1/orgs/{id}/dues/{month}",
            get(get_sheet).put(put_sheet),
        )
        .route("/dues", get(page).post(page_submit))
}

#[derive(OpenApi)]
#[openapi(paths(get_sheet, put_sheet, arrears, totals))]
pub struct DuesApi;

// ---------------------------------------------------------------------------------------------
// Months and money
// ---------------------------------------------------------------------------------------------

/// `YYYY-MM` (years 1900 to 2999), or 422.
pub fn parse_month(s: &str) -> Result<String, AppError> {
    let s = s.trim();
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| {
        b[r.clone()]
            .iter()
            .all(u8::is_ascii_digit)
            .then(|| s[r].parse::<u32>().ok())
            .flatten()
    };
    let ok = b.len() == 7
        && b[4] == b'-'
        && digits(0..4).is_some_and(|y| (1900..=2999).contains(&y))
        && digits(5..7).is_some_and(|m| (1..=12).contains(&m));
    if ok {
        Ok(s.to_string())
    } else {
        Err(AppError::Unprocessable(format!(
            "月份须为 YYYY-MM 格式，例如 2026-01 (bad month `{s}`)"
        )))
    }
}

/// The month `YYYY-MM` as a number of months since year 0, for range checks.
fn month_index(m: &str) -> i64 {
    let y: i64 = m[..4].parse().unwrap_or(0);
    let mo: i64 = m[5..].parse().unwrap_or(1);
    y * 12 + mo - 1
}

/// This month, Beijing time.
pub fn current_month() -> String {
    let offset = chrono::FixedOffset::east_opt(UTC_OFFSET_SECS).expect("a valid offset");
    chrono::Utc::now()
        .with_timezone(&offset)
        .format("%Y-%m")
        .to_string()
}

/// `from`..=`to`, by default January of this year to this month.
fn month_range(from: Option<&str>, to: Option<&str>) -> Result<(String, String), AppError> {
    fn nonempty(s: Option<&str>) -> Option<&str> {
        s.map(str::trim).filter(|s| !s.is_empty())
    }
    let to = match nonempty(to) {
        Some(t) => parse_month(t)?,
        None => current_month(),
    };
    let from = match nonempty(from) {
        Some(f) => parse_month(f)?,
        None => format!("{}-01", &to[..4]),
    };
    if from > to {
        return Err(AppError::Unprocessable(
            "起始月份不能晚于结束月份 (from is after to)".into(),
        ));
    }
    if month_index(&to) - month_index(&from) >= MAX_RANGE_MONTHS {
        return Err(AppError::Unprocessable(format!(
            "查询范围最多 {MAX_RANGE_MONTHS} 个月 (range too long)"
        )));
    }
    Ok((from, to))
}

/// `"12.50"` yuan as fen; at most two decimals, no sign.
pub fn parse_yuan(s: &str) -> Option<i64> {
    let s = s.trim();
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty()
        || int.len() > 9
        || frac.len() > 2
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || (s.contains('.') && frac.is_empty())
    {
        return None;
    }
    let int: i64 = int.parse().ok()?;
    let frac: i64 = format!("{frac:0<2}").parse().ok()?;
    Some(int * 100 + frac)
}

/// Fen as `12.50`.
pub fn yuan(fen: i64) -> String {
    let sign = if fen < 0 { "-" } else { "" };
    let f = fen.unsigned_abs();
    format!("{sign}{}.{:02}", f / 100, f % 100)
}

fn valid_day(s: &str) -> bool {
    s.len() == 10 && chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok()
}

// ---------------------------------------------------------------------------------------------
// Entry
// ---------------------------------------------------------------------------------------------

/// One member's dues for the month. Give the due as `due_fen` or `due_yuan`, the payment (0
/// when left out) as `paid_fen` or `paid_yuan`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct DuesEntry {
    pub member_id: String,
    #[serde(default)]
    pub due_fen: Option<i64>,
    /// Yuan as a decimal string, e.g. `"12.50"`.
    #[serde(default)]
    pub due_yuan: Option<String>,
    #[serde(default)]
    pub paid_fen: Option<i64>,
    #[serde(default)]
    pub paid_yuan: Option<String>,
    /// `YYYY-MM-DD`.
    #[serde(default)]
    pub paid_on: Option<String>,
}

struct CleanEntry {
    member_id: String,
    due: i64,
    paid: i64,
    paid_on: Option<String>,
}

fn amount(fen: Option<i64>, yuan: Option<&str>, what: &str, required: bool) -> Result<i64, String> {
    let yuan = yuan.map(str::trim).filter(|s| !s.is_empty());
    let v = match (fen, yuan) {
        (Some(_), Some(_)) => return Err(format!("{what}只能给出分或元之一")),
        (Some(f), None) => f,
        (None, Some(y)) => parse_yuan(y).ok_or_else(|| format!("{what}“{y}”不是有效金额"))?,
        (None, None) if required => return Err(format!("缺少{what}")),
        (None, None) => 0,
    };
    if v < 0 {
        return Err(format!("{what}不能为负数"));
    }
    if v > MAX_MONTH_FEN {
        return Err(format!(
            "{what}超过每月上限 {} 元",
            yuan_plain(MAX_MONTH_FEN)
        ));
    }
    Ok(v)
}

fn yuan_plain(fen: i64) -> String {
    (fen / 100).to_string()
}

fn clean_entries(entries: &[DuesEntry]) -> Result<Vec<CleanEntry>, AppError> {
    if entries.len() > MAX_ENTRIES {
        return Err(AppError::Unprocessable(format!(
            "一次最多录入 {MAX_ENTRIES} 条 (too many entries)"
        )));
    }
    let mut seen = HashSet::new();
    let mut problems = Vec::new();
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let id = e.member_id.trim();
        let mut bad = |m: String| problems.push(format!("{id}: {m}"));
        if id.is_empty() {
            problems.push("有一条记录缺少 member_id".to_string());
            continue;
        }
        if !seen.insert(id.to_string()) {
            bad("重复出现".into());
            continue;
        }
        let due = amount(e.due_fen, e.due_yuan.as_deref(), "应交金额", true);
        let paid = amount(e.paid_fen, e.paid_yuan.as_deref(), "实交金额", false);
        let paid_on = e
            .paid_on
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty());
        if let Some(d) = paid_on
            && !valid_day(d)
        {
            bad(format!("交纳日期“{d}”须为 YYYY-MM-DD"));
            continue;
        }
        match (due, paid) {
            (Ok(due), Ok(paid)) => out.push(CleanEntry {
                member_id: id.to_string(),
                due,
                paid,
                paid_on: paid_on.map(str::to_string),
            }),
            (Err(m), _) | (_, Err(m)) => bad(m),
        }
    }
    if !problems.is_empty() {
        problems.truncate(20);
        return Err(AppError::Unprocessable(format!(
            "党费记录有误，未保存：{}",
            problems.join("；")
        )));
    }
    Ok(out)
}

/// Why a sheet was not saved.
pub enum SaveError {
    /// These members are not in the org's subtree (or do not exist).
    UnknownMembers(Vec<String>),
    Other(AppError),
}

impl<E: Into<AppError>> From<E> for SaveError {
    fn from(e: E) -> Self {
        SaveError::Other(e.into())
    }
}

impl SaveError {
    fn message(ids: &[String]) -> String {
        let shown: Vec<&str> = ids.iter().take(20).map(String::as_str).collect();
        format!(
            "以下党员不在该组织，未保存任何记录 (members not in this org; nothing saved): {}",
            shown.join(", ")
        )
    }

    fn into_response(self) -> Response {
        match self {
            SaveError::UnknownMembers(ids) => (
                StatusCode::NOT_FOUND,
                Json(ErrorBody {
                    error: "not_found",
                    message: Self::message(&ids),
                }),
            )
                .into_response(),
            SaveError::Other(e) => e.into_response(),
        }
    }
}

fn subtree_like(org: &Org) -> String {
    format!("{}%", like_escape(&org.path))
}

/// Upserts the month's rows for `org`'s subtree, all or nothing; returns how many.
pub async fn save_month(
    db: &Db,
    org: &Org,
    me: &User,
    month: &str,
    entries: &[DuesEntry],
) -> Result<usize, SaveError> {
    let entries = clean_entries(entries)?;
    // Each member's current org, for those in the subtree.
    let mut org_of: HashMap<String, String> = HashMap::new();
    for chunk in entries.chunks(500) {
        let marks: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
        let sql = format!(
            "SELECT m.id, m.org_id FROM members m JOIN orgs o ON o.id = m.org_id \
             WHERE o.path LIKE $1 ESCAPE '\\' AND m.id IN ({})",
            marks.join(", ")
        );
        let mut q = sqlx::query_as::<_, (String, String)>(&sql).bind(subtree_like(org));
        for e in chunk {
            q = q.bind(&e.member_id);
        }
        org_of.extend(q.fetch_all(&db.pool).await?);
    }
    let unknown: Vec<String> = entries
        .iter()
        .filter(|e| !org_of.contains_key(&e.member_id))
        .map(|e| e.member_id.clone())
        .collect();
    if !unknown.is_empty() {
        return Err(SaveError::UnknownMembers(unknown));
    }
    let now = now_ms();
    let mut tx = db.pool.begin().await?;
    for e in &entries {
        sqlx::query(
            "INSERT INTO dues (member_id, month, org_id, due_fen, paid_fen, paid_on, updated_by, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (member_id, month) DO UPDATE SET org_id = excluded.org_id, \
             due_fen = excluded.due_fen, paid_fen = excluded.paid_fen, paid_on = excluded.paid_on, \
             updated_by = excluded.updated_by, updated_at = excluded.updated_at",
        )
        .bind(&e.member_id)
        .bind(month)
        .bind(&org_of[&e.member_id])
        .bind(e.due)
        .bind(e.paid)
        .bind(e.paid_on.clone())
        .bind(Some(me.id.clone()))
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    auth::audit(
        db,
        Some(&me.id),
        "dues_entry",
        &org.id,
        &format!("month={month} rows={}", entries.len()),
    )
    .await?;
    Ok(entries.len())
}

// ---------------------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------------------

/// One member's line of the month's sheet (no row entered yet: the amounts are null).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SheetRow {
    pub member_id: String,
    pub name: String,
    pub org_id: String,
    pub org_name: String,
    pub status: String,
    pub due_fen: Option<i64>,
    pub paid_fen: Option<i64>,
    pub paid_on: Option<String>,
    /// `due - paid` when positive, else 0; null without a row.
    pub owed_fen: Option<i64>,
}

/// The month's sheet: every normal member of the org's subtree, plus anyone else who has a row
/// for the month.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DuesSheet {
    pub org_id: String,
    pub month: String,
    pub rows: Vec<SheetRow>,
    pub due_fen: i64,
    pub paid_fen: i64,
    pub owed_fen: i64,
    /// Members with a row for the month.
    pub members_entered: usize,
    /// …of whom paid at least what was due.
    pub members_paid: usize,
    /// …of whom paid less.
    pub members_unpaid: usize,
}

type SheetTuple = (
    String,
    String,
    String,
    String,
    String,
    Option<i64>,
    Option<i64>,
    Option<String>,
);

pub async fn sheet(db: &Db, org: &Org, month: &str) -> Result<DuesSheet, AppError> {
    let rows: Vec<SheetTuple> = sqlx::query_as(
        "SELECT m.id, m.name, m.org_id, o.name, m.status, d.due_fen, d.paid_fen, d.paid_on \
         FROM members m JOIN orgs o ON o.id = m.org_id \
         LEFT JOIN dues d ON d.member_id = m.id AND d.month = $2 \
         WHERE o.path LIKE $1 ESCAPE '\\' AND (m.status = 'normal' OR d.member_id IS NOT NULL) \
         ORDER BY o.path, m.name, m.id",
    )
    .bind(subtree_like(org))
    .bind(month)
    .fetch_all(&db.pool)
    .await?;
    let mut s = DuesSheet {
        org_id: org.id.clone(),
        month: month.to_string(),
        rows: Vec::with_capacity(rows.len()),
        due_fen: 0,
        paid_fen: 0,
        owed_fen: 0,
        members_entered: 0,
        members_paid: 0,
        members_unpaid: 0,
    };
    for (member_id, name, org_id, org_name, status, due, paid, paid_on) in rows {
        let owed = match (due, paid) {
            (Some(d), Some(p)) => Some((d - p).max(0)),
            _ => None,
        };
        if let (Some(d), Some(p), Some(o)) = (due, paid, owed) {
            s.due_fen += d;
            s.paid_fen += p;
            s.owed_fen += o;
            s.members_entered += 1;
            if o > 0 {
                s.members_unpaid += 1;
            } else {
                s.members_paid += 1;
            }
        }
        s.rows.push(SheetRow {
            member_id,
            name,
            org_id,
            org_name,
            status,
            due_fen: due,
            paid_fen: paid,
            paid_on,
            owed_fen: owed,
        });
    }
    Ok(s)
}

/// A member who paid less than due in some months of the range.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MemberArrears {
    pub member_id: String,
    pub name: String,
    pub org_id: String,
    pub org_name: String,
    pub status: String,
    /// Sum over those months of `due - paid`.
    pub owed_fen: i64,
    /// The months short, oldest first.
    pub months: Vec<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ArrearsReport {
    pub org_id: String,
    pub from: String,
    pub to: String,
    /// Most owed first.
    pub members: Vec<MemberArrears>,
    pub total_owed_fen: i64,
}

type ArrearsTuple = (String, String, String, String, String, String, i64, i64);

/// Members now in `org`'s subtree with entered months where due > paid. Months without a row
/// are not counted (nothing says what was due).
pub async fn arrears_of(
    db: &Db,
    org: &Org,
    from: &str,
    to: &str,
) -> Result<ArrearsReport, AppError> {
    let rows: Vec<ArrearsTuple> = sqlx::query_as(
        "SELECT m.id, m.name, m.org_id, o.name, m.status, d.month, d.due_fen, d.paid_fen \
         FROM dues d JOIN members m ON m.id = d.member_id JOIN orgs o ON o.id = m.org_id \
         WHERE o.path LIKE $1 ESCAPE '\\' AND d.month >= $2 AND d.month <= $3 \
         AND d.due_fen > d.paid_fen ORDER BY m.id, d.month",
    )
    .bind(subtree_like(org))
    .bind(from)
    .bind(to)
    .fetch_all(&db.pool)
    .await?;
    let mut members: Vec<MemberArrears> = Vec::new();
    for (member_id, name, org_id, org_name, status, month, due, paid) in rows {
        match members.last_mut() {
            Some(m) if m.member_id == member_id => {
                m.owed_fen += due - paid;
                m.months.push(month);
            }
            _ => members.push(MemberArrears {
                member_id,
                name,
                org_id,
                org_name,
                status,
                owed_fen: due - paid,
                months: vec![month],
            }),
        }
    }
    members.sort_by(|a, b| b.owed_fen.cmp(&a.owed_fen).then(a.name.cmp(&b.name)));
    Ok(ArrearsReport {
        org_id: org.id.clone(),
        from: from.into(),
        to: to.into(),
        total_owed_fen: members.iter().map(|m| m.owed_fen).sum(),
        members,
    })
}

/// Sums over rows of `dues`. The member counts count rows (member-months): for one month,
/// members.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Figures {
    pub due_fen: i64,
    pub paid_fen: i64,
    /// Rows paid in full (paid ≥ due).
    pub members_paid: i64,
    /// Rows paid short (paid < due).
    pub members_unpaid: i64,
}

impl Figures {
    fn add(&mut self, o: &Figures) {
        self.due_fen += o.due_fen;
        self.paid_fen += o.paid_fen;
        self.members_paid += o.members_paid;
        self.members_unpaid += o.members_unpaid;
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MonthFigures {
    pub month: String,
    #[serde(flatten)]
    pub figures: Figures,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct OrgFigures {
    pub org_id: String,
    pub name: String,
    pub parent_id: Option<String>,
    /// Depth below the report's org (0 for itself).
    pub depth: usize,
    /// Rows kept by this org itself (members who were in it when the dues were entered).
    pub own: Figures,
    /// This org and every org below it.
    pub subtree: Figures,
    /// `own`, month by month (months without rows left out).
    pub months: Vec<MonthFigures>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TotalsReport {
    pub org_id: String,
    pub from: String,
    pub to: String,
    pub total: Figures,
    /// The whole subtree, month by month.
    pub months: Vec<MonthFigures>,
    /// Every org of the subtree, parents before children.
    pub orgs: Vec<OrgFigures>,
}

pub async fn totals_of(db: &Db, org: &Org, from: &str, to: &str) -> Result<TotalsReport, AppError> {
    let like = subtree_like(org);
    let orgs: Vec<(String, Option<String>, String, String)> = sqlx::query_as(
        "SELECT id, parent_id, path, name FROM orgs WHERE path LIKE $1 ESCAPE '\\' ORDER BY path",
    )
    .bind(&like)
    .fetch_all(&db.pool)
    .await?;
    let rows: Vec<(String, String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT d.org_id, d.month, CAST(SUM(d.due_fen) AS BIGINT), CAST(SUM(d.paid_fen) AS BIGINT), \
         CAST(SUM(CASE WHEN d.paid_fen >= d.due_fen THEN 1 ELSE 0 END) AS BIGINT), \
         CAST(SUM(CASE WHEN d.paid_fen < d.due_fen THEN 1 ELSE 0 END) AS BIGINT) \
         FROM dues d JOIN orgs o ON o.id = d.org_id \
         WHERE o.path LIKE $1 ESCAPE '\\' AND d.month >= $2 AND d.month <= $3 \
         GROUP BY d.org_id, d.month ORDER BY d.month",
    )
    .bind(&like)
    .bind(from)
    .bind(to)
    .fetch_all(&db.pool)
    .await?;
    let mut own: HashMap<&str, (Figures, Vec<MonthFigures>)> = HashMap::new();
    let mut by_month: Vec<MonthFigures> = Vec::new();
    let mut total = Figures::default();
    for (org_id, month, due, paid, n_paid, n_unpaid) in &rows {
        let f = Figures {
            due_fen: *due,
            paid_fen: *paid,
            members_paid: *n_paid,
            members_unpaid: *n_unpaid,
        };
        total.add(&f);
        match by_month.last_mut() {
            Some(m) if &m.month == month => m.figures.add(&f),
            _ => by_month.push(MonthFigures {
                month: month.clone(),
                figures: f,
            }),
        }
        let e = own.entry(org_id.as_str()).or_default();
        e.0.add(&f);
        e.1.push(MonthFigures {
            month: month.clone(),
            figures: f,
        });
    }
    let base_depth = org.path.matches('/').count();
    let mut out = Vec::with_capacity(orgs.len());
    for (id, parent_id, path, name) in &orgs {
        let mut subtree = Figures::default();
        for (other, _, other_path, _) in &orgs {
            if other_path.starts_with(path.as_str())
                && let Some((f, _)) = own.get(other.as_str())
            {
                subtree.add(f);
            }
        }
        let (own_f, months) = own.remove(id.as_str()).unwrap_or_default();
        out.push(OrgFigures {
            org_id: id.clone(),
            name: name.clone(),
            parent_id: parent_id.clone(),
            depth: path.matches('/').count().saturating_sub(base_depth),
            own: own_f,
            subtree,
            months,
        });
    }
    Ok(TotalsReport {
        org_id: org.id.clone(),
        from: from.into(),
        to: to.into(),
        total,
        months: by_month,
        orgs: out,
    })
}

// ---------------------------------------------------------------------------------------------
// REST
// ---------------------------------------------------------------------------------------------

async fn keeper_org(
    state: &AppState,
    user: &CurrentUser,
    id: &str,
) -> Result<(User, Org), AppError> {
    let me = user.require(Permission::ManageMembers)?.clone();
    let scope = Scope::of(&state.db, &me).await?;
    let org = scope.org(&state.db, id).await?;
    Ok((me, org))
}

/// The month's sheet of an org's subtree.
#[utoipa::path(get, path = "/api/v1/orgs/{id}/dues/{month}",
    params(("id" = String, Path), ("month" = String, Path, description = "YYYY-MM")),
    responses((status = 200, body = DuesSheet), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn get_sheet(
    State(state): State<AppState>,
    user: CurrentUser,
    Path((id, month)): Path<(String, String)>,
) -> Result<Json<DuesSheet>, AppError> {
    let (_, org) = keeper_org(&state, &user, &id).await?;
    let month = parse_month(&month)?;
    Ok(Json(sheet(&state.db, &org, &month).await?))
}

/// Enter the month's dues for members of the org's subtree (upsert per member and month; all or
/// nothing). Answers with the month's sheet.
#[utoipa::path(put, path = "/api/v1/orgs/{id}/dues/{month}",
    params(("id" = String, Path), ("month" = String, Path, description = "YYYY-MM")),
    request_body = [DuesEntry],
    responses((status = 200, body = DuesSheet), (status = 403, body = ErrorBody),
        (status = 404, description = "The org, or some members (named), not in the caller's subtree; nothing saved", body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub(crate) async fn put_sheet(
    State(state): State<AppState>,
    user: CurrentUser,
    Path((id, month)): Path<(String, String)>,
    ApiJson(entries): ApiJson<Vec<DuesEntry>>,
) -> Result<Response, AppError> {
    let (me, org) = keeper_org(&state, &user, &id).await?;
    let month = parse_month(&month)?;
    if let Err(e) = save_month(&state.db, &org, &me, &month, &entries).await {
        return Ok(e.into_response());
    }
    Ok(Json(sheet(&state.db, &org, &month).await?).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RangeQuery {
    /// `YYYY-MM`; default January of `to`'s year.
    pub from: Option<String>,
    /// `YYYY-MM`; default this month.
    pub to: Option<String>,
}

/// Members of the org's subtree who paid less than due, with the amount owed each and in all.
#[utoipa::path(get, path = "/api/v1/orgs/{id}/dues/arrears", params(("id" = String, Path), RangeQuery),
    responses((status = 200, body = ArrearsReport), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn arrears(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    Query(q): Query<RangeQuery>,
) -> Result<Json<ArrearsReport>, AppError> {
    let (_, org) = keeper_org(&state, &user, &id).await?;
    let (from, to) = month_range(q.from.as_deref(), q.to.as_deref())?;
    Ok(Json(arrears_of(&state.db, &org, &from, &to).await?))
}

/// Due and paid per org of the subtree and per month.
#[utoipa::path(get, path = "/api/v1/orgs/{id}/dues/totals", params(("id" = String, Path), RangeQuery),
    responses((status = 200, body = TotalsReport), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn totals(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    Query(q): Query<RangeQuery>,
) -> Result<Json<TotalsReport>, AppError> {
    let (_, org) = keeper_org(&state, &user, &id).await?;
    let (from, to) = month_range(q.from.as_deref(), q.to.as_deref())?;
    Ok(Json(totals_of(&state.db, &org, &from, &to).await?))
}

// ---------------------------------------------------------------------------------------------
// Page
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
struct PageQuery {
    org: Option<String>,
    month: Option<String>,
    from: Option<String>,
    to: Option<String>,
    saved: Option<usize>,
}

fn login_redirect(next: &str) -> Response {
    let next: String = url::form_urlencoded::byte_serialize(next.as_bytes()).collect();
    Redirect::to(&format!("/login?next={next}")).into_response()
}

fn opt_yuan(fen: Option<i64>) -> String {
    fen.map(yuan).unwrap_or_default()
}

async fn render(
    state: &AppState,
    headers: &HeaderMap,
    user: &User,
    q: PageQuery,
    status: StatusCode,
    error: Option<String>,
) -> Result<Response, AppError> {
    let scope = Scope::of(&state.db, user).await?;
    let orgs = scope.orgs(&state.db).await?;
    let chosen = q
        .org
        .as_deref()
        .filter(|s| !s.is_empty())
        .or(scope.root.as_deref())
        .or(orgs.first().map(|o| o.id.as_str()))
        .map(str::to_string);
    let month = q
        .month
        .as_deref()
        .and_then(|m| parse_month(m).ok())
        .unwrap_or_else(current_month);
    let (from, to) = month_range(q.from.as_deref(), q.to.as_deref().or(Some(&month)))
        .unwrap_or_else(|_| (format!("{}-01", &month[..4]), month.clone()));
    let org_options: Vec<_> = orgs
        .iter()
        .map(|o| context! { id => o.id, label => format!("{}{}", "　".repeat(o.depth.saturating_sub(orgs[0].depth)), o.name) })
        .collect();
    let mut ctx = context! {
        user => user, error => error, orgs => org_options, month => month, from => from, to => to,
        saved => q.saved, org_id => chosen,
    };
    if let Some(org_id) = &chosen {
        let org = scope.org(&state.db, org_id).await?;
        let s = sheet(&state.db, &org, &month).await?;
        let rows: Vec<_> = s
            .rows
            .iter()
            .map(|r| {
                context! {
                    id => r.member_id, name => r.name, org => r.org_name,
                    other_status => (r.status != "normal").then_some(r.status.clone()),
                    due => opt_yuan(r.due_fen), paid => opt_yuan(r.paid_fen),
                    paid_on => r.paid_on.clone().unwrap_or_default(),
                    owed => r.owed_fen.filter(|o| *o > 0).map(yuan),
                }
            })
            .collect();
        let a = arrears_of(&state.db, &org, &from, &to).await?;
        let arrears: Vec<_> = a
            .members
            .iter()
            .map(|m| context! { name => m.name, org => m.org_name, owed => yuan(m.owed_fen), months => m.months.join("、") })
            .collect();
        let t = totals_of(&state.db, &org, &from, &to).await?;
        let fig = |f: &Figures| {
            context! {
                due => yuan(f.due_fen), paid => yuan(f.paid_fen),
                n_paid => f.members_paid, n_unpaid => f.members_unpaid,
            }
        };
        let by_org: Vec<_> = t
            .orgs
            .iter()
            .map(|o| context! { name => format!("{}{}", "　".repeat(o.depth), o.name), f => fig(&o.subtree) })
            .collect();
        let by_month: Vec<_> = t
            .months
            .iter()
            .map(|m| context! { month => m.month, f => fig(&m.figures) })
            .collect();
        ctx = context! {
            org_name => org.name, rows => rows,
            sheet_due => yuan(s.due_fen), sheet_paid => yuan(s.paid_fen), sheet_owed => yuan(s.owed_fen),
            entered => s.members_entered, arrears => arrears, arrears_total => yuan(a.total_owed_fen),
            by_org => by_org, by_month => by_month, total => fig(&t.total),
            ..ctx
        };
    }
    let mut resp = crate::pages::render_page(state, headers, "dues.html", ctx)?.into_response();
    *resp.status_mut() = status;
    Ok(resp)
}

async fn page(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    MaybeUser(user): MaybeUser,
    Query(q): Query<PageQuery>,
) -> Result<Response, AppError> {
    let Some(user) = user else {
        return Ok(login_redirect(uri.path()));
    };
    if !user.role.allows(Permission::ManageMembers) {
        let ctx = context! { user => user, denied => "只有组织管理员和支部书记可以管理党费。" };
        let mut resp =
            crate::pages::render_page(&state, &headers, "dues.html", ctx)?.into_response();
        *resp.status_mut() = StatusCode::FORBIDDEN;
        return Ok(resp);
    }
    match render(&state, &headers, &user, q, StatusCode::OK, None).await {
        Err(AppError::NotFound) => Ok(crate::pages::not_found(State(state), uri, headers).await),
        other => other,
    }
}

/// The page's entries: fields `due.{member}`, `paid.{member}` and `paid_on.{member}` in yuan; a
/// member whose due and payment are both blank is left as it is.
fn form_entries(fields: &[(String, String)]) -> Vec<DuesEntry> {
    let mut order: Vec<String> = Vec::new();
    let mut by_id: HashMap<String, DuesEntry> = HashMap::new();
    for (k, v) in fields {
        let Some((field, id)) = k.split_once('.') else {
            continue;
        };
        if !matches!(field, "due" | "paid" | "paid_on") || id.is_empty() {
            continue;
        }
        let e = by_id.entry(id.to_string()).or_insert_with(|| {
            order.push(id.to_string());
            DuesEntry {
                member_id: id.to_string(),
                ..DuesEntry::default()
            }
        });
        let v = Some(v.trim().to_string()).filter(|v| !v.is_empty());
        match field {
            "due" => e.due_yuan = v,
            "paid" => e.paid_yuan = v,
            _ => e.paid_on = v,
        }
    }
    order
        .into_iter()
        .filter_map(|id| by_id.remove(&id))
        .filter(|e| e.due_yuan.is_some() || e.paid_yuan.is_some())
        .collect()
}

async fn page_submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    user: CurrentUser,
    Form(fields): Form<Vec<(String, String)>>,
) -> Result<Response, AppError> {
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    if !auth::csrf_ok(&headers, &field("csrf")) {
        return Err(AppError::Forbidden(
            "页面已过期，请刷新后重试。(form expired)".into(),
        ));
    }
    let org_id = field("org");
    let (me, org) = match keeper_org(&state, &user, &org_id).await {
        Err(AppError::NotFound) => {
            return Ok(crate::pages::not_found(State(state), uri, headers).await);
        }
        other => other?,
    };
    let q = PageQuery {
        org: Some(org.id.clone()),
        month: Some(field("month")),
        ..PageQuery::default()
    };
    let month = match parse_month(&field("month")) {
        Ok(m) => m,
        Err(e) => return render(&state, &headers, &me, q, e.status(), Some(e.to_string())).await,
    };
    let entries = form_entries(&fields);
    match save_month(&state.db, &org, &me, &month, &entries).await {
        Ok(n) => {
            let mut s = url::form_urlencoded::Serializer::new(String::new());
            s.append_pair("org", &org.id)
                .append_pair("month", &month)
                .append_pair("saved", &n.to_string());
            Ok(Redirect::to(&format!("/dues?{}", s.finish())).into_response())
        }
        Err(SaveError::UnknownMembers(ids)) => {
            let m = SaveError::message(&ids);
            render(&state, &headers, &me, q, StatusCode::NOT_FOUND, Some(m)).await
        }
        Err(SaveError::Other(e @ AppError::Unprocessable(_))) => {
            render(&state, &headers, &me, q, e.status(), Some(e.to_string())).await
        }
        Err(SaveError::Other(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_checked() {
        assert_eq!(parse_month("2026-01").unwrap(), "2026-01");
        for bad in [
            "2026-13", "2026-00", "2026-1", "26-01", "2026/01", "abcd-ef", "",
        ] {
            assert!(parse_month(bad).is_err(), "{bad}");
        }
        assert_eq!(month_index("2026-01") - month_index("2025-12"), 1);
        let (f, t) = month_range(Some("2025-11"), Some("2026-02")).unwrap();
        assert_eq!((f.as_str(), t.as_str()), ("2025-11", "2026-02"));
        assert_eq!(month_range(None, Some("2026-05")).unwrap().0, "2026-01");
        assert!(month_range(Some("2026-03"), Some("2026-02")).is_err());
    }

    #[test]
    fn yuan_strings_become_fen() {
        assert_eq!(parse_yuan("12.50"), Some(1250));
        assert_eq!(parse_yuan("12.5"), Some(1250));
        assert_eq!(parse_yuan(" 3 "), Some(300));
        assert_eq!(parse_yuan("0.07"), Some(7));
        for bad in ["", "-1", "1.234", "1.", ".5", "1e3", "一元", "1,000"] {
            assert_eq!(parse_yuan(bad), None, "{bad}");
        }
        assert_eq!(yuan(1250), "12.50");
        assert_eq!(yuan(7), "0.07");
    }

    #[test]
    fn entries_are_validated_together() {
        let e = |id: &str, due: Option<i64>, yuan: Option<&str>, paid: Option<i64>| DuesEntry {
            member_id: id.into(),
            due_fen: due,
            due_yuan: yuan.map(str::to_string),
            paid_fen: paid,
            ..DuesEntry::default()
        };
        let ok = clean_entries(&[
            e("a", Some(100), None, None),
            e("b", None, Some("2.5"), Some(300)),
        ])
        .unwrap();
        assert_eq!((ok[0].due, ok[0].paid), (100, 0));
        assert_eq!(
            (ok[1].due, ok[1].paid),
            (250, 300),
            "paying extra is allowed"
        );
        for bad in [
            vec![e("a", Some(-1), None, None)],
            vec![e("a", None, None, Some(1))],
            vec![e("a", Some(1), Some("1"), None)],
            vec![e("a", Some(MAX_MONTH_FEN + 1), None, None)],
            vec![e("a", Some(1), None, None), e("a", Some(2), None, None)],
        ] {
            assert!(clean_entries(&bad).is_err());
        }
    }

    #[test]
    fn the_page_form_maps_to_entries() {
        let f = |k: &str, v: &str| (k.to_string(), v.to_string());
        let got = form_entries(&[
            f("csrf", "x"),
            f("due.m1", "12.00"),
            f("paid.m1", "12"),
            f("paid_on.m1", "2026-01-05"),
            f("due.m2", ""),
            f("paid.m2", ""),
            f("paid_on.m2", ""),
        ]);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].member_id, "m1");
        assert_eq!(got[0].paid_on.as_deref(), Some("2026-01-05"));
    }

    #[test]
    fn the_openapi_part_documents_every_dues_endpoint() {
        let doc = DuesApi::openapi();
        for p in [
            "/api/v1/orgs/{id}/dues/{month}",
            "/api/v1/orgs/{id}/dues/arrears",
            "/api/v1/orgs/{id}/dues/totals",
        ] {
            assert!(doc.paths.paths.contains_key(p), "{p}");
        }
    }
}
