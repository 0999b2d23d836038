//! The REST API under `/api/v1`: sessions, the current user, users, media tokens.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use signaling::token::{Claims, TokenError};
use utoipa::OpenApi;

use crate::AppState;
use crate::auth::{self, CurrentUser, Permission, Role, User};
use crate::error::{ApiJson, AppError, ErrorBody};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/session", post(sign_in).delete(sign_out))
        .route("/api/v1/me", get(me))
        .route("/api/v1/me/password", put(change_password))
        .route("/api/v1/users", get(list_users).post(create_user))
        .route("/api/v1/rooms/{room}/tokens", post(room_token))
        .route("/api/v1/rooms/{room}/validate", get(validate_token))
}

#[derive(OpenApi)]
#[openapi(
    info(title = "dangjian", description = "REST API of the dangjian server"),
    paths(
        sign_in,
        sign_out,
        me,
        change_password,
        list_users,
        create_user,
        room_token,
        validate_token,
        crate::ops::healthz,
        crate::ops::readyz,
        crate::ops::metrics,
        crate::ops::openapi,
        crate::rooms::list_rooms,
        crate::rooms::get_room,
        crate::rooms::close_room,
        crate::rooms::remove_participant,
        crate::rooms::mute_participant
    ),
    components(schemas(
        LoginRequest,
        PasswordChange,
        NewUser,
        TokenResponse,
        User,
        Role,
        ErrorBody,
        crate::ops::Readiness,
        ClaimsView,
        GrantsView
    ))
)]
pub struct ApiDoc;

/// The client's address, when the server was started with connection info.
pub struct ClientIp(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
}

/// Sign in; sets the session cookie.
#[utoipa::path(post, path = "/api/v1/session", request_body = LoginRequest, responses(
    (status = 200, description = "Signed in", body = User),
    (status = 400, description = "Malformed body", body = ErrorBody),
    (status = 401, description = "Wrong username or password", body = ErrorBody),
    (status = 429, description = "Too many failures; wait Retry-After seconds", body = ErrorBody),
))]
async fn sign_in(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<Response, AppError> {
    let (user, token) = auth::sign_in(&state, &req.username, &req.password, ip).await?;
    Ok((
        [(
            header::SET_COOKIE,
            auth::session_cookie(&token, state.secure_cookies),
        )],
        Json(user),
    )
        .into_response())
}

/// Sign out; ends the session and clears the cookie.
#[utoipa::path(delete, path = "/api/v1/session", responses((status = 204, description = "Signed out")))]
async fn sign_out(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, AppError> {
    if let Some(token) = auth::cookie(&headers, auth::SESSION_COOKIE) {
        auth::end_session(&state.db, token).await?;
    }
    Ok((
        StatusCode::NO_CONTENT,
        [(header::SET_COOKIE, auth::clear_session_cookie())],
    )
        .into_response())
}

/// The signed-in user.
#[utoipa::path(get, path = "/api/v1/me", responses(
    (status = 200, body = User), (status = 401, body = ErrorBody)))]
async fn me(user: CurrentUser) -> Json<User> {
    Json(user.0)
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct PasswordChange {
    pub current_password: String,
    pub new_password: String,
}

/// Change one's own password (other sessions stay signed in).
#[utoipa::path(put, path = "/api/v1/me/password", request_body = PasswordChange, responses(
    (status = 204, description = "Changed"),
    (status = 400, body = ErrorBody),
    (status = 401, body = ErrorBody)))]
async fn change_password(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(req): ApiJson<PasswordChange>,
) -> Result<StatusCode, AppError> {
    change_own_password(&state, &user.0, &req.current_password, &req.new_password).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Shared by the API and the password page.
pub async fn change_own_password(
    state: &AppState,
    user: &User,
    current: &str,
    new: &str,
) -> Result<(), AppError> {
    let row = auth::find_user_by_name(&state.db, &user.username)
        .await?
        .ok_or(AppError::NotFound)?;
    if !auth::verify_password(current.to_string(), row.password_hash).await {
        return Err(AppError::BadRequest(
            "当前密码不正确 (current password is wrong)".into(),
        ));
    }
    auth::check_new_password(new)?;
    auth::set_password(&state.db, &user.id, new).await?;
    auth::audit(
        &state.db,
        Some(&user.id),
        "change_password",
        &user.username,
        "",
    )
    .await
}

/// All users (system admins only).
#[utoipa::path(get, path = "/api/v1/users", responses(
    (status = 200, body = Vec<User>), (status = 403, body = ErrorBody)))]
