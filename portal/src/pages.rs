//! Server-rendered pages (zh-CN), embedded in the binary: sign-in, home, password, 404.

use axum::Router;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use minijinja::{Environment, context};
use serde::Deserialize;

use crate::AppState;
use crate::api::ClientIp;
use crate::auth::{self, CurrentUser, MaybeUser, User};
use crate::error::AppError;

const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("../../web/templates/base.html")),
    ("login.html", include_str!("../../web/templates/login.html")),
    ("home.html", include_str!("../../web/templates/home.html")),
    (
        "password.html",
        include_str!("../../web/templates/password.html"),
    ),
    (
        "not_found.html",
        include_str!("../../web/templates/not_found.html"),
    ),
    ("room.html", include_str!("../../web/templates/room.html")),
    ("rooms.html", include_str!("../../web/templates/rooms.html")),
    ("orgs.html", include_str!("../../web/templates/orgs.html")),
    (
        "recordings.html",
        include_str!("../../web/templates/recordings.html"),
    ),
    (
        "recording.html",
        include_str!("../../web/templates/recording.html"),
    ),
    (
        "members.html",
        include_str!("../../web/templates/members.html"),
    ),
    (
        "member.html",
        include_str!("../../web/templates/member.html"),
    ),
    (
        "member_form.html",
        include_str!("../../web/templates/member_form.html"),
    ),
    (
        "orglife.html",
        include_str!("../../web/templates/orglife.html"),
    ),
    (
        "guidance.html",
        include_str!("../../web/templates/guidance.html"),
    ),
    ("stats.html", include_str!("../../web/templates/stats.html")),
    (
        "transfers.html",
        include_str!("../../web/templates/transfers.html"),
    ),
    ("dues.html", include_str!("../../web/templates/dues.html")),
];

const APP_CSS: &str = include_str!("../../web/static/app.css");

pub fn templates() -> anyhow::Result<Environment<'static>> {
    let mut env = Environment::new();
    for (name, src) in TEMPLATES {
        env.add_template(name, src)?;
    }
    Ok(env)
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(home))
        .route("/login", get(login_page).post(login_submit))
        .route("/logout", post(logout))
        .route(
            "/account/password",
            get(password_page).post(password_submit),
        )
        .route("/static/app.css", get(css))
}

/// A rendered page plus the CSRF cookie when the browser has none yet.
struct Page {
    status: StatusCode,
    html: String,
    set_cookies: Vec<String>,
}

impl IntoResponse for Page {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Html(self.html)).into_response();
        for c in self.set_cookies {
            if let Ok(v) = c.parse() {
                resp.headers_mut().append(header::SET_COOKIE, v);
            }
        }
        resp.headers_mut().insert(
            header::CACHE_CONTROL,
            "no-store".parse().expect("static header value"),
        );
        resp
    }
}

/// The form token for this browser: its existing CSRF cookie, or a new one to set.
fn csrf(headers: &HeaderMap) -> (String, Option<String>) {
    match auth::cookie(headers, auth::CSRF_COOKIE) {
        Some(c) if c.len() == 64 => (c.to_string(), None),
        _ => {
            let t = auth::random_token();
            let cookie = format!(
                "{}={t}; Path=/; HttpOnly; SameSite=Strict",
                auth::CSRF_COOKIE
            );
            (t, Some(cookie))
        }
    }
}

/// A page with the CSRF cookie handled, for other modules.
pub fn render_page(
    state: &AppState,
    headers: &HeaderMap,
    name: &str,
    ctx: minijinja::Value,
) -> Result<impl IntoResponse, AppError> {
    render(state, headers, name, StatusCode::OK, ctx)
}

fn render(
    state: &AppState,
    headers: &HeaderMap,
    name: &str,
    status: StatusCode,
    ctx: minijinja::Value,
) -> Result<Page, AppError> {
    let (token, new_cookie) = csrf(headers);
    let tmpl = state
        .templates
        .get_template(name)
        .map_err(|e| anyhow::anyhow!(e))?;
    let html = tmpl
        .render(context! { csrf => token, ..ctx })
        .map_err(|e| anyhow::anyhow!("rendering {name}: {e}"))?;
    Ok(Page {
        status,
        html,
        set_cookies: new_cookie.into_iter().collect(),
    })
}

/// One entry of the home navigation; modules switch `ready` on as they land.
#[derive(serde::Serialize)]
struct NavItem {
    title: &'static str,
    desc: &'static str,
    href: &'static str,
    ready: bool,
}

fn nav_for(user: &User) -> Vec<NavItem> {
    let mut items = vec![
        NavItem {
            title: "会议直播",
            desc: "视频会议、远程课堂",
            href: "/rooms",
            ready: true,
        },
        NavItem {
            title: "录像回放",
            desc: "党校课堂点播",
            href: "/recordings",
            ready: true,
        },
        NavItem {
            title: "组织管理",
            desc: "组织、党员、党费、组织生活",
            href: "/orgs",
            ready: true,
        },
        NavItem {
            title: "机关办公",
            desc: "会议通知、短信调研、公文阅览",
            href: "/office",
            ready: false,
        },
        NavItem {
            title: "党建学习",
            desc: "学习栏目与心得",
            href: "/learning",
            ready: false,
        },
        NavItem {
            title: "政务手机报",
            desc: "编辑、审核、发送",
            href: "/newspaper",
            ready: false,
        },
    ];
    if user.role.allows(auth::Permission::ManageUsers) {
        items.push(NavItem {
            title: "系统管理",
            desc: "用户、角色、参数、日志",
            href: "/admin",
            ready: false,
        });
    }
    items.push(NavItem {
        title: "修改密码",
        desc: "账户安全",
        href: "/account/password",
        ready: true,
    });
    items
}

