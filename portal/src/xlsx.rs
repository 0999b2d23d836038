//! Spreadsheets (.xlsx): member records and the org tree, out and in.
//!
//! - `GET /api/v1/members/export.xlsx?org=` — the members of the caller's subtree (or of org X's
//!   subtree), one row each, with the Chinese header row of [`FIELDS`]; ID numbers and phones are
//!   masked for callers without `ManageMembers`.
//! - `GET /api/v1/members/template.xlsx` — the header, one example row, and a sheet explaining
//!   each column.
//! - `POST /api/v1/members/import.xlsx[?only_valid=true]` — the body is the raw .xlsx file (any
//!   content type; no multipart). Every row is checked and every problem reported as
//!   `{row, column, cell, message}` with Excel's row numbers; when any row is bad nothing is
//!   imported (422) unless `only_valid=true`, which imports the good rows and reports the rest.
//!   Members are matched by ID number: updated when in scope, inserted when new, an error row when
//!   they belong outside the caller's subtree. One transaction, multi-row inserts.
//! - `GET /api/v1/orgs/export.xlsx`, `POST /api/v1/orgs/import.xlsx` — the org tree (组织名称,
//!   组织类型, 上级组织 as a name path, 组织编码); import creates missing orgs under their parents
//!   (parents first, whatever the row order) and changes type or code of existing ones.
//!
//! Orgs in a spreadsheet are named by their code or by their name path from the top of the whole
//! tree (`县委/东街道党工委/东一支部`); any unambiguous tail of the path (`东一支部`) is accepted
//! too. Bodies above [`MAX_UPLOAD`] are refused with 413 before they are read when they say their
//! length, and as soon as they pass the limit otherwise.

use std::collections::{HashMap, HashSet};
use std::io::Cursor;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use calamine::{Data, ExcelDateTime, ExcelDateTimeType, Reader, Xlsx};
use rust_xlsxwriter::{Format, Workbook, Worksheet};
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;

use crate::AppState;
use crate::auth::{self, CurrentUser, Permission};
use crate::db::{Backend, Db, new_id, now_ms};
use crate::error::{AppError, ErrorBody};
use crate::idcard;
use crate::members::{
    self, Cadre, Category, FIELD_NAMES, Gender, MemberInput, Status, ValidMember,
};
use crate::orgs::{MAX_NAME_CHARS, Org, OrgKind, Scope, like_escape};

/// The crates, for tests and tools that build or read spreadsheets.
pub use {calamine, rust_xlsxwriter};

/// The largest upload accepted, in bytes.
pub const MAX_UPLOAD: usize = 20 * 1024 * 1024;

const XLSX_TYPE: &str = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/members/export.xlsx", get(export_members))
        .route("/api/v1/members/template.xlsx", get(member_template))
        .route("/api/v1/members/import.xlsx", post(import_members))
        .route("/api/v1/orgs/export.xlsx", get(export_orgs))
        .route("/api/v1/orgs/import.xlsx", post(import_orgs))
}

#[derive(OpenApi)]
#[openapi(paths(
    export_members,
    member_template,
    import_members,
    export_orgs,
    import_orgs
))]
pub struct XlsxApi;

// ---------------------------------------------------------------------------------------------
// Columns
// ---------------------------------------------------------------------------------------------

/// The member columns, in spreadsheet order: [`members::FIELDS`] (one list for the import, the
/// export, the template and the pages).
pub use crate::members::FIELDS;

const C_NAME: usize = 0;
const C_ID: usize = 2;
const C_BIRTH: usize = 3;
const C_ETHNICITY: usize = 4;
const C_EDUCATION: usize = 5;
const C_NATIVE: usize = 6;
const C_PHONE: usize = 7;
const C_EMPLOYER: usize = 8;
const C_EMPLOYER_TYPE: usize = 9;
const C_AREA: usize = 10;
const C_JOINED: usize = 11;
const C_CATEGORY: usize = 12;
const C_FULL_ON: usize = 13;
const C_STATUS: usize = 14;
const C_CADRE: usize = 15;
const C_CADRE_POS: usize = 16;
const C_ORG: usize = 17;

/// Columns an import cannot do without (the others default, or keep what is stored).
const REQUIRED: [usize; 5] = [C_NAME, C_ID, C_JOINED, C_CATEGORY, C_ORG];
const DATE_COLUMNS: [usize; 3] = [C_BIRTH, C_JOINED, C_FULL_ON];

/// The Chinese names of an enumeration, as a list for messages.
fn labels<T: Copy>(all: &[T], label: fn(T) -> &'static str) -> String {
    all.iter().map(|v| label(*v)).collect::<Vec<_>>().join("、")
}

/// A header title without a parenthesised hint: `党员类别(正式/预备)` → `党员类别`.
fn bare_title(t: &str) -> &str {
    let t = t
        .trim()
        .trim_start_matches('*')
        .trim_end_matches('*')
        .trim();
    t.split(['(', '（']).next().unwrap_or(t).trim()
}

const ORG_FIELDS: [&str; 4] = ["组织名称", "组织类型", "上级组织", "组织编码"];

// ---------------------------------------------------------------------------------------------
// Reports
// ---------------------------------------------------------------------------------------------

/// One problem in an uploaded spreadsheet.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RowError {
    /// The row as Excel numbers it (the header is usually row 1); 0 for the file as a whole.
    pub row: u32,
    /// The column title (`身份证号`), when the problem is in one column.
    pub column: Option<String>,
    /// The cell (`C5`), when there is one.
    pub cell: Option<String>,
    /// What is wrong, in Chinese then English.
    pub message: String,
}

/// The answer to an import: counts, and every problem found.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct ImportReport {
    /// `invalid_rows`, `missing_columns`, `not_xlsx`, `empty` on 422.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Data rows read.
    pub rows: usize,
    /// Rows written (inserted + updated).
    pub imported: usize,
    pub inserted: usize,
    pub updated: usize,
    /// Rows equal to what is stored.
    pub unchanged: usize,
    /// Bad rows left out (with `only_valid=true`).
    pub skipped: usize,
    pub errors: Vec<RowError>,
}

impl ImportReport {
    fn refused(error: &'static str, message: impl Into<String>, errors: Vec<RowError>) -> Self {
        ImportReport {
            error: Some(error),
            message: Some(message.into()),
            errors,
            ..ImportReport::default()
        }
    }

    fn file_error(error: &'static str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self::refused(
            error,
            message.clone(),
            vec![RowError {
                row: 0,
                column: None,
                cell: None,
                message,
            }],
        )
    }
}

fn unprocessable(report: ImportReport) -> Response {
    (StatusCode::UNPROCESSABLE_ENTITY, Json(report)).into_response()
}

fn too_large() -> Response {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        Json(ErrorBody {
            error: "payload_too_large",
            message: format!(
                "文件超过 {} MB，请拆分后分批导入 (file larger than {} MB)",
                MAX_UPLOAD / (1024 * 1024),
                MAX_UPLOAD / (1024 * 1024)
            ),
        }),
    )
        .into_response()
}

