//! The recordings catalogue: starting and stopping captures of a room (through
//! [`recorder::Recorder`]), the catalogue API under `/api/v1/recordings`, the replay media with
//! HTTP Range support, comments (学习心得) and chapter marks, the library and replay pages, and the
//! background work: finishing recordings a crash left behind, captures that ended on their own,
//! start/stop requests from inside a room, and deleting expired recordings.
//!
//! Who may watch what is decided in one place, [`can_watch`]; every read path goes through it.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use minijinja::context;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use recorder::RecorderEvent;
use serde::{Deserialize, Serialize};
use signaling::room::RecordRequest;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;
use utoipa::OpenApi;

use crate::AppState;
use crate::auth::{self, CurrentUser, MaybeUser, Permission, Role, User};
use crate::db::{Db, new_id, now_ms};
use crate::error::{ApiJson, AppError, ErrorBody};

/// Longest comment, in characters.
pub const MAX_COMMENT_CHARS: usize = 2000;
/// Longest title or mark label, in characters.
pub const MAX_TITLE_CHARS: usize = 200;
/// How often expired recordings are looked for. A recording expires `recording_retention` after
/// it starts (configuration; default never), or when its `expires_at` is set through `PATCH`.
pub const RETENTION_SWEEP: Duration = Duration::from_secs(3600);
/// Page size of the library page.
const PAGE_SIZE: usize = 20;
/// Times on pages are Beijing time.
const UTC_OFFSET_SECS: i32 = 8 * 3600;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/rooms/{room}/recordings", post(start))
        .route("/api/v1/recordings", get(list))
        .route(
            "/api/v1/recordings/{id}",
            get(get_one).patch(update).delete(remove),
        )
        .route("/api/v1/recordings/{id}/stop", post(stop))
        .route("/api/v1/recordings/{id}/media", get(media))
        .route("/api/v1/recordings/{id}/originals/{track}", get(original))
        .route(
            "/api/v1/recordings/{id}/comments",
            get(list_comments).post(post_comment),
        )
        .route("/api/v1/recordings/{id}/marks", post(post_mark))
        .route("/recordings", get(library_page))
        .route("/recordings/{id}", get(replay_page))
        .route("/recordings/{id}/comments", post(comment_form))
        .route("/recordings/{id}/publish", post(publish_form))
        .route("/recordings/{id}/stop", post(stop_form))
        .route("/recordings/{id}/delete", post(delete_form))
}

/// The recordings part of the OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    paths(
        start,
        stop,
        list,
        get_one,
        update,
        remove,
        media,
        original,
        list_comments,
        post_comment,
        post_mark
    ),
    components(schemas(
        Status,
        Recording,
        RecordingDetail,
        OriginalFile,
        RecordingList,
        NewRecording,
        RecordingPatch,
        Comment,
        NewComment,
        Mark,
        MarkKind,
        CreatedId,
        ErrorBody
    ))
)]
pub struct RecordingsApi;

// ---------------------------------------------------------------------------------------------
// The catalogue entry
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Capturing now.
    Recording,
    /// Capture over; the replay is being composed.
    Processing,
    /// The replay can be watched.
    Ready,
    /// No replay; `failure` says why.
    Failed,
}

impl Status {
    pub const ALL: [Status; 4] = [
        Status::Recording,
        Status::Processing,
        Status::Ready,
        Status::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Recording => "recording",
            Status::Processing => "processing",
            Status::Ready => "ready",
            Status::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// The badge on pages.
    pub fn label(self) -> &'static str {
        match self {
            Status::Recording => "录制中",
            Status::Processing => "处理中",
            Status::Ready => "可回放",
            Status::Failed => "失败",
        }
    }
}

/// A recording as the catalogue lists it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Recording {
    pub id: String,
    pub room: String,
    pub title: String,
    pub org_id: Option<String>,
    /// The user id of whoever started it.
    pub created_by: String,
    pub created_by_name: Option<String>,
    pub status: Status,
    pub failure: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub started_at: i64,
    pub ended_at: Option<i64>,
    pub duration_ms: i64,
    pub size_bytes: i64,
    /// The replay's tracks (participant, kind, source, codec).
    #[schema(value_type = Vec<Object>)]
    pub tracks: serde_json::Value,
    pub published: bool,
    pub views: i64,
    pub expires_at: Option<i64>,
    /// Where to stream the replay from, once it is ready.
    pub media_url: Option<String>,
    #[serde(skip)]
    media_key: Option<String>,
    /// The owning org's materialised path (for [`can_watch`]).
    #[serde(skip)]
    org_path: Option<String>,
    /// The per-track originals as stored (keys included): only [`RecordingDetail`] shows them.
    #[serde(skip)]
    originals: Vec<recorder::originals::OriginalObject>,
}

/// One recording with its comment count and chapter marks.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RecordingDetail {
    #[serde(flatten)]
    pub recording: Recording,
    /// How many comments it has.
    pub comments: i64,
    pub marks: Vec<Mark>,
    /// Each track on its own, remuxed without transcoding (empty until the recording is ready).
    pub originals: Vec<OriginalFile>,
}

/// One track of a recording on its own: VP8 and Opus as WebM, H.264 as MP4.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct OriginalFile {
    pub track: String,
    pub participant: String,
    /// `audio` or `video`.
    pub kind: String,
    /// `camera`, `microphone`, `screen` or `screen_audio`.
    pub source: String,
    /// Where the file's time 0 lies on the recording's timeline, in milliseconds.
    pub start_ms: i64,
    pub duration_ms: i64,
    pub size: u64,
    /// Where to download or stream it from (with `Range` support).
    pub url: String,
}

impl OriginalFile {
    fn of(rec: &Recording) -> Vec<OriginalFile> {
        if rec.status != Status::Ready {
            return Vec::new();
        }
        rec.originals
            .iter()
            .map(|o| OriginalFile {
                track: o.track.clone(),
                participant: o.participant.clone(),
                kind: kind_name(o.kind).into(),
                source: o.source.clone(),
                start_ms: o.start_ms,
                duration_ms: o.duration_ms,
                size: o.size,
                url: original_url(&rec.id, &o.track),
            })
            .collect()
    }
}

fn kind_name(kind: recorder::segment::Kind) -> &'static str {
    match kind {
        recorder::segment::Kind::Audio => "audio",
        recorder::segment::Kind::Video => "video",
    }
}

fn original_url(id: &str, track: &str) -> String {
    format!("/api/v1/recordings/{id}/originals/{}", path_segment(track))
}

/// One URL path segment: unreserved characters as they are, the rest percent-encoded.
fn path_segment(s: &str) -> String {
    let mut seg = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            seg.push(char::from(b));
        } else {
            seg.push_str(&format!("%{b:02X}"));
        }
    }
    seg
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RecordingList {
    pub items: Vec<Recording>,
    /// How many match the filters (and may be watched), across all pages.
    pub total: usize,
    pub limit: usize,
    pub offset: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MarkKind {
    Vote,
    Screen,
    Note,
}

impl MarkKind {
    fn as_str(self) -> &'static str {
        match self {
            MarkKind::Vote => "vote",
            MarkKind::Screen => "screen",
            MarkKind::Note => "note",
        }
    }

    fn parse(s: &str) -> MarkKind {
        match s {
            "vote" => MarkKind::Vote,
            "screen" => MarkKind::Screen,
            _ => MarkKind::Note,
        }
    }

    fn label(self) -> &'static str {
        match self {
            MarkKind::Vote => "表决",
            MarkKind::Screen => "屏幕共享",
            MarkKind::Note => "标记",
        }
    }
}

