//! Member records (党员信息): the REST API, the pages, and the one set of rules every way in
//! shares — [`validate`], which the spreadsheet import calls row by row.
//!
//! Scoping works as for the org tree ([`crate::orgs::Scope`]): every query of a member joins its
//! org and keeps only paths in the caller's subtree, so a guessed id from elsewhere is simply not
//! found (404). Anyone in scope may read; only [`Permission::ManageMembers`] (system admins, org
//! admins, secretaries) changes records and sees ID numbers and phones in full — everyone else
//! sees them masked, in lists and in detail alike. Every view of a single record and every change
//! goes to the audit log.

use std::collections::HashMap;

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
use crate::db::{Backend, Db, new_id, now_ms};
use crate::error::{ApiJson, AppError, ErrorBody};
use crate::idcard;
use crate::orgs::{Scope, like_escape};

/// Rows per page on `/members`.
const PAGE_SIZE: usize = 50;
/// Longest name, in characters.
pub const MAX_NAME_CHARS: usize = 50;
/// Longest value of the other free-text fields, in characters.
pub const MAX_TEXT_CHARS: usize = 100;
/// Longest honour note, in characters.
pub const MAX_NOTE_CHARS: usize = 2000;
/// Pages show dates and judge "the future" in Beijing time.
const UTC_OFFSET_SECS: i32 = 8 * 3600;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/members", get(list).post(create))
        .route(
            "/api/v1/members/{id}",
            get(get_one).patch(update).delete(remove),
        )
        .route(
            "/api/v1/members/{id}/honours",
            get(list_honours).post(add_honour),
        )
        .route("/members", get(list_page))
        .route("/members/new", get(new_page).post(new_submit))
        .route("/members/{id}", get(detail_page))
        .route("/members/{id}/edit", get(edit_page).post(edit_submit))
        .route("/members/{id}/honours", post(honour_submit))
        .route("/members/{id}/delete", post(delete_submit))
}

#[derive(OpenApi)]
#[openapi(
    paths(list, create, get_one, update, remove, list_honours, add_honour),
    components(schemas(
        Member,
        MemberList,
        MemberInput,
        MemberPatch,
        Honour,
        NewHonour,
        FieldError,
        InvalidBody,
        Gender,
        Category,
        Status,
        Cadre,
        HonourKind,
        ErrorBody
    ))
)]
pub struct MembersApi;

// ---------------------------------------------------------------------------------------------
// Codes and their Chinese names
// ---------------------------------------------------------------------------------------------

macro_rules! code_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = $code:literal / $label:literal $(| $alt:literal)*),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $var),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$var),+];

            /// The code stored in the database and used by the API.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$var => $code),+ }
            }

            /// The Chinese name, as on pages and in spreadsheets.
            pub fn label(self) -> &'static str {
                match self { $($name::$var => $label),+ }
            }

            /// The code, the Chinese name, or a common short form of it.
            pub fn parse(s: &str) -> Option<$name> {
                match s.trim() {
                    $($code | $label $(| $alt)* => Some($name::$var),)+
                    _ => None,
                }
            }
        }
    };
}

code_enum!(
    /// 性别
    Gender {
        Male = "male" / "男",
        Female = "female" / "女",
    }
);

code_enum!(
    /// 党员类别
    Category {
        /// 正式党员
        Full = "full" / "正式党员" | "正式",
        /// 预备党员
        Probationary = "probationary" / "预备党员" | "预备",
    }
);

code_enum!(
    /// 党籍状态
    Status {
        Normal = "normal" / "正常",
        TransferredOut = "transferred_out" / "已转出" | "转出",
        Deceased = "deceased" / "已故" | "死亡",
        Left = "left" / "出党",
        LostContact = "lost_contact" / "失联",
    }
);

code_enum!(
    /// 干部类别
    Cadre {
        #[serde(rename = "none")]
        NonCadre = "none" / "非干部" | "否" | "无",
        FullTime = "full_time" / "专职" | "专职干部",
        PartTime = "part_time" / "兼职" | "兼职干部",
    }
);

code_enum!(
    /// 奖惩类别
    HonourKind {
        Reward = "reward" / "奖励",
        Penalty = "penalty" / "处分" | "惩处",
    }
);

/// The spreadsheet columns, in order (import and export).
pub const FIELDS: [&str; 18] = [
    "姓名",
    "性别",
    "身份证号",
    "出生日期",
    "民族",
    "学历",
    "籍贯",
    "手机号",
    "工作单位",
    "单位性质",
    "所在地区",
    "入党时间",
    "党员类别(正式/预备)",
    "转正时间",
    "党籍状态",
    "干部类别",
    "干部职务",
    "所属组织",
];

/// The field (schema column) behind each of [`FIELDS`], same order; [`FieldError::field`] is one
/// of these.
pub const FIELD_NAMES: [&str; 18] = [
    "name",
    "gender",
    "id_number",
    "birth_date",
    "ethnicity",
    "education",
    "native_place",
    "phone",
    "employer",
    "employer_type",
    "area",
    "joined_on",
    "category",
    "full_member_on",
    "status",
    "cadre",
    "cadre_position",
    "org_id",
];

/// The Chinese column title of a field (`"id_number"` → `"身份证号"`).
pub fn field_title(field: &str) -> &'static str {
    FIELD_NAMES
        .iter()
        .position(|f| *f == field)
        .map_or("", |i| FIELDS[i])
}

// ---------------------------------------------------------------------------------------------
// Validation (pure)
// ---------------------------------------------------------------------------------------------

/// A member record as entered: every field optional text, so that a form, a JSON body and a
/// spreadsheet row arrive the same way. Enumerations take the code or the Chinese name
/// (`"male"` or `"男"`, `"probationary"` or `"预备党员"`…).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct MemberInput {
    pub name: Option<String>,
    /// `male` | `female`; taken from the ID number when omitted.
    pub gender: Option<String>,
    /// 18 characters, GB 11643.
    pub id_number: Option<String>,
    /// `YYYY-MM-DD`; taken from the ID number when omitted.
    pub birth_date: Option<String>,
    pub ethnicity: Option<String>,
    pub education: Option<String>,
    pub native_place: Option<String>,
    /// Mainland mobile number; optional.
    pub phone: Option<String>,
    pub employer: Option<String>,
    pub employer_type: Option<String>,
    pub area: Option<String>,
    /// 入党时间, `YYYY-MM-DD`.
    pub joined_on: Option<String>,
    /// `full` | `probationary`.
    pub category: Option<String>,
    /// 转正时间, `YYYY-MM-DD`; full members only.
    pub full_member_on: Option<String>,
    /// `normal` (default) | `transferred_out` | `deceased` | `left` | `lost_contact`.
    pub status: Option<String>,
    /// `none` (default) | `full_time` | `part_time`.
    pub cadre: Option<String>,
    pub cadre_position: Option<String>,
    /// The member's org (must be in the caller's scope).
    pub org_id: Option<String>,
}

impl MemberInput {
    /// A spreadsheet row in [`FIELDS`] order (missing cells are empty). The last cell (所属组织)
    /// lands in `org_id` as written: the importer resolves an org name or code to its id first.
    pub fn from_row<S: AsRef<str>>(cells: &[S]) -> MemberInput {
        let cell = |i: usize| cells.get(i).map(|c| c.as_ref().to_string());
        let mut input = MemberInput::default();
        for (i, f) in FIELD_NAMES.iter().enumerate() {
            *input.slot(f).expect("every field has a slot") = cell(i);
        }
        input
    }

    /// The input field called `field`.
    fn slot(&mut self, field: &str) -> Option<&mut Option<String>> {
        Some(match field {
            "name" => &mut self.name,
            "gender" => &mut self.gender,
            "id_number" => &mut self.id_number,
            "birth_date" => &mut self.birth_date,
            "ethnicity" => &mut self.ethnicity,
            "education" => &mut self.education,
            "native_place" => &mut self.native_place,
            "phone" => &mut self.phone,
            "employer" => &mut self.employer,
            "employer_type" => &mut self.employer_type,
            "area" => &mut self.area,
            "joined_on" => &mut self.joined_on,
            "category" => &mut self.category,
            "full_member_on" => &mut self.full_member_on,
            "status" => &mut self.status,
            "cadre" => &mut self.cadre,
            "cadre_position" => &mut self.cadre_position,
            "org_id" => &mut self.org_id,
            _ => return None,
        })
    }
}

/// One broken rule: which field (a schema column name, see [`FIELD_NAMES`]) and why, in Chinese
/// then English.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