/// `A`, `B`, … `Z`, `AA` … for a zero-based column.
fn column_letters(mut col: u32) -> String {
    let mut s = Vec::new();
    loop {
        s.push(b'A' + (col % 26) as u8);
        if col < 26 {
            break;
        }
        col = col / 26 - 1;
    }
    s.reverse();
    String::from_utf8(s).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// The first worksheet: its header titles and data rows, with Excel's numbering.
struct Sheet {
    header_row: u32,
    /// Zero-based absolute column of each title.
    columns: HashMap<String, u32>,
    duplicate_titles: Vec<String>,
    first_col: u32,
    /// (Excel row number, cells from `first_col`).
    rows: Vec<(u32, Vec<Data>)>,
}

impl Sheet {
    fn cell<'a>(&self, cells: &'a [Data], col: u32) -> &'a Data {
        cells
            .get((col - self.first_col) as usize)
            .unwrap_or(&Data::Empty)
    }
}

/// Reads the upload: the body, limited to [`MAX_UPLOAD`].
async fn read_upload(headers: &HeaderMap, body: Body) -> Result<Vec<u8>, Response> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_UPLOAD as u64) {
        return Err(too_large());
    }
    match axum::body::to_bytes(body, MAX_UPLOAD).await {
        Ok(b) => Ok(b.to_vec()),
        Err(e) => {
            let too_big = std::error::Error::source(&e)
                .is_some_and(|s| s.to_string().contains("length limit"))
                || e.to_string().contains("length limit");
            if too_big {
                Err(too_large())
            } else {
                Err(AppError::BadRequest(format!("cannot read the upload: {e}")).into_response())
            }
        }
    }
}

fn read_sheet(bytes: &[u8]) -> Result<Sheet, ImportReport> {
    const NOT_XLSX: &str = "不是 .xlsx 文件，请用 Excel 或 WPS 另存为 .xlsx (not an .xlsx file)";
    if !bytes.starts_with(b"PK\x03\x04") {
        return Err(ImportReport::file_error("not_xlsx", NOT_XLSX));
    }
    let mut book: Xlsx<_> = Xlsx::new(Cursor::new(bytes))
        .map_err(|_| ImportReport::file_error("not_xlsx", NOT_XLSX))?;
    let range = match book.worksheet_range_at(0) {
        Some(Ok(r)) => r,
        Some(Err(e)) => {
            return Err(ImportReport::file_error(
                "not_xlsx",
                format!("{NOT_XLSX}: {e}"),
            ));
        }
        None => {
            return Err(ImportReport::file_error(
                "empty",
                "表格是空的 (no worksheet)",
            ));
        }
    };
    let Some((start_row, first_col)) = range.start() else {
        return Err(ImportReport::file_error(
            "empty",
            "表格是空的 (empty sheet)",
        ));
    };
    let mut rows = range
        .rows()
        .enumerate()
        .map(|(i, r)| (start_row + i as u32 + 1, r));
    // The header is the first row with anything in it.
    let (header_row, titles) = loop {
        match rows.next() {
            Some((n, r)) if r.iter().any(|c| !is_blank(c)) => break (n, r),
            Some(_) => continue,
            None => {
                return Err(ImportReport::file_error(
                    "empty",
                    "表格是空的 (empty sheet)",
                ));
            }
        }
    };
    let mut columns = HashMap::new();
    let mut duplicate_titles = Vec::new();
    for (j, t) in titles.iter().enumerate() {
        let t = text_of(t).unwrap_or_default();
        let t = bare_title(&t);
        if t.is_empty() {
            continue;
        }
        if columns
            .insert(t.to_string(), first_col + j as u32)
            .is_some()
        {
            duplicate_titles.push(t.to_string());
        }
    }
    let rows = rows
        .filter(|(_, r)| r.iter().any(|c| !is_blank(c)))
        .map(|(n, r)| (n, r.to_vec()))
        .collect();
    Ok(Sheet {
        header_row,
        columns,
        duplicate_titles,
        first_col,
        rows,
    })
}

fn is_blank(d: &Data) -> bool {
    match d {
        Data::Empty => true,
        Data::String(s) => s.trim().is_empty(),
        _ => false,
    }
}

/// A cell as text (numbers without a trailing `.0`), or why it has none.
fn text_of(d: &Data) -> Result<String, String> {
    Ok(match d {
        Data::Empty => String::new(),
        Data::String(s) => s.trim().to_string(),
        Data::Int(i) => i.to_string(),
        Data::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", *f as i64),
        Data::Float(f) => f.to_string(),
        Data::Bool(b) => if *b { "TRUE" } else { "FALSE" }.to_string(),
        Data::DateTime(dt) => ymd(dt),
        Data::DateTimeIso(s) | Data::DurationIso(s) => s.clone(),
        Data::Error(e) => return Err(format!("单元格是错误值 {e} (the cell holds an error)")),
    })
}

fn ymd(dt: &ExcelDateTime) -> String {
    let (y, m, d, ..) = dt.to_ymd_hms_milli();
    format!("{y:04}-{m:02}-{d:02}")
}

/// A date cell: an Excel date, a serial number, or text such as `1990-01-31`, `1990/1/31`,
/// `1990.01.31`, `1990年1月31日` or `19900131`. `None` when empty.
fn date_of(d: &Data) -> Result<Option<String>, String> {
    let bad = |shown: &str| {
        Err(format!(
            "“{shown}”不是日期，应为 YYYY-MM-DD (not a date; expected YYYY-MM-DD)"
        ))
    };
    let date = match d {
        Data::Empty => return Ok(None),
        Data::DateTime(dt) => ymd(dt),
        Data::Float(_) | Data::Int(_) => {
            let serial = match d {
                Data::Float(f) => *f,
                Data::Int(i) => *i as f64,
                _ => unreachable!(),
            };
            // 1900-01-01 … 2100-12-31 as Excel serials.
            if !(1.0..=73415.0).contains(&serial) {
                return bad(&text_of(d).unwrap_or_default());
            }
            ymd(&ExcelDateTime::new(
                serial,
                ExcelDateTimeType::DateTime,
                false,
            ))
        }
        Data::DateTimeIso(s) => s.chars().take(10).collect(),
        Data::String(s) => {
            let s = s.trim();
            if s.is_empty() {
                return Ok(None);
            }
            match parse_date_text(s) {
                Some(d) => d,
                None => return bad(s),
            }
        }
        Data::Bool(_) | Data::DurationIso(_) => return bad(&text_of(d).unwrap_or_default()),
        Data::Error(e) => return Err(format!("单元格是错误值 {e} (the cell holds an error)")),
    };
    if idcard::valid_date(&date) {
        Ok(Some(date))
    } else {
        bad(&date)
    }
}

fn parse_date_text(s: &str) -> Option<String> {
    if s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit()) {
        return Some(format!("{}-{}-{}", &s[..4], &s[4..6], &s[6..]));
    }
    let s = s.strip_suffix('日').unwrap_or(s);
    // A time after the date (`1990-01-31 00:00:00`) is dropped.
    let s = s.split([' ', 'T']).next().unwrap_or(s);
    let parts: Vec<&str> = s.split(['-', '/', '.', '年', '月']).collect();
    if parts.len() != 3
        || parts
            .iter()
            .any(|p| p.is_empty() || p.len() > 4 || !p.bytes().all(|b| b.is_ascii_digit()))
        || parts[0].len() != 4
    {
        return None;
    }
    let m: u32 = parts[1].parse().ok()?;
    let d: u32 = parts[2].parse().ok()?;
    Some(format!("{}-{m:02}-{d:02}", parts[0]))
}

// ---------------------------------------------------------------------------------------------
// Org names
// ---------------------------------------------------------------------------------------------

