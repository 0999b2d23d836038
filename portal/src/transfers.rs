//! Membership changes (党籍管理): transfers between orgs of the system (the receiving org accepts
//! or rejects), transfers out of the system (with the letter number), arrivals from outside, and
//! immediate moves between branches of one's own subtree. Every change is written to
//! `member_transfers` (the member's history) and to the audit log.
//!
//! Kinds and who may do what (all need [`Permission::ManageMembers`]):
//!
//! - `internal`: the member must be in the caller's subtree; the receiving org may be any branch or
//!   group of the whole system except the member's own. The transfer waits (`pending`) and the
//!   member stays where they are until a keeper of the RECEIVING org accepts (the member moves,
//!   `accepted`) or rejects (`rejected`, the reason recorded). The sending side may withdraw a
//!   pending request, recorded as `rejected` with the reason `[撤回] …`. Deciding twice is 409.
//! - `out`: out of the system, `outside_org` and `letter_no` required; immediately `done`, the
//!   member's status becomes `transferred_out` and the record and history are kept.
//! - `in`: an arrival from outside the system. The member record must exist already (created
//!   through the members API, which checks the ID number and the rest) in the caller's subtree;
//!   the transfer records where they came from (`outside_org`, `letter_no`), optionally places
//!   them in `to_org_id` (in the caller's subtree), and sets their status back to `normal` (a
//!   member transferred out earlier who comes back). Immediately `done`.
//! - `move`: to another branch or group inside the caller's own subtree; immediately `done`.
//!
//! A member has at most one pending transfer; while one is pending, no other change is made.
//! Lists: `incoming` are transfers whose receiving org is in the caller's subtree, `outgoing`
//! those whose sending org is; a move inside the subtree is both.

use axum::body::Bytes;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use minijinja::context;
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;

use crate::AppState;
use crate::auth::{self, CurrentUser, MaybeUser, Permission, User};
use crate::db::{Db, new_id, now_ms};
use crate::error::{ApiJson, AppError, ErrorBody};
use crate::orgs::{OrgKind, Scope};

/// Longest reason, in characters.
pub const MAX_REASON_CHARS: usize = 500;
/// Longest outside org name or letter number, in characters.
pub const MAX_OUTSIDE_CHARS: usize = 200;
/// Most transfers one list returns (newest first).
const LIST_LIMIT: i64 = 500;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/api/v1/members/{id}/transfers",
            get(member_history).post(create),
        )
        .route("/api/v1/transfers", get(list))
        .route("/api/v1/transfers/in", post(transfer_in))
        .route("/api/v1/transfers/{id}", get(get_one))
        .route("/api/v1/transfers/{id}/accept", post(accept))
        .route("/api/v1/transfers/{id}/reject", post(reject))
        .route("/api/v1/transfers/{id}/cancel", post(cancel))
        .route("/transfers", get(page))
        .route("/transfers/{id}/{action}", post(decide_form))
}

#[derive(OpenApi)]
#[openapi(paths(
    create,
    member_history,
    list,
    transfer_in,
    get_one,
    accept,
    reject,
    cancel
))]
pub struct TransfersApi;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransferKind {
    /// Between orgs of the system; the receiving org accepts.
    Internal,
    /// Out of the system.
    Out,
    /// In from outside the system.
    In,
    /// Between branches of the caller's own subtree, at once.
    Move,
}