/// A record that passed [`validate`]: trimmed, normalised (ID number upper-case, phone as 11
/// digits), enumerations as codes, birth date and gender filled in from the ID number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidMember {
    pub name: String,
    pub gender: Gender,
    pub id_number: String,
    pub birth_date: String,
    pub ethnicity: String,
    pub education: String,
    pub native_place: String,
    /// Empty when unknown.
    pub phone: String,
    pub employer: String,
    pub employer_type: String,
    pub area: String,
    pub joined_on: String,
    pub category: Category,
    pub full_member_on: Option<String>,
    pub status: Status,
    pub cadre: Cadre,
    pub cadre_position: String,
    pub org_id: String,
}

impl ValidMember {
    /// The fields whose values differ, in [`FIELD_NAMES`] order.
    pub fn changed_fields(&self, other: &ValidMember) -> Vec<&'static str> {
        let (mut a, mut b) = (self.to_input(), other.to_input());
        FIELD_NAMES
            .iter()
            .copied()
            .filter(|f| a.slot(f).cloned() != b.slot(f).cloned())
            .collect()
    }

    /// Back to input form (codes for enumerations).
    pub fn to_input(&self) -> MemberInput {
        MemberInput {
            name: Some(self.name.clone()),
            gender: Some(self.gender.as_str().into()),
            id_number: Some(self.id_number.clone()),
            birth_date: Some(self.birth_date.clone()),
            ethnicity: Some(self.ethnicity.clone()),
            education: Some(self.education.clone()),
            native_place: Some(self.native_place.clone()),
            phone: Some(self.phone.clone()),
            employer: Some(self.employer.clone()),
            employer_type: Some(self.employer_type.clone()),
            area: Some(self.area.clone()),
            joined_on: Some(self.joined_on.clone()),
            category: Some(self.category.as_str().into()),
            full_member_on: self.full_member_on.clone(),
            status: Some(self.status.as_str().into()),
            cadre: Some(self.cadre.as_str().into()),
            cadre_position: Some(self.cadre_position.clone()),
            org_id: Some(self.org_id.clone()),
        }
    }
}

/// Today's date (`YYYY-MM-DD`, Beijing time).
pub fn today() -> String {
    let offset = chrono::FixedOffset::east_opt(UTC_OFFSET_SECS).expect("valid offset");
    chrono::DateTime::from_timestamp_millis(now_ms())
        .unwrap_or_default()
        .with_timezone(&offset)
        .format("%Y-%m-%d")
        .to_string()
}

/// Checks a member record against every rule that needs no database, and returns it cleaned, or
/// every broken rule (one [`FieldError`] per field at most, in field order):
///
/// - `name` required, at most [`MAX_NAME_CHARS`] characters; other text at most
///   [`MAX_TEXT_CHARS`];
/// - `id_number` required and valid ([`idcard::parse`]); `birth_date` and `gender` must agree
///   with it, and are taken from it when omitted;
/// - `phone` optional, but a valid mainland mobile number when given;
/// - dates are real `YYYY-MM-DD` dates and not in the future (Beijing time);
/// - `joined_on` required, on or after the 18th birthday;
/// - `category` required; probationary members have no `full_member_on`, which otherwise is on or
///   after `joined_on`;
/// - `status` and `cadre` default to `normal` and `none`;
/// - `org_id` required (whether it exists and is in the caller's scope is the caller's check).
///
/// It is pure: no database, and "today" is the only outside input (see [`validate_on`]).
pub fn validate(input: &MemberInput) -> Result<ValidMember, Vec<FieldError>> {
    validate_on(input, &today())
}

/// [`validate`] with "today" given (`YYYY-MM-DD`).
pub fn validate_on(input: &MemberInput, today: &str) -> Result<ValidMember, Vec<FieldError>> {
    let mut e = Errors::default();
    let name = e.text("name", &input.name, MAX_NAME_CHARS, true);
    let ethnicity = e.text("ethnicity", &input.ethnicity, MAX_TEXT_CHARS, false);
    let education = e.text("education", &input.education, MAX_TEXT_CHARS, false);
    let native_place = e.text("native_place", &input.native_place, MAX_TEXT_CHARS, false);
    let employer = e.text("employer", &input.employer, MAX_TEXT_CHARS, false);
    let employer_type = e.text("employer_type", &input.employer_type, MAX_TEXT_CHARS, false);
    let area = e.text("area", &input.area, MAX_TEXT_CHARS, false);
    let cadre_position = e.text(
        "cadre_position",
        &input.cadre_position,
        MAX_TEXT_CHARS,
        false,
    );
    let org_id = e.text("org_id", &input.org_id, MAX_TEXT_CHARS, true);

    // The ID number, and what it says.
    let id_number = idcard::normalise(input.id_number.as_deref().unwrap_or(""));
    let info = if id_number.is_empty() {
        e.add("id_number", "请填写身份证号 (id_number is required)".into());
        None
    } else {
        match idcard::parse(&id_number) {
            Ok(info) if info.birth_date.as_str() > today => {
                e.add(
                    "id_number",
                    "身份证号中的出生日期晚于今天 (birth date in the future)".into(),
                );
                None
            }
            Ok(info) => Some(info),
            Err(m) => {
                e.add("id_number", m);
                None
            }
        }
    };

    let birth_given = e.date("birth_date", &input.birth_date, today);
    let joined_on = e.date("joined_on", &input.joined_on, today);
    let full_member_on = e.date("full_member_on", &input.full_member_on, today);

    let birth_date = match (&birth_given, &info) {
        (Some(b), Some(i)) if *b != i.birth_date => {
            e.add(
                "birth_date",
                format!(
                    "出生日期与身份证号不符，身份证号中为 {} (birth_date does not match the ID number)",
                    i.birth_date
                ),
            );
            None
        }
        (Some(b), _) => Some(b.clone()),
        (None, Some(i)) => Some(i.birth_date.clone()),
        (None, None) => None,
    };

    let gender_given = match trimmed(&input.gender) {
        g if g.is_empty() => None,
        g => Gender::parse(&g).or_else(|| {
            e.add(
                "gender",
                "性别须为 男 或 女 (gender must be male or female)".into(),
            );
            None
        }),
    };
    let from_id = info.as_ref().and_then(|i| Gender::parse(i.gender));
    let gender = match (gender_given, from_id) {
        (Some(g), Some(f)) if g != f => {
            e.add(
                "gender",
                format!(
                    "性别与身份证号不符，身份证号为{} (gender does not match the ID number)",
                    f.label()
                ),
            );
            None
        }
        (Some(g), _) => Some(g),
        (None, f) => f,
    };

    let phone = match trimmed(&input.phone) {
        p if p.is_empty() => String::new(),
        p => idcard::normalise_phone(&p).unwrap_or_else(|m| {
            e.add("phone", m);
            String::new()
        }),
    };

    match (&joined_on, &birth_date) {
        (Some(j), Some(b)) => {
            // String order is date order; born on 29 February, one turns 18 on 1 March.
            let year: u32 = b[..4].parse().unwrap_or(0);
            let eighteenth = format!("{:04}{}", year + 18, &b[4..]);
            if *j < eighteenth {
                e.add(
                    "joined_on",
                    format!(
                        "入党时须年满 18 周岁（{eighteenth} 起） (joined_on must be on or after the 18th birthday)"
                    ),
                );
            }
        }
        (None, _) if trimmed(&input.joined_on).is_empty() => {
            e.add("joined_on", "请填写入党时间 (joined_on is required)".into());
        }
        _ => {}
    }

    let category = match trimmed(&input.category) {
        c if c.is_empty() => {
            e.add(
                "category",
                "请选择党员类别 (category is required: full or probationary)".into(),
            );
            None
        }
        c => Category::parse(&c).or_else(|| {
            e.add(
                "category",
                "党员类别须为 正式党员 或 预备党员 (category must be full or probationary)".into(),
            );
            None
        }),
    };
    match (category, &full_member_on) {
        (Some(Category::Probationary), Some(_)) => e.add(
            "full_member_on",
            "预备党员没有转正时间 (probationary members have no full_member_on)".into(),
        ),
        (_, Some(f)) if joined_on.as_ref().is_some_and(|j| f < j) => e.add(
            "full_member_on",
            "转正时间不能早于入党时间 (full_member_on is before joined_on)".into(),
        ),
        _ => {}
    }
    let status = match trimmed(&input.status) {
        s if s.is_empty() => Some(Status::Normal),
        s => Status::parse(&s).or_else(|| {
            e.add(
                "status",
                "党籍状态须为 正常、已转出、已故、出党 或 失联 (unknown status)".into(),
            );
            None
        }),
    };
    let cadre = match trimmed(&input.cadre) {
        c if c.is_empty() => Some(Cadre::NonCadre),
        c => Cadre::parse(&c).or_else(|| {
            e.add(
                "cadre",
                "干部类别须为 非干部、专职 或 兼职 (cadre must be none, full_time or part_time)"
                    .into(),
            );
            None
        }),
    };

    let mut errors = e.0;
    if !errors.is_empty() {
        errors.sort_by_key(|e| FIELD_NAMES.iter().position(|f| *f == e.field));
        return Err(errors);
    }
    match (gender, birth_date, joined_on, category, status, cadre) {
        (
            Some(gender),
            Some(birth_date),
            Some(joined_on),
            Some(category),
            Some(status),
            Some(cadre),
        ) => Ok(ValidMember {
            name,
            gender,
            id_number,
            birth_date,
            ethnicity,
            education,
            native_place,
            phone,
            employer,
            employer_type,
            area,
            joined_on,
            category,
            full_member_on,
            status,
            cadre,
            cadre_position,
            org_id,
        }),
        // Every None above came with an error.
        _ => Err(vec![FieldError {
            field: "id_number",
            message: "记录不完整 (incomplete record)".into(),
        }]),
    }
}