/// The orgs in scope with their name paths from the top of the whole tree, and a lookup by code
/// or by any tail of the name path.
struct OrgIndex {
    orgs: Vec<Org>,
    /// Org id → `县委/东街道党工委/东一支部`.
    names: HashMap<String, String>,
    by_code: HashMap<String, usize>,
    /// Path tail → org index; `None` when two orgs share it.
    by_tail: HashMap<String, Option<usize>>,
}

fn norm_path(s: &str) -> String {
    s.split(['/', '／'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

impl OrgIndex {
    async fn load(db: &Db, scope: &Scope) -> Result<OrgIndex, AppError> {
        let orgs = scope.orgs(db).await?;
        let mut name_of: HashMap<String, String> = orgs
            .iter()
            .map(|o| (o.id.clone(), o.name.clone()))
            .collect();
        // Ancestors above the scope (their names start the paths).
        let above: HashSet<&str> = orgs
            .iter()
            .flat_map(|o| o.path.split('/'))
            .filter(|id| !id.is_empty() && !name_of.contains_key(*id))
            .collect();
        for id in above {
            let row: Option<(String,)> = sqlx::query_as("SELECT name FROM orgs WHERE id = $1")
                .bind(id)
                .fetch_optional(&db.pool)
                .await?;
            if let Some((n,)) = row {
                name_of.insert(id.to_string(), n);
            }
        }
        let mut index = OrgIndex {
            orgs: Vec::new(),
            names: HashMap::new(),
            by_code: HashMap::new(),
            by_tail: HashMap::new(),
        };
        for o in orgs {
            let full = o
                .path
                .split('/')
                .filter(|id| !id.is_empty())
                .map(|id| name_of.get(id).map(String::as_str).unwrap_or("?"))
                .collect::<Vec<_>>()
                .join("/");
            index.add(o, full);
        }
        Ok(index)
    }

    fn add(&mut self, org: Org, full: String) -> usize {
        let i = self.orgs.len();
        if let Some(c) = &org.code {
            self.by_code.insert(c.clone(), i);
        }
        let parts: Vec<&str> = full.split('/').collect();
        for k in 0..parts.len() {
            let tail = parts[k..].join("/");
            self.by_tail
                .entry(tail)
                .and_modify(|e| {
                    if *e != Some(i) {
                        *e = None
                    }
                })
                .or_insert(Some(i));
        }
        self.names.insert(org.id.clone(), full);
        self.orgs.push(org);
        i
    }

    fn full_name(&self, i: usize) -> &str {
        &self.names[&self.orgs[i].id]
    }

    /// The org a spreadsheet names, or why none.
    fn resolve(&self, text: &str) -> Result<usize, String> {
        let text = text.trim();
        if let Some(i) = self.by_code.get(text) {
            return Ok(*i);
        }
        match self.by_tail.get(&norm_path(text)) {
            Some(Some(i)) => Ok(*i),
            Some(None) => Err(format!(
                "组织“{text}”不止一个，请写完整路径或组织编码 (ambiguous org; give the full path or the code)"
            )),
            None => Err(format!(
                "在您管辖的范围内找不到组织“{text}” (no such org in your part of the tree)"
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Member rows
// ---------------------------------------------------------------------------------------------

/// A member record as stored (codes, not labels).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
struct MemberRec {
    org_id: String,
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
}

const MEMBER_COLUMNS: &str = "org_id, name, gender, id_number, birth_date, ethnicity, education, \
    native_place, phone, employer, employer_type, area, joined_on, category, full_member_on, \
    status, cadre, cadre_position";

/// The text of each column of one row (`None` for a column the file lacks; dates already
/// `YYYY-MM-DD`).
struct RowInput {
    cells: [Option<String>; 18],
}

impl RowInput {
    fn get(&self, c: usize) -> &str {
        self.cells[c].as_deref().unwrap_or("")
    }
}

/// Checks one row: its org is resolved here (by code or name path, within scope), every other
/// rule is [`members::validate_on`]'s. Every problem as (column, message).
fn validate_row(
    input: &RowInput,
    orgs: &OrgIndex,
    today: &str,
) -> Result<MemberRec, Vec<(usize, String)>> {
    let mut errs: Vec<(usize, String)> = Vec::new();
    let mut cells = input.cells.clone();
    let org_text = input.get(C_ORG).to_string();
    if !org_text.is_empty() {
        cells[C_ORG] = Some(match orgs.resolve(&org_text) {
            Ok(i) => orgs.orgs[i].id.clone(),
            Err(e) => {
                errs.push((C_ORG, e));
                "?".into()
            }
        });
    }
    let member = MemberInput::from_row(&cells.map(Option::unwrap_or_default));
    match members::validate_on(&member, today) {
        Ok(v) if errs.is_empty() => Ok(MemberRec::from(v)),
        Ok(_) => Err(errs),
        Err(fes) => {
            for fe in fes {
                let c = FIELD_NAMES
                    .iter()
                    .position(|f| *f == fe.field)
                    .unwrap_or(C_NAME);
                if !errs.iter().any(|(ec, _)| *ec == c) {
                    errs.push((c, fe.message));
                }
            }
            Err(errs)
        }
    }
}

impl From<ValidMember> for MemberRec {
    fn from(v: ValidMember) -> MemberRec {
        MemberRec {
            org_id: v.org_id,
            name: v.name,
            gender: v.gender.as_str().into(),
            id_number: v.id_number,
            birth_date: v.birth_date,
            ethnicity: v.ethnicity,
            education: v.education,
            native_place: v.native_place,
            phone: v.phone,
            employer: v.employer,
            employer_type: v.employer_type,
            area: v.area,
            joined_on: v.joined_on,
            category: v.category.as_str().into(),
            full_member_on: v.full_member_on,
            status: v.status.as_str().into(),
            cadre: v.cadre.as_str().into(),
            cadre_position: v.cadre_position,
        }
    }
}

/// Keeps what is stored for the columns the file lacks.
fn fill_absent(rec: &mut MemberRec, present: &[bool; 18], old: &MemberRec) {
    let keep = |c: usize| !present[c];
    if keep(C_ETHNICITY) {
        rec.ethnicity = old.ethnicity.clone();
    }
    if keep(C_EDUCATION) {
        rec.education = old.education.clone();
    }
    if keep(C_NATIVE) {
        rec.native_place = old.native_place.clone();
    }
    if keep(C_PHONE) {
        rec.phone = old.phone.clone();
    }
    if keep(C_EMPLOYER) {
        rec.employer = old.employer.clone();
    }
    if keep(C_EMPLOYER_TYPE) {
        rec.employer_type = old.employer_type.clone();
    }
    if keep(C_AREA) {
        rec.area = old.area.clone();
    }
    if keep(C_FULL_ON) {
        rec.full_member_on = old.full_member_on.clone();
    }
    if keep(C_STATUS) {
        rec.status = old.status.clone();
    }
    if keep(C_CADRE) {
        rec.cadre = old.cadre.clone();
    }
    if keep(C_CADRE_POS) {
        rec.cadre_position = old.cadre_position.clone();
    }
}

/// The outcome of checking a member sheet (no database writes yet).
struct CheckedMembers {
    rows: usize,
    good: Vec<(u32, MemberRec)>,
    errors: Vec<RowError>,
    present: [bool; 18],
}

fn row_error(sheet: &Sheet, row: u32, column: &str, message: String) -> RowError {
    RowError {
        row,
        column: Some(column.to_string()),
        cell: sheet
            .columns
            .get(bare_title(column))
            .map(|c| format!("{}{row}", column_letters(*c))),
        message,
    }
}

/// Parses and checks every row (CPU only; run it off the async threads).
fn check_member_sheet(bytes: &[u8], orgs: &OrgIndex) -> Result<CheckedMembers, ImportReport> {
    let sheet = read_sheet(bytes)?;
    let missing: Vec<RowError> = REQUIRED
        .iter()
        .filter(|c| !sheet.columns.contains_key(bare_title(FIELDS[**c])))
        .map(|c| RowError {
            row: sheet.header_row,
            column: Some(FIELDS[*c].to_string()),
            cell: None,
            message: format!("缺少必需的列“{}” (missing required column)", FIELDS[*c]),
        })
        .chain(sheet.duplicate_titles.iter().map(|t| RowError {
            row: sheet.header_row,
            column: Some(t.clone()),
            cell: None,
            message: format!("列“{t}”出现了不止一次 (duplicate column)"),
        }))
        .collect();
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().filter_map(|e| e.column.as_deref()).collect();
        return Err(ImportReport::refused(
            "missing_columns",
            format!("表头有误：{} (bad header row)", names.join("、")),
            missing,
        ));
    }
    let cols: [Option<u32>; 18] =
        std::array::from_fn(|c| sheet.columns.get(bare_title(FIELDS[c])).copied());
    let present: [bool; 18] = std::array::from_fn(|c| cols[c].is_some());
    let today = members::today();
    let mut errors = Vec::new();
    let mut good = Vec::with_capacity(sheet.rows.len());
    let mut bad_rows = HashSet::new();
    let mut rows_of: HashMap<String, Vec<u32>> = HashMap::with_capacity(sheet.rows.len());
    for (n, cells) in &sheet.rows {
        let n = *n;
        let mut cell_errs = Vec::new();
        let input = RowInput {
            cells: std::array::from_fn(|c| {
                let col = cols[c]?;
                let d = sheet.cell(cells, col);
                let v = if DATE_COLUMNS.contains(&c) {
                    date_of(d).map(Option::unwrap_or_default)
                } else if c == C_ID && matches!(d, Data::Float(f) if f.abs() >= 1e15) {
                    Err("身份证号被存成了数字，末几位已丢失；请把该列设为文本后重新填写 (ID number stored as a number)".into())
                } else {
                    text_of(d)
                };
                Some(v.unwrap_or_else(|e| {
                    cell_errs.push((c, e));
                    String::new()
                }))
            }),
        };
        let id = idcard::normalise(input.get(C_ID));
        if !id.is_empty() {
            rows_of.entry(id).or_default().push(n);
        }
        let mut row_errs = cell_errs;
        match validate_row(&input, orgs, &today) {
            Ok(rec) if row_errs.is_empty() => good.push((n, rec)),
            Ok(_) => {}
            Err(es) => {
                // Cell-level errors (a text in a date column) explain the rule errors they cause.
                for (c, e) in es {
                    if !row_errs.iter().any(|(rc, _)| *rc == c) {
                        row_errs.push((c, e));
                    }
                }
            }
        }
        if !row_errs.is_empty() {
            bad_rows.insert(n);
            row_errs.sort_by_key(|(c, _)| *c);
            errors.extend(
                row_errs
                    .into_iter()
                    .map(|(c, e)| row_error(&sheet, n, FIELDS[c], e)),
            );
        }
    }
    // One ID number on several rows: every one of them is named.
    for rows in rows_of.values().filter(|r| r.len() > 1) {
        for n in rows {
            let others: Vec<String> = rows
                .iter()
                .filter(|m| *m != n)
                .map(u32::to_string)
                .collect();
            let others = others.join("、");
            bad_rows.insert(*n);
            errors.push(row_error(
                &sheet,
                *n,
                FIELDS[C_ID],
                format!("身份证号与第 {others} 行重复 (same ID number as row {others})"),
            ));
        }
    }
    errors.sort_by_key(|e| e.row);
    good.retain(|(n, _)| !bad_rows.contains(n));
    Ok(CheckedMembers {
        rows: sheet.rows.len(),
        good,
        errors,
        present,
    })
}

#[derive(sqlx::FromRow)]
struct ExistingRow {
    id: String,
    org_path: String,
    #[sqlx(flatten)]
    rec: MemberRec,
}

/// `count` comma-separated parameter markers for the parameters after the first `skip`.
///
/// SQLite gets anonymous `?`s: for numbered ones (`$n`) it finds each parameter's name by a
/// linear walk of the statement's list of names, and the driver asks for every one of them, so a
/// statement with thousands of `$n`s costs time quadratic in their number (this made importing
/// 100,000 members take over a minute). PostgreSQL only knows `$n`.
fn placeholders(backend: Backend, skip: usize, count: usize) -> String {
    let mut s = String::with_capacity(count * 7);
    for i in 0..count {
        if i > 0 {
            s.push_str(", ");
        }
        match backend {
            Backend::Sqlite => s.push('?'),
            Backend::Postgres => {
                s.push('$');
                s.push_str(&(skip + i + 1).to_string());
            }
        }
    }
    s
}

/// Inserts per statement; 21 parameters each keeps under SQLite's 32766.
const INSERT_BATCH: usize = 1000;
const LOOKUP_BATCH: usize = 1000;

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ImportQuery {
    /// Import the good rows and report the bad ones (default: all or nothing).
    #[serde(default)]
    pub only_valid: bool,
}

/// Import members from an .xlsx file (the raw request body, at most 20 MB).
#[utoipa::path(post, path = "/api/v1/members/import.xlsx", params(ImportQuery),
    request_body(content = Vec<u8>, content_type = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        description = "The .xlsx file itself (not multipart)"),
    responses((status = 200, body = ImportReport), (status = 403, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ImportReport)))]
pub(crate) async fn import_members(
    State(state): State<AppState>,
    user: CurrentUser,
    Query(q): Query<ImportQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AppError> {
    let me = user.require(Permission::ManageMembers)?;
    let bytes = match read_upload(&headers, body).await {
        Ok(b) => b,
        Err(resp) => return Ok(resp),
    };
    let scope = Scope::of(&state.db, me).await?;
    let orgs = OrgIndex::load(&state.db, &scope).await?;
    let (checked, orgs) =
        tokio::task::spawn_blocking(move || (check_member_sheet(&bytes, &orgs), orgs))
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
    let mut checked = match checked {
        Ok(c) => c,
        Err(report) => return Ok(unprocessable(report)),
    };
    // Who is stored already (matched by ID number, wherever they are).
    let mut existing: HashMap<String, ExistingRow> = HashMap::new();
    for chunk in checked.good.chunks(LOOKUP_BATCH) {
        // A join with a VALUES list, not `IN ($1, …)`: PostgreSQL cannot hash a list of
        // parameters, and with fresh statistics it scanned all members comparing each with every
        // parameter (over a minute for re-importing 100,000).
        let marks = placeholders(state.db.backend, 0, chunk.len()).replace(", ", "), (");
        let sql = format!(
            "SELECT m.id, o.path AS org_path, {} FROM (VALUES ({marks})) AS v \
             JOIN members m ON m.id_number = v.column1 JOIN orgs o ON o.id = m.org_id",
            MEMBER_COLUMNS
                .split(", ")
                .map(|c| format!("m.{}", c.trim()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut query = sqlx::query_as::<_, ExistingRow>(&sql);
        for (_, rec) in chunk {
            query = query.bind(rec.id_number.clone());
        }
        for row in query.fetch_all(&state.db.pool).await? {
            existing.insert(row.rec.id_number.clone(), row);
        }
    }
    let mut inserts: Vec<MemberRec> = Vec::new();
    let mut updates: Vec<(String, MemberRec)> = Vec::new();
    let mut unchanged = 0;
    let mut outside = Vec::new();
    for (n, mut rec) in std::mem::take(&mut checked.good) {
        match existing.get(&rec.id_number) {
            None => inserts.push(rec),
            Some(old) if !scope.contains_path(&old.org_path) => outside.push(RowError {
                row: n,
                column: Some(FIELDS[C_ID].into()),
                cell: None,
                message: "该身份证号的党员属于您管辖范围以外的组织，不能修改 (this member belongs to an org outside your part of the tree)".into(),
            }),
            Some(old) => {
                fill_absent(&mut rec, &checked.present, &old.rec);
                if rec == old.rec {
                    unchanged += 1;
                } else {
                    updates.push((old.id.clone(), rec));
                }
            }
        }
    }
    checked.errors.extend(outside);
    checked.errors.sort_by_key(|e| e.row);
    let bad = checked.errors.iter().map(|e| e.row).collect::<HashSet<_>>();
    let mut report = ImportReport {
        rows: checked.rows,
        errors: checked.errors,
        skipped: bad.len(),
        ..ImportReport::default()
    };
    if !report.errors.is_empty() && !q.only_valid {
        report.error = Some("invalid_rows");
        report.message = Some(format!(
            "{} 行有错误，未导入任何数据；改正后重新导入，或加 only_valid=true 只导入正确的行 ({} bad rows; nothing imported)",
            bad.len(),
            bad.len()
        ));
        report.skipped = 0;
        return Ok(unprocessable(report));
    }
    write_members(&state.db, &inserts, &updates).await?;
    report.inserted = inserts.len();
    report.updated = updates.len();
    report.unchanged = unchanged;
    report.imported = report.inserted + report.updated;
    drop(orgs);
    auth::audit(
        &state.db,
        Some(&me.id),
        "import_members",
        "",
        &format!(
            "inserted {} updated {} unchanged {} skipped {}",
            report.inserted, report.updated, report.unchanged, report.skipped
        ),
    )
    .await?;
    Ok(Json(report).into_response())
}

async fn write_members(
    db: &Db,
    inserts: &[MemberRec],
    updates: &[(String, MemberRec)],
) -> Result<(), AppError> {
    let now = now_ms();
    let mut tx = db.pool.begin().await?;
    for chunk in inserts.chunks(INSERT_BATCH) {
        let mut sql =
            format!("INSERT INTO members (id, {MEMBER_COLUMNS}, created_at, updated_at) VALUES ");
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push(',');
            }
            sql.push('(');
            sql.push_str(&placeholders(db.backend, i * 21, 21));
            sql.push(')');
        }
        let mut query = sqlx::query(&sql);
        for r in chunk {
            query = query
                .bind(new_id())
                .bind(r.org_id.clone())
                .bind(r.name.clone())
                .bind(r.gender.clone())
                .bind(r.id_number.clone())
                .bind(r.birth_date.clone())
                .bind(r.ethnicity.clone())
                .bind(r.education.clone())
                .bind(r.native_place.clone())
                .bind(r.phone.clone())
                .bind(r.employer.clone())
                .bind(r.employer_type.clone())
                .bind(r.area.clone())
                .bind(r.joined_on.clone())
                .bind(r.category.clone())
                .bind(r.full_member_on.clone())
                .bind(r.status.clone())
                .bind(r.cadre.clone())
                .bind(r.cadre_position.clone())
                .bind(now)
                .bind(now);
        }
        insert_result(query.execute(&mut *tx).await)?;
    }
    for (id, r) in updates {
        sqlx::query(
            "UPDATE members SET org_id = $2, name = $3, gender = $4, birth_date = $5, \
             ethnicity = $6, education = $7, native_place = $8, phone = $9, employer = $10, \
             employer_type = $11, area = $12, joined_on = $13, category = $14, \
             full_member_on = $15, status = $16, cadre = $17, cadre_position = $18, \
             updated_at = $19 WHERE id = $1",
        )
        .bind(id)
        .bind(&r.org_id)
        .bind(&r.name)
        .bind(&r.gender)
        .bind(&r.birth_date)
        .bind(&r.ethnicity)
        .bind(&r.education)
        .bind(&r.native_place)
        .bind(&r.phone)
        .bind(&r.employer)
        .bind(&r.employer_type)
        .bind(&r.area)
        .bind(&r.joined_on)
        .bind(&r.category)
        .bind(&r.full_member_on)
        .bind(&r.status)
        .bind(&r.cadre)
        .bind(&r.cadre_position)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

fn insert_result<T>(r: Result<T, sqlx::Error>) -> Result<T, AppError> {
    match r {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(AppError::Conflict(
            "导入时有人同时录入了相同的身份证号，请重试 (a concurrent change; try again)".into(),
        )),
        other => Ok(other?),
    }
}

// ---------------------------------------------------------------------------------------------
// Member export and template
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ExportQuery {
    /// Export this org's subtree (default: everything the caller may see).
    pub org: Option<String>,
}

fn xlsx_response(bytes: Vec<u8>, file_name: &str) -> Response {
    let mut resp = Response::new(Body::from(bytes));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(XLSX_TYPE));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{file_name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    resp
}

fn xlsx_error(e: rust_xlsxwriter::XlsxError) -> AppError {
    AppError::Internal(anyhow::anyhow!("writing xlsx: {e}"))
}

fn write_header(ws: &mut Worksheet, titles: &[&str], widths: &[f64]) -> Result<(), AppError> {
    let bold = Format::new().set_bold();
    for (c, t) in titles.iter().enumerate() {
        ws.write_string_with_format(0, c as u16, *t, &bold)
            .map_err(xlsx_error)?;
        ws.set_column_width(c as u16, widths.get(c).copied().unwrap_or(12.0))
            .map_err(xlsx_error)?;
    }
    ws.set_freeze_panes(1, 0).map_err(xlsx_error)?;
    Ok(())
}

const MEMBER_WIDTHS: [f64; 18] = [
    10.0, 6.0, 21.0, 12.0, 8.0, 10.0, 12.0, 14.0, 20.0, 12.0, 14.0, 12.0, 10.0, 12.0, 10.0, 10.0,
    12.0, 36.0,
];

fn member_cells(r: &MemberRec, org: &str, mask: bool) -> [String; 18] {
    let (id, phone) = if mask {
        (
            idcard::mask_id(&r.id_number),
            if r.phone.is_empty() {
                String::new()
            } else {
                idcard::mask_phone(&r.phone)
            },
        )
    } else {
        (r.id_number.clone(), r.phone.clone())
    };
    [
        r.name.clone(),
        Gender::parse(&r.gender)
            .map_or("", Gender::label)
            .to_string(),
        id,
        r.birth_date.clone(),
        r.ethnicity.clone(),
        r.education.clone(),
        r.native_place.clone(),
        phone,
        r.employer.clone(),
        r.employer_type.clone(),
        r.area.clone(),
        r.joined_on.clone(),
        Category::parse(&r.category)
            .map_or("", Category::label)
            .to_string(),
        r.full_member_on.clone().unwrap_or_default(),
        Status::parse(&r.status)
            .map_or("", Status::label)
            .to_string(),
        Cadre::parse(&r.cadre).map_or("", Cadre::label).to_string(),
        r.cadre_position.clone(),
        org.to_string(),
    ]
}

/// Export members as .xlsx (ID numbers and phones masked without the right to manage members).
#[utoipa::path(get, path = "/api/v1/members/export.xlsx", params(ExportQuery),
    responses((status = 200, content_type = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", body = Vec<u8>),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn export_members(
    State(state): State<AppState>,
    user: CurrentUser,
    Query(q): Query<ExportQuery>,
) -> Result<Response, AppError> {
    let me = &user.0;
    let mask = !me.role.allows(Permission::ManageMembers);
    let scope = Scope::of(&state.db, me).await?;
    let orgs = OrgIndex::load(&state.db, &scope).await?;
    let prefix = match &q.org {
        Some(id) => scope.org(&state.db, id).await?.path,
        None => match orgs
            .orgs
            .iter()
            .map(|o| o.path.as_str())
            .min_by_key(|p| p.len())
        {
            Some(_) if scope.root.is_none() => "/".to_string(),
            Some(p) => p.to_string(),
            None => {
                return Ok(xlsx_response(
                    build_members(Vec::new(), &orgs, mask).await?,
                    "members.xlsx",
                ));
            }
        },
    };
    let sql = format!(
        "SELECT {} FROM members m JOIN orgs o ON o.id = m.org_id \
         WHERE o.path LIKE $1 ESCAPE '\\' ORDER BY o.path, m.name, m.id_number",
        MEMBER_COLUMNS
            .split(", ")
            .map(|c| format!("m.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let rows = sqlx::query_as::<_, MemberRec>(&sql)
        .bind(format!("{}%", like_escape(&prefix)))
        .fetch_all(&state.db.pool)
        .await?;
    auth::audit(
        &state.db,
        Some(&me.id),
        "export_members",
        q.org.as_deref().unwrap_or(""),
        &format!("{} rows{}", rows.len(), if mask { ", masked" } else { "" }),
    )
    .await?;
    let bytes = build_members(rows, &orgs, mask).await?;
    Ok(xlsx_response(bytes, "members.xlsx"))
}

async fn build_members(
    rows: Vec<MemberRec>,
    orgs: &OrgIndex,
    mask: bool,
) -> Result<Vec<u8>, AppError> {
    let names = orgs.names.clone();
    tokio::task::spawn_blocking(move || {
        let mut book = Workbook::new();
        let ws = book
            .add_worksheet_with_constant_memory()
            .map_err(xlsx_error)?;
        ws.set_name("党员信息").map_err(xlsx_error)?;
        write_header(ws, &FIELDS, &MEMBER_WIDTHS)?;
        for (i, r) in rows.iter().enumerate() {
            let org = names.get(&r.org_id).map(String::as_str).unwrap_or("");
            for (c, v) in member_cells(r, org, mask).iter().enumerate() {
                if !v.is_empty() {
                    ws.write_string(i as u32 + 1, c as u16, v)
                        .map_err(xlsx_error)?;
                }
            }
        }
        book.save_to_buffer().map_err(xlsx_error)
    })
    .await
    .map_err(|e| anyhow::anyhow!(e))?
}

/// What each member column means and which values it takes (the template's second sheet).
fn column_help() -> [(&'static str, &'static str, String); 18] {
    [
        ("姓名", "必填", "最多 50 个字".into()),
        ("性别", "选填", format!("{}；不填则按身份证号推定，填写则须与身份证号一致", labels(Gender::ALL, Gender::label))),
        ("身份证号", "必填", "18 位居民身份证号，末位可为 X；请将该列设为文本格式。导入时按身份证号匹配：已有的党员更新，新的党员新增".into()),
        ("出生日期", "选填", "日期，如 1990-01-31；不填则取自身份证号，填写则须一致".into()),
        ("民族", "选填", "如 汉族".into()),
        ("学历", "选填", "如 大学本科".into()),
        ("籍贯", "选填", "如 山东济南".into()),
        ("手机号", "选填", "11 位大陆手机号".into()),
        ("工作单位", "选填", "最多 100 个字".into()),
        ("单位性质", "选填", "如 机关、事业单位、国有企业、非公有制企业、社会组织".into()),
        ("所在地区", "选填", "最多 100 个字".into()),
        ("入党时间", "必填", "日期，如 2010-07-01；须年满 18 周岁，不能晚于今天".into()),
        ("党员类别", "必填", labels(Category::ALL, Category::label)),
        ("转正时间", "选填", "日期；仅正式党员填写，不能早于入党时间".into()),
        ("党籍状态", "选填", format!("{}；不填为 正常", labels(Status::ALL, Status::label))),
        ("干部类别", "选填", format!("{}；不填为 非干部", labels(Cadre::ALL, Cadre::label))),
        ("干部职务", "选填", "如 支部书记".into()),
        ("所属组织", "必填", "组织的完整名称路径（如 县委/东街道党工委/东一支部）、不致混淆的末段名称，或组织编码；须在您管辖的范围内".into()),
    ]
}

/// A valid example ID number (a man born 1985-07-01).
fn example_id() -> String {
    let first17 = "11010519850701003";
    format!("{first17}{}", idcard::check_char(first17).unwrap_or('0'))
}

/// The member template: header, an example row, and an explanation of every column.
#[utoipa::path(get, path = "/api/v1/members/template.xlsx",
    responses((status = 200, content_type = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", body = Vec<u8>),
        (status = 401, body = ErrorBody)))]
pub(crate) async fn member_template(
    State(state): State<AppState>,
    user: CurrentUser,
) -> Result<Response, AppError> {
    let scope = Scope::of(&state.db, &user.0).await?;
    let orgs = OrgIndex::load(&state.db, &scope).await?;
    let example_org = orgs
        .orgs
        .iter()
        .enumerate()
        .find(|(_, o)| o.kind == OrgKind::Branch)
        .or_else(|| orgs.orgs.iter().enumerate().next())
        .map(|(i, _)| orgs.full_name(i).to_string())
        .unwrap_or_else(|| "县委/东街道党工委/东一支部".into());
    let example: [String; 18] = [
        "张三".into(),
        "男".into(),
        example_id(),
        "1985-07-01".into(),
        "汉族".into(),
        "大学本科".into(),
        "北京东城".into(),
        "13812345678".into(),
        "东街道办事处".into(),
        "机关".into(),
        "东街道".into(),
        "2010-07-01".into(),
        "正式党员".into(),
        "2011-07-01".into(),
        "正常".into(),
        "非干部".into(),
        String::new(),
        example_org,
    ];
    let mut book = Workbook::new();
    let text = Format::new().set_num_format("@");
    let ws = book.add_worksheet();
    ws.set_name("党员信息").map_err(xlsx_error)?;
    write_header(ws, &FIELDS, &MEMBER_WIDTHS)?;
    // ID numbers and phones as text, so Excel keeps every digit.
    for c in [C_ID, C_PHONE] {
        ws.set_column_format(c as u16, &text).map_err(xlsx_error)?;
    }
    for (c, v) in example.iter().enumerate() {
        ws.write_string(1, c as u16, v).map_err(xlsx_error)?;
    }
    let help = book.add_worksheet();
    help.set_name("填写说明").map_err(xlsx_error)?;
    write_header(
        help,
        &["列名", "是否必填", "说明和可填的值"],
        &[12.0, 10.0, 90.0],
    )?;
    for (i, (col, req, what)) in column_help().iter().enumerate() {
        let r = i as u32 + 1;
        help.write_string(r, 0, *col).map_err(xlsx_error)?;
        help.write_string(r, 1, *req).map_err(xlsx_error)?;
        help.write_string(r, 2, what).map_err(xlsx_error)?;
    }
    let r = column_help().len() as u32 + 2;
    help.write_string(
        r,
        0,
        "说明：第一行是表头，请勿改动列名；列的顺序不限，选填的列可以删去（删去的列导入时保留原有内容）。\
         只要有一行出错，整个文件都不会导入，并列出每个错误所在的行和列；\
         也可以选择只导入正确的行。同一文件中身份证号不能重复。",
    )
    .map_err(xlsx_error)?;
    let bytes = book.save_to_buffer().map_err(xlsx_error)?;
    Ok(xlsx_response(bytes, "member-template.xlsx"))
}

// ---------------------------------------------------------------------------------------------
// The org tree
// ---------------------------------------------------------------------------------------------

/// Export the org tree (the caller's part) as .xlsx.
#[utoipa::path(get, path = "/api/v1/orgs/export.xlsx",
    responses((status = 200, content_type = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", body = Vec<u8>),
        (status = 401, body = ErrorBody)))]
pub(crate) async fn export_orgs(
    State(state): State<AppState>,
    user: CurrentUser,
) -> Result<Response, AppError> {
    let scope = Scope::of(&state.db, &user.0).await?;
    let orgs = OrgIndex::load(&state.db, &scope).await?;
    let mut book = Workbook::new();
    let ws = book.add_worksheet();
    ws.set_name("组织").map_err(xlsx_error)?;
    write_header(ws, &ORG_FIELDS, &[24.0, 10.0, 48.0, 14.0])?;
    for (i, o) in orgs.orgs.iter().enumerate() {
        let full = orgs.full_name(i);
        let parent = full.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
        let r = i as u32 + 1;
        ws.write_string(r, 0, &o.name).map_err(xlsx_error)?;
        ws.write_string(r, 1, o.kind.label()).map_err(xlsx_error)?;
        if !parent.is_empty() {
            ws.write_string(r, 2, parent).map_err(xlsx_error)?;
        }
        if let Some(c) = &o.code {
            ws.write_string(r, 3, c).map_err(xlsx_error)?;
        }
    }
    let bytes = book.save_to_buffer().map_err(xlsx_error)?;
    Ok(xlsx_response(bytes, "orgs.xlsx"))
}

struct OrgRowIn {
    row: u32,
    name: String,
    kind: Option<OrgKind>,
    parent: String,
    code: Option<String>,
}

/// Import the org tree from .xlsx: creates missing orgs (parents first), updates type and code.
#[utoipa::path(post, path = "/api/v1/orgs/import.xlsx",
    request_body(content = Vec<u8>, content_type = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        description = "The .xlsx file itself (not multipart)"),
    responses((status = 200, body = ImportReport), (status = 403, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ImportReport)))]
pub(crate) async fn import_orgs(
    State(state): State<AppState>,
    user: CurrentUser,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AppError> {
    let me = user.require(Permission::ManageOrgs)?;
    let bytes = match read_upload(&headers, body).await {
        Ok(b) => b,
        Err(resp) => return Ok(resp),
    };
    let scope = Scope::of(&state.db, me).await?;
    let mut index = OrgIndex::load(&state.db, &scope).await?;
    let sheet = match tokio::task::spawn_blocking(move || read_sheet(&bytes))
        .await
        .map_err(|e| anyhow::anyhow!(e))?
    {
        Ok(s) => s,
        Err(report) => return Ok(unprocessable(report)),
    };
    let missing: Vec<RowError> = ORG_FIELDS[..3]
        .iter()
        .filter(|t| !sheet.columns.contains_key(**t))
        .map(|t| RowError {
            row: sheet.header_row,
            column: Some(t.to_string()),
            cell: None,
            message: format!("缺少必需的列“{t}” (missing required column)"),
        })
        .collect();
    if !missing.is_empty() {
        return Ok(unprocessable(ImportReport::refused(
            "missing_columns",
            "表头缺少必需的列 (missing required columns)",
            missing,
        )));
    }
    let col = |t: &str| sheet.columns.get(t).copied();
    let mut errors = Vec::new();
    let mut rows = Vec::new();
    for (n, cells) in &sheet.rows {
        let get = |t: &str| {
            col(t)
                .map(|c| text_of(sheet.cell(cells, c)).unwrap_or_default())
                .unwrap_or_default()
        };
        let mut err = |t: &str, m: String| errors.push(row_error(&sheet, *n, t, m));
        let name = get("组织名称");
        if name.is_empty() || name.chars().count() > MAX_NAME_CHARS || name.contains('/') {
            err(
                "组织名称",
                format!("组织名称须为 1 至 {MAX_NAME_CHARS} 个字，不能含“/” (bad name)"),
            );
        }
        let kind_text = get("组织类型");
        let kind = OrgKind::from_label(&kind_text);
        if kind.is_none() {
            err(
                "组织类型",
                "组织类型须为 党委、党总支、党支部 或 党小组 (bad org type)".into(),
            );
        }
        let code = Some(get("组织编码")).filter(|c| !c.is_empty());
        if let Some(c) = &code
            && (c.chars().count() > 50 || c.chars().any(char::is_whitespace))
        {
            err(
                "组织编码",
                "组织编码不能含空格，最多 50 个字符 (bad org code)".into(),
            );
        }
        rows.push(OrgRowIn {
            row: *n,
            name,
            kind,
            parent: norm_path(&get("上级组织")),
            code,
        });
    }
    // Resolve parents in passes, so that rows may come in any order.
    enum Plan {
        Create,
        Existing(usize),
    }
    let mut plans: Vec<Option<Plan>> = (0..rows.len()).map(|_| None).collect();
    let mut created: Vec<(usize, usize)> = Vec::new(); // (row index, org index)
    let mut seen_paths: HashMap<String, u32> = HashMap::new();
    loop {
        let mut progress = false;
        for (k, r) in rows.iter().enumerate() {
            if plans[k].is_some() || r.kind.is_none() || r.name.is_empty() {
                continue;
            }
            let parent = if r.parent.is_empty() {
                None
            } else {
                match index.resolve(&r.parent) {
                    Ok(i) => Some(i),
                    Err(_) => {
                        // The scope's own root names a parent above the scope: match it as itself.
                        let own = format!("{}/{}", r.parent, r.name);
                        if let Some(Some(i)) = index.by_tail.get(&own)
                            && index.full_name(*i) == own
                        {
                            plans[k] = Some(Plan::Existing(*i));
                            progress = true;
                        }
                        continue;
                    }
                }
            };
            let own = match parent {
                Some(p) => format!("{}/{}", index.full_name(p), r.name),
                None => r.name.clone(),
            };
            if let Some(Some(i)) = index.by_tail.get(&own)
                && index.full_name(*i) == own
            {
                plans[k] = Some(Plan::Existing(*i));
            } else if let Some(p) = parent {
                if let Some(first) = seen_paths.get(&own) {
                    errors.push(row_error(
                        &sheet,
                        r.row,
                        "组织名称",
                        format!("与第 {first} 行是同一个组织 (same org as row {first})"),
                    ));
                    plans[k] = Some(Plan::Existing(usize::MAX));
                    continue;
                }
                seen_paths.insert(own.clone(), r.row);
                let parent_org = &index.orgs[p];
                let id = new_id();
                let org = Org {
                    path: format!("{}{id}/", parent_org.path),
                    depth: parent_org.depth + 1,
                    id,
                    parent_id: Some(parent_org.id.clone()),
                    name: r.name.clone(),
                    kind: r.kind.unwrap_or(OrgKind::Branch),
                    code: None,
                };
                let i = index.add(org, own);
                created.push((k, i));
                plans[k] = Some(Plan::Create);
            } else if scope.root.is_none() {
                if let Some(first) = seen_paths.get(&own) {
                    errors.push(row_error(
                        &sheet,
                        r.row,
                        "组织名称",
                        format!("与第 {first} 行是同一个组织 (same org as row {first})"),
                    ));
                    plans[k] = Some(Plan::Existing(usize::MAX));
                    continue;
                }
                seen_paths.insert(own.clone(), r.row);
                let id = new_id();
                let org = Org {
                    path: format!("/{id}/"),
                    depth: 0,
                    id,
                    parent_id: None,
                    name: r.name.clone(),
                    kind: r.kind.unwrap_or(OrgKind::Committee),
                    code: None,
                };
                let i = index.add(org, own);
                created.push((k, i));
                plans[k] = Some(Plan::Create);
            } else {
                errors.push(row_error(
                    &sheet,
                    r.row,
                    "上级组织",
                    "只有系统管理员可以建立顶级组织，请填写上级组织 (only system admins create top-level orgs)".into(),
                ));
                plans[k] = Some(Plan::Existing(usize::MAX));
            }
            progress = true;
        }
        if !progress {
            break;
        }
    }
    for (k, r) in rows.iter().enumerate() {
        if plans[k].is_none() && r.kind.is_some() && !r.name.is_empty() {
            errors.push(row_error(
                &sheet,
                r.row,
                "上级组织",
                format!(
                    "在您管辖的范围内找不到上级组织“{}” (no such parent org in your part of the tree)",
                    r.parent
                ),
            ));
        }
    }
    // Codes: unique across the whole table, and within the file.
    let mut code_rows: HashMap<&str, u32> = HashMap::new();
    let mut changes: Vec<(String, OrgKind, Option<String>)> = Vec::new();
    let mut unchanged = 0;
    let mut inserts: Vec<&Org> = Vec::new();
    for (k, r) in rows.iter().enumerate() {
        let Some(plan) = &plans[k] else { continue };
        if let Some(c) = &r.code {
            if let Some(first) = code_rows.insert(c, r.row) {
                errors.push(row_error(
                    &sheet,
                    r.row,
                    "组织编码",
                    format!("组织编码与第 {first} 行重复 (duplicate code)"),
                ));
                continue;
            }
            let holder: Option<(String,)> = sqlx::query_as("SELECT id FROM orgs WHERE code = $1")
                .bind(c)
                .fetch_optional(&state.db.pool)
                .await?;
            let mine = match plan {
                Plan::Existing(i) if *i != usize::MAX => Some(index.orgs[*i].id.as_str()),
                _ => None,
            };
            if let Some((h,)) = holder
                && Some(h.as_str()) != mine
            {
                errors.push(row_error(
                    &sheet,
                    r.row,
                    "组织编码",
                    format!("组织编码 {c} 已被其他组织使用 (code taken)"),
                ));
                continue;
            }
        }
        match plan {
            Plan::Existing(usize::MAX) => {}
            Plan::Existing(i) => {
                let o = &index.orgs[*i];
                let kind = r.kind.unwrap_or(o.kind);
                if kind == o.kind && r.code == o.code {
                    unchanged += 1;
                } else {
                    changes.push((o.id.clone(), kind, r.code.clone()));
                }
            }
            Plan::Create => {}
        }
    }
    for (k, i) in &created {
        index.orgs[*i].code = rows[*k].code.clone();
    }
    for (_, i) in &created {
        inserts.push(&index.orgs[*i]);
    }
    let mut report = ImportReport {
        rows: rows.len(),
        ..ImportReport::default()
    };
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.row);
        let bad = errors.iter().map(|e| e.row).collect::<HashSet<_>>().len();
        report.errors = errors;
        report.error = Some("invalid_rows");
        report.message = Some(format!(
            "{bad} 行有错误，未导入任何数据 ({bad} bad rows; nothing imported)"
        ));
        return Ok(unprocessable(report));
    }
    // Parents before children: by depth.
    inserts.sort_by_key(|o| o.depth);
    let now = now_ms();
    let mut tx = state.db.pool.begin().await?;
    for o in &inserts {
        let r = sqlx::query(
            "INSERT INTO orgs (id, parent_id, path, name, kind, code, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
        )
        .bind(&o.id)
        .bind(&o.parent_id)
        .bind(&o.path)
        .bind(&o.name)
        .bind(o.kind.as_str())
        .bind(&o.code)
        .bind(now)
        .execute(&mut *tx)
        .await;
        insert_result(r)?;
    }
    for (id, kind, code) in &changes {
        let r = sqlx::query("UPDATE orgs SET kind = $2, code = $3, updated_at = $4 WHERE id = $1")
            .bind(id)
            .bind(kind.as_str())
            .bind(code)
            .bind(now)
            .execute(&mut *tx)
            .await;
        insert_result(r)?;
    }
    tx.commit().await?;
    report.inserted = inserts.len();
    report.updated = changes.len();
    report.unchanged = unchanged;
    report.imported = report.inserted + report.updated;
    auth::audit(
        &state.db,
        Some(&me.id),
        "import_orgs",
        "",
        &format!(
            "inserted {} updated {} unchanged {}",
            report.inserted, report.updated, report.unchanged
        ),
    )
    .await?;
    Ok(Json(report).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_in_many_spellings() {
        for s in [
            "1990-01-31",
            "1990/1/31",
            "1990.01.31",
            "1990年1月31日",
            "19900131",
            "1990-01-31 00:00:00",
        ] {
            assert_eq!(
                date_of(&Data::String(s.into())).unwrap().as_deref(),
                Some("1990-01-31"),
                "{s}"
            );
        }
        // Excel's serial for 1990-01-31.
        assert_eq!(
            date_of(&Data::Float(32904.0)).unwrap().as_deref(),
            Some("1990-01-31")
        );
        assert_eq!(
            date_of(&Data::Int(32904)).unwrap().as_deref(),
            Some("1990-01-31")
        );
        assert!(
            date_of(&Data::String("去年".into()))
                .unwrap_err()
                .contains("not a date")
        );
        assert!(date_of(&Data::String("1990-02-30".into())).is_err());
        assert_eq!(date_of(&Data::Empty).unwrap(), None);
    }

    #[test]
    fn cells_and_columns() {
        assert_eq!(text_of(&Data::Float(13812345678.0)).unwrap(), "13812345678");
        assert_eq!(column_letters(0), "A");
        assert_eq!(column_letters(25), "Z");
        assert_eq!(column_letters(26), "AA");
        assert_eq!(column_letters(17), "R");
        assert_eq!(norm_path(" 县委 / 东街道党工委/"), "县委/东街道党工委");
        assert!(idcard::parse(&example_id()).is_ok());
    }
}