impl TransferKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferKind::Internal => "internal",
            TransferKind::Out => "out",
            TransferKind::In => "in",
            TransferKind::Move => "move",
        }
    }

    pub fn parse(s: &str) -> Option<TransferKind> {
        [
            TransferKind::Internal,
            TransferKind::Out,
            TransferKind::In,
            TransferKind::Move,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    pub fn label(self) -> &'static str {
        match self {
            TransferKind::Internal => "系统内转接",
            TransferKind::Out => "转出系统",
            TransferKind::In => "从系统外转入",
            TransferKind::Move => "支部间调整",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransferStatus {
    Pending,
    Accepted,
    Rejected,
    Done,
}

impl TransferStatus {
    pub const ALL: [TransferStatus; 4] = [
        TransferStatus::Pending,
        TransferStatus::Accepted,
        TransferStatus::Rejected,
        TransferStatus::Done,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TransferStatus::Pending => "pending",
            TransferStatus::Accepted => "accepted",
            TransferStatus::Rejected => "rejected",
            TransferStatus::Done => "done",
        }
    }

    pub fn parse(s: &str) -> Option<TransferStatus> {
        TransferStatus::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn label(self) -> &'static str {
        match self {
            TransferStatus::Pending => "待接收",
            TransferStatus::Accepted => "已接收",
            TransferStatus::Rejected => "已退回",
            TransferStatus::Done => "已办结",
        }
    }
}

/// One membership change.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Transfer {
    pub id: String,
    pub member_id: String,
    pub member_name: String,
    pub kind: TransferKind,
    pub from_org_id: Option<String>,
    pub from_org_name: Option<String>,
    pub to_org_id: Option<String>,
    pub to_org_name: Option<String>,
    /// Where the member goes outside the system (`out`) or comes from (`in`).
    pub outside_org: String,
    pub letter_no: String,
    pub status: TransferStatus,
    /// The request's reason; a rejection's (or withdrawal's) reason is appended on a new line
    /// as `[退回] …` (`[撤回] …`).
    pub reason: String,
    pub requested_by: Option<String>,
    pub requested_by_name: Option<String>,
    pub decided_by: Option<String>,
    /// Milliseconds since the epoch.
    pub created_at: i64,
    pub decided_at: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct TransferRow {
    id: String,
    member_id: String,
    member_name: String,
    kind: String,
    from_org_id: Option<String>,
    from_org_name: Option<String>,
    to_org_id: Option<String>,
    to_org_name: Option<String>,
    outside_org: String,
    letter_no: String,
    status: String,
    reason: String,
    requested_by: Option<String>,
    requested_by_name: Option<String>,
    decided_by: Option<String>,
    created_at: i64,
    decided_at: Option<i64>,
}

impl TransferRow {
    fn into_transfer(self) -> Result<Transfer, AppError> {
        let kind = TransferKind::parse(&self.kind).ok_or_else(|| {
            anyhow::anyhow!("transfer {} has unknown kind {}", self.id, self.kind)
        })?;
        let status = TransferStatus::parse(&self.status).ok_or_else(|| {
            anyhow::anyhow!("transfer {} has unknown status {}", self.id, self.status)
        })?;
        Ok(Transfer {
            id: self.id,
            member_id: self.member_id,
            member_name: self.member_name,
            kind,
            from_org_id: self.from_org_id,
            from_org_name: self.from_org_name,
            to_org_id: self.to_org_id,
            to_org_name: self.to_org_name,
            outside_org: self.outside_org,
            letter_no: self.letter_no,
            status,
            reason: self.reason,
            requested_by: self.requested_by,
            requested_by_name: self.requested_by_name,
            decided_by: self.decided_by,
            created_at: self.created_at,
            decided_at: self.decided_at,
        })
    }
}

/// The select every read uses; `f` is the sending org, `g` the receiving one.
const SELECT: &str = "SELECT t.id, t.member_id, m.name AS member_name, t.kind, t.from_org_id, \
     f.name AS from_org_name, t.to_org_id, g.name AS to_org_name, t.outside_org, t.letter_no, \
     t.status, t.reason, t.requested_by, u.display_name AS requested_by_name, t.decided_by, \
     t.created_at, t.decided_at \
     FROM member_transfers t JOIN members m ON m.id = t.member_id \
     LEFT JOIN orgs f ON f.id = t.from_org_id LEFT JOIN orgs g ON g.id = t.to_org_id \
     LEFT JOIN users u ON u.id = t.requested_by";

/// A member in the caller's subtree, as transfers need it.
struct ScopedMember {
    id: String,
    name: String,
    org_id: String,
    status: String,
}

async fn member_in_scope(db: &Db, scope: &Scope, id: &str) -> Result<ScopedMember, AppError> {
    let row: Option<(String, String, String, String)> = sqlx::query_as(
        "SELECT m.id, m.name, m.org_id, m.status FROM members m JOIN orgs o ON o.id = m.org_id \
         WHERE m.id = $1 AND o.path LIKE $2 ESCAPE '\\'",
    )
    .bind(id)
    .bind(scope.like())
    .fetch_optional(&db.pool)
    .await?;
    let (id, name, org_id, status) = row.ok_or(AppError::NotFound)?;
    Ok(ScopedMember {
        id,
        name,
        org_id,
        status,
    })
}

/// The kind of an org anywhere in the system (transfers may go to any org), or 422.
async fn receiving_org(db: &Db, id: &str) -> Result<(String, OrgKind), AppError> {
    let row: Option<(String, String)> = sqlx::query_as("SELECT id, kind FROM orgs WHERE id = $1")
        .bind(id)
        .fetch_optional(&db.pool)
        .await?;
    let (id, kind) = row.ok_or_else(|| {
        AppError::Unprocessable("接收组织不存在 (the receiving org does not exist)".into())
    })?;
    let kind =
        OrgKind::parse(&kind).ok_or_else(|| anyhow::anyhow!("org {id} has unknown kind {kind}"))?;
    Ok((id, kind))
}

fn check_receiving(kind: OrgKind, to: &str, member: &ScopedMember) -> Result<(), AppError> {
    if !matches!(kind, OrgKind::Branch | OrgKind::Group) {
        return Err(AppError::Unprocessable(
            "党员只能转入党支部或党小组 (members go to a branch or a group)".into(),
        ));
    }
    if to == member.org_id {
        return Err(AppError::Unprocessable(
            "党员已在该组织 (the member is in that org already)".into(),
        ));
    }
    Ok(())
}

fn check_normal(member: &ScopedMember) -> Result<(), AppError> {
    if member.status != "normal" {
        return Err(AppError::Conflict(format!(
            "党员 {} 当前状态为 {}，不能办理转接 (member is not in normal status)",
            member.name, member.status
        )));
    }
    Ok(())
}

fn clean_text(s: Option<&str>, max: usize, what: &str) -> Result<String, AppError> {
    let s = s.unwrap_or("").trim();
    if s.chars().count() > max {
        return Err(AppError::Unprocessable(format!(
            "{what}最多 {max} 个字 ({what} too long)"
        )));
    }
    Ok(s.to_string())
}

fn required_text(s: Option<&str>, max: usize, what: &str) -> Result<String, AppError> {
    let s = clean_text(s, max, what)?;
    if s.is_empty() {
        return Err(AppError::Unprocessable(format!(
            "请填写{what} ({what} is required)"
        )));
    }
    Ok(s)
}

fn pending_conflict() -> AppError {
    AppError::Conflict(
        "该党员有待接收的转接，请等待对方处理或先撤回 (a transfer of this member is pending)"
            .into(),
    )
}

/// A transfer by id, without scoping (callers check scope first).
async fn load(db: &Db, id: &str) -> Result<Transfer, AppError> {
    let sql = format!("{SELECT} WHERE t.id = $1");
    sqlx::query_as::<_, TransferRow>(&sql)
        .bind(id)
        .fetch_optional(&db.pool)
        .await?
        .ok_or(AppError::NotFound)?
        .into_transfer()
}

/// What a request may carry; which fields count depends on `kind`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct NewTransfer {
    pub kind: TransferKind,
    /// `internal` (any branch or group of the system), `move` (one in the caller's subtree), `in`
    /// (optional: where the arriving member is placed, in the caller's subtree).
    #[serde(default)]
    pub to_org_id: Option<String>,
    /// `out`: required; `in`: where the member comes from, required.
    #[serde(default)]
    pub outside_org: Option<String>,
    /// `out` and `in`: the introduction letter's number, required.
    #[serde(default)]
    pub letter_no: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

/// Starts (internal) or makes (out, in, move) a membership change of `member_id`.
pub async fn request(
    db: &Db,
    scope: &Scope,
    me: &User,
    member_id: &str,
    req: &NewTransfer,
) -> Result<Transfer, AppError> {
    let member = member_in_scope(db, scope, member_id).await?;
    let reason = clean_text(req.reason.as_deref(), MAX_REASON_CHARS, "理由")?;
    let id = new_id();
    let now = now_ms();
    let insert = "INSERT INTO member_transfers (id, member_id, kind, from_org_id, to_org_id, \
        outside_org, letter_no, status, reason, requested_by, decided_by, created_at, decided_at) \
        SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13 \
        WHERE NOT EXISTS (SELECT 1 FROM member_transfers WHERE member_id = $2 AND status = 'pending')";
    let action;
    match req.kind {
        TransferKind::Internal => {
            check_normal(&member)?;
            let to = req.to_org_id.as_deref().ok_or_else(|| {
                AppError::Unprocessable("请选择接收组织 (to_org_id is required)".into())
            })?;
            let (to, kind) = receiving_org(db, to).await?;
            check_receiving(kind, &to, &member)?;
            let done = sqlx::query(insert)
                .bind(&id)
                .bind(&member.id)
                .bind("internal")
                .bind(Some(member.org_id.as_str()))
                .bind(Some(to.as_str()))
                .bind("")
                .bind("")
                .bind("pending")
                .bind(&reason)
                .bind(Some(me.id.as_str()))
                .bind(None::<String>)
                .bind(now)
                .bind(None::<i64>)
                .execute(&db.pool)
                .await?;
            if done.rows_affected() == 0 {
                return Err(pending_conflict());
            }
            action = "transfer_request";
        }
        TransferKind::Out => {
            check_normal(&member)?;
            let outside = required_text(req.outside_org.as_deref(), MAX_OUTSIDE_CHARS, "转往单位")?;
            let letter = required_text(req.letter_no.as_deref(), MAX_OUTSIDE_CHARS, "介绍信编号")?;
            let mut tx = db.pool.begin().await?;
            let done = sqlx::query(insert)
                .bind(&id)
                .bind(&member.id)
                .bind("out")
                .bind(Some(member.org_id.as_str()))
                .bind(None::<String>)
                .bind(&outside)
                .bind(&letter)
                .bind("done")
                .bind(&reason)
                .bind(Some(me.id.as_str()))
                .bind(Some(me.id.as_str()))
                .bind(now)
                .bind(Some(now))
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() == 0 {
                return Err(pending_conflict());
            }
            let moved = sqlx::query(
                "UPDATE members SET status = 'transferred_out', updated_at = $2 \
                 WHERE id = $1 AND status = 'normal'",
            )
            .bind(&member.id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if moved.rows_affected() == 0 {
                return Err(AppError::Conflict(
                    "党员状态已变化，请刷新 (member changed meanwhile)".into(),
                ));
            }
            tx.commit().await?;
            action = "transfer_out";
        }
        TransferKind::In => {
            if !matches!(member.status.as_str(), "normal" | "transferred_out") {
                return Err(AppError::Conflict(format!(
                    "党员 {} 当前状态为 {}，不能办理转入 (member status does not allow arrival)",
                    member.name, member.status
                )));
            }
            let outside =
                required_text(req.outside_org.as_deref(), MAX_OUTSIDE_CHARS, "原所在单位")?;
            let letter = required_text(req.letter_no.as_deref(), MAX_OUTSIDE_CHARS, "介绍信编号")?;
            let to = match req.to_org_id.as_deref().map(str::trim) {
                None | Some("") => member.org_id.clone(),
                Some(t) => {
                    let org = scope.org(db, t).await?;
                    if !matches!(org.kind, OrgKind::Branch | OrgKind::Group) {
                        return Err(AppError::Unprocessable(
                            "党员只能转入党支部或党小组 (members go to a branch or a group)".into(),
                        ));
                    }
                    org.id
                }
            };
            let mut tx = db.pool.begin().await?;
            let done = sqlx::query(insert)
                .bind(&id)
                .bind(&member.id)
                .bind("in")
                .bind(None::<String>)
                .bind(Some(to.as_str()))
                .bind(&outside)
                .bind(&letter)
                .bind("done")
                .bind(&reason)
                .bind(Some(me.id.as_str()))
                .bind(Some(me.id.as_str()))
                .bind(now)
                .bind(Some(now))
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() == 0 {
                return Err(pending_conflict());
            }
            sqlx::query(
                "UPDATE members SET status = 'normal', org_id = $2, updated_at = $3 WHERE id = $1",
            )
            .bind(&member.id)
            .bind(&to)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            action = "transfer_in";
        }
        TransferKind::Move => {
            check_normal(&member)?;
            let to = req.to_org_id.as_deref().ok_or_else(|| {
                AppError::Unprocessable("请选择调入组织 (to_org_id is required)".into())
            })?;
            let org = scope.org(db, to).await?;
            check_receiving(org.kind, &org.id, &member)?;
            let mut tx = db.pool.begin().await?;
            let done = sqlx::query(insert)
                .bind(&id)
                .bind(&member.id)
                .bind("move")
                .bind(Some(member.org_id.as_str()))
                .bind(Some(org.id.as_str()))
                .bind("")
                .bind("")
                .bind("done")
                .bind(&reason)
                .bind(Some(me.id.as_str()))
                .bind(Some(me.id.as_str()))
                .bind(now)
                .bind(Some(now))
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() == 0 {
                return Err(pending_conflict());
            }
            let moved = sqlx::query(
                "UPDATE members SET org_id = $2, updated_at = $3 \
                 WHERE id = $1 AND org_id = $4 AND status = 'normal'",
            )
            .bind(&member.id)
            .bind(&org.id)
            .bind(now)
            .bind(&member.org_id)
            .execute(&mut *tx)
            .await?;
            if moved.rows_affected() == 0 {
                return Err(AppError::Conflict(
                    "党员状态已变化，请刷新 (member changed meanwhile)".into(),
                ));
            }
            tx.commit().await?;
            action = "transfer_move";
        }
    }
    let t = load(db, &id).await?;
    let detail = format!(
        "member={} from={} to={} outside={} letter={}",
        t.member_id,
        t.from_org_id.as_deref().unwrap_or("-"),
        t.to_org_id.as_deref().unwrap_or("-"),
        t.outside_org,
        t.letter_no
    );
    auth::audit(db, Some(&me.id), action, &t.id, &detail).await?;
    Ok(t)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Accept,
    Reject,
    /// The sending side withdraws its own pending request.
    Cancel,
}

/// Decides a pending internal transfer: accept and reject by a keeper of the receiving org,
/// withdraw by a keeper of the sending org. Anything else is 404; a decided one is 409.
pub async fn decide(
    db: &Db,
    scope: &Scope,
    me: &User,
    id: &str,
    decision: Decision,
    reason: Option<&str>,
) -> Result<Transfer, AppError> {
    let side = if decision == Decision::Cancel {
        "f"
    } else {
        "g"
    };
    let sql = format!(
        "{SELECT} WHERE t.id = $1 AND t.kind = 'internal' AND {side}.path LIKE $2 ESCAPE '\\'"
    );
    let t = sqlx::query_as::<_, TransferRow>(&sql)
        .bind(id)
        .bind(scope.like())
        .fetch_optional(&db.pool)
        .await?
        .ok_or(AppError::NotFound)?
        .into_transfer()?;
    if t.status != TransferStatus::Pending {
        return Err(already_decided(&t));
    }
    let reason = clean_text(reason, MAX_REASON_CHARS, "理由")?;
    let now = now_ms();
    let mut tx = db.pool.begin().await?;
    let (status, note, action) = match decision {
        Decision::Accept => ("accepted", reason.clone(), "transfer_accept"),
        Decision::Reject => {
            if reason.is_empty() {
                return Err(AppError::Unprocessable(
                    "请填写退回理由 (a reason is required to reject)".into(),
                ));
            }
            ("rejected", format!("[退回] {reason}"), "transfer_reject")
        }
        Decision::Cancel => (
            "rejected",
            format!("[撤回] {reason}").trim_end().to_string(),
            "transfer_cancel",
        ),
    };
    let new_reason = match (t.reason.is_empty(), note.is_empty()) {
        (_, true) => t.reason.clone(),
        (true, false) => note.clone(),
        (false, false) => format!("{}\n{note}", t.reason),
    };
    let done = sqlx::query(
        "UPDATE member_transfers SET status = $2, reason = $3, decided_by = $4, decided_at = $5 \
         WHERE id = $1 AND status = 'pending'",
    )
    .bind(&t.id)
    .bind(status)
    .bind(&new_reason)
    .bind(&me.id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        return Err(already_decided(&t));
    }
    if decision == Decision::Accept {
        let to = t
            .to_org_id
            .clone()
            .ok_or_else(|| anyhow::anyhow!("internal transfer {} has no receiving org", t.id))?;
        let moved = sqlx::query(
            "UPDATE members SET org_id = $2, updated_at = $3 WHERE id = $1 AND status = 'normal'",
        )
        .bind(&t.member_id)
        .bind(&to)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() == 0 {
            return Err(AppError::Conflict(
                "党员状态已变化，不能接收 (the member is no longer in normal status)".into(),
            ));
        }
    }
    tx.commit().await?;
    let detail = format!("member={} {note}", t.member_id);
    auth::audit(db, Some(&me.id), action, &t.id, detail.trim_end()).await?;
    load(db, &t.id).await
}

fn already_decided(t: &Transfer) -> AppError {
    AppError::Conflict(format!(
        "该转接已处理（{}），不能重复处理 (already decided)",
        t.status.label()
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The receiving org is in the caller's subtree.
    Incoming,
    /// The sending org is in the caller's subtree.
    Outgoing,
}

/// Transfers into and/or out of the caller's subtree, newest first.
pub async fn transfers_of_scope(
    db: &Db,
    scope: &Scope,
    direction: Option<Direction>,
    status: Option<TransferStatus>,
) -> Result<Vec<Transfer>, AppError> {
    let side = match direction {
        Some(Direction::Incoming) => "g.path LIKE $1 ESCAPE '\\'",
        Some(Direction::Outgoing) => "f.path LIKE $1 ESCAPE '\\'",
        None => "(g.path LIKE $1 ESCAPE '\\' OR f.path LIKE $1 ESCAPE '\\')",
    };
    let sql = format!(
        "{SELECT} WHERE {side} AND ($2 = '' OR t.status = $2) \
         ORDER BY t.created_at DESC, t.id DESC LIMIT {LIST_LIMIT}"
    );
    sqlx::query_as::<_, TransferRow>(&sql)
        .bind(scope.like())
        .bind(status.map_or("", TransferStatus::as_str))
        .fetch_all(&db.pool)
        .await?
        .into_iter()
        .map(TransferRow::into_transfer)
        .collect()
}

/// A member's whole history, oldest first (the member must be in scope).
pub async fn history(db: &Db, scope: &Scope, member_id: &str) -> Result<Vec<Transfer>, AppError> {
    let member = member_in_scope(db, scope, member_id).await?;
    let sql = format!("{SELECT} WHERE t.member_id = $1 ORDER BY t.created_at, t.id");
    sqlx::query_as::<_, TransferRow>(&sql)
        .bind(&member.id)
        .fetch_all(&db.pool)
        .await?
        .into_iter()
        .map(TransferRow::into_transfer)
        .collect()
}

/// One transfer seen from either side (sending or receiving org in scope, or for arrivals the
/// receiving org).
async fn visible(db: &Db, scope: &Scope, id: &str) -> Result<Transfer, AppError> {
    let sql = format!(
        "{SELECT} WHERE t.id = $1 AND (g.path LIKE $2 ESCAPE '\\' OR f.path LIKE $2 ESCAPE '\\')"
    );
    sqlx::query_as::<_, TransferRow>(&sql)
        .bind(id)
        .bind(scope.like())
        .fetch_optional(&db.pool)
        .await?
        .ok_or(AppError::NotFound)?
        .into_transfer()
}

// ---------------------------------------------------------------------------------------------
// REST
// ---------------------------------------------------------------------------------------------

async fn keeper(state: &AppState, user: &CurrentUser) -> Result<(User, Scope), AppError> {
    let me = user.require(Permission::ManageMembers)?.clone();
    let scope = Scope::of(&state.db, &me).await?;
    Ok((me, scope))
}

/// Start a transfer (`internal`, pending) or make one (`out`, `in`, `move`, done at once).
#[utoipa::path(post, path = "/api/v1/members/{id}/transfers", params(("id" = String, Path)),
    request_body = NewTransfer,
    responses((status = 201, body = Transfer), (status = 403, body = ErrorBody),
        (status = 404, description = "No such member in the caller's subtree (or, for move/in, no such org there)", body = ErrorBody),
        (status = 409, description = "A transfer is pending, or the member's status does not allow it", body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub(crate) async fn create(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<NewTransfer>,
) -> Result<(StatusCode, Json<Transfer>), AppError> {
    let (me, scope) = keeper(&state, &user).await?;
    let t = request(&state.db, &scope, &me, &id, &req).await?;
    Ok((StatusCode::CREATED, Json(t)))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct NewArrival {
    /// An existing member record in the caller's subtree (create it through the members API
    /// first; a member transferred out earlier may come back).
    pub member_id: String,
    /// Where the member comes from.
    pub outside_org: String,
    pub letter_no: String,
    /// Optional: a branch or group in the caller's subtree to place them in.
    #[serde(default)]
    pub to_org_id: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

/// Record an arrival from outside the system (kind `in`, done at once; status back to normal).
#[utoipa::path(post, path = "/api/v1/transfers/in", request_body = NewArrival,
    responses((status = 201, body = Transfer), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn transfer_in(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(req): ApiJson<NewArrival>,
) -> Result<(StatusCode, Json<Transfer>), AppError> {
    let (me, scope) = keeper(&state, &user).await?;
    let new = NewTransfer {
        kind: TransferKind::In,
        to_org_id: req.to_org_id,
        outside_org: Some(req.outside_org),
        letter_no: Some(req.letter_no),
        reason: req.reason,
    };
    let t = request(&state.db, &scope, &me, &req.member_id, &new).await?;
    Ok((StatusCode::CREATED, Json(t)))
}

/// A member's transfer history, oldest first.
#[utoipa::path(get, path = "/api/v1/members/{id}/transfers", params(("id" = String, Path)),
    responses((status = 200, body = [Transfer]), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn member_history(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Vec<Transfer>>, AppError> {
    let (_, scope) = keeper(&state, &user).await?;
    Ok(Json(history(&state.db, &scope, &id).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// `incoming` or `outgoing`; both when left out.
    pub direction: Option<String>,
    /// `pending`, `accepted`, `rejected` or `done`.
    pub status: Option<String>,
}

fn parse_direction(s: Option<&str>) -> Result<Option<Direction>, AppError> {
    match s.map(str::trim) {
        None | Some("") => Ok(None),
        Some("incoming") => Ok(Some(Direction::Incoming)),
        Some("outgoing") => Ok(Some(Direction::Outgoing)),
        Some(_) => Err(AppError::BadRequest(
            "direction must be incoming or outgoing".into(),
        )),
    }
}

fn parse_status(s: Option<&str>) -> Result<Option<TransferStatus>, AppError> {
    match s.map(str::trim) {
        None | Some("") => Ok(None),
        Some(s) => TransferStatus::parse(s).map(Some).ok_or_else(|| {
            AppError::BadRequest("status must be pending, accepted, rejected or done".into())
        }),
    }
}

/// Transfers into (`incoming`) or out of (`outgoing`) the caller's subtree, newest first (at
/// most 500).
#[utoipa::path(get, path = "/api/v1/transfers", params(ListQuery),
    responses((status = 200, body = [Transfer]), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    user: CurrentUser,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<Transfer>>, AppError> {
    let (_, scope) = keeper(&state, &user).await?;
    let direction = parse_direction(q.direction.as_deref())?;
    let status = parse_status(q.status.as_deref())?;
    Ok(Json(
        transfers_of_scope(&state.db, &scope, direction, status).await?,
    ))
}

/// One transfer, seen from the sending or the receiving side.
#[utoipa::path(get, path = "/api/v1/transfers/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Transfer), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_one(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Transfer>, AppError> {
    let (_, scope) = keeper(&state, &user).await?;
    Ok(Json(visible(&state.db, &scope, &id).await?))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct DecisionBody {
    /// Required to reject; optional otherwise.
    #[serde(default)]
    pub reason: Option<String>,
}

fn decision_body(body: &[u8]) -> Result<DecisionBody, AppError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DecisionBody::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| AppError::BadRequest(format!("malformed JSON body: {e}")))
}

async fn decide_api(
    state: &AppState,
    user: &CurrentUser,
    id: &str,
    decision: Decision,
    body: &[u8],
) -> Result<Json<Transfer>, AppError> {
    let (me, scope) = keeper(state, user).await?;
    let body = decision_body(body)?;
    Ok(Json(
        decide(&state.db, &scope, &me, id, decision, body.reason.as_deref()).await?,
    ))
}

/// Accept a pending internal transfer into the caller's subtree: the member moves.
#[utoipa::path(post, path = "/api/v1/transfers/{id}/accept", params(("id" = String, Path)),
    request_body(content = DecisionBody, description = "Optional"),
    responses((status = 200, body = Transfer),
        (status = 404, description = "No such pending transfer into the caller's subtree", body = ErrorBody),
        (status = 409, description = "Decided already", body = ErrorBody)))]
pub(crate) async fn accept(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Transfer>, AppError> {
    decide_api(&state, &user, &id, Decision::Accept, &body).await
}

/// Reject a pending internal transfer into the caller's subtree (reason required): the member
/// stays.
#[utoipa::path(post, path = "/api/v1/transfers/{id}/reject", params(("id" = String, Path)),
    request_body = DecisionBody,
    responses((status = 200, body = Transfer), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn reject(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Transfer>, AppError> {
    decide_api(&state, &user, &id, Decision::Reject, &body).await
}

/// Withdraw a pending internal transfer out of the caller's subtree (recorded as `rejected`,
/// reason `[撤回] …`).
#[utoipa::path(post, path = "/api/v1/transfers/{id}/cancel", params(("id" = String, Path)),
    request_body(content = DecisionBody, description = "Optional"),
    responses((status = 200, body = Transfer), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Transfer>, AppError> {
    decide_api(&state, &user, &id, Decision::Cancel, &body).await
}

// ---------------------------------------------------------------------------------------------
// Page
// ---------------------------------------------------------------------------------------------

fn card(t: &Transfer) -> minijinja::Value {
    context! {
        id => t.id, member => t.member_name, member_id => t.member_id,
        kind => t.kind.label(), status_key => t.status.as_str(), status => t.status.label(),
        from => t.from_org_name.clone().or_else(|| (!t.outside_org.is_empty() && t.kind == TransferKind::In).then(|| t.outside_org.clone())),
        to => t.to_org_name.clone().or_else(|| (!t.outside_org.is_empty() && t.kind == TransferKind::Out).then(|| t.outside_org.clone())),
        letter_no => t.letter_no, reason => t.reason, by => t.requested_by_name,
        at => crate::recordings::fmt_time(t.created_at),
        decided => t.decided_at.map(crate::recordings::fmt_time),
    }
}

async fn render(
    state: &AppState,
    headers: &HeaderMap,
    user: &User,
    status: StatusCode,
    error: Option<String>,
) -> Result<Response, AppError> {
    let scope = Scope::of(&state.db, user).await?;
    let incoming = transfers_of_scope(&state.db, &scope, Some(Direction::Incoming), None).await?;
    let (pending, decided): (Vec<_>, Vec<_>) = incoming
        .iter()
        .filter(|t| t.kind == TransferKind::Internal)
        .partition(|t| t.status == TransferStatus::Pending);
    let outgoing = transfers_of_scope(&state.db, &scope, Some(Direction::Outgoing), None).await?;
    let ctx = context! {
        user => user, error => error,
        pending => pending.into_iter().map(card).collect::<Vec<_>>(),
        decided => decided.into_iter().take(50).map(card).collect::<Vec<_>>(),
        outgoing => outgoing.iter().take(100).map(card).collect::<Vec<_>>(),
        max_reason => MAX_REASON_CHARS,
    };
    let mut resp =
        crate::pages::render_page(state, headers, "transfers.html", ctx)?.into_response();
    *resp.status_mut() = status;
    Ok(resp)
}

fn login_redirect(next: &str) -> Response {
    let next: String = url::form_urlencoded::byte_serialize(next.as_bytes()).collect();
    Redirect::to(&format!("/login?next={next}")).into_response()
}

async fn page(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    MaybeUser(user): MaybeUser,
) -> Result<Response, AppError> {
    let Some(user) = user else {
        return Ok(login_redirect(uri.path()));
    };
    if !user.role.allows(Permission::ManageMembers) {
        let ctx = context! { user => user, denied => "只有组织管理员和支部书记可以办理党员组织关系转接。" };
        let mut resp =
            crate::pages::render_page(&state, &headers, "transfers.html", ctx)?.into_response();
        *resp.status_mut() = StatusCode::FORBIDDEN;
        return Ok(resp);
    }
    render(&state, &headers, &user, StatusCode::OK, None).await
}

#[derive(Deserialize)]
struct DecideForm {
    csrf: String,
    #[serde(default)]
    reason: String,
}

/// `POST /transfers/{id}/accept|reject|cancel` from the page.
async fn decide_form(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    user: CurrentUser,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<DecideForm>,
) -> Result<Response, AppError> {
    if !auth::csrf_ok(&headers, &form.csrf) {
        return Err(AppError::Forbidden(
            "页面已过期，请刷新后重试。(form expired)".into(),
        ));
    }
    let decision = match action.as_str() {
        "accept" => Decision::Accept,
        "reject" => Decision::Reject,
        "cancel" => Decision::Cancel,
        _ => return Ok(crate::pages::not_found(State(state), uri, headers).await),
    };
    let (me, scope) = keeper(&state, &user).await?;
    match decide(&state.db, &scope, &me, &id, decision, Some(&form.reason)).await {
        Ok(_) => Ok(Redirect::to("/transfers").into_response()),
        Err(AppError::NotFound) => Ok(crate::pages::not_found(State(state), uri, headers).await),
        Err(e @ (AppError::Conflict(_) | AppError::Unprocessable(_))) => {
            render(&state, &headers, &me, e.status(), Some(e.to_string())).await
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_statuses_round_trip() {
        for k in ["internal", "out", "in", "move"] {
            assert_eq!(TransferKind::parse(k).unwrap().as_str(), k);
        }
        for s in TransferStatus::ALL {
            assert_eq!(TransferStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(TransferKind::parse("leave"), None);
    }

    #[test]
    fn list_filters_are_checked() {
        assert_eq!(
            parse_direction(Some("incoming")).unwrap(),
            Some(Direction::Incoming)
        );
        assert!(parse_direction(Some("sideways")).is_err());
        assert_eq!(parse_status(Some("")).unwrap(), None);
        assert!(parse_status(Some("lost")).is_err());
    }

    #[test]
    fn the_openapi_part_documents_every_transfers_endpoint() {
        let doc = TransfersApi::openapi();
        for p in [
            "/api/v1/members/{id}/transfers",
            "/api/v1/transfers",
            "/api/v1/transfers/in",
            "/api/v1/transfers/{id}",
            "/api/v1/transfers/{id}/accept",
            "/api/v1/transfers/{id}/reject",
            "/api/v1/transfers/{id}/cancel",
        ] {
            assert!(doc.paths.paths.contains_key(p), "{p}");
        }
    }
}
