//! Live rooms from the portal's side: the meeting page, the room list, and the room service API
//! (list, mute, remove, close) for hosts and admins.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use minijinja::context;
use serde::Deserialize;
use signaling::room::RoomError;
use signaling::token::{Grants, TokenRequest, validate_name};

use crate::AppState;
use crate::api::token_error;
use crate::auth::{CurrentUser, MaybeUser, Permission, User};
use crate::error::{AppError, ErrorBody};

const ROOM_JS: &str = include_str!("../../web/static/room.js");
const ROOM_CSS: &str = include_str!("../../web/static/room.css");

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/room/{room}", get(room_page))
        .route("/rooms", get(rooms_page))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route(
            "/static/room.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    ROOM_JS,
                )
            }),
        )
        .route(
            "/static/room.css",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
                    ROOM_CSS,
                )
            }),
        )
        .route("/api/v1/rooms", get(list_rooms))
        .route("/api/v1/rooms/{room}", get(get_room).delete(close_room))
        .route(
            "/api/v1/rooms/{room}/participants/{identity}",
            delete(remove_participant),
        )
        .route(
            "/api/v1/rooms/{room}/participants/{identity}/mute",
            post(mute_participant),
        )
}

/// A token for a signed-in user, with grants from the role.
pub fn user_token(
    state: &AppState,
    user: &User,
    room: &str,
    ttl: Duration,
) -> Result<String, AppError> {
    let grants = Grants {
        admin: user.role.allows(Permission::HostRooms),
        record: user.role.allows(Permission::RecordRooms),
        ..Grants::PARTICIPANT
    };
    state.metrics.tokens_minted.inc();
    state
        .tokens
        .mint(&TokenRequest {
            room: room.into(),
            identity: user.username.clone(),
            name: user.display_name.clone(),
            grants,
            ttl,
        })
        .map_err(token_error)
}

#[derive(Deserialize)]
struct RoomQuery {
    token: Option<String>,
}

/// `/room/{room}?token=…`, or for a signed-in user a token minted here.
async fn room_page(
    State(state): State<AppState>,
    Path(room): Path<String>,
    Query(q): Query<RoomQuery>,
    MaybeUser(user): MaybeUser,
) -> Result<Response, AppError> {
    validate_name("room", &room).map_err(token_error)?;
    let (token, name) = match (q.token, user) {
        (Some(t), _) => {
            let claims = state
                .tokens
                .verify_for_room(&t, &room)
                .map_err(token_error)?;
            (t, claims.name)
        }
        (None, Some(u)) => {
            if !u.role.allows(Permission::JoinRooms) {
                return Err(AppError::Forbidden("你没有加入会议的权限".into()));
            }
            (
                user_token(&state, &u, &room, Duration::from_secs(4 * 3600))?,
                u.display_name.clone(),
            )
        }
        (None, None) => {
            // The name is one path segment again: `?`, `#`, `%` or a space in it must survive
            // the trip through sign-in.
            let next = format!("/room/{}", url_escape(&room).replace('+', "%20"));
            return Ok(Redirect::to(&format!("/login?next={}", url_escape(&next))).into_response());
        }
    };
    let tmpl = state
        .templates
        .get_template("room.html")
        .map_err(|e| anyhow::anyhow!(e))?;
    let html = tmpl
        .render(context! { room => room, token => token, name => name })
        .map_err(|e| anyhow::anyhow!(e))?;
    Ok(([(header::CACHE_CONTROL, "no-store")], Html(html)).into_response())
}

fn url_escape(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn rooms_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    MaybeUser(user): MaybeUser,
) -> Result<Response, AppError> {
    let Some(user) = user else {
        return Ok(Redirect::to("/login?next=/rooms").into_response());
    };
    let rooms = state.rooms.list();
    let page = crate::pages::render_page(
        &state,
        &headers,
        "rooms.html",
        context! { user => user, rooms => rooms },
    )?;
    Ok(page.into_response())
}

fn host(user: &CurrentUser) -> Result<(), AppError> {
    user.require(Permission::HostRooms).map(|_| ())
}

fn room_error(e: RoomError) -> AppError {
    match e {
        RoomError::NoRoom | RoomError::NoParticipant => AppError::NotFound,
        RoomError::NotAllowed(m) => AppError::Forbidden(m.into()),
        RoomError::Media(m) => AppError::Internal(anyhow::anyhow!(m)),
    }
}

/// Live rooms and who is in them (hosts and admins).
#[utoipa::path(get, path = "/api/v1/rooms", responses((status = 200, description = "Rooms with their participants"), (status = 403, body = ErrorBody)))]
pub(crate) async fn list_rooms(
    State(state): State<AppState>,
    user: CurrentUser,
) -> Result<Json<serde_json::Value>, AppError> {
    host(&user)?;
    Ok(Json(
        serde_json::to_value(state.rooms.list()).map_err(|e| anyhow::anyhow!(e))?,
    ))
}

/// One live room.
#[utoipa::path(get, path = "/api/v1/rooms/{room}", params(("room" = String, Path)), responses((status = 200, description = "The room"), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_room(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(room): Path<String>,
) -> Result<Json<serde_json::Value>, AppError> {
    host(&user)?;
    let r = state.rooms.room(&room).ok_or(AppError::NotFound)?;
    Ok(Json(
        serde_json::to_value(r).map_err(|e| anyhow::anyhow!(e))?,
    ))
}

/// Close a room: everyone is disconnected.
#[utoipa::path(delete, path = "/api/v1/rooms/{room}", params(("room" = String, Path)), responses((status = 204, description = "Closed"), (status = 404, body = ErrorBody)))]
pub(crate) async fn close_room(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(room): Path<String>,
) -> Result<StatusCode, AppError> {
    host(&user)?;
    state.rooms.close_room(&room).map_err(room_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Remove a participant from a room.
#[utoipa::path(delete, path = "/api/v1/rooms/{room}/participants/{identity}", params(("room" = String, Path), ("identity" = String, Path)), responses((status = 204, description = "Removed"), (status = 404, body = ErrorBody)))]
pub(crate) async fn remove_participant(
    State(state): State<AppState>,
    user: CurrentUser,
    Path((room, identity)): Path<(String, String)>,
) -> Result<StatusCode, AppError> {
    host(&user)?;
    state
        .rooms
        .remove_participant(&room, &identity)
        .map_err(room_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Mute a participant's microphone.
#[utoipa::path(post, path = "/api/v1/rooms/{room}/participants/{identity}/mute", params(("room" = String, Path), ("identity" = String, Path)), responses((status = 204, description = "Muted"), (status = 404, body = ErrorBody)))]
pub(crate) async fn mute_participant(
    State(state): State<AppState>,
    user: CurrentUser,
    Path((room, identity)): Path<(String, String)>,
) -> Result<StatusCode, AppError> {
    let by = host(&user).map(|_| user.0.username.clone())?;
    state
        .rooms
        .mute_participant(&room, &by, &identity)
        .map_err(room_error)?;
    Ok(StatusCode::NO_CONTENT)
}
