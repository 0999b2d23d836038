//! Work guidance (工作指导): an instruction sent by a superior org to chosen orgs below it, each
//! of which acknowledges it (已阅) and replies (回复). The sender sees, per target org, whether and
//! when it was acknowledged and replied to, and by whom.
//!
//! Visibility follows [`crate::orgs::Scope`]: a guidance is seen by users whose scope holds its
//! sending org (the sender's view, every target) or one of its target orgs (the receiver's view,
//! only the targets in their scope). Everyone else gets 404, as for an id that does not exist.
//! Sending, acknowledging and replying need [`Permission::ManageOrgs`] or
//! [`Permission::ManageMembers`] (org admins and secretaries act for their org).

use std::collections::HashSet;

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
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
use crate::orglife::{check_csrf, clean_date, login_redirect};
use crate::orgs::Scope;

pub const MAX_TITLE_CHARS: usize = 200;
pub const MAX_BODY_CHARS: usize = 20_000;
pub const MAX_REPLY_CHARS: usize = 5_000;
/// Most guidance one list answers (newest first).
pub const LIST_LIMIT: i64 = 200;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/guidance", get(list).post(create))
        .route("/api/v1/guidance/{id}", get(get_one))
        .route("/api/v1/guidance/{id}/targets/{org}/ack", post(ack))
        .route("/api/v1/guidance/{id}/targets/{org}/reply", post(reply))
        .route("/guidance", get(page).post(send_form))
        .route("/guidance/{id}/targets/{org}/ack", post(ack_form))
        .route("/guidance/{id}/targets/{org}/reply", post(reply_form))
}

