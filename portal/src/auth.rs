//! Accounts: roles and permissions, password hashing, sign-in sessions, throttling, CSRF.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{
    PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng,
};
use axum::extract::FromRequestParts;
use axum::http::{HeaderMap, Method, header, request::Parts};
use axum::response::{IntoResponse, Redirect, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::db::{Db, new_id, now_ms};
use crate::error::AppError;

pub const SESSION_COOKIE: &str = "dj_session";
pub const CSRF_COOKIE: &str = "dj_csrf";
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// The roles of SPEC.md; each carries a fixed set of permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    SystemAdmin,
    OrgAdmin,
    Secretary,
    Lecturer,
    Member,
}

/// Things an endpoint may require. Checked on every request by [`CurrentUser::require`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    ManageUsers,
    ManageOrgs,
    ManageMembers,
    JoinRooms,
    HostRooms,
    RecordRooms,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::SystemAdmin,
        Role::OrgAdmin,
        Role::Secretary,
        Role::Lecturer,
        Role::Member,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::SystemAdmin => "system_admin",
            Role::OrgAdmin => "org_admin",
            Role::Secretary => "secretary",
            Role::Lecturer => "lecturer",
            Role::Member => "member",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The zh-CN name shown in pages.
    pub fn label(self) -> &'static str {
        match self {
            Role::SystemAdmin => "系统管理员",
            Role::OrgAdmin => "组织管理员",
            Role::Secretary => "支部书记",
            Role::Lecturer => "讲师",
            Role::Member => "党员",
        }
    }

    pub fn allows(self, p: Permission) -> bool {
        use Permission::*;
        match self {
            Role::SystemAdmin => true,
            Role::OrgAdmin => matches!(
                p,
                ManageOrgs | ManageMembers | JoinRooms | HostRooms | RecordRooms
            ),
            Role::Secretary => matches!(p, ManageMembers | JoinRooms | HostRooms | RecordRooms),
            Role::Lecturer => matches!(p, JoinRooms | HostRooms | RecordRooms),
            Role::Member => matches!(p, JoinRooms),
        }
    }
}

/// Argon2id with the crate's defaults; slow on purpose, so it runs off the async threads.
pub async fn hash_password(password: String) -> Result<String, AppError> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| anyhow::anyhow!("hashing password: {e}"))
    })
    .await
    .map_err(|e| anyhow::anyhow!(e))?
    .map_err(AppError::Internal)
}