fn trimmed(v: &Option<String>) -> String {
    v.as_deref().map(str::trim).unwrap_or("").to_string()
}

/// Collects at most one error per field.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: &'static str, message: String) {
        if !self.0.iter().any(|e| e.field == field) {
            self.0.push(FieldError { field, message });
        }
    }

    fn text(
        &mut self,
        field: &'static str,
        v: &Option<String>,
        max: usize,
        required: bool,
    ) -> String {
        let s = trimmed(v);
        let title = field_title(field);
        if required && s.is_empty() {
            self.add(field, format!("请填写{title} ({field} is required)"));
        } else if s.chars().count() > max {
            self.add(
                field,
                format!("{title}最多 {max} 个字 ({field} is at most {max} characters)"),
            );
        }
        s
    }

    /// An optional date: `None` when empty or wrong (with an error).
    fn date(&mut self, field: &'static str, v: &Option<String>, today: &str) -> Option<String> {
        let s = trimmed(v);
        let title = field_title(field);
        if s.is_empty() {
            None
        } else if !idcard::valid_date(&s) {
            self.add(
                field,
                format!("{title}须为有效日期 YYYY-MM-DD ({field} must be a date YYYY-MM-DD)"),
            );
            None
        } else if s.as_str() > today {
            self.add(
                field,
                format!("{title}不能晚于今天 ({field} is in the future)"),
            );
            None
        } else {
            Some(s)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Records in the database
// ---------------------------------------------------------------------------------------------

/// A member record as the API returns it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Member {
    pub id: String,
    pub org_id: String,
    /// The org's name, for lists.
    pub org_name: String,
    pub name: String,
    pub gender: Gender,
    /// In full for [`Permission::ManageMembers`], else masked (`110105********002X`).
    pub id_number: String,
    pub birth_date: String,
    pub ethnicity: String,
    pub education: String,
    pub native_place: String,
    /// In full for [`Permission::ManageMembers`], else masked (`138****5678`); empty if unknown.
    pub phone: String,
    pub employer: String,
    pub employer_type: String,
    pub area: String,
    pub joined_on: String,
    pub category: Category,
    pub full_member_on: Option<String>,
    pub status: Status,
    pub cadre: Cadre,
    pub cadre_position: String,
    /// Whether `id_number` and `phone` are masked for this viewer.
    pub masked: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Member {
    fn mask(mut self) -> Member {
        self.id_number = idcard::mask_id(&self.id_number);
        self.phone = idcard::mask_phone(&self.phone);
        self.masked = true;
        self
    }

    /// Masked unless the viewer may manage members.
    fn for_viewer(self, viewer: &User) -> Member {
        if viewer.role.allows(Permission::ManageMembers) {
            self
        } else {
            self.mask()
        }
    }

    fn valid(&self) -> ValidMember {
        ValidMember {
            name: self.name.clone(),
            gender: self.gender,
            id_number: self.id_number.clone(),
            birth_date: self.birth_date.clone(),
            ethnicity: self.ethnicity.clone(),
            education: self.education.clone(),
            native_place: self.native_place.clone(),
            phone: self.phone.clone(),
            employer: self.employer.clone(),
            employer_type: self.employer_type.clone(),
            area: self.area.clone(),
            joined_on: self.joined_on.clone(),
            category: self.category,
            full_member_on: self.full_member_on.clone(),
            status: self.status,
            cadre: self.cadre,
            cadre_position: self.cadre_position.clone(),
            org_id: self.org_id.clone(),
        }
    }

    /// The record as a spreadsheet row in [`FIELDS`] order, with Chinese values and the org's
    /// name (for export).
    pub fn row(&self) -> [String; 18] {
        [
            self.name.clone(),
            self.gender.label().into(),
            self.id_number.clone(),
            self.birth_date.clone(),
            self.ethnicity.clone(),
            self.education.clone(),
            self.native_place.clone(),
            self.phone.clone(),
            self.employer.clone(),
            self.employer_type.clone(),
            self.area.clone(),
            self.joined_on.clone(),
            self.category.label().into(),
            self.full_member_on.clone().unwrap_or_default(),
            self.status.label().into(),
            self.cadre.label().into(),
            self.cadre_position.clone(),
            self.org_name.clone(),
        ]
    }
}

#[derive(sqlx::FromRow)]
struct MemberRow {
    id: String,
    org_id: String,
    org_name: String,
    name: String,
    gender: String,
    id_number: String,
    birth_date: String,
    ethnicity: String,
    education: String,
    native_place: String,
    phone: String,
    employer: String,
    employer_type: String,
    area: String,
    joined_on: String,
    category: String,
    full_member_on: Option<String>,
    status: String,
    cadre: String,
    cadre_position: String,
    created_at: i64,
    updated_at: i64,
}

impl MemberRow {
    fn into_member(self) -> Result<Member, AppError> {
        let bad =
            |what: &str, v: &str| anyhow::anyhow!("member {} has unknown {what} {v}", self.id);
        Ok(Member {
            gender: Gender::parse(&self.gender).ok_or_else(|| bad("gender", &self.gender))?,
            category: Category::parse(&self.category)
                .ok_or_else(|| bad("category", &self.category))?,
            status: Status::parse(&self.status).ok_or_else(|| bad("status", &self.status))?,
            cadre: Cadre::parse(&self.cadre).ok_or_else(|| bad("cadre", &self.cadre))?,
            id: self.id,
            org_id: self.org_id,
            org_name: self.org_name,
            name: self.name,
            id_number: self.id_number,
            birth_date: self.birth_date,
            ethnicity: self.ethnicity,
            education: self.education,
            native_place: self.native_place,
            phone: self.phone,
            employer: self.employer,
            employer_type: self.employer_type,
            area: self.area,
            joined_on: self.joined_on,
            full_member_on: self.full_member_on,
            cadre_position: self.cadre_position,
            masked: false,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

const COLUMNS: &str = "m.id, m.org_id, o.name AS org_name, m.name, m.gender, m.id_number, \
    m.birth_date, m.ethnicity, m.education, m.native_place, m.phone, m.employer, m.employer_type, \
    m.area, m.joined_on, m.category, m.full_member_on, m.status, m.cadre, m.cadre_position, \
    m.created_at, m.updated_at";

/// The member `id` if its org is in scope, else 404 (unmasked: mask before showing).
pub async fn load(db: &Db, scope: &Scope, id: &str) -> Result<Member, AppError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM members m JOIN orgs o ON o.id = m.org_id \
         WHERE m.id = $1 AND o.path LIKE $2 ESCAPE '\\'"
    );
    sqlx::query_as::<_, MemberRow>(&sql)
        .bind(id)
        .bind(scope.like())
        .fetch_optional(&db.pool)
        .await?
        .ok_or(AppError::NotFound)?
        .into_member()
}

/// What a list is narrowed to.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this org's subtree (it must be in scope).
    pub org: Option<String>,
    /// Part of the name, or of the ID number (the whole ID number for viewers who see it
    /// masked, so that searching cannot uncover the hidden digits).
    pub q: Option<String>,
    pub status: Option<Status>,
}

/// Members in scope matching `filter`, by org path then name, and how many match in all.
pub async fn search(
    db: &Db,
    scope: &Scope,
    viewer: &User,
    filter: &Filter,
    limit: usize,
    offset: usize,
) -> Result<(Vec<Member>, usize), AppError> {
    let pattern = match &filter.org {
        Some(org) => format!("{}%", like_escape(&scope.org(db, org).await?.path)),
        None => scope.like(),
    };
    let full_view = viewer.role.allows(Permission::ManageMembers);
    let mut conditions = vec!["o.path LIKE $1 ESCAPE '\\'".to_string()];
    let mut binds = vec![pattern];
    if db.backend == Backend::Sqlite {
        // Under SQLite's binary collation every path with the prefix sorts at or after it, so
        // this changes nothing but the plan: a range scan of the path index, in path order
        // (SQLite does not use an index for LIKE with ESCAPE, and would otherwise sort all).
        binds.push(like_prefix(&binds[0]));
        conditions.push("o.path >= $2".into());
    }
    if let Some(status) = filter.status {
        binds.push(status.as_str().into());
        conditions.push(format!("m.status = ${}", binds.len()));
    }
    if let Some(q) = filter.q.as_deref().map(str::trim).filter(|q| !q.is_empty()) {
        binds.push(format!("%{}%", like_escape(q)));
        let by_name = format!("m.name LIKE ${} ESCAPE '\\'", binds.len());
        let id = idcard::normalise(q);
        let by_id = if full_view {
            binds.push(format!("%{}%", like_escape(&id)));
            format!("m.id_number LIKE ${} ESCAPE '\\'", binds.len())
        } else {
            binds.push(id);
            format!("m.id_number = ${}", binds.len())
        };
        conditions.push(format!("({by_name} OR {by_id})"));
    }
    // Orgs first, in path order, then each org's members through `members_org`: the first page
    // is read without sorting the whole subtree. `CROSS JOIN` is SQLite's way of fixing that
    // join order (without statistics it would scan all members and sort them); PostgreSQL plans
    // it as the inner join it is.
    let from = format!(
        "FROM orgs o CROSS JOIN members m WHERE m.org_id = o.id AND {}",
        conditions.join(" AND ")
    );
    // LIMIT and OFFSET are numbers we parsed; inlining them keeps both drivers' planners happy.
    let sql = format!(
        "SELECT {COLUMNS} {from} ORDER BY o.path, m.name, m.id LIMIT {limit} OFFSET {offset}"
    );
    let page = async {
        let mut q = sqlx::query_as::<_, MemberRow>(&sql);
        for b in &binds {
            q = q.bind(b.clone());
        }
        q.fetch_all(&db.pool).await
    };
    // The count runs beside the page, on another connection.
    let count_sql = format!("SELECT COUNT(*) {from}");
    let count = async {
        let mut q = sqlx::query_as::<_, (i64,)>(&count_sql);
        for b in &binds {
            q = q.bind(b.clone());
        }
        q.fetch_one(&db.pool).await.map(|(n,)| n)
    };
    let (rows, total) = tokio::try_join!(page, count)?;
    let total = usize::try_from(total).unwrap_or(0);
    let items = rows
        .into_iter()
        .map(|r| r.into_member().map(|m| m.for_viewer(viewer)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((items, total))
}

/// The literal prefix a `LIKE … ESCAPE '\\'` pattern ending in `%` matches.
fn like_prefix(pattern: &str) -> String {
    let mut out = String::new();
    let mut chars = pattern.strip_suffix('%').unwrap_or(pattern).chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' {
            chars.next().unwrap_or(c)
        } else {
            c
        });
    }
    out
}

/// Why a change was refused: a rule of [`validate`] (422, naming fields) or anything else.
#[derive(Debug)]
pub enum MemberError {
    Invalid(Vec<FieldError>),
    App(AppError),
}

impl From<AppError> for MemberError {
    fn from(e: AppError) -> Self {
        MemberError::App(e)
    }
}

impl From<sqlx::Error> for MemberError {
    fn from(e: sqlx::Error) -> Self {
        MemberError::App(e.into())
    }
}

/// The 422 body: the usual error and message, plus each field's error.
#[derive(Serialize, utoipa::ToSchema)]
pub struct InvalidBody {
    /// `unprocessable`.
    pub error: &'static str,
    pub message: String,
    pub fields: Vec<FieldError>,
}

impl IntoResponse for MemberError {
    fn into_response(self) -> Response {
        match self {
            MemberError::App(e) => e.into_response(),
            MemberError::Invalid(fields) => {
                let message = fields
                    .iter()
                    .map(|f| format!("{}: {}", f.field, f.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                let body = InvalidBody {
                    error: "unprocessable",
                    message,
                    fields,
                };
                (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
            }
        }
    }
}

fn duplicate_id(e: sqlx::Error) -> MemberError {
    match e {
        sqlx::Error::Database(d) if d.is_unique_violation() => MemberError::App(
            AppError::Conflict("身份证号已登记 (a member with this ID number exists)".into()),
        ),
        e => e.into(),
    }
}

/// Adds a member to an org in scope (404 otherwise); 409 for an ID number already on record.
pub async fn create_member(
    db: &Db,
    scope: &Scope,
    actor: &User,
    input: &MemberInput,
) -> Result<Member, MemberError> {
    let v = validate(input).map_err(MemberError::Invalid)?;
    scope.org(db, &v.org_id).await?;
    let id = new_id();
    let now = now_ms();
    sqlx::query(
        "INSERT INTO members (id, org_id, name, gender, id_number, birth_date, ethnicity, \
         education, native_place, phone, employer, employer_type, area, joined_on, category, \
         full_member_on, status, cadre, cadre_position, created_at, updated_at) VALUES \
         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $20)",
    )
    .bind(&id)
    .bind(&v.org_id)
    .bind(&v.name)
    .bind(v.gender.as_str())
    .bind(&v.id_number)
    .bind(&v.birth_date)
    .bind(&v.ethnicity)
    .bind(&v.education)
    .bind(&v.native_place)
    .bind(&v.phone)
    .bind(&v.employer)
    .bind(&v.employer_type)
    .bind(&v.area)
    .bind(&v.joined_on)
    .bind(v.category.as_str())
    .bind(&v.full_member_on)
    .bind(v.status.as_str())
    .bind(v.cadre.as_str())
    .bind(&v.cadre_position)
    .bind(now)
    .execute(&db.pool)
    .await
    .map_err(duplicate_id)?;
    auth::audit(db, Some(&actor.id), "create_member", &id, &v.name).await?;
    Ok(load(db, scope, &id).await?)
}

/// Applies `patch` to the member `id` (in scope), checks the whole record again, and saves what
/// changed. A new org must be in scope too.
pub async fn update_member(
    db: &Db,
    scope: &Scope,
    actor: &User,
    id: &str,
    patch: &MemberPatch,
) -> Result<Member, MemberError> {
    let old = load(db, scope, id).await?;
    let before = old.valid();
    let v = validate(&patch.apply(before.to_input())).map_err(MemberError::Invalid)?;
    let changed = before.changed_fields(&v);
    if changed.is_empty() {
        return Ok(old);
    }
    if v.org_id != before.org_id {
        scope.org(db, &v.org_id).await?;
    }
    let done = sqlx::query(
        "UPDATE members SET org_id = $2, name = $3, gender = $4, id_number = $5, birth_date = $6, \
         ethnicity = $7, education = $8, native_place = $9, phone = $10, employer = $11, \
         employer_type = $12, area = $13, joined_on = $14, category = $15, full_member_on = $16, \
         status = $17, cadre = $18, cadre_position = $19, updated_at = $20 \
         WHERE id = $1 AND org_id IN (SELECT id FROM orgs WHERE path LIKE $21 ESCAPE '\\')",
    )
    .bind(&old.id)
    .bind(&v.org_id)
    .bind(&v.name)
    .bind(v.gender.as_str())
    .bind(&v.id_number)
    .bind(&v.birth_date)
    .bind(&v.ethnicity)
    .bind(&v.education)
    .bind(&v.native_place)
    .bind(&v.phone)
    .bind(&v.employer)
    .bind(&v.employer_type)
    .bind(&v.area)
    .bind(&v.joined_on)
    .bind(v.category.as_str())
    .bind(&v.full_member_on)
    .bind(v.status.as_str())
    .bind(v.cadre.as_str())
    .bind(&v.cadre_position)
    .bind(now_ms())
    .bind(scope.like())
    .execute(&db.pool)
    .await
    .map_err(duplicate_id)?;
    if done.rows_affected() == 0 {
        return Err(AppError::NotFound.into());
    }
    auth::audit(
        db,
        Some(&actor.id),
        "update_member",
        &old.id,
        &changed.join(","),
    )
    .await?;
    Ok(load(db, scope, &old.id).await?)
}

/// Deletes a record entered by mistake. A member with history (dues, transfers, meeting
/// attendance) is kept: change their status instead (409).
pub async fn delete_member(db: &Db, scope: &Scope, actor: &User, id: &str) -> Result<(), AppError> {
    let m = load(db, scope, id).await?;
    let (history,): (i64,) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM dues WHERE member_id = $1) \
         + (SELECT COUNT(*) FROM member_transfers WHERE member_id = $1) \
         + (SELECT COUNT(*) FROM org_meeting_attendance WHERE member_id = $1)",
    )
    .bind(&m.id)
    .fetch_one(&db.pool)
    .await?;
    if history > 0 {
        return Err(AppError::Conflict(
            "该党员已有党费、组织关系转接或组织生活记录，不能删除；请修改党籍状态 \
             (the member has history; change the status instead)"
                .into(),
        ));
    }
    sqlx::query("DELETE FROM members WHERE id = $1")
        .bind(&m.id)
        .execute(&db.pool)
        .await?;
    auth::audit(db, Some(&actor.id), "delete_member", &m.id, &m.name).await?;
    Ok(())
}

/// A reward or penalty in a member's history.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Honour {
    pub id: String,
    pub member_id: String,
    pub kind: HonourKind,
    pub title: String,
    /// `YYYY-MM-DD`.
    pub decided_on: String,
    pub note: String,
    pub created_at: i64,
}

#[derive(sqlx::FromRow)]
struct HonourRow {
    id: String,
    member_id: String,
    kind: String,
    title: String,
    decided_on: String,
    note: String,
    created_at: i64,
}

/// A member's rewards and penalties, oldest decision first.
pub async fn honours(db: &Db, member_id: &str) -> Result<Vec<Honour>, AppError> {
    let rows = sqlx::query_as::<_, HonourRow>(
        "SELECT id, member_id, kind, title, decided_on, note, created_at FROM member_honours \
         WHERE member_id = $1 ORDER BY decided_on, created_at, id",
    )
    .bind(member_id)
    .fetch_all(&db.pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(Honour {
                kind: HonourKind::parse(&r.kind).ok_or_else(|| {
                    anyhow::anyhow!("honour {} has unknown kind {}", r.id, r.kind)
                })?,
                id: r.id,
                member_id: r.member_id,
                title: r.title,
                decided_on: r.decided_on,
                note: r.note,
                created_at: r.created_at,
            })
        })
        .collect()
}

/// A new entry for the history of rewards and penalties.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct NewHonour {
    /// `reward` | `penalty` (or 奖励 | 处分).
    pub kind: Option<String>,
    pub title: Option<String>,
    /// `YYYY-MM-DD`, not in the future.
    pub decided_on: Option<String>,
    pub note: Option<String>,
}

