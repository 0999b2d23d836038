//! The organisation tree (committee → general branch → branch → group, any depth) and the rule
//! that decides what each user may see: their own subtree.
//!
//! Each org keeps its materialised path of ids from the root (`/a/b/c/`), so "the subtree of X"
//! is `path LIKE 'X's path%'` — one indexed range scan on both databases — and scoping is a
//! condition inside the query itself: an id from another subtree is simply not found (404), the
//! same answer as an id that does not exist, so guessing ids reveals nothing.

use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use minijinja::context;
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;

use crate::AppState;
use crate::auth::{self, CurrentUser, MaybeUser, Permission, Role, User};
use crate::db::{Db, new_id, now_ms};
use crate::error::{ApiJson, AppError, ErrorBody};

/// Longest org name, in characters.
pub const MAX_NAME_CHARS: usize = 100;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/orgs", get(list).post(create))
        .route(
            "/api/v1/orgs/{id}",
            get(get_one).patch(update).delete(dissolve),
        )
        .route("/api/v1/orgs/{id}/move", post(move_org))
        .route("/orgs", get(tree_page).post(create_form))
        .route("/orgs/{id}/rename", post(rename_form))
        .route("/orgs/{id}/move", post(move_form))
        .route("/orgs/{id}/dissolve", post(dissolve_form))
}

#[derive(OpenApi)]
#[openapi(paths(list, create, get_one, update, dissolve, move_org))]
pub struct OrgsApi;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OrgKind {
    /// 党委
    Committee,
    /// 党总支
    GeneralBranch,
    /// 党支部
    Branch,
    /// 党小组
    Group,
}

impl OrgKind {
    pub const ALL: [OrgKind; 4] = [
        OrgKind::Committee,
        OrgKind::GeneralBranch,
        OrgKind::Branch,
        OrgKind::Group,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OrgKind::Committee => "committee",
            OrgKind::GeneralBranch => "general_branch",
            OrgKind::Branch => "branch",
            OrgKind::Group => "group",
        }
    }

    pub fn parse(s: &str) -> Option<OrgKind> {
        OrgKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The Chinese name, as on pages and in spreadsheets.
    pub fn label(self) -> &'static str {
        match self {
            OrgKind::Committee => "党委",
            OrgKind::GeneralBranch => "党总支",
            OrgKind::Branch => "党支部",
            OrgKind::Group => "党小组",
        }
    }

    pub fn from_label(s: &str) -> Option<OrgKind> {
        OrgKind::ALL
            .into_iter()
            .find(|k| k.label() == s || k.as_str() == s)
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Org {
    pub id: String,
    pub parent_id: Option<String>,
    pub name: String,
    pub kind: OrgKind,
    pub code: Option<String>,
    /// Depth below the root of the whole tree (0 for a root).
    pub depth: usize,
    #[serde(skip)]
    pub path: String,
}

#[derive(sqlx::FromRow)]
struct OrgRow {
    id: String,
    parent_id: Option<String>,
    path: String,
    name: String,
    kind: String,
    code: Option<String>,
}

impl OrgRow {
    fn into_org(self) -> Result<Org, AppError> {
        let kind = OrgKind::parse(&self.kind)
            .ok_or_else(|| anyhow::anyhow!("org {} has unknown kind {}", self.id, self.kind))?;
        Ok(Org {
            depth: self.path.matches('/').count().saturating_sub(2),
            id: self.id,
            parent_id: self.parent_id,
            name: self.name,
            kind,
            code: self.code,
            path: self.path,
        })
    }
}

const COLUMNS: &str = "id, parent_id, path, name, kind, code";

/// What part of the tree a user may see and change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Paths in scope start with this: `/` for everything, an org's path for its subtree, and a
    /// string no path starts with for nothing at all.
    prefix: String,
    /// The user's own org (the root of their subtree), if scoped to one.
    pub root: Option<String>,
}

impl Scope {
    pub const ALL: &'static str = "/";
    /// Every path starts with `/`. (Not NUL: PostgreSQL refuses it in text, which made every
    /// scoped query of a user without an org fail there.)
    const NOTHING: &'static str = "!";