pub async fn verify_password(password: String, hash: String) -> bool {
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash)
            .map(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

/// Rules for new passwords, shared by the API and the pages.
pub fn check_new_password(p: &str) -> Result<(), AppError> {
    if p.chars().count() < 8 {
        return Err(AppError::BadRequest(
            "新密码至少 8 个字符 (password must be at least 8 characters)".into(),
        ));
    }
    if p.len() > 256 {
        return Err(AppError::BadRequest(
            "password must be at most 256 bytes".into(),
        ));
    }
    Ok(())
}

pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A user row as the rest of the portal sees it (never with the hash).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct User {
    pub id: String,
    pub username: String,
    pub display_name: String,
    pub role: Role,
    pub must_change_password: bool,
    /// The org whose subtree the user keeps (admins, secretaries) or belongs to.
    pub org_id: Option<String>,
}

#[derive(sqlx::FromRow)]
pub(crate) struct UserRow {
    pub id: String,
    pub username: String,
    pub display_name: String,
    pub role: String,
    pub must_change_password: i64,
    pub password_hash: String,
    pub disabled: i64,
    pub org_id: Option<String>,
}

pub(crate) const USER_COLUMNS: &str =
    "id, username, display_name, role, must_change_password, password_hash, disabled, org_id";

impl UserRow {
    pub fn into_user(self) -> Result<User, AppError> {
        let role = Role::parse(&self.role)
            .ok_or_else(|| anyhow::anyhow!("user {} has unknown role {}", self.id, self.role))?;
        Ok(User {
            id: self.id,
            username: self.username,
            display_name: self.display_name,
            role,
            must_change_password: self.must_change_password != 0,
            org_id: self.org_id,
        })
    }
}

pub(crate) async fn find_user_by_name(
    db: &Db,
    username: &str,
) -> Result<Option<UserRow>, AppError> {
    let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE username = $1");
    Ok(sqlx::query_as::<_, UserRow>(&sql)
        .bind(username)
        .fetch_optional(&db.pool)
        .await?)
}

pub async fn create_user(
    db: &Db,
    username: &str,
    display_name: &str,
    password: &str,
    role: Role,
    must_change_password: bool,
) -> Result<User, AppError> {
    validate_username(username)?;
    if find_user_by_name(db, username).await?.is_some() {
        return Err(AppError::Conflict(format!(
            "username `{username}` is taken"
        )));
    }
    let hash = hash_password(password.to_string()).await?;
    let id = new_id();
    let now = now_ms();
    sqlx::query(
        "INSERT INTO users (id, username, display_name, password_hash, role, must_change_password, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
    )
    .bind(&id)
    .bind(username)
    .bind(display_name)
    .bind(&hash)
    .bind(role.as_str())
    .bind(must_change_password as i64)
    .bind(now)
    .execute(&db.pool)
    .await?;
    Ok(User {
        id,
        username: username.into(),
        display_name: display_name.into(),
        role,
        must_change_password,
        org_id: None,
    })
}

fn validate_username(u: &str) -> Result<(), AppError> {
    let ok = (1..=64).contains(&u.len())
        && u.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(AppError::BadRequest(
            "username must be 1 to 64 letters, digits, `.`, `_` or `-`".into(),
        ))
    }
}