/// Checks a new honour (pure, like [`validate`]).
pub fn validate_honour(
    h: &NewHonour,
    today: &str,
) -> Result<(HonourKind, String, String, String), Vec<FieldError>> {
    let mut e = Errors::default();
    let kind = HonourKind::parse(&trimmed(&h.kind));
    if kind.is_none() {
        e.add(
            "kind",
            "类别须为 奖励 或 处分 (kind must be reward or penalty)".into(),
        );
    }
    let title = trimmed(&h.title);
    if title.is_empty() || title.chars().count() > 200 {
        e.add(
            "title",
            "名称须为 1 至 200 个字 (title must be 1 to 200 characters)".into(),
        );
    }
    let decided_on = e.date("decided_on", &h.decided_on, today);
    if decided_on.is_none() && trimmed(&h.decided_on).is_empty() {
        e.add(
            "decided_on",
            "请填写决定日期 (decided_on is required)".into(),
        );
    }
    let note = trimmed(&h.note);
    if note.chars().count() > MAX_NOTE_CHARS {
        e.add(
            "note",
            format!("备注最多 {MAX_NOTE_CHARS} 个字 (note is too long)"),
        );
    }
    match (kind, decided_on) {
        (Some(k), Some(d)) if e.0.is_empty() => Ok((k, title, d, note)),
        _ => Err(e.0),
    }
}