/// A chapter mark: a moment of the replay worth jumping to.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Mark {
    /// Offset into the replay, in milliseconds.
    pub at_ms: i64,
    pub kind: MarkKind,
    pub label: String,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Comment {
    pub id: String,
    pub user_id: String,
    pub author: Option<String>,
    pub body: String,
    pub created_at: i64,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct CreatedId {
    pub id: String,
}

/// Who may watch a recording (its page, its API entry, its media, its comments): system admins,
/// the user who started it, anyone signed in once it is published, and otherwise the people of
/// its org — members of the owning org (and its groups) and of every org above it.
/// `viewer_org_path` is the path of the viewer's own org. A recording without an org (started
/// by someone who keeps none) is for org admins too. This rule goes here and nowhere else.
pub fn can_watch(user: &User, viewer_org_path: Option<&str>, rec: &Recording) -> bool {
    if user.role == Role::SystemAdmin || rec.created_by == user.id || rec.published {
        return true;
    }
    match (rec.org_path.as_deref(), viewer_org_path) {
        (Some(owner), Some(viewer)) => owner.starts_with(viewer) || viewer.starts_with(owner),
        (Some(_), None) => false,
        (None, _) => user.role == Role::OrgAdmin,
    }
}

/// The path of `user`'s own org, for [`can_watch`].
async fn viewer_path(db: &Db, user: &User) -> Result<Option<String>, AppError> {
    let Some(org) = &user.org_id else {
        return Ok(None);
    };
    let row: Option<(String,)> = sqlx::query_as("SELECT path FROM orgs WHERE id = $1")
        .bind(org)
        .fetch_optional(&db.pool)
        .await?;
    Ok(row.map(|(p,)| p))
}

/// Who may rename, publish or delete a recording: system admins, the user who started it, and
/// org admins of its org or an org above it (any org admin for a recording without an org).
pub fn can_manage(user: &User, viewer_org_path: Option<&str>, rec: &Recording) -> bool {
    if user.role == Role::SystemAdmin || rec.created_by == user.id {
        return true;
    }
    if user.role != Role::OrgAdmin {
        return false;
    }
    match (rec.org_path.as_deref(), viewer_org_path) {
        (Some(owner), Some(viewer)) => owner.starts_with(viewer),
        (Some(_), None) => false,
        (None, _) => true,
    }
}

// ---------------------------------------------------------------------------------------------
// SQL
// ---------------------------------------------------------------------------------------------

#[derive(sqlx::FromRow)]
struct Row {
    id: String,
    room: String,
    title: String,
    org_id: Option<String>,
    created_by: String,
    creator_name: Option<String>,
    status: String,
    failure: Option<String>,
    started_at: i64,
    ended_at: Option<i64>,
    duration_ms: i64,
    size_bytes: i64,
    tracks: String,
    media_key: Option<String>,
    published: i64,
    views: i64,
    expires_at: Option<i64>,
    originals: Option<String>,
    org_path: Option<String>,
}

const SELECT: &str = "SELECT r.id, r.room, r.title, r.org_id, r.created_by, u.display_name AS creator_name, \
     r.status, r.failure, r.started_at, r.ended_at, r.duration_ms, r.size_bytes, r.tracks, r.media_key, \
     r.published, r.views, r.expires_at, r.originals, o.path AS org_path FROM recordings r \
     LEFT JOIN users u ON u.id = r.created_by LEFT JOIN orgs o ON o.id = r.org_id";

impl Row {
    fn into_recording(self) -> Result<Recording, AppError> {
        let status = Status::parse(&self.status).ok_or_else(|| {
            anyhow::anyhow!("recording {} has unknown status {}", self.id, self.status)
        })?;
        let media_url =
            (status == Status::Ready).then(|| format!("/api/v1/recordings/{}/media", self.id));
        Ok(Recording {
            tracks: serde_json::from_str(&self.tracks).unwrap_or(serde_json::Value::Null),
            id: self.id,
            room: self.room,
            title: self.title,
            org_id: self.org_id,
            created_by: self.created_by,
            created_by_name: self.creator_name,
            status,
            failure: self.failure,
            started_at: self.started_at,
            ended_at: self.ended_at,
            duration_ms: self.duration_ms,
            size_bytes: self.size_bytes,
            published: self.published != 0,
            views: self.views,
            expires_at: self.expires_at,
            media_url,
            media_key: self.media_key,
            org_path: self.org_path,
            originals: self
                .originals
                .and_then(|o| serde_json::from_str(&o).ok())
                .unwrap_or_default(),
        })
    }
}

/// A recording by id, whoever asks.
pub async fn load(db: &Db, id: &str) -> Result<Recording, AppError> {
    let sql = format!("{SELECT} WHERE r.id = $1");
    sqlx::query_as::<_, Row>(&sql)
        .bind(id)
        .fetch_optional(&db.pool)
        .await?
        .ok_or(AppError::NotFound)?
        .into_recording()
}

/// A recording `user` may watch: 404 when there is none, 403 when it is not theirs to see.
async fn watchable(state: &AppState, user: &User, id: &str) -> Result<Recording, AppError> {
    let rec = load(&state.db, id).await?;
    let viewer = viewer_path(&state.db, user).await?;
    if can_watch(user, viewer.as_deref(), &rec) {
        Ok(rec)
    } else {
        Err(AppError::Forbidden("你没有观看此录像的权限".into()))
    }
}

/// A recording `user` may manage (implies watch).
async fn manageable(state: &AppState, user: &User, id: &str) -> Result<Recording, AppError> {
    let rec = watchable(state, user, id).await?;
    let viewer = viewer_path(&state.db, user).await?;
    if can_manage(user, viewer.as_deref(), &rec) {
        Ok(rec)
    } else {
        Err(AppError::Forbidden(
            "只有录制者或管理员可以修改此录像".into(),
        ))
    }
}

/// The room's recording that is capturing now, if any.
async fn live_in_room(db: &Db, room: &str) -> Result<Option<Recording>, AppError> {
    let sql = format!("{SELECT} WHERE r.room = $1 AND r.status = 'recording'");
    sqlx::query_as::<_, Row>(&sql)
        .bind(room)
        .fetch_optional(&db.pool)
        .await?
        .map(Row::into_recording)
        .transpose()
}

/// What the list may be narrowed to. Empty strings count as absent.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub room: Option<String>,
    pub status: Option<Status>,
    /// Part of the title, any case.
    pub title: Option<String>,
    /// Started at or after, ms.
    pub from: Option<i64>,
    /// Started at or before, ms.
    pub to: Option<i64>,
    pub org: Option<String>,
}

enum Bind {
    Text(String),
    Int(i64),
}

/// Every recording matching `f`, newest first (watch rights are not applied here).
async fn search(db: &Db, f: &Filter) -> Result<Vec<Recording>, AppError> {
    let mut sql = format!("{SELECT} WHERE 1 = 1");
    let mut binds = Vec::new();
    let mut cond = |sql: &mut String, clause: &str, b: Bind| {
        binds.push(b);
        sql.push_str(&clause.replace('?', &format!("${}", binds.len())));
    };
    if let Some(room) = &f.room {
        cond(&mut sql, " AND r.room = ?", Bind::Text(room.clone()));
    }
    if let Some(s) = f.status {
        cond(&mut sql, " AND r.status = ?", Bind::Text(s.as_str().into()));
    }
    if let Some(t) = &f.title {
        let pattern = format!("%{}%", like_escape(&t.to_lowercase()));
        cond(
            &mut sql,
            " AND LOWER(r.title) LIKE ? ESCAPE '\\'",
            Bind::Text(pattern),
        );
    }
    if let Some(from) = f.from {
        cond(&mut sql, " AND r.started_at >= ?", Bind::Int(from));
    }
    if let Some(to) = f.to {
        cond(&mut sql, " AND r.started_at <= ?", Bind::Int(to));
    }
    if let Some(org) = &f.org {
        cond(&mut sql, " AND r.org_id = ?", Bind::Text(org.clone()));
    }
    sql.push_str(" ORDER BY r.started_at DESC, r.id DESC");
    let mut q = sqlx::query_as::<_, Row>(&sql);
    for b in binds {
        q = match b {
            Bind::Text(s) => q.bind(s),
            Bind::Int(i) => q.bind(i),
        };
    }
    q.fetch_all(&db.pool)
        .await?
        .into_iter()
        .map(Row::into_recording)
        .collect()
}

