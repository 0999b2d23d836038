//! Org life (组织生活): the record of meetings an org held — 支部党员大会, 支委会, 党小组会, 党课 —
//! who attended and who did not (with the reason), the minutes, and attached files (sign-in
//! sheets, photos, slides) kept in the object store under `orglife/{meeting}/{attachment}`.
//!
//! Scoping follows [`crate::orgs::Scope`]: every query joins `orgs` and filters on the caller's
//! path prefix, so a meeting of another subtree is simply not found (404). Reading needs only a
//! scope; recording, changing and deleting need [`Permission::ManageMembers`].
//!
//! A live session can fill a meeting in by itself through [`record_meeting`].

use std::collections::HashSet;

use axum::body::{Body, Bytes};
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use minijinja::context;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;

use crate::AppState;
use crate::auth::{self, CurrentUser, MaybeUser, Permission, User};
use crate::db::{Db, new_id, now_ms};
use crate::error::{ApiJson, AppError, ErrorBody};
use crate::orgs::{Org, Scope, like_escape};

/// Largest attachment, in bytes (20 MB).
pub const MAX_ATTACHMENT_BYTES: usize = 20 * 1024 * 1024;
/// Longest topic, in characters.
pub const MAX_TOPIC_CHARS: usize = 200;
/// Longest minutes, in characters.
pub const MAX_MINUTES_CHARS: usize = 20_000;
/// Longest absence reason, in characters.
pub const MAX_REASON_CHARS: usize = 200;
/// Most meetings one list answers (newest first).
pub const LIST_LIMIT: i64 = 500;
/// Most members the page offers for ticking attendance.
const FORM_MEMBERS: i64 = 300;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/orgs/{org}/meetings", get(list).post(create))
        .route(
            "/api/v1/meetings/{id}",
            get(get_one).patch(update).delete(remove),
        )
        .route("/api/v1/meetings/{id}/attachments", post(upload))
        .route("/api/v1/meetings/{id}/attachments/{att}", get(download))
        .route("/orglife", get(page).post(page_submit))
}

#[derive(OpenApi)]
#[openapi(paths(list, create, get_one, update, remove, upload, download))]
pub struct OrglifeApi;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MeetingKind {
    /// 支部党员大会
    PartyCongress,
    /// 支委会
    Committee,
    /// 党小组会
    Group,
    /// 党课
    Lecture,
    /// 其他
    Other,
}

impl MeetingKind {
    pub const ALL: [MeetingKind; 5] = [
        MeetingKind::PartyCongress,
        MeetingKind::Committee,
        MeetingKind::Group,
        MeetingKind::Lecture,
        MeetingKind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MeetingKind::PartyCongress => "party_congress",
            MeetingKind::Committee => "committee",
            MeetingKind::Group => "group",
            MeetingKind::Lecture => "lecture",
            MeetingKind::Other => "other",
        }
    }

    pub fn parse(s: &str) -> Option<MeetingKind> {
        MeetingKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn label(self) -> &'static str {
        match self {
            MeetingKind::PartyCongress => "支部党员大会",
            MeetingKind::Committee => "支委会",
            MeetingKind::Group => "党小组会",
            MeetingKind::Lecture => "党课",
            MeetingKind::Other => "其他",
        }
    }
}