/// Adds a reward or penalty to a member in scope.
pub async fn add_honour_to(
    db: &Db,
    scope: &Scope,
    actor: &User,
    member_id: &str,
    h: &NewHonour,
) -> Result<Honour, MemberError> {
    let m = load(db, scope, member_id).await?;
    let (kind, title, decided_on, note) =
        validate_honour(h, &today()).map_err(MemberError::Invalid)?;
    let honour = Honour {
        id: new_id(),
        member_id: m.id.clone(),
        kind,
        title,
        decided_on,
        note,
        created_at: now_ms(),
    };
    sqlx::query(
        "INSERT INTO member_honours (id, member_id, kind, title, decided_on, note, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&honour.id)
    .bind(&honour.member_id)
    .bind(honour.kind.as_str())
    .bind(&honour.title)
    .bind(&honour.decided_on)
    .bind(&honour.note)
    .bind(honour.created_at)
    .execute(&db.pool)
    .await?;
    let detail = format!(
        "{} {} {}",
        honour.kind.as_str(),
        honour.decided_on,
        honour.title
    );
    auth::audit(db, Some(&actor.id), "add_honour", &m.id, &detail).await?;
    Ok(honour)
}

// ---------------------------------------------------------------------------------------------
// REST
// ---------------------------------------------------------------------------------------------

/// Fields to change; absent fields keep their value. Changing `id_number` alone takes birth date
/// and gender from the new number. `full_member_on: null` (or `""`) clears it.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct MemberPatch {
    pub name: Option<String>,
    pub gender: Option<String>,
    pub id_number: Option<String>,
    pub birth_date: Option<String>,
    pub ethnicity: Option<String>,
    pub education: Option<String>,
    pub native_place: Option<String>,
    pub phone: Option<String>,
    pub employer: Option<String>,
    pub employer_type: Option<String>,
    pub area: Option<String>,
    pub joined_on: Option<String>,
    pub category: Option<String>,
    #[serde(deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub full_member_on: Option<Option<String>>,
    pub status: Option<String>,
    pub cadre: Option<String>,
    pub cadre_position: Option<String>,
    /// Move the member to another org in scope.
    pub org_id: Option<String>,
}

fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

impl MemberPatch {
    /// `old` with this patch applied.
    pub fn apply(&self, mut old: MemberInput) -> MemberInput {
        let set = |slot: &mut Option<String>, v: &Option<String>| {
            if v.is_some() {
                slot.clone_from(v);
            }
        };
        if self.id_number.is_some() {
            // Derived from the new number unless given alongside it.
            old.birth_date = None;
            old.gender = None;
        }
        set(&mut old.name, &self.name);
        set(&mut old.gender, &self.gender);
        set(&mut old.id_number, &self.id_number);
        set(&mut old.birth_date, &self.birth_date);
        set(&mut old.ethnicity, &self.ethnicity);
        set(&mut old.education, &self.education);
        set(&mut old.native_place, &self.native_place);
        set(&mut old.phone, &self.phone);
        set(&mut old.employer, &self.employer);
        set(&mut old.employer_type, &self.employer_type);
        set(&mut old.area, &self.area);
        set(&mut old.joined_on, &self.joined_on);
        set(&mut old.category, &self.category);
        if let Some(f) = &self.full_member_on {
            old.full_member_on.clone_from(f);
        }
        set(&mut old.status, &self.status);
        set(&mut old.cadre, &self.cadre);
        set(&mut old.cadre_position, &self.cadre_position);
        set(&mut old.org_id, &self.org_id);
        old
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// Only this org's subtree (404 unless in scope).
    pub org: Option<String>,
    /// Part of the name or ID number.
    pub q: Option<String>,
    /// `normal`, `transferred_out`, `deceased`, `left` or `lost_contact`.
    pub status: Option<String>,
    /// Default 50, at most 200.
    pub limit: Option<usize>,
    pub offset: Option<usize>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct MemberList {
    pub items: Vec<Member>,
    pub total: usize,
    pub limit: usize,
    pub offset: usize,
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// Members of the caller's subtree (or of `org`'s), by org then name. ID numbers and phones are
/// masked unless the caller manages members.
#[utoipa::path(get, path = "/api/v1/members", params(ListQuery), responses(
    (status = 200, body = MemberList), (status = 400, body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    user: CurrentUser,
    Query(q): Query<ListQuery>,
) -> Result<Json<MemberList>, AppError> {
    let status = match non_empty(q.status) {
        None => None,
        Some(s) => Some(Status::parse(&s).ok_or_else(|| {
            AppError::BadRequest(
                "status must be normal, transferred_out, deceased, left or lost_contact".into(),
            )
        })?),
    };
    let filter = Filter {
        org: non_empty(q.org),
        q: non_empty(q.q),
        status,
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 200);
    let offset = q.offset.unwrap_or(0);
    let scope = Scope::of(&state.db, &user.0).await?;
    let (items, total) = search(&state.db, &scope, &user.0, &filter, limit, offset).await?;
    Ok(Json(MemberList {
        items,
        total,
        limit,
        offset,
    }))
}

/// Add a member (system admins, org admins, secretaries; to an org in their subtree).
#[utoipa::path(post, path = "/api/v1/members", request_body = MemberInput, responses(
    (status = 201, body = Member), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, description = "ID number already on record", body = ErrorBody),
    (status = 422, body = InvalidBody)))]