fn like_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

/// The recordings matching `f` that `user` may watch, one page of them, and how many in all.
pub async fn visible(
    db: &Db,
    user: &User,
    f: &Filter,
    limit: usize,
    offset: usize,
) -> Result<(Vec<Recording>, usize), AppError> {
    let viewer = viewer_path(db, user).await?;
    let all: Vec<Recording> = search(db, f)
        .await?
        .into_iter()
        .filter(|r| can_watch(user, viewer.as_deref(), r))
        .collect();
    let total = all.len();
    Ok((all.into_iter().skip(offset).take(limit).collect(), total))
}

async fn marks(db: &Db, id: &str) -> Result<Vec<Mark>, AppError> {
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT at_ms, kind, label FROM recording_marks WHERE recording_id = $1 ORDER BY at_ms, id",
    )
    .bind(id)
    .fetch_all(&db.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(at_ms, kind, label)| Mark {
            at_ms,
            kind: MarkKind::parse(&kind),
            label,
        })
        .collect())
}

async fn comments(db: &Db, id: &str) -> Result<Vec<Comment>, AppError> {
    let rows: Vec<(String, String, Option<String>, String, i64)> = sqlx::query_as(
        "SELECT c.id, c.user_id, u.display_name, c.body, c.created_at FROM recording_comments c \
         LEFT JOIN users u ON u.id = c.user_id WHERE c.recording_id = $1 ORDER BY c.created_at, c.id",
    )
    .bind(id)
    .fetch_all(&db.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, user_id, author, body, created_at)| Comment {
            id,
            user_id,
            author,
            body,
            created_at,
        })
        .collect())
}

