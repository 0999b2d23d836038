//! # portal — the organisation portal and the HTTP face of dangjian
//!
//! Owns accounts and sign-in, roles and permissions, and (as the modules land) orgs, members,
//! messaging, notices, the newspaper, learning, sessions and the recordings catalogue: the REST API
//! under `/api/v1` (described by OpenAPI at `/api/v1/openapi.json`), the server-rendered zh-CN
//! pages, and the operational endpoints (`/healthz`, `/readyz`, `/metrics`). It is the only crate
//! that talks SQL.
//!
//! Main types: [`AppState`] (cheap to clone; every handler gets it), [`error::AppError`] (the one
//! error type, rendered as JSON), [`db::Db`] (SQLite or PostgreSQL behind one pool),
//! [`storage::Storage`] (local disk or S3), [`auth::CurrentUser`] (the signed-in user, checked on
//! every endpoint that needs one). Each module exposes `fn router() -> Router<AppState>`; [`app`]
//! merges them with the shared middleware.

pub mod api;
pub mod auth;
pub mod db;
pub mod dues;
pub mod error;
pub mod guidance;
pub mod idcard;
pub mod members;
pub mod metrics;
pub mod ops;
pub mod orglife;
pub mod orgs;
pub mod pages;
pub mod recordings;
pub mod rooms;
pub mod stats;
pub mod storage;
pub mod transfers;
pub mod xlsx;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use signaling::token::TokenKey;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use crate::auth::Throttle;
use crate::db::Db;
use crate::error::AppError;
use crate::metrics::Metrics;
use crate::storage::Storage;

/// Everything a handler may need. Clones share the same pools and counters.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub storage: Storage,
    pub tokens: TokenKey,
    pub throttle: Arc<Throttle>,
    pub metrics: Arc<Metrics>,
    pub templates: Arc<minijinja::Environment<'static>>,
    /// An argon2 hash of a random password, checked when a username is unknown so that a
    /// failed sign-in takes the same time whether or not the user exists.
    pub dummy_hash: String,
    /// Mark cookies `Secure` (when served behind HTTPS).
    pub secure_cookies: bool,
    /// New recordings expire this long after they start (`None`: kept until deleted).
    pub recording_retention: Option<Duration>,
    /// Live rooms (signaling and, through it, the media server).
    pub rooms: signaling::room::Rooms,
    /// Captures rooms and composes replays; the catalogue is [`recordings`].
    pub recorder: recorder::Recorder,
}

impl AppState {
    pub async fn new(
        db: Db,
        storage: Storage,
        tokens: TokenKey,
        secure_cookies: bool,
        rooms: signaling::room::Rooms,
        recorder: recorder::Recorder,
    ) -> anyhow::Result<AppState> {
        Ok(AppState {
            db,
            storage,
            tokens,
            throttle: Arc::new(Throttle::default()),
            metrics: Metrics::new(),
            templates: Arc::new(pages::templates()?),
            dummy_hash: auth::hash_password(auth::random_token()).await?,
            secure_cookies,
            rooms,
            recorder,
            recording_retention: None,
        })
    }
}

/// First start: make sure someone can sign in. Returns the generated password when one was made,
/// so the caller can print it once; with `password` given (from config) it is used instead.
pub async fn bootstrap_admin(db: &Db, password: Option<&str>) -> Result<Option<String>, AppError> {
    let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM users")
        .fetch_one(&db.pool)
        .await?;
    if count > 0 {
        return Ok(None);
    }
    let (password, generated) = match password {
        Some(p) => (p.to_string(), false),
        None => (auth::random_token()[..16].to_string(), true),
    };
    auth::create_user(
        db,
        "admin",
        "系统管理员",
        &password,
        auth::Role::SystemAdmin,
        generated,
    )
    .await?;
    Ok(generated.then_some(password))
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    Router::new()
        .merge(api::router())
        .merge(ops::router())
        .merge(pages::router())
        .merge(rooms::router())
        .merge(orgs::router())
        .merge(members::router())
        .merge(transfers::router())
        .merge(dues::router())
        .merge(orglife::router())
        .merge(guidance::router())
        .merge(stats::router())
        .merge(xlsx::router())
        .merge(recordings::router())
        .merge(signaling::ws::router(state.rooms.clone()))
        .fallback(pages::not_found)
        .layer(middleware::from_fn_with_state(state.clone(), metrics::track))
        .layer(middleware::from_fn(same_origin_guard))
        .layer(middleware::from_fn(security_headers))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get(&REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %id)
        }).on_response(DefaultOnResponse::new().level(tracing::Level::INFO)))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(60),
        ))
        .with_state(state)
}

/// CSRF defence for everything that changes state: a browser sending a request from another
/// site says so in `Sec-Fetch-Site` or `Origin`; refuse it. (Forms also carry a token.)
async fn same_origin_guard(req: Request, next: Next) -> Response {
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe && is_cross_site(&req) {
        return AppError::Forbidden("cross-site request refused".into()).into_response();
    }
    next.run(req).await
}

fn is_cross_site(req: &Request) -> bool {
    let h = req.headers();
    if h.get("sec-fetch-site").and_then(|v| v.to_str().ok()) == Some("cross-site") {
        return true;
    }
    let origin = h.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
    match (origin, host) {
        (Some("null"), _) => true,
        (Some(o), Some(host)) => url::Url::parse(o)
            .ok()
            .map(|u| {
                let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
                format!("{}{port}", u.host_str().unwrap_or("")) != host
            })
            .unwrap_or(true),
        _ => false,
    }
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    resp
}