pub(crate) async fn create(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(input): ApiJson<MemberInput>,
) -> Result<(StatusCode, Json<Member>), MemberError> {
    let me = user.require(Permission::ManageMembers)?;
    let scope = Scope::of(&state.db, me).await?;
    let m = create_member(&state.db, &scope, me, &input).await?;
    Ok((StatusCode::CREATED, Json(m)))
}

/// One member (masked unless the caller manages members). Every view is audited.
#[utoipa::path(get, path = "/api/v1/members/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Member), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_one(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Member>, AppError> {
    let scope = Scope::of(&state.db, &user.0).await?;
    let m = load(&state.db, &scope, &id).await?;
    auth::audit(&state.db, Some(&user.0.id), "view_member", &m.id, "").await?;
    Ok(Json(m.for_viewer(&user.0)))
}

/// Change a member's record, including moving them to another org in scope.
#[utoipa::path(patch, path = "/api/v1/members/{id}", params(("id" = String, Path)), request_body = MemberPatch,
    responses((status = 200, body = Member), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = InvalidBody)))]
pub(crate) async fn update(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiJson(patch): ApiJson<MemberPatch>,
) -> Result<Json<Member>, MemberError> {
    let me = user.require(Permission::ManageMembers)?;
    let scope = Scope::of(&state.db, me).await?;
    Ok(Json(
        update_member(&state.db, &scope, me, &id, &patch).await?,
    ))
}

/// Delete a record entered by mistake (otherwise change its status); 409 when it has history.
#[utoipa::path(delete, path = "/api/v1/members/{id}", params(("id" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn remove(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    let me = user.require(Permission::ManageMembers)?;
    let scope = Scope::of(&state.db, me).await?;
    delete_member(&state.db, &scope, me, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A member's rewards and penalties, oldest first.
#[utoipa::path(get, path = "/api/v1/members/{id}/honours", params(("id" = String, Path)),
    responses((status = 200, body = [Honour]), (status = 404, body = ErrorBody)))]
pub(crate) async fn list_honours(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Vec<Honour>>, AppError> {
    let scope = Scope::of(&state.db, &user.0).await?;
    let m = load(&state.db, &scope, &id).await?;
    Ok(Json(honours(&state.db, &m.id).await?))
}

/// Record a reward or penalty.
#[utoipa::path(post, path = "/api/v1/members/{id}/honours", params(("id" = String, Path)), request_body = NewHonour,
    responses((status = 201, body = Honour), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = InvalidBody)))]
pub(crate) async fn add_honour(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiJson(h): ApiJson<NewHonour>,
) -> Result<(StatusCode, Json<Honour>), MemberError> {
    let me = user.require(Permission::ManageMembers)?;
    let scope = Scope::of(&state.db, me).await?;
    let honour = add_honour_to(&state.db, &scope, me, &id, &h).await?;
    Ok((StatusCode::CREATED, Json(honour)))
}

// ---------------------------------------------------------------------------------------------
// Pages
// ---------------------------------------------------------------------------------------------

fn login_redirect(next: &str) -> Response {
    let next: String = url::form_urlencoded::byte_serialize(next.as_bytes()).collect();
    Redirect::to(&format!("/login?next={next}")).into_response()
}

fn can_manage(user: &User) -> bool {
    user.role.allows(Permission::ManageMembers)
}

fn check_csrf(headers: &HeaderMap, token: Option<&String>) -> Result<(), AppError> {
    if auth::csrf_ok(headers, token.map_or("", String::as_str)) {
        Ok(())
    } else {
        Err(AppError::Forbidden(
            "页面已过期，请刷新后重试。(form expired)".into(),
        ))
    }
}

fn with_status(resp: impl IntoResponse, status: StatusCode) -> Response {
    let mut resp = resp.into_response();
    *resp.status_mut() = status;
    resp
}

/// The 404 page, or a page saying why not (403), for errors a page can explain.
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
        AppError::Forbidden(_) | AppError::Conflict(_) => {
            let status = e.status();
            let message = e.to_string();
            let ctx = context! { user => user, denied => message };
            let page = crate::pages::render_page(state, headers, "member.html", ctx)?;
            Ok(with_status(page, status))
        }
        e => Err(e),
    }
}

/// `[{key, label}]` for a select.
fn choices<T: Copy>(
    all: &[T],
    key: fn(T) -> &'static str,
    label: fn(T) -> &'static str,
) -> Vec<minijinja::Value> {
    all.iter()
        .map(|v| context! { key => key(*v), label => label(*v) })
        .collect()
}

/// The orgs in scope for a select, indented by depth.
async fn org_choices(db: &Db, scope: &Scope) -> Result<Vec<minijinja::Value>, AppError> {
    let orgs = scope.orgs(db).await?;
    let top = orgs.iter().map(|o| o.depth).min().unwrap_or(0);
    Ok(orgs
        .into_iter()
        .map(|o| {
            let label = format!("{}{}", "　".repeat(o.depth - top), o.name);
            context! { key => o.id, label => label }
        })
        .collect())
}

#[derive(Deserialize, Default)]
struct ListPageQuery {
    q: Option<String>,
    org: Option<String>,
    status: Option<String>,
    offset: Option<usize>,
}

async fn list_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    MaybeUser(user): MaybeUser,
    Query(q): Query<ListPageQuery>,
) -> Result<Response, AppError> {
    let Some(user) = user else {
        return Ok(login_redirect("/members"));
    };
    let scope = Scope::of(&state.db, &user).await?;
    let status = non_empty(q.status).and_then(|s| Status::parse(&s));
    let filter = Filter {
        org: non_empty(q.org),
        q: non_empty(q.q),
        status,
    };
    let offset = q.offset.unwrap_or(0);
    let (items, total) = match search(&state.db, &scope, &user, &filter, PAGE_SIZE, offset).await {
        Ok(found) => found,
        Err(e) => return page_error(&state, &headers, uri, &user, e).await,
    };
    let rows: Vec<_> = items
        .into_iter()
        .map(|m| {
            context! {
                id => m.id, name => m.name, gender => m.gender.label(), id_number => m.id_number,
                phone => m.phone, org_name => m.org_name, joined_on => m.joined_on,
                status_key => m.status.as_str(), status_label => m.status.label(),
                probationary => m.category == Category::Probationary,
                cadre => (m.cadre != Cadre::NonCadre).then(|| m.cadre.label()),
            }
        })
        .collect();
    let link = |offset: usize| {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("q", filter.q.as_deref()),
            ("org", filter.org.as_deref()),
            ("status", status.map(Status::as_str)),
        ] {
            if let Some(v) = v {
                s.append_pair(k, v);
            }
        }
        s.append_pair("offset", &offset.to_string());
        format!("/members?{}", s.finish())
    };
    let prev = (offset > 0).then(|| link(offset.saturating_sub(PAGE_SIZE)));
    let next = (offset + PAGE_SIZE < total).then(|| link(offset + PAGE_SIZE));
    let ctx = context! {
        user => user, members => rows, total => total, q => filter.q, org => filter.org,
        status => status.map(Status::as_str), orgs => org_choices(&state.db, &scope).await?,
        statuses => choices(Status::ALL, Status::as_str, Status::label),
        prev => prev, next => next, can_manage => can_manage(&user),
        from => (total > 0).then_some(offset + 1), to => (offset + PAGE_SIZE).min(total),
    };
    Ok(crate::pages::render_page(&state, &headers, "members.html", ctx)?.into_response())
}