async fn detail(db: &Db, recording: Recording) -> Result<RecordingDetail, AppError> {
    let (comments,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM recording_comments WHERE recording_id = $1")
            .bind(&recording.id)
            .fetch_one(&db.pool)
            .await?;
    let marks = marks(db, &recording.id).await?;
    Ok(RecordingDetail {
        originals: OriginalFile::of(&recording),
        recording,
        comments,
        marks,
    })
}

/// Adds a chapter mark (for the vote and screen-share modules, and the API).
pub async fn add_mark(
    db: &Db,
    recording_id: &str,
    at_ms: i64,
    kind: MarkKind,
    label: &str,
) -> Result<(), AppError> {
    sqlx::query(
        "INSERT INTO recording_marks (id, recording_id, at_ms, kind, label) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(new_id())
    .bind(recording_id)
    .bind(at_ms.max(0))
    .bind(kind.as_str())
    .bind(label)
    .execute(&db.pool)
    .await?;
    Ok(())
}

async fn add_comment(
    db: &Db,
    recording_id: &str,
    user: &User,
    body: &str,
) -> Result<Comment, AppError> {
    let c = Comment {
        id: new_id(),
        user_id: user.id.clone(),
        author: Some(user.display_name.clone()),
        body: body.into(),
        created_at: now_ms(),
    };
    sqlx::query(
        "INSERT INTO recording_comments (id, recording_id, user_id, body, created_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&c.id)
    .bind(recording_id)
    .bind(&c.user_id)
    .bind(&c.body)
    .bind(c.created_at)
    .execute(&db.pool)
    .await?;
    Ok(c)
}

async fn count_view(db: &Db, id: &str) -> Result<(), AppError> {
    sqlx::query("UPDATE recordings SET views = views + 1 WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await?;
    Ok(())
}

async fn mark_failed(db: &Db, id: &str, reason: &str) -> Result<(), AppError> {
    sqlx::query(
        "UPDATE recordings SET status = 'failed', failure = $2, ended_at = COALESCE(ended_at, $3) WHERE id = $1",
    )
    .bind(id)
    .bind(reason)
    .bind(now_ms())
    .execute(&db.pool)
    .await?;
    Ok(())
}

async fn mark_ready(db: &Db, id: &str, replay: &recorder::Replay) -> Result<(), AppError> {
    let tracks = serde_json::to_string(&replay.tracks).map_err(|e| anyhow::anyhow!(e))?;
    let originals = serde_json::to_string(&replay.originals).map_err(|e| anyhow::anyhow!(e))?;
    sqlx::query(
        "UPDATE recordings SET status = 'ready', failure = NULL, size_bytes = $2, duration_ms = $3, \
         tracks = $4, media_key = $5, ended_at = COALESCE(ended_at, $6), originals = $7 WHERE id = $1",
    )
    .bind(id)
    .bind(i64::try_from(replay.size).unwrap_or(i64::MAX))
    .bind(replay.duration_ms)
    .bind(tracks)
    .bind(&replay.key)
    .bind(now_ms())
    .bind(originals)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// A chapter mark wherever the replay turns to a screen share. A recording finalised twice
/// (a restart during processing) gets them once.
async fn add_screen_marks(db: &Db, id: &str, replay: &recorder::Replay) -> Result<(), AppError> {
    sqlx::query("DELETE FROM recording_marks WHERE recording_id = $1 AND kind = 'screen'")
        .bind(id)
        .execute(&db.pool)
        .await?;
    for (at, who) in &replay.screen_shares {
        let label = format!("{who} 共享屏幕");
        add_mark(db, id, *at, MarkKind::Screen, &label).await?;
    }
    Ok(())
}

/// Moves a capturing recording to `processing`. False when someone else already did (a stop
/// racing the capture's own end): only the winner finalises.
async fn claim_for_processing(db: &Db, id: &str) -> Result<bool, AppError> {
    let done = sqlx::query(
        "UPDATE recordings SET status = 'processing', ended_at = $2 WHERE id = $1 AND status = 'recording'",
    )
    .bind(id)
    .bind(now_ms())
    .execute(&db.pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

// ---------------------------------------------------------------------------------------------
// Life cycle: start, stop, finalise, delete
// ---------------------------------------------------------------------------------------------

fn default_title(room: &str, at_ms: i64) -> String {
    format!("{room} {}", fmt_time(at_ms))
}

fn clean_title(title: Option<&str>) -> Result<Option<String>, AppError> {
    match title.map(str::trim) {
        None | Some("") => Ok(None),
        Some(t) if t.chars().count() > MAX_TITLE_CHARS => Err(AppError::BadRequest(format!(
            "标题最多 {MAX_TITLE_CHARS} 个字 (title too long)"
        ))),
        Some(t) => Ok(Some(t.to_string())),
    }
}

/// Starts recording `room` for user `user_id`. 409 when the room is being recorded already.
/// When the recorder refuses, the recording is kept as `failed` with the reason and returned so:
/// the caller decides how loud to be.
pub async fn start_recording(
    state: &AppState,
    room: &str,
    title: Option<&str>,
    user_id: &str,
) -> Result<Recording, AppError> {
    signaling::token::validate_name("room", room).map_err(crate::api::token_error)?;
    let title = clean_title(title)?;
    if live_in_room(&state.db, room).await?.is_some() {
        return Err(already_recording());
    }
    let id = new_id();
    let now = now_ms();
    let inserted = sqlx::query(
        "INSERT INTO recordings (id, room, title, org_id, created_by, status, started_at, expires_at) \
         VALUES ($1, $2, $3, (SELECT org_id FROM users WHERE id = $4), $4, 'recording', $5, $6)",
    )
    .bind(&id)
    .bind(room)
    .bind(title.unwrap_or_else(|| default_title(room, now)))
    .bind(user_id)
    .bind(now)
    .bind(
        state
            .recording_retention
            .map(|d| now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))),
    )
    .execute(&state.db.pool)
    .await;
    match inserted {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            return Err(already_recording());
        }
        other => other?,
    };
    state.rooms.set_recording(room, Some(&id));
    if let Err(e) = state.recorder.start(&id, room) {
        tracing::warn!(recording = %id, room, error = %e, "cannot start recording");
        state.rooms.set_recording(room, None);
        mark_failed(&state.db, &id, &format!("录制无法开始：{e}")).await?;
    } else {
        tracing::info!(recording = %id, room, "recording started");
    }
    load(&state.db, &id).await
}

fn already_recording() -> AppError {
    AppError::Conflict("该会议室正在录制 (this room is already being recorded)".into())
}

/// Stops a capturing recording: `processing` at once, then `ready` or `failed` once the
/// replay is composed (in the background). 409 when it is not capturing.
pub async fn stop_recording(state: &AppState, rec: &Recording) -> Result<Recording, AppError> {
    if rec.status != Status::Recording || !claim_for_processing(&state.db, &rec.id).await? {
        return Err(AppError::Conflict(
            "录像不在录制中 (the recording is not capturing)".into(),
        ));
    }
    state.rooms.set_recording(&rec.room, None);
    if let Err(e) = state.recorder.stop(&rec.id).await {
        // The capture may have ended already (the room closed); what was uploaded still counts.
        tracing::info!(recording = %rec.id, error = %e, "stopping the capture");
    }
    spawn_finalize(state.clone(), rec.id.clone(), None);
    load(&state.db, &rec.id).await
}

/// A capture ended without being asked (the room closed, or it broke): treated like a stop.
async fn capture_ended(state: &AppState, id: &str, error: Option<String>) -> Result<(), AppError> {
    let rec = load(&state.db, id).await?;
    if !claim_for_processing(&state.db, id).await? {
        return Ok(()); // Stopped through the API meanwhile.
    }
    state.rooms.set_recording(&rec.room, None);
    tracing::info!(recording = %id, error = ?error, "capture ended on its own");
    finalize(state, id, error).await;
    Ok(())
}

fn spawn_finalize(state: AppState, id: String, cause: Option<String>) {
    tokio::spawn(async move { finalize(&state, &id, cause).await });
}

/// Composes the replay from what was uploaded and records the outcome.
async fn finalize(state: &AppState, id: &str, cause: Option<String>) {
    let outcome = match state.recorder.finalize(id).await {
        Ok(replay) => match mark_ready(&state.db, id, &replay).await {
            Ok(()) => add_screen_marks(&state.db, id, &replay).await,
            Err(e) => Err(e),
        },
        Err(e) => {
            let reason = match &cause {
                Some(c) => format!("{c}; {e}"),
                None => e.to_string(),
            };
            tracing::warn!(recording = %id, reason, "recording failed");
            mark_failed(&state.db, id, &reason).await
        }
    };
    if let Err(e) = outcome {
        tracing::error!(recording = %id, error = %e, "cannot record the end of a recording");
    }
}

/// Deletes the media (all objects under the recording's prefix) and then the rows. A capture
/// in progress or a replay being composed must finish first (409).
pub async fn delete_recording(state: &AppState, rec: &Recording) -> Result<(), AppError> {
    if matches!(rec.status, Status::Recording | Status::Processing) {
        return Err(AppError::Conflict(
            "录像仍在录制或处理中，请先停止录制 (stop the recording first)".into(),
        ));
    }
    state.recorder.delete(&rec.id).await.map_err(|e| {
        tracing::warn!(recording = %rec.id, error = %e, "cannot delete recording objects");
        AppError::Unavailable("录像文件暂时无法删除，请稍后再试 (object store unavailable)".into())
    })?;
    for sql in [
        "DELETE FROM recording_comments WHERE recording_id = $1",
        "DELETE FROM recording_marks WHERE recording_id = $1",
        "DELETE FROM recordings WHERE id = $1",
    ] {
        sqlx::query(sql)
            .bind(&rec.id)
            .execute(&state.db.pool)
            .await?;
    }
    tracing::info!(recording = %rec.id, "recording deleted");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Background work
// ---------------------------------------------------------------------------------------------

/// At start: recordings a previous process left `recording` or `processing` are finished from
/// what reached the object store (or the spool), becoming `ready` or `failed`.
pub async fn resume_unfinished(state: AppState) {
    let cutoff = now_ms();
    let stale = match unfinished(&state.db, cutoff).await {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "cannot look for unfinished recordings");
            return;
        }
    };
    for rec in stale {
        if state.recorder.is_capturing(&rec.id) {
            continue;
        }
        if rec.status == Status::Recording {
            match claim_for_processing(&state.db, &rec.id).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::error!(recording = %rec.id, error = %e, "cannot resume");
                    continue;
                }
            }
        }
        tracing::info!(recording = %rec.id, "finishing a recording interrupted by a restart");
        finalize(&state, &rec.id, None).await;
    }
}

async fn unfinished(db: &Db, cutoff: i64) -> Result<Vec<Recording>, AppError> {
    let sql = format!(
        "{SELECT} WHERE r.status IN ('recording', 'processing') AND r.started_at <= $1 ORDER BY r.started_at"
    );
    sqlx::query_as::<_, Row>(&sql)
        .bind(cutoff)
        .fetch_all(&db.pool)
        .await?
        .into_iter()
        .map(Row::into_recording)
        .collect()
}

/// The long-running tasks of the catalogue: captures that end on their own, start/stop requests
/// from inside rooms, and the retention sweep. Abort the handles to stop them.
pub fn spawn_background(
    state: &AppState,
    events: UnboundedReceiver<RecorderEvent>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = vec![
        tokio::spawn(serve_recorder_events(state.clone(), events)),
        tokio::spawn(retention(state.clone())),
    ];
    if let Some(requests) = state.rooms.record_requests() {
        tasks.push(tokio::spawn(serve_record_requests(state.clone(), requests)));
    }
    tasks
}

async fn serve_recorder_events(state: AppState, mut events: UnboundedReceiver<RecorderEvent>) {
    while let Some(event) = events.recv().await {
        match event {
            RecorderEvent::Ended { id, error } => {
                let state = state.clone();
                // Composing takes a while; other events need not wait for it.
                tokio::spawn(async move {
                    if let Err(e) = capture_ended(&state, &id, error).await {
                        tracing::warn!(recording = %id, error = %e, "cannot end recording");
                    }
                });
            }
        }
    }
}

async fn serve_record_requests(state: AppState, mut requests: UnboundedReceiver<RecordRequest>) {
    while let Some(req) = requests.recv().await {
        if let Err(e) = record_request(&state, &req).await {
            tracing::warn!(room = %req.room, identity = %req.identity, start = req.start, error = %e, "record request refused");
        }
    }
}

/// A participant with the `record` grant asked to start or stop: the same paths as the API,
/// on behalf of the user whose username is the participant's identity.
async fn record_request(state: &AppState, req: &RecordRequest) -> Result<(), AppError> {
    if req.start {
        let user = auth::find_user_by_name(&state.db, &req.identity)
            .await?
            .filter(|u| u.disabled == 0)
            .ok_or_else(|| AppError::Forbidden("no such user".into()))?;
        let rec = start_recording(state, &req.room, None, &user.id).await?;
        if rec.status == Status::Failed {
            return Err(AppError::Unavailable(rec.failure.unwrap_or_default()));
        }
        Ok(())
    } else {
        let rec = live_in_room(&state.db, &req.room)
            .await?
            .ok_or(AppError::NotFound)?;
        stop_recording(state, &rec).await.map(|_| ())
    }
}

async fn retention(state: AppState) {
    let mut every = tokio::time::interval(RETENTION_SWEEP);
    loop {
        every.tick().await;
        match sweep_expired(&state).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(recordings = n, "deleted expired recordings"),
            Err(e) => tracing::warn!(error = %e, "cannot delete expired recordings"),
        }
    }
}