/// One line of the attendance list as sent.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct AttendanceIn {
    pub member_id: String,
    pub present: bool,
    /// Required when `present` is false (请假、出差…).
    #[serde(default)]
    pub absence_reason: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct NewMeeting {
    pub kind: MeetingKind,
    /// `YYYY-MM-DD`.
    pub held_on: String,
    pub topic: String,
    #[serde(default)]
    pub minutes: String,
    /// Each member at most once; every one a member of the org or an org below it.
    #[serde(default)]
    pub attendance: Vec<AttendanceIn>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Meeting {
    pub id: String,
    pub org_id: String,
    pub org_name: String,
    pub kind: MeetingKind,
    /// 支部党员大会, 支委会…
    pub kind_label: String,
    pub held_on: String,
    pub topic: String,
    pub minutes: String,
    /// The live session or recording the meeting came from, if any.
    pub recording_id: Option<String>,
    pub created_by: Option<String>,
    pub created_at: i64,
    /// How many attended.
    pub present: i64,
    /// How many were absent.
    pub absent: i64,
    pub attachments: i64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Attendance {
    pub member_id: String,
    pub name: String,
    pub present: bool,
    pub absence_reason: String,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Attachment {
    pub id: String,
    pub file_name: String,
    pub content_type: String,
    pub size_bytes: i64,
    pub created_at: i64,
    /// Where to download it.
    pub url: String,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MeetingDetail {
    #[serde(flatten)]
    pub meeting: Meeting,
    /// Present first, then absent; by name.
    pub attendance: Vec<Attendance>,
    pub attachments_list: Vec<Attachment>,
}

#[derive(sqlx::FromRow)]
struct MeetingRow {
    id: String,
    org_id: String,
    org_name: String,
    kind: String,
    held_on: String,
    topic: String,
    minutes: String,
    recording_id: Option<String>,
    created_by: Option<String>,
    created_at: i64,
    present: i64,
    absent: i64,
    attachments: i64,
}

impl MeetingRow {
    fn into_meeting(self) -> Meeting {
        let kind = MeetingKind::parse(&self.kind).unwrap_or(MeetingKind::Other);
        Meeting {
            id: self.id,
            org_id: self.org_id,
            org_name: self.org_name,
            kind,
            kind_label: kind.label().into(),
            held_on: self.held_on,
            topic: self.topic,
            minutes: self.minutes,
            recording_id: self.recording_id,
            created_by: self.created_by,
            created_at: self.created_at,
            present: self.present,
            absent: self.absent,
            attachments: self.attachments,
        }
    }
}

const MEETING_SELECT: &str = "SELECT m.id, m.org_id, o.name AS org_name, m.kind, m.held_on, m.topic, m.minutes, \
     m.recording_id, m.created_by, m.created_at, \
     (SELECT COUNT(*) FROM org_meeting_attendance a WHERE a.meeting_id = m.id AND a.present = 1) AS present, \
     (SELECT COUNT(*) FROM org_meeting_attendance a WHERE a.meeting_id = m.id AND a.present = 0) AS absent, \
     (SELECT COUNT(*) FROM org_meeting_attachments f WHERE f.meeting_id = m.id) AS attachments \
     FROM org_meetings m JOIN orgs o ON o.id = m.org_id";

// ---------------------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------------------

/// A valid calendar date `YYYY-MM-DD`.
pub(crate) fn clean_date(s: &str, what: &str) -> Result<String, AppError> {
    let s = s.trim();
    match chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        Ok(d) if s.len() == 10 => Ok(d.format("%Y-%m-%d").to_string()),
        _ => Err(AppError::Unprocessable(format!(
            "{what}须为日期 YYYY-MM-DD ({what}: expected a date YYYY-MM-DD)"
        ))),
    }
}

fn clean_topic(s: &str) -> Result<String, AppError> {
    let s = s.trim();
    if s.is_empty() || s.chars().count() > MAX_TOPIC_CHARS {
        return Err(AppError::Unprocessable(format!(
            "会议主题须为 1 至 {MAX_TOPIC_CHARS} 个字 (topic must be 1 to {MAX_TOPIC_CHARS} characters)"
        )));
    }
    Ok(s.to_string())
}

fn clean_minutes(s: &str) -> Result<String, AppError> {
    let s = s.trim();
    if s.chars().count() > MAX_MINUTES_CHARS {
        return Err(AppError::Unprocessable(format!(
            "会议记录最多 {MAX_MINUTES_CHARS} 个字 (minutes too long)"
        )));
    }
    Ok(s.to_string())
}

/// The attendance list checked against the rules and the org's subtree: each member once, a
/// reason for each absentee, every member belonging to the org or an org below it.
async fn clean_attendance(
    db: &Db,
    org: &Org,
    list: &[AttendanceIn],
) -> Result<Vec<AttendanceIn>, AppError> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(list.len());
    let subtree = format!("{}%", like_escape(&org.path));
    for a in list {
        let id = a.member_id.trim();
        if !seen.insert(id.to_string()) {
            return Err(AppError::Unprocessable(format!(
                "出席名单中党员重复：{id} (member listed twice)"
            )));
        }
        let reason = a.absence_reason.trim();
        if !a.present && reason.is_empty() {
            return Err(AppError::Unprocessable(format!(
                "缺席须注明原因：{id} (an absentee needs a reason)"
            )));
        }
        if reason.chars().count() > MAX_REASON_CHARS {
            return Err(AppError::Unprocessable(format!(
                "缺席原因最多 {MAX_REASON_CHARS} 个字 (reason too long)"
            )));
        }
        let found: Option<(String,)> = sqlx::query_as(
            "SELECT m.id FROM members m JOIN orgs o ON o.id = m.org_id \
             WHERE m.id = $1 AND o.path LIKE $2 ESCAPE '\\'",
        )
        .bind(id)
        .bind(&subtree)
        .fetch_optional(&db.pool)
        .await?;
        if found.is_none() {
            return Err(AppError::Unprocessable(format!(
                "{id} 不是本组织的党员 (not a member of this org or an org below it)"
            )));
        }
        out.push(AttendanceIn {
            member_id: id.to_string(),
            present: a.present,
            absence_reason: if a.present {
                String::new()
            } else {
                reason.to_string()
            },
        });
    }
    Ok(out)
}

struct MeetingFields<'a> {
    kind: MeetingKind,
    held_on: &'a str,
    topic: &'a str,
    minutes: &'a str,
    recording_id: Option<&'a str>,
    created_by: Option<&'a str>,
}

async fn insert_meeting(
    db: &Db,
    org: &Org,
    f: MeetingFields<'_>,
    attendance: &[AttendanceIn],
) -> Result<String, AppError> {
    let id = new_id();
    let mut tx = db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO org_meetings (id, org_id, kind, held_on, topic, minutes, recording_id, created_by, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&id)
    .bind(&org.id)
    .bind(f.kind.as_str())
    .bind(f.held_on)
    .bind(f.topic)
    .bind(f.minutes)
    .bind(f.recording_id.map(str::to_string))
    .bind(f.created_by.map(str::to_string))
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    write_attendance(&mut tx, &id, attendance).await?;
    tx.commit().await?;
    Ok(id)
}

async fn write_attendance(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    meeting: &str,
    attendance: &[AttendanceIn],
) -> Result<(), AppError> {
    for a in attendance {
        sqlx::query(
            "INSERT INTO org_meeting_attendance (meeting_id, member_id, present, absence_reason) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(meeting)
        .bind(&a.member_id)
        .bind(i64::from(a.present))
        .bind(&a.absence_reason)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Creates a meeting of `org` (already checked to be in the caller's scope).
pub async fn create_meeting(
    db: &Db,
    org: &Org,
    req: &NewMeeting,
    created_by: Option<&str>,
) -> Result<Meeting, AppError> {
    let held_on = clean_date(&req.held_on, "会议日期")?;
    let topic = clean_topic(&req.topic)?;
    let minutes = clean_minutes(&req.minutes)?;
    let attendance = clean_attendance(db, org, &req.attendance).await?;
    let id = insert_meeting(
        db,
        org,
        MeetingFields {
            kind: req.kind,
            held_on: &held_on,
            topic: &topic,
            minutes: &minutes,
            recording_id: None,
            created_by,
        },
        &attendance,
    )
    .await?;
    load(db, &Scope::everything(), &id).await
}

/// What a live session knows when it ends, for [`record_meeting`].
#[derive(Debug, Clone)]
pub struct SessionRecord {
    /// The org that held the meeting (the room's org).
    pub org_id: String,
    pub kind: MeetingKind,
    /// `YYYY-MM-DD`, Beijing date the session started.
    pub held_on: String,
    pub topic: String,
    /// Notes taken during the session, if any.
    pub minutes: String,
    /// The recording of the session, kept in `org_meetings.recording_id`.
    pub recording_id: Option<String>,
    /// Members who joined the session (member ids; ids not in the org's subtree are ignored,
    /// since a live room may have guests).
    pub present: Vec<String>,
    /// Also list every other normal member of the org's subtree as absent, with
    /// [`AUTO_ABSENCE_REASON`], for the secretary to correct later. Meant for a branch's own
    /// meetings; leave off for a committee-wide lecture with thousands of members.
    pub fill_absent: bool,
    /// The user who ran the session.
    pub created_by: Option<String>,
}

/// The reason written for members [`record_meeting`] lists as absent.
pub const AUTO_ABSENCE_REASON: &str = "未参加线上会议（自动记录，待核实）";

/// Fills in a meeting from a live session, without a user's scope: the caller (the room or
/// recording code, when a session marked as 组织生活 ends) vouches for `rec.org_id`. Attendance
/// comes from who joined: `present` ids that are members of the org's subtree are recorded as
/// present (others are ignored), and with `fill_absent` the rest of the subtree's normal members
/// as absent with [`AUTO_ABSENCE_REASON`]. The meeting can be corrected afterwards through
/// `PATCH /api/v1/meetings/{id}` like any other.
pub async fn record_meeting(db: &Db, rec: &SessionRecord) -> Result<Meeting, AppError> {
    let org = Scope::everything().org(db, &rec.org_id).await?;
    let held_on = clean_date(&rec.held_on, "会议日期")?;
    let topic = clean_topic(&rec.topic)?;
    let minutes = clean_minutes(&rec.minutes)?;
    let members: Vec<(String,)> = sqlx::query_as(
        "SELECT m.id FROM members m JOIN orgs o ON o.id = m.org_id \
         WHERE o.path LIKE $1 ESCAPE '\\' AND m.status = 'normal'",
    )
    .bind(format!("{}%", like_escape(&org.path)))
    .fetch_all(&db.pool)
    .await?;
    let in_subtree: HashSet<String> = members.iter().map(|(id,)| id.clone()).collect();
    let mut attendance = Vec::new();
    let mut seen = HashSet::new();
    for id in &rec.present {
        if seen.insert(id.clone()) && in_subtree.contains(id) {
            attendance.push(AttendanceIn {
                member_id: id.clone(),
                present: true,
                absence_reason: String::new(),
            });
        }
    }
    // Present members who are not "normal" (just transferred, say) are still found by id.
    for id in rec.present.iter().filter(|id| !in_subtree.contains(*id)) {
        let found: Option<(String,)> = sqlx::query_as(
            "SELECT m.id FROM members m JOIN orgs o ON o.id = m.org_id \
             WHERE m.id = $1 AND o.path LIKE $2 ESCAPE '\\'",
        )
        .bind(id)
        .bind(format!("{}%", like_escape(&org.path)))
        .fetch_optional(&db.pool)
        .await?;
        if found.is_some() && !attendance.iter().any(|a| &a.member_id == id) {
            attendance.push(AttendanceIn {
                member_id: id.clone(),
                present: true,
                absence_reason: String::new(),
            });
        }
    }
    if rec.fill_absent {
        for (id,) in members {
            if !seen.contains(&id) {
                attendance.push(AttendanceIn {
                    member_id: id,
                    present: false,
                    absence_reason: AUTO_ABSENCE_REASON.into(),
                });
            }
        }
    }
    let id = insert_meeting(
        db,
        &org,
        MeetingFields {
            kind: rec.kind,
            held_on: &held_on,
            topic: &topic,
            minutes: &minutes,
            recording_id: rec.recording_id.as_deref(),
            created_by: rec.created_by.as_deref(),
        },
        &attendance,
    )
    .await?;
    load(db, &Scope::everything(), &id).await
}

/// The meeting `id` if its org is in `scope`, else 404.
pub async fn load(db: &Db, scope: &Scope, id: &str) -> Result<Meeting, AppError> {
    let sql = format!("{MEETING_SELECT} WHERE m.id = $1 AND o.path LIKE $2 ESCAPE '\\'");
    Ok(sqlx::query_as::<_, MeetingRow>(&sql)
        .bind(id)
        .bind(scope.like())
        .fetch_optional(&db.pool)
        .await?
        .ok_or(AppError::NotFound)?
        .into_meeting())
}

/// Filters for [`meetings`].
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct MeetingFilter {
    /// Held on or after (`YYYY-MM-DD`).
    pub from: Option<String>,
    /// Held on or before (`YYYY-MM-DD`).
    pub to: Option<String>,
    /// One kind only.
    pub kind: Option<MeetingKind>,
}

/// Meetings of `org`'s subtree (newest first), at most [`LIST_LIMIT`].
pub async fn meetings(db: &Db, org: &Org, f: &MeetingFilter) -> Result<Vec<Meeting>, AppError> {
    meetings_under(db, &format!("{}%", like_escape(&org.path)), f).await
}

async fn meetings_under(
    db: &Db,
    pattern: &str,
    f: &MeetingFilter,
) -> Result<Vec<Meeting>, AppError> {
    let mut sql = format!("{MEETING_SELECT} WHERE o.path LIKE $1 ESCAPE '\\'");
    let mut binds = vec![pattern.to_string()];
    if let Some(from) = f.from.as_deref().filter(|s| !s.trim().is_empty()) {
        binds.push(clean_date(from, "开始日期")?);
        sql.push_str(&format!(" AND m.held_on >= ${}", binds.len()));
    }
    if let Some(to) = f.to.as_deref().filter(|s| !s.trim().is_empty()) {
        binds.push(clean_date(to, "结束日期")?);
        sql.push_str(&format!(" AND m.held_on <= ${}", binds.len()));
    }
    if let Some(kind) = f.kind {
        binds.push(kind.as_str().into());
        sql.push_str(&format!(" AND m.kind = ${}", binds.len()));
    }
    sql.push_str(&format!(
        " ORDER BY m.held_on DESC, m.created_at DESC LIMIT {LIST_LIMIT}"
    ));
    let mut q = sqlx::query_as::<_, MeetingRow>(&sql);
    for b in binds {
        q = q.bind(b);
    }
    Ok(q.fetch_all(&db.pool)
        .await?
        .into_iter()
        .map(MeetingRow::into_meeting)
        .collect())
}

async fn detail(db: &Db, meeting: Meeting) -> Result<MeetingDetail, AppError> {
    let rows: Vec<(String, String, i64, String)> = sqlx::query_as(
        "SELECT a.member_id, mb.name, a.present, a.absence_reason FROM org_meeting_attendance a \
         JOIN members mb ON mb.id = a.member_id WHERE a.meeting_id = $1 \
         ORDER BY a.present DESC, mb.name, a.member_id",
    )
    .bind(&meeting.id)
    .fetch_all(&db.pool)
    .await?;
    let attendance = rows
        .into_iter()
        .map(|(member_id, name, present, absence_reason)| Attendance {
            member_id,
            name,
            present: present != 0,
            absence_reason,
        })
        .collect();
    let attachments_list = attachments(db, &meeting.id).await?;
    Ok(MeetingDetail {
        meeting,
        attendance,
        attachments_list,
    })
}

async fn attachments(db: &Db, meeting: &str) -> Result<Vec<Attachment>, AppError> {
    let rows: Vec<(String, String, String, i64, i64)> = sqlx::query_as(
        "SELECT id, file_name, content_type, size_bytes, created_at FROM org_meeting_attachments \
         WHERE meeting_id = $1 ORDER BY created_at, id",
    )
    .bind(meeting)
    .fetch_all(&db.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(id, file_name, content_type, size_bytes, created_at)| Attachment {
                url: format!("/api/v1/meetings/{meeting}/attachments/{id}"),
                id,
                file_name,
                content_type,
                size_bytes,
                created_at,
            },
        )
        .collect())
}

fn object_key(meeting: &str, attachment: &str) -> ObjectPath {
    ObjectPath::from(format!("orglife/{meeting}/{attachment}"))
}

fn store_error(e: object_store::Error) -> AppError {
    match e {
        object_store::Error::NotFound { .. } => AppError::NotFound,
        e => {
            tracing::warn!(error = %e, "object store");
            AppError::Unavailable("文件存储暂不可用 (object store unavailable)".into())
        }
    }
}

/// A file name safe to store and to send back: no directories, no control characters, at most
/// 200 characters.
fn clean_file_name(name: &str) -> Result<String, AppError> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = base
        .chars()
        .filter(|c| !c.is_control() && *c != '"')
        .take(200)
        .collect();
    let cleaned = cleaned.trim().to_string();
    if cleaned.is_empty() || cleaned == "." || cleaned == ".." {
        return Err(AppError::Unprocessable(
            "请给出附件的文件名 (?name=…) (attachment needs a file name)".into(),
        ));
    }
    Ok(cleaned)
}

/// The content type to keep: the one given when it looks like one, else a guess from the name.
fn content_type_for(given: Option<&str>, file_name: &str) -> String {
    let given = given
        .map(|g| {
            g.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|g| {
            !g.is_empty()
                && g.len() <= 100
                && g != "application/octet-stream"
                && g.contains('/')
                && g.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/.+-_".contains(&b))
        });
    if let Some(g) = given {
        return g;
    }
    let ext = file_name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "pdf" => "application/pdf",
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "txt" => "text/plain",
        "doc" => "application/msword",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "xls" => "application/vnd.ms-excel",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "ppt" => "application/vnd.ms-powerpoint",
        "pptx" => "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "mp3" => "audio/mpeg",
        "mp4" => "video/mp4",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
    .to_string()
}

/// `attachment; filename="…"; filename*=UTF-8''…` with an ASCII fallback.
pub(crate) fn content_disposition(file_name: &str) -> String {
    let ascii: String = file_name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded: String = file_name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

/// The one file part of a `multipart/form-data` body: (file name, content type, bytes).
fn multipart_file(
    content_type: &str,
    body: &Bytes,
) -> Result<(String, Option<String>, Bytes), AppError> {
    let bad = || AppError::BadRequest("无法解析上传的表单 (malformed multipart body)".into());
    let boundary = content_type
        .split(';')
        .filter_map(|p| p.trim().strip_prefix("boundary="))
        .next()
        .map(|b| b.trim_matches('"'))
        .filter(|b| !b.is_empty())
        .ok_or_else(bad)?;
    let delim = format!("--{boundary}");
    let data = body.as_ref();
    let mut pos = find(data, delim.as_bytes(), 0).ok_or_else(bad)?;
    loop {
        let after = pos + delim.len();
        if data[after..].starts_with(b"--") {
            break;
        }
        let headers_start = after + 2; // CRLF
        let headers_end = find(data, b"\r\n\r\n", headers_start).ok_or_else(bad)?;
        let part_start = headers_end + 4;
        let next = find(data, format!("\r\n{delim}").as_bytes(), part_start).ok_or_else(bad)?;
        let head = String::from_utf8_lossy(data.get(headers_start..headers_end).ok_or_else(bad)?);
        let mut file_name = None;
        let mut ctype = None;
        for line in head.split("\r\n") {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            match k.trim().to_ascii_lowercase().as_str() {
                "content-disposition" => file_name = disposition_filename(v),
                "content-type" => ctype = Some(v.trim().to_string()),
                _ => {}
            }
        }
        if let Some(name) = file_name {
            return Ok((name, ctype, body.slice(part_start..next)));
        }
        pos = next + 2;
    }
    Err(AppError::Unprocessable(
        "表单中没有文件 (no file part in the form)".into(),
    ))
}

fn disposition_filename(v: &str) -> Option<String> {
    let mut plain = None;
    for p in v.split(';').map(str::trim) {
        if let Some(enc) = p.strip_prefix("filename*=") {
            let enc = enc.trim_matches('"');
            let raw = enc.split_once("''").map_or(enc, |(_, r)| r);
            let decoded: String =
                url::form_urlencoded::parse(format!("x={}", raw.replace('+', "%2B")).as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
            if !decoded.is_empty() {
                return Some(decoded);
            }
        } else if let Some(n) = p.strip_prefix("filename=") {
            plain = Some(n.trim_matches('"').to_string());
        }
    }
    plain
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > hay.len() || needle.is_empty() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

async fn delete_meeting(state: &AppState, m: &Meeting) -> Result<(), AppError> {
    let atts = attachments(&state.db, &m.id).await?;
    let mut tx = state.db.pool.begin().await?;
    for sql in [
        "DELETE FROM org_meeting_attendance WHERE meeting_id = $1",
        "DELETE FROM org_meeting_attachments WHERE meeting_id = $1",
        "DELETE FROM org_meetings WHERE id = $1",
    ] {
        sqlx::query(sql).bind(&m.id).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    for a in atts {
        if let Err(e) = state.storage.store.delete(&object_key(&m.id, &a.id)).await {
            tracing::warn!(error = %e, meeting = %m.id, attachment = %a.id, "cannot delete attachment object");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// REST
// ---------------------------------------------------------------------------------------------

/// Meetings of the org and every org below it, newest first (at most 500).
#[utoipa::path(get, path = "/api/v1/orgs/{org}/meetings", params(("org" = String, Path), MeetingFilter),
    responses((status = 200, body = [Meeting]), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(org): Path<String>,
    Query(f): Query<MeetingFilter>,
) -> Result<Json<Vec<Meeting>>, AppError> {
    let scope = Scope::of(&state.db, &user.0).await?;
    let org = scope.org(&state.db, &org).await?;
    Ok(Json(meetings(&state.db, &org, &f).await?))
}

/// Record a meeting the org held, with its attendance.
#[utoipa::path(post, path = "/api/v1/orgs/{org}/meetings", params(("org" = String, Path)), request_body = NewMeeting,
    responses((status = 201, body = MeetingDetail), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, description = "Bad date or topic, an absentee without a reason, or someone not a member of the org", body = ErrorBody)))]
pub(crate) async fn create(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(org): Path<String>,
    ApiJson(req): ApiJson<NewMeeting>,
) -> Result<(StatusCode, Json<MeetingDetail>), AppError> {
    let me = user.require(Permission::ManageMembers)?;
    let scope = Scope::of(&state.db, me).await?;
    let org = scope.org(&state.db, &org).await?;
    let m = create_meeting(&state.db, &org, &req, Some(&me.id)).await?;
    auth::audit(&state.db, Some(&me.id), "create_meeting", &m.id, &m.topic).await?;
    Ok((StatusCode::CREATED, Json(detail(&state.db, m).await?)))
}

/// A meeting with its attendance list and attachments.
#[utoipa::path(get, path = "/api/v1/meetings/{id}", params(("id" = String, Path)),
    responses((status = 200, body = MeetingDetail), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_one(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<MeetingDetail>, AppError> {
    let scope = Scope::of(&state.db, &user.0).await?;
    let m = load(&state.db, &scope, &id).await?;
    Ok(Json(detail(&state.db, m).await?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct MeetingPatch {
    #[serde(default)]
    pub kind: Option<MeetingKind>,
    #[serde(default)]
    pub held_on: Option<String>,
    #[serde(default)]
    pub topic: Option<String>,
    #[serde(default)]
    pub minutes: Option<String>,
    /// Replaces the whole attendance list when given.
    #[serde(default)]
    pub attendance: Option<Vec<AttendanceIn>>,
}

/// Correct a meeting; `attendance`, when given, replaces the whole list.
#[utoipa::path(patch, path = "/api/v1/meetings/{id}", params(("id" = String, Path)), request_body = MeetingPatch,
    responses((status = 200, body = MeetingDetail), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn update(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<MeetingPatch>,
) -> Result<Json<MeetingDetail>, AppError> {
    let me = user.require(Permission::ManageMembers)?;
    let scope = Scope::of(&state.db, me).await?;
    let m = load(&state.db, &scope, &id).await?;
    let org = scope.org(&state.db, &m.org_id).await?;
    let kind = req.kind.unwrap_or(m.kind);
    let held_on = match &req.held_on {
        Some(d) => clean_date(d, "会议日期")?,
        None => m.held_on.clone(),
    };
    let topic = match &req.topic {
        Some(t) => clean_topic(t)?,
        None => m.topic.clone(),
    };
    let minutes = match &req.minutes {
        Some(t) => clean_minutes(t)?,
        None => m.minutes.clone(),
    };
    let attendance = match &req.attendance {
        Some(list) => Some(clean_attendance(&state.db, &org, list).await?),
        None => None,
    };
    let mut tx = state.db.pool.begin().await?;
    sqlx::query(
        "UPDATE org_meetings SET kind = $2, held_on = $3, topic = $4, minutes = $5 WHERE id = $1",
    )
    .bind(&m.id)
    .bind(kind.as_str())
    .bind(&held_on)
    .bind(&topic)
    .bind(&minutes)
    .execute(&mut *tx)
    .await?;
    if let Some(list) = &attendance {
        sqlx::query("DELETE FROM org_meeting_attendance WHERE meeting_id = $1")
            .bind(&m.id)
            .execute(&mut *tx)
            .await?;
        write_attendance(&mut tx, &m.id, list).await?;
    }
    tx.commit().await?;
    auth::audit(&state.db, Some(&me.id), "update_meeting", &m.id, &topic).await?;
    let m = load(&state.db, &scope, &id).await?;
    Ok(Json(detail(&state.db, m).await?))
}

/// Delete a meeting record with its attendance and attachments.
#[utoipa::path(delete, path = "/api/v1/meetings/{id}", params(("id" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn remove(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    let me = user.require(Permission::ManageMembers)?;
    let scope = Scope::of(&state.db, me).await?;
    let m = load(&state.db, &scope, &id).await?;
    delete_meeting(&state, &m).await?;
    auth::audit(&state.db, Some(&me.id), "delete_meeting", &m.id, &m.topic).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct UploadQuery {
    /// The file name, for a raw body (a multipart form carries its own).
    pub name: Option<String>,
}

/// Attach a file (at most 20 MB): either the raw bytes as the body with `?name=` and the file's
/// `Content-Type`, or a `multipart/form-data` form with one file field.
#[utoipa::path(post, path = "/api/v1/meetings/{id}/attachments", params(("id" = String, Path), UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = Attachment), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, description = "Larger than 20 MB", body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 503, description = "Object store unavailable", body = ErrorBody)))]
pub(crate) async fn upload(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AppError> {
    let me = user.require(Permission::ManageMembers)?;
    let scope = Scope::of(&state.db, me).await?;
    let m = load(&state.db, &scope, &id).await?;
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            Json(ErrorBody {
                error: "payload_too_large",
                message: "附件不能超过 20 MB (attachment larger than 20 MB)".into(),
            }),
        )
            .into_response()
    };
    // Room for the multipart framing around a file of the largest size.
    let Ok(raw) = axum::body::to_bytes(body, MAX_ATTACHMENT_BYTES + 64 * 1024).await else {
        return Ok(too_large());
    };
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (name, file_ctype, bytes) = if ctype
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        let (name, ct, bytes) = multipart_file(ctype, &raw)?;
        (
            q.name.filter(|n| !n.trim().is_empty()).unwrap_or(name),
            ct,
            bytes,
        )
    } else {
        (
            q.name.unwrap_or_default(),
            Some(ctype.to_string()).filter(|c| !c.is_empty()),
            raw,
        )
    };
    if bytes.len() > MAX_ATTACHMENT_BYTES {
        return Ok(too_large());
    }
    if bytes.is_empty() {
        return Err(AppError::Unprocessable("附件为空 (empty file)".into()));
    }
    let file_name = clean_file_name(&name)?;
    let content_type = content_type_for(file_ctype.as_deref(), &file_name);
    let att = new_id();
    let size = bytes.len() as i64;
    state
        .storage
        .store
        .put(&object_key(&m.id, &att), PutPayload::from(bytes))
        .await
        .map_err(store_error)?;
    let now = now_ms();
    sqlx::query(
        "INSERT INTO org_meeting_attachments (id, meeting_id, file_name, content_type, size_bytes, object_key, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&att)
    .bind(&m.id)
    .bind(&file_name)
    .bind(&content_type)
    .bind(size)
    .bind(object_key(&m.id, &att).to_string())
    .bind(now)
    .execute(&state.db.pool)
    .await?;
    auth::audit(
        &state.db,
        Some(&me.id),
        "attach_meeting_file",
        &m.id,
        &file_name,
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(Attachment {
            url: format!("/api/v1/meetings/{}/attachments/{att}", m.id),
            id: att,
            file_name,
            content_type,
            size_bytes: size,
            created_at: now,
        }),
    )
        .into_response())
}

/// Download an attachment, streamed from the object store.
#[utoipa::path(get, path = "/api/v1/meetings/{id}/attachments/{att}", params(("id" = String, Path), ("att" = String, Path)),
    responses((status = 200, description = "The file, with its content type and name"), (status = 404, body = ErrorBody),
        (status = 503, description = "Object store unavailable", body = ErrorBody)))]
pub(crate) async fn download(
    State(state): State<AppState>,
    user: CurrentUser,
    Path((id, att)): Path<(String, String)>,
) -> Result<Response, AppError> {
    let scope = Scope::of(&state.db, &user.0).await?;
    let m = load(&state.db, &scope, &id).await?;
    let row: Option<(String, String, String)> = sqlx::query_as(
        "SELECT file_name, content_type, object_key FROM org_meeting_attachments WHERE id = $1 AND meeting_id = $2",
    )
    .bind(&att)
    .bind(&m.id)
    .fetch_optional(&state.db.pool)
    .await?;
    let (file_name, content_type, key) = row.ok_or(AppError::NotFound)?;
    let got = state
        .storage
        .store
        .get(&ObjectPath::from(key))
        .await
        .map_err(store_error)?;
    let size = got.meta.size;
    let mut resp = Response::new(Body::from_stream(got.into_stream()));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(v) = HeaderValue::from_str(&content_disposition(&file_name)) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

// ---------------------------------------------------------------------------------------------
// Page
// ---------------------------------------------------------------------------------------------

pub(crate) fn login_redirect(next: &str) -> Response {
    let next: String = url::form_urlencoded::byte_serialize(next.as_bytes()).collect();
    Redirect::to(&format!("/login?next={next}")).into_response()
}

pub(crate) fn check_csrf(headers: &HeaderMap, token: &str) -> Result<(), AppError> {
    if auth::csrf_ok(headers, token) {
        Ok(())
    } else {
        Err(AppError::Forbidden(
            "页面已过期，请刷新后重试。(form expired)".into(),
        ))
    }
}

/// Today in Beijing, `YYYY-MM-DD`.
pub(crate) fn today() -> String {
    chrono::DateTime::from_timestamp_millis(now_ms() + 8 * 3600 * 1000)
        .map(|d| d.date_naive().format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| "1970-01-01".into())
}

#[derive(Debug, Default, Deserialize)]
struct PageQuery {
    org: Option<String>,
    from: Option<String>,
    to: Option<String>,
    kind: Option<String>,
    done: Option<String>,
}

async fn page(
    State(state): State<AppState>,
    headers: HeaderMap,
    MaybeUser(user): MaybeUser,
    Query(q): Query<PageQuery>,
) -> Result<Response, AppError> {
    let Some(user) = user else {
        return Ok(login_redirect("/orglife"));
    };
    render(&state, &headers, &user, &q, StatusCode::OK, None, None).await
}

async fn render(
    state: &AppState,
    headers: &HeaderMap,
    user: &User,
    q: &PageQuery,
    status: StatusCode,
    error: Option<String>,
    form: Option<&[(String, String)]>,
) -> Result<Response, AppError> {
    let scope = Scope::of(&state.db, user).await?;
    let orgs = scope.orgs(&state.db).await?;
    let selected = match q.org.as_deref().filter(|s| !s.is_empty()) {
        Some(id) => orgs.iter().find(|o| o.id == id).cloned(),
        None => None,
    };
    let filter = MeetingFilter {
        from: q.from.clone().filter(|s| !s.is_empty()),
        to: q.to.clone().filter(|s| !s.is_empty()),
        kind: q.kind.as_deref().and_then(MeetingKind::parse),
    };
    let list = match &selected {
        Some(o) => meetings(&state.db, o, &filter).await,
        None => meetings_under(&state.db, &scope.like(), &filter).await,
    };
    let (list, error) = match list {
        Ok(l) => (l, error),
        Err(AppError::Unprocessable(msg)) => (Vec::new(), Some(msg)),
        Err(e) => return Err(e),
    };
    let can_manage = user.role.allows(Permission::ManageMembers);
    // Members of the chosen org's subtree, to tick attendance.
    let members: Vec<(String, String, String)> = match (&selected, can_manage) {
        (Some(o), true) => {
            sqlx::query_as(&format!(
                "SELECT m.id, m.name, o.name FROM members m JOIN orgs o ON o.id = m.org_id \
                 WHERE o.path LIKE $1 ESCAPE '\\' AND m.status = 'normal' ORDER BY o.path, m.name LIMIT {FORM_MEMBERS}"
            ))
            .bind(format!("{}%", like_escape(&o.path)))
            .fetch_all(&state.db.pool)
            .await?
        }
        _ => Vec::new(),
    };
    let field = |k: &str| {
        form.and_then(|f| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
            .unwrap_or_default()
    };
    let members: Vec<_> = members
        .into_iter()
        .map(|(id, name, org)| {
            let present = form.is_none() || !field(&format!("present_{id}")).is_empty();
            let reason = field(&format!("reason_{id}"));
            context! { id => id, name => name, org => org, present => present, reason => reason }
        })
        .collect();
    let items: Vec<_> = list
        .iter()
        .map(|m| {
            context! {
                id => m.id, org => m.org_name, kind => m.kind_label, held_on => m.held_on,
                topic => m.topic, present => m.present, absent => m.absent,
                attachments => m.attachments,
            }
        })
        .collect();
    let org_options: Vec<_> = orgs
        .iter()
        .map(|o| context! { id => o.id, name => format!("{}{}", "　".repeat(o.depth.saturating_sub(orgs.first().map_or(0, |f| f.depth))), o.name) })
        .collect();
    let kinds: Vec<_> = MeetingKind::ALL
        .iter()
        .map(|k| context! { key => k.as_str(), label => k.label() })
        .collect();
    let ctx = context! {
        user => user, orgs => org_options, kinds => kinds, meetings => items,
        org => selected.as_ref().map(|o| o.id.clone()), org_name => selected.as_ref().map(|o| o.name.clone()),
        from => filter.from, to => filter.to, kind => filter.kind.map(MeetingKind::as_str),
        can_manage => can_manage, members => members, error => error,
        done => q.done.is_some(), today => today(),
        f_kind => field("kind"), f_held_on => field("held_on"), f_topic => field("topic"), f_minutes => field("minutes"),
    };
    let mut resp = crate::pages::render_page(state, headers, "orglife.html", ctx)?.into_response();
    *resp.status_mut() = status;
    Ok(resp)
}

async fn page_submit(
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
    let me = user.require(Permission::ManageMembers)?;
    let scope = Scope::of(&state.db, me).await?;
    let org = scope.org(&state.db, &field("org")).await?;
    let attendance: Vec<AttendanceIn> = form
        .iter()
        .filter(|(k, _)| k == "member")
        .map(|(_, id)| AttendanceIn {
            member_id: id.clone(),
            present: !field(&format!("present_{id}")).is_empty(),
            absence_reason: field(&format!("reason_{id}")),
        })
        .collect();
    let q = PageQuery {
        org: Some(org.id.clone()),
        ..PageQuery::default()
    };
    let Some(kind) = MeetingKind::parse(&field("kind")) else {
        let msg = "请选择会议类型 (choose a kind)".to_string();
        return render(
            &state,
            &headers,
            me,
            &q,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some(msg),
            Some(&form),
        )
        .await;
    };
    let req = NewMeeting {
        kind,
        held_on: field("held_on"),
        topic: field("topic"),
        minutes: field("minutes"),
        attendance,
    };
    match create_meeting(&state.db, &org, &req, Some(&me.id)).await {
        Ok(m) => {
            auth::audit(&state.db, Some(&me.id), "create_meeting", &m.id, &m.topic).await?;
            Ok(Redirect::to(&format!("/orglife?org={}&done=1", org.id)).into_response())
        }
        Err(AppError::Unprocessable(msg)) => {
            render(
                &state,
                &headers,
                me,
                &q,
                StatusCode::UNPROCESSABLE_ENTITY,
                Some(msg),
                Some(&form),
            )
            .await
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_must_be_real() {
        assert_eq!(clean_date("2026-02-28", "d").unwrap(), "2026-02-28");
        assert!(clean_date("2026-02-30", "d").is_err());
        assert!(clean_date("2026-2-3", "d").is_err());
        assert!(clean_date("", "d").is_err());
    }

    #[test]
    fn multipart_finds_the_file() {
        let body = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n--XyZ\r\n\
              Content-Disposition: form-data; name=\"file\"; filename=\"sign-in.pdf\"\r\n\
              Content-Type: application/pdf\r\n\r\n%PDF\r\n--X\r\n--XyZ--\r\n",
        );
        let (name, ct, bytes) = multipart_file("multipart/form-data; boundary=XyZ", &body).unwrap();
        assert_eq!(name, "sign-in.pdf");
        assert_eq!(ct.as_deref(), Some("application/pdf"));
        assert_eq!(&bytes[..], b"%PDF\r\n--X");
    }

    #[test]
    fn file_names_lose_directories_and_get_both_disposition_forms() {
        assert_eq!(clean_file_name("C:\\x\\签到表.pdf").unwrap(), "签到表.pdf");
        assert_eq!(clean_file_name("../../etc/passwd").unwrap(), "passwd");
        assert!(clean_file_name("a/").is_err());
        assert_eq!(
            content_disposition("签到.pdf"),
            "attachment; filename=\"__.pdf\"; filename*=UTF-8''%E7%AD%BE%E5%88%B0.pdf"
        );
        assert_eq!(content_type_for(None, "a.JPG"), "image/jpeg");
        assert_eq!(
            content_type_for(Some("text/plain; charset=utf-8"), "a.bin"),
            "text/plain"
        );
    }
}