/// The detail page for `m` (already loaded in scope).
async fn detail(
    state: &AppState,
    headers: &HeaderMap,
    user: &User,
    m: Member,
    status: StatusCode,
    honour_form: minijinja::Value,
) -> Result<Response, AppError> {
    let history: Vec<_> = honours(&state.db, &m.id)
        .await?
        .into_iter()
        .map(|h| {
            context! {
                kind => h.kind.as_str(), kind_label => h.kind.label(), title => h.title,
                decided_on => h.decided_on, note => h.note,
            }
        })
        .collect();
    let m = m.for_viewer(user);
    let or_dash = |s: &str| {
        if s.is_empty() {
            "—".to_string()
        } else {
            s.to_string()
        }
    };
    let facts: Vec<(&str, String)> = vec![
        ("性别", m.gender.label().into()),
        ("身份证号", m.id_number.clone()),
        ("出生日期", m.birth_date.clone()),
        ("民族", or_dash(&m.ethnicity)),
        ("学历", or_dash(&m.education)),
        ("籍贯", or_dash(&m.native_place)),
        ("手机号", or_dash(&m.phone)),
        ("工作单位", or_dash(&m.employer)),
        ("单位性质", or_dash(&m.employer_type)),
        ("所在地区", or_dash(&m.area)),
        ("所属组织", m.org_name.clone()),
        ("入党时间", m.joined_on.clone()),
        ("党员类别", m.category.label().into()),
        (
            "转正时间",
            or_dash(m.full_member_on.as_deref().unwrap_or("")),
        ),
        ("党籍状态", m.status.label().into()),
        ("干部类别", m.cadre.label().into()),
        ("干部职务", or_dash(&m.cadre_position)),
    ];
    let facts: Vec<_> = facts
        .into_iter()
        .map(|(label, value)| context! { label => label, value => value })
        .collect();
    let ctx = context! {
        user => user, m => context! {
            id => m.id, name => m.name, status_key => m.status.as_str(),
            status_label => m.status.label(), masked => m.masked,
        },
        facts => facts, honours => history, can_manage => can_manage(user),
        kinds => choices(HonourKind::ALL, HonourKind::as_str, HonourKind::label),
        today => today(), honour => honour_form,
    };
    let page = crate::pages::render_page(state, headers, "member.html", ctx)?;
    Ok(with_status(page, status))
}

async fn detail_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    MaybeUser(user): MaybeUser,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    let Some(user) = user else {
        return Ok(login_redirect(uri.path()));
    };
    let scope = Scope::of(&state.db, &user).await?;
    match load(&state.db, &scope, &id).await {
        Ok(m) => {
            auth::audit(&state.db, Some(&user.id), "view_member", &m.id, "").await?;
            detail(&state, &headers, &user, m, StatusCode::OK, context! {}).await
        }
        Err(e) => page_error(&state, &headers, uri, &user, e).await,
    }
}

type FormFields = HashMap<String, String>;

/// The form's fields, in [`FIELDS`] order, with values and errors.
#[allow(clippy::too_many_arguments)]
async fn form_page(
    state: &AppState,
    headers: &HeaderMap,
    user: &User,
    scope: &Scope,
    member: Option<(&str, &str)>,
    values: &MemberInput,
    errors: &[FieldError],
    status: StatusCode,
) -> Result<Response, AppError> {
    let mut values = values.clone();
    let orgs = org_choices(&state.db, scope).await?;
    let enum_choices = |field: &str| -> Option<Vec<minijinja::Value>> {
        Some(match field {
            "gender" => choices(Gender::ALL, Gender::as_str, Gender::label),
            "category" => choices(Category::ALL, Category::as_str, Category::label),
            "status" => choices(Status::ALL, Status::as_str, Status::label),
            "cadre" => choices(Cadre::ALL, Cadre::as_str, Cadre::label),
            "org_id" => orgs.clone(),
            _ => return None,
        })
    };
    let fields: Vec<_> = FIELD_NAMES
        .iter()
        .zip(FIELDS)
        .map(|(name, title)| {
            let raw = values.slot(name).and_then(|v| v.clone()).unwrap_or_default();
            // A select shows the code even when the value came in Chinese.
            let value = match *name {
                "gender" => Gender::parse(&raw).map_or(raw.clone(), |v| v.as_str().into()),
                "category" => Category::parse(&raw).map_or(raw.clone(), |v| v.as_str().into()),
                "status" => Status::parse(&raw).map_or(raw.clone(), |v| v.as_str().into()),
                "cadre" => Cadre::parse(&raw).map_or(raw.clone(), |v| v.as_str().into()),
                _ => raw,
            };
            let kind = match *name {
                "birth_date" | "joined_on" | "full_member_on" => "date",
                "phone" => "tel",
                _ if enum_choices(name).is_some() => "select",
                _ => "text",
            };
            let hint = match *name {
                "gender" | "birth_date" => "可留空，自动从身份证号读取",
                "full_member_on" => "预备党员不填",
                _ => "",
            };
            let title = title.replace("(正式/预备)", "");
            context! {
                name => name, title => title, value => value, kind => kind, hint => hint,
                options => enum_choices(name),
                required => matches!(*name, "name" | "id_number" | "joined_on" | "category" | "org_id"),
                blank => matches!(*name, "gender"),
                error => errors.iter().find(|e| e.field == *name).map(|e| e.message.clone()),
            }
        })
        .collect();
    let (action, title, back) = match member {
        Some((id, name)) => (
            format!("/members/{id}/edit"),
            format!("编辑党员信息 · {name}"),
            format!("/members/{id}"),
        ),
        None => (
            "/members/new".to_string(),
            "新增党员".to_string(),
            "/members".to_string(),
        ),
    };
    let ctx = context! {
        user => user, fields => fields, action => action, title => title, back => back,
        today => today(), error_count => errors.len(),
    };
    let page = crate::pages::render_page(state, headers, "member_form.html", ctx)?;
    Ok(with_status(page, status))
}

fn input_from_form(form: &FormFields) -> MemberInput {
    let mut input = MemberInput::default();
    for f in FIELD_NAMES {
        if let (Some(slot), Some(v)) = (input.slot(f), form.get(f)) {
            *slot = Some(v.clone());
        }
    }
    input
}

/// Shows a refused change on the form: field errors (422), a taken ID number (409), an org out
/// of scope (as a field error); other errors as pages.
#[allow(clippy::too_many_arguments)]
async fn form_refused(
    state: &AppState,
    headers: &HeaderMap,
    uri: Uri,
    user: &User,
    scope: &Scope,
    member: Option<(&str, &str)>,
    values: &MemberInput,
    e: MemberError,
) -> Result<Response, AppError> {
    let (errors, status) = match e {
        MemberError::Invalid(errors) => (errors, StatusCode::UNPROCESSABLE_ENTITY),
        MemberError::App(AppError::Conflict(m)) => (
            vec![FieldError {
                field: "id_number",
                message: m,
            }],
            StatusCode::CONFLICT,
        ),
        MemberError::App(AppError::NotFound) if member.is_some() || values.org_id.is_some() => {
            if member.is_some()
                && load(&state.db, scope, member.unwrap_or_default().0)
                    .await
                    .is_err()
            {
                return page_error(state, headers, uri, user, AppError::NotFound).await;
            }
            (
                vec![FieldError {
                    field: "org_id",
                    message: "所属组织不存在或不在你的管辖范围内 (org not found)".into(),
                }],
                StatusCode::UNPROCESSABLE_ENTITY,
            )
        }
        MemberError::App(e) => return page_error(state, headers, uri, user, e).await,
    };
    form_page(state, headers, user, scope, member, values, &errors, status).await
}

async fn new_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    MaybeUser(user): MaybeUser,
) -> Result<Response, AppError> {
    let Some(user) = user else {
        return Ok(login_redirect("/members/new"));
    };
    if !can_manage(&user) {
        let e = AppError::Forbidden("你没有管理党员信息的权限".into());
        return page_error(&state, &headers, uri, &user, e).await;
    }
    let scope = Scope::of(&state.db, &user).await?;
    let values = MemberInput {
        org_id: user.org_id.clone(),
        category: Some(Category::Full.as_str().into()),
        status: Some(Status::Normal.as_str().into()),
        cadre: Some(Cadre::NonCadre.as_str().into()),
        ..MemberInput::default()
    };
    form_page(
        &state,
        &headers,
        &user,
        &scope,
        None,
        &values,
        &[],
        StatusCode::OK,
    )
    .await
}

async fn new_submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    user: CurrentUser,
    Form(form): Form<FormFields>,
) -> Result<Response, AppError> {
    check_csrf(&headers, form.get("csrf"))?;
    let user = &user.0;
    if !can_manage(user) {
        let e = AppError::Forbidden("你没有管理党员信息的权限".into());
        return page_error(&state, &headers, uri, user, e).await;
    }
    let scope = Scope::of(&state.db, user).await?;
    let input = input_from_form(&form);
    match create_member(&state.db, &scope, user, &input).await {
        Ok(m) => Ok(Redirect::to(&format!("/members/{}", m.id)).into_response()),
        Err(e) => form_refused(&state, &headers, uri, user, &scope, None, &input, e).await,
    }
}

async fn edit_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    MaybeUser(user): MaybeUser,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    let Some(user) = user else {
        return Ok(login_redirect(uri.path()));
    };
    if !can_manage(&user) {
        let e = AppError::Forbidden("你没有管理党员信息的权限".into());
        return page_error(&state, &headers, uri, &user, e).await;
    }
    let scope = Scope::of(&state.db, &user).await?;
    let m = match load(&state.db, &scope, &id).await {
        Ok(m) => m,
        Err(e) => return page_error(&state, &headers, uri, &user, e).await,
    };
    let values = m.valid().to_input();
    let member = Some((m.id.as_str(), m.name.as_str()));
    form_page(
        &state,
        &headers,
        &user,
        &scope,
        member,
        &values,
        &[],
        StatusCode::OK,
    )
    .await
}