/// Deletes finished recordings whose `expires_at` has passed, with their objects.
pub async fn sweep_expired(state: &AppState) -> Result<usize, AppError> {
    let sql = format!(
        "{SELECT} WHERE r.expires_at IS NOT NULL AND r.expires_at <= $1 AND r.status IN ('ready', 'failed')"
    );
    let expired: Vec<Row> = sqlx::query_as(&sql)
        .bind(now_ms())
        .fetch_all(&state.db.pool)
        .await?;
    let mut n = 0;
    for row in expired {
        delete_recording(state, &row.into_recording()?).await?;
        n += 1;
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// REST
// ---------------------------------------------------------------------------------------------

/// An error with a status `AppError` has no variant for (422, 502), in the same JSON shape.
fn plain_error(status: StatusCode, error: &'static str, message: String) -> Response {
    (status, Json(ErrorBody { error, message })).into_response()
}

/// A JSON body that may be left out altogether.
fn optional_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<Option<T>, AppError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(body)
        .map(Some)
        .map_err(|e| AppError::BadRequest(format!("malformed JSON body: {e}")))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
pub struct NewRecording {
    /// Default: the room name and the start time.
    pub title: Option<String>,
}

/// Start recording a room (roles that may record). The capture joins the room as a hidden,
/// subscribe-only participant.
#[utoipa::path(post, path = "/api/v1/rooms/{room}/recordings", params(("room" = String, Path)),
    request_body(content = NewRecording, description = "Optional"),
    responses((status = 201, body = CreatedId), (status = 403, body = ErrorBody),
        (status = 409, description = "The room is being recorded already", body = ErrorBody),
        (status = 502, description = "The recorder could not start; the recording is kept as failed", body = ErrorBody)))]
pub(crate) async fn start(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(room): Path<String>,
    body: Bytes,
) -> Result<Response, AppError> {
    let u = user.require(Permission::RecordRooms)?;
    let title = optional_json::<NewRecording>(&body)?.and_then(|b| b.title);
    let rec = start_recording(&state, &room, title.as_deref(), &u.id).await?;
    if rec.status == Status::Failed {
        let reason = rec.failure.unwrap_or_default();
        return Ok(plain_error(StatusCode::BAD_GATEWAY, "recorder", reason));
    }
    auth::audit(&state.db, Some(&u.id), "start_recording", &rec.id, &room).await?;
    Ok((StatusCode::CREATED, Json(CreatedId { id: rec.id })).into_response())
}

/// Stop a recording; it becomes `processing`, then `ready` or `failed`.
#[utoipa::path(post, path = "/api/v1/recordings/{id}/stop", params(("id" = String, Path)),
    responses((status = 202, body = Recording), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "Not capturing", body = ErrorBody)))]