    pub fn everything() -> Scope {
        Scope {
            prefix: Self::ALL.into(),
            root: None,
        }
    }

    /// System admins see the whole tree; everyone else the subtree of their own org (nothing
    /// without one).
    pub async fn of(db: &Db, user: &User) -> Result<Scope, AppError> {
        if user.role == Role::SystemAdmin {
            return Ok(Scope::everything());
        }
        let Some(org) = &user.org_id else {
            return Ok(Scope {
                prefix: Self::NOTHING.into(),
                root: None,
            });
        };
        let path: Option<(String,)> = sqlx::query_as("SELECT path FROM orgs WHERE id = $1")
            .bind(org)
            .fetch_optional(&db.pool)
            .await?;
        Ok(match path {
            Some((p,)) => Scope {
                prefix: p,
                root: Some(org.clone()),
            },
            None => Scope {
                prefix: Self::NOTHING.into(),
                root: None,
            },
        })
    }

    /// The `LIKE` pattern matching every path in scope (bind it next to `path LIKE $n`).
    pub fn like(&self) -> String {
        format!("{}%", like_escape(&self.prefix))
    }

    pub fn contains_path(&self, path: &str) -> bool {
        path.starts_with(&self.prefix)
    }

    /// The org `id` if it is in scope, else 404.
    pub async fn org(&self, db: &Db, id: &str) -> Result<Org, AppError> {
        let sql = format!("SELECT {COLUMNS} FROM orgs WHERE id = $1 AND path LIKE $2 ESCAPE '\\'");
        sqlx::query_as::<_, OrgRow>(&sql)
            .bind(id)
            .bind(self.like())
            .fetch_optional(&db.pool)
            .await?
            .ok_or(AppError::NotFound)?
            .into_org()
    }

    /// Every org in scope, in tree order (parents before children, siblings by sort order and
    /// name).
    pub async fn orgs(&self, db: &Db) -> Result<Vec<Org>, AppError> {
        let sql =
            format!("SELECT {COLUMNS} FROM orgs WHERE path LIKE $1 ESCAPE '\\' ORDER BY path");
        let rows = sqlx::query_as::<_, OrgRow>(&sql)
            .bind(self.like())
            .fetch_all(&db.pool)
            .await?;
        let orgs = rows
            .into_iter()
            .map(OrgRow::into_org)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(tree_order(orgs))
    }
}

/// `%`, `_` and the escape character itself taken literally in a `LIKE … ESCAPE '\'` pattern.
pub fn like_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

/// Depth-first order with siblings sorted by name (paths are ids, which sort by creation time).
fn tree_order(orgs: Vec<Org>) -> Vec<Org> {
    use std::collections::HashMap;
    let ids: std::collections::HashSet<&str> = orgs.iter().map(|o| o.id.as_str()).collect();
    let mut children: HashMap<Option<String>, Vec<usize>> = HashMap::new();
    for (i, o) in orgs.iter().enumerate() {
        // A parent outside the list (the scope's root has one) makes this a root of the list.
        let parent = o.parent_id.clone().filter(|p| ids.contains(p.as_str()));
        children.entry(parent).or_default().push(i);
    }
    for list in children.values_mut() {
        list.sort_by(|a, b| orgs[*a].name.cmp(&orgs[*b].name));
    }
    let mut out = Vec::with_capacity(orgs.len());
    let mut stack: Vec<usize> = children.get(&None).cloned().unwrap_or_default();
    stack.reverse();
    while let Some(i) = stack.pop() {
        out.push(i);
        if let Some(kids) = children.get(&Some(orgs[i].id.clone())) {
            stack.extend(kids.iter().rev());
        }
    }
    let mut slots: Vec<Option<Org>> = orgs.into_iter().map(Some).collect();
    out.into_iter().filter_map(|i| slots[i].take()).collect()
}

/// Makes `user_id` keep (or belong to) `org_id`.
pub async fn assign_user(db: &Db, user_id: &str, org_id: &str) -> Result<(), AppError> {
    sqlx::query("UPDATE users SET org_id = $2, updated_at = $3 WHERE id = $1")
        .bind(user_id)
        .bind(org_id)
        .bind(now_ms())
        .execute(&db.pool)
        .await?;
    Ok(())
}