async fn edit_submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    user: CurrentUser,
    Path(id): Path<String>,
    Form(form): Form<FormFields>,
) -> Result<Response, AppError> {
    check_csrf(&headers, form.get("csrf"))?;
    let user = &user.0;
    if !can_manage(user) {
        let e = AppError::Forbidden("你没有管理党员信息的权限".into());
        return page_error(&state, &headers, uri, user, e).await;
    }
    let scope = Scope::of(&state.db, user).await?;
    let m = match load(&state.db, &scope, &id).await {
        Ok(m) => m,
        Err(e) => return page_error(&state, &headers, uri, user, e).await,
    };
    let input = input_from_form(&form);
    let patch = MemberPatch {
        name: input.name.clone(),
        gender: input.gender.clone(),
        id_number: input.id_number.clone(),
        birth_date: input.birth_date.clone(),
        ethnicity: input.ethnicity.clone(),
        education: input.education.clone(),
        native_place: input.native_place.clone(),
        phone: input.phone.clone(),
        employer: input.employer.clone(),
        employer_type: input.employer_type.clone(),
        area: input.area.clone(),
        joined_on: input.joined_on.clone(),
        category: input.category.clone(),
        full_member_on: Some(input.full_member_on.clone()),
        status: input.status.clone(),
        cadre: input.cadre.clone(),
        cadre_position: input.cadre_position.clone(),
        org_id: input.org_id.clone(),
    };
    match update_member(&state.db, &scope, user, &m.id, &patch).await {
        Ok(m) => Ok(Redirect::to(&format!("/members/{}", m.id)).into_response()),
        Err(e) => {
            let member = Some((m.id.as_str(), m.name.as_str()));
            form_refused(&state, &headers, uri, user, &scope, member, &input, e).await
        }
    }
}

async fn honour_submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    user: CurrentUser,
    Path(id): Path<String>,
    Form(form): Form<FormFields>,
) -> Result<Response, AppError> {
    check_csrf(&headers, form.get("csrf"))?;
    let user = &user.0;
    if !can_manage(user) {
        let e = AppError::Forbidden("你没有管理党员信息的权限".into());
        return page_error(&state, &headers, uri, user, e).await;
    }
    let scope = Scope::of(&state.db, user).await?;
    let h = NewHonour {
        kind: form.get("kind").cloned(),
        title: form.get("title").cloned(),
        decided_on: form.get("decided_on").cloned(),
        note: form.get("note").cloned(),
    };
    match add_honour_to(&state.db, &scope, user, &id, &h).await {
        Ok(_) => Ok(Redirect::to(&format!("/members/{id}#honours")).into_response()),
        Err(MemberError::Invalid(errors)) => {
            let m = load(&state.db, &scope, &id).await?;
            let errs: HashMap<&str, String> =
                errors.into_iter().map(|e| (e.field, e.message)).collect();
            let honour = context! {
                kind => h.kind, title => h.title, decided_on => h.decided_on, note => h.note,
                errors => errs,
            };
            let status = StatusCode::UNPROCESSABLE_ENTITY;
            detail(&state, &headers, user, m, status, honour).await
        }
        Err(MemberError::App(e)) => page_error(&state, &headers, uri, user, e).await,
    }
}

async fn delete_submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    user: CurrentUser,
    Path(id): Path<String>,
    Form(form): Form<FormFields>,
) -> Result<Response, AppError> {
    check_csrf(&headers, form.get("csrf"))?;
    let user = &user.0;
    if !can_manage(user) {
        let e = AppError::Forbidden("你没有管理党员信息的权限".into());
        return page_error(&state, &headers, uri, user, e).await;
    }
    let scope = Scope::of(&state.db, user).await?;
    match delete_member(&state.db, &scope, user, &id).await {
        Ok(()) => Ok(Redirect::to("/members").into_response()),
        Err(e) => page_error(&state, &headers, uri, user, e).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(first17: &str) -> String {
        format!("{first17}{}", idcard::check_char(first17).unwrap())
    }

    fn input() -> MemberInput {
        MemberInput {
            name: Some(" 张三 ".into()),
            id_number: Some(id("11010519900307001").to_lowercase()),
            joined_on: Some("2015-07-01".into()),
            category: Some("正式党员".into()),
            org_id: Some("org".into()),
            ..MemberInput::default()
        }
    }

    fn fields_of(r: Result<ValidMember, Vec<FieldError>>) -> Vec<&'static str> {
        r.unwrap_err().into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn a_good_record_is_cleaned_and_filled_in_from_the_id_number() {
        let v = validate_on(&input(), "2024-01-01").unwrap();
        assert_eq!(v.name, "张三");
        assert_eq!(v.birth_date, "1990-03-07");
        assert_eq!(v.gender, Gender::Male);
        assert_eq!(v.category, Category::Full);
        assert_eq!((v.status, v.cadre), (Status::Normal, Cadre::NonCadre));
        assert_eq!(v.phone, "");
        assert_eq!(v.changed_fields(&v), Vec::<&str>::new());
    }

    #[test]
    fn every_broken_rule_names_its_field() {
        let today = "2024-01-01";
        let with = |f: fn(&mut MemberInput)| {
            let mut i = input();
            f(&mut i);
            fields_of(validate_on(&i, today))
        };
        assert_eq!(
            with(|i| i.birth_date = Some("1990-03-08".into())),
            ["birth_date"]
        );
        assert_eq!(with(|i| i.gender = Some("女".into())), ["gender"]);
        assert_eq!(with(|i| i.phone = Some("123".into())), ["phone"]);
        assert_eq!(
            with(|i| i.joined_on = Some("2024-01-02".into())),
            ["joined_on"]
        );
        assert_eq!(
            with(|i| i.joined_on = Some("2008-03-06".into())),
            ["joined_on"]
        );
        assert_eq!(with(|i| i.joined_on = None), ["joined_on"]);
        assert_eq!(
            with(|i| {
                i.category = Some("预备".into());
                i.full_member_on = Some("2016-07-01".into());
            }),
            ["full_member_on"]
        );
        assert_eq!(
            with(|i| i.full_member_on = Some("2014-01-01".into())),
            ["full_member_on"]
        );
        assert_eq!(
            with(|i| i.id_number = Some("110105199003070010".into())),
            ["id_number"]
        );
        assert_eq!(with(|i| i.org_id = None), ["org_id"]);
        assert_eq!(
            with(|i| {
                i.name = None;
                i.cadre = Some("boss".into());
                i.status = Some("gone".into());
            }),
            ["name", "status", "cadre"]
        );
        // The 18th birthday itself is fine.
        assert!(
            validate_on(
                &MemberInput {
                    joined_on: Some("2008-03-07".into()),
                    ..input()
                },
                today
            )
            .is_ok()
        );
    }

    #[test]
    fn rows_and_labels_follow_the_columns() {
        assert_eq!(FIELDS.len(), FIELD_NAMES.len());
        assert_eq!(field_title("id_number"), "身份证号");
        let row: Vec<String> = FIELD_NAMES.iter().map(|f| format!("<{f}>")).collect();
        let i = MemberInput::from_row(&row);
        assert_eq!(i.name.as_deref(), Some("<name>"));
        assert_eq!(i.org_id.as_deref(), Some("<org_id>"));
        assert_eq!(Status::parse("失联"), Some(Status::LostContact));
        assert_eq!(Cadre::parse("非干部"), Some(Cadre::NonCadre));
        assert_eq!(Cadre::NonCadre.as_str(), "none");
        assert_eq!(
            serde_json::to_value(Cadre::NonCadre).unwrap(),
            serde_json::json!("none")
        );
        assert_eq!(Category::parse("预备党员"), Some(Category::Probationary));
    }

    #[test]
    fn like_prefixes_unescape() {
        assert_eq!(
            like_prefix(&format!("{}%", like_escape("/a_b%\\/"))),
            "/a_b%\\/"
        );
        assert_eq!(like_prefix("/%"), "/");
    }

    #[test]
    fn the_openapi_part_documents_every_members_endpoint() {
        let doc = MembersApi::openapi();
        for p in [
            "/api/v1/members",
            "/api/v1/members/{id}",
            "/api/v1/members/{id}/honours",
        ] {
            assert!(doc.paths.paths.contains_key(p), "{p}");
        }
    }
}