async fn home(
    State(state): State<AppState>,
    headers: HeaderMap,
    MaybeUser(user): MaybeUser,
) -> Result<Response, AppError> {
    let Some(user) = user else {
        return Ok(Redirect::to("/login").into_response());
    };
    if user.must_change_password {
        return Ok(Redirect::to("/account/password").into_response());
    }
    let ctx = context! { user => user, role_label => user.role.label(), nav => nav_for(&user) };
    Ok(render(&state, &headers, "home.html", StatusCode::OK, ctx)?.into_response())
}

#[derive(Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

async fn login_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> Result<Page, AppError> {
    render(
        &state,
        &headers,
        "login.html",
        StatusCode::OK,
        context! { next => q.next },
    )
}

#[derive(Deserialize)]
struct LoginForm {
    username: String,
    password: String,
    csrf: String,
    next: Option<String>,
}

/// Only same-site paths, so the sign-in form cannot be used to bounce users elsewhere.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n,
        _ => "/",
    }
}

async fn login_submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    ClientIp(ip): ClientIp,
    Form(form): Form<LoginForm>,
) -> Result<Response, AppError> {
    if !auth::csrf_ok(&headers, &form.csrf) {
        let ctx = context! { error => "页面已过期，请重新登录。(form expired)", username => form.username };
        return Ok(
            render(&state, &headers, "login.html", StatusCode::FORBIDDEN, ctx)?.into_response(),
        );
    }
    match auth::sign_in(&state, form.username.trim(), &form.password, ip).await {
        Ok((user, token)) => {
            let to = if user.must_change_password {
                "/account/password"
            } else {
                safe_next(form.next.as_deref())
            };
            Ok((
                [(
                    header::SET_COOKIE,
                    auth::session_cookie(&token, state.secure_cookies),
                )],
                Redirect::to(to),
            )
                .into_response())
        }
        Err(e @ (AppError::Unauthorized(_) | AppError::TooManyRequests(_))) => {
            let message = match &e {
                AppError::TooManyRequests(s) => format!("尝试次数过多，请 {s} 秒后再试。"),
                _ => "用户名或密码错误。".to_string(),
            };
            let ctx = context! { error => message, username => form.username, next => form.next };
            Ok(render(&state, &headers, "login.html", e.status(), ctx)?.into_response())
        }
        Err(e) => Err(e),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, AppError> {
    if !auth::csrf_ok(&headers, &form.csrf) {
        return Err(AppError::Forbidden("form expired".into()));
    }
    if let Some(token) = auth::cookie(&headers, auth::SESSION_COOKIE) {
        auth::end_session(&state.db, token).await?;
    }
    Ok((
        [(header::SET_COOKIE, auth::clear_session_cookie())],
        Redirect::to("/login"),
    )
        .into_response())
}

async fn password_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    MaybeUser(user): MaybeUser,
) -> Result<Response, AppError> {
    let Some(user) = user else {
        return Ok(Redirect::to("/login?next=/account/password").into_response());
    };
    let ctx = context! { user => user };
    Ok(render(&state, &headers, "password.html", StatusCode::OK, ctx)?.into_response())
}

#[derive(Deserialize)]
struct PasswordForm {
    csrf: String,
    current_password: String,
    new_password: String,
    confirm_password: String,
}

async fn password_submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    user: CurrentUser,
    Form(form): Form<PasswordForm>,
) -> Result<Response, AppError> {
    let result = if !auth::csrf_ok(&headers, &form.csrf) {
        Err(AppError::Forbidden("页面已过期，请刷新后重试。".into()))
    } else if form.new_password != form.confirm_password {
        Err(AppError::BadRequest("两次输入的新密码不一致。".into()))
    } else {
        crate::api::change_own_password(&state, &user.0, &form.current_password, &form.new_password)
            .await
    };
    match result {
        Ok(()) => Ok(Redirect::to("/").into_response()),
        Err(AppError::Internal(e)) => Err(AppError::Internal(e)),
        Err(e) => {
            let ctx = context! { user => user.0, error => e.to_string() };
            Ok(render(&state, &headers, "password.html", e.status(), ctx)?.into_response())
        }
    }
}

async fn css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        APP_CSS,
    )
}

/// 404: JSON under `/api`, a page elsewhere.
pub async fn not_found(State(state): State<AppState>, uri: Uri, headers: HeaderMap) -> Response {
    if uri.path().starts_with("/api/") {
        return AppError::NotFound.into_response();
    }
    match render(
        &state,
        &headers,
        "not_found.html",
        StatusCode::NOT_FOUND,
        context! { path => uri.path() },
    ) {
        Ok(p) => p.into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_is_kept_on_this_site() {
        assert_eq!(safe_next(Some("/account/password")), "/account/password");
        assert_eq!(safe_next(Some("//evil.example")), "/");
        assert_eq!(safe_next(Some("https://evil.example")), "/");
        assert_eq!(safe_next(Some("/\\evil")), "/");
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn every_template_parses() {
        templates().unwrap();
    }
}