#[derive(OpenApi)]
#[openapi(paths(list, create, get_one, ack, reply))]
pub struct GuidanceApi;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct NewGuidance {
    /// The sending org, in the caller's scope.
    pub from_org_id: String,
    pub title: String,
    pub body: String,
    /// `YYYY-MM-DD`, when replies are due.
    #[serde(default)]
    pub due_on: Option<String>,
    /// Orgs below `from_org_id` (strictly), at least one.
    pub to_org_ids: Vec<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TargetStatus {
    pub org_id: String,
    pub org_name: String,
    pub acknowledged: bool,
    pub acknowledged_at: Option<i64>,
    pub replied: bool,
    pub reply: String,
    pub replied_at: Option<i64>,
    /// The user who replied.
    pub replied_by: Option<String>,
    pub replied_by_name: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Guidance {
    pub id: String,
    pub from_org_id: String,
    pub from_org_name: String,
    pub title: String,
    pub body: String,
    pub due_on: Option<String>,
    pub created_by: Option<String>,
    pub created_at: i64,
    /// `sender` when the caller's scope holds the sending org (all targets listed), else
    /// `receiver` (only the targets in the caller's scope).
    pub view: String,
    pub targets: Vec<TargetStatus>,
}

#[derive(sqlx::FromRow)]
struct GuidanceRow {
    id: String,
    from_org_id: String,
    from_org_name: String,
    from_path: String,
    title: String,
    body: String,
    due_on: Option<String>,
    created_by: Option<String>,
    created_at: i64,
}

#[derive(sqlx::FromRow)]
struct TargetRow {
    org_id: String,
    org_name: String,
    path: String,
    acknowledged_at: Option<i64>,
    reply: String,
    replied_at: Option<i64>,
    replied_by: Option<String>,
    replied_by_name: Option<String>,
}

const GUIDANCE_SELECT: &str = "SELECT g.id, g.from_org_id, o.name AS from_org_name, o.path AS from_path, g.title, g.body, \
     g.due_on, g.created_by, g.created_at FROM guidance g JOIN orgs o ON o.id = g.from_org_id";

fn may_act(user: &User) -> Result<(), AppError> {
    if user.role.allows(Permission::ManageOrgs) || user.role.allows(Permission::ManageMembers) {
        Ok(())
    } else {
        Err(AppError::Forbidden(
            "你没有执行此操作的权限 (permission denied)".into(),
        ))
    }
}

fn clean_text(s: &str, max: usize, what: &str) -> Result<String, AppError> {
    let s = s.trim();
    if s.is_empty() || s.chars().count() > max {
        return Err(AppError::Unprocessable(format!(
            "{what}须为 1 至 {max} 个字 ({what}: 1 to {max} characters)"
        )));
    }
    Ok(s.to_string())
}

/// Sends guidance from `req.from_org_id` (in `scope`) to orgs strictly below it.
pub async fn send(
    db: &Db,
    scope: &Scope,
    req: &NewGuidance,
    created_by: Option<&str>,
) -> Result<String, AppError> {
    let from = scope.org(db, &req.from_org_id).await?;
    let title = clean_text(&req.title, MAX_TITLE_CHARS, "标题")?;
    let body = clean_text(&req.body, MAX_BODY_CHARS, "内容")?;
    let due_on = match req.due_on.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(d) => Some(clean_date(d, "截止日期")?),
    };
    if req.to_org_ids.is_empty() {
        return Err(AppError::Unprocessable(
            "请至少选择一个下级组织 (choose at least one target org)".into(),
        ));
    }
    let mut targets = Vec::new();
    let mut seen = HashSet::new();
    for t in &req.to_org_ids {
        let t = t.trim();
        if !seen.insert(t.to_string()) {
            continue;
        }
        // Any org strictly below the sender is in the sender's scope too.
        let path: Option<(String,)> = sqlx::query_as("SELECT path FROM orgs WHERE id = $1")
            .bind(t)
            .fetch_optional(&db.pool)
            .await?;
        match path {
            Some((p,)) if p.starts_with(&from.path) && p != from.path => {
                targets.push(t.to_string())
            }
            _ => {
                return Err(AppError::Unprocessable(format!(
                    "{t} 不是 {} 的下级组织 (each target must be an org below the sender)",
                    from.name
                )));
            }
        }
    }
    let id = new_id();
    let mut tx = db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO guidance (id, from_org_id, title, body, due_on, created_by, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&id)
    .bind(&from.id)
    .bind(&title)
    .bind(&body)
    .bind(due_on)
    .bind(created_by.map(str::to_string))
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    for t in &targets {
        sqlx::query("INSERT INTO guidance_targets (guidance_id, org_id) VALUES ($1, $2)")
            .bind(&id)
            .bind(t)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(id)
}

async fn targets_of(db: &Db, id: &str) -> Result<Vec<TargetRow>, AppError> {
    Ok(sqlx::query_as::<_, TargetRow>(
        "SELECT t.org_id, o.name AS org_name, o.path, t.acknowledged_at, t.reply, t.replied_at, t.replied_by, \
         u.display_name AS replied_by_name FROM guidance_targets t JOIN orgs o ON o.id = t.org_id \
         LEFT JOIN users u ON u.id = t.replied_by WHERE t.guidance_id = $1 ORDER BY o.path",
    )
    .bind(id)
    .fetch_all(&db.pool)
    .await?)
}

fn assemble(scope: &Scope, g: GuidanceRow, targets: Vec<TargetRow>) -> Option<Guidance> {
    let sender = scope.contains_path(&g.from_path);
    let targets: Vec<TargetStatus> = targets
        .into_iter()
        .filter(|t| sender || scope.contains_path(&t.path))
        .map(|t| TargetStatus {
            org_id: t.org_id,
            org_name: t.org_name,
            acknowledged: t.acknowledged_at.is_some(),
            acknowledged_at: t.acknowledged_at,
            replied: t.replied_at.is_some(),
            reply: t.reply,
            replied_at: t.replied_at,
            replied_by: t.replied_by,
            replied_by_name: t.replied_by_name,
        })
        .collect();
    if !sender && targets.is_empty() {
        return None;
    }
    Some(Guidance {
        id: g.id,
        from_org_id: g.from_org_id,
        from_org_name: g.from_org_name,
        title: g.title,
        body: g.body,
        due_on: g.due_on,
        created_by: g.created_by,
        created_at: g.created_at,
        view: if sender { "sender" } else { "receiver" }.into(),
        targets,
    })
}

/// The guidance `id` as the caller may see it, else 404.
pub async fn load(db: &Db, scope: &Scope, id: &str) -> Result<Guidance, AppError> {
    let sql = format!("{GUIDANCE_SELECT} WHERE g.id = $1");
    let g = sqlx::query_as::<_, GuidanceRow>(&sql)
        .bind(id)
        .fetch_optional(&db.pool)
        .await?
        .ok_or(AppError::NotFound)?;
    let targets = targets_of(db, id).await?;
    assemble(scope, g, targets).ok_or(AppError::NotFound)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Sent from an org in the caller's scope.
    Sent,
    /// Sent from above to an org in the caller's scope.
    #[default]
    Received,
}

/// Guidance sent from the caller's subtree, or received by it from above (sent by an org outside
/// the caller's scope to one inside), newest first.
pub async fn list_for(db: &Db, scope: &Scope, dir: Direction) -> Result<Vec<Guidance>, AppError> {
    let sql = match dir {
        Direction::Sent => format!(
            "{GUIDANCE_SELECT} WHERE o.path LIKE $1 ESCAPE '\\' ORDER BY g.created_at DESC, g.id DESC LIMIT {LIST_LIMIT}"
        ),
        Direction::Received => format!(
            "{GUIDANCE_SELECT} WHERE o.path NOT LIKE $1 ESCAPE '\\' AND EXISTS (SELECT 1 FROM guidance_targets t \
             JOIN orgs tt ON tt.id = t.org_id WHERE t.guidance_id = g.id AND tt.path LIKE $1 ESCAPE '\\') \
             ORDER BY g.created_at DESC, g.id DESC LIMIT {LIST_LIMIT}"
        ),
    };
    let rows = sqlx::query_as::<_, GuidanceRow>(&sql)
        .bind(scope.like())
        .fetch_all(&db.pool)
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for g in rows {
        let targets = targets_of(db, &g.id).await?;
        if let Some(g) = assemble(scope, g, targets) {
            out.push(g);
        }
    }
    Ok(out)
}

/// The target `org` of guidance `id`, when the caller's scope holds `org`; else 404.
async fn own_target(db: &Db, scope: &Scope, id: &str, org: &str) -> Result<(), AppError> {
    let o = scope.org(db, org).await?;
    let found: Option<(String,)> = sqlx::query_as(
        "SELECT org_id FROM guidance_targets WHERE guidance_id = $1 AND org_id = $2",
    )
    .bind(id)
    .bind(&o.id)
    .fetch_optional(&db.pool)
    .await?;
    found.map(|_| ()).ok_or(AppError::NotFound)
}

/// Marks the target acknowledged (the first time only).
pub async fn acknowledge(db: &Db, scope: &Scope, id: &str, org: &str) -> Result<(), AppError> {
    own_target(db, scope, id, org).await?;
    sqlx::query(
        "UPDATE guidance_targets SET acknowledged_at = COALESCE(acknowledged_at, $3) WHERE guidance_id = $1 AND org_id = $2",
    )
    .bind(id)
    .bind(org)
    .bind(now_ms())
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Records (or replaces) the target's reply; a reply also acknowledges.
pub async fn answer(
    db: &Db,
    scope: &Scope,
    id: &str,
    org: &str,
    user: &User,
    text: &str,
) -> Result<(), AppError> {
    own_target(db, scope, id, org).await?;
    let text = clean_text(text, MAX_REPLY_CHARS, "回复")?;
    let now = now_ms();
    sqlx::query(
        "UPDATE guidance_targets SET reply = $3, replied_at = $4, replied_by = $5, \
         acknowledged_at = COALESCE(acknowledged_at, $4) WHERE guidance_id = $1 AND org_id = $2",
    )
    .bind(id)
    .bind(org)
    .bind(&text)
    .bind(now)
    .bind(&user.id)
    .execute(&db.pool)
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// REST
// ---------------------------------------------------------------------------------------------

/// Send guidance to orgs below the sending org.
#[utoipa::path(post, path = "/api/v1/guidance", request_body = NewGuidance,
    responses((status = 201, body = Guidance), (status = 403, body = ErrorBody), (status = 404, description = "The sending org is not in your scope", body = ErrorBody),
        (status = 422, description = "Empty title or body, bad date, or a target not below the sender", body = ErrorBody)))]
pub(crate) async fn create(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(req): ApiJson<NewGuidance>,
) -> Result<(StatusCode, Json<Guidance>), AppError> {
    may_act(&user.0)?;
    let scope = Scope::of(&state.db, &user.0).await?;
    let id = send(&state.db, &scope, &req, Some(&user.0.id)).await?;
    auth::audit(
        &state.db,
        Some(&user.0.id),
        "send_guidance",
        &id,
        req.title.trim(),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(load(&state.db, &scope, &id).await?),
    ))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// `sent` or `received` (default).
    pub direction: Option<Direction>,
}

/// Guidance sent from the caller's subtree, or received from above (default).
#[utoipa::path(get, path = "/api/v1/guidance", params(ListQuery),
    responses((status = 200, body = [Guidance]), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    user: CurrentUser,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<Guidance>>, AppError> {
    let scope = Scope::of(&state.db, &user.0).await?;
    Ok(Json(
        list_for(&state.db, &scope, q.direction.unwrap_or_default()).await?,
    ))
}

/// One guidance with the status of each target org (the sender sees every target).
#[utoipa::path(get, path = "/api/v1/guidance/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Guidance), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_one(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Guidance>, AppError> {
    let scope = Scope::of(&state.db, &user.0).await?;
    Ok(Json(load(&state.db, &scope, &id).await?))
}

/// Acknowledge (已阅) for a target org in the caller's scope.
#[utoipa::path(post, path = "/api/v1/guidance/{id}/targets/{org}/ack", params(("id" = String, Path), ("org" = String, Path)),
    responses((status = 200, body = Guidance), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn ack(
    State(state): State<AppState>,
    user: CurrentUser,
    Path((id, org)): Path<(String, String)>,
) -> Result<Json<Guidance>, AppError> {
    let scope = Scope::of(&state.db, &user.0).await?;
    own_target(&state.db, &scope, &id, &org).await?;
    may_act(&user.0)?;
    acknowledge(&state.db, &scope, &id, &org).await?;
    auth::audit(&state.db, Some(&user.0.id), "ack_guidance", &id, &org).await?;
    Ok(Json(load(&state.db, &scope, &id).await?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct Reply {
    pub reply: String,
}

/// Reply for a target org in the caller's scope (replaces an earlier reply; also acknowledges).
#[utoipa::path(post, path = "/api/v1/guidance/{id}/targets/{org}/reply", params(("id" = String, Path), ("org" = String, Path)),
    request_body = Reply,
    responses((status = 200, body = Guidance), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn reply(
    State(state): State<AppState>,
    user: CurrentUser,
    Path((id, org)): Path<(String, String)>,
    ApiJson(req): ApiJson<Reply>,
) -> Result<Json<Guidance>, AppError> {
    let scope = Scope::of(&state.db, &user.0).await?;
    own_target(&state.db, &scope, &id, &org).await?;
    may_act(&user.0)?;
    answer(&state.db, &scope, &id, &org, &user.0, &req.reply).await?;
    auth::audit(&state.db, Some(&user.0.id), "reply_guidance", &id, &org).await?;
    Ok(Json(load(&state.db, &scope, &id).await?))
}

// ---------------------------------------------------------------------------------------------
// Page
// ---------------------------------------------------------------------------------------------

/// `2026-11-30 14:05`, Beijing time.
fn fmt_time(ms: Option<i64>) -> String {
    ms.and_then(|ms| chrono::DateTime::from_timestamp_millis(ms + 8 * 3600 * 1000))
        .map(|d| d.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_default()
}

fn view(g: &Guidance) -> minijinja::Value {
    let targets: Vec<_> = g
        .targets
        .iter()
        .map(|t| {
            context! {
                org_id => t.org_id, org_name => t.org_name, acknowledged => t.acknowledged,
                acknowledged_at => fmt_time(t.acknowledged_at), replied => t.replied, reply => t.reply,
                replied_at => fmt_time(t.replied_at), replied_by => t.replied_by_name.clone().or(t.replied_by.clone()),
            }
        })
        .collect();
    let acked = g.targets.iter().filter(|t| t.acknowledged).count();
    let replied = g.targets.iter().filter(|t| t.replied).count();
    context! {
        id => g.id, title => g.title, body => g.body, from => g.from_org_name, due_on => g.due_on,
        sent_at => fmt_time(Some(g.created_at)), targets => targets, acked => acked, replied => replied,
        total => g.targets.len(),
    }
}

#[derive(Debug, Default, Deserialize)]
struct PageQuery {
    done: Option<String>,
}

async fn page(
    State(state): State<AppState>,
    headers: HeaderMap,
    MaybeUser(user): MaybeUser,
    Query(q): Query<PageQuery>,
) -> Result<Response, AppError> {
    let Some(user) = user else {
        return Ok(login_redirect("/guidance"));
    };
    render(
        &state,
        &headers,
        &user,
        StatusCode::OK,
        None,
        q.done.is_some(),
    )
    .await
}

async fn render(
    state: &AppState,
    headers: &HeaderMap,
    user: &User,
    status: StatusCode,
    error: Option<String>,
    done: bool,
) -> Result<Response, AppError> {
    let scope = Scope::of(&state.db, user).await?;
    let received: Vec<_> = list_for(&state.db, &scope, Direction::Received)
        .await?
        .iter()
        .map(view)
        .collect();
    let sent: Vec<_> = list_for(&state.db, &scope, Direction::Sent)
        .await?
        .iter()
        .map(view)
        .collect();
    let orgs = scope.orgs(&state.db).await?;
    let base = orgs.first().map_or(0, |o| o.depth);
    let orgs: Vec<_> = orgs
        .iter()
        .map(|o| context! { id => o.id, name => format!("{}{}", "　".repeat(o.depth - base.min(o.depth)), o.name) })
        .collect();
    let can_act = may_act(user).is_ok();
    let ctx = context! {
        user => user, received => received, sent => sent, orgs => orgs, can_act => can_act,
        error => error, done => done,
    };
    let mut resp = crate::pages::render_page(state, headers, "guidance.html", ctx)?.into_response();
    *resp.status_mut() = status;
    Ok(resp)
}

async fn send_form(
    State(state): State<AppState>,
    headers: HeaderMap,
    user: CurrentUser,
    Form(form): Form<Vec<(String, String)>>,
) -> Result<Response, AppError> {
    let field = |k: &str| {
        form.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    check_csrf(&headers, &field("csrf"))?;
    may_act(&user.0)?;
    let scope = Scope::of(&state.db, &user.0).await?;
    let req = NewGuidance {
        from_org_id: field("from_org_id"),
        title: field("title"),
        body: field("body"),
        due_on: Some(field("due_on")),
        to_org_ids: form
            .iter()
            .filter(|(k, _)| k == "to_org_id")
            .map(|(_, v)| v.clone())
            .collect(),
    };
    match send(&state.db, &scope, &req, Some(&user.0.id)).await {
        Ok(id) => {
            auth::audit(
                &state.db,
                Some(&user.0.id),
                "send_guidance",
                &id,
                req.title.trim(),
            )
            .await?;
            Ok(Redirect::to("/guidance?done=1#sent").into_response())
        }
        Err(AppError::Unprocessable(msg)) => {
            render(
                &state,
                &headers,
                &user.0,
                StatusCode::UNPROCESSABLE_ENTITY,
                Some(msg),
                false,
            )
            .await
        }
        Err(e) => Err(e),
    }
}

#[derive(Deserialize)]
struct AckForm {
    csrf: String,
}

async fn ack_form(
    State(state): State<AppState>,
    headers: HeaderMap,
    user: CurrentUser,
    Path((id, org)): Path<(String, String)>,
    Form(form): Form<AckForm>,
) -> Result<Response, AppError> {
    check_csrf(&headers, &form.csrf)?;
    let scope = Scope::of(&state.db, &user.0).await?;
    own_target(&state.db, &scope, &id, &org).await?;
    may_act(&user.0)?;
    acknowledge(&state.db, &scope, &id, &org).await?;
    auth::audit(&state.db, Some(&user.0.id), "ack_guidance", &id, &org).await?;
    Ok(Redirect::to(&format!("/guidance#g-{id}")).into_response())
}

#[derive(Deserialize)]
struct ReplyForm {
    csrf: String,
    reply: String,
}

async fn reply_form(
    State(state): State<AppState>,
    headers: HeaderMap,
    user: CurrentUser,
    Path((id, org)): Path<(String, String)>,
    Form(form): Form<ReplyForm>,
) -> Result<Response, AppError> {
    check_csrf(&headers, &form.csrf)?;
    let scope = Scope::of(&state.db, &user.0).await?;
    own_target(&state.db, &scope, &id, &org).await?;
    may_act(&user.0)?;
    match answer(&state.db, &scope, &id, &org, &user.0, &form.reply).await {
        Ok(()) => {
            auth::audit(&state.db, Some(&user.0.id), "reply_guidance", &id, &org).await?;
            Ok(Redirect::to(&format!("/guidance#g-{id}")).into_response())
        }
        Err(AppError::Unprocessable(msg)) => {
            render(
                &state,
                &headers,
                &user.0,
                StatusCode::UNPROCESSABLE_ENTITY,
                Some(msg),
                false,
            )
            .await
        }
        Err(e) => Err(e),
    }
}