pub(crate) async fn stop(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Recording>), AppError> {
    let u = user.require(Permission::RecordRooms)?;
    let rec = watchable(&state, u, &id).await?;
    let rec = stop_recording(&state, &rec).await?;
    auth::audit(&state.db, Some(&u.id), "stop_recording", &rec.id, &rec.room).await?;
    Ok((StatusCode::ACCEPTED, Json(rec)))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    pub room: Option<String>,
    /// `recording`, `processing`, `ready` or `failed`.
    pub status: Option<String>,
    /// Part of the title.
    pub q: Option<String>,
    /// Started at or after (ms since the epoch).
    pub from: Option<i64>,
    /// Started at or before (ms since the epoch).
    pub to: Option<i64>,
    pub org: Option<String>,
    /// Default 50, at most 200.
    pub limit: Option<usize>,
    pub offset: Option<usize>,
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

fn parse_status(s: Option<String>) -> Result<Option<Status>, AppError> {
    match non_empty(s) {
        None => Ok(None),
        Some(s) => Status::parse(&s).map(Some).ok_or_else(|| {
            AppError::BadRequest("status must be recording, processing, ready or failed".into())
        }),
    }
}

/// Recordings the signed-in user may watch, newest first.
#[utoipa::path(get, path = "/api/v1/recordings", params(ListQuery),
    responses((status = 200, body = RecordingList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    user: CurrentUser,
    Query(q): Query<ListQuery>,
) -> Result<Json<RecordingList>, AppError> {
    let filter = Filter {
        room: non_empty(q.room),
        status: parse_status(q.status)?,
        title: non_empty(q.q),
        from: q.from,
        to: q.to,
        org: non_empty(q.org),
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 200);
    let offset = q.offset.unwrap_or(0);
    let (items, total) = visible(&state.db, &user.0, &filter, limit, offset).await?;
    Ok(Json(RecordingList {
        items,
        total,
        limit,
        offset,
    }))
}

/// One recording, with its comment count and chapter marks.
#[utoipa::path(get, path = "/api/v1/recordings/{id}", params(("id" = String, Path)),
    responses((status = 200, body = RecordingDetail), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_one(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<RecordingDetail>, AppError> {
    let rec = watchable(&state, &user.0, &id).await?;
    Ok(Json(detail(&state.db, rec).await?))
}

fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct RecordingPatch {
    pub title: Option<String>,
    /// Published recordings may be watched by everyone signed in.
    pub published: Option<bool>,
    /// When the retention sweep deletes it (ms since the epoch); `null` keeps it forever.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>)]
    pub expires_at: Option<Option<i64>>,
}

/// Rename, publish or unpublish, or set the expiry (the creator or an admin).
#[utoipa::path(patch, path = "/api/v1/recordings/{id}", params(("id" = String, Path)), request_body = RecordingPatch,
    responses((status = 200, body = Recording), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn update(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiJson(patch): ApiJson<RecordingPatch>,
) -> Result<Json<Recording>, AppError> {
    let rec = manageable(&state, &user.0, &id).await?;
    if patch.title.is_some() {
        let title = clean_title(patch.title.as_deref())?
            .ok_or_else(|| AppError::BadRequest("标题不能为空 (title is empty)".into()))?;
        set_column(&state.db, &rec.id, "title", Bind::Text(title)).await?;
    }
    if let Some(p) = patch.published {
        set_published(&state, &user.0, &rec, p).await?;
    }
    if let Some(at) = patch.expires_at {
        let sql = "UPDATE recordings SET expires_at = $2 WHERE id = $1";
        sqlx::query(sql)
            .bind(&rec.id)
            .bind(at)
            .execute(&state.db.pool)
            .await?;
    }
    Ok(Json(load(&state.db, &rec.id).await?))
}

async fn set_column(db: &Db, id: &str, column: &'static str, v: Bind) -> Result<(), AppError> {
    let sql = format!("UPDATE recordings SET {column} = $2 WHERE id = $1");
    let q = sqlx::query(&sql).bind(id);
    let q = match v {
        Bind::Text(s) => q.bind(s),
        Bind::Int(i) => q.bind(i),
    };
    q.execute(&db.pool).await?;
    Ok(())
}

async fn set_published(
    state: &AppState,
    user: &User,
    rec: &Recording,
    published: bool,
) -> Result<(), AppError> {
    set_column(&state.db, &rec.id, "published", Bind::Int(published as i64)).await?;
    let action = if published {
        "publish_recording"
    } else {
        "unpublish_recording"
    };
    auth::audit(&state.db, Some(&user.id), action, &rec.id, "").await
}

/// Delete a recording and its media (the creator or an admin; stop it first).
#[utoipa::path(delete, path = "/api/v1/recordings/{id}", params(("id" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "Still recording or processing", body = ErrorBody)))]
pub(crate) async fn remove(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    let rec = manageable(&state, &user.0, &id).await?;
    delete_recording(&state, &rec).await?;
    auth::audit(
        &state.db,
        Some(&user.0.id),
        "delete_recording",
        &rec.id,
        &rec.title,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What a `Range` header asks of an object of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No (usable) range: the whole object, 200.
    Full,
    /// Bytes `start..=end`, 206.
    Partial { start: u64, end: u64 },
    /// 416.
    Unsatisfiable,
}

/// One `bytes=a-b`, `bytes=a-` or `bytes=-n` range. Malformed headers and multiple ranges are
/// ignored (the whole object is sent), as RFC 9110 allows.
pub fn parse_range(header: Option<&str>, size: u64) -> RangeAnswer {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| s.parse::<u64>().ok();
    let (start, end) = match (a.is_empty(), b.is_empty()) {
        (true, true) => return RangeAnswer::Full,
        (true, false) => match num(b) {
            None => return RangeAnswer::Full,
            Some(0) => return RangeAnswer::Unsatisfiable,
            Some(n) => (size.saturating_sub(n), size.saturating_sub(1)),
        },
        (false, open) => {
            let Some(start) = num(a) else {
                return RangeAnswer::Full;
            };
            let end = if open { None } else { num(b) };
            if !open && end.is_none() {
                return RangeAnswer::Full;
            }
            match end {
                Some(e) if e < start => return RangeAnswer::Unsatisfiable,
                Some(e) => (start, e.min(size.saturating_sub(1))),
                None => (start, size.saturating_sub(1)),
            }
        }
    };
    if size == 0 || start >= size {
        return RangeAnswer::Unsatisfiable;
    }
    RangeAnswer::Partial { start, end }
}

fn store_error(e: object_store::Error) -> AppError {
    match e {
        object_store::Error::NotFound { .. } => AppError::NotFound,
        e => {
            tracing::warn!(error = %e, "object store");
            AppError::Unavailable("录像存储暂不可用 (object store unavailable)".into())
        }
    }
}

/// The replay (video/mp4), with `Range` support for seeking. Streamed from the object store.
#[utoipa::path(get, path = "/api/v1/recordings/{id}/media", params(("id" = String, Path)),
    responses((status = 200, description = "The whole replay", content_type = "video/mp4"),
        (status = 206, description = "The requested range", content_type = "video/mp4"),
        (status = 403, body = ErrorBody), (status = 404, description = "Unknown, or no replay yet", body = ErrorBody),
        (status = 416, description = "Range not satisfiable")))]
pub(crate) async fn media(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let rec = watchable(&state, &user.0, &id).await?;
    let key = match (rec.status, rec.media_key) {
        (Status::Ready, Some(k)) => ObjectPath::from(k),
        _ => return Err(AppError::NotFound),
    };
    serve_object(&state, &key, &headers, "video/mp4").await
}

/// One track of a recording on its own (`video/webm`, `audio/webm` or `video/mp4`), with `Range`
/// support. Same watch rights as the replay.
#[utoipa::path(get, path = "/api/v1/recordings/{id}/originals/{track}",
    params(("id" = String, Path), ("track" = String, Path, description = "The track id, as `originals[].track` names it")),
    responses((status = 200, description = "The whole file", content_type = "video/webm"),
        (status = 206, description = "The requested range", content_type = "video/webm"),
        (status = 403, body = ErrorBody), (status = 404, description = "Unknown recording or track, or not ready", body = ErrorBody),
        (status = 416, description = "Range not satisfiable")))]
pub(crate) async fn original(
    State(state): State<AppState>,
    user: CurrentUser,
    Path((id, track)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let rec = watchable(&state, &user.0, &id).await?;
    if rec.status != Status::Ready {
        return Err(AppError::NotFound);
    }
    let o = rec
        .originals
        .iter()
        .find(|o| o.track == track)
        .ok_or(AppError::NotFound)?;
    let ctype = recorder::originals::content_type(&o.key, o.kind);
    serve_object(&state, &ObjectPath::from(o.key.as_str()), &headers, ctype).await
}

/// Streams an object, or the one range of it that `headers` ask for.
async fn serve_object(
    state: &AppState,
    key: &ObjectPath,
    headers: &HeaderMap,
    content_type: &'static str,
) -> Result<Response, AppError> {
    let store = &state.storage.store;
    let size = store.head(key).await.map_err(store_error)?.size;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let range = match parse_range(range, size) {
        RangeAnswer::Unsatisfiable => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [
                    (header::CONTENT_RANGE, format!("bytes */{size}")),
                    (header::ACCEPT_RANGES, "bytes".into()),
                ],
            )
                .into_response());
        }
        RangeAnswer::Full => None,
        RangeAnswer::Partial { start, end } => Some((start, end)),
    };
    stream(store.as_ref(), key, range, size, content_type).await
}