fn clean_name(name: &str) -> Result<String, AppError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return Err(AppError::Unprocessable(format!(
            "组织名称须为 1 至 {MAX_NAME_CHARS} 个字 (name must be 1 to {MAX_NAME_CHARS} characters)"
        )));
    }
    Ok(name.to_string())
}

fn clean_code(code: Option<&str>) -> Result<Option<String>, AppError> {
    match code.map(str::trim) {
        None | Some("") => Ok(None),
        Some(c) if c.chars().count() > 50 || c.chars().any(char::is_whitespace) => Err(
            AppError::Unprocessable("组织编码不能含空格，最多 50 个字符 (bad org code)".into()),
        ),
        Some(c) => Ok(Some(c.to_string())),
    }
}

/// Creates an org under `parent` (which must be in the creator's scope), or a new root (system
/// admins only).
pub async fn create_org(
    db: &Db,
    scope: &Scope,
    parent: Option<&str>,
    name: &str,
    kind: OrgKind,
    code: Option<&str>,
) -> Result<Org, AppError> {
    let name = clean_name(name)?;
    let code = clean_code(code)?;
    let parent_path = match parent {
        Some(p) => scope.org(db, p).await?.path,
        None if scope.prefix == Scope::ALL => "/".to_string(),
        None => {
            return Err(AppError::Forbidden(
                "只有系统管理员可以建立顶级组织 (only system admins create top-level orgs)".into(),
            ));
        }
    };
    let id = new_id();
    let path = format!("{parent_path}{id}/");
    let now = now_ms();
    let inserted = sqlx::query(
        "INSERT INTO orgs (id, parent_id, path, name, kind, code, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
    )
    .bind(&id)
    .bind(parent)
    .bind(&path)
    .bind(&name)
    .bind(kind.as_str())
    .bind(&code)
    .bind(now)
    .execute(&db.pool)
    .await;
    match inserted {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            return Err(AppError::Conflict(format!(
                "组织编码 {} 已被使用 (org code taken)",
                code.unwrap_or_default()
            )));
        }
        other => other?,
    };
    Ok(Org {
        depth: path.matches('/').count().saturating_sub(2),
        id,
        parent_id: parent.map(str::to_string),
        name,
        kind,
        code,
        path,
    })
}