async fn list_users(
    State(state): State<AppState>,
    user: CurrentUser,
) -> Result<Json<Vec<User>>, AppError> {
    user.require(Permission::ManageUsers)?;
    let sql = format!("SELECT {} FROM users ORDER BY username", auth::USER_COLUMNS);
    let rows = sqlx::query_as::<_, auth::UserRow>(&sql)
        .fetch_all(&state.db.pool)
        .await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| r.into_user())
            .collect::<Result<_, _>>()?,
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct NewUser {
    pub username: String,
    pub display_name: String,
    /// Initial password; the user must change it at first sign-in.
    pub password: String,
    pub role: Role,
    /// The org whose subtree the user keeps (org admins, secretaries) or belongs to; it must be
    /// within the creating admin's own subtree.
    #[serde(default)]
    pub org_id: Option<String>,
}

/// Create a user (system admins only).
#[utoipa::path(post, path = "/api/v1/users", request_body = NewUser, responses(
    (status = 201, body = User), (status = 400, body = ErrorBody),
    (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_user(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(req): ApiJson<NewUser>,
) -> Result<(StatusCode, Json<User>), AppError> {
    let admin = user.require(Permission::ManageUsers)?;
    auth::check_new_password(&req.password)?;
    let display = if req.display_name.trim().is_empty() {
        req.username.clone()
    } else {
        req.display_name.clone()
    };
    let scope = crate::orgs::Scope::of(&state.db, admin).await?;
    if let Some(org) = &req.org_id {
        scope.org(&state.db, org).await?;
    }
    let mut created = auth::create_user(
        &state.db,
        &req.username,
        &display,
        &req.password,
        req.role,
        true,
    )
    .await?;
    if let Some(org) = req.org_id {
        crate::orgs::assign_user(&state.db, &created.id, &org).await?;
        created.org_id = Some(org);
    }
    auth::audit(
        &state.db,
        Some(&admin.id),
        "create_user",
        &created.username,
        created.role.as_str(),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct TokenResponse {
    pub token: String,
    pub room: String,
    pub identity: String,
    pub expires_in: u64,
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct TokenQuery {
    /// Lifetime in seconds (default 7200, at most 86400).
    pub ttl: Option<u64>,
}

const MAX_TOKEN_TTL: u64 = 24 * 3600;

/// A media access token for the signed-in user to join `room`.
#[utoipa::path(post, path = "/api/v1/rooms/{room}/tokens",
    params(("room" = String, Path, description = "Room name"), TokenQuery),
    responses((status = 200, body = TokenResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn room_token(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(room): Path<String>,
    Query(q): Query<TokenQuery>,
) -> Result<Json<TokenResponse>, AppError> {
    let u = user.require(Permission::JoinRooms)?;
    let ttl = q.ttl.unwrap_or(7200);
    if ttl == 0 || ttl > MAX_TOKEN_TTL {
        return Err(AppError::BadRequest(format!(
            "ttl must be 1 to {MAX_TOKEN_TTL} seconds"
        )));
    }
    let token = crate::rooms::user_token(&state, u, &room, Duration::from_secs(ttl))?;
    Ok(Json(TokenResponse {
        token,
        room,
        identity: u.username.clone(),
        expires_in: ttl,
    }))
}

pub fn token_error(e: TokenError) -> AppError {
    match e {
        TokenError::BadRequest(m) => AppError::BadRequest(m),
        TokenError::WrongRoom { .. } => AppError::Forbidden(e.to_string()),
        TokenError::Expired | TokenError::Invalid(_) => AppError::Unauthorized(e.to_string()),
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct GrantsView {
    pub publish: bool,
    pub subscribe: bool,
    pub data: bool,
    pub admin: bool,
    pub record: bool,
}

/// What a valid token says.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ClaimsView {
    pub identity: String,
    pub name: String,
    pub room: String,
    pub grants: GrantsView,
    pub expires_at: u64,
}

impl From<Claims> for ClaimsView {
    fn from(c: Claims) -> Self {
        let g = c.grants;
        ClaimsView {
            identity: c.sub,
            name: c.name,
            room: c.room,
            grants: GrantsView {
                publish: g.publish,
                subscribe: g.subscribe,
                data: g.data,
                admin: g.admin,
                record: g.record,
            },
            expires_at: c.exp,
        }
    }
}

/// Checks an access token (`Authorization: Bearer …` or `?access_token=`) for `room`, as the
/// WebSocket does before an upgrade.
#[utoipa::path(get, path = "/api/v1/rooms/{room}/validate",
    params(("room" = String, Path, description = "Room name")),
    responses((status = 200, body = ClaimsView),
        (status = 401, description = "Missing, forged or expired token", body = ErrorBody),
        (status = 403, description = "Token for another room", body = ErrorBody)))]
async fn validate_token(
    State(state): State<AppState>,
    Path(room): Path<String>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Json<ClaimsView>, AppError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or(q.get("access_token").map(String::as_str))
        .ok_or_else(|| AppError::Unauthorized("missing access token".into()))?;
    let claims = state
        .tokens
        .verify_for_room(token, &room)
        .map_err(token_error)?;
    Ok(Json(claims.into()))
}