pub async fn set_password(db: &Db, user_id: &str, new_password: &str) -> Result<(), AppError> {
    let hash = hash_password(new_password.to_string()).await?;
    sqlx::query("UPDATE users SET password_hash = $1, must_change_password = 0, updated_at = $2 WHERE id = $3")
        .bind(&hash)
        .bind(now_ms())
        .bind(user_id)
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// Starts a session and returns the cookie value (only its hash is stored).
pub async fn start_session(db: &Db, user_id: &str) -> Result<String, AppError> {
    let token = random_token();
    let now = now_ms();
    sqlx::query("INSERT INTO sessions (token_hash, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)")
        .bind(token_hash(&token))
        .bind(user_id)
        .bind(now)
        .bind(now + SESSION_TTL.as_millis() as i64)
        .execute(&db.pool)
        .await?;
    Ok(token)
}

pub async fn end_session(db: &Db, token: &str) -> Result<(), AppError> {
    sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
        .bind(token_hash(token))
        .execute(&db.pool)
        .await?;
    Ok(())
}

async fn session_user(db: &Db, token: &str) -> Result<Option<User>, AppError> {
    let sql = format!(
        "SELECT {} FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.token_hash = $1 AND s.expires_at > $2",
        USER_COLUMNS
            .split(", ")
            .map(|c| format!("u.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let row = sqlx::query_as::<_, UserRow>(&sql)
        .bind(token_hash(token))
        .bind(now_ms())
        .fetch_optional(&db.pool)
        .await?;
    match row {
        Some(r) if r.disabled == 0 => Ok(Some(r.into_user()?)),
        _ => Ok(None),
    }
}

/// Deletes sessions past their expiry; returns how many. Run periodically by the binary.
pub async fn purge_expired_sessions(db: &Db) -> Result<u64, AppError> {
    let done = sqlx::query("DELETE FROM sessions WHERE expires_at <= $1")
        .bind(now_ms())
        .execute(&db.pool)
        .await?;
    Ok(done.rows_affected())
}

pub fn session_cookie(token: &str, secure: bool) -> String {
    format!(
        "{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{}",
        SESSION_TTL.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

pub fn clear_session_cookie() -> String {
    format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0")
}

pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Double-submit CSRF check for HTML forms: the form field must equal the cookie.
pub fn csrf_ok(headers: &HeaderMap, form_value: &str) -> bool {
    match cookie(headers, CSRF_COOKIE) {
        Some(c) if !c.is_empty() => c.as_bytes().ct_eq(form_value.as_bytes()).into(),
        _ => false,
    }
}

/// The signed-in user, taken from the session cookie. Rejects with 401 when there is none.
#[derive(Debug, Clone)]
pub struct CurrentUser(pub User);

impl CurrentUser {
    pub fn require(&self, p: Permission) -> Result<&User, AppError> {
        if self.0.role.allows(p) {
            Ok(&self.0)
        } else {
            Err(AppError::Forbidden(
                "你没有执行此操作的权限 (permission denied)".into(),
            ))
        }
    }
}

impl FromRequestParts<AppState> for CurrentUser {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let token = cookie(&parts.headers, SESSION_COOKIE)
            .ok_or_else(|| AppError::Unauthorized("not signed in".into()))?;
        let user = session_user(&state.db, token)
            .await?
            .ok_or_else(|| AppError::Unauthorized("session expired or signed out".into()))?;
        if user.must_change_password && !allowed_before_password_change(parts) {
            return Err(AppError::PasswordChangeRequired);
        }
        Ok(CurrentUser(user))
    }
}

/// What someone still holding an initial (or generated) password may do: see who they are,
/// change it, sign out. Everything else waits for the change, so an initial password that
/// travelled by SMS or on paper is good for nothing but that.
fn allowed_before_password_change(parts: &Parts) -> bool {
    let path = parts.uri.path();
    matches!(
        (&parts.method, path),
        (&Method::GET, "/api/v1/me")
            | (&Method::PUT, "/api/v1/me/password")
            | (&Method::DELETE, "/api/v1/session")
            | (&Method::GET | &Method::POST, "/account/password")
            | (&Method::POST, "/logout")
    )
}

/// The same, but absent instead of an error (for pages that redirect).
pub struct MaybeUser(pub Option<User>);

/// Pages: someone who must still change the initial password is sent to do so.
impl FromRequestParts<AppState> for MaybeUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let Some(token) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Ok(MaybeUser(None));
        };
        let user = session_user(&state.db, token)
            .await
            .map_err(IntoResponse::into_response)?;
        match user {
            Some(u) if u.must_change_password && !allowed_before_password_change(parts) => {
                Err(Redirect::to("/account/password").into_response())
            }
            user => Ok(MaybeUser(user)),
        }
    }
}

/// Slows password guessing: after [`Throttle::FREE_FAILURES`] failures for one username or one
/// address, each attempt must wait, doubling up to 15 minutes.
#[derive(Default)]
pub struct Throttle {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl Throttle {
    pub const FREE_FAILURES: u32 = 5;
    const MAX_WAIT: Duration = Duration::from_secs(15 * 60);

    fn keys(username: &str, ip: Option<IpAddr>) -> [String; 2] {
        [
            format!("u:{}", username.to_lowercase()),
            ip.map(|i| format!("ip:{i}")).unwrap_or_default(),
        ]
    }

    fn wait_for(count: u32) -> Duration {
        if count < Self::FREE_FAILURES {
            return Duration::ZERO;
        }
        let doublings = (count - Self::FREE_FAILURES).min(10);
        (Duration::from_secs(30) * 2u32.pow(doublings)).min(Self::MAX_WAIT)
    }

    /// Seconds still to wait before another attempt is heard, if any.
    pub fn check(&self, username: &str, ip: Option<IpAddr>, now: Instant) -> Option<u64> {
        let map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        Self::keys(username, ip)
            .iter()
            .filter_map(|k| map.get(k))
            .filter_map(|(count, last)| {
                let until = *last + Self::wait_for(*count);
                (until > now).then(|| (until - now).as_secs().max(1))
            })
            .max()
    }

    pub fn fail(&self, username: &str, ip: Option<IpAddr>, now: Instant) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        // Forget failures older than the longest wait so the map cannot grow without bound.
        map.retain(|_, (_, last)| now.duration_since(*last) < Self::MAX_WAIT * 2);
        for k in Self::keys(username, ip) {
            if !k.is_empty() {
                let e = map.entry(k).or_insert((0, now));
                e.0 += 1;
                e.1 = now;
            }
        }
    }

    pub fn succeed(&self, username: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&format!("u:{}", username.to_lowercase()));
    }
}

/// Signs a user in, or says why not. Shared by the JSON API and the sign-in form.
pub async fn sign_in(
    state: &AppState,
    username: &str,
    password: &str,
    ip: Option<IpAddr>,
) -> Result<(User, String), AppError> {
    let now = Instant::now();
    if let Some(wait) = state.throttle.check(username, ip, now) {
        state.metrics.login_throttled.inc();
        return Err(AppError::TooManyRequests(wait));
    }
    let row = find_user_by_name(&state.db, username).await?;
    // Verify against a fixed hash when the user is unknown, so timing does not reveal names.
    let (hash, row) = match row {
        Some(r) if r.disabled == 0 => (r.password_hash.clone(), Some(r)),
        _ => (state.dummy_hash.clone(), None),
    };
    let ok = verify_password(password.to_string(), hash).await;
    match row {
        Some(r) if ok => {
            state.throttle.succeed(username);
            let user = r.into_user()?;
            let token = start_session(&state.db, &user.id).await?;
            audit(&state.db, Some(&user.id), "sign_in", &user.username, "").await?;
            Ok((user, token))
        }
        _ => {
            state.throttle.fail(username, ip, now);
            state.metrics.login_failures.inc();
            tracing::info!(username, "failed sign-in");
            Err(AppError::Unauthorized(
                "用户名或密码错误 (wrong username or password)".into(),
            ))
        }
    }
}

pub async fn audit(
    db: &Db,
    actor: Option<&str>,
    action: &str,
    target: &str,
    detail: &str,
) -> Result<(), AppError> {
    sqlx::query("INSERT INTO audit_log (id, at, actor_id, action, target, detail) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(new_id())
        .bind(now_ms())
        .bind(actor.map(str::to_string))
        .bind(action)
        .bind(target)
        .bind(detail)
        .execute(&db.pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_waits_after_free_failures_and_doubles() {
        let t = Throttle::default();
        let now = Instant::now();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..Throttle::FREE_FAILURES - 1 {
            t.fail("Admin", Some(ip), now);
        }
        assert_eq!(t.check("admin", None, now), None);
        t.fail("admin", Some(ip), now);
        assert_eq!(t.check("admin", None, now), Some(30));
        // The address is throttled too, whatever name it tries next.
        assert_eq!(t.check("someone", Some(ip), now), Some(30));
        t.fail("admin", None, now);
        assert_eq!(t.check("admin", None, now), Some(60));
        assert_eq!(t.check("admin", None, now + Duration::from_secs(61)), None);
    }

    #[test]
    fn roles_grant_what_the_spec_says() {
        assert!(Role::SystemAdmin.allows(Permission::ManageUsers));
        assert!(!Role::OrgAdmin.allows(Permission::ManageUsers));
        assert!(Role::Secretary.allows(Permission::HostRooms));
        assert!(!Role::Member.allows(Permission::HostRooms));
        assert!(Role::Member.allows(Permission::JoinRooms));
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
    }

    #[test]
    fn cookie_parsing_finds_the_named_cookie() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=1; dj_csrf=xyz; b=2".parse().unwrap());
        assert_eq!(cookie(&h, CSRF_COOKIE), Some("xyz"));
        assert!(csrf_ok(&h, "xyz"));
        assert!(!csrf_ok(&h, "xy"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