/// Moves `org` (with its subtree) under `new_parent`. Both must be in scope; the scope's own
/// root cannot be moved by its keeper, and nothing moves under itself.
pub async fn move_subtree(
    db: &Db,
    scope: &Scope,
    org: &str,
    new_parent: &str,
) -> Result<Org, AppError> {
    let o = scope.org(db, org).await?;
    if scope.root.as_deref() == Some(org) {
        return Err(AppError::Forbidden(
            "不能移动自己管理的根组织 (you cannot move the root of your own subtree)".into(),
        ));
    }
    let p = scope.org(db, new_parent).await?;
    if p.path.starts_with(&o.path) {
        return Err(AppError::Unprocessable(
            "不能把组织移到它自己或其下级之下 (cannot move an org under itself)".into(),
        ));
    }
    let new_path = format!("{}{}/", p.path, o.id);
    let mut tx = db.pool.begin().await?;
    sqlx::query(
        "UPDATE orgs SET path = $1 || substr(path, CAST($2 AS INTEGER)), updated_at = $3 WHERE path LIKE $4 ESCAPE '\\'",
    )
    .bind(&new_path)
    .bind(i64::try_from(o.path.len() + 1).unwrap_or(i64::MAX))
    .bind(now_ms())
    .bind(format!("{}%", like_escape(&o.path)))
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE orgs SET parent_id = $2 WHERE id = $1")
        .bind(&o.id)
        .bind(&p.id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    scope.org(db, org).await
}

/// Removes an org that has no sub-orgs, members or users left.
pub async fn dissolve_org(db: &Db, scope: &Scope, id: &str) -> Result<(), AppError> {
    let o = scope.org(db, id).await?;
    if scope.root.as_deref() == Some(id) {
        return Err(AppError::Forbidden(
            "不能撤销自己管理的根组织 (you cannot dissolve the root of your own subtree)".into(),
        ));
    }
    let count = |sql: &'static str| {
        let id = o.id.clone();
        async move {
            let (n,): (i64,) = sqlx::query_as(sql).bind(id).fetch_one(&db.pool).await?;
            Ok::<i64, AppError>(n)
        }
    };
    let children = count("SELECT COUNT(*) FROM orgs WHERE parent_id = $1").await?;
    let members = count("SELECT COUNT(*) FROM members WHERE org_id = $1").await?;
    let users = count("SELECT COUNT(*) FROM users WHERE org_id = $1").await?;
    if children + members + users > 0 {
        return Err(AppError::Conflict(format!(
            "组织不为空：下级组织 {children} 个、党员 {members} 名、用户 {users} 个；请先转移 (not empty)"
        )));
    }
    sqlx::query("DELETE FROM orgs WHERE id = $1")
        .bind(&o.id)
        .execute(&db.pool)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// REST
// ---------------------------------------------------------------------------------------------

/// The orgs the caller may see, in tree order.
#[utoipa::path(get, path = "/api/v1/orgs", responses((status = 200, body = [Org]), (status = 401, body = ErrorBody)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    user: CurrentUser,
) -> Result<Json<Vec<Org>>, AppError> {
    let scope = Scope::of(&state.db, &user.0).await?;
    Ok(Json(scope.orgs(&state.db).await?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct NewOrg {
    /// Omitted only by system admins, for a new top-level org.
    #[serde(default)]
    pub parent_id: Option<String>,
    pub name: String,
    pub kind: OrgKind,
    #[serde(default)]
    pub code: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/orgs", request_body = NewOrg, responses(
    (status = 201, body = Org), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn create(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(req): ApiJson<NewOrg>,
) -> Result<(StatusCode, Json<Org>), AppError> {
    let me = user.require(Permission::ManageOrgs)?;
    let scope = Scope::of(&state.db, me).await?;
    let org = create_org(
        &state.db,
        &scope,
        req.parent_id.as_deref(),
        &req.name,
        req.kind,
        req.code.as_deref(),
    )
    .await?;
    auth::audit(&state.db, Some(&me.id), "create_org", &org.id, &org.name).await?;
    Ok((StatusCode::CREATED, Json(org)))
}

#[utoipa::path(get, path = "/api/v1/orgs/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Org), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_one(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Org>, AppError> {
    let scope = Scope::of(&state.db, &user.0).await?;
    Ok(Json(scope.org(&state.db, &id).await?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct OrgPatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub kind: Option<OrgKind>,
    #[serde(default)]
    pub code: Option<String>,
}

/// Rename, re-type or re-code an org.
#[utoipa::path(patch, path = "/api/v1/orgs/{id}", params(("id" = String, Path)), request_body = OrgPatch,
    responses((status = 200, body = Org), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn update(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<OrgPatch>,
) -> Result<Json<Org>, AppError> {
    let me = user.require(Permission::ManageOrgs)?;
    let scope = Scope::of(&state.db, me).await?;
    let o = scope.org(&state.db, &id).await?;
    let name = match &req.name {
        Some(n) => clean_name(n)?,
        None => o.name.clone(),
    };
    let code = match &req.code {
        Some(c) => clean_code(Some(c))?,
        None => o.code.clone(),
    };
    let kind = req.kind.unwrap_or(o.kind);
    let updated = sqlx::query(
        "UPDATE orgs SET name = $2, kind = $3, code = $4, updated_at = $5 WHERE id = $1",
    )
    .bind(&o.id)
    .bind(&name)
    .bind(kind.as_str())
    .bind(&code)
    .bind(now_ms())
    .execute(&state.db.pool)
    .await;
    match updated {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            return Err(AppError::Conflict(
                "组织编码已被使用 (org code taken)".into(),
            ));
        }
        other => other?,
    };
    auth::audit(&state.db, Some(&me.id), "update_org", &o.id, &name).await?;
    Ok(Json(scope.org(&state.db, &id).await?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct MoveOrg {
    pub parent_id: String,
}

/// Move an org and its whole subtree under another org.
#[utoipa::path(post, path = "/api/v1/orgs/{id}/move", params(("id" = String, Path)), request_body = MoveOrg,
    responses((status = 200, body = Org), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn move_org(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<MoveOrg>,
) -> Result<Json<Org>, AppError> {
    let me = user.require(Permission::ManageOrgs)?;
    let scope = Scope::of(&state.db, me).await?;
    let org = move_subtree(&state.db, &scope, &id, &req.parent_id).await?;
    auth::audit(&state.db, Some(&me.id), "move_org", &id, &req.parent_id).await?;
    Ok(Json(org))
}

/// Dissolve an empty org (no sub-orgs, members or users).
#[utoipa::path(delete, path = "/api/v1/orgs/{id}", params(("id" = String, Path)),
    responses((status = 204, description = "Dissolved"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn dissolve(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    let me = user.require(Permission::ManageOrgs)?;
    let scope = Scope::of(&state.db, me).await?;
    dissolve_org(&state.db, &scope, &id).await?;
    auth::audit(&state.db, Some(&me.id), "dissolve_org", &id, "").await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------------
// Pages
// ---------------------------------------------------------------------------------------------

/// `/orgs`: the caller's part of the tree, with the forms to change it for those who may.
async fn tree_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    MaybeUser(user): MaybeUser,
) -> Result<Response, AppError> {
    let Some(user) = user else {
        return Ok(Redirect::to("/login?next=/orgs").into_response());
    };
    render_tree(&state, &headers, &user, None).await
}

async fn render_tree(
    state: &AppState,
    headers: &HeaderMap,
    user: &User,
    error: Option<String>,
) -> Result<Response, AppError> {
    let scope = Scope::of(&state.db, user).await?;
    let orgs = scope.orgs(&state.db).await?;
    let top = orgs.iter().map(|o| o.depth).min().unwrap_or(0);
    let rows: Vec<_> = orgs
        .iter()
        .map(|o| {
            context! {
                id => o.id, name => o.name, code => o.code, kind_label => o.kind.label(),
                depth_in_view => o.depth - top,
                is_root => scope.root.as_deref() == Some(o.id.as_str()),
            }
        })
        .collect();
    let kinds: Vec<_> = OrgKind::ALL
        .iter()
        .map(|k| context! { key => k.as_str(), label => k.label() })
        .collect();
    let ctx = context! {
        user => user, orgs => rows, kinds => kinds, error => error,
        can_manage => user.role.allows(Permission::ManageOrgs),
        can_create_root => user.role == Role::SystemAdmin,
    };
    let status = if error.is_some() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    let mut resp = crate::pages::render_page(state, headers, "orgs.html", ctx)?.into_response();
    *resp.status_mut() = status;
    Ok(resp)
}

#[derive(Deserialize)]
struct OrgForm {
    csrf: String,
    #[serde(default)]
    parent_id: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    kind: Option<String>,
}

/// Runs a form's change; a refused change shows the tree again with the reason.
async fn form_outcome(
    state: &AppState,
    headers: &HeaderMap,
    user: &User,
    csrf: &str,
    change: impl std::future::Future<Output = Result<(), AppError>>,
) -> Result<Response, AppError> {
    if !auth::csrf_ok(headers, csrf) {
        return Err(AppError::Forbidden(
            "页面已过期，请刷新后重试。(form expired)".into(),
        ));
    }
    match change.await {
        Ok(()) => Ok(Redirect::to("/orgs").into_response()),
        Err(
            e @ (AppError::Unprocessable(_)
            | AppError::Conflict(_)
            | AppError::Forbidden(_)
            | AppError::NotFound),
        ) => render_tree(state, headers, user, Some(e.to_string())).await,
        Err(e) => Err(e),
    }
}

async fn create_form(
    State(state): State<AppState>,
    headers: HeaderMap,
    user: CurrentUser,
    Form(f): Form<OrgForm>,
) -> Result<Response, AppError> {
    let me = user.require(Permission::ManageOrgs)?;
    let change = async {
        let scope = Scope::of(&state.db, me).await?;
        let kind = f
            .kind
            .as_deref()
            .and_then(OrgKind::parse)
            .ok_or_else(|| AppError::Unprocessable("请选择组织类型 (choose a kind)".into()))?;
        let parent = f.parent_id.as_deref().filter(|p| !p.is_empty());
        let org = create_org(&state.db, &scope, parent, &f.name, kind, None).await?;
        auth::audit(&state.db, Some(&me.id), "create_org", &org.id, &org.name).await
    };
    form_outcome(&state, &headers, me, &f.csrf, change).await
}

async fn rename_form(
    State(state): State<AppState>,
    headers: HeaderMap,
    user: CurrentUser,
    Path(id): Path<String>,
    Form(f): Form<OrgForm>,
) -> Result<Response, AppError> {
    let me = user.require(Permission::ManageOrgs)?;
    let change = async {
        let scope = Scope::of(&state.db, me).await?;
        let o = scope.org(&state.db, &id).await?;
        let name = clean_name(&f.name)?;
        sqlx::query("UPDATE orgs SET name = $2, updated_at = $3 WHERE id = $1")
            .bind(&o.id)
            .bind(&name)
            .bind(now_ms())
            .execute(&state.db.pool)
            .await?;
        auth::audit(&state.db, Some(&me.id), "update_org", &o.id, &name).await
    };
    form_outcome(&state, &headers, me, &f.csrf, change).await
}

async fn move_form(
    State(state): State<AppState>,
    headers: HeaderMap,
    user: CurrentUser,
    Path(id): Path<String>,
    Form(f): Form<OrgForm>,
) -> Result<Response, AppError> {
    let me = user.require(Permission::ManageOrgs)?;
    let change = async {
        let scope = Scope::of(&state.db, me).await?;
        let parent = f.parent_id.clone().unwrap_or_default();
        move_subtree(&state.db, &scope, &id, &parent).await?;
        auth::audit(&state.db, Some(&me.id), "move_org", &id, &parent).await
    };
    form_outcome(&state, &headers, me, &f.csrf, change).await
}

async fn dissolve_form(
    State(state): State<AppState>,
    headers: HeaderMap,
    user: CurrentUser,
    Path(id): Path<String>,
    Form(f): Form<OrgForm>,
) -> Result<Response, AppError> {
    let me = user.require(Permission::ManageOrgs)?;
    let change = async {
        let scope = Scope::of(&state.db, me).await?;
        dissolve_org(&state.db, &scope, &id).await?;
        auth::audit(&state.db, Some(&me.id), "dissolve_org", &id, "").await
    };
    form_outcome(&state, &headers, me, &f.csrf, change).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn org(id: &str, parent: Option<&str>, name: &str) -> Org {
        Org {
            id: id.into(),
            parent_id: parent.map(str::to_string),
            name: name.into(),
            kind: OrgKind::Branch,
            code: None,
            depth: 0,
            path: String::new(),
        }
    }

    #[test]
    fn tree_order_puts_children_under_parents_sorted_by_name() {
        let got: Vec<String> = tree_order(vec![
            org("c", Some("a"), "乙支部"),
            org("a", None, "党委"),
            org("b", Some("a"), "甲支部"),
            org("d", Some("b"), "第一小组"),
        ])
        .into_iter()
        .map(|o| o.id)
        .collect();
        assert_eq!(got, ["a", "c", "b", "d"]);
    }

    #[test]
    fn like_patterns_take_wildcards_literally() {
        assert_eq!(like_escape("/a_b%/"), "/a\\_b\\%/");
        let s = Scope {
            prefix: "/x/".into(),
            root: Some("x".into()),
        };
        assert_eq!(s.like(), "/x/%");
        assert!(s.contains_path("/x/y/") && !s.contains_path("/xy/"));
    }

    #[test]
    fn kinds_parse_from_code_or_chinese() {
        assert_eq!(OrgKind::from_label("党支部"), Some(OrgKind::Branch));
        assert_eq!(
            OrgKind::from_label("general_branch"),
            Some(OrgKind::GeneralBranch)
        );
        assert_eq!(OrgKind::from_label("支部"), None);
    }
}