async fn stream(
    store: &dyn ObjectStore,
    key: &ObjectPath,
    range: Option<(u64, u64)>,
    size: u64,
    content_type: &'static str,
) -> Result<Response, AppError> {
    let (status, len) = match range {
        Some((a, b)) => (StatusCode::PARTIAL_CONTENT, b - a + 1),
        None => (StatusCode::OK, size),
    };
    let body = if len == 0 {
        Body::empty()
    } else {
        let opts = GetOptions {
            range: Some(match range {
                Some((a, b)) => GetRange::Bounded(a..b + 1),
                None => GetRange::Bounded(0..size),
            }),
            ..GetOptions::default()
        };
        let got = store.get_opts(key, opts).await.map_err(store_error)?;
        Body::from_stream(got.into_stream())
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Some((a, b)) = range
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{b}/{size}"))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(resp)
}

/// The comments (学习心得), oldest first.
#[utoipa::path(get, path = "/api/v1/recordings/{id}/comments", params(("id" = String, Path)),
    responses((status = 200, body = Vec<Comment>), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn list_comments(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Vec<Comment>>, AppError> {
    let rec = watchable(&state, &user.0, &id).await?;
    Ok(Json(comments(&state.db, &rec.id).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct NewComment {
    /// 1 to 2000 characters once trimmed.
    pub body: String,
}

/// The comment as stored, or why it cannot be.
pub fn clean_comment(body: &str) -> Result<String, String> {
    let body = body.trim();
    if body.is_empty() {
        return Err("心得内容不能为空 (the comment is empty)".into());
    }
    if body.chars().count() > MAX_COMMENT_CHARS {
        return Err(format!(
            "心得最多 {MAX_COMMENT_CHARS} 个字 (the comment is too long)"
        ));
    }
    Ok(body.to_string())
}

/// Add a comment (anyone who may watch).
#[utoipa::path(post, path = "/api/v1/recordings/{id}/comments", params(("id" = String, Path)), request_body = NewComment,
    responses((status = 201, body = Comment), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, description = "Empty or longer than 2000 characters", body = ErrorBody)))]
pub(crate) async fn post_comment(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<NewComment>,
) -> Result<Response, AppError> {
    let rec = watchable(&state, &user.0, &id).await?;
    let body = match clean_comment(&req.body) {
        Ok(b) => b,
        Err(m) => return Ok(plain_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m)),
    };
    let c = add_comment(&state.db, &rec.id, &user.0, &body).await?;
    Ok((StatusCode::CREATED, Json(c)).into_response())
}

/// Add a chapter mark (the creator or an admin).
#[utoipa::path(post, path = "/api/v1/recordings/{id}/marks", params(("id" = String, Path)), request_body = Mark,
    responses((status = 204, description = "Added"), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn post_mark(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiJson(mark): ApiJson<Mark>,
) -> Result<StatusCode, AppError> {
    let rec = manageable(&state, &user.0, &id).await?;
    let label = mark.label.trim();
    if mark.at_ms < 0 || label.is_empty() || label.chars().count() > MAX_TITLE_CHARS {
        return Err(AppError::BadRequest(format!(
            "at_ms must be ≥ 0 and the label 1 to {MAX_TITLE_CHARS} characters"
        )));
    }
    add_mark(&state.db, &rec.id, mark.at_ms, mark.kind, label).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------------
// Pages
// ---------------------------------------------------------------------------------------------

/// `2026-11-30 14:05`, Beijing time.
pub fn fmt_time(ms: i64) -> String {
    let offset = chrono::FixedOffset::east_opt(UTC_OFFSET_SECS).expect("a valid offset");
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| {
            t.with_timezone(&offset)
                .format("%Y-%m-%d %H:%M")
                .to_string()
        })
        .unwrap_or_default()
}

/// `1:02:03` or `12:34`.
pub fn fmt_duration(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}

pub fn fmt_size(bytes: i64) -> String {
    const MB: f64 = 1024.0 * 1024.0;
    let b = bytes.max(0) as f64;
    if b >= 1024.0 * MB {
        format!("{:.1} GB", b / 1024.0 / MB)
    } else if b >= MB {
        format!("{:.1} MB", b / MB)
    } else {
        format!("{:.0} KB", (b / 1024.0).ceil())
    }
}

/// Midnight starting (or, with `end`, the last millisecond of) a `YYYY-MM-DD` day, Beijing time.
fn day_ms(date: &str, end: bool) -> Option<i64> {
    let d = chrono::NaiveDate::parse_from_str(date.trim(), "%Y-%m-%d").ok()?;
    let d = if end { d.succ_opt()? } else { d };
    let ms = d.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis() - UTC_OFFSET_SECS as i64 * 1000;
    Some(if end { ms - 1 } else { ms })
}

/// What a page shows of one recording.
#[derive(Serialize)]
struct Card {
    #[serde(flatten)]
    rec: Recording,
    status_key: &'static str,
    status_label: &'static str,
    started: String,
    duration: String,
    size: String,
}

impl From<Recording> for Card {
    fn from(rec: Recording) -> Card {
        let duration = match (rec.status, rec.ended_at) {
            (Status::Ready, _) => rec.duration_ms,
            (_, Some(end)) => end - rec.started_at,
            (_, None) => now_ms() - rec.started_at,
        };
        Card {
            status_key: rec.status.as_str(),
            status_label: rec.status.label(),
            started: fmt_time(rec.started_at),
            duration: fmt_duration(duration),
            size: fmt_size(rec.size_bytes),
            rec,
        }
    }
}

#[derive(Deserialize, Default)]
struct LibraryQuery {
    q: Option<String>,
    room: Option<String>,
    status: Option<String>,
    from: Option<String>,
    to: Option<String>,
    offset: Option<usize>,
}

fn login_redirect(next: &str) -> Response {
    let next: String = url::form_urlencoded::byte_serialize(next.as_bytes()).collect();
    Redirect::to(&format!("/login?next={next}")).into_response()
}

async fn library_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    MaybeUser(user): MaybeUser,
    Query(q): Query<LibraryQuery>,
) -> Result<Response, AppError> {
    let Some(user) = user else {
        return Ok(login_redirect("/recordings"));
    };
    let status = Status::parse(q.status.as_deref().unwrap_or(""));
    let from_day = non_empty(q.from);
    let to_day = non_empty(q.to);
    let filter = Filter {
        room: non_empty(q.room),
        status,
        title: non_empty(q.q),
        from: from_day.as_deref().and_then(|d| day_ms(d, false)),
        to: to_day.as_deref().and_then(|d| day_ms(d, true)),
        org: None,
    };
    let offset = q.offset.unwrap_or(0);
    let (items, total) = visible(&state.db, &user, &filter, PAGE_SIZE, offset).await?;
    let cards: Vec<Card> = items.into_iter().map(Card::from).collect();
    let query = |offset: usize| {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("q", filter.title.as_deref()),
            ("room", filter.room.as_deref()),
            ("status", status.map(Status::as_str)),
            ("from", from_day.as_deref()),
            ("to", to_day.as_deref()),
        ] {
            if let Some(v) = v {
                s.append_pair(k, v);
            }
        }
        s.append_pair("offset", &offset.to_string());
        format!("/recordings?{}", s.finish())
    };
    let prev = (offset > 0).then(|| query(offset.saturating_sub(PAGE_SIZE)));
    let next = (offset + PAGE_SIZE < total).then(|| query(offset + PAGE_SIZE));
    let statuses: Vec<_> = Status::ALL
        .iter()
        .map(|s| context! { key => s.as_str(), label => s.label() })
        .collect();
    let ctx = context! {
        user => user, recordings => cards, total => total, statuses => statuses,
        q => filter.title, room => filter.room, status => status.map(Status::as_str),
        from => from_day, to => to_day, prev => prev, next => next,
        can_record => user.role.allows(Permission::RecordRooms),
    };
    Ok(crate::pages::render_page(&state, &headers, "recordings.html", ctx)?.into_response())
}

/// The replay page, or the page saying why not (404 page, 403 page, sign-in).
async fn replay_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    MaybeUser(user): MaybeUser,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    let Some(user) = user else {
        return Ok(login_redirect(uri.path()));
    };
    match watchable(&state, &user, &id).await {
        Ok(rec) => {
            count_view(&state.db, &rec.id).await?;
            replay(&state, &headers, &user, &rec.id, StatusCode::OK, None).await
        }
        Err(e) => page_error(&state, &headers, uri, &user, e).await,
    }
}

async fn page_error(
    state: &AppState,
    headers: &HeaderMap,
    uri: Uri,
    user: &User,
    e: AppError,
) -> Result<Response, AppError> {
    match e {
        AppError::NotFound => {
            Ok(crate::pages::not_found(State(state.clone()), uri, headers.clone()).await)
        }
        AppError::Forbidden(message) => {
            let ctx = context! { user => user, denied => message };
            let mut resp =
                crate::pages::render_page(state, headers, "recording.html", ctx)?.into_response();
            *resp.status_mut() = StatusCode::FORBIDDEN;
            Ok(resp)
        }
        e => Err(e),
    }
}

async fn replay(
    state: &AppState,
    headers: &HeaderMap,
    user: &User,
    id: &str,
    status: StatusCode,
    error: Option<String>,
) -> Result<Response, AppError> {
    let rec = load(&state.db, id).await?;
    let marks: Vec<_> = marks(&state.db, id)
        .await?
        .into_iter()
        .map(|m| {
            context! {
                seconds => (m.at_ms as f64 / 1000.0).to_string(), at => fmt_duration(m.at_ms),
                kind => m.kind.label(), label => m.label,
            }
        })
        .collect();
    let comments: Vec<_> = comments(&state.db, id)
        .await?
        .into_iter()
        .map(|c| context! { author => c.author, body => c.body, at => fmt_time(c.created_at) })
        .collect();
    let originals: Vec<_> = OriginalFile::of(&rec)
        .into_iter()
        .map(|o| {
            let ext = original_ext(&rec, &o.track);
            context! {
                participant => o.participant, kind => track_label(&o.kind, &o.source),
                segment => path_segment(&o.track), duration => fmt_duration(o.duration_ms), size => fmt_size(o.size as i64),
                filename => format!("{}-{}.{ext}", o.participant, o.source),
            }
        })
        .collect();
    let ctx = context! {
        user => user, can_manage => can_manage(user, viewer_path(&state.db, user).await?.as_deref(), &rec),
        can_stop => rec.status == Status::Recording && user.role.allows(Permission::RecordRooms),
        originals => originals,
        rec => Card::from(rec), marks => marks, comments => comments, error => error,
        max_comment => MAX_COMMENT_CHARS,
    };
    let mut resp =
        crate::pages::render_page(state, headers, "recording.html", ctx)?.into_response();
    *resp.status_mut() = status;
    Ok(resp)
}

/// `摄像头视频`, `麦克风音频`…: what an original holds, for the replay page.
fn track_label(kind: &str, source: &str) -> String {
    let source = match source {
        "camera" => "摄像头",
        "microphone" => "麦克风",
        "screen" => "屏幕共享",
        "screen_audio" => "共享音频",
        _ => "",
    };
    let kind = if kind == "audio" { "音频" } else { "视频" };
    format!("{source}{kind}")
}

/// The extension of a stored original (`webm` or `mp4`).
fn original_ext<'a>(rec: &'a Recording, track: &str) -> &'a str {
    rec.originals
        .iter()
        .find(|o| o.track == track)
        .and_then(|o| o.key.rsplit_once('.'))
        .map_or("bin", |(_, e)| e)
}

#[derive(Deserialize)]
struct CommentForm {
    csrf: String,
    body: String,
}

fn check_csrf(headers: &HeaderMap, token: &str) -> Result<(), AppError> {
    if auth::csrf_ok(headers, token) {
        Ok(())
    } else {
        Err(AppError::Forbidden(
            "页面已过期，请刷新后重试。(form expired)".into(),
        ))
    }
}

fn back_to(id: &str, anchor: &str) -> Response {
    Redirect::to(&format!("/recordings/{id}{anchor}")).into_response()
}

async fn comment_form(
    State(state): State<AppState>,
    headers: HeaderMap,
    user: CurrentUser,
    Path(id): Path<String>,
    Form(form): Form<CommentForm>,
) -> Result<Response, AppError> {
    check_csrf(&headers, &form.csrf)?;
    let rec = watchable(&state, &user.0, &id).await?;
    match clean_comment(&form.body) {
        Ok(body) => {
            add_comment(&state.db, &rec.id, &user.0, &body).await?;
            Ok(back_to(&rec.id, "#comments"))
        }
        Err(m) => {
            let status = StatusCode::UNPROCESSABLE_ENTITY;
            replay(&state, &headers, &user.0, &rec.id, status, Some(m)).await
        }
    }
}

#[derive(Deserialize)]
struct PublishForm {
    csrf: String,
    published: String,
}

async fn publish_form(
    State(state): State<AppState>,
    headers: HeaderMap,
    user: CurrentUser,
    Path(id): Path<String>,
    Form(form): Form<PublishForm>,
) -> Result<Response, AppError> {
    check_csrf(&headers, &form.csrf)?;
    let rec = manageable(&state, &user.0, &id).await?;
    set_published(&state, &user.0, &rec, form.published == "1").await?;
    Ok(back_to(&rec.id, ""))
}

#[derive(Deserialize)]
struct CsrfOnly {
    csrf: String,
}

async fn stop_form(
    State(state): State<AppState>,
    headers: HeaderMap,
    user: CurrentUser,
    Path(id): Path<String>,
    Form(form): Form<CsrfOnly>,
) -> Result<Response, AppError> {
    check_csrf(&headers, &form.csrf)?;
    let u = user.require(Permission::RecordRooms)?;
    let rec = watchable(&state, u, &id).await?;
    stop_recording(&state, &rec).await?;
    Ok(back_to(&rec.id, ""))
}

async fn delete_form(
    State(state): State<AppState>,
    headers: HeaderMap,
    user: CurrentUser,
    Path(id): Path<String>,
    Form(form): Form<CsrfOnly>,
) -> Result<Response, AppError> {
    check_csrf(&headers, &form.csrf)?;
    let rec = manageable(&state, &user.0, &id).await?;
    delete_recording(&state, &rec).await?;
    auth::audit(
        &state.db,
        Some(&user.0.id),
        "delete_recording",
        &rec.id,
        &rec.title,
    )
    .await?;
    Ok(Redirect::to("/recordings").into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_9110() {
        use RangeAnswer::*;
        let p = |start, end| Partial { start, end };
        assert_eq!(parse_range(None, 100), Full);
        assert_eq!(parse_range(Some("bytes=0-9"), 100), p(0, 9));
        assert_eq!(parse_range(Some("bytes=90-"), 100), p(90, 99));
        assert_eq!(parse_range(Some("bytes=-10"), 100), p(90, 99));
        assert_eq!(parse_range(Some("bytes=-1000"), 100), p(0, 99));
        assert_eq!(parse_range(Some("bytes=50-1000"), 100), p(50, 99));
        assert_eq!(parse_range(Some("bytes=100-"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=100-200"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=9-3"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-"), 0), Unsatisfiable);
        // Malformed or several ranges: ignored.
        assert_eq!(parse_range(Some("bytes=a-b"), 100), Full);
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), Full);
        assert_eq!(parse_range(Some("items=0-1"), 100), Full);
        assert_eq!(parse_range(Some("bytes=-"), 100), Full);
    }

    #[test]
    fn comments_are_trimmed_and_bounded() {
        assert_eq!(clean_comment("  学习体会  ").unwrap(), "学习体会");
        assert!(clean_comment(" \n ").is_err());
        assert!(clean_comment(&"字".repeat(MAX_COMMENT_CHARS)).is_ok());
        assert!(clean_comment(&"字".repeat(MAX_COMMENT_CHARS + 1)).is_err());
    }

    #[test]
    fn pages_show_beijing_time_and_readable_sizes() {
        assert_eq!(fmt_time(0), "1970-01-01 08:00");
        assert_eq!(fmt_duration(3_723_000), "1:02:03");
        assert_eq!(fmt_duration(754_000), "12:34");
        assert_eq!(fmt_size(5 * 1024 * 1024), "5.0 MB");
        assert_eq!(day_ms("1970-01-01", false), Some(-8 * 3600 * 1000));
        assert_eq!(day_ms("1970-01-01", true), Some(16 * 3600 * 1000 - 1));
        assert_eq!(day_ms("not a day", false), None);
    }

    #[test]
    fn like_patterns_match_literally() {
        assert_eq!(like_escape("100%_a\\"), "100\\%\\_a\\\\");
    }

    #[test]
    fn the_openapi_part_documents_every_recordings_endpoint() {
        let doc = RecordingsApi::openapi();
        for p in [
            "/api/v1/rooms/{room}/recordings",
            "/api/v1/recordings",
            "/api/v1/recordings/{id}",
            "/api/v1/recordings/{id}/stop",
            "/api/v1/recordings/{id}/media",
            "/api/v1/recordings/{id}/originals/{track}",
            "/api/v1/recordings/{id}/comments",
            "/api/v1/recordings/{id}/marks",
        ] {
            assert!(doc.paths.paths.contains_key(p), "{p}");
        }
    }
}
